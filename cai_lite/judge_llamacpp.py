"""The `llamacpp` judge: a GGUF model in llama-cpp-python on CPU, the cheap voter.

Scores the letters after the prefilled answer (the Judge protocol of judges.py) from last-position
logits: the prompts' prefix tree (demos, conversation, principle shared) goes to llama.cpp in
multi-sequence batches (llamacpp_batch.py). Also loads any GGUF file for the tests and benchmarks
(`load_gguf`), and finds why one is not loadable before any model loads (`gguf_problems`).

Reads the GGUF file (`judge.gguf_path`); writes nothing.

    python run.py recipe=tiny_cpu stages=[label_preferences] judge=llamacpp judge.gguf_path=judge.gguf
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cai_lite.config import JudgeConfig
from cai_lite.judges import ChoicePrompt, JudgeError, letter_ids

log = logging.getLogger(__name__)


def load_gguf(path: str, seqs: int = 1, **kwargs):
    """`llama_cpp.Llama` on a GGUF file, with llama.cpp's extra CPU buffer types off and, for
    `seqs` > 1, a context for that many sequences in one unified KV cache (llamacpp_batch.py).

    The extra buffer types repack quantized weights for the AMX and AVX512 kernels; on CPUs with AMX
    (Xeon Sapphire Rapids and later) llama.cpp's AMX matmul segfaults on q8_0 weights (seen on this
    project's CI machines; llama.cpp issue 20824), and the plain kernels compute the same thing.
    llama-cpp-python has no argument for `use_extra_bufts`, `n_seq_max` or `kv_unified`, so its
    default model and context parameters are swapped for the load."""
    import llama_cpp

    lib = llama_cpp.llama_cpp
    default_model, default_context = lib.llama_model_default_params, lib.llama_context_default_params

    def model_params():
        p = default_model()
        p.use_extra_bufts = False
        return p

    def context_params():
        p = default_context()
        if seqs > 1:
            p.n_seq_max, p.kv_unified = seqs, True  # unified: sequences share the cells of common prefixes
        return p

    lib.llama_model_default_params, lib.llama_context_default_params = model_params, context_params
    try:
        return llama_cpp.Llama(model_path=path, **kwargs)
    finally:
        lib.llama_model_default_params, lib.llama_context_default_params = default_model, default_context


# Sequences of the judge's llama.cpp context: 0 holds the shared prefix, the others one prompt of a
# wave each. 64 covers 15 comparisons x 2 principles x 2 orders; judge.n_ctx usually binds first.
JUDGE_SEQS = 64
JUDGE_BATCH = 2048  # tokens per llama.cpp graph run (n_batch = n_ubatch): 512 ran at 0.5x the tokens/s on 2 threads


class LlamaCppJudge:
    """A GGUF model in llama.cpp on CPU: the cheap voter. Prompts go in waves (in the order given)
    that fit judge.n_ctx KV cells; each wave is one prefix tree decoded in one multi-sequence batch,
    and the wave's common prefix stays cached for the next (llamacpp_batch.py)."""

    def __init__(self, jc: JudgeConfig, render_fallback):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from cai_lite.llamacpp_batch import PrefixDecoder

        if not Path(jc.gguf_path).is_file():
            raise JudgeError(f"judge.gguf_path: {jc.gguf_path!r}: file not found")
        # logits_all=False: llama.cpp then keeps logits for the requested positions only, not n_ctx x n_vocab
        # floats. Flash attention: its CPU kernel skips masked KV cells, so a token of one sequence does not
        # pay for the other sequences' cells in the shared cache (1.4x tokens/s on a wave, measured). Big
        # (u)batches: a wave is a few large graph runs, not many small ones with a thread barrier per op.
        n_batch = min(jc.n_ctx, JUDGE_BATCH)
        try:
            self.llm = load_gguf(jc.gguf_path, JUDGE_SEQS, n_ctx=jc.n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                 flash_attn=True, n_threads=jc.n_threads, n_threads_batch=jc.n_threads,
                                 logits_all=False, verbose=False, seed=0)
        except ValueError as e:  # llama.cpp returned NULL and says only "Failed to load model": find out why
            why = gguf_problems(jc.gguf_path) or [f"{jc.gguf_path}: llama.cpp cannot load it ({e}); is it a "
                                                  "GGUF file of a model architecture llama.cpp supports?"]
            raise JudgeError(f"judge.gguf_path: {why[0]}") from None
        self.name = f"llamacpp:{Path(jc.gguf_path).name}"
        self.hard_labels = 0
        template = self.llm.metadata.get("tokenizer.chat_template")
        eos = self.llm.detokenize([self.llm.token_eos()], special=True).decode("utf-8", "replace")
        self._format = Jinja2ChatFormatter(template, eos_token=eos, bos_token="") if template else None
        self._render_fallback = render_fallback
        self._bos = [self.llm.token_bos()] if self.llm.metadata.get("tokenizer.ggml.add_bos_token") == "true" else []
        self._decoder = PrefixDecoder(self.llm.ctx, self.llm.n_vocab(), self.llm.n_batch, JUDGE_SEQS)
        self.reuse_prefix = True  # False: every prompt from scratch (the benchmark's baseline)
        self.wave_prompts = JUDGE_SEQS - 1  # 1: one prompt at a time, each reusing the previous one's prefix

    @property
    def evaluated_tokens(self) -> int:
        """Tokens actually run through the model (prefix sharing and reuse save the rest)."""
        return self._decoder.evaluated_tokens

    def _render(self, p: ChoicePrompt) -> str:
        # The GGUF's own chat template, so a judge model other than the base is prompted in its format.
        if self._format is None:
            return self._render_fallback(p.messages, p.prefill)
        return self._format(messages=p.messages).prompt + p.prefill

    def _encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def tokens(self, p: ChoicePrompt) -> list[int]:
        """The prompt's tokens: the GGUF's BOS where it asks for one, once. The fallback renderer's
        template writes the BOS text itself (Llama-2/3); the GGUF's own is rendered without it."""
        tokens = self.llm.tokenize(self._render(p).encode("utf-8"), add_bos=False, special=True)
        return tokens if tokens[:1] == self._bos else self._bos + tokens

    def option_probs(self, prompts: list[ChoicePrompt], letters: str) -> list[list[float] | None]:
        from cai_lite.llamacpp_batch import waves

        by_prefill = {p.prefill: letter_ids(self._encode, p.prefill, letters) for p in prompts}
        n_ctx = self.llm.n_ctx()
        tokens = [self.tokens(p) for p in prompts]
        fits = [i for i, t in enumerate(tokens) if len(t) < n_ctx]
        if len(fits) < len(prompts):
            log.warning("%s: %d prompt(s) of %s tokens exceed judge.n_ctx=%d; recorded as failures", self.name,
                        len(prompts) - len(fits), sorted(len(t) for t in tokens if len(t) >= n_ctx), n_ctx)
        out: list[list[float] | None] = [None] * len(prompts)
        per_wave = self.wave_prompts if self.reuse_prefix else 1  # no reuse: no sharing within a wave either
        for wave in waves([tokens[i] for i in fits], n_ctx, per_wave):
            members = [fits[w] for w in wave]
            rows = self._decoder.wave([tokens[i] for i in members], self.reuse_prefix)
            for i, logits in zip(members, rows):
                ids = by_prefill[prompts[i].prefill]
                x = logits[ids].astype(np.float64)
                x -= x.max()
                probs = np.exp(x) / np.exp(x).sum()  # softmax over the letters = normalised P(letter)
                out[i] = probs.tolist() if np.isfinite(probs).all() else None
        return out

    def generate(self, prompts: list[ChoicePrompt], max_new_tokens: int) -> list[str | None]:
        # Llama's own completion path tracks the cache as one sequence: hand it an empty cache.
        self._decoder.forget()
        self.llm.n_tokens = 0
        out = []
        for p in prompts:
            res = self.llm.create_completion(self.tokens(p), max_tokens=max_new_tokens, temperature=0.0)
            out.append(res["choices"][0]["text"])
        return out

    def close(self) -> None:
        self._decoder.close()
        self.llm.close()  # explicit: its destructor can raise at interpreter exit



def gguf_problems(path: str) -> list[str]:
    """Why `path` is not a loadable GGUF file, found before any model loads (llama.cpp says only
    "Failed to load model"): missing, no GGUF magic, or a header or tensor table that the `gguf`
    reader cannot parse or that points past the end of the file (a truncated download)."""
    import gguf

    if not path or not Path(path).is_file():
        return [f"{path!r}: GGUF file not found (export one with stages=[export] or python -m cai_lite.gguf_export)"]
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return [f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)"]
    try:
        gguf.GGUFReader(path)  # memory-maps the file: reads the header and tensor table, not the weights
        return []
    except (ValueError, IndexError, KeyError, OverflowError, OSError, MemoryError) as e:
        why = f"{type(e).__name__}: {e}"
    # The reader also fails on a quantization type newer than the gguf package: let llama.cpp decide.
    try:
        load_gguf(path, n_ctx=8, verbose=False).close()
        return []
    except ImportError:
        pass
    except ValueError:
        why += "; llama.cpp cannot load it either"
    return [f"{path}: a damaged or truncated GGUF file ({why})"]
