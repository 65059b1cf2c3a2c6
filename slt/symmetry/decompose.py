r"""Decompose the LLC over a lattice of symmetries of the data distribution.

Given groups :math:`G_1, \dots, G_k` acting on the data, every subset
:math:`S \subseteq \{1, \dots, k\}` defines a symmetrized distribution
:math:`q_S = E_{g \in \langle G_i : i \in S\rangle}[g_* q]` (:math:`q_\emptyset = q`),
a point :math:`w^*_S` (re-trained on :math:`q_S`, or shared: "quenched") and
an estimate :math:`\hat\lambda(S)`.  Möbius inversion on the Boolean lattice,

.. math:: c(S) = \sum_{T \subseteq S} (-1)^{|S| - |T|}\, \hat\lambda(T),
          \qquad \hat\lambda(S) = \sum_{T \subseteq S} c(T),

splits :math:`\hat\lambda` into the degeneracy of the parameter-function map on
the unsymmetrized data, :math:`c(\emptyset) = \hat\lambda(\emptyset)`, the effect
of each symmetry alone, :math:`c(\{i\}) = \hat\lambda(\{i\}) - \hat\lambda(\emptyset)`,
and interactions such as :math:`c(\{i, j\})` (Rota 1964, "On the foundations
of combinatorial theory I", for Möbius inversion; the question is posed in the
note on data symmetry and degeneracy in ``shared/seeds``).  Every
:math:`\hat\lambda(S)` comes from an independent sampler run (seed
``seed + mask(S)``), so :math:`\operatorname{Var} c(S) = \sum_{T\subseteq S}
\operatorname{Var}\hat\lambda(T)`.

One job per subset
------------------
:func:`estimate_subset` runs one cell :math:`\hat\lambda(S)` exactly as
:func:`decompose` does (same :math:`q_S`, :math:`w^*_S` and seed), so the
:math:`2^k` estimates can run as separate jobs; :func:`combine` Möbius-inverts
whatever estimates are available, marking missing subsets (their
:math:`\hat\lambda` and every :math:`c(S)` that needs them are NaN).
:func:`decompose` runs the same per-subset steps in one process, then :func:`combine`.

Joint symmetrization
--------------------
Groups that commute (:math:`gh = hg` for all elements; checked exactly for
finite groups and on Haar samples for Lie groups) generate
:math:`G_S = \prod_{i\in S} G_i` and :math:`q_S` is obtained by symmetrizing
under each factor in turn.  Finite groups that do not commute are replaced
by the finite group they generate (closure of their elements, e.g. a
reflection and a cyclic shift generate a dihedral group); a Lie group that
does not commute with another group in the subset raises ``ValueError``.
Monte-Carlo orbits of Lie groups use one generator per group
(``symmetrize_seed + i``), the same in every subset (common random numbers).

Models with exact answers
-------------------------
:class:`BlockPolarLocation`: :math:`x = (x_1, \dots, x_B) \in (\mathbb R^2)^B`,
:math:`p(x\mid w) = N(\mu(w), I)` with :math:`\mu_b = r_b(\cos\varphi_b, \sin\varphi_b)`,
SO(2) acting on each block.

* independent angles (``shared_angle=False``, :math:`d = 2B`): each block is the
  polar location model (:math:`\lambda = 1` shifted, :math:`\tfrac12` at a
  centred block), so for :math:`B = 2`: :math:`\lambda(\emptyset) = 2`,
  :math:`\lambda(\{1\}) = \lambda(\{2\}) = \tfrac32`, :math:`\lambda(\{1,2\}) = 1`,
  hence :math:`c(\{i\}) = -\tfrac12`, :math:`c(\{1,2\}) = 0`: no interaction.
* one shared angle (``shared_angle=True``, :math:`\mu_b = r_b(\cos\varphi, \sin\varphi)`,
  :math:`d = B + 1`): the model can only emulate the *joint* rotation of all
  blocks.  Centring one block leaves :math:`\varphi` pinned by the other
  (:math:`w^*` regular, :math:`\lambda = \tfrac32`); only when every block is
  centred does :math:`\varphi` become free (:math:`K = \tfrac12\sum_b r_b^2`,
  codimension 2, :math:`\lambda = 1`).  For :math:`B = 2`:
  :math:`c(\{1\}) = c(\{2\}) = 0` and :math:`c(\{1, 2\}) = 1 - \tfrac32 - \tfrac32 + \tfrac32 = -\tfrac12`,
  a pure interaction.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._runtime import autograd_allowed
from .._checks import check_real
from ..data import Data
from ..engine import default_nbeta, estimate_llc
from ..losses import LossAdapter
from ..models.base import ChainModule
from ..models.losses import gaussian_nll
from ..result import LLCResult
from .groups import FiniteGroup, Group, _closure, check_acts_on
from .operations import as_data, compress, invariance_gap, symmetrize

__all__ = [
    "LLCDecomposition",
    "SubsetEstimate",
    "decompose",
    "estimate_subset",
    "combine",
    "subset_mask",
    "mobius_inversion",
    "joint_symmetrize",
    "generated_group",
    "groups_commute",
    "BlockPolarLocation",
    "block_group",
]

_MAX_GENERATED = 10_000


# ----------------------------------------------------------------------------
# Möbius inversion
# ----------------------------------------------------------------------------
def _popcount(m: int) -> int:
    return bin(m).count("1")


def mobius_inversion(values: Tensor, variances: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    r"""Möbius inversion on the Boolean lattice of ``k`` elements.

    Parameters
    ----------
    values
        ``(2^k,)`` :math:`\lambda(S)` indexed by bitmask (bit ``i`` set iff
        :math:`i \in S`).
    variances
        Optional ``(2^k,)`` variances of independent estimates.

    Returns
    -------
    (Tensor, Tensor or None)
        :math:`c(S) = \sum_{T\subseteq S}(-1)^{|S|-|T|}\lambda(T)` and
        :math:`\operatorname{Var} c(S) = \sum_{T\subseteq S}\operatorname{Var}\lambda(T)`, ``(2^k,)``.
    """
    values = torch.as_tensor(values, dtype=torch.float64)
    N = values.shape[0]
    if values.ndim != 1 or N < 1 or N & (N - 1):
        raise ValueError(f"values must be a 1-D tensor of length 2^k, got shape {tuple(values.shape)}")
    c = torch.zeros_like(values)
    v = None if variances is None else torch.zeros_like(values)
    var = None if variances is None else torch.as_tensor(variances, dtype=torch.float64)
    for s in range(N):
        t = s
        while True:  # all submasks t of s
            sign = -1.0 if (_popcount(s) - _popcount(t)) % 2 else 1.0
            c[s] += sign * values[t]
            if v is not None:
                v[s] += var[t]  # type: ignore[index]
            if t == 0:
                break
            t = (t - 1) & s
    return c, v


# ----------------------------------------------------------------------------
# groups: commutation, generated group, joint symmetrization
# ----------------------------------------------------------------------------
def _elements_or_samples(g: Group, k: int, gen: torch.Generator) -> Tensor:
    return g.elements(dtype=torch.float64) if g.is_finite else g.sample(k, gen, dtype=torch.float64)


def groups_commute(g1: Group, g2: Group, *, num_samples: int = 16, atol: float = 1e-8) -> bool:
    r"""Whether :math:`gh = hg` for all :math:`g \in G_1, h \in G_2` (same degree).

    Exact over all element pairs for finite groups; on ``num_samples`` Haar
    samples (seeded, deterministic) for a Lie group.
    """
    if g1.degree != g2.degree:
        raise ValueError(f"{g1} and {g2} act on vectors of different lengths ({g1.degree} vs {g2.degree})")
    gen = torch.Generator().manual_seed(12345)
    a = _elements_or_samples(g1, num_samples, gen)  # (a, m, m)
    b = _elements_or_samples(g2, num_samples, gen)
    ab = torch.einsum("aij,bjk->abik", a, b)
    ba = torch.einsum("bij,ajk->abik", b, a)
    return bool(torch.allclose(ab, ba, atol=atol))


def generated_group(groups: Sequence[Group], max_order: int = _MAX_GENERATED) -> FiniteGroup:
    """The finite group generated by the elements of finite ``groups`` (closure under products).

    Raises ``ValueError`` if a group is a Lie group or the closure exceeds ``max_order``
    elements (e.g. two mirrors at an irrational angle generate an infinite group).
    """
    if not groups:
        raise ValueError("need at least one group")
    for g in groups:
        if not g.is_finite:
            raise ValueError(f"{g} is a Lie group: the generated group cannot be enumerated")
    m = groups[0].degree
    if any(g.degree != m for g in groups):
        raise ValueError("the groups act on vectors of different lengths")
    gens = torch.cat([g.elements(dtype=torch.float64) for g in groups])
    elems = _closure(gens, m, max_order, f"the group generated by {list(groups)} has more than {max_order} "
                     "elements (it may be infinite): these groups cannot be symmetrized jointly")
    return FiniteGroup(elems, name="⟨" + ", ".join(map(repr, groups)) + "⟩")


def _components(groups: Sequence[Group], commute: Mapping[tuple[int, int], bool], idx: Sequence[int]) -> list[list[int]]:
    """Connected components of the non-commutation graph on ``idx``."""
    comp: list[list[int]] = []
    seen: set[int] = set()
    for i in idx:
        if i in seen:
            continue
        stack, cc = [i], []
        seen.add(i)
        while stack:
            a = stack.pop()
            cc.append(a)
            for b in idx:
                if b not in seen and not commute[(min(a, b), max(a, b))]:
                    seen.add(b)
                    stack.append(b)
        comp.append(sorted(cc))
    return comp


def _plan(groups: Sequence[Group], idx: Sequence[int], commute: Mapping[tuple[int, int], bool]) -> list[tuple[int, Group]]:
    """The commuting factors of ⟨G_i : i ∈ idx⟩ as ``(generator index, group)``; raises if impossible."""
    out = []
    for cc in _components(groups, commute, idx):
        if len(cc) == 1:
            out.append((cc[0], groups[cc[0]]))
            continue
        lie = [i for i in cc if not groups[i].is_finite]
        if lie:
            raise ValueError(
                f"groups {[groups[i] for i in cc]} do not commute and {groups[lie[0]]} is a Lie group: "
                "the group they generate cannot be symmetrized jointly (use commuting groups, or finite ones)"
            )
        out.append((cc[0], generated_group([groups[i] for i in cc])))
    return out


def _commutation_table(groups: Sequence[Group]) -> dict[tuple[int, int], bool]:
    return {(i, j): groups_commute(groups[i], groups[j]) for i in range(len(groups)) for j in range(i + 1, len(groups))}


def joint_symmetrize(
    data: Any, groups: Sequence[Group], *, acts_on: str = "x", orbit_samples: int | None = None,
    seed: int = 0, _commute: Mapping[tuple[int, int], bool] | None = None, _index: Sequence[int] | None = None,
) -> Data:
    r"""Symmetrize ``data`` under the group generated by ``groups``.

    Commuting factors are applied in turn (:func:`slt.symmetry.symmetrize`:
    exact orbits for finite groups, merged by :func:`slt.symmetry.compress`;
    ``orbit_samples`` Haar samples per row for Lie groups, default 1: the rows are
    replicated ``orbit_samples`` times once and every Lie factor draws one Haar
    element per replicated row, so the product group is sampled with its Haar measure);
    non-commuting finite groups are replaced by their generated group.
    The Monte-Carlo orbits of group ``i`` use a generator seeded with ``seed + i``.

    Returns
    -------
    slt.Data
        With weights; row counts are not sample sizes (pass ``nbeta``).
    """
    d = as_data(data)
    groups = list(groups)
    index = list(range(len(groups))) if _index is None else list(_index)
    commute = _commute if _commute is not None else _commutation_table(groups)
    plan = _plan(groups, list(range(len(groups))), {k: v for k, v in commute.items()})
    out = d
    k = 1 if orbit_samples is None else int(orbit_samples)
    if k > 1 and any(not g.is_finite for _, g in plan):
        # replicate every row k times once; each Lie factor then draws one Haar element per
        # replicated row (independent across factors: Haar on the product group), so the row
        # count is k n however many Lie groups are in the subset
        v = d.normalized_weights()
        v = torch.full((d.n,), 1.0 / d.n, dtype=d.x.dtype if d.x.is_floating_point() else torch.float32) if v is None else v
        out = Data(d.x.repeat_interleave(k, 0), None if d.y is None else d.y.repeat_interleave(k, 0),
                   (v / k).repeat_interleave(k))
    finite_used = False
    for i, g in plan:
        gen = torch.Generator().manual_seed(int(seed) + index[i])
        out = symmetrize(out, g, generator=gen, acts_on=acts_on, num_samples=None if g.is_finite else 1)
        finite_used |= g.is_finite
    if finite_used:
        out = compress(out)
    return out


# ----------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------
def _subset_label(mask: int, names: Sequence[str]) -> str:
    if mask == 0:
        return "∅"
    return "{" + ", ".join(names[i] for i in range(len(names)) if mask >> i & 1) + "}"


def subset_mask(subset: Any, names: Sequence[str]) -> int:
    """Bitmask of a subset of the groups ``names`` (bit ``i`` set iff group ``i`` is in it).

    Parameters
    ----------
    subset
        A bitmask (``int``, ``0 <= subset < 2^k``), a group name (``str``), or an
        iterable (``frozenset``, list, ...) of group names and/or indices.
    names
        The ``k`` group names, in order.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        For a bitmask out of range, an unknown name or an index out of range.
    """
    k = len(names)
    if isinstance(subset, bool):
        raise TypeError("a subset must be a bitmask, a group name or an iterable of names/indices, not a bool")
    if isinstance(subset, int):
        if not 0 <= subset < 2**k:
            raise ValueError(f"bitmask {subset} out of range for k={k} (0 <= mask < {2**k})")
        return subset
    items = [subset] if isinstance(subset, str) else list(subset)
    m = 0
    for s in items:
        if isinstance(s, str):
            if s not in names:
                raise ValueError(f"unknown group name {s!r}: the groups are {list(names)}")
            i = list(names).index(s)
        else:
            i = int(s)
        if not 0 <= i < k:
            raise ValueError(f"group index {i} out of range for k={k}")
        m |= 1 << i
    return m


@dataclass
class LLCDecomposition:
    r"""λ̂ over the subset lattice of symmetries and its Möbius inversion.

    All arrays are indexed by subset bitmask (bit ``i`` set iff group ``i`` is in
    the subset), length :math:`2^k`.

    Attributes
    ----------
    names
        Group names, ``(k,)``.
    mode
        ``"retrained"`` (:math:`w^*_S` fitted on each :math:`q_S`) or
        ``"quenched"`` (one shared :math:`w^*`).
    llc, llc_sem
        :math:`\hat\lambda(S)` and its Monte-Carlo standard error.
    contribution, contribution_sem
        :math:`c(S)` and :math:`\sqrt{\sum_{T\subseteq S}\mathrm{sem}(T)^2}`.
    z
        Threshold in standard errors for :attr:`distinguishable`.
    invariance_gap
        :func:`slt.symmetry.invariance_gap` of :math:`q_S` under the full
        group generated by all :math:`G_i` (moments method).
    w_star
        ``(2^k, d)`` the :math:`w^*` used for each subset.
    results
        The :class:`slt.LLCResult` of each subset (``None`` where not available,
        e.g. after :func:`combine` of numbers read from disk).
    quenched
        With ``decompose(..., quenched=True)``: the quenched decomposition at
        :math:`w^*_\emptyset` (a :class:`LLCDecomposition`), else ``None``.
    missing
        Bitmasks of the subsets without an estimate (:func:`combine` of an
        incomplete set): their λ̂ and every contribution :math:`c(S)` with
        :math:`S \supseteq T` for a missing :math:`T` are NaN.
    """

    names: tuple[str, ...]
    mode: str
    llc: Tensor
    llc_sem: Tensor
    contribution: Tensor
    contribution_sem: Tensor
    z: float
    nbeta: float
    invariance_gap: Tensor
    w_star: Tensor
    results: list[LLCResult | None] = field(default_factory=list)
    quenched: "LLCDecomposition | None" = None
    missing: tuple[int, ...] = ()

    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def labels(self) -> list[str]:
        """Subset labels (``"∅"``, ``"{A}"``, ``"{A, B}"``, ...) by bitmask."""
        return [_subset_label(m, self.names) for m in range(2**self.k)]

    def mask(self, subset: Sequence[int | str] | int) -> int:
        """Bitmask of a subset given as indices or names (or a bitmask itself); see :func:`subset_mask`."""
        return subset_mask(subset, self.names)

    @property
    def complete(self) -> bool:
        """Whether every subset has an estimate (no :attr:`missing`)."""
        return not self.missing

    @property
    def defined(self) -> Tensor:
        """``(2^k,)`` bool: :math:`c(S)` is defined (no missing :math:`T \\subseteq S`)."""
        return torch.tensor([not any(t & s == t for t in self.missing) for s in range(2**self.k)])

    def llc_of(self, subset: Sequence[int | str] | int) -> tuple[float, float]:
        """``(λ̂(S), sem)``."""
        m = self.mask(subset)
        return float(self.llc[m]), float(self.llc_sem[m])

    def contribution_of(self, subset: Sequence[int | str] | int) -> tuple[float, float]:
        """``(c(S), sem)``."""
        m = self.mask(subset)
        return float(self.contribution[m]), float(self.contribution_sem[m])

    @property
    def distinguishable(self) -> Tensor:
        """``(2^k,)`` bool: :math:`|c(S)| > z\\,\\mathrm{sem}(c(S))` (distinguishable from zero)."""
        return self.contribution.abs() > self.z * self.contribution_sem

    def to_frame(self):
        """One row per subset: subset, size, λ̂, sem, c, sem, z-score, distinguishable, gap, mode."""
        import pandas as pd

        rows = []
        for m in range(2**self.k):
            c, cs = float(self.contribution[m]), float(self.contribution_sem[m])
            rows.append({
                "subset": self.labels[m], "mask": m, "size": _popcount(m), "mode": self.mode,
                "llc": float(self.llc[m]), "llc_sem": float(self.llc_sem[m]),
                "contribution": c, "contribution_sem": cs,
                "z_score": c / cs if cs > 0 else float("nan"),
                "distinguishable": bool(self.distinguishable[m]),
                "invariance_gap": float(self.invariance_gap[m]),
                "missing": m in self.missing,
            })
        return pd.DataFrame(rows)

    def __str__(self) -> str:
        lines = [f"LLC decomposition over {list(self.names)} ({self.mode}, nβ={self.nbeta:.4g}, z={self.z:g})"]
        for m in sorted(range(2**self.k), key=lambda m: (_popcount(m), m)):
            flag = "*" if bool(self.distinguishable[m]) else " "
            lam = "missing" if m in self.missing else f"{float(self.llc[m]):7.3f} ± {float(self.llc_sem[m]):.3f}"
            lines.append(
                f"  {self.labels[m]:<20} λ̂ = {lam:<15}"
                f"   c = {float(self.contribution[m]):7.3f} ± {float(self.contribution_sem[m]):.3f} {flag}"
            )
        if self.missing:
            lines.append(f"  missing: {', '.join(self.labels[m] for m in self.missing)} "
                         "(every c(S) over a missing subset is NaN)")
        return "\n".join(lines)

    def plot(self, ax=None, *, title: str | None = None):
        """Bar charts of λ̂(S) and c(S) with ±z·sem error bars (distinguishable contributions filled).

        Returns the matplotlib ``Figure``."""
        import matplotlib.pyplot as plt

        order = sorted(range(2**self.k), key=lambda m: (_popcount(m), m))
        labels = [self.labels[m] for m in order]
        if ax is None:
            fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.1 * len(order) * 2, 3.6))
        else:
            axes = ax
            fig = axes[0].figure
        xs = range(len(order))
        axes[0].bar(xs, [float(self.llc[m]) for m in order], yerr=[self.z * float(self.llc_sem[m]) for m in order],
                    color="tab:blue", alpha=0.8, capsize=3)
        axes[0].set_ylabel("λ̂(S)")
        axes[0].set_title("λ̂ on q_S")
        dist = self.distinguishable
        cols = ["tab:red" if bool(dist[m]) else "white" for m in order]
        axes[1].bar(xs, [float(self.contribution[m]) for m in order],
                    yerr=[self.z * float(self.contribution_sem[m]) for m in order],
                    color=cols, edgecolor="tab:red", capsize=3)
        axes[1].axhline(0.0, color="k", lw=0.8)
        axes[1].set_ylabel("c(S)")
        axes[1].set_title(f"Möbius contributions (filled: |c| > {self.z:g}·sem)")
        for a in axes:
            a.set_xticks(list(xs))
            a.set_xticklabels(labels, rotation=30, ha="right")
        undefined = ~self.defined
        for j, m in enumerate(order):  # no bar: say why
            if m in self.missing:
                axes[0].text(j, 0.0, "missing", rotation=90, ha="center", va="bottom", color="0.4", fontsize=8)
            if bool(undefined[m]):
                axes[1].text(j, 0.0, "n/a", ha="center", va="bottom", color="0.4", fontsize=8)
        fig.suptitle(title or f"LLC decomposition ({self.mode})")
        fig.tight_layout()
        return fig


# ----------------------------------------------------------------------------
# decompose
# ----------------------------------------------------------------------------
def _weighted_loss(loss_fn: Callable, weights: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    adapter = LossAdapter(loss_fn)

    def wl(out: Tensor, y: Tensor) -> Tensor:
        return (adapter.per_sample(out, y, 1) * weights.to(out.dtype)).sum()

    return wl


def _default_train(model: nn.Module, data: Data, loss_fn: Callable) -> None:
    """Closed form ``model.empirical_minimum(x, weights)`` when the model has one (a single
    parameter), else full-batch L-BFGS on the weighted loss (:func:`slt.training.train`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if hasattr(model, "empirical_minimum") and len(params) == 1:
        with torch.no_grad():
            params[0].copy_(model.empirical_minimum(data.x.to(params[0].dtype), data.weights))
        return
    from ..training import train

    w = data.normalized_weights()
    wts = torch.full((data.n,), 1.0 / data.n) if w is None else w
    target = data.x if data.y is None else (data.x, data.y)
    train(model, target, _weighted_loss(loss_fn, wts), steps=0, finish="lbfgs", tol=1e-9)


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters() if p.requires_grad])


