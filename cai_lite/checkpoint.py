"""Resumable training: a small checkpoint every `<stage>.save_every` optimizer steps, and training
logs written a line per step, so a killed sft, reward_model, ppo, rloo or dpo run continues where it
was and ends with the very weights an uninterrupted run ends with.

Writes `<stage>/checkpoint/` atomically (built as `checkpoint.tmp/`, then renamed; the one before
is kept as `checkpoint.old/` for the instant between two renames), and deletes it when the stage
has saved its adapter. It holds only what training changes:
  - `adapters/<name>/`: each trained adapter as a PEFT folder (+ `head.safetensors`), written from
    the parameters themselves: a state dict of the model would make bitsandbytes repack the 4-bit
    base on CPU (see models.lora_tensors), and the base and the frozen adapters never change;
  - `optimizer.pt`, `rng_state.pth` (python, numpy, torch and CUDA generators; `rng_state_<rank>.pth`, one
    per process, under torchrun/accelerate) and `state.json`
    (step, plus what the stage's own loop needs: its history, the KL coefficient, ...);
  - for TRL trainers also `scheduler.pt` and `trainer_state.json`, in the names and formats
    transformers' `Trainer.train(resume_from_checkpoint=...)` reads, so the Trainer itself skips
    the batches already seen and restores optimizer, scheduler and generators.
The pipeline keeps a stage's folder only when its `.resume_key` (config hash + the inputs read)
matches this run, so a checkpoint is never resumed under another config: that starts over. A
Trainer checkpoint made by another number of processes is refused before any model loads
(check_processes); reward_model's resumes at its first untrained pair on any number.

    python run.py recipe=tiny_cpu stages=[ppo] ppo.save_every=1   # kill it, run it again: it resumes
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import safe_globals

from cai_lite import adapter_files, distributed
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)


def folder(out: Path) -> Path | None:
    """The latest complete checkpoint of the stage writing to `out`, or None."""
    for name in ("checkpoint", "checkpoint.old"):  # .old: killed between the two renames of save()
        if (out / name / "state.json").is_file():
            return out / name
    return None


def steps_done(ckpt: Path | None) -> int:
    """Optimizer steps a checkpoint has behind it (0 for none)."""
    return json.loads((ckpt / "state.json").read_text())["step"] if ckpt is not None else 0


def logged(ckpt: Path | None) -> list[dict]:
    """The Trainer's log history saved in a checkpoint ([] for none)."""
    return json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if ckpt is not None else []


def save(out: Path, base: SharedBase, adapters: list[str], optimizer: torch.optim.Optimizer, state: dict,
         write_more: Callable[[Path], None] | None = None) -> Path:
    """Write `out/checkpoint/` atomically: the trained adapters, the optimizer, every random generator's
    state and `state` (JSON, with at least `step`). `write_more(tmp)` adds files (the Trainer's).

    Under torchrun/accelerate every process calls this at the same step and rank 0 writes it all:
    each rank's random generators as `rng_state_<rank>.pth` (transformers' name, so each rank resumes
    its own dropout and sampling); the adapters and optimizer are the same on every rank (DDP)."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    generators = distributed.to_main(_rng_state())
    if not distributed.is_main():
        return final
    if tmp.exists():
        shutil.rmtree(tmp)  # a save that was killed half-way
    tmp.mkdir(parents=True)
    for rank, rng in enumerate(generators):
        torch.save(rng, tmp / _rng_file(rank))
    for name in adapters:
        adapter_files.save_adapter(base, name, tmp / "adapters" / name)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if write_more is not None:
        write_more(tmp)
    (tmp / "state.json").write_text(json.dumps(state) + "\n")  # last: folder() trusts a folder that has it
    if final.exists():  # then any old one is stale; without it, old may be the only complete one left
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint at step %d", state["step"])
    return final


def restore(out: Path, base: SharedBase, adapters: list[str], optimizer: torch.optim.Optimizer) -> dict | None:
    """For a hand-written loop: put the latest checkpoint's adapters, optimizer and generators back in
    place and return its state (None, and nothing touched, when there is none)."""
    ckpt = folder(out)
    if ckpt is None:
        return None
    for name in adapters:
        adapter_files.fill_adapter(base, name, ckpt / "adapters" / name)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=base.device, weights_only=True))
    rng_file = ckpt / _rng_file(distributed.rank())
    if not rng_file.is_file():  # made by another number of processes: the data shards differ anyway
        log.warning("%s: no %s (the checkpoint was made by another number of processes); the random "
                    "generators start afresh, so this run will not match an uninterrupted one", ckpt, rng_file.name)
        return json.loads((ckpt / "state.json").read_text())
    with safe_globals():  # numpy's generator state is an array: allow just that in a weights-only load
        rng = torch.load(rng_file, weights_only=True)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.random.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        if distributed.world_size() > 1:  # every device's state, as _rng_state saved them
            torch.cuda.random.set_rng_state_all(rng["cuda"])
        else:
            torch.cuda.random.set_rng_state(rng["cuda"])
    state = json.loads((ckpt / "state.json").read_text())
    log.info("resuming from the checkpoint at step %d (%s)", state["step"], ckpt)
    return state


def _rng_file(rank: int) -> str:
    """transformers' own names: `rng_state.pth` for one process, `rng_state_<rank>.pth` for several."""
    return f"rng_state_{rank}.pth" if distributed.world_size() > 1 else "rng_state.pth"


