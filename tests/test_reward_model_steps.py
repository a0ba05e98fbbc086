"""The reward_model stage step by step, on a one-parameter 'reward model' (score = w * number of
'good' words) behind strict stubs: every call must reach the shared base with the `reward` role and
the stage's own sizes, the training loop must equal a hand-written replay of it (batches, AdamW
without weight decay, gradient clipping at 1.0), and the log, TensorBoard scalars, held-out split
and reward statistics are checked by value. No model is loaded.

    python -m pytest -q tests/test_reward_model_steps.py
"""

from __future__ import annotations

import contextlib
import json
import random
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cai_lite import adapter_files, data, losses, models, rollout
from cai_lite.recipe import load_config
from cai_lite.stages import reward_model

BASE = SimpleNamespace(adapters=["reward"], sources={}, tokenizer="TOK", heads={"reward": torch.nn.Linear(1, 1)})


def _rows(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"q{i}"}], "response_a": "good " * (i % 3) + f"a{i}",
             "response_b": "good " * (2 - i % 3) + f"b{i}", "p_a": [0.1, 0.5, 0.9][i % 3]} for i in range(n)]


def _goods(rows, key):
    return torch.tensor([r[key].count("good") for r in rows], dtype=torch.float)


@pytest.fixture
def stage(tmp_path, monkeypatch):
    return stubbed(tmp_path / "run", 2, monkeypatch)


def stubbed(run, batch_size: int, monkeypatch) -> SimpleNamespace:
    """The stage's config and its stubs (also for tests/test_multi_process.py, in each process)."""
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={run}", "reward_model.epochs=2",
                       f"reward_model.batch_size={batch_size}", "reward_model.lr=0.3", "reward_model.eval_fraction=0.2",
                       "reward_model.max_seq_len=77"])
    w = torch.nn.Parameter(torch.zeros(()))
    calls, roles = [], []

    def record(name):
        def f(b, n, *a):
            assert b is BASE and n == "reward", (name, b, n)
            calls.append((name, *a))
        return f

    for name in ("delete_adapter", "add_adapter", "add_head", "freeze", "save_adapter", "save_classifier"):
        monkeypatch.setattr(adapter_files if name.startswith("save") else models, name, record(name))
    monkeypatch.setattr(models, "adapter_parameters", lambda b, n: (b is BASE and n == "reward") and [w])

    @contextlib.contextmanager
    def role(b, n, trainable=False):
        assert b is BASE and n == "reward"
        roles.append(trainable)
        yield torch.nn.Module()

    monkeypatch.setattr(models, "role", role)
    monkeypatch.setattr(models, "memory_account", lambda b: {"adapter_bytes": {"reward": 11}, "head_bytes": {"reward": 3}})

    def pair_scores(b, chunk, n):
        assert b is BASE and n == 77
        return w * _goods(chunk, "response_a"), w * _goods(chunk, "response_b")

    monkeypatch.setattr(reward_model, "pair_scores", pair_scores)
    scored = []

    def score(b, ps, rs, batch_size, max_tokens):
        assert b is BASE and (batch_size, max_tokens) == (cfg.reward_model.batch_size, 77)
        scored.append((ps, rs))
        return torch.arange(len(ps), dtype=torch.float)

    monkeypatch.setattr(rollout, "score", score)
    return SimpleNamespace(cfg=cfg, w=w, calls=calls, roles=roles, scored=scored)


