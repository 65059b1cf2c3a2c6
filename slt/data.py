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

Inputs and targets
------------------
Inputs ``x`` (and targets ``y``) are either a tensor ``(n, ...)`` or a mapping
of named tensors of equal length ``n`` (``{"input_ids": ..., "attention_mask":
...}``; held as :class:`Columns`, whose rows can be indexed like a tensor's).
The model is called as ``model(x)`` for a tensor and ``model(**x)`` for a
mapping; ``loss_fn(output, target)`` receives the model's raw output and the
target: ``y`` when given, else the inputs themselves (the whole mapping).
NumPy arrays and Python lists of numbers are accepted wherever a tensor is
(``torch.as_tensor``; text and rows of different lengths are errors naming the
column), an ``IterableDataset`` is read once and stacked, a Hugging
Face ``datasets.Dataset`` becomes the mapping of its numeric columns, and a
``DataLoader`` may yield mappings.  Batches carry plain ``dict`` s.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from ._runtime import user_stacklevel

__all__ = ["Data", "Batch", "Columns", "LoaderSource", "as_source", "num_rows"]

#: A batch's inputs or targets: one tensor, or named tensors sharing the leading dimensions.
Inputs = Union[Tensor, Mapping[str, Tensor]]


class Columns(dict):
    """Named tensors of one dataset, all ``(n, ...)``: a ``dict`` (so ``model(**columns)``
    works) whose non-string indices select rows of every column, like a tensor's
    (``columns[:m]``, ``columns[index_tensor]``, ``columns[i]``)."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        return Columns({k: v[key] for k, v in self.items()})

    def __repr__(self) -> str:
        return "Columns(" + ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self.items()) + ")"


def _register_columns() -> None:
    """Columns are a pytree node like a dict (vmap and tree_map see their tensors)."""
    from torch.utils import _pytree

    if Columns not in _pytree.SUPPORTED_NODES:
        _pytree.register_pytree_node(
            Columns, lambda c: (list(c.values()), list(c.keys())),
            lambda values, keys: Columns(zip(keys, values)), serialized_type_name="slt.data.Columns",
        )


_register_columns()


def _map(fn: Callable[[Tensor], Tensor], t: Any) -> Any:
    """``fn`` on a tensor, or on every column of a mapping (a plain ``dict`` results;
    :class:`Columns` stay :class:`Columns`)."""
    if isinstance(t, Tensor):
        return fn(t)
    if isinstance(t, Mapping):
        out = {k: fn(v) for k, v in t.items()}
        return Columns(out) if isinstance(t, Columns) else out
    return fn(t)


def _leaves(t: Any) -> list[Tensor]:
    if isinstance(t, Tensor):
        return [t]
    if isinstance(t, Mapping):
        return [v for v in t.values() if isinstance(v, Tensor)]
    return []


def num_rows(t: Any) -> int:
    """Leading (sample) dimension of a tensor or of a mapping's first tensor."""
    if isinstance(t, Tensor):
        return t.shape[0]
    leaves = _leaves(t)
    if not leaves:
        raise TypeError(f"expected a tensor or a mapping of tensors, got {type(t).__name__}")
    return leaves[0].shape[0]


def row_numel(t: Any) -> int:
    """Elements per sample (summed over a mapping's columns)."""
    if isinstance(t, Tensor):
        return int(t[0].numel())
    return sum(int(v[0].numel()) for v in _leaves(t))


def _plain(t: Any) -> Any:
    """A :class:`Columns` as a plain ``dict`` (what batches carry); tensors unchanged."""
    return dict(t) if isinstance(t, Columns) else t


def _is_array(t: Any) -> bool:
    """A NumPy array, or a pandas ``DataFrame``/``Series`` (read as its ``to_numpy()``)."""
    return isinstance(t, np.ndarray) or _is_pandas(t)


def _is_pandas(t: Any) -> bool:
    return type(t).__module__.split(".")[0] == "pandas" and type(t).__name__ in ("DataFrame", "Series")


_SCALARS = (bool, int, float, str, np.generic)


def is_column_list(t: Any) -> bool:
    """A Python list (or tuple) of numbers or strings, possibly nested (a tokenizer's ``input_ids`` without
    ``return_tensors``, a list of labels, a text column): one column of samples, not a tuple of tensors
    ``(X, Y)`` nor a list of samples."""
    def depth(v: Any) -> int | None:  # nesting depth of a list of scalars (None: something else, or mixed)
        if isinstance(v, _SCALARS):
            return 0
        if not isinstance(v, (list, tuple)):
            return None
        inner = {depth(e) for e in v} or {0}
        return None if None in inner or len(inner) > 1 else 1 + inner.pop()

    # one depth throughout: rows of different lengths are still a column (an error naming it), while a pair
    # (X as lists of rows, Y as a list) is two columns
    return isinstance(t, (list, tuple)) and len(t) > 0 and depth(t) is not None


def _list_to_tensor(name: str, t: Sequence[Any]) -> Tensor:
    """A column given as a (nested) Python list: a tensor as ``torch.as_tensor(np.asarray(t))`` makes it
    (ints int64, floats float64 until the engine casts them); rows of different lengths and text are
    errors naming the column."""
    try:
        arr = np.asarray(t)
    except ValueError:  # ragged nesting
        arr = None
    if arr is None or arr.dtype == object:
        raise ValueError(
            f"{name} is a list whose rows have different lengths: pad them to one length (e.g. "
            "tokenizer(..., padding='max_length', return_tensors='pt'), with attention_mask, and labels -100 at "
            "the padding)")
    if arr.dtype.kind in "USV":
        raise ValueError(
            f"{name} is a list of text ({type(np.ravel(arr)[0].item()).__name__}), not numbers: a model input or "
            "target must be numeric — tokenize it first, or leave the column out")
    return torch.as_tensor(arr)


def _normal(t: Tensor) -> Tensor:
    """A tensor made under ``torch.inference_mode`` (features computed in an evaluation script) cannot
    take part in autograd ("Inference tensors cannot be saved for backward"): a normal copy of it."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def _to_tensor(name: str, t: Any) -> Any:
    """NumPy arrays and (nested) Python lists of numbers become tensors (``torch.as_tensor``; float64
    stays float64 until the engine casts floating data to its ``dtype``); inference tensors become
    normal ones (:func:`_normal`); everything else is returned as is."""
    if isinstance(t, Tensor):
        return _normal(t)
    if type(t).__name__ == "Column" and (type(t).__module__ or "").startswith("datasets."):
        return _to_tensor(name, t[:])  # a Hugging Face column (ds["x"], datasets >= 4): its values, as formatted
    if is_column_list(t):
        return _list_to_tensor(name, t)
    if not _is_array(t):
        return t
    kind = "NumPy array"
    if _is_pandas(t):
        kind, t = f"pandas {type(t).__name__} (as to_numpy())", t.to_numpy()
    if t.dtype == object or t.dtype.kind in "USV":
        raise ValueError(
            f"{name} is a {kind} of dtype {t.dtype}, which cannot become a tensor"
            + (" (rows of different lengths, or columns of mixed types? pad them to one length, or select "
               "the numeric columns)" if t.dtype == object else "")
        )
    if not t.flags.writeable:
        t = t.copy()
    return torch.as_tensor(t)


def _as_inputs(name: str, t: Any) -> Any:
    """A tensor, or :class:`Columns` of tensors (NumPy arrays converted)."""
    if isinstance(t, Tensor):
        return _normal(t)
    if isinstance(t, Mapping):
        if not t:
            raise ValueError(f"{name} is an empty mapping: no inputs")
        cols = {}
        for k, v in t.items():
            if not isinstance(k, str):
                raise TypeError(f"{name} keys must be strings (they are passed as model(**{name})), got {k!r}")
            cols[k] = _to_tensor(f"{name}[{k!r}]", v)
        return Columns(cols)
    if _is_hf_dataset(t):  # (inputs, labels) with the inputs a datasets.Dataset: its numeric columns
        return _from_hf_dataset(t).x
    return _to_tensor(name, t)


class Batch(NamedTuple):
    """One minibatch for C chains.

    ``x``: (C, B, ...) inputs; ``y``: (C, B, ...) targets (``x`` itself for a
    density model or inputs without a separate target); ``weights``: (C, B)
    per-sample weights (summing to one along B) or ``None``; ``shared``: True
    when every chain sees the same batch, which is then stored *without* the
    chain dimension (``x``: (B, ...), ``y``: (B, ...), ``weights``: (B,)) so
    that the forward pass can broadcast instead of copying.  ``x`` and ``y``
    may also be plain ``dict`` s of such tensors.
    """

    x: Inputs
    y: Inputs
    weights: Tensor | None
    shared: bool = False

    def per_chain(self, num_chains: int) -> "Batch":
        """The same batch with an explicit (expanded, no-copy) chain dimension."""
        if not self.shared:
            return self
        w = None if self.weights is None else self.weights.unsqueeze(0).expand(num_chains, *self.weights.shape)

        def expand(t: Tensor) -> Tensor:
            return t.unsqueeze(0).expand(num_chains, *t.shape)

        x = _map(expand, self.x)
        y = x if self.y is self.x else _map(expand, self.y)
        return Batch(x, y, w, False)


@dataclass(frozen=True, eq=False)
class Data(Dataset):
    """A dataset held as tensors: inputs, optional targets, optional weights.

    Parameters
    ----------
    x
        ``(n, ...)`` inputs, or a mapping of named ``(n, ...)`` tensors (the model
        is then called as ``model(**x)``).  NumPy arrays are converted with
        ``torch.as_tensor``.
    y
        ``(n, ...)`` targets (or a mapping of them), or ``None``: the loss then
        receives the inputs, ``loss_fn(model(x), x)`` (a density model, or a
        mapping whose loss reads its own columns, e.g. :func:`slt.losses.causal_lm`).
    weights
        ``(n,)`` non-negative per-sample weights (not all zero), or ``None``.
        The empirical loss is the weighted mean
        ``L_n(w) = sum_i weights_i l_i(w) / sum_i weights_i``; minibatches draw rows with
        probability proportional to the weights, and the sample size ``n`` of the default nβ
        counts the rows of positive weight (:attr:`support`: a row of weight 0 is not in the data).
    """

    x: Inputs
    y: Inputs | None = None
    weights: Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", _as_inputs("x", self.x))
        if self.y is not None:
            object.__setattr__(self, "y", _as_inputs("y", self.y))
        if self.weights is not None:
            object.__setattr__(self, "weights", _to_tensor("weights", self.weights))
        n = _validate_inputs("x", self.x, None)
        if n == 0:
            raise ValueError("empty dataset: x has 0 samples")
        if self.y is not None:
            _validate_inputs("y", self.y, n)
        if self.weights is not None:
            w = self.weights
            if not isinstance(w, Tensor) or w.ndim != 1 or w.shape[0] != n:
                raise ValueError(
                    f"weights must be a 1-D tensor of length n={n}, got "
                    f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__} (a dataset or batch of three "
                    "fields is read as (x, y, weights); a model with several inputs takes them as a mapping: "
                    "({'input_ids': ids, 'attention_mask': mask}, labels), or a dataset of dict items)"
                )
            if not torch.isfinite(w).all():
                raise ValueError("weights contain NaN or inf")
            if (w < 0).any():
                raise ValueError("weights must be non-negative; got a negative weight (a dataset or batch of three "
                                 "fields is read as (x, y, weights); a model with several inputs takes them as a "
                                 "mapping: ({'x1': X1, 'x2': X2}, Y))")
            if not (w > 0).any():
                raise ValueError("weights sum to zero: no sample carries any mass")

    # -- Dataset protocol -------------------------------------------------
    def __len__(self) -> int:
        return num_rows(self.x)

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
        return num_rows(self.x)

    @property
    def support(self) -> int:
        """The rows of positive weight (all ``n`` when unweighted): the sample size of the default nβ."""
        return self.n if self.weights is None else int((self.weights > 0).sum())

    @property
    def target(self) -> Inputs:
        return self.x if self.y is None else self.y

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Data":
        def conv1(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        def conv(t: Any) -> Any:
            return None if t is None else _map(conv1, t)

        return Data(conv(self.x), conv(self.y), conv(self.weights))

    def normalized_weights(self) -> Tensor | None:
        return None if self.weights is None else self.weights / self.weights.sum()

    # -- minibatches ------------------------------------------------------
    def full_batch(self) -> Batch:
        """The whole dataset as one batch shared by all chains."""
        x = _plain(self.x)
        return Batch(x, x if self.y is None else _plain(self.y), self.normalized_weights(), True)

    def sample_index(self, num_chains: int, batch_size: int, generator: torch.Generator) -> Tensor:
        """(C, B) indices, i.i.d. uniform (or proportional to the weights)."""
        if self.weights is None:
            device = self.x.device if isinstance(self.x, Tensor) else _leaves(self.x)[0].device
            return torch.randint(
                0, self.n, (num_chains, batch_size), generator=generator, device=device
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
        if isinstance(self.x, Tensor) and (self.y is None or isinstance(self.y, Tensor)):
            x = self.x.index_select(0, flat).view(*index.shape, *self.x.shape[1:])
            t = self.target
            y = x if t is self.x else t.index_select(0, flat).view(*index.shape, *t.shape[1:])
            return Batch(x, y, None)

        def take(v: Tensor) -> Tensor:
            return v.index_select(0, flat).view(*index.shape, *v.shape[1:])

        x = _plain(_map(take, self.x))
        y = x if self.y is None else _plain(_map(take, self.y))
        return Batch(x, y, None)


def _validate_inputs(name: str, t: Any, n: int | None) -> int:
    """Validate a tensor or every column of a mapping; returns the number of samples."""
    if isinstance(t, Mapping):
        first = None
        for k, v in t.items():
            if v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, Tensor) and v.ndim == 0):
                shown = v.item() if isinstance(v, Tensor) else v
                raise TypeError(
                    f"{name}[{k!r}] is {'a 0-d tensor' if isinstance(v, Tensor) else 'a ' + type(v).__name__} "
                    f"({shown!r}), not a column of samples: every entry of a mapping holds one row per sample. A "
                    f"keyword the model takes with the same value in every call belongs to the model: "
                    f"model.forward = functools.partial(model.forward, {k}={shown!r})")
            if n is not None and isinstance(v, Tensor) and v.ndim and v.shape[0] != n:
                raise ValueError(
                    f"{first or 'x'} and {name}[{k!r}] disagree on the number of samples: {n} vs {v.shape[0]}. Every "
                    f"entry of a mapping holds one row per sample; an input that is the same in every call (a "
                    f"graph's edge_index, a fixed mask) belongs to the model: "
                    f"model.forward = functools.partial(model.forward, {k}=...). A mapping {{label: data set}} of "
                    f"distributions (a data-refined LLC) gives each data set as a tuple, (X,) or (X, Y), or an "
                    f"slt.Data: a mapping of tensors is one data set's columns")
            m = _validate_tensor(f"{name}[{k!r}]", v, n, first or "x")
            if n is None:
                n, first = m, f"{name}[{k!r}]"
        return int(n)  # type: ignore[arg-type]
    return _validate_tensor(name, t, n)


def _validate_tensor(name: str, t: Any, n: int | None, ref: str = "x") -> int:
    if isinstance(t, (tuple, list)) and t and all(isinstance(v, Tensor) or _is_array(v) for v in t):
        raise TypeError(
            f"{name} is a {type(t).__name__} of {len(t)} tensors: a model with several inputs takes them as a "
            f"mapping of named tensors, called as model(**inputs) — e.g. data = ({{'x1': X1, 'x2': X2}}, Y) for "
            f"forward(self, x1, x2)"
        )
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (or a NumPy array, pandas DataFrame or list of numbers), got "
                        f"{type(t).__name__}")
    if t.ndim == 0:
        raise ValueError(f"{name} must have a leading sample dimension, got a 0-d tensor")
    if n is not None and t.shape[0] != n:
        raise ValueError(
            f"{ref} and {name} disagree on the number of samples: {n} vs {t.shape[0]}"
        )
    if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero().flatten()
        raise ValueError(
            f"{name} contains NaN or inf at {bad.numel()} sample(s), first at index {int(bad[0])}"
        )
    return t.shape[0]


class LoaderSource:
    """A user DataLoader: batches are streamed and shared by all chains.

    ``n`` is ``len(loader.dataset)`` when the dataset has a length, or the number of indices of a
    ``SubsetRandomSampler`` (the loader reads only those: n = 200 for a loader over 50 of 200 rows gave
    another nβ than ``nuts_llc``, which reads the 50).
    """

    def __init__(self, loader: DataLoader):
        from torch.utils.data import SubsetRandomSampler

        self.loader = loader
        self._it: Iterator | None = None
        try:
            self.n = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            self.n = None
        subset = [sm for sm in (getattr(loader, "sampler", None),
                                getattr(getattr(loader, "batch_sampler", None), "sampler", None))
                  if isinstance(sm, SubsetRandomSampler)]
        if subset:
            self.n = len(subset[0])
        if self.n == 0:
            raise ValueError("empty dataset: the DataLoader's dataset has 0 samples")

    @property
    def batch_size(self) -> int | None:
        """Samples per batch the loader yields: its ``batch_size``, else its batch sampler's, else the mean over an
        epoch (its dataset's size over its number of batches, for a batch sampler that does not say: it was recorded
        as the default 256 while the batches held 40), ``None`` when none of these is known."""
        b = getattr(self.loader, "batch_size", None)
        if b is None:
            b = getattr(getattr(self.loader, "batch_sampler", None), "batch_size", None)
        if isinstance(b, int):
            return int(b)
        try:
            batches = len(self.loader)
        except TypeError:  # (an iterable dataset without a length)
            return None
        return max(1, round(self.n / batches)) if self.n and batches else None

    @property
    def _samplers(self) -> list[Any]:
        """The loader's sampler and its batch sampler's (either may be ``None``)."""
        return [getattr(self.loader, "sampler", None),
                getattr(getattr(self.loader, "batch_sampler", None), "sampler", None)]

    @property
    def unseeded_shuffle(self) -> bool:
        """Whether the loader shuffles with PyTorch's global random state (a ``RandomSampler`` without a
        generator): its batches, and so a run, then differ from call to call whatever ``seed`` is."""
        from torch.utils.data import RandomSampler

        return any(isinstance(sm, RandomSampler) and sm.generator is None for sm in self._samplers)

    @property
    def fixed_cycle(self) -> int | None:
        """The number of batches per epoch of a loader that yields them in index order every epoch (a
        ``SequentialSampler``: ``shuffle=False``) and has more than one; ``None`` otherwise.  Such a loader
        repeats one cycle of batches, so the batch at a step is fixed by the step's position in the cycle."""
        from torch.utils.data import SequentialSampler

        if not any(isinstance(sm, SequentialSampler) for sm in self._samplers):
            return None
        try:
            cycle = len(self.loader)
        except TypeError:
            return None
        return cycle if cycle > 1 else None

    @property
    def never_read(self) -> int:
        """Samples a pass over the loader never yields: the remainder its ``drop_last=True`` drops when it
        reads in index order (a shuffling loader drops different ones each pass); 0 otherwise."""
        from torch.utils.data import SequentialSampler

        b = self.batch_size
        if not (getattr(self.loader, "drop_last", False) and isinstance(getattr(self.loader, "sampler", None),
                                                                      SequentialSampler) and b and self.n):
            return 0
        return int(self.n) % int(b)

    def in_order(self) -> tuple["LoaderSource", str | None]:
        """The loader to read when all of its data is wanted once (a full-batch run, per-sample influence):
        a loader that shuffles its whole dataset (``shuffle=True``) or drops its last batch
        (``drop_last=True``) is read as a loader over the same dataset, with the same collate function and
        batch size, in index order and without dropping, so that the rows are the dataset's, each once and
        in its order.  Returns ``(source, note)``: the note (else ``None``) says what changed, or that a
        sampler of another kind decides which samples and in which order the rows come."""
        from torch.utils.data import RandomSampler, SequentialSampler

        loader, sampler = self.loader, getattr(self.loader, "sampler", None)
        if isinstance(self.loader.dataset, IterableDataset) or self.n is None:
            return self, None
        drop = bool(getattr(loader, "drop_last", False))
        shuffles = (isinstance(sampler, RandomSampler) and not sampler.replacement
                    and sampler.num_samples == self.n)
        if not (drop or shuffles):
            if sampler is None or isinstance(sampler, SequentialSampler):
                return self, None
            return self, (f"the DataLoader's sampler ({type(sampler).__name__}) chooses the samples and their "
                          "order: the data are the samples it yielded, in that order")
        batch = self.batch_size or 64
        again = DataLoader(loader.dataset, batch_size=batch, shuffle=False, drop_last=False,
                           collate_fn=loader.collate_fn, generator=torch.Generator().manual_seed(0))  # (not the global)
        what = " and ".join(w for w, on in (("shuffles", shuffles), ("drops its last batch", drop)) if on)
        return LoaderSource(again), (f"the DataLoader {what}: its dataset was read in index order, every sample "
                                     "once, so that the data are the dataset's rows")

    def in_memory(self) -> tuple["Data", str | None, bool]:
        """All of the loader's data once, as tensors: read as :meth:`in_order` says and concatenated.
        Returns ``(data, note, reread)``: ``note`` as :meth:`in_order`'s, ``reread`` whether the dataset
        was read again in index order (its rows are then the dataset's; else the loader's, in its order)."""
        read, note = self.in_order()
        xs, ys, ws = [], [], []
        for x, y, w in read.iter_batches():
            xs.append(x)
            ys.append(y)
            ws.append(w)
        if not xs:
            raise ValueError("empty dataset: the DataLoader yielded no batch")
        y = None if any(v is None for v in ys) else _cat(ys)
        w = None if any(v is None for v in ws) else torch.cat([v.flatten() for v in ws])
        return Data(_cat(xs), y, w), note, read is not self

    def _unpack(self, item: Any) -> tuple[Inputs, Inputs | None, Tensor | None]:
        x, y, w = self._fields(item)
        for name, t in (("x", x), ("y", y), ("weights", w)):
            if any(v.ndim == 0 for v in _leaves(t)):
                auto = getattr(self.loader, "batch_sampler", None) is not None
                raise ValueError(
                    f"a DataLoader batch's {name} holds a 0-d tensor, so the loader yields single samples, not "
                    "batches with a leading sample dimension"
                    + ("" if auto else " (batch_size=None turns PyTorch's automatic batching off)")
                    + ": pass DataLoader(dataset, batch_size=B), or the dataset itself (slt then draws the minibatches)")
        return x, y, w

    def _fields(self, item: Any) -> tuple[Inputs, Inputs | None, Tensor | None]:
        if isinstance(item, Tensor):
            return _normal(item), None, None
        if isinstance(item, Mapping):  # a dict batch (default collate of dict items, a BatchEncoding)
            return _plain(_as_inputs("x", dict(item))), None, None
        if isinstance(item, (tuple, list)):
            item = [_plain(_as_inputs(f"batch[{i}]", v)) if isinstance(v, Mapping) else _to_tensor(f"batch[{i}]", v)
                    for i, v in enumerate(item)]
            if len(item) == 1:
                return item[0], None, None
            if len(item) == 2:
                return item[0], item[1], None
            if len(item) == 3:
                if not getattr(self, "_third_checked", False):  # (once per loader)
                    self._third_checked = True
                    _warn_integer_weights("a DataLoader batch of three fields", item[2])
                return item[0], item[1], item[2]
        raise ValueError(
            "DataLoader batches must be a tensor x, a mapping of tensors, (x,), (x, y) or (x, y, weights); got "
            f"{type(item).__name__}" + (f" of length {len(item)}" if hasattr(item, "__len__") else
                                         " (a custom batch object: make the collate_fn return a tuple (x, y) or a "
                                         "dict of tensors, e.g. dataclasses.astuple(batch))")
        )

    def count(self) -> int:
        """Count the samples of a loader whose dataset has no length (an ``IterableDataset``) in one
        pass over its batches, and record the number as ``n``.  The loader must be finite (the loss
        at w* is a pass over it too)."""
        n = sum(num_rows(x) for x, _, _ in self.iter_batches())
        if n == 0:
            raise ValueError("empty dataset: the DataLoader yielded no batch")
        self.n = n
        return n

    @contextmanager
    def random_state_kept(self) -> Iterator[None]:
        """The loader's random generators (its own ``generator=``, its sampler's) and PyTorch's global one
        (which a loader without its own draws from) restored on exit: a pass taken inside leaves the
        batches of later passes as they would have been."""
        gens = {id(g): g for g in [getattr(self.loader, "generator", None)] + [getattr(sm, "generator", None)
                                                                            for sm in self._samplers]
                if isinstance(g, torch.Generator)}
        states = [(g, g.get_state()) for g in gens.values()]
        global_state = torch.get_rng_state()
        try:
            yield
        finally:
            for g, state in states:
                g.set_state(state)
            torch.set_rng_state(global_state)

    def _iter(self) -> Iterator[Any]:
        """``iter(loader)``.  A loader without its own generator draws a base seed for its workers from
        PyTorch's global generator at every epoch; one that does not draw its order from it either (no
        unseeded shuffle) and runs no workers uses that seed for nothing, so the global state is restored:
        the user's later random numbers do not depend on whether they measured an LLC."""
        if self.unseeded_shuffle or getattr(self.loader, "num_workers", 0) or getattr(self.loader, "generator", None):
            return iter(self.loader)
        state = torch.get_rng_state()
        try:
            return iter(self.loader)
        finally:
            torch.set_rng_state(state)

    def iter_batches(self) -> Iterator[tuple[Inputs, Inputs | None, Tensor | None]]:
        for item in self._iter():
            yield self._unpack(item)

    def next_batch(self) -> tuple[Inputs, Inputs | None, Tensor | None]:
        for _ in range(2):
            if self._it is None:
                self._it = self._iter()
            try:
                return self._unpack(next(self._it))
            except StopIteration:
                self._it = None
        raise ValueError("empty dataset: the DataLoader yielded no batch")


