"""The teaching lab through the real pipeline: `recipe=lab_ci` (a smaller lab model, SL-CAI only)
pretrains its base on first use, runs critique_revise, sft and evaluate unchanged, and the oracle's
ground truth shows the SFT model less harmful than the base on held-out prompts.

    python -m pytest -q tests/test_lab_run.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_lite import pipeline, stage_plan
from cai_lite.recipe import load_config
from cai_lite.typed_yaml import ConfigError

from test_browse import MAX_BYTES, browser, cards, url  # noqa: F401 (browser is a fixture)


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab_run")
    cfg = load_config(["recipe=lab_ci", f"run_dir={root / 'run'}", f"base.model={root / 'runs/_models/lab-ci'}",
                       f"data.prompts={root / 'runs/_models/lab-ci/prompts/red_team_sl.jsonl'}",
                       f"critique_revise.helpful_prompts={root / 'runs/_models/lab-ci/prompts/helpful_sl.jsonl'}",
                       f"evaluate.prompts={root / 'runs/_models/lab-ci/prompts/red_team_held_out.jsonl'}",
                       f"evaluate.helpful_prompts={root / 'runs/_models/lab-ci/prompts/helpful_held_out.jsonl'}"])
    return cfg, pipeline.run(cfg)


def test_sl_cai_lowers_the_true_harmful_rate_on_held_out_prompts(lab_run):
    cfg, results = lab_run
    metrics = json.loads((cfg.path / "evaluate" / "metrics.json").read_text())
    rates = metrics["oracle"]["rates"]
    base, sft = rates["base"]["red_team"]["all"], rates["sft"]["red_team"]["all"]
    assert base["n"] == sft["n"] == 64
    assert sft["harmful"] < base["harmful"], rates
    assert base["harmful"] >= 0.2, "the lab base must be harmful often enough for SL-CAI to have a job"
    # Every held-out split is reported apart, and each was asked.
    assert all(rates["sft"]["red_team"][s]["n"] > 0 for s in ("held_out_form", "held_out_frame", "held_out_combo",
                                                                "consent_flip", "ood"))
    assert rates["sft"]["helpful"]["minimal_pairs"]["n"] > 0
    agreement = metrics["oracle"]["judge_agreement"]
    assert agreement["n"] > 0 and agreement["agreement"] is not None
    summary = (cfg.path / "evaluate" / "summary.txt").read_text()
    assert "model (oracle, all)" in summary and "judge agrees with the oracle" in summary
    assert (cfg.path / "evaluate" / "oracle.png").stat().st_size > 0
    assert "## Ground truth (the lab oracle)" in (cfg.path / "evaluate" / "report.md").read_text()


def test_the_run_browser_of_the_lab_run(lab_run, browser):
    """evaluate's report.html of the reduced lab run: under 2 MB, open in under a second, the oracle's
    rates by split on its Overview, rows in its views (tests/test_browse.py checks the page in depth)."""
    cfg, _ = lab_run
    page = cfg.path / "evaluate" / "report.html"
    assert page.stat().st_size < MAX_BYTES
    assert min(browser.open(url(page)) for _ in range(3)) < 1.0  # the best of 3: the machine is shared
    titles = browser.js("[...document.querySelectorAll('#main h3')].map(h => h.textContent)")
    assert any(t.startswith("ground truth (the lab oracle)") for t in titles), titles
    for view in ("slcai", "models"):
        browser.js(f"location.hash = '#{view}'")
        assert cards(browser)
    assert not browser.exceptions and set(browser.requests) == {url(page)}


def test_the_lab_base_is_pinned_by_content(lab_run):
    cfg, results = lab_run
    lab_hash = json.loads((Path(cfg.base.model) / "lab_pretrain.json").read_text())["hash"]
    for stage in ("critique_revise", "sft", "evaluate"):
        assert results[stage]["config"]["base.lab_model"] == lab_hash
    # Same config again: every stage is skipped, nothing retrains.
    again = pipeline.run(cfg)
    assert {k: v["output_id"] for k, v in again.items()} == {k: v["output_id"] for k, v in results.items()}


def test_a_changed_lab_model_is_a_changed_config(lab_run, monkeypatch):
    cfg, _ = lab_run
    monkeypatch.setattr(stage_plan, "_lab_hash", lambda c: "0123456789abcdef")  # e.g. a new release's corpus
    with pytest.raises(ConfigError, match="base.lab_model: '[0-9a-f]{16}' -> '0123456789abcdef'"):
        stage_plan.plan(cfg)


def test_a_foreign_folder_is_never_overwritten(tmp_path):
    from cai_lite.lab import pretrain

    folder = tmp_path / "runs" / "_models" / "lab"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a lab model folder"):
        pretrain.build_lab_model(folder, seed=0, size="ci")
    assert (folder / "config.json").read_text() == "{}"


def test_oracle_needs_a_lab_model(tmp_path, tiny_llama):
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", f"base.model={tiny_llama}",
                       "base.create=none", "stages=[evaluate]", "evaluate.oracle=lab"])
    from cai_lite.stages import evaluate

    assert any("evaluate.oracle=lab" in e and "lab_world.json" in e for e in evaluate.check(cfg))
    with pytest.raises(ConfigError, match="no lab_world.json"):
        pipeline.preflight(cfg, {"evaluate": "run"})
