"""What a run leaves loads with the usual Hugging Face calls, from any directory: a stage folder is a
dataset (`load_dataset(folder)` gives exactly the usable rows, with stage.json and failures beside
them), the reward model is a PEFT sequence classifier whose scores are cai_lite's, and an adapter
folder names its base so that AutoPeftModelForCausalLM finds it, with a model card beside it.

    python -m pytest -q tests/test_hf_outputs.py
"""

from __future__ import annotations

import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
from datasets import load_dataset
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer, BitsAndBytesConfig

from cai_lite import adapter_files, cards, data, models, pipeline, rollout, rundir

from conftest import tiny_config


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    """A run started where the base model is, with base.model and run_dir relative to there."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(tiny_llama, home / "tiny-llama")
    mp = pytest.MonkeyPatch()
    mp.chdir(home)
    try:
        cfg = tiny_config("runs/x", "tiny-llama", "stages=[critique_revise,sft,label_preferences,reward_model]",
                          "data.limit=6", "critique_revise.rounds=1", "critique_revise.helpful_limit=2",
                          "sft.max_steps=2", "label_preferences.num_principles=1", "reward_model.batch_size=2")
        pipeline.run(cfg)
    finally:
        mp.undo()
    return cfg, home


def test_stage_folders_load_as_datasets_of_exactly_the_usable_rows(run, tmp_path, monkeypatch):
    cfg, home = run
    monkeypatch.chdir(tmp_path)
    for stage in ("critique_revise", "label_preferences"):
        folder = home / "runs/x" / stage
        assert (folder / "stage.json").is_file()
        assert load_dataset(str(folder), split="train").to_list() == data.read_shards(folder)
    # With rows set aside beside the shards, of another schema: the default config still reads only the
    # shards, and the config `failed` reads the failures.
    folder = tmp_path / "label_preferences"
    shutil.copytree(home / "runs/x/label_preferences", folder)
    failed = [{"prompt": "q", "error": "no letter log-probs", "p_a": None}]
    data.write_shard(folder / "failed-00000.jsonl", failed)
    cards.write(cfg, "label_preferences", folder, {}, ["sft"], rundir.versions())
    assert load_dataset(str(folder), split="train").to_list() == data.read_shards(folder)
    assert load_dataset(str(folder), "failed", split="train").to_list() == failed


def test_the_reward_model_loads_as_a_peft_sequence_classifier_with_our_scores(run, tmp_path, monkeypatch):
    cfg, home = run
    monkeypatch.chdir(home)
    base = models.load_base(cfg)
    adapter_files.load_adapter(base, "reward", "runs/x/reward_model/adapter")
    rows = data.read_shards(rundir.stage_dir(cfg.path, "label_preferences"))
    texts = [rollout.reward_text(base.tokenizer, r["prompt"][-1]["content"], r[k])
             for r in rows for k in ("response_a", "response_b")]
    ours = rollout.score_texts(base, texts, 4, 256)
    assert ours.abs().max() > 0 and len(set(ours.tolist())) == len(texts)  # scores that differ by text
    monkeypatch.chdir(tmp_path)  # the user's own directory
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)  # as tiny_cpu trains
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(home / "runs/x/reward_model/classifier"),
                                                                   num_labels=1, dtype=torch.float32,
                                                                   quantization_config=quant)
    for m in model.modules():  # bitsandbytes' other CPU kernel for no-grad forwards, off as in cai_lite's base
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    model.config.pad_token_id = None  # one conversation at a time, as the card says
    tok = AutoTokenizer.from_pretrained(str(home / "tiny-llama"))
    with torch.no_grad():
        theirs = torch.stack([model(**tok(t, add_special_tokens=False, return_tensors="pt")).logits[0, 0]
                              for t in texts])
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    card = (home / "runs/x/reward_model/classifier/README.md").read_text()
    assert "AutoPeftModelForSequenceClassification.from_pretrained(" in card and "num_labels=1" in card


def test_adapters_name_their_base_so_they_load_from_anywhere_with_a_card(run, tmp_path, monkeypatch):
    cfg, home = run
    monkeypatch.chdir(tmp_path)
    folder = home / "runs/x/sft/adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((home / "tiny-llama").resolve())
    model = AutoPeftModelForCausalLM.from_pretrained(str(folder))
    assert model.peft_config["default"].r == cfg.lora.r
    card = (folder / "README.md").read_text()
    commit = rundir.git_commit()
    assert "library_name: peft" in card and f"base_model: {(home / 'tiny-llama').resolve()}" in card
    assert "`sft` stage" in card and "`critique_revise/`" in card and "recipe `tiny_cpu`" in card
    assert commit is None or f"commit {commit}" in card
    assert f'AutoPeftModelForCausalLM.from_pretrained("{folder.resolve()}")' in card
