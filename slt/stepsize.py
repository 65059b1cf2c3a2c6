r"""The automatic SGLD step size of a :class:`slt.target.Target`.

:func:`auto_step_size` sets

.. math:: \epsilon = \frac{0.2}{n\beta\,h_{max} + \gamma}, \quad\text{capped at}\quad \frac{0.2}{n\beta^2 s}
          \text{ with minibatches,}

where :math:`h_{max}` is the largest Hessian eigenvalue of :math:`L_n` near ``w*``
(:func:`estimate_curvature`), re-measured where short full-batch pilot chains
actually go (:func:`pilot_step_size`; at a singular ``w*`` the curvature at
``w*`` can be zero while the flat directions lead to stiff regions), and
:math:`s` the largest eigenvalue of the minibatch-gradient covariance
(:func:`minibatch_gradient_noise`).  SGLD is stable only for
:math:`\epsilon(n\beta h + \gamma) < 2` in every direction; its discretisation
bias in a direction of curvature κ is about εκ/4, and minibatch noise inflates
the sampled variance by about :math:`\epsilon n\beta^2 s/4`: both are kept ≤ 5%.

:func:`power_iteration` (finite-difference Hessian-vector products) is also what
:func:`slt.sample_posterior` uses for its default step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .data import Batch, Data
from .defaults import LLC
from .evaluator import ChainEvaluator
from .loop import diverged_rows, mala_reading, next_batch
from .samplers.base import LocalizedPotential, column_chunks, langevin_step, rowsum64
from .samplers.sghmc import friction_follows_step
from .target import BatchStream, Target

__all__ = [
    "STEP_SIZE_SAFETY",
    "StepSize",
    "auto_step_size",
    "fixed_step_size",
    "power_iteration",
    "estimate_curvature",
    "pilot_step_size",
    "minibatch_gradient_noise",
    "gradient_noise_trace",
    "kick_bound",
]

#: ε = STEP_SIZE_SAFETY / (nβ h_max + γ) for ``step_size=None``.
STEP_SIZE_SAFETY = 0.2
#: Pilot runs of the automatic step size: chains per checkpoint, steps per round, rounds.
PILOT_CHAINS, PILOT_STEPS, PILOT_ROUNDS = 2, 100, 4
#: Rows of tensor data used for curvature (a weighted dataset is subsampled by weight).
CURVATURE_ROWS = 1024


#: The least :func:`kick_bound`: in few dimensions the steep parts of a singular posterior that a too
#: large adaptation step reaches carry what the adaptation must learn (normal crossing x·a²·b³: with the
#: bound at d/2 + 10√(d/2) + 20 = 31 the adapted ε let one of 32 chains diverge in the run).
KICK_MIN = 1000.0


def kick_bound(d: int) -> float:
    r""":math:`\max(d/2 + 10\sqrt{d/2} + 20,` :data:`KICK_MIN` :math:`)`: an :math:`n\beta(L - L^*)` that no chain of the localized
    posterior reaches (for a regular model of d parameters it is Gamma(d/2) distributed, mean d/2; a
    singular one has λ < d/2).  During step-size adaptation a chain beyond it is put back at w* (its
    step kept: dual averaging reads the acceptance of the steps that threw it).  SGLD cannot reject a
    step, so dual averaging's first steps (from 10 ε₀) throw chains where the loss is steep, and the
    acceptance those chains report drives ε down without end: an 18k-parameter MLP at γ = 1 (ε₀ =
    0.022; two steps at 0.09 put the chains at nβΔL = 10⁴–10⁷; two crossed the divergence threshold
    1000·d, six stayed out there) adapted to ε = 3.9e-9, at which the run from w* did not move; with
    the reset, 6.1e-5.  The adapted chains' positions are discarded (the run starts from w*), so a
    reset costs nothing.  A bound on the Metropolis–Hastings ratio of the step as well (|log r| > 3)
    was tried and dropped: it also put back chains that had reached the steep parts of a singular
    posterior legitimately, and ε came out 5.7× larger on x·a·b² at full batch."""
    return max(d / 2 + 10.0 * math.sqrt(d / 2) + 20.0, KICK_MIN)


@dataclass(frozen=True)
class StepSize:
    """A step size and how it was chosen.

    ``step_size`` ε; ``auto`` whether it was chosen automatically; ``curvature`` (K,)
    largest Hessian eigenvalue per checkpoint; ``grad_noise`` (K,) largest
    minibatch-gradient covariance eigenvalue; ``pilot_rounds`` pilot rounds run.
    """

    step_size: float
    auto: bool = False
    curvature: Tensor | None = None
    grad_noise: Tensor | None = None
    pilot_rounds: int = 0


def fixed_step_size(step_size: float) -> StepSize:
    """A step size given by the user."""
    return StepSize(float(step_size))


def power_iteration(
    grad: Callable[[Tensor], Tensor], w: Tensor, v: Tensor, iters: int, delta: float | Tensor, *,
    central: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Top Hessian eigenpair magnitude at each row of ``w`` (N, d), by power iteration.

    Hessian-vector products by finite differences of ``grad`` ((N, d) -> (N, d)):
    :math:`Hv \approx (\nabla L(w + \delta v) - \nabla L(w))/\delta`, or with
    ``central`` :math:`(\nabla L(w+\delta v) - \nabla L(w-\delta v))/2\delta`.
    ``v`` (N, d) is the unit start vector; ``delta`` a number or an (N, 1) tensor.
    Returns the last iteration's Rayleigh quotient :math:`v^\top H v` (N,) and
    :math:`\|Hv\|` (N,); a row whose product vanishes keeps its vector.
    """
    g0 = None if central else grad(w)
    eig = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    nrm = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
    for _ in range(iters):
        if central:
            hv = (grad(w + delta * v) - grad(w - delta * v)) / (2 * delta)
        else:
            hv = (grad(w + delta * v) - g0) / delta
        eig = (hv * v).sum(1)
        nrm = hv.norm(dim=1, keepdim=True)
        v = torch.where(nrm > 0, hv / nrm.clamp_min(1e-30), v)
    return eig, nrm.squeeze(1)


