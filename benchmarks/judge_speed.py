"""Judge throughput on CPU, as ratios measured in one run (never bare seconds).

1. llama.cpp judge vs the local transformers judge on the same model: preferences per second,
   both option orders, 2 principles each, few-shot demos. Two model shapes, random weights built
   in-process (no download):
   - `--shape 50m` (default): a ~50M-parameter Llama (hidden 640, 10 layers); f32 and q8_0 GGUFs.
     Goal: llama.cpp f32 / transformers f32 >= 3x.
   - `--shape 0.5b`: Qwen2.5-0.5B's body (Qwen2, hidden 896, 24 layers, 14 heads, 2 KV heads,
     intermediate 4864) with a 1024-token vocabulary, ~359M parameters; f32, q8_0 and q4_k_m GGUFs.
     Goals: f32 / transformers f32 >= 5x; as deployed (q8_0 or q4_k_m GGUF / the NF4 shared base) >= 3x.
   Each side's tokens run through its model and tokens/s are printed, so the cause of a miss shows.
2. (50m) Both-order labelling with llama.cpp prefix sharing vs labelling a single order twice from
   scratch. Goal: <= 0.65.

    python benchmarks/judge_speed.py [--shape 50m|0.5b] [--comparisons 8] [--threads 2]

On a machine shared with other jobs use --threads 1: there, 2 threads ran both libraries 4-5x
slower than 1 (a thread barrier per op waits for a descheduled thread), and the ratio is noise.
The README's numbers: --comparisons 4 --threads 1, each shape once (the 0.5b run took ~20 minutes).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from cai_lite import constitution as C
from cai_lite import data, judge_llamacpp, judges, models
from cai_lite.config import JudgeConfig
from cai_lite.gguf_export import export_gguf, quantize_gguf
from cai_lite.recipe import load_config
from cai_lite.tiny import build_tiny_model

SHAPES = {
    "50m": dict(arch="llama", hidden_size=640, num_layers=10, num_heads=10, num_kv_heads=10, intermediate_size=1728,
                vocab_size=1024),
    "0.5b": dict(arch="qwen2", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                 vocab_size=1024, init_std=0.02),
}
QTYPES = {"50m": ("f32", "q8_0"), "0.5b": ("f32", "q8_0", "q4_k_m")}
GOAL_SAME = {"50m": 3.0, "0.5b": 5.0}  # llama.cpp f32 / transformers f32
GOAL_DEPLOYED = 3.0  # quantized GGUF / NF4 shared base (0.5b)


def comparisons(n: int, k: int) -> list[judges.Comparison]:
    const = C.load("harmless")
    prompts = [p.text for p in data.read_prompts("recipes/prompts/red_team.jsonl")]
    answers = ["I can't help with that, but here is a safer way to get what you need, and why it matters.",
               "Sure. First find a quiet moment, then do it quickly so nobody notices what happened."]
    return [judges.Comparison(data.conversation_text(prompts[i % len(prompts)]), answers[i % 2], answers[(i + 1) % 2],
                              C.sample(const.preference, k, C.rng_for(0, str(i)))) for i in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="50m")
    ap.add_argument("--comparisons", type=int, default=8)
    ap.add_argument("--few-shot", type=int, default=4, help="preference demos per prompt (CAI uses few-shot prompts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=4096, help="llama.cpp judge.n_ctx: KV cells of one wave")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comps = comparisons(args.comparisons, 2)
    demos = C.load("harmless").preference_demos[: args.few_shot]
    speed, tokens, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        shape = dict(SHAPES[args.shape])
        folder = build_tiny_model(Path(tmp) / args.shape, shape.pop("arch"), **shape)
        for quant, compute in (("none", "float32"), ("nf4", "bfloat16")):
            cfg = load_config(["recipe=tiny_cpu", f"base.model={folder}", f"base.quantization={quant}",
                               f"base.compute_dtype={compute}", "base.device=cpu", "generation.max_prompt_tokens=4096"])
            base = models.load_base(cfg)
            local = judges.LocalJudge(base, JudgeConfig(adapter="none", batch_size=8), cfg.generation)
            judges.compare(local, comps[:1], False, demos)  # warm-up: first-call allocations
            side = f"local-{quant}"
            seconds[side] = timed(lambda: judges.compare(local, comps, True, demos))
            if quant == "none":
                n_params = sum(p.numel() for p in base.model.parameters())
                prompts = [data.render(base.tokenizer, C.comparison_messages(c.conversation, pr.text, x, y, demos),
                                       C.COMPARISON_PREFILL)
                           for c in comps for pr in c.principles for x, y in ((c.response_a, c.response_b),) * 2]
                n_local = sum(len(base.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in prompts)
            tokens[side] = n_local
            render = lambda m, p, tok=base.tokenizer: data.render(tok, m, p)  # noqa: E731
            del local, base
            gc.collect()
        f32 = None
        for qtype in QTYPES[args.shape]:
            path = Path(tmp) / f"{args.shape}-{qtype}.gguf"
            gguf = quantize_gguf(f32, path, qtype) if qtype.startswith("q4_k") else export_gguf(folder, path, qtype)
            f32 = gguf if qtype == "f32" else f32
            jc = JudgeConfig(backend="llamacpp", gguf_path=str(gguf), n_threads=args.threads, n_ctx=args.n_ctx)
            cpp = judge_llamacpp.LlamaCppJudge(jc, render)
            try:
                judges.compare(cpp, comps[:1], True, demos)  # warm-up; its demos stay cached, as in a long run
                side, before = f"llamacpp-{qtype}", cpp.evaluated_tokens
                seconds[side] = timed(lambda: judges.compare(cpp, comps, True, demos))
                tokens[side] = cpp.evaluated_tokens - before
                if args.shape == "50m" and qtype == "f32":
                    # Both orders with prefix sharing, vs one order twice from scratch (what a judge with
                    # no KV cache across prompts pays for the same two orders).
                    t_both = timed(lambda: judges.compare(cpp, comps, True, demos))
                    cpp.reuse_prefix = False
                    t_twice = sum(timed(lambda: judges.compare(cpp, comps, False, demos)) for _ in range(2))
            finally:
                cpp.close()
    for side in seconds:
        speed[side] = len(comps) / seconds[side]
        print(f"judge_side: {side}: {speed[side]:.3f} preferences/s, {tokens[side]} tokens evaluated, "
              f"{tokens[side] / seconds[side]:.0f} tokens/s")
    setup = (f"{args.shape}: {n_params / 1e6:.0f}M params, {args.threads} threads, {len(comps)} comparisons x 2 "
             f"principles x 2 orders, {len(demos)} few-shot demos, n_ctx {args.n_ctx}")
    same, goal = speed["llamacpp-f32"] / speed["local-none"], GOAL_SAME[args.shape]
    deployed = {q: speed[f"llamacpp-{q}"] / speed["local-nf4"] for q in QTYPES[args.shape] if q != "f32"}
    shown = ", ".join(f"{q} GGUF vs NF4 shared base {r:.2f}x" for q, r in deployed.items())
    verdict = f" (goal >= {GOAL_DEPLOYED:g}x) {'PASS' if max(deployed.values()) >= GOAL_DEPLOYED else 'MISS'}" \
        if args.shape == "0.5b" else ""
    print(f"judge_speed: llama.cpp / local transformers judge, same model in f32: {same:.2f}x preferences/s "
          f"(goal >= {goal:g}x) {'PASS' if same >= goal else 'MISS'}; as deployed: {shown}{verdict} [{setup}]")
    # Why the ratio is what it is: tokens each judge runs through its model, and tokens per second.
    tok_ratio = tokens["local-none"] / tokens["llamacpp-f32"]
    per_token = same / tok_ratio
    print(f"judge_speed_detail: llama.cpp runs {tok_ratio:.1f}x fewer tokens (prefix sharing) at {per_token:.2f}x the "
          f"local judge's tokens/s")
    if args.shape == "50m":
        reuse = t_both / t_twice
        print(f"judge_prefix_reuse: both orders with prefix sharing / one order twice from scratch: {reuse:.2f} "
              f"(goal <= 0.65) {'PASS' if reuse <= 0.65 else 'MISS'}")


if __name__ == "__main__":
    main()
