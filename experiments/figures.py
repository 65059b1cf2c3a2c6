r"""Figures of the toy-model experiments, made from the sweeps' result tables.

Every figure reads the run records of one or more sweeps under
``<results>/sweeps/<name>/`` (``summary.parquet`` when present, else the
run folders' ``result.json`` through :func:`experiments.records.collect`), keeps the
runs with ``status == "ok"`` and writes ``<out>/<figure>.png`` and ``.pdf``.
No number shown is typed into this script: measured values come from the
tables, closed forms from :mod:`slt.theory`.

=========  =======================================================  ==================================
figure     what                                                     sweeps read
=========  =======================================================  ==================================
kgon       λ̂ of the TMS k-gons vs the closed forms (5-gon, 5-gon⁺,   ``fig_kgon``
           6-gon)
geometry   columns of W in the plane per feature density (n = 5,     ``fig_elhage``
           m = 2, I_i = 0.9^i; Elhage et al. 2022)
dims       feature dimensionality D_i vs 1/(1 - S), plateaus marked ``fig_dims``
phase      Bayesian phase transition: posterior mass of 5-/6-gon   ``tms_posterior``
curve      λ̂ at training checkpoints over the loss curve            ``tms_curve``
symmetry   λ̂ vs h on symmetry paths, covariance slopes, Hessian-    ``expfam_symmetrize``,
           rank bounds                                              ``expfam_break``, ``tms_symmetry``
phase2     two features in one hidden dimension: phase diagram       ``fig_phase2``
           over relative importance and density
tegum      direct-sum decomposition of W with 3 hidden dimensions    ``fig_tegum``
refined    per-head weight-refined and data-refined LLCs over the   ``refined``
           training of a 2-layer attention-only transformer
=========  =======================================================  ==================================

Usage::

    python -m experiments.figures all
    python -m experiments.figures kgon geometry --results results --out results/figures

A figure whose sweep has no finished run is skipped with a message (``all``)
or is an error (when named explicitly).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import slt  # noqa: E402
from slt import geometry as geo  # noqa: E402
from experiments import records  # noqa: E402

__all__ = [
    "FIGURES",
    "load_sweep",
    "fig_kgon",
    "fig_geometry",
    "fig_dims",
    "fig_phase",
    "fig_curve",
    "fig_symmetry",
    "fig_phase2",
    "phase2_cells",
    "fig_tegum",
    "fig_refined",
    "predicted_crossing",
    "measured_crossing",
    "posterior_phase_table",
    "main",
]

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
#: one colour per critical point / family, shared by all figures
COLORS = {"5-gon": "tab:blue", "5-gon+": "tab:purple", "6-gon": "tab:orange", "polar": "tab:red",
          "fixed": "tab:gray", "tms": "tab:orange"}


class NoData(RuntimeError):
    """A sweep needed by a figure has no finished run."""


class MixedRuns(RuntimeError):
    """A sweep's finished runs were sampled with different settings: not a figure to skip quietly (``all`` fails)."""


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
def load_sweep(results: str | os.PathLike, name: str) -> pd.DataFrame:
    """The ``status == "ok"`` rows of sweep ``name`` under ``results/sweeps``.

    Reads ``summary.parquet`` (with a parquet engine installed) when it is at least as new as every
    ``result.json`` in the sweep and lists the same finished runs, else rebuilds the table from the run
    folders (:func:`experiments.records.collect` without writing).  The runs must share their sampler settings
    (:func:`_check_same_sampler`).

    Raises
    ------
    NoData
        If the sweep folder is missing or holds no finished run.
    MixedRuns
        If its finished runs differ in ``sampler.*``.
    """
    sweep = Path(results) / "sweeps" / name
    if not sweep.is_dir():
        raise NoData(f"no sweep folder {sweep} (run the sweep first; see the README's Figures section)")
    summ = sweep / "summary.parquet"
    done = list(sweep.glob(f"*/{records.RESULT_FILE}"))
    newest = max((p.stat().st_mtime for p in done), default=0.0)
    df = None
    if summ.exists() and summ.stat().st_mtime >= newest and records.parquet_engine() is not None:
        df = pd.read_parquet(summ)
        ok = set(df.loc[df["status"] == "ok", "run"].astype(str)) if "status" in df and "run" in df else None
        if ok != {p.parent.name for p in done}:  # a run folder deleted (or added) since: the table is stale
            df = None
    if df is None:
        df = records.collect(sweep, write=False)
    if "status" in df:
        df = df[df["status"] == "ok"]
    if not len(df):
        raise NoData(f"sweep {sweep} has no finished run")
    _check_same_sampler(df.reset_index(drop=True), sweep)
    return df.reset_index(drop=True)


def _check_same_sampler(df: pd.DataFrame, sweep: Path) -> None:
    """:class:`MixedRuns` when the finished runs of a sweep were sampled with different settings (a trial sweep at
    fewer draws, then the full one, into the same folder): a figure averages and compares its runs, and runs at
    other sampler settings are not replicates (the k-gon figure averaged a 150-draw run at a given step with three
    300-draw runs, counting seed 0 twice).  The runs may differ in what the sweep varies (seeds, points, data),
    not in ``sampler.*``."""
    cols = [c for c in df.columns if str(c).startswith("sampler.")]
    differ = {}
    def shown(v: Any) -> str:  # (an unset value reads None; pandas keeps NaN out of nunique, even as text)
        return "None" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)

    for c in cols:
        values = df[c].map(shown)
        if values.nunique() > 1:
            differ[c] = values
    if not differ:
        return
    key = pd.Series([" ".join(f"{c}={differ[c].iloc[i]}" for c in differ) for i in range(len(df))])
    groups = "; ".join(f"{k}: {', '.join(df['run'][key == k].astype(str).tolist()[:4])}"
                       + (f" and {int((key == k).sum()) - 4} more" if (key == k).sum() > 4 else "")
                       for k in key.value_counts().index)
    raise MixedRuns(f"the finished runs of {sweep} were sampled with different settings ({groups}): a figure averages "
                 "runs at one setting; move or delete the runs you do not want (or run trial sweeps under another "
                 "name, name=<trial>), then run the figure again")


def _list(v: Any) -> Any:
    """A list-valued cell (JSON text in the summary table) as a Python object."""
    if isinstance(v, str):
        return json.loads(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _col(df: pd.DataFrame, *names: str) -> pd.Series:
    for n in names:
        if n in df:
            return df[n]
    raise NoData(f"none of the columns {names} in the table (columns: {list(df.columns)[:20]} ...)")


#: each figure's file stem under the output folder (``<stem>.png`` and ``<stem>.pdf``)
STEMS: dict[str, str] = {"kgon": "kgon_llc", "geometry": "geometry", "dims": "feature_dimensionality",
                         "phase": "phase_transition", "curve": "llc_curve", "symmetry": "symmetry",
                         "phase2": "phase_diagram_2x1", "tegum": "tegum", "refined": "refined"}


def set_aside_stale(out: Path, name: str) -> list[Path]:
    """Rename an earlier drawing of figure ``name`` in ``out`` to ``<stem>.stale.<ext>`` (a figure refused now
    would otherwise leave the earlier one in place, read as current); returns the new paths."""
    moved = []
    for ext in ("png", "pdf"):
        p = out / f"{STEMS[name]}.{ext}"
        if p.exists():
            q = p.with_name(f"{STEMS[name]}.stale.{ext}")
            p.replace(q)
            moved.append(q)
    return moved


def _save(fig: Any, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "ModDate": None})
    plt.close(fig)
    return paths


def _point_name(W: Any, b: Any) -> str:
    c = geo.classify_point(torch.tensor(W, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), tol=0.05)
    return c["name"] or f"irregular-{c['k']}"


