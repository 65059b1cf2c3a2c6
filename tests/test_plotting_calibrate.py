"""Plot helpers and the calibration sweep produce their outputs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt

from conftest import IGNORE_CHECKPOINT_WARNING

pytestmark = IGNORE_CHECKPOINT_WARNING


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 2, generator=g)
    Y = X @ torch.tensor([[1.0], [-1.0]]) + 0.5 * torch.randn(200, 1, generator=g)
    m = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.linalg.lstsq(X, Y).solution.T)
    return m, X, Y


def test_plot_trace_writes_png(tmp_path):
    m, X, Y = _problem()
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, num_chains=3, num_draws=50, num_burnin=10,
                         step_size=1e-4, localization=1.0, progress=False)
    fig = slt.plot_trace(r)
    out = tmp_path / "trace.png"
    fig.savefig(out)
    assert out.stat().st_size > 1000
    ax = fig.axes[0]
    assert ax.get_xlabel() == "SGLD step"
    # what the diagnostics measure: the control-variate-corrected nβΔL per draw, and the running λ̂
    assert "L_B(w^*)" in ax.get_ylabel()
    running = [ln for ln in ax.lines if str(ln.get_label()).startswith("running")]
    assert len(running) == 1
    assert running[0].get_ydata()[-1] == pytest.approx(r.llc_mean, rel=1e-5)  # float32 trace
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum(lab.startswith("chain") for lab in labels) == 3
    # the legend sits outside the data (right of the axes)
    fig.canvas.draw()
    leg = ax.get_legend().get_window_extent()
    assert leg.x0 >= ax.get_window_extent().x1


def test_plot_trace_draws_a_few_chains_thinned():
    m, X, Y = _problem()
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, num_chains=6, num_draws=1000, num_burnin=10,
                         step_size=1e-4, localization=1.0, progress=False)
    fig = slt.plot_trace(r, max_chains=2, max_points=100)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum(lab.startswith("chain") for lab in labels) == 2 and "(2 of 6 chains drawn)" in labels
    assert min(len(ln.get_xdata()) for ln in ax.lines if len(ln.get_xdata()) > 2) <= 100  # thinned points


def test_calibrate_finds_largest_stable_step(tmp_path):
    """nβ h ≈ 2·nβ for this problem: SGLD is unstable for ε ≳ 2/(nβ h_max);
    the largest stable step on the grid must lie below that."""
    m, X, Y = _problem()
    nb = 200.0
    h_max = float(torch.linalg.eigvalsh(2 * X.T @ X / 200).max())
    steps = [1e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    cal = slt.calibrate(m, (X, Y), F.mse_loss, step_sizes=steps, nbetas=[nb], localizations=None,
                        num_draws=100, num_chains=2, batch_size=None, localization=1.0)
    assert list(cal.frame["step_size"]) == steps
    assert cal.best_step_size is not None
    assert cal.best_step_size < 2.0 / (nb * h_max)
    assert not cal.frame.loc[cal.frame.step_size == 3e-2, "stable"].item()
    fig = cal.plot()
    fig.savefig(tmp_path / "cal.png")
    with pytest.raises(ValueError, match="either nbetas or localizations.*fix the other with"):
        slt.calibrate(m, (X, Y), F.mse_loss, step_sizes=steps, nbetas=[1.0, 2.0], localizations=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"nbetas sweeps nbeta, which was also given"):
        slt.calibrate(m, (X, Y), F.mse_loss, step_sizes=steps, nbetas=[1.0, 2.0], nbeta=3.0)


def test_calibrate_reads_a_one_value_axis_as_fixed():
    """``nbetas=[a, b], localizations=[g]`` is ``localization=g`` (and a one-value nβ axis beside a swept γ is
    ``nbeta=``): the same grid points, the same chains."""
    m, X, Y = _problem()
    kw = dict(step_sizes=[1e-4, 1e-3], num_draws=20, num_chains=2, batch_size=None)
    with pytest.warns(RuntimeWarning, match=r"with 2 chains per grid point, λ̂ counts as changed between step sizes "
                                            r"only beyond 236 standard errors.*use num_chains=4 or more"):
        one = slt.calibrate(m, (X, Y), F.mse_loss, nbetas=[100.0, 200.0], localizations=[1.0], **kw)
    # (2 chains × 20 draws: an effective sample size under 100 everywhere, so no point converged, which is said)
    with pytest.warns(RuntimeWarning, match="no grid point converged"):
        fixed = slt.calibrate(m, (X, Y), F.mse_loss, nbetas=[100.0, 200.0], localization=1.0, **kw)
    assert not fixed.frame["converged"].any()
    assert one.other_name == "nbeta" and list(one.frame["llc_mean"]) == list(fixed.frame["llc_mean"])
    one = slt.calibrate(m, (X, Y), F.mse_loss, nbetas=[100.0], localizations=[1.0, 2.0], **kw)
    fixed = slt.calibrate(m, (X, Y), F.mse_loss, nbeta=100.0, localizations=[1.0, 2.0], **kw)
    assert one.other_name == "localization" and list(one.frame["llc_mean"]) == list(fixed.frame["llc_mean"])


def test_calibrate_marks_a_step_whose_lambda_moved_from_the_smaller_one():
    """Gaussian posterior of a 2-parameter regression (λ = d/2 = 1, curvature κ = nβ h ≈ 400): SGLD's
    stationary λ̂ is inflated by about 1/(1 − εκ/4) — +2.5% and +5% at the two small steps (they agree
    within their s.e. ≈ 0.03), +50% at ε = 3.5e-3 (εκ ≈ 1.4, still stable in the sense of no divergence,
    and with min_acceptance=0 only the λ̂ comparison can mark it): z ≈ 10 against the threshold of
    Student's t (7 df) at 3σ, 4.8.  Progress arguments pass through (they used to be given twice)."""
    m, X, Y = _problem()
    cal = slt.calibrate(m, (X, Y), F.mse_loss, step_sizes=[3.5e-3, 2.5e-4, 5e-4], nbetas=[200.0],
                        min_acceptance=0.0, num_draws=1000, num_chains=8, batch_size=None, localization=1.0,
                        num_burnin=200, progress=False)
    f = cal.frame.set_index("step_size")
    assert math.isnan(f.loc[2.5e-4, "z_smaller"]) and f.loc[5e-4, "z_smaller"] < 3
    assert f.loc[3.5e-3, "z_smaller"] > 6 and f.loc[3.5e-3, "llc_mean"] > 1.3
    assert list(f["stable"]) == [True, True, False] and cal.best_step_size == 5e-4
    assert (f["num_divergent"] == 0).all()


