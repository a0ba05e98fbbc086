"""Which process of a multi-process launch this is, and the few collective calls the pipeline needs.

`torchrun --nproc_per_node N run.py ...` and `accelerate launch --multi_gpu --num_processes N run.py ...`
start N copies of the program and set RANK, WORLD_SIZE and LOCAL_RANK in each; a plain
`python run.py` sets none of them and is one process (rank 0 of 1). Every process loads its own
4-bit base (on cuda:LOCAL_RANK, or the CPU) and trains on its shard of the data; the TRL trainers
average the gradients (DDP), reward_model's loop does it itself. Only rank 0 writes the run dir.

Reads only environment variables; writes nothing. The process group is gloo on the CPU and nccl on
GPUs; accelerate (inside the TRL trainers) finds it already started and uses it.

    torchrun --nproc_per_node 2 run.py recipe=tiny_cpu stages=[sft]
"""

from __future__ import annotations

import datetime
import os

# The stages whose run() works data-parallel: each process trains on its own shard, gradients are
# averaged. The rest generate text (a process each would make the same rows N times, or split them
# with no gain over a batched server), or are ppo, whose loop interleaves generation and four roles
# on one base and is single-process; export only writes files.
MULTI_PROCESS_STAGES = ("sft", "reward_model", "rloo", "dpo")


def rank() -> int:
    """This process's index among all processes (0 when not launched by torchrun/accelerate)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes the launcher started (1 for a plain `python run.py`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes the run dir and prints."""
    return rank() == 0


def start(device: str) -> None:
    """Join the process group (once; a no-op for one process). `device` is base.device: on a GPU each
    process takes cuda:LOCAL_RANK, so models.load_base puts its base there."""
    import torch  # here, not at the top: the CLI asks rank() before it needs torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    # A long timeout: rank 0 may write a large adapter or checkpoint while the others wait at a barrier.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))


def barrier() -> None:
    """Wait until every process gets here (a no-op for one process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def from_main(value):
    """Rank 0's `value`, on every process (pickled; for small things like the run's plan)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError:  # rank 0 stopped first (a config problem it printed): no second traceback here
        raise SystemExit(f"cai_lite (rank {rank()}): rank 0 stopped before the run began; see its message") from None
    return box[0]


def share(rows: list) -> list:
    """This process's part of one optimizer step's rows: every world_size()-th, from its rank on."""
    return rows[rank()::world_size()]


def same_as_main(tensors: list) -> None:
    """Copy rank 0's values into these tensors on every process (a hand-written loop's start, as DDP does)."""
    if world_size() > 1:
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t.data, src=0)


def sum_gradients(params: list) -> None:
    """Add up the gradients of `params` over all processes, in one message (no-op for one process)."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    flat = torch.cat([p.grad.reshape(-1) for p in params])  # (sum of numels,)
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


def total(x):
    """The sum of tensor `x` over all processes (itself for one process)."""
    if world_size() == 1:
        return x
    import torch.distributed as dist

    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def to_main(value) -> list | None:
    """Every process's `value`, in rank order, on rank 0 (None on the others; pickled, so small things only)."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def stop() -> None:
    """Leave the process group at the end of the run."""
    import torch.distributed as dist

    if world_size() > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def refusals(device: str, to_run: list[str]) -> list[str]:
    """Why this launch of WORLD_SIZE > 1 processes cannot run the stages `to_run` on `base.device`
    ([] when it can, and always for one process)."""
    if world_size() == 1:
        return []
    n = world_size()
    out = []
    if device.startswith("cuda:"):
        out.append(f"base.device: {device} would put all {n} processes on one GPU; set base.device=auto (or cuda): "
                   "each process then takes the GPU of its LOCAL_RANK")
    for name in to_run:
        if name in MULTI_PROCESS_STAGES:
            continue
        if name in ("critique_revise", "label_preferences", "evaluate"):
            why = ("it generates text, which one process does for all (N processes would make the same rows N "
                   "times); to generate faster, use a batched server with generation.backend=openai")
        elif name == "ppo":
            why = ("ppo is single-process: its loop keeps policy, reference, reward and value adapters on one "
                   "base and interleaves generation with training; for multi-GPU RL use rloo or dpo")
        else:
            why = "it only writes files"
        out.append(f"stages: {name} does not run multi-process ({n} processes were launched): {why}. "
                   f"Run it with plain `python run.py ... stages=[{name}]`, then launch the training stages "
                   f"({', '.join(MULTI_PROCESS_STAGES)}) with torchrun or accelerate")
    return out
