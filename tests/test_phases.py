"""slt.phases: global posterior sampling with replica exchange, and phase fractions.

Exact tier: shapes, reproducibility, labels/fractions/switches on hand-made draws, input errors.
Statistical tier (fixed seeds, tolerances from the chain spread): the Gaussian posterior's mean and
SGLD's exact stationary variance; the mass of each well of an asymmetric double well against
quadrature, which plain SGLD cannot reach (``mixed`` is False) and replica exchange does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import slt
from slt.models import ChainModule, kgon_parameters, tms_live_columns
from slt.phases import PosteriorDraws, basin_fractions, geometric_ladder, sample_posterior


class Point(ChainModule):
    """One scalar parameter w; the output is w for every row, so L_n(w) = V(w)."""

    def __init__(self, w0: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([w0], dtype=torch.float64))

    def forward_chains(self, params, x):  # (C, B, 1) -> (C, B, 1)
        return params["w"].unsqueeze(1).expand(x.shape[0], x.shape[1], 1)


def quadratic(a: float):
    def loss(out, target):
        return 0.5 * (out - a).square().mean()
    return loss


TILT = 0.02


def double_well(out, target):
    """V(w) = (w² − 1)² + 0.02 w: wells at ±1 separated by a barrier of height 1."""
    return ((out.square() - 1).square() + TILT * out).mean()


X1 = torch.zeros(1, 1, dtype=torch.float64)


def test_t_threshold_matches_student_t_tables():
    from slt.phases import _t_threshold

    assert _t_threshold(1.959964, 10) == pytest.approx(2.228, abs=2e-3)  # t_10, 5% two-sided
    assert _t_threshold(3.0, 3) == pytest.approx(9.22, abs=0.02)
    assert _t_threshold(3.0, 10_000) == pytest.approx(3.0, abs=2e-3)


def test_geometric_ladder():
    lad = geometric_ladder(5, 0.01)
    assert lad[0] == 1.0 and lad[-1] == pytest.approx(0.01)
    ratios = np.array(lad[:-1]) / np.array(lad[1:])
    assert np.allclose(ratios, ratios[0])
    assert geometric_ladder(1, 0.5) == [1.0]
    with pytest.raises(ValueError, match="min_factor"):
        geometric_ladder(3, 1.5)


def test_shapes_and_reproducibility():
    kw = dict(prior_std=1.0, init=[{"w": torch.tensor([-1.0])}, {"w": torch.tensor([1.0])}],
              init_labels=["left", "right"], chains_per_init=3, nbeta=5.0, num_draws=7, num_burnin=5,
              num_steps_bw_draws=2, temperatures=[1.0, 0.5], seed=3)
    a = sample_posterior(Point(), X1, double_well, **kw)
    b = sample_posterior(Point(), X1, double_well, **kw)
    assert a.draws.shape == (6, 7, 1) and a.loss_trace.shape == (6, 7)
    assert a.rung_draws.shape == (2, 6, 7, 1) and torch.equal(a.rung_draws[0], a.draws)
    assert a.init_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert a.swap_accept.shape == (1,) and a.mala_accept.shape == (6,)
    assert torch.equal(a.draws, b.draws)  # same seed, same draws
    # the recorded loss is L_n at the recorded draw
    assert torch.allclose(a.loss_trace, (a.draws[..., 0].square() - 1).square() + TILT * a.draws[..., 0])
    c = sample_posterior(Point(), X1, double_well, **{**kw, "seed": 4})
    assert not torch.equal(a.draws, c.draws)


def test_zero_noise_limit_is_gradient_descent_with_prior():
    """Without tempering, one step from w0 has mean w0 − ε/2 (nβ V'(w0) + w0/σ²): check over many chains."""
    eps, nb, s = 1e-3, 4.0, 2.0
    d = sample_posterior(Point(), X1, quadratic(1.0), prior_std=s, init=[{"w": torch.tensor([0.3])}],
                         chains_per_init=4000, nbeta=nb, num_draws=1, num_burnin=0, num_steps_bw_draws=1,
                         step_size=eps, seed=0)
    drift = 0.3 - 0.5 * eps * (nb * (0.3 - 1.0) + 0.3 / s**2)
    w = d.draws[:, 0, 0]
    assert abs(float(w.mean()) - drift) < 4 * math.sqrt(eps / 4000)
    assert float(w.var()) == pytest.approx(eps, rel=0.1)


def test_gaussian_posterior_mean_and_sgld_variance():
    """L(w) = (w − a)²/2, prior N(μ0, σ²): the posterior is N(m, 1/P) with P = nβ + 1/σ²; SGLD with
    step ε has the exact stationary variance 1/(P (1 − εP/4))."""
    a, mu0, s, nb = 1.5, -1.0, 0.5, 10.0
    P = nb + 1 / s**2
    m = (nb * a + mu0 / s**2) / P
    d = sample_posterior(Point(), X1, quadratic(a), prior_std=s, prior_mean=mu0, chains_per_init=16,
                         nbeta=nb, num_draws=400, num_burnin=200, num_steps_bw_draws=10, seed=1)
    eps = d.config["step_size"]
    assert eps == pytest.approx(0.1 / P)  # the automatic step at a quadratic: h = 1
    assert d.config["seed"] == 1 and "torch" in d.config["versions"]  # (a run records what it ran with)
    w = d.draws[..., 0]  # (C, T)
    per_mean = w.mean(1)
    se = float(per_mean.std() / math.sqrt(w.shape[0]))
    assert abs(float(per_mean.mean()) - m) < 4 * se
    var_exact = 1 / (P * (1 - eps * P / 4))
    per_var = w.var(1)
    se_v = float(per_var.std() / math.sqrt(w.shape[0]))
    assert abs(float(per_var.mean()) - var_exact) < 4 * se_v + 0.01 * var_exact
    assert float(d.mala_accept.mean()) > 0.95


def _well_mass_right(nb: float, s: float) -> float:
    w = torch.linspace(-4, 4, 400001, dtype=torch.float64)
    logp = -nb * ((w**2 - 1) ** 2 + TILT * w) - 0.5 * w**2 / s**2
    p = torch.exp(logp - logp.max())
    return float(p[w > 0].sum() / p.sum())


def test_replica_exchange_finds_the_mass_of_each_well():
    """nβ = 20: the barrier is 20 nats, so plain SGLD chains stay in the well they start in and
    the fractions only echo the starts (mixed is False); with a ladder down to nβ = 1 the
    fraction in the right well matches quadrature (≈ 0.31) within 4 s.e."""
    nb, s = 20.0, 2.0
    exact = _well_mass_right(nb, s)
    assert 0.2 < exact < 0.45
    starts = [{"w": torch.tensor([-1.0])}, {"w": torch.tensor([1.0])}]
    kw = dict(prior_std=s, init=starts, init_labels=["left", "right"], chains_per_init=8, nbeta=nb,
              num_draws=200, num_burnin=2000, num_steps_bw_draws=40, seed=0)

    def side(p):
        return "right" if float(p["w"][0]) > 0 else "left"

    plain = basin_fractions(sample_posterior(Point(), X1, double_well, **kw), side)
    assert not plain.mixed
    assert plain.by_init["left"]["left"] == 1.0 and plain.by_init["right"]["right"] == 1.0

    d = sample_posterior(Point(), X1, double_well, temperatures=geometric_ladder(8, 1 / nb), **kw)
    assert (d.swap_accept > 0.2).all()
    tempered = basin_fractions(d, side)
    assert tempered.mixed, tempered
    assert abs(tempered.fraction("right") - exact) < 4 * tempered.sem["right"], (tempered, exact)
    # the hottest rung (nβ = 1) is nearly symmetric: both wells well populated
    hot = basin_fractions(d, side, rung=7)
    assert 0.3 < hot.fraction("right") < 0.6


def test_basin_fractions_on_hand_made_draws():
    spec = slt.params.ParamSpec(Point())
    vals = torch.tensor([[1.0, 1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    d = PosteriorDraws(vals.unsqueeze(-1), torch.zeros(3, 4), torch.tensor([0, 0, 1]), ["a", "b"], spec,
                       torch.ones(3))
    bf = basin_fractions(d, lambda p: int(p["w"][0] > 0))
    assert bf.fraction(1) == pytest.approx(6 / 12)
    per = np.array([0.5, 1.0, 0.0])
    assert bf.sem[1] == pytest.approx(per.std(ddof=1) / math.sqrt(3))
    assert bf.switches.tolist() == [1, 0, 0]
    assert bf.by_init["a"][1] == pytest.approx(0.75) and bf.by_init["b"][1] == 0.0
    # pooled t: chains (0.5, 1.0 | 0.0), df = 1: t = 0.75 / sqrt(0.125 (1/2 + 1)), far below t_1's quantile
    assert bf.max_z == pytest.approx(0.75 / math.sqrt(0.125 * 1.5))
    assert bf.threshold == pytest.approx(235.8, rel=1e-3) and bf.mixed  # one chain per group proves nothing
    stuck = torch.tensor([[1.0] * 4] * 3 + [[-1.0] * 4] * 3, dtype=torch.float64)
    two = PosteriorDraws(stuck.unsqueeze(-1), torch.zeros(6, 4), torch.tensor([0, 0, 0, 1, 1, 1]), ["a", "b"], spec,
                         torch.ones(6))
    b2 = basin_fractions(two, lambda p: int(p["w"][0] > 0))
    assert b2.max_z == math.inf and not b2.mixed  # each group keeps its own phase
    one = PosteriorDraws(vals.unsqueeze(-1), torch.zeros(3, 4), torch.tensor([0, 0, 0]), ["a"], spec, torch.ones(3))
    assert not basin_fractions(one, lambda p: int(p["w"][0] > 0)).mixed  # one group, 1/3 switch per chain
    flip = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    one = PosteriorDraws(flip.unsqueeze(-1), torch.zeros(2, 4), torch.tensor([0, 0]), ["a"], spec, torch.ones(2))
    assert basin_fractions(one, lambda p: int(p["w"][0] > 0)).mixed  # one group that keeps switching
    assert repr(d) == "PosteriorDraws(3 chains × 4 draws of 1 parameters, starts ['a', 'b'], 1 temperature rung, MALA acceptance 1)"
    frame = bf.to_frame()
    assert set(frame["phase"]) == {0, 1} and "fraction[a]" in frame.columns
    with pytest.raises(TypeError, match="hashable"):
        basin_fractions(d, lambda p: [1])
    # a label returned as a tensor (hashable by identity: every draw its own label; helper 35 saw an AttributeError
    # deep in the statistics) or a NumPy scalar is read as its value; a tensor of several values is refused
    for as_label in (lambda v: v > 0, lambda v: (v > 0).long(), lambda v: (v > 0).numpy(), lambda v: np.int64(v > 0)):
        tb = basin_fractions(d, lambda p: as_label(p["w"][0]))
        assert tb.fraction(1) == bf.fraction(1) == pytest.approx(0.5) and len(tb.to_frame()) == 2
    with pytest.raises(TypeError, match=r"one label, got a Tensor of shape \(2,\)"):
        basin_fractions(d, lambda p: torch.ones(2))
    with pytest.raises(ValueError, match="rung"):
        basin_fractions(d, lambda p: 1, rung=1)
    with pytest.raises(TypeError, match="PosteriorDraws"):
        basin_fractions("draws", lambda p: 1)


def test_input_errors():
    m = Point()
    with pytest.raises(ValueError, match="prior_std"):
        sample_posterior(m, X1, double_well, prior_std=0.0)
    with pytest.raises(ValueError, match="temperatures"):
        sample_posterior(m, X1, double_well, prior_std=1.0, temperatures=[1.0, 1.0])
    with pytest.raises(ValueError, match="temperatures"):
        sample_posterior(m, X1, double_well, prior_std=1.0, temperatures=[0.5, 0.1])
    with pytest.raises(ValueError, match="shape"):
        sample_posterior(m, X1, double_well, prior_std=1.0, init=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="lacks"):
        sample_posterior(m, X1, double_well, prior_std=1.0, init=[{"v": torch.zeros(1)}])
    with pytest.raises(ValueError, match="init_labels"):
        sample_posterior(m, X1, double_well, prior_std=1.0, init_labels=["a", "b"])
    with pytest.raises(ValueError, match="num_draws"):
        sample_posterior(m, X1, double_well, prior_std=1.0, num_draws=0)
    with pytest.raises(ValueError, match="prior_mean"):
        sample_posterior(m, X1, double_well, prior_std=1.0, prior_mean=torch.zeros(3))
    with pytest.raises(RuntimeError, match="NaN/inf"):
        sample_posterior(m, X1, double_well, prior_std=1.0, step_size=10.0, num_burnin=50, num_draws=1,
                         init=[{"w": torch.tensor([3.0])}])


def test_tms_live_columns_on_kgons():
    for k in (3, 4, 5, 6):
        p = kgon_parameters(k, 6, 2, dead_bias=-1.0)
        assert tms_live_columns(p["W"], p["b"]) == k
    W = kgon_parameters(6, 6, 2)["W"].clone()
    W[:, 0] *= 0.3  # a shrunken column no longer counts
    assert tms_live_columns(W) == 5
    assert tms_live_columns(torch.zeros(2, 6)) == 0
    with pytest.raises(ValueError, match="rel_threshold"):
        tms_live_columns(W, rel_threshold=1.5)
