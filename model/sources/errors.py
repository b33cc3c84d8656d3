"""The one error a checkpoint source raises: one line naming the source and the cause."""


class SourceError(ValueError):
    """A checkpoint location that cannot be resolved, listed, fetched or verified."""


class StoreUnreachable(SourceError):
    """The store did not answer (connection refused, DNS, timeout): a complete cache may serve."""
