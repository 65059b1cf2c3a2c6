"""Tests for slt.models: native chain forward passes, data, losses, TMS geometry."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.func import functional_call

from slt.models import (
    ChainModule,
    DeepLinearNetwork,
    NormalCrossing,
    ReducedRankRegression,
    ToyModelOfSuperposition,
    classify_tms_point,
    gaussian_nll,
    geometric_importance,
    kgon_optimal_length_bias,
    kgon_parameters,
    make_dln_data,
    make_gaussian_nll,
    make_normal_crossing_data,
    make_tms_data,
    make_tms_loss,
    make_tms_sparse_data,
    sum_squared_error,
    tms_loss,
    tms_population_loss,
)

from conftest import F64, argmin_grad_tol, fp_tol, gen, random_rotation


def random_chain_params(model: torch.nn.Module, C: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        name: torch.randn(C, *p.shape, generator=g, dtype=p.dtype)
        for name, p in model.named_parameters()
    }


def loop_forward(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    C = x.shape[0]
    return torch.stack(
        [functional_call(model, {k: v[c] for k, v in params.items()}, (x[c],)) for c in range(C)]
    )


def forward_rounding(model: torch.nn.Module, reference, params: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    """Bound on the difference of two evaluations of the same forward pass in different operation order.

    Higham's componentwise bound for products of matrices: the error of each output is at most
    γ_n times the same computation on |params| and |x| (nothing cancels there), n the summed
    fan-ins along the way (the trailing dimension of every parameter).  A wrong forward pass
    is off by O(1) of the outputs, ~1e13 times more.
    """
    magnitude = reference(model, {k: v.abs() for k, v in params.items()}, x.abs()).abs().max()
    terms = sum(p.shape[-1] for p in model.parameters())
    return fp_tol(F64, scale=float(magnitude), terms=terms)


# ---------------------------------------------------------------------------
# forward_chains == loop over chains == independent reference formula
# ---------------------------------------------------------------------------
def _dln_reference(model: DeepLinearNetwork, params: dict, x: torch.Tensor) -> torch.Tensor:
    out = []
    for c in range(x.shape[0]):
        h = x[c]
        for s in range(model.depth):
            h = h @ params[f"layers.{s}.weight"][c].T
            if model.has_bias:
                h = h + params[f"layers.{s}.bias"][c]
        out.append(h)
    return torch.stack(out)


def _tms_reference(params: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [torch.relu(x[c] @ params["W"][c].T @ params["W"][c] + params["b"][c]) for c in range(x.shape[0])]
    )


def _nc_reference(model: NormalCrossing, params: dict, x: torch.Tensor) -> torch.Tensor:
    ks = torch.tensor(model.powers, dtype=F64)
    return torch.stack([torch.prod(params["w"][c] ** ks) * x[c] for c in range(x.shape[0])])


CASES = [
    ("dln", lambda: DeepLinearNetwork([4, 3, 5, 2], generator=gen(1), dtype=F64), 4, _dln_reference),
    ("dln_bias", lambda: DeepLinearNetwork([3, 6, 2], bias=True, generator=gen(1), dtype=F64), 3, _dln_reference),
    ("rrr", lambda: ReducedRankRegression(5, 2, 4, generator=gen(1), dtype=F64), 5, _dln_reference),
    ("nc", lambda: NormalCrossing([1, 2, 0, 3], dtype=F64), 1, _nc_reference),
    ("tms", lambda: ToyModelOfSuperposition(6, 2, generator=gen(1), dtype=F64), 6, lambda m, p, x: _tms_reference(p, x)),
]


@pytest.mark.parametrize("name,make,n_in,reference", CASES, ids=[c[0] for c in CASES])
def test_forward_chains_matches_loop_and_reference(name, make, n_in, reference):
    model = make()
    assert isinstance(model, ChainModule)
    g = gen(2)
    C, B = 5, 7
    params = random_chain_params(model, C, g)
    if name == "tms":  # keep a mix of active and inactive ReLUs
        params["b"] = params["b"] * 0.3
    x = torch.randn(C, B, n_in, generator=g, dtype=F64)
    out = model.forward_chains(params, x)
    loop = loop_forward(model, params, x)
    ref = reference(model, params, x)
    assert out.shape == loop.shape == ref.shape
    tol = forward_rounding(model, reference, params, x)
    torch.testing.assert_close(out, loop, rtol=0, atol=tol)
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    # chains are really different (the check above is not vacuous)
    assert not torch.allclose(out[0], out[1])
    # a shared batch expanded without copy (as the engine passes it) works
    xs = x[0].expand(C, B, n_in)
    torch.testing.assert_close(model.forward_chains(params, xs), loop_forward(model, params, xs), rtol=0,
                               atol=forward_rounding(model, reference, params, xs))
    # the single-model forward uses the module's own parameters
    own = {k: v.detach().unsqueeze(0) for k, v in model.named_parameters()}
    torch.testing.assert_close(model(x[0]), reference(model, own, x[:1])[0], rtol=0,
                               atol=forward_rounding(model, reference, own, x[:1]))


def test_forward_gradients_match_loop():
    model = ToyModelOfSuperposition(5, 2, generator=gen(3), dtype=F64)
    g = gen(4)
    params = {k: v.requires_grad_() for k, v in random_chain_params(model, 3, g).items()}
    x = torch.rand(3, 8, 5, generator=g, dtype=F64)
    g1 = torch.autograd.grad(model.forward_chains(params, x).square().sum(), list(params.values()))
    g2 = torch.autograd.grad(loop_forward(model, params, x).square().sum(), list(params.values()))
    # rounding bound: each gradient entry sums B·n products; their magnitudes are bounded by the
    # gradient of the same loss at |params|, |x| (every ReLU active, nothing cancels).  A wrong
    # gradient is off by O(1) of its entries.
    absp = {k: v.detach().abs().requires_grad_() for k, v in params.items()}
    mag = torch.autograd.grad(_tms_reference(absp, x).square().sum(), list(absp.values()))
    terms = x.shape[1] * x.shape[2] + sum(p.shape[-1] for p in model.parameters())
    for a, b, m in zip(g1, g2, mag):
        torch.testing.assert_close(a, b, rtol=0, atol=fp_tol(F64, scale=float(m.abs().max()), terms=terms))


# ---------------------------------------------------------------------------
# parameters and shapes
# ---------------------------------------------------------------------------
def test_dln_parameters():
    m = DeepLinearNetwork([4, 3, 5, 2])
    shapes = {k: tuple(v.shape) for k, v in m.named_parameters()}
    assert shapes == {"layers.0.weight": (3, 4), "layers.1.weight": (5, 3), "layers.2.weight": (2, 5)}
    assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters())
    assert m.depth == 3 and m.n_in == 4 and m.n_out == 2
    assert m(torch.randn(10, 4)).shape == (10, 2)
    mb = DeepLinearNetwork([4, 3], bias=True)
    assert {k for k, _ in mb.named_parameters()} == {"layers.0.weight", "layers.0.bias"}
    r = ReducedRankRegression(5, 2, 4)
    assert isinstance(r, DeepLinearNetwork) and r.widths == [5, 2, 4]
    # the initialisation is reproducible from an explicit generator
    a, b = DeepLinearNetwork([4, 3, 2], generator=gen(0)), DeepLinearNetwork([4, 3, 2], generator=gen(0))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_dln_set_weights_and_product():
    g = gen(5)
    X, Y, teacher = make_dln_data([4, 3, 2], 2, 50, g, noise_std=0.0, dtype=F64)
    m = DeepLinearNetwork([4, 3, 2], dtype=F64).set_weights(teacher)
    # the same product associated differently: Higham's bound γ_(4+3) on |X| |W1|ᵀ |W2|ᵀ
    magnitude = float((X.abs() @ teacher[0].abs().T @ teacher[1].abs().T).max())
    torch.testing.assert_close(m(X), Y, rtol=0, atol=fp_tol(F64, scale=magnitude, terms=4 + 3))
    torch.testing.assert_close(m.product(), teacher[1] @ teacher[0])
    with pytest.raises(ValueError, match="expected 2 weight matrices"):
        m.set_weights(teacher[:1])


def test_tms_and_nc_parameters():
    m = ToyModelOfSuperposition(6, 2)
    assert {k: tuple(v.shape) for k, v in m.named_parameters()} == {"W": (2, 6), "b": (6,)}
    assert m(torch.rand(9, 6)).shape == (9, 6)
    nc = NormalCrossing([2, 1])
    assert {k: tuple(v.shape) for k, v in nc.named_parameters()} == {"w": (2,)}
    assert torch.equal(nc.w.detach(), torch.zeros(2))
    assert nc.learning_coefficient == 0.25 and nc.multiplicity == 1
    assert NormalCrossing([2, 2, 1]).multiplicity == 2
    assert NormalCrossing([0, 3]).learning_coefficient == pytest.approx(1 / 6)
    assert nc(torch.randn(3, 1)).shape == (3, 1)


# ---------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------
def test_bad_arguments():
    g = gen(0)
    with pytest.raises(ValueError, match="at least 2 entries"):
        DeepLinearNetwork([3])
    with pytest.raises(ValueError, match="positive integers"):
        DeepLinearNetwork([3, 0, 2])
    with pytest.raises(ValueError, match="positive integers"):
        DeepLinearNetwork([3, 2.5])
    with pytest.raises(ValueError, match=r"expected input of shape \(C, B, 3\)"):
        DeepLinearNetwork([3, 2]).forward_chains({"layers.0.weight": torch.zeros(1, 2, 3)}, torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 3\)"):
        DeepLinearNetwork([3, 2])(torch.zeros(3))
    with pytest.raises(ValueError, match="rank must be an integer"):
        make_dln_data([3, 2, 3], 3, 10, g)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        make_dln_data([3, 2, 3], 1, 0, g)
    with pytest.raises(ValueError, match="noise_std must be non-negative"):
        make_dln_data([3, 2, 3], 1, 10, g, noise_std=-1.0)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        make_dln_data([3, 2, 3], 1, 10, 0)
    with pytest.raises(ValueError, match="non-negative integers"):
        NormalCrossing([1, -1])
    with pytest.raises(ValueError, match="at least one power must be positive"):
        NormalCrossing([0, 0])
    with pytest.raises(ValueError, match="non-empty"):
        NormalCrossing([])
    with pytest.raises(ValueError, match=r"\(B, 1\)"):
        NormalCrossing([1])(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="n_features must be a positive integer"):
        ToyModelOfSuperposition(0, 2)
    with pytest.raises(ValueError, match="sparsity must be in"):
        make_tms_data(10, 5, g, sparsity=1.5)
    with pytest.raises(ValueError, match="k must be at most n_features"):
        kgon_parameters(7, n_features=6)
    with pytest.raises(ValueError, match="plus=True needs a dead column"):
        kgon_parameters(6, n_features=6, plus=True)
    with pytest.raises(ValueError, match="n_hidden must be at least 2"):
        kgon_parameters(3, n_hidden=1)
    with pytest.raises(ValueError, match="length must be positive"):
        kgon_parameters(3, length=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        gaussian_nll(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="trailing feature dimension"):
        sum_squared_error.per_sample(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="noise_std must be positive"):
        make_gaussian_nll(0.0)
    with pytest.raises(ValueError, match="importance must have shape"):
        tms_loss(torch.zeros(3, 4), torch.zeros(3, 4), importance=torch.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        make_tms_loss([1.0, -1.0])
    with pytest.raises(ValueError, match="b must have shape"):
        tms_population_loss(torch.zeros(2, 6), torch.zeros(5))
    with pytest.raises(ValueError, match="dead_tol"):
        classify_tms_point(torch.ones(2, 3), torch.zeros(3), dead_tol=2.0)


# ---------------------------------------------------------------------------
# data generators
# ---------------------------------------------------------------------------
def _within(estimate: float, truth: float, se: float, z: float = 5.0) -> bool:
    return abs(estimate - truth) <= z * se


@pytest.mark.parametrize("widths,rank", [([5, 3, 5], 0), ([5, 3, 5], 2), ([4, 6, 3, 5], 3), ([3, 3], 3)])
def test_make_dln_data(widths, rank):
    n, noise, sx = 20000, 0.7, 2.0
    X, Y, teacher = make_dln_data(widths, rank, n, gen(11), noise_std=noise, input_std=sx, dtype=F64)
    assert X.shape == (n, widths[0]) and Y.shape == (n, widths[-1]) and X.dtype == F64
    assert [tuple(t.shape) for t in teacher] == [(b, a) for a, b in zip(widths[:-1], widths[1:])]
    prod = teacher[0]
    for t in teacher[1:]:
        prod = t @ prod
    assert torch.linalg.matrix_rank(prod).item() == rank
    if rank == 0:
        assert all(torch.count_nonzero(t) == 0 for t in teacher)
    resid = Y - X @ prod.T
    N = resid.numel()
    # sample variance of N iid normals has standard error sigma^2 * sqrt(2/N)
    assert _within(resid.var().item(), noise**2, noise**2 * math.sqrt(2 / N))
    assert _within(X.var().item(), sx**2, sx**2 * math.sqrt(2 / X.numel()))
    assert _within(X.mean().item(), 0.0, sx / math.sqrt(X.numel()))
    # reproducible from the generator seed
    X2, Y2, _ = make_dln_data(widths, rank, n, gen(11), noise_std=noise, input_std=sx, dtype=F64)
    assert torch.equal(X, X2) and torch.equal(Y, Y2)


def test_make_normal_crossing_data():
    n = 40000
    X, Y = make_normal_crossing_data(n, gen(3), noise_std=0.5, dtype=F64)
    assert X.shape == Y.shape == (n, 1)
    assert _within(X.var().item(), 1.0, math.sqrt(2 / n))
    assert _within(Y.var().item(), 0.25, 0.25 * math.sqrt(2 / n))
    assert _within((X * Y).mean().item(), 0.0, 0.5 / math.sqrt(n))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_make_tms_data_sparsity(sparsity):
    n, F = 20000, 5
    x = make_tms_data(n, F, gen(7), sparsity=sparsity, dtype=F64)
    assert x.shape == (n, F)
    N = n * F
    frac_zero = (x == 0).double().mean().item()
    se = math.sqrt(max(sparsity * (1 - sparsity), 1e-12) / N)
    assert _within(frac_zero, sparsity, se)
    nz = x[x != 0]
    assert (nz > 0).all() and (nz < 1).all()
    assert _within(nz.mean().item(), 0.5, math.sqrt(1 / 12 / nz.numel()))
    # features are independent: per-feature zero fractions also match
    per = (x == 0).double().mean(0)
    assert all(_within(p.item(), sparsity, math.sqrt(max(sparsity * (1 - sparsity), 1e-12) / n)) for p in per)


def test_make_tms_sparse_data():
    n, F = 30000, 6
    x = make_tms_sparse_data(n, F, gen(8), dtype=F64)
    assert x.shape == (n, F)
    assert torch.equal((x != 0).sum(1), torch.ones(n, dtype=torch.long))
    counts = (x != 0).sum(0).double()
    p = 1 / F
    assert all(_within(c.item() / n, p, math.sqrt(p * (1 - p) / n)) for c in counts)
    mu = x.sum(1)
    assert _within(mu.mean().item(), 0.5, math.sqrt(1 / 12 / n))
    # the sample variance of U[0, 1] has standard error sqrt((mu_4 - sigma^4) / n) = sqrt(1 / (180 n))
    assert _within(mu.var().item(), 1 / 12, math.sqrt(1 / 180 / n))
    assert torch.equal(x, make_tms_sparse_data(n, F, gen(8), dtype=F64))


# ---------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------
def test_losses_values_and_per_sample():
    g = gen(9)
    out = torch.randn(4, 10, 3, generator=g, dtype=F64)
    tgt = torch.randn(4, 10, 3, generator=g, dtype=F64)
    sq = (tgt - out).square().sum(-1)  # (4, 10)
    imp = geometric_importance(3, 0.9, dtype=F64)
    torch.testing.assert_close(imp, torch.tensor([1.0, 0.9, 0.81], dtype=F64))
    nll2 = make_gaussian_nll(2.0)
    tms_imp = make_tms_loss(imp)
    expected = {
        sum_squared_error: sq,
        gaussian_nll: 0.5 * sq,
        nll2: sq / 8.0,
        tms_loss: sq,
        tms_imp: ((tgt - out).square() * imp).sum(-1),
    }
    for fn, ps in expected.items():
        got = fn.per_sample(out, tgt)
        assert got.shape == (4, 10)
        torch.testing.assert_close(got, ps)
        # per-sample on (C, B, F) and on (B, F) agree, and their mean is the scalar loss
        torch.testing.assert_close(fn.per_sample(out[1], tgt[1]), ps[1])
        torch.testing.assert_close(fn(out[1], tgt[1]), ps[1].mean())
    torch.testing.assert_close(gaussian_nll(out[0], tgt[0], noise_std=2.0), nll2(out[0], tgt[0]))
    torch.testing.assert_close(tms_loss(out[0], tgt[0], importance=imp), tms_imp(out[0], tgt[0]))


def test_losses_work_with_engine_adapter():
    from slt.losses import LossAdapter

    g = gen(10)
    out = torch.randn(3, 6, 4, generator=g, dtype=F64)
    tgt = torch.randn(3, 6, 4, generator=g, dtype=F64)
    for fn in (gaussian_nll, sum_squared_error, tms_loss, make_tms_loss(torch.arange(1.0, 5.0, dtype=F64))):
        ad = LossAdapter(fn)
        assert ad.has_native_per_sample
        expected = torch.stack([fn(out[c], tgt[c]) for c in range(3)])
        torch.testing.assert_close(ad.chain_loss(out, tgt, None), expected)


# ---------------------------------------------------------------------------
# TMS population loss
# ---------------------------------------------------------------------------
def _quadrature_population_loss(W: torch.Tensor, b: torch.Tensor, m: int = 20001) -> float:
    """Independent check: trapezoid rule in mu for every input direction (error O(h^2) ~ 1e-9)."""
    n = W.shape[1]
    mu = torch.linspace(0, 1, m, dtype=F64)
    total = 0.0
    for i in range(n):
        x = mu[:, None] * torch.eye(n, dtype=F64)[i]  # (m, n)
        err = (x - torch.relu(x @ W.T @ W + b)).square().sum(-1)
        total += torch.trapezoid(err, mu).item()
    return total / n


def _tms_points():
    g = gen(12)
    pts = [
        ("5-gon", kgon_parameters(5)["W"], kgon_parameters(5)["b"]),
        ("5-gon+", kgon_parameters(5, plus=True)["W"], kgon_parameters(5, plus=True)["b"]),
    ]
    for s in range(3):
        W = torch.randn(2, 6, generator=g, dtype=F64)
        b = 0.5 * torch.randn(6, generator=g, dtype=F64)  # both signs of bias
        pts.append((f"random{s}", W, b))
    W = torch.randn(2, 6, generator=g, dtype=F64)
    W[:, 2] = 0.0  # a == 0 entries with b > 0, b < 0, b == 0
    pts.append(("zero-column", W, torch.tensor([0.3, -0.2, 0.4, -0.3, 0.0, 0.2], dtype=F64)))
    return pts


@functools.lru_cache(maxsize=1)
def _mc_sample() -> torch.Tensor:
    return make_tms_sparse_data(10**6, 6, gen(13), dtype=F64)


TMS_POINTS = _tms_points()


@pytest.mark.parametrize("name,W,b", TMS_POINTS, ids=[p[0] for p in TMS_POINTS])
def test_tms_population_loss_exact_vs_quadrature_and_monte_carlo(name, W, b):
    exact = tms_population_loss(W, b).item()
    # deterministic quadrature (trapezoid error O(h^2) with h = 5e-5, also across the kinks)
    assert exact == pytest.approx(_quadrature_population_loss(W, b), abs=1e-7)
    # Monte Carlo with 10^6 samples of the high-sparsity distribution, 5 standard errors
    x = _mc_sample()
    model = ToyModelOfSuperposition(6, 2, dtype=F64)
    model.load_state_dict({"W": W, "b": b})
    with torch.no_grad():
        per = tms_loss.per_sample(model(x), x)
    se = per.std().item() / math.sqrt(per.numel())
    assert abs(per.mean().item() - exact) <= 5 * se, (per.mean().item(), exact, se)


def test_tms_population_loss_importance():
    W, b = TMS_POINTS[2][1:]
    imp = torch.linspace(0.5, 1.5, 6, dtype=F64)
    x = make_tms_sparse_data(200000, 6, gen(14), dtype=F64)
    out = torch.relu(x @ W.T @ W + b)
    per = make_tms_loss(imp).per_sample(out, x)
    se = per.std().item() / math.sqrt(per.numel())
    assert abs(per.mean().item() - tms_population_loss(W, b, imp).item()) <= 5 * se
    # importance is a weighted sum of the per-output terms: all-ones importance == none
    torch.testing.assert_close(tms_population_loss(W, b, torch.ones(6, dtype=F64)), tms_population_loss(W, b))


def tms_loss_rounding(W: torch.Tensor, b: torch.Tensor) -> float:
    """Rounding bound of tms_population_loss(W, b), which is exact in real arithmetic.

    It sums n² per-pair integrals over μ ∈ [0, 1] whose pieces are at most ((δ − a)μ − b)² ≤
    (max|δ − a| + max|b|)² (a = WᵀW) and divides by n: γ_(n²) on that magnitude / n.
    """
    n = W.shape[1]
    a = W.T @ W
    piece = (float((torch.eye(n, dtype=a.dtype) - a).abs().max()) + float(b.abs().max())) ** 2
    return fp_tol(W.dtype, scale=piece / n, terms=n * n)


def tms_argmin_grad_tol(W: torch.Tensor, b: torch.Tensor) -> float:
    """Gradient that can remain at the k-gon optimum: (l, b) is found by L-BFGS on the population
    loss, which stalls at the √ε floor set by the loss's rounding and the largest curvature."""
    flat = torch.cat([W.flatten(), b])

    def loss(v: torch.Tensor) -> torch.Tensor:
        return tms_population_loss(v[: W.numel()].reshape(W.shape), v[W.numel():])

    h_max = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat)).max())
    return argmin_grad_tol(curvature=h_max, loss_rounding=tms_loss_rounding(W, b))


