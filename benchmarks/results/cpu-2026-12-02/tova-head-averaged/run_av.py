import json, sys, torch
from acckv_triton import AccKVConfig, workloads
from acckv_triton.bench import av
rows = []
ws = [("default", workloads.generate_av_workload())] + [(n, workloads.stress_workload(n)) for n in workloads.STRESS_VARIANTS]
for name, w in ws:
    full_out, mass = av.full_outputs(w), av.full_token_masses(w)
    sc = av.prefill_scores(w, "last")
    for b in av.DEFAULT_BUDGETS:
        r = av.evaluate(w, AccKVConfig(method="tova", budget=b), sc, full_out, mass)
        rows.append({"variant": name, "budget": b, "method": "tova", **{k: v for k, v in r.items() if k != "rho"}})
        print(name, b, round(r["out err"], 4), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
