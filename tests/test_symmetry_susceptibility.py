"""LLC susceptibility: covariance estimator vs closed form vs finite differences (fast tier)."""

import copy
import math

import pytest
import torch

import slt
from slt.models import ABSquaredGaussian, GaussianLocation
from slt.symmetry import Reflection, llc_finite_difference, llc_susceptibilities, llc_susceptibility, symmetrize
from slt.symmetry.susceptibility import full_data_loss

from conftest import F64, IGNORE_RUNTIME_WARNINGS

# quenched w* is not a minimum of L_h for h != h*: the engine rightly warns; not under test here
pytestmark = IGNORE_RUNTIME_WARNINGS


def _quadratic_setup(n=500, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=F64)
    shift = torch.zeros(d, dtype=F64)
    shift[0] = 0.3
    x1 = torch.randn(n, d, generator=g, dtype=F64) + shift
    m = GaussianLocation(d, dtype=F64)
    with torch.no_grad():
        m.w.copy_(x0.mean(0))  # w* = the minimum of L_{q0}
    return x0, x1, m


def _quadratic_closed_form(x0, x1, w_star, h, nb, gam, eps):
    r"""Exact dλ̂/dh (quenched) and the covariance estimator's expectation for SGLD.

    L_h(w) = ½|w − x̄_h|² + c, so the localized posterior is N(m_h, v I) with
    m_h = (nβ x̄_h + γ w*)/κ, κ = nβ + γ; SGLD's stationary law is N(m_h, v I) with
    v = 1/(κ(1 − εκ/4)) (exact mean, inflated variance).  With D = x̄_h − w* and
    Δ = x̄_1 − x̄_0: λ̂(h) = nβ(d v/2 + ½|m_h − x̄_h|² − ½|D|²), so
    dλ̂/dh = nβ (γ²/κ² − 1) D·Δ for any v; the covariance formula gives
    nβ(E ΔL − ΔL(w*)) − (nβ)² Cov = −(nβ)² D·Δ/κ − (nβ)² v γ D·Δ/κ.
    """
    k = nb + gam
    D = (1 - h) * x0.mean(0) + h * x1.mean(0) - w_star
    Delta = x1.mean(0) - x0.mean(0)
    DD = float(D @ Delta)
    v = 1.0 / (k * (1 - eps * k / 4))
    exact = nb * (gam**2 / k**2 - 1) * DD
    cov_formula = -(nb**2) * DD / k - (nb**2) * v * gam * DD / k
    return exact, cov_formula


def test_quadratic_covariance_estimator_matches_closed_form_and_finite_differences():
    x0, x1, m = _quadratic_setup()
    nb = slt.default_nbeta(500)
    gam = nb / 2  # strong localization: the covariance term is a third of the total
    eps = 0.05 / (nb + gam)
    kw = dict(num_chains=8, num_draws=1500, num_burnin=300, batch_size=None, localization=gam,
              step_size=eps, seed=1, dtype=F64)
    h = 0.5
    exact, cov_expected = _quadratic_closed_form(x0, x1, m.w.detach(), h, nb, gam, eps)
    assert abs(exact - cov_expected) < 0.01 * abs(exact)  # SGLD's variance bias is small here
    s = llc_susceptibility(m, x0, x1, h, nbeta=nb, observables={"w": lambda p: p["w"]}, **kw)
    assert abs(s.cov_term) > 0.2 * abs(s.dllc_dh)  # both terms matter
    assert abs(s.dllc_dh - cov_expected) < 4 * s.dllc_dh_sem
    # χ_w = d E[w]/dh = nβ/κ Δ (the posterior mean moves with x̄_h)
    chi_w = nb / (nb + gam) * (x1.mean(0) - x0.mean(0))
    assert ((s.chi["w"] - chi_w).abs() < 4 * s.chi_sem["w"]).all()
    assert torch.allclose(s.chi_baker["w"], s.chi["w"] / nb)
    fd = llc_finite_difference(m, x0, x1, [0.4, 0.5, 0.6], nbeta=nb, **kw)
    assert abs(fd.dllc_dh - exact) < 4 * fd.dllc_dh_sem + 1e-9
    assert abs(s.dllc_dh - fd.dllc_dh) < 4 * math.hypot(s.dllc_dh_sem, fd.dllc_dh_sem)
    assert (fd.w_star == fd.w_star[0]).all()  # quenched: w* fixed


def test_quadratic_retrained_llc_does_not_move():
    """Re-trained on each q_h, w* = x̄_h and λ̂(h) = nβ d v/2 for every h: the derivative is 0."""
    x0, x1, m = _quadratic_setup(n=300)
    nb = slt.default_nbeta(300)
    kw = dict(num_chains=4, num_draws=300, batch_size=None, localization=1.0, seed=2, dtype=F64)
    fd = llc_finite_difference(m, x0, x1, [0.0, 0.5, 1.0], mode="retrained", nbeta=nb, **kw)
    xb = torch.stack([(1 - h) * x0.mean(0) + h * x1.mean(0) for h in (0.0, 0.5, 1.0)])
    assert torch.allclose(fd.w_star, xb, atol=1e-6)
    quenched = llc_finite_difference(m, x0, x1, [0.0, 0.5, 1.0], nbeta=nb, **kw)
    assert abs(quenched.dllc_dh) > 10 * quenched.dllc_dh_sem  # quenched λ̂ does move...
    assert abs(fd.dllc_dh) < 4 * fd.dllc_dh_sem + 1e-4  # ...re-trained does not


