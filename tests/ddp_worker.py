"""One process of the 2-process run in tests/test_multi_process.py: the real `cai-lite` command
(cli.main, as run.py calls it), with three observers put in from outside the package:
  - every batch the SFT trainer computes a loss on: a hash of each row's tokens (padding removed);
  - the adapter's LoRA weights in memory before and after training;
  - every file or folder this process creates, writes, renames or deletes under the run dir
    (Python's audit hooks see each open() for writing, mkdir, rename and remove; torch.save and
    safetensors write from C++, so those two are wrapped);
  - on rank 0, the files of each checkpoint saved.
With CAI_LITE_TEST_EXIT_AT_STEP=k > 0 every process dies (os._exit) right after step k's checkpoint call.
Writes them to $CAI_LITE_TEST_REPORT/rank<RANK>.json and .pt.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py recipe=tiny_cpu stages=[sft] ...
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from trl import SFTTrainer

from cai_lite import adapter_files, checkpoint, cli, models

REPORT = Path(os.environ["CAI_LITE_TEST_REPORT"])
RUN = os.environ["CAI_LITE_TEST_RUN"]
RANK = os.environ["RANK"]
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.symlink")
writes: list[str] = []
checkpoints: list[list[str]] = []
batches: list[list[str]] = []
weights: dict[str, dict[str, torch.Tensor]] = {}
compute_loss, train, save = SFTTrainer.compute_loss, checkpoint.train, checkpoint.save
torch_save, save_file = torch.save, adapter_files.save_file


def observed_loss(self, model, inputs, *args, **kwargs):
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    rows = [ids[i][mask[i].bool()] if mask is not None else ids[i] for i in range(len(ids))]
    batches.append([hashlib.sha1(str(r.tolist()).encode()).hexdigest()[:12] for r in rows])
    return compute_loss(self, model, inputs, *args, **kwargs)


def observed_train(trainer, base, adapter, out):
    weights["before"] = {k: v.detach().clone() for k, v in models.lora_tensors(base, adapter)}
    result = train(trainer, base, adapter, out)
    weights["after"] = {k: v.detach().clone() for k, v in models.lora_tensors(base, adapter)}
    return result


def exit_at(on_log, step):
    def wrapped(self, args, state, control, **kwargs):
        on_log(self, args, state, control, **kwargs)
        if state.global_step == step:
            os._exit(1)  # as a kill would: no cleanup, no stage.json
    return wrapped


def observed_save(*args, **kwargs):
    final = save(*args, **kwargs)
    if RANK == "0":
        checkpoints.append(sorted(str(p.relative_to(final)) for p in final.rglob("*")))
    return final


def written(path, event):
    if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(RUN):
        writes.append(f"{event} {os.fsdecode(path)}")


def audit(event, args):
    if event == "open":
        path, mode, flags = args
        if not (any(c in mode for c in "wax+") if mode else flags & WRITING):
            return
    elif event in CHANGES:
        path = args[0]
    else:
        return
    written(path, event)


sys.addaudithook(audit)
torch.save = lambda obj, f, *a, **k: written(f, "torch.save") or torch_save(obj, f, *a, **k)
adapter_files.save_file = lambda tensors, f, *a, **k: written(f, "save_file") or save_file(tensors, f, *a, **k)
checkpoint.save = observed_save
if step := int(os.environ.get("CAI_LITE_TEST_EXIT_AT_STEP", "0")):
    checkpoint.TrainerCheckpoints.on_log = exit_at(checkpoint.TrainerCheckpoints.on_log, step)
SFTTrainer.compute_loss = observed_loss
checkpoint.train = observed_train
code = cli.main(sys.argv[1:])
(REPORT / f"rank{RANK}.json").write_text(json.dumps({"batches": batches, "writes": writes, "checkpoints": checkpoints,
                                                         "code": code}))
torch_save(weights, REPORT / f"rank{RANK}.pt")
sys.exit(code)
