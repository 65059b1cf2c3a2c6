"""Any model a researcher has (exact tier): parameters of any shape (0-dim, frozen, buffers,
tied or reachable under two names), outputs that are tuples / dicts / dataclasses, batches
that are mappings (gather, weights, a loader of dicts, a Hugging Face Dataset), NumPy inputs,
the error messages for bad labels and models, and the train-mode notes (dropout, BatchNorm)."""

from __future__ import annotations

import copy
import functools

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt.data import Columns, Data, as_source
from slt.evaluator import describe, module_aliases
from slt.models import ChainModule
from slt.params import ParamSpec
from slt.target import prepare_target, train_mode_issues

from conftest import IGNORE_CHECKPOINT_WARNING, engine_trace_tol, fp_tol

F64 = torch.float64
pytestmark = [IGNORE_CHECKPOINT_WARNING, pytest.mark.usefixtures("one_thread")]

KW = dict(num_chains=3, num_draws=20, num_burnin=5, step_size=1e-3, nbeta=50.0, localization=10.0,
          batch_size=32, dtype=F64, progress=False)


def _data(n=200, seed=0, d_in=3, d_out=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=F64), torch.randn(n, d_out, generator=g, dtype=F64)


def _trace_tol(model, X, Y, r, kw=KW, loss_fn=F.mse_loss):
    return engine_trace_tol(model, loss_fn, X, Y, r.loss_trace, steps=kw["num_burnin"] + kw["num_draws"],
                            step_size=kw["step_size"], nbeta=kw["nbeta"], localization=kw["localization"],
                            batch_rows=kw["batch_size"])


