"""How long will it take? Each stage's work counted from the recipe and its prompt files, priced at
the rates a short probe measured on this machine's device (probe.py), as the table `plan=true`
prints after the memory plan.

Counts: which prompts each stage reads, by the stages' own loaders (data.prompt_split, the RL
stages' prompt lists, evaluate.eval_prompts), and their tokens as rendered (up to SAMPLE of each
kind, tokenized by the base's tokenizer), with the text a stage generated into them drawn from the
lengths of the probe's answers, and padded as a batch pads them: to its longest row. Work comes in
three kinds, each priced by a line the probe fitted:
  - sample: seconds = forwards x step_s + rows in flight summed over them x row_step_s + prompt
    tokens x fwd_token_s. Our loop (decode.py) refills finished rows: `batch` rows in flight, each for
    its answer's length (where the probe's answers ended), plus a tail per call for its longest rows;
    transformers' fixed batches (TRL's RLOO) run each batch until its longest answer ends;
  - forward (no gradients: judges, reward scores, log-probs): batches x fwd_s + tokens x fwd_token_s,
    times `bare` on the base without an adapter (a judge with judge.adapter=none);
  - train (forward + backward + optimizer): batches x train_s + tokens x train_token_s, times `trl`
    in a TRL trainer's loop (its metrics and logging every step).
A stage also costs FIXED seconds of set-up (trainers, files, reports), measured per stage.

Reads the recipe's prompt files, the constitution and base.model's tokenizer; writes nothing.
`benchmarks/time_estimate.py` checks the estimate against real runs.

    python run.py recipe=tiny_cpu plan=true
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from cai_lite import constitution as C
from cai_lite import data, rundir
from cai_lite.config import Config
from cai_lite.stages import evaluate, ppo

SAMPLE = 256  # prompts of each kind whose tokens are counted; the rest are assumed alike
# Seconds each stage spends outside the work below (building a trainer and tokenizing its data,
# loading adapters, writing shards, adapters, reports and plots): what the tiny_cpu run took beyond
# its priced work, whose own seconds are next to nothing there (benchmarks/time_estimate.py, 1 CPU
# thread; the same within 0.05 s in two runs). Measured on a CPU: on a GPU, where stages take hours,
# they are noise.
FIXED = {"critique_revise": 0.0, "sft": 0.45, "label_preferences": 0.1, "reward_model": 0.05, "ppo": 0.05,
         "rloo": 0.55, "dpo": 0.55, "evaluate": 1.05, "export": 0.05}


@dataclass
class Work:
    """One kind of work of a stage, counted (no rates in it)."""

    what: str  # e.g. "answers", "judge prompts"
    kind: str  # sample | forward | train
    batches: int  # sample: generate batches; forward: forward passes; train: forward + backward passes
    rows: int  # sequences
    tokens: int  # prompt tokens (sample) or all tokens (forward, train), padding included
    new_tokens: int = 0  # sample: max_new_tokens
    calls: int = 0  # sample: calls of the sampling loop (each ends with a tail of its longest rows)
    slots: int = 1  # sample: rows in flight at once
    fixed_batches: bool = False  # sample: by transformers' generate in fixed batches (TRL's RLOO), not our loop
    bare: bool = False  # forward: on the base without an adapter
    trl: bool = False  # train: in a TRL trainer's loop (sft, dpo, rloo)


@dataclass
class Rates:
    """What the probe measured: seconds per batch, step, row and token."""

    step_s: float
    row_step_s: float
    fwd_s: float
    fwd_token_s: float
    train_s: float
    train_token_s: float
    ends_at: float | None  # decode steps a full batch ran where its answers all ended early; None: to the cap
    row_tokens: float | None = None  # mean tokens of an answer that ended early; None: to the cap
    bare: float = 1.0  # a forward without an adapter over one with the probe's adapter
    trl: float = 1.0  # a step of TRL's SFTTrainer over a plain step of the same tokens


def seconds(w: Work, r: Rates) -> float:
    if w.kind == "sample":
        end = w.new_tokens if r.ends_at is None else min(w.new_tokens, r.ends_at)  # the longest answer
        if not w.fixed_batches:
            mean = w.new_tokens if r.row_tokens is None else min(w.new_tokens, r.row_tokens)
            forwards = max(w.calls * end, w.rows * mean / w.slots + w.calls * (end - mean))
            in_flight = w.rows * mean  # a finished row leaves; a waiting one takes its slot
        else:
            forwards, in_flight = w.batches * end, w.rows * end  # a batch runs until its longest row ends
        return forwards * r.step_s + in_flight * r.row_step_s + w.tokens * r.fwd_token_s
    if w.kind == "forward":
        return (w.batches * r.fwd_s + w.tokens * r.fwd_token_s) * (r.bare if w.bare else 1.0)
    return (w.batches * r.train_s + w.tokens * r.train_token_s) * (r.trl if w.trl else 1.0)


def stage_seconds(stage: str, work: list[Work], r: Rates) -> float:
    return FIXED.get(stage, 0.0) + sum(seconds(w, r) for w in work)


# ---- counting ------------------------------------------------------------------------------------

def padded(lengths: list[float], batch: int) -> float:
    """E[max of `batch` draws from `lengths`]: the width of a batch padded to its longest row."""
    x, n = sorted(lengths), len(lengths)
    return sum(v * ((k / n) ** batch - ((k - 1) / n) ** batch) for k, v in enumerate(x, 1))


class Lengths:
    """Token lengths of rendered prompts, as generation.tokenize_left cuts and pads them, with the text
    a stage generated into them drawn from the lengths of the probe's answers."""

    def __init__(self, tokenizer, max_prompt_tokens: int, answers: list[int] | None):
        self.tok, self.cap = tokenizer, max_prompt_tokens
        self.answers = answers  # tokens of each probe answer; None: every answer runs to its max_new_tokens

    def mean(self, texts: list[str], answers: int = 0, max_new: int = 0, cap: int | None = None,
             batch: int = 1) -> float:
        """Tokens per row of `texts` (a sample of them), each holding `answers` generated texts of at
        most `max_new` tokens, cut at `cap` (generation.max_prompt_tokens unless given), padded as a batch
        of `batch` random rows is: to its longest row, E[max of `batch` draws] (1: the mean). Answer
        lengths vary, so each text is drawn with several of them: the longest row of a batch is often
        the one with the longest answer."""
        texts = texts[:SAMPLE]
        if not texts:
            return 0.0
        rng = random.Random(0)
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        draws = 4 if answers and self.answers else 1
        return padded([min(len(i) + sum(self._answer(rng, max_new) for _ in range(answers)), cap or self.cap)
                       for i in ids for _ in range(draws)], batch)

    def chat(self, prompts: list[str], answers: int = 0, max_new: int = 0, batch: int = 1,
             cap: int | None = None) -> float:
        rendered = [data.render(self.tok, [{"role": "user", "content": p}]) for p in prompts[:SAMPLE]]
        return self.mean(rendered, answers, max_new, cap, batch)

    def _answer(self, rng: random.Random, max_new: int) -> int:
        return min(max_new, rng.choice(self.answers)) if self.answers else max_new

    def new(self, max_new: int, batch: int = 1) -> float:
        """Tokens of a generated text, or of the longest of `batch` of them (a right-padded batch)."""
        return padded([min(max_new, a) for a in self.answers], batch) if self.answers else max_new


