"""Run the selected stages in order, in one process, on one loaded base (or, launched by torchrun or
accelerate, the training stages data-parallel: one base per process, rank 0 alone writes; see distributed.py).

Checks everything a run needs but a model (the base folder, the device, the run dir, each stage's
files and servers), then runs what stage_plan.py decided: each stage's outputs first, its
`stage.json` last. Reads the resolved Config and each stage's previous `stage.json`; writes
`runs/<run>/config.yaml`, one folder per stage, and in each, after the stage's outputs,
`stage.json` with `stage`, `config_hash`, `seconds`, `peak_memory_mb` and the stage's metrics.

    python run.py recipe=tiny_cpu stages=[critique_revise,sft]
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import shutil
import time
import uuid
from pathlib import Path

import torch
import transformers
import yaml

from cai_lite import cards, checkpoint, distributed, downloads, logs, planner, rundir, stage_plan, tracking
from cai_lite.config import Config
from cai_lite.stage_plan import NAMES, STAGES, Plan
from cai_lite.typed_yaml import ConfigError

log = logging.getLogger(__name__)
current_stage = logs.current_stage  # the stage every log line names
TRAINING = ("sft", "reward_model", "ppo", "rloo", "dpo")  # the stages that log curves (report_to)


def check_base(cfg: Config) -> list[str]:
    """base.model must be a local model folder (cai_lite never downloads), or a missing one that
    `base.create` may build: only at runs/_models/<base.create>..., so a typo or a hub id never
    becomes a new random model."""
    model, create = cfg.base.model, cfg.base.create
    path = Path(model).expanduser()
    if path.is_dir():
        return [] if (path / "config.json").is_file() else [
            f"base.model: {model} has no config.json, so it is not a Hugging Face model folder"]
    if path.exists():
        return [f"base.model: {model} is a file; expected a model folder (config.json, *.safetensors, tokenizer)"]
    if create != "none":
        if path.parent.name == "_models" and path.parent.parent.name == "runs" and path.name.startswith(create):
            return []
        return [f"base.model: no folder {model}, and base.create={create} builds a model only at "
                f"runs/_models/{create}... (so that a typo cannot become a new random model); set "
                f"base.model=runs/_models/{create}, or base.create=none for a downloaded model"]
    siblings = [str(p) for p in path.parent.iterdir() if (p / "config.json").is_file()] if path.parent.is_dir() else []
    close = difflib.get_close_matches(str(path), siblings, n=1, cutoff=0.8)
    return [f"base.model: no folder {model}" + (f" (did you mean {close[0]}?)" if close else "")
            + f". cai_lite reads a local model folder and never downloads; fetch the model first: "
            f"{downloads.model_command(model)}, then set base.model to that folder"]


def check_device(device: str) -> list[str]:
    """base.device names a device this torch has (recipe.validate checked how it is spelled)."""
    if not device.startswith("cuda"):
        return []
    if not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "finds no GPU"
        return [f"base.device={device}: this torch ({torch.__version__}) {why}; set base.device=cpu (or auto), or "
                f"install the torch build for your CUDA"]
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return [f"base.device={device}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"]
    return []


def preflight(cfg: Config, actions: dict[str, str], device: bool = True) -> None:
    """Every check that needs files or servers but no model, all reported together (and, with
    `device`, the device: a plan is often made on another machine than the run's)."""
    runs = "run" in actions.values()
    errors: list[str] = check_base(cfg) + (check_device(cfg.base.device) if device else []) if runs else []
    errors += rundir.check_writable(cfg.path)
    if any(actions.get(name) == "run" for name in TRAINING):
        errors += tracking.check(cfg)
    for name, stage in zip(NAMES, STAGES):
        if actions.get(name) == "run" and hasattr(stage, "check"):  # check() is optional in a stage's contract
            errors += stage.check(cfg)
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)))  # two stages sharing a judge report its problem once


def check_inputs(cfg: Config) -> list[str]:
    """What `plan=true` adds to its table: every problem a run would stop on before loading a model
    (the stages' upstream outputs, the base, the files and servers they read), found without
    touching the run dir. A base that `base.create` builds (and the lab's prompt files in its
    folder) is checked when it is built."""
    try:
        actions, errors = stage_plan.plan(cfg).actions, []
    except ConfigError as e:
        actions, errors = {name: "run" for name in cfg.stages}, list(e.errors)
    if cfg.base.create != "none" and not Path(cfg.base.model).is_dir():
        return errors + check_base(cfg)
    try:
        preflight(cfg, actions, device=False)
    except ConfigError as e:
        errors += e.errors
    return errors


