"""Per-head weight-refined LLC: slt's one batched call vs devinterp 2.0.1's per-restriction runs.

The job (Wang et al. 2024, arXiv 2410.02984, on devinterp's home turf): a Hugging Face GPT-2 built
from ``GPT2Config`` (2 layers × 4 heads, n_embd 64, vocab 64, context 16, dropout 0; no download),
trained briefly on sequences of a sparse random Markov chain (the ``gpt2`` job of
``bench_generic.py``), and the weight-refined LLC of each of its 8 attention heads: only that head's
slices of ``c_attn`` (Q, K, V columns) and ``c_proj`` (rows) move.

Three ways, identical settings (nβ, γ, ε given by hand, chains, draws, batch of sequences, no
burn-in, SGLD, one torch thread):

(a) slt, ONE call: ``slt.estimate_llc(lm, {"input_ids": seqs}, slt.losses.causal_lm,
    restrict_to=slt.restrict.heads(lm))`` — all 8 heads × chains in one batched computation;
(b) slt, one call per head (``restrict_to=heads[label]``), one after another;
(c) devinterp 2.0.1: ``devinterp.slt.llc.llc(lm, dataset, {}, param_masks=create_param_masks(lm,
    label), ...)`` per head (its own per-token LM loss; chains one after another).

Printed: seconds per method, ratios, ms per chain-step, and per head λ̂ ± s.e. of slt and devinterp
(devinterp's mean over all steps = its post-burn-in mean here; s.e. = std over chains / √C) with
z = |Δ| / √(s.e.² + s.e.²).  With no burn-in and a few hundred steps the chains are still moving
away from w*: the λ̂ are agreement checks of two samplers of the same restricted posterior, not
calibrated LLCs.

With ``--bif``, also the cost of ``slt.bif`` on the full model (ms per draw per training sample).

Usage::

    python benchmarks/bench_refined.py                 # ~7 min on a 2-core CPU (--bif: ~8)
    python benchmarks/bench_refined.py --quick         # smoke run (~1 min)
    python benchmarks/bench_refined.py --device cuda   # on a GPU (benchmarks/gpu_suite.sh runs it)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))

NBETA, GAMMA, EPS = 46.0, 100.0, 1e-4


def build_lm():
    """The trained GPT-2 and its token sequences ``(n, ctx + 1)``."""
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from bench_generic import _markov_tokens

    hf_logging.set_verbosity_error()
    ctx, vocab = 16, 64
    cfg = GPT2Config(vocab_size=vocab, n_positions=ctx + 1, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(4)
    lm = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")
    seq = _markov_tokens(1024, ctx + 1, vocab, 0)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    steps = 300
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, seq.shape[0], (128,), generator=g)
        logits = lm(input_ids=seq[idx]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), seq[idx, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return lm.eval(), seq


def run_slt(lm, seq, restrict_to, chains: int, draws: int, batch: int):
    import slt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slt.estimate_llc(lm, {"input_ids": seq}, slt.losses.causal_lm, restrict_to=restrict_to,
                                num_chains=chains, num_draws=draws, num_burnin=0, step_size=EPS, nbeta=NBETA,
                                localization=GAMMA, batch_size=batch, seed=0, progress=False, device=seq.device,
                                extend_draws=False)  # the same steps as devinterp's runs


def run_devinterp(lm, seq, label: str, chains: int, draws: int, batch: int):
    from datasets import Dataset
    from devinterp.slt import sampler as di_sampler
    from devinterp.slt.llc import llc
    from devinterp.slt.weight_restrictions import create_param_masks

    from slt.peers.devinterp import _preserve_global_rngs, _quiet_progress

    ds = Dataset.from_dict({"input_ids": seq.cpu().numpy()}).with_format("torch")
    net = copy.deepcopy(lm)
    masks = create_param_masks(net, label)
    with tempfile.TemporaryDirectory(prefix="bench_refined_") as tmp, warnings.catch_warnings(), \
            _preserve_global_rngs(str(seq.device)), _quiet_progress(di_sampler, False):
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        raw = llc(net, ds, {}, lr=EPS, n_beta=NBETA, param_masks=masks, localization=GAMMA, noise_level=1.0,
                  num_chains=chains, num_draws=draws, num_burnin_steps=0, batch_size=batch,
                  num_init_loss_batches=seq.shape[0] // batch, init_seed=0, device=str(seq.device),
                  output_path=os.path.join(tmp, "s.zarr"))
        seconds = time.perf_counter() - t0
        per_chain = np.asarray(raw["llc_per_chain"].values, dtype=np.float64)
    return per_chain, seconds


def step_flops(lm, seq, H, chains: int, batch: int) -> tuple[float, float]:
    """Matrix-multiply and attention FLOPs per chain-step (``torch.utils.flop_counter``): of slt's one
    call (the rows of every head, evaluated with the row plan the engine sets: layers below a head's
    layer once per block, backward down to that layer), and of a full forward and backward of one
    chain (what a run per restriction without sharing computes)."""
    import slt
    from torch.utils.flop_counter import FlopCounterMode

    from slt.target import prepare_target

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = prepare_target(lm, {"input_ids": seq}, slt.losses.causal_lm, restrict_to=H, nbeta=NBETA,
                           localization=GAMMA, vectorize="vmap", device=seq.device)
    rows = t.rows(chains)
    plan = t.groups.row_plan(t.K, chains, t.spec)
    if plan is not None:
        t.evaluator.row_plan = (rows.shape[0], [(r.to(seq.device), n) for r, n in plan])  # as the engine sets it
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(seq.shape[0], (chains, batch), generator=g).to(seq.device)
    idx = idx.repeat(t.G, 1)  # chain c of every head: one batch
    with FlopCounterMode(display=False) as fc:
        t.evaluator.loss_and_grad(rows, t.source.gather(idx))
    one_call = fc.get_total_flops() / rows.shape[0]
    full = prepare_target(lm, {"input_ids": seq}, slt.losses.causal_lm, vectorize="loop", device=seq.device)
    with FlopCounterMode(display=False) as fc:
        full.evaluator.loss_and_grad(full.rows(1), full.source.gather(idx[:1]))
    return float(one_call), float(fc.get_total_flops())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 draws")
    ap.add_argument("--no-devinterp", action="store_true")
    ap.add_argument("--no-separate", action="store_true", help="skip the one-slt-call-per-head row")
    ap.add_argument("--bif", action="store_true", help="also time slt.bif on the full model")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: the model is trained on the CPU and "
                    "moved there; every method runs there")
    args = ap.parse_args(argv)
    if args.quick:
        args.draws = 20
    torch.set_num_threads(args.threads)
    import slt
    from slt.restrict import heads

    t0 = time.perf_counter()
    lm, seq = build_lm()
    import bench_generic

    bench_generic.DEVICE = dev = torch.device(args.device)  # where the floor's matmul runs too
    lm, seq = lm.to(dev), seq.to(dev)
    H = heads(lm)
    print(f"GPT-2: {sum(p.numel() for p in lm.parameters())} params, {len(H)} heads, n = {seq.shape[0]} sequences "
          f"of {seq.shape[1]} tokens; trained in {time.perf_counter() - t0:.1f} s")
    C, T, B = args.chains, args.draws, args.batch
    steps = C * T
    print(f"settings: {C} chains × {T} draws, batch {B} sequences, nβ = {NBETA}, γ = {GAMMA}, ε = {EPS}, "
          f"no burn-in, {args.threads} thread(s), device {dev}\n")
    run_slt(lm, seq, H, C, 2, B)  # warm-up (path decision, allocator)

    t = time.perf_counter()
    res = run_slt(lm, seq, H, C, T, B)
    t_one = time.perf_counter() - t
    out = {"slt_one_call_s": t_one}
    print(f"slt, one batched call ({len(H)} heads): {t_one:.1f} s = {1e3 * t_one / (steps * len(H)):.2f} ms per "
          f"chain-step (path {next(iter(res.values())).config['path']})")
    if not args.no_separate:
        t = time.perf_counter()
        for lab in H:
            run_slt(lm, seq, H[lab], C, T, B)
        t_sep = time.perf_counter() - t
        out["slt_separate_s"] = t_sep
        print(f"slt, one call per head:            {t_sep:.1f} s ({t_sep / t_one:.2f}× the one call)")
    di = {}
    if not args.no_devinterp:
        t_di = 0.0
        for lab in H:
            di[lab], s = run_devinterp(lm, seq, lab, C, T, B)
            t_di += s
        out["devinterp_s"] = t_di
        print(f"devinterp 2.0.1, one run per head: {t_di:.1f} s = {1e3 * t_di / (steps * len(H)):.2f} ms per "
              f"chain-step; devinterp ÷ slt one call = {t_di / t_one:.1f}×")
    from bench_generic import gemm_flops_per_second

    f_one, f_full = step_flops(lm, seq, H, C, B)
    rate = gemm_flops_per_second()
    floor = 1e3 * f_one / rate
    out.update({"flops_one_call_per_chain_step": f_one, "flops_full_per_chain_step": f_full, "floor_ms": floor})
    print(f"floor: slt's one call computes {f_one / 1e6:.1f} MFLOP of matmul/attention per chain-step (a full forward "
          f"and backward: {f_full / 1e6:.1f}); at this device's {rate / 1e9:.0f} GFLOP/s (a float32 matmul) that is "
          f"{floor:.2f} ms: slt one call = {1e3 * t_one / (steps * len(H)) / floor:.1f}× the floor"
          + (f", devinterp ÷ floor = {1e3 * out['devinterp_s'] / (steps * len(H)) / floor:.1f}× (the most this "
             "evaluation could gain over devinterp on this thread)" if "devinterp_s" in out else ""))
    print("\nhead    λ̂ slt            λ̂ devinterp       z")
    zs = []
    for lab, r in res.items():
        line = f"{lab:6s}  {r.llc_mean:7.3f} ± {r.llc_sem:5.3f}"
        if lab in di:
            m, se = di[lab].mean(), di[lab].std(ddof=1) / np.sqrt(len(di[lab]))
            z = abs(r.llc_mean - m) / max(np.hypot(r.llc_sem, se), 1e-12)
            zs.append(z)
            line += f"   {m:7.3f} ± {se:5.3f}   {z:.2f}"
        print(line)
    if zs:
        print(f"max z = {max(zs):.2f} over {len(zs)} heads")
    if args.bif and hasattr(slt, "bif"):
        n_train = 256
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = slt.bif(lm, {"input_ids": seq[:n_train]}, slt.losses.causal_lm, num_chains=C, num_draws=T,
                        num_burnin=0, step_size=EPS, nbeta=NBETA, localization=GAMMA, batch_size=B, seed=0,
                        progress=False, extend_draws=False)
        t_bif = time.perf_counter() - t
        out["bif_ms_per_draw_per_sample"] = 1e3 * t_bif / (C * T * n_train)
        print(f"\nslt.bif, {n_train} training sequences: {t_bif:.1f} s = "
              f"{out['bif_ms_per_draw_per_sample']:.3f} ms per draw per training sample; values {tuple(b.values.shape)}")
    return out


if __name__ == "__main__":
    main()
