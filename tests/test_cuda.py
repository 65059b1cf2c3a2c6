"""The CUDA path (skipped without a GPU; CI has none).  ``benchmarks/gpu_suite.sh`` runs this file on a
lent GPU machine, with the GPU benchmarks.

Exact tier: on the GPU the vmap, native and loop paths consume the same random numbers and give the same
chains up to float64 rounding (the bound of ``tests/test_engine_exact.py``: cuBLAS sums in other orders
than a CPU BLAS, which the bound allows).  Statistical tier: the same job on the GPU and on the CPU (different
random streams: CUDA generators draw other numbers) agrees within 4 combined standard errors, and a plain
``nn.Module`` at every default converges there; bf16 autocast stays within 5% of float32 with the same noise
(the bound of ``tests/test_autocast.py``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt.training import train
from test_engine_exact import KW, _data, _model, trace_tol

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")]


@pytest.mark.parametrize("path", ["native", "loop", "compile"])
def test_paths_agree_with_vmap_on_cuda(path):
    X, Y = _data()
    ref = slt.estimate_llc(_model(), (X, Y), F.mse_loss, vectorize="vmap", device="cuda", **KW)
    other = slt.estimate_llc(_model(), (X, Y), F.mse_loss, vectorize=path, device="cuda", **KW)
    assert ref.config["device"].startswith("cuda") and other.config["device"].startswith("cuda")
    tol = trace_tol(_model(), X, Y, KW, ref.loss_trace)
    torch.testing.assert_close(other.loss_trace, ref.loss_trace, rtol=0, atol=tol)


def _trained(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g)
    Y = (X @ torch.randn(6, 3, generator=g)).argmax(1)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    train(m, (X, Y), F.cross_entropy, steps=400, lr=1e-2, finish=None)  # full-batch Adam
    return m.eval(), X, Y


def test_cuda_and_cpu_agree_within_monte_carlo_error():
    m, X, Y = _trained()
    kw = dict(num_chains=8, num_draws=400, step_size=1e-4, localization=100.0, batch_size=64, seed=0, progress=False)
    cpu = slt.estimate_llc(m, (X, Y), F.cross_entropy, device="cpu", **kw)
    gpu = slt.estimate_llc(m, (X, Y), F.cross_entropy, device="cuda", **kw)
    z = (gpu.llc_mean - cpu.llc_mean) / math.hypot(gpu.llc_sem, cpu.llc_sem)
    assert abs(z) < 4, (gpu.llc_mean, gpu.llc_sem, cpu.llc_mean, cpu.llc_sem)


def test_a_plain_module_at_every_default_converges_on_cuda():
    m, X, Y = _trained()
    r = slt.estimate_llc(m, (X, Y), F.cross_entropy, device="cuda", progress=False)
    assert r.config["device"].startswith("cuda") and math.isfinite(r.llc_mean) and r.llc_mean > 0
    assert r.converged, r.convergence_reasons


def test_bf16_autocast_on_cuda_stays_close_to_float32():
    m, X, Y = _trained()
    kw = dict(num_chains=8, num_draws=300, step_size=1e-4, localization=100.0, batch_size=64, seed=0,
              progress=False, device="cuda")
    full = slt.estimate_llc(m, (X, Y), F.cross_entropy, **kw)
    half = slt.estimate_llc(m, (X, Y), F.cross_entropy, autocast="bf16", **kw)
    assert half.config["autocast"] == "bfloat16"
    assert abs(half.llc_mean - full.llc_mean) < 0.05 * full.llc_mean, (half.llc_mean, full.llc_mean)


def test_a_real_cuda_out_of_memory_halves_the_vmap_blocks():
    """Item 4 on the device it is for: a vmapped evaluation that exceeds the GPU's memory is repeated in
    smaller blocks of chains, the run goes on and gives the chains of a run that fits.

    The memory is capped (``torch.cuda.set_per_process_memory_fraction``) at the idle use plus 70% of what
    the uncapped run of all 8 chains at once added at its peak, which is mostly the activations of the 8
    chains' batches (the (C, d) parameters, gradient and noise are 3 × 8 × 1.1M float64 = 0.2 GB against
    about 1.6 GB of activations): all 8 rows do not fit, 4 (about 57% of that peak) do.  float64, so that a block's other matmul
    shapes (cuBLAS picks kernels by shape) change the chains by rounding only: λ̂ agrees to 1e-6."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8192, 64, generator=g, dtype=torch.float64)
    Y = torch.randn(8192, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1)).double()
    kw = dict(num_chains=8, num_draws=12, num_burnin=0, step_size=1e-7, nbeta=100.0, localization=100.0,
              batch_size=4096, vectorize="vmap", dtype=torch.float64, device=dev, seed=0, progress=False,
              extend_draws=False)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    idle = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    ref = slt.estimate_llc(m, (X, Y), F.mse_loss, **kw)
    grew = torch.cuda.max_memory_allocated(dev) - idle
    assert not ref.config.get("setup_notes"), ref.config.get("setup_notes")
    total = torch.cuda.get_device_properties(dev).total_memory
    cap = idle + int(0.7 * grew)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total, dev)
    try:
        r = slt.estimate_llc(m, (X, Y), F.mse_loss, **kw)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()
    notes = r.config.get("setup_notes") or []
    assert notes and notes[0].startswith("vmap in blocks of 4 rows") and "ran out of memory" in notes[0], (notes, grew)
    assert "OutOfMemoryError" in notes[0], notes
    assert abs(r.llc_mean - ref.llc_mean) <= 1e-6 * max(1.0, abs(ref.llc_mean)), (r.llc_mean, ref.llc_mean)
    torch.testing.assert_close(r.loss_trace, ref.loss_trace, rtol=1e-9, atol=1e-12)
