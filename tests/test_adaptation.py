"""Step-size adaptation (``step_size="adapt"``: dual averaging toward a target acceptance with
divergence back-off) and the convergence verdict (``result.converged`` with its reasons).

Statistical tolerances: 4 standard errors reported by the estimator; acceptance tolerances from
the binomial-like spread of the recorded acceptance (stated at each assertion).  Fixed seeds."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from torch import nn

import slt
from slt.stepsize import DualAveraging

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")


def _location(d=4, n=400, seed=0):
    X = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    m = slt.models.GaussianLocation(d, dtype=F64)
    with torch.no_grad():
        m.w.copy_(X.mean(0))  # w* = the empirical minimum
    return m, X


def test_dual_averaging_update_is_hoffman_gelman_algorithm_5():
    """One scheme per checkpoint, by hand: H̄, log ε and the iterate average."""
    da = DualAveraging.start(torch.tensor([1e-3, 1e-2], dtype=F64), 0.8)
    mu = math.log(10 * 1e-3)
    h, lbar = 0.0, math.log(1e-3)
    for t, a in enumerate([0.5, 0.9, 1.0, 0.2], start=1):
        da.update(torch.tensor([a, 0.8], dtype=F64))
        h = (1 - 1 / (t + 10)) * h + (0.8 - a) / (t + 10)
        le = mu - math.sqrt(t) / 0.05 * h
        eta = t ** -0.75
        lbar = eta * le + (1 - eta) * lbar
        assert float(da.log_eps[0]) == pytest.approx(le, rel=1e-12)
        assert float(da.log_eps_bar[0]) == pytest.approx(lbar, rel=1e-12)
    # at the target the second checkpoint's H̄ stays 0: ε = 10 ε₀ (Stan's start μ = log 10ε₀)
    assert float(da.step_size[1]) == pytest.approx(0.1, rel=1e-12)
    da.back_off(torch.tensor([False, True]))
    assert float(da.step_size[1]) == pytest.approx(0.05, rel=1e-12)
    da.update(torch.tensor([0.8, 0.0], dtype=F64))
    assert float(da.step_size[1]) <= 0.05 * (1 + 1e-12)  # capped below the step that diverged


def test_a_settled_group_is_frozen_while_others_search_again():
    """At a window's end only the groups still searching restart; a settled one keeps its averaged step,
    steps at it and no longer moves (nor backs off), so its step does not depend on the groups beside it."""
    da = DualAveraging.start(torch.tensor([1e-3, 1e-2], dtype=F64), 0.8)
    for a in (0.5, 0.9, 0.7):
        da.update(torch.tensor([a, a], dtype=F64))
    settled = float(da.final[0])
    da = da.restart(torch.tensor([5e-4, 5e-3], dtype=F64), torch.tensor([False, True]))
    assert da.frozen.tolist() == [True, False]
    assert float(da.step_size[0]) == float(da.final[0]) == settled and float(da.step_size[1]) == pytest.approx(5e-3)
    for a in (0.0, 1.0, 0.3):
        da.update(torch.tensor([a, a], dtype=F64))
    da.back_off(torch.tensor([True, True]))
    assert float(da.final[0]) == settled and float(da.step_size[1]) < 5e-3
    again = da.restart(torch.tensor([1e-4, 1e-4], dtype=F64), torch.tensor([False, True]))
    assert again.frozen.tolist() == [True, False] and float(again.final[0]) == settled


def test_adaptation_is_deterministic_and_reaches_its_target_acceptance():
    """Two runs with one seed are identical; the MALA acceptance of the draws (recorded every
    10 steps: 8 chains × 100 records) is within 0.05 of the target (its spread over chains is
    a few 0.01), and λ̂ equals the exact finite-n value of the quadratic loss within the SGLD
    bias at the adapted ε plus 4 s.e."""
    m, X = _location()
    kw = dict(num_chains=8, num_draws=1000, num_burnin=500, step_size="adapt", target_accept=0.9, batch_size=None,
              dtype=F64, seed=3, progress=False)
    a = slt.estimate_llc(m, X, **kw)
    b = slt.estimate_llc(m, X, **kw)
    assert torch.equal(a.llc_trace, b.llc_trace) and a.step_size == b.step_size
    assert a.config["step_size_rule"] == "adapt" and a.diagnostics["adapt_steps"] == 400
    assert abs(a.diagnostics["mala_acceptance"] - 0.9) < 0.05, a.diagnostics["mala_acceptance"]
    nb, gamma, eps = a.nbeta, a.localization, a.step_size
    kappa = nb + gamma  # the Hessian of the Gaussian location loss is I
    sgld_exact = 0.5 * 4 * nb / (kappa * (1 - eps * kappa / 4))
    assert abs(a.llc_mean - sgld_exact) < 4 * a.llc_sem, (a.llc_mean, sgld_exact, a.llc_sem)


def test_adaptation_backs_off_from_a_diverging_start():
    """y = w³x at w* = 0 (λ = 1/6): the curvature at w* is 0, so the initial step 0.2/γ = 0.2
    makes chains blow up (nβ·w⁶ grows without bound); adaptation halves the step and restarts
    those chains, and the draws have no divergent chain."""

    class Cubic(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, dtype=F64))

        def forward(self, x):
            return self.w**3 * x

    X = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    Y = torch.zeros_like(X)
    r = slt.estimate_llc(Cubic(), (X, Y), torch.nn.functional.mse_loss, num_chains=8, num_draws=400,
                         step_size="adapt", batch_size=None, dtype=F64, seed=0, progress=False)
    assert r.diagnostics["adapt_back_offs"] >= 1
    assert r.divergent_chains == [] and math.isfinite(r.llc_mean)
    assert r.step_size < r.diagnostics["step_size_initial"]


def test_converged_on_a_quadratic_and_the_reasons_when_not():
    m, X = _location()
    ok = slt.estimate_llc(m, X, num_chains=8, num_draws=2000, batch_size=None, dtype=F64, seed=0, progress=False)
    assert ok.converged and ok.convergence_reasons == [], ok.convergence_reasons
    # a step far too small for the number of steps: the chains have not left w*
    stuck = slt.estimate_llc(m, X, num_chains=8, num_draws=200, step_size=1e-7, batch_size=None, dtype=F64,
                             seed=0, progress=False)
    assert not stuck.converged
    assert any("barely moved" in s for s in stuck.convergence_reasons), stuck.convergence_reasons
    one = slt.estimate_llc(m, X, num_chains=1, num_draws=200, batch_size=None, dtype=F64, seed=0, progress=False)
    assert not one.converged and any("at least 2 chains" in s for s in one.convergence_reasons)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_dropout_left_on_is_a_reason_not_to_trust_the_estimate():
    """A model in train mode with dropout: the set-up note reaches ``convergence_reasons``."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g, dtype=F64)
    Y = torch.randn(200, 1, generator=g, dtype=F64)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1)).to(F64).train()
    r = slt.estimate_llc(m, (X, Y), torch.nn.functional.mse_loss, num_chains=2, num_draws=20, step_size=1e-4,
                         dtype=F64, progress=False)
    assert not r.converged
    assert any("dropout active" in s and "model.eval()" in s for s in r.convergence_reasons), r.convergence_reasons
    # and print(result) says so, even when no check of the chains failed
    assert "  not converged: dropout active in 1" in str(r)


