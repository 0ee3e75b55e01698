"""Causal GQA prefill attention that also returns the mass every key receives from every prompt query.

The prefill twin of the fused decode kernel. For a prompt's queries ``[B, Hq, T, D]`` and keys (and values)
``[B, Hkv, T, D]``, query i sees keys ``key_start[b] <= t <= i`` (``key_start`` is the left padding). Besides the
row logsumexp (and the attention output when values are given) it returns H2O's "accumulated attention" evidence:
``key_mass[b, h, t]``, the softmax probability of key t summed over all T queries and the G query heads of its GQA
group (with ``decay`` < 1, query i weighs ``decay ** (T - 1 - i)``: recency-weighted evidence). Flash-attention
tiling throughout: the T x T score matrix is never formed, each probability of the second
pass is recomputed from the row logsumexp of the first. The spec is :func:`acckv_triton.reference.observed_attention`.

Kernels and grids (G = Hq / Hkv; log2-domain logits, float32 accumulation):
    ``_observed_fwd_kernel``  grid (cdiv(T, BLOCK_M), B*Hq). One program owns BLOCK_M queries of one query head
        (the longest rows launch first). Online softmax over the causally visible key tiles only: tiles entirely
        above the diagonal or inside the padding are never loaded. Writes each row's natural-log logsumexp
        ``[B, Hq, T]`` and, with values (``HAS_V``), the output rows (any strides: transformers' ``[B, T, Hq, D]``
        directly).
    ``_observed_mass_kernel`` grid (cdiv(T, BLOCK_N), B*Hkv). One program owns BLOCK_N keys of one kv head and loops
        over the G heads and the query tiles at or after its keys (the only ones that see them), summing
        ``exp(q·k·scale - lse)``. Each key belongs to one program: no atomics, deterministic.

Bytes moved per (b, kv head), e = element size: G·T·D·e of Q, T·D·e of K (and of V) from DRAM in the first pass,
whose query blocks re-read the visible K/V tiles (G·T²·D·e / (2·BLOCK_M) each, from L2); the second pass re-reads
Q and the lse per key tile (G·T²·(D·e + 4) / (2·BLOCK_N)); 4·G·T bytes of lse written, 4·T of key mass, G·T·D·e of
output. Extra memory: the lse, O(B·Hq·T).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import tuning
from . import _common
from ._common import check_last_dim_contiguous, check_shape, check_tensor, next_pow2
from ..reference import ObservedAttention

__all__ = ["ObservedAttention", "observed_attention"]

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["T"])
def _observed_fwd_kernel(
    q_ptr, k_ptr, v_ptr, key_start_ptr, out_ptr, lse_ptr,
    T, Hq, qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_V: tl.constexpr, HAS_KEY_START: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)  # the last query block sees the most keys: launch it first
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    hq = bh % Hq
    h = hq // GROUP_SIZE

    key_start = 0
    if HAS_KEY_START:
        key_start = tl.minimum(tl.maximum(tl.load(key_start_ptr + b), 0), T)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_ok = (offs_m < T) & (offs_m >= key_start)  # a query inside the padding sees nothing
    q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = (key_start // BLOCK_N) * BLOCK_N  # tiles before the padding ends are skipped
    hi = tl.minimum((m_block + 1) * BLOCK_M, T)  # ... and tiles entirely above the diagonal
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = (offs_n < T) & (offs_n >= key_start)  # padding keys may hold anything, NaN included: never loaded
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                    mask=key_ok[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2-domain logits
        visible = row_ok[:, None] & key_ok[None, :] & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_V:
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :],
                        mask=key_ok[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + bh * T + offs_m, lse, mask=offs_m < T)  # lse is a fresh contiguous [B*Hq, T]
    if HAS_V:
        out = acc / tl.where(seen, l_i, 1.0)[:, None]  # 0 for a row that sees nothing
        tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(offs_m < T)[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["T"])
def _observed_mass_kernel(
    q_ptr, k_ptr, key_start_ptr, lse_ptr, key_mass_ptr,
    T, Hkv, qk_scale, decay_log2,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hkv
    h = bh % Hkv

    key_start = 0
    if HAS_KEY_START:
        key_start = tl.minimum(tl.maximum(tl.load(key_start_ptr + b), 0), T)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    key_ok = (offs_n < T) & (offs_n >= key_start)  # padding keys may hold anything, NaN included: never loaded
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                mask=key_ok[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)

    # Only queries i >= max(n0, key_start) see a key of this tile; a tile inside the padding loops over nothing.
    m_lo = (tl.maximum(n0, key_start) // BLOCK_M) * BLOCK_M
    m_lo = tl.where(n0 + BLOCK_N <= key_start, T, m_lo)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(GROUP_SIZE):
        hq = h * GROUP_SIZE + g
        q_base = q_ptr + b * stride_qb + hq * stride_qh
        lse_base = lse_ptr + (b * Hkv * GROUP_SIZE + hq) * T
        for m0 in range(m_lo, T, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = (offs_m < T) & (offs_m >= key_start)
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :],
                        mask=row_ok[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("-inf")) * 1.4426950408889634
            row_ok = row_ok & (lse2 != float("-inf"))
            # query i weighs decay^(T - 1 - i): folded into its lse (decay_log2 = -log2(decay), 0 for no decay)
            lse2 = tl.where(row_ok, lse2 + (T - 1 - offs_m).to(tl.float32) * decay_log2, 0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2-domain logits
            visible = row_ok[:, None] & key_ok[None, :] & (offs_n[None, :] <= offs_m[:, None])
            acc += tl.sum(tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0), axis=0)
    tl.store(key_mass_ptr + bh * T + offs_n, acc, mask=offs_n < T)  # key_mass is a fresh contiguous [B*Hkv, T]


_fwd_kernel = tuning.TunedKernel(
    "observed_attention",
    _observed_fwd_kernel,
    tuning.CONFIG_SPACES["observed_attention"],
    key=["HEAD_DIM", "HAS_V", "HAS_KEY_START"],
    dtype_arg="q_ptr",
)
_mass_kernel = tuning.TunedKernel(
    "observed_attention_mass",
    _observed_mass_kernel,
    tuning.CONFIG_SPACES["observed_attention_mass"],
    key=["HEAD_DIM", "GROUP_SIZE", "HAS_KEY_START"],
    dtype_arg="q_ptr",
)


def observed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    key_start: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    decay: float = 1.0,
) -> ObservedAttention:
    """Causal GQA self-attention over a prompt, with the mass each key receives from every query (H2O's evidence).

    Args:
        q: ``[B, Hq, T, D]`` float16, bfloat16 or float32, RoPE applied, last dim contiguous (any other strides, e.g.
            a transposed ``[B, T, Hq, D]``).
        k: ``[B, Hkv, T, D]`` in q's dtype, last dim contiguous. ``Hq % Hkv == 0`` and query head ``hq`` reads kv
            head ``hq // (Hq // Hkv)``.
        v: optional ``[B, Hkv, T, D]`` values in q's dtype, last dim contiguous; without them no output is computed.
        scale: softmax scale, default ``D ** -0.5``.
        key_start: optional ``[B]`` int32 or int64, ``0 <= key_start <= T``: the left padding. Query i sees the keys
            ``key_start[b] <= t <= i``; a query ``i < key_start[b]`` sees none.
        out: optional ``[B, Hq, T, D]`` buffer in q's dtype, last dim contiguous (any other strides), written in
            place and returned; only with ``v``.
        decay: a float in (0, 1]: query i weighs ``decay ** (T - 1 - i)`` in ``key_mass`` (recency-weighted
            evidence; 1, the default: every query alike).

    Returns:
        :class:`ObservedAttention` ``(out, lse, key_mass)``: ``out [B, Hq, T, D]`` in q's dtype (None without v),
        ``lse [B, Hq, T]`` float32 natural-log logsumexp of each row (-inf for a row that sees nothing, whose output
        is 0), and ``key_mass [B, Hkv, T]`` float32 with ``key_mass[b, h, t] = sum_i decay^(T-1-i) sum_g
        softmax_t(scale * q[b, h*G+g, i] . k[b, h, t])`` (0 at padding keys).

    Raises:
        TypeError / ValueError naming the argument for a wrong type, rank, shape, dtype, device or stride, a head
        count not divisible, ``out`` without ``v``, or key_start outside ``[0, T]``.
    """
    scale, decay, _ = check_args(q, k, v, scale=scale, key_start=key_start, out=out, decay=decay)
    log2_decay = _common.decay_log2(decay)
    device = q.device
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if key_start is not None:
        key_start = key_start.to(torch.int32).contiguous()

    G = Hq // Hkv
    if v is not None and out is None:
        out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=device)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=device)
    key_mass = torch.empty((B, Hkv, T), dtype=torch.float32, device=device)
    if B == 0 or T == 0:
        return ObservedAttention(out, lse, key_mass)

    ks_arg = key_start if key_start is not None else lse  # never read without HAS_KEY_START
    common = dict(
        q_ptr=q, k_ptr=k, key_start_ptr=ks_arg, lse_ptr=lse, T=T, qk_scale=float(scale) * _LOG2E,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2),
        HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)), GROUP_SIZE=G, HAS_KEY_START=key_start is not None,
        UPCAST=tuning.INTERPRET, DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
    )
    v_arg, out_arg = (v, out) if v is not None else (k, lse)  # never touched without HAS_V
    v_strides = v.stride()[:3] if v is not None else (0, 0, 0)
    o_strides = out.stride()[:3] if v is not None else (0, 0, 0)
    _fwd_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)](
        v_ptr=v_arg, out_ptr=out_arg, Hq=Hq,
        stride_vb=v_strides[0], stride_vh=v_strides[1], stride_vt=v_strides[2],
        stride_ob=o_strides[0], stride_oh=o_strides[1], stride_ot=o_strides[2],
        HAS_V=v is not None, **common,
    )
    _mass_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)](
        key_mass_ptr=key_mass, Hkv=Hkv, decay_log2=log2_decay, **common)
    return ObservedAttention(out, lse, key_mass)


def check_args(q, k, v=None, *, scale=None, key_start=None, out=None, decay: float = 1.0,
               kernel_device: bool = True) -> tuple[float, float, tuple[int, int] | None]:
    """Every check :func:`observed_attention` runs before it launches. Returns ``(scale, decay, bounds)``: the scale
    (``D ** -0.5`` for None), the checked decay and ``(min, max)`` of ``key_start`` as read on the host (a sync;
    None without key_start, for B = 0 or while a CUDA graph is being captured, when it is not read).
    ``kernel_device=False`` accepts any device (the torch twin, :func:`acckv_triton.torch_ops.observed_attention`,
    which reuses the bounds instead of reading key_start again)."""
    bounds = None
    device = _common.check_leading("q", q, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                                   kernel_device=kernel_device)
    B, Hq, T, D = q.shape
    check_tensor("k", k, rank=4, dtypes=(q.dtype,), device=device, like="q")
    Hkv = k.shape[1]
    check_shape("k", k, (B, Hkv, T, D), "[B, Hkv, T, D]")
    if Hkv == 0 or Hq == 0 or Hq % Hkv != 0:
        raise ValueError(f"the query head count Hq={Hq} (q) must be a positive multiple of Hkv={Hkv} (k)")
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous("k", k)
    if v is not None:
        check_tensor("v", v, rank=4, shape=(B, Hkv, T, D), what="[B, Hkv, T, D]", dtypes=(q.dtype,), device=device,
                     like="q")
        check_last_dim_contiguous("v", v)
    if out is not None:
        if v is None:
            raise ValueError("out was given without v: there is no attention output to write")
        check_tensor("out", out, rank=4, shape=(B, Hq, T, D), what="[B, Hq, T, D]", dtypes=(q.dtype,),
                     device=device, like="q")
        check_last_dim_contiguous("out", out)
    if key_start is not None:
        check_tensor("key_start", key_start, rank=1, shape=(B,), what="[B]", dtypes=(torch.int32, torch.int64),
                     device=device, like="q")
        if B and not _common.is_capturing(device):
            bounds = _common.host_range(key_start)
            if bounds[0] < 0 or bounds[1] > T:
                raise ValueError(f"key_start must lie in [0, T={T}] (q dim 2), got min {bounds[0]}, max {bounds[1]}")
    return _common.check_scale(scale, D), _common.check_decay(decay), bounds
