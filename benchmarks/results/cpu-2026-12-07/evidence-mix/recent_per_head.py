"""Per-head recent protection on SmolLM2 (the real suite's decode protocol, AccKV's defaults otherwise): AccKV's R
recent tokens protected only on the kv heads that are local (as run.py's headX measures it, at each prefill), none
elsewhere. MODE: "r0" (R = 0 on every head), "headR<X>" (R on heads more than X local):

    python recent_per_head.py TEXT[,TEXT] OUT.json MODE[,MODE]"""
import sys

import torch
from common import LayerShares, run

from acckv_triton import AccKVConfig, cache as cache_mod, policy, torch_ops

MODE = ["r0"]
SHARES = LayerShares()
CURRENT = [None]  # the policy's R while a patched plan_layer runs: an int or a [B, Hkv, 1] tensor
orig_attention, orig_plan, orig_recent = torch_ops.observed_attention, policy.plan_layer, policy.recent_tokens


def attention(q, k, v=None, **kw):
    SHARES.record(q, k)
    return orig_attention(q, k, v, **kw)


def recent_tokens(cfg):
    return orig_recent(cfg) if CURRENT[0] is None or cfg.method != "acckv" else CURRENT[0]


def plan_layer(cfg, x, layer=0, num_layers=1, *args, **kw):
    share = SHARES.get(layer)
    CURRENT[0] = 0 if MODE[0] == "r0" else torch.where(share > float(MODE[0][5:]), orig_recent(cfg), 0)[..., None]
    try:
        return orig_plan(cfg, x, layer, num_layers, *args, **kw)
    finally:
        CURRENT[0] = None


def before(mode):
    MODE[0] = mode
    SHARES.clear()


torch_ops.observed_attention = attention
policy.recent_tokens, policy.plan_layer, cache_mod.plan_layer = recent_tokens, plan_layer, plan_layer
run(sys.argv[1], sys.argv[2], sys.argv[3], lambda mode: AccKVConfig(), before=before)
