"""Parameter counts at the sizes of 13.1 (x 257, z 16, hidden states 128, Itakura-Saito likelihood:
the decoder's linear output layer gives 257 log-variances) equal counts derived by hand from each
model's 13.1 paragraph, one commented line per layer, so a reader can check them against the paper.

Counting rules (PyTorch layers):
  Linear(i, o)            = i*o + o
  Gaussian head(i, L)     = 2 Linear(i, L)              (mean and log-variance, 13.1)
  LSTM(i, h)              = 4h(i + h) + 8h              (input and recurrent biases)
  RNN(i, h) (tanh)        = h(i + h) + 2h
"""

from __future__ import annotations

import pytest
import torch

import pyro_dvae
from pyro_dvae.registry import REGISTRY

X, Z, H = 257, 16, 128


def lin(i, o):
    return i * o + o


def gauss(i, o):
    return 2 * lin(i, o)


def lstm(i, h):
    return 4 * h * (i + h) + 8 * h


def rnn(i, h):
    return h * (i + h) + 2 * h


# ---- generative models ----------------------------------------------------------------------------
MODELS = {
    "vae": sum([                      # baseline; the VAE of KVAE (13.1.2)
        lin(Z, 128),                  # d_x: MLP(z_t, 128, Tanh, ...
        lin(128, 256),                #      ..., 256, Tanh)
        lin(256, X),                  # linear output: log sigma^2 (257)
    ]),
    "dkf": sum([                      # 13.1.1
        lin(Z, 16), lin(16, Z),       # nu_t = MLP(z_{t-1}, 16, ReLU, 16, Sigmoid)        (13.1)
        lin(Z, 16), lin(16, Z),       # mu^nonlin_t = MLP(z_{t-1}, 16, ReLU, 16, I)      (13.2)
        lin(Z, Z),                    # mu^lin_t = MLP(z_{t-1}, 16, I)                   (13.3)
        lin(Z, Z),                    # sigma^2_t = MLP(ReLU(mu^nonlin_t), 16, Softplus)  (13.5)
        lin(Z, 32), lin(32, 64),      # d_x = MLP(z_t, 32, Tanh, 64, Tanh, ...
        lin(64, 128), lin(128, 256),  #       ..., 128, Tanh, 256, Tanh)
        lin(256, X),                  # linear output
    ]),
    "srnn": sum([                     # 13.1.5
        lin(X, 256),                  # MLP(x_{t-1}, 256, Tanh)
        lstm(256, H),                 # d_h: LSTM(128)
        lin(Z + H, 64), lin(64, 32),  # d_z = MLP([z_{t-1}, h_t], 64, Tanh, 32, Tanh)
        gauss(32, Z),                 # linear output: mean, log-variance of z_t
        lin(Z + H, 256),              # d_x = MLP([z_t, h_t], 256, Tanh)
        lin(256, X),                  # linear output
    ]),
    "storn": sum([                    # 13.1.3
        lin(X, 256),                  # MLP(x_{t-1}, 256, Tanh)
        lin(Z, 32), lin(32, 64),      # MLP(z_t, 32, Tanh, 64, Tanh)
        lstm(256 + 64, H),            # d_h: forward LSTM(128) over the concatenation
        lin(H, 256),                  # d_x = MLP(h_t, 256, Tanh)
        lin(256, X),                  # linear output
    ]),                               # (z_t ~ N(0, I): no prior network)
    "vrnn": sum([                     # 13.1.4
        lin(X, 256),                  # phi_x = MLP(x_t, 256, Tanh)
        lin(Z, 32), lin(32, 64),      # phi_z = MLP(z_t, 32, Tanh, 64, Tanh)
        lstm(256 + 64, H),            # d_h: LSTM(128) over [phi_x(x_{t-1}), phi_z(z_{t-1})]
        lin(H, 64), lin(64, 32),      # d_z = MLP(h_t, 64, Tanh, 32, Tanh)
        gauss(32, Z),                 # linear output of d_z
        lin(64 + H, 256),             # d_x = MLP([phi_z(z_t), h_t], 256, Tanh)
        lin(256, X),                  # linear output
    ]),
    "rvae-causal": sum([              # 13.1.6
        lin(Z, 32), lin(32, 64),      # MLP(z_t, 32, Tanh, 64, Tanh)
        lstm(64, H),                  # d_h: forward LSTM(128)
        lin(H, 256),                  # d_x = MLP(h_t, 256, Tanh)
        lin(256, X),                  # linear output
    ]),
    "rvae-noncausal": sum([           # 13.1.6
        lin(Z, 32), lin(32, 64),      # MLP(z_t, 32, Tanh, 64, Tanh)
        2 * lstm(64, H),              # d_h: bidirectional LSTM(128) (forward + backward)
        lin(2 * H, 256),              # d_x = MLP(h_t = [h->_t, h<-_t], 256, Tanh)
        lin(256, X),                  # linear output
    ]),
    "dsae": sum([                     # 13.1.7 (v has the dimension of z_t)
        lstm(Z, 32),                  # d_h: forward LSTM with 32 units over z_{t-1}
        gauss(32, Z),                 # d_z: one linear layer to mean and log-variance
        lin(Z + Z, 32), lin(32, 64),  # d_x = MLP([z_t, v], 32, Tanh, 64, Tanh, ...
        lin(64, 128), lin(128, 256),  #       ..., 128, Tanh, 256, Tanh)
        lin(256, X),                  # linear output
    ]),
}

