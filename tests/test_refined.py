"""Refined LLCs in the engine: weight restrictions (``restrict_to``) and data distributions
(``data={label: dataset}``), batched with checkpoints (Wang et al. 2024, arXiv 2410.02984).

Exact tier: a restriction to everything is the unrestricted run bit for bit; masked parameters
never leave w*; a restriction to parameters the loss does not see gives λ̂ = 0 up to float
rounding; results come back in the caller's shape.  Oracle tier: a model of two independent
deep-linear blocks whose losses add: each block's refined LLC is that block's closed-form λ and
the unrestricted one their sum (10% band as in test_oracle.py, MC error ≤ 4% of λ).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt import theory
from slt.models import DeepLinearNetwork, gaussian_nll, make_dln_data
from slt.training import train

from conftest import IGNORE_CHECKPOINT_WARNING

pytestmark = IGNORE_CHECKPOINT_WARNING

KW = dict(num_chains=3, num_draws=40, num_burnin=20, progress=False)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.unused = nn.Parameter(torch.randn(5))  # the loss never sees it

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    X, Y = torch.randn(256, 4), torch.randint(0, 3, (256,))
    m = Net()
    train(m, (X, Y), F.cross_entropy, steps=300, lr=1e-2)
    return m, X, Y


def test_restriction_to_every_parameter_is_the_unrestricted_run_bit_for_bit(net):
    m, X, Y = net
    for kw in (dict(batch_size=64), dict(batch_size=None), dict(batch_size=32, step_size=1e-3)):
        a = slt.estimate_llc(m, (X, Y), F.cross_entropy, seed=3, **KW, **kw)
        b = slt.estimate_llc(m, (X, Y), F.cross_entropy, seed=3, restrict_to="*", **KW, **kw)
        assert torch.equal(a.loss_trace, b.loss_trace)
        assert a.step_size == b.step_size


def test_masked_parameters_stay_at_w_star_and_the_free_ones_move(net):
    m, X, Y = net
    obs = {"body": lambda p: p["body.weight"].flatten(1), "head": lambda p: p["head.weight"].flatten(1)}
    r = slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to={"head": "head.*", "body": ["body.*"]},
                         observables=obs, batch_size=64, seed=0, **KW)
    assert list(r) == ["head", "body"]
    w_body, w_head = m.body.weight.detach().flatten(), m.head.weight.detach().flatten()
    assert torch.equal(r["head"].observables["body"], w_body.expand_as(r["head"].observables["body"]))
    assert not torch.equal(r["head"].observables["head"], w_head.expand_as(r["head"].observables["head"]))
    assert torch.equal(r["body"].observables["head"], w_head.expand_as(r["body"].observables["head"]))
    assert r["head"].config["restriction"] == "head"
    assert r["head"].config["restricted_params"] == m.head.weight.numel() + m.head.bias.numel()


def test_restrictions_name_the_users_model_when_the_run_works_on_a_copy(net):
    """Another dtype (or a device, or a half-precision model) makes the run work on a copy of the model: a
    module or a callable that names the user's own parameters still selects them."""
    m, X, Y = net
    kw = dict(batch_size=None, step_size=1e-3, dtype=torch.float64, seed=0, **KW)
    by_glob = slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to="head.*", **kw)
    by_module = slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to=m.head, **kw)
    by_identity = slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to=lambda n, p: p is m.head.weight
                                   or p is m.head.bias, **kw)
    by_params = slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to=[m.head.weight, m.head.bias], **kw)
    labelled = slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to={"head": [m.head], "w": m.head.weight}, **kw)
    by_weight = slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to="head.weight", **kw)
    for r in (by_module, by_identity, by_params, labelled["head"]):
        assert torch.equal(by_glob.loss_trace, r.loss_trace)
    assert torch.equal(labelled["w"].loss_trace, by_weight.loss_trace)
    with pytest.raises(ValueError, match="parameter .* is not a sampled parameter of the model: it is not the model's"):
        slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to=nn.Parameter(torch.zeros(3)), **kw)
    with pytest.raises(ValueError, match="not a submodule of the model passed"):
        slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to=nn.Linear(8, 3), **kw)
    with pytest.raises(ValueError, match="Tanh has no sampled parameter of the model: it has no parameters"):
        slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to=nn.Tanh(), **kw)
    frozen = copy.deepcopy(m)
    frozen.body.requires_grad_(False)
    with pytest.raises(ValueError, match="its parameters are all frozen"):
        slt.estimate_llc(frozen, (X, Y), F.cross_entropy, restrict_to=frozen.body, **kw)
    with pytest.raises(ValueError, match="it is frozen"):
        slt.estimate_llc(frozen, (X, Y), F.cross_entropy, restrict_to=frozen.body.weight, **kw)
    frozen.register_buffer("scale", torch.ones(3))
    with pytest.raises(ValueError, match=r"it matches buffers \(scale\), which are not parameters"):
        slt.estimate_llc(frozen, (X, Y), F.cross_entropy, restrict_to="scale", **kw)
    # an observable that reads what is not sampled fails before sampling, naming it
    with pytest.raises(ValueError, match=r"observable 'b' reads params\['body.weight'\], which is a frozen parameter"):
        slt.estimate_llc(frozen, (X, Y), F.cross_entropy, observables={"b": lambda p: p["body.weight"]}, **kw)
    with pytest.raises(ValueError, match=r"reads params\['head.weigth'\].*similar names: head.weight"):
        slt.bif(m, (X, Y), F.cross_entropy, observables={"h": lambda p: p["head.weigth"].sum((1, 2))},
                **{k: v for k, v in kw.items() if k != "num_burnin"})


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.t = nn.Linear(6, 8), nn.Linear(8, 3), nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.t


