"""experiments/figures.py: every figure is regenerated from a tiny synthetic result table.

The synthetic runs are written exactly as the experiments write them (one
``result.json`` per run folder through :mod:`experiments.records`, then the sweep's
``summary.parquet``/``summary.csv`` through :func:`experiments.records.collect`), so a
change of column names or a broken figure function fails here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import slt
from experiments import figures, records
from slt.models import kgon_parameters

STEMS = {
    "kgon": "kgon_llc",
    "geometry": "geometry",
    "dims": "feature_dimensionality",
    "phase": "phase_transition",
    "curve": "llc_curve",
    "symmetry": "symmetry",
    "phase2": "phase_diagram_2x1",
    "tegum": "tegum",
    "refined": "refined",
}


def _write_run(root: Path, sweep: str, overrides: dict, config: dict, metrics: dict, seed: int = 0) -> None:
    sub = ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "default"
    rec = {"status": "ok", "name": sweep, "seed": seed, "overrides": [f"{k}={v}" for k, v in overrides.items()],
           "config": {"name": sweep, "seed": seed, **config}, "device": "cpu", "seconds": 1.0, "files": [],
           "metrics": metrics}
    records.atomic_write_json(root / "sweeps" / sweep / sub / records.RESULT_FILE, rec)


def _llc(rng: np.random.Generator, mean: float) -> dict:
    return {"llc_mean": float(mean + 0.2 * rng.standard_normal()), "llc_sem": 0.2}


@pytest.fixture(autouse=True)
def _low_dpi(monkeypatch):
    monkeypatch.setitem(figures.STYLE, "savefig.dpi", 40)  # same figures, faster to write


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results root with one tiny sweep per figure."""
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    tms6 = {"model": {"n_features": 6, "n_hidden": 2}, "data": {"n": 2000}, "importance_decay": 1.0}
    # figure 4: k-gons (two seeds each)
    for name, k, plus in (("5-gon", 5, False), ("5-gon+", 5, True), ("6-gon", 6, False)):
        p = kgon_parameters(k, 6, 2, dead_bias=-1.0, plus=plus)
        for seed in (0, 1):
            _write_run(root, "fig_kgon", {"init.k": k, "init.plus": plus, "seed": seed},
                       {**tms6, "init": {"k": k, "plus": plus}},
                       {"point": name, "W": p["W"].tolist(), "b": p["b"].tolist(), "train_loss": 0.05,
                        "llc_theory": slt.theory.tms_llc(name), **_llc(rng, slt.theory.tms_llc(name))}, seed)
    # figure 1: 5 features in 2 dims at three densities, two seeds
    for s in (0.0, 0.5, 0.9):
        for seed in (0, 1):
            W = torch.randn(2, 5, generator=g)
            _write_run(root, "fig_elhage", {"data.sparsity": s, "seed": seed},
                       {"model": {"n_features": 5, "n_hidden": 2}, "data": {"n": 1000, "sparsity": s},
                        "importance_decay": 0.9},
                       {"W": W.tolist(), "b": (-0.1 * torch.rand(5, generator=g)).tolist(),
                        "train_loss": float(torch.rand(1, generator=g)), **_llc(rng, 5.0)}, seed)
    # figure 2: 8 features in 3 dims at three sparsities, trained online (held-out loss recorded)
    for s in (0.0, 0.7, 0.95):
        W = torch.randn(3, 8, generator=g)
        _write_run(root, "fig_dims", {"data.sparsity": s},
                   {"model": {"n_features": 8, "n_hidden": 3}, "data": {"n": 1000, "sparsity": s},
                    "train": {"online": True, "steps": 100, "batch_size": 64}},
                   {"W": W.tolist(), "b": torch.zeros(8).tolist(), "train_loss": 0.1, "heldout_loss": 0.11,
                    **_llc(rng, 10.0)})
    # figure 5: both basins at three n, two seeds
    for n in (100, 500, 5000):
        for k in (5, 6):
            for seed in (0, 1):
                lam = slt.theory.tms_llc(f"{k}-gon")
                loss = slt.theory.TMS_CRITICAL_POINTS[f"{k}-gon"]["loss"] + 0.003 * rng.standard_normal()
                for sweep, gamma in (("fig_phase", 10.0), ("fig_phase_g1", 1.0)):
                    _write_run(root, sweep, {"data.n": n, "init.k": k, "seed": seed},
                               {**tms6, "data": {"n": n}, "init": {"k": k}, "sampler": {"localization": gamma}},
                               {"point": f"{k}-gon", "train_loss": loss,
                                **_llc(rng, lam * math.log(n) / math.log(5000))}, seed)
    # figure 5 (posterior mass): two ladders at n = 1500 and β = 1 runs at n = 300, 600; the
    # 6-gon fraction is logistic in log nβ with its crossing at nβ = 400
    def post_metrics(nbs: list, mixed: bool = True) -> dict:
        f6 = [1 / (1 + (400 / v) ** 3) for v in nbs]
        m = {"rung_nbeta": nbs, "rung_mixed": [mixed] * len(nbs), "n": int(nbs[0])}
        for k in range(1, 7):
            m[f"rung_frac_k{k}"] = [f if k == 6 else (1 - f if k == 5 else 0.0) for f in f6]
            m[f"rung_sem_k{k}"] = [0.02] * len(nbs)
        return m

    for seed in (0, 1):
        ladder = [1500 * (60 / 1500) ** (r / 5) for r in range(6)]
        _write_run(root, "tms_posterior", {"data.n": 1500, "seed": seed}, {**tms6, "data": {"n": 1500}},
                   post_metrics(ladder), seed)
    for n in (300, 600):
        _write_run(root, "tms_posterior", {"data.n": n, "seed": 0}, {**tms6, "data": {"n": n}},
                   post_metrics([n, n / 2], mixed=False), 0)
    # figure 6: one training curve with a change of class
    steps = [0, 10, 100, 1000]
    _write_run(root, "tms_curve", {"seed": 0}, {**tms6, "curve": {"lr": 0.001, "init_scale": 0.1}},
               {"ckpt_step": steps, "ckpt_loss": [0.3, 0.1, 0.07, 0.05], "ckpt_llc_mean": [-5.0, 3.0, 7.0, 8.4],
                "ckpt_llc_sem": [1.0, 0.5, 0.3, 0.3], "ckpt_frac_below_init": [0.9, 0.2, 0.0, 0.0],
                "ckpt_k": [6, 6, 5, 6], "ckpt_point": ["irregular-6", "irregular-6", "5-gon", "6-gon"],
                "curve_step": list(range(0, 1001, 10)), "curve_loss": list(np.geomspace(0.3, 0.05, 101)),
                "llc_seconds": 1.0, "W": [[0.0] * 6] * 2, "b": [0.0] * 6})
    # figure 7: exp-family paths (two families) and the TMS path
    for sweep in ("expfam_symmetrize", "expfam_break"):
        for fam in ("polar", "fixed"):
            for h in (0.0, 0.5, 1.0):
                _write_run(root, sweep, {"model": f"expfam_{fam}", "symmetry.h": h},
                           {"model": {"family": fam}, "symmetry": {"h": h}},
                           {"h": h, "dllc_dh": -0.3, "dllc_dh_sem": 0.1, "llc_upper_bound": 1.0,
                            "llc_lower_bound": 0.5, "llc_expected": 1.0, **_llc(rng, 1.0)})
    for h in (0.0, 0.5, 1.0):
        _write_run(root, "tms_symmetry", {"symmetry.h": h}, {**tms6, "symmetry": {"h": h}},
                   {"h": h, "dllc_dh": 0.5, "dllc_dh_sem": 0.2, "llc_theory": 8.5 if h == 0 else None,
                    **_llc(rng, 8.5)})
    # figure 3: 2 features in 1 dim on a 2 x 2 grid
    for r in (0.5, 2.0):
        for s in (0.0, 0.9):
            W = [[1.0, 0.0]] if s == 0.0 else [[1.0, -0.9 * r]]
            _write_run(root, "fig_phase2", {"importance_decay": r, "data.sparsity": s},
                       {"model": {"n_features": 2, "n_hidden": 1}, "data": {"n": 1000, "sparsity": s},
                        "importance_decay": r},
                       {"W": W, "b": [0.0, 0.0], "train_loss": 0.1, **_llc(rng, 1.0)})
    # a second seed in one cell: a same-sign local optimum at a higher loss (not drawn; counted)
    _write_run(root, "fig_phase2", {"importance_decay": 2.0, "data.sparsity": 0.9, "seed": 1},
               {"model": {"n_features": 2, "n_hidden": 1}, "data": {"n": 1000, "sparsity": 0.9},
                "importance_decay": 2.0},
               {"W": [[0.9, 0.8]], "b": [0.0, 0.0], "train_loss": 0.2, **_llc(rng, 1.0)}, seed=1)
    # figure 8: a triangular bipyramid (3-gon ⊕ 2-gon) and noise in 3 dims
    tri = [[math.cos(2 * math.pi * j / 3) for j in range(3)] + [0.0, 0.0],
           [math.sin(2 * math.pi * j / 3) for j in range(3)] + [0.0, 0.0], [0.0, 0.0, 0.0, 1.0, -1.0]]
    for s, W in ((0.9, tri), (0.5, torch.randn(3, 5, generator=g).tolist())):
        _write_run(root, "fig_tegum", {"data.sparsity": s},
                   {"model": {"n_features": 5, "n_hidden": 3}, "data": {"n": 1000, "sparsity": s}},
                   {"W": W, "b": [0.0] * 5, "train_loss": 0.1, **_llc(rng, 5.0)})
    for sweep in ("fig_kgon", "fig_elhage", "fig_dims", "fig_phase", "expfam_symmetrize"):
        records.collect(root / "sweeps" / sweep)  # these read summary.parquet; the others the run folders
    from test_refined_experiment import write_synthetic_refined_record

    write_synthetic_refined_record(root)  # figure 9: per-head refined LLCs over training
    return root


