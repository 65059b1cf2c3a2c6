r"""Superposition geometry: feature dimensionality, direct sums, k-gons.

A toy model of superposition (:mod:`slt.models.tms`) stores feature :math:`i`
as the column :math:`W_i \in \mathbb{R}^m` of :math:`W \in \mathbb{R}^{m\times n}`.
This module describes the configuration of those columns.

* **Feature dimensionality** (Elhage et al. 2022, "Toy Models of
  Superposition", section "Feature Dimensionality"): the fraction of a
  dimension feature :math:`i` gets,

  .. math:: D_i = \frac{\lVert W_i\rVert^2}{\sum_j (\hat W_i\cdot W_j)^2}
            = \frac{\lVert W_i\rVert^4}{\sum_j (W_i\cdot W_j)^2},
            \qquad \hat W_i = W_i / \lVert W_i\rVert ,

  (:func:`feature_dimensionality`; 1 for a feature with a dimension of its own,
  1/2 for an antipodal pair, 2/3 for a triangle, 2/5 for a pentagon) and the
  model-level "dimensions per feature" :math:`D^* = m / \lVert W\rVert_F^2`
  (:func:`model_dimensionality`).

* **Direct-sum (tegum-product) decomposition** (:func:`direct_sum_decomposition`):
  Elhage et al. observe that features "come in direct sums": the columns split
  into groups whose spans are mutually orthogonal (a triangular bipyramid is
  a triangle ⊕ an antipodal pair, an octahedron three antipodal pairs), and
  within a summand the feature dimensionalities follow that summand alone
  (3 × 2/3 and 2 × 1/2 instead of 5 × 3/5).  Each subspace is represented by
  its orthogonal projector :math:`P = AA^\top` with :math:`A` an orthonormal
  basis from the SVD -- a point of the Grassmannian that, unlike a
  column-reduced basis, does not depend on a pivot choice and so moves
  continuously under perturbation (J. Pfeifle, "Toy models of superposition:
  clustering using the Grassmannian", Topological ML seminar, Barcelona 2022).

* **Grassmannian clustering** (:func:`grassmannian_clusters`): the k-planes
  spanned by all k-subsets of features, clustered by chordal distance
  :math:`d(P, Q) = \lVert P - Q\rVert_F/\sqrt2` -- the "Hough transform"
  search for planes that hold many features (Pfeifle 2022).

* **Critical-point classification** (:func:`classify_point`): the k-gon naming
  of Chen et al. 2023 (regular polygons in a plane, dead columns, "+" for a dead
  column with positive bias; this part is :func:`slt.models.classify_tms_point`,
  reused as is) extended by the feature dimensionalities and, for
  non-planar configurations (:math:`m > 2`), the direct-sum decomposition.

All functions take tensors or array-likes, compute in float64 on the CPU, and
raise ``ValueError``/``TypeError`` naming the problem on bad input.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .models.tms import classify_tms_point

__all__ = [
    "feature_dimensionality",
    "model_dimensionality",
    "subspace_projector",
    "chordal_distance",
    "Summand",
    "DirectSumDecomposition",
    "direct_sum_decomposition",
    "GrassmannianCluster",
    "grassmannian_clusters",
    "classify_point",
    "square_antiprism",
]


# ----------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------
def _as_float_tensor(x: Any, name: str) -> Tensor:
    """``x`` as a floating tensor (integers become float64); rejects complex,
    bool and non-numeric input and non-finite entries."""
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a tensor or array-like of real numbers, got {type(x).__name__}") from e
    if t.is_complex():
        raise TypeError(f"{name} must be real, got dtype {t.dtype}")
    if t.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite entries")
    return t


def _check_W(W: Any, *, batched: bool, name: str = "W") -> Tensor:
    t = _as_float_tensor(W, name)
    if batched:
        if t.ndim < 2:
            raise ValueError(f"{name} must have shape (..., m, n) with m hidden dims and n features, "
                             f"got {tuple(t.shape)}")
    elif t.ndim != 2:
        raise ValueError(f"{name} must have shape (m, n) (m hidden dims, n feature columns), got {tuple(t.shape)}")
    if t.shape[-1] == 0 or t.shape[-2] == 0:
        raise ValueError(f"{name} must have at least one hidden dimension and one feature, got {tuple(t.shape)}")
    return t


def _check_unit_interval(name: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a number in (0, 1), got {v!r}") from e
    if not 0.0 < f < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {v!r}")
    return f


def _check_pos_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be a positive int, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be a positive int, got {v}")
    return v


# ----------------------------------------------------------------------------
# feature dimensionality
# ----------------------------------------------------------------------------
def feature_dimensionality(W: Tensor) -> Tensor:
    r"""Per-feature dimensionality (Elhage et al. 2022).

    .. math:: D_i = \frac{\lVert W_i\rVert^2}{\sum_{j=1}^n (\hat W_i\cdot W_j)^2}
              = \frac{\lVert W_i\rVert^4}{\sum_j (W_i\cdot W_j)^2} \in [0, 1],

    where the :math:`j = i` term of the sum is :math:`\lVert W_i\rVert^2`, so
    :math:`D_i = 1` exactly when :math:`W_i` is orthogonal to every other
    column.  A zero column has :math:`D_i = 0` (the limit as
    :math:`W_i \to 0`).  :math:`D` is invariant under rotations of the hidden
    space and under a common rescaling of :math:`W`.

    Examples: orthogonal features 1; an antipodal pair 1/2 each; a regular
    k-gon of equal-length columns in a plane :math:`2/k` each (triangle 2/3,
    pentagon 2/5); a triangular bipyramid 2/3 (triangle) and 1/2 (poles).

    Parameters
    ----------
    W
        ``(..., m, n)``: columns are the feature vectors; any leading batch
        (e.g. chain or checkpoint) dimensions are kept.

    Returns
    -------
    Tensor
        ``(..., n)``, in ``W``'s floating dtype.
    """
    W = _check_W(W, batched=True)
    # rescale each matrix by its largest entry (D is scale invariant) so that
    # ||W_i||^4 neither underflows nor overflows
    scale = W.abs().amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    Ws = W / torch.where(scale > 0, scale, torch.ones_like(scale))
    gram = Ws.transpose(-2, -1) @ Ws  # (..., n, n): W_i . W_j
    sq = torch.diagonal(gram, dim1=-2, dim2=-1)  # (..., n): ||W_i||^2
    denom = (gram**2).sum(-1)  # (..., n), >= ||W_i||^4, zero iff W_i = 0
    live = denom > 0
    return torch.where(live, sq**2 / torch.where(live, denom, torch.ones_like(denom)), torch.zeros_like(sq))


def model_dimensionality(W: Tensor) -> Tensor:
    r"""Model-level dimensions per feature :math:`D^* = m / \lVert W\rVert_F^2`
    (Elhage et al. 2022; :math:`\lVert W\rVert_F^2` counts the features the
    model represents, weighted by their squared norm).

    Parameters
    ----------
    W
        ``(..., m, n)``.

    Returns
    -------
    Tensor
        ``(...,)``; ``inf`` where :math:`W = 0`.
    """
    W = _check_W(W, batched=True)
    m = W.shape[-2]
    return m / (W**2).sum(dim=(-2, -1))


# ----------------------------------------------------------------------------
# projectors and chordal distance
# ----------------------------------------------------------------------------
def _basis(V: Tensor, rank_tol: float, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """Orthonormal basis ``(m, r)`` of the numerical span of the columns of
    ``V`` ``(m, k)`` (left singular vectors with ``s_i > rank_tol * s_1``, or
    the top ``rank``) and all singular values."""
    U, s, _ = torch.linalg.svd(V, full_matrices=False)
    if rank is None:
        r = int((s > rank_tol * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    else:
        r = min(rank, s.numel())
    return U[:, :r], s


def subspace_projector(V: Tensor, rank: int | None = None, rank_tol: float = 1e-8) -> Tensor:
    r"""Orthogonal projector onto the span of the columns of ``V``.

    :math:`P = A A^\top` with :math:`A` the left singular vectors of ``V``
    whose singular values exceed ``rank_tol`` times the largest one (or the
    top ``rank`` of them).  :math:`P` is symmetric, idempotent, has trace equal
    to the dimension of the span, and depends only on the subspace, not on the
    basis (so it is the unique representative of the subspace in the
    projector embedding of the Grassmannian; Pfeifle 2022).

    Parameters
    ----------
    V
        ``(..., m, k)``: ``k`` vectors in :math:`\mathbb{R}^m` (batched).
    rank
        Fixed dimension of the subspace (the top ``rank`` singular
        directions); ``None`` uses the numerical rank.
    rank_tol
        Relative singular-value threshold for the numerical rank.

    Returns
    -------
    Tensor
        ``(..., m, m)``, float64.
    """
    V = _check_W(V, batched=True, name="V").to(torch.float64)
    if rank is not None:
        rank = _check_pos_int("rank", rank)
    rank_tol = _check_unit_interval("rank_tol", rank_tol)
    U, s, _ = torch.linalg.svd(V, full_matrices=False)  # U (..., m, q), s (..., q)
    if rank is not None:
        keep = torch.arange(s.shape[-1]) < rank  # (q,)
        keep = keep.expand_as(s) & (s > 0)
    else:
        keep = (s > rank_tol * s[..., :1]) & (s > 0)
    A = U * keep.unsqueeze(-2).to(U.dtype)  # zero out dropped directions
    return A @ A.transpose(-2, -1)


def chordal_distance(P: Tensor, Q: Tensor) -> Tensor:
    r"""Chordal distance :math:`d(P, Q) = \lVert P - Q\rVert_F / \sqrt2`
    between orthogonal projectors (Conway, Hardin & Sloane 1996, "Packing
    lines, planes, etc."; the distance of the projector embedding of the
    Grassmannian used by Pfeifle 2022).

    For subspaces of equal dimension :math:`k` with principal angles
    :math:`\theta_i`, :math:`d^2 = \sum_i \sin^2\theta_i \in [0, k]`; for two
    lines with :math:`|\cos\theta| = c`, :math:`d = \sqrt{1 - c^2}` (0 for the
    same line, 1 for orthogonal lines).

    Parameters
    ----------
    P, Q
        ``(..., m, m)`` projectors (broadcast against each other).

    Returns
    -------
    Tensor
        ``(...)``.
    """
    P = _as_float_tensor(P, "P")
    Q = _as_float_tensor(Q, "Q")
    if P.ndim < 2 or Q.ndim < 2 or P.shape[-1] != P.shape[-2] or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"P and Q must be square (..., m, m) projectors, got {tuple(P.shape)} and {tuple(Q.shape)}")
    if P.shape[-1] != Q.shape[-1]:
        raise ValueError(f"P and Q must act on the same space, got {tuple(P.shape)} and {tuple(Q.shape)}")
    dt = torch.promote_types(P.dtype, Q.dtype)
    return torch.linalg.matrix_norm(P.to(dt) - Q.to(dt)) / math.sqrt(2.0)


# ----------------------------------------------------------------------------
# direct-sum decomposition
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Summand:
    """One summand of a direct-sum decomposition.

    Attributes
    ----------
    features
        Indices of the columns of ``W`` in this summand (ascending).
    dim
        Dimension of their (numerical) span.
    label
        ``"1-gon"`` (a feature alone on its line), ``"2-gon"`` (an antipodal
        pair), ``"k-gon"`` (a regular polygon in a plane, Chen et al.'s
        naming), ``"tetrahedron"`` / ``"d-simplex"`` (a regular simplex),
        ``"square antiprism"`` (8 features in 3 dims, :func:`square_antiprism`), or
        ``"k features in d dims"`` otherwise.
    projector
        ``(m, m)`` orthogonal projector onto the span.
    singular_values
        Of the summand's columns, descending (the gap after ``dim`` shows how
        clear-cut the dimension is).
    """

    features: tuple[int, ...]
    dim: int
    label: str
    projector: Tensor = field(repr=False)
    singular_values: tuple[float, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "dim": self.dim, "label": self.label,
                "singular_values": list(self.singular_values)}


@dataclass(frozen=True)
class DirectSumDecomposition:
    r"""Result of :func:`direct_sum_decomposition`.

    Attributes
    ----------
    summands
        The finest partition of the live features into groups with mutually
        orthogonal spans, ordered by their smallest feature index.
    dead
        Columns excluded as (near-)zero.
    residual
        :math:`\max |\cos(W_i, W_j)|` over live features in different summands
        (0 for an exact direct sum; 0 if there is one summand).
    subspace_residual
        :math:`\lVert B^\top B - I\rVert_2` with :math:`B` the concatenated
        orthonormal bases of all summands: 0 exactly when the summands' spans
        are mutually orthogonal, at least the largest cross-summand
        :math:`|\cos|` of principal angles, and at least 1 when the dimensions
        add up to more than :math:`m` (then no direct sum is possible and the
        split only reflects near-orthogonality below ``tol``).
    tol, rank_tol, dead_tol
        The thresholds used.
    """

    summands: tuple[Summand, ...]
    dead: tuple[int, ...]
    residual: float
    subspace_residual: float
    n_hidden: int
    tol: float
    rank_tol: float
    dead_tol: float

    @property
    def is_direct_sum(self) -> bool:
        """More than one summand and the dimensions fit in :math:`\\mathbb{R}^m`."""
        return len(self.summands) > 1 and self.total_dim <= self.n_hidden

    @property
    def total_dim(self) -> int:
        return sum(s.dim for s in self.summands)

    @property
    def partition(self) -> list[list[int]]:
        """Summands as lists of feature indices."""
        return [list(s.features) for s in self.summands]

    @property
    def dims(self) -> list[int]:
        return [s.dim for s in self.summands]

    @property
    def name(self) -> str:
        """Summand labels joined by ``" ⊕ "`` (e.g. ``"3-gon ⊕ 2-gon"`` for a
        triangular bipyramid); ``""`` when no feature is live."""
        return " ⊕ ".join(s.label for s in self.summands)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (projectors left out)."""
        return {
            "name": self.name,
            "summands": [s.to_dict() for s in self.summands],
            "dead": list(self.dead),
            "residual": self.residual,
            "subspace_residual": self.subspace_residual,
            "total_dim": self.total_dim,
            "is_direct_sum": self.is_direct_sum,
            "tol": self.tol,
            "rank_tol": self.rank_tol,
            "dead_tol": self.dead_tol,
        }


