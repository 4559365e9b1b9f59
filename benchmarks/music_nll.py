"""Polyphonic-music benchmark: test NLL per time step of DKF, STORN, VRNN and SRNN on piano rolls.

The experiment of the models' original papers (DKF/DMM: Krishnan et al. 2017; STORN: Bayer and
Osendorfer 2014; SRNN: Fraccaro et al. 2016): binary piano rolls (88 keys, one frame per quarter
note), a Bernoulli likelihood (``--likelihood bernoulli``), and the importance-weighted bound on
the test log-likelihood (Burda et al. 2016) with K guide samples per sequence
(``pyro-dvae evaluate --nll --particles K``), reported as the NLL per time step.

Each model runs through the command line, exactly as a user would::

    pyro-dvae fit --model M --data DATA.npz --likelihood bernoulli ... --out OUT/runs/M
    pyro-dvae evaluate --checkpoint OUT/runs/M --nll --particles K --split test

The data default to the Bach chorales of music21 (:func:`pyro_dvae.data.music.bach_chorales`,
converted once and cached).  ``--out`` gets ``table.md`` (the table of README.md, beside the
published JSB Chorales numbers), ``results.json`` (everything) and ``loss_curves.png``.  Not a unit
test.  Example (the numbers in README.md)::

    nice -n 19 python benchmarks/music_nll.py --epochs 60 --out benchmarks/results/music_nll

``-o KEY=VALUE`` (all models) or ``-o MODEL:KEY=VALUE`` (one model) passes model options to
``fit``, for example smaller networks on a slow machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from speech_table import cpu_model, plot_curves, torch_version  # noqa: E402

MODELS = ("dkf", "storn", "vrnn", "srnn")

#: published test NLL per time step on JSB Chorales (Boulanger-Lewandowski et al. 2012 split),
#: nats; each a bound on (or estimate of) -log p(x) per time step
PUBLISHED = {
    "dkf": "about 6.9-7.0 (DKS, Krishnan et al. 2017); 6.87 (Pyro's dmm example)",
    "storn": "6.91 (Bayer and Osendorfer 2014, as quoted by Fraccaro et al. 2016)",
    "vrnn": "not reported on JSB by Chung et al. 2015",
    "srnn": "4.74 (Fraccaro et al. 2016)",
}


def _options(pairs, name: str):
    """The ``-o`` values that apply to model ``name`` (``KEY=VALUE`` or ``MODEL:KEY=VALUE``)."""
    out = []
    for pair in pairs:
        model, sep, rest = pair.partition(":")
        if sep and "=" not in model:
            if model == name:
                out.append(rest)
        else:
            out.append(pair)
    return out


def _run(cmd, log: Path, minutes: Optional[float] = None) -> bool:
    """Run a pyro-dvae command, output to ``log``; after ``minutes`` of wall time send it Ctrl-C
    (``fit`` then finishes its batch, saves last.pt and exits with status 130; best.pt keeps the
    best validation epoch so far).  Returns whether the time budget stopped it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    stopped = False
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            proc.wait(timeout=None if minutes is None else 60 * minutes)
        except subprocess.TimeoutExpired:
            stopped = True
            proc.send_signal(signal.SIGINT)
            proc.wait()
    if proc.returncode != 0 and not stopped:
        tail = log.read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"{cmd[3]} failed (exit {proc.returncode}): {' '.join(tail)}")
    return stopped


