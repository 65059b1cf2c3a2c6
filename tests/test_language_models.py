"""Language models (LM tier): ``slt.losses.causal_lm`` against a hand-computed shifted, masked
cross-entropy, and ``slt.estimate_llc(model, {"input_ids": ..., "attention_mask": ...},
slt.losses.causal_lm)`` on tiny Hugging Face GPT-2, GPT-NeoX (Pythia), GPT-Neo and Llama models and a
TransformerLens model, built from configs (no downloads) and trained briefly with Adam on a
synthetic repeating-pattern task.  Tests that need ``transformers``, ``datasets`` or
``transformer_lens`` are skipped when those are missing (``pip install -e ".[lm]"``)."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt
from slt._runtime import is_batched
from slt.losses import LossAdapter, causal_lm
from slt.target import prepare_target

from conftest import fp_tol

F64 = torch.float64
V, T, N = 16, 12, 96  # vocabulary, sequence length, sequences


@contextlib.contextmanager
def one_thread():
    """Tiny models run 10-20x faster on one thread than on two busy cores (measured on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def pattern_data(seed=0):
    """Sequences repeating a random 3-token pattern; every third sequence right-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (N, 3), generator=g).repeat(1, T // 3)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[::3, -3:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def train_briefly(model, data, steps=60, lr=1e-2, seed=0):
    """Adam on causal_lm; returns (first, last) minibatch losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    with one_thread():
        for _ in range(steps):
            idx = torch.randint(0, N, (32,), generator=g)
            b = {k: v[idx] for k, v in data.items()}
            loss = causal_lm(model(**b), b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses[0], losses[-1]


LLC_KW = dict(num_chains=2, num_draws=20, num_burnin=5, batch_size=16, step_size=1e-5, seed=0, progress=False)


# ----------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------
def _hand_causal_lm(logits, ids, mask):
    """Per-sequence mean over valid positions of -log p(x_{t+1} | x_{<=t}), one term at a time."""
    B, Tn, _ = logits.shape
    out = torch.zeros(B, dtype=logits.dtype)
    for b in range(B):
        tot, count = 0.0, 0
        for t in range(Tn - 1):
            nxt = int(ids[b, t + 1])
            if nxt == -100 or not (mask[b, t] and mask[b, t + 1]):
                continue
            tot += -float(torch.log_softmax(logits[b, t], -1)[nxt])
            count += 1
        out[b] = tot / max(count, 1)
    return out


def test_causal_lm_equals_hand_computed_shifted_masked_cross_entropy():
    g = torch.Generator().manual_seed(0)
    B, Tn, Vn = 5, 7, 6
    logits = 3 * torch.randn(B, Tn, Vn, generator=g, dtype=F64)
    ids = torch.randint(0, Vn, (B, Tn), generator=g)
    mask = torch.ones(B, Tn, dtype=torch.long)
    mask[1, -2:] = 0  # right padding
    mask[2, :3] = 0  # left padding: the first real token is not predicted from a pad
    labels = ids.clone()
    labels[3, 2] = -100  # Hugging Face's ignore index
    mask[4] = 0
    mask[4, 0] = 1  # one real token: no valid position, contributes 0
    ref = _hand_causal_lm(logits, labels, mask)
    # each per-sequence loss: a log-sum-exp over the vocabulary and a mean over ≤ T positions
    tol = fp_tol(F64, scale=float(ref.abs().max()) + float(logits.abs().max()), terms=Tn * Vn)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    per = causal_lm.per_sample(logits, batch)
    torch.testing.assert_close(per, ref, rtol=0, atol=tol)
    assert float(per[4]) == 0.0
    torch.testing.assert_close(causal_lm(logits, batch), ref.mean(), rtol=0, atol=tol)
    # the output forms a model may return, and a tensor target (all positions valid but -100)
    full = _hand_causal_lm(logits, ids, torch.ones_like(mask))
    for out in (logits, {"logits": logits}, (torch.tensor(0.0), logits), type("O", (), {"logits": logits})()):
        torch.testing.assert_close(causal_lm.per_sample(out, ids), full, rtol=0, atol=tol)
    torch.testing.assert_close(causal_lm.per_sample(logits, {"input": ids}), full, rtol=0, atol=tol)
    # leading chain dimension (as the engine calls it) and the adapter's per-chain forms
    adapter = LossAdapter(causal_lm)
    assert adapter.has_native_per_sample
    lc = torch.stack([logits, logits.flip(0)])
    bc = {k: torch.stack([v, v.flip(0)]) for k, v in batch.items()}
    pc = adapter.per_sample(lc, bc, 2)
    torch.testing.assert_close(pc, torch.stack([ref, ref.flip(0)]), rtol=0, atol=tol)
    w = torch.rand(2, B, generator=g, dtype=F64)
    w = w / w.sum(1, keepdim=True)
    torch.testing.assert_close(adapter.chain_loss(lc, bc, w), (pc * w).sum(1))
    with pytest.raises(TypeError, match="token ids must be integers"):
        causal_lm(logits, ids.double())
    with pytest.raises(ValueError, match=r"logits of shape \(5, 7, 6\) do not match token ids of shape \(5, 6\)"):
        causal_lm(logits, ids[:, :-1])
    with pytest.raises(TypeError, match="cannot find logits"):
        causal_lm("text", ids)


@pytest.mark.filterwarnings("ignore:.*the vmap path failed:RuntimeWarning")  # nn.GRU has no vmap rule: a loop
def test_causal_lm_on_a_plain_torch_language_model():
    """No optional packages: an embedding + GRU language model called as model(input_ids=...)."""

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, 8)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.head = nn.Linear(8, V)

        def forward(self, input_ids, attention_mask=None):
            return self.head(self.rnn(self.emb(input_ids))[0])

    torch.manual_seed(0)  # test-side only
    data = pattern_data()
    model = TinyLM()
    first, last = train_briefly(model, data, steps=40)
    assert last < first
    r = slt.estimate_llc(model, data, causal_lm, **LLC_KW)
    assert math.isfinite(r.llc_mean) and r.diagnostics["path"] in ("vmap", "loop")


# ----------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------
def _hf_lm(config: str, model: str, attn: str, **kw):
    """``transformers.<model>(transformers.<config>(vocab V, context T, **kw))`` from a fixed seed."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)  # test-side only
    cfg = getattr(transformers, config)(vocab_size=V, bos_token_id=0, eos_token_id=0, attn_implementation=attn, **kw)
    return getattr(transformers, model)(cfg)


def _gpt2(attn="eager"):
    return _hf_lm("GPT2Config", "GPT2LMHeadModel", attn, n_positions=T, n_embd=32, n_layer=2, n_head=2)


def _neox(attn="eager"):
    return _hf_lm("GPTNeoXConfig", "GPTNeoXForCausalLM", attn, max_position_embeddings=T, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, rotary_pct=0.25)


def _gpt_neo(attn="eager"):
    """GPT-Neo (the TinyStories models' architecture: gelu_new, global and local attention layers)."""
    return _hf_lm("GPTNeoConfig", "GPTNeoForCausalLM", attn, max_position_embeddings=T, hidden_size=32, num_layers=2,
                  num_heads=2, attention_types=[[["global", "local"], 1]], window_size=4, intermediate_size=64)


def _llama(attn="eager"):
    """Llama (RMSNorm, rotary embeddings, SiLU gating, grouped-query attention with 2 K/V heads for 4)."""
    return _hf_lm("LlamaConfig", "LlamaForCausalLM", attn, max_position_embeddings=T, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  pad_token_id=0)


def _mamba(attn="eager"):
    """Mamba (a selective state-space model: no attention; its forward writes a convolution and an SSM cache
    in place unless called with use_cache=False, which slt passes)."""
    return _hf_lm("MambaConfig", "MambaForCausalLM", attn, hidden_size=32, state_size=4, num_hidden_layers=2,
                  expand=2, conv_kernel=4)


def _check_gradient_matches_autograd(model, data):
    """The engine's per-chain gradient (vmap, float64) equals plain autograd of causal_lm on the module."""
    t = prepare_target(model, data, causal_lm, dtype=F64)
    b = {k: v[:8] for k, v in data.items()}
    batch = slt.data.Data(b).full_batch()
    rows = t.w_star.repeat(2, 1)
    rows[1] += 1e-3 * torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(0), dtype=F64)
    loss, grad = t.evaluator.loss_and_grad(rows, batch)
    ref_model = t.model  # the float64 working copy
    for c in range(2):
        params = t.spec.unflatten(rows[c].clone().requires_grad_(True))
        leaves = list(params.values())
        out = torch.func.functional_call(ref_model, params, (), b)
        ref_loss = causal_lm(out, b)
        ref_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref_loss, leaves)])
        # a gradient entry sums over ≤ B·T positions and the network's fan-ins (≤ d terms)
        tol = fp_tol(F64, scale=float(ref_grad.abs().max()) + 1.0, terms=t.d)
        torch.testing.assert_close(grad[c], ref_grad, rtol=0, atol=tol)
        torch.testing.assert_close(loss[c], ref_loss.detach(), rtol=0, atol=tol)