@dataclass
class _Lattice:
    """Validated inputs shared by :func:`decompose` and :func:`estimate_subset`."""

    names: tuple[str, ...]
    groups: list[Group]
    data: Data
    commute: dict[tuple[int, int], bool]
    plans: dict[int, list[int]]
    full: Group | None
    nbeta: float
    model: Any
    is_module: bool
    loss: Callable
    trainer: Callable[[nn.Module, Data], Any]
    acts_on: str
    orbit_samples: int | None
    symmetrize_seed: int

    @property
    def k(self) -> int:
        return len(self.groups)

    def subset_data(self, mask: int) -> tuple[Data, float]:
        """:math:`q_S` and its invariance gap under all the groups."""
        if mask == 0:
            qS = self.data
        else:
            idx = self.plans[mask]
            qS = joint_symmetrize(
                self.data, [self.groups[i] for i in idx], acts_on=self.acts_on, orbit_samples=self.orbit_samples,
                seed=self.symmetrize_seed,
                _commute={(a, b): self.commute[(idx[a], idx[b])] for a in range(len(idx)) for b in range(a + 1, len(idx))},
                _index=idx,
            )
        return qS, _gap(qS, self.groups, self.full, self.acts_on)

    def fit(self, qS: Data, retrain: bool) -> nn.Module:
        """:math:`w^*_S`: a fresh (or copied) model trained on ``qS``, or the shared model."""
        if not retrain:
            return self.model
        m = copy.deepcopy(self.model) if self.is_module else self.model()
        self.trainer(m, qS.to("cpu", next(m.parameters()).dtype))
        return m


