"""How good is `plan=true`'s time estimate? For each recipe (default: tiny_cpu and lab), in a fresh
temporary directory: build the base if missing, run the estimate (probe + counts) in one process,
then the real run (`python -m cai_lite recipe=R`) in another, both at the same OMP_NUM_THREADS, and
print each stage's estimated and measured seconds (stage.json), their ratio, and the run's total
ratio, against the targets: within ±30% per stage, ±20% for the run. Not a test; the numbers move
with the machine and with whatever else runs on it.

The lab base is pretrained the first time (minutes, then cached in $CAI_LITE_CACHE or ~/.cache).

    OMP_NUM_THREADS=1 python benchmarks/time_estimate.py [--recipes tiny_cpu,lab] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE_TARGET, RUN_TARGET = 0.30, 0.20

ESTIMATE = """
import json, sys
from pathlib import Path
from cai_lite import estimate, probe, stage_plan, tiny
from cai_lite.recipe import load_config
cfg = load_config(sys.argv[1:])
if not Path(cfg.base.model).is_dir():  # as the run builds it, so that the probe has a model to time
    if cfg.base.create.startswith("tiny-"):
        tiny.build_tiny_model(cfg.base.model, cfg.base.create.split("-", 1)[1])
    else:
        from cai_lite.lab import pretrain
        pretrain.build_lab_model(cfg.base.model, cfg.seed, stage_plan.LAB_SIZES[cfg.base.create])
work, p = probe.timed_work(cfg)
print(json.dumps({"stages": {s: estimate.stage_seconds(s, w, p.rates) for s, w in work.items()},
                  "probe_s": p.seconds, "load_s": p.load_s, "rates": vars(p.rates), "answers": p.answers}))
"""


def measure(recipe: str, threads: int, extra: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"cai_time_{recipe}_"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [f"recipe={recipe}", f"run_dir={work / 'run'}", *extra]
    est = subprocess.run([sys.executable, "-c", ESTIMATE, *args], cwd=work, env=env, capture_output=True, text=True)
    if est.returncode:
        raise SystemExit(f"{recipe}: the estimate failed:\n{est.stderr[-3000:]}")
    estimated = json.loads(est.stdout.strip().splitlines()[-1])
    run = subprocess.run([sys.executable, "-m", "cai_lite", *args], cwd=work, env=env, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{recipe}: the run failed:\n{run.stderr[-3000:]}")
    measured = {s: json.loads((work / "run" / s / "stage.json").read_text())["seconds"] for s in estimated["stages"]}
    return {"recipe": recipe, "threads": threads, "estimated": estimated, "measured": measured}


def verdicts(r: dict) -> list[str]:
    est, got = r["estimated"]["stages"], r["measured"]
    lines = [f"{r['recipe']} ({r['threads']} thread(s); probe {r['estimated']['probe_s']:.1f} s)",
             f"  {'stage':<18}{'estimated s':>12}{'measured s':>12}{'ratio':>8}  within ±{STAGE_TARGET:.0%}"]
    for s in est:
        ratio = est[s] / got[s] if got[s] else float("inf")
        lines.append(f"  {s:<18}{est[s]:>12.1f}{got[s]:>12.1f}{ratio:>8.2f}  "
                     f"{'yes' if abs(ratio - 1) <= STAGE_TARGET else 'NO'}")
    total_e, total_m = sum(est.values()), sum(got.values())
    ratio = total_e / total_m
    lines.append(f"  {'run (sum)':<18}{total_e:>12.1f}{total_m:>12.1f}{ratio:>8.2f}  "
                 f"{'yes' if abs(ratio - 1) <= RUN_TARGET else 'NO'} (target ±{RUN_TARGET:.0%})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="tiny_cpu,lab")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for both the estimate and the run")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    results = [measure(r, a.threads, a.extra) for r in a.recipes.split(",")]
    for r in results:
        print("\n".join(verdicts(r)))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
