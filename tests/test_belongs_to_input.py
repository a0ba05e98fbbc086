"""Each result belongs to its own input: the judges. Every path that returns one verdict per prompt
or comparison runs on inputs whose right answers differ and are known beforehand, so a verdict
swapped, shifted or reversed between inputs fails a test. `verdict` is P(slot A) as a function of
the texts (each answer's worth in its conversation under its principle, plus a taste for slot A so
the two option orders differ). It is given:
  - in-process (`TextJudge`), under judges.compare;
  - by the local judge's model (a stand-in forward over the tokens the judge batched and padded);
  - by llama.cpp (a stand-in for its KV cache, behind the real GGUF tokenizer, waves and prefix tree);
  - by an OpenAI-compatible stub on 127.0.0.1 (`Stub`), whose answers come back out of order.
tests/test_belongs_to_input_stages.py uses these stand-ins for generation, rollouts and the stages.

    python -m pytest -q tests/test_belongs_to_input.py
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cai_lite import constitution as C
from cai_lite import data, judge_llamacpp, judges
from cai_lite.config import GenerationSettings, JudgeConfig
from cai_lite.judge_http import OpenAIJudge
from cai_lite.tiny import train_tokenizer

# ---- judges whose verdicts follow from the texts ----------------------------------------------

ASK = "Consider the following conversation between a human and an assistant:\n\n"  # comparisons
CLASSIFY = "Here is a conversation between a human and an assistant:\n\n"  # harmful? evasive?
BIAS = 0.25  # a taste for slot (A), so the two option orders give different answers


def digest(*texts: str) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:10]


def worth(*texts: str) -> float:
    """A number in [-1, 1] fixed by the texts: every answer in every conversation has its own."""
    return int(digest(*texts), 16) / 16**10 * 2 - 1


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def slot_a(conversation: str, question: str, a: str, b: str, reasoning: str = "", scale: float = 2.0,
           salt: str = "") -> float:
    """The stand-in judges' P(slot A is better): the worth of each answer in this conversation under
    this principle, the taste for slot (A), and the worth of the judge's reasoning when it gave some."""
    logit = worth(salt, conversation, question, a) - worth(salt, conversation, question, b) + BIAS
    return sigmoid(scale * (logit + (worth(salt, reasoning) if reasoning else 0.0)))


def p_yes(conversation: str, question: str, scale: float = 2.0, salt: str = "") -> float:
    """What evaluate should make of the stand-in judges' classification: both option orders averaged."""
    w = worth(salt, conversation, question)
    return (sigmoid(scale * (w + BIAS)) + 1 - sigmoid(scale * (-w + BIAS))) / 2


def reason(conversation: str, question: str, a: str, b: str) -> str:
    """The stand-in judges' chain of thought on one comparison."""
    return "weighing " + digest(conversation, question, a, b)


def read(text: str) -> tuple[str, str, str, str, str] | None:
    """(conversation, question, A, B, reasoning) of the last comparison in a judge prompt (its messages'
    text, rendered or not, then the prefill); for a classification A is "Yes" or "No", B empty."""
    at = max(text.rfind(ASK), text.rfind(CLASSIFY))
    if at < 0:
        return None
    marker = ASK if text.startswith(ASK, at) else CLASSIFY
    head, options = text[at + len(marker):].split("\nOptions:\n", 1)
    conversation, question = head.rsplit("\n\n", 1)
    if marker == CLASSIFY:
        return conversation, question, options[len("(A) "):].split("\n", 1)[0], "", ""
    a, rest = options[len("(A) "):].split("\n(B) ", 1)
    thought = text.split(C.COT_PREFILL, 1)[1].split(C.COT_ANSWER, 1)[0] if C.COT_PREFILL in text[at:] else ""
    return conversation, question, a, rest.split("\n\nAnswer with (A) or (B).", 1)[0], thought


def verdict(text: str, scale: float = 2.0, salt: str = "") -> float | None:
    """P(slot A) for the judge prompt `text`; None where it holds no question or an answer says FAIL."""
    got = read(text)
    if got is None:
        return None
    conversation, question, a, b, thought = got
    if not b:  # a classification: P(A) leans to Yes by the worth of the conversation under the question
        w = worth(salt, conversation, question)
        return sigmoid(scale * ((w if a == "Yes" else -w) + BIAS))
    return None if "FAIL" in a + b else slot_a(conversation, question, a, b, thought, scale, salt)


