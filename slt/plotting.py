"""Plots of LLC runs: per-draw nβΔL traces with the running λ̂, and calibration grids."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .calibrate import CalibrationResult
    from .result import LLCResult

__all__ = ["plot_trace", "plot_calibration", "plot_llc_curve"]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg") and not _has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def plot_trace(
    result: "LLCResult",
    ax: Any = None,
    *,
    include_burnin: bool = True,
    title: str | None = None,
    max_chains: int = 4,
    max_points: int = 400,
):
    r"""What the estimate and its diagnostics measure, per draw: :math:`n\beta\,\Delta L`.

    Draws ``result.llc_trace``, the control-variate-corrected
    :math:`n\beta\,(L_B(w_t) - L_B(w^*))` (both losses on the same minibatch; the
    full-batch :math:`n\beta\,(L_n(w_t) - L_n(w^*))` for NUTS), whose mean is
    :math:`\hat\lambda` and whose sign is the "draws below :math:`L(w^*)`" diagnostic:

    * the draws of ``max_chains`` chains (thinned to at most ``max_points`` per chain,
      one colour each; divergent chains dashed), 0 (= :math:`L(w^*)`) marked;
    * each shown chain's running mean (bold) and the running :math:`\hat\lambda` over all
      valid chains (black), ending at ``result.llc_mean`` (± s.e. at the right end);
    * the burn-in (shaded, when recorded and ``include_burnin``): block means (50 blocks)
      of :math:`n\beta\,(L_B(w_t) - L_n(w^*))` of the same chains, uncorrected (the
      burn-in keeps no per-batch :math:`L_B(w^*)`), so whether the chains had settled shows.

    The legend is placed outside the axes, to the right.  Returns the matplotlib Figure.
    """
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(8.5, 4))
    else:
        fig = ax.figure
    tr = result.llc_trace.double().numpy()  # (C, T)
    C, T = tr.shape
    nbeta = float(result.nbeta)
    burn = result.burnin_loss_trace if include_burnin else None
    nb = 0 if burn is None else int(burn.shape[1])
    thin = int(result.config.get("num_steps_bw_draws", 1) or 1)
    div = set(result.divergent_chains)
    x = nb + np.arange(T) * thin
    shown = list(range(min(C, max(1, int(max_chains)))))
    every = max(1, -(-T // max(1, int(max_points))))  # thin the drawn points, not the means
    for c in shown:
        style = "--" if c in div else "-"
        lab = f"chain {c}" + (" (divergent)" if c in div else "")
        pts = ax.plot(x[::every], tr[c, ::every], style, lw=0.5, alpha=0.35)[0]
        col = pts.get_color()
        with np.errstate(invalid="ignore", divide="ignore"):
            run_c = np.nancumsum(tr[c]) / np.cumsum(np.isfinite(tr[c]))
        ax.plot(x, run_c, style, lw=1.6, color=col, label=f"{lab}: running mean")
        if nb:  # block means: the uncorrected minibatch noise would swamp the panel
            yb = nbeta * (burn[c].double().numpy() - float(result.init_loss))
            k = max(1, nb // 50)
            m_b = nb // k
            xb = np.arange(m_b) * k + (k - 1) / 2
            ax.plot(xb, yb[: m_b * k].reshape(m_b, k).mean(1), style, lw=1.0, alpha=0.6, color=col)
    valid = [c for c in range(C) if c not in div]
    if valid:
        with np.errstate(invalid="ignore", divide="ignore"):
            run = np.nancumsum(np.nanmean(tr[valid], 0)) / np.arange(1, T + 1)
        ax.plot(x, run, color="k", lw=2.0, label=rf"running $\hat\lambda$ ({len(valid)} chains)")
    m, se = float(result.llc_mean), float(result.llc_sem)
    if np.isfinite(m) and T:
        se = se if np.isfinite(se) else 0.0
        x_end = x[-1] if T else nb
        ax.errorbar([x_end], [m], yerr=[se], fmt="o", color="k", ms=4, capsize=3,
                    label=rf"$\hat\lambda$ = {m:.3g} ± {se:.2g}")
    ax.axhline(0.0, color="0.3", lw=0.9, ls=":", label=r"0: $L(w^*)$ (draws below it are < 0)")
    if nb:
        ax.axvspan(0, nb, color="0.92", zorder=0, label="burn-in (block means, uncorrected)")
    if len(shown) < C:
        ax.plot([], [], " ", label=f"({len(shown)} of {C} chains drawn)")
    ax.set_xlabel("SGLD step" if result.sampler != "nuts" else "iteration")
    ax.set_ylabel(r"$n\beta\,(L_B(w_t) - L_B(w^*))$ per draw")
    frac = result.diagnostics.get("frac_below_init")
    sub = f"; {frac:.1%} of draws below L(w*)" if isinstance(frac, float) and np.isfinite(frac) else ""
    ax.set_title(title or f"LLC = {m:.3g} ± {float(result.llc_sem):.2g} ({result.sampler}){sub}", fontsize=9)
    # a robust y-range: the bulk of the draws, the running means and 0 (single outliers would flatten it)
    finite = tr[shown][np.isfinite(tr[shown])]
    if finite.size:
        lo, hi = np.percentile(finite, [0.5, 99.5])
        lo, hi = min(lo, 0.0), max(hi, m if np.isfinite(m) else hi)
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    return fig


def plot_llc_curve(results: Any, x: Any = None, ax: Any = None, *, title: str | None = None):
    r"""An LLC-over-training curve: :math:`\hat\lambda` ± s.e. of each checkpoint of an
    :func:`slt.estimate_llc` call over checkpoints, one line per restriction and distribution where the
    call had them (:func:`slt.result.results_frame`).  A result that did not converge is drawn hollow (its
    reasons are in ``result.convergence_reasons``).

    ``x``: the training step of each checkpoint (a sequence, one per checkpoint); by default the last
    integer in each checkpoint file's name (``ckpt/step_300.pt``, ``out/checkpoint-500``) when every file
    has one, else the checkpoint's index.  Returns the matplotlib Figure.
    """
    from .result import results_frame

    frame = results_frame(results)
    if "checkpoint" not in frame:
        frame["checkpoint"] = 0
    K = int(frame["checkpoint"].max()) + 1
    xlabel = "checkpoint"
    if x is not None:
        steps = np.asarray(list(x), dtype=float)
        if steps.shape != (K,):
            raise ValueError(f"x gives {steps.size} values for {K} checkpoints")
        xlabel = "training step"
    else:
        files = frame.groupby("checkpoint")["checkpoint_file"].first() if "checkpoint_file" in frame else None
        found = steps_from_names(list(files)) if files is not None and len(files) == K else None
        if found is not None:
            steps, xlabel = np.asarray(found, dtype=float), "training step (from the checkpoint files' names)"
        else:
            steps = np.arange(K, dtype=float)
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    else:
        fig = ax.figure
    keys = [k for k in ("restriction", "data") if k in frame]
    groups = frame.groupby(keys, sort=False) if keys else [((), frame)]
    for key, part in groups:
        part = part.sort_values("checkpoint")
        xs = steps[part["checkpoint"].to_numpy(dtype=int)]
        order = np.argsort(xs, kind="stable")  # joined along x: files given out of step order drew a zigzag
        part, xs = part.iloc[order], xs[order]
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{k} {v}" for k, v in zip(keys, key)) or None
        line = ax.errorbar(xs, part["llc_mean"], yerr=part["llc_sem"], fmt="-", lw=1.3, capsize=2, label=label)
        color = line.lines[0].get_color()
        ok = part["converged"].to_numpy(dtype=bool)
        ax.plot(xs[ok], part["llc_mean"].to_numpy()[ok], "o", color=color, ms=5)
        ax.plot(xs[~ok], part["llc_mean"].to_numpy()[~ok], "o", mfc="none", color=color, ms=5)
    if not frame["converged"].all():
        ax.plot([], [], "o", mfc="none", color="0.3", label="not converged (see convergence_reasons)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"$\hat\lambda$ (± s.e.)")
    ax.set_title(title or f"LLC over {K} checkpoint{'s' if K != 1 else ''}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def steps_from_names(paths: list[Any]) -> list[int] | None:
    """The last integer in each checkpoint's file or directory name (``ckpt/step_300.pt`` -> 300,
    ``out/checkpoint-500`` -> 500; the whole path when the name has none), or ``None`` unless every
    path has one."""
    import re
    from pathlib import Path

    found = [re.findall(r"\d+", Path(str(p)).name) or re.findall(r"\d+", str(p)) if p is not None else []
             for p in paths]
    return [int(f[-1]) for f in found] if found and all(found) else None


def plot_calibration(cal: "CalibrationResult", ax: Any = None):
    """λ̂ (± s.e.) against step size, one line per value of the second grid axis;
    unstable settings (divergent, low acceptance, or λ̂ off the next smaller ε) are marked with an x."""
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
    ax.set_title("LLC calibration (x: divergent, low MALA acceptance, or λ̂ off the next smaller ε)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
