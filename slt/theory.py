"""Closed-form (true) learning coefficients.

This module collects the exact values of the (local) learning coefficient
``λ`` (the real log canonical threshold, RLCT) that are known in closed form
for a handful of models. They are the ground truth against which the
estimators of this package are tested and benchmarked.

Everything here is pure Python (``math``, ``fractions``, ``itertools``); no
torch is needed. Results are returned as ``float``; where the formula is a
rational number it is evaluated exactly with :class:`fractions.Fraction`
before the final conversion.

Conventions
-----------
* The learning coefficient ``λ`` is the leading coefficient of the free
  energy, ``F_n = n L_n(w_0) + λ log n - (m - 1) log log n + O_p(1)``, with
  ``m`` the multiplicity (Watanabe 2009, *Algebraic Geometry and Statistical
  Learning Theory*, Cambridge University Press).
* A model with ``d`` parameters is *regular* at a point when ``λ = d/2`` and
  ``m = 1``; every singular value below is ``≤ d/2``.
* Prior densities are assumed positive and smooth at the point of interest.

Invalid arguments raise :class:`ValueError` with a message naming the
argument and the problem.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Iterable, Sequence

from ._checks import check_int, check_real

__all__ = [
    "regular_llc",
    "normal_crossing_llc",
    "normal_crossing_multiplicity",
    "rrr_case",
    "rrr_llc",
    "rrr_multiplicity",
    "dln_subset",
    "dln_llc",
    "dln_num_params",
    "tanh_llc",
    "TMS_CRITICAL_POINTS",
    "tms_llc",
    "hessian_rank_bounds",
    "exact_quadratic_llc",
]


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _to_list(name: str, values: Any) -> list[Any]:
    """Turn a list/tuple/NumPy array/torch tensor into a flat Python list."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of numbers, got a string {values!r}")
    if hasattr(values, "detach"):  # torch.Tensor
        values = values.detach().cpu()
    if hasattr(values, "tolist"):  # numpy / torch
        values = values.tolist()
        if not isinstance(values, list):  # 0-d array -> scalar
            values = [values]
    try:
        out = list(values)
    except TypeError:
        raise ValueError(
            f"{name} must be a sequence of numbers, got {type(values).__name__}"
        ) from None
    for v in out:
        if isinstance(v, (list, tuple)):
            raise ValueError(f"{name} must be one-dimensional, got a nested sequence")
    return out


def _check_int_sequence(name: str, values: Any, minimum: int) -> list[int]:
    """``values`` (a non-empty 1-d sequence, array or tensor) as a list of ints ``>= minimum``."""
    out = _to_list(name, values)
    if len(out) == 0:
        raise ValueError(f"{name} must not be empty")
    return [check_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(out)]


# ---------------------------------------------------------------------------
# Regular and normal-crossing models
# ---------------------------------------------------------------------------


def regular_llc(d: int) -> float:
    """Learning coefficient of a regular model with ``d`` parameters.

    .. math:: \\lambda = d / 2, \\qquad m = 1.

    Holds whenever the Fisher information (equivalently the Hessian of the
    population loss ``K``) is positive definite at the true parameter.

    Parameters
    ----------
    d : int
        Number of parameters, ``d >= 0``.

    Returns
    -------
    float
        ``d / 2``.

    References
    ----------
    S. Watanabe, *Algebraic Geometry and Statistical Learning Theory*,
    Cambridge University Press, 2009 (the regular case).
    """
    d = check_int("d", d, 0)
    return d / 2


def _check_powers(powers: Any) -> list[int]:
    ks = _check_int_sequence("powers", powers, 0)
    if max(ks) == 0:
        raise ValueError(
            "powers must contain at least one positive entry; with all k_i = 0 "
            "K(w) = 1 is constant and has no zero set"
        )
    return ks


