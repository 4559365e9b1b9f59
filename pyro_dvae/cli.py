"""The ``pyro-dvae`` command line (click).  Thin: parses options, calls library functions, prints.

Commands: ``models`` (the registry), ``fit`` (training, :func:`pyro_dvae.train.fit`),
``check-posterior`` (guide vs exact posterior structure, :func:`pyro_dvae.check_posterior`).  Add a
command with ``@cli.command("name")`` below; report bad input with :class:`click.ClickException`
(one line ``Error: ...``, exit status 1) and library warnings through :func:`echo_warnings`.
"""

from __future__ import annotations

import ast
import inspect
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__

#: the likelihoods of pyro_dvae.distributions.LIKELIHOODS (named here: the CLI starts without torch)
LIKELIHOOD_NAMES = ("is", "gaussian", "bernoulli")

#: fit options a resumed run may change; every other option must match the run's config.json
RESUMABLE_OVERRIDES = ("epochs", "patience", "threads", "num_workers")


@contextmanager
def echo_warnings():
    """Show warnings raised inside as ``Warning: message`` lines on stderr (no source lines)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        old = warnings.showwarning
        warnings.showwarning = lambda message, *args, **kwargs: click.echo(
            f"Warning: {message}", err=True)
        try:
            yield
        finally:
            warnings.showwarning = old


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pyro-dvae")
def cli():
    """pyro-dvae: Dynamical Variational Autoencoders (Girin et al.) as Pyro models and guides."""


# ---- models --------------------------------------------------------------------------------------
@cli.command("models")
def models_cmd():
    """List the registered models and their guides (* = default guide)."""
    from .registry import REGISTRY

    width = max((len(name) for name in REGISTRY), default=0) + 2
    for name, entry in REGISTRY.items():
        click.echo(f"{name:<{width}}{entry.description}")
        guides = ", ".join(f"{g}*" if g == entry.default_guide else g for g in entry.guide_names)
        click.echo(f"{'':<{width}}guides: {guides}")


# ---- fit -----------------------------------------------------------------------------------------
def _parse_model_options(pairs) -> dict:
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise click.ClickException(f"model option {pair!r} is not KEY=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word is a string: -o cell=gru
        options[key] = value
    return options


def _check_model_options(entry, options: dict) -> None:
    reserved = sorted({"x_dim", "u_dim"} & set(options))
    if reserved:
        raise click.ClickException(f"{reserved[0]} is set by the data (x_dim: 257 bins for "
                                   "speech, F for an array file; u_dim: the features of its "
                                   "<split>_u arrays), not by -o")
    sig = inspect.signature(entry.model.__init__)
    architecture = list(getattr(entry.model, "architecture", {}))
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()) and not architecture:
        return
    allowed = [name for name, p in sig.parameters.items()
               if name not in ("self", "x_dim", "likelihood") and p.kind is not p.VAR_KEYWORD]
    allowed += architecture
    unknown = sorted(k for k in options if k not in allowed and k.lower() not in architecture)
    if unknown:
        raise click.ClickException(f"unknown model option {unknown[0]!r} for {entry.name}; "
                                   f"options: {', '.join(allowed)}")
    for key, value in options.items():
        default = sig.parameters[key].default if key in sig.parameters else None
        if isinstance(default, bool) or not isinstance(default, int):
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise click.ClickException(f"-o {key}={value!r}: {key} must be an integer")
        low = 0 if default == 0 else 1
        if key.endswith("_dim") and value < low:
            raise click.ClickException(f"-o {key}={value}: {key} must be >= {low}")


def _check_run_folder(out: Path, resume: bool, writer: bool) -> None:
    """Refuse, before the data is loaded, an ``--out`` that holds another run (unless resuming)
    or that a live run is writing (fit checks again, atomically, when it takes the lock)."""
    from .train.rundir import describe_holder, lock_holder, run_status

    if not resume and (out / "last.pt").exists():
        raise click.ClickException(f"{out} already holds a run ({run_status(out)[1]}); continue "
                                   "it with --resume or choose another --out")
    holder = lock_holder(out) if writer else None  # (torchrun: rank 0 takes the lock)
    if holder is not None:
        raise click.ClickException(f"{out} is in use by another run: {describe_holder(holder)}")


def _try_build(name: str, guide_name: str, kwargs: dict, x_dim: int = 257):
    """``build(name, guide_name, x_dim=x_dim, **kwargs)``, a failure as one line (before the data
    is loaded, with the speech features' 257 bins standing in for x_dim)."""
    from .registry import build

    try:
        return build(name, guide_name, x_dim=x_dim, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as e:
        raise click.ClickException(f"cannot build {name} with options {kwargs}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def _explicit(ctx, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _describe(split: str, ds, arrays: bool = False) -> str:
    padded = len(ds) * ds.seq_len - ds.num_frames
    source = "sequences" if arrays else "utterances"
    shape = ""
    if arrays:
        inputs = f", inputs u of {ds.u_dim}" if getattr(ds, "u", None) is not None else ""
        shape = f" ({ds.x_dim} features{inputs})"
    text = (f"{split}: {len(ds)} sequences of {ds.seq_len} frames{shape} from "
            f"{len(set(ds.names))} {source}; {padded} frames of padding (shorter "
            f"{'sequences' if arrays else 'files'} and the ends of longer ones are zero-padded "
            "and masked)")
    dropped = getattr(ds, "dropped", [])
    if dropped:
        shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3
                                          else "")
        from .data import MIN_FRAMES

        text += (f"; left out {len(dropped)} pieces shorter than {MIN_FRAMES} frames: {shown}")
    return text


def _resume_settings(ctx, out: Path, given: dict) -> dict:
    """The stored settings of the run in ``out``, with the overrides a resume may change."""
    import json

    if not (out / "last.pt").is_file():
        raise click.ClickException(f"{out}: no last.pt to resume from (is it a pyro-dvae run "
                                   "directory that has finished at least one batch?)")
    if not (out / "config.json").is_file():
        raise click.ClickException(f"{out}: no config.json, not a pyro-dvae run directory")
    cfg = json.loads((out / "config.json").read_text())
    if "seq_len" not in cfg or "train" not in cfg:
        raise click.ClickException(f"{out}: config.json was not written by pyro-dvae fit; resume "
                                   "this run with pyro_dvae.train.fit(..., resume=True)")
    train = cfg["train"]
    stored = {"model": cfg.get("model"), "guide": cfg.get("guide"), "data": cfg.get("data"),
              "seq_len": cfg.get("seq_len"), "likelihood": cfg.get("likelihood"),
              "model_option": cfg.get("model_options") or {},
              "batch_size": train.get("batch_size"), "lr": train.get("lr"),
              "elbo": train.get("elbo"), "kl_warmup": train.get("kl_warmup"),
              "clip_norm": train.get("clip_norm"), "seed": train.get("seed"),
              "precision": train.get("precision", "fp32"),
              "epochs": train.get("epochs"), "patience": train.get("patience"),
              "threads": train.get("threads"), "num_workers": train.get("num_workers")}
    for name, value in given.items():
        if name not in stored or not _explicit(ctx, name) or name in RESUMABLE_OVERRIDES:
            continue
        old = stored[name]
        if name == "data" and value is not None:
            value = str(Path(value).expanduser().resolve())
        if value != old:
            if name == "model":
                raise click.ClickException(f"{out} holds a run of model {old!r}, not {value!r}")
            flag = "-o" if name == "model_option" else "--" + name.replace("_", "-")
            allowed = ", ".join("--" + o.replace("_", "-") for o in RESUMABLE_OVERRIDES)
            raise click.ClickException(
                f"{flag} {value!r} differs from the run's {old!r}; --resume continues the run "
                f"as configured (it may change only {allowed})")
    for name in RESUMABLE_OVERRIDES:
        if _explicit(ctx, name):
            stored[name] = given[name]
    return stored


def _training_data(data, opts, say) -> dict:
    """The train and val sets of ``--data`` (audio folder, array file or built-in corpus), checked
    against the chosen likelihood's support."""
    from .data import DataError, is_array_file, load_splits
    from .distributions import get_likelihood

    say(f"data: {'the built-in corpus' if data is None else data}")
    with echo_warnings():
        try:
            splits = load_splits(data, seq_len=opts["seq_len"], splits=("train", "val"),
                                 progress=not opts["quiet"])
            for split, ds in splits.items():  # (the padding holds zeros: in every support)
                get_likelihood(opts["likelihood"]).check_data(ds.x, f"{split} data")
        except (DataError, ValueError) as e:
            raise click.ClickException(str(e)) from None
    for split, ds in splits.items():
        say(_describe(split, ds, is_array_file(data)))
    return splits


def _init_from(ctx, opts: dict):
    """(model, guide, config.json entries) of ``fit --init-from RUN_DIR``: the run's model and
    guide with its best weights; ``opts`` takes the run's model, guide and likelihood, and any
    --model, --guide, --likelihood or -o that contradicts the run is a one-line error."""
    from .train import CheckpointError, load_run

    run_dir = opts["init_from"]
    try:
        model, guide, cfg = load_run(run_dir)
    except CheckpointError as e:
        raise click.ClickException(f"--init-from: {e}") from None
    stored = {"model": cfg["model"], "guide": guide.name, "likelihood": model.likelihood.name}
    for key, value in stored.items():
        if _explicit(ctx, key) and opts[key] != value:
            raise click.ClickException(f"--{key} {opts[key]} conflicts with --init-from "
                                       f"{run_dir}, a run of {key} {value}")
        opts[key] = value
    arch = getattr(model, "arch", {})
    run_options = {"z_dim": cfg.get("z_dim"), "u_dim": cfg.get("u_dim"),
                   **(cfg.get("model_options") or {})}
    for key, value in opts["model_option"].items():
        if key.lower() in arch:
            from .nn import ArchitectureError, resolve_architecture

            try:
                value = resolve_architecture(model.name, arch, {key: value})[key.lower()]
            except ArchitectureError as e:
                raise click.ClickException(str(e)) from None
            same, have = value == arch[key.lower()], arch[key.lower()]
        else:
            same, have = value == run_options.get(key), run_options.get(key)
        if not same:
            raise click.ClickException(f"-o {key}={opts['model_option'][key]!r} conflicts with "
                                       f"--init-from {run_dir}, whose {key} is {have!r} (the "
                                       "architecture is that run's)")
    source = {"run": str(Path(run_dir).expanduser().resolve()), "weights": "best.pt"}
    if cfg.get("source"):
        source["source"] = cfg["source"]
    opts["model_option"] = dict(cfg.get("model_options") or {})
    model.train()
    guide.train()
    return model, guide, {"init_from": source}


def compute_options(f):
    """``--threads`` and ``--device`` of every command that runs a model (:func:`compute`)."""
    f = click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu",
                     show_default=True,
                     help="where the model runs (auto: cuda when torch sees a GPU)")(f)
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="torch CPU threads (default: torch's choice)")(f)


