import json, sys, torch
from acckv_triton import AccKVConfig
from acckv_triton.bench import realmodel as rm
m, tok = rm.load_smollm2()
out = []
for text in ("code", "prose"):
    rows = rm.fidelity_rows(m, tok, context=1536, continuation=128, budgets=(0.5, 0.25, 0.1), methods=("tova",),
                            text_name=text, configs={"tova (single pass, decoded kept)": AccKVConfig(method="tova", decode_budget="prompt")})
    for r in rows: r["text"] = text
    out += rows
    print(text, [(r["method"], r["budget"], round(r["top1"],3), round(r["kl"],4)) for r in rows], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
