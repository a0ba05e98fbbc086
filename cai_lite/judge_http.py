"""The `openai` judge: any OpenAI-compatible server (vLLM, llama.cpp server, ollama, a hosted API).

Sends `/v1/completions` requests with the prompt rendered by the base model's chat template (less
the BOS text, which the server adds itself: data.server_text, in judges.build) and `logprobs`, and
reads the top log-probs of the first answer token. Where the letters are not among the top
`judge.top_logprobs` (servers cap it: OpenAI at 20), it parses the answer text instead and counts
the label as hard. (Echoing the prompt plus each letter would get any letter's log-prob,
but llama-cpp-python 0.3.36's server reports echoed log-probs one position off, so it is not used.)
At most `judge.concurrency` requests in flight; `judge.timeout_s` per socket read; a request that
fails (HTTP 408/429/5xx, a dropped connection, a cut-off or non-JSON body, a timeout) is sent
again, up to `judge.retries` times, after an exponential backoff with jitter (or the server's
Retry-After), and each prompt's answer goes to that prompt's slot only, so a retry never adds or
moves a label (tests/test_judge_load.py). The API key is read from the environment variable named
by `judge.api_key_env`; it is never stored or logged.

Reads the server; writes nothing.

    python -m llama_cpp.server --model judge.gguf --port 8000 &
    python run.py recipe=tiny_cpu stages=[label_preferences] judge=openai judge.base_url=http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from cai_lite.config import GenerationSettings, JudgeConfig

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
# Backoff jitter from a generator of its own: how many retries happened never moves the global `random`
# state, which the generation stages seed per shard.
_JITTER = random.Random()


class ServerError(RuntimeError):
    """The server could not answer after every retry; `status` is the last HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def headers(jc: JudgeConfig | GenerationSettings) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if jc.api_key_env:
        h["Authorization"] = "Bearer " + os.environ[jc.api_key_env]
    return h


def check(jc: JudgeConfig | GenerationSettings, where: str = "judge") -> list[str]:
    """The key variable is set and `GET {base_url}/models` answers, before any model loads."""
    if jc.api_key_env and not os.environ.get(jc.api_key_env):
        return [f"{where}.api_key_env: environment variable {jc.api_key_env} is not set"]
    scheme, _, rest = jc.base_url.partition("://")
    if scheme not in ("http", "https") or not rest.strip("/"):
        return [f"{where}.base_url: {jc.base_url!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8000/v1)"]
    url = jc.base_url.rstrip("/") + "/models"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers(jc)), timeout=min(jc.timeout_s, 10)):
            return []
    except urllib.error.HTTPError as e:
        return [f"{where}.base_url: {url} answered HTTP {e.code}"]
    except urllib.error.URLError as e:
        return [f"{where}.base_url: cannot reach {url} ({e.reason})"]
    except (OSError, ValueError) as e:  # a timeout while reading the answer; a malformed host or port
        return [f"{where}.base_url: cannot reach {url} ({e})"]


def post(url: str, body: dict, headers: dict[str, str], timeout_s: float, retries: int) -> dict:
    """POST `body` as JSON and return the completions answer, retrying what may pass (module
    docstring); raise ServerError naming `url` once every retry failed. Shared with generation_http."""
    data = json.dumps(body).encode()
    last: Exception | None = None
    wait = 0.0
    for attempt in range(retries + 1):
        if attempt:
            # Jitter, so that many workers refused at once (429 under load) do not come back at once.
            time.sleep(wait or _JITTER.uniform(0.5, 1.0) * min(8.0, 0.5 * 2 ** (attempt - 1)))
        wait = 0.0
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                res = json.loads(r.read())
            if not isinstance(res, dict) or not isinstance(res.get("choices"), list) or not res["choices"] \
                    or not isinstance(res["choices"][0], dict):
                raise ValueError(f"not a completions answer: {str(res)[:200]}")
            return res
        except urllib.error.HTTPError as e:
            last = e
            if e.code not in RETRY_STATUS:
                break
            after = (e.headers or {}).get("Retry-After", "")
            wait = min(30.0, float(after)) if after.replace(".", "", 1).isdigit() else 0.0
        # OSError: refused, reset, timed out (URLError and TimeoutError are OSErrors);
        # HTTPException: a status line or body cut off (IncompleteRead); ValueError: not JSON or not UTF-8.
        except (OSError, http.client.HTTPException, ValueError) as e:
            last = e
    raise ServerError(f"{url}: {type(last).__name__}: {last}",
                      last.code if isinstance(last, urllib.error.HTTPError) else None)


class OpenAIJudge:
    def __init__(self, jc: JudgeConfig, render):
        """`render(messages, prefill)` gives the text to send: as the server must receive it."""
        self.jc, self.render = jc, render
        self.name = f"openai:{jc.model}"
        self.hard_labels = 0
        self._lock = threading.Lock()  # hard_labels is counted from `concurrency` threads
        self.url = jc.base_url.rstrip("/") + "/completions"

    def _post(self, body: dict) -> dict:
        return post(self.url, body, headers(self.jc), self.jc.timeout_s, self.jc.retries)

    def _one_choice(self, text: str, letters: str) -> list[float] | None:
        body = {"model": self.jc.model, "prompt": text, "max_tokens": 1, "temperature": 0.0,
                "logprobs": self.jc.top_logprobs}
        try:
            res = self._post(body)
        except ServerError as e:
            log.warning("%s: request failed, recorded as a failure: %s", self.name, e)
            return None
        choice = res["choices"][0]
        top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
        top = top if isinstance(top, dict) else {}  # another server's layout: fall back to the text
        found: dict[str, float] = {}
        for tok, lp in top.items():
            key = tok.strip()
            if key in letters:  # "A" and " A" are two tokens for the same answer: add their probabilities
                found[key] = lp if key not in found else max(found[key], lp) + math.log1p(math.exp(-abs(found[key] - lp)))
        if all(letter in found for letter in letters):
            m = max(found.values())
            exps = [math.exp(found[letter] - m) for letter in letters]
            return [e / sum(exps) for e in exps]
        # No log-probs for every letter: fall back to the answer text, and count it as a hard label.
        match = re.match(r"\s*\(?([A-Z])", choice.get("text", ""))
        if match and match.group(1) in letters:
            with self._lock:
                self.hard_labels += 1
            return [1.0 if letter == match.group(1) else 0.0 for letter in letters]
        return None

    def option_probs(self, prompts, letters: str) -> list[list[float] | None]:
        texts = [self.render(p.messages, p.prefill) for p in prompts]
        with ThreadPoolExecutor(max_workers=self.jc.concurrency) as pool:
            return list(pool.map(lambda t: self._one_choice(t, letters), texts))

    def generate(self, prompts, max_new_tokens: int) -> list[str | None]:
        def one(text: str) -> str | None:
            try:
                res = self._post({"model": self.jc.model, "prompt": text, "max_tokens": max_new_tokens,
                                  "temperature": 0.0})
            except ServerError as e:
                log.warning("%s: generation failed: %s", self.name, e)
                return None
            return res["choices"][0].get("text", "")

        texts = [self.render(p.messages, p.prefill) for p in prompts]
        with ThreadPoolExecutor(max_workers=self.jc.concurrency) as pool:
            return list(pool.map(one, texts))

    def close(self) -> None:
        pass
