"""Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) in plain tensor operations, so that ``vmap``
batches them over chains.

PyTorch's fused recurrent kernels (``aten::lstm``, ``aten::gru``, ``aten::rnn_tanh``, ...) have no
batching rule: a model with a recurrent layer failed on slt's vmap path ("Batching rule not
implemented for aten::lstm.input") and ran its chains one after another.  :func:`recurrent_forward`
replaces such a module's ``forward`` during slt's calls (:data:`slt.evaluator.FUSED_FORWARDS`): when
the call is vmapped (a parameter, the input or the initial state is a batched tensor) it runs the
recurrence as matmuls and pointwise gates, one time step at a time, which vmap batches; otherwise it
calls the module's own forward (the fused kernel), so the loop path and plain calls are unchanged.

The equations are PyTorch's (``torch.nn.LSTM`` documentation), per layer and direction, with
:math:`x_t` the layer's input and :math:`h_{t-1}` its previous state:

* RNN: :math:`h_t = \\tanh(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh})` (or ReLU);
* LSTM: gates :math:`(i, f, g, o)` from the four row blocks of :math:`W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} +
  b_{hh}`, :math:`c_t = \\sigma(f) c_{t-1} + \\sigma(i)\\tanh(g)`, :math:`h_t = \\sigma(o)\\tanh(c_t)`, then
  :math:`h_t \\leftarrow W_{hr} h_t` with ``proj_size > 0``;
* GRU: :math:`r, z` from the first two blocks of both products, :math:`n = \\tanh(W_{in} x_t + b_{in} +
  r (W_{hn} h_{t-1} + b_{hn}))`, :math:`h_t = (1 - z) n + z h_{t-1}`.

Between layers, dropout with the module's ``dropout`` in training mode (as PyTorch).  Packed sequences
(``nn.utils.rnn.PackedSequence``) are left to the module's own forward.  The cells (``nn.RNNCell``,
``nn.LSTMCell``, ``nn.GRUCell``) have batching only through vmap's slow per-chain fallback, with a
performance warning at every call: :func:`cell_forward` runs their one step the same way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._runtime import is_batched

__all__ = ["recurrent_forward", "cell_forward", "unrolled_forward", "unrolled_cell_forward", "RECURRENT_CLASSES",
           "CELL_CLASSES"]


#: the classes :func:`recurrent_forward` serves, by their qualified names
RECURRENT_CLASSES = ("torch.nn.modules.rnn.RNN", "torch.nn.modules.rnn.LSTM", "torch.nn.modules.rnn.GRU")
#: the cells :func:`cell_forward` serves
CELL_CLASSES = ("torch.nn.modules.rnn.RNNCell", "torch.nn.modules.rnn.LSTMCell", "torch.nn.modules.rnn.GRUCell")


def recurrent_forward(self: nn.RNNBase, input: Any, hx: Any = None) -> Any:
    """The forward of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` that ``vmap`` can batch (module docstring);
    the module's own forward when nothing in the call is batched, or for a packed sequence."""
    weights = [getattr(self, n) for n in self._flat_weights_names]
    states = list(hx) if isinstance(hx, tuple) else [hx]
    if not any(map(is_batched, [input, *states, *weights])):
        return type(self).forward(self, input, hx)
    return unrolled_forward(self, input, hx)


def unrolled_forward(self: nn.RNNBase, input: Any, hx: Any = None) -> Any:
    """:func:`recurrent_forward` without its test for batched tensors: always the plain operations (the
    module's own forward for a packed sequence).  For calls known to be vmapped, where the test cannot be
    made: ``torch.compile`` traces ``is_batchedtensor`` as false, and dynamo refuses the module's own
    forward (:class:`slt.compiled.CompiledStep`)."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        return type(self).forward(self, input, hx)
    return _unrolled(self, input, hx)


def _unrolled(m: nn.RNNBase, input: Tensor, hx: Any) -> Any:
    lstm = m.mode == "LSTM"
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if m.batch_first else input)  # (L, N, H_in)
    D = 2 if m.bidirectional else 1
    h_out = m.proj_size if lstm and m.proj_size > 0 else m.hidden_size
    N = x.shape[1]
    if hx is None:
        h0 = x.new_zeros(m.num_layers * D, N, h_out)
        c0 = x.new_zeros(m.num_layers * D, N, m.hidden_size) if lstm else None
    else:
        h0, c0 = (hx if lstm else (hx, None))
        if unbatched:
            h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
    h_n, c_n = [], []
    layer_in = x
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(m, "weight_ih" + suffix), getattr(m, "weight_hh" + suffix)
            b_ih = getattr(m, "bias_ih" + suffix) if m.bias else None
            b_hh = getattr(m, "bias_hh" + suffix) if m.bias else None
            w_hr = getattr(m, "weight_hr" + suffix) if lstm and m.proj_size > 0 else None
            seq = layer_in.flip(0) if d else layer_in
            out, h, c = _direction(m.mode, m.nonlinearity if m.mode.startswith("RNN") else None, seq,
                                   F.linear(seq, w_ih, b_ih), w_hh, b_hh, w_hr, h0[k], c0[k] if lstm else None)
            outs.append(out.flip(0) if d else out)
            h_n.append(h)
            if lstm:
                c_n.append(c)
        layer_in = outs[0] if D == 1 else torch.cat(outs, -1)
        if m.dropout and m.training and layer < m.num_layers - 1:
            layer_in = F.dropout(layer_in, m.dropout, training=True)
    output = layer_in
    h_n_t = torch.stack(h_n)
    c_n_t = torch.stack(c_n) if lstm else None
    if unbatched:
        output, h_n_t = output.squeeze(1), h_n_t.squeeze(1)
        c_n_t = c_n_t.squeeze(1) if c_n_t is not None else None
    elif m.batch_first:
        output = output.transpose(0, 1)
    return (output, (h_n_t, c_n_t)) if lstm else (output, h_n_t)


def _direction(mode: str, nonlinearity: str | None, seq: Tensor, x_proj: Tensor, w_hh: Tensor, b_hh: Tensor | None,
               w_hr: Tensor | None, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer in one direction over ``seq`` (L, N, ·) with its input products ``x_proj`` (L, N, G·H)
    precomputed: ``(outputs (L, N, H_out), last h, last c)``."""
    outs = []
    for t in range(seq.shape[0]):
        h, c = _step(mode, nonlinearity, x_proj[t], F.linear(h, w_hh, b_hh), w_hr, h, c)
        outs.append(h)
    return torch.stack(outs), h, c


def _step(mode: str, nonlinearity: str | None, xi: Tensor, hh: Tensor, w_hr: Tensor | None, h: Tensor,
          c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One time step from the input and state products ``xi = W_ih x + b_ih``, ``hh = W_hh h + b_hh``."""
    if mode == "LSTM":
        i, f, g, o = (xi + hh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (F.linear(h, w_hr) if w_hr is not None else h), c
    if mode == "GRU":
        xr, xz, xn = xi.chunk(3, -1)
        hr, hz, hn = hh.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        return (1 - z) * torch.tanh(xn + r * hn) + z * h, None
    pre = xi + hh
    return (torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)), None


def cell_forward(self: nn.RNNCellBase, input: Tensor, hx: Any = None) -> Any:
    """The forward of ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell`` in plain operations when the call
    is vmapped (their ``aten::lstm_cell``, ``rnn_tanh_cell``, ... run once per chain under vmap, with a
    performance warning at every call); the module's own forward otherwise."""
    states = list(hx) if isinstance(hx, tuple) else [hx]
    if not any(map(is_batched, [input, *states, self.weight_ih, self.weight_hh])):
        return type(self).forward(self, input, hx)
    return unrolled_cell_forward(self, input, hx)


def unrolled_cell_forward(self: nn.RNNCellBase, input: Tensor, hx: Any = None) -> Any:
    """:func:`cell_forward` without its test for batched tensors: always the plain operations (see
    :func:`unrolled_forward`)."""
    lstm = isinstance(self, nn.LSTMCell)
    mode = "LSTM" if lstm else "GRU" if isinstance(self, nn.GRUCell) else "RNN"
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    if hx is None:
        h = x.new_zeros(x.shape[0], self.hidden_size)
        c = x.new_zeros(x.shape[0], self.hidden_size) if lstm else None
    else:
        h, c = hx if lstm else (hx, None)
        if unbatched:
            h, c = h.unsqueeze(0), (c.unsqueeze(0) if c is not None else None)
    h, c = _step(mode, getattr(self, "nonlinearity", None), F.linear(x, self.weight_ih, self.bias_ih),
                 F.linear(h, self.weight_hh, self.bias_hh), None, h, c)
    if unbatched:
        h, c = h.squeeze(0), (c.squeeze(0) if c is not None else None)
    return (h, c) if lstm else h
