"""No network unless asked: importing cai_lite turns the hub libraries offline and their telemetry
off, base.model must be a local folder (or a tiny model built in its one place), and the tiny
pipeline opens no socket at all.

    python -m pytest tests/test_offline.py -q
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from cai_lite import OFFLINE_ENV, pipeline
from cai_lite.recipe import load_config
from cai_lite.typed_yaml import ConfigError


def _hub_flags(**env) -> list[str]:
    """huggingface_hub's offline and telemetry switches in a fresh process that imports cai_lite first."""
    clean = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV and k not in ("DO_NOT_TRACK", "DISABLE_TELEMETRY")}
    probe = "import cai_lite, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE, c.HF_HUB_DISABLE_TELEMETRY)"
    r = subprocess.run([sys.executable, "-c", probe], env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_importing_cai_lite_turns_the_hub_offline_and_telemetry_off():
    assert _hub_flags() == ["True", "True"]
    assert _hub_flags(HF_HUB_OFFLINE="0") == ["False", "True"]  # a user who wants the hub can say so


def _refused(tmp_path, *args):
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "stages=[critique_revise]", *args])
    with pytest.raises(ConfigError) as e:
        pipeline.run(cfg)
    assert not (tmp_path / "run").exists()  # refused before any work
    return e.value.errors


def test_a_hub_id_is_one_clear_error_before_any_work(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    (msg,) = _refused(tmp_path, "base.model=Qwen/Qwen2.5-7B-Instruct", "base.create=none")
    assert msg.startswith("base.model: no folder Qwen/Qwen2.5-7B-Instruct") and "never downloads" in msg
    assert "hf download Qwen/Qwen2.5-7B-Instruct --local-dir models/Qwen2.5-7B-Instruct" in msg
    (msg,) = _refused(tmp_path, "base.model=Qwen/Qwen2.5-7B-Instruct")  # tiny_cpu sets base.create
    assert "builds a model only at runs/_models/tiny-llama" in msg and not (tmp_path / "Qwen").exists()
    assert no_network == []


def test_a_mistyped_model_folder_is_never_built_or_fetched(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.chdir(tmp_path)
    (msg,) = _refused(tmp_path, "base.model=runs/_models/tiny-lama")  # typo; base.create=tiny-llama
    assert "base.model: no folder runs/_models/tiny-lama" in msg and not (tmp_path / "runs").exists()
    (msg,) = _refused(tmp_path, "base.model=models/tiny-llama")
    assert "base.create=tiny-llama builds a model only at runs/_models/tiny-llama" in msg
    # With base.create=none, a near miss of a real model folder is pointed out.
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(tiny_llama, models / "tiny-llama")
    (msg,) = _refused(tmp_path, "base.model=models/tiny-lama", "base.create=none")
    assert "(did you mean models/tiny-llama?)" in msg and "hf download ORG/NAME" in msg
    (tmp_path / "empty").mkdir()
    (msg,) = _refused(tmp_path, "base.model=empty", "base.create=none")
    assert msg == "base.model: empty has no config.json, so it is not a Hugging Face model folder"
    # What is allowed: an existing model folder, or a missing one in the place base.create builds in.
    assert pipeline.check_base(load_config(["base.model=models/tiny-llama", "base.create=none"])) == []
    assert pipeline.check_base(load_config(["recipe=tiny_cpu"])) == []
    assert pipeline.check_base(load_config(["base.model=runs/_models/tiny-qwen2-b", "base.create=tiny-qwen2"])) == []


def test_the_tiny_pipeline_opens_no_socket(tmp_path, monkeypatch, no_network):
    """Every stage that drives a TRL trainer (sft, rloo, dpo: each reports telemetry unless told not
    to), with the tiny model built on the spot, under a guard that records any lookup or connection."""
    with pytest.raises(OSError):
        socket.create_connection(("huggingface.co", 443), timeout=1)  # the guard is on
    assert no_network == [("getaddrinfo", "huggingface.co")]
    no_network.clear()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["recipe=tiny_cpu", "stages=[critique_revise,sft,label_preferences,reward_model,rloo,dpo]",
                       "data.limit=4", "data.eval_prompts=2", "critique_revise.rounds=1", "critique_revise.helpful_limit=2",
                       "sft.max_steps=2", "label_preferences.max_prompts=4", "label_preferences.num_principles=1",
                       "reward_model.epochs=1", "rloo.steps=1", "rloo.batch_size=2", "rloo.max_new_tokens=8",
                       "dpo.max_steps=1", "dpo.batch_size=2"])
    results = pipeline.run(cfg)
    assert set(results) == {"critique_revise", "sft", "label_preferences", "reward_model", "rloo", "dpo"}
    assert (tmp_path / "runs" / "_models" / "tiny-llama" / "config.json").is_file()
    assert no_network == []
