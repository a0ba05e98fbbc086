"""Memory planner: each stage's peak accelerator memory for a recipe, estimated without loading weights.

Reads the model's config.json (`plan.shape`: a shipped shape in cai_lite/shapes/ or a path; else
`base.model`'s own, else the shipped shape named in `base.model`), builds the model on the meta
device to count its parameters exactly, and prints an itemised table. Writes nothing. One function
per term; each says where its formula comes from. `benchmarks/planner_accuracy.py` checks it
against measured peaks on CPU, `benchmarks/gpu_check.py` on a GPU.

    python run.py recipe=7b_qlora plan=true
    python run.py recipe=7b_qlora plan=true plan.shape=llama-2-7b plan.gpu_memory_gb=16
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cai_lite.config import Config
from cai_lite.typed_yaml import ConfigError

SHAPES = Path(__file__).parent / "shapes"
GiB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# What PyTorch's allocator cannot see: the CUDA context and kernels (~0.5 GB) plus fragmentation.
OVERHEAD = 1.0 * GiB


@dataclass
class Model:
    """Parameter counts of one model shape, read off a meta-device build."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # num_key_value_heads * head_dim
    vocab: int
    quantized: int  # weights of the decoder's nn.Linear layers: bitsandbytes quantizes these
    quantized_tensors: int  # how many such weights (each carries its own code books)
    embeddings: int  # input embeddings plus an untied LM head (bitsandbytes leaves the LM head alone)
    other: int  # norms and biases
    lora_in_out: int  # sum of (in + out) over the LoRA target layers: one adapter has r times this


@dataclass
class Settings:
    """The parts of the config that size memory, for any stage."""

    weight_bytes: int  # base.dtype
    act_bytes: int  # base.compute_dtype: activations, KV cache
    upcast_frozen: bool
    checkpointing: bool
    lora_r: int
    lora_dropout: bool
    cuda: bool  # SDPA on CUDA uses fused kernels that never store the T x T attention matrix


def shape_config(cfg: Config):
    """The transformers config the plan is for, and a name for it."""
    p = cfg.plan.shape
    if p:
        path = SHAPES / f"{p}.json" if (SHAPES / f"{p}.json").is_file() else Path(p)
        if not path.is_file():
            raise ConfigError([f"plan.shape: {p!r} is neither a shipped shape ({', '.join(shipped())}) nor a file"])
    elif (Path(cfg.base.model) / "config.json").is_file():
        path = Path(cfg.base.model) / "config.json"
    else:
        folder = Path(cfg.base.model).name.lower()
        hits = [s for s in shipped() if s in folder]
        if not hits:
            raise ConfigError([f"plan.shape: {cfg.base.model} has no config.json and names no shipped shape; "
                               f"set plan.shape to one of {', '.join(shipped())} or a config.json path"])
        path = SHAPES / f"{max(hits, key=len)}.json"
    d = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return AutoConfig.for_model(d.pop("model_type"), **d), path.stem if path.parent == SHAPES else str(path)


def shipped() -> list[str]:
    return sorted(p.stem for p in SHAPES.glob("*.json"))


