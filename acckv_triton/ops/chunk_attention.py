"""Attention of a multi-token chunk over a ragged compressed cache plus the chunk itself, with the window's mass.

A second question, a streaming chunk or teacher forcing brings T new queries ``[B, Hq, T, D]`` to a layer whose cache
holds S compressed slots per (b, kv head) (``lengths`` valid, merged slots weighing ``multiplicity`` tokens: ``+ log
n`` on their logit). Query i of the chunk sees every valid stored slot and the chunk keys ``u <= i`` that are valid
(left padding excluded). Besides the output it returns what the cache needs to re-compress: the mass the chunk's last
W queries (the observation window) give each stored slot and each chunk token, summed over the window and the G query
heads of the group (``reduce="sum"``; with ``decay`` < 1 query i weighs ``decay ** (T - 1 - i)``), or its largest
probability over them (``reduce="max"``: a reconstruction pass's evidence, after KVzip). No ``(S + T) x T`` tensor
and no float32 logits tensor are formed. The spec is :func:`acckv_triton.reference.chunk_attention`.

Kernels and grids (G = Hq / Hkv; rows are (head g, query i) pairs of one GQA group, so ``tl.dot`` shares K):
    ``_chunk_attn_kernel`` grid (B*Hkv, cdiv(G*T, BLOCK_M)). Online softmax over the stored tiles then the chunk's
        causal tiles; writes the output rows (any strides: transformers' ``[B, T, Hq, D]`` directly) and each row's
        logsumexp ``[B, Hq, T]``.
    ``_chunk_mass_kernel`` grid (B*Hkv, cdiv(S + T, BLOCK_N)). One program owns a tile of the S + T keys and loops
        over the G*W window rows, recomputing ``p = exp(s - lse)``; each key belongs to one program, so no atomics.

Both are tuned kernels (:class:`~acckv_triton.tuning.TunedKernel`): BLOCK_M and BLOCK_N (with warps and stages)
come from the per-GPU tuned tables, keyed on head dim, group size and dtype (the mass kernel also on its window
row block), else live autotuning, else the space's first config.

Bytes moved per (b, kv head), e = element size: (S + T)·D·e of K and V once per row block, plus S + T keys again
for the window's mass; extra memory O(B·Hq·T) (the logsumexp).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import tuning
from . import _common
from ._common import check_last_dim_contiguous, check_shape, check_tensor, next_pow2

__all__ = ["ChunkAttention", "chunk_attention"]

_LOG2E = 1.4426950408889634


class ChunkAttention(NamedTuple):
    """Result of :func:`chunk_attention`."""

    out: torch.Tensor  # [B, Hq, T, D] (a view of the given out buffer's layout), q's dtype
    lse: torch.Tensor  # [B, Hq, T] float32, natural log; -inf for a row that sees no key
    stored_mass: torch.Tensor  # [B, Hkv, S] float32: the window's mass on each stored slot (0 past lengths)
    chunk_mass: torch.Tensor  # [B, Hkv, T] float32: the window's mass on each chunk token


@triton.jit
def _load_keys(k_old, k_new, base_old, base_new, offs, S, T, s_old, s_new, offs_d, d_mask, UPCAST: tl.constexpr):
    """Rows ``offs`` of the unified key space: stored slots below S, then the chunk's keys."""
    is_old = offs < S
    old = tl.load(k_old + base_old + offs[:, None].to(tl.int64) * s_old + offs_d[None, :],
                  mask=(is_old & (offs >= 0))[:, None] & d_mask[None, :], other=0.0)
    new = tl.load(k_new + base_new + (offs - S)[:, None].to(tl.int64) * s_new + offs_d[None, :],
                  mask=(~is_old & (offs < S + T))[:, None] & d_mask[None, :], other=0.0)
    x = tl.where(is_old[:, None], old, new)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _key_bias(mult_base, n, valid_base, offs, S, T, HAS_MULT: tl.constexpr, HAS_VALID: tl.constexpr):
    """log2 weight of each key (log2 n for a merged slot), -inf for a key nobody may see (past lengths, padding)."""
    is_old = offs < S
    ok = tl.where(is_old, offs < n, offs < S + T)
    if HAS_VALID:
        ok = ok & (is_old | (tl.load(valid_base + (offs - S), mask=~is_old & (offs < S + T), other=0) != 0))
    bias = tl.zeros(offs.shape, tl.float32)
    if HAS_MULT:
        m = tl.load(mult_base + offs, mask=is_old & ok, other=1.0)
        bias = tl.where(is_old, tl.log2(m), 0.0)
    return tl.where(ok, bias, float("-inf"))