def sample(what: str, calls: list[int], batch: int, prompt_tokens: float, new_tokens: int) -> Work:
    """Generation over calls of `calls[i]` rows each, `batch` rows at a time."""
    calls = [n for n in calls if n]
    return Work(what, "sample", sum(math.ceil(n / batch) for n in calls), sum(calls), round(sum(calls) * prompt_tokens),
                new_tokens, calls=len(calls), slots=batch)


def passes(what: str, kind: str, rows: int, batch: int, tokens: float, trl: bool = False) -> Work:
    """`rows` sequences of `tokens` each (padded), `batch` at a time."""
    return Work(what, kind, math.ceil(rows / batch) if rows else 0, rows, round(rows * tokens), trl=trl)


def count(cfg: Config, tokenizer, answers: list[int] | None = None) -> dict[str, list[Work]]:
    """The work of every selected stage. `answers`: the tokens of each answer the probe sampled; None:
    every generated text is as long as its max_new_tokens allows."""
    L = Lengths(tokenizer, cfg.generation.max_prompt_tokens, answers)
    out: dict[str, list[Work]] = {}
    for stage in cfg.stages:
        fn = globals().get(f"_{stage}")
        out[stage] = fn(cfg, L) if fn else []
    return out


def _critique_revise(cfg: Config, L: Lengths) -> list[Work]:
    cr, g = cfg.critique_revise, cfg.generation
    const = C.load(cfg.constitution)
    train = data.prompt_split(cfg).train
    helpful = data.read_optional(cr.helpful_prompts, cr.helpful_limit, cfg.data.max_prompt_chars)
    shards = data.chunks([("harmless", p) for p in train] + [("helpful", p) for p in helpful], cr.shard_size)
    b, t = g.batch_size, g.max_new_tokens
    critique, revision = [], []
    for p in train[:SAMPLE]:  # the principles each row draws, as the stage draws them
        rng = C.rng_for(cfg.seed, p.id)
        for _ in range(cr.rounds):
            pr = rng.choice(const.critique_revision)
            critique.append(data.render(L.tok, C.critique_messages(const, p.text, "", pr, cr.few_shot, cr.cot)))
            revision.append(data.render(L.tok, C.revision_messages(const, p.text, "", pr, "", cr.few_shot, cr.cot)))
    harmless = [sum(k == "harmless" for k, _ in s) for s in shards]
    # decode.py prefills prompts longest first, so their padding is small: the mean length.
    return [sample("answers", [len(s) for s in shards], b, L.chat([p.text for p in train + helpful]), t),
            sample("critiques", harmless * cr.rounds, b, L.mean(critique, 1, t), t),
            sample("revisions", harmless * cr.rounds, b, L.mean(revision, 2, t), t)]


