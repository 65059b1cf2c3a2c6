r"""Bayesian influence functions, the loss kernel and per-sample susceptibilities (:mod:`slt.influence`).

Known answers come from linear regression, whose localized posterior is Gaussian.  With
``F.mse_loss`` (:math:`L = \frac1n\sum_i r_i(w)^2`, no ½), nβ and γ, the potential is
:math:`U(w) = n\beta L_n(w) + \frac\gamma2\lVert w-w^*\rVert^2` with precision
:math:`\Lambda = 2\beta X^\top X + \gamma I` (β = nβ/n), and with ``w*`` the least-squares solution
its mean is ``w*``.  Full-batch SGLD, :math:`w' = w - \frac\epsilon2\Lambda(w-w^*) + \sqrt\epsilon\xi`,
is an AR(1) process whose stationary law is Gaussian too, with covariance
:math:`\Sigma_\epsilon = (\Lambda - \frac\epsilon4\Lambda^2)^{-1}` (per eigenvalue κ:
:math:`\epsilon/(1-(1-\epsilon\kappa/2)^2)`); the tests compare with that law, so the step size's
bias (a relative εκ/4 on Σ) is not mistaken for an error.  With :math:`u = X(w - w^*) \sim
N(0, S)`, :math:`S = X\Sigma X^\top`, :math:`\ell_i = (r_i - u_i)^2` and Isserlis' theorem
(odd moments vanish, :math:`\operatorname{Cov}(u_i^2, u_j^2) = 2S_{ij}^2`):

.. math:: \operatorname{Cov}(\ell_i, \ell_j) = 4 r_i r_j S_{ij} + 2 S_{ij}^2,
          \qquad \operatorname{Cov}(a^\top w, \ell_i) = -2 r_i\,a^\top\Sigma x_i .

Monte-Carlo tolerances come from the chain spread: ``sem`` is sd(per-chain estimates)/√C with C
chains, so an entry's z-score is t-distributed with C-1 degrees of freedom, and the Frobenius
statistic :math:`\lVert\hat K - K\rVert_F / \lVert\mathrm{sem}\rVert_F` has expectation about 1
(its square is a weighted sum of squared z-scores whose weights sum to one).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slt.influence import (InfluenceResult, OnlineCovariance, SusceptibilityResult, bif, loss_kernel,
                           per_sample_susceptibility)
import slt
import slt.engine
from slt.losses import causal_lm

from conftest import IGNORE_CHECKPOINT_WARNING, fp_tol

pytestmark = IGNORE_CHECKPOINT_WARNING
F64 = torch.float64
N, D, GAMMA = 20, 2, 1.0
NBETA = float(N)  # β = 1


# ----------------------------------------------------------------------------
# linear regression with exact answers
# ----------------------------------------------------------------------------
def _regression(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g, dtype=F64)
    Y = X @ torch.tensor([[1.0], [-0.5]], dtype=F64) + 0.5 * torch.randn(n, 1, generator=g, dtype=F64)
    return X, Y


def _wls(X, Y, u=None):
    """argmin_w Σ_i u_i (y_i - x_i·w)² (u = 1/n: least squares), (D, 1)."""
    u = torch.full((X.shape[0],), 1.0 / X.shape[0], dtype=F64) if u is None else u
    return torch.linalg.solve((X.T * u) @ X, (X.T * u) @ Y)


def _model(X, Y, u=None):
    """nn.Linear at the (weighted) least-squares solution (the mean of the localized posterior)."""
    m = nn.Linear(D, 1, bias=False).to(F64)
    m.weight.data = _wls(X, Y, u).T.clone()
    return m


def _exact(X, Y, eps, u=None):
    """(Λ, Σ_ε, residuals r at w*) for the SGLD chain of step ``eps``; Λ = 2nβ Xᵀ diag(u) X + γI."""
    u = torch.full((X.shape[0],), 1.0 / X.shape[0], dtype=F64) if u is None else u
    Lam = 2 * NBETA * (X.T * u) @ X + GAMMA * torch.eye(D, dtype=F64)
    Sig = torch.linalg.inv(Lam - eps / 4 * Lam @ Lam)
    r = (Y - X @ _wls(X, Y, u)).squeeze(1)
    return Lam, Sig, r


def _step(X):
    """ε with εκ_max = 0.2 (stable, fast mixing; its bias is in Σ_ε)."""
    Lam = 2 * (NBETA / X.shape[0]) * X.T @ X + GAMMA * torch.eye(D, dtype=F64)
    return 0.2 / float(torch.linalg.eigvalsh(Lam).max())


def _kw(eps, **over):
    kw = dict(nbeta=NBETA, localization=GAMMA, step_size=eps, num_chains=8, num_draws=200, num_burnin=50,
              num_steps_bw_draws=5, batch_size=None, dtype=F64, seed=1, progress=False)
    kw.update(over)
    return kw


def test_bif_matches_isserlis_on_linear_regression():
    """−BIF of the training set with itself = Cov(ℓ_i, ℓ_j) = 4 r_i r_j S_ij + 2 S_ij² within MC error."""
    X, Y = _regression()
    eps = _step(X)
    _, Sig, r = _exact(X, Y, eps)
    S = X @ Sig @ X.T
    exact = 4 * r[:, None] * r[None, :] * S + 2 * S**2
    C = 16
    res = bif(_model(X, Y), (X, Y), F.mse_loss, **_kw(eps, num_chains=C, num_draws=800, num_burnin=200))
    assert isinstance(res, InfluenceResult) and res.values.shape == (N, N) and res.kind == "bif"
    est = -res.values
    # Frobenius statistic: expectation ≈ 1; 3 leaves room for a weighted chi² with few effective dof
    assert float((est - exact).norm() / res.sem.norm()) < 3.0
    # the diagonal entrywise: t with C-1 = 15 dof, P(|t| > 4.5) ≈ 4e-4 per entry, 20 entries
    z = (est - exact).diagonal() / res.sem.diagonal()
    assert float(z.abs().max()) < 4.5, z
    # symmetric (the same set on both sides; Welford's co-moment is symmetric up to rounding)
    assert torch.allclose(res.values, res.values.T, rtol=0, atol=fp_tol(F64, scale=float(exact.abs().max()),
                                                                          terms=800 * C))
    assert res.num_chains_used == C and res.llc is not None and math.isfinite(res.llc.llc_mean)
    torch.testing.assert_close(res.mean_rows, res.mean_cols)


def test_loss_kernel_symmetric_unit_diagonal_and_equal_to_minus_bif():
    X, Y = _regression()
    eps = _step(X)
    m = _model(X, Y)
    k = loss_kernel(m, (X, Y), F.mse_loss, **_kw(eps, num_draws=100))
    assert k.kind == "loss_kernel" and k.normalized and k.values.shape == (N, N)
    tol = 1e-10
    torch.testing.assert_close(k.values, k.values.T, rtol=0, atol=tol)
    torch.testing.assert_close(k.values.diagonal(), torch.ones(N, dtype=F64), rtol=0, atol=tol)
    assert float(k.values.abs().max()) <= 1 + tol
    assert float(torch.linalg.eigvalsh((k.values + k.values.T) / 2).min()) > -1e-8  # a correlation matrix
    # same seed, same draws: the covariance kernel is −BIF exactly; the normalised BIF is −kernel
    kc = loss_kernel(m, (X, Y), F.mse_loss, normalize=False, **_kw(eps, num_draws=100))
    b = bif(m, (X, Y), F.mse_loss, **_kw(eps, num_draws=100))
    bn = bif(m, (X, Y), F.mse_loss, normalize=True, **_kw(eps, num_draws=100))
    torch.testing.assert_close(kc.values, -b.values, rtol=0, atol=0)
    torch.testing.assert_close(bn.values, -k.values, rtol=0, atol=0)


def test_query_and_observables():
    """Columns from another set's losses (BIF against Isserlis' cross formula) and from observables."""
    X, Y = _regression()
    Xq, Yq = _regression(n=5, seed=7)
    eps = _step(X)
    m = _model(X, Y)
    _, Sig, r = _exact(X, Y, eps)
    w = torch.linalg.lstsq(X, Y).solution
    rq = (Yq - Xq @ w).squeeze(1)
    Sq = X @ Sig @ Xq.T
    C = 10
    kw = _kw(eps, num_chains=C, num_draws=300, num_burnin=100)
    res = bif(m, (X, Y), F.mse_loss, query=(Xq, Yq), **kw)
    assert res.values.shape == (N, 5) and res.col_labels[0] == "query[0]"
    exact = 4 * r[:, None] * rq[None, :] * Sq + 2 * Sq**2
    assert float((-res.values - exact).norm() / res.sem.norm()) < 3.0
    # observables: (R,) and (R, k) values; Cov(w_a, ℓ_i) = -2 r_i (Σ x_i)_a
    obs = {"w": lambda p: p["weight"][:, 0, :], "w0sq": lambda p: p["weight"][:, 0, 0] ** 2}
    ro = bif(m, (X, Y), F.mse_loss, observables=obs, **kw)
    assert ro.values.shape == (N, 3) and ro.col_labels == ["w[0]", "w[1]", "w0sq"]
    exact_w = -(-2 * r[:, None] * (X @ Sig))  # BIF = -Cov
    z = (ro.values[:, :2] - exact_w) / ro.sem[:, :2]
    assert float((ro.values[:, :2] - exact_w).norm() / ro.sem[:, :2].norm()) < 3.0, z
    rn = bif(m, (X, Y), F.mse_loss, observables=obs, normalize=True, **kw)
    assert float(rn.values.abs().max()) <= 1.0 + 1e-12
    # the same draws as the unnormalised run: -Corr = -Cov / (sd sd)
    torch.testing.assert_close(rn.values, ro.values / (ro.var_rows[:, None] * ro.var_cols[None, :]).sqrt())


def test_loaders_that_shuffle_or_drop_give_the_datasets_rows_in_order():
    """Rows of a per-sample result are the dataset's: a shuffling loader, or one that drops its last batch, is
    read in index order, every sample once (as data and as query); the run equals the tensors' exactly."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    X, Y = _regression()
    m = _model(X, Y)
    kw = _kw(_step(X), num_draws=20, num_burnin=10)
    ds = TensorDataset(X, Y)
    ref = bif(m, (X, Y), F.mse_loss, query=(X[:3], Y[:3]), **kw)
    shuffled = DataLoader(ds, batch_size=6, shuffle=True)
    dropping = DataLoader(ds, batch_size=6, drop_last=True)  # 20 = 3 × 6 + 2
    for data in (shuffled, dropping):
        res = bif(m, data, F.mse_loss, query=DataLoader(TensorDataset(X[:3], Y[:3]), batch_size=2, shuffle=True),
                  **kw)
        assert res.values.shape == (N, 3) and torch.equal(res.values, ref.values)
    # a sampler of another kind decides the samples: its rows, with a warning that says so
    pick = DataLoader(TensorDataset(X[:3], Y[:3]), batch_size=2,
                      sampler=SubsetRandomSampler([2, 0], generator=torch.Generator().manual_seed(0)))
    with pytest.warns(RuntimeWarning, match="sampler \\(SubsetRandomSampler\\) chooses the samples and their order"):
        res = bif(m, (X, Y), F.mse_loss, query=pick, **kw)
    assert res.values.shape == (N, 2)


