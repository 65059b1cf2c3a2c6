r"""Cross-check of the devinterp 2.0.1 adapter on a job whose answer is exact.

Linear regression ``y = w·x + noise`` with ``d = 3`` parameters, ``w*`` the
least-squares solution and ``L(w) = ½ mean (y - w·x)²``: L is exactly quadratic,
``L(w) = L(w*) + ½ (w-w*)ᵀ H (w-w*)`` with ``H = XᵀX/n``.  The localized tempered
posterior is Gaussian with precision ``P = nβ H + γ I``, so

    E[λ̂] = nβ · ½ tr(H P⁻¹) = ½ Σ_i 1 / (1 + γ / (nβ h_i))     (continuum).

Full-batch SGLD on this target is an exact AR(1) per eigen-direction,
``δ_{t+1} = a_i δ_t + √ε ξ`` with ``a_i = 1 - ε p_i / 2`` (``p_i = nβ h_i + γ``)
and ``δ_0 = 0``, so ``Var δ_t = ε (1 - a_i^{2t}) / (1 - a_i²)``; the stationary
variance ``1 / (p_i (1 - ε p_i / 4))`` differs from ``1/p_i`` by the
discretisation factor.  devinterp's estimator averages the loss over steps
``t = 0..T-1`` (loss recorded before the step, burn-in included), so its
expectation is known in closed form (``_expected_chain_llc``); the difference
from the continuum value is the discretisation-plus-transient allowance.
"""

from __future__ import annotations

import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip(
    "devinterp",
    reason='devinterp is an optional peer library: pip install "slt[devinterp]"',
)

from slt.peers import devinterp_llc  # noqa: E402

from conftest import fp_tol  # noqa: E402

F32 = torch.float32  # devinterp stores its losses in float32

N, D = 256, 3
NBETA, GAMMA, EPS = 100.0, 20.0, 2e-3


def _scratch_dir() -> str | None:
    # devinterp writes every step to a zarr store; on a RAM-backed directory
    # the writes and the clean-up are several seconds cheaper than on disk.
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        if shutil.disk_usage(shm).free > 1 << 30:
            return shm
    return None


def _half_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()


def _regression_job(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    X = torch.randn(N, D, generator=g, dtype=torch.float64) * scales
    w_true = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    Y = X @ w_true + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    w_star = torch.linalg.solve(X.T @ X, X.T @ Y)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star[None, :])
    h = torch.linalg.eigvalsh(X.T @ X / N).numpy()
    return model, X, Y, h


def _exact_llc(h: np.ndarray) -> float:
    return float(0.5 * np.sum(1.0 / (1.0 + GAMMA / (NBETA * h))))


def _expected_chain_llc(h: np.ndarray, t0: int, t1: int) -> float:
    """E[nβ (mean_{t0<=t<t1} L(w_t) - L(w*))] for full-batch SGLD from w_0 = w*."""
    p = NBETA * h + GAMMA
    a2 = (1.0 - EPS * p / 2.0) ** 2
    s = EPS / (1.0 - a2)  # stationary variance of the discrete chain
    geo = (a2**t0 - a2**t1) / (1.0 - a2)  # sum_{t0<=t<t1} a^{2t}
    mean_var = s * (1.0 - geo / (t1 - t0))
    return float(0.5 * NBETA * np.sum(h * mean_var))


def test_devinterp_matches_exact_llc_of_quadratic_loss():
    model, X, Y, h = _regression_job()
    num_chains, num_burnin, num_draws = 8, 100, 700
    res = devinterp_llc(
        model, X, Y, _half_mse,
        nbeta=NBETA, step_size=EPS, localization=GAMMA,
        num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
        batch_size=N, seed=1, scratch_dir=_scratch_dir(),
    )
    T = num_burnin + num_draws
    assert res["loss_trace"].shape == (num_chains, T)
    assert res["llc_per_chain"].shape == (num_chains,)

    exact = _exact_llc(h)
    # devinterp's llc averages all T steps (burn-in included).
    expected_all = _expected_chain_llc(h, 0, T)
    expected_post = _expected_chain_llc(h, num_burnin, T)

    per_chain = res["llc_per_chain"]
    se = per_chain.std(ddof=1) / np.sqrt(num_chains)
    mean = res["llc_mean"]
    # Monte-Carlo tolerance from the chain spread (chains are independent:
    # different noise seeds, identical full-batch gradients).
    assert abs(mean - expected_all) < 4 * se, (mean, expected_all, se)
    # Against the continuum answer, allow the discretisation bias (stationary
    # variance 1/(p (1 - ε p / 4)) instead of 1/p: ≈ ε p_max / 4 ≈ 6 % on the
    # stiffest direction, ≈ 4 % of λ here) plus the transient from starting at
    # w* (≈ 1 %), both in closed form and added in absolute value so that they
    # cannot cancel.
    stationary = _expected_chain_llc(h, 10**7, 10**7 + 1)
    allowance = abs(stationary - exact) + abs(stationary - expected_all)
    assert allowance < 0.1 * exact
    assert abs(mean - exact) < 4 * se + allowance, (mean, exact, se, allowance)
    # The MC tolerance must be tight enough to reject a wrong temperature
    # (noise variance 2ε would double λ̂, a drift of ε instead of ε/2 halve it).
    assert 4 * se + allowance < 0.35 * exact

    post = res["llc_per_chain_post_burnin"]
    se_post = post.std(ddof=1) / np.sqrt(num_chains)
    assert abs(post.mean() - expected_post) < 4 * se_post, (post.mean(), expected_post)


