"""λ̂ at every default, on minibatches and at full batch, against the known answer.

Accuracy, not speed: for each problem ``slt.estimate_llc`` runs with all sampling settings at their
defaults (``batch_size="auto"``, the default: 256 raised when minibatch heating would bias λ̂), and
for comparison at a fixed batch 256 and at ``batch_size=None`` (full batch), float64; the script
prints the batch the run ended with, the adapted ε, λ̂ ± s.e., its error against the known value,
``converged`` and the minibatch heating estimate (``diagnostics["minibatch_heating"]``).  The problems: deep linear networks at rank 0 (λ from Aoyagi's
formula, ``slt.theory.dln_llc``: [5, 3, 5] 6.5, [5, 3, 4] 5.5, [3, 2, 3] 2.5; n = 10⁴), N(ab², 1) at w* = 0 (the exact finite-n
value 0.221 by 2-D quadrature, tests/test_statistical.py; 16 chains × 4000 draws) and a 5-dimensional
Gaussian location model written as a plain module (d/2 ⋅ nβ/(nβ + γ)).

Usage::

    python benchmarks/minibatch_defaults.py                 # all (about 5 minutes on 2 cores)
    python benchmarks/minibatch_defaults.py dln535 gauss    # some
    python benchmarks/minibatch_defaults.py --sampler rmsprop_sgld   # another sampler, every other default
"""

from __future__ import annotations

import math
import sys
import time
import warnings

import torch

import slt
from slt.models import DeepLinearNetwork, gaussian_nll, make_dln_data
from slt.training import train

F64 = torch.float64
DLN = {"dln535": [5, 3, 5], "dln534": [5, 3, 4], "dln323": [3, 2, 3]}


def _dln(widths):
    X, Y, _ = make_dln_data(widths, 0, 10_000, torch.Generator().manual_seed(0), dtype=F64)
    m = DeepLinearNetwork(widths, generator=torch.Generator().manual_seed(1), dtype=F64)
    train(m, (X, Y), gaussian_nll, steps=500, lr=1e-2, finish="lbfgs")
    return m, (X, Y), gaussian_nll


def _ab():
    x = torch.randn(5000, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    m = slt.models.ABSquaredGaussian().double()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m, torch.cat([x, -x]), None


class _Location(torch.nn.Module):
    def __init__(self, mu):
        super().__init__()
        self.mu = torch.nn.Parameter(mu.clone())

    def forward(self, x):
        return self.mu.expand_as(x)


def _gauss():
    X = torch.randn(10_000, 5, generator=torch.Generator().manual_seed(0), dtype=F64) + 1.0
    return _Location(X.mean(0)), X, lambda out, x: 0.5 * ((x - out) ** 2).sum(-1).mean()


def problem(name):
    """(model, data, loss or None, known value, extra estimate_llc kwargs)."""
    if name in DLN:
        widths = DLN[name]
        return (*_dln(widths), slt.theory.dln_llc(widths, 0), {})
    if name == "ab":
        return (*_ab(), 0.221, {"num_chains": 16, "num_draws": 4000})
    if name == "gauss":
        n = 10_000
        return (*_gauss(), 2.5 / (1 + math.log(n) / n), {})
    raise SystemExit(f"unknown problem {name!r}: choose from {[*DLN, 'ab', 'gauss']}")


def main(names, sampler="sgld"):
    warnings.filterwarnings("ignore")
    print(f"slt {slt.__version__}, torch {torch.__version__}, sampler {sampler}")
    for name in names:
        model, data, loss, known, kw = problem(name)
        for bs in ("auto", 256, None):
            t = time.perf_counter()
            args = (model, data) if loss is None else (model, data, loss)
            r = slt.estimate_llc(*args, batch_size=bs, seed=0, progress=False, dtype=F64, sampler=sampler, **kw)
            heat = r.diagnostics.get("minibatch_heating")
            heat_s = "—" if heat is None else f"{heat['excess']:.3g} ({heat['fraction']:.0%})"
            used = r.config["batch_size"]
            print(f"{name:7s} batch {str(bs):4s} → {str(used):5s}  ε {r.step_size:.3g}  λ̂ {r.llc_mean:.3f} ± {r.llc_sem:.3f}  "
                  f"known {known:.3f} ({100 * (r.llc_mean / known - 1):+.0f}%)  γ {r.localization:g}  "
                  f"converged {r.converged}  heating {heat_s}  {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    from real_defaults import split_sampler  # (the benchmarks folder is the script's path)

    names, chosen = split_sampler(sys.argv[1:], "sgld")
    main(names or [*DLN, "ab", "gauss"], chosen)
