"""Loss adapters: per-chain and per-sample losses from a user's mean loss.

A user gives ``loss_fn(output, target) -> scalar`` (the mean loss over a batch).
The engine needs per-chain losses ``(C,)`` for C parameter sets at once and,
for weighted data and for the control variate, per-sample losses.  This module
derives them without changing what the user's loss means:

* known PyTorch losses (``F.mse_loss``, ``nn.MSELoss``, ``F.cross_entropy``,
  ``nn.CrossEntropyLoss``, ``F.nll_loss``, ``F.l1_loss``,
  ``F.binary_cross_entropy_with_logits`` with mean reduction) get exact native
  per-sample versions;
* a loss may carry an attribute ``per_sample``: a callable mapping
  ``(output, target)`` with leading dims ``(..., B)`` to per-sample losses of
  shape ``(..., B)`` such that their mean is the scalar loss;
* anything else is lifted with ``torch.func.vmap``.

Outputs and targets need not be tensors: a model may return a tuple, a dict or
a dataclass such as a Hugging Face ``ModelOutput`` (any ``torch.utils._pytree``
of tensors, non-tensor leaves such as a key/value cache passed through), and a
target may be a mapping of tensors (the inputs of a model called as
``model(**batch)``).  The loss receives them as they are; the ``vmap`` lift
maps every tensor leaf whose leading dimension is the batch's.

:func:`causal_lm` is next-token cross-entropy for causal language models, with a
per-sequence form; :func:`model_loss` reads the loss a model computed itself
(``output.loss``), the default when no ``loss_fn`` is given.

A loss that is not a mean over samples (cross-entropy over tokens some of whose
labels are ``-100``, a loss that couples the samples of a batch) is followed as it
is; the engine finds out (:meth:`slt.target.Target.star_losses`) and computes the
loss at w* on each minibatch by a forward pass instead of a lookup.  The known
cross-entropy and NLL count ignored targets exactly (:meth:`LossAdapter.counts`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._runtime import vmapped_block

__all__ = ["LossAdapter", "register_per_sample", "causal_lm", "model_loss", "count_weighted_mean", "label_counts",
           "label_count_options", "label_weighted", "candidate_means"]

LossFn = Callable[[Tensor, Tensor], Tensor]
PerSample = Callable[[Tensor, Tensor], Tensor]  # (lead..., *s), (lead..., *s) -> (lead...)


def _trailing_mean(t: Tensor, lead: int) -> Tensor:
    return t.reshape(*t.shape[:lead], -1).mean(-1) if t.ndim > lead else t


def _mse(o: Tensor, t: Tensor, lead: int) -> Tensor:
    return _trailing_mean((o - t).square(), lead)


def _l1(o: Tensor, t: Tensor, lead: int) -> Tensor:
    return _trailing_mean((o - t).abs(), lead)


def _bce_logits(o: Tensor, t: Tensor, lead: int) -> Tensor:
    return _trailing_mean(F.binary_cross_entropy_with_logits(o, t, reduction="none"), lead)


class _Classification:
    r"""Per-sample cross-entropy / NLL: output ``(lead..., K, *extra)``, target ``(lead..., *extra)``
    (class indices) or the output's shape (class probabilities).

    With class indices, PyTorch's mean reduction divides by the summed weights of the counted targets,
    not by the number of samples: targets equal to ``ignore_index`` count 0 and, with class weights
    ``weight``, a target of class k counts ``weight[k]``.  A sample's loss is its weighted mean over its
    counted targets (0 when it has none), and :meth:`counts` gives its total count, so that the batch
    loss :math:`\sum_i c_i \ell_i / \sum_i c_i` is PyTorch's mean."""

    def __init__(self, fn: Callable, ignore_index: int = -100, weight: Tensor | None = None):
        self.fn, self.ignore_index, self.weight = fn, ignore_index, weight

    def _weight(self, like: Tensor) -> Tensor | None:
        return None if self.weight is None else self.weight.to(device=like.device, dtype=like.dtype)

    def __call__(self, o: Tensor, t: Tensor, lead: int) -> Tensor:
        lead_shape = o.shape[:lead]
        o2 = o.reshape(-1, *o.shape[lead:])
        t2 = t.reshape(-1, *t.shape[lead:])
        if t.is_floating_point():
            out = self.fn(o2, t2, reduction="none", weight=self._weight(o))
            return _trailing_mean(out.reshape(*lead_shape, *out.shape[1:]), lead)
        # weight[target] · loss, 0 at ignored entries
        out = self.fn(o2, t2, reduction="none", ignore_index=self.ignore_index, weight=self._weight(o))
        out = out.reshape(*lead_shape, *out.shape[1:])
        total = out.reshape(*lead_shape, -1).sum(-1) if out.ndim > lead else out
        return total / self.counts(t, lead, out.dtype).clamp_min(torch.finfo(out.dtype).tiny)

    def counts(self, t: Tensor, lead: int, dtype: torch.dtype) -> Tensor | None:
        """Summed weights of each sample's counted targets ``(lead...)`` (``None`` for class
        probabilities, whose mean is over samples)."""
        if t.is_floating_point():
            return None
        kept = t != self.ignore_index
        if self.weight is None:
            c = kept.to(dtype)
        else:
            c = self.weight.to(device=t.device, dtype=dtype)[t.masked_fill(~kept, 0).long()] * kept.to(dtype)
        return c.reshape(*t.shape[:lead], -1).sum(-1) if t.ndim > lead else c


