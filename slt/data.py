"""Data containers and minibatch sources for the LLC engine.

Every input form that :func:`slt.estimate_llc` accepts is converted here into one
of two sources:

* :class:`Data` (tensors held on the device): minibatches are drawn by index,
  independently for every chain, with replacement (weighted data: with
  probability proportional to the weights), so consecutive minibatches are
  independent and chains see independent minibatch noise.
* :class:`LoaderSource` (a user ``DataLoader``): batches are streamed, cycling
  over epochs, and shared by all chains.

Sampling with replacement makes ``L_B`` an unbiased estimate of ``L_n`` for
every ``w`` *independent of the current position* -- an epoch-based scheme
without replacement is not: the next batch is anti-correlated with the batches
that just pulled the chain towards their own minimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["Data", "Batch", "LoaderSource", "as_source"]


class Batch(NamedTuple):
    """One minibatch for C chains.

    ``x``: (C, B, ...) inputs; ``y``: (C, B, ...) targets (``x`` itself for a
    density model); ``weights``: (C, B) per-sample weights (summing to one
    along B) or ``None``; ``shared``: True when every chain sees the same
    batch, which is then stored *without* the chain dimension (``x``: (B, ...),
    ``y``: (B, ...), ``weights``: (B,)) so that the forward pass can broadcast
    instead of copying.
    """

    x: Tensor
    y: Tensor
    weights: Tensor | None
    shared: bool = False

    def per_chain(self, num_chains: int) -> "Batch":
        """The same batch with an explicit (expanded, no-copy) chain dimension."""
        if not self.shared:
            return self
        w = None if self.weights is None else self.weights.unsqueeze(0).expand(num_chains, *self.weights.shape)
        return Batch(
            self.x.unsqueeze(0).expand(num_chains, *self.x.shape),
            self.y.unsqueeze(0).expand(num_chains, *self.y.shape),
            w, False,
        )


@dataclass(frozen=True, eq=False)
class Data(Dataset):
    """A dataset held as tensors: inputs, optional targets, optional weights.

    Parameters
    ----------
    x
        ``(n, ...)`` inputs.
    y
        ``(n, ...)`` targets, or ``None`` for a density model, whose loss is
        ``loss_fn(model(x), x)``.
    weights
        ``(n,)`` non-negative per-sample weights (not all zero), or ``None``.
        The empirical loss is the weighted mean
        ``L_n(w) = sum_i weights_i l_i(w) / sum_i weights_i``.
    """

    x: Tensor
    y: Tensor | None = None
    weights: Tensor | None = None

    def __post_init__(self) -> None:
        n = _validate_tensor("x", self.x, None)
        if n == 0:
            raise ValueError("empty dataset: x has 0 samples")
        if self.y is not None:
            _validate_tensor("y", self.y, n)
        if self.weights is not None:
            w = self.weights
            if not isinstance(w, Tensor) or w.ndim != 1 or w.shape[0] != n:
                raise ValueError(
                    f"weights must be a 1-D tensor of length n={n}, got "
                    f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}"
                )
            if not torch.isfinite(w).all():
                raise ValueError("weights contain NaN or inf")
            if (w < 0).any():
                raise ValueError("weights must be non-negative; got a negative weight")
            if not (w > 0).any():
                raise ValueError("weights sum to zero: no sample carries any mass")

    # -- Dataset protocol -------------------------------------------------
    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        items = [self.x[i]]
        if self.y is not None:
            items.append(self.y[i])
        if self.weights is not None:
            items.append(self.weights[i])
        return tuple(items)

    # -- helpers ----------------------------------------------------------
    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def target(self) -> Tensor:
        return self.x if self.y is None else self.y

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Data":
        def conv(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return Data(conv(self.x), conv(self.y), conv(self.weights))

    def normalized_weights(self) -> Tensor | None:
        return None if self.weights is None else self.weights / self.weights.sum()

    # -- minibatches ------------------------------------------------------
    def full_batch(self) -> Batch:
        """The whole dataset as one batch shared by all chains."""
        return Batch(self.x, self.target, self.normalized_weights(), True)

    def sample_index(self, num_chains: int, batch_size: int, generator: torch.Generator) -> Tensor:
        """(C, B) indices, i.i.d. uniform (or proportional to the weights)."""
        if self.weights is None:
            return torch.randint(
                0, self.n, (num_chains, batch_size), generator=generator, device=self.x.device
            )
        idx = torch.multinomial(
            self.weights.double() if self.weights.device.type == "cpu" else self.weights,
            num_chains * batch_size,
            replacement=True,
            generator=generator,
        )
        return idx.view(num_chains, batch_size)

    def gather(self, index: Tensor) -> Batch:
        """Batch for (C, B) indices.  Weighted data were sampled by weight, so the
        minibatch mean is already an unbiased estimate of the weighted loss."""
        flat = index.reshape(-1)  # index_select is ~5x faster than x[index] on CPU
        x = self.x.index_select(0, flat).view(*index.shape, *self.x.shape[1:])
        t = self.target
        y = x if t is self.x else t.index_select(0, flat).view(*index.shape, *t.shape[1:])
        return Batch(x, y, None)


def _validate_tensor(name: str, t: Any, n: int | None) -> int:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim == 0:
        raise ValueError(f"{name} must have a leading sample dimension, got a 0-d tensor")
    if n is not None and t.shape[0] != n:
        raise ValueError(
            f"x and {name} disagree on the number of samples: {n} vs {t.shape[0]}"
        )
    if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero().flatten()
        raise ValueError(
            f"{name} contains NaN or inf at {bad.numel()} sample(s), first at index {int(bad[0])}"
        )
    return t.shape[0]


class LoaderSource:
    """A user DataLoader: batches are streamed and shared by all chains.

    ``n`` is ``len(loader.dataset)`` when the dataset has a length.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self._it: Iterator | None = None
        try:
            self.n = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            self.n = None
        if self.n == 0:
            raise ValueError("empty dataset: the DataLoader's dataset has 0 samples")

    def _unpack(self, item: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if isinstance(item, Tensor):
            return item, None, None
        if isinstance(item, (tuple, list)):
            if len(item) == 1:
                return item[0], None, None
            if len(item) == 2:
                return item[0], item[1], None
            if len(item) == 3:
                return item[0], item[1], item[2]
        raise ValueError(
            "DataLoader batches must be a tensor x, (x,), (x, y) or (x, y, weights); got "
            f"{type(item).__name__} of length {len(item) if hasattr(item, '__len__') else '?'}"
        )

    def iter_batches(self) -> Iterator[tuple[Tensor, Tensor | None, Tensor | None]]:
        for item in self.loader:
            yield self._unpack(item)

    def next_batch(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return self._unpack(next(self._it))
            except StopIteration:
                self._it = None
        raise ValueError("empty dataset: the DataLoader yielded no batch")


def _stack_dataset(ds: Dataset) -> Data:
    n = len(ds)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("empty dataset: the Dataset has 0 samples")
    if isinstance(ds, TensorDataset):
        tensors = ds.tensors
    else:
        first = ds[0]
        items = [ds[i] for i in range(n)]
        if isinstance(first, Tensor):
            tensors = (torch.stack(items),)
        else:
            tensors = tuple(
                torch.stack([torch.as_tensor(it[j]) for it in items]) for j in range(len(first))
            )
    weights = getattr(ds, "weights", None)
    if len(tensors) == 1:
        return Data(tensors[0], None, weights)
    if len(tensors) == 2:
        return Data(tensors[0], tensors[1], weights)
    if len(tensors) == 3 and weights is None:
        return Data(tensors[0], tensors[1], tensors[2].flatten())
    raise ValueError(
        f"a Dataset item must be x, (x,), (x, y) or (x, y, weight); got {len(tensors)} fields"
    )


def as_source(data: Any) -> Data | LoaderSource:
    """Convert any accepted data form into a :class:`Data` or :class:`LoaderSource`.

    Accepted: :class:`Data`; a tensor ``X`` (density model); a pair ``(X, Y)``;
    a triple ``(X, Y, weights)``; a ``Dataset`` whose items are ``x``, ``(x, y)``
    or ``(x, y, weight)`` (or that has a ``weights`` attribute), which is
    stacked into tensors; a ``DataLoader`` (streamed, shared batches).
    """
    if isinstance(data, (Data, LoaderSource)):
        return data
    if isinstance(data, Tensor):
        return Data(data)
    if isinstance(data, DataLoader):
        return LoaderSource(data)
    if isinstance(data, Dataset):
        return _stack_dataset(data)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        if len(data) == 2:
            return Data(data[0], data[1])
        if len(data) == 3:
            return Data(data[0], data[1], data[2])
        if len(data) == 1:
            return Data(data[0])
        raise ValueError(
            f"data as a sequence must be (X,), (X, Y) or (X, Y, weights); got {len(data)} items"
        )
    raise TypeError(
        "data must be a tensor X, a pair (X, Y), a triple (X, Y, weights), slt.Data, a "
        f"torch Dataset or a DataLoader; got {type(data).__name__}"
    )
