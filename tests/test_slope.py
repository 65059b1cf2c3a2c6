"""The slope check: λ̂ at a w* that is not a minimum of the loss.

λ̂ = nβ E[L(w) − L(w*)] has a first-order part s = nβ E[∇L(w*)·(w − w*)], zero at a critical point.  On
a slope the localized posterior's mean slides downhill and λ̂ is lower than the geometry at a minimum
gives (an MLP trained for 30 Adam steps read λ̂ 57.8 ± 0.8, "converged", with s = −34.5 and no draw
below L(w*)).  slt projects each draw's displacement on an estimate of ∇L(w*) and records s; a large s
is a finding (``converged = False``).

Exact: the projection against a direct computation; the finding's thresholds; the check leaves the
run's draws unchanged.  Statistical with a known answer: on a Gaussian location model written as a
plain module, L(μ) = ½ mean‖x − μ‖², the localized posterior is Gaussian with mean shift
−nβ g/(nβ + γ), g = μ* − x̄, so s = −(nβ)²‖g‖²/(nβ + γ) exactly — SGLD's linear drift keeps the
stationary mean exact at any step — which the run must match within 4 standard errors, at full batch,
on minibatches and from a DataLoader; at μ* = x̄, s must be 0 within 4 s.e. and no finding raised."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slt
import slt.engine as engine
from slt.result import SLOPE_FRACTION, slope_finding, slope_record
from test_heating import _data as _location_data, _half_sq, _Location  # L(μ) = ½ mean‖x − μ‖², a plain module

F64 = torch.float64
NB, GAMMA = 100.0, 10.0


def _data(n=2000, d=5, seed=0):
    return _location_data(n=n, d=d, seed=seed)


def _run(mu, data, **kw):
    opts = dict(nbeta=NB, localization=GAMMA, step_size=2e-3, num_chains=4, num_burnin=300, num_draws=2000,
                seed=0, dtype=F64, progress=False, extend_draws=False)
    opts.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slt.estimate_llc(_Location(mu), data, _half_sq, **opts)


def _exact(g: torch.Tensor) -> float:
    return -(NB ** 2) * float(g.pow(2).sum()) / (NB + GAMMA)


def _is_slope_reason(reason: str) -> bool:
    return "not a minimum of the loss: nβ·E[∇L(w*)·(w − w*)]" in reason


def test_slope_finding_thresholds():
    # resolved (|s| > 3 s.e.), and half of it above 2 s.e. of λ̂ and SLOPE_FRACTION of λ̂
    assert slope_finding(-4.0, 0.2, 20.0, 0.3) is not None
    msg = slope_finding(-4.0, 0.2, 20.0, 0.3)
    assert "train w* further" in msg and "2 to 4" in msg
    assert slope_finding(-4.0, 1.5, 20.0, 0.3) is None  # not resolved: within 3 s.e.
    assert slope_finding(-4.0, 0.2, 20.0, 1.1) is None  # half of it within 2 s.e. of λ̂
    big = 0.5 * 4.0 / SLOPE_FRACTION  # half of |s| exactly at the fraction of λ̂: no finding
    assert slope_finding(-4.0, 0.2, big, 0.3) is None
    assert slope_finding(-4.0, 0.2, 0.99 * big, 0.3) is not None
    assert slope_finding(float("nan"), 0.2, 20.0, 0.3) is None
    assert slope_finding(3.0, 0.2, -5.0, 0.3) is not None  # either sign, λ̂ negative too


def test_the_projection_is_each_rows_displacement_dotted_with_its_groups_slope():
    """Rows in (K, M, D, C) order; the slope per checkpoint and distribution (K·D, F, d), F folds."""
    gen = torch.Generator().manual_seed(0)
    K, M, D, C, F, d = 2, 3, 2, 4, 3, 700
    R = K * M * D * C
    rows = torch.randn(R, d, generator=gen, dtype=F64)
    grad = torch.randn(K * D, F, d, generator=gen, dtype=F64)
    w = rows + torch.randn(R, d, generator=gen, dtype=F64)
    want = torch.empty(R, F, dtype=F64)
    for r in range(R):
        k, rest = divmod(r, M * D * C)
        i = rest // C % D
        want[r] = grad[k * D + i] @ (w[r] - rows[r])
    old = engine.column_chunks
    try:  # several column chunks, as on a large model
        engine.column_chunks = lambda like: [slice(s, min(s + 128, d)) for s in range(0, d, 128)]
        got = engine._slope_dots(rows, grad, K, M, C)(w)
    finally:
        engine.column_chunks = old
    # float64 sums of d products of O(1) terms
    tol = d * torch.finfo(F64).eps * 10
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


def test_the_slope_record_adds_the_gradient_estimates_own_error():
    """Folds that agree: the chains' error alone; folds that differ by a common offset: their spread
    / √F added in quadrature."""
    gen = torch.Generator().manual_seed(1)
    C, T, F = 4, 50, 4
    base = torch.randn(C, T, 1, generator=gen, dtype=F64).expand(C, T, F)
    same = slope_record(base.clone(), 10.0)
    assert same["sem_gradient"] == pytest.approx(0.0, abs=1e-15)
    offsets = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=F64)
    apart = slope_record(base + offsets, 10.0)
    assert apart["value"] == pytest.approx(same["value"] + 0.5)
    assert apart["sem_gradient"] == pytest.approx(float(offsets.std()) / 2)
    assert apart["sem"] == pytest.approx((same["sem"] ** 2 + apart["sem_gradient"] ** 2) ** 0.5)
    assert slope_record(base[:, :0], 10.0) is None


@pytest.mark.parametrize("batch_size", [None, 100, 30], ids=["full-batch", "minibatch", "minibatch-folds"])
def test_slope_matches_the_gaussian_closed_form(batch_size, monkeypatch):
    """n = 2000: at batch 100 the slope is exact (20 consecutive batches); at batch 30 (with no larger
    chunks allowed) it is estimated from 32 random batches in 4 folds, whose spread enters the standard
    error."""
    monkeypatch.setattr(engine, "SLOPE_CHUNK_ELEMENTS", 0)
    X = _data()
    g = torch.full((5,), 0.05, dtype=F64)
    r = _run(X.mean(0) + g, X, batch_size=batch_size)
    s = r.diagnostics["slope_at_init"]
    want = _exact(g)
    assert abs(s["value"] - want) < 4 * s["sem"], (s, want)
    assert (s["sem_gradient"] == 0) == (batch_size != 30)
    assert s["sem"] < (0.1 if batch_size != 30 else 0.3) * abs(want)
    assert "slope at w*" in str(r)
    if batch_size == 30:  # 4.3 ± 1 s.e. from 0: not always resolved beyond 3
        return
    assert not r.converged and any(_is_slope_reason(c) for c in r.convergence_reasons)
    assert r.observables == {}  # the projection is the check's, not a user observable
    assert r.summary()["slope_at_init"] == s["value"] and r.summary()["slope_at_init_sem"] == s["sem"]


def test_no_slope_at_the_minimum(monkeypatch):
    """At μ* = x̄ the exact slope is 0; estimated from random batches (batch 30) it is noise, within 4 s.e."""
    monkeypatch.setattr(engine, "SLOPE_CHUNK_ELEMENTS", 0)
    X = _data()
    r = _run(X.mean(0), X, batch_size=30)
    s = r.diagnostics["slope_at_init"]
    assert abs(s["value"]) < 4 * s["sem"], s
    assert not any(_is_slope_reason(c) for c in r.convergence_reasons)


def test_slope_from_a_dataloader():
    X = _data()
    g = torch.full((5,), 0.05, dtype=F64)
    loader = DataLoader(TensorDataset(X), batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(3))
    r = _run(X.mean(0) + g, loader)
    s = r.diagnostics["slope_at_init"]
    assert abs(s["value"] - _exact(g)) < 4 * s["sem"], (s, _exact(g))
    assert s["sem_gradient"] == 0  # 20 batches: the whole pass, exact
    r = _run(X.mean(0) + g, DataLoader(TensorDataset(X), batch_size=30, shuffle=True,
                                       generator=torch.Generator().manual_seed(3)))
    s = r.diagnostics["slope_at_init"]  # 67 batches: the first 32 in 4 folds
    assert abs(s["value"] - _exact(g)) < 4 * s["sem"] and s["sem_gradient"] > 0, (s, _exact(g))
    assert any(_is_slope_reason(c) for c in r.convergence_reasons)


def test_the_check_leaves_the_draws_unchanged(monkeypatch):
    """The slope's minibatches come from streams of their own: the run's draws are the same whatever
    the check reads."""
    monkeypatch.setattr(engine, "SLOPE_CHUNK_ELEMENTS", 0)  # random batches, not a pass over the data
    X = _data(n=6000)
    mu = X.mean(0) + 0.05
    kw = dict(batch_size=50, num_draws=100, num_burnin=20)
    a = _run(mu, X, **kw)
    monkeypatch.setattr(engine, "SLOPE_BATCHES", 2)
    b = _run(mu, X, **kw)
    monkeypatch.setattr(engine, "SLOPE_BATCHES", 0)  # the check switched off
    c = _run(mu, X, **kw)
    assert torch.equal(a.llc_trace, b.llc_trace) and torch.equal(a.llc_trace, c.llc_trace)
    assert a.diagnostics["slope_at_init"]["value"] != b.diagnostics["slope_at_init"]["value"]
    assert c.diagnostics["slope_at_init"] is None


def test_data_refined_groups_record_the_slope_without_a_finding():
    """The loss of one distribution need not be minimal at w* (a minimum of the whole training loss):
    the slope is recorded, not a reason for converged = False."""
    X = _data()
    r = _run(X.mean(0), {"up": (X + 0.05,), "down": (X - 0.05,)}, batch_size=100)
    for label, res in r.items():
        s = res.diagnostics["slope_at_init"]
        assert abs(s["value"] - _exact(torch.full((5,), 0.05, dtype=F64))) < 4 * s["sem"], (label, s)
        assert not any(_is_slope_reason(c) for c in res.convergence_reasons)
        assert s["checked"] is False and "(not checked: a data-refined LLC's loss need not be minimal" in str(res)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def test_an_undertrained_network_is_not_converged():
    """A plain MLP 200 Adam steps into training (its loss still falling): λ̂ alone looks fine (about 5,
    no draw below L(w*)), the slope check names the cause (s about −3 ± 0.4 when this was written)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(512, 8, generator=gen)
    Y = (X[:, :3] @ torch.randn(3, 3, generator=gen)).argmax(1)
    torch.manual_seed(0)
    model = _MLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = slt.estimate_llc(model, (X, Y), nn.functional.cross_entropy, num_chains=4, num_draws=300, seed=0,
                             progress=False, extend_draws=False)
    assert r.diagnostics["frac_below_init"] < 0.5
    assert any(_is_slope_reason(c) for c in r.convergence_reasons), r.convergence_reasons
    assert any(_is_slope_reason(str(w.message)) for w in caught)


