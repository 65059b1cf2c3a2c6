"""Mixed precision (``autocast="bf16"``): the model runs under ``torch.autocast``, everything else
(loss, losses at w*, gradients, sampler) in the parameters' dtype.  Exact tests compare against the
same computation written by hand under ``torch.autocast`` (same ops on the same device, so equal
bit for bit); CPU autocast stands in for the GPU one (the mechanism is the same)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt.evaluator import resolve_autocast
from slt.target import prepare_target

pytestmark = pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")


class Recorder(nn.Module):
    """An MLP that records the dtype its first linear layer computed in."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 16), nn.Linear(16, 3)
        self.seen: list[torch.dtype] = []

    def forward(self, x):
        h = self.l1(x)
        self.seen.append(h.dtype)
        return self.l2(torch.relu(h))


@dataclass
class Out:
    logits: torch.Tensor


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 4, generator=g)
    return X, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("value, dtype", [(None, None), (False, None), ("bf16", torch.bfloat16),
                                          ("BFloat16", torch.bfloat16), ("fp16", torch.float16),
                                          (torch.bfloat16, torch.bfloat16), (True, torch.bfloat16)])
def test_resolve_autocast(value, dtype):
    assert resolve_autocast(value) == dtype


@pytest.mark.parametrize("bad", ["fp8", torch.float64, 16])
def test_bad_autocast_is_refused_before_anything_runs(bad):
    X, Y = _data()
    with pytest.raises(ValueError, match="autocast must be"):
        slt.estimate_llc(nn.Linear(4, 3), (X, Y), F.cross_entropy, autocast=bad, num_draws=5)


def test_vmap_is_refused_and_auto_runs_a_loop():
    X, Y = _data()
    with pytest.raises(ValueError, match="vmap does not apply autocast"):
        prepare_target(nn.Linear(4, 3), (X, Y), F.cross_entropy, vectorize="vmap", autocast="bf16")
    t = prepare_target(nn.Linear(4, 3), (X, Y), F.cross_entropy, autocast="bf16")
    assert t.path == "loop" and "autocast" in t.path_reason


@pytest.mark.parametrize("path", ["auto", "loop"])
def test_model_runs_in_half_precision_and_losses_equal_the_hand_written_autocast(path):
    X, Y = _data()
    torch.manual_seed(0)
    m = Recorder()
    t = prepare_target(m, (X, Y), F.cross_entropy, vectorize=path, autocast="bf16")
    m.seen.clear()
    w = t.w_star[0]
    got = t.losses(w[None])[0]
    assert m.seen and set(m.seen) == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(X)
    want = F.cross_entropy(out.float(), Y)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    full = prepare_target(m, (X, Y), F.cross_entropy, vectorize=path)
    lf = full.losses(w[None])[0]
    # bf16 rounds each product to 8 significant bits: the loss moves by far more than float32 rounding
    assert got != lf and abs(float(got - lf)) < 0.05 * float(lf)
    # gradients flow to the float32 parameters
    loss, grad = t.evaluator.loss_and_grad(t.rows(2), t.full_batch())
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_structured_outputs_come_back_in_full_precision():
    X, Y = _data()

    class Structured(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 3)

        def forward(self, x):
            return Out(self.l(x))

    seen = []

    def loss(out, y):
        seen.append(out.logits.dtype)
        return F.cross_entropy(out.logits, y)

    r = slt.estimate_llc(Structured(), (X, Y), loss, autocast="bf16", num_chains=2, num_draws=20,
                         step_size=1e-4, batch_size=16, progress=False)
    # a dataclass output is passed through as the model returned it (the loss sees what autocast gave)
    assert math.isfinite(r.llc_mean) and r.config["autocast"] == "bfloat16"


def test_estimate_with_autocast_records_it_and_stays_close_to_full_precision():
    """The same job in float32 and under bf16 autocast, same seed and step: the chains see the same
    noise, so λ̂ differs only through the rounding of the forward pass.  Bound: each loss is rounded
    by at most ~2⁻⁸ relative, so a draw's nβ(L − L*) moves by at most 2 · 2⁻⁸ · nβ · L ≈ 0.19 here
    (nβ = 46, L ≈ 0.54) against λ̂ ≈ 9.7, i.e. 2%; the test allows 5% (measured: 1e-4 relative)."""
    X, Y = _data(256)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(m(X), Y).backward()
        opt.step()
    kw = dict(num_chains=8, num_draws=300, step_size=1e-4, localization=100.0, batch_size=64, seed=0,
              progress=False)
    full = slt.estimate_llc(m, (X, Y), F.cross_entropy, **kw)
    half = slt.estimate_llc(m, (X, Y), F.cross_entropy, autocast="bf16", **kw)
    assert full.config["autocast"] is None and half.config["autocast"] == "bfloat16"
    assert abs(half.llc_mean - full.llc_mean) < 0.05 * full.llc_mean, (half.llc_mean, full.llc_mean)