@pytest.mark.parametrize("make", [_gpt2, _neox, _gpt_neo, _llama, _mamba],
                         ids=["gpt2", "gpt-neox", "gpt-neo", "llama", "mamba"])
def test_hugging_face_causal_lm_on_the_batched_path(make):
    data = pattern_data()
    model = make()
    if make is _gpt2:  # built from a config: train mode, dropout 0.1 (GPT-NeoX's defaults are 0)
        with pytest.warns(RuntimeWarning) as rec:
            t = prepare_target(model, data, causal_lm, caller="slt.estimate_llc")
        msgs = [str(w.message) for w in rec]
        assert msgs[0].startswith("slt.estimate_llc: dropout active in transformer.drop, transformer.h.0.attn.attn_dropout")
        assert "call model.eval()" in msgs[0] and "dropout is active: call model.eval()" in msgs[1]
        assert t.path == "loop" and t.issues and t.issues[0].startswith("dropout active")
    model.eval()
    first, last = train_briefly(model, data)
    assert last < 0.8 * first
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback, no train-mode note
        warnings.filterwarnings("ignore", message=".*R-hat")  # 20 draws: not the point here
        warnings.filterwarnings("ignore", message=".*below L\\(w\\*\\)")  # briefly trained: not a minimum
        warnings.filterwarnings("ignore", message=".*explored only")  # 20 draws at a tiny ε: not the point
        r = slt.estimate_llc(model, data, causal_lm, **LLC_KW)
    # vmap ran without a fallback; "auto" then keeps it unless the loop is measured faster
    assert r.diagnostics["path"] in ("vmap", "loop") and "fallback" not in r.diagnostics["path_reason"]
    assert r.diagnostics["path"] == "vmap" or "measured" in r.diagnostics["path_reason"]
    assert math.isfinite(r.llc_mean)
    assert r.loss_trace.shape == (2, 20) and torch.isfinite(r.loss_trace).all()
    for k, v in model.state_dict().items():  # tied embeddings and all weights untouched
        assert torch.equal(v, before[k]), k
    if make is _gpt2:
        assert model.lm_head.weight is model.transformer.wte.weight
    _check_gradient_matches_autograd(model, data)


