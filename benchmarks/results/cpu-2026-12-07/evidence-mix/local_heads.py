"""How many of SmolLM2's kv heads are local on each text, as run.py's headX measures it (common.local_share: the
last 32 prompt queries' share of attention mass, sinks excluded, on the last 256 keys), at the end of a 1,536-token
prefill:

    python local_heads.py prose,code,compound,dataclasses"""
import sys

import torch
from common import TEXTS, local_share

from acckv_triton import AccKVConfig, apply_acckv, torch_ops
from acckv_triton.bench import realmodel

torch.set_num_threads(2)
SHARES = []
orig = torch_ops.observed_attention


def attention(q, k, v=None, **kw):
    SHARES.append(local_share(q, k)[0])
    return orig(q, k, v, **kw)


torch_ops.observed_attention = attention
model, tok = realmodel.load_smollm2()
for name in sys.argv[1].split(","):
    SHARES.clear()
    ids = tok(TEXTS[name](), return_tensors="pt").input_ids[:, :1536]
    with apply_acckv(model, AccKVConfig(budget=0.25, backend="torch")) as h, torch.no_grad():
        model(ids, past_key_values=h.new_cache(), use_cache=True, logits_to_keep=1)
    sh = torch.stack(SHARES)  # [layers, Hkv]
    print(name, "mean local share", round(float(sh.mean()), 3), "heads>0.5", int((sh > 0.5).sum()), "of",
          sh.numel(), "heads>0.8", int((sh > 0.8).sum()))
