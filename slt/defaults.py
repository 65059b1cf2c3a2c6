r"""The defaults of :func:`slt.estimate_llc`, in one place.

The engine's signature and the experiment configs (``experiments/_schemas.py``,
``SamplerConf``) both read them from :data:`LLC`, so a default changes in one
line.  ``None`` means "chosen from the problem": ``num_burnin`` = ``num_draws // 4``,
``step_size`` automatic (:func:`slt.stepsize.auto_step_size`), ``nbeta`` =
:func:`slt.default_nbeta` (n / log n), ``localization`` = :func:`slt.default_localization`
(γ = 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["LLCDefaults", "LLC", "default_nbeta", "default_localization", "LOCALIZATION"]

#: γ for ``localization=None``.
LOCALIZATION = 1.0


@dataclass(frozen=True)
class LLCDefaults:
    """Sampling defaults of :func:`slt.estimate_llc` (see its docstring for each)."""

    sampler: str = "sgld"
    num_chains: int = 8
    num_draws: int = 1000
    num_burnin: int | None = None
    num_steps_bw_draws: int = 1
    step_size: float | None = None
    nbeta: float | None = None
    localization: float | None = None
    batch_size: int | None = 256
    mala_every: int = 10
    target_accept: float = 0.97

    def asdict(self) -> dict:
        return asdict(self)


#: the defaults in use
LLC = LLCDefaults()


def default_nbeta(n: int) -> float:
    r"""nβ = n / log n: the WBIC inverse temperature β* = 1/log n (Watanabe 2013),
    as used by Lau et al. (2023).  devinterp 2.x instead uses b / log b with the
    batch size b; pass ``nbeta`` to use any other value."""
    if n < 2:
        raise ValueError(f"default nbeta needs n >= 2 samples, got n={n}")
    return n / math.log(n)


def default_localization() -> float:
    r"""γ = 1: a unit Gaussian prior N(w*, I) around the checkpoint, fixed in n.

    γ must not grow with n: with γ ∝ nβ the localization acts like a fixed L2
    penalty added to the loss and λ̂ → 0 at singular points as n grows
    (measured: normal-crossing w1²w2⁴ at n = 10⁴, λ = 1/4, gave 0.17 with
    γ = 0.01 nβ, 0.12 with γ = 10 and 0.23 ± 0.03 with γ = 1).  A regular
    direction of curvature h is shrunk by 1/(1 + γ/(nβ h)) (the exact
    quadratic formula), negligible once nβ h ≫ 1.  The price of a weak γ is
    slow mixing along flat directions (relaxation ≈ 2/(εγ) steps): check R-hat,
    and for large networks, where many flat directions wander, raise γ with
    :func:`slt.calibrate` (Lau et al. use γ = 100 at nβ ≈ 5000).
    """
    return LOCALIZATION
