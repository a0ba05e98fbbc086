"""Signs and directions, checked with known inputs and exact values: the KL estimate, the adaptive KL
controller, how PPO builds its per-token rewards (KL penalty, missing-EOS penalty, normalised
score), its minibatch updates, the reward model's loss and metrics, and evaluate's win and harmful
rates under a judge whose preferences are known. No model is loaded: the model-facing calls are
replaced by stubs that return fixed tensors, so each number can be worked out by hand.

    python -m pytest tests/test_directions.py -q
"""

from __future__ import annotations

import contextlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cai_lite import adapter_files, constitution as C
from cai_lite import data, losses, models, rollout, voting
from cai_lite.recipe import load_config
from cai_lite.stages import evaluate, ppo, reward_model


def _cfg(tmp_path, *overrides: str):
    """The tiny_cpu recipe; nothing here loads its model."""
    return load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", *overrides])


def _close(t: torch.Tensor, want, atol: float = 1e-6) -> bool:
    return t.shape == torch.tensor(want).shape and torch.allclose(t.float(), torch.tensor(want, dtype=torch.float), atol=atol)


@contextlib.contextmanager
def _no_role(*_, **__):
    yield None


# ---- the KL estimate and the KL controller ----------------------------------------------------

def test_kl_is_positive_when_the_policy_favours_its_own_samples():
    # The policy gives its sampled tokens more probability than the reference does: KL > 0.
    logp, ref = torch.log(torch.tensor([[0.8, 0.6]])), torch.log(torch.tensor([[0.5, 0.3]]))
    assert losses.kl_penalty(logp, ref).tolist()[0] == pytest.approx([math.log(1.6), math.log(2.0)])
    # In expectation over the policy's own samples, the k1 estimate is KL(pi || ref) exactly.
    pi_logits, ref_logits = torch.tensor([[[2.0, 0.0, -1.0]]]), torch.tensor([[[0.0, 0.0, 0.0]]])
    tokens = torch.arange(3).view(1, 3)  # every token the policy can sample, each at position 0
    k1 = losses.kl_penalty(losses.token_logprobs(pi_logits.expand(1, 3, 3), tokens),
                           losses.token_logprobs(ref_logits.expand(1, 3, 3), tokens))  # (1, 3)
    pi = pi_logits.softmax(-1)[0, 0]
    want = F.kl_div(ref_logits.log_softmax(-1), pi_logits.log_softmax(-1), log_target=True, reduction="sum")
    assert (pi * k1[0]).sum().item() == pytest.approx(want.item()) and want.item() > 0.5


def test_adaptive_kl_controller_moves_toward_the_target():
    up = ppo.KLController(0.1, target=1.0, horizon=10)
    up.update(1.1, 5)  # 10% over target: coef *= 1 + 0.1 * 5 / 10
    assert up.coef == pytest.approx(0.1 * 1.05)
    up.update(9.0, 5)  # far over: the error is clipped at +0.2
    assert up.coef == pytest.approx(0.1 * 1.05 * 1.1)
    down = ppo.KLController(0.1, target=1.0, horizon=10)
    down.update(0.9, 10)  # 10% under target: coef *= 1 - 0.1
    assert down.coef == pytest.approx(0.09)
    down.update(0.0, 10)  # far under: the error is clipped at -0.2
    assert down.coef == pytest.approx(0.09 * 0.8)
    fixed = ppo.KLController(0.1, target=0.0, horizon=10)
    fixed.update(50.0, 10)
    assert fixed.coef == 0.1


def test_prompt_stream_reshuffles_every_pass():
    stream = ppo.prompt_stream(["a", "b", "c", "d", "e"], 2, seed=3)
    batches = [next(stream) for _ in range(5)]
    assert all(len(b) == 2 for b in batches)
    flat = [p for b in batches for p in b]
    assert sorted(flat[:5]) == ["a", "b", "c", "d", "e"]  # the first pass holds every prompt once
    assert sorted(flat[5:10]) == ["a", "b", "c", "d", "e"]  # the tail of pass 1 joins the head of pass 2
    again = ppo.prompt_stream(["a", "b", "c", "d", "e"], 2, seed=3)
    assert [next(again) for _ in range(5)] == batches


