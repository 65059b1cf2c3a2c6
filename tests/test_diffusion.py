"""Chains that still diffuse freely: :func:`slt.diagnostics.free_diffusion` and the ``"diffusing"`` finding.

A trained GRU at its adapted step (ε ≈ 1.5e-9, γ = 100, 1250 steps) spread exactly like a free random
walk (‖w − w*‖² = 0.98 d·ε·t) and its λ̂ halved with ε, yet the trend test (z = 2.5 against a 3σ
threshold of 4.5 for 8 chains) and the trace-based halving check passed it as converged.  These tests:

* statistical: the spread of a free Gaussian walk is 1 (Monte-Carlo error √(2/d) per row), and that of
  an Ornstein–Uhlenbeck chain long after it relaxed is about 1/(γεt);
* exact: the finding fires for chains spreading freely whose λ̂ grows as λ̂ ∝ t predicts, also at a low z,
  and not for a settled λ̂, nor for a growing λ̂ of chains the potential holds;
* end to end: a small MLP run at a step far too small for its run is not converged and says why;
  at a workable step the spread is small.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt.training import train
from slt.diagnostics import free_diffusion
from slt.result import FREE_DIFFUSION, LLCResult, equilibrium_checks

F64 = torch.float64


def _sq(w: torch.Tensor, w_star: torch.Tensor) -> torch.Tensor:
    """‖w − w*‖² per row, as the engine takes it (LocalizedPotential.squared_distance)."""
    from slt.samplers import LocalizedPotential

    return LocalizedPotential(lambda p, b: None, w_star, 1.0, 1.0).squared_distance(w)


def test_a_free_walk_spreads_as_d_eps_t():
    """100 steps of N(0, ε) per coordinate, d = 5000: f = ‖w − w*‖²/(d ε t) has mean 1 and standard
    deviation √(2/d) = 0.02 per row (a χ² with d degrees of freedom over d): within 5σ = 0.1 for every
    row; a per-row ε (R, 1) and per-row dimensions give the same."""
    g = torch.Generator().manual_seed(0)
    R, d, t, eps = 4, 5000, 100, 1e-3
    w_star = torch.randn(1, d, generator=g, dtype=F64).expand(R, d)
    w = w_star + math.sqrt(eps * t) * torch.randn(R, d, generator=g, dtype=F64)  # the sum of t steps
    f = free_diffusion(_sq(w, w_star), eps, t, d)
    assert f.shape == (R,) and f.dtype == F64
    assert bool(((f - 1).abs() < 5 * math.sqrt(2 / d)).all()), f
    f2 = free_diffusion(_sq(w, w_star), torch.full((R, 1), eps, dtype=F64), t, torch.full((R,), float(d)))
    torch.testing.assert_close(f2, f, rtol=1e-12, atol=0.0)
    # half the coordinates frozen (a restricted row): the moved ones set the scale
    w_half = w.clone()
    w_half[:, d // 2:] = w_star[:, d // 2:]
    f3 = free_diffusion(_sq(w_half, w_star), eps, t, torch.full((R,), float(d // 2)))
    assert bool(((f3 - 1).abs() < 5 * math.sqrt(2 / (d // 2))).all()), f3


def test_a_relaxed_chain_spreads_about_one_over_gamma_eps_t():
    """SGLD on U = γ/2 ‖w‖² (no loss), ε = 0.01, γ = 1, t = 2000 steps (εγt = 20: relaxed): the variance
    per coordinate is ε/(1 − (1 − εγ/2)²) ≈ 1/γ (1.0025), so f ≈ 1/(γεt) = 0.05, far below the
    threshold; d = 2000 gives each row's f a relative error √(2/d) = 3%: within 15%."""
    g = torch.Generator().manual_seed(1)
    R, d, t, eps, gamma = 3, 2000, 2000, 0.01, 1.0
    w = torch.zeros(R, d, dtype=F64)
    for _ in range(t):
        w = w - 0.5 * eps * gamma * w + math.sqrt(eps) * torch.randn(R, d, generator=g, dtype=F64)
    f = free_diffusion(_sq(w, torch.zeros(1, d, dtype=F64).expand(R, d)), eps, t, d)
    expected = eps / (1 - (1 - 0.5 * eps * gamma) ** 2) / (eps * t)
    assert bool(((f / expected - 1).abs() < 0.15).all()), (f, expected)
    assert bool((f < FREE_DIFFUSION).all())


