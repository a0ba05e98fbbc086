"""The contract each stage module declares next to its run(), and what the pipeline derives from
it: stage names, hashes and reruns (KEYS, READS, OPTIONAL_READS), the outputs a stage.json vouches
for (OUTPUTS), and run-dir paths spelled only in rundir.py. No model is loaded.

    python -m pytest tests/test_stage_contract.py -q
"""

from __future__ import annotations

import re

import pytest

from cai_lite import config, pipeline, stage_plan
from cai_lite.config import Config
from cai_lite.stages import critique_revise, evaluate

from conftest import ROOT
from test_run_dir import _cfg, _done


def test_every_stage_declares_its_contract():
    assert stage_plan.NAMES == list(config.STAGES)  # config.py keeps its own copy: it may not import stages
    for i, (name, stage) in enumerate(zip(stage_plan.NAMES, stage_plan.STAGES)):
        assert callable(stage.run) and isinstance(stage.HEADLINE, str), name
        assert all(isinstance(getattr(stage, k), tuple) for k in ("KEYS", "READS", "OPTIONAL_READS", "OUTPUTS")), name
        assert name in stage.KEYS, name  # its own section
        for key in stage.KEYS:  # every key names a real config key or section
            obj = Config()
            for part in key.split("."):
                assert hasattr(obj, part), f"{name}.KEYS: {key}"
                obj = getattr(obj, part)
        # Only earlier stages: the list's order is an order in which every input exists.
        assert set(stage.READS + stage.OPTIONAL_READS) <= set(stage_plan.NAMES[:i]), name


def test_evaluate_declares_the_critique_revise_shards_it_reads():
    assert "critique_revise" in evaluate.READS
    # ...and none of the stage sections it used to borrow: they reach its hash through its inputs.
    assert not {k.split(".")[0] for k in evaluate.KEYS} & set(stage_plan.NAMES) - {"evaluate"}


def _downstream(name: str) -> set[str]:
    out, grew = set(), True
    while grew:
        more = {n for n, s in zip(stage_plan.NAMES, stage_plan.STAGES)
                if {name, *out} & set(s.READS + s.OPTIONAL_READS)} - out
        out, grew = out | more, bool(more)
    return out


# One key of each stage's own section, set to a value the tiny_cpu recipe does not give it.
CHANGE = {"critique_revise": "critique_revise.rounds=3", "sft": "sft.lr=0.5",
          "label_preferences": "label_preferences.num_principles=7", "reward_model": "reward_model.lr=0.5",
          "ppo": "ppo.lr=0.5", "rloo": "rloo.lr=0.5", "dpo": "dpo.lr=0.5", "evaluate": "evaluate.bootstrap=77",
          "export": "export.dtype=bfloat16"}


@pytest.mark.parametrize("name", stage_plan.NAMES)
def test_a_key_change_reruns_its_stage_and_every_stage_that_reads_it_and_nothing_else(tmp_path, name):
    assert set(CHANGE) == set(stage_plan.NAMES)
    every = f"stages=[{','.join(stage_plan.NAMES)}]"
    cfg = _cfg(tmp_path, every)
    first = stage_plan.plan(cfg)
    for n in stage_plan.NAMES:
        _done(cfg, first, n, f"{n}-1", **{up: f"{up}-1" for up in first.inputs[n]})
    assert set(stage_plan.plan(cfg).actions.values()) == {"skip"}
    changed = stage_plan.plan(_cfg(tmp_path, every, CHANGE[name], f"force=[{name}]"))
    assert changed.hashes[name] != first.hashes[name]
    assert {n for n, a in changed.actions.items() if a == "run"} == {name} | _downstream(name)
    assert _downstream("ppo") == {"evaluate", "export"} and _downstream("evaluate") == set()  # spelled out once


def test_a_stage_without_its_declared_outputs_leaves_no_stage_json(tmp_path, fake_stages, monkeypatch):
    seen, base = fake_stages
    monkeypatch.setattr(critique_revise, "run", lambda cfg, base, out: {})  # writes no part-*.jsonl
    cfg = _cfg(tmp_path / "run", "stages=[critique_revise]", *base)
    with pytest.raises(RuntimeError, match=r"critique_revise: finished without writing part-\*\.jsonl"):
        pipeline.run(cfg)
    assert not (cfg.path / "critique_revise" / "stage.json").exists()


def test_run_dir_paths_are_spelled_only_in_rundir():
    # `cfg.path / "sft" / "adapter"` and the like; config.yaml is the run's own file, not a stage's.
    inline = re.compile(r"\b(cfg\.path|run_dir)(?!\s*/\s*\"config\.yaml)\s*/")
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted((ROOT / "cai_lite").rglob("*.py"))
             if p.name != "rundir.py" for i, line in enumerate(p.read_text().splitlines(), 1) if inline.search(line)]
    assert found == [], "use rundir.stage_dir / adapter_dir / is_done"
