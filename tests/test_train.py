"""Training runs on real MNIST: divergence, collapse, determinism and resuming after a kill."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
import torch

from beyond_eos.config import RunConfig
from beyond_eos.train import Trainer, log_steps, train

OFF = dict(taylor_every=0, taylor_full_points=0, sharpness_points=0)


@pytest.fixture
def tiny(mnist_root):
    """A small but real run: 8 hidden layers, 256 MNIST images, batches of 32."""
    return RunConfig(
        r=1, scaling="normalized", eta=0.5, seed=0, data_root=str(mnist_root),
        n_train=256, n_test=200, width=4, batch_size=32, epochs=2, probe_size=64,
        measure_every=3, device="cpu", **OFF,
    )


def read(path):
    return path.read_bytes()


def test_log_steps_start_at_zero_and_stay_in_range():
    steps = log_steps(2340, 12)
    assert steps[0] == 0 and steps[-1] == 2339 and len(steps) <= 12
    assert log_steps(100, 0) == []


def test_huge_eta_diverges_without_raising(tiny, tmp_path):
    cfg = replace(tiny, scaling="none", eta=1e6)
    summary = train(cfg, tmp_path)
    assert summary["status"] == "diverged"
    assert summary["diverged_step"] is not None
    assert summary["test_acc"] is None  # a diverged run has no final accuracy
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert int(rows[-1]["step"]) == summary["diverged_step"]
    assert not (tmp_path / "checkpoint.pt").exists()


def test_same_seed_same_bytes(tiny, tmp_path):
    cfg = replace(tiny, taylor_every=4, taylor_full_points=2, sharpness_points=2)
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    for name in ("metrics.csv", "summary.json", "instruments.npz", "config.json"):
        assert read(tmp_path / "a" / name) == read(tmp_path / "b" / name), name
    other = train(replace(cfg, seed=1), tmp_path / "c")
    assert read(tmp_path / "a" / "metrics.csv") != read(tmp_path / "c" / "metrics.csv")
    assert other["status"] == "ok"


def test_run_records_threads_and_device(tiny, tmp_path):
    train(tiny, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["extra"]["torch_threads"] == 1 and saved["extra"]["device"] == "cpu"
    assert RunConfig(**{k: v for k, v in saved.items() if k != "extra"}) == tiny


def test_dead_network_is_collapsed_and_keeps_training(tiny, tmp_path):
    trainer = Trainer(tiny, tmp_path)
    trainer.W[-2].zero_()  # last hidden layer's input weights: H_l = 0 on every input
    summary = trainer.run()
    assert summary["status"] == "collapsed" and summary["collapsed_step"] == 0
    assert summary["steps"] == summary["total_steps"]


def test_killed_run_resumes_to_identical_metrics(mnist_root, tmp_path):
    # Long enough to be killed mid-way: many cheap steps, frequent checkpoints.
    cfg = RunConfig(
        r=1, scaling="normalized", eta=0.5, seed=3, data_root=str(mnist_root),
        n_train=512, n_test=100, width=4, batch_size=16, epochs=40, probe_size=32,
        measure_every=7, checkpoint_every=25, device="cpu", **OFF,
    )
    ref = train(cfg, tmp_path / "ref")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "beyond_eos.train", "--run-config",
           json.dumps(asdict(cfg)), "--out", str(out), "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "run finished before it could be killed"
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < step < ref["total_steps"]

    resumed = train(cfg, out)
    assert resumed == ref
    for name in ("metrics.csv", "summary.json", "instruments.npz"):
        assert read(out / name) == read(tmp_path / "ref" / name), name
    assert not (out / "checkpoint.pt").exists()


def test_unreadable_checkpoint_is_ignored(tiny, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"torn write")
    assert train(tiny, tmp_path)["status"] == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_matches_itself(tiny, tmp_path):
    cfg = replace(tiny, device="cuda", taylor_every=4, sharpness_points=2)
    first, second = train(cfg, tmp_path / "a"), train(cfg, tmp_path / "b")
    assert first == second and first["status"] == "ok"
    assert read(tmp_path / "a" / "metrics.csv") == read(tmp_path / "b" / "metrics.csv")
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["extra"]["device"].startswith("cuda")
