"""The one frozen base model of a run, and the named LoRA adapters and scalar heads that share it.

This is the only module that touches bitsandbytes or PEFT's adapter API. It reads the base model
folder (safetensors only, never remote code unless `base.trust_remote_code`), PEFT adapter folders
and `head.safetensors` files; it writes adapter folders in PEFT format (adapter_config.json +
adapter_model.safetensors) with the head beside them.

Roles (adapter names): `sft`, `policy`, `reference` (a frozen copy of `sft`), `reward` (+ head),
`value` (+ head), `critique` (any PEFT folder). Switch only through `active_adapter()` and
`no_adapter()`: PEFT's `set_adapter()` makes the activated adapter trainable and freezes the
rest, so both context managers restore the active adapter *and* every `requires_grad` on exit.

    python -c "from cai_lite.recipe import load_config; from cai_lite import models; \
               print(models.memory_account(models.load_base(load_config(['recipe=tiny_cpu']))))"
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from cai_lite.config import Config

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SharedBase:
    """The base model loaded once per process, plus everything that rides on it."""

    model: PreTrainedModel | PeftModel  # becomes a PeftModel when the first adapter is added
    tokenizer: object
    device: torch.device
    cfg: Config
    heads: torch.nn.ModuleDict = field(default_factory=torch.nn.ModuleDict)
    sources: dict[str, str] = field(default_factory=dict)  # adapter -> folder it came from

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config) if isinstance(self.model, PeftModel) else []

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_base(cfg: Config) -> SharedBase:
    """Load `cfg.base.model` once: NF4 with double quantization and bf16 compute, or unquantized."""
    b = cfg.base
    device = pick_device(b.device)
    kwargs: dict = dict(dtype=DTYPES[b.dtype], trust_remote_code=b.trust_remote_code, use_safetensors=True)
    if b.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # QLoRA §3: quantize the absmax constants too (~0.4 bit/param saved)
            bnb_4bit_compute_dtype=DTYPES[b.compute_dtype],
        )
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(b.model, **kwargs)
    if b.quantization == "none":
        model.to(device)
    else:
        _keep_cpu_weights_trainable(model)
    tokenizer = AutoTokenizer.from_pretrained(b.model, trust_remote_code=b.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation and last-token scoring both want left padding
    if b.quantization == "nf4":
        # Casts norms/embeddings to fp32 for stable training and hooks input grads for checkpointing.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=b.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif b.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    for p in model.parameters():
        p.requires_grad_(False)  # the base is frozen; only adapters and heads ever train
    model.eval()
    log.info("loaded base %s (%s) on %s", b.model, b.quantization, device)
    return SharedBase(model=model, tokenizer=tokenizer, device=device, cfg=cfg)


def _keep_cpu_weights_trainable(model: PreTrainedModel) -> None:
    """Stop bitsandbytes 0.50 from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16 the first no-grad forward in eval mode converts each Linear4bit to a
    packed layout, after which every matmul goes through `gemv_4bit`, an op with no autograd kernel:
    gradients through the frozen base then come out silently wrong (PyTorch only warns), so any
    LoRA trained after a generation stage would learn from a broken backward pass. The standard
    dequantize-and-matmul path is differentiable, and the weights then never move."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def _lora_config(cfg: Config) -> LoraConfig:
    lo = cfg.lora
    targets: str | list[str] = "all-linear" if lo.target_modules == ["all-linear"] else list(lo.target_modules)
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=targets, task_type="CAUSAL_LM")


def add_adapter(base: SharedBase, name: str, init_from: str | None = None, config: LoraConfig | None = None) -> None:
    """Add a LoRA adapter `name` (fresh, or a weight copy of `init_from`), frozen until trained."""
    if name in base.adapters:
        raise ValueError(f"adapter {name!r} already exists (adapters: {base.adapters})")
    if init_from is not None:
        config = base.model.peft_config[init_from]
    config = config or _lora_config(base.cfg)
    if isinstance(base.model, PeftModel):
        base.model.add_adapter(name, config)
    else:
        # First adapter: wrap. PEFT injects LoRA layers in place, so the base weights stay the same objects.
        base.model = get_peft_model(base.model, config, adapter_name=name)
    if init_from is not None:
        with torch.no_grad():
            for dst, src in zip(_lora_tensors(base, name), _lora_tensors(base, init_from)):
                dst[1].copy_(src[1])
        if init_from in base.heads:
            base.heads[name] = _new_head(base)
            base.heads[name].load_state_dict(base.heads[init_from].state_dict())
        base.sources[name] = f"copy of {init_from}"
    freeze(base, name)


