r"""Operations on (weighted) data distributions: add, remove and measure invariances.

A data set is an empirical distribution :math:`q = \sum_i v_i \delta_{z_i}`
(:class:`slt.Data` with normalized weights :math:`v_i`; uniform when it has
none), where :math:`z_i` is ``x_i`` (density model) or the pair
``(x_i, y_i)``.  A group acts on ``x``, on ``y`` or on both with the same
element (``acts_on``).  Every function returns a :class:`slt.Data` that
:func:`slt.estimate_llc` accepts directly; the engine's loss is the weighted
mean :math:`L(w) = \sum_i v_i \ell_i(w)`.

Row counts are not sample sizes
-------------------------------
:func:`symmetrize` with a finite group returns :math:`|G| n` rows and
:func:`mix` returns :math:`n_0 + n_1` rows carrying fractional weights, but the
number of observations in :math:`n\beta` is a modelling choice, not the row
count: pass ``nbeta`` explicitly (e.g. ``slt.default_nbeta(n)``) when comparing
λ̂ across such data sets, since :func:`slt.estimate_llc` defaults
:math:`n\beta` from the number of rows.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .._checks import check_int
from ..data import Data, as_source
from .groups import Group, check_acts_on

__all__ = ["as_data", "symmetrize", "break_symmetry", "mix", "invariance_gap", "compress"]

_ACTS_ON = ("x", "y", "both")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def as_data(data: Any, name: str = "data") -> Data:
    """Any tensor form accepted by :func:`slt.estimate_llc` (``X``, ``(X, Y)``,
    ``(X, Y, weights)``, :class:`slt.Data`, a ``Dataset``) as :class:`slt.Data`.
    Streamed ``DataLoader`` s are rejected: the operations need all samples."""
    try:
        src = as_source(data)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from e
    if not isinstance(src, Data):
        raise TypeError(f"{name} must hold its samples as tensors (X, (X, Y), slt.Data); a DataLoader is streamed")
    return src


def _weights(d: Data) -> Tensor:
    """(n,) normalized weights (uniform when the data carry none)."""
    if d.weights is None:
        return torch.full((d.n,), 1.0 / d.n, dtype=torch.float64, device=d.x.device)
    return (d.weights.double() / d.weights.double().sum())


def _check_acts_on(acts_on: str, d: Data, group: Group) -> None:
    if acts_on not in _ACTS_ON:
        raise ValueError(f"acts_on must be one of {_ACTS_ON}, got {acts_on!r}")
    if acts_on in ("y", "both") and d.y is None:
        raise ValueError(f"acts_on={acts_on!r} needs targets, but the data are a single tensor (density model)")
    if acts_on in ("x", "both"):
        check_acts_on(group, d.x, "x")
    if acts_on in ("y", "both"):
        check_acts_on(group, d.y, "y")  # type: ignore[arg-type]


def _act_data(group: Group, g: Tensor, d: Data, acts_on: str) -> tuple[Tensor, Tensor | None]:
    """Apply element(s) ``g`` ((m, m) or (n, m, m)) to the acted-on parts of ``d``."""
    x, y = d.x, d.y
    if acts_on in ("x", "both"):
        x = group.act(g, x)
    if acts_on in ("y", "both"):
        y = group.act(g, y)  # type: ignore[arg-type]
    return x, y


def _repeat(t: Tensor | None, k: int) -> Tensor | None:
    """(n, ...) -> (n*k, ...), row i*k + j = t[i]."""
    return None if t is None else t.repeat_interleave(k, dim=0)


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _moment_vars(group: Group, d: Data, acts_on: str) -> tuple[Tensor, Group]:
    """The acted-on variable z (n, r, m) and the group acting on it."""
    if acts_on == "x":
        z = d.x
    elif acts_on == "y":
        z = d.y  # type: ignore[assignment]
    else:
        z = torch.cat([d.x.reshape(d.n, -1, group.degree), d.y.reshape(d.n, -1, group.degree)], 1)  # type: ignore[union-attr]
    return z.reshape(d.n, -1, group.degree).double(), group


# ----------------------------------------------------------------------------
# symmetrize
# ----------------------------------------------------------------------------
def symmetrize(
    data: Any,
    group: Group,
    *,
    generator: torch.Generator | None = None,
    acts_on: str = "x",
    num_samples: int | None = None,
) -> Data:
    r"""The group-averaged distribution :math:`q_G = E_{g}[g_* q]`.

    For :math:`q = \sum_i v_i \delta_{z_i}`,
    :math:`q_G = \sum_i v_i\, E_g[\delta_{g z_i}]`.

    * Finite group, ``num_samples=None`` (default): the exact orbit-weighted data
      set -- every sample is replicated once per element, :math:`g z_i` with
      weight :math:`v_i/|G|` (:math:`|G| n` rows, row ``i*|G| + j`` is
      :math:`g_j z_i`).  Then :math:`g_* q_G = q_G` exactly.
    * Lie group (or ``num_samples=k``): Monte-Carlo orbit samples, :math:`k`
      i.i.d. uniform/Haar elements per sample with weight :math:`v_i/k`
      (default :math:`k = 1` for Lie groups).  With :math:`k = 1` and i.i.d.
      :math:`z_i \sim q`, the rows :math:`g_i z_i` are an i.i.d. sample of size
      :math:`n` from :math:`q_G` itself, so :math:`n\beta` keeps its meaning.

    Parameters
    ----------
    data
        ``X`` (density), ``(X, Y)``, ``(X, Y, weights)`` or :class:`slt.Data`.
    group
        A :class:`slt.symmetry.Group` whose ``degree`` is the trailing dimension
        of the acted-on tensor(s).
    generator
        Randomness for Monte-Carlo orbits (default: a generator seeded with 0).
    acts_on
        ``"x"``, ``"y"`` or ``"both"`` (the same element on ``x`` and ``y``).
    num_samples
        Orbit samples per data point (``None``: exact orbit for finite groups,
        1 for Lie groups).

    Returns
    -------
    slt.Data
        With weights.  Pass ``nbeta`` to :func:`slt.estimate_llc` explicitly when
        the row count differs from the sample size (see module docstring).
    """
    d = as_data(data)
    if not isinstance(group, Group):
        raise TypeError(f"group must be an slt.symmetry.Group, got {type(group).__name__}")
    _check_acts_on(acts_on, d, group)
    v = _weights(d)
    if num_samples is None and group.is_finite:
        elems = group.elements(dtype=d.x.dtype, device=d.x.device)  # (G, m, m)
        k = elems.shape[0]
        g = elems.repeat(d.n, 1, 1)  # row i*k + j -> element j
    else:
        k = 1 if num_samples is None else check_int("num_samples", num_samples, 1)
        gen = _default_generator(generator)
        g = group.sample(d.n * k, gen, dtype=d.x.dtype).to(d.x.device)
    rep = Data(_repeat(d.x, k), _repeat(d.y, k), None)  # type: ignore[arg-type]
    x, y = _act_data(group, g, rep, acts_on)
    w = (v / k).repeat_interleave(k).to(d.x.dtype if d.x.is_floating_point() else torch.float32)
    if d.weights is None and k == 1:
        return Data(x, y, None)
    return Data(x, y, w)


def compress(data: Any) -> Data:
    r"""Merge identical rows, summing their weights: the same distribution in fewer rows.

    On a finite sample space (e.g. :class:`slt.models.ExponentialFamily`) an
    exactly symmetrized data set repeats every support point many times;
    compressing it to one weighted row per distinct point leaves every
    weighted loss unchanged and makes full-batch sampling cheap.  Pass
    ``nbeta`` explicitly afterwards (the row count is no longer ``n``).

    Returns
    -------
    slt.Data
        Distinct rows (``(x, y)`` pairs for supervised data), with weights.
    """
    d = as_data(data)
    flat = d.x.reshape(d.n, -1)
    if d.y is not None:
        flat = torch.cat([flat, d.y.reshape(d.n, -1).to(flat.dtype)], 1)
    uniq, inv = torch.unique(flat, dim=0, return_inverse=True)
    w = torch.zeros(uniq.shape[0], dtype=torch.float64, device=d.x.device)
    w.index_add_(0, inv, _weights(d))
    first = torch.full((uniq.shape[0],), d.n, dtype=torch.long, device=d.x.device)
    first.scatter_reduce_(0, inv, torch.arange(d.n, device=d.x.device), reduce="amin")
    wdt = d.x.dtype if d.x.is_floating_point() else torch.float32
    return Data(d.x[first], None if d.y is None else d.y[first], w.to(wdt))


# ----------------------------------------------------------------------------
# break_symmetry
# ----------------------------------------------------------------------------
def _noninvariant_part(
    group: Group, z: Tensor, direction: Tensor | Callable[[Tensor], Tensor] | None,
    generator: torch.Generator | None, num_group_samples: int,
) -> Tensor:
    r"""f⊥(z) = f(z) − E_g f(g z): (n, ..., m) -> (n,)."""
    m = group.degree
    n = z.shape[0]
    if direction is None or isinstance(direction, (Tensor, list, tuple)):
        if direction is None:
            u = torch.zeros(m, dtype=torch.float64)
            u[0] = 1.0
        else:
            u = torch.as_tensor(direction, dtype=torch.float64).flatten()
            if u.numel() != m or not torch.isfinite(u).all():
                raise ValueError(f"direction must be a finite vector of length {m} (the group's degree)")
        u_perp = u - group.mean_matrix(torch.float64).T @ u  # <u, (I - M) z> = <(I - M)^T u, z>
        if float(u_perp.norm()) < 1e-12:
            raise ValueError(
                f"direction {u.tolist()} is {group}-invariant (f = <u, x> has no non-invariant part): "
                "pick another direction"
            )
        zz = z.double().reshape(n, -1, m)
        return (zz @ u_perp.to(zz.device)).sum(1)
    if not callable(direction):
        raise TypeError("direction must be None, a vector, or a callable f(z) -> (n,)")
    f0 = direction(z)
    if not isinstance(f0, Tensor) or f0.shape != (n,):
        raise ValueError(f"direction(z) must return a tensor of shape (n,) = ({n},)")
    if group.is_finite:
        elems = group.elements(dtype=z.dtype, device=z.device)
        avg = torch.stack([direction(group.act(g, z)).double() for g in elems]).mean(0)
    else:
        gen = _default_generator(generator)
        gs = group.sample(num_group_samples, gen, dtype=z.dtype).to(z.device)
        avg = torch.stack([direction(group.act(g, z)).double() for g in gs]).mean(0)
    return f0.double() - avg


def break_symmetry(
    data: Any,
    group: Group,
    strength: float,
    *,
    direction: Tensor | Callable[[Tensor], Tensor] | None = None,
    method: str = "tilt",
    acts_on: str = "x",
    generator: torch.Generator | None = None,
    num_group_samples: int = 256,
) -> Data:
    r"""Remove a G-invariance of :math:`q`: tilt it along a non-invariant function.

    With :math:`f` a function of the acted-on variable and
    :math:`f_\perp = f - E_g[f\circ g]` its component outside the
    G-invariant functions (the Reynolds projection),

    * ``method="tilt"`` (default): importance weights
      :math:`v_i \propto v_i \exp(s f_\perp(z_i))`, i.e.
      :math:`q_s \propto e^{s f_\perp} q`;
    * ``method="resample"``: ``n`` rows drawn with replacement with those
      probabilities (unweighted);
    * ``method="shift"``: the non-equivariant transform
      :math:`z \mapsto z + s\,u_\perp` (linear ``direction`` only).

    For :math:`q = N(0, I)` and linear :math:`f = \langle u, z\rangle` under
    :math:`SO(d)` all three give :math:`N(s u, I)`.  ``strength = 0`` returns
    the data unchanged.

    Parameters
    ----------
    data, group, acts_on
        As for :func:`symmetrize` (``"both"`` tilts by a function of ``x``).
    strength
        :math:`s`, a finite real number.
    direction
        ``None`` (default: :math:`f = z_1`, the first coordinate), a vector
        ``u`` (:math:`f = \langle u, z\rangle`, summed over any middle
        dimensions) or a callable ``f(z) -> (n,)``.
    method
        ``"tilt"``, ``"resample"`` or ``"shift"``.
    generator
        For ``"resample"`` and for the Monte-Carlo group average of a callable
        ``direction`` under a Lie group (default: seeded with 0).
    num_group_samples
        Haar samples for that average.

    Returns
    -------
    slt.Data
    """
    d = as_data(data)
    if not isinstance(group, Group):
        raise TypeError(f"group must be an slt.symmetry.Group, got {type(group).__name__}")
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a real number, got {strength!r}") from None
    if s != s or s in (float("inf"), float("-inf")):
        raise ValueError(f"strength must be finite, got {strength!r}")
    if method not in ("tilt", "resample", "shift"):
        raise ValueError(f"method must be 'tilt', 'resample' or 'shift', got {method!r}")
    _check_acts_on(acts_on, d, group)
    z = d.y if acts_on == "y" else d.x
    if method == "shift":
        if callable(direction) and not isinstance(direction, Tensor):
            raise ValueError("method='shift' needs a linear direction (a vector or None)")
        m = group.degree
        u = torch.zeros(m, dtype=torch.float64)
        if direction is None:
            u[0] = 1.0
        else:
            u = torch.as_tensor(direction, dtype=torch.float64).flatten()
            if u.numel() != m:
                raise ValueError(f"direction must be a vector of length {m}")
        u_perp = u - group.mean_matrix(torch.float64).T @ u
        if float(u_perp.norm()) < 1e-12:
            raise ValueError(f"direction {u.tolist()} is {group}-invariant: a shift along it breaks nothing")
        if s == 0.0:
            return Data(d.x, d.y, d.weights)
        shift = (s * u_perp).to(dtype=d.x.dtype, device=d.x.device)
        x, y = d.x, d.y
        if acts_on in ("x", "both"):
            x = x + shift
        if acts_on in ("y", "both"):
            y = y + shift  # type: ignore[operator]
        return Data(x, y, d.weights)
    fp = _noninvariant_part(group, z, direction, generator, num_group_samples)  # type: ignore[arg-type]
    if s == 0.0:
        return Data(d.x, d.y, d.weights)
    logw = s * fp
    logw = logw - logw.max()
    v = _weights(d) * torch.exp(logw)
    if not (v > 0).any():
        raise ValueError("the tilt left no sample with positive weight (strength too large)")
    v = v / v.sum()
    if method == "tilt":
        return Data(d.x, d.y, v.to(d.x.dtype if d.x.is_floating_point() else torch.float32))
    gen = _default_generator(generator)
    idx = torch.multinomial(v.cpu(), d.n, replacement=True, generator=gen).to(d.x.device)
    return Data(d.x[idx], None if d.y is None else d.y[idx], None)


# ----------------------------------------------------------------------------
# mix
# ----------------------------------------------------------------------------
def _check_compatible(d0: Data, d1: Data) -> None:
    if d0.x.shape[1:] != d1.x.shape[1:]:
        raise ValueError(
            f"q0 and q1 have inputs of different shapes per sample: {tuple(d0.x.shape[1:])} vs "
            f"{tuple(d1.x.shape[1:])}; the loss cannot evaluate both"
        )
    if (d0.y is None) != (d1.y is None):
        raise ValueError("q0 and q1 must both be density data (X) or both (X, Y) pairs")
    if d0.y is not None and d0.y.shape[1:] != d1.y.shape[1:]:  # type: ignore[union-attr]
        raise ValueError(
            f"q0 and q1 have targets of different shapes per sample: {tuple(d0.y.shape[1:])} vs "
            f"{tuple(d1.y.shape[1:])}"  # type: ignore[union-attr]
        )
    if d0.x.dtype != d1.x.dtype or (d0.y is not None and d0.y.dtype != d1.y.dtype):  # type: ignore[union-attr]
        raise ValueError(f"q0 and q1 have different dtypes ({d0.x.dtype} vs {d1.x.dtype})")


def _check_t(t: object, name: str = "t") -> float:
    try:
        v = float(t)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number in [0, 1], got {t!r}") from None
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {t!r}")
    return v


def mix(q0: Any, q1: Any, t: float) -> Data:
    r"""The mixture path :math:`q_t = (1 - t)\, q_0 + t\, q_1`.

    The union of both data sets, with the normalized weights of ``q0`` scaled
    by :math:`1 - t` and those of ``q1`` by :math:`t`; so the engine's weighted
    loss is :math:`L_{q_t} = (1-t) L_{q_0} + t L_{q_1}` exactly.  At
    :math:`t = 0` (:math:`t = 1`) the rows of zero weight are dropped and
    ``q0`` (``q1``) is returned with normalized weights.  Pass ``nbeta``
    explicitly to :func:`slt.estimate_llc`: its default counts rows.

    Parameters
    ----------
    q0, q1
        Data sets of the same per-sample shapes (``X``, ``(X, Y)``,
        ``(X, Y, weights)`` or :class:`slt.Data`).
    t
        In :math:`[0, 1]`.

    Returns
    -------
    slt.Data
        ``n0 + n1`` rows, ``q0``'s first (``n0`` or ``n1`` at the end points).
    """
    t = _check_t(t)
    d0, d1 = as_data(q0, "q0"), as_data(q1, "q1")
    _check_compatible(d0, d1)
    if t in (0.0, 1.0):
        d = d0 if t == 0.0 else d1
        return Data(d.x, d.y, _weights(d).to(d.x.dtype if d.x.is_floating_point() else torch.float32))
    w = torch.cat([(1.0 - t) * _weights(d0), t * _weights(d1).to(d0.x.device)])
    x = torch.cat([d0.x, d1.x.to(d0.x.device)])
    y = None if d0.y is None else torch.cat([d0.y, d1.y.to(d0.y.device)])  # type: ignore[union-attr]
    return Data(x, y, w.to(d0.x.dtype if d0.x.is_floating_point() else torch.float32))


# ----------------------------------------------------------------------------
# invariance_gap
# ----------------------------------------------------------------------------
def invariance_gap(
    data: Any,
    group: Group,
    *,
    acts_on: str = "x",
    method: str = "moments",
    generator: torch.Generator | None = None,
    num_group_samples: int = 256,
    bandwidth: float | None = None,
    max_points: int = 1024,
) -> float:
    r"""How far :math:`q` is from G-invariant: :math:`E_g\, D(q, g_* q)`.

    ``method="moments"`` (default): with the weighted mean :math:`\mu` and
    second-moment matrix :math:`S = E_q[z z^T]` of the acted-on vectors,

    .. math:: \mathrm{gap} = E_g\bigl[\lVert \mu - g\mu\rVert^2 + \lVert S - g S g^T\rVert_F^2\bigr] ,

    zero iff the first two moments are invariant (joint moments of the whole
    acted-on vector; with ``acts_on="both"`` that is ``(x, y)``, ``g`` acting
    on each).  ``method="mmd"``: the
    squared maximum mean discrepancy :math:`\mathrm{MMD}^2(q, g_* q)` with a
    Gaussian kernel (bandwidth: the median pairwise distance by default),
    averaged over ``g``, on at most ``max_points`` rows (a weighted subsample
    drawn with ``generator``).  The average over ``g`` is exact over
    :meth:`Group.elements` for finite groups and uses ``num_group_samples``
    Haar samples for Lie groups (``generator``, default seeded with 0).

    :func:`symmetrize` with a finite group makes the gap zero (up to rounding);
    with Monte-Carlo orbits it is :math:`O(1/n)`; :func:`break_symmetry` raises it.

    Returns
    -------
    float
    """
    d = as_data(data)
    if not isinstance(group, Group):
        raise TypeError(f"group must be an slt.symmetry.Group, got {type(group).__name__}")
    _check_acts_on(acts_on, d, group)
    if method not in ("moments", "mmd"):
        raise ValueError(f"method must be 'moments' or 'mmd', got {method!r}")
    z, _ = _moment_vars(group, d, acts_on)  # (n, r, m) float64
    v = _weights(d).to(z.device)
    if group.is_finite:
        gs = group.elements(dtype=torch.float64, device=z.device)
    else:
        gs = group.sample(num_group_samples, _default_generator(generator), dtype=torch.float64).to(z.device)
    if method == "moments":
        # joint moments of the whole acted-on vector z (R blocks of length m), g acting on every block
        R, m = z.shape[1], group.degree
        zf = z.reshape(z.shape[0], R * m)
        mu = (v[:, None] * zf).sum(0)  # (R m,)
        S = (v[:, None] * zf).T @ zf  # (R m, R m)
        eye = torch.eye(R, dtype=torch.float64, device=z.device)
        big = torch.stack([torch.kron(eye, g) for g in gs])  # (k, R m, R m)
        gmu = big @ mu
        gS = big @ S @ big.transpose(1, 2)
        gap = (mu - gmu).square().sum(1) + (S - gS).square().sum((1, 2))
        return float(gap.mean())
    # MMD
    n = z.shape[0]
    if n > max_points:
        gen = _default_generator(generator)
        idx = torch.multinomial(v.cpu(), max_points, replacement=True, generator=gen).to(z.device)
        z, v = z[idx], torch.full((max_points,), 1.0 / max_points, dtype=torch.float64, device=z.device)
    zf = z.reshape(z.shape[0], -1)
    if bandwidth is None:
        dist = torch.cdist(zf, zf)
        med = dist[dist > 0].median() if (dist > 0).any() else torch.tensor(1.0)
        bw = float(med)
    else:
        bw = float(bandwidth)
        if not bw > 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth!r}")

    def kmean(a: Tensor, b: Tensor) -> Tensor:
        return (v[:, None] * v[None, :] * torch.exp(-torch.cdist(a, b).square() / (2 * bw**2))).sum()

    kzz = kmean(zf, zf)
    vals = []
    for g in gs:
        gz = (z @ g.T).reshape(z.shape[0], -1)
        vals.append(kzz + kmean(gz, gz) - 2 * kmean(zf, gz))
    return float(torch.stack(vals).mean().clamp_min(0.0))
