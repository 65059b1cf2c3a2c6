"""Memory of a sampler step and of a gradient evaluation, counted in parameter-sized tensors.

A :class:`torch.utils._python_dispatch.TorchDispatchMode` sees every tensor an aten op creates; it
keeps a weak reference to each new storage of at least half a ``(C, d)`` tensor ("parameter-sized")
and records how many such bytes are alive after every op (the peak) and how many were allocated.
The count is deterministic (no timing, no allocator statistics), so the bounds are exact numbers
with a stated reason; the pre-change code (about 2.5 times as many) fails them.

The fused updates work a chunk of columns at a time; ``CHUNK_ELEMENTS`` is made small here so that,
as for a large model, a chunk is far below a parameter-sized tensor (and so is not counted).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import slt.samplers.base as base
from slt.data import Data
from slt.evaluator import ChainEvaluator
from slt.losses import LossAdapter
from slt.params import ParamSpec
from slt.samplers import LocalizedPotential, rmsprop_sgld, sghmc, sgld, sgnht

C, D = 8, 6000
F32 = torch.float32


class CountLarge(TorchDispatchMode):
    """Peak live bytes and number of allocations of storages of at least ``min_bytes``."""

    def __init__(self, min_bytes: int):
        super().__init__()
        self.min_bytes = min_bytes
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.allocs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.nbytes() >= self.min_bytes and st._cdata not in self.live and st._cdata not in inputs:
                    self.live[st._cdata] = (StorageWeakRef(st), st.nbytes())
                    self.allocs += 1
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[k]
        self.peak = max(self.peak, sum(nb for _, nb in self.live.values()))
        return out


def _copies(nbytes: int) -> float:
    return nbytes / (C * D * 4)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    if hasattr(base, "CHUNK_ELEMENTS"):
        monkeypatch.setitem(base.CHUNK_ELEMENTS, "cpu", 2048)  # a chunk: 2048 of C*D = 48000 elements


def _fake_potential(nbeta: float | torch.Tensor = 3.0) -> LocalizedPotential:
    """U = nβ ½ Σ P w² + γ/2 ‖w − w*‖², whose loss_and_grad allocates exactly one (C, d) tensor
    (the gradient, as ChainEvaluator does; checked below); w* a broadcast row, as the engine's."""
    P = torch.linspace(0.5, 2.0, D, dtype=F32)

    def loss_and_grad(w, batch):
        g = torch.mul(w, P)
        return 0.5 * torch.einsum("cd,cd->c", w, g), g

    w_star = torch.zeros(1, D, dtype=F32).expand(C, D)
    return LocalizedPotential(loss_and_grad, w_star, nbeta, 0.5)


