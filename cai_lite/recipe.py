"""Load a recipe into a validated Config: `load_config(argv)`, `validate(cfg)`, and `--help`.

Reads `recipes/<name>.yaml` (plain data that fills the dataclasses of config.py) and `key=value`
overrides from the command line. Every problem (unknown recipe, unknown key, wrong type, bad
range) is collected and raised together as one ConfigError, before any model loads.

    python run.py --help
    python -c "from cai_lite.recipe import load_config; print(load_config(['recipe=tiny_cpu', 'sft.lr=1e-4']).sft)"
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from cai_lite.config import DEFAULT_RECIPE, RECIPES, STAGES, Config
from cai_lite.typed_yaml import ConfigError, apply_override, build, describe, parse_override


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


def load_config(argv: list[str]) -> Config:
    """Recipe + `key=value` overrides -> a validated Config. Raises ConfigError listing every problem."""
    errors: list[str] = []
    overrides = []
    recipe = DEFAULT_RECIPE
    for arg in argv:
        parsed = parse_override(arg)
        if parsed is None:
            errors.append(f"{arg}: expected key=value (see --help)")
        elif parsed[0] == "recipe":
            recipe = parsed[2]
        else:
            overrides.append(parsed)
    path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        names = ", ".join(available_recipes()) or "(none)"
        errors.append(f"recipe={recipe}: no such recipe ({path}); available: {names}")
        for key, value, raw in overrides:  # still report bad overrides, against the schema's defaults
            apply_override(Config(), Config, key, value, raw, errors)
        raise ConfigError(errors)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(errors + [f"{path}: not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(errors + [f"{path}: a recipe is a mapping of keys, got {type(data).__name__}"])
    data["recipe"] = path.stem
    cfg = build(Config, data, "", errors)
    for key, value, raw in overrides:
        apply_override(cfg, Config, key, value, raw, errors)
    _resolve_judges(cfg, data, overrides)
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
    """Checks that need no file or model: ranges and cross-field rules. Each message names its key."""
    e = []
    for key in ("stages", "force"):
        for s in getattr(cfg, key):
            if s not in STAGES:
                e.append(f"{key}: unknown stage {s!r} (stages: {', '.join(STAGES)})")
    if cfg.critique_revise.rounds < 1:
        e.append(f"critique_revise.rounds must be >= 1 (got {cfg.critique_revise.rounds})")
    if cfg.label_preferences.num_responses < 2:
        e.append(f"label_preferences.num_responses must be >= 2 to form a pair (got {cfg.label_preferences.num_responses})")
    if cfg.label_preferences.num_principles < 1:
        e.append(f"label_preferences.num_principles must be >= 1 (got {cfg.label_preferences.num_principles})")
    if cfg.rloo.num_samples < 2:
        e.append(f"rloo.num_samples must be >= 2 for a leave-one-out baseline (got {cfg.rloo.num_samples})")
    if not 0 < cfg.reward_model.eval_fraction < 1:
        e.append(f"reward_model.eval_fraction must be in (0, 1) (got {cfg.reward_model.eval_fraction})")
    if cfg.ppo.minibatch_size >= 1 and cfg.ppo.batch_size % cfg.ppo.minibatch_size:
        e.append(f"ppo.batch_size ({cfg.ppo.batch_size}) must be a multiple of ppo.minibatch_size ({cfg.ppo.minibatch_size})")
    if not 0 <= cfg.dpo.min_confidence < 0.5:
        e.append(f"dpo.min_confidence must be in [0, 0.5) (got {cfg.dpo.min_confidence})")
    for t in cfg.export.gguf_types:
        if t not in ("f32", "f16", "q8_0"):
            e.append(f"export.gguf_types: unknown type {t!r} (f32, f16, q8_0)")
    if cfg.export.adapter not in ("none", "sft", "ppo", "rloo", "dpo"):
        e.append(f"export.adapter must be none, sft, ppo, rloo or dpo (got {cfg.export.adapter!r})")
    at_least_one = ["generation.batch_size", "generation.max_new_tokens", "generation.max_prompt_tokens", "lora.r",
                    "critique_revise.shard_size", "label_preferences.shard_size", "sft.batch_size", "sft.grad_accum",
                    "reward_model.batch_size", "reward_model.epochs", "ppo.steps", "ppo.batch_size", "ppo.minibatch_size",
                    "ppo.grad_accum", "ppo.ppo_epochs", "ppo.max_new_tokens", "rloo.steps", "rloo.batch_size",
                    "rloo.max_new_tokens", "dpo.batch_size", "dpo.grad_accum", "evaluate.max_new_tokens",
                    "evaluate.bootstrap", "judge.batch_size", "judge.n_ctx", "judge.n_threads", "judge.concurrency",
                    "judge.top_logprobs"]
    at_least_zero = ["data.limit", "data.eval_prompts", "critique_revise.few_shot", "critique_revise.helpful_limit",
                     "label_preferences.max_prompts", "label_preferences.few_shot", "evaluate.helpful_limit",
                     "evaluate.paper_eval_limit", "judge.retries"]
    for key, minimum in [(k, 1) for k in at_least_one] + [(k, 0) for k in at_least_zero]:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)  # every key here is in the schema: no default needed
        if value < minimum:
            e.append(f"{key} must be >= {minimum} (got {value})")
    return e


def help_text() -> str:
    lines = ["usage: python run.py [recipe=NAME] [key=value ...]", "", "recipes (recipes/*.yaml):"]
    lines += [f"  {name:<14} {desc}" for name, desc in available_recipes().items()]
    lines += ["", f"With no recipe=, runs {DEFAULT_RECIPE}. Overrides use dotted keys: sft.lr=1e-4 stages=[sft,ppo]",
              "", "config keys (type = default):"]
    return "\n".join(lines + describe(Config))
