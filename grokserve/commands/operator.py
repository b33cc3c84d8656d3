"""`grokserve operator`: run the GrokDeployment operator (kopf) with its metrics endpoint."""

from __future__ import annotations

import argparse

HELP = "run the GrokDeployment operator (reconciles GrokDeployments into KubeRay RayServices)"
# --log-format -> kopf's LogFormat member name.
LOG_FORMATS = {"plain": "FULL", "json": "JSON"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: all namespaces",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        help="port of the operator's Prometheus metrics (0 disables; default 8080)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=8081,
        help="port of the liveness endpoint /healthz (0 disables; default 8081)",
    )
    parser.add_argument(
        "--listen-host",
        default="0.0.0.0",
        help="address the metrics and health endpoints bind to (default 0.0.0.0, for pods)",
    )
    parser.add_argument(
        "--log-format",
        choices=sorted(LOG_FORMATS),
        default="plain",
        help="plain: one line per record (time, logger, level, message); json: one JSON object "
        "per record (default plain)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="log at DEBUG (every API request and handler step) instead of INFO",
    )
    parser.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="run as one of several operator replicas: coordinate through kopf's peering object "
        "NAME (a ClusterKopfPeering, or a KopfPeering in each --namespace; the chart creates "
        "it), where only the highest-priority live replica is active; default: standalone",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="this replica's peering priority (default: random, so that replicas differ: kopf "
        "pauses all replicas that share the highest priority)",
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import random
    import socket
    import uuid

    import kopf
    from prometheus_client import start_http_server

    import grokserve.operator.handlers  # noqa: F401  (registers the handlers)

    for port, name in ((args.metrics_port, "--metrics-port"), (args.health_port, "--health-port")):
        if not 0 <= port <= 65535:
            raise SystemExit(f"grokserve operator: {name} must be 0..65535, got {port}")
    if args.metrics_port and args.metrics_port == args.health_port:
        raise SystemExit(
            f"grokserve operator: --metrics-port and --health-port are both {args.metrics_port}: "
            "give them different ports"
        )
    # kopf at INFO by default: what it handles, what succeeded, what is retried and why.
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[LOG_FORMATS[args.log_format]])
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.listen_host)
    liveness = f"http://{args.listen_host}:{args.health_port}/healthz" if args.health_port else None
    priority = args.priority if args.priority is not None else random.randint(1, 2**31)
    identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # What the operator's own RayService watch needs to write only from the active peer.
    peering = None if args.peering is None else (args.peering, identity, priority)
    asyncio.run(
        kopf.operator(
            standalone=args.peering is None,
            peering_name=args.peering,
            # kopf types this as its Identity NewType of str, which it does not export.
            identity=identity,  # type: ignore[arg-type]
            priority=priority,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=liveness,
            memo=kopf.Memo(namespaces=args.namespace, peering=peering),
        )
    )
    return 0