def _components(adj: Tensor) -> list[list[int]]:
    """Connected components of a symmetric boolean adjacency ``(k, k)``,
    each sorted, ordered by smallest member."""
    k = adj.shape[0]
    seen = [False] * k
    comps: list[list[int]] = []
    for start in range(k):
        if seen[start]:
            continue
        seen[start] = True
        stack, comp = [start], []
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in torch.nonzero(adj[i]).flatten().tolist():
                if not seen[j]:
                    seen[j] = True
                    stack.append(j)
        comps.append(sorted(comp))
    return comps


def _label(V: Tensor, dim: int, tol: float) -> str:
    """Name of a summand with columns ``V`` ``(m, k)`` spanning ``dim`` dims."""
    k = V.shape[1]
    norms = V.norm(dim=0)
    equal_lengths = bool(((norms / norms.mean() - 1).abs() <= tol).all())
    if dim == 1:
        if k == 1:
            return "1-gon"
        if k == 2 and equal_lengths and float(V[:, 0] @ V[:, 1]) < 0:
            return "2-gon"
    elif dim == 2 and k >= 3:
        # the planar regular-polygon test of classify_tms_point (zero biases)
        info = classify_tms_point(V, torch.zeros(k, dtype=V.dtype), tol=tol, dead_tol=0.5)
        if info["regular"] and info["k"] == k:
            return f"{k}-gon"
    elif dim >= 3 and k == dim + 1 and equal_lengths:
        u = V / norms
        off = (u.T @ u)[~torch.eye(k, dtype=torch.bool)]
        if bool(((off + 1.0 / dim).abs() <= tol).all()):
            return "tetrahedron" if dim == 3 else f"{dim}-simplex"
    if dim == 3 and k == 8 and equal_lengths:
        # every vertex sees the others at the cosines of the square antiprism with D_i = 3/8
        u = V / norms
        profile = torch.sort(u.T @ u, dim=1).values  # (8, 8), one sorted row per vertex
        ideal = _square_antiprism_profile().to(profile.dtype)
        if bool(((profile - ideal).abs() <= min(tol, 0.1)).all()):
            return "square antiprism"
    return f"{k} features in {dim} dims"


