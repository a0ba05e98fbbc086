"""Stage evaluate: did the model become more harmless without becoming evasive or less helpful?

Compares every model present in the run (the bare base, `sft`, and each of ppo/rloo/dpo that ran)
on held-out red-team prompts and on benign helpful prompts, none of which any stage trained on:
  - pairwise win rates against the base and against sft (all judges, both option orders), with
    bootstrap confidence intervals, and a Bradley-Terry (Elo-scale) rating across models;
  - harmful and evasive rates from judge classification prompts (Wilson intervals);
  - the mean score under the trained reward model;
  - the paper's HHH (438 items) and HarmfulVsEthical accuracies of each judge and of the reward model.

Reads the held-out prompts, the adapters of the stages that ran, optional paper eval files, the
SL-CAI revisions (critique_revise shards), the judges' position bias (label_preferences) and the RL
logs. Writes `evaluate/metrics.json`, `responses.jsonl`, `verdicts.jsonl` (the judge's P(model better)
per prompt), `report.md`, PNG plots, `summary.txt` (the table printed at the end of a run) and
`report.html`, the run browser (browse.py).

    python run.py recipe=tiny_cpu stages=[evaluate] evaluate.hhh_path=../shared/data/anthropic-cai-paper/438HHHEvaluations.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import transformers
from tqdm.auto import tqdm

from cai_lite import constitution as C
from cai_lite import (adapter_files, browse, data, downloads, generation, generation_http, judges, paper_evals,
                      ratings, report,
                      rollout, rundir, voting)
from cai_lite.config import Config
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)
CANDIDATES = ("sft", "ppo", "rloo", "dpo")


def check(cfg: Config) -> list[str]:
    errors = judges.check(cfg)
    # The models evaluate will answer with: the base, and each candidate done or run now.
    answering = [s for s in CANDIDATES if s in cfg.stages or rundir.is_done(cfg.path, s)]
    errors += generation_http.check(cfg.generation, [None, *answering])
    if cfg.data.eval_prompts < 1 and not cfg.evaluate.prompts:
        errors.append("data.eval_prompts must be >= 1 (or evaluate.prompts set): evaluate needs held-out red-team prompts")
    errors += data.check_source("data.prompts", cfg.data.prompts, cfg.data.format, cfg.data.column)
    errors += data.check_source("evaluate.prompts", cfg.evaluate.prompts, "jsonl", cfg.data.column)
    if cfg.evaluate.oracle == "lab" and not (Path(cfg.base.model) / "lab_world.json").is_file():
        errors.append(f"evaluate.oracle=lab: {cfg.base.model} has no lab_world.json, so it is not a lab model "
                      "(base.create=lab builds one)")
    errors += data.check_source("evaluate.helpful_prompts", cfg.evaluate.helpful_prompts)
    for key in ("hhh_path", "harmful_vs_ethical_path"):
        value = getattr(cfg.evaluate, key)
        if value and not Path(value).is_file():  # optional: the paper's evals, beside the pairwise ones
            errors.append(downloads.missing(f"evaluate.{key}", value, off=f"evaluate.{key}= to skip that eval"))
        elif value:
            try:
                paper_evals.load_items(value)
            except data.DataError as e:
                errors.append(f"evaluate.{key}: {e}")
    try:
        const = C.load(cfg.constitution)
        if not const.preference:
            errors.append(f"constitution: {cfg.constitution} has no preference principles, which win rates need")
        if cfg.evaluate.oracle == "lab":
            from cai_lite.lab import world

            unknown = [p.id for p in const.preference if p.id not in world.PRINCIPLE_CLASSES]
            if unknown:
                errors.append(f"evaluate.oracle=lab: the lab world cannot rank answers under principles {unknown} of "
                              f"{cfg.constitution} (add them to cai_lite/lab/world.py PRINCIPLE_CLASSES)")
    except C.ConstitutionError as e:
        errors.append(f"constitution: {e}")
    return errors


def eval_prompts(cfg: Config) -> tuple[list[data.Prompt], list[data.Prompt], int]:
    """Held-out red-team prompts and helpful prompts, minus any text a stage trained on (the SL-CAI
    prompts, and every RL stage's own red-team and helpful prompts); also how many candidates that
    removed."""
    split = data.prompt_split(cfg)
    if cfg.evaluate.prompts:
        held_out = data.read_prompts(cfg.evaluate.prompts, "jsonl", cfg.data.column)
        held_out = [data.Prompt(p.id, p.text[: cfg.data.max_prompt_chars]) for p in held_out]
        split = dataclasses.replace(split, held_out=held_out[: cfg.evaluate.prompts_limit or None])
    trained = {p.text for p in split.train}
    cr = cfg.critique_revise
    trained |= {p.text for p in data.read_optional(cr.helpful_prompts, cr.helpful_limit, cfg.data.max_prompt_chars)}
    lp, pc, rc = cfg.label_preferences, cfg.ppo, cfg.rloo
    for stage, sources in (("label_preferences", ((lp.prompts, 0), (lp.helpful_prompts, lp.helpful_limit))),
                           ("ppo", ((pc.prompts, 0), (pc.helpful_prompts, pc.helpful_limit))),
                           ("rloo", ((rc.prompts, 0), (rc.helpful_prompts, rc.helpful_limit)))):
        # Only stages in this run or done in its folder trained a model here (a recipe may name
        # files for stages it does not run).
        if stage in cfg.stages or rundir.is_done(cfg.path, stage):
            for source, limit in sources:
                trained |= {p.text for p in data.read_optional(source, limit, cfg.data.max_prompt_chars)}
    candidates = split.held_out + data.read_optional(cfg.evaluate.helpful_prompts, 0, cfg.data.max_prompt_chars)
    kept = [p for p in candidates if p.text not in trained]
    red = [p for p in kept if p in split.held_out]
    helpful = [p for p in kept if p not in split.held_out]
    helpful = helpful[: cfg.evaluate.helpful_limit] if cfg.evaluate.helpful_limit else helpful
    if {p.text for p in red + helpful} & trained:  # a leak would void every number evaluate reports
        raise RuntimeError("evaluation prompts overlap training prompts")
    return red, helpful, len(candidates) - len(kept)


# The contract pipeline.py reads: config keys in this stage's hash, stages it reads (OPTIONAL_READS:
# when they ran), what it leaves in evaluate/ before stage.json, and the metric the run's summary shows.
KEYS = rundir.BASE_KEYS + ("generation", "data", "constitution", "judge", "judges", "judge_vote", "evaluate")
READS = ("critique_revise", "sft")
OPTIONAL_READS = ("label_preferences", "reward_model", "ppo", "rloo", "dpo")
OUTPUTS = ("metrics.json", "responses.jsonl", "verdicts.jsonl", "report.md", "report.html", "summary.txt")
HEADLINE = "summary"


def run(cfg: Config, base: SharedBase, out: Path) -> dict:
    ev, g = cfg.evaluate, cfg.generation
    const = C.load(cfg.constitution)
    red, helpful, excluded = eval_prompts(cfg)
    present: dict[str, str | None] = {"base": None}
    for stage in CANDIDATES:
        if rundir.is_done(cfg.path, stage):
            adapter_files.load_adapter(base, stage, rundir.adapter_dir(cfg.path, stage))
            present[stage] = stage
    responses = _responses(cfg, base, present, red, helpful)
    panel = judges.build(cfg, base)
    try:
        judged: list[tuple] = []
        metrics = _judge_everything(cfg, base, const, panel, present, responses, red, helpful, judged)
        metrics["paper_evals"] = _paper_evals(cfg, base, panel)
        revisions = _judge_revisions(cfg, const, panel[0])
    finally:
        for j in panel:
            j.close()
    metrics["prompts"] = {"red_team_held_out": len(red), "helpful": len(helpful),
                          "excluded_as_seen_in_training": excluded}
    metrics["judges"] = [j.name for j in panel]
    if cfg.evaluate.oracle == "lab":  # ground truth beside the judge's numbers; never a training signal
        from cai_lite.lab import oracle, world

        metrics["oracle"] = oracle.evaluation(world.read(cfg.base.model), [p.text for p in red],
                                              [p.text for p in helpful], responses, judged)
    families = metrics.get("oracle", {}).pop("families", {})  # per answer: into responses.jsonl, not metrics
    with (out / "responses.jsonl").open("w", encoding="utf-8") as f:
        for kind, prompts in (("red_team", red), ("helpful", helpful)):
            for i, p in enumerate(prompts):
                row = {"id": p.id, "kind": kind, "prompt": p.text, **{m: responses[m][kind][i] for m in present}}
                if families:
                    row["oracle"] = {m: families[m][kind][i] for m in present}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    metrics = _finite(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report.write_all(cfg, out, metrics, responses, red, helpful, revisions)
    with (out / "verdicts.jsonl").open("w", encoding="utf-8") as f:  # per prompt, for the run browser
        for m, o, kind, i, principle_ids, p in judged:
            src, prompts = ("red_team", red) if kind == "harmless" else ("helpful", helpful)
            f.write(json.dumps({"id": prompts[i].id, "kind": src, "model": m, "vs": o, "principles": principle_ids,
                                "p_model_better": p}) + "\n")
    browse.write(cfg.path, out / "report.html", ev.report_rows, writer="evaluate")
    return {"models": list(present), "summary": report.headline(metrics), "generation": generation_http.describe(g)}


def _finite(x):
    """NaN (an empty sample) becomes null, so metrics.json stays valid JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def _responses(cfg: Config, base: SharedBase, present: dict, red: list, helpful: list) -> dict:
    out = {}
    for name, adapter in tqdm(present.items(), desc="evaluate: answers", total=len(present), leave=False):
        out[name] = {}
        for kind, prompts in (("red_team", red), ("helpful", helpful)):
            # Seeded per model and prompt set: a model's answers do not depend on which others are evaluated.
            transformers.set_seed(rundir.shard_seed(cfg.seed, f"evaluate:{name}:{kind}", 0))
            texts = [data.render(base.tokenizer, [{"role": "user", "content": p.text}]) for p in prompts]
            out[name][kind] = generation.sample(base, texts, adapter, cfg.generation,
                                                max_new_tokens=cfg.evaluate.max_new_tokens,
                                                desc=f"answers {name}").texts if prompts else []
    return out


def _vote(cfg: Config, per_judge: list[list[judges.Judgement]]) -> list[float | None]:
    return [voting.vote([pj[i].p_a for pj in per_judge], cfg.judge_vote) for i in range(len(per_judge[0]))]


def _compare_all(cfg: Config, panel: list, tally: dict, comps: list) -> list[list[judges.Judgement]]:
    """Every judge on every comparison, both orders; failures counted per judge."""
    out = []
    for i, j in enumerate(panel):
        got = judges.compare(j, comps, True)
        judges.record_failures(cfg, tally, i, j, [d[k] for g in got for d in g.details for k in ("p_ab", "p_ba")],
                               "evaluation answers")
        out.append(got)
    return out


def _judge_everything(cfg: Config, base: SharedBase, const: C.Constitution, panel: list, present: dict,
                      responses: dict, red: list, helpful: list, judged: list | None = None) -> dict:
    """Win rates, Elo, rates and mean reward; appends (model, other, kind, prompt index, principle
    ids, voted P(model better)) for every comparison to `judged` when given."""
    k = cfg.evaluate.num_principles
    judged = [] if judged is None else judged
    pairs = [(m, "base") for m in present if m != "base"]
    pairs += [(m, "sft") for m in present if m not in ("base", "sft") and "sft" in present]
    win_rates: dict[str, dict] = {}
    outcomes: list[ratings.Outcome] = []
    tally: dict[str, list[int]] = {}
    for m, o in tqdm(pairs, desc="evaluate: win rates", leave=False):  # cleared for the last phase's bar
        for kind, prompts, fixed in (("harmless", red, None), ("helpful", helpful, C.HELPFUL_PRINCIPLE)):
            src = "red_team" if kind == "harmless" else "helpful"
            comps = [judges.Comparison(data.conversation_text(p.text), responses[m][src][i], responses[o][src][i],
                                       [fixed] if fixed else C.sample(const.preference, k, C.rng_for(cfg.seed, f"eval:{p.id}")))
                     for i, p in enumerate(prompts)]
            if not comps:
                continue
            voted = _vote(cfg, _compare_all(cfg, panel, tally, comps))
            judged += [(m, o, kind, i, [pr.id for pr in c.principles], p) for i, (c, p) in enumerate(zip(comps, voted))]
            ps = [p for p in voted if p is not None]
            w = ratings.win_rate(ps, cfg.evaluate.bootstrap, cfg.seed) if ps else {"win_rate": None}
            win_rates[f"{m}_vs_{o}/{kind}"] = {**w, "failures": len(voted) - len(ps)}
            outcomes += [ratings.Outcome(m, o, p) for p in ps]
    rates = {m: _rates(cfg, panel, tally, red, helpful, responses[m]) for m in tqdm(present, desc="evaluate: rates")}
    mean_reward = None
    if rundir.is_done(cfg.path, "reward_model"):
        adapter_files.load_adapter(base, "reward", rundir.adapter_dir(cfg.path, "reward_model"))
        mean_reward = {m: rollout.score(base, [p.text for p in red + helpful],
                                        responses[m]["red_team"] + responses[m]["helpful"], cfg.generation.batch_size,
                                        cfg.generation.max_prompt_tokens + cfg.evaluate.max_new_tokens).mean().item()
                       for m in present}
    return {
        "models": list(present),
        "win_rates": win_rates,
        "elo": ratings.bradley_terry(outcomes) if outcomes else None,
        "rates": rates,
        "mean_reward": mean_reward,
    }


def _rates(cfg: Config, panel: list, tally: dict, red: list, helpful: list, resp: dict) -> dict:
    """Harmful and evasive rates, each question asked with the options in both orders (averaged),
    so a judge's position bias cannot pass for a rate."""
    out = {}
    for key, question, prompts, answers in (("harmful", C.HARMFUL_Q, red, resp["red_team"]),
                                            ("evasive_red_team", C.EVASIVE_Q, red, resp["red_team"]),
                                            ("evasive_helpful", C.EVASIVE_Q, helpful, resp["helpful"])):
        if not prompts:
            continue
        convs = [data.conversation_text(p.text, a) for p, a in zip(prompts, answers)]
        yes_first = [judges.ChoicePrompt(C.classification_messages(c, question, ["Yes", "No"]), C.COMPARISON_PREFILL)
                     for c in convs]
        no_first = [judges.ChoicePrompt(C.classification_messages(c, question, ["No", "Yes"]), C.COMPARISON_PREFILL)
                    for c in convs]
        per_judge = []
        for i, j in enumerate(panel):
            a, b = j.option_probs(yes_first, "AB"), j.option_probs(no_first, "AB")
            judges.record_failures(cfg, tally, i, j, a + b, "evaluation answers")
            per_judge.append([voting.average_orders(None if x is None else x[0], None if y is None else y[0])
                              for x, y in zip(a, b)])
        p_yes = [voting.vote(ps, cfg.judge_vote) for ps in zip(*per_judge)]
        out[key] = ratings.rate_with_ci([p > 0.5 for p in p_yes if p is not None])
        out[key]["mean_p_yes"] = voting.mean_or_none(p_yes)
        out[key]["failures"] = sum(p is None for p in p_yes)
    return out


def _paper_evals(cfg: Config, base: SharedBase, panel: list) -> dict:
    ev, out = cfg.evaluate, {}
    for name, path in (("hhh", ev.hhh_path), ("harmful_vs_ethical", ev.harmful_vs_ethical_path)):
        if not path:
            continue
        items = paper_evals.load_items(path, ev.paper_eval_limit)
        out[name] = {"judges": {j.name: paper_evals.judge_accuracy(j, items) for j in panel},
                     "always_A": paper_evals.share_of_letter(items, "A")}
        if name == "hhh" and rundir.is_done(cfg.path, "reward_model"):
            adapter_files.load_adapter(base, "reward", rundir.adapter_dir(cfg.path, "reward_model"))
            out[name]["reward_model"] = paper_evals.reward_accuracy(base, items, cfg.generation.batch_size,
                                                                    cfg.generation.max_prompt_tokens)
    return out


def _judge_revisions(cfg: Config, const: C.Constitution, judge) -> list[dict]:
    """The SL-CAI revisions the judge liked most and least, against the initial answers."""
    shards = data.read_shards(rundir.stage_dir(cfg.path, "critique_revise"))
    rows = [r for r in shards if r["type"] == "harmless" and r["rounds"]]
    rows = rows[: 4 * max(1, cfg.evaluate.samples_in_report)]
    if not rows:
        return []
    comps = [judges.Comparison(data.conversation_text(r["init_prompt"]), r["revision_response"], r["init_response"],
                               C.sample(const.preference, 1, C.rng_for(cfg.seed, f"rev:{r['id']}"))) for r in rows]
    scored = [(j.p_a, r) for j, r in zip(judges.compare(judge, comps, True), rows) if j.p_a is not None]
    scored.sort(key=lambda x: x[0])
    pick = scored[-2:][::-1] + scored[:2]
    return [{"p_revision_better": p, "prompt": r["init_prompt"], "initial": r["init_response"], "final": r["revision_response"],
             "critique": r["rounds"][-1]["critique"]} for p, r in pick]
