"""The shared NF4 base and its named adapters, on CPU with bitsandbytes 0.50.

    python -m pytest tests/test_models.py -q
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from cai_lite import adapter_files, models, rollout
from cai_lite.data import DataError

from conftest import tiny_config


def _batch(base, text="Human: how do I pick a lock? Assistant:"):
    return base.tokenizer([text], return_tensors="pt", add_special_tokens=False)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


def _randomize(base, name, seed):
    """Give an adapter non-zero weights (LoRA starts as the identity) so it changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in base.model.named_parameters():
            if f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.fixture(scope="module")
def base3(nf4_base):
    """The module's base with three distinct adapters and the reward head."""
    for i, name in enumerate(("sft", "policy", "reward")):
        if name not in nf4_base.adapters:
            models.add_adapter(nf4_base, name)
            _randomize(nf4_base, name, i)
    if "reward" not in nf4_base.heads:
        models.add_head(nf4_base, "reward")
    return nf4_base


def _linear4bit(base):
    return {n: m for n, m in base.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_loads_in_nf4_on_cpu(nf4_base):
    layers = _linear4bit(nf4_base)
    assert layers, "no Linear4bit layers: the base was not quantized"
    assert all(m.weight.quant_state.quant_type == "nf4" for m in layers.values())
    assert nf4_base.device.type == "cpu"


def test_adapters_share_one_copy_of_the_base(base3):
    batch = _batch(base3)
    _logits(base3.model, batch)  # bitsandbytes repacks 4-bit weights for CPU on first use; compare after that
    seen = {}
    for name in ("sft", "policy", "reward", None):
        with models.role(base3, name) as model:
            _logits(model, batch)
            seen[name] = {n: (id(m.weight), m.weight.data_ptr()) for n, m in _linear4bit(base3).items()}
    ref = seen[None]
    assert len(ref) == 14  # 2 layers x 7 projections
    for name, storage in seen.items():
        assert storage == ref, f"adapter {name} sees other base weights"
    acct = models.memory_account(base3)
    r = base3.cfg.lora.r
    lora_params = sum(r * (m.in_features + m.out_features) for m in _linear4bit(base3).values())
    for name in ("sft", "policy", "reward"):
        assert acct["adapter_bytes"][name] == lora_params * 4  # fp32 LoRA A and B on every linear layer
    assert acct["head_bytes"]["reward"] == (base3.hidden_size + 1) * 4
    # 4-bit linears: far below their fp32 size, at least their packed size.
    fp32 = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(base3.cfg.base.model).parameters())
    packed = sum(m.in_features * m.out_features // 2 for m in _linear4bit(base3).values())
    assert packed < acct["base_weight_bytes"] < fp32


def test_adapters_change_the_output_distinctly(base3):
    batch = _batch(base3)
    outs = {}
    for name in ("sft", "policy", None):
        with models.role(base3, name) as model:
            outs[name] = _logits(model, batch)
    assert not torch.allclose(outs["sft"], outs["policy"])
    assert not torch.allclose(outs["sft"], outs[None])


def _state(base):
    return base.model.active_adapter, {n: p.requires_grad for n, p in base.model.named_parameters()}


def test_active_adapter_restores_adapter_and_requires_grad(base3):
    batch = _batch(base3)
    with models.active_adapter(base3.model, "sft"):
        before_state = _state(base3)
        sft_logits = _logits(base3.model, batch)
        with models.active_adapter(base3.model, "policy", trainable=True):
            assert any(p.requires_grad for n, p in base3.model.named_parameters() if ".policy." in n)
            assert not any(p.requires_grad for n, p in base3.model.named_parameters() if ".sft." in n)
        assert _state(base3) == before_state
        # The layers really run `sft` again, not just the bookkeeping.
        assert torch.equal(_logits(base3.model, batch), sft_logits)
        with pytest.raises(RuntimeError, match="boom"):
            with models.active_adapter(base3.model, "reward", trainable=True):
                raise RuntimeError("boom")
        assert _state(base3) == before_state
        assert torch.equal(_logits(base3.model, batch), sft_logits)


def test_active_adapter_inside_no_adapter(base3):
    batch = _batch(base3)
    with models.active_adapter(base3.model, "policy"):
        policy = _logits(base3.model, batch)
    with models.no_adapter(base3.model):
        bare = _logits(base3.model, batch)
        with models.active_adapter(base3.model, "policy"):
            assert torch.equal(_logits(base3.model, batch), policy)
        assert torch.equal(_logits(base3.model, batch), bare)


def test_unknown_adapter_is_a_clear_error(base3):
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        with models.active_adapter(base3.model, "nope"):
            pass


def test_no_adapter_equals_plain_base(base3, tiny_llama):
    batch = _batch(base3)
    with models.no_adapter(base3.model) as model:
        shared = _logits(model, batch)
    plain = AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    for m in plain.modules():  # same kernel as the shared base: bitsandbytes' bf16 CPU inference layout off
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    assert torch.allclose(shared, _logits(plain, batch), atol=1e-5)


def test_save_and_load_round_trip(base3, tmp_path):
    batch = _batch(base3)
    with models.role(base3, "reward") as model:
        before = _logits(model, batch)
        score = rollout.sequence_scores(base3, "reward", batch["input_ids"], batch["attention_mask"])
    folder = adapter_files.save_adapter(base3, "reward", tmp_path / "reward")
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "head.safetensors").is_file()
    adapter_files.load_adapter(base3, "reward_copy", folder)
    with models.role(base3, "reward_copy") as model:
        assert torch.allclose(_logits(model, batch), before, atol=1e-6)
        assert torch.allclose(rollout.sequence_scores(base3, "reward_copy", batch["input_ids"], batch["attention_mask"]),
                              score, atol=1e-6)
    assert not any(p.requires_grad for p in models.adapter_parameters(base3, "reward_copy"))
    models.delete_adapter(base3, "reward_copy")
    with pytest.raises(DataError, match="not a PEFT adapter folder"):
        adapter_files.load_adapter(base3, "x", tmp_path / "missing")


