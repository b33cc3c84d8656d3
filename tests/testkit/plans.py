"""Measures of placement plans that only tests need."""

from __future__ import annotations

import math

from grokserve.model.placement import Plan


def balance(plan: Plan) -> float:
    """Largest over smallest per-rank total, minus one (0.0 = perfectly balanced)."""
    totals = [rank.total for rank in plan.ranks]
    return max(totals) / min(totals) - 1 if min(totals) else math.inf