# ----------------------------------------------------------------------------
# parameters of any shape
# ----------------------------------------------------------------------------
class Odd(nn.Module):
    """A 0-dim sampled scale, a frozen vector, a buffer and a 3-d weight."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.cube = nn.Parameter(0.1 * torch.ones(1, 2, 1))
        self.frozen = nn.Parameter(torch.tensor([1.0, -0.5]), requires_grad=False)
        self.register_buffer("shift", torch.tensor([0.1, 0.2]))

    def forward(self, x):
        return self.scale * self.lin(x) * self.frozen + self.shift + self.cube[0, :, 0]


class OddChains(Odd, ChainModule):
    """The same model with a chain dimension (the native path)."""

    def forward(self, x):
        return Odd.forward(self, x)

    def forward_chains(self, p, x):  # p[name]: (C, *shape); x: (C, B, 3)
        h = torch.baddbmm(p["lin.bias"].unsqueeze(1), x, p["lin.weight"].transpose(1, 2))
        return p["scale"][:, None, None] * h * p["frozen"].unsqueeze(1) + self.shift + p["cube"][:, 0, :, 0].unsqueeze(1)


def _odd(cls=Odd):
    torch.manual_seed(0)  # test-side only
    return cls().to(F64)


def test_param_spec_round_trips_any_shape():
    m = _odd()
    spec = ParamSpec(m)
    assert spec.names == ["scale", "cube", "lin.weight", "lin.bias"] and spec.frozen == ["frozen"]
    assert spec.d == 6 + 2 + 1 + 2
    flat = spec.flatten_module(m)
    one = spec.unflatten(flat)
    assert one["scale"].shape == () and one["cube"].shape == (1, 2, 1)
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert torch.equal(one[name], p.detach())
    many = spec.unflatten(flat.unsqueeze(0).repeat(4, 1))
    assert many["scale"].shape == (4,) and many["cube"].shape == (4, 1, 2, 1)
    # state dicts with NumPy values and numbers are accepted
    sd = {k: (v.numpy() if v.ndim else float(v)) for k, v in m.state_dict().items()}
    assert torch.equal(spec.flatten_mapping(sd), flat)


@pytest.mark.parametrize("path", ["loop", "native"])
def test_zero_dim_frozen_and_buffers_agree_across_paths(path):
    X, Y = _data()
    ref = slt.estimate_llc(_odd(), (X, Y), F.mse_loss, vectorize="vmap", **KW)
    model = _odd(OddChains if path == "native" else Odd)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = slt.estimate_llc(model, (X, Y), F.mse_loss, vectorize=path, **KW)
    assert other.diagnostics["path"] == path and math.isfinite(other.llc_mean)
    # the same chains up to the rounding of two summation orders
    tol = _trace_tol(_odd(), X, Y, ref)
    torch.testing.assert_close(other.loss_trace, ref.loss_trace, rtol=0, atol=tol)
    # the user's module, its frozen parameter and buffer are untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 4 NUTS draws at an untrained point: not the point
def test_zero_dim_parameters_in_nuts_and_posterior():
    X, Y = _data(n=60)
    r = slt.nuts_llc(_odd(), (X, Y), F.mse_loss, num_chains=1, num_draws=4, num_warmup=4, seed=0)
    assert r.loss_trace.shape == (1, 4) and torch.isfinite(r.loss_trace).all()
    t = prepare_target(_odd(), (X, Y), F.mse_loss, dtype=F64, full_data=True)
    w = t.w_star[0].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(t.loss(w), w)
    loss, g2 = t.loss_and_grad(t.w_star[0])
    torch.testing.assert_close(g, g2)
    post = slt.sample_posterior(_odd(), (X, Y), F.mse_loss, prior_std=2.0, num_draws=3, num_burnin=2,
                                chains_per_init=2, seed=0, progress=False)
    assert torch.isfinite(post.loss_trace).all()


class Aliased(nn.Module):
    """One submodule registered under two names (as TransformerLens' bridge does) plus a weight
    tied between two modules (as a language model's embeddings)."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(3, 3)
        self.alias = self.block  # the same module, a second path
        self.inp = nn.Linear(3, 3, bias=False)
        self.out = nn.Linear(3, 2, bias=False)
        self.tied = nn.Linear(3, 3, bias=False)
        self.tied.weight = self.inp.weight  # one parameter, two modules

    def forward(self, x):
        return self.out(torch.tanh(self.tied(self.alias(self.inp(x)))))


def test_aliased_modules_and_tied_weights_are_never_corrupted():
    X, Y = _data()
    torch.manual_seed(0)
    m = Aliased().to(F64)
    assert module_aliases(m) is not None  # the slot block.weight is reachable as alias.weight too
    params = dict(m.named_parameters(remove_duplicate=False))
    values = {k: v.detach().clone() for k, v in params.items()}
    ref = slt.estimate_llc(m, (X, Y), F.mse_loss, vectorize="vmap", **KW)
    loop = slt.estimate_llc(m, (X, Y), F.mse_loss, vectorize="loop", **KW)
    for k, v in m.named_parameters(remove_duplicate=False):  # the same Parameter objects, same values
        assert v is params[k] and torch.equal(v.detach(), values[k]), k
    torch.testing.assert_close(loop.loss_trace, ref.loss_trace, rtol=0, atol=_trace_tol(m, X, Y, ref))
    # the gradient reaches the tied weight through both of its uses
    t = prepare_target(m, (X, Y), F.mse_loss, dtype=F64)
    _, g = t.loss_and_grad(t.w_star[0])
    mc = Aliased().to(F64)
    mc.load_state_dict(m.state_dict())
    F.mse_loss(mc(X), Y).backward()
    ref_g = torch.cat([p.grad.reshape(-1) for _, p in mc.named_parameters()])
    torch.testing.assert_close(g, ref_g, rtol=0, atol=fp_tol(F64, scale=float(ref_g.abs().max()) + 1, terms=400))


# ----------------------------------------------------------------------------
# outputs that are not tensors
# ----------------------------------------------------------------------------
class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


@dataclass
class Prediction:
    mean: torch.Tensor
    note: str = "a non-tensor field"
    extra: torch.Tensor | None = None


class TupleOut(Plain):
    def forward(self, x):
        h = super().forward(x)
        return h, h.sum(-1), None


class DictOut(Plain):
    def forward(self, x):
        h = super().forward(x)
        return {"pred": h, "aux": (h.norm(), "text")}


class DataclassOut(Plain):
    def forward(self, x):
        return Prediction(super().forward(x))


def _plain_model(cls=Plain):
    torch.manual_seed(0)  # test-side only
    return cls().to(F64)


PICK = {TupleOut: lambda o: o[0], DictOut: lambda o: o["pred"], DataclassOut: lambda o: o.mean}


class MaxNormBag(nn.Module):
    """Token classifier whose Embedding renormalizes the rows it reads in place (``max_norm``)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 4, max_norm=1.0)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


def test_a_forward_that_writes_into_its_parameters_leaves_the_model_unchanged():
    # F.embedding(max_norm=...) calls embedding_renorm_ on the weight it is given: every probe call
    # before sampling (model and loss checks, the random-forward and reduction checks) runs on copies
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, 12, (64, 5), generator=g), torch.randn(64, 2, generator=g, dtype=F64)
    torch.manual_seed(0)
    m = MaxNormBag().to(F64)
    with torch.no_grad():
        m.emb.weight.mul_(3.0)  # rows of norm > 1: a forward on the model's own weight would shrink them
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = slt.estimate_llc(m, (X, Y), F.mse_loss, vectorize="vmap", **KW)
    loop = slt.estimate_llc(m, (X, Y), F.mse_loss, vectorize="loop", **KW)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    # both paths project the chains' rows alike (engine_trace_tol's per-sample vmap cannot run this forward:
    # a generous bound of 10⁴ roundings at the loss's scale over the 25 steps)
    tol = fp_tol(F64, scale=float(ref.loss_trace.abs().max()) + 1, terms=10_000)
    torch.testing.assert_close(loop.loss_trace, ref.loss_trace, rtol=0, atol=tol)


@pytest.mark.parametrize("cls", [TupleOut, DictOut, DataclassOut])
@pytest.mark.parametrize("weighted", [False, True])
def test_structured_outputs_match_the_tensor_model(cls, weighted):
    """The loss receives the raw output; per-chain, per-sample (control variate at w*) and
    weighted losses give the chains of the equivalent tensor-output model."""
    X, Y = _data()
    pick = PICK[cls]

    def loss(o, y):
        return F.mse_loss(pick(o), y)

    data = (X, Y, torch.rand(200, generator=torch.Generator().manual_seed(5), dtype=F64)) if weighted else (X, Y)
    ref = slt.estimate_llc(_plain_model(), data, F.mse_loss, **KW)
    tol = _trace_tol(_plain_model(), X, Y, ref)
    for vec in ("vmap", "loop"):
        r = slt.estimate_llc(_plain_model(cls), data, loss, vectorize=vec, **KW)
        assert r.diagnostics["path"] == vec
        torch.testing.assert_close(r.loss_trace, ref.loss_trace, rtol=0, atol=tol)
        torch.testing.assert_close(r.loss_star_trace, ref.loss_star_trace, rtol=0, atol=tol)
    t = prepare_target(_plain_model(cls), data, loss, dtype=F64)
    assert t.evaluator.structured and t.star_losses[0] is not None  # the control variate is a gather


class NormalOut(Plain):
    """A probabilistic regression: the output is a ``torch.distributions.Normal``."""

    def forward(self, x):
        h = super().forward(x)
        return torch.distributions.Normal(h, torch.ones_like(h))


class CategoricalOut(Plain):
    def forward(self, x):
        return torch.distributions.Categorical(logits=super().forward(x))


class IndependentOut(NormalOut):
    def forward(self, x):
        return torch.distributions.Independent(super().forward(x), 1)


class TransformedOut(NormalOut):
    def forward(self, x):
        return torch.distributions.TransformedDistribution(super().forward(x), [torch.distributions.ExpTransform()])


def _gauss(o, y):  # unvalidated: the tolerance's reference vmaps it, and torch 2.3's vmap refuses the check
    return -torch.distributions.Normal(o, torch.ones_like(o), validate_args=False).log_prob(y).mean()


def _nll(d, y):
    return -d.log_prob(y).mean()


def test_distribution_outputs_get_per_sample_losses_from_their_parameters():
    """A model returning a ``torch.distributions`` object: its parameters are the output's leaves (those of
    the inner distributions of ``Independent`` and ``MixtureSameFamily``), so the loss at w* on each
    minibatch is a lookup and the chains are those of the tensor model with the same loss.  One that its
    parameters do not rebuild (``TransformedDistribution``) falls back to forward passes at w*."""
    X, Y = _data()
    ref = slt.estimate_llc(_plain_model(), (X, Y), _gauss, **KW)
    t = prepare_target(_plain_model(NormalOut), (X, Y), _nll, dtype=F64)
    assert t.adapter.per_sample_error is None and t.star_losses[0] is not None  # a gather
    for vec in ("vmap", "loop"):
        r = slt.estimate_llc(_plain_model(NormalOut), (X, Y), _nll, vectorize=vec, **KW)
        tol = _trace_tol(_plain_model(), X, Y, ref, loss_fn=_gauss)
        torch.testing.assert_close(r.loss_trace, ref.loss_trace, rtol=0, atol=tol)
        torch.testing.assert_close(r.loss_star_trace, ref.loss_star_trace, rtol=0, atol=tol)
    labels = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(1))
    t = prepare_target(_plain_model(CategoricalOut), (X, labels), _nll, dtype=F64)
    assert t.adapter.per_sample_error is None and t.star_losses[0] is not None
    cat = CategoricalOut.forward(_plain_model(CategoricalOut), X)
    own = (-cat.log_prob(labels)).detach()  # each sample's own loss (log-softmax over 2 classes: a few roundings)
    torch.testing.assert_close(t.star_losses[0][0], own, rtol=0, atol=fp_tol(F64, scale=float(own.abs().max()) + 1,
                                                                               terms=2))
    t = prepare_target(_plain_model(IndependentOut), (X, Y), _nll, dtype=F64)
    assert t.adapter.per_sample_error is None
    own = (-IndependentOut.forward(_plain_model(IndependentOut), X).log_prob(Y)).detach()  # summed over the event
    torch.testing.assert_close(t.star_losses[0][0], own, rtol=0, atol=fp_tol(F64, scale=float(own.abs().max()) + 1,
                                                                               terms=4))
    t = prepare_target(_plain_model(TransformedOut), (X, Y.exp()), _nll, dtype=F64)
    assert t.adapter.per_sample_error is not None and t.star_losses[0] is None


def test_distribution_checks_are_off_in_vmapped_blocks_only_where_vmap_refuses_them(monkeypatch):
    """torch 2.3's vmap refuses torch.distributions' argument checks (a Python bool of the values), so a
    model returning a distribution fell back to the loop there; where that is so, slt's vmapped blocks
    build distributions unchecked and put the default back after, also on an exception."""
    from slt import evaluator as ev

    dist = torch.distributions.Distribution
    assert dist._validate_args
    with ev._vmap_attention():
        assert dist._validate_args == ev._validation_runs_under_vmap()  # on where vmap runs them (after torch 2.3)
    monkeypatch.setattr(ev, "_validation_runs_under_vmap", lambda: False)  # as on torch 2.3
    with pytest.raises(KeyError), ev._vmap_attention():
        assert not dist._validate_args
        raise KeyError("inside")
    assert dist._validate_args


class Opaque:
    """Not a tensor, tuple, dict or dataclass: vmap cannot see inside."""

    def __init__(self, t):
        self.t = t


class OpaqueOut(Plain):
    def forward(self, x):
        return Opaque(super().forward(x))


def test_opaque_outputs_fall_back_to_forward_passes_and_say_what_is_missing():
    X, Y = _data()

    def loss(o, y):
        return F.mse_loss(o.t, y)

    t = prepare_target(_plain_model(OpaqueOut), (X, Y), loss, dtype=F64)
    assert t.adapter.per_sample_error is not None and "register_per_sample" in t.adapter.per_sample_error
    assert t.star_losses[0] is None  # L_B(w*) by a forward pass instead of a gather
    ref = slt.estimate_llc(_plain_model(), (X, Y), F.mse_loss, **KW)
    r = slt.estimate_llc(_plain_model(OpaqueOut), (X, Y), loss, **KW)
    torch.testing.assert_close(r.loss_trace, ref.loss_trace, rtol=0, atol=_trace_tol(_plain_model(), X, Y, ref))
    with pytest.raises(ValueError, match="per-sample losses of loss_fn on the model's output .*Opaque"):
        slt.estimate_llc(_plain_model(OpaqueOut), (X, Y, torch.ones(200, dtype=F64)), loss, **KW)
    # a per_sample form makes it work
    slt.losses.register_per_sample(loss, lambda o, y: (o.t - y).square().mean(-1))
    r = slt.estimate_llc(_plain_model(OpaqueOut), (X, Y, torch.ones(200, dtype=F64)), loss, **KW)
    assert math.isfinite(r.llc_mean)


def test_describe_never_crashes():
    assert describe(torch.zeros(2, 3)) == "tensor (2, 3) float32"
    assert "Prediction(mean=tensor (2,) float32" in describe(Prediction(torch.zeros(2)))
    assert describe({"a": (torch.zeros(1), None)}) == "dict{'a': tuple(tensor (1,) float32, NoneType)}"
    assert describe(Opaque(1)) == "Opaque"


# ----------------------------------------------------------------------------
# batches that are mappings
# ----------------------------------------------------------------------------
class TwoInputs(nn.Module):
    """``model(a=..., b=..., y=...)``: two named inputs (``y`` is ignored: it is the loss's)."""

    def __init__(self):
        super().__init__()
        self.la = nn.Linear(2, 4)
        self.lb = nn.Linear(1, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, a, b, y=None):
        return self.out(torch.tanh(self.la(a) + self.lb(b)))


class TwoInputsTensor(TwoInputs):
    def forward(self, x):
        return super().forward(x[..., :2], x[..., 2:])


def _two(cls=TwoInputs):
    torch.manual_seed(0)  # test-side only
    return cls().to(F64)


def batch_mse(out, batch):
    """The loss of a mapping batch without a separate target reads its own column."""
    return F.mse_loss(out, batch["y"])


def test_columns_gather_and_per_chain():
    X, Y = _data(n=10)
    d = Data({"a": X[:, :2], "b": X[:, 2:]}, Y)
    assert isinstance(d.x, Columns) and d.n == 10 and len(d) == 10
    assert torch.equal(d.x[2:4]["a"], X[2:4, :2]) and d.x[torch.tensor([1, 3])]["b"].shape == (2, 1)
    b = d.gather(torch.tensor([[0, 1, 2], [3, 4, 5]]))
    assert type(b.x) is dict and b.x["a"].shape == (2, 3, 2) and b.y.shape == (2, 3, 2)
    assert torch.equal(b.x["b"][1], X[3:6, 2:])
    full = Data({"a": X[:, :2], "b": X[:, 2:], "y": Y}).full_batch()
    assert type(full.x) is dict and full.y is full.x  # no separate target: the loss receives the mapping
    pc = full.per_chain(3)
    assert pc.x["a"].shape == (3, 10, 2) and pc.y is pc.x
    with pytest.raises(ValueError, match=r"x\['a'\] and x\['b'\] disagree on the number of samples: 10 vs 9"):
        Data({"a": X[:, :2], "b": X[:9, 2:]})
    # a graph's edge_index is no column: the error says where it belongs
    with pytest.raises(ValueError, match=r"10 vs 2\. Every entry .*functools\.partial\(model\.forward, edge_index=\.\.\.\)"):
        Data({"x": X, "edge_index": torch.randint(0, 10, (2, 30))})
    with pytest.raises(ValueError, match=r"x\['b'\] contains NaN"):
        Data({"a": X[:, :2], "b": torch.full((10, 1), float("nan"))})


@pytest.mark.parametrize("vec", ["vmap", "loop"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mapping_batches_match_the_tensor_model(vec, weighted):
    """Minibatch gathering, per-chain batches, the control variate at w* and weights work on
    mapping batches: model(**batch) gives the chains of the equivalent tensor model."""
    X, Y = _data()
    w = torch.rand(200, generator=torch.Generator().manual_seed(5), dtype=F64)
    tensor_data = (X, Y, w) if weighted else (X, Y)
    ref = slt.estimate_llc(_two(TwoInputsTensor), tensor_data, F.mse_loss, **KW)
    tol = _trace_tol(_two(TwoInputsTensor), X, Y, ref)
    cols = {"a": X[:, :2], "b": X[:, 2:], "y": Y}
    r = slt.estimate_llc(_two(), Data(cols, None, w if weighted else None), batch_mse, vectorize=vec, **KW)
    torch.testing.assert_close(r.loss_trace, ref.loss_trace, rtol=0, atol=tol)
    torch.testing.assert_close(r.loss_star_trace, ref.loss_star_trace, rtol=0, atol=tol)
    t = prepare_target(_two(), cols, batch_mse, dtype=F64, vectorize=vec)
    assert t.star_losses[0] is not None  # the control variate at w* is a gather of per-sample losses
    # (inputs, target): the model gets the mapping, the loss the target tensor
    r2 = slt.estimate_llc(_two(), ({"a": X[:, :2], "b": X[:, 2:]}, Y) + ((w,) if weighted else ()), F.mse_loss,
                          vectorize=vec, **KW)
    torch.testing.assert_close(r2.loss_trace, ref.loss_trace, rtol=0, atol=tol)


def test_loader_of_dicts_and_full_data():
    X, Y = _data(n=120)
    rows = [{"a": X[i, :2], "b": X[i, 2:], "y": Y[i]} for i in range(120)]
    loader = torch.utils.data.DataLoader(rows, batch_size=40)
    r = slt.estimate_llc(_two(), loader, batch_mse, **{**KW, "num_draws": 6})
    assert r.loss_trace.shape == (3, 6) and torch.isfinite(r.loss_trace).all()
    with torch.no_grad():
        ref = F.mse_loss(_two(TwoInputsTensor)(X), Y)
    scale = float((_two(TwoInputsTensor)(X).detach() - Y).square().max())
    assert r.init_loss == pytest.approx(float(ref), abs=fp_tol(F64, scale=scale, terms=240 + 12))
    t = prepare_target(_two(), loader, batch_mse, dtype=F64, full_data=True)  # stacked into columns
    assert isinstance(t.source, Data) and set(t.source.x) == {"a", "b", "y"} and t.n == 120
    torch.testing.assert_close(t.losses(t.w_star), t.init_loss)
    r = slt.nuts_llc(_two(), loader, batch_mse, num_chains=1, num_draws=4, num_warmup=4, seed=0)
    assert torch.isfinite(r.loss_trace).all()


def test_a_loader_that_drops_samples_or_ignores_batch_size_says_so():
    """drop_last=True without shuffling: the last n mod B samples never enter the run, and L(w*) was the
    loss of the others only (n counted all of them), silently; now L(w*) is L_n and a note names the
    samples left out.  A batch_size the loader's run cannot honour (full batch asked, the loader's batches
    used) was recorded as "given": now a warning, and the rule "loader"."""
    from torch.utils.data import DataLoader, TensorDataset

    X, Y = _data(n=40)
    model = _plain_model()
    with torch.no_grad():
        full = F.mse_loss(model(X), Y).item()
    kw = {**KW, "batch_size": "auto", "num_draws": 4}
    for shuffle in (False, True):
        g = torch.Generator().manual_seed(0)
        loader = DataLoader(TensorDataset(X, Y), batch_size=16, drop_last=True, shuffle=shuffle, generator=g)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = slt.estimate_llc(model, loader, F.mse_loss, **kw)
        assert r.init_loss == pytest.approx(full, rel=1e-12)
        dropped = [str(w.message) for w in caught if "drops its last batch" in str(w.message)]
        assert len(dropped) == (0 if shuffle else 1)
        if not shuffle:
            assert "its last 8 samples never enter the run" in dropped[0]
            assert "its last 8 samples" in " ".join(r.config.get("setup_notes", []) + [dropped[0]])
    loader = DataLoader(TensorDataset(X, Y), batch_size=8)
    with pytest.warns(RuntimeWarning, match=r"data is a DataLoader, whose batches \(8\) are the run's: full batch "
                                            r"\(batch_size=None\) is ignored"):
        r = slt.estimate_llc(model, loader, F.mse_loss, **{**kw, "batch_size": None})
    assert r.config["batch_size"] == 8 and r.config["batch_size_rule"] == "loader"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slt.estimate_llc(model, loader, F.mse_loss, **{**kw, "batch_size": 8})  # the loader's own: fine
    assert not [w for w in caught if "is ignored" in str(w.message)]


def test_a_loader_whose_batch_sampler_does_not_say_records_its_batches():
    """A DataLoader built on a batch sampler of its own (buckets of 10) has no ``batch_size``: the run's record and
    the heating line said batch_size=256, the default, for batches of 10.  Now the mean rows per batch."""
    from torch.utils.data import DataLoader, TensorDataset

    X, Y = _data(n=40)

    class Buckets:
        def __iter__(self):
            return iter([list(range(i, i + 10)) for i in range(0, 40, 10)])

        def __len__(self):
            return 4

    loader = DataLoader(TensorDataset(X, Y), batch_sampler=Buckets())
    r = slt.estimate_llc(_plain_model(), loader, F.mse_loss, **{**KW, "batch_size": "auto", "num_draws": 4})
    assert r.config["batch_size"] == 10 and r.config["batch_size_rule"] == "loader"


def test_a_loader_of_single_samples_is_named_not_read_as_batches():
    """``DataLoader(dataset, batch_size=None)`` yields samples without a batch dimension: the probe failed
    with "slice() cannot be applied to a 0-dim tensor".  Now the error names the loader's setting."""
    from torch.utils.data import DataLoader, TensorDataset

    X, Y = _data(n=40)
    labels = torch.arange(40) % 2
    loader = DataLoader(TensorDataset(X, labels), batch_size=None)
    with pytest.raises(ValueError, match=r"batch's y holds a 0-d tensor.*batch_size=None turns PyTorch's automatic "
                                         r"batching off.*DataLoader\(dataset, batch_size=B\)"):
        slt.estimate_llc(nn.Linear(3, 2).to(F64), loader, F.cross_entropy, **KW)


def test_a_shuffling_loader_without_a_generator_is_named_and_its_batch_size_recorded():
    from torch.utils.data import DataLoader, TensorDataset

    X, Y = _data(n=120)
    ds = TensorDataset(X, Y)
    kw = dict(KW, batch_size=64)  # the loader's 16 is what runs, and what the config records
    with pytest.warns(RuntimeWarning, match=r"the DataLoader shuffles with PyTorch's global random state .*"
                                            r"generator=torch.Generator\(\).manual_seed\(s\)"):
        r = slt.estimate_llc(_plain_model(), DataLoader(ds, batch_size=16, shuffle=True), F.mse_loss, **kw)
    assert r.config["batch_size"] == 16
    # recorded, but a run that does not repeat is not a run that has not converged
    assert len(r.config["setup_notes"]) == 1 and "global random state" in r.config["setup_notes"][0]
    assert not any("global random state" in p for p in r.convergence_reasons)
    assert "\n  note: the DataLoader shuffles with PyTorch's global random state" in str(r)

    def run():
        loader = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*global random state")
            return slt.estimate_llc(_plain_model(), loader, F.mse_loss, **kw)

    a, b = run(), run()
    assert torch.equal(a.loss_trace, b.loss_trace)
    # the same loader twice: the call leaves its generator as it found it, so the second call repeats the first
    loader = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))
    state = loader.generator.get_state()
    first, again = (slt.estimate_llc(_plain_model(), loader, F.mse_loss, **kw) for _ in range(2))
    assert torch.equal(first.loss_trace, again.loss_trace) and torch.equal(loader.generator.get_state(), state)
    # not shuffled: nothing to say
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*global random state")
        slt.estimate_llc(_plain_model(), DataLoader(ds, batch_size=16), F.mse_loss, **kw)


def test_dataset_of_dict_items_is_stacked():
    X, Y = _data(n=30)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            return {"a": X[i, :2].numpy(), "b": X[i, 2:], "y": Y[i]}

    d = as_source(DS())
    assert isinstance(d, Data) and torch.equal(d.x["a"], X[:, :2]) and d.y is None


def test_a_list_of_samples_is_a_dataset():
    X, Y = _data(n=30)
    pairs = as_source([(X[i], Y[i]) for i in range(30)])
    assert isinstance(pairs, Data) and torch.equal(pairs.x, X) and torch.equal(pairs.y, Y)
    two = as_source([(X[i], Y[i]) for i in range(2)])  # two samples, not the columns (X, Y)
    assert torch.equal(two.x, X[:2]) and torch.equal(two.y, Y[:2])
    dicts = as_source([{"a": X[i, :2].numpy(), "b": X[i, 2:]} for i in range(30)])
    assert torch.equal(dicts.x["a"], X[:, :2]) and dicts.y is None
    assert torch.equal(as_source((X, Y)).x, X)  # columns stay columns
    with pytest.raises(ValueError, match="got 4 items of type Tensor"):
        as_source([X, Y, Y, Y])
    r_list = slt.estimate_llc(_plain_model(), [(X[i], Y[i]) for i in range(30)], F.mse_loss, **KW)
    r_cols = slt.estimate_llc(_plain_model(), (X, Y), F.mse_loss, **KW)
    assert torch.equal(r_list.loss_trace, r_cols.loss_trace)
    # a tokenizer's outputs, one per text: lists of ids, stacked; unpadded lists are named
    enc = [{"input_ids": [i, i + 1, i + 2], "attention_mask": [1, 1, 0]} for i in range(30)]
    tok = as_source(enc)
    assert tok.x["input_ids"].shape == (30, 3) and tok.x["input_ids"].dtype == torch.int64
    assert torch.equal(tok.x["attention_mask"][0], torch.tensor([1, 1, 0]))
    with pytest.raises(ValueError, match="field 'input_ids' has different lengths \\(2 to 3\\): pad them"):
        as_source([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])


def test_python_lists_are_columns_and_an_iterable_dataset_is_read_once():
    """Columns given as Python lists (a tokenizer's output without ``return_tensors``, labels from a list
    comprehension) were refused ("must be a torch.Tensor"), and a mapping of such lists was taken for a
    data-refined mapping of datasets; an ``IterableDataset`` failed with ``len()``.  Now lists of numbers
    are tensors as NumPy makes them, text and ragged rows are errors naming the column, and an
    ``IterableDataset``'s samples are read once and stacked — each giving the chains of the tensor form."""
    X, Y = _data(n=40)
    ids = torch.randint(0, 9, (40, 5), generator=torch.Generator().manual_seed(2))
    lab = torch.arange(40) % 3
    d = as_source({"input_ids": ids.tolist(), "labels": lab.tolist()})
    assert isinstance(d, Data) and torch.equal(d.x["input_ids"], ids) and d.x["labels"].dtype == torch.int64
    pair = as_source((X.tolist(), Y.tolist()))
    assert pair.x.dtype == F64 and torch.equal(pair.x, X) and torch.equal(pair.y, Y)
    with pytest.raises(ValueError, match=r"x\['text'\] is a list of text \(str\), not numbers.*tokenize it"):
        as_source({"input_ids": ids, "text": ["a"] * 40})
    with pytest.raises(ValueError, match=r"x\['input_ids'\] is a list whose rows have different lengths: pad"):
        as_source({"input_ids": [[1, 2, 3], [4, 5]]})
    from slt.groups import split_data  # pairs (rows, labels) of lists are datasets, not columns

    assert split_data({"a": (X.tolist(), Y.tolist()), "b": (X.tolist(), Y.tolist())})[0] == ["a", "b"]
    ref = slt.estimate_llc(_plain_model(), (X, Y), F.mse_loss, **KW)
    lists = slt.estimate_llc(_plain_model(), (X.tolist(), Y.tolist()), F.mse_loss, **KW)
    assert torch.equal(lists.loss_trace, ref.loss_trace)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(X, Y))

    streamed = slt.estimate_llc(_plain_model(), Stream(), F.mse_loss, **KW)
    assert torch.equal(streamed.loss_trace, ref.loss_trace)

    class Empty(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="IterableDataset yielded no samples"):
        as_source(Empty())


def test_a_list_of_minibatches_is_named_not_read_as_samples():
    """``list(loader)`` — minibatches ``(x_b, y_b)`` — was stacked as one sample per minibatch: n = 7 for 112
    samples, a wrong nβ and a negative λ̂ with an MSE loss, no word said.  Of different sizes (a last, smaller
    batch) it is an error naming the fix; of equal sizes it reads as samples (a sequence and its next tokens
    look the same) with a warning naming both readings; samples with a scalar target and tokenized samples
    with a label stay silent."""
    X, Y = _data(n=120)
    with pytest.raises(ValueError, match=r"list of 8 items that look like minibatches.*16 down to 8.*DataLoader itself"):
        as_source([(X[i:i + 16], Y[i:i + 16]) for i in range(0, 120, 16)])
    with pytest.warns(UserWarning, match=r"list of 7 \(x, y\) items .* leading size of 16 was read as 7 samples"):
        d = as_source([(X[i:i + 16], Y[i:i + 16]) for i in range(0, 112, 16)])
    assert d.x.shape == (7, 16, X.shape[1])  # the samples reading, as warned
    ids = torch.randint(0, 5, (12, 6))
    with pytest.warns(UserWarning, match="read as 3 samples"):  # minibatches of (mapping, y)
        as_source([({"input_ids": ids[i:i + 4]}, Y[i:i + 4]) for i in range(0, 12, 4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairs = as_source([(X[i], Y[i]) for i in range(30)])  # a scalar target: samples
        tok = as_source([({"input_ids": ids[i], "attention_mask": ids[i] > 0}, Y[i]) for i in range(12)])
    assert pairs.x.shape == (30, X.shape[1])
    assert tok.x["input_ids"].shape == (12, 6) and tok.x["attention_mask"].dtype == torch.bool
    assert torch.equal(tok.y, Y[:12])


def test_hugging_face_dataset_becomes_columns():
    datasets = pytest.importorskip("datasets")
    X, Y = _data(n=50)
    ds = datasets.Dataset.from_dict({"a": X[:, :2].tolist(), "b": X[:, 2:].tolist(), "y": Y.tolist(),
                                     "text": ["row"] * 50})
    d = as_source(ds)
    assert set(d.x) == {"a", "b", "y"}  # text is not a model input: left out
    assert d.x["a"].dtype == F64 and torch.equal(d.x["a"], X[:, :2])
    r = slt.estimate_llc(_two(), ds, batch_mse, **{**KW, "num_draws": 6})
    ref = slt.estimate_llc(_two(), Data({"a": X[:, :2], "b": X[:, 2:], "y": Y}), batch_mse, **{**KW, "num_draws": 6})
    assert torch.equal(r.loss_trace, ref.loss_trace)
    ragged = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [1, 2]]})
    with pytest.raises(ValueError, match="column 'input_ids' of the datasets.Dataset has rows of different lengths"):
        as_source(ragged)
    # (inputs, target) from a dataset: its columns (ds["a"], a lazy Column in datasets >= 4) and a dataset of the
    # inputs' columns beside the labels, refused before ("x must be a torch.Tensor ... got Column")
    cols = as_source((ds["a"], ds["y"]))
    assert torch.equal(cols.x, X[:, :2]) and torch.equal(cols.y, Y)
    inputs = as_source((ds.select_columns(["a", "b"]), Y))
    assert set(inputs.x) == {"a", "b"} and torch.equal(inputs.x["b"], X[:, 2:]) and torch.equal(inputs.y, Y)


# ----------------------------------------------------------------------------
# NumPy
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_numpy_inputs_equal_tensors(dtype):
    X, Y = _data()
    w = torch.rand(200, generator=torch.Generator().manual_seed(5), dtype=F64)
    kw = {**KW, "dtype": dtype}
    model = _plain_model()
    ref = slt.estimate_llc(model, (X, Y, w), F.mse_loss, **kw)  # float64 tensors follow `dtype`
    r = slt.estimate_llc(model, (X.numpy(), Y.numpy(), w.numpy()), F.mse_loss, **kw)
    assert torch.equal(r.loss_trace, ref.loss_trace) and r.llc_mean == ref.llc_mean
    cls = slt.estimate_llc(nn.Linear(3, 4).to(F64), (X.numpy(), np.arange(200) % 4), F.cross_entropy, **KW)
    assert math.isfinite(cls.llc_mean)
    d = Data({"a": X[:, :2].numpy(), "b": X[:, 2:].numpy(), "y": Y.numpy()})
    assert isinstance(d.x["a"], torch.Tensor) and d.x["a"].dtype == F64



def test_pandas_frames_equal_tensors():
    """A pandas DataFrame / Series is read as its ``to_numpy()``; a frame with a text column is an
    error that names it (before: "x must be a torch.Tensor (or a NumPy array), got DataFrame")."""
    pd = pytest.importorskip("pandas")
    X, Y = _data()
    model = _plain_model()
    ref = slt.estimate_llc(model, (X, Y), F.mse_loss, **KW)
    r = slt.estimate_llc(model, (pd.DataFrame(X.numpy()), pd.DataFrame(Y.numpy())), F.mse_loss, **KW)
    assert torch.equal(r.loss_trace, ref.loss_trace)
    labels = pd.Series(np.arange(200) % 4)
    cls = slt.estimate_llc(nn.Linear(3, 4).to(F64), (pd.DataFrame(X.numpy()), labels), F.cross_entropy, **KW)
    assert math.isfinite(cls.llc_mean)
    mixed = pd.DataFrame({"a": X[:, 0].numpy(), "name": ["s"] * 200})
    with pytest.raises(ValueError, match=r"x is a pandas DataFrame \(as to_numpy\(\)\) of dtype object.*"
                                         r"numeric columns"):
        slt.estimate_llc(model, (mixed, Y), F.mse_loss, **KW)

class Checkpointed(nn.Module):
    """A hidden layer under activation checkpointing (torch.utils.checkpoint, non-reentrant): its
    activations are recomputed during backward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
        self.h = nn.Linear(8, 2)

    def forward(self, x):
        import torch.utils.checkpoint as cp

        return self.h(cp.checkpoint(self.a, x, use_reentrant=False))


def test_activation_checkpointing_recomputes_at_the_chains_parameters():
    """Regression: the loop path put a chain's tensors into the module for the forward only, so the
    backward's recomputation ran at the module's own parameters (w*) and the gradient inside the
    checkpointed segment was wrong away from w* (first-layer entries -0.100 against -0.086), silently.
    Now the chain's tensors are held through the backward: the gradient and the chains equal the plain
    twin's (to float rounding: the same operations in the same order).  vmap cannot run the
    recomputation (it happens outside vmap): the auto path falls back to the loop and says why."""
    torch.manual_seed(0)
    ck = Checkpointed().to(F64)
    plain = nn.Sequential()
    plain.a, plain.h = ck.a, ck.h
    X, Y = _data()
    targets = [prepare_target(m, (X, Y), F.mse_loss, dtype=F64, vectorize="loop") for m in (ck, plain)]
    w = targets[0].rows(2) + 0.05 * torch.randn(2, targets[0].d, generator=torch.Generator().manual_seed(1), dtype=F64)
    (l0, g0), (l1, g1) = (t.evaluator.loss_and_grad(w, t.source.full_batch()) for t in targets)
    # the same operations in the same order: equal to a few ulps of the terms summed over the batch
    tol = fp_tol(F64, scale=float(g1.abs().max()) + 1.0, terms=X.shape[0])
    assert torch.allclose(l0, l1, rtol=0, atol=fp_tol(F64, scale=float(l1.max()), terms=X.shape[0]))
    assert torch.allclose(g0, g1, rtol=0, atol=tol), (g0 - g1).abs().max()
    kw = {**KW, "vectorize": "loop"}
    a = slt.estimate_llc(ck, (X, Y), F.mse_loss, **kw)
    b = slt.estimate_llc(plain, (X, Y), F.mse_loss, **kw)
    assert torch.allclose(a.loss_trace, b.loss_trace, rtol=0, atol=_trace_tol(plain, X, Y, b))
    with pytest.warns(RuntimeWarning, match="activation checkpointing"):
        auto = slt.estimate_llc(ck, (X, Y), F.mse_loss, **{**KW, "vectorize": "auto"})
    assert auto.diagnostics["path"] == "loop"


def test_hugging_face_gradient_checkpointing_recomputes_with_the_fused_activations(one_thread):
    """A GPT-2 with gradient checkpointing on (train mode, dropout 0): the loop path ran the forward with slt's
    fused GELU but the backward's recomputation with the module's own, whose saved shapes differ, and failed
    (CheckpointError).  The fused forwards now cover the backward: the chains equal the same model's without
    checkpointing (the same operations in the same order)."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)  # test-side only
    cfg = transformers.GPT2Config(vocab_size=16, n_positions=12, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                  eos_token_id=0, attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(1, 16, (16, 12), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kw = dict(step_size=1e-4, num_burnin=0, num_draws=5, num_chains=2, localization=100.0, batch_size=None,
              vectorize="loop", seed=0, progress=False)
    plain = slt.estimate_llc(model.eval(), data, slt.losses.causal_lm, **kw)
    model.gradient_checkpointing_enable()
    model.train()  # (dropout 0: train mode only turns the checkpointing on)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (train mode: a note that it is not eval mode)
        ck = slt.estimate_llc(model, data, slt.losses.causal_lm, **kw)
    # (equal in exact arithmetic; 5 steps of float32 sums over 16 × 11 tokens and 16 logits each)
    tol = fp_tol(torch.float32, scale=float(plain.loss_trace.abs().max()), terms=16 * 11 * 16)
    assert torch.allclose(ck.loss_trace, plain.loss_trace, rtol=0, atol=tol)


def test_data_parallel_wrappers_are_unwrapped():
    """nn.DataParallel computes the same function with the inner module's parameters (functional_call
    refuses the wrapper): the run is the plain model's, and a state dict saved from the wrapper (keys
    "module.…") loads into the plain template."""
    X, Y = _data()
    model = _plain_model()
    ref = slt.estimate_llc(model, (X, Y), F.mse_loss, **KW)
    wrapped = slt.estimate_llc(nn.DataParallel(model), (X, Y), F.mse_loss, **KW)
    assert torch.equal(wrapped.loss_trace, ref.loss_trace)
    sd = nn.DataParallel(model).state_dict()
    assert all(k.startswith("module.") for k in sd)
    (from_sd,) = slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[sd], **KW)
    assert torch.equal(from_sd.loss_trace, ref.loss_trace)


def test_a_torch_compile_wrapper_is_unwrapped():
    """``torch.compile(model)`` returns a wrapper whose parameters are named "_orig_mod.…": the run is
    the plain model's (slt compiles its own step where that pays), and a state dict saved from the
    wrapper loads into the plain template."""
    X, Y = _data()
    model = _plain_model()
    ref = slt.estimate_llc(model, (X, Y), F.mse_loss, **KW)
    compiled = torch.compile(model)
    run = slt.estimate_llc(compiled, (X, Y), F.mse_loss, **KW)
    assert torch.equal(run.loss_trace, ref.loss_trace)
    sd = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in sd)
    (from_sd,) = slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[sd], **KW)
    assert torch.equal(from_sd.loss_trace, ref.loss_trace)


