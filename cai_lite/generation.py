"""Batched sampling on the shared base with whichever adapter a role names.

Reads rendered prompt strings; returns the generated text (special tokens removed) and whether
each sequence ended with EOS. Prompts longer than `generation.max_prompt_tokens` are cut from the
left after their BOS, so the most recent text (the question) survives (data.cut_left); the count
is returned. `sample()` is what the generating stages call: `generate()` here, or with
`generation.backend=openai` the same prompts sent to a server (generation_http.py).

    python -c "from cai_lite.recipe import load_config; from cai_lite import models, generation; \
               cfg = load_config([]); b = models.load_base(cfg); print(generation.generate(b, ['Hello'], None, cfg.generation))"
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from cai_lite import data, decode, generation_http, models
from cai_lite.config import GenerationSettings
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)


@dataclass
class Generated:
    texts: list[str]
    ended: list[bool]  # True where the model emitted EOS before the token cap
    truncated: list[bool]  # True where the prompt was cut to generation.max_prompt_tokens
    new_tokens: list[int] = field(default_factory=list)  # tokens generated per row, EOS included
    stats: decode.Stats | None = None  # what the loop computed (None from a server)


def tokenize_left(base: SharedBase, texts: list[str], max_tokens: int) -> tuple[dict, list[bool]]:
    """Left-padded batch, each prompt cut from the left as data.cut_left cuts it; also which were cut."""
    tok = base.tokenizer
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    cut = [len(x) > max_tokens for x in ids]
    ids = [data.cut_left(tok, x, max_tokens) for x in ids]
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=base.device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=base.device)
    return {"input_ids": input_ids, "attention_mask": mask}, cut


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate()` computes them.  (B, T) -> (B, T)

    A plain forward numbers positions 0..T-1 regardless of padding, so without these a left-padded
    row would be scored at other positions than it was sampled at."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def row_seeds(n: int) -> list[int]:
    """One seed per row, from torch's global generator (which each stage seeds per shard), in prompt
    order: what makes a resumed shard sample the same rows however they are batched (decode.py)."""
    return torch.randint(2**62, (n,)).tolist()


def sampling_settings(model, temperature: float, top_p: float) -> decode.Sampling:
    """Our temperature and top_p over the model's generation_config, named in a warning where it sets
    something the loop does not apply."""
    gc = getattr(model, "generation_config", None)
    skipped = [k for k, default in decode.IGNORED_DEFAULTS.items() if getattr(gc, k, default) not in (default, None)]
    if skipped and temperature > 0 and id(gc) not in _WARNED:
        _WARNED.add(id(gc))
        log.warning("the model's generation_config sets %s, which cai_lite's sampling loop does not apply "
                    "(it applies temperature, top_p, %s)", ", ".join(skipped), ", ".join(decode.APPLIED))
    return decode.Sampling.merged(gc, temperature, top_p)


_WARNED: set[int] = set()


def generate(base: SharedBase, prompts: list[str], adapter: str | None, g: GenerationSettings,
             max_new_tokens: int | None = None, temperature: float | None = None, desc: str = "generate") -> Generated:
    """Sample one completion per prompt with adapter `adapter` (None = bare base), `g.batch_size` rows
    in flight, longest prompts first, finished rows refilled (decode.py); answers in prompt order.
    Settings not in `generation` (top_k, repetition_penalty, ...) are the model's own generation_config."""
    if not isinstance(g.batch_size, int):
        raise ValueError(f"generation.batch_size={g.batch_size!r}: pipeline.resolve_auto(cfg) turns auto into a "
                         "number before a stage runs")
    tok = base.tokenizer
    temperature = g.temperature if temperature is None else temperature
    ids = tok(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    cut = [len(x) > g.max_prompt_tokens for x in ids]
    ids = [data.cut_left(tok, x, g.max_prompt_tokens) for x in ids]
    seeds = row_seeds(len(ids)) if temperature > 0 else None
    eos = models.eos_ids(base)
    with models.role(base, adapter) as model:
        rows, stats = decode.decode(model, ids, max_new_tokens=max_new_tokens or g.max_new_tokens, eos=eos,
                                    pad=tok.pad_token_id, slots=g.batch_size,
                                    sampling=sampling_settings(model, temperature, g.top_p), seeds=seeds,
                                    device=base.device, desc=desc)
    ended = [bool(r) and r[-1] in eos for r in rows]
    texts = [tok.decode(r[:-1] if e else r, skip_special_tokens=True).strip() for r, e in zip(rows, ended)]
    return Generated(texts, ended, cut, [len(r) for r in rows], stats)


def sample(base: SharedBase, prompts: list[str], adapter: str | None, g: GenerationSettings,
           max_new_tokens: int | None = None, temperature: float | None = None, desc: str = "generate") -> Generated:
    """`generate()` on `generation.backend`: in-process, or the server's model for role `adapter`."""
    if g.backend == "local":
        return generate(base, prompts, adapter, g, max_new_tokens=max_new_tokens, temperature=temperature, desc=desc)
    if not prompts:  # a shard of helpful prompts only has nothing to critique
        return Generated([], [], [])
    texts, cut, counts = generation_http.prompt_texts(base.tokenizer, prompts, g.max_prompt_tokens)
    # Drawn from the generator the stage seeded for this shard, so a resumed shard sends the same seeds.
    seed = int(torch.randint(2**31 - 1, (1,)))
    out, ended = generation_http.complete(g, texts, counts, adapter, max_new_tokens or g.max_new_tokens,
                                          g.temperature if temperature is None else temperature, seed, desc)
    return Generated(out, ended, cut)
