"""The stage table, and the plan of a run: which selected stages run and which are skipped, by hash.

A stage's hash covers the config keys its module declares (KEYS) and the hashes of the stages it
reads (READS, and OPTIONAL_READS that ran or run now), so changing a key reruns that stage and the
stages that read it, directly or not, and nothing else. `plan()` skips a stage whose stage.json has
the same hash, refuses one whose own keys changed (naming them) unless `force=[stage]`, and reruns
one whose only change is an upstream stage redone. Decided before any model loads; pipeline.py
then runs the plan.

Reads each stage's `stage.json` and the files the hashed keys name (their contents are hashed);
writes nothing.

    python -c "from cai_lite.recipe import load_config; from cai_lite import stage_plan; \
               print(stage_plan.plan(load_config(['recipe=tiny_cpu'])).actions)"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from cai_lite import rundir
from cai_lite.config import SHIPPED, Config
from cai_lite.stages import critique_revise, dpo, evaluate, export, label_preferences, ppo, reward_model, rloo, sft
from cai_lite.typed_yaml import ConfigError

_SHIPPED_PREFIX = f"{SHIPPED}{os.sep}"
# The pipeline, in order: plain stage modules. Each declares next to its run() the config KEYS its
# hash covers, the stages it READS (and OPTIONAL_READS when they ran), the OUTPUTS it leaves in its
# folder and the HEADLINE metric of the summary; it may define check(cfg), run before any model loads.
STAGES = [critique_revise, sft, label_preferences, reward_model, ppo, rloo, dpo, evaluate, export]
NAMES = [s.__name__.rsplit(".", 1)[1] for s in STAGES]  # config.STAGES spells them too (a test keeps them equal)


# Judge keys that change speed or when to give up, not the labels.
UNHASHED = ("concurrency", "timeout_s", "retries", "batch_size", "n_threads", "max_failure_rate")
# Which engine samples (generation.backend) and how it is reached are not hashed: the prompts, settings
# and seeds are the same on both, the model is pinned by base.model and the adapters by the stages that
# made them, so a run can move its sampling to a server (evaluate only, say) without its finished
# stages looking out of date. Each stage.json records the backend that made its text, and partial
# shards resume only on the backend that began them (pipeline._execute).
SERVER_FIELDS = ("backend", "model", "adapters", "base_url", "api_key_env", "concurrency", "timeout_s", "retries")


def _portable(value):
    """Shipped files' paths as recipes spell them ("recipes/prompts/x.jsonl"): recipe.shipped makes
    them absolute when the run starts outside the checkout, and a hash must not depend on the
    directory a run was started from (the files' contents are hashed on their own)."""
    if isinstance(value, str) and value.startswith(_SHIPPED_PREFIX):
        return value[len(_SHIPPED_PREFIX):]
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    return value


def _pick(cfg: Config, key: str):
    return _portable(_pick_raw(cfg, key))


def _pick_raw(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    if key in ("judge", "judges"):
        judges = [value] if key == "judge" else value
        picked = [{k: v for k, v in dataclasses.asdict(j).items() if k not in UNHASHED} for j in judges]
        return picked[0] if key == "judge" else picked
    if dataclasses.is_dataclass(value):  # how often to checkpoint, how many logits at once, how many rows
        # the run browser embeds (a page `cai-lite report` redraws), how many rows are sampled at once
        # (each row draws from its own seed, so its text does not depend on its batch; `auto` picks by
        # the device's memory, which must not make a run on another card look changed): never what is made
        skip = ("save_every", "logit_chunk", "report_rows", "rollout_batch_size") \
            + (SERVER_FIELDS + ("batch_size",) if key == "generation" else ())
        return {k: v for k, v in dataclasses.asdict(value).items() if k not in skip}
    return value


def _flatten(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def read_stage_json(cfg: Config, name: str) -> dict | None:
    p = rundir.stage_dir(cfg.path, name) / "stage.json"
    return json.loads(p.read_text()) if p.is_file() else None


@dataclass
class Plan:
    """What each selected stage will do, decided before any model loads."""

    actions: dict[str, str]  # stage -> run | skip
    hashes: dict[str, str]
    snapshots: dict[str, dict]
    inputs: dict[str, list[str]]  # stage -> the upstream stages whose outputs it reads in this run


def _stale(done: dict | None, present: list[str], outputs: dict[str, str | None]) -> list[str]:
    """Upstream stages whose output changed (or will be remade now) since `done` was made from it."""
    made_from = (done or {}).get("inputs_done", {})
    return [up for up in present if outputs.get(up) is None or made_from.get(up) != outputs[up]]


def plan(cfg: Config) -> Plan:
    """Decide run/skip for every selected stage; raise ConfigError with every refusal.

    A stage reruns when forced, when its config hash changed through an upstream stage's config,
    or when an upstream output it read was remade since (each stage.json records the `output_id`
    of what it read). It is refused when its own keys changed, and so is reading an unselected
    stage whose output no longer matches the config or its own inputs."""
    errors: list[str] = []
    selected = {name for name in NAMES if name in cfg.stages}
    hashes: dict[str, str] = {}
    snapshots: dict[str, dict] = {}
    actions: dict[str, str] = {}
    inputs: dict[str, list[str]] = {}
    outputs: dict[str, str | None] = {}  # stage -> output_id on disk; None if remade in this run
    lab_model = _lab_hash(cfg)
    for name, stage in zip(NAMES, STAGES):
        done = read_stage_json(cfg, name)
        present = [up for up in stage.READS + stage.OPTIONAL_READS if up in selected or read_stage_json(cfg, up)]
        inputs[name] = present
        if name in selected:
            for up in stage.READS:
                if up not in present:
                    errors.append(f"stages: {name} reads the output of {up}, which is neither selected nor "
                                  f"done in {cfg.path} (add {up} to stages)")
        snap = {"config": {k: _pick(cfg, k) for k in stage.KEYS} | rundir.file_digests(cfg, stage.KEYS),
                "inputs": {up: hashes[up] for up in present}}
        if lab_model:  # the base's content, which its path and seed alone do not pin (a new release retrains it)
            snap["config"]["base.lab_model"] = lab_model
        snapshots[name] = snap
        hashes[name] = hashlib.sha256(json.dumps(snap, sort_keys=True, default=str).encode()).hexdigest()[:16]
        changes = _own_changes(done, snap) if done else []
        stale = _stale(done, present, outputs)
        if name not in selected:
            outputs[name] = done.get("output_id") if done else None
            readers = [n for n, s in zip(NAMES, STAGES) if n in selected and name in s.READS + s.OPTIONAL_READS]
            if done and readers and (changes or stale):
                why = (f"it was made with other settings ({'; '.join(changes)})" if changes
                       else f"its input {', '.join(stale)} was remade after it ran")
                errors.append(f"{name}: its output in {cfg.path} is out of date: {why}, and "
                              f"{', '.join(readers)} would read it; add {name} to stages to redo it")
            continue
        if name in cfg.force or done is None:
            actions[name] = "run"
        elif changes:
            errors.append(f"{name}: already done with other settings: {'; '.join(changes)}. "
                          f"Use force=[{name}] to redo it, or run_name= for a new run")
        elif done["config_hash"] != hashes[name] or stale:
            actions[name] = "run"  # an upstream stage changed or was redone: redo this one too
        else:
            actions[name] = "skip"
        outputs[name] = None if actions.get(name) == "run" else done.get("output_id")
    if errors:
        raise ConfigError(errors)
    return Plan(actions, hashes, snapshots, inputs)


def _own_changes(done: dict, snap: dict) -> list[str]:
    old, new = _flatten(done.get("config", {})), _flatten(snap["config"])
    # Outputs made before inputs were hashed by content record no digest: trust them by path.
    new = {k: v for k, v in new.items() if not k.endswith(":sha256") or k in old}
    # Keys a stage no longer declares (a newer cai_lite hashes fewer) are no change of settings: the
    # hash differs, so the stage reruns rather than being refused.
    old = {k: v for k, v in old.items() if k in new}
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


LAB_SIZES = {"lab": "default", "lab-ci": "ci"}  # base.create -> cai_lite.lab.pretrain.SIZES


def _lab_hash(cfg: Config) -> str:
    """Content hash of the lab model `base.create` builds ("" for other bases)."""
    if cfg.base.create not in LAB_SIZES:
        return ""
    from cai_lite.lab import pretrain

    return pretrain.expected_hash(cfg.seed, LAB_SIZES[cfg.base.create])