def compute(threads, device: str):
    """Apply ``--threads``, keep freed memory for reuse (:mod:`pyro_dvae.allocator`) and resolve
    ``--device`` (an unavailable one is a one-line error)."""
    import torch

    from .allocator import retain_freed_memory
    from .precision import resolve_device

    retain_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    try:
        return resolve_device(device)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


@cli.command("fit")
@click.option("--model", "model", metavar="NAME", help="Registered model (pyro-dvae models).")
@click.option("--guide", metavar="VARIANT", help="Guide variant (default: the model's).")
@click.option("--data", type=click.Path(), default=None, metavar="DIR|FILE.npz",
              help="Audio folder with train/ val/ (or si_tr_s/ si_dt_05/), or an array file "
                   "FILE.npz (README: array data); default: the built-in corpus.")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4,
              show_default=True, help="Adam learning rate (13.2.2; the authors' released "
                                      "configs used 1e-3).")
@click.option("--seq-len", type=click.IntRange(min=1), default=150, show_default=True,
              help="Frames per training sequence (150 = 2.4 s; at least 2).")
@click.option("--patience", type=click.IntRange(min=0), default=20, show_default=True,
              help="Early stopping: epochs without validation improvement (0 = never stop).")
@click.option("--elbo", type=click.Choice(["trace", "meanfield"]), default="trace",
              show_default=True, help="Trace_ELBO or TraceMeanField_ELBO (analytic KL).")
