"""SGLD's first-order step bias: the excess of λ̂ over its ε → 0 value from the discretisation and the
minibatch noise together, read from the gradient the sampler computes
(:func:`slt.diagnostics.step_bias`), and the automatic step's rescale when it exceeds
:data:`slt.defaults.STEP_BIAS_SHARE` of λ̂.

Exact: the sampler's ‖∇L_B‖² against the gradient recomputed by hand; the formula; the rescale's
choice on synthetic traces.  Statistical with a known answer: on a Gaussian location model (a plain
module) minibatch SGLD's stationary λ̂ has a closed form in ε, whose excess over ε → 0 the estimate must
match; a one-parameter regression at every default must land within its Monte-Carlo error of the exact
λ (it read +25%, "converged", before the rescale)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt.defaults import STEP_BIAS_MIN_FACTOR, STEP_BIAS_SHARE
from slt.diagnostics import step_bias
from slt.engine import _scale_steps, _step_bias_rescale
from slt.loop import Trace, run_chains
from slt.rng import ChainRNG
from slt.samplers import LocalizedPotential, sgld
from slt.training import train
from test_heating import _half_sq, _Location  # (L(μ) = ½ mean‖x − μ‖² as a plain module)

F64 = torch.float64


def test_sgld_reports_the_squared_gradient_norm_on_its_mala_steps():
    """The steps' ‖∇L_B‖² (float64, per chain) on MALA steps only, summed over the draws by the run loop."""
    C, D, T = 3, 4, 12
    offsets = torch.randn(T, C, D, generator=torch.Generator().manual_seed(0), dtype=F64)

    def loss_and_grad(w, b):  # a "batch" is an offset of the quadratic's mode
        return 0.5 * ((w - b) ** 2).sum(-1), w - b

    it = iter(range(T))
    w0 = torch.zeros(C, D, dtype=F64)
    pot = LocalizedPotential(loss_and_grad, w0, 50.0, 1.0)
    smp = sgld(pot, 5e-3, mala_every=3)
    _, trace = run_chains(smp, smp.init(w0), lambda: (offsets[next(it)], torch.zeros(C, dtype=F64)),
                          ChainRNG([7], C, torch.device("cpu")), T, num_burnin=2)
    rng, state, want, count = ChainRNG([7], C, torch.device("cpu")), smp.init(w0), torch.zeros(C, dtype=F64), 0
    for t in range(T):
        w = state.params
        state, info = smp.step(state, offsets[t], rng)
        assert (info.grad_sq is not None) == (t % 3 == 0)
        if info.grad_sq is not None:
            torch.testing.assert_close(info.grad_sq, ((w - offsets[t]) ** 2).sum(-1), rtol=1e-12, atol=0)
            if t >= 2:
                want, count = want + info.grad_sq, count + 1
    assert trace.grad_sq_count == count == 3
    torch.testing.assert_close(trace.grad_sq, want / count, rtol=1e-12, atol=0)
    # continued traces join their sums; RMSProp-SGLD reports nothing (its metric changes the formula)
    both = trace.then(trace)
    assert both.grad_sq_count == 6 and torch.allclose(both.grad_sq, trace.grad_sq)
    rms = slt.samplers.rmsprop_sgld(pot, 5e-3, mala_every=1)
    assert rms.step(rms.init(w0), offsets[0], ChainRNG([7], C, torch.device("cpu")))[1].grad_sq is None
    # the formula, ε per chain or one number
    eps = torch.tensor([[1e-3], [2e-3], [4e-3]], dtype=F64)
    torch.testing.assert_close(step_bias(trace.grad_sq, eps, 100.0), trace.grad_sq * eps.flatten() * 100.0**2 / 8)
    torch.testing.assert_close(step_bias(trace.grad_sq, 1e-3, 100.0), trace.grad_sq * 1e-3 * 100.0**2 / 8)


def _trace(values: torch.Tensor, grad_sq: torch.Tensor, diverged: torch.Tensor | None = None) -> Trace:
    R, T = values.shape
    return Trace(values, torch.zeros(R, T, dtype=F64), torch.zeros(R, 0, dtype=F64), torch.zeros(R, 0, dtype=F64),
                 diverged=torch.zeros(R, dtype=torch.bool) if diverged is None else diverged,
                 grad_sq_sum=grad_sq * 5, grad_sq_count=5)


