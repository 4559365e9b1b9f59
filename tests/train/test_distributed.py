"""Data-parallel training (pyro_dvae.distributed): gloo processes on localhost, spawned here.

The processes get the environment torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and run this file as a script (``_worker``), so a test can pause or kill
one rank.  The model is a tiny SRNN in float64, so "the same computation" can be checked to 1e-9
against an independent single-process reference (gradient accumulation over the ranks' shards,
each with its own RNG stream, the shards drawn with torch's own DistributedSampler).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pyro
from pyro_dvae import build
from pyro_dvae.train.distributed import (DistributedBatchSampler, batch_seed, rank_seed,
                                   sharded_loss_sums)
from pyro_dvae.train import CheckpointError, epoch_permutation, fit, load_checkpoint

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE.parent))  # also run as a script by the worker processes
import synthetic as _synthetic  # noqa: E402
# n = 11 sequences with 2 ranks: every epoch is padded by one sequence (DistributedSampler's rule)
SPEC = {"n_train": 11, "n_val": 7, "epochs": 2, "batch_size": 3, "lr": 1e-2, "seed": 3}
RUN_FILES = {"config.json", "history.json", "loss.png", "best.pt", "last.pt"}


def Synthetic(n, seed):
    """The training tests' toy data (synthetic.py) in float64."""
    return _synthetic.Synthetic(n, seed, dtype=torch.float64)


def tiny_model():
    pyro.set_rng_seed(0)
    model, guide = build("srnn", x_dim=6, z_dim=2)
    return model.double(), guide.double()


def state_of(model, guide):
    return {**{f"m.{k}": v.detach().clone() for k, v in model.state_dict().items()},
            **{f"g.{k}": v.detach().clone() for k, v in guide.state_dict().items()}}


