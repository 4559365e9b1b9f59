"""Does ``torch.compile`` of a per-step function pay on CPU?  (issue 14, part 1)

    python benchmarks/compile_step.py [--T 150] [--batch 32] [--repeats 5] [--threads 1]
                                      [--warm-cache]

The two recursions that stay per step in a training step, at the paper's sizes, forward and
backward, eager against ``torch.compile(step, dynamic=False)`` (inductor, the default backend):

- ``srnn guide``: SRNN's smoothing-guide recursion, z_t = loc_t + scale_t eps_t with
  (loc_t, scale_t) = head(e_z([g_t, z_{t-1}])), written as the library's ``nn.stepwise`` and
  ``nn.gaussian_head_step`` run it (the g_t share of the first layer once per sequence), with the
  guide's own modules and weights;
- ``kvae filter``: one predict / square-root update of the Kalman filter (float64, state 16,
  observations whitened, as ``distributions/kalman.py`` runs it on its common path, where every
  Cholesky factorisation succeeds).

Printed per recursion: the first compiled call (forward + backward, which is when the graphs are
compiled; with an empty inductor cache, a fresh temporary directory, unless ``--warm-cache``), the
eager and compiled medians of the following calls, the saving per training step and
the number of steps the compilation takes to pay back.  The whole training step is timed too
(``fit``'s step on fused sites) to put the saving in proportion.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

if "--warm-cache" not in sys.argv:  # before torch: compile from scratch, as a first run does
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO

import pyro_dvae
from pyro_dvae.models.base import fused_sites


def _median_time(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def srnn_guide_recursion(model, guide, x):
    """``run(step)``: the guide's recursion with ``step`` (forward and backward)."""
    with torch.no_grad():
        h = model.context(x, None, None)["h"]
        g = guide.summary(x, h, None)
    g = g.detach().requires_grad_()
    first, rest = guide.combiner[0], torch.nn.Sequential(*list(guide.combiner)[1:])
    d = g.shape[-1]
    head = guide.head
    n = head.loc.out_features

    def step(pre_t, z_prev, eps_t, w_step, w_head, b_head):
        out = rest(torch.addmm(pre_t, z_prev, w_step))
        out = torch.addmm(b_head, out, w_head)
        loc, scale = out[:, :n], torch.exp(0.5 * out[:, n:])
        return loc + scale * eps_t, scale

    eps = torch.randn(x.shape[0], x.shape[1], model.z_dim).unbind(1)

    def run(step_fn):
        pre = F.linear(g, first.weight[:, :d], first.bias).unbind(1)
        w_step = first.weight[:, d:].t()
        w_head = torch.cat([head.loc.weight, head.logvar.weight]).t()
        b_head = torch.cat([head.loc.bias, head.logvar.bias])
        z, loss = x.new_zeros(x.shape[0], model.z_dim), 0.0
        for t in range(x.shape[1]):
            z, scale = step_fn(pre[t], z, eps[t], w_step, w_head, b_head)
            loss = loss + (z ** 2).sum() - scale.log().sum()
        loss.backward()

    return step, run


def kalman_filter_recursion(T, batch, L=16, D=32):
    """``run(step)``: T predict / update steps of the square-root filter (forward and backward)."""
    dt = torch.float64
    g = torch.Generator().manual_seed(0)
    A = (torch.eye(L, dtype=dt) + 0.05 * torch.randn(batch, T, L, L, generator=g, dtype=dt))
    C = 0.3 * torch.randn(batch, T, D, L, generator=g, dtype=dt)
    zeta = torch.randn(batch, T, L, dtype=dt, generator=g)
    Q = 0.08 * torch.eye(L, dtype=dt)
    eye = torch.eye(L, dtype=dt)
    A.requires_grad_()
    C.requires_grad_()

    def mv(m, v):
        return (m @ v.unsqueeze(-1)).squeeze(-1)

    def step(m, root, A_t, info_t, zeta_t):
        m_pred = mv(A_t, m)
        X = A_t @ root
        U, _ = torch.linalg.cholesky_ex(X @ X.mT + Q)
        L_G, _ = torch.linalg.cholesky_ex(eye + U.mT @ info_t @ U)
        Vt = torch.linalg.solve_triangular(L_G, U.mT, upper=False)
        s = mv(Vt, zeta_t - mv(info_t, m_pred))
        ll = 0.5 * (s ** 2).sum() - torch.diagonal(L_G, dim1=-2, dim2=-1).log().sum()
        return m_pred + mv(Vt.mT, s), Vt.mT, ll

    def run(step_fn):
        info = C.mT @ C
        m = torch.zeros(batch, L, dtype=dt)
        root = 4 * eye.expand(batch, L, L)
        As, infos, zetas = A.unbind(1), info.unbind(1), zeta.unbind(1)
        total = 0.0
        for t in range(T):
            m, root, ll = step_fn(m, root, As[t], infos[t], zetas[t])
            total = total + ll
        total.backward()

    return step, run


def training_step(name, x):
    model, guide = pyro_dvae.build(name, x_dim=x.shape[-1])
    opt = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-4)
    elbo = Trace_ELBO()

    def step():
        opt.zero_grad()
        with fused_sites():
            loss = elbo.differentiable_loss(model.model, guide, x, None, None, 10000)
        loss.backward()
        opt.step()

    return model, guide, step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warm-cache", action="store_true",
                    help="use the user's inductor cache (compilations of earlier runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    torch.manual_seed(0)
    x = torch.rand(args.batch, args.T, 257) + 1e-3
    print(f"batch {args.batch}, T {args.T}, {args.threads} thread(s), torch {torch.__version__}; "
          f"medians of {args.repeats}")
    cases = {}
    model, guide, srnn_step = training_step("srnn", x)
    cases["srnn guide"] = (srnn_guide_recursion(model, guide, x), srnn_step)
    _, _, kvae_step = training_step("kvae", x)
    cases["kvae filter"] = (kalman_filter_recursion(args.T, args.batch), kvae_step)
    print("| recursion | whole training step (s) | eager recursion (s) | first compiled call "
          "(s) | compiled recursion (s) | saving per step (s) | steps to pay back |")
    print("|---|---|---|---|---|---|---|")
    for name, ((step, run), train_step) in cases.items():
        train_step()
        whole = _median_time(train_step, args.repeats)
        run(step)
        eager = _median_time(lambda: run(step), args.repeats)
        compiled_step = torch.compile(step, dynamic=False)
        t0 = time.perf_counter()
        run(compiled_step)
        first = time.perf_counter() - t0
        compiled = _median_time(lambda: run(compiled_step), args.repeats)
        saving = eager - compiled
        payback = f"{first / saving:.0f}" if saving > 0 else "never (slower)"
        print(f"| {name} | {whole:.3f} | {eager:.3f} | {first:.1f} | {compiled:.3f} | "
              f"{saving:+.3f} | {payback} |", flush=True)


if __name__ == "__main__":
    main()
