"""The every-query evidence's normalisation on SmolLM2 (the real suite's decode protocol, AccKV's defaults
otherwise): rank by mass / n^alpha, n the queries that saw the token (1: the mean, today's; 0: the sum, H2O's).
MODE: "a<alpha>":
    python normalisation.py TEXT[,TEXT] OUT.json a0.5,a0.75"""
import json, sys, inspect, textwrap
import torch
torch.set_num_threads(1)
from acckv_triton import AccKVConfig, cache as cache_mod
from acckv_triton.bench import realmodel
from pydoc_data.topics import topics
TEXTS = {"prose": lambda: realmodel.text_named("prose"), "code": lambda: realmodel.text_named("code"),
         "compound": lambda: topics["compound"], "dataclasses": lambda: realmodel.long_text("dataclasses"),
         "types": lambda: topics["types"], "functools": lambda: realmodel.long_text("functools")}
ALPHA = [1.0]
def norm(n, decay):
    return n ** ALPHA[0]
cache_mod._alpha_norm = norm
src = textwrap.dedent(inspect.getsource(cache_mod.BudgetedLayerCache.compress))
old = "scores = scores / query_weight_sum("
assert old in src
src = src.replace(old, "scores = scores / _alpha_norm(")
ns = {}
exec(src, cache_mod.__dict__, ns)
cache_mod.BudgetedLayerCache.compress = ns["compress"]
model, tok = realmodel.load_smollm2()
rows = []
for name in sys.argv[1].split(","):
    for mode in sys.argv[3].split(","):
        ALPHA[0] = float(mode[1:])
        with torch.no_grad():
            got = realmodel.fidelity_rows(model, tok, context=1536, continuation=128, step="decode", methods=(),
                                          text=TEXTS[name](), backend="torch", configs={mode: AccKVConfig()})
        got = [r for r in got if r["method"] == mode]
        rows += [{"text": name, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
        for r in got:
            print(name, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), flush=True)
        json.dump(rows, open(sys.argv[2], "w"), indent=1)
