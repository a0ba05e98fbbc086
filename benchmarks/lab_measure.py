"""Measure a pretrained lab model with the oracle, through the pipeline's own code: the model is loaded by
`models.load_base`, answers come from `generation.generate`, verdicts from a `judges.LocalJudge`,
and critiques and revisions are built as critique_revise builds them. Used to calibrate the world
(benchmarks/lab_pretrain.py) and by tests; no stage depends on it.

Reads a lab model folder (with its `lab_world.json`); writes nothing.

    python -c "import lab_measure; print(lab_measure.report('path/to/lab-model'))"   # from benchmarks/
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

from cai_lite import constitution as C
from cai_lite import data, generation, judges, models
from cai_lite.lab import world as W
from cai_lite.lab.oracle import Oracle
from cai_lite.recipe import load_config


def load(path, quantization: str = "none", max_new_tokens: int = 64, temperature: float = 0.7) -> models.SharedBase:
    """The lab model as a pipeline run loads it (fp32 on CPU unless `quantization=nf4`)."""
    cfg = load_config(["recipe=tiny_cpu", f"base.model={path}", "base.create=none", f"base.quantization={quantization}",
                       f"generation.max_new_tokens={max_new_tokens}", f"generation.temperature={temperature}",
                       "generation.batch_size=32", "judge.batch_size=32"])
    return models.load_base(cfg)


def rates(families: list[str]) -> dict[str, float]:
    n = max(1, len(families))
    return {f: round(c / n, 3) for f, c in sorted(Counter(families).items())}


def answers(base: models.SharedBase, prompts: list[str], adapter: str | None = None) -> list[str]:
    return generation.generate(base, [data.render(base.tokenizer, [{"role": "user", "content": p}]) for p in prompts],
                               adapter, base.cfg.generation, desc="lab answers").texts


def behaviour(base: models.SharedBase, oracle: Oracle, requests: list[W.Request], samples: int = 1) -> dict:
    """Oracle rates of the model's answers to `requests` (each asked `samples` times)."""
    prompts = [r.text for r in requests for _ in range(samples)]
    got = answers(base, prompts)
    return {"rates": rates([oracle.classify(a, p) for a, p in zip(got, prompts)]), "n": len(prompts),
            "examples": list(zip(prompts[:4], got[:4]))}


def sl_cai(base: models.SharedBase, world: W.World, const: C.Constitution, oracle: Oracle,
           requests: list[W.Request], rounds: int = 2, seed: int = 0) -> dict:
    """critique_revise's loop, in miniature: answer, then per round a sampled principle, a
    critique and a revision of the latest answer. Oracle rates per round."""
    tok, g = base.tokenizer, base.cfg.generation
    prompts = [r.text for r in requests]
    current = answers(base, prompts)
    per_round = [rates([oracle.classify(a, p) for a, p in zip(current, prompts)])]
    rngs = [C.rng_for(seed, p) for p in prompts]
    for _ in range(rounds):
        principles = [rng.choice(const.critique_revision) for rng in rngs]
        crit_msgs = [C.critique_messages(const, p, a, pr, 0, False) for p, a, pr in zip(prompts, current, principles)]
        crits = generation.generate(base, [data.render(tok, m) for m in crit_msgs], None, g, desc="critiques").texts
        rev_msgs = [C.revision_messages(const, p, a, pr, c, 0, False)
                    for p, a, pr, c in zip(prompts, current, principles, crits)]
        revs = generation.generate(base, [data.render(tok, m) for m in rev_msgs], None, g, desc="revisions").texts
        current = [r or a for r, a in zip(revs, current)]
        per_round.append(rates([oracle.classify(a, p) for a, p in zip(current, prompts)]))
    return {"rounds": per_round, "example": {"prompt": prompts[0], "critique": crits[0], "revision": current[0]}}


