"""Cost of one SGLD step of ``slt.estimate_llc`` relative to one plain SGD step, same model and batch.

The LLC-engine issue asks, on a GPU, for the cost of an SGLD step relative to an SGD step on the same
batch for a deep linear network of ≥ 10M parameters.  Both loops below use the same module, data,
loss and batch size; SGD is ``torch.optim.SGD`` (forward, backward, update).  The SGLD cost is the
marginal cost per step of ``estimate_llc`` (one chain): the time of a run with ``2T`` steps minus the
time with ``T`` steps, divided by ``T``, so set-up (w* loss, control-variate table, step-size probe)
is excluded.  An SGLD step does more than SGD: the control variate L_B(w*) on the same batch (looked
up from a precomputed table), the noise draw, the localization term and the per-draw bookkeeping.

Two more references put the ratio in context: an SGLD step written by hand (one chain, the module's
own parameters, ``torch._foreach`` updates: what eager PyTorch needs for the same step), and, with
``--variants PATH:CHAINS ...``, slt's other paths and chain counts (per chain-step, so 8 chains in
one step of the batched path can cost less than one SGD step each).

Usage::

    python benchmarks/bench_step_cost.py --device cuda                  # DLN 4 × 1600² (10.2M params)
    python benchmarks/bench_step_cost.py --device cpu --width 400       # a CPU-sized smoke run
    python benchmarks/bench_step_cost.py --device auto --out step.json
    python benchmarks/bench_step_cost.py --device cuda --variants auto:1 loop:1 vmap:1 auto:8 --profile

Prints one line per loop and the ratio SGLD / SGD.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Callable

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


def _timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    for _ in range(3):  # warm-up
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def sgd_step_seconds(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int, steps: int) -> float:
    """Seconds of one ``torch.optim.SGD`` step (minibatch draw, forward, backward, update)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    g = torch.Generator(device=X.device).manual_seed(0)
    loss_fn = nn.MSELoss()

    def one() -> None:
        idx = torch.randint(0, X.shape[0], (batch,), generator=g, device=X.device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X[idx]), Y[idx]).backward()
        opt.step()

    return _timed(one, steps, X.device)


