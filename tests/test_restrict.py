"""Weight restrictions (``slt.restrict``): every form of ``restrict_to`` against masks built by hand
from the flat layout, every error, and the architecture helpers — heads checked functionally
(perturbing exactly a head's entries moves that head's output and no other's) on
``nn.MultiheadAttention``, GPT-2, GPT-NeoX, GPT-Neo, Llama (grouped-query), TransformerLens' native ``TransformerBridge`` and a
stand-in with TransformerLens' ``HookedTransformer`` parameter layout (``W_Q`` ... ``(H, E, hd)``;
``HookedTransformer`` itself was removed in TransformerLens 4), and against devinterp's
``create_param_masks`` on GPT-2 and GPT-NeoX."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from slt.params import ParamSpec
from slt.restrict import (Restrictions, attention_and_mlp, embeddings, heads, layers, modules,
                          resolve_restrictions)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------
# forms of restrict_to on a toy model
# ----------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)  # a.weight (2, 3), a.bias (2,)
        self.s = nn.Parameter(torch.zeros(()))  # 0-dim
        self.frozen = nn.Parameter(torch.ones(4), requires_grad=False)
        self.c = nn.Linear(2, 4)  # c.weight (4, 2), c.bias (4,)


def hand(spec: ParamSpec, parts: dict[str, torch.Tensor | bool]) -> torch.Tensor:
    """The flat (d,) mask with ``parts[name]`` (True = whole, or a bool tensor) at that parameter's offset."""
    out = torch.zeros(spec.d, dtype=torch.bool)
    off = 0
    for name, shape, n in zip(spec.names, spec.shapes, spec.numels):
        if name in parts:
            v = parts[name]
            out[off:off + n] = True if v is True else v.reshape(-1)
        off += n
    return out


def entries(shape, index) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m[index] = True
    return m


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = Toy()
    spec = ParamSpec(model)
    assert spec.names == ["s", "a.weight", "a.bias", "c.weight", "c.bias"]  # own parameters first
    return model, spec


def one(r: Restrictions) -> torch.Tensor:
    assert r.labels is None and r.masks.shape[0] == 1 and r.masks.dtype == torch.bool
    return r.masks[0]


def test_glob_and_union(toy):
    model, spec = toy
    assert torch.equal(one(resolve_restrictions("a.*", model, spec)), hand(spec, {"a.weight": True, "a.bias": True}))
    assert torch.equal(one(resolve_restrictions("s", model, spec)), hand(spec, {"s": True}))
    assert torch.equal(one(resolve_restrictions(["a.weight", "c.*"], model, spec)),
                       hand(spec, {"a.weight": True, "c.weight": True, "c.bias": True}))
    assert torch.equal(one(resolve_restrictions(("*.bias",), model, spec)), hand(spec, {"a.bias": True, "c.bias": True}))
    assert torch.equal(one(resolve_restrictions("*", model, spec)), torch.ones(spec.d, dtype=torch.bool))
    assert torch.equal(one(resolve_restrictions(model.c, model, spec)), hand(spec, {"c.weight": True, "c.bias": True}))


def test_callables(toy):
    model, spec = toy
    r = resolve_restrictions(lambda n, p: n.endswith("bias"), model, spec)
    assert torch.equal(one(r), hand(spec, {"a.bias": True, "c.bias": True}))
    r = resolve_restrictions(lambda n, p: (p > 0) if n == "a.weight" else None, model, spec)
    assert torch.equal(one(r), hand(spec, {"a.weight": model.a.weight > 0}))
    r = resolve_restrictions(lambda n, p: slice(1, 3) if n == "c.weight" else False, model, spec)
    assert torch.equal(one(r), hand(spec, {"c.weight": entries((4, 2), slice(1, 3))}))
    r = resolve_restrictions(lambda n, p: (slice(None), slice(0, 1)) if n == "c.weight" else 0 if n == "a.bias" else None,
                             model, spec)
    assert torch.equal(one(r), hand(spec, {"c.weight": entries((4, 2), (slice(None), slice(0, 1))),
                                           "a.bias": entries((2,), 0)}))
    r = resolve_restrictions(lambda n, p: ... if n == "s" else None, model, spec)  # a 0-dim parameter by index
    assert torch.equal(one(r), hand(spec, {"s": True}))


def test_per_parameter_mapping(toy):
    model, spec = toy
    bias_mask = torch.tensor([False, True, True, False])
    r = resolve_restrictions({"a.weight": (slice(None), 1), "c.bias": bias_mask, "s": True, "c.weight": False},
                             model, spec)
    assert torch.equal(one(r), hand(spec, {"a.weight": entries((2, 3), (slice(None), 1)), "c.bias": bias_mask,
                                           "s": True}))
    r = resolve_restrictions({"*.weight": torch.tensor([0]), "a.bias": [1]}, model, spec)  # a glob key; list index
    assert torch.equal(one(r), hand(spec, {"a.weight": entries((2, 3), 0), "c.weight": entries((4, 2), 0),
                                           "a.bias": entries((2,), 1)}))


def test_labelled_mapping_keeps_order(toy):
    model, spec = toy
    r = resolve_restrictions({"z": "c.*", "a": ["a.*"], "m": {"a.weight": 0}, "f": lambda n, p: n == "s",
                              "mod": model.a}, model, spec)
    assert r.labels == ["z", "a", "m", "f", "mod"] and r.masks.shape == (5, spec.d)
    expected = [hand(spec, {"c.weight": True, "c.bias": True}), hand(spec, {"a.weight": True, "a.bias": True}),
                hand(spec, {"a.weight": entries((2, 3), 0)}), hand(spec, {"s": True}),
                hand(spec, {"a.weight": True, "a.bias": True})]
    assert torch.equal(r.masks, torch.stack(expected))


def test_tied_parameter_alias():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    spec = ParamSpec(model)
    assert spec.names == ["emb.weight"]
    assert torch.equal(one(resolve_restrictions("head.weight", model, spec)), torch.ones(15, dtype=torch.bool))


@pytest.mark.parametrize("restrict_to, match", [
    ("x.*", r"'x\.\*' matches no sampled parameter.*sampled parameters \(5\): s, a\.weight"),
    ("frozen", r"matches only frozen parameters \(frozen\)"),
    (["a.*", "c.wieght"], r"'c\.wieght' matches no sampled parameter.*similar names: c\.weight"),
    ({"a.weight": torch.ones(2, 2, dtype=torch.bool)}, r"mask for parameter 'a\.weight' has shape \(2, 2\), expected \(2, 3\)"),
    (lambda n, p: torch.ones(1, dtype=torch.bool) if n != "s" else None, r"mask for parameter 'a\.weight' has shape \(1,\), expected \(2, 3\)"),
    ({"a.bias": 5}, r"index 5 fails on parameter 'a\.bias' of shape \(2,\)"),
    (lambda n, p: (slice(None), 7) if n == "c.weight" else None, r"index .* fails on parameter 'c\.weight' of shape \(4, 2\)"),
    ({"ok": "a.*", "none": lambda n, p: False}, r"restrict_to\['none'\] selects no parameter entries"),
    (lambda n, p: None, r"restrict_to selects no parameter entries"),
    ({"a.weight": slice(0, 0)}, r"selects no parameter entries"),
    ({0: "a.*"}, r"labels must be strings, got 0"),
    ({"l0": "a.*", "a.bias": True}, r"mixes restrictions .* and masks"),
    ({}, r"empty mapping"),
    ([], r"restrict_to is an empty list: nothing to restrict to"),
    ({"heads": []}, r"restrict_to\['heads'\] is an empty list: nothing to restrict to .*'heads' names no parameter"),
    (42, r"cannot use 42"),
    ({"lab": {"inner": "a.*"}}, r"cannot be nested"),
    ({"nothere": True}, r"values are masks: its keys are parameter names or globs\): 'nothere' matches no sampled"),
    (lambda n, p: 1 / 0, r"callable failed on parameter 's': ZeroDivisionError"),
])
def test_errors(toy, restrict_to, match):
    model, spec = toy
    with pytest.raises(ValueError, match=match):
        resolve_restrictions(restrict_to, model, spec)


