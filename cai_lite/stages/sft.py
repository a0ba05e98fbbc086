"""Stage sft: fine-tune the `sft` LoRA adapter on the shared NF4 base with TRL's SFTTrainer, on the
revisions from critique_revise (CAI §3). The loss covers the completion (the revision) only.

Reads `critique_revise/part-*.jsonl`. Writes `sft/adapter/` (PEFT format, safetensors), the `report_to`
logs (TensorBoard: `sft/tensorboard/`), `sft/train_log.jsonl` (the trainer's log history, a line per step) and,
every `sft.save_every` steps, `sft/checkpoint/`, which a rerun resumes from (deleted at the end).

    python run.py recipe=tiny_cpu stages=[critique_revise,sft]
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from cai_lite import adapter_files, checkpoint, data, distributed, models, rundir, tracking
from cai_lite.config import Config, trl_args
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)


def sft_rows(rows: list[dict], targets: str, helpful_mix: float, seed: int) -> list[dict]:
    """Prompt/completion rows in TRL's conversational format. `all_rounds` adds every round's revision
    (the paper trains on all of them); helpful rows are kept at `helpful_mix` per harmless row."""
    out = []
    harmless = [r for r in rows if r["type"] == "harmless"]
    helpful = [r for r in rows if r["type"] == "helpful"]
    for r in harmless:
        # Empty revisions (a round whose output was only boilerplate) are no target: never train on them.
        revisions = [x["revision"] for x in r["rounds"]] if targets == "all_rounds" else [r["revision_response"]]
        for rev in filter(None, revisions):
            out.append({"prompt": r["prompt"], "completion": [{"role": "assistant", "content": rev}]})
    keep = min(len(helpful), int(round(helpful_mix * len(harmless))))
    for r in random.Random(seed).sample(helpful, keep):
        out.append({"prompt": r["prompt"], "completion": r["completion"]})
    return out


def losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


# The contract pipeline.py reads: config keys in this stage's hash, stages it reads (OPTIONAL_READS:
# when they ran), what it leaves in sft/ before stage.json, and the metric the run's summary shows.
KEYS = rundir.BASE_KEYS + ("lora", "sft")
READS = ("critique_revise",)
OPTIONAL_READS = ()
OUTPUTS = ("adapter", "train_log.jsonl")
HEADLINE = "loss_last"


def run(cfg: Config, base: SharedBase, out: Path) -> dict:
    s = cfg.sft
    rows = data.read_shards(rundir.stage_dir(cfg.path, "critique_revise"))
    train = sft_rows(rows, s.targets, s.helpful_mix, cfg.seed)
    if not train:
        raise data.DataError(f"{rundir.stage_dir(cfg.path, 'critique_revise')}: no rows to train on")
    if "sft" in base.adapters:
        models.delete_adapter(base, "sft")
    models.add_adapter(base, "sft")
    args = SFTConfig(
        **trl_args(cfg, base.device.type, out),
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr,
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        max_length=s.max_seq_len,
        warmup_steps=s.warmup_ratio,  # transformers 5: a float below 1 is a ratio of total steps
        completion_only_loss=True,  # the loss is on the revision, not on the red-team prompt
    )
    ckpt = checkpoint.folder(out)
    resumed = checkpoint.steps_done(ckpt)
    tokens_before = max((h.get("num_tokens", 0) for h in checkpoint.logged(ckpt)), default=0)
    # Only rank 0 writes logs and files when torchrun/accelerate start several processes.
    with models.role(base, "sft", trainable=True) as model, tracking.callbacks(cfg, out, resumed) as report:
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                             processing_class=base.tokenizer,
                             callbacks=[*report, checkpoint.JsonlLog(out / "train_log.jsonl"),
                                        checkpoint.TrainerCheckpoints(out, base, "sft", s.save_every)])
        tracking.quiet(trainer, "sft")
        trainer._total_train_tokens = int(tokens_before)  # TRL counts tokens outside the state a resume restores
        result = checkpoint.train(trainer, base, "sft", out)
    base.model.eval()
    if distributed.is_main():
        adapter_files.save_adapter(base, "sft", out / "adapter")
    checkpoint.done(out)
    base.sources["sft"] = str((out / "adapter").resolve())
    history = trainer.state.log_history
    ls = losses(history)
    tokens = max((h.get("num_tokens", 0) for h in history), default=0)
    metrics = {
        "train_rows": len(train),
        "steps": trainer.state.global_step,
        "loss_first": ls[0] if ls else None,
        "loss_last": ls[-1] if ls else None,
        "tokens_per_second": round((tokens - tokens_before) / max(result.metrics["train_runtime"], 1e-9), 1),
        "targets": s.targets,
        "resumed_from_step": resumed,
    }
    log.info("sft: %d rows, %d steps, loss %.3f -> %.3f", len(train), metrics["steps"], ls[0], ls[-1])
    return metrics
