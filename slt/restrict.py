r"""Weight restrictions: which sampled parameters move in a weight-refined LLC.

The weight-refined LLC of a component :math:`V` (Wang, Farrugia-Roberts, Hoogland, Carroll, Wei &
Murfet 2024, "Differentiation and specialization of attention heads via the refined local learning
coefficient", arXiv 2410.02984) samples only :math:`V`'s weights; every other weight stays at
:math:`w^*`.  :func:`resolve_restrictions` turns a user's ``restrict_to`` into ``(M, d)`` boolean
masks over the flat sampled parameters (the layout of :class:`slt.params.ParamSpec`:
``torch.cat([p.reshape(-1) for p in sampled params])`` in ``spec.names`` order); the engine applies
row ``m`` of the masks to the update of the chains of restriction ``m``.

Forms of ``restrict_to``
------------------------
* **a glob** over parameter names (:func:`fnmatch.fnmatchcase`; ``*`` also matches dots), e.g.
  ``"blocks.0.attn.*"`` or ``"transformer.h.0.attn.*"``: the whole of every matching parameter.
  A name matches if any of its names does (a tied or twice-registered parameter has several;
  it is sampled once, under its first name);
* **a list or tuple of globs**: their union;
* **an** ``nn.Module`` (a submodule of the model): all its sampled parameters; **an**
  ``nn.Parameter`` of the model: all of it; a list or tuple of globs, modules, parameters, callables and
  per-parameter mappings: their union, e.g. ``[heads(m)["l0h0"], heads(m)["l0h1"]]`` for two heads (merging
  the helpers' mappings with ``{**a, **b}`` would keep only ``b``'s mask of a fused weight both use; the
  model passed is matched by identity, also when the run works on a copy of it);
* **a callable** ``f(name, param)`` called once per sampled parameter, returning ``True`` (the
  whole parameter), ``False`` or ``None`` (none of it), a bool tensor shaped like the parameter
  (those entries), or an *index*: anything valid as ``param[index]`` — an int, a slice, a tuple
  of slices/ints, an integer tensor or list — selecting the entries ``param[index]``.  Note that
  an int is an index (``1`` is row 1), not a truth value;
* **a per-parameter mapping** ``{name or glob: mask}`` whose values are all masks (``True``,
  ``False``, ``None``, a bool tensor like the parameter or an index, as above): explicit entries,
  e.g. the rows of one head in a fused ``qkv`` weight.  Every key must match a sampled parameter;
* **a labelled mapping** ``{label: restriction}`` whose values are all restrictions (a glob, a
  module, a parameter, a list of those, a callable or a per-parameter mapping): ``M`` restrictions, one row
  each, in the mapping's order.  This is what :func:`heads`, :func:`layers`,
  :func:`attention_and_mlp` and :func:`embeddings` return.

The rule telling the two mappings apart looks at the **values**: all masks (``True``/``False``/
``None``, tensors, ints, slices, tuples or lists of index parts) make a per-parameter mapping; all
restrictions (strings, modules, parameters, lists of these, callables, mappings) make a labelled one; a
mixture is an error.  (A string value is never an index, so ``{"attn": "blocks.0.attn.*"}`` is a
label; ``{"blocks.0.attn.W_Q": 0}`` is a per-parameter mapping, and its keys must then be
parameter names.)  Labels must be strings.

Every problem raises :class:`ValueError` before sampling, naming it: a glob or name matching no
sampled parameter (with similar names, and whether it matched only frozen parameters), a bool mask
of the wrong shape, an index that fails on its parameter, a restriction that selects nothing, a
non-string label, a value of an unknown kind.

Architecture helpers
--------------------
:func:`heads`, :func:`layers`, :func:`attention_and_mlp` and :func:`embeddings` read the module tree
and return ``{label: {param_name: index or True}}``, usable directly as ``restrict_to``, with
devinterp's labels (``"l0h1"`` = layer 0 head 1, ``"l0"``, ``"l0 attn"``, ``"l0 mlp"``,
``"embed"``, ``"unembed"``).  Only sampled (``requires_grad``) parameters appear, tied ones once
under their first name (as in :class:`~slt.params.ParamSpec`).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .params import ParamSpec, unwrap

__all__ = ["Restrictions", "resolve_restrictions", "heads", "layers", "modules", "attention_and_mlp", "embeddings"]


class Restrictions(NamedTuple):
    """The resolved ``restrict_to``.

    Attributes
    ----------
    labels
        The labels, in order, when ``restrict_to`` was a labelled mapping; ``None`` otherwise
        (then ``M == 1``).
    masks
        ``(M, d)`` bool on the CPU: ``masks[m, i]`` is True when flat sampled parameter ``i``
        (``spec`` order) moves under restriction ``m``.
    """

    labels: list[str] | None
    masks: Tensor


# ----------------------------------------------------------------------------
# resolving restrict_to
# ----------------------------------------------------------------------------
class _Params:
    """The sampled parameters of a model, their names (aliases included) and flat offsets."""

    def __init__(self, model: nn.Module, spec: ParamSpec):
        self.spec = spec
        self.index = {n: i for i, n in enumerate(spec.names)}
        self.offsets = [0]
        for n in spec.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.tensors: list[Tensor | None] = [None] * len(spec.names)
        self.aliases: list[list[str]] = [[n] for n in spec.names]
        self.by_id: dict[int, int] = {}
        self.frozen_ids: set[int] = set()
        self.buffer_names: list[str] = [n for n, _ in model.named_buffers()]
        self.frozen_names: list[str] = list(spec.frozen)
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            canon = first.setdefault(id(p), name)
            i = self.index.get(canon)
            if i is None:
                self.frozen_ids.add(id(p))
                if canon != name and canon in spec.frozen and name not in self.frozen_names:
                    self.frozen_names.append(name)
                continue
            self.by_id[id(p)] = i
            self.tensors[i] = p
            if name != canon:
                self.aliases[i].append(name)
        missing = [n for n, t in zip(spec.names, self.tensors) if t is None]
        if missing:
            raise ValueError(f"the model has no parameters {missing[:5]} of its ParamSpec: spec and model differ")

    def match(self, glob: str, where: str) -> list[int]:
        hits = [i for i, names in enumerate(self.aliases) if any(fnmatch.fnmatchcase(n, glob) for n in names)]
        if hits:
            return hits
        frozen = [n for n in self.frozen_names if fnmatch.fnmatchcase(n, glob)]
        msg = f"{where}: {glob!r} matches no sampled parameter"
        if frozen:
            msg += (f"; it matches only frozen parameters ({', '.join(frozen[:5])}"
                    f"{', ...' if len(frozen) > 5 else ''}), which have requires_grad=False and stay at w*")
        buffers = [n for n in self.buffer_names if fnmatch.fnmatchcase(n, glob)]
        if buffers:
            msg += (f"; it matches buffers ({', '.join(buffers[:5])}{', ...' if len(buffers) > 5 else ''}), "
                    "which are not parameters and are not sampled")
        every = [n for a in self.aliases for n in a]
        for prefix in ("_orig_mod.", "module."):  # the user's wrapper shows its names with the prefix
            rest = glob[len(prefix):]
            if glob.startswith(prefix) and any(fnmatch.fnmatchcase(n, rest) for n in every):
                msg += (f"; the run uses the model inside its torch.compile / DataParallel wrapper, whose names have no "
                        f"{prefix!r} prefix: write {rest!r}")
        # a parametrized tensor (weight_norm, spectral_norm, register_parametrization) is computed from
        # parameters named "<module>.parametrizations.<tensor>.original…"
        stem = glob.rsplit(".", 1)
        owner, leaf = (stem[0] + ".", stem[1]) if len(stem) == 2 else ("", stem[0])
        param = [n for n in every if fnmatch.fnmatchcase(n, f"{owner}parametrizations.{leaf}.original*")]
        if param:
            msg += (f"; {glob!r} is parametrized (torch.nn.utils.parametrize): it is computed from "
                    f"{', '.join(param[:4])}{', ...' if len(param) > 4 else ''}, which are sampled: restrict to "
                    f"those ({owner}parametrizations.{leaf}.*) or to the module")
        close = difflib.get_close_matches(glob, every, n=3, cutoff=0.5)
        if close:
            msg += f"; similar names: {', '.join(close)}"
        names = self.spec.names
        msg += (f"; sampled parameters ({len(names)}): {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
                " (a glob uses fnmatch: '*' matches any characters, dots included)")
        raise ValueError(msg)


_INDEX_ERRORS = (IndexError, TypeError, ValueError, RuntimeError)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_"  # numpy.bool_ without importing numpy


def _is_mask_value(v: Any) -> bool:
    """A per-parameter value: True/False/None, a tensor or array, or an index."""
    if v is None or _is_bool(v) or isinstance(v, (Tensor, int, slice)) or v is Ellipsis:
        return True
    if isinstance(v, (tuple, list)):
        return not any(_is_part(x) for x in v)
    return hasattr(v, "__array__")


def _is_part(x: Any) -> bool:
    """An item a list of restrictions unites: a glob, a module, a parameter, a callable or a per-parameter
    mapping (never an index part: ints, slices, tensors, lists and Ellipsis are not callable)."""
    return isinstance(x, (str, Mapping, nn.Module, nn.Parameter)) or (callable(x) and not isinstance(x, Tensor))


def _is_restriction_value(v: Any) -> bool:
    """A whole restriction: a glob, a module, a parameter, a callable, a mapping or a list of those (a union)."""
    if isinstance(v, (str, Mapping, nn.Module, nn.Parameter)):
        return True
    if isinstance(v, (tuple, list)):
        return bool(v) and all(map(_is_part, v))
    return callable(v) and not isinstance(v, Tensor)


def _describe(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"tensor {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _param_mask(value: Any, name: str, shape: torch.Size, where: str) -> Tensor:
    """``value`` (True/False/None, bool tensor like the parameter, or an index) -> bool mask ``shape``."""
    if value is None or _is_bool(value):
        return torch.full(shape, bool(value), dtype=torch.bool)
    if hasattr(value, "__array__") and not isinstance(value, Tensor):
        value = torch.as_tensor(value)
    if isinstance(value, Tensor) and value.dtype == torch.bool:
        if value.dim() == 0:
            return torch.full(shape, bool(value), dtype=torch.bool)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{where}: the bool mask for parameter {name!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(shape)} (the parameter's shape)")
        return value.detach().cpu()
    if (isinstance(value, Tensor) and not value.is_floating_point() and not value.is_complex() and value.dim() >= 1
            and tuple(value.shape) == tuple(shape) and bool(((value == 0) | (value == 1)).all())):
        # an integer 0/1 tensor shaped like the parameter reads as a mask, yet an integer tensor is an index
        # (rows 0 and 1): (p.abs() > t).long() selected the first two rows whole
        raise ValueError(f"{where}: the integer tensor for parameter {name!r} has the parameter's shape "
                         f"{tuple(shape)} and only 0s and 1s: an integer tensor is an index (it would select rows 0 "
                         "and 1), so pass a mask as bool (mask.bool()), or an index as a list or "
                         "mask.nonzero(as_tuple=True)")
    index = value
    if isinstance(index, Tensor):
        index = index.detach().cpu()
    elif isinstance(index, tuple):
        index = tuple(x.detach().cpu() if isinstance(x, Tensor) else x for x in index)
    m = torch.zeros(shape, dtype=torch.bool)
    try:
        m[index] = True
    except _INDEX_ERRORS as e:
        raise ValueError(f"{where}: index {_describe(value)} fails on parameter {name!r} of shape "
                         f"{tuple(shape)}: {e}") from None
    return m


def _fill(row: Tensor, P: _Params, i: int, value: Any, where: str) -> None:
    """OR parameter ``i``'s mask for ``value`` into the flat ``row`` ``(d,)``."""
    lo, hi = P.offsets[i], P.offsets[i + 1]
    if value is True:
        row[lo:hi] = True
        return
    m = _param_mask(value, P.spec.names[i], P.spec.shapes[i], where)
    row[lo:hi] |= m.reshape(-1)


