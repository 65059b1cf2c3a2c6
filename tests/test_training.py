"""Tests for slt.training.train: convergence to a minimum of the empirical loss."""

from __future__ import annotations

import math

import pytest
import torch

from slt.models import (
    NormalCrossing,
    ReducedRankRegression,
    ToyModelOfSuperposition,
    classify_tms_point,
    gaussian_nll,
    make_dln_data,
    make_normal_crossing_data,
    make_tms_sparse_data,
    tms_loss,
)
from slt.training import TrainResult, full_batch_loss_and_grad_norm, train

from conftest import F64, argmin_grad_tol, fan_in, flat_hessian_eigvalsh, fp_tol, gen, grad_term_magnitude


def rrr_min_loss(X: torch.Tensor, Y: torch.Tensor, rank: int) -> float:
    """Closed-form minimum of mean 1/2 ||y - B x||^2 over rank(B) <= rank (Eckart-Young on fitted values)."""
    B_ols_T = torch.linalg.lstsq(X, Y).solution  # (N, M)
    fitted = X @ B_ols_T  # (n, M)
    _, _, Vh = torch.linalg.svd(fitted, full_matrices=False)
    V = Vh[:rank].T  # (M, rank)
    pred = fitted @ V @ V.T
    return 0.5 * (Y - pred).square().sum(-1).mean().item()


@pytest.fixture(scope="module")
def rrr_data():
    X, Y, teacher = make_dln_data([5, 3, 5], 1, 400, gen(0), dtype=F64)
    return X, Y, teacher


def test_train_rrr_reaches_global_minimum(rrr_data):
    X, Y, teacher = rrr_data
    model = ReducedRankRegression(5, 3, 5, generator=gen(1), dtype=F64)
    res = train(model, (X, Y), gaussian_nll, steps=300, lr=1e-2)
    assert isinstance(res, TrainResult)
    assert res.converged and res.grad_norm < 1e-5
    assert len(res.history) == 300 and res.steps == 300
    # a deep linear network has no spurious local minima: w* attains the rank-3 optimum
    assert res.loss == pytest.approx(rrr_min_loss(X, Y, 3), abs=1e-9)
    # ... which is below the teacher's empirical loss
    teacher_loss = 0.5 * (Y - X @ (teacher[1] @ teacher[0]).T).square().sum(-1).mean().item()
    assert res.loss < teacher_loss
    # the reported numbers are those of the trained module, up to rounding: the loss is a mean of
    # n·M positive squares (γ_(nM) · L); each gradient entry a mean of n terms of magnitude
    # grad_term_magnitude (γ_n on that, times √P for the norm).  Numbers from another iterate
    # differ by the last step's change, O(grad_norm) ≫ these.
    loss, gnorm = full_batch_loss_and_grad_norm(model, (X, Y), gaussian_nll)
    n_params = sum(p.numel() for p in model.parameters())
    g_mag = grad_term_magnitude(model, gaussian_nll, X, Y)
    grad_tol = math.sqrt(n_params) * fp_tol(F64, scale=g_mag, terms=len(X) + fan_in(model))
    assert loss == pytest.approx(res.loss, abs=fp_tol(F64, scale=res.loss, terms=Y.numel()))
    assert gnorm == pytest.approx(res.grad_norm, abs=grad_tol)


def test_finishing_phase_matters(rrr_data):
    X, Y, _ = rrr_data
    m1 = ReducedRankRegression(5, 3, 5, generator=gen(2), dtype=F64)
    r1 = train(m1, (X, Y), gaussian_nll, steps=30, lr=1e-2, finish=None, tol=1e-6)
    assert not r1.converged and r1.finish_iterations == 0 and r1.finish_history == []
    m2 = ReducedRankRegression(5, 3, 5, generator=gen(2), dtype=F64)
    r2 = train(m2, (X, Y), gaussian_nll, steps=30, lr=1e-2, tol=1e-6)
    assert r2.converged and r2.finish_iterations > 0 and r2.loss < r1.loss
    assert r2.finish_history[-1] == pytest.approx(r2.loss)


