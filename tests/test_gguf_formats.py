"""GGUF export of the model kinds people run beyond byte-level Llama/Qwen2: Llama-3.x scaled rope,
SentencePiece-style tokenizers (Llama-2's older tokenizer.json, Mistral's LlamaTokenizer), and
q4_k_m / q5_k_m through llama.cpp's own quantizer. Each exports a tiny in-process model, loads it in
llama.cpp and compares tokenization and logits with transformers.

    python -m pytest tests/test_gguf_formats.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from test_gguf_export import TEXTS, TOLERANCE, _llama_logits, _sharpen
from transformers import AutoModelForCausalLM, AutoTokenizer

from cai_lite import modelfile
from cai_lite.gguf_export import export_gguf, quantize_gguf
from cai_lite.judge_llamacpp import load_gguf
from cai_lite.tiny import build_tiny_model

# Llama-3.1's rope scaling with the original context shrunk from 8192 to 64, so that at head_dim 16
# (wavelengths 6 to 20k positions) one frequency stays, two are blended (divided by 1.29 and 7.67:
# 1 / ((1 - s) / 8 + s), s = (64 / wavelength - 1) / 3) and five are divided by 8.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LEADING_SPACE = [t for t in TEXTS if t.startswith(" ")] + [" leading space"]
SPM_TEXTS = [t for t in TEXTS if not t.startswith(" ")] + ["a\nb\n\n\tc", "trailing space ", "", "[INST] hi [/INST]"]


def _hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def _gguf_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    llm = load_gguf(str(gguf), n_ctx=512, logits_all=False, verbose=False, n_threads=2)
    try:
        return _llama_logits(llm, ids)
    finally:
        llm.close()


def _long_ids(folder: Path) -> list[int]:
    """About 280 tokens: well past position 64, where the llama3 rope factors change the angles a lot."""
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(" ".join(TEXTS * 2), add_special_tokens=False)["input_ids"]
    assert len(ids) > 100
    return ids


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_tiny_model(tmp_path_factory.mktemp("llama3") / "model", "llama", init_std=0.02,
                            tokenizer="llama3-bpe", rope_parameters=dict(LLAMA3_ROPE))
    _sharpen(path, "llama")
    assert json.loads((path / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    return path


def test_llama3_model_matches_transformers(llama3: Path, tmp_path: Path) -> None:
    """A Llama-3.1-style model: scaled rope, Llama-3's pre-tokenizer, BOS and chat template."""
    ids = _long_ids(llama3)
    hf = _hf_logits(llama3, ids)
    gguf = export_gguf(llama3, tmp_path / "m.gguf", "f32")
    factors = next(t for t in GGUFReader(gguf).tensors if t.name == "rope_freqs.weight")
    assert factors.data.tolist() == pytest.approx([1, 1.294, 7.667, 8, 8, 8, 8, 8], abs=1e-3)
    tok = AutoTokenizer.from_pretrained(llama3)
    chat = tok.apply_chat_template([{"role": "user", "content": "Rewrite {x} %s"}], tokenize=False,
                                   add_generation_prompt=True)
    llm = load_gguf(str(gguf), n_ctx=512, logits_all=False, verbose=False, n_threads=2)
    try:
        # Llama-3's split cuts digits in threes: "1010" is 10 1 0 there and 10 10 with GPT-2's.
        for text in [*TEXTS, chat, "Options: (A) (B) in 1010 or 2024"]:
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
        assert llm.tokenize(b"a", add_bos=True) == tok("a")["input_ids"]  # BOS first, as transformers
        lc = _llama_logits(llm, ids)
    finally:
        llm.close()
    diff = float(np.abs(hf - lc).max())
    assert diff <= TOLERANCE["f32"], f"llama3 rope f32 max abs logit diff {diff:.2e}"
    assert modelfile.go_template(tok)[0] == "llama3"  # so the export stage's Modelfile gets a TEMPLATE

    # The same weights with default rope give other logits, so the match above proves the scaling.
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in llama3.iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    config = json.loads((llama3 / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (plain / "config.json").write_text(json.dumps(config))
    moved = float(np.abs(hf - _hf_logits(plain, ids)).max())
    assert moved > 100 * TOLERANCE["f32"], f"llama3 scaling only moved transformers' logits by {moved:.2e}"
    default = export_gguf(plain, tmp_path / "plain.gguf", "f32")
    assert "rope_freqs.weight" not in {t.name for t in GGUFReader(default).tensors}


def test_linear_rope_matches_transformers(tmp_path: Path) -> None:
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    path = build_tiny_model(tmp_path / "linear", "llama", init_std=0.02, rope_parameters=rope)
    _sharpen(path, "llama")
    ids = _long_ids(path)
    gguf = export_gguf(path, tmp_path / "m.gguf", "f32")
    fields = GGUFReader(gguf).fields
    assert bytes(fields["llama.rope.scaling.type"].parts[-1]).decode() == "linear"
    diff = float(np.abs(_hf_logits(path, ids) - _gguf_logits(gguf, ids)).max())
    assert diff <= TOLERANCE["f32"], f"linear rope f32 max abs logit diff {diff:.2e}"


def test_other_scaled_rope_is_refused(llama3: Path, tmp_path: Path) -> None:
    folder = tmp_path / "yarn"
    folder.mkdir()
    for f in llama3.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((llama3 / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: rope type 'yarn'"):
        export_gguf(folder, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf"))


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind, arch in (("sentencepiece-legacy", "llama"), ("sentencepiece", "mistral")):
        path = build_tiny_model(tmp_path_factory.mktemp(kind) / "model", arch, init_std=0.02, tokenizer=kind)
        _sharpen(path, "llama")
        out[kind] = path
    return out


@pytest.mark.parametrize("kind", ["sentencepiece-legacy", "sentencepiece"])
def test_sentencepiece_matches_transformers(spm_models: dict[str, Path], tmp_path: Path, kind: str) -> None:
    folder = spm_models[kind]
    tok = AutoTokenizer.from_pretrained(folder)
    gguf = export_gguf(folder, tmp_path / "m.gguf", "f32")
    fields = GGUFReader(gguf).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    types = fields["tokenizer.ggml.token_type"]
    type_of = {i: int(types.parts[types.data[i]][0]) for i in (0, 1, 3 + 0x41, 300)}
    assert type_of == {0: 2, 1: 3, 3 + 0x41: 6, 300: 1}  # <unk> UNKNOWN, <s> CONTROL, <0x41> BYTE, a piece NORMAL

    chat = tok.apply_chat_template([{"role": "user", "content": "Please rewrite {x} %s"}], tokenize=False)
    # llama.cpp puts "▁" before all text that starts the input or follows a special token, as
    # SentencePiece does; the older tokenizer.json (a Prepend normalizer) does the same, Mistral's
    # Metaspace does not after a special token (the chat's "<s>[INST]") or before a leading space.
    texts = SPM_TEXTS + (LEADING_SPACE + [chat] if kind == "sentencepiece-legacy" else [])
    llm = load_gguf(str(gguf), n_ctx=512, logits_all=False, verbose=False, n_threads=2)
    try:
        for text in texts:
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, f"{kind}: {text!r}"
        assert llm.tokenize(b"a", add_bos=True)[:1] == tok("a")["input_ids"][:1]  # BOS as transformers adds it
        ids = tok(chat, add_special_tokens=False)["input_ids"]
        assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in tok(TEXTS[1])["input_ids"])
        lc = _llama_logits(llm, ids)
    finally:
        llm.close()
    hf = _hf_logits(folder, ids)
    assert hf.std() > 0.5, "logits too flat for the tolerance to mean anything"
    diff = float(np.abs(hf - lc).max())
    assert diff <= TOLERANCE["f32"], f"{kind} f32 max abs logit diff {diff:.2e}"


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 256 and 512 values: llama.cpp's k-quant blocks hold 256, so at the usual width 64 every
    tensor would fall back to a legacy quant and the test would not see Q4_K at all. Not sharpened:
    random Gaussian weights are the worst case for 4-bit quantization, and sharpened ones amplify the
    error through peaky attention (q4_k_m correlates 0.91 with f32 there, 0.07 at init_std 0.1)."""
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "model", "llama", hidden_size=256,
                            intermediate_size=512, init_std=0.02)


# Correlation of last-position logits with the f32 file's, measured on `wide` with llama-cpp-python
# 0.3.36: q8_0 0.9999, q5_k_m 0.9971, q4_k_m 0.9867 (argmax the same, 4 of the top 5 shared).
K_QUANT_MIN_CORR = {"q5_k_m": 0.99, "q4_k_m": 0.97}


@pytest.mark.parametrize("qtype", ["q4_k_m", "q5_k_m"])
def test_k_quants_load_generate_and_stay_close(wide: Path, tmp_path: Path, qtype: str) -> None:
    gguf = export_gguf(wide, tmp_path / f"m-{qtype}.gguf", qtype)  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir()] == [gguf.name]  # the f16 step and temp files are gone
    types = {t.name: t.tensor_type for t in GGUFReader(gguf).tensors}
    k = GGMLQuantizationType.Q4_K if qtype == "q4_k_m" else GGMLQuantizationType.Q5_K
    assert types["blk.0.ffn_gate.weight"] == k and types["blk.0.attn_q.weight"] == k
    assert types["output.weight"] == GGMLQuantizationType.Q6_K  # the _M mix keeps the head at 6 bits
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32

    f32 = export_gguf(wide, tmp_path / "m-f32.gguf", "f32")
    assert gguf.stat().st_size < 0.25 * f32.stat().st_size
    tok = AutoTokenizer.from_pretrained(wide)
    ids = tok(" ".join(TEXTS), add_special_tokens=False)["input_ids"]
    ref, got = _gguf_logits(f32, ids), _gguf_logits(gguf, ids)
    assert ref.std() > 0.2, "logits too flat for the bound to mean anything"
    corr = float(np.corrcoef(ref, got)[0, 1])
    assert corr > K_QUANT_MIN_CORR[qtype], f"{qtype} logits correlate {corr:.4f} with f32"
    assert ref.argmax() == got.argmax() and len(set(np.argsort(ref)[-5:]) & set(np.argsort(got)[-5:])) >= 3

    llm = load_gguf(str(gguf), n_ctx=256, verbose=False, n_threads=2)
    try:
        out = llm.create_completion("The assistant should", max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] >= 1 and isinstance(out["choices"][0]["text"], str)


def test_quantize_gguf_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="q4_k_m"):
        quantize_gguf(tmp_path / "a.gguf", tmp_path / "b.gguf", "q3_k")
    with pytest.raises(FileNotFoundError, match="a.gguf"):
        quantize_gguf(tmp_path / "a.gguf", tmp_path / "b.gguf", "q4_k_m")
    (tmp_path / "a.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError, match="could not quantize"):
        quantize_gguf(tmp_path / "a.gguf", tmp_path / "b.gguf", "q4_k_m")
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]
