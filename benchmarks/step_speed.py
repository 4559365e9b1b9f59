"""Time one training step (forward, ELBO, backward, Adam) of every registered model.

Paper sizes (13.1, 13.2.2): batch 32, T 150, 257 bins, z 16, hidden 128, one CPU thread.  The
pyro-dvae step is what ``pyro-dvae fit`` runs: the ELBO on fused sites
(:func:`pyro_dvae.models.base.fused_sites`) with Pyro validation off, in ``--precision`` (fp32, or
bf16 mixed precision, :mod:`pyro_dvae.precision`), with pyro-dvae's CPU kernels
(:mod:`pyro_dvae.kernels`).  The baseline is a plain-PyTorch loss of the same networks and weights
(no Pyro, always fp32), written the way the authors' reference implementation computes it: the
guide's recursion step by step with the networks as modules (one-frame LSTM calls,
concatenations), the prior and decoder vectorised over time, analytic KL plus the likelihood term,
with the stock ``nn.Linear`` and autograd likelihood (inside :func:`pyro_dvae.kernels.stock`).  It
stands for the reference, which measured within 1.00-1.09x of it on SRNN on this machine (issue 14).

Two measurements per model, each the median of ``--repeats`` rounds that alternate the two kinds
of step, so machine load hits both alike; the ratio is pyro seq/s / baseline seq/s:
- *one process*: both kinds in this process, with the default allocator;
- *as run*: each kind in a process of its own, run as it is run in practice: pyro-dvae as
  ``pyro-dvae fit`` runs it (malloc keeping freed memory, :mod:`pyro_dvae.allocator`), the
  baseline as the reference runs (the default allocator, which maps the step's large buffers
  afresh every step).

    python benchmarks/step_speed.py [--models srnn dkf] [--precision fp32|bf16] [--T 150 600]
        [--repeats 7] [--elbo meanfield|trace] [--device cpu|cuda|auto] [--no-processes]
        [--json out.json]

Peak memory: on the CPU the growth of the RSS of a fresh process during two steps of one kind
(sampled every millisecond; peak minus the RSS with torch, pyro, model and batch loaded; measured
after the timing, one process per model and kind, default allocator); on CUDA
``torch.cuda.max_memory_allocated`` of a step (and no as-run measurement: CUDA caches its memory).
KVAE's baseline is the reference's own computation of a step (:func:`_kvae_reference_pattern`:
another objective, same networks), timed only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO  # noqa: E402

import pyro_dvae  # noqa: E402
from pyro_dvae import kernels  # noqa: E402
from pyro_dvae.allocator import retain_freed_memory  # noqa: E402
from pyro_dvae.models.base import fused_sites  # noqa: E402
from pyro_dvae.nn import shift_right  # noqa: E402
from pyro_dvae.precision import autocast, resolve_device  # noqa: E402
from pyro_dvae.registry import REGISTRY  # noqa: E402
from speech_table import cpu_model  # noqa: E402

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


# ---- the plain-PyTorch baselines ---------------------------------------------------------------
def _kl(q_loc, q_scale, p_loc, p_scale):
    return (torch.log(p_scale / q_scale)
            + (q_scale ** 2 + (q_loc - p_loc) ** 2) / (2 * p_scale ** 2) - 0.5).sum((-1, -2))


def _std_kl(loc, scale):
    return _kl(loc, scale, torch.zeros_like(loc), torch.ones_like(scale))


def _draw(loc, scale):
    return loc + scale * torch.randn_like(loc)


def _neg_vlb(model, x, params, kl):
    return -(model.likelihood.log_prob(x, params).sum(-1) - kl).sum()


def _chain(x, z_dim, step):
    """The guide recursion step by step: ``step(t, z_prev) -> (loc, scale)``; stacked z, loc,
    scale."""
    z_prev, zs, locs, scales = x.new_zeros(x.shape[0], z_dim), [], [], []
    for t in range(x.shape[1]):
        loc, scale = step(t, z_prev)
        z_prev = _draw(loc, scale)
        zs.append(z_prev), locs.append(loc), scales.append(scale)
    return torch.stack(zs, 1), torch.stack(locs, 1), torch.stack(scales, 1)


def _recurrent_guide(guide, x):
    """RVAE's guides (and STORN's consistent one): z-LSTM stepped as a module, e_z on a concat."""
    gx, state = guide.x_summary(x, None, None), None

    def step(t, z_prev):
        nonlocal state
        gz, state = guide.z_rnn.step(guide.z_features(z_prev), state)
        return guide.head(guide.combiner(torch.cat([gx[:, t], gz], -1)))

    return _chain(x, guide.z_dim, step)


def plain_loss(model, guide, x):
    """Negative VLB of the batch without Pyro (same networks), or None for a model without one."""
    name = model.name
    if name == "vae":
        loc, scale = guide.head(guide.encoder(x))
        z = _draw(loc, scale)
        return _neg_vlb(model, x, model.emission(z, {}, x, None), _std_kl(loc, scale))
    if name == "dkf":
        x_part = guide.x_summary(x, None, None)[0]
        z, loc, scale = _chain(x, model.z_dim, lambda t, z_prev: guide.head(
            guide.combiner((guide.z_net(z_prev) + x_part[:, t]) / 2)))
        p_loc, p_scale = model.transition(shift_right(z))
        return _neg_vlb(model, x, model.emission(z, {}, x, None), _kl(loc, scale, p_loc, p_scale))
    if name == "srnn":
        ctx = model.context(x, None, None)
        g = guide.summary(x, ctx["h"], None)
        z, loc, scale = _chain(x, model.z_dim, lambda t, z_prev: guide.head(
            guide.combiner(torch.cat([g[:, t], z_prev], -1))))
        p_loc, p_scale = model.prior(z, ctx, x, None)
        return _neg_vlb(model, x, model.emission(z, ctx, x, None),
                        _kl(loc, scale, p_loc, p_scale))
    if name == "storn" and guide.name == "filtering":
        loc, scale = guide.head(guide.combiner(guide.g_rnn(guide.x_features(x))))
        z = _draw(loc, scale)
        return _neg_vlb(model, x, model.emission(z, {}, x, None), _std_kl(loc, scale))
    if name == "vrnn" and guide.name == "filtering":
        fx = model.x_features(x)
        state, hs = None, []

        def step(t, z_prev):
            nonlocal state
            if t == 0:
                h = x.new_zeros(x.shape[0], model.hidden)
            else:
                h, state = model.h_rnn.step(torch.cat([fx[:, t - 1], model.z_features(z_prev)],
                                                      -1), state)
            hs.append(h)
            return guide.head(guide.encoder(torch.cat([fx[:, t], h], -1)))

        z, loc, scale = _chain(x, model.z_dim, step)
        h = torch.stack(hs, 1)
        p_loc, p_scale = model.prior_head(model.prior_net(h))
        params = model.x_out(model.decoder(torch.cat([model.z_features(z), h], -1)))
        return _neg_vlb(model, x, params, _kl(loc, scale, p_loc, p_scale))
    if name in ("rvae-causal", "rvae-noncausal"):
        z, loc, scale = _recurrent_guide(guide, x)
        return _neg_vlb(model, x, model.emission(z, {}, x, None), _std_kl(loc, scale))
    if name == "dsae" and guide.name == "full":
        H = guide.hidden
        feat = guide.x_features(x)
        g = guide.v_rnn(feat)
        v_loc, v_scale = guide.v_head(guide.v_net(torch.cat([g[:, -1, :H], g[:, 0, H:]], -1)))
        v = _draw(v_loc, v_scale)
        loc, scale = guide.z_params(feat, v, None)
        z = _draw(loc, scale)
        p_loc, p_scale = model.prior(z, {}, x, None)
        kl = _kl(loc, scale, p_loc, p_scale) + _std_kl(v_loc[:, None], v_scale[:, None])
        return _neg_vlb(model, x, model.emission(z, {"v": v}, x, None), kl)
    if name == "kvae":
        return _kvae_reference_pattern(model, guide, x)
    return None


def _kvae_reference_pattern(model, guide, x):
    """KVAE as the authors' reference computes a training step (its own objective, not pyro-dvae's
    loss; the step is timed, not compared): q(a | x), the alpha LSTM and the mixed A_t, B_t, C_t
    as here, then in float32 a filter loop with the explicit inverse of S_t (a_dim x a_dim) and
    the Joseph-form update, a smoother loop with the inverse of P_{t+1|t}, z drawn from the
    smoothed marginals without reparameterisation, and the densities of z under the transition,
    emission and smoothed marginals; x is decoded from C_t E[z_t | a_{1:T}]."""
    from torch.distributions import MultivariateNormal

    loc, scale = guide.head(guide.encoder(x))
    a = _draw(loc, scale)
    a_prev = shift_right(a)
    alpha = torch.softmax(model.alpha_out(model.alpha_rnn(a_prev)), -1)
    A, B, C = model._mix(alpha)
    Q, R = model.Q, model.R
    batch, T, L = x.shape[0], x.shape[1], model.z_dim
    eye = torch.eye(L)
    mu, Sigma = x.new_zeros(batch, L, 1), model.init_cov.expand(batch, L, L)
    mu_p, S_p, mu_f, S_f = [], [], [], []
    for t in range(T):
        A_t, C_t = A[:, t], C[:, t]
        if t == 0:
            m_pred, P_pred = mu, Sigma
        else:
            m_pred = A_t @ mu + B[:, t] @ a_prev[:, t].unsqueeze(-1)
            P_pred = A_t @ Sigma @ A_t.mT + Q
        res = a[:, t].unsqueeze(-1) - C_t @ m_pred
        S_inv = (C_t @ P_pred @ C_t.mT + R).inverse()
        K = P_pred @ C_t.mT @ S_inv
        mu = m_pred + K @ res
        IKC = eye - K @ C_t
        Sigma = IKC @ P_pred @ IKC.mT + K @ R @ K.mT
        mu_p.append(m_pred), S_p.append(P_pred), mu_f.append(mu), S_f.append(Sigma)
    mu_s, S_s = [mu_f[-1]], [S_f[-1]]
    for t in range(T - 2, -1, -1):
        J = S_f[t] @ A[:, t + 1].mT @ S_p[t + 1].inverse()
        mu_s.append(mu_f[t] + J @ (mu_s[-1] - mu_p[t + 1]))
        S_s.append(S_f[t] + J @ (S_s[-1] - S_p[t + 1]) @ J.mT)
    mu_s = torch.stack(mu_s[::-1], 1).squeeze(-1)
    S_s = torch.stack(S_s[::-1], 1)
    smooth = MultivariateNormal(mu_s, S_s)
    z = smooth.sample()
    trans = MultivariateNormal(z[:, 1:], Q).log_prob(
        (A[:, 1:] @ z[:, :-1].unsqueeze(-1) + B[:, 1:] @ a_prev[:, 1:].unsqueeze(-1)).squeeze(-1))
    first = MultivariateNormal(x.new_zeros(L), model.init_cov).log_prob(z[:, 0])
    emission = MultivariateNormal((C @ z.unsqueeze(-1)).squeeze(-1), R).log_prob(a)
    log_q_a = torch.distributions.Normal(loc, scale).log_prob(a).sum(-1)
    params = model.decode((C @ mu_s.unsqueeze(-1)).squeeze(-1))
    return -((model.likelihood.log_prob(x, params) - log_q_a + emission
              - smooth.log_prob(z)).sum() + trans.sum() + first.sum())


# ---- timing ------------------------------------------------------------------------------------
def _build(name, device):
    model, guide = pyro_dvae.build(name)
    return model.to(device), guide.to(device)


def _step_fns(model, guide, x, elbo, precision):
    device = x.device

    def pyro_loss():
        with fused_sites(), autocast(precision, device):
            return elbo.differentiable_loss(model.model, guide, x, None, None, 10000)

    def plain():
        with kernels.stock():
            return plain_loss(model, guide, x)

    return pyro_loss, plain


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stepper(name, x, elbo, precision):
    """``step(kind) -> seconds`` of one training step of ``kind`` (``pyro`` or ``plain``), the
    kinds available for ``name``, and the peak CUDA memory of the last step of each kind."""
    model, guide = _build(name, x.device)
    opt = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-4)
    pyro_loss, plain = _step_fns(model, guide, x, elbo, precision)
    kinds = {"pyro": pyro_loss}
    with kernels.stock():
        if plain_loss(model, guide, x[:2]) is not None:
            kinds["plain"] = plain
    cuda = x.device.type == "cuda"
    peaks = {}

    def step(k):
        if cuda:
            torch.cuda.reset_peak_memory_stats(x.device)
        _sync(x.device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        kinds[k]().backward()
        opt.step()
        _sync(x.device)
        if cuda:
            peaks[k] = torch.cuda.max_memory_allocated(x.device)
        return time.perf_counter() - t0

    return step, list(kinds), peaks


def _interleaved(step, kinds, repeats):
    """Median seconds of ``step(kind)`` per kind over ``repeats`` rounds that alternate the kinds
    (after one warm-up step each)."""
    times = {k: [] for k in kinds}
    for k in kinds:
        step(k)
    for _ in range(repeats):
        for k in kinds:
            times[k].append(step(k))
    return {k: statistics.median(v) for k, v in times.items()}


def bench(name, x, elbo, repeats, precision):
    """Median seconds per step of the pyro-dvae step and of the baseline (None if it has none),
    interleaved in this process; on CUDA also the peak memory of each (bytes)."""
    step, kinds, peaks = _stepper(name, x, elbo, precision)
    return _interleaved(step, kinds, repeats), peaks


def _self_cmd(args, role, name, kind, T):
    """This script as a ``--probe`` or ``--worker`` process for ``name`` and ``kind``."""
    return [sys.executable, __file__, role, name, kind, "--T", str(T), "--batch",
            str(args.batch), "--elbo", args.elbo, "--precision", args.precision, "--threads",
            str(args.threads), "--device", args.device]


def worker(name, kind, T, batch, elbo, precision, device):
    """One kind's steps in a process of its own, run as it is run in practice: pyro-dvae as
    ``pyro-dvae fit`` runs it (malloc keeping freed memory, :mod:`pyro_dvae.allocator`), the
    baseline as the reference runs (the default allocator).  Reads a line per step from stdin
    and answers with its seconds."""
    if kind == "pyro":
        retain_freed_memory()
    torch.manual_seed(0)
    x = torch.rand(batch, T, 257, device=device) + 1e-3
    step, kinds, _ = _stepper(name, x, ELBOS[elbo](), precision)
    if kind not in kinds:
        raise SystemExit(f"{name} has no {kind} step")
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(step(kind), flush=True)


def bench_processes(args, name, T, repeats):
    """Median seconds per step of pyro-dvae and of the baseline, each in its own worker process
    (:func:`worker`), interleaved round by round."""
    procs = {kind: subprocess.Popen(_self_cmd(args, "--worker", name, kind, T),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for kind in ("pyro", "plain")}
    try:
        def step(kind):
            p = procs[kind]
            p.stdin.write("step\n")
            p.stdin.flush()
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"the {kind} worker for {name} stopped")
            return float(line)

        return _interleaved(step, list(procs), repeats)
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def memory_probe(name, kind, T, batch, elbo, precision, device) -> float:
    """Peak RSS growth (MB) of this fresh process during two steps of ``kind`` (``pyro`` or
    ``plain``), sampled every millisecond by a thread: the peak minus the RSS just before the
    steps (torch, pyro, model, optimiser and batch loaded, the allocator's free memory returned to
    the system with ``malloc_trim``)."""
    import ctypes
    import threading

    x = torch.rand(batch, T, 257, device=device) + 1e-3
    model, guide = _build(name, x.device)
    opt = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-4)
    fn = dict(zip(("pyro", "plain"), _step_fns(model, guide, x, ELBOS[elbo](), precision)))[kind]
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _rss_mb()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        fn().backward()
        opt.step()
    done.set()
    sampler.join()
    return max(peak[0], _rss_mb()) - before


def _probe(args, name, kind, T):
    out = subprocess.run(_self_cmd(args, "--probe", name, kind, T), capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(REGISTRY))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--T", type=int, nargs="+", default=[150])
    ap.add_argument("--elbo", choices=list(ELBOS), default="meanfield")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--no-processes", action="store_true",
                    help="skip the as-run measurement (each kind in its own process)")
    ap.add_argument("--probe", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    device = resolve_device(args.device)
    if args.probe:
        print(memory_probe(args.probe[0], args.probe[1], args.T[0], args.batch, args.elbo,
                           args.precision, device))
        return
    if args.worker:
        worker(args.worker[0], args.worker[1], args.T[0], args.batch, args.elbo,
               args.precision, device)
        return
    elbo = ELBOS[args.elbo]()
    print(f"batch {args.batch}, F 257, z 16, {args.threads} thread(s), device {device}, ELBO "
          f"{args.elbo}, pyro-dvae in {args.precision} (baseline fp32), median of "
          f"{args.repeats} interleaved rounds; {cpu_model()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, pyro {pyro.__version__}")
    rows = []
    for T in args.T:
        x = torch.rand(args.batch, T, 257, device=device) + 1e-3
        for name in args.models:
            med, peaks = bench(name, x, elbo, args.repeats, args.precision)
            row = {"model": name, "guide": REGISTRY[name].default_guide, "T": T,
                   "pyro_seq_s": args.batch / med["pyro"],
                   "plain_seq_s": args.batch / med["plain"] if "plain" in med else None}
            row["ratio"] = (row["pyro_seq_s"] / row["plain_seq_s"]) if row["plain_seq_s"] else None
            if device.type == "cuda":
                row.update({f"{k}_peak_mb": v / 2 ** 20 for k, v in peaks.items()})
            elif row["plain_seq_s"] and not args.no_processes:
                run = bench_processes(args, name, T, args.repeats)
                row.update({"pyro_run_seq_s": args.batch / run["pyro"],
                            "plain_run_seq_s": args.batch / run["plain"],
                            "ratio_run": run["plain"] / run["pyro"]})
            rows.append(row)
            print(f"  measured {name} T={T}", file=sys.stderr, flush=True)
    if device.type == "cpu" and not args.no_memory:
        for row in rows:
            for kind in ("pyro", "plain"):
                if kind == "pyro" or row["plain_seq_s"] is not None:
                    row[f"{kind}_peak_mb"] = _probe(args, row["model"], kind, row["T"])
    mem = "peak MB" if device.type == "cuda" else "step RSS MB"
    print(f"\n| model (guide) | T | pyro-dvae seq/s | baseline seq/s | ratio | as run: "
          f"pyro-dvae seq/s | baseline seq/s | ratio | pyro-dvae {mem} | baseline {mem} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        print(f"| {r['model']} ({r['guide']}) | {r['T']} | {r['pyro_seq_s']:.1f} | "
              f"{f(r['plain_seq_s'], '.1f')} | {f(r['ratio'], '.2f')} | "
              f"{f(r.get('pyro_run_seq_s'), '.1f')} | {f(r.get('plain_run_seq_s'), '.1f')} | "
              f"{f(r.get('ratio_run'), '.2f')} | "
              f"{f(r.get('pyro_peak_mb'), '.0f')} | {f(r.get('plain_peak_mb'), '.0f')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
