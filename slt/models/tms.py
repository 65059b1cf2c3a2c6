"""Toy model of superposition (TMS).

The model (Elhage et al. 2022, "Toy Models of Superposition", Transformer
Circuits Thread) compresses :math:`n` features into :math:`m < n` hidden
dimensions and reconstructs them with a ReLU:

.. math:: x' = \\mathrm{ReLU}(W^\\top W x + b), \\qquad
          W \\in \\mathbb{R}^{m \\times n},\\ b \\in \\mathbb{R}^n ,

trained on the importance-weighted squared error
:math:`\\sum_i I_i (x_i - x'_i)^2` (:func:`tms_loss`).

Chen, Lau, Mendel, Wei & Murfet 2023, "Dynamical versus Bayesian phase
transitions in a toy model of superposition" (arXiv 2310.06301) study the
high-sparsity limit :math:`x = \\mu e_i` with :math:`i` uniform over the
features and :math:`\\mu \\sim U[0, 1]` (:func:`make_tms_sparse_data`), where
the population loss (:func:`tms_population_loss`) is an explicit piecewise
polynomial and the critical points are :math:`k`-gons
(:func:`kgon_parameters`, :func:`classify_tms_point`).

Loss convention
---------------
:func:`tms_loss` is the mean over samples of :math:`\\sum_i I_i (x_i - x'_i)^2`
(no factor ½, features summed, not averaged).  In the high-sparsity limit its
expectation is

.. math:: L(W, b) = \\frac1n \\sum_{i=1}^n \\int_0^1
          \\lVert \\mu e_i - \\mathrm{ReLU}(\\mu W^\\top W e_i + b) \\rVert^2 \\, d\\mu ,

which reproduces the losses of Chen et al. (5-gon 0.06874, 5-gon⁺ 0.06180,
6-gon 0.04819 for :math:`m = 2, n = 6`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import ChainModule

__all__ = [
    "ToyModelOfSuperposition",
    "make_tms_data",
    "make_tms_sparse_data",
    "tms_loss",
    "make_tms_loss",
    "geometric_importance",
    "tms_population_loss",
    "kgon_optimal_length_bias",
    "kgon_parameters",
    "classify_tms_point",
    "tms_live_columns",
]


def _check_pos_int(name: str, v: Any) -> int:
    try:
        ok = not isinstance(v, bool) and int(v) == v and int(v) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _check_generator(generator: Any) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------
class ToyModelOfSuperposition(ChainModule):
    """Toy model of superposition :math:`x' = \\mathrm{ReLU}(W^\\top W x + b)`.

    Parameters
    ----------
    n_features
        :math:`n`, the input/output dimension.
    n_hidden
        :math:`m`, the hidden dimension.
    generator
        Source of randomness for the initialisation: :math:`W` Xavier-normal
        (entries :math:`N(0, 2/(m + n))`), :math:`b = 0`.  ``None`` uses
        torch's default generator.
    dtype, device
        Of the parameters.

    Notes
    -----
    Parameters ``W`` of shape ``(n_hidden, n_features)`` and ``b`` of shape
    ``(n_features,)``; so ``model.load_state_dict(kgon_parameters(...))``
    loads a critical point.  Inputs/outputs are ``(B, n)``, or ``(C, B, n)``
    for :meth:`forward_chains`.

    References
    ----------
    N. Elhage et al., "Toy Models of Superposition", Transformer Circuits
    Thread (2022).  Z. Chen, E. Lau, J. Mendel, S. Wei, D. Murfet, "Dynamical
    versus Bayesian phase transitions in a toy model of superposition",
    arXiv 2310.06301 (2023).
    """

    def __init__(
        self,
        n_features: int,
        n_hidden: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.n_features = _check_pos_int("n_features", n_features)
        self.n_hidden = _check_pos_int("n_hidden", n_hidden)
        std = self.xavier_std(self.n_features, self.n_hidden)
        w = torch.randn(self.n_hidden, self.n_features, generator=generator, dtype=dtype, device=device)
        self.W = nn.Parameter(w * std)  # (m, n)
        self.b = nn.Parameter(torch.zeros(self.n_features, dtype=dtype, device=device))  # (n,)

    @staticmethod
    def xavier_std(n_features: int, n_hidden: int) -> float:
        """Standard deviation of the Gaussian entries of the initial W: sqrt(2 / (n_features + n_hidden))."""
        return math.sqrt(2.0 / (n_features + n_hidden))

    def extra_repr(self) -> str:
        return f"n_features={self.n_features}, n_hidden={self.n_hidden}"

    def forward_chains(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``(C, B, n) -> (C, B, n)``; ``params["W"]``: ``(C, m, n)``, ``params["b"]``: ``(C, n)``."""
        if x.ndim != 3 or x.shape[-1] != self.n_features:
            raise ValueError(f"expected input of shape (C, B, {self.n_features}), got {tuple(x.shape)}")
        w = params["W"]  # (C, m, n)
        h = torch.bmm(x, w.transpose(1, 2))  # (C, B, m)
        return torch.relu(torch.baddbmm(params["b"].unsqueeze(1), h, w))  # (C, B, n)

    def supports_analytic_grad(self, loss_fn: Callable[..., Any]) -> bool:
        """``True`` for :func:`tms_loss` and losses made by :func:`make_tms_loss`."""
        return hasattr(loss_fn, "tms_importance")

    def loss_and_grad_chains(
        self,
        params: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        weights: Tensor | None,
        loss_fn: Callable[..., Any],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        r"""Importance-weighted reconstruction loss and its gradient, by hand.

        With :math:`h = W x`, :math:`z = W^\top h + b`, :math:`r = \mathrm{ReLU}(z) - y`
        and per-sample loss :math:`\ell = \sum_i I_i r_i^2` averaged with weights
        :math:`a_b` (:math:`1/B` or the normalised sample weights):

        .. math::
            g_z = 2 a_b\, I \odot r \odot 1[z > 0],\quad
            \nabla_b L = \sum_b g_z,\quad
            \nabla_W L = \sum_b h\, g_z^\top + (W g_z)\, x^\top .

        The ReLU derivative at 0 is taken as 0, as autograd does.  Shapes:
        ``x, y`` ``(C, B, n)``; ``W`` ``(C, m, n)``; ``b`` ``(C, n)``.
        """
        imp = loss_fn.tms_importance  # (n,) or None
        w = params["W"]  # (C, m, n)
        h = torch.bmm(x, w.transpose(1, 2))  # (C, B, m)
        z = torch.baddbmm(params["b"].unsqueeze(1), h, w)  # (C, B, n)
        r = torch.relu(z) - y  # (C, B, n)
        ri = r if imp is None else r * imp.to(r)  # I ⊙ r
        per = (ri * r).sum(-1)  # (C, B)
        if weights is None:
            loss = per.mean(1)
            gz = ri * (2.0 / x.shape[1])
        else:
            loss = (per * weights).sum(1)
            gz = ri * (2.0 * weights).unsqueeze(-1)
        gz = gz * (z > 0)  # (C, B, n)
        gb = gz.sum(1)  # (C, n)
        dh = torch.bmm(gz, w.transpose(1, 2))  # (C, B, m)
        gw = torch.baddbmm(torch.bmm(h.transpose(1, 2), gz), dh.transpose(1, 2), x)  # (C, m, n)
        return loss, {"W": gw, "b": gb}

    def forward(self, x: Tensor) -> Tensor:  # (B, n) -> (B, n)
        if x.ndim != 2:
            raise ValueError(f"expected input of shape (B, {self.n_features}), got {tuple(x.shape)}")
        return super().forward(x)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def make_tms_data(
    n: int,
    n_features: int,
    generator: torch.Generator,
    sparsity: float = 0.9,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Sparse synthetic features (Elhage et al. 2022).

    Each :math:`x_i` is independently 0 with probability :math:`S` (the
    sparsity) and :math:`U[0, 1]` otherwise.  Feature importances are not part
    of the data; pass them to the loss (:func:`make_tms_loss`).

    Parameters
    ----------
    n
        Number of samples.
    n_features
        Number of features.
    generator
        Source of all randomness (its device is used).
    sparsity
        :math:`S \\in [0, 1]` (default 0.9).
    dtype
        Defaults to ``torch.get_default_dtype()``.

    Returns
    -------
    Tensor
        ``(n, n_features)``; the model's input and target.
    """
    n = _check_pos_int("n", n)
    n_features = _check_pos_int("n_features", n_features)
    generator = _check_generator(generator)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    kw = dict(generator=generator, dtype=dtype or torch.get_default_dtype(), device=generator.device)
    values = torch.rand(n, n_features, **kw)  # (n, F)
    keep = torch.rand(n, n_features, **kw) >= sparsity  # (n, F), P(keep) = 1 - S
    return values * keep


def make_tms_sparse_data(
    n: int,
    n_features: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """High-sparsity limit of Chen et al. 2023: :math:`x = \\mu e_i`.

    :math:`i` uniform on the features, :math:`\\mu \\sim U[0, 1]`; exactly one
    non-zero feature per sample.

    Parameters
    ----------
    n, n_features
        Number of samples and of features.
    generator
        Source of all randomness (its device is used).
    dtype
        Defaults to ``torch.get_default_dtype()``.

    Returns
    -------
    Tensor
        ``(n, n_features)``.
    """
    n = _check_pos_int("n", n)
    n_features = _check_pos_int("n_features", n_features)
    generator = _check_generator(generator)
    dtype = dtype or torch.get_default_dtype()
    idx = torch.randint(n_features, (n,), generator=generator, device=generator.device)  # (n,)
    mu = torch.rand(n, generator=generator, dtype=dtype, device=generator.device)  # (n,)
    x = torch.zeros(n, n_features, dtype=dtype, device=generator.device)
    x[torch.arange(n, device=generator.device), idx] = mu
    return x


def geometric_importance(n_features: int, decay: float = 0.9, *, dtype: torch.dtype | None = None) -> Tensor:
    """Importances :math:`I_i = \\text{decay}^i`, ``(n_features,)`` (Elhage et al.'s 0.9^i)."""
    n_features = _check_pos_int("n_features", n_features)
    if not decay > 0:
        raise ValueError(f"decay must be positive, got {decay}")
    return decay ** torch.arange(n_features, dtype=dtype or torch.get_default_dtype())


# ---------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------
def _tms_per_sample(output: Tensor, target: Tensor, importance: Tensor | None = None) -> Tensor:
    # (..., B, n), (..., B, n) -> (..., B)
    if output.shape != target.shape:
        raise ValueError(
            f"output and target must have the same shape, got {tuple(output.shape)} and {tuple(target.shape)}"
        )
    if output.ndim < 2:
        raise ValueError(f"expected (..., B, n_features) tensors, got shape {tuple(output.shape)}")
    sq = (target - output).square()  # (..., B, n)
    if importance is None:
        return sq.sum(-1)
    importance = torch.as_tensor(importance, dtype=sq.dtype, device=sq.device)
    if importance.shape != sq.shape[-1:]:
        raise ValueError(
            f"importance must have shape ({sq.shape[-1]},) to match the features, got {tuple(importance.shape)}"
        )
    return sq @ importance


def tms_loss(output: Tensor, target: Tensor, importance: Tensor | None = None) -> Tensor:
    """Importance-weighted reconstruction error, mean over the batch.

    .. math:: L = \\frac1B \\sum_{b=1}^B \\sum_{i=1}^n I_i (x_{b,i} - x'_{b,i})^2

    Parameters
    ----------
    output
        :math:`x'`, ``(B, n)`` (leading dims are averaged too).
    target
        :math:`x`, ``(B, n)``.
    importance
        :math:`I`, ``(n,)``; ``None`` means all ones.

    Returns
    -------
    Tensor
        Scalar.  ``tms_loss.per_sample(output, target, importance=None)``
        returns ``(..., B)`` (reduces the last, feature, dimension only); see
        :mod:`slt.models.losses` for the convention.  For fixed non-unit
        importances use :func:`make_tms_loss`, which keeps ``per_sample``.
    """
    return _tms_per_sample(output, target, importance).mean()


tms_loss.per_sample = _tms_per_sample  # type: ignore[attr-defined]
tms_loss.tms_importance = None  # type: ignore[attr-defined]  # marks the analytic-gradient fast path


def make_tms_loss(importance: Tensor | Sequence[float] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """:func:`tms_loss` with fixed importances, carrying a ``per_sample`` attribute.

    Parameters
    ----------
    importance
        ``(n,)`` non-negative importances, or ``None`` (all ones).

    Returns
    -------
    callable
        ``loss(output, target) -> scalar`` with ``loss.per_sample``.
    """
    imp: Tensor | None = None
    if importance is not None:
        imp = torch.as_tensor(importance)
        if imp.ndim != 1:
            raise ValueError(f"importance must be a 1-d tensor, got shape {tuple(imp.shape)}")
        if bool((imp < 0).any()) or not bool(torch.isfinite(imp).all()):
            raise ValueError("importance must be finite and non-negative")

    def per_sample(output: Tensor, target: Tensor) -> Tensor:
        return _tms_per_sample(output, target, imp)

    def loss(output: Tensor, target: Tensor) -> Tensor:
        return _tms_per_sample(output, target, imp).mean()

    loss.per_sample = per_sample  # type: ignore[attr-defined]
    loss.tms_importance = imp  # type: ignore[attr-defined]
    loss.__name__ = "tms_loss"
    return loss


# ---------------------------------------------------------------------------
# exact population loss in the high-sparsity limit
# ---------------------------------------------------------------------------
def _check_point(W: Tensor, b: Tensor) -> None:
    if W.ndim != 2:
        raise ValueError(f"W must have shape (n_hidden, n_features), got {tuple(W.shape)}")
    if b.ndim != 1 or b.shape[0] != W.shape[1]:
        raise ValueError(f"b must have shape ({W.shape[1]},) to match W {tuple(W.shape)}, got {tuple(b.shape)}")


def tms_population_loss(W: Tensor, b: Tensor, importance: Tensor | None = None) -> Tensor:
    """Exact expected :func:`tms_loss` under :func:`make_tms_sparse_data`.

    .. math:: L(W, b) = \\frac1n \\sum_{i=1}^n \\sum_{j=1}^n I_j \\int_0^1
              \\big(\\mu\\,\\delta_{ij} - \\mathrm{ReLU}(\\mu a_{ji} + b_j)\\big)^2 d\\mu ,
              \\qquad a = W^\\top W .

    For each :math:`(i, j)` the ReLU is active on a sub-interval
    :math:`[\\mu_-, \\mu_+] \\subseteq [0, 1]` (determined by the sign of
    :math:`a_{ji}` and the root :math:`-b_j/a_{ji}`), where the integrand is
    :math:`((\\delta_{ij} - a_{ji})\\mu - b_j)^2`; elsewhere it is
    :math:`\\delta_{ij}\\mu^2`.  Both pieces are integrated in closed form, so
    the result is exact and differentiable (almost everywhere) in ``W, b``.

    Parameters
    ----------
    W
        ``(m, n)``.
    b
        ``(n,)``.
    importance
        ``(n,)`` or ``None`` (all ones).

    Returns
    -------
    Tensor
        Scalar, in the convention of :func:`tms_loss` (features summed,
        average over the :math:`n` input directions, no factor ½).
    """
    _check_point(W, b)
    n = W.shape[1]
    a = W.T @ W  # (n, n): a[j, i] = W_j . W_i, pre-activation of output j on input e_i is mu a[j, i] + b_j
    bb = b[:, None].expand(n, n)  # (n, n): bb[j, i] = b_j
    delta = torch.eye(n, dtype=a.dtype, device=a.device)  # (n, n)
    zero = torch.zeros_like(a)
    one = torch.ones_like(a)
    safe = torch.where(a == 0, one, a)
    root = (-bb / safe).clamp(0.0, 1.0)  # where mu a + b crosses 0, clipped to [0, 1]
    pos_const = bb > 0  # a == 0: active on all of [0, 1] iff b > 0
    lo = torch.where(a > 0, root, torch.where(a < 0, zero, torch.where(pos_const, zero, one)))
    hi = torch.where(a > 0, one, torch.where(a < 0, root, one))

    def integral(p: Tensor, q: Tensor) -> Tensor:  # int_lo^hi (p mu + q)^2 dmu
        return p * p * (hi**3 - lo**3) / 3 + p * q * (hi**2 - lo**2) + q * q * (hi - lo)

    # inactive part: delta * mu^2 on [0,1] minus on [lo, hi]; active part: ((delta - a) mu - b)^2 on [lo, hi]
    per_pair = delta / 3 - delta * (hi**3 - lo**3) / 3 + integral(delta - a, -bb)  # (n_out j, n_in i)
    if importance is not None:
        importance = torch.as_tensor(importance, dtype=a.dtype, device=a.device)
        if importance.shape != (n,):
            raise ValueError(f"importance must have shape ({n},), got {tuple(importance.shape)}")
        per_pair = per_pair * importance[:, None]
    return per_pair.sum() / n


# ---------------------------------------------------------------------------
# k-gon critical points
# ---------------------------------------------------------------------------
def _kgon_W_b(
    k: int, n_features: int, n_hidden: int, length: Tensor, bias: Tensor, dead_biases: Tensor
) -> tuple[Tensor, Tensor]:
    dtype = length.dtype
    ang = 2 * math.pi * torch.arange(k, dtype=dtype) / k  # (k,)
    cols = torch.stack([torch.cos(ang), torch.sin(ang)]) * length  # (2, k)
    W = torch.zeros(n_hidden, n_features, dtype=dtype)
    W = W.index_put((torch.arange(2)[:, None], torch.arange(k)[None, :]), cols)
    b = torch.cat([bias * torch.ones(k, dtype=dtype), dead_biases.to(dtype)])
    return W, b


@functools.lru_cache(maxsize=None)
def _kgon_optimum(k: int, n_features: int) -> tuple[float, float]:
    if k <= 4:
        # every pairwise cosine 2*pi*j/k is <= 0: with l = 1, b = 0 each live feature is
        # reconstructed exactly and the loss (n - k) / (3n) is the floor set by the dead columns
        return 1.0, 0.0
    dead = torch.zeros(n_features - k, dtype=torch.float64)
    best: tuple[float, float, float] | None = None
    for l0 in (1.2, 1.8):
        for b0 in (-0.3, -1.0):
            p = torch.tensor([l0, b0], dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS(
                [p], lr=1.0, max_iter=200, tolerance_grad=1e-13, tolerance_change=0.0,
                history_size=20, line_search_fn="strong_wolfe",
            )

            def closure() -> Tensor:
                opt.zero_grad()
                loss = tms_population_loss(*_kgon_W_b(k, n_features, 2, p[0], p[1], dead))
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                loss = tms_population_loss(*_kgon_W_b(k, n_features, 2, p[0], p[1], dead)).item()
            if math.isfinite(loss) and (best is None or loss < best[0] - 1e-15):
                best = (loss, abs(p[0].item()), p[1].item())
    assert best is not None
    return best[1], best[2]


def kgon_optimal_length_bias(k: int, n_features: int = 6) -> tuple[float, float]:
    """Column length :math:`l` and bias :math:`b` minimising the k-gon's population loss.

    Minimises :func:`tms_population_loss` (high-sparsity limit) over
    :math:`(l, b)` for the configuration of :func:`kgon_parameters` (dead
    columns with bias 0) by multi-start L-BFGS in float64; results are cached.
    For :math:`k \\le 4` the optimum is :math:`l = 1, b = 0` (no positive
    interference); for :math:`k = 5, 6` it reproduces Chen et al.'s
    :math:`(1.17046, -0.28230)` and :math:`(1.32052, -0.61813)`.

    Returns
    -------
    (float, float)
        ``(length, bias)``.
    """
    n_features = _check_pos_int("n_features", n_features)
    k = _check_pos_int("k", k)
    if k > n_features:
        raise ValueError(f"k must be at most n_features = {n_features}, got {k}")
    return _kgon_optimum(k, n_features)


def kgon_parameters(
    k: int,
    n_features: int = 6,
    n_hidden: int = 2,
    length: float | None = None,
    bias: float | None = None,
    dead_bias: float = 0.0,
    plus: bool = False,
    *,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """The k-gon critical point of the TMS (Chen et al. 2023).

    Columns :math:`W_j = l(\\cos(2\\pi j/k), \\sin(2\\pi j/k), 0, \\dots)` with
    bias :math:`b_j = b` for :math:`j < k`; the remaining columns are zero with
    bias ``dead_bias`` (should be :math:`\\le 0` to stay dead), except that with
    ``plus=True`` the first dead column (index ``k``) gets bias
    :math:`1/(2n)` (the "k-gon⁺", which lowers the loss by :math:`1/(4n^2)`).

    Parameters
    ----------
    k
        Number of live columns, :math:`1 \\le k \\le n`.
    n_features, n_hidden
        :math:`n` and :math:`m \\ge 2` (the polygon lies in the first two
        hidden coordinates).
    length, bias
        :math:`l` and :math:`b`; ``None`` takes the value from
        :func:`kgon_optimal_length_bias` (the population-loss optimum, e.g.
        :math:`(1.17046, -0.28230)` for the 5-gon and
        :math:`(1.32052, -0.61813)` for the 6-gon; both to all printed digits
        of the reference values).
    dead_bias
        Bias of the dead columns (default 0).  **For LLC estimation use a
        negative value** (e.g. ``-0.1``): with bias exactly 0 the point is
        critical only in the sense that autograd's ``ReLU'(0) = 0`` gives a
        zero gradient; raising a dead bias to :math:`\\epsilon > 0` lowers the
        population loss by :math:`\\epsilon/n - \\epsilon^2`, so the k-gon with
        a zero dead bias is not a local minimum (chains drift towards the
        k-gon⁺).  With a negative dead bias the dead column is locally flat
        (the setting of Chen et al.'s :math:`\\lambda = 7` for the 5-gon).
    plus
        Give one dead column the bias :math:`1/(2n)` (requires :math:`k < n`).
    dtype
        Of the returned tensors (default float64).

    Returns
    -------
    dict
        ``{"W": (n_hidden, n_features), "b": (n_features,)}``; the keys are
        the parameter names of :class:`ToyModelOfSuperposition`.
    """
    n_features = _check_pos_int("n_features", n_features)
    n_hidden = _check_pos_int("n_hidden", n_hidden)
    k = _check_pos_int("k", k)
    if n_hidden < 2:
        raise ValueError(f"n_hidden must be at least 2 for a k-gon, got {n_hidden}")
    if k > n_features:
        raise ValueError(f"k must be at most n_features = {n_features}, got {k}")
    if plus and k >= n_features:
        raise ValueError(f"plus=True needs a dead column (k < n_features), got k = {k}, n_features = {n_features}")
    if length is None or bias is None:
        l_opt, b_opt = kgon_optimal_length_bias(k, n_features)
        length = l_opt if length is None else length
        bias = b_opt if bias is None else bias
    if not length > 0:
        raise ValueError(f"length must be positive, got {length}")
    dead = torch.full((n_features - k,), float(dead_bias), dtype=torch.float64)
    if plus:
        dead[0] = 1.0 / (2 * n_features)
    W, b = _kgon_W_b(
        k, n_features, n_hidden,
        torch.tensor(float(length), dtype=torch.float64), torch.tensor(float(bias), dtype=torch.float64), dead,
    )
    return {"W": W.to(dtype), "b": b.to(dtype)}


# ---------------------------------------------------------------------------
# classification of a TMS parameter
# ---------------------------------------------------------------------------
def classify_tms_point(
    W: Tensor,
    b: Tensor,
    tol: float = 1e-2,
    dead_tol: float = 0.1,
) -> dict[str, Any]:
    """Describe a TMS parameter in the language of Chen et al.'s k-gons.

    Parameters
    ----------
    W
        ``(m, n)``.
    b
        ``(n,)``.
    tol
        Tolerance for regularity: relative spread of live column lengths,
        absolute deviation (radians) of the angular gaps from :math:`2\\pi/k`,
        absolute spread of the live biases, and the threshold above which a
        dead column's bias counts as positive.  Also the relative threshold for
        the third and further singular values when :math:`m > 2`.
    dead_tol
        A column is dead when its norm is below ``dead_tol`` times the largest
        column norm.

    Returns
    -------
    dict
        ``k`` (live columns), ``live`` and ``dead`` (index lists),
        ``dead_positive_bias`` (dead indices with bias > ``tol``),
        ``lengths`` and ``angles`` (of the live columns, in index order; angles
        in the plane of the top two singular vectors, ``None`` if the live
        columns are not planar), ``planar``, ``equal_lengths``,
        ``equal_angles``, ``equal_biases``, ``regular`` (all four),
        ``antipodal_pairs`` (pairs ``(i, j)`` of live columns with
        :math:`W_i \\approx -W_j`), ``length`` and ``bias`` (means over live
        columns) and ``name``: ``"{k}-gon"`` followed by one ``+`` per dead
        column with positive bias (``"5-gon"``, ``"5-gon+"``, ``"6-gon"``), or
        ``None`` if the live columns do not form a regular polygon.
    """
    W = torch.as_tensor(W).detach().to(torch.float64).cpu()
    b = torch.as_tensor(b).detach().to(torch.float64).cpu()
    _check_point(W, b)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if not 0 < dead_tol < 1:
        raise ValueError(f"dead_tol must be in (0, 1), got {dead_tol}")
    norms = W.norm(dim=0)  # (n,)
    nmax = float(norms.max())
    live = [i for i in range(W.shape[1]) if nmax > 0 and float(norms[i]) >= dead_tol * nmax]
    dead = [i for i in range(W.shape[1]) if i not in live]
    k = len(live)
    dead_pos = [i for i in dead if float(b[i]) > tol]
    res: dict[str, Any] = {
        "k": k,
        "live": live,
        "dead": dead,
        "dead_positive_bias": dead_pos,
        "dead_negative_bias": [i for i in dead if float(b[i]) < -tol],
        "lengths": norms[live].tolist(),
        "angles": None,
        "planar": False,
        "equal_lengths": False,
        "equal_angles": False,
        "equal_biases": False,
        "regular": False,
        "antipodal_pairs": [],
        "length": float(norms[live].mean()) if k else 0.0,
        "bias": float(b[live].mean()) if k else float("nan"),
        "name": None,
    }
    if k == 0:
        return res
    Wl = W[:, live]  # (m, k)
    lengths = norms[live]
    res["equal_lengths"] = bool(((lengths / lengths.mean() - 1).abs() <= tol).all())
    res["equal_biases"] = bool((b[live] - b[live].mean()).abs().max() <= tol)
    unit = Wl / lengths  # (m, k)
    cos = unit.T @ unit  # (k, k)
    res["antipodal_pairs"] = [
        (live[p], live[q])
        for p in range(k)
        for q in range(p + 1, k)
        if float(cos[p, q]) <= -math.cos(tol) and abs(float(lengths[p] / lengths[q]) - 1) <= tol
    ]
    # planarity: project onto the top-2 left singular vectors
    u, s, _ = torch.linalg.svd(Wl, full_matrices=False)
    planar = s.numel() <= 2 or float(s[2]) <= tol * float(s[0])
    res["planar"] = bool(planar)
    if planar:
        basis = u[:, :2] if u.shape[1] >= 2 else torch.cat([u, torch.zeros_like(u)], 1)
        if W.shape[0] == 2:
            basis = torch.eye(2, dtype=W.dtype)  # keep the original coordinates when m = 2
        coords = basis.T @ Wl  # (2, k)
        angles = torch.atan2(coords[1], coords[0])  # (k,)
        res["angles"] = angles.tolist()
        srt = torch.sort(angles).values
        gaps = torch.cat([srt[1:] - srt[:-1], (srt[:1] + 2 * math.pi) - srt[-1:]])
        res["equal_angles"] = bool(((gaps - 2 * math.pi / k).abs() <= tol).all())
    res["regular"] = bool(res["planar"] and res["equal_lengths"] and res["equal_angles"] and res["equal_biases"])
    if res["regular"]:
        res["name"] = f"{k}-gon" + "+" * len(dead_pos)
    return res


def tms_live_columns(W: Tensor, b: Tensor | None = None, rel_threshold: float = 0.5) -> int:
    """Number of live columns: :math:`\\#\\{i : \\lVert W_i\\rVert > \\text{rel\\_threshold}\\cdot\\max_j \\lVert W_j\\rVert\\}`.

    The phase label of a (noisy) posterior draw near a k-gon (Chen et al. 2023): the k live
    columns of a k-gon have equal length l ≈ 1.2-1.3 while dead columns fluctuate around 0, so
    the count is robust where :func:`classify_tms_point`'s regularity tests (made for trained
    points) are not.  ``b`` is accepted (and ignored) so that ``lambda p: tms_live_columns(**p)``
    works on a parameter dict.
    """
    W = torch.as_tensor(W)
    if W.ndim != 2:
        raise ValueError(f"W must have shape (m, n), got {tuple(W.shape)}")
    if not 0 < rel_threshold < 1:
        raise ValueError(f"rel_threshold must be in (0, 1), got {rel_threshold}")
    norms = W.detach().double().norm(dim=0)  # (n,)
    top = float(norms.max())
    if top == 0:
        return 0
    return int((norms > rel_threshold * top).sum())
