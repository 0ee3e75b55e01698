"""Readings of this folder's rows (no model run): the per-layer swap effects against the end-of-prefill statistics
and the continuation oracle (stats.json), and the rule table.

    python analyse.py"""
import json

import torch

S = json.load(open("stats.json"))
rows = json.load(open("rows-groups.json")) + json.load(open("rows-single.json"))
base = {r["text"]: r["kl"] for r in rows if r["variant"] == "acckv"}
swap = {(r["text"], int(r["variant"].split(":")[1])): r["kl"] - base[r["text"]] for r in rows
        if r["variant"].startswith("acckv/tova:") and r["variant"].split(":")[1].isdigit()}


def m(d, k):
    return sum(d[k]) / len(d[k])


X = {}
for t in ("code", "prose"):
    for i, d in enumerate(S[t + "@0.5"]):
        X[(t, i)] = {**{f: m(d, f) for f in ("ent_last", "sink_last", "loc_last", "loc_win", "top_last", "jacc",
                                             "rec_A", "rec_T", "headjacc")},
                     "lastcap_T-A": m(d, "lastcap_T") - m(d, "lastcap_A"),
                     "wincap_T-A": m(d, "wincap_T") - m(d, "wincap_A"),
                     "oracle ev_A-T": m(d, "ev_A") - m(d, "ev_T"), "oracle err_A-T": m(d, "err_A") - m(d, "err_T")}


def corr(a, b):
    a, b = torch.tensor(a), torch.tensor(b)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


pts = sorted(swap)
print(f"Pearson r with the KL change of a single-layer TOVA swap ({len(pts)} layer x text points, 50%):")
for f in X[pts[0]]:
    print(f"  {f:15s} {corr([X[p][f] for p in pts], [swap[p] for p in pts]):+.2f}")
big = [p for p in pts if abs(swap[p]) > 0.0005]
print("cells where the swap moves KL by > 0.0005: text, layer, KL change, oracle err_A-T, loc_last")
for p in big:
    print(f"  {p[0]:6s} {p[1]:3d} {swap[p]:+.5f} {X[p]['oracle err_A-T']:+.4f} {X[p]['loc_last']:.3f}")
R = json.load(open("rows-rule.json"))
L = {r["text"]: r for r in json.load(open("rows-rule-local.json"))}
print("| text | budget | AccKV top-1 / KL | broad->tova top-1 / KL | KL change | local->tova (50%) |")
print("|---|---|---|---|---|---|")
P = {(r["text"], r["budget"], r["variant"]): r for r in R}
for t in ("prose", "code", "compound", "dataclasses", "types", "functools"):
    for b in (0.5, 0.25, 0.1):
        a, r = P[(t, b, "acckv")], P[(t, b, "broad->tova")]
        loc = L[t] if b == 0.5 else None
        lc = f"{loc['top1']:.3f} / {loc['kl']:.4g} ({100 * (loc['kl'] / a['kl'] - 1):+.0f}%)" if loc else ""
        print(f"| {t} | {int(b * 100)}% | {a['top1']:.3f} / {a['kl']:.4g} | {r['top1']:.3f} / {r['kl']:.4g} | "
              f"{100 * (r['kl'] / a['kl'] - 1):+.1f}% | {lc} |")