def test_the_rescale_shrinks_only_the_groups_whose_bias_exceeds_the_share():
    """Two groups of 2 chains at nβ = 10, λ̂ = 10·mean(L − L*): group 0 λ̂ = 10 with bias 2 (20%: factor
    0.05·10/2 = 0.25), group 1 λ̂ = 10 with bias 0.3 (3%: kept); a bias of 8 (80%) is clamped at the
    least factor; a diverged chain does not count; no reading, no rescale."""
    values = torch.ones(4, 6, dtype=F64)  # λ̂ = 10 in both groups
    eps, nb = 1e-3, 10.0
    per_bias = lambda b: b / (eps * nb**2 / 8)  # noqa: E731  the ‖∇L_B‖² that gives bias b
    got = _step_bias_rescale(_trace(values, torch.tensor([per_bias(2.0)] * 2 + [per_bias(0.3)] * 2)), eps, nb, 2, 2)
    assert list(got) == [0] and math.isclose(got[0]["fraction"], 0.2) and math.isclose(got[0]["factor"], 0.25)
    assert math.isclose(STEP_BIAS_SHARE * 10 / 2.0, 0.25)
    hot = _step_bias_rescale(_trace(values, torch.tensor([per_bias(8.0)] * 4)), eps, nb, 2, 2)
    assert all(v["factor"] == STEP_BIAS_MIN_FACTOR for v in hot.values())
    # the diverged chain's huge reading is left out: group 0's other chain has bias 0.3
    dead = torch.tensor([True, False, False, False])
    assert not _step_bias_rescale(_trace(values, torch.tensor([per_bias(1e6), per_bias(0.3), 0.0, 0.0]), dead),
                                  eps, nb, 2, 2)
    empty = Trace(values, torch.zeros(4, 6, dtype=F64), torch.zeros(4, 0), torch.zeros(4, 0))
    assert _step_bias_rescale(empty, eps, nb, 2, 2) == {}
    steps = _scale_steps(eps, got, 2, 2, F64, "cpu")
    assert steps.shape == (4, 1) and steps.flatten().tolist() == [eps * 0.25] * 2 + [eps] * 2