def _unit_normal(shape: torch.Size, generator: torch.Generator, like: Tensor) -> Tensor:
    v = torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)
    return v / v.norm(dim=1, keepdim=True)


def _top_eigenvalue(evaluator: ChainEvaluator, w: Tensor, batch: Batch, generator: torch.Generator,
                    iters: int = 12, masks: Tensor | None = None, start: Tensor | None = None) -> Tensor:
    """(N, d) points -> (N,) |largest Hessian eigenvalue of L| (forward differences), from the start vectors
    ``start`` (N, d) (else unit normals from ``generator``).  With ``masks`` (M, d): (N·M,) point-major, the
    largest eigenvalue of the Hessian restricted to each mask's coordinates (the curvature a restricted
    run's chains meet), from the start vectors restricted to it."""
    v = _unit_normal(w.shape, generator, w) if start is None else start
    keep = None
    if masks is not None:
        M = masks.shape[0]
        keep = masks.to(w.dtype).repeat(w.shape[0], 1)
        w = w.repeat_interleave(M, 0)
        v = v.repeat_interleave(M, 0) * keep
        v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)

    def grad(x: Tensor) -> Tensor:
        g = evaluator.loss_and_grad(x, batch)[1]
        return g if keep is None else g * keep

    # the difference step is a secant, not a derivative: where the loss leaves its quadratic bowl within r
    # the product measures the curvature a short move away, which is what a step from w* meets (a GRU
    # trained to L = 3e-7: exact top eigenvalue 0.107 at w*, the secant 1.09 at r = 1e-4 and 9.4e3 at
    # r = 1e-3 in float32 and float64 alike; float32's r = 1e-3 keeps gradient rounding below the signal)
    r = 1e-3 if w.dtype == torch.float32 else 1e-5
    eig, _ = power_iteration(grad, w, v, iters, r)
    return eig.abs().nan_to_num(0.0)


def _probe_points(
    w_star: Tensor, num_probes: int, localization: float, nbeta: float, generator: torch.Generator
) -> Tensor:
    """(K, 1 + num_probes, d): ``w*`` itself, then ``w* + δ`` with
    ``δ ~ N(0, (0.5/√(γ + 0.01 nβ))² I)``, where a singular potential's curvature lives."""
    K, d = w_star.shape
    scale = 0.5 / math.sqrt(localization + 1e-2 * nbeta)
    noise = torch.randn((K, num_probes + 1, d), generator=generator, device=w_star.device, dtype=torch.float32)
    noise = noise.to(w_star.dtype)
    noise[:, 0] = 0.0
    return w_star.unsqueeze(1) + scale * noise


def _combine_probes(values: Tensor) -> Tensor:
    """(K, P) values at w* and its probes -> (K,): max(value at w*, median over probes)."""
    probes = values[:, 1:].median(dim=1).values if values.shape[1] > 1 else values[:, 0]
    return torch.maximum(values[:, 0], probes)


def estimate_curvature(
    evaluator: ChainEvaluator, w_star: Tensor, batch: Batch, localization: float, nbeta: float,
    generator: torch.Generator, num_probes: int = 4, iters: int = 12,
) -> Tensor:
    r"""Largest Hessian eigenvalue of L per checkpoint, (K,).

    Power iteration with forward-difference Hessian-vector products at ``w*``
    and at ``num_probes`` points ``w* + δ`` with ``δ ~ N(0, (0.5/√γ')² I)``
    (``γ' = γ + nβ·1e-2``), where a singular potential's curvature lives;
    returns ``max(h(w*), median_probes h)``.
    """
    K, d = w_star.shape
    P = num_probes + 1
    w = _probe_points(w_star, num_probes, localization, nbeta, generator).reshape(K * P, d)
    eig = _top_eigenvalue(evaluator, w, batch, generator, iters)
    return _combine_probes(eig.view(K, P))


def pilot_step_size(
    evaluator: ChainEvaluator, w_star: Tensor, batch: Batch, localization: float, nbeta: float, eps: float,
    generator: torch.Generator,
) -> tuple[float, Tensor, int]:
    r"""Refine the automatic step size where the chains actually go.

    At a singular ``w*`` the curvature near ``w*`` says little about the
    curvature a chain meets once it has wandered along the flat directions (for
    :math:`K = \tfrac12 (ab^2)^2` it is 0 at the origin and :math:`n\beta b^4` at
    distance :math:`1/\sqrt\gamma`).  So: run ``PILOT_CHAINS`` full-batch SGLD
    chains per checkpoint for ``PILOT_STEPS`` steps with the current ε
    (:func:`slt.samplers.langevin_step`), measure the largest Hessian eigenvalue
    :math:`h` at the points reached, and set
    :math:`\epsilon \leftarrow \min(\epsilon, 0.2/(n\beta h + \gamma))`
    (divergence: ε/4); repeat while ε shrinks by more than 20% (at most
    ``PILOT_ROUNDS`` rounds).  ε only ever decreases.

    Returns ``(ε, curvature per checkpoint (K,), rounds run)``.
    """
    K, d = w_star.shape
    Cp = PILOT_CHAINS
    centre = w_star.repeat_interleave(Cp, dim=0)  # (K*Cp, d)
    potential = LocalizedPotential(evaluator.loss_and_grad, centre, nbeta, localization)
    curv = torch.zeros(K, dtype=w_star.dtype, device=w_star.device)
    rounds = 0
    for rounds in range(1, PILOT_ROUNDS + 1):
        w = centre.clone()
        for _ in range(PILOT_STEPS):
            grad_u = potential(w, batch)[3]
            noise = torch.randn(w.shape, generator=generator, device=w.device, dtype=torch.float32).to(w.dtype)
            w = langevin_step(w, grad_u, noise, eps)
        ok = bool(torch.isfinite(w).all())
        if ok:
            h = _top_eigenvalue(evaluator, w, batch, generator).view(K, Cp).max(dim=1).values
            ok = bool(torch.isfinite(h).all())
        if not ok:
            eps = eps / 4.0
            continue
        curv = torch.maximum(curv, h)
        new = STEP_SIZE_SAFETY / (nbeta * float(h.max()) + localization)
        if new >= 0.8 * eps:
            break
        eps = new
    return eps, curv, rounds