class _Crossing(nn.Module):
    """x · a^k1 · b^k2 written as a user would: two 0-dim parameters, no chain dimension."""

    def __init__(self, powers, w):
        super().__init__()
        self.powers = powers
        self.a = nn.Parameter(torch.tensor(float(w[0])))
        self.b = nn.Parameter(torch.tensor(float(w[1])))

    def forward(self, x):
        return x * self.a ** self.powers[0] * self.b ** self.powers[1]


@pytest.mark.parametrize("powers", [(1, 2), (2, 3), (1, 4), (1, 6)])
def test_defaults_on_normal_crossings_written_as_plain_modules(powers):
    """K ∝ a^{2k1} b^{2k2} (multiplicity 1, λ = 1/(2 max k)), n = 1000, every sampling setting at its
    default except the chain count (32, so the MC error is small enough to test against).  The
    earlier curvature rule made every chain diverge at (1, 2) and (2, 2).  Checks: no divergent
    chain, converged, and λ̂ equal to the exact finite-n expectation on the same potential
    (quadrature; the closed form λ is asymptotic: at n = 1000, γ = 1 the exact value is 16–26%
    below it for (1, 2) and (2, 3)) within 4 s.e., with s.e. ≤ 12% of it (at (1, 2) the chains
    spread by about 60% of the value over 1000 draws along the flat direction, so 32 chains give
    ≈ 0.6/√32 = 10.6%: the earlier 10% floor sat on that edge and failed at 10.4% once the draws
    stopped reusing MALA batches).  SGLD's own bias at the adapted step (acceptance 0.99) is a few
    per cent, inside that band."""
    from slt.models import NormalCrossing, gaussian_nll, make_normal_crossing_data
    from test_oracle import _normal_crossing_exact

    n = 1000
    X, Y = make_normal_crossing_data(n, torch.Generator().manual_seed(0))
    w_star = NormalCrossing(list(powers), dtype=F64).empirical_minimum(X.double(), Y.double())
    r = slt.estimate_llc(_Crossing(powers, w_star), (X, Y), gaussian_nll, num_chains=32, seed=0, progress=False)
    exact = _normal_crossing_exact(list(powers), X.double(), Y.double(), w_star, r.nbeta, r.localization, num=4001)
    assert r.divergent_chains == [] and r.converged, r.convergence_reasons
    assert r.llc_sem <= 0.12 * exact
    assert abs(r.llc_mean - exact) <= 4 * r.llc_sem, (r.llc_mean, r.llc_sem, exact)


