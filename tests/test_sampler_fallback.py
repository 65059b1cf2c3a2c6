"""``sampler="auto"`` (the default of ``estimate_llc``): SGLD, repeated with critically damped SGHMC (full batch
only) and then RMSProp-SGLD (preconditioner frozen after burn-in) at the γ reached when SGLD's chains have not
settled under the automatic γ.

Exact tier, on the mechanism: which run is returned and what the config records.  Whether a run
"settled" is forced here by wrapping the engine's verdict (the real verdicts are tested in
``test_localization.py`` and ``test_diffusion.py``), so each branch runs in seconds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
import slt.engine as engine

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # an untrained toy: w* and R-hat warnings


def _job():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g, dtype=F64)
    Y = X.sum(1, keepdim=True) + 0.3 * torch.randn(200, 1, generator=g, dtype=F64)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64)
    return m, (X, Y)


KW = dict(num_chains=4, num_draws=100, num_burnin=50, dtype=F64, seed=0, progress=False, extend_draws=False)


@pytest.fixture
def forced(monkeypatch):
    """``forced(names)``: runs of the samplers in ``names`` (a name, or ``(name, γ)`` for its runs at that γ only)
    are judged unsettled, every other as settled.  ``forced.runs`` lists ``(sampler, γ, deferred)`` per
    ``_run_at`` call and ``(sampler, γ, "resumed")`` where a deferred run went on."""
    run_at = engine._run_at
    runs: list[tuple[str, float, bool]] = []

    def tag(out, name, gamma):
        if "trace" in out:
            out["trace"].sampler_name, out["trace"].gamma = name, gamma
        return out

    def tagged(target, rows, spec, *a, **k):
        out = run_at(target, rows, spec, *a, **k)
        name, gamma = spec.name, float(target.localization)
        runs.append((name, gamma, "deferred" in out))
        if "resume" in out:
            resume = out["resume"]
            out["resume"] = lambda: (runs.append((name, gamma, "resumed")), tag(resume(), name, gamma))[1]
        return tag(out, name, gamma)

    def install(names):
        def unsettled(trace, *a, **k):
            name = getattr(trace, "sampler_name", None)
            return {0: ["forced by the test"]} if name in names or (name, trace.gamma) in names else {}
        monkeypatch.setattr(engine, "_run_at", tagged)
        monkeypatch.setattr(engine, "_unsettled", unsettled)
        # (the job's w* is a random init, not a minimum, whose groups would not drive the escalation: the test
        # forces the verdicts, so it forces this too)
        monkeypatch.setattr(engine, "_below_start", lambda *a, **k: set())
    install.runs = runs
    return install


def test_auto_falls_back_to_critically_damped_sghmc_when_sgld_does_not_settle(forced):
    forced({"sgld"})
    m, data = _job()
    r = slt.estimate_llc(m, data, F.mse_loss, **KW)
    fb = r.config["sampler_fallback"]
    assert r.sampler == r.config["sampler"] == "sghmc" and r.config["sampler_requested"] == "auto"
    assert r.config["sampler_kwargs"] == {"friction": "auto"}
    assert fb["from"] == "sgld" and fb["to"] == "sghmc" and fb["settled"] is True
    assert [t["sampler"] for t in fb["tried"]] == ["sghmc"]
    assert fb["localization"] == r.localization == r.config["localization_escalations"][-1]["localization"] * 10
    assert any("forced by the test" in s for s in fb["reasons"])
    h = fb["halving"][0]  # the direct run at ε/2 with the same steps
    assert h["message"] is None and set(h) == {"llc", "llc_at_half_step", "z", "message"}
    assert h["llc"] == pytest.approx(r.llc_mean)
    alpha = min(1.0, (2 * r.step_size * r.localization) ** 0.5)
    assert r.config["relaxation_gain"] == pytest.approx(max(1.0, 1 / alpha))
    assert r.diagnostics.get("free_diffusion") is not None  # read as SGLD at ε/α


def test_then_to_frozen_rmsprop_sgld_when_sghmc_does_not_settle_either(forced):
    forced({"sgld", "sghmc"})
    m, data = _job()
    r = slt.estimate_llc(m, data, F.mse_loss, **KW)
    fb = r.config["sampler_fallback"]
    assert r.sampler == r.config["sampler"] == "rmsprop_sgld"
    assert fb["to"] == "rmsprop_sgld" and fb["settled"] is True
    assert [(t["sampler"], t["settled"]) for t in fb["tried"]] == [("sghmc", False), ("rmsprop_sgld", True)]
    assert fb["tried"][0]["reasons_after"] and fb["tried"][0]["halving"] is None  # (its own checks failed)
    assert r.config["relaxation_gain"] == pytest.approx(10.0)
    assert r.diagnostics.get("free_diffusion") is not None  # the frozen metric's checks ran
    text = str(r)
    assert "then with RMSProp-SGLD (preconditioner frozen after burn-in), which settled: these are its draws" in text


def test_a_fallback_takes_the_sampler_kwargs_it_accepts(forced):
    """``sampler="auto"`` with ``sampler_kwargs`` are SGLD's: the fallback got them all and failed after the
    SGLD ladder had run (helper 34: ``sghmc() got an unexpected keyword argument 'reuse_batch'``).  A fallback now
    takes those it accepts (recorded in its config); a key SGLD does not take is refused up front, naming how to
    set another sampler's arguments; and SGLD's own ``reuse_batch`` on minibatches no longer crashes the step-size
    adaptation, which passed its own beside it ("got multiple values for keyword argument 'reuse_batch'")."""
    forced({"sgld", "sghmc"})
    m, data = _job()
    r = slt.estimate_llc(m, data, F.mse_loss, sampler_kwargs={"reuse_batch": False}, **KW)
    assert r.sampler == "rmsprop_sgld" and [t["sampler"] for t in r.config["sampler_fallback"]["tried"]] == [
        "sghmc", "rmsprop_sgld"]
    assert r.config["sampler_kwargs"]["reuse_batch"] is False  # (RMSProp-SGLD takes it; SGHMC ran without it)
    with pytest.raises(ValueError, match=r"sampler_kwargs\['friction'\]: the sgld sampler takes no such argument.*"
                                         r"sampler='auto' starts with SGLD .* sampler='sghmc'"):
        slt.estimate_llc(m, data, F.mse_loss, sampler_kwargs={"friction": 0.1}, **KW)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 3, generator=g, dtype=F64)
    Y = X.sum(1, keepdim=True) + 0.3 * torch.randn(600, 1, generator=g, dtype=F64)
    for reuse in (True, False):
        r = slt.estimate_llc(m, (X, Y), F.mse_loss, sampler="sgld", batch_size=64,
                             sampler_kwargs={"reuse_batch": reuse}, **KW)
        assert r.config["sampler_kwargs"] == {"reuse_batch": reuse}


def test_on_minibatches_sghmc_is_not_tried():
    """Minibatch noise heats SGHMC 1/α times more than SGLD: a minibatch run falls back to RMSProp-SGLD."""
    from slt.engine import _fallback_samplers

    assert _fallback_samplers(True) == ("sghmc", "rmsprop_sgld") and _fallback_samplers(False) == ("rmsprop_sgld",)


def test_minibatch_fallback_goes_to_rmsprop_sgld(forced):
    forced({"sgld"})
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 3, generator=g, dtype=F64)
    Y = X.sum(1, keepdim=True) + 0.3 * torch.randn(600, 1, generator=g, dtype=F64)
    m, _ = _job()
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, batch_size=64, **KW)
    fb = r.config["sampler_fallback"]
    by_name = slt.estimate_llc(m, (X, Y), F.mse_loss, batch_size=64, sampler="sgld", **KW)
    hint = [s for s in by_name.convergence_reasons if "the automatic localization was raised" in s]
    assert hint and hint[0].endswith(", or sampler='rmsprop_sgld'"), by_name.convergence_reasons  # not SGHMC here
    assert [t["sampler"] for t in fb["tried"]] == ["rmsprop_sgld"]  # (settled or not: SGHMC was skipped)


def test_sgld_by_name_never_switches_and_a_failed_fallback_keeps_sglds_draws(forced):
    forced({"sgld"})
    m, data = _job()
    plain = slt.estimate_llc(m, data, F.mse_loss, sampler="sgld", **KW)
    assert plain.sampler == "sgld" and plain.config["sampler_fallback"] is None
    assert any("sampler='sghmc' or 'rmsprop_sgld'" in s for s in plain.convergence_reasons)
    forced({"sgld", "sghmc", "rmsprop_sgld"})
    both = slt.estimate_llc(m, data, F.mse_loss, **KW)
    fb = both.config["sampler_fallback"]
    assert both.sampler == "sgld" and fb["settled"] is False and fb["reasons_after"]
    assert [(t["sampler"], t["settled"]) for t in fb["tried"]] == [("sghmc", False), ("rmsprop_sgld", False)]
    # the same SGLD draws as the run by name: the fallbacks' runs leave them alone
    assert torch.equal(both.llc_trace, plain.llc_trace)
    assert any("critically damped SGHMC and RMSProp-SGLD, tried at that γ, did not settle either" in s
               for s in both.convergence_reasons), both.convergence_reasons
    assert "did not settle either" in str(both) and "these are sgld's draws" in str(both)


def test_no_fallback_with_a_given_localization_or_when_sgld_settles(forced):
    m, data = _job()
    forced({"sgld"})
    given = slt.estimate_llc(m, data, F.mse_loss, localization=10.0, **KW)
    assert given.sampler == "sgld" and given.config["sampler_fallback"] is None
    forced(set())
    settled = slt.estimate_llc(m, data, F.mse_loss, **KW)
    assert settled.sampler == "sgld" and settled.config["sampler_fallback"] is None


def test_the_printed_result_says_what_the_fallback_did(forced):
    forced({"sgld"})
    m, data = _job()
    text = str(slt.estimate_llc(m, data, F.mse_loss, **KW))
    assert "sampler: sgld did not settle at γ = " in text and "forced by the test" in text
    assert "repeated with SGHMC damped critically for γ (friction √(2εγ)), which settled: these are its draws" in text
    assert "d·(ε/α)·t (α the friction)" in text


def test_no_fallback_with_a_given_step_size(forced):
    """A given ε was chosen for SGLD: RMSProp-SGLD's steps are up to 1/a times larger at the same ε, and
    SGHMC's friction follows from ε."""
    forced({"sgld"})
    m, data = _job()
    r = slt.estimate_llc(m, data, F.mse_loss, step_size=1e-4, **KW)
    assert r.sampler == "sgld" and r.config["sampler_fallback"] is None


