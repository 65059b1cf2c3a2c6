"""The generic (real-network) benchmark: slt vs devinterp 2.0.1 vs a hand-written PyTorch loop.

Every job is one trained network (plain ``nn.Module``s, no ``forward_chains``) run three ways on the
identical LLC job (same model at w*, data, loss, nβ, γ, ε, chains, draws, batch size, no burn-in):

(a) ``slt.estimate_llc`` — ``vectorize="auto"`` (the default a user gets) and each explicit path
    (``"vmap"``, ``"loop"``, ``"compile"``: vmap with its step compiled by ``torch.compile``, the
    compiling included in its time and excluded from "loop only"), plus ``vmap`` with the MALA
    diagnostic off (``mala_every=0``) to show what the diagnostic costs;
(b) devinterp 2.0.1 through ``slt.peers.devinterp_llc`` (chains one after another; λ̂ averages every
    step, so burn-in is 0 on all sides and its mean is the comparable one);
(c) the *floor*: a plain loop a competent user writes in 20 lines (:func:`hand_loop_llc`) — for each
    step, for each chain, ``torch.func.functional_call`` + ``torch.autograd.grad`` on a minibatch and
    the in-place SGLD update w ← w − ε/2 (nβ ∇L_B + γ(w − w*)) + √ε ξ, recording
    nβ (L_B(w) − L_B(w*)) with L_B(w*) gathered from per-sample losses at w* precomputed once.
    ``--hand-heap`` adds a row: the same loop inside ``slt._runtime.retained_heap`` (glibc's heap kept
    mapped while sampling, as slt keeps it), so that the allocator setting and slt's own work can be told
    apart.  slt's setting freezes glibc's dynamic thresholds at 32/64 MiB for the rest of the process, and
    the warm-up runs slt first: every timed method runs with those thresholds.

Jobs (synthetic data, fixed seeds, each network trained briefly with Adam to near a minimum):

* ``mlp``    MLP 64-128-128-10 (26k params), n = 1792 samples of a 10-class random-teacher task, CE.
* ``cnn``    CNN with BatchNorm (1.9k params) on 8×8 one-channel images, 10 classes, eval mode.  devinterp
             calls ``model.train()``, so the network is wrapped in :class:`EvalLocked` (``train()`` keeps it
             in eval mode) to give devinterp the same job.  An extra row ``cnn-train`` runs the plain
             network in training mode (batch statistics; slt's auto path falls back to its loop; the hand
             loop then evaluates L_B(w*) by a forward pass, as slt does).
* ``gpt2``   Hugging Face GPT-2 from ``GPT2Config`` (2 layers, n_embd 64, 4 heads, vocab 64, context 16,
             dropout 0; 106k params), trained on a synthetic next-token task (a sparse random Markov
             chain over 64 tokens, 4 successors per token).  slt takes the ``ModelOutput`` itself
             (``slt.losses.causal_lm``), but so that all three do identical work
             :class:`LogitsOnly` wraps it to return ``.logits`` and the loss is next-token cross-entropy on
             (input, shifted target) tensors (:func:`lm_loss`).  devinterp gets the same wrapper through the
             peer helper's generic path (an index column as ``input_ids``), so all three do identical work.
             Batch 64 sequences (1024 tokens) per step: at batch 256 one chain-step costs ≈ 0.1 s on one
             CPU thread.  vmap has no batching rule for CPU sdpa attention and runs that op per sample (a
             PyTorch performance warning; it still works, and at batch 64 vmap and loop cost about the same);
             ``--gpt2-attn eager`` switches to eager attention (slower on both paths in a check at batch 256).
* ``mlp1m``  MLP 64-700-700-700-10 (1.03M params), same data as ``mlp``, a quarter of the draws.
* ``curve``  LLC-over-training curve: 16 checkpoints of a 13k-param MLP (one-hot (a, b) → 134 → 32) trained
             on modular addition mod 32 (all 1024 pairs).  slt runs the 16 checkpoints in ONE batched call
             (``estimate_llc(template, data, loss, state_dicts=[...])``); devinterp and the hand loop run
             them one after another.

Common settings: 8 chains, batch 256 (gpt2: 64), nβ = 46, γ = 100, ε = 1e-4 (set by hand: all three do
identical work), no burn-in, seed 0, one torch thread (``--threads``; under load two threads made both
libraries 10–17× slower).  n is a multiple of the batch size where it matters (1792 = 7·256,
1024 = 4·256), so devinterp's init loss (one pass of its drop-last loader) is the full-data L_n(w*).

Estimates: slt's λ̂ ± ``llc_sem`` (control variate L_B(w*) on each chain's own minibatch; s.e. the larger of
chain spread and batch means); devinterp's post-burn-in mean (= its own mean here, burn-in 0) ± std/√C over
chains (no control variate: it subtracts its init loss); the hand loop's mean ± std/√C over chains.  With no
burn-in and few hundred draws the chains are still moving away from w*, so the λ̂ are agreement checks of
three samplers of the same chain, not calibrated LLCs.

Timing: wall time of each whole call (set-up included: slt's w* losses and path probe; devinterp's own
``seconds``, i.e. its ``llc`` call with the init-loss pass and its per-chain fixed costs; the hand loop's
per-sample losses at w*), divided by chains × steps (× checkpoints): ms per chain-step.  slt's loop-only
time (``diagnostics["seconds"]``) is shown too.  Each method is warmed up once on the job first (8 chains,
3 draws).  ``--repeats R`` times every method R times, alternating forward and reverse order, and keeps the
fastest (the machine's speed drifts by up to ±30% between consecutive runs when it is shared).

Memory: each method runs again in a fresh subprocess (``python bench_generic.py --_child ...``) with 1 and
with 8 chains (3 draws; memory does not grow with draws).  With model, data and libraries loaded, the child
reads its resident set (``VmRSS``), resets the kernel's peak mark (``echo 5 > /proc/self/clear_refs``),
runs the call and reads the peak (``VmHWM``): growth = peak − RSS before, i.e. everything the call held at
its worst moment (parameter copies, activations, autograd buffers, noise, traces).  (``ru_maxrss`` is not
usable here: Linux carries the parent's peak into a forked child.)  The child runs with
``MALLOC_MMAP_THRESHOLD_=65536`` (so slt leaves the allocator alone there, see
``config["allocator"]``): every tensor above 64 kB is its own mmap and leaves the resident set
when freed (glibc's adaptive threshold would keep freed tensors below 32 MB resident in the heap, so
the peak would count tensors that were never alive together).  "MB/chain" is the marginal cost
(growth(8) − growth(1)) / 7, which cancels one-time costs (lazy imports, set-up); "MB@8" is the total
growth with 8 chains.  For ``curve`` slt runs all 16 checkpoints (MB/chain is per chain-row, i.e. divided
by 16 too); devinterp and the hand loop one checkpoint.  "copies" is MB/chain over 4·d bytes: the number
of parameter-sized float32 tensors each extra chain costs (activations included).

Floor: the matrix-multiply, convolution and attention FLOPs of one chain-step (forward and backward to the
parameters on one minibatch, ``torch.utils.flop_counter``) at the machine's float32 rate on the same
threads (a 512² matmul): no implementation of the same chain-steps can run faster, so devinterp ÷ floor
bounds the ratio any library could reach against devinterp on this machine.

Targets (issue #14, item 5), checked and printed at the end:

* slt (``auto``) ≤ 1.0× the hand loop per chain-step, on every job;
* slt ≥ 20× faster than devinterp on the checkpoint curve;
* slt ≥ 3× faster than devinterp on single models below 1M parameters (mlp, cnn, gpt2).

Usage::

    python benchmarks/bench_generic.py                          # all jobs (17-21 min on a loaded 2-core CPU)
    python benchmarks/bench_generic.py --jobs mlp cnn --out generic.json
    python benchmarks/bench_generic.py --quick                  # smoke run: tiny draws (~2-3 min)
    python benchmarks/bench_generic.py --jobs mlp --profile     # cProfile of slt vs the hand loop
    python benchmarks/bench_generic.py --device cuda --no-devinterp --out generic_cuda.json   # on a GPU

``--device cuda``: the jobs are built (trained) on the CPU and moved to the GPU; slt, the hand loop (its
random numbers from a CUDA generator) and devinterp run there; the floor is the GPU's float32 matmul rate
(a 4096² product, TF32 as torch's default leaves it); memory is measured in-process from CUDA's allocator
(peak ``max_memory_allocated`` growth over the allocation before the call, with 1 and with 8 chains:
the same MB/chain and copies as on the CPU, counting tensors on the GPU only).  ``benchmarks/gpu_suite.sh``
runs this with the step-cost benchmark as one prepared script.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

# ---------------------------------------------------------------------------------------------------
# models (top level, so a child process can unpickle them)
# ---------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, widths: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """8×8×1 → conv 8 → BN → ReLU → conv 16 (stride 2) → BN → ReLU → avg-pool 2×2 → linear 10
    (1946 params)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class EvalLocked(nn.Module):
    """Wraps a network and keeps it in eval mode whatever ``train()`` is called with (devinterp calls
    ``model.train()`` on its copy; this gives it the same eval-mode job as slt and the hand loop)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.train(False)

    def train(self, mode: bool = True) -> "EvalLocked":
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LogitsOnly(nn.Module):
    """A Hugging Face causal LM returning plain logits (B, T, V) (slt needs a tensor, not a ModelOutput)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over all tokens: logits (B, T, V), target (B, T) = input shifted by one."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def lm_per_sample(logits: Tensor, target: Tensor) -> Tensor:
    """(B, T, V), (B, T) -> (B,) per-sequence mean token loss (mean over B = :func:`lm_loss`)."""
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="none").view(B, T).mean(1)


