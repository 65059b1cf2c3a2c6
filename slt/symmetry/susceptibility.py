r"""LLC susceptibility: how λ̂ responds to moving the data distribution.

Along the mixture path :math:`q_h = (1-h)\,q_0 + h\,q_1` the loss is
:math:`L_h = L_{q_0} + h\,\Delta L` with :math:`\Delta L = L_{q_1} - L_{q_0}`,
and the localized tempered posterior at ``h`` is
:math:`p_h(w) \propto \exp(-n\beta L_h(w) - \tfrac\gamma2\lVert w - w^*\rVert^2)`.

Covariance (fluctuation–dissipation) estimator
----------------------------------------------
With :math:`w^*` held fixed ("quenched"), differentiating
:math:`\hat\lambda(h) = n\beta(E_h[L_h] - L_h(w^*))` under the integral gives,
from one set of draws at ``h``,

.. math::

    \frac{d\hat\lambda}{dh} = n\beta\bigl(E_h[\Delta L] - \Delta L(w^*)\bigr)
        - (n\beta)^2 \operatorname{Cov}_h(L_h, \Delta L),

and for an observable :math:`\varphi(w)` the susceptibility

.. math:: \chi_\varphi = \frac{d}{dh} E_h[\varphi] = -n\beta\,\operatorname{Cov}_h(\varphi, \Delta L).

Normalisation: ``chi`` includes the factor :math:`n\beta`, so it is the
derivative of :math:`E_h[\varphi]`.  Baker, Wang, Hoogland, Pathak & Murfet
(2025, "Structural inference: interpreting small language models with
susceptibilities", arXiv 2504.18274) report :math:`-\operatorname{Cov}[\varphi, \Delta L]`
without it, i.e. ``chi / nbeta`` (:attr:`SusceptibilityResult.chi_baker`).

:math:`L_h` and :math:`\Delta L` are evaluated on the *full* data sets at every
draw (as engine observables, batched over chains), not on the sampler's
minibatches, so minibatch noise does not enter the covariance.

Finite differences
------------------
:func:`llc_finite_difference` estimates λ̂ at several ``h`` -- with
:math:`w^*` fixed (``mode="quenched"``, the quantity the covariance formula
differentiates) or re-trained on each :math:`q_h` (``mode="retrained"``) --
with the same seed at every ``h`` (common random numbers: chain ``c`` sees the
same noise at every ``h``), fits a polynomial in ``h`` per chain and reports the
derivative with the chain-to-chain standard error (chains are independent, so
their paired slopes are i.i.d.).

Monte-Carlo error
-----------------
Each estimate above is a mean over draws.  Its standard error is the larger of
(i) the spread across chains and (ii) a batch-means error over
(chain, block) replicates (``num_blocks`` blocks per chain), each replicate
centred at the pooled means so that the replicates average to the pooled
estimate.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._runtime import autograd_allowed
from .._checks import check_int, check_real
from ..data import Data
from ..engine import default_nbeta, estimate_llc
from ..params import ParamSpec
from ..result import LLCResult
from ..target import prepare_target, resolve_dtype
from .operations import _check_compatible, _check_t, as_data, mix

__all__ = [
    "SusceptibilityResult",
    "FiniteDifferenceResult",
    "llc_susceptibility",
    "llc_susceptibilities",
    "llc_finite_difference",
    "full_data_loss",
]

_L0, _L1 = "loss_q0", "loss_q1"


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def full_data_loss(
    model: nn.Module, data: Any, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
) -> Callable[[Mapping[str, Tensor]], Tensor]:
    r"""An engine observable computing the full-data (weighted) loss :math:`L_q(w)`.

    Parameters
    ----------
    model
        The module (its structure; parameters are supplied per call).
    data
        The data set ``q`` (any tensor form, weights honoured).
    loss_fn
        Mean loss; default ``model.default_loss``.
    dtype, device
        Those the engine samples in (``dtype=None``: the model's precision, as :func:`slt.estimate_llc`).

    Returns
    -------
    callable
        ``f(params) -> (C,)`` with ``params`` a mapping ``name -> (C, *shape)``
        (the engine's ``observables`` convention).
    """
    dtype = resolve_dtype(dtype, model)[0]
    target = prepare_target(model, as_data(data), _resolve_loss(model, loss_fn), dtype=dtype, device=device,
                            nbeta=1.0, caller="slt.symmetry")  # (nβ unused)
    spec, batch = target.spec, target.full_batch()

    def f(params: Mapping[str, Tensor]) -> Tensor:
        flat = torch.cat([params[n].reshape(params[n].shape[0], -1) for n in spec.names], 1)
        with torch.no_grad():
            return target.evaluator.losses(flat.to(dtype), batch)

    return f


def _resolve_loss(model: nn.Module, loss_fn: Callable | None) -> Callable:
    if loss_fn is None:
        loss_fn = getattr(model, "default_loss", None)
        if loss_fn is None:
            raise ValueError("loss_fn is required (the model defines no default_loss)")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    return loss_fn


def _star_params(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> dict[str, Tensor]:
    return {n: p.detach().to(device=device, dtype=dtype).unsqueeze(0) for n, p in model.named_parameters() if p.requires_grad}


def _replicates(x: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """(C, T, ...) -> per-chain means (C, ...) and per-(chain, block) means (C*B, ...)."""
    C, T = x.shape[:2]
    B = max(1, min(num_blocks, T))
    L = T // B
    blocks = x[:, : B * L].reshape(C, B, L, *x.shape[2:]).mean(2).reshape(C * B, *x.shape[2:])
    return x.mean(1), blocks


def _sem(per_chain: Tensor, per_block: Tensor) -> Tensor:
    def one(r: Tensor) -> Tensor:
        k = r.shape[0]
        if k < 2:
            return torch.full(r.shape[1:], float("nan"), dtype=r.dtype)
        return r.std(0) / math.sqrt(k)

    return torch.maximum(one(per_chain), one(per_block))


def _mean_and_sem(products: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """(C, T, ...) per-draw contributions -> pooled mean (...) and its standard error (...)."""
    pc, pb = _replicates(products, num_blocks)
    return products.mean((0, 1)), _sem(pc, pb)


def _validate_pair(model: nn.Module, loss_fn: Callable, d0: Data, d1: Data, dtype: torch.dtype) -> None:
    """Evaluate the loss at w* on both data sets: fail clearly (shapes, support) before sampling."""
    _check_compatible(d0, d1)
    for name, d in (("q0", d0), ("q1", d1)):
        try:
            f = full_data_loss(model, d, loss_fn, dtype=dtype)
            val = f(_star_params(model, dtype, "cpu"))
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"the loss cannot be evaluated on {name}: {e}") from e
        if not torch.isfinite(val).all():
            raise ValueError(f"the loss at w* on {name} is NaN or inf: the model cannot evaluate {name}'s support")


# ----------------------------------------------------------------------------
# covariance estimator
# ----------------------------------------------------------------------------
@dataclass
class SusceptibilityResult:
    r"""Output of :func:`llc_susceptibility`.

    Attributes
    ----------
    h, nbeta
        The point on the path and :math:`n\beta`.
    dllc_dh, dllc_dh_sem
        The covariance estimate of :math:`d\hat\lambda/dh` (quenched) and its
        Monte-Carlo standard error.
    mean_term, mean_term_sem
        :math:`n\beta(E[\Delta L] - \Delta L(w^*))`.
    cov_term, cov_term_sem
        :math:`-(n\beta)^2\operatorname{Cov}(L_h, \Delta L)`.
    delta_loss_star
        :math:`\Delta L(w^*)`.
    chi, chi_sem
        ``name -> `` :math:`\chi_\varphi = -n\beta\operatorname{Cov}(\varphi, \Delta L)`
        (shape of :math:`\varphi`'s value per draw) and its standard error.
    llc
        The :class:`slt.LLCResult` at ``h`` (its observables include the
        full-data losses ``"loss_q0"`` and ``"loss_q1"``, ``(C, T)``).
    """

    h: float
    nbeta: float
    dllc_dh: float
    dllc_dh_sem: float
    mean_term: float
    mean_term_sem: float
    cov_term: float
    cov_term_sem: float
    delta_loss_star: float
    chi: dict[str, Tensor] = field(default_factory=dict)
    chi_sem: dict[str, Tensor] = field(default_factory=dict)
    llc: LLCResult | None = None

    @property
    def chi_baker(self) -> dict[str, Tensor]:
        r""":math:`-\operatorname{Cov}(\varphi, \Delta L)`: the normalisation of Baker et al. (2025)."""
        return {k: v / self.nbeta for k, v in self.chi.items()}

    def __str__(self) -> str:
        lines = [
            f"LLC susceptibility at h={self.h:g} (nβ={self.nbeta:.4g}): dλ̂/dh = {self.dllc_dh:.4g} ± {self.dllc_dh_sem:.2g}",
            f"  nβ(E[ΔL] − ΔL(w*)) = {self.mean_term:.4g} ± {self.mean_term_sem:.2g}; "
            f"−(nβ)² Cov(L, ΔL) = {self.cov_term:.4g} ± {self.cov_term_sem:.2g}",
        ]
        if self.llc is not None:
            lines.append(f"  λ̂(h) = {self.llc.llc_mean:.4g} ± {self.llc.llc_sem:.2g}")
        for k, v in self.chi.items():
            lines.append(f"  χ[{k}] = {v.tolist()} ± {self.chi_sem[k].tolist()}")
        return "\n".join(lines)


def _prepare(
    model: nn.Module, q0: Any, q1s: Sequence[tuple[Any, str]], loss_keys: Sequence[str], loss_fn: Any,
    observables: Mapping[str, Any] | None, nbeta: float | None, num_blocks: int, dtype: torch.dtype | None,
) -> tuple[Any, int, Data, list[Data], dict[str, Any], float, torch.dtype]:
    """Checks shared by :func:`llc_susceptibility` and :func:`llc_susceptibilities`.

    ``q1s``: ``(data, name)`` pairs (the name is used in error messages); ``loss_keys``: the
    observable names reserved for the full-data losses on the ``q1s`` (besides ``loss_q0``).
    Returns ``(loss_fn, num_blocks, d0, d1s, observables, nβ, dtype)`` (``dtype=None``: the model's precision).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dtype = resolve_dtype(dtype, model)[0]
    num_blocks = check_int("num_blocks", num_blocks, 1)
    loss_fn = _resolve_loss(model, loss_fn)
    d0 = as_data(q0, "q0")
    d1s = [as_data(q, name) for q, name in q1s]
    if not d1s:
        raise ValueError("q1s must hold at least one data set")
    for d1 in d1s:
        _validate_pair(model, loss_fn, d0, d1, dtype)
    obs = dict(observables or {})
    for k in (_L0, *loss_keys):
        if k in obs:
            raise ValueError(f"observable name {k!r} is reserved for the full-data losses")
    for k, f in obs.items():
        if not callable(f):
            raise TypeError(f"observable {k!r} must be callable")
    nb = check_real("nbeta", default_nbeta(d0.n) if nbeta is None else nbeta, positive=True)
    return loss_fn, num_blocks, d0, d1s, obs, nb, dtype


@autograd_allowed
def llc_susceptibility(
    model: nn.Module,
    q0: Any,
    q1: Any,
    h: float = 0.0,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    observables: Mapping[str, Callable[[Mapping[str, Tensor]], Tensor]] | None = None,
    nbeta: float | None = None,
    num_blocks: int = 4,
    dtype: torch.dtype | None = None,
    **llc_kwargs: Any,
) -> SusceptibilityResult:
    r"""Quenched LLC susceptibility :math:`d\hat\lambda/dh` at :math:`q_h` from one set of draws.

    Samples the localized posterior of :math:`L_{q_h}` around the model's
    parameters :math:`w^*` with :func:`slt.estimate_llc`, records the
    full-data losses :math:`L_{q_0}(w)`, :math:`L_{q_1}(w)` (and any
    ``observables``) at every draw, and returns

    .. math:: \frac{d\hat\lambda}{dh} = n\beta(E[\Delta L] - \Delta L(w^*)) - (n\beta)^2\operatorname{Cov}(L_h, \Delta L),
              \qquad \chi_\varphi = -n\beta\operatorname{Cov}(\varphi, \Delta L)

    with Monte-Carlo errors (see the module docstring).

    Parameters
    ----------
    model
        Its parameters are :math:`w^*`.
    q0, q1
        Data sets (``X``, ``(X, Y)``, ``(X, Y, weights)``, :class:`slt.Data`) with
        the same per-sample shapes, both evaluable by the loss.
    h
        In :math:`[0, 1]`.
    loss_fn
        Default ``model.default_loss``.
    observables
        ``name -> f(params)`` (engine convention, ``(C, ...)`` per draw).
    nbeta
        :math:`n\beta`; default :func:`slt.default_nbeta` of the number of rows
        of ``q0`` (pass it explicitly for symmetrized or mixed data).
    num_blocks
        Blocks per chain for the batch-means error.
    dtype
        Sampling dtype; ``None`` (default): the model's precision, as :func:`slt.estimate_llc` (a float64 model
        runs in float64; before session 44 these functions ran every model in float32).
    **llc_kwargs
        Passed to :func:`slt.estimate_llc` (``num_chains``, ``num_draws``,
        ``step_size``, ``localization``, ``batch_size``, ``seed``, ...).

    Returns
    -------
    SusceptibilityResult
    """
    h = _check_t(h, "h")
    loss_fn, num_blocks, d0, (d1,), obs, nb, dtype = _prepare(
        model, q0, [(q1, "q1")], [_L1], loss_fn, observables, nbeta, num_blocks, dtype
    )
    device = llc_kwargs.get("device", "cpu")
    f0 = full_data_loss(model, d0, loss_fn, dtype=dtype, device=device)
    f1 = full_data_loss(model, d1, loss_fn, dtype=dtype, device=device)
    data_h = mix(d0, d1, h)
    res = estimate_llc(
        model, data_h, loss_fn, nbeta=nb, observables={**obs, _L0: f0, _L1: f1}, dtype=dtype, **llc_kwargs
    )
    star = _star_params(model, dtype, device)
    l0s, l1s = float(f0(star)[0]), float(f1(star)[0])
    return _from_draws(res, res.observables[_L0], res.observables[_L1], l1s - l0s, h, nb, list(obs), num_blocks)


def _from_draws(res: LLCResult, L0: Tensor, L1: Tensor, dl_star: float, h: float, nb: float,
                obs_names: Sequence[str], num_blocks: int) -> SusceptibilityResult:
    """The covariance estimates from recorded draws: full-data losses ``L0``, ``L1`` ``(C, T)`` on q0, q1."""
    L0 = L0.double()  # (C, T)
    L1 = L1.double()
    ok = torch.isfinite(L0).all(1) & torch.isfinite(L1).all(1)
    ok &= torch.tensor([c not in res.divergent_chains for c in range(L0.shape[0])])
    if not ok.any():
        raise RuntimeError("every chain diverged: no susceptibility estimate; reduce step_size")
    L0, L1 = L0[ok], L1[ok]
    dL = L1 - L0
    Lh = (1.0 - h) * L0 + h * L1
    dLc = dL - dL.mean()
    mean_term, mean_sem = _mean_and_sem(nb * (dL - dl_star), num_blocks)
    cov_term, cov_sem = _mean_and_sem(-(nb**2) * (Lh - Lh.mean()) * dLc, num_blocks)
    tot, tot_sem = _mean_and_sem(nb * (dL - dl_star) - (nb**2) * (Lh - Lh.mean()) * dLc, num_blocks)
    chi: dict[str, Tensor] = {}
    chi_sem: dict[str, Tensor] = {}
    for k in obs_names:
        phi = res.observables[k].double()[ok]  # (C, T, ...)
        extra = phi.ndim - 2
        dl = dLc.reshape(*dLc.shape, *([1] * extra))
        chi[k], chi_sem[k] = _mean_and_sem(-nb * (phi - phi.mean((0, 1))) * dl, num_blocks)
    return SusceptibilityResult(
        h=h, nbeta=nb, dllc_dh=float(tot), dllc_dh_sem=float(tot_sem),
        mean_term=float(mean_term), mean_term_sem=float(mean_sem),
        cov_term=float(cov_term), cov_term_sem=float(cov_sem), delta_loss_star=dl_star,
        chi=chi, chi_sem=chi_sem, llc=res,
    )


def llc_susceptibilities(
    model: nn.Module,
    q0: Any,
    q1s: Sequence[Any],
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    observables: Mapping[str, Callable[[Mapping[str, Tensor]], Tensor]] | None = None,
    nbeta: float | None = None,
    num_blocks: int = 4,
    dtype: torch.dtype | None = None,
    **llc_kwargs: Any,
) -> list[SusceptibilityResult]:
    r""":func:`llc_susceptibility` at :math:`h = 0` towards several :math:`q_1`, from *one* set of draws.

    At :math:`h = 0` the sampled posterior is that of :math:`q_0` whatever :math:`q_1` is, so one run of
    :func:`slt.estimate_llc` on :math:`q_0`, recording :math:`L_{q_0}` and every :math:`L_{q_{1,k}}` at each
    draw, gives all the estimates; with the same ``seed`` they equal separate
    ``llc_susceptibility(model, q0, q1s[k], 0.0, ...)`` calls (same draws), at the cost of one.

    Parameters
    ----------
    model, q0, loss_fn, observables, nbeta, num_blocks, dtype, llc_kwargs
        As for :func:`llc_susceptibility`.
    q1s
        The perturbed data sets (at least one).

    Returns
    -------
    list of SusceptibilityResult
        One per ``q1s[k]``, all sharing the same :attr:`SusceptibilityResult.llc`.
    """
    named = [(q, f"q1s[{k}]") for k, q in enumerate(q1s)]
    keys = [f"{_L1}[{k}]" for k in range(len(named))]
    loss_fn, num_blocks, d0, d1s, obs, nb, dtype = _prepare(
        model, q0, named, keys, loss_fn, observables, nbeta, num_blocks, dtype
    )
    device = llc_kwargs.get("device", "cpu")
    f0 = full_data_loss(model, d0, loss_fn, dtype=dtype, device=device)
    f1s = [full_data_loss(model, d1, loss_fn, dtype=dtype, device=device) for d1 in d1s]
    res = estimate_llc(  # mix(., ., 0) is q0 with normalized weights: the data llc_susceptibility samples at h = 0
        model, mix(d0, d1s[0], 0.0), loss_fn, nbeta=nb, observables={**obs, _L0: f0, **dict(zip(keys, f1s))}, dtype=dtype,
        **llc_kwargs,
    )
    star = _star_params(model, dtype, device)
    l0s = float(f0(star)[0])
    return [_from_draws(res, res.observables[_L0], res.observables[k], float(f1(star)[0]) - l0s, 0.0, nb,
                        list(obs), num_blocks) for k, f1 in zip(keys, f1s)]


# ----------------------------------------------------------------------------
# finite differences
# ----------------------------------------------------------------------------
@dataclass
class FiniteDifferenceResult:
    r"""Output of :func:`llc_finite_difference`.

    Attributes
    ----------
    hs
        ``(H,)`` points on the path.
    mode
        ``"quenched"`` or ``"retrained"``.
    llc_mean, llc_sem
        ``(H,)`` λ̂ at each ``h`` and its standard error.
    llc_per_chain
        ``(H, C)``.
    at
        Where the derivative is taken.
    dllc_dh, dllc_dh_sem
        Derivative of the per-chain polynomial fit at ``at``, averaged over
        chains, with the chain-spread standard error.
    w_star
        ``(H, d)`` the :math:`w^*` used at each ``h`` (all equal when quenched).
    results
        The :class:`slt.LLCResult` of each ``h``.
    """

    hs: Tensor
    mode: str
    llc_mean: Tensor
    llc_sem: Tensor
    llc_per_chain: Tensor
    at: float
    degree: int
    dllc_dh: float
    dllc_dh_sem: float
    w_star: Tensor
    results: list[LLCResult] = field(default_factory=list)

    def __str__(self) -> str:
        pts = ", ".join(f"h={h:g}: {m:.4g} ± {s:.2g}" for h, m, s in zip(self.hs.tolist(), self.llc_mean.tolist(), self.llc_sem.tolist()))
        return (f"LLC finite differences ({self.mode}): {pts}\n"
                f"  dλ̂/dh at h={self.at:g} = {self.dllc_dh:.4g} ± {self.dllc_dh_sem:.2g} (degree-{self.degree} fit per chain)")


def llc_finite_difference(
    model: nn.Module,
    q0: Any,
    q1: Any,
    hs: Sequence[float],
    *,
    mode: str = "quenched",
    at: float | None = None,
    degree: int = 1,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    nbeta: float | None = None,
    train_fn: Callable[[nn.Module, Data], Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    **llc_kwargs: Any,
) -> FiniteDifferenceResult:
    r"""λ̂ along :math:`q_h = (1-h) q_0 + h q_1` and its finite-difference derivative.

    ``mode="quenched"``: :math:`w^*` is the model's parameters at every ``h``
    (what the covariance estimator of :func:`llc_susceptibility` differentiates);
    ``mode="retrained"``: a copy of the model is re-trained on each
    :math:`q_h` first (``train_fn(model, data)``, default
    :func:`slt.training.train` on the weighted data :math:`q_h`, cast to the
    model's dtype and device, with ``train_kwargs``, default ``steps=0`` and
    the L-BFGS finish on the exact weighted loss; a ``batch_size`` in ``train_kwargs`` draws the main
    phase's minibatches with probability proportional to the weights).  Every ``h``
    uses the same ``seed`` (common random numbers); a degree-``degree``
    polynomial in ``h`` is fitted per chain and differentiated at ``at``
    (default: the mean of ``hs``); the error is the chain spread.

    Parameters
    ----------
    model, q0, q1, loss_fn, nbeta, dtype, llc_kwargs
        As for :func:`llc_susceptibility`.
    hs
        At least ``degree + 1`` distinct values in :math:`[0, 1]`.
    mode
        ``"quenched"`` or ``"retrained"``.
    at, degree
        Where and with which polynomial degree the derivative is taken.
    train_fn, train_kwargs
        Re-training (``mode="retrained"`` only).

    Returns
    -------
    FiniteDifferenceResult
    """
    if mode not in ("quenched", "retrained"):
        raise ValueError(f"mode must be 'quenched' or 'retrained', got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dtype = resolve_dtype(dtype, model)[0]
    try:
        hl = [_check_t(h, "h") for h in hs]
    except TypeError:
        raise ValueError("hs must be a sequence of numbers in [0, 1]") from None
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
    if len(set(hl)) < degree + 1:
        raise ValueError(f"need at least {degree + 1} distinct h values for a degree-{degree} fit, got {hl}")
    at_v = float(sum(hl) / len(hl)) if at is None else float(at)
    loss_fn = _resolve_loss(model, loss_fn)
    d0, d1 = as_data(q0, "q0"), as_data(q1, "q1")
    _validate_pair(model, loss_fn, d0, d1, dtype)
    nb = float(nbeta) if nbeta is not None else default_nbeta(d0.n)
    if "seed" in llc_kwargs and not isinstance(llc_kwargs["seed"], int):
        raise ValueError("seed must be one integer (the same random streams at every h)")
    tk = {"steps": 0, "finish": "lbfgs", **dict(train_kwargs or {})}
    if "weights" in tk:
        raise ValueError("train_kwargs must not set weights: re-training uses the weights of q_h")
    results, wstars = [], []
    spec = ParamSpec(model)
    for h in hl:
        data = mix(d0, d1, h)
        m = model
        if mode == "retrained":
            m = copy.deepcopy(model)
            if train_fn is not None:
                train_fn(m, data)
            else:
                from ..training import train

                p0 = next(m.parameters(), None)  # train in the model's dtype (float64 w* for float32 data)
                train(m, data if p0 is None else data.to(p0.device, p0.dtype), loss_fn, **tk)  # weighted L_{q_h}
        wstars.append(spec.flatten_module(m).detach().clone())
        results.append(estimate_llc(m, data, loss_fn, nbeta=nb, dtype=dtype, **llc_kwargs))
    per_chain = torch.stack([r.llc_per_chain.double() for r in results])  # (H, C)
    H = torch.tensor(hl, dtype=torch.float64)
    V = torch.stack([(H - at_v) ** k for k in range(degree + 1)], 1)  # (H, degree+1)
    ok = torch.isfinite(per_chain).all(0)
    coef = torch.linalg.lstsq(V, per_chain[:, ok]).solution  # (degree+1, C_ok)
    slopes = coef[1]  # derivative at `at` (powers of (h - at))
    k = slopes.numel()
    return FiniteDifferenceResult(
        hs=H, mode=mode,
        llc_mean=torch.tensor([r.llc_mean for r in results], dtype=torch.float64),
        llc_sem=torch.tensor([r.llc_sem for r in results], dtype=torch.float64),
        llc_per_chain=per_chain, at=at_v, degree=degree,
        dllc_dh=float(slopes.mean()),
        dllc_dh_sem=float(slopes.std() / math.sqrt(k)) if k > 1 else float("nan"),
        w_star=torch.stack(wstars), results=results,
    )