# ---- one PPO step, with the model calls stubbed out -------------------------------------------

def _rollout(mask, ended) -> rollout.Rollout:
    B, T = mask.shape
    return rollout.Rollout(torch.ones(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.long),
                           torch.full((B, T), 7), mask, torch.tensor(ended), [f"p{i}" for i in range(B)],
                           [f"r{i}" for i in range(B)])


def test_ppo_step_rewards_kl_and_eos_penalty(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "ppo.kl_coef=0.1", "ppo.kl_target=1.0", "ppo.kl_horizon=10", "ppo.missing_eos_penalty=0.5",
               "ppo.gamma=1.0", "ppo.lam=1.0", "ppo.max_new_tokens=7", "ppo.temperature=0.9", "ppo.minibatch_size=4",
               "generation.max_prompt_tokens=50", "ppo.rollout_batch_size=5")
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    ro = _rollout(mask, [True, False])  # the second response hit the length cap after one token
    logps = {"policy": torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]]),
             "reference": torch.tensor([[-2.0, -1.5, -1.5], [-1.2, 0.0, 0.0]])}
    base, opt, params, seen = object(), object(), [], {}

    def sample(b, adapter, prompts, *args):
        seen["sample"] = (b, adapter, prompts, args)
        return ro

    def logprobs(b, adapter, r, *args):
        assert b is base and r is ro and args == (0.9, 4, cfg.ppo.logit_chunk)
        return logps[adapter].clone()

    def score(b, prompts, texts, *args):
        seen["score"] = (b, prompts, texts, args)
        return torch.tensor([3.0, 1.0])

    def role(b, name):
        seen.setdefault("roles", []).append((b, name))
        return contextlib.nullcontext()

    def values(b, r):
        assert b is base and r is ro
        return torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])

    monkeypatch.setattr(rollout, "sample", sample)
    monkeypatch.setattr(rollout, "response_logprobs", logprobs)
    monkeypatch.setattr(rollout, "score", score)
    monkeypatch.setattr(rollout, "values", values)
    monkeypatch.setattr(models, "role", role)
    monkeypatch.setattr(models, "training_mode", lambda b: seen.update(training=b) or contextlib.nullcontext())
    gae = losses.gae
    monkeypatch.setattr(losses, "gae", lambda r, v, m, g, lam: seen.setdefault("gae", (r.clone(), v.clone())) and gae(
        r, v, m, g, lam))

    def update(cfg_, b, ro_, old_logp, old_values, adv, returns, opt_, params_):
        assert cfg_ is cfg and b is base and ro_ is ro and opt_ is opt and params_ is params
        seen["update"] = (old_logp, old_values, adv, returns)
        return {"policy_loss": 2.0, "value_loss": 4.0, "clipfrac": 0.5, "entropy": 1.0}, 2

    monkeypatch.setattr(ppo, "_update", update)
    kl_ctl = ppo.KLController(0.1, 1.0, 10)
    rec = ppo.ppo_step(cfg, base, ["p0", "p1"], {"mean": 1.0, "std": 2.0}, kl_ctl, opt, params)
    assert seen["sample"] == (base, "policy", ["p0", "p1"], (7, 0.9, 50, 5))
    assert seen["score"] == (base, ro.prompts, ro.texts, (4, 57))
    assert seen["roles"] == [(base, "value")] and seen["training"] is base
    # KL per token = log pi - log ref on the sampled tokens; the reward is -0.1 * KL, plus the score on
    # the last real token: (raw - mean) / std, minus 0.5 for the response that did not end.
    rewards, values_ = seen["gae"]
    assert _close(rewards, [[-0.1, -0.05, -0.05 + 1.0], [-0.02 - 0.5, 0.0, 0.0]])
    assert _close(values_, [[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])  # padding has no value
    old_logp, old_values, adv, returns = seen["update"]
    assert torch.equal(old_logp, logps["policy"]) and torch.equal(old_values, values_)
    # gamma = lambda = 1: the return is the sum of the rewards still to come.
    assert _close(returns, [[0.8, 0.9, 0.95], [-0.52, 0.0, 0.0]])
    raw_adv = returns - values_
    want = (raw_adv - losses.masked_mean(raw_adv, mask)) / losses.masked_mean(
        (raw_adv - losses.masked_mean(raw_adv, mask)) ** 2, mask).sqrt() * mask
    assert _close(adv, want.tolist(), 1e-5)
    assert rec["kl"] == pytest.approx((2.0 + 0.2) / 2) and rec["kl_coef"] == 0.1
    assert rec["kl_per_token"] == pytest.approx((1.0 + 0.5 + 0.5 + 0.2) / 4)  # over the 4 real tokens
    assert rec["reward"] == pytest.approx(2.0) and rec["score_normalised"] == pytest.approx((1.0 - 0.5) / 2)
    assert rec["response_length"] == 2.0 and rec["ended_with_eos"] == 0.5
    assert rec["policy_loss"] == 1.0 and rec["value_loss"] == 2.0 and rec["clipfrac"] == 0.25
    # KL 1.1 over the target 1.0: the controller raises its coefficient, by 0.1 * 2 / 10.
    assert kl_ctl.coef == pytest.approx(0.1 * (1 + 0.1 * 2 / 10))
    # A reward model whose training scores had no spread: the normalised score keeps its sign.
    rec = ppo.ppo_step(cfg, base, ["p0", "p1"], {"mean": 1.0, "std": 0.0}, kl_ctl, opt, params)
    assert rec["score_normalised"] > 1e6


class _Policy(torch.nn.Module):
    """Logits over 3 tokens that do not depend on the input: one row of parameters per position."""

    def __init__(self, T: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(T, 3))


def _update_setup(tmp_path, monkeypatch, *overrides):
    cfg = _cfg(tmp_path, *overrides)
    T, policy, value = 2, _Policy(2), torch.nn.Parameter(torch.zeros(1))
    steps = []
    monkeypatch.setattr(models, "role", _no_role)
    def logprobs_entropy(model, mb, t, chunk):
        lg = policy.logits.expand(len(mb.texts), T, 3) / t  # (b, T, V)
        return losses.token_logprobs(lg, mb.response), losses.entropy(lg.detach())

    monkeypatch.setattr(rollout, "response_logprobs_entropy", logprobs_entropy)
    monkeypatch.setattr(rollout, "values", lambda base, mb: value.expand(len(mb.texts), T))
    opt = torch.optim.SGD([policy.logits, value], lr=1.0)
    step = opt.step

    def counted_step():
        before = torch.cat([policy.logits.detach().flatten(), value.detach()]).clone()
        step()
        steps.append(torch.cat([policy.logits.detach().flatten(), value.detach()]) - before)

    monkeypatch.setattr(opt, "step", counted_step)
    return cfg, policy, value, opt, steps


def test_ppo_update_steps_accumulates_and_clips(tmp_path, monkeypatch):
    cfg, policy, value, opt, steps = _update_setup(
        tmp_path, monkeypatch, "ppo.ppo_epochs=2", "ppo.minibatch_size=2", "ppo.grad_accum=2", "ppo.temperature=1.0")
    B = 6
    ro = _rollout(torch.ones(B, 2), [True] * B)
    ro.response = torch.zeros(B, 2, dtype=torch.long)
    zeros = torch.zeros(B, 2)
    agg, n = ppo._update(cfg, None, ro, zeros + math.log(1 / 3), zeros, zeros + 100.0, zeros + 100.0, opt,
                         [policy.logits, value])
    # 3 minibatches an epoch: a step after the 2nd (grad_accum) and one after the last.
    assert n == 6 and len(steps) == 4
    # Huge advantages and returns: the first step is clipped to a gradient norm of 1 (SGD, lr 1).
    first = steps[0]
    assert first.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_ppo_update_losses_and_gradients(tmp_path, monkeypatch):
    cfg, policy, value, opt, steps = _update_setup(
        tmp_path, monkeypatch, "ppo.ppo_epochs=1", "ppo.minibatch_size=4", "ppo.grad_accum=1", "ppo.temperature=1.0",
        "ppo.vf_coef=0.5", "ppo.clip_range=0.2", "ppo.clip_range_value=0.2")
    B = 4
    ro = _rollout(torch.tensor([[1.0, 1.0]] * 3 + [[1.0, 0.0]]), [True] * B)
    ro.response = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 0]])
    old_logp = torch.full((B, 2), math.log(1 / 3))
    adv = torch.tensor([[0.1, -0.1], [0.2, 0.0], [-0.3, 0.1], [0.05, 7.0]])
    returns = torch.tensor([[0.1, 0.2], [0.3, 0.0], [0.05, 0.1], [0.0, 5.0]])
    grads = {}

    def step():
        grads["policy"], grads["value"] = policy.logits.grad.clone(), value.grad.clone()

    monkeypatch.setattr(opt, "step", step)
    agg, n = ppo._update(cfg, None, ro, old_logp, torch.zeros(B, 2), adv, returns, opt, [policy.logits, value])
    assert n == 1
    # At the rollout's own parameters the ratio is 1: the policy loss is -mean(adv) over real tokens,
    # the value loss 0.5 * mean(returns^2), the entropy log 3, nothing clipped.
    m = ro.mask
    assert agg["policy_loss"] == pytest.approx(-(adv * m).sum().item() / 7)
    assert agg["value_loss"] == pytest.approx(0.5 * (returns ** 2 * m).sum().item() / 7)
    assert agg["entropy"] == pytest.approx(math.log(3)) and agg["clipfrac"] == 0.0
    # d(value loss)/dv = -mean(returns); scaled by vf_coef.
    assert grads["value"].item() == pytest.approx(-0.5 * (returns * m).sum().item() / 7, abs=1e-6)
    logits = torch.zeros(2, 3, requires_grad=True)
    logp = losses.token_logprobs(logits.expand(B, 2, 3), ro.response)
    losses.ppo_policy_loss(logp, old_logp, adv, m, 0.2)[0].backward()
    assert torch.allclose(grads["policy"], logits.grad, atol=1e-6)
    assert policy.logits.grad is None and value.grad is None  # zeroed after the step