_KNOWN: dict[object, Callable[[Tensor, Tensor, int], Tensor]] = {
    F.mse_loss: _mse,
    F.l1_loss: _l1,
    F.binary_cross_entropy_with_logits: _bce_logits,
    F.cross_entropy: _Classification(F.cross_entropy),
    F.nll_loss: _Classification(F.nll_loss),
}
_KNOWN_MODULES: dict[type, Callable[[Tensor, Tensor, int], Tensor]] = {
    nn.MSELoss: _mse,
    nn.L1Loss: _l1,
    nn.BCEWithLogitsLoss: _bce_logits,
    nn.CrossEntropyLoss: _Classification(F.cross_entropy),
    nn.NLLLoss: _Classification(F.nll_loss),
}


def count_weighted_mean(values: Tensor, counts: Tensor, dim: int | None = None) -> Tensor:
    r""":math:`\sum_i c_i v_i / \sum_i c_i` along ``dim`` (all dims when ``None``); 0 where every count is 0."""
    if dim is None:
        return (values * counts).sum() / counts.sum().clamp_min(torch.finfo(values.dtype).tiny)
    return (values * counts).sum(dim) / counts.sum(dim).clamp_min(torch.finfo(values.dtype).tiny)


def weighted_mean(values: Tensor, weights: Tensor, counts: Tensor | None = None, dim: int = -1) -> Tensor:
    r"""The loss of weighted data: :math:`\sum_i w_i v_i` along ``dim`` for weights that sum to one, and with a
    loss that averages over counted targets (``counts`` :math:`c_i`: class weights, ``ignore_index``,
    labelled tokens; :meth:`LossAdapter.counts`) :math:`\sum_i w_i c_i v_i / \sum_i w_i c_i`, so that equal
    weights give the loss of the unweighted data (a class-weighted cross-entropy with ``Data(x, y, ones)``
    dropped its class weights: λ̂ −29.3 against 2.85)."""
    if counts is None:
        return (values * weights).sum(dim)
    wc = weights * counts  # (its last dim is the samples'; leading dims broadcast against values')
    return (values * wc).sum(dim) / wc.sum(-1).clamp_min(torch.finfo(values.dtype).tiny)


def label_counts(target: Any) -> list[Tensor]:
    """Candidate ``(n,)`` counts of labelled entries per sample — integer labels not equal to -100
    (Hugging Face's and PyTorch's ignore index), from a tensor target or a mapping's ``"labels"``: over
    all positions, and over positions 1: (a causal-LM loss that shifts the labels by one).  Counts that
    are equal for every sample are left out (the plain mean already fits them)."""
    return [c for c in label_count_options(target).values() if bool((c < c.max()).any())]


