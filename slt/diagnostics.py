"""MCMC diagnostics for LLC traces: R-hat, ESS, Monte-Carlo standard errors.

R-hat and ESS come from Pyro (``pyro.ops.stats``: split Gelman-Rubin and the
Geyer initial-monotone-sequence ESS of Stan), applied to ``(C, T)`` traces.
"""

from __future__ import annotations

import functools
import math

import numpy as np

import torch
from torch import Tensor

__all__ = ["rhat", "ess", "batch_means_sem", "llc_standard_error", "t_threshold"]


def rhat(trace: Tensor) -> float:
    """Split-R-hat of a ``(C, T)`` trace (Gelman et al. 2013); NaN if undefined."""
    trace = trace.double()
    if trace.shape[0] < 1 or trace.shape[1] < 4:
        return float("nan")
    from pyro.ops.stats import split_gelman_rubin

    return float(split_gelman_rubin(trace, chain_dim=0, sample_dim=1))


def ess(trace: Tensor) -> float:
    """Bulk effective sample size of a ``(C, T)`` trace, summed over chains."""
    trace = trace.double()
    if trace.shape[1] < 4:
        return float("nan")
    from pyro.ops.stats import effective_sample_size

    return float(effective_sample_size(trace, chain_dim=0, sample_dim=1))


def batch_means_sem(trace: Tensor, num_batches: int = 20) -> float:
    r"""Standard error of the grand mean of a ``(C, T)`` trace by batch means.

    The trace is first averaged over chains (so noise shared by all chains, e.g.
    a common minibatch, is kept rather than averaged away), then cut into
    ``num_batches`` contiguous blocks; the standard error is
    ``std(block means) / sqrt(num_batches)``.  Blocks must be longer than the
    autocorrelation time for this to be accurate.
    """
    m = trace.double().mean(0)
    T = m.shape[0]
    nb = min(num_batches, T // 2)
    if nb < 2:
        return float("nan")
    L = T // nb
    blocks = m[: nb * L].view(nb, L).mean(1)
    return float(blocks.std(unbiased=True) / math.sqrt(nb))


def llc_standard_error(per_chain: Tensor, trace: Tensor) -> tuple[float, float, float]:
    """Monte-Carlo standard error of the mean LLC over valid chains.

    Returns ``(sem, sem_chains, sem_batch_means)``: ``sem_chains = std/sqrt(C)``
    treats chains as independent replicates; ``sem_batch_means`` comes from
    :func:`batch_means_sem` on the chain-averaged trace and includes noise that
    chains share.  ``sem`` is the larger of the two (NaN-aware).
    """
    C = per_chain.shape[0]
    sem_c = float(per_chain.double().std(unbiased=True) / math.sqrt(C)) if C > 1 else float("nan")
    sem_b = batch_means_sem(trace)
    vals = [v for v in (sem_c, sem_b) if v == v]
    return (max(vals) if vals else float("nan")), sem_c, sem_b


_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz


@functools.lru_cache(maxsize=256)
def t_threshold(z: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom at the two-sided level of a normal ``z``
    (numerical integration of the density, then bisection; no scipy needed)."""
    p = math.erfc(z / math.sqrt(2))  # two-sided tail probability of the normal
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def tail(x: float) -> float:  # P(|T| > x) = 2 ∫_x^∞ f, via u = 1/t on (0, 1/x]
        u = np.linspace(0.0, 1.0 / x, 20001)[1:]
        f = c * (1 + 1 / (u * u * df)) ** (-(df + 1) / 2) / (u * u)
        return 2 * float(_trapezoid(np.concatenate([[0.0], f]), np.concatenate([[0.0], u])))

    lo, hi = z, z
    while tail(hi) > p:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if tail(mid) > p else (lo, mid)
    return 0.5 * (lo + hi)
