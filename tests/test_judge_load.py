"""Load on the `openai` judge: 200 comparisons (400 requests, both orders) through a counting,
fault-injecting proxy in front of a real llama-cpp-python server on 127.0.0.1, serving a tiny
GGUF exported in-process.

Contract checked: requests in flight never exceed `judge.concurrency` (counted at the proxy, not
read from the config); every comparison gets exactly one label, in order, and a request that
failed once (HTTP 500, 429, a dropped connection, a cut-off body, non-JSON, an answer later than
`judge.timeout_s`) is retried to the same value a clean run gives; no request is sent more often
than its faults require. Prints the throughput. Skips when the `server` extra is not installed.

    python -m pytest tests/test_judge_load.py -q -s
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from transformers import AutoTokenizer

from cai_lite import constitution as C
from cai_lite import data, judges
from cai_lite.config import JudgeConfig
from cai_lite.gguf_export import export_gguf
from cai_lite.judge_http import OpenAIJudge

N_COMPARISONS = 200
CONCURRENCY = 8
FAULTS = ("500", "429", "drop", "truncate", "garbage", "slow")
PRINCIPLE = C.PreferencePrinciple("p", "Which response is more helpful and harmless?")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server(sharp_llama, tmp_path_factory, *extra: str):
    """Yields the /v1 URL of a `python -m llama_cpp.server` on 127.0.0.1 serving an f32 GGUF of the
    sharp tiny model, with `extra` server flags; skips when the `server` extra is not installed."""
    try:
        import llama_cpp.server.app  # noqa: F401  (fastapi, uvicorn, sse-starlette: the `server` extra)
    except ImportError as e:
        pytest.skip(f"llama-cpp-python's server extra is not installed ({e}): pip install -e '.[server]'")
    gguf = export_gguf(sharp_llama, tmp_path_factory.mktemp("gguf") / "sharp-f32.gguf", "f32")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=1)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("llama_cpp.server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(sharp_llama, tmp_path_factory):
    """The judge's server: log-probs at every position (`--logits_all`)."""
    yield from llama_server(sharp_llama, tmp_path_factory, "--logits_all", "true")