# ---------------------------------------------------------------------------
# figure 4: λ̂ of the k-gons vs closed forms
# ---------------------------------------------------------------------------
def fig_kgon(results: Path, out: Path) -> list[Path]:
    """λ̂ ± s.e. (chains) of every run of ``fig_kgon`` per critical point found, the seed mean
    ± s.e. (seeds), and the closed form :func:`slt.theory.tms_llc`."""
    df = load_sweep(results, "fig_kgon")
    df = df.assign(point=_col(df, "point").astype(str))
    known = [p for p in slt.theory.TMS_CRITICAL_POINTS if p in set(df["point"])]
    other = sorted(set(df["point"]) - set(known))
    order = known + other
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for i, p in enumerate(order):
        sub = df[df["point"] == p].sort_values("seed")
        x = i + np.linspace(-0.18, 0.18, len(sub)) if len(sub) > 1 else np.array([i - 0.1])
        col = COLORS.get(p, "tab:green")
        ax.errorbar(x, sub["llc_mean"], yerr=sub["llc_sem"], fmt="o", ms=4, color=col, alpha=0.55, capsize=2,
                    label="one run (± s.e. over chains)" if i == 0 else None)
        m = sub["llc_mean"].mean()
        se = sub["llc_mean"].std(ddof=1) / math.sqrt(len(sub)) if len(sub) > 1 else float(sub["llc_sem"].iloc[0])
        ax.errorbar([i + 0.32], [m], yerr=[se], fmt="D", ms=6, color=col, capsize=3, mec="k",
                    label="mean over seeds (± s.e.)" if i == 0 else None)
        if p in slt.theory.TMS_CRITICAL_POINTS:
            lam = slt.theory.tms_llc(p)
            ax.hlines(lam, i - 0.35, i + 0.45, colors="k", linestyles="--", lw=1.2,
                      label="closed form λ (Chen et al. 2023)" if i == 0 else None)
            ax.annotate(f"λ = {lam:g}", (i - 0.35, lam), xytext=(0, 3), textcoords="offset points", fontsize=8)
    ns = sorted(set(_col(df, "data.n").astype(int)))
    ax.set_xticks(range(len(order)), [p.replace("+", "⁺") for p in order])
    ax.set_xlim(-0.6, len(order) - 0.2)
    ax.set_xlabel("critical point found (classified from W, b)")
    ax.set_ylabel("estimated LLC λ̂")
    ax.set_title(f"TMS 6×2 critical points: λ̂ vs closed form (n = {', '.join(map(str, ns))}, "
                 f"{df['seed'].nunique()} seeds)")
    ax.legend(loc="lower right")
    return _save(fig, out, STEMS["kgon"])


# ---------------------------------------------------------------------------
# figure 1: superposition geometry per density
# ---------------------------------------------------------------------------
def _best_per(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """The lowest-loss run for each value of ``key``: lowest ``heldout_loss`` (loss on fresh samples,
    recorded by the TMS runs on Elhage data) where every run has one, else lowest ``train_loss``."""
    by = "heldout_loss" if "heldout_loss" in df and df["heldout_loss"].notna().all() else "train_loss"
    return df.sort_values(by).groupby(key, as_index=False).first().sort_values(key)


def fig_geometry(results: Path, out: Path) -> list[Path]:
    """The columns W_i of the best run (lowest training loss over seeds) per feature density,
    coloured by importance, with the k-gon / direct-sum name from :func:`slt.geometry.classify_point`."""
    df = load_sweep(results, "fig_elhage")
    df = df.assign(density=1.0 - _col(df, "data.sparsity").astype(float))
    best = _best_per(df, "density").sort_values("density", ascending=False)
    k = len(best)
    ncol = min(k, 5)
    nrow = math.ceil(k / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.0 * ncol, 2.25 * nrow + 0.4), squeeze=False)
    n_feat = int(best["model.n_features"].iloc[0])
    decay = float(best["importance_decay"].iloc[0])
    cmap = plt.get_cmap("viridis")
    lim = max(float(np.abs(np.asarray(_list(W))).max()) for W in best["W"]) * 1.15
    for ax, (_, r) in zip(axes.flat, best.iterrows()):
        W = np.asarray(_list(r["W"]), dtype=float)  # (m, n)
        b = np.asarray(_list(r["b"]), dtype=float)
        if W.shape[0] != 2:
            raise ValueError(f"geometry figure needs n_hidden = 2, got W of shape {W.shape}")
        for i in range(W.shape[1]):
            ax.plot([0, W[0, i]], [0, W[1, i]], "-", color=cmap(i / max(n_feat - 1, 1)), lw=1.8)
            ax.plot(W[0, i], W[1, i], "o", color=cmap(i / max(n_feat - 1, 1)), ms=3.5)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        ax.axhline(0, color="0.85", lw=0.6, zorder=0)
        ax.axvline(0, color="0.85", lw=0.6, zorder=0)
        ax.set_title(f"1−S = {r['density']:.3g}\n{_point_name(W, b)}", fontsize=8.5)
        for sp in ax.spines.values():
            sp.set_visible(False)
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n_feat - 1))
    cb = fig.colorbar(sm, ax=axes, shrink=0.7, pad=0.02, ticks=range(n_feat))
    cb.set_label(f"feature i (importance {decay:g}^i)")
    fig.suptitle(f"Superposition geometry: columns W_i ∈ R² of a {n_feat}-feature, 2-hidden TMS per feature density "
                 f"(lowest-loss of {df['seed'].nunique()} seeds; axes ±{lim:.2f})", fontsize=9.5)
    return _save(fig, out, STEMS["geometry"])


# ---------------------------------------------------------------------------
# figure 2: feature dimensionality vs 1/(1 - S)
# ---------------------------------------------------------------------------
#: fractional dimensions of the uniform polytopes Elhage et al. mark (value, structure)
PLATEAUS = [(1.0, "1 (dedicated)"), (3 / 4, "3/4 (tetrahedron)"), (2 / 3, "2/3 (triangle)"),
            (1 / 2, "1/2 (antipodal pair)"), (2 / 5, "2/5 (pentagon)"), (3 / 8, "3/8 (square antiprism)")]


#: columns shorter than this are drawn grey in the dims figure (weakly or not represented features)
WEAK_NORM = 0.5
#: orthogonality tolerance |cos| of the direct-sum decomposition that colours the strong features
#: (between the cross-summand cosines of about 0.05 at the 1/2 plateau and the 0.5 of a triangle)
DIMS_TEGUM_TOL = 0.2
#: summand label -> (legend text, colour) in the dims figure; other labels: "other summand"
SUMMAND_STYLE = {"1-gon": ("alone on its line (1-gon)", "tab:purple"),
                 "2-gon": ("antipodal pair (2-gon)", "tab:orange"),
                 "3-gon": ("triangle (3-gon)", "tab:green"),
                 "tetrahedron": ("tetrahedron", "tab:red"),
                 "5-gon": ("pentagon (5-gon)", "tab:brown"),
                 "square antiprism": ("square antiprism", "tab:pink")}
OTHER_SUMMAND = ("in a larger summand (k features in d dims)", "tab:blue")


def summand_labels(W: torch.Tensor, strong: np.ndarray, tol: float = DIMS_TEGUM_TOL) -> list[str | None]:
    """Per feature, the label of its summand in :func:`slt.geometry.direct_sum_decomposition` of the
    strong columns ``W[:, strong]`` (``None`` for weak features or features it calls dead)."""
    labels: list[str | None] = [None] * W.shape[1]
    idx = np.flatnonzero(strong)
    if len(idx) == 0:
        return labels
    dec = geo.direct_sum_decomposition(W[:, torch.as_tensor(idx)], tol=tol)
    for sm in dec.summands:
        for j in sm.features:
            labels[int(idx[j])] = sm.label
    return labels


