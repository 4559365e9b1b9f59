"""Speech analysis-resynthesis benchmark: the experiment of 13.2-13.3 on any audio folder.

Trains every registered model (or ``--models``) on ``DATA/train`` with early stopping on
``DATA/val`` (13.2.2: Adam, batch 32, patience 20, T = 150), all with the same budget (an epoch cap,
``--epochs``), evaluates each on the whole utterances of ``DATA/test`` (13.2.1, silence trimmed)
and writes to ``--out``:

- ``table.md``: a table shaped like Table 13.1 (every metric of ``pyro_dvae.metrics``; means,
  then medians with 95 % confidence intervals), each model's training time and epochs, the slope
  of its validation loss over its last 10 epochs, and the paper's Table 13.1 (WSJ0) beside it;
- ``loss_curves.png``: the training and validation losses of all models on one plot (Figure 13.1);
- ``results.json``: everything, and one run directory per model (``runs/<model>/``, with the
  per-file evaluation ``eval_test.json`` / ``.csv``).

Not a unit test.  Example (the numbers in README.md)::

    nice python benchmarks/speech_table.py --data ../shared/data/speech16k --epochs 12 \\
        --lr 1e-3 --jobs 2 --out benchmarks/results/speech16k

Each model trains in its own process with ``--threads`` torch threads (default 1); ``--jobs`` of
them run at once.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def train_and_evaluate(name: str, data: str, out: str, epochs: int, lr: float, patience: int,
                       seq_len: int, batch_size: int, threads: int, seed: int,
                       eval_workers: int, reuse: bool = False, precision: str = "fp32") -> dict:
    """One model: fit (early stopping on val), then evaluate best.pt on test.  Runs in a worker.

    If training raises after a best.pt was saved, the best epoch so far is still evaluated and the
    error is recorded in ``status``.  ``reuse``: take a finished (or crashed, or still running) run
    already in the run directory, and its ``eval_test.json`` when it is newer than ``best.pt``,
    instead of training again.
    ``precision``: ``fp32`` or ``bf16`` training (:mod:`pyro_dvae.precision`).
    """
    import warnings

    import torch

    import pyro
    from pyro_dvae import build
    from pyro_dvae.data.datasets import load_splits
    from pyro_dvae.speech import evaluate_run
    from pyro_dvae.train import TrainConfig, fit

    torch.set_num_threads(threads)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped short pieces were reported by the parent
        splits = load_splits(data, seq_len, ("train", "val"))
    run_dir = Path(out) / "runs" / name
    model, guide = build(name)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience,
                         seed=seed, threads=threads, precision=precision)
    error = None
    if reuse and (run_dir / "history.json").is_file() and (run_dir / "best.pt").is_file():
        history = json.loads((run_dir / "history.json").read_text())
        train_seconds = sum(history["seconds"])
        note = run_dir / "error.txt"
        error = note.read_text().strip() if note.is_file() else None
    else:
        t0 = time.perf_counter()
        try:
            history = fit(model, guide, splits["train"], splits["val"], config, out_dir=run_dir,
                          progress=False, meta={"data": str(data), "seq_len": seq_len})
        except Exception as err:
            if not (run_dir / "best.pt").is_file():
                raise
            lines = str(err).strip().splitlines()  # Pyro appends the trace's shapes
            error = f"{type(err).__name__}: {lines[0] if lines else ''}"
            (run_dir / "error.txt").write_text(error + "\n")
            history = json.loads((run_dir / "history.json").read_text())
        train_seconds = time.perf_counter() - t0
    if error is not None:
        history["status"] = f"crashed in epoch {len(history['epoch']) + 1} ({error})"
    t0 = time.perf_counter()
    cached = run_dir / "eval_test.json"
    fresh = cached.is_file() and cached.stat().st_mtime >= (run_dir / "best.pt").stat().st_mtime
    if reuse and fresh:
        result = json.loads(cached.read_text())
    else:
        result = evaluate_run(run_dir, data, "test", workers=eval_workers, progress=False)
    eval_seconds = time.perf_counter() - t0
    return {"model": name, "guide": guide.name, "run_dir": str(run_dir),
            "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "epochs_run": len(history["epoch"]), "best_epoch": history["best_epoch"],
            "best_val_loss": history["best_val_loss"], "status": history["status"],
            "history": history, "summary": result["summary"], "n_files": result["n_files"],
            "train_sequences": len(splits["train"]), "val_sequences": len(splits["val"]),
            "num_params": sum(p.numel() for p in list(model.parameters())
                              + list(guide.parameters()))}


def plot_curves(results: list, path: Path) -> None:
    """Figure 13.1: train (solid) and validation (dashed) loss of every model on one plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, r in enumerate(results):
        h, color = r["history"], f"C{i % 10}"
        ax.plot(h["epoch"], h["train_loss"], "-", color=color, label=f"{r['model']} train")
        val = [math.nan if v is None else v for v in h["val_loss"]]
        ax.plot(h["epoch"], val, "--", color=color, label=f"{r['model']} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative VLB per frame (nats, up to a constant)")
    ax.set_title("Training (solid) and validation (dashed) loss")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


