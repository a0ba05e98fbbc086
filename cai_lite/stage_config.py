"""The settings of each pipeline stage: one dataclass per stage, filling the recipe section of its name.

The sections of the shared parts (base, lora, generation, data, judge, plan) and the `Config` that
holds them all are in config.py. Reads and writes nothing; `recipe.py` fills these from the recipe
YAML and `key=value` overrides, and the field docstrings are what `python run.py --help` prints.

    python -c "from cai_lite.stage_config import PPOConfig; print(PPOConfig())"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cai_lite.typed_yaml import ranged  # ranged(default, "> 0"): the field's allowed values, checked by name


@dataclass
class CritiqueReviseConfig:
    rounds: int = ranged(4, ">= 1")
    """Critique -> revision rounds per prompt, each with a freshly sampled principle (the paper uses 4)."""
    policy_adapter: str = ""
    """PEFT folder for the initial answers (loaded as `policy`); empty = the bare base."""
    critic_adapter: str = ""
    """PEFT folder loaded as the `critique` adapter, which then writes critiques and revisions; empty = same as the policy."""
    cot: bool = False
    """Ask the critic to reason step by step using the constitution's chain-of-thought template."""
    few_shot: int = ranged(1, ">= 0")
    """Demonstration chats from the constitution placed before each critique/revision."""
    shard_size: int = ranged(16, ">= 1")
    """Prompts per output shard (a crash loses at most one shard)."""
    cleanup_patterns: list[str] = field(
        default_factory=lambda: [
            r"^\s*(sure|okay|ok|certainly)[,!.]?\s*(here is|here's)[^:\n]*:\s*",
            r"^\s*(here is|here's) (a|the|my) revised (response|answer)[^:\n]*:\s*",
            r"^\s*revision:\s*",
        ]
    )
    """Case-insensitive regexes removed from the start of each revision (counted in stage.json)."""
    helpful_prompts: str = ""
    """Benign prompts answered without revision and marked `helpful`, so SFT keeps helpfulness (CAI §3.2)."""
    helpful_limit: int = ranged(0, ">= 0")
    """How many helpful prompts to read (0 = all)."""


@dataclass
class SFTConfig:
    targets: Literal["final", "all_rounds"] = "final"
    """Train on the final revision only, or on every round's revision (the paper's choice)."""
    helpful_mix: float = ranged(1.0, ">= 0")
    """Helpful rows per harmless row kept in the SFT set (capped by what exists)."""
    lr: float = ranged(2e-4, "> 0")
    """Learning rate of the LoRA adapter."""
    epochs: float = ranged(1.0, "> 0")
    """Passes over the SFT rows."""
    max_steps: int = ranged(-1, ">= -1")
    """Stop after this many optimizer steps (-1 = use epochs)."""
    batch_size: int = ranged(4, ">= 1")
    """Rows per device batch."""
    grad_accum: int = ranged(4, ">= 1")
    """Batches accumulated per optimizer step."""
    max_seq_len: int = ranged(1024, ">= 1")
    """Prompt + revision tokens per row (longer rows are truncated)."""
    warmup_ratio: float = ranged(0.03, "[0, 1]")
    """Share of steps with linear warm-up."""
    save_every: int = ranged(50, ">= 0")
    """Write a checkpoint (adapter, optimizer, scheduler, random generators, step) to `sft/checkpoint/` every this many optimizer steps, so a rerun of a killed run resumes there (0 = never). Not part of the config hash."""


@dataclass
class LabelConfig:
    num_responses: int = ranged(2, ">= 2 to form a pair")
    """Responses sampled per prompt from the `sft` policy; every pair is compared."""
    temperature: float = ranged(1.0, ">= 0")
    """Sampling temperature for the responses."""
    prompts: str = ""
    """Red-team prompts to label (JSONL); empty = the SL-CAI training prompts (`data.*`)."""
    max_prompts: int = ranged(0, ">= 0")
    """Red-team prompts to label (0 = all)."""
    helpful_prompts: str = ""
    """Benign prompts labelled under the helpfulness principle only, so the reward model learns that a refusal of a benign request is worse (CAI §4: the preference model trains on helpfulness labels mixed with the AI harmlessness labels)."""
    helpful_limit: int = ranged(0, ">= 0")
    """How many helpful prompts to label (0 = all)."""
    num_principles: int = ranged(4, ">= 1")
    """Preference principles sampled per comparison and averaged (CAI ensembles over 16)."""
    both_orders: bool = True
    """Judge (A,B) and (B,A) and average, which cancels position bias (RLAIF App. B)."""
    few_shot: int = ranged(0, ">= 0")
    """Preference demonstrations from the constitution placed before each comparison."""
    cot: bool = False
    """Chain-of-thought: generate reasoning first, then score; labels are clamped to [0.4, 0.6] (CAI §4.1)."""
    cot_max_new_tokens: int = ranged(128, ">= 1")
    """Tokens of reasoning per comparison when `cot` is on."""
    shard_size: int = ranged(16, ">= 1")
    """Prompts per output shard."""


