"""Judges: soft labels, position-bias removal, CoT clamping, voting, and the three backends on the
same tiny model (local transformers, llama.cpp in-process, a real llama.cpp OpenAI-compatible server).

    python -m pytest tests/test_judges.py -q
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from cai_lite import constitution as C
from cai_lite import data, judge_llamacpp, judges, models, pipeline, voting
from cai_lite.config import JudgeConfig
from cai_lite.gguf_export import export_gguf
from cai_lite.judge_http import OpenAIJudge
from cai_lite.typed_yaml import ConfigError

from conftest import tiny_config

PRINCIPLE = C.PreferencePrinciple("p", "Which response is more helpful and harmless?")


def _slots(prompt: judges.ChoicePrompt) -> tuple[str, str]:
    text = prompt.messages[-1]["content"]
    a = text.split("\n(A) ", 1)[1].split("\n(B) ", 1)[0]
    b = text.split("\n(B) ", 1)[1].split("\n\nAnswer with", 1)[0]
    return a, b


class BiasedJudge:
    """Prefers slot (A) by a wide margin (logit +2), and otherwise likes responses with more 'good'."""

    name, hard_labels = "biased", 0

    def option_probs(self, prompts, letters):
        out = []
        for p in prompts:
            a, b = _slots(p)
            pa = 1 / (1 + math.exp(-(2.0 + a.count("good") - b.count("good"))))
            out.append([pa, 1 - pa])
        return out

    def generate(self, prompts, max_new_tokens):
        return ["(A) is clearly better, says my reasoning."] * len(prompts)

    def close(self):
        pass


def _comp(a: str, b: str, k: int = 1) -> judges.Comparison:
    return judges.Comparison("Human: help?", a, b, [PRINCIPLE] * k)


def test_both_orders_remove_a_planted_position_bias():
    j = BiasedJudge()
    equal = judges.compare(j, [_comp("fine answer", "other answer")], both_orders=True)[0]
    assert equal.p_a == pytest.approx(0.5, abs=1e-12)
    one_order = judges.compare(j, [_comp("fine answer", "other answer")], both_orders=False)[0]
    assert one_order.p_a > 0.85  # what the bias alone does
    better = judges.compare(j, [_comp("good good", "meh")], both_orders=True)[0].p_a
    worse = judges.compare(j, [_comp("meh", "good good")], both_orders=True)[0].p_a
    assert better > 0.5 and better == pytest.approx(1 - worse)
    d = equal.details[0]
    assert voting.position_consistent(d["p_ab"], d["p_ba"]) is False  # it picked (A) both times


def test_cot_probabilities_are_clamped():
    j = BiasedJudge()
    out = judges.compare(j, [_comp("good good good good good", "bad")], both_orders=True, cot=True)[0]
    d = out.details[0]
    assert d["p_ab"] == 0.6 and d["p_ba"] == 0.4 and 0.4 <= out.p_a <= 0.6
    assert d["cot_ab"].startswith("(A) is clearly better")
    assert voting.clamp(0.99) == 0.6 and voting.clamp(0.01) == 0.4 and voting.clamp(0.5) == 0.5


def test_voting_on_hand_made_inputs():
    assert voting.vote([0.9, 0.2, 0.7], "mean") == pytest.approx(0.6)
    assert voting.vote([0.9, 0.2, 0.7], "majority") == 1.0
    assert voting.vote([0.9, 0.2], "majority") == 0.5
    assert voting.vote([0.1, 0.4, 0.9], "majority") == 0.0
    assert voting.vote([None, 0.8], "mean") == 0.8 and voting.vote([None, None], "mean") is None
    assert voting.agreement([[0.9, 0.1, 0.8], [0.7, 0.3, 0.2]]) == pytest.approx(2 / 3)
    assert voting.average_orders(0.8, 0.8) == pytest.approx(0.5) and voting.average_orders(None, 0.3) == 0.7


def test_failures_are_kept_as_none():
    class Failing(BiasedJudge):
        def option_probs(self, prompts, letters):
            return [None for _ in prompts]

    out = judges.compare(Failing(), [_comp("a", "b")], both_orders=True)[0]
    assert out.p_a is None and out.details[0]["p_ab"] is None


@pytest.fixture(scope="module")
def float_base(sharp_llama, tmp_path_factory):
    """The sharp tiny model unquantized, as the GGUF holds it."""
    cfg = tiny_config(tmp_path_factory.mktemp("fb"), sharp_llama, "base.quantization=none")
    return models.load_base(cfg)


PAIRS = [("Sure, here is how.", "No."), ("I can't help with that, but here is a safer idea.", "Do it at night."),
         ("Paris.", "The capital of France is Paris, a city on the Seine."), ("Yes.", "Maybe, it depends on the lock."),
         ("Call a friend you trust.", "Ignore it."), ("Here is a poem about the sea.", "The sea is wide and blue.")]


def _prompts():
    return [judges.ChoicePrompt(C.comparison_messages("Human: question " + str(i), PRINCIPLE.text, a, b),
                                C.COMPARISON_PREFILL) for i, (a, b) in enumerate(PAIRS)]


def test_local_soft_label_is_softmax_of_letter_logprobs(float_base):
    jc = JudgeConfig(adapter="none", batch_size=8)
    probs = judges.LocalJudge(float_base, jc, float_base.cfg.generation).option_probs(_prompts(), "AB")
    tok = float_base.tokenizer
    a_id, b_id = tok.encode("A", add_special_tokens=False)[0], tok.encode("B", add_special_tokens=False)[0]
    for p, got in zip(_prompts(), probs):
        ids = torch.tensor([tok(data.render(tok, p.messages, p.prefill), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = float_base.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)  # one unpadded row
        by_hand = torch.softmax(torch.stack([logp[a_id], logp[b_id]]), 0)
        assert got == pytest.approx(by_hand.tolist(), abs=1e-5)
    assert any(abs(p[0] - 0.5) > 0.05 for p in probs), "the model has no preferences; the test would be vacuous"


@pytest.fixture(scope="module")
def sharp_gguf(sharp_llama, tmp_path_factory):
    return export_gguf(sharp_llama, tmp_path_factory.mktemp("gguf") / "sharp-f32.gguf", "f32")


def _llamacpp(path, base):
    return judge_llamacpp.LlamaCppJudge(JudgeConfig(backend="llamacpp", gguf_path=str(path), n_ctx=2048),
                                lambda m, p: data.render(base.tokenizer, m, p))


# Tolerances. f32 GGUF vs transformers in float32 agree to ~1e-4 in logits, so letter probabilities
# agree to well under 1e-3. NF4 moves every weight of this deliberately sharp model (init std 0.2,
# logit std ~1.7) by its quantization error; measured |P(A) difference| on these prompts:
# 0.003, 0.184, 0.002, ... So the NF4 check allows a mean of 0.1 and a worst case of 0.3.
TOL_FLOAT, TOL_NF4_MEAN, TOL_NF4_MAX = 1e-3, 0.1, 0.3


def test_llamacpp_and_local_judges_agree(float_base, sharp_gguf, sharp_llama, tmp_path):
    local = judges.LocalJudge(float_base, JudgeConfig(adapter="none"), float_base.cfg.generation).option_probs(_prompts(), "AB")
    cpp = _llamacpp(sharp_gguf, float_base)
    try:
        assert cpp._format is not None  # the GGUF carries the chat template, and renders with it
        got = cpp.option_probs(_prompts(), "AB")
        reused = cpp.evaluated_tokens
        cpp.reuse_prefix = False
        again = cpp.option_probs(_prompts(), "AB")
        assert cpp.evaluated_tokens - reused > reused  # the second pass, without reuse, evaluated more
    finally:
        cpp.close()
    for l, c, a in zip(local, got, again):
        assert c == pytest.approx(l, abs=TOL_FLOAT)
        assert a == pytest.approx(c, abs=5e-5)  # prefix sharing changes nothing but speed (rounding: 1.4e-5)
    nf4 = models.load_base(tiny_config(tmp_path, sharp_llama))
    quantized = judges.LocalJudge(nf4, JudgeConfig(adapter="none"), nf4.cfg.generation).option_probs(_prompts(), "AB")
    diffs = [abs(q[0] - c[0]) for q, c in zip(quantized, got)]
    assert sum(diffs) / len(diffs) <= TOL_NF4_MEAN and max(diffs) <= TOL_NF4_MAX, diffs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(sharp_gguf):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(sharp_gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--logits_all", "true"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/models", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("llama_cpp.server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def test_openai_judge_against_a_real_llama_cpp_server(server, float_base, sharp_gguf):
    # A random model rarely ranks the letters in its top 20, so ask for the whole 512-token vocabulary.
    jc = JudgeConfig(backend="openai", base_url=server, model="sharp", concurrency=2, timeout_s=30, top_logprobs=600)
    http = OpenAIJudge(jc, lambda m, p: data.render(float_base.tokenizer, m, p))
    got = http.option_probs(_prompts(), "AB")
    cpp = _llamacpp(sharp_gguf, float_base)
    try:
        want = cpp.option_probs(_prompts(), "AB")
    finally:
        cpp.close()
    assert http.hard_labels == 0  # the server gave log-probs for both letters
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=TOL_FLOAT)
    assert all(isinstance(t, str) for t in http.generate(_prompts()[:1], 4))


def test_openai_answers_without_logprobs(monkeypatch):
    http = OpenAIJudge(JudgeConfig(backend="openai"), lambda m, p: "x")
    monkeypatch.setattr(http, "_post", lambda body: {"choices": [{"text": " (B) because", "logprobs": None}]})
    assert http._one_choice("x", "AB") == [0.0, 1.0] and http.hard_labels == 1
    monkeypatch.setattr(http, "_post", lambda body: {"choices": [{"text": "I would rather not say.", "logprobs": None}]})
    assert http._one_choice("x", "AB") is None


def _no_model_load(monkeypatch):
    def boom(cfg):
        raise AssertionError("a model was loaded before the config error")
    monkeypatch.setattr(models, "load_base", boom)


def test_bad_judge_settings_fail_before_any_model_loads(tmp_path, tiny_llama, monkeypatch):
    _no_model_load(monkeypatch)
    stages = "stages=[critique_revise,sft,label_preferences]"
    cases = [
        (["judge=openai", "judge.base_url=http://127.0.0.1:9/v1"], "judge.base_url: cannot reach http://127.0.0.1:9/v1"),
        (["judge=llamacpp", "judge.gguf_path=/nope/model.gguf"], "judge.gguf_path: '/nope/model.gguf'"),
        (["judge=openai", "judge.api_key_env=CAI_LITE_TEST_MISSING_KEY"], "CAI_LITE_TEST_MISSING_KEY is not set"),
        (["judge=openai", "judge.base_url=127.0.0.1:8000/v1"], "judge.base_url: '127.0.0.1:8000/v1' is not an http://"),
        (["judge=llamacpp", f"judge.gguf_path={tiny_llama / 'config.json'}"], "config.json: not a GGUF file"),
    ]
    for overrides, needle in cases:
        with pytest.raises(ConfigError) as e:
            pipeline.run(tiny_config(tmp_path / "bad", tiny_llama, stages, *overrides))
        assert any(needle in m for m in e.value.errors), e.value.errors


@pytest.mark.parametrize("backend", ["local", "llamacpp"])
def test_label_preferences_stage(backend, tmp_path, sharp_llama, sharp_gguf):
    cfg = tiny_config(tmp_path / backend, sharp_llama, "stages=[critique_revise,sft,label_preferences]",
                      f"judge={backend}", f"judge.gguf_path={sharp_gguf}", "critique_revise.rounds=1", "data.limit=4",
                      "critique_revise.helpful_prompts=", "sft.max_steps=2", "label_preferences.num_responses=3",
                      "label_preferences.num_principles=2", "label_preferences.shard_size=2")
    out = pipeline.run(cfg)["label_preferences"]
    rows = data.read_shards(cfg.path / "label_preferences")
    assert len(rows) == 4 * 3  # 3 responses per prompt -> 3 pairs
    for r in rows:
        assert set(r) >= {"prompt", "response_a", "response_b", "p_a", "confidence", "chosen", "rejected", "judges"}
        assert 0 <= r["p_a"] <= 1 and r["confidence"] == pytest.approx(abs(r["p_a"] - 0.5))
        (name,) = r["judges"]
        cells = r["judges"][name]["principles"]
        assert len(cells) == 2 and all(c["p_ab"] is not None and c["p_ba"] is not None for c in cells)
        assert r["prompt"] == [{"role": "user", "content": r["prompt"][0]["content"]}]
        assert [m["role"] for m in r["chosen"] + r["rejected"]] == ["assistant", "assistant"]
        better = r["response_a"] if r["p_a"] >= 0.5 else r["response_b"]
        assert r["chosen"][0]["content"] == better and r["rejected"][0]["content"] != better or \
            r["response_a"] == r["response_b"]
    assert out["labels"] == 12 and out["failures"] == 0
    stats = next(iter(out["judges"].values()))
    assert stats["preferences_per_second"] > 0 and stats["position_consistency"] is not None