def _sft(cfg: Config, L: Lengths) -> list[Work]:
    cr, s = cfg.critique_revise, cfg.sft
    train = [p.text for p in data.prompt_split(cfg).train]
    helpful = [p.text for p in data.read_optional(cr.helpful_prompts, cr.helpful_limit, cfg.data.max_prompt_chars)]
    # The rows critique_revise will make (every revision assumed non-empty), as sft.sft_rows keeps them.
    rows = train * (cr.rounds if s.targets == "all_rounds" else 1)
    rows += helpful[: min(len(helpful), int(round(s.helpful_mix * len(train))))]
    steps = s.max_steps if s.max_steps > 0 else math.ceil(len(rows) / (s.batch_size * s.grad_accum)) * s.epochs
    micro = math.ceil(steps * s.grad_accum)
    tokens = L.chat(rows, 1, cfg.generation.max_new_tokens, s.batch_size, s.max_seq_len)
    return [passes("sft steps", "train", micro * s.batch_size, s.batch_size, tokens, trl=True)]


def _label_prompts(cfg: Config) -> list[tuple[str, str]]:
    lp = cfg.label_preferences
    red = data.read_optional(lp.prompts, 0, cfg.data.max_prompt_chars) if lp.prompts else data.prompt_split(cfg).train
    red = red[: lp.max_prompts] if lp.max_prompts else red
    helpful = data.read_optional(lp.helpful_prompts, lp.helpful_limit, cfg.data.max_prompt_chars)
    return [("harmless", p.text) for p in red] + [("helpful", p.text) for p in helpful]


def _judge_tokens(L: Lengths, conversations: list[str], principles: list[str], demos: tuple, max_new: int,
                  batch: int) -> float:
    """Tokens of a comparison prompt (two responses of at most `max_new` tokens), padded in a batch of `batch`."""
    texts = [data.render(L.tok, C.comparison_messages(data.conversation_text(c), pr, "", "", demos),
                         C.COMPARISON_PREFILL) for c, pr in zip(conversations, itertools.cycle(principles))]
    return L.mean(texts, 2, max_new, batch=batch)


