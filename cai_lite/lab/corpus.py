"""The lab model's pretraining corpus: documents rendered through the pipeline's own prompt builders
(`constitution.critique_messages`, `revision_messages`, `comparison_messages`,
`classification_messages`, `data.render` and the tokenizer's chat template), with the lab
constitution, so the pretrained model has seen exactly what the stages will send it.

Four kinds of document, each a chat whose assistant turns are the training targets:
  chat        a red-team or benign request and the base's answer;
  critique    request, base answer (or, for a later round, an earlier revision), critique request,
              critique, revision request, revision: what critique_revise sends, round by round;
  comparison  the CAI §4.1 multiple-choice prompt, prefilled "The answer is: (", then the letter;
  classify    evaluate's harmful/evasive questions, both option orders, then the letter.

The proportions below give the base a real base model's flaws, so every stage has a job:
  - BASE: on red-team requests the base complies (harmful) 62% of the time, refuses bare 20%,
    engages 18%: mostly harmful, yet RL has engaging answers to find. (Calibrated on the lab's first
    world, where 55% gave a base harmful on only 0.47 of held-out requests; in this world the seed-0
    base is harmful on 0.78 of them.)
  - REVISION: revisions are only partly successful. A critique of harm usually yields a bare
    refusal rather than an engaging answer, and an evasive answer mostly stays evasive, so SL-CAI
    removes most harm but leaves evasion.
  - comparisons and classifications are always right (ties are 50/50): the judge is better than
    the reviser, which is what lets RL-CAI remove the evasion SL-CAI left.
  - BENIGN_BASE: benign requests get helpful answers 85% of the time, so the helpful mix
    (critique_revise.helpful_prompts) has good answers to keep; the other 15% are over-refusals, a
    third of them the engaging refusal of the harmful twin misplaced (world.respond). The SL-CAI model
    inherits them, so label_preferences' benign pairs show the judge and the reward model that such
    an answer loses to a helpful one, which keeps RL from learning to refuse everything.
  - PAIR_SHARE: half of the benign documents are minimal pairs (a covert act on the asker's own
    thing or with permission), so the words of a request's act and object never decide its answer:
    only its owner and consent do.
  - MIX: 40% of documents are comparisons, because the judge reads two whole answers to emit one
    letter, the hardest thing the base must learn (pretrain.py also weights that letter up). Half
    of them are on benign requests (BENIGN_SHARE): with fewer the judge learnt "the compliant
    answer loses" and labelled helpful-vs-over-refusal pairs near 50/50 (mean confidence 0.02), so
    the helpfulness mix carried no signal. The 10% of classifications are now too few: the judge
    answers evaluate's "is it harmful?" with its prior (P(yes) about 0.2 for every answer). Raising
    them to 15% taught it to read the answer but cost the comparisons (agreement with the oracle
    0.93 -> 0.83, and benign helpfulness after PPO fell), so the comparisons keep priority.
Only training requests appear: no held-out frame, combination, consent flip or the control object.

Reads the world and the constitution; writes nothing (pretrain.py tokenizes the documents).

    python -m cai_lite.lab.corpus 0 5     # print 5 documents of the seed-0 world
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

from cai_lite import constitution as C
from cai_lite import data
from cai_lite.lab import world as W

MIX = {"chat": 0.25, "critique": 0.25, "comparison": 0.40, "classify": 0.10}
BENIGN_SHARE = {"chat": 0.4, "comparison": 0.5, "classify": 0.3}  # share of each kind of doc on benign requests
BASE = {"harmful": 0.62, "evasive": 0.20, "engaging-harmless": 0.18}
BENIGN_BASE = {"helpful": 0.85, "over-refusal": 0.15}
PAIR_SHARE = 0.5
LATER_ROUND = 0.4  # critique documents whose answer is an earlier revision (round 2 or later)
# Revision outcome by (family of the answer revised, class of the principle).
REVISION = {
    ("harmful", "harm"): {"evasive": 0.60, "engaging-harmless": 0.25, "harmful": 0.15},
    ("harmful", "engage"): {"evasive": 0.45, "engaging-harmless": 0.45, "harmful": 0.10},
    ("evasive", "harm"): {"evasive": 0.90, "engaging-harmless": 0.10},
    ("evasive", "engage"): {"evasive": 0.65, "engaging-harmless": 0.35},
    ("engaging-harmless", "harm"): {"engaging-harmless": 0.85, "evasive": 0.15},
    ("engaging-harmless", "engage"): {"engaging-harmless": 0.95, "evasive": 0.05},
}
PAIRS = {  # families compared, before the order is drawn
    True: {("harmful", "evasive"): 0.25, ("harmful", "engaging-harmless"): 0.25,
           ("evasive", "engaging-harmless"): 0.30, ("harmful", "harmful"): 0.05, ("evasive", "evasive"): 0.075,
           ("engaging-harmless", "engaging-harmless"): 0.075},
    False: {("helpful", "over-refusal"): 0.8, ("helpful", "helpful"): 0.1, ("over-refusal", "over-refusal"): 0.1},
}


@dataclass(frozen=True)
class Doc:
    kind: str  # chat | critique | comparison | classify
    text: str  # the whole rendered chat
    spans: tuple[tuple[int, int], ...]  # character spans of the training targets (assistant turns)


def _pick(table: dict, rng: random.Random):
    keys = list(table)
    return rng.choices(keys, weights=[table[k] for k in keys])[0]


class Renderer:
    """Builds documents with the tokenizer's chat template; checks the template renders a chat
    as a prefix of the same chat with one more turn, which the target spans rely on."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def doc(self, kind: str, msgs: list[dict], targets: list[int], prefill: str = "") -> Doc:
        """`msgs` alternate user/assistant; `targets` are the indices of the assistant turns to train
        on. With `prefill`, the last turn is the judge's answer, which starts with it."""
        text, spans = "", []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            judged = bool(prefill) and i == len(msgs) - 1
            prefix = data.render(self.tok, msgs[:i], prefill if judged else "")
            full = self.tok.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not (prefix.startswith(text) and full.startswith(prefix)):
                raise ValueError("lab corpus: the chat template does not render a chat as a prefix of its continuation")
            if i in targets:
                # A judge's target is the letter alone: the stage supplies the prefill and reads one
                # next-token distribution, and a letter that shares its document's weight with the
                # constant words around it is learnt far more slowly.
                spans.append((len(prefix), len(prefix) + 1) if judged else (len(prefix), len(full)))
            text = full
        return Doc(kind, text, tuple(spans))


