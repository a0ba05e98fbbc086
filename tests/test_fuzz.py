"""Fuzzing the loaders with hypothesis: whatever a user's file or command line holds, the three
constitution formats, the prompt readers (plain, gzip, hh-rlhf) and the `key=value` parser either
accept it as usable or raise our error type (ConstitutionError, DataError, ConfigError), never a
traceback of another kind. Each test is bounded in examples so the file runs in well under a minute;
raise CAI_LITE_FUZZ_EXAMPLES for a longer hunt.

    python -m pytest -q tests/test_fuzz.py
    CAI_LITE_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cai_lite import constitution as C
from cai_lite import data
from cai_lite.config import Config
from cai_lite.recipe import load_config
from cai_lite.typed_yaml import ConfigError, all_keys

EXAMPLES = int(os.environ.get("CAI_LITE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# Text with the awkward cases in it: lone surrogates, control characters, non-BMP characters.
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
SCALAR = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | TEXT
JSONISH = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                       max_leaves=12)


def _entries(*keys: str):
    """Dicts that have the expected keys, with values of any type (the likeliest user mistake)."""
    return st.lists(st.fixed_dictionaries({k: JSONISH | TEXT for k in keys}), max_size=3)


OURS = st.fixed_dictionaries({}, optional={
    "name": JSONISH, "description": JSONISH, "cot_template": JSONISH,
    "critique_revision": _entries("id", "critique", "revision") | JSONISH,
    "preference": _entries("id", "text") | JSONISH,
    "few_shot": st.fixed_dictionaries({}, optional={
        "critique_revision": _entries("prompt", "response", "critique_request", "critique", "revision_request",
                                      "revision") | JSONISH,
        "preference": _entries("conversation", "chosen", "rejected") | JSONISH}) | JSONISH})
# Valid principles with the other fields fuzzed, so the checks after the principles are reached too.
WORD = st.text("abc xyz", min_size=1, max_size=6)
VALID = st.builds(lambda few, cot, desc: {
    "name": "n", "critique_revision": [{"id": "a", "critique": "c?", "revision": "r."}],
    "preference": [{"id": "p", "text": "Which?"}], "few_shot": few, "cot_template": cot, "description": desc},
    st.fixed_dictionaries({}, optional={
        "critique_revision": st.lists(st.fixed_dictionaries({k: WORD | JSONISH for k in (
            "prompt", "response", "critique_request", "critique", "revision_request", "revision")}), max_size=2),
        "preference": st.lists(st.fixed_dictionaries({k: WORD | JSONISH for k in ("conversation", "chosen", "rejected")}),
                               max_size=2)}) | JSONISH,
    WORD | JSONISH, WORD | JSONISH)
ANTHROPIC = st.dictionaries(TEXT, st.fixed_dictionaries({"prompt": JSONISH, "edit_request": JSONISH}) | JSONISH,
                            max_size=3)
SWARM = st.fixed_dictionaries({"constitutions": st.lists(st.fixed_dictionaries(
    {"critic": JSONISH | TEXT, "revision": JSONISH | TEXT}), max_size=3) | JSONISH})


def _usable(c: C.Constitution) -> None:
    """What an accepted constitution promises the stages: non-empty principles of real text."""
    assert c.critique_revision or c.preference
    texts = [t for p in [*c.critique_revision, *c.preference, *c.preference_demos] for t in vars(p).values()]
    for chat in c.critique_demos:
        assert [m["role"] for m in chat] == ["user", "assistant"] * (len(chat) // 2) and chat
        texts += [m["content"] for m in chat]
    for text in texts + [c.name, c.description, c.cot_template]:
        assert isinstance(text, str)
        text.encode("utf-8")  # no lone surrogates reach a tokenizer or a shard


def _write_constitution(folder: Path, suffix: str, value) -> Path:
    path = folder / f"c{suffix}"
    if suffix == ".yaml":
        path.write_text(yaml.safe_dump(value, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    else:
        path.write_text(json.dumps(value), encoding="utf-8")
    return path


@FUZZ
@given(value=VALID | OURS | JSONISH, suffix=st.sampled_from([".yaml", ".json"]))
def test_our_format_gives_a_constitution_or_our_error(value, suffix):
    with tempfile.TemporaryDirectory() as d:
        try:
            _usable(C.load(str(_write_constitution(Path(d), suffix, value))))
        except C.ConstitutionError:
            pass


@FUZZ
@given(value=ANTHROPIC | SWARM)
def test_anthropic_and_llm_swarm_formats_give_a_constitution_or_our_error(value):
    with tempfile.TemporaryDirectory() as d:
        try:
            _usable(C.load(str(_write_constitution(Path(d), ".json", value))))
        except C.ConstitutionError:
            pass


@FUZZ
@given(blob=st.binary(max_size=200), suffix=st.sampled_from([".yaml", ".json"]))
def test_constitution_files_of_any_bytes(blob, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"c{suffix}"
        path.write_bytes(blob)
        try:
            _usable(C.load(str(path)))
        except C.ConstitutionError:
            pass


ROW = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "text"]) | TEXT, JSONISH | TEXT, max_size=3)
LINE = ROW.map(lambda r: json.dumps(r).encode("utf-8", "surrogatepass")) | st.binary(max_size=40) | \
    st.just(b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello"}') | st.just(b'{"prompt": "a \\udc80 b"}')


@FUZZ
@given(lines=st.lists(LINE, max_size=6), packed=st.sampled_from(["plain", "gzip", "cut-gzip"]),
       fmt=st.sampled_from(["auto", "jsonl", "hh-rlhf"]))
def test_prompt_files_give_prompts_or_our_error(lines, packed, fmt):
    blob = b"\n".join(lines) + b"\n"
    if packed != "plain":
        blob = gzip.compress(blob)
        blob = blob[: len(blob) // 2] if packed == "cut-gzip" else blob
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("p.jsonl.gz" if packed != "plain" else "p.jsonl")
        path.write_bytes(blob)
        try:
            prompts = data.read_prompts(str(path), fmt)
        except data.DataError:
            return
        assert prompts and all(isinstance(p.text, str) and p.text.strip() for p in prompts)
        for p in prompts:
            p.text.encode("utf-8")


KEYS = all_keys(Config)
VALUE = TEXT | st.sampled_from(["[", "]", "[a,b]", "{x: 1}", "-1", "1e9", "nan", "inf", "true", "null", "''", "~",
                                "[critique_revise,sft]", "0x10", "1_000", ": :", "a=b"])


@FUZZ
@given(args=st.lists((st.sampled_from(KEYS) | TEXT).flatmap(lambda k: VALUE.map(lambda v: f"{k}={v}")) | TEXT,
                     max_size=3))
def test_command_line_gives_a_config_or_our_error(args):
    try:
        cfg = load_config(["recipe=tiny_cpu", *args])
    except ConfigError as e:
        assert e.errors and all(isinstance(m, str) and m for m in e.errors)
        return
    assert isinstance(cfg, Config)