def test_the_step_bias_matches_the_closed_form_excess_of_minibatch_sgld_on_a_gaussian():
    r"""L_B(μ) = ½ mean_B‖x − μ‖², n = 10⁴, d = 5, γ = 1, 8 chains, float64, a given ε (no rescale).  With
    y = μ − x̄, a = nβ + γ and s² the data's variance per coordinate, SGLD's stationary variance is
    Var y = (ε + ε² nβ² s²/(4B)) / (εa(1 − εa/4)) (full batch: s² = 0), so the excess of
    E λ̂ = (nβ/2) Σ Var y over its ε → 0 value (nβ/2) d/a is known exactly.  The estimate
    (ε/8) nβ² E‖∇L_B‖², E‖∇L_B‖² = Σ (Var y + s²/B), agrees with it to first order in εa; its own
    Monte-Carlo error is below 1% here (8 chains × 200 readings × 5 coordinates), so 10% holds the
    second-order terms (εa/4 ≈ 0.06: 6%) with room.  Both at full batch (discretisation alone) and at
    batch 64 (with heating)."""
    X = torch.randn(10_000, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    n, d = X.shape
    for B, eps in ((None, 2.2e-4), (64, 2.2e-4)):
        r = slt.estimate_llc(_Location(X.mean(0)), X, _half_sq, num_chains=8, num_draws=2000, num_burnin=500,
                             batch_size=B, step_size=eps, localization=1.0, dtype=F64, seed=0, progress=False)
        nb = r.nbeta
        a = nb + 1.0
        s2 = torch.zeros(d, dtype=F64) if B is None else X.var(0, unbiased=False)
        var_y = (eps + eps**2 * nb**2 * s2 / (4 * (B or 1))) / (eps * a * (1 - eps * a / 4))
        exact = float(nb / 2 * var_y.sum())
        excess = exact - nb / 2 * d / a
        assert 0.05 * exact < excess  # the regime the test is about
        assert abs(r.llc_mean - exact) < 4 * r.llc_sem, (B, r.llc_mean, r.llc_sem, exact)
        bias = r.diagnostics["step_bias"]
        assert abs(bias["excess"] / excess - 1) < 0.1, (B, bias, excess)
        assert r.diagnostics["step_bias_rescale"] is None  # a given step is the user's
        assert "step bias ≈" in str(r)


def test_a_one_parameter_regression_at_every_default_is_within_its_error():
    """y = a·x, n = 10⁴, every default (minibatches of 256): the adapted step gave εκ/4 ≈ 0.05 and minibatch
    heating as much again, and λ̂ read 0.624 ± 0.037 against the exact 0.4998 (z = 3.3; 0.595 ± 0.012
    over six seeds), "converged".  Now the run is repeated at a shrunk step and lands within 3 s.e.; its
    printed record says so."""
    g = torch.Generator().manual_seed(10_001)
    X = torch.randn(10_000, 1, generator=g)
    Y = X @ torch.randn(1, 1, generator=g) + 0.5 * torch.randn(10_000, 1, generator=g)
    model = nn.Linear(1, 1, bias=False)
    train(model, (X, Y), F.mse_loss)
    r = slt.estimate_llc(model.eval(), (X, Y), F.mse_loss, seed=0, progress=False)
    exact = slt.theory.exact_quadratic_llc(torch.linalg.eigvalsh(2 * X.double().T @ X.double() / 10_000).tolist(),
                                           r.nbeta, r.localization)
    shrunk = r.diagnostics["step_bias_rescale"]
    assert shrunk is not None and shrunk["fraction"] > STEP_BIAS_SHARE and shrunk["to"] < shrunk["from"]
    assert r.diagnostics["step_bias"]["fraction"] < 2 * STEP_BIAS_SHARE
    assert abs(r.llc_mean - exact) < 3 * r.llc_sem, (r.llc_mean, r.llc_sem, exact)
    assert r.converged, r.convergence_reasons
    assert "step_size shrunk" in str(r)


def test_a_given_step_with_a_large_step_bias_is_a_finding():
    """The heating rule on the whole excess: half of it beyond 2% of λ̂ and beyond 2 s.e. or 10% of λ̂;
    the fix names the step that brings it to the share.  Through ``LLCResult.from_traces``: once, and
    not beside the heating finding (which names the larger part)."""
    from slt.result import LLCResult, step_bias_check

    assert step_bias_check(2.0, llc=10.0, sem=0.2) is not None  # 1.0 > 0.4
    assert step_bias_check(2.0, llc=10.0, sem=0.6) is None  # 1.0 ≤ 2 s.e. and ≤ 10% of λ̂
    assert step_bias_check(0.3, llc=10.0, sem=0.01) is None  # 0.15 < 2% of λ̂
    msg = step_bias_check(2.0, llc=10.0, sem=0.2, heating={"excess": 0.5}, config={"step_size": 1e-3})
    assert "discretisation about 1.5, minibatch heating about 0.5" in msg and "step_size=0.00025" in msg
    g = torch.Generator().manual_seed(0)
    C, T = 8, 200
    loss = 1.0 + 0.05 * torch.randn(C, T, generator=g, dtype=F64)  # λ̂ = 10 (nβ = 10), s.e. ≈ 0.013

    def res(bias, heating=None):
        return LLCResult.from_traces(loss, torch.zeros(C, T, dtype=F64), nbeta=10.0, init_loss=0.0, step_size=1e-3,
                                     localization=1.0, sampler="sgld", step_bias=bias, heating=heating,
                                     config={"num_burnin": 50, "num_draws": T, "step_size": 1e-3})

    hot = res(torch.full((C,), 2.0, dtype=F64))
    assert not hot.converged and [s for s in hot.convergence_reasons if s.startswith("SGLD's step bias")]
    assert res(torch.full((C,), 0.2, dtype=F64)).converged
    both = res(torch.full((C,), 2.0, dtype=F64), heating=torch.full((C,), 1.8, dtype=F64))
    assert [s[:21] for s in both.convergence_reasons] == ["minibatch noise heats"]  # (the rest, 0.2: half of it within 2%)
    # beside the heating finding a larger discretisation part is named on its own (target_accept=0.9 named only
    # the heating, a third of the bias)
    more = res(torch.full((C,), 4.0, dtype=F64), heating=torch.full((C,), 1.0, dtype=F64))
    assert [s[:40] for s in more.convergence_reasons] == ["minibatch noise heats the chains: it add",
                                                          "SGLD's discretisation bias, besides the "]
    assert "about 3 more (30%" in more.convergence_reasons[1]