def test_a_model_whose_loss_differs_without_a_cache_is_noted():
    """Packed sequences (position_ids restarting, no attention mask): transformers 5 isolates the documents
    only when no cache object is built, so slt's use_cache=False call and the model's own call are two
    functions (2.993 against 2.984 untrained), silently.  Now a set-up note; none for ordinary batches."""
    from slt.target import use_cache_note

    model = _llama().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (4, T), generator=g)
    adapter = LossAdapter(slt.losses.model_loss)
    from slt.data import Data

    packed = {"input_ids": ids, "position_ids": torch.cat([torch.arange(3), torch.arange(T - 3)]).repeat(4, 1),
              "labels": ids}
    note = use_cache_note(model, adapter, Data(packed).full_batch())
    assert note is not None and note.startswith("the model's loss differs between slt's call, with use_cache=False")
    plain = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    assert use_cache_note(model, adapter, Data(plain).full_batch()) is None


def test_the_models_own_loss_is_the_default_and_followed_as_it_is():
    """A Hugging Face model called with labels returns its loss (mean over the batch's tokens): with
    loss_fn omitted it is what the chains follow — the same chains as ``lambda out, _: out.loss``.  It
    is one number per batch with no per-sample lift, yet its control variate is a lookup: the shifted
    per-sequence cross-entropy weighted by each sequence's labelled tokens reproduces it at set-up, so
    the run equals the lambda's, whose control variate is a forward pass at w* (a note says so), to
    rounding; L(w*) is the model's own loss, and per-sample methods refuse it by name (before, the lift
    gave every sample the batch's loss)."""
    data = pattern_data()
    model = _gpt2().eval()
    train_briefly(model, data)
    labelled = {**data, "labels": data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)}
    kw = {**LLC_KW, "dtype": F64}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(R-hat|below L)")
        warnings.filterwarnings("error", message=".*forward pass at w")
        own = slt.estimate_llc(model, labelled, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(R-hat|below L)")
        with pytest.warns(RuntimeWarning, match="not the mean of per-sample losses.*forward pass at w"):
            explicit = slt.estimate_llc(model, labelled, lambda out, _: out.loss, **kw)
    assert not any("forward pass at w*" in n for n in own.config["setup_notes"])
    assert any("forward pass at w*" in n for n in explicit.config["setup_notes"])
    torch.testing.assert_close(own.loss_trace, explicit.loss_trace, rtol=0, atol=0)  # the same chains
    # Hugging Face computes its own loss on logits cast to float32 (logits.float()), even in a float64 run
    tol = fp_tol(torch.float32, scale=t_nbeta(own) * 10, terms=T)
    assert own.llc_mean == pytest.approx(explicit.llc_mean, abs=tol)
    t = prepare_target(model, labelled, None, dtype=F64)
    with torch.no_grad():
        ref = model.to(F64)(**labelled).loss
    model.float()
    assert float(t.init_loss[0]) == pytest.approx(float(ref), abs=fp_tol(torch.float32, scale=10 * float(ref), terms=T))
    assert t._star_counts is not None  # weighted by labelled tokens, shifted by one
    assert torch.equal(t._star_counts.long(), (labelled["labels"][:, 1:] != -100).sum(1))
    with pytest.raises(ValueError, match="per-sample loss"):
        t.evaluator.per_sample(t.w_star, {k: v[:4] for k, v in labelled.items()}, {k: v[:4] for k, v in labelled.items()})
    with pytest.raises(ValueError, match="loss_fn is required: the model defines no default_loss and its output"):
        slt.estimate_llc(model, data, **kw)  # no labels: no loss in the output



@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bif_with_the_models_own_loss_uses_its_per_sample_form(attn):
    """``slt.bif(model, batch_with_labels)`` with loss_fn omitted (devinterp's ``model(**batch).loss``):
    each sample's loss is the per-sample form of the model's own loss that the control variate looks
    up — for a causal LM the mean next-token cross-entropy over the sequence's labelled tokens — and
    the result equals passing that loss by hand as ``per_sample_loss`` (same chains).  Before, bif
    refused the model's own loss."""
    data = pattern_data()
    model = _gpt2(attn).eval()
    train_briefly(model, data)
    labelled = {**data, "labels": data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)}
    labelled = {k: v[:24] for k, v in labelled.items()}

    def by_hand(out, batch):  # Hugging Face's shifted cross-entropy, per sequence over its labelled tokens
        labels = batch["labels"][..., 1:]
        nll = F.cross_entropy(out.logits[..., :-1, :].flatten(0, -2), labels.clamp_min(0).flatten(),
                              reduction="none").view(labels.shape)
        counted = (labels != -100).to(nll.dtype)
        return (nll * counted).sum(-1) / counted.sum(-1).clamp_min(1)

    kw = {**LLC_KW, "num_draws": 8, "dtype": F64}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(R-hat|below L|forward pass at w)")
        own = slt.bif(model, labelled, **kw)
        ref = slt.bif(model, labelled, lambda out, _: out.loss, per_sample_loss=by_hand, **kw)
    assert own.values.shape == (24, 24)
    assert "the model's own loss per sample (_own_shifted_ce" in own.config["per_sample_loss"]
    # the same chains; Hugging Face casts its logits to float32 for its own loss (the chains' loss),
    # while both per-sample losses here are float64 of the same logits
    torch.testing.assert_close(own.mean_rows, ref.mean_rows, rtol=0, atol=fp_tol(F64, scale=10, terms=T))
    torch.testing.assert_close(own.values, ref.values, rtol=0,
                               atol=fp_tol(F64, scale=float(ref.values.abs().max()) + 1e-3, terms=T))
    assert bool((own.values.diagonal() < 0).all())  # -Var: a loss varies over the posterior


