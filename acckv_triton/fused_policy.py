"""The policy of :func:`acckv_triton.policy.plan_layer` in a handful of launches, with no host synchronisation.

``plan_layer_fused(cfg, x, layer, num_layers, target=..., max_keep=...)`` returns the same
:class:`~acckv_triton.policy.PolicyResult` as ``plan_layer`` (the same keep sets, keep lengths, merge targets and
weights; float statistics in float64 on both sides, so the order of a sum never flips a decision), built from Triton
kernels and ``torch.sort``. Every size comes from the host: the plan is ``max_keep`` slots wide (the caller's bound
on the target, e.g. the budget of the prompt length), so nothing is read back from the device.

Launches per layer (one program per (sequence, kv head) row; each loops over its row in blocks):
    ``_evidence_kernel``   cleaned scores, valid ranks, per-modality counts and sums, the pooled rank scores
                           (a counting sort by modality into scratch, then pooling along each modality's own order)
    ``_protect_kernel``    protection levels, the protected top-``target`` (newest first within a level), candidates;
                           StreamingLLM's recent tokens; AccKV's redistributed scores and merge-chain sort keys
    ``torch.sort``         AccKV only: candidates by (class, video patch, token), bringing each merge chain together
    ``_groups_kernel``     AccKV only: chain links from neighbouring keys' cosine, groups cut every ``max_group``,
                           representatives, group scores and masses; the focusing shares, priority and budgets
                           (none, and pooled scores for the ranking, on a row with nothing to merge)
    ``torch.sort`` + ``_consume_kernel``, up to three times: a ranking, then each modality's (or the row's) best
                           within budget; between the rounds, AccKV's cross-modal alignment and the leftover fill;
                           the last round emits the plan (keep, keep_lengths, merge targets and weights)
    ``_nearest_kernel``    LOOK-M only: each evicted token's nearest kept key (cosine, float64), in O(1) memory
    ``_ada_pool_kernel`` + ``torch.sort`` + ``_ada_share_kernel``   adaptive head budgets (Ada-KV, KVzip): each
                           row's floor, and its candidates beyond it ranked across the heads of its sequence, which
                           share what the rows' floors leave of their budgets; the rows' targets after

SnapKV-like methods: 3 kernels and 1 sort (Ada-KV: 5 and 2); AccKV: 6 kernels and 4 sorts; plus 2 allocations
(scratch, plan).
"""
from __future__ import annotations

import dataclasses
import struct

import torch
import triton
import triton.language as tl

from . import tuning  # noqa: F401  (sets TRITON_INTERPRET before any kernel is defined)
from .config import AccKVConfig
from .modality import NUM_MODALITIES
from .ops._common import carve, carved_nbytes, next_pow2
from .plan import CompactionPlan
from .policy import POOLED_METHODS, LayerTokens, PolicyResult, head_shared_scores, recent_tokens

__all__ = ["plan_layer_fused", "supports"]

_EPS = 1e-12
_BLOCK = 1024
_NSTAT = 32
"""Per-row statistics, float64 (ints are exact): [0:4] valid tokens per modality, [4:8] the focusing mass A per
modality, [8:12] the score sum per modality, [12:16] the candidates' score per modality, [16:20] the budgets per
modality; then 20 valid tokens, 21 the first AV time, 22 free slots after protection, 23 the target, 24 candidates,
25 the leftover budget, 26 modality ids out of range; with adaptive head budgets 27 the row's floor, 28 its cap, 29
its free budget beyond the floor (what it gives to its sequence's pool), 30 its candidates in that pool."""
_S_BAD = 26


def _f64_bits(x: float) -> int:
    """``x`` as the int64 that holds its float64 bits, for a kernel argument used in float64 arithmetic.

    A Python float kernel argument is not float64 in a kernel: compiled, Triton types it fp32 (0.2 arrives as
    0.2000000030); under Triton 3.6's interpreter it becomes an fp32 constant where it meets a float64 block; only
    Triton 3.9's interpreter keeps it exact. Thresholds and weights compared with the float64 reference's must arrive
    exactly, so they travel as their bits and :func:`_f64` reads them back."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def _f64(bits):
    """The float64 whose bits :func:`_f64_bits` packed, exactly. Compiled, Triton types an int argument by its
    value: int32 when the bits fit one (0.0 and the smallest denormals; sign-extended here, exact since those bits
    are >= 0), int64 otherwise, and a constexpr where they equal 1 (5e-324), which has no ``.to``: ``tl.cast``
    takes all three."""
    return tl.cast(tl.cast(bits, tl.int64), tl.float64, bitcast=True)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _row_vec4(ptr, base):
    """The 4 float64 statistics at ``ptr + base``."""
    return tl.load(ptr + base + tl.arange(0, 4))


@triton.jit
def _batch_vec4(stats, b, H, base, NSTAT: tl.constexpr):
    """Sum over the kv heads of sequence b of a 4-wide statistic."""
    acc = tl.zeros((4,), tl.float64)
    for hh in range(0, H):
        acc += tl.load(stats + (b * H + hh) * NSTAT + base + tl.arange(0, 4))
    return acc


@triton.jit
def _pick(v, m):
    """Element m (a scalar or a block of indices) of the 4-vector v."""
    return tl.sum(tl.where(m[:, None] == tl.arange(0, 4)[None, :], v[None, :], 0), 1)


@triton.jit
def _row(STATS, N, H, NSTAT: tl.constexpr):
    """This program's row r = (sequence b, kv head h), its offset in the [R, N] scratch and its statistics."""
    r = tl.program_id(0)
    return r, r // H, r % H, r.to(tl.int64) * N, STATS + r * NSTAT


@triton.jit
def _load_mod(MOD, offs, mask, use):
    """Modality ids (int32) where ``use``, else 0; an id out of range reads as text, so that no kernel indexes
    scratch by it (the evidence kernel counts such ids for the caller's check)."""
    m = tl.load(MOD + offs, mask=mask, other=0).to(tl.int32)
    return tl.where(use & (m < 4), m, 0)


@triton.jit
def _block(RANK, MOD, row, mod_base, s0, N, BLOCK: tl.constexpr):
    """One block of a row's tokens: indices, in-bounds mask, valid rank (-1 invalid), validity, modality (0 if
    invalid: slots past the lengths may hold any id)."""
    t = s0 + tl.arange(0, BLOCK)
    inb = t < N
    rank = tl.load(RANK + row + t, mask=inb, other=-1)
    valid = rank >= 0
    mod = _load_mod(MOD, mod_base + t, inb, valid)
    return t, inb, rank, valid, mod


