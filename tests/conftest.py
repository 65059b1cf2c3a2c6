"""Helpers shared by the test modules (``from conftest import ...``).

pytest's default (prepend) import mode puts ``tests/`` on ``sys.path``, so
test modules import these as plain functions.

Floating-point bounds
---------------------
A check of an identity that is exact in real arithmetic (two code paths for
the same number, a gradient that vanishes at a closed-form point, an
idempotent projector) can only fail by rounding, so its tolerance must be
derived from the dtype's machine epsilon and the size of the computation —
never from what one machine's BLAS happened to return.  :func:`fp_tol` is
that bound; :func:`argmin_grad_tol` is the bound on the gradient left at a
minimum that was *located numerically* (where rounding of the loss, not of
the gradient, sets the floor); :func:`moment_gap_tol` and
:func:`sgld_trace_tol` apply it to invariance gaps and to SGLD chains
computed along two code paths.  Each use states its ``scale`` and
``terms`` next to the assertion.  Monte-Carlo tolerances are a different
matter and stay as they are in the tests.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

F64 = torch.float64


@pytest.fixture
def one_thread():
    """Run a test on one thread and restore the count after it. Tiny models run 10-20x faster on one
    thread than on two busy cores (measured on 2 cores). Never call ``torch.set_num_threads`` at a
    module's import: it then holds for every later test of the process (an 18k-parameter MLP in
    test_localization trained to another w* that way)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ----------------------------------------------------------------------------
# floating-point bounds
# ----------------------------------------------------------------------------
#: Extra ulps on top of the worst-case sum bound: each elementwise operation
#: (product, division, exp, tanh, sqrt, ...) adds at most an ulp or two of
#: relative error to a term before it is summed.
FP_ULPS = 4.0


def fp_tol(dtype: torch.dtype = F64, *, scale: float = 1.0, terms: int = 1, cond: float = 1.0,
           ulps: float = FP_ULPS) -> float:
    r"""Rounding bound ``ulps · eps · terms · cond · scale`` for an exact identity.

    Higham's bound for a sum (or dot product) of ``terms`` terms, in any
    order and with any blocking, is :math:`\gamma_n \sum|t_i| \approx n u
    \sum|t_i|` with unit roundoff :math:`u = \varepsilon/2`; two such
    computations of the same number therefore differ by at most
    :math:`n\varepsilon\,\mathrm{scale}`, ``scale`` being the magnitude of
    the summed terms (not of the result: cancellation does not shrink the
    error).  Rounding of the inputs to a solve or decomposition is amplified
    by its condition number ``cond``; ``ulps`` absorbs the few roundings of
    the elementwise operations per term.  This is a worst case: typical
    errors grow like :math:`\sqrt n`, so real bugs (off by O(1), or by the
    size of a term) stay many orders of magnitude above it.
    """
    return float(ulps * torch.finfo(dtype).eps * terms * cond * scale)


def argmin_grad_tol(*, curvature: float, loss_rounding: float) -> float:
    r"""Gradient norm that can remain at a minimum located by a line-search optimizer.

    Line searches (Armijo / strong Wolfe) accept a step only if the loss
    decreases, and both loss values they compare carry rounding
    :math:`\delta L` (``loss_rounding``, e.g. ``fp_tol(dtype, scale=loss,
    terms=...)``), so no decrease below :math:`2\delta L` is seen.  Near a
    minimum the excess loss is :math:`\tfrac12 g^\top H^{-1} g \ge |g|^2 /
    (2h)` with ``h`` the largest curvature (Hessian eigenvalue), so the
    optimizer can stop with :math:`|g| \le \sqrt{4 h\,\delta L}` — the
    familiar :math:`\sqrt{\varepsilon}` floor of minimization.
    """
    return math.sqrt(4.0 * curvature * loss_rounding)


