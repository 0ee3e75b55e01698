"""Merge-compaction of a ragged KV cache by a compression plan, carrying the token metadata along.

Per (sequence b, kv head h), slot j < keep_lengths[b, h] of the compacted cache receives the merge set
``S_j = {keep[j]} | {evicted t < lengths : merge_target[t] == j}``: K and V become the ``merge_weight``-weighted
mean of S_j (exactly ``k_old[keep[j]]`` without merges), ``token_data`` tensors are gathered from keep[j] and
``token_sums`` tensors are summed over S_j. The spec is :func:`acckv_triton.reference.compact_kv_`.

Entry points
    ``compact_kv_(k_cache, v_cache, lengths, keep, keep_lengths, ...)``: in place; sets lengths to keep_lengths.
    ``compact_kv(k_src, v_src, lengths, keep, keep_lengths, out_k=, out_v=, ...)``: out of place, into separate
        buffers of capacity >= K; the sources are left as they are. The cache uses it to shrink its storage after
        prefill with exactly one read and one write per kept row and no scratch.

Kernels and grids (B sequences, Hkv kv heads, capacity C, K = keep.shape[-1] slots, head dim D):
    ``_gather_merge_kernel`` grid (B*Hkv, cdiv(K, BLOCK_K)). Phase 1. A program owns BLOCK_K slots of one (b, h)
        and the whole head dim. It reads each slot's sources from the old cache and writes the slot's K and V rows to
        a destination that no program of the launch reads: a scratch strip ``[B, Hkv, K, D]`` (in place) or the
        caller's out buffers. Without merges a row is moved as is (bit-exact); with merges the weighted mean is
        taken in fp32 as ``x0 + sum_i w_i (x_i - x0) / sum_i w_i`` (a slot with one source stays bit-exact) and
        stored in the cache dtype.
    ``_metadata_kernel``     grid (B*Hkv, cdiv(K, BLOCK_T)), once per metadata tensor. Gathers ``token_data`` (as
        same-width integer bits, so any dtype is exact) or sums ``token_sums`` over S_j (fp32, fp64 for fp64), into a
        ``[B, Hkv, K]`` strip (in place; copied back with ``copy_``) or the caller's out tensor.
    ``_copy_back_kernel``    grid (B*Hkv, cdiv(K, BLOCK_K)). Phase 2, in place only: copies the strip's moved slots
        into the cache's first keep_lengths slots.

Merge sources without float atomics. ``_slot_key_kernel`` (one program per row) gives every valid token its slot
(a kept token its rank in keep, an evicted one its merge target or none) as the key ``(b*Hkv + h)*K + slot`` and
counts each slot's sources (integer atomics: exact). A stable sort of the keys lists each slot's sources in token
order (``sources``: flat (row, token) indices, read modulo C), and a cumulative sum of the counts gives the CSR
``offsets [B*Hkv*K + 1]`` int64: 4 device operations, no host sync. The result is deterministic.

Race-freedom of the in-place path, by construction:
    * Phase 1 reads only the old cache, the plan and the CSR lists, and writes only the strips. No address is both
      read and written in the launch, so no interleaving of its programs can change what it reads.
    * Phase 2 reads only the strips and writes only the cache. Cache row j is written by exactly one program, the
      owner of slot j, and no program of the launch reads the cache.
    * The two launches are ordered on the stream, a grid-wide barrier: every read of an old token completes before
      the first write into the cache.
    * Slots that stay put (keep[j] == j and nothing merged into them) are skipped by both phases. Since keep is
      strictly increasing they form a prefix, and no phase writes their rows.
    The out-of-place path is phase 1 alone. It requires out buffers that share no memory with the sources, which the
    launcher checks.

Bytes moved for R moved K/V rows (e = element size): in place 4·R·D·e (read old, write strip, read strip, write
cache), out of place 2·R·D·e (one read, one write). Add 4 bytes of keep per slot; with merges, per merged source, its
D·e row pair, 4 bytes of index and 4 of weight, plus the CSR build over B·Hkv·C tokens. Metadata moves the same way
at its own width. Addresses are computed in int64, so caches beyond 2^31 elements are handled.

Validation (shapes, dtypes, devices, strides, overlaps; with ``check_plan`` also every value of the plan: lengths and
keep_lengths in range, keep sorted and in range, merge targets in range, weights positive and finite where used) runs
before any tensor is written. An invalid plan raises ``ValueError`` naming the argument and leaves every tensor
bit-identical. The value checks cost one host synchronisation; a trusted caller can pass ``check_plan=False``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .. import tuning
from . import _common
from ._common import (carve, carved_nbytes, check_last_dim_contiguous, check_not_self_overlapping, check_tensor,
                      dtype_name, memory_span, next_pow2, spans_overlap)

__all__ = ["compact_kv", "compact_kv_"]

_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BITS_BY_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _slot_sources(
    keep_ptr, keep_lengths_ptr, offsets_ptr, sources_ptr, pid_bh, offs_j, C, K,
    HAS_MERGE: tl.constexpr,
):
    """Per slot of the tile: whether it is valid, its first source token, its source count and CSR start."""
    n_keep = tl.load(keep_lengths_ptr + pid_bh)
    n_keep = tl.minimum(tl.maximum(n_keep, 0), K)  # memory safety even when the plan was not checked
    slot_mask = offs_j < n_keep
    if HAS_MERGE:
        beg = tl.load(offsets_ptr + pid_bh * K + offs_j, mask=slot_mask, other=0)
        end = tl.load(offsets_ptr + pid_bh * K + offs_j + 1, mask=slot_mask, other=0)
        count = (end - beg).to(tl.int32)
        slot_mask = slot_mask & (count > 0)
        first = tl.load(sources_ptr + beg, mask=slot_mask, other=0) % C  # flat [row, token] order -> token
    else:
        beg = offs_j.to(tl.int64)
        count = tl.where(slot_mask, 1, 0)
        first = tl.load(keep_ptr + pid_bh * K + offs_j, mask=slot_mask, other=0)
    first = tl.minimum(tl.maximum(first, 0), C - 1).to(tl.int64)
    return slot_mask, first, count, beg


@triton.jit
def _move_rows(
    src_base, dst_base, stride_src_t, stride_dst_t, w_base, sources_ptr,
    offs_j, slot_mask, first, count, beg, C,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MERGE: tl.constexpr,
):
    """dst[j] = the weighted mean of slot j's source rows of src (or src[first] without merges)."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = slot_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    x0 = tl.load(src_base + first[:, None] * stride_src_t + offs_d[None, :], mask=mask, other=0.0)
    if HAS_MERGE:
        x0 = x0.to(tl.float32)  # straight after the load: the interpreter stores bf16 as raw uint16
        w0 = tl.load(w_base + first, mask=slot_mask, other=1.0)
        acc = tl.zeros_like(x0)
        w_sum = tl.where(slot_mask, w0, 1.0)
        for i in range(1, tl.max(count)):
            m = slot_mask & (i < count)
            t = tl.load(sources_ptr + beg + i, mask=m, other=0) % C
            t = tl.minimum(tl.maximum(t, 0), C - 1).to(tl.int64)
            w = tl.load(w_base + t, mask=m, other=0.0)
            x = tl.load(src_base + t[:, None] * stride_src_t + offs_d[None, :], mask=m[:, None] & mask, other=0.0)
            acc += w[:, None] * (x.to(tl.float32) - x0)
            w_sum += w
        out = x0 + acc / w_sum[:, None]
        tl.store(dst_base + offs_j[:, None] * stride_dst_t + offs_d[None, :],
                 out.to(dst_base.dtype.element_ty), mask=mask)
    else:
        tl.store(dst_base + offs_j[:, None] * stride_dst_t + offs_d[None, :], x0, mask=mask)


