"""The tokenizer half of the GGUF export: write a Hugging Face tokenizer as llama.cpp's vocabulary.

Reads `tokenizer.json` (and, through `AutoTokenizer`, `tokenizer_config.json` and
`chat_template.jinja`) from a model folder; writes the `tokenizer.ggml.*` keys and the chat template
into an open `gguf.GGUFWriter`. `cai_lite.gguf_export` calls `add_tokenizer`; nothing here runs alone.

Two kinds of tokenizer are handled, the two llama.cpp re-implements:
- byte-level (GPT-2 style) BPE whose pre-tokenizer regex llama.cpp knows by name (GPT-2, Qwen2,
  Llama-3) -> `tokenizer.ggml.model = "gpt2"` with merges;
- SentencePiece-style BPE with byte fallback (Llama-2, Mistral): a Metaspace pre-tokenizer, or the
  older normalizer Prepend("▁") + Replace(" ", "▁") -> `tokenizer.ggml.model = "llama"` with scores
  and token types (byte tokens `<0x00>`... BYTE, specials CONTROL, unk UNKNOWN).
Anything else (Unigram, WordPiece, unknown regexes) raises ValueError naming tokenizer.json.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, TokenType

log = logging.getLogger(__name__)

# Pre-tokenizer regexes as they appear in tokenizer.json Split nodes, keyed to the names llama.cpp
# uses for its built-in re-implementations (llama.cpp cannot run arbitrary regexes).
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_REGEXES = {
    _LETTERS + r"\p{N}" + _TAIL: "qwen2",
    _LETTERS + r"\p{N}{1,3}" + _TAIL: "llama-bpe",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _spm_space_prefix(tok_json: dict[str, Any]) -> bool | None:
    """For a SentencePiece-style pipeline, whether it prepends "▁" to the text (llama.cpp's
    `add_space_prefix`); None when the pipeline is not one llama.cpp's "llama" vocab reproduces."""
    model, pre = tok_json.get("model") or {}, tok_json.get("pre_tokenizer") or {}
    norm = tok_json.get("normalizer") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    if pre.get("type") == "Metaspace" and not norm and pre.get("replacement") == "▁":
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        return scheme != "never"
    # The older tokenizer.json layout: the normalizer does Metaspace's job, no pre-tokenizer.
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    kinds = [(s.get("type"), s.get("prepend"), (s.get("pattern") or {}).get("String"), s.get("content"))
             for s in steps]
    replace = ("Replace", None, " ", "▁")
    if not pre and kinds in ([("Prepend", "▁", None, None), replace], [replace]):
        return kinds[0][0] == "Prepend"
    return None


def _pre_tokenizer_name(tok_json: dict[str, Any], path: Path) -> str:
    """The tokenizer's name in llama.cpp: "llama" for a SentencePiece-style BPE, else the name of the
    built-in byte-level pre-tokenizer that reproduces this pipeline; ValueError when there is none."""
    if _spm_space_prefix(tok_json) is not None:
        return "llama"
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
            f"{path}: only byte-level BPE tokenizers with a GPT-2, Qwen2 or Llama-3 pre-tokenizer, and "
            f"SentencePiece-style BPE with byte fallback, are supported (model {model.get('type')!r}, "
            f"pre_tokenizer {pre.get('type')!r}, normalizer {norm!r}); use llama.cpp's "
            f"convert_hf_to_gguf.py on the HF folder instead"
        )
    return name


def _merge_scores(merges: list[str | list[str]]) -> dict[str, float]:
    """Token -> -rank of the first merge that makes it. llama.cpp's SentencePiece tokenizer merges the
    adjacent pair whose result scores highest; scoring by merge rank makes it apply merges in the same
    order as Hugging Face's BPE (as SentencePiece's own scores do for a converted Llama-2 vocab)."""
    scores: dict[str, float] = {}
    for rank, m in enumerate(merges):
        scores.setdefault(m.replace(" ", "", 1) if isinstance(m, str) else "".join(m), -float(rank))
    return scores


def check(tok_path: Path) -> None:
    """Fail early and cheaply, before any model or tokenizer loads, on a tokenizer we cannot write."""
    if not tok_path.exists():
        raise ValueError(f"{tok_path} is missing; use llama.cpp's convert_hf_to_gguf.py on the HF folder instead")
    _pre_tokenizer_name(json.loads(tok_path.read_text(encoding="utf-8")), tok_path)


def add_tokenizer(w: GGUFWriter, folder: Path, config: dict[str, Any], n_vocab: int) -> None:
    """Write the tokenizer of `folder` into `w`, with `n_vocab` entries (the embedding's row count)."""
    from transformers import AutoTokenizer  # heavy import, only needed here

    # Read the pipeline transformers actually builds, not tokenizer.json verbatim: in transformers 5
    # some tokenizer classes (Qwen2Tokenizer, LlamaTokenizer) replace the file's normalizer and
    # pre-tokenizer, and the GGUF must tokenize like the model was trained.
    tok_path = folder / "tokenizer.json"
    check(tok_path)
    tok = AutoTokenizer.from_pretrained(folder)
    tok_json = json.loads(tok.backend_tokenizer.to_str())
    pre = _pre_tokenizer_name(tok_json, tok_path)
    spm = pre == "llama"

    by_id = {i: t for t, i in tok_json["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    # tokenizers >= 0.20 stores merges as [left, right] pairs, older versions as "left right".
    raw_merges = tok_json["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    scores = _merge_scores(raw_merges) if spm else {}
    unk = tok_json["model"].get("unk_token") or tok.unk_token
    if spm and (tok_json.get("pre_tokenizer") or {}).get("type") == "Metaspace":
        # llama.cpp, like SentencePiece, puts "▁" before every run of text that starts the input or
        # follows a special token, even one that starts with a space. Metaspace adds none before a
        # leading space, and with prepend_scheme "first" (transformers' LlamaTokenizer, legacy=False:
        # Mistral) none after a special token, so those few tokens differ from transformers'.
        log.info("%s: llama.cpp adds '▁' after special tokens and before a leading space; this "
                 "Metaspace tokenizer may not", tok_path)
    # The embedding may have more rows than the tokenizer has tokens (padded for speed); llama.cpp
    # needs one entry per row, so fill the gap with unused placeholders as convert_hf_to_gguf does.
    tokens, types, token_scores = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(text)
            if spm and text == unk:  # as SentencePiece marks it; llama.cpp emits it for nothing
                types.append(TokenType.UNKNOWN)
            elif i in added:
                types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
            elif spm and _BYTE_TOKEN.fullmatch(text):
                types.append(TokenType.BYTE)
            else:
                types.append(TokenType.NORMAL)
        token_scores.append(scores.get(tokens[-1], 0.0) if types[-1] == TokenType.NORMAL else 0.0)

    if spm:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(token_scores)
        w.add_token_types(types)
        w.add_add_space_prefix(bool(_spm_space_prefix(tok_json)))
    else:
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