def test_kgon_reference_losses_and_parameters():
    # Chen et al. 2023 (arXiv 2310.06301), table of critical points for m = 2, n = 6 (5 printed digits)
    ref = {(5, False): 0.06874, (5, True): 0.06180, (6, False): 0.04819}
    for (k, plus), loss in ref.items():
        p = kgon_parameters(k, plus=plus)
        assert tms_population_loss(p["W"], p["b"]).item() == pytest.approx(loss, abs=5e-6)
    l5, b5 = kgon_optimal_length_bias(5, 6)
    l6, b6 = kgon_optimal_length_bias(6, 6)
    assert (l5, b5) == pytest.approx((1.17046, -0.28230), abs=1e-5)
    assert (l6, b6) == pytest.approx((1.32052, -0.61813), abs=1e-5)
    # the "+" variant gains exactly 1/(4 n^2) (up to the rounding of the two losses; a wrong
    # closed form is off by O(1/n²))
    p5, p5p = kgon_parameters(5), kgon_parameters(5, plus=True)
    d = tms_population_loss(**p5) - tms_population_loss(**p5p)
    assert d.item() == pytest.approx(1 / 144, abs=tms_loss_rounding(**p5) + tms_loss_rounding(**p5p))
    # small k: exact reconstruction of the live features, loss (n - k) / (3 n)
    for k in (1, 2, 3, 4):
        assert kgon_optimal_length_bias(k, 6) == (1.0, 0.0)
        pk = kgon_parameters(k)
        assert tms_population_loss(**pk).item() == pytest.approx((6 - k) / 18, abs=tms_loss_rounding(**pk))


