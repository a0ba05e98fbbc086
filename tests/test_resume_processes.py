"""Resuming a checkpoint under another number of processes, and the random generators a checkpoint
gives back to each process:
  - reward_model's own loop records the first pair not yet trained on, so a run killed on one process
    and resumed on two trains every pair of every epoch exactly once (stubbed one-weight model);
  - a Trainer checkpoint (sft, rloo, dpo) made by another number of processes is refused before any
    model loads, naming both numbers and force=; the same number resumes;
  - under torchrun/accelerate the CUDA generators of every device are saved in the layout
    transformers' Trainer resumes from (set_rng_state_all), checked with faked CUDA devices.

    python -m pytest -q tests/test_resume_processes.py
"""

from __future__ import annotations

import json
import random
import socket
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from test_reward_model_steps import BASE, _rows, stubbed
from transformers import Trainer
from transformers.training_args import ParallelMode

from cai_lite import adapter_files, checkpoint, data, distributed, pipeline
from cai_lite.recipe import load_config
from cai_lite.stages import reward_model
from cai_lite.typed_yaml import ConfigError


def _observed(run, monkeypatch, stop_after: int = 0) -> SimpleNamespace:
    """The stubbed reward model of test_reward_model_steps, checkpointing every 6 steps, with its
    weight saved and restored through the checkpoint, recording the pairs of each training step, and
    stopping (as Ctrl-C does) before step `stop_after` + 1 when it is > 0."""
    stage = stubbed(run, 2, monkeypatch)
    stage.cfg.reward_model.save_every = 6
    trained: list[list[str]] = []
    scores = reward_model.pair_scores

    def pair_scores(b, chunk, n):
        if stage.roles[-1]:  # training, not the held-out evaluation
            if len(trained) == stop_after > 0:
                raise KeyboardInterrupt
            trained.append([r["response_a"] for r in chunk])
        return scores(b, chunk, n)

    def save_adapter(b, name, folder):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(stage.w.detach().clone(), folder / "w.pt")

    monkeypatch.setattr(reward_model, "pair_scores", pair_scores)
    monkeypatch.setattr(adapter_files, "save_adapter", save_adapter)
    monkeypatch.setattr(adapter_files, "fill_adapter", lambda b, name, folder: stage.w.data.copy_(torch.load(folder / "w.pt")))
    stage.trained = trained
    return stage


def _resume_on_two(rank: int, port: int, run) -> None:
    distributed_env = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port))
    mp = pytest.MonkeyPatch()
    for k, v in distributed_env.items():
        mp.setenv(k, v)
    mp.setattr(BASE, "device", torch.device("cpu"), raising=False)  # where the checkpoint's optimizer goes
    distributed.start("cpu")
    stage = _observed(run, mp)
    metrics = reward_model.run(stage.cfg, BASE, run / "reward_model")
    (run / f"trained{rank}.json").write_text(json.dumps({"steps": stage.trained, "resumed": metrics["resumed_from_step"]}))
    distributed.stop()


