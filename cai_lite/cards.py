"""README.md cards for what a stage leaves, so the usual Hugging Face calls read it.

- A folder of shards (critique_revise/, label_preferences/) gets a dataset card whose `configs:`
  name the usable rows, `part-*.jsonl` (and `failed-*.jsonl` as the config `failed`), so
  `datasets.load_dataset("runs/RUN/critique_revise", split="train")` gives exactly the rows the
  trainers use, with `stage.json` and the failures beside them. (`load_dataset("json",
  data_dir=...)` reads every JSON file of a folder, stage.json too: there, pass
  `data_files=".../part-*.jsonl"`.)
- An adapter folder (`<stage>/adapter/`, and the reward model's `classifier/`) gets a model card:
  what trained it, on what, with which recipe, cai_lite version and commit, and how to load it.

The pipeline writes them after a stage's outputs, before its stage.json (`write`).

    python -c "from cai_lite import cards; help(cards.write)"
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cai_lite.config import Config

WHAT = {  # what each stage's rows or adapter are, for a reader of the card
    "critique_revise": "SL-CAI rows: red-team prompts, the model's first answers, its critiques and revisions "
                       "against sampled principles (CAI §3)",
    "label_preferences": "RLAIF preference rows: two answers per prompt and the AI judge's soft label p_a = "
                         "P(response_a is better), averaged over both option orders and sampled principles (CAI §4.1)",
    "sft": "supervised fine-tuning on the revisions of critique_revise (SL-CAI, CAI §3), with TRL's SFTTrainer",
    "reward_model": "a reward model: Bradley-Terry on the judge's soft labels (CAI §4.1), cai_lite's own loop",
    "ppo": "PPO against the reward model with a KL penalty toward the SL-CAI model (RL-CAI, CAI §4), cai_lite's "
           "own loop",
    "rloo": "REINFORCE leave-one-out against the reward model (TRL's RLOOTrainer), KL toward the SL-CAI model",
    "dpo": "DPO on the AI preference labels (TRL's DPOTrainer), the SL-CAI model as reference",
}


def write(cfg: Config, stage: str, out: Path, metrics: dict, inputs: list[str], made_by: dict) -> None:
    """Cards for whatever `stage` left in `out`: its shards, its adapter, the reward model's classifier."""
    made = (f"cai_lite {made_by.get('cai_lite')}" + (f", commit {made_by['git_commit']}" if made_by.get("git_commit")
                                                    else "") + f"; recipe `{cfg.recipe}`, run `{cfg.path}`")
    if any(out.glob("part-*.jsonl")):
        _dataset_card(cfg, stage, out, made)
    for folder in (out / "adapter", out / "classifier"):
        if (folder / "adapter_config.json").is_file():
            _model_card(cfg, stage, folder, metrics, inputs, made)


def _front(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _dataset_card(cfg: Config, stage: str, out: Path, made: str) -> None:
    rows = sum(sum(1 for _ in p.open(encoding="utf-8")) for p in out.glob("part-*.jsonl"))
    failed = sum(sum(1 for _ in p.open(encoding="utf-8")) for p in out.glob("failed-*.jsonl"))
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": "part-*.jsonl"}]}]
    if failed:
        configs.append({"config_name": "failed", "data_files": [{"split": "train", "path": "failed-*.jsonl"}]})
    folder = out.resolve()
    text = [_front({"configs": configs, "tags": ["cai_lite", "constitutional-ai"]}),
            f"# {stage}: {cfg.path.name}\n",
            f"{WHAT[stage]}, made by {made}, from the base model `{cfg.base.model}` and the constitution "
            f"`{cfg.constitution}`.\n",
            f"- `part-*.jsonl`: {rows} rows, in TRL's conversational format (what the next stages train on)",
            f"- `failed-*.jsonl`: {failed} rows set aside (no valid revision, or no label), the config `failed`"
            if failed else "- no rows were set aside",
            "- `stage.json`: the stage's settings and metrics\n",
            "```python", "from datasets import load_dataset", "",
            f'rows = load_dataset("{folder}", split="train")']
    if failed:
        text.append(f'failed = load_dataset("{folder}", "failed", split="train")')
    (out / "README.md").write_text("\n".join(text + ["```", ""]), encoding="utf-8")


def _model_card(cfg: Config, stage: str, folder: Path, metrics: dict, inputs: list[str], made: str) -> None:
    base = str(Path(cfg.base.model).expanduser().resolve())
    path = folder.resolve()
    read = ", ".join(f"`{name}/`" for name in inputs) or "nothing upstream"
    result = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in metrics.items() if k in ("steps", "loss_last", "eval_accuracy", "reward_last",
                                                            "margin_last", "train_rows", "train_pairs", "pairs"))
    tags = ["cai_lite", "constitutional-ai", "lora", stage]
    text = [_front({"library_name": "peft", "base_model": base, "tags": tags}),
            f"# {stage} of {cfg.path.name}: a LoRA adapter\n",
            f"Trained by cai_lite's `{stage}` stage: {WHAT[stage]}.\n",
            f"- base model: `{base}` ({cfg.base.quantization}, LoRA r={cfg.lora.r}, alpha {cfg.lora.alpha})",
            f"- inputs: {read} of the same run", f"- made by: {made}; the full config is `config.yaml` there",
            f"- result: {result}\n" if result else ""]
    if folder.name == "classifier":
        b = cfg.base
        quant = (f", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\",\n"
                 f"    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.{b.compute_dtype})"
                 if b.quantization == "nf4" else "")
        text += ["A sequence classifier with one label: a conversation's score is the logit at its last token. "
                 "cai_lite scores the user turn and the answer rendered by the base's chat template, tokenised "
                 "without extra special tokens. Loaded as trained, this gives its scores:\n",
                 "```python", "import torch", "from peft import AutoPeftModelForSequenceClassification",
                 "from transformers import AutoTokenizer, BitsAndBytesConfig", "",
                 f'model = AutoPeftModelForSequenceClassification.from_pretrained(\n    "{path}",\n'
                 f"    num_labels=1, dtype=torch.{b.dtype}{quant})",
                 f'tok = AutoTokenizer.from_pretrained("{base}")',
                 "# One conversation at a time, scored at its last token. (Batched, the pooling looks for each row's",
                 "# last token that is not config.pad_token_id: pad with a token the chat template never ends with.)",
                 "model.config.pad_token_id = None",
                 'text = tok.apply_chat_template([{"role": "user", "content": prompt},',
                 '                                {"role": "assistant", "content": answer}], tokenize=False)',
                 'score = model(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0]', "```", ""]
        if b.quantization == "nf4":
            text += ["On CPU, bitsandbytes 0.50 sends no-grad forwards through another 4-bit kernel, which moves "
                     "scores by about 1e-3, unless each `Linear4bit` has `support_avx512bf16_for_cpu = False`, as "
                     "cai_lite's base has. On a GPU there is one kernel.", ""]
    elif (folder / "head.safetensors").is_file():
        text += ["cai_lite's own format: a causal-LM adapter plus the scalar head in `head.safetensors`. "
                 "For transformers + peft, load `../classifier/` (the same weights as a sequence classifier).", ""]
    else:
        text += ["```python", "from peft import AutoPeftModelForCausalLM", "",
                 f'model = AutoPeftModelForCausalLM.from_pretrained("{path}")', "```", ""]
    (folder / "README.md").write_text("\n".join(text), encoding="utf-8")
