"""The result of an LLC estimation: estimates, traces and diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from .defaults import ESS_MIN, RELAXATION_TIMES, STEP_BIAS_SHARE, relaxation_steps
from .diagnostics import CHANGE_FRACTION, changed, ess, llc_standard_error, rhat, t_threshold

__all__ = ["LLCResult", "results_frame"]

#: the starts of the set-up issues (``Target.issues``) that say the loss is a random function of w: dropout
#: active, a forward or loss_fn that draws random numbers (:func:`slt.target.random_forward_issue`, or vmap
#: refusing a random operation), data whose items are random (augmentation in a dataset's ``__getitem__``)
RANDOM_ISSUES = ("dropout", "the model's output is random", "the loss is random", "the model or loss_fn draws random",
                 "the data are random")


@dataclass
class LLCResult:
    r"""LLC estimate for one checkpoint.

    The estimator is :math:`\hat\lambda = n\beta\,(\mathbb E[L(w)] - L(w^*))`
    (Lau et al. 2023), evaluated per draw with the control variate
    :math:`n\beta\,(L_{B_t}(w_t) - L_{B_t}(w^*))` (same minibatch at both points).

    Attributes
    ----------
    llc_mean
        Mean of ``llc_per_chain`` over the valid (non-divergent) chains.
    llc_std
        Standard deviation of ``llc_per_chain`` over valid chains (the spread).
    llc_sem
        Monte-Carlo standard error of ``llc_mean`` (see
        :func:`slt.diagnostics.llc_standard_error`); includes noise shared by
        chains.
    llc_per_chain
        ``(C,)``; NaN for divergent chains.
    llc_trace
        ``(C, T)`` per-draw estimates ``nβ (L_B(w_t) − L_B(w*))``.
    loss_trace
        ``(C, T)`` minibatch loss at the draws ``L_B(w_t)``.
    loss_star_trace
        ``(C, T)`` ``L_B(w*)`` on the same minibatches (the control variate).
    init_loss
        ``L_n(w*)``, full data.
    diagnostics
        R-hat, ESS, MALA acceptance, fraction of draws below ``L(w*)``,
        divergent chains, the computation path, timings.
    observables
        ``name -> (C, T, ...)`` values of user observables at the draws.
    config
        Everything needed to reproduce the run (hyperparameters, seed, path,
        device, versions).
    """

    llc_mean: float
    llc_std: float
    llc_sem: float
    llc_per_chain: Tensor
    llc_trace: Tensor
    loss_trace: Tensor
    loss_star_trace: Tensor
    init_loss: float
    nbeta: float
    step_size: float
    localization: float
    sampler: str
    diagnostics: dict[str, Any] = field(default_factory=dict)
    observables: dict[str, Tensor] = field(default_factory=dict)
    burnin_loss_trace: Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_traces(
        cls,
        loss: Tensor,
        star: Tensor,
        *,
        nbeta: float,
        init_loss: float,
        step_size: float,
        localization: float,
        sampler: str,
        burnin: Tensor | None = None,
        observables: Mapping[str, Tensor] | None = None,
        diverged: Tensor | None = None,
        divergence_step: Tensor | None = None,
        draw_steps: Tensor | None = None,
        mala: Tensor | None = None,
        halved: Tensor | None = None,
        heating: Tensor | None = None,
        step_bias: Tensor | None = None,
        diffusion: Tensor | None = None,
        dims: float | None = None,
        draw_times: Tensor | None = None,
        slope: Tensor | None = None,
        slope_check: bool = True,
        issues: list[str] | None = None,
        rhat_threshold: float = 1.1,
        diagnostics: Mapping[str, Any] | None = None,
        warnings: list[str] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> "LLCResult":
        r"""The result of one checkpoint from its traces (CPU tensors, chains first).

        Parameters
        ----------
        loss, star
            ``(C, T)`` :math:`L_B(w_t)` and :math:`L_B(w^*)` at the draws; the per-draw
            estimate is :math:`n\beta(L_B(w_t) - L_B(w^*))`.
        diverged, divergence_step, draw_steps
            ``(C,)`` divergent chains, the step each diverged at, and ``(T,)`` the step of
            each draw: a divergent chain's draws from its divergence on are NaN, and the
            chain is excluded from every statistic.
        mala
            ``(C,)`` mean MALA acceptance per chain, or ``None`` (not computed).
        halved
            ``(C,)`` the estimate each chain would give at half the step with the same steps
            (:func:`slt.diagnostics.halved_step_estimate`), or ``None``: a shortfall of it below
            λ̂ means λ̂ is not stable when ε halves (a reason for ``converged = False``).
        heating
            ``(C,)`` the first-order excess of each chain's λ̂ from minibatch noise
            (:func:`slt.diagnostics.minibatch_heating`), or ``None`` (full batch): it scales with ε,
            so when half of it exceeds λ̂'s Monte-Carlo error (2 s.e.) and 2% of λ̂, λ̂ is not stable
            when ε halves (:func:`heating_check`).
        step_bias
            ``(C,)`` the first-order excess of each chain's λ̂ over its ε → 0 value, discretisation and
            minibatch heating together (:func:`slt.diagnostics.step_bias`; plain SGLD), or ``None``.
        diffusion, draw_times
            ``(C,)`` each chain's spread at the end of the run over a free walk's
            (:func:`slt.diagnostics.free_diffusion`; plain SGLD) and ``(T,)`` the steps from w* at each
            draw, or ``None``: chains still diffusing freely whose λ̂ grows with time are not
            converged (:func:`equilibrium_checks`); ``diagnostics["free_diffusion"]`` is the mean.
        slope, slope_check
            ``(C, T, F)`` each draw's displacement projected on ``F`` independent estimates of the slope
            at w*, :math:`\hat g_f\cdot(w_t - w^*)` with :math:`\hat g_f \approx \nabla L(w^*)`
            (:func:`slt.engine.slope_gradient`; at every few draws, ``T`` of its own), or ``None``:
            ``diagnostics["slope_at_init"]`` records :math:`n\beta\,\mathbb E[\hat g\cdot(w - w^*)]`,
            the part of λ̂ owed to the slope, and with ``slope_check`` a large one is a finding
            (:func:`slope_finding`; off for data-refined groups, whose loss need not be minimal at w*).
        issues
            Problems of the set-up already reported (e.g. :attr:`slt.target.Target.issues`:
            dropout active): reasons for ``converged = False``, not repeated as warnings.
        rhat_threshold
            R-hat above this gives a warning.
        diagnostics, warnings
            Entries added to ``diagnostics`` (e.g. the computation path, timings) and
            warnings placed before the ones found here.

        The diagnostics built here (one place for every estimator): ``rhat``, ``ess``
        (over valid chains), ``sem_chains``, ``sem_batch_means``
        (:func:`slt.diagnostics.llc_standard_error`), ``frac_below_init`` (fraction of
        draws below :math:`L(w^*)`, and ``_per_chain``), ``mala_acceptance`` (and
        ``_per_chain``; NaN when not computed), ``divergent_chains``,
        ``divergence_step``, ``halving`` (:func:`_halving_record`), ``slope_at_init``
        (:func:`slope_record`) and ``warnings``: every chain diverged; more than half the draws below
        :math:`L(w^*)` (w* is not a minimum); the slope at w* (:func:`slope_finding`); MALA
        acceptance below 0.5; R-hat above ``rhat_threshold``; λ̂ drifting through the draws or not
        stable when ε halves (:func:`equilibrium_checks`).
        """
        C = loss.shape[0]
        tr = nbeta * (loss - star)
        dead = torch.zeros(C, dtype=torch.bool) if diverged is None else diverged
        if bool(dead.any()):  # mask draws of divergent chains from their divergence on
            gone = dead.unsqueeze(1) & (draw_steps.unsqueeze(0) >= divergence_step.unsqueeze(1))
            tr = tr.masked_fill(gone, float("nan"))
            loss = loss.masked_fill(gone, float("nan"))
        per_chain = tr.mean(1).masked_fill(dead, float("nan"))
        valid = ~dead
        warn_list = list(warnings or [])
        if valid.sum() == 0:
            mean = std = sem = r = e = sem_c = sem_b = float("nan")
            warn_list.append("every chain diverged: no estimate; reduce step_size")
        else:
            pv = per_chain[valid]
            mean = float(pv.double().mean())
            std = float(pv.double().std()) if pv.numel() > 1 else float("nan")
            sem, sem_c, sem_b = llc_standard_error(pv, tr[valid])
            r = rhat(tr[valid]) if int(valid.sum()) > 1 else float("nan")
            e = ess(tr[valid])
        # below L(w*) by more than the rounding of two evaluations of one loss (a restriction the loss does not see
        # draws L(w*) itself, ± an ulp)
        rounding = nbeta * 4 * torch.finfo(loss.dtype).eps * torch.maximum(loss.abs(), star.abs())
        below = (tr < -rounding).double().mean(1)
        frac_below = float(below[valid].mean()) if valid.any() else float("nan")
        mala_c = torch.full((C,), float("nan"), dtype=torch.float64) if mala is None else mala
        mala_mean = float(mala_c[valid].mean()) if valid.any() and mala is not None else float("nan")
        if frac_below > 0.5:
            random = any(i.startswith(RANDOM_ISSUES) for i in issues or [])
            warn_list.append(
                f"{frac_below:.0%} of draws have a loss below L(w*): " + (
                    "the model's loss is random (see the set-up note), so L(w*) is one random draw of it" if random
                    else "w* is probably not a local minimum of the loss (train it further); λ̂ is then biased low")
            )
        coarse = precision_finding(nbeta, init_loss, loss.dtype, mean, sem, dims)
        if coarse is not None:
            warn_list.append(coarse)
        beyond = above_half_dims(mean, sem, dims) if slope_check else None  # (data-refined: w* need not be minimal)
        if beyond is not None:
            warn_list.append(beyond)
        given = given_step_finding(mala_mean, step_size, config) if mala is not None else None
        if given is not None:
            warn_list.append(given)
        elif mala is not None and mala_mean < 0.5:
            warn_list.append(f"MALA acceptance {mala_mean:.2f} is low: reduce step_size")
        drift = None
        if valid.any():
            _, drift, found = equilibrium_checks(tr[valid], mala_mean if mala is not None else None, rhat_threshold,
                                                 r=r, e=e, halved=None if halved is None else halved[valid],
                                                 diffusion=None if diffusion is None else diffusion[valid],
                                                 times=draw_times, step_size=step_size, localization=localization,
                                                 sampler=sampler,
                                                 relaxation_gain=float((config or {}).get("relaxation_gain") or 1.0))
            hint = relaxation_hint(step_size, localization, config)
            warn_list += [msg + hint if kind in ("rising", "halving", "diffusing") else msg for kind, msg in found]
        sloped = None if slope is None or not valid.any() else slope_record(nbeta * slope.double()[valid], mean)
        if sloped is not None and not slope_check:
            sloped["checked"] = False  # printed, not judged: a data-refined loss need not be flat at w*
        if sloped is not None and slope_check:
            msg = slope_finding(sloped["value"], sloped["sem"], mean, sem)
            if msg is not None:
                warn_list.append(msg)
        heat = msg = None
        if heating is not None and valid.any():
            heat = heating_record(heating[valid], mean)
            msg = heating_check(heat["excess"], mean, sem, config)
            if msg is not None:
                warn_list.append(msg)
        biased = None if step_bias is None or not valid.any() else heating_record(step_bias[valid], mean)
        if biased is not None:  # (beside a heating finding, the discretisation part is judged on its own)
            rest = biased["excess"] if msg is None else biased["excess"] - heat["excess"]
            msg = step_bias_check(rest, mean, sem, heat if msg is None else None, config,
                                  besides_heating=msg is not None)
            if msg is not None:
                warn_list.append(msg)
        problems = list(issues or []) + warn_list
        if bool(dead.any()) and valid.any():
            problems.append(f"{int(dead.sum())} of {C} chains diverged (excluded)")
        if r != r and int(valid.sum()) < 2:
            problems.append("R-hat needs at least 2 chains: convergence cannot be assessed")
        steps = [-1] * C if divergence_step is None else divergence_step.tolist()
        diag = {
            "rhat": r, "ess": e, "mala_acceptance": mala_mean,
            "mala_acceptance_per_chain": [float(v) for v in mala_c],
            "frac_below_init": frac_below,
            "frac_below_init_per_chain": [float(v) for v in below],
            "divergent_chains": dead.nonzero().flatten().tolist(),
            "divergence_step": [int(s) for s in steps if s >= 0],
            "sem_chains": sem_c, "sem_batch_means": sem_b,
            "drift": None if drift is None else {"first_half": drift[0], "second_half": drift[1], "z": drift[2]},
            "halving": _halving_record(tr[valid], None if halved is None else halved[valid]),
            "minibatch_heating": heat,
            "step_bias": biased,
            "slope_at_init": sloped,
            "free_diffusion": (None if diffusion is None or not valid.any()
                               else float(diffusion[valid].double().mean())),
            **dict(diagnostics or {}),
            "warnings": warn_list,
            "converged": not problems,
            "convergence_reasons": problems,
        }
        return cls(
            llc_mean=mean, llc_std=std, llc_sem=sem, llc_per_chain=per_chain, llc_trace=tr, loss_trace=loss,
            loss_star_trace=star, init_loss=float(init_loss), nbeta=nbeta, step_size=step_size,
            localization=localization, sampler=sampler, diagnostics=diag, observables=dict(observables or {}),
            burnin_loss_trace=burnin, config=dict(config or {}),
        )

    @property
    def converged(self) -> bool:
        """Whether no check failed (see :attr:`convergence_reasons`): every chain kept, R-hat within its
        threshold, an effective sample size of at least :data:`slt.defaults.ESS_MIN`, no drift of λ̂ through the
        draws, λ̂ stable when ε halves at the same number of steps (read
        off the run's own trace: :func:`slt.diagnostics.halved_step_estimate`), MALA acceptance ≥ 0.5 where
        computed, w* a minimum (fewer than half the draws below it), and no problem of the model set-up
        (e.g. dropout active)."""
        return bool(self.diagnostics.get("converged", False))

    @property
    def convergence_reasons(self) -> list[str]:
        """Why :attr:`converged` is False: each failed check with its cause and fix."""
        return list(self.diagnostics.get("convergence_reasons", []))

    def llc_interval(self, level: float = 0.95) -> tuple[float, float]:
        r"""``(low, high)`` = λ̂ ∓ :math:`t_{C-1}`·s.e., Student's t at the two-sided ``level`` with one
        degree of freedom fewer than the ``C`` chains kept (NaNs under 2 chains).

        The standard error comes from the spread of ``C`` chain means (or the batch means of their
        average, whichever is larger: :func:`slt.diagnostics.llc_standard_error`), so with few chains it
        is itself a rough estimate: at 4 chains the 95% interval is ±3.18 s.e., not ±1.96, and a
        reference 4.5 s.e. away is no surprise once in fifty runs (an audit of 72 default runs against
        NUTS on the same potential found 2 of 4-chain runs at z ≈ −4.5 and −3.1, as t₃ predicts)."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        C = self.num_chains - len(self.divergent_chains)
        if C < 2 or not (self.llc_sem == self.llc_sem):
            return float("nan"), float("nan")
        half = t_threshold(NormalDist().inv_cdf(0.5 + level / 2), C - 1) * self.llc_sem
        return self.llc_mean - half, self.llc_mean + half

    @property
    def num_chains(self) -> int:
        return int(self.llc_per_chain.shape[0])

    @property
    def num_draws(self) -> int:
        return int(self.loss_trace.shape[1])

    @property
    def divergent_chains(self) -> list[int]:
        return list(self.diagnostics.get("divergent_chains", []))

    def to_frame(self):
        """Long-format DataFrame: one row per (chain, draw)."""
        import pandas as pd

        C, T = self.loss_trace.shape
        chain = np.repeat(np.arange(C), T)
        draw = np.tile(np.arange(T), C)
        cols: dict[str, Any] = {
            "chain": chain,
            "draw": draw,
            "loss": self.loss_trace.double().reshape(-1).numpy(),
            "loss_star": self.loss_star_trace.double().reshape(-1).numpy(),
            "llc": self.llc_trace.double().reshape(-1).numpy(),
            "divergent": np.repeat(
                np.array([c in set(self.divergent_chains) for c in range(C)]), T
            ),
        }
        for name, val in self.observables.items():
            if val.ndim == 2:
                cols[name] = val.double().reshape(-1).numpy()
        return pd.DataFrame(cols)

    def summary(self) -> dict[str, Any]:
        """Scalars only (JSON-friendly)."""
        out = {
            "llc_mean": self.llc_mean,
            "llc_std": self.llc_std,
            "llc_sem": self.llc_sem,
            "llc_per_chain": [float(v) for v in self.llc_per_chain],
            "init_loss": self.init_loss,
            "nbeta": self.nbeta,
            "step_size": self.step_size,
            "localization": self.localization,
            "sampler": self.sampler,
            "num_chains": self.num_chains,
            "num_draws": self.num_draws,
        }
        for k, v in self.diagnostics.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                out[k] = v
            elif isinstance(v, (list, tuple)):
                out[k] = [x if isinstance(x, (int, float, str, bool)) else float(x) for x in v]
        slope = self.diagnostics.get("slope_at_init")
        if slope:  # the part of λ̂ owed to the slope at w* (0 at a critical point) and its s.e.
            out["slope_at_init"], out["slope_at_init_sem"] = slope["value"], slope["sem"]
        if self.config.get("dtype") is not None:  # the precision the run used (a sweep's dtype=null records None)
            out["dtype"] = self.config["dtype"]
        check = self.diagnostics.get("halving_direct")
        if check:  # the chains continued at ε/2 (check_halving) and the first-order extrapolation to ε → 0
            out.update(llc_half_step=check["llc_at_half_step"], llc_half_step_sem=check["llc_at_half_step_sem"],
                       llc_half_step_z=check["z"], llc_extrapolated=check.get("extrapolated"),
                       llc_extrapolated_sem=check.get("extrapolated_sem"))
        return out

    def __str__(self) -> str:
        d = self.diagnostics
        valid = self.num_chains - len(self.divergent_chains)

        def f(x: Any, spec: str = ".3g") -> str:
            return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

        def known(x: Any) -> bool:
            return x is not None and not (isinstance(x, float) and math.isnan(x))

        # the acceptance that applies: MALA's for the Langevin samplers (where computed), the
        # mean Metropolis acceptance for NUTS; nothing where neither was measured
        accept = ""
        if known(d.get("mala_acceptance")):
            accept = f"MALA acceptance={f(d.get('mala_acceptance'))} "
        elif known(d.get("mean_accept_prob")):
            accept = f"NUTS accept prob={f(d.get('mean_accept_prob'))} "
        lo, hi = self.llc_interval()
        interval = f"; 95% interval {f(lo, '.4g')}–{f(hi, '.4g')}" if known(lo) else ""
        lines = [
            f"LLC = {f(self.llc_mean, '.4g')} ± {f(self.llc_sem)} (s.e.; std over chains "
            f"{f(self.llc_std)}{interval}), {valid}/{self.num_chains} chains × {self.num_draws} draws",
            f"  sampler={self.sampler} step_size={self.step_size:.3g} nbeta={self.nbeta:.4g} "
            f"localization={self.localization:.4g} L(w*)={self.init_loss:.6g}",
            f"  R-hat={f(d.get('rhat'))} ESS={f(d.get('ess'), '.0f')} {accept}"
            f"draws below L(w*)={f(d.get('frac_below_init'), '.1%')} path={d.get('path')}",
        ]
        cfg = self.config
        where = []  # a refined run: which restriction and distribution this result is of
        if cfg.get("restriction") is not None:
            moved = cfg.get("restricted_params")
            where.append(f"restriction {cfg['restriction']!r}"
                         + (f" ({moved} of {cfg.get('num_params')} parameters move)" if moved is not None else ""))
        if cfg.get("data") is not None:
            where.append(f"data {cfg['data']!r} (n = {cfg.get('n')})")
        if where:
            lines.insert(1, "  " + "; ".join(where))
        if d.get("step_size_collapse_cause") == "friction":
            lines.append(f"  step size: SGHMC's adaptation fell to {f(d.get('step_size_collapsed'))} (its friction √(2εγ) "
                         "follows ε, so the heat of the exploratory steps stays in the velocity): the run used ε₀ from "
                         "the curvature at w*")
        spread = d.get("free_diffusion")
        if known(spread):
            walk = {"sgld": "d·ε·t", "sghmc": "d·(ε/α)·t (α the friction)"}.get(
                self.sampler, "ε·t·tr G (G the frozen preconditioner)")
            lines.append(f"  spread ‖w − w*‖² = {f(spread, '.3g')} of a free random walk's {walk}"
                         + (" (the potential has not yet held the chains in most directions)"
                            if spread >= FREE_DIFFUSION else ""))
        slope = d.get("slope_at_init")
        if slope:
            lines.append(f"  slope at w*: nβ·E[∇L(w*)·(w − w*)] = {f(slope['value'])} ± {f(slope['sem'], '.2g')} of λ̂ "
                         + ("(0 at a critical point)" if slope.get("checked", True) else
                            "(not checked: a data-refined LLC's loss need not be minimal at w*)"))
        heat = d.get("minibatch_heating")
        if heat:
            bs = self.config.get("batch_size")
            lines.append(f"  minibatch heating ≈ {f(heat['excess'])} ({f(heat['fraction'], '.1%')} of λ̂; first order, "
                         f"∝ step_size/batch_size) at batch_size={bs}")
        bias = d.get("step_bias")
        if bias:
            lines.append(f"  step bias ≈ {f(bias['excess'])} ({f(bias['fraction'], '.1%')} of λ̂; first order, "
                         "discretisation and minibatch heating, ∝ step_size)")
        shrunk = d.get("step_bias_rescale")
        if shrunk:
            lines.append(f"  step_size shrunk {shrunk['from']:.3g} → {shrunk['to']:.3g}: the step bias was "
                         f"{shrunk['fraction']:.1%} of λ̂ (more than {STEP_BIAS_SHARE:.0%}) and the run was repeated "
                         f"with the automatic burn-in and the steps between draws × {shrunk.get('stretch', 1)} (now "
                         f"{self.config.get('num_steps_bw_draws')}: the same ε·t)")
        for up in self.config.get("batch_size_raises") or []:
            lines.append(f"  batch_size raised {up['from']} → {up['to'] or 'full batch'}: minibatch heating "
                         f"{f(up['excess'])} ({f(up['fraction'], '.1%')} of λ̂ {f(up['llc'])}) at {up['from']}")
        fb = self.config.get("sampler_fallback")
        if fb:
            why = "; ".join(fb.get("reasons") or [])
            tried, steps = fb["tried"], []
            for i, t in enumerate(tried):
                name = FALLBACK_NAMES[t["sampler"]][1] if t["sampler"] in FALLBACK_NAMES else t["sampler"]
                last = i == len(tried) - 1
                if t["settled"]:
                    steps.append(f"{name}, which settled: these are its draws")
                else:  # ("either": like the first sampler; only the last failure keeps the first's draws)
                    steps.append(f"{name}, which did not settle {'either ' if last else ''}"
                                 f"({'; '.join(t['reasons_after'])})"
                                 + (f": these are {fb['from']}'s draws" if last else ""))
            if fb.get("first"):  # SGHMC ran before SGLD (slt.defaults.SGHMC_FIRST_BURNIN)
                lines.append(f"  sampler: {why}: ran first " + ", then ".join(steps))
            else:
                lines.append(f"  sampler: {fb['from']} did not settle at γ = {f(fb['localization'], 'g')} ({why}); "
                             "repeated with " + ", then with ".join(steps))
        ups = self.config.get("localization_escalations") or []
        if ups:  # λ̂ depends on γ: a run that ended on another γ (another seed, another checkpoint) is not comparable
            path = " → ".join(f(u["localization"], "g") for u in ups) + f" → {f(self.localization, 'g')}"
            last = ups[-1]
            first, more = last.get("finding") or "", len(last.get("reasons") or []) > 1
            groups = last.get("groups") or []
            at = f" ({'; '.join(groups[:3])}{' …' if len(groups) > 3 else ''})" if groups else ""
            lines.append(f"  localization raised {path} (chains unsettled at {f(last['localization'], 'g')}{at}: "
                         f"{first.split(':')[0]}{' …' if more else ''}); λ̂ depends on γ, so compare it with "
                         f"runs at the same γ (pass localization={f(self.localization, 'g')} to fix it)")
        check, run = d.get("halving_direct"), self.config.get("halving_check") or {}
        if check:  # the chains continued at ε/2 (check_halving)
            ex = check.get("extrapolated")
            lines.append(f"  ε/2 check: the chains continued at ε/2 read λ̂ {f(check['llc_at_half_step'], '.4g')} ± "
                         f"{f(check['llc_at_half_step_sem'])} (paired z = {f(check['z'], '.2g')}"
                         + (f"; 2λ̂(ε/2) − λ̂(ε) = {f(ex, '.4g')} ± {f(check.get('extrapolated_sem'), '.2g')}"
                            if ex is not None else "") + ")")
        elif "skipped" in run:
            lines.append(f"  ε/2 check: not run: {run['skipped']}")
        for ext in self.config.get("draw_extensions") or []:
            lines.append(f"  draws extended {ext['from']} → {ext['to']}: chains stationary but not yet mixed "
                         f"(R-hat {f(ext['rhat'])})")
        if self.divergent_chains:
            lines.append(f"  DIVERGENT chains (excluded): {self.divergent_chains}")
        shown = d.get("warnings", [])
        for w in shown:
            lines.append(f"  warning: {w}")
        for p in d.get("convergence_reasons", []):  # set-up problems (dropout active, ...) and excluded chains
            if p not in shown:
                lines.append(f"  not converged: {p}")
        for note in self.config.get("setup_notes") or []:  # e.g. an unseeded shuffling DataLoader
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    __repr__ = __str__


#: How the samplers of ``config["sampler_fallback"]`` are named: ``(short, long)``, the short name in the engine's
#: convergence notes, the long one in ``print(result)``
FALLBACK_NAMES = {"sghmc": ("critically damped SGHMC", "SGHMC damped critically for γ (friction √(2εγ))"),
                  "rmsprop_sgld": ("RMSProp-SGLD", "RMSProp-SGLD (preconditioner frozen after burn-in)"),
                  "sgld": ("SGLD", "SGLD with that burn-in")}

#: The kinds of :func:`equilibrium_checks` findings that say the chains have not reached equilibrium
#: (what a stronger localization cures when flat directions keep chains wandering; see
#: :func:`slt.engine.sample_target`'s automatic localization).
UNSETTLED = ("rhat", "rising", "halving", "diffusing", "unexplored")

#: :func:`equilibrium_checks` reads chains whose spread is at least this share of a free walk's
#: (:func:`slt.diagnostics.free_diffusion`) as not yet held by the potential in most directions
FREE_DIFFUSION = 0.5
#: :func:`unexplored_finding`: a run (SGLD, or SGLD in a frozen metric) shorter than this share of one
#: relaxation time 1/(ε·G·γ) of a direction only γ holds (G·εγ·t below it), whose chains spread like a free walk
UNEXPLORED_RELAXATION = 0.1
#: the samplers :func:`unexplored_finding` judges: SGLD, and RMSProp-SGLD (SGLD in the metric its frozen
#: preconditioner sets; its free walk and relaxation are measured in that metric)
UNEXPLORED_SAMPLERS = ("sgld", "rmsprop_sgld")


#: :func:`given_step_finding`: a run at a step the caller gave whose MALA acceptance is below this
MALA_GIVEN_MIN = 0.9


def given_step_finding(mala_mean: float, step_size: Any, config: Mapping[str, Any] | None) -> str | None:
    r"""The finding that a step size the caller gave is too large for λ̂ to be trusted, or ``None``.

    SGLD's stationary law differs from the posterior by :math:`O(\epsilon)`, and λ̂ grows with that
    discretisation bias; the in-run checks (trend, in-run halving) see relaxation, not this bias.  The
    adapted step targets MALA acceptance :data:`slt.defaults.LLC` ``.target_accept`` (0.99); a step given
    by hand is judged by its acceptance instead: below :data:`MALA_GIVEN_MIN` it is a finding (a softplus
    MLP 4-8-1 at γ = 10, fixed steps: ε = 1e-3 read λ̂ 30.4 ± 2.1 at MALA 0.59, "converged"; 5e-4 read 5.33
    at 0.76, 2.5e-4 read 4.47 at 0.89, and the adapted step 4.26).  Only for ``config["step_size_rule"]
    == "given"`` and a known acceptance (full batch, or MALA every ``mala_every`` steps)."""
    if (config or {}).get("step_size_rule") != "given" or not mala_mean < MALA_GIVEN_MIN:  # (NaN: unknown)
        return None
    try:
        eps = float(step_size)
        half = f"step_size={eps / 2:.3g}"
    except (TypeError, ValueError):
        half = "half the step_size"
    shown = f"{mala_mean:.2f}" if round(mala_mean, 2) < MALA_GIVEN_MIN else f"{mala_mean:.4f}"  # not "0.90 < 0.9"
    checked = "draw_steps" in ((config or {}).get("halving_check") or {})  # (check_halving ran: its line says)
    check = ("the continued ε/2 check (check_halving) read λ̂ at half the step" if checked
             else f"check that λ̂ is stable at {half} with the same number of steps")
    return (f"MALA acceptance {shown} < {MALA_GIVEN_MIN:g} at the step_size given: SGLD's discretisation bias "
            "grows with ε and can inflate λ̂ severalfold at this acceptance (an MLP read 30.4 at acceptance 0.59 and "
            f"4.5 at 0.89); {check}, or leave step_size to the default (adapted toward acceptance 0.99)")


def unexplored_finding(spread: float, step_size: Any, localization: float, steps: float,
                       sampler: str, relaxation_gain: float = 1.0) -> str | None:
    r"""The finding that the chains explored only the stiffest directions, or ``None``.

    SGLD relaxes a direction of curvature :math:`\kappa` of U (:math:`n\beta h + \gamma`) in about
    :math:`1/(\epsilon\kappa)` steps, so within ``steps`` = t steps from w* only directions with
    :math:`\kappa \gtrsim 1/(\epsilon t)` have felt the potential.  When :math:`\epsilon\gamma t` is
    below :data:`UNEXPLORED_RELAXATION`, that is every curvature up to ten times γ, and a spread of at
    least :data:`FREE_DIFFUSION` of a free walk's says most directions are among them: λ̂ then counts only
    the stiffest directions, unless the others are exactly flat (parameters the loss does not use), which
    the run cannot tell.  The trend and halving checks can miss it, since the stiff directions relaxed
    at once and the slow ones add little within the run: a tanh MLP whose L-BFGS finish grew its weights to
    ~130 (curvature ~6000) adapted ε = 5e-8 at γ = 100 (εγt = 0.002, spread 0.92) and read λ̂ 4.5 ± 0.3,
    converged, where runs at 10× and 100× the step read 15 and 240.  RMSProp-SGLD with its preconditioner
    frozen is SGLD in the metric G: its spread is measured against ε t tr G and a flat direction relaxes
    at most ``relaxation_gain`` = 1/a times faster (:math:`G \le 1/a`), so the test is on G·εγ·t (the same
    MLP at γ = 100: G·εγt = 0.066, spread 0.99, λ̂ 4.9 ± 0.3 "settled", against 10.2 ± 0.9 after a burn-in
    of 5/(G εγ)).  Not SGHMC, whose free motion is ballistic."""
    if sampler not in UNEXPLORED_SAMPLERS or not localization > 0 or not spread >= FREE_DIFFUSION:
        return None
    try:
        eps = float(step_size)
        gain = float(relaxation_gain) if relaxation_gain and relaxation_gain > 0 else 1.0
    except (TypeError, ValueError):
        return None
    gt = gain * eps * localization * steps
    if not gt < UNEXPLORED_RELAXATION:
        return None
    rate, time = ("1/(εγ)", "εγ·t") if gain == 1.0 else (f"1/(ε·G·γ), G = {gain:g}", "G·εγ·t")
    return (f"chains explored only the stiffest directions: the run lasted {time} = {gt:.2g} of the "
            f"{1 / (gain * eps * localization):.3g} steps ({rate}) a direction only γ holds needs to relax, and the "
            f"chains spread {spread:.2f} of a free random walk's, so most directions had not felt the potential; λ̂ "
            f"counts only curvatures above about 1/(ε·t) = {1 / (eps * steps):.3g} (unless the rest are exactly flat, "
            "which the run cannot tell). The step size is set by the sharpest direction: check that w* is a trained "
            f"minimum (large weights make the loss stiff), or raise num_burnin toward 5/({'εγ' if gain == 1.0 else 'ε·G·γ'})"
            " or the localization")


def equilibrium_checks(tr: Tensor, mala_mean: float | None = None, rhat_threshold: float = 1.1, *,
                       r: float | None = None, e: float | None = None, halved: Tensor | None = None, diffusion: Tensor | None = None,
                       times: Tensor | None = None, step_size: Any = None, localization: float | None = None,
                       sampler: str | None = None, relaxation_gain: float = 1.0
                       ) -> tuple[float, tuple[float, float, float] | None, list[tuple[str, str]]]:
    r"""Whether the chains of one group look settled: R-hat and the trend of λ̂ through the draws.

    Parameters
    ----------
    tr
        ``(C, T)`` per-draw λ̂ of the valid (non-divergent) chains.
    mala_mean
        Mean MALA acceptance (``None``: not computed); ≥ 0.995 with a rising λ̂ means the chains
        barely moved (the step is too small), not that they are still relaxing.
    rhat_threshold
        R-hat above this is a finding.
    r, e
        R-hat and the effective sample size if already computed.
    halved
        ``(C,)`` the estimate of each chain at half the step with the same steps
        (:func:`slt.diagnostics.halved_step_estimate`), or ``None``.
    diffusion, times
        ``(C,)`` each chain's spread over a free walk's at the end of the run
        (:func:`slt.diagnostics.free_diffusion`) and ``(T,)`` the steps from w* at each draw, or
        ``None``: chains that spread like a free walk (mean ≥ :data:`FREE_DIFFUSION`) and whose λ̂
        grew through the draws by more than half of what λ̂ ∝ t (a free walk's growth) predicts
        are a finding ``"diffusing"`` whatever the z of that growth: such chains have not felt the
        potential in most directions, λ̂ grows with the run's time εt, and with 8 chains of a
        few diffusing directions the growth's z stays far below the 3σ of the trend test (a GRU at
        ε = 1.5e-9: λ̂ 2.3 → 3.9, z = 2.5, f = 0.98).  It replaces a ``"rising"`` finding (it names
        the cause) and gives way to ``"barely_moved"`` (which names it too).
    step_size, localization, sampler, relaxation_gain
        The run's ε, γ, sampler and ``Sampler.relaxation_gain``, or ``None``: with ``diffusion`` and
        ``times``, chains of an SGLD run far shorter than one relaxation time 1/(ε·G·γ) that spread like a free walk are a finding
        ``"unexplored"`` (:func:`unexplored_finding`) unless ``"diffusing"`` or ``"barely_moved"``
        already names the cause.

    Returns
    -------
    ``(rhat, drift, findings)``: drift as :func:`_drift` (``None`` under 3 chains or 8 draws) and
    findings ``(kind, message)`` with kind ``"rhat"``, ``"ess"`` (bulk effective sample size under
    :data:`slt.defaults.ESS_MIN`), ``"rising"``, ``"barely_moved"``, ``"falling"``, ``"halving"``,
    ``"diffusing"`` or ``"unexplored"``.  A drift counts when the change between the halves exceeds 2% of
    λ̂ and its z exceeds Student's t at the two-sided level of a normal 3σ (df = C − 1); so does the shortfall
    of ``halved`` below λ̂ (:func:`_halving_gap`; one-sided: steps of an adaptation phase run at
    larger ε, whose discretisation bias can only raise ``halved``).
    """
    C = tr.shape[0]
    if r is None:
        r = rhat(tr) if C > 1 else float("nan")
    found: list[tuple[str, str]] = []
    if r == r and r > rhat_threshold:
        found.append(("rhat", f"R-hat {r:.3f} > {rhat_threshold:g}: chains disagree; run longer or check burn-in"))
    if C > 1 and e is None:
        e = ess(tr)
    if C > 1 and tr.shape[1] < 4:  # (ess and R-hat are undefined: λ̂ of one draw at w* read 0 ± 0, converged)
        found.append(("ess", f"{tr.shape[1]} draw{'s' * (tr.shape[1] != 1)} per chain: R-hat, the effective sample "
                             "size and λ̂'s standard error need at least 4 (and λ̂ hundreds); raise num_draws"))
    elif C > 1 and e == e and e < ESS_MIN:  # (one chain: R-hat is undefined, a finding of its own)
        found.append(("ess", f"effective sample size {e:.0f} < {ESS_MIN:g} over the {C} chains' {tr.shape[1]} "
                             "draws: too few independent draws for R-hat and λ̂'s standard error to be trusted; "
                             "raise num_draws (or num_steps_bw_draws)"))
    drift = _drift(tr) if C >= 3 else None
    mean = float(tr.double().mean(1).mean()) if C else float("nan")
    if drift is not None:
        first, second, z = drift
        rising = changed(second - first, z, mean, C)
        if rising and mala_mean is not None and mala_mean >= 0.995:
            found.append(("barely_moved",
                f"chains barely moved (MALA acceptance {mala_mean:.3f} ≈ 1, λ̂ still rising: {first:.4g} in the "
                f"first half of the draws, {second:.4g} in the second): the step size is too small for this "
                "number of steps (λ̂ then scales with ε); raise step_size or num_burnin"))
        elif rising:
            found.append(("rising",
                f"λ̂ still rising through the draws ({first:.4g} in the first half, {second:.4g} in the second, "
                f"z = {z:.1f}): the chains have not reached equilibrium; raise num_burnin, or the localization "
                "when flat directions keep the chains wandering away from w*"))
        elif changed(first - second, -z, mean, C):
            found.append(("falling",
                f"λ̂ still falling through the draws ({first:.4g} then {second:.4g}, z = {z:.1f}): the chains are "
                "finding lower loss away from w*; is w* a minimum? (train it further)"))
    free = _diffusing(drift, diffusion, times, tr.shape[1], mean)
    if free is not None and not any(kind == "barely_moved" for kind, _ in found):
        found = [(kind, msg) for kind, msg in found if kind != "rising"] + [("diffusing", free)]  # the cause
    gap = None if halved is None else _halving_gap(tr, halved)
    if gap is not None and not any(kind in ("rising", "barely_moved") for kind, _ in found):
        half, full, z = gap
        if changed(full - half, z, mean, C):
            found.append(("halving",
                f"λ̂ is not stable when ε halves: a run at ε/2 with the same steps would draw over the first half "
                f"of this run's time, where λ̂ was {half:.4g} against {full:.4g} in the draws (z = {z:.1f}): the "
                "chains relax more slowly than the run lasts; raise num_burnin or num_draws, or the localization "
                "when flat directions keep the chains wandering away from w*"))
    if (diffusion is not None and times is not None and len(times) and sampler is not None and localization is not None
            and not any(kind in ("diffusing", "barely_moved") for kind, _ in found)
            and bool((tr != 0).any())):  # (a loss that never moved: parameters it does not use, exactly flat)
        msg = unexplored_finding(float(diffusion.double().mean()), step_size, localization, float(times[-1]) + 1.0,
                                 sampler, relaxation_gain)
        if msg is not None:
            found.append(("unexplored", msg))
    return r, drift, found


def heating_record(heating: Tensor, llc: float) -> dict[str, float]:
    """``{"excess", "fraction"}``: the mean first-order excess of λ̂ from minibatch noise over the
    valid chains (``heating`` (C,), :func:`slt.diagnostics.minibatch_heating`) and its share of λ̂."""
    excess = float(heating.double().nanmean())
    return {"excess": excess, "fraction": excess / llc if llc == llc and llc != 0 else float("nan")}


#: The share of λ̂ by which a run at ε/2 may drop through minibatch heating (half the first-order excess)
#: before :func:`heating_check` names it whatever λ̂'s standard error.
HEATING_SHARE = 0.1


def heating_check(excess: float, llc: float, sem: float, config: Mapping[str, Any] | None = None) -> str | None:
    r"""The finding that minibatch noise makes λ̂ depend on ε, or ``None``.

    The excess :math:`\Delta` of :func:`slt.diagnostics.minibatch_heating` is proportional to ε, so
    a run at ε/2 would give λ̂ lower by about Δ/2: a finding when Δ/2 exceeds 2% of λ̂ (the tolerance of
    the other "stable when ε halves" check) and either twice the standard error of λ̂ or
    :data:`HEATING_SHARE` of λ̂.  The second arm keeps a large standard error from hiding a large bias: an
    SGHMC run on minibatches of a regression (λ = 1) read 2.68 ± 0.36 with Δ = 1.39 (52%), "converged"
    (0.69 < 2 s.e.), and 1.90 ± 0.32 at ε/2 (full batch: 0.90 ± 0.14)."""
    if not (excess == excess and llc == llc) or excess <= 0 or llc == 0:
        return None
    frac = excess / llc
    if 0.5 * excess <= CHANGE_FRACTION * abs(llc) or (0.5 * excess <= 2 * sem
                                                      and 0.5 * excess <= HEATING_SHARE * abs(llc)):
        return None
    bs = (config or {}).get("batch_size")
    momentum = (config or {}).get("sampler") == "sghmc"  # its velocity keeps the noise 1/α steps
    return (f"minibatch noise heats the chains: it adds about {excess:.3g} ({frac:.0%}) to λ̂ (first order, "
            + ("(ε/α)(nβ)²·tr Cov[∇L_B]/8 with SGHMC's friction α" if momentum else "ε(nβ)²·tr Cov[∇L_B]/8")
            + f"), so λ̂ is not stable when ε halves (it would drop by about {0.5 * excess:.3g}); "
            + (f"give the DataLoader larger batches{f' (now {bs})' if bs else ''} — the excess scales as "
               "ε/batch_size — or pass the data as tensors or a Dataset (then batch_size=None uses all of it)"
               if (config or {}).get("batch_size_rule") == "loader" else
               f"raise batch_size{f' (now {bs})' if bs else ''} — the excess scales as ε/batch_size — or pass "
               "batch_size=None")
            + ", or a smaller step_size with more num_burnin"
            + (", or a larger friction (sampler=slt.samplers.sghmc(friction=...)), or sampler='sgld'" if momentum
               else ""))


def step_bias_check(excess: float, llc: float, sem: float, heating: Mapping[str, float] | None = None,
                    config: Mapping[str, Any] | None = None, besides_heating: bool = False) -> str | None:
    r"""The finding that SGLD's first-order step bias (:func:`slt.diagnostics.step_bias`: discretisation and
    minibatch heating together) makes λ̂ depend on ε, or ``None``: the rule of :func:`heating_check` on the
    whole excess Δ — half of it beyond 2% of λ̂ and beyond 2 s.e. or :data:`HEATING_SHARE` of λ̂.  An automatic
    step is shrunk to :data:`slt.defaults.STEP_BIAS_SHARE` of λ̂ before the draws are kept, so this judges given
    steps, and runs where the shrink hit its floor.  ``besides_heating``: ``excess`` is the discretisation part
    alone (the heating finding fired and names the rest); at ``target_accept=0.9`` a regression's discretisation
    part was three times its heating, and only the heating was named."""
    if not (excess == excess and llc == llc) or excess <= 0 or llc == 0:
        return None
    if 0.5 * excess <= CHANGE_FRACTION * abs(llc) or (0.5 * excess <= 2 * sem
                                                      and 0.5 * excess <= HEATING_SHARE * abs(llc)):
        return None
    heat = 0.0 if heating is None else max(float(heating["excess"]), 0.0)
    eps = (config or {}).get("step_size")
    factor = STEP_BIAS_SHARE * abs(llc) / excess
    parts = (f": discretisation about {max(excess - heat, 0.0):.3g}, minibatch heating about {heat:.3g}"
             if heating is not None else "")
    what = ("SGLD's discretisation bias, besides the minibatch heating: λ̂ exceeds its ε → 0 value by about "
            f"{excess:.3g} more ({excess / llc:.0%}; first order, (ε/8)(nβ)²·E‖∇L_B‖² over the draws less the heating)"
            if besides_heating else
            f"SGLD's step bias: λ̂ exceeds its ε → 0 value by about {excess:.3g} ({excess / llc:.0%}; first order, "
            f"(ε/8)(nβ)²·E‖∇L_B‖² over the draws{parts})")
    return (what + f", so λ̂ is not stable when ε halves (it would drop by about {0.5 * excess:.3g}); "
            + (f"step_size={eps * factor:.3g} brings it to {STEP_BIAS_SHARE:.0%} of λ̂ (with num_burnin "
               f"{1 / factor:.2g} times longer)" if eps else "pass a smaller step_size with a longer num_burnin")
            + ", or leave step_size to the default, whose rescale does this")


def slope_record(st: Tensor, llc: float) -> dict[str, float] | None:
    r"""``{"value", "sem", "sem_gradient", "fraction"}`` of the slope's part of λ̂ from ``st`` ``(C, T, F)``,
    :math:`n\beta\,\hat g_f\cdot(w_t - w^*)` per chain, draw (where it was taken) and fold of the slope
    estimate; ``None`` without draws.

    ``value`` is the mean over everything.  Its error has two independent parts: the chains' (the
    fold-averaged trace through :func:`slt.diagnostics.llc_standard_error`, as λ̂'s) and the slope
    estimate's own noise, common to all chains, whose size the folds' spread gives
    (``sem_gradient`` = std over folds / √F; 0 with one fold, the exact gradient): ``sem`` is their
    root sum of squares."""
    if st.shape[1] == 0:
        return None
    per_draw = st.mean(2)
    value = float(per_draw.mean())
    sem_chains = llc_standard_error(per_draw.mean(1), per_draw)[0]
    F = st.shape[2]
    sem_grad = float(st.mean((0, 1)).std() / math.sqrt(F)) if F > 1 else 0.0
    return {"value": value, "sem": math.hypot(sem_chains, sem_grad), "sem_gradient": sem_grad,
            "fraction": value / llc if llc == llc and llc != 0 else float("nan")}


#: the slope check (:func:`slope_finding`) fires when the least bias the slope implies exceeds this share of λ̂
SLOPE_FRACTION = 0.05


#: :func:`precision_finding` fires when one rounding of the loss, in λ̂'s units, exceeds this share of λ̂
PRECISION_SHARE = 0.1
#: :func:`precision_finding` does not judge a bound below this share of d/2 (the largest λ of a minimum in the
#: moved coordinates): a head whose output is zeroed read λ̂ = −1.7e-7 (right: the loss does not see it) with a
#: float32 bound of 2e-6, "1198% of λ̂", and was reported not converged (d/2 = 192: the bound 1e-8 of it).
PRECISION_FLOOR = 1e-4


#: the fix both precision messages name (:func:`precision_problem`, :func:`precision_finding`)
_PRECISION_FIX = "pass dtype=torch.float64, or take the loss's constant part out (e.g. centre and scale regression targets)"


def precision_bound(nbeta: float, init_loss: float, dtype: torch.dtype) -> float:
    r"""One rounding of the loss at w* in λ̂'s units, :math:`n\beta\,\epsilon_{\rm dtype}\,|L(w^*)|`
    (NaN for a non-float dtype or an unknown loss): see :func:`precision_finding`."""
    if not torch.empty(0, dtype=dtype).is_floating_point() or not init_loss == init_loss:
        return float("nan")
    return nbeta * torch.finfo(dtype).eps * abs(init_loss)


def precision_problem(nbeta: float, init_loss: float, dtype: torch.dtype, dims: float, share: float = 1.0) -> str | None:
    r"""Why the precision cannot resolve *any* λ̂ of this target, before sampling, or ``None``: the rounding bound
    of :func:`precision_bound` above ``share`` × d/2, the largest λ a minimum in ``dims`` coordinates can have
    (λ ≤ d/2, a regular point).  At ``share`` = 1 every λ̂ the run could read is within its rounding, which then
    also misleads the step-size adaptation and the divergence check: on a regression with unscaled targets
    (L(w*) ≈ 10⁴, n = 50 000, 6 parameters, float32, bound 5.5 > d/2 = 3) the adaptation read the rounding as
    jumps and every chain "diverged" at ε = 4e-8."""
    bound = precision_bound(nbeta, init_loss, dtype)
    if not (dims > 0 and bound > share * dims / 2):  # (a restriction that moves nothing has nothing to resolve)
        return None
    name = str(dtype).replace("torch.", "")
    return (f"{name} cannot resolve this loss: one rounding of L(w*) = {init_loss:.6g} is nβ·eps·|L| = {bound:.3g} in "
            f"λ̂'s units, {'more than' if share >= 1 else 'a large share of'} d/2 = {dims / 2:g} (the largest λ of a "
            f"minimum in {dims:g} coordinates), so λ̂, the step-size adaptation and the divergence check would read "
            f"rounding; {_PRECISION_FIX}")


def precision_finding(nbeta: float, init_loss: float, dtype: torch.dtype, llc: float, sem: float,
                      dims: float | None = None) -> str | None:
    r"""The finding that the run's precision cannot resolve λ̂, or ``None``.

    λ̂ = nβ(E L − L(w*)) subtracts two losses of size |L|, each rounded to about ε_dtype·|L|: the rounding of
    L(w*) is fixed, so it does not average out over the draws, and it biases λ̂ by up to
    :math:`neta\,\epsilon\,|L(w^*)|`; the MALA acceptance, computed from the same losses, then reads rounding
    (and the jump check with it).  A finding when that bound exceeds :data:`PRECISION_SHARE` of |λ̂| and twice
    its standard error: a regression on unscaled targets (L(w*) ≈ 10⁴, n = 50 000, nβ = 4621, float32: bound
    5.5) read λ̂ 0.92 ± 0.10 against 3.20 ± 0.07 in float64, both converged.  With ``dims`` (the coordinates the
    chains move), also when the bound exceeds :data:`PRECISION_SHARE` of d/2 (the largest λ of a minimum) however
    large the standard error: rounding that the adaptation reads as jumps collapses the step and leaves the chains
    unsettled, with an s.e. as large as the rounding hides (n = 5000, bound 0.70 = 23% of d/2 = 3: λ̂ −0.03 ± 18.7 at
    1000 draws, and 38 ± 51 "converged" at 200 draws after the fallback to RMSProp-SGLD).
    """
    bound = precision_bound(nbeta, init_loss, dtype)
    if not (bound == bound and llc == llc):
        return None
    beyond_any = bool(dims) and bound > PRECISION_SHARE * dims / 2  # (true λ ≤ d/2, whatever λ̂ read)
    if not beyond_any and (bound <= PRECISION_SHARE * abs(llc) or bound <= 2 * sem or llc == 0 or sem != sem
                           or (dims and bound <= PRECISION_FLOOR * dims / 2)):
        return None  # (λ̂ = 0: the loss never moved, e.g. a restriction to unused parameters; no s.e.: one draw)
    name = str(dtype).replace("torch.", "")
    share = (f"{bound / (dims / 2):.0%} of d/2 = {dims / 2:g}, the largest λ of a minimum in {dims:g} coordinates; λ̂ read "
             f"{llc:.4g}" if beyond_any else f"{bound / abs(llc):.0%} of λ̂ = {llc:.4g}")
    return (f"{name} cannot resolve λ̂ here: one rounding of L(w*) = {init_loss:.6g} is nβ·eps·|L| = {bound:.3g} in "
            f"λ̂'s units ({share}), and the rounding of L(w*) does not average out, "
            f"so λ̂ can be off by about that much (the MALA acceptance reads rounding too); {_PRECISION_FIX}")


#: the samplers whose per-step move :func:`resolution_problem` knows: SGLD's noise √ε per step, SGHMC's velocity
#: √(ε/2) (its stationary scale, kept from step to step)
_STEP_SCALE = {"sgld": 1.0, "sghmc": 0.5 ** 0.5}


def resolution_problem(w_star: Tensor, step_size: float, sampler: str | None, dtype: torch.dtype,
                       mask: Tensor | None = None) -> str | None:
    r"""Why the dtype cannot resolve the chains' steps in some coordinates, or ``None``.

    A coordinate moves by about s = √ε per step in SGLD (its fresh noise) and by SGHMC's velocity,
    stationary scale √(ε/2).  Where s is below the spacing of the dtype's numbers at :math:`w^*_i` (one ulp,
    about eps·|w*_i|), the update :math:`w_i + \Delta` rounds to a neighbour: SGLD then moves only when its
    noise happens to exceed half an ulp, SGHMC's velocity, smooth from step to step, is rounded away for many
    steps.  Measured on a regression y = a·x₁ + b·x₂ with a* = 3·10⁴ (float32 ulp 0.002, λ = 1 by float64):
    SGLD read +4%, +9%, +17% at s/ulp = 1.8, 0.9, 0.5 (full batch, given ε); SGHMC 0.56 ± 0.08 at
    s/ulp = 0.16, *converged*.  A finding when s < 1 ulp in some coordinate the chains move (``mask``:
    ``(d,)`` bool, those of a restriction); samplers other than SGLD and SGHMC (a preconditioned step) are
    not judged."""
    scale = _STEP_SCALE.get(sampler or "")
    if scale is None or not step_size > 0 or not w_star.is_floating_point():
        return None
    w = w_star.detach().abs().to(dtype)
    if mask is not None:
        w = w[mask.to(w.device) != 0]
    if w.numel() == 0:
        return None
    ulp = torch.nextafter(w, torch.full_like(w, float("inf"))) - w
    s = scale * step_size ** 0.5
    coarse = ulp > s
    if not bool(coarse.any()):
        return None
    worst = int(torch.argmax(torch.where(coarse, w, torch.zeros_like(w))))
    name = str(dtype).replace("torch.", "")
    return (f"{name} cannot resolve the chains' steps in {int(coarse.sum())} of {w.numel()} coordinates: at |w*| up "
            f"to {float(w[worst]):.4g} one {name} spacing is {float(ulp[worst]):.3g}, more than a step's move "
            f"{s:.3g} ({'√ε' if scale == 1.0 else 'SGHMC velocity √(ε/2)'}), so those coordinates move by rounding, "
            "which biases λ̂ (an SGHMC run read 0.56 for λ = 1); pass dtype=torch.float64, or rescale those "
            "parameters (standardise the targets or features they scale)")


#: :func:`above_half_dims`: λ̂ may exceed d/2 by this share before its excess, beyond 2 s.e., is a finding.  SGLD's
#: stationary bias at a regular point, (d/2)/(1 − εκ/4), is 10–20% at the adapted step on models of one or two
#: parameters (helper 36: linear regression, d = 1, 0.553–0.596 over five seeds) and 29% at twice that step
#: (acceptance 0.96)
HALF_DIMS_SLACK = 0.25


def above_half_dims(llc: float, sem: float, dims: float | None) -> str | None:
    r"""The finding that λ̂ exceeds d/2, the largest λ of a minimum in d coordinates, or ``None``.

    At a minimum λ ≤ d/2 (d/2 at a regular point), and the localized, tempered posterior only lowers it.  An
    estimate above :math:`(1 + s)\,d/2` (s = :data:`HALF_DIMS_SLACK`) by more than 2 s.e. measures something else:
    w* off a minimum, a loss that jumps or saturates, or a step so large that the chains sample its own
    bias (helper 34: a model detaching part of its forward on separable data read λ̂ 92 ± 14 with d = 98).  At a
    regular point SGLD's own bias, (d/2)/(1 − εκ/4), is what usually lifts λ̂ above d/2, so the step is named
    first."""
    if not (dims and dims > 0 and llc == llc and sem == sem):
        return None
    bound = (1 + HALF_DIMS_SLACK) * dims / 2
    if llc - 2 * sem <= bound:
        return None
    return (f"λ̂ = {llc:.4g} ± {sem:.2g} exceeds d/2 = {dims / 2:g}, the largest λ of a minimum in {dims:g} coordinates: "
            "what the chains measured is not the geometry of a minimum. Usual causes: the step is too large (SGLD's "
            "bias at a regular point is (d/2)/(1 − εκ/4): a smaller step_size, or leave it to the adaptation), w* "
            "is not a minimum (train it further), or the loss jumps or saturates where the chains step (see the "
            "other findings)")


def slope_finding(value: float, value_sem: float, llc: float, sem: float) -> str | None:
    r"""The finding that w* is not a minimum of the loss because the chains slide down its slope, or ``None``.

    ``value`` is :math:`s = n\beta\,\mathbb E[\nabla L(w^*)\cdot(w - w^*)]`, the first-order part of
    λ̂ :math:`= n\beta\,\mathbb E[L(w) - L(w^*)]`: zero at a critical point.  Where the loss is
    quadratic around w*, :math:`L = L^* + g^\top\Delta + \tfrac12\Delta^\top H\Delta`, the localized
    posterior's mean moves to :math:`-n\beta A^{-1}g`, :math:`A = n\beta H + \gamma I`, so
    :math:`s = -(n\beta)^2 g^\top A^{-1}g` and λ̂ is lower than at a critical point with the same
    curvature by between :math:`|s|/2` (where the curvature holds the chains) and :math:`|s|`
    (where only γ does).  A finding when :math:`s` is resolved (beyond 3 of its standard errors) and
    :math:`|s|/2` exceeds both twice λ̂'s standard error and :data:`SLOPE_FRACTION` of λ̂.  (Lau et al.
    2023, "The local learning coefficient", take w* to be a local minimum: λ̂ at a point on a slope
    measures how far the chains slide, not the geometry there.)"""
    if not (value == value and llc == llc and value_sem == value_sem):
        return None
    if abs(value) <= 3 * value_sem or 0.5 * abs(value) <= max(2 * sem, SLOPE_FRACTION * abs(llc)):
        return None
    return (f"w* is not a minimum of the loss: nβ·E[∇L(w*)·(w − w*)] = {value:.3g} ± {value_sem:.2g} of λ̂ = {llc:.4g} "
            f"is owed to the slope at w* (0 at a critical point): the chains slide {'down' if value < 0 else 'up'}hill and λ̂ "
            f"is {'lower' if value < 0 else 'higher'} than the geometry at a minimum gives, by about {0.5 * abs(value):.3g} to {abs(value):.3g}; train w* further, to a "
            "smaller gradient norm (slt.training.full_batch_loss_and_grad_norm), before measuring its LLC")


def _halving_record(tr: Tensor, halved: Tensor | None) -> dict[str, float] | None:
    """``{"llc_at_half_step", "llc", "z"}`` of :func:`_halving_gap` (``None`` when not computed)."""
    gap = None if halved is None or tr.shape[0] == 0 else _halving_gap(tr, halved)
    return None if gap is None else {"llc_at_half_step": gap[0], "llc": gap[1], "z": gap[2]}


def _halving_gap(tr: Tensor, halved: Tensor) -> tuple[float, float, float] | None:
    """``(mean halved estimate, mean λ̂, z)`` over the chains with a halved estimate, z the mean
    per-chain shortfall (λ̂ − halved) over its standard error across chains; ``None`` under 3 chains."""
    ok = ~halved.isnan()
    if int(ok.sum()) < 3:
        return None
    full = tr[ok].double().mean(1)
    half = halved[ok].double()
    return float(half.mean()), float(full.mean()), _paired_z(full - half)


def _diffusing(drift: tuple[float, float, float] | None, diffusion: Tensor | None, times: Tensor | None, T: int,
               mean: float) -> str | None:
    """The ``"diffusing"`` finding of :func:`equilibrium_checks`, or ``None``: the chains' spread is at
    least :data:`FREE_DIFFUSION` of a free walk's and λ̂ grew from the first half of the draws to the
    second by more than half of the growth λ̂ ∝ t predicts (the midpoint between a settled λ̂ and one
    made only of directions still diffusing, each adding ½κεt; the halves as :func:`_drift`'s)."""
    if drift is None or diffusion is None or times is None or diffusion.numel() == 0:
        return None
    f = float(diffusion.double().nanmean())
    if not f >= FREE_DIFFUSION:
        return None
    first, second, _ = drift
    h = T // 2
    t1, t2 = float(times[:h].double().mean()), float(times[T - h:].double().mean())
    if not t1 > 0:
        return None
    predicted = max(first, 0.0) * (t2 / t1 - 1.0)  # λ̂ ∝ t from the first half's mean
    growth = second - first
    if not (growth > 0.5 * predicted and growth > CHANGE_FRACTION * max(abs(mean), 1e-12)):
        return None
    return (f"chains still diffuse freely: their spread ‖w − w*‖² is {f:.2f} of a free random walk's (d·ε·t), so the "
            f"potential has not held them in most directions within the run, and λ̂ grows with the run's time "
            f"({first:.4g} in the first half of the draws, {second:.4g} in the second"
            + (f"; λ̂ ∝ t predicts {first + predicted:.4g}" if first > 0 else "")
            + "): λ̂ counts only the directions that relaxed and scales with step_size × steps; raise step_size "
            "(an automatic one is set by the sharpest direction), num_burnin, or the localization "
            "(γ·ε·steps ≳ 1 holds every direction)")


def _paired_z(d: Tensor) -> float:
    """z of the mean of per-chain differences ``d`` (C,) over its standard error across chains (chains
    are independent); ±inf for a nonzero mean with no spread, 0 for none."""
    se = float(d.std() / math.sqrt(d.numel()))
    m = float(d.mean())
    return m / se if se > 0 else (0.0 if m == 0 else math.copysign(math.inf, m))


def relaxation_hint(step_size: Any, localization: Any, config: Mapping[str, Any] | None) -> str:
    r"""What the steps of a run whose λ̂ is still rising should have been: under the localized potential
    a direction the loss leaves flat is held only by γ, and SGLD relaxes it at a rate εγ per step
    (:math:`w \leftarrow w - \tfrac{\epsilon}{2}\gamma w + \sqrt{\epsilon}\xi` has variance
    :math:`(1 - e^{-\epsilon\gamma t})/\gamma` after t steps), so the draws are settled only after
    about :data:`RELAXATION_TIMES` times :math:`\tau = 1/(\epsilon\gamma)` steps; a preconditioned
    sampler moves such a direction ``config["relaxation_gain"]`` G times faster (RMSProp-SGLD: 1/a;
    SGHMC at the critical friction α: 1/α), :math:`\tau = 1/(\epsilon G\gamma)`.  Empty unless ε, γ and
    the run's steps are known and the run had fewer than that."""
    try:
        eps, gamma = float(step_size), float(localization)
        cfg = dict(config or {})
        steps = int(cfg["num_burnin"]) + int(cfg["num_draws"]) * int(cfg.get("num_steps_bw_draws", 1))
        gain = float(cfg.get("relaxation_gain") or 1.0)
    except (TypeError, ValueError, KeyError):
        return ""
    if not (eps > 0 and gamma > 0 and gain > 0):  # NaN fails too
        return ""
    tau, need = 1.0 / (eps * gain * gamma), relaxation_steps(eps, gamma, gain)
    if steps >= need:
        return ""
    rate = "1/(εγ)" if gain == 1.0 else f"1/(ε·G·γ) with G = {gain:g} (the sampler's step factor in a flat direction)"
    # an adapted ε depends on the adaptation's length, which a given num_burnin sets (4/5 of it): measured on an
    # MLP at n = 60000, γ = 1000, the 50-step adaptation gave 1.83e-7 and the hint's num_burnin (27500) adapted
    # for 22000 steps to 4.45e-8, at which that burn-in covered a quarter of what it should
    pin = (f" with step_size={eps:.3g} (a num_burnin alone also lengthens the step-size adaptation, 4/5 of it, "
           "whose ε can come out smaller and need longer still)") if cfg.get("step_size_rule") == "adapt" else ""
    return (f" (at ε = {eps:.3g} and γ = {gamma:g} a direction only the localization holds relaxes over "
            f"{rate} = {tau:.0f} steps and needs about {RELAXATION_TIMES} of them: this run had {steps} steps; "
            f"num_burnin ≈ {need}{pin} covers it)")


def _drift(tr: Tensor) -> tuple[float, float, float] | None:
    """Trend of λ̂ through the draws: ``(first-half mean, second-half mean, z)`` with z the mean
    per-chain difference (second − first) over its standard error across chains (chains are
    independent); ``None`` for fewer than 8 draws.  |z| beyond Student's t at the two-sided level
    of a normal 3σ (df = C − 1) with a change above 2% of λ̂ flags chains that are still relaxing."""
    T = tr.shape[1]
    if T < 8:
        return None
    h = T // 2
    a, b = tr[:, :h].double().mean(1), tr[:, T - h:].double().mean(1)
    return float(a.mean()), float(b.mean()), _paired_z(b - a)


def _flat_results(results: Any) -> list[LLCResult]:
    """The :class:`LLCResult` leaves of an :func:`slt.estimate_llc` return value, in its order."""
    if isinstance(results, LLCResult):
        return [results]
    if isinstance(results, dict):
        return [r for v in results.values() for r in _flat_results(v)]
    if isinstance(results, (list, tuple)):
        return [r for v in results for r in _flat_results(v)]
    raise TypeError(f"results_frame takes what slt.estimate_llc returns (an LLCResult, or lists and mappings of "
                    f"them); got {type(results).__name__}")


def results_frame(results: Any):
    """One row per result of an :func:`slt.estimate_llc` call — a result, a list over checkpoints (an LLC
    curve), mappings over restrictions or distributions, nested — as a pandas DataFrame.

    Columns: the result's labels where the call had them (``checkpoint``, ``checkpoint_file``,
    ``restriction``, ``data``), then ``llc_mean``, ``llc_sem``, ``llc_std``, ``converged``, ``reasons`` (the
    failed checks, joined by "; "), ``rhat``, ``ess``, ``mala_acceptance``, ``frac_below_init``,
    ``init_loss`` (:math:`L_n(w^*)`), ``step_size``, ``nbeta``, ``localization``, ``sampler``,
    ``num_chains``, ``num_draws`` and ``seconds``.  Per-draw traces are :meth:`LLCResult.to_frame`'s.
    """
    import pandas as pd

    rows = []
    for r in _flat_results(results):
        c, d = r.config, r.diagnostics
        row: dict[str, Any] = {k: c[k] for k in ("checkpoint", "checkpoint_file", "restriction", "data")
                               if c.get(k) is not None}
        row.update(llc_mean=r.llc_mean, llc_sem=r.llc_sem, llc_std=r.llc_std, converged=r.converged,
                   reasons="; ".join(r.convergence_reasons), rhat=d.get("rhat"), ess=d.get("ess"),
                   mala_acceptance=d.get("mala_acceptance"), frac_below_init=d.get("frac_below_init"),
                   init_loss=r.init_loss, step_size=r.step_size, nbeta=r.nbeta, localization=r.localization,
                   sampler=r.sampler, num_chains=r.num_chains, num_draws=r.num_draws, seconds=d.get("seconds"))
        rows.append(row)
    frame = pd.DataFrame(rows)
    labels = [k for k in ("checkpoint", "checkpoint_file", "restriction", "data") if k in frame]
    return frame[labels + [k for k in frame.columns if k not in labels]]
