import sys, time, torch
torch.set_num_threads(1)
from acckv_triton import AccKVConfig
from acckv_triton.bench import realmodel
from acckv_triton.integrations.transformers import apply_acckv
model, tok = realmodel.load_smollm2()
ids = tok(realmodel.long_text("argparse"), return_tensors="pt").input_ids[:, :2048]
def ttft(patch):
    best = 1e9
    for _ in range(3):
        if patch:
            with apply_acckv(model, AccKVConfig(budget=0.25)):
                t0 = time.perf_counter(); model.generate(ids, max_new_tokens=1, do_sample=False); best = min(best, time.perf_counter() - t0)
        else:
            t0 = time.perf_counter(); model.generate(ids, max_new_tokens=1, do_sample=False); best = min(best, time.perf_counter() - t0)
    return best
with torch.no_grad():
    a = ttft(False); b = ttft(True)
print(sys.argv[1], "unpatched %.2f acckv %.2f ratio %.3f" % (a, b, b / a), flush=True)