def test_checkpoint_lists_given_in_another_form_are_named():
    """A generator of state dicts was consumed by the first of several readings ("state_dicts is empty"),
    a mapping of labelled checkpoints had its labels read as file names, and a one-tuple holding a data
    mapping was one sample ("default nbeta needs n >= 2")."""
    X, Y = _data(n=50)
    model = _plain_model()
    sds = [model.state_dict(), model.state_dict()]
    with pytest.raises(TypeError, match=r"state_dicts is an iterator.*pass a list, state_dicts=list\(...\)"):
        slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=(sd for sd in sds), **KW)
    with pytest.raises(TypeError, match=r"got a mapping \(labels 'step100', 'step200'\): pass "
                                        r"state_dicts=list\(checkpoints.values\(\)\)"):
        slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts={"step100": sds[0], "step200": sds[1]}, **KW)
    with pytest.raises(TypeError, match=r"models takes a list of checkpoints, got a mapping of tensors \(one state "
                                        r"dict\): pass models=\[state_dict\]"):
        slt.estimate_llc(model, (X, Y), F.mse_loss, models=sds[0], **KW)
    with pytest.raises(ValueError, match=r"data is a sequence holding one mapping.*pass the mapping itself"):
        slt.estimate_llc(model, ({"x": X, "y": Y},), F.mse_loss, **KW)


class Tied(nn.Module):
    """An autoencoder whose decoder reuses the encoder's weight (one tensor, two names)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 3, bias=False)
        self.dec = nn.Linear(3, 3)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(self.enc(x))


def test_a_checkpoint_that_would_mix_in_the_templates_state_is_refused_by_name():
    """A parameters-only dict of a BatchNorm network ran with the template's running statistics (L(w*)
    75 against 0.26 in the probe), and a checkpoint giving a tied weight two values ran with the first
    while load_state_dict keeps the last — both silently.  Now both are refused by name, extra entries
    warn, and a tied weight given under its second name only is read (as load_state_dict reads it)."""
    X = torch.randn(200, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    Y = X[:, :2].clone()
    torch.manual_seed(0)
    bn = BNNet().to(F64).eval()
    params_only = {n: p.detach() for n, p in bn.named_parameters()}
    with pytest.raises(ValueError, match=r"checkpoint 0 lacks the model's buffers norm.running_mean, "
                                         r"norm.running_var.*full state_dict\(\)"):
        slt.estimate_llc(bn, (X, Y), F.mse_loss, state_dicts=[params_only], **KW)
    # an entry of a module the model has (a buffer an older version saved, as GPT-2's attn.masked_bias): a warning
    with pytest.warns(RuntimeWarning, match=r"checkpoint 0 has entries the model does not have \(norm.old_stat\)") as rec:
        slt.estimate_llc(bn, (X, Y), F.mse_loss, state_dicts=[{**bn.state_dict(), "norm.old_stat": X[:2]}], **KW)
    said = [str(w.message) for w in rec if "entries the model does not have" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("slt.estimate_llc: ")  # once per call, naming it

    # a checkpoint of another architecture (one more layer) ran as the template's, its extra layer dropped
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    big = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 2)).to(F64)
    with pytest.raises(ValueError, match=r"checkpoint 0 holds tensors of modules the model does not have "
                                         r"\(4.weight, 4.bias\): it is the checkpoint of another architecture"):
        slt.estimate_llc(small, (X, Y), F.mse_loss, state_dicts=[big.state_dict()], **KW)
    with pytest.raises(ValueError, match=r"checkpoint 1 \(Sequential\) is not the architecture of the template "
                                         r"\(Sequential, .*\): it has 4.weight, 4.bias, which the model does not"):
        slt.estimate_llc([small, big], (X, Y), F.mse_loss, **KW)
    wide = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    with pytest.raises(ValueError, match=r"shapes differ: 0.weight \(5, 3\) vs \(4, 3\)"):
        slt.estimate_llc([small, wide], (X, Y), F.mse_loss, **KW)
    # the same tensors in other modules: the run evaluated every checkpoint with the template's forward, silently
    # (helper 35: a subclass with its own forward read the template's L(w*) and λ̂ bit for bit)
    relu = copy.deepcopy(small)
    relu[1] = nn.ReLU()
    with pytest.raises(ValueError, match=r"checkpoint 1 is not made of the template's modules \(1: ReLU where the "
                                         r"template has Tanh\); a batched run evaluates every checkpoint with the "
                                         r"template's forward"):
        slt.estimate_llc([small, relu], (X, Y), F.mse_loss, **KW)

    class Sub(nn.Sequential):
        def forward(self, x):
            return super().forward(2 * x)

    with pytest.raises(ValueError, match=r"\(the module itself: Sub where the template has Sequential\)"):
        slt.estimate_llc([small, Sub(*copy.deepcopy(list(small)))], (X, Y), F.mse_loss, **KW)

    class Flag(nn.Module):
        def __init__(self, act="tanh"):
            super().__init__()
            self.act, self.lin = act, nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(torch.tanh(x) if self.act == "tanh" else torch.relu(x))

    f0 = Flag().to(F64)
    f1 = copy.deepcopy(f0)
    f1.act = "relu"
    f2 = copy.deepcopy(f1)
    with pytest.warns(RuntimeWarning, match=r"checkpoints 1, 2 differ from the template in attributes \(act = 'relu' "
                                            r"against the template's 'tanh'\)") as rec:
        slt.estimate_llc([f0, f1, f2], (X, Y), F.mse_loss, **KW)
    assert len([w for w in rec if "differ from the template in attributes" in str(w.message)]) == 1  # one, merged
    f3 = copy.deepcopy(f0)
    f3.steps, f3.lr_used = 800, 5e-3  # numbers a training loop keeps on a module: not compared (helper 36)
    f0.steps, f0.lr_used = 300, 1e-2
    with warnings.catch_warnings(record=True) as rec:  # the same module twice: nothing to say
        warnings.simplefilter("always")
        slt.estimate_llc([f0, copy.deepcopy(f0), f3], (X, Y), F.mse_loss, **KW)
    assert not [w for w in rec if "from the template in attributes" in str(w.message)]
    leaky = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.01), nn.Linear(4, 2)).to(F64)
    steep = copy.deepcopy(leaky)
    steep[1].negative_slope = 0.2  # a hyperparameter of PyTorch's own module: compared as a number
    with pytest.warns(RuntimeWarning, match=r"checkpoint 1 differs from the template in attributes \(1.negative_slope = "
                                            r"0.2 against the template's 0.01\)"):
        slt.estimate_llc([leaky, steep], (X, Y), F.mse_loss, **KW)

    tied = Tied().to(F64)
    sd = tied.state_dict()
    assert set(sd) == {"enc.weight", "dec.weight", "dec.bias"}
    (ref,) = slt.estimate_llc(tied, (X, X), F.mse_loss, state_dicts=[sd], **KW)
    with pytest.raises(ValueError, match=r"different values to 'enc.weight', 'dec.weight'.*tied"):
        slt.estimate_llc(tied, (X, X), F.mse_loss, state_dicts=[{**sd, "enc.weight": 0 * sd["enc.weight"]}], **KW)
    second = {k: v for k, v in sd.items() if k != "enc.weight"}
    (run,) = slt.estimate_llc(tied, (X, X), F.mse_loss, state_dicts=[second], **KW)
    assert torch.equal(run.loss_trace, ref.loss_trace)


def test_a_complex_buffer_stays_complex_when_the_run_casts_the_model():
    """nn.Module.to(float64) casts a complex buffer to real, dropping its imaginary part: a float32 model
    computing (fc(x)·phase·conj(phase)).real = fc(x) ran as another function under dtype=float64 (and
    nuts_llc, float64 by default), L(w*) 0.47 against 0.25.  The run's copy keeps it complex."""

    class Phased(Plain):
        def __init__(self):
            super().__init__()
            self.register_buffer("phase", torch.exp(1j * torch.tensor([0.3, -0.7])).to(torch.complex64))

        def forward(self, x):
            z = super().forward(x).to(self.phase.dtype) * self.phase
            return (z * self.phase.conj()).real

    X, Y = _data(n=100)
    torch.manual_seed(0)
    m = Phased()  # float32
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PyTorch's "Casting complex values to real discards …"
        t = prepare_target(m, (X, Y), F.mse_loss, dtype=F64)
    assert t.model.phase.dtype == torch.complex128
    expected = F.mse_loss(Plain.forward(m, X.float()), Y.float()).item()
    assert t.init_loss.item() == pytest.approx(expected, rel=1e-5)


def test_checkpoint_files_and_training_checkpoints_load(tmp_path):
    """Checkpoints as researchers save them: a file path (read with weights_only=True), a training
    checkpoint holding the state dict under one key with the optimizer beside it, a Lightning-style
    "model." prefix; each is the plain state dict's run exactly.  Ambiguous or empty checkpoints,
    pickled modules and missing files are named before sampling."""
    X, Y = _data()
    model = _plain_model()
    sd = model.state_dict()
    (ref,) = slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[sd], **KW)
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"model": sd, "optimizer": torch.optim.Adam(model.parameters()).state_dict(), "step": 7},
               tmp_path / "train.pt")
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 1}, tmp_path / "lightning.ckpt")
    for ck in [tmp_path / "plain.pt", str(tmp_path / "train.pt"), tmp_path / "lightning.ckpt",
               torch.load(tmp_path / "train.pt")]:
        (run,) = slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[ck], **KW)
        assert torch.equal(run.loss_trace, ref.loss_trace), ck
    (run,) = slt.estimate_llc(model, (X, Y), F.mse_loss, models=[tmp_path / "plain.pt"], **KW)
    assert torch.equal(run.loss_trace, ref.loss_trace)
    assert run.config["checkpoint_file"] == str(tmp_path / "plain.pt") and "checkpoint_file" not in ref.config
    both = slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[sd, tmp_path / "plain.pt"], **KW)
    assert [r.config["checkpoint_file"] for r in both] == [None, str(tmp_path / "plain.pt")]
    torch.save(model, tmp_path / "module.pt")
    for bad, err, match in [
        (tmp_path / "module.pt", ValueError, "weights_only=True.*torch.load\\(path, weights_only=False\\)"),
        (tmp_path / "missing.pt", FileNotFoundError, "checkpoint 0: no such file"),
        ({"model": sd, "ema": sd}, ValueError, "under several keys \\('model', 'ema'\\)"),
        ({"step": torch.tensor(3)}, ValueError, "none of the model's parameters .* keys are 'step'"),
        (3, TypeError, "checkpoint 0 is a int"),
    ]:
        with pytest.raises(err, match=match):
            slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[bad], **KW)



def test_safetensors_files_and_hugging_face_checkpoint_directories_load(tmp_path):
    """A ``.safetensors`` file, a Hugging Face checkpoint directory (``save_pretrained``, a Trainer's
    ``checkpoint-500/``: ``model.safetensors`` or ``pytorch_model.bin``) and a sharded one (an index's
    ``weight_map`` over several files) give the in-memory state dict's run exactly; a directory without
    weights is named with what it holds."""
    st = pytest.importorskip("safetensors.torch")
    import json

    X, Y = _data()
    model = _plain_model()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    (ref,) = slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[sd], **KW)
    st.save_file(sd, tmp_path / "weights.safetensors")
    (tmp_path / "checkpoint-500").mkdir()
    st.save_file(sd, tmp_path / "checkpoint-500" / "model.safetensors")
    (tmp_path / "bin").mkdir()
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, keys in halves.items():
        st.save_file({k: sd[k] for k in keys}, sharded / f)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    for ck in [tmp_path / "weights.safetensors", tmp_path / "checkpoint-500", str(tmp_path / "bin"), sharded]:
        (run,) = slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[ck], **KW)
        assert torch.equal(run.loss_trace, ref.loss_trace), ck
        assert run.config["checkpoint_file"] == str(ck)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"checkpoint 0: the directory .*empty' holds none of "
                                                r"model.safetensors, pytorch_model.bin.*it has config.json"):
        slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[tmp_path / "empty"], **KW)
    with pytest.raises(FileNotFoundError, match="checkpoint 0: no such file"):
        slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[tmp_path / "missing.safetensors"], **KW)

