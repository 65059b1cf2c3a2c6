"""symmetrize / break_symmetry / mix / invariance_gap and the expfam models."""

import math

import pytest
import torch

import slt
from slt.models import (
    ABSquaredGaussian,
    ExponentialFamily,
    GaussianLocation,
    ParametricFeatureFamily,
    PolarGaussianLocation,
    hypercube_support,
    polygon_support,
)
from slt.models.expfam import weighted_mean
from slt.symmetry import (
    SO2,
    Cyclic,
    Dihedral,
    Permutation,
    Reflection,
    SignFlips,
    break_symmetry,
    invariance_gap,
    mix,
    symmetrize,
)

from conftest import F64, engine_trace_tol, fp_tol, moment_gap_tol


def _gauss(n, shift, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(shift), generator=g, dtype=F64) + torch.tensor(shift, dtype=F64)


# ---------------------------------------------------------------- symmetrize
@pytest.mark.parametrize("G", [Cyclic(3), Permutation(3), SignFlips(3), Reflection(3)], ids=repr)
def test_finite_symmetrize_is_exact_orbit_and_invariant(G):
    x = _gauss(200, [1.0, -0.5, 0.3])
    w = torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=F64)
    d = symmetrize((x, x.clone(), w), G, acts_on="x")
    k = G.order
    assert d.n == 200 * k and torch.allclose(d.weights.sum(), w.sum() / w.sum())
    # row i*k + j is g_j x_i with weight w_i/(k sum w); y untouched
    E = G.elements(F64)
    j = k - 1
    assert torch.allclose(d.x[5 * k + j], E[j] @ x[5])
    assert torch.allclose(d.y[5 * k + j], x[5])
    assert torch.allclose(d.weights[5 * k : 6 * k], (w[5] / w.sum() / k).expand(k).to(d.weights.dtype))
    assert invariance_gap((x, x, w), G) > 0.1
    assert invariance_gap(d, G) < moment_gap_tol(d.x, d.weights)
    # no subsampling: exact.  MMD² is three weighted sums of n² kernel values ≤ 1 (weights summing
    # to 1), each kernel value rounded relative to max|z|²/bandwidth² (bandwidth: median distance)
    z = d.x.double()
    bw2 = float(torch.pdist(z).median()) ** 2
    mmd_tol = 3 * fp_tol(F64, scale=1 + float(z.square().sum(1).max()) / bw2, terms=d.n**2 + z.shape[1])
    assert invariance_gap(d, G, method="mmd", max_points=2000) < mmd_tol


def test_lie_symmetrize_gap_is_monte_carlo_small():
    n = 4000
    x = _gauss(n, [1.0, 0.0])
    gap0 = invariance_gap(x, SO2())
    d = symmetrize(x, SO2(), generator=torch.Generator().manual_seed(0))
    assert d.n == n and d.weights is None  # i.i.d. sample of size n from q_G
    # the exact q_G is invariant; a sample of size n has E|mu|^2 = tr Cov/n = (2 + |m|^2)/n and
    # E gap = 2 E|mu|^2 + E||S - g S g^T||^2 = O(1/n); bound it by 50/n (gap0 ~ 3.0)
    assert gap0 > 2.0
    assert invariance_gap(d, SO2()) < 50.0 / n
    # more orbit samples: weights 1/k, still mean ~ 0
    d4 = symmetrize(x, SO2(), generator=torch.Generator().manual_seed(0), num_samples=4)
    assert d4.n == 4 * n and torch.allclose(d4.weights, torch.full((4 * n,), 1.0 / (4 * n), dtype=F64))
    assert weighted_mean(d4.x, d4.weights).norm() < 4 * math.sqrt(3.0 / (4 * n))