def test_susceptibility_contributions_sum_to_the_total():
    r"""On weighted data (weights u), Σ_i δ_i χ_{φ,i} equals χ_φ of llc_susceptibility along
    q_h = (1-h) q + h q_δ (weights u_i(1+δ_i), Σ u_i δ_i = 0) from the same draws, and Σ_i δ_i λ_i its dλ̂/dh;
    the contributions match the exact Gaussian ones, χ_i = -nβ u_i Cov(w0, ℓ_i) = 2nβ u_i r_i (Σ_ε x_i)_0."""
    from slt.symmetry import llc_susceptibility

    X, Y = _regression()
    u = 1.0 + 0.5 * torch.sin(torch.arange(N, dtype=F64))
    u = u / u.sum()
    eps = 0.2 / float(torch.linalg.eigvalsh(_exact(X, Y, 0.0, u)[0]).max())
    m = _model(X, Y, u)
    C, T = 8, 400
    kw = _kw(eps, num_chains=C, num_draws=T, num_burnin=100, seed=3)
    obs = {"w0": lambda p: p["weight"][:, 0, 0]}
    res = per_sample_susceptibility(m, (X, Y, u), F.mse_loss, observables=obs, **kw)
    assert isinstance(res, SusceptibilityResult) and res.values.shape == (N, 2) and res.observables == ["loss", "w0"]
    torch.testing.assert_close(res.scale, NBETA * u)
    delta = torch.linspace(-1, 1, N, dtype=F64)
    delta = delta - (u * delta).sum()
    tot = res.total(delta)
    s = llc_susceptibility(m, (X, Y, u), (X, Y, u * (1 + delta)), 0.0, loss_fn=F.mse_loss, observables=obs, **kw)
    # identical draws; the covariances differ only by their divisors (N_draws - 1 here, N_draws there)
    nd = C * T
    assert abs(tot["w0"] - float(s.chi["w0"])) <= 2 * abs(float(s.chi["w0"])) / (nd - 1) + 1e-12
    assert abs(tot["llc"] - s.dllc_dh) <= 2 * abs(s.cov_term) / (nd - 1) + 1e-12
    # per-sample values against the exact χ_i = -β Cov(w0, ℓ_i) = 2β r_i (Σ_ε x_i)_0
    _, Sig, r = _exact(X, Y, eps, u)
    exact = 2 * NBETA * u * r * (X @ Sig)[:, 0]
    z = (res.chi("w0") - exact) / res.sem[:, 1]
    assert float(z.abs().max()) < 5.0, z  # t with 7 dof: P(|t| > 5) ≈ 1.6e-3 per entry
    # the Baker normalisation -Cov(φ, ℓ_i - L_n), with L_n = Σ u_j ℓ_j: Σ_i u_i baker_i = 0
    torch.testing.assert_close(u @ res.baker, torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        res.total(delta[:-1])


def test_susceptibility_normalisation_is_the_derivative_of_the_posterior_mean():
    r"""No sampling: for the exact Gaussian posterior (ε → 0) and φ = w, Σ_i δ_i (−β Cov(w, ℓ_i)) equals
    d/dh of the posterior mean under p_h ∝ exp(−β Σ_i (1 + hδ_i) ℓ_i − γ/2 ‖w − w*‖²)
    (finite differences)."""
    X, Y = _regression()
    beta = NBETA / N
    Lam, Sig, r = _exact(X, Y, 0.0)
    w_star = torch.linalg.lstsq(X, Y).solution.squeeze(1)
    delta = torch.linspace(-1, 2, N, dtype=F64)  # Σδ ≠ 0 is allowed: counts, not a mixture

    def mean(h):
        c = 1 + h * delta
        P = 2 * beta * (X.T * c) @ X + GAMMA * torch.eye(D, dtype=F64)
        return torch.linalg.solve(P, 2 * beta * (X.T * c) @ Y.squeeze(1) + GAMMA * w_star)

    h = 1e-5
    fd = (mean(h) - mean(-h)) / (2 * h)
    chi = -beta * (-2 * r[:, None] * (X @ Sig))  # (N, D): -β Cov(w, ℓ_i)
    torch.testing.assert_close(delta @ chi, fd, rtol=1e-7, atol=1e-9)


def test_restricted_components_in_one_run():
    """restrict_to={label: ...}: one result per component; the all-parameter restriction is the unrestricted run."""
    X, Y = _regression()
    eps = _step(X)
    m = _model(X, Y)
    kw = _kw(eps, num_draws=60, num_burnin=10)
    full = per_sample_susceptibility(m, (X, Y), F.mse_loss, **kw)
    parts = per_sample_susceptibility(
        m, (X, Y), F.mse_loss,
        restrict_to={"all": "*", "first": {"weight": torch.tensor([[True, False]])}}, **kw)
    assert set(parts) == {"all", "first"} and parts["first"].restriction == "first"
    torch.testing.assert_close(parts["all"].values, full.values, rtol=0, atol=0)
    assert not torch.equal(parts["first"].values, full.values)
    assert parts["first"].values.shape == (N, 1)
    # the component-localized loss: only w_0 moves, so χ_i ∝ Cov(L_n, ℓ_i) of a 1-D posterior
    assert torch.isfinite(parts["first"].values).all() and torch.isfinite(parts["first"].llc_values).all()


def test_probe_and_explicit_per_sample_loss():
    """probe = the training set itself, and an explicit per-sample loss equal to mse's, give the same numbers
    from the same draws; a probe of other samples gives their rows."""
    X, Y = _regression()
    Xq, Yq = _regression(n=5, seed=7)
    eps = _step(X)
    m = _model(X, Y)
    kw = _kw(eps, num_draws=60, num_burnin=10)
    base = per_sample_susceptibility(m, (X, Y), F.mse_loss, **kw)
    same = per_sample_susceptibility(m, (X, Y), F.mse_loss, probe=(X.clone(), Y.clone()), **kw)
    other = per_sample_susceptibility(m, (X, Y), F.mse_loss, probe=(Xq, Yq), **kw)
    tol = fp_tol(F64, scale=float(base.values.abs().max()) * 10, terms=60 * 8)
    torch.testing.assert_close(same.values, base.values, rtol=0, atol=tol)
    assert other.values.shape == (5, 1) and other.llc_values.shape == (5,)

    def sq(out, y):
        return (out - y).square().mean(-1)

    b0 = bif(m, (X, Y), F.mse_loss, **kw)
    b1 = bif(m, (X, Y), F.mse_loss, per_sample_loss=sq, **kw)
    torch.testing.assert_close(b1.values, b0.values, rtol=0, atol=fp_tol(F64, scale=float(b0.values.abs().max()) * 10,
                                                                          terms=60 * 8))


def test_a_repeated_run_restarts_the_statistics():
    """The engine repeats a run whose chains diverged under an automatic step (halved step); it calls
    ``on_start`` before every run, so statistics gathered by ``on_draw`` keep only the last run's draws."""
    from slt.engine import sample_target
    from slt.target import prepare_target

    torch.manual_seed(0)
    X = torch.randn(64, 3)
    Y = X @ torch.tensor([[1.0], [-0.5], [0.2]])
    target = prepare_target(nn.Linear(3, 1), (X, Y), F.mse_loss, nbeta=50.0)
    events = []
    # a threshold every chain crosses (nβ ΔL > −1 holds even at w*): every run "diverges", so it is
    # repeated MAX_HALVINGS times
    run = sample_target(target, num_chains=2, num_draws=5, num_burnin=5, divergence_threshold=-1.0,
                        raise_on_divergence=False, on_draw=lambda p: events.append("draw"),
                        on_start=lambda: events.append("start"))
    assert run.halvings == slt.engine.MAX_HALVINGS
    assert events.count("start") == run.halvings + 1
    last = len(events) - 1 - events[::-1].index("start")
    assert events[last + 1:] == ["draw"] * 5


def test_diverged_chains_are_excluded():
    X, Y = _regression()
    eps = _step(X)
    m = _model(X, Y)
    # nβ(L - L*) of a draw is about Exp(1)-distributed here: a low threshold stops some chains, not all
    kw = _kw(eps, num_chains=8, num_draws=100, num_burnin=20, divergence_threshold=6.0)
    with pytest.warns(RuntimeWarning, match="divergent"):
        res = bif(m, (X, Y), F.mse_loss, **kw)
    dead = res.llc.divergent_chains
    assert 0 < len(dead) < 8, dead
    assert res.num_chains_used == 8 - len(dead)
    assert torch.isfinite(res.values).all() and torch.isfinite(res.sem).all()


def test_online_covariance_equals_the_pooled_sample_covariance():
    """Welford per row + Chan's combination over a subset of rows = torch.cov of those rows' draws stacked."""
    g = torch.Generator().manual_seed(0)
    R, T, na, nb = 4, 50, 3, 2
    A = torch.randn(R, T, na, generator=g, dtype=F64) + torch.arange(R, dtype=F64)[:, None, None]
    B = A[..., :nb] * 0.5 + torch.randn(R, T, nb, generator=g, dtype=F64)
    acc = OnlineCovariance(R, na, nb)
    for t in range(T):
        acc.update(A[:, t], B[:, t])
    rows = [0, 2, 3]
    st = acc.combine(rows)
    stacked = torch.cat([A[rows].reshape(-1, na), B[rows].reshape(-1, nb)], 1)
    full = torch.cov(stacked.T)
    tol = fp_tol(F64, scale=float(stacked.abs().max()) ** 2, terms=len(rows) * T)
    torch.testing.assert_close(st["cov"], full[:na, na:], rtol=0, atol=tol)
    torch.testing.assert_close(st["var_a"], full.diagonal()[:na], rtol=0, atol=tol)
    torch.testing.assert_close(st["row_cov"][1], torch.cov(torch.cat([A[2], B[2]], 1).T)[:na, na:], rtol=0, atol=tol)
    same = OnlineCovariance(R, na)
    for t in range(T):
        same.update(A[:, t])
    torch.testing.assert_close(same.combine(rows)["cov"], torch.cov(A[rows].reshape(-1, na).T), rtol=0, atol=tol)


def test_bad_input():
    X, Y = _regression()
    m = _model(X, Y)
    kw = _kw(1e-3, num_draws=5, num_burnin=0)
    with pytest.raises(ValueError, match="not both"):
        bif(m, (X, Y), F.mse_loss, query=(X, Y), observables={"a": lambda p: p["weight"][:, 0, 0]}, **kw)
    with pytest.raises(ValueError, match="sum_tokens"):
        bif(m, (X, Y), F.mse_loss, sum_tokens=True, **kw)
    with pytest.raises(TypeError, match="callable"):
        bif(m, (X, Y), F.mse_loss, observables={"a": 3}, **kw)
    with pytest.raises(TypeError, match="mapping"):
        bif(m, (X, Y), F.mse_loss, observables=[lambda p: p], **kw)
    with pytest.raises(ValueError, match="rows"):
        bif(m, (X, Y), F.mse_loss, observables={"a": lambda p: p["weight"].sum()}, **kw)
    with pytest.raises(ValueError, match="max_bytes"):
        bif(m, (X, Y), F.mse_loss, max_bytes=100, **kw)
    # the way to split names an argument the call has (loss_kernel has no query=: it said "split the query set")
    with pytest.raises(ValueError, match=r"compute it in column blocks with slt\.bif\(.*query=<a slice of the same data>"):
        loss_kernel(m, (X, Y), F.mse_loss, max_bytes=100, **kw)
    with pytest.raises(ValueError, match="split the query set into chunks"):
        bif(m, (X, Y), F.mse_loss, query=(X[:5], Y[:5]), max_bytes=100, **kw)
    with pytest.raises(TypeError, match="normalize"):
        loss_kernel(m, (X, Y), F.mse_loss, normalize="yes", **kw)
    with pytest.raises(ValueError, match="token ids"):
        bif(m, (X, Y), F.mse_loss, per_token=True, **kw)
    with pytest.raises(ValueError, match="one data set"):
        bif(m, {"a": (X, Y), "b": (X, Y)}, F.mse_loss, **kw)
    with pytest.raises(ValueError, match="reserved"):
        per_sample_susceptibility(m, (X, Y), F.mse_loss, observables={"loss": lambda p: p["weight"][:, 0, 0]}, **kw)
    with pytest.raises(TypeError, match="cannot be passed"):
        bif(m, (X, Y), F.mse_loss, on_draw=print, **kw)
    with pytest.raises(ValueError, match="num_chains"):
        bif(m, (X, Y), F.mse_loss, **{**kw, "num_chains": 0})
    # a query the model cannot take: the real error, named with the data set, before sampling
    with pytest.raises(ValueError, match=r"slt.bif: query: the model failed on a batch of the data .*: RuntimeError: "):
        bif(m, (X, Y), F.mse_loss, query=(torch.randn(3, X.shape[1] + 1, dtype=X.dtype), Y[:3]), **kw)
    labels = torch.randint(0, 3, (X.shape[0],))  # one integer label per sample: not token sequences
    with pytest.raises(ValueError, match=r"per_token=True needs token sequences in data: ids of shape \(n, T\).*"
                                         r"got shape \(\d+,\)"):
        bif(nn.Linear(X.shape[1], 3).to(X.dtype), (X, labels), F.cross_entropy, per_token=True, **kw)


def test_susceptibilities_of_a_loss_that_averages_over_counted_targets():
    """A cross-entropy with class weights (or ignore_index) averages over the summed weights of the counted
    targets, L_n = Σ c_i ℓ_i / Σ c_i: sample i weighs u_i = c_i/Σc, not 1/n.  The scale was nβ/n for every
    sample and the "loss" column the plain mean of ℓ_i, so χ was off by up to 7.6× per sample (exact tier:
    the scale, the "loss" column against the sampling loss as an observable, and Σ_i χ_i = −nβ Var(L_n))."""
    g = torch.Generator().manual_seed(0)
    n = 40
    X = torch.randn(n, 3, generator=g, dtype=F64)
    Y = torch.randint(0, 3, (n,), generator=g)
    Y[:6] = -100  # ignored samples weigh 0
    cw = torch.tensor([1.0, 5.0, 0.25], dtype=F64)
    loss = nn.CrossEntropyLoss(weight=cw)
    m = nn.Linear(3, 3).to(F64)
    opt = torch.optim.LBFGS(m.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        out = loss(m(X), Y)
        out.backward()
        return out

    opt.step(closure)

    def sampling_loss(p):
        return torch.vmap(lambda q: loss(torch.func.functional_call(m, q, (X,)), Y))(p)

    kw = _kw(1e-3, nbeta=float(n), localization=10.0, num_draws=40, num_burnin=10, num_chains=4)
    chi = per_sample_susceptibility(m, (X, Y), loss, observables={"true": sampling_loss}, **kw)
    c = torch.where(Y >= 0, cw[Y.clamp_min(0)], torch.zeros((), dtype=F64))
    torch.testing.assert_close(chi.scale, float(n) * c / c.sum(), rtol=1e-12, atol=0)
    scale = float(chi.chi("true").abs().max())
    torch.testing.assert_close(chi.chi("loss"), chi.chi("true"), rtol=0, atol=fp_tol(F64, scale=scale, terms=40 * 4))
    total = float(chi.chi("true").sum())
    bvar = bif(m, (X, Y), loss, observables={"true": sampling_loss}, **kw).var_cols[0]  # the same draws
    assert total == pytest.approx(-float(n) * float(bvar), rel=1e-6)


def test_query_and_per_sample_loss_mistakes_are_named_before_sampling():
    """A query gets the checks the training data gets (its losses are loss_fn's): inputs without targets,
    a target the loss would broadcast against the output (mse of (B, 2) against (B,)); a per-sample loss
    that does not reduce to one value per sample fails at set-up (it failed after the burn-in, counting 66
    values "per parameter row" for 2 per sample); one that is not loss_fn's decomposition warns; BatchNorm in
    train mode is an error (a sample's loss would depend on its batch); a loader's batch size is the run's;
    an unknown keyword names the function called; one draw per chain is an error."""
    X, Y = _regression()
    m = _model(X, Y)
    kw = _kw(1e-3, num_draws=5, num_burnin=0)
    with pytest.raises(ValueError, match="query has inputs only"):
        bif(m, (X, Y), F.mse_loss, query=X[:5], **kw)
    two = nn.Linear(D, 2).to(F64)
    with pytest.raises(ValueError, match=r"slt.bif: query: .*different shapes"):
        bif(two, (X, Y.expand(-1, 2).clone()), F.mse_loss, query=(X[:5], Y[:5, 0]), **kw)
    with pytest.raises(ValueError, match="returned 2 values per sample of data, expected 1"):
        bif(two, (X, Y.expand(-1, 2).clone()), F.mse_loss, per_sample_loss=lambda o, t: (o - t) ** 2, **kw)
    with pytest.warns(RuntimeWarning, match="not the per-sample decomposition of loss_fn"):
        bif(two, (X, Y.expand(-1, 2).clone()), F.mse_loss, per_sample_loss=lambda o, t: ((o - t) ** 2).sum(-1), **kw)
    bn = nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(F64).train()
    with pytest.raises(ValueError, match="BatchNorm in train mode.*per-sample losses are not defined"):
        bif(bn, (X, Y), F.mse_loss, **kw)
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(X, Y), batch_size=8)
    assert bif(m, loader, F.mse_loss, **{k: v for k, v in kw.items() if k != "batch_size"}).config["batch_size"] == 8
    with pytest.raises(TypeError, match=r"slt.loss_kernel\(\) got an unexpected keyword argument 'query'.*slt.bif"):
        loss_kernel(m, (X, Y), F.mse_loss, query=(X, Y), **kw)
    # one draw per chain has no covariance (pooled, it was the spread between the chains, reported as one)
    with pytest.raises(ValueError, match=r"slt.loss_kernel: num_draws=1: the covariances are taken over each chain"):
        loss_kernel(m, (X, Y), F.mse_loss, **{**kw, "num_draws": 1})


# ----------------------------------------------------------------------------
# causal language models: per-token values
# ----------------------------------------------------------------------------
V, TT = 16, 8


def _gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)  # test-side only
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=TT, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).eval()


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, TT), generator=g)
    mask = torch.ones(n, TT, dtype=torch.long)
    mask[0, -2:] = 0  # right padding: two invalid positions
    return {"input_ids": ids, "attention_mask": mask}


