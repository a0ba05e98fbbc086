"""SL-CAI: critique_revise rows, resume after a kill, and SFT that learns.

    python -m pytest tests/test_sl_cai.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import shutil
import time

import pytest
import torch

from cai_lite import data, models, pipeline
from cai_lite.stages import sft

from conftest import FIXTURES, ROOT, tiny_config

COLUMNS = {"init_prompt", "init_response", "critic_prompt", "critic_response", "revision_prompt", "revision_response",
           "prompt", "completion", "messages", "chosen", "rejected", "rounds", "id", "type", "has_target"}


def test_critique_revise_then_sft(tmp_path, tiny_llama):
    cfg = tiny_config(tmp_path / "run", tiny_llama, "stages=[critique_revise,sft]", "critique_revise.rounds=3",
                      "data.limit=6", "critique_revise.helpful_limit=2", "sft.max_steps=3", "sft.targets=all_rounds")
    out = pipeline.run(cfg)
    rows = data.read_shards(cfg.path / "critique_revise")
    assert len(rows) == 8 and out["critique_revise"]["rows"] == 8
    harmless = [r for r in rows if r["type"] == "harmless"]
    assert len(harmless) == 6
    for r in rows:
        assert COLUMNS <= set(r)
        assert r["prompt"] == [{"role": "user", "content": r["init_prompt"]}] == r["messages"][:1]
        assert r["chosen"] == r["completion"] == r["messages"][1:]
        assert r["rejected"] == [{"role": "assistant", "content": r["init_response"]}]
    for r in harmless:
        assert len(r["rounds"]) == 3
        assert r["revision_response"] == r["rounds"][-1]["revision"] == r["completion"][0]["content"]
        assert r["critic_prompt"] and r["revision_prompt"]
    principles = {x["principle_id"] for r in harmless for x in r["rounds"]}
    assert len(principles) > 3  # sampled per round, not fixed
    assert (cfg.path / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert out["sft"]["train_rows"] == 6 * 3 + 2  # every round's revision, plus the helpful rows


def test_hh_rlhf_prompts(tmp_path, tiny_llama):
    cfg = tiny_config(tmp_path / "hh", tiny_llama, "stages=[critique_revise]", "critique_revise.rounds=1",
                      f"data.prompts={FIXTURES / 'hh-rlhf-harmless-base.sample.jsonl.gz'}", "data.limit=4",
                      "data.eval_prompts=2", "critique_revise.helpful_prompts=", "data.max_prompt_chars=60")
    out = pipeline.run(cfg)
    rows = data.read_shards(cfg.path / "critique_revise")
    assert len(rows) == 4 and all(len(r["init_prompt"]) <= 60 for r in rows)
    assert out["critique_revise"]["truncated_prompt_chars"] > 0


def _kill_after_first_shard(args: list[str], out, sig=signal.SIGKILL) -> tuple[list[str], int, str]:
    """Start run.py, send `sig` to its process group once `out` holds a finished shard; return the
    shards kept, the exit status and what it printed to stderr."""
    # A shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # give the child the default disposition, as a terminal would.
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 180
        while not (out / "part-00000.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, f"run.py exited with {proc.returncode} before it was killed"
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # it did not stop: do not leave it running after the test
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "stage.json").exists(), "the stage finished before the kill; the test proved nothing"
    return sorted(p.name for p in out.glob("part-*.jsonl")), proc.returncode, err


def test_ctrl_c_says_how_to_continue_and_the_rerun_finishes(tmp_path, tiny_llama):
    args = ["recipe=tiny_cpu", f"run_dir={tmp_path / 'int'}", f"base.model={tiny_llama}", "base.create=none",
            "stages=[critique_revise]", "critique_revise.shard_size=2", "data.limit=12", "critique_revise.helpful_prompts=",
            "generation.max_new_tokens=96"]
    out = tmp_path / "int" / "critique_revise"
    kept, status, err = _kill_after_first_shard(args, out, signal.SIGINT)
    assert status == 130 and "Traceback" not in err, err
    assert "interrupted. Finished stages and shards are kept; run the same command again to resume" in err
    result = pipeline.run(tiny_config(tmp_path / "int", tiny_llama, *args[4:]))
    assert result["critique_revise"]["resumed_shards"] == len(kept) >= 1 and len(data.read_shards(out)) == 12


@pytest.mark.parametrize("stage", ["critique_revise", "label_preferences"])
def test_kill_and_resume_gives_the_uninterrupted_bytes(tmp_path, tiny_llama, stage):
    stages = "stages=[critique_revise]" if stage == "critique_revise" else "stages=[critique_revise,sft,label_preferences]"
    args = ["recipe=tiny_cpu", f"run_dir={tmp_path / 'kill'}", f"base.model={tiny_llama}", "base.create=none", stages,
            "critique_revise.shard_size=2", "label_preferences.shard_size=2", "data.limit=12", "sft.max_steps=2",
            "critique_revise.helpful_prompts=", "generation.max_new_tokens=96", "critique_revise.rounds=2"]
    out = tmp_path / "kill" / stage
    kept, status, _ = _kill_after_first_shard(args, out)
    assert status == -signal.SIGKILL and 1 <= len(kept) < 6
    cfg = tiny_config(tmp_path / "kill", tiny_llama, *args[4:])
    result = pipeline.run(cfg)
    assert result[stage]["resumed_shards" if stage == "critique_revise" else "labels"] == \
        (len(kept) if stage == "critique_revise" else 12)
    rows = data.read_shards(out)
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    # The same run, never interrupted and batched otherwise (each row samples from its own seed, so
    # rows do not depend on their batch): every shard, resumed or not, has the same bytes.
    straight = tmp_path / "straight"
    for done in ("critique_revise", "sft") if stage == "label_preferences" else ():
        shutil.copytree(tmp_path / "kill" / done, straight / done)  # the same inputs, so only resuming differs
    pipeline.run(tiny_config(straight, tiny_llama, *args[4:], "generation.batch_size=1"))
    names = sorted(p.name for p in out.glob("*.jsonl"))
    assert names == sorted(p.name for p in (straight / stage).glob("*.jsonl")) and len(names) >= 6
    for name in names:
        assert (out / name).read_bytes() == (straight / stage / name).read_bytes(), name


def _revision_logprob(base, adapter, rows) -> float:
    """Sum of log p(revision tokens | prompt) over the rows."""
    total = 0.0
    with torch.no_grad(), models.role(base, adapter) as model:
        for r in rows:
            prompt = data.render(base.tokenizer, r["prompt"])
            full = base.tokenizer.apply_chat_template(r["messages"], tokenize=False)
            p_ids = base.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([base.tokenizer(full, add_special_tokens=False)["input_ids"]])
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            tgt = ids[0, 1:]
            total += logp[torch.arange(len(tgt)), tgt][len(p_ids) - 1:].sum().item()
    return total


def test_sft_learns_the_revisions(tmp_path, tiny_llama, nf4_base):
    cfg = tiny_config(tmp_path / "sft", tiny_llama, "sft.max_steps=30", "sft.lr=5e-3", "sft.batch_size=4")
    revisions = ["I won't help with that, but here is why, and what you can do instead.",
                 "That could hurt someone. A safer way to get what you need is to ask for help."]
    rows = [{"id": f"r{i}", "type": "harmless", "prompt": [{"role": "user", "content": f"Question number {i}?"}],
             "init_response": "sure", "revision_response": revisions[i % 2],
             "rounds": [{"principle_id": "harm", "critique": "c", "revision": revisions[i % 2]}],
             "messages": [{"role": "user", "content": f"Question number {i}?"},
                          {"role": "assistant", "content": revisions[i % 2]}]} for i in range(8)]
    (cfg.path / "critique_revise").mkdir(parents=True)
    data.write_shard(data.shard_path(cfg.path / "critique_revise", 0), rows)
    (cfg.path / "sft").mkdir()
    metrics = sft.run(cfg, nf4_base, cfg.path / "sft")
    assert metrics["loss_last"] < 0.5 * metrics["loss_first"], metrics
    assert _revision_logprob(nf4_base, "sft", rows) > _revision_logprob(nf4_base, None, rows) + 50
    log = [json.loads(line) for line in (cfg.path / "sft" / "train_log.jsonl").read_text().splitlines()]
    assert len([h for h in log if "loss" in h]) == 30
    assert list((cfg.path / "sft" / "tensorboard").glob("events.out.tfevents*")), "no TensorBoard log"


def test_swappable_critique_adapter_from_any_peft_folder(tmp_path, tiny_llama):
    """A PEFT folder written by PEFT itself (not by cai_lite) becomes the `critique` adapter, and the
    critiques change while the policy's initial answers do not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained-looking adapter: LoRA B starts at zero
    peft_model.save_pretrained(tmp_path / "critic")
    common = ["stages=[critique_revise]", "critique_revise.rounds=1", "data.limit=4", "critique_revise.helpful_prompts=",
              "generation.temperature=0"]
    plain_run = pipeline.run(tiny_config(tmp_path / "a", tiny_llama, *common))
    swapped = tiny_config(tmp_path / "b", tiny_llama, *common, f"critique_revise.critic_adapter={tmp_path / 'critic'}")
    pipeline.run(swapped)
    assert plain_run["critique_revise"]["rows"] == 4
    a = {r["id"]: r for r in data.read_shards(tmp_path / "a" / "critique_revise")}
    b = {r["id"]: r for r in data.read_shards(tmp_path / "b" / "critique_revise")}
    assert all(a[i]["init_response"] == b[i]["init_response"] for i in a)
    assert any(a[i]["critic_response"] != b[i]["critic_response"] for i in a)
