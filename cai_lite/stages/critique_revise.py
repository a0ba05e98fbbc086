"""Stage critique_revise: SL-CAI data (Bai et al. 2022, §3). The policy answers red-team prompts;
then, for `critique_revise.rounds` rounds, a principle is sampled, the critic critiques the latest
answer against it, and revises it.

Reads the prompt source (`data.*`), optional helpful prompts, the constitution, and optionally a
policy adapter and a critique adapter (PEFT folders). Writes `critique_revise/part-NNNNN.jsonl`
shards, each atomically; a rerun after a crash regenerates only the missing shards. Rows carry the
Hugging Face CAI dataset columns (init_prompt, init_response, critic_prompt, critic_response,
revision_prompt, revision_response, messages, chosen, rejected) plus `rounds`, `id`, `type`, and are
in TRL's conversational prompt-completion format: `prompt` is the user turn, `completion` the final
revision, `chosen`/`rejected` the revision/initial answer, each a one-message list, so
`load_dataset("json")` feeds SFTTrainer as it is. A harmless row whose every revision came out empty
(or a helpful row with an empty answer) has nothing to train on: it goes to `failed-NNNNN.jsonl`
beside the shard, and is counted.

    python run.py recipe=tiny_cpu stages=[critique_revise]
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import transformers
from tqdm.auto import tqdm

from cai_lite import constitution as C
from cai_lite import adapter_files, data, generation, generation_http, rundir
from cai_lite.config import Config
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)


def check(cfg: Config) -> list[str]:
    """Files this stage needs, checked before the model loads."""
    errors = []
    try:
        C.load(cfg.constitution)
    except C.ConstitutionError as e:
        errors.append(f"constitution: {e}")
    errors += data.check_source("data.prompts", cfg.data.prompts, cfg.data.format, cfg.data.column)
    errors += data.check_source("critique_revise.helpful_prompts", cfg.critique_revise.helpful_prompts)
    for key, folder in (("critique_revise.policy_adapter", cfg.critique_revise.policy_adapter),
                        ("critique_revise.critic_adapter", cfg.critique_revise.critic_adapter)):
        if folder and not (Path(folder) / "adapter_config.json").is_file():
            errors.append(f"{key}: {folder}: not a PEFT adapter folder (no adapter_config.json)")
    policy = "policy" if cfg.critique_revise.policy_adapter else None
    errors += generation_http.check(cfg.generation, [policy, "critique" if cfg.critique_revise.critic_adapter else policy])
    for pattern in cfg.critique_revise.cleanup_patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            errors.append(f"critique_revise.cleanup_patterns: {pattern!r}: {e}")
    return errors


def clean_revision(text: str, patterns: list[re.Pattern]) -> tuple[str, int]:
    """Strip boilerplate openers like "Sure, here is a revised response:"; return text and removals."""
    removed = 0
    for p in patterns:
        new = p.sub("", text, count=1)
        removed += new != text
        text = new
    return text.strip(), removed


# The contract pipeline.py reads: config keys in this stage's hash, stages it reads (OPTIONAL_READS:
# when they ran), what it leaves in critique_revise/ before stage.json, and the metric the run's summary shows.
KEYS = rundir.BASE_KEYS + ("generation", "data", "constitution", "critique_revise")
READS = ()
OPTIONAL_READS = ()
OUTPUTS = ("part-*.jsonl",)
HEADLINE = "rows"


def run(cfg: Config, base: SharedBase, out: Path) -> dict:
    cr, g = cfg.critique_revise, cfg.generation
    const = C.load(cfg.constitution)
    split = data.prompt_split(cfg)
    helpful = data.read_optional(cr.helpful_prompts, cr.helpful_limit, cfg.data.max_prompt_chars)
    policy = None
    if cr.policy_adapter:
        adapter_files.load_adapter(base, "policy", cr.policy_adapter, replace=True)
        policy = "policy"
    critic = policy
    if cr.critic_adapter:
        adapter_files.load_adapter(base, "critique", cr.critic_adapter, replace=True)
        critic = "critique"  # the swappable critique adapter writes critiques and revisions
    patterns = [re.compile(p, re.IGNORECASE) for p in cr.cleanup_patterns]
    items = [("harmless", p) for p in split.train] + [("helpful", p) for p in helpful]
    shards = data.chunks(items, cr.shard_size)
    resumed = 0
    for index, shard in enumerate(tqdm(shards, desc="critique_revise shards")):
        path = data.shard_path(out, index)
        if path.is_file():
            resumed += 1  # written by an earlier, interrupted run with the same config
            continue
        transformers.set_seed(rundir.shard_seed(cfg.seed, "critique_revise", index))  # same draws when resumed
        rows = _shard_rows(cfg, base, const, shard, policy, critic, patterns)
        data.write_shard_pair(out, index, [r for r in rows if r["has_target"]], [r for r in rows if not r["has_target"]])
    unrevised = data.read_failed(out)
    rows = data.read_shards(out)
    harmless = [r for r in rows if r["type"] == "harmless"]
    log.info("%d rows (%d harmless, %d helpful), %d rounds each", len(rows), len(harmless), len(rows) - len(harmless), cr.rounds)
    return {
        "rows": len(rows),
        "harmless_rows": len(harmless),
        "helpful_rows": len(rows) - len(harmless),
        "rounds": cr.rounds,
        "constitution": const.name,
        "truncated_prompt_chars": split.truncated,
        "duplicate_prompts_dropped": split.duplicates,
        "mean_init_chars": _mean(len(r["init_response"]) for r in harmless),
        "mean_final_chars": _mean(len(r["revision_response"]) for r in harmless),
        # Counted from the rows, so a resumed run reports every shard, not only the ones it wrote.
        "cleanup_removals": sum(r["cleanup_removals"] for r in rows),
        "empty_revisions": sum(r["empty_revisions"] for r in rows + unrevised),
        "rows_without_revision": len(unrevised),
        "truncated_prompt_tokens": sum(r["prompt_truncated"] for r in rows),
        "resumed_shards": resumed,
        "generation": generation_http.describe(g),
    }


def _mean(xs) -> float:
    xs = list(xs)
    return round(sum(xs) / len(xs), 1) if xs else 0.0


def _shard_rows(cfg: Config, base: SharedBase, const: C.Constitution, shard: list, policy: str | None,
                critic: str | None, patterns: list[re.Pattern]) -> list[dict]:
    cr, g, tok = cfg.critique_revise, cfg.generation, base.tokenizer
    prompts = [p for _, p in shard]
    first = generation.sample(base, [data.render(tok, [{"role": "user", "content": p.text}]) for p in prompts],
                              policy, g, desc="answers")
    truncated = list(first.truncated)  # per row: was any of its prompts cut to generation.max_prompt_tokens
    removals = [0] * len(shard)
    empty = [0] * len(shard)
    current = list(first.texts)
    harmful_idx = [i for i, (kind, _) in enumerate(shard) if kind == "harmless"]
    rngs = {i: C.rng_for(cfg.seed, prompts[i].id) for i in harmful_idx}
    rounds: dict[int, list[dict]] = {i: [] for i in harmful_idx}
    last: dict[int, dict] = {}
    for _ in range(cr.rounds):
        principles = {i: rngs[i].choice(const.critique_revision) for i in harmful_idx}
        crit_msgs = {i: C.critique_messages(const, prompts[i].text, current[i], principles[i], cr.few_shot, cr.cot)
                     for i in harmful_idx}
        critiques = generation.sample(base, [data.render(tok, crit_msgs[i]) for i in harmful_idx], critic, g,
                                      desc="critiques")
        rev_msgs = {i: C.revision_messages(const, prompts[i].text, current[i], principles[i], c, cr.few_shot, cr.cot)
                    for i, c in zip(harmful_idx, critiques.texts)}
        revisions = generation.sample(base, [data.render(tok, rev_msgs[i]) for i in harmful_idx], critic, g,
                                      desc="revisions")
        for k, i in enumerate(harmful_idx):
            truncated[i] |= critiques.truncated[k] or revisions.truncated[k]
        for i, crit, rev in zip(harmful_idx, critiques.texts, revisions.texts):
            rev, removed = clean_revision(rev, patterns)
            removals[i] += removed
            rounds[i].append({"principle_id": principles[i].id, "critique": crit, "revision": rev})
            if not rev:
                # Nothing to train on (an empty target would teach silence, and the previous answer may be
                # the harmful initial one): counted, left out of SFT, and the next round revises again.
                empty[i] += 1
                continue
            last[i] = {"critic_prompt": crit_msgs[i][-1]["content"], "critic_response": crit,
                       "revision_prompt": principles[i].revision, "revision_response": rev}
            current[i] = rev
    rows = []
    for i, (kind, p) in enumerate(shard):
        user = {"role": "user", "content": p.text}
        final = current[i]  # helpful rows: the answer itself; harmless rows: the last valid revision
        answer = [{"role": "assistant", "content": final}]
        row = {
            "id": p.id,
            "type": kind,
            "has_target": bool(final) if kind == "helpful" else i in last,  # something non-empty to train on
            "init_prompt": p.text,
            "init_response": first.texts[i],
            **last.get(i, {"critic_prompt": "", "critic_response": "", "revision_prompt": "",
                           "revision_response": final if kind == "helpful" else ""}),
            "prompt": [user],
            "completion": answer,
            "messages": [user, *answer],
            "chosen": answer,
            "rejected": [{"role": "assistant", "content": first.texts[i]}],
            "rounds": rounds.get(i, []),
            "init_ended_with_eos": first.ended[i],
            "cleanup_removals": removals[i],
            "empty_revisions": empty[i],
            "prompt_truncated": truncated[i],
        }
        rows.append(row)
    return rows
