"""Fused activations (exact tier): Hugging Face's ``gelu_new`` / ``gelu_fast`` / ``gelu_accurate`` modules run as
``F.gelu(approximate="tanh")`` inside slt's calls of the model (:data:`slt.evaluator.FUSED_FORWARDS`),
the same function to rounding, with the module's own ``forward`` back after every call."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import slt
from slt.evaluator import FUSE_ENV, fused_activations
from slt.losses import causal_lm
from slt.target import prepare_target

from conftest import fp_tol

F64 = torch.float64
V, T, N = 16, 12, 48


def _gpt2(activation="gelu_new"):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)  # test-side only
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                  eos_token_id=0, attn_implementation="eager", activation_function=activation)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, V, (N, 3), generator=g).repeat(1, T // 3)}


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_fast", "gelu_accurate"])
def test_gpt2_activations_run_fused_and_compute_the_same_function(activation):
    model = _gpt2(activation)
    acts = fused_activations(model)
    assert sorted(acts) == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    t = prepare_target(model, _data(), causal_lm, dtype=F64)
    ev = t.evaluator
    assert set(ev.fused) == set(acts)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append("forward" in vars(m))) for m in ev.fused.values()]
    params = {**t.spec.unflatten(t.w_star[0]), **ev.buffers}
    x = {"input_ids": _data(1)["input_ids"][:8]}
    fused = ev.call(params, x).logits
    for h in hooks:
        h.remove()
    assert seen == [True, True]  # the fused forward ran, inside the call only
    assert all("forward" not in vars(m) for m in ev.fused.values())
    plain = torch.func.functional_call(t.model, params, (), x).logits  # the modules' own forward
    # the same function: differences are roundings of the activations carried through the layers
    tol = fp_tol(F64, scale=float(plain.abs().max()) + 1.0, terms=t.d)
    torch.testing.assert_close(fused, plain, rtol=0, atol=tol)
    # a different GELU (the erf form) is far outside that bound: the check can fail
    exact = nn.functional.gelu(torch.linspace(-3, 3, 101, dtype=F64))
    tanh = nn.functional.gelu(torch.linspace(-3, 3, 101, dtype=F64), approximate="tanh")
    assert float((exact - tanh).abs().max()) > 1e3 * tol


def test_forward_restored_when_the_call_raises():
    model = _gpt2()
    t = prepare_target(model, _data(), causal_lm)
    ev = t.evaluator
    params = {**t.spec.unflatten(t.w_star[0]), **ev.buffers}
    with pytest.raises(Exception):
        ev.call(params, {"input_ids": torch.full((2, T), V + 5)})  # token ids beyond the vocabulary
    assert all("forward" not in vars(m) for m in ev.fused.values())


def test_only_the_listed_classes_are_fused_and_the_switch_turns_it_off(monkeypatch):
    transformers = pytest.importorskip("transformers")

    class NewGELUActivation(nn.Module):  # same name, another module: the user's own
        def forward(self, x):
            return x

    class Sub(transformers.activations.NewGELUActivation):  # a subclass may change forward
        pass

    own = transformers.activations.NewGELUActivation()
    own.forward = lambda x: x  # an instance with its own forward
    model = nn.Sequential(nn.Linear(3, 3), NewGELUActivation(), Sub(), own,
                          transformers.activations.NewGELUActivation())
    assert list(fused_activations(model)) == ["4"]
    monkeypatch.setenv(FUSE_ENV, "0")
    assert fused_activations(model) == {}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 20 draws of an untrained model: not the point
def test_estimate_records_the_fused_modules_and_agrees_with_the_plain_run(monkeypatch):
    model = _gpt2()
    data = _data()
    kw = dict(num_chains=2, num_draws=20, num_burnin=0, step_size=1e-4, localization=100.0, nbeta=10.0,
              batch_size=8, seed=0, progress=False)
    r = slt.estimate_llc(model, data, causal_lm, **kw)
    assert r.config["fused_activations"] == {"NewGELUActivation": 2}
    monkeypatch.setenv(FUSE_ENV, "0")
    r0 = slt.estimate_llc(model, data, causal_lm, **kw)
    assert r0.config["fused_activations"] == {}
    # the same chains up to float32 rounding of the activations (a run-level smoke check: on this untrained
    # model even the erf GELU moves λ̂ by only 4e-5; the sharp check of the function is the one above)
    assert math.isclose(r.llc_mean, r0.llc_mean, rel_tol=1e-3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 20 draws of an untrained model: not the point
def test_bloom_gelu_runs_batched_and_computes_its_own_function():
    """BLOOM's ``BloomGelu`` calls an ``autograd.Function`` without ``setup_context``, which vmap refuses:
    the model fell back to the loop over chains with a warning. slt calls ``F.gelu(approximate="tanh")``
    for it, the function its forward and hand-written backward compute."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)  # test-side only
    model = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=V, hidden_size=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    acts = fused_activations(model)
    assert sorted(acts) == ["transformer.h.0.mlp.gelu_impl", "transformer.h.1.mlp.gelu_impl"]
    t = prepare_target(model, _data(), causal_lm, dtype=F64)
    params = {**t.spec.unflatten(t.w_star[0]), **t.evaluator.buffers}
    x = {"input_ids": _data(1)["input_ids"][:8]}

    def grads(call):
        p = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in params.items()}
        out = call(p).logits
        g = torch.autograd.grad(out.square().sum(), [p[n] for n in t.spec.names])
        return out, torch.cat([v.reshape(-1) for v in g])

    fused, g_fused = grads(lambda p: t.evaluator.call(p, x))
    own, g_own = grads(lambda p: torch.func.functional_call(t.model, p, (), x))  # GeLUFunction's forward/backward
    tol = fp_tol(F64, scale=float(own.detach().abs().max()) + 1.0, terms=t.d)
    torch.testing.assert_close(fused, own, rtol=0, atol=tol)
    torch.testing.assert_close(g_fused, g_own, rtol=0, atol=fp_tol(F64, scale=float(g_own.detach().abs().max()) + 1.0,
                                                                   terms=t.d))
    kw = dict(num_chains=2, num_draws=20, num_burnin=0, step_size=1e-4, localization=100.0, nbeta=10.0,
              batch_size=8, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*the vmap path failed")  # it did, and fell back to the loop
        vm = slt.estimate_llc(model, _data(), causal_lm, vectorize="vmap", **kw)
    lp = slt.estimate_llc(model, _data(), causal_lm, vectorize="loop", **kw)
    assert vm.diagnostics["path"] == "vmap" and vm.config["fused_activations"] == {"BloomGelu": 2}
    assert math.isclose(vm.llc_mean, lp.llc_mean, rel_tol=1e-3)
