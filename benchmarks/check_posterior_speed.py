"""Time ``check-posterior`` (``structure.check_registered``) for every registered pair.

What the CLI runs: x_dim 4, z_dim 2, T = 7 (``--steps``), one CPU thread.  Each pair is checked
``--repeats`` times (after one warm-up run) and the median wall time is printed in milliseconds,
with the verdict, so that a faster reading that changed the answer would show.

    OMP_NUM_THREADS=1 python benchmarks/check_posterior_speed.py [--repeats 5] [--steps 7]
        [--models dkf srnn] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pyro_dvae.registry import REGISTRY
from pyro_dvae.structure import check_registered


def time_pair(name: str, variant: str, steps: int, repeats: int) -> dict:
    report = check_registered(name, variant, steps=steps)  # warm-up (imports, allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        report = check_registered(name, variant, steps=steps)
        times.append(time.perf_counter() - start)
    d = report.to_dict()
    verdicts = {r["latent"]: r.get("verdict", "consistent" if r["consistent"] else
                                   "not consistent") for r in d["latents"]}
    return {"model": name, "guide": variant, "median_ms": 1000 * statistics.median(times),
            "min_ms": 1000 * min(times), "verdicts": verdicts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, entry in REGISTRY.items():
        if args.models and name not in args.models:
            continue
        for variant in entry.guides:
            row = time_pair(name, variant, args.steps, args.repeats)
            rows.append(row)
            verdict = "; ".join(f"{k}: {v}" for k, v in row["verdicts"].items())
            print(f"{name:15s} {variant:14s} {row['median_ms']:8.1f} ms  (min {row['min_ms']:.1f})"
                  f"  {verdict}", flush=True)
    total = sum(r["median_ms"] for r in rows)
    print(f"{len(rows)} pairs, T = {args.steps}: median total {total:.0f} ms, "
          f"max {max(r['median_ms'] for r in rows):.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
