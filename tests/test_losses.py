"""The loss functions' remaining branches, by value: whitening that keeps the mean, per-row masked
means, tie labels, dtypes, the clipped value loss in both directions, and the confidence margin.

    python -m pytest tests/test_losses.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cai_lite import losses


def _close(t: torch.Tensor, want, atol: float = 1e-6) -> bool:
    return t.shape == torch.tensor(want).shape and torch.allclose(t.float(), torch.tensor(want, dtype=torch.float), atol=atol)



def test_whiten_keeps_the_mean_when_asked_and_survives_a_constant():
    x, m = torch.tensor([[1.0, 2.0, 3.0, 50.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert _close(losses.whiten(x, m, shift_mean=False)[:, :3], [[2 - 1.2247449, 2.0, 2 + 1.2247449]], 1e-5)
    assert _close(losses.whiten(torch.full((1, 3), 7.0), torch.ones(1, 3)), [[0.0, 0.0, 0.0]])  # no 0/0


def test_masked_mean_per_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert _close(losses.masked_mean(x, m, dim=1), [1.5, 5.0, 0.0])  # an empty row gives 0, not NaN
    assert losses.masked_mean(x, m).item() == pytest.approx(8.0 / 3)
    assert losses.masked_mean(x, torch.zeros(3, 3)).item() == 0.0


def test_hard_label_ties_and_dtypes():
    r_a, r_b = torch.tensor([2.0, 2.0]), torch.tensor([0.0, 0.0])
    # A tie (p = 0.5) is the label 0.5, not a win for A, also when the scores differ.
    want = -(0.5 * F.logsigmoid(torch.tensor(2.0)) + 0.5 * F.logsigmoid(torch.tensor(-2.0))).item()
    assert losses.hard_bt_loss(r_a[:1], r_b[:1], torch.tensor([0.5])).item() == pytest.approx(want)
    assert losses.hard_bt_loss(r_a, r_b, torch.tensor([0.51, 0.49])).item() == pytest.approx(
        -(F.logsigmoid(torch.tensor(2.0)) + F.logsigmoid(torch.tensor(-2.0))).item() / 2)
    # The loss keeps the scores' precision (bf16 scores give a bf16 loss).
    half = (r_a.bfloat16(), r_b.bfloat16(), torch.tensor([0.9, 0.1]))
    assert losses.hard_bt_loss(*half).dtype == torch.bfloat16
    assert losses.margin_bt_loss(*half[:2], half[2].bfloat16(), 1.0).dtype == torch.bfloat16


def test_value_loss_clips_both_ways_and_squares():
    def loss(v, old, ret, clip=0.5):
        return losses.ppo_value_loss(torch.tensor([[v]]), torch.tensor([[old]]), torch.tensor([[ret]]),
                                     torch.ones(1, 1), clip).item()

    assert loss(-2.0, 0.0, -4.0) == pytest.approx(0.5 * 3.5 ** 2)  # clipped up to -0.5: the larger error wins
    assert loss(2.0, 0.0, 4.0) == pytest.approx(0.5 * 3.5 ** 2)  # clipped down to 0.5
    assert loss(2.0, 0.0, -1.0) == pytest.approx(0.5 * 3.0 ** 2)  # the unclipped error is the larger
    assert loss(1.2, 1.0, 3.0) == pytest.approx(0.5 * 1.8 ** 2)  # inside the clip range: plain squared error
    assert loss(1.2, 1.0, -1.0) == pytest.approx(0.5 * 2.2 ** 2)  # the clip is around the old value


def test_margin_grows_with_the_judges_confidence():
    r_a, r_b = torch.tensor([1.0]), torch.tensor([0.0])
    # p = 0.9: A chosen, margin 2 * |2 * 0.9 - 1| = 1.6; p = 0.3: B chosen, margin 2 * 0.4 = 0.8.
    assert losses.margin_bt_loss(r_a, r_b, torch.tensor([0.9]), 2.0).item() == pytest.approx(
        -F.logsigmoid(torch.tensor(1.0 - 1.6)).item())
    assert losses.margin_bt_loss(r_a, r_b, torch.tensor([0.3]), 2.0).item() == pytest.approx(
        -F.logsigmoid(torch.tensor(-1.0 - 0.8)).item())
