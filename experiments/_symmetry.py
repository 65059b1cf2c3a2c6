r"""Symmetry paths from config (``symmetry/``), built on :mod:`slt.symmetry`.

Every path is a mixture :math:`q_h = (1-h)\,q_0 + h\,q_1` (:func:`slt.symmetry.mix`)
from the data as generated, :math:`q_0`, to

* ``operation=symmetrize``: :math:`q_1 = q_G` (:func:`slt.symmetry.symmetrize`;
  exact orbits, or one Monte-Carlo orbit sample per point when
  :math:`|G|\,n` would exceed 2·10⁶ rows);
* ``operation=break``: :math:`q_1 = e^{s f_\perp} q_0 / Z`
  (:func:`slt.symmetry.break_symmetry`, strength ``s = symmetry.strength``,
  ``f`` the first coordinate), which removes the G-invariance of a symmetric q.

Since all paths are mixtures, :func:`slt.symmetry.llc_susceptibility`
(``symmetry.susceptibility=true``) gives the quenched :math:`d\hat\lambda/dh`
at the same ``h`` from the same draws.
"""

from __future__ import annotations

from typing import Any

import torch

from slt import symmetry as S

__all__ = ["make_group", "path_endpoints", "mixed"]


def make_group(name: str, degree: int, plane: bool = False) -> S.Group:
    """The group ``name`` acting on vectors of length ``degree``.

    ``plane=True`` (points of a regular polygon in R²): ``cyclic`` and
    ``dihedral`` are the rotations/symmetries of the ``degree``-gon;
    otherwise they act on ``degree`` coordinates (cyclic shifts; dihedral
    needs the plane).
    """
    if name == "permutation":
        return S.Permutation(degree)
    if name == "cyclic":
        return S.Cyclic(degree, action="rotation") if plane else S.Cyclic(degree)
    if name == "dihedral":
        if not plane:
            raise ValueError("symmetry.group=dihedral acts on the plane: use it with a polygon sample space")
        return S.Dihedral(degree)
    if name == "reflection":
        return S.Reflection(2 if plane else degree)
    if name == "sign_flips":
        return S.SignFlips(degree)
    raise ValueError(f"unknown symmetry group {name!r}")


def path_endpoints(sym: Any, X: torch.Tensor, group: S.Group, gen: torch.Generator) -> tuple[Any, Any]:
    """``(q0, q1)`` for ``sym.operation`` (``symmetrize`` or ``break``)."""
    if sym.operation == "symmetrize":
        order = group.order or 0
        num = None if group.is_finite and order * X.shape[0] <= 2_000_000 else 1
        q1 = S.symmetrize(X, group, generator=gen, acts_on=sym.acts_on, num_samples=num)
        if num is None:
            q1 = S.compress(q1)
    elif sym.operation == "break":
        q1 = S.break_symmetry(X, group, float(sym.strength), acts_on=sym.acts_on, generator=gen)
    else:
        raise ValueError(f"unknown symmetry.operation {sym.operation!r}")
    return X, q1


def mixed(q0: Any, q1: Any, h: float) -> Any:
    """:math:`q_h`; the endpoints themselves at ``h = 0`` and ``h = 1``."""
    if h == 0.0:
        return q0
    if h == 1.0:
        return q1
    return S.mix(q0, q1, h)
