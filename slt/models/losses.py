"""Regression losses for the toy models, with native per-sample forms.

Conventions
-----------
Every loss here is a plain function ``loss(output, target) -> scalar`` of
``(B, F)`` tensors (a batch of ``B`` samples with ``F`` output features) that
returns the *mean over the batch* of a per-sample loss.  Each also carries an
attribute ``per_sample``::

    loss.per_sample(output, target) -> Tensor  # (..., B, F), (..., B, F) -> (..., B)

which reduces **only the last (feature) dimension** and keeps every leading
dimension, so it works unchanged on ``(B, F)`` and on ``(C, B, F)`` (a leading
chain dimension).  The mean of ``per_sample`` over the sample dimension equals
the scalar loss.  This is the convention that :class:`slt.losses.LossAdapter`
recognises: with it the LLC engine computes per-chain and weighted losses
without ``torch.func.vmap``.  Consequently the data must always have a trailing
feature dimension: a scalar regression target is stored as ``(B, 1)``, not
``(B,)``.

Which loss for which temperature
--------------------------------
For a regression model :math:`p(y \\mid x, w) = N(f(x, w), \\sigma^2 I)` the
negative log-likelihood per sample is, up to an additive constant,

.. math:: \\ell(w; x, y) = \\frac{1}{2\\sigma^2} \\lVert y - f(x, w) \\rVert^2 ,

which is :func:`gaussian_nll`.  The learning coefficient :math:`\\lambda` is a
property of the zero set of :math:`K(w)` and is unchanged if the loss is
multiplied by a positive constant, but the *temperature* is not: the tempered
posterior :math:`\\exp(-n\\beta L_n(w))` with :math:`L_n` the mean of
:func:`gaussian_nll` is the Bayesian posterior at inverse temperature
:math:`\\beta` (Watanabe 2009, *Algebraic Geometry and Statistical Learning
Theory*; Lau et al. 2025, arXiv 2308.12108).  Using e.g. :func:`sum_squared_error`
(a factor :math:`2\\sigma^2` larger) instead is equivalent to running at
:math:`\\beta' = 2\\sigma^2\\beta`.  The LLC estimator
:math:`\\hat\\lambda = n\\beta(E[L_n] - L_n(w^*))` converges to the same
:math:`\\lambda` either way, but finite-:math:`n\\beta` corrections (and
comparisons of :math:`n\\beta` across losses) depend on the choice.

:func:`sum_squared_error` (no factor ½) is the loss of the toy model of
superposition (Elhage et al. 2022; Chen et al. 2023), whose reference losses are
quoted in that convention.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

__all__ = [
    "gaussian_nll",
    "make_gaussian_nll",
    "sum_squared_error",
    "check_loss_shapes",
]


def check_loss_shapes(output: Tensor, target: Tensor) -> None:
    """Raise ``ValueError`` unless ``output`` and ``target`` are ``(..., B, F)`` alike."""
    if output.shape != target.shape:
        raise ValueError(
            f"output and target must have the same shape, got {tuple(output.shape)} "
            f"and {tuple(target.shape)}"
        )
    if output.ndim < 2:
        raise ValueError(
            f"expected (..., B, F) tensors with a trailing feature dimension, got shape "
            f"{tuple(output.shape)} (store a scalar target as (B, 1))"
        )


# ---------------------------------------------------------------------------
# sum of squared errors
# ---------------------------------------------------------------------------
def _sse_per_sample(output: Tensor, target: Tensor) -> Tensor:
    # (..., B, F), (..., B, F) -> (..., B)
    check_loss_shapes(output, target)
    return (target - output).square().sum(-1)


def sum_squared_error(output: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of the squared error summed over features.

    .. math:: L = \\frac{1}{B} \\sum_{b=1}^{B} \\sum_{i} (y_{b,i} - \\hat y_{b,i})^2

    Parameters
    ----------
    output, target
        ``(B, F)`` tensors (any leading dims are averaged too).

    Returns
    -------
    Tensor
        Scalar loss.  ``sum_squared_error.per_sample`` returns ``(..., B)``.
    """
    return _sse_per_sample(output, target).mean()


sum_squared_error.per_sample = _sse_per_sample  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# Gaussian negative log-likelihood
# ---------------------------------------------------------------------------
def _check_noise_std(noise_std: float) -> float:
    noise_std = float(noise_std)
    if not noise_std > 0:
        raise ValueError(f"noise_std must be positive, got {noise_std}")
    return noise_std


def _nll_per_sample(output: Tensor, target: Tensor, noise_std: float = 1.0) -> Tensor:
    # (..., B, F), (..., B, F) -> (..., B)
    noise_std = _check_noise_std(noise_std)
    check_loss_shapes(output, target)
    return (target - output).square().sum(-1) * (0.5 / noise_std**2)


def gaussian_nll(output: Tensor, target: Tensor, noise_std: float = 1.0) -> Tensor:
    """Gaussian negative log-likelihood (up to a constant), mean over the batch.

    For :math:`p(y \\mid x, w) = N(f(x, w), \\sigma^2 I)`:

    .. math:: L = \\frac{1}{B} \\sum_{b=1}^{B} \\frac{1}{2\\sigma^2}
              \\lVert y_b - f(x_b, w) \\rVert^2 .

    This is the loss whose :math:`n\\beta` is the true inverse temperature
    times :math:`n` (see the module docstring).

    Parameters
    ----------
    output, target
        ``(B, F)`` tensors (any leading dims are averaged too).
    noise_std
        :math:`\\sigma > 0`.  Note that ``functools.partial(gaussian_nll,
        noise_std=s)`` loses the ``per_sample`` attribute; use
        :func:`make_gaussian_nll` instead.

    Returns
    -------
    Tensor
        Scalar loss.  ``gaussian_nll.per_sample(output, target, noise_std=1.0)``
        returns ``(..., B)``.
    """
    return _nll_per_sample(output, target, noise_std).mean()


gaussian_nll.per_sample = _nll_per_sample  # type: ignore[attr-defined]


def make_gaussian_nll(noise_std: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """:func:`gaussian_nll` with a fixed ``noise_std``, carrying ``per_sample``.

    Parameters
    ----------
    noise_std
        :math:`\\sigma > 0`.

    Returns
    -------
    callable
        ``loss(output, target) -> scalar`` with attribute ``per_sample``.
    """
    s = _check_noise_std(noise_std)

    def loss(output: Tensor, target: Tensor) -> Tensor:
        return _nll_per_sample(output, target, s).mean()

    def per_sample(output: Tensor, target: Tensor) -> Tensor:
        return _nll_per_sample(output, target, s)

    loss.per_sample = per_sample  # type: ignore[attr-defined]
    loss.__name__ = f"gaussian_nll(noise_std={s:g})"
    loss.__doc__ = f"Gaussian NLL with noise_std={s:g}; see slt.models.losses.gaussian_nll."
    return loss
