"""The one frozen base model of a run, and the named LoRA adapters and scalar heads that share it.

The only module that loads the base, touches bitsandbytes, or adds, copies and switches adapters
(adapter_files.py saves and loads them as PEFT folders through the functions here). Reads the base
model folder (safetensors only; remote code only if `base.trust_remote_code`); writes nothing.

Roles (adapter names): `sft`, `policy`, `reference` (a frozen copy of `sft`), `reward` (+ head),
`value` (+ head), `critique` (any PEFT folder). Switch only through `active_adapter()`,
`no_adapter()` or `role()`, which restore the active adapter and every `requires_grad` on exit.

    python -c "from cai_lite.recipe import load_config; from cai_lite import models; \
               print(models.memory_account(models.load_base(load_config(['recipe=tiny_cpu']))))"
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from cai_lite.config import Config

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INDEX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PeftModel -> (adapters, LoRA layers, params)


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


def load_base(cfg: Config) -> SharedBase:
    """Load `cfg.base.model` once: NF4 with double quantization and bf16 compute, or unquantized."""
    b = cfg.base
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if b.device == "auto" else b.device)
    if device.type == "cuda" and device.index is None:  # device_map needs an index: "cuda" means the current card
        device = torch.device("cuda", torch.cuda.current_device())
    kwargs: dict = dict(dtype=DTYPES[b.dtype], trust_remote_code=b.trust_remote_code, use_safetensors=True)
    if b.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # QLoRA §3: quantize the absmax constants too (~0.4 bit/param saved)
            bnb_4bit_compute_dtype=DTYPES[b.compute_dtype],
        )
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    if b.init == "random":
        model = _random_model(cfg, kwargs, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(b.model, **kwargs)
    if b.quantization == "none":
        model.to(device)
    if device.type == "cpu":
        _settle_cpu_weights(model, b.quantization == "nf4")
    tokenizer = AutoTokenizer.from_pretrained(b.model, trust_remote_code=b.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation and last-token scoring both want left padding
    if b.quantization == "nf4":
        # PEFT's prepare_model_for_kbit_training upcasts every unquantized weight to fp32, the frozen
        # embeddings and LM head included (2 x 152k x 3584 floats: +2.2 GB at Qwen2.5-7B). Off by default:
        # nothing trains them, and bf16 RMSNorm already computes its statistics in fp32. All or none:
        # fp32 norms would hand fp32 hidden states to a bf16 LM head.
        for p in model.parameters():
            if b.upcast_frozen and p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
                p.data = p.data.float()
        if b.gradient_checkpointing:  # use_reentrant=False needs no input-grad hook (PEFT skips it too)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif b.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    for p in model.parameters():
        p.requires_grad_(False)  # the base is frozen; only adapters and heads ever train
    model.eval()
    log.info("loaded base %s (%s) on %s", b.model, b.quantization, device)
    return SharedBase(model=model, tokenizer=tokenizer, device=device, cfg=cfg)


def _random_model(cfg: Config, kwargs: dict, device: torch.device) -> PreTrainedModel:
    """`base.init=random`: the model of `base.model`'s config.json with random weights, quantised by
    the same transformers path that loads a checkpoint (from a state dict instead of files), so the
    result is the same kind of object a real load gives. Built on the target device: a 7B model
    initialises on a GPU in a second, and its bf16 copy (~14 GB) is freed before training starts."""
    config = AutoConfig.from_pretrained(cfg.base.model, trust_remote_code=cfg.base.trust_remote_code)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=kwargs["dtype"],
                                                 trust_remote_code=cfg.base.trust_remote_code)
    if "quantization_config" not in kwargs:
        return model
    state = model.state_dict()
    cls = type(model)  # the Auto class refuses a state dict without a folder; the model class takes it
    load = {k: v for k, v in kwargs.items() if k not in ("trust_remote_code", "use_safetensors")}
    try:
        quantised = cls.from_pretrained(None, config=config, state_dict=state, **load)
    except (TypeError, ValueError, RuntimeError) as e:
        # Loading from a state dict is the less travelled path; a checkpoint folder always works (slower).
        log.warning("base.init=random: transformers refused the state dict (%s); going through a temp folder", e)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model, state
            quantised = cls.from_pretrained(tmp, **load)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return quantised


def _settle_cpu_weights(model: PreTrainedModel, quantized: bool) -> None:
    """Two CPU-only fixes, both about what the weights of a loaded model point at.

    1. bitsandbytes 0.50, on CPUs with AVX512-BF16, repacks each Linear4bit into an inference
       layout on its first no-grad forward; from then on matmuls go through `gemv_4bit`, which has
       no autograd kernel, so gradients through the frozen base come out silently wrong (PyTorch
       only warns). A LoRA trained after a generation stage would learn from a broken backward.
    2. transformers keeps unquantized tensors as views of the mmapped checkpoint: the run would
       depend on the file staying unchanged on disk, and RSS would count the mapping per model."""
    import bitsandbytes as bnb

    with torch.no_grad():
        for m in model.modules():
            if quantized and isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False  # keep the differentiable dequantize+matmul path
        for p in model.parameters():
            if not isinstance(p, bnb.nn.Params4bit):
                p.data = p.data.clone()
        for buf in model.buffers():
            buf.data = buf.data.clone()


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
        _INDEX.pop(base.model, None)  # a re-added name gets new tensors: drop the cached ones
        base.model.add_adapter(name, config)
    else:
        # First adapter: wrap. PEFT injects LoRA layers in place, so the base weights stay the same objects.
        base.model = get_peft_model(base.model, config, adapter_name=name)
    if init_from is not None:
        with torch.no_grad():
            for dst, src in zip(lora_tensors(base, name), lora_tensors(base, init_from)):
                dst[1].copy_(src[1])
        if init_from in base.heads:
            base.heads[name] = new_head(base)
            base.heads[name].load_state_dict(base.heads[init_from].state_dict())
        base.sources[name] = f"copy of {init_from}"
    freeze(base, name)


def lora_tensors(base: SharedBase, name: str) -> list[tuple[str, torch.Tensor]]:
    """(PEFT key without the adapter name, tensor) of adapter `name`, in module order. From
    named_parameters, never state_dict(): on CPU, bitsandbytes repacks 4-bit weights for a state
    dict, which nudges every later output of the shared base."""
    return [(n.replace(f".{name}.", "."), p) for n, p in base.model.named_parameters() if f".{name}." in n]


def copy_adapter(base: SharedBase, src: str, dst: str) -> None:
    """Make `dst` an exact, frozen weight copy of `src` (replacing `dst` if it exists)."""
    if dst in base.adapters:
        delete_adapter(base, dst)
    add_adapter(base, dst, init_from=src)


def delete_adapter(base: SharedBase, name: str) -> None:
    _INDEX.pop(base.model, None)
    base.model.delete_adapter(name)
    if name in base.heads:
        del base.heads[name]
    base.sources.pop(name, None)


def new_head(base: SharedBase) -> torch.nn.Linear:
    # Zero init: training puts into the head only what separates the labelled pairs. A random head adds a
    # random function of the text that the pairwise loss never removes (it sees differences) and RL chases.
    head = torch.nn.Linear(base.hidden_size, 1, bias=True).to(base.device, torch.float32)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head.requires_grad_(False)


def add_head(base: SharedBase, name: str) -> None:
    """A scalar head (hidden -> 1, fp32) for the adapter of the same name: `reward` or `value`."""
    base.heads[name] = new_head(base)


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


def _index(model: PeftModel) -> tuple[list[BaseTunerLayer], list[tuple[str, torch.nn.Parameter]]]:
    """LoRA layers and named parameters, cached until the set of adapters changes: walking a large
    model's modules costs milliseconds, and PPO switches several times per minibatch."""
    key = tuple(model.peft_config)  # TRL adds an adapter of its own, so also check the set of names
    cached = _INDEX.get(model)
    if cached is None or cached[0] != key:
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        cached = (key, layers, list(model.named_parameters()))
        _INDEX[model] = cached
    return cached[1], cached[2]


