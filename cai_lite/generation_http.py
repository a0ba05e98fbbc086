"""Generation through an OpenAI-compatible server (`generation.backend=openai`): vLLM, llama.cpp's
server, ollama, or a hosted API, for critique_revise, label_preferences' response sampling and
evaluate's answers.

Sends `POST {generation.base_url}/completions` with the prompt text the local path would tokenize:
the base tokenizer's chat template, rendered here, cut from the left to `generation.max_prompt_tokens`
with the local tokenizer where the cut text tokenizes back to the very tokens the local path keeps
(data.cut_left), less a BOS the server adds itself. (Token ids as the prompt would be exact too,
but llama-cpp-python's server and ollama take text only.) Not `/chat/completions`: there the server
applies its own copy of the template (a GGUF's, ollama's Modelfile's), which may differ from
base.model's in a space or a system prompt, and then the two backends would not be sampling from
the same prompts. Every engine
named above serves `/v1/completions`. Each answer's `usage.prompt_tokens` is compared with the
number of tokens the local path feeds the model, and a difference is logged: it means the server
holds another tokenizer.

An adapter role (None = the bare base, sft, ppo, ...) maps to a served model name:
`generation.model` for the base, `generation.adapters` entries `role=name` for the rest (vLLM serves
LoRA adapters by name: `--enable-lora --lora-modules cai-sft=runs/RUN/sft/adapter`). Each request
carries `seed` = a draw from the generator the stage seeded for this shard + the prompt's index, so
a resumed shard sends the same requests, and a server that honours seeds (llama.cpp, vLLM) gives
the same text. `ended` is `finish_reason == "stop"` (EOS before `max_tokens`), as the local path's
EOS flag; sampling settings other than temperature, top_p and max_tokens are the server's defaults.

At most `generation.concurrency` requests in flight, answers kept in prompt order; a failed request
is retried (judge_http.post: backoff, Retry-After) and its answer fills that prompt's slot only, so
a retry never adds, drops or moves a row. A prompt still failing after `generation.retries` stops
the stage with one error; the shards already written stay, and a rerun resumes after them.

Reads the server; writes nothing.

    python -m llama_cpp.server --model runs/RUN/export/model-f16.gguf --port 8000 &
    python run.py recipe=tiny_cpu stages=[critique_revise] generation.backend=openai generation.base_url=http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from cai_lite import data, judge_http
from cai_lite.config import GenerationSettings

log = logging.getLogger(__name__)
ROLES = ("policy", "critique", "sft", "ppo", "rloo", "dpo")  # the adapter names stages generate with


class GenerationServerError(data.DataError):
    """The generation server could not answer a prompt after every retry."""


def served(g: GenerationSettings) -> tuple[dict[str, str], list[str]]:
    """`generation.adapters` as {role: served name}, and what is wrong with its entries."""
    names, errors = {}, []
    for entry in g.adapters:
        role, sep, name = entry.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or not name or role not in ROLES:
            errors.append(f"generation.adapters: {entry!r} is not role=name with a role among {', '.join(ROLES)}")
        else:
            names[role] = name
    return names, errors


def check(g: GenerationSettings, roles: list[str | None]) -> list[str]:
    """With the openai backend: every role a stage will sample with has a served name, and the
    server answers (`GET /models`); run before any model loads."""
    if g.backend == "local":
        return []
    names, errors = served(g)
    missing = [r for r in dict.fromkeys(roles) if r is not None and r not in names]
    if missing:
        errors.append(f"generation.adapters: no served model name for {', '.join(missing)}, which generation."
                      f"backend=openai samples with; add {', '.join(m + '=NAME' for m in missing)} (the name the "
                      "server serves that adapter under)")
    return errors + judge_http.check(g, "generation")


def describe(g: GenerationSettings) -> dict:
    """What made a stage's text, for its stage.json (never the API key)."""
    if g.backend == "local":
        return {"backend": "local"}
    return {"backend": "openai", "base_url": g.base_url, "model": g.model, "adapters": served(g)[0]}


def prompt_texts(tokenizer, prompts: list[str], max_tokens: int) -> tuple[list[str], list[bool], list[int]]:
    """The texts to send, whether each was cut to `max_tokens` (from the left, as the local path
    cuts: data.cut_left), and how many tokens the local path feeds the model for each, which is
    what a server holding the same tokenizer must count."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    texts, cut, counts = [], [], []
    for text, x in zip(prompts, ids):
        kept = data.cut_left(tokenizer, x, max_tokens)
        cut.append(len(kept) < len(x))
        # The text as rendered where it fits (less a BOS the server adds itself); a cut prompt as the
        # decoding of its kept tokens, which cut_left chose so that it tokenizes back to them.
        texts.append(data.decode_for_server(tokenizer, kept) if cut[-1] else data.server_text(tokenizer, text))
        counts.append(len(kept))
    return texts, cut, counts


def complete(g: GenerationSettings, texts: list[str], counts: list[int], role: str | None, max_new_tokens: int,
             temperature: float, seed: int, desc: str = "generate") -> tuple[list[str], list[bool]]:
    """One completion per text from the model serving `role`; (texts, ended), in prompt order."""
    model = g.model if role is None else served(g)[0][role]  # check() made sure the role has a name
    url = g.base_url.rstrip("/") + "/completions"
    headers = judge_http.headers(g)

    def one(i: int) -> tuple[str, bool, bool]:
        body = {"model": model, "prompt": texts[i], "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": g.top_p, "seed": (seed + i) % 2**31}
        try:
            res = judge_http.post(url, body, headers, g.timeout_s, g.retries)
        except judge_http.ServerError as e:
            hint = {404: f" Does the server serve a model named {model!r} (generation.model, generation.adapters)?",
                    400: " Is the server's context (llama.cpp --n_ctx, vLLM --max-model-len) at least "
                         "generation.max_prompt_tokens + the answer length?"}.get(e.status, "")
            raise GenerationServerError(f"generation.base_url: {e} (after {g.retries} retries).{hint} The shards "
                                        "already written stay; a rerun resumes after them.") from None
        choice = res["choices"][0]
        reported = (res.get("usage") or {}).get("prompt_tokens")
        text = choice.get("text")
        if not isinstance(text, str):
            raise GenerationServerError(f"generation.base_url: {url} answered without a completion text: {str(res)[:200]}")
        return text.strip(), choice.get("finish_reason") == "stop", reported not in (None, counts[i])

    # pool.map keeps prompt order whatever order answers come in; on an error, cancel what is queued.
    pool = ThreadPoolExecutor(max_workers=g.concurrency)
    try:
        answers = list(tqdm(pool.map(one, range(len(texts))), total=len(texts), desc=desc, leave=False,
                            disable=len(texts) <= g.concurrency))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if differ := sum(a[2] for a in answers):
        log.warning("%d of %d prompts sent to %s (%s) count other token numbers on the server than base.model's "
                    "tokenizer: it holds another tokenizer or chat template, so its prompts differ from the "
                    "local path's", differ, len(texts), url, model)
    return [a[0] for a in answers], [a[1] for a in answers]
