"""Defaults on small real networks trained to interpolation: does ``converged`` tell the truth?

For each network, ``slt.estimate_llc`` at every default, then the same sampler and γ with ε halved at the
default burn-in and draws (a direct check of "λ̂ stable when ε halves", which ``converged`` claims); the
sampler is the one whose draws the default ``sampler="auto"`` returned (SGLD, or critically damped SGHMC
(full batch) or RMSProp-SGLD where SGLD did not settle).  The
networks are written as users write them: a 2-layer ``nn.TransformerEncoder`` classifier (18k
parameters) and a GRU classifier (2k parameters; PyTorch's GRU kernel has no vmap batching rule, and
slt runs its recurrence in plain operations under vmap, :mod:`slt._rnn`), each trained with Adam (3000 steps) on n = 1024 random token sequences whose
label is the sum of the first 4 tokens mod 4; and ``mlp``, the 26k-parameter MLP 64-128-128-10 of
``bench_generic.py`` (about 2 minutes).  Slow: the transformer takes about 16 minutes on 2 cores (its
default run raises γ twice); the GRU about 3 (15 in the loop over chains, before 2026-12-05).  Not in the
default set, ``mlp60k``: an MNIST-sized job (an MLP 784-64-10 on n = 60000, nβ = 5454) whose defaults need
a burn-in of 31 × the draws at γ = 1000 (within the cap at the last γ since 2026-12-06); when the default run
is not converged the script follows its relaxation hint (the adapted ε and the γ reached, pinned, and a
burn-in of 5/(εγ) steps); then it checks the converged run at ε/2 (about 10 minutes).

Usage::

    python benchmarks/real_defaults.py                  # all three
    python benchmarks/real_defaults.py transformer
    python benchmarks/real_defaults.py mlp
    python benchmarks/real_defaults.py mlp --sampler rmsprop_sgld   # the same check with another sampler
    python benchmarks/real_defaults.py gru --sampler sgld           # SGLD only (no switch)
    python benchmarks/real_defaults.py mlp60k                       # n = 60000: defaults (the hint if needed), ε/2
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt.training import train


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 32)
        self.pos = nn.Parameter(torch.randn(12, 32) * 0.1)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(self.enc(self.emb(x) + self.pos).mean(1))


class GRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.rnn = nn.GRU(16, 16, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.out(h[:, -1])


NETWORKS = {"transformer": Transformer, "gru": GRU}


def data(n=1024):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 20, (n, 12), generator=g)
    return tokens, tokens[:, :4].sum(1) % 4


def generic_mlp():
    """The 26k-parameter MLP 64-128-128-10 of ``bench_generic.py`` (n = 1792, trained there)."""
    from bench_generic import job_mlp

    job = job_mlp(0)
    return job.model, job.X, job.Y


def mlp60k():
    """An MNIST-sized job: an MLP 784-64-10 (51k parameters) trained with Adam for 20 epochs (batch 256) on
    n = 60000 Gaussian inputs labelled by a random teacher MLP 784-32-10, 5% of the labels replaced at random
    (L_n(w*) ≈ 0.33, still falling: as far as a user typically trains)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60000, 784, generator=g)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        Y = teacher(X).argmax(1)
    flip = torch.rand(60000, generator=g) < 0.05
    Y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(20):
        for idx in torch.randperm(60000).split(256):
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, X, Y


def hinted(first) -> dict | None:
    """The settings the relaxation hint of an unconverged default run names: its γ and adapted ε pinned,
    the burn-in RELAXATION_TIMES / (εγ); ``None`` when the run needs none."""
    from slt.result import RELAXATION_TIMES

    if first.converged or first.sampler != "sgld":
        return None
    return dict(sampler="sgld", step_size=first.step_size, localization=first.localization,
                num_burnin=int(RELAXATION_TIMES / (first.step_size * first.localization)), num_draws=first.num_draws,
                extend_draws=False)


def _run(model, X, Y, label: str, kw: dict):
    """One ``estimate_llc`` call, printed with its settings, verdict and findings."""
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = slt.estimate_llc(model, (X, Y), F.cross_entropy, seed=0, progress=False, **kw)
    print(f"   {label}: {r.sampler}, λ̂ {r.llc_mean:.4g} ± {r.llc_sem:.2g}, R-hat {r.diagnostics['rhat']:.3f}, "
          f"ε {r.step_size:.3g}, γ {r.localization:g}, burn-in {r.config['num_burnin']}, converged "
          f"{r.converged}, {time.perf_counter() - t:.0f} s, path {r.diagnostics.get('path')}", flush=True)
    fb = r.config.get("sampler_fallback")
    if fb:
        print(f"      sampler fallback: {fb['from']} -> {fb['to']} at γ {fb['localization']:g}, settled "
              f"{fb['settled']}, {fb['seconds']:.0f} s", flush=True)
    check, hc = r.diagnostics.get("halving_direct"), r.config.get("halving_check")
    if check:
        print(f"      continued at ε/2 ({hc['burnin']} + {hc['draw_steps']} steps, {hc['seconds']:.0f} s): λ̂ "
              f"{check['llc_at_half_step']:.4g} ± {check['llc_at_half_step_sem']:.2g}, paired z {check['z']:.1f}, "
              f"2λ̂(ε/2) − λ̂(ε) = {check['extrapolated']:.4g}", flush=True)
    elif hc:
        print(f"      continued ε/2 check skipped: {hc['skipped']}", flush=True)
    for reason in r.convergence_reasons:
        print(f"      {reason[:300]}", flush=True)
    return r


def main(names, sampler="auto"):
    for name in names:
        if name == "mlp60k":
            model, X, Y = mlp60k()
        elif name == "mlp":
            model, X, Y = generic_mlp()
        else:
            X, Y = data()
            torch.manual_seed(0)
            model = NETWORKS[name]()
            train(model, (X, Y), F.cross_entropy, steps=3000, lr=3e-3)
        model.eval()
        with torch.no_grad():
            loss = float(F.cross_entropy(model(X), Y))
        print(f"== {name}: d = {sum(p.numel() for p in model.parameters())}, L_n(w*) = {loss:.3g}, sampler "
              f"{sampler}", flush=True)
        base = _run(model, X, Y, "defaults", {"sampler": sampler})
        hint = hinted(base) if name == "mlp60k" else None
        if hint is not None:  # not converged: follow the relaxation hint (ε and γ pinned, burn-in 5/(εγ))
            base = _run(model, X, Y, "the hint: ε and γ pinned, burn-in 5/(εγ)", hint)
        # the same sampler (the one whose draws "auto" returned), γ and steps at ε/2, draws not extended
        _run(model, X, Y, "ε/2, same γ, burn-in and draws", dict(
            sampler=base.sampler, step_size=base.step_size / 2, localization=base.localization,
            num_burnin=base.config["num_burnin"], num_draws=base.num_draws, extend_draws=False))


def split_sampler(argv: list[str], default: str) -> tuple[list[str], str]:
    """``argv`` without its ``--sampler NAME`` option, and that name (``default`` without one); shared
    with ``minibatch_defaults.py``."""
    args = list(argv)
    if "--sampler" not in args:
        return args, default
    i = args.index("--sampler")
    return args[:i] + args[i + 2:], args[i + 1]


if __name__ == "__main__":
    names, chosen = split_sampler(sys.argv[1:], "auto")
    main(names or [*NETWORKS, "mlp"], chosen)
