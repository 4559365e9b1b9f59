"""The importance-weighted bound (pyro_dvae.nll) on every registered pair, a user's DVAE, padded
data, bad input, and ``pyro-dvae evaluate --nll``.

The checks against an exact log p(x) (dense linear algebra) are in tests/models/test_elbo_exact.py.
"""

import json
import math

import pyro
import pytest
import torch
from click.testing import CliRunner
from pyro.infer import Trace_ELBO

import pyro_dvae
from pyro_dvae import DVAE, Guide, evaluate_nll
from pyro_dvae.cli import cli
from pyro_dvae.distributions import LIKELIHOODS
from pyro_dvae.nn import GaussianHead, shift_right
from pyro_dvae.registry import REGISTRY

PAIRS = [(name, g) for name, entry in REGISTRY.items() for g in entry.guides]
IDS = [f"{n}-{g}" for n, g in PAIRS]
B, T, F, Z = 3, 6, 10, 2


def _padded():
    x = torch.rand(B, T, F) + 0.05
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 5:] = False
    return x, mask


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@pytest.mark.parametrize("name,guide_name", PAIRS, ids=IDS)
def test_one_particle_is_the_trace_elbo_sample(name, guide_name, likelihood):
    """L_1 is log p(x, z) - log q(z | x) of one guide draw: with the same random numbers, exactly
    the negative Trace_ELBO loss, summed over the batch (every pair, every likelihood)."""
    model, guide = pyro_dvae.build(name, guide=guide_name, x_dim=F, z_dim=Z,
                                   likelihood=likelihood)
    x = torch.rand(B, T, F) + 0.05
    if likelihood == "bernoulli":
        x = (x > 0.5).float()
    result = evaluate_nll(model, guide, x, K=1, seed=7)
    torch.manual_seed(7)
    model.eval(), guide.eval()
    with torch.no_grad():
        elbo = -Trace_ELBO().loss(model.model, guide, x)
    assert result.total == pytest.approx(elbo, rel=1e-6, abs=1e-4)
    assert result.num_frames == B * T and result.frames.tolist() == [T] * B


@pytest.mark.parametrize("name,guide_name", PAIRS, ids=IDS)
def test_every_pair_on_padded_sequences(name, guide_name):
    model, guide = pyro_dvae.build(name, guide=guide_name, x_dim=F, z_dim=Z)
    x, mask = _padded()
    model.train(), guide.train()
    rng = torch.get_rng_state()
    result = evaluate_nll(model, guide, x, K=4, mask=mask, chunk_frames=2 * T)
    assert torch.equal(torch.get_rng_state(), rng)  # a stream of its own
    assert model.training and guide.training        # train mode restored
    assert result.frames.tolist() == [4, 6, 5] and result.num_frames == 15
    for v in (result.log_px, result.std_error, result.elbo, result.ess):
        assert v.shape == (B,) and torch.isfinite(v).all()
    assert (result.log_px >= result.elbo - 1e-9).all()      # log mean exp >= mean log
    assert ((result.ess >= 1 - 1e-9) & (result.ess <= 4 + 1e-9)).all()
    assert result.per_step == pytest.approx(result.log_px.sum().item() / 15)
    # masked instead of cut: what the padded frames hold does not matter
    x2 = x.clone()
    x2[~mask] = 123.0
    a, b = (evaluate_nll(model, guide, data, K=3, mask=mask, by_length=False, seed=1)
            for data in (x, x2))
    assert torch.allclose(a.log_px, b.log_px, rtol=1e-5, atol=1e-4)
    assert a.frames.tolist() == [4, 6, 5]


def test_by_length_equals_evaluating_each_sequence_alone():
    """Cutting the padding off is the same as passing the whole sequences one by one."""
    model, guide = pyro_dvae.build("vrnn", x_dim=F, z_dim=Z)
    x, mask = _padded()
    padded = evaluate_nll(model, guide, x, K=5, mask=mask, seed=3)
    whole = [x[i, : int(mask[i].sum())] for i in range(B)]
    listed = evaluate_nll(model, guide, whole, K=5, seed=3)
    assert torch.allclose(padded.log_px, listed.log_px)
    alone = torch.cat([evaluate_nll(model, guide, [s], K=5, seed=3).log_px for s in whole])
    assert alone.shape == (B,) and torch.isfinite(alone).all()


def test_bound_does_not_decrease_with_K_on_a_registered_model():
    model, guide = pyro_dvae.build("dkf", x_dim=F, z_dim=Z)
    x = (torch.rand(1, T, F) + 0.05).repeat(100, 1, 1)
    means, ses = [], []
    for K in (1, 30):
        est = evaluate_nll(model, guide, x, K=K, seed=K).log_px
        means.append(est.mean().item())
        ses.append(est.std().item() / math.sqrt(len(est)))
    assert means[1] > means[0] + 3 * math.hypot(*ses)  # untrained guide: a clear gain