def _run(smp, steps: int = 6):
    """Peak live parameter-sized tensors over ``steps`` steps after the first, and allocations per
    step (state created and stepped inside the mode, the old state referenced during each step as
    the run loop does)."""
    gen = torch.Generator().manual_seed(0)
    with CountLarge(C * D * 4 // 2) as m:  # everything, the state included, is created in the mode
        state = smp.init(0.1 * torch.randn(C, D, generator=gen))
        state, _ = smp.step(state, None, gen)  # step 0 (a MALA step, with a cache for the next)
        m.peak, m.allocs = 0, 0
        for _ in range(steps):
            state, info = smp.step(state, None, gen)
    return _copies(m.peak), m.allocs / steps


def test_the_fake_potential_allocates_one_gradient():
    pot = _fake_potential()
    w = torch.randn(C, D)
    with CountLarge(C * D * 4 // 2) as m:
        pot.loss_and_grad(w, None)
    assert m.allocs == 1


# Bounds: the live parameter-sized tensors while a step runs, counting the input state (which the
# caller keeps during the step).  SGLD: w, ∇L at w (or the cached ∇L at w), and the noise buffer that
# becomes w' — ∇L at w is released before ∇L at w' is computed on a MALA step, so 3 at any time.
# RMSProp adds its second moment, updated in place: 4.  SGHMC/SGNHT: w, velocity, ∇L and the
# noise buffer that becomes the new velocity; ∇L is released before w + v is allocated: 4.
# Allocations per step: ∇L, noise (SGLD: it becomes w'), plus ∇L at w' on every other (MALA) step
# (1.5 per step on average... here 6 steps: 3 MALA steps), SGHMC's w + v.
@pytest.mark.parametrize("name, make, peak, allocs", [
    ("sgld, MALA every 2, reuse", lambda p: sgld(p, 1e-3, mala_every=2, reuse_batch=True), 3, 2.0),
    ("sgld, no MALA", lambda p: sgld(p, 1e-3, mala_every=0), 3, 2.0),
    # full batch: every step is a MALA step and its input state's cache holds ∇L at w throughout: 4
    ("sgld, full batch (MALA every step)", lambda p: sgld(p, 1e-3, deterministic=True), 4, 2.0),
    ("sgld, per-chain step sizes", lambda p: sgld(p, torch.full((C, 1), 1e-3), mala_every=2, reuse_batch=True), 3,
     2.0),
    ("rmsprop_sgld, MALA every 2, reuse", lambda p: rmsprop_sgld(p, 1e-3, mala_every=2, reuse_batch=True), 4, 2.0),
    ("sghmc", lambda p: sghmc(p, 1e-3), 4, 3.0),
    ("sgnht", lambda p: sgnht(p, 1e-3), 4, 3.0),
])
def test_parameter_sized_tensors_per_step(name, make, peak, allocs):
    copies, per_step = _run(make(_fake_potential()))
    assert copies <= peak + 0.01, f"{name}: {copies:.2f} parameter-sized tensors alive at once (bound {peak})"
    assert per_step <= allocs + 0.01, f"{name}: {per_step:.2f} parameter-sized allocations per step (bound {allocs})"


def test_the_minibatch_heating_holds_two_gradients_besides_the_positions():
    """The heating diagnostic after sampling (:func:`slt.stepsize.gradient_noise_trace`) keeps the
    running mean and the gradient being evaluated (the chunk views of the previous gradient released
    first): 3 parameter-sized tensors with the positions, as a sampler step.  Its first version held
    the previous gradient and a full-size difference too (5, and the default run's peak rose from
    3.5 to 4.6 copies per chain at 1M parameters); and the value is the sample variance's trace."""
    from slt.stepsize import gradient_noise_trace

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(C, D, generator=gen) for _ in range(4)]
    it = iter(range(4))

    class Pot:  # loss_grad returns a fresh copy of the next gradient (one allocation, as the evaluator)
        def loss_grad(self, params, batch, with_potential=True):
            return None, grads[next(it)].clone(), None

    w = torch.randn(C, D, generator=gen)
    with CountLarge(C * D * 4 // 2) as m:
        m.live[w.untyped_storage()._cdata] = (StorageWeakRef(w.untyped_storage()), w.untyped_storage().nbytes())
        tr = gradient_noise_trace(Pot(), w, lambda: (None, None), 4)
    expected = torch.stack(grads).double().var(0, unbiased=True).sum(1)
    torch.testing.assert_close(tr, expected, rtol=1e-5, atol=0.0)
    assert _copies(m.peak) <= 3 + 0.01, f"{_copies(m.peak):.2f} parameter-sized tensors alive at once (bound 3)"


def test_a_step_does_not_write_its_inputs_but_rmsprops_second_moment():
    """A step never writes the parameters or the cache of its input state (a caller may hold them:
    the run loop's draw ``w_t``, the observables); RMSProp-SGLD's second moment, the sampler's own
    tensor, is updated in place (a copy would be one more parameter-sized tensor per chain)."""
    for name, make in (("sgld", lambda p: sgld(p, 1e-3, mala_every=2, reuse_batch=True)),
                       ("rmsprop", lambda p: rmsprop_sgld(p, 1e-3, mala_every=1, reuse_batch=True)),
                       ("sghmc", lambda p: sghmc(p, 1e-3)), ("sgnht", lambda p: sgnht(p, 1e-3))):
        smp = make(_fake_potential())
        gen = torch.Generator().manual_seed(0)
        state = smp.init(0.1 * torch.randn(C, D, generator=gen))
        for t in range(3):
            kept = {k: v for k, v in state._asdict().items() if not (name == "rmsprop" and k == "precond_v")}
            before = [x.clone() for x in tree_flatten(kept)[0] if isinstance(x, torch.Tensor)]
            new, _ = smp.step(state, None, gen)
            after = [x for x in tree_flatten(kept)[0] if isinstance(x, torch.Tensor)]
            assert all(torch.equal(a, b) for a, b in zip(before, after)), name
            if name == "rmsprop" and t > 0:  # the first step replaces init's broadcast zeros
                assert new.precond_v is state.precond_v
                assert float(new.precond_v.abs().sum()) > 0
            state = new


class _Layers(nn.Module):
    """Four equal 30x30 layers: the largest parameter is a quarter of d."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(*[nn.Linear(30, 30) for _ in range(4)])

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_the_evaluator_writes_gradients_straight_into_its_output(path):
    """loss_and_grad allocates one (C, d) output; per-parameter gradients are added into it as
    autograd produces them, so besides the output at most one parameter's gradient (here a quarter
    of d) and the activations (one sample per chain: a few percent) are alive — not all of them
    and then a concatenated copy (2 tensors of C·d)."""
    torch.manual_seed(0)
    model = _Layers()
    spec = ParamSpec(model)
    d = spec.d
    data = Data(torch.randn(16, 30), torch.randn(16, 30))
    batch = data.gather(torch.randint(0, 16, (C, 1)))
    ev = ChainEvaluator(model, spec, LossAdapter(F.mse_loss), path)
    flat = spec.flatten_module(model).unsqueeze(0).repeat(C, 1).contiguous()
    with CountLarge(min_bytes=4 * 900) as m:  # storages of at least one chain's largest parameter
        loss, grad = ev.loss_and_grad(flat, batch)
    peak = m.peak / (C * d * 4)
    bound = 1.0 + 0.25 + 0.1 if path == "vmap" else 1.0 + 0.1
    assert peak <= bound, f"{path}: {peak:.2f} (C, d) tensors alive at once during loss_and_grad (bound {bound})"
    p = flat.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(ev.losses(p, batch).sum(), p)
    assert torch.equal(grad, ref)


def test_mala_acceptance_equals_the_direct_formula():
    """The expanded, chunked MALA acceptance equals the textbook form (float64, where the direct
    form is accurate), with and without a preconditioner and with per-chain step sizes."""
    from slt.samplers import mala_acceptance

    gen = torch.Generator().manual_seed(1)
    d = 5000
    kw = dict(generator=gen, dtype=torch.float64)
    w, g, gn = torch.randn(C, d, **kw), torch.randn(C, d, **kw), torch.randn(C, d, **kw)
    U, Un = torch.randn(C, **kw), torch.randn(C, **kw)
    for eps in (1e-3, torch.rand(C, 1, **kw) * 1e-3):
        for G in (1.0, torch.rand(C, d, **kw) + 0.5):
            w_new = w - 0.5 * eps * G * g + (eps * G) ** 0.5 * torch.randn(C, d, **kw)
            e = eps.reshape(-1) if isinstance(eps, torch.Tensor) else eps
            fwd = ((w_new - (w - 0.5 * eps * G * g)) ** 2 / G).sum(-1) / (2 * e)
            bwd = ((w - (w_new - 0.5 * eps * G * gn)) ** 2 / G).sum(-1) / (2 * e)
            ref = torch.clamp(U - Un - bwd + fwd, max=0).exp()
            got = mala_acceptance(w, w_new, U, g, Un, gn, eps, G)
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_the_fused_mala_equals_the_public_acceptance():
    """SGLD's MALA step (sums split around the release of ∇L at w) gives the acceptance of
    :func:`mala_acceptance` on the same points (float64; RMSProp: the step's preconditioner)."""
    from slt.samplers import mala_acceptance

    for make in (lambda p: sgld(p, 1e-3, mala_every=1), lambda p: sgld(p, torch.full((C, 1), 2e-3), mala_every=1)):
        pot = LocalizedPotential(lambda w, b: (0.5 * (w * w).sum(-1), w.clone()),
                                 torch.zeros(1, D, dtype=torch.float64).expand(C, D), 3.0, 0.5)
        smp = make(pot)
        gen = torch.Generator().manual_seed(0)
        state = smp.init(0.1 * torch.randn(C, D, generator=gen, dtype=torch.float64))
        new, info = smp.step(state, None, gen)
        L, gL, U, gU = pot(state.params, None)
        Ln, gLn, Un, gUn = pot(new.params, None)
        ref = mala_acceptance(state.params, new.params, U, gU, Un, gUn, smp.step_size)
        torch.testing.assert_close(info.mala_accept, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
def test_row_blocks_give_the_same_rows(shared):
    """``ChainEvaluator.max_rows``: the vmap path evaluated in blocks of rows gives every row the
    loss and gradient of the unblocked evaluation (blocks of 3 of 8 rows: a partial last block)."""
    torch.manual_seed(0)
    model = _Layers()
    spec = ParamSpec(model)
    data = Data(torch.randn(16, 30), torch.randn(16, 30))
    ev = ChainEvaluator(model, spec, LossAdapter(F.mse_loss), "vmap")
    flat = spec.flatten_module(model).unsqueeze(0) + 0.1 * torch.randn(C, spec.d)
    batch = data.full_batch() if shared else data.gather(torch.randint(0, 16, (C, 5)))
    loss, grad = ev.loss_and_grad(flat, batch)
    ev.max_rows = 3
    with CountLarge(min_bytes=1) as m:
        loss_b, grad_b = ev.loss_and_grad(flat, batch)
    assert torch.equal(loss, loss_b) and torch.equal(grad, grad_b)
    ev.max_rows = None
    with CountLarge(min_bytes=1) as full:
        ev.loss_and_grad(flat, batch)
    assert m.peak < full.peak  # the blocks' activations are smaller


def test_the_adapted_start_state_is_not_kept_while_sampling(monkeypatch):
    """After the step-size adaptation the chains' positions are handed to the sampler and not kept for
    a possible re-run (a re-run with a halved step starts from w*): by the second draw the adapted
    state's parameter tensor is gone (one parameter-sized copy per chain less)."""
    import weakref

    import torch.nn.functional as F

    import slt.engine as engine
    from slt.target import prepare_target

    refs = []
    real = engine.adapt_step_size

    def spy(*args, **kwargs):
        state, adapt = real(*args, **kwargs)
        refs.append(weakref.ref(state.params))
        return state, adapt

    monkeypatch.setattr(engine, "adapt_step_size", spy)
    torch.manual_seed(0)
    X = torch.randn(64, 3)
    target = prepare_target(torch.nn.Linear(3, 1), (X, X[:, :1]), F.mse_loss, nbeta=50.0, localization=1.0)
    alive = []
    engine.sample_target(target, num_chains=2, num_draws=5, num_burnin=10, batch_size=16,
                         on_draw=lambda p: alive.append(refs[0]() is not None))
    assert len(refs) == 1 and len(alive) == 5
    assert not any(alive[1:]), alive


# ---------------------------------------------------------------------------------------------------
# the C allocator while sampling (slt._runtime.retained_heap)
# ---------------------------------------------------------------------------------------------------


class FakeLibc:
    """Records mallopt/malloc_trim calls instead of making them."""

    def __init__(self):
        self.calls: list[tuple] = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    from slt import _runtime

    libc = FakeLibc()
    monkeypatch.setattr(_runtime, "_glibc", lambda: libc)
    for k in (*_runtime._USER_MALLOC_ENV, "GLIBC_TUNABLES", "LD_PRELOAD", _runtime.HEAP_ENV):
        monkeypatch.delenv(k, raising=False)
    return libc


def test_the_heap_is_kept_while_sampling_and_given_back_after(fake_libc):
    from slt._runtime import GLIBC_TOP_PAD, HEAP_MMAP_THRESHOLD, HEAP_PAD, HEAP_TRIM_THRESHOLD, retained_heap

    cpu = torch.device("cpu")
    with retained_heap(cpu) as what:
        assert what.startswith("glibc heap kept")
        assert fake_libc.calls == [("mallopt", -3, HEAP_MMAP_THRESHOLD), ("mallopt", -1, HEAP_TRIM_THRESHOLD),
                                   ("mallopt", -2, HEAP_PAD)]
        with retained_heap(cpu) as inner:  # nested runs (an estimator calling the engine) act once
            assert inner == "untouched (nested in another sampling run)"
        assert len(fake_libc.calls) == 3
    assert fake_libc.calls[3:] == [("mallopt", -2, GLIBC_TOP_PAD), ("malloc_trim", 0)]
    with pytest.raises(ZeroDivisionError):  # restored on an exception too, and usable again after
        with retained_heap(cpu):
            1 / 0
    assert fake_libc.calls[-2:] == [("mallopt", -2, GLIBC_TOP_PAD), ("malloc_trim", 0)]
    assert len(fake_libc.calls) == 10


@pytest.mark.parametrize("env, device, reason", [
    ({"SLT_TUNE_MALLOC": "0"}, "cpu", "SLT_TUNE_MALLOC=0"),
    ({"MALLOC_TOP_PAD_": "1000"}, "cpu", "the environment sets MALLOC_TOP_PAD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "cpu", "the environment sets GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "cpu", "another allocator is preloaded"),
    ({}, "cuda", "device cuda"),
    ({}, "meta", "device meta"),
])
def test_the_heap_is_left_alone_when_asked_or_not_ours(fake_libc, monkeypatch, env, device, reason):
    from slt._runtime import retained_heap

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with retained_heap(torch.device(device)) as what:
        assert what.startswith("untouched (") and reason in what
    assert fake_libc.calls == []


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 4 draws: R-hat and w* warnings are expected
def test_a_run_records_what_it_did_with_the_allocator(fake_libc, monkeypatch):
    import slt

    torch.manual_seed(0)
    X = torch.randn(64, 3)
    kw = dict(num_chains=2, num_draws=4, num_burnin=0, step_size=1e-4, localization=10.0, progress=False, seed=0)
    r = slt.estimate_llc(nn.Linear(3, 1), (X, X.sum(1, keepdim=True)), F.mse_loss, **kw)
    assert r.config["allocator"].startswith("glibc heap kept") and fake_libc.calls[-1] == ("malloc_trim", 0)
    monkeypatch.setenv("SLT_TUNE_MALLOC", "0")
    r = slt.estimate_llc(nn.Linear(3, 1), (X, X.sum(1, keepdim=True)), F.mse_loss, **kw)
    assert r.config["allocator"] == "untouched (SLT_TUNE_MALLOC=0)"


@pytest.mark.skipif(__import__("slt._runtime", fromlist=["_glibc"])._glibc() is None, reason="needs glibc")
def test_glibc_accepts_every_setting():
    """The real mallopt returns 1 for each value (0 would mean glibc refused it, e.g. a threshold
    above its maximum)."""
    from slt import _runtime

    libc = _runtime._glibc()
    for param, value in [(-3, _runtime.HEAP_MMAP_THRESHOLD), (-1, _runtime.HEAP_TRIM_THRESHOLD),
                         (-2, _runtime.HEAP_PAD), (-2, _runtime.GLIBC_TOP_PAD)]:
        assert libc.mallopt(param, value) == 1
    assert libc.malloc_trim(0) in (0, 1)


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: a device type with the accelerators' sizes
@pytest.mark.parametrize("C,d", [(1, 1000), (8, 1_033_910), (8, 10_240_000), (128, 13_030)])
def test_column_chunks_bound_the_update_temporaries_on_every_device(device, C, d):
    """The fused updates' temporaries are one column chunk: above one chunk's elements a (C, d) tensor
    is split, on accelerators too (8 chains of a 1M-parameter MLP were one chunk on an H200, and each
    temporary was (C, d): 6.9 parameter-sized copies per chain instead of 4.0)."""
    like = torch.empty((C, d), device=device)
    per = base.CHUNK_ELEMENTS.get(like.device.type, base._CHUNK_DEFAULT)
    chunks = base.column_chunks(like)
    assert chunks[0].start == 0 and chunks[-1].stop == d
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    if len(chunks) == 1:
        assert C * d <= base.ONE_CHUNK_FACTOR.get(like.device.type, 1) * per
    if C * d > 4 * per:  # a parameter-sized tensor: no chunk holds more than a chunk's elements (≥ 64 columns)
        assert len(chunks) > 1 and all(C * (s.stop - s.start) <= max(per, 64 * C) for s in chunks)
    if like.device.type != "cpu" and C * d > per:  # accelerators: split above one chunk
        assert len(chunks) > 1


def test_out_of_memory_is_recognised_from_the_allocators_own_errors():
    from slt.evaluator import out_of_memory

    with pytest.raises(RuntimeError) as cpu:
        torch.empty(1 << 50)  # 4 PiB: the CPU allocator refuses it
    assert out_of_memory(cpu.value) and out_of_memory(MemoryError())
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None:
        assert out_of_memory(oom("CUDA out of memory. Tried to allocate 20.00 GiB"))


def _oom_above(monkeypatch, rows: int):
    """Every vmap block of more than ``rows`` rows fails as the CPU allocator fails (a real allocation)."""
    from slt.evaluator import ChainEvaluator

    real = ChainEvaluator._vmap_block

    def block(self, flat, batch, out, *rest):
        if flat.shape[0] > rows:
            torch.empty(1 << 50)
        return real(self, flat, batch, out, *rest)

    monkeypatch.setattr(ChainEvaluator, "_vmap_block", block)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 30 draws: the chains' findings are not under test
def test_vmap_halves_its_blocks_when_memory_runs_out_and_says_so(monkeypatch):
    """A run whose vmap evaluation of all chains runs out of memory continues in blocks of half as many
    rows (down to what fits), keeps them for the rest of the run, gives the chains of a run that fits
    (rows are independent: same losses to float rounding) and records the change in setup_notes."""
    import slt

    X = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    Y = X @ torch.tensor([[1.0], [-1.0], [0.5]])
    m = nn.Linear(3, 1)
    kw = dict(num_chains=8, num_draws=30, step_size=1e-3, vectorize="vmap", progress=False, seed=0)
    ref = slt.estimate_llc(m, (X, Y), F.mse_loss, **kw)
    _oom_above(monkeypatch, 3)
    r = slt.estimate_llc(m, (X, Y), F.mse_loss, **kw)
    notes = r.config["setup_notes"]
    assert [n.split(":")[0] for n in notes] == ["vmap in blocks of 4 rows", "vmap in blocks of 2 rows"], notes
    assert "ran out of memory" in notes[0]
    torch.testing.assert_close(r.loss_trace, ref.loss_trace, rtol=1e-5, atol=1e-6)
    assert "vmap in blocks of 2 rows" in str(r)  # print(result) shows it as a note


def test_one_row_that_does_not_fit_is_an_error_naming_the_batch_size(monkeypatch):
    import slt

    X = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    Y = X @ torch.tensor([[1.0], [-1.0], [0.5]])
    _oom_above(monkeypatch, 0)
    with pytest.raises(MemoryError, match="batch_size"):
        slt.estimate_llc(nn.Linear(3, 1), (X, Y), F.mse_loss, num_chains=4, num_draws=10, step_size=1e-3,
                         vectorize="vmap", progress=False)
