"""A new user's first runs, done as the user does them: the README names every download a shipped
recipe needs; a recipe whose files are missing stops with one error that lists each of them with
the command that fetches it (or the key that does without it), before any model loads and with
nothing written, and `plan=true` / `--plan true` list the same; a device this torch lacks is one
line there too. The CLI: `--version`, examples in `--help`, TRL's names pointed at ours, a quiet
terminal with the libraries' chatter in run.log, and a rounded summary.

    python -m pytest -q tests/test_first_run.py
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cai_lite import cli, downloads, pipeline, rundir
from cai_lite.config import RECIPES, SHIPPED, Config
from cai_lite.recipe import load_config
from cai_lite.typed_yaml import ConfigError, all_keys

from conftest import ROOT

# The inputs a recipe names that are not shipped with cai_lite (the keys whose files a run reads).
INPUT_KEYS = ("data.prompts", "label_preferences.prompts", "ppo.prompts", "rloo.prompts", "evaluate.prompts",
              "evaluate.hhh_path", "evaluate.harmful_vs_ethical_path")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cai_lite", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _value(cfg: Config, key: str) -> str:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _downloads(recipe: str) -> list[str]:
    """The fetch command of every input of `recipe` that is not shipped (its model included)."""
    cfg = load_config([f"recipe={recipe}"])
    if cfg.base.create != "none":  # the tiny and lab models are built, and the lab's prompts with them
        return []
    paths = [p for p in (_value(cfg, k) for k in INPUT_KEYS) if p and not Path(p).is_relative_to(SHIPPED)]
    return [downloads.model_command(cfg.base.model)] + [downloads.command(p) for p in paths]


def test_the_readme_names_every_download_a_shipped_recipe_needs():
    readme = (ROOT / "README.md").read_text()
    commands = [c for p in sorted(RECIPES.glob("*.yaml")) for c in _downloads(p.stem)]
    assert len(commands) >= 4  # 7b_qlora: the model, the red-team prompts and the two paper evals
    for command in commands:
        assert command is not None and command in readme, command


def test_missing_inputs_are_one_error_listing_each_with_its_fetch_command(tmp_path):
    """`cai-lite recipe=7b_qlora` before any download: every missing file at once, exit 2, nothing written."""
    r = _cli("recipe=7b_qlora", "base.device=cpu", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    want = [
        "base.model: no folder models/Qwen2.5-7B-Instruct. cai_lite reads a local model folder and never downloads; "
        "fetch the model first: hf download Qwen/Qwen2.5-7B-Instruct --local-dir models/Qwen2.5-7B-Instruct, then set "
        "base.model to that folder",
        "data.prompts: data/hh-rlhf/harmless-base/train.jsonl.gz: no such file; fetch it: hf download Anthropic/hh-rlhf "
        "harmless-base/train.jsonl.gz --repo-type dataset --local-dir data/hh-rlhf",
        "evaluate.hhh_path: data/anthropic-cai-paper/438HHHEvaluations.jsonl: no such file; fetch it: curl -L "
        "--create-dirs -o data/anthropic-cai-paper/438HHHEvaluations.jsonl "
        f"{downloads.PAPER}/evals/438HHHEvaluations.jsonl; or set evaluate.hhh_path= to skip that eval",
        "evaluate.harmful_vs_ethical_path: data/anthropic-cai-paper/HarmfulVsEthical.jsonl: no such file; fetch it: "
        "curl -L --create-dirs -o data/anthropic-cai-paper/HarmfulVsEthical.jsonl "
        f"{downloads.PAPER}/evals/HarmfulVsEthical.jsonl; or set evaluate.harmful_vs_ethical_path= to skip that eval",
    ]
    assert r.stderr.splitlines() == ["cai_lite: 4 problem(s), nothing was run:"] + [f"  - {line}" for line in want]
    assert list(tmp_path.iterdir()) == []  # no runs/, no config.yaml, no model folder
    # The dry run lists the same, after its memory table, whichever way the flag is spelled.
    r = _cli("recipe=7b_qlora", "--plan", "true", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout.startswith("memory plan: qwen2.5-7b") and "every stage fits" in r.stdout
    assert r.stderr.splitlines()[1:] == [f"  - {line}" for line in want]  # and no device check: plans travel
    assert list(tmp_path.iterdir()) == []


def test_a_device_this_torch_lacks_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # tiny_cpu would build its model under ./runs/_models
    cuda = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ConfigError) as e:
        pipeline.run(load_config(["recipe=tiny_cpu", "run_dir=run", "stages=[critique_revise]", f"base.device={cuda}"]))
    (line,) = e.value.errors
    if torch.cuda.is_available():
        assert line.startswith(f"base.device={cuda}: this machine has {torch.cuda.device_count()} GPU(s)")
    else:
        assert line == (f"base.device=cuda: this torch ({torch.__version__}) was built without CUDA; set "
                        "base.device=cpu (or auto), or install the torch build for your CUDA")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError) as e:
        load_config(["recipe=tiny_cpu", "base.device=gpu"])
    assert e.value.errors == ["base.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"]


def test_version_names_the_package_and_the_commit(tmp_path):
    r = _cli("--version", cwd=tmp_path)
    assert r.returncode == 0
    commit = rundir.git_commit()
    want = f"cai_lite {md.version('cai_lite')}" + (f" (git {commit[:12]})" if commit else "")
    assert r.stdout.strip() == want
    if (ROOT / ".git").exists():  # a checkout: the commit is the checkout's HEAD
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert commit == head


def test_help_ends_with_examples(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    examples = text[text.index("\nexamples:\n"):]
    for shown in ("cai-lite  ", "recipe=tiny_cpu  ", "base.model=models/Qwen2.5-7B-Instruct", "plan=true",
                  "Ctrl-C", "force=[sft]", "sft.lr=1e-4"):
        assert shown in examples, shown


def test_trl_names_point_to_ours_and_are_no_aliases(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(["learning_rate=1e-4", "--per_device_train_batch_size", "2", "sft.learning_rate=1",
                     "--gradient-accumulation-steps", "4", "dpo.num_train_epochs=1", "output_dir=x",
                     "model_name_or_path=y", "resume_from_checkpoint=true"])
    assert e.value.errors == [
        "learning_rate: no such key (did you mean sft.lr, reward_model.lr, ppo.lr, rloo.lr or dpo.lr? each stage "
        "has its own)",
        "per_device_train_batch_size: no such key (did you mean sft.batch_size, reward_model.batch_size, "
        "ppo.batch_size, rloo.batch_size or dpo.batch_size? each stage has its own)",
        "sft.learning_rate: no such key (did you mean sft.lr?)",
        "gradient_accumulation_steps: no such key (did you mean sft.grad_accum, ppo.grad_accum or dpo.grad_accum? "
        "each stage has its own)",
        "dpo.num_train_epochs: no such key (did you mean dpo.epochs?)",
        "output_dir: no such key (did you mean run_dir?)",
        "model_name_or_path: no such key (did you mean base.model?)",
        "resume_from_checkpoint: no such key (rerun the same command to resume: finished stages are skipped and "
        "training continues from <stage>/checkpoint/; force=[stage] starts a stage over)"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults: tiny_cpu\nsft:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config([f"recipe={recipe}"])
    assert e.value.errors == ["sft.learning_rate: no such key (did you mean sft.lr?)"]
    keys = set(all_keys(Config))
    assert all(k in keys for v in Config.OTHER_NAMES.values() if isinstance(v, list) for k in v)


def test_the_summary_rounds_and_export_reads_as_a_line():
    cfg = load_config(["recipe=tiny_cpu", "run_dir=/nonexistent/run"])
    written = "model-f16.gguf (0.3 MB), hf/ and Modelfile in runs/x/export (adapter ppo)"
    table = pipeline.summary(cfg, {"sft": {"seconds": 1.0, "peak_memory_mb": 600, "loss_last": 5.988945960998535},
                                   "label_preferences": {"seconds": 1.0, "peak_memory_mb": 600, "labels": 4},
                                   "export": {"seconds": 1.0, "peak_memory_mb": 600, "written": written}})
    assert table.splitlines()[2:] == ["sft                     1.0      600  loss_last=5.989",
                                      "label_preferences       1.0      600  labels=4",
                                      f"export                  1.0      600  {written}"]


def test_a_first_run_is_quiet_and_its_log_file_keeps_the_rest(tmp_path, tiny_llama):
    """stdout: the summary alone; stderr: our lines and one bar per stage; run.log: the libraries' notes."""
    r = _cli("recipe=tiny_cpu", f"base.model={tiny_llama}", "base.create=none", "run_dir=run",
             "stages=[critique_revise,sft,label_preferences,dpo,export]", "data.limit=4", "critique_revise.rounds=1",
             "critique_revise.helpful_limit=2", "sft.max_steps=2", "label_preferences.max_prompts=2",
             "label_preferences.num_principles=1", "dpo.max_steps=1", "export.adapter=dpo", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[:2] == ["run: run", "stage               seconds  peak MB  result"] and len(out) == 8, r.stdout
    assert [line.split()[0] for line in out[2:7]] == ["critique_revise", "sft", "label_preferences", "dpo", "export"]
    assert len(out[3].split("loss_last=")[1]) <= 6  # 4 significant digits
    assert out[6].endswith(", hf/ and Modelfile in run/export (adapter dpo)") and " model-f16.gguf (" in out[6]
    assert out[7].endswith("warning(s) from the libraries (deprecations and the like) are in run/run.log")
    for chatter in ("{'loss'", "gemm_4bit_forward", "FutureWarning", "Tokenizing", "Loading weights"):
        assert chatter not in r.stdout + r.stderr, chatter
    bars = {line.split(":")[0].split("\r")[-1] for line in r.stderr.replace("\r", "\n").splitlines() if "it/s]" in line}
    assert {"sft", "dpo"} <= bars
    log = (tmp_path / "run" / "run.log").read_text()
    assert "cai_lite.pipeline INFO: start" in log and "py.warnings WARNING" in log