def moment_gap_tol(z: torch.Tensor, weights: torch.Tensor | None = None, weight_terms: float = 0.0) -> float:
    r"""Rounding bound of ``invariance_gap(..., method="moments")`` for data that are exactly
    G-invariant in real arithmetic (exact orbits).

    ``z``: ``(n, D)`` the acted-on vectors (x, or x and y side by side), ``weights`` their weights.
    The gap is :math:`E_g[|\mu - g\mu|^2 + \lVert S - gSg^\top\rVert_F^2]`; the weighted
    means :math:`\mu, S` and their images under :math:`g` (and the orbit points :math:`g x`
    themselves) are sums of ``n + O(D)`` terms of magnitude :math:`E|z|` and :math:`E|z|^2`, so
    each entry of :math:`\mu - g\mu` is at most :math:`2\delta\mu` and of :math:`S - gSg^\top`
    at most :math:`2\delta S`: gap :math:`\le D (2\delta\mu)^2 + D^2 (2\delta S)^2` — a squared
    rounding error, ~1e-25 for O(1) data, while a non-invariant q has a gap of O(|μ|²) or more.
    ``weight_terms``: the weights' own relative rounding, in units of ε (added to the term count).
    """
    z = z.reshape(z.shape[0], -1).double()
    n, D = z.shape
    v = torch.full((n,), 1.0 / n, dtype=z.dtype) if weights is None else weights.double() / weights.double().sum()
    terms = n + 3 * D + weight_terms
    d_mu = fp_tol(F64, scale=float((v * z.abs().sum(1)).sum()), terms=terms)
    d_S = fp_tol(F64, scale=float((v * z.square().sum(1)).sum()), terms=terms)
    return D * (2 * d_mu) ** 2 + D**2 * (2 * d_S) ** 2


def sgld_trace_tol(dtype: torch.dtype = F64, *, steps: int, step_size: float, nbeta: float, n_params: int,
                   loss: float, grad_mag: float, w_mag: float, terms: int, softest: float = 0.0) -> float:
    r"""Bound on the difference of an SGLD loss trace computed along two code paths with the same noise.

    Per step the two updates :math:`w - \tfrac\varepsilon2 (n\beta \nabla L_B + \gamma (w - w^*)) +
    \sqrt\varepsilon\,\xi` differ by the gradient's rounding times :math:`\varepsilon n\beta/2`
    (``fp_tol(scale=grad_mag, terms=terms)``, ``grad_mag`` the magnitude of the summed per-sample
    gradient terms) plus a few roundings of :math:`|w|` (``w_mag``).  The update's Jacobian
    :math:`I - \tfrac\varepsilon2 \nabla^2 U` expands differences by at most
    :math:`1 + \tfrac\varepsilon2 \max(0, -\lambda_{\min}(\nabla^2 U))` per step (``softest`` =
    that negative-curvature magnitude, 0 for a convex localized potential), so after ``steps`` steps
    the iterates differ by at most ``steps · per_step · e^{steps ε softest / 2}`` per coordinate.
    The loss moves by at most ``n_params · grad_mag`` times that, plus its own rounding.
    """
    per_step = 0.5 * step_size * nbeta * fp_tol(dtype, scale=grad_mag, terms=terms) + fp_tol(dtype, scale=w_mag, terms=3)
    drift = steps * per_step * math.exp(0.5 * step_size * softest * steps)
    return n_params * grad_mag * drift + fp_tol(dtype, scale=loss, terms=terms)


def fan_in(model: nn.Module) -> int:
    """Summed fan-ins of a model (trailing dimension of every parameter): the terms a forward pass adds up."""
    return sum(p.shape[-1] if p.ndim else 1 for p in model.parameters())


def engine_trace_tol(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, loss_trace: torch.Tensor, *,
                     steps: int, step_size: float, nbeta: float, localization: float, batch_rows: int) -> float:
    """:func:`sgld_trace_tol` for an ``slt.estimate_llc`` run from w* = the model's parameters:
    ``steps`` SGLD steps (burn-in + draws) on batches of ``batch_rows`` rows of ``(x, y)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    H = flat_hessian_eigvalsh(model, lambda p: loss_fn(torch.func.functional_call(model, p, (x,)), y))
    softest = max(0.0, -(nbeta * float(H[0]) + localization))  # λ_min of ∇²U = nβ ∇²L + γ, where negative
    rows = y.reshape(y.shape[0], -1).shape[1]
    return sgld_trace_tol(
        x.dtype, steps=steps, step_size=step_size, nbeta=nbeta, n_params=sum(p.numel() for p in params.values()),
        loss=float(loss_trace.abs().max()), grad_mag=grad_term_magnitude(model, loss_fn, x, y),
        w_mag=max(float(p.abs().max()) for p in params.values()), terms=batch_rows * rows + fan_in(model),
        softest=softest)


def flat_hessian_eigvalsh(model: nn.Module, loss_of_params) -> torch.Tensor:
    """Ascending eigenvalues of the Hessian of ``loss_of_params(params)`` in the model's flattened
    parameters (``params``: name -> tensor, as for ``torch.func.functional_call``)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(v: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            k = math.prod(shape)
            params[name] = v[i:i + k].reshape(shape)
            i += k
        return loss_of_params(params)

    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, flat))


