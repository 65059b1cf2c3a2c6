"""slt vs devinterp on the same LLC jobs, in one process.

Each job runs the same model, data, nβ, step size, localization, chains and
draws through ``slt.estimate_llc`` and through devinterp 2.0.1 (via
``slt.peers.devinterp_llc``), and prints both LLCs with their Monte-Carlo
errors, the agreement z-score and the throughput ratio (chain-steps per
second, wall time of the whole call including setup, on this machine).

Jobs (targets on a 2-core CPU from the LLC-engine issue):

* ``tms``    toy model of superposition, 6 features, 2 hidden (18 params)  — ≥ 20×
* ``dln``    deep linear network, widths [50]*5 (10 000 params)            — ≥ 20×
* ``curve``  LLC-over-training curve, 50 TMS checkpoints in one batched call,
             against 50 separate devinterp calls                            — ≥ 100×

Usage::

    python benchmarks/bench_devinterp.py                 # all jobs
    python benchmarks/bench_devinterp.py --jobs tms dln  # some
    python benchmarks/bench_devinterp.py --quick         # fewer draws/checkpoints (smoke run)

Estimator note: devinterp records ``nβ (L_B(w_t) − L_n(w*))`` (no control
variate) and averages burn-in draws too, so both runs here use no burn-in;
its error bars are std/√C over chains.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch

import slt
from slt.models import (
    DeepLinearNetwork,
    ToyModelOfSuperposition,
    gaussian_nll,
    kgon_parameters,
    make_dln_data,
    make_tms_sparse_data,
    tms_loss,
)
from slt.peers import devinterp_llc
from slt.training import train


def _z(a_mean: float, a_se: float, b_mean: float, b_se: float) -> float:
    return abs(a_mean - b_mean) / math.sqrt(a_se**2 + b_se**2 + 1e-300)


def _slt_run(model, data, loss, **kw):
    t = time.perf_counter()
    res = slt.estimate_llc(model, data, loss, progress=False, extend_draws=False, **kw)  # the same job as devinterp's
    return res, time.perf_counter() - t


def _report(name, res, sec, di, chains, steps, target):
    s_rate = chains * steps / sec
    d_rate = chains * steps / di["seconds"]
    d_se = float(di["llc_std"]) / math.sqrt(chains)
    row = {
        "job": name,
        "slt_llc": res.llc_mean, "slt_se": res.llc_sem,
        "devinterp_llc": float(di["llc_mean"]), "devinterp_se": d_se,
        "z": _z(res.llc_mean, res.llc_sem, float(di["llc_mean"]), d_se),
        "slt_us_per_chain_step": 1e6 / s_rate, "devinterp_us_per_chain_step": 1e6 / d_rate,
        "speedup": s_rate / d_rate, "target": target,
    }
    print(
        f"{name:6s} slt λ̂={row['slt_llc']:.3f}±{row['slt_se']:.3f}  devinterp λ̂={row['devinterp_llc']:.3f}"
        f"±{d_se:.3f}  z={row['z']:.2f} | {row['slt_us_per_chain_step']:.1f} vs "
        f"{row['devinterp_us_per_chain_step']:.1f} µs/chain-step → {row['speedup']:.1f}× (target ≥ {target}×)",
        flush=True,
    )
    return row


def _tms_point(k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = make_tms_sparse_data(n, 6, g)
    m = ToyModelOfSuperposition(6, 2)
    m.load_state_dict({k_: v.float() for k_, v in kgon_parameters(k, 6, 2, dead_bias=-0.1).items()})
    train(m, X, tms_loss, steps=0, finish="lbfgs")
    return m, X


def job_tms(args):
    m, X = _tms_point(6, 5000, 0)
    kw = dict(nbeta=5000 / math.log(5000), step_size=1e-4, localization=100.0, num_chains=8,
              num_draws=args.draws, num_burnin=0, batch_size=256)
    res, sec = _slt_run(m, X, tms_loss, seed=0, **kw)
    di = devinterp_llc(m, X, None, tms_loss, seed=0, **kw)
    return _report("tms", res, sec, di, 8, args.draws, 20)


def job_dln(args):
    widths = [50] * 5
    g = torch.Generator().manual_seed(0)
    X, Y, _ = make_dln_data(widths, 10, 10_000, g)
    m = DeepLinearNetwork(widths, generator=torch.Generator().manual_seed(1))
    train(m, (X, Y), gaussian_nll, steps=300, lr=1e-2, finish="lbfgs", finish_iterations=200)
    draws = max(args.draws // 5, 20)
    kw = dict(nbeta=10_000 / math.log(10_000), step_size=1e-5, localization=100.0, num_chains=8,
              num_draws=draws, num_burnin=0, batch_size=256)
    res, sec = _slt_run(m, (X, Y), gaussian_nll, seed=0, **kw)
    di = devinterp_llc(m, X, Y, gaussian_nll, seed=0, **kw)
    return _report("dln", res, sec, di, 8, draws, 20)


def job_curve(args):
    """50 checkpoints along a TMS training run (from random init)."""
    K = min(args.checkpoints, 10) if args.quick else args.checkpoints
    g = torch.Generator().manual_seed(0)
    X = make_tms_sparse_data(2000, 6, g)
    m = ToyModelOfSuperposition(6, 2, generator=torch.Generator().manual_seed(2))
    ckpts = []
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for step in range(K * 20):
        opt.zero_grad()
        loss = tms_loss(m(X), X)
        loss.backward()
        opt.step()
        if step % 20 == 19:
            ckpts.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    draws = max(args.draws // 5, 20)
    kw = dict(nbeta=2000 / math.log(2000), step_size=1e-4, localization=100.0, num_chains=8,
              num_draws=draws, num_burnin=0, batch_size=256)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # early checkpoints are not minima
        results = slt.estimate_llc(m, X, tms_loss, state_dicts=ckpts, progress=False, seed=0, extend_draws=False, **kw)
    sec = time.perf_counter() - t
    d_sec = 0.0
    d_llc = []
    for sd in ckpts:
        mk = ToyModelOfSuperposition(6, 2)
        mk.load_state_dict(sd)
        di = devinterp_llc(mk, X, None, tms_loss, seed=0, **kw)
        d_sec += di["seconds"]
        d_llc.append((float(di["llc_mean"]), float(di["llc_std"]) / math.sqrt(8)))
    zs = [_z(r.llc_mean, r.llc_sem, a, b) for r, (a, b) in zip(results, d_llc)]
    fake = {"llc_mean": results[-1].llc_mean, "llc_std": 0.0}  # for the printing helper
    row = _report("curve", results[-1], sec / K, {**fake, "seconds": d_sec / K}, 8, draws, 100)
    row.update({
        "checkpoints": K, "slt_seconds_total": sec, "devinterp_seconds_total": d_sec,
        "devinterp_llc": d_llc[-1][0], "devinterp_se": d_llc[-1][1],
        "z_max": max(zs), "z_mean": sum(zs) / len(zs),
        "frac_within_3se": sum(z < 3 for z in zs) / len(zs),
    })
    print(f"       curve: {K} checkpoints, slt {sec:.2f}s total vs devinterp {d_sec:.1f}s; "
          f"z mean {row['z_mean']:.2f}, max {row['z_max']:.2f}, within 3 s.e.: {row['frac_within_3se']:.0%}")
    return row


JOBS = {"tms": job_tms, "dln": job_dln, "curve": job_curve}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="fewer draws and checkpoints")
    ap.add_argument("--checkpoints", type=int, default=50, help="checkpoints in the curve job")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.draws = min(args.draws, 100)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"python {sys.version.split()[0]}")
    rows = [JOBS[j](args) for j in args.jobs]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
