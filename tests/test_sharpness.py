"""Sharpness by Lanczos over Hessian-vector products (docs/theory.md §4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beyond_eos import model
from beyond_eos.sharpness import DEFAULT_TOL, hvp_operator, sharpness, top_eigenpair

ACTIVATIONS = [(0.5, 0.5), (0.0, 1.0), (1.0, 0.3)]


def make_problem(seed: int, depth: int = 2, width: int = 3, r: int = 1, n: int = 8):
    """Seeded float64 network (a few dozen weights), batch and labels."""
    gen = torch.Generator().manual_seed(seed)
    widths = model.layer_widths(6, depth, width, r, 3)
    weights = model.init_weights(widths, gen, dtype=torch.float64)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return weights, x, y


def dense_hessian(weights, x, y, a, b) -> torch.Tensor:
    """Hessian of L in the flattened W_0..W_l layout, by autograd."""
    shapes = [w.shape for w in weights]
    sizes = [w.numel() for w in weights]

    def flat_loss(theta):
        parts = [t.view(s) for t, s in zip(torch.split(theta, sizes), shapes)]
        return model.loss(parts, x, y, a, b)

    theta = torch.cat([w.reshape(-1) for w in weights])
    return torch.func.hessian(flat_loss)(theta)


def quadratic(dim: int, top: float, seed: int) -> np.ndarray:
    """Symmetric matrix with eigenvalues linspace(0.1, top) in a random orthonormal basis."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return basis @ np.diag(np.linspace(0.1, top, dim)) @ basis.T


@pytest.mark.parametrize("method", ["structured", "autodiff"])
@pytest.mark.parametrize("ab", ACTIVATIONS)
def test_hvp_is_the_dense_hessian(ab, method):
    a, b = ab
    weights, x, y = make_problem(seed=1, depth=3)
    H = dense_hessian(weights, x, y, a, b).numpy()
    op = hvp_operator(weights, x, y, a, b, method=method)
    v = np.random.default_rng(2).standard_normal(H.shape[0])
    assert op.shape == H.shape
    np.testing.assert_allclose(op.matvec(v), H @ v, rtol=0, atol=1e-12 * np.abs(H).max())


def test_unknown_hvp_method_is_refused():
    weights, x, y = make_problem(seed=1)
    with pytest.raises(ValueError, match="structured"):
        hvp_operator(weights, x, y, method="exact")


@pytest.mark.parametrize("ab", ACTIVATIONS)
def test_sharpness_is_the_top_dense_eigenvalue(ab):
    a, b = ab
    weights, x, y = make_problem(seed=3)
    H = dense_hessian(weights, x, y, a, b)
    top = torch.linalg.eigvalsh(H)[-1].item()
    lam, vec = sharpness(weights, x, y, a, b)
    assert lam == pytest.approx(top, rel=1e-6)
    assert vec.shape == (H.shape[0],)
    residual = H.numpy() @ vec - lam * vec
    assert np.linalg.norm(residual) <= 2 * DEFAULT_TOL * abs(lam)


def test_preconditioned_sharpness():
    a, b = ACTIVATIONS[0]
    weights, x, y = make_problem(seed=4)
    xi = [0.5, 2.0, 3.0]
    H = dense_hessian(weights, x, y, a, b)
    root = torch.cat(
        [torch.full((w.numel(),), v**0.5, dtype=torch.float64) for w, v in zip(weights, xi)]
    )
    top = torch.linalg.eigvalsh(root[:, None] * H * root[None, :])[-1].item()
    lam, _ = sharpness(weights, x, y, a, b, precond=xi)
    assert lam == pytest.approx(top, rel=1e-6)
    with pytest.raises(ValueError, match="precond"):
        hvp_operator(weights, x, y, a, b, precond=[1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        hvp_operator(weights, x, y, a, b, precond=[1.0, -1.0, 1.0])


def test_float32_weights_are_measured_in_float64():
    a, b = ACTIVATIONS[2]
    weights, x, y = make_problem(seed=5)
    w32 = [w.float() for w in weights]
    lam32, _ = sharpness(w32, x.float(), y, a, b)
    lam64, _ = sharpness([w.double() for w in w32], x.float().double(), y, a, b)
    assert lam32 == lam64


def test_lanczos_recovers_a_known_spectrum_and_is_deterministic():
    A = quadratic(60, top=7.5, seed=6)
    lam, vec = top_eigenpair(lambda v: A @ v, dim=60)
    # the residual meets ARPACK's test (<= tol |lambda|), the eigenvalue is far better
    assert np.linalg.norm(A @ vec - lam * vec) <= 2 * DEFAULT_TOL * lam
    assert lam == pytest.approx(7.5, rel=1e-10)
    lam_again, vec_again = top_eigenpair(lambda v: A @ v, dim=60)
    assert lam_again == lam and np.array_equal(vec_again, vec)
    with pytest.raises(ValueError, match="dim"):
        top_eigenpair(lambda v: A @ v)


def test_warm_start_needs_fewer_products():
    A = quadratic(200, top=3.0, seed=7)
    calls = []

    def hvp(v):
        calls.append(1)
        return A @ v

    _, vec = top_eigenpair(hvp, dim=200)
    cold = len(calls)
    calls.clear()
    # a slightly perturbed previous eigenvector, as after one training step
    v0 = vec + 1e-3 * np.random.default_rng(8).standard_normal(200)
    lam, _ = top_eigenpair(hvp, dim=200, v0=v0)
    assert lam == pytest.approx(3.0, rel=1e-10)
    assert len(calls) < cold


def test_gradient_descent_diverges_exactly_beyond_two_over_lambda():
    # the edge of stability on a quadratic: x <- x - eta A x is stable iff eta < 2 / lambda_max
    A = quadratic(40, top=4.0, seed=9)
    lam, _ = top_eigenpair(lambda v: A @ v, dim=40)
    x0 = np.random.default_rng(10).standard_normal(40)
    for factor, stable in [(0.99, True), (1.01, False)]:
        eta = factor * 2.0 / lam
        x = x0.copy()
        for _ in range(2000):
            x = x - eta * (A @ x)
        ratio = np.linalg.norm(x) / np.linalg.norm(x0)
        assert (ratio < 1e-6) if stable else (ratio > 1e6), (factor, ratio)
