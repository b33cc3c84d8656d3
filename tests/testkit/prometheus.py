"""A real Prometheus (Debian's /usr/bin/prometheus) and a test exporter, both on 127.0.0.1.

    with PrometheusServer([ScrapeTarget(f"127.0.0.1:{exporter.port}", {"namespace": "llm"})]) as prom:
        prom.wait_for_targets_up(timeout=15)
        prom.query("sum(grokserve_requests_waiting)")

Prometheus scrapes and evaluates every second (`interval_s`); a freshly started one still needs about
5 s before it scrapes a target at all, because its discovery manager hands out new target sets only
every 5 s. `stop()` and `start()` again keep the port and the data dir, so a test can take Prometheus
away and bring it back at the same address.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

PROMETHEUS_BINARY = "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ScrapeTarget:
    """`host:port` serving /metrics, and labels Prometheus attaches to every series it scrapes."""

    address: str
    labels: dict[str, str] = field(default_factory=dict)
    metrics_path: str = "/metrics"


class PrometheusServer:
    """One Prometheus process; a context manager that always stops it and removes its files."""

    def __init__(
        self, targets: list[ScrapeTarget], interval_s: float = 1.0, binary: str = PROMETHEUS_BINARY
    ) -> None:
        if not Path(binary).exists():
            raise FileNotFoundError(f"{binary} not found: apt-get install prometheus")
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.interval_s = interval_s
        self._workdir = Path(tempfile.mkdtemp(prefix="grokserve-prometheus-"))
        self._config = self._workdir / "prometheus.yml"
        self._config.write_text(yaml.safe_dump(self._render_config(targets, interval_s)))
        self._log = self._workdir / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _render_config(targets: list[ScrapeTarget], interval_s: float) -> dict[str, Any]:
        interval = f"{int(interval_s * 1000)}ms"
        by_path: dict[str, list[ScrapeTarget]] = {}
        for target in targets:
            by_path.setdefault(target.metrics_path, []).append(target)
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": f"job{index}",
                    "metrics_path": path,
                    "scrape_timeout": interval,
                    "static_configs": [
                        {"targets": [t.address], "labels": dict(t.labels)} for t in group
                    ],
                }
                for index, (path, group) in enumerate(sorted(by_path.items()))
            ],
        }

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, ready_timeout_s: float = 30.0) -> PrometheusServer:
        if self.running:
            return self
        log = self._log.open("ab")
        self._process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self._config}",
                f"--storage.tsdb.path={self._workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self._wait_ready(ready_timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"prometheus exited during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout_s:g}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        if not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    def api(self, path: str, **params: str) -> Any:
        """GET `/api/v1/<path>` and return its `data`; raises on anything but success."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"{url}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector `promql` evaluates to now: [{"metric": {...}, "value": [t, "v"]}]."""
        data = self.api("query", query=promql)
        if data["resultType"] != "vector":
            raise ValueError(f"{promql!r} gave a {data['resultType']}, not a vector")
        return data["result"]

    def wait_for(self, promql: str, predicate: Any, timeout_s: float) -> list[dict[str, Any]]:
        """Poll `promql` until `predicate(result)` holds; the last result is in the timeout error."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.2)
        raise TimeoutError(f"{promql!r} still {result} after {timeout_s:g}s\n{self.log_tail()}")

    def wait_for_targets_up(self, timeout_s: float = 20.0) -> None:
        """Until every configured target has been scraped successfully at least once."""
        expected = len(self.api("targets", state="active")["activeTargets"]) or None

        def all_up(result: list[dict[str, Any]]) -> bool:
            return (
                bool(result)
                and len(result) == (expected or len(result))
                and all(series["value"][1] == "1" for series in result)
            )

        self.wait_for("up", all_up, timeout_s)


class TestExporter:
    """A prometheus-client HTTP server on 127.0.0.1 whose gauges the test sets by hand."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._server, self._thread = start_http_server(
            self.port, addr="127.0.0.1", registry=self.registry
        )

    def gauge(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, documentation, labelnames, registry=self.registry)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> TestExporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
