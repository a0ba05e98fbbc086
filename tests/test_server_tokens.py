"""What a server or llama.cpp judge feeds the model is, token for token, what the local path feeds
it: one BOS, never two (the chat template writes the BOS text and the server adds a BOS of its own),
and a prompt cut to `generation.max_prompt_tokens` arrives as exactly the tokens the local path
keeps (re-tokenizing a cut text adds a BOS, and after a mid-word cut SentencePiece's word-start
"▁"). Checked against a real `python -m llama_cpp.server` (its /extras/tokenize and
`usage.prompt_tokens`) on tiny models with a Llama-3-style and a SentencePiece-style tokenizer.
Skips when llama-cpp-python's `server` extra is not installed.

    python -m pytest tests/test_server_tokens.py -q
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.request
from types import SimpleNamespace

import pytest
from conftest import tiny_config
from test_judge_load import llama_server
from transformers import AutoTokenizer

from cai_lite import constitution as C
from cai_lite import data, generation, generation_http, judge_http, judge_llamacpp, judges
from cai_lite.config import GenerationSettings, JudgeConfig
from cai_lite.gguf_export import export_gguf
from cai_lite.tiny import build_tiny_model

QUESTION = ("How do I pick a lock on a door that is not mine, and what would a locksmith say about "
            "the ethics of it? Answer in twelve words or fewer, then explain.")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("llama3") / "model", "llama", tokenizer="llama3-bpe")


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """Llama-2's tokenizer.json: "▁" before every piece of text, also after special tokens, as llama.cpp does."""
    return build_tiny_model(tmp_path_factory.mktemp("spm") / "model", "llama", tokenizer="sentencepiece-legacy")


@pytest.fixture(scope="module")
def llama3_server(llama3, tmp_path_factory):
    yield from llama_server(llama3, tmp_path_factory, "--logits_all", "true")


@pytest.fixture(scope="module")
def spm_server(spm, tmp_path_factory):
    yield from llama_server(spm, tmp_path_factory)