def normal_crossing_llc(powers: Sequence[int]) -> float:
    """Learning coefficient of a normal-crossing potential.

    For

    .. math:: K(w) = \\prod_{i=1}^{d} w_i^{2 k_i}, \\qquad k_i \\in \\mathbb{Z}_{\\ge 0},

    with a prior that is positive at the origin,

    .. math:: \\lambda = \\min_{i:\\,k_i > 0} \\frac{1}{2 k_i}
                       = \\frac{1}{2 \\max_i k_i}.

    Coordinates with ``k_i = 0`` do not appear in ``K`` at all: they are free
    (flat) directions of the potential. They contribute nothing to ``λ`` (the
    prior integrates them out to a constant) but they do count towards the
    parameter dimension ``d``. Note that ``λ`` of a *product* is governed by
    the single worst coordinate (``min``), unlike a *sum* of independent
    terms, whose learning coefficients add.

    Parameters
    ----------
    powers : sequence of int
        ``[k_1, ..., k_d]``; non-negative integers, at least one positive.

    Returns
    -------
    float
        ``λ = 1 / (2 max_i k_i)``.

    Raises
    ------
    ValueError
        If ``powers`` is empty, contains a negative or non-integer entry, or
        is all zeros.

    References
    ----------
    S. Watanabe, *Algebraic Geometry and Statistical Learning Theory*,
    Cambridge University Press, 2009 (normal crossing / standard form:
    ``λ = min_j (h_j + 1) / (2 k_j)``, here with ``h_j = 0`` since the prior
    is positive at the origin).
    """
    ks = _check_powers(powers)
    return 1.0 / (2 * max(ks))


def normal_crossing_multiplicity(powers: Sequence[int]) -> int:
    """Multiplicity ``m`` of the normal-crossing potential ``Π_i w_i^{2k_i}``.

    ``m`` is the number of coordinates attaining the minimum in
    :func:`normal_crossing_llc`, i.e. the number of ``i`` with
    ``k_i = max_j k_j``. With ``m > 1`` finite-``n`` estimates of ``λ`` run
    low, by roughly ``(m - 1) log log n / log n``.

    Parameters
    ----------
    powers : sequence of int
        ``[k_1, ..., k_d]``; non-negative integers, at least one positive.

    Returns
    -------
    int
        ``#{i : k_i = max_j k_j}``.

    References
    ----------
    S. Watanabe, *Algebraic Geometry and Statistical Learning Theory*, 2009.
    """
    ks = _check_powers(powers)
    kmax = max(ks)
    return sum(1 for k in ks if k == kmax)


# ---------------------------------------------------------------------------
# Reduced-rank regression (one hidden linear layer)
# ---------------------------------------------------------------------------


def _check_rrr(n_in: Any, hidden: Any, n_out: Any, rank: Any) -> tuple[int, int, int, int]:
    n = check_int("n_in", n_in, 1)
    h = check_int("hidden", hidden, 1)
    m = check_int("n_out", n_out, 1)
    r = check_int("rank", rank, 0)
    if r > min(n, h, m):
        raise ValueError(
            f"rank must be <= min(n_in, hidden, n_out) = {min(n, h, m)}, got rank={r}"
        )
    return n, h, m, r


def rrr_case(n_in: int, hidden: int, n_out: int, rank: int) -> int:
    """Which of the four cases of Aoyagi & Watanabe (2005) applies.

    With ``N = n_in``, ``H = hidden``, ``M = n_out``, ``r = rank``:

    1. ``N + r <= M + H``, ``M + r <= N + H`` and ``H + r <= N + M``;
    2. ``M + H < N + r``;
    3. ``N + H < M + r``;
    4. ``N + M < H + r``.

    Cases 2-4 are mutually exclusive (any two together would force
    ``r > min(N, H, M)``) and case 1 is their complement.

    Returns
    -------
    int
        1, 2, 3 or 4.
    """
    n, h, m, r = _check_rrr(n_in, hidden, n_out, rank)
    if m + h < n + r:
        return 2
    if n + h < m + r:
        return 3
    if n + m < h + r:
        return 4
    return 1


def _rrr_exact(n: int, h: int, m: int, r: int) -> Fraction:
    if m + h < n + r:
        return Fraction(h * m - h * r + n * r, 2)
    if n + h < m + r:
        return Fraction(h * n - h * r + m * r, 2)
    if n + m < h + r:
        return Fraction(n * m, 2)
    lam = Fraction(2 * (h + r) * (n + m) - (n - m) ** 2 - (h + r) ** 2, 8)
    if (n + m + h + r) % 2 == 1:
        lam += Fraction(1, 8)
    return lam


