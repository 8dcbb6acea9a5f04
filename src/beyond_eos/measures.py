"""First-order instruments (theory §4): norms, Gram forms, soft rank, cumulative updates."""

from __future__ import annotations

import torch
from torch import Tensor


def soft_rank(K: Tensor) -> float:
    """srank(K) = tr(K)^2 / ||K||_F^2 for a PSD K != 0; lies in [1, rank K]."""
    K = K.double()
    fro2 = (K * K).sum()
    if fro2 == 0:
        return float("nan")
    return float(torch.trace(K) ** 2 / fro2)


def feature_ranks(H: Tensor) -> tuple[float, float]:
    """(soft rank, stable rank) of the feature Gram K = H H^T, shape (n, n), from H (n, m).

    Works on whichever Gram is smaller: H^T H has the same non-zero spectrum as H H^T.
    Stable rank = tr(K) / lambda_max(K).
    """
    n, m = H.shape
    H = H.double()
    K = H @ H.T if n <= m else H.T @ H  # (min(n, m), min(n, m))
    tr = torch.trace(K)
    if tr == 0:
        return float("nan"), float("nan")
    lam_max = torch.linalg.eigvalsh(K)[-1]
    return soft_rank(K), float(tr / lam_max)


def grad_sqnorm_gram(H_k: Tensor, D_k1: Tensor, alpha_k: float) -> float:
    """Gram form of ||G_k||_F^2 = (alpha_k^2 / n^2) <H_k H_k^T, D_(k+1) D_(k+1)^T>_F.

    H_k (n, m_k) and D_(k+1) (n, m_(k+1)); both Grams are (n, n).
    """
    n = H_k.shape[0]
    K = H_k.double() @ H_k.double().T
    Gm = D_k1.double() @ D_k1.double().T
    return float(alpha_k**2 / n**2 * (K * Gm).sum())


def frob_sq(A: Tensor) -> float:
    return float(A.double().pow(2).sum())


def cosine(A: Tensor, B: Tensor) -> float:
    """<A, B>_F / (||A|| ||B||); NaN when either is zero (e.g. the cumulative update at t = 0)."""
    A, B = A.double(), B.double()
    na, nb = A.norm(), B.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float((A * B).sum() / (na * nb))