def same_item(a: Any, b: Any) -> bool:
    """Whether two reads of a dataset item are equal (tensors, arrays, numbers, strings, and tuples, lists or
    mappings of them; an item of another kind counts as equal)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                  and torch.equal(a.nan_to_num(), b.nan_to_num())))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_item(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_item(x, y) for x, y in zip(a, b))
    if _is_array(a) and _is_array(b):
        return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=np.asarray(a).dtype.kind == "f"))
    if isinstance(a, (int, float, str, bool)) and isinstance(b, (int, float, str, bool)):
        return a == b or (a != a and b != b)
    return True


def random_items(ds: Any) -> bool:
    """Whether a map-style dataset's item 0 differs between two reads (random augmentation in
    ``__getitem__``), read with PyTorch's, Python's and NumPy's global random states restored after."""
    import random as _random

    if isinstance(ds, (IterableDataset, TensorDataset, Data)) or not hasattr(ds, "__getitem__"):
        return False
    states = (torch.get_rng_state(), _random.getstate(), np.random.get_state())
    try:
        return not same_item(ds[0], ds[0])
    except Exception:  # noqa: BLE001 - a dataset that cannot be read so is not judged here
        return False
    finally:
        torch.set_rng_state(states[0])
        _random.setstate(states[1])
        np.random.set_state(states[2])


