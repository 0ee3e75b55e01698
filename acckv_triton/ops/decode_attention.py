"""Fused split-K GQA decode attention that also measures where the attention mass goes.

For one new query token per sequence it computes softmax attention over a ragged KV cache and, in the same pass
that reads K/V, the mass each cached token receives (summed over the query heads of its GQA group) and the mass
each modality receives (per query head). The spec is :func:`acckv_triton.reference.decode_attention`.

Kernels and grids (B sequences, Hkv kv heads, G = Hq / Hkv, capacity C, S splits):
    ``_decode_split_kernel``  grid (B*Hkv, S). One program owns a GQA group and one split of that (b, h)'s valid
        tokens. The G query heads share each K/V tile, padded to BLOCK_G >= 16 rows for ``tl.dot``, so a tile is
        read once per group. It keeps an online softmax and writes partials: o, lse and per-modality mass, each
        normalised within the split. With token-mass accumulation it also writes the log2 logits relative to
        their tile's max, ``[B*Hq, C]`` in 16 bits for a 16-bit cache (float32 for a float32 one), and the tile
        maxima (scratch sized by capacity).
    ``_decode_reduce_kernel`` grid (B*Hkv, 1 + C / BLOCK_T) with token mass, else (B*Hkv, 1). Program 0 of a row
        merges the S partials exactly by their lse and writes out, lse and modality mass. With token-mass
        accumulation the other programs each take BLOCK_T stored tokens: they recompute the row's final lse from
        the S partials (G·S floats), turn the stored logits (plus their tile max) into probabilities and add
        their group sum into ``token_mass`` in place. Each token belongs to exactly one program, so there are no
        atomics and no races; normalisation and reduce share one launch, so a call is two launches.

Bytes moved per (b, kv head) of length L (D = head dim, e = element size): 2·L·D·e for K and V, plus L bytes of
modality ids, plus 2·L·G·2 + 8·L bytes for token-mass accumulation with a 16-bit cache (relative logits written
and read back, mass read and written; 2·L·G·4 with a float32 cache). The split count depends on B·Hkv, the SM
count and the capacity, never on device-side lengths, so a call performs no host synchronisation (with
``check_lengths=False``) and can be captured in a CUDA graph.
:class:`DecodeAttentionPlan` resolves all of that once per (cache, flags) and runs with no allocation.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .. import tuning
from . import _common
from ._common import check_last_dim_contiguous, check_shape, check_tensor, dtype_name, next_pow2
from ..modality import NUM_MODALITIES
from ..reference import DecodeAttentionOutput

__all__ = ["DecodeAttentionOutput", "DecodeAttentionPlan", "decode_attention"]

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["C", "n_anchor"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, lengths_ptr, modality_ptr, multiplicity_ptr, logits_ptr, anchor_ptr, tile_ptr,
    o_part_ptr, lse_part_ptr, mass_part_ptr,
    C, Hkv, qk_scale, n_anchor,
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

    if HAS_TOKEN_MASS:
        tl.store(tile_ptr, BLOCK_N)  # the tile the anchors index (the same value from every program)
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
        m_tile = tl.max(s, axis=1)  # finite: every tile holds a valid token
        if HAS_TOKEN_MASS:  # the logits relative to their tile's max (<= 0: compact in 16 bits) and that max
            tl.store(logits_ptr + row[:, None] * C + offs_n[None, :],
                     (s - m_tile[:, None]).to(logits_ptr.dtype.element_ty), mask=g_mask[:, None] & n_mask[None, :])
            tl.store(anchor_ptr + row * n_anchor + n0 // BLOCK_N, m_tile, mask=g_mask)
        m_new = tl.maximum(m_i, m_tile)
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


@triton.jit(do_not_specialize=["C", "num_splits", "n_anchor"])
def _decode_reduce_kernel(
    o_part_ptr, lse_part_ptr, mass_part_ptr,
    out_ptr, lse_ptr, mass_ptr,
    logits_ptr, anchor_ptr, tile_ptr, lengths_ptr, token_mass_ptr,
    num_splits, C, Hkv, n_anchor, mass_decay,
    stride_lb, stride_lh,
    stride_tb, stride_th, stride_tt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_MOD: tl.constexpr, HAS_MODALITY: tl.constexpr, HAS_TOKEN_MASS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    g_mask = offs_g < GROUP_SIZE
    row = pid_bh * GROUP_SIZE + offs_g  # query-head row in [B*Hq]

    # Every program of the row recomputes the final log2-lse from the S partials (G * S floats): the same
    # arithmetic in each, so the token-mass tiles and the output agree exactly.
    lse_parts = tl.load(
        lse_part_ptr + row[:, None] * num_splits + offs_s[None, :],
        mask=g_mask[:, None] & (offs_s[None, :] < num_splits), other=float("-inf"),
    )
    top = tl.max(lse_parts, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)  # an empty row: every weight becomes 0
    w = tl.exp2(lse_parts - top[:, None])
    w_sum = tl.sum(w, axis=1)
    nonempty = w_sum > 0.0
    w_safe = tl.where(nonempty, w_sum, 1.0)
    lse2 = top + tl.log2(w_safe)  # log2 domain; 0 for an empty row, whose tokens are all masked anyway

    if tile == 0:  # the reduce: out, lse and per-modality mass from the S partials
        offs_d = tl.arange(0, BLOCK_D)
        offs_m = tl.arange(0, NUM_MOD)
        w = w / w_safe[:, None]
        out = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        mass = tl.zeros([BLOCK_G, NUM_MOD], tl.float32)
        for s in range(num_splits):
            w_s = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), axis=1)[:, None]
            part_row = row * num_splits + s
            o_s = tl.load(o_part_ptr + part_row[:, None] * BLOCK_D + offs_d[None, :], mask=g_mask[:, None],
                          other=0.0)
            out += w_s * o_s
            if HAS_MODALITY:
                m_s = tl.load(mass_part_ptr + part_row[:, None] * NUM_MOD + offs_m[None, :], mask=g_mask[:, None],
                              other=0.0)
                mass += w_s * m_s
        tl.store(lse_ptr + row, tl.where(nonempty, lse2 / 1.4426950408889634, float("-inf")), mask=g_mask)
        tl.store(
            out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],  # out is a contiguous [B*Hq, D]
            out.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
        )
        if HAS_MODALITY:
            tl.store(mass_ptr + row[:, None] * NUM_MOD + offs_m[None, :], mass, mask=g_mask[:, None])
    if HAS_TOKEN_MASS:
        if tile > 0:  # token mass of one tile of BLOCK_T stored tokens: exact probabilities from the logits
            b = pid_bh // Hkv
            h = pid_bh % Hkv
            length = tl.load(lengths_ptr + b * stride_lb + h * stride_lh)
            length = tl.minimum(tl.maximum(length, 0), C)
            offs_t = (tile - 1) * BLOCK_T + tl.arange(0, BLOCK_T)
            t_mask = offs_t < length
            mask = g_mask[:, None] & t_mask[None, :]
            tile_n = tl.load(tile_ptr)
            s = tl.load(logits_ptr + row[:, None] * C + offs_t[None, :], mask=mask, other=float("-inf"))
            anchor = tl.load(anchor_ptr + row[:, None] * n_anchor + (offs_t // tile_n)[None, :], mask=mask, other=0.0)
            p = tl.where(mask, tl.exp2(s.to(tl.float32) + anchor - lse2[:, None]), 0.0)
            tm_ptrs = token_mass_ptr + b * stride_tb + h * stride_th + offs_t * stride_tt
            tm = tl.load(tm_ptrs, mask=t_mask, other=0.0)
            tl.store(tm_ptrs, tm * mass_decay + tl.sum(p, axis=0), mask=t_mask)


_split_kernel = tuning.TunedKernel(
    "decode_attention",
    _decode_split_kernel,
    tuning.CONFIG_SPACES["decode_attention"],
    key=["HEAD_DIM", "GROUP_SIZE", "HAS_MODALITY", "HAS_TOKEN_MASS"],
    dtype_arg="k_ptr",
)
_mass_kernel = tuning.TunedKernel(  # the reduce launch; its tile is the token-mass pass's BLOCK_T
    "decode_token_mass",
    _decode_reduce_kernel,
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


_Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_plan_args(k_cache, v_cache, lengths, *, num_q_heads, scale=None, modality=None, token_mass=None,
                    multiplicity=None, decay: float = 1.0, kernel_device: bool = True) -> tuple[float, float]:
    """The checks :class:`DecodeAttentionPlan` runs on what it binds (host only: no value is read; ``lengths`` is
    clamped on the device). Returns ``(scale, decay)``, the scale ``D ** -0.5`` for None. ``kernel_device=False``
    accepts any device (the torch twin, :class:`acckv_triton.torch_ops.TorchDecodePlan`)."""
    device = _common.check_leading("k_cache", k_cache, dtypes=_Q_DTYPES, kernel_device=kernel_device)
    B, Hkv, C, D = k_cache.shape
    check_tensor("v_cache", v_cache, rank=4, dtypes=(k_cache.dtype,), device=device, like="k_cache")
    check_shape("v_cache", v_cache, (B, Hkv, C, D), "[B, Hkv, C, D] like k_cache")
    if not isinstance(num_q_heads, int) or isinstance(num_q_heads, bool):
        raise TypeError(f"num_q_heads must be an int, got {type(num_q_heads).__name__}")
    if Hkv == 0 or num_q_heads <= 0 or num_q_heads % Hkv != 0:
        raise ValueError(f"the query head count Hq={num_q_heads} (q) must be a positive multiple of Hkv={Hkv} "
                         "(k_cache)")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_dim_contiguous(name, x)
    check_tensor("lengths", lengths, rank=2, dtypes=(torch.int32,), device=device, like="k_cache")
    check_shape("lengths", lengths, (B, Hkv), "[B, Hkv]")
    for name, x, dtype in (("modality", modality, torch.uint8), ("token_mass", token_mass, torch.float32),
                           ("multiplicity", multiplicity, torch.float32)):
        if x is not None:
            check_tensor(name, x, rank=3, dtypes=(dtype,), device=device, like="k_cache")
            check_shape(name, x, (B, Hkv, C), "[B, Hkv, C]")
    if token_mass is not None:  # written at every run: no element twice, nothing the run reads
        _common.check_not_self_overlapping("token_mass", token_mass)
        span = _common.memory_span(token_mass)
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("lengths", lengths), ("modality", modality),
                        ("multiplicity", multiplicity)):
            if x is not None and _common.spans_overlap(span, _common.memory_span(x)):
                raise ValueError(f"token_mass must not share memory with {name} (token_mass is written)")
    return _common.check_scale(scale, D), _common.check_decay(decay)


def check_query(q, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """A plan's check of the query at every run, host only (no torch op, no sync): ``q`` is a ``[B, Hq, D]`` tensor
    of the plan's dtype and device with a contiguous last dim, ``shape`` the plan's ``(B, Hq, Hkv, C, D)``."""
    B, Hq, _, _, D = shape
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.shape != (B, Hq, D) or q.dtype != dtype or q.device != device or q.stride(-1) != 1:
        raise ValueError(f"q must be a [B, Hq, D] = {(B, Hq, D)} {dtype_name(dtype)} tensor on {device} with a "
                         f"contiguous last dim, got {tuple(q.shape)} {dtype_name(q.dtype)} on {q.device}, strides "
                         f"{q.stride()}")


class DecodeAttentionPlan:
    """One decode-attention call resolved once, then run every step (the plan/run split of FlashInfer's wrappers).

    The plan binds the cache tensors and fixes everything that depends only on shapes: the split count, the
    launch configs (looked up once in the tuned tables), the strides, the scratch buffers and the outputs.
    :meth:`run` then launches two kernels with no allocation, no host synchronisation and no table lookup, so a
    sequence of runs can be captured in a CUDA graph. The cache tensors must keep their storage (a compaction in
    place is fine; a reallocation needs a new plan).

    Args:
        k_cache, v_cache: ``[B, Hkv, C, D]`` float16, bfloat16 or float32, last dim contiguous (C: the capacity).
        lengths: ``[B, Hkv]`` int32, read on the device at every run (clamped to ``[0, C]``; never checked here).
        num_q_heads: Hq, a multiple of Hkv.
        scale: softmax scale, default ``D ** -0.5``.
        modality: optional ``[B, Hkv, C]`` uint8 ids, required by ``modality_mass``.
        token_mass: optional ``[B, Hkv, C]`` float32, accumulated in place at every run (see
            :func:`decode_attention`).
        multiplicity: optional ``[B, Hkv, C]`` float32 > 0 (proportional attention).
        decay: factor in (0, 1] on the accumulated token mass at every run (see :func:`decode_attention`).
        modality_mass: also return the per-modality mass (default: whenever ``modality`` is given).
        num_splits: split-K factor; default :func:`default_num_splits`.

    Every :meth:`run` writes the same output buffers (``out [B, Hq, D]``, ``lse [B, Hq]``, ``modality_mass``):
    read or copy them before the next run.
    """

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *, num_q_heads: int,
                 scale: float | None = None, modality: torch.Tensor | None = None,
                 token_mass: torch.Tensor | None = None, multiplicity: torch.Tensor | None = None,
                 modality_mass: bool | None = None, num_splits: int | None = None, decay: float = 1.0):
        self.scale, self.decay = check_plan_args(k_cache, v_cache, lengths, num_q_heads=num_q_heads, scale=scale,
                                                 modality=modality, token_mass=token_mass, multiplicity=multiplicity,
                                                 decay=decay)
        device = k_cache.device
        B, Hkv, C, D = k_cache.shape
        if modality_mass is None:
            modality_mass = modality is not None
        if modality_mass and modality is None:
            raise ValueError("modality_mass=True needs modality ids (modality=[B, Hkv, C] uint8)")
        if num_splits is None:
            num_splits = default_num_splits(B, Hkv, C, device)
        elif isinstance(num_splits, bool) or not (isinstance(num_splits, int) and num_splits >= 1):
            raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
        G = num_q_heads // Hkv
        self.shape = (B, num_q_heads, Hkv, C, D)
        self.dtype, self.device, self.num_splits = k_cache.dtype, device, num_splits
        self.out = torch.empty((B, num_q_heads, D), dtype=k_cache.dtype, device=device)
        self.lse = torch.empty((B, num_q_heads), dtype=torch.float32, device=device)
        self.modality_mass = torch.empty((B, num_q_heads, NUM_MODALITIES), dtype=torch.float32, device=device) \
            if modality_mass else None
        self._empty = B == 0 or num_q_heads == 0
        if self._empty:
            return

        BLOCK_D = max(16, next_pow2(D))
        BLOCK_G = max(16, next_pow2(G))
        rows = B * num_q_heads * num_splits
        o_part = torch.empty((rows, BLOCK_D), dtype=torch.float32, device=device)
        lse_part = torch.empty((rows,), dtype=torch.float32, device=device)
        mass_part = torch.empty((rows, NUM_MODALITIES), dtype=torch.float32, device=device) \
            if modality_mass else lse_part
        has_mass = token_mass is not None and C > 0
        # token-mass scratch: each logit relative to its K/V tile's max, in 16 bits for a 16-bit cache (the reduce
        # reads them back: half the bytes of float32, and exact to about 1e-3 relative where the mass is), the
        # tile maxima (one float32 per tile of >= 16 tokens) and the tile size the split launch ran with
        logit_dtype = torch.float32 if k_cache.dtype == torch.float32 else torch.float16
        n_anchor = triton.cdiv(C, 16)
        logits = torch.empty((B * num_q_heads, C), dtype=logit_dtype, device=device) if has_mass else lse_part
        anchor = torch.empty((B * num_q_heads, n_anchor), dtype=torch.float32, device=device) if has_mass \
            else lse_part
        tile = torch.empty((1,), dtype=torch.int32, device=device) if has_mass else lengths
        flags = dict(NUM_MOD=NUM_MODALITIES, HAS_MODALITY=bool(modality_mass), GROUP_SIZE=G, BLOCK_G=BLOCK_G)
        zero3 = (0, 0, 0)
        ks, vs, ls = k_cache.stride(), v_cache.stride(), lengths.stride()
        ms = modality.stride() if modality_mass else zero3
        cs = multiplicity.stride() if multiplicity is not None else zero3
        ts = token_mass.stride() if has_mass else zero3
        # Everything but q goes into the launch arguments now; run() adds q and its two strides.
        self._split_args = dict(
            k_ptr=k_cache, v_ptr=v_cache, lengths_ptr=lengths,
            modality_ptr=modality if modality_mass else lengths,
            multiplicity_ptr=multiplicity if multiplicity is not None else lengths, logits_ptr=logits,
            anchor_ptr=anchor, tile_ptr=tile,
            o_part_ptr=o_part, lse_part_ptr=lse_part, mass_part_ptr=mass_part,
            C=C, Hkv=Hkv, qk_scale=self.scale * _LOG2E, n_anchor=n_anchor,
            stride_kb=ks[0], stride_kh=ks[1], stride_kt=ks[2],
            stride_vb=vs[0], stride_vh=vs[1], stride_vt=vs[2],
            stride_lb=ls[0], stride_lh=ls[1],
            stride_mb=ms[0], stride_mh=ms[1], stride_mt=ms[2],
            stride_cb=cs[0], stride_ch=cs[1], stride_ct=cs[2],
            HEAD_DIM=D, BLOCK_D=BLOCK_D, HAS_TOKEN_MASS=has_mass, HAS_MULTIPLICITY=multiplicity is not None,
            UPCAST=tuning.INTERPRET, DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else None, **flags,
        )
        self._reduce_args = dict(
            o_part_ptr=o_part, lse_part_ptr=lse_part, mass_part_ptr=mass_part,
            out_ptr=self.out, lse_ptr=self.lse,
            mass_ptr=self.modality_mass if modality_mass else self.lse,
            logits_ptr=logits, anchor_ptr=anchor, tile_ptr=tile, lengths_ptr=lengths,
            token_mass_ptr=token_mass if has_mass else self.lse,
            num_splits=num_splits, C=C, Hkv=Hkv, n_anchor=n_anchor, mass_decay=self.decay,
            stride_lb=ls[0], stride_lh=ls[1], stride_tb=ts[0], stride_th=ts[1], stride_tt=ts[2],
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=next_pow2(num_splits), HAS_TOKEN_MASS=has_mass, **flags,
        )
        self._split = _split_kernel.bind((B * Hkv, num_splits), **self._split_args)
        grid = (lambda meta: (B * Hkv, 1 + triton.cdiv(C, meta["BLOCK_T"]))) if has_mass else (B * Hkv, 1)
        self._reduce = _mass_kernel.bind(grid, **self._reduce_args)

    def run(self, q: torch.Tensor, *, check: bool = True) -> DecodeAttentionOutput:
        """Attention of ``q [B, Hq, D]`` (the plan's dtype and device, last dim contiguous) over the bound cache.

        ``check=False`` skips the host check of ``q`` (:func:`check_query`) for a caller that ran it already (the
        cache's decode step checks q before it stores the token).

        Returns ``DecodeAttentionOutput(out, lse, modality_mass)``: the plan's own buffers, rewritten by every run.
        """
        if check:
            check_query(q, self.shape, self.dtype, self.device)
        if not self._empty:
            qs = q.stride()
            self._split(q_ptr=q, stride_qb=qs[0], stride_qh=qs[1], **self._split_args)
            self._reduce(**self._reduce_args)
        return DecodeAttentionOutput(self.out, self.lse, self.modality_mass)


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
    decay: float = 1.0,
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
            ``token_mass[b, h, t] = decay * token_mass[b, h, t] + sum_g p[b, h*G + g, t]`` for ``t < lengths[b, h]``;
            other entries untouched.
        multiplicity: optional ``[B, Hkv, C]`` float32 > 0, how many original tokens each slot stands for (merged
            slots hold several): slot t weighs ``multiplicity[t]`` in the softmax, ``p_t ∝ n_t · exp(s_t)``
            (proportional attention; all ones is plain attention).
        num_splits: split-K factor; default :func:`default_num_splits`.
        check_lengths: verify on the host (one sync) ``0 <= lengths <= C`` and, at every stored slot, modality ids
            below ``NUM_MODALITIES`` and multiplicities finite and > 0. Callers that maintain the cache themselves,
            or capture CUDA graphs, pass False; the kernels clamp lengths to ``[0, C]`` regardless.
        decay: a float in (0, 1], the factor on the mass ``token_mass`` already holds (1: a plain sum, H2O's
            accumulation; below 1 an exponentially weighted sum in which the newest query weighs 1).

    Returns:
        ``DecodeAttentionOutput(out [B, Hq, D] in q's dtype, lse [B, Hq] float32 natural log,
        modality_mass [B, Hq, NUM_MODALITIES] float32 or None without modality)``. A (b, h) of length 0 gives
        out 0, lse -inf and mass 0.

    A loop that calls this every step with the same cache should build a :class:`DecodeAttentionPlan` once and
    call its ``run``: this function plans (allocates scratch, resolves configs) on every call.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, rank, shape, dtype, device or stride, a head
        count not divisible, or (with ``check_lengths``) lengths outside ``[0, C]``, a modality id out of range or a
        multiplicity <= 0 or not finite at a stored slot.
    """
    check_tensor("q", q, rank=3, dtypes=_Q_DTYPES)
    device = q.device
    _common.check_kernel_device("q", device)
    check_tensor("k_cache", k_cache, rank=4, dtypes=(q.dtype,), device=device, like="q")
    check_tensor("v_cache", v_cache, rank=4, dtypes=(q.dtype,), device=device, like="q")
    B, Hq, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    check_shape("k_cache", k_cache, (B, Hkv, C, D), "[B, Hkv, C, D]")
    check_last_dim_contiguous("q", q)
    plan = DecodeAttentionPlan(k_cache, v_cache, lengths, num_q_heads=Hq, scale=scale, modality=modality,
                               token_mass=token_mass, multiplicity=multiplicity, num_splits=num_splits, decay=decay)
    if check_lengths and lengths.numel() and not _common.is_capturing(device):
        _common.check_stored_values(lengths, C, modality, multiplicity)
    return plan.run(q)
