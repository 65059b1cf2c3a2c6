r"""Groups of chains beyond checkpoints: weight restrictions and data distributions (refined LLCs).

A run samples ``G = K × M × D`` groups of ``C`` chains each: ``K`` checkpoints, ``M`` weight
restrictions and ``D`` data distributions, checkpoint-major, then restriction, then
distribution (group ``g = (k M + m) D + i``; chain ``c`` of group ``g`` is row ``g C + c``).

Weight-refined LLC (Wang, Farrugia-Roberts, Hoogland, Carroll, Wei & Murfet 2024,
"Differentiation and specialization of attention heads via the refined local learning
coefficient", arXiv 2410.02984): only the parameters :math:`V` of a component move, the others stay
at :math:`w^*`,

.. math::

    \hat\lambda_V(w^*) = n\beta\bigl(\mathbb E_{w_V}[L_n(w_V, w^*_{\bar V})] - L_n(w^*)\bigr),
    \quad p(w_V) \propto \exp\bigl(-n\beta L_n(w_V, w^*_{\bar V}) - \tfrac\gamma2\|w_V - w^*_V\|^2\bigr).

It is sampled by masking the update: the loss gradient and the injected noise of a restricted
row are multiplied by its 0/1 mask, so masked coordinates never leave :math:`w^*` (their
localization term is then zero too).  A mask of ones is the unrestricted run bit for bit
(multiplying by 1.0 is exact).

Data-refined LLC (same paper): the same formula with the empirical loss of another distribution
:math:`q'` in both the posterior and the estimator.  The distributions' datasets are concatenated
into one source; each group draws its minibatches from its own range (and its control variate
gathers its own per-sample losses at :math:`w^*`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .data import Data, _leaves, as_source, is_column_list

__all__ = ["Groups", "split_data", "concat_data"]


@dataclass(frozen=True, eq=False)
class Groups:
    """Restrictions and distributions of a run (see the module docstring).

    Attributes
    ----------
    restrict_labels
        Labels of the restrictions when ``restrict_to`` was a mapping, else ``None``.
    masks
        ``(M, d)`` 0/1 masks over the flat sampled parameters (the target's dtype), or ``None``.
    data_labels
        Labels of the distributions when ``data`` was a mapping of datasets, else ``None``.
    parts
        The distributions' datasets (in label order), or ``None``.
    offsets
        ``(D,)`` first row of each distribution in the concatenated source.
    """

    restrict_labels: list[str] | None = None
    masks: Tensor | None = None
    data_labels: list[str] | None = None
    parts: list[Data] | None = None
    offsets: list[int] | None = None

    @property
    def M(self) -> int:
        return 1 if self.masks is None else int(self.masks.shape[0])

    @property
    def D(self) -> int:
        return 1 if self.parts is None else len(self.parts)

    def range_mean(self, per_sample: Tensor, i: int, counts: Tensor | None = None) -> Tensor:
        """``(K, N)`` per-sample losses of the concatenated data -> ``(K,)`` (weighted) mean over
        distribution ``i``'s rows; with ``counts`` ``(N,)`` (a loss averaging over counted targets,
        :meth:`slt.losses.LossAdapter.counts`) and no weights, the count-weighted mean."""
        part, lo = self.parts[i], self.offsets[i]
        block = per_sample[:, lo : lo + part.n]
        from .losses import count_weighted_mean, weighted_mean

        w = part.normalized_weights()
        c = None if counts is None else counts[lo : lo + part.n].to(block)
        if w is not None:
            return weighted_mean(block, w.to(block), c, 1)
        if c is not None:
            return count_weighted_mean(block, c.unsqueeze(0), 1)
        return block.mean(1)

    def moved_names(self, spec: Any) -> list[frozenset[str]]:
        """Per restriction (``M``), the names of the parameters its mask moves (any element)."""
        return [frozenset(n for n, v in spec.unflatten(self.masks[m]).items() if bool(v.any()))
                for m in range(self.M)]

    def row_plan(self, K: int, C: int, spec: Any) -> list[tuple[Tensor, frozenset[str]]] | None:
        r"""Blocks of the ``K·M·D·C`` rows for :attr:`slt.evaluator.ChainEvaluator.row_plan`: the
        restrictions are partitioned by the set of parameter names they move (e.g. the heads of one
        layer); a part of several restrictions gives, per checkpoint, distribution and chain, one
        block of its rows — they share their minibatch (one random stream per checkpoint and chain),
        so the layers below the moved parameters are evaluated once for the block; a part of one
        restriction gives one block of its chains per checkpoint and distribution (parameters it
        does not move are still passed once).  ``None`` without restrictions or when every restriction
        moves every parameter (nothing to share).  Row ``r = ((k M + m) D + i) C + c``."""
        if self.masks is None:
            return None
        M, D = self.M, self.D
        moved = self.moved_names(spec)
        if all(len(ms) == len(spec.names) for ms in moved):
            return None
        parts: dict[frozenset[str], list[int]] = {}
        for m, names in enumerate(moved):
            parts.setdefault(names, []).append(m)
        blocks = []
        for names, ms in parts.items():
            for k in range(K):
                for i in range(D):
                    base = [((k * M + m) * D + i) * C for m in ms]
                    if len(ms) > 1:
                        blocks += [(torch.tensor([b + c for b in base]), names) for c in range(C)]
                    else:
                        blocks.append((torch.arange(base[0], base[0] + C), names))
        return blocks

    def apply_mask(self, t: Tensor, K: int, cols: slice | None = None) -> Tensor:
        """Multiply the rows of ``t`` ``(K M D C, d)`` by their restriction's mask, in place; with ``cols``,
        ``t`` holds only those columns of the parameters (a chunk ``(K M D C, len)``)."""
        if self.masks is None:
            return t
        M, d = self.M, t.shape[-1]
        masks = self.masks if cols is None else self.masks[:, cols]
        t.view(K, M, -1, d).mul_(masks.to(t.dtype).view(1, M, 1, d))
        return t


def _is_dataset(v: Any) -> bool:
    """A value that is a whole dataset (not a column of one): a column is a tensor, an array or a list of
    numbers or strings (:func:`slt.data.is_column_list`), so a mapping is one dataset's columns (a
    tokenizer's batch ``{"input_ids": ..., "labels": ...}``, with or without ``return_tensors``)."""
    if isinstance(v, tuple) and 2 <= len(v) <= 3 and all(isinstance(e, list) for e in v):
        return True  # (X, Y[, weights]) given as lists, as a 2- or 3-tuple is read everywhere
    if is_column_list(v):
        return False
    return (isinstance(v, (Data, Dataset, DataLoader, tuple, list, Mapping))
            or type(v).__name__ in ("Dataset", "BatchEncoding"))


