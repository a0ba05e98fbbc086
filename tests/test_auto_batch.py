"""`generation.batch_size=auto` and `ppo.rollout_batch_size=auto`: the planner's pick fits by its own
terms and one more row would not (unless the cap stopped it), too small a card names the key, the
keys parse from YAML and the command line, they leave the config hash alone, and a tiny_cpu run
with auto goes end to end.

    python -m pytest -q tests/test_auto_batch.py
"""

from __future__ import annotations

import json
import logging

import pytest
from conftest import tiny_config

from cai_lite import cli, pipeline, planner, stage_plan
from cai_lite.recipe import load_config
from cai_lite.tiny import build_shape_folder
from cai_lite.typed_yaml import ConfigError

GiB = planner.GiB


def _fits(cfg, m, s, key: str, rows: int, card: int) -> bool:
    return sum(planner.auto_terms(cfg, m, s, key, rows).values()) + planner.OVERHEAD <= card


@pytest.mark.parametrize("shape", planner.shipped())
@pytest.mark.parametrize("card_gb", [8, 12, 16, 24, 80])
@pytest.mark.parametrize("key", planner.AUTO_KEYS)
def test_the_pick_fits_and_one_more_row_does_not(shape, card_gb, key):
    cfg = load_config(["recipe=7b_qlora", f"plan.shape={shape}", f"{key}=auto"])
    config, name = planner.shape_config(cfg)
    m = planner.count(config, name, list(cfg.lora.target_modules))
    s = planner.settings(cfg)
    card = card_gb * GiB
    p = planner.pick(cfg, m, s, key, card, "test")
    assert p.cap == (planner.AUTO_CAP if key == "generation.batch_size" else cfg.ppo.batch_size)
    assert 0 <= p.rows <= p.cap
    if p.rows:
        assert _fits(cfg, m, s, key, p.rows, card)
        assert p.terms == planner.auto_terms(cfg, m, s, key, p.rows)
    if p.rows < p.cap:
        assert not _fits(cfg, m, s, key, p.rows + 1, card)


def test_the_picks_span_none_some_and_the_cap():
    """The grid above is not vacuous: on a 7B shape, 8 GiB fits no llama-2-7b batch, 12 GiB some, 80 the cap."""
    def rows(shape, gb):
        cfg = load_config(["recipe=7b_qlora", f"plan.shape={shape}", "generation.batch_size=auto"])
        return planner.auto_picks(cfg, gb * GiB, "test")[0].rows

    assert rows("llama-2-7b", 6) == 0
    assert 0 < rows("llama-2-7b", 12) < planner.AUTO_CAP
    assert rows("qwen2.5-7b", 80) == planner.AUTO_CAP


def test_plan_true_shows_the_pick_and_plans_at_it(capsys):
    assert cli.main(["recipe=7b_qlora", "plan=true", "generation.batch_size=auto", "plan.gpu_memory_gb=12"]) == 2
    out = capsys.readouterr().out
    line = next(li for li in out.splitlines() if li.startswith("generation.batch_size=auto -> "))
    rows = int(line.split("-> ")[1].split()[0])
    assert 0 < rows < planner.AUTO_CAP and "of 12.0 GiB, plan.gpu_memory_gb; cap 64)" in line
    cfg = load_config(["recipe=7b_qlora", f"generation.batch_size={rows}"])
    config, name = planner.shape_config(cfg)
    m = planner.count(config, name, list(cfg.lora.target_modules))
    t = planner.stage_terms(cfg, m, planner.settings(cfg), "critique_revise")
    row = next(li for li in out.splitlines() if li.startswith("critique_revise"))
    weights = planner.base_weights(m, planner.settings(cfg))
    assert float(row.split()[-2]) == pytest.approx((sum(t.values()) + weights) / GiB, abs=0.006)
    assert row.endswith("yes")
    # ppo's rollout batch is auto by default: ppo's row is planned at its pick, not at ppo.batch_size.
    assert any(li.startswith("ppo.rollout_batch_size=auto -> ") for li in out.splitlines())