def _trace(C: int, T: int, start: float, slope: float, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=F64)
    return start + slope * t + noise * torch.randn(C, T, generator=g, dtype=F64)


def test_the_finding_fires_for_free_chains_whose_estimate_grows_with_time():
    """Draws at steps 250 … 1249 (burn-in 250).  λ̂ ∝ t with a large spread across chains (each chain's
    own slope): the trend's z stays below the 3σ threshold, yet with f = 0.98 the growth (the halves'
    ratio about 2 against a predicted 2) is a finding; the same trace with f = 0.2 (chains held) is
    not, and neither is a settled λ̂ with f = 0.98."""
    C, T = 8, 1000
    times = 250 + torch.arange(T, dtype=F64)
    g = torch.Generator().manual_seed(3)
    slopes = 0.004 * (1 + 0.9 * torch.randn(C, 1, generator=g, dtype=F64))  # chains disagree on the rate
    tr = slopes * times + 0.5 * torch.randn(C, T, generator=g, dtype=F64)
    free, held = torch.full((C,), 0.98), torch.full((C,), 0.2)
    _, drift, found = equilibrium_checks(tr, diffusion=free, times=times, rhat_threshold=math.inf)
    kinds = [k for k, _ in found]
    assert drift[2] < 4.5 and "rising" not in kinds, drift  # the trend test alone passes it
    assert "diffusing" in kinds
    msg = dict(found)["diffusing"]
    assert "0.98" in msg and "step_size" in msg and "localization" in msg
    assert "diffusing" not in [k for k, _ in equilibrium_checks(tr, diffusion=held, times=times,
                                                                  rhat_threshold=math.inf)[2]]
    flat = _trace(C, T, 4.0, 0.0, 0.5, seed=4)
    assert "diffusing" not in [k for k, _ in equilibrium_checks(flat, diffusion=free, times=times,
                                                                  rhat_threshold=math.inf)[2]]


def test_from_traces_records_the_spread_and_is_not_converged():
    """Through :meth:`LLCResult.from_traces`: ``diagnostics["free_diffusion"]`` is the mean over the
    valid chains (a divergent chain left out) and the finding makes ``converged`` False."""
    C, T = 8, 400
    times = 100 + torch.arange(T, dtype=F64)
    loss = 1e-3 * times.expand(C, T).clone()  # nβ = 10: λ̂ = 0.01 t, growing with time
    diffusion = torch.full((C,), 0.9, dtype=F64)
    diffusion[0] = 5.0
    diverged = torch.zeros(C, dtype=torch.bool)
    diverged[0] = True
    r = LLCResult.from_traces(loss + 1e-4 * torch.randn(C, T, generator=torch.Generator().manual_seed(5), dtype=F64),
                              torch.zeros(C, T, dtype=F64), nbeta=10.0, init_loss=0.0, step_size=1e-3,
                              localization=1.0, sampler="sgld", diverged=diverged,
                              divergence_step=torch.tensor([5] + [-1] * (C - 1)), draw_steps=times.long(),
                              diffusion=diffusion, draw_times=times)
    assert math.isclose(r.diagnostics["free_diffusion"], 0.9, rel_tol=1e-12)
    assert not r.converged
    assert "spread ‖w − w*‖² = 0.9 of a free random walk's d·ε·t (the potential has not yet held" in str(r)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


