"""The continued ε/2 check of :func:`slt.estimate_llc` (``check_halving``; :func:`slt.engine._continued_halving`).

Oracle: on a linear regression at full batch the localized potential is Gaussian, U = ½(w − w*)ᵀK(w − w*) with
K = 2nβ·XᵀX/n + γI, and SGLD (w ← w − ε/2·∇U + √ε ξ) is an exact AR(1) in each eigendirection of K, with
stationary variance 1/(κ(1 − εκ/4)) — so λ̂ at ε and at ε/2 are known in closed form:
E[nβ(L − L*)] = Σᵢ ½(κᵢ − γ)/(κᵢ(1 − εκᵢ/4)).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slt

D, N, NBETA, GAMMA = 4, 200, 50.0, 1.0


def regression():
    """A linear model at its least-squares solution, with XᵀX/n = I (so K = (2nβ + γ)I)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(N, D, generator=g, dtype=torch.float64))
    X = q * N ** 0.5
    y = X @ torch.randn(D, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(N, 1, generator=g,
                                                                                      dtype=torch.float64)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y).solution.T)
    return model, (X, y)


def ula_llc(eps: float) -> float:
    kappa = 2 * NBETA + GAMMA
    return D * 0.5 * (kappa - GAMMA) / (kappa * (1 - eps * kappa / 4))


def run(eps, **kw):
    model, data = regression()
    kw = {"num_chains": 8, "num_draws": 2000, "batch_size": None, "nbeta": NBETA, "localization": GAMMA,
          "dtype": torch.float64, "progress": False, "step_size": eps, **kw}
    with pytest.warns(RuntimeWarning) if eps is not None and eps * (2 * NBETA + GAMMA) > 0.5 else _nothing():
        return slt.estimate_llc(model, data, nn.MSELoss(), **kw)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_continued_check_reads_the_discretisation_law_and_flags_it():
    eps = 1.0 / (2 * NBETA + GAMMA)  # εκ = 1: λ̂ 33% above its ε → 0 value, 14% at ε/2
    res = run(eps, check_halving=True)
    check = res.diagnostics["halving_direct"]
    assert check is not None and res.config["halving_check"]["burnin"] == 500
    # both estimates are SGLD's exact stationary means, within 4 s.e. of the chains
    assert abs(res.llc_mean - ula_llc(eps)) < 4 * res.llc_sem, (res.llc_mean, ula_llc(eps), res.llc_sem)
    assert abs(check["llc_at_half_step"] - ula_llc(eps / 2)) < 4 * check["llc_at_half_step_sem"], (
        check, ula_llc(eps / 2))
    # a 14% fall, z far beyond the threshold: not converged, and the message names the bias and the fix
    assert check["z"] > 5
    assert not res.converged
    (msg,) = [r for r in res.convergence_reasons if r.startswith("λ̂ is not stable when ε halves: the chains continued")]
    assert "discretisation bias" in msg and f"step_size={eps / 2:.3g}" in msg
    # the first-order extrapolation lands nearer the ε → 0 value than either estimate
    lam0 = D * 0.5 * 2 * NBETA / (2 * NBETA + GAMMA)
    assert abs(check["extrapolated"] - lam0) < abs(check["llc_at_half_step"] - lam0)
    assert "ε/2 check: the chains continued at ε/2" in str(res)
    summary = res.summary()
    assert summary["llc_half_step"] == check["llc_at_half_step"] and summary["llc_extrapolated"] == check["extrapolated"]


def test_small_step_is_stable_and_not_flagged():
    eps = 0.04 / (2 * NBETA + GAMMA)  # εκ = 0.04: the bias is 1%, the shift at ε/2 0.5%, under the 2% rule
    res = run(eps, check_halving=True, num_draws=1000)
    check = res.diagnostics["halving_direct"]
    assert check is not None and "message" not in check  # (the message, if any, is among the reasons)
    assert not any("continued at ε/2" in r for r in res.convergence_reasons)
    assert abs(check["llc_at_half_step"] - ula_llc(eps / 2)) < 4 * check["llc_at_half_step_sem"]