def test_a_finish_that_ends_far_from_a_minimum_warns(rrr_data):
    """train() returned converged=False with a gradient norm of 0.092 (a BatchNorm CNN) and said nothing, though
    estimate_llc needs w* at a minimum.  A finish cut short at one iteration ends far from it: a warning naming the
    gradient norm and the fix; the full finish does not warn."""
    import warnings

    X, Y, _ = rrr_data
    m = ReducedRankRegression(5, 3, 5, generator=gen(2), dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"train: the L-BFGS finish ended with gradient norm .* w\* is probably not "
                                            r"a minimum"):
        r = train(m, (X, Y), gaussian_nll, steps=0, finish_iterations=1, tol=1e-6)
    assert r.grad_norm >= 1000 * 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train(ReducedRankRegression(5, 3, 5, generator=gen(2), dtype=F64), (X, Y), gaussian_nll, steps=30,
                     lr=1e-2, tol=1e-6).converged


def test_train_tms_sparse_data():
    x = make_tms_sparse_data(1000, 6, gen(3), dtype=F64)
    model = ToyModelOfSuperposition(6, 2, generator=gen(0), dtype=F64)
    init_loss = tms_loss(model(x), x).item()
    res = train(model, x, tms_loss, steps=1500, lr=1e-2)
    assert res.converged and res.grad_norm < 1e-5
    assert res.loss < init_loss
    # this seed reaches the 6-gon basin: loss near the population value 0.04819 and a
    # near-regular hexagon (finite-sample fluctuations O(n^-1/2) need a loose tolerance)
    assert res.loss == pytest.approx(0.04819, abs=0.005)
    assert classify_tms_point(model.W, model.b, tol=0.15)["name"] == "6-gon"


def test_single_tensor_data_means_autoencoder():
    x = make_tms_sparse_data(200, 4, gen(4), dtype=F64)
    m1 = ToyModelOfSuperposition(4, 2, generator=gen(5), dtype=F64)
    m2 = ToyModelOfSuperposition(4, 2, generator=gen(5), dtype=F64)
    r1 = train(m1, x, tms_loss, steps=50, lr=1e-2, finish=None)
    r2 = train(m2, (x, x), tms_loss, steps=50, lr=1e-2, finish=None)
    assert r1.history == r2.history
    assert torch.equal(m1.W, m2.W)


def test_minibatches_are_reproducible_and_leave_global_rng_alone(rrr_data):
    X, Y, _ = rrr_data
    state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        m = ReducedRankRegression(5, 3, 5, generator=gen(6), dtype=F64)
        r = train(m, (X, Y), gaussian_nll, steps=100, lr=1e-2, batch_size=32, generator=gen(7), finish=None)
        runs.append((r.history, [p.detach().clone() for p in m.parameters()]))
    assert torch.equal(torch.get_rng_state(), state)
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    m = ReducedRankRegression(5, 3, 5, generator=gen(6), dtype=F64)
    r = train(m, (X, Y), gaussian_nll, steps=100, lr=1e-2, batch_size=32, generator=gen(8), finish=None)
    assert r.history != runs[0][0]  # the generator drives the batch order
    # minibatch losses fluctuate around the full-batch loss; the finish makes w* exact anyway
    r = train(m, (X, Y), gaussian_nll, steps=100, lr=1e-2, batch_size=32, generator=gen(8))
    assert r.converged


@pytest.mark.parametrize("optimizer", ["sgd", "lbfgs"])
def test_other_optimizers(rrr_data, optimizer):
    X, Y, _ = rrr_data
    m = ReducedRankRegression(5, 3, 5, generator=gen(9), dtype=F64)
    lr = 0.05 if optimizer == "sgd" else 1.0
    r = train(m, (X, Y), gaussian_nll, steps=100, lr=lr, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0)
    assert r.history[-1] < r.history[0]
    assert r.converged
    assert r.loss == pytest.approx(rrr_min_loss(X, Y, 3), abs=1e-9)


