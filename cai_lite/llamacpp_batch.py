"""Last-position logits of many prompts from llama.cpp, in multi-sequence batches that share prefixes.

The prompts of one judging call share long token prefixes: the few-shot demos (all prompts), the
conversation (every principle of a comparison), conversation and principle (both option orders).
Evaluated one prompt at a time with KV reuse, each decode call holds a short suffix, and such small
calls leave a CPU's matrix kernels idle. Here the prompts of a *wave* form a prefix tree that goes
to llama.cpp as one batch: each tree token carries the id of every prompt (sequence) whose tokens
pass through it, so it is computed once and, in the unified KV cache, attended to by all of them;
logits are requested at each prompt's last token only. The wave's common prefix is also tagged with
sequence 0, which persists across waves and calls, so the demos are decoded once, not once a wave.

Reads token lists and a llama.cpp context (created with n_seq_max > 1 and a unified KV cache, see
judge_llamacpp.load_gguf); writes nothing. Used by judge_llamacpp.LlamaCppJudge; tested in
tests/test_judge_batch.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

log = logging.getLogger(__name__)


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def waves(prompts: list[list[int]], cells: int, max_prompts: int) -> Iterator[list[int]]:
    """Indices of `prompts`, in order, cut into waves whose prefix tree fits in `cells` KV cells
    and holds at most `max_prompts` prompts. A wave's size is over-estimated as the sum of each
    prompt's tokens beyond its common prefix with the previous one (never under: the tree shares
    at least that much), so a wave never runs out of cells. Every prompt must be < `cells` long."""
    wave: list[int] = []
    size = 0
    for i, tokens in enumerate(prompts):
        add = len(tokens) - (common_prefix(prompts[wave[-1]], tokens) if wave else 0)
        if wave and (size + add > cells or len(wave) >= max_prompts):
            yield wave
            wave, add = [], len(tokens)
            size = 0
        wave.append(i)
        size += add
    if wave:
        yield wave


class PrefixDecoder:
    """Decodes waves of prompts on one llama.cpp context; sequence 0 keeps the last wave's common prefix."""

    def __init__(self, ctx, n_vocab: int, n_batch: int, n_seqs: int):
        import llama_cpp

        self.lib, self.ctx, self.n_vocab, self.n_batch = llama_cpp, ctx, n_vocab, n_batch
        self.n_seqs = n_seqs  # sequence ids 1..n_seqs-1 hold prompts, 0 the shared prefix
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seqs)
        self.root: list[int] = []  # the tokens sequence 0 holds in the KV cache
        self.evaluated_tokens = 0  # tokens run through the model (shared prefixes count once)

    def forget(self) -> None:
        """Drop the whole KV cache (someone else, e.g. generation, is about to use the context)."""
        self.lib.llama_memory_clear(self.mem, True)
        self.root = []

    def wave(self, prompts: list[list[int]], reuse: bool = True) -> list[np.ndarray]:
        """The next-token logits after each prompt (float32, a copy), all decoded in one prefix tree.
        `reuse=False` ignores what sequence 0 holds (every token is evaluated). Raises RuntimeError
        when llama.cpp fails to decode (e.g. no KV cells left). On any exception (that, a
        KeyboardInterrupt, ...) the cache is cleared: a wave stopped part-way has written its own
        tokens into sequence 0's cells, which `root` would otherwise still describe as the old ones."""
        uniq = sorted({tuple(p) for p in prompts})  # identical prompts share one sequence
        if len(uniq) >= self.n_seqs:
            raise ValueError(f"a wave of {len(uniq)} prompts needs more than the context's {self.n_seqs} sequences")
        adj = [common_prefix(uniq[j], uniq[j + 1]) for j in range(len(uniq) - 1)]
        # The wave's common prefix, leaving each prompt at least one token to decode (its logits).
        top = min([len(u) - 1 for u in uniq] + adj)
        keep = common_prefix(self.root, uniq[0][:top]) if reuse else 0
        self.lib.llama_memory_seq_rm(self.mem, 0, keep, -1)
        rows: dict[tuple, np.ndarray] = {}
        try:
            for j in range(len(uniq)):
                self.lib.llama_memory_seq_cp(self.mem, 0, j + 1, -1, -1)  # the cached prefix, shared, not copied
            self._decode_tree(uniq, adj, keep, top, rows)
        except BaseException:
            self.forget()
            raise
        finally:
            for j in range(len(uniq)):
                self.lib.llama_memory_seq_rm(self.mem, j + 1, -1, -1)  # frees the cells sequence 0 does not hold
        self.root = list(uniq[0][:top])
        return [rows[tuple(p)] for p in prompts]

    def _decode_tree(self, uniq: list[tuple], adj: list[int], keep: int, top: int, rows: dict) -> None:
        # In lexicographic order, prompt j owns its tokens beyond its common prefix with prompt j-1;
        # the token at position p is shared by prompts j..m, those whose common prefixes with their
        # neighbours all exceed p. Positions of each sequence then rise through the batch, as
        # llama.cpp requires, and each sequence sees exactly its own prompt's path.
        pending: list[tuple] = []  # (token, pos, seq ids, output of prompt j or -1)
        for j, u in enumerate(uniq):
            start = max(keep, adj[j - 1] if j else 0)
            reach = []  # reach[k]: the common prefix shared by prompts j..j+k+1
            low = len(u)
            for a in adj[j:]:
                low = min(low, a)
                if low <= start:
                    break
                reach.append(low)
            for p in range(start, len(u)):
                seqs = [j + 1] + [j + 2 + k for k, r in enumerate(reach) if r > p]
                if p < top:
                    seqs.append(0)  # the wave's common prefix stays in sequence 0 for the next wave
                pending.append((u[p], p, seqs, j if p == len(u) - 1 else -1))
        for at in range(0, len(pending), self.n_batch):
            self._decode(pending[at: at + self.n_batch], uniq, rows)

    def _decode(self, chunk: list[tuple], uniq: list[tuple], rows: dict) -> None:
        b = self.batch
        for i, (token, pos, seqs, out) in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, len(seqs), out >= 0
            for k, s in enumerate(seqs):
                b.seq_id[i][k] = s
        b.n_tokens = len(chunk)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} on a batch of {len(chunk)} tokens (1: no free KV cells)")
        self.evaluated_tokens += len(chunk)
        for i, (_, _, _, out) in enumerate(chunk):
            if out >= 0:
                ptr = self.lib.llama_get_logits_ith(self.ctx, i)
                rows[uniq[out]] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
