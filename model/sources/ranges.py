"""Byte ranges as sorted, merged lists of [start, stop) pairs."""

from __future__ import annotations

from collections.abc import Iterable

Ranges = list[tuple[int, int]]


def merge(ranges: Iterable[tuple[int, int]]) -> Ranges:
    merged: Ranges = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def subtract(wanted: Ranges, have: Ranges) -> Ranges:
    """The parts of `wanted` not covered by `have` (both merged)."""
    missing: Ranges = []
    for start, stop in wanted:
        cursor = start
        for have_start, have_stop in have:
            if have_stop <= cursor or have_start >= stop:
                continue
            if have_start > cursor:
                missing.append((cursor, have_start))
            cursor = max(cursor, have_stop)
        if cursor < stop:
            missing.append((cursor, stop))
    return missing


def split(ranges: Ranges, chunk: int) -> Ranges:
    """Each range cut into pieces of at most `chunk` bytes (one request each)."""
    return [(s, min(s + chunk, stop)) for start, stop in ranges for s in range(start, stop, chunk)]


def total(ranges: Ranges) -> int:
    return sum(stop - start for start, stop in ranges)