def test_the_metric_trace_counts_only_the_coordinates_a_restricted_row_moves():
    """tr G over a restriction's coordinates, rows in (K, M, C) order as ``Groups.apply_mask``: with G
    the column index + 1, each row's trace is the sum of (j + 1) over its mask."""
    from types import SimpleNamespace

    from slt.groups import Groups

    K, C, d = 2, 3, 5
    masks = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=F64)
    target = SimpleNamespace(K=K, groups=Groups(masks=masks))
    R = K * masks.shape[0] * C
    G = torch.arange(1.0, d + 1, dtype=F64).expand(R, d)
    got = engine._metric_trace(target, lambda sl: G[:, sl].clone(), torch.zeros(R, d, dtype=F64))
    want = torch.tensor([3.0] * C + [12.0] * C, dtype=F64).repeat(K)
    assert torch.equal(got, want)
    plain = engine._metric_trace(SimpleNamespace(K=1, groups=Groups()),
                                 lambda sl: G[:4, sl].clone(), torch.zeros(4, d, dtype=F64))
    assert torch.equal(plain, torch.full((4,), 15.0, dtype=F64))


def test_a_fallback_that_is_not_stable_when_eps_halves_is_not_taken(forced, monkeypatch):
    """The in-run checks pass, but the direct run at ε/2 moves λ̂: SGLD's draws are kept and the reason says why."""
    forced({"sgld"})
    real = engine._direct_halving

    def unstable(trace, half, nbeta, G, C):
        out = real(trace, half, nbeta, G, C)
        return {g: {**h, "message": "λ̂ is not stable when ε halves: forced"} for g, h in out.items()}

    monkeypatch.setattr(engine, "_direct_halving", unstable)
    m, data = _job()
    r = slt.estimate_llc(m, data, F.mse_loss, **KW)
    fb = r.config["sampler_fallback"]
    assert r.sampler == "sgld" and fb["settled"] is False
    assert any("not stable when ε halves: forced" in s for s in fb["reasons_after"])
    assert "did not settle either" in str(r)


