"""The run directory's safety rules: one writer at a time, input files pinned by their contents,
finished outputs never lost to a redo that fails, per-shard seeds that make a resumed stage
byte-identical to an uninterrupted one, and atomic `stage.json` writes (with the library versions
that made the output).

Reads and writes only inside `runs/<run>/`:
  - `.lock`: held (flock) by the process running there, and holding its pid; the kernel releases
    it when that process ends, even by SIGKILL, so a crash never leaves a stale lock;
  - `.<stage>.replaced/`: a finished output set aside while its redo (`force=`, or new inputs)
    runs; deleted when the redo finishes, put back when it fails or is killed.

    python -c "from cai_lite import rundir; print(rundir.shard_seed(0, 'critique_revise', 3))"
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cai_lite.typed_yaml import ConfigError

# The keys that pin the base model, in every stage's KEYS (device and speed settings stay out of hashes).
BASE_KEYS = ("base.model", "base.create", "base.quantization", "base.dtype", "base.compute_dtype", "seed")
# Config keys naming an input file whose contents shape a stage's outputs. A stage's hash covers
# the file's bytes, so an edited prompts file or constitution at the same path is a change.
FILE_KEYS = ("data.prompts", "constitution", "critique_revise.helpful_prompts", "label_preferences.prompts",
             "label_preferences.helpful_prompts", "ppo.prompts", "ppo.helpful_prompts", "rloo.prompts",
             "rloo.helpful_prompts", "evaluate.prompts", "evaluate.helpful_prompts")


def stage_dir(run: Path, stage: str) -> Path:
    """`runs/<run>/<stage>/`: a stage's outputs and its stage.json. The only place that spells it."""
    return run / stage


def log_path(run: Path) -> Path:
    """`runs/<run>/run.log`: every run's log lines and the libraries' messages (logs.py), appended."""
    return run / "run.log"


def adapter_dir(run: Path, stage: str) -> Path:
    """The PEFT folder a training stage leaves (its OUTPUTS name `adapter`)."""
    return stage_dir(run, stage) / "adapter"


def is_done(run: Path, stage: str) -> bool:
    """The stage finished in this run dir: its stage.json, written last, is there."""
    return (stage_dir(run, stage) / "stage.json").is_file()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold `path/.lock` (creating `path`) or raise ConfigError naming the process that holds it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError([f"run_dir: cannot create {path} ({e.strerror})"]) from None
    f = open(path / ".lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise ConfigError([f"run_dir: {path} is in use by process {pid}; wait for it to finish, or use "
                           f"run_name= for another run"]) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # closing releases the flock


def check_writable(path: Path) -> list[str]:
    """The run dir exists as a writable folder, or can be created as one."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [f"run_dir: {path}: {probe} is a file, not a folder"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"run_dir: {path}: {probe} is not writable by this user"]
    return []


def file_digests(cfg, keys: tuple[str, ...]) -> dict[str, str]:
    """sha256 of each input file among FILE_KEYS that `keys` (whole sections or single keys) cover.
    Files inside the base model folder are left out: the base's identity covers them (the lab
    model's prompts are pinned by its content hash)."""
    from cai_lite import constitution as C

    base = Path(cfg.base.model).expanduser().resolve()
    out = {}
    for key in FILE_KEYS:
        if key not in keys and key.split(".")[0] not in keys:
            continue
        value = cfg.constitution if key == "constitution" else getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if not value:
            continue
        try:
            path = C.resolve(value) if key == "constitution" else Path(value).expanduser()
        except C.ConstitutionError:
            continue  # the stage's own check reports it
        if not path.is_file() or path.resolve().is_relative_to(base):
            continue  # a datasets name or folder, a missing file (checked later), or part of the base
        out[f"{key}:sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


def shard_seed(seed: int, stage: str, index: int) -> int:
    """The seed of one shard of a generation stage: the same shard gets the same random draws
    whether the stage ran straight through or resumed after a kill."""
    return int(hashlib.sha256(f"{seed}:{stage}:{index}".encode()).hexdigest()[:8], 16)


def backup_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.replaced")


def set_aside(out: Path) -> Path:
    """Move a finished output out of the way of its redo; return where it went."""
    backup = backup_path(out)
    if backup.exists():
        shutil.rmtree(backup)
    out.rename(backup)
    return backup


def put_back(out: Path) -> bool:
    """After a redo that failed or was killed: drop its partial output and restore the finished one."""
    backup = backup_path(out)
    if not backup.is_dir():
        return False
    if out.exists():
        shutil.rmtree(out)
    backup.rename(out)
    return True


def recover(run: Path) -> list[str]:
    """Put back every output whose redo did not finish (a leftover `.<stage>.replaced/` beside a
    folder with no stage.json); drop leftovers whose redo finished. Returns the stages put back."""
    restored = []
    for backup in sorted(run.glob(".*.replaced")):
        out = stage_dir(run, backup.name[1:-len(".replaced")])
        if (out / "stage.json").is_file():
            shutil.rmtree(backup)
        elif put_back(out):
            restored.append(out.name)
    return restored


def versions() -> dict:
    """What made the outputs: the library versions and, in a git checkout, the commit."""
    import importlib.metadata as md

    out = {}
    for name in ("cai_lite", "torch", "transformers", "trl", "peft", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["git_commit"] = git_commit()
    return out


def git_commit() -> str | None:
    """The commit of the checkout cai_lite runs from; None for an installed wheel (which carries its
    recipes inside the package, and may sit in a venv inside some other repository) or without git."""
    import subprocess

    from cai_lite.config import PACKAGE, SHIPPED

    if SHIPPED != PACKAGE.parent:
        return None
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine
        return None
    return git.stdout.strip() if git.returncode == 0 else None


def write_json(path: Path, data: dict) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