def fig_dims(results: Path, out: Path) -> list[Path]:
    """D_i of every feature of every run (:func:`slt.geometry.feature_dimensionality` of the
    recorded W; grey where ‖W_i‖ < :data:`WEAK_NORM`) against 1/(1 - S), the model's m/‖W‖_F²,
    and the plateaus.  Strong features are coloured by the summand they belong to in the direct-sum
    decomposition of the strong columns (:func:`summand_labels`): antipodal pairs should sit at 1/2,
    triangles at 2/3, pentagons at 2/5."""
    df = load_sweep(results, "fig_dims")
    df = df.assign(x=1.0 / (1.0 - _col(df, "data.sparsity").astype(float)))
    df = _best_per(df, "x")
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    rng = np.random.default_rng(0)  # horizontal jitter only
    xs, md = [], []
    seen: set[str] = set()
    for _, r in df.iterrows():
        W = torch.tensor(_list(r["W"]), dtype=torch.float64)
        D = geo.feature_dimensionality(W).numpy()
        weak = W.norm(dim=0).numpy() < WEAK_NORM
        jit = r["x"] * np.exp(rng.uniform(-0.04, 0.04, size=D.shape))
        labels = summand_labels(W, ~weak)
        kinds = np.array([None if lab is None else SUMMAND_STYLE.get(lab, OTHER_SUMMAND)[0] for lab in labels],
                         dtype=object)
        for text, color in [*SUMMAND_STYLE.values(), OTHER_SUMMAND]:
            sel = ~weak & (kinds == text)
            if sel.any():
                ax.scatter(jit[sel], D[sel], s=9, color=color, alpha=0.6, lw=0,
                           label=f"D_i, strong feature: {text}" if text not in seen else None)
                seen.add(text)
        ax.scatter(jit[weak], D[weak], s=7, color="0.6", alpha=0.35, lw=0,
                   label=f"D_i of a weak feature, ‖W_i‖ < {WEAK_NORM:g}" if not xs else None)
        xs.append(r["x"])
        md.append(float(geo.model_dimensionality(W)))
    ax.plot(xs, md, "k-o", ms=3, lw=1.2, label="model: m / ‖W‖²_F (dimensions per feature)")
    for j, (v, lab) in enumerate(PLATEAUS):
        ax.axhline(v, color="tab:red", ls=":", lw=0.9)
        close = j > 0 and PLATEAUS[j - 1][0] - v < 0.05  # 2/5 and 3/8: move the lower label down
        ax.annotate(lab, (1.0, v), xycoords=("axes fraction", "data"), xytext=(3, -9 if close else -3),
                    textcoords="offset points", fontsize=7.5, color="tab:red")
    nf, nh = int(df["model.n_features"].iloc[0]), int(df["model.n_hidden"].iloc[0])
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.12)
    ax.set_xlabel("1 / (1 − S)  (inverse feature density)")
    ax.set_ylabel("dimensions per feature")
    online = "train.online" in df and bool(df["train.online"].fillna(False).astype(bool).all())
    how = (f"online Adam, {int(df['train.steps'].iloc[0])} steps × {int(df['train.batch_size'].iloc[0])} fresh samples"
           if online else f"n = {int(df['data.n'].iloc[0])} samples")
    ax.set_title(f"Feature dimensionality: {nf} features in {nh} dimensions, uniform importance,\n"
                 f"{how}, {len(df)} sparsities", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, ncol=2, frameon=False)
    return _save(fig, out, STEMS["dims"])


# ---------------------------------------------------------------------------
# figure 5: Bayesian phase transition
# ---------------------------------------------------------------------------
def predicted_crossing(a: str = "5-gon", b: str = "6-gon") -> float:
    """n solving n (L_b − L_a) + (λ_b − λ_a) log n = 0 with the closed-form losses and LLCs of
    :data:`slt.theory.TMS_CRITICAL_POINTS` (bisection on log n; n > e)."""
    pa, pb = slt.theory.TMS_CRITICAL_POINTS[a], slt.theory.TMS_CRITICAL_POINTS[b]
    dl, dlam = pb["loss"] - pa["loss"], pb["llc"] - pa["llc"]

    def f(u: float) -> float:  # u = log n
        return math.exp(u) * dl + dlam * u

    lo, hi = 1.0, 30.0
    if f(lo) * f(hi) > 0:
        raise ValueError(f"no crossing between {a} and {b}: ΔL = {dl}, Δλ = {dlam}")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(lo) * f(mid) > 0 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def _phase_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (n, seed) with both basins: F_k = n L_n(w*_k) + λ̂_k log n (measured) and
    F_k^th = n L_n(w*_k) + λ_k log n (closed-form λ), and the 6-gon posterior shares."""
    k = _col(df, "init.k").astype(int)
    df = df.assign(k=k, n=_col(df, "data.n").astype(int))
    lam = {5: slt.theory.tms_llc("5-gon"), 6: slt.theory.tms_llc("6-gon")}
    df = df.assign(F=df["n"] * df["train_loss"] + df["llc_mean"] * np.log(df["n"]),
                   F_th=df["n"] * df["train_loss"] + df["k"].map(lam) * np.log(df["n"]))
    p = df.pivot_table(index=["n", "seed"], columns="k", values=["F", "F_th"]).dropna()
    if not len(p):
        raise NoData("fig_phase has no (n, seed) with both the 5-gon and the 6-gon run")
    out = pd.DataFrame({
        "dF": p[("F", 6)] - p[("F", 5)],
        "dF_th": p[("F_th", 6)] - p[("F_th", 5)],
    }).reset_index()
    out["p6"] = 1.0 / (1.0 + np.exp(np.clip(out["dF"], -700, 700)))
    out["p6_th"] = 1.0 / (1.0 + np.exp(np.clip(out["dF_th"], -700, 700)))
    return out


#: sweeps drawn by the free-energy-proxy panels: the first one, then optional variants (other γ)
PHASE_SWEEPS = ("fig_phase", "fig_phase_g1")
#: the posterior-mass sweep (experiments/tms_posterior.py)
POSTERIOR_SWEEP = "tms_posterior"


def posterior_phase_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, rung) of the ``tms_posterior`` sweep: ``n`` (data size), ``seed``,
    ``rungs`` (ladder length), ``nbeta``, ``rung`` (0 = β = 1), fractions ``f4``/``f5``/``f6`` of
    draws with ≤ 4 / 5 / 6 live columns and their chain s.e. ``s5``/``s6``, and ``mixed``."""
    rows = []
    n_col, rung_col = _col(df, "n", "data.n"), _col(df, "rung_nbeta")
    prior = df["prior_std"] if "prior_std" in df else pd.Series([float("nan")] * len(df), index=df.index)
    for i in range(len(df)):
        r = df.iloc[i]
        nb = _list(rung_col.iloc[i])
        fr = {k: _list(r[f"rung_frac_k{k}"]) for k in range(1, 7) if f"rung_frac_k{k}" in r}
        se = {k: _list(r[f"rung_sem_k{k}"]) for k in (5, 6)}
        mixed = _list(r["rung_mixed"])
        for j, v in enumerate(nb):
            rows.append({"n": int(n_col.iloc[i]), "seed": int(r["seed"]), "prior_std": float(prior.iloc[i]),
                         "rungs": len(nb), "nbeta": float(v),
                         "rung": j, "f6": fr[6][j], "f5": fr[5][j],
                         "f4": sum(fr[k][j] for k in fr if k <= 4), "s6": se[6][j], "s5": se[5][j],
                         "mixed": bool(mixed[j])})
    if not rows:
        raise NoData(f"{POSTERIOR_SWEEP} has no rows")
    return pd.DataFrame(rows)


