import csv, sys, torch
from acckv_triton.bench import realmodel
from acckv_triton.bench.__main__ import _real_configs, REAL_CONTEXT, REAL_CONTINUATION
model, tok = realmodel.load_smollm2()
rows = []
for text in ("prose", "code"):
    with torch.no_grad():
        got = realmodel.fidelity_rows(model, tok, context=REAL_CONTEXT, continuation=REAL_CONTINUATION, step="decode",
                                      methods=(), text=realmodel.text_named(text),
                                      configs={"acckv-no-broad": _real_configs()["acckv-no-broad"]})
    for r in got:
        rows.append({"text": text, "method": r["method"], "budget": r["budget"], "top1": r["top1"], "kl": r["kl"],
                     "kept": r["kept"], "held": r["held"]})
        print(text, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), flush=True)
with open(sys.argv[1], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
