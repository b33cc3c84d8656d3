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