def measured_crossing(nbeta: np.ndarray, f5: np.ndarray, f6: np.ndarray) -> float:
    """nβ where f6 − f5 changes sign (linear interpolation in log nβ); NaN if it never does."""
    o = np.argsort(nbeta)
    x, d = np.log(np.asarray(nbeta, float)[o]), (np.asarray(f6, float) - np.asarray(f5, float))[o]
    for j in range(len(d) - 1):
        if d[j] < 0 < d[j + 1]:
            return float(np.exp(x[j] + (x[j + 1] - x[j]) * (-d[j]) / (d[j + 1] - d[j])))
    return float("nan")


def _posterior_panel(ax: Any, t: pd.DataFrame) -> str:
    """Fractions along the longest ladders (mean ± s.e. over seeds) and β = 1 points of every run,
    at the most common prior σ₀; ladders at other priors are drawn as thin lines (6-gon fraction)."""
    from matplotlib.lines import Line2D

    sig = t["prior_std"].fillna(-1.0)
    main_sig = sig.mode().iloc[0]
    others = t[sig != main_sig]
    t = t[sig == main_sig]
    nmax = t["n"].max()
    lad = t[(t["n"] == nmax) & (t["rungs"] == t[t["n"] == nmax]["rungs"].max())]
    g = lad.groupby("rung")
    nb = g["nbeta"].mean().to_numpy()
    seeds = lad["seed"].nunique()
    info = ""
    for col, scol, color, ls, lab in (("f6", "s6", COLORS["6-gon"], "-", "6 live columns (6-gon phase)"),
                                      ("f5", "s5", COLORS["5-gon"], "--", "5 live columns (5-gon, 5-gon⁺)"),
                                      ("f4", None, "tab:gray", ":", "≤ 4 live columns")):
        m = g[col].mean().to_numpy()
        if seeds > 1:
            se = (g[col].std(ddof=1) / np.sqrt(g[col].count())).to_numpy()
        else:
            se = g[scol].mean().to_numpy() if scol else np.zeros_like(m)
        ax.plot(nb, m, ls, color=color, lw=1.4, label=lab)
        ax.fill_between(nb, m - se, m + se, color=color, alpha=0.2, lw=0)
        mixed = g["mixed"].all().to_numpy()
        ax.scatter(nb[mixed], m[mixed], color=color, s=14, zorder=3)
        ax.scatter(nb[~mixed], m[~mixed], facecolors="white", edgecolors=color, s=18, zorder=3)
    for (sv, sd), o in others.groupby(["prior_std", "seed"]):
        o = o[o["rungs"] == o["rungs"].max()].sort_values("nbeta")
        c_o = measured_crossing(o["nbeta"].to_numpy(), o["f5"].to_numpy(), o["f6"].to_numpy())
        ax.plot(o["nbeta"], o["f6"], "-", color="tab:red", lw=0.9, alpha=0.8,
                label=f"6 live, σ₀ = {sv:g} (seed {sd}; crossing ≈ {c_o:.0f})")
    nc = measured_crossing(nb, g["f5"].mean().to_numpy(), g["f6"].mean().to_numpy())
    if math.isfinite(nc):
        ax.axvline(nc, color=COLORS["6-gon"], ls="-.", lw=1.0)
        info = f"measured crossing nβ ≈ {nc:.0f}"
    # β = 1: rung 0 of every run (the Bayesian posterior at sample size n)
    b1 = t[t["rung"] == 0]
    for col, scol, color, mk in (("f6", "s6", COLORS["6-gon"], "s"), ("f5", "s5", COLORS["5-gon"], "D")):
        ax.errorbar(b1["n"], b1[col], yerr=b1[scol], fmt=mk, color=color, mfc="none", ms=5, capsize=2, lw=0.8,
                    zorder=4)
    pc = predicted_crossing()
    ax.axvline(pc, color="k", ls=":", lw=1.2)
    ax.axvline(600, color="0.5", ls="--", lw=1.0)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="k", marker="s", mfc="none", ls="", label="β = 1 at sample size n (each run)"),
                Line2D([], [], color="k", marker="o", mfc="white", ls="", label="open: chains from the two starts disagree"),
                Line2D([], [], color="k", ls=":", label=f"n ΔL + Δλ log n = 0: n ≈ {pc:.0f}"),
                Line2D([], [], color="0.5", ls="--", label="Chen et al. 2023: n ≈ 600")]
    if info:
        handles.append(Line2D([], [], color=COLORS["6-gon"], ls="-.", label=info))
    ax.legend(handles=handles, fontsize=6.0, loc="upper left", framealpha=0.85)
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("nβ (ladder; data n = %d) · sample size n (β = 1 points)" % nmax)
    ax.set_ylabel("posterior mass (fraction of draws)")
    ax.set_title(f"Posterior mass of each phase, replica-exchange SGLD, prior N(0, σ₀² I), σ₀ = {main_sig:g}\n"
                 f"(mean ± s.e. over {seeds} dataset{'s' if seeds > 1 else ''}; filled: chains agree)", fontsize=8.5)
    return info


def fig_phase(results: Path, out: Path) -> list[Path]:
    """Figure 5: posterior mass of the 5-gon and 6-gon phases against nβ and n (the
    ``tms_posterior`` sweep, :func:`slt.sample_posterior`) and, when the ``fig_phase`` sweep exists,
    the free-energy-proxy panels of :func:`_proxy_panels`."""
    t = posterior_phase_table(load_sweep(results, POSTERIOR_SWEEP))
    try:
        tables = [(PHASE_SWEEPS[0], load_sweep(results, PHASE_SWEEPS[0]))]
    except NoData:
        tables = []
    ncols = 3 if tables else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.2))
    axes = np.atleast_1d(axes)
    _posterior_panel(axes[0], t)
    if tables:
        for name in PHASE_SWEEPS[1:]:
            try:
                tables.append((name, load_sweep(results, name)))
            except NoData:
                pass
        _proxy_panels(axes[1], axes[2], tables)
    fig.suptitle("Bayesian phase transition in the TMS (6 features, 2 hidden): 5-gon vs 6-gon", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, STEMS["phase"])