def test_every_figure_is_made_from_the_tables(results, tmp_path):
    out = tmp_path / "figs"
    assert figures.main(["all", "--results", str(results), "--out", str(out)]) == 0
    for stem in STEMS.values():
        for ext in ("png", "pdf"):
            f = out / f"{stem}.{ext}"
            assert f.exists() and f.stat().st_size > 1000, f"{f} not written"


def test_figure_functions_are_the_registered_ones():
    assert set(figures.FIGURES) == set(STEMS) and figures.STEMS == STEMS


def test_named_figure_without_its_sweep_fails(tmp_path, capsys):
    assert figures.main(["kgon", "--results", str(tmp_path), "--out", str(tmp_path / "f")]) == 1
    assert "no sweep folder" in capsys.readouterr().err
    assert not (tmp_path / "f" / "kgon_llc.png").exists()


def test_all_skips_missing_sweeps(results, tmp_path):
    # only the curve sweep present: 'all' makes that figure and skips the rest
    import shutil

    root = tmp_path / "r"
    shutil.copytree(results / "sweeps" / "tms_curve", root / "sweeps" / "tms_curve")
    assert figures.main(["all", "--results", str(root), "--out", str(tmp_path / "f")]) == 0
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["llc_curve.pdf", "llc_curve.png"]


