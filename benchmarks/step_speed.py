"""Time one training step (forward, ELBO, backward, Adam) of every registered model.

Paper sizes (13.1, 13.2.2): batch 32, T 150, 257 bins, z 16, hidden 128, one CPU thread, Pyro
validation off (as in training).  For VAE, DKF (DKS guide) and SRNN the same networks are also timed
with a plain-PyTorch loss (no Pyro: the guide's recursion written out, analytic KL plus IS term, as
the reference implementation computes it), interleaved with the Pyro runs, and the ratio
Pyro throughput / plain throughput is printed (target >= 0.9 for SRNN and DKF).

    python benchmarks/step_speed.py [--models srnn dkf] [--repeats 7] [--elbo meanfield]

Prints sequences/second (median over repeats), the ratio, and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import pyro_dvae
from pyro_dvae.nn import shift_right
from pyro_dvae.registry import REGISTRY


def _kl(q_loc, q_scale, p_loc, p_scale):
    return (torch.log(p_scale / q_scale)
            + (q_scale ** 2 + (q_loc - p_loc) ** 2) / (2 * p_scale ** 2) - 0.5).sum((-1, -2))


def _is_term(model, x, z, ctx):
    return model.likelihood.log_prob(x, model.emission(z, ctx, x, None)).sum(-1)


def plain_loss(model, guide, x):
    """Negative VLB per batch without Pyro (analytic KL, reparameterised z), same networks."""
    name = model.name
    if name == "vae":
        loc, scale = guide.head(guide.encoder(x))
        z = loc + scale * torch.randn_like(loc)
        kl = _kl(loc, scale, torch.zeros_like(loc), torch.ones_like(scale))
        return -(_is_term(model, x, z, {}) - kl).sum()
    if name == "dkf":
        x_part = guide.x_summary(x, None, None)[0]
        z_prev, zs, locs, scales = x.new_zeros(x.shape[0], model.z_dim), [], [], []
        for t in range(x.shape[1]):
            loc, scale = guide.head(guide.combiner((guide.z_net(z_prev) + x_part[:, t]) / 2))
            z_prev = loc + scale * torch.randn_like(loc)
            zs.append(z_prev), locs.append(loc), scales.append(scale)
        z, loc, scale = torch.stack(zs, 1), torch.stack(locs, 1), torch.stack(scales, 1)
        p_loc, p_scale = model.transition(shift_right(z))
        return -(_is_term(model, x, z, {}) - _kl(loc, scale, p_loc, p_scale)).sum()
    if name == "srnn":
        ctx = model.context(x, None, None)
        g = guide.summary(x, ctx["h"], None)
        z_prev, zs, locs, scales = x.new_zeros(x.shape[0], model.z_dim), [], [], []
        for t in range(x.shape[1]):
            loc, scale = guide.head(guide.combiner(torch.cat([z_prev, g[:, t]], -1)))
            z_prev = loc + scale * torch.randn_like(loc)
            zs.append(z_prev), locs.append(loc), scales.append(scale)
        z, loc, scale = torch.stack(zs, 1), torch.stack(locs, 1), torch.stack(scales, 1)
        p_loc, p_scale = model.prior(z, ctx, x, None)
        return -(_is_term(model, x, z, ctx) - _kl(loc, scale, p_loc, p_scale)).sum()
    if name == "vrnn":
        ctx = model.context(x, None, None)
        fx, x_in = ctx["fx"], ctx["x_in"]
        fz_prev, state, zs, hs, locs, scales = x.new_zeros(x.shape[0], 64), None, [], [], [], []
        for t in range(x.shape[1]):
            h, state = model.h_rnn.step(torch.cat([x_in[:, t], fz_prev], -1), state)
            loc, scale = guide.head(guide.encoder(torch.cat([fx[:, t], h], -1)))
            z = loc + scale * torch.randn_like(loc)
            fz_prev = model.z_features(z)
            zs.append(z), hs.append(h), locs.append(loc), scales.append(scale)
        z, h, loc, scale = (torch.stack(v, 1) for v in (zs, hs, locs, scales))
        p_loc, p_scale = model.prior_head(model.prior_net(h))
        params = model.x_out(model.decoder(torch.cat([model.z_features(z), h], -1)))
        return -(model.likelihood.log_prob(x, params).sum(-1)
                 - _kl(loc, scale, p_loc, p_scale)).sum()
    return None


def bench(name, x, elbo, repeats):
    """Sequences/second of the Pyro step and (None if not written) of the plain-PyTorch step."""
    model, guide = pyro_dvae.build(name)
    opt = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-4)
    has_plain = plain_loss(model, guide, x[:2]) is not None

    def step(loss_fn):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        return time.perf_counter() - t0

    def pyro_loss():
        return elbo.differentiable_loss(model.model, guide, x, None, None, 10000)

    def torch_loss():
        return plain_loss(model, guide, x)

    step(pyro_loss)  # warm-up
    if has_plain:
        step(torch_loss)
    tp, tb = [], []
    for _ in range(repeats):  # interleaved, so machine load hits both alike
        tp.append(step(pyro_loss))
        if has_plain:
            tb.append(step(torch_loss))
    batch = x.shape[0]
    return batch / statistics.median(tp), (batch / statistics.median(tb) if has_plain else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(REGISTRY))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--T", type=int, default=150)
    ap.add_argument("--elbo", choices=["trace", "meanfield"], default="meanfield")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    elbo = (TraceMeanField_ELBO if args.elbo == "meanfield" else Trace_ELBO)()
    x = torch.rand(args.batch, args.T, 257) + 1e-3
    print(f"batch {args.batch}, T {args.T}, F 257, z 16, {args.threads} thread(s), "
          f"ELBO {args.elbo}, median of {args.repeats}")
    print(f"{'model':16s} {'pyro seq/s':>11s} {'plain seq/s':>12s} {'ratio':>6s}")
    for name in args.models:
        sp, sb = bench(name, x, elbo, args.repeats)
        if sb is None:
            print(f"{name:16s} {sp:11.1f} {'-':>12s} {'-':>6s}")
        else:
            print(f"{name:16s} {sp:11.1f} {sb:12.1f} {sp / sb:6.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