class LoraLinear(nn.Module):
    """PEFT's layout of a LoRA layer: a frozen ``base_layer`` and adapters ``lora_A.<name>``, ``lora_B.<name>``."""

    def __init__(self, d_in, d_out, r=2):
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False)})

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class PeftLike(nn.Module):
    """A PEFT model as slt sees it: ``peft_config`` names the adapters; only they are trainable."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # test-side only
        self.peft_config = {"default": None}
        self.l1, self.l2 = LoraLinear(3, 4), LoraLinear(4, 2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def test_saved_peft_adapters_load_as_checkpoints(tmp_path):
    """``save_pretrained`` writes a PEFT model's adapters to ``adapter_model.safetensors`` keyed without the
    adapter's name (``l1.lora_A.weight`` for the parameter ``l1.lora_A.default.weight``): a checkpoint
    directory or state dict of adapters alone gives the run of the in-memory state dict."""
    st = pytest.importorskip("safetensors.torch")
    X, Y = _data()
    model = PeftLike().to(F64)
    adapters = {k: v.detach().clone().add_(0.01) for k, v in model.state_dict().items() if "lora" in k}
    (ref,) = slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[adapters], **KW)
    saved = {k.replace(".default.", "."): v.contiguous() for k, v in adapters.items()}
    (tmp_path / "checkpoint-500").mkdir()
    st.save_file(saved, tmp_path / "checkpoint-500" / "adapter_model.safetensors")
    for ck in (saved, tmp_path / "checkpoint-500"):
        (run,) = slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[ck], **KW)
        assert torch.equal(run.loss_trace, ref.loss_trace)
    (plain,) = slt.estimate_llc(model, (X, Y), F.mse_loss, state_dicts=[model.state_dict()], **KW)
    assert not torch.equal(plain.loss_trace, ref.loss_trace)  # the saved adapters were read, not the model's


def test_a_dataset_of_several_inputs_names_the_mapping_form():
    """TensorDataset(A, B, Y) for forward(self, a, b) is read as (x, y, weights): the error says so and
    shows the mapping form, whether Y made invalid weights or the call lacked its second input."""
    X, Y = _data()
    model = _two()
    for y, match in [(X[:, 0] - 5.0, "non-negative.*read as \\(x, y, weights\\)"),
                     (X[:, 0].abs(), "missing 1 required positional argument.*\\{'x1': X1, 'x2': X2\\}")]:
        with pytest.raises(ValueError, match=match):
            slt.estimate_llc(model, torch.utils.data.TensorDataset(X[:, :2], X[:, 2:], y), F.mse_loss, **KW)
    run = slt.estimate_llc(model, ({"a": X[:, :2], "b": X[:, 2:]}, Y), F.mse_loss, **KW)
    assert torch.isfinite(run.loss_trace).all()
    # integer labels as the third field (TensorDataset(input_ids, attention_mask, labels)) are named as weights
    labels = (X[:, 0] > 0).long()
    with pytest.warns(RuntimeWarning, match=r"third field \(torch.int64\) is taken as the samples' weights"):
        with pytest.raises(ValueError):
            slt.estimate_llc(model, torch.utils.data.TensorDataset(X[:, :2], X[:, 2:], labels), F.mse_loss, **KW)
    # the same tensors as a plain triple were weighted by the groups silently (a third of the rows at weight 0)
    group = torch.arange(X.shape[0]) % 3
    for triple in [(X, Y, group), (X.numpy(), Y.numpy(), group.numpy())]:
        with pytest.warns(RuntimeWarning, match=r"data as a triple is read as \(x, y, weights\), and its third field "
                                                r"\((torch.)?int64\) is taken as the samples' weights"):
            slt.estimate_llc(_plain_model(), triple, F.mse_loss, **KW)
    with warnings.catch_warnings(record=True) as caught:  # float weights say what they are
        warnings.simplefilter("always")
        slt.estimate_llc(_plain_model(), (X, Y, group.to(F64) + 1), F.mse_loss, **KW)
    assert not [w for w in caught if "third field" in str(w.message)]
    with pytest.raises(ValueError, match=r"weights must be a 1-D tensor of length n=\d+, got \(\d+, 1\) \(a dataset "
                                         r"or batch of three fields is read as \(x, y, weights\)"):
        slt.estimate_llc(model, torch.utils.data.TensorDataset(X[:, :2], X[:, 2:], X[:, :1].abs()), F.mse_loss, **KW)


def test_a_model_frozen_for_evaluation_is_refused_with_the_fix():
    X, Y = _data()
    model = _plain_model().requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameters that require grad: nothing to sample \(all 4 are frozen.*"
                                         r"model.requires_grad_\(True\)"):
        slt.estimate_llc(model, (X, Y), F.mse_loss, **KW)


def test_torchscript_and_uninitialized_lazy_modules_are_refused_by_name():
    X, Y = _data()
    with pytest.raises(TypeError, match="TorchScript module.*pass the original nn.Module"):
        slt.estimate_llc(torch.jit.script(_plain_model()), (X, Y), F.mse_loss, **KW)
    lazy = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    with pytest.raises(ValueError, match=r"uninitialized lazy parameters \(0.weight, 0.bias.*model\(x\)"):
        slt.estimate_llc(lazy, (X, Y), F.mse_loss, **KW)
    lazy(X[:2])  # the first forward pass sets the shapes: then it is an ordinary model
    slt.estimate_llc(lazy, (X, Y), F.mse_loss, **KW)


def test_warnings_point_at_the_users_call():
    """slt's warnings are raised at various depths (set-up notes, run diagnostics, one-at-a-time
    checkpoints, through the inference-mode wrapper); each points at the line that called slt."""
    X, _ = _data(n=100)
    with pytest.warns(RuntimeWarning) as rec:
        slt.estimate_llc(NoisyNet().to(F64), (X, X[:, :2]), F.mse_loss, **KW)  # a set-up note and run warnings
    assert rec and all(w.filename == __file__ for w in rec), {(w.filename, str(w.message)[:40]) for w in rec}


def test_inference_mode_and_inference_tensors():
    """Called from an evaluation script's ``with torch.inference_mode():`` the run failed with "the loss
    does not require grad ... torch.no_grad()" (misleading); data made under inference mode failed in
    autograd ("Inference tensors cannot be saved for backward").  Both now give the plain run."""
    X, Y = _data()
    model = _plain_model()
    ref = slt.estimate_llc(model, (X, Y), F.mse_loss, **KW)
    for ctx in (torch.no_grad, torch.inference_mode):
        for v in ("vmap", "loop"):
            with ctx():
                r = slt.estimate_llc(model, (X, Y), F.mse_loss, **{**KW, "vectorize": v})
            assert torch.allclose(r.loss_trace, ref.loss_trace, rtol=0, atol=_trace_tol(model, X, Y, ref)), (ctx, v)
    with torch.inference_mode():
        Xi, Yi = X.clone(), Y.clone()
    assert Xi.is_inference()
    r = slt.estimate_llc(model, (Xi, Yi), F.mse_loss, **KW)
    assert torch.equal(r.loss_trace, ref.loss_trace)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xi, Yi), batch_size=32)
    slt.estimate_llc(model, loader, F.mse_loss, **{**KW, "batch_size": None})
    with torch.inference_mode():
        b = slt.bif(model, (X[:40], Y[:40]), F.mse_loss, **{**KW, "batch_size": None})
    assert b.values.shape == (40, 40)


# ----------------------------------------------------------------------------
# the run's dtype follows the model's
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("model_dtype, expected", [(torch.float32, torch.float32), (F64, F64),
                                                   (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_the_run_computes_in_the_models_precision(model_dtype, expected):
    X, Y = _data()
    model = _plain_model().to(model_dtype)
    kw = {k: v for k, v in KW.items() if k != "dtype"}
    r = slt.estimate_llc(model, (X, Y), F.mse_loss, **kw)
    assert r.config["dtype"] == str(expected).replace("torch.", "")
    assert r.loss_trace.dtype == expected and math.isfinite(r.llc_mean)
    assert next(model.parameters()).dtype == model_dtype  # the user's module is never converted
    notes = r.config.get("setup_notes") or []
    half = model_dtype in (torch.bfloat16, torch.float16)
    assert any("sampled in float32" in n and str(model_dtype).replace("torch.", "") in n for n in notes) == half
    # the same job with the run's dtype given explicitly is the same computation
    same = slt.estimate_llc(model, (X, Y), F.mse_loss, **kw, dtype=expected)
    assert torch.equal(same.loss_trace, r.loss_trace)


def test_a_loss_in_another_precision_than_the_run():
    """A loss computed in float32 in a float64 run (Hugging Face casts logits to float32 for its own
    loss) on every path, restrictions included (their blocked vmap path crashed in index_copy_)."""
    X, Y = _data()
    model = _plain_model()
    loss32 = lambda o, y: F.mse_loss(o.float(), y.float())  # noqa: E731
    for restrict in (None, {"a": "l1.*", "b": "l2.*"}):
        for vec in ("vmap", "loop"):
            r = slt.estimate_llc(model, (X, Y), loss32, restrict_to=restrict, **{**KW, "vectorize": vec})
            for res in (r.values() if isinstance(r, dict) else [r]):
                assert torch.isfinite(res.loss_trace).all() and res.loss_trace.dtype == F64


def test_an_explicit_dtype_overrides_the_models():
    X, Y = _data()
    kw = {k: v for k, v in KW.items() if k != "dtype"}
    r = slt.estimate_llc(_plain_model().to(F64), (X, Y), F.mse_loss, **kw, dtype=torch.float32)
    assert r.config["dtype"] == "float32" and r.loss_trace.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        slt.estimate_llc(_plain_model(), (X, Y), F.mse_loss, **kw, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------
# clear errors before sampling
# ----------------------------------------------------------------------------
SMALL = dict(num_chains=2, num_draws=5, step_size=1e-4, progress=False)


def _cls_data(n=50):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("labels, loss, match", [
    (lambda y: y.float(), F.cross_entropy,
     r"loss_fn failed on the first 2 samples of the data: model output tensor \(2, 4\) float32, target tensor "
     r"\(2,\) float32: RuntimeError: .*cross_entropy needs integer class indices of shape \(2,\)"),
    (lambda y: y[:, None], F.cross_entropy, r"target tensor \(2, 1\) int64.*needs integer class indices"),
    (lambda y: F.one_hot(y, 4), nn.CrossEntropyLoss(), r"target tensor \(2, 4\) int64: RuntimeError.*CrossEntropyLoss"),
    (lambda y: y[:40], F.cross_entropy, "x and y disagree on the number of samples: 50 vs 40"),
    (lambda y: y.numpy().astype(np.int32), F.cross_entropy,  # NumPy's default integer on Windows
     r"target tensor \(2,\) int32: RuntimeError.*cross_entropy needs class indices as int64: .*y.long\(\)"),
    (lambda y: y, lambda out, y: F.cross_entropy(y, out),  # the arguments the other way round
     r"not implemented for 'Long' \(an operation that needs floats got integers.*F.cross_entropy\(output, target\)"),
    (lambda y: F.one_hot(y, 4), F.binary_cross_entropy_with_logits,
     r"binary_cross_entropy_with_logits needs float targets .*y.float\(\)"),
])
def test_label_mistakes_name_shapes_and_dtypes(labels, loss, match):
    X, y = _cls_data()
    with pytest.raises(ValueError, match=match):
        slt.estimate_llc(nn.Linear(3, 4), (X, labels(y)), loss, **SMALL)


class TupleAux(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 4)

    def forward(self, x):
        h = self.l(x)
        return h, h.square().mean()  # (logits, auxiliary loss), as mixture-of-experts layers return


class DictAux(TupleAux):
    def forward(self, x):
        h, aux = super().forward(x)
        return {"aux": aux, "logits": h}


@pytest.mark.parametrize("model, fix", [(TupleAux, r"lambda out, y: loss\(out\[0\], y\)"),
                                        (DictAux, r"lambda out, y: loss\(out\['logits'\], y\)")])
def test_a_loss_given_a_structured_output_names_the_element_to_take(model, fix):
    X, y = _cls_data()
    with pytest.raises(ValueError, match=r"must be Tensor.*the model returns a (tuple|dict): take the prediction in "
                                         r"the loss, e\.g\. " + fix):
        slt.estimate_llc(model(), (X, y), F.cross_entropy, **SMALL)


class LossOnlyWithTargets(nn.Module):
    """nanoGPT's forward(idx, targets=None): every position's logits and the loss with targets, the last
    position's logits and loss=None without."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 8)

    def forward(self, idx, targets=None):
        h = self.emb(idx)
        if targets is None:
            return self.head(h[:, [-1], :]), None
        logits = self.head(h)
        return logits, F.cross_entropy(logits.reshape(-1, 8), targets.reshape(-1))


def test_an_output_with_none_names_the_mapping_that_passes_the_missing_input():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, 8, (40, 6), generator=g), torch.randint(0, 8, (40, 6), generator=g)
    model = LossOnlyWithTargets()
    with pytest.raises(ValueError, match=r"element 1 of the output is None.*nanoGPT.*data = \{'idx': X, 'targets': Y\} "
                                         r"and loss_fn = lambda out, _: out\[1\]"):
        slt.estimate_llc(model, (X, Y), lambda out, y: F.cross_entropy(out[0].reshape(-1, 8), y.reshape(-1)), **SMALL)
    r = slt.estimate_llc(model, {"idx": X, "targets": Y}, lambda out, _: out[1], **SMALL)  # the fix it names runs
    assert math.isfinite(r.llc_mean)


def test_elementwise_loss_with_a_broadcasting_target_is_refused():
    X, _ = _cls_data()
    with pytest.raises(ValueError, match=r"mse_loss: the model's output and the target have different shapes .*"
                                         r"output tensor \(2, 1\) float32, target tensor \(2,\) float32.*"
                                         r"Y.reshape\(n, 1\)"):
        slt.estimate_llc(nn.Linear(3, 1), (X, torch.randn(50)), F.mse_loss, **SMALL)


@pytest.mark.parametrize("loss", [lambda o, t: F.mse_loss(o, t), functools.partial(F.mse_loss), nn.HuberLoss(),
                                  F.smooth_l1_loss, lambda o, t: ((o - t) ** 2).mean()],
                         ids=["lambda", "partial", "huber", "smooth_l1", "by hand"])
def test_a_broadcasting_loss_under_any_name_is_refused(loss):
    """An (n, 1) output against an (n,) target broadcasts to (n, n) whatever the loss is called: PyTorch's
    warning, the name inside a partial, or (a loss by hand) the per-sample check with the trailing 1 names it.
    Before, a lambda around F.mse_loss gave λ̂ = -27.8 where the right one is 1.19."""
    X, _ = _cls_data()
    with pytest.raises(ValueError, match=r"(output and the target have different shapes|differ by a trailing 1)"
                                         r".*(Y.reshape\(n, 1\)|Y.reshape\(-1, 1\))"):
        slt.estimate_llc(nn.Linear(3, 1), (X, torch.randn(50)), loss, **SMALL)
    ok = slt.estimate_llc(nn.Linear(3, 1), (X, torch.randn(50)), lambda o, t: F.mse_loss(o.squeeze(-1), t), **SMALL)
    assert ok.llc_mean == ok.llc_mean


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(reduction="sum"),
                                  lambda out, y: F.cross_entropy(out, y, reduction="sum"),
                                  lambda out, y: -out.log_softmax(-1).gather(1, y[:, None]).sum()])
def test_a_loss_summed_over_the_batch_is_refused(loss):
    """A summed loss scaled λ̂ by the batch size with no warning (an MLP: 2485 instead of 0.57)."""
    X, y = _cls_data()
    with pytest.raises(ValueError, match=r"loss_fn sums over the batch: on 2 samples it returned .*, the sum of "
                                         r"the samples' losses .*reduction='mean'"):
        slt.estimate_llc(nn.Linear(3, 4), (X, y), loss, **SMALL)


class NanoGPTStyle(nn.Module):
    """As nanoGPT / minGPT write it: ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.emb, self.hid, self.out = nn.Embedding(12, 16), nn.Linear(16, 16), nn.Linear(16, 12)
        self.reduction = reduction

    def logits(self, idx):
        return self.out(torch.tanh(self.hid(self.emb(idx))))

    def forward(self, idx, targets=None):
        lg = self.logits(idx)
        loss = None if targets is None else F.cross_entropy(lg.view(-1, 12), targets.view(-1), reduction=self.reduction)
        return lg, loss


def test_a_model_that_returns_its_own_loss_needs_no_loss_fn():
    """A model that computes its loss itself — nanoGPT's ``(logits, loss)``, or a bare 0-dim loss from
    ``forward(x, y)`` — was refused without a ``loss_fn`` ("carries no loss").  Its loss is now the default,
    followed as it is: the same chains as the explicit cross-entropy of its logits (float64 rounding),
    with nanoGPT's ``targets`` giving the control variate's per-sample form; a summed own loss is refused
    by the mean check, and a tuple with two 0-dim tensors (which is the loss?) still needs ``loss_fn``."""
    torch.manual_seed(0)  # test-side only
    m = NanoGPTStyle().to(F64)
    idx = torch.randint(0, 12, (64, 8))
    tgt = (idx + 1) % 12
    kw = {**KW, "nbeta": 20.0}
    own = slt.estimate_llc(m, {"idx": idx, "targets": tgt}, **kw)
    explicit = slt.estimate_llc(_Logits(m), (idx, tgt), lambda o, y: F.cross_entropy(o.reshape(-1, 12), y.reshape(-1)),
                                **kw)
    assert torch.allclose(own.loss_trace, explicit.loss_trace, rtol=1e-12, atol=0)
    target = slt.target.prepare_target(m, {"idx": idx, "targets": tgt})
    target.star_losses  # the control variate's per-sample losses at w*: looked up per minibatch, not a forward pass
    assert target.own_per_sample is slt.losses._own_token_ce

    class ReturnsLoss(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            return self.inner(x, y)[1]

    bare = slt.estimate_llc(ReturnsLoss(m), {"x": idx, "y": tgt}, **kw)
    assert torch.allclose(bare.loss_trace, explicit.loss_trace, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="loss_fn sums over the batch"):
        slt.estimate_llc(NanoGPTStyle("sum").to(F64), {"idx": idx, "targets": tgt}, **kw)

    class TwoScalars(NanoGPTStyle):
        def forward(self, idx, targets=None):
            lg, loss = super().forward(idx, targets)
            return lg, loss, lg.pow(2).mean()

    with pytest.raises(ValueError, match=r"loss_fn is required.*nanoGPT's \(logits, loss\)"):
        slt.estimate_llc(TwoScalars().to(F64), {"idx": idx, "targets": tgt}, **kw)
    # the targets passed positionally (data = (X, Y)): the model never sees them, and the message says how
    with pytest.raises(ValueError, match=r"loss_fn is required.*forward\(x, y=None\)\) gets them by keyword "
                                         r"from a mapping: data = \{'x': X, 'y': Y\}"):
        slt.estimate_llc(NanoGPTStyle().to(F64), (idx, tgt), **kw)


class _Logits(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx):
        return self.inner.logits(idx)


def test_a_hugging_face_models_own_summed_loss_names_its_config_setting():
    """Wav2Vec2ForCTC's own loss sums over the batch by default (ctc_loss_reduction='sum'): the error names
    the config setting to change, and with it changed the run goes ahead."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.Wav2Vec2Config(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4),
                            num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, pad_token_id=0,
                            feat_extract_norm="layer", do_stable_layer_norm=True)
    model = tf.Wav2Vec2ForCTC(cfg).eval()
    data = {"input_values": torch.randn(8, 800), "labels": torch.randint(1, 10, (8, 3))}
    with pytest.raises(ValueError, match=r"sums over the batch.*own loss sums as its config says "
                                         r"\(ctc_loss_reduction='sum'\): "
                                         r"set model\.config\.ctc_loss_reduction = 'mean'"):
        slt.estimate_llc(model, data, **SMALL)
    model.config.ctc_loss_reduction = "mean"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isfinite(slt.estimate_llc(model, data, **SMALL).llc_mean)


@pytest.mark.parametrize("value", [True, 3, None, torch.tensor(True)])
def test_a_constant_keyword_in_a_mapping_names_the_partial_that_passes_it(value):
    """``{"input_ids": ..., "return_loss": True}`` (CLIP): a mapping's entries are columns of samples; a keyword
    the same for every call is named with the fix, before any call to the model."""
    X, _ = _cls_data()
    shown = repr(value.item() if isinstance(value, torch.Tensor) else value)
    with pytest.raises(TypeError, match=rf"x\['flag'\] is .*\({shown}\), not a column of samples.*"
                                        rf"functools\.partial\(model\.forward, flag={shown}\)"):
        slt.estimate_llc(nn.Linear(3, 4), {"input": X, "flag": value}, lambda out, _: out.square().mean(), **SMALL)


def test_losses_that_average_or_couple_samples_pass_the_reduction_check():
    X, y = _cls_data()
    slt.estimate_llc(nn.Linear(3, 4), (X, y), lambda out, t: F.cross_entropy(out, t, reduction="sum") / len(t),
                     **SMALL)
    # a loss that couples the samples (centred logits): neither sum nor mean of single-sample losses
    slt.estimate_llc(nn.Linear(3, 4), (X, y), lambda out, t: F.cross_entropy(out - out.mean(0), t), **SMALL)
    # a sum over output dimensions, mean over samples: fine
    Xr, Yr = _data(n=60)
    slt.estimate_llc(nn.Linear(3, 2).to(F64), (Xr, Yr), lambda out, t: ((out - t) ** 2).sum(-1).mean(), **KW)


def test_a_loss_that_is_nan_at_w_star_names_the_output():
    """It used to surface as "the per-sample form of loss_fn does not average to loss_fn: nan vs nan"."""
    X, _ = _cls_data()

    class LogOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 1)
            with torch.no_grad():
                self.l.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
                self.l.bias.zero_()

        def forward(self, x):
            return {"pred": torch.log(self.l(x)).squeeze(-1)}  # NaN where x[:, 0] < 0

    y = torch.randn(50)
    X[0, 0], X[1, 0] = -1.0, 2.0
    with pytest.raises(ValueError, match=r"the loss at w\* is NaN or inf \(nan\) on the first 2 samples of the data: 1 of the "
                                         r"model's 2 output values are NaN or inf; model output dict\{'pred'"):
        slt.estimate_llc(LogOut(), (X, y), lambda out, t: F.mse_loss(out["pred"], t), **SMALL)
    with pytest.raises(ValueError, match=r"the model's output is finite: the loss makes it NaN or inf"):
        slt.estimate_llc(nn.Linear(3, 1), (X, y[:, None]), lambda out, t: F.mse_loss(out, t) / 0.0 * 0.0, **SMALL)


