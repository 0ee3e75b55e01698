"""AccKV with and without recency-weighted evidence on SmolLM2 (the real suite's protocol), per text:
    python run.py TEXT[,TEXT] OUT.json   (texts: prose, code, compound, dataclasses)"""
import json, sys
import torch
torch.set_num_threads(1)
from acckv_triton import AccKVConfig
from acckv_triton.bench import realmodel
from pydoc_data.topics import topics

TEXTS = {"prose": lambda: realmodel.text_named("prose"), "code": lambda: realmodel.text_named("code"),
         "compound": lambda: topics["compound"], "dataclasses": lambda: realmodel.long_text("dataclasses")}
model, tok = realmodel.load_smollm2()
out = sys.argv[2]
rows = []
for name in sys.argv[1].split(","):
    with torch.no_grad():
        got = realmodel.fidelity_rows(model, tok, context=1536, continuation=128, step="decode", methods=("acckv",),
                                      text=TEXTS[name](), backend="torch",
                                      configs={"acckv-recency-128": AccKVConfig(recency=128.0),
                                               "acckv-recency-256": AccKVConfig(recency=256.0)})
    rows += [{"text": name, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
    for r in got:
        print(name, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), flush=True)
json.dump(rows, open(out, "w"), indent=1)