# ----------------------------------------------------------------------------
# models: small configs, random init
# ----------------------------------------------------------------------------
E, H, HD, B, S = 32, 4, 8, 2, 5


def gpt2(tie=True):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = tf.GPT2Config(vocab_size=16, n_positions=8, n_embd=E, n_layer=2, n_head=H, bos_token_id=0,
                            eos_token_id=0, tie_word_embeddings=tie, attn_implementation="eager")
        return tf.GPT2LMHeadModel(cfg).eval()


def neox():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPTNeoXConfig(vocab_size=16, hidden_size=E, num_attention_heads=H, num_hidden_layers=2,
                           intermediate_size=64, max_position_embeddings=8, attn_implementation="eager")
    return tf.GPTNeoXForCausalLM(cfg).eval()


def bridge(n_kv=None):
    tl = pytest.importorskip("transformer_lens")
    try:
        import transformer_lens.model_bridge.sources.native  # noqa: F401 - registers boot_native
        from transformer_lens.config import TransformerBridgeConfig
    except ImportError:
        pytest.skip("TransformerLens < 4: no native TransformerBridge")
    cfg = TransformerBridgeConfig(n_layers=2, d_model=E, n_ctx=8, d_head=HD, n_heads=H, d_vocab=16, act_fn="gelu",
                                  d_mlp=64, seed=0, n_key_value_heads=n_kv)
    return tl.TransformerBridge.boot_native(cfg).eval()


def gpt_neo():
    """Hugging Face GPT-Neo (the TinyStories models' architecture): separate q/k/v/out projections,
    q/k/v without biases, global and local attention layers."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = tf.GPTNeoConfig(vocab_size=16, max_position_embeddings=8, hidden_size=E, num_layers=2, num_heads=H,
                              attention_types=[[["global", "local"], 1]], window_size=4, intermediate_size=64,
                              bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        return tf.GPTNeoForCausalLM(cfg).eval()


def llama(n_kv=2):
    """Hugging Face Llama: q/k/v/o projections without biases, grouped-query attention (``n_kv`` K/V heads)."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = tf.LlamaConfig(vocab_size=16, max_position_embeddings=8, hidden_size=E, num_hidden_layers=2,
                             num_attention_heads=H, num_key_value_heads=n_kv, intermediate_size=64,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager")
        return tf.LlamaForCausalLM(cfg).eval()


def bert():
    """Hugging Face BERT: q/k/v in ``attention.self``, the output projection in ``attention.output.dense``."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=16, hidden_size=E, num_hidden_layers=2, num_attention_heads=H, intermediate_size=64,
                        max_position_embeddings=8, attn_implementation="eager")
    return tf.BertForSequenceClassification(cfg).eval()


def distilbert():
    """Hugging Face DistilBERT: ``q_lin``/``k_lin``/``v_lin``/``out_lin``."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.DistilBertConfig(vocab_size=16, dim=E, n_layers=2, n_heads=H, hidden_dim=64, max_position_embeddings=8,
                              attn_implementation="eager")
    return tf.DistilBertForSequenceClassification(cfg).eval()


def deberta_v2():
    """Hugging Face DeBERTa-v2 with relative attention: ``query_proj``/``key_proj``/``value_proj`` in
    ``attention.self`` (the relative-position projections shared with them), ``attention.output.dense``."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.DebertaV2Config(vocab_size=16, hidden_size=E, num_hidden_layers=2, num_attention_heads=H,
                             intermediate_size=64, max_position_embeddings=8, relative_attention=True,
                             pos_att_type=["p2c", "c2p"], share_att_key=True, position_buckets=4)
    return tf.DebertaV2ForSequenceClassification(cfg).eval()


class Encoder(nn.Module):
    """Token embedding + nn.TransformerEncoder (nn.MultiheadAttention inside) + an untied lm_head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, E)
        layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.lm_head = nn.Linear(E, 16)

    def forward(self, ids):
        return self.lm_head(self.encoder(self.emb(ids)))


class TLAttention(nn.Module):
    """TransformerLens' (< 4) HookedTransformer attention layout and math: W_Q/W_K/W_V (H, E, hd),
    b_Q/b_K/b_V (H, hd), W_O (H, hd, E), b_O (E,); grouped-query _W_K/_W_V/_b_K/_b_V (H_kv, ...)
    repeat_interleave'd over heads."""

    def __init__(self, n_kv=None):
        super().__init__()
        kv = "" if n_kv is None else "_"
        n_kv = n_kv or H
        self.kv = kv
        self.W_Q = nn.Parameter(torch.randn(H, E, HD) / E ** 0.5)
        self.b_Q = nn.Parameter(torch.randn(H, HD) * 0.1)
        for n in ("W_K", "W_V"):
            setattr(self, kv + n, nn.Parameter(torch.randn(n_kv, E, HD) / E ** 0.5))
        for n in ("b_K", "b_V"):
            setattr(self, kv + n, nn.Parameter(torch.randn(n_kv, HD) * 0.1))
        self.W_O = nn.Parameter(torch.randn(H, HD, E) / HD ** 0.5)
        self.b_O = nn.Parameter(torch.zeros(E))
        self.z = None

    def kv_(self, n):
        t = getattr(self, self.kv + n)
        return t.repeat_interleave(H // t.shape[0], dim=0)

    def out(self, z):
        return torch.einsum("bphd,hdm->bpm", z, self.W_O) + self.b_O

    def forward(self, x):
        q = torch.einsum("bpm,hmd->bphd", x, self.W_Q) + self.b_Q
        k = torch.einsum("bpm,hmd->bphd", x, self.kv_("W_K")) + self.kv_("b_K")
        v = torch.einsum("bpm,hmd->bphd", x, self.kv_("W_V")) + self.kv_("b_V")
        pattern = torch.einsum("bqhd,bkhd->bhqk", q, k).div(HD ** 0.5).softmax(-1)
        self.z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)  # hook_z: (batch, pos, head, d_head)
        return self.out(self.z)


class TLBlock(nn.Module):
    def __init__(self, n_kv):
        super().__init__()
        self.ln1 = nn.LayerNorm(E)
        self.attn = TLAttention(n_kv)
        self.ln2 = nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 64), nn.GELU(), nn.Linear(64, E))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TLEmbed(nn.Module):
    def __init__(self, name, n):
        super().__init__()
        self.register_parameter(name, nn.Parameter(torch.randn(n, E) * 0.1))


class TLUnembed(nn.Module):
    def __init__(self):
        super().__init__()
        self.W_U = nn.Parameter(torch.randn(E, 16) * 0.1)
        self.b_U = nn.Parameter(torch.zeros(16))