def square_antiprism() -> Tensor:
    r"""The 8 unit vectors of the square antiprism with feature dimensionality 3/8, ``(3, 8)``.

    Two squares at heights :math:`\pm h`, the lower one turned by 45°, with
    :math:`h = 1/\sqrt3`: then :math:`\sum_j (\hat W_i\cdot W_j)^2 = 8/3` for
    every vertex, i.e. :math:`D_i = 3/8`, the plateau Elhage et al. (2022)
    attribute to square antiprisms.
    """
    h = 1.0 / math.sqrt(3.0)
    r = math.sqrt(1.0 - h * h)
    cols = []
    for j in range(4):
        a = math.pi / 2 * j
        cols.append([r * math.cos(a), r * math.sin(a), h])
        cols.append([r * math.cos(a + math.pi / 4), r * math.sin(a + math.pi / 4), -h])
    return torch.tensor(cols, dtype=torch.float64).T


def _square_antiprism_profile() -> Tensor:
    """Sorted cosines each vertex of :func:`square_antiprism` sees (the same for all 8), ``(8, 8)``."""
    u = square_antiprism()
    return torch.sort(u.T @ u, dim=1).values


def direct_sum_decomposition(
    W: Tensor,
    *,
    tol: float = 0.1,
    rank_tol: float = 0.1,
    dead_tol: float = 0.1,
) -> DirectSumDecomposition:
    r"""Split a feature configuration into mutually orthogonal summands.

    A configuration of vectors :math:`W_1, \dots, W_n \in \mathbb{R}^m` is a
    direct (tegum) sum of the groups :math:`G_1, \dots, G_r` when
    :math:`\mathbb{R}^m \supseteq \bigoplus_g \operatorname{span}(W_{G_g})`
    with mutually orthogonal spans, i.e. :math:`P_g P_h = 0` for the
    projectors onto the spans.  Since two spans are orthogonal exactly when
    every vector of one is orthogonal to every vector of the other, the finest
    such partition is given by the connected components of the
    *non-orthogonality graph* (edge :math:`i \sim j` when
    :math:`W_i\cdot W_j \ne 0`).  In projector language: the rank-one
    projectors :math:`P_i = \hat W_i \hat W_i^\top` are at chordal distance
    :math:`\sqrt{1 - \cos^2(W_i, W_j)}`, orthogonal lines at the maximal
    distance 1, and the components are the single-linkage clusters of the
    lines at that threshold.

    With noise, "orthogonal" means :math:`|\cos(W_i, W_j)| \le` ``tol``
    (equivalently chordal distance :math:`\ge \sqrt{1 - \mathrm{tol}^2}`).
    After the graph step, an agglomerative step merges any two groups whose
    spans (numerical rank with ``rank_tol``) are not orthogonal within
    ``tol`` (largest cosine of principal angles
    :math:`\lVert A_g^\top A_h\rVert_2 > \mathrm{tol}`), until none are left.
    For an exact direct sum this step changes nothing; with noise it prevents
    a split between spans that are not orthogonal although each pair of
    features nearly is.

    Threshold basis: the default ``tol = 0.1`` separates i.i.d. noise of
    per-coordinate size :math:`\sigma` on unit columns (cross-summand
    :math:`|\cos| \approx \sqrt2\sigma`, i.e. :math:`\le 0.1` for
    :math:`\sigma \lesssim 0.02` with a few standard deviations to spare) from
    the within-summand cosines of the configurations TMS produces (triangle
    0.5, pentagon 0.31, hexagon 0.5, heptagon 0.62 between neighbours, 0.22 for
    next-neighbours).  Note that :math:`k > 1/\mathrm{tol} + 1` unit vectors
    can be pairwise within ``tol`` of orthogonal in high dimension although
    they are not linearly independent (superposition!): then the summand
    dimensions add up to more than :math:`m`, ``subspace_residual`` is
    :math:`\ge 1` and ``is_direct_sum`` is False.

    Parameters
    ----------
    W
        ``(m, n)``: feature columns (one configuration; loop over a batch).
    tol
        Orthogonality threshold on :math:`|\cos|`, in (0, 1); also the
        regularity tolerance for the summand labels.
    rank_tol
        A summand's dimension counts singular values above ``rank_tol`` times
        its largest one.
    dead_tol
        Columns shorter than ``dead_tol`` times the longest are dead (left
        out), as in :func:`slt.models.classify_tms_point`.

    Returns
    -------
    DirectSumDecomposition
    """
    W = _check_W(W, batched=False).to(torch.float64).cpu()
    tol = _check_unit_interval("tol", tol)
    rank_tol = _check_unit_interval("rank_tol", rank_tol)
    dead_tol = _check_unit_interval("dead_tol", dead_tol)
    m, n = W.shape
    norms = W.norm(dim=0)
    nmax = float(norms.max())
    live = [i for i in range(n) if nmax > 0 and float(norms[i]) >= dead_tol * nmax]
    dead = tuple(i for i in range(n) if i not in live)
    if not live:
        return DirectSumDecomposition((), dead, 0.0, 0.0, m, tol, rank_tol, dead_tol)
    Wl = W[:, live]  # (m, k)
    unit = Wl / norms[live]
    abscos = (unit.T @ unit).abs()  # (k, k)
    groups = _components(abscos > tol)

    # agglomerative step: merge groups whose spans are not orthogonal within tol
    def basis(g: list[int]) -> Tensor:
        return _basis(Wl[:, g], rank_tol)[0]

    bases = [basis(g) for g in groups]
    while len(groups) > 1:
        best, pair = tol, None
        for a, c in itertools.combinations(range(len(groups)), 2):
            if bases[a].shape[1] == 0 or bases[c].shape[1] == 0:
                continue
            cross = float(torch.linalg.matrix_norm(bases[a].T @ bases[c], ord=2))
            if cross > best:
                best, pair = cross, (a, c)
        if pair is None:
            break
        a, c = pair
        groups[a] = sorted(groups[a] + groups[c])
        bases[a] = basis(groups[a])
        del groups[c], bases[c]
    order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    groups = [groups[g] for g in order]
    bases = [bases[g] for g in order]

    summands = []
    for g, A in zip(groups, bases):
        s = torch.linalg.svdvals(Wl[:, g])
        summands.append(Summand(
            features=tuple(live[i] for i in g),
            dim=A.shape[1],
            label=_label(Wl[:, g], A.shape[1], tol),
            projector=A @ A.T,
            singular_values=tuple(s.tolist()),
        ))
    membership = torch.empty(len(live), dtype=torch.long)
    for gi, g in enumerate(groups):
        membership[g] = gi
    cross_mask = membership[:, None] != membership[None, :]
    residual = float(abscos[cross_mask].max()) if bool(cross_mask.any()) else 0.0
    B = torch.cat(bases, dim=1)  # (m, total_dim)
    subspace_residual = float(torch.linalg.matrix_norm(B.T @ B - torch.eye(B.shape[1], dtype=B.dtype), ord=2))
    return DirectSumDecomposition(tuple(summands), dead, residual, subspace_residual, m, tol, rank_tol, dead_tol)


