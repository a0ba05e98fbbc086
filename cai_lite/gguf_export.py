"""Export a Hugging Face Llama or Qwen2 model folder to one GGUF file that llama.cpp can load.

Reads `config.json`, the weights (`model.safetensors`, or the shards named by
`model.safetensors.index.json`; safetensors only, never pickle), `tokenizer.json`,
`tokenizer_config.json` and `chat_template.jinja` when present. Writes one GGUF file holding the
hyperparameters, the byte-level BPE vocabulary, merges, special token ids and chat template, and
the tensors as f32, f16 or q8_0 (norms and other 1-D tensors always f32). The file is written
under a temporary name and renamed at the end, so a crash never leaves a half-written model.

Only byte-level (GPT-2 style) BPE tokenizers whose pre-tokenizer llama.cpp knows by name are
handled; anything else (SentencePiece, Unigram, unknown regexes) raises ValueError and should go
through llama.cpp's own `convert_hf_to_gguf.py`.

    python -m cai_lite.gguf_export HF_FOLDER OUT.gguf [f32|f16|q8_0]
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize
from safetensors import safe_open

log = logging.getLogger(__name__)

QType = Literal["f32", "f16", "q8_0"]
ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}

# Pre-tokenizer regexes as they appear in tokenizer.json Split nodes, keyed to the names llama.cpp
# uses for its built-in re-implementations (llama.cpp cannot run arbitrary regexes).
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_REGEXES = {
    _LETTERS + r"\p{N}" + _TAIL: "qwen2",
    _LETTERS + r"\p{N}{1,3}" + _TAIL: "llama-bpe",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
}
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


def _pre_tokenizer_name(tok_json: dict[str, Any], path: Path) -> str:
    """Name of llama.cpp's built-in pre-tokenizer that reproduces this pipeline, or ValueError."""
    model, pre = tok_json.get("model") or {}, tok_json.get("pre_tokenizer") or {}
    nodes = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    norm = (tok_json.get("normalizer") or {}).get("type")
    name = None
    # llama.cpp skips NFC; that only matters for text that is not already NFC, which is rare.
    if model.get("type") == "BPE" and not model.get("byte_fallback") and norm in (None, "NFC"):
        kinds = [n.get("type") for n in nodes]
        if kinds == ["ByteLevel"] and nodes[0].get("use_regex", True):
            name = "gpt-2"
        elif kinds == ["Split", "ByteLevel"] and not nodes[1].get("use_regex", True):
            name = SPLIT_REGEXES.get((nodes[0].get("pattern") or {}).get("Regex", ""))
    if name is None:
        raise ValueError(
            f"{path}: only byte-level BPE tokenizers with a GPT-2, Qwen2 or Llama-3 pre-tokenizer are "
            f"supported (model {model.get('type')!r}, pre_tokenizer {pre.get('type')!r}, normalizer "
            f"{norm!r}); use llama.cpp's convert_hf_to_gguf.py on the HF folder instead"
        )
    return name


def _add_tokenizer(w: GGUFWriter, folder: Path, config: dict[str, Any], n_vocab: int) -> None:
    from transformers import AutoTokenizer  # heavy import, only needed here

    # Read the pipeline transformers actually builds, not tokenizer.json verbatim: in transformers 5
    # some tokenizer classes (e.g. Qwen2Tokenizer) replace the file's normalizer and pre-tokenizer,
    # and the GGUF must tokenize like the model was trained.
    tok_path = folder / "tokenizer.json"
    if not tok_path.exists():
        raise ValueError(f"{tok_path} is missing; use llama.cpp's convert_hf_to_gguf.py on the HF folder instead")
    _pre_tokenizer_name(_read_json(tok_path), tok_path)  # fail early and cheaply on SentencePiece etc.
    tok = AutoTokenizer.from_pretrained(folder)
    tok_json = json.loads(tok.backend_tokenizer.to_str())
    pre = _pre_tokenizer_name(tok_json, tok_path)

    by_id = {i: t for t, i in tok_json["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    # The embedding may have more rows than the tokenizer has tokens (padded for speed); llama.cpp
    # needs one entry per row, so fill the gap with unused placeholders as convert_hf_to_gguf does.
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added
                         else TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
    # tokenizers >= 0.20 stores merges as [left, right] pairs, older versions as "left right".
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    def special_id(kind: str) -> int | None:
        if (tid := getattr(tok, f"{kind}_token_id", None)) is not None:
            return tid
        cid = config.get(f"{kind}_token_id")  # config.json only fills gaps the tokenizer leaves
        return cid[0] if isinstance(cid, list) and cid else cid if isinstance(cid, int) else None

    for kind, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                      ("pad", w.add_pad_token_id), ("unk", w.add_unk_token_id)):
        if (tid := special_id(kind)) is not None:
            add(tid)
    # Ask the tokenizer whether it adds BOS/EOS (its post-processor decides, not a config flag).
    # Writing False explicitly matters: llama.cpp otherwise falls back to a per-vocab default and
    # may prepend a BOS the model never saw in training.
    probe = tok("a")["input_ids"]
    w.add_add_bos_token(tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id])
    w.add_add_eos_token(tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id])

    # transformers reads tokenizer_config.json's "chat_template" or chat_template.jinja into this.
    template = tok.chat_template
    if isinstance(template, dict):  # named templates, e.g. {"default": ..., "tool_use": ...}
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        w.add_chat_template(template)


def _target_type(shape: tuple[int, ...], qtype: QType) -> GGMLQuantizationType:
    if len(shape) < 2 or qtype == "f32":
        return GGMLQuantizationType.F32  # norms and biases are tiny and precision-sensitive
    if qtype == "q8_0" and shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16  # q8_0 blocks must tile rows exactly; f16 is the safe fallback


def _nbytes(shape: tuple[int, ...], t: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[t]
    return int(np.prod(shape)) // block * size


def export_gguf(hf_folder: str | Path, out_path: str | Path, qtype: QType = "f16") -> Path:
    """Write `hf_folder` (a Llama or Qwen2 causal LM) as GGUF to `out_path` and return that path."""
    folder, out_path = Path(hf_folder), Path(out_path)
    if qtype not in FILE_TYPES:
        raise ValueError(f"qtype must be one of {sorted(FILE_TYPES)} (got {qtype!r})")
    config = _read_json(folder / "config.json")
    hf_arch = (config.get("architectures") or [None])[0]
    if hf_arch not in ARCHS:
        raise ValueError(f"{folder / 'config.json'}: architecture {hf_arch!r} is not supported "
                         f"(supported: {', '.join(ARCHS)})")
    arch = ARCHS[hf_arch]
    # transformers 5 moved rope settings into `rope_parameters`; older configs keep them top-level.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        # Scaled rope (llama3, yarn, ...) needs extra tensors/keys; a wrong rope silently breaks
        # long prompts, so refuse instead of guessing.
        raise ValueError(f"{folder / 'config.json'}: rope type {rope_type!r} is not supported; "
                         f"use llama.cpp's convert_hf_to_gguf.py on the HF folder instead")
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
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(2)
    _add_tokenizer(w, folder, config, n_vocab)

    transforms: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if arch == "llama":  # qwen2 runs NEOX rope in llama.cpp, so its rows stay in HF order
        transforms = {"attn_q": lambda a: _permute_heads(a, n_head), "attn_k": lambda a: _permute_heads(a, n_kv)}
    for name, _, t, shape in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, t), raw_dtype=t)

    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Stream one tensor at a time so peak memory is one tensor, not the whole model.
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
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