class TextJudge:
    """An in-process judge: every answer is `verdict` of its prompt, every chain of thought `reason`."""

    hard_labels = 0

    def __init__(self, name: str = "text", scale: float = 2.0, salt: str = ""):
        self.name, self.scale, self.salt = name, scale, salt

    def option_probs(self, prompts, letters):
        out = [verdict(p.messages[-1]["content"] + p.prefill, self.scale, self.salt) for p in prompts]
        return [None if p is None else [p, 1 - p] for p in out]

    def generate(self, prompts, max_new_tokens):
        return [reason(*read(p.messages[-1]["content"])[:4]) for p in prompts]

    def close(self):
        pass


def expected_cells(c: judges.Comparison, both_orders: bool, cot: bool = False, scale: float = 2.0,
                   salt: str = "") -> list[tuple]:
    """(principle id, P(A) with A first, P(A) with B first) that compare() should record for `c`."""
    def one(pr: C.PreferencePrinciple, x: str, y: str) -> float | None:
        if "FAIL" in x + y:
            return None
        thought = reason(c.conversation, pr.text, x, y) if cot else ""
        p = slot_a(c.conversation, pr.text, x, y, thought, scale, salt)
        return min(0.6, max(0.4, p)) if cot else p

    return [(pr.id, one(pr, c.response_a, c.response_b), 
             one(pr, c.response_b, c.response_a) if both_orders else None) for pr in c.principles]


def expected_p_a(cells: list[tuple]) -> float | None:
    """P(response A better): the orders averaged (in the second, slot A holds response B, so it counts
    as 1 - p), then the principles; failures left out."""
    per = []
    for _, ab, ba in cells:
        parts = [p for p in (ab, None if ba is None else 1 - ba) if p is not None]
        per += [sum(parts) / len(parts)] if parts else []
    return sum(per) / len(per) if per else None


def assert_judgements(comps: list[judges.Comparison], got: list[judges.Judgement], both_orders: bool,
                      tol: float = 1e-9, **kw) -> None:
    """`got` holds each comparison's own verdicts (`tol`: float32 logits carry 1e-7)."""
    assert len(got) == len(comps)
    for c, j in zip(comps, got):
        cells = expected_cells(c, both_orders, **kw)
        assert [d["id"] for d in j.details] == [pid for pid, _, _ in cells]
        for d, (_, ab, ba) in zip(j.details, cells):
            assert (d["p_ab"], d["p_ba"]) == (pytest.approx(ab, abs=tol), pytest.approx(ba, abs=tol)), c
        assert j.p_a == pytest.approx(expected_p_a(cells), abs=tol)


PRINCIPLES = [C.PreferencePrinciple(f"rule{i}", f"Which response follows rule {i} better?") for i in range(3)]


def comparisons(n: int = 6, pad: int = 0) -> list[judges.Comparison]:
    """Conversations of three lengths (`pad`: how much longer), one to three principles, one comparison
    of equal answers."""
    out = [judges.Comparison(f"Human: question {i}" + " and more" * (i % 3 * pad), f"answer {i} here",
                             f"reply {i} there", PRINCIPLES[: 1 + i % 3]) for i in range(n)]
    out[2] = judges.Comparison(out[2].conversation, "Same answer.", "Same answer.", out[2].principles)
    return out


def test_compare_gives_each_comparison_its_own_verdicts():
    comps = comparisons()
    comps[4] = judges.Comparison(comps[4].conversation, "FAIL here", "fine", comps[4].principles)
    for both_orders in (True, False):
        assert_judgements(comps, judges.compare(TextJudge(), comps, both_orders), both_orders)
    # Chain of thought: each prompt is answered after its own reasoning, stored beside its own order.
    got = judges.compare(TextJudge(scale=0.1), comps, True, cot=True)
    assert_judgements(comps, got, True, cot=True, scale=0.1)
    for c, j in zip(comps, got):
        for pr, d in zip(c.principles, j.details):
            assert d["cot_ab"] == reason(c.conversation, pr.text, c.response_a, c.response_b)
            assert d["cot_ba"] == reason(c.conversation, pr.text, c.response_b, c.response_a)


# ---- a server that answers from its request ------------------------------------------------------

