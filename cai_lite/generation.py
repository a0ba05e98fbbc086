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

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from cai_lite import data, generation_http, models
from cai_lite.config import GenerationSettings
from cai_lite.models import SharedBase


@dataclass
class Generated:
    texts: list[str]
    ended: list[bool]  # True where the model emitted EOS before the token cap
    truncated: list[bool]  # True where the prompt was cut to generation.max_prompt_tokens


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


@torch.no_grad()
def generate(base: SharedBase, prompts: list[str], adapter: str | None, g: GenerationSettings,
             max_new_tokens: int | None = None, temperature: float | None = None, desc: str = "generate") -> Generated:
    """Sample one completion per prompt with adapter `adapter` (None = bare base). Settings not in
    `generation` (top_k, repetition_penalty, ...) are the model's own generation_config."""
    texts, ended, cut = [], [], []
    temperature = g.temperature if temperature is None else temperature
    eos = models.eos_ids(base)
    with models.role(base, adapter) as model:
        for start in tqdm(range(0, len(prompts), g.batch_size), desc=desc, leave=False, disable=len(prompts) <= g.batch_size):
            batch, batch_cut = tokenize_left(base, prompts[start:start + g.batch_size], g.max_prompt_tokens)
            cut += batch_cut
            sampling = dict(do_sample=True, temperature=temperature, top_p=g.top_p) if temperature > 0 else dict(do_sample=False)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens or g.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=base.tokenizer.pad_token_id,
                **sampling,
            )
            new = out[:, batch["input_ids"].shape[1]:]  # (B, T_new)
            for row in new:
                hit = torch.isin(row, torch.tensor(eos, device=row.device)).nonzero()
                ended.append(bool(len(hit)))
                row = row[: hit[0, 0]] if len(hit) else row
                texts.append(base.tokenizer.decode(row, skip_special_tokens=True).strip())
    return Generated(texts, ended, cut)


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
