"""Run-directory safety with stand-in stages (no model): one writer at a time, a finished output
never lost to a redo that fails or is killed, input files pinned by their contents, and one clean
error for a run dir that cannot be made.

    python -m pytest -q tests/test_run_dir_safety.py
"""

from __future__ import annotations

import json
import os

import pytest

from cai_lite import data, pipeline, rundir
from cai_lite.stages import critique_revise
from cai_lite.typed_yaml import ConfigError

from test_run_dir import _cfg


def test_a_second_process_is_refused_with_the_pid_of_the_first(tmp_path, fake_stages):
    seen, base = fake_stages
    cfg = _cfg(tmp_path / "run", "stages=[critique_revise]", *base)
    with rundir.locked(cfg.path):
        with pytest.raises(ConfigError) as e:
            pipeline.run(cfg)
    assert e.value.errors == [f"run_dir: {cfg.path} is in use by process {os.getpid()}; wait for it to finish, "
                              f"or use run_name= for another run"]
    assert "critique_revise" not in seen and not (cfg.path / "config.yaml").exists()
    pipeline.run(cfg)  # the lock went with its holder
    assert (cfg.path / "critique_revise" / "stage.json").is_file() and (cfg.path / "config.yaml").is_file()


def test_a_redo_that_fails_puts_the_finished_output_back(tmp_path, fake_stages, monkeypatch):
    seen, base = fake_stages
    cfg = _cfg(tmp_path / "run", "stages=[critique_revise]", *base)
    first = pipeline.run(cfg)["critique_revise"]
    before = {p.name: p.read_bytes() for p in (cfg.path / "critique_revise").iterdir()}

    def broken(cfg, base, out):
        data.write_shard(data.shard_path(out, 0), [{"half": "done"}])
        raise data.DataError("prompts.jsonl line 3: not JSON")

    monkeypatch.setattr(critique_revise, "run", broken)
    forced = _cfg(tmp_path / "run", "stages=[critique_revise]", "critique_revise.rounds=3", "force=[critique_revise]", *base)
    with pytest.raises(data.DataError):
        pipeline.run(forced)
    assert {p.name: p.read_bytes() for p in (cfg.path / "critique_revise").iterdir()} == before
    assert not list(cfg.path.glob(".*.replaced"))
    assert pipeline.run(cfg)["critique_revise"] == first  # still done, and skipped


def test_a_killed_redo_is_undone_by_the_next_run(tmp_path, fake_stages):
    seen, base = fake_stages
    cfg = _cfg(tmp_path / "run", "stages=[critique_revise]", *base)
    first = pipeline.run(cfg)["critique_revise"]
    out = cfg.path / "critique_revise"
    rundir.set_aside(out)  # what a redo does first; then SIGKILL leaves half a new folder
    out.mkdir()
    data.write_shard(data.shard_path(out, 0), [{"half": "done"}])
    seen.pop("critique_revise")
    assert pipeline.run(cfg)["critique_revise"] == first and "critique_revise" not in seen
    assert not list(cfg.path.glob(".*.replaced"))


def test_an_edited_prompts_file_at_the_same_path_is_a_change(tmp_path, fake_stages):
    seen, base = fake_stages
    prompts = tmp_path / "red.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"request {i}"}) + "\n" for i in range(20)))
    cfg = _cfg(tmp_path / "run", "stages=[critique_revise]", f"data.prompts={prompts}", "data.eval_prompts=2", *base)
    pipeline.run(cfg)
    prompts.write_text(prompts.read_text().replace("request 3", "request three"))
    with pytest.raises(ConfigError) as e:
        pipeline.run(cfg)
    (msg,) = e.value.errors
    assert msg.startswith("critique_revise: already done with other settings: data.prompts:sha256: ") and "force=" in msg
    # A redo resumes nothing made from the old file.
    (cfg.path / "critique_revise" / "stage.json").unlink()
    pipeline.run(cfg)
    assert seen["critique_revise"] == [".resume_key"]


def test_a_run_dir_that_cannot_be_made_is_one_clean_error(tmp_path, fake_stages):
    seen, base = fake_stages
    (tmp_path / "afile").write_text("x")
    run_dir = tmp_path / "afile" / "run"
    with pytest.raises(ConfigError) as e:
        pipeline.run(_cfg(run_dir, "stages=[critique_revise]", *base))
    assert e.value.errors == [f"run_dir: {run_dir}: {tmp_path / 'afile'} is a file, not a folder"]
    assert "critique_revise" not in seen and (tmp_path / "afile").read_text() == "x"