class Stub(ThreadingHTTPServer):
    """An OpenAI-compatible `/completions` on 127.0.0.1 whose answer to each request body is
    `answer(body)`. Each request first waits 0-20 ms, fixed by its prompt, so answers come back in
    another order than they were asked; every body is kept in `bodies`."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.answer, self.bodies, self.lock = None, [], threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class _StubHandler(BaseHTTPRequestHandler):
    server: Stub

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.bodies.append(body)
        time.sleep(0.01 * (1 + worth(body["prompt"])))
        out = json.dumps(self.server.answer(body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@contextlib.contextmanager
def stub_server():
    server = Stub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def stub():
    with stub_server() as server:
        yield server


@pytest.fixture(scope="module")
def chatml():
    """The tiny models' tokenizer and chat template, without a model."""
    return train_tokenizer()


def judge_answer(body: dict, scale: float = 2.0) -> dict:
    """The stub as a judge: top log-probs of `verdict` for one token; the answer text alone for prompts
    of a conversation that says [text only]; `reason` for a chain of thought."""
    text = body["prompt"]
    if body["max_tokens"] > 1:
        return {"choices": [{"text": reason(*read(text)[:4])}]}
    p = verdict(text, scale)
    if p is None:
        return {"choices": [{"text": "I cannot tell."}]}
    if "[text only]" in text:
        return {"choices": [{"text": "(A)" if p > 0.5 else "(B)", "logprobs": None}]}
    return {"choices": [{"text": "", "logprobs": {"top_logprobs": [{"A": math.log(p), "B": math.log(1 - p)}]}}]}


def test_openai_judge_answers_each_prompt_from_its_own_request(stub, chatml):
    comps = comparisons(8)
    comps[5] = judges.Comparison("Human: [text only] question 5", "answer 5", "reply 5", PRINCIPLES[:2])
    judge = OpenAIJudge(JudgeConfig(backend="openai", base_url=stub.url, concurrency=4, retries=0),
                        lambda m, p: data.render(chatml, m, p))
    stub.answer = judge_answer
    got = judges.compare(judge, comps, True)
    hard = got.pop(5)
    assert_judgements(comps[:5] + comps[6:], got, True)
    assert judge.hard_labels == 4  # comparison 5's prompts: an answer text, in their own cells
    assert [(d["p_ab"], d["p_ba"]) for d in hard.details] == [(float(ab > 0.5), float(ba > 0.5))
                                                              for _, ab, ba in expected_cells(comps[5], True)]
    stub.answer = lambda body: judge_answer(body, scale=0.1)
    assert_judgements(comps[:5], judges.compare(judge, comps[:5], True, cot=True), True, cot=True, scale=0.1)


# ---- the local judge's model, stood in for ------------------------------------------------------

class LetterModel:
    """Stands in for the model under the local judge: reads each row's tokens where the attention mask
    is 1, and puts `verdict` of their text on the letters' logits after the prefill."""

    def __init__(self, tok):
        self.tok = tok
        self.letters = [tok.encode(C.COMPARISON_PREFILL + x, add_special_tokens=False)[-1] for x in "AB"]

    def __call__(self, input_ids, attention_mask, **kwargs):
        logits = torch.full((len(input_ids), 1, len(self.tok)), -30.0)  # (B, 1, V)
        for row, ids, mask in zip(logits, input_ids, attention_mask):
            p = verdict(self.tok.decode(ids[mask.bool()]))
            if p is not None:
                row[0, self.letters] = torch.tensor([math.log(p), math.log(1 - p)])
        return SimpleNamespace(logits=logits)


def test_local_judge_scores_each_prompt_in_its_own_row(chatml):
    base = SimpleNamespace(tokenizer=chatml, device=torch.device("cpu"), model=LetterModel(chatml))
    # Batches of 4 straddle the runs of cut and whole prompts, so a flag moved inside a batch shows.
    judge = judges.LocalJudge(base, JudgeConfig(batch_size=4), GenerationSettings(max_prompt_tokens=180))
    comps = comparisons(7, pad=12)  # every third conversation is over 180 tokens: cut, so a failure in its slots
    got = judges.compare(judge, comps, True)
    cut = [i % 3 == 2 for i in range(7)]
    assert_judgements([c for c, x in zip(comps, cut) if not x], [j for j, x in zip(got, cut) if not x], True, tol=1e-6)
    assert [j.p_a is None for j in got] == cut
    assert judge.cut_prompts == sum(2 * len(c.principles) for c, x in zip(comps, cut) if x)


# ---- llama.cpp's KV cache, stood in for ----------------------------------------------------------

