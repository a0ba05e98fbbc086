"""Multi-process training: sft under `torchrun --nproc_per_node 2` on CPU (gloo); reward_model's own
loop on 2 processes equals 1 process with twice the batch; the stages that refuse to run multi-process.

The 2-process run goes through tests/ddp_worker.py, the real command with observers: the batches
each rank trained on, its LoRA weights in memory, and every write it made under the run dir.

    python -m pytest -q tests/test_multi_process.py
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cai_lite import distributed, pipeline
from cai_lite.typed_yaml import ConfigError

from conftest import ROOT, tiny_config

SMALL = ["critique_revise.rounds=1", "data.limit=6", "critique_revise.helpful_limit=2"]
# LoRA dropout on, so a resumed run matches only if each rank gets its own random generators back.
SFT = ["stages=[critique_revise,sft]", *SMALL, "sft.max_steps=3", "sft.batch_size=2", "sft.save_every=2",
       "lora.dropout=0.2"]


def torchrun_sft(run, model, report, exit_at_step: int = 0) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2` of tests/ddp_worker.py (the real command, observed) on `run`."""
    report.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CAI_LITE_TEST_REPORT": str(report),
           "CAI_LITE_TEST_RUN": str(run), "CAI_LITE_TEST_EXIT_AT_STEP": str(exit_at_step)}
    # critique_revise is selected but done: a skipped stage is no reason to refuse the launch.
    args = ["recipe=tiny_cpu", f"run_dir={run}", f"base.model={model}", "base.create=none", *SFT]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "ddp_worker.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_llama):
    """critique_revise in one process (it generates), then sft on two, uninterrupted."""
    root = tmp_path_factory.mktemp("ddp")
    pipeline.run(tiny_config(root / "run", tiny_llama, "stages=[critique_revise]", *SMALL))
    shutil.copytree(root / "run", root / "fresh")  # for the interrupted run
    proc = torchrun_sft(root / "run", tiny_llama, root / "report")
    assert proc.returncode == 0, proc.stderr[:3000]
    return root, proc


def test_sft_on_two_processes_trains_both_and_only_rank_0_writes(sft_run):
    root, proc = sft_run
    run, report = root / "run", root / "report"
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [torch.load(report / f"rank{r}.pt") for r in (0, 1)]

    # Both trained, each step on its own rows: TRL's sampler gives each rank a different shard, and
    # in the first epoch (2 steps x 2 rows x 2 ranks) the two shards together are the 8 train rows.
    stage = json.loads((run / "sft" / "stage.json").read_text())
    assert stage["processes"] == 2 and stage["steps"] == 3 and stage["train_rows"] == 8
    steps = [r["batches"] for r in ranks]
    assert len(steps[0]) == len(steps[1]) == 3
    for b0, b1 in zip(*steps):
        assert len(b0) == len(b1) == 2 and not set(b0) & set(b1)
    assert len({h for r in steps for b in r[:2] for h in b}) == 8

    # DDP averaged the gradients: both ranks end with the same, trained weights, and the saved adapter is them.
    saved = load_file(run / "sft" / "adapter" / "adapter_model.safetensors")
    assert set(saved) == set(weights[0]["after"]) == set(weights[1]["after"])
    for k, v in saved.items():
        assert torch.equal(weights[0]["after"][k], v) and torch.equal(weights[1]["after"][k], v)
    assert any(not torch.equal(weights[0]["before"][k], v) for k, v in saved.items())

    # Only rank 0 touched the run dir; one stage.json, one TensorBoard file, one summary, no checkpoint left.
    assert ranks[1]["writes"] == []
    assert any("sft/stage.json" in w for w in ranks[0]["writes"])  # the observer does see rank 0's writes
    assert len(list(run.rglob("stage.json"))) == 2  # critique_revise's, from before, and sft's
    assert len(list((run / "sft" / "tensorboard").iterdir())) == 1
    assert not (run / "sft" / "checkpoint").exists()
    # The checkpoint at step 2 held each rank's random generators under transformers' names, so a
    # resumed Trainer restores each rank's own.
    assert len(ranks[0]["checkpoints"]) == 1
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "scheduler.pt", "trainer_state.json", "state.json",
            "adapters/sft/adapter_model.safetensors"} <= set(ranks[0]["checkpoints"][0])
    assert len((run / "sft" / "train_log.jsonl").read_text().splitlines()) == 4  # 3 steps + the summary line
    assert proc.stdout.count(f"run: {run}") == 1 and "sft " in proc.stdout