def count(config, name: str, targets: list[str]) -> Model:
    """Exact parameter counts from a build on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    quantized = tensors = lora = 0
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            quantized += m.weight.numel()
            tensors += 1
            # PEFT's "all-linear" is every Linear but the output layer; a list matches name suffixes.
            if targets == ["all-linear"] or n.split(".")[-1] in targets:
                lora += m.in_features + m.out_features
    embeddings = emb.weight.numel() + (0 if head.weight is emb.weight else head.weight.numel())
    total = sum(p.numel() for p in model.parameters())
    c = config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Model(name, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                 c.num_key_value_heads * head_dim, c.vocab_size, quantized, tensors, embeddings, total - quantized - embeddings,
                 lora)


def settings(cfg: Config) -> Settings:
    b = cfg.base
    return Settings(BYTES[b.dtype], BYTES[b.compute_dtype], b.upcast_frozen, b.gradient_checkpointing, cfg.lora.r,
                    cfg.lora.dropout > 0, b.device.startswith("cuda") or b.device == "auto")


# ---- terms (bytes) -------------------------------------------------------------------------------

def base_weights(m: Model, s: Settings) -> int:
    """NF4 with double quantization (QLoRA §3): 4 bits per weight; one 8-bit absmax per block of 64
    weights, and one fp32 absmax per 256 of those (0.127 bit/param of constants); per weight tensor,
    bitsandbytes' 16-entry NF4 and 256-entry absmax code books in fp32. Unquantized weights:
    embeddings, LM head, norms and biases in base.dtype (fp32 with base.upcast_frozen, as PEFT's
    prepare_model_for_kbit_training leaves them; models.load_base)."""
    nf4 = m.quantized * (0.5 + 1 / 64 + 4 / (64 * 256)) + m.quantized_tensors * (16 + 256) * 4
    return int(nf4 + (m.embeddings + m.other) * (4 if s.upcast_frozen else s.weight_bytes))


def adapters(m: Model, s: Settings, n: int) -> int:
    """n LoRA adapters: r x (in + out) per target layer, in fp32 (PEFT's autocast_adapter_dtype keeps
    adapter weights fp32 on a bf16 or 4-bit base), plus a (hidden + 1) fp32 head where there is one."""
    return n * (s.lora_r * m.lora_in_out * 4 + (m.hidden + 1) * 4)


def optimizer(m: Model, s: Settings, n_trained: int) -> int:
    """Per trained parameter: an fp32 gradient and AdamW's two fp32 moments (12 bytes)."""
    return n_trained * 12 * (s.lora_r * m.lora_in_out + m.hidden + 1)


def layer_activations(m: Model, s: Settings, tokens: int) -> int:
    """What one decoder layer keeps for backward, per token (Korthikanti et al. 2022, §4.1, for a
    Llama block with SDPA): ~10 hidden-sized tensors in the attention half (norm in fp32, q/k/v, rotated
    q/k, attention out, o_proj in, residual), the SwiGLU MLP's gate, up, act(gate) and product (4 x
    intermediate), and with LoRA dropout a dropped copy of each target's input (6 hidden + 1 intermediate)."""
    per_token = 10 * m.hidden + 2 * m.kv_dim + 4 * m.intermediate
    if s.lora_dropout:
        per_token += 6 * m.hidden + m.intermediate
    return tokens * per_token * s.act_bytes


def training(m: Model, s: Settings, batch: int, seq: int, logits: int = 0) -> dict:
    """Forward + backward of one micro-batch. With gradient checkpointing only each layer's input
    (batch x seq x hidden) is kept, and one layer is recomputed at a time in backward, plus the
    gradients in flight (a quarter of a layer's activations, as benchmarks/planner_accuracy.py
    measured); without it every layer's activations stay. The loss's backward (`logits`: its bytes)
    ends before the first layer is recomputed, so the two never coexist: the logits entry is what
    they add above the recomputed layer (benchmarks/gpu_check.py: summing them overshot by 23%)."""
    tokens = batch * seq
    one = layer_activations(m, s, tokens)
    kept, working = (m.layers * tokens * m.hidden * s.act_bytes, 1.25 * one) if s.checkpointing \
        else (m.layers * one, 0.25 * one)
    fixed = attention_scores(m, s, batch, seq) + dequantized_weight(m, s)
    return {"activations": int(kept + working) + fixed, "logits": max(0, logits - int(working))}


def attention_scores(m: Model, s: Settings, batch: int, seq: int) -> int:
    """Off CUDA, SDPA's math kernel materialises batch x heads x seq x seq scores (and their softmax);
    on CUDA the flash / memory-efficient kernels never store them."""
    return 0 if s.cuda else 2 * batch * m.heads * seq * seq * s.act_bytes


def dequantized_weight(m: Model, s: Settings) -> int:
    """bitsandbytes dequantizes each 4-bit weight to compute_dtype for its matmul: the largest one
    (hidden x intermediate) exists at a time, twice in backward."""
    return 2 * m.hidden * m.intermediate * s.act_bytes


