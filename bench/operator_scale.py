"""The operator at fleet scale: N GrokDeployments created at once against the KMock API server.

For each N: a fresh KMock API server (in this process, on its own thread), the operator as its own
process (`grokserve operator`), and N copies of manifests/examples/grok-tiny-cpu.yaml (autoscaling
off) created one after the other. Prints the time until every one has all its children (RayService,
Service, ConfigMap, PDB, ServiceMonitor) and a status for its generation, the operator's API
requests per object, then, at rest, the operator's CPU (its own process), the API server's CPU
(this process, which at rest does nothing else) and the operator's requests per minute. KMock and
the operator share this machine's cores: both CPU figures are reported, each from its own process.

    PYTHONSAFEPATH=1 python bench/operator_scale.py --counts 100 1000 --rest-seconds 60
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

# The harness lives with the tests (tests/testkit); the benchmark reuses it rather than copying it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from testkit.kmock_api import KubeApi, KubeApiThread, running_kube_api
from testkit.operator_env import GROKDEPLOYMENTS, SERVICEMONITOR_CRD, Client, wait_until

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "manifests" / "examples" / "grok-tiny-cpu.yaml"
NAMESPACE = "fleet"
CHILD_PLURALS = ("rayservices", "services", "configmaps", "poddisruptionbudgets", "servicemonitors")
TICKS = os.sysconf("SC_CLK_TCK")
READS = ("discovery", "get", "list", "watch")
TARGET_RECONCILED_S, TARGET_REST_CPU, TARGET_RSS_MIB = 60.0, 0.02, 300


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--rest-seconds", type=float, default=60, help="how long to measure at rest (default 60)"
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=300,
        help="the operator's resync period (default 300, the operator's own); 60 resyncs every "
        "object within a 60 s rest window",
    )
    parser.add_argument("--workers", type=int, default=8, help="GROKSERVE_RECONCILE_WORKERS")
    parser.add_argument(
        "--timeout", type=float, default=600, help="give up waiting after this many seconds"
    )
    args = parser.parse_args(argv)
    if min(args.counts) < 1:
        parser.error(f"--counts must be >= 1, got {args.counts}")
    return args


def cpu_seconds(pid: int | str = "self") -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def memory_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/status has no {field}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def verb(request: Any) -> str:
    if request.resource.plural is None:
        return "discovery"
    method = request.method.value.upper()
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    if method == "PATCH" and "apply-patch" in request.headers.get("Content-Type", ""):
        return "apply"
    sub = f"/{request.subresource}" if request.subresource else ""
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method] + sub


def operator_requests(api: KubeApi, start: int) -> tuple[int, collections.Counter[str]]:
    """(requests so far, verbs of the operator's requests since index `start`)."""
    requests = list(api)
    verbs = collections.Counter(
        verb(r)
        for r in requests[start:]
        if not r.headers.get("User-Agent", "").startswith("Python-urllib")
        and r.resource is not None
    )
    return len(requests), verbs


def progress(api: KubeApi, names: list[str]) -> tuple[int, int]:
    """(objects with every child, objects with a status for their generation)."""
    children: dict[str, int] = collections.Counter()
    statuses = 0
    wanted = set(names)
    for (resource, namespace, _name), obj in api.objects.items():
        if obj.deleted or namespace != NAMESPACE:
            continue
        raw = obj.raw
        if resource.plural == "grokdeployments":
            observed = (raw.get("status") or {}).get("observedGeneration")
            statuses += observed == raw["metadata"]["generation"]
        elif resource.plural in CHILD_PLURALS:
            owner = (raw["metadata"].get("labels") or {}).get("grokserve.io/deployment")
            if owner in wanted:
                children[owner] += 1
    return sum(1 for n in children.values() if n == len(CHILD_PLURALS)), statuses


def start_operator(
    kubeconfig: Path, log: Path, args: argparse.Namespace
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PYTHONSAFEPATH": "1",
        "GROKSERVE_RESYNC_SECONDS": str(args.resync_seconds),
        "GROKSERVE_RECONCILE_WORKERS": str(args.workers),
    }
    command = [sys.executable, "-m", "grokserve", "operator", "--metrics-port", str(port)]
    command += ["--health-port", "0", "--listen-host", "127.0.0.1"]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    return process, port


def operator_metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def create_all(client: Client, names: list[str]) -> None:
    template = yaml.safe_load(EXAMPLE.read_text())
    path = f"{GROKDEPLOYMENTS}/namespaces/{NAMESPACE}/grokdeployments"
    for name in names:
        body = copy.deepcopy(template)
        body["metadata"] = {"name": name, "namespace": NAMESPACE}
        client.create(path, body)


def run_once(count: int, args: argparse.Namespace) -> dict[str, Any]:
    with running_kube_api() as server, tempfile.TemporaryDirectory() as tmp:
        # kube-apiserver ends a watch after 30 to 60 minutes, KMock after 60 s unless told: kopf
        # lists everything again at each reconnect, which would be most of the cost at rest.
        server.call(lambda api: setattr(api, "watch_timeout_s", 1800.0))
        client = Client(server.url)
        client.install_crds(kuberay=True)
        client.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", SERVICEMONITOR_CRD)
        log = Path(tmp) / "operator.log"
        operator, port = start_operator(
            server.write_kubeconfig(Path(tmp) / "kubeconfig"), log, args
        )
        try:
            return measure(server, client, operator, port, count, args)
        except BaseException:
            print(f"--- operator log (last lines) ---\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            operator.terminate()
            operator.wait(timeout=30)


def _watching(server: KubeApiThread) -> bool:
    _, verbs = server.call(lambda api: operator_requests(api, 0))
    return verbs["watch"] >= 1 + len(CHILD_PLURALS)


def measure(
    server: KubeApiThread,
    client: Client,
    operator: subprocess.Popen,
    port: int,
    count: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    wait_until(lambda: _watching(server), timeout=60, what="the operator to watch")
    names = [f"grok-tiny-{i:05d}" for i in range(count)]
    start, _ = server.call(lambda api: operator_requests(api, 0))
    cpu_operator, cpu_server = cpu_seconds(operator.pid), cpu_seconds()
    began = time.monotonic()
    creator = threading.Thread(target=create_all, args=(client, names))
    creator.start()
    creator.join()
    created_s = time.monotonic() - began
    while True:
        with_children, with_status = server.call(lambda api: progress(api, names))
        if with_children == count and with_status == count:
            break
        if time.monotonic() - began > args.timeout:
            raise SystemExit(f"N={count}: {with_children} with children, {with_status} with a "
                             f"status after {args.timeout} s")  # fmt: skip
        if operator.poll() is not None:
            raise SystemExit(f"the operator exited with {operator.returncode}")
        time.sleep(0.2)
    reconciled_s = time.monotonic() - began
    burst_operator_cpu = cpu_seconds(operator.pid) - cpu_operator
    burst_server_cpu = cpu_seconds() - cpu_server
    _, burst_verbs = server.call(lambda api: operator_requests(api, start))
    time.sleep(5)  # the events of the last writes settle
    rest_start, _ = server.call(lambda api: operator_requests(api, 0))
    skipped_before = operator_metric(port, "grokserve_operator_writes_skipped_total")
    passes_before = operator_metric(port, "grokdeployment_reconcile_duration_seconds_count")
    cpu_operator, cpu_server = cpu_seconds(operator.pid), cpu_seconds()
    time.sleep(args.rest_seconds)
    rest_operator_cpu = (cpu_seconds(operator.pid) - cpu_operator) / args.rest_seconds
    rest_server_cpu = (cpu_seconds() - cpu_server) / args.rest_seconds
    _, rest_verbs = server.call(lambda api: operator_requests(api, rest_start))
    return {
        "count": count,
        "created_s": created_s,
        "reconciled_s": reconciled_s,
        "burst_verbs": burst_verbs,
        "burst_operator_cpu_s": burst_operator_cpu,
        "burst_server_cpu_s": burst_server_cpu,
        "rest_operator_cpu": rest_operator_cpu,
        "rest_server_cpu": rest_server_cpu,
        "rest_verbs": rest_verbs,
        "rest_passes": operator_metric(port, "grokdeployment_reconcile_duration_seconds_count")
        - passes_before,
        "rest_skipped": operator_metric(port, "grokserve_operator_writes_skipped_total")
        - skipped_before,
        "rss_mib": memory_mib(operator.pid, "VmRSS"),
        "peak_rss_mib": memory_mib(operator.pid, "VmHWM"),
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    count = result["count"]
    burst = result["burst_verbs"]
    per_minute = 60 / args.rest_seconds
    rest = result["rest_verbs"]
    rest_writes = sum(n for v, n in rest.items() if v not in READS)
    print(f"N = {count}  (cores here: {os.cpu_count()}, reconcile workers: {args.workers})")
    print(f"  created (POST, one after the other)    {result['created_s']:8.1f} s")
    print(
        f"  all reconciled (children + status)     {result['reconciled_s']:8.1f} s   "
        f"target < {TARGET_RECONCILED_S:.0f} s: {result['reconciled_s'] / TARGET_RECONCILED_S:.2f}"
        " of it"
    )
    print(
        f"  operator requests per object          {sum(burst.values()) / count:8.1f}     "
        + ", ".join(f"{v} {n / count:.2f}" for v, n in sorted(burst.items()))
    )
    print(
        f"  CPU during the burst: operator {result['burst_operator_cpu_s']:.1f} s, "
        f"API server {result['burst_server_cpu_s']:.1f} s (with this script's polling)"
    )
    print(
        f"  at rest ({args.rest_seconds:.0f} s, resync every {args.resync_seconds:.0f} s): "
        f"operator CPU {100 * result['rest_operator_cpu']:.2f} % of a core "
        f"(target < {100 * TARGET_REST_CPU:.0f} %), API server CPU "
        f"{100 * result['rest_server_cpu']:.2f} %"
    )
    print(
        f"  at rest: {sum(rest.values()) * per_minute:.1f} requests/min "
        f"({', '.join(f'{v} {n * per_minute:.1f}' for v, n in sorted(rest.items())) or 'none'}), "
        f"writes {rest_writes * per_minute:.1f}/min (target 0); "
        f"{result['rest_passes']:.0f} resync passes, {result['rest_skipped']:.0f} writes skipped"
    )
    print(
        f"  operator memory: RSS {result['rss_mib']:.0f} MiB, peak {result['peak_rss_mib']:.0f} "
        f"MiB (target < {TARGET_RSS_MIB} MiB)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for count in args.counts:
        report(run_once(count, args), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
