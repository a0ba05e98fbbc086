"""Pipeline mechanics: stage.json, skip on the same config, refuse a changed key, force, and
rerun a stage whose upstream was redone.

    python -m pytest tests/test_pipeline.py -q
"""

from __future__ import annotations

import json

import pytest
import yaml

from cai_lite import pipeline
from cai_lite.typed_yaml import ConfigError

from conftest import tiny_config

FAST = ["critique_revise.rounds=1", "data.limit=4", "critique_revise.helpful_prompts=", "generation.max_new_tokens=8",
        "sft.max_steps=2"]


def test_skip_refuse_force_and_upstream(tmp_path, tiny_llama, nf4_base):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, tiny_llama, "stages=[critique_revise,sft]", *FAST)
    first = pipeline.run(cfg, base=nf4_base)
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
    again = pipeline.run(cfg, base=nf4_base)
    assert again["sft"]["config_hash"] == first["sft"]["config_hash"]
    assert (run_dir / "sft" / "stage.json").stat().st_mtime_ns == mtime

    # A changed key of the stage's own config: refused, naming the key, and nothing touched.
    changed = tiny_config(run_dir, tiny_llama, "stages=[critique_revise,sft]", *FAST, "critique_revise.rounds=2")
    with pytest.raises(ConfigError) as e:
        pipeline.run(changed, base=nf4_base)
    assert any("critique_revise" in m and "critique_revise.rounds: 1 -> 2" in m and "force=" in m for m in e.value.errors)
    assert (run_dir / "sft" / "stage.json").stat().st_mtime_ns == mtime

    # force= reruns it; sft's own config is unchanged but its input was redone, so it reruns too.
    forced = tiny_config(run_dir, tiny_llama, "stages=[critique_revise,sft]", *FAST, "critique_revise.rounds=2",
                         "force=[critique_revise]")
    out = pipeline.run(forced, base=nf4_base)
    rows = [json.loads(line) for line in (run_dir / "critique_revise" / "part-00000.jsonl").read_text().splitlines()]
    assert all(len(r["rounds"]) == 2 for r in rows)
    assert out["sft"]["inputs"]["critique_revise"] == out["critique_revise"]["config_hash"]
    assert (run_dir / "sft" / "stage.json").stat().st_mtime_ns != mtime


def test_reading_a_missing_stage_is_refused_before_loading(tmp_path, tiny_llama):
    cfg = tiny_config(tmp_path / "empty", tiny_llama, "stages=[sft]")
    with pytest.raises(ConfigError, match="sft reads the output of critique_revise"):
        pipeline.run(cfg)  # no base passed: a model load would happen only after planning