def _proxy_panels(a1: Any, a2: Any, tables: list[tuple[str, pd.DataFrame]]) -> None:
    """Posterior shares of the 6-gon and 5-gon basins, 1 / (1 + exp(±(F_6 − F_5))), per n (mean ±
    s.e. over seeds) with the measured λ̂ of every available sweep in :data:`PHASE_SWEEPS` (they
    differ in the localization γ) and with the closed-form λ; the crossing predicted by
    n ΔL + Δλ log n = 0 (:func:`predicted_crossing`); and λ̂ of both points against n."""
    from matplotlib.lines import Line2D

    palette = iter(["tab:orange", "tab:green", "tab:purple", "tab:olive"])
    handles = []

    def share(t: pd.DataFrame, col: str, color: str, mk: str) -> None:
        g = t.groupby("n")
        n = np.array(sorted(g.groups))
        m = g[col].mean().reindex(n)
        se = (g[col].std(ddof=1) / np.sqrt(g[col].count())).reindex(n).fillna(0)
        a1.errorbar(n, m, yerr=se, fmt=mk + "-", color=color, ms=4, capsize=2)
        a1.errorbar(n, 1 - m, yerr=se, fmt=mk + "--", color=color, ms=4, capsize=2, mfc="none")

    nseeds = []
    for i, (name, df) in enumerate(tables):
        t = _phase_table(df)
        nseeds.append(t["seed"].nunique())
        gcol = next((c for c in ("sampler.localization", "localization") if c in df), None)
        gam = sorted(set(df[gcol].dropna().astype(float))) if gcol else []
        lab = "measured λ̂" + (f", γ = {', '.join(f'{v:g}' for v in gam)}" if gam else f" ({name})")
        c = next(palette)
        share(t, "p6", c, "o")
        handles.append(Line2D([], [], color=c, marker="o", label=lab))
        if i == 0:
            share(t, "p6_th", "tab:brown", "s")
            handles.append(Line2D([], [], color="tab:brown", marker="s", label="closed-form λ (7, 8.5)"))
        dd = df.assign(k=_col(df, "init.k").astype(int), n=_col(df, "data.n").astype(int))
        for k, mk in ((5, "v"), (6, "^")):
            g = dd[dd["k"] == k].groupby("n")["llc_mean"]
            n = np.array(sorted(g.groups))
            a2.errorbar(n, g.mean().reindex(n), yerr=(g.std(ddof=1) / np.sqrt(g.count())).reindex(n).fillna(0),
                        fmt=mk + ("-" if k == 6 else "--"), color=c, ms=4, capsize=2,
                        label=f"{k}-gon, {lab}")
    for k, ls in ((5, "--"), (6, "-")):
        a2.axhline(slt.theory.tms_llc(f"{k}-gon"), color="k", ls=ls, lw=0.9, label=f"closed form λ, {k}-gon")
    nc = predicted_crossing()
    handles += [Line2D([], [], color="0.3", ls="-", label="solid: 6-gon basin"),
                Line2D([], [], color="0.3", ls="--", mfc="none", label="dashed: 5-gon basin"),
                Line2D([], [], color="k", ls=":", label=f"n ΔL + Δλ log n = 0: n ≈ {nc:.0f}")]
    for ax in (a1, a2):
        ax.axvline(nc, color="k", ls=":", lw=1.2)
        ax.set_xscale("log")
        ax.set_xlabel("sample size n")
    a1.set_ylim(-0.05, 1.05)
    a1.set_ylabel("posterior share of the basin")
    a1.set_title(f"Free-energy proxy 1/(1 + exp(±(F₆ − F₅))), F = n L_n(w*) + λ log n\n"
                 f"(mean ± s.e. over {min(nseeds)}{'' if min(nseeds) == max(nseeds) else f'–{max(nseeds)}'} seeds per n)",
                 fontsize=8.5)
    a1.legend(handles=handles, loc="center right", fontsize=6.5)
    a2.set_ylabel("estimated LLC λ̂ at w*")
    a2.set_title("λ̂ of both points against n (the localization γ sets how fast it reaches λ)", fontsize=8.5)
    a2.legend(fontsize=6, loc="lower right")


# ---------------------------------------------------------------------------
# figure 6: LLC over training
# ---------------------------------------------------------------------------
def fig_curve(results: Path, out: Path, seed: int | None = None) -> list[Path]:
    """Loss curve and λ̂ at every checkpoint of one ``tms_curve`` run, shaded by the number of
    live columns k at the checkpoint.  The run: the given seed (``--curve-seed`` on the command
    line), else the one that ends at the lowest loss (ties: the lowest seed)."""
    df = load_sweep(results, "tms_curve")
    if seed is not None:
        df = df[df["seed"] == seed]
        if not len(df):
            raise NoData(f"tms_curve has no finished run with seed={seed}")
    df = df.assign(final=[_list(v)[-1] for v in df["ckpt_loss"]])
    r = df.sort_values(["final", "seed"]).iloc[0]
    step = np.asarray(_list(r["ckpt_step"]), float)
    loss = np.asarray(_list(r["ckpt_loss"]), float)
    llc = np.asarray(_list(r["ckpt_llc_mean"]), float)
    sem = np.asarray(_list(r["ckpt_llc_sem"]), float)
    below = np.asarray(_list(r["ckpt_frac_below_init"]), float)
    pts = [f"k = {int(k)} live columns" for k in _list(r["ckpt_k"])]
    final_name = str(_list(r["ckpt_point"])[-1])
    cs, cl = np.asarray(_list(r["curve_step"]), float), np.asarray(_list(r["curve_loss"]), float)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6.6, 5.2), sharex=True)
    x = np.maximum(step, 1)
    a1.plot(np.maximum(cs, 1), cl, "-", color="0.3", lw=1, label="training loss L_n (full data)")
    a1.plot(x, loss, "o", color="k", ms=3, label="checkpoints")
    a1.set_yscale("log")
    a1.set_ylabel("loss L_n")
    ok = below <= 0.5
    a2.errorbar(x[ok], llc[ok], yerr=sem[ok], fmt="o-", ms=3.5, color="tab:green", capsize=2,
                label="λ̂ ± s.e. (chains)")
    if (~ok).any():
        a2.errorbar(x[~ok], llc[~ok], yerr=sem[~ok], fmt="o", ms=3.5, color="tab:green", mfc="none", capsize=2,
                    label="λ̂ where most draws fall below L(w*) (not near a minimum)")
    a2.set_ylabel("estimated LLC λ̂")
    a2.set_xlabel("training step (log scale; step 0 drawn at 1)")
    a2.set_xscale("log")
    # shade the runs of equal class
    palette = iter(["tab:gray", "tab:orange", "tab:blue", "tab:olive", "tab:pink", "tab:cyan", "tab:brown"])
    cmap = {p: next(palette, "0.7") for p in sorted(set(pts), reverse=True)}
    edges = np.sqrt(x[:-1] * x[1:])
    left = np.concatenate([[x[0] / 1.2], edges])
    right = np.concatenate([edges, [x[-1] * 1.2]])
    seen: set[str] = set()
    for i, p in enumerate(pts):
        for ax in (a1, a2):
            ax.axvspan(left[i], right[i], color=cmap[p], alpha=0.15, lw=0,
                       label=(p if ax is a2 and p not in seen else None))
        seen.add(p)
    if final_name in slt.theory.TMS_CRITICAL_POINTS:
        a2.axhline(slt.theory.tms_llc(final_name), color="k", ls="--", lw=1,
                   label=f"closed-form λ of the final {final_name.replace('+', '⁺')}")
    a2.annotate(f"final point: {final_name.replace('+', '⁺')}", (0.98, 0.96), xycoords="axes fraction", ha="right",
                va="top", fontsize=8)
    lo = np.nanpercentile(llc - sem, 5)
    a2.set_ylim(max(lo, -2.0) - 0.5, np.nanmax(llc + sem) + 1.0)
    a1.legend(loc="upper right", fontsize=7)
    a2.legend(loc="upper left", fontsize=6.5)
    n = int(r["data.n"])
    a1.set_title(f"LLC over training: TMS 6×2, n = {n}, seed {int(r['seed'])}; {len(step)} checkpoints, "
                 f"one batched estimate_llc call ({float(r['llc_seconds']):.0f} s)\n"
                 f"shading: number of live columns of W at the checkpoint (Adam, lr {float(r['curve.lr']):g}, "
                 f"init scale {float(r['curve.init_scale']):g})", fontsize=8.5)
    return _save(fig, out, STEMS["curve"])


# ---------------------------------------------------------------------------
# figure 7: symmetry paths
# ---------------------------------------------------------------------------
def _family(df: pd.DataFrame) -> pd.Series:
    if "model.family" in df:
        return df["model.family"].astype(str)
    return pd.Series(["tms"] * len(df), index=df.index)


