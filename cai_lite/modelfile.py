"""An ollama Modelfile for an exported GGUF: `ollama create NAME -f Modelfile` in the export folder.

Reads nothing from disk: `write_modelfile(folder, gguf_name, tokenizer)` takes the tokenizer whose
Jinja chat template the model was trained with and writes `<folder>/Modelfile` with `FROM
./<gguf_name>`, a `TEMPLATE` in ollama's Go template language and `PARAMETER stop` lines.

ollama cannot run Jinja, and a general Jinja-to-Go translator would be guesswork, so only the two
formats cai_lite's models ship are translated, ChatML (`<|im_start|>`, Qwen2 and the tiny models)
and Llama-3 (`<|start_header_id|>`), and only when the model's own template renders *exactly* the
same text as the translation on probe conversations. Any other template (Llama-2/Mistral `[INST]`,
Qwen2.5's default system prompt, Llama-3.1's date header) gets a Modelfile without TEMPLATE and a
comment saying so: ollama then uses the template it recognises from the GGUF's
`tokenizer.chat_template`, if any.

    python -c "from transformers import AutoTokenizer; from cai_lite.modelfile import write_modelfile; \
write_modelfile('runs/tiny_cpu/export', 'model-f16.gguf', AutoTokenizer.from_pretrained('runs/tiny_cpu/export/hf'))"
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Each Go template has one shape, PREFIX{{ range .Messages }}BODY{{ end }}SUFFIX, with only {{ .Role }}
# and {{ .Content }} in BODY, so `render_go` below can check it against the Jinja original. The
# suffix is the generation prompt: ollama renders the template to ask for the next assistant turn.
FORMATS = {
    "chatml": (
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ["<|im_start|>", "<|im_end|>"],
    ),
    "llama3": (
        "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
}
PROBES = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there."},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why is the sky blue? {x} %s"}],
    [{"role": "user", "content": "One line, please."}],
]


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """What ollama renders from one of FORMATS' templates for `messages` (that shape only)."""
    prefix, rest = template.split("{{ range .Messages }}", 1)
    body, suffix = rest.split("{{ end }}", 1)
    turns = (body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages)
    return prefix + "".join(turns) + suffix


def go_template(tokenizer) -> tuple[str, str, list[str]] | None:
    """(format name, Go template, stop strings) that renders like `tokenizer`'s chat template on every
    probe conversation, or None. A leading BOS in the Jinja output is left to llama.cpp, which adds
    it itself when the tokenizer does (the GGUF's add_bos_token)."""
    if not tokenizer.chat_template:
        return None
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    for name, (template, stops) in FORMATS.items():
        for messages in PROBES:
            try:
                jinja = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - e.g. templates that reject a system role: not this format
                break
            if adds_bos and jinja.startswith(bos):
                jinja = jinja[len(bos):]
            if jinja != render_go(template, messages):
                break
        else:
            return name, template, stops
    return None


def write_modelfile(folder: str | Path, gguf_name: str, tokenizer) -> Path:
    """Write `<folder>/Modelfile` for `<folder>/<gguf_name>`; return its path."""
    path = Path(folder) / "Modelfile"
    lines = ["# ollama Modelfile written by cai_lite's export stage. In this folder:",
             "#   ollama create cai -f Modelfile && ollama run cai",
             f"FROM ./{gguf_name}"]
    found = go_template(tokenizer)
    if found is not None:
        name, template, stops = found
        lines.insert(2, f"# TEMPLATE: the model's {name} chat template in ollama's Go template language.")
        lines.append(f'TEMPLATE """{template}"""')
    else:
        log.info("%s: chat template not translated for ollama; it will use the GGUF's", path)
        lines.insert(2, "# No TEMPLATE: cai_lite translates only ChatML and Llama-3 chat templates that render")
        lines.insert(3, "# exactly like the model's own; ollama uses the template it recognises from the GGUF's")
        lines.insert(4, "# tokenizer.chat_template, or else the bare prompt.")
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