def hand_sgld_step_seconds(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int, steps: int,
                           eps: float = 1e-7, nbeta: float = 100.0, gamma: float = 1.0) -> float:
    """Seconds of one SGLD step written by hand on the module's own parameters (one chain): the floor
    of an SGLD step in eager PyTorch.  Per step: a minibatch, forward and backward, fresh noise, and
    w ← w − ε/2 (nβ ∇L + γ (w − w*)) + √ε ξ over all parameters with ``torch._foreach`` ops (as
    ``torch.optim`` updates).  No loss at w* and no bookkeeping: slt's control variate is a lookup in
    a per-sample table made at set-up, and its trace one write per draw."""
    params = [p for p in model.parameters()]
    star = [p.detach().clone() for p in params]
    g = torch.Generator(device=X.device).manual_seed(0)
    loss_fn = nn.MSELoss()
    saved = [p.detach().clone() for p in params]

    def one() -> None:
        idx = torch.randint(0, X.shape[0], (batch,), generator=g, device=X.device)
        loss = loss_fn(model(X[idx]), Y[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            noise = [torch.randn(p.shape, generator=g, device=p.device) for p in params]
            diff = torch._foreach_sub(params, star)
            torch._foreach_mul_(diff, gamma)
            torch._foreach_add_(diff, grads, alpha=nbeta)
            torch._foreach_add_(params, diff, alpha=-eps / 2)
            torch._foreach_add_(params, noise, alpha=eps ** 0.5)

    try:
        return _timed(one, steps, X.device)
    finally:
        with torch.no_grad():
            for p, s0 in zip(params, saved):
                p.copy_(s0)


def sgld_run(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int, T: int, chains: int = 1,
             path: str = "auto") -> tuple[float, dict]:
    """Wall seconds of one ``estimate_llc`` call of ``T`` steps (synchronised at both ends) and its
    diagnostics (``seconds``: the sampling loop alone; ``setup_seconds``)."""
    _sync(X.device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # short timing runs: the convergence warnings are expected
        warnings.simplefilter("ignore")
        res = slt.estimate_llc(model, (X, Y), nn.functional.mse_loss, num_chains=chains, num_draws=T,
                               num_burnin=0, step_size=1e-7, localization=1.0, batch_size=batch, device=X.device,
                               seed=0, progress=False, extend_draws=False, vectorize=path)
    _sync(X.device)
    return time.perf_counter() - t0, res.diagnostics


def sgld_step_seconds(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int, steps: int,
                      repeats: int = 2, chains: int = 1, path: str = "auto") -> dict[str, float]:
    """Marginal cost per step: (time of a ``2·steps`` run − time of a ``steps`` run) / ``steps``, each
    length warmed up once first (first-use costs of a run length — kernels, plans, allocator
    blocks — are not counted) and timed ``repeats`` times in alternation, the fastest kept.  Also
    the sampling loop's own time per step (``diagnostics["seconds"]`` of the longer run / its steps,
    which includes no set-up) and the set-up seconds, so a gap between the two readings shows where
    the time goes."""
    kw = dict(chains=chains, path=path)
    sgld_run(model, X, Y, batch, steps, **kw)
    sgld_run(model, X, Y, batch, 2 * steps, **kw)
    short = long = float("inf")
    diag: dict = {}
    for _ in range(repeats):
        short = min(short, sgld_run(model, X, Y, batch, steps, **kw)[0])
        t, d = sgld_run(model, X, Y, batch, 2 * steps, **kw)
        if t < long:
            long, diag = t, d
    return {"marginal": (long - short) / steps, "loop": diag["seconds"] / (2 * steps),
            "setup": diag["setup_seconds"], "short": short, "long": long, "path": diag.get("path", "?"),
            "chains": chains, "asked": path}


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
    ap.add_argument("--variants", nargs="+", default=["auto:1"],
                    help="slt runs to time, PATH:CHAINS each (path auto, vmap, loop or compile; default auto:1, "
                         "the issue's one-chain ratio)")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one SGLD run")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, X, Y = build(args.width, args.depth, args.n, device, seed=0)
    d = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"DLN {args.depth} x {args.width}^2 = {d / 1e6:.2f}M params, batch {args.batch}, device {name}, "
          f"torch {torch.__version__}", flush=True)
    sgd = sgd_step_seconds(model, X, Y, args.batch, args.steps)
    hand = hand_sgld_step_seconds(model, X, Y, args.batch, args.steps)
    print(f"  SGD step          {sgd * 1e3:9.3f} ms  (torch.optim.SGD: minibatch, forward, backward, update)")
    print(f"  hand SGLD step    {hand * 1e3:9.3f} ms  ({hand / sgd:.2f}x SGD; one chain written by hand: the eager "
          f"floor of an SGLD step)", flush=True)
    out: dict = {"params": d, "device": name, "batch": args.batch, "steps": args.steps, "sgd_ms": sgd * 1e3,
                 "hand_sgld_ms": hand * 1e3, "torch": torch.__version__, "variants": []}
    for v in args.variants:
        path, _, c = v.partition(":")
        C = int(c or 1)
        s = sgld_step_seconds(model, X, Y, args.batch, args.steps, chains=C, path=path)
        per_chain = s["marginal"] / C
        print(f"  slt {path}:{C} ({s['path']} path)  {s['marginal'] * 1e3:9.3f} ms per step of {C} chain(s) "
              f"(marginal: runs of {args.steps} and {2 * args.steps} steps took {s['short']:.3f} and {s['long']:.3f} s; "
              f"the loop's own {s['loop'] * 1e3:.3f} ms; set-up {s['setup']:.3f} s)", flush=True)
        print(f"      per chain-step {per_chain * 1e3:.3f} ms = {per_chain / sgd:.2f}x SGD (loop {s['loop'] / C / sgd:.2f}x), "
              f"{per_chain / hand:.2f}x the hand SGLD step", flush=True)
        out["variants"].append({**s, "ms": s["marginal"] * 1e3, "ms_per_chain": per_chain * 1e3,
                                "ratio": per_chain / sgd, "ratio_loop": s["loop"] / C / sgd,
                                "over_hand": per_chain / hand})
    first = out["variants"][0] if out["variants"] else None
    if first is not None:  # the figure: the first variant (default auto with one chain)
        out.update(sgld_ms=first["ms"], ratio=first["ratio"], ratio_loop=first["ratio_loop"])
        print(f"  ratio SGLD / SGD = {first['ratio']:.2f} (marginal), {first['ratio_loop']:.2f} (loop), "
              f"{args.variants[0]} (target <= 1.2)")
    if args.out:  # before the profile, so a cut run keeps the numbers
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=float)
    if args.profile:
        print(profile_sgld(model, X, Y, args.batch, args.steps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
