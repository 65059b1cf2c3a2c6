"""Losses that are not a mean over samples (exact tier).

The control variate looks up per-sample losses at w* on every minibatch and ``L_n(w*)`` is
their mean, so they must add up to the loss the chains follow.  Cross-entropy whose targets
hold ``ignore_index`` (token labels at ``-100``, masked-LM labels) averages over the counted
entries, not over samples; a loss on centred logits couples the samples of a batch.  Before,
the first crashed ("does not average to loss_fn", or NaN for a row with every label ignored)
or was silently off (L(w*) 0.393 instead of 0.401, λ̂ 4.03 instead of 3.73, 8% high), the second gave λ̂ = −14."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt.rng import ChainRNG
from slt.target import prepare_target

from conftest import fp_tol

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
N, T, K = 150, 5, 3


class Tokens(nn.Module):
    """Per-token logits; ``channels=True`` gives them as (B, K, T), the layout F.cross_entropy takes."""

    def __init__(self, channels: bool = False):
        super().__init__()
        self.lin, self.channels = nn.Linear(4, K), channels

    def forward(self, x):
        out = self.lin(x)
        return out.transpose(1, 2) if self.channels else out


def _tokens(ignored: float = 0.4, full_rows: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, T, 4, generator=g, dtype=F64)
    y = (X[..., 0] > 0).long() + (X[..., 1] > 1).long()
    y[torch.rand(N, T, generator=g) < ignored] = -100
    y[:full_rows] = -100  # rows with no counted label at all (their own loss is 0/0)
    return X, y


def _model(channels=False):
    torch.manual_seed(0)
    return Tokens(channels).to(F64)


def _flat(o, t):
    return F.cross_entropy(o.reshape(-1, K), t.reshape(-1))


def _flat_minus_one(o, t):
    """The same mean over labelled tokens, its ignored labels marked -1 (no -100 for slt to count)."""
    return F.cross_entropy(o.reshape(-1, K), t.reshape(-1), ignore_index=-1)


def _centred(o, t):
    return F.cross_entropy(o - o.mean(0), t)


LOSSES = {  # name -> (model, loss, ignore index)
    "F.cross_entropy": (lambda: _model(True), F.cross_entropy, -100),
    "CrossEntropyLoss(ignore_index=-1)": (lambda: _model(True), nn.CrossEntropyLoss(ignore_index=-1), -1),
    "nll_loss": (lambda: nn.Sequential(_model(True), nn.LogSoftmax(1)), F.nll_loss, -100),
    "lambda over tokens": (lambda: _model(False), _flat, -100),
    "lambda over tokens, ignore_index=-1": (lambda: _model(False), _flat_minus_one, -1),
    # class weights: PyTorch divides by the summed weights of the counted targets
    "CrossEntropyLoss(weight)": (lambda: _model(True),
                                 nn.CrossEntropyLoss(weight=torch.tensor([0.3, 1.0, 2.5], dtype=F64)), -100),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_at_w_star_and_the_control_variate_are_the_users_loss(name):
    make, loss_fn, ignore = LOSSES[name]
    X, y = _tokens()
    y = torch.where(y == -100, ignore, y)
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the lambda's note: a forward control variate
        t = prepare_target(model, (X, y), loss_fn, dtype=F64)
        _assert_users_loss_at_w_star(t, model, X, y, loss_fn, batch=16)


def _assert_users_loss_at_w_star(t, model, X, y, loss_fn, batch):
    """L(w*) is ``loss_fn`` on the data, and the control variate ``loss_fn`` at w* on each minibatch."""
    with torch.no_grad():
        ref = loss_fn(model(X), y)
    tol = fp_tol(F64, scale=float(ref) * 10, terms=N * T)
    assert float(t.init_loss[0]) == pytest.approx(float(ref), abs=tol)
    stream = t.batches(ChainRNG(t.seeds, 3, t.device), 3, batch)
    for _ in range(3):
        b, star = stream()
        with torch.no_grad():
            want = torch.stack([loss_fn(model(b.x[c]), b.y[c]) for c in range(3)])
        torch.testing.assert_close(star, want, rtol=0, atol=tol)


def test_known_lifted_and_forward_forms_give_the_same_chains():
    """One loss three ways: the known cross-entropy (a lookup of per-sample losses and counts), the
    same loss as a lambda over tokens (its lifted per-sample losses weighted by the labels that are not
    -100: a lookup, checked at set-up), and as a lambda whose ignored labels are -1 (nothing to count: a
    forward pass at w* per minibatch).  One potential, one random stream: the same λ̂ up to rounding."""
    X, y = _tokens()
    kw = dict(num_chains=2, num_draws=30, num_burnin=10, step_size=1e-3, nbeta=30.0, localization=10.0,
              batch_size=16, dtype=F64, progress=False, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        known = slt.estimate_llc(_model(True), (X, y), F.cross_entropy, **kw)
        lifted = slt.estimate_llc(_model(False), (X, y), _flat, **kw)
        forward = slt.estimate_llc(_model(False), (X, torch.where(y == -100, -1, y)), _flat_minus_one, **kw)
    for other in (lifted, forward):
        torch.testing.assert_close(other.loss_trace, known.loss_trace, rtol=0, atol=1e-10)
        assert other.llc_mean == pytest.approx(known.llc_mean, abs=1e-8)
    assert not any("per-sample" in n for r in (known, lifted) for n in r.config["setup_notes"])
    assert any("not the mean of per-sample losses" in n for n in forward.config["setup_notes"])


def test_a_loss_over_tokens_whose_first_rows_are_unpadded_is_still_counted():
    """The first 64 rows carry a label at every token (equal counts), later rows have -100s: the plain
    mean of the lifted losses fits the first rows only.  The spread rows decide: the lookup is the
    count-weighted one, and the control variate is the user's loss on every minibatch (before, the
    plain mean was taken: off on minibatches that mix padded rows)."""
    X, y = _tokens(full_rows=0)
    y[:64] = (X[:64, :, 0] > 0).long()  # no -100 in the first 64 rows
    model = _model(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no forward control variate either
        t = prepare_target(model, (X, y), _flat, dtype=F64)
        t.init_loss
    assert t._star_counts is not None
    _assert_users_loss_at_w_star(t, model, X, y, _flat, batch=32)


def test_a_loss_that_couples_the_samples_is_not_looked_up():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 4, generator=g, dtype=F64)
    y = (X[:, 0] > 0).long()
    model = nn.Linear(4, 2).to(F64)
    with pytest.warns(RuntimeWarning, match="not the mean of per-sample losses"):
        t = prepare_target(model, (X, y), _centred, dtype=F64)
        init = t.init_loss
    with torch.no_grad():
        ref = _centred(model(X), y)
    assert float(init[0]) == pytest.approx(float(ref), abs=fp_tol(F64, scale=float(ref) * 10, terms=N))


def test_weighted_data_with_a_loss_that_is_not_a_mean_over_samples_is_refused():
    X, y = _tokens(full_rows=0)
    w = torch.rand(N, dtype=F64) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for loss_fn, labels in ((_flat, y), (_flat_minus_one, torch.where(y == -100, -1, y))):
            with pytest.raises(ValueError, match=r"(not the mean of per-sample losses|averages over labelled tokens)"
                                                 r".*weighted data.*register_per_sample"):
                slt.estimate_llc(_model(False), (X, labels, w), loss_fn, num_chains=2, num_draws=5, dtype=F64,
                                 progress=False)


def test_a_first_sample_with_every_label_ignored_is_not_an_error():
    """The set-up checks ran the loss on the first two samples: all labels -100 there gave NaN
    (0/0) and "the loss at w* is NaN"; the whole probe is checked before calling it an error."""
    X, y = _tokens(full_rows=2)
    r = slt.estimate_llc(_model(True), (X, y), F.cross_entropy, num_chains=2, num_draws=10, num_burnin=5,
                         step_size=1e-3, nbeta=30.0, localization=10.0, dtype=F64, progress=False)
    assert torch.isfinite(torch.as_tensor(r.llc_mean))
    model = _model(True)
    X2, y2 = X.clone(), y.clone()
    y2[:] = -100  # nothing counted anywhere: a real error
    with pytest.raises(ValueError, match="NaN or inf"):
        slt.estimate_llc(model, (X2, y2), F.cross_entropy, num_chains=2, num_draws=5, dtype=F64, progress=False)


class OwnLoss(nn.Module):
    """A model that computes its own loss (one number per batch), called as model(**batch)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, y):
        pred = self.lin(x).squeeze(-1)
        return {"loss": F.mse_loss(pred, y), "pred": pred}


