"""Training loop: loss decreases, exact resume, checkpoints, early stopping, warm-up, frozen
parameters."""

import json
import os
import signal

import pytest
import torch

import pyro
import pyro_dvae.train as train
from pyro_dvae import build
from pyro_dvae.models.vae import VAE
from pyro_dvae.train import (CheckpointError, TrainConfig, TrainingInterrupted, evaluate_loss,
                             fit, kl_beta, load_checkpoint, load_run)

from .synthetic import Synthetic


def small(name="srnn", **kw):
    pyro.set_rng_seed(0)
    return build(name, x_dim=6, z_dim=2, **kw)


def params_of(model, guide):
    return {**{f"m.{k}": v.detach().clone() for k, v in model.state_dict().items()},
            **{f"g.{k}": v.detach().clone() for k, v in guide.state_dict().items()}}


CFG = dict(epochs=3, batch_size=6, lr=1e-3, patience=20, seed=3)


def test_kl_beta_schedule():
    assert [kl_beta(k, 3, 0) for k in range(3)] == [1.0, 1.0, 1.0]
    # 2 epochs of 2 steps: 1/4, 2/4, 3/4, 1, then 1
    assert [kl_beta(k, 2, 2) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_beta(0, 1, 1) == 1.0


def test_warmup_beta_reaches_the_loss(tmp_path, monkeypatch):
    """The beta of every step really reaches the ELBO; history records the epoch's last beta."""
    seen = []
    orig = train.ELBOS["trace"].differentiable_loss

    def spy(self, model_fn, guide_fn, *args):
        if torch.is_grad_enabled():
            seen.append(args[-1])
        return orig(self, model_fn, guide_fn, *args)

    monkeypatch.setattr(train.ELBOS["trace"], "differentiable_loss", spy)
    model, guide = small("vae")
    hist = fit(model, guide, Synthetic(), Synthetic(seed=1), TrainConfig(**CFG, kl_warmup=2),
               tmp_path / "run", progress=False)
    assert seen == pytest.approx([k / 8 for k in range(1, 9)] + [1.0] * 4)  # 4 batches/epoch
    assert hist["beta"] == [0.5, 1.0, 1.0]


def test_config_validation():
    with pytest.raises(ValueError, match="elbo"):
        TrainConfig(elbo="iwae")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1)


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_training_lowers_validation_loss_synthetic(tmp_path, elbo):
    model, guide = small("srnn")
    hist = fit(model, guide, Synthetic(n=24), Synthetic(n=12, seed=1),
               TrainConfig(epochs=4, batch_size=6, lr=3e-3, elbo=elbo), tmp_path / "run",
               progress=False)
    assert hist["val_loss"][-1] < hist["val_loss"][0] - 0.1
    assert hist["status"] == "finished"
    for f in ("config.json", "history.json", "loss.png", "last.pt", "best.pt"):
        assert (tmp_path / "run" / f).is_file(), f
    on_disk = json.loads((tmp_path / "run" / "history.json").read_text())
    assert on_disk["val_loss"] == hist["val_loss"]
    assert not list((tmp_path / "run").glob(".*tmp")), "temporary files left behind"


def test_training_lowers_validation_loss_builtin_corpus(tmp_path):
    from pyro_dvae.data import load_splits

    splits = load_splits(None, seq_len=50, splits=("train", "val"))
    x_dim = splits["train"].x.shape[-1]
    pyro.set_rng_seed(0)
    model, guide = build("srnn", x_dim=x_dim)
    hist = fit(model, guide, splits["train"], splits["val"],
               TrainConfig(epochs=3, batch_size=16, lr=2e-3), tmp_path / "run", progress=False)
    assert hist["val_loss"][-1] < hist["val_loss"][0]
    assert all(torch.isfinite(torch.tensor(hist["val_loss"])))


def _interrupt_at(guide, k, hard=False):
    """Ctrl-C (SIGINT) during the k-th training batch (validation calls are not counted)."""
    calls = [0]
    orig = guide.guide

    def guide_fn(*args, **kwargs):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == k:
                if hard:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGINT)
        return orig(*args, **kwargs)

    guide.guide = guide_fn