def test_weight_decay_only_in_main_phase(rrr_data):
    X, Y, _ = rrr_data
    m = ReducedRankRegression(5, 3, 5, generator=gen(10), dtype=F64)
    r0 = train(m, (X, Y), gaussian_nll, steps=200, lr=1e-2, weight_decay=1.0, finish=None)
    assert not r0.converged  # the L2-regularised optimum is not a critical point of L_n
    r = train(m, (X, Y), gaussian_nll, steps=0, weight_decay=1.0)
    assert r.converged and r.steps == 0 and r.history == []


def test_normal_crossing_saddle_at_origin():
    X, Y = make_normal_crossing_data(500, gen(11), dtype=F64)
    exact = NormalCrossing([1, 1], dtype=F64)
    with torch.no_grad():
        exact.w.copy_(exact.empirical_minimum(X, Y))
    best = gaussian_nll(exact(X), Y).item()
    # started at the true parameter 0 the gradient vanishes: "converged", yet not a minimum
    at0 = NormalCrossing([1, 1], dtype=F64)
    r0 = train(at0, (X, Y), gaussian_nll, steps=20, lr=1e-2)
    assert r0.converged and torch.equal(at0.w.detach(), torch.zeros(2, dtype=F64))
    assert r0.loss > best
    # from a small random start training finds the empirical minimum
    m = NormalCrossing([1, 1], dtype=F64)
    with torch.no_grad():
        m.w.copy_(0.1 * torch.randn(2, generator=gen(12), dtype=F64))
    r = train(m, (X, Y), gaussian_nll, steps=200, lr=1e-2, tol=1e-8)
    # at |grad| < tol the excess loss is at most tol²/(2h), h the one non-zero curvature (the
    # minimum is a valley p = p̂); plus the rounding of the two losses, means of n positive terms.
    # A point off the valley by δ in p costs ½ mean(x²) δ², far above for any δ ≳ 1e-6.
    h = float(flat_hessian_eigvalsh(exact, lambda p: gaussian_nll(torch.func.functional_call(exact, p, (X,)), Y)).max())
    tol = 1e-8**2 / (2 * h) + 2 * fp_tol(F64, scale=best, terms=len(X))
    assert r.converged and r.loss == pytest.approx(best, abs=tol)


def test_divergence_raises(rrr_data):
    X, Y, _ = rrr_data
    m = ReducedRankRegression(5, 3, 5, generator=gen(13), dtype=F64)
    with pytest.raises(FloatingPointError, match="diverged"):
        train(m, (X, Y), gaussian_nll, steps=500, lr=1e3, optimizer="sgd")


def test_bad_arguments(rrr_data):
    X, Y, _ = rrr_data
    m = ReducedRankRegression(5, 3, 5, dtype=F64)
    d = (X, Y)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train(m, d, gaussian_nll, optimizer="rmsprop")
    with pytest.raises(ValueError, match="finish must be one of"):
        train(m, d, gaussian_nll, finish="adam")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        train(m, d, gaussian_nll, batch_size=0)
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        train(m, d, gaussian_nll, steps=-1)
    with pytest.raises(ValueError, match="lr must be positive"):
        train(m, d, gaussian_nll, lr=0.0)
    with pytest.raises(ValueError, match="tol must be positive"):
        train(m, d, gaussian_nll, tol=-1.0)
    with pytest.raises(ValueError, match="weight_decay must be non-negative"):
        train(m, d, gaussian_nll, weight_decay=-0.1)
    with pytest.raises(ValueError, match="needs full batches"):
        train(m, d, gaussian_nll, optimizer="lbfgs", batch_size=10)
    with pytest.raises(ValueError, match="same number of samples"):
        train(m, (X, Y[:10]), gaussian_nll)
    with pytest.raises(ValueError, match="data must be a tensor X"):
        train(m, [X], gaussian_nll)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        train(m, d, gaussian_nll, batch_size=8, generator=1)
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        train(m, d, "mse")
    frozen = ReducedRankRegression(5, 3, 5, dtype=F64).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, d, gaussian_nll)
    assert not math.isnan(train(m, d, gaussian_nll, steps=1, batch_size=10**6).loss)  # batch >= n is full batch