def test_model_and_loss_errors_show_the_real_exception():
    X, y = _cls_data()
    with pytest.raises(ValueError, match=r"the model failed on a batch of the data \(model\(x\) with x of shape "
                                         r"\(2, 3\)\): RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        slt.estimate_llc(nn.Linear(5, 1), (X, y), F.cross_entropy, **SMALL)
    with pytest.raises(ValueError, match=r"model\(\*\*inputs\) with inputs dict\{'input_ids': tensor \(2, 3\) "
                                         r"float32\}\): TypeError: .*unexpected keyword argument 'input_ids'.*"
                                         r"select_columns"):
        slt.estimate_llc(nn.Linear(3, 1), {"input_ids": X}, F.mse_loss, **SMALL)

    class ClassifierOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 4)

        def forward(self, x):
            return {"logits": self.l(x), "cache": object()}

    with pytest.raises(ValueError, match=r"model output dict\{'logits': tensor \(2, 4\) float32, 'cache': object\}"
                                         r", target tensor \(2,\) int64: TypeError"):
        slt.estimate_llc(ClassifierOutput(), (X, y), F.cross_entropy, **SMALL)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar .*got \(2, 4\): average it over the batch"):
        slt.estimate_llc(nn.Linear(3, 4), (X, y), lambda o, t: o, **SMALL)
    for loss, fix in [(lambda o, t: F.cross_entropy(o, t).reshape(1), r"got \(1,\): reduce it to a 0-d tensor"),
                      (lambda o, t: (F.cross_entropy(o, t), {"acc": 0.5}), r"got tuple: .*my_loss\(out, y\)\[0\]"),
                      (lambda o, t: {"loss": F.cross_entropy(o, t)}, r"got dict: .*my_loss\(out, y\)\['loss'\]"),
                      (lambda o, t: F.cross_entropy(o, t).item(), r"got float: return the tensor itself"),
                      (lambda o, t: torch.stack([F.cross_entropy(o, t), o.pow(2).mean()]),
                       r"got \(2,\): its first dimension does not follow the batch size .*\(\.sum\(\)\)"),
                      (lambda o, t: {"ce": F.cross_entropy(o, t), "l2": o.pow(2).mean()},
                       r"got dict: a mapping of 2 entries \('ce', 'l2'\): .*sum\(my_loss\(out, y\)\.values\(\)\)")]:
        with pytest.raises(ValueError, match=fix):
            slt.estimate_llc(nn.Linear(3, 4), (X, y), loss, **SMALL)


def test_bad_parameters_data_and_arrays_are_named():
    X, y = _cls_data()
    m = nn.Linear(3, 4)
    with torch.no_grad():
        m.bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"the checkpoint parameters contain NaN or inf \(checkpoint 0: 'bias'\)"):
        slt.estimate_llc(m, (X, y), F.cross_entropy, **SMALL)
    m = nn.Linear(3, 4)
    m.weight.requires_grad_(False)
    with torch.no_grad():
        m.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"the model's frozen parameters contain NaN or inf \(weight\)"):
        slt.estimate_llc(m, (X, y), F.cross_entropy, **SMALL)
    with pytest.raises(ValueError, match="empty dataset: x has 0 samples"):
        slt.estimate_llc(nn.Linear(3, 4), {"a": X[:0]}, F.cross_entropy, **SMALL)
    with pytest.raises(ValueError, match=r"x\['a'\] contains NaN or inf at 1 sample"):
        slt.estimate_llc(nn.Linear(3, 4), {"a": X.numpy() * np.where(np.arange(50) == 3, np.nan, 1)[:, None]},
                         F.cross_entropy, **SMALL)
    with pytest.raises(ValueError, match="NumPy array of dtype object.*pad them"):
        Data(np.array([np.zeros(2), np.zeros(3)], dtype=object))
    with pytest.raises(TypeError, match=r"x is a tuple of 2 tensors: a model with several inputs takes them as a "
                                        r"mapping.*model\(\*\*inputs\)"):
        slt.estimate_llc(nn.Linear(3, 4), ((X, X), y), F.cross_entropy, **SMALL)
    # the same model's data as a list of samples ((x1, x2), y): named too (it read "got 50 items of type tuple")
    with pytest.raises(ValueError, match=r"each sample's input is a tuple of 2 tensors: a model with several inputs"):
        slt.estimate_llc(nn.Linear(3, 4), [((a, a), b) for a, b in zip(X, y)], F.cross_entropy, **SMALL)


class ComplexWeight(nn.Module):
    def __init__(self, real_view: bool):
        super().__init__()
        self.real_view = real_view
        w = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0)) * 0.3
        self.w = nn.Parameter(w if real_view else torch.view_as_complex(w).clone())

    def forward(self, x):
        w = torch.view_as_complex(self.w) if self.real_view else self.w
        return (x.to(w.dtype) @ w).abs()


def test_a_complex_parameter_is_refused_with_the_real_view_that_works():
    """A complex parameter used to be cast to real (PyTorch: "discards the imaginary part") and then
    failed inside the model with a dtype mismatch; it is refused by name before sampling, and the
    real-view form the message suggests runs on both paths alike."""
    X, y = _cls_data()
    with pytest.raises(ValueError, match=r"parameter 'w' is complex \(torch.complex64\).*shape \(3, 4, 2\).*"
                                         r"torch.view_as_complex"):
        slt.estimate_llc(ComplexWeight(False), (X, y), F.cross_entropy, **SMALL)
    vm, lp = (slt.estimate_llc(ComplexWeight(True), (X, y), F.cross_entropy, vectorize=v, **SMALL)
              for v in ("vmap", "loop"))
    assert np.isfinite(vm.llc_mean)
    torch.testing.assert_close(torch.as_tensor(vm.loss_trace), torch.as_tensor(lp.loss_trace))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap has no rule for aten::_weight_norm
def test_parametrized_weights_sample_their_originals_on_both_paths():
    """weight_norm / orthogonal / spectral_norm (torch.nn.utils.parametrizations): the chains move the
    ``original*`` tensors and the weight is recomputed from them in every call; both paths agree."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)  # test-side only
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(),
                          parametrizations.orthogonal(nn.Linear(4, 4)), nn.Tanh(),
                          parametrizations.spectral_norm(nn.Linear(4, 4))).eval()
    X, y = _cls_data()
    spec = ParamSpec(model)
    assert "0.parametrizations.weight.original0" in spec.names and "2.parametrizations.weight.original" in spec.names
    kw = {**SMALL, "num_draws": 10, "localization": 100.0, "nbeta": 20.0}
    vm, lp = (slt.estimate_llc(model, (X, y), F.cross_entropy, vectorize=v, **kw) for v in ("vmap", "loop"))
    assert vm.diagnostics["path"] == "vmap" and np.isfinite(vm.llc_mean)
    torch.testing.assert_close(torch.as_tensor(vm.loss_trace), torch.as_tensor(lp.loss_trace))
    assert float(np.ptp(np.asarray(vm.loss_trace))) > 0  # the chains moved the weights


# ----------------------------------------------------------------------------
# train-mode notes
# ----------------------------------------------------------------------------
class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 8)
        self.drop = nn.Dropout(0.2)
        self.l2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.l2(self.drop(torch.tanh(self.l1(x))))


class FunctionalDrop(Plain):
    """Dropout by rate attribute in forward, as Hugging Face attention does."""

    def __init__(self):
        super().__init__()
        self.attention_dropout = 0.1

    def forward(self, x):
        return F.dropout(super().forward(x), p=self.attention_dropout, training=self.training)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.l2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.l2(self.norm(self.l1(x)))


class FrozenFirst(nn.Module):
    """A frozen first layer (a fixed feature map), then trainable layers (``mid``, optional, and ``head``)."""

    def __init__(self, width: int = 4, mid: bool = True):
        super().__init__()
        self.feat = nn.Linear(3, width).requires_grad_(False)
        self.mid = nn.Linear(width, width) if mid else nn.Identity()
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.feat(x)))))


def _bn_checkpoints(net: nn.Module) -> list[dict]:
    """Two checkpoints of a BNNet with different running statistics (and parameters)."""
    import copy

    sds = []
    for shift in (0.0, 1.5):
        with torch.no_grad():
            net.norm.running_mean.fill_(shift)
            net.norm.running_var.fill_(1.0 + shift)
            net.l1.weight.add_(0.1)
        sds.append(copy.deepcopy(net.state_dict()))
    return sds


def _single_runs(net: nn.Module, sds: list[dict], data, kw: dict, **extra) -> list:
    """Each checkpoint in its own call, with the seed it has in a batched call."""
    import copy

    out = []
    for k, sd in enumerate(sds):
        m = copy.deepcopy(net)
        m.load_state_dict(sd)
        out.append(slt.estimate_llc(m, data, F.mse_loss, **{**kw, "seed": kw["seed"] + k}, **extra))
    return out


@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_checkpoints_with_their_own_batchnorm_statistics(path):
    """An LLC curve of a BatchNorm network: each checkpoint's running statistics are its own.  A batched
    run first took every checkpoint's buffers from the template (λ̂ 1.68 instead of 2.51 on a checkpoint
    of a small classifier, silently), then ran such checkpoints one at a time; now every row of the one
    batched computation holds its checkpoint's statistics, and each result follows its single-checkpoint
    run (the same chains, to rounding: the batched kernels sum in another order)."""
    import copy

    X, Y = _data(n=120)
    torch.manual_seed(0)
    net = BNNet().to(F64)
    sds = _bn_checkpoints(net)
    net.eval()
    kw = {**KW, "seed": 5, "vectorize": path}
    batched = slt.estimate_llc(net, (X, Y), F.mse_loss, state_dicts=sds, **kw)
    singles = _single_runs(net, sds, (X, Y), kw)
    for k, (b, single) in enumerate(zip(batched, singles)):
        m = copy.deepcopy(net)
        m.load_state_dict(sds[k])
        tol = engine_trace_tol(m, F.mse_loss, X, Y, single.loss_trace, steps=25, step_size=1e-3, nbeta=50.0,
                               localization=10.0, batch_rows=32)
        torch.testing.assert_close(b.loss_trace, single.loss_trace, rtol=0, atol=tol)
        assert b.config["checkpoint"] == k and b.config["path"] == path
        assert any("norm.running_mean" in n and "each checkpoint's chains run with its own" in n
                   for n in b.config["setup_notes"])
    # the statistics matter: checkpoint 1 at checkpoint 0's statistics is another run
    assert (batched[1].loss_trace - singles[0].loss_trace).abs().max() > 1e3 * tol
    mods = []
    for sd in sds:
        mods.append(copy.deepcopy(net))
        mods[-1].load_state_dict(sd)
    as_modules = slt.estimate_llc(mods, (X, Y), F.mse_loss, **kw)
    assert all(torch.equal(a.loss_trace, b.loss_trace) for a, b in zip(as_modules, batched))
    # the Bayesian influence functions of such checkpoints, batched the same way
    bif_kw = {**kw, "num_draws": 10, "batch_size": None}
    bifs = slt.bif(mods, (X, Y), F.mse_loss, query=(X[:5], Y[:5]), **bif_kw)
    for k, m in enumerate(mods):
        one = slt.bif(m, (X, Y), F.mse_loss, query=(X[:5], Y[:5]), **{**bif_kw, "seed": kw["seed"] + k})
        scale = float(one.values.abs().max()) + 1.0
        torch.testing.assert_close(bifs[k].values, one.values, rtol=0, atol=fp_tol(F64, scale=scale, terms=10**5))
    assert (bifs[1].values - bifs[0].values).abs().max() > 1e-6
    with pytest.raises(ValueError, match=r"checkpoints differ in buffers or frozen parameters \(norm.running_mean, "
                                         r"norm.running_var\).*pass one checkpoint per call"):
        slt.prepare_target(None, (X, Y), F.mse_loss, models=mods, dtype=F64)  # a computation that cannot batch them
    target = slt.prepare_target(None, (X, Y), F.mse_loss, models=mods, dtype=F64, checkpoint_state=True)
    with pytest.raises(ValueError, match="takes one point, but the checkpoints differ in buffers"):
        target.loss(target.w_star[0])
    # the same statistics everywhere (only BatchNorm's step counter differs): no per-checkpoint buffers
    net.load_state_dict(sds[0])
    for sd in sds[1:]:
        sd["norm.running_mean"], sd["norm.running_var"] = sds[0]["norm.running_mean"], sds[0]["norm.running_var"]
        sd["norm.num_batches_tracked"] = sds[0]["norm.num_batches_tracked"] + 7
    shared = slt.estimate_llc(net, (X, Y), F.mse_loss, state_dicts=sds, **kw)
    assert not any("own" in n for n in shared[0].config["setup_notes"])


def test_checkpoints_with_their_own_frozen_parameters_and_restrictions():
    """Frozen parameters that differ between checkpoints (a fixed feature map that was itself trained
    earlier) are each checkpoint's own in the batched run, also for weight-refined LLCs (restrictions ×
    checkpoints, where rows that move only some parameters share the others, :attr:`row_plan`)."""
    import copy

    X, Y = _data(n=120)
    torch.manual_seed(1)
    net = FrozenFirst().to(F64)
    sds = []
    for _ in range(2):
        with torch.no_grad():
            net.feat.weight.mul_(1.5)
            net.head.bias.add_(0.1)
        sds.append(copy.deepcopy(net.state_dict()))
    kw = {**KW, "seed": 3, "vectorize": "vmap"}
    restrict = {"weight": "head.weight", "bias": "head.bias"}
    batched = slt.estimate_llc(net, (X, Y), F.mse_loss, state_dicts=sds, restrict_to=restrict, **kw)
    singles = _single_runs(net, sds, (X, Y), kw, restrict_to=restrict)
    for label in restrict:
        for k in range(2):
            single = singles[k][label]
            tol = fp_tol(F64, scale=float(single.loss_trace.abs().max()) + 1.0, terms=25 * 32 * 8)
            torch.testing.assert_close(batched[label][k].loss_trace, single.loss_trace, rtol=0, atol=tol)
    assert any("feat.weight" in n and "each checkpoint's chains run with its own" in n
               for n in batched["weight"][0].config["setup_notes"])
    assert (batched["weight"][1].loss_trace - singles[0]["weight"].loss_trace).abs().max() > 1e-3
    # differing tensors larger than the sampled parameters (a vmapped evaluation would gather them per row):
    # one call per checkpoint, with the seeds of a batched call
    wide = FrozenFirst(width=16, mid=False).to(F64)
    assert wide.feat.weight.numel() > sum(p.numel() for p in wide.parameters() if p.requires_grad)
    other = copy.deepcopy(wide)
    with torch.no_grad():
        other.feat.weight.mul_(2.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        runs = slt.estimate_llc(None, (X, Y), F.mse_loss, models=[wide, other], **kw)
    assert "each checkpoint was estimated in its own run" in runs[1].config["setup_notes"][0]
    # the runs' findings are grouped over the checkpoints as a batched call's are: one warning per kind
    from slt.engine import _NUMBER

    found = [str(w.message) for w in seen if str(w.message).startswith("slt.estimate_llc (checkpoint")]
    kinds = {_NUMBER.sub("#", w) for r in runs for w in r.diagnostics["warnings"]}
    assert len(found) == len(kinds) and any(m.startswith("slt.estimate_llc (checkpoints 0, 1): ") for m in found)
    alone = slt.estimate_llc(other, (X, Y), F.mse_loss, **{**kw, "seed": kw["seed"] + 1})
    assert torch.equal(runs[1].loss_trace, alone.loss_trace)


def test_train_mode_notes_name_the_modules_and_the_fix():
    assert train_mode_issues(DropNet()) == [
        "dropout active in drop: call model.eval() (dropout makes the loss random, so λ̂ is biased and vmap "
        "falls back to a loop)"]
    assert "dropout active in <model> (attention_dropout)" in train_mode_issues(FunctionalDrop())[0]
    assert train_mode_issues(nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)))[0].startswith(
        "dropout active in 1 (Dropout):")
    assert train_mode_issues(BNNet()) == ["BatchNorm in train mode in norm: call model.eval() to use the batched path"]
    assert train_mode_issues(DropNet().eval()) == [] and train_mode_issues(BNNet().eval()) == []
    assert train_mode_issues(nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.0))) == []
    assert len(train_mode_issues(nn.Sequential(BNNet(), DropNet()))) == 2


def test_instance_norm_with_running_statistics_is_not_called_batchnorm():
    """InstanceNorm with running statistics normalises each sample by its own statistics in train mode: it is
    named as what it is (not "BatchNorm", whose batch dependence makes per-sample losses undefined), and the
    per-sample methods accept it."""
    from slt.target import is_norm_train_issue

    class INet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inorm = nn.InstanceNorm1d(3, track_running_stats=True)
            self.fc = nn.Linear(4 * 3, 1)

        def forward(self, x):
            return self.fc(self.inorm(x.view(-1, 3, 4)).flatten(1))

    issues = train_mode_issues(INet())
    assert len(issues) == 1 and issues[0].startswith(
        "InstanceNorm1d with running statistics in train mode in inorm: it writes them at every forward")
    assert is_norm_train_issue(issues[0]) and is_norm_train_issue(train_mode_issues(BNNet())[0])
    assert not any(is_norm_train_issue(i) for i in train_mode_issues(DropNet()))
    assert train_mode_issues(INet().eval()) == []
    torch.manual_seed(0)
    X, Y = torch.randn(24, 12), torch.randn(24, 1)
    with pytest.warns(RuntimeWarning, match="slt.bif: InstanceNorm1d with running statistics in train mode"):
        r = slt.bif(INet(), (X[:16], Y[:16]), F.mse_loss, query=(X[16:], Y[16:]), num_chains=2, num_draws=20,
                    step_size=1e-4, num_burnin=0, nbeta=10.0, seed=0)
    assert r.values.shape == (16, 8) and torch.isfinite(r.values).all()


def test_dropout_warns_once_with_the_fix_and_records_it():
    X, Y = _data(n=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = prepare_target(DropNet(), (X, Y), F.mse_loss, caller="slt.estimate_llc")
    notes = [str(w.message) for w in caught if "dropout active" in str(w.message)]
    assert notes == ["slt.estimate_llc: dropout active in drop: call model.eval() (dropout makes the loss random, "
                     "so λ̂ is biased and vmap falls back to a loop)"]
    fallback = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(fallback) == 1 and "randomness" in fallback[0] and "dropout is active: call model.eval()" in fallback[0]
    assert t.path == "loop" and t.issues == [notes[0].removeprefix("slt.estimate_llc: ")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in eval mode: no note, the batched path
        t = prepare_target(DropNet().eval(), (X, Y), F.mse_loss)
    assert t.issues == [] and t.path == "vmap"


class NoisyNet(Plain):
    """Noise drawn in forward whatever the mode (MC dropout written with F.dropout(training=True))."""

    def forward(self, x):
        return F.dropout(super().forward(x), 0.3, training=True)


class ReadsData(Plain):
    """Scales by its weight's norm read through ``.data`` (a habit from older PyTorch code)."""

    def forward(self, x):
        return super().forward(x) / (1.0 + self.l1.weight.data.norm())


class ReadsNumber(Plain):
    """Checks its input with a Python number (``.item()``), as input guards do."""

    def forward(self, x):
        if x.abs().max().item() > 1e6:
            raise ValueError("input out of range")
        return super().forward(x)


@pytest.mark.parametrize("cls, match", [
    (ReadsData, r"accessing `data` under vmap.*reads a tensor's \.data in forward.*\.detach\(\)"),
    (ReadsNumber, r"\.item\(\).*reads a tensor's value as a Python number in forward.*torch.where instead of if"),
])
def test_a_forward_that_reads_data_or_a_number_falls_back_and_names_the_fix(cls, match):
    X, Y = _data(n=100)
    with pytest.warns(RuntimeWarning, match=match + r".*falling back to a sequential loop"):
        r = slt.estimate_llc(cls(), (X, Y), F.mse_loss, **{**KW, "vectorize": "auto"})
    assert r.diagnostics["path"] == "loop"


class GuardsInputs(Plain):
    """Checks its inputs' values with a tensor condition (``if (x.abs() > c).any()``), as input guards do."""

    def forward(self, x):
        if (x.abs() > 1e6).any():
            raise ValueError("input out of range")
        return super().forward(x)


