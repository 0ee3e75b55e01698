"""AccKV on the two held-back texts (the real suite's protocol), for the comparison with kvpress's presses in
../peer-kvpress-held-back/:  python run.py TEXT[,TEXT] OUT.json   (texts: compound, dataclasses, prose, code)

Rows: `acckv` (defaults: the budget covers every token seen, as in the real suite) and `acckv-prompt`
(decode_budget="prompt": only the prompt is compressed and every decoded token is kept, kvpress's protocol)."""
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
for name in sys.argv[1].split(","):
    with torch.no_grad():
        got = realmodel.fidelity_rows(model, tok, context=1536, continuation=128, step="decode", methods=("acckv",),
                                      text=TEXTS[name](), backend="torch",
                                      configs={"acckv-prompt": AccKVConfig(decode_budget="prompt")})
    rows += [{"text": name, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
    for r in got:
        print(name, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), round(r["kept"], 3), flush=True)
json.dump(rows, open(sys.argv[2], "w"), indent=1)