def test_lora_on_nf4_learns(tiny_llama, tmp_path):
    """30 steps on one fixed batch must lower the LM loss clearly."""
    base = models.load_base(tiny_config(tmp_path, tiny_llama))
    models.add_adapter(base, "sft")
    batch = _batch(base, "The assistant explains its reasons instead of refusing without a word.")
    params = models.adapter_parameters(base, "sft")
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    with models.role(base, "sft", trainable=True) as model, models.training_mode(base):
        for _ in range(30):
            loss = model(**batch, labels=batch["input_ids"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not any(p.requires_grad for p in base.model.parameters()), "training left parameters trainable"


def test_gradients_through_the_base_are_right_after_generation(tiny_llama, tmp_path):
    """bitsandbytes would repack 4-bit weights for CPU inference on the first no-grad forward, after
    which the backward through them is silently wrong. Gradients must not depend on that history."""
    import warnings

    def first_layer_grad(warm_up: bool) -> torch.Tensor:
        base = models.load_base(tiny_config(tmp_path / str(warm_up), tiny_llama))
        models.add_adapter(base, "sft")
        _randomize(base, "sft", 0)
        batch = _batch(base)
        if warm_up:
            with torch.no_grad():
                base.model(**batch)  # what a generation stage does before training
        with models.role(base, "sft", trainable=True) as model, models.training_mode(base):
            model(**batch, labels=batch["input_ids"]).loss.backward()
        return next(p.grad for n, p in base.model.named_parameters() if "layers.0.self_attn.q_proj.lora_A.sft" in n)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = first_layer_grad(True)
    assert not [w for w in caught if "gemv_4bit" in str(w.message)]
    assert torch.allclose(after, first_layer_grad(False), atol=1e-6)


def test_qwen2_tiny_model_shares_its_base_too(tiny_qwen2, tmp_path):
    base = models.load_base(tiny_config(tmp_path, tiny_qwen2))
    assert base.model.config.model_type == "qwen2" and _linear4bit(base)
    models.add_adapter(base, "policy")
    _randomize(base, "policy", 3)
    batch = _batch(base)
    with models.role(base, "policy") as m:
        adapted = _logits(m, batch)
    with models.role(base, None) as m:
        bare = _logits(m, batch)
    assert not torch.allclose(adapted, bare) and torch.isfinite(adapted).all()


def test_nested_switching_restores_heads_and_flags(base3):
    with models.role(base3, "sft"), models.no_adapter(base3.model):
        with models.active_adapter(base3.model, "policy"):
            assert not any(p.requires_grad for p in base3.model.parameters())  # nothing trainable leaks in
    with models.role(base3, "reward", trainable=True):
        assert all(p.requires_grad for p in base3.heads["reward"].parameters())
        with models.role(base3, "reward"):  # a frozen look at the same role, e.g. scoring mid-training
            assert not any(p.requires_grad for p in base3.heads["reward"].parameters())
        assert all(p.requires_grad for p in base3.heads["reward"].parameters())
    assert not any(p.requires_grad for p in base3.heads.parameters())