# ---- guides -------------------------------------------------------------------------------------
_DKF_Z = lin(Z, 32) + lin(32, 64) + lin(64, H)   # MLP(z_{t-1}, 32, Tanh, 64, Tanh) + tanh(W . + b) (5.5)
_DKF_EZ = lin(H, 64) + lin(64, 32) + gauss(32, Z)  # e_z = MLP(g_t, 64, Tanh, 32, Tanh) + head (5.6)
_DSAE_V = sum([                    # q(v | x_{1:T}), 13.1.7
    lin(X, 256),                   # MLP(x_t, 256, Tanh) (shared with the z encoder)
    2 * lstm(256, H),              # bidirectional many-to-one LSTM(128)  (11.12-11.13)
    lin(2 * H, 64), lin(64, 32),   # e_v = MLP(g^v, 64, Tanh, 32, Tanh)    (11.15)
    gauss(32, Z),                  # linear output
])
GUIDES = {
    ("vae", "frame"): sum([
        lin(X, 256), lin(256, 128),  # MLP(x_t, 256, Tanh, 128, Tanh)
        gauss(128, Z),               # linear output
    ]),
    ("dkf", "dks"): sum([            # 13.1.1
        lin(X, 256),                 # MLP(x_t, 256, Tanh)
        lstm(256, H),                # e_g: backward LSTM(128)      (5.4)
        _DKF_Z,                      # z_{t-1} part of g_t           (5.5)
        _DKF_EZ,                     # e_z                           (5.6-5.7)
    ]),
    ("dkf", "st-l"): lin(X, 256) + lstm(256, H) + _DKF_Z + _DKF_EZ,       # forward LSTM instead
    ("dkf", "st-lr"): lin(X, 256) + 2 * lstm(256, H) + _DKF_Z + _DKF_EZ,  # forward + backward
    ("dkf", "mf-t"): lin(X, 256) + lin(256, H) + _DKF_EZ,                 # MLP(feat_t, 128, Tanh)
    ("dkf", "mf-local"): lin(X, 256) + lin(3 * 256, H) + _DKF_EZ,         # MLP(feat_{t-1:t+1}, 128)
    ("dkf", "mf-l"): lin(X, 256) + lstm(256, H) + _DKF_EZ,
    ("dkf", "mf-lr"): lin(X, 256) + 2 * lstm(256, H) + _DKF_EZ,
    ("srnn", "smoothing"): sum([     # 13.1.5
        lin(H + X, 256),             # MLP([h_t, x_t], 256, Tanh)
        lstm(256, H),                # e_g: backward LSTM(128)                  (9.10)
        lin(Z + H, 64), lin(64, 32),  # e_z = MLP([z_{t-1}, g<-_t], 64, Tanh, 32, Tanh) (9.11)
        gauss(32, Z),                # linear output
    ]),
    ("srnn", "filtering"): sum([     # e_z(z_{t-1}, h_t, x_t), end of 9.2
        lin(X, 256),                 # MLP(x_t, 256, Tanh)
        lin(Z + H + 256, 64), lin(64, 32),  # MLP([z_{t-1}, h_t, feat_t], 64, Tanh, 32, Tanh)
        gauss(32, Z),                # linear output
    ]),
    ("storn", "filtering"): sum([    # 13.1.3
        lin(X, 256),                 # MLP(x_t, 256, Tanh)
        lstm(256, H),                # e_g: forward LSTM(128)                   (7.15)
        lin(H, 64), lin(64, 32),     # e_z = MLP(g_t, 64, Tanh, 32, Tanh)      (7.16)
        gauss(32, Z),                # linear output
    ]),
    ("storn", "consistent"): sum([   # the non-causal RVAE guide's architecture (13.1.6)
        lin(X, 256),                 # MLP(x_t, 256, Tanh)
        2 * lstm(256, H),            # forward and backward LSTMs(128) on it
        lin(Z, 32), lin(32, 64),     # MLP(z_{t-1}, 32, Tanh, 64, Tanh)
        lstm(64, H),                 # forward LSTM(128) over z_{1:t-1}
        lin(3 * H, 64), lin(64, 32),  # e_z = MLP(g_t, 64, Tanh, 32, Tanh)
        gauss(32, Z),                # linear output
    ]),
    ("vrnn", "filtering"): sum([     # 13.1.4 (phi_x and d_h are the model's)
        lin(256 + H, 128), lin(128, 64),  # e_z = MLP([phi_x(x_t), h_t], 128, Tanh, 64, Tanh)
        gauss(64, Z),                # linear output
    ]),
    ("vrnn", "backward"): sum([      # 8.4 (Goyal et al.)
        lstm(256, H),                # backward LSTM(128) on phi_x(x_t)
        lin(H + H, 128), lin(128, 64),  # e_z = MLP([b_t, h_t], 128, Tanh, 64, Tanh)
        gauss(64, Z),                # linear output
    ]),
    ("rvae-causal", "backward"): sum([   # 13.1.6
        lin(X, 256),                 # MLP(x_t, 256, Tanh)
        lstm(256, H),                # e_g<-: backward LSTM(128)                (10.19)
        lin(Z, 32), lin(32, 64),     # MLP(z_{t-1}, 32, Tanh, 64, Tanh)
        lstm(64, H),                 # e_g->: forward LSTM(128)                 (10.18)
        lin(2 * H, 64), lin(64, 32),  # e_z = MLP([g->_t, g<-_t], 64, Tanh, 32, Tanh) (10.21)
        gauss(32, Z),                # linear output
    ]),
    ("rvae-noncausal", "bidirectional"): sum([  # 13.1.6
        lin(X, 256),                 # MLP(x_t, 256, Tanh)
        2 * lstm(256, H),            # e_g->^x (10.25) and e_g<-^x (10.26): LSTMs(128)
        lin(Z, 32), lin(32, 64),     # MLP(z_{t-1}, 32, Tanh, 64, Tanh)
        lstm(64, H),                 # e_g->^z: forward LSTM(128)               (10.24)
        lin(3 * H, 64), lin(64, 32),  # e_z = MLP(g_t, 64, Tanh, 32, Tanh)       (10.28)
        gauss(32, Z),                # linear output
    ]),
    ("dsae", "full"): sum([          # 13.1.7
        _DSAE_V,                     # q(v | x_{1:T})
        lin(Z + 256, 256),           # MLP([v, MLP(x_t, 256, Tanh)], 256, Tanh)
        2 * lstm(256, H),            # bidirectional LSTM(128)                  (11.17-11.19)
        rnn(2 * H, 32),              # e_z: an RNN with 32 units                (11.20)
        gauss(32, Z),                # linear output
    ]),
    ("dsae", "factorized"): sum([    # (11.10)
        _DSAE_V,                     # q(v | x_{1:T})
        lin(256, 64), lin(64, 32),   # q(z_t | x_t): MLP(MLP(x_t, 256, Tanh), 64, Tanh, 32, Tanh)
        gauss(32, Z),                # linear output
    ]),
}


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_every_pair_of_these_models_has_a_count():
    for name in MODELS:
        for g in REGISTRY[name].guides:
            assert (name, g) in GUIDES, f"no hand-derived parameter count for {name}/{g}"