class TLModel(nn.Module):
    """The parameter names of a HookedTransformer: embed.W_E, pos_embed.W_pos, blocks.{i}.attn.W_Q, ...,
    unembed.W_U."""

    def __init__(self, n_kv=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.pos_embed = TLEmbed("W_E", 16), TLEmbed("W_pos", 8)
        self.blocks = nn.ModuleList([TLBlock(n_kv) for _ in range(2)])
        self.ln_final = nn.LayerNorm(E)
        self.unembed = TLUnembed()

    def forward(self, ids):
        x = self.embed.W_E[ids] + self.pos_embed.W_pos[: ids.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.ln_final(x) @ self.unembed.W_U + self.unembed.b_U


IDS = torch.randint(0, 16, (B, S), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------
# the functional check: a head's entries move that head and no other
# ----------------------------------------------------------------------------
def set_flat(model, spec, flat):
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in spec.unflatten(flat).items():
            named[n].copy_(t)


def input_hook_runner(model, out_proj: nn.Module, call):
    """Per-head output via the input of the output projection: z (B, S, H, hd) and each head's
    contribution out_proj(z with only that head) - out_proj(0), (H, B, S, E)."""
    def run():
        cap = {}
        handle = out_proj.register_forward_pre_hook(lambda m, args: cap.__setitem__("z", args[0].detach().clone()))
        try:
            with torch.no_grad():
                call()
        finally:
            handle.remove()
        return split(cap["z"], out_proj)
    return run


def split(z_flat, out_proj):
    z = z_flat.reshape(*z_flat.shape[:-1], H, -1)
    with torch.no_grad():
        zero = out_proj(torch.zeros_like(z_flat))
        contrib = []
        for h in range(H):
            zh = torch.zeros_like(z)
            zh[..., h, :] = z[..., h, :]
            contrib.append(out_proj(zh.reshape(z_flat.shape)) - zero)
    return z, torch.stack(contrib)


def mha_runner(mha, q, k, v):
    """nn.MultiheadAttention applies out_proj.weight functionally (no hook fires): z is the output of a
    copy whose out_proj is the identity."""
    def run():
        ident = copy.deepcopy(mha)
        with torch.no_grad():
            ident.out_proj.weight.copy_(torch.eye(E))
            ident.out_proj.bias.zero_()
            z = ident(q, k, v, need_weights=False)[0]
        return split(z, mha.out_proj)
    return run


def check_heads(model, spec, masks, run, groups=None):
    """Perturb exactly the entries of ``masks[h]`` and check that the heads that move are head h (or
    its grouped-query group ``groups[h]``, whose K/V it shares) and no other.  ``masks`` (H, d)."""
    w0 = spec.flatten_module(model).detach().clone()
    z0, c0 = run()
    gen = torch.Generator().manual_seed(1)
    try:
        for h in range(H):
            set_flat(model, spec, w0 + torch.randn(spec.d, generator=gen) * masks[h])
            z1, c1 = run()
            expected = {h} if groups is None else groups[h]
            for g in range(H):
                moved = not (torch.allclose(z1[..., g, :], z0[..., g, :], atol=1e-6)
                             and torch.allclose(c1[g], c0[g], atol=1e-6))
                assert moved == (g in expected), (
                    f"perturbing head {h}'s entries {'moved' if moved else 'did not move'} head {g}")
            assert not torch.allclose(c1[h], c0[h], atol=1e-3)  # head h's own contribution moved
    finally:
        set_flat(model, spec, w0)


def layer_masks(model, spec, layer):
    hs = heads(model)
    labels = [f"l{layer}h{h}" for h in range(H)]
    assert [k for k in hs if k.startswith(f"l{layer}h")] == labels
    return resolve_restrictions({k: hs[k] for k in labels}, model, spec).masks


def check_disjoint_and_sizes(masks, per_head):
    assert masks.sum(1).tolist() == [per_head] * H
    assert int(masks.sum(0).max()) == 1  # pairwise disjoint


FULL = 3 * E * HD + 3 * HD + HD * E  # Q, K, V weights and biases, the output projection's columns


def test_heads_gpt2():
    model = gpt2()
    spec = ParamSpec(model)
    masks = layer_masks(model, spec, 0)
    check_disjoint_and_sizes(masks, FULL)
    attn = model.transformer.h[0].attn
    check_heads(model, spec, masks, input_hook_runner(model, attn.c_proj, lambda: model(IDS)))


def test_a_list_of_helper_restrictions_is_their_union():
    """Two heads as ``[heads["l0h0"], heads["l0h1"]]`` (alone or as one label's restriction) select both
    heads' entries of the fused ``c_attn`` and ``c_proj``.  The list was refused, and inside a labelled
    mapping it read as an index list ("'two' matches no sampled parameter"); ``{**a, **b}``, a user's
    next try, keeps only b's mask of the weights both heads use (helper 38)."""
    model = gpt2()
    spec = ParamSpec(model)
    hs = heads(model)
    h0, h1 = (one(resolve_restrictions(hs[k], model, spec)) for k in ("l0h0", "l0h1"))
    union = one(resolve_restrictions([hs["l0h0"], hs["l0h1"]], model, spec))
    assert torch.equal(union, h0 | h1) and int(union.sum()) == int(h0.sum()) + int(h1.sum())
    both = resolve_restrictions({"two": [hs["l0h0"], hs["l0h1"]], "attn": ["transformer.h.0.attn.*"],
                                 "mixed": (hs["l0h0"], model.transformer.wpe, lambda n, p: n.endswith("ln_f.bias"))},
                                model, spec)
    assert both.labels == ["two", "attn", "mixed"] and torch.equal(both.masks[0], union)
    assert int(both.masks[2].sum()) == int(h0.sum()) + model.transformer.wpe.weight.numel() + E
    assert int(one(resolve_restrictions({**hs["l0h0"], **hs["l0h1"]}, model, spec)).sum()) < int(union.sum())
    # a list of index parts is still a per-parameter mask
    rows = one(resolve_restrictions({"transformer.wpe.weight": [0, 2]}, model, spec))
    assert int(rows.sum()) == 2 * model.transformer.wpe.weight.shape[1]


def test_heads_gpt_neox():
    model = neox()
    spec = ParamSpec(model)
    masks = layer_masks(model, spec, 1)
    check_disjoint_and_sizes(masks, FULL)
    dense = model.gpt_neox.layers[1].attention.dense
    run = input_hook_runner(model, dense, lambda: model(IDS))
    check_heads(model, spec, masks, run)

    # the check can fail: GPT-2's (3, H, hd) layout of the fused rows is wrong for GPT-NeoX
    name = "gpt_neox.layers.1.attention.query_key_value"
    wrong = {f"h{h}": {f"{name}.weight": torch.cat([torch.arange(o + h * HD, o + (h + 1) * HD) for o in (0, E, 2 * E)]),
                       f"{name}.bias": torch.cat([torch.arange(o + h * HD, o + (h + 1) * HD) for o in (0, E, 2 * E)]),
                       "gpt_neox.layers.1.attention.dense.weight": (slice(None), slice(h * HD, (h + 1) * HD))}
             for h in range(H)}
    wrong_masks = resolve_restrictions(wrong, model, spec).masks
    check_disjoint_and_sizes(wrong_masks, FULL)  # the sizes alone cannot tell
    with pytest.raises(AssertionError, match="perturbing head"):
        check_heads(model, spec, wrong_masks, run)


def test_heads_gpt_neo():
    model = gpt_neo()
    spec = ParamSpec(model)
    for layer in (0, 1):  # a global and a local attention layer
        masks = layer_masks(model, spec, layer)
        check_disjoint_and_sizes(masks, 3 * E * HD + HD * E)  # no q/k/v biases
        out = model.transformer.h[layer].attn.attention.out_proj
        check_heads(model, spec, masks, input_hook_runner(model, out, lambda: model(IDS)))


@pytest.mark.parametrize("build, out_proj", [
    (bert, lambda m, layer: m.bert.encoder.layer[layer].attention.output.dense),
    (distilbert, lambda m, layer: m.distilbert.transformer.layer[layer].attention.out_lin),
    (deberta_v2, lambda m, layer: m.deberta.encoder.layer[layer].attention.output.dense),
])
def test_heads_encoders(build, out_proj):
    """BERT's split layout (q/k/v and the output projection in sibling modules), DistilBERT's and DeBERTa's
    names."""
    model = build()
    spec = ParamSpec(model)
    for layer in (0, 1):
        masks = layer_masks(model, spec, layer)
        check_disjoint_and_sizes(masks, FULL)
        check_heads(model, spec, masks, input_hook_runner(model, out_proj(model, layer), lambda: model(IDS)))


def test_heads_llama_grouped_query():
    model = llama(n_kv=2)
    spec = ParamSpec(model)
    masks = layer_masks(model, spec, 1)
    assert masks.sum(1).tolist() == [3 * E * HD + HD * E] * H  # q rows, its group's k and v rows, o columns
    kv_share = 2 * E * HD
    overlap = (masks[0] & masks[1]).sum(), (masks[0] & masks[2]).sum(), (masks[2] & masks[3]).sum()
    assert [int(t) for t in overlap] == [kv_share, 0, kv_share]
    o = model.model.layers[1].self_attn.o_proj
    check_heads(model, spec, masks, input_hook_runner(model, o, lambda: model(IDS)),
                groups=[{0, 1}, {0, 1}, {2, 3}, {2, 3}])


def hf_causal(kind: str):
    """Tiny Hugging Face models whose attention computes q, k and v with one fused nn.Linear, each in its
    own layout: ``(model, output projection of layer l, K/V heads)``."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=16, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfgs = {
        "bloom": lambda: tf.BloomConfig(hidden_size=E, n_head=H, n_layer=2, **common),
        "falcon": lambda: tf.FalconConfig(hidden_size=E, num_attention_heads=H, num_hidden_layers=2,
                                          multi_query=False, **common),
        "falcon_multi_query": lambda: tf.FalconConfig(hidden_size=E, num_attention_heads=H, num_hidden_layers=2,
                                                      multi_query=True, bias=True, **common),
        "falcon_new_architecture": lambda: tf.FalconConfig(hidden_size=E, num_attention_heads=H, num_hidden_layers=2,
                                                           new_decoder_architecture=True, num_kv_heads=2, **common),
        "gpt_bigcode": lambda: tf.GPTBigCodeConfig(n_embd=E, n_head=H, n_layer=2, n_positions=8, multi_query=False,
                                                   **common),
        "gpt_bigcode_multi_query": lambda: tf.GPTBigCodeConfig(n_embd=E, n_head=H, n_layer=2, n_positions=8,
                                                               multi_query=True, **common),
        "phi3": lambda: tf.Phi3Config(hidden_size=E, num_attention_heads=H, num_key_value_heads=2, num_hidden_layers=2,
                                      intermediate_size=64, max_position_embeddings=8, **common),
        "mpt": lambda: tf.MptConfig(d_model=E, n_heads=H, n_layers=2, max_seq_len=8, **common),
        "codegen": lambda: tf.CodeGenConfig(n_embd=E, n_head=H, n_layer=2, rotary_dim=4, n_ctx=8, n_positions=8,
                                            **common),
        "persimmon": lambda: tf.PersimmonConfig(hidden_size=E, num_attention_heads=H, num_hidden_layers=2,
                                                intermediate_size=64, max_position_embeddings=8, **common),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = cfgs[kind]()
        cfg._attn_implementation = "eager"
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    attn = [m for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    out = {"bloom": "dense", "falcon": "dense", "gpt_bigcode": "c_proj", "phi3": "o_proj", "mpt": "out_proj",
           "codegen": "out_proj", "persimmon": "dense"}[kind.split("_multi")[0].split("_new")[0]]
    n_kv = {"falcon_multi_query": 1, "gpt_bigcode_multi_query": 1, "falcon_new_architecture": 2, "phi3": 2}.get(kind, H)
    return model, (lambda layer: getattr(attn[layer], out)), n_kv


FUSED = ["bloom", "falcon", "falcon_multi_query", "falcon_new_architecture", "gpt_bigcode", "gpt_bigcode_multi_query",
         "phi3", "mpt", "codegen", "persimmon"]


def check_grouped_heads(model, spec, masks, run, n_kv):
    """Heads reading shared K/V rows: perturbing head h moves exactly its K/V group; perturbing the entries
    that are head h's alone (its query rows and output columns) moves head h alone."""
    r = H // n_kv
    check_heads(model, spec, masks, run, groups=[set(range(h // r * r, (h // r + 1) * r)) for h in range(H)])
    own = masks & (masks.sum(0, keepdim=True) == 1)
    assert own.sum(1).min() > 0
    check_heads(model, spec, own, run)


@pytest.mark.parametrize("kind", FUSED)
def test_heads_fused_qkv_projections(kind):
    """Every layout of a fused q/k/v projection that Hugging Face uses: each head's rows move that head
    (and the heads sharing its K/V) and no other; together the heads cover every row."""
    model, out_proj, n_kv = hf_causal(kind)
    spec = ParamSpec(model)
    ids = torch.randint(0, 16, (B, S), generator=torch.Generator().manual_seed(0))
    for layer in (0, 1):
        masks = layer_masks(model, spec, layer)
        run = input_hook_runner(model, out_proj(layer), lambda: model(ids))
        check_grouped_heads(model, spec, masks, run, n_kv)
        fused = [p for n, p in model.named_parameters() if f".{layer}." in n and p.shape[0] == (H + 2 * n_kv) * HD
                 and p.dim() == 2]
        assert len(fused) == 1
        rows = spec.unflatten(masks.any(0).float())  # every row of the fused weight belongs to some head
        name = next(n for n, p in model.named_parameters() if p is fused[0])
        assert bool(rows[name].all())


@pytest.mark.parametrize("kind", ["stablelm_qk_layernorm", "cohere_qk_norm"])
def test_heads_own_their_query_and_key_normalizations(kind):
    """Per-head q/k normalizations (StableLM's ``q_layernorm.norms.h``, Cohere's (H, hd) ``q_norm``) scale one
    head's q (one K/V group's k): they belonged to no head, so a head's restriction left part of its own
    computation at w*.  Now each head's mask holds them, and perturbing them moves that head (group) alone."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=16, hidden_size=E, num_attention_heads=H, num_hidden_layers=2, intermediate_size=64,
                  max_position_embeddings=8, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = (tf.StableLmConfig(qk_layernorm=True, num_key_value_heads=H, **common) if kind.startswith("stablelm")
               else tf.CohereConfig(use_qk_norm=True, num_key_value_heads=2, **common))
        cfg._attn_implementation = "eager"
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    n_kv = cfg.num_key_value_heads
    spec = ParamSpec(model)
    ids = torch.randint(0, 16, (B, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # norms initialised at 1 would make a perturbation of them a plain rescaling
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn(p.shape))
    for layer in (0, 1):
        masks = layer_masks(model, spec, layer)
        o = model.model.layers[layer].self_attn.o_proj
        check_grouped_heads(model, spec, masks, input_hook_runner(model, o, lambda: model(ids)), n_kv)
        covered = spec.unflatten(masks.any(0).float())
        norms = [n for n in covered if f"layers.{layer}.self_attn." in n and ("q_" in n or "k_" in n) and "norm" in n]
        assert norms and all(bool(covered[n].all()) for n in norms), norms


def test_attention_and_mlp_puts_gemma2s_norm_of_the_attention_output_with_the_attention():
    """Gemma 2 normalizes the attention's output (``post_attention_layernorm``) before the MLP's own
    ``pre_feedforward_layernorm``; registration order put it in ``mlp``."""
    tf = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = tf.Gemma2Config(vocab_size=16, hidden_size=E, num_attention_heads=H, num_key_value_heads=2, head_dim=HD,
                              num_hidden_layers=1, intermediate_size=64, max_position_embeddings=8, bos_token_id=0,
                              eos_token_id=0, pad_token_id=0)
        model = tf.AutoModelForCausalLM.from_config(cfg)
    parts = attention_and_mlp(model)
    attn = {n.split("layers.0.")[1] for n in parts["l0 attn"]}
    mlp = {n.split("layers.0.")[1] for n in parts["l0 mlp"]}
    assert {"input_layernorm.weight", "post_attention_layernorm.weight"} <= attn
    assert {"pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"} <= mlp
    assert not attn & mlp and not any("norm" in n for n in attn - {"input_layernorm.weight",
                                                                    "post_attention_layernorm.weight"})


class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: c_attn (E, 3E) split into q, k, v blocks; c_proj."""

    def __init__(self, per_head=False):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head, self.per_head = nn.Linear(E, 3 * E), nn.Linear(E, E), H, per_head

    def forward(self, x):
        b, t, _ = x.shape
        if self.per_head:  # GPT-NeoX's order: (..., H, 3 hd)
            q, k, v = self.c_attn(x).view(b, t, H, 3 * HD).transpose(1, 2).split(HD, dim=-1)
        else:
            q, k, v = (z.view(b, t, H, HD).transpose(1, 2) for z in self.c_attn(x).split(E, dim=2))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, E))


class AttentionLM(nn.Module):
    """A token embedding, two residual attention layers built by ``attention()`` and an output head: the
    frame of the hand-written models below (``heads`` reads only their attention modules)."""

    def __init__(self, attention):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, E)
        self.layers = nn.ModuleList([attention() for _ in range(2)])
        self.head = nn.Linear(E, 16)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


@pytest.mark.parametrize("per_head", [False, True])
def test_heads_of_a_users_fused_projection_need_its_layout(per_head):
    model = AttentionLM(lambda: NanoGPTAttention(per_head))
    spec = ParamSpec(model)
    with pytest.raises(ValueError, match=r"attention module 'layers\.0' .*projection 'c_attn'.*qkv_layout='blocks'.*"
                                         r"qkv_layout='per_head'"):
        heads(model)
    assert list(layers(model)) == ["l0", "l1"]  # the blocks are found without the layout
    with pytest.raises(ValueError, match="qkv_layout must be one of"):
        heads(model, qkv_layout="interleaved")
    right, wrong = ("per_head", "blocks") if per_head else ("blocks", "per_head")
    run = input_hook_runner(model, model.layers[1].c_proj, lambda: model(IDS))
    hs = heads(model, qkv_layout=right)
    masks = resolve_restrictions({f"l1h{h}": hs[f"l1h{h}"] for h in range(H)}, model, spec).masks
    check_disjoint_and_sizes(masks, FULL)
    check_heads(model, spec, masks, run)
    hs = heads(model, qkv_layout=wrong)  # the check can fail: the other layout moves other heads
    masks = resolve_restrictions({f"l1h{h}": hs[f"l1h{h}"] for h in range(H)}, model, spec).masks
    with pytest.raises(AssertionError, match="perturbing head"):
        check_heads(model, spec, masks, run)


class LlamaStyleAttention(nn.Module):
    """Hand-written Llama attention with grouped queries (2 K/V heads): gpt-fast's fused ``wqkv`` split as
    [q | k | v] (``n_local_heads`` K/V heads), or Meta's reference ``wq``/``wk``/``wv``; ``wo``."""

    def __init__(self, fused):
        super().__init__()
        self.fused, self.n_head, self.head_dim = fused, H, HD
        if fused:
            self.wqkv, self.n_local_heads = nn.Linear(E, (H + 4) * HD, bias=False), 2
        else:
            self.wq, self.n_kv_heads = nn.Linear(E, H * HD, bias=False), 2
            self.wk, self.wv = nn.Linear(E, 2 * HD, bias=False), nn.Linear(E, 2 * HD, bias=False)
        self.wo = nn.Linear(H * HD, E, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (self.wqkv(x).split([H * HD, 2 * HD, 2 * HD], -1) if self.fused
                   else (self.wq(x), self.wk(x), self.wv(x)))
        q = q.view(b, t, H, HD).transpose(1, 2)
        k, v = (z.view(b, t, 2, HD).transpose(1, 2).repeat_interleave(H // 2, 1) for z in (k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, H * HD))


@pytest.mark.parametrize("fused", [True, False])
def test_heads_of_hand_written_llama_attention(fused):
    model = AttentionLM(lambda: LlamaStyleAttention(fused))
    spec = ParamSpec(model)
    hs = heads(model, qkv_layout="blocks" if fused else None)
    masks = resolve_restrictions({f"l1h{h}": hs[f"l1h{h}"] for h in range(H)}, model, spec).masks
    assert masks.sum(1).tolist() == [3 * E * HD + HD * E] * H  # q rows, its group's k and v rows, wo columns
    run = input_hook_runner(model, model.layers[1].wo, lambda: model(IDS))
    check_grouped_heads(model, spec, masks, run, n_kv=2)


def test_heads_multihead_attention():
    model = Encoder()
    spec = ParamSpec(model)
    masks = layer_masks(model, spec, 1)
    check_disjoint_and_sizes(masks, FULL)
    mha = model.encoder.layers[1].self_attn
    x = torch.randn(B, S, E, generator=torch.Generator().manual_seed(2))
    check_heads(model, spec, masks, mha_runner(mha, x, x, x))


def test_heads_multihead_attention_separate_projections():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, kdim=24, vdim=20, add_bias_kv=True, batch_first=True)
    assert not mha._qkv_same_embed_dim
    spec = ParamSpec(mha)
    masks = layer_masks(mha, spec, 0)  # a lone attention module: layer 0
    check_disjoint_and_sizes(masks, HD * (E + 24 + 20) + 3 * HD + 2 * HD + HD * E)  # + bias_k, bias_v entries
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(B, S, E, generator=g), torch.randn(B, S, 24, generator=g), torch.randn(B, S, 20, generator=g)
    check_heads(mha, spec, masks, mha_runner(mha, q, k, v))


def test_heads_transformer_bridge():
    model = bridge()
    spec = ParamSpec(model)
    masks = layer_masks(model, spec, 0)
    check_disjoint_and_sizes(masks, FULL)
    o = model.blocks[0]._original_component.attn._original_component.o._original_component
    check_heads(model, spec, masks, input_hook_runner(model, o, lambda: model(IDS)))


def test_heads_transformer_bridge_grouped_query():
    model = bridge(n_kv=2)
    spec = ParamSpec(model)
    masks = layer_masks(model, spec, 1)
    kv_share = 2 * (E * HD + HD)  # the K and V rows (and biases) of the group
    assert masks.sum(1).tolist() == [FULL] * H
    overlap = (masks[0] & masks[1]).sum(), (masks[0] & masks[2]).sum(), (masks[2] & masks[3]).sum()
    assert [int(t) for t in overlap] == [kv_share, 0, kv_share]
    o = model.blocks[1]._original_component.attn._original_component.o._original_component
    check_heads(model, spec, masks, input_hook_runner(model, o, lambda: model(IDS)),
                groups=[{0, 1}, {0, 1}, {2, 3}, {2, 3}])


@pytest.mark.parametrize("n_kv", [None, 2])
def test_heads_hooked_transformer_layout(n_kv):
    model = TLModel(n_kv)
    spec = ParamSpec(model)
    masks = layer_masks(model, spec, 0)
    attn = model.blocks[0].attn

    def run():
        with torch.no_grad():
            model(IDS)
            return split(attn.z.reshape(B, S, -1), lambda zf: attn.out(zf.reshape(B, S, H, HD)))

    if n_kv is None:
        check_disjoint_and_sizes(masks, FULL)
        check_heads(model, spec, masks, run)
    else:
        assert masks.sum(1).tolist() == [FULL] * H
        check_heads(model, spec, masks, run, groups=[{0, 1}, {0, 1}, {2, 3}, {2, 3}])


def test_heads_hooked_transformer():
    """The real HookedTransformer (TransformerLens < 4), per-head output from hook_z."""
    pytest.importorskip("transformer_lens")
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip("TransformerLens >= 4 has no HookedTransformer (its layout is tested on TLModel)")
    cfg = HookedTransformerConfig(n_layers=2, d_model=E, n_ctx=8, d_head=HD, n_heads=H, d_vocab=16, act_fn="gelu",
                                  d_mlp=64, seed=0, device="cpu")
    model = HookedTransformer(cfg).eval()
    spec = ParamSpec(model)
    masks = layer_masks(model, spec, 0)
    check_disjoint_and_sizes(masks, FULL)
    attn = model.blocks[0].attn

    def run():
        cap = {}
        with torch.no_grad():
            model.run_with_hooks(IDS, fwd_hooks=[("blocks.0.attn.hook_z",
                                                  lambda z, hook: cap.__setitem__("z", z.detach().clone()))])
            return split(cap["z"].reshape(B, S, -1),
                         lambda zf: torch.einsum("bphd,hdm->bpm", zf.reshape(B, S, H, HD), attn.W_O))

    check_heads(model, spec, masks, run)


def test_heads_of_frozen_attention_name_the_cause():
    """Adapters (PEFT/LoRA) train beside frozen attention weights: no head has a sampled entry, and heads
    says why instead of returning restrictions that select nothing."""
    model = Encoder()
    for layer in model.encoder.layers:
        layer.self_attn.requires_grad_(False)
    with pytest.raises(ValueError, match=r"attention weights of Encoder are frozen.*only trainable parameters are "
                                         r"sampled \(\d+: emb\.weight, .*slt\.restrict\.modules\(model\)"):
        heads(model)
    model.encoder.layers[1].self_attn.requires_grad_(True)  # one layer sampled: its heads
    hs = heads(model)
    assert all(hs[f"l1h{h}"] for h in range(H)) and not any(hs[f"l0h{h}"] for h in range(H))
    with pytest.raises(ValueError, match=r"restrict_to\['l0h0'\] selects no parameter entries.*frozen: leave that "
                                         r"label out"):
        resolve_restrictions(hs, model, ParamSpec(model))


def test_heads_unknown_architecture():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"found no attention module in Sequential: looked for torch\.nn\.MultiheadAttention.*by hand"):
        heads(model)
    assert layers(model) == modules(model)  # no attention: one restriction per module with parameters


def test_modules_split_any_network_into_disjoint_layers():
    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))  # registered by the root: its own restriction
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.fc = nn.Linear(4, 2)
            self.head = self.fc  # tied: belongs to the first module that registers it
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    model = CNN()
    got = modules(model)
    assert got == {"scale": {"scale": True},
                   "features.0": {"features.0.weight": True, "features.0.bias": True},
                   "features.1": {"features.1.weight": True, "features.1.bias": True},
                   "fc": {"fc.weight": True, "fc.bias": True}}
    assert layers(model) == got
    spec = ParamSpec(model)
    r = resolve_restrictions(got, model, spec)
    assert int(r.masks.sum(0).max()) == 1 and int(r.masks.sum()) == spec.d  # disjoint, covering every sampled one
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    assert list(modules(mlp)) == ["1", "3"]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        modules(frozen)


def test_a_parametrized_weight_belongs_to_its_module():
    """``weight_norm``/``orthogonal`` (torch.nn.utils.parametrize) keep a layer's weight in
    ``<layer>.parametrizations.weight.original*``: that is the layer's, not a layer of its own (it was
    ``{"0": bias, "0.parametrizations.weight": g and v}``); a parametrized tensor of the root is named."""
    from torch.nn.utils import parametrizations, parametrize

    mlp = nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(),
                        parametrizations.orthogonal(nn.Linear(4, 4)), nn.Linear(4, 2))
    got = modules(mlp)
    assert got == {"0": {"0.bias": True, "0.parametrizations.weight.original0": True,
                         "0.parametrizations.weight.original1": True},
                   "2": {"2.bias": True, "2.parametrizations.weight.original": True},
                   "3": {"3.weight": True, "3.bias": True}}
    assert layers(mlp) == got

    class Triu(nn.Module):
        def forward(self, w):
            return w.triu()

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.zeros(2))

    root = Root()
    parametrize.register_parametrization(root, "w", Triu())
    assert modules(root) == {"b": {"b": True}, "w": {"parametrizations.w.original": True}}
    # the parametrized tensor's own name is not a parameter: the error names the ones it is computed from
    with pytest.raises(ValueError, match=r"'0.weight' is parametrized.*0.parametrizations.weight.original0, "
                                         r"0.parametrizations.weight.original1.*or to the module"):
        resolve_restrictions("0.weight", mlp, ParamSpec(mlp))


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_helpers_and_globs_on_a_wrapped_model(wrap):
    """slt runs the model inside a torch.compile / DataParallel wrapper, so the helpers label its names
    (they gave "_orig_mod.0", which the run then refused), and a glob written with the wrapper's prefix,
    as the wrapper's named_parameters() shows it, says to drop the prefix."""
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    wrapped = wrap(mlp)
    assert modules(wrapped) == modules(mlp) and layers(wrapped) == layers(mlp) and list(modules(mlp)) == ["0", "2"]
    prefix = next(n for n, _ in wrapped.named_parameters()).split(".")[0] + "."
    with pytest.raises(ValueError, match=rf"whose names have no '{prefix}' prefix: write '0\.\*'"):
        resolve_restrictions(prefix + "0.*", mlp, ParamSpec(mlp))


def test_attention_outside_a_list_of_blocks_names_the_per_module_helper():
    class OneLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.out = nn.MultiheadAttention(E, H, batch_first=True), nn.Linear(E, 2)

    with pytest.raises(ValueError, match=r"not inside a ModuleList of blocks.*slt\.restrict\.modules\(model\)"):
        layers(OneLayer())
    assert list(modules(OneLayer())) == ["attn", "attn.out_proj", "out"]


# ----------------------------------------------------------------------------
# encoder-decoder models: one stack of blocks each, a decoder block with two attention modules
# ----------------------------------------------------------------------------
def t5():
    """Hugging Face T5: encoder.block / decoder.block, each block's sublayers in a ModuleList of their own
    (T5LayerSelfAttention, T5LayerCrossAttention, T5LayerFF), q/k/v/o without biases, a per-head relative
    position bias in the first block of each stack."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=16, d_model=E, d_kv=HD, d_ff=64, num_layers=2, num_heads=H, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, attn_implementation="eager")
    return tf.T5ForConditionalGeneration(cfg).eval()


def bart():
    """Hugging Face BART: model.encoder.layers / model.decoder.layers, self_attn and encoder_attn."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BartConfig(vocab_size=16, d_model=E, encoder_layers=2, decoder_layers=2, encoder_attention_heads=H,
                        decoder_attention_heads=H, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=8,
                        dropout=0.0, attention_dropout=0.0, attn_implementation="eager")
    return tf.BartForConditionalGeneration(cfg).eval()