# ----------------------------------------------------------------------------
# Grassmannian clustering of k-planes
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class GrassmannianCluster:
    """A cluster of k-planes spanned by k-subsets of features.

    Attributes
    ----------
    k
        Dimension of the planes.
    subsets
        The feature subsets (index tuples) whose spans fall in the cluster.
    features
        Union of the subsets (ascending): the features lying (nearly) in the
        cluster's plane.
    projector
        ``(m, m)`` projector onto the cluster's plane: the top-k eigenvectors
        of the members' mean projector.
    spread
        Largest chordal distance from a member's projector to ``projector``.
    """

    k: int
    subsets: tuple[tuple[int, ...], ...]
    features: tuple[int, ...]
    projector: Tensor = field(repr=False)
    spread: float

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "subsets": [list(s) for s in self.subsets], "features": list(self.features),
                "spread": self.spread}


def _dbscan(dist: Tensor, eps: float, min_samples: int) -> list[list[int]]:
    """DBSCAN (Ester et al. 1996) on a precomputed distance matrix: core points
    have at least ``min_samples`` points (themselves included) within ``eps``;
    clusters are the connected components of cores (linked within ``eps``) plus
    the non-core points within ``eps`` of one of their cores; the remaining
    points are noise and dropped."""
    nb = dist <= eps  # (N, N)
    core = nb.sum(1) >= min_samples
    comps = _components(nb & core[:, None] & core[None, :])
    clusters: list[list[int]] = []
    taken = torch.zeros(dist.shape[0], dtype=torch.bool)
    for comp in comps:
        if not bool(core[comp[0]]):
            continue
        members = set(comp)
        taken[comp] = True
        border = torch.nonzero(nb[comp].any(0) & ~core & ~taken).flatten().tolist()
        taken[border] = True
        members.update(border)
        clusters.append(sorted(members))
    return clusters


