"""Hugging Face attention on the batched (vmap) path against the loop: ms per chain-step.

Tiny GPT-2 (sdpa and eager), GPT-NeoX (sdpa) and BERT (sequence classification, sdpa), 2 layers,
hidden 32, 4 heads, vocabulary 16, sequences of 12 tokens with every third one padded after 8, 4 chains,
batch 16, 200 draws at a fixed step, one thread; each model on both paths, two alternating rounds.
Usage: ``python benchmarks/bench_attention.py`` (about 2 minutes on a 2-core CPU; results in
docs/performance.md, "Attention implementation").
"""
import torch, slt, warnings, time, torch.nn.functional as F
import transformers as tf
tf.utils.logging.set_verbosity_error()
torch.set_num_threads(1)
warnings.simplefilter("ignore")
V, T, N = 16, 12, 256
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, V, (N, T), generator=g); mask = torch.ones_like(ids); mask[::3, 8:] = 0
def mk(kind, attn):
    torch.manual_seed(0)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, attn_implementation=attn, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    if kind == "neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, max_position_embeddings=T, attn_implementation=attn)).eval()
    return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=T, num_labels=3, attn_implementation=attn, hidden_dropout_prob=0, attention_probs_dropout_prob=0)).eval()
cases = [("gpt2", "sdpa"), ("gpt2", "eager"), ("neox", "sdpa"), ("bert", "sdpa")]
kw = dict(num_chains=4, num_draws=200, num_burnin=0, step_size=1e-6, nbeta=50.0, localization=100.0, batch_size=16, progress=False, seed=0, extend_draws=False)
res: dict = {}
for rnd in range(2):
    for kind, attn in cases:
        m = mk(kind, attn)
        if kind == "bert":
            data, loss = ({"input_ids": ids, "attention_mask": mask}, ids[:, 0] % 3), (lambda o, y: F.cross_entropy(o.logits, y))
        else:
            data, loss = {"input_ids": ids, "attention_mask": mask}, slt.losses.causal_lm
        for v in ["vmap", "loop"]:
            r = slt.estimate_llc(m, data, loss, vectorize=v, **kw)
            ms = 1e3 * r.diagnostics["seconds"] / (4 * 200)
            res.setdefault((kind, attn, v), []).append(ms)
            print(rnd, kind, attn, v, "%.2f" % ms, flush=True)
for k, v in res.items(): print(k, " / ".join("%.1f" % x for x in v))