@pytest.mark.parametrize("hard", [False, True])
def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, hard):
    train_set, val_set = Synthetic(), Synthetic(seed=1)
    model, guide = small()
    ref = fit(model, guide, train_set, val_set, TrainConfig(**CFG), tmp_path / "a",
              progress=False)
    expected = params_of(model, guide)

    model, guide = small()
    _interrupt_at(guide, 6, hard)  # epoch 2 (4 batches per epoch), second batch
    with pytest.raises(TrainingInterrupted) as info:
        fit(model, guide, train_set, val_set, TrainConfig(**CFG), tmp_path / "b", progress=False)
    assert info.value.saved and info.value.epoch == 1
    assert info.value.step == (1 if hard else 2)  # a hard interrupt loses the unfinished batch
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, info.value.step)
    assert json.loads((tmp_path / "b" / "history.json").read_text())["status"] == "interrupted"

    pyro.set_rng_seed(123)  # a different global RNG history must not matter
    model, guide = build("srnn", x_dim=6, z_dim=2)
    hist = fit(model, guide, train_set, val_set, TrainConfig(**CFG), tmp_path / "b",
               resume=True, progress=False)
    got = params_of(model, guide)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert hist["val_loss"] == ref["val_loss"]
    assert hist["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-12)


def test_worker_processes_give_the_same_run(tmp_path):
    """num_workers > 0 (a DataLoader) yields the same batches and leaves the RNG stream alone."""
    runs = []
    for workers in (0, 1):
        model, guide = small()
        fit(model, guide, Synthetic(), Synthetic(seed=1),
            TrainConfig(**{**CFG, "epochs": 1}, num_workers=workers), tmp_path / str(workers),
            progress=False)
        runs.append(params_of(model, guide))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_resume_extends_a_finished_run(tmp_path):
    train_set, val_set = Synthetic(), Synthetic(seed=1)
    model, guide = small()
    fit(model, guide, train_set, val_set, TrainConfig(**CFG), tmp_path / "a", progress=False)
    expected = params_of(model, guide)
    model, guide = small()
    fit(model, guide, train_set, val_set, TrainConfig(**{**CFG, "epochs": 1}), tmp_path / "b",
        progress=False)
    model, guide = small()
    fit(model, guide, train_set, val_set, TrainConfig(**CFG), tmp_path / "b", resume=True,
        progress=False)
    got = params_of(model, guide)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_resume_refuses_other_settings_model_or_missing_checkpoint(tmp_path):
    model, guide = small()
    fit(model, guide, Synthetic(), None, TrainConfig(**{**CFG, "epochs": 1}), tmp_path / "a",
        progress=False)
    model, guide = small()
    with pytest.raises(CheckpointError, match="lr"):
        fit(model, guide, Synthetic(), None, TrainConfig(**{**CFG, "lr": 1e-2}), tmp_path / "a",
            resume=True, progress=False)
    model, guide = small("dkf")
    with pytest.raises(CheckpointError, match="'srnn'"):
        fit(model, guide, Synthetic(), None, TrainConfig(**CFG), tmp_path / "a", resume=True,
            progress=False)
    with pytest.raises(CheckpointError, match="no last.pt"):
        fit(model, guide, Synthetic(), None, TrainConfig(**CFG), tmp_path / "empty",
            resume=True, progress=False)
    model, guide = small()
    with pytest.raises(CheckpointError, match="already holds a run"):
        fit(model, guide, Synthetic(), None, TrainConfig(**CFG), tmp_path / "a", progress=False)


class Evil:
    pass


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    model, guide = small()
    fit(model, guide, Synthetic(), None, TrainConfig(**{**CFG, "epochs": 1}), tmp_path / "a",
        progress=False)
    for name in ("last.pt", "best.pt"):
        ck = torch.load(tmp_path / "a" / name, weights_only=True)
        ck["payload"] = Evil()
        torch.save(ck, tmp_path / "a" / name)
    with pytest.raises(CheckpointError, match="pickled Python object"):
        load_checkpoint(tmp_path / "a" / "last.pt")
    model, guide = small()
    with pytest.raises(CheckpointError, match="pickled Python object"):
        fit(model, guide, Synthetic(), None, TrainConfig(**CFG), tmp_path / "a", resume=True,
            progress=False)
    with pytest.raises(CheckpointError, match="pickled Python object"):
        load_run(tmp_path / "a")
    (tmp_path / "a" / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_run(tmp_path / "a")


def test_best_checkpoint_holds_best_epoch_and_early_stopping(tmp_path, monkeypatch):
    """Scripted validation losses: the best is epoch 2; patience 2 stops after epoch 4."""
    scripted = iter([3.0, 1.0, 2.0, 4.0, 5.0, 6.0])
    monkeypatch.setattr(train.loop, "evaluate_loss", lambda *a, **k: next(scripted))
    snapshots = {}

    class Recorder(VAE):
        def frozen_parameters(self, epoch):
            snapshots[epoch] = {k: v.detach().clone() for k, v in self.state_dict().items()}
            return set()

    pyro.set_rng_seed(0)
    model = Recorder(x_dim=6, z_dim=2)
    _, guide = small("vae")
    guide = type(guide)(model)
    hist = fit(model, guide, Synthetic(), Synthetic(seed=1),
               TrainConfig(**{**CFG, "epochs": 10, "patience": 2}), tmp_path / "run",
               progress=False)
    assert hist["epoch"] == [1, 2, 3, 4] and hist["status"] == "early_stopped"
    assert hist["best_epoch"] == 2 and hist["best_val_loss"] == 1.0
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 2
    after_epoch_2 = snapshots[2]  # the state at the start of 0-based epoch 2
    for k, v in best["model"].items():
        assert torch.equal(v, after_epoch_2[k]), k
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert any(not torch.equal(v, last["model"][k]) for k, v in best["model"].items())
    m2, g2, cfg = load_run(tmp_path / "run", "best")
    assert cfg["model"] == "vae"
    for k, v in m2.state_dict().items():
        assert torch.equal(v, after_epoch_2[k])


def test_frozen_parameters_hook_freezes(tmp_path):
    class FrozenDecoderFirst(VAE):
        def frozen_parameters(self, epoch):
            return {n for n, _ in self.named_parameters() if n.startswith("decoder.")} \
                if epoch == 0 else set()

    pyro.set_rng_seed(0)
    model = FrozenDecoderFirst(x_dim=6, z_dim=2)
    guide = small("vae")[1].__class__(model)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    fit(model, guide, Synthetic(), None, TrainConfig(**{**CFG, "epochs": 1}), tmp_path / "a",
        progress=False)
    after1 = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert all(torch.equal(after1[k], init[k]) for k in init if k.startswith("decoder."))
    assert all(not torch.equal(after1[k], init[k]) for k in init if k.startswith("x_out."))
    fit(model, guide, Synthetic(), None, TrainConfig(**{**CFG, "epochs": 2}), tmp_path / "a",
        resume=True, progress=False)
    assert all(not torch.equal(model.state_dict()[k], init[k])
               for k in init if k.startswith("decoder."))

    class Wrong(VAE):
        def frozen_parameters(self, epoch):
            return {"no.such.parameter"}

    model = Wrong(x_dim=6, z_dim=2)
    guide = small("vae")[1].__class__(model)
    with pytest.raises(ValueError, match="no.such.parameter"):
        fit(model, guide, Synthetic(), None, TrainConfig(**CFG), tmp_path / "b", progress=False)


def test_validation_ignores_padded_frames():
    model, guide = small("vae")
    ds = Synthetic(seed=2)
    a = evaluate_loss(model, guide, ds, batch_size=7)
    ds.x[~ds.mask] = 1e3
    b = evaluate_loss(model, guide, ds, batch_size=7)
    assert a == pytest.approx(b, rel=1e-6)


def test_load_run_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_run(tmp_path / "empty")
    model, guide = small()
    fit(model, guide, Synthetic(), None, TrainConfig(**{**CFG, "epochs": 0}), tmp_path / "a",
        progress=False)
    with pytest.raises(CheckpointError, match="no best.pt"):
        load_run(tmp_path / "a")
    fit(model, guide, Synthetic(), None, TrainConfig(**{**CFG, "epochs": 1}), tmp_path / "a",
        resume=True, progress=False)
    m2, g2, cfg = load_run(tmp_path / "a", "last")
    assert (cfg["model"], cfg["guide"]) == ("srnn", "smoothing")
    for k, v in model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    cfg_path = tmp_path / "a" / "config.json"
    cfg["model"] = "dkf"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="holds weights of model 'srnn'"):
        load_run(tmp_path / "a")
    cfg["model"] = "nosuchmodel"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not registered"):
        load_run(tmp_path / "a")
    cfg["model"], cfg["model_options"] = "srnn", {"dim_rnn_h": 32}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_run(tmp_path / "a")