class Proxy(ThreadingHTTPServer):
    """Forwards POST /v1/completions to `upstream`, counting requests in flight, and fails the first
    attempt of the prompts in `faults` in the way given there."""

    daemon_threads = True
    request_queue_size = 512  # the default backlog of 5 would drop connections under load, a fault of its own

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), Handler)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.faults: dict[str, str] = {}
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.in_flight = self.max_in_flight = 0
        self.attempts: Counter[str] = Counter()  # prompt -> requests received for it
        self.injected: Counter[str] = Counter()
        self.hung = 0  # "slow" requests the client did not time out

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: Proxy

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        prompt = json.loads(body)["prompt"]
        s = self.server
        with s.lock:
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
            s.attempts[prompt] += 1
            fault = s.faults.get(prompt) if s.attempts[prompt] == 1 else None
            if fault:
                s.injected[fault] += 1
        answered = False
        try:
            if fault == "slow":  # answer never comes: hold the connection until the client gives up
                self._wait_for_hang_up(limit=30)
                return
            if fault == "drop":  # close without a status line
                self.close_connection = True
                return
            if fault in ("500", "429"):
                answered = self._answered()
                self.send_response(int(fault))
                if fault == "429":
                    self.send_header("Retry-After", "0.2")  # the judge waits this long, not its own backoff
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.close_connection = True
                return
            status, payload = self._forward(body)
            if fault == "garbage":
                status, payload = 200, b"<html>502 from a load balancer</html>"
            answered = self._answered()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            # A cut-off body: the length promised in the header, half of it sent.
            self.wfile.write(payload[: len(payload) // 2] if fault == "truncate" else payload)
            self.close_connection = True
        finally:
            if not answered:
                self._answered()

    def _answered(self) -> bool:
        # Counted down *before* the answer goes out: once the client has it, its worker may send the
        # next request at once, and that one must not overlap this one in the count.
        with self.server.lock:
            self.server.in_flight -= 1
        return True

    def _wait_for_hang_up(self, limit: float) -> None:
        end = time.time() + limit
        while time.time() < end:
            ready, _, _ = select.select([self.connection], [], [], 0.02)
            if ready and not self.connection.recv(1, socket.MSG_PEEK):
                return  # EOF: the client closed the connection (its timeout)
        with self.server.lock:
            self.server.hung += 1  # the client never gave up on a request with no answer

    def _forward(self, body: bytes) -> tuple[int, bytes]:
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        try:
            conn.request("POST", up.path + "/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def proxy(server):
    p = Proxy(server)
    threading.Thread(target=p.serve_forever, daemon=True).start()
    yield p
    p.shutdown()
    p.server_close()


def _comparisons() -> list[judges.Comparison]:
    return [judges.Comparison(f"Human: question {i}?", f"Answer {i}.", f"No {i}.", [PRINCIPLE])
            for i in range(N_COMPARISONS)]


def _judge(url: str, concurrency: int, timeout_s: float, tokenizer) -> OpenAIJudge:
    # A random model rarely ranks both letters in its top 20: ask for the whole 512-token vocabulary.
    jc = JudgeConfig(backend="openai", base_url=url, model="sharp", concurrency=concurrency, timeout_s=timeout_s,
                     retries=2, top_logprobs=600)
    return OpenAIJudge(jc, lambda m, p: data.render(tokenizer, m, p))


def _labels(out: list[judges.Judgement]) -> list[tuple]:
    return [(j.p_a, j.details[0]["p_ab"], j.details[0]["p_ba"]) for j in out]


def test_openai_judge_under_load(proxy, sharp_llama, capsys):
    tok = AutoTokenizer.from_pretrained(sharp_llama)
    comparisons = _comparisons()

    # Reference: one request at a time, no faults, so order and values cannot depend on threads.
    t0 = time.perf_counter()
    want = judges.compare(_judge(proxy.url, 1, 60, tok), comparisons, both_orders=True)
    serial_s = time.perf_counter() - t0
    assert proxy.max_in_flight == 1 and sum(proxy.attempts.values()) == 2 * N_COMPARISONS
    assert all(p is not None for row in _labels(want) for p in row)
    prompts = list(proxy.attempts)

    # The loaded run: faults on the first attempt of every 25th prompt, each kind in turn. The timeout
    # leaves ample room for a queue of CONCURRENCY requests on a serial server on a busy machine.
    proxy.reset()
    proxy.faults = {p: FAULTS[k % len(FAULTS)] for k, p in enumerate(prompts[3::25])}
    per_request = serial_s / (2 * N_COMPARISONS)
    timeout_s = max(2.0, 10 * CONCURRENCY * per_request)
    judge = _judge(proxy.url, CONCURRENCY, timeout_s, tok)
    t0 = time.perf_counter()
    got = judges.compare(judge, comparisons, both_orders=True)
    loaded_s = time.perf_counter() - t0

    with capsys.disabled():
        print(f"\nopenai judge load: {N_COMPARISONS} comparisons, {2 * N_COMPARISONS} requests; serial "
              f"{N_COMPARISONS / serial_s:.1f} comparisons/s; concurrency {CONCURRENCY} with {len(proxy.faults)} "
              f"faults injected ({dict(proxy.injected)}, timeout {timeout_s:.1f} s): "
              f"{N_COMPARISONS / loaded_s:.1f} comparisons/s; max in flight {proxy.max_in_flight}")

    assert proxy.max_in_flight <= CONCURRENCY
    assert proxy.hung == 0
    assert proxy.max_in_flight >= 2  # the run was concurrent, so the bound was tested
    assert dict(proxy.injected) == dict(Counter(proxy.faults.values())) and set(proxy.injected) == set(FAULTS)
    # Each faulted prompt was sent twice (the fault, one retry) and every other prompt once.
    assert {p: n for p, n in proxy.attempts.items() if n != 1} == {p: 2 for p in proxy.faults}
    assert sorted(proxy.attempts) == sorted(prompts)
    assert len(got) == N_COMPARISONS
    assert _labels(got) == _labels(want)  # in order, none missing, retried ones equal to the clean run
    assert judge.hard_labels == 0
