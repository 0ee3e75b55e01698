"""AccKV (with protect_sinks) with fewer recent tokens kept by position (R 16, 8; default 32), the real suite's
protocol:  python run_recent.py TEXT[,TEXT] OUT.json   (texts: prose, code, compound, dataclasses)"""
import json, sys
import torch
torch.set_num_threads(1)
from acckv_triton import AccKVConfig
from acckv_triton.bench import realmodel
from pydoc_data.topics import topics
TEXTS = {"prose": lambda: realmodel.text_named("prose"), "code": lambda: realmodel.text_named("code"),
         "compound": lambda: topics["compound"], "dataclasses": lambda: realmodel.long_text("dataclasses")}
model, tok = realmodel.load_smollm2()
rows = []
cfgs = {"recent-16": AccKVConfig(recent=16), "recent-8": AccKVConfig(recent=8)}
for name in sys.argv[1].split(","):
    with torch.no_grad():
        got = realmodel.fidelity_rows(model, tok, context=1536, continuation=128, step="decode", methods=("acckv",),
                                      text=TEXTS[name](), backend="torch", configs=cfgs)
    rows += [{"text": name, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
    for r in got:
        print(name, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), flush=True)
    json.dump(rows, open(sys.argv[2], "w"), indent=1)
