"""Stage ppo: PPO with a KL penalty toward the SL-CAI model (Ziegler et al. 2019; Ouyang et al. 2022;
CAI §4), every role an adapter on the one shared base. TRL 1.16 deleted its PPOTrainer, so it is ours.

Roles, switched by `models.role` (which restores the active adapter and requires_grad):
  - policy:    trainable LoRA, initialised as a copy of `sft`;
  - reference: frozen copy of `sft`; the KL anchor is the SL-CAI model, not the bare base;
  - reward:    frozen adapter + head from the reward_model stage;
  - value:     its own LoRA adapter + head, initialised from `reward` (as InstructGPT and TRL's PPOv2
               did). A head on the policy's own hidden states would save one forward, but then value
               gradients move the policy's adapter; a separate value adapter keeps the two apart.

Reads `sft/adapter`, `reward_model/adapter`, `reward_model/reward_stats.json`, the prompts and the
helpful prompts of the mix (`ppo.helpful_prompts`).
Writes `ppo/adapter/` (the policy), `ppo/log.jsonl` (one line per step, from step 1), the `report_to`
logs (TensorBoard: `ppo/tensorboard/`) and, every `ppo.save_every` steps, `ppo/checkpoint/` (policy,
value and head, optimizer, KL coefficient, random generators, history), which a rerun resumes from,
bit for bit (deleted at the end).

    python run.py recipe=tiny_cpu stages=[ppo]
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from cai_lite import adapter_files, checkpoint, data, losses, models, rollout, rundir, tracking
from cai_lite.config import Config
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)


def check(cfg: Config) -> list[str]:
    return data.check_source("ppo.prompts", cfg.ppo.prompts) + data.check_source("ppo.helpful_prompts",
                                                                                cfg.ppo.helpful_prompts)


class KLController:
    """Fixed coefficient, or the adaptive one of Ziegler et al. 2019 §2.2 when kl_target > 0."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1))  # proportional, clipped
            self.coef *= 1 + error * n / self.horizon


def prompt_stream(prompts: list[str], batch: int, seed: int):
    """Endless batches of prompts, reshuffled (seeded) each pass."""
    rng, order = random.Random(seed), []
    while True:
        if len(order) < batch:
            more = list(prompts)
            rng.shuffle(more)
            order += more
        yield order[:batch]
        order = order[batch:]


def rl_prompts(cfg: Config) -> list[str]:
    """`ppo.prompts` (or the SL-CAI training prompts), then the helpful prompts of the mix."""
    pc = cfg.ppo
    red = data.read_optional(pc.prompts, 0, cfg.data.max_prompt_chars) if pc.prompts else data.prompt_split(cfg).train
    helpful = data.read_optional(pc.helpful_prompts, pc.helpful_limit, cfg.data.max_prompt_chars)
    return [p.text for p in red + helpful]


# The contract pipeline.py reads: config keys in this stage's hash, stages it reads (OPTIONAL_READS:
# when they ran), what it leaves in ppo/ before stage.json, and the metric the run's summary shows.
KEYS = rundir.BASE_KEYS + ("lora", "data", "generation", "ppo")
READS = ("sft", "reward_model")
OPTIONAL_READS = ()
OUTPUTS = ("adapter", "log.jsonl")
HEADLINE = "reward_last"