def rrr_llc(n_in: int, hidden: int, n_out: int, rank: int) -> float:
    """Learning coefficient of reduced-rank regression.

    Model ``y = B A x + noise`` with ``A`` of shape ``H x N``, ``B`` of shape
    ``M x H`` (``d = H (N + M)`` parameters), true map ``B_0 A_0`` of rank
    ``r``. Writing ``N = n_in``, ``H = hidden``, ``M = n_out``:

    * **Case 1** (``N + r <= M + H``, ``M + r <= N + H``, ``H + r <= N + M``):

      .. math:: \\lambda = \\frac{2 (H + r)(N + M) - (N - M)^2 - (H + r)^2}{8}
                \\; \\Big[ + \\frac{1}{8} \\text{ if } N + M + H + r
                \\text{ is odd} \\Big]

    * **Case 2** (``M + H < N + r``): ``λ = (H M - H r + N r) / 2``;
    * **Case 3** (``N + H < M + r``): ``λ = (H N - H r + M r) / 2``;
    * **Case 4** (``N + M < H + r``): ``λ = N M / 2``.

    The formula is symmetric under ``N <-> M`` (cases 2 and 3 swap), i.e.
    under transposing the model.

    Parameters
    ----------
    n_in, hidden, n_out : int
        Input, hidden and output widths (``>= 1``).
    rank : int
        Rank of the true map, ``0 <= rank <= min(n_in, hidden, n_out)``.

    Returns
    -------
    float
        The learning coefficient ``λ``.

    References
    ----------
    M. Aoyagi and S. Watanabe, "Stochastic complexities of reduced rank
    regression in Bayesian estimation", *Neural Networks* 18(7):924-933, 2005.
    doi:10.1016/j.neunet.2005.03.014.
    """
    n, h, m, r = _check_rrr(n_in, hidden, n_out, rank)
    return float(_rrr_exact(n, h, m, r))


def rrr_multiplicity(n_in: int, hidden: int, n_out: int, rank: int) -> int:
    """Multiplicity ``m`` of reduced-rank regression (Aoyagi & Watanabe 2005).

    ``m = 2`` in case 1 (see :func:`rrr_case`) when ``N + M + H + r`` is odd,
    and ``m = 1`` otherwise.

    Parameters
    ----------
    n_in, hidden, n_out : int
        Input, hidden and output widths (``>= 1``).
    rank : int
        Rank of the true map, ``0 <= rank <= min(n_in, hidden, n_out)``.

    Returns
    -------
    int
        1 or 2.

    References
    ----------
    M. Aoyagi and S. Watanabe, *Neural Networks* 18(7):924-933, 2005.
    """
    n, h, m, r = _check_rrr(n_in, hidden, n_out, rank)
    if rrr_case(n, h, m, r) == 1 and (n + m + h + r) % 2 == 1:
        return 2
    return 1


# ---------------------------------------------------------------------------
# Deep linear networks
# ---------------------------------------------------------------------------


def _check_dln(widths: Any, rank: Any) -> tuple[list[int], int]:
    ws = _check_int_sequence("widths", widths, 1)
    if len(ws) < 2:
        raise ValueError(
            f"widths must list at least an input and an output width (length >= 2), "
            f"got {ws}"
        )
    r = check_int("rank", rank, 0)
    if r > min(ws):
        raise ValueError(f"rank must be <= min(widths) = {min(ws)}, got rank={r}")
    return ws, r


def _dln_conditions(ms: Sequence[int], subset: Iterable[int]) -> bool:
    """Aoyagi's conditions (i)-(iii) for a candidate index set ``S``."""
    s_idx = set(subset)
    ell = len(s_idx) - 1
    if ell < 1:
        return False
    in_s = [ms[i] for i in s_idx]
    out_s = [ms[i] for i in range(len(ms)) if i not in s_idx]
    total = sum(in_s)
    if out_s and not max(in_s) < min(out_s):  # (i)
        return False
    if not total >= ell * max(in_s):  # (ii)
        return False
    if out_s and not total < ell * min(out_s):  # (iii)
        return False
    return True


