"""Invariants of the nuP parameterization, the scaling and the first-order instruments."""

import math

import pytest
import torch

from beyond_eos import measures, model
from beyond_eos.scaling import SCALINGS, get_scaling


def small_net(depth=3, width=4, r=1.0, a=0.5, b=0.5, n=12, d_in=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = model.layer_widths(d_in, depth, width, r, 10)
    W = model.init_weights(widths, g, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    return widths, W, x, y


def test_widths_grow_polynomially():
    assert model.hidden_widths(8, 16, 2) == [16 * k * k for k in range(1, 9)]
    assert model.layer_widths(784, 3, 16, 1, 10) == [784, 16, 32, 48, 10]


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (0.0, 1.0), (1.0, 0.3)])
def test_edge_of_chaos_keeps_activation_norms(a, b):
    # EOC gain: E[phi(s)^2] = (a^2+b^2) E[s^2], so sigma^2 (a^2+b^2) = 1 keeps E[z_k^2] fixed.
    # One draw of W moves q by O(1/sqrt(m)) per layer; averaging 32 inits isolates the mean.
    n, d_in, depth, width, inits = 64, 784, 8, 256, 32
    widths = model.layer_widths(d_in, depth, width, 0, 10)
    q = torch.zeros(depth, dtype=torch.float64)  # hidden pre-activations z_1..z_l
    for seed in range(inits):
        g = torch.Generator().manual_seed(seed)
        W = model.init_weights(widths, g, dtype=torch.float64)
        x = torch.randn(n, d_in, generator=g, dtype=torch.float64)  # standardized inputs
        _, Z = model.forward(W, x, a, b)
        q += torch.stack([z.pow(2).mean() for z in Z[1:-1]]) / inits
    assert torch.all((q / q[0] - 1).abs() < 0.10), q


def test_zero_activation_rejected():
    with pytest.raises(ValueError, match="a\\^2 \\+ b\\^2"):
        model.eoc_gain(0.0, 0.0)


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (1.0, 0.3)])
def test_factorized_gradients_equal_autograd(a, b):
    widths, W, x, y = small_net(a=a, b=b)
    alphas = model.multipliers(widths, a, b)
    H, Z = model.forward(W, x, a, b, alphas)
    G = model.gradients(H, model.backward(W, H, Z, y, a, b, alphas), alphas)
    Wg = [w.clone().requires_grad_() for w in W]
    auto = torch.autograd.grad(model.loss(Wg, x, y, a, b), Wg)
    for g_f, g_a in zip(G, auto):
        torch.testing.assert_close(g_f, g_a, rtol=1e-12, atol=1e-14)


def test_gram_form_of_gradient_norm_equals_autograd():
    widths, W, x, y = small_net(depth=4, r=2)
    alphas = model.multipliers(widths, 0.5, 0.5)
    H, Z = model.forward(W, x, 0.5, 0.5, alphas)
    D = model.backward(W, H, Z, y, 0.5, 0.5, alphas)
    Wg = [w.clone().requires_grad_() for w in W]
    auto = torch.autograd.grad(model.loss(Wg, x, y, 0.5, 0.5), Wg)
    for k, g in enumerate(auto):
        gram = measures.grad_sqnorm_gram(H[k], D[k + 1], alphas[k])
        assert math.isclose(gram, float(g.pow(2).sum()), rel_tol=1e-10)


def scaled_step(scaling, n):
    """(W, H, D, G, xi) of one step of a depth-4, r = 2 net on n samples under ``scaling``."""
    widths, W, x, y = small_net(depth=4, r=2, n=n)
    alphas = model.multipliers(widths, 0.5, 0.5)
    H, Z = model.forward(W, x, 0.5, 0.5, alphas)
    D = model.backward(W, H, Z, y, 0.5, 0.5, alphas)
    G = model.gradients(H, D, alphas)
    hn = torch.stack([h.norm() for h in H])
    dn = torch.stack([d.norm() for d in D[1:]])
    xi = get_scaling(scaling)(hn, dn, torch.tensor(alphas, dtype=torch.float64), n)
    return W, H, D, G, xi


def test_normalized_update_norm_bounded_by_eta():
    n, eta = 16, 0.7
    W, H, D, G, xi = scaled_step("normalized", n)
    hn = torch.stack([h.norm() for h in H])
    dn = torch.stack([d.norm() for d in D[1:]])
    for k in range(len(W)):
        step = eta * xi[k] * G[k]
        # ||Delta W_k|| = eta sqrt(<Khat_k, Ghat_(k+1)>) with trace-one Grams
        Kh = H[k] @ H[k].T / hn[k] ** 2
        Gh = D[k + 1] @ D[k + 1].T / dn[k] ** 2
        expected = eta * float((Kh * Gh).sum()) ** 0.5
        assert math.isclose(float(step.norm()), expected, rel_tol=1e-10)
        assert float(step.norm()) <= eta * (1 + 1e-12)


def test_normalized_scaling_zero_norm_gives_zero_update():
    xi = SCALINGS["normalized"](
        torch.tensor([1.0, 0.0]), torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.5]), 8
    )
    assert xi[1] == 0 and math.isclose(float(xi[0]), 8 / (0.5 * 1 * 2))


def test_unknown_scaling_names_the_choices():
    with pytest.raises(KeyError, match="normalized"):
        get_scaling("normalised")


def test_soft_rank_of_known_matrices():
    assert math.isclose(measures.soft_rank(torch.eye(7)), 7.0)
    v = torch.arange(1.0, 6.0)
    assert math.isclose(measures.soft_rank(torch.outer(v, v)), 1.0)
    assert math.isclose(measures.soft_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0]))), 2.0)


def test_feature_ranks_use_either_gram():
    g = torch.Generator().manual_seed(3)
    for shape in [(6, 40), (40, 6)]:
        H = torch.randn(*shape, generator=g, dtype=torch.float64)
        K = H @ H.T
        srank, stable = measures.feature_ranks(H)
        assert math.isclose(srank, measures.soft_rank(K), rel_tol=1e-10)
        assert math.isclose(stable, float(torch.trace(K) / torch.linalg.eigvalsh(K)[-1]),
                            rel_tol=1e-10)
        assert 1 <= stable <= srank <= min(shape) + 1e-9


def test_relative_scaling_bounds_first_order_decrease_per_layer():
    # eta xi_k ||G_k||^2 <= eta ||D_(l+1)||^2 / n: the second reading's promise (theory §3)
    n, eta = 16, 0.3
    W, H, D, G, xi = scaled_step("relative", n)
    bound = eta * float(D[-1].pow(2).sum()) / n
    for k in range(len(W)):
        decrease = eta * float(xi[k]) * float(G[k].pow(2).sum())
        assert 0 < decrease <= bound * (1 + 1e-12)
