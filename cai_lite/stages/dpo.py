"""Stage dpo: Direct Preference Optimization (Rafailov et al. 2023) with TRL's DPOTrainer on the AI
labels, the `sft` adapter as reference. No reward model and no sampling during training: the
cheapest of the three RL stages, but it only learns from the pairs it is given (offline).

Options: drop pairs whose judge confidence |p_a - 0.5| is below `dpo.min_confidence`; turn the soft
labels into cDPO label smoothing (`dpo.label_smoothing=soft`: eps = mean(1 - max(p_a, 1 - p_a)),
the judge's average doubt); precompute reference log-probs once.

Reads `label_preferences/part-*.jsonl` and `sft/adapter`. Writes `dpo/adapter/`, `dpo/log.jsonl`
(a line per step), the `report_to` logs (TensorBoard: `dpo/tensorboard/`) and, every `dpo.save_every`
steps, `dpo/checkpoint/`, which a rerun resumes from (deleted at the end).

    python run.py recipe=tiny_cpu stages=[dpo]
"""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from cai_lite import adapter_files, checkpoint, data, distributed, models, rundir, tracking
from cai_lite.config import Config, trl_args
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)


def preference_rows(rows: list[dict], min_confidence: float) -> tuple[list[dict], list[float]]:
    """TRL conversational preference rows (chosen = the response with the higher p_a), and their p_a."""
    out, ps = [], []
    for r in rows:
        if r["p_a"] is None or abs(r["p_a"] - 0.5) < min_confidence or r["p_a"] == 0.5:
            continue  # failed labels, ties and low-confidence pairs teach nothing reliable
        out.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
        ps.append(r["p_a"])
    return out, ps


# The contract pipeline.py reads: config keys in this stage's hash, stages it reads (OPTIONAL_READS:
# when they ran), what it leaves in dpo/ before stage.json, and the metric the run's summary shows.
KEYS = rundir.BASE_KEYS + ("lora", "dpo")
READS = ("sft", "label_preferences")
OPTIONAL_READS = ()
OUTPUTS = ("adapter", "log.jsonl")
HEADLINE = "margin_last"


def run(cfg: Config, base: SharedBase, out: Path) -> dict:
    dc = cfg.dpo
    labelled = data.read_shards(rundir.stage_dir(cfg.path, "label_preferences"))
    rows, ps = preference_rows(labelled, dc.min_confidence)
    if not rows:
        raise data.DataError(f"{rundir.stage_dir(cfg.path, 'label_preferences')}: no pairs left after dpo.min_confidence={dc.min_confidence}")
    eps = sum(1 - max(p, 1 - p) for p in ps) / len(ps) if dc.label_smoothing == "soft" else 0.0
    adapter_files.load_adapter(base, "sft", rundir.adapter_dir(cfg.path, "sft"))
    args = DPOConfig(
        **trl_args(cfg, base.device.type, out),
        per_device_train_batch_size=dc.batch_size,
        gradient_accumulation_steps=dc.grad_accum,
        learning_rate=dc.lr,
        num_train_epochs=dc.epochs,
        max_steps=dc.max_steps,
        beta=dc.beta,
        label_smoothing=eps,
        precompute_ref_log_probs=dc.precompute_ref_log_probs,
        max_length=dc.max_seq_len,
    )
    resumed = checkpoint.steps_done(checkpoint.folder(out))
    # Under torchrun/accelerate only rank 0 writes logs and files.
    with models.trl_policy(base, "sft") as model, tracking.callbacks(cfg, out, resumed) as report:
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=base.tokenizer,
                             callbacks=[*report,
                                        checkpoint.JsonlLog(out / "log.jsonl",
                                                            lambda h, i: h if "rewards/margins" in h else None),
                                        checkpoint.TrainerCheckpoints(out, base, "default", dc.save_every)])
        tracking.quiet(trainer, "dpo")
        checkpoint.train(trainer, base, "default", out)
        if distributed.is_main():
            adapter_files.save_adapter(base, "default", out / "adapter")
    checkpoint.done(out)
    history = [h for h in trainer.state.log_history if "rewards/margins" in h]
    margins = [h["rewards/margins"] for h in history]
    k = max(1, min(3, len(margins) // 3))
    metrics = {
        "algorithm": "dpo",
        "pairs": len(rows),
        "dropped_pairs": len(labelled) - len(rows),  # ties and low-confidence pairs; failed labels are elsewhere
        "label_smoothing": eps,
        "steps": trainer.state.global_step,
        "margin_first": sum(margins[:k]) / k if margins else None,
        "margin_last": sum(margins[-k:]) / k if margins else None,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "resumed_from_step": resumed,
        "when_to_use": "DPO: offline, no reward model or sampling, the least memory and compute; it cannot improve "
                       "beyond the labelled pairs, so use PPO/RLOO when you can afford on-policy samples.",
    }
    log.info("dpo: %d pairs, margin %s -> %s", len(rows),
             *(f"{m:.4g}" if m is not None else "-" for m in (metrics["margin_first"], metrics["margin_last"])))
    return metrics