def test_a_restrictions_automatic_settings_do_not_depend_on_the_restrictions_beside_it():
    """Each restriction adapts its own step from the curvature of the coordinates it moves (the scalar t's
    is far smaller than the layer a's), and a group whose relaxation burn-in is beyond the cap does not
    shorten another's: t batched with a is t alone, draw for draw; so are checkpoints batched and alone."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 6, generator=g)
    Y = torch.multinomial(torch.softmax(torch.stack([X[:, 0], -X[:, 0], X[:, 1]], 1), 1), 1, generator=g).squeeze(1)
    torch.manual_seed(0)
    m = Scaled()
    train(m, (X, Y), F.cross_entropy, steps=300, finish=None)
    kw = dict(num_chains=2, num_draws=60, progress=False, seed=0)
    alone = slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to="t", **kw)
    both = slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to={"a": "a.*", "t": "t"}, **kw)
    assert both["a"].step_size < alone.step_size / 4  # (the test's premise: the two steps differ)
    assert both["t"].step_size == alone.step_size
    assert both["t"].config["num_burnin"] == alone.config["num_burnin"] > kw["num_draws"] // 4
    assert torch.equal(both["t"].loss_trace, alone.loss_trace)
    m2 = copy.deepcopy(m)
    train(m2, (X, Y), F.cross_entropy, steps=50, finish=None)
    curve = slt.estimate_llc(None, (X, Y), F.cross_entropy, models=[m, m2], restrict_to="t", **kw)
    for k, mk in enumerate([m, m2]):
        own = slt.estimate_llc(mk, (X, Y), F.cross_entropy, restrict_to="t", **{**kw, "seed": k})
        assert curve[k].step_size == own.step_size and torch.equal(curve[k].loss_trace, own.loss_trace)
        # (60 draws: too few for the step-bias rescale, which would stretch the steps the call's groups share)
        assert curve[k].diagnostics["step_bias_rescale"] is None


def test_a_restriction_the_loss_does_not_see_gives_zero(net):
    m, X, Y = net
    r = slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to="unused", batch_size=None, seed=0,
                         raise_on_divergence=True, **KW)
    # L(w) = L(w*) exactly in exact arithmetic: the only error is the rounding of two evaluations
    # of the same loss, |ΔL| ≤ a few ulp of L(w*), times nβ
    bound = 8 * torch.finfo(torch.float32).eps * r.init_loss * r.nbeta
    assert abs(r.llc_mean) <= bound


def test_restrictions_times_checkpoints_shape_and_one_batch(net):
    m, X, Y = net
    m2 = Net()
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        m2.head.bias.add_(0.01)
    r = slt.estimate_llc(m, (X, Y), F.cross_entropy, models=[m, m2], restrict_to={"a": "head.*", "b": "body.*"},
                         batch_size=64, **KW)
    assert set(r) == {"a", "b"} and all(len(v) == 2 for v in r.values())
    assert r["b"][1].config["checkpoint"] == 1 and r["b"][1].config["restriction"] == "b"
    # groups of one checkpoint share its seed
    assert r["a"][1].config["seed"] == r["b"][1].config["seed"] == 1


def test_data_refined_shape_and_agreement_with_separate_calls(net):
    m, X, Y = net
    d1, d2 = (X[:128], Y[:128]), (X[128:], Y[128:])
    nb = 40.0
    r = slt.estimate_llc(m, {"first": d1, "second": d2}, F.cross_entropy, nbeta=nb, batch_size=32,
                         step_size=1e-3, seed=5, **KW)
    assert list(r) == ["first", "second"]
    for lab, d in (("first", d1), ("second", d2)):
        s = slt.estimate_llc(m, d, F.cross_entropy, nbeta=nb, batch_size=32, step_size=1e-3, seed=5, **KW)
        # same random streams and data; only the batched evaluation's rounding differs
        assert r[lab].init_loss == pytest.approx(s.init_loss, rel=1e-5)
        torch.testing.assert_close(r[lab].loss_trace, s.loss_trace, rtol=1e-3, atol=1e-4)
    both = slt.estimate_llc(m, {"first": d1, "second": d2}, F.cross_entropy, nbeta=nb, batch_size=32,
                            step_size=1e-3, restrict_to={"h": "head.*", "b": "body.*"}, seed=5, **KW)
    assert list(both) == ["h", "b"] and list(both["h"]) == ["first", "second"]
    assert both["b"]["second"].config["data"] == "second"


def test_data_refined_full_batch_matches_separate_calls(net):
    m, X, Y = net
    d1, d2 = (X[:100], Y[:100]), (X[100:], Y[100:])  # different sizes: padded with zero weight
    r = slt.estimate_llc(m, {"a": d1, "b": d2}, F.cross_entropy, nbeta=30.0, step_size=1e-3, seed=2, **KW)
    for lab, d in (("a", d1), ("b", d2)):
        s = slt.estimate_llc(m, d, F.cross_entropy, nbeta=30.0, step_size=1e-3, seed=2, **KW)
        torch.testing.assert_close(r[lab].loss_trace, s.loss_trace, rtol=1e-3, atol=1e-4)
        assert r[lab].config["n"] == s.config["n"] == len(d[0])  # each its own size (was the first's for all)



def test_data_refined_distributions_given_as_mappings_of_columns(net):
    """``{label: {"x": ..., "y": ...}}`` (each distribution a batch mapping, as a tokenizer returns it) is
    a data-refined run — the same as each mapping wrapped in ``slt.Data``; before, the inner mappings were
    read as columns of one dataset ("x['first'] must be a torch.Tensor")."""
    m, X, Y = net

    def loss(out, batch):
        return F.cross_entropy(out, batch["y"])

    class Named(nn.Module):  # the model called as model(**batch): keyword x, the label column ignored
        def __init__(self):
            super().__init__()
            self.net = m

        def forward(self, x, y=None):
            return self.net(x)

    parts = {"first": {"x": X[:128], "y": Y[:128]}, "second": {"x": X[128:], "y": Y[128:]}}
    kw = dict(nbeta=40.0, batch_size=32, step_size=1e-3, seed=5, **KW)
    r = slt.estimate_llc(Named(), parts, loss, **kw)
    ref = slt.estimate_llc(Named(), {k: slt.Data(v) for k, v in parts.items()}, loss, **kw)
    assert list(r) == ["first", "second"]
    for lab in parts:
        assert torch.equal(r[lab].loss_trace, ref[lab].loss_trace)

def test_refinement_errors(net):
    m, X, Y = net
    with pytest.raises(ValueError, match="different sizes"):
        slt.estimate_llc(m, {"a": (X[:100], Y[:100]), "b": (X[100:], Y[100:])}, F.cross_entropy, **KW)
    with pytest.raises(ValueError, match="different sizes.*as a number"):  # nβ(n) of which n?
        slt.prepare_target(m, {"a": (X[:100], Y[:100]), "b": (X[100:], Y[100:])}, F.cross_entropy,
                           nbeta=lambda n: n / 2)
    with pytest.raises(ValueError, match="mixes datasets and columns"):
        slt.estimate_llc(m, {"a": (X, Y), "b": X}, F.cross_entropy, **KW)
    with pytest.raises(ValueError, match="sgnht"):
        slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to="head.*", sampler="sgnht", **KW)
    with pytest.raises(ValueError, match="nomatch"):
        slt.estimate_llc(m, (X, Y), F.cross_entropy, restrict_to="nomatch.*", **KW)


class TwoBlocks(nn.Module):
    """Two independent deep linear networks on separate inputs; the Gaussian loss of the
    concatenated output is the sum of the blocks' losses, so λ = λ_a + λ_b."""

    def __init__(self, wa, wb, gen):
        super().__init__()
        self.a = DeepLinearNetwork(wa, generator=gen, dtype=torch.float64)
        self.b = DeepLinearNetwork(wb, generator=gen, dtype=torch.float64)
        self.na = wa[0]

    def forward(self, x):
        return torch.cat([self.a(x[:, : self.na]), self.b(x[:, self.na:])], 1)