def full_logits(m: Model, s: Settings, tokens: int) -> int:
    """A causal-LM loss over the whole vocabulary (transformers' ForCausalLMLoss, as the sft stage's
    trainer computes it), at its peak in backward: the fp32 log-softmax saved for it, its incoming
    gradient and the gradient it passes on (12 bytes per logit), plus, with fp32 logits, the logits
    themselves, which the upcast does not copy. Measured: 14 bytes per logit in fp32 on CPU
    (benchmarks/planner_accuracy.py), at most 12 in bf16 on an H200 (benchmarks/gpu_check.py)."""
    return tokens * m.vocab * (14 if s.act_bytes == 4 else 12)


def chunked_logits(m: Model, s: Settings, rows: int, chunk: int) -> int:
    """Log-probs and entropy computed `ppo.logit_chunk` rows at a time (losses.chunked_logprobs),
    recomputed chunk by chunk in backward: one chunk's fp32 logits, log-softmax and the entropy's
    probabilities, with the gradients of the first two (5 x 4 bytes per logit; planner_accuracy.py)."""
    return min(rows, chunk) * m.vocab * 4 * 5


def kv_cache(m: Model, s: Settings, batch: int, tokens: int) -> int:
    """Keys and values of every layer for every generated position (2 x layers x kv_dim per token)."""
    return 2 * m.layers * m.kv_dim * batch * tokens * s.act_bytes


def prefill(m: Model, s: Settings, batch: int, seq: int) -> int:
    """A forward without gradients keeps only the live layer's tensors: about the MLP's three
    intermediate-sized ones plus a few hidden-sized ones, for every token of the batch."""
    return batch * seq * (3 * m.intermediate + 4 * m.hidden) * s.act_bytes + attention_scores(m, s, batch, seq) \
        + m.hidden * m.intermediate * s.act_bytes


# ---- stages --------------------------------------------------------------------------------------

def sft_step(m: Model, s: Settings, batch: int, seq: int) -> dict:
    return {"adapters": adapters(m, s, 1), "optimizer": optimizer(m, s, 1)} \
        | training(m, s, batch, seq, full_logits(m, s, batch * seq))


def reward_step(m: Model, s: Settings, batch: int, seq: int) -> dict:
    """Both responses of `batch` pairs in one forward; the head reads hidden states (no LM head)."""
    return {"adapters": adapters(m, s, 1), "optimizer": optimizer(m, s, 1)} | training(m, s, 2 * batch, seq)


