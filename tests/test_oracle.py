"""Oracle tier: λ̂ against closed-form learning coefficients.

Tolerance basis.  The closed forms are asymptotic in n; at finite n the LLC
estimator carries O(1/log n) corrections of either sign (Chen et al. 2023
report SGLD estimates 10% and 6% above the TMS 5-gon and 6-gon values at
n = 5000; Lau et al. 2023 report DLN estimates within ~10%).  The issue's
acceptance band is therefore 10% of λ, and each test also requires the
Monte-Carlo standard error to be well inside that band (≤ 4% of λ), so a
pass cannot come from a noisy estimate.  w* is always trained to the minimum
of the empirical loss.  Hyperparameters are fixed, not tuned per seed; the
localization γ is fixed in n (see :func:`slt.default_localization`).
"""

from __future__ import annotations

import math

import pytest
import torch

import slt
from slt import theory
from slt.models import (
    DeepLinearNetwork,
    NormalCrossing,
    ToyModelOfSuperposition,
    gaussian_nll,
    kgon_parameters,
    make_dln_data,
    make_normal_crossing_data,
    make_tms_sparse_data,
    tms_loss,
)
from slt.training import train

from conftest import IGNORE_CHECKPOINT_WARNING

pytestmark = IGNORE_CHECKPOINT_WARNING


def _check(r, lam, band=0.10):
    assert r.divergent_chains == []
    assert r.llc_sem <= 0.04 * lam, f"MC error too large: {r.llc_sem}"
    assert abs(r.llc_mean - lam) <= band * lam, f"λ̂ = {r.llc_mean:.3f} ± {r.llc_sem:.3f}, λ = {lam}"


@pytest.fixture(scope="module")
def tms_results():
    """5-gon and 6-gon of TMS(6, 2), n = 20 000, both in one batched call."""
    X = make_tms_sparse_data(20_000, 6, torch.Generator().manual_seed(0))
    models = []
    for k in (5, 6):
        m = ToyModelOfSuperposition(6, 2)
        m.load_state_dict({n: v.float() for n, v in kgon_parameters(k, 6, 2, dead_bias=-1.0).items()})
        assert train(m, X, tms_loss, steps=0, finish="lbfgs").converged
        models.append(m)
    return slt.estimate_llc(models, X, tms_loss, num_chains=8, num_draws=4000, num_burnin=1000,
                            localization=10.0, seed=0, progress=False)


@pytest.mark.parametrize("index, point", [(0, "5-gon"), (1, "6-gon")])
def test_tms_kgon(tms_results, index, point):
    _check(tms_results[index], theory.tms_llc(point))


def test_tms_ordinality(tms_results):
    """The 5-gon is the more degenerate point (λ = 7 < 8.5): lower λ̂."""
    five, six = tms_results
    assert five.llc_mean + 3 * math.hypot(five.llc_sem, six.llc_sem) < six.llc_mean


DLN_CASES = [
    ([3, 2, 3], 1),  # reduced-rank regression, case 1
    ([5, 3, 4], 2),  # reduced-rank regression
    ([5, 3, 5], 0),  # zero truth
    ([4, 3, 3, 4], 1),  # depth 3
]


