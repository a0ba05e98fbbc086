"""Sampling throughput: useful tokens per second of the generating paths, today's fixed batches against
the length-aware, refilling loop (cai_lite/decode.py), measured in one run and reported as ratios.

What it samples: a critique_revise shard's three kinds of prompt, rendered by the stage's own
functions (red-team questions from recipes/prompts/red_team.jsonl; critique and revision requests
with the constitution's few-shot demonstration, around stand-in answers), each kind in its own call
as the stage makes them; and a PPO rollout (rollout.sample) of the same questions. The model is a
random NF4 base with a random `sft` adapter; so that answers end at different lengths as a trained
model's do, the LM head's EOS row is set to the mean direction of the final hidden states, scaled so
that EOS has probability 1/`--mean-length` per token (calibrate_eos). Useful tokens are the generated
ones kept, EOS included; "wasted" is the share of decode positions (rows x steps) that kept nothing:
finished rows and padding. Prefill time is included in every tokens/s.

Paths, each timed on the same prompts, settings and model:
  fixed   today's generation.generate: `model.generate` over fixed batches in prompt order
          (copied here from git history, 5885b9b, so the comparison survives it);
  sorted  the same fixed batches, prompts ordered by length (length-aware only);
  refill_unshared  generation.generate now, less one part: length-aware order, finished rows refilled;
  refill  generation.generate now: that, and the common prefix of prompts prefilled together (the
          few-shot demonstration that opens every critique and revision prompt) computed once.
It also checks greedy equality of `refill` against `fixed` (token for token) on some prompts.

    python benchmarks/sampling.py                   # CPU, ~50M Llama shape (~3 min on 2 cores)
    python benchmarks/sampling.py --gpu             # Qwen2.5-7B shape, random NF4 weights, one NVIDIA GPU
    python benchmarks/sampling.py --gpu --tiny      # the --gpu code path at a tiny shape, on CPU (the tests run it)
Writes one JSON object per path to --out (default: print only). Target (CPU, this shape): refill
>= 2x fixed in useful tokens/s; GPU (Qwen2.5-7B, H100-class): critique_revise sampling >= 1,000.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_lite import constitution as C  # noqa: E402
from cai_lite import data, decode, generation, models, rollout  # noqa: E402
from cai_lite.config import GenerationSettings  # noqa: E402
from cai_lite.recipe import load_config  # noqa: E402
from cai_lite.tiny import build_shape_folder, build_tiny_model  # noqa: E402

CPU_SHAPE = dict(hidden_size=512, num_layers=10, num_heads=8, num_kv_heads=4, intermediate_size=1536,
                 vocab_size=8192, init_std=0.02)  # ~48M parameters
SHARED = decode.MIN_SHARED
TINY_GPU_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024)


def load(args, folder: Path):
    """The NF4 base with a random, non-zero `sft` adapter."""
    if args.gpu:
        shape = json.loads((ROOT / "cai_lite" / "shapes" / "qwen2.5-7b.json").read_text())
        if args.tiny:
            shape.update(TINY_GPU_SHAPE)
        build_shape_folder(folder, shape)
        over = ["recipe=7b_qlora", f"base.model={folder}", "base.init=random"] + (["base.device=cpu"] if args.tiny else [])
    else:
        build_tiny_model(folder, "llama", **CPU_SHAPE)
        over = ["recipe=tiny_cpu", f"base.model={folder}", "base.create=none"]
    cfg = load_config(over + [f"run_dir={folder.parent / 'run'}"])
    base = models.load_base(cfg)
    models.add_adapter(base, "sft")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: the adapter would compute nothing
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
    return cfg, base


def stand_in(text: str, vocab: int) -> str:
    """The GPU shapes' stand-in tokenizer knows only w0, w1, ...: one such word per word of the text,
    so a prompt keeps its length in words (about 3/4 of its length in BPE tokens)."""
    return " ".join(f"w{sum(map(ord, w)) * 7919 % (vocab - 64)}" for w in text.split())


def prompt_kinds(cfg, tok, n: int, words: bool = False) -> dict[str, list[str]]:
    """n rendered prompts of each kind critique_revise sends: answers, critiques, revisions (with
    `words`, every message's text turned into stand-in words)."""
    questions = [json.loads(line)["prompt"] for line in (ROOT / "recipes/prompts/red_team.jsonl").read_text().splitlines()]
    const = C.load(cfg.constitution)
    # The demonstrations' own answers (their second message) stand in for the policy's answers.
    demos = [chat[1]["content"] for chat in const.critique_demos] or ["I can't help with that."]
    rng = C.rng_for(0, "benchmark")
    asks = [questions[i % len(questions)] for i in range(n)]
    answers = [" ".join([demos[i % len(demos)]] * (1 + i % 3)) for i in range(n)]  # stand-ins of varied length
    principles = [rng.choice(const.critique_revision) for _ in range(n)]
    render = lambda msgs: data.render(tok, [{**m, "content": stand_in(m["content"], len(tok))} if words else m  # noqa: E731
                                            for m in msgs])
    return {
        "answers": [render([{"role": "user", "content": q}]) for q in asks],
        "critiques": [render(C.critique_messages(const, q, a, p, 1, False)) for q, a, p in zip(asks, answers, principles)],
        "revisions": [render(C.revision_messages(const, q, a, p, "The response could cause harm.", 1, False))
                      for q, a, p in zip(asks, answers, principles)],
    }


@torch.no_grad()
def calibrate_eos(base, prompts: list[str], mean_length: float, cap: int, temperature: float, top_p: float) -> float:
    """Point the LM head's EOS row along the mean final hidden state where answers are written, scaled
    so that the mean EOS probability there is 1 / mean_length; return the scale. The positions are
    those of answers sampled first with EOS out of reach (a zero row), from the last prompt token on."""
    head = base.model.get_output_embeddings().weight
    eos = models.eos_ids(base)[0]
    head[eos] = 0
    g = GenerationSettings(batch_size=len(prompts), max_new_tokens=cap, max_prompt_tokens=2048, temperature=temperature,
                           top_p=top_p)
    torch.manual_seed(0)
    answers = generation.generate(base, prompts, "sft", g)
    # Re-encode prompt + answer: the answer text re-tokenizes to about the ids that were sampled.
    enc, _ = generation.tokenize_left(base, [p + a for p, a in zip(prompts, answers.texts)], 4096)
    n_prompt = [len(x) for x in base.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    mask = enc["attention_mask"].clone()
    for row, k in zip(mask, n_prompt):  # keep the answer's positions and the prompt's last one
        real = row.nonzero().squeeze(1)
        row[real[: k - 1]] = 0
    with models.role(base, "sft"):
        h = rollout.last_hidden(base, enc["input_ids"], enc["attention_mask"])[mask.bool()].float()  # (N, H)
    direction = h.mean(0) / h.mean(0).norm()
    others = h @ head.float().T  # (N, V)
    along = h @ direction  # (N,)
    # The probability that counts is the sampled one: after temperature, top-k and top-p, which can
    # make a token with raw probability 0.2 the only one left.
    warp = decode.Sampling.merged(base.model.generation_config, temperature, top_p).processors()

    def p_eos(scale: float) -> float:
        logits = others.clone()
        logits[:, eos] = scale * along
        return torch.softmax(warp(None, logits), -1)[:, eos].mean().item()

    lo, hi = 0.0, 1000.0
    for _ in range(40):  # bisection on the scale: mean sampled p(EOS) = 1 / mean_length
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_eos(mid) < 1 / mean_length else (lo, mid)
    head[eos] = (lo * direction).to(head.dtype)
    return lo


@torch.no_grad()
def fixed_batches(base, prompts: list[str], adapter, g: GenerationSettings, max_new_tokens: int, temperature: float,
                  order: list[int]) -> tuple[list[list[int]], int]:
    """Today's loop (generation.generate at 5885b9b), taking prompts in `order`: each batch runs until its
    longest answer ends.  -> generated ids per prompt (to the first EOS, included), decode positions"""
    eos = models.eos_ids(base)
    out: list[list[int]] = [[] for _ in prompts]
    decode_positions = 0
    with models.role(base, adapter) as model:
        for start in range(0, len(order), g.batch_size):
            idx = order[start:start + g.batch_size]
            batch, _ = generation.tokenize_left(base, [prompts[i] for i in idx], g.max_prompt_tokens)
            sampling = dict(do_sample=True, temperature=temperature, top_p=g.top_p) if temperature > 0 else dict(do_sample=False)
            res = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=base.tokenizer.pad_token_id, **sampling)
            new = res[:, batch["input_ids"].shape[1]:]  # (B, steps)
            decode_positions += new.shape[0] * (new.shape[1] - 1)  # the first token of each row is the prefill's
            for i, row in zip(idx, new.tolist()):
                hit = next((k for k, t in enumerate(row) if t in eos), None)
                out[i] = row[: hit + 1] if hit is not None else row
    return out, decode_positions


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t


def measure(base, kinds: dict[str, list[str]], g: GenerationSettings, max_new_tokens: int, temperature: float) -> dict:
    """Each path over every kind; per path: useful tokens, seconds, decode positions."""
    res = {}
    for path in ("fixed", "sorted", "refill_unshared", "refill"):
        useful = positions = 0
        seconds = 0.0
        lengths = []
        for prompts in kinds.values():
            torch.manual_seed(0)
            if path.startswith("refill"):
                # refill_unshared: the same loop with prefix sharing off (a common prefix never long enough)
                decode.MIN_SHARED = 10**9 if path == "refill_unshared" else SHARED
                out, s = timed(lambda: generation.generate(base, prompts, "sft", g, max_new_tokens, temperature))
                decode.MIN_SHARED = SHARED
                useful += sum(out.new_tokens)
                positions += out.stats.decode
                lengths += out.new_tokens
            else:
                n = [len(x) for x in base.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
                order = list(range(len(prompts))) if path == "fixed" else sorted(range(len(prompts)), key=lambda i: -n[i])
                (rows, pos), s = timed(lambda: fixed_batches(base, prompts, "sft", g, max_new_tokens, temperature, order))
                useful += sum(len(r) for r in rows)
                positions += pos
                lengths += [len(r) for r in rows]
            seconds += s
        rows = sum(len(p) for p in kinds.values())
        res[path] = {"useful_tokens": useful, "seconds": round(seconds, 2), "useful_per_s": round(useful / seconds, 1),
                     "wasted_share": round(1 - (useful - rows) / positions, 3) if positions else 0.0,
                     "mean_length": round(sum(lengths) / len(lengths), 1), "max_length": max(lengths)}
    return res


def rollout_paths(base, questions: list[str], batch: int, max_new_tokens: int, max_prompt: int) -> dict:
    """The PPO rollout: HF generate over the whole batch (today) against rollout.sample with
    ppo.rollout_batch_size = the batch (finished rows leave) and = half of it (refilled)."""
    res = {}
    rendered = [data.render(base.tokenizer, [{"role": "user", "content": q}]) for q in questions]  # as rollout.sample renders
    for name, slots in (("fixed", None), ("refill_all", batch), ("refill_half", max(1, batch // 2))):
        torch.manual_seed(0)
        if slots is None:
            g = GenerationSettings(batch_size=batch, max_prompt_tokens=max_prompt, top_p=1.0)
            (rows, pos), s = timed(lambda: fixed_batches(base, rendered, "sft", g, max_new_tokens, 1.0, list(range(len(rendered)))))
            useful = sum(len(r) for r in rows)
        else:
            ro, s = timed(lambda: rollout.sample(base, "sft", questions, max_new_tokens, 1.0, max_prompt, slots))
            useful = int(ro.mask.sum())
        res[name] = {"useful_tokens": useful, "seconds": round(s, 2), "useful_per_s": round(useful / s, 1)}
    return res


def greedy_equal(base, prompts: list[str], g: GenerationSettings, max_new_tokens: int) -> tuple[int, int]:
    """Rows where the refilling loop's greedy tokens equal today's fixed batches'."""
    want, _ = fixed_batches(base, prompts, "sft", g, max_new_tokens, 0.0, list(range(len(prompts))))
    got = generation.generate(base, prompts, "sft", g, max_new_tokens, 0.0)
    eos = models.eos_ids(base)
    same = sum(a == base.tokenizer.decode(w[:-1] if w and w[-1] in eos else w, skip_special_tokens=True).strip()
               for a, w in zip(got.texts, want))
    return same, len(prompts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="Qwen2.5-7B shape with random NF4 weights (base.init=random)")
    ap.add_argument("--tiny", action="store_true", help="with --gpu: a tiny shape on CPU, to test the code path")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per kind (default 32 on CPU, 64 on GPU, 6 with --tiny)")
    ap.add_argument("--batch-size", type=int, default=None, help="generation.batch_size (default 8 on CPU, 32 on GPU)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="answer cap (default 128 on CPU, 512 on GPU)")
    ap.add_argument("--mean-length", type=float, default=None, help="mean answer length the EOS calibration aims at")
    ap.add_argument("--out", type=Path, help="write the results as JSON lines here")
    a = ap.parse_args(argv)
    big = a.gpu and not a.tiny
    n = a.prompts or (6 if a.tiny else 64 if big else 32)
    batch = a.batch_size or (32 if big else 4 if a.tiny else 8)
    cap = a.max_new_tokens or (512 if big else 16 if a.tiny else 128)
    mean = a.mean_length or cap * 0.3
    with tempfile.TemporaryDirectory() as tmp:
        cfg, base = load(a, Path(tmp) / "model")
        kinds = prompt_kinds(cfg, base.tokenizer, n, words=a.gpu)
        scale = calibrate_eos(base, kinds["answers"][:8] + kinds["critiques"][:8], mean, cap, 0.7, 0.95)
        g = GenerationSettings(batch_size=batch, max_new_tokens=cap, max_prompt_tokens=2048 if big else 1024,
                               temperature=0.7, top_p=0.95)
        generation.generate(base, kinds["answers"][:2], "sft", g, 4)  # warm-up: first-call costs out of the timings
        same, checked = greedy_equal(base, kinds["answers"][: min(n, 8)], g, min(cap, 32))
        paths = measure(base, kinds, g, cap, 0.7)
        questions = [json.loads(line)["prompt"] for line in (ROOT / "recipes/prompts/red_team.jsonl").read_text().splitlines()]
        questions = [stand_in(q, len(base.tokenizer)) for q in questions] if a.gpu else questions
        ro = rollout_paths(base, (questions * 8)[: 2 * batch], 2 * batch, cap, g.max_prompt_tokens)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    shape = "qwen2.5-7b" + (" (tiny)" if a.tiny else "") if a.gpu else f"llama {CPU_SHAPE}"
    report = {"device": device, "shape": shape, "prompts_per_kind": n, "batch_size": batch, "max_new_tokens": cap,
              "eos_scale": round(scale, 2), "greedy_equal": [same, checked], "critique_revise": paths, "ppo_rollout": ro,
              "ratio_refill_vs_fixed": round(paths["refill"]["useful_per_s"] / paths["fixed"]["useful_per_s"], 2),
              "ratio_sorted_vs_fixed": round(paths["sorted"]["useful_per_s"] / paths["fixed"]["useful_per_s"], 2),
              "ratio_refill_unshared_vs_fixed": round(paths["refill_unshared"]["useful_per_s"]
                                                      / paths["fixed"]["useful_per_s"], 2),
              "ratio_rollout": round(ro["refill_all"]["useful_per_s"] / ro["fixed"]["useful_per_s"], 2)}
    print(f"{device}; {shape}; {n} prompts per kind, batch {batch}, answers up to {cap} tokens")
    print(f"greedy: refill equals fixed on {same}/{checked} prompts")
    print(f"{'critique_revise':<18}{'useful tok/s':>14}{'wasted':>9}{'mean len':>10}{'seconds':>9}")
    for k, v in paths.items():
        print(f"{k:<18}{v['useful_per_s']:>14}{v['wasted_share']:>9.2f}{v['mean_length']:>10}{v['seconds']:>9}")
    print(f"{'ppo rollout':<16}" + "".join(f"  {k} {v['useful_per_s']} tok/s" for k, v in ro.items()))
    print(f"refill / fixed: {report['ratio_refill_vs_fixed']}x (target >= 2x on CPU); without the shared prefix: "
          f"{report['ratio_refill_unshared_vs_fixed']}x; sorted / fixed: {report['ratio_sorted_vs_fixed']}x; "
          f"rollout: {report['ratio_rollout']}x")
    if big:
        ok = paths["refill"]["useful_per_s"] >= 1000
        print(f"GPU target: critique_revise sampling >= 1,000 useful tokens/s: {'met' if ok else 'missed'}")
    if a.out:
        a.out.write_text(json.dumps(report) + "\n")
    return report


if __name__ == "__main__":
    main()
