"""GPU check for `recipe=7b_qlora`: peak memory and speed of the real code paths at 7B shapes.

No weights and no internet: each shape (Llama-2-7B and Mistral-7B by default, from cai_lite/shapes/)
is built with `base.init=random` and quantised to NF4 on the GPU, with a stand-in tokenizer of the
same vocabulary size. Per shape, in child processes so peaks never mix:
  - sft:          one SFT step, 4 x 1024 tokens, LoRA r=16 on all linear layers, gradient
                  checkpointing, AdamW (the loss the sft stage's trainer computes: full-vocabulary CE);
  - ppo_shared:   one PPO step of the ppo stage itself (`stages.ppo.ppo_step`: 16 prompts of 512
                  tokens, 256 sampled tokens, old/reference log-probs, reward, values, clipped
                  updates) with policy, reference, reward and value as adapters on one base;
  - ppo_separate: the same step with four separately loaded NF4 models, one role each.
It prints, per step, peak allocated memory, tokens/s and the planner's figure (cai_lite/planner.py),
with the card's name, and writes them as JSON lines to --out.

    python benchmarks/gpu_check.py --out gpu_check.jsonl      # one NVIDIA GPU, no internet (~5 min)
    python benchmarks/gpu_check.py --tiny                     # same code path, tiny shape on CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cai_lite import losses, models, planner, rollout
from cai_lite.recipe import load_config
from cai_lite.stages import ppo
from cai_lite.tiny import build_shape_folder

FULL = {"sft": (4, 1024), "ppo": (16, 512, 256)}  # (batch, seq) and (prompts, prompt, response) tokens
STEPS = {"shared": ("sft", "ppo_shared", "ppo_one_chunk"), "separate": ("ppo_separate",)}  # what each child process runs
TINY = {"sft": (2, 64), "ppo": (4, 32, 16)}
TINY_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2048)


def config(folder: Path, tiny: bool, prompts: int, minibatch: int, prompt_len: int, response_len: int):
    over = [f"base.model={folder}", "base.init=random", f"ppo.batch_size={prompts}", f"ppo.rollout_batch_size={prompts}",
            f"ppo.minibatch_size={minibatch}",
            f"ppo.max_new_tokens={response_len}", f"generation.max_prompt_tokens={prompt_len}", "ppo.temperature=1.0"]
    if tiny:
        over += ["base.device=cpu"]  # the recipe's bf16 weights and compute, as on the GPU
    return load_config(["recipe=7b_qlora", *over])


class Peak:
    """Peak allocated bytes over a block (CUDA), from the allocator's own counter."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t
        self.gb = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def words(tok, n: int, seed: int) -> str:
    """n stand-in words: n tokens under the stand-in tokenizer."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, len(tok) - 16, (n,), generator=g).tolist())


def sft(cfg, base, batch: int, seq: int) -> dict:
    models.add_adapter(base, "sft")
    opt = torch.optim.AdamW(models.adapter_parameters(base, "sft"), lr=1e-4)
    ids = torch.randint(16, base.model.config.vocab_size, (batch, seq), device=base.device)
    runs = []
    for _ in range(2):  # the first step also pays for kernel selection and the allocator's warm-up
        with Peak() as p, models.role(base, "sft", trainable=True) as model:
            model.train()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.eval()
        runs.append(p)
    return {"peak_gb": max(r.gb or 0 for r in runs) or None, "tokens_per_s": batch * seq / runs[-1].seconds}


def ppo_roles(base) -> None:
    """What ppo.run sets up from the sft and reward_model stages' adapters (random here)."""
    if "sft" not in base.adapters:
        models.add_adapter(base, "sft")
    models.add_adapter(base, "reward")
    models.add_head(base, "reward")
    models.copy_adapter(base, "sft", "reference")
    models.copy_adapter(base, "sft", "policy")
    models.copy_adapter(base, "reward", "value")


def ppo_shared(cfg, base, prompts: list[str]) -> dict:
    """One ppo_step on the shared base (roles set up on first use), with a fresh optimizer each time."""
    if "policy" not in base.adapters:
        ppo_roles(base)
    params = models.adapter_parameters(base, "policy") + models.adapter_parameters(base, "value")
    opt = torch.optim.AdamW(params, lr=cfg.ppo.lr)
    kl = ppo.KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
    with Peak() as p:
        rec = ppo.ppo_step(cfg, base, prompts, {"mean": 0.0, "std": 1.0}, kl, opt, params)
    return {"peak_gb": p.gb, "tokens_per_s": len(prompts) * rec["response_length"] / p.seconds,
            "seconds": p.seconds}