class Seq2Seq(nn.Module):
    """nn.Transformer: encoder.layers / decoder.layers, a decoder layer's self_attn and multihead_attn."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, E)
        self.transformer = nn.Transformer(E, H, 2, 2, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 16)

    def forward(self, ids):
        return self.head(self.transformer(self.emb(ids), self.emb(ids)))


SEQ2SEQ = {"t5": (t5, ("SelfAttention", "EncDecAttention")), "bart": (bart, ("self_attn", "encoder_attn")),
           "torch": (Seq2Seq, ("self_attn", "multihead_attn"))}


@pytest.mark.parametrize("name", list(SEQ2SEQ))
def test_encoder_decoder_stacks_are_labelled_and_partitioned(name):
    build, (self_, cross) = SEQ2SEQ[name]
    model = build()
    spec = ParamSpec(model)
    L = resolve_restrictions(layers(model), model, spec)
    A = resolve_restrictions(attention_and_mlp(model), model, spec)
    Hs = resolve_restrictions(heads(model), model, spec)
    blocks = [f"{s} l{i}" for s in ("encoder", "decoder") for i in range(2)]
    assert L.labels == blocks
    assert A.labels == [f"{b} {part}" for b in blocks for part in ("attn", "mlp")]
    assert Hs.labels == ([f"encoder l{i}h{h}" for i in range(2) for h in range(H)]
                         + [f"decoder l{i} {a} h{h}" for i in range(2) for a in (self_, cross) for h in range(H)])
    assert int(L.masks.sum(0).max()) == 1
    for j in range(4):
        attn, mlp = A.masks[2 * j], A.masks[2 * j + 1]
        assert torch.equal(attn | mlp, L.masks[j]) and not (attn & mlp).any()
        k = 1 if j < 2 else 2  # attention modules in the block
        first = H * (j if j < 2 else 2 + 2 * (j - 2))
        hm = Hs.masks[first:first + k * H]
        assert int(hm.sum(0).max()) == 1  # the block's heads (self and cross) are disjoint
        assert torch.equal(hm.any(0) & attn, hm.any(0))  # and lie in its attention part
    # a decoder block's attention part holds both attention modules and both of their norms; its MLP part
    # the feed-forward and its norm
    names = attention_and_mlp(model)["decoder l1 attn"]
    assert any(self_ in n for n in names) and any(cross in n for n in names)
    norms = [n for n in names if "norm" in n and n.endswith("weight")]
    assert len(norms) == 2, norms


def masks_of(model, spec, labels):
    return resolve_restrictions({k: heads(model)[k] for k in labels}, model, spec).masks


def test_heads_t5_cross_attention_and_relative_position_bias():
    model = t5()
    spec = ParamSpec(model)
    call = lambda: model(input_ids=IDS, decoder_input_ids=IDS)  # noqa: E731
    # block 0 of the encoder: q, k, v rows, o columns and the relative position bias's column h
    masks = masks_of(model, spec, [f"encoder l0h{h}" for h in range(H)])
    buckets = model.config.relative_attention_num_buckets
    check_disjoint_and_sizes(masks, 3 * E * HD + HD * E + buckets)
    o = model.encoder.block[0].layer[0].SelfAttention.o
    check_heads(model, spec, masks, input_hook_runner(model, o, call))
    masks = masks_of(model, spec, [f"decoder l1 EncDecAttention h{h}" for h in range(H)])
    check_disjoint_and_sizes(masks, 3 * E * HD + HD * E)
    o = model.decoder.block[1].layer[1].EncDecAttention.o
    check_heads(model, spec, masks, input_hook_runner(model, o, call))


def test_heads_swin_stages_and_relative_position_bias_table():
    """Swin keeps its blocks in a list per stage (labels "layers.1 l0h1") and a learned bias table
    ((2w−1)², H) in every block: column h moves head h's attention pattern, and only head h's."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.SwinConfig(image_size=16, patch_size=2, embed_dim=E, depths=[1, 2], num_heads=[H, H], window_size=2,
                        num_labels=3)
    model = tf.SwinForImageClassification(cfg).eval()
    spec = ParamSpec(model)
    hs = heads(model)
    assert list(hs) == [f"layers.{s} l{b}h{h}" for s, blocks in ((0, 1), (1, 2)) for b in range(blocks)
                        for h in range(H)]
    assert list(layers(model)) == ["layers.0 l0", "layers.1 l0", "layers.1 l1"]
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    masks = masks_of(model, spec, [f"layers.1 l1h{h}" for h in range(H)])
    E1, HD1 = 2 * E, 2 * E // H  # stage 1 runs at twice the width (patch merging)
    check_disjoint_and_sizes(masks, 3 * E1 * HD1 + 3 * HD1 + HD1 * E1 + (2 * 2 - 1) ** 2)
    attn = model.swin.encoder.layers[1].blocks[1].attention
    run = input_hook_runner(model, attn.o_proj, lambda: model(pixel_values=px))
    check_heads(model, spec, masks, run)
    table = "swin.encoder.layers.1.blocks.1.attention.relative_position_bias.relative_position_bias_table"
    assert all(hs[f"layers.1 l1h{h}"][table] == (slice(None), h) for h in range(H))
    columns = resolve_restrictions({f"c{h}": {table: (slice(None), h)} for h in range(H)}, model, spec).masks
    check_heads(model, spec, columns, run)  # the bias column alone moves its head alone


