"""The ollama Modelfile: FROM points at the GGUF beside it, and TEMPLATE (ollama's Go template) is
written only where it renders exactly what the model's Jinja chat template renders. ollama itself is
not installed here, so the Go templates are rendered by `modelfile.render_go` and checked against
literal expected strings.

    python -m pytest tests/test_modelfile.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import processors

from cai_lite import modelfile
from cai_lite.tiny import CHAT_TEMPLATE, train_sentencepiece_tokenizer, train_tokenizer

LLAMA3_TEMPLATE = (  # Llama-3-8B-Instruct's chat template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]


def _parse(path: Path) -> dict[str, list[str]]:
    """Modelfile instructions -> their arguments (comments dropped, TEMPLATE's triple quotes kept whole)."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#"))
    out: dict[str, list[str]] = {}
    while text.strip():
        text = text.lstrip()
        word, _, rest = text.partition(" ")
        if rest.startswith('"""'):
            arg, _, text = rest[3:].partition('"""')
        else:
            arg, _, text = rest.partition("\n")
        out.setdefault(word, []).append(arg)
    return out


def test_chatml_modelfile(tmp_path: Path) -> None:
    tok = train_tokenizer()
    (tmp_path / "model-q4_k_m.gguf").write_bytes(b"")
    m = _parse(modelfile.write_modelfile(tmp_path, "model-q4_k_m.gguf", tok))
    assert (tmp_path / m["FROM"][0]).is_file()
    assert m["PARAMETER"] == ['stop "<|im_start|>"', 'stop "<|im_end|>"']
    (template,) = m["TEMPLATE"]
    want = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    assert modelfile.render_go(template, CHAT) == want
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == want


def test_llama3_modelfile_leaves_bos_to_llama_cpp(tmp_path: Path) -> None:
    tok = train_tokenizer()
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.bos_token_id)])
    tok.chat_template = LLAMA3_TEMPLATE
    m = _parse(modelfile.write_modelfile(tmp_path, "model-f16.gguf", tok))
    assert m["PARAMETER"] == ['stop "<|start_header_id|>"', 'stop "<|end_header_id|>"', 'stop "<|eot_id|>"']
    want = ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            "Hello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert modelfile.render_go(m["TEMPLATE"][0], CHAT) == want
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == "<|begin_of_text|>" + want


@pytest.mark.parametrize("case", ["inst", "chatml-with-default-system", "none"])
def test_untranslated_template_falls_back_to_the_gguf(tmp_path: Path, case: str) -> None:
    if case == "inst":
        tok = train_sentencepiece_tokenizer()  # Llama-2 / Mistral [INST] format
    else:
        tok = train_tokenizer()
        # Qwen2.5-style: ChatML, but a system prompt appears when the conversation has none, which
        # the Go template would not add; a partial match must not pass as a translation.
        tok.chat_template = (None if case == "none" else
                             "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
                             + CHAT_TEMPLATE)
    m = _parse(modelfile.write_modelfile(tmp_path, "model-f16.gguf", tok))
    assert "TEMPLATE" not in m
    assert m["FROM"] == ["./model-f16.gguf"]
    assert m["PARAMETER"] == [f'stop "{tok.eos_token}"']
    assert "tokenizer.chat_template" in (tmp_path / "Modelfile").read_text()
