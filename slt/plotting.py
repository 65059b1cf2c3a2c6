"""Plots of LLC runs: loss traces per chain and calibration grids."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .calibrate import CalibrationResult
    from .result import LLCResult

__all__ = ["plot_trace", "plot_calibration"]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg") and not _has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def plot_trace(result: "LLCResult", ax: Any = None, *, include_burnin: bool = True, title: str | None = None):
    """Loss trace of every chain with ``L(w*)`` marked.

    Divergent chains are drawn dashed; burn-in steps (if recorded) are shaded.
    Returns the matplotlib Figure.
    """
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    else:
        fig = ax.figure
    burn = result.burnin_loss_trace if include_burnin else None
    nb = 0 if burn is None else burn.shape[1]
    div = set(result.divergent_chains)
    thin = int(result.config.get("num_steps_bw_draws", 1))
    for c in range(result.num_chains):
        y = result.loss_trace[c].double().numpy()
        x = nb + np.arange(y.shape[0]) * thin
        style = "--" if c in div else "-"
        line = ax.plot(x, y, style, lw=0.7, alpha=0.8, label=f"chain {c}" + (" (divergent)" if c in div else ""))[0]
        if nb:
            ax.plot(np.arange(nb), burn[c].double().numpy(), style, lw=0.7, alpha=0.4, color=line.get_color())
    if nb:
        ax.axvspan(0, nb, color="0.9", zorder=0, label="burn-in")
    ax.axhline(result.init_loss, color="k", lw=1.2, label=r"$L(w^*)$")
    ax.set_xlabel("SGLD step")
    ax.set_ylabel(r"minibatch loss $L_B(w_t)$")
    ax.set_title(title or f"LLC = {result.llc_mean:.3g} ± {result.llc_sem:.2g} ({result.sampler})")
    if result.num_chains <= 10:
        ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    return fig


def plot_calibration(cal: "CalibrationResult", ax: Any = None):
    """λ̂ (± s.e.) against step size, one line per value of the second grid axis;
    divergent or low-acceptance settings are marked with an x."""
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    df = cal.frame
    other = cal.other_name
    for val, grp in df.groupby(other):
        grp = grp.sort_values("step_size")
        line = ax.errorbar(grp["step_size"], grp["llc_mean"], yerr=grp["llc_sem"], marker="o", ms=4,
                           capsize=2, label=f"{other}={val:.3g}")
        bad = grp[~grp["stable"]]
        ax.plot(bad["step_size"], bad["llc_mean"], "x", ms=9, color=line[0].get_color())
    if cal.best_step_size is not None:
        ax.axvline(cal.best_step_size, color="k", ls=":", label=f"largest stable ε = {cal.best_step_size:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("step size ε")
    ax.set_ylabel(r"$\hat\lambda$")
    ax.set_title("LLC calibration (x: divergent or MALA acceptance below threshold)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
