r"""Density models with exact answers for the symmetry experiments.

All are :class:`~slt.models.ChainModule` density models (data ``X`` alone,
loss ``model.default_loss(model(x), x)``, the per-sample negative
log-likelihood up to an additive constant, honouring weights through the engine).

Gaussian location models (continuous, :math:`x \in \mathbb R^m`, unit covariance)
-------------------------------------------------------------------------------
The output is the mean, the loss :func:`slt.models.losses.gaussian_nll`
(:math:`\tfrac12\lVert x - \mu(w)\rVert^2`), so
:math:`L_n(w) = \tfrac12\lVert \bar x - \mu(w)\rVert^2 + \text{const}` with
:math:`\bar x` the weighted sample mean.

* :class:`GaussianLocation`: :math:`\mu(w) = w \in \mathbb R^d`, regular, :math:`\lambda = d/2`.
* :class:`PolarGaussianLocation`: :math:`\mu(w) = w_1(\cos w_2, \sin w_2)`.
  If :math:`E_q x = 0` (e.g. :math:`q` is SO(2)-invariant) the optimal set is
  the line :math:`w_1 = 0` and :math:`\lambda = 1/2`: the Jacobian of
  :math:`(w_1, w_2)\mapsto\mu` loses rank there and the flat prior in
  :math:`(w_1, w_2)` is :math:`\propto 1/|\mu|` in the plane, so
  :math:`E[n\beta\lVert\mu\rVert^2/2] = 1/2`.  If :math:`E_q x \ne 0`,
  :math:`w^*` is regular and :math:`\lambda = 1`.
* :class:`ABSquaredGaussian`: :math:`N(a b^2, 1)` on :math:`\mathbb R`.
  With :math:`E_q x = 0` (e.g. :math:`q` invariant under :math:`x\mapsto -x`),
  :math:`K = \tfrac12 a^2 b^4` is a normal crossing and :math:`\lambda = 1/4`;
  with :math:`E_q x \ne 0` the optimal set :math:`a b^2 = E_q x` is a smooth
  curve and :math:`\lambda = 1/2`.

Finite-sample-space exponential families (exact normalizer)
---------------------------------------------------------
On a finite support :math:`\{s_1, \dots, s_S\} \subset \mathbb R^m` (data rows
must be support points; a row that is not raises ``ValueError``):

* :class:`ExponentialFamily`: :math:`p(s \mid \theta) \propto \exp\langle\theta, T(s)\rangle`
  with fixed features :math:`T`.  If :math:`T` is G-equivariant
  (:math:`T(gs) = \rho(g) T(s)`) the symmetry holds for every :math:`\theta`;
  if the family is identifiable (centred features of rank :math:`d`) the
  optimum is unique and regular, :math:`\lambda = d/2`, whether or not
  :math:`q` is G-invariant (the negative control of :mod:`slt.symmetry`).
* :class:`ParametricFeatureFamily`: :math:`p(s\mid\theta_1,\theta_2) \propto
  \exp\langle\theta_1, T_{\theta_2}(s)\rangle` with parameter-dependent
  features; whether :math:`T_{\theta_2}` is equivariant depends on
  :math:`\theta_2`, so equivariant optima can be more degenerate.

For these the output of the model is the per-sample negative log-likelihood
itself, ``(C, B, 1)``, and :func:`nll_output_loss` averages it (the target is
ignored).  See the note "data symmetry and degeneracy" in
``shared/seeds/`` and Watanabe (2009), *Algebraic Geometry and Statistical
Learning Theory*, for :math:`\lambda`.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .base import ChainModule
from .losses import gaussian_nll

__all__ = [
    "GaussianLocation",
    "PolarGaussianLocation",
    "ABSquaredGaussian",
    "ExponentialFamily",
    "ParametricFeatureFamily",
    "nll_output_loss",
    "polygon_support",
    "hypercube_support",
    "weighted_mean",
]


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def weighted_mean(x: Tensor, weights: Tensor | None = None) -> Tensor:
    """(n, m), optional (n,) non-negative weights -> (m,) (normalized-)weighted mean."""
    if weights is None:
        return x.mean(0)
    w = weights.to(x.dtype)
    if w.ndim != 1 or w.shape[0] != x.shape[0] or (w < 0).any() or not (w > 0).any():
        raise ValueError("weights must be a non-negative (n,) tensor with a positive sum")
    return (w[:, None] * x).sum(0) / w.sum()


def _check_density_input(x: Tensor, m: int, chains: bool) -> None:
    want = 3 if chains else 2
    if x.ndim != want or x.shape[-1] != m:
        shape = "(C, B, %d)" % m if chains else "(B, %d)" % m
        raise ValueError(f"expected input of shape {shape}, got {tuple(x.shape)}")


def _nll_output_per_sample(output: Tensor, target: Tensor) -> Tensor:
    # (..., B, 1) -> (..., B)
    if output.shape[-1] != 1:
        raise ValueError(f"expected model output (..., B, 1) of per-sample NLLs, got {tuple(output.shape)}")
    return output[..., 0]


def nll_output_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean of a model output that *is* the per-sample NLL, ``(B, 1)`` -> scalar.

    The loss of :class:`ExponentialFamily` and :class:`ParametricFeatureFamily`;
    ``target`` is ignored.  ``nll_output_loss.per_sample(output, target)``
    returns ``(..., B)``.
    """
    return _nll_output_per_sample(output, target).mean()


