r"""What every sampler shares: the potential, the Langevin integrator, the MALA
diagnostic, and the ``init``/``step``/``reset`` interface.

Every sampler targets

.. math::

    p(w) \propto \exp\bigl(-U(w)\bigr), \qquad
    U(w) = n\beta\, L_n(w) + \tfrac{\gamma}{2} \lVert w - w^* \rVert^2 ,

with ``L_n`` replaced by a minibatch loss ``L_B`` at every step.  Parameters are
flat ``(C, d)`` tensors: row ``c`` is chain ``c``.  A built sampler
(:class:`Sampler`) is ``init(params) -> State``, ``step(state, batch, rng) ->
(State, SamplerInfo)`` and ``reset(state, rows, w_star) -> State`` (the blackjax
design): ``step`` is a function of its arguments, with no hidden mutation, so a
run is a fold of ``step`` over batches (:func:`slt.loop.run_chains`), and every
sampler has its own ``State`` (a NamedTuple with at least ``params`` and
``step``).  ``reset`` puts the chains in ``rows`` back at ``w*`` with a fresh
auxiliary state (momentum, preconditioner, thermostat): the run loop calls it
for divergent chains and never edits a state's fields itself.

A sampler *value* that does not yet know its potential and step size is a
:class:`SamplerSpec` (e.g. ``slt.samplers.sghmc(friction=0.05)``): the engine
binds it to the prepared target with :meth:`SamplerSpec.bind`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import torch
from torch import Tensor

from ..rng import draw_normal

__all__ = [
    "LocalizedPotential",
    "SamplerState",
    "SamplerInfo",
    "Sampler",
    "SamplerSpec",
    "NoiseSource",
    "normal",
    "owned_normal",
    "initial_params",
    "zeros_like_params",
    "column_chunks",
    "langevin_step",
    "mala_acceptance",
    "acceptance",
    "equilibrium_acceptance",
    "reset_rows",
    "check_step_size",
    "check_mala_every",
    "sqrt",
]

# loss_and_grad(params (C, d), batch) -> (loss (C,), grad of loss wrt params (C, d))
LossAndGrad = Callable[[Tensor, Any], tuple[Tensor, Tensor]]


class NoiseSource(Protocol):
    """Anything with ``normal(like) -> Tensor`` shaped like ``like`` (e.g. :class:`slt.rng.ChainRNG`)."""

    def normal(self, like: Tensor) -> Tensor: ...


def normal(rng: torch.Generator | NoiseSource, like: Tensor) -> Tensor:
    """Standard normal noise shaped like ``like`` from a generator or a :class:`NoiseSource`."""
    if isinstance(rng, torch.Generator):
        return draw_normal(torch.empty(like.shape, device=like.device, dtype=like.dtype), rng)
    return rng.normal(like)


def owned_normal(rng: torch.Generator | NoiseSource, like: Tensor) -> Tensor:
    """Standard normal noise shaped like ``like`` that the caller owns: nothing else holds or will
    read it, so a sampler may build its update in it (the noise buffer becomes the new position or
    velocity: no separate parameter-sized noise tensor).  Same numbers as :func:`normal`.  A
    generator's draws are fresh; a source with ``owned_normal`` (:class:`slt.rng.ChainRNG`) hands
    out a slice it never hands out again; any other source's noise is copied (it may return a
    tensor it keeps, as a fixed-noise test source does)."""
    if isinstance(rng, torch.Generator):
        return normal(rng, like)
    own = getattr(rng, "owned_normal", None)
    if own is not None:
        return own(like)
    return rng.normal(like).clone()


def initial_params(params: Tensor) -> Tensor:
    """A state's initial ``params``: a broadcast view of a (d,) row (stride 0 over chains, e.g. the
    engine's ``w*`` rows, :meth:`slt.target.Target.rows`) is kept as it is — it cannot be written in
    place, and no step writes its inputs — so the initial state costs no parameter-sized copy per
    chain; any other tensor is copied (the caller may write into it later)."""
    params = params.detach()
    if params.ndim == 2 and params.shape[0] > 1 and params.stride(0) == 0:
        return params
    return params.clone()


def zeros_like_params(params: Tensor) -> Tensor:
    """Zeros shaped like ``params`` (an initial momentum or second moment): a broadcast view of one
    (d,) row of zeros when ``params`` is one (:func:`initial_params`), else a fresh tensor."""
    if params.ndim == 2 and params.shape[0] > 1 and params.stride(0) == 0:
        return params.new_zeros(params.shape[-1]).expand(params.shape)
    return torch.zeros_like(params)


#: Elements of a (C, d) tensor processed at once by the fused updates (:func:`column_chunks`): their
#: temporaries hold at most about this many elements, whatever the number of chains.  On CPU 64 Ki
#: (256 KiB of float32 per operand, so a chunk's four operands stay in L2): the SGLD update of 8
#: chains of a 1M-parameter MLP took 12.2 ms against 14.2 ms with 256 Ki, a MALA step's 26 against 36.
CHUNK_ELEMENTS = {"cpu": 1 << 16}
_CHUNK_DEFAULT = 1 << 22  # accelerators: fewer, larger kernels (16 MiB of float32 per operand)
#: A (C, d) tensor of at most this many chunks' elements is one chunk (each chunk costs a few
#: Python-level operations and, on a GPU, kernel launches).  On accelerators one: a bound of four let
#: the update's temporaries grow with the chains (8 chains of a 1M-parameter MLP on an H200: 6.9
#: parameter-sized copies per chain from CUDA's allocator, 4.0 with one; reproduced on the CPU with the
#: GPU's sizes).
ONE_CHUNK_FACTOR = {"cpu": 4}


def column_chunks(like: Tensor) -> list[slice]:
    """Column slices of a (C, d) tensor, each of about :data:`CHUNK_ELEMENTS` elements (at least 64
    columns): what the fused sampler updates loop over, so that their temporaries are a chunk,
    not a parameter-sized (C, d) tensor.  One slice when the tensor has at most
    :data:`ONE_CHUNK_FACTOR` chunks' elements."""
    C, d = like.shape[0], like.shape[-1]
    per = CHUNK_ELEMENTS.get(like.device.type, _CHUNK_DEFAULT)
    if C * d <= ONE_CHUNK_FACTOR.get(like.device.type, 1) * per:
        return [slice(0, d)]
    step = max(64, per // max(C, 1))
    return [slice(s, min(s + step, d)) for s in range(0, d, step)]


def rowsum64(x: Tensor) -> Tensor:
    """(C, k) -> (C,) row sums accumulated in float64 (the MALA terms are differences of sums over
    d coordinates: float32 accumulation would lose them for large d)."""
    return x.sum(-1, dtype=torch.float64)


@dataclass(frozen=True)
class LocalizedPotential:
    r"""U(w) = nβ L_B(w) + γ/2 ‖w − w*‖², batched over chains.

    Parameters
    ----------
    loss_and_grad
        ``(params (C, d), batch) -> (L_B (C,), ∇L_B (C, d))``.
    w_star
        ``(C, d)`` centre of localization (one row per chain; rows of chains of
        the same checkpoint are equal).
    nbeta
        Inverse temperature times sample size, a float or a ``(C,)`` tensor.
    localization
        γ ≥ 0.
    """

    loss_and_grad: LossAndGrad
    w_star: Tensor
    nbeta: float | Tensor
    localization: float

    def _nb(self) -> Tensor | float:
        return self.nbeta.unsqueeze(-1) if isinstance(self.nbeta, Tensor) else self.nbeta

    def __call__(self, params: Tensor, batch: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(L_B (C,), ∇L_B (C, d), U (C,), ∇U (C, d))``."""
        loss, grad, U = self.loss_grad(params, batch)
        diff = params - self.w_star  # the only (C, d) temporary: it becomes ∇U
        nb = self._nb()
        if isinstance(nb, Tensor):
            grad_U = torch.addcmul(diff.mul_(self.localization), nb, grad)
        else:
            grad_U = diff.mul_(self.localization).add_(grad, alpha=nb)
        return loss, grad, U, grad_U

    def loss_grad(self, params: Tensor, batch: Any,
                  with_potential: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(L_B (C,), ∇L_B (C, d), U (C,))``: no ∇U, and no parameter-sized temporary (the
        samplers form ∇U a chunk of columns at a time, :meth:`grad_U_cols`).  With
        ``with_potential=False`` U is ``None``: its ‖w − w*‖² is a pass over the (C, d) parameters
        (9 ms a step for 8 chains of a 1M-parameter MLP, a tenth of the gradient's time) that
        only the MALA diagnostic reads."""
        loss, grad = self.loss_and_grad(params, batch)
        return loss, grad, (self.potential_of(params, loss) if with_potential else None)

    def potential_of(self, params: Tensor, loss: Tensor) -> Tensor:
        """U (C,) from the loss (C,) at ``params`` (C, d)."""
        nb = self.nbeta
        return nb * loss + (0.5 * self.localization * self.squared_distance(params)).to(loss.dtype)

    def squared_distance(self, params: Tensor) -> Tensor:
        """‖w − w*‖² (C,) of ``params`` (C, d), float64, summed a chunk of columns at a time (no
        (C, d) temporary)."""
        sq = torch.zeros(params.shape[0], dtype=torch.float64, device=params.device)
        for sl in column_chunks(params):
            sq += rowsum64((params[:, sl] - self.w_star[:, sl]).square_())
        return sq

    def grad_U_cols(self, params: Tensor, grad: Tensor, sl: slice) -> Tensor:
        """Columns ``sl`` of ∇U = nβ∇L + γ(w − w*) from those of ``params`` and ``grad`` (C, d): a
        fresh (C, |sl|) tensor, computed as :meth:`__call__` computes ∇U."""
        diff = params[:, sl] - self.w_star[:, sl]
        nb = self._nb()
        if isinstance(nb, Tensor):
            return torch.addcmul(diff.mul_(self.localization), nb, grad[:, sl])
        return diff.mul_(self.localization).add_(grad[:, sl], alpha=nb)


class SamplerState(Protocol):
    """What every sampler state has: ``params`` (C, d) and ``step`` (steps taken)."""

    @property
    def params(self) -> Tensor: ...

    @property
    def step(self) -> int: ...


class SamplerInfo(NamedTuple):
    """Diagnostics of one step, all per chain.

    ``loss``: L_B at the pre-step position (the draw), (C,); ``potential``: U_B
    there, (C,), or ``None`` when the step did not need it (SGLD forms U only for the MALA
    diagnostic); ``grad_norm``: ‖∇U_B‖, (C,), or ``None`` (the built-in samplers leave
    it out: a pass over the (C, d) gradient every step that the run loop never reads);
    ``mala_accept``: MALA acceptance
    probability of the proposal, (C,) or ``None`` when not computed this step
    (or not defined for the sampler); ``mala_log_ratio``: its log Metropolis–Hastings ratio
    log r (float64, (C,)) when the sampler reports it (step-size adaptation on
    minibatches reads :func:`equilibrium_acceptance` from it).
    """

    loss: Tensor
    potential: Tensor | None
    grad_norm: Tensor | None
    mala_accept: Tensor | None
    mala_log_ratio: Tensor | None = None
    #: ``(C,)`` float64 :math:`\|\nabla L_B\|^2` at the pre-step position (the loss's gradient on the step's
    #: batch, masked as the step uses it), or ``None``: plain SGLD reports it on its MALA steps, for the
    #: first-order step bias :func:`slt.diagnostics.step_bias`
    grad_sq: Tensor | None = None


def _no_reset(state: Any, rows: Tensor, w_star: Tensor) -> Any:
    raise NotImplementedError("this sampler has no reset(state, rows, w_star)")


class Sampler(NamedTuple):
    """A sampler bound to a potential and a step size.

    ``init(params (C, d)) -> State``; ``step(state, batch, rng) -> (State, SamplerInfo)``;
    ``reset(state, rows (C,) bool, w_star (C, d)) -> State`` restarts ``rows`` at ``w_star``.
    ``step_size`` is a number or a ``(C, 1)`` tensor (one step size per row, e.g. per
    checkpoint); a state never depends on it, so a sampler may be re-bound to another
    step size between steps (step-size adaptation does).
    ``relaxation_gain``: the factor by which the sampler multiplies ε in a direction the loss
    leaves flat (SGLD 1; RMSProp-SGLD 1/a, its preconditioner where ∇L, and so √v, vanishes): such
    a direction, held by γ alone, relaxes over 1/(ε · gain · γ) steps, which sets the automatic
    burn-in (:func:`slt.defaults.default_burnin`).
    ``end_burnin(state) -> State`` (``None``: nothing to do) is called by :func:`slt.loop.run_chains`
    before the first draw: a sampler that adapts something during burn-in freezes it there (RMSProp-SGLD
    its preconditioner, so that the draws follow a fixed metric and target the posterior exactly).
    ``metric(state) -> cols | None`` gives the fixed diagonal preconditioner G of a state, as a function of
    a column slice returning a fresh ``(C, len)`` tensor, or ``None`` where the state has none (SGLD:
    G = I is implied by ``metric is None``; RMSProp-SGLD before its preconditioner is frozen); the
    end-of-run checks (free diffusion, minibatch heating) read it.
    ``friction``: SGHMC's α (a number or per row), ``None`` for the others.  Over times longer than 1/α a
    free SGHMC chain spreads ε/α per step and coordinate, and minibatch noise heats it as it heats SGLD
    at the step ε/α (the velocity keeps the noise 1/α steps), so the end-of-run checks read it as SGLD at
    ε/α.
    """

    name: str
    init: Callable[[Tensor], Any]
    step: Callable[[Any, Any, Any], tuple[Any, SamplerInfo]]
    step_size: float
    reset: Callable[[Any, Tensor, Tensor], Any] = _no_reset
    relaxation_gain: float = 1.0
    end_burnin: Callable[[Any], Any] | None = None
    metric: Callable[[Any], Callable[[slice], Tensor] | None] | None = None
    friction: float | Tensor | None = None


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler chosen by value, before it knows its potential and step size.

    ``factory(potential, step_size, *, deterministic, mala_every, **kwargs) -> Sampler``
    builds it; ``kwargs`` are the sampler's own hyperparameters.  Every sampler
    function of :mod:`slt.samplers` returns one when called without a potential
    (``slt.samplers.sghmc(friction=0.05)``); a custom sampler is
    ``SamplerSpec("mine", my_factory, {...})``.
    """

    name: str
    factory: Callable[..., Sampler]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def bind(self, potential: LocalizedPotential, step_size: float, **engine_kwargs: Any) -> Sampler:
        """Build the sampler; ``engine_kwargs`` (``deterministic``, ``mala_every``, extra
        sampler arguments) must not repeat a hyperparameter set in the spec."""
        clash = sorted(set(self.kwargs) & set(engine_kwargs))
        if clash:
            raise ValueError(f"sampler {self.name!r} already sets {clash}; do not pass them again in sampler_kwargs")
        return self.factory(potential, step_size, **dict(self.kwargs), **engine_kwargs)

    def accepts(self, argument: str) -> bool:
        """Whether the sampler's factory takes ``argument`` (e.g. ``"reuse_batch"``)."""
        import inspect

        try:
            params = inspect.signature(self.factory).parameters
        except (TypeError, ValueError):
            return False
        return argument in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"


# ----------------------------------------------------------------------------
# the integrator and the MALA diagnostic (written once; used by every Langevin sampler,
# the step-size pilot and slt.phases)
# ----------------------------------------------------------------------------
def langevin_step(
    w: Tensor, grad_U: Tensor, xi: Tensor, step_size: float | Tensor, precond: float | Tensor = 1.0
) -> Tensor:
    r"""One (preconditioned) Langevin step: :math:`w - \tfrac{\epsilon}{2} G \nabla U + \sqrt{\epsilon G}\,\xi`.

    Euler–Maruyama discretisation of :math:`dw = -\tfrac12 G\nabla U\,dt + \sqrt{G}\,dB`
    (Welling & Teh 2011; with a preconditioner G, Li et al. 2016).  ``step_size`` is a
    float or a per-chain ``(C, 1)`` tensor; ``precond`` 1 or a ``(C, d)`` tensor; ``xi``
    standard normal ``(C, d)``.

    The increment :math:`\sqrt{\epsilon G}\,\xi - \tfrac{\epsilon}{2} G \nabla U` is formed first and added
    to w once: adding the drift to w first rounds it away wherever it is below half a unit in the last
    place of w (float32 at |w| = 10⁴: ulp 9.8e-4), on every step, localization included, so the chains
    random-walk while the MALA acceptance reads 1 (a 1-parameter regression with w* ≈ 10⁴: λ̂ 1.65 ± 0.12
    against 0.50, converged).  Added together, the noise dithers the rounding and the drift survives on
    average.
    """
    if isinstance(precond, Tensor):
        return (xi * (step_size * precond).sqrt() - (0.5 * step_size) * precond * grad_U).add_(w)
    if isinstance(step_size, Tensor):  # per-chain (C, 1) steps
        eps = step_size * precond if precond != 1.0 else step_size
        return torch.mul(xi, eps.sqrt()).addcmul_(grad_U, -0.5 * eps).add_(w)
    # a number: one fresh (C, d) tensor, updated in place (no other parameter-sized temporaries)
    return torch.mul(xi, math.sqrt(step_size * precond)).add_(grad_U, alpha=-0.5 * step_size * precond).add_(w)


def mala_acceptance(
    w: Tensor, w_new: Tensor, U: Tensor, grad_U: Tensor, U_new: Tensor, grad_U_new: Tensor,
    step_size: float | Tensor, precond: float | Tensor = 1.0, symmetric: bool = False,
) -> Tensor:
    r"""Metropolis-adjusted acceptance probability of the Langevin proposal, (C,)
    (with ``symmetric``, its :func:`equilibrium_acceptance` instead).

    With :math:`q(w'|w) = \mathcal N(w - \tfrac\epsilon2 G\nabla U(w), \epsilon G)`:
    :math:`\alpha = \min(1, \exp[U(w) - U(w') + \log q(w|w') - \log q(w'|w)])`
    (Roberts & Tweedie 1996), on the same batch at both points; the same ``G`` is
    used both ways.  A diagnostic: the proposal is always taken.

    The two Gaussian exponents are expanded: with :math:`\Delta = w' - w`, :math:`g = \nabla U(w)`,
    :math:`g' = \nabla U(w')`,

    .. math:: \log q(w|w') - \log q(w'|w) = \tfrac12 \Delta\cdot(g + g')
              - \tfrac\epsilon8 \textstyle\sum_i G_i (g_i'^2 - g_i^2),

    so the :math:`\lVert\Delta\rVert^2/2\epsilon \approx d/2` terms that the direct form computes
    twice and subtracts cancel exactly (in float32 at d = 10⁶ their rounding alone is of order 1 in
    :math:`\log\alpha`).  Sums over d accumulate in float64, a chunk of columns at a time (no
    parameter-sized temporaries).
    """
    log_r = mala_log_ratio(w, w_new, U, grad_U, U_new, grad_U_new, step_size, precond)
    return equilibrium_acceptance(log_r).to(U.dtype) if symmetric else acceptance(log_r, U.dtype)


def mala_log_ratio(
    w: Tensor, w_new: Tensor, U: Tensor, grad_U: Tensor, U_new: Tensor, grad_U_new: Tensor,
    step_size: float | Tensor, precond: float | Tensor = 1.0,
) -> Tensor:
    r"""The Metropolis log-ratio :math:`\log r` (C,) float64 of the Langevin proposal ``w → w_new``
    (:func:`mala_acceptance`, which takes :math:`\min(1, r)` of it)."""
    a = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    b = torch.zeros_like(a)
    for sl in column_chunks(w):
        g, gn = grad_U[:, sl], grad_U_new[:, sl]
        s = g + gn
        diff = gn - g
        if isinstance(precond, Tensor):
            diff.mul_(precond[:, sl])
        elif precond != 1.0:
            diff.mul_(precond)
        b += rowsum64(diff.mul_(s))
        a += rowsum64((w_new[:, sl] - w[:, sl]).mul_(s))
    return _log_ratio(U, U_new, a, b, step_size)


def _log_ratio(U: Tensor, U_new: Tensor, a: Tensor, b: Tensor, step_size: float | Tensor) -> Tensor:
    """log r = U - U' + a/2 - ε b/8 (float64), from a = Δ·(g + g') and b = Σ G (g'² - g²)."""
    eps = step_size.reshape(-1).double() if isinstance(step_size, Tensor) else step_size
    return (U.double() - U_new.double()) + 0.5 * a - (eps / 8.0) * b


def acceptance(log_ratio: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The Metropolis acceptance min(1, r) of log-ratios ``log_ratio`` (C,)."""
    out = torch.clamp(log_ratio, max=0.0).exp()
    return out if dtype is None else out.to(dtype)


def equilibrium_acceptance(log_ratio: Tensor) -> Tensor:
    r"""The acceptance the proposals would have at equilibrium, :math:`\tfrac12(1 + \min(r, 1/r))`, (C,).

    For a chain at equilibrium under the target, :math:`E[r] = 1`, so the acceptance
    :math:`E\min(1, r) = 1 - \tfrac12 E|1 - r|`; :math:`\tfrac12(1 + \min(r, 1/r))` has the same
    expansion :math:`1 - \tfrac12 E|\log r| + O(\log^2 r)` and the same value at equilibrium to
    that order (measured on a Gaussian: equal to four digits).  Away from equilibrium they differ:
    a chain displaced from the mode of the potential mostly proposes moves toward it, which have
    r > 1 and are always accepted, so min(1, r) reads close to 1 however large the step; the
    symmetric form counts those moves' error as well.  On minibatches a chain is never at
    equilibrium under the batch's potential (each batch has its own mode, displaced from the
    chain by the minibatch noise), and the Metropolis acceptance there overstates the step
    that the sampler tolerates (measured on the DLN [5, 3, 5] oracle, batch 256, ε = 1.43e-3:
    0.98 on the batch, 0.74 for full-batch chains at the same ε).
    """
    return 0.5 * (1.0 + torch.exp(-log_ratio.abs()))


PrecondCols = Callable[[slice], Tensor]


def fused_langevin(
    potential: "LocalizedPotential", w: Tensor, grad: Tensor, xi: Tensor, step_size: float | Tensor,
    precond: PrecondCols | None = None, mala: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    r""":func:`langevin_step` on ∇U = nβ∇L + γ(w − w*) formed from ``grad`` (∇L) a chunk of columns
    at a time, written into ``xi`` (owned noise, :func:`owned_normal`), which is returned as the new
    position: the step allocates no parameter-sized tensor.  ``precond(sl)`` gives columns ``sl``
    of G (None: G = 1).  With ``mala``, also returns the first half of the MALA sums at the old
    point, ``(Δ·g, Σ G g²)`` (float64, (C,)), for :func:`fused_mala` — so ∇L at ``w`` may be freed
    before the proposal is evaluated."""
    tensor_eps = isinstance(step_size, Tensor)
    # the arithmetic of langevin_step, element for element (a sampler built from it reproduces these chains)
    if tensor_eps:
        neg_half, sqrt_eps = -0.5 * step_size, step_size.sqrt()
    else:
        neg_half, sqrt_eps = -0.5 * step_size, math.sqrt(step_size)
    a = b = None
    if mala:
        a = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        b = torch.zeros_like(a)
    for sl in column_chunks(w):
        gU = potential.grad_U_cols(w, grad, sl)
        x, wc = xi[:, sl], w[:, sl]
        # the increment first, then w (one rounding of w: see langevin_step)
        if precond is None:
            if tensor_eps:
                x.mul_(sqrt_eps).addcmul_(gU, neg_half).add_(wc)
            else:
                x.mul_(sqrt_eps).add_(gU, alpha=neg_half).add_(wc)
            if mala:
                b += rowsum64(gU.square())
        else:
            G = precond(sl)
            x.mul_((step_size * G).sqrt_()).sub_((0.5 * step_size) * G * gU).add_(wc)
            if mala:
                b += rowsum64(G.mul_(gU).mul_(gU))
        if mala:
            a += rowsum64((x - wc).mul_(gU))
    return xi, (None if a is None else (a, b))


def fused_mala(
    potential: "LocalizedPotential", w: Tensor, w_new: Tensor, grad_new: Tensor, U: Tensor, U_new: Tensor,
    step_size: float | Tensor, first: tuple[Tensor, Tensor], precond: PrecondCols | None = None,
) -> Tensor:
    """The log Metropolis–Hastings ratio of :func:`mala_acceptance` (float64, (C,)) from the sums
    ``first`` of :func:`fused_langevin` and ∇L at ``w_new`` (∇U formed a chunk at a time; the same G
    as the step); :func:`acceptance` turns it into the acceptance."""
    a, b = first[0].clone(), first[1].clone()
    for sl in column_chunks(w):
        gU = potential.grad_U_cols(w_new, grad_new, sl)
        if precond is None:
            b -= rowsum64(gU.square())
        else:
            b -= rowsum64(precond(sl).mul_(gU).mul_(gU))
        a += rowsum64((w_new[:, sl] - w[:, sl]).mul_(gU))
    return _log_ratio(U, U_new, a, -b, step_size)


def reset_rows(t: Tensor, rows: Tensor, value: Tensor | float) -> Tensor:
    """``t`` with the rows where ``rows`` (C,) is True replaced by ``value`` (a (C, ...) tensor or a number)."""
    mask = rows.view(-1, *([1] * (t.ndim - 1)))
    if not isinstance(value, Tensor):
        value = torch.full_like(t, float(value))
    return torch.where(mask, value, t)


def check_step_size(step_size: Any) -> None:
    """A positive finite number, or a tensor of them (one per row: ``(C, 1)``)."""
    if isinstance(step_size, Tensor):
        if not bool(torch.isfinite(step_size).all() and (step_size > 0).all()):
            raise ValueError(f"step sizes must be positive and finite, got {step_size.flatten().tolist()}")
        return
    if not (step_size > 0) or step_size != step_size or step_size == float("inf"):
        raise ValueError(f"step_size must be a positive finite number, got {step_size}")


def sqrt(x: float | Tensor) -> float | Tensor:
    """√x for a number or a tensor."""
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def check_mala_every(mala_every: Any) -> None:
    if mala_every < 0:
        raise ValueError(f"mala_every must be >= 0 (0 disables), got {mala_every}")