def test_heads_torch_transformer_cross_attention():
    model = Seq2Seq()
    spec = ParamSpec(model)
    masks = masks_of(model, spec, [f"decoder l1 multihead_attn h{h}" for h in range(H)])
    check_disjoint_and_sizes(masks, FULL)
    mha = model.transformer.decoder.layers[1].multihead_attn
    g = torch.Generator().manual_seed(2)
    x, mem = torch.randn(B, S, E, generator=g), torch.randn(B, S + 1, E, generator=g)
    check_heads(model, spec, masks, mha_runner(mha, x, mem, mem))


class Stacked(nn.Module):
    """No attention: two residual blocks (conv + norm) in a ModuleList, a list of single layers, a head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.LayerNorm(5)) for _ in range(2)])
        self.extra = nn.ModuleList([nn.Linear(5, 5) for _ in range(2)])
        self.head = nn.Linear(5, 2)


def test_layers_of_a_model_without_attention_are_its_blocks_when_it_has_them():
    model = Stacked()
    spec = ParamSpec(model)
    got = layers(model)
    assert list(got) == ["l0", "l1"]  # the list of composite blocks; single layers and the head are no blocks
    assert got["l0"] == {"blocks.0.0.weight": True, "blocks.0.0.bias": True, "blocks.0.1.weight": True,
                         "blocks.0.1.bias": True}
    assert int(resolve_restrictions(got, model, spec).masks.sum(0).max()) == 1
    mamba = pytest.importorskip("transformers").MambaForCausalLM(pytest.importorskip("transformers").MambaConfig(
        vocab_size=16, hidden_size=E, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4))
    named = layers(mamba)
    assert list(named) == ["l0", "l1"]
    assert all(n.startswith("backbone.layers.1.") for n in named["l1"]) and len(named["l1"]) == len(named["l0"])


# ----------------------------------------------------------------------------
# layers, attention_and_mlp, embeddings
# ----------------------------------------------------------------------------
MODELS = {"gpt2": gpt2, "neox": neox, "gpt-neo": gpt_neo, "llama": llama, "encoder": Encoder, "bridge": bridge,
          "tl": TLModel}


@pytest.mark.parametrize("name", list(MODELS))
def test_layers_attention_and_mlp(name):
    model = MODELS[name]()
    spec = ParamSpec(model)
    L = resolve_restrictions(layers(model), model, spec)
    A = resolve_restrictions(attention_and_mlp(model), model, spec)
    Hs = resolve_restrictions(heads(model), model, spec)
    assert L.labels == ["l0", "l1"]
    assert A.labels == ["l0 attn", "l0 mlp", "l1 attn", "l1 mlp"]
    assert Hs.labels == [f"l{i}h{h}" for i in range(2) for h in range(H)]
    assert int(L.masks.sum(0).max()) == 1  # layers are disjoint
    for i in range(2):
        attn, mlp = A.masks[2 * i], A.masks[2 * i + 1]
        assert torch.equal(attn | mlp, L.masks[i]) and not (attn & mlp).any()
        head_union = Hs.masks[i * H:(i + 1) * H].any(0)
        assert torch.equal(head_union & attn, head_union)  # the heads lie in the attention part
    # the attention part is the attention module and its layer norm; every block parameter is in its layer
    attn_names = {n for n in attention_and_mlp(model)["l0 attn"]}
    assert any("attn" in n or "attention" in n for n in attn_names)
    assert any(s in n for n in attn_names for s in ("ln_1", "input_layernorm", "norm1", "ln1"))
    assert not any(s in n for n in attn_names for s in ("ln_2", "post_attention_layernorm", "norm2", "ln2", "mlp"))


def test_embeddings():
    assert embeddings(gpt2()) == {"embed": {"transformer.wte.weight": True, "transformer.wpe.weight": True}}
    assert embeddings(gpt2(tie=False)) == {"embed": {"transformer.wte.weight": True, "transformer.wpe.weight": True},
                                           "unembed": {"lm_head.weight": True}}
    assert embeddings(neox()) == {"embed": {"gpt_neox.embed_in.weight": True}, "unembed": {"lm_head.weight": True}}
    assert embeddings(Encoder()) == {"embed": {"emb.weight": True},
                                     "unembed": {"lm_head.weight": True, "lm_head.bias": True}}
    assert embeddings(TLModel()) == {"embed": {"embed.W_E": True, "pos_embed.W_pos": True},
                                     "unembed": {"unembed.W_U": True, "unembed.b_U": True}}
    model = bridge()
    emb = embeddings(model)
    named = dict(model.named_parameters())
    assert list(emb) == ["embed", "unembed"]
    assert [tuple(named[n].shape) for n in emb["embed"]] == [(16, E), (8, E)]
    assert [tuple(named[n].shape) for n in emb["unembed"]] == [(16, E)]
    # usable as restrict_to, with the labels in order
    r = resolve_restrictions(emb, model, ParamSpec(model))
    assert r.labels == ["embed", "unembed"] and r.masks.sum(1).tolist() == [16 * E + 8 * E, 16 * E]


def test_helpers_skip_frozen_parameters():
    model = gpt2()
    model.transformer.h[0].attn.c_proj.weight.requires_grad_(False)
    hs = heads(model)
    assert "transformer.h.0.attn.c_proj.weight" not in hs["l0h0"]
    assert "transformer.h.1.attn.c_proj.weight" in hs["l1h0"]
    assert "transformer.h.0.attn.c_proj.weight" not in layers(model)["l0"]
    spec = ParamSpec(model)
    assert resolve_restrictions(hs, model, spec).masks.sum(1)[0] == FULL - HD * E
    # a frozen block keeps its labels, empty, in every helper (a run names them)
    model.transformer.h[0].requires_grad_(False)
    am = attention_and_mlp(model)
    assert "l0 attn" in am and "l0 mlp" in am and not am["l0 attn"] and not am["l0 mlp"] and am["l1 mlp"]
    assert not any(heads(model)[f"l0h{h}"] for h in range(4)) and not layers(model)["l0"]


# ----------------------------------------------------------------------------
# devinterp 2.0.1's create_param_masks
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("build", [gpt2, neox])
def test_heads_match_devinterp(build):
    pytest.importorskip("devinterp")
    from devinterp.slt.weight_restrictions import create_param_masks

    model = build()
    spec = ParamSpec(model)
    mine = resolve_restrictions(heads(model), model, spec)
    named = dict(model.named_parameters())
    for label, row in zip(mine.labels, mine.masks):
        theirs = create_param_masks(model, label)  # {name: bool mask broadcast to the parameter, or None = all}
        full = {n: (torch.ones_like(named[n], dtype=torch.bool) if m is None else m.expand_as(named[n]))
                for n, m in theirs.items()}
        per_param = {n: m for n, m in spec.unflatten(row).items() if m.any()}
        assert set(per_param) == set(full), label
        for n in full:
            assert torch.equal(per_param[n], full[n]), (label, n)
    for i in range(2):  # a whole layer
        theirs = set(create_param_masks(model, f"l{i}"))
        assert set(layers(model)[f"l{i}"]) == theirs


def test_user_written_attention_and_masks_are_not_misread():
    """Found running restrictions on users' own models:
    * an integer 0/1 tensor shaped like the parameter (``(p.abs() > t).long()``) was read as an index and selected
      rows 0 and 1 whole: now an error asking for a bool mask or an index;
    * ``W_Q``/``W_O`` in an einsum layout ``(d_model, H, d_head)`` were read as TransformerLens' ``(H, d_model,
      d_head)`` and gave d_model "heads", each changing every real head: now not taken for heads;
    * a one-block model whose block holds a list of per-head modules: ``layers`` took the heads for the layers
      and left the block's output projection out: now one layer, ``l0``, with all of the block;
    * ``print(result)`` names the result's restriction and distribution."""
    sel = torch.zeros(4, 3, dtype=torch.bool)
    sel[2, 1] = sel[3, 0] = True
    lin = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"integer tensor .* only 0s and 1s.*mask.bool\(\)"):
        resolve_restrictions({"0.weight": sel.long()}, lin, ParamSpec(lin))
    _, bool_mask = resolve_restrictions({"0.weight": sel}, lin, ParamSpec(lin))
    assert int(bool_mask.sum()) == 2
    E, H, hd = 8, 2, 4

    class Einsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.W_Q, self.W_K, self.W_V, self.W_O = (nn.Parameter(torch.randn(E, H, hd)) for _ in range(4))

        def forward(self, x):
            return torch.einsum("btd,dhe,dhe->btd", x, self.W_Q, self.W_O)

    with pytest.raises(ValueError, match="found no attention module"):
        heads(nn.Sequential(Einsum()))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(E, hd), nn.Linear(E, hd)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([Head() for _ in range(H)])
            self.o = nn.Linear(H * hd, E)

    class OneBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block()])
            self.out = nn.Linear(E, 2)

    model = OneBlock()
    spec = ParamSpec(model)
    labels, masks = resolve_restrictions(layers(model), model, spec)
    assert labels == ["l0"]
    moved = {n for n, v in spec.unflatten(masks[0]).items() if bool(v.all())}
    assert moved == {n for n in spec.names if n.startswith("blocks.0.")}  # the heads and the output projection
    import torch.nn.functional as F

    import slt

    X, Y = torch.randn(64, 3), torch.randn(64, 1)
    r = slt.estimate_llc(lin, {"A": (X[:32], Y[:32]), "B": (X[32:], Y[32:])}, F.mse_loss,
                         restrict_to={"first": "0.*", "all": "*"}, num_draws=5, step_size=1e-4, localization=10.0,
                         nbeta=10.0, batch_size=None, progress=False)
    assert "restriction 'first' (16 of 21 parameters move); data 'A' (n = 32)" in str(r["first"]["A"])