# ---- the worker (one rank) -----------------------------------------------------------------------
def _worker(spec_json: str) -> None:
    """One rank of a run: fit the tiny model, save its final weights to scratch/rank{RANK}.pt."""
    from pyro_dvae.train.distributed import DistributedError
    from pyro_dvae.train import TrainConfig, TrainingInterrupted

    spec = json.loads(spec_json)
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model, guide = tiny_model()
    if spec.get("pause_epoch") is not None and rank == spec["pause_rank"]:
        def frozen_parameters(epoch):  # called at the start of every epoch
            if epoch == spec["pause_epoch"]:
                Path(spec["marker"]).write_text("paused")
                time.sleep(spec.get("pause_seconds", 300))
            return set()

        model.frozen_parameters = frozen_parameters
    if spec.get("short_timeout") is not None and rank == 0:
        def frozen_parameters(epoch):  # rank 0 waits only this long from the pause epoch on
            if epoch == spec["pause_epoch"]:
                from datetime import timedelta

                from torch.distributed.distributed_c10d import _set_pg_timeout

                _set_pg_timeout(timedelta(seconds=spec["short_timeout"]))
                Path(spec["marker"] + ".rank0").write_text(repr(time.monotonic()))
            return set()

        model.frozen_parameters = frozen_parameters
    config = TrainConfig(epochs=spec["epochs"], batch_size=spec["batch_size"], lr=spec["lr"],
                         seed=spec["seed"])
    try:
        fit(model, guide, Synthetic(spec["n_train"], 0), Synthetic(spec["n_val"], 1), config,
            spec["out"], resume=spec.get("resume", False), progress=spec.get("progress", False))
    except DistributedError as e:
        print(f"Error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # skip the process group's destructor, which may wait for a hung peer
    except TrainingInterrupted as e:
        print(f"interrupted epoch={e.epoch} step={e.step} saved={e.saved}", file=sys.stderr)
        sys.exit(130)
    torch.save(state_of(model, guide), Path(spec["scratch"]) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, world: int = 2, timeout: float = 20.0):
    """Start ``world`` worker processes as torchrun would; returns the Popen objects."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYRO_DVAE_DIST_TIMEOUT": str(timeout),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, str(HERE), json.dumps(spec)], env=env,
                                      cwd=str(ROOT), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout: float = 120.0):
    """Wait for every process; returns [(returncode, stderr)]."""
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def run_two(tmp: Path, name: str, **extra) -> Path:
    out, scratch = tmp / name, tmp / f"{name}-scratch"
    scratch.mkdir()
    results = finish(launch({**SPEC, "out": str(out), "scratch": str(scratch), **extra}))
    for code, err in results:
        assert code == 0, err
    return out


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A 2-process run of SPEC: (run directory, its scratch folder with each rank's weights)."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = run_two(tmp, "run")
    return out, tmp / "run-scratch"


# ---- the independent single-process reference ----------------------------------------------------
def reference_run(spec: dict, world: int):
    """The data-parallel algorithm in one process: for every global batch, each virtual rank r
    computes the ELBO of its shard (torch's DistributedSampler over the epoch's order) with its own
    RNG stream; the gradients of loss_r / (N T world) are accumulated; one Adam step."""
    train, val = Synthetic(spec["n_train"], 0), Synthetic(spec["n_val"], 1)
    n, b, seed = len(train), spec["batch_size"], spec["seed"]
    model, guide = tiny_model()
    params = list({id(p): p for p in [*model.parameters(), *guide.parameters()]}.values())
    optim = torch.optim.Adam(params, lr=spec["lr"])
    elbo = pyro.infer.Trace_ELBO()
    states = []
    for r in range(world):
        pyro.set_rng_seed(rank_seed(seed, r))
        states.append(torch.get_rng_state())
    history = {"train_loss": [], "val_loss": []}
    with pyro.validation_enabled(False):
        for e in range(spec["epochs"]):
            perm = epoch_permutation(n, seed, e)
            shards = []
            for r in range(world):
                sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world,
                                                              rank=r, shuffle=False)
                mine = [int(perm[i]) for i in sampler]
                shards.append([mine[i:i + b] for i in range(0, len(mine), b)])
            total, frames = 0.0, 0
            for k in range(len(shards[0])):
                optim.zero_grad()
                for r in range(world):
                    idx = torch.tensor(shards[r][k])
                    x, mask = train.x[idx], train.mask[idx]
                    torch.set_rng_state(states[r])
                    loss = elbo.differentiable_loss(model.model, guide, x, None,
                                                    None if mask.all() else mask, n, 1.0)
                    (loss / (n * x.shape[1] * world)).backward()
                    states[r] = torch.get_rng_state()
                    total += float(loss.detach()) * len(idx) / n
                    frames += int(mask.sum())
                optim.step()
            history["train_loss"].append(total / frames)
            vt, vf = sharded_loss_sums(model, guide, val, "trace", b, seed, rank=0, world_size=1)
            history["val_loss"].append(vt / vf)
    return state_of(model, guide), history


# ---- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,b,world", [(11, 3, 2), (12, 3, 2), (10, 4, 3), (2, 2, 3), (7, 1, 4)])
def test_sampler_shards_global_batches_like_distributed_sampler(n, b, world):
    for epoch in (0, 5):
        order = epoch_permutation(n, 7, epoch)
        ranks = []
        for r in range(world):
            s = DistributedBatchSampler(n, b, r, world, seed=7)
            s.set_epoch(epoch)
            ranks.append(list(s))
            assert len(ranks[-1]) == len(s)
            ref = [int(order[i]) for i in torch.utils.data.DistributedSampler(
                range(n), num_replicas=world, rank=r, shuffle=False)]
            assert [i for batch in ranks[-1] for i in batch] == ref
        for k in range(len(ranks[0])):  # a step: equal shares, together one global batch
            assert len({len(rb[k]) for rb in ranks}) == 1
        padded = sum(len(batch) for rb in ranks for batch in rb)
        assert set().union(*(set(batch) for rb in ranks for batch in rb)) == set(range(n))
        assert padded == -(-n // world) * world
    a, b2 = DistributedBatchSampler(n, b, 0, world, 7), DistributedBatchSampler(n, b, 0, world, 7)
    a.set_epoch(0)
    b2.set_epoch(1)
    assert n < 3 or list(a) != list(b2), "the epoch must reshuffle"


def test_sharded_validation_does_not_depend_on_world_size():
    model, guide = tiny_model()
    val = Synthetic(10, 1)
    one = sharded_loss_sums(model, guide, val, batch_size=3, seed=5)
    for world in (2, 3, 5):
        parts = [sharded_loss_sums(model, guide, val, batch_size=3, seed=5, rank=r,
                                   world_size=world) for r in range(world)]
        assert sum(p[1] for p in parts) == one[1]
        assert sum(p[0] for p in parts) == pytest.approx(one[0], rel=1e-12)
    assert batch_seed(5, 0) != batch_seed(5, 1) and rank_seed(5, 0) != rank_seed(5, 1)


def test_two_ranks_end_with_bit_identical_parameters(two_rank_run):
    _, scratch = two_rank_run
    a, b = torch.load(scratch / "rank0.pt"), torch.load(scratch / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_ranks_match_the_single_process_reference(two_rank_run):
    out, scratch = two_rank_run
    expected, ref_history = reference_run(SPEC, world=2)
    got = torch.load(scratch / "rank0.pt")
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2] and history["status"] == "finished"
    assert history["train_loss"] == pytest.approx(ref_history["train_loss"], rel=1e-9)
    assert history["val_loss"] == pytest.approx(ref_history["val_loss"], rel=1e-9)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-9, atol=1e-12, msg=k)
    # and training moved the parameters (the comparison is not between two initialisations)
    init = state_of(*tiny_model())
    assert any(not torch.allclose(init[k], v) for k, v in expected.items())


def test_only_rank_zero_writes(two_rank_run):
    out, scratch = two_rank_run
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert {p.name for p in scratch.iterdir()} == {"rank0.pt", "rank1.pt"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["distributed"] == {"world_size": 2, "backend": "gloo", "batch_size_per_rank": 3,
                                  "global_batch_size": 6}
    last = load_checkpoint(out / "last.pt")
    assert last["world_size"] == 2 and len(last["rng_states"]) == 2
    assert not torch.equal(last["rng_states"][0], last["rng_states"][1])


def test_single_process_cannot_resume_a_two_process_run(two_rank_run, tmp_path):
    import shutil

    out, _ = two_rank_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    model, guide = tiny_model()
    from pyro_dvae.train import TrainConfig

    cfg = TrainConfig(**{k: SPEC[k] for k in ("epochs", "batch_size", "lr", "seed")})
    with pytest.raises(CheckpointError, match=r"number of processes \(2 -> 1\)"):
        fit(model, guide, Synthetic(11, 0), None, cfg, copy, resume=True, progress=False)


def _paused_run(tmp: Path, name: str, timeout: float, **extra):
    """A 2-process run whose rank 1 hangs at the start of its second epoch (after last.pt of
    epoch 1 is written); returns (procs, out, scratch) once rank 1 is paused."""
    out, scratch, marker = tmp / name, tmp / f"{name}-scratch", tmp / f"{name}.paused"
    scratch.mkdir()
    procs = launch({**SPEC, "out": str(out), "scratch": str(scratch), "pause_rank": 1,
                    "pause_epoch": 1, "marker": str(marker), **extra}, timeout=timeout)
    deadline = time.monotonic() + 90
    while not marker.exists():
        assert time.monotonic() < deadline, "rank 1 never reached the pause"
        assert procs[0].poll() is None, procs[0].communicate()[1]
        time.sleep(0.05)
    return procs, out, scratch


def test_killed_rank_stops_the_other_and_resume_continues(two_rank_run, tmp_path):
    procs, out, scratch = _paused_run(tmp_path, "run", timeout=60)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    (code0, err0), _ = finish(procs, timeout=30)
    assert time.monotonic() - t0 < 15  # a dead peer is noticed at once, not at the timeout
    assert code0 == 1
    lines = [line for line in err0.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: rank 0 of 2: lost contact"), err0
    assert "--resume" in lines[0] and "after epoch 1" in lines[0]
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert json.loads((out / "history.json").read_text())["epoch"] == [1]

    results = finish(launch({**SPEC, "out": str(out), "scratch": str(scratch), "resume": True}))
    assert all(code == 0 for code, _ in results), results
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2] and history["status"] == "finished"
    # the resumed run ends exactly where the uninterrupted run of the fixture ended
    ref_out, ref_scratch = two_rank_run
    expected = torch.load(ref_scratch / "rank0.pt")
    for r in (0, 1):
        got = torch.load(scratch / f"rank{r}.pt")
        for k, v in expected.items():
            assert torch.equal(got[k], v), (r, k)
    assert history["train_loss"] == json.loads((ref_out / "history.json").read_text())[
        "train_loss"]


@pytest.mark.slow
def test_ctrl_c_on_one_rank_stops_all_at_the_same_batch_and_resume_is_exact(two_rank_run,
                                                                             tmp_path):
    """SIGINT (what torchrun forwards on Ctrl-C) reaches rank 0 while rank 1 is still busy: both
    stop after the same batch, last.pt holds that mid-epoch state, and --resume ends exactly where
    the uninterrupted run ended."""
    procs, out, scratch = _paused_run(tmp_path, "run", timeout=60, pause_seconds=2)
    procs[0].send_signal(signal.SIGINT)
    results = finish(procs, timeout=60)
    assert [code for code, _ in results] == [130, 130], results
    assert "interrupted epoch=1 step=1 saved=True" in results[0][1]
    assert "interrupted epoch=1 step=1 saved=True" in results[1][1]
    last = load_checkpoint(out / "last.pt")
    assert (last["epoch"], last["step"]) == (1, 1) and last["partial_frames"] > 0
    assert json.loads((out / "history.json").read_text())["status"] == "interrupted"

    results = finish(launch({**SPEC, "out": str(out), "scratch": str(scratch), "resume": True}))
    assert all(code == 0 for code, _ in results), results
    ref_out, ref_scratch = two_rank_run
    expected = torch.load(ref_scratch / "rank0.pt")
    for r in (0, 1):
        got = torch.load(scratch / f"rank{r}.pt")
        for k, v in expected.items():
            assert torch.equal(got[k], v), (r, k)
    history = json.loads((out / "history.json").read_text())
    ref = json.loads((ref_out / "history.json").read_text())
    assert history["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-12)
    assert history["val_loss"] == ref["val_loss"]


def test_hung_rank_makes_the_other_time_out(tmp_path):
    """Rank 1 hangs at the start of epoch 2; rank 0 gives up after its collective timeout with one
    line of its own (not glued to its progress bar).  The whole run has a generous timeout, and
    rank 0 shortens its own to 5 s only when epoch 2 begins, so a slow machine cannot make an
    earlier collective time out; the 5 s are measured from that moment, in rank 0's clock."""
    procs, out, _ = _paused_run(tmp_path, "run", timeout=120, short_timeout=5, progress=True)
    try:
        _, err0 = procs[0].communicate(timeout=120)
        t_end = time.monotonic()
    finally:
        procs[1].kill()
        finish(procs)
    t_short = float(Path(str(tmp_path / "run.paused") + ".rank0").read_text())
    assert 5 <= t_end - t_short < 100
    assert procs[0].returncode == 1
    assert "Error: rank 0 of 2: lost contact" in err0 and "imed out" in err0, err0
    before = err0.split("Error: rank 0 of 2")[0]
    assert before.endswith("\n") or before.rstrip(" ").endswith("\r"), repr(before[-200:])
    assert before.rsplit("\n", 1)[-1].rsplit("\r", 1)[-1].strip() == ""  # the bar was cleared
    assert "epoch 1/2" in err0  # (the bar was shown)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


@pytest.mark.slow
def test_a_rank_that_torchrun_terminates_says_so(tmp_path):
    """torchrun answers the death of one rank by sending SIGTERM to the others: the survivor
    prints a pyro-dvae line about it (then stops with the lost-contact error), instead of dying
    silently."""
    procs, out, _ = _paused_run(tmp_path, "run", timeout=60, pause_seconds=3)
    procs[0].send_signal(signal.SIGKILL)
    procs[1].send_signal(signal.SIGTERM)
    (_, _), (code1, err1) = finish(procs, timeout=60)
    assert "pyro-dvae: rank 1 of 2: SIGTERM received; stopping after this batch" in err1, err1
    assert code1 == 1 and "Error: rank 1 of 2: lost contact" in err1, err1
    assert "Traceback" not in err1


@pytest.fixture
def audio_dir(tmp_path):
    """train/ and val/ with a few short harmonic tones, 16 kHz wav."""
    import numpy as np
    import soundfile as sf

    root = tmp_path / "audio"
    for split, count in (("train", 4), ("val", 2)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            t = np.arange(int((0.5 + 0.2 * i) * 16000)) / 16000
            wave = sum(np.sin(2 * np.pi * k * (150 + 30 * i) * t) / k for k in range(1, 6)) / 4
            sf.write(root / split / f"{split}{i}.wav", wave.astype(np.float32), 16000)
    return root


def torchrun(*args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYRO_DVAE_DIST_TIMEOUT": "60",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "pyro_dvae.cli", "fit", *map(str, args)]
    return subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.slow
def test_torchrun_cli_fit_and_resume(tmp_path, audio_dir):
    """The real launcher: torchrun -m pyro_dvae.cli fit, then --resume with more epochs."""
    out = tmp_path / "run"
    common = ["--data", audio_dir, "--out", out, "--threads", "1"]
    proc = torchrun("--model", "vae", "--epochs", "1", "--seq-len", "20", "--batch-size", "2",
                    *common)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert proc.stderr.count(f"training vae (guide frame) in {out}") == 1  # rank 0 only prints
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["distributed"]["global_batch_size"] == 4
    proc = torchrun("--resume", "--epochs", "2", "-q", *common)
    assert proc.returncode == 0, proc.stderr
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2] and history["status"] == "finished"
    assert {p.name for p in out.iterdir()} == RUN_FILES


if __name__ == "__main__":
    _worker(sys.argv[1])