@dataclass
class RewardConfig:
    loss: Literal["soft", "hard", "margin"] = "soft"
    """soft: Bradley-Terry against p_a (CAI §4.1); hard: threshold p_a at 0.5; margin: hard with margin |2p_a-1|*margin."""
    margin: float = ranged(1.0, ">= 0")
    """Scale of the margin for loss=margin."""
    lr: float = ranged(1e-4, "> 0")
    """Learning rate of the reward adapter and head."""
    epochs: int = ranged(1, ">= 1")
    """Passes over the labelled pairs."""
    batch_size: int = ranged(4, ">= 1")
    """Pairs per optimizer step."""
    eval_fraction: float = ranged(0.1, "(0, 1)")
    """Share of pairs held out for accuracy and calibration."""
    max_seq_len: int = ranged(1024, ">= 1")
    """Prompt + response tokens per sequence."""
    save_every: int = ranged(50, ">= 0")
    """Write a checkpoint (adapter + head, optimizer, random generators, step) to `reward_model/checkpoint/` every this many optimizer steps, so a rerun of a killed run resumes there (0 = never). Not part of the config hash."""


@dataclass
class PPOConfig:
    steps: int = ranged(100, ">= 1")
    """Rollout -> update iterations."""
    prompts: str = ""
    """Prompt source for rollouts; empty = the SL-CAI training prompts (`data.*`)."""
    helpful_prompts: str = ""
    """Benign prompts added to the rollout prompts, so the policy is also rewarded for staying helpful (CAI §4 samples RL prompts from both sets)."""
    helpful_limit: int = ranged(0, ">= 0")
    """How many helpful prompts to add (0 = all)."""
    batch_size: int = ranged(16, ">= 1")
    """Prompts per rollout."""
    rollout_batch_size: int | Literal["auto"] = ranged("auto", ">= 1")
    """Sequences sampled at once during a rollout: the decode loop keeps this many rows in flight and refills finished ones. auto: the largest batch whose KV cache fits the device's memory beside ppo's five adapters and optimizer by the memory planner (planner.py), never more than ppo.batch_size; chosen once per run after the base loads and printed. Not part of the config hash: every row is sampled from its own seed."""
    minibatch_size: int = ranged(4, ">= 1")
    """Sequences per gradient step (several make one optimizer step via grad_accum)."""
    grad_accum: int = ranged(1, ">= 1")
    """Minibatches per optimizer step."""
    ppo_epochs: int = ranged(2, ">= 1")
    """Passes over each rollout."""
    lr: float = ranged(1e-5, "> 0")
    """Learning rate (policy adapter, value adapter and head)."""
    max_new_tokens: int = ranged(128, ">= 1")
    """Response length cap."""
    temperature: float = ranged(1.0, ">= 0")
    """Sampling temperature of rollouts."""
    kl_coef: float = ranged(0.05, ">= 0")
    """Initial coefficient of the per-token KL penalty toward the `reference` (SL-CAI) adapter."""
    kl_target: float = ranged(0.0, ">= 0")
    """Adaptive KL (Ziegler et al. 2019): steer the coefficient toward this KL per sequence; 0 = fixed."""
    kl_horizon: int = ranged(10000, ">= 1")
    """Horizon of the adaptive KL controller, in sequences."""
    gamma: float = ranged(1.0, "[0, 1]")
    """GAE discount."""
    lam: float = ranged(0.95, "[0, 1]")
    """GAE lambda."""
    clip_range: float = ranged(0.2, "> 0")
    """PPO ratio clip."""
    clip_range_value: float = ranged(0.2, "> 0")
    """Value clip around the rollout values."""
    vf_coef: float = ranged(0.5, ">= 0")
    """Weight of the value loss."""
    missing_eos_penalty: float = ranged(1.0, ">= 0")
    """Subtracted from the reward of responses that hit the length cap without EOS."""
    save_every: int = ranged(50, ">= 0")
    """Write a checkpoint (policy and value adapters, optimizer, KL coefficient, random generators, step) to `ppo/checkpoint/` every this many steps, so a rerun of a killed run resumes there (0 = never). Not part of the config hash."""
    logit_chunk: int = ranged(256, ">= 1")
    """Rows (sequences x response positions) whose vocabulary-sized logits exist at once when computing
    log-probs and entropy; smaller saves memory (chunk x vocab x 4 bytes per live logits tensor), larger is faster. Not part of the config hash: results are equal for any chunk."""