@pytest.mark.slow
def test_refined_llc_of_independent_blocks_is_each_block_closed_form():
    wa, ra, wb, rb, n = [5, 3, 5], 1, [4, 3, 3, 4], 1, 10_000
    Xa, Ya, _ = make_dln_data(wa, ra, n, torch.Generator().manual_seed(0), dtype=torch.float64)
    Xb, Yb, _ = make_dln_data(wb, rb, n, torch.Generator().manual_seed(1), dtype=torch.float64)
    X, Y = torch.cat([Xa, Xb], 1), torch.cat([Ya, Yb], 1)
    m = TwoBlocks(wa, wb, torch.Generator().manual_seed(2))
    assert train(m, (X, Y), gaussian_nll, steps=500, lr=1e-2, finish="lbfgs").converged
    la, lb = theory.dln_llc(wa, ra), theory.dln_llc(wb, rb)
    r = slt.estimate_llc(m, (X, Y), gaussian_nll, restrict_to={"a": "a.*", "b": "b.*", "all": "*"},
                         num_chains=8, num_draws=3000, num_burnin=1000, batch_size=None, dtype=torch.float64,
                         seed=0, progress=False)
    for lab, lam in (("a", la), ("b", lb), ("all", la + lb)):
        res = r[lab]
        assert res.divergent_chains == []
        assert res.llc_sem <= 0.04 * lam, f"{lab}: MC error too large: {res.llc_sem}"
        assert abs(res.llc_mean - lam) <= 0.10 * lam, f"{lab}: λ̂ = {res.llc_mean:.3f} ± {res.llc_sem:.3f}, λ = {lam}"