SPEECH16K_ATTRIBUTION = """
Data: speech16k, from Asterisk's core sound prompts, CC BY-SA 3.0
(https://creativecommons.org/licenses/by-sa/3.0/). en-US and es-MX prompts (c) 2003-2010 Allison
Smith (http://www.theivrvoice.com), financial contributions by Digium, Inc.; fr-CA prompts (c)
2006-2008 June Wallack (http://www.junewallack.com), translated by Clod Patry, Kristopher Lalletti
and June Wallack, financial contributions by Digium, Inc., Unlimitel and BGM Informatique.
Changes: decoded from G.722 and re-encoded as 16 kHz FLAC; tone and silence prompts removed; split
into train/val/test.  These results (and the trained weights) are released under CC BY-SA 3.0.
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def torch_version() -> str:
    import torch

    return torch.__version__


TREND_EPOCHS = 10


def val_trend(history: dict, epochs: int = TREND_EPOCHS) -> str:
    """The least-squares slope of the validation loss over the last ``epochs`` epochs (how far
    from converged the curve says a run is), as text."""
    import numpy as np

    pairs = [(e, v) for e, v in zip(history["epoch"], history["val_loss"])
             if v is not None and math.isfinite(v)][-epochs:]
    if len(pairs) < 3:
        return "–"
    e, v = np.array(pairs, dtype=np.float64).T
    return f"{np.polyfit(e, v, 1)[0]:+.2f}/epoch"


def write_table(results: list, args, path: Path) -> str:
    from pyro_dvae.speech import format_paper_table, format_table

    summaries = {r["model"]: r["summary"] for r in results}
    extra = {
        "train time": {r["model"]: f"{r['train_seconds'] / 60:.1f} min" for r in results},
        "epochs (best)": {r["model"]: f"{r['epochs_run']} ({r['best_epoch']})" for r in results},
        "best val loss": {r["model"]: ("–" if r["best_val_loss"] is None
                                        else f"{r['best_val_loss']:.3f}") for r in results},
        "val loss trend": {r["model"]: val_trend(r["history"]) for r in results},
    }
    first = results[0]
    text = "\n".join([
        f"Data: {args.data} ({first['train_sequences']} training and {first['val_sequences']} "
        f"validation sequences of T = {args.seq_len} frames; {first['n_files']} test utterances, "
        "whole, silence trimmed).",
        f"Budget: at most {args.epochs} epochs, Adam lr {args.lr:g}, batch {args.batch_size}, "
        f"early stopping patience {args.patience}, weights of the best validation epoch; "
        f"{args.threads} torch thread(s) per model, {args.jobs} model(s) at a time, "
        f"machine: {cpu_model()}, {os.cpu_count()} cores, CPU only; "
        f"torch {torch_version()}, Python {platform.python_version()}.",
        "",
        "Test-set means:",
        "",
        format_table(summaries, "mean", extra=extra),
        "",
        *[f"- {r['model']}: {r['status']}; the weights of its best epoch are evaluated."
          for r in results if r["status"] not in ("finished", "early_stopped")],
        "",
        "Test-set medians [95 % confidence interval]:",
        "",
        format_table(summaries, "median"),
        "",
        "val loss trend: the least-squares slope of the validation loss over the last "
        f"{TREND_EPOCHS} epochs, in nats per frame per epoch (negative: still improving).",
        "",
        "The paper's Table 13.1 (WSJ0, about 9 h of training speech; on the scales of our "
        "RMSE-paper, PESQ-paper and STOI):",
        "",
        format_paper_table([r["model"] for r in results]),
        "",
    ])
    if "speech16k" in str(args.data):
        text += SPEECH16K_ATTRIBUTION
    path.write_text(text)
    return text


def main(argv=None) -> int:
    from pyro_dvae.registry import REGISTRY

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with train/ val/ test/")
    p.add_argument("--models", default=",".join(REGISTRY),
                   help="comma-separated registered models (default: all)")
    p.add_argument("--epochs", type=int, required=True, help="epoch cap, the same for all")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=150)
    p.add_argument("--threads", type=int, default=1, help="torch threads per model")
    p.add_argument("--jobs", type=int, default=1, help="models trained at the same time")
    p.add_argument("--eval-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/speech")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished runs (and their evaluations) found in OUT/runs/")
    args = p.parse_args(argv)

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in REGISTRY]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(REGISTRY)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # compute (and cache) the features once, before the workers read them
    from pyro_dvae.data.datasets import load_splits

    t0 = time.perf_counter()
    splits = load_splits(args.data, args.seq_len, ("train", "val"), progress=True)
    print(f"features: {splits['train']!r}, {splits['val']!r} ({time.perf_counter() - t0:.0f} s)",
          flush=True)

    common = dict(data=args.data, out=str(out), epochs=args.epochs, lr=args.lr,
                  patience=args.patience, seq_len=args.seq_len, batch_size=args.batch_size,
                  threads=args.threads, seed=args.seed, eval_workers=args.eval_workers,
                  reuse=args.reuse)
    results, started = {}, time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(train_and_evaluate, name, **common): name for name in names}
        for fut in as_completed(futures):
            name = futures[fut]
            try:
                r = fut.result()
            except Exception as err:  # report and go on with the other models
                print(f"{name}: FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            results[name] = r
            s = r["summary"]
            print(f"{name}: {r['epochs_run']} epochs ({r['status']}, best {r['best_epoch']}) in "
                  f"{r['train_seconds'] / 60:.1f} min; test RMSE {s['rmse']['mean']:.4f} "
                  f"PESQ-WB {s['pesq_wb']['mean']:.2f} PESQ-NB {s['pesq_nb']['mean']:.2f} "
                  f"PESQ-paper {s['pesq_paper']['mean']:.2f} STOI {s['stoi']['mean']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)",
                  flush=True)
            text = write_all(results, args, out)  # after every model: partial results survive
    if not results:
        print("no model finished", file=sys.stderr)
        return 1
    print(text)
    return 0 if len(results) == len(names) else 1


def write_all(results: dict, args, out: Path) -> str:
    """table.md, loss_curves.png and results.json for the models finished so far."""
    from pyro_dvae.registry import REGISTRY
    from pyro_dvae.speech import _json_safe

    ordered = [results[n] for n in REGISTRY if n in results]  # the registry's (paper's) order
    plot_curves(ordered, out / "loss_curves.png")
    text = write_table(ordered, args, out / "table.md")
    (out / "results.json").write_text(json.dumps(
        _json_safe({"args": vars(args), "results": ordered}), indent=2, default=str) + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
