"""Ray Serve application: OpenAI-compatible ingress, model replicas, shard workers, metrics."""