def _lora_tensors(base: SharedBase, name: str) -> list[tuple[str, torch.Tensor]]:
    """(key without the adapter name, tensor) of adapter `name`, in module order.

    Read from named_parameters, never state_dict(): on CPU, bitsandbytes repacks 4-bit weights when
    a state dict is taken, which nudges every later output of the shared base."""
    return [(n.replace(f".{name}.", "."), p) for n, p in base.model.named_parameters() if f".{name}." in n]


def copy_adapter(base: SharedBase, src: str, dst: str) -> None:
    """Make `dst` an exact, frozen weight copy of `src` (replacing `dst` if it exists)."""
    if dst in base.adapters:
        delete_adapter(base, dst)
    add_adapter(base, dst, init_from=src)


def delete_adapter(base: SharedBase, name: str) -> None:
    base.model.delete_adapter(name)
    if name in base.heads:
        del base.heads[name]
    base.sources.pop(name, None)


def _new_head(base: SharedBase) -> torch.nn.Linear:
    # Zero init: a new head scores everything 0, so training puts into it only what separates the
    # labelled pairs. A random head would add a fixed random function of the text, which the
    # pairwise loss never removes (it sees differences only) and RL would then chase.
    head = torch.nn.Linear(base.hidden_size, 1, bias=True).to(base.device, torch.float32)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.requires_grad_(False)
    return head


def add_head(base: SharedBase, name: str) -> None:
    """A scalar head (hidden -> 1, fp32) for the adapter of the same name: `reward` or `value`."""
    base.heads[name] = _new_head(base)


def freeze(base: SharedBase, name: str) -> None:
    for n, p in base.model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)
    if name in base.heads:
        base.heads[name].requires_grad_(False)


def adapter_parameters(base: SharedBase, name: str) -> list[torch.nn.Parameter]:
    """The LoRA tensors of adapter `name`, plus its head if it has one."""
    params = [p for n, p in base.model.named_parameters() if f".{name}." in n]
    if name in base.heads:
        params += list(base.heads[name].parameters())
    return params


def save_adapter(base: SharedBase, name: str, folder: str | Path) -> Path:
    """Write `name` as a plain PEFT folder any PEFT user can load, plus `head.safetensors` if it has a head."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # PEFT's own key format (adapter name removed), so PeftModel.from_pretrained reads the folder.
    state = {k: v.detach().contiguous().cpu() for k, v in _lora_tensors(base, name)}
    save_file(state, folder / "adapter_model.safetensors")
    base.model.peft_config[name].save_pretrained(folder)
    if name in base.heads:
        save_file({k: v.detach().cpu() for k, v in base.heads[name].state_dict().items()}, folder / "head.safetensors")
    return folder


def load_adapter(base: SharedBase, name: str, folder: str | Path, replace: bool = False) -> None:
    """Load a PEFT adapter folder as `name` (frozen), with its head if `head.safetensors` is there.

    Loading the folder an adapter already came from is a no-op, so stages that run in one process
    after the stage that trained the adapter do not load it twice."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")
    if name in base.adapters:
        if base.sources.get(name) == str(folder.resolve()) and not replace:
            return
        delete_adapter(base, name)
    if not (folder / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors (cai_lite loads safetensors only)")
    # Not PEFT's load_adapter(): it takes a state dict of the whole model, which on CPU makes
    # bitsandbytes repack the shared 4-bit weights (see _lora_tensors). Add, then copy tensors in.
    add_adapter(base, name, config=LoraConfig.from_pretrained(str(folder)))
    saved = load_file(folder / "adapter_model.safetensors")
    mine = dict(_lora_tensors(base, name))
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or extra:
        delete_adapter(base, name)
        raise ValueError(f"{folder}: adapter does not fit this base (missing {missing[:2]}, unexpected {extra[:2]})")
    with torch.no_grad():
        for key, tensor in mine.items():
            tensor.copy_(saved[key])
    if (folder / "head.safetensors").is_file():
        base.heads[name] = _new_head(base)
        base.heads[name].load_state_dict(load_file(folder / "head.safetensors", device=str(base.device)))
    base.sources[name] = str(folder.resolve())
    freeze(base, name)


def _snapshot_grads(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, bool]]:
    return [(p, p.requires_grad) for p in model.parameters()]