# ---- the reward model's loss choice and metrics -----------------------------------------------

def test_reward_model_loss_choice(tmp_path):
    r_a, r_b, p = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]), torch.tensor([0.9, 0.3])
    for kind, want in (("soft", losses.soft_bt_loss(r_a, r_b, p)), ("hard", losses.hard_bt_loss(r_a, r_b, p)),
                       ("margin", losses.margin_bt_loss(r_a, r_b, p, 2.0))):
        cfg = _cfg(tmp_path, f"reward_model.loss={kind}", "reward_model.margin=2.0")
        assert reward_model.loss_fn(cfg, r_a, r_b, p).item() == pytest.approx(want.item())
    assert len({round(reward_model.loss_fn(_cfg(tmp_path, f"reward_model.loss={k}"), r_a, r_b, p).item(), 6)
                for k in ("soft", "hard", "margin")}) == 3


def _pair_rows(p_as):
    return [{"prompt": [{"role": "user", "content": f"q{i}"}], "response_a": f"a{i}", "response_b": f"b{i}", "p_a": p}
            for i, p in enumerate(p_as)]


def test_reward_model_accuracy_and_calibration(monkeypatch):
    scores = {"a0": 2.0, "b0": 0.0, "a1": 0.0, "b1": 1.0, "a2": 0.0, "b2": 0.0, "a3": -1.0, "b3": 0.0}
    monkeypatch.setattr(models, "role", _no_role)
    monkeypatch.setattr(reward_model, "pair_scores", lambda base, rows, n: (
        torch.tensor([scores[r["response_a"]] for r in rows]), torch.tensor([scores[r["response_b"]] for r in rows])))
    rows = _pair_rows([0.9, 0.2, 0.5, 0.8])
    out = reward_model.evaluate_pairs(None, rows, 3, 64)
    preds = [torch.sigmoid(torch.tensor(d)).item() for d in (2.0, -1.0, 0.0, -1.0)]
    assert out["accuracy"] == pytest.approx(2 / 3)  # right on rows 0 and 1, wrong on row 3, the tie left out
    assert out["mean_predicted"] == pytest.approx(sum(preds) / 4)
    assert out["mean_label"] == pytest.approx(0.6)
    assert out["brier"] == pytest.approx(sum((p - y) ** 2 for p, y in zip(preds, [0.9, 0.2, 0.5, 0.8])) / 4)
    assert out["n"] == 4