# ---------------------------------------------------------------------------
# per-sample weights
# ---------------------------------------------------------------------------
def _params(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _located_minimum_tols(model: torch.nn.Module, loss_of_params, loss: float, terms: int, flat: int):
    """Rounding floors of a minimum located by L-BFGS (the two runs below are the same in exact
    arithmetic, so only these separate them).

    Returns ``(grad, loss, params)``: the √ε gradient floor (:func:`argmin_grad_tol`, largest
    curvature); the loss difference, 4 δL (each run stops within 2 δL of the minimum's loss,
    δL = γ_terms · L); and the parameter difference, twice the distance √(4 δL / h) from the
    minimum at which a run can stop along the least-curved direction h (the smallest Hessian
    eigenvalue above the ``flat`` exactly flat gauge directions, along which both runs take
    the same steps up to rounding).
    """
    ev = flat_hessian_eigvalsh(model, loss_of_params)
    d_loss = fp_tol(F64, scale=loss, terms=terms)
    grad = argmin_grad_tol(curvature=float(ev[-1]), loss_rounding=d_loss)
    return grad, 4 * d_loss, 2 * math.sqrt(4 * d_loss / float(ev[flat]))


def test_integer_weights_equal_duplicated_rows(rrr_data):
    X, Y, _ = rrr_data
    X, Y = X[:120], Y[:120]
    counts = torch.randint(0, 4, (120,), generator=gen(20))
    counts[0] = 1  # at least one row
    Xd, Yd = X.repeat_interleave(counts, 0), Y.repeat_interleave(counts, 0)
    for kw in ({"steps": 0}, {"steps": 40, "lr": 1e-2}, {"steps": 10, "optimizer": "lbfgs", "lr": 1.0}):
        mw = ReducedRankRegression(5, 3, 5, generator=gen(21), dtype=F64)
        md = ReducedRankRegression(5, 3, 5, generator=gen(21), dtype=F64)
        rw = train(mw, (X, Y), gaussian_nll, weights=counts, tol=1e-8, **kw)
        rd = train(md, (Xd, Yd), gaussian_nll, tol=1e-8, **kw)
        # bounds from the rounding of the loss (a mean of Σcounts · M squares) at the minimum; the
        # GL(3) gauge of W2 W1 gives 9 flat directions.  Mishandled weights move the minimum by O(0.1).
        terms = Yd.numel()
        grad_tol, loss_tol, param_tol = _located_minimum_tols(
            md, lambda p: gaussian_nll(torch.func.functional_call(md, p, (Xd,)), Yd), rd.loss, terms, flat=9)
        assert rw.grad_norm < grad_tol and rd.grad_norm < grad_tol
        assert rw.loss == pytest.approx(rd.loss, abs=loss_tol)
        # the main-phase losses: each evaluation rounds by γ_terms (relative, positive terms), and the
        # runs' iterates drift apart by at most that much per step (steps of at most lr per coordinate)
        assert rw.history == pytest.approx(rd.history, rel=fp_tol(F64, terms=terms) * max(1, kw["steps"]))
        for a, b in zip(_params(mw), _params(md)):
            assert torch.allclose(a, b, rtol=0, atol=param_tol)
    # the TMS from the 6-gon, a weighted slt.Data (the form slt.symmetry returns)
    from slt import Data
    from slt.models import kgon_parameters

    x = make_tms_sparse_data(300, 6, gen(22), dtype=F64)
    c = torch.randint(1, 4, (300,), generator=gen(23))
    xd = x.repeat_interleave(c, 0)
    ms = []
    for data in (Data(x, None, c.to(F64)), xd):
        m = ToyModelOfSuperposition(6, 2, dtype=F64)
        m.load_state_dict({k: v.to(F64) for k, v in kgon_parameters(6, 6, 2).items()})
        r = train(m, data, tms_loss, steps=0, tol=1e-8)
        ms.append((r.loss, _params(m), r.grad_norm, m))
    # as above; rotations of the hidden plane are the one flat (gauge) direction
    md = ms[1][3]
    grad_tol, loss_tol, param_tol = _located_minimum_tols(
        md, lambda p: tms_loss(torch.func.functional_call(md, p, (xd,)), xd), ms[1][0], xd.numel(), flat=1)
    assert ms[0][2] < grad_tol and ms[1][2] < grad_tol
    assert ms[0][0] == pytest.approx(ms[1][0], abs=loss_tol)
    for a, b in zip(ms[0][1], ms[1][1]):
        assert torch.allclose(a, b, rtol=0, atol=param_tol)


def test_weights_of_ones_equal_unweighted(rrr_data):
    X, Y, _ = rrr_data
    from slt import Data

    for kw in ({"steps": 30, "lr": 1e-2}, {"steps": 60, "lr": 1e-2, "batch_size": 32, "generator": None}):
        runs = []
        for data, w in (((X, Y), None), ((X, Y), torch.ones(len(X))), (Data(X, Y, 2.5 * torch.ones(len(X))), None),
                        ((X, Y, torch.ones(len(X), dtype=F64)), None)):
            m = ReducedRankRegression(5, 3, 5, generator=gen(24), dtype=F64)
            k = dict(kw)
            if "generator" in k:
                k["generator"] = gen(25)
            r = train(m, data, gaussian_nll, weights=w, **k)
            runs.append((r.loss, r.history, _params(m)))
        for loss, hist, ps in runs[1:]:
            assert loss == runs[0][0] and hist == runs[0][1]
            assert all(torch.equal(a, b) for a, b in zip(ps, runs[0][2]))


def test_weighted_minimum_and_minibatches():
    # linear regression: the weighted least-squares solution is the unique minimum
    g = gen(26)
    n = 400
    X = torch.randn(n, 3, generator=g, dtype=F64)
    Y = X @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=F64) + torch.randn(n, 1, generator=g, dtype=F64)
    a = torch.rand(n, generator=g, dtype=F64) * 3
    a[::4] = 0.0
    Y[::4] = 1e6  # zero-weight outliers: never drawn, no influence
    Wd = torch.diag(a)
    beta = torch.linalg.solve(X.T @ Wd @ X, X.T @ Wd @ Y)

    def model() -> torch.nn.Module:
        return torch.nn.Linear(3, 1, bias=False).double()

    loss = torch.nn.functional.mse_loss
    m = model()
    with torch.no_grad():
        m.weight.zero_()
    r = train(m, (X, Y), loss, weights=a, steps=0, tol=1e-10)
    assert r.converged and torch.allclose(m.weight.T, beta, atol=1e-8)
    exact = float(((X @ beta - Y).square().squeeze(1) * a).sum() / a.sum())
    # rounding of two weighted means of n positive terms (γ_n · L each); the excess loss at
    # |grad| < 1e-10 is ≤ 1e-20 / (2 h_min), h_min ≈ 1.8 — below that.  A wrong weighting is off by O(1).
    loss_tol = fp_tol(F64, scale=exact, terms=n)
    assert r.loss == pytest.approx(exact, abs=2 * loss_tol)
    loss_v, gnorm = full_batch_loss_and_grad_norm(m, (X, Y), loss, weights=a)
    # the same code path: the loss as above, each gradient entry a weighted mean of n terms (√P of them)
    grad_tol = math.sqrt(3) * fp_tol(F64, scale=grad_term_magnitude(m, loss, X, Y, a), terms=n + fan_in(m))
    assert loss_v == pytest.approx(r.loss, abs=loss_tol) and gnorm == pytest.approx(r.grad_norm, abs=grad_tol)

    # minibatches drawn ∝ weight: the batch mean is unbiased for the weighted loss (here at a fixed w)
    m = model()
    with torch.no_grad():
        m.weight.copy_(beta.T + 0.3)
    at = float(((X @ (beta + 0.3) - Y).square().squeeze(1) * a).sum() / a.sum())
    r = train(m, (X, Y), loss, weights=a, steps=3000, lr=1e-300, optimizer="sgd", batch_size=8, generator=gen(27),
              finish=None)
    h = torch.tensor(r.history)
    assert h.max() < 1e3  # no zero-weight outlier was ever drawn
    assert abs(float(h.mean()) - at) < 4 * float(h.std()) / math.sqrt(len(h))
    # Adam on weighted minibatches then the finish reaches the weighted minimum
    r = train(m, (X, Y), loss, weights=a, steps=300, lr=1e-2, batch_size=16, generator=gen(28), tol=1e-10)
    assert r.converged and torch.allclose(m.weight.T, beta, atol=1e-8)


