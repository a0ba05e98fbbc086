"""Export a Hugging Face Llama, Mistral or Qwen2 model folder to one GGUF file that llama.cpp and
ollama can load.

Reads `config.json`, the weights (`model.safetensors`, or the shards named by
`model.safetensors.index.json`; safetensors only, never pickle), `tokenizer.json`,
`tokenizer_config.json` and `chat_template.jinja` when present. Writes one GGUF file holding the
hyperparameters (rope: default, Llama-3.x `llama3` scaling, or `linear`), the vocabulary
(`cai_lite.gguf_vocab`: byte-level BPE, or SentencePiece-style BPE as in Llama-2 and Mistral),
special token ids and chat template, and the tensors as f32, f16 or q8_0 (norms and other 1-D
tensors always f32). q4_k_m and q5_k_m go through llama.cpp's own quantizer (the one
llama-cpp-python ships) from an f16 file. Files are written under a temporary name and renamed at
the end, so a crash never leaves a half-written model.

Anything else (other architectures, yarn/dynamic rope, Unigram tokenizers, unknown pre-tokenizer
regexes) raises ValueError and should go through llama.cpp's own `convert_hf_to_gguf.py`.

    python -m cai_lite.gguf_export HF_FOLDER OUT.gguf [f32|f16|q8_0|q4_k_m|q5_k_m]
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize
from safetensors import safe_open

from cai_lite import gguf_vocab

log = logging.getLogger(__name__)

QType = Literal["f32", "f16", "q8_0", "q4_k_m", "q5_k_m"]
# Mistral's tensors and attention are Llama's (convert_hf_to_gguf.py maps it to "llama" too); llama.cpp's
# llama arch has no sliding window, which only matters past `sliding_window` tokens.
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
# k-quants come from llama.cpp's quantizer: it picks per tensor (Q6_K for output and some ffn_down/attn_v
# in the _M mixes) and falls back to legacy quants where a row is not a multiple of 256 values.
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
GGUF_TYPES = (*FILE_TYPES, *K_QUANTS)

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _gguf_name(hf_name: str) -> str | None:
    """Map a HF tensor name to its GGUF name; None for buffers llama.cpp recomputes itself."""
    stem, _, kind = hf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}.{kind}"
    if stem.endswith("rotary_emb"):
        return None
    # Refuse rather than silently drop: a missing tensor makes llama.cpp compute garbage.
    raise ValueError(f"tensor {hf_name!r} has no GGUF name in this exporter")


def _permute_heads(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF Llama stores Q/K rows in rotate-half (NEOX) order; llama.cpp's llama arch applies rope to
    interleaved pairs, so each head's two halves are interleaved. Works for weights and biases."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it, for single-file and sharded checkpoints."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {name: folder / file for name, file in _read_json(index)["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _target_type(shape: tuple[int, ...], qtype: QType) -> GGMLQuantizationType:
    if len(shape) < 2 or qtype == "f32":
        return GGMLQuantizationType.F32  # norms and biases are tiny and precision-sensitive
    if qtype == "q8_0" and shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16  # q8_0 blocks must tile rows exactly; f16 is the safe fallback


def _nbytes(shape: tuple[int, ...], t: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[t]
    return int(np.prod(shape)) // block * size


def _tmp_name(path: Path, tag: str = "") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{tag}.tmp")


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str) -> Path:
    """Quantize the f32/f16 GGUF `src` to `qtype` (q4_k_m, q5_k_m) at `dst` with llama.cpp's own
    quantizer (`llama_model_quantize`), through a temporary name; return `dst`."""
    import llama_cpp  # the compiled llama.cpp; only needed here

    src, dst = Path(src), Path(dst)
    if qtype not in K_QUANTS:
        raise ValueError(f"qtype must be one of {sorted(K_QUANTS)} (got {qtype!r})")
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such GGUF file to quantize")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[qtype])
    params.nthread = os.cpu_count() or 1
    tmp = _tmp_name(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype} (llama_model_quantize returned {rc}; "
                               f"its log above says why)")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("quantized %s -> %s (%s)", src, dst, qtype)
    return dst


def export_gguf(hf_folder: str | Path, out_path: str | Path, qtype: QType = "f16") -> Path:
    """Write `hf_folder` (a Llama, Mistral or Qwen2 causal LM) as GGUF to `out_path`; return that path."""
    out_path = Path(out_path)
    if qtype not in GGUF_TYPES:
        raise ValueError(f"qtype must be one of {', '.join(GGUF_TYPES)} (got {qtype!r})")
    if qtype not in K_QUANTS:
        return _write_gguf(Path(hf_folder), out_path, qtype)
    f16 = _write_gguf(Path(hf_folder), _tmp_name(out_path, ".f16"), "f16")
    try:
        return quantize_gguf(f16, out_path, qtype)
    finally:
        f16.unlink(missing_ok=True)


def _write_gguf(folder: Path, out_path: Path, qtype: QType) -> Path:
    """Our own writer for the types gguf-py can quantize (f32, f16, q8_0)."""
    config = _read_json(folder / "config.json")
    hf_arch = (config.get("architectures") or [None])[0]
    if hf_arch not in ARCHS:
        raise ValueError(f"{folder / 'config.json'}: architecture {hf_arch!r} is not supported "
                         f"(supported: {', '.join(ARCHS)})")
    arch = ARCHS[hf_arch]
    gguf_vocab.check(folder / "tokenizer.json")  # before any weight is read
    # transformers 5 moved rope settings into `rope_parameters`; older configs keep them top-level.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None, "llama3", "linear"):
        # yarn, dynamic, longrope... need keys and attention factors llama.cpp reads differently;
        # a wrong rope silently breaks long prompts, so refuse instead of guessing.
        raise ValueError(f"{folder / 'config.json'}: rope type {rope_type!r} is not supported (default, "
                         f"llama3, linear); use llama.cpp's convert_hf_to_gguf.py on the HF folder instead")
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or n_embd // n_head

    files = _weight_files(folder)
    plan: list[tuple[str, str, GGMLQuantizationType, tuple[int, ...]]] = []  # gguf, hf, type, shape
    for hf_name in sorted(files, key=_sort_key):
        if (name := _gguf_name(hf_name)) is None:
            continue
        with safe_open(files[hf_name], framework="pt") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        plan.append((name, hf_name, _target_type(shape, qtype), shape))
    names = {p[0] for p in plan}
    if "output.weight" not in names and not config.get("tie_word_embeddings", False):
        raise ValueError(f"{folder}: no lm_head.weight and tie_word_embeddings is false")
    n_vocab = next(p[3][0] for p in plan if p[0] == "token_embd.weight")

    w = GGUFWriter(None, arch)
    w.add_name(folder.name)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    w.add_rope_dimension_count(head_dim)
    if rope_type == "linear":  # positions divided by the factor, as transformers' linear rope does
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(2)
    gguf_vocab.add_tokenizer(w, folder, config, n_vocab)

    transforms: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if arch == "llama":  # qwen2 runs NEOX rope in llama.cpp, so its rows stay in HF order
        transforms = {"attn_q": lambda a: _permute_heads(a, n_head), "attn_k": lambda a: _permute_heads(a, n_kv)}
    # Llama-3.x scaled rope: llama.cpp divides each rotary frequency by a per-dimension factor that
    # it reads from the extra tensor rope_freqs.weight (as convert_hf_to_gguf.py writes it).
    extra = {"rope_freqs.weight": llama3_rope_factors(rope, head_dim, rope_theta)} if rope_type == "llama3" else {}
    for name, data in extra.items():
        w.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=GGMLQuantizationType.F32)
    for name, _, t, shape in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, t), raw_dtype=t)

    tmp = _tmp_name(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Stream one tensor at a time so peak memory is one tensor, not the whole model.
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for data in extra.values():
            w.write_tensor_data(data)
        for name, hf_name, t, _ in plan:
            with safe_open(files[hf_name], framework="pt") as f:
                data = f.get_tensor(hf_name).float().numpy()  # via torch so bf16 checkpoints load
            role = name.split(".")[2] if name.startswith("blk.") else ""  # "blk.0.attn_q.weight" -> attn_q
            if (fix := transforms.get(role)) is not None:
                data = fix(data)
            w.write_tensor_data(quantize(data, t))
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%s, %d tensors)", out_path, qtype, len(plan))
    return out_path


def llama3_rope_factors(rope: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of Llama-3.x rope, (head_dim/2,) f32: 1 for short wavelengths, `factor`
    for long ones and a smooth blend between (transformers' _compute_llama3_parameters)."""
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope["original_max_position_embeddings"])
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (head_dim/2,)
    wavelen = 2 * np.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    factors = np.where(wavelen < old / high, 1.0,
                       np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _sort_key(hf_name: str) -> tuple[int, int, str]:
    """Embeddings first, then blocks in numeric order, then the head: llama.cpp's usual layout."""
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return (1, int(parts[2]), hf_name)
    return (0 if "embed" in hf_name else 2, 0, hf_name)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    if not 3 <= len(sys.argv) <= 4:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        sys.exit(2)
    print(export_gguf(sys.argv[1], sys.argv[2], *sys.argv[3:]))  # type: ignore[arg-type]
