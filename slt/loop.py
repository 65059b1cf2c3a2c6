r"""The run loop: fold a sampler's ``step`` over a stream of batches and record the draws.

:func:`run_chains` is generic: any :class:`slt.samplers.Sampler` (its own state
type), any batch stream returning ``(batch, L_B(w*) per row)``, any noise
source.  It records, rows first,

* at every draw (step ``t >= num_burnin`` with ``(t - num_burnin) % thin == 0``):
  the minibatch loss :math:`L_{B_t}(w_t)` at the pre-step position, the control
  variate :math:`L_{B_t}(w^*)` and the observables evaluated at :math:`w_t`;
* during burn-in: the loss; before the first draw the sampler's ``end_burnin`` (if any) is applied
  to the state (RMSProp-SGLD freezes its preconditioner there);
* the MALA acceptance of the draws' proposals, when the sampler computes it;
* batches: a state that carries a cache (the sampler's evaluation at its new position,
  e.g. SGLD after a MALA step with ``reuse_batch``) is stepped on the same batch again;
* divergence: every ``divergence.every`` steps a row whose loss or parameters
  are non-finite, or whose :math:`n\beta(L_B(w) - L_B(w^*))` exceeds the
  threshold, is marked divergent at that step and put back at ``w*`` through
  the sampler's own ``reset`` (the loop never edits a state's fields).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .samplers.base import Sampler, equilibrium_acceptance

__all__ = ["Trace", "Divergence", "run_chains", "show_progress", "next_batch", "diverged_rows"]

BatchFn = Callable[[], tuple[Any, Tensor]]
Observe = Callable[[Tensor], Mapping[str, Tensor]]


@dataclass
class Trace:
    r"""What a run recorded, rows (chains) first.

    Attributes
    ----------
    loss, star
        ``(R, T)`` :math:`L_B(w_t)` and :math:`L_B(w^*)` at the draws.
    burnin, burnin_star
        ``(R, num_burnin)`` :math:`L_B(w_t)` and :math:`L_B(w^*)` during burn-in.
    observables
        ``name -> (R, T, ...)``.
    mala_sum, mala_count
        ``(R,)`` summed MALA acceptance over ``mala_count`` draw steps where it was computed
        (:func:`mala_reading`; a stream whose ``full`` is False counts as minibatches).
    diverged, divergence_step
        ``(R,)`` divergent rows and the step at which each diverged (-1 if not).
    draw_steps
        ``(T,)`` step index of each draw.
    seconds
        Wall time of the loop.
    slope
        ``(R, T', F)`` the ``slope`` probe of :func:`run_chains` at every ``slope_every``-th draw, or ``None``.
    grad_sq_sum, grad_sq_count
        ``(R,)`` summed :math:`\|\nabla L_B(w_t)\|^2` over the ``grad_sq_count`` draw steps where the sampler
        reported it (:attr:`slt.samplers.base.SamplerInfo.grad_sq`; plain SGLD's MALA steps), or ``None``.
    """

    loss: Tensor
    star: Tensor
    burnin: Tensor
    burnin_star: Tensor
    observables: dict[str, Tensor] = field(default_factory=dict)
    mala_sum: Tensor | None = None
    mala_count: int = 0
    diverged: Tensor | None = None
    divergence_step: Tensor | None = None
    draw_steps: Tensor | None = None
    seconds: float = 0.0
    slope: Tensor | None = None
    grad_sq_sum: Tensor | None = None
    grad_sq_count: int = 0

    @property
    def mala(self) -> Tensor | None:
        """``(R,)`` mean MALA acceptance, or ``None`` when it was never computed."""
        return None if not self.mala_count else self.mala_sum / self.mala_count

    @property
    def grad_sq(self) -> Tensor | None:
        r"""``(R,)`` mean :math:`\|\nabla L_B\|^2` over the draws where it was read, or ``None``."""
        return None if not self.grad_sq_count or self.grad_sq_sum is None else self.grad_sq_sum / self.grad_sq_count

    def then(self, more: "Trace") -> "Trace":
        """This trace followed by ``more``, a continuation of the same rows from where this one
        ended (its draws appended, its burn-in ignored; a row that diverged in either is divergent,
        at its first divergence)."""
        obs = {k: torch.cat([v, more.observables[k]], 1) for k, v in self.observables.items()}
        mala_sum = (self.mala_sum if more.mala_sum is None else more.mala_sum if self.mala_sum is None
                    else self.mala_sum + more.mala_sum)
        return Trace(torch.cat([self.loss, more.loss], 1), torch.cat([self.star, more.star], 1), self.burnin,
                     self.burnin_star, obs, mala_sum, self.mala_count + more.mala_count,
                     self.diverged | more.diverged,
                     torch.where(self.divergence_step >= 0, self.divergence_step, more.divergence_step),
                     torch.cat([self.draw_steps, more.draw_steps]), self.seconds + more.seconds,
                     None if self.slope is None or more.slope is None else torch.cat([self.slope, more.slope], 1),
                     *_summed(self.grad_sq_sum, self.grad_sq_count, more.grad_sq_sum, more.grad_sq_count))

    def rows(self, sl: slice) -> "Trace":
        """The same trace restricted to rows ``sl`` (one checkpoint's chains), on the CPU."""
        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[sl].detach().cpu()

        return Trace(cut(self.loss), cut(self.star), cut(self.burnin), cut(self.burnin_star),
                     {k: cut(v) for k, v in self.observables.items()}, cut(self.mala_sum), self.mala_count,
                     cut(self.diverged), cut(self.divergence_step),
                     None if self.draw_steps is None else self.draw_steps.cpu(), self.seconds, cut(self.slope),
                     cut(self.grad_sq_sum), self.grad_sq_count)


def _summed(a: Tensor | None, na: int, b: Tensor | None, nb: int) -> tuple[Tensor | None, int]:
    """Two runs' sums and counts of a reading, joined (``None``, 0 when either run lacks it)."""
    return (None, 0) if a is None or b is None else (a + b, na + nb)


@dataclass(frozen=True)
class Divergence:
    r"""Divergence check: rows with a non-finite loss or parameters, or with
    :math:`n\beta(L_B(w) - L_B(w^*)) >` ``threshold``, are reset to ``w_star`` (R, d);
    checked every ``every`` steps (checks synchronise with the device)."""

    threshold: float
    nbeta: float
    w_star: Tensor
    every: int = 10


    def check(self, loss: Tensor, star: Tensor, params: Tensor) -> Tensor:
        """``(R,)`` bool: rows whose loss or parameters are non-finite or whose
        :math:`n\beta(L_B(w) - L_B(w^*))` exceeds the threshold."""
        return diverged_rows(loss, star, params, self.nbeta, self.threshold)


def diverged_rows(loss: Tensor, star: Tensor, params: Tensor, nbeta: float | Tensor, threshold: float) -> Tensor:
    r"""``(R,)`` bool: a non-finite loss (R,) or parameters (R, d), or
    :math:`n\beta(L_B(w) - L_B(w^*)) >` ``threshold`` — the divergence test of every loop."""
    # a NaN or inf anywhere in a row makes its sum non-finite: one reduction, no (R, d) temporaries
    # (only rows whose entries sum beyond the float range, ~3e38, would newly count as divergent)
    return ~torch.isfinite(loss) | (nbeta * (loss - star) > threshold) | ~torch.isfinite(params.sum(1))


def mala_reading(info: Any, full: bool) -> Tensor | None:
    """The acceptance a step's MALA diagnostic contributes (``None`` when not computed): min(1, r) at
    full batch, its equilibrium form on minibatches where the sampler reports log r
    (:func:`slt.samplers.equilibrium_acceptance`: the Metropolis acceptance of a minibatch chain
    reads ≈ 1 whatever the step)."""
    if full or info.mala_log_ratio is None:
        return info.mala_accept
    return equilibrium_acceptance(info.mala_log_ratio)


def next_batch(batches: BatchFn, state: Any, previous: tuple[Any, Tensor] | None = None) -> tuple[Any, Tensor]:
    """``(batch, L_B(w*))`` for the next step of ``state``: the batch it was last stepped on when the
    state carries its evaluation there (a ``cache``: full batch, or SGLD after a MALA step with
    ``reuse_batch``), else the stream's next.  The last batch is the stream's ``last`` when it keeps
    one (:class:`slt.target.BatchStream`, so a state handed from one loop to another keeps its
    batch), else ``previous``."""
    if getattr(state, "cache", None) is not None:
        held = getattr(batches, "last", previous)
        if held is not None:
            return held
    return batches()


#: the progress bar (and its running λ̂) is redrawn at most this often, whatever a step costs
PROGRESS_SECONDS = 0.5


def show_progress(progress: bool | None, work: int, threshold: int = 20000) -> bool:
    """``progress`` if given, else on a terminal when ``work`` (chain-steps) reaches ``threshold``."""
    return progress if progress is not None else (sys.stderr.isatty() and work >= threshold)


def run_chains(
    sampler: Sampler,
    state: Any,
    batches: BatchFn,
    rng: Any,
    num_steps: int,
    *,
    num_burnin: int = 0,
    thin: int = 1,
    observe: Observe | None = None,
    divergence: Divergence | None = None,
    nbeta: float = 1.0,
    progress: bool = False,
    desc: str = "LLC",
    start: int = 0,
    slope: Callable[[Tensor], Tensor] | None = None,
    slope_every: int = 1,
) -> tuple[Any, Trace]:
    r"""Run ``num_steps`` steps of ``sampler`` from ``state``; return the final state and the :class:`Trace`.

    Parameters
    ----------
    sampler, state
        A bound sampler and its initial state (``sampler.init(w)``).
    batches
        ``() -> (batch, L_B(w*) (R,))`` for each step (e.g. :meth:`slt.target.Target.batches`).
    rng
        Noise source passed to ``sampler.step``.
    num_steps, num_burnin, thin
        Steps in all, steps before the first draw, steps between draws
        (``num_steps = num_burnin + num_draws * thin``).
    observe
        ``params (R, d) -> {name: (R, ...)}`` evaluated (without grad) at every draw.
    divergence
        See :class:`Divergence`; ``None``: no check.
    nbeta
        Scales the running λ̂ shown on the progress bar.
    progress, desc
        A tqdm bar (steps, draws/s and the running :math:`n\beta\,\overline{L_B(w) - L_B(w^*)}`).
    start
        Number of the first step (steps already run, e.g. by step-size adaptation): reported
        step indices (``divergence_step``, ``draw_steps``) count from it.
    slope, slope_every
        ``params (R, d) -> (R, F)`` evaluated (without grad) at draws 0, ``slope_every``, 2 ``slope_every``,
        ... of this loop (the slope check, :func:`slt.engine.slope_gradient`): ``trace.slope``.
    """
    from tqdm.auto import tqdm

    T = (num_steps - num_burnin + thin - 1) // thin if num_steps > num_burnin else 0
    R, dev, dtype = state.params.shape[0], state.params.device, state.params.dtype  # no reference kept
    loss_tr = torch.empty((R, T), dtype=dtype, device=dev)
    star_tr = torch.empty((R, T), dtype=dtype, device=dev)
    burn_tr = torch.empty((R, num_burnin), dtype=dtype, device=dev)
    burn_star = torch.empty((R, num_burnin), dtype=dtype, device=dev)
    obs: dict[str, list[Tensor]] = {}
    slopes: list[Tensor] = []
    mala_sum = torch.zeros(R, dtype=torch.float64, device=dev)
    mala_cnt = 0
    gsq_sum: Tensor | None = None
    gsq_cnt = 0
    full = getattr(batches, "full", True)
    diverged = torch.zeros(R, dtype=torch.bool, device=dev)
    div_step = torch.full((R,), -1, dtype=torch.long, device=dev)
    bar = tqdm(total=num_steps, disable=not progress, desc=desc, unit="step", leave=False)
    t0 = last = time.perf_counter()
    draw = 0
    current = None
    for t in range(num_steps):
        if t == num_burnin and getattr(sampler, "end_burnin", None) is not None:  # RMSProp-SGLD: freeze G
            state = sampler.end_burnin(state)
        batch, star = current = next_batch(batches, state, current)
        w_t = state.params  # the draw: loss and observables are taken here
        state, info = sampler.step(state, batch, rng)
        in_draws = t >= num_burnin
        if in_draws and (t - num_burnin) % thin == 0:
            loss_tr[:, draw] = info.loss
            star_tr[:, draw] = star
            if observe is not None:
                with torch.no_grad():
                    for k, v in observe(w_t).items():
                        obs.setdefault(k, []).append(v.detach())
            if slope is not None and draw % slope_every == 0:
                with torch.no_grad():
                    slopes.append(slope(w_t))
            draw += 1
        elif not in_draws:
            burn_tr[:, t] = info.loss
            burn_star[:, t] = star
        if info.mala_accept is not None and in_draws:
            mala_sum += mala_reading(info, full).double().nan_to_num(0.0)
            mala_cnt += 1
        if getattr(info, "grad_sq", None) is not None and in_draws:  # (a user's sampler may return a plain tuple)
            g2 = info.grad_sq.double().nan_to_num(0.0)
            gsq_sum = g2 if gsq_sum is None else gsq_sum + g2
            gsq_cnt += 1
        if divergence is not None and (t % divergence.every == 0 or t == num_steps - 1):
            bad = divergence.check(info.loss, star, state.params) & ~diverged
            if bool(bad.any()):
                div_step = torch.where(bad, torch.full_like(div_step, start + t), div_step)
                diverged |= bad
                state = sampler.reset(state, diverged, divergence.w_star)
        if progress and ((now := time.perf_counter()) - last >= PROGRESS_SECONDS or t == num_steps - 1):
            last = now
            bar.update(t + 1 - bar.n)
            if draw > 0:
                ok = ~diverged
                run = float((nbeta * (loss_tr[ok, :draw] - star_tr[ok, :draw])).mean()) if ok.any() else float("nan")
                bar.set_postfix(llc=f"{run:.3g}", draws_per_s=f"{draw / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    seconds = time.perf_counter() - t0
    draw_steps = start + num_burnin + torch.arange(T, device=dev) * thin
    observables = {k: torch.stack(v, 1) for k, v in obs.items() if v}
    return state, Trace(loss_tr, star_tr, burn_tr, burn_star, observables, mala_sum, mala_cnt, diverged, div_step,
                        draw_steps, seconds, torch.stack(slopes, 1) if slopes else None, gsq_sum, gsq_cnt)