@triton.jit(do_not_specialize=["C", "K"])
def _gather_merge_kernel(
    k_src_ptr, v_src_ptr, k_dst_ptr, v_dst_ptr,
    keep_ptr, keep_lengths_ptr, offsets_ptr, sources_ptr, weight_ptr,
    C, K, Hkv,
    stride_ksb, stride_ksh, stride_kst,
    stride_vsb, stride_vsh, stride_vst,
    stride_kdb, stride_kdh, stride_kdt,
    stride_vdb, stride_vdh, stride_vdt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MERGE: tl.constexpr, SKIP_UNMOVED: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    offs_j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot_mask, first, count, beg = _slot_sources(
        keep_ptr, keep_lengths_ptr, offsets_ptr, sources_ptr, pid_bh, offs_j, C, K, HAS_MERGE
    )
    if SKIP_UNMOVED:  # in place: a slot whose only source is its own row is already right
        slot_mask = slot_mask & ((count != 1) | (first != offs_j))
    w_base = weight_ptr + pid_bh * C  # the launcher makes merge_weight contiguous
    _move_rows(
        k_src_ptr + b * stride_ksb + h * stride_ksh, k_dst_ptr + b * stride_kdb + h * stride_kdh,
        stride_kst, stride_kdt, w_base, sources_ptr, offs_j, slot_mask, first, count, beg, C,
        HEAD_DIM, BLOCK_D, HAS_MERGE,
    )
    _move_rows(
        v_src_ptr + b * stride_vsb + h * stride_vsh, v_dst_ptr + b * stride_vdb + h * stride_vdh,
        stride_vst, stride_vdt, w_base, sources_ptr, offs_j, slot_mask, first, count, beg, C,
        HEAD_DIM, BLOCK_D, HAS_MERGE,
    )


@triton.jit(do_not_specialize=["C", "K"])
def _copy_back_kernel(
    k_strip_ptr, v_strip_ptr, k_cache_ptr, v_cache_ptr,
    keep_ptr, keep_lengths_ptr, offsets_ptr, sources_ptr,
    C, K, Hkv,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MERGE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    offs_j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot_mask, first, count, beg = _slot_sources(
        keep_ptr, keep_lengths_ptr, offsets_ptr, sources_ptr, pid_bh, offs_j, C, K, HAS_MERGE
    )
    slot_mask = slot_mask & ((count != 1) | (first != offs_j))  # the slots phase 1 moved
    offs_d = tl.arange(0, BLOCK_D)
    mask = slot_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    strip_rows = (pid_bh * K + offs_j)[:, None] * HEAD_DIM + offs_d[None, :]  # strips: contiguous [B, Hkv, K, D]
    k = tl.load(k_strip_ptr + strip_rows, mask=mask)
    v = tl.load(v_strip_ptr + strip_rows, mask=mask)
    tl.store(k_cache_ptr + b * stride_kb + h * stride_kh + offs_j[:, None] * stride_kt + offs_d[None, :], k, mask=mask)
    tl.store(v_cache_ptr + b * stride_vb + h * stride_vh + offs_j[:, None] * stride_vt + offs_d[None, :], v, mask=mask)


@triton.jit(do_not_specialize=["C", "K"])
def _metadata_kernel(
    src_ptr, dst_ptr,
    keep_ptr, keep_lengths_ptr, offsets_ptr, sources_ptr,
    C, K, Hkv,
    stride_sb, stride_sh, stride_st,
    stride_db, stride_dh, stride_dt,
    SUM: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    offs_j = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot_mask, first, count, beg = _slot_sources(
        keep_ptr, keep_lengths_ptr, offsets_ptr, sources_ptr, pid_bh, offs_j, C, K, SUM
    )
    src_base = src_ptr + b * stride_sb + h * stride_sh
    dst_ptrs = dst_ptr + b * stride_db + h * stride_dh + offs_j * stride_dt
    if SUM:
        if ACC_FP64:
            acc = tl.load(src_base + first * stride_st, mask=slot_mask, other=0.0).to(tl.float64)
        else:
            acc = tl.load(src_base + first * stride_st, mask=slot_mask, other=0.0).to(tl.float32)
        for i in range(1, tl.max(count)):
            m = slot_mask & (i < count)
            t = tl.load(sources_ptr + beg + i, mask=m, other=0) % C
            t = tl.minimum(tl.maximum(t, 0), C - 1).to(tl.int64)
            acc += tl.load(src_base + t * stride_st, mask=m, other=0.0).to(acc.dtype)
        tl.store(dst_ptrs, acc.to(dst_ptr.dtype.element_ty), mask=slot_mask)
    else:
        tl.store(dst_ptrs, tl.load(src_base + first * stride_st, mask=slot_mask), mask=slot_mask)


@triton.jit(do_not_specialize=["C", "K"])
def _slot_key_kernel(
    keep_ptr, keep_lengths_ptr, lengths_ptr, target_ptr, key_ptr, counts_ptr,
    C, K, Hkv, stride_mb, stride_mh, stride_mt,
    BLOCK: tl.constexpr,
):
    """Per (b, h) row: each valid token's slot (its rank in keep, its merge target, or none), as the sort key
    ``row * K + slot`` (``B*Hkv*K`` for none), and each slot's source count. One program per row."""
    r = tl.program_id(0).to(tl.int64)
    b = r // Hkv
    h = r % Hkv
    n = tl.minimum(tl.maximum(tl.load(lengths_ptr + r), 0), C)
    nk = tl.minimum(tl.maximum(tl.load(keep_lengths_ptr + r), 0), K)
    none = tl.num_programs(0).to(tl.int64) * K
    for t0 in range(0, C, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        target = tl.load(target_ptr + b * stride_mb + h * stride_mh + t * stride_mt, mask=t < n, other=-1)
        ok = (t < n) & (target >= 0) & (target < nk)
        tl.store(key_ptr + r * C + t, tl.where(ok, r * K + target, none), mask=t < C)
    tl.debug_barrier()
    for j0 in range(0, K, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        tok = tl.load(keep_ptr + r * K + j, mask=j < nk, other=0)
        tl.store(key_ptr + r * C + tok, r * K + j, mask=(j < nk) & (tok >= 0) & (tok < n))
    tl.debug_barrier()
    for t0 in range(0, C, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        key = tl.load(key_ptr + r * C + t, mask=t < C, other=none)
        tl.atomic_add(counts_ptr + key, 1, mask=key < none)


_gather_merge = tuning.TunedKernel(
    "compact_kv", _gather_merge_kernel, tuning.CONFIG_SPACES["compact_kv"],
    key=["HEAD_DIM", "HAS_MERGE", "SKIP_UNMOVED"], dtype_arg="k_src_ptr",
)
_copy_back = tuning.TunedKernel(
    "compact_kv_copy_back", _copy_back_kernel, tuning.CONFIG_SPACES["compact_kv_copy_back"],
    key=["HEAD_DIM", "HAS_MERGE"], dtype_arg="k_strip_ptr",
)
_metadata = tuning.TunedKernel(
    "compact_kv_metadata", _metadata_kernel, tuning.CONFIG_SPACES["compact_kv_metadata"],
    key=["SUM", "ACC_FP64"], dtype_arg="src_ptr",
)


# -------------------------------------------------------------------------------------------------------- validation
_SOURCE = "the K/V source"


def _check_kv(name: str, x, device=None, dtype=None) -> None:
    check_tensor(name, x, rank=4, what="[B, Hkv, C, D]", dtypes=_KV_DTYPES if dtype is None else (dtype,),
                 device=device, like=_SOURCE)
    check_last_dim_contiguous(name, x)


def _spans(named: Sequence[tuple[str, torch.Tensor | None]]) -> list[tuple[str, torch.Tensor, int, int]]:
    """``(name, x, start, end)`` for each named tensor that is not None (see :func:`._common.memory_span`)."""
    return [(name, x, *memory_span(x)) for name, x in named if x is not None]


def _check_no_overlap(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor, int, int]]:
    """No two of the named tensors, which are all written, may share memory, nor two elements of one. Returns their
    spans."""
    for name, x in named:
        check_not_self_overlapping(name, x)
    spans = _spans(named)
    for i, (name_a, _, a0, a1) in enumerate(spans):
        for name_b, _, b0, b1 in spans[i + 1:]:
            if spans_overlap((a0, a1), (b0, b1)):
                raise ValueError(f"{name_a} and {name_b} must not share memory (both are written)")
    return spans


def _check_plan_not_written(written, keep, keep_lengths, merge_target, merge_weight) -> None:
    """The plan is read by every launch, so no written tensor (the spans :func:`_check_no_overlap` returned) may
    share its memory."""
    plan = _spans([("keep", keep), ("keep_lengths", keep_lengths), ("merge_target", merge_target),
                   ("merge_weight", merge_weight)])
    for w_name, w, a0, a1 in written:
        for p_name, p, b0, b1 in plan:
            if spans_overlap((a0, a1), (b0, b1)) and not (w_name == "lengths" and p_name == "keep_lengths" and p is w):
                raise ValueError(f"{p_name} must not share memory with {w_name}, which is written")


def _bits(x: torch.Tensor, name: str) -> torch.Tensor:
    """x viewed as same-width integers, so a gather moves its bits exactly whatever the dtype."""
    bits = _BITS_BY_SIZE.get(x.element_size())
    if bits is None:
        raise TypeError(f"{name} must have an element size of 1, 2, 4 or 8 bytes, got {dtype_name(x.dtype)}")
    return x if x.dtype == bits else x.view(bits)


class _Plan:
    """A validated plan in the form the kernels read: contiguous int32 keep and keep_lengths, CSR merge lists."""

    def __init__(self, keep, keep_lengths, offsets, sources, weight):
        self.keep, self.keep_lengths = keep, keep_lengths
        self.offsets, self.sources, self.weight = offsets, sources, weight
        self.has_merge = offsets is not None


def _kept_mask(keep: torch.Tensor, slot_valid: torch.Tensor, C: int) -> torch.Tensor:
    """[B, Hkv, C] bool: which tokens the plan keeps (keep indices outside [0, C) are ignored)."""
    B, Hkv, _ = keep.shape
    keep_l = keep.long()
    idx = torch.where(slot_valid & (keep_l >= 0) & (keep_l < C), keep_l, C)  # column C collects the rest
    kept = torch.zeros((B, Hkv, C + 1), dtype=torch.bool, device=keep.device)
    kept.scatter_(2, idx, True)
    return kept[..., :C]


def _check_values(lengths, keep, keep_lengths, merge_target, merge_weight, C: int) -> None:
    """All value checks of the plan, vectorised, with one host sync; raises ValueError naming the argument."""
    K = keep.shape[2]
    device = keep.device
    n = lengths.long()
    nk = keep_lengths.long()
    keep_l = keep.long()
    slot_valid = torch.arange(K, device=device) < nk[..., None]
    checks = [
        ("lengths", (n < 0) | (n > C), f"must lie in [0, C={C}] (the capacity of the K/V source)"),
        ("keep_lengths", (nk < 0) | (nk > n) | (nk > K), f"must lie in [0, lengths] and be at most K={K}"),
        ("keep", slot_valid & ((keep_l < 0) | (keep_l >= n[..., None])),
         "must hold token indices in [0, lengths) in its first keep_lengths entries"),
        ("keep", slot_valid & torch.nn.functional.pad(keep_l[..., 1:] <= keep_l[..., :-1], (1, 0)),
         "must be strictly increasing in its first keep_lengths entries"),
    ]
    if merge_target is not None:
        valid = torch.arange(C, device=device) < n[..., None]
        kept = _kept_mask(keep, slot_valid, C)
        target = merge_target.long()
        evicted = valid & ~kept
        used = valid & (kept | (target >= 0))
        checks += [
            ("merge_target", evicted & ((target < -1) | (target >= nk[..., None])),
             "must be -1 or a slot in [0, keep_lengths) at every evicted token below lengths"),
            ("merge_weight", used & ~((merge_weight > 0) & torch.isfinite(merge_weight)),
             "must be finite and > 0 at every kept or merged token"),
        ]
    failed = torch.stack([bad.any() for _, bad, _ in checks]).tolist()  # the one host sync
    for (name, bad, rule), is_bad in zip(checks, failed):
        if is_bad:
            where = bad.nonzero()[0].tolist()
            raise ValueError(f"{name} {rule}; violated at index {tuple(where)}")


def _build_plan(lengths, keep, keep_lengths, merge_target, merge_weight, C: int) -> _Plan:
    """Contiguous plan tensors plus, with merges, each slot's sources as CSR lists: one kernel writes every token's
    slot key and each slot's count, a stable sort lists the sources in token order, a cumulative sum gives the
    offsets (4 device operations, no host sync)."""
    B, Hkv, K = keep.shape
    keep_c = keep.contiguous()
    keep_lengths_c = keep_lengths.contiguous()
    if merge_target is None:
        return _Plan(keep_c, keep_lengths_c, None, None, None)
    R = B * Hkv
    scratch = torch.zeros(R * C + 2 * (R * K + 1), dtype=torch.int64, device=keep.device)
    key, counts, offsets = scratch[:R * C], scratch[R * C:R * C + R * K + 1], scratch[R * C + R * K + 1:]
    _slot_key_kernel[(R,)](keep_c, keep_lengths_c, lengths.contiguous(), merge_target, key, counts, C, K, Hkv,
                           *merge_target.stride(), BLOCK=1024)
    sources = torch.sort(key, stable=True).indices  # flat (row, token) indices; the kernels take them modulo C
    torch.cumsum(counts[:R * K], 0, out=offsets[1:])
    return _Plan(keep_c, keep_lengths_c, offsets, sources, merge_weight.contiguous())


def _validate(
    k_src, v_src, lengths, keep, keep_lengths, merge_target, merge_weight, token_data, token_sums, check_plan,
    names=("k_cache", "v_cache"), kernel_device=True,
):
    k_name, v_name = names
    _check_kv(k_name, k_src)
    device = k_src.device
    if kernel_device:
        _common.check_kernel_device(k_name, device)
    B, Hkv, C, D = k_src.shape
    _check_kv(v_name, v_src, device, k_src.dtype)
    if tuple(v_src.shape) != (B, Hkv, C, D):
        raise ValueError(f"{v_name} must have shape [B, Hkv, C, D] like {k_name} = {(B, Hkv, C, D)}, "
                         f"got {tuple(v_src.shape)}")
    check_tensor("lengths", lengths, shape=(B, Hkv), what="[B, Hkv]", dtypes=(torch.int32,), device=device,
                 like=_SOURCE)
    check_tensor("keep", keep, rank=3, what="[B, Hkv, K]")
    K = keep.shape[2]
    check_tensor("keep", keep, shape=(B, Hkv, K), what="[B, Hkv, K]", dtypes=(torch.int32,), device=device,
                 like=_SOURCE)
    if K > C:
        raise ValueError(f"keep must have K <= C={C} slots (the capacity of {k_name}), got K={K}")
    check_tensor("keep_lengths", keep_lengths, shape=(B, Hkv), what="[B, Hkv]", dtypes=(torch.int32,),
                 device=device, like=_SOURCE)
    if (merge_target is None) != (merge_weight is None):
        raise ValueError("merge_target and merge_weight must be given together, got only "
                         f"{'merge_target' if merge_weight is None else 'merge_weight'}")
    if merge_target is not None:
        check_tensor("merge_target", merge_target, shape=(B, Hkv, C), what="[B, Hkv, C]", dtypes=(torch.int32,),
                     device=device, like=_SOURCE)
        check_tensor("merge_weight", merge_weight, shape=(B, Hkv, C), what="[B, Hkv, C]",
                     dtypes=(torch.float32,), device=device, like=_SOURCE)
    if isinstance(token_data, torch.Tensor) or isinstance(token_sums, torch.Tensor):
        raise TypeError("token_data and token_sums must be sequences of tensors, not a tensor")
    token_data, token_sums = tuple(token_data), tuple(token_sums)
    for i, x in enumerate(token_data):
        check_tensor(f"token_data[{i}]", x, shape=(B, Hkv, C), what="[B, Hkv, C]", device=device, like=_SOURCE)
        _bits(x, f"token_data[{i}]")
    for i, x in enumerate(token_sums):
        check_tensor(f"token_sums[{i}]", x, shape=(B, Hkv, C), what="[B, Hkv, C]", dtypes=_SUM_DTYPES,
                     device=device, like=_SOURCE)
    if check_plan:
        _check_values(lengths, keep, keep_lengths, merge_target, merge_weight, C)
    return token_data, token_sums


def _validate_in_place(k_cache, v_cache, lengths, keep, keep_lengths, merge_target, merge_weight, token_data,
                       token_sums, check_plan, kernel_device=True):
    """:func:`_validate` plus the in-place path's memory checks: no two written tensors share memory, and none
    shares the plan's (read by every launch). Returns ``(token_data, token_sums)`` as tuples."""
    token_data, token_sums = _validate(
        k_cache, v_cache, lengths, keep, keep_lengths, merge_target, merge_weight, token_data, token_sums, check_plan,
        kernel_device=kernel_device,
    )
    written = [("k_cache", k_cache), ("v_cache", v_cache), ("lengths", lengths)] \
        + [(f"token_data[{i}]", x) for i, x in enumerate(token_data)] \
        + [(f"token_sums[{i}]", x) for i, x in enumerate(token_sums)]
    _check_plan_not_written(_check_no_overlap(written), keep, keep_lengths, merge_target, merge_weight)
    return token_data, token_sums


def validate_plan(k_cache, v_cache, lengths, keep, keep_lengths, *, merge_target=None, merge_weight=None,
                  token_data=(), token_sums=(), check_plan: bool = True) -> tuple[tuple, tuple]:
    """Every check :func:`compact_kv_` runs before it writes, on any device, for callers that apply the plan
    another way (:func:`acckv_triton.torch_ops.compact_kv_`). Raises ValueError / TypeError naming the argument;
    returns ``(token_data, token_sums)`` as tuples."""
    return _validate_in_place(k_cache, v_cache, lengths, keep, keep_lengths, merge_target, merge_weight, token_data,
                              token_sums, check_plan, kernel_device=False)


# --------------------------------------------------------------------------------------------------------- launchers
def _phase1(k_src, v_src, k_dst, v_dst, plan: _Plan, *, skip_unmoved: bool) -> None:
    B, Hkv, C, D = k_src.shape
    K = plan.keep.shape[2]
    dummy = plan.keep  # stands in for the CSR pointers without merges; never read then
    _gather_merge[lambda meta: (B * Hkv, triton.cdiv(K, meta["BLOCK_K"]))](
        k_src_ptr=k_src, v_src_ptr=v_src, k_dst_ptr=k_dst, v_dst_ptr=v_dst,
        keep_ptr=plan.keep, keep_lengths_ptr=plan.keep_lengths,
        offsets_ptr=plan.offsets if plan.has_merge else dummy,
        sources_ptr=plan.sources if plan.has_merge else dummy,
        weight_ptr=plan.weight if plan.has_merge else dummy,
        C=C, K=K, Hkv=Hkv,
        stride_ksb=k_src.stride(0), stride_ksh=k_src.stride(1), stride_kst=k_src.stride(2),
        stride_vsb=v_src.stride(0), stride_vsh=v_src.stride(1), stride_vst=v_src.stride(2),
        stride_kdb=k_dst.stride(0), stride_kdh=k_dst.stride(1), stride_kdt=k_dst.stride(2),
        stride_vdb=v_dst.stride(0), stride_vdh=v_dst.stride(1), stride_vdt=v_dst.stride(2),
        HEAD_DIM=D, BLOCK_D=next_pow2(D), HAS_MERGE=plan.has_merge, SKIP_UNMOVED=skip_unmoved,
    )


def _compact_metadata(src: torch.Tensor, dst: torch.Tensor, plan: _Plan, *, is_sum: bool) -> None:
    B, Hkv, C = src.shape
    K = plan.keep.shape[2]
    merge_sum = is_sum and plan.has_merge  # a sum over a one-token set is a gather
    if not merge_sum:
        src, dst = _bits(src, "token_data"), _bits(dst, "token_data")
    dummy = plan.keep
    _metadata[lambda meta: (B * Hkv, triton.cdiv(K, meta["BLOCK_T"]))](
        src_ptr=src, dst_ptr=dst, keep_ptr=plan.keep, keep_lengths_ptr=plan.keep_lengths,
        offsets_ptr=plan.offsets if plan.has_merge else dummy, sources_ptr=plan.sources if plan.has_merge else dummy,
        C=C, K=K, Hkv=Hkv,
        stride_sb=src.stride(0), stride_sh=src.stride(1), stride_st=src.stride(2),
        stride_db=dst.stride(0), stride_dh=dst.stride(1), stride_dt=dst.stride(2),
        SUM=merge_sum, ACC_FP64=src.dtype == torch.float64,
    )


def compact_kv_(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    keep: torch.Tensor,
    keep_lengths: torch.Tensor,
    *,
    merge_target: torch.Tensor | None = None,
    merge_weight: torch.Tensor | None = None,
    token_data: Sequence[torch.Tensor] = (),
    token_sums: Sequence[torch.Tensor] = (),
    check_plan: bool = True,
) -> None:
    """Apply a compaction plan to a ragged KV cache in place, carrying the token metadata along.

    Args:
        k_cache, v_cache: ``[B, Hkv, C, D]`` float16, bfloat16 or float32, last dim contiguous; updated in place.
        lengths: ``[B, Hkv]`` int32 valid tokens per (b, h), ``0 <= lengths <= C``; set to ``keep_lengths``.
        keep: ``[B, Hkv, K]`` int32, ``K <= C``. ``keep[b, h, :keep_lengths[b, h]]`` holds strictly increasing token
            indices below ``lengths[b, h]``; later entries are ignored.
        keep_lengths: ``[B, Hkv]`` int32, ``0 <= keep_lengths <= min(lengths, K)``.
        merge_target: optional ``[B, Hkv, C]`` int32. For each evicted token ``t < lengths``: -1 (dropped) or the slot
            ``j < keep_lengths`` it merges into. Ignored at kept tokens and beyond lengths.
        merge_weight: ``[B, Hkv, C]`` float32, required with ``merge_target``; finite and > 0 at kept and merged tokens.
        token_data: ``[B, Hkv, C]`` tensors of any dtype (modality, time, position, ...), gathered:
            ``X[b, h, j] = X_old[b, h, keep[j]]``.
        token_sums: ``[B, Hkv, C]`` float tensors (accumulated mass, ...), summed over the merge set:
            ``X[b, h, j] = sum_{t in S_j} X_old[b, h, t]``.
        check_plan: verify every value of the plan first (one host sync). A caller whose plans are valid by
            construction passes False; the kernels then still clamp every index into the tensors.

    Effect:
        For each slot ``j < keep_lengths[b, h]``, with ``S_j = {keep[j]} | {evicted t : merge_target[t] == j}``:
        ``k[b, h, j] = sum_{t in S_j} w_t k_old[t] / sum_{t in S_j} w_t`` (fp32 arithmetic, stored in the cache
        dtype; exactly ``k_old[keep[j]]`` without ``merge_target``), the same for v, the metadata as above, and
        ``lengths`` set to ``keep_lengths``. Entries at or beyond the new lengths are unspecified.
        Race-free by construction: see the module docstring. Scratch: one allocation holding a ``[B, Hkv, K, D]``
        strip each for K and V and a ``[B, Hkv, K]`` strip per metadata tensor.

    Raises:
        ValueError naming the argument for a wrong shape, device or stride, tensors that share written memory, or
        (with ``check_plan``) an invalid plan; TypeError for a non-tensor argument or a wrong dtype. Raised before any
        tensor is modified, so nothing is lost.
    """
    token_data, token_sums = _validate_in_place(
        k_cache, v_cache, lengths, keep, keep_lengths, merge_target, merge_weight, token_data, token_sums, check_plan,
    )
    B, Hkv, C, D = k_cache.shape
    K = keep.shape[2]
    if B * Hkv > 0 and K > 0:
        plan = _build_plan(lengths, keep, keep_lengths, merge_target, merge_weight, C)
        device = k_cache.device
        # every scratch strip from one allocation: K, V [B, Hkv, K, D] and one [B, Hkv, K] per metadata tensor
        meta = [(x, False) for x in token_data] + [(x, True) for x in token_sums]
        spec = [("k", k_cache.dtype, (B, Hkv, K, D)), ("v", v_cache.dtype, (B, Hkv, K, D))] + \
            [(i, x.dtype, (B, Hkv, K)) for i, (x, _) in enumerate(meta)]
        strips = carve(torch.empty(carved_nbytes(spec), dtype=torch.uint8, device=device), spec)
        # Metadata first: phase 1 of each into its strip, then copied back (it never reads K/V).
        for i, (x, is_sum) in enumerate(meta):
            _compact_metadata(x, strips[i], plan, is_sum=is_sum)
            x[:, :, :K].copy_(strips[i])
        k_strip, v_strip = strips["k"], strips["v"]
        _phase1(k_cache, v_cache, k_strip, v_strip, plan, skip_unmoved=True)
        dummy = plan.keep
        _copy_back[lambda meta: (B * Hkv, triton.cdiv(K, meta["BLOCK_K"]))](
            k_strip_ptr=k_strip, v_strip_ptr=v_strip, k_cache_ptr=k_cache, v_cache_ptr=v_cache,
            keep_ptr=plan.keep, keep_lengths_ptr=plan.keep_lengths,
            offsets_ptr=plan.offsets if plan.has_merge else dummy,
            sources_ptr=plan.sources if plan.has_merge else dummy,
            C=C, K=K, Hkv=Hkv,
            stride_kb=k_cache.stride(0), stride_kh=k_cache.stride(1), stride_kt=k_cache.stride(2),
            stride_vb=v_cache.stride(0), stride_vh=v_cache.stride(1), stride_vt=v_cache.stride(2),
            HEAD_DIM=D, BLOCK_D=next_pow2(D), HAS_MERGE=plan.has_merge,
        )
    lengths.copy_(keep_lengths)


def compact_kv(
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    lengths: torch.Tensor,
    keep: torch.Tensor,
    keep_lengths: torch.Tensor,
    *,
    out_k: torch.Tensor,
    out_v: torch.Tensor,
    merge_target: torch.Tensor | None = None,
    merge_weight: torch.Tensor | None = None,
    token_data: Sequence[torch.Tensor] = (),
    token_sums: Sequence[torch.Tensor] = (),
    out_token_data: Sequence[torch.Tensor] = (),
    out_token_sums: Sequence[torch.Tensor] = (),
    check_plan: bool = True,
) -> None:
    """Apply a compaction plan out of place: write the compacted cache into separate buffers (one read, one write).

    The plan and the per-slot results are exactly those of :func:`compact_kv_`, but slot j of (b, h) is written to
    ``out_k[b, h, j]`` / ``out_v[b, h, j]`` (and ``out_token_data[i][b, h, j]``, ``out_token_sums[i][b, h, j]``)
    instead of into the sources, which are not modified; ``lengths`` is not modified either (the new lengths are
    ``keep_lengths``). Entries of the outputs at or beyond keep_lengths are left as they were.

    Args:
        k_src, v_src, lengths, keep, keep_lengths, merge_target, merge_weight, token_data, token_sums, check_plan:
            as in :func:`compact_kv_` (``C`` is the sources' capacity).
        out_k, out_v: ``[B, Hkv, C_out, D]`` with ``C_out >= K``, the sources' dtype and device, last dim contiguous,
            sharing no memory with any source or with each other.
        out_token_data, out_token_sums: one ``[B, Hkv, C_out]`` tensor per ``token_data`` / ``token_sums`` entry,
            in its dtype.

    Raises:
        ValueError / TypeError as :func:`compact_kv_`, also for outputs of the wrong shape, dtype or count, too small
        for K, or overlapping a source; raised before any output is written.
    """
    token_data, token_sums = _validate(
        k_src, v_src, lengths, keep, keep_lengths, merge_target, merge_weight, token_data, token_sums, check_plan,
        names=("k_src", "v_src"),
    )
    B, Hkv, C, D = k_src.shape
    K = keep.shape[2]
    device = k_src.device
    _check_kv("out_k", out_k, device, k_src.dtype)
    C_out = out_k.shape[2]
    if tuple(out_k.shape) != (B, Hkv, C_out, D) or C_out < K:
        raise ValueError(f"out_k must have shape [B, Hkv, C_out, D] with B={B}, Hkv={Hkv}, D={D} and C_out >= K={K}, "
                         f"got {tuple(out_k.shape)}")
    _check_kv("out_v", out_v, device, k_src.dtype)
    if tuple(out_v.shape) != tuple(out_k.shape):
        raise ValueError(f"out_v must have the shape of out_k {tuple(out_k.shape)}, got {tuple(out_v.shape)}")
    out_token_data, out_token_sums = tuple(out_token_data), tuple(out_token_sums)
    for name, outs, srcs in (("out_token_data", out_token_data, token_data),
                             ("out_token_sums", out_token_sums, token_sums)):
        if len(outs) != len(srcs):
            raise ValueError(f"{name} must hold one tensor per {name[4:]} entry ({len(srcs)}), got {len(outs)}")
        for i, (out, src) in enumerate(zip(outs, srcs)):
            check_tensor(f"{name}[{i}]", out, shape=(B, Hkv, C_out), what="[B, Hkv, C_out]", dtypes=(src.dtype,),
                         device=device, like=_SOURCE)
    outs = [("out_k", out_k), ("out_v", out_v)] + [(f"out_token_data[{i}]", x) for i, x in enumerate(out_token_data)] \
        + [(f"out_token_sums[{i}]", x) for i, x in enumerate(out_token_sums)]
    out_spans = _check_no_overlap(outs)
    sources = [("k_src", k_src), ("v_src", v_src)] + [(f"token_data[{i}]", x) for i, x in enumerate(token_data)] \
        + [(f"token_sums[{i}]", x) for i, x in enumerate(token_sums)]
    src_spans = _spans(sources)
    for out_name, _, a0, a1 in out_spans:
        for src_name, _, b0, b1 in src_spans:
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{out_name} and {src_name} must not share memory ({out_name} is written while "
                                 f"{src_name} is read)")
    _check_plan_not_written(out_spans, keep, keep_lengths, merge_target, merge_weight)
    if B * Hkv == 0 or K == 0:
        return
    plan = _build_plan(lengths, keep, keep_lengths, merge_target, merge_weight, C)
    for srcs, dsts, is_sum in ((token_data, out_token_data, False), (token_sums, out_token_sums, True)):
        for src, dst in zip(srcs, dsts):
            _compact_metadata(src, dst, plan, is_sum=is_sum)
    _phase1(k_src, v_src, out_k, out_v, plan, skip_unmoved=False)
