"""The result of an LLC estimation: estimates, traces and diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["LLCResult"]


@dataclass
class LLCResult:
    r"""LLC estimate for one checkpoint.

    The estimator is :math:`\hat\lambda = n\beta\,(\mathbb E[L(w)] - L(w^*))`
    (Lau et al. 2023), evaluated per draw with the control variate
    :math:`n\beta\,(L_{B_t}(w_t) - L_{B_t}(w^*))` (same minibatch at both points).

    Attributes
    ----------
    llc_mean
        Mean of ``llc_per_chain`` over the valid (non-divergent) chains.
    llc_std
        Standard deviation of ``llc_per_chain`` over valid chains (the spread).
    llc_sem
        Monte-Carlo standard error of ``llc_mean`` (see
        :func:`slt.diagnostics.llc_standard_error`); includes noise shared by
        chains.
    llc_per_chain
        ``(C,)``; NaN for divergent chains.
    llc_trace
        ``(C, T)`` per-draw estimates ``nβ (L_B(w_t) − L_B(w*))``.
    loss_trace
        ``(C, T)`` minibatch loss at the draws ``L_B(w_t)``.
    loss_star_trace
        ``(C, T)`` ``L_B(w*)`` on the same minibatches (the control variate).
    init_loss
        ``L_n(w*)``, full data.
    diagnostics
        R-hat, ESS, MALA acceptance, fraction of draws below ``L(w*)``,
        divergent chains, the computation path, timings.
    observables
        ``name -> (C, T, ...)`` values of user observables at the draws.
    config
        Everything needed to reproduce the run (hyperparameters, seed, path,
        device, versions).
    """

    llc_mean: float
    llc_std: float
    llc_sem: float
    llc_per_chain: Tensor
    llc_trace: Tensor
    loss_trace: Tensor
    loss_star_trace: Tensor
    init_loss: float
    nbeta: float
    step_size: float
    localization: float
    sampler: str
    diagnostics: dict[str, Any] = field(default_factory=dict)
    observables: dict[str, Tensor] = field(default_factory=dict)
    burnin_loss_trace: Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_chains(self) -> int:
        return int(self.llc_per_chain.shape[0])

    @property
    def num_draws(self) -> int:
        return int(self.loss_trace.shape[1])

    @property
    def divergent_chains(self) -> list[int]:
        return list(self.diagnostics.get("divergent_chains", []))

    def to_frame(self):
        """Long-format DataFrame: one row per (chain, draw)."""
        import pandas as pd

        C, T = self.loss_trace.shape
        chain = np.repeat(np.arange(C), T)
        draw = np.tile(np.arange(T), C)
        cols: dict[str, Any] = {
            "chain": chain,
            "draw": draw,
            "loss": self.loss_trace.double().reshape(-1).numpy(),
            "loss_star": self.loss_star_trace.double().reshape(-1).numpy(),
            "llc": self.llc_trace.double().reshape(-1).numpy(),
            "divergent": np.repeat(
                np.array([c in set(self.divergent_chains) for c in range(C)]), T
            ),
        }
        for name, val in self.observables.items():
            if val.ndim == 2:
                cols[name] = val.double().reshape(-1).numpy()
        return pd.DataFrame(cols)

    def summary(self) -> dict[str, Any]:
        """Scalars only (JSON-friendly)."""
        out = {
            "llc_mean": self.llc_mean,
            "llc_std": self.llc_std,
            "llc_sem": self.llc_sem,
            "llc_per_chain": [float(v) for v in self.llc_per_chain],
            "init_loss": self.init_loss,
            "nbeta": self.nbeta,
            "step_size": self.step_size,
            "localization": self.localization,
            "sampler": self.sampler,
            "num_chains": self.num_chains,
            "num_draws": self.num_draws,
        }
        for k, v in self.diagnostics.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                out[k] = v
            elif isinstance(v, (list, tuple)):
                out[k] = [x if isinstance(x, (int, float, str, bool)) else float(x) for x in v]
        return out

    def __str__(self) -> str:
        d = self.diagnostics
        valid = self.num_chains - len(self.divergent_chains)

        def f(x: Any, spec: str = ".3g") -> str:
            return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

        lines = [
            f"LLC = {f(self.llc_mean, '.4g')} ± {f(self.llc_sem)} (s.e.; std over chains "
            f"{f(self.llc_std)}), {valid}/{self.num_chains} chains × {self.num_draws} draws",
            f"  sampler={self.sampler} step_size={self.step_size:.3g} nbeta={self.nbeta:.4g} "
            f"localization={self.localization:.4g} L(w*)={self.init_loss:.6g}",
            f"  R-hat={f(d.get('rhat'))} ESS={f(d.get('ess'), '.0f')} "
            f"MALA acceptance={f(d.get('mala_acceptance'))} "
            f"draws below L(w*)={f(d.get('frac_below_init'), '.1%')} path={d.get('path')}",
        ]
        if self.divergent_chains:
            lines.append(f"  DIVERGENT chains (excluded): {self.divergent_chains}")
        for w in d.get("warnings", []):
            lines.append(f"  warning: {w}")
        return "\n".join(lines)

    __repr__ = __str__
