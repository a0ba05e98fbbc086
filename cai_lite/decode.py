"""The sampling loop behind generation.generate and rollout.sample: continuous batching on one model.

Reads token-id prompts; returns each prompt's generated ids (ending with the EOS id where the model
ended) in prompt order, with counts of what the loop computed. Nothing is read from or written to disk.

How it differs from `model.generate` over fixed batches:
- **Length-aware order.** Prompts enter longest first, so each prefill pads little and the batch's
  memory peak comes at the start, where a too-large batch fails at once.
- **Refill.** Up to `slots` rows are in flight. A row leaves when it emits EOS or reaches its cap, and
  waiting prompts take the free slots: they are prefilled on their own and their KV cache is joined to
  the running one, left-padded to a common length. Columns that only padding uses are trimmed, so the
  cache never outgrows the longest live row (what planner.sampling() assumes).
- **Shared prefix.** Prompts prefilled together compute their common opening once (critique and
  revision prompts all open with the constitution's demonstration), as vLLM's prefix caching would.
- **One random stream per row.** Row i draws its uniforms from its own CPU generator seeded with
  `seeds[i]`, and samples by inverse CDF. A row's text then depends on its prompt and seed only, not
  on which rows share its batch, on `slots`, or on the device's generator, so a resumed or re-batched
  shard gives the same rows (up to floating-point differences between batch shapes, which can flip a
  near-tie). Greedy decoding (temperature 0) draws nothing and equals `model.generate`'s greedy output.

Why not transformers' own continuous batching (`generate_batch`, paged attention)? It runs on an NF4
base with PEFT adapters, and its greedy output equals ours, but it samples from one generator shared by
whatever is scheduled together, so a row's text changes with the batch it lands in (checked: the first
16 of 32 prompts alone gave other rows), which breaks exact resume under `batch_size=auto`; and on CPU
it ran 8x slower than one-by-one `generate` on a tiny model (a background thread and paged-cache setup).

    python -c "import cai_lite.decode as d; help(d.decode)"
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import (DynamicCache, LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

# Sampling settings a model's generation_config may carry that this loop applies; any other one set to a
# non-default value is named in a warning (generation.generate), not silently dropped.
APPLIED = ("top_k", "min_p", "typical_p", "repetition_penalty")
MIN_SHARED = 16  # a shorter common prefix (the chat template's opening) is not worth a forward of its own
IGNORED_DEFAULTS = {"no_repeat_ngram_size": 0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None,
                    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                    "exponential_decay_length_penalty": None, "min_new_tokens": None, "min_length": 0}


@dataclass
class Sampling:
    """How the next token is chosen, in the order transformers' generate applies these (utils.py
    _get_logits_processor): repetition penalty, then temperature, top-k, top-p, min-p, typical-p."""

    temperature: float  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float | None = None
    typical_p: float = 1.0
    repetition_penalty: float = 1.0

    @classmethod
    def merged(cls, generation_config, temperature: float, top_p: float) -> Sampling:
        """Ours for temperature and top_p; the rest from the model's generation_config, else
        transformers' global defaults (top_k 50), as `model.generate(temperature=, top_p=)` merges them."""
        gc = generation_config
        pick = lambda name, default: default if getattr(gc, name, None) is None else getattr(gc, name)  # noqa: E731
        return cls(temperature, top_p, pick("top_k", 50), pick("min_p", None), pick("typical_p", 1.0),
                   pick("repetition_penalty", 1.0))

    def processors(self) -> LogitsProcessorList:
        if self.temperature <= 0:
            return LogitsProcessorList()  # greedy: generate() applies no warper (only the penalty, separately)
        out = LogitsProcessorList()
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            out.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(self.top_p))
        if self.min_p is not None:
            out.append(MinPLogitsWarper(self.min_p))
        if self.typical_p < 1.0:
            out.append(TypicalLogitsWarper(self.typical_p))
        return out


@dataclass
class Stats:
    """What the loop computed, in token positions: `useful` are the generated tokens kept (EOS included);
    `decode` the rows x steps of the one-token forwards; `prefill` the padded prompt positions of the
    prefills, of which `prompt` were real."""

    useful: int = 0
    decode: int = 0
    prefill: int = 0
    prompt: int = 0
    forwards: int = 0
    peak_rows: int = 0
    lengths: list[int] = field(default_factory=list)

    def wasted_share(self) -> float:
        """Share of the decode positions that kept no token (finished rows and padding). A row's first
        token comes from its prefill, so the decode forwards made `useful - rows` of them."""
        return 1 - (self.useful - len(self.lengths)) / self.decode if self.decode else 0.0


