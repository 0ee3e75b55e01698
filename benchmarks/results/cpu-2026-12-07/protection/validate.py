"""The fresh held-back check of protect_sinks (chosen before the run: pydoc's "types" chapter and functools' source):
    python validate.py TEXT OUT.json   (texts: types, functools)"""
import json, sys, inspect, functools
import torch
torch.set_num_threads(1)
from acckv_triton import AccKVConfig
from acckv_triton.bench import realmodel
from pydoc_data.topics import topics
TEXTS = {"types": lambda: topics["types"], "functools": lambda: inspect.getsource(functools)}
model, tok = realmodel.load_smollm2()
rows = []
for name in sys.argv[1].split(","):
    with torch.no_grad():
        got = realmodel.fidelity_rows(model, tok, context=1536, continuation=128, step="decode", methods=("acckv",),
                                      text=TEXTS[name](), backend="torch", configs={"no-sink": AccKVConfig(sink=0)})
    rows += [{"text": name, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
    for r in got:
        print(name, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), flush=True)
    json.dump(rows, open(sys.argv[2], "w"), indent=1)
