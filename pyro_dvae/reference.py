"""The authors' trained checkpoints (DVAE-speech, Girin et al.'s reference implementation) as
pyro-dvae runs, and the reference's own output quantities computed with pyro-dvae's models.

A reference checkpoint is a plain ``state_dict`` of one module holding encoder and decoder; its
``config.ini`` gives the layer sizes (``[Network]``).  pyro-dvae splits the same networks into a
model (p_theta) and a guide (q_phi) whose layers follow the reference's conventions (first time
step, concatenation orders: see each model's docstring), so the conversion is a renaming with every
shape checked:

- :data:`TABLES`: one table per model, ``(reference module, "model" | "guide", our module, kind)``.
  ``kind`` says how the tensor names inside the module correspond: ``linear`` (``weight``,
  ``bias``), ``mlp`` (the reference's ``linear{k}`` is our ``{2k}``, every second entry of an
  ``nn.Sequential`` of linear layers and activations; ``mlp_last``: the last one is called
  ``linear_last``), ``lstm`` (``weight_ih_l{k}`` ... of our ``.rnn``) and ``lstm_reverse`` (the
  reference's ``*_reverse`` tensors, the second direction of a bidirectional LSTM, which pyro-dvae
  keeps as a separate one-direction LSTM).
- :func:`convert`: the one generic converter (table + built model and guide -> their state dicts).
- :func:`options_from_config`: ``config.ini`` -> registered model name and architecture options.
- :func:`import_reference`: checkpoint (+ config.ini) -> a run directory that
  :func:`pyro_dvae.train.load_run`, ``evaluate``, ``resynth``, ``generate``, ``check-posterior`` and
  ``fit --init-from`` accept (``pyro-dvae import-reference``).
- :func:`outputs_at_means`: the quantities ``reference/expected/`` records (encoder and prior
  parameters, decoder log-variances, per-frame IS and KL terms) from a model and guide whose every
  latent is fixed at its guide mean during the recursion.

Every problem (a tensor that does not map, a missing tensor, a shape mismatch, a config field the
model cannot express, an unknown model name) raises :class:`ReferenceError` with a one-line message
naming it, before anything is written.
"""

from __future__ import annotations

import configparser
import math
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from pyro import poutine
from torch import nn

from .atomic import create_temp_dir
from .models.base import use_mean
from .nn import ArchitectureError, architecture_json

PathLike = Union[str, Path]
Rule = Tuple[str, str, str, str]


class ReferenceError(ValueError):
    """A reference checkpoint or config.ini that cannot be imported (one-line message)."""


def _heads(prior: bool = False) -> List[Rule]:
    rules = [("inf_mean", "guide", "head.loc", "linear"),
             ("inf_logvar", "guide", "head.logvar", "linear"),
             ("gen_logvar", "model", "x_out", "linear")]
    if prior:
        rules += [("prior_mean", "model", "prior_head.loc", "linear"),
                  ("prior_logvar", "model", "prior_head.logvar", "linear")]
    return rules