def _resolve_into(row: Tensor, r: Any, P: _Params, where: str) -> None:
    """Resolve one (unlabelled) restriction ``r`` into the flat bool ``row`` ``(d,)``."""
    if isinstance(r, str):
        r = [r]
    if isinstance(r, (list, tuple)) and not r:
        raise ValueError(f"{where} is an empty {type(r).__name__}: nothing to restrict to (a list of globs, modules "
                         "or parameters restricts to their union)")
    if isinstance(r, (list, tuple)) and r and all(isinstance(g, str) for g in r):
        for glob in r:
            for i in P.match(glob, where):
                row[P.offsets[i]:P.offsets[i + 1]] = True
        return
    if isinstance(r, (list, tuple)) and r and all(map(_is_part, r)):
        for part in r:  # the union of globs, modules, parameters, callables and per-parameter mappings
            _resolve_into(row, part, P, where)
        return
    if isinstance(r, nn.Parameter):
        i = P.by_id.get(id(r))
        if i is None:
            raise ValueError(
                f"{where}: the parameter {_describe(r)} is not a sampled parameter of the model: "
                + ("it is frozen (requires_grad=False) and stays at w*" if id(r) in P.frozen_ids
                   else "it is not the model's (or its first checkpoint's): pass the model's own parameter, or its name"))
        row[P.offsets[i]:P.offsets[i + 1]] = True
        return
    if isinstance(r, nn.Module):
        hits = {P.by_id[id(p)] for p in r.parameters() if id(p) in P.by_id}
        if not hits:
            own = any(True for _ in r.parameters())
            raise ValueError(
                f"{where}: the module {type(r).__name__} has no sampled parameter of the model: "
                + ("its parameters are all frozen (requires_grad=False) and stay at w*" if own
                   and all(id(p) in P.frozen_ids for p in r.parameters())
                   else "it is not a submodule of the model passed (or of its first checkpoint): pass the model's own "
                        "module, or a glob over parameter names" if own else "it has no parameters"))
        for i in hits:
            row[P.offsets[i]:P.offsets[i + 1]] = True
        return
    if isinstance(r, Mapping):
        bad = [k for k, v in r.items() if not _is_mask_value(v)]
        if bad:
            k = bad[0]
            raise ValueError(
                f"{where}: a per-parameter mapping {{name or glob: mask}} needs masks as values (True, False, "
                f"None, a bool tensor like the parameter or an index), but {k!r} maps to {_describe(r[k])}; "
                "labelled mappings {label: restriction} cannot be nested")
        for k, v in r.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: per-parameter mapping keys must be parameter names or globs "
                                 f"(strings), got {k!r} ({type(k).__name__})")
            hint = f"{where} (a mapping whose values are masks: its keys are parameter names or globs)"
            if isinstance(v, (list, tuple)) and not v and not any(
                    fnmatch.fnmatchcase(n, k) for names in P.aliases for n in names):
                raise ValueError(f"{where}[{k!r}] is an empty {type(v).__name__}: nothing to restrict to (read as a "
                                 f"mask mapping {{parameter name or glob: mask}}, {k!r} names no parameter; as a "
                                 "labelled mapping {label: restriction}, its restriction selects nothing)")
            for i in P.match(k, hint):
                _fill(row, P, i, v, f"{where}[{k!r}]")
        return
    if callable(r) and not isinstance(r, Tensor):
        for i, name in enumerate(P.spec.names):
            try:
                v = r(name, P.tensors[i])
            except Exception as e:  # noqa: BLE001 - re-raised with the parameter it failed on
                raise ValueError(f"{where}: the callable failed on parameter {name!r}: "
                                 f"{type(e).__name__}: {e}") from e
            if v is False or v is None:
                continue
            if isinstance(v, (str, Mapping)) or callable(v) and not isinstance(v, Tensor):
                raise ValueError(f"{where}: the callable returned {_describe(v)} for {name!r}; expected "
                                 "True, False, None, a bool tensor like the parameter or an index")
            _fill(row, P, i, v, f"{where} (callable, parameter {name!r})")
        return
    raise ValueError(
        f"{where}: cannot use {_describe(r)} ({type(r).__name__}) as a restriction; expected a glob over "
        "parameter names, a module or a parameter of the model, a list of those, a callable (name, param) -> mask, "
        "a mapping {name or glob: mask} or a mapping {label: restriction}")


