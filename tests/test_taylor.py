"""Taylor coefficients of the minibatch loss along the per-layer gradients (docs/theory.md §4).

The reference throughout is an independent nested-reverse-mode computation on
f(s) = model.loss(W + s * G), float64, on tiny seeded networks.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from beyond_eos import model
from beyond_eos.taylor import (
    logit_velocities_gram,
    t1_gram,
    t2_gauss_newton_gram,
    taylor_coefficients,
    taylor_coefficients_autodiff,
    taylor_directional,
)

D_IN, WIDTH, N_CLASSES, N = 7, 3, 4, 6
ACTIVATIONS = [(0.5, 0.5), (0.0, 1.0), (1.0, 0.3)]


def make_problem(depth: int, r: int, seed: int, n: int = N, width: int = WIDTH):
    """Seeded float64 network, batch and labels."""
    gen = torch.Generator().manual_seed(seed)
    widths = model.layer_widths(D_IN, depth, width, r, N_CLASSES)
    weights = model.init_weights(widths, gen, dtype=torch.float64)
    x = torch.randn(n, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    return weights, x, y


def gradient(weights, x, y, a, b):
    return list(torch.func.grad(lambda ws: model.loss(ws, x, y, a, b))(weights))


def reference_tensors(weights, x, y, a, b, direction=None):
    """T1, T2, T3 of f(s) = L(W + s * G) by jacrev, jacrev^2, jacrev^3 at s = 0."""
    G = gradient(weights, x, y, a, b) if direction is None else direction

    def f(s):
        moved = [w + s[k] * g for k, (w, g) in enumerate(zip(weights, G))]
        return model.loss(moved, x, y, a, b)

    s0 = torch.zeros(len(weights), dtype=torch.float64)
    d1 = torch.func.jacrev(f)
    d2 = torch.func.jacrev(d1)
    return d1(s0), d2(s0), torch.func.jacrev(d2)(s0)


def max_rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


CASES = [
    (0, 0, ACTIVATIONS[1]),
    (1, 0, ACTIVATIONS[0]),
    (2, 1, ACTIVATIONS[1]),
    (3, 2, ACTIVATIONS[2]),
    (3, 0, ACTIVATIONS[0]),
    (4, 1, ACTIVATIONS[2]),
    (2, 2, ACTIVATIONS[0]),
    (4, 2, ACTIVATIONS[1]),
]


@pytest.mark.parametrize("depth, r, ab", CASES)
@pytest.mark.parametrize("fn", [taylor_coefficients, taylor_coefficients_autodiff])
def test_tensors_match_nested_reverse_mode(depth, r, ab, fn):
    a, b = ab
    weights, x, y = make_problem(depth, r, seed=10 * depth + r)
    want = reference_tensors(weights, x, y, a, b)
    got = fn(weights, x, y, a, b)
    for p, (g, w) in enumerate(zip(got, want), start=1):
        assert g.dtype == torch.float64
        assert g.shape == (depth + 1,) * p
        assert max_rel(g, w) < 1e-9, f"T{p}"


def test_float32_inputs_are_cast_and_grads_set_the_direction():
    # a float32 network gives the float64 tensors of its float64 copy; a given direction
    # (here random) is used as G, and T1 becomes <grad_k L, G_k>
    a, b = ACTIVATIONS[2]
    weights, x, y = make_problem(3, 1, seed=3)
    w32 = [w.float() for w in weights]
    w_cast = [w.double() for w in w32]
    want = reference_tensors(w_cast, x.float().double(), y, a, b)
    got = taylor_coefficients(w32, x.float(), y, a, b)
    for g, w in zip(got, want):
        assert max_rel(g, w) < 1e-9
    gen = torch.Generator().manual_seed(4)
    direction = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in weights]
    want = reference_tensors(weights, x, y, a, b, direction=direction)
    for fn in (taylor_coefficients, taylor_coefficients_autodiff):
        for g, w in zip(fn(weights, x, y, a, b, grads=direction), want):
            assert max_rel(g, w) < 1e-9


def test_lower_orders_skip_the_higher_tensors():
    weights, x, y = make_problem(3, 2, seed=5)
    T1, T2, T3 = taylor_coefficients(weights, x, y)
    for order in (1, 2):
        got = taylor_coefficients(weights, x, y, order=order)
        assert torch.allclose(got[0], T1, rtol=1e-13, atol=0)
        assert (got[1] is None) == (order == 1)
        assert got[2] is None
    assert torch.allclose(taylor_coefficients(weights, x, y, order=2)[1], T2, rtol=1e-12)
    with pytest.raises(ValueError, match="order"):
        taylor_coefficients(weights, x, y, order=4)


def test_symmetry_and_t1_is_squared_gradient_norm():
    a, b = ACTIVATIONS[0]
    weights, x, y = make_problem(4, 1, seed=6)
    T1, T2, T3 = taylor_coefficients(weights, x, y, a, b)
    G = gradient(weights, x, y, a, b)
    norms = torch.stack([(g * g).sum() for g in G])
    assert torch.allclose(T1, norms, rtol=1e-12, atol=0)
    assert torch.equal(T2, T2.T)
    for perm in itertools.permutations(range(3)):
        assert torch.allclose(T3.permute(*perm), T3, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("ab", ACTIVATIONS)
def test_gram_forms(ab):
    a, b = ab
    weights, x, y = make_problem(3, 2, seed=7)
    T1, T2, _ = taylor_coefficients(weights, x, y, a, b)
    G = gradient(weights, x, y, a, b)
    norms = torch.stack([(g * g).sum() for g in G])

    # Gram form of ||G_k||^2 (docs/theory.md §1) against autograd's gradient
    assert max_rel(t1_gram(weights, x, y, a, b), norms) < 1e-10

    # u^(k) from K_k and Gamma_(k+1) against jacfwd of the logits along s
    def logits_of_s(s):
        moved = [w + s[k] * g for k, (w, g) in enumerate(zip(weights, G))]
        return model.logits(moved, x, a, b)

    s0 = torch.zeros(len(weights), dtype=torch.float64)
    u_ad = torch.func.jacfwd(logits_of_s)(s0).permute(2, 0, 1)  # (L, n, C)
    u = logit_velocities_gram(weights, x, y, a, b)
    assert max_rel(u, u_ad) < 1e-10

    # T1_k = (1/n) sum_i g_i^T u_i^(k)
    z = model.logits(weights, x, a, b)
    g = torch.softmax(z, dim=1) - torch.nn.functional.one_hot(y, N_CLASSES).double()
    assert max_rel(torch.einsum("ic,kic->k", g, u) / N, norms) < 1e-10

    # Gauss-Newton part against J_s^T (Hessian of the loss in z) J_s, and diag(T2) = diag(T2GN)
    hess_z = torch.func.hessian(lambda zz: model.cross_entropy(zz, y))(z)  # (n, C, n, C)
    gn_ad = torch.einsum("kic,icpd,jpd->kj", u_ad, hess_z, u_ad)
    gn = t2_gauss_newton_gram(weights, x, y, a, b)
    assert max_rel(gn, gn_ad) < 1e-10
    assert max_rel(torch.diag(T2), torch.diag(gn)) < 1e-10
    # the mixed terms are not Gauss-Newton: d^2 z / ds_j ds_k != 0 for j != k
    assert (T2 - gn).abs().max() > 1e-6


def test_directional_jet_contracts_the_tensors():
    a, b = ACTIVATIONS[2]
    weights, x, y = make_problem(4, 2, seed=8)
    T1, T2, T3 = taylor_coefficients(weights, x, y, a, b)
    tau = torch.tensor([0.3, 1.2, 0.7, 0.05, 2.0], dtype=torch.float64)
    out = taylor_directional(weights, x, y, tau, a, b)
    t1 = (T1 @ tau).item()
    t2 = (tau @ T2 @ tau).item()
    t3 = torch.einsum("abc,a,b,c->", T3, tau, tau, tau).item()
    scale = max(abs(t1), abs(t2), abs(t3))
    for key, want in [("t1_tau", t1), ("t2_tau", t2), ("t3_tau", t3)]:
        assert abs(out[key] - want) < 1e-12 * scale, key
    assert out["d1"] == pytest.approx(-t1, rel=1e-12)
    assert out["d2"] == pytest.approx(-t1 + t2 / 2, rel=1e-12)
    assert out["d3"] == pytest.approx(-t1 + t2 / 2 - t3 / 6, rel=1e-12)
    assert out["loss"] == pytest.approx(model.loss(weights, x, y, a, b).item(), rel=1e-14)
    with pytest.raises(ValueError, match="tau"):
        taylor_directional(weights, x, y, tau[:3], a, b)


def test_remainder_shrinks_with_the_fourth_power_of_the_step():
    # |L(W - t tau G) - cubic prediction| = O(t^4) while the activation pattern is fixed;
    # the quadratic prediction's error is O(t^3), which checks the sign of the cubic term
    a, b = ACTIVATIONS[0]
    weights, x, y = make_problem(3, 1, seed=9, n=8)
    G = gradient(weights, x, y, a, b)
    tau0 = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    T1, T2, T3 = taylor_coefficients(weights, x, y, a, b)
    loss0 = model.loss(weights, x, y, a, b).item()
    signs0 = [torch.sign(z) for z in model.forward(weights, x, a, b)[1][1:-1]]

    steps = 0.04 * 2.0 ** -np.arange(4)
    err2, err3 = [], []
    for t in steps:
        tau = t * tau0
        moved = [w - tk * g for w, tk, g in zip(weights, tau, G)]
        # guard: no pre-activation crossed zero, so f is exactly the polynomial regime
        for s0, z in zip(signs0, model.forward(moved, x, a, b)[1][1:-1]):
            assert torch.equal(torch.sign(z), s0)
        change = model.loss(moved, x, y, a, b).item() - loss0
        d2 = (-T1 @ tau + 0.5 * tau @ T2 @ tau).item()
        d3 = d2 - torch.einsum("abc,a,b,c->", T3, tau, tau, tau).item() / 6
        assert taylor_directional(weights, x, y, tau, a, b)["d3"] == pytest.approx(d3, rel=1e-12)
        err2.append(abs(change - d2))
        err3.append(abs(change - d3))
    assert min(err3) > 1e-13, "steps too small: the remainder is in float64 noise"
    slope3 = np.polyfit(np.log(steps), np.log(err3), 1)[0]
    slope2 = np.polyfit(np.log(steps), np.log(err2), 1)[0]
    assert abs(slope3 - 4) < 0.3, slope3
    assert abs(slope2 - 3) < 0.3, slope2
