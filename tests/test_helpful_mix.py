"""The helpfulness mix of the RL phase: benign prompts are labelled under the helpfulness principle
alone, reach PPO's and RLOO's prompts, and are kept out of evaluate's held-out prompts. Generation
and judging are stubbed; no model is loaded.

    python -m pytest -q tests/test_helpful_mix.py
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cai_lite import constitution as C
from cai_lite import data, judges, models, pipeline, stage_plan
from cai_lite.generation import Generated
from cai_lite.recipe import load_config
from cai_lite.stages import evaluate, ppo
from cai_lite.stages import label_preferences as LP
from cai_lite.typed_yaml import ConfigError

from conftest import tiny_config


class Tok:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "\n".join(m["content"] for m in messages)


def _prompts(path, texts):
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return str(path)


def test_benign_pairs_are_judged_under_the_helpfulness_principle_alone(tmp_path, monkeypatch):
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "label_preferences.num_responses=3",
                       "label_preferences.num_principles=2"])
    const = C.load("harmless")

    def generate(base, prompts, adapter, g, max_new_tokens=None, temperature=None, desc="generate"):
        assert adapter == "sft" and temperature == cfg.label_preferences.temperature
        return Generated([f"{p}/{i % 3}" for i, p in enumerate(prompts)], [True] * len(prompts), [False] * len(prompts))

    seen = []

    def compare(judge, comps, both_orders, demos, cot, cot_max_new_tokens):
        seen.extend(comps)
        # The stub prefers the later answer under the helpfulness principle and the earlier one otherwise.
        return [judges.Judgement(0.2 if c.principles == [C.HELPFUL_PRINCIPLE] else 0.9,
                                 [{"id": p.id, "p_ab": 0.5, "p_ba": 0.5} for p in c.principles]) for c in comps]

    monkeypatch.setattr(LP.generation, "generate", generate)
    monkeypatch.setattr(LP.judges, "compare", compare)
    shard = [("harmless", data.Prompt("r0", "burgle")), ("helpful", data.Prompt("h0", "bake"))]
    rows, n = LP._label_shard(cfg, SimpleNamespace(tokenizer=Tok()), const, [SimpleNamespace(name="j")], shard,
                              {"j": 0.0})
    assert n == 6 and len(rows) == 6  # 3 pairs per prompt
    assert [r["type"] for r in rows] == ["harmless"] * 3 + ["helpful"] * 3
    for c, r in zip(seen, rows):
        if r["type"] == "helpful":
            assert c.principles == [C.HELPFUL_PRINCIPLE]
            assert r["p_a"] == 0.2 and r["chosen"][0]["content"] == r["response_b"]
        else:
            assert len(c.principles) == 2 and all(p in const.preference for p in c.principles)
            assert r["p_a"] == 0.9 and r["chosen"][0]["content"] == r["response_a"]
        assert r["prompt"][0]["content"] in c.conversation
    assert {r["response_a"] for r in rows if r["type"] == "helpful"} == {"bake/0", "bake/1"}
    metrics = LP._metrics(cfg, rows, [SimpleNamespace(name="j", hard_labels=0)], {"j": 1.0}, n)
    assert metrics["labels"] == 6 and metrics["helpful_labels"] == 3


def test_rl_prompts_add_the_helpful_prompts(tmp_path):
    red = _prompts(tmp_path / "red.jsonl", [f"red {i}" for i in range(6)])
    good = _prompts(tmp_path / "good.jsonl", [f"good {i}" for i in range(5)])
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", f"ppo.prompts={red}",
                       f"ppo.helpful_prompts={good}", "ppo.helpful_limit=3"])
    assert ppo.rl_prompts(cfg) == [f"red {i}" for i in range(6)] + ["good 0", "good 1", "good 2"]
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", f"ppo.helpful_prompts={good}"])
    assert ppo.rl_prompts(cfg) == [p.text for p in data.prompt_split(cfg).train] + [f"good {i}" for i in range(5)]


def test_evaluate_keeps_every_stages_helpful_prompts_out(tmp_path):
    held = _prompts(tmp_path / "held.jsonl", ["how do I bake bread", "how do I tie a knot", "how do I swim"])
    cases = {"label_preferences": "how do I bake bread", "ppo": "how do I tie a knot", "rloo": "how do I swim"}
    for stage, text in cases.items():
        used = _prompts(tmp_path / f"{stage}.jsonl", [text])
        args = ["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", f"evaluate.helpful_prompts={held}"]
        cfg = load_config([*args, f"{stage}.helpful_prompts={used}"])
        red, helpful, excluded = evaluate.eval_prompts(cfg)
        assert text not in {p.text for p in helpful} and len(helpful) == 2 and excluded == 1, stage
        # ...and changing it reruns evaluate: the key is in that stage's hash, which evaluate's covers.
        assert stage_plan.plan(cfg).hashes["evaluate"] != stage_plan.plan(load_config(args)).hashes["evaluate"], stage


@pytest.mark.parametrize("stage", ["label_preferences", "ppo", "rloo"])
def test_a_missing_helpful_prompts_file_fails_before_any_model_loads(tmp_path, tiny_llama, stage, monkeypatch):
    def boom(cfg):
        raise AssertionError("a model was loaded before the config error")

    monkeypatch.setattr(models, "load_base", boom)
    cfg = tiny_config(tmp_path / "run", tiny_llama, "stages=[critique_revise,sft,label_preferences,reward_model,ppo,rloo]",
                      f"{stage}.helpful_prompts={tmp_path / 'nope.jsonl'}")
    with pytest.raises(ConfigError) as e:
        pipeline.run(cfg)
    assert [m for m in e.value.errors if m.startswith(f"{stage}.helpful_prompts:")] == \
        [f"{stage}.helpful_prompts: {tmp_path / 'nope.jsonl'}: no such file (for a datasets name, set data.format=datasets)"]


def test_evaluate_ignores_the_prompt_files_of_rl_stages_that_did_not_run(tmp_path):
    held = _prompts(tmp_path / "held.jsonl", ["how do I bake bread", "how do I swim"])
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "stages=[critique_revise,sft,evaluate]",
                       f"evaluate.helpful_prompts={held}", f"ppo.helpful_prompts={tmp_path / 'not-there.jsonl'}",
                       f"label_preferences.prompts={tmp_path / 'not-there.jsonl'}"])
    red, helpful, excluded = evaluate.eval_prompts(cfg)
    assert [p.text for p in helpful] == ["how do I bake bread", "how do I swim"] and excluded == 0
    # Once ppo has run in this folder, its prompts count as trained on.
    (cfg.path / "ppo").mkdir(parents=True)
    (cfg.path / "ppo" / "stage.json").write_text("{}")
    _prompts(tmp_path / "not-there.jsonl", ["how do I swim"])
    red, helpful, excluded = evaluate.eval_prompts(cfg)
    assert [p.text for p in helpful] == ["how do I bake bread"] and excluded == 1
