{{- define "grokserve.name" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "grokserve.labels" -}}
app.kubernetes.io/name: grokserve-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "grokserve.selector" -}}
app.kubernetes.io/name: grokserve-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* kopf peering: one object per release, cluster-wide or in each watched namespace. */}}
{{- define "grokserve.peering" -}}
{{- .Release.Name -}}
{{- end -}}

{{/* Values JSON Schema cannot compare two fields: refuse colliding ports here. */}}
{{- define "grokserve.checkPorts" -}}
{{- if eq (int .Values.metrics.port) (int .Values.health.port) -}}
{{- fail (printf "metrics.port and health.port are both %d: give them different ports" (int .Values.metrics.port)) -}}
{{- end -}}
{{- end -}}
