"""critique_revise through a server vs in-process, as ratios measured in one run (never bare seconds).

Builds the tiny random Llama of tiny_cpu in a temporary folder, exports it to an f32 GGUF, starts
`python -m llama_cpp.server` on 127.0.0.1 serving it, and runs stage critique_revise three times
on the same prompts: local (the tiny_cpu path: NF4 base in-process), then `generation.backend=openai`
at `generation.concurrency` 1 and 4. Rows per second come from each stage.json's `seconds` (the
stage alone, not the base's loading). Prints one line per ratio; >1 means the server is faster.

This measures the plumbing on a model too small to be compute-bound: llama-cpp-python's server runs
one request at a time, so concurrency helps only by overlapping HTTP and tokenizing with decoding.
On a GPU server (vLLM batches concurrent requests) the concurrency ratio is the one that grows.

    python benchmarks/generation_server.py [--prompts 16] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cai_lite import pipeline
from cai_lite.gguf_export import export_gguf
from cai_lite.recipe import load_config
from cai_lite.tiny import build_tiny_model


def start_server(gguf: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=1)
            return proc, url
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.terminate()
                raise RuntimeError("llama_cpp.server did not start (is the `server` extra installed?)") from None
            time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="red-team prompts (plus half as many helpful ones)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the server (torch uses its default)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny-llama", "llama")
        gguf = export_gguf(model, Path(tmp) / "tiny-f32.gguf", "f32")
        proc, url = start_server(gguf, args.threads)
        try:
            common = ["recipe=tiny_cpu", f"base.model={model}", "base.create=none", "stages=[critique_revise]",
                      f"data.limit={args.prompts}", f"critique_revise.helpful_limit={args.prompts // 2}",
                      f"critique_revise.rounds={args.rounds}"]
            runs = {"local": [], "server c=1": ["generation.concurrency=1"], "server c=4": ["generation.concurrency=4"]}
            speed = {}
            for name, extra in runs.items():
                server = ["generation.backend=openai", f"generation.base_url={url}"] if extra else []
                cfg = load_config([*common, f"run_dir={tmp}/run-{name.replace(' ', '_')}", *server, *extra])
                done = pipeline.run(cfg)["critique_revise"]
                speed[name] = (done["rows"] + done["rows_without_revision"]) / done["seconds"]  # every row made
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    rows = f"{args.prompts + args.prompts // 2} rows, {args.rounds} rounds"
    print(f"critique_revise rows/s, llama.cpp server c=1 / local: {speed['server c=1'] / speed['local']:.2f} ({rows})")
    print(f"critique_revise rows/s, llama.cpp server c=4 / local: {speed['server c=4'] / speed['local']:.2f} ({rows})")
    print(f"critique_revise rows/s, llama.cpp server c=4 / c=1: {speed['server c=4'] / speed['server c=1']:.2f}")


if __name__ == "__main__":
    main()