@torch.no_grad()
def decode(model, prompts: list[list[int]], *, max_new_tokens: int, eos: list[int], pad: int, slots: int,
           sampling: Sampling, seeds: list[int] | None, device: torch.device, desc: str = "generate",
           progress: bool = True, share_prefix: bool = True) -> tuple[list[list[int]], Stats]:
    """Generate for every prompt (token ids, BOS included where the template puts one) with `model`
    as it is (its active adapter, its train/eval mode), at most `slots` rows at a time. With
    `share_prefix`, prompts prefilled together compute their common leading tokens once.
    -> generated ids per prompt (the EOS id last where the row ended), Stats"""
    if sampling.temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    n = len(prompts)
    out: list[list[int]] = [[] for _ in range(n)]
    stats = Stats()
    if n == 0:
        return out, stats
    longest = max(len(p) for p in prompts) + max_new_tokens
    warp = sampling.processors()
    penalty = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty) if sampling.repetition_penalty != 1.0 else None
    # Longest first (a stable sort, so equal lengths keep prompt order).
    waiting = sorted(range(n), key=lambda i: -len(prompts[i]))[::-1]  # popped from the end
    rows: list[int] = []  # prompt index of each live row
    uniforms: dict[int, torch.Tensor] = {}
    cache, mask, last = None, None, None  # DynamicCache, (B, T) long, (B,) next input token
    bar = tqdm(total=n, desc=desc, leave=False, disable=not progress or n <= slots)
    while rows or waiting:
        free = slots - len(rows)
        # Refill once a quarter of the slots are free: a prefill is one more forward, so refilling for
        # every single finished row would cost a step each time (or when nothing is left in flight).
        if waiting and (free >= max(1, slots // 4) or not rows):
            new = [waiting.pop() for _ in range(min(free, len(waiting)))]
            if sampling.temperature > 0:
                for i in new:  # the row's whole stream up front: one uniform per generated token
                    uniforms[i] = torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(seeds[i]),
                                             dtype=torch.float64)
            logits, new_cache, new_mask = _prefill(model, [prompts[i] for i in new], pad, device, stats,
                                                   share_prefix)
            _check_window(new_cache, longest)
            tokens = _choose(logits, new, out, prompts, uniforms, warp, penalty, device)
            cache, mask = _join(cache, mask, new_cache, new_mask)
            rows, last = rows + new, tokens if last is None else torch.cat([last, tokens])
        else:
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)  # (B, T+1)
            position = mask.sum(1, keepdim=True) - 1  # (B, 1): real tokens before this one
            logits = model(input_ids=last[:, None], attention_mask=mask, position_ids=position, cache=cache,
                           use_cache=True).logits[:, -1, :]
            stats.decode += len(rows)
            stats.forwards += 1
            last = _choose(logits, rows, out, prompts, uniforms, warp, penalty, device)
        stats.peak_rows = max(stats.peak_rows, len(rows))
        done = {k for k, i in enumerate(rows) if out[i][-1] in eos or len(out[i]) >= max_new_tokens}
        if done:
            keep = [k for k in range(len(rows)) if k not in done]
            for k in done:
                uniforms.pop(rows[k], None)
            bar.update(len(done))
            rows = [rows[k] for k in keep]
            if not rows:
                cache, mask, last = None, None, None
                continue
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, last = mask[index], last[index]
            cache, mask = _trim(cache, mask)
    bar.close()
    stats.lengths = [len(x) for x in out]
    stats.useful = sum(stats.lengths)
    return out, stats