def test_direct_halving_compares_paired_chains():
    """λ̂ per chain at ε and at ε/2 (same seeds: paired); a shift far beyond the chains' spread is named."""
    from types import SimpleNamespace

    C, T = 8, 50
    g = torch.Generator().manual_seed(0)
    base = 1.0 + 0.01 * torch.randn(C, 1, generator=g, dtype=F64).expand(C, T)

    def trace(loss):
        return SimpleNamespace(loss=loss, star=torch.zeros(C, T, dtype=F64), diverged=torch.zeros(C, dtype=torch.bool))

    same = engine._direct_halving(trace(base), trace(base + 1e-4), 10.0, 1, C)[0]
    assert same["message"] is None and same["llc"] == pytest.approx(10.0, abs=0.1)
    jitter = 0.001 * torch.randn(C, 1, generator=g, dtype=F64)
    moved = engine._direct_halving(trace(base), trace(0.7 * base + jitter), 10.0, 1, C)[0]
    assert moved["message"] is not None and moved["z"] > 10 and "not stable when ε halves" in moved["message"]


# SGHMC first where SGLD's run at the last γ would be mostly burn-in (slt.defaults.SGHMC_FIRST_BURNIN).  The toy's
# ladder is γ = 1, 10 (nβ = 37.7); at γ = 10 its SGLD step adapts to ≈ 1.6e-3, so 5/(εγ) ≈ 311 steps = 3.1 × its
# 100 draws: a factor of 0 makes every such level costly, a huge one none.
AUTO_BURNIN = {**KW, "num_burnin": None}


