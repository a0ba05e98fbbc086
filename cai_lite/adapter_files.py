"""PEFT adapter folders read and checked without a model: `adapter_config.json` (its JSON and the
types of the LoRA options), `adapter_model.safetensors` and the optional `head.safetensors`
(complete files, floating point, finite). Every problem raises data.DataError naming the file,
which the CLI prints without a traceback. models.load_adapter then checks that the tensors fit
the base; `check()` is the part that runs before any model loads.

Reads a PEFT folder; writes nothing.

    python -c "from cai_lite import adapter_files; print(adapter_files.check('runs/tiny/sft/adapter'))"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from cai_lite.data import DataError


def read_config(folder: str | Path) -> LoraConfig:
    """`folder/adapter_config.json` as a LoraConfig, its types checked: PEFT itself takes `"r": "8"`
    or a number for `target_modules` and fails later, deep in the model."""
    folder = Path(folder)
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise DataError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        raw = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object (PEFT's LoraConfig), got {type(raw).__name__}")
    checks = {"peft_type": (lambda v: v == "LORA", "LORA (cai_lite loads LoRA adapters only)"),
              "r": (lambda v: type(v) is int and v > 0, "a positive integer"),
              "lora_alpha": (lambda v: type(v) in (int, float) and v > 0, "a positive number"),
              "lora_dropout": (lambda v: type(v) in (int, float) and 0 <= v < 1, "a number in [0, 1)"),
              "target_modules": (lambda v: v is None or isinstance(v, str)
                                 or (isinstance(v, list) and all(isinstance(m, str) for m in v)),
                                 "a module name pattern or a list of module names")}
    bad = [f"{k} must be {want} (got {raw[k]!r})" for k, (ok, want) in checks.items() if k in raw and not ok(raw[k])]
    if bad:
        raise DataError(f"{path}: " + "; ".join(bad))
    try:
        return LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError, AttributeError) as e:  # PEFT's own checks on the options
        raise DataError(f"{path}: not a LoRA config PEFT can read ({type(e).__name__}: {e})") from None


def read_tensors(path: Path, header_only: bool = False) -> dict[str, torch.Tensor]:
    """A safetensors file, on CPU, every tensor floating point and finite; with `header_only`, only
    its header is read and checked (nothing is returned)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (cai_lite loads adapters as safetensors only)")
    try:
        if header_only:
            with safe_open(path, "pt") as f:  # also checks that the tensors' byte ranges fit in the file
                f.keys()
            return {}
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path}: cannot read it ({e}); is it a complete safetensors file?") from None
    bad = [k for k, t in tensors.items() if not t.is_floating_point() or not torch.isfinite(t).all()]
    if bad:
        raise DataError(f"{path}: tensor {bad[0]} is not floating point or holds NaN/inf "
                        f"({len(bad)} such tensor(s))")
    return tensors


def check(folder: str | Path) -> list[str]:
    """Problems with a PEFT folder found without a model: its config, and the safetensors headers
    (a truncated file fails here). Whether the tensors fit the base is known only in models.load_adapter."""
    folder = Path(folder)
    try:
        read_config(folder)
        read_tensors(folder / "adapter_model.safetensors", header_only=True)
        if (folder / "head.safetensors").is_file():
            read_tensors(folder / "head.safetensors", header_only=True)
    except DataError as e:
        return [str(e)]
    return []