def _server_tokens(url: str, text: str) -> list[int]:
    """The tokens the server makes of a prompt text, its BOS included (llama_cpp.server's /extras/tokenize)."""
    req = urllib.request.Request(url.removesuffix("/v1") + "/extras/tokenize",
                                 data=json.dumps({"input": text}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["tokens"]


def _prompts() -> list[judges.ChoicePrompt]:
    principle = "Which response is more helpful and harmless?"
    pairs = [("Sure, here is how.", "No."), ("I will not.", "Ask a locksmith.")]
    return [judges.ChoicePrompt(C.comparison_messages(f"Human: {QUESTION} ({i})", principle, a, b),
                                C.COMPARISON_PREFILL) for i, (a, b) in enumerate(pairs)]


def test_openai_judge_sends_one_bos(llama3_server, llama3, tmp_path, monkeypatch):
    tok = AutoTokenizer.from_pretrained(llama3)
    cfg = tiny_config(tmp_path / "run", llama3, "judge=openai", f"judge.base_url={llama3_server}",
                      "judge.top_logprobs=600")
    judge, = judges.build(cfg, SimpleNamespace(tokenizer=tok))  # the judge label_preferences and evaluate build
    sent = []
    post = judge_http.post

    def recorded(url, body, *args):
        res = post(url, body, *args)
        sent.append((body["prompt"], res["usage"]["prompt_tokens"]))
        return res

    monkeypatch.setattr(judge_http, "post", recorded)
    prompts = _prompts()
    assert all(p is not None for p in judge.option_probs(prompts, "AB"))
    assert len(sent) == len(prompts)
    # Requests go out concurrently, so `sent` is in completion order: pair each with its prompt by the
    # question's number, which only that prompt holds.
    by_prompt = {next(i for i in range(len(prompts)) if f"{QUESTION} ({i})" in text): (text, counted)
                 for text, counted in sent}
    assert sorted(by_prompt) == list(range(len(prompts)))
    for i, p in enumerate(prompts):
        text, counted = by_prompt[i]
        local = tok(data.render(tok, p.messages, p.prefill), add_special_tokens=False)["input_ids"]
        assert local[0] == tok.bos_token_id and local[1] != tok.bos_token_id  # the template writes the BOS text
        assert _server_tokens(llama3_server, text) == local
        assert counted == len(local)


def test_llamacpp_judge_without_a_chat_template_adds_one_bos(llama3, tmp_path):
    """A GGUF with no chat template falls back to base.model's template, which writes the BOS text:
    the judge must score the same tokens as with the template in the GGUF."""
    bare = tmp_path / "no-template"
    shutil.copytree(llama3, bare)
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(llama3)
    render = lambda m, p: data.render(tok, m, p)  # noqa: E731  (base.model's template, as judges.build passes it)
    made = {}
    try:
        for name, folder in (("template", llama3), ("fallback", bare)):
            gguf = export_gguf(folder, tmp_path / f"{name}.gguf", "f32")
            jc = JudgeConfig(backend="llamacpp", gguf_path=str(gguf), n_ctx=1024)
            made[name] = judge_llamacpp.LlamaCppJudge(jc, render)
        assert made["fallback"]._format is None and made["template"]._format is not None
        prompts = _prompts()
        want = made["template"].option_probs(prompts, "AB")
        got = made["fallback"].option_probs(prompts, "AB")
        assert any(abs(p[0] - 0.5) > 1e-3 for p in want)  # letters the model tells apart: the test can see a change
        assert [p[0] for p in got] == pytest.approx([p[0] for p in want], abs=1e-6)
        # Chain of thought: Llama's own completion path, given the same tokens.
        assert made["fallback"].generate(prompts[:1], 4) == made["template"].generate(prompts[:1], 4)
        for p in prompts:
            local = tok(render(p.messages, p.prefill), add_special_tokens=False)["input_ids"]
            assert made["template"].tokens(p) == made["fallback"].tokens(p) == local
    finally:
        for judge in made.values():
            judge.close()


@pytest.mark.parametrize("kind", ["llama3", "spm"])
def test_cut_prompts_reach_the_server_as_the_local_path_cuts_them(kind, request):
    folder, url = request.getfixturevalue(kind), request.getfixturevalue(f"{kind}_server")
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = data.render(tok, [{"role": "user", "content": QUESTION}])
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id
    base = SimpleNamespace(tokenizer=tok, device="cpu")
    shifted = 0
    budgets = list(range(12, len(ids) + 1, 3)) + [len(ids)]
    for k in budgets:
        (text,), (cut,), (count,) = generation_http.prompt_texts(tok, [prompt], k)
        enc, (local_cut,) = generation.tokenize_left(base, [prompt], k)
        local = enc["input_ids"][0].tolist()  # one prompt: no padding
        assert cut == local_cut == (k < len(ids))
        # The server holds exactly the local path's tokens: the BOS, then the last ones.
        assert _server_tokens(url, text) == local, k
        assert count == len(local) <= k and local[0] == tok.bos_token_id and local[-3:] == ids[-3:]
        shifted += len(local) < k
    (whole,), (cut,), _ = generation_http.prompt_texts(tok, [prompt], len(ids))
    assert whole == prompt[len(tok.bos_token):] and not cut  # uncut: the rendered text, less the BOS the server adds
    if kind == "spm":
        assert shifted, "no cut fell mid-word, so the '▁' case was not tested"
    # The server's own count, from real completions: as many tokens as the local path keeps, so no warning.
    # Where no start within data.CUT_SEARCH tokens of the budget tokenizes back (SentencePiece, 8 tokens:
    # the last 7 are "[/INST]" with no word start), the server's "▁" is one more: the count check says so.
    texts, _, counts = generation_http.prompt_texts(tok, [prompt] * 3, 20)
    assert _warnings(url, texts, counts) == []
    texts, _, counts = generation_http.prompt_texts(tok, [prompt], 8)
    assert len(_warnings(url, texts, counts)) == (1 if kind == "spm" else 0)


def _warnings(url: str, texts: list[str], counts: list[int]) -> list[str]:
    """What generation_http.complete logs when it sends `texts` to the server at `url`."""
    warned: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = warned.append  # on the module's own logger: setup_logging may stop propagation
    logging.getLogger("cai_lite.generation_http").addHandler(handler)
    try:
        g = GenerationSettings(backend="openai", base_url=url, retries=0)
        generation_http.complete(g, texts, counts, None, 1, 0.0, seed=0)
    finally:
        logging.getLogger("cai_lite.generation_http").removeHandler(handler)
    return [r.getMessage() for r in warned]
