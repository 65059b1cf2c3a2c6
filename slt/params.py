"""Flat parameter vectors with a leading chain dimension.

The samplers work on flat ``(C, d)`` tensors; models need ``name -> (C, *shape)``
mappings.  :class:`ParamSpec` converts between the two with views (no copies).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

__all__ = ["ParamSpec"]


class ParamSpec:
    """Names, shapes and offsets of a module's sampled (``requires_grad``) parameters.

    Parameters that do not require grad are *frozen*: they are held at their
    value in the module and not sampled.  Any shape is allowed, 0-dim
    (``nn.Parameter(torch.zeros(()))``) included; buffers are never sampled.
    Tied parameters (one tensor registered under two names, e.g. a language
    model's input and output embeddings) appear once, under their first name.
    """

    def __init__(self, module: nn.Module):
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []
        self.frozen: list[str] = []
        for name, p in module.named_parameters():
            if p.requires_grad:
                if p.is_complex():
                    raise ValueError(
                        f"parameter {name!r} is complex ({p.dtype}): slt samples real parameters (the chains' "
                        f"noise, localization and step size are defined on R^d). Store it as a real parameter "
                        f"of shape {(*p.shape, 2)} and take torch.view_as_complex(...) of it in forward, or freeze "
                        f"it (requires_grad_(False)) to hold it at w*")
                self.names.append(name)
                self.shapes.append(p.shape)
            else:
                self.frozen.append(name)
        if not self.names:
            raise ValueError(
                "the model has no parameters that require grad: nothing to sample"
                + (f" (all {len(self.frozen)} are frozen, requires_grad=False, as after model.requires_grad_(False) "
                   "for evaluation: call model.requires_grad_(True) and freeze only what should stay at w*)"
                   if self.frozen else " (it has no parameters)"))
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes]
        self.d = sum(self.numels)

    def __repr__(self) -> str:
        return f"ParamSpec(d={self.d}, params={dict(zip(self.names, map(tuple, self.shapes)))})"

    def flatten_module(self, module: nn.Module) -> Tensor:
        """(d,) vector of the module's sampled parameters."""
        named = dict(module.named_parameters())
        return self.flatten_mapping(named)

    def flatten_mapping(self, params: Mapping[str, Tensor]) -> Tensor:
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"checkpoint is missing parameters {missing}")
        parts = []
        for name, shape in zip(self.names, self.shapes):
            t = params[name]
            if not isinstance(t, Tensor):  # NumPy arrays, numbers
                t = torch.as_tensor(t)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(t.shape)} in the checkpoint, "
                    f"expected {tuple(shape)}"
                )
            parts.append(t.detach().reshape(-1))
        return torch.cat(parts)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """(C, d) -> {name: (C, *shape)} views; (d,) -> {name: shape} views."""
        lead = flat.shape[:-1]
        if flat.shape[-1] != self.d:
            raise ValueError(f"flat parameters have size {flat.shape[-1]}, expected d={self.d}")
        out = {}
        for name, shape, chunk in zip(self.names, self.shapes, flat.split(self.numels, dim=-1)):
            out[name] = chunk.reshape(tuple(lead) + tuple(shape))  # 0-dim parameters too: reshape(())
        return out


def unwrap(m: object) -> object:
    """The module inside ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (which compute the
    same function and whose parameters are the inner module's; ``functional_call`` refuses them) and
    inside ``torch.compile`` 's wrapper (slt compiles its own step when that pays: ``vectorize``)."""
    while True:
        if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            m = m.module
        elif isinstance(m, nn.Module) and type(m).__name__ == "OptimizedModule" and isinstance(
                getattr(m, "_orig_mod", None), nn.Module):
            m = m._orig_mod
        else:
            return m