def split_data(data: Any) -> tuple[list[str], list[Any]] | None:
    """``(labels, datasets)`` when ``data`` is a mapping ``{label: dataset}`` (data-refined LLC),
    else ``None``.

    A mapping whose values are all datasets — tuples ``(X, Y)``, :class:`slt.Data`, torch or
    Hugging Face ``Dataset`` s, mappings of columns (``{"input_ids": ..., "labels": ...}``) — is a mapping
    of distributions; a mapping whose values are tensors or
    arrays is one dataset's columns (``model(**batch)``).  A mixture is an error."""
    if not isinstance(data, Mapping) or not data:
        return None
    kinds = [_is_dataset(v) for v in data.values()]
    if not any(kinds):
        return None
    if not all(kinds):
        bad = [k for k, ok in zip(data, kinds) if not ok]
        raise ValueError(
            f"data mixes datasets and columns (keys {bad} are not datasets): a data-refined mapping is "
            "{label: dataset}, each dataset a tuple (X, Y), a mapping of columns, slt.Data or Dataset; a "
            "mapping of tensors is one dataset's columns"
        )
    labels = list(data)
    if not all(isinstance(k, str) for k in labels):
        raise ValueError(f"labels of a data mapping must be strings, got {labels!r}")
    for k, v in data.items():
        if isinstance(v, DataLoader):
            raise ValueError(f"data[{k!r}] is a DataLoader: a data-refined LLC needs every distribution as "
                             "tensors (X, Y) or a Dataset (each distribution draws its own minibatches)")
    return labels, list(data.values())


def concat_data(parts: Sequence[Any]) -> tuple[Data, list[Data], list[int]]:
    """``(concatenated source, parts as Data, offsets)``; the parts must have the same structure
    (inputs, targets present or not, weights present or not: absent weights become ones)."""
    datas = [as_source(p) for p in parts]
    if not all(isinstance(p, Data) for p in datas):
        raise ValueError("every distribution of a data mapping must be tensor data (not a DataLoader)")
    has_y = {p.y is not None for p in datas}
    if len(has_y) > 1:
        raise ValueError("the distributions of a data mapping must all have targets or all have none")

    def cat(vals: list[Any]) -> Any:
        if isinstance(vals[0], Tensor):
            shapes = {tuple(v.shape[1:]) for v in vals}
            if len(shapes) > 1:
                raise ValueError(f"the distributions' tensors have different per-sample shapes {sorted(shapes)}: "
                                 "pad them to one shape")
            return torch.cat(vals)
        keys = [tuple(v) for v in vals]
        if len(set(keys)) > 1:
            raise ValueError(f"the distributions have different columns: {sorted(set(keys))}")
        return {k: cat([v[k] for v in vals]) for k in vals[0]}

    x = cat([p.x for p in datas])
    y = cat([p.y for p in datas]) if datas[0].y is not None else None
    weights = None
    if any(p.weights is not None for p in datas):
        dev = _leaves(x)[0].device if not isinstance(x, Tensor) else x.device
        weights = torch.cat([p.weights.to(dev) if p.weights is not None else torch.ones(p.n, device=dev)
                             for p in datas])
    offsets, pos = [], 0
    for p in datas:
        offsets.append(pos)
        pos += p.n
    return Data(x, y, weights), datas, offsets