def sampling(m: Model, s: Settings, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """generate(): the KV cache of every sequence at full length, or, if larger, the prompt's cache
    plus the prefill's working set (the activations entry is that excess)."""
    full = kv_cache(m, s, batch, prompt_len + new_tokens)
    at_prefill = kv_cache(m, s, batch, prompt_len) + prefill(m, s, batch, prompt_len)
    return {"activations": max(0, at_prefill - full), "kv_cache": full}


def ppo_step(m: Model, s: Settings, rows: int, prompt_len: int, response_len: int, minibatch: int,
             chunk: int) -> dict:
    """Five adapters (sft, reference, reward, policy, value), two trained. The rollout (KV cache of
    the `rows` sequences sampled at once, ppo.rollout_batch_size) and the update (one minibatch's
    training pass) come one after the other: the peak is the larger of the two."""
    rollout = sampling(m, s, rows, prompt_len, response_len)
    update = training(m, s, minibatch, prompt_len + response_len,
                      chunked_logits(m, s, minibatch * response_len, chunk))
    phase = update if sum(update.values()) >= sum(rollout.values()) else rollout
    return {"adapters": adapters(m, s, 5), "optimizer": optimizer(m, s, 2)} | phase


def generation_stage(m: Model, s: Settings, batch: int, prompt_len: int, new_tokens: int, n_adapters: int) -> dict:
    return {"adapters": adapters(m, s, n_adapters)} | sampling(m, s, batch, prompt_len, new_tokens)


def stage_terms(cfg: Config, m: Model, s: Settings, stage: str) -> dict | None:
    """The terms of one recipe stage, from its config: the longest sequences it allows."""
    g = cfg.generation
    if stage in ("critique_revise", "label_preferences", "evaluate"):
        return generation_stage(m, s, g.batch_size, g.max_prompt_tokens, g.max_new_tokens, 4)
    if stage == "sft":
        return sft_step(m, s, cfg.sft.batch_size, cfg.sft.max_seq_len)
    if stage == "reward_model":
        return reward_step(m, s, cfg.reward_model.batch_size, cfg.reward_model.max_seq_len)
    if stage == "ppo":
        p = cfg.ppo
        return ppo_step(m, s, p.rollout_batch_size, g.max_prompt_tokens, p.max_new_tokens, p.minibatch_size,
                        p.logit_chunk)
    if stage == "rloo":
        r = cfg.rloo
        t = {"adapters": adapters(m, s, 4), "optimizer": optimizer(m, s, 1)}
        n = r.batch_size * r.num_samples
        gen = sampling(m, s, n, g.max_prompt_tokens, r.max_new_tokens)
        # TRL 1.16's fused LM head (trl/kernels/chunked_logprob.py) takes log-probs 4096 positions at a time
        train = training(m, s, n, g.max_prompt_tokens + r.max_new_tokens, chunked_logits(m, s, n * r.max_new_tokens, 4096))
        return t | (gen if sum(gen.values()) > sum(train.values()) else train)
    if stage == "dpo":
        d = cfg.dpo  # chosen and rejected in one batch; TRL's fused LM head as in rloo
        return {"adapters": adapters(m, s, 3), "optimizer": optimizer(m, s, 1)} \
            | training(m, s, 2 * d.batch_size, d.max_seq_len, chunked_logits(m, s, 2 * d.batch_size * d.max_seq_len, 4096))
    return None  # export works on the CPU copy


# ---- batch_size=auto -----------------------------------------------------------------------------

# generation.batch_size=auto goes no higher: past a few dozen rows one decode step is compute-bound on
# the cards cai_lite targets, so more rows add memory, not speed (ppo's cap is ppo.batch_size).
AUTO_CAP = 64
AUTO_KEYS = ("generation.batch_size", "ppo.rollout_batch_size")


def auto_terms(cfg: Config, m: Model, s: Settings, key: str, rows: int) -> dict:
    """The terms that bound `key` at `rows` sequences sampled at once: a generating stage (its four
    adapters at most), or ppo's rollout beside its five adapters and two optimizers."""
    g = cfg.generation
    if key == "generation.batch_size":
        t = generation_stage(m, s, rows, g.max_prompt_tokens, g.max_new_tokens, 4)
    else:
        t = {"adapters": adapters(m, s, 5), "optimizer": optimizer(m, s, 2)} \
            | sampling(m, s, rows, g.max_prompt_tokens, cfg.ppo.max_new_tokens)
    return {"weights": base_weights(m, s)} | t


@dataclass
class Pick:
    """What `key=auto` resolves to on a card of `card` bytes."""

    key: str
    rows: int  # the largest batch that fits, at most `cap`; 0 where not even one row fits
    cap: int
    terms: dict  # the terms at `rows` (at 1 where none fits)
    card: int
    card_name: str  # where `card` came from: plan.gpu_memory_gb, the GPU's name, RAM available

    def line(self) -> str:
        terms = " + ".join(f"{k} {v / GiB:.2f}" for k, v in self.terms.items() if v)
        peak = (sum(self.terms.values()) + OVERHEAD) / GiB
        got = f"{self.rows}" if self.rows else "none fits: at 1 row"
        return (f"{self.key}=auto -> {got} ({terms} + overhead {OVERHEAD / GiB:.0f} = {peak:.2f} of "
                f"{self.card / GiB:.1f} GiB, {self.card_name}; cap {self.cap}{' reached' * (self.rows == self.cap)})")


def pick(cfg: Config, m: Model, s: Settings, key: str, card: int, card_name: str) -> Pick:
    """The largest batch whose terms + OVERHEAD fit `card`, by bisection (every term grows with it)."""
    cap = AUTO_CAP if key == "generation.batch_size" else cfg.ppo.batch_size
    low, high = 0, cap  # fits(low) holds (no rows, no cache); find the last b in [low, high] that fits
    while low < high:
        mid = (low + high + 1) // 2
        if sum(auto_terms(cfg, m, s, key, mid).values()) + OVERHEAD <= card:
            low = mid
        else:
            high = mid - 1
    return Pick(key, low, cap, auto_terms(cfg, m, s, key, max(low, 1)), card, card_name)


def auto_keys(cfg: Config) -> list[str]:
    return [k for k in AUTO_KEYS if getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) == "auto"]


