"""SPEC section 3, row by row, for every registered model and guide variant.

Rows are the paper's (chapters 5-11, SPEC section 3); rows of guide variants are derived here, in
the comment of each row, from the exact posterior and the variant's density.  A row whose model is
not registered yet is skipped; every registered (model, guide) pair must have a row.
"""


import pytest
import torch

from pyro_dvae import build, check_posterior
from pyro_dvae.registry import REGISTRY
from pyro_dvae.structure import check_registered


def row(latent, exact, guide, missing=(), extra=()):
    consistent = not missing and not extra
    return {"latent": latent, "exact": list(exact), "guide": list(guide),
            "missing": list(missing), "extra": list(extra), "consistent": consistent,
            "status": "consistent" if consistent else "not consistent", "undetermined": []}


EXACT_DKF = ["z_{t-1}", "x_{t:T}"]
EXACT_SRNN = ["z_{t-1}", "x_{1:T}"]
EXACT_STORN = EXACT_VRNN = EXACT_RVAE_NC = ["z_{1:t-1}", "x_{1:T}"]

EXPECTED = {
    ("vae", "frame"): [row("z_t", ["x_t"], ["x_t"])],
    # DKF, exact prod_t p(z_t | z_{t-1}, x_{t:T}) (5.2); the variants of 5.2:
    ("dkf", "dks"): [row("z_t", EXACT_DKF, EXACT_DKF)],
    # q(z_t | z_{t-1}, x_{1:t}): sees no future frame, and the past frames it sees are D-separated
    ("dkf", "st-l"): [row("z_t", EXACT_DKF, ["z_{t-1}", "x_{1:t}"], ["x_{t+1:T}"], ["x_{1:t-1}"])],
    # q(z_t | z_{t-1}, x_{1:T})
    ("dkf", "st-lr"): [row("z_t", EXACT_DKF, ["z_{t-1}", "x_{1:T}"], [], ["x_{1:t-1}"])],
    # q(z_t | x_t)
    ("dkf", "mf-t"): [row("z_t", EXACT_DKF, ["x_t"], ["z_{t-1}", "x_{t+1:T}"])],
    # q(z_t | x_{t-1:t+1})
    ("dkf", "mf-local"): [row("z_t", EXACT_DKF, ["x_{t-1:t+1}"], ["z_{t-1}", "x_{t+2:T}"],
                              ["x_{t-1}"])],
    # q(z_t | x_{1:t})
    ("dkf", "mf-l"): [row("z_t", EXACT_DKF, ["x_{1:t}"], ["z_{t-1}", "x_{t+1:T}"],
                          ["x_{1:t-1}"])],
    # q(z_t | x_{1:T}) (the example: misses z_{t-1}, extra x_{1:t-1})
    ("dkf", "mf-lr"): [row("z_t", EXACT_DKF, ["x_{1:T}"], ["z_{t-1}"], ["x_{1:t-1}"])],
    # SRNN (9.8): exact z_{t-1}, x_{1:T}; the filtering guide e_z(z_{t-1}, h_t, x_t) sees x_{1:t}
    ("srnn", "smoothing"): [row("z_t", EXACT_SRNN, EXACT_SRNN)],
    ("srnn", "filtering"): [row("z_t", EXACT_SRNN, ["z_{t-1}", "x_{1:t}"], ["x_{t+1:T}"])],
    # STORN (7.12): the paper's q(z_t | x_{1:t}) and the structure-consistent variant
    ("storn", "filtering"): [row("z_t", EXACT_STORN, ["x_{1:t}"], ["z_{1:t-1}", "x_{t+1:T}"])],
    ("storn", "consistent"): [row("z_t", EXACT_STORN, EXACT_STORN)],
    # VRNN (8.10): the paper's q(z_t | z_{1:t-1}, x_{1:t}); Goyal's backward RNN sees x_{t:T} too
    ("vrnn", "filtering"): [row("z_t", EXACT_VRNN, ["z_{1:t-1}", "x_{1:t}"], ["x_{t+1:T}"])],
    ("vrnn", "backward"): [row("z_t", EXACT_VRNN, EXACT_VRNN)],
    # RVAE (10.17, 10.24)
    ("rvae-causal", "backward"): [row("z_t", ["z_{1:t-1}", "x_{t:T}"], ["z_{1:t-1}", "x_{t:T}"])],
    ("rvae-noncausal", "bidirectional"): [row("z_t", EXACT_RVAE_NC, EXACT_RVAE_NC)],
    # DSAE (11.9): v sampled first, then z_t | z_{1:t-1}, v, x_{t:T}
    ("dsae", "full"): [row("v", ["x_{1:T}"], ["x_{1:T}"]),
                       row("z_t", ["v", "z_{1:t-1}", "x_{t:T}"], ["v", "x_{1:T}"],
                           ["z_{1:t-1}"], ["x_{1:t-1}"])],
    # factorized (11.10): q(z_t | x_t) misses v, z_{1:t-1} and x_{t+1:T}
    ("dsae", "factorized"): [row("v", ["x_{1:T}"], ["x_{1:T}"]),
                             row("z_t", ["v", "z_{1:t-1}", "x_{t:T}"], ["x_t"],
                                 ["v", "z_{1:t-1}", "x_{t+1:T}"])],
    # KVAE (6.11 with the predictive-mode LDS, A_t, C_t from an LSTM on a_{1:t-1}): the guide
    # samples a_1..a_T from q(a_t | x_t), then z_T, ..., z_1 from the exact p(z_{1:T} | a_{1:T})
    # by backward sampling.  a_t (z marginalised): a_{1:t-1}, x_{t:T}.  z_t given z_{t+1:T} and
    # a_{1:T}: the co-parents of z_{t+1} are a_{1:t}, z_{t+1} blocks the rest: a_{1:t}, z_{t+1},
    # which is exactly the backward-sampling factor p(z_t | z_{t+1}, a_{1:t}): consistent.
    ("kvae", "kalman"): [row("a_t", ["a_{1:t-1}", "x_{t:T}"], ["x_t"],
                            ["a_{1:t-1}", "x_{t+1:T}"]),
                        row("z_t", ["a_{1:t}", "z_{t+1}"], ["a_{1:t}", "z_{t+1}"])],
}


