"""Step-size calibration: sweep ε × nβ (or × γ) and find the largest stable ε."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from ._runtime import autograd_allowed, user_stacklevel
from .engine import estimate_llc
from .result import LLCResult

#: below this many chains per grid point :func:`calibrate` warns that its stability test has next to no power
#: (Student's t at a normal 3σ: 236 standard errors with 2 chains, 19 with 3, 9.2 with 4)
FEW_CHAINS = 4

__all__ = ["calibrate", "CalibrationResult"]


@dataclass
class CalibrationResult:
    """``frame``: one row per grid point (step_size, the other axis, localization, llc_mean, llc_sem,
    mala_acceptance, rhat, num_divergent, converged, z_smaller, stable); ``best_step_size``: the
    largest ε that is stable for every value of the other axis, every smaller ε stable too
    (``None`` if none)."""

    frame: Any
    best_step_size: float | None
    other_name: str

    def plot(self, ax: Any = None):
        from .plotting import plot_calibration

        return plot_calibration(self, ax)


#: the default grid of :func:`calibrate`, in units of the automatic step size
AUTO_GRID = (0.125, 0.25, 0.5, 1.0, 2.0)


@autograd_allowed
def calibrate(
    model: Any,
    data: Any,
    loss_fn: Any = None,
    *,
    step_sizes: Sequence[float] | None = None,
    nbetas: Sequence[float] | None = None,
    localizations: Sequence[float] | None = None,
    min_acceptance: float = 0.9,
    num_draws: int = 200,
    num_chains: int = 4,
    **kwargs: Any,
) -> CalibrationResult:
    r"""Run short chains over a grid of step sizes × nβ (or × localization γ).

    One of ``nbetas`` and ``localizations`` is swept; the other is fixed with ``nbeta=`` or
    ``localization=`` (a one-value list beside the swept axis is read as that fixed value).

    A grid point is *stable* when no chain diverged, the mean MALA acceptance is at least
    ``min_acceptance``, and λ̂ agrees with λ̂ at the next smaller step size of the grid (same nβ
    and γ): their difference is within 2% of λ̂ or within Student's t at a normal 3σ of its
    standard error (:func:`slt.diagnostics.changed`, the test :attr:`slt.LLCResult.converged` applies
    to ε/2 within a run).  SGLD's
    bias grows about linearly in ε, so the largest stable ε is where λ̂ has flattened;
    ``z_smaller`` is that difference over its standard error.  The recommended step size is the
    largest ε that, with every smaller ε of the grid, is stable for every value of the other axis.

    With the automatic localization each grid point may settle at its own γ (the ``localization``
    column); λ̂ at different γ are not compared (``z_smaller`` is NaN there, with a warning):
    pass ``localization=`` for a grid on one potential.  Every grid point runs the same steps
    (``extend_draws=False`` unless given).  Remaining keyword arguments go to
    :func:`slt.estimate_llc` (one checkpoint, no restriction or distribution mapping).

    ``step_sizes=None`` (the default) brackets the step the defaults would use: one run with the
    automatic step size (at the first value of the other axis) gives ε̂, and the grid is
    ε̂ · (1/8, 1/4, 1/2, 1, 2) — so the result says whether the default step sits on λ̂'s plateau
    and how far below the instability it is (:attr:`CalibrationResult.frame` records ε̂ in
    ``auto_step_size``).
    """
    import pandas as pd

    from .diagnostics import CHANGE_SIGMAS, changed, t_threshold

    if step_sizes is not None and not step_sizes:
        raise ValueError("step_sizes is empty")
    nbetas = None if nbetas is None else list(nbetas)
    localizations = None if localizations is None else list(localizations)
    if nbetas is not None and localizations is not None:  # a one-value axis is that value, fixed
        if len(localizations) == 1 and "localization" not in kwargs:
            kwargs["localization"], localizations = localizations[0], None
        elif len(nbetas) == 1 and "nbeta" not in kwargs:
            kwargs["nbeta"], nbetas = nbetas[0], None
        else:
            raise ValueError(f"sweep either nbetas or localizations, not both (got {len(nbetas)} and "
                             f"{len(localizations)} values): fix the other with nbeta=... or localization=...")
    for axis, values, fixed in (("nbetas", nbetas, "nbeta"), ("localizations", localizations, "localization")):
        if values is not None and fixed in kwargs:
            raise ValueError(f"{axis} sweeps {fixed}, which was also given ({fixed}={kwargs[fixed]!r}): pass one")
    if nbetas is not None:
        other_name, others = "nbeta", list(nbetas)
    elif localizations is not None:
        other_name, others = "localization", list(localizations)
    else:
        other_name, others = "nbeta", [kwargs.pop("nbeta", None)]
    # a diverging grid point is a result here; every grid point runs the same steps (no extension of the draws)
    kw = {"raise_on_divergence": False, "progress": False, "extend_draws": False, **kwargs}
    auto = None
    if step_sizes is None:  # bracket the automatic step: one run that adapts it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            first = estimate_llc(model, data, loss_fn, **{**kw, other_name: others[0]}, num_draws=num_draws,
                                 num_chains=num_chains)
        if not isinstance(first, LLCResult):
            raise ValueError("calibrate runs one checkpoint on one dataset without restrictions: pass one model "
                             f"and no restrict_to mapping (estimate_llc returned a {type(first).__name__})")
        auto = float(first.config["step_size"])
        step_sizes = [auto * f for f in AUTO_GRID]
    rows = []
    for val in others:
        for eps in sorted(step_sizes):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                res = estimate_llc(model, data, loss_fn, **{**kw, other_name: val}, step_size=float(eps),
                                   num_draws=num_draws, num_chains=num_chains)
            if not isinstance(res, LLCResult):
                raise ValueError("calibrate runs one checkpoint on one dataset without restrictions: pass one model "
                                 f"and no restrict_to mapping (estimate_llc returned a {type(res).__name__})")
            rows.append({
                "step_size": float(eps), other_name: res.nbeta if other_name == "nbeta" else res.localization,
                "localization": res.localization, "llc_mean": res.llc_mean, "llc_sem": res.llc_sem,
                "mala_acceptance": res.diagnostics.get("mala_acceptance", float("nan")),
                "rhat": res.diagnostics.get("rhat", float("nan")), "num_divergent": len(res.divergent_chains),
                "converged": bool(res.converged), "num_chains": len(res.llc_per_chain),
            })
    frame = pd.DataFrame(rows)
    if auto is not None:
        frame["auto_step_size"] = auto
    frame["z_smaller"] = float("nan")
    frame["differs"] = False
    mixed = False
    for _, grp in frame.groupby(other_name, sort=False):
        idx = list(grp.sort_values("step_size").index)
        for lo, hi in zip(idx, idx[1:]):
            a, b = frame.loc[lo], frame.loc[hi]
            if a["localization"] != b["localization"]:
                mixed = True
                continue
            se = (a["llc_sem"] ** 2 + b["llc_sem"] ** 2) ** 0.5
            diff = abs(b["llc_mean"] - a["llc_mean"])
            z = diff / se if se > 0 else (0.0 if diff == 0 else float("inf"))
            frame.loc[hi, "z_smaller"] = z
            frame.loc[hi, "differs"] = changed(diff, z, b["llc_mean"], int(b["num_chains"]))  # two-sided
    if mixed:
        warnings.warn("slt.calibrate: the automatic localization settled at different γ across step sizes, whose λ̂ "
                      "are not compared; pass localization= for a grid on one potential", RuntimeWarning,
                      stacklevel=user_stacklevel())
    fewest = int(frame["num_chains"].min()) if len(frame) else 0
    if 0 < fewest < FEW_CHAINS:
        thr = t_threshold(CHANGE_SIGMAS, max(fewest - 1, 1))
        warnings.warn(f"slt.calibrate: with {fewest} chains per grid point, λ̂ counts as changed between step sizes "
                      f"only beyond {thr:.0f} standard errors (Student's t with {fewest - 1} degrees of freedom at a "
                      f"normal {CHANGE_SIGMAS:g}σ), so 'stable' says little: use num_chains={FEW_CHAINS} or more",
                      RuntimeWarning, stacklevel=user_stacklevel())
    if len(frame) and not frame["converged"].astype(bool).any():
        warnings.warn("slt.calibrate: no grid point converged (see each run's convergence_reasons: R-hat, a rising "
                      "λ̂, ...), so 'stable' compares λ̂ of chains that had not settled (a tanh MLP's λ̂ rose "
                      "1.32 → 2.79 over the grid, every point 'stable'); raise num_draws or num_burnin",
                      RuntimeWarning, stacklevel=user_stacklevel())
    acc = frame["mala_acceptance"]
    frame["stable"] = ((frame["num_divergent"] == 0) & (acc.isna() | (acc >= min_acceptance))
                       & frame["llc_mean"].notna() & ~frame["differs"].astype(bool))
    frame = frame.drop(columns=["num_chains", "differs"])
    ok = frame.groupby("step_size")["stable"].all().sort_index()
    # the largest ε such that it and every smaller ε are stable
    run = ok.cummin()
    best = float(run[run].index.max()) if run.any() else None
    if best is not None and frame["converged"].astype(bool).any():  # (none converged: warned above)
        below = frame[frame["step_size"] <= best]
        loose = below[~below["converged"].astype(bool)]
        if len(loose):
            warnings.warn(f"slt.calibrate: best_step_size {best:.3g} was judged stable against {len(loose)} grid "
                          f"point(s) at or below it that had not converged (R-hat up to {loose['rhat'].max():.3g}; "
                          "smaller steps mix less in the same draws): their λ̂ carry large errors, so the comparison "
                          "has little power there; raise num_draws (or num_chains) and check those rows' converged "
                          "column", RuntimeWarning, stacklevel=user_stacklevel())
    return CalibrationResult(frame, best, other_name)
