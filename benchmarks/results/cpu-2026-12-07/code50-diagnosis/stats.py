"""Per-layer statistics of SmolLM2's attention at the end of a 1,536-token prefill, and of the kept sets AccKV and
TOVA choose there (budget B, decode_budget="prompt"), with an oracle that looks at the continuation:

    python stats.py TEXT[,TEXT] BUDGET OUT.json

Per layer and kv head (a kv head's G = 3 query heads pooled where a statistic is per query head):
  ent_last     entropy (nats) of the last prompt query's attention, mean over the group's query heads
  sink_last    the last query's mass on the first 4 keys
  loc_last     the last query's share of non-sink mass on the last 256 keys
  loc_win      the same for the last 32 queries (evidence-mix/common.local_share)
  top_last     the last query's mass on its top 5% keys
  jacc         |A ∩ T| / |A ∪ T|, A: AccKV's kept positions in this kv head, T: TOVA's (the same in every head)
  rec_A, rec_T the share of the last 256 prompt tokens each keeps
  lastcap_A/T  the last query's mass (group mean) that falls on A / on T
  wincap_A/T   the same for the last 32 queries
  meancap_A/T  the every-query mean x ||v|| evidence (AccKV's score, normalised to sum 1 per row) on A / on T
  headjacc     mean Jaccard of AccKV's kept sets between the layer's kv heads (how head-specific it is)
  ev_A/T       oracle: the continuation's 128 queries (full cache) mass on prompt tokens A / T evicts
  err_A/T      oracle: relative attention-output error ||o_kept - o_full|| / ||o_full|| of those queries when the
               evicted prompt tokens are masked (every continuation token kept), mean over queries and heads
The q, k, v are captured from one uncompressed-shape pass over context + continuation (the torch twin of the
prompt's one-pass attention, hooked; causal, so the first 1,536 positions are the prefill's)."""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "evidence-mix"))
from common import TEXTS, local_share  # noqa: E402

from acckv_triton import AccKVConfig, apply_acckv, torch_ops  # noqa: E402
from acckv_triton.bench import realmodel  # noqa: E402

CTX, CONT = 1536, 128
CAP = []
_orig = torch_ops.observed_attention


def _hook(q, k, v=None, **kw):
    CAP.append((q[0].float().clone(), k[0].float().clone(), None if v is None else v[0].float().clone()))
    return _orig(q, k, v, **kw)


def kept_positions(model, ids, cfg):
    with apply_acckv(model, cfg) as h, torch.no_grad():
        cache = h.new_cache()
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        out = []
        for layer in cache.compressed_layers:
            st = layer.store
            rows = []
            for hh in range(st.lengths.shape[1]):
                n = int(st.lengths[0, hh])
                m = torch.zeros(ids.shape[1], dtype=torch.bool)
                m[st.position[0, hh, :n].long()] = True
                rows.append(m)
            out.append(torch.stack(rows))  # [Hkv, T] bool
    return out


def attn(q, k, rows, T_keys):
    """[Hq, len(rows), T_keys] causal softmax of queries at positions ``rows`` over keys 0..T_keys-1."""
    Hq, _, D = q.shape
    G = Hq // k.shape[0]
    kk = k[:, :T_keys].repeat_interleave(G, 0)
    lg = q[:, rows] @ kk.transpose(-1, -2) * D ** -0.5
    pos = torch.arange(T_keys)
    lg = lg.masked_fill(pos[None, None, :] > torch.as_tensor(rows)[None, :, None], float("-inf"))
    return torch.softmax(lg, -1)


