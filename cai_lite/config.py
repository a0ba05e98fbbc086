"""The typed config of a cai_lite run: `Config`, and the sections the stages share.

`Config` holds every section; the shared ones (base, lora, generation, data, judge, plan) are here,
and each stage's own (sft, ppo, evaluate, ...) is in stage_config.py. Reads and writes nothing:
`recipe.py` fills these from `recipes/<name>.yaml` and `key=value` overrides, and the pipeline saves
the resolved config as `runs/<run>/config.yaml`. The field docstrings are what `python run.py --help`
prints.

    python -c "from cai_lite.config import Config; print(Config().sft)"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from cai_lite.stage_config import (CritiqueReviseConfig, DPOConfig, EvaluateConfig, ExportConfig, LabelConfig,
                                   PPOConfig, RewardConfig, RLOOConfig, SFTConfig)
from cai_lite.typed_yaml import ranged  # ranged(default, "> 0"): the field's allowed values, checked by name

PACKAGE = Path(__file__).resolve().parent  # shipped files: inside it in a wheel (pyproject), beside it in a checkout
SHIPPED = PACKAGE if (PACKAGE / "recipes").is_dir() else PACKAGE.parent
RECIPES = SHIPPED / "recipes"
CONSTITUTIONS = SHIPPED / "constitutions"
DEFAULT_RECIPE = "lab"
# The names of stage_plan.STAGES, spelled here because config loads no stage module (a test keeps them equal).
STAGES = ("critique_revise", "sft", "label_preferences", "reward_model", "ppo", "rloo", "dpo", "evaluate", "export")


@dataclass
class BaseConfig:
    model: str = "runs/_models/tiny-llama"
    """Local folder of the base causal LM (safetensors). cai_lite never downloads: fetch a hub model first with `hf download ORG/NAME --local-dir DIR`."""
    create: Literal["none", "tiny-llama", "tiny-qwen2", "lab", "lab-ci"] = "none"
    """Build a model at `base.model`, only under runs/_models/ in a folder named after it: tiny-llama/tiny-qwen2, a tiny random model (tests, tiny_cpu) built if missing; lab/lab-ci, the teaching-lab model pretrained for `seed` (docs/lab.md), cached by content hash and rebuilt when that changes."""
    quantization: Literal["nf4", "none"] = "nf4"
    """nf4: 4-bit NormalFloat with double quantization (QLoRA); none: load in `base.dtype`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """dtype of the weights that are not quantized (embeddings, norms, LM head)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """dtype NF4 layers dequantize to for their matmuls."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward to save memory (slower by about a third)."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off by default: it runs code you have not read."""
    init: Literal["pretrained", "random"] = "pretrained"
    """pretrained: load the weights in `base.model`; random: build the model from its config.json with random weights (seeded by `seed`) and quantise it as loaded weights are, so every code path runs at full size with no download (memory and speed checks; the text is noise). The folder still needs its tokenizer files."""
    upcast_frozen: bool = False
    """Upcast the unquantized frozen weights (embeddings, LM head, norms, biases) to fp32, as PEFT's prepare_model_for_kbit_training does (+2.2 GB at Qwen2.5-7B, `plan=true` shows it); off keeps them in `base.dtype`, which the residual stream then uses."""


