"""Stage reward_model: the `reward` LoRA adapter + a scalar head on the shared base, trained on the
judge's soft labels with the Bradley-Terry cross-entropy (CAI §4.1). TRL's RewardTrainer takes no
soft labels, so the loop is ours: it is short.

Under torchrun/accelerate (N processes) a step takes N x `reward_model.batch_size` pairs, each
process scores its share and the gradients are summed over processes (data-parallel, as DDP does);
rank 0 alone writes. A checkpoint records the first pair not yet trained on, so a resume on another
number of processes continues there (in steps of its own size).

Reads `label_preferences/part-*.jsonl` (rows with p_a; failed labels are skipped and counted).
Writes `reward_model/adapter/` (PEFT folder + head.safetensors, what later stages load),
`reward_model/classifier/` (the same as a PEFT sequence-classification folder, for transformers + peft
users: AutoPeftModelForSequenceClassification, num_labels=1), `reward_model/reward_stats.json`
(mean/std of scores on the training responses, for normalising RL rewards), `log.jsonl` (flushed
per step), the `report_to` logs (TensorBoard: `reward_model/tensorboard/`; the loss at steps 1..N,
held-out accuracy and Brier score at N) and, every `reward_model.save_every` steps,
`reward_model/checkpoint/`, which a rerun resumes from (deleted at the end).

    python run.py recipe=tiny_cpu stages=[reward_model]
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cai_lite import adapter_files, checkpoint, data, distributed, generation, losses, models, rollout, rundir, tracking
from cai_lite.config import Config
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)


def pair_scores(base: SharedBase, rows: list[dict], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of response_a and response_b for each row, under the active adapter.  -> (B,), (B,)"""
    texts = [rollout.reward_text(base.tokenizer, r["prompt"][-1]["content"], r[k])  # prompt: [user turn]
             for k in ("response_a", "response_b") for r in rows]
    enc, _ = generation.tokenize_left(base, texts, max_tokens)
    s = rollout.sequence_scores(base, "reward", enc["input_ids"], enc["attention_mask"])  # (2B,)
    return s[: len(rows)], s[len(rows):]


