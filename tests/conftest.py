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


@pytest.fixture(scope="session")
def bursts():
    """``bursts(seconds)``: a speech-like 16 kHz test signal, one 0.6 s harmonic burst (150 Hz
    voice) per second with silence in between, so that PESQ finds one utterance per second (the
    pesq library crashes once there are more than its fixed-size tables hold)."""
    import numpy as np

    def make(seconds: float, seed: int = 0) -> np.ndarray:
        sr = 16000
        t = np.arange(int(seconds * sr)) / sr
        envelope = np.sin(np.pi * (t % 1.0) / 0.6) ** 2 * ((t % 1.0) < 0.6)
        x = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 20)) * envelope
        return x + 1e-4 * np.random.default_rng(seed).standard_normal(t.size)

    return make
