"""Stage label_preferences: RLAIF labels (CAI §4.1). The SL-CAI policy (`sft` adapter) samples
`num_responses` answers per prompt; every pair is judged under `num_principles` sampled preference
principles, in both option orders, by one or several judges. The label is soft: P(A better) from
the log-probs of "(A)" vs "(B)", averaged over orders and principles, then combined across judges.
Benign prompts from `label_preferences.helpful_prompts` are judged under the helpfulness principle
alone (`constitution.HELPFUL_PRINCIPLE`), standing in for the paper's human helpfulness labels: without
them the reward model only ever sees red-team prompts, and RL learns to refuse everything.

Reads the red-team prompts (`label_preferences.prompts`, or the SL-CAI ones of `data.*`), the helpful
prompts, `sft/adapter/`, the constitution and the judges. Writes
`label_preferences/part-NNNNN.jsonl` shards (atomic; a rerun resumes at the first missing one),
rows with `type` (harmless | helpful), `prompt, response_a, response_b, p_a, confidence, chosen,
rejected, judges` (per judge,
per principle, per order, CoT text). `prompt` (the user turn) and `chosen`/`rejected` (one assistant
message each) are TRL's conversational preference format, so DPOTrainer and RewardTrainer read the
shards as they are. A comparison no judge could label keeps `p_a: null` in `failed-NNNNN.jsonl`
beside its shard, and is counted.

    python run.py recipe=tiny_cpu stages=[critique_revise,sft,label_preferences] judge=llamacpp judge.gguf_path=x.gguf
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import transformers
from tqdm.auto import tqdm

from cai_lite import constitution as C
from cai_lite import adapter_files, data, generation, generation_http, judges, rundir, voting
from cai_lite.config import Config
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)


def check(cfg: Config) -> list[str]:
    errors = judges.check(cfg) + generation_http.check(cfg.generation, ["sft"])
    try:
        const = C.load(cfg.constitution)
        if not const.preference:
            errors.append(f"constitution: {const.source} has no preference principles, which RLAIF labelling needs "
                          f"({'; '.join(const.notes) or 'add a preference: list'})")
    except C.ConstitutionError as e:
        errors.append(f"constitution: {e}")
    lp = cfg.label_preferences
    return (errors + data.check_source("label_preferences.prompts", lp.prompts)
            + data.check_source("label_preferences.helpful_prompts", lp.helpful_prompts))


# The contract pipeline.py reads: config keys in this stage's hash, stages it reads (OPTIONAL_READS:
# when they ran), what it leaves in label_preferences/ before stage.json, and the metric the run's summary shows.
KEYS = rundir.BASE_KEYS + ("generation", "data", "constitution", "judge", "judges", "judge_vote",
                           "label_preferences")
READS = ("sft",)
OPTIONAL_READS = ()
OUTPUTS = ("part-*.jsonl",)
HEADLINE = "labels"


def run(cfg: Config, base: SharedBase, out: Path) -> dict:
    lp = cfg.label_preferences
    const = C.load(cfg.constitution)
    prompts = data.read_optional(lp.prompts, 0, cfg.data.max_prompt_chars) if lp.prompts else data.prompt_split(cfg).train
    prompts = prompts[: lp.max_prompts] if lp.max_prompts else prompts
    helpful = data.read_optional(lp.helpful_prompts, lp.helpful_limit, cfg.data.max_prompt_chars)
    items = [("harmless", p) for p in prompts] + [("helpful", p) for p in helpful]
    adapter_files.load_adapter(base, "sft", rundir.adapter_dir(cfg.path, "sft"))
    panel = judges.build(cfg, base)
    seconds = {j.name: 0.0 for j in panel}
    tally: dict[str, list[int]] = {}  # failed and total answers of this run, per judge
    compared = 0
    try:
        for index, shard in enumerate(tqdm(data.chunks(items, lp.shard_size), desc="label shards")):
            path = data.shard_path(out, index)
            if path.is_file():
                continue
            transformers.set_seed(rundir.shard_seed(cfg.seed, "label_preferences", index))  # same draws when resumed
            rows, n = _label_shard(cfg, base, const, panel, shard, seconds)
            compared += n
            data.write_shard_pair(out, index, [r for r in rows if r["p_a"] is not None],
                                  [r for r in rows if r["p_a"] is None])
            # Checked after each shard, so a judge that cannot answer stops the run early, not after hours.
            orders = ("p_ab", "p_ba") if lp.both_orders else ("p_ab",)
            for i, j in enumerate(panel):
                answers = [c[k] for r in rows for c in r["judges"][j.name]["principles"] for k in orders]
                judges.record_failures(cfg, tally, i, j, answers, "judge answers")
    finally:
        for j in panel:
            j.close()
    rows = data.read_shards(out) + data.read_failed(out)
    return _metrics(cfg, rows, panel, seconds, compared)


def _label_shard(cfg: Config, base: SharedBase, const: C.Constitution, panel: list, shard: list,
                 seconds: dict) -> tuple[list[dict], int]:
    lp, k = cfg.label_preferences, cfg.label_preferences.num_responses
    rendered = [data.render(base.tokenizer, [{"role": "user", "content": p.text}]) for _, p in shard]
    sampled = generation.sample(base, [r for r in rendered for _ in range(k)], "sft", cfg.generation,
                                  temperature=lp.temperature, desc="responses")
    comps, meta = [], []
    for pi, (kind, p) in enumerate(shard):
        answers = sampled.texts[pi * k:(pi + 1) * k]
        for i, j in itertools.combinations(range(k), 2):
            rng = C.rng_for(cfg.seed, f"{p.id}:{i}:{j}")
            principles = (C.sample(const.preference, lp.num_principles, rng) if kind == "harmless"
                          else [C.HELPFUL_PRINCIPLE])
            comps.append(judges.Comparison(data.conversation_text(p.text), answers[i], answers[j], principles))
            meta.append((kind, p))
    demos = const.preference_demos[: lp.few_shot]
    per_judge = {}
    for judge in panel:
        start = time.perf_counter()
        per_judge[judge.name] = judges.compare(judge, comps, lp.both_orders, demos, lp.cot, lp.cot_max_new_tokens)
        seconds[judge.name] += time.perf_counter() - start
    rows = []
    for ci, (c, (kind, p)) in enumerate(zip(comps, meta)):
        p_a = voting.vote([per_judge[j.name][ci].p_a for j in panel], cfg.judge_vote)
        user = {"role": "user", "content": p.text}
        better, worse = (c.response_a, c.response_b) if p_a is None or p_a >= 0.5 else (c.response_b, c.response_a)
        rows.append({
            "id": f"{p.id}:{ci}",
            "type": kind,
            "prompt": [user],
            "response_a": c.response_a,
            "response_b": c.response_b,
            "p_a": p_a,
            "confidence": None if p_a is None else abs(p_a - 0.5),
            "chosen": [{"role": "assistant", "content": better}],
            "rejected": [{"role": "assistant", "content": worse}],
            "judges": {j.name: {"p_a": per_judge[j.name][ci].p_a, "principles": per_judge[j.name][ci].details}
                       for j in panel},
        })
    return rows, len(comps)


def _metrics(cfg: Config, rows: list[dict], panel: list, seconds: dict, compared: int) -> dict:
    names = [j.name for j in panel]
    failed = sum(r["p_a"] is None for r in rows)
    per_judge = {}
    for name in names:
        cells = [d for r in rows for d in r["judges"][name]["principles"]]
        per_judge[name] = {
            "failures": sum(r["judges"][name]["p_a"] is None for r in rows),
            "position_consistency": voting.rate([voting.position_consistent(d["p_ab"], d["p_ba"]) for d in cells]),
            # How often slot (A) won before averaging, over both orders (ties left out): 0.5 for a judge
            # without position bias (RLAIF App. B saw 0.56).
            "first_slot_preference": voting.rate([p > 0.5 for d in cells for p in (d["p_ab"], d["p_ba"])
                                                  if p is not None and p != 0.5]),
            "preferences_per_second": round(compared / seconds[name], 3) if seconds.get(name) else None,
        }
    for j in panel:
        per_judge[j.name]["hard_labels"] = j.hard_labels
    labels = [r["p_a"] for r in rows if r["p_a"] is not None]
    metrics = {
        "labels": len(labels),
        "helpful_labels": sum(r["p_a"] is not None and r.get("type") == "helpful" for r in rows),
        "failures": failed,
        "failure_rate": failed / len(rows) if rows else None,
        "mean_confidence": sum(abs(p - 0.5) for p in labels) / len(labels) if labels else None,
        "judges": per_judge,
        "agreement": voting.agreement([[r["judges"][n]["p_a"] for r in rows] for n in names]) if len(names) > 1 else None,
        "vote": cfg.judge_vote,
        "generation": generation_http.describe(cfg.generation),
    }
    log.info("%d labels, %d failed; %s", len(labels), failed,
             ", ".join(f"{n}: consistency {v['position_consistency']}" for n, v in per_judge.items()))
    return metrics