def test_an_mlp_at_a_far_too_small_step_is_not_converged_and_says_why():
    """A 193-parameter MLP trained to a minimum of a regression (L ≈ 2e-7), sampled from w* at
    ε = 1e-7 (γ = 1, nβ = 100, batch 256, 600 draws, no burn-in: εt ≤ 6e-5, so only directions of curvature above
    1/(εt) ≈ 1.7e4 relax): the chains spread like a free walk (f ≈ 1.05 measured; bound 0.9) and λ̂
    grows about as λ̂ ∝ t predicts (halves' ratio 2.8 measured against 3, the finding's threshold 2).
    On minibatches without the MALA diagnostic (which would name the cause as "barely moved") the
    finding is "diffuse freely", in place of "rising".  At ε = 1e-3 with γ = 100 (γεt = 60: every direction held)
    the spread is small (0.016 measured; bound 0.1) and no such finding is made."""
    torch.manual_seed(0)
    X = torch.randn(512, 4)
    Y = torch.sin(X[:, :1] + 0.5 * X[:, 1:2])
    model = _MLP()
    train(model, (X, Y), F.mse_loss, steps=3000, lr=1e-2)
    kw = dict(num_chains=8, num_draws=600, num_burnin=0, nbeta=100.0, batch_size=256, seed=0, progress=False)
    tiny = slt.estimate_llc(model, (X, Y), F.mse_loss, step_size=1e-7, localization=1.0, mala_every=0, **kw)
    assert tiny.diagnostics["free_diffusion"] > 0.9
    assert not tiny.converged
    reasons = tiny.convergence_reasons
    assert any("diffuse freely" in m for m in reasons), reasons
    assert not any("still rising" in m for m in reasons), reasons
    with_mala = slt.estimate_llc(model, (X, Y), F.mse_loss, step_size=1e-7, localization=1.0, **kw)
    assert not with_mala.converged
    assert any("diffuse freely" in m or "barely moved" in m for m in with_mala.convergence_reasons)
    fine = slt.estimate_llc(model, (X, Y), F.mse_loss, step_size=1e-3, localization=100.0, **kw)
    assert fine.diagnostics["free_diffusion"] < 0.1
    assert not any("diffuse freely" in m for m in fine.convergence_reasons), fine.convergence_reasons


def test_a_run_far_shorter_than_one_relaxation_whose_chains_spread_freely_is_not_converged():
    """Exact tier of :func:`slt.result.unexplored_finding`: spread 0.92 of a free walk and εγ·t = 0.0019
    (ε = 5e-8, γ = 100, 375 steps) is a finding; εγ·t at the threshold's double, a spread under
    FREE_DIFFUSION, or a sampler whose relaxation differs (SGHMC) is not.  Through ``from_traces``: a flat
    λ̂ (no trend for the other checks to see) is not converged, with the finding among the reasons."""
    from slt.result import UNEXPLORED_RELAXATION, unexplored_finding

    assert "explored only the stiffest directions" in unexplored_finding(0.92, 5e-8, 100.0, 375.0, "sgld")
    assert unexplored_finding(0.92, 2 * UNEXPLORED_RELAXATION / (100.0 * 375.0), 100.0, 375.0, "sgld") is None
    assert unexplored_finding(FREE_DIFFUSION / 2, 5e-8, 100.0, 375.0, "sgld") is None
    assert unexplored_finding(0.92, 5e-8, 100.0, 375.0, "sghmc") is None
    # RMSProp-SGLD: SGLD in its frozen metric G ≤ 1/a, judged on G·εγ·t (the same MLP's fallback: 0.066, spread 0.99)
    assert "G·εγ·t = 0.066" in unexplored_finding(0.99, 1.76e-7, 100.0, 375.0, "rmsprop_sgld", 10.0)
    assert unexplored_finding(0.99, 1.76e-7, 100.0, 375.0 * 10, "rmsprop_sgld", 10.0) is None  # G·εγ·t = 0.66
    C, T = 8, 300
    times = 75 + torch.arange(T, dtype=F64)
    loss = 1.5 + 0.01 * torch.randn(C, T, generator=torch.Generator().manual_seed(1), dtype=F64)  # λ̂ = 5, flat
    kw = dict(nbeta=10.0, init_loss=1.0, localization=100.0, sampler="sgld", draw_steps=times.long(),
              draw_times=times, diffusion=torch.full((C,), 0.92, dtype=F64))
    r = LLCResult.from_traces(loss, torch.ones(C, T, dtype=F64), step_size=5e-8, **kw)
    assert not r.converged and any("explored only the stiffest" in m for m in r.convergence_reasons)
    ok = LLCResult.from_traces(loss, torch.ones(C, T, dtype=F64), step_size=1e-4, **kw)  # εγt = 3.75
    assert not any("explored only" in m for m in ok.convergence_reasons)