def minibatch_gradient_noise(
    evaluator: ChainEvaluator, w_star: Tensor, data: Data, batch_size: int, localization: float,
    nbeta: float, generator: torch.Generator, num_probes: int = 4, num_batches: int = 16,
) -> Tensor:
    r"""Largest eigenvalue of the covariance of the minibatch gradient ∇L_B, (K,).

    Evaluated on ``num_batches`` independent minibatches at ``w*`` and at the
    probe points of :func:`estimate_curvature`; returns
    ``max(s(w*), median_probes s)``.  SGLD's stationary variance along a
    direction is inflated by the factor ``1 + ε nβ² s / 4`` by minibatch noise
    of variance ``s`` (Welling & Teh 2011, Sec. 4), so ``ε ≤ 0.2 / (nβ² s)``
    keeps that inflation below 5%.
    """
    K, d = w_star.shape
    P, M = num_probes + 1, num_batches
    w = _probe_points(w_star, num_probes, localization, nbeta, generator)
    w = w.unsqueeze(2).expand(K, P, M, d).reshape(K * P * M, d)
    idx = data.sample_index(K * P * M, batch_size, generator)
    _, g = evaluator.loss_and_grad(w, data.gather(idx))
    g = g.view(K * P, M, d)
    g = g - g.mean(1, keepdim=True)
    gram = g @ g.transpose(1, 2) / (M - 1)  # same nonzero spectrum as the d x d covariance
    top = torch.linalg.eigvalsh(gram.double())[:, -1].clamp_min(0.0).nan_to_num(0.0).view(K, P)
    return _combine_probes(top).to(w_star.dtype)


def gradient_noise_trace(
    potential: LocalizedPotential, params: Tensor, batches: BatchStream, num_batches: int = 4,
    mask: Callable[[Tensor], Tensor] | None = None, metric: Callable[[slice], Tensor] | None = None,
) -> Tensor:
    r""":math:`\operatorname{tr}\operatorname{Cov}_B[\nabla L_B(w)]` at each row of ``params`` (R, d), (R,);
    with ``metric`` (a diagonal preconditioner's columns, ``Sampler.metric``)
    :math:`\operatorname{tr}(G\operatorname{Cov}_B[\nabla L_B(w)])`.

    The unbiased sample variance over ``num_batches`` batches of the stream (each row's own
    batches), summed over coordinates, accumulated one gradient at a time (Welford, a column chunk
    at a time: the running mean and the gradient are the only parameter-sized tensors besides
    ``params``, as in a sampler step; in the parameters' dtype, sums in float64).  ``mask``
    multiplies each gradient by the coordinates the rows sample (restricted runs).  For
    :func:`slt.diagnostics.minibatch_heating`."""
    if num_batches < 2:
        raise ValueError(f"num_batches must be at least 2, got {num_batches}")
    mean = None
    m2 = torch.zeros(params.shape[0], dtype=torch.float64, device=params.device)
    for k in range(num_batches):
        grad = potential.loss_grad(params, batches()[0], with_potential=False)[1].detach()  # fresh: ours to write
        if mask is not None:
            grad = mask(grad)
        if mean is None:
            mean, grad = grad, None  # no reference to it is left under another name
            continue
        for sl in column_chunks(grad):  # (g − mean_old)·(g − mean_new), a chunk of columns at a time
            g, m = grad[:, sl], mean[:, sl]
            delta = g - m
            m.add_(delta, alpha=1.0 / (k + 1))
            delta.mul_(g.sub_(m))
            m2 += rowsum64(delta if metric is None else delta.mul_(metric(sl)))
        del g, m, delta, grad  # the chunk views hold the gradient too: freed before the next evaluation
    return m2 / (num_batches - 1)


def _curvature_batch(target: Target, batches: BatchStream, generator: torch.Generator,
                     rows: int = CURVATURE_ROWS) -> Batch:
    """At most ``rows`` (:data:`CURVATURE_ROWS`) rows of tensor data (weighted data: drawn by weight), or
    the stream's next batch for a loader."""
    source = target.source
    if not isinstance(source, Data):
        return batches()[0]
    if source.n <= rows:
        return source.full_batch()
    if source.weights is None:
        return Data(source.x[:rows], None if source.y is None else source.y[:rows]).full_batch()
    rows = source.sample_index(1, rows, generator).flatten()
    return Data(source.x[rows], None if source.y is None else source.y[rows]).full_batch()


def auto_step_size(target: Target, batches: BatchStream) -> StepSize:
    r"""The automatic step size of ``target`` for the minibatches of ``batches`` (see the module
    docstring).  Random numbers come from generators seeded with the first checkpoint's seed
    (+1 curvature and gradient noise, +2 pilot chains), not from the run's streams."""
    nb, gamma, ev, w_star = target.nbeta, target.localization, target.evaluator, target.w_star
    gen = torch.Generator(device=target.device).manual_seed(target.seeds[0] + 1)
    batch = _curvature_batch(target, batches, gen)
    curvature = estimate_curvature(ev, w_star, batch, gamma, nb, gen)
    h_max = float(curvature.max())
    eps = STEP_SIZE_SAFETY / (nb * h_max + gamma) if (nb * h_max + gamma) > 0 else 1e-4
    pilot_gen = torch.Generator(device=target.device).manual_seed(target.seeds[0] + 2)
    eps, pilot_curv, rounds = pilot_step_size(ev, w_star, batch, gamma, nb, eps, pilot_gen)
    curvature = torch.maximum(curvature, pilot_curv)
    grad_noise = None
    if isinstance(target.source, Data) and not batches.full:
        grad_noise = minibatch_gradient_noise(ev, w_star, target.source, batches.batch_size, gamma, nb, gen)
        s_max = float(grad_noise.max())
        if s_max > 0:
            eps = min(eps, STEP_SIZE_SAFETY / (nb**2 * s_max))
    return StepSize(eps, True, curvature, grad_noise, rounds)


