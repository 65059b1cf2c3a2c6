"""slt: singular learning theory estimation in PyTorch.

Local learning coefficients with batched multi-chain SG-MCMC, closed-form
learning coefficients, and toy models written with a native chain dimension.
"""

__version__ = "0.1.0"

from .data import Data  # noqa: E402
from .engine import (  # noqa: E402
    LLCEstimationError,
    default_localization,
    default_nbeta,
    estimate_llc,
)
from .result import LLCResult  # noqa: E402
from .samplers import LocalizedPotential, rmsprop_sgld, sgld  # noqa: E402

__all__ = [
    "__version__",
    "Data",
    "LLCResult",
    "LLCEstimationError",
    "LocalizedPotential",
    "default_localization",
    "default_nbeta",
    "estimate_llc",
    "rmsprop_sgld",
    "sgld",
]