def _is_labelled(mapping: Mapping, where: str) -> bool:
    """Which kind of mapping ``restrict_to`` is (see the module docstring)."""
    if not mapping:
        raise ValueError(f"{where} is an empty mapping: nothing to restrict to")
    kinds = []
    for k, v in mapping.items():
        if _is_restriction_value(v):
            kinds.append(True)
        elif _is_mask_value(v):
            kinds.append(False)
        else:
            raise ValueError(
                f"{where}[{k!r}] is {_describe(v)} ({type(v).__name__}): a value must be a restriction "
                "(glob, list of globs, module, callable, mapping) or a mask (True, False, None, a bool tensor "
                "like the parameter or an index)")
    if all(kinds):
        return True
    if not any(kinds):
        return False
    labels = [k for k, kd in zip(mapping, kinds) if kd]
    masks = [k for k, kd in zip(mapping, kinds) if not kd]
    raise ValueError(
        f"{where} mixes restrictions (values of {labels[:3]}) and masks (values of {masks[:3]}): a mapping is "
        "either {label: restriction} (values are globs, lists of globs, modules, callables or mappings) or "
        "{parameter name or glob: mask} (values are True, False, None, bool tensors or indices)")


def resolve_restrictions(restrict_to: Any, model: nn.Module, spec: ParamSpec) -> Restrictions:
    """Resolve ``restrict_to`` into boolean masks over the flat sampled parameters.

    Parameters
    ----------
    restrict_to
        A glob, a module or parameter of the model, a list of those, a callable ``(name, param) -> mask``, a per-parameter
        mapping ``{name or glob: mask}``, or a labelled mapping ``{label: any of these}`` (see the
        module docstring for the forms and the rule that tells the mappings apart).
    model
        The model whose parameters ``spec`` describes.
    spec
        Its :class:`~slt.params.ParamSpec` (names, shapes, numels; the flat layout).

    Returns
    -------
    Restrictions
        ``labels`` (the mapping's keys in order, or ``None`` when ``restrict_to`` is not a labelled
        mapping, then ``M == 1``) and ``masks`` ``(M, d)`` bool on the CPU over the flat sampled
        parameters in ``spec`` order.

    Raises
    ------
    ValueError
        Naming the problem: a glob or name matching no sampled parameter (similar and frozen names
        shown), a bool mask of the wrong shape, an index that fails on its parameter, a restriction
        that selects nothing, a non-string label, a value of an unknown kind.
    """
    P = _Params(model, spec)
    if isinstance(restrict_to, Mapping) and _is_labelled(restrict_to, "restrict_to"):
        labels = list(restrict_to)
        for k in labels:
            if not isinstance(k, str):
                raise ValueError(f"restriction labels must be strings, got {k!r} ({type(k).__name__})")
        masks = torch.zeros(len(labels), spec.d, dtype=torch.bool)
        for m, (k, r) in enumerate(restrict_to.items()):
            where = f"restrict_to[{k!r}]"
            _resolve_into(masks[m], r, P, where)
            if not masks[m].any():
                why = (" (a helper of slt.restrict gives an empty one for a component whose parameters are all "
                       "frozen: leave that label out)" if isinstance(r, Mapping) and not r else "")
                raise ValueError(f"{where} selects no parameter entries: an empty restriction has nothing to "
                                 f"sample{why}")
        return Restrictions(labels, masks)
    masks = torch.zeros(1, spec.d, dtype=torch.bool)
    _resolve_into(masks[0], restrict_to, P, "restrict_to")
    if not masks[0].any():
        raise ValueError("restrict_to selects no parameter entries: an empty restriction has nothing to sample")
    return Restrictions(None, masks)


# ----------------------------------------------------------------------------
# attention layouts
# ----------------------------------------------------------------------------
HeadSlices = list[dict[int, tuple[Tensor, Any]]]  # per head: {id(param): (param, index)}


def _mro_names(m: nn.Module) -> set[str]:
    return {c.__name__ for c in type(m).__mro__}


def _span(h: int, hd: int) -> slice:
    return slice(h * hd, (h + 1) * hd)


def _blocks(h: int, hd: int, offsets: list[int]) -> Tensor:
    """Indices of head ``h`` in each of the fused blocks starting at ``offsets``: ``(len(offsets) * hd,)``."""
    return torch.cat([torch.arange(o + h * hd, o + (h + 1) * hd) for o in offsets])


def _add(head: dict, p: Any, index: Any) -> None:
    if isinstance(p, Tensor):
        head[id(p)] = (p, index)


def _mha_heads(m: nn.MultiheadAttention) -> HeadSlices:
    E, H = m.embed_dim, m.num_heads
    hd = E // H
    out = []
    for h in range(H):
        head: dict = {}
        if m._qkv_same_embed_dim:
            _add(head, m.in_proj_weight, _blocks(h, hd, [0, E, 2 * E]))
        else:
            for p in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight):
                _add(head, p, _span(h, hd))
        _add(head, m.in_proj_bias, _blocks(h, hd, [0, E, 2 * E]))
        _add(head, m.bias_k, (..., _span(h, hd)))
        _add(head, m.bias_v, (..., _span(h, hd)))
        _add(head, m.out_proj.weight, (slice(None), _span(h, hd)))
        out.append(head)
    return out


def _gpt2_heads(m: nn.Module) -> HeadSlices | None:
    H, hd = int(m.num_heads), int(m.head_dim)
    E = H * hd
    cross = bool(getattr(m, "is_cross_attention", False))
    nblocks = 2 if cross else 3
    W = m.c_attn.weight  # Conv1D: y = x @ W + b, W (E, nblocks E)
    if tuple(W.shape) != (E, nblocks * E) or tuple(m.c_proj.weight.shape) != (E, E):
        return None
    offsets = [i * E for i in range(nblocks)]
    out = []
    for h in range(H):
        head: dict = {}
        if cross:
            _add(head, m.q_attn.weight, (slice(None), _span(h, hd)))
            _add(head, getattr(m.q_attn, "bias", None), _span(h, hd))
        _add(head, W, (slice(None), _blocks(h, hd, offsets)))
        _add(head, getattr(m.c_attn, "bias", None), _blocks(h, hd, offsets))
        _add(head, m.c_proj.weight, _span(h, hd))  # rows: the input of c_proj is the heads side by side
        out.append(head)
    return out


def _tl_heads(m: nn.Module) -> HeadSlices | None:
    P = dict(m.named_parameters(recurse=False))
    WQ, WO = P["W_Q"], P["W_O"]
    # TransformerLens' layout: W_Q (H, d_model, d_head) and W_O (H, d_head, d_model); an einsum layout such as
    # (d_model, H, d_head) for both has other dimensions and is not read as one head per row of dimension 0
    if (WQ.dim() != 3 or WO.dim() != 3 or WO.shape[0] != WQ.shape[0] or WO.shape[1] != WQ.shape[2]
            or WO.shape[2] != WQ.shape[1]):
        return None
    H = WQ.shape[0]
    kv = [P.get(n) for n in ("W_K", "W_V", "_W_K", "_W_V", "b_K", "b_V", "_b_K", "_b_V")]
    n_kv = next((t.shape[0] for t in kv if t is not None), H)
    if n_kv == 0 or H % n_kv:
        return None
    out = []
    for h in range(H):
        g = h // (H // n_kv)  # grouped-query: K/V heads are repeat_interleave'd
        head: dict = {}
        for n in ("W_Q", "b_Q", "W_O"):
            _add(head, P.get(n), h)
        for n in ("W_K", "W_V", "b_K", "b_V", "_W_K", "_W_V", "_b_K", "_b_V"):
            _add(head, P.get(n), g)
        out.append(head)
    return out


_Q, _K, _V = (("q_proj", "q", "query", "W_q", "q_lin", "query_proj", "to_q", "wq"),
              ("k_proj", "k", "key", "W_k", "k_lin", "key_proj", "to_k", "wk"),
              ("v_proj", "v", "value", "W_v", "v_lin", "value_proj", "to_v", "wv"))
