"""Epoch time of ``pyro-dvae fit`` with its allocator setting and with the default allocator.

``pyro-dvae fit`` makes malloc keep freed memory for the next step (:mod:`pyro_dvae.allocator`);
``PYRO_DVAE_MALLOC=default`` turns that off.  This runs the CLI as a user does, on a synthetic
power spectrogram set of paper-sized sequences (320 training and 32 validation sequences of 150
frames, 257 bins: 10 batches of 32 and a validation pass per epoch), one thread, alternating the
two settings run by run, and reports the median epoch time of each (from history.json) and their
ratio.

    python benchmarks/allocator_fit.py [--models storn dsae vae] [--epochs 3] [--runs 2]
        [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SETTINGS = ("retain", "default")


def spectrogram_set(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, train=rng.exponential(size=(320, 150, 257)).astype("float32"),
             val=rng.exponential(size=(32, 150, 257)).astype("float32"))


def epoch_seconds(model: str, data: Path, out: Path, setting: str, epochs: int):
    env = dict(os.environ)
    env.pop("PYRO_DVAE_MALLOC", None)
    if setting == "default":
        env["PYRO_DVAE_MALLOC"] = "default"
    cmd = [sys.executable, "-m", "pyro_dvae.cli", "fit", "--model", model, "--data", str(data),
           "--epochs", str(epochs), "--elbo", "meanfield", "--threads", "1", "--patience", "0",
           "-q", "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return json.loads((out / "history.json").read_text())["seconds"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["storn", "dsae", "vae"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2, help="runs per model and setting")
    ap.add_argument("--out", default=None, help="folder for the data and runs (default: temp)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = root / "spectrograms.npz"
        spectrogram_set(data)
        print(f"pyro-dvae fit, {args.epochs} epochs x {args.runs} runs per setting, one thread; "
              "median epoch seconds (first epoch of each run left out)")
        print("\n| model | fit (malloc keeps freed memory) s | PYRO_DVAE_MALLOC=default s | "
              "speed-up |")
        print("|---|---|---|---|")
        for model in args.models:
            secs = {s: [] for s in SETTINGS}
            for run in range(args.runs):
                for setting in SETTINGS:
                    out = root / f"{model}-{setting}-{run}"
                    secs[setting] += epoch_seconds(model, data, out, setting, args.epochs)[1:]
            med = {s: statistics.median(v) for s, v in secs.items()}
            print(f"| {model} | {med['retain']:.2f} | {med['default']:.2f} | "
                  f"{med['default'] / med['retain']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
