"""AI judges: given a conversation, a principle and two options, P(A is better), or None on failure.

A judge scores the *next token* after the prefilled "The answer is: (" and normalises the
probabilities of the letters, so the label is soft (CAI §4.1; RLAIF §2.1), not a parsed choice.
Backends:
  - local: the shared in-process base with any adapter, one batched forward, last position only;
  - llamacpp: llama-cpp-python on a GGUF file on CPU: the prompts' prefix tree (demos, conversation,
    principle shared) in multi-sequence batches, last-position logits only (judge_llamacpp.py);
  - openai: any OpenAI-compatible server (judge_http.py).
This module holds the Judge protocol, the local judge, `build()` and `check()` for every backend,
and `compare()`, the labelling protocol (both orders, several principles, optional chain of
thought) on any backend. Reads the local judge's adapter folder (the other backends read the GGUF
file or the server); writes nothing.

    python run.py recipe=tiny_cpu stages=[label_preferences] judge=local
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from cai_lite import constitution as C
from cai_lite import adapter_files, data, generation, models, rundir, voting
from cai_lite.config import Config, GenerationSettings, JudgeConfig
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)


class JudgeError(data.DataError):
    """A judge failed on so many prompts that its labels would mean nothing."""


@dataclass(frozen=True)
class ChoicePrompt:
    messages: list[dict]  # the chat, ending with the user's question
    prefill: str  # the start of the judge's answer, e.g. "The answer is: ("


class Judge(Protocol):
    name: str
    hard_labels: int  # answers that had to be parsed from text (no log-probs): recorded in stage.json

    def option_probs(self, prompts: list[ChoicePrompt], letters: str) -> list[list[float] | None]:
        """Per prompt, the probabilities of the next token being each letter, normalised over the
        letters; None where the judge failed."""
        ...

    def generate(self, prompts: list[ChoicePrompt], max_new_tokens: int) -> list[str | None]:
        """Greedy continuation of each prompt (chain of thought)."""
        ...

    def close(self) -> None: ...


def letter_ids(encode: Callable[[str], list[int]], prefill: str, letters: str) -> list[int]:
    """The id of each letter as the model emits it right after `prefill`: the tokens of
    prefill + letter minus those of prefill. `encode("A")` alone is wrong for SentencePiece
    tokenizers, which give the word-start piece "▁A" where, after "(", the model emits "A"."""
    head = encode(prefill)
    ids = []
    for letter in letters:
        full = encode(prefill + letter)
        if full[: len(head)] != head or len(full) != len(head) + 1:
            raise ValueError(f"judge: after {prefill[-16:]!r} the tokenizer does not make {letter!r} one token of "
                             "its own, so its probability cannot be read from one next-token distribution")
        ids.append(full[-1])
    return ids


def record_failures(cfg: Config, tally: dict[str, list[int]], index: int, judge: Judge, answers: list,
                    what: str) -> None:
    """Add a judge's answers (None = failed) to its running count in `tally`, and stop once the
    failures exceed its `max_failure_rate`: a stage that ended "successfully" with no labels would
    have the later stages train on nothing."""
    counts = tally.setdefault(judge.name, [0, 0])
    counts[0] += sum(a is None for a in answers)
    counts[1] += len(answers)
    check_failures(judge.name, *counts, cfg.all_judges()[index], f"judges[{index}]" if cfg.judges else "judge", what)


def check_failures(name: str, failed: int, total: int, jc: JudgeConfig, where: str, what: str) -> None:
    """Raise JudgeError when `failed / total` is above `jc.max_failure_rate`, saying what to try."""
    if not total or failed / total <= jc.max_failure_rate:
        return
    hint = {"openai": "raise judge.top_logprobs (both letters must be among the top log-probs), or serve a chat/"
                      "instruct model that answers with a letter; check the server's log for errors",
            "llamacpp": "raise judge.n_ctx (long prompts are failures), or use a chat/instruct GGUF",
            "local": "raise generation.max_prompt_tokens (cut prompts are failures), or judge with a model that "
                     "answers with a letter"}[jc.backend]
    raise JudgeError(f"{name}: {failed} of {total} {what} failed ({failed / total:.0%}), more than "
                     f"{where}.max_failure_rate={jc.max_failure_rate}. What was already written stays. Try: {hint}")


class LocalJudge:
    """The shared base (with `judge.adapter`, or bare) scoring letters in one batched forward."""

    def __init__(self, base: SharedBase, jc: JudgeConfig, g: GenerationSettings, folder: Path | None = None):
        """`folder` holds the adapter to judge with (None: the bare base); see `adapter_folder`."""
        self.base, self.g, self.batch_size = base, g, jc.batch_size
        self.name = f"local:{jc.adapter}"
        self.hard_labels = 0
        self.adapter: str | None = None
        if folder is not None:
            # One adapter name per folder: judges from two folders must not overwrite each other's weights.
            name = jc.adapter if jc.adapter in ("sft", "critique") else \
                "judge_" + hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:10]
            adapter_files.load_adapter(base, name, folder)  # a no-op when that folder is already loaded
            self.adapter = name
        self.cut_prompts = 0  # prompts longer than generation.max_prompt_tokens: recorded as failures

    def _encode(self, text: str) -> list[int]:
        return self.base.tokenizer.encode(text, add_special_tokens=False)

    @torch.no_grad()
    def option_probs(self, prompts: list[ChoicePrompt], letters: str) -> list[list[float] | None]:
        by_prefill = {p.prefill: letter_ids(self._encode, p.prefill, letters) for p in prompts}
        out: list[list[float] | None] = []
        with models.role(self.base, self.adapter) as model:
            for batch in data.chunks(prompts, self.batch_size):
                texts = [data.render(self.base.tokenizer, p.messages, p.prefill) for p in batch]
                enc, cut = generation.tokenize_left(self.base, texts, self.g.max_prompt_tokens)
                logits = model(**enc, position_ids=generation.positions(enc["attention_mask"]), logits_to_keep=1,
                               use_cache=False).logits[:, -1, :].float()  # (B, V)
                ids = torch.tensor([by_prefill[p.prefill] for p in batch], device=logits.device)  # (B, L)
                logp = logits.log_softmax(-1).gather(1, ids)  # (B, L): log P(letter | prompt)
                probs = logp.softmax(-1)  # (B, L): normalised over the letters only
                for row, was_cut in zip(probs, cut):
                    # A cut prompt lost its start (the question or the demos): a failure, as in llama.cpp.
                    out.append(None if was_cut or torch.isnan(row).any() else row.tolist())
                if any(cut):
                    self.cut_prompts += sum(cut)
                    log.warning("%s: %d prompt(s) longer than generation.max_prompt_tokens=%d; recorded as failures",
                                self.name, sum(cut), self.g.max_prompt_tokens)
        return out

    def generate(self, prompts: list[ChoicePrompt], max_new_tokens: int) -> list[str | None]:
        texts = [data.render(self.base.tokenizer, p.messages, p.prefill) for p in prompts]
        return generation.generate(self.base, texts, self.adapter, self.g, max_new_tokens=max_new_tokens,
                                   temperature=0.0, desc="judge reasoning").texts

    def close(self) -> None:
        pass


def build(cfg: Config, base: SharedBase | None) -> list[Judge]:
    """The configured judges, ready to score."""
    from cai_lite import judge_http, judge_llamacpp

    out: list[Judge] = []
    for jc in cfg.all_judges():
        if jc.backend == "local":
            out.append(LocalJudge(base, jc, cfg.generation, adapter_folder(cfg, jc)))
        elif jc.backend == "llamacpp":
            out.append(judge_llamacpp.LlamaCppJudge(jc, lambda m, p: data.render(base.tokenizer, m, p)))
        else:
            # The server adds the BOS itself, where the model has one: send the text without it.
            out.append(judge_http.OpenAIJudge(jc, lambda m, p: data.server_text(base.tokenizer,
                                                                                 data.render(base.tokenizer, m, p))))
    return out


def adapter_folder(cfg: Config, jc: JudgeConfig) -> Path | None:
    """Where a local judge's adapter comes from: `none` is the bare base, `sft` the run's SL-CAI
    adapter, `critique` the critique adapter of `critique_revise.critic_adapter`, else a PEFT folder."""
    if jc.adapter == "none":
        return None
    if jc.adapter == "sft":
        return rundir.adapter_dir(cfg.path, "sft")
    if jc.adapter == "critique":
        return Path(cfg.critique_revise.critic_adapter)
    return Path(jc.adapter)


def check(cfg: Config) -> list[str]:
    """Judge problems found before any model loads: unknown adapter, missing GGUF, unset key
    variable, dead server."""
    from cai_lite import judge_http, judge_llamacpp

    errors = []
    for i, jc in enumerate(cfg.all_judges()):
        where = "judge" if not cfg.judges else f"judges[{i}]"
        if jc.backend == "local" and jc.adapter != "none":
            folder = adapter_folder(cfg, jc)
            will_exist = jc.adapter == "sft" and "sft" in cfg.stages
            if not will_exist and not (folder / "adapter_config.json").is_file():
                errors.append(f"{where}.adapter: {jc.adapter!r}: no adapter at {folder} (use none, sft once the sft "
                              "stage has run, critique with critique_revise.critic_adapter set, or a PEFT folder)")
            elif not will_exist:
                errors += [f"{where}.adapter: {p}" for p in adapter_files.check(folder)]
        if jc.backend == "llamacpp":
            errors += [f"{where}.gguf_path: {p}" for p in judge_llamacpp.gguf_problems(jc.gguf_path)]
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                errors.append(f"{where}.backend=llamacpp needs llama-cpp-python: pip install -e '.[cpu-judge]'")
        elif jc.backend == "openai":
            errors += judge_http.check(jc, where)
    return errors


@dataclass
class Comparison:
    conversation: str  # "Human: ..." transcript the responses answer
    response_a: str
    response_b: str
    principles: list[C.PreferencePrinciple]


@dataclass
class Judgement:
    p_a: float | None  # P(response_a is better): mean over principles of the order-averaged probability
    details: list[dict] = field(default_factory=list)  # per principle: id, p_ab, p_ba (P(slot A)), p_a, cot


def compare(judge: Judge, comparisons: list[Comparison], both_orders: bool, demos: tuple = (), cot: bool = False,
            cot_max_new_tokens: int = 128) -> list[Judgement]:
    """Judge every comparison under each of its principles, in one or both option orders.

    Prompts go to the judge in (comparison, principle, order) order, so consecutive prompts share
    a long prefix: a llama.cpp judge decodes each shared prefix once for all of them."""
    prompts, index = [], []
    for ci, c in enumerate(comparisons):
        for pi, pr in enumerate(c.principles):
            orders = [(c.response_a, c.response_b, "ab")] + ([(c.response_b, c.response_a, "ba")] if both_orders else [])
            for x, y, order in orders:
                prompts.append(ChoicePrompt(C.comparison_messages(c.conversation, pr.text, x, y, demos),
                                            C.COMPARISON_PREFILL))
                index.append((ci, pi, order))
    reasoning: list[str | None] = [None] * len(prompts)
    if cot:
        cot_prompts = [ChoicePrompt(p.messages, C.COT_PREFILL) for p in prompts]
        reasoning = judge.generate(cot_prompts, cot_max_new_tokens)
        prompts = [ChoicePrompt(p.messages, C.COT_PREFILL + (r or "") + C.COT_ANSWER) for p, r in zip(prompts, reasoning)]
    probs = judge.option_probs(prompts, "AB")
    table: dict[tuple[int, int], dict] = {}
    for (ci, pi, order), pr, why in zip(index, probs, reasoning):
        p_first = None if pr is None else pr[0]
        if cot and p_first is not None:
            p_first = voting.clamp(p_first)
        cell = table.setdefault((ci, pi), {"id": comparisons[ci].principles[pi].id, "p_ab": None, "p_ba": None})
        cell["p_" + order] = p_first
        if cot:
            cell["cot_" + order] = why
    out = []
    for ci, c in enumerate(comparisons):
        details = [table[(ci, pi)] for pi in range(len(c.principles))]
        for d in details:
            d["p_a"] = voting.average_orders(d["p_ab"], d["p_ba"]) if both_orders else d["p_ab"]
        out.append(Judgement(voting.mean_or_none([d["p_a"] for d in details]), details))
    return out