@click.option("--kl-warmup", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="EPOCHS", help="Raise the KL weight beta linearly from 0 to 1 over "
                                     "EPOCHS epochs.")
@click.option("--clip-norm", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Clip the gradient norm to this value.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@compute_options
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              show_default=True, help="bf16: mixed-precision training (bfloat16 autocast, float32 "
                                      "weights and density sums).")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes.")
@click.option("--out", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Run directory (default: runs/<time>-<model>).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out.")
@click.option("--init-from", "init_from", type=click.Path(path_type=Path), default=None,
              metavar="RUN_DIR", help="Start a new run from the weights (best.pt) of RUN_DIR, "
                                      "with its model, guide and architecture (for example a "
                                      "run written by import-reference).")
@click.option("--likelihood", type=click.Choice(LIKELIHOOD_NAMES), default="is",
              show_default=True, help="Itakura-Saito (Gamma, for power spectrograms), Gaussian, "
                                      "or Bernoulli (logits, for binary data).")
@click.option("-o", "--model-option", "model_option", multiple=True, metavar="KEY=VALUE",
              help="Keyword argument of the model class, repeatable (e.g. -o z_dim=32).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or per-epoch lines.")
@click.pass_context
def fit_cmd(ctx, **opts):
    """Train a model by SVI; writes config.json, history.json, loss.png, best.pt, last.pt."""
    with _sigterm_interrupts() as terminated:
        try:
            _fit(ctx, opts)
        except KeyboardInterrupt:  # (during training fit saves and says so itself)
            by = " by SIGTERM" if terminated else ""
            click.echo(f"Interrupted{by} before training started; nothing was saved", err=True)
            ctx.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))


