"""Depthwise gradient scaling xi_(k,t): the SGD step is W_k <- W_k - eta * xi_k * G_k.

A registry maps each config value of ``grid.scaling`` to a rule; an unknown name raises.
Every rule sees the per-layer Frobenius norms it needs, which the training loop has already
computed for its forward/backward norm records, so a rule costs nothing beyond them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# rule(h_norms, d_norms, alphas, n) -> xi, float64 tensor of shape (l+1,)
#   h_norms[k] = ||H_k||_F for k = 0..l; d_norms[k] = ||D_(k+1)||_F for k = 0..l
ScalingRule = Callable[[Tensor, Tensor, Tensor, int], Tensor]
SCALINGS: dict[str, ScalingRule] = {}


def register(name: str):
    def deco(fn: ScalingRule) -> ScalingRule:
        SCALINGS[name] = fn
        return fn

    return deco


def get_scaling(name: str) -> ScalingRule:
    try:
        return SCALINGS[name]
    except KeyError:
        raise KeyError(f"unknown scaling '{name}'; choose one of {sorted(SCALINGS)}") from None


@register("none")
def no_scaling(h_norms: Tensor, d_norms: Tensor, alphas: Tensor, n: int) -> Tensor:
    """xi_k = 1: plain SGD in the nuP parameterization."""
    return torch.ones_like(h_norms)


@register("normalized")
def normalized(h_norms: Tensor, d_norms: Tensor, alphas: Tensor, n: int) -> Tensor:
    """xi_k = n / (alpha_k ||H_k|| ||D_(k+1)||): our reading of "cancels forward/backward norms".

    Then xi_k G_k = Dhat^T Hhat with unit-norm Hhat, Dhat, so the layer's update has Frobenius
    norm eta * sqrt(<Khat_k, Ghat_(k+1)>) <= eta. A zero norm gives a zero update (xi = 0).
    """
    denom = alphas * h_norms * d_norms
    return torch.where(denom > 0, n / torch.where(denom > 0, denom, 1.0), 0.0)


@register("relative")
def relative(h_norms: Tensor, d_norms: Tensor, alphas: Tensor, n: int) -> Tensor:
    """xi_k = n ||D_(l+1)||^2 / (alpha_k^2 ||H_k||^2 ||D_(k+1)||^2): a second reading (theory §3).

    Dividing by the squared norms, relative to the output-gradient norm, makes the first-order
    loss decrease along each layer eta * xi_k * ||G_k||^2 <= eta * ||D_(l+1)||^2 / n, i.e. at
    most eta times the mean squared logit gradient, whatever the depth or width.
    """
    out = d_norms[-1] ** 2 / n
    denom = (alphas * h_norms * d_norms / n) ** 2
    return torch.where(denom > 0, out / torch.where(denom > 0, denom, 1.0), 0.0)