@triton.jit
def _evidence_kernel(
    S, sSb, sSh, MOD, sMb, sMh, TIME, sTb, sTh, VALID, sVb, sVh, LEN, sLb, sLh,
    RAW, RANK, SRANK, SORT_S, SORT_I, STATS, N, H, SINK, lift,
    R_POOL: tl.constexpr, POOL_AVG: tl.constexpr, LIFT: tl.constexpr, REDIST_MASK: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_TIME: tl.constexpr, NSTAT: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    b = r // H
    h = r % H
    length = tl.load(LEN + b * sLb + h * sLh)
    row = r.to(tl.int64) * N
    m4 = tl.arange(0, 4)
    cnt = tl.zeros((4,), tl.int64)
    a_sum = tl.zeros((4,), tl.float64)
    s_sum = tl.zeros((4,), tl.float64)
    t0 = tl.full((), 2**62, tl.int64)
    bad = tl.zeros((), tl.int32)
    carry = tl.zeros((), tl.int32)
    for s0 in range(0, N, BLOCK):
        t = s0 + tl.arange(0, BLOCK)
        inb = t < N
        valid = inb & (t < length)  # a length past N counts N tokens (as plan_layer's mask does), never more
        if HAS_VALID:
            valid = valid & (tl.load(VALID + b * sVb + h * sVh + t, mask=inb, other=0) != 0)
        mod_in = tl.load(MOD + b * sMb + h * sMh + t, mask=inb, other=0).to(tl.int32)
        bad += tl.sum((valid & (mod_in >= 4)).to(tl.int32), 0)
        mod = tl.where(valid & (mod_in < 4), mod_in, 0)  # as _load_mod reads it
        s = tl.load(S + b * sSb + h * sSh + t, mask=inb, other=0.0).to(tl.float32)
        s = tl.where(s != s, 0.0, s)
        s = tl.minimum(s, 3.4028234663852886e38)
        s = tl.where(valid, tl.maximum(s, 0.0), 0.0)
        rank = carry + tl.cumsum(valid.to(tl.int32), 0) - 1
        carry += tl.sum(valid.to(tl.int32), 0)
        tl.store(RAW + row + t, s, mask=inb)
        tl.store(RANK + row + t, tl.where(valid, rank, -1), mask=inb)
        if R_POOL == 0:
            tl.store(SRANK + row + t, s, mask=inb)
        else:
            tl.store(SRANK + row + t, 0.0, mask=inb & ~valid)
        onehot = (mod[:, None] == m4[None, :]) & valid[:, None]
        cnt += tl.sum(onehot.to(tl.int64), 0)
        s64 = s.to(tl.float64)
        s_sum += tl.sum(tl.where(onehot, s64[:, None], 0.0), 0)
        if REDIST_MASK:
            a_tok = valid & (rank >= SINK) & (mod != 0)
        else:
            a_tok = valid
        a_sum += tl.sum(tl.where(onehot & a_tok[:, None], s64[:, None], 0.0), 0)
        if HAS_TIME:
            tm = tl.load(TIME + b * sTb + h * sTh + t, mask=inb, other=0).to(tl.int64)
            av = valid & ((mod == 1) | (mod == 2))
            t0 = tl.minimum(t0, tl.min(tl.where(av, tm, 2**62), 0))
    st = STATS + r * NSTAT
    tl.store(st + m4, cnt.to(tl.float64))
    tl.store(st + 4 + m4, a_sum)
    tl.store(st + 8 + m4, s_sum)
    tl.store(st + 20, carry.to(tl.float64))
    tl.store(st + 21, t0.to(tl.float64))
    tl.store(st + 26, bad.to(tl.float64))
    if R_POOL > 0:
        # counting sort of the valid tokens by modality: scratch position = start of the modality + rank inside it
        off = tl.cumsum(cnt, 0) - cnt
        mcarry = tl.zeros((4,), tl.int64)
        for s0 in range(0, N, BLOCK):
            t, inb, rank, valid, mod = _block(RANK, MOD, row, b * sMb + h * sMh, s0, N, BLOCK)
            onehot = ((mod[:, None] == m4[None, :]) & valid[:, None]).to(tl.int64)
            incl = tl.cumsum(onehot, 0) + mcarry[None, :]
            pos = tl.sum(tl.where(onehot != 0, incl - 1 + off[None, :], 0), 1)
            mcarry += tl.sum(onehot, 0)
            tl.store(SORT_S + row + pos, tl.load(RAW + row + t, mask=inb, other=0.0), mask=valid)
            tl.store(SORT_I + row + pos, t, mask=valid)
        tl.debug_barrier()
        n_valid = carry
        end = off + cnt
        for p0 in range(0, N, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            live = p < n_valid
            seg = (p[:, None] >= off[None, :]) & (p[:, None] < end[None, :])
            lo = tl.sum(tl.where(seg, off[None, :], 0), 1)
            hi = tl.sum(tl.where(seg, end[None, :], 0), 1)
            centre = tl.load(SORT_S + row + p, mask=live, other=0.0)
            if POOL_AVG:
                acc = centre.to(tl.float64)
                num = tl.full((BLOCK,), 1.0, tl.float64)
            else:
                acc = centre
            for jj in tl.static_range(0, 2 * R_POOL):
                q = p + tl.where(jj % 2 == 0, -(jj // 2 + 1), jj // 2 + 1)  # p-1, p+1, p-2, p+2, ...
                ok = live & (q >= lo) & (q < hi)
                val = tl.load(SORT_S + row + q, mask=ok, other=0.0)
                if POOL_AVG:
                    acc += tl.where(ok, val.to(tl.float64), 0.0)
                    num += ok.to(tl.float64)
                else:
                    acc = tl.where(ok, tl.maximum(acc, val), acc)
            if POOL_AVG:
                pooled = (acc / num).to(tl.float32)
            else:
                pooled = acc
            if LIFT:  # AccKV: a peak stays above the neighbourhood it lifts
                pooled = tl.maximum(centre, lift * pooled)
            tok = tl.load(SORT_I + row + p, mask=live, other=0)
            tl.store(SRANK + row + tok, pooled, mask=live)


@triton.jit
def _protect_kernel(
    MOD, sMb, sMh, SPATIAL, sPb, sPh, sPt, WIN, sWb, sWh, TARGET, sTgb, sTgh,
    RAW, RANK, SRANK, SHAT, KEYF, KEY64, CAND, KEPT, STATS, N, H, SINK, WINDOW, RECENT, win_lo, win_hi,
    P_SINK: tl.constexpr, P_WINDOW: tl.constexpr, P_RECENT: tl.constexpr, P_TEXT: tl.constexpr,
    P_ALL: tl.constexpr, WIN_MODE: tl.constexpr, MODE: tl.constexpr, REDIST: tl.constexpr, RENORM: tl.constexpr,
    MERGE_KEYS: tl.constexpr, HAS_SPATIAL: tl.constexpr, CAP_RECENT: tl.constexpr, NSTAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """MODE 0: one ranking by pooled score (keys in KEYF); 1: StreamingLLM (selects here); 2: AccKV."""
    r, b, h, row, st = _row(STATS, N, H, NSTAT)
    m4 = tl.arange(0, 4)
    n_b = _batch_vec4(STATS, b, H, 0, NSTAT)
    has_av = (tl.sum(tl.where(m4 >= 1, n_b, 0.0), 0) > 0).to(tl.int32)
    n_valid = tl.load(st + 20).to(tl.int32)
    target = tl.minimum(tl.load(TARGET + b * sTgb + h * sTgh).to(tl.int32), n_valid)
    if CAP_RECENT:  # AccKV: the recent tokens protect at most half the row's target (policy.recent_cap)
        RECENT = tl.minimum(RECENT, target // 2)
    if REDIST:
        a_b = _batch_vec4(STATS, b, H, 4, NSTAT)
        s_b = _batch_vec4(STATS, b, H, 8, NSTAT)
        nn = tl.maximum(n_b, 1.0)
        mean = tl.maximum(a_b / nn, 1e-12)
        mean = tl.where(a_b > 0, mean, tl.maximum(s_b / nn, 1e-12))
    # pass 1: tokens per protection level (index level - 1), candidates, the renormalisation sum
    lev_cnt = tl.zeros((4,), tl.int32)
    renorm = tl.zeros((), tl.float64)
    for s0 in range(0, N, BLOCK):
        t, inb, rank, valid, mod = _block(RANK, MOD, row, b * sMb + h * sMh, s0, N, BLOCK)
        level = _level(rank, valid, mod, has_av, n_valid, t, WIN, b * sWb + h * sWh, inb, SINK, WINDOW, RECENT,
                       win_lo, win_hi, P_SINK, P_WINDOW, P_RECENT, P_TEXT, P_ALL, WIN_MODE)
        lev_cnt += tl.sum(((level[:, None] - 1) == m4[None, :]).to(tl.int32), 0)
        if MODE == 2:
            s_rank = tl.load(SRANK + row + t, mask=inb, other=0.0)
            if REDIST:
                s_hat = (s_rank.to(tl.float64) / _pick(mean, mod)).to(tl.float32)
            else:
                s_hat = s_rank
            tl.store(SHAT + row + t, s_hat, mask=inb)
            renorm += tl.sum(tl.where(valid, s_hat.to(tl.float64), 0.0), 0)
    # the protected top-target: whole levels from 4 down, then the newest of the level that overflows
    c1 = tl.sum(tl.where(m4 == 0, lev_cnt, 0), 0)
    c2 = tl.sum(tl.where(m4 == 1, lev_cnt, 0), 0)
    c3 = tl.sum(tl.where(m4 == 2, lev_cnt, 0), 0)
    c4 = tl.sum(tl.where(m4 == 3, lev_cnt, 0), 0)
    lstar = tl.where(target < c4, 4, tl.where(target < c4 + c3, 3, tl.where(target < c4 + c3 + c2, 2,
                                                                            tl.where(target < c4 + c3 + c2 + c1, 1, 0))))
    above = tl.where(lstar == 4, 0, tl.where(lstar == 3, c4, tl.where(lstar == 2, c4 + c3, c4 + c3 + c2)))
    take = target - above
    c_star = tl.where(lstar == 4, c4, tl.where(lstar == 3, c3, tl.where(lstar == 2, c2, c1)))
    n_cand_total = n_valid - (c1 + c2 + c3 + c4)
    carry = tl.zeros((), tl.int32)
    n_kept = tl.zeros((), tl.int32)
    cmass = tl.zeros((4,), tl.float64)
    for s0 in range(0, N, BLOCK):
        t, inb, rank, valid, mod = _block(RANK, MOD, row, b * sMb + h * sMh, s0, N, BLOCK)
        level = _level(rank, valid, mod, has_av, n_valid, t, WIN, b * sWb + h * sWh, inb, SINK, WINDOW, RECENT,
                       win_lo, win_hi, P_SINK, P_WINDOW, P_RECENT, P_TEXT, P_ALL, WIN_MODE)
        at_star = (level == lstar) & (level > 0)
        incl = carry + tl.cumsum(at_star.to(tl.int32), 0)
        carry += tl.sum(at_star.to(tl.int32), 0)
        kept = (level > lstar) | (at_star & (c_star - incl < take))
        cand = valid & (level == 0)
        n_kept += tl.sum(kept.to(tl.int32), 0)
        tl.store(KEPT + row + t, kept.to(tl.int8), mask=inb)
        tl.store(CAND + row + t, cand.to(tl.int8), mask=inb)
        raw = tl.load(RAW + row + t, mask=inb, other=0.0)
        if MODE == 0:
            s_rank = tl.load(SRANK + row + t, mask=inb, other=0.0)
            tl.store(KEYF + row + t, tl.where(cand, s_rank, float("-inf")), mask=inb)
        if MODE == 2:
            onehot = (mod[:, None] == m4[None, :]) & cand[:, None]
            cmass += tl.sum(tl.where(onehot, raw.to(tl.float64)[:, None], 0.0), 0)
            if RENORM:
                s_hat = tl.load(SHAT + row + t, mask=inb, other=0.0)
                tl.store(SHAT + row + t, (s_hat.to(tl.float64) / tl.maximum(renorm, 1e-12)).to(tl.float32), mask=inb)
            if MERGE_KEYS:
                cls = tl.where(cand & (mod == 1), 0, tl.where(cand & (mod == 2), 1, 2)).to(tl.int64)
                if HAS_SPATIAL:
                    sp = SPATIAL + b * sPb + h * sPh + t.to(tl.int64) * sPt
                    hh = tl.minimum(tl.maximum(tl.load(sp, mask=inb, other=0), 0), 4095).to(tl.int64)
                    ww = tl.minimum(tl.maximum(tl.load(sp + 1, mask=inb, other=0), 0), 4095).to(tl.int64)
                    hw = (hh << 12) | ww
                else:
                    hw = tl.zeros((BLOCK,), tl.int64)
                key = (cls << 58) | (tl.where(cls == 1, hw, 0) << 32) | t.to(tl.int64)
                tl.store(KEY64 + row + t, key, mask=inb)
    free = target - n_kept
    if MODE == 1:  # StreamingLLM: the most recent `free` candidates
        carry = tl.zeros((), tl.int32)
        for s0 in range(0, N, BLOCK):
            t = s0 + tl.arange(0, BLOCK)
            inb = t < N
            cand = tl.load(CAND + row + t, mask=inb, other=0) != 0
            incl = carry + tl.cumsum(cand.to(tl.int32), 0)
            carry += tl.sum(cand.to(tl.int32), 0)
            recent = cand & (n_cand_total - incl < free)
            tl.store(KEPT + row + t, 1, mask=inb & recent)
    tl.store(st + 12 + m4, cmass)
    tl.store(st + 22, free.to(tl.float64))
    tl.store(st + 23, target.to(tl.float64))
    tl.store(st + 24, n_cand_total.to(tl.float64))


@triton.jit
def _level(rank, valid, mod, has_av, n_valid, t, WIN, win_base, inb, SINK, WINDOW, RECENT, win_lo, win_hi,
           P_SINK: tl.constexpr, P_WINDOW: tl.constexpr, P_RECENT: tl.constexpr, P_TEXT: tl.constexpr,
           P_ALL: tl.constexpr, WIN_MODE: tl.constexpr):
    """Protection level per token: 4 sink, 3 observation window, 2 recent, 1 text of an AV prompt, 0 none."""
    level = tl.zeros(rank.shape, tl.int32)
    if P_ALL:
        level = tl.where(valid, 4, 0)
    else:
        if P_TEXT:
            level = tl.where(valid & (mod == 0) & ((tl.zeros_like(mod) + has_av) != 0), 1, level)
        if P_RECENT:
            level = tl.where(valid & (rank >= n_valid - RECENT), 2, level)
        if P_WINDOW:
            if WIN_MODE == 0:
                win = rank >= n_valid - WINDOW
            elif WIN_MODE == 1:
                win = tl.load(WIN + win_base + t, mask=inb, other=0) != 0
            else:
                pos = tl.load(WIN + win_base + t, mask=inb, other=0)
                win = (pos >= win_lo) & (pos < win_hi)
            level = tl.where(valid & win, 3, level)
        if P_SINK:
            level = tl.where(valid & (rank < SINK), 4, level)
    return level


@triton.jit
def _groups_kernel(
    MOD, sMb, sMh, KEYS, sKb, sKh, sKt, RAW, RANK, SRANK, SHAT, SCORE, GMASS, CAND, ISREP, REP, KEYF,
    SKEY, SIDX, GID, BEST, GS, GM, GR, STATS, RHO, PRIO, N, H, D, theta_a_bits, theta_v_bits, MAXG, gamma_bits,
    rho_min_bits, redundancy_min_bits,
    MERGE: tl.constexpr, FREES: tl.constexpr, FOCUSING: tl.constexpr, GAMMA_ONE: tl.constexpr,
    VIDEO_PRIOR: tl.constexpr, NSTAT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r, b, h, row, st = _row(STATS, N, H, NSTAT)
    theta_a, theta_v, gamma = _f64(theta_a_bits), _f64(theta_v_bits), _f64(gamma_bits)
    rho_min, redundancy_min = _f64(rho_min_bits), _f64(redundancy_min_bits)
    m4 = tl.arange(0, 4)
    # ---- Step 1 (focusing): shares of the AV modalities present, the priority modality, this row's budgets ----
    n_b = _batch_vec4(STATS, b, H, 0, NSTAT)
    a_b = _batch_vec4(STATS, b, H, 4, NSTAT)
    present = (n_b > 0) & (m4 >= 1)
    a_pos = tl.maximum(a_b, 0.0)
    if GAMMA_ONE:
        a_av = a_pos
    else:
        a_av = tl.where(a_pos > 0, tl.exp(gamma * tl.log(tl.maximum(a_pos, 1e-300))), tl.where(gamma == 0, 1.0, 0.0))
    a_av = tl.where(present, a_av, 0.0)
    rho = tl.where(present, a_av / tl.maximum(tl.sum(a_av, 0), 1e-12), 0.0)
    n_present = tl.sum(present.to(tl.int32), 0)
    rho = tl.where(present & (n_present > 1), tl.maximum(rho, rho_min), rho)
    rho = rho / tl.maximum(tl.sum(rho, 0), 1e-12)
    rho_a = tl.sum(tl.where(m4 == 1, rho, 0.0), 0)
    rho_v = tl.sum(tl.where(m4 == 2, rho, 0.0), 0)
    both = tl.sum(tl.where((m4 == 1) | (m4 == 2), present.to(tl.int32), 0), 0) == 2
    prio = tl.where(both, tl.where(rho_v >= rho_a, 2, 1), -1)
    if VIDEO_PRIOR:
        prio = tl.where(both, 2, prio)
        lo = tl.minimum(rho_a, rho_v)
        hi = tl.maximum(rho_a, rho_v)
        rho = tl.where(both & (m4 == 1), lo, tl.where(both & (m4 == 2), hi, rho))
    free = tl.load(st + 22)
    if FOCUSING:
        cm_b = _batch_vec4(STATS, b, H, 12, NSTAT)
        text_mass = tl.sum(tl.where(m4 == 0, cm_b, 0.0), 0)
        total = tl.sum(cm_b, 0)
        text_share = tl.where(total > 0, text_mass / tl.maximum(total, 1e-12), 0.0)
        share = rho * (1.0 - text_share)
        share = tl.where(m4 == 0, tl.where(n_present > 0, text_share, 1.0), share)
        budgets = tl.floor(share * free)
    else:
        budgets = tl.zeros((4,), tl.float64)
    if h == 0:
        tl.store(RHO + b * 4 + m4, rho.to(tl.float32))
        tl.store(PRIO + b, prio.to(tl.int64))
    # ---- Step 3a (intra-modal integration): chains in the sorted order, groups, representatives ----
    if MERGE:
        for p0 in range(0, N, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            tl.store(BEST + row + p, -1, mask=p < N)
            tl.store(GS + row + p, 0.0, mask=p < N)
            tl.store(GM + row + p, 0.0, mask=p < N)
            tl.store(GR + row + p, 0.0, mask=p < N)
        tl.debug_barrier()
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        start_c = tl.zeros((), tl.int32)
        gid_c = tl.zeros((), tl.int32)
        n_link = tl.zeros((), tl.int32)
        n_av = tl.zeros((), tl.int32)
        for p0 in range(0, N, BLOCK_G):
            p = p0 + tl.arange(0, BLOCK_G)
            inb = p < N
            key = tl.load(SKEY + row + p, mask=inb, other=2 << 58)
            tok = tl.load(SIDX + row + p, mask=inb, other=0)
            pkey = tl.load(SKEY + row + p - 1, mask=inb & (p >= 1), other=3 << 58)
            ptok = tl.load(SIDX + row + p - 1, mask=inb & (p >= 1), other=0)
            cls = (key >> 58).to(tl.int32)
            pcls = (pkey >> 58).to(tl.int32)
            hw = (key >> 32) & 0xFFFFFF
            phw = (pkey >> 32) & 0xFFFFFF
            ka = tl.load(KEYS + b * sKb + h * sKh + tok[:, None] * sKt + d[None, :], mask=inb[:, None] & dm[None, :],
                         other=0.0).to(tl.float64)
            kb = tl.load(KEYS + b * sKb + h * sKh + ptok[:, None] * sKt + d[None, :],
                         mask=(inb & (p >= 1))[:, None] & dm[None, :], other=0.0).to(tl.float64)
            na = tl.maximum(tl.sqrt(tl.sum(ka * ka, 1)), 1e-12)
            nb = tl.maximum(tl.sqrt(tl.sum(kb * kb, 1)), 1e-12)
            cos = tl.sum((ka / na[:, None]) * (kb / nb[:, None]), 1)
            theta = tl.where(cls == 0, theta_a, theta_v)
            link = (p >= 1) & (cls == pcls) & (cls < 2) & (hw == phw) & (cos >= theta)
            n_link += tl.sum((link & inb).to(tl.int32), 0)
            n_av += tl.sum((inb & (cls < 2)).to(tl.int32), 0)
            brk = ~link
            start = tl.maximum(tl.associative_scan(tl.where(brk, p, 0), 0, _max_combine), start_c)
            brk = brk | ((p - start) % MAXG == 0)
            gid = gid_c + tl.cumsum(brk.to(tl.int32), 0) - 1
            start_c = tl.max(tl.where(inb, start, 0), 0)
            gid_c = tl.max(tl.where(inb, gid, -1), 0) + 1
            tl.store(GID + row + p, gid, mask=inb)
            s_hat = tl.load(SHAT + row + tok, mask=inb, other=0.0)
            raw = tl.load(RAW + row + tok, mask=inb, other=0.0)
            bits = (s_hat + 0.0).to(tl.int32, bitcast=True).to(tl.int64)
            tl.atomic_max(BEST + row + gid, (bits << 32) | (N - 1 - p).to(tl.int64), mask=inb)
            grouped = inb & (cls < 2)
            tl.atomic_add(GS + row + gid, s_hat.to(tl.float64), mask=grouped)
            tl.atomic_add(GM + row + gid, raw.to(tl.float64), mask=grouped)
            srank = tl.load(SRANK + row + tok, mask=inb, other=0.0)
            tl.atomic_add(GR + row + gid, srank.to(tl.float64), mask=grouped)
        tl.debug_barrier()
        # fallback: little redundancy leaves nothing for the modality budgets to trade for: rank by pooled scores
        weak = (n_av > 0) & (n_link.to(tl.float64) < redundancy_min * n_av.to(tl.float64))
    else:
        weak = tl.zeros((), tl.int1)
    tl.store(st + 16 + m4, tl.where(weak, 0.0, budgets))
    prio_b = prio
    for p0 in range(0, N, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        inb = p < N
        if MERGE:
            key = tl.load(SKEY + row + p, mask=inb, other=2 << 58)
            tok = tl.load(SIDX + row + p, mask=inb, other=0).to(tl.int32)
            grouped = (key >> 58) < 2
            gid = tl.load(GID + row + p, mask=inb, other=0)
            best = tl.load(BEST + row + gid, mask=inb, other=0)
            bpos = (N - 1 - (best & 0xFFFFFFFF)).to(tl.int64)
            rep = tl.where(grouped, tl.load(SIDX + row + bpos, mask=inb & grouped, other=0).to(tl.int32), tok)
        else:
            tok = p
            grouped = tl.zeros((BLOCK,), tl.int1)
            rep = tok
        cand = tl.load(CAND + row + tok, mask=inb, other=0) != 0
        s_hat = tl.load(SHAT + row + tok, mask=inb, other=0.0)
        raw = tl.load(RAW + row + tok, mask=inb, other=0.0)
        if MERGE:  # the fallback rows rank by pooled scores; the leftover fill reads them back from SHAT
            s_hat = tl.where(weak, tl.load(SRANK + row + tok, mask=inb, other=0.0), s_hat)
            tl.store(SHAT + row + tok, s_hat, mask=inb)
        if FREES:
            is_rep = cand & (rep == tok)
            score = tl.where(cand, s_hat, 0.0)
            mass = tl.where(cand, raw, 0.0)
            if MERGE:
                gsum = tl.where(weak, tl.load(GR + row + gid, mask=inb, other=0.0),
                                tl.load(GS + row + gid, mask=inb, other=0.0))
                score = tl.where(grouped, tl.where(is_rep, gsum.to(tl.float32), 0.0), score)
                mass = tl.where(grouped, tl.where(is_rep, tl.load(GM + row + gid, mask=inb, other=0.0).to(tl.float32),
                                                  0.0), mass)
        else:
            is_rep = cand
            score = s_hat
            mass = raw
        rank = tl.load(RANK + row + tok, mask=inb, other=-1)
        mod = _load_mod(MOD, b * sMb + h * sMh + tok, inb, rank >= 0)
        pb = tl.zeros_like(mod) + prio_b  # a block: the interpreter mixes scalar and block masks badly
        is_l = (pb >= 0) & (mod != pb) & ((mod == 1) | (mod == 2))
        tl.store(REP + row + tok, rep, mask=inb)
        tl.store(ISREP + row + tok, is_rep.to(tl.int8), mask=inb)
        tl.store(SCORE + row + tok, score, mask=inb)
        tl.store(GMASS + row + tok, mass, mask=inb)
        tl.store(KEYF + row + tok, tl.where(is_rep & ~is_l, score, float("-inf")), mask=inb)


@triton.jit
def _consume_kernel(
    MOD, sMb, sMh, TIME, sTb, sTh, RAW, RANK, SHAT, SCORE, GMASS, CAND, ISREP, REP, KEPT, KEYF, SVAL, SIDX,
    BINM, HASP, STATS, PRIO, KEEP, KEEP_LEN, MT, MW, KPM, MERGED, N, H, K, time_bin, lam_bits,
    SORTED: tl.constexpr, PER_MOD: tl.constexpr, BUDGET: tl.constexpr, AFTER: tl.constexpr,
    ALIGN: tl.constexpr, MERGES: tl.constexpr, WEIGHTS: tl.constexpr, NSTAT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Keep the best of a sorted ranking within budget (per modality or per row), then AFTER: 1 alignment and the
    L keys, 2 the leftover keys, 3 the plan. BUDGET: 0 stats free, 1 stats budgets, 2 stats rest."""
    r, b, h, row, st = _row(STATS, N, H, NSTAT)
    m4 = tl.arange(0, 4)
    if BUDGET == 1:
        bud = tl.load(st + 16 + m4)
    elif BUDGET == 2:
        bud = tl.where(m4 == 0, tl.load(st + 25), 0.0)
    else:
        bud = tl.where(m4 == 0, tl.load(st + 22), 0.0)
    if AFTER == 1:
        for p0 in range(0, N, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            tl.store(BINM + row + p, 0.0, mask=p < N)
            tl.store(HASP + row + p, 0, mask=p < N)
    if SORTED:
        carry = tl.zeros((4,), tl.int64)
        for p0 in range(0, N, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            inb = p < N
            key = tl.load(SVAL + row + p, mask=inb, other=float("-inf"))
            tok = tl.load(SIDX + row + p, mask=inb, other=0)
            ok = inb & (key > float("-inf"))
            if PER_MOD:
                rank = tl.load(RANK + row + tok, mask=ok, other=-1)
                mod = _load_mod(MOD, b * sMb + h * sMh + tok, ok, rank >= 0)
            else:
                mod = tl.zeros((BLOCK,), tl.int32)
            onehot = ((mod[:, None] == m4[None, :]) & ok[:, None]).to(tl.int64)
            incl = tl.cumsum(onehot, 0) + carry[None, :]
            carry += tl.sum(onehot, 0)
            rnk = tl.sum(tl.where(onehot != 0, incl - 1, 0), 1).to(tl.float64)
            take = ok & (rnk < _pick(bud, mod))
            tl.store(KEPT + row + tok, 1, mask=take)
    tl.debug_barrier()
    if AFTER == 1:
        # ---- Step 3b (inter-modal alignment): P's kept mass per time bin calibrates L's scores ----
        prio = tl.load(PRIO + b).to(tl.int32)
        if ALIGN:
            t0 = tl.load(st + 21).to(tl.int64)
            for s0 in range(0, N, BLOCK):
                t, inb, rank, valid, mod = _block(RANK, MOD, row, b * sMb + h * sMh, s0, N, BLOCK)
                p_tok = valid & (mod == prio)  # prio -1 matches no token
                tm = tl.load(TIME + b * sTb + h * sTh + t, mask=inb, other=0).to(tl.int64)
                bins = tl.minimum(tl.maximum(tm - t0, 0) // time_bin, N - 1)
                kept_rep = (tl.load(KEPT + row + t, mask=inb, other=0) != 0) & \
                    (tl.load(ISREP + row + t, mask=inb, other=0) != 0)
                gm = tl.load(GMASS + row + t, mask=inb, other=0.0)
                tl.atomic_add(BINM + row + bins, gm.to(tl.float64), mask=p_tok & kept_rep)
                tl.store(HASP + row + bins, 1, mask=p_tok)
            tl.debug_barrier()
            total = tl.zeros((), tl.float64)
            n_bins = tl.zeros((), tl.int32)
            for p0 in range(0, N, BLOCK):
                p = p0 + tl.arange(0, BLOCK)
                total += tl.sum(tl.load(BINM + row + p, mask=p < N, other=0.0), 0)
                n_bins += tl.sum(tl.load(HASP + row + p, mask=p < N, other=0), 0)
            n_bins_f = tl.maximum(n_bins, 1).to(tl.float64)
        for s0 in range(0, N, BLOCK):
            t, inb, rank, valid, mod = _block(RANK, MOD, row, b * sMb + h * sMh, s0, N, BLOCK)
            pb = tl.zeros_like(mod) + prio
            is_l = (pb >= 0) & (mod != pb) & ((mod == 1) | (mod == 2))
            score = tl.load(SCORE + row + t, mask=inb, other=0.0)
            if ALIGN:  # t0, total and n_bins from the passes above
                tm = tl.load(TIME + b * sTb + h * sTh + t, mask=inb, other=0).to(tl.int64)
                bins = tl.minimum(tl.maximum(tm - t0, 0) // time_bin, N - 1)
                share = tl.where(total > 0, tl.load(BINM + row + bins, mask=inb, other=0.0) / tl.maximum(total, 1e-12),
                                 0.0)
                factor = tl.maximum(1.0 + _f64(lam_bits) * (n_bins_f * share - 1.0), 0.0)
                factor = tl.where(valid & is_l & ((tl.zeros_like(share) + total) > 0), factor, 1.0).to(tl.float32)
                score = score * factor
                tl.store(SCORE + row + t, score, mask=inb)
            is_rep = tl.load(ISREP + row + t, mask=inb, other=0) != 0
            tl.store(KEYF + row + t, tl.where(is_rep & is_l, score, float("-inf")), mask=inb)
    if AFTER == 2:
        # ---- the leftover fill: reps by group score, unmerged members by their own score ----
        n_kept = tl.zeros((), tl.int32)
        for s0 in range(0, N, BLOCK):
            t = s0 + tl.arange(0, BLOCK)
            inb = t < N
            valid = tl.load(RANK + row + t, mask=inb, other=-1) >= 0
            kept = tl.load(KEPT + row + t, mask=inb, other=0) != 0
            cand = tl.load(CAND + row + t, mask=inb, other=0) != 0
            is_rep = tl.load(ISREP + row + t, mask=inb, other=0) != 0
            n_kept += tl.sum((kept & valid).to(tl.int32), 0)
            s = tl.where(is_rep, tl.load(SCORE + row + t, mask=inb, other=0.0),
                         tl.load(SHAT + row + t, mask=inb, other=0.0))
            tl.store(KEYF + row + t, tl.where(cand & ~kept, s, float("-inf")), mask=inb)
        tl.store(st + 25, tl.load(st + 23) - n_kept.to(tl.float64))
    if AFTER == 3:
        # ---- the plan: slots in token order, keep indices, merge targets and weights ----
        carry = tl.zeros((), tl.int32)
        kpm = tl.zeros((4,), tl.int64)
        for s0 in range(0, N, BLOCK):
            t = s0 + tl.arange(0, BLOCK)
            inb = t < N
            rank = tl.load(RANK + row + t, mask=inb, other=-1)
            valid = rank >= 0
            kept = (tl.load(KEPT + row + t, mask=inb, other=0) != 0) & valid
            slot = carry + tl.cumsum(kept.to(tl.int32), 0) - 1
            carry += tl.sum(kept.to(tl.int32), 0)
            tl.store(HASP + row + t, tl.where(kept, slot, -1), mask=inb)
            tl.store(KEEP + r.to(tl.int64) * K + slot, t, mask=kept & (slot < K))  # K bounds every target
            mod = _load_mod(MOD, b * sMb + h * sMh + t, inb, valid)
            kpm += tl.sum(((mod[:, None] == m4[None, :]) & kept[:, None]).to(tl.int64), 0)
            if WEIGHTS:
                raw = tl.load(RAW + row + t, mask=inb, other=0.0)
                tl.store(MW + row + t, tl.maximum(raw, 1e-6), mask=inb)
        for j0 in range(0, K, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            tl.store(KEEP + r.to(tl.int64) * K + j, 0, mask=(j < K) & (j >= carry))
        tl.store(KEEP_LEN + r, carry)
        tl.store(KPM + r * 4 + m4, kpm)
        n_merged = tl.zeros((), tl.int64)
        if MERGES:
            tl.debug_barrier()
            for s0 in range(0, N, BLOCK):
                t = s0 + tl.arange(0, BLOCK)
                inb = t < N
                cand = tl.load(CAND + row + t, mask=inb, other=0) != 0
                kept = tl.load(HASP + row + t, mask=inb, other=-1) >= 0
                rep = tl.load(REP + row + t, mask=inb, other=0)
                rep_slot = tl.load(HASP + row + rep, mask=inb, other=-1)
                merging = cand & ~kept & (rep_slot >= 0) & (rep != t)
                tl.store(MT + row + t, tl.where(merging, rep_slot, -1), mask=inb)
                n_merged += tl.sum(merging.to(tl.int64), 0)
        tl.store(MERGED + r, n_merged)


@triton.jit
def _ada_pool_kernel(SVAL, POOL, TARGET, sTgb, sTgh, STATS, N, H, max_keep, floor_bits,
                     NSTAT: tl.constexpr, BLOCK: tl.constexpr):
    """Ada-KV, per row: its floor and cap (see ``policy._adaptive_targets``) and the candidates it offers its
    sequence's pool: ``POOL[row, p]`` = the row's p-th best candidate score where floor <= p < cap, else -inf."""
    r, b, h, row, st = _row(STATS, N, H, NSTAT)
    ada_floor = _f64(floor_bits)  # the host's float64 fraction, exactly
    free0 = tl.load(st + 22)
    protected = tl.load(st + 23) - free0
    requested = tl.load(TARGET + b * sTgb + h * sTgh).to(tl.float64)
    free = tl.maximum(requested - protected, 0.0)
    cap = tl.minimum(tl.load(st + 24), tl.maximum(max_keep - protected, 0.0))
    floor = tl.minimum(tl.floor(ada_floor * free), cap)
    tl.store(st + 27, floor)
    tl.store(st + 28, cap)
    tl.store(st + 29, free - floor)
    tl.store(st + 30, cap - floor)
    for p0 in range(0, N, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        pf = p.to(tl.float64)
        v = tl.load(SVAL + row + p, mask=p < N, other=float("-inf"))
        tl.store(POOL + row + p, tl.where((pf >= floor) & (pf < cap), v, float("-inf")), mask=p < N)


@triton.jit
def _ada_share_kernel(POOL_IDX, STATS, N, H, NSTAT: tl.constexpr, BLOCK: tl.constexpr):
    """Ada-KV, per row: how many of its sequence's shared budget it wins (its entries among the first ``share`` of
    the sequence's pool sorted by score, ties to the lower head and token), and its free budget and target after."""
    r, b, h, row, st = _row(STATS, N, H, NSTAT)
    share = tl.zeros((), tl.float64)
    pooled = tl.zeros((), tl.float64)
    for hh in range(0, H):
        share += tl.load(STATS + (b * H + hh) * NSTAT + 29)
        pooled += tl.load(STATS + (b * H + hh) * NSTAT + 30)
    n = tl.minimum(share, pooled).to(tl.int32)
    base = b.to(tl.int64) * H * N
    won = tl.zeros((), tl.int64)
    for j0 in range(0, n, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        idx = tl.load(POOL_IDX + base + j, mask=j < n, other=-1)
        won += tl.sum(((j < n) & (idx // N == h)).to(tl.int64), 0)
    free = tl.load(st + 27) + won.to(tl.float64)
    protected = tl.load(st + 23) - tl.load(st + 22)
    tl.store(st + 22, free)
    tl.store(st + 23, protected + free)


@triton.jit
def _nearest_kernel(KEYS, sKb, sKh, sKt, RANK, HASP, KEEP, KEEP_LEN, MT, MERGED, N, H, K, D,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """LOOK-M: merge target of each evicted valid token = the slot of its nearest kept key (cosine, float64)."""
    r = tl.program_id(0)
    b = r // H
    h = r % H
    row = r.to(tl.int64) * N
    t = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    inb = t < N
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    evicted = inb & (tl.load(RANK + row + t, mask=inb, other=-1) >= 0) & (tl.load(HASP + row + t, mask=inb, other=0) < 0)
    base = KEYS + b * sKb + h * sKh
    q = tl.load(base + t[:, None].to(tl.int64) * sKt + d[None, :], mask=evicted[:, None] & dm[None, :],
                other=0.0).to(tl.float64)
    q = q / tl.maximum(tl.sqrt(tl.sum(q * q, 1)), 1e-12)[:, None]
    n_keep = tl.minimum(tl.load(KEEP_LEN + r), K)  # a target above max_keep: never read past the plan's width
    best = tl.full((BLOCK_M,), float("-inf"), tl.float64)
    best_j = tl.full((BLOCK_M,), -1, tl.int32)
    for j0 in range(0, n_keep, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jm = j < n_keep
        kt = tl.load(KEEP + r.to(tl.int64) * K + j, mask=jm, other=0)
        kv = tl.load(base + kt[:, None].to(tl.int64) * sKt + d[None, :], mask=jm[:, None] & dm[None, :],
                     other=0.0).to(tl.float64)
        kv = kv / tl.maximum(tl.sqrt(tl.sum(kv * kv, 1)), 1e-12)[:, None]
        sim = tl.sum(q[:, None, :] * kv[None, :, :], 2)
        sim = tl.where(jm[None, :], sim, float("-inf"))
        blk = tl.max(sim, 1)
        arg = tl.min(tl.where(sim == blk[:, None], j[None, :], 2**30), 1)
        better = blk > best
        best_j = tl.where(better, arg, best_j)
        best = tl.where(better, blk, best)
    tl.store(MT + row + t, tl.where(evicted, best_j, -1), mask=inb)
    tl.atomic_add(MERGED + r, tl.sum((evicted & (best_j >= 0)).to(tl.int64), 0))


def _strides3(x: torch.Tensor, name: str = "a token tensor") -> tuple[int, int]:
    if x.stride(-1) != 1:
        raise ValueError(f"{name}: the token dim must be contiguous (stride 1), got strides {tuple(x.stride())}")
    return x.stride(0), x.stride(1)


def _rows(t, name: str, shape: tuple, *, dtype: torch.dtype | None = None):
    """``t`` as a ``shape`` view (size-1 dims broadcast as ``plan_layer``'s torch ops would; no copy), or TypeError /
    ValueError naming it. Host checks only: the kernels index every tensor by its strides up to ``shape``, so a
    smaller one would be read out of bounds."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be a {dtype} tensor, got {t.dtype}")
    if tuple(t.shape) == tuple(shape):
        return t
    if t.dim() != len(shape) or any(a not in (1, b) for a, b in zip(t.shape, shape)):
        raise ValueError(f"{name} must have shape {tuple(shape)} (or size 1 where it broadcasts), got {tuple(t.shape)}")
    return t.expand(shape)


_PROTECT = {  # (sink, window, recent, text, all) per method
    "acckv": None, "snapkv": (0, 1, 1, 0, 0), "pyramidkv": (0, 1, 1, 0, 0), "h2o": (0, 0, 1, 0, 0),
    "tova": (0, 0, 0, 0, 0), "streaming": (1, 0, 0, 0, 0), "lookm": (0, 1, 1, 1, 0), "full": (0, 0, 0, 0, 1),
    "adakv": (0, 1, 1, 0, 0), "kvzip": (0, 0, 1, 0, 0),
}


def _alloc(nbytes: int, device: torch.device) -> torch.Tensor:
    """One uncleared byte buffer (a hook: tests poison it to show unwritten elements)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def supports(cfg: AccKVConfig) -> bool:
    """Whether :func:`plan_layer_fused` runs ``cfg``: every method and switch but AccKV with adaptive head budgets
    (``head_budgets="adaptive"``), which :func:`acckv_triton.policy.plan_layer` runs."""
    return not (cfg.adaptive_heads and cfg.method == "acckv")


def plan_layer_fused(cfg: AccKVConfig, x: LayerTokens, layer: int = 0, num_layers: int = 1, *,
                     target: torch.Tensor, max_keep: int, check: bool = False) -> PolicyResult:
    """:func:`acckv_triton.policy.plan_layer` in a few launches with no host synchronisation.

    Args:
        cfg, x, layer, num_layers: as :func:`~acckv_triton.policy.plan_layer`; the tensors on a kernel device (or
            the CPU under Triton's interpreter). ``x.position`` with ``x.window_range`` (or ``x.window``) sets the
            observation window.
        target: ``[B, Hkv]`` int slots to keep per row (clamped to the row's valid tokens). With adaptive head
            budgets (``cfg.adaptive_heads``, Ada-KV) the rows of a sequence share the sum of their targets.
        max_keep: the width of ``plan.keep``, known to the host: an upper bound on ``target``; with adaptive head
            budgets the most slots one row may keep (``plan_layer``'s ``max_per_row``: the storage's room, or the
            stored length for no cap). A target above it is not checked (that would be a sync): no entry is
            written past the width, and the row's ``keep_lengths`` exceeds it, which ``compact_kv``'s plan check
            refuses.
        check: validate the modality ids (one host sync) and raise ``ValueError`` like ``plan_layer``.

    Returns:
        the :class:`~acckv_triton.policy.PolicyResult` of ``plan_layer`` (``plan.keep`` is ``max(1, max_keep)``
        wide; entries past ``keep_lengths`` are 0).
    """
    if cfg.is_full and cfg.method != "full":
        cfg = cfg.replace(method="full")
    adaptive = cfg.adaptive_heads
    if not supports(cfg):
        raise ValueError("AccKV with adaptive head budgets (head_budgets='adaptive') runs policy.plan_layer; the "
                         "fused policy shares a layer's budget across heads for the one-ranking methods only")
    if not isinstance(x.scores, torch.Tensor) or x.scores.dim() != 3:
        raise ValueError(f"x.scores must be a [B, Hkv, N] tensor, got "
                         f"{tuple(x.scores.shape) if isinstance(x.scores, torch.Tensor) else type(x.scores).__name__}")
    B, H, N = x.scores.shape
    rows, tokens = (B, H), (B, H, N)
    x = dataclasses.replace(  # every tensor the kernels index checked against the scores' [B, Hkv, N] (host only)
        x, modality=_rows(x.modality, "x.modality", tokens), lengths=_rows(x.lengths, "x.lengths", rows),
        time=None if x.time is None else _rows(x.time, "x.time", tokens),
        keys=None if x.keys is None else _rows(x.keys, "x.keys", tokens + (x.keys.shape[-1],)),
        spatial=None if x.spatial is None else _rows(x.spatial, "x.spatial", tokens + (2,)),
        window=None if x.window is None else _rows(x.window, "x.window", tokens, dtype=torch.bool),
        valid=None if x.valid is None else _rows(x.valid, "x.valid", tokens, dtype=torch.bool),
        position=None if x.position is None else _rows(x.position, "x.position", tokens))
    target = _rows(target, "target", rows)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of slots per row, got {target.dtype}")
    s = head_shared_scores(x).contiguous() if cfg.method == "tova" else x.scores
    dev = s.device
    method = cfg.method
    acckv = method == "acckv"
    merge = acckv and cfg.intra_merge
    lookm = method == "lookm"
    if (merge or lookm) and x.keys is None:
        raise ValueError(f"x.keys is required by {'cfg.intra_merge' if merge else 'method lookm'}")
    if not (isinstance(max_keep, int) and not isinstance(max_keep, bool) and max_keep >= 0):
        raise ValueError(f"max_keep must be an int >= 0, got {max_keep!r}")
    K = max(1, min(max_keep, N))
    R = B * H
    f32, i32, i8, i64, f64 = torch.float32, torch.int32, torch.int8, torch.int64, torch.float64
    ws_spec = [("raw", f32, (R, N)), ("rank", i32, (R, N)), ("srank", f32, (R, N)), ("shat", f32, (R, N)),
               ("keyf", f32, (R, N)), ("sval", f32, (R, N)), ("sidx", i64, (R, N)), ("cand", i8, (R, N)),
               ("kept", i8, (R, N)), ("isrep", i8, (R, N)), ("rep", i32, (R, N)), ("score", f32, (R, N)),
               ("gmass", f32, (R, N)), ("hasp", i32, (R, N)), ("stats", f64, (R, _NSTAT))]
    if merge:
        ws_spec += [("key64", i64, (R, N)), ("skey", i64, (R, N)), ("best", i64, (R, N))]
    if merge or acckv:
        ws_spec += [("gs", f64, (R, N)), ("gm", f64, (R, N)), ("gr", f64, (R, N))]
    if adaptive:  # each sequence's pool of candidates, sorted across its heads
        ws_spec += [("pool", f32, (R, N)), ("pool_v", f32, (B, H * N)), ("pool_i", i64, (B, H * N))]
    has_merge_out = merge or lookm
    out_spec = [("keep", i32, (B, H, K)), ("keep_len", i32, (B, H)), ("kpm", i64, (B, H, NUM_MODALITIES)),
                ("merged", i64, (B, H)), ("rho", f32, (B, NUM_MODALITIES)), ("prio", i64, (B,))]
    if has_merge_out:
        out_spec += [("mt", i32, (B, H, N)), ("mw", f32, (B, H, N))]
    ws = carve(_alloc(carved_nbytes(ws_spec), dev), ws_spec)
    out = carve(_alloc(carved_nbytes(out_spec), dev), out_spec)
    mod = x.modality
    if mod.dtype != torch.uint8:
        raise TypeError(f"x.modality must be uint8 Modality ids on the fused path, got {mod.dtype}")
    valid = x.valid.view(torch.uint8) if x.valid is not None else mod
    time = x.time if x.time is not None else mod
    grid = (R,)
    pool = cfg.pool_kernel // 2 if method in POOLED_METHODS and cfg.windowed else 0
    _evidence_kernel[grid](
        s, *_strides3(s, "x.scores"), mod, *_strides3(mod, "x.modality"), time, *_strides3(time, "x.time"), valid,
        *_strides3(valid, "x.valid"),
        x.lengths, x.lengths.stride(0), x.lengths.stride(1),
        ws["raw"], ws["rank"], ws["srank"], ws["keyf"], ws["hasp"], ws["stats"], N, H, cfg.sink, float(cfg.pool_lift),
        R_POOL=pool, POOL_AVG=cfg.pool_mode == "avg", LIFT=acckv and pool > 0 and cfg.pool_lift < 1.0,
        REDIST_MASK=acckv and cfg.redistribution,
        HAS_VALID=x.valid is not None, HAS_TIME=x.time is not None, NSTAT=_NSTAT, BLOCK=_BLOCK)
    if check:
        if bool((ws["stats"][:, _S_BAD] > 0).any()):
            raise ValueError(f"x.modality must hold Modality ids in [0, {NUM_MODALITIES}) at every valid token")
    # ---- protection ----
    if x.window is not None:
        win, win_mode, lo, hi = x.window.view(torch.uint8), 1, 0, 0
    elif x.position is not None and x.window_range is not None:
        win, win_mode, (lo, hi) = x.position, 2, x.window_range
    else:
        win, win_mode, lo, hi = mod, 0, 0, 0
    if acckv:
        flags = (1, 1, 1, int(cfg.protect_text), 0)
        mode = 2
    else:
        flags = _PROTECT[method]
        mode = 1 if method == "streaming" else 0
    if not cfg.windowed:  # every-query / last-query evidence: the window is ranked like any token
        flags = (flags[0], 0) + tuple(flags[2:])
    # sinks (not on AccKV's every-query mean) and recent tokens (not without protect_positions) may rank by evidence
    flags = (flags[0] if cfg.protects_sinks else 0, flags[1], flags[2] if cfg.protect_positions else 0) + \
        tuple(flags[3:])
    spatial = x.spatial
    sp_args = (spatial, spatial.stride(0), spatial.stride(1), spatial.stride(2)) if spatial is not None else \
        (mod, 0, 0, 0)
    key64 = ws.get("key64", ws["sidx"])
    _protect_kernel[grid](
        mod, *_strides3(mod, "x.modality"), *sp_args, win, *_strides3(win, "x.window / x.position"), target,
        target.stride(0), target.stride(1),
        ws["raw"], ws["rank"], ws["srank"], ws["shat"], ws["keyf"], key64, ws["cand"], ws["kept"], ws["stats"],
        N, H, cfg.sink, cfg.window, recent_tokens(cfg), lo, hi,
        P_SINK=flags[0], P_WINDOW=flags[1], P_RECENT=flags[2], P_TEXT=flags[3], P_ALL=flags[4], WIN_MODE=win_mode,
        MODE=mode, REDIST=acckv and cfg.redistribution, RENORM=acckv and cfg.head_renorm, MERGE_KEYS=merge,
        HAS_SPATIAL=spatial is not None, CAP_RECENT=cfg.method == "acckv", NSTAT=_NSTAT, BLOCK=_BLOCK)
    keys = x.keys if x.keys is not None else s.unsqueeze(-1)
    D = keys.shape[-1]
    if keys.stride(-1) != 1:
        raise ValueError("x.keys must have a contiguous last dim")
    k_args = (keys, keys.stride(0), keys.stride(1), keys.stride(2))
    common = dict(NSTAT=_NSTAT, BLOCK=_BLOCK)
    emit = (ws["raw"], ws["rank"], ws["shat"], ws["score"], ws["gmass"], ws["cand"], ws["isrep"], ws["rep"],
            ws["kept"], ws["keyf"], ws["sval"], ws["sidx"], ws.get("gs", ws["raw"]), ws["hasp"], ws["stats"],
            out["prio"], out["keep"], out["keep_len"], out.get("mt", out["keep"]), out.get("mw", ws["raw"]),
            out["kpm"], out["merged"], N, H, K, cfg.time_bin, _f64_bits(cfg.align_lambda))
    t_args = (time, *_strides3(time, "x.time"))
    m_args = (mod, *_strides3(mod, "x.modality"))

    def sort_keys(values):
        torch.sort(values, dim=-1, descending=True, stable=True, out=(ws["sval"], ws["sidx"]))

    if acckv:
        if merge:
            torch.sort(ws["key64"], dim=-1, out=(ws["skey"], ws["sidx"]))
        video_prior = cfg.video_from_layer is not None and layer >= cfg.video_from_layer
        _groups_kernel[grid](
            *m_args, *k_args, ws["raw"], ws["rank"], ws["srank"], ws["shat"], ws["score"], ws["gmass"], ws["cand"],
            ws["isrep"], ws["rep"], ws["keyf"], ws.get("skey", ws["sidx"]), ws["sidx"], ws["hasp"],
            ws.get("best", ws["sidx"]), ws["gs"], ws["gm"], ws["gr"], ws["stats"], out["rho"], out["prio"], N, H, D,
            _f64_bits(cfg.theta_audio), _f64_bits(cfg.theta_video), cfg.max_group, _f64_bits(cfg.gamma),
            _f64_bits(cfg.rho_min), _f64_bits(cfg.redundancy_min),
            MERGE=merge, FREES=cfg.merge_frees_budget, FOCUSING=cfg.focusing, GAMMA_ONE=cfg.gamma == 1.0,
            VIDEO_PRIOR=video_prior, BLOCK_G=64 if D > 64 else 128, BLOCK_D=next_pow2(D), **common)
        align = cfg.cross_align and x.time is not None
        sort_keys(ws["keyf"])
        _consume_kernel[grid](*m_args, *t_args, *emit, SORTED=True, PER_MOD=True, BUDGET=1, AFTER=1, ALIGN=align,
                              MERGES=False, WEIGHTS=False, **common)
        sort_keys(ws["keyf"])
        _consume_kernel[grid](*m_args, *t_args, *emit, SORTED=True, PER_MOD=True, BUDGET=1, AFTER=2, ALIGN=False,
                              MERGES=False, WEIGHTS=False, **common)
        sort_keys(ws["keyf"])
        _consume_kernel[grid](*m_args, *t_args, *emit, SORTED=True, PER_MOD=False, BUDGET=2, AFTER=3, ALIGN=False,
                              MERGES=merge, WEIGHTS=merge, **common)
    else:
        out["rho"].zero_()
        out["prio"].fill_(-1)
        ranked = method not in ("streaming", "full")
        if ranked:
            sort_keys(ws["keyf"])
        if adaptive:  # Ada-KV: each row's free budget becomes its floor plus what it wins of its sequence's pool
            _ada_pool_kernel[grid](ws["sval"], ws["pool"], target, target.stride(0), target.stride(1), ws["stats"],
                                   N, H, max_keep, _f64_bits(cfg.ada_floor), **common)
            torch.sort(ws["pool"].view(B, H * N), dim=-1, descending=True, stable=True,
                       out=(ws["pool_v"], ws["pool_i"]))
            _ada_share_kernel[grid](ws["pool_i"], ws["stats"], N, H, **common)
        _consume_kernel[grid](*m_args, *t_args, *emit, SORTED=ranked, PER_MOD=False, BUDGET=0, AFTER=3,
                              ALIGN=False, MERGES=False, WEIGHTS=lookm, **common)
        if lookm:
            _nearest_kernel[(R, triton.cdiv(N, 16))](*k_args, ws["rank"], ws["hasp"], out["keep"], out["keep_len"],
                                                     out["mt"], out["merged"], N, H, K, D, BLOCK_M=16, BLOCK_N=16,
                                                     BLOCK_D=next_pow2(D))
    plan = CompactionPlan(out["keep"], out["keep_len"], out.get("mt"), out.get("mw"))
    return PolicyResult(plan, out["rho"], out["prio"], out["kpm"], out["merged"])
