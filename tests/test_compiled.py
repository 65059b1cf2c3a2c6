"""``torch.compile`` of the vmapped step (slt.compiled): the same losses and gradients as the eager
vmap path, used for every step of a run when asked, refused or skipped with a reason otherwise."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt import target as tg
from slt import compiled
from slt.compiled import compile_step, func_transforms_traced
from slt.engine import HEATING_BATCHES
from slt.target import prepare_target


class UserNet(nn.Module):
    """Written as users write them: a 0-dim parameter, a frozen parameter, a buffer, a dict output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 16)
        self.out = nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.frozen = nn.Parameter(0.1 * torch.randn(16), requires_grad=False)
        self.register_buffer("shift", 0.1 * torch.randn(6))

    def forward(self, x):
        h = torch.tanh(self.lin(x - self.shift)) * self.scale + self.frozen
        return {"logits": self.out(h)}


class Breaks(UserNet):
    """Runs eagerly and under vmap, but not as one compiled graph."""

    def forward(self, x):
        torch._dynamo.graph_break()
        return super().forward(x)


def loss_fn(out, y):
    return F.cross_entropy(out["logits"], y)


def _trained(cls=UserNet, seed=0):
    torch.manual_seed(seed)
    X = torch.randn(384, 6)
    Y = (X[:, 0] > 0).long() + (X[:, 1] > 1).long()
    m = cls()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss_fn(m(X), Y).backward()
        opt.step()
    return m, X, Y


#: the tests that need the step to compile: torch 2.3's torch.compile does not trace torch.func transforms
needs_compile = pytest.mark.skipif(not func_transforms_traced(),
                                   reason=f"torch {torch.__version__}'s torch.compile does not trace torch.func")


@pytest.fixture(autouse=True)
def _fresh_decisions(monkeypatch):
    monkeypatch.setattr(tg, "_PATH_DECISIONS", {})
    monkeypatch.setattr(tg, "_COMPILE_DECISIONS", {})


RUN = dict(num_chains=4, num_draws=40, num_burnin=10, step_size=1e-4, localization=100.0, nbeta=50.0,
           batch_size=64, seed=3, progress=False)


