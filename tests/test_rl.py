"""Reward model, PPO, RLOO and DPO on one NF4 base: each must learn, and the base must exist once.

The task: a reward model trained on pairs whose chosen response carries a marker token (the
policy's most frequent clean token, so it is sampled often enough to learn from in a few dozen
steps). PPO and RLOO must raise the reward-model score; DPO must raise its implicit margin.

    python -m pytest tests/test_rl.py -q
"""

from __future__ import annotations

import gc
import json
import random
from collections import Counter

import bitsandbytes as bnb
import pytest
import torch
import transformers
from safetensors.torch import load_file

from cai_lite import adapter_files, data, losses, models, rollout
from cai_lite.stages import dpo, ppo, reward_model, rloo

from conftest import tiny_config

RL = ["reward_model.epochs=3", "reward_model.lr=3e-3", "reward_model.eval_fraction=0.25",
      "ppo.steps=30", "ppo.batch_size=32", "ppo.rollout_batch_size=32", "ppo.minibatch_size=16", "ppo.ppo_epochs=4",
      "ppo.lr=3e-3", "ppo.max_new_tokens=12", "ppo.kl_coef=0.02", "ppo.missing_eos_penalty=0",
      "rloo.steps=30", "rloo.batch_size=8", "rloo.num_samples=4", "rloo.lr=1e-2", "rloo.max_new_tokens=12",
      "rloo.missing_eos_penalty=0", "dpo.max_steps=20", "dpo.lr=5e-3", "dpo.beta=0.1"]


def test_soft_label_loss_matches_hand_computation():
    r_a, r_b = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    p = torch.tensor([0.8, 0.5, 0.1])
    # -[p log s(d) + (1-p) log s(-d)], d = r_a - r_b = [1, 0, -2]
    s = lambda x: 1 / (1 + 2.718281828459045 ** -x)  # noqa: E731
    import math

    want = -sum(pi * math.log(s(d)) + (1 - pi) * math.log(s(-d)) for pi, d in zip([0.8, 0.5, 0.1], [1.0, 0.0, -2.0])) / 3
    assert losses.soft_bt_loss(r_a, r_b, p).item() == pytest.approx(want, rel=1e-6)
    assert losses.hard_bt_loss(r_a, r_b, p).item() == pytest.approx(
        -(math.log(s(1.0)) + math.log(s(0.0)) + math.log(s(2.0))) / 3, rel=1e-6)  # labels 1, 0.5, 0
    assert losses.margin_bt_loss(r_a, r_b, torch.tensor([1.0, 1.0, 0.0]), 1.0).item() == pytest.approx(
        -(math.log(s(1.0 - 1.0)) + math.log(s(0.0 - 1.0)) + math.log(s(2.0 - 1.0))) / 3, rel=1e-6)


def test_gae_and_ppo_losses_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    a, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert a.tolist() == [[0.5, 0.5, 0.5, 0.0]] and ret.tolist() == [[1.0, 1.0, 1.0, 0.0]]  # padding ignored
    # gamma 0.9, lambda 0.8: deltas 0.04, 0.03, 0.3; A_t = delta_t + 0.72 A_{t+1}
    a, ret = losses.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 0.9, 0.8)
    assert a[0].tolist() == pytest.approx([0.04 + 0.72 * 0.246, 0.246, 0.3])
    assert ret[0].tolist() == pytest.approx([0.5 + 0.21712, 0.6 + 0.246, 1.0])
    # Clipped surrogate: ratio 1.5 with A=+1 clips to 1.2; ratio 0.5 with A=-1 clips to 0.8.
    logp, old = torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2)
    loss, clipfrac = losses.ppo_policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2) and clipfrac.item() == 1.0
    loss, clipfrac = losses.ppo_policy_loss(torch.log(torch.tensor([[1.1]])), torch.zeros(1, 1), torch.ones(1, 1),
                                            torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(-1.1) and clipfrac.item() == 0.0
    v = losses.ppo_value_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.5)
    assert v.item() == pytest.approx(0.5 * max((2 - 1) ** 2, (0.5 - 1) ** 2))
    w = losses.whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert w[0, :3].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4)


