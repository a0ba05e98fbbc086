"""Where the public inputs of the shipped recipes come from, as the commands that fetch them.

cai_lite never downloads at run time. When a check finds an input file missing, its one-line error
(`missing()`) names the command that fetches it, when the file is one of these, and the setting
that does without it, when it is optional. The README's "For a real model" lists the same commands
(tests/test_first_run.py keeps the two in step). Reads and writes nothing.

    python -c "from cai_lite import downloads; print(downloads.command('data/hh-rlhf/harmless-base/train.jsonl.gz'))"
"""

from __future__ import annotations

import re
from pathlib import Path

# hh-rlhf (MIT): red-team transcripts, whose first Human turn is the prompt. On the hub as a dataset.
HH_RLHF = re.compile(r"(?:^|/)hh-rlhf/((?:harmless|helpful)-[a-z-]+/(?:train|test)\.jsonl\.gz)$")
# The CAI paper's supplement on GitHub: its evals and prompt files (its own names, so known anywhere).
PAPER = "https://raw.githubusercontent.com/anthropics/ConstitutionalHarmlessnessPaper/main"
PAPER_FILES = {
    "438HHHEvaluations.jsonl": "evals",
    "HarmfulVsEthical.jsonl": "evals",
    "HarmfulnessClassification.jsonl": "evals",
    "CritiqueRevisionInstructions.json": "prompts",
    "CritiqueRevisionFewShotPrompts.json": "prompts",
    "RLMadisonInstructions.json": "prompts",
    "RLMadisonFewShotPrompts.json": "prompts",
    "RLMadisonPrecogFewShotPrompts.json": "prompts",
}


# Instruct models of the sizes the recipes and the planner's shapes are made for, by folder name.
MODELS = {name.split("/")[1]: name for name in (
    "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct",
    "meta-llama/Llama-3.1-8B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3", "meta-llama/Llama-2-7b-chat-hf")}


def model_command(model: str) -> str:
    """The `hf download` that fills a missing `base.model` folder: a known model's hub id by its folder
    name, or `model` itself where it reads as a hub id (NAME, or ORG/NAME with no local ORG/ folder)."""
    path = Path(model).expanduser()
    looks_like_id = (len(path.parts) == 1 or (len(path.parts) == 2 and not path.parent.is_dir())) \
        and not model.startswith((".", "/", "~"))
    if path.name in MODELS:
        return f"hf download {MODELS[path.name]} --local-dir {f'models/{path.name}' if looks_like_id else model}"
    if looks_like_id:
        return f"hf download {model} --local-dir models/{path.name}"
    return "hf download ORG/NAME --local-dir models/NAME"


def command(path: str) -> str | None:
    """The shell command that puts the file at `path`, for the files above; None for others."""
    posix = Path(path).as_posix()
    if m := HH_RLHF.search(posix):
        local_dir = posix[:m.start(1)].rstrip("/")  # hf download keeps the file's path inside the repo
        return f"hf download Anthropic/hh-rlhf {m[1]} --repo-type dataset --local-dir {local_dir}"
    name = Path(path).name
    if name in PAPER_FILES:
        return f"curl -L --create-dirs -o {posix} {PAPER}/{PAPER_FILES[name]}/{name}"
    return None


def missing(key: str, path: str, off: str = "", otherwise: str = "") -> str:
    """The error for an input file that is not there: its key and path, the command that fetches it,
    and `off`, the setting that does without it (optional inputs). `otherwise`: what to say when
    the file is none of ours."""
    fetch = command(path)
    line = f"{key}: {path}: no such file"
    if fetch:
        line += f"; fetch it: {fetch}"
    elif otherwise:
        line += f" ({otherwise})"
    return line + (f"; or set {off}" if off else "")
