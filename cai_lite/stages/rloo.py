"""Stage rloo: REINFORCE leave-one-out (Ahmadian et al. 2024) with TRL's RLOOTrainer, on the shared base.

Each prompt gets `rloo.num_samples` responses; each response's baseline is the mean reward of the
others. No value function, so it needs less memory than PPO. TRL shares our base cleanly:
  - the trained adapter is a copy of `sft` handed over by `models.trl_policy`, so TRL's reference
    (its frozen `ref` copy of that adapter) is the SL-CAI model, as CAI's KL anchor should be;
  - the reward function scores through the `reward` adapter + head on the same base object, inside
    `models.role`, which restores TRL's adapter and requires_grad afterwards: no second model load.

Reads `sft/adapter`, `reward_model/adapter`, `reward_model/reward_stats.json`, the prompts and the
helpful prompts of the mix (`rloo.helpful_prompts`).
Writes `rloo/adapter/`, `rloo/log.jsonl` (a line per step), the `report_to` logs (TensorBoard: `rloo/tensorboard/`)
and, every `rloo.save_every` steps, `rloo/checkpoint/`, which a rerun resumes from (deleted at the end).

    python run.py recipe=tiny_cpu stages=[rloo]
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from datasets import Dataset
from trl import RLOOConfig, RLOOTrainer

from cai_lite import adapter_files, checkpoint, data, distributed, models, rollout, rundir, tracking
from cai_lite.config import Config, trl_args
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)


def check(cfg: Config) -> list[str]:
    return data.check_source("rloo.prompts", cfg.rloo.prompts) + data.check_source("rloo.helpful_prompts",
                                                                                  cfg.rloo.helpful_prompts)


# The contract pipeline.py reads: config keys in this stage's hash, stages it reads (OPTIONAL_READS:
# when they ran), what it leaves in rloo/ before stage.json, and the metric the run's summary shows.
KEYS = rundir.BASE_KEYS + ("lora", "data", "generation", "rloo")
READS = ("sft", "reward_model")
OPTIONAL_READS = ()
OUTPUTS = ("adapter", "log.jsonl")
HEADLINE = "reward_last"


def run(cfg: Config, base: SharedBase, out: Path) -> dict:
    rc, g = cfg.rloo, cfg.generation
    rollout.load_roles(base, cfg.path)
    stats = rollout.load_reward_stats(cfg.path)
    eos = models.eos_ids(base)  # TRL stops at any of the generation config's EOS ids
    ckpt = checkpoint.folder(out)
    resumed = checkpoint.steps_done(ckpt)
    # The raw reward of each step so far: ours, not TRL's, so the checkpoint carries it.
    raw_means: list[float] = json.loads((ckpt / "state.json").read_text())["raw_means"] if ckpt else []

    def reward_fn(prompts, completions, completion_ids, **_) -> list[float]:
        # Conversational rows: the prompt is a message list, the completion a one-message list.
        ps = [p[-1]["content"] for p in prompts]
        cs = [c[-1]["content"] for c in completions]
        raw = rollout.score(base, ps, cs, g.batch_size, g.max_prompt_tokens + rc.max_new_tokens)
        # Over every process's completions (TRL calls this on each, with as many): the step's mean, as one process logs it.
        raw_means.append(distributed.total(raw.mean()).item() / distributed.world_size())
        score = (raw - stats["mean"]) / (stats["std"] + 1e-8)
        no_eos = torch.tensor(rollout.missing_eos(completion_ids, eos), dtype=score.dtype)
        return (score - rc.missing_eos_penalty * no_eos).tolist()

    red = data.read_optional(rc.prompts, 0, cfg.data.max_prompt_chars) if rc.prompts else data.prompt_split(cfg).train
    prompts = [p.text for p in red + data.read_optional(rc.helpful_prompts, rc.helpful_limit, cfg.data.max_prompt_chars)]
    random.Random(cfg.seed).shuffle(prompts)  # so a short run still sees both kinds of prompt
    needed = rc.steps * rc.batch_size * distributed.world_size()  # each process takes rloo.batch_size prompts a step
    rows = [{"prompt": [{"role": "user", "content": prompts[i % len(prompts)]}]} for i in range(needed)]
    args = RLOOConfig(
        **trl_args(cfg, base.device.type, out),
        per_device_train_batch_size=rc.batch_size * rc.num_samples,  # completions per step
        num_generations=rc.num_samples,
        max_completion_length=rc.max_new_tokens,
        temperature=rc.temperature,
        learning_rate=rc.lr,
        beta=rc.kl_coef,
        # Policy and reference log-probs from the same deterministic function: with dropout on, the KL at
        # step 1 (policy = reference) is noise, not 0. models.trl_policy puts every p back afterwards.
        disable_dropout=True,
        max_steps=rc.steps,
    )
    # Under torchrun/accelerate only rank 0 writes logs and files.
    # TRL generates once per optimizer step here (steps_per_generation = gradient_accumulation_steps = 1),
    # so the i-th step's log goes with the i-th reward call, also after a resume.
    with models.trl_policy(base, "sft") as model, tracking.callbacks(cfg, out, resumed) as report:
        trainer = RLOOTrainer(model=model, reward_funcs=[reward_fn], args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=base.tokenizer,
                              callbacks=[*report,
                                         checkpoint.JsonlLog(out / "log.jsonl", lambda h, i: (
                                             {**h, "reward_raw": raw_means[i]} if "reward" in h else None)),
                                         checkpoint.TrainerCheckpoints(out, base, "default", rc.save_every,
                                                                       lambda: {"raw_means": raw_means})])
        tracking.quiet(trainer, "rloo")
        checkpoint.train(trainer, base, "default", out)
        if distributed.is_main():
            adapter_files.save_adapter(base, "default", out / "adapter")
    checkpoint.done(out)
    history = [h for h in trainer.state.log_history if "reward" in h]
    k = max(1, min(3, len(raw_means) // 3))
    first, last = sum(raw_means[:k]) / k, sum(raw_means[-k:]) / k
    log.info("rloo: reward %.3f -> %.3f over %d steps", first, last, len(raw_means))
    return {
        "algorithm": "rloo",
        "steps": len(history),
        "reward_first": first,
        "reward_last": last,
        "reward_rose": last > first,
        "kl_last": history[-1].get("kl") if history else None,
        "kl_max": max((h.get("kl") or 0.0) for h in history) if history else None,
        "resumed_from_step": resumed,
        "when_to_use": "RLOO: no value function, so less memory and fewer moving parts than PPO; needs several "
                       "samples per prompt (rloo.num_samples) for its leave-one-out baseline.",
    }
