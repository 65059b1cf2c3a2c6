"""A regression model whose population loss is a normal crossing.

The model is scalar regression through the origin with a monomial slope,

.. math:: f(x, w) = \\Big(\\prod_{i=1}^d w_i^{k_i}\\Big)\\, x ,
          \\qquad x \\in \\mathbb{R},\\ w \\in \\mathbb{R}^d ,

with true function :math:`0`: :math:`X \\sim N(0, 1)`, :math:`Y = \\sigma\\varepsilon`.
With the Gaussian likelihood loss :func:`slt.models.losses.gaussian_nll`
(:math:`\\sigma = 1`)

.. math:: L(w) = \\tfrac12 E[(Y - f(X, w))^2]
          = \\tfrac12 \\prod_i w_i^{2 k_i}\\, E[X^2] + \\tfrac12 ,

so :math:`K(w) = \\tfrac12 \\prod_i w_i^{2k_i}` is in normal crossing form and
(Watanabe 2009, *Algebraic Geometry and Statistical Learning Theory*, Thm 6.1/
Remark on normal crossings) :math:`\\lambda = \\min_{i: k_i > 0} 1/(2k_i)` with
multiplicity the number of indices attaining the minimum.

The empirical minimum is not the true parameter
--------------------------------------------------
The empirical loss depends on :math:`w` only through the slope
:math:`p = \\prod_i w_i^{k_i}`:
:math:`L_n(w) = \\tfrac12 \\overline{(y - p x)^2}`, minimised at
:math:`\\hat p = \\sum x y / \\sum x^2 \\neq 0` (of order :math:`n^{-1/2}`).
Hence the true singular point :math:`w = 0` is a critical point of
:math:`L_n` (for :math:`\\sum_i k_i \\ge 2`) but in general **not** a minimum:
e.g. for :math:`d = 2, k = (1, 1)` it is a saddle.  The LLC estimator
:math:`n\\beta (E[L_n] - L_n(w^*))` wants :math:`w^*` to be a local minimum of
:math:`L_n`, otherwise chains find lower loss than :math:`L_n(w^*)` (a
negative-drift warning sign); the resulting bias is at most
:math:`n\\beta (L_n(0) - \\min L_n) = \\beta\\, n \\hat p^2 \\overline{x^2} / 2
\\approx \\beta \\chi^2_1 / 2`, i.e. :math:`O(1/\\log n)` at the default
:math:`\\beta = 1/\\log n`.  Gradient descent started exactly at 0 does not
move (the gradient vanishes there), so either start from a small random
:math:`w` and :func:`slt.training.train`, or use
:meth:`NormalCrossing.empirical_minimum` (closed form).  If every :math:`k_i`
is even the slope cannot be negative and the minimum is :math:`\\max(\\hat p, 0)`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import ChainModule

__all__ = ["NormalCrossing", "make_normal_crossing_data"]


class NormalCrossing(ChainModule):
    """Scalar regression :math:`f(x, w) = (\\prod_i w_i^{k_i})\\, x` with normal-crossing :math:`K`.

    Parameters
    ----------
    powers
        Non-negative integers :math:`k_1, \\dots, k_d`, at least one positive.
    init
        Initial value of every :math:`w_i` (default 0, the true singular point;
        see the module docstring for why that is not the empirical minimum).
    dtype, device
        Of the parameter.

    Notes
    -----
    One parameter, ``w`` of shape ``(d,)``.  Inputs and outputs are ``(B, 1)``
    (``(C, B, 1)`` for :meth:`forward_chains`).  With
    :func:`slt.models.losses.gaussian_nll` and :func:`make_normal_crossing_data`
    (unit variances) :math:`K(w) = \\tfrac12 \\prod_i w_i^{2k_i}` and
    :math:`\\lambda = \\min_{k_i > 0} 1/(2k_i)` (:attr:`learning_coefficient`).

    References
    ----------
    S. Watanabe, *Algebraic Geometry and Statistical Learning Theory*,
    Cambridge University Press (2009), ch. 6.
    """

    def __init__(
        self,
        powers: Sequence[int],
        init: float = 0.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        try:
            ks = list(powers)
        except TypeError as e:
            raise ValueError(f"powers must be a sequence of non-negative integers, got {powers!r}") from e
        if len(ks) == 0:
            raise ValueError("powers must be non-empty")
        def bad(k: object) -> bool:
            try:
                return isinstance(k, bool) or int(k) != k or k < 0  # type: ignore[call-overload,operator]
            except (TypeError, ValueError):
                return True

        if any(bad(k) for k in ks):
            raise ValueError(f"powers must be non-negative integers, got {ks}")
        ks = [int(k) for k in ks]
        if max(ks) == 0:
            raise ValueError(f"at least one power must be positive, got {ks}")
        self.powers: tuple[int, ...] = tuple(ks)
        self.w = nn.Parameter(torch.full((len(ks),), float(init), dtype=dtype, device=device))
        active = [i for i, k in enumerate(ks) if k > 0]
        # only indices with k_i > 0 enter the product (avoids 0**0 gradients)
        self.register_buffer("_active", torch.tensor(active, dtype=torch.long, device=device), persistent=False)
        self.register_buffer(
            "_exponents", torch.tensor([ks[i] for i in active], dtype=torch.long, device=device), persistent=False
        )

    @property
    def dim(self) -> int:
        return len(self.powers)

    @property
    def learning_coefficient(self) -> float:
        """:math:`\\lambda = \\min_{k_i > 0} 1/(2 k_i)`."""
        return 1.0 / (2 * max(self.powers))

    @property
    def multiplicity(self) -> int:
        """Number of indices attaining the minimum in :attr:`learning_coefficient`."""
        kmax = max(self.powers)
        return sum(1 for k in self.powers if k == kmax)

    def extra_repr(self) -> str:
        return f"powers={self.powers}"

    def slope(self, w: Tensor) -> Tensor:
        """:math:`\\prod_i w_i^{k_i}` for ``w`` of shape ``(..., d)`` -> ``(...)``."""
        wa = w.index_select(-1, self._active)  # (..., d_active)
        return wa.pow(self._exponents.to(wa.dtype)).prod(-1)

    def forward_chains(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``(C, B, 1) -> (C, B, 1)``; ``params["w"]`` is ``(C, d)``."""
        if x.ndim != 3 or x.shape[-1] != 1:
            raise ValueError(f"expected input of shape (C, B, 1), got {tuple(x.shape)}")
        p = self.slope(params["w"])  # (C,)
        return p[:, None, None] * x  # (C, B, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1) -> (B, 1)
        if x.ndim != 2 or x.shape[-1] != 1:
            raise ValueError(f"expected input of shape (B, 1), got {tuple(x.shape)}")
        return super().forward(x)

    @torch.no_grad()
    def empirical_minimum(self, x: Tensor, y: Tensor) -> Tensor:
        """A minimiser of the empirical squared-error loss, in closed form.

        The loss depends on :math:`w` through :math:`p = \\prod w_i^{k_i}` only;
        the best reachable slope is :math:`\\hat p = \\sum xy / \\sum x^2`
        (clamped at 0 when every :math:`k_i` is even).  Returned is the
        "balanced" point of the minimising set: :math:`|w_i| = |\\hat p|^{1/\\sum k}`
        on every index with :math:`k_i > 0` (0 elsewhere), with one odd-power
        coordinate negated if :math:`\\hat p < 0`.

        Parameters
        ----------
        x, y
            ``(n, 1)`` data.

        Returns
        -------
        Tensor
            ``(d,)``; copy it into ``self.w`` to make it :math:`w^*`.
        """
        if x.shape != y.shape or x.ndim != 2 or x.shape[-1] != 1:
            raise ValueError(f"expected x and y of shape (n, 1), got {tuple(x.shape)} and {tuple(y.shape)}")
        p_hat = (x * y).sum() / x.square().sum()
        odd = [i for i, k in enumerate(self.powers) if k % 2 == 1]
        if not odd:
            p_hat = p_hat.clamp_min(0.0)
        total = sum(self.powers)
        mag = p_hat.abs() ** (1.0 / total)
        w = torch.zeros(self.dim, dtype=self.w.dtype, device=self.w.device)
        w[self._active] = mag.to(w.dtype)
        if p_hat < 0:
            w[odd[0]] = -w[odd[0]]
        return w


def make_normal_crossing_data(
    n: int,
    generator: torch.Generator,
    noise_std: float = 1.0,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Data for :class:`NormalCrossing`: :math:`X \\sim N(0,1)`, :math:`Y = \\sigma\\varepsilon`.

    The true function is 0 (realised at :math:`w = 0`).

    Parameters
    ----------
    n
        Number of samples.
    generator
        Source of all randomness (its device is used).
    noise_std
        :math:`\\sigma \\ge 0`.
    dtype
        Defaults to ``torch.get_default_dtype()``.

    Returns
    -------
    X, Y : Tensor
        ``(n, 1)`` each.
    """
    try:
        ok = not isinstance(n, bool) and int(n) == n and n > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    kw = dict(generator=generator, dtype=dtype or torch.get_default_dtype(), device=generator.device)
    x = torch.randn(int(n), 1, **kw)  # (n, 1)
    y = noise_std * torch.randn(int(n), 1, **kw)  # (n, 1)
    return x, y
