"""The built-in autoscaler: Prometheus queue metrics → policy → `spec.replicas` via `/scale`."""