def _label_preferences(cfg: Config, L: Lengths) -> list[Work]:
    lp, g = cfg.label_preferences, cfg.generation
    const = C.load(cfg.constitution)
    items = _label_prompts(cfg)
    k, orders = lp.num_responses, 2 if lp.both_orders else 1
    shards = data.chunks(items, lp.shard_size)
    work = [sample("responses", [len(s) * k for s in shards], g.batch_size,
                   L.chat([t for _, t in items]), g.max_new_tokens)]
    # compare() sends a shard's prompts to a judge as one list, cut into judge.batch_size batches.
    per_shard = [sum(k * (k - 1) // 2 * orders * (lp.num_principles if kind == "harmless" else 1) for kind, _ in s)
                 for s in shards]
    for jc in cfg.all_judges():
        if jc.backend != "local":
            continue  # a llama.cpp or server judge runs elsewhere, at its own speed: not estimated
        # A comparison's principles and orders come one after another: a batch holds fewer different ones.
        distinct = max(1, jc.batch_size // (lp.num_principles * orders))
        tokens = _judge_tokens(L, [t for _, t in items], [p.text for p in const.preference],
                               const.preference_demos[: lp.few_shot], g.max_new_tokens, distinct)
        if lp.cot:
            work.append(sample("judge reasoning", per_shard, g.batch_size, tokens, lp.cot_max_new_tokens))
            tokens += L.new(lp.cot_max_new_tokens)
        work.append(Work("judge prompts", "forward", sum(math.ceil(n / jc.batch_size) for n in per_shard),
                         sum(per_shard), round(sum(per_shard) * tokens), bare=jc.adapter == "none"))
    return work


def _pairs(cfg: Config) -> int:
    """Labelled pairs label_preferences will make (every label assumed to succeed)."""
    lp = cfg.label_preferences
    return len(_label_prompts(cfg)) * lp.num_responses * (lp.num_responses - 1) // 2


def _pair_tokens(cfg: Config, L: Lengths, batch: int, cap: int) -> float:
    """Tokens of a prompt and one labelled response, padded in a batch of `batch`."""
    return L.chat([t for _, t in _label_prompts(cfg)], 1, cfg.generation.max_new_tokens, batch, cap)


def _reward_model(cfg: Config, L: Lengths) -> list[Work]:
    rm = cfg.reward_model
    n = _pairs(cfg)
    held = max(1, int(round(n * rm.eval_fraction)))
    tokens = _pair_tokens(cfg, L, 2 * rm.batch_size, rm.max_seq_len)  # both responses of a batch in one forward
    # Training steps, then scores of the held-out pairs and of every training response (reward stats).
    return [passes("reward steps", "train", 2 * (n - held) * rm.epochs, 2 * rm.batch_size, tokens),
            passes("held-out and train scores", "forward", 2 * n, 2 * rm.batch_size, tokens)]


def _ppo(cfg: Config, L: Lengths) -> list[Work]:
    pc = cfg.ppo
    prompts = ppo.rl_prompts(cfg)
    rows, mb = pc.steps * pc.batch_size, pc.minibatch_size
    rollout = pc.rollout_batch_size if isinstance(pc.rollout_batch_size, int) else pc.batch_size
    # A rollout's tensors are as wide as its longest prompt and response: every pass over it is.
    full = L.chat(prompts, batch=pc.batch_size) + L.new(pc.max_new_tokens, pc.batch_size)
    updates = pc.steps * pc.ppo_epochs * math.ceil(pc.batch_size / mb)
    return [sample("rollouts", [pc.batch_size] * pc.steps, rollout, L.chat(prompts), pc.max_new_tokens),
            # Per step: old and reference log-probs and reward scores a minibatch at a time, values at once.
            Work("log-probs, scores, values", "forward", pc.steps * (3 * math.ceil(pc.batch_size / mb) + 1), 4 * rows,
                 round(4 * rows * full)),
            # Each minibatch trains the policy and the value adapter: two passes.
            passes("policy + value updates", "train", 2 * updates * mb, mb, full)]


def _rloo(cfg: Config, L: Lengths) -> list[Work]:
    rc, g = cfg.rloo, cfg.generation
    red = data.read_optional(rc.prompts, 0, cfg.data.max_prompt_chars) if rc.prompts else data.prompt_split(cfg).train
    prompts = [p.text for p in red + data.read_optional(rc.helpful_prompts, rc.helpful_limit,
                                                         cfg.data.max_prompt_chars)]
    n = rc.batch_size * rc.num_samples
    full = L.chat(prompts, batch=n) + L.new(rc.max_new_tokens, n)
    # TRL samples a step's completions in one batch, then the reference's log-probs and the reward
    # (forward), and trains the policy on them.
    rollouts = sample("rollouts", [n] * rc.steps, n, L.chat(prompts, batch=n), rc.max_new_tokens)
    rollouts.fixed_batches = True
    return [rollouts,
            Work("reference log-probs, scores", "forward", rc.steps * (1 + math.ceil(n / g.batch_size)),
                 2 * n * rc.steps, round(2 * n * rc.steps * full)),
            passes("policy updates", "train", n * rc.steps, n, full, trl=True)]


def _dpo(cfg: Config, L: Lengths) -> list[Work]:
    d = cfg.dpo
    steps = d.max_steps if d.max_steps > 0 else math.ceil(_pairs(cfg) / (d.batch_size * d.grad_accum)) * d.epochs
    rows = 2 * math.ceil(steps * d.grad_accum) * d.batch_size  # chosen and rejected in one batch
    tokens = _pair_tokens(cfg, L, 2 * d.batch_size, d.max_seq_len)
    return [passes("reference log-probs", "forward", rows, 2 * d.batch_size, tokens),
            passes("dpo steps", "train", rows, 2 * d.batch_size, tokens, trl=True)]


def _evaluate(cfg: Config, L: Lengths) -> list[Work]:
    ev, g = cfg.evaluate, cfg.generation
    const = C.load(cfg.constitution)
    red, helpful, _ = evaluate.eval_prompts(cfg)
    models = 1 + sum(s in cfg.stages or rundir.is_done(cfg.path, s) for s in evaluate.CANDIDATES)
    sft = "sft" in cfg.stages or rundir.is_done(cfg.path, "sft")
    pairs = (models - 1) + max(0, models - 2) * sft  # each model against base, and each RL model against sft
    t = ev.max_new_tokens
    reds, helps = [p.text for p in red], [p.text for p in helpful]
    work = [sample("answers", [len(reds), len(helps)] * models, g.batch_size, L.chat(reds + helps), ev.max_new_tokens)]
    for jc in cfg.all_judges():
        if jc.backend != "local":
            continue
        b, bare = jc.batch_size, jc.adapter == "none"
        for what, texts, k, principles in (("harmless", reds, ev.num_principles, [p.text for p in const.preference]),
                                           ("helpful", helps, 1, [C.HELPFUL_PRINCIPLE.text])):
            n = len(texts) * k * 2  # both orders
            work.append(Work(f"win-rate prompts ({what})", "forward", pairs * math.ceil(n / b), pairs * n,
                             round(pairs * n * _judge_tokens(L, texts, principles, (), t, max(1, b // (2 * k)))),
                             bare=bare))  # a comparison's principles and orders come one after another
        for texts, questions in ((reds, 2), (helps, 1)):  # harmful + evasive on red-team answers, evasive on helpful
            convs = [data.conversation_text(t, "") for t in texts]
            tokens = L.mean([data.render(L.tok, C.classification_messages(c, C.EVASIVE_Q, ["Yes", "No"]),
                                         C.COMPARISON_PREFILL) for c in convs], 1, t, batch=b)
            n = 2 * questions * models  # both orders
            work.append(Work("rate questions", "forward", n * math.ceil(len(texts) / b), n * len(texts),
                             round(n * len(texts) * tokens), bare=bare))
    if "reward_model" in cfg.stages or rundir.is_done(cfg.path, "reward_model"):
        work.append(passes("reward scores", "forward", models * (len(reds) + len(helps)), g.batch_size,
                           L.chat(reds + helps, 1, t, g.batch_size)))
    return work


# ---- the table -----------------------------------------------------------------------------------

def rate_lines(r: Rates, batch: int, max_new_tokens: int) -> list[str]:
    """The probe's numbers, so that a reader can judge them."""
    tokens_s = batch / (r.step_s + batch * r.row_step_s) if r.step_s + r.row_step_s else float("inf")
    fwd = 1 / r.fwd_token_s if r.fwd_token_s else float("inf")
    train = 1 / r.train_token_s if r.train_token_s else float("inf")
    ended = (f"answers {r.row_tokens:.0f} tokens, the longest {r.ends_at or max_new_tokens:.0f} of {max_new_tokens}"
             if r.row_tokens is not None else f"answers ran to max_new_tokens={max_new_tokens}")
    return [f"  sampling  {r.step_s * 1e3:8.2f} ms a step + {r.row_step_s * 1e3:7.3f} ms a row  "
            f"({tokens_s:,.0f} tokens/s at {batch} rows); {ended}",
            f"  forward   {r.fwd_s * 1e3:8.2f} ms a batch + {r.fwd_token_s * 1e6:7.2f} us a token  "
            f"({fwd:,.0f} tokens/s); x {r.bare:.2f} without an adapter",
            f"  training  {r.train_s * 1e3:8.2f} ms a step + {r.train_token_s * 1e6:7.2f} us a token  "
            f"({train:,.0f} tokens/s); x {r.trl:.2f} in TRL's trainer"]


def table(work: dict[str, list[Work]], r: Rates | None) -> tuple[list[str], float | None]:
    """Per stage: rows sampled, tokens forwarded and trained on, and (with rates) seconds; the total
    (None without rates)."""
    lines = [f"{'stage':<18}{'sampled rows':>14}{'forward tokens':>16}{'train tokens':>14}"
             + (f"{'fixed s':>9}{'seconds':>9}" if r else "")]
    total = 0.0
    for stage, ws in work.items():
        by = {k: sum(w.rows if k == "sample" else w.tokens for w in ws if w.kind == k)
              for k in ("sample", "forward", "train")}
        line = f"{stage:<18}{by['sample']:>14,}{by['forward']:>16,}{by['train']:>14,}"
        if r:
            s = stage_seconds(stage, ws, r)
            total += s
            line += f"{FIXED.get(stage, 0.0):>9.2f}{s:>9.1f}"
        lines.append(line)
    if r:
        lines.append(f"{'total':<18}{'':>53}{total:>9.1f}")
    return lines, total if r else None