def judge(base: models.SharedBase, world: W.World, const: C.Constitution, requests: list[W.Request],
          seed: int = 0) -> dict:
    """The bare model as the local judge on world answers: for each request, family pair and
    principle, both orders. `accuracy`: share of strict preferences where the right answer gets
    P > 0.5 in both orders; `tie_gap`: mean |P(A) - 0.5| after averaging orders, on ties."""
    rng = random.Random(f"lab-judge:{seed}")
    j = judges.LocalJudge(base, base.cfg.judge, base.cfg.generation)
    prompts, meta = [], []
    for r in requests:
        fams = ("harmful", "evasive", "engaging-harmless") if r.harmful else ("helpful", "over-refusal")
        for fa, fb in itertools.combinations(fams, 2):
            a, b = W.respond(world, r, fa, rng), W.respond(world, r, fb, rng)
            for pr in const.preference:
                for x, y, first in ((a, b, True), (b, a, False)):
                    prompts.append(judges.ChoicePrompt(C.comparison_messages(data.conversation_text(r.text), pr.text, x, y),
                                                       C.COMPARISON_PREFILL))
                    meta.append((W.preference(pr.id, fa, fb), first, W.principle_class(pr.id), (fa, fb)))
    probs = j.option_probs(prompts, "AB")
    strict, ties, by_class = [], [], {}
    for k in range(0, len(probs), 2):
        (want, _, cls, pair), p_ab, p_ba = meta[k], probs[k][0], probs[k + 1][0]  # P(slot A) in each order
        p_a = (p_ab + 1 - p_ba) / 2  # P(first-listed answer better), orders averaged
        if want == 0.5:
            ties.append(abs(p_a - 0.5))
        else:
            ok = (p_ab > 0.5) == (want == 1) and (p_ba < 0.5) == (want == 1)
            strict.append(ok)
            by_class.setdefault(f"{cls}:{pair[0]}>{pair[1]}" if want == 1 else f"{cls}:{pair[1]}>{pair[0]}", []).append(ok)
    return {"accuracy": round(sum(strict) / max(1, len(strict)), 3), "n": len(strict),
            "tie_gap": round(sum(ties) / max(1, len(ties)), 3),
            "by_pair": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_class.items())}}


def classification(base: models.SharedBase, world: W.World, requests: list[W.Request], seed: int = 0) -> float:
    """Accuracy of evaluate's harmful/evasive questions (both option orders) on world answers."""
    rng = random.Random(f"lab-classify:{seed}")
    j = judges.LocalJudge(base, base.cfg.judge, base.cfg.generation)
    prompts, want = [], []
    for r in requests:
        for fam in ("harmful", "evasive", "engaging-harmless") if r.harmful else ("helpful", "over-refusal"):
            conv = data.conversation_text(r.text, W.respond(world, r, fam, rng))
            for q in (C.HARMFUL_Q, C.EVASIVE_Q):
                yes = fam == "harmful" if q == C.HARMFUL_Q else fam in ("evasive", "over-refusal")
                for opts in (["Yes", "No"], ["No", "Yes"]):
                    prompts.append(judges.ChoicePrompt(C.classification_messages(conv, q, opts), C.COMPARISON_PREFILL))
                    want.append(opts.index("Yes" if yes else "No"))
    probs = j.option_probs(prompts, "AB")
    return round(sum((p[0] > 0.5) == (w == 0) for p, w in zip(probs, want)) / len(want), 3)


def report(path, requests_per_split: int = 64, quantization: str = "none", seed: int = 0) -> dict:
    """Everything above on held-out requests of the model's own world."""
    world, const = W.read(path), C.load("lab")
    oracle, base = Oracle(world), load(path, quantization)
    rng = random.Random(f"lab-report:{seed}")

    def pick(split, harmful):
        reqs = world.requests(split, harmful)
        return rng.sample(reqs, min(requests_per_split, len(reqs)))

    red_forms, red_combos, benign_forms = pick("held_out_form", True), pick("held_out_combo", True), pick("held_out_form", False)
    return {
        "base_red_held_out_forms": behaviour(base, oracle, red_forms),
        "base_red_held_out_combos": behaviour(base, oracle, red_combos),
        "base_benign_held_out_forms": behaviour(base, oracle, benign_forms),
        "sl_cai_2_rounds": sl_cai(base, world, const, oracle, red_forms, 2, seed),
        "judge_held_out_forms": judge(base, world, const, red_forms[:24] + benign_forms[:8], seed),
        "classification_accuracy": classification(base, world, red_forms[:16] + benign_forms[:8], seed),
    }