LM_KW = dict(num_chains=2, num_draws=25, num_burnin=5, step_size=1e-4, nbeta=10.0, localization=100.0,
             batch_size=None, seed=0, progress=False, dtype=F64)


def test_token_level_shapes_and_sums(one_thread):
    model, data, query = _gpt2(), _tokens(5, 0), _tokens(3, 1)
    r = bif(model, data, causal_lm, query=query, per_token=True, **LM_KW)
    assert r.values.shape == (5, TT - 1, 3, TT - 1) and r.sem.shape == r.values.shape
    assert r.token_mask.shape == (5, TT - 1) and int(r.token_mask.sum()) == 5 * (TT - 1) - 2
    assert (r.values[0, -2:] == 0).all()  # padded positions carry no loss
    rs = bif(model, data, causal_lm, query=query, per_token=True, sum_tokens=True, **LM_KW)
    assert rs.values.shape == (5, 3)
    scale = float(r.values.abs().max()) * (TT - 1) ** 2
    torch.testing.assert_close(r.values.sum((1, 3)), rs.values, rtol=0, atol=fp_tol(F64, scale=scale, terms=100))
    k = loss_kernel(model, data, causal_lm, **LM_KW)
    assert k.values.shape == (5, 5)
    ro = bif(model, data, causal_lm, per_token=True, observables={"b": lambda p: p["transformer.ln_f.bias"][:, :2]},
             **LM_KW)
    assert ro.values.shape == (5, TT - 1, 2)


