"""Peak memory of one PPO step, NF4 on CPU: one shared base vs four separately loaded models.

Each variant runs in a fresh subprocess and reports its peak RSS *growth* over the RSS right after
imports, so the interpreter and libraries don't mask the model. The peak is taken from after the
models are loaded (the load's transient fp32 copy is not part of a PPO step), through the step. Both variants run the same step
(sample, policy and reference log-probs, reward score, values, one clipped policy+value update);
they differ only in which base object each role uses:
  - shared:   policy, reference, reward and value are adapters on one NF4 base (cai_lite);
  - separate: each role loads its own NF4 model, as TRL's old PPO did.
Also times adapter switching against a plain forward (one adapter switch per forward).

Children run with glibc returning large freed blocks to the OS at once (MALLOC_MMAP_THRESHOLD_),
so peak RSS follows live memory; with glibc's defaults the freed transient buffers of 4-bit
matmuls stay in the heap, add ~300 MB to both variants, and the ratio reads ~0.45 instead.

The model is random with real shapes: hidden 1024, 16 layers, a 32k vocabulary (~270M parameters),
large enough that weights matter. Prediction: about (W + A) / (4W + A), W = one base's bytes.
The update runs as the ppo stage runs it under 7b_qlora: gradient checkpointing on, in
`models.training_mode`. Without checkpointing (tiny_cpu's setting) A is mostly what autograd keeps
of the 16 decoder layers for the policy and value backward, and the ratio reads 0.36. Logits are a
small part here: log-probs go through the LM head `ppo.logit_chunk` rows at a time, and one fp32
(2, 16, 32k) logits tensor is only 4 MB. Chunking pays with long responses and 150k vocabularies.

    python benchmarks/ppo_memory.py
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
import time
from pathlib import Path

import torch

from cai_lite import losses, models, rollout
from cai_lite.recipe import load_config


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cai_lite.tiny import train_tokenizer

    tok = train_tokenizer(512)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=16, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def step(bases: dict, prompts: list[str]) -> None:
    """One PPO step where each role runs on `bases[role]` (the same object, or four)."""
    pol, ref, rew, val = bases["policy"], bases["reference"], bases["reward"], bases["value"]
    ro = rollout.sample(pol, "policy", prompts, 16, 1.0, 64, len(prompts))
    chunk = pol.cfg.ppo.logit_chunk
    old = rollout.response_logprobs(pol, "policy", ro, 1.0, 2, chunk)
    ref_lp = rollout.response_logprobs(ref, "reference", ro, 1.0, 2, chunk)
    score = rollout.score(rew, ro.prompts, ro.texts, 2, 128)
    with torch.no_grad(), models.role(val, "value"):
        v_old = rollout.values(val, ro) * ro.mask
    rewards = -0.05 * (old - ref_lp) * ro.mask
    rewards[torch.arange(len(score)), (ro.mask.sum(1).long() - 1).clamp(min=0)] += score
    adv, ret = losses.gae(rewards, v_old, ro.mask, 1.0, 0.95)
    params = models.adapter_parameters(pol, "policy") + models.adapter_parameters(val, "value")
    opt = torch.optim.AdamW(params, lr=1e-5)
    with models.training_mode(pol), models.training_mode(val):  # as ppo._update: checkpointing applies
        for start in range(0, len(prompts), 2):
            idx = torch.arange(start, start + 2)
            mb = ro.select(idx)
            with models.role(pol, "policy", trainable=True) as model:
                logp = rollout.response_logprobs_entropy(model, mb, 1.0, chunk)[0]
                losses.ppo_policy_loss(logp, old[idx], adv[idx], mb.mask, 0.2)[0].backward()
            with models.role(val, "value", trainable=True):
                losses.ppo_value_loss(rollout.values(val, mb), v_old[idx], ret[idx], mb.mask, 0.2).backward()
    opt.step()


def child(folder: str, variant: str) -> dict:
    torch.set_num_threads(2)
    # Gradient checkpointing on, as 7b_qlora runs PPO (tiny_cpu turns it off for speed).
    cfg = load_config(["recipe=tiny_cpu", f"base.model={folder}", "base.compute_dtype=bfloat16",
                       "base.gradient_checkpointing=true"])
    start = rss_mb("VmRSS")
    prompts = ["How do I pick a lock?", "Write a poem about the sea.", "Is it safe to mix bleach?", "Hello!"]
    if variant == "switch":
        base = models.load_base(cfg)
        for name in ("policy", "reference"):
            models.add_adapter(base, name)
        ids = torch.randint(10, 500, (1, 64))
        with torch.no_grad():
            def plain():
                with models.role(base, "policy") as m:
                    for _ in range(20):
                        m(input_ids=ids)

            def switching():
                for i in range(20):
                    with models.role(base, ("policy", "reference")[i % 2]) as m:
                        m(input_ids=ids)

            plain(), switching()  # warm-up
            times = {"plain": [], "switching": []}
            for _ in range(3):  # interleave so drift in machine load hits both alike
                for name, fn in (("plain", plain), ("switching", switching)):
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
        return {"switch_ratio": min(times["switching"]) / min(times["plain"])}
    if variant == "shared":
        base = models.load_base(cfg)
        bases = {r: base for r in ("policy", "reference", "reward", "value")}
    else:
        bases = {r: models.load_base(cfg) for r in ("policy", "reference", "reward", "value")}
    for role, b in bases.items():
        models.add_adapter(b, role)
        if role in ("reward", "value"):
            models.add_head(b, role)
    weights = models.memory_account(bases["policy"])["base_weight_bytes"] / 2**20
    # Loading reads the fp32 checkpoint before quantizing it; that transient is not the PPO step's.
    # Return freed heap to the OS, then measure the peak from here on (weights stay resident).
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step(bases, prompts)
    return {"growth_mb": rss_mb("VmHWM") - start, "base_weights_mb": weights}


def run_child(folder: Path, variant: str) -> dict:
    # glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so RSS would keep
    # every transient dequantized weight the step ever allocated. Returning large blocks at once makes
    # the peak RSS the peak of live memory. Both variants run with the same setting.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), variant], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m250"
        build(folder)
        shared, separate = run_child(folder, "shared"), run_child(folder, "separate")
        switch = run_child(folder, "switch")
    ratio = shared["growth_mb"] / separate["growth_mb"]
    w = shared["base_weights_mb"]
    a = max(shared["growth_mb"] - w, 0.0)
    print(f"ppo_memory: peak growth of one PPO step, shared base / separate models = {ratio:.2f} "
          f"({shared['growth_mb']:.0f} MB / {separate['growth_mb']:.0f} MB; goal <= 0.33) "
          f"{'PASS' if ratio <= 0.33 else 'MISS'}; predicted (W+A)/(4W+A) = {(w + a) / (4 * w + a):.2f} "
          f"with W = {w:.0f} MB, A = {a:.0f} MB")
    print(f"adapter_switch: forward with an adapter switch each call / plain forward = {switch['switch_ratio']:.3f} "
          f"(goal <= 1.05) {'PASS' if switch['switch_ratio'] <= 1.05 else 'MISS'}")


if __name__ == "__main__":
    main()
