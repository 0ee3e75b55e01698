"""What this folder's scripts share: the texts, the per-head locality measure, a patch of the cache's compress, and
the loop that runs AccKV rows on SmolLM2 (the real suite's protocol: 1,536 context tokens, 128 decoded one per step,
torch backend, one thread) and writes them."""
import inspect
import json
import textwrap

import torch
from pydoc_data.topics import topics

from acckv_triton import cache as cache_mod
from acckv_triton.bench import realmodel

TEXTS = {"prose": lambda: realmodel.text_named("prose"), "code": lambda: realmodel.text_named("code"),
         "compound": lambda: topics["compound"], "dataclasses": lambda: realmodel.long_text("dataclasses"),
         "types": lambda: topics["types"], "functools": lambda: realmodel.long_text("functools")}


def local_share(q, k, window=32, recent=256, sinks=4):
    """``[B, Hkv]``: the share of the last ``window`` queries' attention, the first ``sinks`` keys left out, that falls
    on the last ``recent`` keys (every key visible to every window query), averaged over the window and the group."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qw = q[:, :, -window:].float().view(B, Hkv, G, window, D).reshape(B, Hkv, G * window, D)
    p = torch.softmax(torch.matmul(qw, k.float().transpose(-1, -2)) * D ** -0.5, -1)[..., sinks:]
    return (p[..., -recent:].sum(-1) / p.sum(-1)).mean(-1)


class LayerShares:
    """Each layer's :func:`local_share` at its latest prefill: ``record`` in the prompt attention, ``get`` in the
    policy (a prefill's compression runs right after its layer's prompt attention; an upkeep reuses the stored one)."""

    def __init__(self):
        self.pending, self.by_layer = None, {}

    def record(self, q, k):
        self.pending = local_share(q, k)

    def get(self, layer):
        if self.pending is not None:
            self.by_layer[layer], self.pending = self.pending, None
        return self.by_layer[layer]

    def clear(self):
        self.pending, self.by_layer = None, {}


def patch_compress(old: str, new: str, **names) -> None:
    """Replace ``old`` by ``new`` in ``BudgetedLayerCache.compress``'s source; ``names`` become globals it can read."""
    src = textwrap.dedent(inspect.getsource(cache_mod.BudgetedLayerCache.compress))
    assert old in src, old
    cache_mod.__dict__.update(names)
    ns = {}
    exec(src.replace(old, new), cache_mod.__dict__, ns)
    cache_mod.BudgetedLayerCache.compress = ns["compress"]


def run(texts: str, out: str, modes: str, config, before=lambda mode: None, setup=lambda model: None) -> None:
    """For each text and mode: ``before(mode)``, then AccKV's rows at 50/25/10% with ``config(mode)``, printed and
    written to ``out`` (JSON). ``setup(model)`` runs once after the model loads."""
    torch.set_num_threads(1)
    model, tok = realmodel.load_smollm2()
    setup(model)
    rows = []
    for name in texts.split(","):
        for mode in modes.split(","):
            before(mode)
            with torch.no_grad():
                got = realmodel.fidelity_rows(model, tok, context=1536, continuation=128, step="decode", methods=(),
                                              text=TEXTS[name](), backend="torch", configs={mode: config(mode)})
            got = [r for r in got if r["method"] == mode]
            rows += [{"text": name, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
            for r in got:
                print(name, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), flush=True)
            with open(out, "w") as f:
                json.dump(rows, f, indent=1)