def _rng_state() -> dict:
    """Every random generator's state, in transformers' format (Trainer._save_rng_state): under
    torchrun/accelerate the CUDA states of all the devices this process sees, which Trainer's
    resume gives back with set_rng_state_all (one state there would set none: it logs an error and
    goes on, and dropout then differs from the uninterrupted run); in one process the current
    device's."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = (torch.cuda.random.get_rng_state_all() if distributed.world_size() > 1
                       else torch.cuda.random.get_rng_state())
    return rng


def processes(ckpt: Path) -> int:
    """How many processes made a checkpoint: one `rng_state_<rank>.pth` each, or one `rng_state.pth`."""
    return len(list(ckpt.glob("rng_state_*.pth"))) or 1


def check_processes(out: Path, stage: str) -> list[str]:
    """A Trainer checkpoint (sft, rloo, dpo) resumes only on as many processes as made it: Trainer
    skips `global_step` steps of each process's shard of the data, which under another number of
    processes are other rows, so some would never be trained on and others twice. (reward_model's
    loop records the position in its data itself; ppo runs in one process only.)"""
    ckpt = folder(out)
    if ckpt is None or not (ckpt / "trainer_state.json").is_file():
        return []
    made, now = processes(ckpt), distributed.world_size()
    if made == now:
        return []
    return [f"{stage}: its checkpoint {ckpt} was made by {made} process(es) and this launch has {now}; resumed on "
            f"another number of processes, the Trainer would skip other rows than it trained on. Launch {made} "
            f"process(es) to resume it, or add force=[{stage}] to start {stage} over"]


def done(out: Path) -> None:
    """The stage saved its adapter: its checkpoints are no longer needed (rank 0 deletes them)."""
    if not distributed.is_main():
        return
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
        shutil.rmtree(out / name, ignore_errors=True)


def due(step: int, every: int, last: int) -> bool:
    """Checkpoint after `step` (1-based)? Every `every` steps, never after the last one (the adapter follows)."""
    return every > 0 and step % every == 0 and step < last


class TrainerCheckpoints(TrainerCallback):
    """Checkpoints of a TRL/transformers Trainer, every `every` optimizer steps, in our format.

    Saved from on_log, which follows the step's log entry (trl_args logs every step), so the saved
    log history has the step in it. Trainer's own saving is off: it would write every adapter on the
    shared base through a state dict of the whole model, and not atomically."""

    def __init__(self, out: Path, base: SharedBase, adapter: str, every: int, extra: Callable[[], dict] = dict):
        self.out, self.base, self.adapter, self.every, self.extra = out, base, adapter, every, extra
        self.saved_at = -1

    def on_log(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        step = state.global_step
        if step == self.saved_at or not due(step, self.every, state.max_steps):
            return

        def trainer_files(tmp: Path) -> None:
            torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
            state.save_to_json(str(tmp / "trainer_state.json"))

        save(self.out, self.base, [self.adapter], optimizer, {"step": step, **self.extra()}, trainer_files)
        self.saved_at = step


def train(trainer, base: SharedBase, adapter: str, out: Path):
    """`trainer.train()`, continued from `out`'s checkpoint when there is one. Returns its TrainOutput."""
    ckpt = folder(out)
    if ckpt is None:
        return trainer.train()
    log.info("resuming from the checkpoint at step %d (%s)", steps_done(ckpt), ckpt)
    # After the trainer is built: TRL's `ref` adapter is a copy of `default` as it was then (the SL-CAI model).
    adapter_files.fill_adapter(base, adapter, ckpt / "adapters" / adapter)
    # The weights are in place. Trainer would reload them with PEFT's load_adapter, which reads a state
    # dict of the whole model (on CPU bitsandbytes then repacks the 4-bit base, see models.lora_tensors).
    trainer._load_from_checkpoint = lambda *args, **kwargs: None
    return trainer.train(resume_from_checkpoint=str(ckpt))


class JsonlLog(TrainerCallback):
    """The Trainer's log entries as JSON lines, flushed each step, so a killed run keeps them.
    `line(entry, i)` makes the i-th kept line from an entry, or None to skip it. On a resume the
    file is rewritten from the checkpoint's history: the steps after it are done again. Only rank 0
    writes it under torchrun/accelerate (its log entries are the averages over all processes)."""

    def __init__(self, path: Path, line: Callable[[dict, int], dict | None] = lambda h, i: h):
        self.path, self.line, self.n = path, line, 0
        self.file = None

    def _write(self, entry: dict) -> None:
        row = self.line(entry, self.n)
        if row is not None:
            self.file.write(json.dumps(row, sort_keys=True) + "\n")  # sorted, as in trainer_state.json
            self.file.flush()
            self.n += 1

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.file = self.path.open("w")
        for entry in state.log_history:
            self._write(entry)

    def on_log(self, args, state, control, **kwargs):
        if self.file is not None:
            self._write(state.log_history[-1])  # the entry Trainer has just added: the same line a resume rewrites

    def on_train_end(self, args, state, control, **kwargs):
        if self.file is not None:
            self.file.close()