def test_sghmc_runs_first_where_sglds_burn_in_would_dominate(forced, monkeypatch):
    monkeypatch.setattr(engine, "SGHMC_FIRST_BURNIN", 0)
    forced({("sgld", 1.0)})  # the ladder rises to γ = 10, where every run settles
    m, data = _job()
    r = slt.estimate_llc(m, data, F.mse_loss, **AUTO_BURNIN)
    fb = r.config["sampler_fallback"]
    assert r.sampler == "sghmc" and r.localization == 10.0 and fb["settled"] is True
    assert [(t["sampler"], t["settled"]) for t in fb["tried"]] == [("sghmc", True)]
    # SGLD at γ = 10 adapted its step and stopped: no SGLD draws at that γ
    assert forced.runs[:3] == [("sgld", 1.0, False), ("sgld", 10.0, True), ("sghmc", 10.0, False)]
    first = fb["first"]
    assert set(first) == {"step_size", "relaxation_steps", "draw_steps", "seconds"}
    assert first["draw_steps"] == 100
    assert first["relaxation_steps"] == slt.defaults.relaxation_steps(first["step_size"], 10.0)
    assert fb["halving"][0]["message"] is None  # the direct ε/2 check ran
    text = str(r)
    assert (f"would need a burn-in of 5/(εγ) = {first['relaxation_steps']} steps" in text
            and "ran first SGHMC damped critically for γ (friction √(2εγ)), which settled: these are its draws" in text)


def test_when_sghmc_first_does_not_settle_sgld_runs_with_its_burn_in_unchanged(forced, monkeypatch):
    m, data = _job()
    forced({("sgld", 1.0)})
    plain = slt.estimate_llc(m, data, F.mse_loss, **AUTO_BURNIN)  # (the factor of 4: no level is costly here)
    assert plain.sampler == "sgld" and plain.config["sampler_fallback"] is None
    monkeypatch.setattr(engine, "SGHMC_FIRST_BURNIN", 0)
    forced({("sgld", 1.0), "sghmc"})
    start = len(forced.runs)
    r = slt.estimate_llc(m, data, F.mse_loss, **AUTO_BURNIN)
    fb = r.config["sampler_fallback"]
    assert r.sampler == "sgld" and fb["to"] == "sgld" and fb["settled"] is True and "reasons_after" not in fb
    # SGLD at γ = 10 adapted its step once: the deferred run goes on after SGHMC
    assert forced.runs[start:] == [("sgld", 1.0, False), ("sgld", 10.0, True), ("sghmc", 10.0, False),
                                   ("sgld", 10.0, "resumed")]
    assert [(t["sampler"], t["settled"]) for t in fb["tried"]] == [("sghmc", False), ("sgld", True)]
    # SGLD's draws are those of a run where SGHMC never came first (fresh streams for every run)
    assert torch.equal(r.llc_trace, plain.llc_trace) and r.config["num_burnin"] == plain.config["num_burnin"]
    assert "which did not settle (forced by the test), then SGLD with that burn-in, which settled" in str(r)


