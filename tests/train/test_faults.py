"""What clusters and users do to a run (issue 12): SIGTERM, a second Ctrl-C inside a checkpoint
write, two runs in one folder, stale locks and temporary files, a full disk, NaN gradients, a
checkpoint whose pickle would run code, and the truthful status of history.json."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import pyro
import pyro_dvae.atomic as atomic
import pyro_dvae.train as train
from pyro_dvae import build
from pyro_dvae.models.vae import VAE
from pyro_dvae.train import (CheckpointError, RunFolderBusy, TrainConfig, TrainingInterrupted,
                             fit, load_checkpoint, run_status)
from pyro_dvae.train.rundir import LOCK_NAME, RunFolderLock

from .synthetic import Synthetic
from .test_train import CFG, params_of, small


def _signal_at(guide, k, signum):
    """Send ``signum`` to this process during the k-th training guide call (1-based)."""
    calls, orig = [0], guide.guide

    def guide_fn(*args, **kwargs):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signum)
        return orig(*args, **kwargs)

    guide.guide = guide_fn


def _reference(tmp_path, **cfg):
    model, guide = small()
    hist = fit(model, guide, Synthetic(), Synthetic(seed=1), TrainConfig(**{**CFG, **cfg}),
               tmp_path / "ref", progress=False)
    return params_of(model, guide), hist


def _resume_and_compare(out, expected, ref_hist, **cfg):
    pyro.set_rng_seed(123)
    model, guide = build("srnn", x_dim=6, z_dim=2)
    hist = fit(model, guide, Synthetic(), Synthetic(seed=1), TrainConfig(**{**CFG, **cfg}), out,
               resume=True, progress=False)
    got = params_of(model, guide)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert hist["val_loss"] == ref_hist["val_loss"] and hist["status"] == "finished"


def _no_temporary_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_sigterm_saves_the_position_and_resume_is_exact(tmp_path):
    expected, ref = _reference(tmp_path)
    model, guide = small()
    _signal_at(guide, 6, signal.SIGTERM)  # epoch 2 (4 batches per epoch), second batch
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        fit(model, guide, Synthetic(), Synthetic(seed=1), TrainConfig(**CFG), tmp_path / "b",
            progress=False)
    e = info.value
    assert (e.saved, e.epoch, e.step, e.signum, e.exit_code) == (True, 1, 2, signal.SIGTERM, 143)
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 2)
    assert run_status(tmp_path / "b")[0] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) == handler  # the handler is restored
    _resume_and_compare(tmp_path / "b", expected, ref)


def test_second_ctrl_c_inside_the_checkpoint_write_leaves_nothing_half_written(tmp_path,
                                                                               monkeypatch):
    """The first Ctrl-C stops after the batch; the second lands in the middle of writing last.pt:
    it must not cut the write short nor escape as a bare KeyboardInterrupt."""
    expected, ref = _reference(tmp_path)
    real_save = torch.save
    writes = []

    def save_with_second_ctrl_c(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 2 and not writes:
            f.write(b"PK")  # part of the file is written when the signal lands
            os.kill(os.getpid(), signal.SIGINT)
            writes.append("signalled")
            f.seek(0)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_with_second_ctrl_c)
    model, guide = small()
    _signal_at(guide, 6, signal.SIGINT)
    try:
        fit(model, guide, Synthetic(), Synthetic(seed=1), TrainConfig(**CFG), tmp_path / "b",
            progress=False)
        raised = None
    except KeyboardInterrupt as e:  # (a bare KeyboardInterrupt would be the bug)
        raised = e
    monkeypatch.setattr(torch, "save", real_save)
    assert writes == ["signalled"]
    assert isinstance(raised, TrainingInterrupted) and raised.saved, repr(raised)
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 2)
    assert json.loads((tmp_path / "b" / "history.json").read_text())["status"] == "interrupted"
    assert _no_temporary_files(tmp_path / "b")
    _resume_and_compare(tmp_path / "b", expected, ref)


def test_a_second_run_in_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with RunFolderLock(out):
        assert run_status(out)[0] is None
        model, guide = small()
        with pytest.raises(RunFolderBusy, match=f"in use by another run: pid {os.getpid()} on"):
            fit(model, guide, Synthetic(), None, TrainConfig(**{**CFG, "epochs": 1}), out,
                progress=False)
    assert list(out.iterdir()) == []  # the refused run wrote nothing, the lock is released
    assert str(RunFolderBusy("x")) == "x" and issubclass(RunFolderBusy, CheckpointError)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_and_orphaned_temporary_files_are_taken_over(tmp_path):
    """A killed run leaves its lock file and .NAME.PID[.XXXXXXXX].tmp files: the next run takes
    the lock over and removes the temporary files of dead processes (not those of live ones)."""
    out = tmp_path / "run"
    out.mkdir()
    dead = _dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": os.uname().nodename,
                                             "started": 0, "command": "pyro-dvae fit"}))
    orphans = [f".last.pt.{dead}.tmp", f".best.pt.{dead}.0123abcd.tmp", f".loss.png.{dead}.tmp"]
    for name in orphans:
        (out / name).write_bytes(b"x" * 100)
    live = out / f".eval.json.{os.getppid()}.0123abcd.tmp"  # a live process's: left alone
    live.write_bytes(b"x")
    model, guide = small()
    hist = fit(model, guide, Synthetic(), None, TrainConfig(**{**CFG, "epochs": 1}), out,
               progress=False)
    assert hist["status"] == "finished"
    names = {p.name for p in out.iterdir()}
    assert not names & set(orphans) and live.name in names
    assert LOCK_NAME not in names  # released at the end
    assert run_status(out) == ("finished", "finished")


def test_history_status_is_truthful(tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []

    def spy(*a, **k):  # during the run: running, and the folder is held
        seen.append((run_status(out)[0],
                     json.loads((out / "history.json").read_text())["status"]))
        if len(seen) == 2:
            raise RuntimeError("disk controller on fire\nsecond line")
        return 1.0

    monkeypatch.setattr(train.loop, "evaluate_loss", spy)
    model, guide = small()
    with pytest.raises(RuntimeError, match="on fire"):
        fit(model, guide, Synthetic(), Synthetic(seed=1), TrainConfig(**CFG), out,
            progress=False)
    assert seen == [("running", "running")] * 2
    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "crashed" and history["error"] == "disk controller on fire"
    assert run_status(out)[0] == "crashed" and LOCK_NAME not in os.listdir(out)
    # kill -9 leaves "running" behind; with no live holder of the folder it reads as crashed
    history["status"] = "running"
    (out / "history.json").write_text(json.dumps(history))
    status, why = run_status(out)
    assert status == "crashed" and "no process holds the run folder" in why


class _FillingFile:
    """A binary file that fails with ENOSPC once ``limit`` bytes are written (a full disk)."""

    def __init__(self, f, limit):
        self._f, self.limit, self.written = f, limit, 0

    def write(self, data):
        self.written += len(data)
        if self.written > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class _FullDisk:
    """``open`` for pyro_dvae.atomic: the ``fail_on``-th temporary file for ``name`` (1-based)
    meets a full disk after ``limit`` bytes."""

    def __init__(self, name, fail_on, limit=4096):
        self.name, self.fail_on, self.limit, self.count = name, fail_on, limit, 0

    def __call__(self, path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        if not os.path.basename(path).startswith(f".{self.name}."):
            return f
        self.count += 1
        return _FillingFile(f, self.limit) if self.count == self.fail_on else f


@pytest.mark.parametrize("fail_on", [2, 3])  # the first epoch's last.pt, the second's
def test_full_disk_during_a_checkpoint_gives_one_line_and_the_run_stays_resumable(
        tmp_path, monkeypatch, fail_on):
    expected, ref = _reference(tmp_path)
    out = tmp_path / "b"
    monkeypatch.setattr(atomic, "open", _FullDisk("last.pt", fail_on), raising=False)
    model, guide = small()
    with pytest.raises(CheckpointError) as info:
        fit(model, guide, Synthetic(), Synthetic(seed=1), TrainConfig(**CFG), out,
            progress=False)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message, message
    assert f"keeps the state of epoch {fail_on - 1} after 0 batches" in message, message
    assert "--resume" in message
    monkeypatch.undo()
    assert load_checkpoint(out / "last.pt")["epoch"] == fail_on - 2  # the previous one, intact
    assert _no_temporary_files(out) and LOCK_NAME not in os.listdir(out)
    assert run_status(out)[0] == "crashed"
    _resume_and_compare(out, expected, ref)


class NaNGradientVAE(VAE):
    """A finite loss whose gradient is NaN: 0 * sqrt(u) at u = 0 (d sqrt/du = inf)."""

    def emission(self, z, ctx, x, u):
        p = next(self.decoder.parameters())
        return super().emission(z, ctx, x, u) + 0.0 * torch.sqrt((p - p.detach()).sum())


def test_nan_gradient_with_a_finite_loss_is_not_applied(tmp_path):
    pyro.set_rng_seed(0)
    model = NaNGradientVAE(x_dim=6, z_dim=2)
    _, guide = small("vae")
    guide = type(guide)(model)
    before = params_of(model, guide)
    with pytest.raises(FloatingPointError) as info:
        fit(model, guide, Synthetic(), None, TrainConfig(**CFG), tmp_path / "run",
            progress=False)
    message = str(info.value)
    assert "non-finite gradient" in message and "model.decoder." in message, message
    assert "epoch 1, batch 1" in message and "not updated" in message
    after = params_of(model, guide)
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # Adam never ran: no NaN was written anywhere
    assert run_status(tmp_path / "run")[0] == "crashed"


class LargeGradientVAE(VAE):
    """Finite gradients of 1e19 per element: their norm overflows float32, the values do not."""

    def emission(self, z, ctx, x, u):
        p = next(self.decoder.parameters())
        return super().emission(z, ctx, x, u) + 1e19 * (p - p.detach()).sum()


def test_large_finite_gradients_are_applied(tmp_path):
    pyro.set_rng_seed(0)
    model = LargeGradientVAE(x_dim=6, z_dim=2)
    _, guide = small("vae")
    guide = type(guide)(model)
    assert not torch.isfinite(torch.linalg.vector_norm(torch.full((256,), 1e19)))
    hist = fit(model, guide, Synthetic(), None, TrainConfig(**{**CFG, "epochs": 1}),
               tmp_path / "run", progress=False)
    assert hist["status"] == "finished"


class _RunsCode:
    """A pickle that would run a shell command (``os.system``, a module torch blocks)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_whose_pickle_would_run_code_is_refused_as_such(tmp_path):
    """torch 2.13 words this refusal "unsupported GLOBAL posix.system whose module posix is
    blocked" (not "Unsupported global: ..."): still a refusal, not a corrupt file."""
    marker = tmp_path / "the-pickle-ran"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(info.value)
    assert "refused to load" in message and "pickled Python object (" in message, message
    assert "system" in message and "corrupt" not in message
    assert not marker.exists()


def test_output_files_respect_the_umask(tmp_path):
    model, guide = small()
    old = os.umask(0o022)
    try:
        fit(model, guide, Synthetic(), Synthetic(seed=1), TrainConfig(**{**CFG, "epochs": 1}),
            tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "run").iterdir()}
    assert modes == dict.fromkeys(["config.json", "history.json", "loss.png", "best.pt",
                                   "last.pt"], "0o644"), modes
