r"""Chain-batched stochastic-gradient MCMC samplers for the localized tempered posterior.

Every sampler targets

.. math::

    p(w) \propto \exp\bigl(-U(w)\bigr), \qquad
    U(w) = n\beta\, L_n(w) + \tfrac{\gamma}{2} \lVert w - w^* \rVert^2 ,

with ``L_n`` replaced by a minibatch loss ``L_B`` at every step, on flat
``(C, d)`` parameters (row ``c`` is chain ``c``).  A sampler is an
``init``/``step``/``reset`` triple over its own state type (:mod:`.base`); one
module per sampler:

``sgld``, ``rmsprop_sgld`` (:mod:`.sgld`)
    Welling & Teh (2011); RMSProp-preconditioned (Li et al. 2016; Hitchcock &
    Hoogland 2025).
``sghmc`` (:mod:`.sghmc`)
    Stochastic gradient HMC with friction (Chen, Fox & Guestrin 2014); by default the friction damps
    critically the directions only the localization holds (``friction="auto"``, α = √(2εγ)).
``sgnht`` (:mod:`.sgnht`)
    Stochastic gradient Nosé–Hoover thermostat (Ding et al. 2014).

Choose one by name (``slt.estimate_llc(..., sampler="sghmc", sampler_kwargs={...})``)
or by value (``sampler=slt.samplers.sghmc(friction=0.05)``, a :class:`SamplerSpec`).
Called with a potential and a step size, each function returns the bound
:class:`Sampler` (``sgld(potential, 1e-4)``).  A new sampler is a module with such
a function added to :data:`SAMPLERS`; the engine needs no change.
"""

from __future__ import annotations

from typing import Any, Callable

from .base import (
    LocalizedPotential,
    NoiseSource,
    Sampler,
    SamplerInfo,
    SamplerSpec,
    SamplerState,
    acceptance,
    equilibrium_acceptance,
    langevin_step,
    mala_acceptance,
)
from .sghmc import SGHMCState, sghmc
from .sgld import RMSPropSGLDState, SGLDState, rmsprop_sgld, sgld
from .sgnht import SGNHTState, sgnht

__all__ = [
    "LocalizedPotential",
    "NoiseSource",
    "SamplerState",
    "SamplerInfo",
    "Sampler",
    "SamplerSpec",
    "SGLDState",
    "RMSPropSGLDState",
    "SGHMCState",
    "SGNHTState",
    "sgld",
    "rmsprop_sgld",
    "sghmc",
    "sgnht",
    "langevin_step",
    "mala_acceptance",
    "acceptance",
    "equilibrium_acceptance",
    "build_sampler",
    "resolve_sampler",
    "SAMPLERS",
]

#: name -> sampler function ``f(potential=None, step_size=None, **kwargs)``
SAMPLERS: dict[str, Callable[..., Any]] = {
    "sgld": sgld,
    "rmsprop_sgld": rmsprop_sgld,
    "sghmc": sghmc,
    "sgnht": sgnht,
}
#: ``"auto"`` is :func:`slt.estimate_llc`'s default: SGLD, which that engine may follow with critically damped
#: SGHMC and RMSProp-SGLD when SGLD's chains do not settle (:data:`slt.defaults.FALLBACK_SAMPLERS`), or precede with
#: SGHMC where SGLD's burn-in would dominate (:data:`slt.defaults.SGHMC_FIRST_BURNIN`); elsewhere
#: it is SGLD
_ALIASES = {"rmsprop": "rmsprop_sgld", "rmspropsgld": "rmsprop_sgld", "rmsprop-sgld": "rmsprop_sgld", "auto": "sgld"}


def resolve_sampler(sampler: str | SamplerSpec) -> SamplerSpec:
    """A sampler name (``"sgld"``, ``"rmsprop_sgld"``, ``"sghmc"``, ``"sgnht"``) or a
    :class:`SamplerSpec` -> the spec."""
    if isinstance(sampler, SamplerSpec):
        return sampler
    if not isinstance(sampler, str):
        raise TypeError(f"sampler must be a name or a SamplerSpec (e.g. slt.samplers.sghmc()), got "
                        f"{type(sampler).__name__}")
    key = _ALIASES.get(sampler.lower(), sampler.lower())
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    return SamplerSpec(key, SAMPLERS[key])


def build_sampler(
    sampler: str | SamplerSpec, potential: LocalizedPotential, step_size: float, **kwargs: Any
) -> Sampler:
    """Bind a sampler, by name or :class:`SamplerSpec`, to a potential and a step size
    (``kwargs``: ``deterministic``, ``mala_every`` and the sampler's own arguments)."""
    return resolve_sampler(sampler).bind(potential, step_size, **kwargs)
