"""Model files a stage reads are pinned by their contents, not their paths: another GGUF copied over
`judge.gguf_path`, or another adapter saved into a judge's or critique_revise's adapter folder,
makes the finished stage out of date (refused, naming the key, until `force=`), while the same bytes
put back keep it done. The full hash is cached by stat, so an unchanged file is not read again.
No model is loaded: plans on stage.json files alone.

    python -m pytest tests/test_content_identity.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cai_lite import rundir, stage_plan
from cai_lite.recipe import load_config
from cai_lite.typed_yaml import ConfigError

STAGES = ("critique_revise", "sft", "label_preferences")


def _done_all(cfg) -> None:
    """Each selected stage finished, as pipeline.run leaves it (stage.json after its inputs)."""
    plan = stage_plan.plan(cfg)
    made = {}
    for name in STAGES:
        (cfg.path / name).mkdir(parents=True, exist_ok=True)
        record = {"stage": name, "config_hash": plan.hashes[name], "output_id": f"{name}-1",
                  "inputs_done": {up: made[up] for up in plan.inputs[name]}, **plan.snapshots[name]}
        (cfg.path / name / "stage.json").write_text(json.dumps(record))
        made[name] = record["output_id"]


def _adapter(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def _overwrite_keeping_stat(path: Path, data: bytes) -> None:
    """New bytes in place: same size, same inode, the old mtime set back (only the ctime tells)."""
    st = path.stat()
    assert len(data) == st.st_size
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("case", ["judge.gguf_path", "judge.adapter", "critique_revise.critic_adapter"])
def test_another_model_at_the_same_path_is_a_changed_input(tmp_path, case):
    old, new = b"GGUF" + bytes(4092), b"GGUF" + bytes(4091) + b"\x01"
    if case == "judge.gguf_path":
        target = tmp_path / "judge.gguf"
        target.write_bytes(old)
        overrides, stage = ["judge=llamacpp", f"judge.gguf_path={target}"], "label_preferences"
    else:
        folder = _adapter(tmp_path / "adapter", old)
        target = folder / "adapter_model.safetensors"
        overrides, stage = ((["judge=local", f"judge.adapter={folder}"], "label_preferences") if case == "judge.adapter"
                            else ([f"critique_revise.critic_adapter={folder}"], "critique_revise"))
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", f"stages=[{','.join(STAGES)}]", *overrides])
    _done_all(cfg)
    assert set(stage_plan.plan(cfg).actions.values()) == {"skip"}

    _overwrite_keeping_stat(target, new)  # another model, copied over the file at the same path
    with pytest.raises(ConfigError) as e:  # not skipped as done, with labels of the old model
        stage_plan.plan(cfg)
    digest = json.loads((cfg.path / stage / "stage.json").read_text())["config"][f"{case}:sha256"]
    changed = rundir.content_digest(target.parent if case != "judge.gguf_path" else target)
    assert changed != digest
    assert e.value.errors == [f"{stage}: already done with other settings: {case}:sha256: {digest!r} -> {changed!r}. "
                              f"Use force=[{stage}] to redo it, or run_name= for a new run"]
    forced = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", f"stages=[{','.join(STAGES)}]", *overrides,
                          f"force=[{stage}]"])
    assert stage_plan.plan(forced).actions[stage] == "run"

    _overwrite_keeping_stat(target, old)  # the same bytes back: the same model, still done
    assert set(stage_plan.plan(cfg).actions.values()) == {"skip"}


def test_the_digest_is_cached_by_stat_and_rehashed_on_any_write(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"a" * 5000)
    cache: dict = {}
    digest = rundir.content_digest(path, cache)
    assert cache == {}  # written just now: it may change again within the clock's tick, so not cached
    now = time.time_ns
    monkeypatch.setattr(rundir.time, "time_ns", lambda: now() + 10 * 10**9)  # as if hashed 10 s after the write
    assert rundir.content_digest(path, cache) == digest
    entry = cache[str(path.resolve())]
    assert entry["sha256"].startswith(digest) and len(entry["stat"]) == 5
    entry["sha256"] = "f" * 64  # what a cache hit returns: proof that an unchanged file is not read again
    assert rundir.content_digest(path, cache) == "f" * 16
    ctime = path.stat().st_ctime_ns
    while path.stat().st_ctime_ns == ctime:  # the same bytes written again, one clock tick later
        time.sleep(0.01)
        _overwrite_keeping_stat(path, b"a" * 5000)
    assert rundir.content_digest(path, cache) == digest
    entry = cache[str(path.resolve())]
    entry["sha256"] = "f" * 64
    shutil.copyfile(path, tmp_path / "copy.gguf")
    os.replace(tmp_path / "copy.gguf", path)  # another inode at the path
    assert rundir.content_digest(path, cache) == digest and cache[str(path.resolve())]["stat"][1] == path.stat().st_ino
    # The cache file: written by a plan (conftest points CAI_LITE_CACHE at a temporary folder).
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "judge=llamacpp", f"judge.gguf_path={path}"])
    stage_plan.plan(cfg)
    stored = json.loads((Path(os.environ["CAI_LITE_CACHE"]) / "digests.json").read_text())
    assert stored[str(path.resolve())]["sha256"].startswith(digest)


def test_paper_eval_files_are_pinned_by_content(tmp_path):
    hhh = tmp_path / "438HHHEvaluations.jsonl"
    hhh.write_text('{"input": "q", "targets": {"choices": ["a", "b"], "labels": [1, 0]}}\n')
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", f"evaluate.hhh_path={hhh}"])
    before = rundir.file_digests(cfg, ("evaluate",))["evaluate.hhh_path:sha256"]
    hhh.write_text('{"input": "q", "targets": {"choices": ["a", "b"], "labels": [0, 1]}}\n')
    assert rundir.file_digests(cfg, ("evaluate",))["evaluate.hhh_path:sha256"] != before