def _stack_dataset(ds: Dataset) -> Data:
    if isinstance(ds, IterableDataset):  # no length nor indexing: its items, read once
        items = list(ds)
        if not items:
            raise ValueError("empty dataset: the IterableDataset yielded no samples")
        return _stack_records(items)
    n = len(ds)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("empty dataset: the Dataset has 0 samples")
    if isinstance(ds, TensorDataset):
        tensors = ds.tensors
    else:
        first = ds[0]
        items = [ds[i] for i in range(n)]
        if not same_item(first, items[0]):
            warnings.warn(
                "slt: the Dataset's items are random (two reads of item 0 differ: augmentation in __getitem__?): "
                "each item was read once, so the run samples the loss of that one draw of the data, and another "
                "call reads another draw (and another λ̂); to measure on fixed data, pass the dataset without its "
                "random transforms", RuntimeWarning, stacklevel=user_stacklevel())
        if isinstance(first, Tensor):
            tensors = (torch.stack(items),)
        elif isinstance(first, Mapping):  # dict items: one column per key
            tensors = (_stack_items(items),)
        else:
            tensors = tuple(_stack_items([it[j] for it in items]) for j in range(len(first)))
    weights = getattr(ds, "weights", None)
    if len(tensors) == 1:
        return Data(tensors[0], None, weights)
    if len(tensors) == 2:
        return Data(tensors[0], tensors[1], weights)
    if len(tensors) == 3 and weights is None:
        _warn_integer_weights("a dataset of three fields", tensors[2])
        return Data(tensors[0], tensors[1], tensors[2])
    raise ValueError(
        f"a Dataset item must be x, (x,), (x, y) or (x, y, weight); got {len(tensors)} fields"
    )


