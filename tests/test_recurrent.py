"""Recurrent layers on the vmap path (exact tier): ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` have fused
kernels without a vmap batching rule; slt runs them as plain operations when vmapped
(:mod:`slt._rnn`).  Their outputs equal the modules' own (float64, to rounding), and an LLC run on the
vmap path follows the same chains as the loop."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import slt
from slt._rnn import cell_forward, recurrent_forward

from conftest import fp_tol

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "lstm": lambda: nn.LSTM(3, 5),
    "lstm batch_first, 2 layers, bidirectional": lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True,
                                                                batch_first=True),
    "lstm proj_size, no bias": lambda: nn.LSTM(3, 5, proj_size=2, bias=False, batch_first=True),
    "gru 2 layers": lambda: nn.GRU(3, 4, num_layers=2, batch_first=True),
    "gru bidirectional": lambda: nn.GRU(3, 4, bidirectional=True),
    "rnn tanh": lambda: nn.RNN(3, 4, batch_first=True),
    "rnn relu 2 layers bidirectional": lambda: nn.RNN(3, 4, num_layers=2, nonlinearity="relu", bidirectional=True),
}


def _stacked(module, C, scale=0.1):
    g = torch.Generator().manual_seed(1)
    return {n: p.detach().unsqueeze(0) + scale * torch.randn(C, *p.shape, generator=g, dtype=p.dtype)
            for n, p in module.named_parameters()}


def _with_forward(module):
    module.forward = recurrent_forward.__get__(module)
    return module


def _tree_close(a, b, tol):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for u, v in zip(a, b):
            _tree_close(u, v, tol)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_state", [False, True])
def test_vmapped_recurrent_layers_equal_the_modules_own_forward(case, with_state):
    torch.manual_seed(0)  # test-side only
    ref = CASES[case]().to(F64)
    m = _with_forward(CASES[case]().to(F64))
    m.load_state_dict(ref.state_dict())
    C, N, L = 3, 4, 6
    x = torch.randn(N, L, 3, dtype=F64) if ref.batch_first else torch.randn(L, N, 3, dtype=F64)
    D = 2 if ref.bidirectional else 1
    h_out = getattr(ref, "proj_size", 0) or ref.hidden_size
    hx = None
    if with_state:
        h0 = torch.randn(ref.num_layers * D, N, h_out, dtype=F64)
        hx = (h0, torch.randn(ref.num_layers * D, N, ref.hidden_size, dtype=F64)) if ref.mode == "LSTM" else h0
    params = _stacked(ref, C)
    got = torch.vmap(lambda p: functional_call(m, p, (x, hx)))(params)
    # a sum over time of L products of fan-in ≤ 2·5 + 5 terms, with outputs of order 1
    tol = fp_tol(F64, scale=10.0, terms=L * 20)
    for c in range(C):
        want = functional_call(ref, {n: v[c] for n, v in params.items()}, (x, hx))
        _tree_close(tuple(t[c] if not isinstance(t, tuple) else tuple(u[c] for u in t) for t in got), want, tol)
    # not vmapped: the module's own forward (the fused kernel), bit for bit
    _tree_close(m(x, hx), ref(x, hx), 0.0)


def test_an_unbatched_sequence_and_a_packed_one():
    torch.manual_seed(0)
    ref = nn.GRU(3, 4).to(F64)
    m = _with_forward(nn.GRU(3, 4).to(F64))
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, dtype=F64)  # (L, H_in): no batch dimension
    params = _stacked(ref, 2)
    out, h = torch.vmap(lambda p: functional_call(m, p, (x,)))(params)
    want_out, want_h = functional_call(ref, {n: v[1] for n, v in params.items()}, (x,))
    tol = fp_tol(F64, scale=10.0, terms=100)
    torch.testing.assert_close(out[1], want_out, rtol=0, atol=tol)
    torch.testing.assert_close(h[1], want_h, rtol=0, atol=tol)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3, dtype=F64), [5, 3])
    assert isinstance(m(packed)[0], nn.utils.rnn.PackedSequence)  # the module's own forward


class Recurrent(nn.Module):
    """A sequence regressor as users write it: an LSTM, the last step's state, a linear head."""

    def __init__(self, cell="LSTM"):
        super().__init__()
        self.rnn = getattr(nn, cell)(3, 6, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_a_recurrent_model_runs_batched_and_follows_the_loops_chains(cell):
    """Before, vmap failed ("Batching rule not implemented for aten::lstm.input") and the run fell back
    to the loop with a warning; now it runs batched, and the chains equal the loop's to rounding."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 5, 3, generator=g, dtype=F64)
    Y = X.sum((1, 2)) * 0.3
    torch.manual_seed(0)
    model = Recurrent(cell).to(F64)
    kw = dict(num_chains=3, num_draws=20, num_burnin=5, step_size=1e-4, nbeta=50.0, localization=10.0,
              batch_size=32, dtype=F64, progress=False, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an untrained model's convergence findings
        warnings.filterwarnings("error", message=".*path failed")  # no fallback
        vm = slt.estimate_llc(model, (X, Y), F.mse_loss, vectorize="vmap", **kw)
        lp = slt.estimate_llc(model, (X, Y), F.mse_loss, vectorize="loop", **kw)
    assert vm.diagnostics["path"] == "vmap"
    tol = fp_tol(F64, scale=float(lp.loss_trace.abs().max()) + 1.0, terms=25 * 50)
    torch.testing.assert_close(vm.loss_trace, lp.loss_trace, rtol=0, atol=tol)
    assert "forward" not in vars(model.rnn)  # the module is left as it was


@pytest.mark.parametrize("cls", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("batched_input", [True, False])
def test_vmapped_cells_equal_the_modules_own_forward(cls, batched_input):
    """The cells vmap only through its per-chain fallback (a warning at every call); slt's step is the
    same function."""
    torch.manual_seed(0)
    ref = cls(3, 4).to(F64)
    m = cls(3, 4).to(F64)
    m.load_state_dict(ref.state_dict())
    m.forward = cell_forward.__get__(m)
    x = torch.randn(5, 3, dtype=F64) if batched_input else torch.randn(3, dtype=F64)
    shape = (5, 4) if batched_input else (4,)
    h0 = torch.randn(shape, dtype=F64)
    hx = (h0, torch.randn(shape, dtype=F64)) if cls is nn.LSTMCell else h0
    params = _stacked(ref, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no vmap fallback
        got = torch.vmap(lambda p: functional_call(m, p, (x, hx)))(params)
    tol = fp_tol(F64, scale=10.0, terms=20)
    for c in range(3):
        want = functional_call(ref, {n: v[c] for n, v in params.items()}, (x, hx))
        _tree_close(tuple(g[c] for g in got) if isinstance(got, tuple) else got[c], want, tol)
    _tree_close(m(x, hx), ref(x, hx), 0.0)


class Packed(nn.Module):
    """Variable-length sequences packed inside forward (lengths in the last input column)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        lengths = x[:, 0, 3].long().cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x[..., :3], lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        return self.head(h[-1]).squeeze(-1)


def test_packed_sequences_run_in_the_loop_and_the_warning_says_why():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, 4, generator=g, dtype=F64)
    X[:, :, 3] = torch.randint(2, 6, (60, 1), generator=g).to(F64)
    Y = X[:, :, :3].sum((1, 2)) * 0.3
    torch.manual_seed(0)
    model = Packed().to(F64)
    kw = dict(num_chains=2, num_draws=10, num_burnin=5, step_size=1e-4, nbeta=50.0, localization=10.0,
              batch_size=16, dtype=F64, progress=False, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("error", message=".*path failed")
        # torch's error names the GRU kernel (torch 2.3: the PackedSequence's .data, read before it)
        with pytest.raises(RuntimeWarning, match=r"(aten::gru|accessing `data` under vmap).*packed sequences "
                                                 r"\(nn.utils.rnn.PackedSequence\) runs PyTorch's fused kernel.*"
                                                 r"pass padded sequences"):
            slt.estimate_llc(model, (X, Y), F.mse_loss, **kw)
        r = slt.estimate_llc(model, (X, Y), F.mse_loss, **{**kw, "vectorize": "loop"})  # an untrained model
    assert r.diagnostics["path"] == "loop" and torch.isfinite(r.loss_trace).all()
