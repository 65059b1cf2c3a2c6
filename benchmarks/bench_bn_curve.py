"""An LLC-over-training curve of a BatchNorm CNN: one batched call against one call per checkpoint.

The checkpoints of a BatchNorm network differ in their running statistics as well as in their
parameters.  ``slt.estimate_llc(net, data, loss, state_dicts=ckpts)`` runs every checkpoint's chains in
one batched computation, each row with its checkpoint's own statistics
(``ChainEvaluator.checkpoint_tensors``); before 2026-12-06 such checkpoints ran one at a time, which is
what (b) does by hand.  The job: the 1.9k-parameter ``SmallCNN`` of ``bench_generic.py`` (conv 8 → BN →
conv 16 → BN → linear 10, eval mode) on its 8×8 images (n = 1792), trained with Adam for 400 steps
(batch 256), a checkpoint every 50 steps; both ways with identical settings (SGLD, ε, nβ, γ and
burn-in given, 4 chains × 200 draws per checkpoint, batch 256, no draw extensions) and the seeds a
batched call gives its checkpoints, in one process; and, as the floor, (c) the plain PyTorch loop of the
same SGLD steps (``bench_generic.hand_loop_llc``: chains one after another, ``functional_call`` + autograd,
each checkpoint with its own statistics) at the same nβ, ε, γ, chains, steps and batch.

Printed: seconds of each way (the faster of ``--repeats`` turns each) and the ratios, ms per chain-step, and per checkpoint λ̂ of both slt ways
with z = |Δ| / s.e.: the same chains, so z is rounding (the batched kernels sum in another order), not
Monte-Carlo error.

Usage::

    python benchmarks/bench_bn_curve.py            # about 2 minutes on a 2-core CPU
    python benchmarks/bench_bn_curve.py --checkpoints 4 --draws 100
    python benchmarks/bench_bn_curve.py --device cuda --checkpoints 16   # on a GPU (not yet run)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import slt  # noqa: E402
from bench_generic import SmallCNN, _image_data, ce_per_sample, hand_loop_llc  # noqa: E402


def checkpoints(count: int) -> tuple[torch.nn.Module, list[dict], torch.Tensor, torch.Tensor]:
    """The trained CNN (eval mode) and ``count`` state dicts saved along its training."""
    X, Y = _image_data(1792, 0)
    torch.manual_seed(3)
    net = SmallCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    every = 400 // count
    sds = []
    for step in range(every * count):
        idx = torch.randint(0, X.shape[0], (256,), generator=g)
        loss = F.cross_entropy(net(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == every - 1:
            sds.append(copy.deepcopy(net.state_dict()))
    return net.eval(), sds, X, Y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where slt samples (the model and data are built on the CPU)")
    args = ap.parse_args()
    net, sds, X, Y = checkpoints(args.checkpoints)
    kw = dict(num_chains=args.chains, num_draws=args.draws, num_burnin=args.draws // 2, step_size=1e-5,
              localization=100.0, sampler="sgld", seed=0, extend_draws=False, progress=False, device=args.device)
    steps = args.draws + args.draws // 2
    def one_call() -> list:
        return slt.estimate_llc(net, (X, Y), F.cross_entropy, state_dicts=sds, **kw)

    def per_checkpoint() -> list:
        out = []
        for k, sd in enumerate(sds):
            m = copy.deepcopy(net)
            m.load_state_dict(sd)
            out.append(slt.estimate_llc(m, (X, Y), F.cross_entropy, **{**kw, "seed": k}))
        return out

    def hand() -> list:
        out = []
        for k, sd in enumerate(sds):
            m = copy.deepcopy(net).to(args.device)
            m.load_state_dict(sd)
            out.append(hand_loop_llc(m, X.to(args.device), Y.to(args.device), F.cross_entropy, ce_per_sample,
                                     nbeta=slt.default_nbeta(X.shape[0]), step_size=kw["step_size"],
                                     localization=kw["localization"], num_chains=args.chains, num_draws=steps,
                                     batch_size=256, seed=k))
        return out

    t_batched = t_each = t_hand = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short fixed-ε runs: "not converged" findings are expected here
        slt.estimate_llc(net, (X, Y), F.cross_entropy, **{**kw, "num_draws": 10, "num_burnin": 0})  # warm-up
        for _ in range(args.repeats):  # the two ways take turns; the fastest of each is printed
            t = time.perf_counter()
            batched = one_call()
            t_batched = min(t_batched, time.perf_counter() - t)
            t = time.perf_counter()
            each = per_checkpoint()
            t_each = min(t_each, time.perf_counter() - t)
            t = time.perf_counter()
            hand()
            t_hand = min(t_hand, time.perf_counter() - t)
    chain_steps = len(sds) * args.chains * steps
    print(f"BatchNorm CNN, {len(sds)} checkpoints x {args.chains} chains x {steps} steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"  one batched call : {t_batched:7.2f} s  {1e3 * t_batched / chain_steps:.3f} ms/chain-step  "
          f"(path {batched[0].config['path']})")
    print(f"  one per checkpoint: {t_each:7.2f} s  {1e3 * t_each / chain_steps:.3f} ms/chain-step  "
          f"(path {each[0].config['path']})")
    print(f"  hand loop (floor) : {t_hand:7.2f} s  {1e3 * t_hand / chain_steps:.3f} ms/chain-step")
    print(f"  ratio {t_each / t_batched:.2f}x over one call per checkpoint; batched / hand loop {t_batched / t_hand:.2f}")
    print("  k   batched λ̂      separate λ̂    z (rounding)")
    for k, (a, b) in enumerate(zip(batched, each)):
        z = abs(a.llc_mean - b.llc_mean) / max(b.llc_sem, 1e-12)
        print(f"  {k}  {a.llc_mean:8.3f} ± {a.llc_sem:.3f}  {b.llc_mean:8.3f} ± {b.llc_sem:.3f}  {z:.2g}")


if __name__ == "__main__":
    main()
