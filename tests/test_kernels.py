"""pyro_dvae.kernels against the stock PyTorch ops, and pyro_dvae.allocator."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pyro_dvae import kernels
from pyro_dvae.distributions import get_likelihood
from pyro_dvae.nn import OutputLinear


def _stock_is(x, p):
    return -(p + x * torch.exp(-p)).sum(-1)


@pytest.mark.parametrize("out", [257, 514])
def test_padded_output_layer_is_the_linear_layer(out):
    torch.manual_seed(0)
    layer = OutputLinear(48, out).double()
    h = torch.randn(32, 150, 48, dtype=torch.double, requires_grad=True)
    y = layer(h)
    assert y.shape == (32, 150, out)
    assert y.stride(-2) == out + (-out % 16)   # computed on the padded weight (a view)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [h, layer.weight, layer.bias])
    ref = F.linear(h, layer.weight, layer.bias)
    ref_grads = torch.autograd.grad((ref * w).sum(), [h, layer.weight, layer.bias])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_output_layer_runs_stock_where_padding_does_not_apply():
    assert [kernels.padded_width(n) for n in (257, 258, 513, 514, 256, 260, 88, 129, 17)] == [
        272, 272, 528, 528, 256, 260, 88, 129, 17]
    layer = OutputLinear(16, 257)
    for h in (torch.randn(2, 10, 16), torch.randn(4000, 16)):   # few rows
        assert layer(h).is_contiguous()
    h = torch.randn(32, 150, 16)
    with kernels.stock():
        assert layer(h).is_contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(h).is_contiguous()
    assert OutputLinear(16, 88)(h).is_contiguous()
    assert layer(h).stride(-2) == 272
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}
    assert layer.weight.shape == (257, 16)   # checkpoints keep the stock shapes


def test_itakura_saito_kernel_matches_autograd_and_gradcheck():
    torch.manual_seed(0)
    x = (torch.rand(3, 5, 7, dtype=torch.double) + 1e-3).requires_grad_()
    p = torch.randn(3, 5, 7, dtype=torch.double, requires_grad=True)
    lp = kernels.itakura_saito_log_prob(x, p)
    assert lp.grad_fn is not None and "ItakuraSaito" in type(lp.grad_fn).__name__
    torch.testing.assert_close(lp, _stock_is(x, p), rtol=1e-12, atol=1e-12)
    w = torch.randn(3, 5, dtype=torch.double)
    g = torch.autograd.grad((lp * w).sum(), [x, p])
    r = torch.autograd.grad((_stock_is(x, p) * w).sum(), [x, p])
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(kernels.itakura_saito_log_prob, (x, p))
    assert torch.autograd.gradgradcheck(kernels.itakura_saito_log_prob, (x, p))


def test_itakura_saito_likelihood_uses_the_kernel_and_falls_back():
    lik = get_likelihood("is")
    x, p = torch.rand(4, 6, 257) + 1e-3, torch.randn(4, 6, 257, requires_grad=True)
    assert "ItakuraSaito" in type(lik.log_prob(x, p).grad_fn).__name__
    with kernels.stock():
        stock = lik.log_prob(x, p)
    assert "ItakuraSaito" not in type(stock.grad_fn).__name__
    torch.testing.assert_close(lik.log_prob(x, p), stock)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # float32 inputs: kernel, in float32
        under = lik.log_prob(x, p)
    assert "ItakuraSaito" in type(under.grad_fn).__name__ and under.dtype == torch.float32
    torch.testing.assert_close(under, stock)
    # broadcasting (one frame against many parameters) takes the stock expression
    torch.testing.assert_close(lik.log_prob(x[:1], p), _stock_is(x[:1], p))


_FAULTS = """
import resource, sys, torch
from pyro_dvae.allocator import retain_freed_memory, retained
if sys.argv[1] == "retain":
    assert retain_freed_memory() and retained()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():   # a training step's pattern: forty 2 MiB buffers alive at once, then all freed
    blocks = [torch.ones(1 << 19) for _ in range(40)]
    del blocks
step()
f0 = faults()
for _ in range(5):
    step()
print(faults() - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_retain_freed_memory_stops_the_page_faults_of_reallocation():
    def run(mode, env=None):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                             text=True, check=True, env=env)
        return int(out.stdout.split()[-1])

    default, retained = run("default"), run("retain")
    assert default > 10_000               # steps fault memory in afresh (4 KiB pages)
    assert retained < default / 5
    import os
    env = dict(os.environ, PYRO_DVAE_MALLOC="default")
    out = subprocess.run([sys.executable, "-c", "from pyro_dvae.allocator import "
                          "retain_freed_memory as r; print(r())"], capture_output=True,
                         text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
