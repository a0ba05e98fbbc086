"""`plan=true`'s time estimate: its arithmetic against hand-computed seconds, the work it counts for
a small recipe against counts made by hand from the prompt files, and a plan=true run on tiny_cpu
that prints the probe's rates and a time per stage.

    python -m pytest -q tests/test_estimate.py
"""

from __future__ import annotations

import pytest
from conftest import tiny_config
from transformers import AutoTokenizer

from cai_lite import cli, data, estimate, models, probe
from cai_lite.estimate import Rates, Work
from cai_lite.recipe import load_config

RATES = Rates(step_s=0.01, row_step_s=0.001, fwd_s=0.002, fwd_token_s=1e-5, train_s=0.05, train_token_s=2e-5,
              ends_at=None)


def test_seconds_are_counts_at_the_rates():
    # Our loop (decode.py) over two calls of 40 rows in all, 16 slots, answers that run to the cap of 24:
    # max(2 x 24, 40 x 24 / 16 + 0) = 60 forwards at 10 ms, 40 x 24 rows in flight at 1 ms, and
    # 1,000 prompt tokens at 10 us.
    answers = Work("answers", "sample", batches=3, rows=40, tokens=1000, new_tokens=24, calls=2, slots=16)
    assert estimate.seconds(answers, RATES) == pytest.approx(60 * 0.01 + 960 * 0.001 + 0.01)
    # Where the probe's answers were 6 tokens on average and its longest 10: max(2 x 10, 40 x 6 / 16
    # + 2 x (10 - 6)) = 23 forwards (each call ends with a tail of its longest rows), 40 x 6 rows in flight.
    early = Rates(**{**vars(RATES), "ends_at": 10.0, "row_tokens": 6.0})
    assert estimate.seconds(answers, early) == pytest.approx(23 * 0.01 + 240 * 0.001 + 0.01)
    # A max_new_tokens below both caps them.
    short = Work("answers", "sample", batches=3, rows=40, tokens=1000, new_tokens=4, calls=2, slots=16)
    assert estimate.seconds(short, early) == pytest.approx(max(2 * 4, 40 * 4 / 16) * 0.01 + 160 * 0.001 + 0.01)
    # transformers' fixed batches (TRL's RLOO): each of the 3 batches runs until its longest row ends,
    # all 40 rows in flight throughout.
    answers.fixed_batches = True
    assert estimate.seconds(answers, RATES) == pytest.approx(3 * 24 * 0.01 + 40 * 24 * 0.001 + 0.01)
    assert estimate.seconds(answers, early) == pytest.approx(3 * 10 * 0.01 + 40 * 10 * 0.001 + 0.01)
    judge = Work("judge prompts", "forward", batches=5, rows=50, tokens=10_000)
    assert estimate.seconds(judge, RATES) == pytest.approx(5 * 0.002 + 0.1)
    bare = Work("judge prompts", "forward", batches=5, rows=50, tokens=10_000, bare=True)
    assert estimate.seconds(bare, Rates(**{**vars(RATES), "bare": 0.8})) == pytest.approx(0.8 * (5 * 0.002 + 0.1))
    steps = Work("sft steps", "train", batches=4, rows=16, tokens=3000)
    assert estimate.seconds(steps, RATES) == pytest.approx(4 * 0.05 + 0.06)
    # A stage adds its fixed set-up; the table's total is the stages' sum.
    work = {"sft": [steps], "label_preferences": [answers, judge]}
    assert estimate.stage_seconds("sft", [steps], RATES) == pytest.approx(estimate.FIXED["sft"] + 0.26)
    lines, total = estimate.table(work, RATES)
    assert total == pytest.approx(estimate.FIXED["sft"] + 0.26 + estimate.FIXED["label_preferences"] + 1.69 + 0.11)
    assert lines[1].split()[:4] == ["sft", "0", "0", "3,000"] and lines[2].split()[:4] == ["label_preferences", "40",
                                                                                              "10,000", "0"]
    assert lines[-1].split() == ["total", f"{total:.1f}"]
    # Without rates: the counts alone.
    lines, total = estimate.table(work, None)
    assert total is None and "seconds" not in lines[0]


