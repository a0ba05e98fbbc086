"""Judge throughput on CPU, as ratios measured in one run (never bare seconds).

1. llama.cpp judge vs the local transformers judge on the same ~50M-parameter model: preferences
   per second, both option orders, 2 principles each. Goal: llama.cpp >= 3x.
2. Both-order labelling with llama.cpp KV-prefix reuse vs labelling a single order twice without
   reuse. Goal: <= 0.65.

Builds a random ~50M-parameter Llama (hidden 640, 10 layers) in a temporary folder, exports it to
a GGUF (f32, so both judges compute the same function), and prints one result line per ratio.

    python benchmarks/judge_speed.py [--comparisons 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cai_lite import constitution as C
from cai_lite import data, judges, models
from cai_lite.config import JudgeConfig
from cai_lite.gguf_export import export_gguf
from cai_lite.recipe import load_config
from cai_lite.tiny import build_tiny_model


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
    ap.add_argument("--comparisons", type=int, default=8)
    ap.add_argument("--few-shot", type=int, default=4, help="preference demos per prompt (CAI uses few-shot prompts)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comps = comparisons(args.comparisons, 2)
    demos = C.load("harmless").preference_demos[: args.few_shot]
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "m50", "llama", hidden_size=640, num_layers=10, num_heads=10,
                                  num_kv_heads=10, intermediate_size=1728, vocab_size=1024)
        speed, tokens = {}, {}
        for quant, compute in (("none", "float32"), ("nf4", "bfloat16")):
            cfg = load_config(["recipe=tiny_cpu", f"base.model={folder}", f"base.quantization={quant}",
                               f"base.compute_dtype={compute}", "base.device=cpu"])
            base = models.load_base(cfg)
            local = judges.LocalJudge(base, JudgeConfig(adapter="none", batch_size=8), cfg.generation)
            judges.compare(local, comps[:1], True, demos)  # warm-up: first-call allocations
            speed[f"local-{quant}"] = len(comps) / timed(lambda: judges.compare(local, comps, True, demos))
            if quant == "none":
                n_params = sum(p.numel() for p in base.model.parameters())
                prompts = [data.render(base.tokenizer, C.comparison_messages(c.conversation, pr.text, x, y, demos),
                                       C.COMPARISON_PREFILL)
                           for c in comps for pr in c.principles for x, y in ((c.response_a, c.response_b),) * 2]
                tokens["local"] = sum(len(base.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in prompts)
        render = lambda m, p: data.render(base.tokenizer, m, p)  # noqa: E731
        for qtype in ("f32", "q8_0"):
            gguf = export_gguf(folder, Path(tmp) / f"m50-{qtype}.gguf", qtype)
            cpp = judges.LlamaCppJudge(JudgeConfig(backend="llamacpp", gguf_path=str(gguf), n_threads=args.threads,
                                                   n_ctx=4096), render)
            try:
                judges.compare(cpp, comps[:1], True, demos)
                before = cpp.evaluated_tokens
                speed[f"llamacpp-{qtype}"] = len(comps) / timed(lambda: judges.compare(cpp, comps, True, demos))
                tokens["llamacpp"] = cpp.evaluated_tokens - before
                if qtype == "f32":
                    # Both orders with prefix reuse, vs one order twice from scratch (what a judge with
                    # no KV cache across prompts pays for the same two orders).
                    t_both = timed(lambda: judges.compare(cpp, comps, True, demos))
                    cpp.reuse_prefix = False
                    t_twice = sum(timed(lambda: judges.compare(cpp, comps, False, demos)) for _ in range(2))
            finally:
                cpp.close()
    same = speed["llamacpp-f32"] / speed["local-none"]
    cheap = speed["llamacpp-q8_0"] / speed["local-nf4"]
    reuse = t_both / t_twice
    setup = (f"{n_params / 1e6:.0f}M params, {args.threads} threads, {len(comps)} comparisons x 2 principles x 2 "
             f"orders, {len(demos)} few-shot demos")
    print(f"judge_speed: llama.cpp / local transformers judge, same model in f32: {same:.2f}x preferences/s "
          f"(goal >= 3x) {'PASS' if same >= 3 else 'MISS'}; as deployed (q8_0 GGUF vs NF4 shared base): "
          f"{cheap:.2f}x [{setup}]")
    # Why the ratio is what it is: tokens each judge runs through its model, and tokens per second.
    tok_ratio = tokens["local"] / tokens["llamacpp"]
    per_token = same / tok_ratio
    print(f"judge_speed_detail: llama.cpp runs {tok_ratio:.1f}x fewer tokens (KV-prefix reuse) at {per_token:.2f}x the "
          f"local judge's tokens/s (batched torch GEMMs vs one prompt at a time)")
    print(f"judge_prefix_reuse: both orders with KV-prefix reuse / one order twice without: {reuse:.2f} "
          f"(goal <= 0.65) {'PASS' if reuse <= 0.65 else 'MISS'}")


if __name__ == "__main__":
    main()