def label_count_options(target: Any, min_ndim: int = 1) -> dict[str, Tensor]:
    """``{"all": counts, "shifted": counts}`` of :func:`label_counts`, unfiltered: each sample's labelled entries
    (integer labels not -100, from a tensor or a mapping's ``"labels"``) over all positions, and over positions
    1: for ``(n, T)`` labels with T > 1; ``{}`` without integer labels of at least ``min_ndim`` dims."""
    labels = target.get("labels") if isinstance(target, Mapping) else target
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.ndim < min_ndim:
        return {}
    kept = (labels != -100).reshape(labels.shape[0], -1)
    options = {"all": kept.sum(1)}
    if labels.ndim == 2 and labels.shape[1] > 1:
        options["shifted"] = kept[:, 1:].sum(1)
    return options


def label_weighted(per_sample: Tensor, counts: Tensor) -> Tensor | None:
    """Per-sample losses ``(..., n)`` ready for a mean weighted by ``counts`` ``(n,)`` (:func:`label_counts`):
    a sample with no labelled entry weighs 0 (its own loss, 0/0, is set to 0); ``None`` when another is
    not finite."""
    weighted = per_sample.masked_fill((counts == 0).to(per_sample.device), 0.0)
    return weighted if bool(torch.isfinite(weighted).all()) else None


def candidate_means(per_sample: Tensor, target: Any) -> list[Tensor]:
    """The means over the last dim of per-sample losses ``(..., n)`` that a mean loss over the batch
    can be: the plain mean, then the mean weighted by each sample's labelled entries for each of
    :func:`label_counts` (a mean over tokens whose ignored labels are -100)."""
    means = [per_sample.mean(-1)]
    for counts in label_counts(target):
        counts = counts.to(per_sample)
        weighted = label_weighted(per_sample, counts)
        if weighted is not None:
            means.append(count_weighted_mean(weighted, counts, -1))
    return means


def register_per_sample(loss_fn: LossFn, per_sample: PerSample) -> LossFn:
    """Declare the per-sample form of ``loss_fn`` (returns ``loss_fn``)."""
    loss_fn.per_sample = per_sample  # type: ignore[attr-defined]
    return loss_fn


def _known_per_sample(loss_fn: object) -> Callable[[Tensor, Tensor, int], Tensor] | None:
    if loss_fn in _KNOWN:  # type: ignore[operator]
        return _KNOWN[loss_fn]  # type: ignore[index]
    for cls, ps in _KNOWN_MODULES.items():
        if type(loss_fn) is cls:
            mod = loss_fn  # type: ignore[assignment]
            if getattr(mod, "reduction", "mean") != "mean":
                return None
            if getattr(mod, "label_smoothing", 0.0) or getattr(mod, "pos_weight", None) is not None:
                return None
            if isinstance(ps, _Classification):
                return _Classification(ps.fn, getattr(mod, "ignore_index", -100), getattr(mod, "weight", None))
            if getattr(mod, "weight", None) is not None:
                return None
            return ps
    return None