def test_a_state_handed_between_loops_keeps_the_batch_of_its_cached_evaluation():
    """SGLD with ``reuse_batch`` caches its evaluation at the proposal after a MALA step; the next step
    must use that batch, also when the state moves from one loop to another (adaptation, then
    ``run_chains``): the first draw's control variate L_B(w*) is the held batch's, and its loss is
    the cached one (exact: the same numbers, no re-evaluation)."""
    import torch.nn.functional as F
    from slt.loop import run_chains
    from slt.rng import ChainRNG
    from slt.samplers import LocalizedPotential, sgld
    from slt.target import prepare_target

    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g, dtype=F64)
    Y = X @ torch.tensor([[1.0], [-1.0], [0.5]], dtype=F64)
    target = prepare_target(nn.Linear(3, 1).double(), (X, Y), F.mse_loss, dtype=F64)
    rng = ChainRNG(target.seeds, 2, target.device)
    batches = target.batches(rng, 2, 16)
    pot = LocalizedPotential(target.evaluator.loss_and_grad, target.rows(2), target.nbeta, target.localization)
    smp = sgld(pot, 1e-4, mala_every=2, reuse_batch=True)
    state, _ = smp.step(smp.init(target.rows(2)), batches()[0], rng)  # step 0: MALA, evaluation cached
    assert state.cache is not None
    held_star = batches.last[1].clone()
    _, trace = run_chains(smp, state, batches, rng, 1, num_burnin=0)
    assert torch.equal(trace.star[:, 0], held_star)
    assert torch.equal(trace.loss[:, 0], state.cache[0])