class FakeLlamaCpp:
    """The llama_cpp functions PrefixDecoder calls, over a KV cache of cells [position, token, sequence
    ids] as llama.cpp's unified cache keeps them. A token attends to the cells of its first sequence id
    up to its own position (llama.cpp's mask); the logits asked of it put `verdict` of that text on
    the letters. A sequence that does not hold exactly its prompt, or a row handed to another prompt,
    shows as another verdict."""

    def __init__(self, detokenize, letters: list[int], n_vocab: int):
        self.detokenize, self.letters, self.n_vocab = detokenize, letters, n_vocab
        self.cells: list[list] = []
        self.rows: dict[int, np.ndarray] = {}

    def llama_get_memory(self, ctx):
        return None

    def llama_batch_init(self, n_tokens: int, embd: int, n_seq_max: int):
        return SimpleNamespace(token=[0] * n_tokens, pos=[0] * n_tokens, n_seq_id=[0] * n_tokens, logits=[0] * n_tokens,
                               seq_id=[[0] * n_seq_max for _ in range(n_tokens)], n_tokens=0)

    def llama_batch_free(self, batch) -> None:
        pass

    def llama_memory_clear(self, mem, data: bool) -> None:
        self.cells = []

    def _span(self, cell, seq: int, p0: int, p1: int) -> bool:
        return (seq < 0 or seq in cell[2]) and cell[0] >= max(p0, 0) and (p1 < 0 or cell[0] < p1)

    def llama_memory_seq_rm(self, mem, seq: int, p0: int, p1: int) -> bool:
        for cell in self.cells:
            if self._span(cell, seq, p0, p1):
                cell[2] -= {seq} if seq >= 0 else cell[2]
        self.cells = [c for c in self.cells if c[2]]
        return True

    def llama_memory_seq_cp(self, mem, src: int, dst: int, p0: int, p1: int) -> None:
        for cell in self.cells:
            if self._span(cell, src, p0, p1):
                cell[2].add(dst)

    def llama_decode(self, ctx, b) -> int:
        self.cells += [[b.pos[i], b.token[i], set(b.seq_id[i][:b.n_seq_id[i]])] for i in range(b.n_tokens)]
        self.rows = {i: self._logits(b.seq_id[i][0], b.pos[i]) for i in range(b.n_tokens) if b.logits[i]}
        return 0

    def _logits(self, seq: int, pos: int) -> np.ndarray:
        seen = sorted((c[0], c[1]) for c in self.cells if seq in c[2] and c[0] <= pos)
        assert [p for p, _ in seen] == list(range(pos + 1)), f"sequence {seq} holds positions {[p for p, _ in seen]}"
        p = verdict(self.detokenize([t for _, t in seen]))
        row = np.full(self.n_vocab, -30.0, dtype=np.float32)
        if p is not None:
            row[self.letters] = [math.log(p), math.log(1 - p)]
        return row

    def llama_get_logits_ith(self, ctx, i: int):
        return self.rows[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def test_llamacpp_judge_gives_each_prompt_its_own_logits(sharp_llama, tmp_path, monkeypatch):
    from cai_lite.gguf_export import export_gguf
    from cai_lite.llamacpp_batch import PrefixDecoder

    gguf = export_gguf(sharp_llama, tmp_path / "sharp-f32.gguf", "f32")
    judge = judge_llamacpp.LlamaCppJudge(JudgeConfig(backend="llamacpp", gguf_path=str(gguf), n_ctx=512), None)
    try:
        llm = judge.llm
        letters = [llm.tokenize(f"({x}".encode(), add_bos=False, special=False)[-1] for x in "AB"]
        text = lambda tokens: llm.detokenize(tokens, special=True).decode("utf-8", "replace")  # noqa: E731
        fake = FakeLlamaCpp(text, letters, llm.n_vocab())
        judge._decoder.close()
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "llama_cpp", fake)  # PrefixDecoder reaches llama.cpp through the module
            judge._decoder = PrefixDecoder(None, llm.n_vocab(), llm.n_batch, judge_llamacpp.JUDGE_SEQS)
        judge.wave_prompts = 5  # several waves, and the common prefix carried from one to the next
        comps = comparisons(9, pad=3)
        comps[7] = judges.Comparison(comps[7].conversation + " and doors" * 300, "a", "b", PRINCIPLES[:1])  # > n_ctx
        for order in ([*range(9)], [*range(9)], random.Random(0).sample(range(9), 9)):
            got = judges.compare(judge, [comps[i] for i in order], True)
            assert got[order.index(7)].p_a is None  # too long: a failure in its own slot
            kept = [i for i in order if i != 7]
            assert_judgements([comps[i] for i in kept], [got[order.index(i)] for i in kept], True, tol=1e-6)
    finally:
        judge.close()