def _warn_integer_weights(what: str, third: Any) -> None:
    """Warn that an integer third field is read as the samples' weights (``TensorDataset(input_ids,
    attention_mask, labels)``, or a tuple ``(X, Y, group)``, silently weighted the loss by labels)."""
    if isinstance(third, Tensor) and not (third.is_floating_point() or third.is_complex()) or (
            _is_array(third) and getattr(getattr(third, "dtype", None), "kind", "f") in "iub"):
        warnings.warn(
            f"slt: {what} is read as (x, y, weights), and its third field ({third.dtype}) is taken as the samples' "
            "weights: if it holds labels or groups, pass the inputs as a mapping ({'input_ids': ids, "
            "'attention_mask': mask}, labels) or a dataset of dict items; integer counts as weights: pass them as "
            "floats to say so", RuntimeWarning, stacklevel=user_stacklevel())


def _stack_items(items: list[Any], name: str | None = None) -> Any:
    """Stack per-sample items (tensors, arrays, numbers, lists of numbers, or mappings of them) along a
    new dim 0; items of different shapes (unpadded token lists) are an error naming the field."""
    first = items[0]
    if isinstance(first, Mapping):
        return {k: _stack_items([it[k] for it in items], repr(k)) for k in first}
    if isinstance(first, (tuple, list)) and first and all(isinstance(t, Tensor) or _is_array(t) for t in first) \
            and any(getattr(t, "ndim", 0) >= 1 for t in first):
        raise ValueError(
            f"each sample's {'field ' + name if name else 'input'} is a {type(first).__name__} of {len(first)} "
            "tensors: a model with several inputs takes them as a mapping of named tensors, called as "
            "model(**inputs): make each sample ({'x1': x1, 'x2': x2}, y) for forward(self, x1, x2)")
    try:
        parts = [torch.as_tensor(it) for it in items]
    except (ValueError, TypeError, RuntimeError):
        parts = None  # ragged nested lists
    if parts is None or len({tuple(t.shape) for t in parts}) > 1:
        sizes = sorted({len(it) if hasattr(it, "__len__") else 0 for it in items})
        raise ValueError(
            f"the samples' field {name or ''} has different lengths ({sizes[0]} to {sizes[-1]}): pad them to one "
            "length (e.g. tokenizer(..., padding='max_length'), with attention_mask, and labels -100 at the padding)")
    return torch.stack(parts)