def test_adaptation_puts_chains_thrown_beyond_the_kick_bound_back_at_w_star():
    """Exact: a chain whose nβ(L − L*) exceeds :func:`slt.stepsize.kick_bound` (max(d/2 + 10√(d/2) + 20,
    1000), which no chain of the posterior reaches) is back at w* after the step that saw it, counted in
    ``resets`` and not as a divergence (no back-off: dual averaging runs on, the step is not capped);
    chains below the bound move on.  Regression: on a trained MLP such chains drove ε to 3.9e-9."""
    import torch.nn.functional as F
    from slt.rng import ChainRNG
    from slt.samplers import LocalizedPotential, sgld
    from slt.stepsize import adapt_step_size, kick_bound
    from slt.target import prepare_target

    assert kick_bound(4) == 1000.0 and kick_bound(10**6) == 5e5 + 10 * math.sqrt(5e5) + 20
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g, dtype=F64)
    Y = X @ torch.tensor([[1.0], [-1.0], [0.5]], dtype=F64)
    target = prepare_target(nn.Linear(3, 1).double(), (X, Y), F.mse_loss, dtype=F64)
    C, w_star = 3, target.rows(3)
    rng = ChainRNG(target.seeds, C, target.device)
    batches = target.batches(rng, C, None)
    pot = LocalizedPotential(target.evaluator.loss_and_grad, w_star, target.nbeta, target.localization)
    start = w_star.clone()
    start[0] += 30.0  # nβΔL ≈ nβ·900·E|x|²: far beyond kick_bound(4) = 1000, far below the divergence threshold
    start[1] += 0.01  # a small offset, well below the bound
    thresh = 1e12
    far = float(target.nbeta * (target.evaluator.loss_and_grad(start, batches()[0])[0] - batches()[1])[0])
    assert kick_bound(4) < far < thresh
    state = sgld(pot, 1e-4, deterministic=True).init(start)
    eps0 = torch.tensor([1e-4], dtype=F64)
    state, ad = adapt_step_size("sgld", pot, state, batches, rng, 1, eps0, C, threshold=thresh, deterministic=True)
    assert ad.resets.tolist() == [1] and ad.back_offs.tolist() == [0]
    assert torch.equal(state.params[0], w_star[0])  # put back
    assert not torch.equal(state.params[1], w_star[1]) and not torch.equal(state.params[2], w_star[2])  # moved on


def _regression_potential(C=4, seed=0, batch_size=None):
    import torch.nn.functional as F
    from slt.rng import ChainRNG
    from slt.samplers import LocalizedPotential
    from slt.target import prepare_target

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, 3, generator=g, dtype=F64)
    Y = X @ torch.tensor([[1.0], [-1.0], [0.5]], dtype=F64) + 0.1 * torch.randn(200, 1, generator=g, dtype=F64)
    m = nn.Linear(3, 1).double()
    with torch.no_grad():  # w* = the least-squares minimum
        sol = torch.linalg.lstsq(torch.cat([X, torch.ones(200, 1, dtype=F64)], 1), Y).solution
        m.weight.copy_(sol[:3].T)
        m.bias.copy_(sol[3])
    target = prepare_target(m, (X, Y), F.mse_loss, dtype=F64)
    rng = ChainRNG(target.seeds, C, target.device)
    batches = target.batches(rng, C, batch_size)
    pot = LocalizedPotential(target.evaluator.loss_and_grad, target.rows(C), target.nbeta, target.localization)
    return target, pot, batches, rng