def dln_subset(widths: Sequence[int], rank: int) -> tuple[int, ...]:
    """The index set ``S`` of Aoyagi's deep-linear-network theorem.

    With ``M_s = H_s - r`` (``s = 0, ..., L``), ``S`` is the set of indices,
    ``|S| = ℓ + 1`` with ``ℓ >= 1``, such that

    (i)   ``max_{s in S} M_s < min_{k not in S} M_k``,
    (ii)  ``sum_{s in S} M_s >= ℓ max_{s in S} M_s``,
    (iii) ``sum_{s in S} M_s < ℓ min_{k not in S} M_k``

    ((i) and (iii) are vacuous when ``S`` is everything).

    Condition (i) forces ``S`` to be a sublevel set ``{s : M_s <= t}`` (if
    ``s in S`` and ``k not in S`` then ``M_s < M_k``), so instead of all
    ``2^(L+1)`` subsets it suffices to scan the sublevel sets in increasing
    order; this is exactly equivalent to the exhaustive search (the test
    suite checks it against brute force). The first set satisfying (ii) and
    (iii) is returned.

    Parameters
    ----------
    widths : sequence of int
        ``[H_0 (input), H_1, ..., H_L (output)]``, all ``>= 1``, ``L >= 1``.
    rank : int
        Rank of the true end-to-end map, ``0 <= rank <= min(widths)``.

    Returns
    -------
    tuple of int
        Sorted indices of ``S`` into ``widths``.

    References
    ----------
    M. Aoyagi, "Consideration on the learning efficiency of multiple-layered
    neural networks with linear units", *Neural Networks* 172:106132, 2024.
    doi:10.1016/j.neunet.2024.106132.
    """
    ws, r = _check_dln(widths, rank)
    ms = [w - r for w in ws]
    for t in sorted(set(ms)):
        subset = tuple(i for i, v in enumerate(ms) if v <= t)
        if _dln_conditions(ms, subset):
            return subset
    # Aoyagi (2024) proves existence; reaching this line would be a bug.
    raise RuntimeError(f"no admissible subset S found for widths={ws}, rank={r}")


