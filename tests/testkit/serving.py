"""Shared by the serving tests: the tiny served model and its limits."""

import socket

MODEL = "grok-tiny"
# 8 slots + 8 queued: 16 concurrent clients are all admitted; 80 overflow the queue.
LIMITS = {"maxBatchSize": 8, "maxSequenceLength": 128, "maxQueuedRequests": 8}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
