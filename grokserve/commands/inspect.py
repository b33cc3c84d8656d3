"""`grokserve inspect PATH`: what a checkpoint holds, read from headers without loading its tensors."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from grokserve.commands.serve import add_cache_dir

HELP = "show a checkpoint's format, config, parameter count, size and dtypes (headers only)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        help="checkpoint (xAI release, ckpt-0, Hugging Face, ours): a directory, file://, "
        "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or hf://ORG/REPO[@REVISION][/SUBDIR]",
    )
    add_cache_dir(parser)
    parser.add_argument("--config", help="preset name or config JSON (overrides the checkpoint's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor")


def summarise(reader: Any) -> dict[str, Any]:
    """Per-tensor headers; a pickle's data is seeked over, one file at a time."""
    infos = [reader.info(name) for name in reader.names()]
    dtypes: Counter[str] = Counter()
    dtype_bytes: Counter[str] = Counter()
    for info in infos:
        dtype = (
            info.dtype if info.scales_dtype is None else f"{info.dtype}+{info.scales_dtype} scales"
        )
        dtypes[dtype] += 1
        dtype_bytes[dtype] += info.nbytes
    return {
        "path": str(reader.path),
        "format": reader.format,
        "config": reader.config.to_dict(),
        "parameters": sum(info.num_parameters for info in infos),
        "bytes": sum(info.nbytes for info in infos),
        "dtypes": {d: {"tensors": dtypes[d], "bytes": dtype_bytes[d]} for d in sorted(dtypes)},
        "tensors": [
            {
                "name": info.name,
                "shape": list(info.shape),
                "dtype": info.dtype,
                "bytes": info.nbytes,
                **(
                    {"scales_shape": list(info.scales_shape), "scales_dtype": info.scales_dtype}
                    if info.scales_shape is not None
                    else {}
                ),
            }
            for info in infos
        ],
    }


def print_text(summary: dict[str, Any], tensors: bool) -> None:
    print(f"path:        {summary['path']}")
    print(f"format:      {summary['format']}")
    print(f"parameters:  {summary['parameters']:,}")
    print(f"bytes:       {summary['bytes']:,} ({summary['bytes'] / 2**30:.3f} GiB)")
    print("dtypes:")
    for dtype, counts in summary["dtypes"].items():
        print(f"  {dtype:<28} {counts['tensors']:>6} tensors  {counts['bytes']:>18,} bytes")
    print("config:")
    for field, value in summary["config"].items():
        print(f"  {field:<28} {value}")
    if tensors:
        print("tensors:")
        for tensor in summary["tensors"]:
            scales = (
                f"  scales {tensor['scales_shape']} {tensor['scales_dtype']}"
                if "scales_shape" in tensor
                else ""
            )
            print(f"  {tensor['name']:<32} {tensor['shape']} {tensor['dtype']}{scales}")


def run(args: argparse.Namespace) -> int:
    from grokserve.model.checkpoint import CheckpointError, open_checkpoint
    from grokserve.model.sources import (
        SourceError,
        checkpoint_files,
        fetch,
        metadata_only,
        parse_location,
    )

    try:
        remote = parse_location(args.path).is_remote
        fetched = fetch(args.path, args.cache_dir, metadata_only, progress=True)
        reader = open_checkpoint(fetched.path, args.config)
        if remote and reader.format == "xai":
            # The release's pickles hold their headers at offsets known only once read.
            whole = fetch(args.path, args.cache_dir, checkpoint_files, progress=True)
            reader = open_checkpoint(whole.path, args.config)
        summary = summarise(reader)
        if remote:
            summary["path"] = args.path
    except (CheckpointError, SourceError) as error:
        print(f"grokserve inspect: {error}", file=sys.stderr)
        return 1
    if args.json:
        if not args.tensors:
            summary.pop("tensors")
        print(json.dumps(summary, indent=2))
    else:
        print_text(summary, args.tensors)
    return 0