class _TwoPart(nn.Module):
    """L = ½ mean‖x − (a, b)‖² with μ split into parameters a (3 coordinates) and b (2)."""

    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(mu[:3].clone())
        self.b = nn.Parameter(mu[3:].clone())

    def forward(self, x):
        return torch.cat([self.a, self.b]).expand_as(x)


def test_slope_per_restriction_and_checkpoint():
    """Restrictions × checkpoints in one batched run: each group's rows move only their coordinates, so
    s = −(nβ)² Σ_{j moved} g_j² / (nβ + γ) with g the checkpoint's offset from x̄."""
    X = _data()
    offsets = [torch.tensor([0.05, 0.05, 0.05, 0.0, 0.0], dtype=F64),
               torch.tensor([0.0, 0.0, 0.0, 0.08, 0.08], dtype=F64)]
    states = [{"a": (X.mean(0) + g)[:3], "b": (X.mean(0) + g)[3:]} for g in offsets]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = slt.estimate_llc(_TwoPart(X.mean(0)), X, _half_sq, state_dicts=states, restrict_to={"a": "a", "b": "b"},
                               nbeta=NB, localization=GAMMA, step_size=2e-3, num_chains=4, num_burnin=300,
                               num_draws=2000, seed=0, dtype=F64, progress=False, extend_draws=False, batch_size=100)
    for label, cols in (("a", slice(0, 3)), ("b", slice(3, 5))):
        for k, g in enumerate(offsets):
            s = res[label][k].diagnostics["slope_at_init"]
            want = _exact(g[cols])
            assert abs(s["value"] - want) < 4 * s["sem"] + 1e-12, (label, k, s, want)
            assert any(_is_slope_reason(c) for c in res[label][k].convergence_reasons) == (want != 0), (label, k)