def test_a_classifier_whose_weights_grew_large_is_not_reported_converged():
    """End to end: a tanh MLP on noisy labels, whose L-BFGS finish grows its weights to ~130 (the loss keeps
    falling; curvature ~6000 at w*): the adapted step is ~5e-8 at γ = 100, the chains barely leave w*
    (εγt ≈ 0.002) and λ̂ came out flat and "converged" (4.4 ± 0.3; runs at 10× and 100× the step read 15
    and 240).  Now it is not converged, and says why."""
    torch.manual_seed(0)
    X = torch.randn(2048, 8)
    Y = torch.multinomial(F.softmax(X[:, :3], 1), 1).squeeze(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    train(model, (X, Y), F.cross_entropy, steps=500, lr=1e-2)
    assert max(p.abs().max().item() for p in model.parameters()) > 20  # the premise: weights grew large
    r = slt.estimate_llc(model, (X, Y), F.cross_entropy, num_chains=4, num_draws=300, localization=100.0,
                         batch_size=64, seed=0, progress=False)
    assert r.step_size * r.localization * (r.config["num_burnin"] + r.num_draws) < 0.01
    assert not r.converged and any("explored only the stiffest" in m for m in r.convergence_reasons)


def test_chains_that_explored_only_the_stiffest_directions_raise_the_automatic_localization():
    """The same MLP at every default: the finding is one of the automatic γ's reasons to raise γ (it was
    applied only to the final result, so the run stopped at γ = 1, not converged).  Raising γ tenfold
    multiplies εγ·t tenfold where ε is set by the stiffest direction; here it is not enough: SGLD is still
    unexplored at γ = 100, and RMSProp-SGLD's fallback run there (G·εγ·t = 0.066, spread 0.99) gave λ̂
    4.9 "settled" where a burn-in of 5/(ε·G·γ) gives 10.2 ± 0.9 — so it must not be taken as settled."""
    torch.manual_seed(0)
    X = torch.randn(2048, 8)
    Y = torch.multinomial(F.softmax(X[:, :3], 1), 1).squeeze(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    train(model, (X, Y), F.cross_entropy, steps=500, lr=1e-2)
    r = slt.estimate_llc(model.eval(), (X, Y), F.cross_entropy, num_chains=4, num_draws=300, batch_size=64, seed=0,
                         progress=False)
    ups = r.config["localization_escalations"]
    assert [u["localization"] for u in ups] == [1.0, 10.0]
    assert all(any("explored only the stiffest" in m for m in u["reasons"]) for u in ups)
    fb = r.config["sampler_fallback"]
    assert fb is not None and fb["to"] == "rmsprop_sgld" and fb["settled"] is False
    assert any("G·εγ·t" in m for m in fb["reasons_after"])
    assert not r.converged and any("explored only the stiffest" in m for m in r.convergence_reasons)


def test_a_given_step_with_low_mala_acceptance_is_not_converged():
    """A step_size given by hand is judged by its MALA acceptance: SGLD's discretisation bias inflates λ̂ with ε
    and the in-run checks see relaxation, not that bias.  A softplus MLP (4-8-1, γ = 10, 500 + 1500 steps, 8
    chains) read λ̂ 30.4 ± 2.1 "converged" at ε = 1e-3 (MALA 0.59) against 4.3–4.5 at small steps.  Exact tier
    through ``from_traces``, end to end on that model (shorter run, 4 chains)."""
    from slt.result import MALA_GIVEN_MIN, given_step_finding

    assert "step_size=0.0005" in given_step_finding(0.59, 1e-3, {"step_size_rule": "given"})
    assert given_step_finding(MALA_GIVEN_MIN + 0.01, 1e-3, {"step_size_rule": "given"}) is None
    assert given_step_finding(0.59, 1e-3, {"step_size_rule": "adapt"}) is None
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 4, generator=g)
    Y = torch.tanh(X @ torch.randn(4, 1, generator=g)) + 0.1 * torch.randn(500, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Softplus(), nn.Linear(8, 1))
    train(model, (X, Y), F.mse_loss, steps=1500, lr=1e-2, finish=None)
    kw = dict(localization=10.0, num_burnin=200, num_draws=300, batch_size=None, num_chains=4, seed=0, sampler="sgld",
              extend_draws=False, progress=False)
    big = slt.estimate_llc(model.eval(), (X, Y), F.mse_loss, step_size=1e-3, **kw)
    assert big.diagnostics["mala_acceptance"] < MALA_GIVEN_MIN
    assert not big.converged and any("MALA acceptance" in m and "discretisation bias" in m
                                     for m in big.convergence_reasons)
    small = slt.estimate_llc(model.eval(), (X, Y), F.mse_loss, step_size=1e-4, **kw)
    assert small.diagnostics["mala_acceptance"] >= MALA_GIVEN_MIN
    assert not any("discretisation bias" in m for m in small.convergence_reasons)
    assert big.llc_mean > 2 * small.llc_mean  # (the premise: the bias at the large step)