def test_training_equals_a_hand_written_replay(stage):
    cfg, out = stage.cfg, stage.cfg.path / "reward_model"
    rows = _rows(13)
    (cfg.path / "label_preferences").mkdir(parents=True)
    data.write_shard(data.shard_path(cfg.path / "label_preferences", 0), rows)
    BASE.heads["reward"].bias.data.fill_(0.5)
    got = reward_model.run(cfg, BASE, out)
    # The same split, batches and optimiser by hand.
    shuffled = data.read_shards(cfg.path / "label_preferences")
    random.Random(cfg.seed).shuffle(shuffled)
    held, train = shuffled[:3], shuffled[3:]  # round(13 * 0.2) = 3
    w = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.AdamW([w], lr=0.3, weight_decay=0.0)
    want_losses = []
    for _ in range(2):
        for i in range(0, len(train), 2):
            chunk = train[i:i + 2]
            loss = losses.soft_bt_loss(w * _goods(chunk, "response_a"), w * _goods(chunk, "response_b"),
                                       torch.tensor([r["p_a"] for r in chunk]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([w], 1.0)
            opt.step()
            want_losses.append(loss.item())
    assert stage.w.item() == pytest.approx(w.item(), abs=1e-6) and w.item() > 0  # and it learned 'good' is better
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in log] == pytest.approx(want_losses) and len(log) == 10
    k = 2  # a fifth of the 10 steps
    assert got["loss_first"] == pytest.approx(sum(want_losses[:k]) / k)
    assert got["loss_last"] == pytest.approx(sum(want_losses[-k:]) / k)
    assert got["train_pairs"] == 10 and got["eval_pairs"] == 3
    # Roles: trained with the reward adapter trainable, evaluated frozen.
    assert stage.roles == [True, False]
    assert stage.calls == [("delete_adapter",), ("add_adapter",), ("add_head",), ("freeze",),
                           ("save_adapter", out / "adapter"), ("save_classifier", out / "classifier")]
    # Bradley-Terry cannot learn the head's bias: it is 0 when saved, as a sequence classifier's score has none.
    assert BASE.heads["reward"].bias.item() == 0
    # The reward statistics are over both responses of every training pair.
    (ps, rs), = stage.scored
    assert ps == [r["prompt"][-1]["content"] for r in train for _ in "ab"]
    assert rs == [r[k] for r in train for k in ("response_a", "response_b")]
    scores = torch.arange(20, dtype=torch.float)
    assert got["reward_stats"] == {"mean": pytest.approx(scores.mean().item()), "std": pytest.approx(scores.std().item())}
    assert got["eval_calibration"]["n"] == 3 and got["eval_accuracy"] == got["eval_calibration"]["accuracy"]
    # TensorBoard, through transformers' callback as Trainer drives it: the loss after each step (steps count
    # from 1, as in the TRL stages) and the held-out metrics after the last step.
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == \
        [(i, round(x, 5)) for i, x in enumerate(want_losses, 1)]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [10]
    assert [e.step for e in events.Scalars("eval/brier")] == [10]
    assert [h["step"] for h in log] == list(range(1, 11))


def test_a_new_run_adds_the_adapter_without_deleting_and_a_tiny_split_holds_out_one(stage, monkeypatch):
    cfg = stage.cfg
    monkeypatch.setattr(BASE, "adapters", [])
    (cfg.path / "label_preferences").mkdir(parents=True)
    data.write_shard(data.shard_path(cfg.path / "label_preferences", 0), _rows(2))
    cfg.reward_model.eval_fraction = 0.1  # round(0.2) = 0, but at least one pair is held out
    got = reward_model.run(cfg, BASE, cfg.path / "reward_model")
    assert got["eval_pairs"] == 1 and got["train_pairs"] == 1
    assert [c[0] for c in stage.calls][:2] == ["add_adapter", "add_head"]


def test_too_few_labels_is_one_error_naming_the_folder(stage):
    cfg = stage.cfg
    (cfg.path / "label_preferences").mkdir(parents=True)
    data.write_shard(data.shard_path(cfg.path / "label_preferences", 0), _rows(1))
    with pytest.raises(data.DataError) as e:
        reward_model.run(cfg, BASE, cfg.path / "reward_model")
    assert str(e.value) == (f"{cfg.path / 'label_preferences'}: 1 usable labels leave none to train on after "
                            "holding out reward_model.eval_fraction=0.2")


def test_evaluate_pairs_edges(monkeypatch):
    @contextlib.contextmanager
    def role(b, n, trainable=False):
        assert b is BASE and n == "reward" and not trainable
        yield None

    monkeypatch.setattr(models, "role", role)
    scores = {"a0": 1.0, "b0": 1.0, "a1": 2.0, "b1": 0.0, "a2": 0.0, "b2": 3.0}

    def pair_scores(b, rows, n):
        assert b is BASE and n == 64
        return torch.tensor([scores[r["response_a"]] for r in rows]), torch.tensor([scores[r["response_b"]] for r in rows])

    monkeypatch.setattr(reward_model, "pair_scores", pair_scores)
    rows = [{"response_a": f"a{i}", "response_b": f"b{i}", "p_a": p} for i, p in enumerate([0.8, 0.9, 0.7])]
    # A predicted tie (P = 0.5) is not a win; rows 1 right, 0 and 2 wrong.
    assert reward_model.evaluate_pairs(BASE, rows, 2, 64)["accuracy"] == pytest.approx(1 / 3)
    ties = [dict(r, p_a=0.5) for r in rows]
    assert reward_model.evaluate_pairs(BASE, ties, 2, 64)["accuracy"] is None
    empty = reward_model.evaluate_pairs(BASE, [], 2, 64)
    assert empty == {"accuracy": None, "mean_predicted": None, "mean_label": None, "brier": None, "n": 0}


def test_pair_scores_reach_the_base_with_the_reward_head(monkeypatch):
    seen = {}
    monkeypatch.setattr(rollout, "reward_text", lambda tok, p, r: (tok == "TOK") and f"{p}|{r}")

    def tokenize_left(b, texts, n):
        assert b is BASE
        seen["texts"], seen["n"] = texts, n
        return {"input_ids": "IDS", "attention_mask": "MASK"}, []

    def sequence_scores(b, head, ids, mask):
        assert (b, head, ids, mask) == (BASE, "reward", "IDS", "MASK")
        return torch.tensor([1.0, 2.0, 3.0, 4.0])

    monkeypatch.setattr(reward_model.generation, "tokenize_left", tokenize_left)
    monkeypatch.setattr(rollout, "sequence_scores", sequence_scores)
    r_a, r_b = reward_model.pair_scores(BASE, _rows(2), 9)
    assert seen == {"texts": ["q0|a0", "q1|good a1", "q0|good good b0", "q1|good b1"], "n": 9}
    assert r_a.tolist() == [1.0, 2.0] and r_b.tolist() == [3.0, 4.0]