def _point_at(model: PeftModel, name: str) -> None:
    """Make `name` the active adapter: what PEFT's set_adapter() does, without its walk over every
    module and every requires_grad (about 20 ms per call on a 16-layer model)."""
    for layer in _index(model)[0]:
        layer._active_adapter = name
    model.base_model.active_adapter = name
    model.active_adapter = name


@contextlib.contextmanager
def active_adapter(model: PeftModel, name: str, trainable: bool = False) -> Iterator[PeftModel]:
    """Run the block with adapter `name` active (trainable or not); restore everything on exit.

    Restores the previously active adapter, the enabled/disabled state of adapter layers (so it
    also works inside `no_adapter`), and each parameter's `requires_grad`, also when the block raises."""
    if not isinstance(model, PeftModel) or name not in model.peft_config:
        have = list(model.peft_config) if isinstance(model, PeftModel) else []
        raise KeyError(f"no adapter named {name!r} on the base (adapters: {have})")
    params = _index(model)[1]
    grads = [(p, p.requires_grad) for _, p in params]
    previous = model.active_adapter
    was_disabled = model._adapters_disabled  # PEFT's flag for "inside disable_adapter()"
    try:
        if was_disabled:
            model.base_model.enable_adapter_layers()  # PEFT also makes the active adapter trainable here:
            model._adapters_disabled = False
            for p, flag in grads:  # undo that
                p.requires_grad_(flag)
        _point_at(model, name)
        for n, p in params:
            if f".{name}." in n:
                p.requires_grad_(trainable)
        yield model
    finally:
        _point_at(model, previous)
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
    grads = [(p, p.requires_grad) for _, p in _index(model)[1]]
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
        heads = [(p, p.requires_grad) for p in base.heads.parameters()]
        with active_adapter(base.model, name, trainable=trainable) as m:
            try:
                if name in base.heads:
                    base.heads[name].requires_grad_(trainable)
                yield m
            finally:
                for p, flag in heads:
                    p.requires_grad_(flag)


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
def eval_mode(base: SharedBase) -> Iterator[None]:
    """Every module in eval mode for the block (dropout off), each module's own mode restored after.
    Scores must not depend on who called: TRL's trainers call our reward function in train mode."""
    modes = [(m, m.training) for m in (*base.model.modules(), *base.heads.modules())]
    base.model.eval()
    base.heads.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


