"""Tests of cai_lite.ratings against hand-computed values and outcomes with known answers.

    python -m pytest tests/test_ratings.py -q
"""

from __future__ import annotations

import math

import pytest

from cai_lite.ratings import (
    Outcome,
    bootstrap_ci,
    bradley_terry,
    rate_with_ci,
    wilson_interval,
    win_rate,
)

# 400*log10(3): the Elo gap of a 3:1 strength ratio, i.e. a 75% expected win rate.
GAP_3_TO_1 = 400 * math.log10(3)


# ---------------------------------------------------------------- Wilson

@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        (8, 10, (0.4902, 0.9433)),  # textbook example
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (5, 10, (0.2366, 0.7634)),
    ],
)
def test_wilson_matches_hand_computed(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected[0], abs=1e-4)
    assert high == pytest.approx(expected[1], abs=1e-4)
    assert low <= successes / n <= high


def test_wilson_edges_and_soft_counts():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(7.5, 10)  # fractional (soft) successes
    assert low < 0.75 < high
    # Larger z widens; more data narrows.
    assert wilson_interval(8, 10, z=2.576)[0] < wilson_interval(8, 10)[0]
    assert wilson_interval(800, 1000)[1] - wilson_interval(800, 1000)[0] < 0.06
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_rate_with_ci():
    r = rate_with_ci([True] * 8 + [False] * 2)
    assert r["rate"] == pytest.approx(0.8)
    assert r["n"] == 10
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    soft = rate_with_ci([0.5, 1.0, 0.0, 0.5])
    assert soft["rate"] == pytest.approx(0.5)
    empty = rate_with_ci([])
    assert math.isnan(empty["rate"]) and (empty["ci_low"], empty["ci_high"]) == (0.0, 1.0)


# ---------------------------------------------------------------- bootstrap and win rate

def test_bootstrap_deterministic_contains_mean_and_narrows():
    values = [0.1, 0.9, 0.4, 0.7, 0.3, 0.8, 0.5, 0.6, 0.2, 1.0]
    a = bootstrap_ci(values, seed=3)
    assert a == bootstrap_ci(values, seed=3)
    assert a != bootstrap_ci(values, seed=4)
    mean = sum(values) / len(values)
    assert a[0] < mean < a[1]
    wide = bootstrap_ci(values * 1, seed=0)
    narrow = bootstrap_ci(values * 100, seed=0)
    assert narrow[1] - narrow[0] < 0.25 * (wide[1] - wide[0])
    assert narrow[0] < mean < narrow[1]


def test_bootstrap_custom_stat():
    values = list(range(101))
    low, high = bootstrap_ci(values, stat=lambda x: float(max(x)), n_boot=200)
    assert low <= 100 == high


def test_bootstrap_width_matches_normal_theory():
    # Bernoulli(0.5), n=1000: SE = 0.5/sqrt(1000), so the 95% CI is about mean +- 1.96*SE
    # (0.031) and the 90% one about mean +- 1.645*SE (0.026); the test tells them apart.
    values = [1.0, 0.0] * 500
    se = 0.5 / math.sqrt(1000)
    low, high = bootstrap_ci(values, n_boot=4000)
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.08)
    low90, high90 = bootstrap_ci(values, n_boot=4000, alpha=0.10)
    assert (high90 - low90) / 2 == pytest.approx(1.645 * se, rel=0.08)


def test_win_rate():
    assert win_rate([1.0] * 20) == {"win_rate": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 20}
    r = win_rate([1.0, 0.0] * 50)
    assert r["win_rate"] == 0.5 and r["n"] == 100
    # Bernoulli(0.5) with n=100: the CI is about 0.5 +- 0.1.
    assert 0.38 < r["ci_low"] < 0.45 and 0.55 < r["ci_high"] < 0.62
    assert math.isnan(win_rate([])["win_rate"])


# ---------------------------------------------------------------- Bradley-Terry

