r"""Batched loss evaluation: per-chain losses and gradients of ``C`` parameter vectors at once.

Three computation paths (:func:`choose_path`):

``native``
    the model is a :class:`slt.models.ChainModule` with ``forward_chains``
    (fastest for tiny models; with ``loss_and_grad_chains`` it also skips autograd);
``vmap``
    ``torch.func.functional_call`` lifted over chains with ``torch.func.vmap``
    (any module vmap supports);
``loop``
    a Python loop over chains (modules vmap cannot handle, e.g. BatchNorm in
    training mode).

Calls and outputs
-----------------
The model is called as ``model(x)`` when the inputs are a tensor and as
``model(**x)`` when they are a mapping (:func:`call_module`).  Its output goes
to ``loss_fn(output, target)`` unchanged: a tensor, a tuple, a dict or a
dataclass such as a Hugging Face ``ModelOutput``.  On the vmap path the loss is
evaluated inside the vmapped function, so outputs with non-tensor parts (a
key/value cache) never cross the vmap boundary.  An evaluator built with
``structured=True`` (non-tensor inputs, targets or outputs) computes the
per-sample losses at w* the same way; plain tensors keep the tensor code path.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import os
import sys
import types
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import Tensor, nn
import torch

from .data import Batch, Columns, Data, LoaderSource, _map, _plain, num_rows
from .losses import LossAdapter, candidate_means, count_weighted_mean
from .params import ParamSpec
from ._rnn import CELL_CLASSES, RECURRENT_CLASSES, cell_forward, recurrent_forward, unrolled_cell_forward, unrolled_forward
from ._runtime import is_batched, vmapped_block

__all__ = ["ChainEvaluator", "choose_path", "PATH_REASONS", "validate_model_and_loss", "check_gradients_reach", "check_padding_rows", "gradient_mismatch_issue", "saturation_issue", "probe_batch", "to_device",
           "call_module", "module_aliases", "describe", "resolve_autocast", "AUTOCAST_DTYPES",
           "fused_activations", "fused_summary", "FUSED_FORWARDS", "FUSE_ENV"]


@contextmanager
def _standard_attention():
    """PyTorch's fused "fast path" of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (taken
    in eval mode when no parameter seems to require grad — as under ``vmap``) has no derivative and
    no batching rule: switch it off while slt calls the model (same maths, differentiable)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not mha.get_fastpath_enabled():
        yield
        return
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(True)


#: name of the Hugging Face ``PreTrainedModel`` method that warns when ``input_ids`` hold padding and no
#: ``attention_mask`` came with them
_PADDING_CHECK = "warn_if_padding_and_no_attention_mask"


def padding_checkers(model: nn.Module) -> tuple[nn.Module, ...]:
    """The modules of ``model`` that run Hugging Face's padding check (:data:`_PADDING_CHECK`): a
    ``GPT2ForSequenceClassification`` and its ``GPT2Model``; none in a model without transformers."""
    return tuple(m for m in model.modules() if callable(getattr(type(m), _PADDING_CHECK, None)))


def _no_padding_check(input_ids: Any, attention_mask: Any) -> None:
    return None


def _padding_check_off_when_batched(modules: Sequence[nn.Module], x: Any) -> Any:
    """Hugging Face's padding check (``pad_token_id in input_ids[:, [-1, 0]]``, run when the config has a
    ``pad_token_id`` and no ``attention_mask`` is passed: GPT-2 / Llama sequence classifiers) reads a
    Python bool from the ids, which vmap refuses when each chain draws its own batch: such a model fell
    back to the loop over chains.  The check only decides whether to print a one-time warning about the
    data, so ``modules`` (:func:`padding_checkers`) skip it inside the block when the ids are batched; the
    set-up's unbatched calls run it (and show that warning) as the user's own call would."""
    if not modules:
        return nullcontext()
    # a mapping of keyword arguments, or the ids themselves as the one positional argument
    ids, mask = (x.get("input_ids"), x.get("attention_mask")) if isinstance(x, Mapping) else (x, None)
    if not is_batched(ids) or mask is not None:
        return nullcontext()
    return padding_checks_off(modules)


def padding_checks_off(modules: Sequence[nn.Module]) -> Any:
    """``modules`` (:func:`padding_checkers`) skip Hugging Face's padding check inside the block."""
    return _on_instances((m, _PADDING_CHECK, _no_padding_check) for m in modules)


@functools.cache
def _validation_runs_under_vmap() -> bool:
    """Whether a ``torch.distributions`` object validates its arguments under ``vmap``: the check is a
    Python bool of the values, which torch 2.3 refuses ("data-dependent control flow") and later
    releases batch.  Probed once per process."""
    try:
        torch.vmap(lambda t: torch.distributions.Normal(t, torch.ones_like(t), validate_args=True).mean)(
            torch.zeros(2, 1))
    except RuntimeError:
        return False
    return True


@contextmanager
def _distribution_checks_off():
    """A model that returns a ``torch.distributions`` object (``Normal(mu, sigma)``), or a loss that calls
    its ``log_prob``, has its arguments validated; on a torch whose validation vmap refuses
    (:func:`_validation_runs_under_vmap`: torch 2.3) such a model fell back to the loop, so inside slt's
    vmapped blocks distributions are built without the default check (the set-up's plain calls still
    check, and a chain whose parameters went invalid shows as a diverged chain).  A no-op where vmap
    runs the check."""
    dist = torch.distributions.Distribution
    if not dist._validate_args or _validation_runs_under_vmap():
        yield
        return
    dist.set_default_validate_args(False)
    try:
        yield
    finally:
        dist.set_default_validate_args(True)


#: PyTorch's one-per-process note "grad and param do not obey the gradient layout contract" (a
#: ``TORCH_WARN_ONCE``): a strided slot of a ``(C, d)`` row as the gradient of a strided leaf is what
#: slt means, so the first backward into strided slots catches it and it is not shown.  [True] after
#: that backward (the note was caught there or had been raised before; at worst it shows once later).
_LAYOUT_NOTE = [False]
_LAYOUT_MESSAGE = "grad and param do not obey the gradient layout contract"


