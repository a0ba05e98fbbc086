"""The llama.cpp judge's batched decode (llamacpp_batch.py): many prompts as one prefix tree in a
multi-sequence batch give the same letter probabilities as one prompt at a time.

    python -m pytest tests/test_judge_batch.py -q
"""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from cai_lite import constitution as C
from cai_lite import data, judge_llamacpp, judges
from cai_lite.config import JudgeConfig
from cai_lite.gguf_export import export_gguf
from cai_lite.llamacpp_batch import common_prefix, waves

# Batched decoding vs each prompt decoded alone from scratch: the same tokens, other KV cells and
# rows around them; measured max |P difference| 9e-7 here and 1.4e-5 on test_judges.py's prompts
# (this sharp model, init std 0.2, amplifies float rounding). One at a
# time *with* prefix reuse decodes 1-3 token suffixes, which llama.cpp's CPU flash attention runs
# through another kernel path (f16 accumulation): 1.9e-3 from the rest, measured. The bugs these
# tests guard against (wrong logits row, a sequence missing its prefix) move probabilities > 1e-2.
TOL, TOL_SMALL_SUFFIX = 5e-5, 5e-3
N_CTX = 512  # small, so the prompts below need several waves and one of them does not fit at all
PRINCIPLES = [C.PreferencePrinciple("p1", "Which response is more helpful and harmless?"),
              C.PreferencePrinciple("p2", "Which response is less likely to cause harm?")]


def _prompts() -> list[judges.ChoicePrompt]:
    """compare()'s order: comparison, principle, order; conversations and answers of different lengths,
    a comparison of two equal answers (identical prompts), and one conversation longer than N_CTX."""
    pairs = [("Sure, here is how.", "No."), ("I can't help with that, but here is a safer idea. " * 3, "Do it."),
             ("Same answer.", "Same answer."), ("Paris.", "The capital of France is Paris, on the Seine.")]
    out = []
    for i, (a, b) in enumerate(pairs):
        conv = f"Human: question {i} about" + " locks and keys" * (3 * i)
        if i == 1:
            conv += " and doors" * 400  # far beyond N_CTX tokens
        for pr in PRINCIPLES:
            for x, y in ((a, b), (b, a)):
                out.append(judges.ChoicePrompt(C.comparison_messages(conv, pr.text, x, y), C.COMPARISON_PREFILL))
    return out


@pytest.fixture(scope="module")
def cpp(sharp_llama, tmp_path_factory):
    gguf = export_gguf(sharp_llama, tmp_path_factory.mktemp("gguf") / "sharp-f32.gguf", "f32")
    tok = AutoTokenizer.from_pretrained(sharp_llama)  # the fallback renderer; the GGUF's own template is used
    judge = judge_llamacpp.LlamaCppJudge(JudgeConfig(backend="llamacpp", gguf_path=str(gguf), n_ctx=N_CTX),
                                 lambda m, p: data.render(tok, m, p))
    yield judge
    judge.close()


def _close(a: list, b: list) -> bool:
    """Equal answers: None in the same slots, probabilities within TOL elsewhere."""
    return len(a) == len(b) and all((x is None) == (y is None) and (x is None or x == pytest.approx(y, abs=TOL))
                                    for x, y in zip(a, b))


def _fresh(judge, wave_prompts: int, prompts) -> tuple[list, int]:
    """Probabilities with nothing cached beforehand, and the tokens this call evaluated."""
    judge._decoder.forget()
    judge.wave_prompts = wave_prompts
    before = judge.evaluated_tokens
    try:
        return judge.option_probs(prompts, "AB"), judge.evaluated_tokens - before
    finally:
        judge.wave_prompts = judge_llamacpp.JUDGE_SEQS - 1


def _boundary_slack(tokens: list[list[int]], wave_prompts: int) -> int:
    """How many more tokens the waves may evaluate than one prompt at a time with prefix reuse.

    Within a wave the prefix tree decodes each token shared by its prompts once, which one at a time,
    reusing only the prompt just before, never beats. Across waves it can: a wave's first prompt finds
    in sequence 0 only the previous wave's common prefix, where one at a time reuses all it shares
    with the previous wave's last prompt. So the excess is at most that shared prefix, summed over
    wave boundaries. (Asserting no excess at all was false: 8,258 vs 8,222 tokens on 80 prompts at
    n_ctx 4096.)"""
    cut = list(waves(tokens, N_CTX, wave_prompts))
    return sum(common_prefix(tokens[a[-1]], tokens[b[0]]) for a, b in zip(cut, cut[1:]))


