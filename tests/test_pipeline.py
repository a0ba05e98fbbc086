"""Pipeline mechanics: stage.json, skip on the same config, refuse a changed key, force, and
rerun a stage whose upstream was redone.

    python -m pytest tests/test_pipeline.py -q
"""

from __future__ import annotations

import json

import pytest
import yaml

from cai_lite import pipeline, stage_plan
from cai_lite.typed_yaml import ConfigError

from conftest import tiny_config

FAST = ["critique_revise.rounds=1", "data.limit=4", "critique_revise.helpful_prompts=", "generation.max_new_tokens=8",
        "sft.max_steps=2"]


def test_skip_refuse_force_and_upstream(tmp_path, tiny_llama):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, tiny_llama, "stages=[critique_revise,sft]", *FAST)
    first = pipeline.run(cfg)
    for name in ("critique_revise", "sft"):
        record = json.loads((run_dir / name / "stage.json").read_text())
        for key in ("stage", "config_hash", "seconds", "peak_memory_mb", "memory"):
            assert key in record
        assert record["stage"] == name and record["peak_memory_mb"] > 0
    assert first["critique_revise"]["rows"] == 4 and first["sft"]["steps"] == 2
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["critique_revise"]["rounds"] == 1 and resolved["base"]["model"] == str(tiny_llama)

    # Same config: both skipped, nothing rewritten.
    mtime = (run_dir / "sft" / "stage.json").stat().st_mtime_ns
    again = pipeline.run(cfg)
    assert again["sft"]["config_hash"] == first["sft"]["config_hash"]
    assert (run_dir / "sft" / "stage.json").stat().st_mtime_ns == mtime

    # A changed key of the stage's own config: refused, naming the key, and nothing touched.
    changed = tiny_config(run_dir, tiny_llama, "stages=[critique_revise,sft]", *FAST, "critique_revise.rounds=2")
    with pytest.raises(ConfigError) as e:
        pipeline.run(changed)
    assert any("critique_revise" in m and "critique_revise.rounds: 1 -> 2" in m and "force=" in m for m in e.value.errors)
    assert (run_dir / "sft" / "stage.json").stat().st_mtime_ns == mtime

    # force= reruns it; sft's own config is unchanged but its input was redone, so it reruns too.
    forced = tiny_config(run_dir, tiny_llama, "stages=[critique_revise,sft]", *FAST, "critique_revise.rounds=2",
                         "force=[critique_revise]")
    out = pipeline.run(forced)
    rows = [json.loads(line) for line in (run_dir / "critique_revise" / "part-00000.jsonl").read_text().splitlines()]
    assert all(len(r["rounds"]) == 2 for r in rows)
    assert out["sft"]["inputs"]["critique_revise"] == out["critique_revise"]["config_hash"]
    assert (run_dir / "sft" / "stage.json").stat().st_mtime_ns != mtime

    # Forcing the upstream stage with an unchanged config still remakes its output, so sft reruns.
    mtime = (run_dir / "sft" / "stage.json").stat().st_mtime_ns
    again_forced = tiny_config(run_dir, tiny_llama, "stages=[critique_revise,sft]", *FAST, "critique_revise.rounds=2",
                               "force=[critique_revise]")
    out2 = pipeline.run(again_forced)
    assert (run_dir / "sft" / "stage.json").stat().st_mtime_ns != mtime
    assert out2["sft"]["inputs_done"]["critique_revise"] == out2["critique_revise"]["output_id"] != \
        out["critique_revise"]["output_id"]

    # Remaking critique_revise alone leaves sft stale: a stage reading sft is refused, naming it.
    alone = tiny_config(run_dir, tiny_llama, "stages=[critique_revise]", *FAST, "critique_revise.rounds=2",
                        "force=[critique_revise]")
    pipeline.run(alone)
    reader = tiny_config(run_dir, tiny_llama, "stages=[label_preferences]", *FAST, "critique_revise.rounds=2")
    with pytest.raises(ConfigError) as e:
        pipeline.run(reader)
    assert any(m.startswith("sft: its output") and "critique_revise was remade" in m for m in e.value.errors)


def test_speed_only_judge_keys_do_not_refuse(tmp_path, tiny_llama):
    cfg = tiny_config(tmp_path / "r", tiny_llama)
    slow = tiny_config(tmp_path / "r", tiny_llama, "judge.concurrency=1", "judge.timeout_s=5", "judge.batch_size=2")
    other = tiny_config(tmp_path / "r", tiny_llama, "judge.adapter=sft")
    assert stage_plan.plan(cfg).hashes["label_preferences"] == stage_plan.plan(slow).hashes["label_preferences"]
    assert stage_plan.plan(cfg).hashes["label_preferences"] != stage_plan.plan(other).hashes["label_preferences"]


def test_reading_a_missing_stage_is_refused_before_loading(tmp_path, tiny_llama):
    cfg = tiny_config(tmp_path / "empty", tiny_llama, "stages=[sft]")
    with pytest.raises(ConfigError, match="sft reads the output of critique_revise"):
        pipeline.run(cfg)  # no base passed: a model load would happen only after planning


def test_hashes_do_not_depend_on_the_directory_a_run_starts_from(tmp_path, tiny_llama, monkeypatch):
    """Shipped prompt files resolve to absolute paths outside the checkout; the plan must not read that
    as other settings (a run dir given by path, started from the repo root and then from elsewhere)."""
    from cai_lite.config import SHIPPED

    run_dir = tmp_path / "r"
    plans = []
    for cwd, spelled in ((SHIPPED, "recipes/prompts/red_team.jsonl"),  # relative: the file is right here
                         (tmp_path, str(SHIPPED / "recipes/prompts/red_team.jsonl"))):
        monkeypatch.chdir(cwd)
        cfg = tiny_config(run_dir, tiny_llama, "data.prompts=recipes/prompts/red_team.jsonl")
        assert cfg.data.prompts == spelled
        plans.append(stage_plan.plan(cfg))
    assert plans[0].snapshots["critique_revise"]["config"]["data.prompts:sha256"]  # the content still counts
    assert plans[0].hashes == plans[1].hashes