class MyDKF(DVAE):
    """p(z_t | z_{t-1}) p(x_t | z_t): a user's DVAE (as in the README)."""

    name = "my-dkf"

    def __init__(self, x_dim=F, z_dim=Z):
        super().__init__(x_dim, z_dim, likelihood="gaussian")
        self.transition = GaussianHead(z_dim, z_dim)
        self.decoder = torch.nn.Linear(z_dim, self.num_params)

    def prior(self, z, ctx, x, u):
        return self.transition(shift_right(z))

    def emission(self, z, ctx, x, u):
        return self.decoder(z)


class FilteringGuide(Guide):
    """Parameterises q(z_t | z_{t-1}, x_t)."""

    name = "filtering"

    def __init__(self, model):
        super().__init__(model)
        self.net = GaussianHead(model.z_dim + model.x_dim, model.z_dim)

    def guide(self, x, u=None, mask=None):
        self.sample_chain("z", x, mask,
                          lambda t, z_prev: self.net(torch.cat([z_prev, x[:, t]], -1)))


def test_a_users_dvae_and_its_bound_method():
    model = MyDKF()
    guide = FilteringGuide(model)
    x = torch.randn(B, T, F)
    for fn in (model, model.model):  # the DVAE or its Pyro model
        result = evaluate_nll(fn, guide, x, K=1, seed=2)
        torch.manual_seed(2)
        with torch.no_grad():
            assert result.total == pytest.approx(-Trace_ELBO().loss(model.model, guide, x),
                                                 rel=1e-6)
    assert "NLL per time step" in str(evaluate_nll(model, guide, x, K=8))


def test_summary_and_dict_are_json_ready():
    model, guide = pyro_dvae.build("srnn", x_dim=F, z_dim=Z)
    x, mask = _padded()
    r = evaluate_nll(model, guide, x, K=6, mask=mask)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["K"] == 6 and d["num_sequences"] == 3 and d["num_frames"] == 15
    assert d["nll_per_step"] == pytest.approx(-r.per_step)
    assert d["std_error_per_step"] == pytest.approx(
        math.sqrt(sum(s ** 2 for s in d["per_sequence"]["std_error"])) / 15)
    assert d["per_sequence"]["frames"] == [4, 6, 5]
    one = evaluate_nll(model, guide, x, K=1, mask=mask).summary()
    assert one["std_error_per_step"] is None  # K = 1: no standard error


def test_bad_input_is_refused():
    model, guide = pyro_dvae.build("vae", x_dim=F, z_dim=Z)
    x, mask = _padded()
    with pytest.raises(ValueError, match="K must be >= 1"):
        evaluate_nll(model, guide, x, K=0)
    with pytest.raises(ValueError, match="empty"):
        evaluate_nll(model, guide, [], K=2)
    with pytest.raises(ValueError, match=r"x must be \(N, T, F\)"):
        evaluate_nll(model, guide, x[0], K=2)
    with pytest.raises(ValueError, match="mask must be"):
        evaluate_nll(model, guide, x, K=2, mask=mask[:, :3])
    holes = mask.clone()
    holes[1, 2] = False
    with pytest.raises(ValueError, match="not a prefix"):
        evaluate_nll(model, guide, x, K=2, mask=holes)
    assert evaluate_nll(model, guide, x, K=2, mask=holes, by_length=False).num_frames == 14
    bad = x.clone()
    bad[0, 5, 0] = float("nan")  # in the padding: ignored
    assert math.isfinite(evaluate_nll(model, guide, bad, K=2, mask=mask).total)
    bad[1, 0, 0] = float("nan")  # in a real frame: refused
    with pytest.raises(ValueError, match="the data holds 1 NaN or infinite values"):
        evaluate_nll(model, guide, bad, K=2, mask=mask)
    binary, binary_guide = pyro_dvae.build("vae", x_dim=F, z_dim=Z, likelihood="bernoulli")
    with pytest.raises(ValueError, match="evaluate_nll: the data .*bernoulli"):
        evaluate_nll(binary, binary_guide, x, K=2)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="sequence 1 has no real frame"):
        evaluate_nll(model, guide, x, K=2, mask=empty)