def test_slt_and_devinterp_agree_on_the_same_job():
    """The same model, data and hyperparameters (full-batch SGLD, ε, nβ, γ,
    burn-in, draws) through ``slt.estimate_llc`` and through devinterp: the
    post-burn-in estimates have the same expectation (``_expected_chain_llc``:
    both record the loss before each step) and must agree within 4 combined
    standard errors (chain spread; chains are independent in both)."""
    import slt

    model, X, Y, h = _regression_job(seed=5)
    num_chains, num_burnin, num_draws = 8, 100, 700
    di = devinterp_llc(
        model, X, Y, _half_mse,
        nbeta=NBETA, step_size=EPS, localization=GAMMA,
        num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
        batch_size=N, seed=11, scratch_dir=_scratch_dir(),
    )
    ours = slt.estimate_llc(
        model, (X, Y), _half_mse, nbeta=NBETA, step_size=EPS, localization=GAMMA,
        num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin, batch_size=None,
        dtype=torch.float64, seed=11, progress=False,
    )
    post = di["llc_per_chain_post_burnin"]
    se_di = post.std(ddof=1) / np.sqrt(num_chains)
    se_slt = float(ours.llc_per_chain.double().std()) / np.sqrt(num_chains)
    se = float(np.hypot(se_di, se_slt))
    assert abs(ours.llc_mean - post.mean()) < 4 * se, (ours.llc_mean, post.mean(), se)
    # both also match the closed-form expectation of this chain, and the band is
    # narrow enough to tell a wrong temperature (±35 %) apart
    expected = _expected_chain_llc(h, num_burnin, num_burnin + num_draws)
    assert abs(ours.llc_mean - expected) < 4 * se_slt + 1e-9
    assert 4 * se < 0.35 * expected


def test_devinterp_adapter_contract(monkeypatch):
    model, X, Y, _ = _regression_job(seed=3)
    w_before = model.weight.detach().clone()
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    py_state = random.getstate()

    kw = dict(
        nbeta=NBETA, step_size=EPS, localization=GAMMA, num_chains=2,
        num_draws=20, num_burnin=5, batch_size=N, seed=7, scratch_dir=_scratch_dir(),
    )
    res = devinterp_llc(model, X, Y, _half_mse, **kw)

    # caller's model and global RNGs untouched
    assert torch.equal(model.weight, w_before)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert random.getstate() == py_state

    trace, init = res["loss_trace"], res["init_loss"]
    assert trace.shape == (2, 25)
    # full batch: devinterp's init_loss is the full-data L_n(w*) (float32 storage: the same number
    # rounded to float32, a few float32 ulps at most)
    store_tol = fp_tol(F32, scale=abs(init))
    assert init == pytest.approx(res["init_loss_full"], abs=store_tol)
    # loss is recorded before the step: the first entry is at w*
    np.testing.assert_allclose(trace[:, 0], init, rtol=0, atol=store_tol)
    # devinterp's LLC is nβ (mean over *all* steps, burn-in included − init_loss), from float32
    # losses: the float32 rounding of a mean of 25 losses and of init_loss, times nβ
    mean_tol = NBETA * fp_tol(F32, scale=float(np.abs(trace).max()), terms=trace.shape[1] + 1)
    np.testing.assert_allclose(res["llc_per_chain"], NBETA * (trace.mean(axis=1) - init), rtol=0, atol=mean_tol)
    # mean and std of the per-chain values (float32-rounded sums of 2 numbers)
    llc_scale = float(np.abs(res["llc_per_chain"]).max())
    assert res["llc_mean"] == pytest.approx(res["llc_per_chain"].mean(), abs=fp_tol(F32, scale=llc_scale, terms=2))
    assert res["llc_std"] == pytest.approx(res["llc_per_chain"].std(ddof=0), abs=fp_tol(F32, scale=llc_scale, terms=4))
    assert res["seconds"] > 0
    assert res["config"]["lr"] == EPS and res["config"]["n_beta"] == NBETA
    assert res["config"]["localization"] == GAMMA

    # fixed seeds: chain c draws its noise from seed + c whatever num_chains is,
    # so a 1-chain rerun reproduces chain 0 exactly
    again = devinterp_llc(model, X, Y, _half_mse, **{**kw, "num_chains": 1})
    np.testing.assert_array_equal(again["loss_trace"][0], trace[0])
    assert not np.array_equal(trace[0], trace[1])
    # density-model path (Y=None: target = X)
    lin = nn.Linear(D, D).double()
    dens = devinterp_llc(
        lin, X, None, lambda o, t: ((o - t) ** 2).mean(), **{**kw, "num_chains": 1}
    )
    assert dens["loss_trace"].shape == (1, 25) and np.isfinite(dens["llc_mean"])

    with pytest.raises(ValueError):
        devinterp_llc(model, X, Y, _half_mse, **{**kw, "sampler": "hmc"})

    # missing peer library -> ImportError with the install hint
    monkeypatch.setitem(sys.modules, "devinterp.slt.llc", None)
    with pytest.raises(ImportError, match=r'pip install "slt\[devinterp\]"'):
        devinterp_llc(model, X, Y, _half_mse, **kw)