def grad_term_magnitude(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                        weights: torch.Tensor | None = None) -> float:
    r"""Largest entry of :math:`\sum_i v_i |\nabla \ell_i(w)|`: the magnitude of the terms a
    full-batch gradient sums (``v`` the normalized weights, uniform by default), i.e. the
    ``scale`` of its rounding bound.  ``ℓ_i`` is ``loss_fn`` on the one-row batch ``i``."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    v = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype) if weights is None else weights / weights.sum()
    return max(float((v.reshape(-1, *[1] * (g.ndim - 1)) * g.abs()).sum(0).max()) for g in per.values())


# ----------------------------------------------------------------------------
# random numbers and data
# ----------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed`` (tests never touch the global RNG)."""
    return torch.Generator().manual_seed(seed)


def random_rotation(m: int, g: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal (m, m) matrix: QR of a Gaussian matrix with the signs of R's diagonal fixed."""
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def linear_regression(n: int, d: int = 3, seed: int = 0):
    """``y = x·w + N(0, 1)`` with ``w = linspace(-1, 1, d)``, ``x ~ N(0, I_d)``, in float64.

    Returns ``(model, X, Y)``: a bias-free ``nn.Linear(d, 1)`` set to the
    least-squares solution, i.e. the exact empirical minimum of the mean
    squared error.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.linspace(-1.0, 1.0, d, dtype=torch.float64).unsqueeze(1)
    Y = X @ w_true + torch.randn(n, 1, generator=g, dtype=torch.float64)
    m = nn.Linear(d, 1, bias=False).to(torch.float64)
    with torch.no_grad():  # w* = least squares: the empirical minimum
        m.weight.copy_(torch.linalg.lstsq(X, Y).solution.T)
    return m, X, Y


class LinearBatchNorm(nn.Module):
    """``BatchNorm1d(Linear(3, 2)(x))``: in train mode ``vmap`` cannot run it (the path falls back to a loop)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.lin(x))


class PlainLocation(nn.Module):
    """Density model N(μ, I) in R²: a plain module (no ``forward_chains``) whose output is μ for every row."""

    def __init__(self):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self, x):
        return self.mu.expand_as(x)


def unit_gaussian_nll(out, x):
    """−log N(x | out, I) up to a constant, averaged over rows."""
    return 0.5 * ((x - out) ** 2).sum(-1).mean()


# ----------------------------------------------------------------------------
# exact references
# ----------------------------------------------------------------------------
def polar_mean(a, b):
    """μ(r, φ) = r (cos φ, sin φ) of the polar Gaussian location model."""
    return torch.stack([a * torch.cos(b), a * torch.sin(b)], -1)


def quadrature_llc(mean_fn, w_star, xbar, nbeta, gamma, half, num):
    r"""E[nβ(L_n(w) − L_n(w*))] under exp(−nβ L_n − γ/2|w − w*|²) on a 2-D grid
    (w* ± half, ``num`` points a side), with L_n(w) = ½|μ(w) − x̄|²."""
    ws = [torch.linspace(float(w_star[i]) - half[i], float(w_star[i]) + half[i], num, dtype=F64) for i in range(2)]
    A, B = torch.meshgrid(*ws, indexing="ij")
    L = 0.5 * (mean_fn(A, B) - xbar).square().sum(-1)
    Ls = 0.5 * (mean_fn(torch.tensor(float(w_star[0]), dtype=F64), torch.tensor(float(w_star[1]), dtype=F64)) - xbar).square().sum()
    logp = -nbeta * L - gamma / 2 * ((A - float(w_star[0])) ** 2 + (B - float(w_star[1])) ** 2)
    p = torch.exp(logp - logp.max())
    p = p / p.sum()
    return float(nbeta * ((p * L).sum() - Ls))


# ----------------------------------------------------------------------------
# warning filters
# ----------------------------------------------------------------------------
#: The engine warns of its findings (w* not a minimum of the loss, ...) as ``slt.estimate_llc: ...``
#: (one model) or ``slt.estimate_llc (checkpoint ...``; tests that sample at hand-set points are not about that.
IGNORE_CHECKPOINT_WARNING = pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")

#: The symmetry tests sample at quenched / symmetrized points where the engine's
#: diagnostics warn by design.
IGNORE_RUNTIME_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")
