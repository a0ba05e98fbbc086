"""One clean error for every bad file cai_lite reads besides prompts and constitutions (those are in
test_data.py and test_constitution.py): PEFT adapter folders, `reward_stats.json` and GGUF judge
files. Each must fail with data.DataError (or ConfigError before any model loads) naming the file,
and the CLI must print it without a traceback.

    python -m pytest tests/test_bad_files.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cai_lite import adapter_files, cli, judge_llamacpp, models, rollout
from cai_lite.config import JudgeConfig
from cai_lite.data import DataError
from cai_lite.gguf_export import export_gguf


def _edit_json(name: str, change):
    def edit(folder: Path) -> None:
        path = folder / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return edit


def _write(name: str, content: bytes):
    return lambda folder: (folder / name).write_bytes(content)


def _cut(name: str, keep: float):
    def edit(folder: Path) -> None:
        raw = (folder / name).read_bytes()
        (folder / name).write_bytes(raw[: int(len(raw) * keep)])
    return edit


def _tensors(name: str, change):
    def edit(folder: Path) -> None:
        t = load_file(folder / name)
        save_file(change(t), folder / name)
    return edit


def _first(t: dict, f) -> dict:
    k = sorted(t)[0]
    return {**t, k: f(t[k])}


# (case, how the folder is damaged, the file the message must name, found before a model loads)
ADAPTER_CASES = [
    ("no adapter_config.json", lambda f: (f / "adapter_config.json").unlink(), "", True),
    ("no adapter_model.safetensors", lambda f: (f / "adapter_model.safetensors").unlink(),
     "adapter_model.safetensors", True),
    ("truncated safetensors", _cut("adapter_model.safetensors", 0.5), "adapter_model.safetensors", True),
    ("safetensors cut in its header", _cut("adapter_model.safetensors", 0.001), "adapter_model.safetensors", True),
    ("empty safetensors", _write("adapter_model.safetensors", b""), "adapter_model.safetensors", True),
    ("garbage safetensors", _write("adapter_model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"),
     "adapter_model.safetensors", True),
    ("config not JSON", _write("adapter_config.json", b'{"r": 8,'), "adapter_config.json", True),
    ("config not UTF-8", _write("adapter_config.json", b'{"r": "\xff\xfe"}'), "adapter_config.json", True),
    ("config a list", _write("adapter_config.json", b"[1, 2]"), "adapter_config.json", True),
    ("r a string", _edit_json("adapter_config.json", lambda c: {**c, "r": "eight"}), "adapter_config.json", True),
    ("r zero", _edit_json("adapter_config.json", lambda c: {**c, "r": 0}), "adapter_config.json", True),
    ("target_modules a number", _edit_json("adapter_config.json", lambda c: {**c, "target_modules": 5}),
     "adapter_config.json", True),
    ("lora_dropout a string", _edit_json("adapter_config.json", lambda c: {**c, "lora_dropout": "0.1"}),
     "adapter_config.json", True),
    ("not LoRA", _edit_json("adapter_config.json", lambda c: {**c, "peft_type": "PREFIX_TUNING"}),
     "adapter_config.json", True),
    ("target modules not in the base", _edit_json("adapter_config.json",
                                                  lambda c: {**c, "target_modules": ["no_such_proj"]}),
     "adapter_config.json", False),
    ("r differs from the tensors", _edit_json("adapter_config.json", lambda c: {**c, "r": c["r"] + 1}), "", False),
    ("a tensor of the wrong shape",
     _tensors("adapter_model.safetensors", lambda t: _first(t, lambda x: x[:, :-1].contiguous())), "", False),
    ("a tensor missing", _tensors("adapter_model.safetensors", lambda t: dict(sorted(t.items())[1:])), "", False),
    ("NaN weights", _tensors("adapter_model.safetensors", lambda t: _first(t, lambda x: x * float("nan"))),
     "adapter_model.safetensors", False),
    ("integer weights", _tensors("adapter_model.safetensors", lambda t: _first(t, lambda x: x.to(torch.int32))),
     "adapter_model.safetensors", False),
    ("head of the wrong shape",
     _tensors("head.safetensors", lambda t: {"weight": t["weight"][:, :-1].contiguous(), "bias": t["bias"]}),
     "head.safetensors", False),
    ("truncated head", _cut("head.safetensors", 0.5), "head.safetensors", True),
]


@pytest.fixture(scope="module")
def good_adapter(nf4_base, tmp_path_factory) -> Path:
    """A saved adapter with a head, as the reward_model stage writes one."""
    models.add_adapter(nf4_base, "saved")
    models.add_head(nf4_base, "saved")
    with torch.no_grad():
        for p in models.adapter_parameters(nf4_base, "saved"):
            p.normal_(0, 0.1)  # the LoRA B matrix starts at zero: a copy error would not show
    folder = adapter_files.save_adapter(nf4_base, "saved", tmp_path_factory.mktemp("adapter") / "good")
    models.delete_adapter(nf4_base, "saved")
    return folder


def _damaged(good: Path, tmp: Path, damage) -> Path:
    folder = tmp / "bad"
    folder.mkdir()
    for f in good.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    damage(folder)
    return folder


@pytest.mark.parametrize("case,damage,names,before_model", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_bad_adapter_folder(case, damage, names, before_model, nf4_base, good_adapter, tmp_path):
    folder = _damaged(good_adapter, tmp_path, damage)
    found = adapter_files.check(folder)
    if before_model:
        assert len(found) == 1 and str(folder / names) in found[0], found
    adapters = list(nf4_base.adapters)
    with pytest.raises(DataError) as e:
        adapter_files.load_adapter(nf4_base, "judge_x", folder)
    assert str(folder / names) in str(e.value), str(e.value)
    assert nf4_base.adapters == adapters and "judge_x" not in nf4_base.heads  # nothing half-loaded is left
    adapter_files.load_adapter(nf4_base, "judge_x", good_adapter)  # the name is free for a good folder
    models.delete_adapter(nf4_base, "judge_x")


def test_good_adapter_passes_every_check(nf4_base, good_adapter):
    assert adapter_files.check(good_adapter) == []
    adapter_files.load_adapter(nf4_base, "judge_y", good_adapter)
    want = load_file(good_adapter / "adapter_model.safetensors")
    assert all(torch.equal(t, want[k]) for k, t in models.lora_tensors(nf4_base, "judge_y"))
    models.delete_adapter(nf4_base, "judge_y")


REWARD_STATS_CASES = [
    ("missing", None), ("not JSON", b'{"mean": 0.1,'), ("not UTF-8", b'{"mean": "\xff"}'), ("a list", b"[0, 1]"),
    ("no std", b'{"mean": 0.1}'), ("std a string", b'{"mean": 0.1, "std": "1"}'), ("mean NaN", b'{"mean": NaN, "std": 1}'),
    ("std infinite", b'{"mean": 0, "std": Infinity}'), ("std negative", b'{"mean": 0, "std": -1}'),
    ("mean a bool", b'{"mean": true, "std": 1}'), ("mean null", b'{"mean": null, "std": 1}'),
]


@pytest.mark.parametrize("case,content", REWARD_STATS_CASES, ids=[c[0] for c in REWARD_STATS_CASES])
def test_bad_reward_stats(case, content, tmp_path):
    path = tmp_path / "reward_model" / "reward_stats.json"
    path.parent.mkdir()
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match="force=\\[reward_model\\]") as e:
        rollout.load_reward_stats(tmp_path)
    assert str(path) in str(e.value)


def test_good_reward_stats(tmp_path):
    (tmp_path / "reward_model").mkdir()
    (tmp_path / "reward_model" / "reward_stats.json").write_text('{"mean": -0.5, "std": 0}')
    assert rollout.load_reward_stats(tmp_path) == {"mean": -0.5, "std": 0}


@pytest.fixture(scope="module")
def good_gguf(tiny_llama, tmp_path_factory) -> Path:
    return export_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32")


GGUF_CASES = [("truncated", lambda raw: raw[: len(raw) // 2]), ("cut in the header", lambda raw: raw[:200]),
              ("magic then garbage", lambda raw: b"GGUF" + bytes(range(256)) * 20), ("magic only", lambda raw: b"GGUF"),
              ("empty", lambda raw: b""), ("weights zeroed past the header", lambda raw: raw[:64] + bytes(len(raw) - 64))]


@pytest.mark.parametrize("case,damage", GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_bad_gguf(case, damage, good_gguf, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the cpu-judge extra) is not installed")
    path = tmp_path / "bad.gguf"
    path.write_bytes(damage(good_gguf.read_bytes()))
    found = judge_llamacpp.gguf_problems(str(path))
    assert len(found) == 1 and str(path) in found[0], found
    with pytest.raises(DataError, match="judge.gguf_path") as e:
        judge_llamacpp.LlamaCppJudge(JudgeConfig(backend="llamacpp", gguf_path=str(path), n_ctx=256), None)
    assert str(path) in str(e.value)


def test_good_gguf_passes(good_gguf):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the cpu-judge extra) is not installed")
    assert judge_llamacpp.gguf_problems(str(good_gguf)) == []


def test_cli_prints_bad_files_without_a_traceback(tmp_path, tiny_llama, good_adapter, good_gguf, capsys, monkeypatch):
    """What a user sees: exit status 2 and one line naming the file. The first two are found before
    any model loads; the critic adapter fails inside the critique_revise stage, after the base loads."""
    bad_adapter = _damaged(good_adapter, tmp_path, _cut("adapter_model.safetensors", 0.5))
    bad_gguf = tmp_path / "cut.gguf"
    bad_gguf.write_bytes(good_gguf.read_bytes()[:300])
    run = ["recipe=tiny_cpu", f"base.model={tiny_llama}", "base.create=none", "data.limit=2",
           "critique_revise.rounds=1", "critique_revise.helpful_prompts="]
    cases = [
        (["stages=[critique_revise,sft,label_preferences]", f"judge.adapter={bad_adapter}"],
         str(bad_adapter / "adapter_model.safetensors")),
        (["stages=[critique_revise,sft,label_preferences]", "judge=llamacpp", f"judge.gguf_path={bad_gguf}"],
         str(bad_gguf)),
        (["stages=[critique_revise]", f"critique_revise.critic_adapter={bad_adapter}"],
         str(bad_adapter / "adapter_model.safetensors")),
    ]
    for i, (extra, needle) in enumerate(cases):
        assert cli.main(run + [f"run_dir={tmp_path / f'run{i}'}"] + extra) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