def ppo_separate(cfg, bases: dict, prompts: list[str]) -> dict:
    """ppo.ppo_step's computation with each role on its own base (as TRL's old PPOTrainer held them)."""
    pc, g = cfg.ppo, cfg.generation
    pol, ref, rew, val = bases["policy"], bases["reference"], bases["reward"], bases["value"]
    params = models.adapter_parameters(pol, "policy") + models.adapter_parameters(val, "value")
    opt = torch.optim.AdamW(params, lr=pc.lr)
    with Peak() as p:
        ro = rollout.sample(pol, "policy", prompts, pc.max_new_tokens, pc.temperature, g.max_prompt_tokens,
                            len(prompts))
        with torch.no_grad():
            old = rollout.response_logprobs(pol, "policy", ro, pc.temperature, pc.minibatch_size, pc.logit_chunk)
            ref_lp = rollout.response_logprobs(ref, "reference", ro, pc.temperature, pc.minibatch_size,
                                               pc.logit_chunk)
            score = rollout.score(rew, ro.prompts, ro.texts, pc.minibatch_size, g.max_prompt_tokens + pc.max_new_tokens)
            with models.role(val, "value"):
                v_old = rollout.values(val, ro) * ro.mask
            rewards = -pc.kl_coef * (old - ref_lp) * ro.mask
            rewards[torch.arange(len(score)), (ro.mask.sum(1).long() - 1).clamp(min=0)] += score
            adv, ret = losses.gae(rewards, v_old, ro.mask, pc.gamma, pc.lam)
        with models.training_mode(pol), models.training_mode(val):  # as ppo._update: checkpointing on, no dropout
            _separate_update(pc, pol, val, ro, old, adv, v_old, ret, opt)
    return {"peak_gb": p.gb, "tokens_per_s": ro.mask.sum().item() / p.seconds, "seconds": p.seconds}


def _separate_update(pc, pol, val, ro, old, adv, v_old, ret, opt) -> None:
    """ppo._update's minibatch passes, the policy on one base and the value model on another."""
    n = len(ro.texts)
    for _ in range(pc.ppo_epochs):
        for start in range(0, n, pc.minibatch_size):
            idx = torch.arange(start, min(start + pc.minibatch_size, n))
            mb = ro.select(idx)
            with models.role(pol, "policy", trainable=True) as model:
                logp = rollout.response_logprobs_entropy(model, mb, pc.temperature, pc.logit_chunk)[0]
                losses.ppo_policy_loss(logp, old[idx], adv[idx], mb.mask, pc.clip_range)[0].backward()
            with models.role(val, "value", trainable=True):
                losses.ppo_value_loss(rollout.values(val, mb), v_old[idx], ret[idx], mb.mask,
                                      pc.clip_range_value).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def plan_figures(cfg, sizes: dict) -> dict:
    """The planner's peaks (GiB) for exactly these steps."""
    shape, name = planner.shape_config(cfg)
    m = planner.count(shape, name, list(cfg.lora.target_modules))
    s = planner.settings(cfg)
    w = planner.base_weights(m, s)
    (b, t), (n, tp, tr) = sizes["sft"], sizes["ppo"]
    shared = planner.ppo_step(m, s, n, tp, tr, cfg.ppo.minibatch_size, cfg.ppo.logit_chunk)
    separate = {**shared, "adapters": planner.adapters(m, s, 4)}  # one adapter per model, four weights
    one = planner.ppo_step(m, s, n, tp, tr, cfg.ppo.minibatch_size, 10**9)
    return {"sft": (w + sum(planner.sft_step(m, s, b, t).values())) / 2**30,
            "ppo_one_chunk": (w + sum(one.values())) / 2**30,
            "ppo_shared": (w + sum(shared.values())) / 2**30,
            "ppo_separate": (4 * w + sum(separate.values())) / 2**30}


