import pyro
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def feature_cache(tmp_path_factory):
    """Feature caches written by the tests (pyro_dvae.data) go to a temporary folder, not ~/.cache;
    shared by the whole session, so the built-in corpus is computed once."""
    import os

    old = os.environ.get("PYRO_DVAE_CACHE")
    os.environ["PYRO_DVAE_CACHE"] = str(tmp_path_factory.mktemp("pyro-dvae-cache"))
    yield
    if old is None:
        os.environ.pop("PYRO_DVAE_CACHE", None)
    else:
        os.environ["PYRO_DVAE_CACHE"] = old


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Every test starts with an empty param store, validation on and a fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    torch.set_num_threads(1)
    yield
    pyro.clear_param_store()