def device_memory(device: torch.device, fallback_gb: float) -> tuple[int, str]:
    """The memory batch_size=auto fills, and what it is: the card's total on CUDA; on CPU the RAM
    free now (MemAvailable, Linux), else plan.gpu_memory_gb."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "RAM available"
    except OSError:
        pass
    return int(fallback_gb * planner.GiB), "plan.gpu_memory_gb (no /proc/meminfo)"


def resolve_auto(cfg: Config) -> Config:
    """`cfg` with every batch_size=auto set to the planner's pick for the run's device and
    `base.model`'s shape (never plan.shape: that plans another model); `cfg` itself where nothing
    is auto. Called once per process before the base loads, so the stages and the base only ever
    see numbers, and on CPU the RAM the weights will take is still free (the planner counts them).
    Logs each pick; raises ConfigError naming the key where not even one row fits."""
    if not planner.auto_keys(cfg):
        return cfg
    d = cfg.base.device  # as models.load_base picks it
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d)
    card, what = device_memory(device, cfg.plan.gpu_memory_gb)
    own = dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, shape=""))
    picks = planner.auto_picks(own, card, what, cuda=device.type == "cuda")
    for p in picks:
        log.info("%s", p.line())
    if bad := [p for p in picks if not p.rows]:
        raise ConfigError([f"{p.key}: auto found no batch that fits ({p.line()}); set {p.key} to a number, or "
                           "shorten the sequences (generation.max_prompt_tokens, max_new_tokens)" for p in bad])
    return planner.with_picks(cfg, picks)


class _Memory:
    """Peak memory of one stage: peak RSS on CPU (VmHWM, reset per stage), peak allocated on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> str:
        """Start a new peak; return what the peak will cover: this stage, or the whole process."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return "stage"
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
            return "stage"
        except OSError:  # not Linux, or not allowed: the peak then covers the process so far
            return "process"

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def run(cfg: Config) -> dict[str, dict]:
    """Run `cfg.stages` in one process on one loaded base; return each stage's stage.json.

    Everything that can be checked without a model is checked before the run dir is created or
    anything in it is touched; then the run dir is locked for the rest of the run.

    Launched as N processes (torchrun, accelerate: see distributed.py), rank 0 alone checks, locks
    and writes, and hands its plan to the others; every process loads its base and runs the stage
    (training stages only: others are refused before any model loads); the others return {}."""
    distributed.start(cfg.base.device)
    if distributed.is_main():
        results = _checked_run(cfg)
    else:  # waits for rank 0's plan; if rank 0 fails first, the launcher ends this process
        results = _execute(cfg, distributed.from_main(None))
    distributed.stop()  # on an error neither returns: the launcher ends the other processes
    return results


def _checked_run(cfg: Config) -> dict[str, dict]:
    if cfg.path.is_dir():
        with rundir.locked(cfg.path):
            for name in rundir.recover(cfg.path):
                log.warning("%s: a redo of it did not finish; its finished output is back in place", name)
    decided = stage_plan.plan(cfg)
    to_run = [n for n, a in decided.actions.items() if a == "run"]
    refused = distributed.refusals(cfg.base.device, to_run)
    # A Trainer checkpoint resumed on another number of processes would skip other rows than it trained on.
    refused += [e for n in to_run if _resumes(cfg, decided, n)
                for e in checkpoint.check_processes(rundir.stage_dir(cfg.path, n), n)]
    if refused:
        raise ConfigError(refused)
    if cfg.base.create in stage_plan.LAB_SIZES and "run" in decided.actions.values():
        from cai_lite.lab import pretrain

        if errors := check_base(cfg) + check_device(cfg.base.device):  # before minutes of pretraining
            raise ConfigError(errors)
        # Before the stage checks: the lab's prompt files live in the model folder.
        try:
            pretrain.build_lab_model(cfg.base.model, cfg.seed, stage_plan.LAB_SIZES[cfg.base.create])
        except ValueError as e:
            raise ConfigError([str(e)]) from None
    preflight(cfg, decided.actions)
    with rundir.locked(cfg.path):
        decided = stage_plan.plan(cfg)  # again, now that no other process can finish a stage meanwhile
        return _execute(cfg, distributed.from_main(decided))


def _execute(cfg: Config, decided: Plan) -> dict[str, dict]:
    from cai_lite import models, tiny

    main = distributed.is_main()  # under torchrun/accelerate only rank 0 writes; the others train and wait
    if main:
        tmp = cfg.path / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        tmp.replace(cfg.path / "config.yaml")
        logs.to_file(rundir.log_path(cfg.path))
    results: dict[str, dict] = {}
    todo = [(name, s) for name, s in zip(NAMES, STAGES) if decided.actions.get(name) == "run"]
    for name in NAMES:
        if decided.actions.get(name) == "skip":
            log.info("%s: done with the same config, skipping", name)
            results[name] = stage_plan.read_stage_json(cfg, name)
    if not todo:
        return results
    if main and cfg.base.create.startswith("tiny-") and not Path(cfg.base.model).exists():
        arch = cfg.base.create.split("-", 1)[1]
        log.info("building tiny %s model at %s", arch, cfg.base.model)
        tiny.build_tiny_model(cfg.base.model, arch)
    distributed.barrier()  # the others load the model rank 0 may have just built
    cfg = resolve_auto(cfg)  # a copy with numbers for batch_size=auto; config.yaml keeps what was asked
    base = models.load_base(cfg)
    memory = _Memory(base.device)
    made_by = rundir.versions()
    for name, stage in todo:
        out = rundir.stage_dir(cfg.path, name)
        inputs_done = {up: stage_plan.read_stage_json(cfg, up)["output_id"] for up in decided.inputs[name]}
        resumable = _resumes(cfg, decided, name)
        replaced = False
        if main and out.exists() and not resumable:
            if (out / "stage.json").is_file():
                rundir.set_aside(out)  # put back if this redo fails: a finished output is never lost
                replaced = True
            else:
                shutil.rmtree(out)  # partial outputs of other settings or inputs: never mix them with new ones
        if main:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".resume_key").write_text(_resume_key(cfg, decided, name))
        distributed.barrier()  # every process sees the same folder: a checkpoint to resume from, or none
        token = current_stage.set(name)
        try:
            transformers.set_seed(cfg.seed)
            scope = memory.reset()
            start = time.perf_counter()
            log.info("start%s", " (resuming)" if resumable else "")
            metrics = stage.run(cfg, base, out)
            if main and (missing := [o for o in stage.OUTPUTS if not any(out.glob(o))]):
                raise RuntimeError(f"{name}: finished without writing {', '.join(missing)} (its declared OUTPUTS)")
            if main:  # README.md cards: load_dataset(folder) reads the shards, PEFT users learn what an adapter is
                cards.write(cfg, name, out, metrics, decided.inputs[name], made_by)
            record = {
                "stage": name,
                "config_hash": decided.hashes[name],
                "output_id": uuid.uuid4().hex,  # what later stages record having read
                "inputs_done": inputs_done,
                "seconds": round(time.perf_counter() - start, 2),
                "peak_memory_mb": round(memory.peak_mb(), 1),
                "peak_memory_scope": scope,
                "memory": models.memory_account(base),
                "versions": made_by,
                "processes": distributed.world_size(),  # data-parallel training processes (torchrun/accelerate)
                **decided.snapshots[name],
                **metrics,
            }
            if main:
                rundir.write_json(out / "stage.json", record)  # last: its presence means the stage finished
                results[name] = record
            log.info("done in %.1f s", record["seconds"])
        except BaseException:
            if replaced and rundir.put_back(out):
                log.warning("the redo failed: the finished output of %s from before is back in place", name)
            raise
        finally:
            current_stage.reset(token)
        distributed.barrier()  # nobody reads this stage's outputs (the next stage does) before rank 0 wrote them
        if replaced:
            shutil.rmtree(rundir.backup_path(out))
    return results


def _resume_key(cfg: Config, decided: Plan, name: str) -> str:
    """What a stage's partial outputs (shards, checkpoint) are made under: its config hash, the
    outputs it reads, and the engine that generates (shards of two engines never mix)."""
    key = {"config_hash": decided.hashes[name],
           "inputs_done": {up: stage_plan.read_stage_json(cfg, up)["output_id"] for up in decided.inputs[name]}}
    if cfg.generation.backend != "local":  # local keys stay as they were
        key["generation_backend"] = cfg.generation.backend
    return json.dumps(key, sort_keys=True)


def _resumes(cfg: Config, decided: Plan, name: str) -> bool:
    """The stage, about to run, continues its partial outputs: not forced, none of its inputs redone
    in this launch, and made with this config from these very inputs (its .resume_key)."""
    out = rundir.stage_dir(cfg.path, name)
    marker = out / ".resume_key"
    if name in cfg.force or any(decided.actions.get(up) == "run" for up in decided.inputs[name]):
        return False
    return (marker.is_file() and not (out / "stage.json").is_file()
            and marker.read_text() == _resume_key(cfg, decided, name))


def summary(cfg: Config, results: dict[str, dict]) -> str:
    """A compact table of what ran, for the end of `python run.py`."""
    lines = [f"run: {cfg.path}", f"{'stage':<18} {'seconds':>8} {'peak MB':>8}  result"]
    for name, r in results.items():
        key = STAGES[NAMES.index(name)].HEADLINE  # the one metric per stage worth a glance on the terminal
        value = r.get(key)
        # A sentence as it is; a number rounded to 4 significant digits (stage.json keeps every digit).
        shown = (value if isinstance(value, str) else f"{key}={value:.4g}" if isinstance(value, float)
                 else f"{key}={value}")
        lines.append(f"{name:<18} {r.get('seconds', 0):>8.1f} {r.get('peak_memory_mb', 0):>8.0f}  {shown}")
    table = rundir.stage_dir(cfg.path, "evaluate") / "summary.txt"
    if "evaluate" in results and table.is_file():
        lines += ["", table.read_text().rstrip()]
    return "\n".join(lines)
