"""Experiment: on text-only prompts, evicted tokens merge into an adjacent kept token (chain of slot-order
neighbours with key cosine >= theta, groups of at most 4; selection unchanged: tokens compete alone).
usage: run.py TEXTS OUT.json MODES   (modes: base, m0.9, m0.8, g0.9 = groups compete with summed score)"""
import sys, inspect, textwrap
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "cpu-2026-12-07" / "evidence-mix"))
import torch, common
from acckv_triton import policy, cache as cache_mod, AccKVConfig
from acckv_triton.modality import Modality

STATE = {"theta": None, "compete": False}

def text_groups(x, s_hat, cand, theta, max_group=4):
    """rep [B,H,N]: adjacent candidate text tokens (slot order) whose keys' cosine >= theta chain; cut every max_group."""
    B, H, N = s_hat.shape
    dev = s_hat.device
    ar = torch.arange(N, device=dev).expand(B, H, N)
    kn = torch.nn.functional.normalize(x.keys.double(), dim=-1)
    cos = (kn[:, :, 1:] * kn[:, :, :-1]).sum(-1)
    link = cand[:, :, 1:] & cand[:, :, :-1] & (cos >= theta)
    brk = torch.cat([torch.ones_like(link[:, :, :1]), ~link], dim=-1)
    start = torch.cummax(torch.where(brk, ar, torch.zeros_like(ar)), dim=-1).values
    brk = brk | ((ar - start) % max_group == 0)
    gid = torch.cumsum(brk.long(), dim=-1) - 1
    s = torch.where(cand, s_hat, torch.full_like(s_hat, -1.0))
    gmax = torch.full_like(s, float("-inf")).scatter_reduce(2, gid, s, "amax")
    is_best = s >= torch.gather(gmax, 2, gid)
    best_pos = torch.full_like(gid, N).scatter_reduce(2, gid, torch.where(is_best, ar, N), "amin")
    rep = torch.gather(best_pos, 2, gid)
    return torch.where(cand, rep, ar)

OLD = """        kept |= _topk_mask(s_hat, free, cand)
        merge_to = torch.full_like(ar, -1) if cfg.intra_merge else None
        return _finish(kept, merge_to, s_raw, mod, valid, rho, priority)"""
NEW = """        if _TM["theta"] is None:
            kept |= _topk_mask(s_hat, free, cand)
            merge_to = torch.full_like(ar, -1) if cfg.intra_merge else None
            return _finish(kept, merge_to, s_raw, mod, valid, rho, priority)
        rep = _text_groups(x, s_hat, cand, _TM["theta"])
        if _TM["compete"]:
            is_rep = cand & (rep == ar)
            gs = _segment_sum(torch.where(cand, s_hat, torch.zeros_like(s_hat)), rep, N).float()
            kept |= _topk_mask(gs, free, is_rep)
            rest = target - kept.sum(-1)
            kept |= _topk_mask(s_hat, rest, cand & ~kept)
        else:
            kept |= _topk_mask(s_hat, free, cand)
            # an evicted member merges into a kept member of its chain: the best kept one
            sk = torch.where(kept & cand, s_hat, torch.full_like(s_hat, -1.0))
            B_, H_, N_ = s_hat.shape
            brk = torch.cat([torch.ones_like(rep[:, :, :1], dtype=torch.bool), rep[:, :, 1:] != rep[:, :, :-1]], -1)
            gid = torch.cumsum(brk.long(), -1) - 1
            gmax = torch.full_like(sk, float("-inf")).scatter_reduce(2, gid, sk, "amax")
            isb = (sk >= torch.gather(gmax, 2, gid)) & (sk >= 0)
            bp = torch.full_like(gid, N_).scatter_reduce(2, gid, torch.where(isb, ar, N_), "amin")
            tgt = torch.gather(bp, 2, gid)
            rep = torch.where(tgt < N_, tgt, ar)
        rep_kept = torch.gather(kept, 2, rep)
        merge_to = torch.where(cand & ~kept & rep_kept & (rep != ar), rep, torch.full_like(rep, -1))
        return _finish(kept, merge_to, s_raw, mod, valid, rho, priority)"""
src = textwrap.dedent(inspect.getsource(policy.plan_layer))
assert OLD in src
policy.__dict__.update(_TM=STATE, _text_groups=text_groups)
ns = {}
exec(src.replace(OLD, NEW), policy.__dict__, ns)
policy.plan_layer = ns["plan_layer"]
cache_mod.plan_layer = ns["plan_layer"]

def before(mode):
    STATE["theta"] = None if mode == "base" else float(mode[1:])
    STATE["compete"] = mode.startswith("g")

common.run(sys.argv[1], sys.argv[2], sys.argv[3], lambda mode: AccKVConfig(), before=before)