def child(folder: str, variant: str, tiny: bool) -> dict:
    sizes = TINY if tiny else FULL
    n, tp, tr = sizes["ppo"]
    cfg = config(Path(folder), tiny, n, 4 if not tiny else 2, tp, tr)
    t = time.perf_counter()
    if variant == "separate":
        bases = {r: models.load_base(cfg) for r in ("policy", "reference", "reward", "value")}
        base = bases["policy"]
    else:
        base = models.load_base(cfg)
    load_s = time.perf_counter() - t
    # Chat template and stand-in words: each prompt is exactly `tp` tokens after truncation.
    prompts = [words(base.tokenizer, tp, i) for i in range(n)]
    out = {"load_seconds": load_s, "weights_gb": models.memory_account(base)["base_weight_bytes"] / 2**30}
    torch.manual_seed(0)
    if variant == "separate":
        for role, b in bases.items():
            models.add_adapter(b, role)
            if role in ("reward", "value"):
                models.add_head(b, role)
        out["ppo_separate"] = ppo_separate(cfg, bases, prompts)
    else:
        out["sft"] = sft(cfg, base, *sizes["sft"])
        out["ppo_shared"] = ppo_shared(cfg, base, prompts)
        # The same step again with every minibatch's logits in one chunk: what chunking saves.
        cfg.ppo.logit_chunk = 10**9
        out["ppo_one_chunk"] = ppo_shared(cfg, base, prompts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-2-7b,mistral-7b", help="shipped shapes (cai_lite/shapes/)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 2k-vocabulary model of each shape's kind, on CPU")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per child process")
    ap.add_argument("--deadline", type=float, default=0, help="start no child after this many seconds (0: none)")
    ap.add_argument("--out", default="", help="also write one JSON line per shape here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.tiny)))
        return
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU: memory figures are n/a)"
    print(f"gpu_check on {card}, torch {torch.__version__}", flush=True)
    sizes = TINY if args.tiny else FULL
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes.split(","):
            shape = json.loads((planner.SHAPES / f"{name}.json").read_text())
            folder = build_shape_folder(Path(tmp) / name, {**shape, **(TINY_SHAPE if args.tiny else {})})
            res = {"shape": name + (" (tiny)" if args.tiny else ""), "card": card}
            for variant in ("shared", "separate"):
                if args.deadline and time.perf_counter() - began > args.deadline:
                    res.update(dict.fromkeys(STEPS[variant], f"skipped: past --deadline {args.deadline:.0f} s"))
                    continue
                cmd = [sys.executable, __file__, "--child", str(folder), variant] + (["--tiny"] if args.tiny else [])
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    res.update(dict.fromkeys(STEPS[variant], f"timed out after {args.timeout:.0f} s"))
                    continue
                if p.returncode:
                    print(p.stderr[-3000:], file=sys.stderr)
                    res.update(dict.fromkeys(STEPS[variant], f"failed (exit {p.returncode})"))
                    continue
                res.update(json.loads(p.stdout.strip().splitlines()[-1]))
            n, tp, tr = sizes["ppo"]
            n2 = 2 if args.tiny else 4
            res["planner_gb"] = plan_figures(config(folder, args.tiny, n, n2, tp, tr), sizes)
            report(res)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(res) + "\n")


def report(res: dict) -> None:
    print(f"{res['shape']}: base weights {res.get('weights_gb', 0):.2f} GiB (measured account)")
    for step in STEPS["shared"] + STEPS["separate"]:
        r = res.get(step)
        if not isinstance(r, dict):
            print(f"  {step:<13} {r or 'not run'}")
            continue
        peak = f"{r['peak_gb']:.2f} GiB" if r["peak_gb"] else "n/a"
        plan = f"{res['planner_gb'][step]:6.2f} GiB"
        print(f"  {step:<13} peak {peak:>10}  planner {plan}  {r['tokens_per_s']:8.0f} tok/s")
    a, b = res.get("ppo_shared"), res.get("ppo_separate")
    if isinstance(a, dict) and isinstance(b, dict) and a["peak_gb"] and b["peak_gb"]:
        print(f"  ppo shared / separate peak = {a['peak_gb'] / b['peak_gb']:.2f}", flush=True)
    c = res.get("ppo_one_chunk")
    if isinstance(a, dict) and isinstance(c, dict) and a["peak_gb"] and c["peak_gb"]:
        print(f"  ppo chunked / one chunk peak = {a['peak_gb'] / c['peak_gb']:.2f}", flush=True)


if __name__ == "__main__":
    main()