def test_the_loop_takes_the_slope_every_few_draws():
    """``run_chains(slope=..., slope_every=k)`` evaluates the probe at draws 0, k, 2k, ... only; a
    continuation's trace appends its own."""
    from slt.loop import run_chains
    from slt.samplers import LocalizedPotential, build_sampler, resolve_sampler
    from slt.target import prepare_target

    X = _data(n=200)
    target = prepare_target(_Location(X.mean(0) + 0.05), X, _half_sq, dtype=F64, nbeta=NB, localization=GAMMA)
    rows = target.rows(3)
    pot = LocalizedPotential(target.evaluator.loss_and_grad, rows, target.nbeta, target.localization)
    smp = build_sampler(resolve_sampler("sgld"), pot, 1e-3, mala_every=0)
    seen = []

    def probe(w):
        seen.append(w.clone())
        return (w - rows).sum(1, keepdim=True).double()

    stream = target.batches(slt.rng.ChainRNG([0], 3, target.device), 3, None)
    final, tr = run_chains(smp, smp.init(rows), stream, slt.rng.ChainRNG([0], 3, target.device), 25, num_burnin=5,
                           slope=probe, slope_every=4)
    assert tr.loss.shape == (3, 20) and tr.slope.shape == (3, 5, 1) and len(seen) == 5
    _, more = run_chains(smp, final, stream, slt.rng.ChainRNG([1], 3, target.device), 6, slope=probe, slope_every=4)
    both = tr.then(more)
    assert both.slope.shape == (3, 7, 1) and torch.equal(both.slope[:, 5:], more.slope)
    assert torch.equal(tr.rows(slice(1, 2)).slope, tr.slope[1:2])