#: registered model name -> (reference module, side, our module, kind); see the module docstring
TABLES: Dict[str, List[Rule]] = {
    "vae": [
        ("mlp_x_z", "guide", "encoder", "mlp"),
        ("mlp_z_x", "model", "decoder", "mlp"),
    ] + _heads(),
    "dkf": [
        ("mlp_x_gx", "guide", "x_features", "mlp"),
        ("rnn_gx", "guide", "bwd_rnn", "lstm"),
        ("mlp_ztm1_g", "guide", "z_net", "mlp_last"),
        ("mlp_g_z", "guide", "combiner", "mlp"),
        ("mlp_gate.linear1", "model", "transition.gate.0", "linear"),
        ("mlp_gate.linear2", "model", "transition.gate.2", "linear"),
        ("mlp_z_prop.linear1", "model", "transition.nonlin.0", "linear"),
        ("mlp_z_prop.linear2", "model", "transition.nonlin.2", "linear"),
        ("prior_mean", "model", "transition.lin", "linear"),
        ("prior_logvar.1", "model", "transition.var.0", "linear"),
        ("mlp_z_x", "model", "decoder", "mlp"),
    ] + _heads(),
    "storn": [
        ("mlp_x_g", "guide", "x_features", "mlp"),
        ("rnn_g", "guide", "g_rnn", "lstm"),
        ("mlp_g_z", "guide", "combiner", "mlp"),
        ("mlp_z_h", "model", "z_features", "mlp"),
        ("mlp_xtm1_h", "model", "x_features", "mlp"),
        ("rnn_h", "model", "h_rnn", "lstm"),
        ("mlp_h_x", "model", "decoder", "mlp"),
    ] + _heads(),
    "vrnn": [
        ("feature_extractor_x", "model", "x_features", "mlp"),
        ("feature_extractor_z", "model", "z_features", "mlp"),
        ("rnn", "model", "h_rnn", "lstm"),
        ("mlp_hx_z", "guide", "encoder", "mlp"),
        ("mlp_h_z", "model", "prior_net", "mlp"),
        ("mlp_hz_x", "model", "decoder", "mlp"),
    ] + _heads(prior=True),
    "srnn": [
        ("mlp_x_h", "model", "x_features", "mlp"),
        ("rnn_h", "model", "h_rnn", "lstm"),
        ("mlp_hx_g", "guide", "hx_features", "mlp"),
        ("rnn_g", "guide", "g_rnn", "lstm"),
        ("mlp_gz_z", "guide", "combiner", "mlp"),
        ("mlp_hz_z", "model", "prior_net", "mlp"),
        ("mlp_hz_x", "model", "decoder", "mlp"),
    ] + _heads(prior=True),
    "rvae-causal": [
        ("mlp_x_gx", "guide", "x_features", "mlp"),
        ("rnn_g_x", "guide", "x_bwd", "lstm"),
        ("mlp_z_gz", "guide", "z_features", "mlp"),
        ("rnn_g_z", "guide", "z_rnn", "lstm"),
        ("mlp_g_z", "guide", "combiner", "mlp"),
        ("mlp_z_h", "model", "z_features", "mlp"),
        ("rnn_h", "model", "h_rnn", "lstm"),
        ("mlp_h_x", "model", "decoder", "mlp"),
    ] + _heads(),
    "rvae-noncausal": [
        ("mlp_x_gx", "guide", "x_features", "mlp"),
        # the reference runs rnn_g_x on the time-reversed x: its l0 direction runs backward in
        # time, its l0_reverse direction forward (DVAE-speech README)
        ("rnn_g_x", "guide", "x_bwd", "lstm"),
        ("rnn_g_x", "guide", "x_fwd", "lstm_reverse"),
        ("mlp_z_gz", "guide", "z_features", "mlp"),
        ("rnn_g_z", "guide", "z_rnn", "lstm"),
        ("mlp_g_z", "guide", "combiner", "mlp"),
        ("mlp_z_h", "model", "z_features", "mlp"),
        ("rnn_h", "model", "h_rnn.fwd", "lstm"),
        ("rnn_h", "model", "h_rnn.bwd", "lstm_reverse"),
        ("mlp_h_x", "model", "decoder", "mlp"),
    ] + _heads(),
}

#: the guide each reference model's encoder is (the paper's; the only one it can be)
GUIDES = {"vae": "frame", "dkf": "dks", "storn": "filtering", "vrnn": "filtering",
          "srnn": "smoothing", "rvae-causal": "backward", "rvae-noncausal": "bidirectional"}

_LSTM_TENSOR = re.compile(r"^rnn\.((?:weight|bias)_(?:ih|hh)_l\d+)$")
_MLP_TENSOR = re.compile(r"^(\d+)\.(weight|bias)$")


def _linear_indices(module: nn.Module) -> List[int]:
    return [int(name) for name, m in module.named_children() if isinstance(m, nn.Linear)]


def _reference_name(rule: Rule, module: nn.Module, rest: str) -> Optional[str]:
    """The reference tensor name of our tensor ``rest`` (relative to the rule's module)."""
    ref, _, _, kind = rule
    if kind == "linear":
        return f"{ref}.{rest}" if rest in ("weight", "bias") else None
    if kind in ("mlp", "mlp_last"):
        m = _MLP_TENSOR.match(rest)
        if m is None:
            return None
        linears = _linear_indices(module)
        index = linears.index(int(m.group(1)))
        if kind == "mlp_last" and index == len(linears) - 1:
            return f"{ref}.linear_last.{m.group(2)}"
        return f"{ref}.linear{index}.{m.group(2)}"
    m = _LSTM_TENSOR.match(rest)
    if m is None:
        return None
    return f"{ref}.{m.group(1)}" + ("_reverse" if kind == "lstm_reverse" else "")