def ce_per_sample(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


# ---------------------------------------------------------------------------------------------------
# the floor: a hand-written multi-chain SGLD loop
# ---------------------------------------------------------------------------------------------------


def hand_loop_llc(model: nn.Module, X: Tensor, Y: Tensor, loss_fn: Callable, per_sample: Callable | None, *,
                  nbeta: float, step_size: float, localization: float, num_chains: int, num_draws: int,
                  batch_size: int, seed: int = 0) -> dict[str, Any]:
    """SGLD around w* as a competent user writes it: chains one after another, one forward/backward per
    chain-step, in-place updates.  ``per_sample(out, y) -> (n,)`` gives the control variate L_B(w*) as a
    gather from losses precomputed once at w*; ``None`` (e.g. BatchNorm in training mode, where a
    sample's loss depends on its batch) evaluates it by a forward pass at w* on the same batch."""
    _sync()
    t0 = time.perf_counter()
    dev = X.device
    g = torch.Generator(device=dev).manual_seed(seed)
    names = [n for n, _ in model.named_parameters()]
    w_star = [p.detach() for _, p in model.named_parameters()]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # train-mode BN writes these
    n = X.shape[0]
    with torch.no_grad():
        ell_star = per_sample(model(X), Y) if per_sample is not None else None  # (n,)
    chains = [[p.clone().requires_grad_(True) for p in w_star] for _ in range(num_chains)]
    trace = torch.empty(num_chains, num_draws, device=dev)
    a, b, s = -0.5 * step_size * nbeta, -0.5 * step_size * localization, math.sqrt(step_size)
    for t in range(num_draws):
        for c, w in enumerate(chains):
            idx = torch.randint(n, (batch_size,), generator=g, device=dev)
            x, y = X.index_select(0, idx), Y.index_select(0, idx)  # ~4× faster than X[idx] on CPU
            loss = loss_fn(functional_call(model, (dict(zip(names, w)), buffers), (x,)), y)
            grads = torch.autograd.grad(loss, w)
            with torch.no_grad():
                if ell_star is not None:
                    star = ell_star.index_select(0, idx).mean()
                else:
                    star = loss_fn(functional_call(model, (dict(zip(names, w_star)), buffers), (x,)), y)
                trace[c, t] = loss.detach() - star
                for p, p0, gr in zip(w, w_star, grads):  # w ← w − ε/2 (nβ ∇L + γ (w − w*)) + √ε ξ
                    p.add_(p - p0, alpha=b).add_(gr, alpha=a).add_(torch.randn(p.shape, generator=g, device=dev), alpha=s)
    _sync()
    seconds = time.perf_counter() - t0
    per_chain = nbeta * trace.double().mean(1).cpu()
    return {"llc_mean": float(per_chain.mean()), "llc_se": float(per_chain.std() / math.sqrt(num_chains)),
            "llc_per_chain": per_chain.numpy(), "seconds": seconds}


# ---------------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    model: nn.Module  # at w*
    X: Tensor
    Y: Tensor
    loss_fn: Callable
    per_sample: Callable | None  # for the hand loop's control variate; None: forward pass at w*
    batch_size: int
    draws: int
    paths: tuple[str, ...] = ("auto", "vmap", "loop", "compile")
    state_dicts: list[dict[str, Tensor]] | None = None  # curve job: the checkpoints
    notes: list[str] = field(default_factory=list)
    train_loss: float = float("nan")

    @property
    def d(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


NBETA, GAMMA, EPS, CHAINS = 46.0, 100.0, 1e-4, 8
#: where every method runs (``--device``); jobs are built on the CPU and moved here
DEVICE = torch.device("cpu")


def _sync() -> None:
    """Wait for the device's queued work (CUDA launches return before the kernels finish)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def to_device(job: "Job", device: torch.device) -> "Job":
    """The job with its model, data and checkpoints on ``device`` (in place for the model)."""
    job.model.to(device)
    job.X, job.Y = job.X.to(device), job.Y.to(device)
    if job.state_dicts is not None:
        job.state_dicts = [{k: v.to(device) for k, v in sd.items()} for sd in job.state_dicts]
    return job


def _fit(model: nn.Module, X: Tensor, Y: Tensor, loss_fn: Callable, steps: int, lr: float,
         batch: int | None = None, seed: int = 0, weight_decay: float = 0.0,
         every: int | None = None) -> tuple[float, list[dict[str, Tensor]]]:
    """Adam (cosine-decayed lr) to near a minimum; returns the final full-data loss and, with
    ``every``, state dicts saved along the way (for the curve job)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    saved = []
    model.train()
    for step in range(steps):
        idx = torch.randint(X.shape[0], (batch,), generator=g) if batch else slice(None)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X[idx]), Y[idx]).backward()
        opt.step()
        sched.step()
        if every and step in every:
            saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.eval()
    with torch.no_grad():
        return float(loss_fn(model(X), Y)), saved


