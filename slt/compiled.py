r"""``torch.compile`` of the vmapped loss and gradient: a candidate path for long runs.

The vmap path evaluates ``vmap(functional_call + loss)`` eagerly and differentiates it with autograd;
compiled, the same function — ``vmap(grad_and_value(one chain's loss))`` — becomes one fused forward
and backward graph.  Measured on one CPU thread (8 chains, batch 256; ms per chain-step of the
gradient evaluation alone, eager vmap → compiled, compile time): a 26k-parameter MLP 1.30 → 0.66
(4.6 s), 16 checkpoints × 8 chains of a 13k-parameter MLP 0.71 → 0.46 (3.6 s), a 105k-parameter
GPT-2 at batch 64 × 16 tokens 35 → 21 (30 s), a small BatchNorm CNN 5.2 → 4.5 (4.9 s): the first
compile of a graph in a process; each later step is traced afresh (its own code object, so that
dynamo's counters speak for it) and inductor reuses the kernels of a graph it has seen (0.4–0.8 s
for a small MLP).  Compiling costs seconds to a minute, so with ``vectorize="auto"`` it is tried
only when the run's gradient evaluations would take at least :data:`COMPILE_MIN_SECONDS` eagerly,
and kept only when measured faster (:func:`slt.target.fastest_path`); ``vectorize="compile"`` asks
for it outright.

A :class:`CompiledStep` serves only calls with the shapes it was compiled for (the run's step: its
rows and minibatch); any other call (a probe, a MALA evaluation at another batch size) takes the
eager vmap path, so nothing is ever recompiled.  A model ``torch.compile`` cannot trace as one graph
(a graph break: Python control flow on tensor values, unsupported ops) is detected after the
compiling call (:class:`NotOneGraph`) and the evaluator stays eager, with the reason reported.
"""

from __future__ import annotations

import itertools
import time
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .data import Batch

__all__ = ["CompiledStep", "COMPILE_MIN_SECONDS", "compile_step", "func_transforms_traced", "NotOneGraph"]


class NotOneGraph(RuntimeError):
    """``torch.compile`` did not capture the step as one graph (a graph break, or no graph)."""


#: ``vectorize="auto"`` tries compiling only when the run's gradient evaluations would take at least
#: this long on the fastest eager path (compiling took 3.6–30 s on the models above; a run this long
#: gains more than that from a 1.3–2× faster step).
COMPILE_MIN_SECONDS = 60.0


_STEP_IDS = itertools.count()


def _signature(flat: Tensor, batch: Batch) -> tuple:
    """What a compiled step is specialised to: the rows' shape and dtype and the minibatch's
    structure, shapes and dtypes."""
    from torch.utils._pytree import tree_flatten

    def sig(t: Any) -> tuple:
        leaves, spec = tree_flatten(t)
        return (str(spec), tuple((tuple(v.shape), v.dtype) if isinstance(v, Tensor) else repr(v) for v in leaves))

    return (tuple(flat.shape), flat.dtype, flat.device, batch.shared, batch.y is batch.x, sig(batch.x),
            sig(batch.y), None if batch.weights is None else tuple(batch.weights.shape))


