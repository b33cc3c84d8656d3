"""`grokserve render FILE`: print the children of GrokDeployment(s) as YAML, like `helm template`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "print the Kubernetes objects the operator would create for a GrokDeployment file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="YAML file with one or more GrokDeployment objects")
    parser.add_argument(
        "--namespace",
        default="default",
        help="namespace of objects that name none (default: default)",
    )
    parser.add_argument(
        "--no-servicemonitor",
        action="store_true",
        help="leave out the ServiceMonitor (clusters without the Prometheus Operator)",
    )


def run(args: argparse.Namespace) -> int:
    from grokserve.operator.render import RenderError, render_documents, to_yaml

    try:
        text = args.file.read_text()
    except OSError as error:
        print(f"grokserve render: cannot read {args.file}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        children = render_documents(
            text, namespace=args.namespace, with_servicemonitor=not args.no_servicemonitor
        )
    except RenderError as error:
        print(f"grokserve render: {args.file}: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(to_yaml(children))
    return 0