def _bt_outcomes(strengths: dict[str, float], per_pair: int, soft: bool) -> list[Outcome]:
    """Outcomes exactly consistent with a BT model: soft ones carry the true probability; hard
    ones are wins and losses in the true proportion (rounded), with no sampling noise."""
    names = sorted(strengths)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            p = strengths[a] / (strengths[a] + strengths[b])
            if soft:
                out += [Outcome(a, b, p)] * per_pair
            else:
                n_a = round(p * per_pair)
                out += [Outcome(a, b, 1.0)] * n_a + [(a, b, 0.0)] * (per_pair - n_a)
    return out


@pytest.mark.parametrize("soft", [True, False])
def test_bradley_terry_recovers_known_strengths(soft):
    # A beats B 75%, B beats C 75% (3:1 per step), so A beats C 90%.
    ratings = bradley_terry(_bt_outcomes({"A": 9.0, "B": 3.0, "C": 1.0}, per_pair=400, soft=soft))
    assert ratings["A"] > ratings["B"] > ratings["C"]
    assert ratings["A"] - ratings["B"] == pytest.approx(GAP_3_TO_1, abs=3.0)
    assert ratings["B"] - ratings["C"] == pytest.approx(GAP_3_TO_1, abs=3.0)
    assert sum(ratings.values()) / 3 == pytest.approx(1000.0, abs=1e-9)


def test_bradley_terry_order_independent_and_deterministic():
    outcomes = _bt_outcomes({"A": 9.0, "B": 3.0, "C": 1.0}, per_pair=10, soft=False)
    assert bradley_terry(outcomes) == bradley_terry(outcomes)
    reordered = bradley_terry(outcomes[::-1])
    for name, value in bradley_terry(outcomes).items():
        assert reordered[name] == pytest.approx(value, abs=1e-6)


def test_bradley_terry_symmetric_outcomes_give_equal_ratings():
    outcomes = [("base", "sft", 0.5), ("sft", "dpo", 0.5), ("dpo", "base", 0.5)] * 10
    ratings = bradley_terry(outcomes)
    assert set(ratings) == {"base", "sft", "dpo"}
    for value in ratings.values():
        assert value == pytest.approx(1000.0, abs=1e-6)


def test_bradley_terry_undefeated_model_is_finite():
    outcomes = [("ppo", "base", 1.0)] * 50 + [("ppo", "sft", 1.0)] * 50 + [("sft", "base", 0.5)] * 20
    ratings = bradley_terry(outcomes)
    assert all(math.isfinite(v) for v in ratings.values())
    assert ratings["ppo"] > ratings["sft"] + 200
    assert ratings["sft"] == pytest.approx(ratings["base"], abs=1e-6)
    # A stronger prior shrinks the gap toward zero.
    shrunk = bradley_terry(outcomes, prior=10.0)
    assert 0 < shrunk["ppo"] - shrunk["sft"] < ratings["ppo"] - ratings["sft"]


def test_bradley_terry_prior_matches_closed_form():
    # Two models, A wins all n games. By symmetry log-strengths are +t and -t, and the
    # penalised likelihood's stationarity condition for A reads
    #     (n + prior) - n * sigmoid(2t) - 2 * prior * sigmoid(t) = 0,
    # solved here by bisection, independently of the implementation.
    n, prior = 10, 0.1

    def sigmoid(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if (n + prior) - n * sigmoid(2 * mid) - 2 * prior * sigmoid(mid) > 0:
            lo = mid
        else:
            hi = mid
    expected_gap = 400 * (2 * lo) / math.log(10)
    ratings = bradley_terry([("A", "B", 1.0)] * n, prior=prior)
    assert ratings["A"] - ratings["B"] == pytest.approx(expected_gap, abs=1e-6)
    assert ratings["A"] + ratings["B"] == pytest.approx(2000.0)


def test_bradley_terry_rejects_bad_input():
    assert bradley_terry([]) == {}
    with pytest.raises(ValueError):
        bradley_terry([("a", "a", 1.0)])
    with pytest.raises(ValueError):
        bradley_terry([("a", "b", 1.5)])


# ---------------------------------------------------------------- sequential Elo
