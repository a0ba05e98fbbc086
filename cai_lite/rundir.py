"""The run directory's safety rules: one writer at a time, input files and folders (prompts,
constitution, judge GGUF, adapter folders) pinned by their contents, finished outputs never lost to
a redo that fails, per-shard seeds that make a resumed stage byte-identical to an uninterrupted
one, and atomic `stage.json` writes (with the library versions that made the output).

Reads and writes inside `runs/<run>/`:
  - `.lock`: held (flock) by the process running there, and holding its pid; the kernel releases
    it when that process ends, even by SIGKILL, so a crash never leaves a stale lock;
  - `.<stage>.replaced/`: a finished output set aside while its redo (`force=`, or new inputs)
    runs; deleted when the redo finishes, put back when it fails or is killed.
Outside it, only `digests.json` in cai_lite's cache folder (`$CAI_LITE_CACHE`, else
`$XDG_CACHE_HOME/cai_lite` or `~/.cache/cai_lite`, where the lab model is cached too): the sha256
of each input file by path and stat, so a 5 GB GGUF is read once, not at every run (content_digest).

    python -c "from cai_lite import rundir; print(rundir.shard_seed(0, 'critique_revise', 3))"
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cai_lite.typed_yaml import ConfigError

log = logging.getLogger(__name__)
# The keys that pin the base model, in every stage's KEYS (device and speed settings stay out of hashes).
BASE_KEYS = ("base.model", "base.create", "base.quantization", "base.dtype", "base.compute_dtype", "seed")
# Config keys naming an input file whose contents shape a stage's outputs. A stage's hash covers
# the file's bytes, so an edited prompts file or constitution at the same path is a change.
FILE_KEYS = ("data.prompts", "constitution", "critique_revise.helpful_prompts", "label_preferences.prompts",
             "label_preferences.helpful_prompts", "ppo.prompts", "ppo.helpful_prompts", "rloo.prompts",
             "rloo.helpful_prompts", "evaluate.prompts", "evaluate.helpful_prompts", "evaluate.hhh_path",
             "evaluate.harmful_vs_ethical_path")
# Config keys naming a model file or adapter folder a stage reads: pinned by content the same way.
MODEL_KEYS = ("critique_revise.policy_adapter", "critique_revise.critic_adapter")
RACY_NS = 2 * 10**9  # files changed this recently are hashed, not cached (content_digest)


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
    """The content digest (content_digest) of each input file or folder that `keys` (whole sections
    or single keys) name: the prompt files and constitution of FILE_KEYS, the adapter folders of
    MODEL_KEYS, and each judge's GGUF file (llamacpp) or adapter folder (local). Prompt files inside
    the base model folder are left out: the base's identity covers them (the lab model's prompts are
    pinned by its content hash). Missing paths are left out too: the stages' checks report them."""
    from cai_lite import constitution as C

    base = Path(cfg.base.model).expanduser().resolve()
    paths: dict[str, Path] = {}
    for key in FILE_KEYS + MODEL_KEYS:
        if key not in keys and key.split(".")[0] not in keys:
            continue
        value = cfg.constitution if key == "constitution" else getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if not value:
            continue
        try:
            path = C.resolve(value) if key == "constitution" else Path(value).expanduser()
        except C.ConstitutionError:
            continue  # the stage's own check reports it
        if key in MODEL_KEYS or (path.is_file() and not path.resolve().is_relative_to(base)):
            paths[key] = path  # a prompts file that is a datasets name or folder has no bytes of its own here
    judges = ([("judge", cfg.judge)] if "judge" in keys else []) + \
        ([(f"judges[{i}]", jc) for i, jc in enumerate(cfg.judges)] if "judges" in keys else [])
    for where, jc in judges:
        if jc.backend == "llamacpp" and jc.gguf_path:
            paths[f"{where}.gguf_path"] = Path(jc.gguf_path).expanduser()
        # sft: this run's adapter, pinned by the sft stage's hash; critique: as judges.adapter_folder finds it.
        folder = {"none": "", "sft": "", "critique": cfg.critique_revise.critic_adapter}.get(jc.adapter, jc.adapter)
        if jc.backend == "local" and folder:
            paths[f"{where}.adapter"] = Path(folder).expanduser()
    cache = _read_digests()
    known = dict(cache)
    out = {f"{key}:sha256": content_digest(path, cache) for key, path in paths.items() if path.exists()}
    if cache != known:
        _write_digests(cache)
    return out


def content_digest(path: Path, cache: dict | None = None) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and digests); 16 hex digits.

    A full hash, not one of sampled blocks: sampling is cheaper the first time but can miss a
    change. Each file's hash is kept in `cache` (digests.json, see the module docstring) under its
    resolved path with (device, inode, size, mtime_ns, ctime_ns), and computed again whenever any
    of these differ: a write to the file or a copy over it sets its ctime, which no user call can
    set back (`cp -p` and `touch -d` set the mtime only), and a file moved there has another inode.
    So a changed file is always hashed anew, and an unchanged 5 GB GGUF costs one stat. (Only files
    last changed more than RACY_NS ago are cached: see below.)"""
    cache = {} if cache is None else cache
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{content_digest(f, cache)}\0".encode())
        return h.hexdigest()[:16]
    st = path.stat()  # before reading: a write during the hash changes the ctime, so the next run hashes again
    stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    key = str(path.resolve())
    if cache.get(key, {}).get("stat") == stamp:
        return cache[key]["sha256"][:16]
    if st.st_size > 2**30:
        log.info("hashing %s (%.1f GB) to pin its contents; done once, then cached until the file changes",
                 path, st.st_size / 2**30)
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**22):
            h.update(block)
    # A file written less than RACY_NS ago may be written again within one tick of the file system's
    # clock (1 s on some) with the same ctime: cache only older ones, as git does with its index.
    if time.time_ns() - st.st_ctime_ns > RACY_NS:
        cache[key] = {"stat": stamp, "sha256": h.hexdigest()}
    return h.hexdigest()[:16]


def _digests_path() -> Path:
    if os.environ.get("CAI_LITE_CACHE"):
        return Path(os.environ["CAI_LITE_CACHE"]) / "digests.json"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cai_lite" / "digests.json"


def _read_digests() -> dict:
    try:
        cache = json.loads(_digests_path().read_text())
    except (OSError, ValueError):  # none yet, unreadable, or half-written by a crash: hash again
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_digests(cache: dict) -> None:
    """Write the digest cache atomically; a cache that cannot be written only costs a hash next run."""
    path = _digests_path()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two runs at once never share a temporary file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True) + "\n")
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot write the digest cache %s (%s); input files will be hashed again next run", path, e)


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