def _minibatch_sizes(data: Sequence[Any]) -> list[int] | None:
    """The leading sizes of a list of ``(x, y)`` / ``(x, y, w)`` items that look like minibatches (as
    ``list(loader)`` gives): in every item, every array field (the tensors of an ``x`` mapping included)
    has at least one dimension and all share one leading size, of at least 2 in some item, with ``y``
    not a scalar.  ``None`` otherwise (a scalar target or sizes that differ within an item: samples).
    Samples can look like this too (a token sequence and its next tokens, ``(ids[:-1], ids[1:])``)."""
    sizes = []
    for it in data:
        if isinstance(it, Mapping) or not isinstance(it, (tuple, list)) or len(it) < 2:
            return None
        leaves = [v for f in it for v in (f.values() if isinstance(f, Mapping) else [f])]
        if not all(isinstance(v, (Tensor, np.ndarray)) and v.ndim >= 1 for v in leaves):
            return None
        lead = {int(v.shape[0]) for v in leaves}
        if len(lead) != 1:
            return None
        sizes.append(lead.pop())
    return sizes if sizes and max(sizes) >= 2 else None


def _stack_records(data: Sequence[Any]) -> Data:
    """A list of samples (:func:`_is_records`) stacked into columns.  A list of minibatches (``list(loader)``:
    :func:`_minibatch_sizes`) would be read as one sample per minibatch: of different sizes (a last, smaller
    batch) it is an error naming the fix; of equal sizes it cannot be told from samples whose target has
    the input's length, and is read as samples with a warning naming both readings."""
    batches = _minibatch_sizes(data)
    fix = ("pass the DataLoader itself, or the batches joined into columns, e.g. "
           "(torch.cat([x for x, y in batches]), torch.cat([y for x, y in batches]))")
    if batches is not None and len(set(batches)) > 1:
        raise ValueError(
            f"data is a list of {len(data)} items that look like minibatches (each item's fields share a leading "
            f"size, {max(batches)} down to {min(batches)}), and slt reads a list as one sample per item: {fix}")
    out = _stack_dataset(data)  # type: ignore[arg-type]
    if batches is not None:
        warnings.warn(
            f"data: a list of {len(data)} (x, y) items whose fields share a leading size of {batches[0]} was read "
            f"as {len(data)} samples (n = {len(data)}), each with {batches[0]} rows; if the items are minibatches "
            f"(list(loader)), {fix}.  Samples given as stacked columns (X, Y) are not guessed at.",
            UserWarning, stacklevel=user_stacklevel())
    return out