def test_symmetrize_pairs_acts_on_y_and_both():
    x = _gauss(50, [1.0, 2.0])
    y = _gauss(50, [0.5, -1.0], seed=3)
    G = Cyclic(2)
    dy = symmetrize((x, y), G, acts_on="y")
    assert torch.allclose(dy.x[1], x[0]) and torch.allclose(dy.y[1], y[0].flip(0))
    db = symmetrize((x, y), G, acts_on="both")
    assert torch.allclose(db.x[1], x[0].flip(0)) and torch.allclose(db.y[1], y[0].flip(0))
    assert invariance_gap(db, G, acts_on="both") < moment_gap_tol(torch.cat([db.x, db.y], 1), db.weights)
    assert invariance_gap(dy, G, acts_on="both") > 1e-3  # only y was symmetrized
    with pytest.raises(ValueError, match="needs targets"):
        symmetrize(x, G, acts_on="y")
    with pytest.raises(ValueError, match="acts_on"):
        symmetrize((x, y), G, acts_on="z")


def test_symmetrize_wrong_shape_raises():
    with pytest.raises(ValueError, match="acts on vectors of length 2"):
        symmetrize(torch.zeros(10, 3), SO2())
    with pytest.raises(ValueError, match="trailing dimension"):
        symmetrize((torch.zeros(10, 2), torch.zeros(10, 1)), SO2(), acts_on="both")
    with pytest.raises(TypeError, match="Group"):
        symmetrize(torch.zeros(10, 2), "SO2")


# ---------------------------------------------------------------- break_symmetry
def test_break_symmetry_tilt_shifts_a_centred_gaussian():
    n = 20000
    x = _gauss(n, [0.0, 0.0])
    assert break_symmetry(x, SO2(), 0.0).weights is None  # strength 0: unchanged
    assert torch.equal(break_symmetry(x, SO2(), 0.0).x, x)
    s = 0.7
    d = break_symmetry(x, SO2(), s)
    # tilting N(0, I) by exp(s x_1) gives N(s e_1, I); importance-sampling error of the mean
    mu = weighted_mean(d.x, d.weights)
    ess = 1.0 / float((d.weights.double() / d.weights.double().sum()).square().sum())
    assert abs(float(mu[0]) - s) < 4.5 / math.sqrt(ess) and abs(float(mu[1])) < 4.5 / math.sqrt(ess)
    g0, g1 = invariance_gap(x, SO2()), invariance_gap(d, SO2())
    assert g1 > 20 * g0 and g1 > 0.5
    # resample and shift give the same law
    r = break_symmetry(x, SO2(), s, method="resample", generator=torch.Generator().manual_seed(0))
    assert r.weights is None and abs(float(r.x[:, 0].mean()) - s) < 4.5 / math.sqrt(ess)
    sh = break_symmetry(x, SO2(), s, method="shift")
    assert torch.allclose(sh.x, x + torch.tensor([s, 0.0], dtype=F64))


def test_break_symmetry_finite_group_and_callable_direction():
    x = symmetrize(_gauss(500, [0.3]), Reflection(1))
    assert invariance_gap(x, Reflection(1)) < moment_gap_tol(x.x, x.weights)
    d = break_symmetry(x, Reflection(1), 1.0)
    assert invariance_gap(d, Reflection(1)) > 1e-3
    # a G-invariant direction cannot break the symmetry
    with pytest.raises(ValueError, match="invariant"):
        break_symmetry(_gauss(10, [0.0, 0.0]), Cyclic(2), 1.0, direction=[1.0, 1.0])
    # callable: its invariant part is projected out (f = x^2 is Reflection-invariant: no tilt)
    d2 = break_symmetry(x, Reflection(1), 2.0, direction=lambda z: z[:, 0] ** 2)
    assert torch.allclose(d2.weights.double(), x.weights.double() / x.weights.double().sum())
    d3 = break_symmetry(x, Reflection(1), 2.0, direction=lambda z: z[:, 0] ** 3)
    assert invariance_gap(d3, Reflection(1)) > 1e-3
    with pytest.raises(ValueError, match="strength"):
        break_symmetry(x, Reflection(1), float("nan"))
    with pytest.raises(ValueError, match="method"):
        break_symmetry(x, Reflection(1), 1.0, method="nope")