@pytest.mark.slow
def test_per_head_refined_llc_agrees_with_devinterp_on_gpt2(one_thread):
    """devinterp 2.0.1 on its home turf: per-head weight-refined LLC of a tiny Hugging Face GPT-2
    (``create_param_masks(model, "l{i}h{h}")`` + ``llc``) against slt's one batched call with
    ``restrict_to=slt.restrict.heads(model)``, on the identical job (nβ, γ, ε, steps, full batch: no
    minibatch noise, so the chain spread is each side's whole Monte-Carlo error; devinterp's mean
    includes step 0 at w*, so slt's first draw is at step 0 too, no burn-in on either side).
    Tolerance: |Δ| ≤ 4 s.e. of the difference per head (8 heads: a false alarm has probability
    < 1e-3)."""
    pytest.importorskip("transformers")
    pytest.importorskip("devinterp")
    import os
    import sys

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from bench_refined import NBETA, GAMMA, build_lm, run_devinterp

    from slt.restrict import heads

    lm, seq = build_lm()
    seq = seq[:128]
    C, T, eps = 4, 150, 3e-4
    H = heads(lm)
    r = slt.estimate_llc(lm, {"input_ids": seq}, slt.losses.causal_lm, restrict_to=H, num_chains=C, num_draws=T,
                         num_burnin=0, step_size=eps, nbeta=NBETA, localization=GAMMA, batch_size=None, seed=0,
                         progress=False)
    import bench_refined

    old = bench_refined.EPS
    bench_refined.EPS = eps
    try:
        for lab in H:
            per_chain, _ = run_devinterp(lm, seq, lab, C, T, seq.shape[0])
            m, se = per_chain.mean(), per_chain.std(ddof=1) / np.sqrt(C)
            s_slt = float(r[lab].llc_per_chain.std()) / np.sqrt(C)
            z = abs(r[lab].llc_mean - m) / np.hypot(s_slt, se)
            assert z <= 4, f"{lab}: slt {r[lab].llc_mean:.3f} ± {s_slt:.3f} vs devinterp {m:.3f} ± {se:.3f}"
    finally:
        bench_refined.EPS = old