def _is_records(data: Sequence[Any]) -> bool:
    """Whether a sequence holds one sample per item (a list used as a map-style dataset): every
    item a tuple/list or a mapping whose fields are tensors, arrays or numbers — not the columns
    ``(X, Y)`` themselves, whose items are whole tensors or arrays."""
    if not len(data):
        return False

    def field(v: Any) -> bool:
        return isinstance(v, (Tensor, np.ndarray, np.generic, int, float, bool))

    def numbers(v: Any) -> bool:  # a tokenizer's lists of ids (possibly nested)
        return isinstance(v, (list, tuple)) and all(
            isinstance(e, (int, float, bool, np.generic)) or numbers(e) for e in v)

    def fields(it: Mapping) -> bool:
        return bool(it) and all(field(v) or numbers(v) for v in it.values())

    def record(it: Any) -> bool:
        if isinstance(it, Mapping):
            return fields(it)
        # (x, y) / (x, y, weight), x possibly a mapping of inputs (a tokenized text and its label)
        # (x a tuple of tensors too: a model with several inputs, named when stacked by _stack_items)
        return (isinstance(it, (tuple, list)) and 0 < len(it) <= 3
                and all(field(v) or (isinstance(v, Mapping) and fields(v))
                        or (i == 0 and isinstance(v, (tuple, list)) and bool(v) and all(map(field, v)))
                        for i, v in enumerate(it)))

    return all(record(it) for it in data)