# ----------------------------------------------------------------------------
# adaptation during burn-in: dual averaging toward a target acceptance
# ----------------------------------------------------------------------------
#: Dual-averaging constants of Hoffman & Gelman (2014), Algorithm 5 (Stan's defaults).
DA_GAMMA, DA_T0, DA_KAPPA = 0.05, 10.0, 0.75
#: the adapted step stays above ε₀ · 2^-DA_RANGE (≈ 10⁻¹² ε₀): a checkpoint whose chains "diverge" at
#: every step (a threshold nothing stays under) would otherwise halve ε to zero in float32 over a
#: few hundred back-offs; the run's own divergence handling then reports it
DA_RANGE = 40


@dataclass
class DualAveraging:
    r"""Dual averaging of :math:`\log\epsilon` toward a target acceptance, one per checkpoint.

    Hoffman & Gelman (2014, JMLR 15, Algorithm 5), as NUTS and Stan adapt their step:
    after step t with mean acceptance :math:`\alpha_t`,

    .. math::

        \bar H_t = (1 - \tfrac{1}{t + t_0})\bar H_{t-1} + \tfrac{\delta - \alpha_t}{t + t_0}, \quad
        \log\epsilon_{t+1} = \mu - \tfrac{\sqrt t}{\gamma}\bar H_t, \quad
        \log\bar\epsilon_{t+1} = t^{-\kappa}\log\epsilon_{t+1} + (1 - t^{-\kappa})\log\bar\epsilon_t ,

    :math:`\mu = \log(10\,\epsilon_0)`, γ = 0.05, t₀ = 10, κ = 0.75; the step used after
    adaptation is :math:`\bar\epsilon`.  Divergence back-off (:meth:`back_off`): a
    checkpoint whose chain blew up restarts the scheme from half the step that diverged,
    which also becomes an upper bound for it; no step goes below :math:`\epsilon_0 2^{-40}`.  A group
    that has settled while others still search is ``frozen`` (:meth:`restart`): its scheme no longer
    moves and its chains step at :math:`\bar\epsilon`, so that its step is the one it would have had
    alone.  All state is ``(K,)`` tensors on the device (no host synchronisation per step).
    """

    target: float
    log_eps: Tensor
    log_eps_bar: Tensor
    h_bar: Tensor
    mu: Tensor
    t: Tensor
    log_eps_max: Tensor
    log_eps_min: Tensor
    frozen: Tensor | None = None

    @classmethod
    def start(cls, eps0: Tensor, target: float) -> "DualAveraging":
        """From initial steps ``eps0`` (K,); the step never goes below ``eps0`` · 2^-:data:`DA_RANGE`."""
        log0 = eps0.double().log()
        z = torch.zeros_like(log0)
        return cls(float(target), log0.clone(), log0.clone(), z.clone(), log0 + math.log(10.0), z.clone(),
                   torch.full_like(log0, math.inf), log0 - DA_RANGE * math.log(2.0))

    @property
    def step_size(self) -> Tensor:
        """``(K,)`` the step to use now (:attr:`final` for frozen groups)."""
        return (self.log_eps if self.frozen is None else torch.where(self.frozen, self.log_eps_bar, self.log_eps)).exp()

    @property
    def final(self) -> Tensor:
        """``(K,)`` the averaged step :math:`\\bar\\epsilon` to freeze after adaptation."""
        return self.log_eps_bar.exp()

    def update(self, accept: Tensor) -> None:
        """One step with mean acceptance ``accept`` (K,) (NaN counts as 0)."""
        a = accept.double().nan_to_num(0.0).clamp(0.0, 1.0)
        old = (self.t, self.h_bar, self.log_eps, self.log_eps_bar)
        self.t = self.t + 1
        w = 1.0 / (self.t + DA_T0)
        self.h_bar = (1 - w) * self.h_bar + w * (self.target - a)
        self.log_eps = torch.minimum(self.mu - self.t.sqrt() / DA_GAMMA * self.h_bar, self.log_eps_max)
        self.log_eps = torch.maximum(self.log_eps, self.log_eps_min)
        eta = self.t.pow(-DA_KAPPA)
        self.log_eps_bar = eta * self.log_eps + (1 - eta) * self.log_eps_bar
        if self.frozen is not None:
            self.t, self.h_bar, self.log_eps, self.log_eps_bar = (
                torch.where(self.frozen, o, n) for o, n in zip(old, (self.t, self.h_bar, self.log_eps, self.log_eps_bar)))

    def restart(self, eps: Tensor, searching: Tensor | None = None) -> "DualAveraging":
        """The scheme started again from steps ``eps`` (K,) (an adaptation window's end), keeping the
        bounds set by divergences; with ``searching`` (K,) bool, only for those groups, the others frozen
        where they are."""
        new = DualAveraging.start(torch.minimum(eps.double().log(), self.log_eps_max).exp(), self.target)
        new.log_eps_max = self.log_eps_max.clone()
        new.log_eps_min = self.log_eps_min
        if searching is not None:
            keep = ~searching.to(self.t.device)
            for name in ("log_eps", "log_eps_bar", "h_bar", "mu", "t"):
                setattr(new, name, torch.where(keep, getattr(self, name), getattr(new, name)))
            new.frozen = keep if self.frozen is None else keep | self.frozen
        return new

    def back_off(self, diverged: Tensor) -> None:
        """Checkpoints ``diverged`` (K,) bool restart from half the step that diverged (frozen ones stay:
        their runs halve a step that diverges)."""
        if self.frozen is not None:
            diverged = diverged & ~self.frozen
        half = torch.maximum(self.log_eps - math.log(2.0), self.log_eps_min)
        self.log_eps_max = torch.where(diverged, torch.minimum(self.log_eps_max, half), self.log_eps_max)
        self.log_eps = torch.where(diverged, half, self.log_eps)
        self.log_eps_bar = torch.where(diverged, half, self.log_eps_bar)
        self.mu = torch.where(diverged, half + math.log(2.0), self.mu)
        self.h_bar = torch.where(diverged, torch.zeros_like(self.h_bar), self.h_bar)
        self.t = torch.where(diverged, torch.zeros_like(self.t), self.t)