def grassmannian_clusters(
    W: Tensor,
    k: int,
    *,
    eps: float = 0.1,
    min_samples: int = 2,
    rank_tol: float = 0.1,
    dead_tol: float = 0.1,
    max_subsets: int = 2000,
) -> list[GrassmannianCluster]:
    r"""Cluster the k-planes spanned by k-subsets of features (Pfeifle 2022).

    For every k-subset :math:`S` of live features whose vectors span
    :math:`k` dimensions (:math:`s_k > \mathrm{rank\_tol}\, s_1`), the plane
    is represented by its projector :math:`P_S = A A^\top` (:math:`A` the top-k
    left singular vectors of :math:`W_S`); the projectors are clustered by the
    chordal distance :math:`\lVert P_S - P_T\rVert_F / \sqrt2` with DBSCAN
    (``eps``, ``min_samples``).  A plane holding :math:`r \ge k` features
    collects the :math:`\binom{r}{k}` subsets inside it, so big clusters are
    the planes of the summands (a pentagon's plane: 10 pairs); planes through
    one vector and an antipodal pair ("pyramid" clusters: 2 pairs) also
    appear.  Singletons (planes spanned by one subset only) are noise and
    dropped, as in the talk.

    Threshold basis: the default ``eps = 0.1`` is an angle of about
    0.1 rad between planes, far above the plane jitter from per-coordinate
    noise :math:`\sigma = 0.01` on unit features (about :math:`\sigma/\sin`
    of the angle between the two features) and far below the distance of
    distinct planes of a symmetric configuration (at least
    :math:`\sin 36^\circ \approx 0.59` for two planes through a pentagon's
    normal).

    Parameters
    ----------
    W
        ``(m, n)``.
    k
        Plane dimension, :math:`1 \le k \le m`.
    eps, min_samples
        DBSCAN radius (chordal distance) and minimum neighbourhood size
        (including the point itself).
    rank_tol, dead_tol
        As in :func:`direct_sum_decomposition`.
    max_subsets
        Refuse to enumerate more than this many subsets (the distance matrix
        is quadratic in their number).

    Returns
    -------
    list of GrassmannianCluster
        Ordered by number of subsets, then number of features (largest first).
    """
    W = _check_W(W, batched=False).to(torch.float64).cpu()
    k = _check_pos_int("k", k)
    m, n = W.shape
    if k > m:
        raise ValueError(f"k must be at most the number of hidden dims m = {m}, got {k}")
    eps = _check_unit_interval("eps", eps)
    min_samples = _check_pos_int("min_samples", min_samples)
    rank_tol = _check_unit_interval("rank_tol", rank_tol)
    dead_tol = _check_unit_interval("dead_tol", dead_tol)
    max_subsets = _check_pos_int("max_subsets", max_subsets)
    norms = W.norm(dim=0)
    nmax = float(norms.max())
    live = [i for i in range(n) if nmax > 0 and float(norms[i]) >= dead_tol * nmax]
    n_sub = math.comb(len(live), k)
    if n_sub > max_subsets:
        raise ValueError(f"{n_sub} subsets of size {k} of {len(live)} live features exceed max_subsets = "
                         f"{max_subsets}; raise max_subsets or lower k")
    unit = W / torch.where(norms > 0, norms, torch.ones_like(norms))
    subsets: list[tuple[int, ...]] = []
    projs: list[Tensor] = []
    for S in itertools.combinations(live, k):
        A, _ = _basis(unit[:, list(S)], rank_tol)
        if A.shape[1] == k:  # skip degenerate subsets (e.g. an antipodal pair for k = 2)
            subsets.append(S)
            projs.append(A @ A.T)
    if not subsets:
        return []
    P = torch.stack(projs)  # (N, m, m)
    flat = P.reshape(len(subsets), -1)
    dist = torch.cdist(flat, flat) / math.sqrt(2.0)  # (N, N) chordal distances
    out = []
    for members in _dbscan(dist, eps, min_samples):
        Pm = P[members].mean(0)
        _, evecs = torch.linalg.eigh(Pm)  # ascending eigenvalues
        A = evecs[:, -k:]
        Pc = A @ A.T
        spread = float(chordal_distance(P[members], Pc).max())
        subs = tuple(subsets[i] for i in members)
        feats = tuple(sorted({f for S in subs for f in S}))
        out.append(GrassmannianCluster(k, subs, feats, Pc, spread))
    out.sort(key=lambda c: (-len(c.subsets), -len(c.features), c.features))
    return out


