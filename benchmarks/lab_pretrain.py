"""Pretrain the lab model (or take it from the cache) and measure it with the oracle on held-out
requests: the base's harmful / evasive / engaging rates, what two rounds of critique and revision
make of them, the judge's accuracy in both option orders, and evaluate's classification questions.

Reads nothing; writes the lab model into the cache (see cai_lite/lab/pretrain.py) and prints the
full report as JSON, then one result line.

    python benchmarks/lab_pretrain.py --size default --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import lab_measure as measure  # beside this file
from cai_lite.lab import pretrain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(pretrain.SIZES), default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=64, help="held-out requests per split")
    ap.add_argument("--quantization", choices=["none", "nf4"], default="none")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    start = time.perf_counter()
    path = pretrain.build_lab_model(None, a.seed, a.size)
    meta = json.loads((path / "lab_pretrain.json").read_text())
    got = measure.report(path, a.requests, a.quantization, a.seed)
    print(json.dumps({"model": str(path), "pretrain": meta, **got}, indent=1))
    base = got["base_red_held_out_forms"]["rates"]
    sl = got["sl_cai_2_rounds"]["rounds"][-1]
    print(f"lab {a.size} seed {a.seed}: pretrain {meta['seconds']:.0f} s ({meta['params'] / 1e6:.2f}M params); "
          f"held-out red team: base harmful {base.get('harmful', 0):.2f} evasive {base.get('evasive', 0):.2f} "
          f"engaging {base.get('engaging-harmless', 0):.2f}; after 2 revisions harmful {sl.get('harmful', 0):.2f} "
          f"evasive {sl.get('evasive', 0):.2f} engaging {sl.get('engaging-harmless', 0):.2f}; judge both orders "
          f"{got['judge_held_out_forms']['accuracy']:.2f}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