def train_and_evaluate(name: str, args) -> dict:
    """One model: ``fit`` (early stopping on val), then ``evaluate --nll`` of best.pt on test."""
    run_dir = Path(args.out) / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "log.txt"
    cli = [sys.executable, "-m", "pyro_dvae.cli"]
    fit = [*cli, "fit", "--model", name, "--data", str(args.data), "--likelihood", "bernoulli",
           "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size",
           str(args.batch_size), "--seq-len", str(args.seq_len), "--patience",
           str(args.patience), "--seed", str(args.seed), "--threads", str(args.threads),
           "--kl-warmup", str(args.kl_warmup), "--out", str(run_dir), "-q"]
    for opt in _options(args.model_option, name):
        fit += ["-o", opt]
    finished = (run_dir / "history.json").is_file() and (run_dir / "best.pt").is_file()
    if not (args.reuse and finished):
        if (run_dir / "last.pt").exists():
            raise RuntimeError(f"{run_dir} already holds a run (use --reuse or another --out)")
        t0 = time.perf_counter()
        stopped = _run(fit, log, args.minutes)
        train_seconds = time.perf_counter() - t0
        if not (run_dir / "best.pt").is_file():
            raise RuntimeError(f"{name}: the time budget ran out before the first epoch ended")
        (run_dir / "time_budget.json").write_text(json.dumps(
            {"stopped_by_time_budget": stopped, "minutes": args.minutes,
             "wall_seconds": train_seconds}) + "\n")
    budget = json.loads((run_dir / "time_budget.json").read_text())
    train_seconds, stopped = budget["wall_seconds"], budget["stopped_by_time_budget"]
    history = json.loads((run_dir / "history.json").read_text())
    nll_path = run_dir / "nll_test.json"
    t0 = time.perf_counter()
    if not (args.reuse and nll_path.is_file()):
        _run([*cli, "evaluate", "--checkpoint", str(run_dir), "--nll", "--particles",
              str(args.particles), "--split", "test", "--seed", str(args.seed), "--no-progress",
              "--out", str(nll_path)], log)
        (run_dir / "eval_time.json").write_text(json.dumps(
            {"wall_seconds": time.perf_counter() - t0}) + "\n")
    eval_seconds = json.loads((run_dir / "eval_time.json").read_text())["wall_seconds"]
    nll = json.loads(nll_path.read_text())
    # the spread over test sequences (not Monte-Carlo error): standard error of the ratio
    # sum_i L_i / sum_i T_i by the delta method, were the test sequences drawn again
    L, T = nll["per_sequence"]["log_px"], nll["per_sequence"]["frames"]
    r, n = sum(L) / sum(T), len(L)
    test_se = (sum((li - r * ti) ** 2 for li, ti in zip(L, T)) / (n * (n - 1))) ** 0.5 \
        / (sum(T) / n) if n > 1 else None
    config = json.loads((run_dir / "config.json").read_text())
    return {"model": name, "guide": config["guide"], "model_options": config["model_options"],
            "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "epochs_run": len(history["epoch"]), "best_epoch": history["best_epoch"],
            "best_val_loss": history["best_val_loss"],
            "status": "time budget" if stopped else history["status"],
            "history": history, "nll": {k: v for k, v in nll.items() if k != "per_sequence"},
            "test_set_std_error_per_step": test_se,
            "commands": [" ".join(fit[2:])]}


def marginal_baseline(path: str) -> float:
    """Test NLL per step of independent keys, each Bernoulli with its training frequency (counts
    + 1/2 over steps + 1): what a model that ignores time and the other keys can reach."""
    import numpy as np

    from pyro_dvae.data import read_arrays

    arrays = read_arrays(path)
    train = np.concatenate([x.numpy() for x in arrays["train"].x])
    test = np.concatenate([x.numpy() for x in arrays["test"].x])
    p = (train.sum(0) + 0.5) / (len(train) + 1)
    return float(-(test * np.log(p) + (1 - test) * np.log1p(-p)).sum(1).mean())