@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_only_the_restricted_parameters_gradients_are_computed(net, path):
    """With restrictions the evaluator asks autograd only for the parameters some restriction moves
    (``grad_names``); their gradients are exactly those of the full computation, the others are 0."""
    from slt.target import prepare_target

    m, X, Y = net
    t = prepare_target(m, (X, Y), F.cross_entropy, restrict_to={"h": "head.weight", "b": "body.bias"},
                       vectorize=path)
    assert t.evaluator.grad_names == {"head.weight", "body.bias"}
    rows = t.rows(2)
    batch = t.full_batch()
    loss, grad = t.evaluator.loss_and_grad(rows, batch)
    t.evaluator.grad_names = None
    loss_all, grad_all = t.evaluator.loss_and_grad(rows, batch)
    assert torch.equal(loss, loss_all)
    for name, g in t.spec.unflatten(grad).items():
        ref = t.spec.unflatten(grad_all)[name]
        assert torch.equal(g, ref) if name in ("head.weight", "body.bias") else not g.any(), name


@pytest.mark.parametrize("per_row", [False, True])
def test_the_row_plan_gives_each_row_its_masked_gradient(net, per_row):
    """``ChainEvaluator.row_plan`` (vmap, restrictions): rows of restrictions that move the same
    parameters and share a minibatch are evaluated as one block with the other parameters and the
    shared input passed once.  Each row's loss and its gradient on the parameters its restriction
    moves equal the plain evaluation to float32 rounding (batched vs. one matmul: bound from ε32 and
    the size of the sums); the rest of the gradient is masked away by the engine."""
    from conftest import fp_tol

    from slt.data import Batch
    from slt.target import prepare_target

    m, X, Y = net
    head = torch.zeros(3, 8, dtype=torch.bool)
    masks = {"h0": {"head.weight": head.clone().index_fill_(0, torch.tensor([0]), True)},
             "h1": {"head.weight": head.clone().index_fill_(0, torch.tensor([1, 2]), True)},
             "body": "body.*"}
    t = prepare_target(m, (X, Y), F.cross_entropy, restrict_to=masks, vectorize="vmap", seed=[3])
    C = 2
    plan = t.groups.row_plan(t.K, C, t.spec)
    # h0 and h1 move the same tensor: one block per chain; body: one block of its chains
    assert sorted(len(r) for r, _ in plan) == [2, 2, 2]
    rows = t.rows(C).clone()
    rows += 1e-2 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(0)) * t.groups.masks.repeat_interleave(C, 0)
    if per_row:  # chain c's minibatch, the same for every restriction (as the engine draws them)
        idx = torch.randint(0, 256, (C, 32), generator=torch.Generator().manual_seed(1))
        idx = idx.repeat(t.groups.M, 1)
        batch = Batch(X[idx], Y[idx], None, False)
    else:
        batch = t.full_batch()
    t.evaluator.row_plan = None
    loss_ref, grad_ref = t.evaluator.loss_and_grad(rows, batch)
    t.evaluator.row_plan = (rows.shape[0], plan)
    loss, grad = t.evaluator.loss_and_grad(rows, batch)
    tol = fp_tol(torch.float32, scale=float(loss_ref.abs().max()), terms=256 * 8)
    assert torch.allclose(loss, loss_ref, atol=tol, rtol=0)
    mask = t.groups.masks.repeat_interleave(C, 0).bool()
    gtol = fp_tol(torch.float32, scale=float(grad_ref.abs().max()), terms=256 * 8)
    assert torch.allclose(grad[mask], grad_ref[mask], atol=gtol, rtol=0)


