"""Extending the draws of a run whose chains are stationary but not yet mixed (``extend_draws``).

Exact tier: the continuation is the same chains carried on from where they stopped (bit for bit the
draws of one longer run on the full batch), the budget and the cap hold, and the decision reads the
findings: R-hat above 1.1 or too few effective draws as the only ones extend, any other (λ̂ still rising)
does not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
import slt.engine as engine
from slt.training import train
from slt.loop import Trace

F64 = torch.float64


def _problem(n=200):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    Y = X @ torch.tensor([[1.0], [-1.0], [0.5]], dtype=F64) + 0.3 * torch.randn(n, 1, generator=g, dtype=F64)
    m = nn.Linear(3, 1, bias=False).to(F64)
    with torch.no_grad():
        m.weight.copy_(torch.linalg.lstsq(X, Y).solution.T)
    return m, X, Y


KW = dict(num_chains=4, num_burnin=50, step_size=1e-3, nbeta=50.0, localization=1.0, batch_size=None, dtype=F64,
          seed=3, progress=False)


def test_an_extension_continues_the_same_chains(monkeypatch):
    m, X, Y = _problem()
    monkeypatch.setattr(engine, "_unmixed", lambda *a, **k: 1.5)  # as if R-hat stayed 1.5 whatever the draws
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, num_draws=100, **KW)
    # budget: the extension adds at most the run's own steps (50 burn-in + 100 draws): 100 -> 200 -> 250
    assert r.loss_trace.shape == (4, 250) and r.config["num_draws"] == 250 and r.config["num_draws_requested"] == 100
    assert [(e["from"], e["to"]) for e in r.config["draw_extensions"]] == [(100, 200), (200, 250)]
    assert "draws extended 100 → 200" in str(r)
    longer = slt.estimate_llc(m, (X, Y), F.mse_loss, num_draws=250, extend_draws=False, **KW)
    assert torch.equal(r.loss_trace, longer.loss_trace)  # the same chains and streams, carried on
    assert r.llc_mean == longer.llc_mean
    capped = slt.estimate_llc(m, (X, Y), F.mse_loss, num_draws=100, extend_draws=150, **KW)
    assert capped.loss_trace.shape == (4, 150) and torch.equal(capped.loss_trace, r.loss_trace[:, :150])
    off = slt.estimate_llc(m, (X, Y), F.mse_loss, num_draws=100, extend_draws=False, **KW)
    assert off.loss_trace.shape == (4, 100) and off.config["draw_extensions"] == []
    short = slt.estimate_llc(m, (X, Y), F.mse_loss, num_draws=99, **KW)  # below 100 draws: never extended
    assert short.loss_trace.shape == (4, 99)


def test_an_observable_and_the_thinning_follow_the_extension(monkeypatch):
    m, X, Y = _problem()
    monkeypatch.setattr(engine, "_unmixed", lambda *a, **k: 1.5)
    obs = {"w0": lambda p: p["weight"][:, 0, 0]}
    kw = {**KW, "num_steps_bw_draws": 3}
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, num_draws=100, observables=obs, **kw)
    # budget (50 + 300 steps) / 3 = 116 more draws: 100 -> 200 -> 216
    assert r.loss_trace.shape == (4, 216) and r.observables["w0"].shape[:2] == (4, 216)
    longer = slt.estimate_llc(m, (X, Y), F.mse_loss, num_draws=216, observables=obs, extend_draws=False, **kw)
    assert torch.equal(r.observables["w0"], longer.observables["w0"])


def test_bad_extend_draws_is_named():
    m, X, Y = _problem()
    with pytest.raises((TypeError, ValueError), match="extend_draws"):
        slt.estimate_llc(m, (X, Y), F.mse_loss, num_draws=100, extend_draws=2.5, **KW)


def _trace(values: torch.Tensor, burn: int = 50) -> Trace:
    R, T = values.shape
    star = torch.zeros_like(values)
    burnin = values[:, :1].expand(R, burn).clone()
    return Trace(values, star, burnin, torch.zeros_like(burnin), {}, None, 0, torch.zeros(R, dtype=torch.bool),
                 torch.full((R,), -1), burn + torch.arange(T), 0.0)


@pytest.mark.parametrize("shape, extends", [("offsets", True), ("rising", False), ("mixed", False),
                                            ("barely_moved", False)])
def test_only_unmixed_stationary_chains_are_extended(shape, extends):
    """Synthetic traces of nβ(L − L*) (nβ = 1), 4 chains × 400 draws of unit noise: chains whose levels
    differ by 3 (R-hat ≈ 2, no drift) are unmixed and stationary; a trend of 4 over the draws is λ̂
    still rising (its own finding: more draws of a run still relaxing would not settle it); chains
    that agree are settled; chains whose MALA acceptance reads 1 and whose λ̂ rises have barely moved
    (the step is too small: more draws at it are no cure)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 400, generator=g, dtype=F64)
    level = 20.0 + noise
    if shape == "offsets":
        level = level + torch.tensor([[0.0], [0.0], [3.0], [3.0]], dtype=F64)
    elif shape == "rising":
        level = level + torch.linspace(0, 4, 400, dtype=F64)
    elif shape == "barely_moved":
        level = level + torch.tensor([[0.0], [0.0], [3.0], [3.0]], dtype=F64) + torch.linspace(0, 4, 400, dtype=F64)
    target = type("T", (), {"nbeta": 1.0})()
    trace = _trace(level)
    if shape == "barely_moved":
        trace.mala_sum, trace.mala_count = torch.full((4,), 400.0, dtype=F64), 400
    run = {"trace": trace, "eps": 1e-3, "num_burnin": 50, "num_steps": 450, "diffusion": None}
    worst = engine._unmixed(run, target, 1, 4, 1)
    assert (worst is not None) == extends
    if extends:
        assert worst > 1.1