@pytest.mark.parametrize("name,variant", sorted(EXPECTED))
def test_spec_table(name, variant):
    if name not in REGISTRY:
        pytest.skip(f"model {name!r} is not registered yet")
    if variant not in REGISTRY[name].guides:
        pytest.skip(f"guide {variant!r} of {name!r} is not registered yet")
    report = check_registered(name, variant)
    d = report.to_dict()
    assert d["model"] == name and d["guide"] == variant
    assert d["latents"] == EXPECTED[name, variant], str(report)
    assert d["consistent"] == all(r["consistent"] for r in EXPECTED[name, variant])
    # every edge determined, every intervention batched, every re-initialisation read
    assert d["undetermined_edges"] == {"model": [], "guide": []} and d["notes"] == []
    assert report.structure.batched and report.structure.draws == 3
    # regular structure: no boundary step deviates from the truncated pattern
    assert not [n for r in report.latents for n in r.notes()], str(report)


def test_every_registered_pair_has_a_row():
    missing = [(n, v) for n, e in REGISTRY.items() for v in e.guides if (n, v) not in EXPECTED]
    assert not missing, f"add the expected check-posterior rows of {missing} to EXPECTED"


def test_per_step_sets_dks():
    """The per-site sets behind the summary, at T = 6: z_1 | x_{1:6}, z_t | z_{t-1}, x_{t:6}."""
    report = check_registered("dkf", "dks", steps=6)
    exact = {str(z): sorted(map(str, vs)) for z, vs in report.exact_sets.items()}
    assert exact["z_1"] == sorted(f"x_{s}" for s in range(1, 7))
    assert exact["z_4"] == sorted(["z_3", "x_4", "x_5", "x_6"])
    assert exact["z_6"] == ["x_6", "z_5"]
    q = report.structure.guide_parents
    assert sorted(map(str, q[report.structure.latents[3]])) == ["x_4", "x_5", "x_6", "z_3"]


def test_driven_dkf_u_is_an_input():
    """Driven DKF (u_t feeds the transition, 4.1.1): exact z_{t-1}, x_{t:T}, u_{t:T} (u_{t+1:T}
    reach z_t through the unobserved z_{t+1}, a collider with observed descendants); the DKS guide
    reads u_{t:T} through its backward RNN on [x_t, u_t]: consistent."""
    torch.manual_seed(0)
    model, guide = build("dkf", "dks", x_dim=3, z_dim=2, u_dim=2)
    x, u = torch.rand(2, 7, 3) + 0.1, torch.randn(2, 7, 2)
    d = check_posterior(model.model, guide, x, u).to_dict()
    assert d["latents"] == [row("z_t", ["z_{t-1}", "x_{t:T}", "u_{t:T}"],
                                ["z_{t-1}", "x_{t:T}", "u_{t:T}"])]


def test_originals_untouched():
    """The check works on float64 copies in a private parameter store."""
    import pyro

    model, guide = build("srnn", "filtering", x_dim=4, z_dim=2)
    pyro.get_param_store()["keep"] = torch.ones(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_posterior(model.model, guide, torch.rand(2, 6, 4) + 0.1)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in guide.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(pyro.get_param_store().keys()) == ["keep"]
    assert torch.get_default_dtype() == torch.float32


def test_module_as_model_and_keyword_arguments():
    """The DVAE module itself is a Pyro callable too; a boolean mask keyword is passed through."""
    model, guide = build("srnn", "filtering", x_dim=4, z_dim=2)
    mask = torch.ones(2, 6, dtype=torch.bool)
    d = check_posterior(model, guide, torch.rand(2, 6, 4) + 0.1, mask=mask).to_dict()
    assert d["model"] == "srnn" and d["guide"] == "filtering"
    assert d["latents"] == EXPECTED["srnn", "filtering"]