@pytest.mark.parametrize("overrides, named", [
    (["stages=[critique_revise,sft]"], ["stages: critique_revise "]),
    (["stages=[critique_revise,sft,label_preferences,reward_model,ppo,rloo,dpo,evaluate,export]"],
     ["stages: critique_revise ", "stages: label_preferences ", "stages: ppo ", "stages: evaluate ", "stages: export "]),
    (["stages=[critique_revise,sft]", "base.device=cuda:0"], ["base.device: cuda:0 ", "stages: critique_revise "]),
])
def test_stages_that_cannot_run_multi_process_are_refused_before_any_model_loads(
        fake_stages, monkeypatch, tmp_path, overrides, named):
    seen, base = fake_stages
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "start", lambda device: None)  # the refusal comes before any collective call
    cfg = tiny_config(tmp_path / "run", tmp_path / "model", *overrides, *base)
    with pytest.raises(ConfigError) as e:
        pipeline.run(cfg)
    assert [line[:len(n)] for line, n in zip(e.value.errors, named)] == named and len(e.value.errors) == len(named)
    text = "\n".join(e.value.errors)
    if "critique_revise" in text or "evaluate" in text:
        assert "generation.backend=openai" in text
    if "stages: ppo" in text:
        assert "ppo is single-process" in text and "rloo or dpo" in text
    assert "cfg" not in seen and not (tmp_path / "run").exists()  # no model loaded, nothing written


def _reward_model_process(rank: int, port: int, run, batch_size: int) -> None:
    """One of two processes training the stubbed reward model (test_reward_model_steps' one weight)."""
    from test_reward_model_steps import BASE, stubbed

    from cai_lite.stages import reward_model

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.start("cpu")
    stage = stubbed(run, batch_size, pytest.MonkeyPatch())
    reward_model.run(stage.cfg, BASE, run / "reward_model")
    torch.save(stage.w.detach(), run / f"w{rank}.pt")  # outside the stage's folder
    distributed.stop()


def test_reward_model_on_two_processes_equals_one_process_with_twice_the_batch(tmp_path, monkeypatch):
    from test_reward_model_steps import BASE, _rows, stubbed

    from cai_lite import data
    from cai_lite.stages import reward_model

    runs = {}
    for name in ("one", "two"):
        runs[name] = tmp_path / name
        (runs[name] / "label_preferences").mkdir(parents=True)
        data.write_shard(data.shard_path(runs[name] / "label_preferences", 0), _rows(13))
    stage = stubbed(runs["one"], 2, monkeypatch)
    one = reward_model.run(stage.cfg, BASE, runs["one"] / "reward_model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_reward_model_process, args=(port, runs["two"], 1), nprocs=2)
    w0, w1 = (torch.load(runs["two"] / f"w{r}.pt") for r in (0, 1))
    # Each step: 1 pair per process, gradients summed (each loss weighted by its half) = 2 pairs in one process.
    assert torch.equal(w0, w1) and w0.item() == pytest.approx(stage.w.item(), abs=1e-6) and w0.item() > 0
    log = lambda run: [json.loads(x)["loss"] for x in (run / "reward_model" / "log.jsonl").read_text().splitlines()]
    assert log(runs["two"]) == pytest.approx(log(runs["one"]), abs=1e-6) and len(log(runs["one"])) == 10
    assert one["train_pairs"] == 10
    assert len(list((runs["two"] / "reward_model" / "tensorboard").iterdir())) == 1  # rank 0's alone


def test_sft_killed_on_two_processes_resumes_to_the_uninterrupted_weights(sft_run, tiny_llama):
    root, _ = sft_run
    run = root / "fresh"
    killed = torchrun_sft(run, tiny_llama, root / "killed", exit_at_step=3)  # both ranks die after step 3
    assert killed.returncode != 0 and (run / "sft" / "checkpoint" / "rng_state_1.pth").is_file()
    resumed = torchrun_sft(run, tiny_llama, root / "resumed")
    assert resumed.returncode == 0, resumed.stderr[:3000]
    assert json.loads((run / "sft" / "stage.json").read_text())["resumed_from_step"] == 2
    want = load_file(root / "run" / "sft" / "adapter" / "adapter_model.safetensors")
    got = load_file(run / "sft" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in want.items())