@pytest.mark.parametrize("batch_size", [None, 32])
def test_adaptation_is_extended_while_it_is_still_searching(batch_size):
    """A start 10⁴ times the stable step, 8 steps of adaptation: dual averaging is still searching (the
    last quarter's acceptance reads far below the target) and its averaged step is far too large.  With
    extensions the scheme runs another window restarted from its averaged step, until the acceptance
    reads within ADAPT_MARGIN of the target; the frozen step is then one the chains tolerate.  A start
    near the right step is not extended.  Full batch (a reading every step) and minibatches (a reading
    every other step, so the window's last step has none).  Exact counts, deterministic under the seed."""
    from slt.samplers import sgld
    from slt.stepsize import ADAPT_LAG, ADAPT_MARGIN, adapt_step_size

    C = 4
    target, pot, batches, rng = _regression_potential(C, batch_size=batch_size)
    full = batch_size is None
    n = 8 if full else 16  # 8 readings of the acceptance either way (minibatches: one every other step)
    kappa = float(target.nbeta) * 2 * 1.0 + target.localization  # ≈ nβ · top eigenvalue of 2XᵀX/n + γ
    good = 0.2 / kappa
    runs = {}
    for name, eps0, ext in [("far", 1e4 * good, 0), ("far+ext", 1e4 * good, 3), ("near+ext", good, 3)]:
        state = sgld(pot, good, deterministic=full).init(target.rows(C))
        _, ad = adapt_step_size("sgld", pot, state, batches, rng, n, torch.tensor([eps0], dtype=F64), C,
                                threshold=1e12, target_accept=0.9, extensions=ext, window=20, deterministic=full)
        runs[name] = ad
    far, ext, near = runs["far"], runs["far+ext"], runs["near+ext"]

    def lag(ad):  # the averaged step over the geometric mean of the steps used in the last quarter
        return float(ad.step_size[0] / ad.step_trace[0, -2:].log().mean().exp())

    assert far.extensions == 0 and far.steps == n and lag(far) > ADAPT_LAG
    assert ext.extensions >= 1 and ext.steps == n + 20 * ext.extensions
    assert ext.extensions == 3 or (float(ext.accept[0]) >= 0.9 - ADAPT_MARGIN and lag(ext) <= ADAPT_LAG)
    # extended, the far start ends where a start near the right step does (measured: 0.0078 against
    # 0.0072); without, 2.7 times above it (0.019)
    ratio = float(ext.step_size[0] / near.step_size[0])
    assert 2 / 3 < ratio < 1.5 and float(far.step_size[0] / near.step_size[0]) > 2
    assert ext.loss_trace.shape == (C, ext.steps) and ext.step_trace.shape == (1, ext.steps)
    assert near.extensions == 0 and near.steps == n


def _gaussian_mala_log_ratios(a: float, eps: float, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """log r of one Langevin proposal from each of ``x`` under U = a x²/2, via the library's
    :func:`slt.samplers.mala_acceptance` arithmetic (one chain per element)."""
    from slt.samplers.base import _log_ratio

    w = x.unsqueeze(1)
    w_new = w - 0.5 * eps * a * w + math.sqrt(eps) * torch.randn(w.shape, generator=g, dtype=F64)
    gu, gu_new = a * w, a * w_new
    s = gu + gu_new
    return _log_ratio(0.5 * a * w[:, 0] ** 2, 0.5 * a * w_new[:, 0] ** 2, ((w_new - w) * s).sum(1),
                      ((gu_new - gu) * s).sum(1), eps)


def test_equilibrium_acceptance_is_the_acceptance_at_equilibrium_and_lower_away_from_it():
    """U = a x²/2 with εa = 0.3 (acceptance ≈ 0.99).  From exact draws of the target (x ~ N(0, 1/a)),
    E[½(1 + min(r, 1/r))] equals E[min(1, r)] to second order in log r: they differ by about
    ½E[(log r)²; log r > 0] ≈ 2e-4 here, so the deficits 1 − α (≈ 0.01) agree within 5% (the paired
    MC error over 10⁶ proposals is < 1% of the deficit).  From a chain displaced by 3 standard
    deviations (what a minibatch chain is to each batch's potential) most proposals move toward the
    mode, r > 1, and min(1, r) hardly drops (deficit 0.014) while the equilibrium form's deficit is
    4× larger (0.055); asserted > 2.5× (the MC error of each is < 1%)."""
    from slt.samplers import acceptance, equilibrium_acceptance

    a, eps = 1000.0, 3e-4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=g, dtype=F64) / math.sqrt(a)
    lr = _gaussian_mala_log_ratios(a, eps, x, g)
    d_metro, d_eq = 1 - float(acceptance(lr).mean()), 1 - float(equilibrium_acceptance(lr).mean())
    assert 0.003 < d_metro < 0.03, d_metro
    assert abs(d_eq - d_metro) < 0.05 * d_metro, (d_eq, d_metro)
    lr = _gaussian_mala_log_ratios(a, eps, x + 3 / math.sqrt(a), g)
    d_metro, d_eq = 1 - float(acceptance(lr).mean()), 1 - float(equilibrium_acceptance(lr).mean())
    assert d_eq > 2.5 * d_metro, (d_eq, d_metro)
    # exact properties: symmetric in log r, 1 at r = 1, never below ½
    t = torch.tensor([-50.0, -1.0, 0.0, 1.0, 50.0], dtype=F64)
    e = equilibrium_acceptance(t)
    assert torch.equal(e, e.flip(0)) and float(e[2]) == 1.0 and float(e.min()) >= 0.5