def test_per_sample_susceptibility_with_the_models_own_loss():
    """The model's own loss is a mean over the batch's labelled tokens: L_n = Σ_i u_i ℓ_i with u_i = (labelled
    tokens of sequence i) / (all of them) and ℓ_i its own per-sample form.  The susceptibilities use those
    weights (scale nβ u_i, as for weighted data) and that L_n (Baker's form then sums to 0 under u); before,
    the model's own loss was refused."""
    data = pattern_data()  # every third sequence right-padded: the counts differ
    model = _gpt2().eval()
    train_briefly(model, data)
    labelled = {**data, "labels": data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)}
    labelled = {k: v[:24] for k, v in labelled.items()}
    obs = {"wpe": lambda p: p["transformer.wpe.weight"].flatten(1).norm(dim=1)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(R-hat|below L|effective sample size|diffuse|rising)")
        res = slt.per_sample_susceptibility(model, labelled, observables=obs, **{**LLC_KW, "num_draws": 10,
                                                                                 "dtype": F64})
    counts = (labelled["labels"][:, 1:] != -100).sum(1).to(F64)
    u = counts / counts.sum()
    assert len(set(counts.tolist())) > 1
    torch.testing.assert_close(res.scale, t_nbeta(res.llc) * u)
    torch.testing.assert_close(u @ res.baker, torch.zeros(2, dtype=F64), rtol=0,
                               atol=fp_tol(F64, scale=float(res.baker.abs().max()) + 1e-12, terms=24))
    assert res.values.shape == (24, 2) and torch.isfinite(res.values).all()
    assert "_own_shifted_ce" in res.config["per_sample_loss"]

@pytest.mark.parametrize("kind", ["masked_lm", "sequence_classification", "regression", "multi_label"])
def test_the_own_loss_of_other_heads_is_looked_up_too(kind):
    """A BERT masked LM (labels unshifted, most -100), a sequence classifier, a regression head
    (num_labels=1) and a multi-label classifier: the model's own loss is reproduced per sample at set-up
    (unshifted token cross-entropy weighted by labelled tokens; per-sample cross-entropy; squared error;
    binary cross-entropy averaged over the labels), so λ̂ equals the forward-pass control variate's to
    rounding, without its note."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)  # test-side only
    cfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=T)
    g = torch.Generator().manual_seed(1)
    data = pattern_data()
    if kind == "masked_lm":
        model = transformers.BertForMaskedLM(transformers.BertConfig(**cfg))
        hidden = torch.rand(N, T, generator=g) < 0.3
        labels = data["input_ids"].masked_fill(~hidden | (data["attention_mask"] == 0), -100)
        data = {**data, "input_ids": data["input_ids"].masked_fill(hidden, 1), "labels": labels}
    elif kind == "sequence_classification":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, **cfg))
        data = {**data, "labels": torch.randint(0, 3, (N,), generator=g)}
    elif kind == "regression":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=1, **cfg))
        data = {**data, "labels": torch.randn(N, generator=g)}
    else:
        model = transformers.BertForSequenceClassification(
            transformers.BertConfig(num_labels=4, problem_type="multi_label_classification", **cfg))
        data = {**data, "labels": (torch.rand(N, 4, generator=g) < 0.4).float()}
    model.eval()
    kw = {**LLC_KW, "dtype": F64, "nbeta": 50.0, "localization": 10.0}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(R-hat|below L|rising|diffus)")
        warnings.filterwarnings("error", message=".*forward pass at w")
        own = slt.estimate_llc(model, data, **kw)
        warnings.filterwarnings("ignore", message=".*forward pass at w")
        explicit = slt.estimate_llc(model, data, lambda out, _: out.loss, **kw)
    torch.testing.assert_close(own.loss_trace, explicit.loss_trace, rtol=0, atol=0)
    # Hugging Face's LM losses cast the logits to float32 (logits.float()), even in a float64 run
    assert own.llc_mean == pytest.approx(explicit.llc_mean, abs=fp_tol(torch.float32, scale=50.0 * 10, terms=T))


def t_nbeta(result):
    return float(result.config["nbeta"])


def _no_traced_masks(monkeypatch):
    """Switch off slt's treatment of Hugging Face's mask branch (as with transformers < 5, whose masks
    it does not reach), so that the eager retry and the fallback are exercised."""
    @contextlib.contextmanager
    def null():
        yield
    monkeypatch.setattr(slt.evaluator, "_hf_masks_as_traced", null)


@pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")
@pytest.mark.parametrize("make", [_gpt2, _neox])
def test_sdpa_attention_runs_batched(make, monkeypatch):
    """Hugging Face's sdpa path branches on the attention mask's values (is there padding?), which vmap
    cannot batch when every chain has its own minibatch.  Under slt's vmap the mask counts as traced, so
    Hugging Face always builds it (the same attention) and the model's own sdpa attention runs batched,
    its config untouched; it equals eager attention to float32 rounding.  Without that (transformers < 5),
    slt retries with the configs switched to eager attention and restores them.  Before either, such a
    model fell back to a loop over chains (1.5-1.8x slower per chain-step on the README's GPT-2,
    measured 2026-12-03)."""
    data = pattern_data()
    sdpa, eager = make(attn="sdpa").eval(), make(attn="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    # (vmap pinned: "auto" picks vmap or the loop by timing them, which a busy machine can tip to the loop —
    # it did once on the 2-core CI for the NeoX; a pinned vmap that cannot run raises instead of falling back)
    kw = {**LLC_KW, "num_draws": 5, "vectorize": "vmap"}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*the vmap path failed")
        r = slt.estimate_llc(sdpa, data, causal_lm, **kw)
    assert r.diagnostics["path"] == "vmap" and "eager" not in r.diagnostics["path_reason"]
    ref = slt.estimate_llc(eager, data, causal_lm, **kw)
    assert torch.allclose(r.loss_trace, ref.loss_trace, rtol=1e-4, atol=0)
    assert sdpa.config._attn_implementation == "sdpa"

    _no_traced_masks(monkeypatch)  # the eager retry
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*the vmap path failed")
        retried = slt.estimate_llc(sdpa, data, causal_lm, **kw)
    assert retried.diagnostics["path"] == "vmap"
    assert "Hugging Face attention 'sdpa' run as 'eager' under vmap" in retried.diagnostics["path_reason"]
    assert torch.equal(retried.loss_trace, ref.loss_trace)  # the same computation
    assert sdpa.config._attn_implementation == "sdpa"  # restored after every call
    # the loop path keeps the model's own sdpa attention: the same values to float32 rounding
    loop = slt.estimate_llc(sdpa, data, causal_lm, **{**kw, "vectorize": "loop"})
    assert torch.allclose(loop.loss_trace, ref.loss_trace, rtol=1e-4, atol=0)


def _bert():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        num_labels=3, max_position_embeddings=T)).eval()


@pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")
def test_an_encoder_with_a_padding_mask_runs_batched():
    """BERT builds a bidirectional mask with a branch on its values in sdpa and eager attention alike;
    under slt's vmap the mask is always built, so it runs batched and equals the loop."""
    model = _bert()
    data = pattern_data()
    labels = data["input_ids"][:, 0] % 3
    loss = lambda out, y: F.cross_entropy(out.logits, y)  # noqa: E731
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*the vmap path failed")
        r = slt.estimate_llc(model, (data, labels), loss, **{**LLC_KW, "num_draws": 5, "vectorize": "vmap"})
    loop = slt.estimate_llc(model, (data, labels), loss, **{**LLC_KW, "num_draws": 5, "vectorize": "loop"})
    assert r.diagnostics["path"] == "vmap"
    assert torch.allclose(r.loss_trace, loop.loss_trace, rtol=1e-4, atol=0)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")
def test_an_encoder_that_branches_on_its_mask_falls_back_and_says_why(monkeypatch):
    _no_traced_masks(monkeypatch)
    model = _bert()
    data = pattern_data()
    labels = data["input_ids"][:, 0] % 3
    with pytest.warns(RuntimeWarning, match=r"data-dependent control flow.*retried with Hugging Face attention "
                                            r"'sdpa' run as 'eager': the model still branches on tensor values.*"
                                            r"falling back to a sequential loop"):
        r = slt.estimate_llc(model, (data, labels), lambda out, y: F.cross_entropy(out.logits, y),
                             **{**LLC_KW, "num_draws": 5})
    assert r.diagnostics["path"] == "loop" and math.isfinite(r.llc_mean)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5: gradient_checkpointing_enable renamed
def test_gradient_checkpointing_falls_back_and_names_the_switch():
    """``gradient_checkpointing_enable()`` (transformers 5) also calls ``enable_input_require_grads()``, whose
    forward hook on the input embeddings calls ``requires_grad_()`` on their output, which fails under vmap
    ("requires_grad_() ... inside of a function being transformed by a functorch transform"); in eval mode
    Hugging Face recomputes nothing.  The loop runs it (same gradients) and the warning names the hook and
    ``disable_input_require_grads()``, which gives the batched path back; it named the checkpointing switch,
    whose disabling left the hook and the loop (helper 38)."""
    model = _gpt2().eval()
    model.gradient_checkpointing_enable()
    data = pattern_data()
    kw = {**LLC_KW, "num_draws": 5}
    with pytest.warns(RuntimeWarning, match=r"enable_input_require_grads\(\) hook is on the input embeddings.*call "
                                            r"model\.disable_input_require_grads\(\) to use the batched path.*falling "
                                            r"back to a sequential loop") as rec:
        r = slt.estimate_llc(model, data, causal_lm, **kw)
    # the switch is read under its current name (transformers 5 warns on is_gradient_checkpointing)
    assert not [w for w in rec if "is_gradient_checkpointing" in str(w.message)]
    assert r.diagnostics["path"] == "loop" and math.isfinite(r.llc_mean)
    assert model.is_gradient_checkpointing  # left as the user set it
    model.disable_input_require_grads()
    again = slt.estimate_llc(model, data, causal_lm, **kw)
    assert again.diagnostics["path"] != "loop"
    assert torch.allclose(again.loss_trace, r.loss_trace, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")
def test_hugging_face_dataset_and_loader_of_dicts():
    datasets = pytest.importorskip("datasets")
    data = pattern_data()
    model = _gpt2().eval()
    ds = datasets.Dataset.from_dict({"input_ids": data["input_ids"].tolist(),
                                     "attention_mask": data["attention_mask"].tolist(), "text": ["..."] * N})
    kw = {**LLC_KW, "num_draws": 5}
    ref = slt.estimate_llc(model, data, causal_lm, **kw)
    r = slt.estimate_llc(model, ds, causal_lm, **kw)  # numeric columns -> tensors; text left out
    assert torch.equal(r.loss_trace, ref.loss_trace)
    loader = torch.utils.data.DataLoader(ds.with_format("torch").select_columns(["input_ids", "attention_mask"]),
                                         batch_size=16)
    r = slt.estimate_llc(model, loader, causal_lm, **kw)
    assert r.diagnostics["path"] == "vmap" and math.isfinite(r.llc_mean)
    assert r.init_loss == pytest.approx(ref.init_loss, rel=1e-5)  # L_n(w*) streamed vs per-sample: float32 sums
    # labels as a separate target (-100 = ignore): the model never sees them
    labels = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    r = slt.estimate_llc(model, ({"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}, labels),
                         causal_lm, **kw)
    assert torch.equal(r.loss_trace, ref.loss_trace)


# ----------------------------------------------------------------------------
# TransformerLens
# ----------------------------------------------------------------------------
def _transformer_lens_model():
    tl = pytest.importorskip("transformer_lens")
    torch.manual_seed(0)  # test-side only
    try:  # TransformerLens < 4
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:  # TransformerLens >= 4: the bridge, around a TL-native model built from a config
        import transformer_lens.model_bridge.sources.native  # noqa: F401 - registers boot_native
        from transformer_lens.config import TransformerBridgeConfig

        cfg = TransformerBridgeConfig(n_layers=2, d_model=32, n_ctx=T, d_head=16, n_heads=2, d_vocab=V,
                                      act_fn="gelu", d_mlp=64, seed=0)
        return tl.TransformerBridge.boot_native(cfg)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=T, d_head=16, n_heads=2, d_vocab=V, act_fn="gelu",
                                  d_mlp=64, seed=0, device="cpu")
    return HookedTransformer(cfg)


@pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")
def test_transformer_lens_model():
    model = _transformer_lens_model().eval()
    ids = pattern_data()["input_ids"]
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with one_thread():
        for _ in range(40):
            b = ids[torch.randint(0, N, (32,), generator=g)]
            loss = causal_lm(model(b), b)
            opt.zero_grad()
            loss.backward()
            opt.step()
    before = {k: v.detach().clone() for k, v in model.named_parameters(remove_duplicate=False)}
    r = slt.estimate_llc(model, ids, causal_lm, **LLC_KW)  # model(tokens) -> logits; the loss gets the tokens
    # vmap ran without a fallback; "auto" keeps it unless the loop is measured faster (on a loaded machine)
    assert "fallback" not in r.diagnostics["path_reason"] and math.isfinite(r.llc_mean)
    assert r.diagnostics["path"] == "vmap" or "measured" in r.diagnostics["path_reason"]
    for k, v in model.named_parameters(remove_duplicate=False):  # every alias of every weight is intact
        assert torch.equal(v.detach(), before[k]), k


def test_an_llc_curve_over_lora_fine_tuning_from_saved_adapters(tmp_path):
    """A PEFT LoRA model (pip install peft): the adapters are the sampled parameters, the frozen base stays
    at w*; the adapters a Trainer saves per checkpoint (``save_pretrained``: ``adapter_model.safetensors``,
    keys without the adapter's name) give the LLC curve, each checkpoint the run of its in-memory state."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                          lora_dropout=0.0, fan_in_fan_out=True))
    data = pattern_data()
    states = []
    for k in range(2):
        train_briefly(model, data, steps=10, seed=k)
        model.save_pretrained(tmp_path / f"checkpoint-{k}")
        states.append({n: v.detach().clone() for n, v in model.state_dict().items() if "lora_" in n})
    model.eval()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(states[0])
    kw = {**LLC_KW, "nbeta": 20.0, "localization": 100.0, "dtype": F64}
    files = slt.estimate_llc(model, data, slt.losses.causal_lm, state_dicts=sorted(tmp_path.glob("checkpoint-*")), **kw)
    memory = slt.estimate_llc(model, data, slt.losses.causal_lm, state_dicts=states, **kw)
    for f, m in zip(files, memory):
        assert torch.equal(f.loss_trace, m.loss_trace)
    assert files[0].config["num_params"] == sum(v.numel() for v in states[0].values())


@pytest.mark.filterwarnings("ignore:.*slt.estimate_llc( \\(checkpoint|\\x3a ):RuntimeWarning")
def test_a_sequence_classifier_without_attention_mask_runs_batched(monkeypatch):
    """A Hugging Face model whose config has a ``pad_token_id``, called without ``attention_mask`` (a GPT-2
    sequence classifier, as a reward model is called), checks ``pad_token_id in input_ids[:, [-1, 0]]`` to
    decide on a one-time warning: a Python bool that vmap refuses when each chain draws its own batch, so
    the model fell back to the loop. slt skips that check in batched calls only; the set-up's plain calls
    still run it, and no module keeps slt's stand-in."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)  # test-side only
    model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=2, num_labels=3, pad_token_id=0,
        attn_implementation="eager")).eval()
    ids = pattern_data()["input_ids"]
    labels = ids[:, 0] % 3
    checked = []
    own = transformers.PreTrainedModel.warn_if_padding_and_no_attention_mask

    def spy(self, input_ids, attention_mask):
        checked.append(is_batched(input_ids))
        return own(self, input_ids, attention_mask)

    monkeypatch.setattr(transformers.PreTrainedModel, "warn_if_padding_and_no_attention_mask", spy)
    kw = {**LLC_KW, "num_draws": 5}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*the vmap path failed")
        r = slt.estimate_llc(model, {"input_ids": ids, "labels": labels}, vectorize="vmap", **kw)
    loop = slt.estimate_llc(model, {"input_ids": ids, "labels": labels}, vectorize="loop", **kw)
    assert r.diagnostics["path"] == "vmap"
    assert torch.allclose(r.loss_trace, loop.loss_trace, rtol=1e-4, atol=0)
    assert checked and not any(checked)  # run in the plain calls, never on a batched tensor
    assert not any("warn_if_padding_and_no_attention_mask" in vars(m) for m in model.modules())


def test_language_model_mistakes_are_named_with_their_fix():
    """Four mistakes on a causal LM whose errors said nothing useful (the probe of 2026-12-07):
    F.cross_entropy on (B, T, V) logits (the hint suggested out.logits, which fails the same way), token ids
    or sequences beyond the embeddings ("index out of range in self"), distributions given as tensors under
    labels (read as columns: "You have to specify either input_ids or inputs_embeds"), an observable
    reading the tied head's name, and a loader padding each batch to its own length (read whole for slt.bif)."""
    model = _gpt2().eval()
    data = pattern_data()
    ids = data["input_ids"]
    kw = {**LLC_KW, "num_draws": 5}
    for loss in (F.cross_entropy, lambda out, y: F.cross_entropy(out.logits, y)):
        with pytest.raises(ValueError, match=r"logits \(2, 12, 16\) of a language model and token ids \(2, 12\): for "
                                             r"the next-token loss pass loss_fn=slt.losses.causal_lm"):
            slt.estimate_llc(model, ({"input_ids": ids}, ids), loss, **kw)
    with pytest.raises(ValueError, match=rf"largest integer input is {V} .*the model's embeddings have {T}, {V} rows "
                                         rf"\(vocab_size = {V}, n_positions = {T}"):
        slt.estimate_llc(model, {"input_ids": ids.clamp(max=V - 1) + 1}, slt.losses.causal_lm, **kw)
    with pytest.raises(ValueError, match=r"'A', 'B' are not parameters of GPT2LMHeadModel.forward.*data-refined.*"
                                         r"\{'A': \(X_A,\), 'B': \(X_B,\)\}"):
        slt.estimate_llc(model, {"A": ids[:6], "B": ids[6:12]}, slt.losses.causal_lm, **kw)
    with pytest.raises(ValueError, match=r"reads params\['lm_head.weight'\], which is tied to 'transformer.wte.weight'"):
        slt.estimate_llc(model, data, slt.losses.causal_lm, observables={"u": lambda p: p["lm_head.weight"][:, 0]},
                         **kw)

    def pad_each(batch):  # every batch padded to its own longest sequence
        L = max(int(m.sum()) for _, m in batch)
        return {"input_ids": torch.stack([i[:L] for i, _ in batch]),
                "attention_mask": torch.stack([m[:L] for _, m in batch])}

    short = data["attention_mask"].clone()
    short[:4, 6:] = 0  # the first batch's sequences end earlier
    rows = list(zip(ids, short))
    loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=pad_each)
    with pytest.raises(ValueError, match=r"batches hold 'input_ids' of different shapes beyond the sample dimension "
                                         r"\(\(6,\) and \(12,\), ...\).*padding='max_length'"):
        slt.bif(model, loader, slt.losses.causal_lm, **kw)


def test_sequences_without_a_next_token_position_are_counted_and_named():
    """All-padding rows add 0 to causal_lm's loss but count in n (8 beside 24 moved L(w*) 0.209 → 0.157
    and nβ 7.6 → 9.2 in the probe), silently; now a warning and a setup note count them."""
    from slt.losses import causal_lm_empty_rows

    data = pattern_data()
    ids, mask = data["input_ids"].clone(), data["attention_mask"].clone()
    mask[:5] = 0  # five rows of padding only
    mask[5, 1:] = 0  # one token: no next-token position either
    assert causal_lm_empty_rows({"input_ids": ids, "attention_mask": mask}) == 6
    assert causal_lm_empty_rows({"labels": torch.full((3, T), -100)}) == 3
    assert causal_lm_empty_rows(data) == 0
    with pytest.warns(RuntimeWarning, match=rf"6 of the {N} sequences have no next-token position.*drop them"):
        r = slt.estimate_llc(_gpt2().eval(), {"input_ids": ids, "attention_mask": mask}, slt.losses.causal_lm,
                             **{**LLC_KW, "num_draws": 3})
    assert any(s.startswith(f"6 of the {N} sequences") for s in r.config["setup_notes"])
