"""Does bf16 mixed precision train as well as fp32?  SRNN on speech16k, both precisions, two seeds.

Each run trains the same model (default SRNN with its smoothing guide) for the same number of
epochs (Adam lr 1e-3, batch 32, T = 150, one torch thread), ``--precision fp32`` or ``bf16``
(:mod:`pyro_dvae.precision`; validation losses are computed in fp32 in both), then evaluates its
best epoch's weights on the whole test utterances (RMSE, PESQ, STOI, SI-SDR; in fp32).  Writes to
``--out``: ``table.md`` (per run: test means, best validation loss, training time; and the
fp32 - bf16 gap against the seed-to-seed spread), ``curves.png`` (validation curves),
``results.json``.  Not a unit test; the numbers in README.md come from::

    nohup nice -n 10 python benchmarks/precision_training.py --data /work/shared/data/speech16k \\
        --epochs 20 --jobs 2 --out benchmarks/results/precision > precision.log 2>&1 &

``--jobs`` runs at a time, in the order fp32 seed 0, bf16 seed 0, fp32 seed 1, ...: with 2 jobs the
two precisions of a seed train side by side and see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from speech_table import cpu_model, torch_version, train_and_evaluate  # noqa: E402

METRICS = ("rmse", "pesq_wb", "pesq_nb", "stoi", "estoi", "si_sdr")


def run_one(job: dict) -> dict:
    result = train_and_evaluate(job["model"], job["data"], job["out"], job["epochs"], job["lr"],
                                job["epochs"] + 1, 150, 32, 1, job["seed"], 0,
                                reuse=job["reuse"], precision=job["precision"])
    result.update(precision=job["precision"], seed=job["seed"])
    return result


def _mean(summary: dict, metric: str) -> float:
    value = summary.get(metric)
    if isinstance(value, dict):
        value = value.get("mean")
    return math.nan if value is None else float(value)


def write_outputs(results: list, args, out: Path) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in results:
        h = r["history"]
        style = "-" if r["precision"] == "fp32" else "--"
        color = f"C{r['seed'] % 10}"
        ax.plot(h["epoch"], h["val_loss"], style, color=color, marker="o", ms=3,
                label=f"{r['precision']} seed {r['seed']} (val)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation negative VLB per frame (nats)")
    ax.set_title(f"{args.model} on speech16k: fp32 (solid) vs bf16 (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png")

    names = [m for m in METRICS if any(not math.isnan(_mean(r["summary"], m)) for r in results)]
    head = ["run", "best val loss", "train time (min)"] + names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [f"{r['precision']} seed {r['seed']}", f"{r['best_val_loss']:.4f}",
                 f"{r['train_seconds'] / 60:.1f}"]
        cells += [f"{_mean(r['summary'], m):.3f}" for m in names]
        lines.append("| " + " | ".join(cells) + " |")
    # the precision gap (difference of the means over seeds) against the seed spread
    gap = ["", "| quantity | fp32 - bf16 (mean over seeds) | seed spread (max - min within a "
           "precision) |", "|---|---|---|"]
    for key in ["best val loss"] + names:
        vals = {}
        for prec in ("fp32", "bf16"):
            vals[prec] = [r["best_val_loss"] if key == "best val loss" else _mean(r["summary"], key)
                          for r in results if r["precision"] == prec]
        if not all(vals.values()):
            continue
        diff = statistics.mean(vals["fp32"]) - statistics.mean(vals["bf16"])
        spread = max(max(v) - min(v) for v in vals.values())
        gap.append(f"| {key} | {diff:+.4f} | {spread:.4f} |")
    per_epoch = ["", "Validation loss per epoch:", ""]
    for r in results:
        per_epoch.append(f"- {r['precision']} seed {r['seed']}: "
                         + ", ".join(f"{v:.4f}" for v in r["history"]["val_loss"]))
    first = results[0]
    text = "\n".join([
        f"{args.model} on {args.data}: {args.epochs} epochs, Adam lr {args.lr:g}, batch 32, "
        f"T = 150, {first['train_sequences']} training / {first['val_sequences']} validation "
        f"sequences, {first['n_files']} test utterances (test-set means; best validation epoch).",
        f"One torch thread per run, {args.jobs} run(s) at a time; machine: {cpu_model()}, "
        f"{os.cpu_count()} cores; torch {torch_version()}.",
        "",
        *lines, *gap, *per_epoch, ""])
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "runs": [{k: v for k, v in r.items()} for r in results]},
        indent=2, default=str) + "\n")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/work/shared/data/speech16k")
    ap.add_argument("--model", default="srnn")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in --out")
    ap.add_argument("--out", default="benchmarks/results/precision")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [{"model": args.model, "data": args.data, "epochs": args.epochs, "lr": args.lr,
             "seed": seed, "precision": prec, "reuse": args.reuse,
             "out": str(out / f"{prec}-seed{seed}")}
            for seed in args.seeds for prec in ("fp32", "bf16")]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_one, jobs))
    print(write_outputs(results, args, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
