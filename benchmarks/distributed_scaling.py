"""Throughput of data-parallel SRNN training (torchrun, DDP on gloo) with 1 and 2 processes.

Each run is ``torchrun --standalone --nproc_per_node N`` of this file in worker mode: the paper's
SRNN (13.1: z 16, hidden 128, 257 bins) trained by :func:`pyro_dvae.train.fit` on the first
``--sequences`` training sequences of the speech corpus (T = ``--seq-len`` frames), one torch thread
per process, no validation set (the measured time is the training loop only).  With N = 1 torchrun
sets WORLD_SIZE=1 and ``fit`` takes its single-process path (no DDP), so launch costs are the same.

Runs (one thread per process, B = ``--batch-size``): 1 process with batch B, 2 processes with B
each (global batch 2B), 1 process with batch 2B.  Weak scaling (same per-process batch, the usual
DDP use) compares the first two, strong scaling (same global batch) the last two.

Throughput = training sequences per second of an epoch, the median over the epochs after the first
(warm-up) and over ``--repeats`` runs; the 1- and 2-process runs are interleaved (the machine may
be shared).  Scaling efficiency = throughput(N) / (N x throughput(1)).

    python benchmarks/distributed_scaling.py --data /work/shared/data/speech16k --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class _Slice:
    """The first n sequences of a SequenceDataset, in memory (``.x``, ``.mask``)."""

    def __init__(self, ds, n):
        self.x, self.mask = ds.x[:n].contiguous(), ds.mask[:n].contiguous()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.mask[i]


def worker(args) -> None:
    import torch

    import pyro
    from pyro_dvae import build
    from pyro_dvae.data import load_splits
    from pyro_dvae.train import TrainConfig, fit

    torch.set_num_threads(1)
    train = load_splits(args.data, seq_len=args.seq_len, splits=("train",))["train"]
    if len(train) < args.sequences:
        raise SystemExit(f"only {len(train)} sequences of {args.seq_len} frames")
    train = _Slice(train, args.sequences)
    pyro.set_rng_seed(0)
    model, guide = build("srnn", x_dim=train.x.shape[-1])
    with tempfile.TemporaryDirectory() as tmp:
        hist = fit(model, guide, train, None,
                   TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3,
                               patience=0, threads=1), Path(tmp) / "run", progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps({"seconds": hist["seconds"],
                                                 "train_loss": hist["train_loss"]}))


def launch(args, nproc: int, batch_size: int) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(Path(__file__).resolve()), "--worker",
               "--data", str(args.data), "--seq-len", str(args.seq_len),
               "--sequences", str(args.sequences), "--epochs", str(args.epochs),
               "--batch-size", str(batch_size), "--result", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        return json.loads(result.read_text())["seconds"][1:]  # the first epoch warms up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/work/shared/data/speech16k")
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="per process (weak scaling)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    b = args.batch_size
    runs = {"1 process, batch B": (1, b), "2 processes, batch B each": (2, b),
            "1 process, batch 2B": (1, 2 * b)}
    epochs: dict = {k: [] for k in runs}
    for r in range(args.repeats):  # interleaved
        for name, (nproc, bs) in runs.items():
            t0 = time.time()
            seconds = launch(args, nproc, bs)
            epochs[name] += seconds
            print(f"repeat {r + 1}: {name} (B={b}): epoch seconds "
                  f"{[round(s, 2) for s in seconds]} (run {time.time() - t0:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
    n = args.sequences
    tput = {k: n / statistics.median(v) for k, v in epochs.items()}
    one, two, one_big = (tput[k] for k in runs)
    print(f"\nSRNN, T={args.seq_len}, {n} sequences per epoch, B={b}, 1 thread per process, "
          f"median over {args.repeats} runs x {args.epochs - 1} epochs")
    for k in runs:
        print(f"  {k:28s} {tput[k]:7.1f} sequences/s")
    print(f"  scaling efficiency, weak (batch {b} per process):  {two / (2 * one):.2f}")
    print(f"  scaling efficiency, strong (global batch {2 * b}):    {two / (2 * one_big):.2f}")

if __name__ == "__main__":
    main()
