"""Tests of cai_lite.gguf_export: export tiny Llama/Qwen2 models, load them in llama.cpp and compare
tokenization and next-token logits with transformers.

    python -m pytest tests/test_gguf_export.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

import cai_lite.gguf_export as gguf_export
from cai_lite.gguf_export import export_gguf
from cai_lite.judge_llamacpp import load_gguf
from cai_lite.tiny import build_tiny_model

TEXTS = [
    "The assistant should be helpful, honest and harmless.",
    "Unicode: café naïve Ünïcödé — 你好世界 🙂👍🏽",
    "Format {x} and %s and {{y}} and %(name)d",
    "  leading spaces,\ttabs\n\nnewlines   and 12345 digits 2024.",
]
PROMPT = [{"role": "user", "content": "Please rewrite the response to remove harmful content. {x} %s"}]

# Max abs logit diffs measured on the sharpened tiny models (logit std ~1.0) with llama.cpp from
# llama-cpp-python 0.3.36 on CPU: f32 ~1.4e-4, f16 ~1.3e-3, q8_0 ~2.8e-2 (~0.03 x logit std).
# A dropped Q/K permutation gives ~0.2, a dropped q bias ~5e-2, swapped norms ~0.2.
TOLERANCE = {"f32": 1e-3, "f16": 2e-2}
Q8_REL_TOLERANCE = 0.1  # q8_0: max abs diff relative to the HF logits' std (~3x the measured 0.03)


def _sharpen(path: Path, arch: str, tied: bool = False) -> None:
    """Give the random model weights that make every exported tensor matter.

    At the default init (std 0.02) attention is nearly uniform, norms are all ones and biases all
    zero, so a wrong Q/K permutation, swapped norms or a dropped bias would barely move the logits.
    The Qwen2 variant is saved in shards to exercise model.safetensors.index.json."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name in ("lm_head.weight", "model.embed_tokens.weight"):
                p.mul_(6.0)  # the tied variant's head is the embedding, so scale both
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(path, max_shard_size="150KB" if arch == "qwen2" else "100MB")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for key, arch, tied in (("llama", "llama", False), ("qwen2", "qwen2", False), ("qwen2-tied", "qwen2", True)):
        path = build_tiny_model(tmp_path_factory.mktemp(key) / "model", arch, init_std=0.02)  # _sharpen is calibrated on 0.02
        _sharpen(path, arch, tied)
        out[key] = path
    return out


def _llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    """Last-position logits. With logits_all=False llama-cpp-python 0.3.36 never fills `llm.scores`
    (eval() skips the copy), so read llama.cpp's own buffer for the last batch row instead."""
    llm.reset()
    llm.eval(ids)
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def _compare(folder: Path, gguf: Path) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[list[int], list[int]]]]:
    """HF vs llama.cpp: (hf logits, llama.cpp logits, {text: (hf ids, llama.cpp ids)})."""
    tok = AutoTokenizer.from_pretrained(folder)
    chat = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>" in chat
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0, -1].numpy()
    llm = load_gguf(str(gguf), n_ctx=256, logits_all=False, verbose=False, n_threads=2)
    try:
        toks = {t: (tok(t, add_special_tokens=False)["input_ids"], llm.tokenize(t.encode(), add_bos=False, special=True))
                for t in [*TEXTS, chat]}
        lc = _llama_logits(llm, ids)
    finally:
        llm.close()  # the destructor can raise at interpreter exit
    return hf, lc, toks