def _teacher_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """x ~ N(0, I_64); y ~ softmax(3 · teacher(x)) of a random 64-32-10 tanh teacher."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 64, generator=g)
    W1, W2 = torch.randn(64, 32, generator=g) / 8, torch.randn(32, 10, generator=g) / 32**0.5
    logits = 9.0 * torch.tanh(X @ W1) @ W2
    Y = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    return X, Y


def job_mlp(draws: int) -> Job:
    X, Y = _teacher_data(1792, 0)
    torch.manual_seed(1)
    m = MLP([64, 128, 128, 10])
    loss, _ = _fit(m, X, Y, F.cross_entropy, 600, 3e-3)
    return Job("mlp", m, X, Y, F.cross_entropy, ce_per_sample, 256, draws, train_loss=loss)


def job_mlp1m(draws: int) -> Job:
    X, Y = _teacher_data(1792, 0)
    torch.manual_seed(2)
    m = MLP([64, 700, 700, 700, 10])
    loss, _ = _fit(m, X, Y, F.cross_entropy, 200, 1e-3, batch=256)
    return Job("mlp1m", m, X, Y, F.cross_entropy, ce_per_sample, 256, max(2, draws // 4), train_loss=loss)


def _image_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """10 random smooth 8×8 templates; x = template[y] + N(0, 0.5²)."""
    g = torch.Generator().manual_seed(seed)
    templates = F.avg_pool2d(torch.randn(10, 1, 10, 10, generator=g), 3, stride=1)  # (10, 1, 8, 8)
    templates = templates / templates.std((1, 2, 3), keepdim=True)
    Y = torch.randint(10, (n,), generator=g)
    X = templates[Y] + 0.5 * torch.randn(n, 1, 8, 8, generator=g)
    return X, Y


def job_cnn(draws: int) -> Job:
    X, Y = _image_data(1792, 0)
    torch.manual_seed(3)
    net = SmallCNN()
    loss, _ = _fit(net, X, Y, F.cross_entropy, 400, 1e-2, batch=256)
    return Job("cnn", EvalLocked(net.eval()), X, Y, F.cross_entropy, ce_per_sample, 256, draws, train_loss=loss,
               notes=["eval mode (EvalLocked wrapper, also for devinterp)"])


def job_cnn_train(draws: int, base: Job) -> Job:
    net = base.model.net
    import copy
    m = copy.deepcopy(net).train()
    return Job("cnn-train", m, base.X, base.Y, F.cross_entropy, None, 256, draws, paths=("auto",),
               train_loss=base.train_loss,
               notes=["BatchNorm in training mode: batch statistics; hand loop: L_B(w*) by a forward pass"])


def _markov_tokens(n: int, T: int, vocab: int, seed: int) -> Tensor:
    """Sequences of a sparse random Markov chain: each token has 4 successors with random probabilities."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.stack([torch.randperm(vocab, generator=g)[:4] for _ in range(vocab)])  # (V, 4)
    probs = torch.rand(vocab, 4, generator=g).add(0.2)
    probs = probs / probs.sum(1, keepdim=True)
    seq = torch.empty(n, T, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(1, T):
        k = torch.multinomial(probs[seq[:, t - 1]], 1, generator=g).squeeze(1)
        seq[:, t] = succ[seq[:, t - 1], k]
    return seq


def job_gpt2(draws: int, attn: str = "sdpa") -> Job:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ctx, vocab = 16, 64
    cfg = GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(4)
    lm = GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
    seq = _markov_tokens(1024, ctx + 1, vocab, 0)
    X, Y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    m = LogitsOnly(lm)
    loss, _ = _fit(m, X, Y, lm_loss, 300, 3e-3, batch=128)
    return Job("gpt2", m.eval(), X, Y, lm_loss, lm_per_sample, 64, max(2, draws // 4), train_loss=loss,
               notes=[f"attn_implementation={attn!r}; LogitsOnly wrapper + next-token CE (lm_loss); "
                      "devinterp via the peer helper's generic path with the same wrapper; batch 64 sequences"])


def job_curve(draws: int, checkpoints: int = 16) -> Job:
    p = 32
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    X = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], 1).float()  # (1024, 64)
    Y = (a + b) % p
    torch.manual_seed(5)
    m = MLP([2 * p, 134, p])
    steps = 1500
    at = sorted({int(round(x)) for x in np.geomspace(10, steps - 1, checkpoints)})
    if len(at) < checkpoints:  # rounding collided (many checkpoints): evenly spaced instead
        at = sorted({int(round(x)) for x in np.linspace(10, steps - 1, checkpoints)})
    loss, saved = _fit(m, X, Y, F.cross_entropy, steps, 1e-2, weight_decay=1e-2, every=set(at))
    job = Job("curve", m.eval(), X, Y, F.cross_entropy, ce_per_sample, 256, max(2, (draws * 3) // 8),
              paths=("auto", "compile"), state_dicts=saved, train_loss=loss,
              notes=[f"{len(saved)} checkpoints at Adam steps {at}"])
    return job


# ---------------------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------------------


def _kw(job: Job, chains: int, draws: int) -> dict[str, Any]:
    return dict(nbeta=NBETA, step_size=EPS, localization=GAMMA, num_chains=chains, num_draws=draws,
                batch_size=job.batch_size)


def run_slt(job: Job, path: str, chains: int, draws: int, mala_every: int = 10) -> dict[str, Any]:
    import slt

    kw = _kw(job, chains, draws)
    extra = {} if job.state_dicts is None else {"state_dicts": job.state_dicts}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.perf_counter()
        res = slt.estimate_llc(job.model, (job.X, job.Y), job.loss_fn, num_burnin=0, seed=0, vectorize=path, extend_draws=False,
                               mala_every=mala_every, progress=False, device=DEVICE, **kw, **extra)
        sec = time.perf_counter() - t
    results = res if isinstance(res, list) else [res]
    msgs = []
    for w in caught:
        m = str(w.message).splitlines()[0]
        if "performance drop" in m:
            m = "PyTorch: no vmap batching rule for " + (m.split("batching rule for ")[-1].split(".")[0])
        if m not in msgs:
            msgs.append(m)
    r0 = results[0]
    return {
        "seconds": sec, "loop_seconds": r0.diagnostics["seconds"], "path": r0.diagnostics["path"],
        "llc": [r.llc_mean for r in results], "se": [r.llc_sem for r in results],
        "mala": [r.diagnostics.get("mala_acceptance") for r in results],
        "rhat": [r.diagnostics.get("rhat") for r in results],
        "warnings": msgs, "path_reason": r0.diagnostics.get("path_reason", ""),
        "compile_seconds": _compile_seconds(r0.diagnostics.get("path_reason", "")),
    }


def _compile_seconds(reason: str) -> float | None:
    """Seconds of this run's compiling call named in a path reason (``"... compiled in 2.43 s"``; the
    last one: a decision taken earlier in the process is quoted before this call's time), if any."""
    m = re.findall(r"compiled in ([0-9.eE+-]+) s", reason)
    return float(m[-1]) if m else None


def run_devinterp(job: Job, model: nn.Module, chains: int, draws: int) -> dict[str, Any]:
    from slt.peers import devinterp_llc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        di = devinterp_llc(model, job.X, job.Y, job.loss_fn, num_burnin=0, seed=0, device=str(DEVICE),
                           **_kw(job, chains, draws))
    per_chain = np.asarray(di["llc_per_chain_post_burnin"], dtype=np.float64)
    msgs = list(dict.fromkeys(str(w.message).splitlines()[0][:160] for w in caught
                              if "performance drop" not in str(w.message)))
    return {"seconds": di["seconds"], "llc": float(per_chain.mean()),
            "se": float(per_chain.std(ddof=1) / math.sqrt(chains)) if chains > 1 else float("nan"),
            "devinterp_llc_mean": di["llc_mean"], "warnings": msgs}


def run_hand(job: Job, model: nn.Module, chains: int, draws: int) -> dict[str, Any]:
    return hand_loop_llc(model, job.X, job.Y, job.loss_fn, job.per_sample, seed=0, **_kw(job, chains, draws))


def _ckpt_model(job: Job, k: int) -> nn.Module:
    import copy

    m = copy.deepcopy(job.model)
    m.load_state_dict(job.state_dicts[k])
    return m.eval()


# ---------------------------------------------------------------------------------------------------
# memory: a fresh child process per (method, chains)
# ---------------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``: resident now; ``VmHWM``: peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _child(path: str) -> None:
    sys.modules.setdefault("bench_generic", sys.modules["__main__"])
    spec = torch.load(path, weights_only=False)
    torch.set_num_threads(spec["threads"])
    warnings.simplefilter("ignore")
    job: Job = spec["job"]
    method, chains, draws = spec["method"], spec["chains"], spec["draws"]
    import slt  # noqa: F401  (libraries loaded before the baseline)
    if method == "devinterp":
        import devinterp.slt.llc  # noqa: F401
        import slt.peers  # noqa: F401
    single = _single(job)  # made before the baseline (not counted)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (VmHWM) to the current RSS
        f.write("5")
    _run_method(job, method, chains, draws, single)
    peak = _status_kb("VmHWM")
    print(json.dumps({"growth_kb": peak - before, "before_kb": before, "peak_kb": peak}))


def _single(job: Job) -> nn.Module:
    """The one model devinterp and the hand loop run (the curve's last checkpoint)."""
    return job.model if job.state_dicts is None else _ckpt_model(job, len(job.state_dicts) - 1)


def _run_method(job: Job, method: str, chains: int, draws: int, single: nn.Module) -> None:
    if method.startswith("slt-"):
        run_slt(job, method[4:], chains, draws)
    elif method == "devinterp":
        run_devinterp(job, single, chains, draws)
    else:
        run_hand(job, single, chains, draws)


def _per_chain(job: Job, method: str, out: dict[int, float]) -> dict[str, float]:
    k = len(job.state_dicts) if (job.state_dicts is not None and method.startswith("slt-")) else 1
    per_chain = (out[CHAINS] - out[1]) / ((CHAINS - 1) * k)
    d = sum(p.numel() for p in job.model.parameters() if p.requires_grad)
    # parameter-sized copies per chain: the marginal MB over one float32 copy of the d parameters
    return {"mb_at_1": out[1], "mb_at_8": out[CHAINS], "mb_per_chain": per_chain,
            "copies_per_chain": per_chain * 2**20 / (4 * d)}


def measure_memory_cuda(job: Job, method: str, draws: int = 3) -> dict[str, float]:
    """Peak growth (MB) of CUDA's allocated memory during ``method`` with 1 and 8 chains, in this process
    (the allocator's peak counts exactly the tensors alive together on the GPU)."""
    out: dict[int, float] = {}
    single = _single(job)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for chains in (1, CHAINS):
            _sync()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(DEVICE)
            torch.cuda.reset_peak_memory_stats(DEVICE)
            _run_method(job, method, chains, draws, single)
            _sync()
            out[chains] = (torch.cuda.max_memory_allocated(DEVICE) - before) / 2**20
    return _per_chain(job, method, out)


def measure_memory(job: Job, method: str, threads: int, draws: int = 3) -> dict[str, float]:
    """Peak-RSS growth (MB) of ``method`` with 1 and 8 chains, each in a fresh process (on a GPU:
    :func:`measure_memory_cuda`)."""
    if DEVICE.type == "cuda":
        return measure_memory_cuda(job, method, draws)
    out: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_generic_") as tmp:
        for chains in (1, CHAINS):
            f = os.path.join(tmp, f"{method}_{chains}.pt")
            torch.save({"job": job, "method": method, "chains": chains, "draws": draws, "threads": threads}, f)
            # every allocation above 64 kB its own mmap: freed tensors leave the resident set at once, so
            # the peak counts what was alive together (glibc's adaptive threshold otherwise keeps freed
            # tensors below 32 MB in the heap, resident, and 1-chain runs look larger than they are)
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", f],
                                  capture_output=True, text=True, timeout=1800, env=env)
            if proc.returncode != 0:
                tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:]
                raise RuntimeError(f"memory child {method}/{chains} failed (exit {proc.returncode}): {tail}")
            out[chains] = json.loads(proc.stdout.strip().splitlines()[-1])["growth_kb"] / 1024
    return _per_chain(job, method, out)