#: target Metropolis acceptance of the Langevin proposal during adaptation (see :func:`adapt_step_size`)
TARGET_ACCEPT = LLC.target_accept


def initial_step_size(target: Target, batches: BatchStream) -> tuple[Tensor, Tensor]:
    r"""Starting steps for adaptation, ``(ε₀ (G,), curvature at w* (G,))`` per group:
    :math:`\epsilon_0 = 0.2/(n\beta h(w^*) + \gamma)` with :math:`h(w^*)` the largest eigenvalue of the
    Hessian of the loss at the group's ``w*``, restricted to the coordinates its restriction moves (power
    iteration on at most 1024 rows, no probes: adaptation corrects the rest).  Each checkpoint's start
    vector comes from its own seed (+1), so a group's ε₀ is the one its checkpoint and restriction would
    get in a call of their own — as long as the data fit the curvature batch: with M restrictions it is the
    first 1024/M samples (:data:`CURVATURE_ROWS`), so that the M power iterations together cost what the
    unrestricted one does."""
    nb, gamma, dev = target.nbeta, target.localization, target.device
    gen = torch.Generator(device=dev).manual_seed(target.seeds[0] + 1)
    batch = _curvature_batch(target, batches, gen, max(1, CURVATURE_ROWS // target.groups.M))
    w = target.w_star
    start = torch.cat([_unit_normal((1, w.shape[1]), torch.Generator(device=dev).manual_seed(s + 1), w)
                       for s in target.seeds])
    h = _top_eigenvalue(target.evaluator, w, batch, gen, masks=target.groups.masks, start=start)
    h = h.repeat_interleave(target.G // h.shape[0])  # (K·M,) -> (G,): the distributions of a group share it
    eps0 = STEP_SIZE_SAFETY / (nb * h.double() + max(gamma, 1e-12))
    return eps0.clamp(max=1.0), h


def _acceptance_probe(potential: LocalizedPotential, w: Tensor, batch, eps: Tensor, rng, symmetric: bool) -> Tensor:
    """MALA acceptance of one Langevin proposal from ``w`` on ``batch`` (for samplers that do not
    report one, e.g. SGHMC): two potential evaluations; ``symmetric``: its equilibrium form."""
    from .samplers.base import mala_acceptance, normal

    _, _, U, gU = potential(w, batch)
    w_new = langevin_step(w, gU, normal(rng, w), eps)
    _, _, U_n, gU_n = potential(w_new, batch)
    return mala_acceptance(w, w_new, U, gU, U_n, gU_n, eps, symmetric=symmetric)


#: an adaptation whose averaged step ends more than this many times below its start ε₀ (the curvature
#: rule) is probed for jumps in the loss (:func:`jump_ratio`, a few dozen evaluations); on the smooth
#: networks measured the adapted step sits within 0.25–1.7 ε₀ (CNNs, embeddings, spectral-norm and
#: orthogonal parametrizations; 2026-12-05), 0.013 ε₀ for a transformer trained to a loss of 2e-4 (the
#: probe reads it smooth); a tiny Mixtral fell to 1.5e-4 ε₀, a top-1 routed regression to about 0.01 ε₀
JUMP_COLLAPSE = 20.0
#: :func:`jump_ratio` compares proposals of ε·JUMP_FACTOR and ε from the same points with the same noise
JUMP_FACTOR = 16.0
#: E|log r| of a smooth potential falls as ε^{3/2} (64× for a 16× smaller step), of a loss with jumps
#: as the chance of crossing one, ∝ the distance moved, ε^{1/2} (4×): a smaller fall reads as jumps.
#: Measured 2026-12-05: jumps 2.1–4.2 (a tiny Mixtral at its collapsed step 2.4, a top-1 routed
#: regression between 1e-6 and 1e-4), smooth 28–31 (a transformer at a loss of 2e-4, its collapsed
#: step), 60–300 (a soft-routed regression), 540–4600 (linear regression from a start 10⁴× too large)
JUMP_RATIO = 8.0
#: proposals per chain and step size in :func:`jump_ratio` (at the collapsed step a few percent of them
#: cross a jump: that is what stopped adaptation there), and the seed of its noise
JUMP_PROBES, JUMP_SEED = 16, 0x5EED


def jump_ratio(potential: LocalizedPotential, w: Tensor, batch, eps: Tensor, rng, num_chains: int) -> Tensor:
    r"""How the Metropolis error of the Langevin proposal falls with the step: per checkpoint (K,),
    :math:`E|\log r|` at :math:`\epsilon\cdot` :data:`JUMP_FACTOR` over :math:`E|\log r|` at
    :math:`\epsilon`, from the chains at ``w`` (R, d) on one ``batch``, the same noise for both steps
    (:data:`JUMP_PROBES` proposals per chain; ``eps`` (K,)).

    For a smooth potential :math:`\log r = -[U(w') - U(w) - 	frac12\Delta\cdot(g + g')] - 	frac\epsilon8
    (\lVert g'
Vert^2 - \lVert g
Vert^2)` is :math:`O(\epsilon^{3/2})` (a trapezoid rule's error over a
    move :math:`\Delta \sim \sqrt\epsilon`), so the ratio is about :data:`JUMP_FACTOR`:sup:`3/2` = 64;
    where the loss jumps (top-k routing, argmax, rounding: discontinuous in w) :math:`\log r` carries the
    jump whenever a move crosses one, with a chance :math:`\propto \sqrt\epsilon`, and the ratio is about 4.
    Then no step reaches a Metropolis acceptance near 1, and adapting toward one drives ε toward 0.

    The noise comes from a generator of its own (seed :data:`JUMP_SEED`), so the probe leaves the run's
    random streams as they were; ``rng``'s ``mask`` (restrictions: coordinates held at w*), if it has one,
    is applied to it."""
    from .samplers.base import mala_log_ratio, normal

    K = eps.shape[0]
    rows = eps.double().repeat_interleave(num_chains).unsqueeze(1).to(w.dtype)
    gen = torch.Generator(device=w.device).manual_seed(JUMP_SEED)
    mask = getattr(rng, "mask", None)
    _, _, U, gU = potential(w, batch)
    big = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    small = torch.zeros_like(big)
    for _ in range(JUMP_PROBES):
        xi = normal(gen, w) if mask is None else mask(normal(gen, w))
        for e, total in ((rows * JUMP_FACTOR, big), (rows, small)):
            w_new = langevin_step(w, gU, xi, e)
            _, _, U_n, gU_n = potential(w_new, batch)
            total += mala_log_ratio(w, w_new, U, gU, U_n, gU_n, e).abs().nan_to_num(math.inf)
    return (big.view(K, -1).mean(1) / small.view(K, -1).mean(1)).cpu()


@dataclass
class Adaptation:
    """What :func:`adapt_step_size` did: the frozen steps (K,), the starting steps (K,), the
    mean acceptance over the last quarter of adaptation (K,), divergence back-offs per
    checkpoint (K,), adaptation steps, the loss trace :math:`L_B(w_t)` and
    :math:`L_B(w^*)` (R, steps), the step each step used (K, steps), and which steps drew a fresh
    batch (steps,) bool (a step after a MALA evaluation reuses its batch, and its loss, taken on the
    batch that just moved the chain, is biased low), the chains put back at w* per checkpoint
    (K,) because a step threw them beyond :func:`kick_bound`, the windows by which adaptation was
    extended because a checkpoint was still searching (:func:`adapt_step_size`), and — when the averaged
    step fell more than :data:`JUMP_COLLAPSE` times below ε₀ — :func:`jump_ratio` (K,) and, for the
    checkpoints whose loss it found to jump, the averaged steps that were replaced by ε₀ (K,; ``None``
    when none was), and why they were replaced (``collapse_cause``: ``"jumps"``, or ``"friction"`` for
    SGHMC with ``friction="auto"``, whose adaptation collapses on smooth losses too: see
    :func:`adapt_step_size`)."""

    step_size: Tensor
    initial: Tensor
    accept: Tensor
    back_offs: Tensor
    steps: int
    loss_trace: Tensor
    star_trace: Tensor
    step_trace: Tensor
    fresh_steps: Tensor
    resets: Tensor
    extensions: int = 0
    jump_ratio: Tensor | None = None
    collapsed: Tensor | None = None
    collapse_cause: str | None = None


#: a checkpoint whose mean acceptance over the last quarter of adaptation reads more than this below
#: the target was still searching for its step (dual averaging from a far-off ε₀), not near it (at the
#: default target 0.99, settled adaptations read 0.96–0.99 on the DLN, normal-crossing and network
#: problems measured 2026-12-04; searching ones 0.50–0.56)
ADAPT_MARGIN = 0.1
#: adaptation is extended by windows of at least this many steps, at most ADAPT_EXTENSIONS times
ADAPT_WINDOW, ADAPT_EXTENSIONS = 50, 3
#: an averaged step more than this many times the steps dual averaging used over the last quarter of a
#: window still carries the window's first, exploratory steps
ADAPT_LAG = 2.0
#: the fewest adaptation steps the engine runs (a short run's 4/5 of its burn-in is fewer): over a
#: handful of steps the averaged step still weighs the first, exploratory ones and the acceptance is
#: read from one or two steps — a 40-draw run of a small residual CNN adapted for 8 steps read 0.96 and
#: froze ε = 3.9e-5, 10× the step 40 or 200 steps of adaptation settle on, and reported λ̂ = 98
#: converged against 1–7 (not converged) at 200 and 1000 draws (measured 2026-12-04).  Stan's
#: shortest warm-up window is 75 steps.
ADAPT_MIN_STEPS = 50


def adapt_step_size(
    spec, potential: LocalizedPotential, state, batches: BatchStream, rng, num_steps: int, eps0: Tensor,
    num_chains: int, *, threshold: float, target_accept: float = TARGET_ACCEPT, extensions: int = 0,
    window: int = ADAPT_WINDOW, **sampler_kwargs,
) -> tuple[object, Adaptation]:
    r"""Adapt one step size per checkpoint during burn-in, then freeze it.

    Runs ``num_steps`` steps of the sampler ``spec`` (re-bound every step to the current
    step sizes, one per checkpoint as a ``(K*C, 1)`` tensor) from ``state``; after each step
    the mean Metropolis acceptance α of the Langevin proposal over each checkpoint's chains
    (the sampler's own MALA diagnostic: every other step on minibatches for samplers with
    ``reuse_batch``, whose evaluation at the proposal the next step reuses on the same batch,
    every step otherwise; or a separate proposal for samplers without one) drives
    :class:`DualAveraging` toward ``target_accept``.  A chain
    whose loss or parameters become non-finite, or whose :math:`n\beta(L_B(w) - L_B(w^*))`
    exceeds ``threshold``, is reset to ``w*`` (``sampler.reset``) and its checkpoint's step is
    halved and capped (divergence back-off); a chain whose :math:`n\beta(L_B(w) - L_B(w^*))` exceeds
    :func:`kick_bound` (no chain of the posterior gets there: a step threw it) is reset to ``w*`` with
    its step kept (``Adaptation.resets``).  Returns the final state and the
    :class:`Adaptation` (frozen steps :math:`\bar\epsilon`).

    Extension (``extensions`` > 0): when at a window's end some checkpoint's mean acceptance over its
    last quarter reads more than :data:`ADAPT_MARGIN` below ``target_accept``, or its averaged step
    :math:`\bar\epsilon` is more than :data:`ADAPT_LAG` times the steps used over that quarter, the
    scheme was still searching (ε₀ far off, e.g. at a w* whose loss is flat to the last digit, where
    the Hessian at w* says nothing of the curvature a step away) and :math:`\bar\epsilon`, which weighs
    the first steps heavily, is not yet a step the chains tolerate: adaptation goes on for another
    window of ``max(window, num_steps)`` steps, dual averaging restarted from the smaller of the two
    (as Stan restarts it at the end of each warm-up window), at most ``extensions`` times
    (``Adaptation.extensions``).  Without it, a 40-draw run of a saturated residual CNN adapted for 8
    steps, read 0.50 and froze ε = 0.011, at which every chain diverged; 200 steps read 0.96.

    The acceptance of the SGLD proposal measures its discretisation error on the potential
    actually sampled (same minibatch at both points, so minibatch noise does not enter it);
    the default target is :data:`slt.defaults.LLC` ``.target_accept`` (0.99; see there why).
    On minibatches the acceptance read is :func:`slt.samplers.equilibrium_acceptance`
    (½(1 + min(r, 1/r)) from the log ratio the sampler reports), not min(1, r): a minibatch chain
    is never at equilibrium under the batch's potential, so most of its proposals head for the
    batch's mode with r > 1, and min(1, r) reads ≈ 1 for steps far too large (DLN [5, 3, 5],
    batch 256, defaults: ε = 6.7e-4 adapted that way against 1.28e-4 at full batch, and λ̂ +43%).
    The bias minibatch noise itself adds is not bounded by any acceptance; the run measures it
    (:func:`slt.diagnostics.minibatch_heating`).

    Jumps: where the loss is discontinuous in w (top-k routing of a mixture of experts, argmax, rounding)
    a proposal that crosses a jump is rejected however small the step, no step reaches the target and
    dual averaging drives ε toward 0 (a tiny Mixtral: from 3.5e-5 to 5e-9, where its chains barely moved
    and λ̂ scaled with ε).  When :math:`\bar\epsilon` ends more than :data:`JUMP_COLLAPSE` times below ε₀,
    :func:`jump_ratio` tells the two apart from the chains' positions; a checkpoint whose loss jumps keeps
    ε₀ (the curvature rule's step, capped by any divergence back-off), and the run's checks (R-hat, the
    halving of ε) judge it (``Adaptation.collapsed``).

    SGHMC with ``friction="auto"`` (α = √(2εγ), re-bound at every step) collapses without jumps: the
    heat that dual averaging's first, exploratory steps put into the velocity decays only over ~1/α
    steps, so the acceptance read from its positions stays low as ε falls, and α falls with ε (measured on
    the README's tiny GPT-2 at γ = 10: to 1.7e-5, where SGLD's adaptation settles at 2.0e-4 and SGHMC's with
    a fixed friction of 1 or 0.25 at 2.0e-4; the probe then read 4.8, "jumps", on a smooth loss).  The probe
    still decides (on a GRU whose SGLD step itself collapses 57× it reads smooth, and SGHMC keeps its collapsed
    step: ε₀ there sent λ̂ from about 1 to 180, R-hat 2.2), but a replacement is put down to the friction
    (``collapse_cause="friction"``, no jump warning); the run's checks judge the step.
    """
    from .samplers import resolve_sampler

    spec = resolve_sampler(spec)
    K = eps0.shape[0]
    C = num_chains
    w_star = potential.w_star
    R, dtype = w_star.shape[0], w_star.dtype
    da = DualAveraging.start(eps0, target_accept)
    more = max(window, num_steps)
    cap = num_steps + (extensions * more if num_steps else 0)
    loss_tr = torch.empty((R, cap), dtype=dtype, device=w_star.device)
    star_tr = torch.empty((R, cap), dtype=dtype, device=w_star.device)
    eps_tr = torch.empty((K, cap), dtype=torch.float64, device=w_star.device)
    fresh = torch.ones(cap, dtype=torch.bool)
    acc_hist = []
    window_start, window_steps, end, extended = 0, num_steps, num_steps, 0  # window_start: index into acc_hist
    backs = torch.zeros(K, dtype=torch.long, device=w_star.device)
    resets = torch.zeros(K, dtype=torch.long, device=w_star.device)
    far = kick_bound(w_star.shape[1])
    # minibatch SGLD: MALA every other step, the proposal's evaluation reused by the next step on
    # the same batch (one gradient evaluation per step); full batch: every step, free
    stochastic = not sampler_kwargs.get("deterministic", False)
    reuse = spec.accepts("reuse_batch") and stochastic
    mala = {"mala_every": 2, "reuse_batch": True} if reuse else {"mala_every": 1}
    current = None
    t = 0
    restart = None
    while t < end or (extended < extensions and restart is not None):  # restart: set at a window's end
        if t == end:  # still searching: another window, the scheme restarted where it is (settled groups frozen)
            da = da.restart(*restart)
            window_start, window_steps, end = len(acc_hist), more, end + more
            extended, restart = extended + 1, None
        t += 1
        eps_rows = da.step_size.to(dtype).repeat_interleave(C).unsqueeze(1)
        smp = spec.bind(potential, eps_rows, **{**sampler_kwargs, **mala})  # (its own MALA reuse: the acceptance only)
        fresh[t - 1] = not reuse or getattr(state, "cache", None) is None  # full batch: always the same batch
        batch, star = current = next_batch(batches, state, current)
        state, info = smp.step(state, batch, rng)
        acc = mala_reading(info, not stochastic)
        if acc is None and not reuse:  # e.g. SGHMC: the Langevin proposal from where the chain now is
            acc = _acceptance_probe(potential, state.params, batch, eps_rows, rng, stochastic)
        loss_tr[:, t - 1] = info.loss
        star_tr[:, t - 1] = star
        eps_tr[:, t - 1] = da.step_size
        bad = diverged_rows(info.loss, star, state.params, potential.nbeta, threshold)
        kicked = ~bad & (potential.nbeta * (info.loss - star) > far)  # thrown out: back to w* (kick_bound)
        if bool(bad.any()):
            bad_k = bad.view(K, C).any(1)
            backs += bad_k.long()
            da.back_off(bad_k)
            if acc is not None:
                acc = acc.masked_fill(bad, 0.0)
            else:  # a step without the diagnostic: the divergence alone drives the scheme
                acc = torch.where(bad, 0.0, float(target_accept)).to(info.loss.dtype)
        if bool((bad | kicked).any()):
            resets += kicked.view(K, C).sum(1)
            state = smp.reset(state, bad | kicked, w_star)
        if acc is not None:
            a_k = acc.view(K, C).double().nan_to_num(0.0).mean(1)
            acc_hist.append(a_k)
            da.update(a_k)
        if t == end and extended < extensions:  # (a step without a reading may end the window)
            q = max(1, window_steps // 4)
            restart = _still_searching(da, acc_hist[window_start:], window_steps, eps_tr[:, end - q:end],
                                       target_accept - ADAPT_MARGIN)
    last = _last_quarter(acc_hist[window_start:], window_steps, K)
    final = da.final if num_steps else eps0.double()
    ratio = collapsed = cause = None
    if num_steps and bool((final * JUMP_COLLAPSE < eps0.double()).any()):  # ε fell far: smooth, or jumps?
        ratio = jump_ratio(potential, state.params, current[0], final, rng, C)
        replace = (final * JUMP_COLLAPSE < eps0.double()).cpu() & (ratio < JUMP_RATIO)
        if bool(replace.any()):  # no acceptance near 1 reached: the curvature rule's step instead
            collapsed = final.clone()
            final = torch.where(replace.to(final.device), torch.minimum(eps0.double(), da.log_eps_max.exp()), final)
            # (SGHMC whose friction follows ε collapses on smooth losses too, and the probe misreads it)
            follows = spec.name == "sghmc" and friction_follows_step({**spec.kwargs, **sampler_kwargs})
            cause = "friction" if follows else "jumps"
    return state, Adaptation(final, eps0.double(), last, backs, t, loss_tr[:, :t], star_tr[:, :t], eps_tr[:, :t],
                             fresh[:t], resets, extended, ratio, collapsed, cause)


def _last_quarter(acc_hist: list[Tensor], steps: int, K: int) -> Tensor:
    """Mean acceptance (K,) of the last ``steps // 4`` readings of a window of ``steps`` steps (with a
    reading every other step, as on minibatches, its last half; NaN: none read)."""
    if not acc_hist:
        return torch.full((K,), float("nan"), dtype=torch.float64)
    return torch.stack(acc_hist[-max(1, steps // 4):]).mean(0)


def _still_searching(da: DualAveraging, acc_hist: list[Tensor], steps: int, recent: Tensor,
                     settled: float) -> tuple[Tensor, Tensor] | None:
    r"""At a window's end: ``(steps (K,) to restart dual averaging from, searching (K,) bool)`` when some
    group is still searching, else ``None``.  Searching: the mean acceptance over the last quarter of the
    window's ``steps`` (its readings ``acc_hist``, as for :attr:`Adaptation.accept`) reads below
    ``settled``, or the averaged step :math:`\bar\epsilon` is more than :data:`ADAPT_LAG` times the
    geometric mean of the steps used over that quarter (``recent`` (K, q)), i.e. still carries the first,
    exploratory steps.  The restart is from the smaller of the two, and only for the groups searching: the
    others keep their step (frozen), which therefore does not depend on the groups beside them."""
    if not acc_hist:
        return None
    acc = _last_quarter(acc_hist, steps, acc_hist[0].shape[0])
    used = recent.log().mean(1).exp()
    searching = ((acc < settled) | (da.final > ADAPT_LAG * used)).cpu()
    if da.frozen is not None:
        searching &= ~da.frozen.cpu()
    if not bool(searching.any()):
        return None
    return torch.minimum(da.final, used), searching


def stable_step_size(
    spec, potential: LocalizedPotential, rows: Tensor, batches: BatchStream, rng, step_size: float, *,
    steps: int, threshold: float, halvings: int = 10, **sampler_kwargs,
) -> float | None:
    r"""The largest :math:`\epsilon\,2^{-j}` (j = 1 … ``halvings``) under which no chain diverges in
    ``steps`` steps from ``rows`` (w*), or ``None``: a step size to suggest after a run whose chains
    all diverged.  Divergence as in the run loop (non-finite loss or parameters, or
    :math:`n\beta(L_B(w) - L_B(w^*))` above ``threshold``)."""
    from .samplers import build_sampler

    for j in range(1, halvings + 1):
        eps = step_size / 2**j
        smp = build_sampler(spec, potential, eps, mala_every=0, **sampler_kwargs)
        state = smp.init(rows)
        ok = True
        for t in range(steps):
            batch, star = batches()
            state, info = smp.step(state, batch, rng)
            if t % 10 == 9 or t == steps - 1:
                if bool(diverged_rows(info.loss, star, state.params, potential.nbeta, threshold).any()):
                    ok = False
                    break
        if ok:
            return eps
    return None