def layer_stats(q, k, v, A, Tm):
    Hq, N, D = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    out = {}
    pl = attn(q, k, [CTX - 1], CTX)[:, 0]  # [Hq, CTX]
    pw = attn(q, k, list(range(CTX - 32, CTX)), CTX)  # [Hq, 32, CTX]
    g = lambda x: x.view(Hkv, G, *x.shape[1:]).mean(1)  # noqa: E731
    ent = -(pl.clamp_min(1e-30).log() * pl).sum(-1)
    out["ent_last"] = g(ent)
    out["sink_last"] = g(pl[:, :4].sum(-1))
    out["loc_last"] = g(pl[:, -256:].sum(-1) / pl[:, 4:].sum(-1))
    out["loc_win"] = local_share(q[None, :, :CTX], k[None, :, :CTX])[0]
    kk = max(1, CTX // 20)
    out["top_last"] = g(pl.topk(kk, -1).values.sum(-1))
    Ac, Tc = A[:, :CTX].float(), Tm[:, :CTX].float()
    out["jacc"] = (Ac * Tc).sum(-1) / ((Ac + Tc) > 0).float().sum(-1)
    out["rec_A"], out["rec_T"] = Ac[:, -256:].mean(-1), Tc[:, -256:].mean(-1)
    plg, pwg = g(pl), g(pw).mean(1)
    out["lastcap_A"], out["lastcap_T"] = (plg * Ac).sum(-1), (plg * Tc).sum(-1)
    out["wincap_A"], out["wincap_T"] = (pwg * Ac).sum(-1), (pwg * Tc).sum(-1)
    # AccKV's evidence: every query's mass / queries that saw the token, x ||v||
    mass = torch.zeros(Hkv, CTX)
    for s in range(0, CTX, 256):
        rows = list(range(s, min(s + 256, CTX)))
        mass += g(attn(q, k, rows, CTX).sum(1)) * G
    score = mass / (CTX - torch.arange(CTX)).float() * v[:, :CTX].norm(dim=-1)
    score = score / score.sum(-1, keepdim=True)
    out["meancap_A"], out["meancap_T"] = (score * Ac).sum(-1), (score * Tc).sum(-1)
    hj = [((A[i, :CTX] & A[j, :CTX]).sum() / (A[i, :CTX] | A[j, :CTX]).sum()).item()
          for i in range(Hkv) for j in range(i + 1, Hkv)]
    out["headjacc"] = torch.full((Hkv,), sum(hj) / len(hj))
    # oracle: continuation queries over the full cache
    rows = list(range(CTX, CTX + CONT))
    pc = attn(q, k, rows, CTX + CONT)  # [Hq, CONT, CTX+CONT]
    vv = v.repeat_interleave(G, 0)[:, :CTX + CONT]
    o_full = pc @ vv
    for name, M in (("A", A), ("T", Tm)):
        keep = torch.ones(Hkv, CTX + CONT, dtype=torch.bool)
        keep[:, :CTX] = M[:, :CTX]
        kq = keep.repeat_interleave(G, 0)[:, None, :]
        out[f"ev_{name}"] = g((pc * ~kq).sum(-1).mean(-1))
        pk = pc * kq
        pk = pk / pk.sum(-1, keepdim=True)
        err = (pk @ vv - o_full).norm(dim=-1) / o_full.norm(dim=-1)
        out[f"err_{name}"] = g(err.mean(-1))
    return {k_: [round(float(x), 5) for x in v_] for k_, v_ in out.items()}


def main():
    texts, budget, out_path = sys.argv[1].split(","), float(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    model, tok = realmodel.load_smollm2()
    res = json.load(open(out_path)) if os.path.exists(out_path) else {}
    acc = AccKVConfig(budget=budget, decode_budget="prompt", backend="torch")
    tova = acc.replace(method="tova")
    for name in texts:
        ids = tok(TEXTS[name](), return_tensors="pt").input_ids[:, :CTX + CONT]
        A = kept_positions(model, ids[:, :CTX], acc)
        Tm = kept_positions(model, ids[:, :CTX], tova)
        CAP.clear()
        torch_ops.observed_attention = _hook
        try:
            with apply_acckv(model, acc) as h, torch.no_grad():
                model(ids, past_key_values=h.new_cache(), use_cache=True, logits_to_keep=1)
        finally:
            torch_ops.observed_attention = _orig
        assert len(CAP) == len(A)
        res[f"{name}@{budget}"] = [layer_stats(q, k, v, A[i], Tm[i]) for i, (q, k, v) in enumerate(CAP)]
        print(name, "done", flush=True)
        with open(out_path, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