def _backward_without_layout_note(loss: Tensor, inputs: list[Tensor]) -> None:
    """``torch.autograd.backward`` with PyTorch's gradient-layout note caught; any other warning is
    shown as it was raised.  After this first backward into strided slots (PyTorch raises the note at
    most once per process), the caller calls backward directly: entering ``warnings.catch_warnings`` on
    every step would reset Python's once-per-location registry, and a warning the user's model raises in
    forward (e.g. vmap's "There is a performance drop because we have not yet implemented the batching
    rule") would then be printed at every step instead of once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.autograd.backward(loss, inputs=inputs)
    _LAYOUT_NOTE[0] = True
    for w in caught:
        if _LAYOUT_MESSAGE not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


@contextmanager
def _hf_masks_as_traced():
    """Hugging Face's attention masks (``transformers.masking_utils``, transformers ≥ 5) skip building
    the mask when every position of the padding mask is real — a branch on the mask's values, which
    ``vmap`` cannot take over chains that each have their own minibatch — unless the mask is being
    traced (``is_tracing``), when they always build it.  While slt maps the model over chains, a
    batched mask counts as traced, so the mask is always built: the same attention (a mask of all-real
    positions changes nothing), without the branch.  Restored on exit; nothing happens when the module
    is not loaded."""
    mu = sys.modules.get("transformers.masking_utils")
    orig = getattr(mu, "is_tracing", None)
    if orig is None:
        yield
        return

    def is_tracing(tensor: Any = None) -> bool:
        return bool(orig(tensor)) or is_batched(tensor)

    mu.is_tracing = is_tracing
    try:
        yield
    finally:
        mu.is_tracing = orig


@contextmanager
def _vmap_attention(hf_configs: Sequence[Any] = ()):
    """Under ``vmap``, ``scaled_dot_product_attention`` in its math form (matmuls and a softmax, which
    vmap batches over chains) instead of the fused CPU/GPU kernels, which have no batching rule and
    would run once per sample with a performance warning per call; Hugging Face's masks built without
    a branch on their values (:func:`_hf_masks_as_traced`).  ``hf_configs``: Hugging Face
    configs whose attention implementation is switched to ``"eager"`` for the block and restored
    after (:func:`hf_attention_configs`).  Also ``torch.distributions``' argument checks where vmap
    refuses them (:func:`_distribution_checks_off`), and PyTorch's note on ops that run once per chain
    (:func:`slt._runtime.vmapped_block`)."""
    saved = [(c, _attn_slot(c), getattr(c, _attn_slot(c))) for c in hf_configs]
    try:
        for c, slot, _ in saved:
            setattr(c, slot, "eager")
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch without the context manager: the default kernels
            with _hf_masks_as_traced(), _distribution_checks_off(), vmapped_block():
                yield
            return
        with sdpa_kernel([SDPBackend.MATH]), _hf_masks_as_traced(), _distribution_checks_off(), vmapped_block():
            yield
    finally:
        for c, slot, value in reversed(saved):
            setattr(c, slot, value)


def _attn_slot(config: Any) -> str:
    """The attribute that holds a Hugging Face config's attention implementation, set without
    recursing into sub-configs (``_attn_implementation_internal`` in transformers ≥ 4.4x)."""
    return "_attn_implementation_internal" if hasattr(config, "_attn_implementation_internal") \
        else "_attn_implementation"


def hf_attention_configs(model: nn.Module) -> list[Any]:
    """The distinct Hugging Face configs reachable from ``model``'s modules whose attention
    implementation is neither ``"eager"`` nor unset (``"sdpa"``, ...).

    Hugging Face's ``sdpa`` path builds its attention mask with a branch on the mask's values
    (whether every position is real), which ``vmap`` cannot batch when each chain has its own
    minibatch; ``eager`` attention computes the same softmax attention with the mask always
    materialised.  The vmap path switches these configs to ``"eager"`` while it calls the model
    (:func:`_vmap_attention`) when the model would otherwise fail under vmap."""
    out: list[Any] = []
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is None or any(c is o for o in out):
            continue
        impl = getattr(c, "_attn_implementation", None)
        if isinstance(impl, str) and impl != "eager":
            out.append(c)
    return out


def _tanh_gelu(self: nn.Module, x: Tensor) -> Tensor:
    r""":math:`\tfrac12 x (1 + \tanh(\sqrt{2/\pi}(x + 0.044715 x^3)))` as one kernel
    (``F.gelu(approximate="tanh")``)."""
    return nn.functional.gelu(x, approximate="tanh")


#: Activation modules whose ``forward`` composes elementwise operations for a function PyTorch has as
#: one fused kernel, by ``module.qualname`` of the exact class (subclasses are left alone), with the
#: fused forward slt calls instead.  Hugging Face's ``gelu_new`` (GPT-2's and GPT-Neo's default),
#: ``gelu_fast`` and ``gelu_accurate`` are the tanh GELU written as 7–8 tensor operations (Hugging Face's
#: own ``GELUTanh`` is the fused one, "equivalent to NewGELU and FastGELU but much faster"), each a
#: pass over the activations with its own saved tensors for backward: on one CPU thread their forward
#: and backward took 4.5 ms against 1.9 ms for ``F.gelu(approximate="tanh")`` on a (4, 32, 17, 256) tensor, and 16.0–16.7 against
#: 13.6–13.8 ms per chain-step of a 2-layer GPT-2 (loop path; vmap 20.8 → 15.8), measured 2026-12-04.
#: Same function: the outputs differ by float rounding (2.4e-7 at most on N(0, 1) inputs).
FUSED_FORWARDS = {
    "transformers.activations.NewGELUActivation": _tanh_gelu,
    "transformers.activations.FastGELUActivation": _tanh_gelu,
    "transformers.activations.AccurateGELUActivation": _tanh_gelu,
}
#: set to ``0`` to run every module's own ``forward`` (no fused activations)
FUSE_ENV = "SLT_FUSE_ACTIVATIONS"
#: Recurrent layers whose fused kernels have no vmap batching rule, with the forward slt calls instead:
#: the recurrence in plain operations when the call is vmapped, the module's own forward otherwise
#: (:mod:`slt._rnn`).  Not switched off by :data:`FUSE_ENV` (without it such a model cannot be vmapped).
#: Hugging Face's ``BloomGelu`` calls ``GeLUFunction``, an ``autograd.Function`` without ``setup_context``, which
#: no torch.func transform accepts (a BLOOM model fell back to the loop over chains); its forward and its
#: hand-written backward are the tanh GELU and that GELU's exact derivative, so ``F.gelu(approximate="tanh")``
#: is the same function to rounding.
BATCHABLE_FORWARDS = {**{name: recurrent_forward for name in RECURRENT_CLASSES},
                      **{name: cell_forward for name in CELL_CLASSES},
                      "transformers.models.bloom.modeling_bloom.BloomGelu": _tanh_gelu}
#: The forwards :class:`slt.compiled.CompiledStep` puts in place of :data:`BATCHABLE_FORWARDS`' recurrent ones:
#: the recurrence in plain operations without testing whether the call is vmapped (it always is there, and
#: ``torch.compile`` traces that test as false and then refuses the module's own forward).
TRACED_FORWARDS = {**{name: unrolled_forward for name in RECURRENT_CLASSES},
                   **{name: unrolled_cell_forward for name in CELL_CLASSES}}


def fused_activations(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` (by name) that slt calls with a forward of its own: a fused activation
    (:data:`FUSED_FORWARDS`, none when the environment sets ``SLT_FUSE_ACTIVATIONS=0``) or a recurrent
    layer that vmap can batch (:data:`BATCHABLE_FORWARDS`) — instances of exactly those classes that
    carry no ``forward`` of their own."""
    fuse = os.environ.get(FUSE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    return {name: m for name, m in model.named_modules()
            if "forward" not in vars(m)
            and (_fused_forward(m) is not None if fuse else _qualname(m) in BATCHABLE_FORWARDS)}


def _qualname(m: nn.Module) -> str:
    cls = type(m)
    return f"{cls.__module__}.{cls.__qualname__}"


def _fused_forward(m: nn.Module) -> Any:
    """The forward :data:`FUSED_FORWARDS` or :data:`BATCHABLE_FORWARDS` lists for ``m``'s exact class, or
    ``None``."""
    name = _qualname(m)
    return FUSED_FORWARDS.get(name) or BATCHABLE_FORWARDS.get(name)


def fused_summary(modules: Mapping[str, nn.Module]) -> dict[str, int]:
    """``{class name: count}`` of :func:`fused_activations`' modules (what a run records)."""
    return dict(Counter(type(m).__name__ for m in modules.values()))


@contextmanager
def _on_instances(patches: Iterable[tuple[nn.Module, str, Any]]):
    """Each ``(module, name, value)``: ``value`` set as the module instance's own attribute ``name`` inside
    the block, and removed after it (the class's is back), also when the block raises; a module that
    already holds its own ``name`` (inside an outer such block) is left as it is."""
    done = []
    try:
        for m, name, value in patches:
            if name not in vars(m):
                setattr(m, name, value)
                done.append((m, name))
        yield
    finally:
        for m, name in done:
            vars(m).pop(name, None)


def _fused(modules: Mapping[str, nn.Module], traced: bool = False) -> Any:
    """``modules`` (from :func:`fused_activations`) run their fused forward inside the block; their own
    is back after it, also when the block raises.  ``traced``: the block's calls are vmapped and traced by
    ``torch.compile``, and the recurrent layers take :data:`TRACED_FORWARDS`."""
    def forward(m: nn.Module) -> Any:
        return (traced and TRACED_FORWARDS.get(_qualname(m))) or _fused_forward(m)

    return _on_instances((m, "forward", types.MethodType(forward(m), m)) for m in modules.values())


#: The precisions ``autocast`` accepts, by name.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                   "float16": torch.float16}


def resolve_autocast(autocast: Any) -> torch.dtype | None:
    """``None``/``False`` -> ``None``; ``"bf16"``, ``"fp16"`` (or their long names, or the torch
    dtypes) -> the dtype; anything else a clear error."""
    if autocast is None or autocast is False:
        return None
    if autocast is True:
        return torch.bfloat16
    if isinstance(autocast, str) and autocast.lower() in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[autocast.lower()]
    if autocast in (torch.bfloat16, torch.float16):
        return autocast
    raise ValueError(f"autocast must be None, 'bf16' or 'fp16' (or torch.bfloat16 / torch.float16), got {autocast!r}")


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: CUDA's ``OutOfMemoryError``, a ``MemoryError``, or the CPU
    allocator's ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory", "out of memory")."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if (oom is not None and isinstance(e, oom)) or isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _chain_too_large(device: torch.device, what: str) -> MemoryError:
    """The error for one chain whose gradient evaluation does not fit in memory (``what``: the allocator's)."""
    return MemoryError(f"one chain's gradient evaluation does not fit in memory on {device} ({what}): pass a "
                       "smaller batch_size, or run on a device with more memory")


def _upcast(out: Any, dtype: torch.dtype) -> Any:
    """The model's output with every half-precision floating tensor cast to ``dtype`` (tensors, and
    the tensors of tuples, lists and mappings such as a ``ModelOutput``, one level deep): the loss
    then runs outside autocast in the parameters' precision."""
    def up(t: Any) -> Any:
        return t.to(dtype) if isinstance(t, Tensor) and t.dtype in (torch.bfloat16, torch.float16) else t

    if isinstance(out, Tensor):
        return up(out)
    if isinstance(out, Mapping):
        for k in list(out.keys()):
            if isinstance(out[k], Tensor):
                out[k] = up(out[k])
        return out
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        return type(out)(up(t) for t in out)
    return out


def call_module(model: nn.Module, params: Mapping[str, Tensor], x: Any,
                aliases: Mapping[str, list[str]] | None = None, autocast: torch.dtype | None = None,
                slots: "ModuleSlots | None" = None) -> Any:
    """:func:`_call_module` with PyTorch's non-differentiable attention fast path switched off; with
    ``autocast`` (a half-precision dtype) the model runs under ``torch.autocast`` and its
    floating outputs come back in the parameters' dtype.  With ``slots`` (:class:`ModuleSlots` of
    ``model``) the tensors are substituted through them (same result, without ``functional_call``'s
    per-call walk of the module tree)."""
    with _standard_attention():
        if autocast is None:
            return _call_module(model, params, x, aliases, slots)
        first = next(iter(params.values()))
        with torch.autocast(device_type=first.device.type, dtype=autocast):
            out = _call_module(model, params, x, aliases, slots)
        return _upcast(out, first.dtype)


class ModuleSlots:
    """Where each parameter and buffer of a module is held: for every name of ``named_parameters()``
    and ``named_buffers()``, the ``(owner._parameters or owner._buffers, attribute)`` slots that hold
    its tensor — several for tied weights (a language model's input and output embeddings), as
    ``torch.func.functional_call(..., tie_weights=True)`` substitutes them.

    :meth:`substitute` does what ``functional_call`` does (put the given tensors in those slots, run the
    module, put the originals back, also on an exception) without walking the module tree on every
    call: ``functional_call`` costs about 45 µs a call in its own bookkeeping (a 4-layer 64-wide MLP at
    batch 256 on one CPU thread: 87 µs for the forward alone, 136 through it, 87 with these slots),
    paid per chain on the loop path.  Built once per evaluator; the module must not gain or lose
    parameters afterwards (an evaluator never changes its model's structure)."""

    def __init__(self, model: nn.Module):
        self.slots: dict[str, list[tuple[dict, str]]] = {}
        first: dict[int, str] = {}
        for kind, named in (("_parameters", model.named_parameters(remove_duplicate=False)),
                            ("_buffers", model.named_buffers(remove_duplicate=False))):
            for name, t in named:
                owner, _, attr = name.rpartition(".")
                store = getattr(model.get_submodule(owner) if owner else model, kind)
                places = self.slots.setdefault(first.setdefault(id(t), name), [])
                if not any(d is store and a == attr for d, a in places):  # one module under two names
                    places.append((store, attr))

    def covers(self, params: Mapping[str, Tensor]) -> bool:
        """Whether every name of ``params`` is one of the module's (first) parameter or buffer names."""
        return all(k in self.slots for k in params)

    def substitute(self, model: nn.Module, params: Mapping[str, Tensor], args: tuple, kwargs: dict) -> Any:
        """``model(*args, **kwargs)`` with ``params`` in place of the module's tensors of those names."""
        with self.holding(params):
            return model(*args, **kwargs)

    @contextmanager
    def holding(self, params: Mapping[str, Tensor]):
        """The module holds ``params`` in place of its tensors of those names until the block ends (the
        originals are put back, also on an exception).  :meth:`ChainEvaluator._loop_loss_and_grad` holds a
        chain's tensors through the backward pass: a model that recomputes part of its forward during
        backward (activation checkpointing, ``torch.utils.checkpoint``) then recomputes it at the chain's
        parameters, not at the module's own."""
        saved: list[tuple[dict, str, Any]] = []
        try:
            for name, t in params.items():
                for store, attr in self.slots[name]:
                    saved.append((store, attr, store[attr]))
                    store[attr] = t
            yield
        finally:
            for store, attr, old in reversed(saved):
                store[attr] = old


def _call_module(model: nn.Module, params: Mapping[str, Tensor], x: Any,
                 aliases: Mapping[str, list[str]] | None = None, slots: ModuleSlots | None = None) -> Any:
    """``model(x)`` (``model(**x)`` for a mapping) with ``params`` substituted (``slots`` when given and
    covering every name, else ``functional_call``).

    ``aliases`` (from :func:`module_aliases`; used by ``functional_call`` only): for a module that
    reaches one parameter slot under several names, the other slots holding the same tensor; they are
    substituted explicitly, with ``tie_weights=False``."""
    from torch.func import functional_call

    args, kwargs = ((), dict(x)) if isinstance(x, Mapping) else ((x,), {})
    takes = _TAKES_USE_CACHE.get(type(model))  # a dict lookup: torch.compile traces this function
    if takes is None:
        takes = _TAKES_USE_CACHE[type(model)] = _takes_use_cache(type(model))
    if takes and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    if slots is not None and slots.covers(params):  # one slot per (module, attribute): aliases included
        return slots.substitute(model, params, args, kwargs)
    if aliases is not None:
        params = dict(params)
        for name, others in aliases.items():
            if name in params:
                for other in others:
                    params[other] = params[name]
        return functional_call(model, params, args, kwargs, tie_weights=False)
    return functional_call(model, params, args, kwargs)


_TAKES_USE_CACHE: dict[type, bool] = {}


def _takes_use_cache(cls: type) -> bool:
    """Whether ``cls.forward`` names a ``use_cache`` argument (Hugging Face models).  slt calls such a
    model with ``use_cache=False`` unless the inputs say otherwise: a loss needs no key/value cache, and
    building one costs memory per chain and time, and breaks vmap where the cache is written in place
    (Mamba's convolution and state caches)."""
    try:
        return "use_cache" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def module_aliases(model: nn.Module) -> dict[str, list[str]] | None:
    """``None`` unless some parameter or buffer slot (module, attribute) is reachable under
    several names (a submodule registered twice, as TransformerLens' ``TransformerBridge``
    does).  ``torch.func.functional_call`` with ``tie_weights=True`` swaps such a slot once per
    name and restores it to the swapped-in tensor, corrupting the module; then this returns,
    for the first name of every tensor, the first names of its *other* slots (tied weights of
    different modules, e.g. a language model's input and output embeddings), which
    :func:`call_module` substitutes explicitly."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    groups: dict[int, list[tuple[str, tuple[int, str]]]] = {}
    for name, t in named:
        owner, _, attr = name.rpartition(".")
        slot = (id(model.get_submodule(owner)) if owner else id(model), attr)
        groups.setdefault(id(t), []).append((name, slot))
    repeated = False
    out: dict[str, list[str]] = {}
    for members in groups.values():
        first_of_slot: dict[tuple[int, str], str] = {}
        for name, slot in members:
            if slot in first_of_slot:
                repeated = True
            else:
                first_of_slot[slot] = name
        names = list(first_of_slot.values())
        out[members[0][0]] = names[1:]
    if not repeated:
        return None
    return {k: v for k, v in out.items() if v}


def describe(obj: Any, depth: int = 0) -> str:
    """A short description of a tensor, a mapping, a tuple or a dataclass (``ModelOutput``) of
    tensors, or any other object (its type), for error messages."""
    if isinstance(obj, Tensor):
        return f"tensor {tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if depth >= 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        items = list(obj.items())
        body = ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in items[:6])
        more = f", ... ({len(items)} keys)" if len(items) > 6 else ""
        name = "dict" if type(obj) is dict else type(obj).__name__
        return f"{name}{{{body}{more}}}"
    if isinstance(obj, (tuple, list)):
        body = ", ".join(describe(v, depth + 1) for v in obj[:4])
        more = f", ... ({len(obj)} items)" if len(obj) > 4 else ""
        return f"{type(obj).__name__}({body}{more})"
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [(f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj)]
        fields = [(k, v) for k, v in fields if v is not None]
        body = ", ".join(f"{k}={describe(v, depth + 1)}" for k, v in fields[:6])
        return f"{type(obj).__name__}({body})"
    return type(obj).__name__


def _chain_batch(batch: Batch, c: int) -> tuple[Any, Any, Tensor | None]:
    """Chain ``c``'s inputs, targets and weights (the batch itself when it is shared)."""
    if batch.shared:
        return batch.x, batch.y, batch.weights
    xc = _index(batch.x, c)
    yc = xc if batch.y is batch.x else _index(batch.y, c)
    return xc, yc, None if batch.weights is None else batch.weights[c]


def _row_block(batch: Batch, sl: slice) -> Batch:
    """Rows ``sl`` of a per-chain batch (a shared batch is the same for every block)."""
    if batch.shared:
        return batch
    x = _map(lambda v: v[sl], batch.x)
    y = x if batch.y is batch.x else _map(lambda v: v[sl], batch.y)
    return Batch(x, y, None if batch.weights is None else batch.weights[sl], False)


def _once(t: Any, shared: bool) -> tuple[Any, Any]:
    """``(value, in_dim)`` of a block's input for vmap: a shared batch, or a per-row one whose rows are
    all equal, is passed once (``None``: vmap broadcasts it); otherwise per row (``0``).  A mapping is
    decided column by column."""
    if shared:
        return t, None
    if isinstance(t, Tensor):
        if t.shape[0] > 1 and torch.equal(t[1:], t[:1].expand_as(t[1:])):
            return t[0], None
        return t, 0
    if isinstance(t, Mapping):
        pairs = {k: _once(v, False) for k, v in t.items()}
        vals = {k: v for k, (v, _) in pairs.items()}
        dims = {k: d for k, (_, d) in pairs.items()}
        if isinstance(t, Columns):  # in_dims must have the input's pytree type
            return Columns(vals), Columns(dims)
        return vals, dims
    return t, 0


def _index(t: Any, c: int) -> Any:
    return t[c] if isinstance(t, Tensor) else _map(lambda v: v[c], t)

#: why each path was chosen, as reported in ``diagnostics["path_reason"]``
PATH_REASONS = {"native": "model defines forward_chains", "vmap": "torch.func.vmap over functional_call",
                "loop": "requested"}


#: the values of ``vectorize``
VECTORIZE = ("auto", "native", "vmap", "loop", "compile")


def choose_path(model: nn.Module, vectorize: str) -> str:
    """``"auto"`` -> ``"native"`` when the model has ``forward_chains``, else ``"vmap"``; ``"compile"``
    -> ``"vmap"`` (its step compiled when the run starts: :func:`slt.target.fastest_path`)."""
    if vectorize not in VECTORIZE:
        raise ValueError(f"vectorize must be one of {', '.join(map(repr, VECTORIZE))}, got {vectorize!r}")
    if vectorize == "compile":
        return "vmap"
    if vectorize != "auto":
        return vectorize
    return "native" if hasattr(model, "forward_chains") else "vmap"


class ChainEvaluator:
    """Per-chain losses and gradients of C parameter vectors in one computation.

    Parameters
    ----------
    model
        The module (only its structure, buffers and frozen parameters are used).
    spec
        Which parameters are sampled.
    adapter
        The loss.
    path
        ``"native"``, ``"vmap"`` or ``"loop"``.
    structured
        Inputs, targets or outputs are not plain tensors (mappings, tuples,
        ``ModelOutput``): per-sample losses are then computed inside each
        chain's call instead of from stacked outputs.
    autocast
        ``None``, or a half-precision dtype the model runs in under ``torch.autocast``
        (:func:`resolve_autocast`); the loss, gradients and sampler stay in the
        parameters' dtype.  Not for hand-written gradients (``analytic``).
    """

    def __init__(self, model: nn.Module, spec: ParamSpec, adapter: LossAdapter, path: str,
                 structured: bool = False, autocast: torch.dtype | None = None):
        if path not in ("native", "vmap", "loop"):
            raise ValueError(f"unknown vectorization path {path!r}")
        if path == "native" and not hasattr(model, "forward_chains"):
            raise ValueError("vectorize='native' needs a model with forward_chains (slt.models.ChainModule)")
        self.model = model
        self.spec = spec
        self.adapter = adapter
        self.path = path
        self.structured = bool(structured)
        # hand-written per-chain gradients (tiny toy models): skips autograd entirely
        self.analytic = (
            path == "native"
            and hasattr(model, "supports_analytic_grad")
            and bool(model.supports_analytic_grad(adapter.loss_fn))
        )
        self.autocast = autocast
        if autocast is not None:
            self.analytic = False  # the model's own forward, under autocast, with autograd
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.aliases = module_aliases(model)
        #: where the model holds each tensor: calls substitute through them (:class:`ModuleSlots`)
        self.slots = ModuleSlots(model)
        #: what the evaluator changed while running (vmap blocks made smaller after running out of memory)
        self.notes: list[str] = []
        #: vmap path: evaluate at most this many rows (chains) at once (None: all); bounds the
        #: activation memory of a gradient evaluation to that of ``max_rows`` chains
        self.max_rows: int | None = None
        #: vmap and loop paths: the sampled parameters whose gradient is needed (None: all); the others'
        #: gradient is 0 and autograd skips computing it (weight-refined LLCs: only the parameters some
        #: restriction moves)
        self.grad_names: set[str] | None = None
        #: vmap path, weight-refined runs (:func:`slt.groups.row_plan`): ``(R, blocks)`` with each block
        #: ``(rows, names)``: rows that move only the parameters ``names`` (and share one checkpoint); in a
        #: block the other parameters are passed once, unbatched, and an input that is the same for
        #: every row of the block is passed once — vmap then evaluates what lies upstream of the moved
        #: parameters once per block and autograd stops at the lowest of them.  Used for ``R`` rows only.
        self.row_plan: tuple[int, list[tuple[Tensor, frozenset[str]]]] | None = None
        #: the row plan failed on this model (an in-place op mixing its batched and unbatched activations):
        #: not tried again; every row batched
        self.row_plan_failed = False
        #: vmap path: a :class:`slt.compiled.CompiledStep` serving the calls of its signature (the run's
        #: step); set by :func:`slt.target.fastest_path`
        self.compiled: Any = None
        #: vmap path: Hugging Face configs run with ``"eager"`` attention during vmapped calls
        #: (:func:`hf_attention_configs`; set by :func:`slt.target._evaluator` when ``sdpa`` fails under vmap)
        self.hf_eager: list[Any] = []
        #: vmap path: how it failed with a minibatch per chain while it works on inputs the chains share
        #: (:class:`slt.target.PerRowFailure`; such runs take the loop, :meth:`slt.target.Target.batches`)
        self.per_row_failure: Any = None
        # functional_call may update buffers in place (BatchNorm running stats in
        # training mode): work on private copies so the user's module is never modified.
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        #: buffers and frozen parameters whose values differ between the checkpoints of a batched run (a
        #: BatchNorm network's running statistics saved during training): ``name -> (K, *shape)``, checkpoint
        #: ``k``'s value in row ``k``; ``None``: every row uses the module's own (:attr:`buffers`).  Rows are
        #: checkpoint-major in every evaluation (:meth:`row_checkpoints`).  Set by
        #: :func:`slt.target.prepare_target`; private copies, like :attr:`buffers`.
        self.checkpoint_tensors: dict[str, Tensor] | None = None
        #: activation modules run with a fused forward in every call (:func:`fused_activations`)
        self.fused = fused_activations(model)
        #: modules whose padding check batched calls skip (:func:`padding_checkers`)
        self.padding_checks = padding_checkers(model)

    def call(self, params: Mapping[str, Tensor], x: Any) -> Any:
        """The model at ``params`` (name -> tensor, buffers included) on ``x``: :func:`call_module`
        with this evaluator's aliases and precision, its activation modules fused (:attr:`fused`), and
        Hugging Face's padding check skipped when the ids are batched (:attr:`padding_checks`)."""
        with _fused(self.fused), _padding_check_off_when_batched(self.padding_checks, x):
            return call_module(self.model, params, x, self.aliases, self.autocast, self.slots)

    def row_checkpoints(self, R: int) -> Tensor | None:
        """``(R,)`` the checkpoint of each of ``R`` rows, or ``None`` when every checkpoint holds the same
        buffers (:attr:`checkpoint_tensors` unset).  Every evaluation lays its rows out checkpoint-major
        — the run's ``K·M·D·C`` chains (:meth:`slt.target.Target.rows`), the ``K`` points w*, the probes
        of the step-size rule (``K·P``) — so of ``R`` rows, row ``r`` belongs to checkpoint ``r // (R / K)``."""
        block = self._checkpoint_block(R)
        if block is None:
            return None
        return torch.arange(R, device=next(iter(self.checkpoint_tensors.values())).device) // block

    def _checkpoint_block(self, R: int) -> int | None:
        """Rows per checkpoint of an evaluation of ``R`` rows (:meth:`row_checkpoints`), or ``None`` without
        :attr:`checkpoint_tensors`."""
        ct = self.checkpoint_tensors
        if not ct:
            return None
        K = next(iter(ct.values())).shape[0]
        if R % K:
            raise RuntimeError(f"an evaluation of {R} rows does not split into the {K} checkpoints' blocks, which "
                               "hold different buffers (slt.evaluator.ChainEvaluator.checkpoint_tensors)")
        return R // K

    def row_state(self, ck: Tensor | None) -> dict[str, Tensor]:
        """The :attr:`checkpoint_tensors` of the rows whose checkpoints are ``ck`` (``(r,)``, from
        :meth:`row_checkpoints`): ``name -> (r, *shape)``, batched with the rows under vmap; empty when ``ck``
        is ``None``."""
        if ck is None or not self.checkpoint_tensors:
            return {}
        return {n: t.index_select(0, ck) for n, t in self.checkpoint_tensors.items()}

    def chain_buffers(self, R: int, c: int) -> dict[str, Tensor]:
        """The buffers row ``c`` of an evaluation of ``R`` rows runs with (the loop paths): :attr:`buffers`, and
        its checkpoint's :attr:`checkpoint_tensors` over them (the checkpoint found by arithmetic, without
        reading a device tensor)."""
        block = self._checkpoint_block(R)
        if block is None:
            return self.buffers
        return {**self.buffers, **{n: t[c // block] for n, t in self.checkpoint_tensors.items()}}

    def outputs(self, flat: Tensor, x: Tensor, shared: bool = False) -> Tensor:
        """(C, d), (C, B, ...) -> (C, B, ...) model outputs; with ``shared`` the
        input is one (B, ...) batch for all chains."""
        C = flat.shape[0]
        if shared and self.path != "vmap":
            x = _map(lambda t: t.unsqueeze(0).expand(C, *t.shape), x)
        if self.path == "native":
            if self.checkpoint_tensors:
                raise ValueError("checkpoints that differ in buffers or frozen parameters need the vmap or loop path")
            params = self.spec.unflatten(flat)
            for n, p in self.frozen.items():
                params[n] = p.unsqueeze(0).expand(C, *p.shape)
            if self.autocast is None:
                return self.model.forward_chains(params, x)
            with torch.autocast(device_type=flat.device.type, dtype=self.autocast):
                out = self.model.forward_chains(params, x)
            return _upcast(out, flat.dtype)
        if self.path == "vmap":
            buffers = self.buffers

            def one(p: Tensor, xb: Tensor, t: Mapping[str, Tensor]) -> Tensor:
                return self.call({**self.spec.unflatten(p), **buffers, **t}, xb)

            with _vmap_attention(self.hf_eager):
                return torch.vmap(one, in_dims=(0, None if shared else 0, 0))(flat, x,
                                                                              self.row_state(self.row_checkpoints(C)))
        outs = []
        for c in range(C):
            params = {**self.spec.unflatten(flat[c]), **self.chain_buffers(C, c)}
            outs.append(self.call(params, _index(x, c)))
        return torch.stack(outs)

    def losses(self, flat: Tensor, batch: Batch) -> Tensor:
        """(C, d) -> (C,) minibatch losses (weighted when the batch carries weights)."""
        C = flat.shape[0]
        if self.path == "native":
            b = batch.per_chain(C)
            out = self.outputs(flat, b.x)
            return self.adapter.chain_loss(out, b.y, b.weights)
        if self.path == "vmap":
            return self._vmap_losses(self.spec.unflatten(flat), batch, self.row_checkpoints(C))
        return torch.stack([self._chain_loss(self.spec.unflatten(flat[c]), batch, c, self.chain_buffers(C, c))
                            for c in range(C)])

    def _vmap_losses(self, params: Mapping[str, Tensor], batch: Batch, ck: Tensor | None = None) -> Tensor:
        """``name -> (C, *shape)`` -> (C,) losses, vmapped over chains (and over the batch's chain
        dimension unless it is shared); ``ck``: the rows' checkpoints (:meth:`row_checkpoints`)."""
        buffers = self.buffers

        def one(p: Mapping[str, Tensor], xb: Any, yb: Any, wb: Tensor | None, t: Mapping[str, Tensor]) -> Tensor:
            out = self.call({**p, **buffers, **t}, xb)
            return self.adapter.single_loss(out, yb, wb)

        bd = None if batch.shared else 0  # a shared batch is broadcast, not copied
        in_dims = (0, bd, bd, bd if batch.weights is not None else None, 0)
        with _vmap_attention(self.hf_eager):
            return torch.vmap(one, in_dims=in_dims)(dict(params), batch.x, batch.y, batch.weights, self.row_state(ck))

    def _chain_loss(self, params: Mapping[str, Tensor], batch: Batch, c: int, buffers: Mapping[str, Tensor]) -> Tensor:
        """Chain ``c``'s loss with its parameters ``name -> shape`` and ``buffers`` (:meth:`chain_buffers`), on its
        slice of the batch."""
        xc, yc, wc = _chain_batch(batch, c)
        return self.adapter.single_loss(self.call({**params, **buffers}, xc), yc, wc)

    def loss_and_grad(self, flat: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(C, d) -> ((C,) losses, (C, d) gradients); chains are independent, so the
        gradient of the summed loss is the per-chain gradient."""
        if self.analytic:
            C = flat.shape[0]
            b = batch.per_chain(C)
            params = self.spec.unflatten(flat)
            for n, p in self.frozen.items():
                params[n] = p.unsqueeze(0).expand(C, *p.shape)
            with torch.no_grad():
                losses, grads = self.model.loss_and_grad_chains(params, b.x, b.y, b.weights, self.adapter.loss_fn)
            grad = torch.cat([grads[n].reshape(C, -1) for n in self.spec.names], dim=1)
            return losses, grad
        if self.path == "loop":
            return self._loop_loss_and_grad(flat, batch)
        if self.path == "vmap":
            return self._vmap_loss_and_grad(flat, batch)
        with torch.enable_grad():
            p = flat.detach().requires_grad_(True)
            losses = self.losses(p, batch)
            (grad,) = torch.autograd.grad(losses.sum(), p)
        return losses.detach(), grad

    def _leaves(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` per parameter, each a leaf that requires grad: autograd then returns
        each parameter's gradient directly (no backward through a split of the flat vector, which
        for the loop path zero-fills a whole (C, d) tensor per chain)."""
        need = self.grad_names
        return {n: v.detach().requires_grad_(need is None or n in need)
                for n, v in self.spec.unflatten(flat.detach()).items()}

    def _grads_into(self, loss: Tensor, leaves: dict[str, Tensor], out: Tensor) -> Tensor:
        """Backward of ``loss`` with each leaf's gradient accumulated straight into its slice of
        ``out`` (..., d): the slices are zeroed and set as the leaves' ``.grad``, and autograd adds
        each parameter's gradient into its ``.grad`` in place as soon as it is computed (0 + g = g
        exactly), so the per-parameter gradients are never all alive together and are not
        concatenated.  ``leaves`` maps names to leaves, any subset of the parameters: the slices of
        the others (and of an unused parameter) stay 0."""
        out.zero_()
        if not loss.requires_grad or not leaves:  # the loss depends on no parameter whose gradient is needed
            return out
        slots = self.spec.unflatten(out)
        for name, leaf in leaves.items():
            leaf.grad = slots[name]
        inputs = [v for v in leaves.values() if v.requires_grad]
        if _LAYOUT_NOTE[0] or all(s.is_contiguous() for s in slots.values()):
            torch.autograd.backward(loss, inputs=inputs)
        else:
            _backward_without_layout_note(loss, inputs)
        for name, leaf in leaves.items():
            if leaf.grad is not slots[name] and leaf.grad is not None:  # autograd replaced it: copy (not expected)
                slots[name].copy_(leaf.grad)
            leaf.grad = None
        return out

    def _vmap_loss_and_grad(self, flat: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Rows in blocks of at most ``max_rows`` (all at once when ``None``): activations and
        autograd buffers are those of one block; each row's loss and gradient do not depend on the
        blocks (rows are independent; checked in tests/test_memory.py).

        When an evaluation runs out of memory (CUDA's ``OutOfMemoryError``, or a CPU allocation that
        fails), the block is halved and the evaluation repeated, down to one row; the smaller block
        is kept for the rest of the run and said in :attr:`notes` (the run's ``config["setup_notes"]``).
        One row that does not fit is an error naming the batch size."""
        R = flat.shape[0]
        if self.compiled is not None and self.compiled.matches(flat, batch):
            return self.compiled(flat, batch)
        while True:
            try:
                return self._vmap_rows(flat, batch)
            except (RuntimeError, MemoryError) as e:
                if not out_of_memory(e):
                    raise
                kind, first = type(e).__name__, (str(e).strip().splitlines() or [""])[0][:200]
                what = f"{kind}: {first}" if first else kind
            # out of the handler, so that the failed attempt's frames (and their tensors) are released
            step = self._rows_per_call(R)
            if flat.is_cuda:
                torch.cuda.empty_cache()
            if step <= 1:
                raise _chain_too_large(flat.device, what)
            self.max_rows = step // 2
            self.notes.append(f"vmap in blocks of {self.max_rows} rows: {step} rows at once ran out of memory "
                              f"on {flat.device} ({kind})")

    def _vmap_rows(self, flat: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """:meth:`_vmap_loss_and_grad`'s evaluation at the current ``max_rows``."""
        R = flat.shape[0]
        if self.row_plan is not None and self.row_plan[0] == R:
            try:
                return self._planned_loss_and_grad(flat, batch, self.row_plan[1])
            except RuntimeError as e:  # the plan mixes batched and unbatched activations: every row batched
                if out_of_memory(e):
                    raise
                self.row_plan, self.row_plan_failed = None, True
                first = (str(e).strip().splitlines() or [""])[0][:200]
                self.notes.append(f"vmap with every parameter batched: passing the parameters no restriction of a "
                                  f"block moves once failed on this model ({type(e).__name__}: {first}), as an "
                                  "in-place update of an activation they alone compute by one the restricted "
                                  "ones change does")
        out = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)  # contiguous (flat may be a broadcast)
        step = self._rows_per_call(R)
        ck = self.row_checkpoints(R)
        if step >= R:
            return self._vmap_block(flat, batch, out, ck), out
        losses = torch.empty(R, dtype=flat.dtype, device=flat.device)
        for r0 in range(0, R, step):
            sl = slice(r0, min(r0 + step, R))
            losses[sl] = self._vmap_block(flat[sl], _row_block(batch, sl), out[sl], None if ck is None else ck[sl])
        return losses, out

    def _rows_per_call(self, R: int) -> int:
        """Rows evaluated at once out of ``R``: :attr:`max_rows`, or all of them when it is ``None``."""
        return R if not self.max_rows else min(R, max(1, int(self.max_rows)))

    def _vmap_block(self, flat: Tensor, batch: Batch, out: Tensor, ck: Tensor | None = None) -> Tensor:
        leaves = self._leaves(flat)
        with torch.enable_grad():
            losses = self._vmap_losses(leaves, batch, ck)
            self._grads_into(losses.sum(), leaves, out)
        return losses.detach()

    def _planned_loss_and_grad(self, flat: Tensor, batch: Batch,
                               blocks: list[tuple[Tensor, frozenset[str]]]) -> tuple[Tensor, Tensor]:
        """:attr:`row_plan`'s evaluation: per block (in pieces of at most ``max_rows`` rows), the moved
        parameters batched over its rows, the others once (the block's first row: every row of the
        block holds w* there), and each input column once when all rows of the block have the same.
        Gradients of parameters a block does not move are 0 (its restrictions mask them anyway)."""
        R = flat.shape[0]
        out = torch.zeros(flat.shape, dtype=flat.dtype, device=flat.device)
        losses = torch.empty(R, dtype=flat.dtype, device=flat.device)
        step = self._rows_per_call(R)
        buffers = self.buffers
        ck = self.row_checkpoints(R)
        for rows, names in blocks:
            for sub in rows.split(step):
                state = self.row_state(None if ck is None else ck.index_select(0, sub))
                fb = flat.index_select(0, sub)
                views = self.spec.unflatten(fb)
                moved = {n: v.detach().requires_grad_(True) for n, v in views.items() if n in names}
                fixed = {n: v[0].detach() for n, v in views.items() if n not in names}
                bb = batch if batch.shared else _row_block(batch, sub)
                x, xd = _once(bb.x, batch.shared)
                y, yd = (x, xd) if bb.y is bb.x else _once(bb.y, batch.shared)
                w, wd = (None, None) if bb.weights is None else _once(bb.weights, batch.shared)

                def one(p: Mapping[str, Tensor], xb: Any, yb: Any, wb: Tensor | None,
                        t: Mapping[str, Tensor]) -> Tensor:
                    return self.adapter.single_loss(self.call({**fixed, **p, **buffers, **t}, xb), yb, wb)

                block_out = torch.empty(fb.shape, dtype=flat.dtype, device=flat.device)
                with torch.enable_grad(), _vmap_attention(self.hf_eager):
                    lb = torch.vmap(one, in_dims=(0, xd, yd, wd, 0))(moved, x, y, w, state)
                    self._grads_into(lb.sum(), moved, block_out)  # unmoved parameters' slices stay 0
                out.index_copy_(0, sub, block_out)
                losses.index_copy_(0, sub, lb.detach().to(losses.dtype))  # a loss in another dtype (HF: float32)
        return losses, out

    def _loop_loss_and_grad(self, flat: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """One chain at a time, forward then backward (activations of one chain alive at once)."""
        C = flat.shape[0]
        losses = torch.empty(C, dtype=flat.dtype, device=flat.device)
        grad = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)
        for c in range(C):
            leaves = self._leaves(flat[c])
            buffers = self.chain_buffers(C, c)
            held = {**leaves, **buffers}
            try:  # held through the backward pass: activation checkpointing recomputes at the chain's parameters,
                # with the same (fused) activations as the forward it saved
                with torch.enable_grad(), _fused(self.fused), (self.slots.holding(held) if self.slots.covers(held)
                                                              else nullcontext()):
                    loss = self._chain_loss(leaves, batch, c, buffers)
                    self._grads_into(loss, leaves, grad[c])
            except (RuntimeError, MemoryError) as e:
                if not out_of_memory(e):
                    raise
                raise _chain_too_large(flat.device, type(e).__name__) from e
            losses[c] = loss.detach()
        return losses, grad

    def per_sample(self, flat: Tensor, x: Any, y: Any, adapter: LossAdapter | None = None) -> Tensor:
        """(K, d), (n, ...), (n, ...) -> (K, n) per-sample losses, no grad (of ``adapter``'s loss when
        given, else of the run's)."""
        K = flat.shape[0]
        adapter = self.adapter if adapter is None else adapter
        if not self.structured:
            with torch.no_grad():
                out = self.outputs(flat, x, shared=True)
                return adapter.per_sample(out, y.unsqueeze(0).expand(K, *y.shape), 2)
        # outputs that are not tensors (a ModelOutput with a cache) cannot be stacked over
        # chains: per-sample losses are computed inside each chain's call
        x, y = _plain(x), (None if y is x else _plain(y))
        y = x if y is None else y
        with torch.no_grad():
            return self.apply_rows(flat, x, y, adapter.per_sample)

    def apply_rows(self, flat: Tensor, x: Any, y: Any, fn: Callable[[Any, Any, int], Tensor]) -> Tensor:
        """``fn(output, target, lead)`` for every row of ``flat`` ``(R, d)`` on the shared inputs ``x`` and
        targets ``y``, stacked ``(R, ...)``: on the native path once over all rows (``lead`` = 2, targets
        expanded to ``(R, ...)``), else per row (``lead`` = 1) — vmapped, or in a loop — each row with its
        checkpoint's buffers (:meth:`row_state`, :meth:`chain_buffers`)."""
        R = flat.shape[0]
        if self.path == "native":
            out = self.outputs(flat, x, shared=True)
            return fn(out, _map(lambda t: t.unsqueeze(0).expand(R, *t.shape), y), 2)
        if self.path == "vmap":
            buffers = self.buffers

            def one(p: Tensor, t: Mapping[str, Tensor]) -> Tensor:
                return fn(self.call({**self.spec.unflatten(p), **buffers, **t}, x), y, 1)

            with _vmap_attention(self.hf_eager):
                return torch.vmap(one)(flat, self.row_state(self.row_checkpoints(R)))
        return torch.stack([fn(self.call({**self.spec.unflatten(flat[c]), **self.chain_buffers(R, c)}, x), y, 1)
                            for c in range(R)])


def to_device(t: Any, device, dtype) -> Any:
    """Floating tensors to ``device`` and ``dtype``; others (labels) to ``device`` only (every
    column of a mapping)."""
    if isinstance(t, Tensor):
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)
    return _map(lambda v: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device), t)


def probe_batch(source: Data | LoaderSource, size: int, device, dtype) -> Batch:
    """The first ``size`` samples of a dataset (unweighted), or the next batch of a loader."""
    if isinstance(source, Data):
        m = min(size, source.n)
        sub = Data(source.x[:m], None if source.y is None else source.y[:m], None)
        return sub.full_batch()
    x, y, w = source.next_batch()
    x = to_device(x, device, dtype)
    y = x if y is None else to_device(y, device, dtype)
    return Batch(x, y, None, True)


#: Losses whose target is class indices (or class probabilities shaped like the output).
_CLASSIFICATION = ("cross_entropy", "nll_loss", "CrossEntropyLoss", "NLLLoss")
#: Elementwise losses whose target must have the output's shape.
_ELEMENTWISE = ("mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "binary_cross_entropy_with_logits",
                "binary_cross_entropy", "poisson_nll_loss", "soft_margin_loss", "MSELoss", "L1Loss", "HuberLoss",
                "SmoothL1Loss", "BCEWithLogitsLoss", "BCELoss", "PoissonNLLLoss", "SoftMarginLoss")


def _loss_name(loss_fn: Any) -> str:
    while isinstance(loss_fn, functools.partial):  # functools.partial(F.mse_loss, ...): the function's name
        loss_fn = loss_fn.func
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


def _broadcast_error(name: str, on: str, out: Any, y: Any, said: str = "") -> ValueError:
    """The error for a loss that broadcasts the model's output against a target of another shape."""
    fix = (f"Reshape the target (e.g. Y.reshape({', '.join(['n'] + [str(s) for s in out.shape[1:]])})) or the output"
           if isinstance(out, Tensor) else "Make the prediction and the target the same shape in loss_fn")
    return ValueError(
        f"{name}: the model's output and the target have different shapes on {on} of the data (output "
        f"{describe(out)}, target {describe(y)}){said}; the loss would broadcast them into a wrong per-sample "
        f"loss. {fix}")


def _columns_hint(model: nn.Module, x: Mapping[str, Any]) -> str:
    """When a mapping's keys are not parameters named in ``forward`` (a model taking ``**kwargs`` accepts
    them and fails later): how a mapping is read, and the form of a data-refined run's distributions."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return ""
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = [k for k in x if k not in named]
    if not unknown:
        return ""
    return (f" ({', '.join(map(repr, unknown[:4]))} {'is not a parameter' if len(unknown) == 1 else 'are not parameters'}"
            f" of {type(model).__name__}.forward: a mapping of tensors is read as the columns of one dataset, each "
            "passed to the model by keyword; for a data-refined run give each distribution as a dataset: "
            "data={'A': (X_A,), 'B': (X_B,)} or {'A': slt.Data(...), ...})")


def _index_hint(model: nn.Module, x: Any) -> str:
    """What an embedding's "index out of range" compares (the probe's largest integer input and its length
    against the model's embedding sizes; Hugging Face configs' vocabulary and positions), or ''."""
    ints = [t for t in (x.values() if isinstance(x, Mapping) else [x])
            if isinstance(t, Tensor) and not t.is_floating_point() and t.numel()]
    if not ints:
        return ""
    largest, length = max(int(t.max()) for t in ints), max(t.shape[-1] for t in ints if t.ndim >= 1)
    sizes = sorted({m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)})
    cfg = getattr(model, "config", None)
    said = [f"{k} = {getattr(cfg, k)}" for k in ("vocab_size", "n_positions", "max_position_embeddings")
            if isinstance(getattr(cfg, k, None), int)]
    return (f" (an embedding lookup: the data's largest integer input is {largest} and its sequences have {length} "
            f"positions, the model's embeddings have {', '.join(map(str, sizes)) or 'no nn.Embedding'} rows"
            + (f" ({', '.join(said)})" if said else "") + ": token ids must be below the vocabulary size and "
            "sequences no longer than the positions the model has)")


def _logits_of(out: Any) -> Any:
    """The prediction tensor of a model output: itself, or its ``logits`` (a Hugging Face ``ModelOutput``)."""
    return out if isinstance(out, Tensor) else getattr(out, "logits", None)


def _loss_failure_hint(e: Exception, loss_fn: Any, out: Any, x: Any, y: Any) -> str:
    """What to do about ``loss_fn`` failing on the model's output ``out`` for inputs ``x`` and target ``y``
    ('' where the loss's own message says it all, or no cause is recognised)."""
    if _loss_name(loss_fn) == "causal_lm" and isinstance(e, (KeyError, ValueError)):
        return ""  # causal_lm names what it misses in the batch
    logits = _logits_of(out)
    if (isinstance(logits, Tensor) and logits.ndim == 3 and isinstance(y, Tensor) and not y.is_floating_point()
            and tuple(y.shape) == tuple(logits.shape[:2])):
        return (f" (logits {tuple(logits.shape)} of a language model and token ids {tuple(y.shape)}: for the "
                "next-token loss pass loss_fn=slt.losses.causal_lm (it shifts the targets and masks padding); "
                "F.cross_entropy takes (N, V) logits, or classes on dimension 1)")
    hint = _label_hint(loss_fn, logits, y)
    if (not hint and isinstance(y, Tensor) and not y.is_floating_point()
            and any(f"for '{t}'" in str(e) for t in ("Long", "Int", "Short", "Byte", "Bool"))):
        hint = (f" (an operation that needs floats got integers, and the target is {describe(y)}: does loss_fn "
                "pass the model's output and the target in the order the loss takes them, e.g. "
                "F.cross_entropy(output, target)?)")
    holes = [i for i, o in enumerate(out) if o is None] if isinstance(out, (tuple, list)) else []
    if not isinstance(out, Tensor) and isinstance(logits, Tensor):
        hint += (f" (the model returns a {type(out).__name__}: take its logits in the loss, e.g. "
                 "lambda out, y: F.cross_entropy(out.logits, y))")
    elif isinstance(out, Mapping) and out and isinstance(next(iter(out.values())), Tensor):
        key = "logits" if isinstance(out.get("logits"), Tensor) else next(iter(out))
        hint += (f" (the model returns a {type(out).__name__}: take the prediction in the loss, e.g. "
                 f"lambda out, y: loss(out[{key!r}], y))")
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor) and not holes:
        hint += (f" (the model returns a {type(out).__name__}: take the prediction in the loss, e.g. "
                 "lambda out, y: loss(out[0], y))")
    if holes and not isinstance(x, Mapping):
        k = holes[0]
        hint += (f" (element {k} of the output is None: a forward that computes some outputs only when it is given "
                 "more inputs — nanoGPT's forward(idx, targets) returns the last position's logits and loss=None "
                 "without targets — gets them by keyword from a mapping: data = {'idx': X, 'targets': Y} and "
                 f"loss_fn = lambda out, _: out[{k}])")
    return hint


def _label_hint(loss_fn: Any, out: Any, y: Any) -> str:
    """A hint for the usual label mistakes of the known PyTorch losses ('' if none applies)."""
    name = _loss_name(loss_fn)
    if not (isinstance(out, Tensor) and isinstance(y, Tensor)):
        return ""
    if not out.is_floating_point() and y.is_floating_point():
        return (f" (loss_fn(output, target) got an integer output {describe(out)} and a float target: loss_fn is "
                "called as loss_fn(model output, target); are its arguments the other way round?)")
    if name in ("binary_cross_entropy_with_logits", "BCEWithLogitsLoss", "binary_cross_entropy", "BCELoss") \
            and not y.is_floating_point():
        return f" ({name} needs float targets (0./1. or probabilities): pass them as y.float(), got {describe(y)})"
    if name in _CLASSIFICATION:
        if not y.is_floating_point() and y.dtype not in (torch.int64, torch.uint8):
            return f" ({name} needs class indices as int64: pass the labels as y.long(), got {describe(y)})"
        probs = y.is_floating_point() and y.shape == out.shape
        indices = not y.is_floating_point() and out.ndim >= 1 and y.shape == out.shape[:1] + out.shape[2:]
        if not (probs or indices):
            return (f" ({name} needs integer class indices of shape {tuple(out.shape[:1] + out.shape[2:])} "
                    f"or class probabilities of the output's shape {tuple(out.shape)}; got {describe(y)})")
    return ""


def own_tensors(model: nn.Module, params: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Copies of ``model``'s parameters (or ``params``, reused) and fresh copies of its buffers for a
    probe call: a forward may write into either (BatchNorm's running statistics; an ``Embedding`` with
    ``max_norm`` renormalizes rows of its weight in place), and the user's model is never modified."""
    if params is None:
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {**params, **{n: b.clone() for n, b in model.named_buffers()}}


def validate_model_and_loss(model: nn.Module, adapter: LossAdapter, probe: Batch) -> Any:
    """Run the model and the loss once on a couple of samples; fail clearly.

    Returns the model's output on those samples (the caller learns its type)."""
    x = _map(lambda t: t[:2], probe.x)
    y = x if probe.y is probe.x else _map(lambda t: t[:2], probe.y)

    buffers = own_tensors(model)  # never touch the user's parameters or buffers
    aliases = module_aliases(model)
    call = "model(**inputs)" if isinstance(x, Mapping) else "model(x)"
    try:
        with torch.no_grad():
            out = call_module(model, buffers, x, aliases)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        what = f"inputs {describe(x)}" if isinstance(x, Mapping) else f"x of shape {tuple(x.shape)}"
        if not isinstance(x, (Tensor, Mapping)):
            what = f"x {describe(x)}"
        hint = ""
        if isinstance(x, Mapping) and isinstance(e, TypeError) and "argument" in str(e):
            hint = (" (every column of a mapping is passed to the model as a keyword: keep only its inputs, "
                    "e.g. dataset.select_columns([...]), or pass the target separately as (inputs, target); a "
                    "mapping {label: data set} of distributions for a data-refined LLC gives each data set as a "
                    "tuple, (X,) or (X, Y), or an slt.Data: a mapping of tensors is one data set's columns)")
        elif isinstance(e, TypeError) and "required positional argument" in str(e):
            hint = (" (a model with several inputs takes them as a mapping of named tensors, called as "
                    "model(**inputs): data = ({'x1': X1, 'x2': X2}, Y) for forward(self, x1, x2); the fields of a "
                    "dataset or batch are read as (x,), (x, y) or (x, y, weights))")
        elif isinstance(e, IndexError) and "index out of range" in str(e):
            hint = _index_hint(model, probe.x)
        elif isinstance(e, RuntimeError) and "dtype" in str(e) and isinstance(x, Tensor) and not (
                x.is_floating_point() or x.is_complex()) and x.dtype != torch.bool:
            hint = (f" (the inputs are {str(x.dtype).replace('torch.', '')}, and a layer with floating-point weights "
                    "needs floating-point inputs: pass them as x.float(), e.g. uint8 images as x.float() / 255; "
                    "token ids go to an nn.Embedding first)")
        if not hint and isinstance(x, Mapping):
            hint = _columns_hint(model, x)
        raise ValueError(
            f"the model failed on a batch of the data ({call} with {what}): {type(e).__name__}: {e}{hint}"
        ) from e
    rows = num_rows(x)
    on = f"the first {rows} sample{'s' if rows != 1 else ''}"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = adapter.loss_fn(out, y)
    except Exception as e:  # noqa: BLE001
        from .losses import model_loss

        if adapter.loss_fn is model_loss and isinstance(e, ValueError):
            raise  # the default loss_fn found no loss in the output: its message is the whole story
        hint = _loss_failure_hint(e, adapter.loss_fn, out, x, y)
        raise ValueError(
            f"loss_fn failed on {on} of the data: model output {describe(out)}, target {describe(y)}: "
            f"{type(e).__name__}: {e}{hint}"
        ) from e
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        if isinstance(loss, Tensor) and loss.numel() == 1:
            fix = ": reduce it to a 0-d tensor (.mean() over all dims, or .squeeze())"
        elif isinstance(loss, Tensor) and not _one_per_sample(model, adapter, probe, aliases, loss, rows):
            fix = (": its first dimension does not follow the batch size (one entry per task or output?): combine "
                   "the entries into the one loss the posterior should use, e.g. their sum (.sum()) or a weighted sum")
        elif isinstance(loss, Tensor):
            fix = ": average it over the batch (reduction='mean'), e.g. .mean()"
        elif isinstance(loss, Mapping) and "loss" not in loss:
            keys = ", ".join(repr(k) for k in list(loss)[:4]) + (", ..." if len(loss) > 4 else "")
            fix = (f": a mapping of {len(loss)} entries ({keys}): pass a loss_fn that returns the one loss the "
                   "posterior should use, e.g. lambda out, y: sum(my_loss(out, y).values()) for task losses")
        elif isinstance(loss, (tuple, list)) or isinstance(loss, Mapping):
            fix = (": pass a loss_fn that returns only the loss, e.g. lambda out, y: my_loss(out, y)"
                   + ("[0]" if isinstance(loss, (tuple, list)) else "['loss']"))
        elif isinstance(loss, (float, int)):
            fix = ": return the tensor itself (float(...) or .item() cuts it from the parameters' gradient)"
        else:
            fix = ""
        raise ValueError(
            f"loss_fn must return a scalar (0-d tensor, the mean loss over the batch); got {shape}{fix}"
        )
    if loss.is_floating_point() and not bool(torch.isfinite(loss.detach()).all()) and num_rows(probe.x) > rows:
        # a loss can be undefined on a few samples and fine on a batch (cross-entropy whose targets on
        # those samples are all ignore_index: 0/0): check the whole probe before calling it an error
        wide = _loss_on(model, adapter, probe.x, probe.y, aliases)
        if wide is not None:
            x, y, out, loss = probe.x, probe.y, wide[0], wide[1]
            rows = num_rows(x)
            on = f"the first {rows} samples"
    if loss.is_floating_point() and not bool(torch.isfinite(loss.detach()).all()):
        from .losses import _flatten

        outs = [t for t in _flatten(out)[0] if isinstance(t, Tensor)]
        bad = sum(int((~torch.isfinite(t)).sum()) for t in outs if t.is_floating_point())
        where = (f": {bad} of the model's {sum(t.numel() for t in outs)} output values are NaN or inf" if bad
                 else " (the model's output is finite: the loss makes it NaN or inf)")
        raise ValueError(
            f"the loss at w* is NaN or inf ({float(loss)}) on {on} of the data{where}; model output {describe(out)}, "
            f"target "
            f"{describe(y)}. Check the model and data (e.g. a log or a division of a value that can reach 0)"
        )
    name = _loss_name(adapter.loss_fn)
    for w in caught:  # PyTorch's regression losses warn when they broadcast: the per-sample loss would be wrong
        text = str(w.message)
        if "target size" in text and "broadcast" in text:
            raise _broadcast_error(name, on, out, y, f" and the loss broadcast them (PyTorch: {text!r})")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # (the others, as they were)
    _check_buffer_writes(model, aliases, buffers, x, y, adapter)
    _check_mean_reduction(model, aliases, x, y, adapter, loss)
    if isinstance(out, Tensor) and isinstance(y, Tensor) and name in _ELEMENTWISE and out.shape != y.shape:
        raise _broadcast_error(name, on, out, y)
    if isinstance(y, Tensor) and y.ndim >= 1:
        from .losses import _flatten

        # (a tensor output, or any tensor of a structured one: a (mean, variance) pair for GaussianNLLLoss)
        for o in ([out] if isinstance(out, Tensor) else [t for t in _flatten(out)[0] if isinstance(t, Tensor)]):
            if o.ndim >= 1 and (tuple(o.shape) == tuple(y.shape) + (1,) or tuple(y.shape) == tuple(o.shape) + (1,)):
                adapter.trailing_one = (tuple(o.shape), tuple(y.shape))
                break
    if isinstance(out, Tensor) and isinstance(y, Tensor) and name in _CLASSIFICATION:
        hint = _label_hint(adapter.loss_fn, out, y)
        if hint:
            raise ValueError(f"loss_fn got a target that does not fit the model's output on {on} of the data{hint}")
    if adapter.has_native_per_sample:
        ps = adapter.per_sample(out, y, 1)
        c = adapter.counts(y, 1, ps.dtype)
        mean = ps.mean() if c is None else count_weighted_mean(ps, c)
        if not torch.allclose(mean, loss, rtol=1e-4, atol=1e-6):
            raise ValueError(
                "the per-sample form of loss_fn does not average to loss_fn: "
                f"{float(mean):.6g} vs {float(loss):.6g}"
            )
    elif not (isinstance(out, Tensor) and isinstance(y, Tensor)):
        _check_per_sample_lift(adapter, out, y, loss)
    return out


def _loss_on(model: nn.Module, adapter: LossAdapter, x: Any, y: Any, aliases: Any) -> tuple[Any, Tensor] | None:
    """``(output, loss)`` on a batch when the loss there is a finite scalar, else ``None``."""
    try:
        with torch.no_grad():
            out = call_module(model, own_tensors(model), x, aliases)
            loss = adapter.loss_fn(out, y)
    except Exception:  # noqa: BLE001 - the two-sample error is the one reported
        return None
    if isinstance(loss, Tensor) and loss.ndim == 0 and bool(torch.isfinite(loss.detach())):
        return out, loss
    return None


def _one_per_sample(model: nn.Module, adapter: LossAdapter, probe: Batch, aliases: Any, loss: Tensor,
                    rows: int) -> bool:
    """Whether a non-scalar ``loss`` on the first ``rows`` samples has one entry per sample: its first dimension
    is ``rows``, and on the whole probe (when it has more rows) the probe's row count; a vector of task losses
    keeps its length."""
    if loss.shape[0] != rows:
        return False
    wide = num_rows(probe.x)
    if wide == rows:
        return True
    try:
        with torch.no_grad():
            other = adapter.loss_fn(call_module(model, own_tensors(model), probe.x, aliases), probe.y)
    except Exception:  # noqa: BLE001 - the first rows' shape is the one reported
        return True
    return not isinstance(other, Tensor) or other.ndim == 0 or other.shape[0] == wide


def _names(names: list[str], limit: int = 4) -> str:
    """``"a, b, c, d and 3 more"``: the first ``limit`` names (an empty one is the model itself)."""
    names = [n or "<model>" for n in names]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _dense(t: Tensor) -> Tensor:
    """``t``, or its dense copy when sparse (e.g. a graph's adjacency buffer): ``torch.equal`` has no sparse
    kernel."""
    return t if t.layout == torch.strided else t.to_dense()


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal shapes and values, NaN equal to NaN (sparse tensors compared densely, :func:`_dense`)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.layout != b.layout:
        return False
    a, b = _dense(a), _dense(b)
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


@contextmanager
def _replayed_rng(tensors: Any):
    """Inside: ``rewind()`` puts the global CPU (and the CUDA devices of ``tensors``) random state back
    where it was on entry, so that calls made after each rewind draw the same random numbers (active
    dropout then gives the same mask); on exit the state is restored (``torch.random.fork_rng``)."""
    cuda = sorted({t.device for t in tensors if isinstance(t, Tensor) and t.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=cuda):
        cpu_state, cuda_states = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]

        def rewind() -> None:
            torch.set_rng_state(cpu_state)
            for st, d in zip(cuda_states, cuda):
                torch.cuda.set_rng_state(st, d)

        yield rewind


def _first_rows(probe: Batch, rows: int) -> tuple[Any, Any]:
    """``(x, y)``: the first ``rows`` samples of ``probe`` (``y is x`` when the probe's target is its input)."""
    x = _map(lambda t: t[:rows], probe.x)
    return x, (x if probe.y is probe.x else _map(lambda t: t[:rows], probe.y))


@contextmanager
def _probe_losses(model: nn.Module, adapter: LossAdapter, x: Any, y: Any, tensors: Any):
    """Inside: ``loss_at(params)``, ``loss_fn`` of ``model`` at ``params`` (name -> tensor) on ``x, y``, on
    copies of the model's buffers, drawing the same random numbers at every call (:func:`_replayed_rng`
    over ``tensors``' devices): the probe of the set-up checks, which compare losses at nearby points."""
    aliases = module_aliases(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with _replayed_rng(tensors) as rewind:

        def loss_at(p: Mapping[str, Tensor]) -> Any:
            rewind()
            return adapter.loss_fn(call_module(model, {**p, **{k: v.clone() for k, v in buffers.items()}}, x,
                                               aliases), y)

        yield loss_at


def _check_buffer_writes(model: nn.Module, aliases: Mapping[str, list[str]] | None, buffers: dict[str, Tensor],
                         x: Any, y: Any, adapter: LossAdapter) -> None:
    """Refuse a model whose ``forward`` writes to its buffers in a way that changes its output.

    slt evaluates the model on its own copies of the buffers (the user's are never touched), so a
    forward that only keeps count (a call counter, BatchNorm's running statistics in train mode, a
    cache filled on the first call) is harmless.  One that updates state its output depends on (a
    running normaliser or a moving average updated in ``forward``) makes the loss of the same ``w``
    change with every evaluation: the chains then sample a target that moves while they sample it,
    and λ̂ mixes that drift with the geometry (seen as "draws below L(w*)" and a large R-hat).
    Detected on the probe: if the validation call changed a buffer, the model is called twice more on
    the same samples from fresh copies of the buffers (the second call sees what the first wrote),
    with the same random numbers (so active dropout is not taken for a change), and the two losses
    are compared."""
    written = [n for n, b in model.named_buffers() if n in buffers and not _same_values(buffers[n], b)]
    if not written:
        return
    fresh = own_tensors(model)
    losses: list[Tensor] = []
    failure = ""
    # the same random numbers for both calls (active dropout must not count as a change)
    with torch.no_grad(), _replayed_rng(fresh.values()) as rewind:
        for _ in range(2):
            rewind()
            try:  # the second call sees the buffers as the first left them
                losses.append(adapter.loss_fn(call_module(model, fresh, x, aliases), y).detach())
            except Exception as e:  # noqa: BLE001 - the state the first call wrote broke the second
                failure = f"{type(e).__name__}: {e}"
                break
    if len(losses) == 2 and _same_values(losses[0], losses[1]):
        return
    names = _names([repr(n) for n in written], 6)
    what = (f"the loss changed from {float(losses[0]):.6g} to {float(losses[1]):.6g}" if len(losses) == 2
            else f"the second call failed ({failure})" if losses else f"the call failed ({failure})")
    raise ValueError(
        f"the model's forward writes to its buffer{'s' if len(written) > 1 else ''} {names} and its output "
        f"depends on {'them' if len(written) > 1 else 'it'}: called twice on the same two samples, {what}. The "
        "loss of a fixed w would then change with every evaluation, so the chains would sample a moving target "
        "and λ̂ would not be the LLC of any one model. Update such state outside forward (or only while "
        "self.training is True, and call model.eval())"
    )


def check_gradients_reach(model: nn.Module, spec: ParamSpec, adapter: LossAdapter, probe: Batch, w: Tensor,
                          rows: int = 8, original: nn.Module | None = None) -> str | None:
    """Refuse a model whose loss depends on sampled parameters that autograd gives no gradient.

    SGLD moves each parameter by its gradient; a parameter used in ``forward`` under
    ``torch.no_grad()``, through ``.detach()`` or ``.data`` gets none, so the sampler would let it
    diffuse as if the loss did not depend on it while the loss does: λ̂ is then meaningless (a model
    whose output is detached gave a small, finite λ̂ with no warning).  On the first ``rows`` samples
    of ``probe`` at ``w`` ((d,)), the parameters without a gradient are perturbed (relative size
    1e-2, fixed generator, the same random numbers in both forward passes) and the loss compared;
    parameters the loss really does not use (left over, unused) pass.  A loss whose graph reaches the
    module's own parameter tensors (or those of ``original``, the user's module when ``model`` is its copy
    on another device or dtype) is refused too (:func:`_refuse_direct_reads`).

    Returns a note naming the parameters the loss does not use on those samples (they move under the
    localization alone and add nothing to λ̂), or ``None``."""
    x, y = _first_rows(probe, rows)
    params = {n: v.detach().clone().requires_grad_(True) for n, v in spec.unflatten(w.detach()).items()}
    with _probe_losses(model, adapter, x, y, params.values()) as loss_at:
        with torch.enable_grad():
            loss = loss_at(params)
        if isinstance(loss, Tensor) and loss.requires_grad:
            own = _own_parameters(model, original)
            grads = torch.autograd.grad(loss, list(params.values()) + [p for _, p in own], allow_unused=True)
            silent = [n for n, g in zip(params, grads) if g is None]
            _refuse_nonfinite_gradients(params, grads[:len(params)], loss)
            _refuse_direct_reads(list(dict.fromkeys(n for (n, _), g in zip(own, grads[len(params):]) if g is not None)))
        else:
            silent = list(params)
        if not silent:
            return None
        gen = torch.Generator(device=w.device).manual_seed(0)
        moved = {n: (v.detach() + 1e-2 * (v.detach().abs() + 1e-2)
                     * torch.randn(v.shape, generator=gen, device=v.device, dtype=v.dtype)) if n in silent
                 else v.detach() for n, v in params.items()}
        with torch.no_grad():
            again = loss_at(moved)
    names = _names([repr(n) for n in silent], 6)
    if _same_values(torch.as_tensor(again).detach(), torch.as_tensor(loss).detach()):  # unused indeed
        return (f"the loss does not use the parameters {names} (no gradient, and moving them left it unchanged on "
                f"the first {num_rows(x)} samples): they move under the localization alone and add nothing to λ̂; "
                "freeze them (p.requires_grad_(False)) to leave them out, unless other samples use them")
    everything = len(silent) == len(params)
    how = ("they are used under torch.no_grad(), through .detach() or .data in forward or loss_fn. SGLD would move "
           "them as if the loss did not depend on them, so λ̂ would be meaningless. Remove the detach/no_grad, or "
           "freeze those parameters (p.requires_grad_(False)) to hold them at w*")
    if _reentrant_checkpoint(lambda: loss_at(moved)):
        how = ("forward runs them inside torch.utils.checkpoint.checkpoint(..., use_reentrant=True), whose "
               "recomputation gives the parameters inside no gradient when its inputs do not require grad (here: "
               "the data). Pass use_reentrant=False (the same values and gradients), or turn activation "
               "checkpointing off for the LLC run")
    raise ValueError(
        ("no parameter gets a gradient from loss_fn (the loss does not require grad), yet the loss changes "
         "when they move" if everything else
         f"the loss depends on the parameters {names}, yet autograd gives them no gradient")
        + " (moving them by 1e-2 of their size changed the loss on the first samples from "
        f"{float(torch.as_tensor(loss).detach()):.6g} "
        f"to {float(again):.6g}): {how}"
    )


def _reentrant_checkpoint(call: Callable[[], Any]) -> bool:
    """Whether ``call()`` runs ``torch.utils.checkpoint``'s reentrant variant (``use_reentrant=True``, the
    ``CheckpointFunction`` autograd function), whose output carries no graph to the parameters inside when
    no input requires grad."""
    import torch.utils.checkpoint as tc

    fn = getattr(tc, "CheckpointFunction", None)
    if fn is None:
        return False
    used = []
    original = fn.__dict__["apply"] if "apply" in fn.__dict__ else None

    def apply(*args: Any, **kwargs: Any) -> Any:
        used.append(True)
        return torch.autograd.Function.apply.__func__(fn, *args, **kwargs)

    fn.apply = apply
    try:
        with torch.no_grad():
            call()
    except Exception:  # noqa: BLE001 - only the question whether it is used
        pass
    finally:
        if original is None:
            del fn.apply
        else:
            fn.apply = original
    return bool(used)


def _padding_rows(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module, str, int]]:
    """``(module name, module, weight name, row)`` of each ``nn.Embedding``/``nn.EmbeddingBag`` with a
    ``padding_idx`` whose weight is among ``names`` (the sampled parameters)."""
    names = set(names)
    out = []
    for mod_name, m in model.named_modules():
        pad = getattr(m, "padding_idx", None)
        name = f"{mod_name}.weight" if mod_name else "weight"
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and pad is not None and name in names:
            out.append((mod_name, m, name, int(pad)))
    return out


def check_padding_rows(model: nn.Module, spec: ParamSpec, adapter: LossAdapter, probe: Batch, w: Tensor,
                       masks: Tensor | None = None, rows: int = 8) -> None:
    """Refuse an ``nn.Embedding``/``nn.EmbeddingBag`` whose ``padding_idx`` row the loss reads while the run
    moves it.

    PyTorch's backward gives the padding row no gradient (it is not trained), yet the forward still
    returns it wherever the padding token occurs: when the model does not mask those positions out (mean
    pooling over padding, say), SGLD lets the row diffuse under γ alone while the loss depends on it
    (measured: λ̂ 3.50 ± 0.50 against 2.14 ± 0.08 for the same function without ``padding_idx``, γ = 1; 11.9
    against 1.9 at the defaults, blamed on a "discontinuous loss").  On the first ``rows`` samples of
    ``probe`` at ``w`` ((d,)) the row is perturbed (relative size 1e-2, as :func:`check_gradients_reach`)
    and the loss compared.  A row that no restriction moves (``masks`` ``(M, d)``, all zero there) passes, and
    so does one that gets a gradient from another use of the tensor (an LM head tied to the embedding: a BERT
    masked LM reads its padding row as the logit of token 0, and trains it there)."""
    params = spec.unflatten(w.detach())
    held = None if masks is None else [spec.unflatten(m) for m in masks]
    pads = [(mod_name, m, name, pad) for mod_name, m, name, pad in _padding_rows(model, params)
            if held is None or any(bool(h[name][pad].any()) for h in held)]
    if not pads:
        return
    x, y = _first_rows(probe, rows)
    gen = torch.Generator(device=w.device).manual_seed(1)
    with _probe_losses(model, adapter, x, y, params.values()) as loss_of, torch.no_grad():

        def loss_at(p: Mapping[str, Tensor]) -> Tensor:
            return torch.as_tensor(loss_of(p))

        loss = loss_at(params)
        for mod_name, m, name, pad in pads:
            v = params[name]
            with torch.enable_grad():  # a row that a tied use (an LM head) trains gets a gradient there: not held
                leaf = v.clone().requires_grad_(True)
                out = loss_at({**params, name: leaf})
                g = (torch.autograd.grad(out, leaf, allow_unused=True)[0]
                     if isinstance(out, Tensor) and out.requires_grad else None)
            if g is not None and bool(_dense(g)[pad].ne(0).any()):
                continue
            moved = v.clone()
            moved[pad] = v[pad] + 1e-2 * (v[pad].abs() + 1e-2) * torch.randn(v[pad].shape, generator=gen,
                                                                             device=v.device, dtype=v.dtype)
            again = loss_at({**params, name: moved}).detach()
            if _same_values(again, loss.detach()):
                continue
            keep = "slice(1, None)" if pad == 0 else f"[i for i in range({v.shape[0]}) if i != {pad}]"
            causal = type(model).__name__.endswith("ForCausalLM") or bool(
                getattr(getattr(model, "config", None), "is_decoder", False))
            lm = (" A causal LM reads it where a row's first real token is predicted from a padding position (left "
                  "padding whose labels are the input ids with -100 on the padding only): label that first token "
                  "-100 as well, or pass loss_fn=slt.losses.causal_lm (it predicts only from real tokens)."
                  if causal else "")
            raise ValueError(
                f"the loss depends on row {pad} of {name!r}, the padding_idx row of {mod_name or 'the model'} "
                f"({type(m).__name__}), which PyTorch gives no gradient (moving it by 1e-2 of its size changed the loss "
                f"on the first samples from {float(loss):.6g} to {float(again):.6g}): SGLD would let the row diffuse as "
                "if the loss did not depend on it, so λ̂ would be biased. Mask the padding positions out of the model's "
                "output (e.g. pool over the attention mask only), or pass padding_idx=None, or hold the row at w* with "
                f"restrict_to=lambda name, p: {keep} if name == {name!r} else True" + lm)


#: :func:`gradient_mismatch_issue` runs on a float64 copy of models of at most this many sampled parameters
GRADIENT_CHECK_FLOAT64_MAX = 2_000_000
#: :func:`gradient_mismatch_issue`: autograd's directional derivative and the loss's central difference differ
#: by more than this share of the larger, where two step lengths agree on the difference within
#: :data:`GRADIENT_SMOOTH` (the loss is smooth there)
GRADIENT_MISMATCH = 0.1
GRADIENT_SMOOTH = 0.02


def _in_float64(model: nn.Module, x: Any, y: Any, device: torch.device) -> tuple[nn.Module, Any, Any] | None:
    """A float64 copy of ``model`` and of the floating-point tensors of ``x, y`` (the set-up probes' precision), or
    ``None`` for a model that does not copy."""
    try:
        from .target import module_to

        model = module_to(copy.deepcopy(model), device, torch.float64)
    except Exception:  # noqa: BLE001 - e.g. a module holding something deepcopy refuses
        return None
    x, y = (_map(lambda t: t.double() if t.is_floating_point() else t, v) for v in (x, y))
    return model, x, y


def gradient_mismatch_issue(model: nn.Module, spec: ParamSpec, adapter: LossAdapter, probe: Batch, w: Tensor,
                            rows: int = 8, directions: int = 4) -> str | None:
    r"""A note when autograd's gradient is not the derivative of the loss, or ``None``.

    SGLD follows autograd's gradient: where it is not the loss's derivative — part of the path under
    ``.detach()`` or ``torch.no_grad()``, a custom ``autograd.Function`` whose backward is not the derivative
    of its forward, a straight-through estimator — the chains sample another distribution than the
    posterior, and nothing in the run shows it (measured: ``l2(h) + 0.5·l2(h.detach())`` read λ̂ 4.55 against
    4.23 with the true gradient; a softplus forward with a ReLU backward read 4.1, converged).  At
    :math:`w' = w + u` (``w`` = w* (d,), u of relative size 1e-2, off the minimum where the gradient
    vanishes), along ``directions`` random directions v of the parameters that get a gradient (padding
    rows of embeddings excluded), the central difference :math:`(L(w'+tv) - L(w'-tv))/2t` at t = 1e-4 and
    5e-5 is compared with :math:`\nabla L(w')\cdot v` on the first ``rows`` samples, on a float64 copy of the
    model (up to :data:`GRADIENT_CHECK_FLOAT64_MAX` parameters; larger ones in their own precision at t = 1e-2
    and 5e-3).  A direction counts
    only where the two differences agree within :data:`GRADIENT_SMOOTH` (no kink or jump crossed: ReLU,
    top-k routing), and a mismatch beyond :data:`GRADIENT_MISMATCH` of the larger value is the note."""
    x, y = _first_rows(probe, rows)
    if w.dtype != torch.float64 and w.numel() <= GRADIENT_CHECK_FLOAT64_MAX:
        # in float64: rounding then does not limit the differences' step, and a small step rarely crosses a kink
        copied = _in_float64(model, x, y, w.device)
        if copied is not None:  # (a model that does not copy: in its own precision)
            model, x, y = copied
            w = w.double()
    steps = (1e-4, 5e-5) if w.dtype == torch.float64 else (1e-2, 5e-3)
    gen = torch.Generator(device=w.device).manual_seed(2)
    base = spec.unflatten(w.detach())
    scale = {n: v.abs() + 1e-2 for n, v in base.items()}
    point = {n: v + 1e-2 * scale[n] * torch.randn(v.shape, generator=gen, device=v.device, dtype=v.dtype)
             for n, v in base.items()}
    # embedding padding rows: no gradient by PyTorch's design, left out of the directions
    held = {name: pad for _, _, name, pad in _padding_rows(model, point)}
    with _probe_losses(model, adapter, x, y, point.values()) as loss_at:
        try:
            leaves = {n: v.clone().requires_grad_(True) for n, v in point.items()}
            with torch.enable_grad():
                loss = loss_at(leaves)
            if not (isinstance(loss, Tensor) and loss.requires_grad and loss.ndim == 0):
                return None
            grads = {n: (None if g is None else _dense(g)) for n, g in  # (an embedding with sparse=True)
                     zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True))}
        except Exception:  # noqa: BLE001 - the other checks report what fails
            return None
        moved = [n for n, g in grads.items() if g is not None]
        if not moved or not all(bool(torch.isfinite(grads[n]).all()) for n in moved):
            return None
        worst = None
        with torch.no_grad():
            for _ in range(directions):
                v = {n: scale[n] * torch.randn(point[n].shape, generator=gen, device=w.device, dtype=w.dtype)
                     for n in moved}
                for n, pad in held.items():
                    if n in v:
                        v[n][pad] = 0
                ad = float(sum((grads[n].double() * v[n].double()).sum() for n in moved))

                def fd(t: float) -> float:
                    plus = loss_at({**point, **{n: point[n] + t * v[n] for n in moved}})
                    minus = loss_at({**point, **{n: point[n] - t * v[n] for n in moved}})
                    return (float(plus) - float(minus)) / (2 * t)

                try:
                    f1, f2 = fd(steps[0]), fd(steps[1])
                except Exception:  # noqa: BLE001
                    return None
                top = max(abs(f1), abs(f2), abs(ad))
                noise = 64 * torch.finfo(w.dtype).eps * abs(float(loss)) / steps[1]
                if (not top > noise or abs(f1 - f2) > GRADIENT_SMOOTH * top or f1 == f2 == 0.0
                        or abs(float(loss)) <= SATURATED_LOSS):
                    continue  # too small to tell, not smooth over the step, or a loss at rounding's scale
                    # (saturated cross-entropy: its rounding is eps × the logits, not × the loss; 1e-20 against 0
                    # or 1e-21 against 1e-29 is no mismatch)
                gap = abs(f2 - ad) / top
                if gap > GRADIENT_MISMATCH and (worst is None or gap > worst[0]):
                    worst = (gap, f2, ad)
    if worst is None:
        return None
    gap, f2, ad = worst
    return (f"autograd's gradient is not the derivative of the loss: along a random direction near w* the loss "
            f"changes at the rate {f2:.4g} (central differences), autograd's gradient says {ad:.4g}; SGLD follows "
            "autograd, so the chains do not sample the posterior of this loss and λ̂ is biased. Typical causes: part "
            "of forward under .detach() or torch.no_grad() while the rest gets a gradient, a custom "
            "torch.autograd.Function whose backward is not the derivative of its forward, a straight-through "
            "estimator; remove the detach/no_grad, or freeze the parameters involved (p.requires_grad_(False))")


#: :func:`saturation_issue`: the relative scaling of every parameter, and the fall of the loss under it that names
#: a saturated loss (cross-entropy on separable data: e^{-margin} falls by about e^{-0.05·margin}, 63% at margin 20)
SATURATION_SCALE, SATURATION_FALL = 0.05, 0.5
#: :func:`saturation_issue` judges a loss at w* at most this (float32's eps, whatever the run's dtype: a mean
#: cross-entropy of 1e-7 is margins of 16 and more, where float32 rounds it to 0)
SATURATED_LOSS = float(torch.finfo(torch.float32).eps)


def saturation_issue(model: nn.Module, spec: ParamSpec, adapter: LossAdapter, probe: Batch, w: Tensor) -> str | None:
    r"""A note when the loss at w* is saturated rather than minimal, or ``None``.

    Cross-entropy on data the model separates has no minimum at finite weights: it falls toward 0 as the weights
    grow, and a trained w* reads L(w*) ≈ 0 (0.0 exactly in float32) with a gradient that underflows, so the slope
    check and the gradient checks see nothing (helper 34: a 10-4-2 tanh MLP on separable labels read λ̂ 2.77,
    "converged", at L(w*) = 0).  Called where the loss at w* over all the data is at most :data:`SATURATED_LOSS`
    (float32 rounds it to 0; the caller checks, since the probe's first rows alone can all be confident at a
    true minimum whose hard samples come later), on a float64 copy (up to :data:`GRADIENT_CHECK_FLOAT64_MAX` parameters) the loss at
    :math:`(1 + s)w^*`, s = :data:`SATURATION_SCALE`, is compared with that at w*: a fall by more than
    :data:`SATURATION_FALL` of it is the note (at a minimum the loss rises in every direction; a scale-invariant
    network, normalised after each layer, keeps it).  Interpolating classifiers short of that (L(w*) of 1e-3 to
    1e-5, margins a scaling moves by a few percent) are not judged: their loss still resolves the chains' moves."""
    if w.numel() > GRADIENT_CHECK_FLOAT64_MAX:
        return None
    copied = _in_float64(model, probe.x, probe.y, w.device)
    if copied is None:  # (a model that does not copy: not judged)
        return None
    model, x, y = copied
    base = spec.unflatten(w.detach().double())
    try:
        with torch.no_grad(), _probe_losses(model, adapter, x, y, base.values()) as loss_at:
            at = float(loss_at(base))
            scaled = float(loss_at({n: (1 + SATURATION_SCALE) * v for n, v in base.items()}))
    except Exception:  # noqa: BLE001 - the other checks report what fails
        return None
    if not (math.isfinite(at) and math.isfinite(scaled) and at > 0 and 0 <= scaled < (1 - SATURATION_FALL) * at):
        return None  # (a loss that goes negative is no saturating one)
    return (f"w* is not a minimum: the loss saturates. Scaling every parameter by {1 + SATURATION_SCALE:g} lowers the "
            f"loss of the set-up's probe samples from {at:.3g} to {scaled:.3g} (float64), so it keeps falling as "
            "the weights grow: a loss whose infimum lies at infinite weights (cross-entropy on data the model "
            "separates reaches 0 only there), where λ̂ measures no minimum. Regularise the loss itself and train "
            "to its minimum (label smoothing, or an L2 penalty inside the loss_fn you train and estimate: an "
            "optimiser's weight_decay is not part of it, and slt.training.train's L-BFGS finish minimises "
            "loss_fn alone)")


def _refuse_nonfinite_gradients(params: Mapping[str, Tensor], grads: Sequence[Tensor | None], loss: Tensor) -> None:
    """Refuse a finite loss whose gradient at w* is NaN or inf: every chain would diverge at its first step,
    and the run would blame the step size (``torch.where(h > 0, torch.sqrt(h), 0)``: the branch not taken
    still back-propagates ``0 · inf``; the step adaptation went down to ε = 4.6e-14, then "the step is too
    large")."""
    if not bool(torch.isfinite(loss.detach()).all()):
        return  # (validate_model_and_loss names a non-finite loss)
    bad = [n for n, g in zip(params, grads) if g is not None and not bool(torch.isfinite(_dense(g)).all())]
    if bad:
        raise ValueError(
            f"the loss at w* is finite ({float(loss.detach()):.6g}) but its gradient is NaN or inf in {_names([repr(n) for n in bad], 6)} "
            "on the first samples: SGLD would diverge at any step size. Typical causes: torch.sqrt, log or pow of a "
            "value that reaches 0, or torch.where whose branch not taken is inf or NaN there (its gradient is still "
            "0 · inf = NaN); clamp the argument first, e.g. torch.sqrt(h.clamp_min(1e-12))")


def _own_parameters(*models: nn.Module | None) -> list[tuple[str, Tensor]]:
    """The modules' own parameter tensors that require grad, each once, with the first name that registers
    it (a module and its copy on another device or dtype share names, not tensors)."""
    out: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    for model in models:
        for n, p in (model.named_parameters(remove_duplicate=False) if model is not None else ()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((n, p))
    return out


def _refuse_direct_reads(names: list[str]) -> None:
    """Refuse a loss whose graph reaches the module's own parameter tensors (``names``) rather than the
    tensors slt passes for them: ``loss_fn`` (or ``forward``) reads them outside the module's parameter
    lookup — a closure over ``model.fc.weight`` in ``loss_fn`` (an L2 penalty, a tied head applied in the
    loss), a parameter kept as a plain attribute of another module — so every chain would see them at w*
    while its own copies move (the vmap path) and λ̂ would be of another loss, silently."""
    if not names:
        return
    raise ValueError(
        f"the loss reaches the model's own parameter tensors {_names([repr(n) for n in names], 6)} directly, not "
        "through the parameters slt samples (it passes each chain's values by name, torch.func.functional_call): "
        "loss_fn or forward reads them outside the module's parameter lookup — a closure over model.<...>.weight in "
        "loss_fn (e.g. an L2 penalty: the LLC is of the data loss, leave it out; γ localizes), or a parameter kept "
        "as a plain attribute of another module — so every chain would see them at w*. Compute it inside forward "
        "from the module's own attributes (self.<...>.weight), or leave it out of the loss"
    )


def _check_mean_reduction(model: nn.Module, aliases: Mapping[str, list[str]] | None, x: Any, y: Any,
                          adapter: LossAdapter, loss: Tensor) -> None:
    r"""Refuse a ``loss_fn`` that sums over the batch (``reduction="sum"``).

    :math:`\hat\lambda = n\beta(\mathbb E[L_n(w)] - L_n(w^*))` needs :math:`L_n` the mean loss: a
    sum multiplies the loss and the gradient the sampler follows by the batch size, and nothing
    downstream can tell (an MLP's λ̂ came out 2485 instead of 0.57, with no warning).  On the probe's ``k`` samples
    the loss is compared with the losses of each sample alone: equal to their sum and not to their
    mean is a sum.  Losses that couple the samples of a batch (neither) and models that cannot run on
    one sample pass."""
    k = num_rows(x)
    if k < 2:
        return
    parts = []
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():
            for i in range(k):
                xi = _map(lambda t: t[i:i + 1], x)
                yi = xi if y is x else _map(lambda t: t[i:i + 1], y)
                part = adapter.loss_fn(call_module(model, own_tensors(model, params), xi, aliases), yi)
                if not isinstance(part, Tensor) or part.numel() != 1:
                    return
                parts.append(float(part))
    except Exception:  # noqa: BLE001 - a model or loss that needs several samples: nothing to compare
        return
    total, whole = math.fsum(parts), float(loss.detach())
    mean, scale = total / k, math.fsum(abs(p) for p in parts)
    if not (math.isfinite(whole) and math.isfinite(scale)) or scale == 0:
        return
    tol = 1e-3 * scale  # far above float rounding, far below the gap k·mean − mean
    if abs(whole - total) <= tol and abs(whole - mean) > 10 * tol:
        from .losses import model_loss

        fix = ("use reduction='mean' (the default of nn.CrossEntropyLoss(), F.mse_loss, ...) or divide by the number "
               "of samples")
        config = getattr(model, "config", None)
        knobs = [a for a in dir(config) if a.endswith("loss_reduction")] if config is not None else []
        if adapter.loss_fn is model_loss and knobs:  # a Hugging Face model's own loss, reduced as its config says
            says = ", ".join(f"{a}={getattr(config, a)!r}" for a in knobs)
            fix = f"the model's own loss sums as its config says ({says}): set model.config.{knobs[0]} = 'mean'"
        raise ValueError(
            f"loss_fn sums over the batch: on {k} samples it returned {whole:.6g}, the sum of the samples' "
            f"losses ({total:.6g}), not their mean ({mean:.6g}). λ̂ = nβ (E[L_n(w)] − L_n(w*)) needs L_n the mean "
            f"loss (a sum multiplies the loss and the sampler's gradient by the batch size): {fix}"
        )


def _check_per_sample_lift(adapter: LossAdapter, out: Any, y: Any, loss: Tensor) -> None:
    """For outputs/targets that are not tensors, the vmap lift to per-sample losses maps every
    tensor leaf whose leading dim is the batch's; check that the lifted losses average to the
    loss on the probe, and otherwise disable the lift (the control variate then takes a
    forward pass at w*, and weighted data need a ``per_sample`` form)."""
    import warnings

    adapter.per_sample_error = None
    reason = None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ps = adapter.per_sample(out, y, 1)
        # the plain mean, or a mean over labelled tokens (the losses at w* then check it on more rows,
        # :meth:`slt.target.Target.star_losses`)
        if not any(torch.allclose(mean, loss, rtol=1e-4, atol=1e-6) for mean in candidate_means(ps, y)):
            reason = f"their mean {float(ps.mean()):.6g} differs from the loss {float(loss):.6g}"
    except Exception as e:  # noqa: BLE001
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if reason is not None:
        from .losses import model_loss

        own = adapter.loss_fn is model_loss
        adapter.per_sample_error = (
            f"per-sample losses of loss_fn on the model's output ({describe(out)}) are unavailable: lifting "
            f"the loss with vmap failed ({reason}). "
            + ("loss_fn was omitted, so the loss is the model's own output.loss, one number per batch: pass a "
               "per-sample loss instead: slt.losses.causal_lm for a causal language model, else a loss of "
               "output.logits and the batch's labels (F.cross_entropy for a sequence classifier)" if own else
               "Give loss_fn a per_sample form (slt.losses.register_per_sample(loss_fn, per_sample))")
        )