class ParallelBlock(nn.Module):
    """Attention and MLP read the same input and are summed in place, as Falcon's and GPT-J's parallel
    blocks do (``mlp_output += attention_output``)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out = self.mlp(x)
        out += torch.tanh(self.attn(x))
        return self.head(out)


def test_restrictions_on_a_model_that_adds_activations_in_place_run_batched():
    """The row plan passes parameters a block of rows does not move once, unbatched; an in-place add of a
    batched activation into one they alone computed then fails under vmap.  The run falls back to every row
    batched, says so in its setup notes, and gives the loop's chains."""
    torch.manual_seed(0)
    X, Y = torch.randn(128, 4), torch.randint(0, 3, (128,))
    m = ParallelBlock()
    train(m, (X, Y), F.cross_entropy, steps=200, lr=1e-2)
    kw = dict(restrict_to={"attn": "attn.*", "mlp": "mlp.*"}, num_chains=2, num_draws=10, num_burnin=0,
              step_size=1e-4, nbeta=20.0, localization=10.0, batch_size=None, extend_draws=False, progress=False)
    vm = slt.estimate_llc(m, (X, Y), F.cross_entropy, vectorize="vmap", **kw)
    lp = slt.estimate_llc(m, (X, Y), F.cross_entropy, vectorize="loop", **kw)
    assert vm["attn"].config["path"] == "vmap"
    assert any("every parameter batched" in n for n in vm["attn"].config["setup_notes"])
    from conftest import fp_tol
    for label in ("attn", "mlp"):  # nβ (L_n(w) − L_n(w*)): float32 sums over 128 samples of 8-wide layers
        tol = fp_tol(torch.float32, scale=kw["nbeta"] * float(lp[label].loss_trace.abs().max()), terms=128 * 8)
        assert torch.allclose(vm[label].llc_trace, lp[label].llc_trace, atol=tol, rtol=0)


def test_functions_of_one_posterior_refuse_a_mapping_of_distributions():
    """``prepare_target`` concatenates a mapping ``{label: dataset}`` into one source (estimate_llc then samples
    one posterior per distribution).  ``nuts_llc`` and ``sample_posterior`` took that union as their data
    silently (helper 35: NUTS on {"a": 200 rows, "b": their first 50} read λ̂ 2.52, bit for bit NUTS on the
    concatenation, against 1.88 on "a"); they now refuse it before sampling, as ``bif``/``loss_kernel`` do."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g)
    Y = X @ torch.randn(3, 1, generator=g) + 0.1 * torch.randn(200, 1, generator=g)
    m = nn.Linear(3, 1)
    data = {"a": (X[:100], Y[:100]), "b": (X[100:], Y[100:])}
    calls = {"slt.sample_posterior": lambda: slt.sample_posterior(m, data, F.mse_loss, prior_std=1.0, num_draws=4,
                                                                   num_burnin=4),
             "slt.bif": lambda: slt.bif(m, data, F.mse_loss, num_chains=2, num_draws=4, progress=False),
             "slt.loss_kernel": lambda: slt.loss_kernel(m, data, F.mse_loss, num_chains=2, num_draws=4, progress=False)}
    try:
        import pyro  # noqa: F401
        calls["slt.nuts_llc"] = lambda: slt.nuts_llc(m, data, F.mse_loss, nbeta=30.0, num_chains=1, num_draws=4,
                                                     num_warmup=4)
    except ImportError:
        pass
    for caller, call in calls.items():
        with pytest.raises(ValueError, match=rf"{caller}: data must be one data set; a mapping of data sets "
                                             r"\['a', 'b'\] .* once per distribution, data=data\[label\]"):
            call()