# ---------------------------------------------------------------- mix
def test_mix_weights_and_loss_is_linear():
    x0 = _gauss(30, [0.0, 0.0])
    x1 = _gauss(20, [1.0, 1.0], seed=5)
    w1 = torch.rand(20, generator=torch.Generator().manual_seed(2), dtype=F64) + 0.1
    q = mix(x0, slt.Data(x1, None, w1), 0.25)
    assert q.n == 50
    assert torch.allclose(q.weights[:30].sum(), torch.tensor(0.75, dtype=F64))
    assert torch.allclose(q.weights[30:], 0.25 * w1 / w1.sum())
    m = GaussianLocation(2, dtype=F64)
    f = slt.symmetry.full_data_loss(m, q, dtype=F64)
    f0 = slt.symmetry.full_data_loss(m, x0, dtype=F64)
    f1 = slt.symmetry.full_data_loss(m, slt.Data(x1, None, w1), dtype=F64)
    p = {"w": torch.randn(3, 2, dtype=F64)}
    assert torch.allclose(f(p), 0.75 * f0(p) + 0.25 * f1(p))
    # end points return the unmixed data set with normalized weights
    assert mix(x0, x1, 0.0).n == 30 and mix(x0, x1, 1.0).n == 20


def test_mix_and_weights_errors():
    x0 = _gauss(10, [0.0, 0.0])
    for t in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            mix(x0, x0, t)
    with pytest.raises(ValueError, match="different shapes"):
        mix(x0, _gauss(10, [0.0, 0.0, 0.0]), 0.5)
    with pytest.raises(ValueError, match="both"):
        mix(x0, (x0, x0), 0.5)
    with pytest.raises(ValueError, match="negative"):
        mix(x0, (x0, x0[:, :1], -torch.ones(10, dtype=F64)), 0.5)
    with pytest.raises(ValueError, match="sum to zero"):
        symmetrize((x0, x0, torch.zeros(10, dtype=F64)), SO2())


# ---------------------------------------------------------------- models
def test_exponential_family_exact_normalizer_and_mle():
    S = hypercube_support(3, dtype=F64)
    m = ExponentialFamily(S, init=torch.tensor([0.3, -0.2, 0.5], dtype=F64))
    lp = m.log_prob()
    brute = S @ m.theta.detach()
    brute = brute - torch.log(torch.exp(brute).sum())
    assert torch.allclose(lp, brute) and torch.allclose(lp.exp().sum(), torch.tensor(1.0, dtype=F64))
    x = m.sample(5000, torch.Generator().manual_seed(0))
    out = m(x)  # per-sample NLL
    assert out.shape == (5000, 1) and torch.allclose(out[:, 0], -lp[m.index_of(x)])
    th = m.fit(x)
    # moment matching at the MLE
    p = torch.softmax(S @ th, 0)
    assert torch.allclose(p @ S, x.mean(0), atol=1e-9)
    # the Fisher information is the Hessian of the population loss
    H = torch.autograd.functional.hessian(lambda t: -(torch.softmax(S @ t, 0) * 0 + (S @ t - torch.logsumexp(S @ t, 0))) @ p, th)
    # both are Σ_s p_s (s − s̄)(s − s̄)ᵀ over the 8 support points, entries ≤ |s − s̄|² ≤ 4 (3 coordinates)
    assert torch.allclose(H, m.fisher_information(th), rtol=0, atol=fp_tol(F64, scale=4.0, terms=3 * S.shape[0]))
    with pytest.raises(ValueError, match="not in the model's finite sample space"):
        m(torch.zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="identifiable"):
        ExponentialFamily(S, features=torch.ones(8, 1, dtype=F64))
    # symmetry: T(s) = s is SignFlips-equivariant; the symmetrized sample fits theta = 0
    xs = symmetrize(x, SignFlips(3))
    # θ = H⁻¹ T̄ with H = I (uniform on the cube) and T̄ = 0 up to the rounding of the empirical
    # frequencies of the 8 support points (sums of n weights, |s| = 1); a non-zero θ is O(n^-1/2)
    assert m.fit(xs.x, xs.weights).abs().max() < fp_tol(F64, terms=xs.n + S.shape[0])