def test_the_counts_of_a_small_recipe(tmp_path, tiny_llama):
    cfg = tiny_config(tmp_path / "run", tiny_llama)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    work = estimate.count(cfg, tok)
    get = lambda stage, what: next(w for w in work[stage] if w.what == what)  # noqa: E731
    red = data.read_prompts(cfg.data.prompts)
    helpful = data.read_prompts(cfg.critique_revise.helpful_prompts)
    assert len(red) >= cfg.data.limit + cfg.data.eval_prompts and len(helpful) >= 16  # the limits bind
    # critique_revise: 16 red-team + 8 helpful prompts in shards of 8: three answer calls of 8 rows; the two
    # red-team shards' 8 rows get a critique and a revision in each of 2 rounds.
    answers = get("critique_revise", "answers")
    assert (answers.rows, answers.batches, answers.new_tokens, answers.calls, answers.slots) == (24, 3, 24, 3, 16)
    # The helpful shard has no red-team rows to critique: no call for it.
    assert get("critique_revise", "critiques").calls == 2 * 2 and get("rloo", "rollouts").fixed_batches
    assert (get("critique_revise", "critiques").rows, get("critique_revise", "critiques").batches) == (32, 4)
    train = data.prompt_split(cfg).train
    rendered = [data.render(tok, [{"role": "user", "content": p.text}]) for p in train] + \
        [data.render(tok, [{"role": "user", "content": p.text}]) for p in helpful[:8]]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in rendered]
    # decode.py prefills the longest prompts first, so they pad little: the plain sum.
    assert answers.tokens == pytest.approx(sum(lengths), abs=1)
    # A forward pads to the longest of its batch: the reward model scores prompt + response (24 tokens)
    # 2 x 4 sequences at a time, E[max of 8 draws] = sum over lengths v of v x (P(X <= v)^8 - P(X < v)^8).
    pair = [len(tok(data.render(tok, [{"role": "user", "content": p.text}]), add_special_tokens=False)["input_ids"])
            + 24 for p in train]
    cdf = lambda v, below: sum(x < v if below else x <= v for x in pair) / len(pair)  # noqa: E731
    padded = sum(v * (cdf(v, False) ** 8 - cdf(v, True) ** 8) for v in set(pair))
    assert max(pair) >= padded > sum(pair) / len(pair)
    scores = get("reward_model", "held-out and train scores")
    assert (scores.rows, scores.batches) == (32, 4) and scores.tokens == pytest.approx(32 * padded, abs=1)
    # A critique prompt holds the answer: 24 generated tokens more than the prompt without it.
    critique = get("critique_revise", "critiques")
    assert critique.tokens / critique.rows > answers.tokens / answers.rows + 24
    assert not any(w.bare for w in work["critique_revise"]) and get("label_preferences", "judge prompts").bare
    # sft: 8 steps of 4 rows. label_preferences: 16 prompts x 2 responses; 1 pair x 2 principles x 2 orders each,
    # sent per shard of 8 prompts (32 judge prompts) in judge batches of 16.
    assert (get("sft", "sft steps").batches, get("sft", "sft steps").rows) == (8, 32)
    assert get("label_preferences", "responses").rows == 32
    judge = get("label_preferences", "judge prompts")
    assert (judge.rows, judge.batches) == (64, 4)
    # reward_model: 16 pairs, 4 held out, 2 epochs over 12 in batches of 4: 6 steps of 8 sequences.
    steps = get("reward_model", "reward steps")
    assert (steps.batches, steps.rows) == (6, 48)
    # ppo: 4 steps of 8 rollouts; 2 epochs of 2 minibatches, each training policy and value.
    assert get("ppo", "rollouts").rows == 32 and get("ppo", "policy + value updates").batches == 4 * 2 * 2 * 2
    assert get("ppo", "log-probs, scores, values").batches == 4 * (3 * 2 + 1)
    # evaluate: 8 held-out red-team prompts; the first 8 helpful prompts trained critique_revise, so the next 8.
    # Five models (base, sft, ppo, rloo, dpo) answer both; 4 pairs against base, 3 against sft.
    assert get("evaluate", "answers").rows == 5 * (8 + 8)
    assert get("evaluate", "win-rate prompts (harmless)").rows == 7 * 8 * 2 * 2
    assert get("evaluate", "win-rate prompts (helpful)").rows == 7 * 8 * 1 * 2
    assert sum(w.rows for w in work["evaluate"] if w.what == "rate questions") == 5 * 2 * (2 * 8 + 8)
    # Critique prompts (few-shot demos, ~700 tokens) are cut at generation.max_prompt_tokens, as the stage cuts them.
    assert critique.tokens == 32 * cfg.generation.max_prompt_tokens
    # Where the probe's answers end early, every generated text it counts is shorter: a judge prompt
    # holds two answers, 24 -> 5 tokens each.
    shorter = estimate.count(cfg, tok, answers=[5] * 16)
    assert next(w for w in shorter["label_preferences"] if w.what == "judge prompts").tokens == pytest.approx(
        judge.tokens - 64 * 2 * (24 - 5), abs=1)
    # Answers of varied length pad a batch to its longest: wider than the same mean length for all.
    varied = estimate.count(cfg, tok, answers=[1, 9] * 8)
    assert next(w for w in varied["label_preferences"] if w.what == "judge prompts").tokens > \
        next(w for w in shorter["label_preferences"] if w.what == "judge prompts").tokens