def eos_ids(base: SharedBase) -> list[int]:
    """Every token id that ends a turn: the tokenizer's EOS plus the generation config's (Qwen2.5-Instruct
    lists two). Samplers stop at any of them, so rewards and masks must accept any of them too."""
    extra = base.model.generation_config.eos_token_id  # None, an int or a list in HF configs
    ids = [base.tokenizer.eos_token_id] + (extra if isinstance(extra, list) else [extra])
    return sorted({i for i in ids if i is not None})


@contextlib.contextmanager
def trl_policy(base: SharedBase, init_from: str) -> Iterator[PeftModel]:
    """Hand the shared base to a TRL trainer that fine-tunes an existing adapter (DPO, RLOO).

    TRL 1.16 hard-codes two adapter names here: it trains `default` and, when constructed, adds
    `ref`, a frozen copy of `default`, as the reference (trl/trainer/dpo_trainer.py). `default`
    starts as a copy of `init_from`, so the reference is the SL-CAI model. On exit both are
    deleted (save `default` inside the block) and TRL's fused-LM-head forward patch is removed.
    TRL's `disable_dropout` sets p=0 on every Dropout of the shared model, other adapters' included:
    each probability is put back on exit."""
    inner = base.model.get_base_model()
    patched_before = "forward" in vars(inner)
    dropouts = [(m, m.p) for m in base.model.modules() if isinstance(m, torch.nn.Dropout)]
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
        for m, p in dropouts:
            m.p = p
        base.model.eval()


def memory_account(base: SharedBase) -> dict:
    """Bytes of base weights (incl. quantization constants) and of each adapter and head."""
    base_bytes = sum(p.numel() * p.element_size() for n, p in base.model.named_parameters() if "lora_" not in n)
    seen = set()  # PEFT's LoRA wrapper shows its base layer's weight too: count each weight once
    for module in base.model.modules():
        weight = getattr(module, "weight", None)
        qs = getattr(weight, "quant_state", None)  # bitsandbytes' absmax etc.
        if qs is not None and id(weight) not in seen:
            seen.add(id(weight))  # the NF4 code book, absmax per block and, double-quantized, their absmax
            base_bytes += sum(v.numel() * v.element_size() for v in qs.as_dict(packed=False).values()
                              if isinstance(v, torch.Tensor))
    adapters = {name: sum(p.numel() * p.element_size() for p in adapter_parameters(base, name)
                          if not any(p is h for h in base.heads.parameters())) for name in base.adapters}
    heads = {n: sum(p.numel() * p.element_size() for p in h.parameters()) for n, h in base.heads.items()}
    return {"base_weight_bytes": base_bytes, "adapter_bytes": adapters, "head_bytes": heads}


def merged_copy(base: SharedBase, adapter_folder: Path | None, dtype: str) -> PreTrainedModel:
    """A standalone model for export: a de-quantized copy of the base with the adapter merged in.
    The shared base stays untouched; the merge lands on exactly the weights the adapter trained on."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    b = base.cfg.base
    full = AutoModelForCausalLM.from_pretrained(b.model, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=b.trust_remote_code)
    inner = base.model.get_base_model() if isinstance(base.model, PeftModel) else base.model
    with torch.no_grad():
        for name, m in inner.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
                full.get_submodule(name.removesuffix(".base_layer")).weight.copy_(w.float().cpu())
    if adapter_folder is not None:
        full = PeftModel.from_pretrained(full, str(adapter_folder)).merge_and_unload()
    return full.to(DTYPES[dtype])
