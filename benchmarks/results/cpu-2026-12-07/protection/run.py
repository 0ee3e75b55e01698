"""AccKV with parts of its position protection and its value weighting switched off (SET "parts", the default), or
with fewer recent tokens kept (SET "recent", run after protect_sinks), on SmolLM2 (the real suite's protocol):
    python run.py TEXT[,TEXT] OUT.json [SET]   (texts: prose, code, compound, dataclasses)"""
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
SETS = {"parts": {"unprot": AccKVConfig(protect_positions=False), "no-recent": AccKVConfig(recent=0),
                  "no-sink": AccKVConfig(sink=0), "no-value": AccKVConfig(value_aware=False),
                  "unprot-no-value": AccKVConfig(protect_positions=False, value_aware=False)},
        "recent": {"recent-16": AccKVConfig(recent=16), "recent-8": AccKVConfig(recent=8)}}
cfgs = SETS[sys.argv[3] if len(sys.argv) > 3 else "parts"]
for name in sys.argv[1].split(","):
    with torch.no_grad():
        got = realmodel.fidelity_rows(model, tok, context=1536, continuation=128, step="decode", methods=("acckv",),
                                      text=TEXTS[name](), backend="torch", configs=cfgs)
    rows += [{"text": name, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
    for r in got:
        print(name, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), flush=True)
    json.dump(rows, open(sys.argv[2], "w"), indent=1)