@pytest.mark.parametrize("key", ["llama", "qwen2", "qwen2-tied"])
def test_f32_matches_transformers(models: dict[str, Path], tmp_path: Path, key: str) -> None:
    gguf = export_gguf(models[key], tmp_path / "m.gguf", "f32")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left behind
    names = {t.name for t in GGUFReader(gguf).tensors}
    assert ("output.weight" in names) == (key != "qwen2-tied")
    assert ("blk.0.attn_q.bias" in names) == key.startswith("qwen2")
    hf, lc, toks = _compare(models[key], gguf)
    for text, (want, got) in toks.items():
        assert got == want, f"tokenization differs for {text!r}"
    assert hf.std() > 0.5, "logits too flat for the tolerance to mean anything"
    diff = float(np.abs(hf - lc).max())
    assert diff <= TOLERANCE["f32"], f"{key} f32 max abs logit diff {diff:.2e}"


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
@pytest.mark.parametrize("key", ["llama", "qwen2"])
def test_quantized_close_to_transformers(models: dict[str, Path], tmp_path: Path, key: str, qtype: str) -> None:
    gguf = export_gguf(models[key], tmp_path / f"m-{qtype}.gguf", qtype)  # type: ignore[arg-type]
    hf, lc, _ = _compare(models[key], gguf)
    diff = float(np.abs(hf - lc).max())
    if qtype == "f16":
        assert diff <= TOLERANCE["f16"], f"f16 max abs logit diff {diff:.2e}"
    else:
        assert diff <= Q8_REL_TOLERANCE * hf.std(), f"q8_0 max abs diff {diff:.2e} vs logit std {hf.std():.2e}"
        assert len(set(np.argsort(hf)[-5:]) & set(np.argsort(lc)[-5:])) >= 4
    # Quantized files must really be smaller: the 2-D weights were not silently left f32.
    f32 = export_gguf(models[key], tmp_path / "m-f32.gguf", "f32")
    assert gguf.stat().st_size < (0.6 if qtype == "f16" else 0.35) * f32.stat().st_size
    types = {t.name: t.tensor_type for t in GGUFReader(gguf).tensors}
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert types["blk.0.ffn_down.weight"] == (GGMLQuantizationType.F16 if qtype == "f16" else GGMLQuantizationType.Q8_0)


def test_q8_0_falls_back_to_f16_for_rows_not_multiple_of_32() -> None:
    assert gguf_export._target_type((64, 64), "q8_0") == GGMLQuantizationType.Q8_0
    assert gguf_export._target_type((64, 48), "q8_0") == GGMLQuantizationType.F16
    assert gguf_export._target_type((64,), "q8_0") == GGMLQuantizationType.F32
    assert gguf_export._target_type((64, 64), "f16") == GGMLQuantizationType.F16


def test_wrong_permutation_is_detected(models: dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the comparison itself: dropping Llama's Q/K head permutation must break the match."""
    monkeypatch.setattr(gguf_export, "_permute_heads", lambda w, n_head: w)
    hf, lc, _ = _compare(models["llama"], export_gguf(models["llama"], tmp_path / "bad.gguf", "f32"))
    diff = float(np.abs(hf - lc).max())
    assert diff > 10 * TOLERANCE["f32"], f"unpermuted Q/K only moved logits by {diff:.2e}"


def test_unsupported_inputs_raise(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["llama"]
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())

    tok_json = json.loads((src / "tokenizer.json").read_text())
    tok_json["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(tok_json))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*convert_hf_to_gguf\.py"):
        export_gguf(folder, tmp_path / "out.gguf")

    tok_json["model"] = {"type": "Unigram", "vocab": [["a", 0.0]], "unk_id": 0}
    (folder / "tokenizer.json").write_text(json.dumps(tok_json))
    with pytest.raises(ValueError, match=r"Unigram"):
        export_gguf(folder, tmp_path / "out.gguf")

    (folder / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*GPT2LMHeadModel"):
        export_gguf(folder, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*tmp"))


def test_crash_mid_write_leaves_no_file(models: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_quantize(data: np.ndarray, qtype: object) -> np.ndarray:
        calls.append(qtype)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return data.astype(np.float32)

    monkeypatch.setattr(gguf_export, "quantize", failing_quantize)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(models["llama"], tmp_path / "m.gguf", "f32")
    assert list(tmp_path.iterdir()) == []
