"""Default job: LLC of the toy model of superposition's 5-gon and 6-gon vs closed form.

Builds the two critical points of the 6-feature, 2-hidden-dimension TMS
(Chen et al. 2023), trains each to the minimum of the empirical loss on
n = 20 000 high-sparsity samples, estimates both LLCs in one batched call
(2 checkpoints × 8 chains) and compares them with the closed-form values
(5-gon 7, 6-gon 8.5).  Writes ``<out>/result.json`` (config, seed, versions,
device, estimates, diagnostics) and ``<out>/loss_trace.png``/``.pdf``; the
default ``<out>`` is ``${SLT_RESULTS_DIR:-results}/quickstart``, which git
ignores (generated outputs never dirty the clone).

    python -m experiments.quickstart [--out DIR] [--n 20000] [--draws 4000] [--chains 8]

See the README's "Two commands" for its run time on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import slt  # noqa: E402
from slt.models import ToyModelOfSuperposition, classify_tms_point, kgon_parameters, make_tms_sparse_data, tms_loss  # noqa: E402
from slt.training import train  # noqa: E402


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default from the parser itself (never a copy)."""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("SLT_RESULTS_DIR", "results"), "quickstart"),
                    help="output folder (result.json, loss_trace.png/.pdf)")
    ap.add_argument("--n", type=int, default=20_000, help="number of samples")
    ap.add_argument("--draws", type=int, default=4000, help="draws per chain (burn-in: draws / 4)")
    ap.add_argument("--chains", type=int, default=8, help="chains per checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="seed of data and chains")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()

    X = make_tms_sparse_data(args.n, 6, torch.Generator().manual_seed(args.seed))
    names = {5: "5-gon", 6: "6-gon"}
    models = []
    for k in (5, 6):
        m = ToyModelOfSuperposition(6, 2)
        # dead column with a clearly negative bias: inside the 5-gon's flat region
        m.load_state_dict({n: v.float() for n, v in kgon_parameters(k, 6, 2, dead_bias=-1.0).items()})
        fit = train(m, X, tms_loss, steps=0, finish="lbfgs")
        if not fit.converged:
            raise RuntimeError(f"training the {names[k]} did not converge (grad norm {fit.grad_norm:.2g})")
        models.append(m)

    results = slt.estimate_llc(
        models, X, tms_loss, num_chains=args.chains, num_draws=args.draws, num_burnin=args.draws // 4,
        localization=10.0,  # fixed in n; weak enough for the flat dead column, strong enough to mix
        seed=args.seed, device=args.device,
    )
    rows = []
    for k, m, r in zip((5, 6), models, results):
        theory = slt.theory.tms_llc(names[k])
        cls = classify_tms_point(m.W.detach(), m.b.detach(), tol=0.15)
        rows.append({
            "point": names[k], "classified_as": cls["name"], "llc_theory": theory,
            "relative_error": (r.llc_mean - theory) / theory, **r.summary(),
        })
        print(f"{names[k]}: λ̂ = {r.llc_mean:.2f} ± {r.llc_sem:.2f}   closed form {theory}   "
              f"({100 * (r.llc_mean - theory) / theory:+.1f}%)   R-hat {r.diagnostics['rhat']:.2f}  "
              f"MALA {r.diagnostics['mala_acceptance']:.2f}")

    fig, axes = plt.subplots(2, 1, figsize=(9, 7.5), sharey=False)
    for ax, k, r in zip(axes, (5, 6), results):
        slt.plot_trace(r, ax=ax, title=f"TMS {names[k]}: λ̂ = {r.llc_mean:.2f} ± {r.llc_sem:.2f} "
                                        f"(theory {slt.theory.tms_llc(names[k])})")
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "loss_trace.png", dpi=120)
    fig.savefig(out / "loss_trace.pdf")
    record = {
        "job": "quickstart: TMS (6 features, 2 hidden) 5-gon and 6-gon LLC vs closed form",
        "config": {**vars(args), **results[0].config, "seed": args.seed},
        "seed": args.seed,
        "versions": results[0].config["versions"],
        "device": results[0].config["device"],
        "host": platform.node(),
        "seconds": time.perf_counter() - t0,
        "results": rows,
    }
    _atomic_json(out / "result.json", record)
    print(f"wrote {out / 'result.json'} and {out / 'loss_trace.png'} in {record['seconds']:.1f}s")
    return record


if __name__ == "__main__":
    main()