def _prefill(model, prompts: list[list[int]], pad: int, device, stats: Stats, share_prefix: bool):
    """Forward of new prompts into a fresh cache.  -> last logits (b, V), cache, mask (b, P)

    Critique and revision prompts open with the same few-shot demonstration, most of their length:
    with `share_prefix` the tokens every prompt here begins with are computed once (batch 1) and
    copied to each row, as vLLM's prefix caching would; the rest is left-padded after them, so a
    row's padding sits between the shared part and its own (the mask hides it wherever it is)."""
    shared = _common_prefix(prompts) if share_prefix and len(prompts) > 1 else 0
    shared = min(shared, min(len(p) for p in prompts) - 1)  # each row keeps a token of its own to predict from
    shared = shared if shared >= MIN_SHARED else 0
    cache = DynamicCache(config=model.config)
    if shared:
        model(input_ids=torch.tensor([prompts[0][:shared]], device=device), cache=cache, use_cache=True,
              logits_to_keep=1)
        cache.batch_repeat_interleave(len(prompts))
        stats.prefill += shared
        stats.forwards += 1
    rest = [p[shared:] for p in prompts]
    width = max(len(r) for r in rest)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rest], device=device)  # (b, S)
    own = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=device)  # (b, S)
    mask = torch.cat([own.new_ones(len(rest), shared), own], 1)  # (b, shared + S)
    position = shared + (own.cumsum(1) - 1).clamp(min=0)  # skip padding, as generate() does
    # logits_to_keep=1: the vocabulary-sized logits of the last position only, as generate() asks.
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1, :]
    stats.prefill += ids.numel()
    stats.prompt += sum(len(p) for p in prompts)
    stats.forwards += 1
    return logits, cache, mask


def _common_prefix(prompts: list[list[int]]) -> int:
    first, n = prompts[0], min(len(p) for p in prompts)
    for k in range(n):
        if any(p[k] != first[k] for p in prompts):
            return k
    return n


def _choose(logits: torch.Tensor, rows: list[int], out: list[list[int]], prompts: list[list[int]],
            uniforms: dict[int, torch.Tensor], warp: LogitsProcessorList, penalty, device) -> torch.Tensor:
    """Next token of each live row, appended to `out`.  logits (B, V) -> tokens (B,)"""
    scores = logits.float()
    if penalty is not None:  # over each row's real tokens, prompt included, as generate() penalises them
        seqs = [prompts[i] + out[i] for i in rows]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[s[0]] * (width - len(s)) + s for s in seqs], device=device)  # pads repeat a real id
        scores = penalty(ids, scores)
    if not uniforms:  # greedy
        tokens = scores.argmax(-1)
    else:
        scores = warp(None, scores)  # the warpers read scores only
        cdf = torch.softmax(scores, -1, dtype=torch.float64).cumsum(-1)  # (B, V)
        u = torch.stack([uniforms[i][len(out[i])] for i in rows]).to(device)  # (B,)
        # The first token whose cumulative probability exceeds u: never one the warpers removed.
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
    for i, t in zip(rows, tokens.tolist()):
        out[i].append(t)
    return tokens


def _layers(cache: DynamicCache):
    return [layer for layer in cache.layers if layer.keys is not None and layer.keys.numel()]


def _check_window(cache: DynamicCache, longest: int) -> None:
    """A sliding-window layer (Mistral: 4096) drops its oldest columns once full, and the rows' columns
    would no longer line up with the mask: refuse sequences that could get there."""
    for layer in _layers(cache):
        if getattr(layer, "is_sliding", False) and longest >= layer.sliding_window - 1:
            raise NotImplementedError(f"prompt + answer ({longest} tokens) reach the model's sliding window "
                                      f"({layer.sliding_window}); lower generation.max_prompt_tokens or the answer length")


def _resized(cache: DynamicCache) -> None:
    """A sliding-window layer counts the positions it has seen: after a join or trim, the cache's width."""
    for layer in _layers(cache):
        if getattr(layer, "is_sliding", False):
            layer.cumulative_length = layer.keys.shape[2]


def _join(cache, mask, new_cache, new_mask):
    """Rows of two caches as one batch, each left-padded (zeros, masked) to the longer length."""
    if cache is None:
        return new_cache, new_mask
    width = max(mask.shape[1], new_mask.shape[1])

    def left(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim)

    for a, b in zip(_layers(cache), _layers(new_cache)):
        a.keys = torch.cat([left(a.keys, 2), left(b.keys, 2)])  # (B+b, H, T, D)
        a.values = torch.cat([left(a.values, 2), left(b.values, 2)])
    _resized(cache)
    return cache, torch.cat([left(mask, 1), left(new_mask, 1)])


def _trim(cache, mask):
    """Drop leading columns no live row uses (left by rows that have left)."""
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else 0
    if start:
        for layer in _layers(cache):
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        mask = mask[:, start:]
        _resized(cache)
    return cache, mask
