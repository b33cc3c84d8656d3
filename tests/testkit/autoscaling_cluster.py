"""A local Ray cluster whose autoscaler adds and removes fake GPU nodes, sized from a RayCluster.

It is Ray's `ray.cluster_utils.AutoscalingCluster` recipe (a head started with
`--autoscaling-config` and RAY_FAKE_CLUSTER=1, so that Ray's own autoscaler launches worker nodes
through the FakeMultiNodeProvider: real raylets on this machine), with two changes:

- the autoscaling config is what Ray's autoscaler derives from our rendered RayCluster
  (`ray.autoscaler._private.kuberay.autoscaling_config`, the code the autoscaler sidecar runs
  under KubeRay): worker-group bounds, per-node resources and idle timeout come from the
  operator's output. Accelerators become the custom resource `simulated_gpu`, and memory is left
  to Ray (a fake node cannot reserve pod memory);
- it is started and stopped on its own: AutoscalingCluster.start/shutdown run `ray stop --force`,
  which kills every Ray process of this user on the machine (other tests' clusters included),
  and the wheel does not ship the example config it starts from. `ray start --block` runs in a
  new session here; stopping kills that process group, and every process left with this
  cluster's private temp dir on its command line.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testkit.serving import free_port

SIMULATED_GPU = "simulated_gpu"
HEAD_NODE_TYPE = "ray.head.default"  # the FakeMultiNodeProvider's name for the head


def fake_autoscaling_config(ray_cluster: dict[str, Any], gcs_address: str) -> dict[str, Any]:
    """Ray's autoscaling config for a RayCluster CR, on fake nodes of this machine."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    config = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(ray_cluster))
    node_types = {}
    for name, node_type in config["available_node_types"].items():
        resources = dict(node_type["resources"])
        resources.pop("memory", None)
        if "GPU" in resources:
            resources[SIMULATED_GPU] = resources.pop("GPU")
        node_types[HEAD_NODE_TYPE if name == config["head_node_type"] else name] = {
            **node_type,
            "resources": resources,
        }
    provider = {
        **config["provider"],
        "type": "fake_multinode",
        "gcs_address": gcs_address,
        # Fake nodes share this machine's IP: the autoscaler tells them apart by node id.
        "use_node_id_as_ip": True,
    }
    return {
        **config,
        "provider": provider,
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": node_types,
    }


class FakeGPUCluster:
    """A head plus whatever worker nodes Ray's autoscaler decides on, all on this machine."""

    def __init__(self, ray_cluster: dict[str, Any]) -> None:
        from ray._private.services import get_node_ip_address

        self.port = free_port()
        # This machine's address, as Ray names nodes (it turns 127.0.0.1 into that anyway).
        self.host = get_node_ip_address()
        self.address = f"{self.host}:{self.port}"
        self.config = fake_autoscaling_config(ray_cluster, self.address)
        self._temp = Path(tempfile.mkdtemp(prefix="gsray-", dir="/tmp"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def worker_type(self) -> dict[str, Any]:
        (worker,) = (
            t for n, t in self.config["available_node_types"].items() if n != HEAD_NODE_TYPE
        )
        return worker

    def start(self, timeout_s: float = 120) -> FakeGPUCluster:
        config_file = self._temp / "autoscaling.json"
        config_file.write_text(json.dumps(self.config))
        head = self.config["available_node_types"][HEAD_NODE_TYPE]["resources"]
        command = [
            # This interpreter, not whichever `ray` is on PATH: Ray's workers run the
            # interpreter that started the node, and must import this checkout's grokserve.
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            f"--node-ip-address={self.host}",
            f"--autoscaling-config={config_file}",
            f"--temp-dir={self._temp}",
            f"--num-cpus={head.get('CPU', 0)}",
            "--num-gpus=0",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        env = {
            **os.environ,
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "PYTHONSAFEPATH": "1",
            # `ray start` turns token auth on when ~/.ray/auth_token exists (other local
            # clusters leave one), which a driver that did not start the cluster does not use.
            "RAY_AUTH_MODE": "disabled",
        }
        log = (self._temp / "ray-start.log").open("wb")
        self._process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while not self._gcs_answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                output = (self._temp / "ray-start.log").read_text(errors="replace")
                self.shutdown()
                raise RuntimeError(f"the Ray head did not start:\n{output[-3000:]}")
            time.sleep(0.5)
        return self

    def _gcs_answers(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def _own_processes(self) -> list[int]:
        """Processes with this cluster's private temp dir on their command line (Linux)."""
        marker = str(self._temp).encode()
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def shutdown(self) -> None:
        if self._process is not None and self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGTERM)
                self._process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for pid in self._own_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        shutil.rmtree(self._temp, ignore_errors=True)

    def __enter__(self) -> FakeGPUCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
