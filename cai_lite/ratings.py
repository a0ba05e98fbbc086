"""Statistics for the `evaluate` stage: confidence intervals, win rates and model ratings.

Reads nothing: every function takes plain Python numbers (judge probabilities P(A better) for
pairwise comparisons, or yes/no flags such as "harmful" and "evasive"). Writes nothing: these are
pure, deterministic functions (random resampling is seeded), so the evaluate stage can call them
and save what they return.

    python -c "from cai_lite.ratings import wilson_interval; print(wilson_interval(8, 10))"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

# Elo's scale: a 400-point gap means 10:1 odds.
ELO_SCALE = 400.0
# The mean rating that Bradley-Terry ratings are shifted to; only differences carry meaning.
ELO_MEAN = 1000.0


class Outcome(NamedTuple):
    """One comparison: `p_a` is P(`model_a` beats `model_b`); 1.0 a win, 0.0 a loss, 0.5 a tie.

    A NamedTuple, so plain `(model_a, model_b, p_a)` tuples are accepted wherever Outcome is."""

    model_a: str
    model_b: str
    p_a: float


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion `successes / n`.

    Preferred to the normal (Wald) interval because it stays inside [0, 1] and does not collapse
    to zero width at 0/n or n/n, which are common for harmful-rate counts. `successes` may be
    fractional (soft wins). With `n == 0` nothing is known, so the whole range (0.0, 1.0)."""
    if n < 0 or not 0.0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    # Clamp only floating-point noise (e.g. -1e-17 at 0/n); the exact interval is inside [0, 1].
    return max(0.0, center - half), min(1.0, center + half)


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[np.ndarray], float] = _mean,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) confidence interval of `stat(values)`.

    Resamples `values` with replacement `n_boot` times using a generator seeded with `seed`, so
    the same inputs always give the same interval (reports and tests are reproducible)."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D sequence of numbers")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    samples = arr[idx]
    # The mean is the common case: vectorise it instead of calling `stat` n_boot times.
    stats = samples.mean(axis=1) if stat is _mean else np.array([stat(s) for s in samples], dtype=float)
    low, high = np.quantile(stats, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def win_rate(p_wins: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Soft win rate of model X over model Y, with a 95% percentile-bootstrap CI.

    Each item is P(X beats Y) on one prompt (0.5 = tie). The bootstrap, not Wilson, gives the CI
    because soft outcomes are not Bernoulli draws. No data gives win_rate NaN and CI (0.0, 1.0)."""
    n = len(p_wins)
    if n == 0:
        return {"win_rate": math.nan, "ci_low": 0.0, "ci_high": 1.0, "n": 0}
    low, high = bootstrap_ci(p_wins, n_boot=n_boot, seed=seed)
    return {"win_rate": float(np.mean(p_wins)), "ci_low": low, "ci_high": high, "n": n}


def _validated(outcomes: Sequence[Outcome]) -> list[Outcome]:
    checked = []
    for a, b, p in outcomes:
        if a == b:
            raise ValueError(f"a model cannot be compared with itself: {a!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p_a must lie in [0, 1], got {p} for {a!r} vs {b!r}")
        checked.append(Outcome(a, b, float(p)))
    return checked


def bradley_terry(outcomes: Sequence[Outcome], iters: int = 200, prior: float = 0.1) -> dict[str, float]:
    """Fit Bradley-Terry strengths to soft outcomes; return them as Elo-scale ratings.

    Model: P(i beats j) = s_i / (s_i + s_j). A soft outcome p counts as p wins for a and 1 - p
    for b. Prior: every model also plays `prior` virtual wins and `prior` virtual losses against
    a fixed opponent of strength 1, so an undefeated (or winless) model keeps a finite rating and
    a model with few games is pulled to the middle. The penalised log-likelihood is strictly
    concave in log-strengths, so its maximum is unique; it is found by Newton's method with
    step halving (at most `iters` steps), which converges in a few steps even when an undefeated
    model sits far out, where the plain MM algorithm crawls. Rating = 400*log10(s_i), shifted so
    the mean rating over all models is exactly 1000 (anchor: only differences mean anything).
    Order-independent and deterministic."""
    checked = _validated(outcomes)
    if prior <= 0.0:
        raise ValueError("prior must be > 0, or an undefeated model's strength diverges")
    names = sorted({o.model_a for o in checked} | {o.model_b for o in checked})
    if not names:
        return {}
    index = {name: i for i, name in enumerate(names)}
    m = len(names)
    games = np.zeros((m, m))  # games[i, j]: comparisons between i and j (symmetric)
    wins = np.full(m, prior)  # soft wins, starting with the virtual wins of the prior
    for a, b, p in checked:
        i, j = index[a], index[b]
        games[i, j] += 1.0
        games[j, i] += 1.0
        wins[i] += p
        wins[j] += 1.0 - p

    def loglik(theta: np.ndarray) -> float:
        # log P = W.theta - sum_{i<j} n_ij log(e^theta_i + e^theta_j) - 2*prior*sum_i log(e^theta_i + 1)
        pair = np.logaddexp(theta[:, None], theta[None, :])
        return float(wins @ theta - 0.5 * (games * pair).sum() - 2 * prior * np.logaddexp(theta, 0.0).sum())

    theta = np.zeros(m)  # log-strengths
    current = loglik(theta)
    for _ in range(iters):
        p_win = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # p_win[i, j] = P(i beats j)
        p_virtual = 1.0 / (1.0 + np.exp(-theta))
        grad = wins - (games * p_win).sum(axis=1) - 2 * prior * p_virtual
        info = games * p_win * p_win.T  # Fisher information: n_ij p_ij (1 - p_ij)
        hessian = info - np.diag(info.sum(axis=1) + 2 * prior * p_virtual * (1.0 - p_virtual))
        step = -np.linalg.solve(hessian, grad)
        # Step halving keeps every accepted step an ascent step (pure Newton can overshoot from
        # the all-equal start when one model is far out).
        t = 1.0
        while t >= 1e-10 and loglik(theta + t * step) < current:
            t *= 0.5
        if t < 1e-10 or np.max(np.abs(step)) < 1e-12:  # at the maximum, to float precision
            break
        theta = theta + t * step
        current = loglik(theta)
    ratings = ELO_SCALE * theta / math.log(10.0)  # 400 * log10(s)
    ratings += ELO_MEAN - ratings.mean()
    return {name: float(ratings[index[name]]) for name in names}


def rate_with_ci(flags: Sequence[bool | float], z: float = 1.96) -> dict[str, float]:
    """Rate of a yes/no property (e.g. harmful, evasive) with its Wilson interval.

    Flags may be bools or probabilities in [0, 1] (summed as soft counts). No data gives rate NaN
    and CI (0.0, 1.0)."""
    n = len(flags)
    total = float(sum(float(f) for f in flags))
    low, high = wilson_interval(total, n, z)
    return {"rate": total / n if n else math.nan, "ci_low": low, "ci_high": high, "n": n}