def test_a_forward_that_branches_on_its_inputs_keeps_vmap_where_the_chains_share_them():
    """vmap cannot branch on a batched tensor, but the inputs are batched only when each chain has its
    own minibatch: at full batch (or a DataLoader's batch) the condition reads one plain tensor.  Before, the
    path was probed with a minibatch per chain in every case, so full-batch runs took the loop too."""
    X, Y = _data(n=100)
    torch.manual_seed(0)
    m = GuardsInputs().to(F64)
    full = {**KW, "vectorize": "auto", "batch_size": None}
    with warnings.catch_warnings(record=True) as caught:  # (an untrained model: the usual findings)
        warnings.simplefilter("always")
        r_full = slt.estimate_llc(m, (X, Y), F.mse_loss, **full)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=32, shuffle=True)
        r_loader = slt.estimate_llc(m, loader, F.mse_loss, **{**KW, "batch_size": None})
    assert not [w for w in caught if "vmap path failed" in str(w.message)]
    assert not any(r.diagnostics["path_reason"].startswith("fallback") for r in (r_full, r_loader))
    vmapped = slt.estimate_llc(m, (X, Y), F.mse_loss, **{**full, "vectorize": "vmap"})
    loop = slt.estimate_llc(m, (X, Y), F.mse_loss, **{**full, "vectorize": "loop"})
    assert vmapped.diagnostics["path"] == "vmap"
    same = Plain().to(F64)  # the same function without its guard (vmap of the guard is what fails)
    same.load_state_dict(m.state_dict())
    tol = _trace_tol(same, X, Y, loop, kw={**full, "batch_size": 100})
    assert torch.allclose(vmapped.loss_trace, loop.loss_trace, rtol=0, atol=tol)
    with pytest.warns(RuntimeWarning, match=r"failed on this model with a minibatch per chain \(RuntimeError: vmap: "
                      r".*data-dependent control flow.*\).*falling back to a sequential loop"):
        r = slt.estimate_llc(m, (X, Y), F.mse_loss, **{**KW, "vectorize": "auto"})
    assert r.diagnostics["path"] == "loop" and "minibatch per chain" in r.diagnostics["path_reason"]
    with pytest.raises(RuntimeError, match=r"vectorize='vmap'.*minibatch per chain.*vectorize='loop'"):
        slt.estimate_llc(m, (X, Y), F.mse_loss, **{**KW, "vectorize": "vmap"})


def test_a_random_forward_without_dropout_modules_is_named():
    """No nn.Dropout in train mode, yet the output is random: before, the only warning was "w* is
    probably not a local minimum (train it further)", which sends the user the wrong way."""
    X, Y = _data(n=100)
    with pytest.warns(RuntimeWarning) as rec:
        r = slt.estimate_llc(NoisyNet(), (X, Y), F.mse_loss, **{**KW, "vectorize": "auto"})
    msgs = [str(w.message) for w in rec]
    assert any(m.startswith("slt.estimate_llc: the model's output is random") and "deterministic" in m for m in msgs)
    assert any("falling back" in m and "draws random numbers in forward" in m for m in msgs)
    reasons = r.diagnostics["convergence_reasons"]
    assert not r.converged and any(p.startswith("the model's output is random") for p in reasons)
    assert not any("not a local minimum" in p for p in reasons)
    # a hand-written loss's per-sample form (lifted by vmap) is checked against it: those of a random loss differ
    # from it, which is a note, not a second warning blaming the loss's form (a VAE drew both)
    with pytest.warns(RuntimeWarning) as rec:
        r = slt.estimate_llc(NoisyNet(), (X, Y), lambda o, y: ((o - y) ** 2).mean(), **{**KW, "vectorize": "auto"})
    assert not any("is not the mean of per-sample losses" in str(w.message) for w in rec)
    assert any(n.startswith("the loss is random (see its set-up note), so its per-sample losses differ")
               for n in r.config["setup_notes"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from slt.target import random_forward_issue
        from slt.data import Data

        probe = Data(X[:4], Y[:4]).full_batch()
        plain, noisy = _plain_model(), NoisyNet().to(F64)
        before = torch.get_rng_state()
        assert random_forward_issue(plain, probe) is None
        assert random_forward_issue(noisy, probe) is not None
        assert torch.equal(torch.get_rng_state(), before)  # the user's random state is untouched

    def noisy_loss(out, y):  # e.g. a sampled softmax: a random subset of the samples' terms each call
        keep = torch.rand(out.shape) < 0.5
        return ((out - y).square() * keep).sum() / out.numel()

    with pytest.warns(RuntimeWarning, match="the loss is random .*make loss_fn deterministic"):
        r = slt.estimate_llc(_plain_model(), (X, Y), noisy_loss, **{**KW, "vectorize": "loop"})
    assert any(p.startswith("the loss is random") for p in r.diagnostics["convergence_reasons"])


@pytest.mark.parametrize("case", ["uint8 labels", "channels_last"])
def test_a_vision_pipelines_vmap_failure_names_the_data_fix(case):
    """uint8 labels (cross_entropy takes them outside vmap) and channels_last inputs made vmap fail and the run fall
    back to the loop with a warning naming neither cause nor fix (helper 33); λ̂ was right, only slower."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (32,), generator=g)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4))
    data = (X, y.to(torch.uint8)) if case == "uint8 labels" else (X.to(memory_format=torch.channels_last), y)
    fix = r"pass y\.long\(\) to use the batched path" if case == "uint8 labels" else r"pass X\.contiguous\(\)"
    with pytest.warns(RuntimeWarning, match=r"the vmap path failed on this model .*" + fix):
        slt.estimate_llc(m.eval(), data, F.cross_entropy, num_chains=2, num_draws=4, step_size=1e-5,
                         localization=100.0, vectorize="auto", progress=False)


def test_batchnorm_note_and_fallback_hint():
    X, Y = _data(n=100)
    with pytest.warns(RuntimeWarning, match="BatchNorm in train mode in norm: call model.eval()") as rec:
        t = prepare_target(BNNet(), (X, Y), F.mse_loss, caller="slt.nuts_llc")
    msgs = [str(w.message) for w in rec]
    assert any(m.startswith("slt.nuts_llc: BatchNorm in train mode") for m in msgs)
    assert any("falling back" in m and "call model.eval() to use the batched path" in m for m in msgs)
    assert t.path == "loop" and len(t.issues) == 1
    # a plain target has no issues
    assert prepare_target(_plain_model(), (X, Y), F.mse_loss).issues == []


def test_batch_statistics_in_eval_mode_are_named_when_the_run_draws_minibatches():
    """A BatchNorm without running statistics normalises by the batch even in eval mode, so a minibatch's
    loss is not an unbiased estimate of L_n: on a trained 16-unit MLP (n = 512) E[L_B(w*)] is 0.097 at batch
    16 and 0.012 at batch 256 against L_n(w*) = 0.0057, and λ̂ (ε 2e-4, γ 10, nβ 100, 4 × 400 draws) read
    15.5 ± 0.8 at full batch, 17.9 ± 0.9 at batch 64 and 23.6 ± 0.9 at batch 16, with no word said.
    Minibatch runs now carry the note (warned, not converged); a full-batch run, which samples L_n itself,
    does not."""
    X, Y = _data(n=100)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(),
                        nn.Linear(8, 2)).to(F64).eval()
    with pytest.warns(RuntimeWarning, match=r"1 \(BatchNorm1d\) normalises by each batch's statistics even in eval "
                                            r"mode.*pass batch_size=None"):
        r = slt.estimate_llc(net, (X, Y), F.mse_loss, **KW)
    assert not r.converged and any("each batch's statistics" in c for c in r.convergence_reasons)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*each batch's statistics")
        full = slt.estimate_llc(net, (X, Y), F.mse_loss, **{**KW, "batch_size": None})
    assert not any("each batch's statistics" in c for c in full.convergence_reasons)
    with warnings.catch_warnings():  # running statistics (the usual BatchNorm in eval mode): no note
        warnings.filterwarnings("error", message=".*each batch's statistics")
        slt.estimate_llc(nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).to(F64).eval(), (X, Y),
                         F.mse_loss, **KW)


class RunningCentre(Plain):
    """Centres its input by a running mean that forward updates: state its output depends on."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.zeros(3))

    def forward(self, x):
        self.mu.mul_(0.9).add_(0.1 * x.mean(0))
        return super().forward(x - self.mu)


class CountsCalls(Plain):
    """Writes a buffer in forward that its output does not depend on."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("vec", ["auto", "vmap", "loop"])
def test_forward_that_moves_its_own_output_is_refused_before_sampling(vec):
    """Without the check the loop path sampled a drifting target (λ̂ < 0, "draws below L(w*): w* is not
    a minimum", the wrong cause) and the vmap path failed with a bare broadcast error."""
    X, Y = _data(n=100)
    m = _plain_model(RunningCentre)
    with pytest.raises(ValueError, match=r"forward writes to its buffer 'mu' and its output depends on it: called "
                                         r"twice on the same two samples, the loss changed from .*model\.eval\(\)"):
        slt.estimate_llc(m, (X, Y), F.mse_loss, vectorize=vec, **KW)
    assert torch.equal(m.mu, torch.zeros(3, dtype=F64))  # the user's buffer untouched


def test_forward_that_only_keeps_count_samples_as_without_it():
    X, Y = _data(n=100)
    plain, counting = _plain_model(), _plain_model(CountsCalls)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in counting.state_dict().items() if k != "calls")
    a = slt.estimate_llc(plain, (X, Y), F.mse_loss, **KW)
    b = slt.estimate_llc(counting, (X, Y), F.mse_loss, **KW)
    assert torch.equal(a.loss_trace, b.loss_trace) and int(counting.calls) == 0


def test_buffer_check_is_not_fooled_by_dropout():
    """BatchNorm in train mode writes its running statistics and dropout makes two calls differ: the
    check replays the random numbers, so only the usual train-mode notes appear (no refusal)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 2)).to(F64)
    X, Y = _data(n=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = prepare_target(m, (X, Y), F.mse_loss)
    assert len(t.issues) == 2 and t.path == "loop"


class NoGradFirstLayer(Plain):
    def forward(self, x):
        with torch.no_grad():
            h = self.l1(x)
        return self.l2(torch.tanh(h))


class DataOfWeight(Plain):
    def forward(self, x):
        return self.l2(torch.tanh(F.linear(x, self.l1.weight.data, self.l1.bias)))


class DetachedOutput(Plain):
    def forward(self, x):
        return super().forward(x).detach()


class LeftOver(Plain):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(2, 2)


@pytest.mark.parametrize("cls, match", [
    (NoGradFirstLayer, "the loss depends on the parameters 'l1.weight', 'l1.bias', yet autograd gives them no gradient"),
    (DataOfWeight, "the loss depends on the parameters 'l1.weight', yet autograd gives them no gradient"),
    (DetachedOutput, "no parameter gets a gradient from loss_fn .the loss does not require grad., yet the loss changes"),
])
def test_parameters_the_loss_uses_without_a_gradient_are_refused(cls, match):
    """Before the check these ran silently: SGLD let the detached parameters diffuse (a detached output
    gave a small finite λ̂ with no warning)."""
    X, Y = _data(n=100)
    with pytest.raises(ValueError, match=match + r".*freeze those parameters"):
        slt.estimate_llc(_plain_model(cls), (X, Y), F.mse_loss, **KW)


class CheckpointedFirstLayer(Plain):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.l1, x, use_reentrant=self.reentrant)
        return self.l2(torch.tanh(h))


def test_reentrant_activation_checkpointing_is_named_with_the_fix():
    """``checkpoint(..., use_reentrant=True)`` on data that do not require grad leaves the parameters inside
    without a gradient: refused (as before), now naming the cause and the fix (the message blamed
    no_grad/.detach/.data); ``use_reentrant=False`` runs."""
    X, Y = _data(n=100)
    torch.manual_seed(0)  # test-side only
    m = CheckpointedFirstLayer(True).to(F64)
    with pytest.raises(ValueError, match=r"'l1.weight', 'l1.bias', yet autograd gives them no gradient .*"
                                         r"use_reentrant=True.*Pass use_reentrant=False"):
        slt.estimate_llc(m, (X, Y), F.mse_loss, **KW)
    m.reentrant = False
    assert math.isfinite(slt.estimate_llc(m, (X, Y), F.mse_loss, **KW).llc_mean)


class BorrowedWeight(nn.Module):
    """Keeps another module's weight as a plain attribute of a child: functional_call replaces the
    registered parameter, not the borrowed reference."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.__dict__["borrowed"] = self.l1.weight  # not registered: a plain attribute

    def forward(self, x):
        return self.l2(torch.tanh(x @ self.borrowed.T + self.l1.bias))


def test_a_loss_that_reads_the_models_own_parameters_is_refused():
    """A loss_fn that closes over the model's parameters (an L2 penalty) read them at w* on the vmap path
    whatever the chain's values — λ̂ of another loss, with no word said (and the loop path, which puts a
    chain's tensors into the module, read the chain's: the paths disagreed).  Refused before sampling, as
    is a forward that reads a parameter through an unregistered reference, and a penalty on the user's
    module when the run computes in a copy (another dtype)."""
    X, Y = _data(n=100)
    m = _plain_model()

    def penalized(out, y):
        return F.mse_loss(out, y) + 1e-3 * m.l1.weight.square().sum()

    for vec in ("vmap", "loop"):
        with pytest.raises(ValueError, match=r"reaches the model's own parameter tensors 'l1.weight' directly"):
            slt.estimate_llc(m, (X, Y), penalized, **{**KW, "vectorize": vec})
    m32 = Plain()

    def penalized32(out, y):
        return F.mse_loss(out, y) + 1e-3 * m32.l2.weight.square().sum()

    with pytest.raises(ValueError, match=r"'l2.weight' directly"):
        slt.estimate_llc(m32, (X.float(), Y.float()), penalized32, **KW)  # KW: float64, a copy of m32
    with pytest.raises(ValueError, match=r"'l1.weight' directly.*plain attribute"):
        slt.estimate_llc(_plain_model(BorrowedWeight), (X, Y), F.mse_loss, **KW)
    assert torch.isfinite(slt.estimate_llc(m, (X, Y), F.mse_loss, **KW).loss_trace).all()


class KeepsActivation(Plain):
    """Research code: forward keeps its hidden activation as a plain attribute."""

    def forward(self, x):
        self.last_hidden = torch.tanh(self.l1(x))
        return self.l2(self.last_hidden)


class AuxAttribute(Plain):
    """Keeps an auxiliary loss for the loss function to read (a mixture of experts' balance term)."""

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        self.aux = h.square().mean()
        return self.l2(h)


class AuxOutput(Plain):
    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l2(h), h.square().mean()


@pytest.mark.parametrize("vec", ["vmap", "loop"])
def test_plain_attributes_that_forward_writes_are_put_back(vec):
    """``torch.nn.utils.prune`` and the older ``weight_norm`` set ``module.weight`` in a forward pre-hook, and
    research code keeps activations as attributes; ``functional_call`` restores only parameters and buffers,
    so a vmapped run left batched tensors in the user's module (a later ``copy.deepcopy`` or print failed with
    "Cannot access storage of BatchedTensorImpl") and a loop run a chain's.  The attributes are put back (one
    the run created is removed), and such a module can be copied for a run in another dtype (deepcopy refused
    its non-leaf ``weight``)."""
    import torch.nn.utils.prune as prune

    X, Y = _data(n=100)
    pruned = _plain_model()
    prune.l1_unstructured(pruned.l1, "weight", amount=0.5)
    normed = _plain_model()
    torch.nn.utils.weight_norm(normed.l2)
    keeps = _plain_model(KeepsActivation)
    for m, name in ((pruned.l1, "weight"), (normed.l2, "weight"), (keeps, "last_hidden")):
        model = pruned if m is pruned.l1 else normed if m is normed.l2 else keeps
        before = m.__dict__.get(name)
        r = slt.estimate_llc(model, (X, Y), F.mse_loss, **{**KW, "vectorize": vec})
        assert r.diagnostics["path"] == vec and torch.isfinite(r.loss_trace).all()
        assert m.__dict__.get(name) is before  # the same object as before the run (or still absent)
        assert name == "last_hidden" or float(m.__dict__[name].detach().sum()) == float(before.detach().sum())
    # inside the run the attributes stay as forward writes them: a loss_fn reading what forward stored (an
    # auxiliary loss) gets the chain's value, as from a model that returns it
    aux, twin = _plain_model(AuxAttribute), _plain_model(AuxOutput)
    r_attr = slt.estimate_llc(aux, (X, Y), lambda out, y: F.mse_loss(out, y) + 0.1 * aux.aux, **{**KW, "vectorize": vec})
    r_out = slt.estimate_llc(twin, (X, Y), lambda out, y: F.mse_loss(out[0], y) + 0.1 * out[1],
                             **{**KW, "vectorize": vec})
    assert torch.equal(r_attr.loss_trace, r_out.loss_trace) and "aux" not in aux.__dict__
    assert r_attr.diagnostics["path"] == vec
    f32 = _plain_model().float()
    prune.l1_unstructured(f32.l1, "weight", amount=0.5)
    r64 = slt.estimate_llc(f32, (X, Y), F.mse_loss, **KW)  # KW: float64, so a copy of the float32 module
    assert r64.config["dtype"] == "float64" and torch.isfinite(r64.loss_trace).all()


def test_unused_and_frozen_parameters_pass_the_gradient_check():
    X, Y = _data(n=100)
    r = slt.estimate_llc(_plain_model(LeftOver), (X, Y), F.mse_loss, **KW)
    assert torch.isfinite(r.loss_trace).all()
    # a parameter the loss does not use is named (it moves under the localization alone; it had no note)
    note = [n for n in r.config["setup_notes"] if n.startswith("the loss does not use the parameters")]
    assert len(note) == 1 and "'unused.weight', 'unused.bias'" in note[0] and "requires_grad_(False)" in note[0] and note[0] in str(r)
    m = _plain_model(NoGradFirstLayer)
    m.l1.requires_grad_(False)  # the fix the message names: hold them at w*
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, **KW)
    assert torch.isfinite(r.loss_trace).all()


def test_torch_transformer_layers_in_eval_mode_run_batched():
    """``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` in eval mode take PyTorch's fused fast
    path (no derivative, no vmap batching rule) when parameters seem not to require grad, as under
    vmap; slt switches it off, so the vmap path runs (no fallback warning) and gives the loop's chains
    (float64: the two summation orders agree to a few ulp over these few steps)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=torch.float64).eval()
    x = torch.randn(32, 5, 8, dtype=torch.float64)
    y = torch.randn(32, 5, 8, dtype=torch.float64)
    kw = dict(num_chains=2, num_draws=8, num_burnin=0, step_size=1e-5, batch_size=8, dtype=torch.float64,
              seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "the vmap path failed ... falling back"
        warnings.filterwarnings("ignore", message=".*draws below L")  # w* is a random point
        warnings.filterwarnings("ignore", message=".*R-hat")
        warnings.filterwarnings("ignore", message=".*barely moved|.*still rising|.*falling|.*explored only")
        v = slt.estimate_llc(layer, (x, y), F.mse_loss, vectorize="vmap", **kw)
    loop = slt.estimate_llc(layer, (x, y), F.mse_loss, vectorize="loop", **kw)
    assert v.config["path"] == "vmap"
    torch.testing.assert_close(v.loss_trace, loop.loss_trace, rtol=1e-10, atol=0)
    assert torch.backends.mha.get_fastpath_enabled()  # restored for the user's own code


# ----------------------------------------------------------------------------
# warnings the user's model raises
# ----------------------------------------------------------------------------
class Chatty(nn.Module):
    """Warns at every forward, as a model on vmap's slow fallback does (PyTorch's "There is a
    performance drop because we have not yet implemented the batching rule" for ``weight_norm``)."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        warnings.warn("chatty model: a note from forward", UserWarning)
        return self.out(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_a_warning_from_the_models_forward_is_shown_once_not_at_every_step(vectorize):
    """Python shows a warning once per code location, unless its filters change: a
    ``warnings.catch_warnings`` entered at every step (once around each backward) reset that memory, and
    a warning from the user's forward was printed at every step (305 times on vmap, 1810 in the loop
    for 4 chains x 150 steps; a weight-normed model printed vmap's fallback note 3512 times).  The set-up
    phases (loss checks, step-size choice) may each show it once more; the steps do not."""
    X, Y = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        slt.estimate_llc(Chatty().double(), (X, Y), F.mse_loss, vectorize=vectorize,
                         **{**KW, "num_draws": 100, "num_burnin": 50})
    shown = sum("chatty model" in str(w.message) for w in caught)
    assert 1 <= shown <= 5, f"the model's warning was shown {shown} times over {3 * 150} chain-steps"


class SparseEmbedding(nn.Module):
    def __init__(self, sparse=True):
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 3, sparse=sparse), nn.Linear(3, 2)

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_a_sparse_embedding_runs_in_the_loop_and_the_warning_names_the_switch():
    """``nn.Embedding(sparse=True)`` gives sparse gradients: vmap fails ("reshape is not implemented for
    sparse tensors"), the loop gives the dense model's chains exactly, and the warning names the module and
    the switch (``.sparse = False``) that gives the batched path back."""
    ids = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(0))
    Y = torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    sparse = SparseEmbedding().to(F64)
    dense = SparseEmbedding(sparse=False).to(F64)
    dense.load_state_dict(sparse.state_dict())
    with pytest.warns(RuntimeWarning, match=r"the vmap path failed .* emb: an embedding with sparse=True gives "
                                            r"sparse gradients.*set its \.sparse = False"):
        r = slt.estimate_llc(sparse, (ids, Y), F.mse_loss, **KW)
    assert r.diagnostics["path"] == "loop"
    ref = slt.estimate_llc(dense, (ids, Y), F.mse_loss, **{**KW, "vectorize": "loop"})
    torch.testing.assert_close(r.loss_trace, ref.loss_trace, rtol=0, atol=0)