def test_minibatch_adaptation_finds_the_full_batch_step():
    """DLN [5, 3, 5] oracle (λ = 6.5, n = 10⁴), defaults at batch 256 and at full batch.  Reading the
    Metropolis acceptance on each minibatch, the adaptation chose ε = 6.7e-4, 5.3× the full-batch
    1.28e-4, and λ̂ came out 9.32 ± 0.30 (+43%) with converged=True (1000 draws).  With the
    equilibrium acceptance the minibatch step must not exceed the full-batch one by more than 1.5×
    (measured: 0.55×), and λ̂ must be within 4 s.e. + 10% of λ (the SGLD bias at the adapted step,
    measured +3% at full batch, plus minibatch heating, measured +5% in all at 1000 draws)."""
    from slt.models import DeepLinearNetwork, gaussian_nll, make_dln_data
    from slt.training import train

    X, Y, _ = make_dln_data([5, 3, 5], 0, 10_000, torch.Generator().manual_seed(0), dtype=F64)
    m = DeepLinearNetwork([5, 3, 5], generator=torch.Generator().manual_seed(1), dtype=F64)
    train(m, (X, Y), gaussian_nll, steps=500, lr=1e-2, finish="lbfgs")
    kw = dict(seed=0, progress=False, dtype=F64, num_draws=600)
    mb = slt.estimate_llc(m, (X, Y), gaussian_nll, **kw)
    full = slt.estimate_llc(m, (X, Y), gaussian_nll, batch_size=None, **kw)
    # (the automatic batch starts at 256; heating above 5% of λ̂ raises it once, to 512 here)
    assert mb.config["batch_size"] in (256, 512) and full.config["batch_size"] is None
    assert mb.step_size <= 1.5 * full.step_size, (mb.step_size, full.step_size)
    assert abs(mb.llc_mean - 6.5) <= 4 * mb.llc_sem + 0.65, (mb.llc_mean, mb.llc_sem)


def test_the_run_starts_from_w_star_after_the_adaptation():
    """The adapted chains' positions are not kept: the burn-in's first loss is the loss at w* on its batch
    (to float64 rounding: the control variate is gathered from per-sample losses at w*, the loss is a
    forward pass), the burn-in has ``num_burnin`` steps of its own after the adaptation's, and the
    adaptation did move the chains (so the check can fail)."""
    from slt.engine import sample_target
    from slt.target import prepare_target

    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 3, generator=g, dtype=F64)
    Y = X @ torch.tensor([[1.0], [-1.0], [0.5]], dtype=F64) + 0.3 * torch.randn(300, 1, generator=g, dtype=F64)
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        sol = torch.linalg.lstsq(torch.cat([X, torch.ones(300, 1, dtype=F64)], 1), Y).solution
        model.weight.copy_(sol[:3].T)
        model.bias.copy_(sol[3])
    target = prepare_target(model, (X, Y), torch.nn.functional.mse_loss, dtype=F64, localization=1.0)
    s = sample_target(target, num_chains=3, num_draws=200, num_burnin=100, batch_size=32, progress=False)
    tr = s.trace
    assert tr.burnin.shape == (3, 100) and s.adapt.steps == 80
    torch.testing.assert_close(tr.burnin[:, 0], tr.burnin_star[:, 0], rtol=1e-13, atol=0.0)
    moved = s.adapt.loss_trace[:, -1] - s.adapt.star_trace[:, -1]
    assert bool((moved.abs() > 1e3 * torch.finfo(F64).eps).all())  # the adapted chains were elsewhere