@needs_compile
def test_compiled_step_equals_the_eager_step():
    """Exact tier, float64: the compiled vmap(grad_and_value) and the eager vmap + autograd compute the
    same sums in a different order; each gradient entry sums batch × width products, so the two agree
    to (64 · 16) · eps64 of the gradient's scale."""
    m, X, Y = _trained()
    t = prepare_target(m, (X, Y), loss_fn, vectorize="vmap", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    rows = t.rows(4) + 1e-2 * torch.randn(4, t.d, generator=g, dtype=torch.float64)
    batch = t.source.gather(torch.randint(X.shape[0], (4, 64), generator=g))
    le, ge = t.evaluator.loss_and_grad(rows, batch)
    step, t_compile = compile_step(t.evaluator, rows, batch)
    assert step.matches(rows, batch)
    lc, gc = step(rows, batch)
    tol = 64 * 16 * torch.finfo(torch.float64).eps
    assert torch.allclose(lc, le, rtol=0, atol=tol * float(le.abs().max()))
    assert torch.allclose(gc, ge, rtol=0, atol=tol * float(ge.abs().max()))
    assert gc.shape == (4, t.d) and float(ge.abs().max()) > 0
    # another shape is not served (it would take the eager path)
    assert not step.matches(rows[:2], t.source.gather(torch.zeros(2, 64, dtype=torch.long)))
    # a second model of the class (compiled for the same shapes; inductor may reuse the first one's
    # kernels) computes with its own frozen parameter and buffer, not the first model's
    torch.manual_seed(1)
    m2 = UserNet()
    with torch.no_grad():
        m2.frozen.mul_(20.0)
        m2.shift.add_(1.0)
    t2 = prepare_target(m2, (X, Y), loss_fn, vectorize="vmap", dtype=torch.float64)
    rows2 = t2.rows(4) + 1e-2 * torch.randn(4, t2.d, generator=g, dtype=torch.float64)
    le2, ge2 = t2.evaluator.loss_and_grad(rows2, batch)
    lc2, gc2 = compile_step(t2.evaluator, rows2, batch)[0](rows2, batch)
    assert torch.allclose(lc2, le2, rtol=0, atol=tol * float(le2.abs().max()))
    assert torch.allclose(gc2, ge2, rtol=0, atol=tol * float(ge2.abs().max()))
    assert not torch.allclose(le2, le)  # the two models differ


@needs_compile
def test_compiled_step_in_blocks_equals_the_eager_step():
    """A step compiled for blocks of rows (one graph, called per block: what a run with more rows than
    slt.target.VMAP_BLOCK_ROWS uses) gives every row its own loss and gradient: the eager values to
    the same float64 bound; a block that does not divide the rows means all rows at once."""
    m, X, Y = _trained()
    t = prepare_target(m, (X, Y), loss_fn, vectorize="vmap", dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    rows = t.rows(12) + 1e-2 * torch.randn(12, t.d, generator=g, dtype=torch.float64)
    batch = t.source.gather(torch.randint(X.shape[0], (12, 64), generator=g))
    le, ge = t.evaluator.loss_and_grad(rows, batch)
    tol = 64 * 16 * torch.finfo(torch.float64).eps
    step = compile_step(t.evaluator, rows, batch, block=4)[0]
    assert step.block == 4 and step.matches(rows, batch)
    lc, gc = step(rows, batch)
    assert torch.allclose(lc, le, rtol=0, atol=tol * float(le.abs().max()))
    assert torch.allclose(gc, ge, rtol=0, atol=tol * float(ge.abs().max()))
    # each block sees its own rows' minibatch: permuting the rows permutes the results
    perm = torch.randperm(12, generator=g)
    lp, gp = step(rows[perm], slt.data.Batch(batch.x[perm], batch.y[perm], None, False))
    assert torch.allclose(lp, lc[perm], rtol=0, atol=tol * float(le.abs().max()))
    assert compile_step(t.evaluator, rows, batch, block=5)[0].block == 12
    # a shared batch (one for all rows) is passed whole to every block
    shared = slt.data.Batch(batch.x[0], batch.y[0], None, True)
    ls, gs = t.evaluator.loss_and_grad(rows, shared)
    lb, gb = compile_step(t.evaluator, rows, shared, block=4)[0](rows, shared)
    assert torch.allclose(lb, ls, rtol=0, atol=tol * float(ls.abs().max()))
    assert torch.allclose(gb, gs, rtol=0, atol=tol * float(gs.abs().max()))


@needs_compile
def test_vectorize_compile_serves_every_step_of_the_run():
    m, X, Y = _trained()
    kw = dict(RUN, dtype=torch.float64)
    eager = slt.estimate_llc(m, (X, Y), loss_fn, vectorize="vmap", **kw)
    comp = slt.estimate_llc(m, (X, Y), loss_fn, vectorize="compile", **kw)
    assert "compiled (torch.compile)" in comp.diagnostics["path_reason"]
    steps = RUN["num_draws"] + RUN["num_burnin"]  # one call per step, one per MALA diagnostic (every 10th: not
    # reused) and HEATING_BATCHES for the minibatch-noise estimate at the end
    assert comp.config["compiled_calls"] == steps + steps // comp.config["mala_every"] + HEATING_BATCHES
    assert eager.config["compiled_calls"] is None
    # float64 rounding differences (~1e-15 per step) stay far below the estimate's scale over 50 steps
    assert comp.llc_mean == pytest.approx(eager.llc_mean, rel=1e-9)
    assert torch.allclose(comp.loss_trace, eager.loss_trace, rtol=1e-9, atol=0)


def test_a_model_that_does_not_compile_keeps_the_eager_step():
    m, X, Y = _trained(Breaks)
    eager = slt.estimate_llc(m, (X, Y), loss_fn, vectorize="vmap", **RUN)
    with pytest.warns(RuntimeWarning, match="could not compile this model as one graph"):
        comp = slt.estimate_llc(m, (X, Y), loss_fn, vectorize="compile", **RUN)
    assert comp.config["compiled_calls"] is None
    assert "not compiled (torch.compile failed" in comp.diagnostics["path_reason"]
    assert comp.llc_mean == eager.llc_mean  # the same eager computation, bit for bit
    # the failed attempt leaves the process as it was: a call does not hold its arguments afterwards (a
    # fullgraph=True failure did in torch 2.13, keeping the engine's start state alive through a run)
    import weakref

    class Box:
        pass

    def callee(obj, ref):
        del obj
        return ref() is not None

    held = [Box()]
    ref = weakref.ref(held[0])
    kept = callee(held.pop(), ref)  # outside the assert: pytest's rewriting keeps its subexpressions
    assert not kept


@needs_compile
def test_auto_tries_compiling_only_runs_long_enough(monkeypatch):
    m, X, Y = _trained()
    short = slt.estimate_llc(m, (X, Y), loss_fn, **RUN)
    assert "torch.compile" not in short.diagnostics["path_reason"]
    assert short.config["compiled_calls"] is None
    monkeypatch.setattr(tg, "COMPILE_MIN_SECONDS", 0.0)  # every run is "long": compiled and timed
    monkeypatch.setattr(tg, "_PATH_DECISIONS", {})
    long = slt.estimate_llc(m, (X, Y), loss_fn, **RUN)
    reason = long.diagnostics["path_reason"]
    assert "(torch.compile):" in reason and "ms eager per step of 4 chains, compiled in" in reason
    kept = "; compiled (torch.compile)" in reason  # kept only when measured faster: machine-dependent
    steps = RUN["num_draws"] + RUN["num_burnin"]  # and one call per MALA diagnostic (not reused), and the heating's
    calls = steps + steps // long.config["mala_every"] + HEATING_BATCHES
    assert long.config["compiled_calls"] == (calls if kept else None)
    # the decision is kept for the process: a rerun compiles only when it was kept, and says so
    again = slt.estimate_llc(m, (X, Y), loss_fn, **RUN)
    reason = again.diagnostics["path_reason"]
    assert "(measured earlier in this process" in reason
    assert ("this call compiled in" in reason) == kept
    assert again.config["compiled_calls"] == (calls if kept else None)
    assert again.llc_mean == long.llc_mean


def test_a_torch_that_cannot_trace_func_transforms_runs_eager_and_says_why(monkeypatch):
    """On torch 2.3 ``torch.compile`` breaks the graph at ``vmap`` (it needs
    ``capture_func_transforms``, and with it breaks at the module call): ``compile_step`` says so before
    compiling anything, and the run is the eager one, bit for bit."""
    monkeypatch.setattr(compiled, "func_transforms_traced", lambda: False)  # as on torch 2.3
    m, X, Y = _trained()
    eager = slt.estimate_llc(m, (X, Y), loss_fn, vectorize="vmap", **RUN)
    with pytest.warns(RuntimeWarning, match=r"does not trace torch\.func transforms.*running the uncompiled vmap"):
        comp = slt.estimate_llc(m, (X, Y), loss_fn, vectorize="compile", **RUN)
    assert comp.config["compiled_calls"] is None and comp.llc_mean == eager.llc_mean


def test_compile_is_refused_or_skipped_where_it_does_not_apply():
    m, X, Y = _trained()
    with pytest.raises(ValueError, match="autocast runs the model in a loop"):
        slt.estimate_llc(m, (X, Y), loss_fn, vectorize="compile", autocast="bf16", **RUN)
    with pytest.raises(ValueError, match="vectorize must be one of"):
        slt.estimate_llc(m, (X, Y), loss_fn, vectorize="jit", **RUN)
    eager = slt.estimate_llc(m, (X, Y), loss_fn, vectorize="vmap", restrict_to={"lin": "lin.*"}, **RUN)
    with pytest.warns(RuntimeWarning, match="not used for weight-refined runs"):
        comp = slt.estimate_llc(m, (X, Y), loss_fn, vectorize="compile", restrict_to={"lin": "lin.*"}, **RUN)
    assert comp["lin"].llc_mean == eager["lin"].llc_mean
    assert comp["lin"].config["compiled_calls"] is None
    loop = prepare_target(m, (X, Y), loss_fn, vectorize="loop")
    with pytest.warns(RuntimeWarning, match="needs the vmap path and tensor data"):
        assert tg.fastest_path(loop, loop.rows(2), 8, compile=True) is loop
    assert loop.evaluator.compiled is None


@needs_compile
def test_compiling_does_not_surface_torchs_own_deprecation_warnings():
    """Exact: the first ``torch.compile`` of a process imports torch modules that warn about their own
    use of deprecated TorchScript decorators (torch 2.13: 14 DeprecationWarnings from torch/jit/_script.py,
    visible to users who show all warnings); :func:`compile_step` keeps them out, other warnings pass.
    In a fresh interpreter (the imports happen once per process)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import warnings, torch, torch.nn.functional as F
        warnings.simplefilter("always")
        from slt.compiled import compile_step
        from slt.target import prepare_target
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        X, Y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        t = prepare_target(m, (X, Y), F.cross_entropy)
        rows = t.rows(2)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            compile_step(t.evaluator, rows, t.full_batch())
            warnings.warn("a user's own", DeprecationWarning)
        print("CAUGHT", [str(w.message)[:60] for w in seen if w.category is DeprecationWarning])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("CAUGHT"))
    assert line == "CAUGHT [\"a user's own\"]", line


class Recurrent(nn.Module):
    """An LSTM over a sequence and a GRUCell after it: fused recurrent kernels that vmap cannot batch,
    which slt's calls replace by the recurrence in plain operations (slt._rnn)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.cell = nn.GRUCell(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.lstm(x.view(x.shape[0], 2, 3).repeat(1, 1, 2))
        return {"logits": self.out(self.cell(h[:, -1], h[:, 0]))}


@needs_compile
def test_a_recurrent_model_compiles_with_the_batchable_recurrence():
    """The compiled step puts the same forwards in place as every eager call (the recurrence in plain
    operations); dynamo refused the modules' own ("Attempted to wrap RNN, GRU, or LSTM"), so such a
    model ran the eager vmap path with a warning.  Exact tier, float64: the run equals the eager vmap
    run to rounding, every step served by the compiled graph."""
    m, X, Y = _trained(Recurrent)
    _compiled_equals_eager(m, (X, Y), loss_fn, dtype=torch.float64)
    assert not any("forward" in vars(mod) for mod in m.modules())  # the modules' own forwards are back


def _compiled_equals_eager(model, data, loss, **kw):
    """The eager vmap run, after checking that the compiled run (no fallback warning) served every step from
    its graph and followed the eager run's chains to float64 rounding."""
    kw = dict(RUN, **kw)
    eager = slt.estimate_llc(model, data, loss, vectorize="vmap", **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vectorize='compile'")
        comp = slt.estimate_llc(model, data, loss, vectorize="compile", **kw)
    assert "; compiled (torch.compile)" in comp.diagnostics["path_reason"]
    assert comp.config["compiled_calls"] > RUN["num_draws"] + RUN["num_burnin"]
    assert torch.allclose(comp.loss_trace, eager.loss_trace, rtol=1e-9, atol=0)
    return eager


@needs_compile
@pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")
def test_a_hugging_face_classifier_compiles_with_fused_activations(monkeypatch):
    """A GPT-2 sequence classifier with a ``pad_token_id``, called without ``attention_mask`` (its ids as
    the one positional argument, whose padding check — a Python bool of the ids — is skipped in batched
    calls): the compiled step runs the forward slt puts in place of GPT-2's ``gelu_new`` (FUSED_FORWARDS),
    as the eager calls do; it ran the module's own.  Here that forward is the exact (erf) GELU, which
    differs from ``gelu_new``'s tanh form by up to ~1e-3, so the compiled run equals the eager run to
    float64 rounding only when both call it."""
    transformers = pytest.importorskip("transformers")
    from slt import evaluator as ev_mod

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)  # test-side only
    model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=16, n_layer=1, n_head=2, num_labels=2, pad_token_id=0,
        attn_implementation="eager")).eval()
    ids = torch.randint(1, 16, (128, 8))
    labels = ids[:, 0] % 2
    monkeypatch.setitem(ev_mod.FUSED_FORWARDS, "transformers.activations.NewGELUActivation",
                        lambda self, x: F.gelu(x))

    def loss(out, y):
        return F.cross_entropy(out.logits, y)

    eager = _compiled_equals_eager(model, (ids, labels), loss, dtype=torch.float64, batch_size=32)
    assert eager.diagnostics["path"] == "vmap"  # the padding check is skipped for positional ids too
    assert not any(vars(mod).keys() & {"forward", "warn_if_padding_and_no_attention_mask"} for mod in model.modules())