def _ar1(phi, C=4, T=400, seed=0):
    """``(C, T)`` stationary AR(1) traces around 20 with unit marginal variance: autocorrelation time
    (1 + φ)/(1 − φ), so the effective sample size is about C·T·(1 − φ)/(1 + φ)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(C, T, generator=g, dtype=F64) * (1 - phi ** 2) ** 0.5
    x = torch.empty(C, T, dtype=F64)
    x[:, 0] = torch.randn(C, generator=g, dtype=F64)
    for t in range(1, T):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    return 20.0 + x


def test_fewer_than_four_draws_per_chain_is_a_finding():
    """With num_draws=1 the default burn-in is 0 and the one draw is w* itself: λ̂ read 0 ± 0 and
    ``converged`` was True, since R-hat and the ESS are undefined (NaN) below 4 draws and NaN passed every
    threshold.  Now too few draws are a finding, and the precision check does not divide by λ̂ = 0."""
    from slt.result import equilibrium_checks

    g = torch.Generator().manual_seed(0)
    for T in (1, 3):
        _, _, found = equilibrium_checks(torch.randn(8, T, generator=g))
        assert [k for k, m in found if m.startswith(f"{T} draw")] == ["ess"]
    _, _, found = equilibrium_checks(torch.randn(8, 400, generator=g))
    assert not found
    X = torch.randn(300, 2, generator=g)
    Y = X @ torch.tensor([[1.0], [-1.0]]) + 0.3 * torch.randn(300, 1, generator=g)
    m = nn.Linear(2, 1)
    train(m, (X, Y), F.mse_loss, steps=200)
    with pytest.warns(RuntimeWarning, match="1 draw per chain"):
        r = slt.estimate_llc(m, (X, Y), F.mse_loss, num_draws=1, seed=0)
    assert r.converged is False and r.llc_mean == 0.0


@pytest.mark.parametrize("phi, short", [(0.0, False), (0.95, True)])
def test_too_few_effective_draws_is_a_finding_that_extends_the_run(phi, short):
    """Stationary chains that agree (R-hat near 1) but whose draws are strongly correlated (AR(1) with
    φ = 0.95: about 1600 · 0.05/1.95 ≈ 41 effective draws of 1600, under ESS_MIN = 100 by more than the
    estimate's spread) are a finding ``"ess"``, which more draws cure, so the run is extended;
    independent draws (≈ 1600 effective) are none.  Before the ESS floor such a run counted as converged
    on R-hat alone."""
    from slt.defaults import ESS_MIN
    from slt.result import equilibrium_checks

    level = _ar1(phi)
    r, _, found = equilibrium_checks(level)
    kinds = {kind for kind, _ in found}
    assert ("ess" in kinds) == short
    assert kinds <= {"ess", "rhat"}  # no drift: stationary by construction
    e = slt.diagnostics.ess(level)
    assert (e < ESS_MIN) == short and (e > 1000 or short)
    target = type("T", (), {"nbeta": 1.0})()
    run = {"trace": _trace(level), "eps": 1e-3, "num_burnin": 50, "num_steps": 450, "diffusion": None}
    assert (engine._unmixed(run, target, 1, 4, 1) is not None) == short
    res = slt.LLCResult.from_traces(level, torch.zeros_like(level), nbeta=1.0, init_loss=0.0, step_size=1e-3,
                                    localization=1.0, sampler="sgld")
    assert any("effective sample size" in m for m in res.convergence_reasons) == short
    if "rhat" not in kinds:
        assert res.converged == (not short)
