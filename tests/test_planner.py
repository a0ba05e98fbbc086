"""The memory planner (`plan=true`) and `base.init=random`: terms against hand-computed numbers and
against what bitsandbytes and PEFT really allocate, the 7B table on CPU with nothing downloaded,
and random weights in a configured shape.

    python -m pytest -q tests/test_planner.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from cai_lite import cli, models, planner
from cai_lite.recipe import load_config
from cai_lite.tiny import build_shape_folder

FIXTURES = Path(__file__).parent / "fixtures"

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def test_terms_match_hand_computed_numbers():
    m = planner.count(LlamaConfig(**{k: v for k, v in SMALL.items() if k != "model_type"}), "small", ["all-linear"])
    # Per layer: q, o 64x64; k, v 64x32 (2 KV heads of 16); gate, up, down 64x128.
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert m.quantized == 2 * per_layer == 73728
    assert m.embeddings == 2 * 512 * 64  # untied: input embeddings and LM head
    assert m.other == 2 * 2 * 64 + 64  # two RMSNorms per layer and the final one
    assert m.lora_in_out == 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    s = planner.Settings(weight_bytes=2, act_bytes=2, upcast_frozen=False, checkpointing=True, lora_r=8,
                         lora_dropout=False, cuda=True)
    # 4 bits + an 8-bit absmax per 64 weights + an fp32 absmax per 256 blocks; bf16 embeddings; fp32 norms.
    assert m.quantized_tensors == 14
    assert planner.base_weights(m, s) == int(73728 / 2 + 73728 / 64 + 73728 * 4 / 16384 + 14 * 272 * 4
                                             + 65536 * 2 + 320 * 2)
    up = planner.base_weights(m, planner.Settings(**{**vars(s), "upcast_frozen": True}))
    assert up - planner.base_weights(m, s) == (65536 + 320) * 2  # fp32 instead of bf16
    assert planner.adapters(m, s, 3) == 3 * (8 * 2048 * 4 + 65 * 4)
    assert planner.optimizer(m, s, 1) == 12 * (8 * 2048 + 65)
    assert planner.kv_cache(m, s, batch=3, tokens=10) == 2 * 2 * 32 * 3 * 10 * 2
    assert planner.full_logits(m, s, 100) == 100 * 512 * 12  # bf16 logits: fp32 log-softmax, gradients
    assert planner.attention_scores(m, s, 2, 16) == 0  # fused SDPA on CUDA
    cpu = planner.Settings(**{**vars(s), "cuda": False})
    assert planner.attention_scores(m, cpu, 2, 16) == 2 * 2 * 4 * 16 * 16 * 2


def test_weights_and_adapters_match_a_loaded_nf4_model(tmp_path):
    """The planner's bytes against bitsandbytes' and PEFT's real tensors on the same shape."""
    folder = build_shape_folder(tmp_path / "m", {**SMALL, "vocab_size": 2048, "hidden_size": 128,
                                                 "intermediate_size": 256})
    cfg = load_config(["recipe=tiny_cpu", f"base.model={folder}", "base.init=random", "lora.r=4"])
    base = models.load_base(cfg)
    models.add_adapter(base, "policy")
    acct = models.memory_account(base)
    shape, name = planner.shape_config(cfg)
    m = planner.count(shape, name, ["all-linear"])
    s = planner.settings(cfg)
    assert planner.base_weights(m, s) == pytest.approx(acct["base_weight_bytes"], rel=0.001)
    assert planner.adapters(m, s, 1) - (m.hidden + 1) * 4 == acct["adapter_bytes"]["policy"]


def _inputs_in_place(tmp_path) -> list[str]:
    """Overrides that give 7b_qlora every input it reads (plan=true checks them, #26): a Qwen2.5-7B
    folder with its config and no weights, the hh-rlhf fixture, and the optional evals off."""
    folder = build_shape_folder(tmp_path / "Qwen2.5-7B-Instruct",
                                json.loads((planner.SHAPES / "qwen2.5-7b.json").read_text()))
    return [f"base.model={folder}", f"data.prompts={FIXTURES / 'hh-rlhf-harmless-base.sample.jsonl.gz'}",
            "evaluate.hhh_path=", "evaluate.harmful_vs_ethical_path="]


