"""How many of SmolLM2's kv heads are local on each text, as run.py's headX computes it (the last 32 prompt queries'
share of attention mass, sinks excluded, on the last 256 keys), at the end of a 1,536-token prefill:
    python local_heads.py prose,code,compound,dataclasses"""
import sys, torch
torch.set_num_threads(2)
from acckv_triton import AccKVConfig, torch_ops, apply_acckv
from acckv_triton.bench import realmodel
from pydoc_data.topics import topics
TEXTS = {"prose": lambda: realmodel.text_named("prose"), "code": lambda: realmodel.text_named("code"),
         "compound": lambda: topics["compound"], "dataclasses": lambda: realmodel.long_text("dataclasses")}
orig = torch_ops.observed_attention
SH = []
W, R = 32, 256
def patched(q, k, v=None, **kw):
    B, Hq, T, D = q.shape; Hkv = k.shape[1]; G = Hq // Hkv
    qw = q[:, :, -W:].float().view(B, Hkv, G, W, D).reshape(B, Hkv, G * W, D)
    s = torch.matmul(qw, k.float().transpose(-1, -2)) * D ** -0.5
    p = torch.softmax(s, -1)  # window queries see every key (causal within window ignored: small)
    p = p[..., 4:]  # drop sinks
    share = p[..., -R:].sum(-1) / p.sum(-1)
    SH.append(share.mean(-1)[0])
    return orig(q, k, v, **kw)
torch_ops.observed_attention = patched
model, tok = realmodel.load_smollm2()
for name in sys.argv[1].split(","):
    SH.clear()
    ids = tok(TEXTS[name](), return_tensors="pt").input_ids[:, :1536]
    with apply_acckv(model, AccKVConfig(budget=0.25, backend="torch")) as h, torch.no_grad():
        model(ids, past_key_values=h.new_cache(), use_cache=True, logits_to_keep=1)
    sh = torch.stack(SH)  # [L, Hkv]
    print(name, "mean local share", round(float(sh.mean()), 3), "heads>0.5", int((sh > 0.5).sum()), "of", sh.numel(), "heads>0.8", int((sh > 0.8).sum()))