def test_batched_judge_equals_one_prompt_at_a_time(cpp):
    prompts = _prompts()
    tokens = [cpp.tokens(p) for p in prompts]
    fits = [t for t in tokens if len(t) < N_CTX]
    assert len(fits) == len(prompts) - 4  # comparison 1: 2 principles x 2 orders too long
    assert len(list(waves(fits, N_CTX, 63))) >= 2 and max(len(w) for w in waves(fits, N_CTX, 63)) >= 4

    cpp.reuse_prefix = False
    try:
        alone, alone_tokens = _fresh(cpp, 1, prompts)  # each prompt alone, every token evaluated
    finally:
        cpp.reuse_prefix = True
    one, one_tokens = _fresh(cpp, 1, prompts)  # one at a time, reusing the previous prompt's prefix
    many, many_tokens = _fresh(cpp, judge_llamacpp.JUDGE_SEQS - 1, prompts)
    for i, (a, o, b) in enumerate(zip(alone, one, many)):
        if len(tokens[i]) >= N_CTX:
            assert a is None and o is None and b is None, i  # a failure in its own slot, the others unaffected
        else:
            assert b == pytest.approx(a, abs=TOL), i
            assert o == pytest.approx(a, abs=TOL_SMALL_SUFFIX), i
    assert any(abs(p[0] - 0.5) > 0.05 for p in many if p), "the model has no preferences; the test would be vacuous"
    assert many[8] == many[9]  # equal answers: identical prompts, one sequence
    assert many_tokens <= one_tokens + _boundary_slack(fits, judge_llamacpp.JUDGE_SEQS - 1)
    assert one_tokens < alone_tokens == sum(len(t) for t in fits)
    # Waves of 6 split comparison 2 between two waves: more tokens than one at a time, within the bound.
    six, six_tokens = _fresh(cpp, 6, prompts)
    assert one_tokens < six_tokens <= one_tokens + _boundary_slack(fits, 6) and _close(six, many)
    # Another order of the same prompts (other waves, other trees) gives each prompt the same answer.
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    shuffled, _ = _fresh(cpp, judge_llamacpp.JUDGE_SEQS - 1, [prompts[i] for i in order])
    assert _close(shuffled, [many[i] for i in order])


def test_prefix_stays_cached_across_calls_and_generation(cpp):
    prompts = [p for p in _prompts() if "doors" not in p.messages[-1]["content"]]
    first, _ = _fresh(cpp, judge_llamacpp.JUDGE_SEQS - 1, prompts[:4])
    before = cpp.evaluated_tokens
    again = cpp.option_probs(prompts[:4], "AB")  # sequence 0 holds their common prefix
    reused = cpp.evaluated_tokens - before
    cpp.reuse_prefix = False
    try:
        cold, cold_tokens = _fresh(cpp, judge_llamacpp.JUDGE_SEQS - 1, prompts[:4])
    finally:
        cpp.reuse_prefix = True
    assert reused < cold_tokens and _close(again, first) and _close(cold, first)
    assert isinstance(cpp.generate(prompts[:1], 3)[0], str)  # Llama's own decoding, on a cleared cache
    assert _close(cpp.option_probs(prompts[:4], "AB"), first)  # nothing stale after it


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_wave_stopped_part_way_leaves_nothing_stale(cpp, monkeypatch, error):
    """An exception between two decode calls of a wave (here: after its first 16 tokens) must not leave
    sequence 0 described as the previous wave's prefix while its cells hold this wave's tokens."""
    prompts = [p for p in _prompts() if "doors" not in p.messages[-1]["content"]]
    first, second = prompts[:4], prompts[8:12]  # comparisons 0 and 2: their conversations differ
    want, _ = _fresh(cpp, judge_llamacpp.JUDGE_SEQS - 1, first)  # sequence 0 now holds their common prefix
    decode, calls = cpp._decoder._decode, []

    def stops_after_one_call(*args):
        calls.append(1)
        if len(calls) == 2:
            raise error("stopped")
        decode(*args)

    monkeypatch.setattr(cpp._decoder, "n_batch", 16)  # several decode calls per wave
    monkeypatch.setattr(cpp._decoder, "_decode", stops_after_one_call)
    with pytest.raises(error):
        cpp.option_probs(second, "AB")
    monkeypatch.undo()
    assert _close(cpp.option_probs(first, "AB"), want)  # the same as with nothing cached
    assert _close(cpp.option_probs(second, "AB"), _fresh(cpp, judge_llamacpp.JUDGE_SEQS - 1, second)[0])
