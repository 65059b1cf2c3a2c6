"""The shared prepared target (slt.target): layout, losses at w*, minibatch streams, full-data
evaluations, the path fallback, and that every estimator starts from it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import LinearBatchNorm, fp_tol
from slt.rng import ChainRNG
from slt.target import prepare_target

F64 = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)  # test-side only: library code never seeds globally
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)


def _data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64)


def test_layout_defaults_and_losses_at_w_star():
    X, Y = _data()
    ms = [_mlp(0), _mlp(1)]
    t = prepare_target(None, (X, Y), F.mse_loss, models=ms, dtype=F64, seed=[4, 9])
    assert t.K == 2 and t.d == sum(p.numel() for p in ms[0].parameters()) and t.is_batch
    assert t.seeds == [4, 9] and t.n == 120 and t.path == "vmap"
    assert t.nbeta == pytest.approx(120 / math.log(120)) and t.localization == 1.0
    rows = t.rows(3)  # checkpoint-major
    assert rows.shape == (6, t.d) and torch.equal(rows[3], t.w_star[1]) and torch.equal(rows[2], t.w_star[0])
    per_sample, init = t.star_losses
    assert per_sample.shape == (2, 120)
    for k, m in enumerate(ms):
        with torch.no_grad():
            ref = F.mse_loss(m(X), Y)
        # a mean of 120 per-sample losses against one mean over 240 squares: sum bound
        assert float(init[k]) == pytest.approx(float(ref), abs=fp_tol(F64, scale=float(init[k]), terms=240))
    # the full-data losses and the single-chain loss/gradient agree with the module
    torch.testing.assert_close(t.losses(t.w_star), init)
    w = t.w_star[0].clone().requires_grad_(True)
    val = t.loss(w)
    (g,) = torch.autograd.grad(val, w)
    l2, g2 = t.loss_and_grad(t.w_star[0])
    torch.testing.assert_close(val.detach(), l2)
    torch.testing.assert_close(g, g2)


def test_weighted_init_loss_and_defaults_by_callable():
    X, Y = _data()
    w = torch.rand(120, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = prepare_target(_mlp(), (X, Y, w), F.mse_loss, dtype=F64, nbeta=lambda n: 2.0 * n, localization=3.0)
    assert t.nbeta == 240.0 and t.localization == 3.0 and not t.is_batch
    with torch.no_grad():
        per = ((_mlp()(X) - Y) ** 2).mean(1)
    exact = float((per * w).sum() / w.sum())
    assert float(t.init_loss[0]) == pytest.approx(exact, abs=fp_tol(F64, scale=float(per.max()), terms=360))


def test_batch_streams_full_minibatch_and_loader():
    X, Y = _data()
    m = _mlp()
    t = prepare_target(m, (X, Y), F.mse_loss, dtype=F64)
    full = t.batches(ChainRNG(t.seeds, 2, t.device), 2, None)
    b, star = full()
    assert full.full and full.batch_size == 120 and b.shared and torch.equal(star, t.init_loss.repeat(2))
    mini = t.batches(ChainRNG(t.seeds, 2, t.device), 2, 16)
    b, star = mini()
    assert not mini.full and b.x.shape == (2, 16, 3) and star.shape == (2,)
    with torch.no_grad():  # the gathered control variate equals a forward pass at w* on the same batch
        ref = torch.stack([F.mse_loss(m(b.x[c]), b.y[c]) for c in range(2)])
    torch.testing.assert_close(star, ref)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=40)
    tl = prepare_target(m, loader, F.mse_loss, dtype=F64)
    s = tl.batches(ChainRNG(tl.seeds, 2, tl.device), 2, 40)
    b, star = s()
    assert s.shared and b.x.shape == (40, 3) and star.shape == (2,)
    stacked = prepare_target(m, loader, F.mse_loss, dtype=F64, full_data=True)
    assert stacked.source.n == 120
    torch.testing.assert_close(stacked.losses(stacked.w_star), t.init_loss)


def test_a_loader_without_length_is_counted_in_one_pass():
    """An IterableDataset's loader has no len(): n (for the default nβ) is counted over its batches,
    with a note; nβ and the loss at w* are those of the same data as tensors."""
    X, Y = _data()

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(0, X.shape[0], 30):
                yield X[i : i + 30], Y[i : i + 30]

    t = prepare_target(_mlp(), torch.utils.data.DataLoader(Stream(), batch_size=None), F.mse_loss, dtype=F64)
    ref = prepare_target(_mlp(), (X, Y), F.mse_loss, dtype=F64)
    assert t.source.n == X.shape[0] and t.nbeta == ref.nbeta
    assert any(f"n = {X.shape[0]} samples, counted" in note for note in t.notes)
    torch.testing.assert_close(t.init_loss, ref.init_loss)


def test_errors_before_any_sampling():
    X, Y = _data()

    class Empty(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="empty dataset: the DataLoader yielded no batch"):
        prepare_target(_mlp(), torch.utils.data.DataLoader(Empty(), batch_size=None), F.mse_loss, dtype=F64)
    with pytest.raises(ValueError, match="dtype"):
        prepare_target(_mlp(), (X, Y), F.mse_loss, dtype=torch.float16)
    with pytest.raises(ValueError, match="loss_fn is required"):
        prepare_target(_mlp(), (X, Y), None, dtype=F64)
    with pytest.raises(ValueError, match="2 seeds for 1"):
        prepare_target(_mlp(), (X, Y), F.mse_loss, dtype=F64, seed=[1, 2])


def test_vmap_failure_falls_back_to_a_loop_naming_the_caller():
    X, Y = _data()
    with pytest.warns(RuntimeWarning, match="my_caller: the vmap path failed.*falling back"):
        t = prepare_target(LinearBatchNorm().train().to(F64), (X, Y), F.mse_loss, dtype=F64, caller="my_caller")
    assert t.path == "loop" and t.path_reason.startswith("fallback")
    # the path asked for: its error with the hint and the way out (it was PyTorch's message alone)
    with pytest.raises(RuntimeError, match=r"slt.estimate_llc: vectorize='vmap': the vmap path failed on this model .*BatchNorm in "
                                           r"train mode: call model.eval\(\).*vectorize='auto'"):
        prepare_target(LinearBatchNorm().train().to(F64), (X, Y), F.mse_loss, dtype=F64, vectorize="vmap")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 8 NUTS draws: diagnostics are not the point
def test_every_estimator_starts_from_prepare_target(monkeypatch):
    """estimate_llc, nuts_llc, wbic, sample_posterior and the symmetry observables all build their
    problem with slt.target.prepare_target (no other module repeats the set-up)."""
    import slt
    import slt.engine
    import slt.phases
    import slt.reference
    import slt.symmetry.susceptibility as sus

    calls: list[str] = []
    real = slt.target.prepare_target

    def spy(*args, **kwargs):
        calls.append(kwargs.get("caller", "slt.estimate_llc"))
        return real(*args, **kwargs)

    for mod in (slt.engine, slt.reference, slt.phases, sus):
        monkeypatch.setattr(mod, "prepare_target", spy)
    model = slt.models.GaussianLocation(1, dtype=F64)
    X = torch.randn(50, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        model.w.copy_(X.mean(0))
    kw = dict(num_chains=1, num_draws=8, seed=0)
    slt.estimate_llc(model, X, num_burnin=2, step_size=1e-3, dtype=F64, progress=False, **kw)
    slt.nuts_llc(model, X, num_warmup=4, **kw)
    slt.reference.wbic(model, X, num_warmup=4, **kw)
    slt.sample_posterior(model, X, prior_std=1.0, num_burnin=2, num_steps_bw_draws=1, chains_per_init=1,
                         num_draws=2, progress=False)
    sus.full_data_loss(model, X, dtype=F64)
    assert calls == ["slt.estimate_llc", "slt.nuts_llc", "slt.reference", "slt.sample_posterior", "slt.symmetry"]


def _patch_timings(monkeypatch, fake):
    """Every timing of slt.target (alone or candidates in turn) from ``fake(evaluator, rows, batch,
    repeats) -> seconds``; fresh path decisions."""
    import slt.target as tg

    monkeypatch.setattr(tg, "_interleaved_seconds",
                        lambda evs, rows, batch, repeats: {k: fake(e, rows, batch, repeats) for k, e in evs.items()})
    monkeypatch.setattr(tg, "_PATH_DECISIONS", {})


@pytest.mark.parametrize("t_vmap, t_loop, path", [(0.02, 0.01, "loop"), (0.02, 0.019, "vmap"), (0.001, 0.0001, "vmap")])
def test_auto_path_is_chosen_by_measurement(monkeypatch, t_vmap, t_loop, path):
    """vmap is replaced by the loop only when the loop is ≥ PATH_MARGIN faster and a vmap step is
    long enough to matter; the timings land in ``path_reason`` (timings patched: the decision, not
    the machine, is under test); and estimate_llc runs on the chosen path."""
    import slt
    import slt.target as tg

    def fake(evaluator, rows, batch, repeats):
        return t_vmap if evaluator.path == "vmap" else t_loop

    _patch_timings(monkeypatch, fake)
    X = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    Y = X @ torch.tensor([[1.0], [-1.0], [0.5]])
    t = prepare_target(nn.Linear(3, 1), (X, Y), F.mse_loss)
    assert t.path == "vmap"
    t = tg.fastest_path(t, t.rows(4), 16)
    assert t.path == path
    if t_vmap >= tg.PATH_MIN_SECONDS:
        assert "measured" in t.path_reason
    r = slt.estimate_llc(nn.Linear(3, 1), (X, Y), F.mse_loss, num_chains=2, num_draws=20, step_size=1e-3,
                         progress=False)
    assert r.diagnostics["path"] == path


def test_one_chain_runs_the_loop_without_timing(monkeypatch):
    """One chain: vmap of one row computes the loop's step plus its batching overhead, so the auto path
    is the loop, chosen without timing (a timing here fails the test); two chains are measured as
    before; an explicit vectorize="vmap" is kept."""
    import slt
    import slt.target as tg

    def no_timing(*args, **kwargs):
        raise AssertionError("timed a one-chain run")

    monkeypatch.setattr(tg, "_interleaved_seconds", no_timing)
    monkeypatch.setattr(tg, "_PATH_DECISIONS", {})
    X = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    Y = X @ torch.tensor([[1.0], [-1.0], [0.5]])
    t = tg.fastest_path(prepare_target(nn.Linear(3, 1), (X, Y), F.mse_loss), prepare_target(
        nn.Linear(3, 1), (X, Y), F.mse_loss).rows(1), 16)
    assert t.path == "loop" and "one chain" in t.path_reason
    kw = dict(num_draws=20, step_size=1e-3, progress=False, seed=0)
    m = nn.Linear(3, 1)
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, num_chains=1, **kw)
    assert r.diagnostics["path"] == "loop"
    v = slt.estimate_llc(m, (X, Y), F.mse_loss, num_chains=1, vectorize="vmap", **kw)
    assert v.diagnostics["path"] == "vmap"
    torch.testing.assert_close(r.loss_trace, v.loss_trace, rtol=1e-5, atol=1e-6)  # same chain, float32 rounding
    _patch_timings(monkeypatch, lambda evaluator, rows, batch, repeats: 0.02 if evaluator.path == "vmap" else 0.019)
    assert slt.estimate_llc(m, (X, Y), F.mse_loss, num_chains=2, **kw).diagnostics["path"] == "vmap"


@pytest.mark.parametrize("t_blocked, expect", [(0.05, 8), (0.105, 8), (0.2, None)])
def test_auto_path_may_vmap_in_blocks_of_rows(monkeypatch, t_blocked, expect):
    """With more rows than VMAP_BLOCK_ROWS (and a step long enough), vmap runs in blocks of rows
    unless vmap of all rows (0.1 s here) or the loop is ≥ PATH_MARGIN faster (timings patched); rows
    evaluated in blocks give the same losses and gradients as all at once."""
    import slt.target as tg

    def fake(evaluator, rows, batch, repeats):
        if evaluator.path == "loop":
            return 1.0
        return 0.1 if evaluator.max_rows is None else t_blocked

    X = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    Y = X @ torch.tensor([[1.0], [-1.0], [0.5]])
    t = prepare_target(nn.Linear(3, 1), (X, Y), F.mse_loss)
    _patch_timings(monkeypatch, fake)
    rows = t.rows(16)
    ref = t.evaluator.loss_and_grad(rows, t.full_batch())
    t = tg.fastest_path(t, rows, 16)
    assert t.path == "vmap" and t.evaluator.max_rows == expect
    assert "vmap in blocks of 8" in t.path_reason
    got = t.evaluator.loss_and_grad(rows, t.full_batch())
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)