@pytest.mark.parametrize("widths, rank", DLN_CASES)
def test_deep_linear_network(widths, rank):
    n = 10_000
    X, Y, _ = make_dln_data(widths, rank, n, torch.Generator().manual_seed(0), dtype=torch.float64)
    m = DeepLinearNetwork(widths, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert train(m, (X, Y), gaussian_nll, steps=500, lr=1e-2, finish="lbfgs").converged
    r = slt.estimate_llc(m, (X, Y), gaussian_nll, num_chains=8, num_draws=3000, num_burnin=1000,
                         batch_size=None, dtype=torch.float64, seed=0, progress=False)
    _check(r, theory.dln_llc(widths, rank))


@pytest.mark.slow
@pytest.mark.parametrize("widths, rank", [([4, 4, 4, 4], 2), ([6, 4, 5], 1), ([3, 5, 2], 1)])
def test_deep_linear_network_more(widths, rank):
    test_deep_linear_network(widths, rank)


def _normal_crossing_exact(powers, X, Y, w_star, nbeta, gamma, half_width=6.0, num=6001):
    """E[nβ (L_n(w) − L_n(w*))] under the localized tempered posterior, by
    quadrature on a grid around w* (d ≤ 2).  L_n depends on w only through
    p = Π w_i^{k_i}: L_n(w) − L_n(w*) = ½ mean(x²) (p − p̂)² exactly."""
    s = float((X**2).mean())
    p_hat = float((X * Y).sum() / (X**2).sum())
    g = torch.linspace(-half_width, half_width, num, dtype=torch.float64)
    axes = [g + float(w_star[i]) for i in range(len(powers))]
    grids = torch.meshgrid(*axes, indexing="ij")
    p = torch.ones_like(grids[0])
    for w, k in zip(grids, powers):
        p = p * w**k
    E = 0.5 * s * (p - p_hat) ** 2
    logw = -nbeta * E - 0.5 * gamma * sum((w - float(w_star[i])) ** 2 for i, w in enumerate(grids))
    wt = torch.softmax(logw.flatten(), 0)
    return float((wt * nbeta * E.flatten()).sum())


@pytest.mark.slow
@pytest.mark.parametrize(
    "powers, step_size, gamma, draws",
    [([1], 3e-5, 1.0, 8000), ([1, 2], 3e-4, 0.1, 20000), ([1, 3], 3e-4, 0.1, 20000)],
)
def test_normal_crossing(powers, step_size, gamma, draws):
    """K(w) = Π w_i^{2k_i}, multiplicity 1, λ = 1/(2 max k).  Full batch, n = 10⁴.

    Two checks.  (1) The sharp one: λ̂ against the exact finite-n expectation
    (quadrature on the same potential) within 4 s.e.  (2) The 10% band around
    the closed-form λ.  The exact finite-n value depends on γ: at n = 10⁴
    (nβ ≈ 1086) it is 0.221 for k = (1, 2) with γ = 1 (12% below λ = 1/4: the
    localization truncates the flat direction) but 0.246 with γ = 0.1 (−1.6%);
    0.150 vs 0.165 for k = (1, 3) (λ = 1/6).  So the singular cases use γ = 0.1,
    where the band tests the sampler rather than the asymptotics; their s.e.
    is ≈ 6% of λ (32 chains × 20000 draws, slow mixing along the wide flat
    direction) and SGLD's discretization bias at ε = 3e-4 is ≈ +1 s.e., so the
    band is the issue's criterion, not a multiple of the s.e.  The regular
    case [1] has curvature nβ·mean(x²) ≈ 1086 everywhere, so its step is 10×
    smaller: SGLD's bias εκ/4 is 0.8% at ε = 3e-5.
    """
    n = 10_000
    X, Y = make_normal_crossing_data(n, torch.Generator().manual_seed(0), dtype=torch.float64)
    m = NormalCrossing(powers, dtype=torch.float64)
    with torch.no_grad():
        m.w.copy_(m.empirical_minimum(X, Y))
    r = slt.estimate_llc(m, (X, Y), gaussian_nll, num_chains=32, num_draws=draws, num_burnin=draws // 4,
                         batch_size=None, localization=gamma, step_size=step_size, dtype=torch.float64,
                         seed=0, progress=False)
    lam = theory.normal_crossing_llc(powers)
    exact = _normal_crossing_exact(powers, X, Y, m.w.detach(), r.nbeta, gamma,
                                   half_width=6.0 / math.sqrt(gamma),
                                   num=200_001 if len(powers) == 1 else 8001)
    assert r.divergent_chains == []
    assert abs(r.llc_mean - exact) < 4 * r.llc_sem, (r.llc_mean, r.llc_sem, exact)
    assert abs(exact - lam) / lam < 0.05, (exact, lam)
    assert abs(r.llc_mean - lam) <= 0.10 * lam, f"λ̂ = {r.llc_mean:.4f} ± {r.llc_sem:.4f}, λ = {lam}"
