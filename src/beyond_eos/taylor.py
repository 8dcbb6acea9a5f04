"""Taylor coefficients T1, T2, T3 of the minibatch loss along the per-layer gradients.

For a batch B and weights W = (W_0..W_l) with gradients G_k of L_B at W, let
f(s) = L_B(W_0 + s_0 G_0, ..., W_l + s_l G_l) for s in R^(l+1) (docs/theory.md §4). The
p-th derivative tensor of f at s = 0 is T^(p); T1_k = ||G_k||_F^2, and an SGD step
W - tau * G (tau in R^(l+1), one step size per layer) changes the loss by
-<T1, tau> + (1/2) T2[tau, tau] - (1/6) T3[tau, tau, tau] + O(|tau|^4).

Structure used (derived in docs/theory.md, second-order instruments). Away from exact zeros of the
pre-activations the activation pattern is locally constant, and the (a,b)-ReLU acts as the
diagonal multiplication h = phi'(z) * z. The logits are then multilinear in (W_0..W_l), so
along s they are a polynomial of degree at most one in each s_k: only mixed derivatives
along distinct layers survive inside the network. Writing z_S for the coefficient of the
monomial prod_{k in S} s_k in the logits,

    T1_a   = l'[z_a]
    T2_ab  = l''[z_a, z_b] + l'[z_ab]                                   (z_aa = 0)
    T3_abc = l'''[z_a, z_b, z_c] + l''[z_ab, z_c] + l''[z_ac, z_b] + l''[z_bc, z_a]
             + l'[z_abc]                                                (repeats vanish)

where l', l'', l''' are the batch-mean derivatives of l(z, y) = logsumexp(z) - z_y:
the gradient g = p - onehot(y), the softmax Hessian S = diag(p) - p p^T, and the third
cumulant of the softmax distribution.

Two implementations:
- ``taylor_coefficients`` meets in the middle. Forward jets carry only the degree-one
  coefficients Z_(k)[{a}]; backward signals carry g, S z_c and the degree-one backward
  jets of g. Every coefficient with two or three layers is an inner product of a backward
  signal at level b+1 with Q_b[a] = Z_(b+1)[{a, b}], the only place two G's meet. At the
  paper size (l = 8, r = 2) this costs about a third of carrying the full degree-three
  polynomial (up to 130 coefficients per layer) and 30 to 100 times less than nested
  autodiff (benchmarks/bench_taylor.py).
- ``taylor_coefficients_autodiff``: nested torch.func derivatives of f, the oracle.

``t1_gram`` and ``t2_gauss_newton_gram`` evaluate the n x n Gram forms of docs/theory.md §4
literally; they are slow and exist to check the theory against the fast paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from beyond_eos.measures import grad_sqnorm_gram
from beyond_eos.model import (
    backward,
    cross_entropy,
    forward,
    gradients,
    multipliers,
    phi,
    phi_prime,
)

log = logging.getLogger(__name__)


@dataclass
class _Point:
    """Float64 forward/backward quantities at W, shared by all the instruments here."""

    W: list[Tensor]  # W_k, (m_(k+1), m_k), k = 0..l
    G: list[Tensor]  # direction G_k, same shapes (the gradient unless given)
    grad: list[Tensor]  # gradient of L_B at W, same shapes
    H: list[Tensor]  # H_k, (n, m_k), k = 0..l
    Z: list[Tensor]  # Z_k, (n, m_k), k = 1..l+1; Z[0] = None
    D: list[Tensor]  # D_k, (n, m_k), k = 1..l+1; D[l+1] = g
    phis: list[Tensor]  # phi'(Z_k), k = 1..l; phis[0] = None
    alphas: list[float]
    p: Tensor  # softmax of the logits, (n, C)


def _linearize(weights, x, y, a, b, grads) -> _Point:
    """Cast float64 copies and run the forward and backward passes of model.py at W."""
    W = [w.detach().to(torch.float64) for w in weights]
    x64 = x.detach().to(torch.float64)
    y = y.detach().to(device=x64.device, dtype=torch.long)
    widths = [x64.shape[1]] + [w.shape[0] for w in W]
    alphas = multipliers(widths, a, b)
    H, Z = forward(W, x64, a, b, alphas)
    D = backward(W, H, Z, y, a, b, alphas)
    grad = gradients(H, D, alphas)
    if grads is None:
        G = grad
    else:
        if len(grads) != len(W):
            raise ValueError(f"grads has {len(grads)} tensors, weights {len(W)}; pass one per W_k")
        G = [g.detach().to(torch.float64) for g in grads]
    phis = [None] + [phi_prime(z, a, b) for z in Z[1:-1]]
    p = torch.softmax(Z[-1], dim=1)
    return _Point(W, G, grad, H, Z, D, phis, alphas, p)


def _centre(u: Tensor, p: Tensor) -> Tensor:
    """u - <p, u> per sample: S u = p * centred(u), and l'' and l''' are moments of it."""
    return u - (p * u).sum(-1, keepdim=True)


def taylor_coefficients(
    weights: list[Tensor],
    x: Tensor,
    y: Tensor,
    a: float = 0.5,
    b: float = 0.5,
    grads: list[Tensor] | None = None,
    order: int = 3,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(T1, T2, T3) of f(s) = L_B(W + s * G) at s = 0, float64, shapes (L,), (L, L), (L, L, L).

    L = l + 1 layers. ``grads`` are the directions G_k (default: the float64 gradient of L_B
    at W, recomputed here). T1_k = <grad_k L_B, G_k>, which is ||G_k||_F^2 when G is the
    gradient. ``order`` = 1 or 2 skips the higher tensors and returns None in their places;
    T1/T2 cost about a third of T1/T2/T3.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    pt = _linearize(weights, x, y, a, b, grads)
    W, G, alphas = pt.W, pt.G, pt.alphas
    n_layers = len(W)
    n = x.shape[0]
    # first derivative: <grad_k L, G_k> (= ||G_k||_F^2 for the gradient itself)
    T1 = torch.stack([(d * g).sum() for d, g in zip(pt.grad, G)])
    if order == 1:
        return T1, None, None

    # Forward jets: at level k, jets[a] = H_k[{a}] = phi'(Z_k) * Z_k[{a}] for a < k, and the
    # middle products Q[k][a] = Z_(k+1)[{a, k}] = alpha_k H_k[{a}] G_k^T (order 3 only).
    E = torch.zeros(n_layers, n_layers, dtype=torch.float64, device=T1.device)
    Q: list[Tensor | None] = [None] * n_layers
    jets = None
    for k in range(n_layers):
        m_next = W[k].shape[0]
        own = alphas[k] * (pt.H[k] @ G[k].T)  # Z_(k+1)[{k}], (n, m_(k+1))
        if k == 0:
            zjet = own[None]
        else:
            flat = jets.reshape(k * n, -1)  # (k n, m_k)
            if order == 3:
                # one matmul for both continuations: through W_k and through G_k
                both = alphas[k] * (flat @ torch.cat([W[k], G[k]]).T)  # (k n, 2 m_(k+1))
                both = both.reshape(k, n, 2 * m_next)
                through_w, Q[k] = both[..., :m_next], both[..., m_next:]
            else:
                through_w = alphas[k] * (flat @ W[k].T).reshape(k, n, m_next)
                # l'[z_ak] = (1/n) <D_(k+1), Q_k[a]> = (1/n) <H_k[{a}], alpha_k D_(k+1) G_k>
                back_g = alphas[k] * (pt.D[k + 1] @ G[k])  # (n, m_k)
                E[:k, k] = (jets.reshape(k, -1) @ back_g.reshape(-1)) / n
            zjet = torch.cat([through_w, own[None]])  # (k+1, n, m_(k+1))
        if k < n_layers - 1:
            jets = pt.phis[k + 1] * zjet

    # Loss derivatives in the logit velocities u_a = z_a = dz/ds_a, shape (L, n, C).
    p, g = pt.p, pt.D[-1]
    ubar = _centre(zjet, p)
    su = p * ubar  # S_i u_i^(a), (L, n, C)
    n_c = n * p.shape[1]
    T2_gn = (su.reshape(n_layers, n_c) @ ubar.reshape(n_layers, n_c).T) / n
    if order == 2:
        return T1, T2_gn + E + E.T, None

    # Backward signals at level b+1, contracted with Q_b: rows are D_(b+1) (for l'[z_ab]),
    # the backward jets D_(b+1)[{c}] for c > b (for l'[z_abc]) and the plain backprop of
    # S z_c for every c (for l''[z_ab, z_c]).
    t_abc = torch.zeros(n_layers, n_layers, n_layers, dtype=torch.float64, device=T1.device)
    f_abc = torch.zeros_like(t_abc)  # f_abc[a, b, c] = l''[z_ab, z_c] for a < b
    r_d, r_jet, r_s = g[None], g.new_zeros(0, *g.shape), su
    for bb in range(n_layers - 1, 0, -1):
        n_jet = r_jet.shape[0]
        R = torch.cat([r_d, r_jet, r_s])  # (1 + n_jet + L, n, m_(bb+1))
        n_rows = R.shape[0]
        # inner products over samples and units: (rows, n m) @ (n m, bb) -> (rows, bb)
        ip = (R.reshape(n_rows, -1) @ Q[bb].reshape(bb, -1).T) / n
        E[:bb, bb] = ip[0]
        t_abc[:bb, bb, bb + 1 :] = ip[1 : 1 + n_jet].T
        f_abc[:bb, bb, :] = ip[1 + n_jet :].T
        if bb == 1:
            break
        # down to level bb: through W_bb for every row, through G_bb for the new jet D_bb[{bb}]
        m_bb = W[bb].shape[1]
        down = alphas[bb] * (R.reshape(-1, R.shape[-1]) @ W[bb])  # (rows n, m_bb)
        down = pt.phis[bb] * down.reshape(n_rows, n, m_bb)
        new_jet = pt.phis[bb] * (alphas[bb] * (r_d[0] @ G[bb]))  # (n, m_bb)
        r_d = down[:1]
        r_jet = torch.cat([new_jet[None], down[1 : 1 + n_jet]])
        r_s = down[1 + n_jet :]

    # Symmetrize: z_ab is symmetric in (a, b); z_abc in all three.
    T2 = T2_gn + E + E.T
    f_abc = f_abc + f_abc.transpose(0, 1)
    t_full = sum(t_abc.permute(*perm) for perm in _PERMS3)
    # l'''[u_a, u_b, u_c] = (1/n) sum_i sum_c p u_a u_b u_c on centred velocities
    cum3 = torch.einsum("anc,bnc,dnc->abd", su, ubar, ubar) / n
    # T3_abc = cum3 + f[ab, c] + f[ac, b] + f[bc, a] + l'[z_abc]
    T3 = cum3 + f_abc + f_abc.permute(0, 2, 1) + f_abc.permute(2, 0, 1) + t_full
    return T1, T2, T3