_O = ("o_proj", "o", "out_proj", "dense", "c_proj", "W_o", "out_lin", "to_out", "wo")
#: names of an output projection kept in a sibling module of the q/k/v projections (BERT's ``output.dense``)
_SIBLING_O = ("dense", "out_proj", "o_proj")


def _wb(m: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """Weight and bias of a Linear-like module (possibly a wrapper around one)."""
    ps = list(m.named_parameters())
    w = [p for n, p in ps if n.split(".")[-1] == "weight"]
    b = [p for n, p in ps if n.split(".")[-1] == "bias"]
    if len(w) != 1 or len(b) > 1 or w[0].dim() != 2:
        return None, None
    return w[0], (b[0] if b else None)


def _int_attr(m: nn.Module, names: tuple[str, ...]) -> int | None:
    for src in (m, getattr(m, "config", None), getattr(m, "cfg", None)):
        for n in names:
            v = getattr(src, n, None) if src is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


#: attributes (of an attention module or its config) giving the head count and the head size
_HEAD_COUNT = ("num_heads", "n_heads", "num_attention_heads", "n_head", "heads", "nhead")
_HEAD_SIZE = ("head_dim", "d_head", "head_size", "attention_head_size")


def _head_shape(m: nn.Module, width: int) -> tuple[int, int] | None:
    """``(H, hd)`` of attention module ``m`` whose heads side by side are ``width`` wide: from its head
    count or head size attribute (the other one derived), ``None`` when it has neither."""
    H, hd = _int_attr(m, _HEAD_COUNT), _int_attr(m, _HEAD_SIZE)
    if H is None and hd is None:
        return None
    return H or width // hd, hd or width // H


def _child(m: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(m, n) for n in names if isinstance(getattr(m, n, None), nn.Module)), None)


def _split_projections(m: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(module with q/k/v, output projection)`` of an attention module whose q/k/v projections sit in
    one child and its output projection in another — Hugging Face BERT, RoBERTa, ELECTRA, ViT:
    ``attention.self.{query,key,value}`` and ``attention.output.dense`` — else ``None``."""
    children = dict(m.named_children())
    qkv = [c for c in children.values() if all(_child(c, names) is not None for names in (_Q, _K, _V))
           and _child(c, _O) is None]
    outs = [c for c in children.values() if c not in qkv and _child(c, _SIBLING_O) is not None
            and _child(c, _Q) is None]
    if len(qkv) != 1 or len(outs) != 1:
        return None
    return qkv[0], _child(outs[0], _SIBLING_O)


def _separate_heads(m: nn.Module) -> HeadSlices | None:
    """Separate q/k/v/o projections as ``nn.Linear`` (out, in): a head is rows of q, k, v, columns of o.
    The output projection may sit in a sibling module (:func:`_split_projections`)."""
    src, o = m, _child(m, _O)
    if o is None:
        split = _split_projections(m)
        if split is None:
            return None
        src, o = split
    mods = []
    for names in (_Q, _K, _V):
        c = _child(src, names)
        if c is None:
            return None
        mods.append(_wb(c))
    mods.append(_wb(o))
    (qw, qb), (kw, kb), (vw, vb), (ow, ob) = mods
    if qw is None or kw is None or vw is None or ow is None:
        return None
    shape = _head_shape(src, qw.shape[0])
    if shape is None:
        return None
    H, hd = shape
    n_kv = kw.shape[0] // hd
    if (qw.shape[0] != H * hd or ow.shape[1] != H * hd or kw.shape[0] != n_kv * hd or vw.shape[0] != n_kv * hd
            or n_kv == 0 or H % n_kv):
        return None
    out = []
    for h in range(H):
        g = h // (H // n_kv)
        head: dict = {}
        _add(head, qw, _span(h, hd))
        _add(head, qb, _span(h, hd))
        for p in (kw, vw):
            _add(head, p, _span(g, hd))
        for p in (kb, vb):
            _add(head, p, _span(g, hd))
        _add(head, ow, (slice(None), _span(h, hd)))
        out.append(head)
    _add_position_bias(m, out)
    _add_qk_norms(src, out, n_kv, hd)
    return out


#: query and key normalizations applied to q and k after the projections (OLMo2, Qwen3, Cohere, StableLM, Phi)
_QK_NORMS = {"q": ("q_norm", "q_layernorm", "query_layernorm"), "k": ("k_norm", "k_layernorm", "key_layernorm")}


def _add_qk_norms(m: nn.Module, heads_: HeadSlices, n_kv: int, hd: int) -> None:
    """Give head ``h`` the entries of the query normalization that scale its q only, and the key
    normalization's entries of its K/V group: a weight of width ``H·hd`` (OLMo2's RMSNorm over every
    head: entries ``[h hd, (h+1) hd)``), of shape ``(H, hd)`` (Cohere: row ``h``), or one norm per head
    (StableLM's ``q_layernorm.norms.h``: all of it).  A norm of width ``hd`` that every head shares (Qwen3,
    Phi) belongs to none, as the output bias.  Before 2026-12-07 these entries belonged to no head."""
    H = len(heads_)
    for kind, names in _QK_NORMS.items():
        n = H if kind == "q" else n_kv
        members = [[i] if kind == "q" else [h for h in range(H) if h // (H // n_kv) == i] for i in range(n)]
        for name in names:
            mod = getattr(m, name, None)
            if not isinstance(mod, nn.Module):
                continue
            for pname, p in mod.named_parameters():
                parts = pname.split(".")
                if n > 1 and p.dim() == 1 and p.shape[0] == n * hd:
                    units = [(i, _span(i, hd)) for i in range(n)]
                elif n > 1 and p.dim() == 2 and tuple(p.shape) == (n, hd):
                    units = [(i, (slice(i, i + 1), slice(None))) for i in range(n)]
                elif (len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < n
                      and tuple(p.shape) == (hd,)):  # a list of per-head norms: norms.<i>.weight
                    units = [(int(parts[1]), slice(None))]
                else:
                    continue
                for i, index in units:
                    for h in members[i]:
                        _add(heads_[h], p, index)


#: learned relative-position biases with one column per head: T5's ``relative_attention_bias`` (an
#: ``nn.Embedding`` (buckets, H)), Swin's ``relative_position_bias_table`` ((2w−1)², H)
_POSITION_BIAS = ("relative_attention_bias.weight", "relative_position_bias_table")


def _add_position_bias(m: nn.Module, heads_: HeadSlices) -> None:
    """Give column ``h`` of the attention module's learned relative-position bias tables to head ``h``."""
    H = len(heads_)
    for name, p in m.named_parameters():
        if name.endswith(_POSITION_BIAS) and p.dim() == 2 and p.shape[1] == H:
            for h, head in enumerate(heads_):
                _add(head, p, (slice(None), h))


# ----------------------------------------------------------------------------
# fused q/k/v projections: one nn.Linear whose output rows hold q, k and v of every head
# ----------------------------------------------------------------------------
#: the layouts of a fused q/k/v projection's output rows that :func:`heads` knows (``qkv_layout=``)
QKV_LAYOUTS = ("blocks", "per_head")
_FUSED_QKV = ("qkv", "c_attn", "qkv_proj", "Wqkv", "wqkv", "to_qkv", "query_key_value", "in_proj", "qkv_linear",
              "attn_qkv")
_FUSED_O = _O + ("proj", "out")
#: K/V head counts (gpt-fast calls it ``n_local_heads``)
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "kv_heads", "n_local_heads")
#: Hugging Face attention classes with a fused projection: (its name, the output projection's name)
_HF_FUSED = {"GPTNeoXAttention": ("query_key_value", "dense"), "BloomAttention": ("query_key_value", "dense"),
             "FalconAttention": ("query_key_value", "dense"), "GPTBigCodeAttention": ("c_attn", "c_proj"),
             "Phi3Attention": ("qkv_proj", "o_proj"), "MptAttention": ("Wqkv", "out_proj"),
             "CodeGenAttention": ("qkv_proj", "out_proj"), "PersimmonAttention": ("query_key_value", "dense")}