class CompiledStep:
    """``(R, d), batch -> ((R,) losses, (R, d) gradients)`` of one evaluator, compiled for one
    signature (rows and minibatch shapes).

    Parameters
    ----------
    evaluator
        A :class:`slt.evaluator.ChainEvaluator` on the vmap path, without restrictions.
    flat, batch
        The rows and a minibatch of the run (their shapes are what is served).
    block
        Rows per compiled call (``None``, or one that does not divide the rows: all at once).  The
        graph is compiled for one block and called for each: with many rows the activations of all
        at once outgrow the caches.  Measured on one CPU thread, 16 checkpoints × 8 chains of a
        13k-parameter MLP (batch 256; ms per row of the gradient evaluation): 0.345 all 128 rows at
        once, 0.286 in blocks of 32, 0.276 of 16, 0.274 of 8 (eager: 0.40–0.59, 0.37–0.39, 0.37, 0.39).
    """

    def __init__(self, evaluator: Any, flat: Tensor, batch: Batch, block: int | None = None):
        from torch.func import grad_and_value

        from .evaluator import _call_module

        ev = evaluator
        model, aliases, adapter, spec = ev.model, ev.aliases, ev.adapter, ev.spec

        def one(p: dict[str, Tensor], buffers: dict[str, Tensor], xb: Any, yb: Any, wb: Tensor | None) -> Tensor:
            return adapter.single_loss(_call_module(model, {**p, **buffers}, xb, aliases), yb, wb)

        bd = None if batch.shared else 0
        in_dims = (0, None, bd, bd, bd if batch.weights is not None else None)
        # not fullgraph=True: a model that breaks the graph then raises, and in torch 2.13 a fullgraph failure
        # leaves Python calls holding their arguments for the rest of the process (an engine's start state:
        # one parameter-sized copy per chain).  Graph breaks are read from dynamo's counters instead
        # (:func:`compile_step`).
        # compiled through a function with a code object of its own: dynamo's cache is per code object, so
        # every step is traced afresh (inductor's cache still makes the kernels of a known graph cheap)
        # and its counters say whether *this* step became one graph
        batched = torch.vmap(grad_and_value(one), in_dims=in_dims)

        def step(p: dict[str, Tensor], buffers: dict[str, Tensor], xb: Any, yb: Any, wb: Tensor | None) -> Any:
            return batched(p, buffers, xb, yb, wb)

        step.__code__ = step.__code__.replace(co_name=f"slt_compiled_step_{next(_STEP_IDS)}")
        self._fn: Callable = torch.compile(step, dynamic=False)
        self._ev, self._spec = ev, spec
        self.signature = _signature(flat, batch)
        R = flat.shape[0]
        #: rows per compiled call (divides the rows)
        self.block = int(block) if block and 0 < block < R and R % block == 0 else R
        #: evaluations served (a run whose steps never match the signature would show 0)
        self.calls = 0

    def matches(self, flat: Tensor, batch: Batch) -> bool:
        return _signature(flat, batch) == self.signature

    def __call__(self, flat: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        from .evaluator import _fused, _row_block, _standard_attention, _vmap_attention, padding_checks_off

        flat = flat.detach().contiguous()  # the strides compiled for (a run starts from a broadcast w*)
        R, b = flat.shape[0], self.block
        out = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)
        losses = torch.empty(R, dtype=flat.dtype, device=flat.device)
        ev = self._ev
        # outside the graph (dynamo cannot trace them); as in every eager call (ChainEvaluator.call), the fused
        # activations and vmap-batchable recurrences in place of the modules' own forwards (dynamo refuses a
        # recurrent module unless allow_rnn), and Hugging Face's padding check skipped (Hugging Face skips it
        # itself while compiling, but a step that dynamo runs eagerly, past its recompile limit, ran it on
        # batched ids and failed)
        with _standard_attention(), _vmap_attention(ev.hf_eager), _fused(ev.fused, traced=True), \
                padding_checks_off(ev.padding_checks), _rnn_allowed():
            for r0 in range(0, R, b):
                sl = slice(r0, r0 + b)
                bb = batch if b == R else _row_block(batch, sl)
                grads, lb = self._fn(self._spec.unflatten(flat[sl]), ev.buffers, bb.x, bb.y, bb.weights)
                for name, slot in self._spec.unflatten(out[sl]).items():
                    slot.copy_(grads[name])
                losses[sl] = lb.detach()
        self.calls += 1
        return losses, out


def _rnn_allowed() -> Any:
    """Dynamo's ``allow_rnn`` set inside the block (where this torch has it): without it dynamo breaks the
    graph at any ``nn.RNN``/``nn.LSTM``/``nn.GRU`` module, whatever its forward."""
    import contextlib

    import torch._dynamo

    if not hasattr(torch._dynamo.config, "allow_rnn"):
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(allow_rnn=True)


def func_transforms_traced() -> bool:
    """Whether this torch's ``torch.compile`` traces ``torch.func`` transforms (``vmap``, ``grad``), which the
    compiled step is made of.  torch 2.3 breaks the graph at ``vmap`` unless
    ``torch._dynamo.config.capture_func_transforms`` is set, and with it set still breaks it at the module
    call inside (measured 2026-12-06 on torch 2.3.1, CPU); later releases trace them and have no such
    setting."""
    import torch._dynamo

    return bool(getattr(torch._dynamo.config, "capture_func_transforms", True))


def compile_step(evaluator: Any, flat: Tensor, batch: Batch, block: int | None = None) -> tuple[CompiledStep, float]:
    """Compile ``evaluator``'s step for ``(flat, batch)``, in blocks of ``block`` rows when that divides
    them (:class:`CompiledStep`): ``(step, seconds of the compiling call)``
    (timing it against the eager step is :func:`slt.target.fastest_path`'s).  Raises
    :class:`NotOneGraph` when dynamo broke the graph or captured none (or cannot trace the step's
    ``torch.func`` transforms at all: :func:`func_transforms_traced`), and what ``torch.compile``
    raises when it fails outright."""
    if not func_transforms_traced():
        raise NotOneGraph(f"torch {torch.__version__}'s torch.compile does not trace torch.func transforms "
                          "(vmap, grad); a later torch release compiles the step")
    from torch._dynamo.utils import counters

    flat = flat.contiguous()  # as a run's state is (a broadcast w* would compile for other strides)
    with warnings.catch_warnings():  # torch's own modules, imported by the first compile, warn about their own
        # use of deprecated TorchScript decorators (torch 2.13: 14 DeprecationWarnings from torch/jit/_script.py)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch(\.|$)")
        step = CompiledStep(evaluator, flat, batch, block)
        breaks0, graphs0 = dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        step(flat, batch)
        t_compile = time.perf_counter() - t0
    new = [k for k, v in counters["graph_break"].items() if v > breaks0.get(k, 0)]
    if new:
        raise NotOneGraph(f"graph break: {str(new[0]).strip().splitlines()[0]}")
    if counters["stats"]["unique_graphs"] == graphs0:
        raise NotOneGraph("dynamo captured no graph of the step")
    step.calls = 0
    return step, t_compile
