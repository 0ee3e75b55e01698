import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
from acckv_triton.bench import realmodel
model, tok = realmodel.load_smollm2()
t0 = time.time()
rows = realmodel.prefill_cost_rows(model, tok, context=1536, budget=0.25, text_name="prose", rounds=3)
for r in rows: print(r)
json.dump({"rows": rows, "seconds": time.time() - t0, "torch": torch.__version__, "threads": torch.get_num_threads()},
          open(sys.argv[1], "w"), indent=1)