@triton.jit(do_not_specialize=["S", "T"])
def _chunk_attn_kernel(
    q_ptr, k_old, v_old, k_new, v_new, lengths_ptr, mult_ptr, valid_ptr, out_ptr, lse_ptr,
    S, T, Hkv, qk_scale,
    s_qb, s_qh, s_qt, s_kob, s_koh, s_kot, s_vob, s_voh, s_vot, s_knb, s_knh, s_knt, s_vnb, s_vnh, s_vnt,
    s_mb, s_mh, s_vb, s_ob, s_oh, s_ot,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_MULT: tl.constexpr,
    HAS_VALID: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hkv
    h = bh % Hkv
    offs_r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = offs_r < GROUP_SIZE * T
    g = offs_r // T
    i = offs_r % T
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    hq = h * GROUP_SIZE + g
    q = tl.load(q_ptr + b * s_qb + hq[:, None].to(tl.int64) * s_qh + i[:, None].to(tl.int64) * s_qt + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_len = tl.load(lengths_ptr + bh)
    last = tl.minimum(S + tl.max(tl.where(r_mask, i, 0)) + 1, S + T)  # no row of the block sees a later key
    for n0 in range(0, last, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_keys(k_old, k_new, b * s_kob + h * s_koh, b * s_knb + h * s_knh, offs_n, S, T, s_kot, s_knt,
                       offs_d, d_mask, UPCAST)
        v = _load_keys(v_old, v_new, b * s_vob + h * s_voh, b * s_vnb + h * s_vnh, offs_n, S, T, s_vot, s_vnt,
                       offs_d, d_mask, UPCAST)
        bias = _key_bias(mult_ptr + b * s_mb + h * s_mh, n_len, valid_ptr + b * s_vb, offs_n, S, T, HAS_MULT,
                         HAS_VALID)
        seen_key = bias != float("-inf")  # slots past lengths and padding may hold anything, NaN included
        k = tl.where(seen_key[:, None], k, 0.0)
        v = tl.where(seen_key[:, None], v, 0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + tl.where(seen_key, bias, 0.0)[None, :]
        visible = r_mask[:, None] & seen_key[None, :] & ((offs_n[None, :] < S) | (offs_n[None, :] - S <= i[:, None]))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(out_ptr + b * s_ob + hq[:, None].to(tl.int64) * s_oh + i[:, None].to(tl.int64) * s_ot + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + (b * Hkv * GROUP_SIZE + hq) * T + i, lse, mask=r_mask)


@triton.jit(do_not_specialize=["S", "T", "W"])
def _chunk_mass_kernel(
    q_ptr, k_old, k_new, lengths_ptr, mult_ptr, valid_ptr, lse_ptr, old_mass_ptr, new_mass_ptr,
    S, T, W, Hkv, qk_scale, decay_log2,
    s_qb, s_qh, s_qt, s_kob, s_koh, s_kot, s_knb, s_knh, s_knt, s_mb, s_mh, s_vb,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_MULT: tl.constexpr,
    HAS_VALID: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, REDUCE_MAX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hkv
    h = bh % Hkv
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    k = _load_keys(k_old, k_new, b * s_kob + h * s_koh, b * s_knb + h * s_knh, offs_n, S, T, s_kot, s_knt,
                   offs_d, d_mask, UPCAST)
    bias = _key_bias(mult_ptr + b * s_mb + h * s_mh, tl.load(lengths_ptr + bh), valid_ptr + b * s_vb, offs_n, S, T,
                     HAS_MULT, HAS_VALID)
    seen_key = bias != float("-inf")
    k = tl.where(seen_key[:, None], k, 0.0)
    bias = tl.where(seen_key, bias, 0.0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(0, GROUP_SIZE * W, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < GROUP_SIZE * W
        g = offs_r // W
        i = T - W + offs_r % W
        hq = h * GROUP_SIZE + g
        q = tl.load(q_ptr + b * s_qb + hq[:, None].to(tl.int64) * s_qh + i[:, None].to(tl.int64) * s_qt
                    + offs_d[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse2 = tl.load(lse_ptr + (b * Hkv * GROUP_SIZE + hq) * T + i, mask=r_mask, other=float("-inf")) * 1.4426950408889634
        row_ok = r_mask & (lse2 != float("-inf"))
        # window query i weighs decay^(T - 1 - i): folded into its lse (decay_log2 = -log2(decay); 0 with max)
        lse2 = tl.where(row_ok, lse2 + (T - 1 - i).to(tl.float32) * decay_log2, 0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + bias[None, :]
        visible = row_ok[:, None] & ((offs_n[None, :] < S) | (offs_n[None, :] - S <= i[:, None])) & \
            seen_key[None, :]
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        if REDUCE_MAX:
            acc = tl.maximum(acc, tl.max(p, axis=0))
        else:
            acc += tl.sum(p, axis=0)
    tl.store(old_mass_ptr + bh * S + offs_n, acc, mask=offs_n < S)
    tl.store(new_mass_ptr + bh * T + (offs_n - S), acc, mask=(offs_n >= S) & (offs_n < S + T))


_attn_kernel = tuning.TunedKernel(
    "chunk_attention",
    _chunk_attn_kernel,
    tuning.CONFIG_SPACES["chunk_attention"],
    key=["HEAD_DIM", "GROUP_SIZE"],
    dtype_arg="q_ptr",
)
_mass_kernel = tuning.TunedKernel(
    "chunk_attention_mass",
    _chunk_mass_kernel,
    tuning.CONFIG_SPACES["chunk_attention_mass"],
    key=["HEAD_DIM", "GROUP_SIZE", "BLOCK_R"],
    dtype_arg="q_ptr",
)


def chunk_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    *,
    scale: float | None = None,
    multiplicity: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    window: int = 32,
    reduce: str = "sum",
    out: torch.Tensor | None = None,
    decay: float = 1.0,
    check_lengths: bool = True,
) -> ChunkAttention:
    """Causal attention of T chunk queries over the stored slots and the chunk, and the window's mass on both.

    Args:
        q: ``[B, Hq, T, D]`` float16, bfloat16 or float32, RoPE applied, last dim contiguous (any other strides).
        k_cache, v_cache: ``[B, Hkv, S, D]`` the stored slots, q's dtype; ``Hq % Hkv == 0``.
        lengths: ``[B, Hkv]`` int32, valid slots per row (``0 <= lengths <= S``; see ``check_lengths``).
        k_new, v_new: ``[B, Hkv, T, D]`` the chunk's keys and values; chunk query i sees chunk keys ``u <= i``.
        scale: softmax scale, default ``D ** -0.5``.
        multiplicity: optional ``[B, Hkv, S]`` float32 > 0: slot t weighs ``n_t`` tokens (``p ∝ n_t exp(s_t)``).
        key_valid: optional ``[B, T]`` bool, False at the chunk's left padding (never seen).
        window: W, the chunk's last ``min(window, T)`` queries whose mass is returned.
        reduce: ``"sum"``: each key's mass summed over the W queries and the G heads of its group; ``"max"``: the
            largest probability any of them gives it.
        decay: a float in (0, 1]: with ``reduce="sum"`` chunk query i weighs ``decay ** (T - 1 - i)`` in the masses
            (recency-weighted evidence; 1, the default: every query alike); ``"max"`` takes only 1.
        out: optional ``[B, Hq, T, D]`` buffer in q's dtype (any strides, e.g. a transposed ``[B, T, Hq, D]``).
        check_lengths: verify on the host (one sync, skipped while a CUDA graph is captured) ``0 <= lengths <= S``
            and a finite multiplicity > 0 at every stored slot, as :func:`acckv_triton.decode_attention` does. The
            cache, which maintains both, passes False; the kernels clamp lengths to ``[0, S]`` regardless.

    Returns:
        :class:`ChunkAttention` ``(out, lse, stored_mass, chunk_mass)``. A row that sees no key gives 0 and lse -inf.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, rank, shape, dtype, device or stride, or (with
        ``check_lengths``) lengths outside ``[0, S]`` or a multiplicity <= 0 or not finite at a stored slot.
    """
    scale, log2_decay = check_args(q, k_cache, v_cache, lengths, k_new, v_new, scale=scale, multiplicity=multiplicity,
                                   key_valid=key_valid, window=window, reduce=reduce, out=out, decay=decay)
    device = q.device
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if check_lengths and lengths.numel() and not _common.is_capturing(device):
        _common.check_stored_values(lengths, S, None, multiplicity)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    G = Hq // Hkv
    W = min(window, T)
    lengths_c = lengths.contiguous()
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=device)
    stored_mass = torch.empty((B, Hkv, S), dtype=torch.float32, device=device)
    chunk_mass = torch.empty((B, Hkv, T), dtype=torch.float32, device=device)
    if B == 0 or T == 0:
        return ChunkAttention(out, lse, stored_mass.zero_(), chunk_mass)
    mult = multiplicity if multiplicity is not None else stored_mass
    m_strides = (multiplicity.stride(0), multiplicity.stride(1)) if multiplicity is not None else (0, 0)
    valid = key_valid.view(torch.uint8) if key_valid is not None else lengths_c
    flags = dict(HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)), GROUP_SIZE=G, HAS_MULT=multiplicity is not None,
                 HAS_VALID=key_valid is not None, UPCAST=tuning.INTERPRET,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else None)
    qk_scale = float(scale) * _LOG2E
    common = dict(q_ptr=q, k_old=k_cache, k_new=k_new, lengths_ptr=lengths_c, mult_ptr=mult, valid_ptr=valid,
                  S=S, T=T, Hkv=Hkv, qk_scale=qk_scale, s_qb=q.stride(0), s_qh=q.stride(1), s_qt=q.stride(2),
                  s_kob=k_cache.stride(0), s_koh=k_cache.stride(1), s_kot=k_cache.stride(2),
                  s_knb=k_new.stride(0), s_knh=k_new.stride(1), s_knt=k_new.stride(2),
                  s_mb=m_strides[0], s_mh=m_strides[1], s_vb=key_valid.stride(0) if key_valid is not None else 0,
                  **flags)
    _attn_kernel[lambda meta: (B * Hkv, triton.cdiv(G * T, meta["BLOCK_M"]))](
        v_old=v_cache, v_new=v_new, out_ptr=out, lse_ptr=lse,
        s_vob=v_cache.stride(0), s_voh=v_cache.stride(1), s_vot=v_cache.stride(2),
        s_vnb=v_new.stride(0), s_vnh=v_new.stride(1), s_vnt=v_new.stride(2),
        s_ob=out.stride(0), s_oh=out.stride(1), s_ot=out.stride(2), **common)
    _mass_kernel[lambda meta: (B * Hkv, triton.cdiv(S + T, meta["BLOCK_N"]))](
        lse_ptr=lse, old_mass_ptr=stored_mass, new_mass_ptr=chunk_mass, W=W, decay_log2=log2_decay,
        REDUCE_MAX=reduce == "max", BLOCK_R=max(16, min(64, next_pow2(G * W))), **common)
    return ChunkAttention(out, lse, stored_mass, chunk_mass)


def check_args(q, k_cache, v_cache, lengths, k_new, v_new, *, scale=None, multiplicity=None, key_valid=None,
               window: int = 32, reduce: str = "sum", out=None, decay: float = 1.0,
               kernel_device: bool = True) -> tuple[float, float]:
    """Every check :func:`chunk_attention` runs before it launches (host only: no value is read, ``lengths``
    included); returns ``(scale, -log2(decay))``, the scale ``D ** -0.5`` for None. ``kernel_device=False``
    accepts any device (the torch twin, :func:`acckv_triton.torch_ops.chunk_attention`)."""
    device = _common.check_leading("q", q, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                                   kernel_device=kernel_device)
    B, Hq, T, D = q.shape
    check_tensor("k_cache", k_cache, rank=4, dtypes=(q.dtype,), device=device, like="q")
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    for name, x, n in (("k_cache", k_cache, S), ("v_cache", v_cache, S), ("k_new", k_new, T), ("v_new", v_new, T)):
        check_tensor(name, x, rank=4, dtypes=(q.dtype,), device=device, like="q")
        check_shape(name, x, (B, Hkv, n, D), "[B, Hkv, " + ("S" if name.endswith("cache") else "T") + ", D]")
        check_last_dim_contiguous(name, x)
    check_last_dim_contiguous("q", q)
    if Hkv == 0 or Hq == 0 or Hq % Hkv != 0:
        raise ValueError(f"the query head count Hq={Hq} (q) must be a positive multiple of Hkv={Hkv} (k_cache)")
    check_tensor("lengths", lengths, shape=(B, Hkv), what="[B, Hkv]", dtypes=(torch.int32,), device=device, like="q")
    if multiplicity is not None:
        check_tensor("multiplicity", multiplicity, shape=(B, Hkv, S), what="[B, Hkv, S]", dtypes=(torch.float32,),
                     device=device, like="q")
        if multiplicity.stride(-1) != 1:
            raise ValueError("multiplicity must have a contiguous last dim")
    if key_valid is not None:
        check_tensor("key_valid", key_valid, shape=(B, T), what="[B, T]", dtypes=(torch.bool,), device=device,
                     like="q")
        if key_valid.stride(-1) != 1:
            raise ValueError("key_valid must have a contiguous last dim")
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int >= 1, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
    log2_decay = _common.decay_log2(decay)
    if reduce == "max" and log2_decay != 0.0:
        raise ValueError(f"decay weighs the summed masses: reduce='max' takes decay=1, got {decay}")
    if out is not None:
        check_tensor("out", out, shape=(B, Hq, T, D), what="[B, Hq, T, D]", dtypes=(q.dtype,), device=device,
                     like="q")
        check_last_dim_contiguous("out", out)  # the kernel writes each row's D values as one contiguous vector
    return _common.check_scale(scale, D), log2_decay
