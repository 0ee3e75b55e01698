"""Two figures docs/algorithm.md quotes, on the AV bench's default workload (780 tokens, 10% budget): AccKV with all
text protected (`protect_text=True`) against the default, and AccKV ranking by the every-query mean instead of the
window's evidence. Decode-output error (the AV fidelity table's "out err"); H2O for reference.

    OMP_NUM_THREADS=1 python benchmarks/results/cpu-2026-12-07/av-doc-figures/run.py
"""
from acckv_triton import AccKVConfig, workloads
from acckv_triton.bench import av

w = workloads.generate_av_workload(num_chunks=6, num_decode_queries=8)
full, mass = av.full_outputs(w), av.full_token_masses(w)
scores = {e: av.prefill_scores(w, e) for e in ("window", "mean", "observed")}
rows = [("AccKV (default: window evidence, text not protected)", AccKVConfig(budget=0.1), "window"),
        ("AccKV, protect_text=True", AccKVConfig(budget=0.1, protect_text=True), "window"),
        ("AccKV, evidence='mean'", AccKVConfig(budget=0.1, evidence="mean"), "mean"),
        ("H2O", AccKVConfig(budget=0.1, method="h2o"), "observed")]
print(f"{w.num_tokens} tokens, {int((w.modality == 0).sum())} of them text; budget 10%")
print("| row | out err |\n|---|---|")
for name, cfg, ev in rows:
    print(f"| {name} | {av.evaluate(w, cfg, scores[ev], full, mass)['out err']:.3f} |")