def write_table(results: list, args, stats: dict, path: Path) -> str:
    rows = ["| model (guide) | test NLL per step, K = %d (± Monte-Carlo s.e.) | ± over test "
            "sequences | test -ELBO per step | median ESS | best val loss | epochs (best) | "
            "train time | published, JSB |" % args.particles,
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        n = r["nll"]
        se = "" if n["std_error_per_step"] is None else f" ± {n['std_error_per_step']:.4f}"
        spread = r["test_set_std_error_per_step"]
        rows.append(f"| {r['model']} ({r['guide']}) | {n['nll_per_step']:.3f}{se} | "
                    f"{'–' if spread is None else f'{spread:.2f}'} | "
                    f"{-n['elbo_per_step']:.3f} | {n['ess_median']:.1f} | "
                    f"{r['best_val_loss']:.3f} | {r['epochs_run']} ({r['best_epoch']}) | "
                    f"{r['train_seconds'] / 60:.1f} min | {PUBLISHED.get(r['model'], '–')} |")
    options = "; ".join(f"{r['model']}: {r['model_options']}" for r in results
                        if r["model_options"])
    text = "\n".join([
        f"Data: {Path(args.data).name}: "
        + "; ".join(f"{split} {s['sequences']} sequences, {s['steps']} steps (length "
                    f"{s['min_length']}-{s['max_length']}, mean {s['mean_length']:.1f}; "
                    f"{s['mean_active_keys']:.1f} keys on per step)"
                    for split, s in stats.items())
        + "; the test NLL is over the whole test sequences.",
        f"Training: Bernoulli likelihood, at most {args.epochs} epochs"
        + ("" if args.minutes is None else f" or {args.minutes:g} min of wall time")
        + f" per model, Adam lr {args.lr:g}, "
        + (f"KL warm-up over {args.kl_warmup} epochs, " if args.kl_warmup else "")
        + f"batch {args.batch_size}, training sequences of T = {args.seq_len}, early stopping "
        f"patience {args.patience}, weights of the best validation epoch, seed {args.seed}; "
        f"model options: {options or 'none (the defaults: the speech sizes of 13.1)'}.",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"{args.threads} torch thread(s) per model, {args.jobs} model(s) at a time, CPU only; "
        f"torch {torch_version()}, Python {platform.python_version()}.",
        "",
        *rows,
        "",
        f"For scale: independent keys with their training frequencies (no time, no latent) "
        f"give {marginal_baseline(args.data):.3f} nats per test step.",
        "",
        *[f"- {r['model']}: stopped by the time budget after {r['epochs_run']} epochs; the "
          "weights of its best validation epoch are evaluated." for r in results
          if r["status"] == "time budget"],
        "",
        "NLL per time step: -sum_i L_K(x_i) / sum_i T_i in nats (lower is better), L_K the "
        "importance-weighted bound of Burda et al. 2016; ± is its Monte-Carlo standard error "
        "(the noise of the K samples), the next column the standard error over test sequences "
        "(how much the number would move on another test set of this size). "
        "-ELBO per step: the mean of the K log weights (the VLB). The published numbers are for "
        "JSB Chorales, another version of the corpus and another split: they are a scale, not "
        "a comparison.",
        "",
    ])
    path.write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None,
                   help=".npz file with train, val and test piano rolls (default: the Bach "
                        "chorales of music21, pyro_dvae.data.music.bach_chorales)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    p.add_argument("--epochs", type=int, required=True, help="epoch cap, the same for all")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget of each model's training (then Ctrl-C: the best "
                        "validation epoch so far is evaluated)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64, help="frames per training sequence")
    p.add_argument("--kl-warmup", type=int, default=0, metavar="EPOCHS",
                   help="KL warm-up of fit (beta from 0 to 1 over EPOCHS epochs)")
    p.add_argument("--particles", type=int, default=100, help="K of the test bound")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model")
    p.add_argument("--jobs", type=int, default=1, help="models trained at the same time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--model-option", action="append", default=[],
                   metavar="[MODEL:]KEY=VALUE", help="model option for fit, repeatable")
    p.add_argument("--out", default="benchmarks/results/music_nll")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished runs and evaluations found in OUT/runs/")
    args = p.parse_args(argv)
    from pyro_dvae.data.music import bach_chorales, statistics

    args.data = str(Path(args.data).resolve() if args.data else bach_chorales(progress=True))
    stats = statistics(args.data)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, started = {}, time.perf_counter()
    text = ""
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(train_and_evaluate, name, args): name for name in names}
        for fut in as_completed(futures):
            name = futures[fut]
            try:
                r = fut.result()
            except Exception as err:  # report and go on with the other models
                print(f"{name}: FAILED: {err}", flush=True)
                continue
            results[name] = r
            n = r["nll"]
            print(f"{name}: {r['epochs_run']} epochs ({r['status']}, best {r['best_epoch']}) in "
                  f"{r['train_seconds'] / 60:.1f} min; test NLL per step {n['nll_per_step']:.3f}"
                  f" (K = {args.particles}, eval {r['eval_seconds']:.0f} s; "
                  f"{time.perf_counter() - started:.0f} s so far)", flush=True)
            ordered = [results[m] for m in names if m in results]
            plot_curves(ordered, out / "loss_curves.png")
            text = write_table(ordered, args, stats, out / "table.md")
            (out / "results.json").write_text(json.dumps(
                {"args": vars(args), "data": stats, "results": ordered}, indent=2) + "\n")
    if not results:
        print("no model finished", file=sys.stderr)
        return 1
    print(text)
    return 0 if len(results) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