def test_reward_model_pair_scores_keep_a_and_b_apart(monkeypatch):
    texts = {}
    base = SimpleNamespace(tokenizer=None)
    monkeypatch.setattr(rollout, "reward_text", lambda tok, p, r: f"{p}|{r}")
    monkeypatch.setattr(reward_model.generation, "tokenize_left",
                        lambda b, t, n: texts.setdefault("t", (t, n)) and ({"input_ids": None, "attention_mask": None},
                                                                          []))
    monkeypatch.setattr(rollout, "sequence_scores", lambda b, h, ids, m: torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    r_a, r_b = reward_model.pair_scores(base, _pair_rows([0.9, 0.2, 0.5]), 77)
    assert texts["t"] == (["q0|a0", "q1|a1", "q2|a2", "q0|b0", "q1|b1", "q2|b2"], 77)
    assert r_a.tolist() == [1.0, 2.0, 3.0] and r_b.tolist() == [4.0, 5.0, 6.0]


def test_reward_model_run_learns_the_labels_and_records_stats(tmp_path, monkeypatch):
    """The training loop on a one-parameter 'reward model' (score = w * number of 'good' words)."""
    cfg = _cfg(tmp_path, "reward_model.epochs=3", "reward_model.batch_size=2", "reward_model.lr=0.1",
               "reward_model.eval_fraction=0.25")
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "response_a": "good " * (i % 3),
             "response_b": "good " * (2 - i % 3), "p_a": 0.9 if i % 3 > 2 - i % 3 else 0.1} for i in range(9)
            if i % 3 != 1]  # no ties: 6 rows
    (cfg.path / "label_preferences").mkdir(parents=True)
    data.write_shard(data.shard_path(cfg.path / "label_preferences", 0), rows)
    w = torch.nn.Parameter(torch.zeros(()))
    calls = []
    base = SimpleNamespace(adapters=["reward"], sources={}, heads={"reward": torch.nn.Linear(1, 1)})
    for name in ("delete_adapter", "add_adapter", "add_head", "freeze", "save_adapter", "save_classifier"):
        owner = adapter_files if name.startswith("save") else models
        monkeypatch.setattr(owner, name, lambda b, n, *a, _name=name: calls.append((_name, n)))
    monkeypatch.setattr(models, "adapter_parameters", lambda b, n: [w])
    monkeypatch.setattr(models, "role", lambda b, n, trainable=False: contextlib.nullcontext(torch.nn.Module()))
    monkeypatch.setattr(models, "memory_account", lambda b: {"adapter_bytes": {"reward": 11}, "head_bytes": {"reward": 3}})
    monkeypatch.setattr(reward_model, "pair_scores", lambda b, chunk, n: (
        w * torch.tensor([r["response_a"].count("good") for r in chunk], dtype=torch.float),
        w * torch.tensor([r["response_b"].count("good") for r in chunk], dtype=torch.float)))
    scored = {}
    monkeypatch.setattr(rollout, "score", lambda b, ps, rs, *a: scored.setdefault("args", (ps, rs)) and torch.tensor(
        [1.0, 3.0] * (len(ps) // 2)))
    out = reward_model.run(cfg, base, cfg.path / "reward_model")
    assert calls == [("delete_adapter", "reward"), ("add_adapter", "reward"), ("add_head", "reward"),
                     ("freeze", "reward"), ("save_adapter", "reward"), ("save_classifier", "reward")]
    assert out["train_pairs"] == 4 and out["eval_pairs"] == 2 and out["skipped_failed_labels"] == 0
    assert w.item() > 0.2  # it learned that 'good' is preferred
    assert out["eval_accuracy"] == 1.0 and out["loss_last"] < out["loss_first"]
    log = [json.loads(line) for line in (cfg.path / "reward_model" / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == list(range(1, 7))  # 3 epochs of 2 batches, counted from 1 as Trainer does
    assert out["loss_first"] == pytest.approx(log[0]["loss"]) and out["loss_last"] == pytest.approx(log[-1]["loss"])
    assert log[0]["loss"] == pytest.approx(math.log(2))  # w = 0: every pair a coin flip
    ps, rs = scored["args"]
    assert len(ps) == len(rs) == 8 and ps[0] == ps[1] and rs[0] != rs[1]
    stats = json.loads((cfg.path / "reward_model" / "reward_stats.json").read_text())
    assert stats == out["reward_stats"] and stats["mean"] == 2.0 and stats["std"] == pytest.approx(
        torch.tensor([1.0, 3.0] * 4).std().item())
    assert out["adapter_bytes"] == 11 and out["head_bytes"] == 3 and out["loss"] == "soft"
    assert base.sources["reward"] == str((cfg.path / "reward_model" / "adapter").resolve())


# ---- evaluate: win rates and harmful rates under a judge with known preferences ---------------

class PrefersSafe:
    """Prefers whichever option says SAFE (P 0.8 for its slot), and calls a conversation harmful
    when its answer says HARM (P 0.9) and evasive when it says MEH (P 0.7)."""

    name, hard_labels = "stub", 0

    def option_probs(self, prompts, letters):
        out = []
        for p in prompts:
            text = p.messages[-1]["content"]
            if "\n(A) Yes" in text or "\n(A) No" in text:
                yes = 0.9 if "HARM" in text else 0.7 if ("MEH" in text and "dodge" in text) else 0.1
                pa = yes if "\n(A) Yes" in text else 1 - yes
            else:
                a = text.split("\n(A) ", 1)[1].split("\n(B) ", 1)[0]
                b = text.split("\n(B) ", 1)[1]
                pa = 0.8 if "SAFE" in a and "SAFE" not in b else 0.2 if "SAFE" in b and "SAFE" not in a else 0.5
            out.append([pa, 1 - pa])
        return out

    def generate(self, prompts, max_new_tokens):
        return [""] * len(prompts)

    def close(self):
        pass


def test_win_rates_and_rates_follow_a_known_judge(tmp_path):
    cfg = _cfg(tmp_path, "evaluate.bootstrap=200")
    red = [data.Prompt(f"r{i}", f"red {i}?") for i in range(4)]
    helpful = [data.Prompt(f"h{i}", f"help {i}?") for i in range(2)]
    responses = {"base": {"red_team": ["HARM here"] * 4, "helpful": ["MEH"] * 2},
                 "sft": {"red_team": ["MEH no"] * 4, "helpful": ["MEH"] * 2},
                 "ppo": {"red_team": ["SAFE answer"] * 4, "helpful": ["SAFE help"] * 2}}
    present = {"base": None, "sft": "sft", "ppo": "ppo"}
    m = evaluate._judge_everything(cfg, None, C.load("harmless"), [PrefersSafe()], present, responses, red, helpful)
    w = m["win_rates"]
    assert set(w) == {f"{a}_vs_{b}/{k}" for a, b in (("sft", "base"), ("ppo", "base"), ("ppo", "sft"))
                      for k in ("harmless", "helpful")}
    # Both orders: P(ppo better) = (0.8 + (1 - 0.2)) / 2 = 0.8 on every prompt.
    assert w["ppo_vs_base/harmless"]["win_rate"] == pytest.approx(0.8)
    assert w["ppo_vs_sft/helpful"]["win_rate"] == pytest.approx(0.8)
    assert w["sft_vs_base/harmless"]["win_rate"] == pytest.approx(0.5)
    assert w["ppo_vs_base/harmless"]["n"] == 4 and w["ppo_vs_base/helpful"]["n"] == 2
    assert w["ppo_vs_base/harmless"]["failures"] == 0
    assert m["elo"]["ppo"] > m["elo"]["sft"] and m["elo"]["ppo"] > m["elo"]["base"]
    assert m["elo"]["sft"] == pytest.approx(m["elo"]["base"])
    r = m["rates"]
    assert r["base"]["harmful"]["rate"] == 1.0 and r["base"]["harmful"]["mean_p_yes"] == pytest.approx(0.9)
    assert r["ppo"]["harmful"]["rate"] == 0.0 and r["ppo"]["harmful"]["mean_p_yes"] == pytest.approx(0.1)
    assert r["sft"]["evasive_red_team"]["rate"] == 1.0 and r["sft"]["evasive_red_team"]["mean_p_yes"] == pytest.approx(0.7)
    assert r["ppo"]["evasive_helpful"]["rate"] == 0.0 and r["base"]["evasive_helpful"]["rate"] == 1.0
    assert r["base"]["harmful"]["n"] == 4 and r["base"]["evasive_helpful"]["n"] == 2
    assert r["base"]["harmful"]["failures"] == 0
    assert m["models"] == ["base", "sft", "ppo"] and m["mean_reward"] is None


def test_majority_vote_of_judges_in_evaluate(tmp_path):
    cfg = _cfg(tmp_path, "judge_vote=majority")

    def judgement(p):
        return SimpleNamespace(p_a=p)

    per_judge = [[judgement(0.9), judgement(0.2), judgement(None)], [judgement(0.6), judgement(0.4), judgement(0.3)],
                 [judgement(0.1), judgement(0.45), judgement(None)]]
    assert evaluate._vote(cfg, per_judge) == [1.0, 0.0, 0.0]
    assert evaluate._vote(_cfg(tmp_path, "judge_vote=mean"), per_judge) == pytest.approx([1.6 / 3, 1.05 / 3, 0.3])


# ---- voting -----------------------------------------------------------------------------------

def test_voting_edges_by_value():
    assert voting.vote([0.5, 0.9], "majority") == 1.0 and voting.vote([0.5, 0.1], "majority") == 0.0
    assert voting.vote([0.5], "majority") == 0.5
    with pytest.raises(ValueError, match="judge_vote: unknown method 'median'"):
        voting.vote([0.7], "median")
    assert voting.position_consistent(0.8, 0.3) is True and voting.position_consistent(0.8, 0.7) is False
    assert voting.position_consistent(0.3, 0.8) is True and voting.position_consistent(0.3, 0.2) is False
    for ab, ba in ((None, 0.3), (0.3, None), (0.5, 0.3), (0.3, 0.5)):
        assert voting.position_consistent(ab, ba) is None
    assert voting.rate([True, None, False, True]) == pytest.approx(2 / 3) and voting.rate([None]) is None
    assert voting.rate([]) is None
    assert voting.average_orders(0.8, None) == 0.8 and voting.average_orders(None, None) is None
    assert voting.average_orders(0.9, 0.3) == pytest.approx(0.8)
    assert voting.mean_or_none([0.2, None, 0.6]) == pytest.approx(0.4) and voting.mean_or_none([None]) is None
    assert voting.clamp(0.3, 0.1, 0.2) == 0.2 and voting.clamp(0.05, 0.1, 0.2) == 0.1
    # Agreement: ties and failures left out; three judges give three pairs.
    assert voting.agreement([[0.9, 0.5, None, 0.2], [0.8, 0.9, 0.9, 0.7]]) == pytest.approx(1 / 2)
    assert voting.agreement([[0.9], [0.8], [0.1]]) == pytest.approx(1 / 3)
    assert voting.agreement([[0.5], [0.9]]) is None and voting.agreement([[0.9]]) is None
    assert voting.agreement([[0.2, 0.2], [0.5, 0.7]]) == 0.0  # the second judge's tie is left out too

