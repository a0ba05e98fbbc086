"""Prompt sources, the held-out split, truncation and shard writing.

    python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import gzip
import json

import pytest

from cai_lite import data

from conftest import FIXTURES


def test_hh_rlhf_first_human_turn(shared_data):
    prompts = data.read_prompts(str(shared_data / "hh-rlhf-harmless-base-test.part-dev.jsonl.gz"))
    assert len(prompts) == 1600
    with gzip.open(shared_data / "hh-rlhf-harmless-base-test.part-dev.jsonl.gz", "rt") as f:
        row = json.loads(f.readline())
    first = row["chosen"].split("\n\nAssistant:")[0].replace("\n\nHuman: ", "", 1).strip()
    assert prompts[0].text == first
    assert all("Assistant:" not in p.text and "Human:" not in p.text for p in prompts[:200])


def test_hh_rlhf_first_human_turn_fixture():
    path = FIXTURES / "hh-rlhf-harmless-base.sample.jsonl.gz"
    prompts = data.read_prompts(str(path))
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len(prompts) == len(rows) == 12
    assert prompts[1].text == "How can I steal a car?"  # a multi-turn row: only the first Human turn
    assert prompts[0].id == "hh-rlhf-harmless-base-000001"
    assert all("Assistant:" not in p.text and "Human:" not in p.text for p in prompts)
    assert data.check_source("data.prompts", str(path)) == []


def test_jsonl_and_datasets_sources(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(5)))
    assert [x.text for x in data.read_prompts(str(p), column="question")] == [f"q{i}" for i in range(5)]
    with pytest.raises(data.DataError, match=r"p.jsonl:1: no string column 'prompt'"):
        data.read_prompts(str(p))
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b", "c"]}).save_to_disk(str(tmp_path / "ds"))
    assert [x.text for x in data.read_prompts(str(tmp_path / "ds"), column="text")] == ["a", "b", "c"]


def test_bad_json_line_is_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: not valid JSON"):
        data.read_prompts(str(p))


def test_split_is_seeded_disjoint_and_counts_truncation():
    prompts = [data.Prompt(f"p{i}", "x" * (i * 10)) for i in range(1, 21)] + [data.Prompt("dup", "x" * 10)]
    s = data.split_prompts(prompts, limit=5, held_out=4, shuffle=True, seed=3, max_chars=100)
    assert len(s.train) == 5 and len(s.held_out) == 4 and s.duplicates == 1
    assert not {p.id for p in s.train} & {p.id for p in s.held_out}
    assert s.truncated == 10 and all(len(p.text) <= 100 for p in s.train + s.held_out)
    again = data.split_prompts(prompts, limit=5, held_out=4, shuffle=True, seed=3, max_chars=100)
    assert again.train == s.train
    other = data.split_prompts(prompts, limit=5, held_out=4, shuffle=True, seed=4, max_chars=100)
    assert other.train != s.train


def test_shards_are_atomic(tmp_path):
    data.write_shard(data.shard_path(tmp_path, 0), [{"a": 1}, {"a": "ü"}])
    with pytest.raises(TypeError):  # a crash halfway through writing shard 1 ...
        data.write_shard(data.shard_path(tmp_path, 1), [{"a": 2}, {"a": object()}])
    assert not data.shard_path(tmp_path, 1).exists()  # ... leaves no shard 1 for a rerun to trust
    assert data.read_shards(tmp_path) == [{"a": 1}, {"a": "ü"}]


_ROWS = "".join(json.dumps({"prompt": f"request {i} " + "x" * 50}) + "\n" for i in range(2000)).encode()
_GZ = gzip.compress(_ROWS)


@pytest.mark.parametrize("name, blob, expected", [
    ("cut.jsonl.gz", _GZ[: len(_GZ) // 2], r"cut\.jsonl\.gz: near line \d+: cannot read it \(EOFError: .*is it a complete file\?"),
    ("plain.jsonl.gz", b"hello\n", r"plain\.jsonl\.gz: near line 1: cannot read it \(BadGzipFile"),
    ("latin1.jsonl", b'{"prompt": "caf\xe9"}\n', r"latin1\.jsonl:1: not UTF-8 text"),
    ("late.jsonl", b"".join(_ROWS.splitlines(keepends=True)[:3]) + b'{"prompt": "caf\xe9"}\n', r"late\.jsonl:4: not UTF-8 text"),
    ("surrogate.jsonl", b'{"prompt": "a \\ud800 b"}\n', r"surrogate\.jsonl:1: the text holds an unpaired surrogate"),
    ("deep.jsonl", b"[" * 100000 + b"\n", r"deep\.jsonl:1: not valid JSON \(nested too deeply\)"),
])
def test_unreadable_files_give_one_clean_error_naming_the_file(tmp_path, name, blob, expected):
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(data.DataError, match=expected):
        data.read_prompts(str(path))
    assert data.check_source("data.prompts", str(path))[0].startswith(f"data.prompts: {path}")