# ----------------------------------------------------------------------------
# classification of a TMS point
# ----------------------------------------------------------------------------
def classify_point(
    W: Tensor,
    b: Tensor,
    *,
    tol: float = 1e-2,
    ortho_tol: float = 0.1,
    rank_tol: float = 0.1,
    dead_tol: float = 0.1,
) -> dict[str, Any]:
    r"""Classify a TMS parameter :math:`(W, b)` for any number of hidden dims.

    The planar part is :func:`slt.models.classify_tms_point` (Chen et al.
    2023): live and dead columns, dead columns with positive/negative bias,
    antipodal pairs, and the name ``"{k}-gon"`` plus one ``"+"`` per dead
    column with positive bias when the live columns form a regular polygon
    with equal biases.  All its keys are returned unchanged.  Added:

    * ``feature_dimensionality``: :math:`D_i` for every column
      (:func:`feature_dimensionality`), ``model_dimensionality``:
      :math:`m / \lVert W\rVert_F^2`;
    * ``decomposition``: :meth:`DirectSumDecomposition.to_dict` of the live
      columns (:func:`direct_sum_decomposition` with ``ortho_tol``,
      ``rank_tol``, ``dead_tol``), ``summands`` (feature index lists),
      ``direct_sum`` (bool);
    * ``name``: the polygon name when the live columns are a regular polygon
      with equal biases within ``tol`` (so a square stays ``"4-gon"``
      although it is ``2-gon ⊕ 2-gon``); otherwise, when every summand of
      the decomposition has a recognised label (k-gon, tetrahedron/simplex),
      the decomposition name -- in parentheses when it has several summands
      -- followed by one ``"+"`` per positive-bias dead column: ``"6-gon"``
      for a trained hexagon whose biases differ by more than ``tol`` (finite
      data), ``"(3-gon ⊕ 2-gon)"`` for a triangular bipyramid,
      ``"(1-gon ⊕ 1-gon)"`` for two orthogonal features, ``"tetrahedron+"``;
      ``None`` otherwise.  So ``name`` never contradicts ``decomposition``
      (which names only the geometry of :math:`W`; biases may differ between
      and within summands: see ``equal_biases`` and ``regular``).

    Parameters
    ----------
    W, b
        ``(m, n)`` and ``(n,)``.
    tol
        Regularity tolerance of :func:`slt.models.classify_tms_point`.
    ortho_tol, rank_tol, dead_tol
        For :func:`direct_sum_decomposition` (``dead_tol`` for both).

    Returns
    -------
    dict
    """
    W = _check_W(W, batched=False).to(torch.float64).cpu()
    b = _as_float_tensor(b, "b").to(torch.float64).cpu()
    if b.ndim != 1 or b.shape[0] != W.shape[1]:
        raise ValueError(f"b must have shape ({W.shape[1]},) to match W {tuple(W.shape)}, got {tuple(b.shape)}")
    info = classify_tms_point(W, b, tol=tol, dead_tol=dead_tol)
    dec = direct_sum_decomposition(W, tol=ortho_tol, rank_tol=rank_tol, dead_tol=dead_tol)
    info["feature_dimensionality"] = feature_dimensionality(W).tolist()
    info["model_dimensionality"] = float(model_dimensionality(W))
    info["decomposition"] = dec.to_dict()
    info["summands"] = dec.partition
    info["direct_sum"] = dec.is_direct_sum
    recognised = bool(dec.summands) and all(" features in " not in s.label for s in dec.summands)
    if info["name"] is None and recognised:
        core = dec.name if len(dec.summands) == 1 else f"({dec.name})"
        info["name"] = core + "+" * len(info["dead_positive_bias"])
    return info