def test_chain_forward_matches_single_forward():
    gen = torch.Generator().manual_seed(0)
    models = [
        (GaussianLocation(3, dtype=F64), torch.randn(7, 3, generator=gen, dtype=F64)),
        (PolarGaussianLocation(dtype=F64), torch.randn(7, 2, generator=gen, dtype=F64)),
        (ABSquaredGaussian(dtype=F64), torch.randn(7, 1, generator=gen, dtype=F64)),
        (ExponentialFamily(polygon_support(6, dtype=F64)), polygon_support(6, dtype=F64)[[0, 3, 3, 5]]),
        (ParametricFeatureFamily.polar(polygon_support(6, dtype=F64)), polygon_support(6, dtype=F64)[[1, 2]]),
    ]
    for m, x in models:
        params = {n: torch.randn(4, *p.shape, generator=gen, dtype=F64) for n, p in m.named_parameters()}
        out = m.forward_chains(params, x.unsqueeze(0).expand(4, *x.shape))
        for c in range(4):
            with torch.no_grad():
                for n, p in m.named_parameters():
                    p.copy_(params[n][c])
            assert torch.allclose(out[c], m(x)), type(m).__name__
        loss = m.default_loss(m(x), x)
        assert torch.allclose(m.default_loss.per_sample(m(x), x).mean(), loss)


def test_empirical_minima_are_critical_points():
    x = _gauss(400, [0.6, -0.8]).double()
    w = torch.rand(400, generator=torch.Generator().manual_seed(1), dtype=F64)
    for m in (GaussianLocation(2, dtype=F64), PolarGaussianLocation(dtype=F64)):
        with torch.no_grad():
            m.w.copy_(m.empirical_minimum(x, w))
        loss = (m.default_loss.per_sample(m(x), x) * w).sum() / w.sum()
        (g,) = torch.autograd.grad(loss, m.w)
        # the gradient is a weighted mean of n terms (μ − x_i) ∂μ/∂w, |∂μ/∂w| ≤ max(1, r); the closed
        # form's own rounding (a weighted mean of n rows) adds its curvature max(1, r²) times that
        r = max(1.0, float(m.w.detach()[0].abs()))
        v = w / w.sum()
        mag = float((v * (x - m.mean().detach()).abs().sum(1)).sum()) * r + float((v * x.abs().sum(1)).sum()) * r * r
        assert g.abs().max() < fp_tol(F64, scale=mag, terms=len(x))
    m = ABSquaredGaussian(dtype=F64)
    with torch.no_grad():
        m.w.copy_(m.empirical_minimum(x[:, :1], w))
    assert torch.allclose(m.mean(), weighted_mean(x[:, :1], w))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_engine_honours_weights_like_replication():
    """Integer weights == replicated rows: same L(w*) and the same exact full-batch chains."""
    x = _gauss(20, [0.5, 0.1])
    reps = torch.tensor([1, 3] * 10)
    m = PolarGaussianLocation(init=(0.4, 0.2), dtype=F64)
    kw = dict(num_chains=2, num_draws=30, batch_size=None, step_size=1e-3, nbeta=50.0, seed=0, dtype=F64)
    xr = x.repeat_interleave(reps, 0)
    r1 = slt.estimate_llc(m, slt.Data(x, None, reps.double()), **kw)
    r2 = slt.estimate_llc(m, xr, **kw)
    # the same full-batch chains up to rounding: sums of len(xr) terms in another order
    with torch.no_grad():
        loss_tol = fp_tol(F64, scale=float(m.default_loss.per_sample(m(xr), xr).abs().max()), terms=xr.numel())
    assert math.isclose(r1.init_loss, r2.init_loss, rel_tol=0, abs_tol=loss_tol)
    tol = engine_trace_tol(m, m.default_loss, xr, xr, r2.loss_trace, steps=r2.burnin_loss_trace.shape[1] + 30,
                           step_size=1e-3, nbeta=50.0, localization=r2.localization, batch_rows=len(xr))
    assert torch.allclose(r1.loss_trace, r2.loss_trace, rtol=0, atol=tol)