class _Unresolved(list):
    """An attention module found, whose heads cannot be told without knowing its forward: no slices, and
    the message :func:`heads` raises (:func:`layers` and :func:`attention_and_mlp` need no slices)."""

    def __init__(self, why: str):
        super().__init__()
        self.why = why


def _fused_rows(layout: str, h: int, H: int, n_kv: int, hd: int, mp: int = 1) -> Tensor | slice:
    """Rows of head ``h``'s query, key and value in the output of a fused projection of
    ``(H + 2 H_kv) hd`` rows, for each layout:

    * ``"blocks"``: ``[Q of heads 0..H-1 | K of K/V heads 0..H_kv-1 | V ...]`` — nanoGPT's
      ``q, k, v = c_attn(x).split(E, dim=2)``, timm's ``qkv(x).reshape(B, N, 3, H, hd)``; Phi-3, MPT,
      Falcon and GPTBigCode with multi-query attention;
    * ``"per_head"`` (``H_kv = H``): viewed as ``(H, 3 hd)``, each head's q, k, v side by side —
      GPT-NeoX, Bloom, Falcon and GPTBigCode without multi-query;
    * ``"grouped"``: viewed as ``(H_kv, H / H_kv + 2, hd)``, each K/V group's queries, then its key and
      value — Falcon's new decoder architecture;
    * ``"codegen"``: viewed as ``(mp, 3 local)``, ``local = H hd / mp``, each model-parallel shard's q,
      v, k in that order (CodeGen, ``mp_num`` = 4).

    Head ``h`` reads K/V head ``h // (H / H_kv)``."""
    r = H // n_kv
    g = h // r
    if layout == "per_head":
        return _span(h, 3 * hd)
    if layout == "blocks":
        starts = (h * hd, (H + g) * hd, (H + n_kv + g) * hd)
    elif layout == "grouped":
        base = g * (r + 2) * hd
        starts = (base + (h % r) * hd, base + r * hd, base + (r + 1) * hd)
    elif layout == "codegen":
        local = H * hd // mp
        a, off = divmod(h * hd, local)
        base = 3 * a * local
        starts = (base + off, base + 2 * local + off, base + local + off)  # q, k, v (stored q, v, k)
    else:
        raise ValueError(f"unknown fused q/k/v layout {layout!r}")
    return torch.cat([torch.arange(o, o + hd) for o in starts])


def _fused_heads(m: nn.Module, qkv_layout: str | None) -> HeadSlices | None:
    """Per-head slices of an attention module computing q, k and v with one ``nn.Linear``: the Hugging
    Face classes of :data:`_HF_FUSED` in their own layouts; any other module with a fused child
    (:data:`_FUSED_QKV`), an output projection and a head count in ``qkv_layout`` (an
    :class:`_Unresolved` when it is ``None``: the rows' order is in the forward)."""
    mro = _mro_names(m)
    cls = next((c for c in _HF_FUSED if c in mro), None)
    if cls is not None:
        qkv, o = (getattr(m, n, None) for n in _HF_FUSED[cls])
        if getattr(m, "is_cross_attention", False):  # GPTBigCode's cross-attention: q_attn + c_attn (k, v)
            return None
    else:
        qkv, o = _child(m, _FUSED_QKV), _child(m, _FUSED_O)
    if not isinstance(qkv, nn.Linear) or not isinstance(o, nn.Module):
        return None
    ow, _ = _wb(o)
    shape = None if ow is None else _head_shape(m, ow.shape[1])
    if shape is None:
        return None
    H, hd = shape
    n_kv, mp = H, 1
    if cls == "FalconAttention":
        n_kv = int(m.num_kv_heads)
        layout = "grouped" if m.new_decoder_architecture else "blocks" if m.multi_query else "per_head"
    elif cls == "GPTBigCodeAttention":
        n_kv = int(m.kv_heads)
        layout = "blocks" if m.multi_query else "per_head"
    elif cls == "CodeGenAttention":
        layout, mp = "codegen", int(m.mp_num)
    elif cls is not None:
        layout = "blocks" if cls in ("Phi3Attention", "MptAttention") else "per_head"
        n_kv = _int_attr(m, _KV_HEADS) or H if cls == "Phi3Attention" else H
    else:
        layout, n_kv = qkv_layout, _int_attr(m, _KV_HEADS) or H
    W, b = qkv.weight, qkv.bias
    if (n_kv == 0 or H % n_kv or W.shape[0] != (H + 2 * n_kv) * hd or ow.shape[1] != H * hd
            or (layout == "per_head" and n_kv != H)):
        return None
    if layout is None:
        qkv_name = next(n for n, c in m.named_children() if c is qkv)
        return _Unresolved(
            f"{type(m).__name__} computes q, k and v with one projection {qkv_name!r} ({W.shape[0]} rows for {H} "
            f"heads of size {hd}), and which rows belong to which head is up to its forward: pass "
            "qkv_layout='blocks' when it splits the output into q, k, v first (nanoGPT's "
            "q, k, v = c_attn(x).split(E, dim=2); timm's qkv(x).reshape(B, N, 3, H, hd)) or qkv_layout='per_head' "
            "when it views it as (..., H, 3 hd) and then splits each head's part (GPT-NeoX, Bloom)")
    out = []
    for h in range(H):
        head: dict = {}
        rows = _fused_rows(layout, h, H, n_kv, hd, mp)
        _add(head, W, rows)
        _add(head, b, rows)
        _add(head, ow, (slice(None), _span(h, hd)))
        out.append(head)
    _add_position_bias(m, out)
    return out


def _attention_heads(m: nn.Module, qkv_layout: str | None = None) -> HeadSlices | None:
    """Per-head parameter slices of ``m`` if it is an attention module of a known layout (an
    :class:`_Unresolved` when it is one whose fused q/k/v rows need ``qkv_layout``)."""
    if isinstance(m, nn.MultiheadAttention):
        return _mha_heads(m)
    mro = _mro_names(m)
    if "GPT2Attention" in mro and hasattr(m, "c_attn") and hasattr(m, "c_proj"):
        return _gpt2_heads(m)
    own = dict(m.named_parameters(recurse=False))
    if "W_Q" in own and "W_O" in own:
        return _tl_heads(m)
    fused = _fused_heads(m, qkv_layout)
    return fused if fused is not None else _separate_heads(m)


_LOOKED_FOR = (
    "torch.nn.MultiheadAttention; Hugging Face GPT2Attention (c_attn, c_proj) and the fused q/k/v projections "
    "of GPT-NeoX, Bloom, Falcon, GPTBigCode, Phi-3, MPT and CodeGen; any module with one fused q/k/v nn.Linear "
    "(qkv, c_attn, qkv_proj, Wqkv, wqkv, to_qkv, ...), an output projection and a head count; TransformerLens "
    "attention (W_Q, W_K, W_V, W_O of shape (n_heads, ...), _W_K/_W_V for grouped queries); and modules with "
    "separate q/k/v/o nn.Linear projections (q_proj/k_proj/v_proj/o_proj, q/k/v/o, query/key/value/out_proj or "
    "dense, q_lin/k_lin/v_lin/out_lin, query_proj/key_proj/value_proj, to_q/to_k/to_v/to_out, wq/wk/wv/wo; or "
    "q/k/v in one child and the output dense in another, as BERT's self/output) and a head count (num_heads, "
    "n_heads, num_attention_heads or head_dim)"
)


