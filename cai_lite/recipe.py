"""Load a recipe into a validated Config: `load_config(argv)`, `validate(cfg)`, and `--help`.

Reads `recipes/<name>.yaml` or any YAML file (plain data that fills the dataclasses of config.py and
stage_config.py, optionally over a parent named by `defaults:`) and overrides from the command line
(`key=value`, `--key value`, `--config FILE.yaml`). Relative `recipes/...` and `constitutions/...`
paths that are not in the current directory resolve to the copies shipped with cai_lite. Every
problem (unknown recipe, unknown key, wrong type, bad range) is collected and raised together as one
ConfigError, before any model loads.

    cai-lite --help recipe=7b_qlora
    python -c "from cai_lite.recipe import load_config; print(load_config(['recipe=tiny_cpu', 'sft.lr=1e-4']).sft)"
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from cai_lite.config import DEFAULT_RECIPE, RECIPES, SHIPPED, STAGES, Config
from cai_lite.typed_yaml import ConfigError, apply_override, build, check_ranges, describe, parse_override

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m", "q5_k_m")


def available_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description."""
    out = {}
    for p in sorted(RECIPES.glob("*.yaml")):
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        out[p.stem] = str(data.get("description", "")) if isinstance(data, dict) else ""
    return out


def normalize_argv(argv: list[str], errors: list[str]) -> list[str]:
    """The conventional spellings as `key=value`: `--config F.yaml` is `recipe=F.yaml`, and
    `--key value`, `--key=value` and `--run-name x` are `key=value` (TRL, torchtune and
    LLaMA-Factory users type these)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            out.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i == len(argv) or argv[i].startswith("--"):
                errors.append(f"{arg}: expected a value ({arg} VALUE or {arg}=VALUE)")
                continue
            value = argv[i]
            i += 1
        key = key.replace("-", "_")  # schema keys use underscores; --run-name reads as run_name
        out.append(f"{'recipe' if key == 'config' else key}={value}")
    return out


def _recipe_path(spec: str, beside: Path | None = None) -> Path:
    """A recipe name -> the shipped recipes/<name>.yaml; a .yaml path -> that file (relative to the
    current directory, or for `defaults:` to the recipe that names it)."""
    if not spec.endswith((".yaml", ".yml")):
        return RECIPES / f"{spec}.yaml"
    path = Path(spec).expanduser()
    if beside is not None and not path.is_absolute() and (beside / path).is_file():
        return beside / path
    return path


def _merge(parent: dict, child: dict) -> dict:
    """`child` over `parent`: sections merge key by key, anything else (lists too) is replaced."""
    out = dict(parent)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: Path, errors: list[str], chain: tuple[Path, ...] = ()) -> dict | None:
    """The recipe's data with its `defaults:` parent (a recipe name or a .yaml path) merged under it."""
    if path.resolve() in chain:
        names = " -> ".join(p.stem for p in (*chain, path.resolve()))
        errors.append(f"{chain[0]}: defaults: the chain of parent recipes loops ({names})")
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        errors.append(f"{path}: not valid YAML: {e}")
        return None
    if not isinstance(data, dict):
        errors.append(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
        return None
    parent = data.pop("defaults", None)
    if parent is None:
        return data
    parent_path = _recipe_path(str(parent), path.parent) if isinstance(parent, str) else None
    if parent_path is None or not parent_path.is_file():
        names = ", ".join(available_recipes()) or "(none)"
        errors.append(f"{path}: defaults: {parent!r} is no recipe name or .yaml file; available: {names}")
        return None
    base = read_recipe(parent_path, errors, (*chain, path.resolve()))
    return None if base is None else _merge(base, data)


def shipped(value: str) -> str:
    """A relative `recipes/...` or `constitutions/...` path that is not in the current directory
    -> the copy shipped with cai_lite, so the recipes work from any directory and when installed."""
    p = Path(value)
    if not value or p.is_absolute() or p.exists() or p.parts[0] not in ("recipes", "constitutions"):
        return value
    return str(SHIPPED / p) if (SHIPPED / p).exists() else value


def _resolve_shipped(obj) -> None:
    """Apply `shipped` to every string in the config tree (judges' sections included)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, str):
            setattr(obj, f.name, shipped(value))
        elif dataclasses.is_dataclass(value):
            _resolve_shipped(value)
        elif isinstance(value, list):
            for item in value:
                if dataclasses.is_dataclass(item):
                    _resolve_shipped(item)


def load_config(argv: list[str]) -> Config:
    """Recipe + overrides -> a validated Config. Raises ConfigError listing every problem.

    `argv` takes `key=value`, `--key value`, `recipe=NAME|FILE.yaml` and `--config FILE.yaml`."""
    errors: list[str] = []
    overrides = []
    recipe = DEFAULT_RECIPE
    for arg in normalize_argv(argv, errors):
        parsed = parse_override(arg)
        if parsed is None:
            errors.append(f"{arg}: expected key=value or --key value (see --help)")
        elif parsed[0] == "recipe":
            recipe = parsed[2]
        else:
            overrides.append(parsed)
    path = _recipe_path(recipe)
    if not path.is_file():
        names = ", ".join(available_recipes()) or "(none)"
        errors.append(f"recipe={recipe}: no such recipe ({path}); available: {names}")
        for key, value, raw in overrides:  # still report bad overrides, against the schema's defaults
            apply_override(Config(), Config, key, value, raw, errors)
        raise ConfigError(errors)
    data = read_recipe(path, errors)
    if data is None:
        raise ConfigError(errors)
    data["recipe"] = path.stem
    cfg = build(Config, data, "", errors)
    for key, value, raw in overrides:
        apply_override(cfg, Config, key, value, raw, errors)
    _resolve_judges(cfg, data, overrides)
    _resolve_shipped(cfg)
    errors += validate(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def _resolve_judges(cfg: Config, data: dict, overrides: list) -> None:
    """`judges: [local, llamacpp]` entries given as names take every other field from `judge`."""
    raw = next((v for k, v, _ in reversed(overrides) if k == "judges"), data.get("judges", []))
    if not isinstance(raw, list):
        return
    for i, entry in enumerate(raw):
        if isinstance(entry, str) and i < len(cfg.judges):
            cfg.judges[i] = dataclasses.replace(cfg.judge, backend=cfg.judges[i].backend)


def validate(cfg: Config) -> list[str]:
    """Checks that need no file or model: each number field against the range declared beside it in
    config.py or stage_config.py (a negative temperature would quietly mean greedy, a negative
    learning rate would train backwards), and the rules across fields. Each message names its key."""
    e = []
    for key in ("stages", "force"):
        for s in getattr(cfg, key):
            if s not in STAGES:
                e.append(f"{key}: unknown stage {s!r} (stages: {', '.join(STAGES)})")
    e += check_ranges(cfg)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.base.device):
        e.append(f"base.device: expected auto, cpu, cuda or cuda:N, got {cfg.base.device!r}")
    if cfg.ppo.minibatch_size >= 1 and cfg.ppo.batch_size % cfg.ppo.minibatch_size:
        e.append(f"ppo.batch_size ({cfg.ppo.batch_size}) must be a multiple of ppo.minibatch_size ({cfg.ppo.minibatch_size})")
    if not cfg.export.gguf_types:
        e.append("export.gguf_types: empty; name at least one of " + ", ".join(GGUF_TYPES))
    for t in cfg.export.gguf_types:
        if t not in GGUF_TYPES:  # the same list as gguf_export.GGUF_TYPES, without importing gguf here
            e.append(f"export.gguf_types: unknown type {t!r} ({', '.join(GGUF_TYPES)})")
    return e


def help_text(argv: list[str] | None = None) -> str:
    """Usage, the recipes, and every key with its type and its value in the recipe that `argv`
    selects (with its overrides; the default recipe without one). Raises ConfigError like load_config."""
    cfg = load_config(argv or [])
    lines = ["usage: cai-lite [recipe=NAME | --config FILE.yaml] [key=value | --key value ...]",
             "       (the same: python -m cai_lite ..., or python run.py ... in a checkout)",
             "", f"recipes ({RECIPES}):"]
    lines += [f"  {name:<14} {desc}" for name, desc in available_recipes().items()]
    lines += ["", f"With no recipe, runs {DEFAULT_RECIPE}. Overrides use dotted keys: sft.lr=1e-4 stages=[sft,ppo]",
              "A recipe file may start with `defaults: NAME` (or a .yaml path) to take every key it does not set from NAME.",
              "Relative paths are read from the current directory; recipes/... and constitutions/... paths not found",
              "there are the copies shipped with cai_lite. Nothing is downloaded: base.model is a local folder.",
              "", f"config keys (type = value in recipe {cfg.recipe}; the schema's default follows where it differs):"]
    return "\n".join(lines + describe(Config, obj=cfg))