def _sym_panel(ax: Any, df: pd.DataFrame, title: str, bounds: bool) -> None:
    df = df.assign(fam=_family(df), h=_col(df, "h", "symmetry.h").astype(float))
    span = max(float(df["h"].max() - df["h"].min()), 1e-9)
    for fam, sub in df.groupby("fam"):
        c = COLORS.get(fam, "tab:green")
        g = sub.groupby("h")
        h = np.array(sorted(g.groups))
        m = g["llc_mean"].mean().reindex(h)
        # error: s.e. over seeds when there are several, else the run's chain s.e.
        nseed = g["llc_mean"].count().reindex(h)
        se = np.where(nseed > 1, (g["llc_mean"].std(ddof=1) / np.sqrt(nseed)).reindex(h),
                      g["llc_sem"].mean().reindex(h))
        ax.errorbar(h, m, yerr=se, fmt="o-", color=c, ms=4, capsize=2, label=f"{fam}: λ̂ (± s.e.)")
        if "dllc_dh" in sub:
            slope = g["dllc_dh"].mean().reindex(h)
            for hh in (h[0], h[-1]):
                if np.isfinite(slope[hh]):
                    dh = 0.12 * span
                    xs = np.array([hh - dh, hh + dh])
                    xs = np.clip(xs, h[0], h[-1]) if len(h) > 1 else xs
                    ax.plot(xs, m[hh] + slope[hh] * (xs - hh), "-", color=c, lw=2.2, alpha=0.5,
                            label=f"{fam}: covariance dλ̂/dh at the ends" if hh == h[0] else None)
        if bounds and "llc_upper_bound" in sub:
            ub = g["llc_upper_bound"].max().reindex(h)
            ax.step(h, ub, where="mid", color=c, ls="--", lw=1, label=f"{fam}: (d + rank H)/4")
        if "llc_expected" in sub:
            ax.plot(h, g["llc_expected"].mean().reindex(h), ":", color=c, lw=1.2, label=f"{fam}: exact λ")
        if "llc_theory" in sub and sub["llc_theory"].notna().any():
            lt = sub.loc[sub["llc_theory"].notna(), ["h", "llc_theory"]]
            ax.plot(lt["h"], lt["llc_theory"], "*", color="k", ms=9, label="closed form λ (6-gon)")
    ax.set_xlabel("h  (q_h = (1 − h) q₀ + h q₁)")
    ax.set_ylabel("estimated LLC λ̂")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, loc="best")


def fig_symmetry(results: Path, out: Path) -> list[Path]:
    """λ̂ along the symmetry paths of ``expfam_symmetrize``, ``expfam_break`` and
    ``tms_symmetry``: seed means, covariance slopes dλ̂/dh at both ends of each path, the
    Hessian-rank upper bound (exp-family runs record it) and the exact λ."""
    panels = []
    for name, title, bounds in (
        ("expfam_symmetrize", "Exp. family on the hexagon: symmetrize q under D₆", True),
        ("expfam_break", "Exp. family: break the D₆ invariance of a uniform q", True),
        ("tms_symmetry", "TMS 6-gon: break the S₆ invariance of q (w* fixed)", True),
    ):
        try:
            panels.append((load_sweep(results, name), title, bounds))
        except NoData as e:
            print(f"[figures] symmetry: skipping a panel: {e}", file=sys.stderr)
    if not panels:
        raise NoData("none of expfam_symmetrize, expfam_break, tms_symmetry has a finished run")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.7), squeeze=False)
    for ax, (df, title, bounds) in zip(axes[0], panels):
        _sym_panel(ax, df, title, bounds)
    fig.suptitle("Symmetry and the LLC: λ̂ along q_h with the covariance estimate of dλ̂/dh drawn at the path ends",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out, STEMS["symmetry"])


# ---------------------------------------------------------------------------
# figure 3: two features in one dimension
# ---------------------------------------------------------------------------
PHASES = ["feature 2 not represented", "superposition (antipodal)", "both, same sign",
          "feature 1 not represented", "nothing represented"]


def two_feature_phase(W: Any, dead_tol: float = 0.1) -> str:
    """Phase of a 1×2 W: which features are represented (|W_i| above ``dead_tol`` times the
    larger one, and above 0.05 absolutely) and, if both, whether they point opposite ways."""
    w = np.asarray(W, dtype=float).reshape(-1)
    if w.shape != (2,):
        raise ValueError(f"two_feature_phase needs W of shape (1, 2), got {np.asarray(W).shape}")
    a = np.abs(w)
    live = (a > dead_tol * a.max()) & (a > 0.05)
    if live.all():
        return PHASES[1] if w[0] * w[1] < 0 else PHASES[2]
    if live[0]:
        return PHASES[0]
    if live[1]:
        return PHASES[3]
    return PHASES[4]