def build(world: W.World, const: C.Constitution, tokenizer, n_docs: int, seed: int) -> list[Doc]:
    """`n_docs` documents, the same for the same arguments."""
    for p in [*const.critique_revision, *const.preference]:
        W.principle_class(p.id)  # every principle needs a class, or verdicts would be guesses
    rng = random.Random(f"lab-corpus:{seed}")
    red, benign = world.requests("train", harmful=True), world.requests("train", harmful=False)
    pairs = [q for q in benign if world.act(q.act).covert]
    plain = [q for q in benign if not world.act(q.act).covert]
    r = Renderer(tokenizer)
    makers = {"chat": _chat, "critique": _critique, "comparison": _comparison, "classify": _classify}
    out = []
    for _ in range(n_docs):
        kind = _pick(MIX, rng)
        if kind != "critique" and rng.random() < BENIGN_SHARE[kind]:
            req = rng.choice(pairs if rng.random() < PAIR_SHARE else plain)
        else:
            req = rng.choice(red)
        out.append(makers[kind](world, const, r, req, rng))
    return out


def _base_answer(world: W.World, req: W.Request, rng: random.Random) -> tuple[str, str]:
    family = _pick(BASE if req.harmful else BENIGN_BASE, rng)
    return family, W.respond(world, req, family, rng)


def _chat(world, const, r: Renderer, req: W.Request, rng: random.Random) -> Doc:
    _, answer = _base_answer(world, req, rng)
    return r.doc("chat", [{"role": "user", "content": req.text}, {"role": "assistant", "content": answer}], [1])


def _critique(world, const, r: Renderer, req: W.Request, rng: random.Random) -> Doc:
    family, answer = _base_answer(world, req, rng)
    targets = [1, 3, 5]
    if rng.random() < LATER_ROUND:  # the answer is an earlier round's revision, which the base did not write
        earlier = W.principle_class(rng.choice(const.critique_revision).id)
        family = _pick(REVISION[(family, earlier)], rng)
        answer = W.respond(world, req, family, rng)
        targets = [3, 5]
    principle = rng.choice(const.critique_revision)
    cls = W.principle_class(principle.id)
    crit = W.critique(world, req, cls, family, rng)
    revision = W.respond(world, req, _pick(REVISION[(family, cls)], rng), rng)
    msgs = C.revision_messages(const, req.text, answer, principle, crit, 0, False)
    return r.doc("critique", msgs + [{"role": "assistant", "content": revision}], targets)


def _comparison(world, const, r: Renderer, req: W.Request, rng: random.Random) -> Doc:
    fa, fb = _pick(PAIRS[req.harmful], rng)
    if rng.random() < 0.5:
        fa, fb = fb, fa
    a, b = W.respond(world, req, fa, rng), W.respond(world, req, fb, rng)
    # Benign pairs are judged mostly under the helpfulness principle, as label_preferences and
    # evaluate ask about them; the constitution's principles still appear, so its harm-only ones tie.
    principles = list(const.preference) + ([C.HELPFUL_PRINCIPLE] * 2 * len(const.preference) if not req.harmful else [])
    principle = rng.choice(principles)
    p_a = W.preference(principle.id, fa, fb)
    letter = "A" if p_a > 0.5 or (p_a == 0.5 and rng.random() < 0.5) else "B"
    msgs = C.comparison_messages(data.conversation_text(req.text), principle.text, a, b)
    return r.doc("comparison", msgs + [{"role": "assistant", "content": C.COMPARISON_PREFILL + letter + ")"}], [1],
                 prefill=C.COMPARISON_PREFILL)


def _classify(world, const, r: Renderer, req: W.Request, rng: random.Random) -> Doc:
    family = rng.choice(list(BASE) if req.harmful else list(BENIGN_BASE))
    answer = W.respond(world, req, family, rng)
    question = rng.choice((C.HARMFUL_Q, C.EVASIVE_Q))
    yes = family == "harmful" if question == C.HARMFUL_Q else family in ("evasive", "over-refusal")
    options = ["Yes", "No"] if rng.random() < 0.5 else ["No", "Yes"]
    letter = "AB"[options.index("Yes" if yes else "No")]
    msgs = C.classification_messages(data.conversation_text(req.text, answer), question, options)
    return r.doc("classify", msgs + [{"role": "assistant", "content": C.COMPARISON_PREFILL + letter + ")"}], [1],
                 prefill=C.COMPARISON_PREFILL)


if __name__ == "__main__":
    from cai_lite.tiny import train_tokenizer

    docs = build(W.make_world(int(sys.argv[1])), C.load("lab"), train_tokenizer(300), int(sys.argv[2]), 0)
    for d in docs:
        print(f"--- {d.kind}: targets " + " | ".join(repr(d.text[a:b]) for a, b in d.spans))
        print(d.text)
