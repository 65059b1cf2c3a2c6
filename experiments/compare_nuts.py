"""SGLD at several step sizes against NUTS on the same localized posterior.

Two jobs (the tables in the README section "Exact references"):

``tms``
    TMS(6, 2) 5-gon (``kgon_parameters(5, dead_bias=-1.0)``, trained to the
    empirical minimum by L-BFGS), n = 20 000 high-sparsity samples, γ = 10,
    nβ = n / log n; SGLD with minibatches of 256 (the engine default).
``normal_crossing``
    ``NormalCrossing([1, 2])`` (K = ½ w₁² w₂⁴, λ = 1/4) at its empirical minimum,
    n = 10 000, γ = 1, full-batch SGLD.

    python -m experiments.compare_nuts --job tms [--n 20000] [--out results/compare_nuts]
    python -m experiments.compare_nuts --job normal_crossing
    python -m experiments.compare_nuts --job scaling     # NUTS cost against d and n

``scaling`` times one NUTS chain (100 warmup + 100 draws, γ = 1) on a trained
tanh MLP 4 → h → 1 (d = 6h + 1 parameters) for several d and n, and prints
seconds per gradient, gradients per draw and the projected time of the default
:func:`slt.reference.nuts_llc` call (4 chains × (500 warmup + 1000 draws)).

Prints the table of :func:`slt.reference.compare` and writes
``<out>/<job>.png`` and ``<out>/<job>.json``.  Plain Python (no Hydra).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

import slt  # noqa: E402
from slt.models import (  # noqa: E402
    NormalCrossing,
    ToyModelOfSuperposition,
    gaussian_nll,
    kgon_parameters,
    make_normal_crossing_data,
    make_tms_sparse_data,
    tms_loss,
)
from slt.reference import compare  # noqa: E402
from slt.training import train  # noqa: E402


def tms_job(n: int, k: int, seed: int):
    # float64 for the L-BFGS fit (float32 stalls near grad norm 1e-5 at small n);
    # SGLD runs in float32 on a copy, NUTS in float64
    X = make_tms_sparse_data(n, 6, torch.Generator().manual_seed(seed)).double()
    m = ToyModelOfSuperposition(6, 2, dtype=torch.float64)
    m.load_state_dict({name: v.double() for name, v in kgon_parameters(k, 6, 2, dead_bias=-1.0).items()})
    fit = train(m, X, tms_loss, steps=0, finish="lbfgs", tol=1e-8)
    if not fit.converged:
        raise RuntimeError(f"training the {k}-gon did not converge (grad norm {fit.grad_norm:.2g})")
    return m, X, tms_loss, slt.theory.tms_llc(f"{k}-gon")


def normal_crossing_job(n: int, powers: list[int], seed: int):
    X, Y = make_normal_crossing_data(n, torch.Generator().manual_seed(seed), dtype=torch.float64)
    m = NormalCrossing(powers, dtype=torch.float64)
    with torch.no_grad():
        m.w.copy_(m.empirical_minimum(X, Y))
    return m, (X, Y), gaussian_nll, slt.theory.normal_crossing_llc(powers)


def scaling(widths: list[int], ns: list[int], seed: int) -> list[dict]:
    from torch import nn

    from slt.models import gaussian_nll as nll
    from slt.reference import nuts_llc

    rows = []
    print(f"{'d':>6} {'n':>7} {'ms/grad':>8} {'grads/draw':>10} {'s/draw':>7} {'default call (min)':>18}", flush=True)
    for n in ns:
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n, 4, generator=g, dtype=torch.float64)
        for h in widths:
            torch.manual_seed(seed)  # scripts may seed globally; the library never does
            teacher = nn.Sequential(nn.Linear(4, h), nn.Tanh(), nn.Linear(h, 1)).double()
            with torch.no_grad():
                Y = teacher(X) + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
            m = nn.Sequential(nn.Linear(4, h), nn.Tanh(), nn.Linear(h, 1)).double()
            train(m, (X, Y), nll, steps=300, lr=1e-2, finish="lbfgs", finish_iterations=200)
            d = sum(p.numel() for p in m.parameters())
            r = nuts_llc(m, (X, Y), nll, num_chains=1, num_draws=100, num_warmup=100, seed=seed, force=True)
            dg = r.diagnostics
            grads = dg["grad_evals_per_draw"]
            ms = 1e3 * dg["seconds"] / (grads * 200)  # warmup draws cost about the same
            s_draw = dg["seconds"] / 200
            proj = 4 * 1500 * s_draw / 60
            rows.append({"d": d, "n": n, "ms_per_grad": ms, "grads_per_draw": grads, "s_per_draw": s_draw,
                         "default_call_minutes": proj})
            print(f"{d:6d} {n:7d} {ms:8.2f} {grads:10.1f} {s_draw:7.3f} {proj:18.1f}", flush=True)
    return rows


def normal_crossing_quadrature(powers, X, Y, w_star, nbeta, gamma, half_width=4.0, num=4001) -> float:
    """E[nβ (L_n(w) − L_n(w*))] under the localized posterior by quadrature (d ≤ 2):
    L_n(w) − L_n(w*) = ½ mean(x²) ((p − p̂)² − (p* − p̂)²), p = Π w_i^{k_i}."""
    s = float((X**2).mean())
    p_hat = float((X * Y).sum() / (X**2).sum())
    axes = [torch.linspace(-half_width, half_width, num if len(powers) == 2 else 200_001, dtype=torch.float64)
            + float(w_star[i]) for i in range(len(powers))]
    grids = torch.meshgrid(*axes, indexing="ij")
    p = torch.ones_like(grids[0])
    p_star = 1.0
    for i, (w, k) in enumerate(zip(grids, powers)):
        p = p * w**k
        p_star *= float(w_star[i]) ** k
    E = 0.5 * s * ((p - p_hat) ** 2 - (p_star - p_hat) ** 2)
    logw = -nbeta * E - 0.5 * gamma * sum((w - float(w_star[i])) ** 2 for i, w in enumerate(grids))
    wt = torch.softmax(logw.flatten(), 0)
    return float((wt * nbeta * E.flatten()).sum())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", choices=["tms", "normal_crossing", "scaling"], default="tms")
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 16], help="scaling: hidden widths")
    ap.add_argument("--ns", type=int, nargs="+", default=[1000, 10000], help="scaling: sample sizes")
    ap.add_argument("--n", type=int, default=None, help="samples (default 20000 for tms, 10000 otherwise)")
    ap.add_argument("--k", type=int, default=5, help="TMS k-gon")
    ap.add_argument("--powers", type=int, nargs="+", default=[1, 2], help="normal-crossing powers")
    ap.add_argument("--step-sizes", type=float, nargs="+", default=None)
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--nuts-draws", type=int, default=1000)
    ap.add_argument("--nuts-chains", type=int, default=4)
    ap.add_argument("--target-accept", type=float, default=None,
                    help="NUTS target acceptance (default 0.8 for tms, 0.95 for normal_crossing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.environ.get("SLT_RESULTS_DIR", "results"), "compare_nuts"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.job == "scaling":
        rows = scaling(args.widths, args.ns, args.seed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        return {"rows": rows}
    if args.job == "tms":
        n = args.n or 20_000
        model, data, loss, lam = tms_job(n, args.k, args.seed)
        steps = args.step_sizes or [1e-4, 3e-4, 1e-3, 3e-3]
        kw = dict(localization=10.0)
        title = f"TMS(6,2) {args.k}-gon, n={n}, γ=10, SGLD batch 256"
    else:
        n = args.n or 10_000
        model, data, loss, lam = normal_crossing_job(n, args.powers, args.seed)
        steps = args.step_sizes or [1e-4, 3e-4, 1e-3, 2e-3]
        kw = dict(localization=1.0, batch_size=None, dtype=torch.float64)
        title = f"NormalCrossing({args.powers}), n={n}, γ=1, full-batch SGLD"
        if len(args.powers) <= 2:  # the exact finite-n value of the same posterior, by quadrature
            lam = normal_crossing_quadrature(args.powers, *data, model.w.detach(), slt.default_nbeta(n), 1.0)
            title += f"; reference = exact finite-n value by quadrature (asymptotic λ = {slt.theory.normal_crossing_llc(args.powers):g})"
    tap = args.target_accept or (0.8 if args.job == "tms" else 0.95)
    res = compare(model, data, loss, step_sizes=steps, num_chains=args.chains, num_draws=args.draws,
                  nuts_kwargs={"target_accept_prob": tap}, nuts_chains=args.nuts_chains, nuts_draws=args.nuts_draws, seed=args.seed, reference=lam,
                  title=title, verbose=True, progress=False, **kw)
    print(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res.plot().savefig(out / f"{args.job}.png", dpi=120)
    record = {"job": args.job, "args": vars(args), "title": title, "reference_llc": lam,
              "rows": res.frame.to_dict(orient="records"), "best_step_size": res.best_step_size,
              "nuts": res.nuts.summary() if res.nuts else None,
              "versions": res.nuts.config["versions"] if res.nuts else None,
              "seconds": time.perf_counter() - t0}
    (out / f"{args.job}.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {out / (args.job + '.png')} and {out / (args.job + '.json')} in {record['seconds']:.0f}s")
    return record


if __name__ == "__main__":
    main()