def test_rollout_logprobs_match_the_sampled_tokens_scored_one_row_at_a_time(tiny_llama, tmp_path):
    """The log-probs PPO computes for a left-padded batch are those of the tokens the loop drew, at the
    positions it drew them: each row scored alone, without padding, gives the same numbers (an
    off-by-one or a padding leak would show here at once)."""
    base = models.load_base(tiny_config(tmp_path, tiny_llama))
    models.add_adapter(base, "policy")
    prompts = ["Hi", "Tell me something long about the sea and the sky, please.", "Why?"]
    torch.manual_seed(5)
    ro = rollout.sample(base, "policy", prompts, 10, 0.7, 512, 2)  # 2 slots: the third row is a refill
    ours = rollout.response_logprobs(base, "policy", ro, 0.7, 2, chunk=3)  # chunks that split rows
    with models.role(base, "policy") as m, torch.no_grad():
        for i in range(len(prompts)):
            q = ro.query[i][ro.query_mask[i].bool()]
            r = ro.response[i][ro.mask[i].bool()]
            logits = m(input_ids=torch.cat([q, r])[None]).logits[0, len(q) - 1:-1].float() / 0.7  # (T_i, V)
            alone = torch.log_softmax(logits, -1).gather(1, r[:, None]).squeeze(1)
            assert torch.allclose(ours[i, : len(r)], alone, atol=1e-4), i
            assert (ours[i, len(r):] == 0).all()
    assert ro.mask.sum(1).min() >= 2  # responses long enough for the positions to matter


def _clean(tok, t: int) -> bool:
    text = tok.decode([t])
    return text.strip().isalpha() and tok.encode(text, add_special_tokens=False) == [t]


def _params4bit() -> set[int]:
    """Ids of the 4-bit weight tensors alive in the process. A stage that loaded a second model would
    add new ones (other test modules' models may be freed meanwhile, which only removes ids)."""
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, bnb.nn.Params4bit)}


@pytest.fixture(scope="module")
def rl(sharp_llama, tmp_path_factory):
    """A run directory with an `sft` adapter, synthetic marker labels and a trained reward model."""
    transformers.set_seed(0)  # as pipeline.run does before each stage: results must not depend on test order
    cfg = tiny_config(tmp_path_factory.mktemp("rl"), sharp_llama, *RL)
    base = models.load_base(cfg)
    models.add_adapter(base, "sft")
    adapter_files.save_adapter(base, "sft", cfg.path / "sft" / "adapter")
    base.sources["sft"] = str((cfg.path / "sft" / "adapter").resolve())
    tok = base.tokenizer
    prompts = [p.text for p in data.prompt_split(cfg).train]
    ro = rollout.sample(base, "sft", prompts * 8, 12, 1.0, 512, 8)
    counts = Counter(t for r, m in zip(ro.response.tolist(), ro.mask.tolist()) for t, k in zip(r, m) if k)
    marker = next(t for t, _ in counts.most_common() if _clean(tok, t))
    rng, rows = random.Random(0), []
    for p, r, m in zip(ro.prompts, ro.response.tolist(), ro.mask.tolist()):
        ids = [t for t, k in zip(r, m) if k and t not in (marker, tok.eos_token_id)]
        marked = list(ids)
        for _ in range(3):
            marked.insert(rng.randrange(len(marked) + 1), marker)
        good, plain = tok.decode(marked), tok.decode(ids)
        a_good = rng.random() < 0.5
        user = {"role": "user", "content": p}
        rows.append({"prompt": [user], "response_a": good if a_good else plain, "response_b": plain if a_good else good,
                     "p_a": 0.9 if a_good else 0.1,
                     "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": plain}]})
    (cfg.path / "label_preferences").mkdir()
    data.write_shard(data.shard_path(cfg.path / "label_preferences", 0), rows)
    (cfg.path / "reward_model").mkdir()
    transformers.set_seed(0)
    rm = reward_model.run(cfg, base, cfg.path / "reward_model")
    return cfg, base, rm


def test_reward_model_learns_the_marker(rl):
    cfg, base, rm = rl
    assert rm["eval_accuracy"] >= 0.9, rm
    assert rm["loss_last"] < rm["loss_first"]
    cal = rm["eval_calibration"]
    assert abs(cal["mean_predicted"] - cal["mean_label"]) < 0.15
    stats = json.loads((cfg.path / "reward_model" / "reward_stats.json").read_text())
    assert stats["std"] > 0 and (cfg.path / "reward_model" / "adapter" / "head.safetensors").is_file()
    assert list((cfg.path / "reward_model" / "tensorboard").glob("events.out.tfevents*"))
    logged = [json.loads(line)["loss"] for line in (cfg.path / "reward_model" / "log.jsonl").read_text().splitlines()]
    assert len(logged) > 6 and sum(logged[-3:]) < sum(logged[:3])  # one line per step, flushed as it went


def _storages(base) -> dict[str, tuple[int, int]]:
    return {n: (id(m.weight), m.weight.data_ptr()) for n, m in base.model.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)}


