"""The nuP MLP: homogeneous (no biases), (a,b)-ReLU, Edge-of-Chaos init, widths m_k = m k^r.

Notation follows docs/theory.md. A network of depth ``l`` has hidden widths
m_k = m * k**r (k = 1..l), input width m_0 and output width m_(l+1) = C, and weights
W_k of shape (m_(k+1), m_k) for k = 0..l. All entries are N(0, 1); the scale lives in the
forward multipliers alpha_0 = 1/sqrt(m_0) and alpha_k = sigma/sqrt(m_k), with the EOC gain
sigma = (a^2 + b^2)^(-1/2). Everything here is a plain function of a list of tensors, so the
instruments (Taylor coefficients, Hessian-vector products) can differentiate through it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def hidden_widths(depth: int, width: int, r: float) -> list[int]:
    """Hidden widths m_k = round(m * k**r) for k = 1..depth (nuP's polynomial growth)."""
    return [int(round(width * k**r)) for k in range(1, depth + 1)]


def layer_widths(d_in: int, depth: int, width: int, r: float, n_classes: int) -> list[int]:
    """All widths [m_0, m_1, ..., m_l, m_(l+1)]."""
    return [d_in, *hidden_widths(depth, width, r), n_classes]


def eoc_gain(a: float, b: float) -> float:
    """Edge-of-Chaos gain sigma = (a^2 + b^2)^(-1/2): E[phi(s)^2] = (a^2+b^2) E[s^2]."""
    if a == 0 and b == 0:
        raise ValueError("(a, b) = (0, 0) makes phi identically zero; choose a^2 + b^2 > 0")
    return 1.0 / math.sqrt(a * a + b * b)


def multipliers(widths: list[int], a: float, b: float) -> list[float]:
    """Forward multipliers alpha_k, k = 0..l: 1/sqrt(m_0) on the input, sigma/sqrt(m_k) after."""
    sigma = eoc_gain(a, b)
    return [1.0 / math.sqrt(widths[0])] + [sigma / math.sqrt(m) for m in widths[1:-1]]


def phi(s: Tensor, a: float, b: float) -> Tensor:
    """(a,b)-ReLU: phi(s) = a s + b |s|; (1/2, 1/2) is the ReLU."""
    return a * s + b * s.abs()


def phi_prime(s: Tensor, a: float, b: float) -> Tensor:
    """phi'(s) = a + b sign(s), with sign(0) = 0 (the subgradient autograd also uses)."""
    return a + b * torch.sign(s)


def init_weights(
    widths: list[int], generator: torch.Generator, dtype=torch.float32, device="cpu"
) -> list[Tensor]:
    """Every entry of every W_k i.i.d. N(0, 1), drawn on the CPU so seeds agree across devices."""
    weights = []
    for k in range(len(widths) - 1):
        w = torch.randn(widths[k + 1], widths[k], generator=generator, dtype=torch.float64)
        weights.append(w.to(dtype=dtype, device=device))
    return weights


def forward(
    weights: list[Tensor], x: Tensor, a: float, b: float, alphas: list[float] | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Forward pass on a batch x of shape (n, m_0).

    Returns (H, Z): H[k] of shape (n, m_k) for k = 0..l (H[0] = x), and Z[k] for
    k = 1..l+1 with Z[0] = None; the logits are Z[l+1] of shape (n, C).
    """
    if alphas is None:
        alphas = multipliers([x.shape[1]] + [w.shape[0] for w in weights], a, b)
    H, Z = [x], [None]
    for k, w in enumerate(weights):
        # Z_(k+1) = alpha_k H_k W_k^T, shape (n, m_(k+1))
        z = alphas[k] * (H[k] @ w.T)
        Z.append(z)
        if k < len(weights) - 1:
            H.append(phi(z, a, b))
    return H, Z


def logits(weights: list[Tensor], x: Tensor, a: float, b: float) -> Tensor:
    """Logits Z_(l+1), shape (n, C)."""
    return forward(weights, x, a, b)[1][-1]


def cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    """L = (1/n) sum_i [logsumexp(z_i) - z_(i, y_i)]."""
    return (torch.logsumexp(z, dim=1) - z.gather(1, y[:, None]).squeeze(1)).mean()


def loss(weights: list[Tensor], x: Tensor, y: Tensor, a: float, b: float) -> Tensor:
    """Minibatch loss L_B(W)."""
    return cross_entropy(logits(weights, x, a, b), y)


def backward(
    weights: list[Tensor],
    H: list[Tensor],
    Z: list[Tensor],
    y: Tensor,
    a: float,
    b: float,
    alphas: list[float],
) -> list[Tensor]:
    """Backward signals D[k], k = 1..l+1 (D[0] = None), per sample, not divided by n.

    D_(l+1) = softmax(Z) - onehot(y); D_k = phi'(Z_k) * (alpha_k D_(k+1) W_k).
    """
    n_layers = len(weights)
    z_out = Z[-1]
    g = torch.softmax(z_out, dim=1)
    g[torch.arange(len(y), device=y.device), y] -= 1.0
    D: list[Tensor | None] = [None] * (n_layers + 1)
    D[n_layers] = g
    for k in range(n_layers - 1, 0, -1):
        # (n, m_(k+1)) @ (m_(k+1), m_k) -> (n, m_k)
        D[k] = phi_prime(Z[k], a, b) * (alphas[k] * (D[k + 1] @ weights[k]))
    return D


def gradients(
    H: list[Tensor], D: list[Tensor], alphas: list[float]
) -> list[Tensor]:
    """Gradient factorization G_k = (alpha_k / n) D_(k+1)^T H_k, shape (m_(k+1), m_k)."""
    n = H[0].shape[0]
    return [(alphas[k] / n) * (D[k + 1].T @ H[k]) for k in range(len(alphas))]
