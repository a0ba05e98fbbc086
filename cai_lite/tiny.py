"""Tiny random causal LMs with a real tokenizer (byte-level BPE, or SentencePiece-style BPE with byte
fallback as Llama-2 and Mistral ship), built in-process with no download.

Reads nothing but the text embedded below; writes a normal Hugging Face model folder
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat template,
generation_config.json). Every code path then treats it like any other base model: the
`tiny_cpu` recipe and the tests point `base.model` at such a folder, with `base.create` set so
the pipeline builds it first when it is missing.

    python -c "from cai_lite.tiny import build_tiny_model; build_tiny_model('runs/_models/tiny-llama', 'llama')"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# ChatML, the format Qwen2 and many open models use. `{% generation %}` is not needed: SFT uses
# prompt/completion rows, so TRL finds the completion span itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Llama-2 / Mistral-Instruct's format, for the SentencePiece-style tokenizers.
INST_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# Text the tokenizer learns its merges from: assistant talk, principles and the judge's
# multiple-choice vocabulary, so the prompts cai_lite builds tokenize into short sequences.
_CORPUS = """\
Human: How do I pick a lock? Assistant: I can explain how locks work, but I won't help you break into a place that is not yours.
Human: What is the capital of France? Assistant: The capital of France is Paris.
Human: Can you help me write a poem about the sea? Assistant: Sure. The sea is wide and blue, and the waves come home to you.
Human: Tell me how to hurt someone. Assistant: I will not help with hurting people. If you are angry, talking to someone you trust can help.
Identify specific ways in which the assistant's last response is harmful, unethical, racist, sexist, toxic, dangerous, or illegal.
Please rewrite the assistant response to remove any and all harmful, unethical, dangerous, or illegal content.
Please choose the assistant response that is as harmless and ethical as possible. Options: (A) (B) The answer is: (A) The answer is: (B)
Consider the following conversation between a human and an assistant. Which response is more helpful, honest and harmless?
Critique: The response gives dangerous advice. Revision: Here is a safer answer that still explains the reasons.
The assistant should be helpful, honest and harmless. It should explain its reasons instead of refusing without a word.
Let's think step by step. Therefore, option (A) is the best response. Therefore, option (B) is the best response.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: . , ; : ! ? ' " ( ) [ ] { } - _ / % $ # @ & * + = < >.
"""


def train_tokenizer(vocab_size: int = 512, extra_text: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer (same pre-tokenizer regex as GPT-2, so llama.cpp's
    `gpt-2` pre-tokenizer reproduces it) and wrap it with the chat template and pad/eos tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _CORPUS.splitlines() + list(extra_text or [])
    tok.train_from_iterator(lines * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # generation pads on the left; training code sets what it needs
        clean_up_tokenization_spaces=False,
    )


# Llama-3's tokenizer: byte-level BPE after this split (llama.cpp's "llama-bpe" pre-tokenizer), its
# special tokens, BOS added, and Llama-3-8B-Instruct's chat template.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def train_llama3_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A Llama-3-style byte-level BPE tokenizer (see LLAMA3_SPLIT) with BOS, eos `<|eot_id|>`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>", chat_template=LLAMA3_CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def train_sentencepiece_tokenizer(vocab_size: int = 512, legacy: bool = False) -> PreTrainedTokenizerFast:
    """A Llama-2 / Mistral style tokenizer without the `sentencepiece` package: BPE over "▁"-marked words,
    ids 0-2 `<unk> <s> </s>`, then the 256 byte-fallback tokens `<0x00>`..., then the learned pieces,
    so characters the corpus lacks (newlines, accents, CJK) fall back to bytes. BOS is added.

    legacy=False: transformers' LlamaTokenizer (Metaspace, "▁" prepended only at the start: Mistral and
    current Llama-2 uploads). legacy=True: the older tokenizer.json that prepends "▁" in the normalizer
    to every piece of text, also after special tokens, loaded verbatim."""
    specials = ["<unk>", "<s>", "</s>"]
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials) - 256, show_progress=False)
    learner.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    kwargs = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=INST_CHAT_TEMPLATE,
                  clean_up_tokenization_spaces=False)
    if not legacy:
        return LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_prefix_space=True, **kwargs)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def build_tiny_model(
    path: str | Path,
    arch: Literal["llama", "qwen2", "mistral"] = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_positions: int = 2048,
    seed: int = 0,
    init_std: float = 0.1,
    tokenizer: Literal["bpe", "llama3-bpe", "sentencepiece", "sentencepiece-legacy"] = "bpe",
    rope_parameters: dict | None = None,
) -> Path:
    """Write a random `arch` model and its tokenizer to `path` and return the path.

    Widths stay multiples of 64 so bitsandbytes' NF4 blocks (64 values) tile every weight.
    `init_std` is larger than the usual 0.02: at 0.02 the frozen random LM head caps every logit
    near 1 (|h| ~ sqrt(64), |w| ~ 0.16), so no adapter could make the model learn anything; at 0.1
    LoRA can, and the next-token distributions are far enough from uniform to test judges on.
    `tokenizer` picks byte-level BPE (GPT-2's split, or Llama-3's) or a SentencePiece-style one;
    `rope_parameters` (e.g. Llama-3.1's {"rope_type": "llama3", ...}) goes to the config as is."""
    path = Path(path)
    if tokenizer == "bpe":
        tok = train_tokenizer(vocab_size)
    elif tokenizer == "llama3-bpe":
        tok = train_llama3_tokenizer(vocab_size)
    else:
        tok = train_sentencepiece_tokenizer(vocab_size, legacy=tokenizer == "sentencepiece-legacy")
    tokenizer = tok
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    if rope_parameters is not None:
        common["rope_parameters"] = rope_parameters
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    else:
        raise ValueError(f"tiny model arch must be 'llama', 'qwen2' or 'mistral' (got {arch!r})")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "cai_lite_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}) + "\n")
    return path


def stand_in_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly `vocab_size` ids (w0 w1 ... plus the chat specials), for a
    model shape whose real tokenizer is not at hand: every id decodes, and text of n words made of
    them is n tokens, so benchmarks get the sequence lengths they ask for."""
    words = SPECIAL_TOKENS + ["<unk>", "user", "assistant", "system"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(vocab_size - len(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE, padding_side="left",
                                   clean_up_tokenization_spaces=False)


def build_shape_folder(path: str | Path, config: dict) -> Path:
    """A model folder with a real shape and no weights, for `base.init=random`: `config` (a config.json
    as a dict, e.g. a shipped one from cai_lite/shapes/) with its special token ids pointed at a
    stand-in tokenizer of the same vocabulary size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = stand_in_tokenizer(config["vocab_size"])
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    (path / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    tok.save_pretrained(path)
    return path