nll_output_loss.per_sample = _nll_output_per_sample  # type: ignore[attr-defined]


def polygon_support(k: int, radius: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
    r"""The vertices :math:`r(\cos 2\pi j/k, \sin 2\pi j/k)` of the regular k-gon, ``(k, 2)``
    (invariant under :class:`slt.symmetry.Dihedral` ``(k)``)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    a = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    return (radius * torch.stack([a.cos(), a.sin()], 1)).to(dtype or torch.get_default_dtype())


def hypercube_support(m: int, dtype: torch.dtype | None = None) -> Tensor:
    r""":math:`\{-1, 1\}^m`, ``(2^m, m)`` (invariant under sign flips and permutations)."""
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 16:
        raise ValueError(f"m must be an integer in [1, 16], got {m!r}")
    idx = torch.arange(2**m)
    bits = (idx[:, None] >> torch.arange(m - 1, -1, -1)) & 1
    return (2.0 * bits - 1.0).to(dtype or torch.get_default_dtype())


# ----------------------------------------------------------------------------
# Gaussian location models
# ----------------------------------------------------------------------------
class _GaussianMeanModel(ChainModule):
    """Base: output = mean (C, B, m) broadcast over the batch; loss = gaussian_nll."""

    event_dim: int

    def mean_chains(self, params: Mapping[str, Tensor]) -> Tensor:  # (C, m)
        raise NotImplementedError

    def forward_chains(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``(C, B, m) -> (C, B, m)``: the mean of the model at each chain's parameters."""
        _check_density_input(x, self.event_dim, chains=True)
        mu = self.mean_chains(params)  # (C, m)
        return mu[:, None, :].expand(x.shape[0], x.shape[1], self.event_dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, m) -> (B, m)
        _check_density_input(x, self.event_dim, chains=False)
        return super().forward(x)

    #: :math:`\tfrac12\lVert x - \mu\rVert^2` averaged (:func:`slt.models.losses.gaussian_nll`, with ``per_sample``)
    default_loss = staticmethod(gaussian_nll)

    def mean(self, w: Tensor | None = None) -> Tensor:
        """The mean :math:`\\mu(w)` at ``w`` (default: the module's parameters), ``(m,)``."""
        params = {n: (p if w is None else w).unsqueeze(0) for n, p in self.named_parameters()}
        return self.mean_chains(params)[0]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` draws from :math:`N(\\mu(w), I)` at the module's parameters, ``(n, m)``."""
        mu = self.mean().detach()
        z = torch.randn((n, self.event_dim), generator=generator, dtype=mu.dtype, device=generator.device)
        return mu + z


class GaussianLocation(_GaussianMeanModel):
    r""":math:`p(x\mid w) = N(w, I_d)`: regular, :math:`\lambda = d/2`.

    :math:`L_n(w) = \tfrac12\lVert w - \bar x\rVert^2 + \text{const}` is exactly
    quadratic, so the localized posterior is Gaussian and every LLC quantity
    has a closed form (see :func:`slt.theory.exact_quadratic_llc`).

    Parameters
    ----------
    d
        Dimension.
    init
        Initial mean (default 0).
    """

    def __init__(self, d: int, init: Tensor | None = None, *, dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be an integer >= 1, got {d!r}")
        self.event_dim = d
        w0 = torch.zeros(d, dtype=dtype) if init is None else torch.as_tensor(init, dtype=dtype).clone()
        if w0.shape != (d,):
            raise ValueError(f"init must have shape ({d},), got {tuple(w0.shape)}")
        self.w = nn.Parameter(w0)

    @property
    def learning_coefficient(self) -> float:
        return self.event_dim / 2

    def mean_chains(self, params: Mapping[str, Tensor]) -> Tensor:
        return params["w"]

    @torch.no_grad()
    def empirical_minimum(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """:math:`\\bar x`, the minimiser of :math:`L_n`, ``(d,)``."""
        _check_density_input(x, self.event_dim, chains=False)
        return weighted_mean(x, weights).to(self.w.dtype)


class PolarGaussianLocation(_GaussianMeanModel):
    r""":math:`p(x\mid w) = N(w_1(\cos w_2, \sin w_2), I_2)`, parameter ``w = (w1, w2)``.

    :math:`\lambda = 1/2` at an SO(2)-invariant (mean-zero) :math:`q`, where
    the optimal set is the line :math:`w_1 = 0`; :math:`\lambda = 1` when
    :math:`E_q x \neq 0`.  The SO(2) symmetry of :math:`q` is emulated by the
    parameter :math:`w_2` (:math:`p(R_\theta x\mid w_1, w_2) = p(x\mid w_1, w_2-\theta)`).
    """

    def __init__(self, init: tuple[float, float] = (0.0, 0.0), *, dtype: torch.dtype | None = None):
        super().__init__()
        self.event_dim = 2
        self.w = nn.Parameter(torch.tensor([float(init[0]), float(init[1])], dtype=dtype))

    def mean_chains(self, params: Mapping[str, Tensor]) -> Tensor:
        w = params["w"]  # (C, 2)
        r, phi = w[:, 0], w[:, 1]
        return torch.stack([r * torch.cos(phi), r * torch.sin(phi)], 1)

    @torch.no_grad()
    def empirical_minimum(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        r"""A minimiser of :math:`L_n`: :math:`(\lVert\bar x\rVert, \operatorname{atan2}(\bar x_2, \bar x_1))`."""
        _check_density_input(x, 2, chains=False)
        m = weighted_mean(x, weights)
        return torch.stack([m.norm(), torch.atan2(m[1], m[0])]).to(self.w.dtype)


class ABSquaredGaussian(_GaussianMeanModel):
    r""":math:`p(x\mid a, b) = N(a b^2, 1)` on :math:`\mathbb R` (data ``(n, 1)``), parameter ``w = (a, b)``.

    :math:`\lambda = 1/4` for a reflection-invariant :math:`q` (:math:`E_q x = 0`:
    :math:`K = \tfrac12 a^2 b^4`), :math:`1/2` for :math:`E_q x \neq 0`.  The
    reflection :math:`x \mapsto -x` is emulated by :math:`a \mapsto -a`.
    """

    def __init__(self, init: tuple[float, float] = (0.0, 0.0), *, dtype: torch.dtype | None = None):
        super().__init__()
        self.event_dim = 1
        self.w = nn.Parameter(torch.tensor([float(init[0]), float(init[1])], dtype=dtype))

    def mean_chains(self, params: Mapping[str, Tensor]) -> Tensor:
        w = params["w"]
        return (w[:, 0] * w[:, 1].square()).unsqueeze(1)  # (C, 1)

    @torch.no_grad()
    def empirical_minimum(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        r"""The balanced minimiser :math:`|a| = |b| = |\bar x|^{1/3}`, :math:`\operatorname{sign} a = \operatorname{sign}\bar x`
        (``(0, 0)`` when :math:`\bar x = 0`)."""
        _check_density_input(x, 1, chains=False)
        m = weighted_mean(x, weights)[0]
        mag = m.abs() ** (1.0 / 3.0)
        return torch.stack([torch.sign(m) * mag, mag]).to(self.w.dtype)


# ----------------------------------------------------------------------------
# finite sample spaces
# ----------------------------------------------------------------------------
class _FiniteSupportModel(ChainModule):
    """Base for models on a finite support; output = per-sample NLL (C, B, 1)."""

    def _init_support(self, support: Tensor, tol: float) -> None:
        if not isinstance(support, Tensor) or support.ndim != 2 or support.shape[0] < 2:
            raise ValueError("support must be an (S, m) tensor of S >= 2 distinct points")
        if not torch.isfinite(support).all():
            raise ValueError("support contains NaN or inf")
        dist = torch.cdist(support.double(), support.double())
        dist.fill_diagonal_(float("inf"))
        if float(dist.min()) <= 2 * tol:
            raise ValueError("support points must be distinct (further apart than 2 * tol)")
        self.register_buffer("support", support.clone())
        self.tol = float(tol)
        self.event_dim = support.shape[1]

    def index_of(self, x: Tensor) -> Tensor:
        """Support index of each row: ``(..., m) -> (...)``; raises for a point off the support."""
        if x.shape[-1] != self.event_dim:
            raise ValueError(f"data points have length {x.shape[-1]}, the support has length {self.event_dim}")
        flat = x.reshape(-1, self.event_dim)
        d2 = torch.cdist(flat.to(self.support.dtype), self.support)  # (N, S)
        dmin, idx = d2.min(1)
        if bool((dmin > self.tol).any()):
            bad = int((dmin > self.tol).nonzero()[0])
            raise ValueError(
                f"data point {flat[bad].tolist()} is not in the model's finite sample space "
                f"(nearest support point at distance {float(dmin[bad]):.3g} > tol={self.tol:g})"
            )
        return idx.reshape(x.shape[:-1])

    def log_prob_chains(self, params: Mapping[str, Tensor]) -> Tensor:  # (C, S)
        raise NotImplementedError

    def log_prob(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Exact :math:`\\log p(s_j)` over the support at the module's parameters, ``(S,)``."""
        if params is None:
            params = {n: p.unsqueeze(0) for n, p in self.named_parameters()}
            return self.log_prob_chains(params)[0]
        return self.log_prob_chains(params)

    def forward_chains(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``(C, B, m) -> (C, B, 1)``: :math:`-\\log p(x_b \\mid w_c)`."""
        _check_density_input(x, self.event_dim, chains=True)
        lp = self.log_prob_chains(params)  # (C, S)
        idx = self.index_of(x)  # (C, B)
        return -torch.gather(lp, 1, idx).unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:  # (B, m) -> (B, 1)
        _check_density_input(x, self.event_dim, chains=False)
        return super().forward(x)

    #: :func:`nll_output_loss`: the mean per-sample NLL (the output), with ``per_sample``
    default_loss = staticmethod(nll_output_loss)

    def sample(self, n: int, generator: torch.Generator, probs: Tensor | None = None) -> Tensor:
        """``n`` i.i.d. support points from :math:`p(\\cdot\\mid w)` (or from ``probs``, ``(S,)``), ``(n, m)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        p = self.log_prob().detach().exp() if probs is None else torch.as_tensor(probs, dtype=torch.float64)
        if p.shape != (self.support.shape[0],) or (p < 0).any() or not (p > 0).any():
            raise ValueError(f"probs must be a non-negative vector of length {self.support.shape[0]}")
        idx = torch.multinomial(p.double().cpu(), n, replacement=True, generator=generator)
        return self.support[idx.to(self.support.device)].clone()


class ExponentialFamily(_FiniteSupportModel):
    r""":math:`p(s\mid\theta) = \exp(\langle\theta, T(s)\rangle - A(\theta))` on a finite support.

    :math:`A(\theta) = \log\sum_j \exp\langle\theta, T(s_j)\rangle` exactly.
    The Hessian of the population loss at :math:`\theta` is the Fisher
    information :math:`\operatorname{Cov}_{p_\theta}[T]` (:meth:`fisher_information`);
    it is positive definite, so :math:`\lambda = d/2`, iff the centred features
    have rank :math:`d` (identifiability, checked).

    Parameters
    ----------
    support
        ``(S, m)`` distinct points.
    features
        ``(S, d)`` feature matrix :math:`T(s_j)`, or a callable ``support -> (S, d)``.
        Default: :math:`T(s) = s` (equivariant under every linear action
        preserving the support, :math:`\rho(g) = g`).
    init
        Initial :math:`\theta` (default 0: the uniform distribution).
    tol
        Distance within which a data row matches a support point.
    """

    def __init__(
        self, support: Tensor, features: Tensor | Callable[[Tensor], Tensor] | None = None,
        init: Tensor | None = None, *, tol: float = 1e-4,
    ):
        super().__init__()
        self._init_support(support, tol)
        T = support if features is None else (features(support) if callable(features) else features)
        T = torch.as_tensor(T, dtype=support.dtype)
        if T.ndim != 2 or T.shape[0] != support.shape[0]:
            raise ValueError(f"features must be (S, d) with S={support.shape[0]}, got {tuple(T.shape)}")
        Tc = (T - T.mean(0)).double()
        rank = int(torch.linalg.matrix_rank(Tc))
        if rank < T.shape[1]:
            raise ValueError(
                f"the family is not identifiable: centred features have rank {rank} < d={T.shape[1]}"
            )
        self.register_buffer("features", T.clone())
        th = torch.zeros(T.shape[1], dtype=support.dtype) if init is None else torch.as_tensor(init, dtype=support.dtype).clone()
        if th.shape != (T.shape[1],):
            raise ValueError(f"init must have shape ({T.shape[1]},)")
        self.theta = nn.Parameter(th)

    @property
    def learning_coefficient(self) -> float:
        return self.features.shape[1] / 2

    def log_prob_chains(self, params: Mapping[str, Tensor]) -> Tensor:
        eta = params["theta"] @ self.features.T  # (C, S)
        return eta - torch.logsumexp(eta, dim=1, keepdim=True)

    def fisher_information(self, theta: Tensor | None = None) -> Tensor:
        r""":math:`\operatorname{Cov}_{p_\theta}[T]`, ``(d, d)`` (the Hessian of :math:`E_q[-\log p]` in :math:`\theta`)."""
        th = (self.theta if theta is None else theta).detach().double()
        T = self.features.double()
        p = torch.softmax(T @ th, 0)
        mu = p @ T
        return (T - mu).T @ (p[:, None] * (T - mu))

    @torch.no_grad()
    def fit(self, x: Tensor, weights: Tensor | None = None, iters: int = 100) -> Tensor:
        r"""The maximum-likelihood :math:`\hat\theta` (moment matching :math:`E_{\hat\theta}T = \bar T`)
        by Newton's method, ``(d,)``.  Raises if :math:`\bar T` is on the boundary
        (a support point has zero empirical mass in a direction: no finite MLE)."""
        idx = self.index_of(x)
        counts = torch.zeros(self.support.shape[0], dtype=torch.float64, device=x.device)
        w = torch.ones(idx.shape[0], dtype=torch.float64) if weights is None else weights.double()
        counts.index_add_(0, idx, w.to(counts.device))
        qhat = counts / counts.sum()
        T = self.features.double()
        target = qhat @ T
        th = torch.zeros(T.shape[1], dtype=torch.float64)
        for _ in range(iters):
            p = torch.softmax(T @ th, 0)
            g = p @ T - target
            H = (T - p @ T).T @ (p[:, None] * (T - p @ T))
            step = torch.linalg.solve(H + 1e-12 * torch.eye(H.shape[0], dtype=H.dtype), g)
            th = th - step
            if float(g.norm()) < 1e-12:
                break
        if not torch.isfinite(th).all() or float(g.norm()) > 1e-6:
            raise ValueError("no finite maximum-likelihood estimate (empirical mean on the boundary)")
        return th.to(self.theta.dtype)


class ParametricFeatureFamily(_FiniteSupportModel):
    r""":math:`p(s\mid\theta_1,\theta_2) \propto \exp\langle\theta_1, T_{\theta_2}(s)\rangle` on a finite support.

    Parameters
    ----------
    support
        ``(S, m)`` distinct points.
    feature_fn
        ``feature_fn(theta2, support) -> (C, S, d1)`` for ``theta2`` of shape
        ``(C, d2)``: the parameter-dependent features, batched over chains.
    dim1, dim2
        Sizes of :math:`\theta_1` and :math:`\theta_2`.
    init1, init2
        Initial values (default zeros).
    tol
        Distance within which a data row matches a support point.

    Notes
    -----
    :meth:`polar` builds :math:`T_\varphi(s) = \langle(\cos\varphi, \sin\varphi), s\rangle`
    (``d1 = d2 = 1``) on a planar support: :math:`p \propto \exp(r\langle u_\varphi, s\rangle)`,
    the finite-support analogue of :class:`PolarGaussianLocation`.  On the
    k-gon with uniform (Dihedral-invariant) :math:`q` the optimum is
    :math:`r = 0` for every :math:`\varphi` (:math:`\lambda = 1/2`); for a
    non-invariant :math:`q` with non-zero mean it is regular (:math:`\lambda = 1`).
    """

    def __init__(
        self, support: Tensor, feature_fn: Callable[[Tensor, Tensor], Tensor], dim1: int, dim2: int,
        init1: Tensor | None = None, init2: Tensor | None = None, *, tol: float = 1e-4,
    ):
        super().__init__()
        self._init_support(support, tol)
        if not callable(feature_fn):
            raise TypeError("feature_fn must be callable: (theta2 (C, d2), support (S, m)) -> (C, S, d1)")
        for nm, v in (("dim1", dim1), ("dim2", dim2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be an integer >= 1, got {v!r}")
        self.feature_fn = feature_fn
        dt = support.dtype
        self.theta1 = nn.Parameter(torch.zeros(dim1, dtype=dt) if init1 is None else torch.as_tensor(init1, dtype=dt).clone())
        self.theta2 = nn.Parameter(torch.zeros(dim2, dtype=dt) if init2 is None else torch.as_tensor(init2, dtype=dt).clone())
        if self.theta1.shape != (dim1,) or self.theta2.shape != (dim2,):
            raise ValueError("init1/init2 must have shapes (dim1,) and (dim2,)")
        probe = feature_fn(self.theta2.detach().unsqueeze(0), self.support)
        if not isinstance(probe, Tensor) or probe.shape != (1, support.shape[0], dim1):
            raise ValueError(
                f"feature_fn must return (C, S, d1) = (1, {support.shape[0]}, {dim1}), got "
                f"{tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__}"
            )

    @classmethod
    def polar(cls, support: Tensor, init: tuple[float, float] = (0.0, 0.0), **kw) -> "ParametricFeatureFamily":
        r""":math:`T_\varphi(s) = \langle(\cos\varphi, \sin\varphi), s\rangle` on a planar support ``(S, 2)``."""
        if support.ndim != 2 or support.shape[1] != 2:
            raise ValueError("polar features need a planar support (S, 2)")

        def feats(theta2: Tensor, supp: Tensor) -> Tensor:
            u = torch.stack([theta2[:, 0].cos(), theta2[:, 0].sin()], 1)  # (C, 2)
            return (u @ supp.T).unsqueeze(-1)  # (C, S, 1)

        return cls(support, feats, 1, 1, torch.tensor([init[0]]), torch.tensor([init[1]]), **kw)

    def log_prob_chains(self, params: Mapping[str, Tensor]) -> Tensor:
        T = self.feature_fn(params["theta2"], self.support)  # (C, S, d1)
        eta = (T * params["theta1"][:, None, :]).sum(-1)  # (C, S)
        return eta - torch.logsumexp(eta, dim=1, keepdim=True)