def test_reward_model_killed_on_one_process_resumes_on_two_without_skipping_a_pair(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "label_preferences").mkdir(parents=True)
    data.write_shard(data.shard_path(run / "label_preferences", 0), _rows(50))  # 10 held out, 40 to train on
    one = _observed(run, monkeypatch, stop_after=7)
    with pytest.raises(KeyboardInterrupt):
        reward_model.run(one.cfg, BASE, run / "reward_model")
    assert checkpoint.steps_done(checkpoint.folder(run / "reward_model")) == 6 and len(one.trained) == 7
    before = [p for step in one.trained[:6] for p in step]  # the 7th step's pairs were trained after the checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_resume_on_two, args=(port, run), nprocs=2)
    ranks = [json.loads((run / f"trained{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["resumed"] == 6 and len(ranks[0]["steps"]) == len(ranks[1]["steps"])
    after = [p for a, b in zip(ranks[0]["steps"], ranks[1]["steps"]) for p in a + b]  # a step: both ranks' shares

    rows = data.read_shards(run / "label_preferences")
    random.Random(one.cfg.seed).shuffle(rows)
    train = [r["response_a"] for r in rows[10:]]
    assert before == train[:12]
    assert sorted(after[:4]) == sorted(train[12:16])  # from the first pair the checkpoint had not trained on
    assert Counter(before + after) == Counter(train * 2)  # 2 epochs: every pair twice, none skipped, none repeated


def _killed_sft(tmp_path, fake_stages, processes: int):
    """A run dir whose sft was killed after a Trainer checkpoint made by `processes` processes."""
    seen, base = fake_stages
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "stages=[critique_revise,sft]", *base])
    pipeline.run(cfg)
    out = cfg.path / "sft"
    (out / "stage.json").unlink()  # killed: its .resume_key still matches this config
    ckpt = out / "checkpoint"
    ckpt.mkdir()
    for name in ["trainer_state.json", "state.json"] + (
            ["rng_state.pth"] if processes == 1 else [f"rng_state_{r}.pth" for r in range(processes)]):
        (ckpt / name).write_text('{"step": 2}' if name == "state.json" else "{}")
    return cfg, seen, base


def test_a_trainer_checkpoint_of_another_process_count_is_refused_before_any_model_loads(tmp_path, fake_stages):
    cfg, seen, base = _killed_sft(tmp_path, fake_stages, processes=2)
    seen.clear()
    with pytest.raises(ConfigError) as e:
        pipeline.run(cfg)
    ckpt = cfg.path / "sft" / "checkpoint"
    assert e.value.errors == [f"sft: its checkpoint {ckpt} was made by 2 process(es) and this launch has 1; resumed on "
                              "another number of processes, the Trainer would skip other rows than it trained on. "
                              "Launch 2 process(es) to resume it, or add force=[sft] to start sft over"]
    assert seen == {} and (ckpt / "rng_state_1.pth").is_file()  # no model loaded, the checkpoint kept
    forced = load_config(["recipe=tiny_cpu", f"run_dir={cfg.path}", "stages=[critique_revise,sft]", "force=[sft]",
                          *base])
    pipeline.run(forced)
    assert seen["sft"] == [".resume_key"]  # started over


def test_a_trainer_checkpoint_of_the_same_process_count_resumes(tmp_path, fake_stages):
    cfg, seen, _ = _killed_sft(tmp_path, fake_stages, processes=1)
    pipeline.run(cfg)
    assert "checkpoint" in seen["sft"]  # resumed from it


def test_cuda_generators_of_every_device_are_saved_as_trainer_resumes_them(tmp_path, monkeypatch):
    """Two processes (this one is rank 0), each seeing two CUDA devices, faked on the CPU."""
    devices = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    other_rank = {"python": random.getstate(), "numpy": None, "cpu": torch.random.get_rng_state(),
                  "cuda": [torch.tensor([7], dtype=torch.uint8), torch.tensor([8], dtype=torch.uint8)]}
    restored: list = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.random, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda.random, "get_rng_state", lambda device="cuda": devices[0].clone())
    monkeypatch.setattr(torch.cuda.random, "set_rng_state_all", lambda states: restored.append(("all", states)))
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", lambda state, device="cuda": restored.append(("one", state)))
    monkeypatch.setattr(distributed, "to_main", lambda value: [value, other_rank])  # gathered on rank 0
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    ckpt = checkpoint.save(tmp_path, SimpleNamespace(), [], opt, {"step": 3})

    # transformers' own resume of rank 0 (a Trainer under DDP) gets both of its devices back.
    trainer = SimpleNamespace(args=SimpleNamespace(world_size=2, process_index=0,
                                                   parallel_mode=ParallelMode.DISTRIBUTED))
    Trainer._load_rng_state(trainer, str(ckpt))
    assert len(restored) == 1 and restored[0][0] == "all"
    assert [s.tolist() for s in restored[0][1]] == [[1, 2, 3], [4, 5, 6]]
    # cai_lite's own loops (reward_model) restore the same way, rank 1's file holds rank 1's devices.
    restored.clear()
    checkpoint.restore(tmp_path, SimpleNamespace(device="cpu"), [], opt)
    assert [(kind, [s.tolist() for s in states]) for kind, states in restored] == [("all", [[1, 2, 3], [4, 5, 6]])]
    assert [s.tolist() for s in torch.load(ckpt / "rng_state_1.pth", weights_only=False)["cuda"]] == [[7], [8]]