def phase2_cells(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (I₂/I₁, density) cell of the ``fig_phase2`` sweep: the lowest-training-loss run
    over seeds (``_best_per``: its ``W``, ``train_loss`` and ``phase``), ``runs`` (finished seeds in
    the cell), ``agree`` (how many of them are in the drawn phase) and ``majority`` (the phase of most
    seeds; ties go to the drawn one)."""
    df = df.assign(r=_col(df, "importance_decay").astype(float),
                   density=1.0 - _col(df, "data.sparsity").astype(float))
    df["phase"] = [two_feature_phase(_list(W)) for W in df["W"]]
    best = _best_per(df, ["r", "density"]).reset_index(drop=True)
    runs, agree, majority = [], [], []
    for _, row in best.iterrows():
        cell = df[(df["r"] == row["r"]) & (df["density"] == row["density"])]
        counts = cell["phase"].value_counts()
        runs.append(len(cell))
        agree.append(int(counts.get(row["phase"], 0)))
        majority.append(row["phase"] if counts.get(row["phase"], 0) == counts.max() else counts.idxmax())
    return best.assign(runs=runs, agree=agree, majority=majority)


def fig_phase2(results: Path, out: Path) -> list[Path]:
    """Phase of the trained 2-feature, 1-hidden TMS over relative importance I₂/I₁ and density 1 − S:
    per cell the lowest-training-loss run over seeds (:func:`phase2_cells`); a cell where not every
    seed reached that phase is marked with the count (e.g. ``2/3``)."""
    from matplotlib.colors import ListedColormap

    df = phase2_cells(load_sweep(results, "fig_phase2"))
    rs, ds = np.array(sorted(df["r"].unique())), np.array(sorted(df["density"].unique()))
    grid = np.full((len(ds), len(rs)), np.nan)
    for _, row in df.iterrows():
        grid[np.searchsorted(ds, row["density"]), np.searchsorted(rs, row["r"])] = PHASES.index(row["phase"])

    def edges(v: np.ndarray) -> np.ndarray:
        lv = np.log(v)
        if len(v) == 1:
            return np.exp([lv[0] - 0.5, lv[0] + 0.5])
        mid = (lv[:-1] + lv[1:]) / 2
        return np.exp(np.concatenate([[lv[0] - (mid[0] - lv[0])], mid, [lv[-1] + (lv[-1] - mid[-1])]]))

    colors = ["#4c72b0", "#dd8452", "#c44e52", "#55a868", "#bbbbbb"]
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    ax.pcolormesh(edges(rs), edges(ds), grid, cmap=ListedColormap(colors), vmin=-0.5, vmax=len(PHASES) - 0.5,
                  shading="flat", edgecolors="w", linewidth=0.5)
    for _, row in df.iterrows():
        W = np.asarray(_list(row["W"]), float).reshape(-1)
        tag = f"\n{row['agree']}/{row['runs']}" if row["agree"] < row["runs"] else ""
        ax.annotate(f"{W[0]:+.1f}\n{W[1]:+.1f}{tag}", (row["r"], row["density"]), ha="center", va="center",
                    fontsize=5.5 if not tag else 5.0, color="w")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("relative importance of feature 2, I₂ / I₁")
    ax.set_ylabel("feature density 1 − S")
    present = [p for p in PHASES if p in set(df["phase"])]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[PHASES.index(p)]) for p in present]
    ax.legend(handles, present, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7)
    nmin, nmax = int(df["runs"].min()), int(df["runs"].max())
    seeds = f"{nmin}" if nmin == nmax else f"{nmin}–{nmax}"
    ax.set_title(f"Two features, one hidden dimension (n = {int(df['data.n'].iloc[0])}); cells: W₁, W₂ of the\n"
                 f"lowest-loss of {seeds} seeds (k/{nmax}: seeds in that phase, when not all)", fontsize=8.5)
    return _save(fig, out, STEMS["phase2"])


# ---------------------------------------------------------------------------
# figure 8: direct-sum (tegum) structure with 3 hidden dimensions
# ---------------------------------------------------------------------------
def _summands(dec: Any) -> str:
    """Feature counts of a decomposition's summands, largest first (``3+2``; ``+1 dead`` appended)."""
    sizes = "+".join(str(k) for k in sorted((len(g) for g in dec.partition), reverse=True)) or "0"
    return sizes + (f" +{len(dec.dead)} dead" if dec.dead else "")


def fig_tegum(results: Path, out: Path) -> list[Path]:
    """|cos(W_i, W_j)| of the lowest-loss ``fig_tegum`` run per (features, sparsity) cell (:func:`_best_per`),
    features ordered by the summands of :func:`slt.geometry.direct_sum_decomposition` (outlined),
    titled with the decomposition name, the summands' dimensions and, over all seeds of the cell,
    how often each summand pattern (features per summand, e.g. ``3+2``) was found."""
    df = load_sweep(results, "fig_tegum")
    df = df.assign(nf=_col(df, "model.n_features").astype(int), S=_col(df, "data.sparsity").astype(float))
    df["pattern"] = [_summands(geo.direct_sum_decomposition(torch.tensor(_list(W), dtype=torch.float64)))
                     for W in df["W"]]
    seeds = df.groupby(["nf", "S"])["pattern"].agg(lambda p: p.value_counts().to_dict())
    df = _best_per(df, ["nf", "S"])
    nfs, Ss = sorted(df["nf"].unique()), sorted(df["S"].unique())
    lines = max(len(v) for v in seeds)  # title lines taken by the seed counts
    fig, axes = plt.subplots(len(nfs), len(Ss), figsize=(2.4 * len(Ss) + 0.6, (2.9 + 0.12 * lines) * len(nfs)),
                             squeeze=False, gridspec_kw={"hspace": 0.9 + 0.15 * lines})
    im = None
    for ax in axes.flat:
        ax.axis("off")
    for _, r in df.iterrows():
        ax = axes[nfs.index(r["nf"]), Ss.index(r["S"])]
        ax.axis("on")
        W = torch.tensor(_list(r["W"]), dtype=torch.float64)  # (m, n)
        dec = geo.direct_sum_decomposition(W)
        order = [i for g in dec.partition for i in g] + list(dec.dead)
        U = W / W.norm(dim=0).clamp_min(1e-12)
        C = (U.T @ U).abs().numpy()[np.ix_(order, order)]
        im = ax.imshow(C, vmin=0, vmax=1, cmap="magma_r")
        start = 0
        for g in dec.partition:
            ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), len(g), len(g), fill=False, ec="tab:cyan", lw=2))
            start += len(g)
        ax.set_xticks(range(len(order)), order, fontsize=7)
        ax.set_yticks(range(len(order)), order, fontsize=7)
        ax.grid(False)
        dead = f", {len(dec.dead)} dead" if dec.dead else ""
        found = seeds[(r["nf"], r["S"])]
        counts = "\n".join(f"{c}× {p}" for p, c in found.items())
        ax.set_title(f"{r['nf']} features, S = {r['S']:g}\n{dec.name}{dead}\n"
                     f"dims {dec.dims}, residual {dec.residual:.2f}\nseeds: {counts}", fontsize=6.8)
    if im is not None:
        cb = fig.colorbar(im, ax=axes, shrink=0.6, pad=0.02)
        cb.set_label("|cos(W_i, W_j)|  (features ordered by summand)")
    m = int(df["model.n_hidden"].iloc[0])
    nseeds = max(sum(v.values()) for v in seeds)
    fig.suptitle(f"Direct-sum (tegum) decomposition of trained TMS models in m = {m} hidden dimensions "
                 f"(slt.geometry; boxes = summands;\nlowest-loss of {nseeds} seeds per panel; "
                 f"'seeds': how many seeds found each pattern of features per summand)", fontsize=9.5)
    return _save(fig, out, STEMS["tegum"])


# ---------------------------------------------------------------------------
# figure 9: refined LLCs of attention heads over training
# ---------------------------------------------------------------------------
#: head class (experiments/_induction.classify_heads) -> colour in the refined figure
HEAD_COLORS = {"induction": "tab:red", "previous-token": "tab:blue", "other": "0.55"}
#: data set of the data-refined LLC -> (legend text, colour)
DATA_SETS = {"induction": ("induction positions (inside the copy)", "tab:red"),
             "other": ("other positions", "0.45"),
             "all": ("all positions (the ordinary LLC)", "k")}


def _refined_data_llc(r: pd.Series, stat: str) -> dict[str, np.ndarray]:
    """``{data set: per-checkpoint values}`` of ``data_llc_<stat>`` from a summary row (a JSON dict
    cell, or the flattened columns ``data_llc_<stat>.<set>`` of the summary table)."""
    key = f"data_llc_{stat}"
    if key in r and isinstance(_list(r[key]), dict):
        return {k: np.asarray(v, float) for k, v in _list(r[key]).items()}
    out = {}
    for c in r.index:
        if c.startswith(key + ".") and r[c] is not None and not (isinstance(r[c], float) and math.isnan(r[c])):
            out[c[len(key) + 1:]] = np.asarray(_list(r[c]), float)
    return out