class LossAdapter:
    """Per-chain, per-sample and weighted evaluations of a mean loss.

    Parameters
    ----------
    loss_fn
        ``loss_fn(output, target) -> scalar``, the mean loss over a batch.
    per_sample
        Its per-sample form ``(output, target) -> (B,)``, overriding a known or registered one.
    """

    def __init__(self, loss_fn: LossFn, per_sample: PerSample | None = None):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self._known = None if per_sample is not None else _known_per_sample(loss_fn)
        self._attr: PerSample | None = per_sample if per_sample is not None else getattr(loss_fn, "per_sample", None)
        self.has_native_per_sample = self._known is not None or self._attr is not None
        #: why the vmap lift of the loss to per-sample losses is unusable for this model's outputs
        #: (set by :func:`slt.evaluator.validate_model_and_loss`), or ``None``
        self.per_sample_error: str | None = None
        #: the shapes of the model's output and the target on the set-up's probe batch, when both are tensors
        #: whose shapes differ only by a trailing 1 (``(n, 1)`` against ``(n,)``): a loss written by hand then
        #: usually broadcasts them, which :meth:`slt.target.Target._check_decomposition` names
        self.trailing_one: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    # ------------------------------------------------------------------
    def per_sample(self, out: Any, target: Any, lead: int) -> Tensor:
        """Per-sample losses of shape ``out.shape[:lead]`` (the target's leading dims
        when the output is not a tensor).

        ``lead`` counts the leading dims (2 for ``(C, B, ...)``, 1 for ``(B, ...)``).
        """
        tensors = isinstance(out, Tensor) and isinstance(target, Tensor)
        expected = out.shape[:lead] if isinstance(out, Tensor) else _lead_shape(target, lead)
        if self._known is not None:
            res = self._known(out, target, lead)
        elif self._attr is not None:
            res = self._attr(out, target)
        elif self.per_sample_error is not None:
            raise ValueError(self.per_sample_error)
        elif tensors:
            def one(o: Tensor, t: Tensor) -> Tensor:
                return self.loss_fn(o.unsqueeze(0), t.unsqueeze(0))

            f = one
            for _ in range(lead):
                f = torch.vmap(f)
            with vmapped_block():
                res = f(out, target)
        else:
            def one_tree(o: Any, t: Any) -> Tensor:
                return self.loss_fn(_tree_map(_unsqueeze0, o), _tree_map(_unsqueeze0, t))

            res = _vmap_leading(one_tree, list(expected), out, target)
        if not isinstance(res, Tensor) or res.shape != expected:
            got = tuple(res.shape) if isinstance(res, Tensor) else type(res).__name__
            raise ValueError(
                f"per-sample loss has shape {got}, expected {tuple(expected)}"
                " (one value per sample)"
            )
        return res

    def counts(self, target: Any, lead: int, dtype: torch.dtype) -> Tensor | None:
        r"""How much each sample weighs in the loss's mean over a batch, shape ``target.shape[:lead]``,
        or ``None`` when every sample weighs the same.

        Cross-entropy and NLL (known forms) with targets at ``ignore_index`` average over the counted
        entries, not over samples: the mean over a batch is :math:`\sum_i c_i\ell_i / \sum_i c_i`."""
        counts = getattr(self._known, "counts", None)
        if counts is None or not isinstance(target, Tensor):
            return None
        return counts(target, lead, dtype)

    def chain_loss(self, out: Any, target: Any, weights: Tensor | None) -> Tensor:
        """Per-chain mean (or weighted mean) loss: (C, B, ...) -> (C,).

        ``weights`` are (C, B) and sum to one along B.
        """
        if weights is None:
            if self.has_native_per_sample:
                ps = self.per_sample(out, target, 2)
                c = self.counts(target, 2, ps.dtype)
                return ps.mean(1) if c is None else count_weighted_mean(ps, c, 1)
            if isinstance(out, Tensor) and isinstance(target, Tensor):
                with vmapped_block():
                    return torch.vmap(self.loss_fn)(out, target)
            return _vmap_leading(self.loss_fn, [_lead_shape(target, 1)[0]], out, target)
        ps = self.per_sample(out, target, 2)
        return weighted_mean(ps, weights, self.counts(target, 2, ps.dtype), 1)

    def single_loss(self, out: Any, target: Any, weights: Tensor | None) -> Tensor:
        """One chain's loss: (B, ...) -> scalar (used inside ``vmap``)."""
        if weights is None:
            return self.loss_fn(out, target)
        ps = self.per_sample(out, target, 1)
        return weighted_mean(ps, weights, self.counts(target, 1, ps.dtype), 0)


# ----------------------------------------------------------------------------
# pytrees (outputs and targets that are not tensors)
# ----------------------------------------------------------------------------
def _tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    leaves, rebuild = _flatten(tree)
    return rebuild([fn(v) for v in leaves])


def _unsqueeze0(t: Any) -> Any:
    return t.unsqueeze(0) if isinstance(t, Tensor) else t


