"""Which byte ranges of a checkpoint a caller needs: its metadata only, or one rank's share.

Safetensors headers give every tensor's range; an expert-parallel rank takes only its experts: the
per-expert tensors of a Hugging Face port, or its rows of the leading expert axis of grokserve's
stacked `[E, ...]` tensors. The released layout (one pickle per parameter, every expert in each)
and everything else is taken whole.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from grokserve.model.checkpoint.names import HF_NAMINGS
from grokserve.model.sources.cache import Slicer
from grokserve.model.sources.errors import SourceError
from grokserve.model.sources.ranges import Ranges
from grokserve.model.sources.store import ObjectInfo

METADATA_SUFFIXES = (".json", ".model")  # config, index, tokenizer: always whole
# What the checkpoint readers read: safetensors, JSON, the tokenizer and the release's pickles. Other
# files of a repository (README, pytorch_model.bin beside the safetensors, images) are never fetched.
READABLE = re.compile(r".*\.(?:safetensors|json|model)|(?:.*/)?tensor\d{5}_000")
EXPERT_KINDS = "(?:linear|linear_v|linear_1)"
PER_EXPERT = [
    re.compile(
        (naming.layer + naming.expert)
        .replace(".", r"\.")
        .format(i=r"(?P<layer>\d+)", e=r"(?P<expert>\d+)", kind=EXPERT_KINDS)
    )
    for naming in HF_NAMINGS
]
STACKED = re.compile(r"layers\.(?P<layer>\d+)\.moe\.(?:w_gate|w_up|w_down)(?:\.weight|\.scales)?")

if TYPE_CHECKING:
    from grokserve.model.placement import Plan

Read = Callable[[int, int], bytes]


def rank_experts(plan: Plan, rank: int) -> dict[int, frozenset[int]]:
    """Layer -> the experts `rank` holds (any slice of) in `plan`."""
    return {
        layer: frozenset(piece.expert for piece in plan.shard(layer, rank).experts)
        for layer in range(len(plan.layers))
    }


def safetensors_header(info: ObjectInfo, read: Read) -> tuple[int, dict]:
    """(offset of the data, header) of a safetensors file, read by range."""
    if info.size < 8:
        raise SourceError(f"{info.name}: {info.size} bytes is too short for a safetensors file")
    (length,) = struct.unpack("<Q", read(0, 8))
    if 8 + length > info.size:
        raise SourceError(f"{info.name}: its header claims {length} bytes, beyond the file")
    try:
        return 8 + length, json.loads(read(8, 8 + length))
    except ValueError as error:
        raise SourceError(f"{info.name}: not a safetensors header ({error})") from error


def checkpoint_files(info: ObjectInfo, read: Read) -> Ranges:
    """Every file a checkpoint reader reads, whole."""
    return [(0, info.size)] if READABLE.fullmatch(info.name) else []


def metadata_only(info: ObjectInfo, read: Read) -> Ranges:
    """Enough to open a checkpoint and read its config: JSON and tokenizer files, safetensors
    headers."""
    if info.name.endswith(METADATA_SUFFIXES):
        return [(0, info.size)]
    if info.name.endswith(".safetensors"):
        return [(0, safetensors_header(info, read)[0])]
    return []


def rank_slicer(experts: Mapping[int, frozenset[int]]) -> Slicer:
    """A rank's share: every tensor whole, except other ranks' experts (`experts`: layer -> the
    experts this rank holds)."""

    def slicer(info: ObjectInfo, read: Read) -> Ranges:
        if not info.name.endswith(".safetensors"):
            return checkpoint_files(info, read)
        base, header = safetensors_header(info, read)
        ranges = [(0, base)]
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = (base + offset for offset in entry["data_offsets"])
            if per_expert := next((m for p in PER_EXPERT if (m := p.fullmatch(name))), None):
                if int(per_expert["expert"]) in experts.get(int(per_expert["layer"]), ()):
                    ranges.append((begin, end))
            elif stacked := STACKED.fullmatch(name):
                count = entry["shape"][0]
                stride = (end - begin) // count
                for expert in experts.get(int(stacked["layer"]), range(count)):
                    ranges.append((begin + expert * stride, begin + (expert + 1) * stride))
            else:
                ranges.append((begin, end))
        return ranges

    return slicer