def auto_picks(cfg: Config, card: int, card_name: str, cuda: bool | None = None) -> list[Pick]:
    """A Pick for every key set to auto, for the model of `shape_config(cfg)`; `cuda` overrides
    base.device's guess (the device a run really got)."""
    keys = auto_keys(cfg)
    if not keys:
        return []
    config, name = shape_config(cfg)
    m = count(config, name, list(cfg.lora.target_modules))
    s = settings(cfg)
    s = s if cuda is None else Settings(**{**vars(s), "cuda": cuda})
    return [pick(cfg, m, s, k, card, card_name) for k in keys]


def with_picks(cfg: Config, picks: list[Pick]) -> Config:
    """A copy of `cfg` with each picked key set to its batch (1 where none fits); `cfg` is unchanged."""
    sections = {}
    for p in picks:
        section, name = p.key.split(".")
        sections[section] = dataclasses.replace(sections.get(section, getattr(cfg, section)), **{name: max(p.rows, 1)})
    return dataclasses.replace(cfg, **sections)


KNOBS = {"activations": "the stage's batch_size / max_seq_len, or base.gradient_checkpointing=true",
         "logits": "the stage's batch_size or max_seq_len (the full-vocabulary logits grow with both)",
         "kv_cache": "generation.batch_size / ppo.rollout_batch_size or generation.max_prompt_tokens",
         "weights": "base.upcast_frozen=false, or a smaller model",
         "optimizer": "lora.r", "adapters": "lora.r"}


def plan(cfg: Config) -> tuple[str, bool]:
    """The table `plan=true` prints, and whether every stage fits plan.gpu_memory_gb."""
    config, name = shape_config(cfg)
    m = count(config, name, list(cfg.lora.target_modules))
    s = settings(cfg)
    cols = ["weights", "adapters", "optimizer", "activations", "logits", "kv_cache"]
    gb = lambda x: f"{x / GiB:6.2f}"  # noqa: E731
    card = cfg.plan.gpu_memory_gb * GiB
    picks = auto_picks(cfg, int(card), "plan.gpu_memory_gb")
    cfg = with_picks(cfg, picks)  # an auto batch is planned at its pick (at 1 where none fits: the row says NO)
    lines = [f"memory plan: {name} ({(m.quantized + m.embeddings + m.other) / 1e9:.2f}B parameters, vocab {m.vocab}), "
             f"NF4 + LoRA r={s.lora_r}, GiB, card {cfg.plan.gpu_memory_gb:g} GiB", *(p.line() for p in picks),
             f"{'stage':<18}" + "".join(f"{c:>12}" for c in cols) + f"{'peak':>9}  fits"]
    ok = all(p.rows for p in picks)
    for stage in cfg.stages:
        t = stage_terms(cfg, m, s, stage)
        if t is None:
            continue
        t = {"weights": base_weights(m, s)} | t
        peak = sum(t.values())
        fits = peak + OVERHEAD <= card
        ok &= fits
        biggest = max((k for k in t if k != "weights"), key=t.get)
        lines.append(f"{stage:<18}" + "".join(f"{gb(t.get(c, 0)):>12}" for c in cols) + f"{gb(peak):>9}  "
                     + ("yes" if fits else f"NO: largest term {biggest}; turn {KNOBS[biggest]}"))
    upcast = base_weights(m, Settings(**{**vars(s), "upcast_frozen": True})) \
        - base_weights(m, Settings(**{**vars(s), "upcast_frozen": False}))
    lines.append(f"peak = the terms' sum; fits = peak + {OVERHEAD / GiB:.0f} GiB (CUDA context, fragmentation) "
                 f"<= card. base.upcast_frozen=true (fp32 embeddings, LM head, norms) costs {upcast / GiB:.2f} GiB "
                 f"in every stage; it is {str(s.upcast_frozen).lower()} here.")
    lines.append("every stage fits" if ok else "some stage does not fit: turn the named knob, or plan.gpu_memory_gb")
    return "\n".join(lines), ok