def _lead_shape(target: Any, lead: int) -> torch.Size:
    """Leading ``lead`` dims of the first tensor in ``target`` (a tensor, a mapping or a pytree)."""
    if isinstance(target, Tensor):
        return target.shape[:lead]
    from torch.utils._pytree import tree_leaves

    leaves = list(target.values()) if isinstance(target, Mapping) else tree_leaves(target)
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.ndim >= lead:
            return leaf.shape[:lead]
    raise TypeError(f"cannot find a tensor with {lead} leading dimension(s) in a {type(target).__name__}")


def _is_plain_dataclass(obj: Any) -> bool:
    """A dataclass instance that ``torch.utils._pytree`` does not know (Hugging Face registers
    its ``ModelOutput`` classes; a user's own dataclass is flattened field by field here)."""
    import dataclasses

    from torch.utils._pytree import SUPPORTED_NODES

    return dataclasses.is_dataclass(obj) and not isinstance(obj, type) and type(obj) not in SUPPORTED_NODES


#: parameters of a ``torch.distributions`` class given one way out of several: the first present is used
_EXCLUSIVE_PARAMS = (("logits", "probs"), ("scale_tril", "covariance_matrix", "precision_matrix"))


#: distributions built from other distributions: constructor argument -> the attribute that holds it
_WRAPPERS = {"Independent": {"base_distribution": "base_dist", "reinterpreted_batch_ndims": "reinterpreted_batch_ndims"},
             "MixtureSameFamily": {"mixture_distribution": "_mixture_distribution",
                                   "component_distribution": "_component_distribution"}}


def _distribution_params(d: torch.distributions.Distribution) -> list[str] | None:
    """The constructor arguments that rebuild distribution ``d`` (its ``arg_constraints`` set on the
    instance, one of each exclusive group; a wrapper's inner distributions, :data:`_WRAPPERS`), or
    ``None`` when they do not."""
    wrapped = _WRAPPERS.get(type(d).__name__)
    if wrapped is not None:
        return list(wrapped) if all(hasattr(d, a) for a in wrapped.values()) else None
    given = [k for k in getattr(d, "arg_constraints", {}) if k in vars(d)]
    for group in _EXCLUSIVE_PARAMS:
        present = [k for k in group if k in given]
        given = [k for k in given if k not in group or k == (present[0] if present else None)]
    return given or None


def _is_leaf_node(obj: Any) -> bool:
    return _is_plain_dataclass(obj) or (isinstance(obj, torch.distributions.Distribution)
                                       and _distribution_params(obj) is not None)


