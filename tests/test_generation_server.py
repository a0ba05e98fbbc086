"""Generation through an OpenAI-compatible server (`generation.backend=openai`) against a real
`python -m llama_cpp.server` on 127.0.0.1 serving the tiny model's GGUF: critique_revise writes rows
of the local path's schema, records its backend, keeps the local config hash and resumes a killed
shard to the same text; partial shards resume only on the backend that began them; an unreachable
server or an unnamed adapter role is one clear error before the base loads; a retried request fills
its own row only (tests/test_judge_load.py's faulting proxy).
Skips when llama-cpp-python's `server` extra is not installed.

    python -m pytest tests/test_generation_server.py -q
"""

from __future__ import annotations

import json
import logging
import random
import threading

import pytest
from conftest import tiny_config
from test_judge_load import Proxy, _free_port, llama_server
from transformers import AutoTokenizer

from cai_lite import data, generation, generation_http, models, pipeline
from cai_lite.stages import evaluate
from cai_lite.config import GenerationSettings
from cai_lite.recipe import load_config
from cai_lite.typed_yaml import ConfigError

SMALL = ["stages=[critique_revise]", "critique_revise.rounds=1", "data.limit=4", "critique_revise.helpful_limit=2",
         "critique_revise.shard_size=2", "generation.max_new_tokens=12"]  # the last shard: helpful prompts only


@pytest.fixture(scope="module")
def server(sharp_llama, tmp_path_factory):
    """llama_cpp.server on an f32 GGUF of the sharp tiny model, as tests/test_judge_load.py starts it."""
    yield from llama_server(sharp_llama, tmp_path_factory)


