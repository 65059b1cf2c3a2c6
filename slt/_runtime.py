"""Run-time plumbing shared by every estimator: device, CPU threads, versions, and what holds inside slt's
vmapped calls (:func:`vmapped_block`).

Private: the public names are re-exported where they belong
(:func:`slt.versions`, :func:`slt.engine.resolve_device`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import math
import os
import platform
import sys
from typing import Any, Iterator

import torch
import torch.nn.functional as F

__all__ = ["autograd_allowed", "user_stacklevel", "resolve_device", "intra_op_threads", "retained_heap", "is_batched",
           "small_work_threads", "versions"]

#: below this much work per step (e.g. chains × batch × parameters) one CPU thread is faster
SMALL_WORK = 2_000_000


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by this function's caller that points at the first
    frame outside the ``slt`` package (the user's call), however deep inside slt the warning is raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


_IS_BATCHED = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)


_SET_FALLBACK_WARNING = getattr(getattr(torch._C, "_functorch", None), "_set_vmap_fallback_warning_enabled", None)
#: how many :func:`vmapped_block` blocks are open
_DEPTH = [0]


@contextlib.contextmanager
def vmapped_block() -> Iterator[None]:
    """What holds inside slt's vmapped calls (nested blocks count once):

    * PyTorch's "There is a performance drop because we have not yet implemented the batching rule for
      aten::…" is off (an op such as ``kl_div`` or ``_weight_norm`` then runs once per chain or sample).
      That speed is what slt measures when it chooses between vmap and the loop over chains
      (:func:`slt.target.fastest_path`), and the note — meant for PyTorch's developers ("please file us an
      issue") — showed again after each of slt's set-up phases, three times a call.  Back on after the
      outermost block (PyTorch's default; torch offers no way to read the setting).
    * ``F.gaussian_nll_loss`` is the batchable :func:`gaussian_nll_loss`; PyTorch's is back after.
    * ``F.embedding`` (``nn.Embedding``) with a ``padding_idx`` is :func:`embedding`, whose padding row gets
      no gradient in every chain; PyTorch's is back after."""
    _DEPTH[0] += 1
    if _DEPTH[0] == 1:
        if _SET_FALLBACK_WARNING is not None:
            _SET_FALLBACK_WARNING(False)
        _TORCH_GAUSSIAN_NLL[0] = F.gaussian_nll_loss
        F.gaussian_nll_loss = gaussian_nll_loss
        _TORCH_EMBEDDING[0] = F.embedding
        F.embedding = embedding
    try:
        yield
    finally:
        _DEPTH[0] -= 1
        if _DEPTH[0] == 0:
            F.gaussian_nll_loss = _TORCH_GAUSSIAN_NLL[0]
            F.embedding = _TORCH_EMBEDDING[0]
            if _SET_FALLBACK_WARNING is not None:
                _SET_FALLBACK_WARNING(True)


_TORCH_GAUSSIAN_NLL: list[Any] = [None]
_TORCH_EMBEDDING: list[Any] = [None]


def embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None, max_norm: float | None = None,
              norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> torch.Tensor:
    """``torch.nn.functional.embedding`` inside slt's vmapped calls (:func:`vmapped_block`).

    With a ``padding_idx``, the padding row's gradient is cut by detaching that row of the weight, and the
    lookup runs without ``padding_idx``: the same values and gradients.  PyTorch's batching rule for the
    embedding's backward (torch 2.13) offsets the indices of each chain but not ``padding_idx``, so chains
    1, 2, … gave their padding row a gradient and chain 0 did not (measured: padding-row gradients [0, 8.2]
    where both are 0; a model that mean-pools over padded positions drew different λ̂ on vmap and the loop).
    Sparse gradients keep PyTorch's call (slt runs those in the loop)."""
    torch_embedding = _TORCH_EMBEDDING[0] or F.embedding
    if padding_idx is None or sparse:
        return torch_embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    row = padding_idx if padding_idx >= 0 else weight.shape[0] + padding_idx
    pad = torch.arange(weight.shape[0], device=weight.device).unsqueeze(1) == row
    return torch_embedding(input, torch.where(pad, weight.detach(), weight), None, max_norm, norm_type,
                           scale_grad_by_freq, sparse)


def gaussian_nll_loss(input: torch.Tensor, target: torch.Tensor, var: Any, full: bool = False, eps: float = 1e-6,
                      reduction: str = "mean") -> torch.Tensor:
    r"""``torch.nn.functional.gaussian_nll_loss`` that ``vmap`` can batch, in place of PyTorch's inside slt's
    vmapped calls (:func:`vmapped_block`).

    :math:`\ell = \tfrac12(\log v + (x - y)^2 / v)` (+ :math:`\tfrac12\log 2\pi` with ``full``), ``v`` the
    variance clamped below at ``eps`` in value only (the gradient passes as through PyTorch's in-place clamp
    under ``no_grad``), with PyTorch's shape rules for ``var`` (heteroscedastic, one dimension short, or one
    broadcast dimension) and reductions.  PyTorch's raises on a negative variance with
    ``if torch.any(var < 0)``, a Python bool of the values that vmap refuses: a heteroscedastic regression
    ran its chains in a loop, its control variate took a forward pass and ``slt.bif`` refused it.  Here an
    entry with a negative variance is NaN instead, which slt reports as a divergent chain; the set-up's plain
    calls run PyTorch's own (and its error)."""
    if isinstance(var, float):
        if var < 0:
            raise ValueError("var has negative entry/entries")
        var = var * torch.ones_like(input)
    if var.size() != input.size():
        if input.size()[:-1] == var.size():
            var = torch.unsqueeze(var, -1)
        elif not (input.ndim == var.ndim
                  and sum(b for a, b in zip(input.size(), var.size()) if a != b) == 1):
            raise ValueError("var is of incorrect size")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(reduction + " is not valid")
    v = var + (var.clamp(min=eps) - var).detach()
    loss = 0.5 * (torch.log(v) + (input - target) ** 2 / v)
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    loss = torch.where(var < 0, torch.full_like(loss, float("nan")), loss)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def is_batched(t: Any) -> bool:
    """Whether ``t`` is a tensor being mapped over by ``torch.vmap`` (a functorch BatchedTensor)."""
    return _IS_BATCHED is not None and isinstance(t, torch.Tensor) and bool(_IS_BATCHED(t))


def autograd_allowed(fn: Any) -> Any:
    """A public entry point's wrapper.  ``fn`` runs with ``torch.inference_mode`` switched off: the samplers
    need autograd, and a call made from inside an evaluation script's ``with torch.inference_mode():``
    failed with a misleading "the loss does not require grad" (``torch.no_grad()`` needs nothing: slt
    enables gradients where it takes them).  And the modules it is given are left as they were
    (:func:`plain_tensors_kept`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plain_tensors_kept([*args, *kwargs.values()]), loader_generators_kept([*args, *kwargs.values()]):
            if not torch.is_inference_mode_enabled():
                return fn(*args, **kwargs)
            with torch.inference_mode(False):
                return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def loader_generators_kept(objs: list[Any]) -> Iterator[None]:
    """The random generators of the DataLoaders among ``objs`` (or values of a mapping among them: data of
    several distributions), those a ``shuffle=True, generator=g`` loader draws its order from, put back in
    the state they had on entry: a call that iterates the loader leaves it as it found it, and the same
    call with the same seed repeats (a user's generator advances at every pass over the loader).  Only the
    outermost public call puts them back: within a call the loader advances from pass to pass as before."""
    from torch.utils.data import DataLoader

    loaders: list[DataLoader] = []
    if _LOADER_DEPTH[0] == 0:  # (a nested public call leaves them to the outermost one)
        loaders += [o for o in objs if isinstance(o, DataLoader)]
        loaders += [v for o in objs if isinstance(o, dict) for v in o.values() if isinstance(v, DataLoader)]
    gens: dict[int, torch.Generator] = {}
    for loader in loaders:
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator):
                gens[id(g)] = g
    states = [(g, g.get_state()) for g in gens.values()]
    _LOADER_DEPTH[0] += 1
    try:
        yield
    finally:
        _LOADER_DEPTH[0] -= 1
        for g, state in states:
            g.set_state(state)


_LOADER_DEPTH = [0]


def _plain_tensors(roots: list[torch.nn.Module]) -> dict[tuple[int, str], tuple[torch.nn.Module, Any]]:
    """Every plain tensor attribute (in a module's ``__dict__``: neither a parameter nor a buffer) of the
    module trees: ``{(id(module), name): (module, value)}``."""
    return {(id(m), k): (m, v) for root in roots for m in root.modules() for k, v in vars(m).items()
            if isinstance(v, torch.Tensor)}


@contextlib.contextmanager
def plain_tensors_kept(values: list[Any]) -> Iterator[None]:
    """The plain tensor attributes of the modules among ``values`` (an entry point's arguments, and the
    modules of a list such as ``models=``) put back as they were when the block ends, those it created
    removed.  ``torch.func.functional_call`` restores parameters and buffers only, while
    ``torch.nn.utils.prune`` and the older ``weight_norm``/``spectral_norm`` set ``module.weight`` in a
    forward pre-hook and research code keeps ``self.last_attention = ...`` or an auxiliary loss for its
    ``loss_fn`` to read: a vmapped run left batched tensors in the user's module ("Cannot access storage
    of BatchedTensorImpl" at a later copy), a loop run a chain's.  Inside the block they stay as the
    calls write them, so a ``loss_fn`` reading what ``forward`` just stored sees the chain's value."""
    roots = [v for v in values if isinstance(v, torch.nn.Module)]
    roots += [m for v in values if isinstance(v, (list, tuple)) for m in v if isinstance(m, torch.nn.Module)]
    if not roots:
        yield
        return
    before = _plain_tensors(roots)
    try:
        yield
    finally:
        for key, (m, v) in _plain_tensors(roots).items():
            if key not in before:
                del m.__dict__[key[1]]
            elif before[key][1] is not v:
                m.__dict__[key[1]] = before[key][1]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; a CUDA device that is
    not available raises ``ValueError``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but MPS (Apple's GPU) is not available")
    return dev


def small_work_threads(work: int, device: torch.device) -> int | None:
    """1 when ``work`` (elements touched per step) is below :data:`SMALL_WORK` on a CPU,
    where thread synchronisation costs more than it saves (measured 25% faster on the
    TMS, 2 cores); ``None`` (leave torch's setting) otherwise."""
    return 1 if device.type == "cpu" and work < SMALL_WORK else None


@contextlib.contextmanager
def intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block (``None``: unchanged), then restore it."""
    prev = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


#: glibc's mallopt parameters (``<malloc.h>``)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: while sampling: freed memory up to this much stays mapped at the top of the heap
HEAP_PAD = 256 << 20
#: allocations below this come from the heap (glibc's largest value, where its dynamic rule ends)
HEAP_MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap beyond this (plus the pad) is returned (twice the above, as glibc's rule)
HEAP_TRIM_THRESHOLD = 64 << 20
#: glibc's default top pad, restored after sampling (``DEFAULT_TOP_PAD``)
GLIBC_TOP_PAD = 128 << 10
#: set to ``0`` to leave the C allocator alone
HEAP_ENV = "SLT_TUNE_MALLOC"
_USER_MALLOC_ENV = ("MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_")
_heap_depth = 0


@functools.cache
def _glibc() -> Any:
    """The process's C library when it is glibc (it has ``mallopt``, ``malloc_trim`` and
    ``gnu_get_libc_version``), else ``None``; looked up once per process."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        for name in ("mallopt", "malloc_trim", "gnu_get_libc_version"):
            getattr(libc, name)
    except (OSError, AttributeError):
        return None
    return libc


def _heap_untouched(device: torch.device) -> str | None:
    """Why :func:`retained_heap` leaves the allocator alone, or ``None``."""
    if device.type != "cpu":
        return f"device {device.type}"
    if os.environ.get(HEAP_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{HEAP_ENV}={os.environ[HEAP_ENV]}"
    user = [k for k in _USER_MALLOC_ENV if k in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return f"the environment sets {', '.join(user)}"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(a in preload for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded (LD_PRELOAD)"
    if _glibc() is None:
        return "not glibc"
    return None


@contextlib.contextmanager
def retained_heap(device: torch.device) -> Iterator[str]:
    """Keep memory the sampler frees mapped while it samples (Linux/glibc, CPU runs).

    A batched chain-step allocates and frees the same large temporaries every step (activations
    and gradients of all chains × checkpoints at once: 17 MB each for 128 rows of a 134-wide layer
    on a batch of 256).  glibc returns such memory to the kernel as soon as the top of its heap holds
    more than its trim threshold, and the next step faults every page back in (zero-filled by the
    kernel).  For the block, ``mallopt`` keeps up to :data:`HEAP_PAD` of freed memory at the top of
    the heap and serves allocations below :data:`HEAP_MMAP_THRESHOLD` from the heap; afterwards the
    pad returns to glibc's default and ``malloc_trim(0)`` hands the free memory back.  Measured on a
    2-core VM (alternating processes): the 16-checkpoint curve of ``benchmarks/bench_generic.py``
    0.78 → 0.61 ms per chain-step on average, the GPT-2 job 26–34 → 22–25 ms on the vmap path; no
    change beyond noise on the small MLP, the CNN and the 1M MLP.

    Process-wide and one-way in part: setting any of these disables glibc's dynamic thresholds for
    the rest of the process, which keeps 32 MiB / 64 MiB (the values that rule converges to).  Left
    alone (the reason is yielded, and recorded in the run's config) on other devices, when
    ``SLT_TUNE_MALLOC=0``, when the environment sets glibc's malloc parameters itself, when jemalloc,
    tcmalloc or mimalloc is preloaded, and off glibc.  Nested blocks act once (the outermost).

    Yields
    ------
    str
        What was done, e.g. ``"glibc heap kept (top pad 256 MiB)"``, or ``"untouched (<reason>)"``.
    """
    global _heap_depth
    reason = "nested in another sampling run" if _heap_depth else _heap_untouched(device)
    if reason is not None:
        yield f"untouched ({reason})"
        return
    libc = _glibc()
    libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)
    libc.mallopt(_M_TOP_PAD, HEAP_PAD)
    _heap_depth += 1
    try:
        yield f"glibc heap kept (top pad {HEAP_PAD >> 20} MiB)"
    finally:
        _heap_depth -= 1
        libc.mallopt(_M_TOP_PAD, GLIBC_TOP_PAD)
        libc.malloc_trim(0)


def versions(*extra: str) -> dict[str, str]:
    """Versions of slt, torch, numpy and Python, the platform, and of each package
    named in ``extra`` that is installed (e.g. ``versions("pyro", "hydra")``)."""
    import numpy

    from . import __version__

    out = {
        "slt": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for name in extra:
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except Exception:  # noqa: BLE001 - not installed, or no __version__
            continue
    return out
