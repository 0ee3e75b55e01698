"""Per-layer mixes of two selection methods on SmolLM2 (the real suite's protocol: 1,536 context tokens, 128 decoded
one per step, torch backend, one thread), with decode_budget="prompt": every decoded token is kept, so only the
ranking at the end of the prefill decides what is held.

    python layermix.py TEXT[,TEXT] BUDGET[,BUDGET] OUT.json VARIANT[;VARIANT...]

VARIANT: "BASE" or "BASE/ALT:LAYERS" where BASE and ALT name a method of METHODS and LAYERS a comma-separated list of
layers or ranges ("0-4,10"): those layers' caches run ALT's selection, every other layer BASE's. E.g. "acckv/tova:0-4"
(AccKV everywhere but layers 0-4, which rank as TOVA), "tova/acckv:25-29". A cache's config is chosen per layer by
patching BudgetedLayerCache.__init__ (the integration builds one per decoder layer, given its index); each layer
then computes its own evidence (every-query mean, last query, window) and runs its own policy, as the pure method
would there. The full cache's log-probs are computed once per text. Rows: top1, kl, and the KL per position.
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "evidence-mix"))
from common import TEXTS  # noqa: E402

from acckv_triton import AccKVConfig  # noqa: E402
from acckv_triton import cache as cache_mod  # noqa: E402
from acckv_triton.bench import realmodel  # noqa: E402

METHODS = {
    "acckv": AccKVConfig(decode_budget="prompt", backend="torch"),
    "tova": AccKVConfig(method="tova", decode_budget="prompt", backend="torch"),
    "snapkv": AccKVConfig(method="snapkv", decode_budget="prompt", backend="torch"),
    # AccKV's policy (recent 32 protected, per kv head) on the last query's evidence, or on the window's (pooled,
    # window protected); TOVA's head-shared selection on AccKV's evidence (every-query mean x ||v||)
    "last": AccKVConfig(evidence="last", decode_budget="prompt", backend="torch"),
    "window": AccKVConfig(evidence="window", decode_budget="prompt", backend="torch"),
    "novalue": AccKVConfig(value_aware=False, decode_budget="prompt", backend="torch"),
    "tovamean": AccKVConfig(method="tova", evidence="mean", value_aware=True, decode_budget="prompt", backend="torch"),
}
OVERRIDE = {}  # layer -> AccKVConfig (its budget is set per row)
_orig_init = cache_mod.BudgetedLayerCache.__init__


def _init(self, cfg, layer=0, num_layers=1):
    alt = OVERRIDE.get(layer)
    _orig_init(self, cfg if alt is None else alt.replace(budget=cfg.budget), layer, num_layers)


cache_mod.BudgetedLayerCache.__init__ = _init


def parse_layers(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def parse(variant: str):
    base, _, rest = variant.partition("/")
    if not rest:
        return METHODS[base], {}
    alt, _, layers = rest.partition(":")
    return METHODS[base], {i: METHODS[alt] for i in parse_layers(layers)}


def reference(model, tok, text: str, context=1536, continuation=128):
    ids = tok(text, return_tensors="pt").input_ids[:, :context + continuation]
    assert ids.shape[1] == context + continuation
    with torch.no_grad():
        logits = model(ids, logits_to_keep=continuation + 1).logits
    full = logits[0, -(continuation + 1):-1].float().log_softmax(-1)
    return ids[:, :context], ids[:, context:], full


def row(model, ctx, cont, full, variant: str, budget: float) -> dict:
    base, over = parse(variant)
    OVERRIDE.clear()
    OVERRIDE.update(over)
    try:
        with torch.no_grad():
            logp, kept, held, _ = realmodel._logprobs_under(model, base.replace(budget=budget), ctx, cont, "decode")
    finally:
        OVERRIDE.clear()
    kl = (full.exp() * (full - logp)).sum(-1)
    return dict(variant=variant, budget=budget, top1=(logp.argmax(-1) == full.argmax(-1)).float().mean().item(),
                kl=kl.mean().item(), kept=kept, kl_pos=[round(x, 6) for x in kl.tolist()])


def run(texts, budgets, out: str, modes, make_row) -> None:
    """For each text, budget and mode: ``make_row(model, ctx, cont, full, budget, mode)`` (a row dict), printed and
    appended to ``out`` (JSON, rows already there kept)."""
    torch.set_num_threads(1)
    model, tok = realmodel.load_smollm2()
    rows = json.load(open(out)) if os.path.exists(out) else []
    for name in texts:
        ctx, cont, full = reference(model, tok, TEXTS[name]())
        for budget in budgets:
            for mode in modes:
                r = {"text": name, **make_row(model, ctx, cont, full, budget, mode)}
                rows.append(r)
                print(name, budget, mode, round(r["top1"], 4), round(r["kl"], 5), r.get("switched", ""), flush=True)
                with open(out, "w") as f:
                    json.dump(rows, f, indent=0)


def switch_rows(on: list, switched: list, frac: float):
    """``make_row`` for the rule scripts: plain AccKV for mode "acckv", else with ``on[0]`` set (their patch's
    switch), recording the layers the patch appended to ``switched``."""
    def make_row(model, ctx, cont, full, budget, mode):
        on[0] = mode != "acckv"
        switched.clear()
        try:
            r = row(model, ctx, cont, full, "acckv", budget)
        finally:
            on[0] = False
        return {**r, "variant": mode, "switched": sorted(set(switched)), "frac": frac}
    return make_row


def main():
    texts, budgets, out, variants = sys.argv[1].split(","), [float(b) for b in sys.argv[2].split(",")], sys.argv[3], \
        sys.argv[4].split(";")
    run(texts, budgets, out, variants, lambda model, ctx, cont, full, budget, v: row(model, ctx, cont, full, v, budget))


if __name__ == "__main__":
    main()