def _prepare(
    model: Any, data: Any, groups: Any, *, loss_fn: Any, retrain: Any, quenched: Any, train_fn: Any, nbeta: Any,
    acts_on: str, orbit_samples: Any, symmetrize_seed: int, z: Any, llc_kwargs: Mapping[str, Any],
) -> _Lattice:
    """Validate the arguments of :func:`decompose` / :func:`estimate_subset` (before any work)."""
    if isinstance(groups, Mapping):
        names = tuple(str(k) for k in groups)
        glist = list(groups.values())
    else:
        if isinstance(groups, Group):
            groups = [groups]
        glist = list(groups)
        names = tuple(f"G{i + 1}" for i in range(len(glist)))
    if not glist:
        raise ValueError("groups must contain at least one slt.symmetry.Group")
    if len(glist) > 6:
        raise ValueError(f"{len(glist)} groups give 2^{len(glist)} LLC estimates: at most 6 supported")
    for i, g in enumerate(glist):
        if not isinstance(g, Group):
            raise TypeError(f"groups[{i}] must be an slt.symmetry.Group, got {type(g).__name__}")
    d = as_data(data)
    if acts_on not in ("x", "y", "both"):
        raise ValueError(f"acts_on must be 'x', 'y' or 'both', got {acts_on!r}")
    for name, g in zip(names, glist):
        try:
            if acts_on in ("x", "both"):
                check_acts_on(g, d.x, "x")
            if acts_on in ("y", "both"):
                if d.y is None:
                    raise ValueError(f"acts_on={acts_on!r} needs targets, but the data are a single tensor")
                check_acts_on(g, d.y, "y")
        except (TypeError, ValueError) as e:
            raise type(e)(f"group {name!r} does not act on the data: {e}") from None
    if not isinstance(retrain, bool) or not isinstance(quenched, bool):
        raise TypeError("retrain and quenched must be booleans")
    is_module = isinstance(model, nn.Module)
    if not is_module and not callable(model):
        raise TypeError(f"model must be an nn.Module or a factory () -> nn.Module, got {type(model).__name__}")
    if not is_module and not retrain:
        raise ValueError("retrain=False needs a trained nn.Module (its parameters are the shared w*), not a factory")
    if not (isinstance(z, (int, float)) and z > 0):
        raise ValueError(f"z must be a positive number, got {z!r}")
    if orbit_samples is not None and (isinstance(orbit_samples, bool) or not isinstance(orbit_samples, int) or orbit_samples < 1):
        raise ValueError(f"orbit_samples must be an integer >= 1 or None, got {orbit_samples!r}")
    if "seed" in llc_kwargs or "nbeta" in llc_kwargs:
        raise ValueError("pass seed and nbeta as decompose(seed=..., nbeta=...)")
    k = len(glist)
    commute = _commutation_table(glist)
    plans = {}
    for mask in range(1, 2**k):  # every subset must be symmetrizable, whichever one is asked for
        idx = [i for i in range(k) if mask >> i & 1]
        sub = {(a, b): commute[(a, b)] for a in idx for b in idx if a < b}
        plans[mask] = idx
        _plan(glist, idx, {(a, b): sub.get((a, b), True) for a in range(k) for b in range(k) if a < b})
    nb = check_real("nbeta", default_nbeta(d.n) if nbeta is None else nbeta, positive=True)
    template = model if is_module else model()
    if not isinstance(template, nn.Module):
        raise TypeError("the model factory must return an nn.Module")
    loss = loss_fn if loss_fn is not None else getattr(template, "default_loss", None)
    if loss is None or not callable(loss):
        raise ValueError("loss_fn is required (the model defines no default_loss)")
    trainer = train_fn if train_fn is not None else (lambda m, dd: _default_train(m, dd, loss))
    full = generated_group(glist) if all(g.is_finite for g in glist) and not all(commute.values()) else None
    return _Lattice(
        names=names, groups=glist, data=d, commute=commute, plans=plans, full=full, nbeta=nb, model=model,
        is_module=is_module, loss=loss, trainer=trainer, acts_on=acts_on, orbit_samples=orbit_samples,
        symmetrize_seed=int(symmetrize_seed),
    )