def test_bad_weights(rrr_data):
    X, Y, _ = rrr_data
    from slt import Data

    m = ReducedRankRegression(5, 3, 5, dtype=F64)
    n = len(X)
    ones = torch.ones(n, dtype=F64)
    bad = [
        (torch.ones(n - 1), "length n=400"),
        (torch.ones(n, 1), "1-D tensor"),
        (torch.cat([-ones[:1], ones[1:]]), "non-negative"),
        (torch.cat([torch.tensor([math.nan], dtype=F64), ones[1:]]), "NaN"),
        (torch.cat([torch.tensor([math.inf], dtype=F64), ones[1:]]), "NaN or inf"),
        (torch.zeros(n), "sum to zero"),
        ("abc", "1-D tensor"),
    ]
    for w, msg in bad:
        with pytest.raises(ValueError, match=msg):
            train(m, (X, Y), gaussian_nll, weights=w, steps=1)
        with pytest.raises(ValueError, match=msg):
            full_batch_loss_and_grad_norm(m, (X, Y), gaussian_nll, weights=w)
    with pytest.raises(ValueError, match="sum to zero"):
        train(m, (X, Y, torch.zeros(n)), gaussian_nll)
    with pytest.raises(ValueError, match="weights given twice"):
        train(m, Data(X, Y, ones), gaussian_nll, weights=ones)
    # a list of numbers is accepted (converted to a tensor)
    assert train(m, (X[:3], Y[:3]), gaussian_nll, weights=[1, 2, 3], steps=0).loss >= 0