def test_token_susceptibilities_average_to_sequences(one_thread):
    """causal_lm averages a sequence's V_i valid tokens, so χ_i = Σ_t χ_(i,t) / V_i (same draws)."""
    model, data = _gpt2(), _tokens(5, 0)
    st = per_sample_susceptibility(model, data, causal_lm, per_token=True, **LM_KW)
    ss = per_sample_susceptibility(model, data, causal_lm, **LM_KW)
    assert st.values.shape == (5, TT - 1, 1) and ss.values.shape == (5, 1)
    Vi = st.token_mask.sum(1).to(F64)
    tol = fp_tol(F64, scale=float(st.values.abs().max()) * TT, terms=LM_KW["num_draws"] * TT)
    torch.testing.assert_close(st.values.sum(1) / Vi[:, None], ss.values, rtol=0, atol=tol)
    tol = fp_tol(F64, scale=float(st.llc_values.abs().max()) * TT, terms=LM_KW["num_draws"] * TT)
    torch.testing.assert_close(st.llc_values.sum(1) / Vi, ss.llc_values, rtol=0, atol=tol)


@pytest.mark.slow
def test_token_bif_matches_devinterp_on_the_same_draws(one_thread):
    """devinterp 2.0.1's token-wise BIF (correlation, chains stacked) on per-token losses recorded from the
    very draws of slt.bif equals -slt.bif(normalize=True): the same convention, computed offline there."""
    pytest.importorskip("devinterp")
    import xarray as xr
    from devinterp.slt import bif as dbif

    import slt
    from slt.influence import _Losses, _prepare, causal_lm_tokens

    model, data = _gpt2(), _tokens(4, 0)
    ours = bif(model, data, causal_lm, per_token=True, normalize=True, **LM_KW)
    prep = {k: LM_KW[k] for k in ("nbeta", "localization", "seed", "dtype")}
    target = _prepare(model, data, causal_lm, "test", prep)
    tok = _Losses(target, target.source, causal_lm_tokens, True, False, LM_KW["num_chains"], "data")
    rec = slt.estimate_llc(model, data, causal_lm, observables={"tok": lambda p: tok(
        torch.cat([p[n].reshape(p[n].shape[0], -1) for n in target.spec.names], 1)).reshape(-1, 4, TT - 1)},
        **LM_KW)
    arr = xr.DataArray(rec.observables["tok"].numpy(), dims=("chain", "draw", "batch", "target_position"))
    arr = dbif._reduce_chains(dbif._adapt_to_correlation_method(arr, "token"), "stack")
    theirs = dbif._compute_correlations(arr, arr, correlation_method="token", average_tokenwise_bif=False,
                                        compute_covariance=False, batch_size=32, device="cpu")["influences"].values
    theirs = torch.as_tensor(theirs, dtype=F64).permute(0, 2, 1, 3)  # (n, t, n, t')
    ok = ours.token_mask.reshape(-1)
    a, b = -ours.values.reshape(4 * (TT - 1), -1)[ok][:, ok], theirs.reshape(4 * (TT - 1), -1)[ok][:, ok]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # devinterp returns float32