class SparseGraph(nn.Module):
    """A graph convolution as users write it: the adjacency a sparse buffer, the node features fixed,
    the input a tensor of node indices."""

    def __init__(self, adjacency, feats):
        super().__init__()
        self.register_buffer("adj", adjacency)
        self.feats = feats
        self.lin, self.out = nn.Linear(feats.shape[1], 4), nn.Linear(4, 3)

    def forward(self, idx):
        h = torch.tanh(torch.sparse.mm(self.adj, self.lin(self.feats)))
        return self.out(torch.sparse.mm(self.adj, h))[idx]


def _graph(scale=1.0):
    g = torch.Generator().manual_seed(0)
    N, E = 30, 90
    edges = torch.randint(0, N, (2, E), generator=g)
    adj = torch.sparse_coo_tensor(edges, scale * torch.ones(E, dtype=F64), (N, N)).coalesce()
    return adj, torch.randn(N, 5, generator=g, dtype=F64), torch.randint(0, 3, (N,), generator=g)


def test_a_sparse_buffer_runs_batched_and_checkpoints_compare_it():
    """A sparse buffer (a graph's adjacency) crashed the set-up's buffer check ("Could not run
    'aten::equal' with arguments from the 'SparseCPU' backend") on every path; now vmap follows the
    loop's chains, and checkpoints whose adjacency differs run one at a time with the note."""
    adj, feats, labels = _graph()
    model = SparseGraph(adj, feats).to(F64)
    nodes = torch.arange(30)
    vm = slt.estimate_llc(model, (nodes, labels), F.cross_entropy, vectorize="vmap", **KW)
    lp = slt.estimate_llc(model, (nodes, labels), F.cross_entropy, vectorize="loop", **KW)
    tol = fp_tol(F64, scale=float(lp.loss_trace.abs().max()) + 1.0, terms=30 * 25)
    torch.testing.assert_close(vm.loss_trace, lp.loss_trace, rtol=0, atol=tol)
    other = SparseGraph(_graph(scale=2.0)[0], feats).to(F64)
    other.load_state_dict(model.state_dict() | {"adj": other.adj})
    runs = slt.estimate_llc(None, (nodes, labels), F.cross_entropy, models=[model, other], **KW)
    assert "differ in buffers or frozen parameters (adj)" in runs[0].config["setup_notes"][0]
    # checkpoint 0 alone: seed + 0, the same chains (on the path "auto" measured: equal to rounding)
    torch.testing.assert_close(runs[0].loss_trace, lp.loss_trace, rtol=0, atol=tol)


def test_checkpoints_with_their_own_batchnorm_statistics_on_two_distributions():
    """Data-refined LLCs (``data={label: dataset}``) of BatchNorm checkpoints in one batched run: each
    checkpoint × distribution follows its single-checkpoint run (the losses at w* per distribution, the
    slope at w* and the chains all see the checkpoint's own statistics)."""
    X, Y = _data(n=120)
    torch.manual_seed(2)
    net = BNNet().to(F64)
    sds = _bn_checkpoints(net)
    net.eval()
    data = {"a": (X[:60], Y[:60]), "b": (X[60:], Y[60:])}
    kw = {**KW, "seed": 7, "vectorize": "vmap"}
    batched = slt.estimate_llc(net, data, F.mse_loss, state_dicts=sds, **kw)
    singles = _single_runs(net, sds, data, kw)
    for label in data:
        for k in range(2):
            single = singles[k][label]
            assert batched[label][k].init_loss == pytest.approx(single.init_loss, rel=1e-12)
            tol = fp_tol(F64, scale=float(single.loss_trace.abs().max()) + 1.0, terms=25 * 32 * 8)
            torch.testing.assert_close(batched[label][k].loss_trace, single.loss_trace, rtol=0, atol=tol)
            s_b = batched[label][k].diagnostics["slope_at_init"]["value"]
            s_1 = single.diagnostics["slope_at_init"]["value"]
            assert s_b == pytest.approx(s_1, rel=1e-9, abs=1e-12)
    assert batched["a"][0].init_loss != pytest.approx(batched["a"][1].init_loss, rel=1e-3)