def test_stream_of_the_data_itself_equals_full_batch(rrr_data):
    # a stream that returns the whole data set every step is full-batch training, step for step
    X, Y, _ = rrr_data
    m1 = ReducedRankRegression(5, 3, 5, dtype=F64, generator=gen(30))
    m2 = ReducedRankRegression(5, 3, 5, dtype=F64, generator=gen(30))
    calls = []

    def stream(batch_size: int, g: torch.Generator):
        assert isinstance(g, torch.Generator)
        calls.append(batch_size)
        return X, Y

    r1 = train(m1, (X, Y), gaussian_nll, steps=40, lr=1e-2, finish=None)
    r2 = train(m2, (X, Y), gaussian_nll, steps=40, lr=1e-2, finish=None, batch_size=len(X), stream=stream)
    assert calls == [len(X)] * 40
    assert r1.history == r2.history and r1.loss == r2.loss
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_stream_descends_the_population_loss_not_the_sample_fit():
    # linear regression y = x·β + ε with few stored samples: minibatch Adam on the stored samples ends at
    # the n-sample least-squares fit; on fresh samples it ends near β (the population minimum)
    beta = torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]], dtype=F64)

    def sample(n: int, g: torch.Generator):
        x = torch.randn(n, 5, generator=g, dtype=F64)
        return x, x @ beta + torch.randn(n, 1, generator=g, dtype=F64)

    X, Y = sample(20, gen(31))
    ols = torch.linalg.lstsq(X, Y).solution
    loss = torch.nn.functional.mse_loss
    fits = {}
    for online in (False, True):
        m = torch.nn.Linear(5, 1, bias=False).double()
        with torch.no_grad():
            m.weight.zero_()
        # batch 100 >= n = 20: the stored samples are trained full batch (gradient descent to the OLS fit)
        train(m, (X, Y), loss, steps=2000, lr=0.05, optimizer="sgd", batch_size=100, generator=gen(32),
              finish=None, stream=sample if online else None)
        fits[online] = m.weight.detach().T
    # SGD on fresh batches of B = 100 settles at β with per-coordinate variance ≈ lr·Var(grad)/(2·H·B)
    # = 0.05·4/(2·2·100) = 5e-4 (loss curvature H = 2, per-sample gradient variance ≈ 4): the norm of the
    # 5-vector is ≈ 0.05 rms, so 0.15 is 3 rms.  The 20-sample fit is off β by O(sqrt(5/15)) ≈ 0.6.
    assert (ols - beta).norm() > 0.3
    assert (fits[False] - ols).norm() < 1e-6
    assert (fits[True] - beta).norm() < 0.15 < (fits[True] - ols).norm()


