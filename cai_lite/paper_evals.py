"""The CAI paper's multiple-choice evals: the 438 HHH comparisons and HarmfulVsEthical.

Reads Anthropic's JSONL files (`{prompt, corrects: [" (B)"], incorrects, text_correct?, text_incorrect?}`,
each prompt ending in "The answer is:"). Writes nothing. A judge answers each item by the same
next-token letter scoring it uses for preferences; the reward model answers HHH items by scoring
the two full transcripts (`text_correct` vs `text_incorrect`). Accuracy is comparable to the
paper's HHH-eval figure.

    python -c "from cai_lite.paper_evals import load_items; print(len(load_items('tests/fixtures/anthropic-format/hhh_evaluations.jsonl')))"
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from cai_lite import constitution as C
from cai_lite.data import DataError
from cai_lite.judges import ChoicePrompt, Judge

_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class Item:
    prompt: ChoicePrompt
    correct: str  # the letter of the right option, e.g. "B"
    letters: str  # the options offered, e.g. "AB"
    transcripts: tuple[str, str] | None  # (correct, incorrect) full transcripts, for reward models


def _letter(option: str, path: Path, n: int) -> str:
    m = re.fullmatch(r"\s*\(([A-Z])\)\s*", option)
    if not m:
        raise DataError(f"{path}:{n}: cannot read an option letter from {option!r}")
    return m.group(1)


def load_items(path: str | Path, limit: int = 0) -> list[Item]:
    path = Path(path)
    items = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                correct = _letter(row["corrects"][0], path, n)
                letters = "".join(sorted({correct, *(_letter(o, path, n) for o in row["incorrects"])}))
                question = row["prompt"].strip().removesuffix("The answer is:").strip()
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
                raise DataError(f"{path}:{n}: not an eval item {{prompt, corrects, incorrects}} ({type(e).__name__}: {e})") from None
            pair = (row["text_correct"], row["text_incorrect"]) if "text_correct" in row else None
            items.append(Item(ChoicePrompt([{"role": "user", "content": question}], C.COMPARISON_PREFILL),
                              correct, letters, pair))
            if limit and len(items) >= limit:
                break
    return items


def judge_accuracy(judge: Judge, items: list[Item]) -> dict:
    """Share of items where the judge's most probable letter is the right one; failures count as wrong."""
    correct = failures = 0
    by_letters: dict[str, list[Item]] = {}
    for it in items:
        by_letters.setdefault(it.letters, []).append(it)
    for letters, group in by_letters.items():
        for it, probs in zip(group, judge.option_probs([it.prompt for it in group], letters)):
            if probs is None:
                failures += 1
                continue
            correct += letters[max(range(len(letters)), key=lambda i: probs[i])] == it.correct
    return {"accuracy": correct / len(items) if items else None, "n": len(items), "failures": failures}


def transcript_messages(transcript: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> chat messages."""
    parts = _TURN.split("\n\n" + transcript.lstrip("\n"))
    return [{"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1].strip()}
            for i in range(1, len(parts) - 1, 2)]


def reward_accuracy(base, items: list[Item], batch_size: int, max_tokens: int) -> dict:
    """Share of HHH items where the reward model scores the correct transcript higher."""
    from cai_lite import rollout

    pairs = [it.transcripts for it in items if it.transcripts is not None]
    if not pairs:
        return {"accuracy": None, "n": 0}
    texts = [base.tokenizer.apply_chat_template(transcript_messages(t), tokenize=False) for p in pairs for t in p]
    scores = rollout.score_texts(base, texts, batch_size, max_tokens).view(-1, 2)
    return {"accuracy": (scores[:, 0] > scores[:, 1]).float().mean().item(), "n": len(pairs)}


def share_of_letter(items: list[Item], letter: str) -> float:
    """What a judge that always answers `letter` scores: the share of items whose answer it is."""
    return sum(it.correct == letter for it in items) / len(items)