def test_checkpoint_modules_in_another_mode_than_the_template_are_named():
    """One batched computation calls the template (checkpoint 0), so its modes hold for every checkpoint: a
    checkpoint module left in training mode (dropout, BatchNorm batch statistics) is said, not silently run
    in the template's mode; modules in the same mode run without the note."""
    import copy

    X, Y = _data(n=120)
    torch.manual_seed(0)
    net = BNNet().to(F64).eval()
    other = copy.deepcopy(net).train()
    with pytest.warns(RuntimeWarning, match=r"checkpoint\(s\) \[1\] are not in the template's \(checkpoint 0's\) "
                                            r"eval mode.*call \.eval\(\)"):
        runs = slt.estimate_llc(None, (X, Y), F.mse_loss, models=[net, other], **KW)
    assert any("not in the template's" in n for n in runs[1].config["setup_notes"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same = slt.estimate_llc(None, (X, Y), F.mse_loss, models=[net, copy.deepcopy(net)], **KW)
    assert not any("template's" in str(w.message) for w in caught)
    assert not any("template's" in n for n in same[0].config["setup_notes"])


def test_pytorchs_note_on_ops_without_a_batching_rule_stays_inside_slt():
    """An op without a vmap batching rule (``kl_div`` in the loss) runs once per chain under slt's vmap, and
    PyTorch says so ("There is a performance drop ... please file us an issue") — three times a call under
    default filters, once per set-up phase.  slt measures that speed when it picks the path, so inside its
    vmapped calls the note is off; the user's own vmap afterwards shows it as before."""
    X, _ = _data(n=64)
    T = torch.softmax(torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64), -1)

    def kl(out, t):
        return F.kl_div(out.log_softmax(-1), t, reduction="batchmean")

    model = nn.Sequential(nn.Linear(X.shape[1], 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    note = "performance drop because we have not yet implemented the batching rule"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = slt.estimate_llc(model, (X, T), kl, **{**KW, "vectorize": "vmap"})
        inside = [str(w.message) for w in seen if note in str(w.message)]
        torch.vmap(lambda a: F.kl_div(a, a, reduction="sum"))(torch.randn(3, 4))
        after = [str(w.message) for w in seen if note in str(w.message)]
    assert r.diagnostics["path"] == "vmap" and not inside
    assert after and "aten::kl_div" in after[0]


class PaddedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.o = nn.Embedding(12, 6, padding_idx=0), nn.Linear(6, 2)

    def forward(self, x):
        return self.o(self.e(x).mean(1))  # mean-pools over padded positions too: the padding row matters


def test_an_embeddings_padding_row_gets_no_gradient_in_any_chain_on_the_batched_path():
    """PyTorch's vmap rule for the embedding's backward (torch 2.13) gave the padding row a gradient in every
    chain but the first; inside slt's vmapped calls the padding row is detached instead, so vmap and the loop
    draw the same chains (float64, per-chain minibatches).  The model reads its padding row, so the run holds
    that row at w* (:func:`slt.evaluator.check_padding_rows` refuses it otherwise)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 12, (256, 5), generator=g)
    Y = (X[:, 0] % 2).long()
    torch.manual_seed(0)
    m = PaddedBag().double().eval()
    kw = dict(step_size=1e-4, nbeta=20.0, localization=10.0, num_draws=30, num_chains=3, num_burnin=10,
              batch_size=64, progress=False, seed=0,
              restrict_to=lambda name, p: slice(1, None) if name == "e.weight" else True)
    r = {v: slt.estimate_llc(m, (X, Y), F.cross_entropy, vectorize=v, **kw) for v in ("vmap", "loop")}
    assert r["vmap"].config["path"] == "vmap" and r["loop"].config["path"] == "loop"
    bound = 64 * torch.finfo(torch.float64).eps * float(r["loop"].loss_trace.abs().max())
    assert float((r["vmap"].loss_trace - r["loop"].loss_trace).abs().max()) <= bound
    assert F.embedding is torch.nn.functional.embedding and F.embedding.__module__ == "torch.nn.functional"


def test_gaussian_nll_stand_in_equals_pytorchs():
    """Exact tier: slt's batchable ``gaussian_nll_loss`` gives PyTorch's values and gradients (float64) for
    its variance shapes (same as the input, one dimension short, one broadcast dimension), ``full`` and the
    three reductions, also where the variance is clamped at ``eps`` (the gradient passes through the clamp
    as through PyTorch's in-place clamp under no_grad); a negative variance is NaN where PyTorch raises."""
    from slt._runtime import gaussian_nll_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    y = torch.randn(6, 3, generator=g, dtype=F64)
    cases = [torch.rand(6, 3, generator=g, dtype=F64) + 0.1, torch.rand(6, generator=g, dtype=F64) + 0.1,
             torch.rand(6, 1, generator=g, dtype=F64) + 0.1, torch.tensor([1e-9, 0.5, 2.0, 1e-8, 0.3, 1.0], dtype=F64)]
    for var in cases:
        for full in (False, True):
            for reduction in ("mean", "sum", "none"):
                a = [x.clone().requires_grad_(), var.clone().requires_grad_()]
                b = [x.clone().requires_grad_(), var.clone().requires_grad_()]
                ours = gaussian_nll_loss(a[0], y, a[1], full=full, reduction=reduction)
                theirs = F.gaussian_nll_loss(b[0], y, b[1], full=full, reduction=reduction)
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
                ours.sum().backward()
                theirs.sum().backward()
                for u, v in zip(a, b):
                    torch.testing.assert_close(u.grad, v.grad, rtol=4 * torch.finfo(F64).eps, atol=0)
    neg = torch.tensor([0.5, -0.1, 1.0, 1.0, 1.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="negative"):
        F.gaussian_nll_loss(x[:, 0], y[:, 0], neg)
    per = gaussian_nll_loss(x[:, 0], y[:, 0], neg, reduction="none")
    assert torch.isnan(per[1]) and torch.isfinite(per[[0, 2, 3, 4, 5]]).all()
    with pytest.raises(ValueError, match="var is of incorrect size"):
        gaussian_nll_loss(x, y, torch.ones(5, dtype=F64))


def test_a_heteroscedastic_regression_runs_batched_with_a_per_sample_loss():
    """``F.gaussian_nll_loss`` raises on a negative variance with a Python bool of the values, which vmap
    refuses: such a model ran its chains in a loop, its control variate took a forward pass per step, and
    slt.bif refused it.  Inside slt's vmapped calls the batchable stand-in is used (PyTorch's own is back
    after): the vmap path, the loop's chains to float64 rounding, the per-sample lookup, and bif."""
    torch.manual_seed(0)  # test-side only
    X = torch.randn(96, 4, dtype=F64)
    Y = 2 * X[:, :1] + 0.3 * torch.randn(96, 1, dtype=F64)

    class Het(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.mu, self.log_var = nn.Linear(4, 8), nn.Linear(8, 1), nn.Linear(8, 1)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return self.mu(h), self.log_var(h).exp()

    def loss(out, y):
        return F.gaussian_nll_loss(out[0], y, out[1])

    model = Het().to(F64)
    torch_own = F.gaussian_nll_loss
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(vmap path failed|forward pass at w)")
        vm = slt.estimate_llc(model, (X, Y), loss, **{**KW, "vectorize": "vmap"})
        b = slt.bif(model, (X[:24], Y[:24]), loss, **{**KW, "num_draws": 10})
    loop = slt.estimate_llc(model, (X, Y), loss, **{**KW, "vectorize": "loop"})
    assert vm.diagnostics["path"] == "vmap" and b.values.shape == (24, 24)
    assert torch.allclose(vm.loss_trace, loop.loss_trace, rtol=1e-12, atol=0)
    assert F.gaussian_nll_loss is torch_own


def test_an_embeddings_padding_row_that_the_loss_reads_is_refused_and_can_be_held():
    """``nn.Embedding(padding_idx=0)``: PyTorch gives row 0 no gradient, yet a model that mean-pools over padding
    positions reads it, so SGLD let the row diffuse under γ alone (λ̂ 3.50 ± 0.50 against 2.14 ± 0.08 for the same
    function without padding_idx).  Refused before sampling, with the restriction that holds the row at w*; that
    restriction runs, and a model that masks its padding out is not refused."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 8, (64, 6), generator=g)
    lens = torch.randint(1, 7, (64,), generator=g)
    ids[torch.arange(6)[None] >= lens[:, None]] = 0
    y = ((ids == 2).sum(1) > (ids == 3).sum(1)).long()

    class Pool(nn.Module):
        def __init__(self, masked: bool):
            super().__init__()
            self.masked = masked
            self.emb = nn.Embedding(8, 4, padding_idx=0)
            self.head = nn.Linear(4, 2)

        def forward(self, ids):
            e = self.emb(ids)
            if not self.masked:
                return self.head(e.mean(1))
            m = (ids != 0).unsqueeze(-1).to(e.dtype)
            return self.head((e * m).sum(1) / m.sum(1))

    torch.manual_seed(0)  # test-side only
    kw = dict(step_size=1e-4, localization=10.0, num_chains=2, num_draws=5, num_burnin=0, batch_size=None,
              seed=0, progress=False)
    pooled = Pool(masked=False).eval()
    with pytest.raises(ValueError, match=r"row 0 of 'emb.weight', the padding_idx row.*restrict_to=lambda name, p: "
                                         r"slice\(1, None\) if name == 'emb.weight' else True"):
        slt.estimate_llc(pooled, (ids, y), F.cross_entropy, **kw)
    held = slt.estimate_llc(pooled, (ids, y), F.cross_entropy,
                            restrict_to=lambda name, p: slice(1, None) if name == "emb.weight" else True, **kw)
    assert held.config["restricted_params"] == sum(p.numel() for p in pooled.parameters()) - 4
    slt.estimate_llc(Pool(masked=True).eval(), (ids, y), F.cross_entropy, **kw)  # padding masked out: runs


def test_a_structured_output_that_the_loss_broadcasts_against_the_target_is_refused():
    """GaussianNLLLoss on a (mean (n, 1), variance (n, 1)) output against (n,) targets broadcasts to (n, n)
    without a PyTorch warning; the trailing-1 check looked at tensor outputs only and vmap's per-sample lift
    fails on that loss, so the run went on with a forward control variate and read "converged"."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=g)
    Y = X[:, 0] * 2 + 0.3 * torch.randn(64, generator=g)

    class Het(nn.Module):
        def __init__(self):
            super().__init__()
            self.mu, self.lv = nn.Linear(3, 1), nn.Linear(3, 1)

        def forward(self, x):
            return self.mu(x), F.softplus(self.lv(x)) + 1e-3

    crit = nn.GaussianNLLLoss()
    with pytest.raises(ValueError, match=r"differ by a trailing 1.*GaussianNLLLoss"):
        prepare_target(Het().eval(), (X, Y), lambda out, y: crit(out[0], y, out[1])).star_losses
    t = prepare_target(Het().eval(), (X, Y.unsqueeze(1)), lambda out, y: crit(out[0], y, out[1]))
    assert t.star_losses[1].isfinite().all()  # matching shapes: no error


def test_a_forward_whose_random_draws_agree_on_the_probe_is_still_named_random():
    """Stochastic depth active in eval mode (``if torch.rand(()) >= p``): two forward passes on the probe agree
    unless a skip happens to be drawn (at p = 0.05, 41 of 50 set-ups saw nothing and λ̂ read 5.4–5.6 against
    4.6, converged).  vmap's refusal of the random operation is evidence enough: an issue, a warning and a
    reason for converged = False.  Here p = 1e-9, so the probe's passes always agree."""
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.o = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            if torch.rand(()) >= 1e-9:
                h = h + torch.tanh(self.b(h))
            return self.o(h)

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
    torch.manual_seed(0)  # test-side only
    with pytest.warns(RuntimeWarning, match="draws random numbers"):
        r = slt.estimate_llc(Skip().eval(), (X, Y), F.mse_loss, step_size=1e-4, localization=10.0, num_chains=2,
                             num_draws=5, num_burnin=0, batch_size=None, seed=0, progress=False)
    assert r.config["path"] == "loop" and not r.converged
    assert any("draws random numbers" in m for m in r.convergence_reasons)


def test_a_finite_loss_with_a_nan_gradient_is_named_before_sampling():
    """``torch.where(h > 0, torch.sqrt(h), 0)``: the loss is finite, the gradient NaN (the branch not taken
    back-propagates 0 · inf).  Every chain diverged and the error blamed the step size (the adaptation went down
    to ε = 4.6e-14); now the set-up names the parameters and the cause."""
    class Sqrt(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 6), nn.Linear(6, 1)

        def forward(self, x):
            h = self.l1(x)
            return self.l2(torch.where(h > 0, torch.sqrt(h), torch.zeros_like(h)))

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
    torch.manual_seed(0)  # test-side only
    with pytest.raises(ValueError, match=r"gradient is NaN or inf in 'l1.weight', 'l1.bias'.*clamp"):
        slt.estimate_llc(Sqrt().eval(), (X, Y), F.mse_loss, num_draws=5, progress=False)


def test_an_iterable_dataset_of_several_inputs_names_the_mapping_form():
    """An IterableDataset yielding ``((x1, x2), y)`` failed with "the samples' field  has different lengths (2 to
    2): pad them …"; it now names the mapping form, as the tensor form of the same data does."""
    from torch.utils.data import IterableDataset

    X1, X2, Y = torch.randn(8, 3), torch.randn(8, 2), torch.randn(8, 1)

    class Pairs(IterableDataset):
        def __iter__(self):
            for i in range(8):
                yield (X1[i], X2[i]), Y[i]

    with pytest.raises(ValueError, match=r"each sample's input is a tuple of 2 tensors.*model\(\*\*inputs\)"):
        slt.estimate_llc(nn.Linear(5, 1), Pairs(), F.mse_loss, num_draws=5, progress=False)


def test_a_gradient_that_is_not_the_losss_derivative_is_named():
    """Part of forward under ``.detach()`` (``l2(h) + 0.5·l2(h.detach())``), or a custom ``autograd.Function``
    whose backward is not its forward's derivative: every parameter gets a gradient, so the check for
    parameters without one passes, and SGLD sampled another distribution (λ̂ 4.55 against 4.23 with the true
    gradient), converged.  Central differences near w* against autograd's directional derivative: an issue
    (converged = False); the same function with its true gradient, and a ReLU network (kinks), have none."""
    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 1)

    class DetachPart(Base):
        def forward(self, x):
            h = torch.tanh(self.l1(x))
            return self.l2(h) + 0.5 * self.l2(h.detach())

    class Whole(Base):
        def forward(self, x):
            h = torch.tanh(self.l1(x))
            return self.l2(h) + 0.5 * self.l2(h)

    class WrongBackward(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return F.softplus(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (x > 0).to(g.dtype)

    class Custom(Base):
        def forward(self, x):
            return self.l2(WrongBackward.apply(self.l1(x)))

    class Relu(Base):
        def forward(self, x):
            return self.l2(torch.relu(self.l1(x)))

    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 4, generator=g)
    Y = torch.tanh(X @ torch.randn(4, 1, generator=g)) + 0.1 * torch.randn(200, 1, generator=g)
    issues = {}
    for cls in (DetachPart, Whole, Custom, Relu):
        torch.manual_seed(0)  # test-side only
        m = cls()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(300):
            loss = F.mse_loss(m(X), Y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            issues[cls.__name__] = [i for i in prepare_target(m.eval(), (X, Y), F.mse_loss).issues
                                    if "not the derivative of the loss" in i]
    assert issues["DetachPart"] and issues["Custom"]
    assert not issues["Whole"] and not issues["Relu"]


def test_class_weights_hold_with_weighted_data_and_loaders():
    """A cross-entropy with class weights averages over the summed class weights of the batch: with sample
    weights too, the loss is Σ w_i c_i ℓ_i / Σ w_i c_i (``slt.losses.weighted_mean``), so equal weights give the
    unweighted loss.  The weighted path used Σ w_i ℓ_i, which drops the class weights: ``Data(x, y, ones)`` read
    L(w*) 1.146 against 0.919 and λ̂ −29.3 against 2.85.  A loader's L(w*) weighed its batches by their rows,
    not by their weights and class weights; and data whose first 64 rows are all ignore_index were refused
    ("the loss at w* is NaN") though the loss of the data is finite."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g, dtype=F64)
    Y = torch.randint(0, 3, (200,), generator=g)
    ce = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 0.2], dtype=F64))
    torch.manual_seed(0)  # test-side only
    m = nn.Linear(3, 3).to(F64)
    exact = float(ce(m(X), Y).detach())
    for data in ((X, Y), Data(X, Y, torch.ones(200, dtype=F64)), Data(X, Y, torch.full((200,), 2.0, dtype=F64))):
        t = prepare_target(m, data, ce, dtype=F64)
        assert float(t.init_loss[0]) == pytest.approx(exact, rel=1e-12)
    # weights as a multiplicity: weight 2 on a sample is that sample twice
    w = torch.ones(200, dtype=F64)
    w[:50] = 2.0
    twice = float(ce(m(torch.cat([X, X[:50]])), torch.cat([Y, Y[:50]])).detach())
    assert float(prepare_target(m, Data(X, Y, w), ce, dtype=F64).init_loss[0]) == pytest.approx(twice, rel=1e-12)
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(X, Y, w), batch_size=32)
    assert float(prepare_target(m, loader, ce, dtype=F64).init_loss[0]) == pytest.approx(twice, rel=1e-12)
    Yi = Y.clone()
    Yi[:100] = -100  # the first rows all ignored
    assert float(prepare_target(m, (X, Yi), ce, dtype=F64).init_loss[0]) == pytest.approx(
        float(ce(m(X), Yi).detach()), rel=1e-12)


def test_rows_of_zero_weight_are_not_counted_in_n():
    """Weighted data whose rows of weight 0 are never drawn and count in no mean: n (and so the default nβ)
    counted them (200 where the data are the 120 rows of positive weight). Now n = 120, said in the notes, and
    the run equals the run on those rows (same noise, the same loss up to rounding)."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(200, 3, generator=g, dtype=F64), torch.randn(200, 1, generator=g, dtype=F64)
    w = torch.ones(200, dtype=F64)
    w[120:] = 0.0
    torch.manual_seed(0)  # test-side only
    m = nn.Linear(3, 1).to(F64)
    t = prepare_target(m, Data(X, Y, w), F.mse_loss, dtype=F64)
    assert t.n == 120 and t.nbeta == pytest.approx(120 / math.log(120))
    assert any(note.startswith("n = 120: the rows of positive weight (80 of the 200 rows") for note in t.notes)
    kw = dict(num_chains=2, num_draws=30, num_burnin=0, step_size=1e-4, seed=3, dtype=F64, progress=False)
    a = slt.estimate_llc(m, Data(X, Y, w), F.mse_loss, **kw)
    b = slt.estimate_llc(m, (X[:120], Y[:120]), F.mse_loss, **kw)
    assert a.config["n"] == b.config["n"] == 120 and a.config["nbeta"] == b.config["nbeta"]
    assert a.llc_mean == pytest.approx(b.llc_mean, rel=1e-9)


def test_draws_on_a_few_positions_of_an_unshuffled_loaders_cycle_are_not_converged():
    """A loader with shuffle=False repeats one cycle of batches; draws every k steps where k shares a factor
    with the cycle read every draw's loss on the same batches (a time-ordered regression at k = 4 = its 4
    batches: λ̂ 1.64 ± 0.04 against 2.05, converged, no warning). Now an issue naming the fix; k coprime with
    the cycle, and a shuffling loader, are not."""
    from torch.utils.data import DataLoader, TensorDataset

    X, Y = _data(n=100)
    kw = {**KW, "num_draws": 6}
    loader = DataLoader(TensorDataset(X, Y), batch_size=25)  # 4 batches per epoch
    with pytest.warns(RuntimeWarning, match=r"cycle of 4 batches .* every 2 steps, fall on only 2 of its 4 positions"):
        r = slt.estimate_llc(_plain_model(), loader, F.mse_loss, num_steps_bw_draws=2, **kw)
    assert not r.converged and any(c.startswith("the DataLoader does not shuffle") for c in r.convergence_reasons)
    for ok in (loader, DataLoader(TensorDataset(X, Y), batch_size=25, shuffle=True,
                                  generator=torch.Generator().manual_seed(0))):
        r = slt.estimate_llc(_plain_model(), ok, F.mse_loss, num_steps_bw_draws=3 if ok is loader else 2, **kw)
        assert not any("does not shuffle" in c for c in r.convergence_reasons)


def test_a_loaders_third_field_is_named_as_the_weights():
    """A loader of (x, y, ids) batches read the ids as weights with no word (the tuple and dataset forms
    warn); a 0/1 group column whose batch is all 0 failed as "the loss at w* is NaN or inf"."""
    from torch.utils.data import DataLoader, TensorDataset

    X, Y = _data(n=100)
    ids = torch.arange(100)
    with pytest.warns(RuntimeWarning, match=r"a DataLoader batch of three fields is read as \(x, y, weights\)"):
        prepare_target(_plain_model(), DataLoader(TensorDataset(X, Y, ids), batch_size=25), F.mse_loss)
    group = (torch.arange(100) >= 25).double()  # the first batch: all 0
    with pytest.raises(ValueError, match=r"third field, read as the samples' weights, sums to 0 on a batch of 25"):
        prepare_target(_plain_model(), DataLoader(TensorDataset(X, Y, group), batch_size=25), F.mse_loss).init_loss


def test_random_augmentation_in_a_datasets_items_is_named():
    """Noise added in ``__getitem__``: a Dataset was read once, silently (one draw of the data, another λ̂ per
    call); through a DataLoader the augmentation is redrawn at every batch, so the loss is random, and nothing
    said so (λ̂ 2.7–2.9 against 2.0 for the fixed data, once converged). Now a warning, and for the loader an
    issue (not converged) whose "draws below L(w*)" note names the randomness; the check leaves the global
    random states as they were."""
    import random as pyrandom

    from torch.utils.data import DataLoader, Dataset

    from slt.data import random_items

    X, Y = _data(n=64)

    class Augmented(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return X[i] + 0.1 * torch.randn(X.shape[1], dtype=X.dtype), Y[i]

    with pytest.warns(RuntimeWarning, match=r"the Dataset's items are random \(two reads of item 0 differ"):
        prepare_target(_plain_model(), Augmented(), F.mse_loss)
    states = (torch.get_rng_state(), pyrandom.getstate(), np.random.get_state()[1].copy())
    assert random_items(Augmented()) and not random_items(torch.utils.data.TensorDataset(X, Y))
    assert torch.equal(torch.get_rng_state(), states[0]) and pyrandom.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    loader = DataLoader(Augmented(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match=r"slt.estimate_llc: the data are random: two reads of the DataLoader"):
        r = slt.estimate_llc(_plain_model(), loader, F.mse_loss, **KW)
    assert not r.converged and any(c.startswith("the data are random") for c in r.convergence_reasons)


def test_checkpoint_lists_given_in_ways_that_were_misread_are_refused(tmp_path):
    """A path string as state_dicts was read one character at a time ("checkpoint 0: no such file 'c'"); a
    list of models beside state_dicts ignored the state dicts; a checkpoint with another layer frozen was
    sampled with it moving (the template's requires_grad), silently."""
    X, Y = _data(n=50)
    m = _plain_model()
    path = tmp_path / "step_3000.pt"
    torch.save(m.state_dict(), path)
    for given in (str(path), path):
        with pytest.raises(TypeError, match=r"state_dicts takes a list of checkpoints, got one path .*step_3000.pt"):
            slt.estimate_llc(m, (X, Y), F.mse_loss, state_dicts=given, **KW)
    with pytest.raises(ValueError, match=r"either as model=\[...\] or state_dicts=\[...\], not both"):
        slt.estimate_llc([m, _plain_model()], (X, Y), F.mse_loss, state_dicts=[m.state_dict()], **KW)
    frozen = _plain_model()
    frozen.l1.requires_grad_(False)
    with pytest.raises(ValueError, match=r"checkpoint 1 freezes other parameters .* on l1.weight, l1.bias"):
        slt.estimate_llc([m, frozen], (X, Y), F.mse_loss, **KW)
    # a checkpoint of another shape is named (the message did not say which one)
    wide = {**m.state_dict(), "l2.weight": torch.zeros(2, 5, dtype=F64)}
    with pytest.raises(ValueError, match=r"^checkpoint 1: parameter 'l2.weight' has shape \(2, 5\) in the checkpoint"):
        slt.estimate_llc(m, (X, Y), F.mse_loss, state_dicts=[m.state_dict(), wide], **KW)


def test_checkpoint_files_out_of_step_order_are_named_and_plotted_along_their_steps(tmp_path):
    """``sorted(glob(...))`` puts step_100 before step_20: the results came in that order silently and
    plot_llc_curve joined them in it (a zigzag along x)."""
    import matplotlib.pyplot as plt

    X, Y = _data(n=50)
    m = _plain_model()
    files = []
    for step in (5, 20, 100):
        files.append(str(tmp_path / f"step_{step}.pt"))
        torch.save(m.state_dict(), files[-1])
    given = sorted(files)  # step_100, step_20, step_5
    with pytest.warns(RuntimeWarning, match=r"not in the order of the steps in their names \(step_100.pt, "
                                            r"step_20.pt, step_5.pt\)"):
        res = slt.estimate_llc(m, (X, Y), F.mse_loss, state_dicts=given, **KW)
    fig = slt.plot_llc_curve(res)
    xs = fig.axes[0].lines[0].get_xdata()
    plt.close(fig)
    assert list(xs) == [5, 20, 100]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not in the order of the steps")
        slt.estimate_llc(m, (X, Y), F.mse_loss, state_dicts=files, **KW)


def test_a_wider_buffer_keeps_its_precision_and_mixed_parameters_are_noted():
    """A float64 buffer in a float32 model was cast to float32 on the run's copy: a model adding
    (offset − 1e8) with offset = 1e8 + 0.37 read L(w*) 0.146 against the user's 0.0095 (another function),
    blaming w*. One float64 parameter made the whole run float64 without a word."""

    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)
            self.register_buffer("offset", torch.tensor(1e8 + 0.37, dtype=torch.float64))

        def forward(self, x):
            return self.fc(x) + (self.offset - 1e8).float()

    torch.manual_seed(0)  # test-side only
    X = torch.randn(64, 3)
    m = Offset()
    Y = m(X).detach() + 0.01 * torch.randn(64, 1)
    t = prepare_target(m, (X, Y), F.mse_loss)
    assert t.dtype == torch.float32
    assert float(t.init_loss[0]) == pytest.approx(float(F.mse_loss(m(X), Y)), rel=1e-5)
    mixed = nn.Linear(3, 1)
    mixed.bias = nn.Parameter(mixed.bias.detach().double())
    t = prepare_target(mixed, (X, Y), lambda o, y: F.mse_loss(o.float(), y))
    assert t.dtype == torch.float64 and "the model's parameters mix float32 and float64: sampled in float64" in t.notes[0]


def test_a_loaders_record_says_what_it_read():
    """batch_size=1000 over 100 rows was recorded as 1000 (its batches hold 100); a loader whose sampler draws
    with replacement gave L(w*) over the samples it drew, and the note saying so was dropped."""
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    X, Y = _data(n=100)
    r = slt.estimate_llc(_plain_model(), DataLoader(TensorDataset(X, Y), batch_size=1000), F.mse_loss, **KW)
    assert r.config["batch_size"] == 100
    drawn = DataLoader(TensorDataset(X, Y), batch_size=20, sampler=RandomSampler(
        TensorDataset(X, Y), replacement=True, generator=torch.Generator().manual_seed(0)))
    t = prepare_target(_plain_model(), drawn, F.mse_loss)
    t.init_loss  # noqa: B018 - the pass over the loader
    assert any(n.startswith("the DataLoader's sampler (RandomSampler) chooses the samples") for n in t.notes)


def test_messages_for_integer_images_one_sample_and_a_custom_batch_name_the_fix():
    from dataclasses import dataclass

    from torch.utils.data import DataLoader, TensorDataset

    X, Y = _data(n=16)
    with pytest.raises(ValueError, match=r"Byte and .*the inputs are uint8.*pass them as x.float\(\)"):
        slt.estimate_llc(nn.Linear(3, 2), (X.abs().mul(50).to(torch.uint8), Y.float()), F.mse_loss, **KW)
    with pytest.raises(ValueError, match=r"needs n >= 2 samples, got n=1: pass nbeta explicitly"):
        slt.estimate_llc(_plain_model(), (X[:1], Y[:1]), F.mse_loss, **{**KW, "nbeta": None})

    @dataclass
    class Batch:
        x: torch.Tensor
        y: torch.Tensor

    loader = DataLoader(TensorDataset(X, Y), batch_size=4, collate_fn=lambda items: Batch(
        torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])))
    with pytest.raises(ValueError, match=r"got Batch \(a custom batch object: make the collate_fn return a tuple"):
        slt.estimate_llc(_plain_model(), loader, F.mse_loss, **KW)


def test_a_loader_that_draws_nothing_from_the_global_generator_leaves_it_as_it_was():
    """A DataLoader without its own generator draws a base seed from PyTorch's global generator at every
    epoch; a call over a loader that does not shuffle (or shuffles with its own generator) changed the global
    state, so the user's later random numbers depended on whether they measured an LLC."""
    from torch.utils.data import DataLoader, TensorDataset

    X, Y = _data(n=64)
    for loader in (DataLoader(TensorDataset(X, Y), batch_size=16),
                   DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True,
                              generator=torch.Generator().manual_seed(0))):
        m = _plain_model()
        before = torch.get_rng_state()
        slt.estimate_llc(m, loader, F.mse_loss, **KW)
        assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("shift", [0, 1], ids=["all-positions", "shifted"])
def test_a_loaders_token_mean_loss_weighs_its_batches_by_labelled_tokens(shift):
    """A loss that averages over the labelled tokens of a mapping batch (a causal LM's own loss, or a
    token-mean cross-entropy by hand) over a DataLoader: L(w*) weighed the batches by their rows, so it was
    the mean of the batches' token means (0.7136 at batch 32, 0.7191 at batch 8, against 0.7091). The rule
    (all positions, or positions 1:) is told from a batch and its halves; L(w*) is now the data's token mean
    at every batch size."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    n, T, V = 48, 6, 5
    ids = torch.randint(1, V, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    labels = ids.masked_fill(torch.arange(T) >= lengths.unsqueeze(1), -100)

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(V, 8), nn.Linear(8, V)

        def forward(self, input_ids, labels=None):
            return self.out(torch.tanh(self.emb(input_ids)))

    def loss(out, batch):  # the mean over labelled entries, shifted like a causal LM's when shift = 1
        o, y = (out[:, :-1], batch["labels"][:, 1:]) if shift else (out, batch["labels"])
        return F.cross_entropy(o.reshape(-1, V), y.reshape(-1), ignore_index=-100)

    torch.manual_seed(0)  # test-side only
    m = Tok().to(F64)
    exact = float(loss(m(ids), {"labels": labels}).detach())
    rows = [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]
    for bs in (8, 16):
        t = prepare_target(m, DataLoader(rows, batch_size=bs), loss, dtype=F64)
        assert float(t.init_loss[0]) == pytest.approx(exact, rel=1e-10), bs


def test_samples_without_a_counted_target_are_named():
    """Labels all ignored (-100) on some samples of a loss that averages over counted targets: they add nothing
    to L_n yet counted in n and nβ, silently (a causal LM's own loss with 8 such sequences beside 96: nβ 21.0 →
    23.7, λ̂ 57.5 → 62.4); only slt.losses.causal_lm itself (not wrapped) said so."""
    import functools

    X, _ = _data(n=40)
    y = torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(1))
    y[:5] = -100
    with pytest.warns(RuntimeWarning, match=r"5 of the 40 samples have no counted target .*count.* in n"):
        t = prepare_target(nn.Linear(3, 2).to(F64), (X, y), F.cross_entropy)
        t.init_loss  # noqa: B018 - the losses at w*
    from slt.losses import causal_lm
    from slt.target import _empty_sequences

    ids = torch.tensor([[1, 2, 3], [0, 0, 0]])
    data = Data({"input_ids": ids, "attention_mask": ids > 0})
    assert _empty_sequences(functools.partial(causal_lm), data).startswith("1 of the 2 sequences")


def test_a_loader_over_a_subset_counts_the_subset():
    """A DataLoader with ``SubsetRandomSampler(range(50))`` over 200 rows reads 50 samples; n (and so the
    default nβ) counted 200 in ``estimate_llc`` while ``nuts_llc`` counted 50: two potentials from one loader."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    X, Y = torch.randn(200, 3), torch.randn(200, 1)
    loader = DataLoader(TensorDataset(X, Y), batch_size=20,
                        sampler=SubsetRandomSampler(range(50), generator=torch.Generator().manual_seed(0)))
    t = prepare_target(nn.Linear(3, 1), loader, F.mse_loss)
    assert t.n == 50 and t.nbeta == pytest.approx(50 / math.log(50))