@dataclass
class SubsetEstimate:
    r""":math:`\hat\lambda(S)` for one subset :math:`S` of the groups (:func:`estimate_subset`).

    Attributes
    ----------
    names
        All ``k`` group names (the lattice this subset belongs to).
    mask
        Bitmask of :math:`S` (bit ``i`` set iff group ``i`` is in it).
    mode
        ``"retrained"`` or ``"quenched"``.
    llc, llc_sem
        :math:`\hat\lambda(S)` and its Monte-Carlo standard error.
    nbeta
        The common :math:`n\beta`.
    invariance_gap
        Invariance gap of :math:`q_S` under all the groups (as in :class:`LLCDecomposition`).
    w_star
        ``(d,)`` the :math:`w^*` used.
    seed
        The sampler seed (``seed + mask``).
    result
        The :class:`slt.LLCResult` (``None`` when rebuilt from a record).
    quenched
        With ``quenched=True``: the estimate on the same :math:`q_S` at :math:`w^*_\emptyset`.
    """

    names: tuple[str, ...]
    mask: int
    mode: str
    llc: float
    llc_sem: float
    nbeta: float
    invariance_gap: float
    w_star: Tensor
    seed: int
    result: LLCResult | None = None
    quenched: "SubsetEstimate | None" = None

    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def label(self) -> str:
        """``"∅"``, ``"{A}"``, ``"{A, B}"``, ..."""
        return _subset_label(self.mask, self.names)

    @property
    def subset(self) -> frozenset[str]:
        """The names of the groups in :math:`S`."""
        return frozenset(self.names[i] for i in range(self.k) if self.mask >> i & 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON fields (no :class:`slt.LLCResult`); inverse: :meth:`from_dict`."""
        out = {"names": list(self.names), "mask": int(self.mask), "subset": self.label, "mode": self.mode,
               "llc": float(self.llc), "llc_sem": float(self.llc_sem), "nbeta": float(self.nbeta),
               "invariance_gap": float(self.invariance_gap), "w_star": self.w_star.tolist(), "seed": int(self.seed)}
        if self.quenched is not None:
            out["quenched"] = self.quenched.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SubsetEstimate":
        """Rebuild from :meth:`to_dict` (``None`` floats, as JSON stores NaN, become NaN)."""
        def f(v: Any) -> float:
            return float("nan") if v is None else float(v)

        q = d.get("quenched")
        return cls(names=tuple(d["names"]), mask=int(d["mask"]), mode=str(d["mode"]), llc=f(d["llc"]),
                   llc_sem=f(d["llc_sem"]), nbeta=f(d["nbeta"]), invariance_gap=f(d.get("invariance_gap")),
                   w_star=torch.tensor([f(v) for v in d.get("w_star", [])], dtype=torch.float64), seed=int(d["seed"]),
                   quenched=None if q is None else cls.from_dict(q))


def _estimate(lat: _Lattice, m: nn.Module, qS: Data, mask: int, gap: float, mode: str, *, seed: int,
              dtype: torch.dtype, llc_kwargs: Mapping[str, Any]) -> SubsetEstimate:
    r = estimate_llc(m, qS, lat.loss, nbeta=lat.nbeta, seed=seed + mask, dtype=dtype, **llc_kwargs)
    return SubsetEstimate(names=lat.names, mask=mask, mode=mode, llc=float(r.llc_mean), llc_sem=float(r.llc_sem),
                          nbeta=lat.nbeta, invariance_gap=float(gap), w_star=_flat(m), seed=seed + mask, result=r)


def estimate_subset(
    model: nn.Module | Callable[[], nn.Module],
    data: Any,
    groups: Sequence[Group] | Mapping[str, Group],
    subset: Any,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    retrain: bool = True,
    quenched: bool = False,
    train_fn: Callable[[nn.Module, Data], Any] | None = None,
    nbeta: float | None = None,
    acts_on: str = "x",
    orbit_samples: int | None = None,
    symmetrize_seed: int = 0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **llc_kwargs: Any,
) -> SubsetEstimate:
    r""":math:`\hat\lambda(S)` for one subset :math:`S`: one cell of :func:`decompose`.

    Builds :math:`q_S` (:func:`joint_symmetrize`), fits :math:`w^*_S` and runs
    :func:`slt.estimate_llc` with seed ``seed + mask(S)``, exactly as
    :func:`decompose` does for that subset, so the :math:`2^k` subsets can run as
    separate jobs (a sweep) and be put together with :func:`combine`.  With the
    same arguments (and a deterministic model factory and ``train_fn``), the
    numbers equal those of :func:`decompose`.

    Parameters
    ----------
    model, data, groups
        As in :func:`decompose` (all groups, not only those in :math:`S`: they name
        the lattice, fix the Monte-Carlo orbit seeds and the invariance gap).
    subset
        :math:`S`: a bitmask, a group name, or an iterable of names and/or
        indices (:func:`subset_mask`).
    loss_fn, retrain, train_fn, nbeta, acts_on, orbit_samples, symmetrize_seed, seed, dtype, **llc_kwargs
        As in :func:`decompose`.
    quenched
        With ``retrain=True``, also estimate :math:`\hat\lambda` on :math:`q_S` at
        :math:`w^*_\emptyset` (fitted on ``data``; returned as ``.quenched``).

    Returns
    -------
    SubsetEstimate
    """
    lat = _prepare(model, data, groups, loss_fn=loss_fn, retrain=retrain, quenched=quenched, train_fn=train_fn,
                   nbeta=nbeta, acts_on=acts_on, orbit_samples=orbit_samples, symmetrize_seed=symmetrize_seed, z=3.0,
                   llc_kwargs=llc_kwargs)
    mask = subset_mask(subset, lat.names)
    qS, gap = lat.subset_data(mask)
    m = lat.fit(qS, retrain)
    est = _estimate(lat, m, qS, mask, gap, "retrained" if retrain else "quenched", seed=seed, dtype=dtype,
                    llc_kwargs=llc_kwargs)
    if retrain and quenched:
        m0 = m if mask == 0 else lat.fit(lat.data, True)
        est.quenched = _estimate(lat, m0, qS, mask, gap, "quenched", seed=seed, dtype=dtype, llc_kwargs=llc_kwargs)
    return est


def _as_pair(v: Any) -> tuple[float, float]:
    if isinstance(v, SubsetEstimate):
        return v.llc, v.llc_sem
    if isinstance(v, LLCResult):
        return float(v.llc_mean), float(v.llc_sem)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise TypeError(f"an estimate must be (llc, sem), a SubsetEstimate or an LLCResult, got {v!r}") from None
    return (float("nan") if a is None else float(a)), (float("nan") if b is None else float(b))


def combine(
    estimates: Mapping[Any, Any],
    names: Sequence[str] | None = None,
    *,
    z: float = 3.0,
    mode: str | None = None,
    nbeta: float | None = None,
) -> LLCDecomposition:
    r"""Möbius inversion of per-subset estimates :math:`\hat\lambda(S)` (e.g. from a sweep).

    :math:`c(S) = \sum_{T\subseteq S}(-1)^{|S|-|T|}\hat\lambda(T)` with
    :math:`\mathrm{sem}(c(S))^2 = \sum_{T\subseteq S}\mathrm{sem}(T)^2` (independent
    runs).  Subsets without an estimate (absent, or NaN) are listed in
    :attr:`LLCDecomposition.missing`; their λ̂ and every :math:`c(S)` that needs
    them (:math:`S \supseteq T`) are NaN, the others are reported as usual.

    Parameters
    ----------
    estimates
        ``{subset: estimate}``.  A subset is a bitmask, a ``frozenset`` (or other
        iterable) of group names or indices (:func:`subset_mask`); an estimate is
        ``(llc, sem)``, a :class:`SubsetEstimate` or an :class:`slt.LLCResult`.
    names
        The ``k`` group names, in bit order.  Default: from the
        :class:`SubsetEstimate` values.
    z
        Threshold in standard errors for :attr:`LLCDecomposition.distinguishable`.
    mode
        ``"retrained"`` / ``"quenched"``; default: from the :class:`SubsetEstimate`
        values, else ``"retrained"``.
    nbeta
        Recorded :math:`n\beta`; default from the :class:`SubsetEstimate` values (NaN if unknown).

    Returns
    -------
    LLCDecomposition
        Invariance gaps and :math:`w^*` from :class:`SubsetEstimate` values (NaN
        otherwise); ``results`` the :class:`slt.LLCResult` s where known.

    Raises
    ------
    ValueError
        If ``names`` cannot be inferred, the estimates disagree on the groups, a
        subset is given twice, or ``z`` is not positive.
    """
    subs = [v for v in estimates.values() if isinstance(v, SubsetEstimate)]
    if names is None:
        if not subs:
            raise ValueError("pass names= (the group names) unless the estimates are SubsetEstimate objects")
        names = subs[0].names
    names = tuple(str(n) for n in names)
    if not names:
        raise ValueError("need at least one group name")
    if len(set(names)) != len(names):
        raise ValueError(f"group names must be distinct, got {list(names)}")
    for s in subs:
        if tuple(s.names) != names:
            raise ValueError(f"an estimate for groups {list(s.names)} cannot be combined with groups {list(names)}")
    if not (isinstance(z, (int, float)) and not isinstance(z, bool) and z > 0):
        raise ValueError(f"z must be a positive number, got {z!r}")
    k = len(names)
    N = 2**k
    by_mask: dict[int, Any] = {}
    for key, v in estimates.items():
        m = key if isinstance(key, int) and not isinstance(key, bool) else subset_mask(key, names)
        m = subset_mask(m, names)
        if m in by_mask:
            raise ValueError(f"subset {_subset_label(m, names)} is given twice")
        if isinstance(v, SubsetEstimate) and v.mask != m:
            raise ValueError(f"the estimate for {v.label} is keyed as {_subset_label(m, names)}")
        by_mask[m] = v
    llc = torch.full((N,), float("nan"), dtype=torch.float64)
    sem = torch.full((N,), float("nan"), dtype=torch.float64)
    gaps = torch.full((N,), float("nan"), dtype=torch.float64)
    for m, v in by_mask.items():
        llc[m], sem[m] = _as_pair(v)
        if isinstance(v, SubsetEstimate):
            gaps[m] = v.invariance_gap
    missing = tuple(m for m in range(N) if not (math.isfinite(float(llc[m])) and math.isfinite(float(sem[m]))))
    for m in missing:
        llc[m] = sem[m] = float("nan")
    c, var = mobius_inversion(llc, sem.square())
    dims = {int(v.w_star.numel()) for v in subs}
    dim = dims.pop() if len(dims) == 1 else 0
    w_star = torch.full((N, dim), float("nan"), dtype=torch.float64)
    for m, v in by_mask.items():
        if isinstance(v, SubsetEstimate) and dim and v.w_star.numel() == dim:
            w_star[m] = v.w_star.double()
    modes = {v.mode for v in subs}
    if mode is None:
        mode = modes.pop() if len(modes) == 1 else "retrained"
    if nbeta is None:
        nbs = {float(v.nbeta) for v in subs}
        nbeta = nbs.pop() if len(nbs) == 1 else float("nan")
    results = [by_mask[m].result if isinstance(by_mask.get(m), SubsetEstimate)
               else by_mask[m] if isinstance(by_mask.get(m), LLCResult) else None for m in range(N)]
    return LLCDecomposition(
        names=names, mode=str(mode), llc=llc, llc_sem=sem, contribution=c, contribution_sem=var.sqrt(),  # type: ignore[union-attr]
        z=float(z), nbeta=float(nbeta), invariance_gap=gaps, w_star=w_star, results=results, missing=missing,
    )


@autograd_allowed
def decompose(
    model: nn.Module | Callable[[], nn.Module],
    data: Any,
    groups: Sequence[Group] | Mapping[str, Group],
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    retrain: bool = True,
    quenched: bool = False,
    train_fn: Callable[[nn.Module, Data], Any] | None = None,
    nbeta: float | None = None,
    acts_on: str = "x",
    orbit_samples: int | None = None,
    symmetrize_seed: int = 0,
    seed: int = 0,
    z: float = 3.0,
    dtype: torch.dtype | None = None,
    **llc_kwargs: Any,
) -> LLCDecomposition:
    r"""λ̂ on every symmetrization :math:`q_S` of ``data`` and its Möbius inversion.

    For each subset :math:`S` of ``groups`` (:math:`2^k` of them):
    :math:`q_S` = ``data`` symmetrized under :math:`\langle G_i : i\in S\rangle`
    (:func:`joint_symmetrize`), :math:`w^*_S` re-trained on :math:`q_S`
    (``retrain=True``) or the shared :math:`w^*` (``retrain=False``: the
    model's own parameters), then :math:`\hat\lambda(S)` with
    :func:`slt.estimate_llc` at a common :math:`n\beta` and seed
    ``seed + mask(S)`` (independent runs).  The contributions
    :math:`c(S) = \sum_{T\subseteq S}(-1)^{|S|-|T|}\hat\lambda(T)` have
    standard errors :math:`\sqrt{\sum_{T\subseteq S}\mathrm{sem}(T)^2}`; a
    contribution is distinguishable from zero when :math:`|c| > z\,\mathrm{sem}`.

    Parameters
    ----------
    model
        An ``nn.Module`` (its parameters: :math:`w^*` when not re-trained; the
        initial point of re-training otherwise) or a factory ``() -> nn.Module``
        (a fresh model per subset; requires ``retrain=True``).
    data
        ``X``, ``(X, Y)``, ``(X, Y, weights)`` or :class:`slt.Data` (held as tensors).
    groups
        ``k >= 1`` :class:`slt.symmetry.Group` s acting on the data's trailing
        dimension, as a sequence (named ``G1, G2, ...``) or ``{name: group}``.
    loss_fn
        Mean loss; default ``model.default_loss``.
    retrain
        Re-train :math:`w^*_S` on every :math:`q_S` (``train_fn(model, data)``;
        default: ``model.empirical_minimum`` if defined, else full-batch L-BFGS).
    quenched
        With ``retrain=True``, also run the quenched decomposition at the shared
        :math:`w^*_\emptyset` (returned as ``result.quenched``).  Only meaningful
        where :math:`w^*_\emptyset` is still a minimum of every :math:`L_{q_S}`.
    nbeta
        Default :func:`slt.default_nbeta` of the number of rows of ``data``
        (the same for every subset: rows of :math:`q_S` are not samples).
    acts_on
        ``"x"``, ``"y"`` or ``"both"`` (see :func:`slt.symmetry.symmetrize`).
    orbit_samples
        Haar orbit samples per row for Lie groups (default 1).
    symmetrize_seed, seed
        Seeds of the Monte-Carlo orbits and of the sampler.
    z
        Threshold for :attr:`LLCDecomposition.distinguishable`.
    dtype
        Sampling dtype; ``None`` (default): the model's precision, as :func:`slt.estimate_llc` (float32 before
        session 44 whatever the model's).
    **llc_kwargs
        Passed to :func:`slt.estimate_llc` (``num_chains``, ``num_draws``,
        ``localization``, ``step_size``, ``batch_size``, ...).

    Returns
    -------
    LLCDecomposition

    See Also
    --------
    estimate_subset : one :math:`\hat\lambda(S)` (a job of a sweep over the subsets).
    combine : the Möbius inversion of per-subset estimates (the end of such a sweep).
    """
    lat = _prepare(model, data, groups, loss_fn=loss_fn, retrain=retrain, quenched=quenched, train_fn=train_fn,
                   nbeta=nbeta, acts_on=acts_on, orbit_samples=orbit_samples, symmetrize_seed=symmetrize_seed, z=z,
                   llc_kwargs=llc_kwargs)
    N = 2**lat.k
    cells = [lat.subset_data(mask) for mask in range(N)]  # (q_S, invariance gap)
    models = [lat.fit(cells[mask][0], retrain) for mask in range(N)]

    def run(ms: list[nn.Module], mode: str) -> LLCDecomposition:
        ests = {mask: _estimate(lat, ms[mask], cells[mask][0], mask, cells[mask][1], mode, seed=seed, dtype=dtype,
                                llc_kwargs=llc_kwargs) for mask in range(N)}
        return combine(ests, lat.names, z=float(z), mode=mode, nbeta=lat.nbeta)

    main = run(models, "retrained" if retrain else "quenched")
    if retrain and quenched:
        main.quenched = run([models[0]] * N, "quenched")
    return main


def _gap(q: Data, groups: Sequence[Group], full: Group | None, acts_on: str) -> float:
    """Invariance gap of q under all groups: the generated group if enumerated, else the sum over groups."""
    try:
        if full is not None:
            return invariance_gap(q, full, acts_on=acts_on)
        return float(sum(invariance_gap(q, g, acts_on=acts_on) for g in groups))
    except Exception:  # noqa: BLE001 - a diagnostic only
        return float("nan")


# ----------------------------------------------------------------------------
# a model with exact answers
# ----------------------------------------------------------------------------
def block_group(group: Group, block: int, num_blocks: int) -> Group:
    r"""``group`` acting on block ``block`` of ``num_blocks`` equal blocks, the identity elsewhere.

    E.g. ``block_group(SO2(), 0, 2)`` is SO(2) rotating :math:`x_1` in
    :math:`x = (x_1, x_2) \in \mathbb R^2\times\mathbb R^2`.
    """
    from .groups import DirectProduct

    if not isinstance(group, Group):
        raise TypeError(f"group must be an slt.symmetry.Group, got {type(group).__name__}")
    if not (isinstance(num_blocks, int) and num_blocks >= 1 and isinstance(block, int) and 0 <= block < num_blocks):
        raise ValueError(f"need 0 <= block < num_blocks, got block={block!r}, num_blocks={num_blocks!r}")
    trivial = FiniteGroup(torch.eye(group.degree, dtype=torch.float64).unsqueeze(0), name=f"1({group.degree})")
    return DirectProduct(*[group if b == block else trivial for b in range(num_blocks)])


class BlockPolarLocation(ChainModule):
    r""":math:`p(x\mid w) = N(\mu(w), I_{2B})` on :math:`x = (x_1, \dots, x_B) \in (\mathbb R^2)^B`.

    ``shared_angle=False``: :math:`w = (r_1, \varphi_1, \dots, r_B, \varphi_B)`,
    :math:`\mu_b = r_b(\cos\varphi_b, \sin\varphi_b)`: independent copies of
    :class:`slt.models.PolarGaussianLocation`, :math:`\lambda = \sum_b \lambda_b` with
    :math:`\lambda_b = 1` (:math:`E x_b \ne 0`) or :math:`\tfrac12` (:math:`E x_b = 0`).

    ``shared_angle=True``: :math:`w = (r_1, \dots, r_B, \varphi)`,
    :math:`\mu_b = r_b(\cos\varphi, \sin\varphi)`: :math:`\lambda = (B+1)/2`
    unless every block mean is zero, then :math:`\lambda = B/2` (see the module
    docstring: a pure interaction of the block symmetries).

    Loss: :func:`slt.models.losses.gaussian_nll` (:math:`\tfrac12\lVert x - \mu\rVert^2`).
    """

    default_loss = staticmethod(gaussian_nll)

    def __init__(self, num_blocks: int = 2, shared_angle: bool = False, *, dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        self.num_blocks, self.shared_angle = num_blocks, bool(shared_angle)
        self.event_dim = 2 * num_blocks
        d = num_blocks + 1 if shared_angle else 2 * num_blocks
        self.w = nn.Parameter(torch.zeros(d, dtype=dtype))

    @property
    def num_params(self) -> int:
        return self.w.numel()

    def mean_chains(self, params: Mapping[str, Tensor]) -> Tensor:
        """``(C, d) -> (C, 2B)``."""
        w = params["w"]
        B = self.num_blocks
        if self.shared_angle:
            r, phi = w[:, :B], w[:, B:B + 1]  # (C, B), (C, 1)
        else:
            r, phi = w[:, 0::2], w[:, 1::2]
        return torch.stack([r * torch.cos(phi), r * torch.sin(phi)], -1).reshape(w.shape[0], 2 * B)

    def forward_chains(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``(C, Bt, 2B) -> (C, Bt, 2B)``: the mean, broadcast over the batch."""
        if x.ndim != 3 or x.shape[-1] != self.event_dim:
            raise ValueError(f"expected input (C, batch, {self.event_dim}), got {tuple(x.shape)}")
        mu = self.mean_chains(params)
        return mu[:, None, :].expand(x.shape[0], x.shape[1], self.event_dim)

    @torch.no_grad()
    def empirical_minimum(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        r"""A minimiser of :math:`L_n = \tfrac12\lVert\mu(w) - \bar x\rVert^2 + \mathrm{const}`, ``(d,)``.

        Independent angles: :math:`r_b = \lVert\bar x_b\rVert`, :math:`\varphi_b = \operatorname{atan2}`.
        Shared angle: :math:`u = (\cos\varphi, \sin\varphi)` the top eigenvector of
        :math:`\sum_b \bar x_b \bar x_b^T`, :math:`r_b = \langle u, \bar x_b\rangle`.
        """
        if x.ndim != 2 or x.shape[1] != self.event_dim:
            raise ValueError(f"expected data (n, {self.event_dim}), got {tuple(x.shape)}")
        if weights is None:
            m = x.double().mean(0)
        else:
            w = weights.double()
            m = (w[:, None] * x.double()).sum(0) / w.sum()
        xb = m.reshape(self.num_blocks, 2)
        if self.shared_angle:
            evals, evecs = torch.linalg.eigh(xb.T @ xb)
            u = evecs[:, -1]
            r = xb @ u
            if float(r.sum()) < 0:
                u, r = -u, -r
            out = torch.cat([r, torch.atan2(u[1], u[0]).reshape(1)])
        else:
            r = xb.norm(dim=1)
            phi = torch.atan2(xb[:, 1], xb[:, 0])
            out = torch.stack([r, phi], 1).reshape(-1)
        return out.to(self.w.dtype)

    @property
    def learning_coefficients(self) -> dict[str, float]:
        """λ for the two cases: ``{"generic": ..., "all_centred": ...}`` (and per-block values)."""
        B = self.num_blocks
        if self.shared_angle:
            return {"generic": (B + 1) / 2, "all_centred": B / 2}
        return {"generic": float(B), "all_centred": B / 2, "per_centred_block": -0.5}