def test_calibrate_brackets_the_automatic_step_by_default():
    """With no grid given, calibrate runs the defaults once and brackets their step size ε̂:
    ε̂·(1/8, 1/4, 1/2, 1, 2).  On this problem SGLD is unstable above 2/(nβ h_max); the adapted ε̂
    stays below that, and the grid's largest stable step is at most 2ε̂."""
    from slt.calibrate import AUTO_GRID

    m, X, Y = _problem()
    nb = 200.0
    h_max = float(torch.linalg.eigvalsh(2 * X.T @ X / 200).max())
    cal = slt.calibrate(m, (X, Y), F.mse_loss, nbetas=[nb], num_draws=100, num_chains=2, batch_size=None,
                        localization=1.0)
    auto = float(cal.frame["auto_step_size"].iloc[0])
    assert list(cal.frame["step_size"]) == pytest.approx([auto * f for f in AUTO_GRID], rel=1e-12)
    assert auto < 2.0 / (nb * h_max)
    assert cal.best_step_size is not None and cal.best_step_size <= 2 * auto * (1 + 1e-12)


def test_results_frame_and_llc_curve_of_a_batched_call(tmp_path):
    """Exact: one row per result of a curve × restrictions call, its labels and numbers those of the
    result; the curve's x read from the checkpoint files' names, one line per restriction, a point drawn
    hollow where its result did not converge; a single result is a one-row frame."""
    import matplotlib.pyplot as plt

    m, X, Y = _problem()
    files = []
    for step, scale in ((100, 0.9), (250, 1.0), (400, 1.1)):
        f = tmp_path / f"step_{step}.pt"
        torch.save({k: v * scale for k, v in m.state_dict().items()}, f)
        files.append(str(f))
    kw = dict(num_chains=2, num_draws=20, num_burnin=5, step_size=1e-4, localization=1.0, progress=False)
    res = slt.estimate_llc(nn.Linear(2, 1, bias=False), (X, Y), F.mse_loss, state_dicts=files,
                           restrict_to={"w0": lambda n, p: torch.tensor([[True, False]]), "all": "*"}, **kw)
    frame = slt.results_frame(res)
    assert list(frame.columns[:3]) == ["checkpoint", "checkpoint_file", "restriction"]
    assert len(frame) == 6 and list(frame["restriction"]) == ["w0"] * 3 + ["all"] * 3
    for (_, row), r in zip(frame.iterrows(), [*res["w0"], *res["all"]]):
        assert row["checkpoint_file"] == r.config["checkpoint_file"]
        assert row["llc_mean"] == r.llc_mean and row["llc_sem"] == r.llc_sem
        assert row["converged"] == r.converged and row["reasons"] == "; ".join(r.convergence_reasons)
        assert row["rhat"] == r.diagnostics["rhat"] and row["num_draws"] == r.num_draws
    fig = slt.plot_llc_curve(res)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("training step (from the checkpoint files' names)")
    hollow = sum(len(line.get_xdata()) for line in ax.get_lines() if line.get_markerfacecolor() == "none")
    assert hollow == int((~frame["converged"]).sum())
    xs = sorted({float(x) for line in ax.get_lines() for x in line.get_xdata()})
    assert xs == [100.0, 250.0, 400.0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"restriction w0", "restriction all"}
    plt.close(fig)
    with pytest.raises(ValueError, match="x gives 2 values for 3 checkpoints"):
        slt.plot_llc_curve(res, x=[1, 2])
    one = slt.estimate_llc(m, (X, Y), F.mse_loss, **kw)
    assert len(slt.results_frame(one)) == 1 and slt.results_frame(one)["llc_mean"][0] == one.llc_mean
    plt.close(slt.plot_llc_curve(one))
    with pytest.raises(TypeError, match="results_frame takes what slt.estimate_llc returns"):
        slt.results_frame([1.0])


