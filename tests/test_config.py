"""Recipes, overrides and the promised error messages of `python run.py`.

    python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from cai_lite.config import Config
from cai_lite.recipe import available_recipes, help_text, load_config
from cai_lite.typed_yaml import ConfigError, all_keys, field_docs

from conftest import ROOT


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_recipe_loads_and_validates(name):
    cfg = load_config([f"recipe={name}"])
    assert cfg.recipe == name
    assert cfg.path.name == (cfg.run_name or name)
    assert available_recipes()[name], f"recipes/{name}.yaml needs a description"


def test_recipes_include_the_two_promised():
    assert {"tiny_cpu", "7b_qlora"} <= set(available_recipes())


def test_no_recipe_means_the_default():
    assert load_config([]).recipe == "lab"


def _errors(argv):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    return e.value.errors


def test_unknown_recipe_lists_available():
    (msg,) = _errors(["recipe=nope"])
    assert "recipe=nope" in msg and "tiny_cpu" in msg and "7b_qlora" in msg


def test_unknown_key_is_named_with_a_suggestion():
    (msg,) = _errors(["sft.lrr=1e-4"])
    assert msg == "sft.lrr: no such key (did you mean sft.lr?)"


def test_wrong_type_names_key_value_and_type():
    (msg,) = _errors(["sft.lr=fast"])
    assert "sft.lr" in msg and "'fast'" in msg and "float" in msg
    (msg,) = _errors(["base.quantization=int3"])
    assert "base.quantization" in msg and "int3" in msg and "nf4" in msg


def test_all_problems_reported_together():
    errors = _errors(["sft.lrr=1", "ppo.steps=many", "stages=[sft,bogus]", "rloo.num_samples=1", "loose"])
    text = "\n".join(errors)
    for needle in ("sft.lrr", "ppo.steps", "bogus", "rloo.num_samples must be >= 2", "loose"):
        assert needle in text
    assert len(errors) == 5


def test_recipe_yaml_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("description: x\nsft:\n  lr: high\n  nope: 1\n")
    errors = _errors([f"recipe={bad}"])
    assert any(e.startswith("sft.lr:") for e in errors) and any(e.startswith("sft.nope:") for e in errors)


def test_overrides_are_typed():
    cfg = load_config(["sft.lr=1e-4", "stages=[sft,ppo]", "run_name=007", "lora.r=4", "base.gradient_checkpointing=false"])
    assert cfg.sft.lr == 1e-4 and isinstance(cfg.sft.lr, float)
    assert cfg.stages == ["sft", "ppo"]
    assert cfg.run_name == "007"
    assert cfg.lora.r == 4 and cfg.base.gradient_checkpointing is False


def test_judge_shorthand_and_judge_lists():
    cfg = load_config(["judge=llamacpp", "judge.gguf_path=x.gguf"])
    assert cfg.judge.backend == "llamacpp" and cfg.judge.gguf_path == "x.gguf"
    cfg = load_config(["judges=[local,llamacpp]", "judge.gguf_path=y.gguf", "judge_vote=majority"])
    assert [j.backend for j in cfg.all_judges()] == ["local", "llamacpp"]
    assert cfg.all_judges()[1].gguf_path == "y.gguf"  # names take the rest of the settings from `judge`


def test_every_field_has_a_docstring_and_help_lists_it():
    text = help_text()
    for key in all_keys(Config):
        assert key.split(".")[-1] in text
    import dataclasses
    import typing

    seen = []

    def walk(cls):
        seen.append(cls)
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])

    walk(Config)
    assert len(seen) == 16  # Config and its 15 sections


def _run(*args):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_help_lists_recipes_and_keys():
    r = _run("--help")
    assert r.returncode == 0
    assert "tiny_cpu" in r.stdout and "7b_qlora" in r.stdout
    assert "ppo.kl_target: float = 0.0" in r.stdout


def test_cli_errors_exit_nonzero_without_traceback():
    r = _run("recipe=tiny_cpu", "sft.lrr=1", "sft.lr=abc")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "sft.lrr: no such key (did you mean sft.lr?)" in r.stderr and "sft.lr: expected float" in r.stderr
    r = _run("recipe=missing")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "available: " in r.stderr


@pytest.mark.parametrize("override, message", [
    ("sft.lr=-1", "sft.lr must be > 0 (got -1.0)"),
    ("reward_model.lr=0", "reward_model.lr must be > 0 (got 0.0)"),
    ("ppo.lr=-1e-5", "ppo.lr must be > 0 (got -1e-05)"),
    ("rloo.lr=-1", "rloo.lr must be > 0 (got -1.0)"),
    ("dpo.lr=nan", "dpo.lr must be > 0 (got nan)"),
    ("generation.temperature=-0.5", "generation.temperature must be >= 0 (got -0.5)"),
    ("label_preferences.temperature=-1", "label_preferences.temperature must be >= 0 (got -1.0)"),
    ("generation.top_p=0", "generation.top_p must be in (0, 1] (got 0.0)"),
    ("generation.top_p=1.5", "generation.top_p must be in (0, 1] (got 1.5)"),
    ("ppo.gamma=1.5", "ppo.gamma must be in [0, 1] (got 1.5)"),
    ("ppo.clip_range=0", "ppo.clip_range must be > 0 (got 0.0)"),
    ("ppo.kl_coef=-0.1", "ppo.kl_coef must be >= 0 (got -0.1)"),
    ("lora.dropout=1", "lora.dropout must be in [0, 1) (got 1.0)"),
    ("ppo.helpful_limit=-1", "ppo.helpful_limit must be >= 0 (got -1)"),
    ("sft.epochs=0", "sft.epochs must be > 0 (got 0.0)"),
    ("sft.warmup_ratio=1.5", "sft.warmup_ratio must be in [0, 1] (got 1.5)"),
    ("sft.max_steps=-2", "sft.max_steps must be >= -1 (got -2)"),
    ("ppo.kl_horizon=0", "ppo.kl_horizon must be >= 1 (got 0)"),
    ("judge.timeout_s=0", "judge.timeout_s must be > 0 (got 0.0)"),
    ("label_preferences.cot_max_new_tokens=0", "label_preferences.cot_max_new_tokens must be >= 1 (got 0)"),
    ("label_preferences.num_responses=1", "label_preferences.num_responses must be >= 2 to form a pair (got 1)"),
    ("evaluate.samples_in_report=-1", "evaluate.samples_in_report must be >= 0 (got -1)"),
    ("data.max_prompt_chars=0", "data.max_prompt_chars must be >= 1 (got 0)"),
    ("seed=-1", "seed must be >= 0 (got -1)"),
    ("judges=[{backend: local, max_failure_rate: 2}]", "judges[0].max_failure_rate must be in [0, 1] (got 2.0)"),
])
def test_out_of_range_values_are_refused_by_name(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(["recipe=tiny_cpu", override])
    assert e.value.errors == [message]


def test_edge_values_that_mean_something_are_allowed():
    cfg = load_config(["recipe=tiny_cpu", "generation.temperature=0", "generation.top_p=1", "ppo.kl_coef=0",
                       "sft.helpful_mix=0", "lora.dropout=0", "ppo.gamma=1", "ppo.lam=0"])
    assert cfg.generation.temperature == 0 and cfg.sft.helpful_mix == 0


def test_every_number_field_declares_its_range():
    import dataclasses
    import typing

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            elif hints[f.name] in (int, float):
                yield f"{prefix}{f.name}", f.metadata.get("range")

    missing = [key for key, span in walk(Config) if span is None]
    assert missing == [], "give these a range: ranged(default, \"> 0\") in config.py or stage_config.py"