def test_stream_bad_arguments(rrr_data):
    X, Y, _ = rrr_data
    m = ReducedRankRegression(5, 3, 5, dtype=F64)

    def ok(batch_size: int, g: torch.Generator):
        return X[:batch_size], Y[:batch_size]

    cases = [
        (dict(stream=ok), "needs a batch_size"),
        (dict(stream=ok, batch_size=8, optimizer="lbfgs"), "lbfgs"),
        (dict(stream=ok, batch_size=8, weights=torch.rand(len(X), generator=gen(33))), "weighted data"),
        (dict(stream="abc", batch_size=8), "stream must be callable"),
        (dict(stream=lambda b, g: (X[:b], Y[:b, :2]), batch_size=8), "shaped like data"),
        (dict(stream=lambda b, g: (X[: b - 1], Y[: b - 1]), batch_size=8), "returned 7 samples"),
        (dict(stream=lambda b, g: "abc", batch_size=8), "stream returned a bad batch"),
        (dict(stream=lambda b, g: (X[:b], Y[:b], torch.ones(b, dtype=F64)), batch_size=8), "weighted batch"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            train(m, (X, Y), gaussian_nll, steps=2, **kwargs)


def test_train_accepts_mappings_of_columns_as_estimate_llc_does():
    """``model(**batch)`` with a separate target, and a causal LM whose loss reads the batch mapping."""
    import torch.nn.functional as F
    from torch import nn

    import slt

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 1), nn.Linear(2, 1)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    g = torch.Generator().manual_seed(0)
    cols = {"left": torch.randn(64, 3, generator=g), "right": torch.randn(64, 2, generator=g)}
    y = cols["left"] @ torch.tensor([[1.0], [2.0], [-1.0]]) + cols["right"] @ torch.tensor([[0.5], [0.5]])
    m = TwoInputs()
    res = train(m, (cols, y), F.mse_loss, steps=200, lr=0.05, batch_size=16)
    assert res.loss < 1e-6  # an exactly linear target: the minimum is 0

    class TinyLM(nn.Module):
        def __init__(self, vocab=8, d=8):
            super().__init__()
            self.emb, self.out = nn.Embedding(vocab, d), nn.Linear(d, vocab)

        def forward(self, input_ids):
            return self.out(self.emb(input_ids))

    ids = torch.randint(0, 8, (32, 6), generator=g)
    lm = TinyLM()
    before = float(slt.losses.causal_lm(lm(ids), {"input_ids": ids}))
    res = train(lm, {"input_ids": ids}, slt.losses.causal_lm, steps=100, lr=0.05, finish=None)
    assert res.loss < before
    with pytest.raises(ValueError, match="stream needs tensor data"):
        train(lm, {"input_ids": ids}, slt.losses.causal_lm, steps=1, batch_size=4, stream=lambda b, g: ids[:b])
