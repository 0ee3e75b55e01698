"""Per-head normalisation on SmolLM2 (the real suite's decode protocol, AccKV's defaults otherwise): rank by
mass / n^alpha on the kv heads that are not local (run.py's headX measure at most THR), by the mean on local heads.
MODE: "ha<alpha>_<THR>":
    python normalisation_per_head.py TEXT[,TEXT] OUT.json ha0.5_0.8"""
import json, sys, inspect, textwrap
import torch
torch.set_num_threads(1)
from acckv_triton import AccKVConfig, torch_ops, cache as cache_mod
from acckv_triton.bench import realmodel
from pydoc_data.topics import topics
TEXTS = {"prose": lambda: realmodel.text_named("prose"), "code": lambda: realmodel.text_named("code"),
         "compound": lambda: topics["compound"], "dataclasses": lambda: realmodel.long_text("dataclasses"),
         "types": lambda: topics["types"], "functools": lambda: realmodel.long_text("functools")}
orig_oa = torch_ops.observed_attention
SHARES, BY_LAYER, LAST_LEN, PARAM = [], {}, [0], [0.5, 0.8]
def patched(q, k, v=None, **kw):
    B, Hq, T, D = q.shape; Hkv = k.shape[1]; G = Hq // Hkv; W, R = 32, 256
    qw = q[:, :, -W:].float().view(B, Hkv, G, W, D).reshape(B, Hkv, G * W, D)
    p = torch.softmax(torch.matmul(qw, k.float().transpose(-1, -2)) * D ** -0.5, -1)[..., 4:]
    SHARES.append((p[..., -R:].sum(-1) / p.sum(-1)).mean(-1))  # [B, Hkv]
    return orig_oa(q, k, v, **kw)
torch_ops.observed_attention = patched
def norm(layer, n, decay):
    if len(SHARES) > LAST_LEN[0]:
        BY_LAYER[layer], LAST_LEN[0] = SHARES[-1], len(SHARES)
    share = BY_LAYER[layer]
    alpha = torch.where(share > PARAM[1], 1.0, PARAM[0])[..., None]  # [B, Hkv, 1]
    return n ** alpha
cache_mod._head_norm = norm
src = textwrap.dedent(inspect.getsource(cache_mod.BudgetedLayerCache.compress))
old = "scores = scores / query_weight_sum("
assert old in src, src[:2000]
src = src.replace(old, "scores = scores / _head_norm(self.layer, ")
ns = {}
exec(src, cache_mod.__dict__, ns)
cache_mod.BudgetedLayerCache.compress = ns["compress"]
model, tok = realmodel.load_smollm2()
rows = []
for name in sys.argv[1].split(","):
    for mode in sys.argv[3].split(","):
        a, t = mode[2:].split("_")
        PARAM[:] = [float(a), float(t)]
        SHARES.clear(); BY_LAYER.clear(); LAST_LEN[0] = 0
        with torch.no_grad():
            got = realmodel.fidelity_rows(model, tok, context=1536, continuation=128, step="decode", methods=(),
                                          text=TEXTS[name](), backend="torch", configs={mode: AccKVConfig()})
        got = [r for r in got if r["method"] == mode]
        rows += [{"text": name, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
        for r in got:
            print(name, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), flush=True)
        json.dump(rows, open(sys.argv[2], "w"), indent=1)