def _is_hf_dataset(data: Any) -> bool:
    mod = type(data).__module__ or ""
    return mod.startswith("datasets.") and hasattr(data, "column_names") and hasattr(data, "features")


def _from_hf_dataset(ds: Any) -> Data:
    """A Hugging Face ``datasets.Dataset`` -> :class:`Data` of its numeric columns (inputs, no
    separate target).  Text and other non-numeric columns are left out; columns whose rows
    differ in length must be padded first."""
    if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
        raise TypeError(
            f"a {type(ds).__name__} is streamed: wrap it in a torch DataLoader (batches of dicts) instead"
        )
    if len(ds) == 0:
        raise ValueError("empty dataset: the datasets.Dataset has 0 rows")
    rows = ds[:]  # honours a format the user set (torch / numpy / python lists)
    cols: dict[str, Tensor] = {}
    for name, v in rows.items():
        if isinstance(v, Tensor):
            cols[name] = v
            continue
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], Tensor):
            if len({tuple(t.shape) for t in v}) > 1:
                raise ValueError(f"column {name!r} of the datasets.Dataset has rows of different lengths: "
                                 "pad them to one length (e.g. tokenizer(..., padding='max_length'))")
            cols[name] = torch.stack(list(v))
            continue
        try:
            arr = np.asarray(v if isinstance(v, np.ndarray) else list(v))
        except ValueError:  # ragged nested lists
            raise ValueError(f"column {name!r} of the datasets.Dataset has rows of different lengths: "
                             "pad them to one length (e.g. tokenizer(..., padding='max_length'))") from None
        if arr.dtype.kind in "biuf":
            cols[name] = torch.as_tensor(arr)
        elif arr.dtype == object and arr.size and isinstance(arr.flat[0], (list, np.ndarray)):
            raise ValueError(f"column {name!r} of the datasets.Dataset has rows of different lengths: "
                             "pad them to one length (e.g. tokenizer(..., padding='max_length'))")
        # text and other non-numeric columns are not model inputs: left out
    if not cols:
        raise ValueError(f"the datasets.Dataset has no numeric columns (columns: {list(ds.column_names)})")
    return Data(cols)