def _dln_exact(ws: Sequence[int], r: int) -> Fraction:
    if len(ws) == 2:
        return Fraction(ws[0] * ws[1], 2)
    ms = [w - r for w in ws]
    subset = dln_subset(ws, r)
    ms_s = [ms[i] for i in subset]
    ell = len(ms_s) - 1
    total = sum(ms_s)
    m_bar = -(-total // ell)  # ceil(total / ell)
    a = total - (m_bar - 1) * ell  # in {1, ..., ell}
    pair_sum = (total * total - sum(v * v for v in ms_s)) // 2  # sum_{s<t} M_s M_t
    lam = Fraction(r * (ws[0] + ws[-1]) - r * r, 2)
    lam += Fraction(a * (ell - a), 4 * ell)
    lam -= Fraction(ell * (ell - 1), 4) * Fraction(total, ell) ** 2
    lam += Fraction(pair_sum, 2)
    return lam


def dln_llc(widths: Sequence[int], rank: int) -> float:
    """Learning coefficient of a deep linear network.

    Model ``f(x) = W_L ... W_1 x`` with ``W_s`` of shape ``H_s x H_{s-1}``
    (no biases), widths ``[H_0 (input), H_1, ..., H_L (output)]``, and a true
    end-to-end map of rank ``r``. With ``M_s = H_s - r`` and the index set
    ``S`` (``|S| = ℓ + 1``) of :func:`dln_subset`, let
    ``M̄ = ceil(Σ_S M_s / ℓ)`` and ``a = Σ_S M_s - (M̄ - 1) ℓ``. Then

    .. math::

        \\lambda = \\frac{r (H_0 + H_L) - r^2}{2}
                 + \\frac{a (\\ell - a)}{4 \\ell}
                 - \\frac{\\ell (\\ell - 1)}{4}
                   \\Big(\\frac{\\sum_{S} M_s}{\\ell}\\Big)^2
                 + \\frac{1}{2} \\sum_{s < t \\in S} M_s M_t .

    For one hidden layer this reproduces :func:`rrr_llc` (all four cases).
    For ``len(widths) == 2`` (a plain linear map, no hidden layer) the model
    is regular and ``λ = H_0 H_1 / 2`` whatever the rank; the general formula
    gives the same value. The formula depends on the widths only through
    ``H_0 + H_L`` and the multiset ``{M_s}``, so it is invariant under
    reversing ``widths`` (transposing the network).

    Examples from the literature: ``[5, 3, 5], r=0 -> 6.5``;
    ``[10, 10, 10, 10], r=0 -> 33.5``; ``[10, 10, 10, 10], r=5 -> 46``;
    ``[10, 20, 20, 10], r=5 -> 50``.

    Parameters
    ----------
    widths : sequence of int
        ``[H_0, ..., H_L]``, all ``>= 1``, length ``>= 2``.
    rank : int
        Rank of the true map, ``0 <= rank <= min(widths)`` (the end-to-end
        map cannot have rank larger than the narrowest layer).

    Returns
    -------
    float
        The learning coefficient ``λ``.

    References
    ----------
    M. Aoyagi, "Consideration on the learning efficiency of multiple-layered
    neural networks with linear units", *Neural Networks* 172:106132, 2024.
    doi:10.1016/j.neunet.2024.106132.
    """
    ws, r = _check_dln(widths, rank)
    return float(_dln_exact(ws, r))


def dln_num_params(widths: Sequence[int]) -> int:
    """Number of parameters ``d = Σ_s H_s H_{s+1}`` of a bias-free deep linear network.

    Parameters
    ----------
    widths : sequence of int
        ``[H_0, ..., H_L]``, all ``>= 1``, length ``>= 2``.
    """
    ws, _ = _check_dln(widths, 0)
    return sum(a * b for a, b in zip(ws[:-1], ws[1:]))


# ---------------------------------------------------------------------------
# One-hidden-layer tanh network
# ---------------------------------------------------------------------------


def tanh_llc(hidden: int) -> float:
    """Learning coefficient of a 1-input, 1-output tanh network at the zero function.

    For ``f(x; a, b) = Σ_{h=1}^{H} a_h tanh(b_h x)`` with true function
    ``f ≡ 0``,

    .. math:: \\lambda = \\frac{H + i^2 + i}{4 i + 2}, \\qquad i = \\lfloor \\sqrt{H} \\rfloor

    (``H = 1..5 -> 1/2, 2/3, 5/6, 1, 11/10``), far below the regular value
    ``H`` (``d = 2H``).

    Parameters
    ----------
    hidden : int
        Number of hidden units ``H >= 1``.

    Returns
    -------
    float
        The learning coefficient ``λ``.

    Notes
    -----
    The formula is taken from the project reference sheet, whose source is
    code accompanying the Bayesian phase-transition papers. It is usually
    attributed to M. Aoyagi's work on Vandermonde-matrix-type singularities
    (e.g. "A Bayesian learning coefficient of generalization error and
    Vandermonde matrix-type singularities", *Communications in Statistics -
    Theory and Methods* 39, 2010); that attribution, and the exact setting
    (biases, prior support), have not been verified here.
    """
    h = check_int("hidden", hidden, 1)
    i = math.isqrt(h)
    return float(Fraction(h + i * i + i, 4 * i + 2))


# ---------------------------------------------------------------------------
# Toy model of superposition
# ---------------------------------------------------------------------------

#: Critical points of the toy model of superposition with ``m = 2`` hidden
#: dimensions and ``n = 6`` features in the high-sparsity limit (Chen, Lau,
#: Mendel, Wei, Murfet 2023, arXiv:2310.06301). Per point: ``k`` (number of
#: live columns, arranged as a regular k-gon at angles 2πj/k), ``l`` (their
#: common length), ``b`` (their common bias), ``dead_bias`` (bias of the one
#: dead column of a "+" variant; ``None`` when unspecified, i.e. every dead
#: column has some bias ``<= 0``, or when there is no dead column), ``loss``
#: (population loss) and ``llc`` (the learning coefficient λ). The 5-gon+
#: reuses the 5-gon's ``l`` and ``b``; raising one dead column's bias from
#: ``<= 0`` to ``1/(2n) = 1/12`` lowers the loss by ``1/(4 n^2) = 1/144``
#: (0.06874 -> 0.06180).
TMS_CRITICAL_POINTS: dict[str, dict[str, Any]] = {
    "5-gon": {
        "k": 5,
        "l": 1.17046,
        "b": -0.28230,
        "dead_bias": None,
        "loss": 0.06874,
        "llc": 7.0,
    },
    "5-gon+": {
        "k": 5,
        "l": 1.17046,
        "b": -0.28230,
        "dead_bias": 1.0 / 12.0,
        "loss": 0.06180,
        "llc": 8.5,
    },
    "6-gon": {
        "k": 6,
        "l": 1.32052,
        "b": -0.61813,
        "dead_bias": None,
        "loss": 0.04819,
        "llc": 8.5,
    },
}

_TMS_ALIASES: dict[str, str] = {
    "5gon": "5-gon",
    "pentagon": "5-gon",
    "5gon+": "5-gon+",
    "5+gon": "5-gon+",
    "pentagon+": "5-gon+",
    "6gon": "6-gon",
    "hexagon": "6-gon",
}


def _tms_key(point: Any) -> str:
    known = ", ".join(repr(k) for k in TMS_CRITICAL_POINTS)
    if not isinstance(point, str):
        raise ValueError(f"point must be a string naming a TMS critical point ({known}), got {point!r}")
    s = point.strip().lower().replace("⁺", "+").replace("_", "-").replace(" ", "")
    s = s.replace("-plus", "+").replace("plus", "+").replace("-", "")
    if s not in _TMS_ALIASES:
        raise ValueError(f"unknown TMS critical point {point!r}; known points: {known}")
    return _TMS_ALIASES[s]


def tms_llc(point: str) -> float:
    """Learning coefficient of a k-gon critical point of the toy model of superposition.

    Model ``x' = ReLU(W^T W x + b)`` with ``W in R^{2 x 6}`` (``m = 2`` hidden
    dimensions, ``n = 6`` features, ``d = 18`` parameters), in the
    high-sparsity limit ``x = μ e_i`` (``i`` uniform, ``μ ~ U[0, 1]``).

    ========  =======  =====
    point     loss     λ
    ========  =======  =====
    5-gon     0.06874  7
    5-gon+    0.06180  8.5
    6-gon     0.04819  8.5
    ========  =======  =====

    Accepted aliases: ``'5gon'``, ``'pentagon'``, ``'5-gon-plus'``,
    ``'5gon+'``, ``'5+-gon'``, ``'6gon'``, ``'hexagon'`` (case, spaces and
    underscores are ignored). The full table is :data:`TMS_CRITICAL_POINTS`.

    Parameters
    ----------
    point : str
        Name of the critical point.

    Returns
    -------
    float
        The learning coefficient ``λ``.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known points.

    References
    ----------
    Z. Chen, E. Lau, J. Mendel, S. Wei, D. Murfet, "Dynamical versus Bayesian
    phase transitions in a toy model of superposition", arXiv:2310.06301, 2023.
    """
    return float(TMS_CRITICAL_POINTS[_tms_key(point)]["llc"])


# ---------------------------------------------------------------------------
# Bounds and exact finite-n values
# ---------------------------------------------------------------------------


def hessian_rank_bounds(d: int, hessian_rank: int) -> tuple[float, float]:
    """Bounds on ``λ`` from the rank of the Hessian at a local minimum.

    With ``d`` parameters and ``d_1 = rank ∇²K(w*)``,

    .. math:: \\frac{d_1}{2} \\le \\lambda \\le \\frac{d + d_1}{4}.

    Sketch: by the splitting lemma, near ``w*`` there are local coordinates
    ``(u, v)`` with ``K = |u|^2 + g(v)``, ``u in R^{d_1}``, where ``g`` has no
    quadratic terms; so ``λ = d_1/2 + λ(g) >= d_1/2``. At a local minimum
    ``g`` also has no cubic terms, so ``g <= C |v|^4`` and
    ``λ(g) <= (d - d_1)/4``. ``d_1 = d`` gives the regular value ``d/2``.

    Parameters
    ----------
    d : int
        Number of parameters, ``d >= 1``.
    hessian_rank : int
        ``0 <= hessian_rank <= d``.

    Returns
    -------
    tuple of float
        ``(d_1 / 2, (d + d_1) / 4)``.

    References
    ----------
    L. Bushnaq, J. Mendel, et al., "Using degeneracies in the loss landscape
    for mechanistic interpretability", arXiv:2405.10927, 2024, with the
    improvement due to D. Vaintrob (as stated in the project reference
    sheet; not re-derived here beyond the sketch above).
    """
    d = check_int("d", d, 1)
    d1 = check_int("hessian_rank", hessian_rank, 0)
    if d1 > d:
        raise ValueError(f"hessian_rank must be <= d = {d}, got hessian_rank={d1}")
    return d1 / 2, (d + d1) / 4


def exact_quadratic_llc(hessian_eigenvalues: Any, nbeta: float, localization: float) -> float:
    """Exact expected LLC estimate for a quadratic loss under the localized posterior.

    For ``L(w) = L_0 + ½ (w - w*)^T H (w - w*)`` and the localized tempered
    posterior ``p(w) ∝ exp(-nβ L(w) - (γ/2) ||w - w*||²)``, the posterior is
    Gaussian with precision ``nβ H + γ I`` and the estimator
    ``λ̂ = nβ (E[L] - L(w*))`` has the exact finite-``n`` expectation

    .. math:: E[\\hat\\lambda] = \\frac{1}{2} \\sum_i
              \\frac{1}{1 + \\gamma / (n\\beta\\, h_i)}
              = \\frac{1}{2} \\sum_i \\frac{n\\beta\\, h_i}{n\\beta\\, h_i + \\gamma},

    with ``h_i`` the eigenvalues of ``H``; ``h_i = 0`` contributes ``0``. As
    ``γ -> 0`` this tends to ``rank(H) / 2``. Negative eigenvalues (a saddle,
    not a minimum) are allowed as long as ``nβ h_i + γ > 0`` so that the
    posterior stays normalisable; they contribute negatively, which is the
    exact version of "λ̂ turns negative when w* is not a minimum".

    Parameters
    ----------
    hessian_eigenvalues : sequence of float, NumPy array or torch tensor
        Eigenvalues ``h_i`` of the Hessian (one-dimensional).
    nbeta : float
        The inverse temperature times sample size, ``nβ > 0``.
    localization : float
        The localization strength ``γ >= 0``.

    Returns
    -------
    float
        ``E[λ̂]``.

    Raises
    ------
    ValueError
        If ``nbeta <= 0``, ``localization < 0``, an eigenvalue is not a finite
        real number, the input is not one-dimensional, or some
        ``nβ h_i + γ <= 0`` with ``h_i != 0`` (improper posterior).

    References
    ----------
    E. Lau, Z. Furman, G. Wang, D. Murfet, S. Wei, "The local learning
    coefficient: a singularity-aware complexity measure", AISTATS 2025,
    arXiv:2308.12108 (estimator and localized posterior).
    """
    nb = check_real("nbeta", nbeta)
    if nb <= 0:
        raise ValueError(f"nbeta must be > 0, got {nb}")
    gamma = check_real("localization", localization)
    if gamma < 0:
        raise ValueError(f"localization must be >= 0, got {gamma}")
    eigs = [
        check_real(f"hessian_eigenvalues[{i}]", h)
        for i, h in enumerate(_to_list("hessian_eigenvalues", hessian_eigenvalues))
    ]
    total = 0.0
    for i, h in enumerate(eigs):
        if h == 0.0:
            continue
        precision = nb * h + gamma
        if precision <= 0:
            raise ValueError(
                f"hessian_eigenvalues[{i}] = {h} gives posterior precision "
                f"nbeta*h + localization = {precision} <= 0: the localized posterior is "
                "improper (increase localization or check that w* is a minimum)"
            )
        total += nb * h / precision
    return 0.5 * total
