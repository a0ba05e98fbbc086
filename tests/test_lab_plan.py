"""How the pipeline treats a lab base (`base.create=lab|lab-ci`), without building one: its content
hash goes into every stage's config, it is built before the stage checks (its folder holds the
prompt files they read), only where `base.create` may build, and a folder that is not a lab
model is one clear error.

    python -m pytest -q tests/test_lab_plan.py
"""

from __future__ import annotations

import pytest

from cai_lite import pipeline, stage_plan
from cai_lite.lab import pretrain
from cai_lite.recipe import load_config
from cai_lite.typed_yaml import ConfigError


def _cfg(tmp_path, *overrides):
    return load_config(["recipe=lab", f"run_dir={tmp_path / 'run'}", "seed=4", *overrides])


def test_the_lab_hash_is_in_every_stage_config(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "expected_hash", lambda seed, size: f"{seed}-{size}")
    assert stage_plan._lab_hash(_cfg(tmp_path)) == "4-default"
    assert stage_plan._lab_hash(_cfg(tmp_path, "base.create=lab-ci")) == "4-ci"
    assert stage_plan._lab_hash(load_config(["recipe=tiny_cpu"])) == ""
    decided = stage_plan.plan(_cfg(tmp_path))
    assert {s: snap["config"]["base.lab_model"] for s, snap in decided.snapshots.items()} == \
        {name: "4-default" for name in stage_plan.NAMES}
    tiny = stage_plan.plan(load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'tiny'}"]))
    assert all("base.lab_model" not in snap["config"] for snap in tiny.snapshots.values())


class Built(Exception):
    pass


def test_the_lab_model_is_built_before_the_checks_and_only_where_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "expected_hash", lambda seed, size: "h")
    built = []

    def build(path, seed, size):
        built.append((path, seed, size))
        raise Built  # stop here: nothing after the build matters to this test

    monkeypatch.setattr(pretrain, "build_lab_model", build)
    model = str(tmp_path / "runs" / "_models" / "lab")
    with pytest.raises(Built):
        pipeline.run(_cfg(tmp_path, f"base.model={model}", "stages=[critique_revise]"))
    assert built == [(model, 4, "default")]
    # Outside runs/_models/<create>...: refused before any build.
    with pytest.raises(ConfigError, match="builds a model only at runs/_models/lab"):
        pipeline.run(_cfg(tmp_path, f"base.model={tmp_path / 'elsewhere'}", "stages=[critique_revise]"))
    assert len(built) == 1


def test_a_folder_that_is_not_a_lab_model_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "expected_hash", lambda seed, size: "h")
    model = tmp_path / "runs" / "_models" / "lab"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a lab model folder"):
        pipeline.run(_cfg(tmp_path, f"base.model={model}", "stages=[critique_revise]"))
    assert (model / "config.json").read_text() == "{}"