@contextlib.contextmanager
def active_adapter(model: PeftModel, name: str, trainable: bool = False) -> Iterator[PeftModel]:
    """Run the block with adapter `name` active (trainable or not); restore everything on exit.

    Restores the previously active adapter, the enabled/disabled state of adapter layers (so it
    also works inside `no_adapter`), and each parameter's `requires_grad`, also when the block raises."""
    if not isinstance(model, PeftModel) or name not in model.peft_config:
        have = list(model.peft_config) if isinstance(model, PeftModel) else []
        raise KeyError(f"no adapter named {name!r} on the base (adapters: {have})")
    grads = _snapshot_grads(model)
    previous = model.active_adapter
    was_disabled = model._adapters_disabled  # PEFT's flag for "inside disable_adapter()"
    try:
        if was_disabled:
            model.base_model.enable_adapter_layers()
            model._adapters_disabled = False
        model.set_adapter(name, inference_mode=not trainable)  # PeftModel's, so its active_adapter follows
        for p, _ in grads:  # set_adapter only touches LoRA tensors; keep everything else frozen as it was
            p.requires_grad_(False)
        if trainable:
            for n, p in model.named_parameters():
                if f".{name}." in n:
                    p.requires_grad_(True)
        yield model
    finally:
        model.set_adapter(previous, inference_mode=True)
        if was_disabled:
            model.base_model.disable_adapter_layers()
            model._adapters_disabled = True
        for p, flag in grads:
            p.requires_grad_(flag)


@contextlib.contextmanager
def no_adapter(model: PreTrainedModel | PeftModel) -> Iterator[PreTrainedModel | PeftModel]:
    """Run the block on the bare base (every adapter disabled); restore adapters and requires_grad."""
    if not isinstance(model, PeftModel):
        yield model  # no adapter was ever added: the model is the bare base
        return
    grads = _snapshot_grads(model)
    try:
        with model.disable_adapter():
            yield model
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)


@contextlib.contextmanager
def role(base: SharedBase, name: str | None, trainable: bool = False) -> Iterator[PreTrainedModel | PeftModel]:
    """`active_adapter` for a named role, `no_adapter` for None (the bare base)."""
    if name is None:
        with no_adapter(base.model) as m:
            yield m
    else:
        with active_adapter(base.model, name, trainable=trainable) as m:
            if name in base.heads and trainable:
                base.heads[name].requires_grad_(True)
            try:
                yield m
            finally:
                if name in base.heads:
                    base.heads[name].requires_grad_(False)


@contextlib.contextmanager
def training_mode(base: SharedBase) -> Iterator[None]:
    """Train mode (so gradient checkpointing applies) with every dropout off: RL ratios and values must
    come from the same deterministic function that scored the rollout."""
    dropouts = [m for m in base.model.modules() if isinstance(m, torch.nn.Dropout)]
    base.model.train()
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        base.model.eval()


@contextlib.contextmanager
def trl_policy(base: SharedBase, init_from: str) -> Iterator[PeftModel]:
    """Hand the shared base to a TRL trainer that fine-tunes an existing adapter (DPO, RLOO).

    TRL 1.16 hard-codes two adapter names for that case: it trains `default` and, when it is
    constructed, adds `ref` as a frozen copy of `default` to serve as the reference
    (trl/trainer/dpo_trainer.py, rloo_trainer.py). So `default` starts as a copy of `init_from`,
    which makes the reference the SL-CAI model. On exit both are deleted (save `default` inside
    the block), and the forward patch TRL adds to the base model (its fused LM head) is removed."""
    inner = base.model.get_base_model()
    patched_before = "forward" in vars(inner)
    copy_adapter(base, init_from, "default")
    try:
        with active_adapter(base.model, "default", trainable=True) as model:
            yield model
    finally:
        for name in ("default", "ref"):
            if name in base.adapters:
                delete_adapter(base, name)
        if not patched_before and "forward" in vars(inner):
            del inner.forward  # back to the class's own forward
        base.model.eval()