@dataclass
class RLOOConfig:
    steps: int = ranged(100, ">= 1")
    """Rollout -> update iterations."""
    batch_size: int = ranged(8, ">= 1")
    """Prompts per step."""
    num_samples: int = ranged(4, ">= 2 for a leave-one-out baseline")
    """Responses per prompt; each one's baseline is the mean reward of the others (leave-one-out)."""
    prompts: str = ""
    """Prompt source for rollouts; empty = the SL-CAI training prompts (`data.*`)."""
    helpful_prompts: str = ""
    """Benign prompts added to the SL-CAI training prompts, as for ppo.helpful_prompts."""
    helpful_limit: int = ranged(0, ">= 0")
    """How many helpful prompts to add (0 = all)."""
    lr: float = ranged(1e-5, "> 0")
    """Learning rate of the policy adapter."""
    kl_coef: float = ranged(0.05, ">= 0")
    """Coefficient of the sequence KL penalty toward the `reference` (SL-CAI) adapter."""
    max_new_tokens: int = ranged(128, ">= 1")
    """Response length cap."""
    temperature: float = ranged(1.0, ">= 0")
    """Sampling temperature."""
    missing_eos_penalty: float = ranged(1.0, ">= 0")
    """Subtracted from the reward of responses without EOS."""
    save_every: int = ranged(50, ">= 0")
    """Write a checkpoint (adapter, optimizer, scheduler, random generators, step) to `rloo/checkpoint/` every this many steps, so a rerun of a killed run resumes there (0 = never). Not part of the config hash."""


@dataclass
class DPOConfig:
    beta: float = ranged(0.1, "> 0")
    """DPO temperature (strength of the implicit KL to the `sft` reference)."""
    lr: float = ranged(5e-6, "> 0")
    """Learning rate."""
    epochs: float = ranged(1.0, "> 0")
    """Passes over the pairs."""
    max_steps: int = ranged(-1, ">= -1")
    """Stop after this many steps (-1 = use epochs)."""
    batch_size: int = ranged(4, ">= 1")
    """Pairs per device batch."""
    grad_accum: int = ranged(1, ">= 1")
    """Batches per optimizer step."""
    min_confidence: float = ranged(0.0, "[0, 0.5)")
    """Drop pairs with |p_a - 0.5| below this."""
    label_smoothing: Literal["none", "soft"] = "none"
    """soft: cDPO label smoothing eps = mean(1 - max(p_a, 1-p_a)) over the kept pairs, from the judge's soft labels."""
    precompute_ref_log_probs: bool = False
    """Compute reference log-probs once before training (saves a forward per step)."""
    max_seq_len: int = ranged(1024, ">= 1")
    """Prompt + response tokens per sequence."""
    save_every: int = ranged(50, ">= 0")
    """Write a checkpoint (adapter, optimizer, scheduler, random generators, step) to `dpo/checkpoint/` every this many optimizer steps, so a rerun of a killed run resumes there (0 = never). Not part of the config hash."""


@dataclass
class EvaluateConfig:
    prompts: str = ""
    """Held-out red-team prompts (JSONL, `data.column`); empty = the last `data.eval_prompts` of `data.prompts`."""
    prompts_limit: int = ranged(0, ">= 0")
    """Held-out red-team prompts to use from `evaluate.prompts` (0 = all), the first ones in file order."""
    oracle: Literal["none", "lab"] = "none"
    """Ground-truth rates beside the judge's: lab reads `lab_world.json` in the base.model folder (the teaching-lab world)."""
    helpful_prompts: str = "recipes/prompts/helpful.jsonl"
    """Benign prompts for helpfulness win rates (never used in training)."""
    helpful_limit: int = ranged(0, ">= 0")
    """Helpful prompts to use (0 = all)."""
    max_new_tokens: int = ranged(128, ">= 1")
    """Answer length per prompt and model."""
    num_principles: int = ranged(4, ">= 1")
    """Preference principles sampled per harmlessness win-rate comparison and averaged (helpfulness uses its own one)."""
    hhh_path: str = ""
    """Path of Anthropic's 438HHHEvaluations.jsonl (empty = skip that eval)."""
    harmful_vs_ethical_path: str = ""
    """Path of Anthropic's HarmfulVsEthical.jsonl (empty = skip)."""
    paper_eval_limit: int = ranged(0, ">= 0")
    """Items of each paper eval to score (0 = all)."""
    bootstrap: int = ranged(1000, ">= 1")
    """Bootstrap resamples for confidence intervals."""
    samples_in_report: int = ranged(3, ">= 0")
    """Prompts shown side by side in report.md."""
    report_rows: int = ranged(300, ">= 0")
    """Rows the run browser (report.html) embeds per view, spread evenly over the run's rows; the page says how many it left out (0 = all). Not hashed: `cai-lite report RUN_DIR` redraws the page."""


@dataclass
class ExportConfig:
    adapter: Literal["none", "sft", "ppo", "rloo", "dpo"] = "ppo"
    """Stage whose adapter is merged into the de-quantized base (sft, ppo, rloo, dpo), or "none"."""
    gguf_types: list[str] = field(default_factory=lambda: ["f16"])
    """GGUF files to write: any of f32, f16, q8_0, q4_k_m, q5_k_m (the k-quants by llama.cpp's own quantizer); the first is the Modelfile's."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float16"
    """dtype of the merged Hugging Face folder."""