def _flatten(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """Leaves of a pytree (dataclasses included, and ``torch.distributions`` objects by their parameters:
    a model that returns ``Normal(mu, sigma)``) and the function that rebuilds it from new leaves."""
    import dataclasses

    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves, spec = tree_flatten(tree, is_leaf=_is_leaf_node)
    out: list[Any] = []
    parts: list[tuple[int, Callable[[list[Any]], Any]]] = []
    for leaf in leaves:
        if _is_plain_dataclass(leaf):
            names = [f.name for f in dataclasses.fields(leaf) if f.init]
            sub, rebuild_sub = _flatten(tuple(getattr(leaf, k) for k in names))

            def rebuild_dc(ls: list[Any], leaf: Any = leaf, names: list[str] = names,
                           rebuild_sub: Callable = rebuild_sub) -> Any:
                return dataclasses.replace(leaf, **dict(zip(names, rebuild_sub(ls))))

            parts.append((len(sub), rebuild_dc))
            out += sub
        elif isinstance(leaf, torch.distributions.Distribution) and _distribution_params(leaf) is not None:
            names = _distribution_params(leaf)
            attrs = _WRAPPERS.get(type(leaf).__name__, {})
            sub, rebuild_sub = _flatten(tuple(getattr(leaf, attrs.get(k, k)) for k in names))  # inner ones too

            def rebuild_dist(ls: list[Any], cls: type = type(leaf), names: list[str] = names,
                             rebuild_sub: Callable = rebuild_sub) -> Any:
                return cls(**dict(zip(names, rebuild_sub(ls))), validate_args=False)

            parts.append((len(sub), rebuild_dist))
            out += sub
        else:
            parts.append((1, lambda ls: ls[0]))
            out.append(leaf)

    def rebuild(ls: list[Any]) -> Any:
        vals, i = [], 0
        for count, r in parts:
            vals.append(r(list(ls[i:i + count])))
            i += count
        return tree_unflatten(vals, spec)

    return out, rebuild


def _vmap_leading(fn: Callable[..., Tensor], sizes: list[int], *trees: Any) -> Tensor:
    """``fn`` applied to every index of the leading dims ``sizes`` of pytrees ``trees``, by
    nested ``vmap``: a tensor leaf is mapped when its leading dim equals the size of the level,
    anything else (scalars, caches, None) is passed through unmapped."""
    if not sizes:
        return fn(*trees)
    n, rest = sizes[0], sizes[1:]
    flat: list[list[Any]] = []
    rebuilds = []
    for tree in trees:
        leaves, rebuild = _flatten(tree)
        flat.append(leaves)
        rebuilds.append(rebuild)
    counts = [len(lv) for lv in flat]
    leaves = [leaf for lv in flat for leaf in lv]
    in_dims = tuple(0 if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == n else None for v in leaves)

    def inner(*ls: Any) -> Tensor:
        out, i = [], 0
        for rebuild, c in zip(rebuilds, counts):
            out.append(rebuild(list(ls[i:i + c])))
            i += c
        return _vmap_leading(fn, rest, *out)

    with vmapped_block():
        return torch.vmap(inner, in_dims=in_dims)(*leaves)


# ----------------------------------------------------------------------------
# language models
# ----------------------------------------------------------------------------
def _logits(output: Any) -> Tensor:
    """The logits of a model output: a tensor, ``output.logits`` (Hugging Face ``ModelOutput``),
    ``output["logits"]``, or the first tensor of a tuple with at least 2 dims."""
    if isinstance(output, Tensor):
        return output
    lg = getattr(output, "logits", None)
    if isinstance(lg, Tensor):
        return lg
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        for o in output:
            if isinstance(o, Tensor) and o.ndim >= 2:
                return o
    raise TypeError(
        f"causal_lm: cannot find logits in a model output of type {type(output).__name__}: expected a "
        "tensor (..., T, vocab), an object with .logits, a mapping with 'logits' or a tuple starting with them"
    )


#: Token ids in the target mapping, in order of preference (HF ``labels``, HF inputs, TransformerLens inputs).
CAUSAL_LM_TOKEN_KEYS = ("labels", "input_ids", "input", "tokens")


def _tokens_and_mask(target: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(target, Tensor):
        return target, None
    if isinstance(target, Mapping):
        for key in CAUSAL_LM_TOKEN_KEYS:
            ids = target.get(key)
            if isinstance(ids, Tensor):
                return ids, target.get("attention_mask")
        raise KeyError(f"causal_lm: the batch has none of the token keys {CAUSAL_LM_TOKEN_KEYS}; "
                       f"keys: {list(target)}")
    raise TypeError(f"causal_lm: the target must be token ids (a tensor) or a mapping with 'input_ids', "
                    f"got {type(target).__name__}")


def _valid_next_tokens(ids: Tensor, mask: Tensor | None) -> Tensor:
    """``(..., T-1)`` whether position ``t`` (predicting token ``t + 1``) counts in :func:`causal_lm`."""
    valid = ids[..., 1:] != -100  # Hugging Face's ignore index in labels
    if mask is not None:
        m = mask.bool()
        valid = valid & m[..., 1:] & m[..., :-1]
    return valid


def causal_lm_empty_rows(target: Any) -> int:
    """How many sequences of ``target`` (the batch :func:`causal_lm` reads) have no valid next-token position
    (all padding, all ``-100``, or one token): each counts as a sample (in n, and nβ) and adds 0 to the loss."""
    ids, mask = _tokens_and_mask(target)
    if ids.ndim < 2:
        return 0
    return int((~_valid_next_tokens(ids, mask).reshape(ids.shape[0], -1).any(1)).sum())


def _causal_lm_per_sample(output: Any, target: Any) -> Tensor:
    logits = _logits(output)
    ids, mask = _tokens_and_mask(target)
    if ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"causal_lm: token ids must be integers, got dtype {ids.dtype}")
    if tuple(logits.shape[:-1]) != tuple(ids.shape):
        raise ValueError(
            f"causal_lm: logits of shape {tuple(logits.shape)} do not match token ids of shape "
            f"{tuple(ids.shape)} (expected logits (..., T, vocab) for ids (..., T))"
        )
    nxt = ids[..., 1:]
    valid = _valid_next_tokens(ids, mask)
    logp = torch.log_softmax(logits[..., :-1, :], dim=-1)
    nll = -logp.gather(-1, nxt.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    tok = valid.to(nll.dtype)
    return (nll * tok).sum(-1) / tok.sum(-1).clamp_min(1.0)


def causal_lm(output: Any, target: Any) -> Tensor:
    r"""Next-token cross-entropy of a causal language model, averaged per sequence then over sequences.

    A *sample* is one sequence.  Its loss is the mean, over its valid positions ``t``, of
    :math:`-\log p(x_{t+1} \mid x_{\le t})`; the batch loss is the mean of the per-sequence
    losses (each sequence weighs the same, whatever its length; Hugging Face's own
    ``model(..., labels=...).loss`` instead averages over all tokens of the batch).

    Parameters
    ----------
    output
        Logits ``(..., T, vocab)``, or a model output holding them (``output.logits``,
        ``output["logits"]``, or the first tensor of a tuple): a Hugging Face ``ModelOutput``,
        a TransformerLens model's logits.
    target
        The batch: a mapping with token ids under ``"labels"`` (Hugging Face's convention:
        unshifted, ``-100`` = ignore), else ``"input_ids"`` (or ``"input"`` / ``"tokens"``), and
        optionally ``"attention_mask"``; or a tensor of token ids ``(..., T)`` (``-100`` = ignore).

    Position ``t`` (predicting token ``t + 1``) is valid when token ``t + 1`` is not ``-100`` and,
    with an attention mask, both tokens ``t`` and ``t + 1`` are real (mask 1): right and left
    padding are both excluded.  A sequence with no valid position contributes 0.

    ``causal_lm.per_sample(output, target)`` returns the per-sequence losses ``(...)``, so the
    LLC engine's control variate at w* is a gather and weighted data work.
    """
    return _causal_lm_per_sample(output, target).mean()


causal_lm.per_sample = _causal_lm_per_sample  # type: ignore[attr-defined]


def _own_labels(output: Any, target: Any) -> tuple[Tensor, Tensor]:
    """The logits of a model's output and the ``"labels"`` of a mapping batch (what a Hugging Face
    model computes its own loss from; ``"targets"`` in nanoGPT's ``forward(idx, targets)``)."""
    labels = next((target[k] for k in ("labels", "targets") if isinstance(target.get(k), Tensor)), None) \
        if isinstance(target, Mapping) else None
    if labels is None:
        raise ValueError("the batch has no 'labels' (nor nanoGPT's 'targets')")
    return _logits(output), labels


def _token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample mean cross-entropy over the entries whose label is not -100 (0 where none is)."""
    if labels.is_floating_point() or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError("logits and labels do not pair up as (..., classes) and (...) integer labels")
    valid = labels != -100
    nll = -torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    tok = valid.to(nll.dtype).reshape(labels.shape[0], -1)
    return (nll.reshape(labels.shape[0], -1) * tok).sum(1) / tok.sum(1).clamp_min(1.0)


def _own_shifted_ce(output: Any, target: Any) -> Tensor:
    """A causal LM's own loss per sequence: next-token cross-entropy over labels[:, 1:] != -100."""
    logits, labels = _own_labels(output, target)
    return _token_nll(logits[:, :-1], labels[:, 1:])


def _own_token_ce(output: Any, target: Any) -> Tensor:
    """A masked-LM / token-classification model's own loss per sample (or a nanoGPT-style model's, whose
    ``targets`` are already shifted): cross-entropy at every labelled entry."""
    return _token_nll(*_own_labels(output, target))


def _own_squared_error(output: Any, target: Any) -> Tensor:
    """A regression head's own loss per sample (``num_labels=1``): squared error."""
    logits, labels = _own_labels(output, target)
    if not labels.is_floating_point():
        raise ValueError("regression labels are floating point")
    return (logits.reshape(labels.shape[0], -1) - labels.reshape(labels.shape[0], -1)).pow(2).mean(1)


def _own_multilabel_bce(output: Any, target: Any) -> Tensor:
    """A multi-label classifier's own loss per sample (``problem_type="multi_label_classification"``):
    binary cross-entropy with logits, averaged over the labels."""
    logits, labels = _own_labels(output, target)
    if not labels.is_floating_point() or tuple(logits.shape) != tuple(labels.shape):
        raise ValueError("multi-label targets are floating point and shaped like the logits")
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return bce.reshape(labels.shape[0], -1).mean(1)


def model_loss(output: Any, target: Any) -> Tensor:
    r"""The loss the model computed itself: ``output.loss`` or ``output["loss"]``, or the output itself
    when the model returns its loss (a 0-dim tensor, alone or as the one such element of a tuple:
    nanoGPT's ``(logits, loss)``).

    The default ``loss_fn`` of :func:`slt.estimate_llc` for a model that defines no ``default_loss``:
    a Hugging Face model called with ``labels`` in the batch returns its own loss (for a causal
    language model, the mean next-token cross-entropy over the batch's tokens whose label is not
    ``-100``; ``model(**batch).loss`` in devinterp's examples).  That is a mean over tokens, not over
    sequences, and one number per batch.  The chains follow it as it is; for the control variate
    (its value at w* on each minibatch), the forms of ``model_loss.per_sample_forms`` are tried at
    set-up — cross-entropy of the output's logits against the batch's ``labels`` shifted by one
    (causal LM) or not (masked LM, token and sequence classification), squared error (regression),
    binary cross-entropy averaged over the labels (multi-label classification) — and the first whose
    per-sample values, weighted by each sample's labelled entries, give the model's own loss on 64
    rows and on 64 rows spread over the data is looked up on every minibatch like any per-sample loss.
    When none fits, the control variate is a forward pass at w* per minibatch (a note says so).
    Per-sample methods (:func:`slt.bif`) need a per-sample loss such as :func:`causal_lm`.
    """
    loss = _own_loss(output)
    if loss is None:
        from .evaluator import describe

        raise ValueError(
            f"loss_fn is required: the model defines no default_loss and its output ({describe(output)}) "
            "carries no loss (a Hugging Face model returns .loss when the batch has 'labels'; a model that "
            "returns its loss itself returns a 0-dim tensor, alone or in a tuple such as nanoGPT's (logits, "
            "loss)); pass loss_fn, e.g. slt.losses.causal_lm for a causal language model or F.cross_entropy "
            "for a classifier; a forward that computes its loss when given the targets (forward(x, y=None)) gets "
            "them by keyword from a mapping: data = {'x': X, 'y': Y}")
    return loss


def _own_loss(output: Any) -> Tensor | None:
    """The loss a model returned: ``output.loss``, ``output["loss"]``, the output itself when it is a
    0-dim floating tensor (``forward(x, y) -> loss``), or the one 0-dim floating tensor of a tuple
    (nanoGPT's ``(logits, loss)``, a Hugging Face model's ``(loss, logits, ...)`` with
    ``return_dict=False``); ``None`` when there is none (or, in a tuple, several)."""
    def scalar(t: Any) -> bool:
        return isinstance(t, Tensor) and t.ndim == 0 and t.is_floating_point()

    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if isinstance(loss, Tensor):
        return loss
    if scalar(output):
        return output
    if isinstance(output, (tuple, list)):
        found = [o for o in output if scalar(o)]
        if len(found) == 1:
            return found[0]
    return None


#: per-sample forms of a Hugging Face model's own loss tried for :func:`model_loss`'s control variate
model_loss.per_sample_forms = (_own_shifted_ce, _own_token_ce, _own_squared_error,  # type: ignore[attr-defined]
                               _own_multilabel_bce)
