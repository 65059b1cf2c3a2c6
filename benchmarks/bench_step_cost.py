"""Cost of one SGLD step of ``slt.estimate_llc`` relative to one plain SGD step, same model and batch.

The LLC-engine issue asks, on a GPU, for the cost of an SGLD step relative to an SGD step on the same
batch for a deep linear network of ≥ 10M parameters.  Both loops below use the same module, data,
loss and batch size; SGD is ``torch.optim.SGD`` (forward, backward, update).  The SGLD cost is the
marginal cost per step of ``estimate_llc`` (one chain): the time of a run with ``2T`` steps minus the
time with ``T`` steps, divided by ``T``, so set-up (w* loss, control-variate table, step-size probe)
is excluded.  An SGLD step does more than SGD: the control variate L_B(w*) on the same batch (looked
up from a precomputed table), the noise draw, the localization term and the per-draw bookkeeping.

Usage::

    python benchmarks/bench_step_cost.py --device cuda                  # DLN 4 × 1600² (10.2M params)
    python benchmarks/bench_step_cost.py --device cpu --width 400       # a CPU-sized smoke run
    python benchmarks/bench_step_cost.py --device auto --out step.json

Prints one line per loop and the ratio SGLD / SGD.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

import slt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(width: int, depth: int, n: int, device: torch.device, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(torch.randn(width, width, generator=g) / width**0.5)
    X = torch.randn(n, width, generator=g)
    with torch.no_grad():
        Y = model(X) + 0.1 * torch.randn(n, width, generator=g)
    return model.to(device), X.to(device), Y.to(device)


def sgd_step_seconds(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    g = torch.Generator(device=X.device).manual_seed(0)
    loss_fn = nn.MSELoss()

    def one() -> None:
        idx = torch.randint(0, X.shape[0], (batch,), generator=g, device=X.device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X[idx]), Y[idx]).backward()
        opt.step()

    for _ in range(3):  # warm-up
        one()
    _sync(X.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(X.device)
    return (time.perf_counter() - t0) / steps


def sgld_run(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int, T: int) -> tuple[float, dict]:
    """Wall seconds of one ``estimate_llc`` call of ``T`` steps (synchronised at both ends) and its
    diagnostics (``seconds``: the sampling loop alone; ``setup_seconds``)."""
    _sync(X.device)
    t0 = time.perf_counter()
    res = slt.estimate_llc(model, (X, Y), nn.functional.mse_loss, num_chains=1, num_draws=T, num_burnin=0,
                           step_size=1e-7, localization=1.0, batch_size=batch, device=X.device, seed=0,
                           progress=False, extend_draws=False)
    _sync(X.device)
    return time.perf_counter() - t0, res.diagnostics


def sgld_step_seconds(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int, steps: int,
                      repeats: int = 2) -> dict[str, float]:
    """Marginal cost per step: (time of a ``2·steps`` run − time of a ``steps`` run) / ``steps``, each
    length warmed up once first (first-use costs of a run length — kernels, plans, allocator
    blocks — are not counted) and timed ``repeats`` times in alternation, the fastest kept.  Also
    the sampling loop's own time per step (``diagnostics["seconds"]`` of the longer run / its steps,
    which includes no set-up) and the set-up seconds, so a gap between the two readings shows where
    the time goes."""
    sgld_run(model, X, Y, batch, steps)
    sgld_run(model, X, Y, batch, 2 * steps)
    short = long = float("inf")
    diag: dict = {}
    for _ in range(repeats):
        short = min(short, sgld_run(model, X, Y, batch, steps)[0])
        t, d = sgld_run(model, X, Y, batch, 2 * steps)
        if t < long:
            long, diag = t, d
    return {"marginal": (long - short) / steps, "loop": diag["seconds"] / (2 * steps),
            "setup": diag["setup_seconds"], "short": short, "long": long, "path": diag.get("path", "?")}


def profile_sgld(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int, steps: int, rows: int = 15) -> str:
    """torch.profiler table of one ``steps``-step run (top ops by self device time on CUDA, by self
    CPU time otherwise): what to look at when the ratio is far off."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if X.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        sgld_run(model, X, Y, batch, steps)
    key = "self_cuda_time_total" if X.device.type == "cuda" else "self_cpu_time_total"
    out = prof.key_averages().table(sort_by=key, row_limit=rows)
    if X.device.type == "cuda":
        out += "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--n", type=int, default=4096, help="samples")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one SGLD run")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, X, Y = build(args.width, args.depth, args.n, device, seed=0)
    d = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"DLN {args.depth} x {args.width}^2 = {d / 1e6:.2f}M params, batch {args.batch}, device {name}")
    sgd = sgd_step_seconds(model, X, Y, args.batch, args.steps)
    sgld = sgld_step_seconds(model, X, Y, args.batch, args.steps)
    print(f"  SGD step  {sgd * 1e3:9.3f} ms")
    print(f"  SGLD step {sgld['marginal'] * 1e3:9.3f} ms  (slt.estimate_llc, 1 chain, marginal cost per step: "
          f"runs of {args.steps} and {2 * args.steps} steps took {sgld['short']:.3f} and {sgld['long']:.3f} s)")
    print(f"  SGLD loop {sgld['loop'] * 1e3:9.3f} ms  (the sampling loop's own time per step, {sgld['path']} path; "
          f"set-up {sgld['setup']:.3f} s per run)")
    print(f"  ratio SGLD / SGD = {sgld['marginal'] / sgd:.2f} (marginal), {sgld['loop'] / sgd:.2f} (loop)")
    if args.profile:
        print(profile_sgld(model, X, Y, args.batch, args.steps))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"params": d, "device": name, "batch": args.batch, "sgd_ms": sgd * 1e3,
                       "sgld_ms": sgld["marginal"] * 1e3,
                       "sgld_loop_ms": sgld["loop"] * 1e3, "setup_s": sgld["setup"], "ratio": sgld["marginal"] / sgd,
                       "ratio_loop": sgld["loop"] / sgd, "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
