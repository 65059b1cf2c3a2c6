"""Run-time plumbing shared by every estimator: device, CPU threads, versions.

Private: the public names are re-exported where they belong
(:func:`slt.versions`, :func:`slt.engine.resolve_device`).
"""

from __future__ import annotations

import contextlib
import importlib
import platform
import sys
from typing import Iterator

import torch

__all__ = ["resolve_device", "intra_op_threads", "small_work_threads", "versions"]

#: below this much work per step (e.g. chains × batch × parameters) one CPU thread is faster
SMALL_WORK = 2_000_000


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; a CUDA device that is
    not available raises ``ValueError``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
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
