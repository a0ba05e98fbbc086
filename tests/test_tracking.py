"""`report_to` in every training stage: sft, rloo and dpo (TRL's trainers) and reward_model and ppo
(our loops) hand the same scalars, at the same steps, counted from 1, to each integration that
transformers ships: TensorBoard's event files, a stand-in integration that records what it is
given (the plumbing, with no tracking package needed), and wandb's offline run files
(`WANDB_MODE=offline`, read back with wandb's own `wandb leet inspect`; skipped where wandb is not
installed). One tiny run serves them all.

    python -m pytest -q tests/test_tracking.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerCallback
from transformers.integrations import integration_utils

from cai_lite import pipeline
from cai_lite.typed_yaml import ConfigError

from conftest import tiny_config

TRAINING = ("sft", "reward_model", "ppo", "rloo", "dpo")
SMALL = ["data.limit=4", "critique_revise.rounds=1", "critique_revise.helpful_limit=2", "sft.max_steps=3",
         "label_preferences.max_prompts=4", "label_preferences.num_principles=1", "reward_model.batch_size=1",
         "ppo.steps=2", "ppo.batch_size=4", "ppo.max_new_tokens=4", "rloo.steps=2", "rloo.batch_size=2",
         "rloo.max_new_tokens=4", "dpo.max_steps=2"]
# Trainer's end-of-training totals: WandbCallback keeps them in the run's summary, not its history.
SUMMARY_ONLY = {"train/train_runtime", "train/train_samples_per_second", "train/train_steps_per_second",
                "train/train_loss", "train/total_flos"}
HAS_WANDB = integration_utils.is_wandb_available()


class Recorder(TrainerCallback):
    """A report_to integration standing in for trackio: records the (key, step) of every scalar."""

    seen: dict[str, list[tuple[str, int]]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.run = args.run_name
        Recorder.seen.setdefault(self.run, [])

    def on_log(self, args, state, control, logs=None, **kwargs):
        scalars = [k for k, v in integration_utils.rewrite_logs(logs).items() if isinstance(v, (int, float))]
        Recorder.seen[self.run] += [(k, state.global_step) for k in scalars]


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    """Every training stage once, reporting to TensorBoard, the Recorder (as trackio) and wandb offline."""
    tmp = tmp_path_factory.mktemp("tracking")
    mp = pytest.MonkeyPatch()
    mp.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "trackio", Recorder)
    mp.setattr(integration_utils, "is_trackio_available", lambda: True)
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true",
                       "WANDB_PROJECT": "cai_lite-test"}.items():
        mp.setenv(key, value)
    report = "[tensorboard,trackio,wandb]" if HAS_WANDB else "[tensorboard,trackio]"
    cfg = tiny_config(tmp / "run", tiny_llama, f"stages=[critique_revise,sft,label_preferences,{','.join(TRAINING)}]",
                      f"report_to={report}", *SMALL)
    try:
        pipeline.run(cfg)
    finally:
        mp.undo()
    return cfg.path, tmp


def _tensorboard(stage_dir: Path) -> list[tuple[str, int]]:
    events = EventAccumulator(str(stage_dir / "tensorboard")).Reload()
    return sorted((tag, e.step) for tag in events.Tags()["scalars"] for e in events.Scalars(tag))


def test_every_training_stage_counts_its_steps_from_1(run):
    path, _ = run
    for stage in TRAINING:
        scalars = _tensorboard(path / stage)
        loss = "train/reward" if stage in ("ppo", "rloo") else "train/loss"
        steps = [s for tag, s in scalars if tag == loss]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2, (stage, scalars)
        if stage in ("reward_model", "ppo"):  # our loops' own logs number steps as Trainer's do
            log = [json.loads(line) for line in (path / stage / "log.jsonl").read_text().splitlines()]
            assert [h["step"] for h in log] == steps, stage


def test_each_integration_gets_what_tensorboard_gets(run):
    path, _ = run
    for stage in TRAINING:
        tensorboard = [x for x in _tensorboard(path / stage) if x[0] not in SUMMARY_ONLY]
        got = sorted(x for x in Recorder.seen[f"{path.name}/{stage}"] if x[0] not in SUMMARY_ONLY)
        assert got == tensorboard, stage


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install wandb, or the dev extra)")
def test_wandb_offline_files_hold_the_tensorboard_scalars_at_the_same_steps(run):
    path, tmp = run
    leet = Path(sys.executable).with_name("wandb")
    leet = str(leet) if leet.exists() else shutil.which("wandb")
    runs = {}
    for log in sorted(tmp.glob("wandb/offline-run-*/run-*.wandb")):  # one wandb run per stage
        out = subprocess.run([leet, "leet", "inspect", "--json", str(log)], capture_output=True, text=True, timeout=120)
        records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        name = next(r["run"]["display_name"] for r in records if r.get("type") == "run")
        runs[name] = sorted((k, item["train/global_step"]) for r in records if r.get("type") == "history"
                            for item in [r["history"]["item"]] for k in item
                            if not k.startswith("_") and k != "train/global_step")
    assert sorted(runs) == sorted(f"{path.name}/{stage}" for stage in TRAINING)
    for stage in TRAINING:
        tensorboard = [x for x in _tensorboard(path / stage) if x[0] not in SUMMARY_ONLY]
        assert runs[f"{path.name}/{stage}"] == tensorboard, stage
        assert tensorboard[0][1] >= 1 and any(tag == "train/loss" or tag == "train/reward" for tag, _ in tensorboard)


def test_a_missing_integration_is_one_error_before_any_model_loads(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(integration_utils, "is_mlflow_available", lambda: False)
    cfg = tiny_config(tmp_path / "run", tiny_llama, "stages=[critique_revise,sft]", "report_to=[tensorboard,mlflow]")
    with pytest.raises(ConfigError) as e:
        pipeline.run(cfg)
    assert "report_to: mlflow is not installed (pip install mlflow, or pip install 'cai_lite[tracking]' for wandb, " \
           "mlflow and trackio)" in e.value.errors
    assert not (tmp_path / "run").exists()