def test_generated_lengths_come_from_the_probes_answers():
    L = estimate.Lengths(None, 512, [2, 10])
    assert L.new(24) == 6  # the mean answer
    assert L.new(24, batch=2) == pytest.approx(2 * 1 / 4 + 10 * 3 / 4)  # E[longest of two draws]
    assert L.new(5) == pytest.approx((2 + 5) / 2)  # a lower max_new_tokens caps the long one
    assert estimate.Lengths(None, 512, None).new(24, batch=8) == 24  # no probe: every answer at the cap
    assert estimate.padded([3, 1, 2], 2) == pytest.approx((1 * 1 + 2 * 3 + 3 * 5) / 9)


def test_plan_true_prints_the_probe_and_a_time_per_stage(tmp_path, tiny_llama, capsys, monkeypatch):
    args = ["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", f"base.model={tiny_llama}", "base.create=none",
            "plan=true"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "time estimate on cpu (base.device=cpu), from a " in out
    lines = out.splitlines()
    for kind, unit in (("sampling", "ms a row"), ("forward", "us a token"), ("training", "us a token")):
        line = next(li for li in lines if li.startswith(f"  {kind} "))
        assert unit in line and "tokens/s" in line
    table = lines[lines.index(next(li for li in lines if li.startswith("stage") and "sampled rows" in li)):]
    for stage in load_config(["recipe=tiny_cpu"]).stages:
        row = next(li for li in table if li.startswith(stage + " "))
        assert float(row.split()[-1]) >= 0
    total = next(li for li in table if li.startswith("total"))
    assert float(total.split()[-1]) > 0
    assert not (tmp_path / "run").exists()  # a plan writes nothing
    # plan.probe=false: the counts alone, and no model loads.
    capsys.readouterr()
    monkeypatch.setattr(models, "load_base", lambda cfg: pytest.fail("plan.probe=false loaded the base"))
    assert cli.main([*args, "plan.probe=false"]) == 0
    out = capsys.readouterr().out
    assert "work per stage (no time estimate: plan.probe=false" in out and "time estimate on" not in out


def test_no_estimate_before_the_base_is_built(tmp_path):
    cfg = load_config(["recipe=lab", f"base.model={tmp_path / 'runs' / '_models' / 'lab'}"])
    said = probe.report(cfg)
    assert said.startswith("time estimate: none yet: ") and "base.create=lab builds it" in said