@contextmanager
def _sigterm_interrupts():
    """SIGTERM and Ctrl-C raise KeyboardInterrupt while fit loads its data (training itself
    handles both signals); yields a list that is non-empty once SIGTERM has arrived."""
    import threading

    terminated = []

    def handler(signum, frame):
        if signum == signal.SIGTERM:
            terminated.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield terminated
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield terminated
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _fit(ctx, opts: dict) -> None:
    import pyro
    import torch

    from .train.distributed import DistributedError, env_rank, exit_now
    from .registry import REGISTRY
    from .train import CheckpointError, TrainConfig, TrainingInterrupted, fit

    if env_rank() != 0:  # torchrun: only rank 0 prints (and writes files, see train.fit)
        opts["quiet"] = True
    opts["model_option"] = _parse_model_options(opts["model_option"])
    init = None
    if opts["init_from"] is not None:
        if opts["resume"]:
            raise click.ClickException("--init-from starts a new run; --resume continues one "
                                       "(give one of them)")
        init = _init_from(ctx, opts)
    if opts["resume"]:
        if opts["out"] is None:
            raise click.ClickException("--resume needs --out DIR, the run to continue")
        out = Path(opts["out"])
        opts.update(_resume_settings(ctx, out, dict(opts)))
    else:
        if opts["model"] is None:
            raise click.ClickException("missing --model NAME (registered: "
                                       f"{', '.join(REGISTRY)})")
        out = Path(opts["out"] or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-"
                   f"{opts['model']}")
    _check_run_folder(out, opts["resume"], env_rank() == 0)
    if opts["seq_len"] < 2:
        raise click.ClickException("--seq-len 1: one-frame sequences have no time steps to "
                                   "relate (the dynamical models would learn no transition); "
                                   "use --seq-len 2 or more (default 150)")
    name = opts["model"]
    if name not in REGISTRY:
        raise click.ClickException(f"unknown model {name!r}; registered models: "
                                   f"{', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    guide_name = opts["guide"] or entry.default_guide
    if guide_name not in entry.guides:
        raise click.ClickException(f"unknown guide {guide_name!r} for model {name!r}; choose "
                                   f"from {', '.join(entry.guides)}")
    _check_model_options(entry, opts["model_option"])
    kwargs = {"likelihood": opts["likelihood"], **opts["model_option"]}
    if init is None:  # bad option values fail before the data is loaded
        _try_build(name, guide_name, kwargs)
    try:
        config = TrainConfig(epochs=opts["epochs"], batch_size=opts["batch_size"], lr=opts["lr"],
                             patience=opts["patience"], elbo=opts["elbo"],
                             kl_warmup=opts["kl_warmup"], clip_norm=opts["clip_norm"],
                             seed=opts["seed"], threads=opts["threads"],
                             num_workers=opts["num_workers"], precision=opts["precision"])
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    device = compute(config.threads, opts["device"])
    say = (lambda *a: None) if opts["quiet"] else (lambda m: click.echo(m, err=True))

    data = None if opts["data"] is None else str(Path(opts["data"]).expanduser().resolve())
    splits = _training_data(data, opts, say)

    pyro.set_rng_seed(config.seed)
    if splits["train"].u is not None:
        kwargs["u_dim"] = splits["train"].u_dim
    if init is not None:
        model, guide, init_meta = init
        data_u = splits["train"].u_dim if splits["train"].u is not None else 0
        if (model.x_dim, model.u_dim) != (splits["train"].x_dim, data_u):
            raise click.ClickException(
                f"--init-from {opts['init_from']}: its model has x_dim {model.x_dim} and u_dim "
                f"{model.u_dim}, the data {splits['train'].x_dim} and {data_u}")
    else:
        model, guide = _try_build(name, guide_name, kwargs, x_dim=splits["train"].x_dim)
    model.to(device)
    guide.to(device)
    meta = {"model_options": opts["model_option"], "data": data, "seq_len": opts["seq_len"]}
    if init is not None:
        meta.update(init_meta)
    say(f"{'resuming' if opts['resume'] else 'training'} {name} (guide {guide_name}) in {out}")
    try:
        with echo_warnings():
            hist = fit(model, guide, splits["train"], splits["val"], config, out,
                       resume=opts["resume"], progress=not opts["quiet"], meta=meta)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    except DistributedError as e:  # torchrun: a rank died or hung; one line, then exit at once
        exit_now(f"Error: {e}", 1)
    except (torch.linalg.LinAlgError, FloatingPointError) as e:
        # a numerical failure inside the model (Pyro appends its trace table: keep line one)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise click.ClickException(
            f"training failed numerically: {first}; {out / 'last.pt'} keeps the last saved "
            f"state (try a lower --lr or --clip-norm, then pyro-dvae fit --resume --out {out})"
        ) from None
    except TrainingInterrupted as e:
        by = "" if e.signum == signal.SIGINT else f" by {signal.Signals(e.signum).name}"
        if e.saved:
            click.echo(f"Interrupted{by} in epoch {e.epoch + 1} after {e.step} batches; saved "
                       f"{out / 'last.pt'}. Continue with: pyro-dvae fit --resume --out {out}",
                       err=True)
        else:
            click.echo(f"Interrupted{by} during an optimiser step; {out / 'last.pt'} keeps the "
                       "last saved state. Continue with: pyro-dvae fit --resume --out "
                       f"{out}", err=True)
        ctx.exit(e.exit_code)  # 130 after Ctrl-C, 143 after SIGTERM
    best = hist.get("best_val_loss")
    say(f"{hist['status'].replace('_', ' ')} after {len(hist['epoch'])} epochs; best epoch "
        f"{hist.get('best_epoch')} (validation {'-' if best is None else f'{best:.4f}'} "
        f"nats/frame); run saved in {out}")


