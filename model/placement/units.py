"""Memory sizes: GPU memory as users write it (Kubernetes quantities) and bytes as plans print them."""

from __future__ import annotations

import re

GB = 10**9
GIB = 2**30
# Kubernetes' suffixes for byte quantities (`80Gi`, `80G`); a trailing B (`80GB`, `80GiB`) is
# accepted too, as people write it on a command line.
_PREFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_BINARY = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp])(i?)(b?)\s*$", re.I)
UNITS = "Ki, Mi, Gi, Ti, Pi (powers of 2) or k, M, G, T, P (powers of 10), e.g. 80Gi or 141G"


class MemorySizeError(ValueError):
    """A memory size without a number and a unit; the message names the accepted units."""


def parse_memory(text: str, what: str = "GPU memory") -> int:
    """Bytes from a size with a unit: 80Gi (2^30 bytes per Gi), 80G or 80GB (10^9 bytes per G).

    A bare number is refused rather than read as bytes: `80` nearly always means 80 GB, and 80
    bytes would be planned as a GPU that holds nothing.
    """
    match = _SIZE.match(str(text))
    if match is None:
        raise MemorySizeError(f"{what} {text!r} needs a number and a unit: {UNITS}")
    number, prefix, binary, _ = match.groups()
    scale = (_BINARY if binary else _PREFIXES)[prefix.lower()]
    value = int(float(number) * scale)
    if value <= 0:
        raise MemorySizeError(f"{what} must be positive, got {text!r}")
    return value


def gigabytes(size: int) -> str:
    return f"{size / GB:.1f} GB"


def memory_size(size: int) -> str:
    """A GPU's memory the way it was most likely written: 80 GiB, or 80 GB."""
    if size % GIB == 0:
        return f"{size // GIB} GiB"
    return f"{size / GB:g} GB"