@pytest.mark.parametrize("name,guide_name", list(GUIDES), ids=[f"{n}-{g}" for n, g in GUIDES])
def test_parameter_counts(name, guide_name):
    model, guide = pyro_dvae.build(name, guide=guide_name, x_dim=X, z_dim=Z)
    assert _count(model) == MODELS[name], f"{name}: {_count(model)} != {MODELS[name]}"
    assert _count(guide) == GUIDES[name, guide_name], (
        f"{name}/{guide_name}: {_count(guide)} != {GUIDES[name, guide_name]}")
    # the guide does not register the model's parameters a second time
    model_ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in model_ids for p in guide.parameters())


def test_gaussian_likelihood_doubles_the_output_layer():
    """With the Gaussian likelihood the decoder's linear output gives mean and log-variance."""
    for name in ("storn", "vrnn", "rvae-causal", "dsae"):
        m_is, _ = pyro_dvae.build(name, x_dim=X, z_dim=Z)
        m_g, _ = pyro_dvae.build(name, x_dim=X, z_dim=Z, likelihood="gaussian")
        assert _count(m_g) - _count(m_is) == lin(256, X)  # one more Linear(256, 257)


# ---- architecture options: the layer-size fields of the authors' config.ini ----------------------
#: the authors' released WSJ0 runs (reference/DVAE-speech/README.md): [Network] options and the
#: parameter count of the checkpoint (all tensors: encoder and decoder)
AUTHORS = {
    "vae": ({"dense_x_z": "256,128,64,32"}, 220_385),
    "dkf": ({"dense_x_gx": 256, "dim_RNN_gx": 128, "num_RNN_gx": 1, "bidir_gx": False,
             "dense_ztm1_g": (32, 64), "dense_g_z": (64, 32), "dense_z_x": (32, 64, 128, 256)},
            397_729),
    "storn": ({"dense_x_g": 256, "dim_RNN_g": 128, "num_RNN_g": 1, "dense_g_z": (64, 32),
               "dense_z_h": (32, 64), "dense_xtm1_h": 256, "dense_h_x": 256, "dim_RNN_h": 128,
               "num_RNN_h": 1}, 673_249),
    "vrnn": ({"dense_x": 256, "dense_z": (32, 64), "dense_hx_z": (64, 32), "dense_hz_x": 256,
              "dense_h_z": (64, 32), "dim_RNN": 128, "num_RNN": 1}, 453_729),
    "srnn": ({"dense_x_h": 256, "dim_RNN_h": 128, "num_RNN_h": 1, "dense_hx_g": 256,
              "dim_RNN_g": 128, "num_RNN_g": 1, "dense_gz_z": (64, 32), "dense_hz_x": 256,
              "dense_hz_z": (64, 32)}, 688_129),
    "rvae-causal": ({"bidir_g_x": False, "bidir_h": False}, 586_305),
    "rvae-noncausal": ({"bidir_g_x": True, "bidir_h": True}, 924_225),
}