def test_plan_for_7b_runs_on_cpu_without_weights(capsys, tmp_path):
    ready = _inputs_in_place(tmp_path)
    assert cli.main(["recipe=7b_qlora", "plan=true", *ready]) == 0
    out = capsys.readouterr().out
    assert "Qwen2.5-7B-Instruct/config.json (7.62B" in out and "every stage fits" in out
    for stage in ("critique_revise", "sft", "label_preferences", "reward_model", "ppo", "evaluate"):
        assert any(line.startswith(stage) and line.rstrip().endswith("yes") for line in out.splitlines()), stage
    # Too small a card names the stage and the knob to turn, and the exit status says so.
    assert cli.main(["recipe=7b_qlora", "plan=true", "plan.shape=llama-2-7b", "plan.gpu_memory_gb=8", *ready]) == 1
    out = capsys.readouterr().out
    assert "llama-2-7b" in out and "NO: largest term" in out and "turn" in out


def test_upcast_frozen_shows_in_the_plan(capsys):
    cli.main(["recipe=7b_qlora", "plan=true"])
    low = capsys.readouterr().out
    cli.main(["recipe=7b_qlora", "plan=true", "base.upcast_frozen=true"])
    high = capsys.readouterr().out
    w = lambda out: float(next(li for li in out.splitlines() if li.startswith("sft")).split()[1])  # noqa: E731
    assert w(high) - w(low) == pytest.approx(2 * 152064 * 3584 * 2 / 2**30, abs=0.01)  # bf16 -> fp32, twice


def test_unknown_shape_is_one_clean_error(capsys):
    assert cli.main(["recipe=7b_qlora", "plan=true", "plan.shape=gpt-17"]) == 2
    assert "plan.shape" in capsys.readouterr().err


def test_random_init_builds_the_configured_shape(tmp_path):
    folder = build_shape_folder(tmp_path / "m", json.loads((planner.SHAPES / "mistral-7b.json").read_text())
                                | dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=1024))
    cfg = load_config(["recipe=tiny_cpu", f"base.model={folder}", "base.init=random"])
    base = models.load_base(cfg)
    inner = base.model.model
    assert type(base.model).__name__ == "MistralForCausalLM"
    assert len(inner.layers) == 2 and inner.embed_tokens.weight.shape == (1024, 128)
    assert inner.layers[0].mlp.up_proj.__class__.__name__ == "Linear4bit"
    assert inner.layers[0].self_attn.k_proj.out_features == 8 * 128 // 32  # 8 KV heads of head_dim 4
    # Seeded: the same seed gives the same weights, another seed others.
    same = models.load_base(cfg).model.model.embed_tokens.weight
    other = models.load_base(load_config(["recipe=tiny_cpu", f"base.model={folder}", "base.init=random",
                                          "seed=1"])).model.model.embed_tokens.weight
    assert torch.equal(inner.embed_tokens.weight, same) and not torch.equal(same, other)
    ids = base.tokenizer("w1 w2 w3", return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 3) and base.model(input_ids=ids).logits.shape == (1, 3, 1024)


def test_gpu_check_runs_its_steps_on_a_tiny_shape(tmp_path):
    """benchmarks/gpu_check.py --tiny: the GPU check's code path (random init, sft, the ppo stage's
    step on one base and on four) on CPU, so the script a GPU session runs once cannot rot."""
    out = tmp_path / "gc.jsonl"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--shapes", "mistral-7b",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    for step in ("sft", "ppo_shared", "ppo_one_chunk", "ppo_separate"):
        assert isinstance(res[step], dict) and res[step]["tokens_per_s"] > 0, (step, res[step])
        assert res["planner_gb"][step] > 0
    assert res["ppo_shared"]["seconds"] > 0 and "ppo_separate" in p.stdout


@pytest.mark.parametrize("upcast", [False, True])
def test_frozen_weights_are_all_bf16_or_all_fp32_and_the_model_runs(tmp_path, upcast):
    """The H200 run's bug: fp32 norms fed fp32 hidden states to a bf16 LM head. Either every unquantized
    frozen weight stays in base.dtype or (base.upcast_frozen) every one is fp32; both must run."""
    folder = build_shape_folder(tmp_path / "m", {**SMALL, "hidden_size": 128, "intermediate_size": 256})
    cfg = load_config(["recipe=tiny_cpu", f"base.model={folder}", "base.init=random", "base.dtype=bfloat16",
                       "base.compute_dtype=bfloat16", f"base.upcast_frozen={str(upcast).lower()}"])
    base = models.load_base(cfg)
    kinds = {p.dtype for p in base.model.parameters() if type(p).__name__ != "Params4bit"}
    assert kinds == ({torch.float32} if upcast else {torch.bfloat16})
    ids = base.tokenizer("w1 w2 w3", return_tensors="pt")["input_ids"]
    assert torch.isfinite(base.model(input_ids=ids).logits).all()
