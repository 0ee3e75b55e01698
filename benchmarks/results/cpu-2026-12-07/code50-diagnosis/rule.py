"""The per-layer rule of this folder's README, decided at the end of prefill from the prompt alone: a layer whose
last prompt query spreads its attention nearly uniformly (entropy, mean over the query heads, above FRAC x ln T
nats) ranks by TOVA's evidence and selection (the last query's attention averaged over the layer's kv heads);
every other layer keeps AccKV's every-query mean x ||v||. decode_budget="prompt" (decoded tokens kept).

    python rule.py TEXT[,TEXT] BUDGET[,BUDGET] OUT.json [FRAC=0.7] [CRITERION=broad]

CRITERION "local" (the fitted second candidate, prediction.md): switch a layer where its last query puts less than
FRAC of its non-sink attention (first 4 keys out) on the last 256 keys; rows "local->tova" only.

Rows "acckv" (plain, same run) and "broad->tova"; each rule row lists the layers it switched. Implemented by
patching BudgetedLayerCache.prompt_attention (AccKV's one-pass prompt attention on text): after the attention
and its every-query evidence, the last query's entropy is measured; above the threshold the layer's config becomes
TOVA's (same budget) and its scores the last query's attention (torch_ops.window_scores over that one query)."""
import math
import sys

import torch

from layermix import run, switch_rows

from acckv_triton import cache as cache_mod, torch_ops

FRAC = float(sys.argv[4]) if len(sys.argv) > 4 else 0.7
CRIT = sys.argv[5] if len(sys.argv) > 5 else "broad"  # "local": switch where loc_last < FRAC (see prediction.md)
MODES = ("acckv", "broad->tova") if CRIT == "broad" else ("local->tova",)
ON = [False]
SWITCHED = []
_orig = cache_mod.BudgetedLayerCache.prompt_attention


def prompt_attention(self, q, k, v, *, scale=None, valid=None, audio_video=None):
    out, scores = _orig(self, q, k, v, scale=scale, valid=valid, audio_video=audio_video)
    if not ON[0] or valid is not None:
        return out, scores
    T, D = k.shape[2], k.shape[3]
    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    ql = q[:, :, -1].float().view(q.shape[0], Hkv, G, D)
    p = torch.softmax(ql @ k.float().transpose(-1, -2) * (scale or D ** -0.5), -1)
    if CRIT == "broad":
        switch = -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item() > FRAC * math.log(T)
    else:  # the share of the last query's non-sink mass on the last 256 keys
        switch = (p[..., -256:].sum(-1) / p[..., 4:].sum(-1)).mean().item() < FRAC
    if switch:
        SWITCHED.append(self.layer)
        self.cfg = self.cfg.replace(method="tova", evidence=None, value_aware=None)
        scores = torch_ops.window_scores(q[:, :, T - 1:], k, scale=scale).scores
    return out, scores


cache_mod.BudgetedLayerCache.prompt_attention = prompt_attention


def main():
    texts, budgets, out = sys.argv[1].split(","), [float(b) for b in sys.argv[2].split(",")], sys.argv[3]
    run(texts, budgets, out, MODES, switch_rows(ON, SWITCHED, FRAC))


if __name__ == "__main__":
    main()