def fig_refined(results: Path, out: Path, seed: int | None = None) -> list[Path]:
    """One ``refined`` run (``experiments/refined.py``; the given seed, else the run that ends at the
    lowest held-out loss): (a) the held-out loss on all / induction / other token positions over
    training; (b) every head's induction and previous-token scores; (c) every head's weight-refined
    LLC ± s.e. over training, coloured by the head's class at the last checkpoint, solid for layer 0 and
    dashed for layer 1; (d) the data-refined LLC on induction / other / all positions.  The checkpoint
    interval with the steepest drop of the induction-position loss (per e-fold of steps) is shaded in
    every panel; hollow markers: most draws fell below L(w*) (w* is not a local minimum of that loss,
    so λ̂ is biased low there)."""
    df = load_sweep(results, "refined")
    if seed is not None:
        df = df[df["seed"] == seed]
        if not len(df):
            raise NoData(f"refined has no finished run with seed={seed}")
    df = df.assign(final=[_list(v)[-1] for v in _col(df, "ckpt_loss")])
    r = df.sort_values(["final", "seed"]).iloc[0]
    step = np.maximum(np.asarray(_list(r["ckpt_step"]), float), 1)
    heads = [str(h) for h in _list(r["heads"])]
    classes = [str(c) for c in _list(r["head_class"])]
    rllc = np.asarray(_list(r["head_rllc_mean"]), float)  # (heads, K)
    rsem = np.asarray(_list(r["head_rllc_sem"]), float)
    below = np.asarray(_list(r["head_frac_below_init"]), float) if "head_frac_below_init" in r else np.zeros_like(rllc)
    scores = {"induction": np.asarray(_list(r["head_induction_score"]), float),
              "previous-token": np.asarray(_list(r["head_previous_score"]), float)
              if "head_previous_score" in r else None}
    cs = np.maximum(np.asarray(_list(r["curve_step"]), float), 1)
    curves = {k: np.asarray(_list(r[f"curve_{k}"]), float) for k in ("loss", "loss_induction", "loss_other")}
    li = np.asarray(_list(r["ckpt_loss_induction"]), float) if "ckpt_loss_induction" in r else None
    bump = None
    if li is not None and len(li) > 2:
        j = int(np.argmin(np.diff(li) / np.diff(np.log(step))))
        bump = (step[j], step[j + 1])
    fig, axes = plt.subplots(2, 2, figsize=(10.0, 6.8), sharex=True)
    (a1, a2), (a3, a4) = axes

    def points(ax: Any, y: np.ndarray, e: Any, hollow: np.ndarray, col: str, ls: str, lab: str | None) -> None:
        ax.plot(step, y, ls, color=col, lw=1.3, label=lab)
        ax.errorbar(step[~hollow], y[~hollow], yerr=None if e is None else e[~hollow], fmt="o", color=col, ms=2.8,
                    capsize=1.5)
        if hollow.any():
            ax.errorbar(step[hollow], y[hollow], yerr=None if e is None else e[hollow], fmt="o", color=col, ms=3.2,
                        mfc="none", capsize=1.5)

    # (a) loss curves
    for k, lab, col in (("loss", "all positions", "k"), ("loss_induction", "induction positions", "tab:red"),
                        ("loss_other", "other positions", "0.45")):
        a1.plot(cs, curves[k], "-", color=col, lw=1.2, label=f"held-out loss, {lab}")
    a1.plot(step, np.asarray(_list(r["ckpt_loss"]), float), "o", color="k", ms=3, label="checkpoints")
    a1.set_ylabel("cross-entropy (nats / token)")
    a1.set_title("(a) held-out loss per set of token positions", fontsize=8.5)
    # (b) scores, (c) rLLCs, coloured by class
    seen: set[str] = set()
    for i, (h, c) in enumerate(zip(heads, classes)):
        col = HEAD_COLORS.get(c, "tab:green")
        lab = None if c in seen else f"{c} head"
        seen.add(c)
        a2.plot(step, scores["induction"][i], "-" if h.startswith("l0") else "--", color=col, lw=1.3, label=lab)
        if scores["previous-token"] is not None:
            a2.plot(step, scores["previous-token"][i], ":", color=col, lw=1.3, marker="x", ms=3)
        points(a3, rllc[i], rsem[i], below[i] > 0.5, col, "-" if h.startswith("l0") else "--", lab)
        a3.annotate(h, (step[-1], rllc[i, -1]), xytext=(4, 0), textcoords="offset points", fontsize=6.5,
                    color=col, va="center")
    a2.set_ylabel("attention score")
    a2.set_title("(b) induction score (lines: solid layer 0, dashed layer 1) and\n"
                 "previous-token score (dotted, ×) per head", fontsize=8.5)
    a3.set_ylabel("weight-refined LLC (one head)")
    a3.set_title("(c) weight-refined LLC per head ± s.e. (chains), coloured by class at the end", fontsize=8.5)
    # (d) data-refined
    dm, ds = _refined_data_llc(r, "mean"), _refined_data_llc(r, "sem")
    db = _refined_data_llc(r, "frac_below_init") if any(c.startswith("data_frac_below_init") for c in r.index) else {}
    for k, v in dm.items():
        lab, col = DATA_SETS.get(k, (k, "tab:green"))
        points(a4, v, ds.get(k), db.get(k, np.zeros_like(v)) > 0.5, col, "-", lab)
    a4.set_ylabel("data-refined LLC (all weights)")
    a4.set_title("(d) data-refined LLC (all weights move) per set of positions", fontsize=8.5)
    if not dm:
        a4.text(0.5, 0.5, "no data-refined LLCs in this run (data_refined=false)", transform=a4.transAxes,
                ha="center", fontsize=8)
    for ax in axes.flat:
        ax.set_xscale("log")
        if bump is not None:
            ax.axvspan(*bump, color="tab:orange", alpha=0.15, lw=0,
                       label="steepest drop of the induction-position loss" if ax is a1 else None)
    for ax in (a2, a3, a4):
        ax.legend(fontsize=6.5, loc="upper left")
    a1.legend(fontsize=6.5, loc="lower left")
    for ax in (a3, a4):
        ax.set_xlabel("training step (log scale; step 0 drawn at 1); hollow: most draws below L(w*)", fontsize=8)
    counts = ", ".join(f"{classes.count(c)} {c}" for c in HEAD_COLORS if classes.count(c))
    nc = int(r["sampler.num_chains"]) if "sampler.num_chains" in r else "?"
    nd = int(r["sampler.num_draws"]) if "sampler.num_draws" in r else "?"
    # draws as run: extend_draws may have continued unmixed chains past sampler.num_draws
    if "rllc_num_draws" in r and r["rllc_num_draws"] == r["rllc_num_draws"]:
        nd = int(r["rllc_num_draws"])
        if "dllc_num_draws" in r and r["dllc_num_draws"] == r["dllc_num_draws"] and int(r["dllc_num_draws"]) != nd:
            nd = f"{nd} (data-refined: {int(r['dllc_num_draws'])})"
    fig.suptitle(f"Refined LLCs of the heads of a 2-layer attention-only transformer over training (seed {int(r['seed'])}; "
                 f"{len(step)} checkpoints; heads: {counts};\nnβ = {float(r['nbeta']):g}, γ = {float(r['localization']):g}, "
                 f"{nc} chains × {nd} draws per head and checkpoint)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out, STEMS["refined"])


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
FIGURES: dict[str, Callable[[Path, Path], list[Path]]] = {
    "kgon": fig_kgon,
    "geometry": fig_geometry,
    "dims": fig_dims,
    "phase": fig_phase,
    "curve": fig_curve,
    "symmetry": fig_symmetry,
    "phase2": fig_phase2,
    "tegum": fig_tegum,
    "refined": fig_refined,
}


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.figures {kgon,geometry,...,all} [--results DIR] [--out DIR]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("figures", nargs="+", choices=[*FIGURES, "all"], help="which figures to make")
    ap.add_argument("--results", default=os.environ.get("SLT_RESULTS_DIR", "results"),
                    help="results root holding sweeps/ (default $SLT_RESULTS_DIR or results)")
    ap.add_argument("--out", default=None, help="output folder (default <results>/figures)")
    ap.add_argument("--curve-seed", type=int, default=None,
                    help="curve: draw this seed's run (default: the run that ends at the lowest loss)")
    args = ap.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results / "figures"
    names = list(FIGURES) if "all" in args.figures else list(dict.fromkeys(args.figures))
    status = 0
    with plt.rc_context(STYLE):
        for name in names:
            t0 = time.perf_counter()
            try:
                if name == "curve" and args.curve_seed is not None:
                    paths = fig_curve(results, out, seed=args.curve_seed)
                else:
                    paths = FIGURES[name](results, out)
            except NoData as e:
                print(f"[figures] {name}: skipped: {e}", file=sys.stderr)
                if "all" not in args.figures:
                    status = 1
                continue
            except MixedRuns as e:  # (data there, but not one figure's worth: fails "all" too)
                moved = set_aside_stale(out, name)
                note = (f" (the earlier drawing was renamed {', '.join(str(q) for q in moved)}: it may not be of the runs there now)"
                        if moved else "")
                print(f"[figures] {name}: not drawn: {e}{note}", file=sys.stderr)
                status = 1
                continue
            print(f"[figures] {name}: {', '.join(map(str, paths))} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