# ---- check-posterior -----------------------------------------------------------------------------
@cli.command("check-posterior")
@click.option("--model", "model", required=True, metavar="NAME",
              help="Registered model (pyro-dvae models).")
@click.option("--guide", metavar="VARIANT", help="Guide variant (default: the model's).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--render", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Also draw the compact model graph and the guide's links, missing ones in gold "
                   "(needs Graphviz).")
@click.option("--steps", type=click.IntRange(min=5, max=20), default=7, show_default=True,
              help="Sequence length T the structure is read at.")
@click.pass_context
def check_posterior_cmd(ctx, model, guide, fmt, render, steps):
    """Derive the exact posterior structure of a model by D-separation and compare its guide.

    The model's compact graph and the guide's dependencies are read from the code (section 4.2)
    by gradients and value interventions at several parameter draws; missing = in the exact
    posterior, not in the guide; extra = in the guide, not in the exact posterior.  Exit status:
    0 every latent consistent, 3 some latent not consistent, 4 no latent shown inconsistent but
    some edge that matters could not be determined, 1 error.
    """
    from .structure import RenderError, StructureError, check_registered

    try:
        report = check_registered(model, guide, steps=steps)
    except KeyError as e:
        raise click.ClickException(e.args[0]) from None
    except StructureError as e:
        raise click.ClickException(str(e)) from None
    click.echo(report.to_json(indent=2) if fmt == "json" else str(report))
    if render:
        try:
            path = report.render(render)
        except RenderError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"graph written to {path}", err=True)
    ctx.exit(report.exit_code)