_PERMS3 = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]


def taylor_coefficients_autodiff(
    weights: list[Tensor],
    x: Tensor,
    y: Tensor,
    a: float = 0.5,
    b: float = 0.5,
    grads: list[Tensor] | None = None,
    order: int = 3,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Oracle for ``taylor_coefficients``: nested torch.func derivatives of f(s), same returns.

    T1 = grad f, T2 = jacfwd(grad f), T3 = jacfwd(jacfwd(grad f)) (forward over reverse).
    The layer maps are written alpha_k (H_k W_k^T + s_k H_k G_k^T), equal to
    alpha_k H_k (W_k + s_k G_k)^T, so that the batched tangents never hold a copy of the
    weights per direction.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    pt = _linearize(weights, x, y, a, b, grads)
    W, G, alphas = pt.W, pt.G, pt.alphas
    x64 = pt.H[0]
    y = y.detach().to(device=x64.device, dtype=torch.long)
    n_layers = len(W)

    def f(s: Tensor) -> Tensor:
        h = x64
        for k in range(n_layers):
            z = alphas[k] * (h @ W[k].T + s[k] * (h @ G[k].T))
            h = phi(z, a, b) if k < n_layers - 1 else z
        return cross_entropy(h, y)

    s0 = torch.zeros(n_layers, dtype=torch.float64, device=x64.device)
    grad_f = torch.func.grad(f)
    T1 = grad_f(s0)
    T2 = torch.func.jacfwd(grad_f)(s0) if order >= 2 else None
    T3 = torch.func.jacfwd(torch.func.jacfwd(grad_f))(s0) if order == 3 else None
    return T1, T2, T3


def taylor_directional(
    weights: list[Tensor],
    x: Tensor,
    y: Tensor,
    tau,
    a: float = 0.5,
    b: float = 0.5,
    grads: list[Tensor] | None = None,
) -> dict[str, float]:
    """One third-order jet of t -> L_B(W + t tau * G) at t = 0, for the step W - tau * G.

    ``tau`` holds the L = l + 1 per-layer step sizes. Returns floats: ``loss`` (L_B at W),
    ``t1_tau`` = <T1, tau>, ``t2_tau`` = T2[tau, tau], ``t3_tau`` = T3[tau, tau, tau], and
    the predicted loss change of the step at orders 1..3: ``d1`` = -t1_tau,
    ``d2`` = d1 + t2_tau / 2, ``d3`` = d2 - t3_tau / 6. Costs about 7 forward passes.
    """
    pt = _linearize(weights, x, y, a, b, grads)
    W, G, alphas = pt.W, pt.G, pt.alphas
    tau = [float(t) for t in tau]
    if len(tau) != len(W):
        raise ValueError(f"tau has {len(tau)} entries, the network {len(W)} layers; one per W_k")
    n, m_0 = pt.H[0].shape

    # Taylor coefficients Z_k^(d), d = 1..3, of the pre-activations along t at a fixed
    # activation pattern: Z_(k+1)^(d) = alpha_k (H_k^(d) W_k^T + tau_k H_k^(d-1) G_k^T).
    jet = pt.H[0].new_zeros(3, n, m_0)  # H_0^(1..3) = 0: the input does not move
    for k in range(len(W)):
        lower = torch.cat([pt.H[k][None], jet[:2]])  # H_k^(0..2), (3, n, m_k)
        zjet = alphas[k] * (jet @ W[k].T + tau[k] * (lower @ G[k].T))  # (3, n, m_(k+1))
        jet = pt.phis[k + 1] * zjet if k < len(W) - 1 else zjet

    # Chain rule for t -> l(z(t)): z' = z1, z'' = 2 z2, z''' = 6 z3 at t = 0.
    p, g = pt.p, pt.D[-1]
    z1, z2, z3 = jet
    c1 = _centre(z1, p)
    t1 = (g * z1).sum() / n
    t2 = ((p * c1 * c1).sum() + 2.0 * (g * z2).sum()) / n
    t3 = ((p * c1**3).sum() + 6.0 * (p * c1 * z2).sum() + 6.0 * (g * z3).sum()) / n
    d1 = -t1.item()
    d2 = d1 + 0.5 * t2.item()
    d3 = d2 - t3.item() / 6.0
    y = y.detach().to(device=p.device, dtype=torch.long)
    return {
        "loss": cross_entropy(pt.Z[-1], y).item(),
        "t1_tau": t1.item(),
        "t2_tau": t2.item(),
        "t3_tau": t3.item(),
        "d1": d1,
        "d2": d2,
        "d3": d3,
    }


def t1_gram(weights: list[Tensor], x: Tensor, y: Tensor, a: float = 0.5, b: float = 0.5) -> Tensor:
    """T1_k = ||G_k||_F^2 = (alpha_k^2 / n^2) <H_k H_k^T, D_(k+1) D_(k+1)^T>_F, shape (L,)."""
    pt = _linearize(weights, x, y, a, b, None)
    return torch.tensor(
        [grad_sqnorm_gram(pt.H[k], pt.D[k + 1], alpha) for k, alpha in enumerate(pt.alphas)],
        dtype=torch.float64,
    )


def logit_velocities_gram(
    weights: list[Tensor], x: Tensor, y: Tensor, a: float = 0.5, b: float = 0.5
) -> Tensor:
    """u_i^(k) = dz_i/ds_k = (alpha_k^2 / n) sum_p K_k[i,p] Gamma_(k+1)[i,p] g_p, (L, n, C).

    Gamma_(k+1)[i,p] = J_i J_p^T, with J_i the (C, m_(k+1)) Jacobian of sample i's logits
    in its z_(k+1), built by backpropagating the identity. Holds (n, n, C, C) per layer.
    """
    pt = _linearize(weights, x, y, a, b, None)
    n, C = pt.p.shape
    g = pt.D[-1]
    # at level l+1, J is the identity on the logits, one copy per sample: (n, C, C)
    J = torch.eye(C, dtype=torch.float64, device=g.device).expand(n, C, C)
    u: list[Tensor | None] = [None] * len(pt.W)
    for k in range(len(pt.W) - 1, -1, -1):
        K = pt.H[k] @ pt.H[k].T  # (n, n)
        gamma = torch.einsum("icm,pdm->ipcd", J, J)  # (n, n, C, C)
        u[k] = pt.alphas[k] ** 2 / n * torch.einsum("ip,ipcd,pd->ic", K, gamma, g)
        if k > 0:
            # J_k = alpha_k (J_(k+1) W_k) * phi'(Z_k): (n, C, m_(k+1)) @ (m_(k+1), m_k)
            J = pt.alphas[k] * (J @ pt.W[k]) * pt.phis[k][:, None, :]
    return torch.stack(u)


def t2_gauss_newton_gram(
    weights: list[Tensor], x: Tensor, y: Tensor, a: float = 0.5, b: float = 0.5
) -> Tensor:
    """Gauss-Newton part T2GN_jk = (1/n) sum_i u_i^(j)T S_i u_i^(k) from the Gram form, (L, L).

    Its diagonal is all of T2's diagonal, since d^2 z / ds_k^2 = 0.
    """
    u = logit_velocities_gram(weights, x, y, a, b)  # (L, n, C)
    W = [w.detach().to(torch.float64) for w in weights]
    p = torch.softmax(forward(W, x.detach().to(torch.float64), a, b)[1][-1], dim=1)
    n = p.shape[0]
    su = p * _centre(u, p)  # S_i u_i^(k), (L, n, C)
    return torch.einsum("jic,kic->jk", su, u) / n