def test_runs_at_other_sampler_settings_are_not_averaged_into_a_figure(results, tmp_path, capsys):
    """A trial run at other sampler settings in the same sweep folder (helper 31: one 5-gon run at 150 draws and a
    given step beside three 300-draw seeds) was averaged in, seed 0 counted twice (8.41 ± 1.0 against 7.40), the
    title still "3 seeds".  Now the figure is not drawn, with the runs of each setting named, and ``all`` exits 1."""
    import shutil

    root = tmp_path / "r"
    shutil.copytree(results / "sweeps" / "fig_kgon", root / "sweeps" / "fig_kgon")
    for d in (p for p in (root / "sweeps" / "fig_kgon").iterdir() if p.is_dir()):  # the sweep's own runs: 300 draws each
        rec = records.read_json(d / records.RESULT_FILE)
        rec["config"]["sampler"] = {"num_draws": 300, "step_size": None}
        records.atomic_write_json(d / records.RESULT_FILE, rec)
    out = tmp_path / "f"
    assert figures.main(["kgon", "--results", str(root), "--out", str(out)]) == 0  # drawn from the sweep's own runs
    p = kgon_parameters(5, 6, 2, dead_bias=-1.0)
    _write_run(root, "fig_kgon", {"init.k": 5, "seed": 0, "sampler.num_draws": 150, "sampler.step_size": 1e-3},
               {"model": {"n_features": 6, "n_hidden": 2}, "data": {"n": 2000}, "init": {"k": 5, "plus": False},
                "sampler": {"num_draws": 150, "step_size": 1e-3}},
               {"point": "5-gon", "W": p["W"].tolist(), "b": p["b"].tolist(), "train_loss": 0.05, "llc_mean": 11.46,
                "llc_sem": 0.3})
    with pytest.raises(figures.MixedRuns, match=r"sampled with different settings \(sampler\.num_draws=300 "
                       r"sampler\.step_size=None: .* and 2 more; sampler\.num_draws=150 sampler\.step_size=0\.001: "
                       r"init\.k=5,sampler\.num_draws=150"):
        figures.load_sweep(root, "fig_kgon")
    assert figures.main(["all", "--results", str(root), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "kgon: not drawn: the finished runs" in err
    # the drawing of the earlier runs is not left in place to be read as this sweep's figure
    assert not (out / "kgon_llc.png").exists() and not (out / "kgon_llc.pdf").exists()
    assert (out / "kgon_llc.stale.png").exists() and (out / "kgon_llc.stale.pdf").exists()
    assert f"renamed {out / 'kgon_llc.stale.png'}" in err


def test_a_summary_table_is_not_trusted_after_a_run_folder_is_deleted(results, tmp_path):
    """load_sweep read summary.parquet whenever it was newer than every result.json, so a run folder deleted
    after the sweep (a bad run removed by hand) stayed in the figure; now the table must list the same runs."""
    import shutil

    pytest.importorskip("pyarrow")
    root = tmp_path / "r"
    shutil.copytree(results / "sweeps" / "fig_kgon", root / "sweeps" / "fig_kgon")
    sweep = root / "sweeps" / "fig_kgon"
    records.collect(sweep)  # writes summary.parquet, newer than every result.json
    assert len(figures.load_sweep(root, "fig_kgon")) == 6
    shutil.rmtree(next(d for d in sweep.iterdir() if d.is_dir()))
    assert len(figures.load_sweep(root, "fig_kgon")) == 5


def test_predicted_crossing_solves_the_free_energy_balance():
    n = figures.predicted_crossing()
    a, b = slt.theory.TMS_CRITICAL_POINTS["5-gon"], slt.theory.TMS_CRITICAL_POINTS["6-gon"]
    resid = n * (b["loss"] - a["loss"]) + (b["llc"] - a["llc"]) * math.log(n)
    assert abs(resid) < 1e-6 * n
    assert 100 < n < 2000


def test_posterior_phase_table_and_measured_crossing(results):
    t = figures.posterior_phase_table(figures.load_sweep(results, "tms_posterior"))
    assert set(t["n"]) == {300, 600, 1500} and len(t) == 2 * 6 + 2 * 2
    lad = t[t["n"] == 1500].groupby("rung").mean(numeric_only=True)
    nc = figures.measured_crossing(lad["nbeta"].to_numpy(), lad["f5"].to_numpy(), lad["f6"].to_numpy())
    assert 300 < nc < 550  # the synthetic crossing is at 400 (interpolated between rungs)
    assert math.isnan(figures.measured_crossing(np.array([1.0, 2.0]), np.array([0.2, 0.1]), np.array([0.8, 0.9])))
    assert not t[t["n"] == 300]["mixed"].any()


def test_phase_shares_follow_the_free_energies(results):
    t = figures._phase_table(figures.load_sweep(results, "fig_phase"))
    assert len(t) == 6  # 3 n x 2 seeds, each with both basins
    assert np.allclose(t["p6"], 1 / (1 + np.exp(t["dF"])))
    # with the closed-form λ the 6-gon wins at large n and loses at small n
    assert t.loc[t["n"] == 5000, "p6_th"].min() > 0.5 > t.loc[t["n"] == 100, "p6_th"].max()


def test_phase2_cells_draw_the_lowest_loss_seed(results):
    t = figures.phase2_cells(figures.load_sweep(results, "fig_phase2"))
    assert len(t) == 4 and t["runs"].sum() == 5
    cell = t[(t["r"] == 2.0) & np.isclose(t["density"], 0.1)].iloc[0]
    assert cell["phase"] == "superposition (antipodal)" and cell["train_loss"] == 0.1  # not the same-sign seed
    assert (cell["runs"], cell["agree"]) == (2, 1) and cell["majority"] == cell["phase"]  # a tie: the drawn one
    assert (t.drop(cell.name)["agree"] == 1).all()


@pytest.mark.parametrize("W, phase", [
    ([[1.0, 0.0]], "feature 2 not represented"),
    ([[0.0, 1.0]], "feature 1 not represented"),
    ([[1.0, -0.8]], "superposition (antipodal)"),
    ([[0.9, 0.8]], "both, same sign"),
    ([[0.0, 0.0]], "nothing represented"),
])
def test_two_feature_phase(W, phase):
    assert figures.two_feature_phase(W) == phase


def test_two_feature_phase_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        figures.two_feature_phase([[1.0, 0.0, 0.0]])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # early checkpoints are not minima: the engine says so
def test_tms_curve_records_one_llc_per_checkpoint(tmp_path):
    """experiments/tms_curve.py: a tiny run records loss curve, checkpoints and λ̂ per checkpoint."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from experiments import _runlib, tms_curve

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=_runlib.CONF_DIR, version_base="1.3"):
            cfg = compose("tms_curve", overrides=["data.n=200", "curve.steps=40", "curve.num_checkpoints=4",
                                                  "curve.first_checkpoint=5", "curve.log_every=10",
                                                  "sampler.num_draws=20", "sampler.num_chains=2"])
    finally:
        GlobalHydra.instance().clear()
    rec = _runlib.execute(tms_curve.run, cfg, tmp_path / "run", validate=tms_curve._validate)
    m = rec["metrics"]
    steps = m["ckpt_step"]
    assert steps == tms_curve.checkpoint_steps(40, 4, 5) and steps[0] == 0 and steps[-1] == 40
    for key in ("ckpt_loss", "ckpt_llc_mean", "ckpt_llc_sem", "ckpt_k", "ckpt_point", "ckpt_frac_below_init"):
        assert len(m[key]) == len(steps), key
    assert m["curve_step"] == [0, 10, 20, 30, 40]
    assert m["ckpt_loss"][-1] < m["ckpt_loss"][0]  # training lowers the loss
    assert all(math.isfinite(v) for v in m["ckpt_llc_mean"])
    # a bad value is rejected before any work
    bad = cfg.copy()
    bad.curve.steps = 0
    with pytest.raises(ValueError, match="curve.steps"):
        tms_curve._validate(bad)


def test_best_run_per_cell_uses_heldout_loss_when_every_run_has_one():
    df = pd.DataFrame({"x": [1, 1, 2, 2], "train_loss": [0.1, 0.2, 0.3, 0.4], "heldout_loss": [0.5, 0.4, 0.3, 0.6],
                       "tag": ["a", "b", "c", "d"]})
    assert list(figures._best_per(df, "x")["tag"]) == ["b", "c"]  # lowest held-out loss, not training loss
    df.loc[0, "heldout_loss"] = float("nan")  # not recorded for every run: training loss decides
    assert list(figures._best_per(df, "x")["tag"]) == ["a", "c"]
    assert list(figures._best_per(df.drop(columns="heldout_loss"), "x")["tag"]) == ["a", "c"]
