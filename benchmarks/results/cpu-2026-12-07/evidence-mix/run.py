"""Mixes of AccKV's text evidence on SmolLM2 (the real suite's protocol with decode_budget="prompt", so only the
end-of-prefill ranking decides what is held):

    python run.py TEXT[,TEXT] OUT.json MODE[,MODE] [TAU] [CONFIG]

TEXT: prose, code, compound, dataclasses, types, functools. MODE: "mean" (the default evidence, every query's mean),
"rec" (the recency-weighted mean, tau = TAU, default 256), "max" and "sum" (the larger, or the average, of the two
means), "headX" (per kv head: the recency-weighted mean where the last 32 queries put more than X of their non-sink
mass on the last 256 keys, the plain mean elsewhere). CONFIG: extra AccKVConfig fields, e.g. "{'head_budgets':
'adaptive'}". The mixes are computed in the torch twin of the prompt's one-pass attention (patched here): its key
mass is replaced by count x mix, which the policy divides back by the count of queries that saw each token. No
padding (the counts assume every query valid)."""
import math
import sys

import torch
from common import local_share, run

from acckv_triton import AccKVConfig, reference, torch_ops

TAU = float(sys.argv[4]) if len(sys.argv) > 4 else 256.0
EXTRA = eval(sys.argv[5]) if len(sys.argv) > 5 else {}
MODE = ["mean"]
orig = torch_ops.observed_attention


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
    if MODE[0] == "rec":
        c = m2
    elif MODE[0] == "max":
        c = torch.maximum(m1, m2)
    elif MODE[0] == "sum":
        c = 0.5 * (m1 + m2)
    else:  # headX
        c = torch.where((local_share(q, k) > float(MODE[0][4:]))[..., None], m2, m1)
    res.key_mass.copy_((c * n).float())
    return res


torch_ops.observed_attention = patched
run(sys.argv[1], sys.argv[2], sys.argv[3], lambda mode: AccKVConfig(**{"decode_budget": "prompt", **EXTRA}),
    before=lambda mode: MODE.__setitem__(0, mode))
