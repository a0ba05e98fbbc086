"""PPO's inner update by value: which role each pass runs under, gradient accumulation (each
minibatch's loss divided by `grad_accum`, a step after every `grad_accum` minibatches and after
the last), and the logged sums. Every row of the rollout is the same, so every minibatch gives
the same losses and gradients, which a hand computation on one minibatch predicts. No model.

    python -m pytest -q tests/test_ppo_update.py
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from cai_lite import losses, models, rollout
from cai_lite.recipe import load_config
from cai_lite.stages import ppo

BASE, MODEL = object(), object()
T = 2


def test_accumulation_roles_and_sums(tmp_path, monkeypatch):
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "ppo.ppo_epochs=2", "ppo.minibatch_size=2",
                       "ppo.grad_accum=3", "ppo.temperature=0.5", "ppo.vf_coef=0.5", "ppo.clip_range=0.2",
                       "ppo.clip_range_value=0.2"])
    logits = torch.nn.Parameter(torch.tensor([[0.2, -0.1, 0.0], [0.0, 0.3, -0.2]]))  # (T, V)
    value = torch.nn.Parameter(torch.tensor([0.1]))
    roles = []

    @contextlib.contextmanager
    def role(b, name, trainable=False):
        assert b is BASE
        roles.append((name, trainable))
        yield MODEL if name == "policy" else None

    monkeypatch.setattr(models, "role", role)

    def response_logprobs_entropy(model, mb, t, chunk):
        assert model is MODEL and t == 0.5 and chunk == cfg.ppo.logit_chunk
        lg = logits.expand(len(mb.texts), T, 3) / t  # (b, T, V)
        return losses.token_logprobs(lg, mb.response), losses.entropy(lg.detach())

    def values(b, mb):
        assert b is BASE
        return value.expand(len(mb.texts), T)

    monkeypatch.setattr(rollout, "response_logprobs_entropy", response_logprobs_entropy)
    monkeypatch.setattr(rollout, "values", values)
    opt = torch.optim.SGD([logits, value], lr=0.0)  # parameters never move: every minibatch is the same
    grads = []
    monkeypatch.setattr(opt, "step", lambda: grads.append((logits.grad.clone(), value.grad.clone())))
    B = 8  # 4 minibatches an epoch: steps after the 3rd (grad_accum) and the 4th (the last)
    mask = torch.tensor([[1.0, 1.0]] * B)
    ro = rollout.Rollout(torch.ones(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.long),
                         torch.tensor([[1, 2]] * B), mask, torch.ones(B, dtype=torch.bool), ["p"] * B, ["r"] * B)
    old_logp = torch.full((B, T), math.log(1 / 3) - 0.5)  # ratio e^0.5-ish > 1.2 where the advantage is positive
    old_values = torch.zeros(B, T)
    adv = torch.tensor([[0.05, -0.02]] * B)
    returns = torch.tensor([[0.1, 0.3]] * B)
    agg, n = ppo._update(cfg, BASE, ro, old_logp, old_values, adv, returns, opt, [logits, value])

    # One minibatch by hand.
    lg = logits.detach().clone().requires_grad_(True)
    v = value.detach().clone().requires_grad_(True)
    m2 = mask[:2]
    lp = losses.token_logprobs(lg.expand(2, T, 3) / 0.5, ro.response[:2])
    pl, clipfrac = losses.ppo_policy_loss(lp, old_logp[:2], adv[:2], m2, 0.2)
    vl = losses.ppo_value_loss(v.expand(2, T), old_values[:2], returns[:2], m2, 0.2)
    (pl + 0.5 * vl).backward()
    ent = losses.masked_mean(losses.entropy((lg.expand(2, T, 3) / 0.5).detach()), m2)
    assert clipfrac.item() > 0  # the clipped branch is taken, so its sum is visible
    assert n == 8 and roles == [("policy", True), ("value", True)] * 8
    assert agg == pytest.approx({"policy_loss": 8 * pl.item(), "value_loss": 8 * vl.item(),
                                 "clipfrac": 8 * clipfrac.item(), "entropy": 8 * ent.item()})
    # Steps: after minibatches 3 and 4 of each epoch. The first holds 3 minibatches' gradients, each
    # divided by 3: one minibatch's gradient. The second holds one minibatch's, divided by 3.
    assert len(grads) == 4
    for (g_pol, g_val), share in zip(grads, (1.0, 1 / 3, 1.0, 1 / 3)):
        assert torch.allclose(g_pol, share * lg.grad, atol=1e-6) and torch.allclose(g_val, share * v.grad, atol=1e-6)


def test_kl_controller_error_is_relative_to_the_target():
    ctl = ppo.KLController(0.1, target=2.0, horizon=10)
    ctl.update(kl=2.2, n=5)  # 10% over the target: error 0.1 (not clipped), coefficient x (1 + 0.1 * 5 / 10)
    assert ctl.coef == pytest.approx(0.1 * 1.05)
