"""The broad-layer rule as a sync-free implementation could run it inside AccKV: the layer keeps AccKV's config
(its policy and 32 protected recent tokens, its decode-time evidence); only the ranking of its prefill compression
changes, to the last prompt query's attention averaged over all the layer's query heads (TOVA's evidence,
head-shared, no ||v||), where that query's entropy (mean over the query heads) exceeds FRAC x ln T. The library's
default decode budget ("all"). Plain AccKV rows in the same run.

    python rule_inside.py TEXT[,TEXT] BUDGET[,BUDGET] OUT.json [FRAC=0.7]
"""
import math
import os
import sys

import torch

import layermix
from layermix import run, switch_rows

from acckv_triton import AccKVConfig, cache as cache_mod

sys.path.insert(0, os.path.join(layermix.HERE, "..", "evidence-mix"))
from common import patch_compress  # noqa: E402

layermix.METHODS["acckv"] = AccKVConfig(backend="torch")
FRAC = float(sys.argv[4]) if len(sys.argv) > 4 else 0.7
ON, SWITCHED = [False], []
_orig = cache_mod.BudgetedLayerCache.prompt_attention


def prompt_attention(self, q, k, v, *, scale=None, valid=None, audio_video=None):
    out, scores = _orig(self, q, k, v, scale=scale, valid=valid, audio_video=audio_video)
    self._broad_scores = None
    if not ON[0] or valid is not None:
        return out, scores
    T, D = k.shape[2], k.shape[3]
    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    ql = q[:, :, -1].float().view(q.shape[0], Hkv, G, D)
    p = torch.softmax(ql @ k.float().transpose(-1, -2) * (scale or D ** -0.5), -1)  # [B, Hkv, G, T]
    if -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item() > FRAC * math.log(T):
        SWITCHED.append(self.layer)
        self._broad_scores = p.mean((1, 2), keepdim=True)[:, :, 0].expand(-1, Hkv, -1).contiguous()
    return out, scores


cache_mod.BudgetedLayerCache.prompt_attention = prompt_attention
patch_compress("    x = LayerTokens(\n        scores=scores,",  # compress's source, dedented
               "    if not upkeep and getattr(self, '_broad_scores', None) is not None:  # the experiment's swap\n"
               "        scores, self._broad_scores = self._broad_scores[..., :w], None\n"
               "    x = LayerTokens(\n        scores=scores,")


def main():
    texts, budgets, out = sys.argv[1].split(","), [float(b) for b in sys.argv[2].split(",")], sys.argv[3]
    run(texts, budgets, out, ("acckv", "broad->last-shared"), switch_rows(ON, SWITCHED, FRAC))


if __name__ == "__main__":
    main()