def test_correlations_of_losses_that_do_not_vary_are_named():
    """A confidently right sample's cross-entropy is exactly 0 in float32 (margin > ~17): its loss does
    not vary over the draws and its correlations are 0/0.  Before, normalize=True returned a matrix with
    NaN rows and columns and said nothing (a trained MLP: 72 of 300 samples, 38016 NaN entries)."""
    x = torch.cat([torch.linspace(0.01, 0.05, 20), torch.linspace(2.0, 3.0, 12)])
    x = torch.cat([x, -x]).unsqueeze(1)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-50.0], [50.0]]))
        model.bias.zero_()
    kw = dict(num_chains=2, num_draws=20, num_burnin=5, step_size=1e-6, nbeta=100.0, localization=100.0,
              progress=False)
    with pytest.warns(RuntimeWarning, match=r"slt.loss_kernel: 24 of 64 training samples have a loss that did not "
                                            r"vary over the draws.*NaN.*normalize=False"):
        r = loss_kernel(model, (x, y), F.cross_entropy, **kw)
    constant = r.var_rows == 0
    assert int(constant.sum()) == 24 and bool((x[constant].abs() >= 2).all())
    assert bool(r.values[constant].isnan().all()) and not bool(r.values[~constant][:, ~constant].isnan().any())
    # nothing varies when the sampled parameters do not reach the loss: the cause named is that, not saturation
    model.register_parameter("unused", nn.Parameter(torch.zeros(3)))
    with pytest.warns(RuntimeWarning, match=r"none of the 64 training samples has a loss that varied over the draws.*"
                                            r"a restriction the loss does not see"):
        loss_kernel(model, (x, y), F.cross_entropy, restrict_to="unused", **kw)