def test_a_loss_computed_by_the_model_is_the_default_and_is_not_looked_up():
    """loss_fn omitted: the model's output["loss"], one number per batch, which has no per-sample lift:
    the control variate is a forward pass, L(w*) the model's loss, and per-sample methods refuse it."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(N, 4, generator=g, dtype=F64)
    data = {"x": X, "y": X[:, 0] + 0.1 * torch.randn(N, generator=g, dtype=F64)}
    model = OwnLoss().to(F64)
    with pytest.warns(RuntimeWarning, match="not the mean of per-sample losses"):
        t = prepare_target(model, data, None, dtype=F64)
        init = t.init_loss
    with torch.no_grad():
        ref = model(**data)["loss"]
    assert float(init[0]) == pytest.approx(float(ref), abs=fp_tol(F64, scale=10 * float(ref), terms=N))
    assert "per-sample losses of loss_fn" in t.adapter.per_sample_error
    with pytest.raises(ValueError, match="per-sample losses of loss_fn .* unavailable.*loss_fn was omitted, so the "
                                         "loss is the model's own output.loss.*slt.losses.causal_lm"):
        slt.bif(model, data, None, num_chains=2, num_draws=5, dtype=F64, progress=False)


@pytest.mark.parametrize("name", ["F.cross_entropy", "lambda over tokens", "lambda over tokens, ignore_index=-1"])
def test_data_refined_llc_with_a_loss_over_tokens(name):
    """Distributions of equal size need no weights: each group's full batch is its own rows, so a loss
    over tokens works there (counted, or by forward passes), and L(w*) of each group is the user's loss
    on it (a first version took the plain mean of the per-sample losses there)."""
    make, loss_fn, ignore = LOSSES[name]
    X, y = _tokens(full_rows=0)
    y = torch.where(y == -100, ignore, y)
    model = make()
    data = {"a": (X[:75], y[:75]), "b": (X[75:], y[75:])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = prepare_target(model, data, loss_fn, dtype=F64)
        init = t.group_init_loss
        with torch.no_grad():
            ref = torch.stack([loss_fn(model(X[:75]), y[:75]), loss_fn(model(X[75:]), y[75:])])
        torch.testing.assert_close(init, ref, rtol=0, atol=fp_tol(F64, scale=10 * float(ref.max()), terms=75 * T))
        for bs in (None, 16):
            r = slt.estimate_llc(model, data, loss_fn, num_chains=2, num_draws=10, num_burnin=5, step_size=1e-3,
                                 nbeta=30.0, localization=10.0, batch_size=bs, dtype=F64, progress=False)
            assert set(r) == {"a", "b"} and all(torch.isfinite(v.loss_trace).all() for v in r.values())


def test_class_weighted_cross_entropy_on_samples():
    """One label per sample, class weights (float32, as users build them; the run is float64): the
    loss at w* and the control variate are PyTorch's weighted mean; before, such a loss was lifted
    sample by sample, which drops the weights (the mean over samples of unweighted losses)."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(N, 4, generator=g, dtype=F64)
    y = torch.randint(0, K, (N,), generator=g)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.3, 1.0, 2.5]))
    torch.manual_seed(0)
    model = nn.Linear(4, K).to(F64)
    t = prepare_target(model, (X, y), loss_fn, dtype=F64)
    with torch.no_grad():
        ref = F.cross_entropy(model(X), y, weight=loss_fn.weight.to(F64))
    tol = fp_tol(F64, scale=10 * float(ref), terms=N)
    assert float(t.init_loss[0]) == pytest.approx(float(ref), abs=tol)
    b, star = t.batches(ChainRNG(t.seeds, 2, t.device), 2, 16)()
    with torch.no_grad():
        want = torch.stack([F.cross_entropy(model(b.x[c]), b.y[c], weight=loss_fn.weight.to(F64)) for c in range(2)])
    torch.testing.assert_close(star, want, rtol=0, atol=tol)


