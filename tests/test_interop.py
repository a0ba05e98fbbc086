"""The files cai_lite writes for training are drop-in datasets for TRL 1.16: `load_dataset("json")`
on critique_revise's shards feeds SFTTrainer, and on label_preferences' shards feeds DPOTrainer and
RewardTrainer, each for one step with no column surgery.

    python -m pytest tests/test_interop.py -q
"""

from __future__ import annotations

import pytest
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from cai_lite import pipeline

from conftest import tiny_config


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("interop"), tiny_llama, "stages=[critique_revise,sft,label_preferences]",
                      "critique_revise.rounds=1", "data.limit=4", "critique_revise.helpful_limit=2", "sft.max_steps=1",
                      "label_preferences.num_principles=1")
    pipeline.run(cfg)
    return cfg.path


def _args(cls, out, **kw):
    return cls(output_dir=str(out), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
               save_strategy="no", logging_steps=1, disable_tqdm=True, **kw)


def _trained(trainer) -> bool:
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    trainer.train()
    after = [p for p in trainer.model.parameters() if p.requires_grad]
    return trainer.state.global_step == 1 and any(not torch.equal(a, b) for a, b in zip(after, before))


def test_sl_cai_rows_feed_sft_trainer(run_dir, tiny_llama, tmp_path):
    from trl import SFTConfig, SFTTrainer

    ds = load_dataset("json", data_files=str(run_dir / "critique_revise" / "part-*.jsonl"), split="train")
    assert {"init_prompt", "init_response", "critic_prompt", "critic_response", "revision_prompt", "revision_response",
            "messages", "chosen", "rejected", "prompt", "completion"} <= set(ds.column_names)  # HF CAI columns kept
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(tiny_llama),
                         args=_args(SFTConfig, tmp_path, max_length=256))
    assert trainer.completion_only_loss  # TRL saw prompt-completion rows: the loss is on the revision only
    assert _trained(trainer)


def test_preference_rows_feed_dpo_and_reward_trainers(run_dir, tiny_llama, tmp_path):
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    ds = load_dataset("json", data_files=str(run_dir / "label_preferences" / "part-*.jsonl"), split="train")
    assert len(ds) == 4 and None not in ds["p_a"] and None not in ds["chosen"]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), train_dataset=ds, processing_class=tok,
                     args=_args(DPOConfig, tmp_path / "dpo", max_length=256))
    assert _trained(dpo)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    reward = RewardTrainer(model=rm, train_dataset=ds, processing_class=tok,
                           args=_args(RewardConfig, tmp_path / "rm", max_length=256))
    assert _trained(reward)


def test_stage_json_says_what_made_it_and_training_logs_to_tensorboard(run_dir):
    import importlib.metadata as md
    import json

    for stage in ("critique_revise", "sft", "label_preferences"):
        made_by = json.loads((run_dir / stage / "stage.json").read_text())["versions"]
        assert made_by["torch"] == md.version("torch") and made_by["trl"] == md.version("trl")
        assert set(made_by) == {"cai_lite", "torch", "transformers", "trl", "peft", "bitsandbytes", "git_commit"}
    assert list((run_dir / "sft" / "tensorboard").glob("events.out.tfevents*"))