def expected_names(name: str, model: nn.Module, guide: nn.Module) -> Dict[str, Tuple[str, str]]:
    """reference tensor name -> (side, our state-dict key) for every tensor of model and guide."""
    if name not in TABLES:
        raise ReferenceError(f"no reference mapping for model {name!r} (importable: "
                             f"{', '.join(TABLES)})")
    out: Dict[str, Tuple[str, str]] = {}
    for side, module in (("model", model), ("guide", guide)):
        for key in module.state_dict():
            ref = None
            for rule in TABLES[name]:
                prefix = rule[2] + "."
                if rule[1] == side and key.startswith(prefix):
                    sub = module.get_submodule(rule[2])
                    ref = _reference_name(rule, sub, key[len(prefix):])
                    if ref is not None:
                        break
            if ref is None:  # a table that misses one of our tensors is a bug of this module
                raise AssertionError(f"TABLES[{name!r}] maps no reference tensor to our {side} "
                                     f"tensor {key}")
            out[ref] = (side, key)
    return out


def convert(state: Dict[str, torch.Tensor], name: str, model: nn.Module, guide: nn.Module
            ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The reference ``state`` as (model state dict, guide state dict) of the built ``model`` and
    ``guide`` of registered model ``name``; every tensor mapped by name, every shape checked."""
    expected = expected_names(name, model, guide)
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ReferenceError(f"reference tensor {extra[0]!r} does not map to any parameter of "
                             f"pyro-dvae's {name}" + (f" (and {len(extra) - 1} more)"
                                                      if len(extra) > 1 else ""))
    missing = sorted(set(expected) - set(state))
    if missing:
        side, key = expected[missing[0]]
        raise ReferenceError(f"the checkpoint has no tensor {missing[0]!r} (needed for the {side} "
                             f"parameter {key} of {name})" + (f"; {len(missing) - 1} more missing"
                                                             if len(missing) > 1 else ""))
    own = {"model": model.state_dict(), "guide": guide.state_dict()}
    out: Dict[str, Dict[str, torch.Tensor]] = {"model": {}, "guide": {}}
    for ref, (side, key) in expected.items():
        value = state[ref]
        if not isinstance(value, torch.Tensor):
            raise ReferenceError(f"reference entry {ref!r} is not a tensor")
        if tuple(value.shape) != tuple(own[side][key].shape):
            raise ReferenceError(f"reference tensor {ref!r} has shape {tuple(value.shape)}, but "
                                 f"the {side} parameter {key} of {name} (as configured) has "
                                 f"{tuple(own[side][key].shape)}")
        out[side][key] = value.detach().to(own[side][key].dtype).clone()
    return out["model"], out["guide"]


# ---- config.ini ----------------------------------------------------------------------------------
#: [Network] name -> registered model (RVAE: by its bidir_* fields)
NETWORK_NAMES = {"VAE": "vae", "DKF": "dkf", "STORN": "storn", "VRNN": "vrnn", "SRNN": "srnn",
                 "RVAE": None}
#: [Network] fields that are not architecture options
_NETWORK_META = ("name", "tag", "x_dim", "z_dim", "dropout_p")
#: the speech front end pyro-dvae implements ([STFT] of config.ini)
_STFT = {"wlen_sec": 0.032, "hop_percent": 0.5, "fs": 16000.0, "zp_percent": 0.0}


def read_config(path: PathLike) -> configparser.ConfigParser:
    parser = configparser.ConfigParser()  # keys are lower-cased: dim_RNN_h -> dim_rnn_h
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise ReferenceError(f"{path}: not a readable config.ini "
                             f"({' '.join(str(e).split())[:200]})") from None
    if not parser.has_section("Network"):
        raise ReferenceError(f"{path}: no [Network] section, not a DVAE-speech config.ini")
    return parser


def options_from_config(parser: configparser.ConfigParser) -> Tuple[str, dict, dict]:
    """(registered model name, build keyword arguments, [Training] fields) of a reference
    config.ini; raises :class:`ReferenceError` for a field the model cannot express."""
    from .registry import REGISTRY

    net = parser["Network"]
    label = net.get("name", "").strip()
    if label not in NETWORK_NAMES:
        raise ReferenceError(f"config.ini: unknown model name {label!r} (importable: "
                             f"{', '.join(NETWORK_NAMES)})")
    fields = {k: v.strip() for k, v in net.items()}
    name = NETWORK_NAMES[label]
    if name is None:  # RVAE: causal or not by its bidirectional fields
        bidir = {k: fields.get(k, "False").lower() == "true" for k in ("bidir_g_x", "bidir_h")}
        if bidir["bidir_g_x"] != bidir["bidir_h"]:
            raise ReferenceError(f"config.ini: bidir_g_x = {fields.get('bidir_g_x')} with bidir_h "
                                 f"= {fields.get('bidir_h')} cannot be expressed (pyro-dvae's "
                                 "rvae-causal has both False, rvae-noncausal both True)")
        name = "rvae-noncausal" if bidir["bidir_h"] else "rvae-causal"
    for key, want in _STFT.items():
        if parser.has_option("STFT", key):
            raw = parser["STFT"][key]
            try:
                ok = math.isclose(float(raw), want)
            except ValueError:
                ok = False
            if not ok:
                raise ReferenceError(f"config.ini: [STFT] {key} = {raw} cannot be expressed "
                                     "(pyro-dvae's speech front end: 32 ms sine window, hop 50 %, "
                                     "16 kHz, no zero padding)")
    try:
        dropout = float(fields.get("dropout_p", "0"))
    except ValueError:
        dropout = math.nan
    if dropout != 0:
        raise ReferenceError(f"config.ini: dropout_p = {fields.get('dropout_p')} cannot be "
                             "expressed (pyro-dvae's networks have no dropout)")
    defaults = REGISTRY[name].model.architecture
    options = {}
    for key, raw in fields.items():
        if key in _NETWORK_META:
            continue
        if key not in defaults:
            raise ReferenceError(f"config.ini: field {key} = {raw} cannot be expressed by "
                                 f"pyro-dvae's {name} (its options: {', '.join(defaults)})")
        options[key] = raw
    try:
        kwargs = {"x_dim": int(fields.get("x_dim", "257")), "z_dim": int(fields.get("z_dim", "16"))}
    except ValueError:
        raise ReferenceError(f"config.ini: x_dim = {fields.get('x_dim')}, z_dim = "
                             f"{fields.get('z_dim')}: not integers") from None
    training = dict(parser["Training"]) if parser.has_section("Training") else {}
    return name, {**kwargs, **options}, training


def build_from_config(parser: configparser.ConfigParser):
    """(name, model, guide, options, training) built from a reference config.ini."""
    from .registry import build

    name, kwargs, training = options_from_config(parser)
    try:
        model, guide = build(name, GUIDES[name], **kwargs)
    except ArchitectureError as e:
        raise ReferenceError(f"config.ini: {e}") from None
    options = architecture_json({k: v for k, v in model.arch.items() if k in kwargs})
    return name, model, guide, options, training


# ---- importing a checkpoint ----------------------------------------------------------------------
def load_reference_state(path: PathLike) -> Dict[str, torch.Tensor]:
    """A reference checkpoint: a plain state dict, loaded with ``weights_only=True`` on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReferenceError(f"{path}: not a readable torch checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or not state:
        raise ReferenceError(f"{path}: not a state dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ReferenceError(f"{path}: entry {bad[0]!r} is not a named tensor")
    return state


def import_reference(checkpoint: PathLike, out: PathLike, config: Optional[PathLike] = None
                     ) -> Path:
    """Convert a DVAE-speech checkpoint into a pyro-dvae run directory ``out``.

    ``config``: the run's config.ini (default: ``config.ini`` next to the checkpoint).  Writes
    ``config.json`` (model, guide, sizes, architecture options, the reference's training settings),
    ``best.pt`` (model and guide weights) and ``history.json`` (no epochs; ``source`` says where the
    weights came from), all or nothing: ``out`` must not exist yet or be empty.  Returns ``out``.
    """
    from . import __version__
    from .train import CHECKPOINT_FORMAT, save_checkpoint, write_json

    checkpoint = Path(checkpoint)
    out = Path(out)
    config = checkpoint.parent / "config.ini" if config is None else Path(config)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReferenceError(f"{out}: already exists and is not an empty directory")
    if not config.is_file():
        raise ReferenceError(f"{config}: no such config.ini (give it with --config)")
    parser = read_config(config)
    name, model, guide, options, training = build_from_config(parser)
    state = load_reference_state(checkpoint)
    model_state, guide_state = convert(state, name, model, guide)
    model.load_state_dict(model_state)
    guide.load_state_dict(guide_state)
    epoch = re.search(r"epoch(\d+)", checkpoint.stem)
    source = {"kind": "reference checkpoint (DVAE-speech)",
              "checkpoint": str(checkpoint.resolve()), "config": str(config.resolve()),
              "network": parser["Network"].get("name"), "tag": parser["Network"].get("tag"),
              "epoch": int(epoch.group(1)) if epoch else None, "tensors": len(state),
              "training": training}
    cfg = {"model": name, "guide": guide.name, "x_dim": model.x_dim, "z_dim": model.z_dim,
           "u_dim": model.u_dim, "likelihood": model.likelihood.name, "model_options": options,
           "architecture": architecture_json(model.arch),
           "data": None, "seq_len": int(parser.get("DataFrame", "sequence_len", fallback="150")),
           "source": source, "pyro_dvae_version": __version__}
    history = {"model": name, "guide": guide.name, "epoch": [], "train_loss": [],
               "val_loss": [], "beta": [], "seconds": [], "best_epoch": None,
               "best_val_loss": None, "status": "imported", "source": source}
    best = {"format": CHECKPOINT_FORMAT, "model_name": name, "guide_name": guide.name,
            "model": model.state_dict(), "guide": guide.state_dict(), "epoch": source["epoch"],
            "val_loss": None, "source": source["checkpoint"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_dir(out)  # (mode from the umask, like every output)
    try:
        write_json(cfg, tmp / "config.json")
        write_json(history, tmp / "history.json")
        save_checkpoint(best, tmp / "best.pt")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


# ---- the reference's quantities ------------------------------------------------------------------
@torch.no_grad()
def outputs_at_means(model, guide, x: torch.Tensor, u=None, mask=None) -> Dict[str, torch.Tensor]:
    """What ``reference/expected/`` records, from pyro-dvae's own model and guide with every latent
    fixed at its guide mean during the recursion (:func:`pyro_dvae.models.use_mean`; the model
    replays those values).

    Returns ``enc_mean``, ``enc_logvar`` (batch, T, L), ``prior_mean``, ``prior_logvar`` (only for
    a learned prior), ``dec_logvar`` (batch, T, F: the decoder output, log sigma^2 for the IS
    likelihood), and per frame (batch, T): ``nll`` = -log p(x_t | z), ``kl`` the analytic
    KL(q || p) that ``TraceMeanField_ELBO`` uses, ``is_`` the Itakura-Saito divergence
    sum_f (x/sigma^2 - log(x/sigma^2) - 1) = nll - sum_f (log x + 1).
    """
    guide_trace = poutine.trace(use_mean(guide)).get_trace(x, u, mask)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(
        x, u, mask)
    T = x.shape[1]
    q = [guide_trace.nodes[f"z_{t + 1}"]["fn"] for t in range(T)]
    p = [model_trace.nodes[f"z_{t + 1}"]["fn"] for t in range(T)]
    obs = [model_trace.nodes[f"x_{t + 1}"]["fn"] for t in range(T)]
    out = {"enc_mean": torch.stack([d.loc for d in q], 1),
           "enc_logvar": torch.stack([2 * d.scale.log() for d in q], 1)}
    p_loc = torch.stack([d.loc for d in p], 1)
    p_scale = torch.stack([d.scale for d in p], 1)
    if not (bool((p_loc == 0).all()) and bool((p_scale == 1).all())):
        out["prior_mean"], out["prior_logvar"] = p_loc, 2 * p_scale.log()
    out["dec_logvar"] = obs[0].seq.params()
    out["nll"] = -torch.stack([d.log_prob(x[:, t]) for t, d in enumerate(obs)], 1)
    out["kl"] = torch.stack([torch.distributions.kl_divergence(qd, pd)
                             for qd, pd in zip(q, p)], 1)
    out["is_"] = out["nll"] - (torch.log(x) + 1).sum(-1)
    return out
