"""Mixes of AccKV's text evidence on SmolLM2 (the real suite's protocol with decode_budget="prompt", so only the
end-of-prefill ranking decides what is held):

    python run.py TEXT[,TEXT] OUT.json MODE[,MODE] [TAU] [CONFIG]

TEXT: prose, code, compound, dataclasses, types, functools. MODE: "mean" (the default evidence, every query's mean),
"rec" (the recency-weighted mean, tau = TAU, default 256), "max" and "sum" (the larger, or the average, of the two
means), "headX" (per kv head: the recency-weighted mean where the last 32 queries put more than X of their non-sink
mass on the last 256 keys, the plain mean elsewhere). CONFIG: extra AccKVConfig fields, e.g. "{'head_budgets':
'adaptive'}". The mixes are computed in the torch twin of the prompt's one-pass attention (patched here): its key
mass is replaced by count x mix, which the policy divides back by the count of queries that saw each token."""
import json, sys, math, functools
import torch
torch.set_num_threads(1)
from acckv_triton import AccKVConfig, torch_ops, cache as cache_mod, reference
from acckv_triton.bench import realmodel
from pydoc_data.topics import topics
TEXTS = {"prose": lambda: realmodel.text_named("prose"), "code": lambda: realmodel.text_named("code"),
         "compound": lambda: topics["compound"], "dataclasses": lambda: realmodel.long_text("dataclasses"),
         "types": lambda: topics["types"], "functools": lambda: realmodel.long_text("functools")}
orig = torch_ops.observed_attention
MODE = ["mean"]
TAU = float(sys.argv[4]) if len(sys.argv) > 4 else 256.0
EXTRA = eval(sys.argv[5]) if len(sys.argv) > 5 else {}
def patched(q, k, v=None, *, decay=1.0, **kw):
    res = orig(q, k, v, decay=decay, **kw)
    if MODE[0] == "mean":
        return res
    g = math.exp(-1.0 / TAU)
    T = k.shape[2]
    kw.pop("out", None)
    rec = orig(q, k, None, decay=g, **kw).key_mass
    n = (T - torch.arange(T, dtype=torch.float64)).clamp(min=1)
    m1 = res.key_mass.double() / n
    m2 = rec.double() / reference.query_weight_sum(n, g)
    if MODE[0] == "rec": c = m2
    elif MODE[0] == "max": c = torch.maximum(m1, m2)
    elif MODE[0] == "sum": c = 0.5 * (m1 + m2)
    elif MODE[0].startswith("head"):
        thr = float(MODE[0][4:])
        B, Hq, _, D = q.shape; Hkv = k.shape[1]; G = Hq // Hkv; W, R = 32, 256
        qw = q[:, :, -W:].float().view(B, Hkv, G, W, D).reshape(B, Hkv, G * W, D)
        p = torch.softmax(torch.matmul(qw, k.float().transpose(-1, -2)) * D ** -0.5, -1)[..., 4:]
        share = (p[..., -R:].sum(-1) / p.sum(-1)).mean(-1)  # [B, Hkv]
        c = torch.where((share > thr)[..., None], m2, m1)
    res.key_mass.copy_((c * n).float())
    return res
torch_ops.observed_attention = patched
model, tok = realmodel.load_smollm2()
rows = []
modes = sys.argv[3].split(",")
for name in sys.argv[1].split(","):
    for mode in modes:
        MODE[0] = mode
        with torch.no_grad():
            got = realmodel.fidelity_rows(model, tok, context=1536, continuation=128, step="decode", methods=(),
                                          text=TEXTS[name](), backend="torch",
                                          configs={mode: AccKVConfig(**{"decode_budget": "prompt", **EXTRA})})
        got = [r for r in got if r["method"] == mode]
        rows += [{"text": name, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
        for r in got:
            print(name, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), flush=True)
        json.dump(rows, open(sys.argv[2], "w"), indent=1)