def test_calibrate_says_when_its_best_step_was_compared_with_unsettled_runs(monkeypatch):
    """Smaller steps mix less in the same draws, so the grid's small-ε points are often unsettled (helper 35:
    R-hat 1.62 and 1.45 below a converged 2ε̂), and their large s.e. makes "stable" pass with little power.
    The recommendation stands, and a warning names the rows (stubbed runs: λ̂ 3 everywhere, the small step's
    chains disagreeing)."""
    import importlib

    from slt.result import LLCResult

    cal_mod = importlib.import_module("slt.calibrate")  # (the package's attribute of that name is the function)

    C, T = 4, 400
    g = torch.Generator().manual_seed(0)

    def fake(model, data, loss_fn, *, step_size, nbeta=None, **kw):
        spread = 0.3 if step_size < 1e-3 else 0.0  # the small step's chains sit apart: R-hat ≫ 1.1
        loss = 0.3 + spread * torch.randn(C, 1, generator=g) + 0.02 * torch.randn(C, T, generator=g)
        return LLCResult.from_traces(loss.double(), torch.zeros(C, T, dtype=torch.float64), nbeta=10.0, init_loss=0.0,
                                     step_size=step_size, localization=1.0, sampler="sgld",
                                     config={"num_burnin": 50, "num_draws": T, "step_size": step_size})

    monkeypatch.setattr(cal_mod, "estimate_llc", fake)
    with pytest.warns(RuntimeWarning, match=r"best_step_size 0.002 was judged stable against 1 grid point\(s\) at or "
                                            r"below it that had not converged \(R-hat up to"):
        cal = slt.calibrate(None, None, None, step_sizes=[1e-4, 2e-3], nbeta=10.0, num_chains=C, num_draws=T)
    f = cal.frame.set_index("step_size")
    assert cal.best_step_size == 2e-3 and not f.loc[1e-4, "converged"] and f.loc[2e-3, "converged"]
    assert f.loc[1e-4, "rhat"] > 1.1