def _shape(x):
    """The keys and value types of a row, all the way down."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shape(v) for v in x]
    return type(x).__name__


def _rows(cfg) -> list[dict]:
    out = cfg.path / "critique_revise"
    return sorted(data.read_shards(out) + data.read_failed(out), key=lambda r: r["id"])


def test_critique_revise_through_a_llama_cpp_server(server, sharp_llama, tmp_path):
    local = tiny_config(tmp_path / "local", sharp_llama, *SMALL)
    remote = tiny_config(tmp_path / "remote", sharp_llama, *SMALL, "generation.backend=openai",
                         f"generation.base_url={server}", "generation.concurrency=2")
    want = pipeline.run(local)["critique_revise"]
    # On the module's own logger: logs.setup (run by the CLI in other tests) stops cai_lite records reaching caplog.
    warned: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = warned.append
    logging.getLogger("cai_lite.generation_http").addHandler(handler)
    try:
        got = pipeline.run(remote)["critique_revise"]
    finally:
        logging.getLogger("cai_lite.generation_http").removeHandler(handler)
    assert not warned  # the server counted every prompt's tokens as base.model's tokenizer does
    rows_local, rows_remote = _rows(local), _rows(remote)
    assert [r["id"] for r in rows_remote] == [r["id"] for r in rows_local] and len(rows_local) == 6
    for a, b in zip(rows_local, rows_remote):
        assert _shape(a) == _shape(b)
    assert any(r["init_response"] for r in rows_remote)  # the server's text, not empty rows of the right shape
    assert any(r["init_response"] != a["init_response"] for r, a in zip(rows_remote, rows_local))
    assert want["generation"] == {"backend": "local"}
    assert got["generation"] == {"backend": "openai", "base_url": server, "model": "base", "adapters": {}}
    assert got["config_hash"] == want["config_hash"]  # the backend and server keys are not hashed
    assert got["rows"] == want["rows"] == 6

    # A run killed after its first shard: the rerun sends the same seeds and gets the same text.
    out = remote.path / "critique_revise"
    before = _rows(remote)
    (out / "stage.json").unlink()
    for p in [*out.glob("*-00001.jsonl"), *out.glob("*-00002.jsonl")]:
        p.unlink()
    again = pipeline.run(remote)["critique_revise"]
    assert again["resumed_shards"] == 1
    assert _rows(remote) == before


def test_partial_shards_resume_only_on_the_backend_that_began_them(tmp_path, fake_stages):
    seen, base = fake_stages
    local = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "stages=[critique_revise]", *base])
    remote = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "stages=[critique_revise]", *base,
                          "generation.backend=openai"])
    stage_json = local.path / "critique_revise" / "stage.json"
    pipeline.run(local)
    card = stage_json.with_name("README.md")  # written with stage.json, at the end: a killed stage has neither
    stage_json.unlink(), card.unlink()  # killed after its first shard
    pipeline.run(local)
    assert seen["critique_revise"] == [".resume_key", "part-00000.jsonl"]  # resumed
    stage_json.unlink(), card.unlink()
    pipeline.run(remote)
    assert seen["critique_revise"] == [".resume_key"]  # begun afresh: no shards of two engines in one output
    # A finished stage is not redone for another backend: the backend is not in the config hash.
    seen.pop("critique_revise")
    assert pipeline.run(local)["critique_revise"]["made"] == "critique_revise" and "critique_revise" not in seen


def _no_model_load(monkeypatch):
    def boom(cfg):
        raise AssertionError("a model was loaded before the config error")
    monkeypatch.setattr(models, "load_base", boom)


def test_server_problems_fail_before_the_base_loads(tmp_path, tiny_llama, monkeypatch):
    _no_model_load(monkeypatch)
    down = ["generation.backend=openai", f"generation.base_url=http://127.0.0.1:{_free_port()}/v1"]
    stages = "stages=[critique_revise,sft,label_preferences]"
    with pytest.raises(ConfigError) as e:
        pipeline.run(tiny_config(tmp_path / "a", tiny_llama, stages, *down, "generation.adapters=[sft=cai-sft]"))
    mine = [m for m in e.value.errors if m.startswith("generation.")]
    assert len(mine) == 1 and mine[0].startswith(f"generation.base_url: cannot reach {down[1].split('=')[1]}/models")
    # label_preferences samples with `sft`: a server run must name it; a malformed entry is named too.
    for adapters, needle in (("[]", "generation.adapters: no served model name for sft"),
                             ("[sft]", "generation.adapters: 'sft' is not role=name"),
                             ("[sfty=x]", "generation.adapters: 'sfty=x' is not role=name")):
        with pytest.raises(ConfigError) as e:
            pipeline.run(tiny_config(tmp_path / "b", tiny_llama, stages, *down, f"generation.adapters={adapters}"))
        assert any(m.startswith(needle) for m in e.value.errors), e.value.errors
    # The local backend never reaches for a server.
    assert generation_http.check(GenerationSettings(base_url="http://127.0.0.1:9/v1"), [None, "sft"]) == []


@pytest.fixture(scope="module")
def proxy(server):
    p = Proxy(server)
    threading.Thread(target=p.serve_forever, daemon=True).start()
    yield p
    p.shutdown()
    p.server_close()


def test_retries_fill_their_own_rows(proxy, sharp_llama):
    tok = AutoTokenizer.from_pretrained(sharp_llama)
    prompts = [data.render(tok, [{"role": "user", "content": f"Question number {i}?"}]) for i in range(24)]
    texts, cut, counts = generation_http.prompt_texts(tok, prompts, 512)
    assert not any(cut)

    def run(concurrency: int, retries: int = 2):
        g = GenerationSettings(backend="openai", base_url=proxy.url, concurrency=concurrency, retries=retries,
                               timeout_s=60, max_new_tokens=8, temperature=1.0)
        return generation_http.complete(g, texts, counts, None, 8, 1.0, seed=1234)

    proxy.reset()
    want = run(1)
    assert proxy.max_in_flight == 1 and len(want[0]) == 24 and any(want[0])
    proxy.reset()
    faults = ("500", "429", "drop", "truncate", "garbage")
    proxy.faults = {t: faults[k % len(faults)] for k, t in enumerate(texts[1::3])}
    state = random.getstate()
    got = run(4)
    assert random.getstate() == state  # backoff jitter leaves the generator the stages seed per shard alone
    assert got == want  # in order, none missing, each retried prompt's answer in its own row
    assert {t: n for t, n in proxy.attempts.items() if n != 1} == {t: 2 for t in proxy.faults}
    assert sorted(proxy.attempts) == sorted(texts)
    assert 2 <= proxy.max_in_flight <= 4
    # With no retries left, a fault is one error naming the key, not an empty row.
    proxy.reset()
    proxy.faults = {texts[5]: "500"}
    with pytest.raises(generation_http.GenerationServerError, match="generation.base_url: .* HTTP Error 500"):
        run(4, retries=0)
    proxy.faults = {}


def test_prompt_texts_cut_from_the_left_as_the_local_path(nf4_base):
    tok = nf4_base.tokenizer
    prompt = data.render(tok, [{"role": "user", "content": "one two three four five six seven eight nine ten"}])
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    texts, cut, counts = generation_http.prompt_texts(tok, [prompt, prompt], len(ids) - 3)
    assert cut == [True, True] and texts[0] == tok.decode(ids[3:]) and counts[0] == len(ids) - 3
    texts, cut, counts = generation_http.prompt_texts(tok, [prompt], len(ids))
    assert cut == [False] and texts == [prompt] and counts == [len(ids)]
    assert json.dumps(generation_http.describe(GenerationSettings(api_key_env="SECRET_KEY"))) == '{"backend": "local"}'
    # A shard of helpful prompts only asks for no critiques: no request, no error.
    down = GenerationSettings(backend="openai", base_url="http://127.0.0.1:9/v1", retries=0)
    assert generation.sample(nf4_base, [], None, down) == generation.Generated([], [], [])


def test_evaluate_asks_each_model_under_its_served_name(nf4_base, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "run", "unused", "generation.backend=openai", "generation.model=cai-base",
                      "generation.adapters=[sft=cai-sft, ppo=cai-ppo]")
    sent = []

    def post(url, body, headers, timeout_s, retries):
        sent.append((body["model"], body["seed"]))
        return {"choices": [{"text": f" {body['model']} ", "finish_reason": "stop"}]}

    monkeypatch.setattr(generation_http.judge_http, "post", post)
    prompts = [data.Prompt(f"p{i}", f"question {i}?") for i in range(3)]
    got = evaluate._responses(cfg, nf4_base, {"base": None, "sft": "sft", "ppo": "ppo"}, prompts, prompts[:1])
    assert got == {m: {"red_team": [name] * 3, "helpful": [name]}
                   for m, name in (("base", "cai-base"), ("sft", "cai-sft"), ("ppo", "cai-ppo"))}
    assert len(sent) == 12 and len(set(sent)) == 12  # each request its own seed
