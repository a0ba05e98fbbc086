"""Planner accuracy on CPU: measured peak memory of one training step / the planner's figure, per stage.

Two locally built models with a 32k vocabulary (about 17M and 58M parameters, random weights through
`base.init=random`, NF4 as on a GPU), one step each of sft, reward_model and ppo (the same step
functions as benchmarks/gpu_check.py). Each step runs in a fresh child process; the measure is the
peak RSS *growth* over the process right after the base is loaded (adapters, optimizer state,
activations, logits, KV cache: what the planner adds on top of the weights). Children return freed
blocks to the OS at once (MALLOC_MMAP_THRESHOLD_), so peak RSS follows live memory (see
benchmarks/ppo_memory.py). Goal: every ratio within 0.85-1.15; where it misses, fix the planner.

    python benchmarks/planner_accuracy.py
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_check  # noqa: E402  (the step functions: one definition for the CPU and GPU checks)

from cai_lite import losses, models, planner, rollout  # noqa: E402
from cai_lite.recipe import load_config  # noqa: E402
from cai_lite.tiny import build_shape_folder  # noqa: E402

MODELS = {"17M": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4),
          "58M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4)}
SFT, REWARD, PPO = (2, 256), (2, 256), (4, 64, 32, 2)  # (batch, seq), (pairs, seq), (prompts, prompt, response, mb)


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def config(folder: str):
    n, tp, tr, mb = PPO
    return load_config(["recipe=tiny_cpu", f"base.model={folder}", "base.init=random", "lora.r=16",
                        "base.gradient_checkpointing=true", f"ppo.batch_size={n}", f"ppo.minibatch_size={mb}",
                        f"ppo.max_new_tokens={tr}", f"generation.max_prompt_tokens={tp}", "ppo.ppo_epochs=1",
                        "ppo.grad_accum=1", "ppo.temperature=1.0"])


def reward_step(base, pairs: int, seq: int) -> None:
    """The reward_model stage's step: both responses of each pair in one batch, soft BT loss, AdamW."""
    models.add_adapter(base, "reward")
    models.add_head(base, "reward")
    opt = torch.optim.AdamW(models.adapter_parameters(base, "reward"), lr=1e-4)
    ids = torch.randint(16, base.model.config.vocab_size, (2 * pairs, seq))
    mask = torch.ones_like(ids)
    for _ in range(2):
        with models.role(base, "reward", trainable=True):
            base.model.train()
            r = rollout.sequence_scores(base, "reward", ids, mask)  # (2 * pairs,)
            losses.soft_bt_loss(r[:pairs], r[pairs:], torch.full((pairs,), 0.7)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            base.model.eval()


def child(folder: str, stage: str) -> dict:
    torch.set_num_threads(2)
    cfg = config(folder)
    base = models.load_base(cfg)
    prompts = [gpu_check.words(base.tokenizer, PPO[1], i) for i in range(PPO[0])]
    torch.manual_seed(0)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    if stage == "sft":
        gpu_check.sft(cfg, base, *SFT)
    elif stage == "reward_model":
        reward_step(base, *REWARD)
    else:
        gpu_check.ppo_shared(cfg, base, prompts)
    return {"growth_mb": rss_mb("VmHWM") - start}


def planned_mb(folder: str, stage: str) -> float:
    cfg = config(folder)
    shape, name = planner.shape_config(cfg)
    m = planner.count(shape, name, list(cfg.lora.target_modules))
    s = planner.settings(cfg)
    n, tp, tr, mb = PPO
    terms = {"sft": lambda: planner.sft_step(m, s, *SFT), "reward_model": lambda: planner.reward_step(m, s, *REWARD),
             "ppo": lambda: planner.ppo_step(m, s, n, tp, tr, mb, cfg.ppo.logit_chunk)}[stage]()
    return sum(terms.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--models", default="17M,58M")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    misses = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = build_shape_folder(Path(tmp) / name, {"model_type": "llama", "vocab_size": 32000,
                                                           "tie_word_embeddings": False, **MODELS[name]})
            for stage in ("sft", "reward_model", "ppo"):
                out = subprocess.run([sys.executable, __file__, "--child", str(folder), stage], capture_output=True,
                                     text=True, env=env)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{name} {stage}: child failed")
                got = json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"]
                want = planned_mb(str(folder), stage)
                ok = 0.85 <= got / want <= 1.15
                misses += not ok
                print(f"planner_accuracy {name} {stage:<12}: measured / planned = {got / want:.2f} "
                      f"({got:.0f} MB / {want:.0f} MB) {'PASS' if ok else 'MISS'}", flush=True)
    print(f"planner_accuracy: {6 - misses} of 6 within +-15%")


if __name__ == "__main__":
    main()
