"""Shared by the serving tests: the tiny served model and its limits, `grokserve serve` as a process."""

import os
import shutil
import signal
import socket
import subprocess
import time

MODEL = "grok-tiny"
# 8 slots + 8 queued: 16 concurrent clients are all admitted; 80 overflow the queue.
LIMITS = {"maxBatchSize": 8, "maxSequenceLength": 128, "maxQueuedRequests": 8}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`grokserve serve FLAGS` as a user runs it, its output in a log file."""

    def __init__(self, tmp_path, *flags):
        executable = shutil.which("grokserve")
        assert executable, "the grokserve console script is not installed (pip install -e .)"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = tmp_path / "serve.log"
        environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        with self.log.open("w") as output:
            self.process = subprocess.Popen(
                [executable, "serve", "--port", str(port), *flags],
                env={**environment, "PYTHONUNBUFFERED": "1"},
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def wait_serving(self, timeout_s: float) -> None:
        """Until it says Ctrl-C stops it: from then on, Ctrl-C is a clean stop."""
        deadline = time.monotonic() + timeout_s
        while "Ctrl-C to stop" not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, (
                f"not serving in {timeout_s} s:\n{self.log.read_text()}"
            )
            time.sleep(0.5)

    def ctrl_c(self, timeout_s: float) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