def test_ppo_raises_reward_on_one_base(rl):
    cfg, base, _ = rl
    before, n_params = _storages(base), _params4bit()
    (cfg.path / "ppo").mkdir()
    transformers.set_seed(0)
    out = ppo.run(cfg, base, cfg.path / "ppo")
    assert out["kl_max"] / 12 < 3, out  # bounded: under 3 nats per response token
    log = [json.loads(line) for line in (cfg.path / "ppo" / "log.jsonl").read_text().splitlines()]
    # Mean reward of the last 5 rollouts over the first 5: one rollout's mean is too noisy to compare
    # (with 16 prompts per rollout, single-step differences ranged from -0.3 to +0.5 over seeds). At
    # 32 prompts, seeds 0, 1, 2 of cfg.seed gave +0.20, +0.17, +0.28: a small rise against the noise
    # (one run's linear trend: +0.21, t = 0.9), where RLOO's is clear.
    reward = [r["reward"] for r in log]
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.1, reward
    assert len(log) == 30 and {"reward", "kl", "entropy", "clipfrac", "value_loss", "response_length"} <= set(log[0])
    assert list((cfg.path / "ppo" / "tensorboard").glob("events.out.tfevents*"))
    # One base: every role computes with the very same 4-bit tensors, and no other copy was made.
    for role in ("policy", "reference", "reward", "value", None):
        with models.role(base, role) as model, torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
        assert _storages(base) == before
    assert not _params4bit() - n_params  # no role loaded a model of its own
    # The reference is still exactly the SL-CAI adapter.
    saved = load_file(cfg.path / "sft" / "adapter" / "adapter_model.safetensors")
    ref = dict(models.lora_tensors(base, "reference"))
    assert set(ref) == set(saved) and all(torch.equal(ref[k], saved[k]) for k in saved)


def test_ppo_step_restores_adapter_state(rl):
    cfg, base, _ = rl
    rollout.load_roles(base, cfg.path)
    for role, src in (("policy", "sft"), ("value", "reward")):
        if role not in base.adapters:
            models.copy_adapter(base, src, role)
    state = (base.model.active_adapter, [p.requires_grad for p in base.model.parameters()],
             [p.requires_grad for p in base.heads.parameters()])
    params = models.adapter_parameters(base, "policy") + models.adapter_parameters(base, "value")
    opt = torch.optim.AdamW(params, lr=1e-4)
    ppo.ppo_step(cfg, base, ["Hello?"] * 4, {"mean": 0.0, "std": 1.0}, ppo.KLController(0.05, 0, 1), opt, params)
    assert (base.model.active_adapter, [p.requires_grad for p in base.model.parameters()],
            [p.requires_grad for p in base.heads.parameters()]) == state


def test_rloo_raises_reward_with_trl_on_the_same_base(rl):
    cfg, base, _ = rl
    before, n_params = _storages(base), _params4bit()
    (cfg.path / "rloo").mkdir()
    transformers.set_seed(0)
    out = rloo.run(cfg, base, cfg.path / "rloo")
    assert out["reward_rose"], out
    # As for PPO: the mean of the last 5 steps' rewards over the first 5 (this run: +0.33; the
    # reward's linear trend over the 30 steps rose 0.54, t = 3.8).
    reward = [r["reward_raw"] for r in map(json.loads, (cfg.path / "rloo" / "log.jsonl").read_text().splitlines())
              if "reward_raw" in r]
    assert len(reward) == 30 and sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.1, reward
    assert out["kl_max"] / 12 < 3, out
    assert not _params4bit() - n_params and _storages(base) == before  # TRL made no second model
    assert "default" not in base.adapters and "ref" not in base.adapters  # TRL's names cleaned up


def test_dpo_raises_the_implicit_margin(rl):
    cfg, base, _ = rl
    (cfg.path / "dpo").mkdir()
    transformers.set_seed(0)
    out = dpo.run(cfg, base, cfg.path / "dpo")
    assert out["margin_last"] > out["margin_first"] + 0.2, out
    # Check it independently: beta * [(log pi - log ref)(chosen) - (...)(rejected)] on the training pairs.
    adapter_files.load_adapter(base, "dpo", cfg.path / "dpo" / "adapter")
    rows = data.read_shards(cfg.path / "label_preferences")[:16]

    def logp(adapter, row, key):
        prompt = data.render(base.tokenizer, row["prompt"])
        full = base.tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)
        n = len(base.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([base.tokenizer(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad(), models.role(base, adapter) as m:
            lp = losses.token_logprobs(m(input_ids=ids).logits[:, :-1].float(), ids[:, 1:])
        return lp[0, n - 1:].sum().item()

    margins = [0.1 * ((logp("dpo", r, "chosen") - logp("sft", r, "chosen"))
                      - (logp("dpo", r, "rejected") - logp("sft", r, "rejected"))) for r in rows]
    assert sum(margins) / len(margins) > 0.2
