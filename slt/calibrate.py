"""Step-size calibration: sweep ε × nβ (or × γ) and find the largest stable ε."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from .engine import estimate_llc

__all__ = ["calibrate", "CalibrationResult"]


@dataclass
class CalibrationResult:
    """``frame``: one row per grid point (step_size, the other axis, llc_mean,
    llc_sem, mala_acceptance, num_divergent, stable); ``best_step_size``: the
    largest ε that is stable for every value of the other axis (``None`` if none)."""

    frame: Any
    best_step_size: float | None
    other_name: str

    def plot(self, ax: Any = None):
        from .plotting import plot_calibration

        return plot_calibration(self, ax)


def calibrate(
    model: Any,
    data: Any,
    loss_fn: Any = None,
    *,
    step_sizes: Sequence[float],
    nbetas: Sequence[float] | None = None,
    localizations: Sequence[float] | None = None,
    min_acceptance: float = 0.9,
    num_draws: int = 200,
    num_chains: int = 4,
    **kwargs: Any,
) -> CalibrationResult:
    r"""Run short chains over a grid of step sizes × nβ (or × localization γ).

    A setting is *stable* when no chain diverged and the mean MALA acceptance
    is at least ``min_acceptance``.  The recommended step size is the largest ε
    stable for every value of the other axis; check in the plot that λ̂ has
    flattened there (SGLD's bias grows roughly linearly in ε).

    Remaining keyword arguments go to :func:`slt.estimate_llc`.
    """
    import pandas as pd

    if not step_sizes:
        raise ValueError("step_sizes is empty")
    if nbetas is not None and localizations is not None:
        raise ValueError("sweep either nbetas or localizations, not both")
    if nbetas is not None:
        other_name, others = "nbeta", list(nbetas)
    elif localizations is not None:
        other_name, others = "localization", list(localizations)
    else:
        other_name, others = "nbeta", [kwargs.pop("nbeta", None)]
    rows = []
    for val in others:
        for eps in sorted(step_sizes):
            kw = {"raise_on_divergence": False, **kwargs}  # a diverging grid point is a result here
            kw[other_name] = val
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                res = estimate_llc(
                    model, data, loss_fn, step_size=float(eps), num_draws=num_draws,
                    num_chains=num_chains, progress=False, **kw,
                )
            ndiv = len(res.divergent_chains)
            acc = res.diagnostics.get("mala_acceptance", float("nan"))
            stable = ndiv == 0 and (acc != acc or acc >= min_acceptance) and res.llc_mean == res.llc_mean
            rows.append({
                "step_size": float(eps), other_name: res.nbeta if other_name == "nbeta" else res.localization,
                "llc_mean": res.llc_mean, "llc_sem": res.llc_sem, "mala_acceptance": acc,
                "num_divergent": ndiv, "stable": bool(stable),
            })
    frame = pd.DataFrame(rows)
    ok = frame.groupby("step_size")["stable"].all().sort_index()
    # the largest ε such that it and every smaller ε are stable
    run = ok.cummin()
    best = float(run[run].index.max()) if run.any() else None
    return CalibrationResult(frame, best, other_name)