@pytest.mark.parametrize("k,plus", [(5, False), (5, True), (6, False)])
def test_kgons_are_critical_points(k, plus):
    # dead_bias < 0 keeps the dead column flat (with dead_bias = 0 see the next test)
    p = {name: t.clone().requires_grad_() for name, t in kgon_parameters(k, plus=plus, dead_bias=-0.1).items()}
    loss = tms_population_loss(p["W"], p["b"])
    grads = torch.autograd.grad(loss, [p["W"], p["b"]])
    # zero up to the √ε floor of the L-BFGS search for (l, b) (2e-7 to 4e-7 here); even (l, b)
    # rounded to Chen et al.'s 5 printed digits is 10-20 times above it (gradient 3e-6, 9e-6)
    tol = tms_argmin_grad_tol(p["W"].detach(), p["b"].detach())
    assert math.sqrt(sum(g.square().sum().item() for g in grads)) < tol
    # and a local minimum along random directions
    g = gen(15)
    for _ in range(5):
        dW, db = torch.randn(2, 6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
        assert tms_population_loss(p["W"] + 1e-3 * dW, p["b"] + 1e-3 * db) > loss


def test_kgon_with_zero_dead_bias_is_not_a_minimum():
    # autograd reports a zero gradient (ReLU'(0) = 0), but raising the dead bias lowers the
    # loss linearly: L(b) = L(0) - b/n + b^2 for small b > 0 (that is how the 5-gon+ arises)
    p = kgon_parameters(5)
    W, b = p["W"], p["b"].clone().requires_grad_()
    (grad,) = torch.autograd.grad(tms_population_loss(W, b), [b])
    assert grad.abs().max().item() < tms_argmin_grad_tol(W, p["b"])  # the √ε floor of the (l, b) search
    base = tms_population_loss(W, p["b"]).item()
    for eps in (1e-2, 1e-3):
        b2 = p["b"].clone()
        b2[5] = eps
        # exact in real arithmetic: rounding of the two losses only (the linear term is eps/6 ≥ 1.7e-4)
        tol = tms_loss_rounding(W, p["b"]) + tms_loss_rounding(W, b2)
        assert tms_population_loss(W, b2).item() == pytest.approx(base - eps / 6 + eps**2, abs=tol)


def test_kgon_parameters_layout():
    p = kgon_parameters(5, n_features=7, n_hidden=3, dead_bias=-0.1, plus=True)
    W, b = p["W"], p["b"]
    assert W.shape == (3, 7) and b.shape == (7,) and W.dtype == F64
    assert torch.all(W[2] == 0) and torch.all(W[:, 5:] == 0)
    torch.testing.assert_close(W[:, :5].norm(dim=0), torch.full((5,), kgon_optimal_length_bias(5, 7)[0], dtype=F64))
    assert b[5].item() == pytest.approx(1 / 14) and b[6].item() == -0.1
    m = ToyModelOfSuperposition(7, 3)
    m.load_state_dict(kgon_parameters(5, n_features=7, n_hidden=3, dtype=torch.float32))
    p2 = kgon_parameters(4, length=2.0, bias=-0.5)
    assert p2["W"][:, 0].norm().item() == pytest.approx(2.0) and p2["b"][0].item() == -0.5


# ---------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------
def _random_symmetry(W: torch.Tensor, b: torch.Tensor, g: torch.Generator):
    m, n = W.shape
    q = random_rotation(m, g)
    if torch.rand(1, generator=g).item() < 0.5:
        q[:, 0] = -q[:, 0]  # include reflections
    perm = torch.randperm(n, generator=g)
    return (q @ W)[:, perm], b[perm], perm


@pytest.mark.parametrize(
    "k,plus,name,n_antipodal", [(5, False, "5-gon", 0), (5, True, "5-gon+", 0), (6, False, "6-gon", 3), (4, False, "4-gon", 2)]
)
def test_classify_kgons(k, plus, name, n_antipodal):
    p = kgon_parameters(k, plus=plus)
    info = classify_tms_point(p["W"], p["b"])
    assert info["name"] == name and info["k"] == k and info["regular"]
    assert info["live"] == list(range(k)) and info["dead"] == list(range(k, 6))
    assert info["dead_positive_bias"] == ([k] if plus else [])
    assert len(info["antipodal_pairs"]) == n_antipodal
    assert info["length"] == pytest.approx(kgon_optimal_length_bias(k, 6)[0])
    g = gen(16)
    for _ in range(4):
        W, b, perm = _random_symmetry(p["W"], p["b"], g)
        info2 = classify_tms_point(W, b)
        assert info2["name"] == name
        inv = torch.argsort(perm)  # original index j sits at position inv[j]
        assert info2["dead_positive_bias"] == sorted(inv[j].item() for j in info["dead_positive_bias"])
        assert len(info2["antipodal_pairs"]) == n_antipodal
    # embedded in 3 hidden dimensions and rotated there
    p3 = kgon_parameters(k, n_hidden=3, plus=plus)
    W3, b3, _ = _random_symmetry(p3["W"], p3["b"], g)
    assert classify_tms_point(W3, b3)["name"] == name


def test_classify_rejects_irregular_points():
    p = kgon_parameters(5)
    W, b = p["W"].clone(), p["b"].clone()
    c, s = math.cos(0.1), math.sin(0.1)
    W_rot = W.clone()
    W_rot[:, 0] = torch.tensor([[c, -s], [s, c]], dtype=F64) @ W[:, 0]
    info = classify_tms_point(W_rot, b)
    assert info["name"] is None and info["equal_lengths"] and not info["equal_angles"]
    W_len = W.clone()
    W_len[:, 1] *= 1.1
    info = classify_tms_point(W_len, b)
    assert info["name"] is None and not info["equal_lengths"] and info["equal_angles"]
    b_bad = b.clone()
    b_bad[2] += 0.1
    assert classify_tms_point(W, b_bad)["name"] is None
    # a third hidden direction breaks planarity
    W3 = torch.cat([W, torch.zeros(1, 6, dtype=F64)])
    W3[2, 0] = 0.5
    assert classify_tms_point(W3, b)["planar"] is False
    # a small but not negligible column is live
    W_small = W.clone()
    W_small[:, 5] = torch.tensor([0.5, 0.0], dtype=F64)
    assert classify_tms_point(W_small, b)["k"] == 6
    # the tolerance is honoured
    assert classify_tms_point(W_rot, b, tol=0.2)["name"] == "5-gon"


# ---------------------------------------------------------------------------
# normal crossing empirical minimum
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("powers", [[1, 1], [2, 1], [2, 2], [3]])
@pytest.mark.parametrize("seed", [0, 1])
def test_normal_crossing_empirical_minimum(powers, seed):
    X, Y = make_normal_crossing_data(200, gen(seed), dtype=F64)
    model = NormalCrossing(powers, dtype=F64)
    w = model.empirical_minimum(X, Y)
    p_hat = ((X * Y).sum() / X.square().sum()).item()
    all_even = all(k % 2 == 0 for k in powers)
    target = max(p_hat, 0.0) if all_even else p_hat
    ks = torch.tensor(powers, dtype=F64)
    n = X.shape[0]
    # rounding: p̂ sums n products of magnitude |xy| (relative to Σx²), then a root and powers
    p_tol = fp_tol(F64, scale=float((X * Y).abs().sum() / X.square().sum()), terms=n + sum(powers))
    assert torch.prod(w**ks).item() == pytest.approx(target, abs=p_tol)

    def L(slope: float) -> float:
        return gaussian_nll(slope * X, Y).item()

    with torch.no_grad():
        model.w.copy_(w)
    best = gaussian_nll(model(X), Y).item()
    # a mean of n positive terms: rounding γ_n · L (a suboptimal slope is caught by p_tol above)
    loss_tol = fp_tol(F64, scale=L(0.0), terms=n)
    assert best <= L(0.0) + loss_tol
    reachable = torch.linspace(-1, 1, 2001, dtype=F64)
    if all_even:
        reachable = reachable[reachable >= 0]
    assert best <= min(L(s.item()) for s in reachable) + loss_tol
    # the gradient of the empirical loss vanishes there: mean of n terms x (p x − y) ∂p/∂w, each of
    # magnitude |x| (|x p| + |y|) · max|∂p/∂w| with ∂p/∂w_i = k_i p / w_i (0 where k_i = 0)
    dp = 0.0 if target == 0 else max(k * abs(target) / abs(float(wi)) for k, wi in zip(powers, w) if k > 0)
    mag = float((X.abs() * (X.abs() * abs(target) + Y.abs())).mean()) * dp
    loss = gaussian_nll(model(X), Y)
    (grad,) = torch.autograd.grad(loss, [model.w])
    # (plus the gradient from p's own rounding: mean(x²) · p_tol · ∂p/∂w); a slope off by δ gives mean(x²) δ ∂p/∂w
    assert grad.norm().item() < fp_tol(F64, scale=mag, terms=n) + float(X.square().mean()) * p_tol * dp