def test_sites_outside_the_sequence_plate_are_refused():
    def model(x, u=None, mask=None):
        pyro.sample("g", pyro.distributions.Normal(0.0, 1.0))
        with pyro.plate("sequences", x.shape[0]):
            pyro.sample("x", pyro.distributions.Normal(0.0, 1.0).expand([F]).to_event(1),
                        obs=x[:, 0])

    def guide(x, u=None, mask=None):
        pyro.sample("g", pyro.distributions.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 'g' is outside the plate 'sequences'"):
        evaluate_nll(model, guide, torch.randn(B, T, F), K=2)


def test_a_plain_pyro_model_with_a_known_marginal():
    """x ~ N(g, 1) with g ~ N(0, 1) per sequence and q(g) = the prior: E[L_K] -> log N(x; 0, 2),
    here checked loosely; the bound is below it and L_1's mean is the ELBO."""
    def model(x, u=None, mask=None):
        with pyro.plate("sequences", x.shape[0]):
            g = pyro.sample("g", pyro.distributions.Normal(0.0, 1.0))
            pyro.sample("x", pyro.distributions.Normal(g, 1.0), obs=x[:, 0, 0])

    def guide(x, u=None, mask=None):
        with pyro.plate("sequences", x.shape[0]):
            pyro.sample("g", pyro.distributions.Normal(0.0, 1.0))

    x = torch.full((400, 1, 1), 0.7)
    exact = torch.distributions.Normal(0.0, math.sqrt(2.0)).log_prob(torch.tensor(0.7)).item()
    est = evaluate_nll(model, guide, x, K=200).log_px
    assert abs(est.mean().item() - exact) < 4 * est.std().item() / 20 + 0.01


# ---- CLI -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A DKF run (one epoch on the built-in corpus, z of dimension 2), as `fit` writes it."""
    out = tmp_path_factory.mktemp("nll") / "run"
    result = CliRunner().invoke(cli, [
        "fit", "--model", "dkf", "--epochs", "1", "--seq-len", "20", "--batch-size", "64",
        "-o", "z_dim=2", "--out", str(out), "-q", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return out


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_evaluate_nll_writes_the_bound(run_dir, tmp_path):
    out = tmp_path / "nll.json"
    result = invoke("evaluate", "--checkpoint", run_dir, "--nll", "--particles", 3, "--out", out,
                    "--no-progress", "--split", "val")
    assert result.exit_code == 0, result.output
    assert "NLL per time step:" in result.output and "K = 3" in result.output
    d = json.loads(out.read_text())
    assert d["K"] == 3 and d["model"] == "dkf" and d["split"] == "val"
    assert len(d["names"]) == d["num_sequences"] == len(d["per_sequence"]["log_px"])
    assert math.isfinite(d["nll_per_step"]) and d["std_error_per_step"] > 0
    assert f"{d['nll_per_step']:.4f}" in result.output
    # the same through the Python API on the same whole utterances
    from pyro_dvae.data import load_utterances
    from pyro_dvae.train import load_run

    model, guide, _ = load_run(run_dir)
    api = evaluate_nll(model, guide, [u.power for u in load_utterances(None, "val")], K=3)
    assert api.nll_per_step == pytest.approx(d["nll_per_step"], rel=1e-6)


def test_cli_evaluate_nll_default_output_and_errors(run_dir, tmp_path):
    result = invoke("evaluate", "--checkpoint", run_dir, "--nll", "--particles", 1,
                    "--no-progress", "--split", "val")
    assert result.exit_code == 0, result.output
    assert (run_dir / "nll_val.json").is_file() and "±" not in result.output.splitlines()[1]
    for args, words in ((["--particles", "5"], "--particles needs --nll"),
                        (["--nll", "--workers", "2"], "--workers"),
                        (["--nll", "--particles", "0"], "0")):
        r = invoke("evaluate", "--checkpoint", run_dir, *args)
        assert r.exit_code != 0 and words in r.output, r.output
    r = invoke("evaluate", "--checkpoint", tmp_path / "missing", "--nll")
    assert r.exit_code == 1 and r.output.startswith("Error:") and "Traceback" not in r.output


def test_cli_evaluate_nll_on_an_array_file(tmp_path):
    """Binary piano-roll-like sequences in an .npz: fit with --likelihood bernoulli, then
    evaluate --nll on the whole test sequences equals evaluate_nll on load_array_sequences."""
    import numpy as np

    from pyro_dvae.data import load_array_sequences
    from pyro_dvae.train import load_run

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        seqs = [rng.random((int(rng.integers(5, 12)), 8)) < 0.3 for _ in range(n)]
        arrays[split] = np.concatenate(seqs).astype(np.uint8)
        arrays[f"{split}_lengths"] = np.array([len(s) for s in seqs])
    data = tmp_path / "rolls.npz"
    np.savez(data, **arrays)
    run = tmp_path / "run"
    result = invoke("fit", "--model", "srnn", "--data", data, "--likelihood", "bernoulli",
                    "--epochs", 1, "--seq-len", 6, "-o", "z_dim=2", "-o", "dim_rnn_h=8",
                    "--out", run, "-q", "--threads", 1)
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", "--checkpoint", run, "--nll", "--particles", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    d = json.loads((run / "nll_test.json").read_text())
    assert d["num_sequences"] == 3 and d["num_frames"] == int(arrays["test_lengths"].sum())
    assert d["names"] == ["test[0]", "test[1]", "test[2]"]
    model, guide, _ = load_run(run)
    api = evaluate_nll(model, guide, load_array_sequences(data, "test"), K=4)
    assert api.nll_per_step == pytest.approx(d["nll_per_step"], rel=1e-6)
    assert api.frames.tolist() == arrays["test_lengths"].tolist()
