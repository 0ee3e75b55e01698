"""Fused split-K GQA decode attention that also measures where the attention mass goes.

For one new query token per sequence it computes softmax attention over a ragged KV cache and, in the same pass
that reads K/V, the mass each cached token receives (summed over the query heads of its GQA group) and the mass
each modality receives (per query head). The spec is :func:`acckv_triton.reference.decode_attention`.

Kernels and grids (B sequences, Hkv kv heads, G = Hq / Hkv, capacity C, S splits):
    ``_decode_split_kernel``  grid (B*Hkv, S). One program owns a GQA group and one split of that (b, h)'s valid
        tokens. The G query heads share each K/V tile, padded to BLOCK_G >= 16 rows for ``tl.dot``, so a tile is
        read once per group. It keeps an online softmax and writes partials: o, lse and per-modality mass, each
        normalised within the split. With token-mass accumulation it also writes the split-local log2 logits
        ``[B*Hq, C]`` float32 (scratch sized by capacity).
    ``_decode_reduce_kernel`` grid (B*Hkv,). Merges the S partials exactly by their lse and writes out, lse and
        modality mass.
    ``_token_mass_kernel``    grid (B*Hkv, C / BLOCK_T). The light second pass: with the final lse known, turns the
        stored logits into exact probabilities and adds their group sum into ``token_mass`` in place. Each token
        belongs to exactly one program, so there are no atomics and no races.

Bytes moved per (b, kv head) of length L (D = head dim, e = element size): 2·L·D·e for K and V, plus L bytes of
modality ids, plus 3·L·G·4 + 8·L bytes for token-mass accumulation (logits written and read back, mass read and
written). The split count depends on B·Hkv, the SM count and the capacity, never on device-side lengths, so a
call performs no host synchronisation (with ``check_lengths=False``) and can be captured in a CUDA graph.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .. import tuning
from . import _common
from ._common import check_last_dim_contiguous, check_shape, check_tensor, next_pow2
from ..modality import NUM_MODALITIES
from ..reference import DecodeAttentionOutput

__all__ = ["DecodeAttentionOutput", "decode_attention"]

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["C"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, lengths_ptr, modality_ptr, multiplicity_ptr, logits_ptr,
    o_part_ptr, lse_part_ptr, mass_part_ptr,
    C, Hkv, qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mt,
    stride_cb, stride_ch, stride_ct,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
    NUM_MOD: tl.constexpr,
    HAS_MODALITY: tl.constexpr, HAS_TOKEN_MASS: tl.constexpr, HAS_MULTIPLICITY: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv

    length = tl.load(lengths_ptr + b * stride_lb + h * stride_lh)
    length = tl.minimum(tl.maximum(length, 0), C)  # memory safety even when lengths were not checked
    tiles_per_split = tl.cdiv(tl.cdiv(length, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, NUM_MOD)
    g_mask = offs_g < GROUP_SIZE
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + (h * GROUP_SIZE + offs_g)[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    row = pid_bh * GROUP_SIZE + offs_g  # query-head row in [B*Hq]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    mass = tl.zeros([BLOCK_G, NUM_MOD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2-domain logits
        if HAS_MULTIPLICITY:  # a slot standing for n tokens weighs n: exp2(s + log2 n) = n * exp2(s)
            mult = tl.load(multiplicity_ptr + b * stride_cb + h * stride_ch + offs_n * stride_ct, mask=n_mask,
                           other=1.0)
            s += tl.log2(mult)[None, :]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        if HAS_TOKEN_MASS:
            tl.store(logits_ptr + row[:, None] * C + offs_n[None, :], s, mask=g_mask[:, None] & n_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        if HAS_MODALITY:
            mod = tl.load(modality_ptr + b * stride_mb + h * stride_mh + offs_n * stride_mt, mask=n_mask, other=0)
            mass = mass * alpha[:, None]
            for mi in tl.static_range(NUM_MOD):
                part = tl.sum(tl.where(mod[None, :] == mi, p, 0.0), axis=1)
                mass += tl.where(offs_m[None, :] == mi, part[:, None], 0.0)
        m_i = m_new

    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    part_row = row * num_splits + split
    tl.store(lse_part_ptr + part_row, tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf")), mask=g_mask)
    tl.store(
        o_part_ptr + part_row[:, None] * BLOCK_D + offs_d[None, :], acc / l_safe[:, None], mask=g_mask[:, None]
    )
    if HAS_MODALITY:
        tl.store(
            mass_part_ptr + part_row[:, None] * NUM_MOD + offs_m[None, :], mass / l_safe[:, None],
            mask=g_mask[:, None],
        )


@triton.jit
def _decode_reduce_kernel(
    o_part_ptr, lse_part_ptr, mass_part_ptr,
    out_ptr, lse_ptr, mass_ptr,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_MOD: tl.constexpr, HAS_MODALITY: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, NUM_MOD)
    g_mask = offs_g < GROUP_SIZE
    row = pid_bh * GROUP_SIZE + offs_g  # query-head row in [B*Hq]

    lse_parts = tl.load(
        lse_part_ptr + row[:, None] * num_splits + offs_s[None, :],
        mask=g_mask[:, None] & (offs_s[None, :] < num_splits), other=float("-inf"),
    )
    top = tl.max(lse_parts, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)  # an empty row: every weight becomes 0
    w = tl.exp2(lse_parts - top[:, None])
    w_sum = tl.sum(w, axis=1)
    nonempty = w_sum > 0.0
    w = w / tl.where(nonempty, w_sum, 1.0)[:, None]

    out = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    mass = tl.zeros([BLOCK_G, NUM_MOD], tl.float32)
    for s in range(num_splits):
        w_s = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), axis=1)[:, None]
        part_row = row * num_splits + s
        o_s = tl.load(o_part_ptr + part_row[:, None] * BLOCK_D + offs_d[None, :], mask=g_mask[:, None], other=0.0)
        out += w_s * o_s
        if HAS_MODALITY:
            m_s = tl.load(mass_part_ptr + part_row[:, None] * NUM_MOD + offs_m[None, :], mask=g_mask[:, None],
                          other=0.0)
            mass += w_s * m_s

    lse = tl.where(nonempty, (top + tl.log2(tl.where(nonempty, w_sum, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + row, lse, mask=g_mask)
    tl.store(
        out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],  # out is a fresh contiguous [B*Hq, D]
        out.to(out_ptr.dtype.element_ty),
        mask=g_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
    )
    if HAS_MODALITY:
        tl.store(mass_ptr + row[:, None] * NUM_MOD + offs_m[None, :], mass, mask=g_mask[:, None])


@triton.jit(do_not_specialize=["C"])
def _token_mass_kernel(
    logits_ptr, lse_ptr, lengths_ptr, token_mass_ptr,
    C, Hkv,
    stride_lb, stride_lh,
    stride_tb, stride_th, stride_tt,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    length = tl.load(lengths_ptr + b * stride_lb + h * stride_lh)
    length = tl.minimum(tl.maximum(length, 0), C)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < length
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP_SIZE
    row = pid_bh * GROUP_SIZE + offs_g
    lse2 = tl.load(lse_ptr + row, mask=g_mask, other=0.0) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # an empty (b, h): every token is masked anyway
    mask = g_mask[:, None] & t_mask[None, :]
    s = tl.load(logits_ptr + row[:, None] * C + offs_t[None, :], mask=mask, other=float("-inf"))
    p = tl.where(mask, tl.exp2(s - lse2[:, None]), 0.0)
    tm_ptrs = token_mass_ptr + b * stride_tb + h * stride_th + offs_t * stride_tt
    tm = tl.load(tm_ptrs, mask=t_mask, other=0.0)
    tl.store(tm_ptrs, tm + tl.sum(p, axis=0), mask=t_mask)


_split_kernel = tuning.TunedKernel(
    "decode_attention",
    _decode_split_kernel,
    tuning.CONFIG_SPACES["decode_attention"],
    key=["HEAD_DIM", "GROUP_SIZE", "HAS_MODALITY", "HAS_TOKEN_MASS"],
    dtype_arg="k_ptr",
)
_mass_kernel = tuning.TunedKernel(
    "decode_token_mass",
    _token_mass_kernel,
    tuning.CONFIG_SPACES["decode_token_mass"],
    key=["GROUP_SIZE"],
    dtype_arg="token_mass_ptr",
    restore_value=["token_mass_ptr"],
)


def default_num_splits(batch: int, num_kv_heads: int, capacity: int, device: torch.device) -> int:
    """Splits per (b, kv head): enough programs for two waves over the SMs, >= 256 tokens each, at most 128.

    Depends only on shapes and the device, never on device-side lengths, so choosing it needs no sync.
    """
    return _common.num_splits(batch, num_kv_heads, capacity, device)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    modality: torch.Tensor | None = None,
    token_mass: torch.Tensor | None = None,
    multiplicity: torch.Tensor | None = None,
    num_splits: int | None = None,
    check_lengths: bool = True,
) -> DecodeAttentionOutput:
    """One decode step of GQA attention over a ragged KV cache, measuring attention mass on the way.

    Args:
        q: ``[B, Hq, D]`` float16, bfloat16 or float32: one new query token per sequence, last dim contiguous.
        k_cache, v_cache: ``[B, Hkv, C, D]`` in q's dtype, last dim contiguous; C is the capacity. ``Hq % Hkv == 0``
            and query head ``hq`` reads kv head ``hq // (Hq // Hkv)``.
        lengths: ``[B, Hkv]`` int32, valid tokens per (sequence, kv head), ``0 <= lengths <= C``.
        scale: softmax scale, default ``D ** -0.5``.
        modality: optional ``[B, Hkv, C]`` uint8 modality ids (< ``NUM_MODALITIES``).
        token_mass: optional ``[B, Hkv, C]`` float32, updated in place with
            ``token_mass[b, h, t] += sum_g p[b, h*G + g, t]`` for ``t < lengths[b, h]``; other entries untouched.
        multiplicity: optional ``[B, Hkv, C]`` float32 > 0, how many original tokens each slot stands for (merged
            slots hold several): slot t weighs ``multiplicity[t]`` in the softmax, ``p_t ∝ n_t · exp(s_t)``
            (proportional attention; all ones is plain attention).
        num_splits: split-K factor; default :func:`default_num_splits`.
        check_lengths: verify ``0 <= lengths <= C`` on the host (one sync). Callers that maintain lengths
            themselves, or capture CUDA graphs, pass False; the kernels clamp lengths to ``[0, C]`` regardless.

    Returns:
        ``DecodeAttentionOutput(out [B, Hq, D] in q's dtype, lse [B, Hq] float32 natural log,
        modality_mass [B, Hq, NUM_MODALITIES] float32 or None without modality)``. A (b, h) of length 0 gives
        out 0, lse -inf and mass 0.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, rank, shape, dtype, device or stride, a head
        count not divisible, or lengths outside ``[0, C]``.
    """
    check_tensor("q", q, rank=3, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    device = q.device
    _common.check_kernel_device("q", device)
    check_tensor("k_cache", k_cache, rank=4, dtypes=(q.dtype,), device=device, like="q")
    check_tensor("v_cache", v_cache, rank=4, dtypes=(q.dtype,), device=device, like="q")
    B, Hq, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    check_shape("k_cache", k_cache, (B, Hkv, C, D), "[B, Hkv, C, D]")
    check_shape("v_cache", v_cache, (B, Hkv, C, D), "[B, Hkv, C, D] like k_cache")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the query head count Hq={Hq} (q) must be a positive multiple of Hkv={Hkv} (k_cache)")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_dim_contiguous(name, x)
    check_tensor("lengths", lengths, rank=2, dtypes=(torch.int32,), device=device, like="q")
    check_shape("lengths", lengths, (B, Hkv), "[B, Hkv]")
    for name, x, dtype in (("modality", modality, torch.uint8), ("token_mass", token_mass, torch.float32),
                           ("multiplicity", multiplicity, torch.float32)):
        if x is not None:
            check_tensor(name, x, rank=3, dtypes=(dtype,), device=device, like="q")
            check_shape(name, x, (B, Hkv, C), "[B, Hkv, C]")
    scale = _common.check_scale(scale, D)
    if check_lengths and lengths.numel() and not _common.is_capturing(device):
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > C:
            raise ValueError(f"lengths must lie in [0, C={C}] (the capacity of k_cache), got min {lo}, max {hi}")
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, C, device)
    elif not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")

    G = Hq // Hkv
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=device)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=device)
    mass = torch.empty((B, Hq, NUM_MODALITIES), dtype=torch.float32, device=device) if modality is not None else None
    if B == 0 or Hq == 0:
        return DecodeAttentionOutput(out, lse, mass)

    BLOCK_D = max(16, next_pow2(D))
    BLOCK_G = max(16, next_pow2(G))
    o_part = torch.empty((B * Hq * num_splits, BLOCK_D), dtype=torch.float32, device=device)
    lse_part = torch.empty((B * Hq * num_splits,), dtype=torch.float32, device=device)
    mass_part = torch.empty((B * Hq * num_splits, NUM_MODALITIES), dtype=torch.float32, device=device) \
        if modality is not None else lse_part
    logits = torch.empty((B * Hq, C), dtype=torch.float32, device=device) if token_mass is not None else lse_part
    mod_arg = modality if modality is not None else lengths
    mod_strides = modality.stride() if modality is not None else (0, 0, 0)
    mult_arg = multiplicity if multiplicity is not None else lengths
    mult_strides = multiplicity.stride() if multiplicity is not None else (0, 0, 0)
    flags = dict(
        NUM_MOD=NUM_MODALITIES, HAS_MODALITY=modality is not None, GROUP_SIZE=G, BLOCK_G=BLOCK_G,
    )

    qs, ks, vs, ls = q.stride(), k_cache.stride(), v_cache.stride(), lengths.stride()  # one call each: host time
    _split_kernel[(B * Hkv, num_splits)](
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, lengths_ptr=lengths, modality_ptr=mod_arg,
        multiplicity_ptr=mult_arg, logits_ptr=logits,
        o_part_ptr=o_part, lse_part_ptr=lse_part, mass_part_ptr=mass_part,
        C=C, Hkv=Hkv, qk_scale=float(scale) * _LOG2E,
        stride_qb=qs[0], stride_qh=qs[1],
        stride_kb=ks[0], stride_kh=ks[1], stride_kt=ks[2],
        stride_vb=vs[0], stride_vh=vs[1], stride_vt=vs[2],
        stride_lb=ls[0], stride_lh=ls[1],
        stride_mb=mod_strides[0], stride_mh=mod_strides[1], stride_mt=mod_strides[2],
        stride_cb=mult_strides[0], stride_ch=mult_strides[1], stride_ct=mult_strides[2],
        HEAD_DIM=D, BLOCK_D=BLOCK_D, HAS_TOKEN_MASS=token_mass is not None,
        HAS_MULTIPLICITY=multiplicity is not None,
        UPCAST=tuning.INTERPRET, DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        **flags,
    )
    _decode_reduce_kernel[(B * Hkv,)](
        o_part, lse_part, mass_part, out, lse, mass if mass is not None else lse,
        num_splits,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=next_pow2(num_splits), **flags,
    )
    if token_mass is not None and C > 0:
        _mass_kernel[lambda meta: (B * Hkv, triton.cdiv(C, meta["BLOCK_T"]))](
            logits_ptr=logits, lse_ptr=lse, lengths_ptr=lengths, token_mass_ptr=token_mass,
            C=C, Hkv=Hkv,
            stride_lb=ls[0], stride_lh=ls[1],
            stride_tb=token_mass.stride(0), stride_th=token_mass.stride(1), stride_tt=token_mass.stride(2),
            GROUP_SIZE=G, BLOCK_G=BLOCK_G,
        )
    return DecodeAttentionOutput(out, lse, mass)