def test_automatic_rule_runs_only_when_cheap_beside_the_run():
    # the default short run (burn-in a quarter of the draws): the check would double it, so it is skipped and says so
    res = run(None, num_draws=200)
    assert "skipped" in res.config["halving_check"] and res.diagnostics["halving_direct"] is None
    # a long burn-in beside the draws: the check's 250 steps are under half of the run's, so it runs
    res = run(None, num_draws=200, num_burnin=1000)
    assert res.config["halving_check"]["draw_steps"] == 200 and res.diagnostics["halving_direct"] is not None
    # a given step is the caller's: only check_halving=True checks it
    assert "given" in run(1e-3, num_draws=200, num_burnin=1000).config["halving_check"]["skipped"]
    assert run(1e-3, num_draws=200, num_burnin=1000, check_halving=False).config["halving_check"] is None
    # other samplers (a fallback is checked by a direct run instead), or too few chains for a paired z: says so
    res = run(1e-3, num_draws=200, sampler="sghmc", check_halving=True)
    assert "sghmc's" in res.config["halving_check"]["skipped"] and "ε/2 check: not run" in str(res)
    assert "3 chains" in run(1e-3, num_draws=200, num_chains=2, check_halving=True).config["halving_check"]["skipped"]


def test_the_check_is_as_long_as_the_draws_as_run_and_judges_only_settled_runs():
    # draws extended (R-hat > 1.1 at 100 draws of slowly mixing chains, εκ = 0.04): the check's draws follow the
    # run's draws as run (100 → 400 draws, 2 steps apart), not the 100 asked for
    eps = 0.04 / (2 * NBETA + GAMMA)
    res = run(eps, num_draws=100, num_burnin=2000, num_steps_bw_draws=2, check_halving=True)
    assert res.num_draws > 100 and res.config["draw_extensions"]
    assert res.config["halving_check"]["draw_steps"] == 2 * res.num_draws
    assert res.config["halving_check"]["burnin"] == 2 * res.num_draws // 4
    # a run whose own checks fail (no burn-in: λ̂ still rising from w*) is not judged again by the continued check
    res = run(eps, num_draws=100, num_burnin=0, check_halving=True, extend_draws=False)
    assert not res.converged and res.config["halving_check"] == {
        "skipped": "the run has not settled (its findings come first)"}


def test_each_checkpoint_is_checked_on_its_own():
    model, data = regression()
    other = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        other.weight.copy_(model.weight)
    eps = 1.0 / (2 * NBETA + GAMMA)
    with pytest.warns(RuntimeWarning):
        res = slt.estimate_llc([model, other], data, nn.MSELoss(), num_chains=4, num_draws=500, batch_size=None,
                               nbeta=NBETA, localization=GAMMA, dtype=torch.float64, progress=False, step_size=eps,
                               check_halving=True, seed=[1, 2])
    checks = [r.diagnostics["halving_direct"] for r in res]
    assert all(c is not None for c in checks) and checks[0]["llc"] != checks[1]["llc"]
    assert all(abs(c["llc"] - r.llc_mean) < 1e-9 * abs(r.llc_mean) for c, r in zip(checks, res))


def test_the_readme_regression_that_read_converged_at_a_biased_step_is_flagged():
    """The 2-parameter regression of ``slt.calibrate``'s test (float32, λ = 1, κ ≈ 400): at ε = 3.5e-3
    (εκ ≈ 1.4) λ̂ is +50% while the checks read off the run's trace pass (only the acceptance of a given
    step, 0.83, flags it); continued at ε/2 its chains read about +20%, and the check names the bias."""
    from test_plotting_calibrate import _problem

    m, X, Y = _problem()
    kw = dict(nbeta=200.0, num_draws=1000, num_chains=8, batch_size=None, localization=1.0, num_burnin=200,
              progress=False, step_size=3.5e-3)
    with pytest.warns(RuntimeWarning, match="MALA acceptance"):
        plain = slt.estimate_llc(m, (X, Y), nn.functional.mse_loss, **kw)
    assert plain.diagnostics["halving_direct"] is None and "given" in plain.config["halving_check"]["skipped"]
    with pytest.warns(RuntimeWarning) as found:
        res = slt.estimate_llc(m, (X, Y), nn.functional.mse_loss, check_halving=True, **kw)
    assert any("continued at ε/2" in str(w.message) for w in found)
    check = res.diagnostics["halving_direct"]
    assert res.llc_mean > 1.3 and check["llc_at_half_step"] < res.llc_mean - 0.15 and check["z"] > 5
    assert any("discretisation bias" in r for r in res.convergence_reasons)
    # the given step's acceptance finding points at the check that ran instead of asking for it
    (mala,) = [r for r in res.convergence_reasons if r.startswith("MALA acceptance")]
    assert "continued ε/2 check (check_halving) read" in mala and "with the same number of steps" not in mala