# ---- speech analysis-resynthesis (13.2): evaluate, resynth, generate ----------------------------
@contextmanager
def speech_errors():
    """Errors of the speech library (bad audio, data or run directory: ``AudioError``,
    ``DataError``, ``CheckpointError``, all ``ValueError``; unreadable paths; a model that cannot
    generate) as one-line ``Error: ...`` messages with exit status 1; warnings as ``Warning:``."""
    try:
        with echo_warnings():
            yield
    except (ValueError, OSError, NotImplementedError) as err:
        raise click.ClickException(" ".join(str(err).split()) or type(err).__name__) from None


_CHECKPOINT_HELP = "run directory written by 'pyro-dvae fit' (config.json and best.pt)"


def _require_speech(config: dict, run_dir, command: str) -> None:
    """``resynth`` and ``generate`` write audio: refuse a run trained on other data (one line)."""
    from .data import N_FREQ, is_array_file

    x_dim = config.get("x_dim")
    if is_array_file(config.get("data")) or x_dim != N_FREQ:
        raise ValueError(f"{run_dir} was trained on {config.get('data')} ({x_dim} features per "
                         f"frame), not on speech spectrograms ({N_FREQ} bins): {command} writes "
                         "audio; use evaluate for other data")


@cli.command("evaluate")
@click.option("--checkpoint", "run_dir", required=True, type=click.Path(path_type=Path),
              help=_CHECKPOINT_HELP)
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="audio folder with the split, or an array file FILE.npz (default: the data the "
                   "run was trained on)")
@click.option("--split", default="test", show_default=True, help="split to evaluate")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="JSON file (default RUN_DIR/eval_SPLIT.json); for speech the CSV goes beside it")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="worker processes for the metrics (0: in this process)")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="weights to use")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--nll", is_flag=True,
              help="instead: the importance-weighted bound on the test log-likelihood (NLL per "
                   "time step, Burda et al. 2016); JSON default RUN_DIR/nll_SPLIT.json")
@click.option("--particles", "K", type=click.IntRange(min=1), default=100, show_default=True,
              help="with --nll: guide samples K per sequence")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="with --nll: seed of the guide samples")
