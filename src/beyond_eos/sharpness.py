"""Sharpness: the top Hessian eigenvalue of the probe-batch loss, by Lanczos (docs/theory.md §4).

The Hessian of L (probe batch) with respect to all weights, flattened layer by layer in
the order W_0..W_l (row-major), is never formed: ``hvp_operator`` wraps float64
Hessian-vector products in a scipy LinearOperator, and ``top_eigenpair`` runs ARPACK's
implicitly restarted Lanczos (scipy.sparse.linalg.eigsh, k = 1, which = 'LA') on it,
warm-started from the previous eigenvector when the caller passes one. The products are
hand-written tangents of model.py's forward and backward passes (six matmuls per layer,
the passes at W cached); torch.func's forward-over-reverse (jvp of grad) is kept as
``method="autodiff"``, 1.6 to 3 times slower at the paper size, and the tests check that
the two agree.

With per-layer scalars xi_k the preconditioned operator is P^(1/2) H P^(1/2),
P = blockdiag(xi_k I): its top eigenvalue is the sharpness seen by the scaled step
W_k - eta xi_k G_k, and eta * lambda / 2 > 1 means beyond the edge of stability.

Tolerance and basis size. ARPACK stops when the residual of the Ritz pair satisfies
||A v - theta v|| <= tol * |theta|. For a symmetric operator the eigenvalue error is at
most that residual, and at most residual^2 / gap once the residual is below the gap to
the next eigenvalue, so tol = 1e-6 bounds the relative error of lambda by 1e-6 and in
practice gives it to 1e-10 or better. The EOS ratio needs three digits at most; the
extra digits cost only a few Hessian-vector products, and keep the warm-started
eigenvector accurate enough to start the next call close to converged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import Tensor

from beyond_eos.model import backward, forward, loss, multipliers, phi_prime

log = logging.getLogger(__name__)

DEFAULT_TOL = 1e-6
DEFAULT_MAXITER = 1000
# Lanczos basis size. ARPACK spends ncv products before its first convergence test, so
# the scipy default (20) makes a warm start worthless. With 10, a nuP MLP (l = 8, m = 8,
# r = 2, n = 64; 0.4M weights) took 16 products cold and 11 warm after a step (21 and 21
# with 20), while a clustered test spectrum costs about 15% more products than with 20.
DEFAULT_NCV = 10
V0_SEED = 0


def _autodiff_hvp(W: list[Tensor], x: Tensor, y: Tensor, a: float, b: float):
    """V -> H V by forward-over-reverse torch.func (jvp of grad) on model.loss."""
    grad_fn = torch.func.grad(lambda params: loss(params, x, y, a, b))

    def hvp(V: list[Tensor]) -> list[Tensor]:
        return list(torch.func.jvp(grad_fn, (W,), (V,))[1])

    return hvp


def _structured_hvp(W: list[Tensor], x: Tensor, y: Tensor, a: float, b: float):
    """V -> H V by hand-written forward and backward tangents, the passes at W cached.

    At a fixed activation pattern (phi'' = 0 almost everywhere, as autograd also has it),
    differentiating the gradient G_k = (alpha_k / n) D_(k+1)^T H_k in direction V gives
      forward  dZ_(k+1) = alpha_k (dH_k W_k^T + H_k V_k^T),  dH_k = phi'(Z_k) * dZ_k,
      output   dD_(l+1) = S dz = p * (dz - <p, dz>),
      backward dD_k = phi'(Z_k) * alpha_k (dD_(k+1) W_k + D_(k+1) V_k),
      result   H V_k = (alpha_k / n) (dD_(k+1)^T H_k + D_(k+1)^T dH_k).
    Six matmuls per layer per product (two forward, two backward, two for the result).
    """
    n = x.shape[0]
    widths = [x.shape[1]] + [w.shape[0] for w in W]
    alphas = multipliers(widths, a, b)
    H, Z = forward(W, x, a, b, alphas)
    D = backward(W, H, Z, y, a, b, alphas)
    phis = [None] + [phi_prime(z, a, b) for z in Z[1:-1]]
    p = torch.softmax(Z[-1], dim=1)
    n_layers = len(W)

    def hvp(V: list[Tensor]) -> list[Tensor]:
        # forward tangent of the pre-activations and features
        dH = [torch.zeros_like(x)]
        for k in range(n_layers):
            dz = alphas[k] * (dH[k] @ W[k].T + H[k] @ V[k].T)  # (n, m_(k+1))
            if k < n_layers - 1:
                dH.append(phis[k + 1] * dz)
        # tangent of g = softmax(z) - onehot(y) is the softmax Hessian applied to dz
        dD = p * (dz - (p * dz).sum(1, keepdim=True))  # (n, C)
        out = [None] * n_layers
        for k in range(n_layers - 1, -1, -1):
            # (m_(k+1), n) @ (n, m_k): tangent of the gradient factorization
            out[k] = alphas[k] / n * (dD.T @ H[k] + D[k + 1].T @ dH[k])
            if k > 0:
                dD = phis[k] * (alphas[k] * (dD @ W[k] + D[k + 1] @ V[k]))
        return out

    return hvp


_HVP_METHODS = {"structured": _structured_hvp, "autodiff": _autodiff_hvp}


def hvp_operator(
    weights: list[Tensor],
    x: Tensor,
    y: Tensor,
    a: float = 0.5,
    b: float = 0.5,
    precond: Sequence[float] | None = None,
    method: str = "structured",
) -> LinearOperator:
    """Hessian of L_B at W as a (N, N) float64 LinearOperator, N = sum_k m_(k+1) m_k.

    With ``precond`` = (xi_0..xi_l), xi_k >= 0, the operator is P^(1/2) H P^(1/2),
    P = blockdiag(xi_k I). Vectors are the concatenation of the row-major flattened
    W_0..W_l. ``method`` = "structured" (default: hand-written tangents of model.py's
    passes, cached forward/backward at W) or "autodiff" (torch.func jvp of grad); both
    are exact in float64 and agree to rounding (tests/test_sharpness.py).
    """
    if method not in _HVP_METHODS:
        raise ValueError(f"unknown HVP method {method!r}; choose one of {sorted(_HVP_METHODS)}")
    W = [w.detach().to(torch.float64) for w in weights]
    x64 = x.detach().to(torch.float64)
    y = y.detach().to(device=x64.device, dtype=torch.long)
    hvp = _HVP_METHODS[method](W, x64, y, a, b)
    shapes = [w.shape for w in W]
    sizes = [w.numel() for w in W]
    dim = sum(sizes)

    # sqrt(xi_k) repeated over layer k's entries: P^(1/2) as a vector of length N
    root = None
    if precond is not None:
        xi = [float(v) for v in precond]
        if len(xi) != len(W):
            raise ValueError(f"precond has {len(xi)} entries, the network {len(W)} layers")
        if min(xi) < 0 or not all(np.isfinite(xi)):
            raise ValueError(f"precond must be finite and non-negative, got {xi}")
        root = torch.cat(
            [
                torch.full((s,), v**0.5, dtype=torch.float64, device=x64.device)
                for s, v in zip(sizes, xi)
            ]
        )

    def matvec(v: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1), device=x64.device)
        if root is not None:
            v = root * v
        tangents = [t.view(s) for t, s in zip(torch.split(v, sizes), shapes)]
        out = torch.cat([h.reshape(-1) for h in hvp(tangents)])
        if root is not None:
            out = root * out
        return out.cpu().numpy()

    return LinearOperator((dim, dim), matvec=matvec, rmatvec=matvec, dtype=np.float64)


def top_eigenpair(
    hvp: Callable[[np.ndarray], np.ndarray] | LinearOperator,
    dim: int | None = None,
    v0: np.ndarray | None = None,
    tol: float = DEFAULT_TOL,
    maxiter: int = DEFAULT_MAXITER,
    ncv: int = DEFAULT_NCV,
) -> tuple[float, np.ndarray]:
    """Largest algebraic eigenvalue of a symmetric operator and its unit eigenvector.

    ``hvp`` is a LinearOperator or any callable v -> A v on float64 vectors of length
    ``dim``. ``v0`` warm-starts Lanczos (e.g. the previous eigenvector); without it the
    start is a fixed seeded Gaussian, so that results do not depend on ARPACK's internal
    random state (which carries over between calls in a process).
    """
    if isinstance(hvp, LinearOperator):
        op = hvp
    else:
        if dim is None:
            raise ValueError("pass dim, the length of the vectors hvp acts on")
        op = LinearOperator((dim, dim), matvec=hvp, rmatvec=hvp, dtype=np.float64)
    n = op.shape[0]
    if v0 is None:
        v0 = np.random.default_rng(V0_SEED).standard_normal(n)
    v0 = np.asarray(v0, dtype=np.float64).reshape(-1)
    if v0.shape != (n,) or not np.all(np.isfinite(v0)) or not np.any(v0):
        raise ValueError(f"v0 must be a finite non-zero vector of length {n}")
    ncv = min(ncv, n)
    try:
        vals, vecs = eigsh(op, k=1, which="LA", v0=v0, tol=tol, maxiter=maxiter, ncv=ncv)
    except ArpackNoConvergence as err:
        raise RuntimeError(
            f"Lanczos did not converge in maxiter={maxiter} restarts at tol={tol}; "
            "raise maxiter or loosen tol"
        ) from err
    log.debug("top eigenvalue %.6g (dim %d)", vals[0], n)
    return float(vals[0]), vecs[:, 0]


def sharpness(
    weights: list[Tensor],
    x: Tensor,
    y: Tensor,
    a: float = 0.5,
    b: float = 0.5,
    precond: Sequence[float] | None = None,
    v0: np.ndarray | None = None,
    tol: float = DEFAULT_TOL,
    maxiter: int = DEFAULT_MAXITER,
    ncv: int = DEFAULT_NCV,
    method: str = "structured",
) -> tuple[float, np.ndarray]:
    """(lambda_max, eigenvector) of the Hessian of L on (x, y), or of P^(1/2) H P^(1/2).

    The eigenvector is a float64 numpy array in the flattened W_0..W_l layout (in the
    preconditioned coordinates when ``precond`` is given); pass it back as ``v0`` at the
    next measurement to warm-start.
    """
    op = hvp_operator(weights, x, y, a, b, precond=precond, method=method)
    return top_eigenpair(op, v0=v0, tol=tol, maxiter=maxiter, ncv=ncv)
