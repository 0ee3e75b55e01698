"""Per-head normalisation on SmolLM2 (the real suite's decode protocol, AccKV's defaults otherwise): rank by
mass / n^alpha on the kv heads that are not local (run.py's headX measure at most THR), by the mean on local heads.
MODE: "ha<alpha>_<THR>":

    python normalisation_per_head.py TEXT[,TEXT] OUT.json ha0.5_0.8"""
import sys

import torch
from common import LayerShares, patch_compress, run

from acckv_triton import AccKVConfig, torch_ops

PARAM = [0.5, 0.8]
SHARES = LayerShares()
orig_attention = torch_ops.observed_attention


def attention(q, k, v=None, **kw):
    SHARES.record(q, k)
    return orig_attention(q, k, v, **kw)


def head_norm(layer, n, decay):
    alpha, threshold = PARAM
    return n ** torch.where(SHARES.get(layer) > threshold, 1.0, alpha)[..., None]


def before(mode):
    PARAM[:] = [float(x) for x in mode[2:].split("_")]
    SHARES.clear()


torch_ops.observed_attention = attention
patch_compress("scores = scores / query_weight_sum(", "scores = scores / _head_norm(self.layer, ",
               _head_norm=head_norm)
run(sys.argv[1], sys.argv[2], sys.argv[3], lambda mode: AccKVConfig(), before=before)