# ----------------------------------------------------------------------------
# the module tree: attention modules, blocks
# ----------------------------------------------------------------------------
class _Arch:
    def __init__(self, model: nn.Module, qkv_layout: str | None = None):
        self.model = model
        self.modules = dict(model.named_modules())
        self.name_of: dict[int, str] = {}  # id(param) -> first name, sampled parameters only
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.name_of[id(p)] = name
        self.id_of = {n: i for i, n in self.name_of.items()}
        self.pos = {n: j for j, n in enumerate(self.name_of.values())}  # the model's parameter order
        self.attn: list[tuple[str, nn.Module, HeadSlices]] = []
        found: list[str] = []
        for name, m in model.named_modules():
            if any(f == "" or name == f or name.startswith(f + ".") for f in found):  # inside a found one
                continue
            hs = _attention_heads(m, qkv_layout)
            if hs is not None:
                self.attn.append((name, m, hs))
                found.append(name)

    def names(self, m: nn.Module) -> dict[str, Any]:
        """``{name: True}`` for the sampled parameters of module ``m``, in the model's order."""
        ids = {id(p) for p in m.parameters()}
        return {n: True for i, n in self.name_of.items() if i in ids}

    def block_of(self, name: str) -> tuple[str, int] | None:
        """``(module list name, index)`` of the ModuleList element containing module ``name`` that is a
        block: the deepest ModuleList ancestor whose elements are all of one class (T5 keeps each block's
        sublayers — attention, cross-attention, feed-forward, of different classes — in a ModuleList of
        its own, inside the list of blocks), else the deepest ModuleList ancestor."""
        parts = name.split(".") if name else []
        deepest = None
        for j in range(len(parts), 0, -1):
            parent = ".".join(parts[:j - 1])
            ml = self.modules.get(parent)
            if parts[j - 1].isdigit() and isinstance(ml, nn.ModuleList):
                if len({type(c) for c in ml}) == 1:
                    return parent, int(parts[j - 1])
                deepest = deepest or (parent, int(parts[j - 1]))
        return deepest

    def stacks(self, what: str) -> list[tuple[str, str, nn.ModuleList]]:
        """The ModuleLists holding the transformer blocks (those holding the attention modules), in the
        model's order, as ``(label prefix, list name, list)``.  One list: prefix ``""``.  Several (an
        encoder and a decoder): the first component of their names that tells them apart, and a space
        (``"encoder "``, ``"decoder "``; the whole list name when that is not unique)."""
        if not self.attn:
            raise ValueError(f"{what}: found no attention module in {type(self.model).__name__} (looked for "
                             f"{_LOOKED_FOR}), so no transformer blocks; give the mapping by hand, e.g. "
                             "{'l0': 'layers.0.*', 'l1': 'layers.1.*'}")
        lists: dict[str, None] = {}
        for name, _, _ in self.attn:
            b = self.block_of(name)
            if b is None:
                raise ValueError(f"{what}: the attention module {name!r} is not inside a ModuleList of blocks; "
                                 "give the mapping by hand, e.g. {'l0': 'layers.0.*'}, or take one restriction per "
                                 "module: slt.restrict.modules(model)")
            lists.setdefault(b[0])
        return self._labelled(list(lists))

    def plain_stacks(self) -> list[tuple[str, str, nn.ModuleList]]:
        """For a model without attention: its lists of blocks, labelled as :meth:`stacks` — the outermost
        ModuleLists of elements of one class, each with submodules of its own, holding sampled parameters
        (Mamba's ``backbone.layers``; one block is a list of one, so that a list of per-head modules inside it
        is not taken for the layers); ``[]`` when it has none (an ``nn.Sequential`` MLP, a CNN, an LSTM, a
        ModuleList of single layers)."""
        ids = set(self.name_of)

        def composite(b: nn.Module) -> bool:  # a block of layers, not a layer (a list of Conv2d is no stack)
            return any(any(True for _ in c.parameters()) for c in b.children())

        found = [n for n, m in self.modules.items()
                 if isinstance(m, nn.ModuleList) and len(m) >= 1 and len({type(c) for c in m}) == 1
                 and all(composite(b) for b in m) and any(id(p) in ids for p in m.parameters())]
        outer = [n for n in found if not any(o != n and (o == "" or n.startswith(o + ".")) for o in found)]
        return self._labelled(outer) if outer else []

    def _labelled(self, names: list[str]) -> list[tuple[str, str, nn.ModuleList]]:
        if len(names) == 1:
            return [("", names[0], self.modules[names[0]])]
        split = [n.split(".") for n in names]
        at = next((i for i in range(min(map(len, split))) if len({p[i] for p in split}) > 1), None)
        # the first component that tells the lists apart; an index with its list's name (Swin's stages:
        # "layers.0", "layers.1")
        labels = ([f"{p[at - 1]}.{p[at]}" if p[at].isdigit() and at else p[at] for p in split] if at is not None
                  else names)
        if len(set(labels)) < len(labels):
            labels = names
        return [(f"{label} ", n, self.modules[n]) for label, n in zip(labels, names)]

    def attention_in(self, block: str) -> list[tuple[str, nn.Module, "HeadSlices"]]:
        """The attention modules inside the block named ``block``, in the model's order."""
        return [a for a in self.attn if a[0] == block or a[0].startswith(block + ".")]


def _attention_tags(block: str, names: list[str]) -> list[str]:
    """Labels of a block's attention modules when it holds several (a decoder's self- and cross-attention):
    their last name components (``self_attn``, ``encoder_attn``; T5's ``SelfAttention``, ``EncDecAttention``),
    or their paths inside the block when those repeat; ``[""]`` for one."""
    if len(names) == 1:
        return [""]
    rel = [n[len(block) + 1:] for n in names]
    last = [r.split(".")[-1] for r in rel]
    return last if len(set(last)) == len(last) else rel


def _label_heads(arch: _Arch, heads_: HeadSlices, label: str, out: dict) -> None:
    for h, head in enumerate(heads_):
        entry = {}
        for i, (p, index) in head.items():
            name = arch.name_of.get(i)
            if name is not None:
                entry[name] = index
        out[f"{label}h{h}"] = dict(sorted(entry.items(), key=lambda kv: arch.pos[kv[0]]))


