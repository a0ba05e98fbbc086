"""Turn raw judge probabilities into soft preference labels, and measure the judges.

Pure functions, no torch: average both option orders (cancels position bias, RLAIF App. B),
clamp chain-of-thought probabilities to [0.4, 0.6] (CAI §4.1), combine several judges by mean or
majority, and report each judge's position consistency and the judges' agreement.

    python -c "from cai_lite.voting import vote; print(vote([0.9, 0.4, 0.7], 'majority'))"
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

COT_CLAMP = (0.4, 0.6)


def clamp(p: float, lo: float = COT_CLAMP[0], hi: float = COT_CLAMP[1]) -> float:
    """CoT answers are over-confident after the reasoning commits to one side; CAI §4.1 clamps them."""
    return min(hi, max(lo, p))


def average_orders(p_first_ab: float | None, p_first_ba: float | None) -> float | None:
    """P(A better) from both presentations. `p_first_*` is the judge's probability for whichever
    response sat in slot (A); in the swapped order that response is B, so it enters as 1 - p."""
    parts = [p for p in (p_first_ab, None if p_first_ba is None else 1.0 - p_first_ba) if p is not None]
    return sum(parts) / len(parts) if parts else None


def mean_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def vote(p_as: Sequence[float | None], how: str) -> float | None:
    """Combine judges: `mean` of probabilities, or `majority` of choices (1, 0, or 0.5 on a tie).
    Failed judges (None) do not vote; if all failed, the label fails too."""
    kept = [p for p in p_as if p is not None]
    if not kept:
        return None
    if how == "mean":
        return sum(kept) / len(kept)
    if how == "majority":
        a = sum(p > 0.5 for p in kept)
        b = sum(p < 0.5 for p in kept)
        return 1.0 if a > b else 0.0 if b > a else 0.5
    raise ValueError(f"judge_vote: unknown method {how!r} (mean, majority)")


def position_consistent(p_first_ab: float | None, p_first_ba: float | None) -> bool | None:
    """Does the judge's choice survive swapping the options? None if either order failed or tied."""
    if p_first_ab is None or p_first_ba is None or p_first_ab == 0.5 or p_first_ba == 0.5:
        return None
    return (p_first_ab > 0.5) == (p_first_ba < 0.5)


def rate(flags: Sequence[bool | None]) -> float | None:
    kept = [f for f in flags if f is not None]
    return sum(kept) / len(kept) if kept else None


def agreement(per_judge: Sequence[Sequence[float | None]]) -> float | None:
    """Share of (comparison, judge pair) where both judges chose the same side (ties excluded)."""
    hits, total = 0, 0
    for a, b in itertools.combinations(per_judge, 2):
        for pa, pb in zip(a, b):
            if pa is None or pb is None or pa == 0.5 or pb == 0.5:
                continue
            total += 1
            hits += (pa > 0.5) == (pb > 0.5)
    return hits / total if total else None
