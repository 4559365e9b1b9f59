"""Atomic writes (pyro_dvae.atomic): the umask is respected by every output file (fit, evaluate,
resynth, generate, save_audio, the feature cache), a full disk is reported as such, and the
temporary files of dead processes are recognised."""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from pyro_dvae.atomic import atomic_write, create_temp, create_temp_dir, remove_orphans
from pyro_dvae.data import load_splits, save_audio
from pyro_dvae.speech import AtomicFiles


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return path.stat().st_mode & 0o777


def test_atomic_write_and_temp_files_respect_the_umask(tmp_path, umask):
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"abc"))
    assert (tmp_path / "a.bin").read_bytes() == b"abc" and mode(tmp_path / "a.bin") == 0o666 & ~umask
    tmp = create_temp(tmp_path / "b.txt")
    assert mode(tmp) == 0o666 & ~umask and tmp.name.startswith(f".b.txt.{os.getpid()}.")


def test_temporary_folders_respect_the_umask(tmp_path, umask):
    """import-reference builds a run folder under a temporary name, then renames it."""
    folder = create_temp_dir(tmp_path / "run")
    assert folder.is_dir() and mode(folder) == 0o777 & ~umask


def test_speech_outputs_respect_the_umask(tmp_path, umask):
    """evaluate, resynth and generate write through AtomicFiles."""
    with AtomicFiles() as files:
        files.temp(tmp_path / "out" / "result.json").write_text("{}")
        files.temp(tmp_path / "out" / "result.csv").write_text("")
        files.commit()
    for name in ("result.json", "result.csv"):
        assert mode(tmp_path / "out" / name) == 0o666 & ~umask, name
    save_audio(tmp_path / "x.wav", np.zeros(160, np.float32))
    assert mode(tmp_path / "x.wav") == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_feature_cache_respects_the_umask(tmp_path, umask):
    for split in ("train", "val"):
        (tmp_path / "audio" / split).mkdir(parents=True)
        t = np.arange(8000) / 16000
        sf.write(tmp_path / "audio" / split / "a.wav", np.sin(2 * np.pi * 200 * t) / 2, 16000)
    load_splits(tmp_path / "audio", seq_len=20, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 2 and all(mode(p) == 0o666 & ~umask for p in files)


def test_a_full_disk_is_reported_as_such_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "c.pt").write_bytes(b"old")

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):  # what a full disk does to every write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    with pytest.raises(OSError) as info:  # not torch's "unexpected pos" RuntimeError
        atomic_write(tmp_path / "c.pt", lambda f: torch.save({"w": torch.zeros(1000)}, Full(f)))
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert (tmp_path / "c.pt").read_bytes() == b"old"


def test_remove_orphans_keeps_the_files_of_live_processes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead, live = proc.pid, os.getppid()
    names = [f".a.pt.{dead}.tmp", f".b.png.{dead}.deadbeef.tmp", f".c.json.{live}.deadbeef.tmp",
             f".d.pt.{os.getpid()}.deadbeef.tmp", "e.tmp", f"f.{dead}.tmp"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    removed = sorted(p.name for p in remove_orphans(tmp_path))
    assert removed == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