def heads(model: nn.Module, qkv_layout: str | None = None) -> dict[str, dict[str, Any]]:
    """One restriction per attention head: ``{"l{layer}h{head}": {param_name: index}}``.

    A head (Wang et al. 2024, arXiv 2410.02984) is the set of its slices of the query, key and
    value projections (weights and biases) and of the output projection's weight:

    * ``torch.nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``): rows
      ``[h hd, (h+1) hd)`` of each of the Q, K, V blocks of ``in_proj_weight`` ``(3E, E)`` (block
      offsets 0, E, 2E) and the same entries of ``in_proj_bias``; rows ``[h hd, (h+1) hd)`` of
      ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when they are separate; entries
      ``[h hd, (h+1) hd)`` of ``bias_k``/``bias_v`` if present; columns ``[h hd, (h+1) hd)`` of
      ``out_proj.weight`` ``(E, E)``;
    * Hugging Face GPT-2 (``GPT2Attention``; ``Conv1D`` computes ``x @ W``): columns of head ``h``
      in each of the Q, K, V blocks of ``c_attn.weight`` ``(E, 3E)``, the same entries of
      ``c_attn.bias``, rows ``[h hd, (h+1) hd)`` of ``c_proj.weight`` ``(E, E)`` (cross-attention:
      ``q_attn`` columns and the K, V blocks of ``c_attn``);
    * one fused q/k/v ``nn.Linear`` of ``(H + 2 H_kv) hd`` output rows: head ``h`` is its rows of q,
      k and v (weight and bias) and columns ``[h hd, (h+1) hd)`` of the output projection.  Which
      rows those are depends on how the forward splits the output (:func:`_fused_rows`): Hugging Face
      GPT-NeoX and Bloom (``query_key_value`` viewed as ``(..., H, 3 hd)``: rows
      ``[3 h hd, 3 (h+1) hd)``), Falcon (that, or ``[Q | K | V]`` blocks with multi-query attention,
      or per K/V group with the new decoder architecture), GPTBigCode (``c_attn``, an ``nn.Linear``:
      blocks with multi-query, per head without), Phi-3 (``qkv_proj``, blocks, grouped-query), MPT
      (``Wqkv``, blocks) and CodeGen (``qkv_proj`` in 4 shards of q, v, k) are read from their
      classes.  Any other module with a fused child (``qkv``, ``c_attn``, ``qkv_proj``, ``Wqkv``,
      ``to_qkv``, ``in_proj``, ...), an output projection (``proj``, ``c_proj``, ``out_proj``, ...)
      and a head count needs ``qkv_layout``: ``"blocks"`` when its forward splits the output into
      q, k, v first (nanoGPT, timm's ViT) or ``"per_head"`` when it views it as ``(..., H, 3 hd)``;
    * TransformerLens attention (``W_Q``, ``W_K``, ``W_V`` ``(H, E, hd)``, ``b_Q``, ``b_K``,
      ``b_V`` ``(H, hd)``, ``W_O`` ``(H, hd, E)``): index ``[h]`` of each; grouped-query ``_W_K``,
      ``_W_V``, ``_b_K``, ``_b_V`` ``(H_kv, ...)``: index ``[h // (H / H_kv)]``;
    * separate ``nn.Linear`` projections (``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``q``/``k``/
      ``v``/``o`` as in TransformerLens' native ``TransformerBridge``, ``query``/``key``/``value``/
      ``out_proj``, DistilBERT's ``q_lin``/``k_lin``/``v_lin``/``out_lin``, with a head count
      attribute): rows ``[h hd, (h+1) hd)`` of q (weight and bias), the rows of K/V head
      ``h // (H / H_kv)`` of k and v, columns ``[h hd, (h+1) hd)`` of o;
    * the same with q/k/v in one child and the output projection (``dense``) in another, as Hugging
      Face BERT, RoBERTa, ELECTRA and ViT lay them out (``attention.self.query`` …,
      ``attention.output.dense``);
    * T5's ``relative_attention_bias`` (an ``nn.Embedding`` (buckets, H) in the first block of each
      stack, used by every block of that stack): column ``h`` belongs to head ``h`` of that first block;
      likewise column ``h`` of Swin's ``relative_position_bias_table`` ((2w−1)², H) in every block.

    * per-head query/key normalizations (:func:`_add_qk_norms`): the entries of ``q_norm``/``k_norm``
      (or ``q_layernorm``/``k_layernorm``) that scale head ``h``'s q, or its K/V group's k (OLMo2,
      Cohere, StableLM with ``qk_layernorm``).  An RMSNorm over all heads at once (OLMo2) still mixes
      them through its statistics: perturbing head ``h``'s entries changes the other heads' outputs a
      little (about 1% of head ``h``'s change, measured), so the heads' computations are not separate
      there, whatever the restriction.

    The output projection's bias (``out_proj.bias``, ``c_proj.bias``, ``dense.bias``, ``b_O``) and a
    query/key normalization of width ``hd`` that every head shares (Qwen3, Phi) are shared by all heads
    and belong to none.  With grouped-query attention the K/V slices of a group
    belong to every head of the group (as in devinterp), so those heads' masks overlap there; the
    heads of plain multi-head attention are disjoint.

    Parameters
    ----------
    model
        The model; attention modules are found in ``model.named_modules()`` and their layer is the
        index of the block (an element of an ``nn.ModuleList``) that contains them.  Attention
        modules outside any ModuleList (e.g. a lone ``nn.MultiheadAttention``) are numbered in
        module order.  An encoder-decoder model has one list of blocks per stack: labels then start
        with the stack (``"encoder l0h1"``; nested stages as Swin's: ``"layers.1 l0h1"``), and a block
        holding several attention modules (a decoder's self- and cross-attention) names each
        (``"decoder l0 encoder_attn h1"``: BART; ``"EncDecAttention"``: T5; ``"multihead_attn"``:
        ``nn.Transformer``).
    qkv_layout
        ``"blocks"`` or ``"per_head"``: the order of the rows of fused q/k/v projections in modules of
        classes :func:`heads` does not know (above); ignored for the others.

    Returns
    -------
    dict
        ``{"l0h0": {param_name: index, ...}, "l0h1": ..., ...}``, layer-major; indices are ints,
        slices, tuples of slices or integer tensors, valid as ``param[index]``.  Only sampled
        (``requires_grad``) parameters appear.

    Raises
    ------
    ValueError
        When no attention module of a known layout is found (the message lists what was looked for
        and how to write the mapping by hand), some attention modules sit inside a list of blocks
        and others outside any, or a fused q/k/v projection needs ``qkv_layout``.
    """
    model = unwrap(model)  # a torch.compile or DataParallel wrapper: the names of the model slt runs
    if qkv_layout is not None and qkv_layout not in QKV_LAYOUTS:
        raise ValueError(f"heads: qkv_layout must be one of {QKV_LAYOUTS}, got {qkv_layout!r}")
    arch = _Arch(model, qkv_layout)
    unresolved = [(name, hs) for name, _, hs in arch.attn if isinstance(hs, _Unresolved)]
    if unresolved:
        name, hs = unresolved[0]
        raise ValueError(f"heads: the attention module {name!r} ({hs.why})")
    if not arch.attn:
        raise ValueError(
            f"heads: found no attention module in {type(model).__name__}: looked for {_LOOKED_FOR}. "
            "Give the heads by hand as {label: {parameter name: index}}, one index per parameter, e.g. for a "
            "fused qkv weight (3E, E) with head size 16: {'l0h0': {'layers.0.attn.qkv.weight': "
            "torch.cat([torch.arange(0, 16), torch.arange(E, E + 16), torch.arange(2 * E, 2 * E + 16)]), "
            "'layers.0.attn.out.weight': (slice(None), slice(0, 16))}, 'l0h1': ...}")
    out: dict[str, dict[str, Any]] = {}
    if all(arch.block_of(name) is None for name, _, _ in arch.attn):  # lone attention modules: numbered
        for layer, (_, _, hs) in enumerate(arch.attn):
            _label_heads(arch, hs, f"l{layer}", out)
        return _sampled(out, model)
    for prefix, lname, blist in arch.stacks("heads"):
        for i in range(len(blist)):
            block = f"{lname}.{i}"
            mods = arch.attention_in(block)
            for (_, _, hs), tag in zip(mods, _attention_tags(block, [a[0] for a in mods])):
                _label_heads(arch, hs, f"{prefix}l{i} {tag} " if tag else f"{prefix}l{i}", out)
    return _sampled(out, model)


def _sampled(out: dict[str, dict[str, Any]], model: nn.Module) -> dict[str, dict[str, Any]]:
    """``out``, or an error naming the cause when no head has a sampled entry (frozen attention weights)."""
    if out and not any(out.values()):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        raise ValueError(
            f"heads: the attention weights of {type(model).__name__} are frozen (requires_grad=False), so no head "
            f"has an entry to sample; only trainable parameters are sampled ({len(trainable)}: "
            f"{', '.join(trainable[:3])}{', ...' if len(trainable) > 3 else ''}). With adapters (PEFT/LoRA) restrict "
            "to them: slt.restrict.modules(model) or layers(model)")
    return out


def layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """One restriction per transformer block: ``{"l0": {param_name: True, ...}, "l1": ...}``.  A model
    without attention has blocks when it keeps them in a ModuleList of two or more elements of one class,
    each made of submodules (a state-space model: Mamba's ``backbone.layers``); otherwise (an
    ``nn.Sequential`` MLP, a CNN, a recurrent net) it gets one restriction per module that owns
    parameters (:func:`modules`).

    The blocks are the elements of the ``nn.ModuleList`` that holds the model's attention modules
    (found as in :func:`heads`): GPT-2 ``transformer.h.{i}``, GPT-NeoX ``gpt_neox.layers.{i}``,
    TransformerLens ``blocks.{i}``, ``nn.TransformerEncoder`` ``layers.{i}``, ...  A block's
    restriction is all its sampled parameters.  An encoder-decoder model (T5, BART, ``nn.Transformer``)
    has a list per stack: ``"encoder l0"``, ..., ``"decoder l0"``, ...

    Raises
    ------
    ValueError
        When attention modules sit outside a list of blocks.
    """
    model = unwrap(model)  # a torch.compile or DataParallel wrapper: the names of the model slt runs
    arch = _Arch(model)
    stacks = arch.stacks("layers") if arch.attn else arch.plain_stacks()
    if not stacks:
        return modules(model)
    return {f"{prefix}l{i}": arch.names(b) for prefix, _, blist in stacks for i, b in enumerate(blist)}


def modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """One restriction per module that owns sampled parameters, labelled by its name:
    ``{"0": {"0.weight": True, "0.bias": True}, "2": {...}}`` for an ``nn.Sequential`` MLP,
    ``{"conv1": ..., "bn1": ..., "fc": ...}`` for a CNN — the layer-wise LLC of any network.

    A module's restriction is the parameters it registers itself (not those of its children), so
    the restrictions are disjoint and together cover every sampled parameter; a parameter the
    model's root registers directly is its own restriction (labelled by its name); a tied parameter
    belongs to the first module that registers it; frozen parameters are left out.

    Raises
    ------
    ValueError
        When the model has no sampled parameter.
    """
    model = unwrap(model)  # a torch.compile or DataParallel wrapper: the names of the model slt runs
    arch = _Arch(model)
    out: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen or id(p) not in arch.name_of:
                continue
            seen.add(id(p))
            label = _parametrized_owner(model, mname) or pname
            out.setdefault(label, {})[arch.name_of[id(p)]] = True
    if not out:
        raise ValueError(f"modules: {type(model).__name__} has no parameter with requires_grad=True to restrict to")
    return out


def _parametrized_owner(model: nn.Module, mname: str) -> str:
    """``mname``, or the module that a ``torch.nn.utils.parametrize`` parametrization of it belongs to: the
    parameters of ``weight_norm(nn.Linear)`` live in ``0.parametrizations.weight`` (``original0``,
    ``original1``) and are layer ``0``'s weight; a parametrized tensor of the root is labelled by its name."""
    parts = mname.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "parametrizations":
            owner = ".".join(parts[:i])
            if parametrize.is_parametrized(model.get_submodule(owner)):
                return owner or parts[i + 1]  # a parametrization of the root: its tensor's name
    return mname


def _is_norm(m: nn.Module) -> bool:
    return any("Norm" in n for n in _mro_names(m))


def attention_and_mlp(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Two restrictions per block: ``"l{i} attn"`` and ``"l{i} mlp"``.

    ``"l{i} attn"`` is the block's attention module and its normalization layer (the block's
    first normalization module in registration order: GPT-2 ``ln_1``, GPT-NeoX
    ``input_layernorm``, TransformerLens ``ln1``, ``nn.TransformerEncoderLayer`` ``norm1``);
    ``"l{i} mlp"`` is the rest of the block (the MLP and its normalization), so the two are
    disjoint and their union is :func:`layers`' ``"l{i}"``.  (devinterp leaves the layer norms out
    of both.)  Gemma 2 and 3 normalize the attention's output too (``post_attention_layernorm``, followed
    by the MLP's ``pre_feedforward_layernorm``): that norm goes with ``attn`` (before 2026-12-07 it went
    with ``mlp``).  A parallel block (GPT-J, Phi, Cohere: attention and MLP read one normalization) has
    its one norm in ``attn``.  A block with nothing outside attention (an attention-only model) has no
    ``"l{i} mlp"`` entry; a frozen block has both, empty (as :func:`heads` keeps a frozen layer's
    heads), which a run refuses by name.  A decoder block with self- and cross-attention puts both in ``attn``, with
    the block's first two normalization modules (BART's ``self_attn_layer_norm`` and
    ``encoder_attn_layer_norm``, ``nn.TransformerDecoderLayer``'s ``norm1`` and ``norm2``); labels of
    an encoder-decoder model start with the stack (``"decoder l0 attn"``), as in :func:`layers`.
    """
    model = unwrap(model)  # a torch.compile or DataParallel wrapper: the names of the model slt runs
    arch = _Arch(model)
    out: dict[str, dict[str, Any]] = {}
    for stack, lname, blist in arch.stacks("attention_and_mlp"):
        for i, b in enumerate(blist):
            attn_mods = [m for _, m, _ in arch.attention_in(f"{lname}.{i}")]
            attn_ids = {id(p) for m in attn_mods for p in m.parameters()}
            inside = {id(m) for a in attn_mods for m in a.modules()}
            named = [(n.split(".")[-1], m) for n, m in b.named_modules() if id(m) not in inside and _is_norm(m)
                     and any(id(p) not in attn_ids for p in m.parameters())]
            norms = [m for _, m in named[:len(attn_mods)]]  # each attention module's normalization, in order
            if any(n.startswith("pre_feedforward") for n, _ in named):  # Gemma 2/3: a norm of the attention's output
                norms += [m for n, m in named if n.startswith("post_attention")]  # before the MLP's own
            for m in norms:
                attn_ids |= {id(p) for p in m.parameters()}
            allp = arch.names(b)
            out[f"{stack}l{i} attn"] = {n: True for n in allp if arch.id_of[n] in attn_ids}
            mlp = {n: True for n in allp if arch.id_of[n] not in attn_ids}
            if any(id(p) not in attn_ids for p in b.parameters()):  # (frozen ones too: labels follow the blocks)
                out[f"{stack}l{i} mlp"] = mlp
    return out


_UNEMBED_NAMES = ("unembed", "lm_head", "embed_out")


def embeddings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``"embed"`` (token and positional embeddings) and ``"unembed"`` (the output head).

    ``"embed"``: the parameters of every ``nn.Embedding`` (or TransformerLens ``W_E``/``W_pos``)
    outside the transformer blocks.  ``"unembed"``: the parameters of the output head —
    ``model.get_output_embeddings()`` (Hugging Face), a module holding ``W_U`` (TransformerLens),
    or a module named ``unembed``, ``lm_head`` or ``embed_out`` — that are not already in
    ``"embed"``.  With tied input and output embeddings (GPT-2's default) the shared matrix is
    sampled once, under its first name, and listed in ``"embed"`` only; ``"unembed"`` is then
    absent unless the head has parameters of its own (a bias).  The final normalization layer
    belongs to neither.  (devinterp's GPT-2 ``"embed"`` is the token embedding alone.)

    Raises
    ------
    ValueError
        When the model has no embedding.
    """
    model = unwrap(model)  # a torch.compile or DataParallel wrapper: the names of the model slt runs
    arch = _Arch(model)
    in_blocks: set[int] = set()
    try:
        in_blocks = {id(m) for _, _, blist in arch.stacks("embeddings") for m in blist.modules()}
    except ValueError:
        pass
    head = None
    goe = getattr(model, "get_output_embeddings", None)
    if callable(goe):
        try:
            head = goe()
        except Exception:  # noqa: BLE001 - not every model implements it
            head = None
    if not isinstance(head, nn.Module):
        head = None
        for name, m in arch.modules.items():
            if id(m) in in_blocks or not name:
                continue
            if "W_U" in dict(m.named_parameters(recurse=False)) or name.split(".")[-1] in _UNEMBED_NAMES:
                head = m
                break
    head_mods = {id(m) for m in head.modules()} if head is not None else set()
    embed_ids: set[int] = set()
    for name, m in arch.modules.items():
        if id(m) in in_blocks or id(m) in head_mods:
            continue
        own = dict(m.named_parameters(recurse=False))
        if isinstance(m, nn.Embedding):
            embed_ids |= {id(p) for p in own.values()}
        else:
            embed_ids |= {id(p) for n, p in own.items() if n in ("W_E", "W_pos")}
    embed = {n: True for i, n in arch.name_of.items() if i in embed_ids}
    if not embed:
        frozen = [n for n, p in model.named_parameters() if id(p) in embed_ids and not p.requires_grad]
        if frozen:
            raise ValueError(f"embeddings: the embeddings of {type(model).__name__} are frozen ({', '.join(frozen[:4])}"
                             f"{', ...' if len(frozen) > 4 else ''}: requires_grad=False), so they are not sampled and "
                             "have no refined LLC")
        raise ValueError(f"embeddings: found no embedding (nn.Embedding, TransformerLens W_E/W_pos) outside the "
                         f"blocks of {type(model).__name__}; give the mapping by hand, e.g. {{'embed': 'wte.*'}}")
    out: dict[str, dict[str, Any]] = {"embed": embed}
    if head is not None:
        head_ids = {id(p) for p in head.parameters()} - embed_ids
        unembed = {n: True for i, n in arch.name_of.items() if i in head_ids}
        if unembed:
            out["unembed"] = unembed
    return out
