"""λ̂ stable when ε halves, read off the run's own trace; and draws whose losses are not biased by
the MALA diagnostic.

Exact tests: the window of :func:`slt.diagnostics.halved_step_estimate` (time τ = Σ ε, adaptation
steps at their own ε, skipped steps), the finding and ``converged = False`` it gives through
:meth:`slt.LLCResult.from_traces`, and that the draws on minibatches are the same with and without the
MALA diagnostic (a reused batch, whose loss is taken on the batch that just moved the chain, biased
λ̂ low: 2.60 instead of 7.58 on the regression below with MALA every 2 steps)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt.diagnostics import halved_step_estimate
from slt.result import LLCResult

F64 = torch.float64


def test_the_halved_step_window_is_the_first_half_of_the_runs_time():
    """Steps t = 0 … 49 at ε = 0.5 with values t: a run at ε/2 with B = 10, N = 50 draws over
    τ ∈ [2.5, 12.5), i.e. steps 5 … 24 here, whose mean is 14.5."""
    C, S = 2, 50
    values = torch.arange(S, dtype=F64).expand(C, S)
    times = 0.5 * torch.arange(S, dtype=F64).expand(C, S)
    out = halved_step_estimate(values, times, torch.full((C,), 0.5), num_burnin=10, num_steps=50)
    assert torch.equal(out, torch.full((C,), 14.5, dtype=F64))
    # the first 10 steps at twice the step (an adaptation phase): times 0, 1, …, 10 then + 0.5 per step,
    # so the window [2.5, 12.5) holds steps 3 … 9 (times 3 … 9) and 10 … 14 (times 10 … 12): mean 8.5
    eps = torch.cat([torch.full((10,), 1.0), torch.full((S - 10,), 0.5)]).double()
    times = torch.cat([torch.zeros(1, dtype=F64), eps.cumsum(0)[:-1]]).expand(C, S)
    out = halved_step_estimate(values, times, torch.full((C,), 0.5), num_burnin=10, num_steps=50)
    assert torch.equal(out, torch.full((C,), sum(range(3, 15)) / 12, dtype=F64))
    # NaN marks steps to leave out (reused batches); under 8 usable steps in the window: NaN
    holes = values.clone()
    holes[:, 3:6] = float("nan")
    out = halved_step_estimate(holes, times, torch.full((C,), 0.5), num_burnin=10, num_steps=50)
    assert torch.equal(out, torch.full((C,), sum(range(6, 15)) / 9, dtype=F64))
    holes[:, 3:9] = float("nan")
    assert bool(halved_step_estimate(holes, times, torch.full((C,), 0.5), 10, 50).isnan().all())


def _result(halved: torch.Tensor | None, C: int = 8, T: int = 200) -> LLCResult:
    g = torch.Generator().manual_seed(0)
    loss = 1.0 + 0.05 * torch.randn(C, T, generator=g, dtype=F64)  # settled draws: λ̂ = 10 (nβ = 10)
    return LLCResult.from_traces(loss, torch.zeros(C, T, dtype=F64), nbeta=10.0, init_loss=0.0, step_size=1e-3,
                                 localization=1.0, sampler="sgld", halved=halved,
                                 config={"num_burnin": 50, "num_draws": T})


def test_a_run_that_relaxed_only_in_its_second_half_is_not_converged():
    """Draws flat at λ̂ = 10 (no drift within them), but the first half of the run's time averaged 6:
    at ε/2 with the same steps λ̂ would be about 6, so the result is not converged and says why;
    the same draws with a halved estimate equal to λ̂ (or none) pass."""
    C = 8
    off = torch.linspace(-0.05, 0.05, C, dtype=F64)
    bad = _result(6.0 + off)
    assert not bad.converged
    msg = next(r for r in bad.convergence_reasons if "not stable when ε halves" in r)
    assert "λ̂ was 6 against 10" in msg and "num_burnin" in msg
    assert bad.diagnostics["halving"]["llc_at_half_step"] == pytest.approx(6.0)
    good = _result(bad.llc_per_chain.clone() + off)
    assert good.converged, good.convergence_reasons
    assert _result(None).converged and _result(None).diagnostics["halving"] is None
    # one-sided: a higher value in the first half (an adaptation phase at larger steps) is not flagged
    assert _result(bad.llc_per_chain.clone() + 4.0 + off).converged


def _regression(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    Y = X @ torch.tensor([[1.0], [-0.5], [0.2]], dtype=F64) + torch.randn(n, 1, generator=g, dtype=F64)
    m = nn.Linear(3, 1).to(F64)
    with torch.no_grad():  # w* = the least-squares minimum
        sol = torch.linalg.lstsq(torch.cat([X, torch.ones(n, 1, dtype=F64)], 1), Y).solution
        m.weight.copy_(sol[:3].T)
        m.bias.copy_(sol[3])
    return m, X, Y


def test_the_mala_diagnostic_does_not_change_the_draws_on_minibatches():
    """The draws with MALA every 2 steps equal those without it, bit for bit: no batch is reused, so
    no draw's loss is taken on the batch that just moved its chain.  Reusing (the sampler option)
    changes them and biases λ̂ low by far more than its standard error (that is what this guards)."""
    m, X, Y = _regression()
    kw = dict(num_chains=8, num_draws=1000, num_burnin=200, step_size=1e-3, localization=1.0, batch_size=32,
              dtype=F64, seed=0, progress=False)
    plain = slt.estimate_llc(m, (X, Y), F.mse_loss, mala_every=0, **kw)
    mala = slt.estimate_llc(m, (X, Y), F.mse_loss, mala_every=2, **kw)
    assert torch.equal(plain.llc_trace, mala.llc_trace)
    assert 0.5 < mala.diagnostics["mala_acceptance"] <= 1.0
    reused = slt.estimate_llc(m, (X, Y), F.mse_loss, mala_every=2, sampler_kwargs={"reuse_batch": True}, **kw)
    gap = plain.llc_mean - reused.llc_mean
    assert gap > 6 * math.hypot(plain.llc_sem, reused.llc_sem), (plain.llc_mean, reused.llc_mean)


def test_the_change_rule_needs_both_a_material_and_a_significant_change():
    """:func:`slt.diagnostics.changed`, shared by the drift, ε/2 and calibrate checks: more than 2% of
    λ̂ *and* z beyond Student's t (df = C − 1) at a normal 3σ (4.53 for 8 chains, 9.22 for 4)."""
    from slt.diagnostics import changed, t_threshold

    thr8 = t_threshold(3.0, 7)
    assert 4.4 < thr8 < 4.7
    assert changed(0.5, thr8 + 0.01, 10.0, 8)          # 5% and significant
    assert not changed(0.5, thr8 - 0.01, 10.0, 8)      # 5% but within t at 3σ
    assert not changed(0.19, 100.0, 10.0, 8)           # significant but within 2%
    assert not changed(0.5, 6.0, 10.0, 4)              # 4 chains: t at 3σ is 9.22
    assert changed(0.5, float("inf"), -10.0, 8)        # no spread; |λ̂| sets the scale
    assert not changed(-0.5, -6.0, 10.0, 8)            # one-sided: a fall is not a rise
    assert not changed(float("nan"), 6.0, 10.0, 8) and not changed(0.5, float("nan"), 10.0, 8)


def test_the_interval_uses_students_t_with_one_degree_of_freedom_fewer_than_the_chains():
    """λ̂'s s.e. comes from a few chain means: with C chains the 95% interval is λ̂ ± t_{C−1}·s.e. (tables:
    t₃ = 3.182, t₇ = 2.365 at 97.5%, to the tables' 4 digits), not ± 1.96 s.e.; print(result) shows it."""
    for C, t in ((4, 3.182), (8, 2.365)):
        r = _result(None, C=C)
        lo, hi = r.llc_interval()
        assert (hi - lo) / 2 == pytest.approx(t * r.llc_sem, abs=5e-4 * r.llc_sem)
        assert (lo + hi) / 2 == pytest.approx(r.llc_mean, rel=1e-12)
        assert f"95% interval {lo:.4g}–{hi:.4g}" in str(r)
    assert r.llc_interval(0.5)[1] - r.llc_mean < r.llc_sem  # t₇ at 75%: 0.711
    with pytest.raises(ValueError, match="level"):
        r.llc_interval(1.0)
    one = _result(None, C=1)
    assert all(math.isnan(v) for v in one.llc_interval()) and "95% interval" not in str(one)