def test_an_exact_pass_in_chunks_larger_than_the_batch():
    """Tensor data whose pass at the run's batch size would take more than SLOPE_BATCHES evaluations is
    still taken exactly in larger chunks when they are small: the slope's own error is then 0."""
    X = _data()
    g = torch.full((5,), 0.05, dtype=F64)
    r = _run(X.mean(0) + g, X, batch_size=30)  # 67 batches of 30, but 2000 × 5 elements fit one chunk
    s = r.diagnostics["slope_at_init"]
    assert s["sem_gradient"] == 0 and abs(s["value"] - _exact(g)) < 4 * s["sem"], s



def test_a_shuffling_loaders_later_passes_are_left_alone(monkeypatch):
    """The slope's pass over a DataLoader that shuffles with its own generator would advance it, so the
    run's later epochs would shuffle differently; the generator is restored, the draws are those of a run
    with the check switched off."""
    X = _data(n=400)

    def loader():
        return DataLoader(TensorDataset(X), batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(3))

    kw = dict(num_draws=200, num_burnin=20)  # 4 batches an epoch: the run goes through many
    on = _run(X.mean(0) + 0.05, loader(), **kw)
    monkeypatch.setattr(engine, "SLOPE_BATCHES", 0)
    off = _run(X.mean(0) + 0.05, loader(), **kw)
    assert torch.equal(on.llc_trace, off.llc_trace)
    assert on.diagnostics["slope_at_init"] is not None and off.diagnostics["slope_at_init"] is None
