"""Exact tier: shapes, deterministic steps, and equivalence of the computation paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt.data import Data
from slt.engine import ChainEvaluator
from slt.losses import LossAdapter
from slt.params import ParamSpec
from slt.samplers import LocalizedPotential, rmsprop_sgld, sgld

from conftest import (
    IGNORE_CHECKPOINT_WARNING,
    LinearBatchNorm,
    PlainLocation,
    engine_trace_tol,
    fan_in,
    fp_tol,
    grad_term_magnitude,
    unit_gaussian_nll,
)


class NativeMLP(nn.Module):
    """Small tanh MLP written both ways: plain forward and forward_chains."""

    def __init__(self, d_in=3, h=4, d_out=2):
        super().__init__()
        self.l1 = nn.Linear(d_in, h)
        self.l2 = nn.Linear(h, d_out)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))

    def forward_chains(self, p, x):  # p[name]: (C, *shape); x: (C, B, d_in)
        h = torch.tanh(torch.baddbmm(p["l1.bias"].unsqueeze(1), x, p["l1.weight"].transpose(1, 2)))
        return torch.baddbmm(p["l2.bias"].unsqueeze(1), h, p["l2.weight"].transpose(1, 2))


def _data(n=200, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=dtype)
    Y = torch.randn(n, 2, generator=g, dtype=dtype)
    return X, Y


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)  # test-side only: library code never seeds globally
    return NativeMLP().to(dtype)


pytestmark = IGNORE_CHECKPOINT_WARNING

KW = dict(num_chains=3, num_draws=20, num_burnin=5, step_size=1e-3, nbeta=50.0, localization=10.0,
          batch_size=32, dtype=torch.float64, progress=False)


def mse_rounding(model: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> float:
    """Rounding bound of F.mse_loss(model(X), Y) computed in two orders: a mean of Y.numel() squares
    of residuals bounded by max|Y| + max|model(X)|, each output itself a sum over the fan-ins."""
    with torch.no_grad():
        r = float(Y.abs().max() + model(X).abs().max())
    return fp_tol(X.dtype, scale=r * r, terms=Y.numel() + fan_in(model))


def trace_tol(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, kw: dict, loss_trace: torch.Tensor,
              loss_fn=F.mse_loss) -> float:
    """engine_trace_tol for an estimate_llc run with settings ``kw`` (minibatch SGLD from w* = the model)."""
    return engine_trace_tol(model, loss_fn, X, Y, loss_trace, steps=kw["num_burnin"] + kw["num_draws"],
                            step_size=kw["step_size"], nbeta=kw["nbeta"], localization=kw["localization"],
                            batch_rows=kw["batch_size"])


def test_result_shapes_and_frame():
    X, Y = _data()
    r = slt.estimate_llc(_model(), (X, Y), F.mse_loss, **KW)
    assert r.llc_per_chain.shape == (3,)
    assert r.loss_trace.shape == (3, 20)
    assert r.llc_trace.shape == (3, 20)
    assert r.loss_star_trace.shape == (3, 20)
    assert r.burnin_loss_trace.shape == (3, 5)
    df = r.to_frame()
    assert len(df) == 60 and {"chain", "draw", "loss", "llc"} <= set(df.columns)
    # the same mean of C·T numbers summed in another order
    mean_tol = fp_tol(r.llc_trace.dtype, scale=float(r.llc_trace.abs().max()), terms=r.llc_trace.numel())
    assert math.isclose(r.llc_mean, float(r.llc_per_chain.mean()), rel_tol=0, abs_tol=mean_tol)
    assert torch.allclose(r.llc_trace, r.nbeta * (r.loss_trace - r.loss_star_trace))
    assert "LLC =" in str(r)
    assert r.config["seed"] == 0 and r.config["versions"]["torch"] == torch.__version__


def test_zero_noise_step_is_gradient_step():
    X, Y = _data()
    m = _model()
    spec = ParamSpec(m)
    ev = ChainEvaluator(m, spec, LossAdapter(F.mse_loss), "vmap")
    w_star = spec.flatten_module(m).unsqueeze(0).repeat(2, 1)
    w0 = w_star + 0.1 * torch.randn(w_star.shape, generator=torch.Generator().manual_seed(1), dtype=w_star.dtype)
    pot = LocalizedPotential(ev.loss_and_grad, w_star, 30.0, 5.0)
    batch = Data(X, Y).full_batch()

    class Zero:
        def normal(self, like):
            return torch.zeros_like(like)

    eps = 1e-3
    # rounding: the gradient (a mean of n terms of magnitude grad_term_magnitude, times nβ = 30 and
    # ε/2; rmsprop divides by √v + 0.1 ≥ 0.1, which amplifies by ≤ 10) plus a few ulps of |w|.
    # A wrong drift (factor, sign, missing term) is off by ≳ ε/2 · 5 · |w0 − w*| ~ 1e-4.
    g_tol = fp_tol(X.dtype, scale=grad_term_magnitude(m, F.mse_loss, X, Y), terms=len(X) + fan_in(m))
    step_tol = fp_tol(X.dtype, scale=float(w0.abs().max()), terms=3) + 0.5 * eps * 10 * 30.0 * g_tol
    for make in (sgld, rmsprop_sgld):
        smp = make(pot, eps, deterministic=True)
        state, info = smp.step(smp.init(w0), batch, Zero())
        # reference gradient by plain autograd on the module, chain by chain
        for c in range(2):
            mc = _model()
            with torch.no_grad():
                for p, v in zip(mc.parameters(), spec.unflatten(w0[c]).values()):
                    p.copy_(v)
            loss = F.mse_loss(mc(X), Y)
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(mc.parameters()))])
            grad_U = 30.0 * g + 5.0 * (w0[c] - w_star[c])
            if make is sgld:
                expected = w0[c] - 0.5 * eps * grad_U
            else:
                v = 0.01 * g.square()
                expected = w0[c] - 0.5 * eps * grad_U / (v.sqrt() + 0.1)
            torch.testing.assert_close(state.params[c], expected, rtol=0, atol=step_tol)
            torch.testing.assert_close(info.loss[c], loss.detach())


@pytest.mark.parametrize("path", ["native", "loop"])
def test_paths_agree_with_vmap(path):
    """The batched vmap engine, the native chain-dimension path and a Python loop
    over chains consume the same random numbers and give the same chains."""
    X, Y = _data()
    ref = slt.estimate_llc(_model(), (X, Y), F.mse_loss, vectorize="vmap", **KW)
    other = slt.estimate_llc(_model(), (X, Y), F.mse_loss, vectorize=path, **KW)
    # the same chains up to rounding (the paths sum in different orders); different noise or
    # batches would move the traces by O(1)
    tol = trace_tol(_model(), X, Y, KW, ref.loss_trace)
    torch.testing.assert_close(other.loss_trace, ref.loss_trace, rtol=0, atol=tol)
    torch.testing.assert_close(other.llc_per_chain, ref.llc_per_chain, rtol=0, atol=KW["nbeta"] * 2 * tol)
    assert other.diagnostics["path"] == path


def test_batched_chains_equal_single_chain_steps():
    """One batched SGLD step on C chains equals C single-chain steps with the same noise."""
    X, Y = _data()
    m = _model()
    spec = ParamSpec(m)
    ev = ChainEvaluator(m, spec, LossAdapter(F.mse_loss), "native")
    C = 4
    g = torch.Generator().manual_seed(3)
    w_star = spec.flatten_module(m).unsqueeze(0).repeat(C, 1)
    w0 = w_star + 0.05 * torch.randn(w_star.shape, generator=g, dtype=w_star.dtype)
    noise = torch.randn(w0.shape, generator=g, dtype=w0.dtype)
    idx = torch.randint(0, X.shape[0], (C, 16), generator=g)
    batch = Data(X, Y).gather(idx)

    class Fixed:
        def __init__(self, z):
            self.z = z

        def normal(self, like):
            return self.z

    smp = sgld(LocalizedPotential(ev.loss_and_grad, w_star, 40.0, 2.0), 1e-3, mala_every=1)
    batched, info = smp.step(smp.init(w0), batch, Fixed(noise))
    # one step: the batch gradient's rounding (16 terms) times ε nβ / 2, plus a few ulps of |w|
    g_tol = fp_tol(X.dtype, scale=grad_term_magnitude(m, F.mse_loss, X, Y), terms=16 + fan_in(m))
    step_tol = fp_tol(X.dtype, scale=float(w0.abs().max()), terms=3) + 0.5 * 1e-3 * 40.0 * g_tol
    for c in range(C):
        one = sgld(LocalizedPotential(ev.loss_and_grad, w_star[c : c + 1], 40.0, 2.0), 1e-3, mala_every=1)
        sb = Data(X, Y).gather(idx[c : c + 1])
        s1, i1 = one.step(one.init(w0[c : c + 1]), sb, Fixed(noise[c : c + 1]))
        torch.testing.assert_close(batched.params[c], s1.params[0], rtol=0, atol=step_tol)
        torch.testing.assert_close(info.mala_accept[c], i1.mala_accept[0])


def test_checkpoint_batching_equals_separate_calls():
    X, Y = _data()
    ms = [_model(s) for s in (0, 1, 2)]
    batched = slt.estimate_llc(ms, (X, Y), F.mse_loss, seed=[7, 8, 9], **KW)
    assert isinstance(batched, list) and len(batched) == 3
    for m, s, rb in zip(ms, (7, 8, 9), batched):
        rs = slt.estimate_llc(m, (X, Y), F.mse_loss, seed=s, **KW)
        tol = trace_tol(m, X, Y, KW, rs.loss_trace)  # the same chains up to rounding
        torch.testing.assert_close(rb.loss_trace, rs.loss_trace, rtol=0, atol=tol)
        assert rb.llc_mean == pytest.approx(rs.llc_mean, abs=KW["nbeta"] * 2 * tol)
    # state dicts with a template give the same answer
    sds = [m.state_dict() for m in ms]
    via_sd = slt.estimate_llc(_model(5), (X, Y), F.mse_loss, state_dicts=sds, seed=[7, 8, 9], **KW)
    for a, b in zip(via_sd, batched):
        torch.testing.assert_close(a.loss_trace, b.loss_trace)
    # an int seed gives checkpoint k the stream of seed + k
    by_int = slt.estimate_llc(models=ms, data=(X, Y), model=None, loss_fn=F.mse_loss, seed=7, **KW)
    torch.testing.assert_close(by_int[2].loss_trace, batched[2].loss_trace)


def test_full_batch_control_variate_is_exact_and_mala_every_step():
    X, Y = _data()
    kw = {**KW, "batch_size": None}
    r = slt.estimate_llc(_model(), (X, Y), F.mse_loss, **kw)
    assert torch.allclose(r.loss_star_trace, torch.full_like(r.loss_star_trace, r.init_loss))
    assert 0.0 < r.diagnostics["mala_acceptance"] <= 1.0


def test_control_variate_matches_forward_at_w_star():
    """The gathered per-sample control variate equals an explicit forward pass at w*."""
    X, Y = _data()
    m = _model()
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, vectorize="vmap", **KW)
    # recompute L_B(w*) with the index stream used by the engine
    from slt.engine import ChainRNG

    rng = ChainRNG([0], 3, torch.device("cpu"))
    d = Data(X, Y)
    idxs = [rng.index(d, 32) for _ in range(25)]
    # every step draws a fresh batch: the draws never reuse a MALA step's batch (its loss would be
    # taken on the batch that just moved the chain)
    for t in range(20):
        idx = idxs[5 + t]
        with torch.no_grad():
            ref = torch.stack([F.mse_loss(m(X[idx[c]]), Y[idx[c]]) for c in range(3)])
        # the same batch losses at w*, summed in another order; another batch is off by O(0.1)
        torch.testing.assert_close(r.loss_star_trace[:, t], ref, rtol=0, atol=mse_rounding(m, X[idx[0]], Y[idx[0]]))


def test_weighted_data_full_batch_loss():
    X, Y = _data(50)
    w = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = _model()
    r = slt.estimate_llc(m, (X, Y, w), F.mse_loss, **{**KW, "batch_size": None, "num_draws": 2})
    with torch.no_grad():
        per = ((m(X) - Y) ** 2).mean(1)
    # rounding of a weighted mean of squares (ignoring the weights is off by O(0.1))
    assert r.init_loss == pytest.approx(float((per * w).sum() / w.sum()), abs=mse_rounding(m, X, Y))
    # duplicating a sample equals doubling its weight
    X2 = torch.cat([X, X[:1]])
    Y2 = torch.cat([Y, Y[:1]])
    w2 = torch.ones(50, dtype=torch.float64)
    w2[0] = 2.0
    a = slt.estimate_llc(m, (X2, Y2), F.mse_loss, **{**KW, "batch_size": None, "num_draws": 2})
    b = slt.estimate_llc(m, (X, Y, w2), F.mse_loss, **{**KW, "batch_size": None, "num_draws": 2})
    assert a.init_loss == pytest.approx(b.init_loss, abs=mse_rounding(m, X2, Y2))


def test_dataset_and_dataloader_inputs():
    X, Y = _data(64)
    ds = torch.utils.data.TensorDataset(X, Y)
    r1 = slt.estimate_llc(_model(), ds, F.mse_loss, **KW)
    r2 = slt.estimate_llc(_model(), (X, Y), F.mse_loss, **KW)
    torch.testing.assert_close(r1.loss_trace, r2.loss_trace)
    dl = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)
    r3 = slt.estimate_llc(_model(), dl, F.mse_loss, **{**KW, "nbeta": 50.0})
    with torch.no_grad():
        full = F.mse_loss(_model()(X), Y)
    assert r3.init_loss == pytest.approx(float(full), abs=mse_rounding(_model(), X, Y))
    assert torch.isfinite(r3.llc_trace).all()


def test_density_model_single_tensor():
    """A single tensor X is a density model: loss_fn(model(x), x)."""

    X = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = PlainLocation()
    with torch.no_grad():
        m.mu.copy_(X.mean(0))
    r = slt.estimate_llc(m, X, unit_gaussian_nll, **KW)
    # rounding of a mean of 600 halved squares of |x − μ| ≤ max|x| + max|μ|
    scale = 0.5 * float(X.abs().max() + m.mu.detach().abs().max()) ** 2
    assert r.init_loss == pytest.approx(float(unit_gaussian_nll(m(X), X)), abs=fp_tol(X.dtype, scale=scale, terms=X.numel()))


def test_observables_recorded_at_draws():
    X, Y = _data()
    obs = {"w_norm": lambda p: torch.cat([v.flatten(1) for v in p.values()], 1).norm(dim=1)}
    r = slt.estimate_llc(_model(), (X, Y), F.mse_loss, observables=obs, **KW)
    assert r.observables["w_norm"].shape == (3, 20)
    assert torch.isfinite(r.observables["w_norm"]).all()


def test_frozen_parameters_are_not_sampled():
    X, Y = _data()
    m = _model()
    m.l1.weight.requires_grad_(False)
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, **KW)
    assert r.config["num_params"] == sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_batchnorm_train_mode_falls_back_to_loop_with_warning():
    X, Y = _data(64, dtype=torch.float32)
    m = LinearBatchNorm().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="falling back to a sequential loop"):
        r = slt.estimate_llc(m, (X, Y), F.mse_loss, **{**KW, "dtype": torch.float32})
    assert r.diagnostics["path"] == "loop" and "fallback" in r.diagnostics["path_reason"]
    for k, v in m.state_dict().items():  # the user's module is untouched
        assert torch.equal(v, before[k])


# ----------------------------------------------------------------------------
# hand-written gradients (ChainModule.loss_and_grad_chains)
# ----------------------------------------------------------------------------
class _TMSAutograd(slt.models.ToyModelOfSuperposition):
    """The same model with the analytic fast path switched off."""

    def supports_analytic_grad(self, loss_fn):
        return False


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("importance", [None, [1.0, 0.9, 0.81, 0.5, 0.3, 2.0]])
def test_tms_analytic_gradient_equals_autograd(weighted, importance):
    from slt.models.tms import make_tms_loss, tms_loss

    g = torch.Generator().manual_seed(3)
    C, B, n, m = 3, 17, 6, 2
    model = slt.models.ToyModelOfSuperposition(n, m, dtype=torch.float64)
    loss_fn = tms_loss if importance is None else make_tms_loss(importance)
    assert model.supports_analytic_grad(loss_fn)
    W = torch.randn(C, m, n, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(C, n, generator=g, dtype=torch.float64)
    x = torch.rand(C, B, n, generator=g, dtype=torch.float64)
    y = torch.rand(C, B, n, generator=g, dtype=torch.float64)
    wts = None
    if weighted:
        wts = torch.rand(C, B, generator=g, dtype=torch.float64)
        wts = wts / wts.sum(1, keepdim=True)
    loss, grads = model.loss_and_grad_chains({"W": W, "b": b}, x, y, wts, loss_fn)

    Wr, br = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    out = model.forward_chains({"W": Wr, "b": br}, x)
    adapter = LossAdapter(loss_fn)
    ref = adapter.chain_loss(out, y, wts)
    gW, gb = torch.autograd.grad(ref.sum(), (Wr, br))
    # rounding bounds: the same loss and gradients evaluated at |W|, |b|, |x|, −|y| (and |weights|)
    # add up every term with the same sign (all ReLUs active, y − out = −(|y| + out)), so they are
    # the magnitudes of the summed terms; B·n outputs with n + m fan-ins each.  A wrong analytic
    # gradient is off by O(1) of its entries.
    Wa, ba = W.abs().requires_grad_(True), b.abs().requires_grad_(True)
    mag = adapter.chain_loss(model.forward_chains({"W": Wa, "b": ba}, x.abs()), -y.abs(),
                             None if wts is None else wts.abs())
    mW, mb = torch.autograd.grad(mag.sum(), (Wa, ba))
    terms = B * n + n + m
    torch.testing.assert_close(loss, ref.detach(), rtol=0, atol=fp_tol(torch.float64, scale=float(mag.max()), terms=terms))
    torch.testing.assert_close(grads["W"], gW, rtol=0, atol=fp_tol(torch.float64, scale=float(mW.max()), terms=terms))
    torch.testing.assert_close(grads["b"], gb, rtol=0, atol=fp_tol(torch.float64, scale=float(mb.max()), terms=terms))


def test_engine_analytic_path_equals_autograd_path():
    from slt.models.tms import kgon_parameters, make_tms_sparse_data, tms_loss

    X = make_tms_sparse_data(500, 6, torch.Generator().manual_seed(0)).double()
    fast = slt.models.ToyModelOfSuperposition(6, 2, dtype=torch.float64)
    fast.load_state_dict(kgon_parameters(5, 6, 2, dead_bias=-1.0))
    slow = _TMSAutograd(6, 2, dtype=torch.float64)
    slow.load_state_dict(fast.state_dict())
    kw = dict(num_chains=3, num_draws=40, num_burnin=10, step_size=1e-4, nbeta=50.0, localization=10.0,
              batch_size=32, dtype=torch.float64, seed=5, progress=False)
    rf = slt.estimate_llc(fast, X, tms_loss, **kw)
    rs = slt.estimate_llc(slow, X, tms_loss, **kw)
    assert "hand-written gradient" in rf.diagnostics["path_reason"]
    assert "hand-written gradient" not in rs.diagnostics["path_reason"]
    # the same chains up to the rounding of two gradient formulas
    tol = trace_tol(fast, X, X, kw, rs.loss_trace, loss_fn=tms_loss)
    torch.testing.assert_close(rf.loss_trace, rs.loss_trace, rtol=0, atol=tol)
    torch.testing.assert_close(rf.llc_trace, rs.llc_trace, rtol=0, atol=kw["nbeta"] * 2 * tol)
