"""Deep linear networks and reduced-rank regression.

A deep linear network (DLN) with widths :math:`H_0, \\dots, H_L` is

.. math:: f(x, w) = W_L W_{L-1} \\cdots W_1 x, \\qquad W_s \\in \\mathbb{R}^{H_s \\times H_{s-1}},

optionally with a bias per layer.  With one hidden layer it is reduced-rank
regression (Aoyagi & Watanabe 2005, "Stochastic complexities of reduced rank
regression in Bayesian estimation", Neural Networks 18(7)); the learning
coefficient of the general DLN with a true function of rank :math:`r` is given
by Aoyagi 2024, "Consideration on the learning efficiency of multiple-layered
neural networks with linear units", Neural Networks.  Both formulas assume the
Gaussian likelihood :math:`N(f(x, w), \\sigma^2 I)`, i.e. the loss
:func:`slt.models.losses.gaussian_nll`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import ChainModule

__all__ = [
    "DeepLinearNetwork",
    "ReducedRankRegression",
    "make_dln_data",
]


def _check_widths(widths: Sequence[int]) -> list[int]:
    try:
        items = list(widths)
    except TypeError as e:  # not iterable
        raise ValueError(f"widths must be a sequence of positive integers, got {widths!r}") from e
    if len(items) < 2:
        raise ValueError(f"widths must have at least 2 entries (input and output), got {items}")
    if not all(_is_int(w) and w > 0 for w in items):
        raise ValueError(f"widths must be positive integers, got {items}")
    return [int(w) for w in items]


def _is_int(v: object) -> bool:
    try:
        return not isinstance(v, bool) and int(v) == v  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False


class _Linear(nn.Module):
    """A bias-optional linear map holding ``weight`` (out, in) and ``bias`` (out,)."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        bias: bool,
        generator: torch.Generator | None,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ):
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)  # nn.Linear's default scale
        w = torch.rand(n_out, n_in, generator=generator, dtype=dtype, device=device)
        self.weight = nn.Parameter((2 * w - 1) * bound)  # (out, in)
        if bias:
            bb = torch.rand(n_out, generator=generator, dtype=dtype, device=device)
            self.bias: nn.Parameter | None = nn.Parameter((2 * bb - 1) * bound)  # (out,)
        else:
            self.register_parameter("bias", None)


