"""The teaching lab's targets, measured: `python run.py` (recipe=lab) over several seeds, cold (empty
model cache: pretraining included) and warm (cached model, new run dir), with the oracle's rates
per stage on held-out prompts (unseen forms and unseen kinds apart), the judge's agreement with
the oracle, and the wall times. Prints the mean and range over seeds; not a test.

Each seed runs in a fresh temporary directory as a user would run it (`python -m cai_lite
recipe=lab seed=S` there, with its own CAI_LITE_CACHE), one at a time.

    python benchmarks/lab.py --seeds 0,1,2 [--extra ppo.steps=40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = (("red_team", "harmful", "harmful rate (held-out harmful prompts)"),
        ("red_team", "evasive", "evasive rate"),
        ("red_team", "engaging-harmless", "engaging-harmless rate"),
        ("red_team", "off-topic", "off-topic rate"),
        ("helpful", "helpful", "benign helpful rate (held-out benign prompts)"),
        ("helpful", "over-refusal", "benign over-refusal rate"))


def run_seed(seed: int, extra: list[str], keep: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"cai_lab_{seed}_"))
    env = {**os.environ, "CAI_LITE_CACHE": str(work / "cache")}
    times = {}
    for name in ("cold", "warm"):
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "cai_lite", "recipe=lab", f"seed={seed}", f"run_name={name}", *extra],
                           cwd=work, env=env, capture_output=True, text=True)
        times[name] = time.perf_counter() - start
        if r.returncode != 0:
            raise SystemExit(f"seed {seed} ({name}) failed:\n{r.stderr[-3000:]}")
    metrics = json.loads((work / "runs" / "warm" / "evaluate" / "metrics.json").read_text())
    cold = json.loads((work / "runs" / "cold" / "evaluate" / "metrics.json").read_text())
    pre = json.loads((work / "runs" / "_models" / "lab" / "lab_pretrain.json").read_text())
    out = {"seed": seed, "seconds": times, "pretrain_seconds": pre["seconds"], "params": pre["params"],
           "oracle": metrics["oracle"], "same_numbers_cold_and_warm": cold["oracle"] == metrics["oracle"],
           "win_rates": metrics["win_rates"], "work": str(work)}
    if not keep:
        subprocess.run(["rm", "-rf", str(work)])
    return out


def _stat(values: list[float | None]) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return f"{sum(v) / len(v):.2f} [{min(v):.2f}, {max(v):.2f}]" if len(v) > 1 else f"{v[0]:.2f}"


def table(results: list[dict], split: str) -> str:
    models = results[0]["oracle"]["rates"].keys()
    lines = [f"| held-out, {split.replace('_', ' ')} | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for kind, fam, label in ROWS:
        cells = [_stat([(r["oracle"]["rates"][m][kind].get(split) or {}).get(fam) for r in results]) for m in models]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--extra", action="append", default=[], help="key=value override for every run")
    ap.add_argument("--json", default="")
    ap.add_argument("--keep", action="store_true", help="keep each seed's directory")
    a = ap.parse_args()
    results = [run_seed(int(s), a.extra, a.keep) for s in a.seeds.split(",")]
    for split in ("all", "held_out_form", "held_out_kind"):
        print(table(results, split) + "\n")
    print(f"judge agreement with the oracle on decided pairs: "
          f"{_stat([r['oracle']['judge_agreement']['agreement'] for r in results])}")
    print(f"wall time of python run.py, cold / warm (minutes): {_stat([r['seconds']['cold'] / 60 for r in results])}"
          f" / {_stat([r['seconds']['warm'] / 60 for r in results])}; pretraining "
          f"{_stat([r['pretrain_seconds'] / 60 for r in results])}; {results[0]['params'] / 1e6:.2f}M parameters")
    print(f"cold and warm runs gave the same numbers: {all(r['same_numbers_cold_and_warm'] for r in results)}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
