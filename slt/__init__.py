"""slt: singular learning theory estimation in PyTorch.

Local learning coefficients with batched multi-chain SG-MCMC, closed-form
learning coefficients, and toy models written with a native chain dimension.

The engine is a composition of small modules: :mod:`slt.target` (the prepared
problem), :mod:`slt.stepsize`, :mod:`slt.samplers`, :mod:`slt.loop` and
:mod:`slt.result`; :func:`estimate_llc` chains them.
"""

__version__ = "0.1.0"

from . import defaults, diagnostics, geometry, models, symmetry, theory  # noqa: E402
from . import groups, influence, loop, restrict, samplers, stepsize, target  # noqa: E402
from .influence import InfluenceResult, SusceptibilityResult, bif, loss_kernel, per_sample_susceptibility  # noqa: E402
from ._runtime import versions  # noqa: E402
from .calibrate import CalibrationResult, calibrate  # noqa: E402
from .data import Data  # noqa: E402
from .engine import (  # noqa: E402
    LLCEstimationError,
    default_localization,
    default_nbeta,
    estimate_llc,
    sample_target,
)
from .plotting import plot_calibration, plot_llc_curve, plot_trace  # noqa: E402
from . import phases, reference  # noqa: E402
from .phases import basin_fractions, sample_posterior  # noqa: E402
from .reference import compare, nuts_llc  # noqa: E402
from .result import LLCResult, results_frame  # noqa: E402
from .samplers import LocalizedPotential, SamplerSpec, rmsprop_sgld, sghmc, sgld, sgnht  # noqa: E402
from .target import Target, prepare_target  # noqa: E402

__all__ = [
    "__version__",
    "defaults",
    "versions",
    "diagnostics",
    "geometry",
    "models",
    "symmetry",
    "theory",
    "reference",
    "phases",
    "sample_posterior",
    "basin_fractions",
    "compare",
    "nuts_llc",
    "CalibrationResult",
    "Data",
    "LLCResult",
    "LLCEstimationError",
    "LocalizedPotential",
    "calibrate",
    "plot_calibration",
    "plot_trace",
    "plot_llc_curve",
    "results_frame",
    "default_localization",
    "default_nbeta",
    "estimate_llc",
    "sample_target",
    "restrict",
    "groups",
    "influence",
    "bif",
    "loss_kernel",
    "per_sample_susceptibility",
    "InfluenceResult",
    "SusceptibilityResult",
    "rmsprop_sgld",
    "sgld",
    "sghmc",
    "sgnht",
    "SamplerSpec",
    "loop",
    "samplers",
    "stepsize",
    "target",
    "Target",
    "prepare_target",
]