@pytest.mark.parametrize("name", list(AUTHORS))
def test_authors_architectures_are_expressible(name):
    """Every layer-size field of the authors' configs is an option, and with their values the
    model and its guide hold exactly as many parameters as their checkpoint."""
    options, count = AUTHORS[name]
    model, guide = pyro_dvae.build(name, x_dim=X, z_dim=Z, activation="tanh", **options)
    assert _count(model) + _count(guide) == count
    assert set(model.arch) >= {k.lower() for k in options}


def test_options_change_the_layers_they_name():
    model, guide = pyro_dvae.build("srnn", x_dim=X, z_dim=Z, dense_x_h=(100, 50), dim_rnn_h=40,
                                   num_rnn_h=2, dense_hz_z="", activation="relu")
    assert [m.out_features for m in model.x_features if hasattr(m, "out_features")] == [100, 50]
    assert model.h_rnn.rnn.hidden_size == 40 and model.h_rnn.rnn.num_layers == 2
    assert len(model.prior_net) == 0 and model.prior_head.loc.in_features == 40 + Z  # identity
    assert isinstance(model.decoder[1], torch.nn.ReLU)
    assert guide.hx_features[0].in_features == 40 + X  # the guide follows the model's h_t


@pytest.mark.parametrize("options,message", [
    ({"dense_x_h": "256,abc"}, "not a comma-separated list"),
    ({"dense_x_h": (256, 0)}, "widths must be >= 1"),
    ({"dense_x_h": 2.5}, "must be integers"),
    ({"dim_rnn_h": 0}, "dim_rnn_h=0: must be an integer >= 1"),
    ({"num_rnn_g": True}, "must be an integer >= 1"),
    ({"activation": "swish"}, "activation='swish': choose from"),
    ({"dense_nothing": 3}, "unknown option 'dense_nothing' for srnn"),
])
def test_invalid_options_are_clear_errors(options, message):
    from pyro_dvae.nn import ArchitectureError

    with pytest.raises(ArchitectureError, match=message):
        pyro_dvae.build("srnn", x_dim=X, z_dim=Z, **options)


def test_options_that_contradict_the_model():
    from pyro_dvae.nn import ArchitectureError

    with pytest.raises(ArchitectureError, match="bidir_h=True cannot be expressed by rvae-causal"):
        pyro_dvae.build("rvae-causal", bidir_h=True)
    with pytest.raises(ArchitectureError, match="bidir_gx=True cannot be expressed"):
        pyro_dvae.build("dkf", bidir_gx=True)


def test_vae_decoder_mirrors_the_encoder_by_default():
    model, guide = pyro_dvae.build("vae", x_dim=X, z_dim=Z, dense_x_z=(64, 32, 8))
    assert model.arch["dense_z_x"] == (8, 32, 64)
    model, _ = pyro_dvae.build("vae", x_dim=X, z_dim=Z, dense_x_z=(64, 32), dense_z_x=(128,))
    assert model.x_out.in_features == 128
