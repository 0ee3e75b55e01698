"""Per-head recent protection on SmolLM2 (the real suite's decode protocol, AccKV's defaults otherwise): AccKV's R
recent tokens protected only on the kv heads that are local (as run.py's headX measures it, at each prefill), none
elsewhere. MODE: "r0" (R = 0 on every head), "headR<X>" (R on heads more than X local):
    python recent_per_head.py TEXT[,TEXT] OUT.json MODE[,MODE]"""
import json, sys
import torch
torch.set_num_threads(1)
from acckv_triton import AccKVConfig, torch_ops, policy
from acckv_triton.bench import realmodel
from pydoc_data.topics import topics
TEXTS = {"prose": lambda: realmodel.text_named("prose"), "code": lambda: realmodel.text_named("code"),
         "compound": lambda: topics["compound"], "dataclasses": lambda: realmodel.long_text("dataclasses"),
         "types": lambda: topics["types"], "functools": lambda: realmodel.long_text("functools")}
orig_oa = torch_ops.observed_attention
MODE = ["r0"]
SHARES = []  # per prefilled layer, in order
def patched(q, k, v=None, **kw):
    B, Hq, T, D = q.shape; Hkv = k.shape[1]; G = Hq // Hkv; W, R = 32, 256
    qw = q[:, :, -W:].float().view(B, Hkv, G, W, D).reshape(B, Hkv, G * W, D)
    p = torch.softmax(torch.matmul(qw, k.float().transpose(-1, -2)) * D ** -0.5, -1)[..., 4:]
    SHARES.append((p[..., -R:].sum(-1) / p.sum(-1)).mean(-1))  # [B, Hkv]
    return orig_oa(q, k, v, **kw)
torch_ops.observed_attention = patched
orig_plan = policy.plan_layer
orig_recent = policy.recent_tokens
CUR = [None]
LAST_LEN = [0]
BY_LAYER = {}
def recent_tokens(cfg):
    if CUR[0] is None or cfg.method != "acckv":
        return orig_recent(cfg)
    return CUR[0]
def plan_layer(cfg, x, layer=0, num_layers=1, *a, **kw):
    if MODE[0] == "r0":
        CUR[0] = 0
    else:
        thr = float(MODE[0][5:])
        if len(SHARES) > LAST_LEN[0]:  # a prefill of this layer just ran its prompt attention
            BY_LAYER[layer], LAST_LEN[0] = SHARES[-1], len(SHARES)
        share = BY_LAYER[layer]
        CUR[0] = torch.where(share > thr, orig_recent(cfg), 0)[..., None]
    try:
        return orig_plan(cfg, x, layer, num_layers, *a, **kw)
    finally:
        CUR[0] = None
policy.recent_tokens = recent_tokens
policy.plan_layer = plan_layer
from acckv_triton import cache as cache_mod
cache_mod.plan_layer = plan_layer
model, tok = realmodel.load_smollm2()
rows = []
for name in sys.argv[1].split(","):
    for mode in sys.argv[3].split(","):
        MODE[0] = mode
        SHARES.clear(); LAST_LEN[0] = 0; BY_LAYER.clear()
        with torch.no_grad():
            got = realmodel.fidelity_rows(model, tok, context=1536, continuation=128, step="decode", methods=(),
                                          text=TEXTS[name](), backend="torch", configs={mode: AccKVConfig()})
        got = [r for r in got if r["method"] == mode]
        rows += [{"text": name, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
        for r in got:
            print(name, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), flush=True)
        json.dump(rows, open(sys.argv[2], "w"), indent=1)
