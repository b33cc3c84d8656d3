"""grokserve: serve Grok-1 class mixture-of-experts models on Kubernetes.

The subpackages are `grokserve.model` (PyTorch model, loaders, placement), `grokserve.serving`
(Ray Serve application) and `grokserve.operator` (kopf operator). They are imported lazily so that
the operator image, which has no torch, can still run the CLI.
"""

__version__ = "0.1.0"