class DeepLinearNetwork(ChainModule):
    """Deep linear network :math:`f(x, w) = W_L \\cdots W_1 x` (+ biases).

    Parameters
    ----------
    widths
        :math:`[H_0, H_1, \\dots, H_L]`: input width, hidden widths, output
        width (at least two entries, all positive).
    bias
        Add a bias vector to every layer (default ``False``: the purely linear
        network of Aoyagi 2024, to which the closed-form LLC applies).
    generator
        Source of randomness for the initialisation (each entry uniform on
        :math:`[-1/\\sqrt{H_{s-1}}, 1/\\sqrt{H_{s-1}}]`, as ``nn.Linear``).
        ``None`` uses torch's default generator.
    dtype, device
        Of the parameters.

    Notes
    -----
    Parameters are named ``layers.{s}.weight`` with shape
    ``(widths[s+1], widths[s])`` and, with ``bias=True``, ``layers.{s}.bias``
    with shape ``(widths[s+1],)``.  Inputs are ``(B, H_0)``, outputs
    ``(B, H_L)``; :meth:`forward_chains` takes ``(C, B, H_0)`` and returns
    ``(C, B, H_L)`` using batched matrix products.

    References
    ----------
    M. Aoyagi, "Consideration on the learning efficiency of multiple-layered
    neural networks with linear units", Neural Networks (2024).
    """

    def __init__(
        self,
        widths: Sequence[int],
        bias: bool = False,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.widths: list[int] = _check_widths(widths)
        self.has_bias = bool(bias)
        self.layers = nn.ModuleList(
            _Linear(a, b, self.has_bias, generator, dtype, device)
            for a, b in zip(self.widths[:-1], self.widths[1:])
        )

    @property
    def n_in(self) -> int:
        return self.widths[0]

    @property
    def n_out(self) -> int:
        return self.widths[-1]

    @property
    def depth(self) -> int:
        """Number of weight matrices :math:`L`."""
        return len(self.layers)

    def extra_repr(self) -> str:
        return f"widths={self.widths}, bias={self.has_bias}"

    def forward_chains(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Evaluate C networks: ``(C, B, H_0) -> (C, B, H_L)``.

        ``params["layers.{s}.weight"]`` is ``(C, H_{s+1}, H_s)`` and
        ``params["layers.{s}.bias"]`` (if present) is ``(C, H_{s+1})``.
        """
        if x.ndim != 3 or x.shape[-1] != self.widths[0]:
            raise ValueError(
                f"expected input of shape (C, B, {self.widths[0]}), got {tuple(x.shape)}"
            )
        h = x  # (C, B, H_0)
        for s in range(self.depth):
            w = params[f"layers.{s}.weight"]  # (C, H_{s+1}, H_s)
            if self.has_bias:
                b = params[f"layers.{s}.bias"]  # (C, H_{s+1})
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))  # (C, B, H_{s+1})
            else:
                h = torch.bmm(h, w.transpose(1, 2))  # (C, B, H_{s+1})
        return h

    def forward(self, x: Tensor) -> Tensor:  # (B, H_0) -> (B, H_L)
        if x.ndim != 2:
            raise ValueError(f"expected input of shape (B, {self.widths[0]}), got {tuple(x.shape)}")
        return super().forward(x)

    def product(self) -> Tensor:
        """End-to-end matrix :math:`W_L \\cdots W_1` of shape ``(H_L, H_0)`` (ignores biases)."""
        m = self.layers[0].weight
        for layer in list(self.layers)[1:]:
            m = layer.weight @ m
        return m

    @torch.no_grad()
    def set_weights(self, weights: Sequence[Tensor]) -> "DeepLinearNetwork":
        """Copy matrices (e.g. the ``teacher`` of :func:`make_dln_data`) into the layers.

        Biases, if any, are set to zero.  Returns ``self``.
        """
        weights = list(weights)
        if len(weights) != self.depth:
            raise ValueError(f"expected {self.depth} weight matrices, got {len(weights)}")
        for s, (layer, w) in enumerate(zip(self.layers, weights)):
            if tuple(w.shape) != tuple(layer.weight.shape):
                raise ValueError(
                    f"weight {s} has shape {tuple(w.shape)}, expected {tuple(layer.weight.shape)}"
                )
            layer.weight.copy_(w)
            if layer.bias is not None:
                layer.bias.zero_()
        return self


class ReducedRankRegression(DeepLinearNetwork):
    """Reduced-rank regression :math:`f(x, w) = B A x`, a DLN with one hidden layer.

    Parameters
    ----------
    n_in, hidden, n_out
        :math:`N` (input), :math:`H` (rank bound / hidden width), :math:`M`
        (output); the network is ``DeepLinearNetwork([n_in, hidden, n_out])``.
    bias, generator, dtype, device
        As for :class:`DeepLinearNetwork`.

    References
    ----------
    M. Aoyagi and S. Watanabe, "Stochastic complexities of reduced rank
    regression in Bayesian estimation", Neural Networks 18(7) (2005) 924-933.
    """

    def __init__(
        self,
        n_in: int,
        hidden: int,
        n_out: int,
        bias: bool = False,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__(
            [n_in, hidden, n_out], bias, generator=generator, dtype=dtype, device=device
        )


def make_dln_data(
    widths: Sequence[int],
    rank: int,
    n: int,
    generator: torch.Generator,
    noise_std: float = 1.0,
    input_std: float = 1.0,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Regression data from a random deep linear teacher of given rank.

    .. math:: X \\sim N(0, \\sigma_x^2 I_{H_0}), \\qquad
              Y = T_L \\cdots T_1 X + \\sigma \\varepsilon, \\quad
              \\varepsilon \\sim N(0, I_{H_L}),

    where the teacher product :math:`T_L \\cdots T_1` has rank exactly
    ``rank`` (almost surely): :math:`T_1 = U V^\\top` with Gaussian
    :math:`U \\in \\mathbb{R}^{H_1 \\times r}`, :math:`V \\in \\mathbb{R}^{H_0 \\times r}`
    and the other :math:`T_s` Gaussian, entries of variance :math:`1/H_{s-1}`.
    ``rank = 0`` gives the zero function (all teacher matrices zero).

    Parameters
    ----------
    widths
        :math:`[H_0, \\dots, H_L]` as for :class:`DeepLinearNetwork`.
    rank
        True rank :math:`r`, with :math:`0 \\le r \\le \\min_s H_s`.
    n
        Number of samples.
    generator
        Source of all randomness (its device is used for the tensors).
    noise_std
        :math:`\\sigma \\ge 0`, the output noise standard deviation.
    input_std
        :math:`\\sigma_x > 0`.
    dtype
        Defaults to ``torch.get_default_dtype()``.

    Returns
    -------
    X : Tensor
        ``(n, H_0)`` inputs.
    Y : Tensor
        ``(n, H_L)`` targets.
    teacher : list of Tensor
        The matrices :math:`T_1, \\dots, T_L`, ``T_s`` of shape ``(H_s, H_{s-1})``
        (load them with :meth:`DeepLinearNetwork.set_weights`).
    """
    ws = _check_widths(widths)
    if not _is_int(rank) or not 0 <= rank <= min(ws):
        raise ValueError(f"rank must be an integer in [0, min(widths) = {min(ws)}], got {rank!r}")
    rank = int(rank)
    if not _is_int(n) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    n = int(n)
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    if not input_std > 0:
        raise ValueError(f"input_std must be positive, got {input_std}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    dtype = dtype or torch.get_default_dtype()
    kw = dict(generator=generator, dtype=dtype, device=generator.device)

    teacher: list[Tensor] = []
    for s, (a, b) in enumerate(zip(ws[:-1], ws[1:])):
        if rank == 0:
            t = torch.zeros(b, a, dtype=dtype, device=generator.device)
        elif s == 0:
            u = torch.randn(b, rank, **kw) / math.sqrt(rank)  # (H_1, r)
            v = torch.randn(a, rank, **kw) / math.sqrt(a)  # (H_0, r)
            t = u @ v.T  # (H_1, H_0), rank r
        else:
            t = torch.randn(b, a, **kw) / math.sqrt(a)  # (H_s, H_{s-1})
        teacher.append(t)

    x = torch.randn(n, ws[0], **kw) * input_std  # (n, H_0)
    y = x
    for t in teacher:
        y = y @ t.T
    y = y + noise_std * torch.randn(n, ws[-1], **kw)  # (n, H_L)
    return x, y, teacher
