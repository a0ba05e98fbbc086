"""PEFT adapter folders on disk: read and checked without a model (`adapter_config.json`, its JSON
and the types of the LoRA options; `adapter_model.safetensors` and the optional `head.safetensors`,
complete, floating point, finite), saved from and loaded into the shared base. Every problem
raises data.DataError naming the file, which the CLI prints without a traceback. `check()` is the
part that runs before any model loads; `load_adapter` then checks that the tensors fit the base.
The adapters themselves (adding, copying, switching) stay in models.py.

Reads and writes PEFT folders (+ `head.safetensors`), and writes a reward model as a PEFT folder of
transformers' sequence-classification kind (`save_classifier`). Saved folders name their base by
absolute path, so PEFT's AutoPeftModel* classes find it from any directory.

    python -c "from cai_lite import adapter_files; print(adapter_files.check('runs/tiny/sft/adapter'))"
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cai_lite import models
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
    (a truncated file fails here). Whether the tensors fit the base is known only in load_adapter."""
    folder = Path(folder)
    try:
        read_config(folder)
        read_tensors(folder / "adapter_model.safetensors", header_only=True)
        if (folder / "head.safetensors").is_file():
            read_tensors(folder / "head.safetensors", header_only=True)
    except DataError as e:
        return [str(e)]
    return []


def save_adapter(base: models.SharedBase, name: str, folder: str | Path) -> Path:
    """Write `name` as a plain PEFT folder any PEFT user can load, plus `head.safetensors` if it has a head."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # PEFT's own key format (adapter name removed), so PeftModel.from_pretrained reads the folder.
    state = {k: v.detach().contiguous().cpu() for k, v in models.lora_tensors(base, name)}
    save_file(state, folder / "adapter_model.safetensors")
    _portable_config(base, name).save_pretrained(folder)
    if name in base.heads:
        save_file({k: v.detach().cpu() for k, v in base.heads[name].state_dict().items()}, folder / "head.safetensors")
    return folder


def save_classifier(base: models.SharedBase, name: str, folder: str | Path) -> Path:
    """Adapter `name` and its scalar head as a sequence-classification PEFT folder: task SEQ_CLS,
    the head as the `score` layer (num_labels=1) of transformers' *ForSequenceClassification, so
    `AutoPeftModelForSequenceClassification.from_pretrained(folder, num_labels=1)` loads a model that
    scores as `rollout.sequence_scores` does. That `score` layer has no bias: the head's must be 0."""
    head = base.heads[name]
    if head.bias.detach().abs().max().item() != 0:
        raise ValueError(f"adapter {name!r}: its head has a bias, which a *ForSequenceClassification score cannot hold")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in models.lora_tensors(base, name)}
    state["base_model.model.score.weight"] = head.weight.detach().contiguous().cpu()  # PEFT's key for modules_to_save
    save_file(state, folder / "adapter_model.safetensors")
    config = _portable_config(base, name)
    config.task_type, config.modules_to_save = "SEQ_CLS", ["score"]
    config.save_pretrained(folder)
    return folder


def _portable_config(base: models.SharedBase, name: str) -> LoraConfig:
    """The adapter's LoraConfig naming its base by absolute path: PEFT records base.model as given
    (often relative), and AutoPeftModel* would then find the base only from the run's directory."""
    config = copy.copy(base.model.peft_config[name])
    config.base_model_name_or_path = str(Path(base.cfg.base.model).expanduser().resolve())
    return config


def load_adapter(base: models.SharedBase, name: str, folder: str | Path, replace: bool = False) -> None:
    """Load a PEFT folder as `name` (frozen), with `head.safetensors` if there. Loading the folder an
    adapter already came from is a no-op, so later stages in the same process don't load it twice.
    A folder that is incomplete, unreadable or made for another base raises DataError naming the file,
    and leaves the base as it was, but for the adapter `name` it replaces."""
    folder = Path(folder)
    config = read_config(folder)
    config.base_model_name_or_path = None  # the shared base is its base here, wherever it was loaded from then
    if name in base.adapters and base.sources.get(name) == str(folder.resolve()) and not replace:
        return
    # Every file is read and checked before the base is touched.
    saved = read_tensors(folder / "adapter_model.safetensors")
    head = read_tensors(folder / "head.safetensors") if (folder / "head.safetensors").is_file() else None
    if name in base.adapters:
        models.delete_adapter(base, name)
    # Not PEFT's load_adapter(): it takes a state dict of the whole model, which on CPU makes
    # bitsandbytes repack the shared 4-bit weights (see models.lora_tensors). Add, then copy tensors in.
    try:
        models.add_adapter(base, name, config=config)
    except (ValueError, TypeError, KeyError) as e:  # PEFT: target modules not in this model, bad options
        if name in base.adapters:
            models.delete_adapter(base, name)
        raise DataError(f"{folder}/adapter_config.json: PEFT cannot add this adapter to the base "
                        f"({type(e).__name__}: {e})") from None
    if head is not None:
        base.heads[name] = models.new_head(base)
    try:
        _copy_in(base, name, folder, saved, head)
    except DataError:
        models.delete_adapter(base, name)
        raise
    base.sources[name] = str(folder.resolve())
    models.freeze(base, name)


def fill_adapter(base: models.SharedBase, name: str, folder: str | Path) -> None:
    """Copy a saved adapter folder's tensors (and head) into the existing adapter `name`, in place:
    the Parameter objects stay the same, so an optimizer that holds them can resume training."""
    folder = Path(folder)
    saved = read_tensors(folder / "adapter_model.safetensors")
    head = read_tensors(folder / "head.safetensors") if (folder / "head.safetensors").is_file() else None
    _copy_in(base, name, folder, saved, head)


def _copy_in(base: models.SharedBase, name: str, folder: Path, saved: dict, head: dict | None) -> None:
    """Check that saved tensors fit adapter `name` (and its head), then copy them into it."""
    mine = dict(models.lora_tensors(base, name))
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    problems = [f"missing {missing[:2]}, unexpected {extra[:2]}"] if missing or extra else []
    problems += [f"{k} has shape {list(saved[k].shape)}, the base needs {list(t.shape)}"
                 for k, t in mine.items() if k in saved and saved[k].shape != t.shape][:2]
    if head is not None:
        want = {"weight": [1, base.hidden_size], "bias": [1]}
        got = {k: list(v.shape) for k, v in head.items()}
        if got != want:
            problems.append(f"{folder / 'head.safetensors'} holds {got}, the base needs {want}")
    if problems:
        raise DataError(f"{folder}: adapter does not fit this base ({'; '.join(problems)})")
    with torch.no_grad():
        for key, tensor in mine.items():
            tensor.copy_(saved[key])
    if head is not None:
        base.heads[name].load_state_dict(head)  # in place: the head's Parameters stay the same objects