def loss_fn(cfg: Config, r_a: torch.Tensor, r_b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    rm = cfg.reward_model
    if rm.loss == "soft":
        return losses.soft_bt_loss(r_a, r_b, p)
    if rm.loss == "hard":
        return losses.hard_bt_loss(r_a, r_b, p)
    return losses.margin_bt_loss(r_a, r_b, p, rm.margin)


@torch.no_grad()
def evaluate_pairs(base: SharedBase, rows: list[dict], batch_size: int, max_tokens: int) -> dict:
    """Accuracy against the label's side (ties excluded) and calibration (mean predicted vs label)."""
    preds, labels = [], []
    with models.role(base, "reward"):
        for chunk in data.chunks(rows, batch_size):
            r_a, r_b = pair_scores(base, chunk, max_tokens)
            preds += torch.sigmoid(r_a - r_b).tolist()
            labels += [r["p_a"] for r in chunk]
    decided = [(p, y) for p, y in zip(preds, labels) if y != 0.5]
    return {
        "accuracy": sum((p > 0.5) == (y > 0.5) for p, y in decided) / len(decided) if decided else None,
        "mean_predicted": sum(preds) / len(preds) if preds else None,
        "mean_label": sum(labels) / len(labels) if labels else None,
        "brier": sum((p - y) ** 2 for p, y in zip(preds, labels)) / len(preds) if preds else None,
        "n": len(rows),
    }


def plan_steps(n_pairs: int, batch_size: int, epochs: int, processes: int,
               position: tuple[int, int] = (0, 0)) -> list[tuple[int, int, int]]:
    """(epoch, first, end) of each optimizer step from `position` (epoch, first pair not trained on)
    on: `batch_size` pairs per process, consecutive within an epoch; a last part of an epoch with
    fewer pairs than processes is dropped (each process needs one)."""
    out = []
    for epoch in range(position[0], epochs):
        for first in range(position[1] if epoch == position[0] else 0, n_pairs, batch_size * processes):
            end = min(first + batch_size * processes, n_pairs)
            if end - first >= processes:
                out.append((epoch, first, end))
    return out


# The contract pipeline.py reads: config keys in this stage's hash, stages it reads (OPTIONAL_READS:
# when they ran), what it leaves in reward_model/ before stage.json, and the metric the run's summary shows.
KEYS = rundir.BASE_KEYS + ("lora", "reward_model")
READS = ("label_preferences",)
OPTIONAL_READS = ()
OUTPUTS = ("adapter", "classifier", "reward_stats.json", "log.jsonl")
HEADLINE = "eval_accuracy"


def run(cfg: Config, base: SharedBase, out: Path) -> dict:
    rm = cfg.reward_model
    rows = data.read_shards(rundir.stage_dir(cfg.path, "label_preferences"))  # labelled pairs only; failures sit in failed-*.jsonl
    random.Random(cfg.seed).shuffle(rows)
    n_eval = max(1, int(round(len(rows) * rm.eval_fraction)))
    held, train = rows[:n_eval], rows[n_eval:]
    if not train:
        raise data.DataError(f"{rundir.stage_dir(cfg.path, 'label_preferences')}: {len(rows)} usable labels leave none to train on "
                             f"after holding out reward_model.eval_fraction={rm.eval_fraction}")
    if "reward" in base.adapters:
        models.delete_adapter(base, "reward")
    models.add_adapter(base, "reward")
    models.add_head(base, "reward")
    params = models.adapter_parameters(base, "reward")
    distributed.same_as_main(params)  # every process starts from rank 0's initial weights
    opt = torch.optim.AdamW(params, lr=rm.lr, weight_decay=0.0)
    # After the optimizer exists: the checkpoint restores it with the weights and the random generators.
    resumed = checkpoint.restore(out, base, ["reward"], opt) or {"step": 0, "position": [0, 0], "history": []}
    start, history = resumed["step"], resumed["history"]
    # The steps still to take, from the first pair not yet trained on: where a resume continues does
    # not depend on how many processes made the checkpoint, so none is skipped or seen twice.
    steps = plan_steps(len(train), rm.batch_size, rm.epochs, distributed.world_size(), tuple(resumed["position"]))
    total = start + len(steps)
    # Only rank 0 writes: the other processes log to nowhere.
    main = distributed.is_main()
    log_path = out / "log.jsonl" if main else Path(os.devnull)
    with tracking.tracker(cfg, out, start, total, learning_rate=rm.lr,
                          per_device_train_batch_size=rm.batch_size, num_train_epochs=rm.epochs) as report:
        with models.role(base, "reward", trainable=True) as model, log_path.open("w") as log_file:
            log_file.writelines(json.dumps(h) + "\n" for h in history)
            model.train()
            bar = tqdm(steps, desc="reward_model", initial=start, total=total, disable=not main)
            for step, (epoch, first, end) in enumerate(bar, start + 1):  # step N: after N optimizer steps, as Trainer counts
                rows = train[first:end]
                chunk = distributed.share(rows)
                r_a, r_b = pair_scores(base, chunk, rm.max_seq_len)
                p = torch.tensor([r["p_a"] for r in chunk], device=r_a.device)
                # Weighted by this process's share, so the summed gradient is that of the mean over the step's pairs.
                loss = loss_fn(cfg, r_a, r_b, p) * (len(chunk) / len(rows))
                opt.zero_grad()
                loss.backward()
                distributed.sum_gradients(params)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                history.append({"step": step, "loss": distributed.total(loss).item()})
                log_file.write(json.dumps(history[-1]) + "\n")
                log_file.flush()
                report(step, {"loss": history[-1]["loss"]})
                if checkpoint.due(step, rm.save_every, total):
                    checkpoint.save(out, base, ["reward"], opt, {"step": step, "position": [epoch, end],
                                                                 "history": history})
            model.eval()
        models.freeze(base, "reward")
        # Bradley-Terry sees score differences only: the head's bias gets no gradient but rounding residue,
        # which Adam scales to lr-sized steps. At 0, every score is that of a bias-free sequence classifier
        # (reward_model/classifier/), and RL's normalised rewards do not change.
        with torch.no_grad():
            base.heads["reward"].bias.zero_()
        evaluation = evaluate_pairs(base, held, rm.batch_size, rm.max_seq_len)
        report(len(history), {f"eval_{key}": evaluation[key] for key in ("accuracy", "brier")
                              if evaluation[key] is not None})
    scores = rollout.score(base, [r["prompt"][-1]["content"] for r in train for _ in (0, 1)],
                           [r[k] for r in train for k in ("response_a", "response_b")], rm.batch_size, rm.max_seq_len)
    stats = {"mean": scores.mean().item(), "std": scores.std().item() if len(scores) > 1 else 1.0}
    if main:
        adapter_files.save_adapter(base, "reward", out / "adapter")
        adapter_files.save_classifier(base, "reward", out / "classifier")
        (out / "reward_stats.json").write_text(json.dumps(stats) + "\n")
    checkpoint.done(out)
    base.sources["reward"] = str((out / "adapter").resolve())
    acct = models.memory_account(base)
    k = max(1, len(history) // 5)
    metrics = {
        "train_pairs": len(train),
        "eval_pairs": len(held),
        "skipped_failed_labels": len(data.read_failed(rundir.stage_dir(cfg.path, "label_preferences"))),
        "loss": rm.loss,
        "loss_first": sum(h["loss"] for h in history[:k]) / k,
        "loss_last": sum(h["loss"] for h in history[-k:]) / k,
        "eval_accuracy": evaluation["accuracy"],
        "eval_calibration": evaluation,
        "reward_stats": stats,
        "adapter_bytes": acct["adapter_bytes"]["reward"],
        "head_bytes": acct["head_bytes"]["reward"],
        "resumed_from_step": start,
    }
    log.info("reward model: loss %.3f -> %.3f, held-out accuracy %s", metrics["loss_first"], metrics["loss_last"],
             evaluation["accuracy"])
    return metrics