def run(cfg: Config, base: SharedBase, out: Path) -> dict:
    pc, g = cfg.ppo, cfg.generation
    rollout.load_roles(base, cfg.path)
    stats = rollout.load_reward_stats(cfg.path)
    models.copy_adapter(base, "sft", "policy")
    models.copy_adapter(base, "reward", "value")  # adapter + head, as a warm start for V(s)
    # Loading an adapter draws random LoRA weights before reading the saved ones, and whether a role was
    # already loaded depends on which stages ran in this process: reseed so rollouts do not.
    transformers.set_seed(rundir.shard_seed(cfg.seed, "ppo", 0))
    params = models.adapter_parameters(base, "policy") + models.adapter_parameters(base, "value")
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=0.0)
    kl_ctl = KLController(pc.kl_coef, pc.kl_target, pc.kl_horizon)
    stream = prompt_stream(rl_prompts(cfg), pc.batch_size, cfg.seed)
    # After the optimizer exists: the checkpoint restores it with both adapters and the random generators.
    resumed = (checkpoint.restore(out, base, ["policy", "value"], opt)
               or {"step": 0, "history": [], "kl_coef": kl_ctl.coef})
    start, history, kl_ctl.coef = resumed["step"], resumed["history"], resumed["kl_coef"]
    for _ in range(start):
        next(stream)  # seeded: skipping the batches already trained on puts it where it was
    with (out / "log.jsonl").open("w") as log_file, \
            tracking.tracker(cfg, out, start, pc.steps, learning_rate=pc.lr, per_device_train_batch_size=pc.batch_size,
                             gradient_accumulation_steps=pc.grad_accum) as report:
        log_file.writelines(json.dumps(h) + "\n" for h in history)
        # Step N: after N rollout -> update iterations, counted from 1 as Trainer counts its steps.
        for step in (bar := tqdm(range(start + 1, pc.steps + 1), desc="ppo", initial=start, total=pc.steps)):
            rec = ppo_step(cfg, base, next(stream), stats, kl_ctl, opt, params)
            report(step, rec)
            rec["step"] = step
            history.append(rec)
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()  # a killed run keeps every step it finished
            bar.set_postfix(reward=f"{rec['reward']:.3f}", kl=f"{rec['kl']:.3f}")
            if checkpoint.due(step, pc.save_every, pc.steps):
                checkpoint.save(out, base, ["policy", "value"], opt,
                                {"step": step, "history": history, "kl_coef": kl_ctl.coef})
    adapter_files.save_adapter(base, "policy", out / "adapter")
    checkpoint.done(out)
    k = max(1, min(3, len(history) // 3))
    first = sum(h["reward"] for h in history[:k]) / k
    last = sum(h["reward"] for h in history[-k:]) / k
    log.info("ppo: reward %.3f -> %.3f over %d steps (means of %d), KL %.3f", first, last, len(history), k,
             history[-1]["kl"])
    return {
        "algorithm": "ppo",
        "steps": len(history),
        "reward_first": first,
        "reward_last": last,
        "reward_rose": last > first,
        "kl_last": history[-1]["kl"],
        "kl_max": max(h["kl"] for h in history),
        "kl_coef_last": kl_ctl.coef,
        "resumed_from_step": start,
        "value_head": "separate `value` adapter + head, initialised from the reward model",
        "when_to_use": "PPO: the most sample-efficient of the three and the CAI paper's choice; it trains a value "
                       "function, so it costs the most memory and compute per step.",
    }


def ppo_step(cfg: Config, base: SharedBase, prompts: list[str], stats: dict, kl_ctl: KLController,
             opt: torch.optim.Optimizer, params: list) -> dict:
    """One rollout and its updates. Returns the step's metrics."""
    pc, g = cfg.ppo, cfg.generation
    # 1. Rollout: sample with the current policy (pure sampling, so log-prob ratios are exact).
    ro = rollout.sample(base, "policy", prompts, pc.max_new_tokens, pc.temperature, g.max_prompt_tokens,
                        pc.rollout_batch_size)
    mask = ro.mask  # (B, T)
    with torch.no_grad():
        # 2. Old log-probs (policy) and the anchor (reference), same forward, two adapters.
        old_logp = rollout.response_logprobs(base, "policy", ro, pc.temperature, pc.minibatch_size,
                                             pc.logit_chunk)  # (B, T)
        ref_logp = rollout.response_logprobs(base, "reference", ro, pc.temperature, pc.minibatch_size,
                                             pc.logit_chunk)  # (B, T)
        # 3. Sequence reward: RM score normalised by its training statistics, minus a penalty for no EOS.
        raw = rollout.score(base, ro.prompts, ro.texts, pc.minibatch_size, g.max_prompt_tokens + pc.max_new_tokens)
        score = (raw - stats["mean"]) / (stats["std"] + 1e-8)
        score = score - pc.missing_eos_penalty * (~ro.ended).float()
        # 4. Per-token rewards: -beta * KL at every token, the score on the last real token.
        kl = losses.kl_penalty(old_logp, ref_logp) * mask  # (B, T)
        rewards = -kl_ctl.coef * kl
        last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,)
        rewards[torch.arange(len(last)), last] += score
        # 5. Values and GAE advantages, whitened over the batch (variance reduction).
        with models.role(base, "value"):
            old_values = rollout.values(base, ro) * mask  # (B, T)
        adv, returns = losses.gae(rewards, old_values, mask, pc.gamma, pc.lam)
        adv = losses.whiten(adv, mask) * mask
    # 6. Several epochs of clipped updates over minibatches.
    with models.training_mode(base):
        agg, n = _update(cfg, base, ro, old_logp, old_values, adv, returns, opt, params)
    kl_seq = kl.sum(1).mean().item()
    used_coef = kl_ctl.coef
    kl_ctl.update(kl_seq, len(ro.texts))
    return {
        "reward": raw.mean().item(),
        "score_normalised": score.mean().item(),
        "kl": kl_seq,
        "kl_per_token": losses.masked_mean(kl, mask).item(),  # the unit TRL's RLOO logs, for the report's plot
        "kl_coef": used_coef,
        "response_length": mask.sum(1).mean().item(),
        "ended_with_eos": ro.ended.float().mean().item(),
        **{k: v / n for k, v in agg.items()},
    }


def _update(cfg: Config, base: SharedBase, ro: rollout.Rollout, old_logp: torch.Tensor, old_values: torch.Tensor,
            adv: torch.Tensor, returns: torch.Tensor, opt: torch.optim.Optimizer, params: list) -> tuple[dict, int]:
    """`ppo_epochs` passes of clipped policy and value updates over shuffled minibatches."""
    pc = cfg.ppo
    B = len(ro.texts)
    agg = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "entropy": 0.0}
    n = 0
    for _ in range(pc.ppo_epochs):
        perm = torch.randperm(B)
        for mb_i, start in enumerate(range(0, B, pc.minibatch_size)):
            idx = perm[start:start + pc.minibatch_size]
            mb = ro.select(idx)
            with models.role(base, "policy", trainable=True) as model:
                # Chunked, checkpointed LM head: no (b, T, V) logits are kept for backward.
                logp, ent = rollout.response_logprobs_entropy(model, mb, pc.temperature, pc.logit_chunk)  # (b, T) each
                pl, clipfrac = losses.ppo_policy_loss(logp, old_logp[idx], adv[idx], mb.mask, pc.clip_range)
                (pl / pc.grad_accum).backward()
                ent = losses.masked_mean(ent, mb.mask)
            with models.role(base, "value", trainable=True):
                v = rollout.values(base, mb)
                vl = losses.ppo_value_loss(v, old_values[idx], returns[idx], mb.mask, pc.clip_range_value)
                (pc.vf_coef * vl / pc.grad_accum).backward()
            if (mb_i + 1) % pc.grad_accum == 0 or start + pc.minibatch_size >= B:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad()
            agg["policy_loss"] += pl.item()
            agg["value_loss"] += vl.item()
            agg["clipfrac"] += clipfrac.item()
            agg["entropy"] += ent.item()
            n += 1
    return agg, n