def last_hidden(base: SharedBase, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states of the decoder under the active adapter, skipping the LM head:
    for a 150k vocabulary the logits would cost far more memory than the scores need.  -> (B, T, H)"""
    decoder = base.model.get_base_model().get_decoder() if isinstance(base.model, PeftModel) else base.model.get_decoder()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # skip left padding, as generate() does
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state


def sequence_scores(base: SharedBase, head: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score of each sequence at its last real token (inputs left-padded).  -> (B,)"""
    hidden = last_hidden(base, input_ids, attention_mask)  # (B, T, H)
    return base.heads[head](hidden[:, -1, :].float()).squeeze(-1)  # left padding puts the last token at T-1


def token_values(base: SharedBase, head: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position scalar (the PPO value estimate V(s_t)).  -> (B, T)"""
    hidden = last_hidden(base, input_ids, attention_mask)  # (B, T, H)
    return base.heads[head](hidden.float()).squeeze(-1)


def base_weight_tensors(base: SharedBase) -> dict[str, torch.Tensor]:
    """Every frozen base weight (quantized Linear4bit weights included), by module path."""
    return {n: p for n, p in base.model.named_parameters() if "lora_" not in n}


def memory_account(base: SharedBase) -> dict:
    """Bytes of base weights (incl. quantization constants) and of each adapter and head."""
    base_bytes = sum(t.numel() * t.element_size() for t in base_weight_tensors(base).values())
    for module in base.model.modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)  # bitsandbytes' absmax/code live here
        if qs is not None:
            base_bytes += sum(t.numel() * t.element_size() for t in _quant_tensors(qs))
    adapters = {}
    for name in base.adapters:
        adapters[name] = sum(p.numel() * p.element_size() for n, p in base.model.named_parameters() if f".{name}." in n)
    heads = {n: sum(p.numel() * p.element_size() for p in h.parameters()) for n, h in base.heads.items()}
    return {"base_weight_bytes": base_bytes, "adapter_bytes": adapters, "head_bytes": heads}


def _quant_tensors(qs) -> list[torch.Tensor]:
    # absmax per block, the NF4 code book and, with double quantization, the nested absmax.
    # (On CPU, bitsandbytes repacks weights on first use and folds the nested level back in.)
    return [v for v in qs.as_dict(packed=False).values() if isinstance(v, torch.Tensor)]


def merged_copy(base: SharedBase, adapter_folder: Path | None, dtype: str) -> PreTrainedModel:
    """A standalone model: a de-quantized copy of the base with the adapter merged in (for export).

    The shared base stays untouched. Its NF4 tensors cannot be read back on CPU once bitsandbytes
    has repacked them, so each quantized weight is re-quantized from the original file with the same
    NF4 settings and de-quantized: the merge then lands on the weights the adapter was trained on."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    b = base.cfg.base
    full = AutoModelForCausalLM.from_pretrained(b.model, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=b.trust_remote_code)
    if b.quantization == "nf4":
        inner = base.model.get_base_model() if isinstance(base.model, PeftModel) else base.model
        quantized = {n.removesuffix(".base_layer") for n, m in inner.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        with torch.no_grad():
            for name in quantized:
                w = full.get_submodule(name).weight
                q, state = bnbf.quantize_4bit(w.data, blocksize=64, compress_statistics=True, quant_type="nf4")
                w.copy_(bnbf.dequantize_4bit(q, state).to(torch.float32))
    if adapter_folder is not None:
        full = PeftModel.from_pretrained(full, str(adapter_folder)).merge_and_unload()
    return full.to(DTYPES[dtype])