# ---------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _z(a: float, sa: float, b: float, sb: float) -> float:
    return abs(a - b) / math.sqrt(sa * sa + sb * sb + 1e-300)


def chain_step_flops(job: Job) -> float:
    """Matrix-multiply, convolution and attention FLOPs of one chain-step (forward and the backward to
    the parameters on one minibatch of ``job.batch_size``), counted by ``torch.utils.flop_counter``;
    elementwise work (activations, the loss, the SGLD update) is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    params = {n: p.detach().clone().requires_grad_(True) for n, p in job.model.named_parameters()}
    buffers = dict(job.model.named_buffers())
    x, y = job.X[:job.batch_size], job.Y[:job.batch_size]
    with FlopCounterMode(display=False) as fc:
        loss = job.loss_fn(functional_call(job.model, (params, buffers), (x,)), y)
        torch.autograd.grad(loss, list(params.values()))
    return float(fc.get_total_flops())


def gemm_flops_per_second(size: int | None = None, repeats: int = 20) -> float:
    """The float32 matrix-multiply rate of this machine on the current threads, or of the GPU (a
    ``size``² product — 512 on a CPU, 4096 on a GPU — fastest of ``repeats``): what a chain-step's
    FLOPs cost at best."""
    size = size or (4096 if DEVICE.type == "cuda" else 512)
    a, b = torch.randn(size, size, device=DEVICE), torch.randn(size, size, device=DEVICE)
    a @ b
    _sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync()
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


def run_job(job: Job, args: argparse.Namespace) -> list[dict[str, Any]]:
    C, T = CHAINS, job.draws
    K = 1 if job.state_dicts is None else len(job.state_dicts)
    work = C * T * K
    print(f"\n== {job.name}: d = {job.d:,} params, n = {job.X.shape[0]}, L_n(w*) = {job.train_loss:.4f} after "
          f"training; {C} chains × {T} draws{f' × {K} checkpoints' if K > 1 else ''}, batch {job.batch_size}, "
          f"nβ = {NBETA:g}, γ = {GAMMA:g}, ε = {EPS:g}, no burn-in, {torch.get_num_threads()} thread(s), {DEVICE}, "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    for note in job.notes:
        print(f"   note: {note}")

    singles = [job.model] if job.state_dicts is None else [_ckpt_model(job, k) for k in range(K)]
    # warm-up (allocator, lazy imports, kernels): every method once, tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm = Job(job.name, job.model, job.X, job.Y, job.loss_fn, job.per_sample, job.batch_size, 2,
                   state_dicts=None if job.state_dicts is None else job.state_dicts[:2], paths=job.paths)
        compile_note = None
        for p in job.paths:
            w = run_slt(warm, p, C, 3)
            if p == "compile":
                compile_note = w["path_reason"].split("; ")[-1]
        run_hand(warm, singles[0], C, 3)
        if not args.no_devinterp:
            run_devinterp(warm, singles[0], 1, 2)

    rows: list[dict[str, Any]] = []

    def add(method: str, path: str, sec: float, llc: float, se: float, loop_sec: float | None = None,
            extra: dict | None = None) -> dict[str, Any]:
        r = {"job": job.name, "method": method, "path": path, "params": job.d, "chains": C, "draws": T,
             "checkpoints": K, "batch_size": job.batch_size, "threads": torch.get_num_threads(),
             "seconds": sec, "ms_per_chain_step": 1e3 * sec / work,
             "loop_ms_per_chain_step": None if loop_sec is None else 1e3 * loop_sec / work,
             "llc": llc, "llc_se": se, **(extra or {})}
        rows.append(r)
        return r

    # the methods: (c) the hand loop, (a) slt on each path, (b) devinterp; checkpoints one after another
    # except slt.  With --repeats R they run R rounds, alternating forward and reverse order (so a drift
    # of the machine's speed hits all alike); the fastest round is kept, λ̂ comes from the first round.
    def hand_all() -> dict[str, Any]:
        t = time.perf_counter()
        hs = [run_hand(job, m, C, T) for m in singles]
        return {"seconds": time.perf_counter() - t, "llc": hs[-1]["llc_mean"], "se": hs[-1]["llc_se"],
                "curve": [h["llc_mean"] for h in hs]}

    def devinterp_all() -> dict[str, Any]:
        ds = [run_devinterp(job, m, C, T) for m in singles]
        return {"seconds": sum(d["seconds"] for d in ds), "llc": ds[-1]["llc"], "se": ds[-1]["se"],
                "devinterp_llc_mean": ds[-1]["devinterp_llc_mean"], "warnings": ds[-1]["warnings"],
                "curve": [d["llc"] for d in ds], "se_curve": [d["se"] for d in ds]}

    variants = [(p, 10) for p in job.paths]
    if job.state_dicts is None and "vmap" in job.paths and not args.no_mala_row:
        variants.append(("vmap", 0))

    def hand_heap() -> dict[str, Any]:  # the hand loop with slt's allocator setting (what a user could add)
        from slt._runtime import retained_heap

        with retained_heap(DEVICE):
            return hand_all()

    runners: list[tuple[str, Callable[[], dict[str, Any]]]] = [("hand loop", hand_all)]
    if args.hand_heap:
        runners.append(("hand loop, heap kept", hand_heap))
    for p, me in variants:
        runners.append((f"slt {p}" + (" mala_every=0" if me == 0 else ""),
                        lambda p=p, me=me: run_slt(job, p, C, T, mala_every=me)))
    if not args.no_devinterp:
        runners.append(("devinterp", devinterp_all))
    got: dict[str, dict[str, Any]] = {}
    for rnd in range(args.repeats):
        for label, fn in (runners if rnd % 2 == 0 else runners[::-1]):
            res = fn()
            if res.get("compile_seconds"):  # the run without its compiling call (a long run's steady rate)
                res["steady_seconds"] = res["seconds"] - res["compile_seconds"]
            if label not in got:
                got[label] = res
            else:
                got[label]["seconds"] = min(got[label]["seconds"], res["seconds"])
                if "steady_seconds" in res:
                    got[label]["steady_seconds"] = min(got[label].get("steady_seconds", math.inf),
                                                       res["steady_seconds"])
                if "loop_seconds" in res:
                    got[label]["loop_seconds"] = min(got[label]["loop_seconds"], res["loop_seconds"])
    for label in ("hand loop", "hand loop, heap kept"):
        if label in got:
            h = got[label]
            add(label, "loop", h["seconds"], h["llc"], h["se"], extra={"llc_curve": h["curve"]} if K > 1 else None)
    slt_rows = {}
    for label in (lb for lb, _ in runners if lb.startswith("slt ")):
        s = got[label]
        r = add(label, s["path"], s["seconds"], s["llc"][-1], s["se"][-1], s["loop_seconds"],
                extra={"mala": s["mala"][-1], "rhat": s["rhat"][-1], "warnings": s["warnings"],
                       **({"llc_curve": s["llc"], "se_curve": s["se"]} if K > 1 else {})})
        if s.get("steady_seconds") is not None:
            r["steady_ms_per_chain_step"] = 1e3 * s["steady_seconds"] / work
        slt_rows[label] = (r, s)
    di = None
    if "devinterp" in got:
        d = got["devinterp"]
        di = add("devinterp", "loop", d["seconds"], d["llc"], d["se"],
                 extra={"devinterp_llc_mean": d["devinterp_llc_mean"], "warnings": d["warnings"],
                        **({"llc_curve": d["curve"], "se_curve": d["se_curve"]} if K > 1 else {})})

    # memory
    mem: dict[str, dict[str, float]] = {}
    if not args.no_memory:
        methods = ([f"slt-{p}" for p in job.paths if p != "compile"] + ["hand"]
                   + ([] if args.no_devinterp else ["devinterp"]))
        for mth in methods:
            try:
                mem[mth] = measure_memory(job, mth, torch.get_num_threads())
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                print(f"   memory {mth}: failed ({str(e).splitlines()[0][:200]})")
        for r in rows:
            key = "hand" if r["method"] == "hand loop" else (
                "devinterp" if r["method"] == "devinterp" else
                ("slt-" + r["method"].split()[1] if "mala_every" not in r["method"] else None))
            if key in mem:
                r.update(mem[key])

    hand_ms = rows[0]["ms_per_chain_step"]
    auto_ms = slt_rows["slt auto"][0]["ms_per_chain_step"]
    print(f"   {'method':<22s} {'path':<5s} {'ms/chain-step':>13s} {'(loop only)':>11s} {'× hand':>7s} "
          f"{'λ̂ ± s.e.':>17s} {'MALA':>5s} {'MB/chain':>9s} {'copies':>6s} {'MB@8':>7s}")
    for r in rows:
        ratio = r["ms_per_chain_step"] / hand_ms
        print(f"   {r['method']:<22s} {r['path']:<5s} {r['ms_per_chain_step']:13.3f} "
              f"{_fmt(r['loop_ms_per_chain_step'], '.3f'):>11s} {ratio:7.2f} "
              f"{_fmt(r['llc']):>8s} ± {_fmt(r['llc_se']):<6s} {_fmt(r.get('mala')):>5s} "
              f"{_fmt(r.get('mb_per_chain'), '.2f'):>9s} {_fmt(r.get('copies_per_chain'), '.1f'):>6s} "
              f"{_fmt(r.get('mb_at_8'), '.1f'):>7s}")
        r["ratio_to_hand"] = ratio
    if compile_note is not None:  # the timed run repeats this decision (kept for the process) and re-traces
        print(f"   slt compile: decided in the warm-up run (8 chains, 3 draws{', 2 checkpoints' if K > 1 else ''}): "
              f"{compile_note}; the timed run "
              + ("(other shapes) decides and compiles anew" if K > 1 else
                 "keeps that decision and compiles its own step") + " in its set-up")
    for r in rows:
        for w in r.get("warnings", []) or []:
            print(f"   warning ({r['method']}): {w[:200]}")
    summary = {"job": job.name, "method": "summary", "params": job.d, "slt_over_hand": auto_ms / hand_ms}
    flops, rate = chain_step_flops(job), gemm_flops_per_second()
    floor_ms = 1e3 * flops / rate
    summary.update({"flops_per_chain_step": flops, "gemm_flops_per_second": rate, "floor_ms": floor_ms})
    where = "the GPU's" if DEVICE.type == "cuda" else "this thread's"
    print(f"   floor: {flops / 1e6:.1f} MFLOP of matmul/conv/attention per chain-step at {where} "
          f"{rate / 1e9:.0f} GFLOP/s (a float32 matmul) = {floor_ms:.3f} ms; slt auto = {auto_ms / floor_ms:.1f}× the "
          f"floor, hand loop {hand_ms / floor_ms:.1f}×")
    print(f"   slt auto / hand loop = {auto_ms / hand_ms:.2f}× per chain-step (target ≤ 1.0: "
          f"{'met' if auto_ms / hand_ms <= 1.0 else 'NOT met'})")
    if args.hand_heap:
        heap_ms = next(r["ms_per_chain_step"] for r in rows if r["method"] == "hand loop, heap kept")
        summary["slt_over_hand_heap"] = auto_ms / heap_ms
        print(f"   slt auto / hand loop with the heap kept as slt keeps it = {auto_ms / heap_ms:.2f}×")
    if di is not None:
        speed = di["ms_per_chain_step"] / auto_ms
        summary["devinterp_over_slt"] = speed
        target = 20.0 if K > 1 else (3.0 if job.d < 1_000_000 else None)
        summary["target_devinterp_over_slt"] = target
        summary["devinterp_over_floor"] = di["ms_per_chain_step"] / floor_ms
        print(f"   devinterp / floor = {di['ms_per_chain_step'] / floor_ms:.1f}×: the most any implementation of "
              "these FLOPs could gain over devinterp on this thread")
        for label, (r, _) in slt_rows.items():
            if r.get("steady_ms_per_chain_step"):
                st = r["steady_ms_per_chain_step"]
                summary[f"devinterp_over_{label.replace(' ', '_')}_steady"] = di["ms_per_chain_step"] / st
                print(f"   {label} without its compiling call (a long run's rate): {st:.3f} ms per chain-step; "
                      f"devinterp / that = {di['ms_per_chain_step'] / st:.2f}×")
        tgt = "no target (≥ 1M params)" if target is None else \
            f"target ≥ {target:g}: {'met' if speed >= target else 'NOT met'}"
        sa = slt_rows["slt auto"][0]
        if K == 1:
            z = _z(sa["llc"], sa["llc_se"], di["llc"], di["llc_se"])
            summary["z_slt_devinterp"] = z
            print(f"   devinterp / slt auto = {speed:.2f}× ({tgt}); λ̂ slt {sa['llc']:.2f} ± {sa['llc_se']:.2f} vs "
                  f"devinterp {di['llc']:.2f} ± {di['llc_se']:.2f} (z = {z:.2f}); hand loop {rows[0]['llc']:.2f}"
                  f" ± {rows[0]['llc_se']:.2f}")
        else:
            zs = [_z(a, b, c, d) for a, b, c, d in zip(sa["llc_curve"], sa["se_curve"], di["llc_curve"],
                                                         di["se_curve"])]
            summary.update({"z_mean": float(np.mean(zs)), "z_max": float(np.max(zs)),
                            "frac_within_3se": float(np.mean([z < 3 for z in zs]))})
            print(f"   devinterp / slt auto = {speed:.2f}× ({tgt}); whole curve: slt {sa['seconds']:.1f} s in one "
                  f"call, devinterp {di['seconds']:.1f} s, hand loop {rows[0]['seconds']:.1f} s in {K} calls")
            print("   λ̂ per checkpoint (slt | devinterp | hand):")
            for k in range(K):
                print(f"     {k:2d}: {sa['llc_curve'][k]:8.2f} ± {sa['se_curve'][k]:5.2f} | "
                      f"{di['llc_curve'][k]:8.2f} ± {di['se_curve'][k]:5.2f} | {rows[0]['llc_curve'][k]:8.2f}")
            print(f"   z(slt, devinterp): mean {summary['z_mean']:.2f}, max {summary['z_max']:.2f}, "
                  f"within 3 s.e. {summary['frac_within_3se']:.0%}")
    rows.append(summary)
    return rows


def profile_job(job: Job, top: int = 25) -> None:
    """cProfile of slt (each path) and of the hand loop on the same job; prints the top functions by tottime."""
    model = _single(job)
    cases = [(f"slt {p}", lambda p=p: run_slt(job, p, CHAINS, job.draws)) for p in job.paths]
    cases.append(("hand loop", lambda: run_hand(job, model, CHAINS, job.draws)))
    for name, fn in cases:
        fn()  # warm
        pr = cProfile.Profile()
        t = time.perf_counter()
        pr.enable()
        fn()
        pr.disable()
        sec = time.perf_counter() - t
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
        K = 1 if job.state_dicts is None or name == "hand loop" else len(job.state_dicts)
        print(f"\n---- profile: {name} on {job.name} ({sec:.2f} s, {1e3 * sec / (CHAINS * job.draws * K):.3f} "
              f"ms/chain-step under the profiler) ----")
        print(s.getvalue())


JOB_NAMES = ["mlp", "cnn", "gpt2", "mlp1m", "curve"]


def build_jobs(names: list[str], draws: int, args: argparse.Namespace) -> list[Job]:
    jobs = []
    for nm in names:
        t = time.perf_counter()
        if nm == "mlp":
            jobs.append(job_mlp(draws))
        elif nm == "cnn":
            base = job_cnn(draws)
            jobs.append(base)
            if not args.no_train_row:
                jobs.append(job_cnn_train(draws, base))
        elif nm == "gpt2":
            jobs.append(job_gpt2(draws, args.gpt2_attn))
        elif nm == "mlp1m":
            jobs.append(job_mlp1m(draws))
        elif nm == "curve":
            jobs.append(job_curve(draws, args.checkpoints))
        print(f"built {nm} in {time.perf_counter() - t:.1f} s (training included)", flush=True)
    return jobs


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", nargs="+", default=JOB_NAMES, choices=JOB_NAMES)
    ap.add_argument("--draws", type=int, default=400,
                    help="draws for mlp and cnn; gpt2 and mlp1m use a quarter, curve 3/8 (default 400)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 16 draws, 4 curve checkpoints, memory for the first job only (~2 min)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for all methods (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every method runs")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timing rounds per method, alternating order; the fastest is kept (default 1)")
    ap.add_argument("--checkpoints", type=int, default=16, help="checkpoints in the curve job")
    ap.add_argument("--gpt2-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--no-memory", action="store_true", help="skip the child-process memory measurements")
    ap.add_argument("--no-devinterp", action="store_true")
    ap.add_argument("--no-mala-row", action="store_true", help="skip the slt vmap mala_every=0 row")
    ap.add_argument("--no-train-row", action="store_true", help="skip the cnn-train (BatchNorm train mode) row")
    ap.add_argument("--hand-heap", action="store_true",
                    help="add a row: the hand loop inside slt's allocator setting (slt._runtime.retained_heap)")
    ap.add_argument("--profile", action="store_true", help="cProfile slt vs the hand loop on the jobs, then exit")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        _child(args._child)
        return []
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    torch.set_num_threads(args.threads)
    draws = 16 if args.quick else args.draws
    if args.quick:  # a smoke run: 4 checkpoints, memory children for the first job only
        args.checkpoints = min(args.checkpoints, 4)
    import slt

    print(f"slt {slt.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} cpus, python {sys.version.split()[0]}, load avg {os.getloadavg()[0]:.2f}, device "
          f"{torch.cuda.get_device_name(DEVICE) if DEVICE.type == 'cuda' else 'cpu'}", flush=True)
    t_all = time.perf_counter()
    jobs = [to_device(job, DEVICE) for job in build_jobs(args.jobs, draws, args)]
    if args.profile:
        for job in jobs:
            profile_job(job)
        return []
    rows: list[dict[str, Any]] = []
    for i, job in enumerate(jobs):
        if args.quick and i == 1 and not args.no_memory:
            print("\n(--quick: memory measured for the first job only)")
            args.no_memory = True
        rows.extend(run_job(job, args))
        if args.out:  # written after every job, so a long run leaves partial results
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1, default=float)

    print("\n== targets (issue #14, item 5)")
    for r in rows:
        if r["method"] != "summary":
            continue
        ok = "met" if r["slt_over_hand"] <= 1 else "NOT met"
        line = f"   {r['job']:<9s} slt/hand {r['slt_over_hand']:.2f}× (≤ 1.0: {ok})"
        if "devinterp_over_slt" in r:
            tgt, sp = r["target_devinterp_over_slt"], r["devinterp_over_slt"]
            line += f"; devinterp/slt {sp:.2f}×"
            line += " (no target)" if tgt is None else f" (≥ {tgt:g}: {'met' if sp >= tgt else 'NOT met'})"
            line += f"; devinterp/floor {r['devinterp_over_floor']:.1f}× (the most possible)"
        print(line)
    print(f"memory method: peak-RSS growth (VmHWM after a clear_refs reset − VmRSS before) of each method in a "
          f"fresh subprocess; MB/chain = (growth at {CHAINS} chains − at 1) / {CHAINS - 1}; "
          f"copies = MB/chain over 4·d bytes (parameter-sized float32 copies per chain); "
          f"MB@8 = growth at {CHAINS} chains")
    print(f"total {time.perf_counter() - t_all:.0f} s, load avg {os.getloadavg()[0]:.2f}")
    return rows


if __name__ == "__main__":
    main()
