"""The automatic localization (``localization=None``): γ = 1, raised tenfold while the chains have not
settled (R-hat > 1.1 or λ̂ still rising), at most ``LOCALIZATION_STEPS`` times and never above nβ.

Exact tests force the verdict (``slt.engine._unsettled`` replaced) and compare against the explicit
call at the final γ bit for bit; the statistical test runs every default on a trained MLP and
checks the definition of converged the library uses: R-hat ≤ 1.1, no flagged drift, and λ̂ stable
within 4 combined standard errors when ε is halved at the same number of steps.  Fixed seeds."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
import slt.engine as engine
from slt.defaults import LOCALIZATION, LOCALIZATION_STEPS
from slt.target import prepare_target

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")


def _regression(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    Y = X @ torch.tensor([[1.0], [-0.5], [0.2]], dtype=F64) + 0.1 * torch.randn(n, 1, generator=g, dtype=F64)
    m = nn.Linear(3, 1).to(F64)
    with torch.no_grad():  # w* = the least-squares minimum
        A = torch.cat([X, torch.ones(n, 1, dtype=F64)], 1)
        sol = torch.linalg.lstsq(A, Y).solution
        m.weight.copy_(sol[:3].T)
        m.bias.copy_(sol[3])
    return m, X, Y


KW = dict(num_chains=4, num_draws=100, batch_size=None, dtype=F64, seed=3, progress=False)


@pytest.mark.parametrize("nbeta, given, levels", [
    (1000.0, None, [1.0, 10.0, 100.0, 1000.0]),
    (1e6, None, [10.0 ** k for k in range(LOCALIZATION_STEPS + 1)]),
    (50.0, None, [1.0, 10.0]),
    (5.0, None, [1.0]),
    (1000.0, 3.0, [3.0]),
])
def test_localization_levels(nbeta, given, levels):
    m, X, Y = _regression()
    target = prepare_target(m, (X, Y), F.mse_loss, nbeta=nbeta, localization=given, dtype=F64)
    assert target.localization_auto is (given is None)
    assert engine.localization_levels(target) == levels
    assert levels[0] == (LOCALIZATION if given is None else given)


def _first_level_unsettled(monkeypatch, unmixed: bool = False) -> list:
    """Make the engine's verdict "not settled" at the first level only; returns the list of calls.  The
    finding is one more draws do not cure (chains not relaxed), unless ``unmixed``."""
    calls = []

    def verdict(trace, nbeta, G, C, halved=None, **kw):
        calls.append(1)
        return {0: ["R-hat 9.99 > 1.1: forced"]} if len(calls) == 1 else {}

    monkeypatch.setattr(engine, "_unsettled", verdict)
    monkeypatch.setattr(engine, "_only_unmixed", lambda *a, **k: unmixed)
    return calls


@pytest.mark.parametrize("unsettled_group", [0, 1])
def test_a_checkpoint_that_is_not_a_minimum_does_not_raise_the_curves_localization(monkeypatch, unsettled_group):
    """One γ serves a curve; an untrained checkpoint (its draws mostly below L(w*)) raised it 1 → 10 for every
    checkpoint, and each printout gave that checkpoint's reason as its own (a trained checkpoint read 9.83 at
    γ = 10 against 17.02 alone).  Now a group whose w* is not a minimum does not drive the escalation; a group
    that is drives it, and print(result) names it."""
    m, X, Y = _regression()
    off = nn.Linear(3, 1).to(F64)
    with torch.no_grad():
        off.weight.fill_(3.0)  # far from the minimum: its chains slide below L(w*)
    monkeypatch.setattr(engine, "_unsettled", lambda trace, nbeta, G, C, halved=None, **kw:
                        {unsettled_group: ["chains still diffuse freely: forced"]})
    monkeypatch.setattr(engine, "_only_unmixed", lambda *a, **k: False)
    res = slt.estimate_llc([off, m], (X, Y), F.mse_loss, nbeta=200.0, **{**KW, "sampler": "sgld"})
    if unsettled_group == 0:
        assert [r.localization for r in res] == [LOCALIZATION] * 2
        assert res[1].config["localization_escalations"] == []
    else:
        assert res[0].localization == res[1].localization > LOCALIZATION
        assert "localization raised 1 → 10 → 100 (chains unsettled at 10 (checkpoint 1): chains still diffuse " \
               "freely)" in str(res[1])


def test_chains_that_only_need_more_draws_are_extended_at_their_localization(monkeypatch):
    """R-hat just above 1.1 with few effective draws is what more draws cure: the run is continued at its
    γ rather than repeated at 10 γ, which biases λ̂ low where γ rivals the curvature (a linear regression
    with a learnable output scale, λ = 5: R-hat 1.102 at ESS 39 raised γ 1 → 10 → 100 = 0.7 nβ and λ̂
    came out 3.10 ± 0.13, converged; now it stays at γ = 1, λ̂ 5.24 ± 0.35, NUTS 4.83 ± 0.15)."""
    m, X, Y = _regression()
    calls = _first_level_unsettled(monkeypatch, unmixed=True)
    unmixed = []  # unmixed once: one doubling of the draws
    monkeypatch.setattr(engine, "_unmixed", lambda *a, **k: None if unmixed.append(1) or len(unmixed) > 1 else 9.99)
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, nbeta=200.0, **KW)
    assert r.localization == LOCALIZATION and r.config["localization_escalations"] == []
    assert [e["to"] for e in r.config["draw_extensions"]] == [2 * KW["num_draws"]]
    assert r.llc_trace.shape[1] == 2 * KW["num_draws"] and len(calls) == 2
    # the same run as the explicit call at that γ with twice the draws, up to the extension's continuation
    # (its burn-in is the first call's: the extension adds draws, not steps before them)
    assert r.config["num_burnin"] == slt.estimate_llc(m, (X, Y), F.mse_loss, nbeta=200.0, localization=1.0,
                                                     **{**KW, "extend_draws": False}).config["num_burnin"]


def test_chains_still_unmixed_after_more_draws_are_escalated_with_their_extension_recorded(monkeypatch):
    m, X, Y = _regression()
    calls = []

    def verdict(trace, nbeta, G, C, halved=None, **kw):
        calls.append(1)
        return {0: ["R-hat 9.99 > 1.1: forced"]} if len(calls) <= 2 else {}

    monkeypatch.setattr(engine, "_unsettled", verdict)
    monkeypatch.setattr(engine, "_only_unmixed", lambda *a, **k: True)
    unmixed = []  # unmixed once: one doubling of the draws
    monkeypatch.setattr(engine, "_unmixed", lambda *a, **k: None if unmixed.append(1) or len(unmixed) > 1 else 9.99)
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, nbeta=200.0, **KW)
    esc = r.config["localization_escalations"]
    assert r.localization == 10.0 and [e["localization"] for e in esc] == [1.0]
    assert [e["to"] for e in esc[0]["draw_extensions"]] == [2 * KW["num_draws"]]
    assert r.config["draw_extensions"] == [] and r.llc_trace.shape[1] == KW["num_draws"]


def test_an_unsettled_run_is_repeated_at_ten_times_the_localization_and_equals_the_explicit_call(monkeypatch):
    m, X, Y = _regression()
    calls = _first_level_unsettled(monkeypatch)
    auto = slt.estimate_llc(m, (X, Y), F.mse_loss, nbeta=200.0, **KW)
    # one verdict per level, and one more after the final level's draws were extended (too few effective
    # draws at 100: extend_draws continues the run, then judges it again)
    assert auto.localization == 10.0 and len(calls) == 2 + bool(auto.config["draw_extensions"])
    esc = auto.config["localization_escalations"]
    assert [e["localization"] for e in esc] == [1.0] and "forced" in esc[0]["reasons"][0]
    assert auto.config["localization_auto"] is True and auto.converged, auto.convergence_reasons
    # print(result) says γ was raised and why: λ̂ at γ = 10 is not comparable with a run that settled at 1
    assert ("localization raised 1 → 10 (chains unsettled at 1: R-hat 9.99 > 1.1); λ̂ depends on γ, so compare it "
            "with runs at the same γ (pass localization=10 to fix it)") in str(auto)
    explicit = slt.estimate_llc(m, (X, Y), F.mse_loss, nbeta=200.0, localization=10.0, **KW)
    assert "localization raised" not in str(explicit)
    assert torch.equal(auto.llc_trace, explicit.llc_trace)  # fresh streams: the same run, bit for bit
    assert auto.step_size == explicit.step_size
    assert explicit.config["localization_auto"] is False and explicit.config["localization_escalations"] == []


def test_a_given_localization_is_never_raised_and_the_limit_is_named(monkeypatch):
    m, X, Y = _regression()
    monkeypatch.setattr(engine, "_unsettled", lambda trace, nbeta, G, C, halved=None, **kw: {0: ["forced"]})
    given = slt.estimate_llc(m, (X, Y), F.mse_loss, nbeta=200.0, localization=1.0, **KW)
    assert given.localization == 1.0 and given.config["localization_escalations"] == []
    # never settles: the ladder 1, 10, 100 (1000 > nβ = 200) runs out and the result says so
    auto = slt.estimate_llc(m, (X, Y), F.mse_loss, nbeta=200.0, **KW)
    assert auto.localization == 100.0
    assert [e["localization"] for e in auto.config["localization_escalations"]] == [1.0, 10.0]
    assert not auto.converged
    assert any("raised to γ = 100" in s and "larger localization" in s for s in auto.convergence_reasons)
    # the reason names the limit that ended the ladder: nβ here (1000 > 200), the number of raises at nβ = 5000
    assert any("γ = 1000, would exceed nβ = 200" in s for s in auto.convergence_reasons), auto.convergence_reasons
    many = slt.estimate_llc(m, (X, Y), F.mse_loss, nbeta=5000.0, **KW)
    assert many.localization == 1000.0
    assert any("raised to γ = 1000 (its limit: at most 3 tenfold raises)" in s for s in many.convergence_reasons), \
        many.convergence_reasons


def test_bif_statistics_come_from_the_final_level_only(monkeypatch):
    """bif accumulates online (``on_draw``): with an escalation its statistics must be those of the
    run at the final γ, i.e. equal to a direct call at that γ."""
    m, X, Y = _regression(n=40)
    _first_level_unsettled(monkeypatch)
    auto = slt.bif(m, (X, Y), F.mse_loss, nbeta=200.0, **KW)
    explicit = slt.bif(m, (X, Y), F.mse_loss, nbeta=200.0, localization=10.0, **KW)
    assert auto.llc.localization == 10.0
    assert torch.equal(auto.values, explicit.values)


def test_short_runs_are_not_escalated(monkeypatch):
    m, X, Y = _regression()
    monkeypatch.setattr(engine, "_unsettled", lambda trace, nbeta, G, C, halved=None, **kw: {0: ["forced"]})
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, nbeta=200.0, **{**KW, "num_draws": 99})
    assert r.localization == LOCALIZATION and r.config["localization_escalations"] == []


def test_a_toy_model_that_settles_at_gamma_one_is_not_escalated():
    m, X, Y = _regression()
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, num_chains=8, num_draws=400, batch_size=None, dtype=F64,
                         seed=0, progress=False)
    assert r.localization == LOCALIZATION and r.config["localization_escalations"] == [] and r.converged


def _trained_mlp(n=1024, width=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    Y = (X @ torch.randn(8, 3, generator=g) + 0.3 * torch.randn(n, 3, generator=g)).argmax(1)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(1500):  # to a loss of ~2e-5: w* is (numerically) a minimum
        opt.zero_grad()
        F.cross_entropy(m(X), Y).backward()
        opt.step()
    return m.eval(), X, Y


@pytest.mark.slow  # (163 s of the fast tier's 1182 s on 2026-12-08; two default runs of an 18k MLP)
def test_defaults_converge_on_a_trained_mlp():
    """An 18k-parameter MLP trained to interpolation, every sampling setting at its default.  At
    γ = 1 its near-flat directions keep the chains wandering (R-hat ≈ 1.9, λ̂ ≈ 190 and growing);
    the automatic γ settles, and the estimate then passes the library's definition of converged,
    including the halved-step check at the same number of steps (burn-in and draws)."""
    m, X, Y = _trained_mlp()
    r = slt.estimate_llc(m, (X, Y), F.cross_entropy, seed=0, progress=False)
    assert r.localization > LOCALIZATION and r.config["localization_escalations"]  # γ = 1 did not settle
    assert r.converged, r.convergence_reasons
    assert r.diagnostics["rhat"] <= 1.1 and r.divergent_chains == []
    assert r.config["num_burnin_rule"] == "relaxation"  # the burn-in covers RELAXATION_TIMES / (εγ)
    half = slt.estimate_llc(m, (X, Y), F.cross_entropy, seed=1, localization=r.localization,  # same steps
                            step_size=r.step_size / 2, num_burnin=r.config["num_burnin"], progress=False)
    assert half.converged, half.convergence_reasons
    z = (r.llc_mean - half.llc_mean) / math.hypot(r.llc_sem, half.llc_sem)
    assert abs(z) < 4, (r.llc_mean, r.llc_sem, half.llc_mean, half.llc_sem)


def test_a_rising_estimate_names_the_relaxation_time_it_needed():
    """Exact: the warning of a run whose λ̂ still rises says how many steps the localization needs
    (RELAXATION_TIMES / (εγ)) when the run had fewer, and nothing more when it had enough."""
    from slt.result import RELAXATION_TIMES, LLCResult, relaxation_hint

    assert relaxation_hint(2e-5, 100.0, {"num_burnin": 250, "num_draws": 1000}).endswith(
        f"this run had 1250 steps; num_burnin ≈ {RELAXATION_TIMES * 500} covers it)")
    assert relaxation_hint(2e-5, 100.0, {"num_burnin": 2000, "num_draws": 1000}) == ""
    # an adapted ε: the hint pins it (a given num_burnin would also lengthen the adaptation, changing ε)
    assert relaxation_hint(2e-5, 100.0, {"num_burnin": 250, "num_draws": 1000, "step_size_rule": "adapt"}).endswith(
        f"num_burnin ≈ {RELAXATION_TIMES * 500} with step_size=2e-05 (a num_burnin alone also lengthens the "
        "step-size adaptation, 4/5 of it, whose ε can come out smaller and need longer still) covers it)")
    assert relaxation_hint(2e-5, 100.0, None) == ""  # steps unknown
    C, T = 8, 200
    g = torch.Generator().manual_seed(0)
    rising = torch.linspace(0.0, 1.0, T).expand(C, T) + 0.01 * torch.rand(C, T, generator=g)  # (C, T) losses
    kw = dict(nbeta=10.0, init_loss=0.0, localization=100.0, sampler="sgld")
    short = LLCResult.from_traces(rising, torch.zeros(C, T), step_size=2e-5, config={"num_burnin": 50, "num_draws": T},
                                  **kw)
    msg = next(w for w in short.diagnostics["warnings"] if "still rising" in w)
    assert "1/(εγ) = 500 steps" in msg and "this run had 250 steps" in msg
    long = LLCResult.from_traces(rising, torch.zeros(C, T), step_size=2e-5, config={"num_burnin": 5000, "num_draws": T},
                                 **kw)
    assert not any("1/(εγ)" in w for w in long.diagnostics["warnings"])
    assert any("still rising" in w for w in long.diagnostics["warnings"])
    # a sampler with a step factor G in flat directions (RMSProp-SGLD: G = 1/a) relaxes G times faster
    hint = relaxation_hint(2e-5, 100.0, {"num_burnin": 10, "num_draws": 40, "relaxation_gain": 10.0})
    assert "G = 10" in hint and "= 50 steps" in hint and f"num_burnin ≈ {RELAXATION_TIMES * 50} covers it" in hint
    assert relaxation_hint(2e-5, 100.0, {"num_burnin": 250, "num_draws": 1000, "relaxation_gain": 10.0}) == ""


def test_the_default_burnin_covers_the_relaxation_the_localization_allows_when_affordable():
    """Exact: ``num_burnin=None`` is ``num_draws // 4``, lengthened to RELAXATION_TIMES / (εγ) steps
    when that is at most BURNIN_MAX_FACTOR times the draws' steps at γ ≤ 1 (the default γ), at most
    BURNIN_MAX_FACTOR_ESCALATED times above it, BURNIN_MAX_FACTOR_FINAL times above it at the last γ."""
    from slt.defaults import (BURNIN_MAX_FACTOR, BURNIN_MAX_FACTOR_ESCALATED, BURNIN_MAX_FACTOR_FINAL,
                              RELAXATION_TIMES, default_burnin)

    assert default_burnin(1000) == 250  # ε, γ unknown
    assert default_burnin(1000, 1, 2e-5, 100.0) == math.ceil(RELAXATION_TIMES / 2e-3)
    assert default_burnin(1000, 1, 1e-1, 100.0) == 250  # relaxes within the quarter
    assert default_burnin(1000, 1, 2e-5, 0.0) == 250  # γ = 0: nothing holds flat directions
    edge = RELAXATION_TIMES / (BURNIN_MAX_FACTOR * 1000 * 2)  # the εγ at which it costs the cap (thin 2)
    assert default_burnin(1000, 2, edge * 0.99, 1.0) == 250  # beyond the cap: the quarter
    assert default_burnin(1000, 2, edge * 1.01, 1.0) == math.ceil(RELAXATION_TIMES / (edge * 1.01))
    # above the default γ the cap is BURNIN_MAX_FACTOR_ESCALATED (the 26k MLP's γ = 100, ε = 8.5e-6: 5.9 × draws)
    assert BURNIN_MAX_FACTOR < 5.9 < BURNIN_MAX_FACTOR_ESCALATED
    assert default_burnin(1000, 1, 8.5e-6, 100.0) == math.ceil(RELAXATION_TIMES / 8.5e-4)
    high = RELAXATION_TIMES / (BURNIN_MAX_FACTOR_ESCALATED * 1000 * 2)  # the εγ at the escalated cap (thin 2)
    assert default_burnin(1000, 2, high * 1.01 / 10.0, 10.0) == math.ceil(RELAXATION_TIMES / (high * 1.01))
    assert default_burnin(1000, 2, high * 0.99 / 10.0, 10.0) == 250
    assert default_burnin(1000, 2, high * 1.01, 1.0) == 250  # at γ = 1 the same εγ is beyond its cap
    # a preconditioned sampler moving flat directions G times faster needs G times fewer steps, so more runs
    # get the relaxation burn-in: RMSProp-SGLD's G = 1/a = 10 at the 26k MLP's γ = 100 with ε = 8.5e-7
    assert default_burnin(1000, 1, 8.5e-7, 100.0) == 250  # SGLD: 58 824 steps, beyond the cap
    assert default_burnin(1000, 1, 8.5e-7, 100.0, relaxation_gain=10.0) == math.ceil(RELAXATION_TIMES / 8.5e-4)
    # at the last γ the run can use the cap is BURNIN_MAX_FACTOR_FINAL (the MNIST-sized MLP's γ = 1000,
    # ε = 1.63e-7: 5/(εγ) = 30 675 steps, 31 × its 1000 draws); γ ≤ 1 keeps BURNIN_MAX_FACTOR even there
    assert BURNIN_MAX_FACTOR_ESCALATED < 31 < BURNIN_MAX_FACTOR_FINAL
    assert default_burnin(1000, 1, 1.63e-7, 1000.0) == 250
    assert default_burnin(1000, 1, 1.63e-7, 1000.0, final=True) == math.ceil(RELAXATION_TIMES / 1.63e-4)
    final = RELAXATION_TIMES / (BURNIN_MAX_FACTOR_FINAL * 1000 * 2)  # the εγ at the final cap (thin 2)
    assert default_burnin(1000, 2, final * 1.01 / 10.0, 10.0, final=True) == math.ceil(RELAXATION_TIMES / (final * 1.01))
    assert default_burnin(1000, 2, final * 0.99 / 10.0, 10.0, final=True) == 250
    assert default_burnin(1000, 2, edge * 0.99, 1.0, final=True) == 250  # γ = 1: the cap of BURNIN_MAX_FACTOR


def test_the_engine_uses_and_records_the_default_burnin():
    """A given ε and γ with ``num_burnin=None``: the run's burn-in is :func:`default_burnin`'s (its
    burn-in trace that long, recorded with its rule); a given burn-in is kept as given."""
    from slt.defaults import default_burnin

    m, X, Y = _regression()
    kw = {**KW, "num_draws": 120, "step_size": 2e-3, "localization": 20.0, "extend_draws": False}  # draws as asked
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, **kw)
    want = default_burnin(120, 1, 2e-3, 20.0)
    assert want > 120 // 4 and r.config["num_burnin"] == want and r.config["num_burnin_rule"] == "relaxation"
    assert r.burnin_loss_trace.shape == (4, want) and r.llc_trace.shape == (4, 120)
    given = slt.estimate_llc(m, (X, Y), F.mse_loss, num_burnin=30, **kw)
    assert given.config["num_burnin"] == 30 and given.config["num_burnin_rule"] == "given"
    quick = slt.estimate_llc(m, (X, Y), F.mse_loss, **{**kw, "step_size": 0.02, "localization": 50.0})
    assert quick.config["num_burnin"] == 30 and quick.config["num_burnin_rule"] == "quarter"
    assert r.config["relaxation_gain"] == 1.0
    # RMSProp-SGLD (a = 0.1 by default, 0.05 here): flat directions move 1/a times faster, so the burn-in is shorter
    rms = slt.estimate_llc(m, (X, Y), F.mse_loss, sampler="rmsprop_sgld", sampler_kwargs={"eps": 0.05},
                           **{**kw, "step_size": 2e-4})
    assert rms.config["relaxation_gain"] == 20.0
    assert rms.config["num_burnin"] == default_burnin(120, 1, 2e-4, 20.0, relaxation_gain=20.0) == 63
    assert default_burnin(120, 1, 2e-4, 20.0) == 1250 and rms.config["num_burnin_rule"] == "relaxation"
    # a given γ > 1 is the last γ the run can use: its burn-in covers the relaxation up to
    # BURNIN_MAX_FACTOR_FINAL × the draws (here 5/(εγ) = 5000 steps = 42 × 120 draws, beyond the escalated cap)
    slow = slt.estimate_llc(m, (X, Y), F.mse_loss, **{**kw, "step_size": 5e-5})
    assert default_burnin(120, 1, 5e-5, 20.0) == 30
    assert slow.config["num_burnin"] == default_burnin(120, 1, 5e-5, 20.0, final=True) == 5000


def test_a_given_localization_above_nbeta_is_noted():
    """A given γ above nβ lets the prior hold every direction of loss curvature below γ/nβ > 1: λ̂ falls toward 0
    as γ grows and still reads "converged" (helper 34: 2.6 at γ = 10, 0.035 at 10⁴ for a 3-4-1 MLP at nβ = 94).
    It is recorded and printed, and warned of beyond 10 nβ; at γ ≤ nβ, or with the automatic γ, nothing is said."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 2, generator=g, dtype=torch.float64)
    Y = X @ torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    m = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, -1.0]]))
    kw = dict(nbeta=50.0, num_chains=2, num_draws=20, seed=0, progress=False, batch_size=None, extend_draws=False,
              check_halving=False)
    with pytest.warns(RuntimeWarning, match=r"localization γ = 1000 exceeds nβ = 50: the localization, not the loss, "
                                            r"holds every direction whose loss curvature is below γ/nβ = 20"):
        r = slt.estimate_llc(m, (X, Y), F.mse_loss, localization=1000.0, **kw)
    assert any(n.startswith("localization γ = 1000 exceeds nβ") for n in r.config["setup_notes"])
    with warnings.catch_warnings(record=True) as rec:  # up to 10 nβ: noted (and printed), not warned
        warnings.simplefilter("always")
        r = slt.estimate_llc(m, (X, Y), F.mse_loss, localization=100.0, **kw)
    assert not [w for w in rec if "exceeds nβ" in str(w.message)]
    assert any(n.startswith("localization γ = 100 exceeds nβ") for n in r.config["setup_notes"])
    assert "note: localization γ = 100 exceeds nβ" in str(r)
    for gamma in (50.0, None):
        r = slt.estimate_llc(m, (X, Y), F.mse_loss, localization=gamma, **kw)
        assert not any("exceeds nβ" in n for n in r.config["setup_notes"])
