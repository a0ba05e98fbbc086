"""Pretrain the lab model: a byte-level BPE tokenizer and a tiny Llama trained from scratch on the
lab corpus, on CPU, deterministic per seed.

Reads the lab world (`world.py`), the lab constitution and the pipeline's prompt builders (through
`corpus.py`). Writes an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer
files with the ChatML template of `cai_lite.tiny`, generation_config.json) plus `lab_world.json`
(the world, for the oracle), `prompts/*.jsonl` (the world's training and held-out requests,
which the lab recipe reads) and `lab_pretrain.json` (content hash, sizes, loss, seconds). Builds are
cached by content hash under `$CAI_LITE_CACHE/lab/`, else `$XDG_CACHE_HOME/cai_lite/lab/`, else
`~/.cache/cai_lite/lab/`, and copied to a requested folder. The hash covers the prompts as the
stages render them (a changed template or principle retrains), the world, the sizes, the seed, this
package's code and the library versions; a later call with the same inputs returns at once.

    python -m cai_lite.lab.pretrain --seed 0 --size default      # prints the folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from cai_lite import constitution as C
from cai_lite.lab import corpus
from cai_lite.lab import world as W
from cai_lite.tiny import train_tokenizer

log = logging.getLogger(__name__)
# default: the lab of `python run.py`, about 3.5 minutes on 2 cores. ci: for tests, well under a minute.
# Widths are multiples of 64 so NF4 blocks tile every weight. per_doc: average the loss per document
# (else per target token, which measured better: answers' content tokens bind requests to their
# steps); letter_weight: weight of a judge document's one target, its letter (measured on seed 0:
# judge accuracy in both orders 0.72 at 1, 0.89 at 10). docs=24000 and letter_weight=20, against
# 12000 or 18000 and 10 (3 seeds each, the lab recipe): PPO's held-out harmful rate 0.05 against
# 0.07, and the SFT model keeps the base's benign helpfulness; the judge's agreement with the
# oracle moved less (0.87 -> 0.89). Giving comparisons half the corpus instead did not help.
SIZES = {
    "default": dict(vocab=2048, hidden=128, layers=4, heads=4, ffn=384, docs=24000, row=256, rows=8, lr=4e-3, warmup=30,
                    per_doc=False, letter_weight=20.0),
    "ci": dict(vocab=1024, hidden=128, layers=2, heads=4, ffn=384, docs=4000, row=256, rows=8, lr=5e-3, warmup=20,
               per_doc=False, letter_weight=10.0),
}
_SOURCES = ("parts.py", "world.py", "corpus.py", "pretrain.py")


def cache_root() -> Path:
    if os.environ.get("CAI_LITE_CACHE"):
        return Path(os.environ["CAI_LITE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cai_lite"


def _plain(text: str) -> str:
    return re.sub(r"<\|im_(start|end)\|>", "\n", text)  # special tokens are not merged into words


def content_hash(world: W.World, const: C.Constitution, size: str, seed: int) -> str:
    """Everything the trained weights depend on, with the prompts as the stages render them."""
    probe = corpus.build(world, const, train_tokenizer(300), 64, seed)  # every kind of document, rendered
    h = hashlib.sha256()
    for part in (json.dumps(SIZES[size], sort_keys=True), str(seed), world.to_json(),
                 *(d.text for d in probe), torch.__version__, transformers.__version__, tokenizers.__version__,
                 *((Path(__file__).parent / f).read_text(encoding="utf-8") for f in _SOURCES)):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def expected_hash(seed: int, size: str, constitution: str = "lab") -> str:
    """The content hash `build_lab_model` gives these arguments, without building anything."""
    return content_hash(W.make_world(seed), C.load(constitution), size, seed)


def build_lab_model(path: str | Path | None = None, seed: int = 0, size: str = "default",
                    constitution: str = "lab") -> Path:
    """The lab model folder: trained into the cache unless a build with the same content hash is
    there, then copied to `path` when one is given (a small folder, a few MB)."""
    if size not in SIZES:
        raise ValueError(f"lab model size must be one of {sorted(SIZES)} (got {size!r})")
    if path is not None and Path(path).exists() and not (Path(path) / "lab_pretrain.json").is_file():
        raise ValueError(f"base.model: {path} exists and is not a lab model folder (no lab_pretrain.json); "
                         "cai_lite will not overwrite it: move it, or point base.model at another folder")
    world, const = W.make_world(seed), C.load(constitution)
    digest = content_hash(world, const, size, seed)
    cached = cache_root() / "lab" / f"{size}-{digest}"
    if not _built(cached, digest):
        log.info("pretraining the %s lab model for seed %d (once; then cached at %s)", size, seed, cached)
        tmp = _fresh(cached)
        stats = _pretrain(world, const, SIZES[size], seed, tmp)
        W.write(world, tmp / "lab_world.json")
        W.write_prompts(world, tmp / "prompts")
        (tmp / "lab_pretrain.json").write_text(json.dumps({"hash": digest, "seed": seed, "size": size,
                                                           "constitution": const.source, **SIZES[size], **stats}, indent=1))
        _publish(tmp, cached)
        log.info("lab model trained in %.0f s, cached at %s", stats["seconds"], cached)
    if path is None:
        return cached
    path = Path(path)
    if not _built(path, digest):
        log.info("lab model %s -> %s", cached, path)
        tmp = _fresh(path)
        shutil.copytree(cached, tmp)
        _publish(tmp, path)
    return path


def _built(folder: Path, digest: str) -> bool:
    meta = folder / "lab_pretrain.json"
    return meta.is_file() and json.loads(meta.read_text())["hash"] == digest


def _fresh(final: Path) -> Path:
    """A temporary sibling of `final`: written fully, then renamed, so a crash never leaves half a model."""
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)  # a stale build with another hash
    try:
        tmp.rename(final)
    except OSError:  # another process published the same build first
        shutil.rmtree(tmp, ignore_errors=True)


def _packed_batches(ids: list[list[int]], masks: list[list[int]], s: dict, rng: random.Random, pad: int) -> list[dict]:
    """Documents in a seeded order, packed into rows of at most `row` tokens, `rows` rows a batch.
    Each document keeps its own positions (from 0) and sees only itself (a block-diagonal causal
    mask), exactly as if it were alone, so no compute goes to padding and every batch mixes kinds
    of document. Each document weighs the same in the loss, whatever its length: a comparison's
    one decisive letter counts as much as a chat answer (CE is averaged per document, then over
    the batch)."""
    order = list(range(len(ids)))
    rng.shuffle(order)
    rows, row, used = [], [], 0
    for i in order:
        if row and used + len(ids[i]) > s["row"]:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += len(ids[i])
    rows.append(row)
    batches = []
    for b in range(0, len(rows), s["rows"]):
        group = rows[b:b + s["rows"]]
        width = max(sum(len(ids[i]) for i in r) for r in group)
        x = torch.full((len(group), width), pad)  # (B, T)
        pos = torch.zeros((len(group), width), dtype=torch.long)  # (B, T): restart at each document
        seg = -torch.arange(1, width + 1).repeat(len(group), 1)  # (B, T): document id; padding: its own
        y = torch.full((len(group), width), -100)  # (B, T): the next token where it is a target
        w = torch.zeros((len(group), width))  # (B, T): 1 / (targets of the document)
        for r, docs in enumerate(group):
            at = 0
            for i in docs:
                n, m = len(ids[i]), torch.tensor(masks[i][1:]).bool()
                x[r, at:at + n] = torch.tensor(ids[i])
                pos[r, at:at + n] = torch.arange(n)
                seg[r, at:at + n] = i
                y[r, at:at + n - 1] = torch.where(m, torch.tensor(ids[i][1:]), -100)
                targets = int(m.sum())
                # A judge document's one target is its letter: weighted up, or the few hundred tokens
                # of every answer drown the one token the judge is read by.
                w[r, at:at + n - 1] = m.float() * (s.get("letter_weight", 1.0) if targets == 1 else 1.0) / (
                    max(1, targets) if s.get("per_doc", True) else 1)
                at += n
        norm = sum(len(r) for r in group) if s.get("per_doc", True) else max(1.0, float(w.sum()))
        batches.append({"x": x, "pos": pos, "seg": seg, "y": y, "w": w, "docs": norm})
    return batches


def _block_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) additive mask: causal, and only within a document."""
    causal = torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool).tril()  # (T, T)
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, T, T)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def _tokenize(tok, docs: list[corpus.Doc]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each document and a 0/1 mask of the tokens inside its target spans."""
    enc = tok([d.text for d in docs], add_special_tokens=False, return_offsets_mapping=True)
    masks = []
    for d, offsets in zip(docs, enc["offset_mapping"]):
        masks.append([int(any(a <= s < b for a, b in d.spans)) for s, _ in offsets])
    return enc["input_ids"], masks


def _pretrain(world: W.World, const: C.Constitution, s: dict, seed: int, out: Path) -> dict:
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))  # the budget is 2 cores; more threads only contend
    try:
        docs = corpus.build(world, const, train_tokenizer(300), s["docs"], seed)
        tok = train_tokenizer(s["vocab"], [_plain(d.text) for d in docs[:3000]])
        ids, masks = _tokenize(tok, docs)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], num_key_value_heads=s["heads"], max_position_embeddings=2048,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, initializer_range=0.02))
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=s["lr"], betas=(0.9, 0.95), fused=True)
        batches = _packed_batches(ids, masks, s, random.Random(f"lab-batches:{seed}"), tok.pad_token_id)
        steps = len(batches)
        losses, tokens = [], 0
        model.train()
        bar = tqdm(batches, desc="lab pretrain")
        for step, b in enumerate(bar):
            # Linear warmup, then cosine decay to a tenth of the peak.
            frac = step / max(1, steps - 1)
            lr = s["lr"] * min(1.0, (step + 1) / s["warmup"]) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            h = model.model(input_ids=b["x"], position_ids=b["pos"], attention_mask=_block_mask(b["seg"])).last_hidden_state
            sel = b["y"] != -100  # (B, T): only target positions go through the LM head
            ce = torch.nn.functional.cross_entropy(model.lm_head(h[sel]), b["y"][sel], reduction="none")  # (N,)
            loss = (ce * b["w"][sel]).sum() / b["docs"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += int(b["x"].numel())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        model.eval()
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = None
        model.save_pretrained(out)
        tok.save_pretrained(out)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    return {"params": sum(p.numel() for p in model.parameters()), "steps": steps, "tokens": tokens,
            "loss_first": round(sum(losses[:20]) / len(losses[:20]), 4),
            "loss_last": round(sum(losses[-20:]) / len(losses[-20:]), 4), "seconds": round(seconds, 1),
            "docs_by_kind": {k: sum(d.kind == k for d in docs) for k in corpus.MIX}}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--out", default=None, help="folder to write (default: the cache)")
    a = ap.parse_args()
    print(build_lab_model(a.out, a.seed, a.size))