class _Routed(nn.Module):
    """Two linear experts behind a gate: ``hard`` routes each sample to its top expert (top-1, as a Switch
    mixture of experts: the loss jumps where a sample changes expert), else mixes them (smooth)."""

    def __init__(self, hard: bool, d: int = 4):
        super().__init__()
        self.gate = nn.Linear(d, 2)
        self.experts = nn.ModuleList([nn.Linear(d, 1) for _ in range(2)])
        self.hard = hard

    def forward(self, x):
        p = self.gate(x).softmax(-1)
        outs = torch.cat([e(x) for e in self.experts], -1)
        if self.hard:
            k = p.argmax(-1, keepdim=True)
            return p.gather(-1, k) * outs.gather(-1, k)
        return (p * outs).sum(-1, keepdim=True)


@functools.lru_cache(maxsize=None)
def _routed(hard: bool):
    """A routed regression trained to its minimum (float64, fixed seeds): y = ±½ Σx by the sign of x₀."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    X = torch.randn(1000, 4, generator=g, dtype=F64)
    Y = torch.where(X[:, :1] > 0, 0.5, -0.5) * X.sum(1, keepdim=True) + 0.1 * torch.randn(1000, 1, generator=g,
                                                                                         dtype=F64)
    torch.manual_seed(0)  # test-side only
    m = _Routed(hard).double()
    opt = torch.optim.Adam(m.parameters(), 3e-2)
    for _ in range(300):
        opt.zero_grad()
        F.mse_loss(m(X), Y).backward()
        opt.step()
    return m, (X, Y)


@pytest.mark.parametrize("hard", [False, True], ids=["smooth", "jumps"])
def test_jump_ratio_tells_a_smooth_loss_from_one_that_jumps(hard):
    """E|log r| of the Langevin proposal falls as ε^{3/2} for a smooth loss (64× for a 16× smaller step; a
    quadratic: log r = −(ε/8)(2g·HΔ + |HΔ|²), so 64–256×) and as the chance of crossing a jump, ∝ ε^{1/2},
    where the loss jumps (4×).  At ε = 1e-5, two decades below either problem's stability bound (≈ 1e-3),
    where the adaptation of the top-1 router collapses, the smooth router must read above 2 JUMP_RATIO
    and the top-1 router below JUMP_RATIO (16 proposals × 4 chains, fixed seeds; measured 2026-12-05:
    237 and 3.4; at 1e-7, where few of the router's samples lie within a step of their boundary, the
    top-1 router reads 54 — the probe is meant for the step where adaptation stalled)."""
    import torch.nn.functional as F
    from slt.rng import ChainRNG
    from slt.samplers import LocalizedPotential
    from slt.stepsize import JUMP_RATIO, jump_ratio
    from slt.target import prepare_target

    model, data = _routed(hard)
    target = prepare_target(model, data, F.mse_loss, dtype=F64)
    C = 4
    rng = ChainRNG(target.seeds, C, target.device)
    batch, _ = target.batches(rng, C, None)()
    pot = LocalizedPotential(target.evaluator.loss_and_grad, target.rows(C), target.nbeta, target.localization)
    ratio = float(jump_ratio(pot, target.rows(C), batch, torch.tensor([1e-5], dtype=F64), rng, C)[0])
    if hard:
        assert ratio < JUMP_RATIO, ratio
    else:
        assert ratio > 2 * JUMP_RATIO, ratio


def test_a_loss_that_jumps_keeps_the_curvature_step_and_says_why():
    """Regression: a tiny Mixtral (top-2 of 4 experts) adapted ε from 3.5e-5 down to 5e-9 — no step reaches
    acceptance 0.99 where the loss jumps — and its chains, barely moving, gave λ̂ ∝ ε with warnings about
    relaxation only.  Now the collapse is probed (:func:`slt.stepsize.jump_ratio`), ε₀ is kept and a warning
    names the cause; the smooth router adapts as before and is not probed."""
    import torch.nn.functional as F

    kw = dict(num_chains=4, num_draws=100, seed=0, localization=100.0, progress=False)
    model, data = _routed(True)
    with pytest.warns(RuntimeWarning, match=r"the loss jumps where the chains step .* fell only [\d.]+× for a 16× "
                                            r"smaller step .* The run used ε₀ = "):
        r = slt.estimate_llc(model, data, F.mse_loss, **kw)
    d = r.diagnostics
    assert r.step_size == pytest.approx(d["step_size_initial"], rel=1e-12)
    assert d["step_size_collapsed"] < d["step_size_initial"] / 20 and d["adapt_jump_ratio"] < 8
    assert math.isfinite(r.llc_mean)
    model, data = _routed(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*(effective sample size|R-hat)")  # 100 draws: not the point
        r = slt.estimate_llc(model, data, F.mse_loss, **kw)
    assert r.diagnostics["step_size_collapsed"] is None and r.diagnostics["adapt_jump_ratio"] is None


def test_sghmc_with_its_friction_following_eps_keeps_the_curvature_step_without_reading_jumps(monkeypatch):
    """SGHMC with ``friction="auto"`` collapses on smooth losses too (its friction falls with ε, and the velocity
    keeps the heat of the exploratory steps: the README's tiny GPT-2 fell from ε₀ = 3.05e-3 to 1.7e-5 and the
    probe read 4.8 — "jumps" — on a smooth loss).  Forced here on a smooth model by thresholds that every
    adaptation crosses and every probe reads as jumps: both samplers keep ε₀, but only SGLD's replacement is
    put down to jumps (with the warning); SGHMC's is put down to its friction, without the jump warning, and
    ``print`` names it.  A fixed friction is read like SGLD."""
    import torch.nn.functional as F

    import slt.stepsize as stepsize

    monkeypatch.setattr(stepsize, "JUMP_COLLAPSE", 1e-30)  # ε·J < ε₀ for any adapted ε: every adaptation "fell"
    monkeypatch.setattr(stepsize, "JUMP_RATIO", 1e30)  # and every probe reads "jumps"
    kw = dict(num_chains=4, num_draws=100, seed=0, localization=100.0, progress=False)
    model, data = _routed(False)  # smooth
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*loss jumps")
        r = slt.estimate_llc(model, data, F.mse_loss, sampler="sghmc", **kw)
    d = r.diagnostics
    assert d["step_size_collapse_cause"] == "friction" and d["adapt_jump_ratio"] is not None
    assert r.step_size == pytest.approx(d["step_size_initial"], rel=1e-12) and d["step_size_collapsed"] is not None
    assert "SGHMC's adaptation fell to" in str(r)
    with pytest.warns(RuntimeWarning, match="the loss jumps where the chains step"):
        fixed = slt.estimate_llc(model, data, F.mse_loss, sampler=slt.samplers.sghmc(friction=0.5), **kw)
    assert fixed.diagnostics["step_size_collapse_cause"] == "jumps"
    with pytest.warns(RuntimeWarning, match="the loss jumps where the chains step"):
        plain = slt.estimate_llc(model, data, F.mse_loss, **{**kw, "sampler": "sgld"})
    p = plain.diagnostics
    assert p["step_size_collapse_cause"] == "jumps" and p["step_size_collapsed"] is not None
    assert "SGHMC's adaptation" not in str(plain)
