"""Shared fixtures: tiny models built once per session, the reference data (the small copies in
tests/fixtures/ always, the full files of ../shared/data when present), a guard that records and
refuses network connections, and configs that point a tiny_cpu run at a temporary directory. Tests
use the same `load_config` and `pipeline.run` as run.py.

    python -m pytest -q
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cai_lite import data, models, pipeline, stage_plan
from cai_lite.recipe import load_config
from cai_lite.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"  # small files in the reference formats; see its README for sources


def shared_data_dir() -> Path | None:
    """`../shared/data` beside the checkout (or $CAI_LITE_SHARED_DATA): the full reference files, or None."""
    for candidate in (os.environ.get("CAI_LITE_SHARED_DATA"), ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate, "README.md").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full reference files; tests that need them are skipped on a clone without them."""
    found = shared_data_dir()
    if found is None:
        pytest.skip("full reference data absent: set CAI_LITE_SHARED_DATA or place it at ../shared/data "
                    "(tests/fixtures/ covers the same code paths)")
    return found


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Record, and refuse with OSError, every host lookup and every socket connection (local ones
    too) made while the test runs; the test asserts on the returned list. Opt-in: other tests
    start local llama_cpp servers."""
    attempts: list = []

    def lookup(host, *args, **kwargs):
        attempts.append(("getaddrinfo", host))
        raise OSError(f"network blocked by the no_network fixture: lookup of {host!r}")

    def connect(sock, address, *args, **kwargs):
        if sock.family == socket.AF_UNIX:
            return real_connect(sock, address, *args, **kwargs)
        attempts.append(("connect", address))
        raise OSError(f"network blocked by the no_network fixture: connect to {address!r}")

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return attempts


@pytest.fixture(scope="session", autouse=True)
def lab_cache(tmp_path_factory):
    """Lab models pretrained by tests go to a temporary cache, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CAI_LITE_CACHE", str(tmp_path_factory.mktemp("cai_lite_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama at the usual init: near-uniform outputs, fine for plumbing and training."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def sharp_llama(tmp_path_factory) -> Path:
    """A random Llama with larger weights, so its next-token distributions are far from uniform."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "sharp-llama", "llama", init_std=0.2, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2")


def tiny_config(run_dir: Path, model_dir: Path, *overrides: str):
    """The tiny_cpu recipe on an existing tiny model, writing into `run_dir`."""
    return load_config(["recipe=tiny_cpu", f"run_dir={run_dir}", f"base.model={model_dir}", "base.create=none",
                        *overrides])


@pytest.fixture(scope="module")
def nf4_base(tiny_llama, tmp_path_factory):
    """One NF4 base per test module (loading is the slow part); tests add their own adapters."""
    cfg = tiny_config(tmp_path_factory.mktemp("run"), tiny_llama)
    return models.load_base(cfg)


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    """The real stage table with each run() replaced by one that records its folder's files and
    writes a shard; models.load_base returns a stand-in (no model is loaded)."""
    seen: dict[str, list[str]] = {}
    stand_in = SimpleNamespace(device=torch.device("cpu"))

    def fake_run(name, stage):
        def run(cfg, base, out):
            seen[name] = sorted(p.name for p in out.iterdir())
            assert base is stand_in and cfg is seen["cfg"] and out == cfg.path / name
            assert pipeline.current_stage.get() == name  # log lines carry the stage's name
            data.write_shard(data.shard_path(out, len(list(out.glob("part-*.jsonl")))), [{"stage": name}])
            for pattern in stage.OUTPUTS:  # the pipeline refuses a stage.json without them
                if not any(out.glob(pattern)):
                    (out / pattern.replace("*", "00000")).touch()
            return {"made": name}
        return run

    for name, stage in zip(stage_plan.NAMES, stage_plan.STAGES):
        monkeypatch.setattr(stage, "run", fake_run(name, stage))
        monkeypatch.delattr(stage, "check", raising=False)
    monkeypatch.setattr(models, "load_base", lambda cfg: seen.update(cfg=cfg) or stand_in)
    # The stand-in model folder below has no shape to size batch_size=auto by; the stages are fakes anyway.
    monkeypatch.setattr(pipeline, "resolve_auto", lambda cfg: cfg)
    monkeypatch.setattr(models, "memory_account", lambda base: {})
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return seen, [f"base.model={model}", "base.create=none"]