@compute_options
@click.pass_context
def evaluate_cmd(ctx, run_dir, data, split, out, workers, which, progress, nll, K, seed, threads,
                 device):
    """Resynthesise every utterance of a split and score it (RMSE, PESQ, STOI, SI-SDR; 13.2.3);
    for array data (.npz) the VLB per time step and per sequence; with --nll bound the
    log-likelihood with K guide samples per sequence."""
    device = compute(threads, device)
    if nll:
        if _explicit(ctx, "workers"):
            raise click.ClickException("--workers is for the resynthesis metrics, not --nll")
        return _evaluate_nll(run_dir, data, split, out, which, progress, K, seed, device)
    for name in ("K", "seed"):
        if _explicit(ctx, name):
            flag = "--particles" if name == "K" else "--seed"
            raise click.ClickException(f"{flag} needs --nll")
    if _array_run(run_dir, data):
        if _explicit(ctx, "workers"):
            raise click.ClickException("--workers is for the resynthesis metrics of speech")
        return _evaluate_vlb(run_dir, data, split, out, which, progress, device)
    from .speech import evaluate_run, format_table

    with speech_errors():
        result = evaluate_run(run_dir, data, split, out, workers=workers, progress=progress,
                              which=which, device=device)
    label = f"{result['model']} ({result['guide']})"
    where = "the built-in corpus" if result["data"] is None else result["data"]
    click.echo(f"{result['n_files']} utterances of {split} in {where}, {which}.pt of {run_dir}\n")
    click.echo("mean:\n" + format_table({label: result["summary"]}) + "\n")
    click.echo("median [95 % CI]:\n" + format_table({label: result["summary"]}, "median") + "\n")
    click.echo(f"per-file metrics and summary: {result['json']}, {result['csv']}")


def _array_run(run_dir: Path, data) -> bool:
    """Whether ``evaluate`` reads an array file: ``--data``, else the data of the run."""
    import json

    if data is None:
        try:
            data = json.loads((Path(run_dir) / "config.json").read_text()).get("data")
        except (OSError, ValueError, AttributeError):
            return False  # the speech path reports the unusable run directory
    from .data import is_array_file

    return is_array_file(data)


def _evaluate_vlb(run_dir, data, split, out, which, progress, device):
    """``evaluate`` of non-speech data: the VLB of the whole sequences, per time step and per
    sequence (one guide sample each: the bound of ``evaluate --nll`` with K = 1)."""
    from .nll import evaluate_run_nll

    out = Path(run_dir) / f"eval_{split}.json" if out is None else out
    with speech_errors():
        try:
            r = evaluate_run_nll(run_dir, data, split, 1, out, which=which, progress=progress,
                                 device=device)
        except FloatingPointError as err:
            raise click.ClickException(str(err)) from None
    click.echo(f"{r['num_sequences']} sequences ({r['num_frames']} steps) of {split} in "
               f"{r['data']}, {which}.pt of {run_dir}")
    click.echo(f"VLB per time step: {r['log_px_per_step']:.4f} nats; per sequence: "
               f"{r['log_px_per_sequence']:.3f} nats (one guide sample per sequence; the "
               "importance-weighted test log-likelihood: --nll)")
    click.echo(f"per-sequence values: {r['json']}")


def _evaluate_nll(run_dir, data, split, out, which, progress, K, seed, device):
    from .nll import evaluate_run_nll

    with speech_errors():
        try:
            r = evaluate_run_nll(run_dir, data, split, K, out, which=which, seed=seed,
                                 progress=progress, device=device)
        except FloatingPointError as err:
            raise click.ClickException(str(err)) from None
    se = r["std_error_per_step"]
    where = "the built-in corpus" if r["data"] is None else r["data"]
    click.echo(f"{r['num_sequences']} sequences ({r['num_frames']} frames) of {split} in {where}, "
               f"{which}.pt of {run_dir}, K = {K} guide samples per sequence")
    click.echo(f"NLL per time step: {r['nll_per_step']:.4f}"
               + ("" if se is None else f" ± {se:.4f}") + " nats (importance-weighted bound)")
    click.echo(f"log p(x) per sequence >= {r['log_px_per_sequence']:.3f}"
               + ("" if r["std_error_per_sequence"] is None
                  else f" ± {r['std_error_per_sequence']:.3f}") + " nats")
    click.echo(f"ELBO per time step: {r['elbo_per_step']:.4f} nats; median effective sample "
               f"size {r['ess_median']:.1f} of {K}")
    click.echo(f"per-sequence values: {r['json']}")