def test_then_the_rest_of_the_fallbacks_without_sghmc_again(forced, monkeypatch):
    monkeypatch.setattr(engine, "SGHMC_FIRST_BURNIN", 0)
    forced({"sgld", "sghmc"})
    m, data = _job()
    r = slt.estimate_llc(m, data, F.mse_loss, **AUTO_BURNIN)
    fb = r.config["sampler_fallback"]
    assert r.sampler == "rmsprop_sgld" and fb["settled"] is True
    assert [(t["sampler"], t["settled"]) for t in fb["tried"]] == [("sghmc", False), ("sgld", False),
                                                                    ("rmsprop_sgld", True)]
    assert [n for n, *_ in forced.runs].count("sghmc") == 1
    forced({"sgld", "sghmc", "rmsprop_sgld"})
    bad = slt.estimate_llc(m, data, F.mse_loss, **AUTO_BURNIN)
    assert bad.sampler == "sgld" and bad.config["sampler_fallback"]["settled"] is False
    # the note names the other samplers tried, not SGLD itself
    assert any("(critically damped SGHMC and RMSProp-SGLD, tried at that γ, did not settle either)" in s
               for s in bad.convergence_reasons), bad.convergence_reasons


@pytest.mark.parametrize("case", ["minibatch", "given burn-in", "given step", "sgld by name", "cheap"])
def test_sgld_runs_first_everywhere_else(forced, monkeypatch, case):
    """Only full-batch runs with the automatic step, burn-in and γ defer SGLD; a burn-in within the factor runs it."""
    monkeypatch.setattr(engine, "SGHMC_FIRST_BURNIN", 10 ** 9 if case == "cheap" else 0)
    forced({("sgld", 1.0)})
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 3, generator=g, dtype=F64)
    m, data = _job()
    kw = dict(AUTO_BURNIN)
    if case == "minibatch":
        data, kw["batch_size"] = (X, X.sum(1, keepdim=True)), 64
    elif case == "given burn-in":
        kw["num_burnin"] = 50
    elif case == "given step":
        kw["step_size"] = 1e-3
    elif case == "sgld by name":
        kw["sampler"] = "sgld"
    r = slt.estimate_llc(m, data, F.mse_loss, **kw)
    assert not any(d for *_, d in forced.runs) and r.sampler == "sgld"
    assert r.config["sampler_fallback"] is None


@pytest.mark.parametrize("powers", [(1, 2), (2, 3)])
def test_sghmc_first_matches_the_exact_value_on_a_normal_crossing(monkeypatch, powers):
    """Statistical, known answer: the SGHMC-first path with its real verdicts (own checks and the direct ε/2
    run).  SGLD's run at γ = 1 is judged unsettled by force, so the ladder rises to γ = 10, where a factor of 0
    makes SGLD's burn-in "dominate": SGHMC's λ̂ there must match the exact expectation of the localized tempered
    posterior at γ = 10 (2-D quadrature of the same potential) within 4 s.e. (32 chains × 200 draws, s.e. ≤ 15%
    of the value), with no divergent chain and the run converged."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_adaptation import _Crossing
    from test_oracle import _normal_crossing_exact

    from slt.models import NormalCrossing, gaussian_nll, make_normal_crossing_data

    run_at, real = engine._run_at, engine._unsettled

    def tagged(target, rows, spec, *a, **k):
        out = run_at(target, rows, spec, *a, **k)
        if "trace" in out:
            out["trace"].sampler_name, out["trace"].gamma = spec.name, float(target.localization)
        return out

    def unsettled(trace, *a, **k):
        if getattr(trace, "sampler_name", None) == "sgld" and getattr(trace, "gamma", None) in (1.0, 10.0):
            return {0: ["forced by the test"]}
        return real(trace, *a, **k)

    monkeypatch.setattr(engine, "_run_at", tagged)
    monkeypatch.setattr(engine, "_unsettled", unsettled)
    monkeypatch.setattr(engine, "SGHMC_FIRST_BURNIN", 0)
    n = 1000
    X, Y = make_normal_crossing_data(n, torch.Generator().manual_seed(0))
    w_star = NormalCrossing(list(powers), dtype=F64).empirical_minimum(X.double(), Y.double())
    r = slt.estimate_llc(_Crossing(powers, w_star), (X, Y), gaussian_nll, num_chains=32, num_draws=200, seed=0, batch_size=None,
                         progress=False)
    fb = r.config["sampler_fallback"]
    assert r.sampler == "sghmc" and r.localization == 100.0 and fb["first"] is not None, (fb, str(r))
    assert fb["settled"] and fb["halving"][0]["message"] is None
    exact = _normal_crossing_exact(list(powers), X.double(), Y.double(), w_star, r.nbeta, r.localization, num=4001)
    assert r.divergent_chains == [] and r.converged, r.convergence_reasons
    assert r.llc_sem <= 0.15 * exact
    assert abs(r.llc_mean - exact) <= 4 * r.llc_sem, (r.llc_mean, r.llc_sem, exact)