class TinyLM(nn.Module):
    """Token embedding and a linear read-out: a causal language model's interface, (B, T) -> (B, T, V)."""

    def __init__(self, vocab: int = 7):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, 6), nn.Linear(6, vocab)

    def forward(self, input_ids, labels=None):  # labels ride along in the batch, as with Hugging Face
        return self.out(torch.tanh(self.emb(input_ids)))


def _shifted(ignore):
    def loss(out, batch):  # next-token cross-entropy written by hand: logits at t predict labels at t + 1
        v = out.shape[-1]
        return F.cross_entropy(out[:, :-1].reshape(-1, v), batch["labels"][:, 1:].reshape(-1), ignore_index=ignore)
    return loss


def test_a_hand_written_shifted_lm_loss_is_counted_too():
    """Labels padded with -100 and shifted inside the loss: the labelled positions from 1 on weigh each
    sequence; the same chains as with padding marked -1 (nothing to count: forward passes)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 7, (N, 9), generator=g)
    pad = torch.arange(9).expand(N, 9) >= torch.randint(4, 10, (N, 1), generator=g)  # right padding
    torch.manual_seed(0)
    model = TinyLM().to(F64)
    kw = dict(num_chains=2, num_draws=20, num_burnin=5, step_size=1e-3, nbeta=30.0, localization=10.0,
              batch_size=16, dtype=F64, progress=False, seed=1)
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for ignore in (-100, -1):
            data = {"input_ids": ids, "labels": ids.masked_fill(pad, ignore)}
            runs[ignore] = slt.estimate_llc(model, data, _shifted(ignore), **kw)
    torch.testing.assert_close(runs[-100].loss_trace, runs[-1].loss_trace, rtol=0, atol=1e-10)
    assert not any("per-sample" in n for n in runs[-100].config["setup_notes"])
    assert any("not the mean of per-sample losses" in n for n in runs[-1].config["setup_notes"])