def test_retrained_trains_on_weighted_q_h_in_the_model_dtype():
    """Default re-training goes through slt.training.train on the weighted q_h (mixture rows
    weighted (1 - h)/n0 and h/n1), cast to the model's dtype, also with minibatches."""
    x0, x1, m = _quadratic_setup(n=200)
    kw = dict(num_chains=2, num_draws=20, batch_size=None, localization=1.0, seed=0, dtype=F64)
    fd = llc_finite_difference(m, x0.float(), x1.float(), [0.0, 0.25, 1.0], mode="retrained",
                               train_kwargs={"steps": 50, "lr": 0.05, "batch_size": 32, "tol": 1e-10}, **kw)
    m0, m1 = x0.float().double().mean(0), x1.float().double().mean(0)
    xb = torch.stack([(1 - h) * m0 + h * m1 for h in (0.0, 0.25, 1.0)])
    assert fd.w_star.dtype == F64 and torch.allclose(fd.w_star, xb, atol=1e-8)
    with pytest.raises(ValueError, match="weights"):
        llc_finite_difference(m, x0, x1, [0.0, 1.0], mode="retrained", train_kwargs={"weights": None}, **kw)


def test_odd_perturbation_at_symmetric_point_has_zero_susceptibility():
    """N(ab², 1) at a reflection-symmetric q0 (x̄ = 0, w* = 0): the posterior is even in a;
    q1 = q0 shifted makes ΔL odd in a, so dλ̂/dh and χ of even observables vanish, while
    χ of the odd observable ab² (the model mean) does not."""
    g = torch.Generator().manual_seed(3)
    n = 2000
    q0 = symmetrize(torch.randn(n, 1, generator=g, dtype=F64), Reflection(1))
    q1 = slt.Data(q0.x + 0.5, None, q0.weights)
    m = ABSquaredGaussian(dtype=F64)
    nb = slt.default_nbeta(n)
    obs = {
        "a2": lambda p: p["w"][:, 0] ** 2,
        "b2": lambda p: p["w"][:, 1] ** 2,
        "ab2": lambda p: p["w"][:, 0] * p["w"][:, 1] ** 2,
    }
    s = llc_susceptibility(m, q0, q1, 0.0, nbeta=nb, observables=obs, num_chains=8, num_draws=2000,
                           batch_size=None, localization=10.0, step_size=2e-4, seed=0, dtype=F64)
    assert abs(s.dllc_dh) < 4 * s.dllc_dh_sem
    assert abs(float(s.chi["a2"])) < 4 * float(s.chi_sem["a2"])
    assert abs(float(s.chi["b2"])) < 4 * float(s.chi_sem["b2"])
    assert float(s.chi["ab2"]) > 3 * float(s.chi_sem["ab2"])  # the estimator does detect a response


def test_susceptibility_bad_input():
    x0, x1, m = _quadratic_setup(n=50)
    kw = dict(num_chains=2, num_draws=10, batch_size=None)
    for h in (-0.5, 2.0):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            llc_susceptibility(m, x0, x1, h, **kw)
    with pytest.raises(ValueError, match="different shapes"):
        llc_susceptibility(m, x0, torch.zeros(10, 3, dtype=F64), 0.5, **kw)
    with pytest.raises(ValueError, match="reserved"):
        llc_susceptibility(m, x0, x1, 0.5, observables={"loss_q0": lambda p: p["w"]}, **kw)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        llc_finite_difference(m, x0, x1, [0.5, 0.5], **kw)
    with pytest.raises(ValueError, match="mode"):
        llc_finite_difference(m, x0, x1, [0.1, 0.5], mode="annealed", **kw)
    # a q1 outside a finite model's sample space
    from slt.models import ExponentialFamily, hypercube_support

    e = ExponentialFamily(hypercube_support(2, dtype=F64))
    s = hypercube_support(2, dtype=F64)
    with pytest.raises(ValueError, match="cannot be evaluated on q1"):
        llc_susceptibility(e, s, s * 0.5, 0.5, **kw)


def test_susceptibilities_sample_in_the_models_precision_by_default():
    """``dtype`` defaulted to float32 in the susceptibility and decomposition functions, so a float64 model was
    sampled in float32 with no note (helper 35: the same digits as the float32 model's run); now ``None``, the
    model's precision, as ``estimate_llc``: a float64 model runs in float64, a float32 one in float32."""
    x0, x1, m = _quadratic_setup(n=100)
    kw = dict(num_chains=2, num_draws=20, batch_size=None, localization=1.0, seed=0, progress=False)
    for model, want in ((m, "float64"), (copy.deepcopy(m).float(), "float32")):
        assert llc_susceptibility(model, x0, x1, 0.0, **kw).llc.config["dtype"] == want
        assert llc_susceptibilities(model, x0, [x1], **kw)[0].llc.config["dtype"] == want
        fd = llc_finite_difference(model, x0, x1, [0.0, 1.0], degree=1, **kw)
        assert {r.config["dtype"] for r in fd.results} == {want}
        star = {n: p.detach().unsqueeze(0) for n, p in model.named_parameters()}
        assert full_data_loss(model, x0)(star).dtype == getattr(torch, want)