def test_too_small_a_card_names_the_key(tmp_path, monkeypatch):
    folder = build_shape_folder(tmp_path / "Llama-2-7b", json.loads((planner.SHAPES / "llama-2-7b.json").read_text()))
    cfg = load_config(["recipe=tiny_cpu", f"base.model={folder}", "base.create=none", "generation.batch_size=auto",
                       "ppo.rollout_batch_size=4"])
    monkeypatch.setattr(pipeline, "device_memory", lambda device, fallback: (6 * GiB, "a 6 GiB test card"))
    with pytest.raises(ConfigError) as e:
        pipeline.resolve_auto(cfg)
    assert len(e.value.errors) == 1
    assert e.value.errors[0].startswith("generation.batch_size: auto found no batch that fits (")
    assert "of 6.0 GiB, a 6 GiB test card" in e.value.errors[0]
    # The same shape on a larger card: numbers in a copy, the caller's config untouched.
    monkeypatch.setattr(pipeline, "device_memory", lambda device, fallback: (40 * GiB, "a 40 GiB test card"))
    resolved = pipeline.resolve_auto(cfg)
    assert isinstance(resolved.generation.batch_size, int) and 1 <= resolved.generation.batch_size <= planner.AUTO_CAP
    assert cfg.generation.batch_size == "auto" and resolved.ppo.rollout_batch_size == 4


def test_nothing_auto_means_the_same_config():
    cfg = load_config(["recipe=tiny_cpu", "ppo.rollout_batch_size=8"])  # generation.batch_size is 16 there
    assert pipeline.resolve_auto(cfg) is cfg


@pytest.mark.parametrize("arg, value", [("generation.batch_size=auto", "auto"), ("generation.batch_size=12", 12),
                                        ("ppo.rollout_batch_size=auto", "auto"), ("ppo.rollout_batch_size=3", 3)])
def test_auto_or_a_number_parses_from_the_command_line(arg, value):
    cfg = load_config(["recipe=tiny_cpu", arg])
    section, key = arg.split("=")[0].split(".")
    assert getattr(getattr(cfg, section), key) == value


def test_auto_parses_from_yaml_and_bad_values_name_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults: tiny_cpu\ngeneration:\n  batch_size: auto\nppo:\n  rollout_batch_size: 5\n")
    cfg = load_config([f"recipe={recipe}"])
    assert cfg.generation.batch_size == "auto" and cfg.ppo.rollout_batch_size == 5
    assert load_config(["recipe=tiny_cpu"]).ppo.rollout_batch_size == "auto"  # the default
    with pytest.raises(ConfigError) as e:
        load_config(["recipe=tiny_cpu", "generation.batch_size=big", "ppo.rollout_batch_size=0",
                     "generation.batch_size=true"])
    assert e.value.errors == ["generation.batch_size: expected int | auto, got 'big'",
                              "generation.batch_size: expected int | auto, got 'true'",
                              "ppo.rollout_batch_size must be >= 1 (got 0)"]
    recipe.write_text("defaults: tiny_cpu\ngeneration:\n  batch_size: 2.5\n")
    with pytest.raises(ConfigError) as e:
        load_config([f"recipe={recipe}"])
    assert e.value.errors == ["generation.batch_size: expected int | auto, got 2.5"]


def test_batch_sizes_of_sampling_leave_the_hash_alone(tmp_path):
    def hashes(*overrides):
        return stage_plan.plan(load_config(["recipe=tiny_cpu", f"run_dir={tmp_path}", *overrides])).hashes

    plain = hashes()
    assert hashes("generation.batch_size=auto", "ppo.rollout_batch_size=3") == plain
    assert hashes("generation.batch_size=1") == plain
    moved = hashes("ppo.batch_size=16")  # how many prompts a rollout takes is a setting of what is made
    assert moved["ppo"] != plain["ppo"] and moved["critique_revise"] == plain["critique_revise"]


def test_a_tiny_run_with_auto_goes_end_to_end(tmp_path, tiny_llama, caplog):
    cfg = tiny_config(tmp_path / "run", tiny_llama, "generation.batch_size=auto",
                      "stages=[critique_revise,sft,label_preferences,reward_model,ppo]", "ppo.steps=1",
                      "data.limit=4", "critique_revise.helpful_limit=2", "label_preferences.max_prompts=4",
                      "sft.max_steps=2")
    with caplog.at_level(logging.INFO, logger="cai_lite"):
        results = pipeline.run(cfg)
    assert set(results) == {"critique_revise", "sft", "label_preferences", "reward_model", "ppo"}
    picks = [r.getMessage() for r in caplog.records if "=auto -> " in r.getMessage()]
    # A tiny model fits the cap on any machine that runs the tests; ppo's cap is ppo.batch_size, as every
    # rollout sampled all its prompts at once before auto.
    assert picks[0].startswith(f"generation.batch_size=auto -> {planner.AUTO_CAP} (") and "RAM available" in picks[0]
    assert picks[1].startswith(f"ppo.rollout_batch_size=auto -> {cfg.ppo.batch_size} (")
    assert "cap 8 reached" in picks[1] and len(picks) == 2
    saved = (cfg.path / "config.yaml").read_text()
    assert "batch_size: auto" in saved and "rollout_batch_size: auto" in saved  # what was asked, not the pick