def as_source(data: Any) -> Data | LoaderSource:
    """Convert any accepted data form into a :class:`Data` or :class:`LoaderSource`.

    Accepted: :class:`Data`; a tensor ``X`` (density model); a pair ``(X, Y)``;
    a triple ``(X, Y, weights)``; a mapping of equal-length tensors (inputs
    passed as ``model(**x)``, the loss receiving the mapping); a ``Dataset``
    whose items are ``x``, ``(x, y)``, ``(x, y, weight)`` or mappings (or that
    has a ``weights`` attribute), which is stacked into tensors, and likewise a
    list of such samples (``[(x, y), ...]``); a Hugging Face
    ``datasets.Dataset`` (its numeric columns, as a mapping); a ``DataLoader``
    (streamed, shared batches; it may yield mappings); an ``IterableDataset``
    (its samples read once and stacked, as a list of samples is).  NumPy
    arrays and (nested) Python lists of numbers are accepted wherever a tensor
    is.
    """
    if isinstance(data, (Data, LoaderSource)):
        return data
    if isinstance(data, Tensor):
        return Data(data)
    if _is_array(data) or isinstance(data, Mapping):
        return Data(data)
    if isinstance(data, DataLoader):
        return LoaderSource(data)
    if _is_hf_dataset(data):
        return _from_hf_dataset(data)
    if isinstance(data, Dataset):
        return _stack_dataset(data)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        if _is_records(data):  # [(x, y), ...] or [{"x": ..., ...}, ...]: one sample per item
            if len(data) == 1 and isinstance(data[0], Mapping):
                raise ValueError(
                    "data is a sequence holding one mapping, which reads as a list of samples of one sample: pass the "
                    "mapping itself (data={'x': X, 'y': Y}: its tensors' first dimension are the samples)")
            return _stack_records(data)
        if len(data) == 2:
            return Data(data[0], data[1])
        if len(data) == 3:
            _warn_integer_weights("data as a triple", data[2])
            return Data(data[0], data[1], data[2])
        if len(data) == 1:
            return Data(data[0])
        raise ValueError(
            f"data as a sequence must be (X,), (X, Y) or (X, Y, weights), or a list of samples (x, y) or "
            f"mappings; got {len(data)} items of type {type(data[0]).__name__ if len(data) else None}"
        )
    raise TypeError(
        "data must be a tensor X, a pair (X, Y), a triple (X, Y, weights), a mapping of tensors, slt.Data, "
        f"a torch Dataset, a datasets.Dataset or a DataLoader; got {type(data).__name__}"
    )


def _cat(parts: list[Any]) -> Any:
    """Concatenate batches along samples: tensors, or mappings of tensors column by column; batches whose
    other dimensions differ (sequences padded per batch to their own length) are named."""
    def cat(ts: list[Tensor], what: str) -> Tensor:
        shapes = sorted({tuple(t.shape[1:]) for t in ts})
        if len(shapes) > 1:
            raise ValueError(
                f"the DataLoader's batches hold {what} of different shapes beyond the sample dimension ({shapes[0]} "
                f"and {shapes[-1]}, ...), so they cannot be joined into one dataset (read whole here): sequences padded "
                "per batch to their own length? Pad every batch to one length (a tokenizer's padding='max_length', "
                "max_length=L, or a collate_fn that pads to L)")
        return torch.cat(ts)

    if isinstance(parts[0], Tensor):
        return cat(parts, "tensors")
    return {k: cat([p[k] for p in parts], f"{k!r}") for k in parts[0]}
