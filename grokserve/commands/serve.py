"""`grokserve serve`: the serving stack on this machine (local Ray or RAY_ADDRESS), until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

HELP = "serve a Grok model with an OpenAI-compatible API on a local Ray cluster (Ctrl-C stops it)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="API port (8000)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", help="serve random weights of this preset (e.g. grok-tiny)")
    model.add_argument(
        "--checkpoint",
        help="checkpoint: a directory (any format), file://, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX "
        "or hf://ORG/REPO[@REVISION][/SUBDIR]; default: the demo checkpoint shipped with grokserve",
    )
    parser.add_argument(
        "--tokenizer", help="SentencePiece model, same locations (default: the checkpoint's)"
    )
    add_cache_dir(parser)
    parser.add_argument(
        "--name", help="model id in the API (default: the preset, 'grok-demo' or 'grok')"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--quantization", default="none", choices=("none", "int8"))
    parser.add_argument("--seed", type=int, default=0, help="seed of random preset weights")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (1)")
    parser.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="simulate this many nodes per replica with Ray's cluster utilities (0: no simulation)",
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=1, help="simulated GPUs (shards) per node (1)"
    )
    parser.add_argument("--tensor", type=int, help="attention shards (default: planner's choice)")
    parser.add_argument("--expert", type=int, help="expert groups (default: planner's choice)")
    parser.add_argument(
        "--strategy",
        default="pack",
        choices=("pack", "spread", "strict-spread"),
        help="Ray placement-group strategy of the shards over the nodes",
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--max-queued-requests", type=int, default=64)
    parser.add_argument(
        "--kv-cache-tokens",
        type=int,
        help="paged KV-cache capacity in tokens (default: max batch size × max sequence length)",
    )


def serving_config(args: argparse.Namespace):
    """The ServingConfig these flags describe (pydantic ValidationError names a bad flag's field)."""
    from grokserve.serving.config import ServingConfig
    from grokserve.serving.loading import DEMO_CHECKPOINT

    if args.preset:
        model = {"preset": args.preset, "seed": args.seed}
        name = args.name or args.preset
    elif args.checkpoint:
        model = {"source": args.checkpoint}
        name = args.name or "grok"
    else:
        model = {"source": str(DEMO_CHECKPOINT)}
        name = args.name or "grok-demo"
    model |= {
        "tokenizer": args.tokenizer,
        "cache_dir": args.cache_dir,
        "dtype": args.dtype,
        "quantization": args.quantization,
    }
    return ServingConfig(
        name=name,
        replicas=args.replicas,
        model=model,
        parallelism={"tensor": args.tensor, "expert": args.expert, "strategy": args.strategy},
        serving={
            "maxBatchSize": args.max_batch_size,
            "maxSequenceLength": args.max_sequence_length,
            "maxQueuedRequests": args.max_queued_requests,
            "kvCacheTokens": args.kv_cache_tokens,
        },
    )


def add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="node-local cache of s3://, gs:// and hf:// weights (default: ~/.cache/grokserve)",
    )


def prefetch(config) -> None:
    """Fetches a remote checkpoint here, where a person watches its progress bar, so that bad
    locations fail before Ray starts: all of it for one shard, else its metadata (each shard
    worker then fetches only its own share into the same node cache)."""
    from grokserve.model.sources import checkpoint_files, fetch, metadata_only

    spec = config.model
    if spec.source is not None:
        whole = config.parallelism.shards == 1
        slicer = checkpoint_files if whole else metadata_only
        fetch(spec.source, spec.cache_dir, slicer, progress=True)
    if spec.tokenizer is not None:
        fetch(spec.tokenizer, spec.cache_dir, progress=True)


def check_port(host: str, port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(
                f"--port {port}: cannot listen on {host}:{port} ({error.strerror})"
            ) from None


def one_line(error: Exception) -> str:
    """A pydantic error names each bad field on one line; others are one line already."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in error.errors()
        )
    return " ".join(str(error).split())


def run(args: argparse.Namespace) -> int:
    from grokserve.serving.app import check_config
    from grokserve.serving.launcher import ClusterShape, LocalServing

    # Everything a user can get wrong is checked before Ray starts, and said in one line.
    try:
        shape = ClusterShape(nodes=args.nodes, gpus_per_node=args.gpus_per_node)
        config = shape.apply(serving_config(args))
        check_port(args.host, args.port)
        # Fetched here, where a person watches the progress bar (and a bad location fails in one
        # line), before planning reads the checkpoint's config.
        prefetch(config)
        check_config(config)
    except Exception as error:  # the checks open files and plan memory: any failure is the input's
        print(f"grokserve serve: invalid settings: {one_line(error)}", file=sys.stderr)
        return 2
    # Serve's INFO lines on a fresh start ("Connecting to existing Serve app ... will not be
    # applied") describe its internals, not a problem.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    print(f"starting Ray and deploying {config.name!r} ({config.parallelism.shards} shard(s))...")
    local = LocalServing(config, host=args.host, port=args.port, shape=shape)
    try:
        try:
            local.start()
        except (RuntimeError, TimeoutError) as error:
            print(f"grokserve serve: {one_line(error)}", file=sys.stderr)
            return 1
        # Installed after ray.init, which replaces the SIGTERM handler with one that just dies.
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print(
            f"serving {config.name!r} at {local.url}/v1 (OpenAI API); metrics at {local.url}/metrics"
        )
        print(
            f"try: curl {local.url}/v1/completions -H 'content-type: application/json' "
            f"""-d '{{"model": "{config.name}", "prompt": "Return the", "max_tokens": 64}}'"""
        )
        print("Ctrl-C to stop")
        stop.wait()
        print("shutting down...")
    finally:
        local.close()
    # Everything is stopped; what is left is Ray's core worker finalising itself at interpreter
    # exit, which takes seconds: a Ctrl-C should not.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