@cli.command("resynth")
@click.option("--checkpoint", "run_dir", required=True, type=click.Path(path_type=Path),
              help=_CHECKPOINT_HELP)
@click.argument("in_path", metavar="IN.wav", type=click.Path(path_type=Path))
@click.argument("out_path", metavar="OUT.wav", type=click.Path(path_type=Path))
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="save original and reconstructed spectrograms side by side (PNG)")
@compute_options
def resynth_cmd(run_dir, in_path, out_path, plot, threads, device):
    """Analysis-resynthesis of one audio file (any rate and channels in; 16 kHz mono out)."""
    from . import metrics
    from .speech import resynth_file
    from .train import load_run

    device = compute(threads, device)
    with speech_errors():
        model, guide, config = load_run(run_dir, device=device)
        _require_speech(config, run_dir, "resynth")
        result = resynth_file(model, guide, in_path, out_path, plot)
    seconds = result.wave.size / 16000
    click.echo(f"wrote {out_path} ({seconds:.2f} s)" + (f" and {plot}" if plot else "")
               + f"; RMSE {metrics.rmse(result.original, result.wave):.4f}, "
               f"SI-SDR {metrics.si_sdr(result.original, result.wave):.1f} dB against the input")


@cli.command("generate")
@click.option("--checkpoint", "run_dir", required=True, type=click.Path(path_type=Path),
              help=_CHECKPOINT_HELP)
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), required=True,
              help="length of each sample")
@click.option("--n", "n", type=click.IntRange(min=1), default=1, show_default=True,
              help="number of samples")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--griffin-lim-iters", type=click.IntRange(min=0), default=100, show_default=True,
              help="Griffin-Lim iterations for the phase")
@click.argument("out_dir", type=click.Path(path_type=Path))
@compute_options
def generate_cmd(run_dir, seconds, n, seed, griffin_lim_iters, out_dir, threads, device):
    """Sample speech from the model's prior; phase by Griffin-Lim; WAV files into OUT_DIR."""
    from .speech import generate_waves, save_waves
    from .train import load_run

    device = compute(threads, device)
    with speech_errors():
        model, _, config = load_run(run_dir, device=device)
        _require_speech(config, run_dir, "generate")
        waves = generate_waves(model, seconds, n, n_iter=griffin_lim_iters, seed=seed)
        paths = save_waves({Path(out_dir) / f"{config['model']}_{seed}_{i:03d}.wav": w
                            for i, w in enumerate(waves)})
    click.echo(f"wrote {len(paths)} file(s) of {waves[0].size / 16000:.2f} s to {out_dir}")


# ---- the authors' checkpoints --------------------------------------------------------------------
@cli.command("import-reference")
@click.argument("checkpoint", metavar="CHECKPOINT.pt", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), metavar="RUN_DIR",
              help="run directory to write (must not exist yet, or be empty)")
@click.option("--config", "config", type=click.Path(path_type=Path), default=None,
              metavar="CONFIG.ini", help="the run's config.ini (default: next to the checkpoint)")
def import_reference_cmd(checkpoint, out, config):
    """Convert one of the authors' DVAE-speech checkpoints into a pyro-dvae run directory.

    Every tensor is mapped by name with its shape checked; the layer sizes come from config.ini.
    The run directory works with evaluate, resynth, generate, load_run and fit --init-from.
    """
    import json

    from .reference import ReferenceError, import_reference

    try:
        with echo_warnings():
            path = import_reference(checkpoint, out, config)
    except (ReferenceError, OSError) as e:
        raise click.ClickException(" ".join(str(e).split()) or type(e).__name__) from None
    cfg = json.loads((path / "config.json").read_text())
    click.echo(f"imported {cfg['source']['tag'] or cfg['model']} ({cfg['source']['tensors']} "
               f"tensors) as {cfg['model']} with guide {cfg['guide']} into {path}")


def main(argv=None) -> None:
    """Console entry point ``pyro-dvae`` (also ``python -m pyro_dvae.cli``)."""
    cli.main(args=argv, prog_name="pyro-dvae")


if __name__ == "__main__":
    sys.exit(main())
