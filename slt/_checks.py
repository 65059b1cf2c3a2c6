"""Argument checkers shared by the public functions of :mod:`slt` (private).

Two small functions that turn a user-supplied scalar into a plain Python
``int`` or ``float`` or raise a :class:`ValueError` that names the argument and
says what it must be:

* :func:`check_int` -- an integer, optionally with a lower bound;
* :func:`check_real` -- a finite real number, optionally positive or
  non-negative;
* :func:`check_flag` -- ``True`` or ``False`` (and ``None`` where that means "automatic").

Both reject ``bool`` (``True`` is an ``int`` to Python, but never a sensible
count or step size) and never truncate or round: ``3.0`` is not an integer.
The messages have one shape across the library::

    num_chains must be an integer >= 1, got 0
    lr must be positive and finite, got -0.1
    nbeta must be a real number, got 'abc'
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["check_int", "check_real", "check_flag", "is_bool"]


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Return ``value`` as a Python ``int``, checking type and lower bound.

    Parameters
    ----------
    name : str
        The argument's name, used in the error message (e.g. ``"num_chains"``
        or ``"widths[2]"``).
    value : Any
        The value to check.  Python and NumPy integers (any
        :class:`numbers.Integral`) are accepted; ``bool``, floats (even
        integral ones such as ``3.0``), strings and tensors are not.
    minimum : int, optional
        Smallest allowed value (inclusive).  ``None`` (default): no bound.

    Returns
    -------
    int
        ``int(value)``.

    Raises
    ------
    ValueError
        If ``value`` is not an integer or is below ``minimum``.  The message
        is ``"{name} must be an integer >= {minimum}, got {value!r}"`` (without
        the ``>= {minimum}`` part when there is no bound).

    Examples
    --------
    >>> check_int("num_chains", 4, 1)
    4
    >>> check_int("num_chains", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: num_chains must be an integer >= 1, got 0
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or (minimum is not None and value < minimum)
    ):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def is_bool(value: Any) -> bool:
    """``True`` for a Python or NumPy boolean (NumPy's is not a subclass of ``bool``)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def check_flag(name: str, value: Any, none: bool = False) -> bool | None:
    """Return ``value`` as a Python ``bool`` (``None`` kept where ``none`` allows it).

    ``True``/``False`` and NumPy booleans are accepted; anything else (``"yes"``, ``1``, ``"False"``) raises,
    rather than acting as its truth value (``"False"`` is truthy).

    Examples
    --------
    >>> check_flag("check_halving", None, none=True) is None
    True
    >>> check_flag("control_variate", "no")
    Traceback (most recent call last):
    ...
    ValueError: control_variate must be True or False, got 'no'
    """
    if value is None and none:
        return None
    if is_bool(value):
        return bool(value)
    allowed = "True, False or None" if none else "True or False"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _as_real(value: Any) -> float | None:
    """``value`` as a ``float`` if it is a real scalar (not bool), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an int too large for a float
            return math.inf if value > 0 else -math.inf
    item = getattr(value, "item", None)  # 0-d torch tensor / NumPy array
    if callable(item):
        try:
            scalar = item()
        except (TypeError, ValueError, RuntimeError):  # e.g. more than one element
            return None
        if scalar is not value:
            return _as_real(scalar)
    return None


def check_real(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    """Return ``value`` as a finite Python ``float``, optionally checking its sign.

    Parameters
    ----------
    name : str
        The argument's name, used in the error message (e.g. ``"nbeta"`` or
        ``"hessian_eigenvalues[3]"``).
    value : Any
        The value to check.  Accepted: Python and NumPy reals (any
        :class:`numbers.Real`, including integers), and objects whose
        ``.item()`` returns one, such as 0-d torch tensors and NumPy arrays.
        Rejected: ``bool``, complex numbers, strings, ``None`` and tensors or
        arrays with more than one element.
    positive : bool, optional
        Require ``value > 0``.  Default ``False``.
    nonnegative : bool, optional
        Require ``value >= 0``.  Default ``False``.  At most one of
        ``positive`` and ``nonnegative`` may be set.

    Returns
    -------
    float
        ``float(value)``, finite.

    Raises
    ------
    ValueError
        If ``value`` is not a real number (``"{name} must be a real number,
        got {value!r}"``), or is NaN, infinite or of the wrong sign
        (``"{name} must be finite"``, ``"{name} must be positive and
        finite"`` or ``"{name} must be non-negative and finite"``, followed by
        ``", got {value!r}"``).
    TypeError
        If both ``positive`` and ``nonnegative`` are set (a programming error).

    Examples
    --------
    >>> check_real("lr", 0.1, positive=True)
    0.1
    >>> check_real("localization", -1.0, nonnegative=True)
    Traceback (most recent call last):
    ...
    ValueError: localization must be non-negative and finite, got -1.0
    """
    if positive and nonnegative:
        raise TypeError("check_real: pass at most one of positive and nonnegative")
    v = _as_real(value)
    if v is None:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(v) or (positive and v <= 0) or (nonnegative and v < 0):
        need = "positive and finite" if positive else "non-negative and finite" if nonnegative else "finite"
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return v


def check_observables(caller: str, observables: Any) -> dict[str, Any]:
    """``observables`` as a dict ``name -> f(params)`` (``{}`` for ``None``); a clear error, before
    sampling, for anything else or for a value that is not callable."""
    from collections.abc import Mapping

    if observables is None:
        return {}
    if not isinstance(observables, Mapping):
        raise TypeError(f"{caller}: observables must be a mapping name -> f(params), got "
                        f"{type(observables).__name__}")
    for k, f in observables.items():
        if not callable(f):
            raise TypeError(f"{caller}: observable {k!r} must be callable f(params) -> (R,) tensor, got "
                            f"{type(f).__name__}")
    return dict(observables)


def probe_observables(caller: str, observables: Mapping[str, Any] | None, target: Any) -> None:
    """Each observable evaluated once at the checkpoints' w* (two rows each, ``(2K, d)`` as named parameters), before
    sampling: an observable that fails there fails with its name and, where it asked for a name the
    parameters do not have, the names it can read (a frozen parameter or a buffer is not among them: it
    stays at w*, and the model reads it itself)."""
    if not observables:
        return
    rows = 2 * target.w_star.shape[0]  # (two rows per checkpoint: a first dimension of 1 is not taken for the rows')
    params = target.spec.unflatten(target.w_star.repeat_interleave(2, 0))
    for name, f in observables.items():
        try:
            value = f(params)
        except KeyError as e:
            key = e.args[0] if e.args else None
            if not isinstance(key, str) or key in params:
                raise
            frozen = set(getattr(target.spec, "frozen", []))
            buffers = {n for n, _ in target.model.named_buffers()}
            first: dict[int, str] = {}
            canon = {n: first.setdefault(id(p), n) for n, p in target.model.named_parameters(remove_duplicate=False)}
            tied = canon.get(key) if canon.get(key) in params else None
            why = (f" is tied to {tied!r} (one tensor, sampled under that name): read params[{tied!r}]" if tied
                   else " is a frozen parameter (requires_grad=False): it stays at w* and is not sampled" if key in frozen
                   else " is a buffer, not a parameter: it is not sampled" if key in buffers
                   else " is not a sampled parameter")
            close = difflib.get_close_matches(key, list(params), n=3, cutoff=0.5)
            raise ValueError(f"{caller}: observable {name!r} reads params[{key!r}], which{why}; observables get the "
                             "sampled parameters by name, each (rows, *shape)"
                             + (f" (similar names: {', '.join(close)})" if close else
                                f" ({', '.join(list(params)[:8])}{', ...' if len(params) > 8 else ''})")) from e
        except Exception as e:  # noqa: BLE001 - the same exception, with the observable it failed in
            if hasattr(e, "add_note"):
                e.add_note(f"{caller}: in observable {name!r}, evaluated at w* before sampling")
            raise
        check_observable_value(caller, name, value, rows)


def check_observable_value(caller: str, name: str, value: Any, rows: int) -> None:
    """An observable's value must be a tensor with one row per chain, ``(rows, ...)``: one that drops the
    rows (``p["w"][0]``, a sum over everything) would be cut into the wrong chains' values."""
    import torch

    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != rows:
        what = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                else type(value).__name__)
        raise ValueError(f"{caller}: observable {name!r} must return a tensor with one row per chain, "
                         f"({rows}, ...) here, got {what}: each parameter comes as (rows, *shape), so keep the "
                         "first dimension (e.g. p['w'][:, 0] rather than p['w'][0], .sum(dim=1) rather than .sum())")
