"""KVAE's training step against SRNN's, and its cost in the sequence length (issue 14, part 2).

    python benchmarks/kalman_scan.py [--T 150 600 2400] [--batch 32] [--repeats 3]
                                     [--methods sequential scan] [--threads 1]

For each T: seconds per training step (forward, ELBO, backward, Adam; TraceMeanField_ELBO on fused
sites, as ``fit`` and benchmarks/step_speed.py run it) of SRNN and of KVAE with each Kalman method (``-o kalman_method``),
interleaved so that machine load hits all alike, medians over ``--repeats``; the ratio KVAE / SRNN;
then the Kalman part alone at KVAE's sizes (L 16, D 32, float64: filter, backward factors, one
joint draw of z_{1:T} and its density, forward and backward) per method, with the number of
sequential steps of each (T for the recursion, the levels of the odd-even scan for the scan).

Run on a checkout without ``kalman_method`` (before the scan), KVAE is timed with its one method.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

import pyro_dvae

try:  # a checkout from before fused sites times the per-step sites
    from pyro_dvae.models.base import fused_sites
except ImportError:
    fused_sites = contextlib.nullcontext


def _trainer(name, x, **options):
    model, guide = pyro_dvae.build(name, x_dim=x.shape[-1], **options)
    opt = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-4)
    elbo = TraceMeanField_ELBO()

    def step():
        t0 = time.perf_counter()
        opt.zero_grad()
        with fused_sites():
            loss = elbo.differentiable_loss(model.model, guide, x, None, None, 10000)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def _kalman_part(T, batch, method, gen):
    """Seconds for posterior + draw + densities, forward and backward, at KVAE's sizes."""
    from pyro_dvae.distributions.kalman import LinearGaussianSSM

    L, D, dt = 16, 32, torch.float64
    A = (torch.eye(L, dtype=dt) + 0.05 * torch.randn(batch, T, L, L, generator=gen, dtype=dt))
    C = 0.05 * torch.randn(batch, T, D, L, generator=gen, dtype=dt)
    offset = 0.1 * torch.randn(batch, T, L, generator=gen, dtype=dt)
    a = torch.randn(batch, T, D, generator=gen, dtype=dt)
    leaves = [t.requires_grad_() for t in (A, C, offset)]
    t0 = time.perf_counter()
    ssm = LinearGaussianSSM(torch.zeros(L, dtype=dt), 20 * torch.eye(L, dtype=dt), *leaves[:2],
                            0.08 * torch.eye(L, dtype=dt), 0.03 * torch.eye(D, dtype=dt),
                            offset=leaves[2], method=method)
    post = ssm.posterior(a)
    z = post.rsample()
    (post.log_likelihood().sum() + post.log_prob(z).sum()).backward()
    return time.perf_counter() - t0


def _levels(T):
    """Sequential combination levels of the odd-even scan over T elements."""
    from pyro_dvae.distributions.kalman import associative_scan

    count = [0]

    def combine(x, y):
        count[0] += 1
        return (x[0] + y[0],)

    associative_scan(combine, (torch.zeros(T, 1),))
    return count[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[150, 600, 2400])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["sequential", "scan"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-kalman-part", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    pyro.set_rng_seed(0)
    try:
        pyro_dvae.build("kvae", kalman_method=args.methods[0])
        kvae = {f"kvae/{m}": {"kalman_method": m} for m in args.methods}
    except (TypeError, ValueError):
        kvae = {"kvae": {}}
    print(f"batch {args.batch}, F 257, {args.threads} thread(s), seconds per training step "
          f"(median of {args.repeats}, interleaved)")
    for T in args.T:
        x = torch.rand(args.batch, T, 257) + 1e-3
        steps = {"srnn": _trainer("srnn", x)}
        steps.update({k: _trainer("kvae", x, **o) for k, o in kvae.items()})
        times = {k: [] for k in steps}
        for f in steps.values():
            f()  # warm-up
        for _ in range(args.repeats):
            for k, f in steps.items():
                times[k].append(f())
        med = {k: statistics.median(v) for k, v in times.items()}
        line = "  ".join(f"{k} {v:.3f} s" + ("" if k == "srnn" else f" ({v / med['srnn']:.2f}x)")
                         for k, v in med.items())
        print(f"T {T:5d}  {line}", flush=True)
    if args.no_kalman_part or "kvae" in kvae:
        return
    print(f"Kalman part alone (batch {args.batch}, L 16, D 32, float64; forward + backward, "
          f"median of {args.repeats}); sequential steps in brackets")
    gen = torch.Generator().manual_seed(0)
    for T in args.T:
        runs = {m: [] for m in args.methods}
        for _ in range(args.repeats):   # interleaved, as above
            for m in args.methods:
                runs[m].append(_kalman_part(T, args.batch, m, gen))
        res = {m: statistics.median(v) for m, v in runs.items()}
        depth = {"sequential": 2 * T, "scan": 2 * _levels(T)}   # filter + backward pass
        print(f"T {T:5d}  " + "  ".join(f"{m} {v:.3f} s [{depth[m]}]" for m, v in res.items()),
              flush=True)


if __name__ == "__main__":
    main()
