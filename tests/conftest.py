"""Shared fixtures: tiny models built once per session, the reference data folder, and configs that
point a tiny_cpu run at a temporary directory. Tests use the same `load_config` and
`pipeline.run` as run.py.

    python -m pytest -q
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cai_lite import models
from cai_lite.recipe import load_config
from cai_lite.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout (or $CAI_LITE_SHARED_DATA): real data written by others."""
    for candidate in (os.environ.get("CAI_LITE_SHARED_DATA"), ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate, "README.md").is_file():
            return Path(candidate)
    raise FileNotFoundError("reference data not found: expected ../shared/data beside the checkout, "
                            "or set CAI_LITE_SHARED_DATA")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


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
