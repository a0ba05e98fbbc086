"""Resumable training: sft, reward_model, ppo, rloo and dpo checkpoint every `save_every` steps, and a
rerun after a kill ends with exactly the adapter an uninterrupted run ends with.

sft and ppo are killed for real (SIGKILL to `run.py` once a checkpoint is on disk); reward_model,
rloo and dpo are stopped in-process by a KeyboardInterrupt (what Ctrl-C raises) one step after their
first checkpoint. The upstream stages run once per module on the tiny model.

    python -m pytest tests/test_training_resume.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cai_lite import checkpoint, pipeline

from conftest import ROOT, tiny_config

# Few forward passes: on CPU each NF4 matmul dequantizes its weight, so time goes by passes, not by width.
SMALL = ["data.limit=4", "critique_revise.rounds=1", "critique_revise.helpful_limit=2", "generation.max_new_tokens=4",
         "sft.max_steps=2", "sft.batch_size=2", "label_preferences.max_prompts=4", "reward_model.epochs=1",
         "reward_model.batch_size=2", "ppo.steps=4", "ppo.batch_size=2", "ppo.minibatch_size=2", "ppo.ppo_epochs=1",
         "ppo.max_new_tokens=4", "rloo.steps=3", "rloo.batch_size=2", "rloo.max_new_tokens=4"]
UPSTREAM = ("critique_revise", "sft", "label_preferences", "reward_model")


@pytest.fixture(scope="module")
def upstream(tiny_llama, tmp_path_factory) -> Path:
    """A run dir with every stage the training stages read, done once."""
    run = tmp_path_factory.mktemp("upstream") / "run"
    pipeline.run(tiny_config(run, tiny_llama, f"stages=[{','.join(UPSTREAM)}]", *SMALL))
    return run


def _copy_inputs(upstream: Path, run: Path, stage: str) -> None:
    """The same finished inputs in a new run dir, so runs differ only in being interrupted or not."""
    for name in UPSTREAM[:UPSTREAM.index(stage)] if stage in UPSTREAM else UPSTREAM:
        shutil.copytree(upstream / name, run / name)


def _weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    folder = run / stage / "adapter"
    out = load_file(folder / "adapter_model.safetensors")
    if (folder / "head.safetensors").is_file():
        out.update({f"head.{k}": v for k, v in load_file(folder / "head.safetensors").items()})
    return out


def _assert_equal(resumed: dict, straight: dict) -> None:
    assert resumed.keys() == straight.keys()
    diff = max((resumed[k] - straight[k]).abs().max().item() for k in resumed)
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed), f"max abs diff {diff}"


def _losses(path: Path, key: str) -> list[float]:
    return [row[key] for row in map(json.loads, path.read_text().splitlines()) if key in row]


def _kill_after_checkpoint(args: list[str], out: Path) -> int:
    """Start run.py; SIGKILL its process group once `out` holds a checkpoint; return the exit status."""
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (out / "checkpoint" / "state.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, f"run.py exited with {proc.returncode} before it was killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # it did not stop: do not leave it running after the test
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "stage.json").exists(), "the stage finished before the kill; the test proved nothing"
    return proc.returncode


@pytest.mark.parametrize("stage, overrides, log", [
    ("sft", ["sft.max_steps=6", "sft.save_every=2"], ("train_log.jsonl", "loss")),
    ("ppo", ["ppo.save_every=1"], ("log.jsonl", "reward")),
])
def test_kill_and_rerun_gives_the_uninterrupted_weights(tmp_path, tiny_llama, upstream, stage, overrides, log):
    common = [f"stages=[{stage}]", *SMALL, *overrides]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    _copy_inputs(upstream, killed, stage)
    _copy_inputs(upstream, straight, stage)
    args = ["recipe=tiny_cpu", f"run_dir={killed}", f"base.model={tiny_llama}", "base.create=none", *common]
    assert _kill_after_checkpoint(args, killed / stage) == -signal.SIGKILL
    assert checkpoint.folder(killed / stage) is not None
    result = pipeline.run(tiny_config(killed, tiny_llama, *common))  # the same command again
    assert result[stage]["resumed_from_step"] >= 1
    assert not list((killed / stage).glob("checkpoint*")), "the checkpoint outlived the finished stage"
    pipeline.run(tiny_config(straight, tiny_llama, *common))
    _assert_equal(_weights(killed, stage), _weights(straight, stage))
    assert _losses(killed / stage / log[0], log[1]) == _losses(straight / stage / log[0], log[1])


class _Interrupt:
    """checkpoint.save, except that its second call raises KeyboardInterrupt (as Ctrl-C would) before
    writing: the run stops one step after its first checkpoint, which a rerun must redo."""

    def __init__(self, monkeypatch):
        self.calls, self.real = 0, checkpoint.save
        monkeypatch.setattr(checkpoint, "save", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("stage, overrides", [
    ("reward_model", ["reward_model.epochs=2", "reward_model.save_every=1"]),
    ("rloo", ["rloo.save_every=1"]),
    ("dpo", ["dpo.max_steps=3", "dpo.save_every=1", "dpo.batch_size=2"]),
])
def test_interrupted_stage_resumes_to_the_uninterrupted_weights(tmp_path, tiny_llama, upstream, monkeypatch, stage,
                                                                overrides):
    common = [f"stages=[{stage}]", *SMALL, *overrides]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    _copy_inputs(upstream, stopped, stage)
    _copy_inputs(upstream, straight, stage)
    interrupt = _Interrupt(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(tiny_config(stopped, tiny_llama, *common))
    assert checkpoint.steps_done(checkpoint.folder(stopped / stage)) == 1
    assert not (stopped / stage / "stage.json").exists()
    monkeypatch.setattr(checkpoint, "save", interrupt.real)
    # A different save_every is no other config: the run still resumes.
    result = pipeline.run(tiny_config(stopped, tiny_llama, *common, f"{stage}.save_every=0"))
    assert result[stage]["resumed_from_step"] == 1
    pipeline.run(tiny_config(straight, tiny_llama, *common))
    _assert_equal(_weights(stopped, stage), _weights(straight, stage))
    log = "log.jsonl"
    key = {"reward_model": "loss", "rloo": "reward_raw", "dpo": "loss"}[stage]
    assert _losses(stopped / stage / log, key) == _losses(straight / stage / log, key)


def test_a_changed_config_starts_over(tmp_path, tiny_llama, upstream, monkeypatch):
    run = tmp_path / "run"
    _copy_inputs(upstream, run, "reward_model")
    common = ["stages=[reward_model]", *SMALL, "reward_model.epochs=2", "reward_model.save_every=1"]
    _Interrupt(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(tiny_config(run, tiny_llama, *common))
    monkeypatch.undo()
    result = pipeline.run(tiny_config(run, tiny_llama, *common, "reward_model.lr=5e-4"))
    assert result["reward_model"]["resumed_from_step"] == 0