@dataclass
class LoraSettings:
    r: int = ranged(16, ">= 1")
    """LoRA rank of every adapter cai_lite creates."""
    alpha: int = ranged(32, "> 0")
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = ranged(0.05, "[0, 1)")
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; ["all-linear"] adapts every linear layer but the LM head (QLoRA)."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = ranged(256, ">= 1")
    """Tokens generated per answer, critique or revision."""
    temperature: float = ranged(0.7, ">= 0")
    """Sampling temperature; 0 means greedy."""
    top_p: float = ranged(0.95, "(0, 1]")
    """Nucleus sampling mass."""
    batch_size: int | Literal["auto"] = ranged(8, ">= 1")
    """Prompts generated together (and sequences the reward model scores at once in rloo and evaluate). auto: the largest batch whose KV cache and activations fit the device's memory beside the stage's weights and adapters by the memory planner (planner.py), at most 64; chosen once per run after the base loads and printed (`plan=true` shows the pick for `plan.gpu_memory_gb`). Not part of the config hash: every row is sampled from its own seed, so the text does not depend on how rows are batched."""
    max_prompt_tokens: int = ranged(1024, ">= 1")
    """Prompts longer than this are cut from the left (the oldest text goes first), and counted."""
    backend: Literal["local", "openai"] = "local"
    """Where critique_revise, label_preferences and evaluate sample: local, the shared base in-process; openai, an OpenAI-compatible server (vLLM, llama.cpp server, ollama) sent the same prompts and seeds (generation_http.py). The backend and the server keys below are not part of the config hash; stage.json records the backend."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """openai: server URL up to /v1."""
    model: str = "base"
    """openai: served name of the bare base (critique_revise without adapters, evaluate's `base`)."""
    adapters: list[str] = field(default_factory=list)
    """openai: served name of each adapter role used, as role=name: policy, critique (critique_revise), sft, ppo, rloo, dpo (e.g. [sft=cai-sft], as vLLM's --lora-modules cai-sft=runs/RUN/sft/adapter serves it)."""
    api_key_env: str = ""
    """openai: environment variable holding the API key (empty = no key); never stored or logged."""
    concurrency: int = ranged(4, ">= 1")
    """openai: requests in flight at once."""
    timeout_s: float = ranged(300.0, "> 0")
    """openai: seconds per request."""
    retries: int = ranged(3, ">= 0")
    """openai: retries per request, with exponential backoff; a retried answer fills its own row only."""


@dataclass
class DataConfig:
    prompts: str = "recipes/prompts/red_team.jsonl"
    """Red-team prompts: a JSONL file with `data.column`, an hh-rlhf transcript file (.jsonl or .jsonl.gz), or a datasets name/folder."""
    format: Literal["auto", "jsonl", "hh-rlhf", "datasets"] = "auto"
    """How to read `data.prompts`; auto picks hh-rlhf for rows with `chosen` transcripts, jsonl otherwise."""
    column: str = "prompt"
    """Column holding the prompt text (jsonl and datasets sources)."""
    split: str = "train"
    """Split of a datasets source."""
    limit: int = ranged(0, ">= 0")
    """Training prompts to use (0 = all that are not held out)."""
    eval_prompts: int = ranged(0, ">= 0")
    """Prompts held out for `evaluate`, taken from the end of the shuffled list; never used in training."""
    shuffle: bool = True
    """Shuffle before splitting (seeded by `data.seed`)."""
    seed: int = ranged(0, ">= 0")
    """Seed of the shuffle."""
    max_prompt_chars: int = ranged(2000, ">= 1")
    """Prompts longer than this many characters are truncated (and counted)."""


@dataclass
class JudgeConfig:
    SHORTHAND: ClassVar[str] = "backend"  # `judge=llamacpp` means `judge.backend=llamacpp`

    backend: Literal["local", "llamacpp", "openai"] = "local"
    """local: the shared base in-process; llamacpp: a GGUF file on CPU; openai: an OpenAI-compatible server."""
    adapter: str = "none"
    """local judge: "none" (the bare base, a pretrained model as in CAI), or an adapter: sft, critique, or a PEFT folder."""
    gguf_path: str = ""
    """llamacpp judge: the GGUF file."""
    n_threads: int = ranged(2, ">= 1")
    """llamacpp judge: CPU threads."""
    n_ctx: int = ranged(4096, ">= 1")
    """llamacpp judge: KV cells: a prompt this long or longer is a failure, and prompts are decoded together in waves of this many tokens (shared prefixes counted once)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """openai judge: server URL up to /v1."""
    model: str = "judge"
    """openai judge: model name sent to the server."""
    api_key_env: str = ""
    """openai judge: name of the environment variable holding the API key (empty = no key)."""
    top_logprobs: int = ranged(20, ">= 1")
    """openai judge: top log-probs requested per answer; both letters must be among them for a soft label."""
    concurrency: int = ranged(4, ">= 1")
    """openai judge: requests in flight at once."""
    timeout_s: float = ranged(60.0, "> 0")
    """openai judge: seconds per request."""
    retries: int = ranged(3, ">= 0")
    """openai judge: retries per request, with exponential backoff."""
    batch_size: int = ranged(8, ">= 1")
    """local judge: prompts scored per forward pass."""
    max_failure_rate: float = ranged(0.5, "[0, 1]")
    """Share of this judge's answers that may fail (no letter log-probs, prompt too long, server error) before the stage stops with an error."""


@dataclass
class PlanConfig:
    gpu_memory_gb: float = ranged(24.0, "> 0")
    """Memory of the card `plan=true` checks each stage's estimated peak against, in GiB."""
    shape: str = ""
    """Model shape to plan for: a shipped one (llama-2-7b, mistral-7b, qwen2.5-7b, llama-3.1-8b) or a config.json path; empty: `base.model`'s config.json, else the shipped shape named in `base.model`."""


_TRAINED = ("sft", "reward_model", "ppo", "rloo", "dpo")


@dataclass
class Config:
    # What TRL's TrainingArguments (and axolotl, LLaMA-Factory) call settings of ours: an unknown key of
    # one of these names is pointed at ours, in its section or in every stage ("did you mean"); never an
    # alias, so each setting keeps one spelling. A sentence: we have no such setting, and why.
    OTHER_NAMES: ClassVar[dict[str, list[str] | str]] = {
        "learning_rate": [f"{s}.lr" for s in _TRAINED],
        "per_device_train_batch_size": [f"{s}.batch_size" for s in _TRAINED],
        "gradient_accumulation_steps": ["sft.grad_accum", "ppo.grad_accum", "dpo.grad_accum"],
        "num_train_epochs": ["sft.epochs", "reward_model.epochs", "dpo.epochs"],
        "max_length": ["sft.max_seq_len", "reward_model.max_seq_len", "dpo.max_seq_len"],
        "max_seq_length": ["sft.max_seq_len", "reward_model.max_seq_len", "dpo.max_seq_len"],
        "num_generations": ["rloo.num_samples"],
        "output_dir": ["run_dir"],
        "model_name_or_path": ["base.model"],
        "lora_r": ["lora.r"], "lora_alpha": ["lora.alpha"], "lora_dropout": ["lora.dropout"],
        "lora_target_modules": ["lora.target_modules"],
        "resume_from_checkpoint": "rerun the same command to resume: finished stages are skipped and training "
                                  "continues from <stage>/checkpoint/; force=[stage] starts a stage over",
    }

    recipe: str = DEFAULT_RECIPE
    """Recipe name (a shipped recipes/<name>.yaml) or a path to a YAML recipe; `--config FILE.yaml` is the same."""
    description: str = ""
    """One line describing the recipe (shown by --help)."""
    run_name: str = ""
    """Run folder name under runs/ (default: the recipe name)."""
    run_dir: str = ""
    """Whole path of the run folder (overrides run_name)."""
    stages: list[str] = field(default_factory=lambda: list(STAGES[:5]) + ["evaluate"])
    """Stages to run, in pipeline order: critique_revise, sft, label_preferences, reward_model, ppo, rloo, dpo, evaluate, export."""
    force: list[str] = field(default_factory=list)
    """Stages to rerun even if their config changed since the last run."""
    seed: int = ranged(0, ">= 0")
    """Global seed (sampling, adapter init, principle sampling)."""
    constitution: str = "harmless"
    """A name in constitutions/ or a path to a constitution file (ours, Anthropic's JSON, or llm-swarm's JSON)."""
    log_level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    """Logging level."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(
        default_factory=lambda: ["tensorboard"])
    """Where every training stage (sft, reward_model, ppo, rloo, dpo) logs its curves, through transformers' integrations: tensorboard (<stage>/tensorboard/), wandb, mlflow, trackio (each configured by its own environment, e.g. WANDB_MODE=offline); [] for none. Steps count from 1 in every stage. Not part of the config hash."""
    base: BaseConfig = field(default_factory=BaseConfig)
    """The shared base model."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings of the adapters cai_lite creates."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Sampling settings for critique_revise, label_preferences and evaluate."""
    data: DataConfig = field(default_factory=DataConfig)
    """Red-team prompt source and the held-out split."""
    critique_revise: CritiqueReviseConfig = field(default_factory=CritiqueReviseConfig)
    """Stage critique_revise: SL-CAI data generation."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Stage sft: supervised fine-tuning of the `sft` adapter on revisions."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The AI judge (used alone unless `judges` lists several)."""
    judges: list[JudgeConfig] = field(default_factory=list)
    """Several judges that vote; entries are judge sections, or backend names that take the rest from `judge`."""
    judge_vote: Literal["mean", "majority"] = "mean"
    """How several judges combine: mean of probabilities, or majority of choices (ties give 0.5)."""
    label_preferences: LabelConfig = field(default_factory=LabelConfig)
    """Stage label_preferences: AI preference labels (RLAIF)."""
    reward_model: RewardConfig = field(default_factory=RewardConfig)
    """Stage reward_model: the `reward` adapter + head."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """Stage ppo."""
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    """Stage rloo."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Stage dpo."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Stage evaluate."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Stage export: merged HF folder + GGUF."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """The memory planner (`plan=true`): no stage reads it."""

    @property
    def path(self) -> Path:
        """The run directory."""
        return Path(self.run_dir) if self.run_dir else Path("runs") / (self.run_name or self.recipe)

    def all_judges(self) -> list[JudgeConfig]:
        return self.judges or [self.judge]


def trl_args(cfg: Config, device_type: str, out: Path) -> dict:
    """TrainingArguments shared by the TRL trainers cai_lite drives (sft, rloo, dpo)."""
    cuda = device_type == "cuda"
    # report_to=[]: each stage passes the report_to callbacks itself (tracking.callbacks), as ppo's loop drives them.
    return dict(output_dir=str(out / "trainer"), logging_steps=1, save_strategy="no", report_to=[],
                run_name=f"{cfg.path.name}/{out.name}",
                seed=cfg.seed, use_cpu=not cuda, bf16=cuda and cfg.base.compute_dtype == "bfloat16",
                gradient_checkpointing=cfg.base.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_pin_memory=False,
                disable_tqdm=False,
                # Under torchrun/accelerate: every trainable weight (the one adapter trained) is in every
                # forward, so DDP need not search the graph for unused ones each step.
                ddp_find_unused_parameters=False)
