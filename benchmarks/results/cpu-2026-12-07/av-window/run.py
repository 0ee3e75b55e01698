"""AccKV on the synthetic audio-video workloads with its window and recent tokens protected by position only up to
a share of the budget (the experiment of window_cap.patch, which must be applied first):

    git apply benchmarks/results/cpu-2026-12-07/av-window/window_cap.patch
    python benchmarks/results/cpu-2026-12-07/av-window/run.py > out.md
    git checkout acckv_triton/policy.py

Decode-output error (the AV fidelity table's "out err") of AccKV for each cap, with TOVA's and SnapKV's for
reference, on the bench's default workload, that workload at seed 5, and the seven stress variants."""
import os
from acckv_triton import AccKVConfig, workloads
from acckv_triton.bench import av

CAPS = (None, "0.5", "0.25", "0.125", "0")  # None: today's protection (no cap); "0": none by position
loads = {"default": lambda: workloads.generate_av_workload(num_chunks=6, num_decode_queries=8),
         "default, seed 5": lambda: workloads.generate_av_workload(num_chunks=6, num_decode_queries=8, seed=5),
         **{name: (lambda n=name: workloads.stress_workload(n)) for name in workloads.STRESS_VARIANTS}}
print("| workload | budget | " + " | ".join(f"AccKV, {'today' if c is None else 'cap ' + c}" for c in CAPS) + " | TOVA | SnapKV |")
print("|---" * (len(CAPS) + 4) + "|")
for name, make in loads.items():
    w = make()
    full, mass = av.full_outputs(w), av.full_token_masses(w)
    scores = {e: av.prefill_scores(w, e) for e in ("window", "last")}
    for b in (0.5, 0.25, 0.1):
        cells = []
        for cap in CAPS:
            os.environ.pop("WCAP", None) if cap is None else os.environ.__setitem__("WCAP", cap)
            cells.append(av.evaluate(w, AccKVConfig(budget=b), scores["window"], full, mass)["out err"])
        os.environ.pop("WCAP", None)
        for method in ("tova", "snapkv"):
            cfg = AccKVConfig(budget=b, method=method)
            cells.append(av.evaluate(w, cfg, scores[cfg.evidence_for(True)], full, mass)["out err"])
        print(f"| {name} | {b:.0%} | " + " | ".join(f"{c:.4f}" for c in cells) + " |", flush=True)
