"""Prefill observation-window scores: how much attention the last W prompt queries give each cached token.

For the window queries ``[B, Hq, W, D]`` against a layer's keys ``[B, Hkv, N, D]`` (window query i sits at position
N - W + i and sees keys ``key_start[b] <= t <= N - W + i``) it computes the SnapKV score of every token, the causal
softmax probability summed over the W queries and the G query heads of its GQA group, and the mass each modality
receives per query head. The N x N score matrix is never formed: each probability is recomputed from the row
logsumexp. The spec is :func:`acckv_triton.reference.window_scores`.

Kernels and grids (B sequences, Hkv kv heads, G = Hq / Hkv, S splits of the N keys; R = W·G window rows per group,
processed in blocks of BLOCK_R >= 16 rows so ``tl.dot`` applies):
    ``_window_lse_kernel``    grid (B*Hkv, S); only when ``lse`` is not given. One program owns a GQA group and
        one split of the unpadded keys; for each row block it runs an online max/sum over its K tiles and writes the
        split's partial logsumexp ``[B*Hq*W, S]``. The S partials are merged exactly by one ``torch.logsumexp``.
    ``_window_scores_kernel`` grid (B*Hkv, S). One program owns a GQA group and one split of all N keys. For each K
        tile it loops over the row blocks, recomputes ``p = exp(q·k·scale - lse)``, sums p over the rows and stores
        the tile's scores directly: each token belongs to one program, so no atomics. With modality ids it also
        accumulates the split's per-(query head, modality) mass, written as partials ``[B*Hq, S, M]`` and summed by
        torch afterwards (deterministic, no atomics).

Bytes moved per (b, kv head), e = element size: N·D·e of K per pass (twice without ``lse``), plus N bytes of
modality ids, 4·N bytes of scores, and the window queries R·D·e re-read per K tile (from cache). Extra memory is
O(B·Hq·W·S + B·Hq·S·M) with S <= 128 splits, independent of N beyond the output itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import tuning
from . import _common
from ._common import check_last_dim_contiguous, check_shape, check_tensor, next_pow2
from ..modality import NUM_MODALITIES
from ..reference import WindowScores

__all__ = ["WindowScores", "window_scores"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MIN_TOKENS_PER_SPLIT = _common.MIN_TOKENS_PER_SPLIT
_MAX_BLOCK_R = 64


@triton.jit(do_not_specialize=["N", "W"])
def _window_lse_kernel(
    q_ptr, k_ptr, key_start_ptr, lse_part_ptr,
    N, W, Hkv, qk_scale,
    stride_qb, stride_qh, stride_qw,
    stride_kb, stride_kh, stride_kt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_SIZE: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv

    key_start = 0
    if HAS_KEY_START:
        key_start = tl.minimum(tl.maximum(tl.load(key_start_ptr + b), 0), N)
    tiles_per_split = tl.cdiv(tl.cdiv(N - key_start, BLOCK_N), num_splits)
    start = key_start + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, N)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_base = q_ptr + b * stride_qb + h * GROUP_SIZE * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    num_rows = W * GROUP_SIZE
    for r0 in range(0, num_rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)  # row r is (head g = r // W, window query w = r % W)
        r_mask = offs_r < num_rows
        g = offs_r // W
        w = offs_r % W
        query_pos = N - W + w
        q = tl.load(
            q_base + g[:, None].to(tl.int64) * stride_qh + w[:, None].to(tl.int64) * stride_qw + offs_d[None, :],
            mask=r_mask[:, None] & d_mask[None, :], other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            k = tl.load(
                k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                mask=n_mask[:, None] & d_mask[None, :], other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2-domain logits
            visible = r_mask[:, None] & n_mask[None, :] & (offs_n[None, :] <= query_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            m_i = m_new
        seen = l_i > 0.0
        part = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        row = (pid_bh * GROUP_SIZE + g) * W + w  # window row in [B*Hq*W]
        tl.store(lse_part_ptr + row * num_splits + split, part, mask=r_mask)


@triton.jit(do_not_specialize=["N", "W"])
def _window_scores_kernel(
    q_ptr, k_ptr, lse_ptr, key_start_ptr, modality_ptr, scores_ptr, mass_part_ptr,
    N, W, Hkv, qk_scale,
    stride_qb, stride_qh, stride_qw,
    stride_kb, stride_kh, stride_kt,
    stride_lb, stride_lh, stride_lw,
    stride_mb, stride_mh, stride_mt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_MOD: tl.constexpr, HAS_MODALITY: tl.constexpr, HAS_KEY_START: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv

    key_start = 0
    if HAS_KEY_START:
        key_start = tl.minimum(tl.maximum(tl.load(key_start_ptr + b), 0), N)
    tiles_per_split = tl.cdiv(tl.cdiv(N, BLOCK_N), num_splits)  # all N keys: padding gets an explicit 0
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, N)

    offs_d = tl.arange(0, BLOCK_D)
    offs_g = tl.arange(0, BLOCK_G)
    offs_m = tl.arange(0, NUM_MOD)
    d_mask = offs_d < HEAD_DIM
    q_base = q_ptr + b * stride_qb + h * GROUP_SIZE * stride_qh
    lse_base = lse_ptr + b * stride_lb + h * GROUP_SIZE * stride_lh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    num_rows = W * GROUP_SIZE

    mass = tl.zeros([BLOCK_G, NUM_MOD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        key_ok = n_mask & (offs_n >= key_start)
        k = tl.load(
            k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :], other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        if HAS_MODALITY:
            mod = tl.load(modality_ptr + b * stride_mb + h * stride_mh + offs_n * stride_mt, mask=n_mask, other=0)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for r0 in range(0, num_rows, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)  # row r is (head g = r // W, window query w = r % W)
            r_mask = offs_r < num_rows
            g = offs_r // W
            w = offs_r % W
            query_pos = N - W + w
            q = tl.load(
                q_base + g[:, None].to(tl.int64) * stride_qh + w[:, None].to(tl.int64) * stride_qw
                + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
            lse2 = tl.load(
                lse_base + g.to(tl.int64) * stride_lh + w.to(tl.int64) * stride_lw, mask=r_mask,
                other=float("-inf"),
            ) * 1.4426950408889634
            row_ok = r_mask & (query_pos >= key_start) & (lse2 != float("-inf"))
            lse2 = tl.where(row_ok, lse2, 0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2-domain logits
            visible = row_ok[:, None] & key_ok[None, :] & (offs_n[None, :] <= query_pos[:, None])
            p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
            acc += tl.sum(p, axis=0)
            if HAS_MODALITY:
                head_of_row = g[:, None] == offs_g[None, :]  # [BLOCK_R, BLOCK_G]
                for mi in tl.static_range(NUM_MOD):
                    per_row = tl.sum(tl.where(mod[None, :] == mi, p, 0.0), axis=1)
                    per_head = tl.sum(tl.where(head_of_row, per_row[:, None], 0.0), axis=0)
                    mass += tl.where(offs_m[None, :] == mi, per_head[:, None], 0.0)
        tl.store(scores_ptr + pid_bh * N + offs_n, acc, mask=n_mask)  # scores is a fresh contiguous [B*Hkv, N]
    if HAS_MODALITY:
        part_row = (pid_bh * GROUP_SIZE + offs_g) * num_splits + split
        tl.store(
            mass_part_ptr + part_row[:, None] * NUM_MOD + offs_m[None, :], mass,
            mask=(offs_g < GROUP_SIZE)[:, None],
        )


_lse_kernel = tuning.TunedKernel(
    "window_scores_lse",
    _window_lse_kernel,
    tuning.CONFIG_SPACES["window_scores_lse"],
    key=["HEAD_DIM", "GROUP_SIZE", "BLOCK_R", "HAS_KEY_START"],
    dtype_arg="k_ptr",
)
_scores_kernel = tuning.TunedKernel(
    "window_scores",
    _window_scores_kernel,
    tuning.CONFIG_SPACES["window_scores"],
    key=["HEAD_DIM", "GROUP_SIZE", "BLOCK_R", "HAS_MODALITY", "HAS_KEY_START"],
    dtype_arg="k_ptr",
)


def _num_splits(batch: int, num_kv_heads: int, num_keys: int, device: torch.device) -> int:
    """Splits of N per (b, kv head): two waves over the SMs, >= 256 keys each, at most 128. Shapes only, no sync."""
    return _common.num_splits(batch, num_kv_heads, num_keys, device, min_tokens=_MIN_TOKENS_PER_SPLIT)


def window_scores(
    q_window: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    modality: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
    check_modality: bool = True,
) -> WindowScores:
    """Observation-window scores of every cached token (Step 0 of docs/algorithm.md), without forming N x N.

    Args:
        q_window: ``[B, Hq, W, D]`` float16, bfloat16 or float32, the last W prompt queries with RoPE applied, last
            dim contiguous. Window query i sits at position ``N - W + i``.
        k: ``[B, Hkv, N, D]`` in q_window's dtype, last dim contiguous, ``1 <= W <= N``. ``Hq % Hkv == 0`` and query
            head ``hq`` reads kv head ``hq // (Hq // Hkv)``.
        scale: softmax scale, default ``D ** -0.5``.
        modality: optional ``[B, Hkv, N]`` uint8 modality ids (< ``NUM_MODALITIES``).
        lse: optional ``[B, Hq, W]`` float32 natural-log logsumexp of each window row over the keys it sees (e.g.
            from the prefill attention); without it a first pass computes it.
        key_start: optional ``[B]`` int32 or int64, ``0 <= key_start <= N``: keys ``t < key_start[b]`` are left padding,
            excluded from every softmax and scored 0.
        check_modality: read ``modality`` back (one host sync) to check every id is below ``NUM_MODALITIES``; an
            id out of range would add its token's mass to no modality. False trusts the ids (timed loops).

    Returns:
        ``WindowScores(scores [B, Hkv, N] float32, modality_mass [B, Hq, NUM_MODALITIES] float32 or None)`` with
        ``scores[b, h, t] = sum_w sum_g softmax_t(scale * q[b, h*G+g, w] . k[b, h, t])`` over the keys each query
        sees, and ``modality_mass[b, hq, m]`` the same probabilities summed over w and the tokens of modality m.
        Window rows that see no key (inside the padding) contribute 0.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, rank, shape, dtype, device or stride, a head
        count not divisible, W outside ``[1, N]``, key_start outside ``[0, N]``, or (with ``check_modality``) a
        modality id outside ``[0, NUM_MODALITIES)``.
    """
    scale = check_args(q_window, k, scale=scale, modality=modality, lse=lse, key_start=key_start,
                       check_modality=check_modality)
    device = q_window.device
    B, Hq, W, D = q_window.shape
    Hkv, N = k.shape[1], k.shape[2]

    G = Hq // Hkv
    scores = torch.empty((B, Hkv, N), dtype=torch.float32, device=device)
    if B == 0:
        empty_mass = torch.zeros((0, Hq, NUM_MODALITIES), dtype=torch.float32, device=device)
        return WindowScores(scores, empty_mass if modality is not None else None)

    num_splits = _num_splits(B, Hkv, N, device)
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_R = min(_MAX_BLOCK_R, max(16, next_pow2(W * G)))
    ks_arg = key_start.to(torch.int32).contiguous() if key_start is not None else scores  # unread without it
    common = dict(
        q_ptr=q_window, k_ptr=k, key_start_ptr=ks_arg,
        N=N, W=W, Hkv=Hkv, qk_scale=float(scale) * _LOG2E,
        stride_qb=q_window.stride(0), stride_qh=q_window.stride(1), stride_qw=q_window.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2),
        HEAD_DIM=D, BLOCK_D=BLOCK_D, GROUP_SIZE=G, BLOCK_R=BLOCK_R, HAS_KEY_START=key_start is not None,
        UPCAST=tuning.INTERPRET, DOT_PRECISION="ieee" if q_window.dtype == torch.float32 else None,
    )

    if lse is None:
        lse_part = torch.empty((B, Hq, W, num_splits), dtype=torch.float32, device=device)
        _lse_kernel[(B * Hkv, num_splits)](lse_part_ptr=lse_part, **common)
        lse = torch.logsumexp(lse_part, dim=-1)  # exact merge; -inf where a row sees no key

    mass_part = torch.empty((B, Hq, num_splits, NUM_MODALITIES), dtype=torch.float32, device=device) \
        if modality is not None else scores
    mod_arg = modality if modality is not None else scores
    mod_strides = modality.stride() if modality is not None else (0, 0, 0)
    _scores_kernel[(B * Hkv, num_splits)](
        lse_ptr=lse, modality_ptr=mod_arg, scores_ptr=scores, mass_part_ptr=mass_part,
        stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_lw=lse.stride(2),
        stride_mb=mod_strides[0], stride_mh=mod_strides[1], stride_mt=mod_strides[2],
        BLOCK_G=next_pow2(G), NUM_MOD=NUM_MODALITIES, HAS_MODALITY=modality is not None,
        **common,
    )
    mass = mass_part.sum(dim=2) if modality is not None else None
    return WindowScores(scores, mass)


def check_args(q_window, k, *, scale=None, modality=None, lse=None, key_start=None,
               kernel_device: bool = True, check_modality: bool = True) -> float:
    """Every check :func:`window_scores` runs before it launches; returns the softmax scale (``D ** -0.5`` for None).

    Reads ``key_start`` (its min and max) and, with ``check_modality``, ``modality`` (its max) on the host, a sync
    each, unless a CUDA graph is being captured.
    ``kernel_device=False`` accepts any device (the torch twin, :func:`acckv_triton.torch_ops.window_scores`).
    """
    device = _common.check_leading("q_window", q_window, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                                   kernel_device=kernel_device)
    check_tensor("k", k, rank=4, dtypes=(q_window.dtype,), device=device, like="q_window")
    B, Hq, W, D = q_window.shape
    Hkv, N = k.shape[1], k.shape[2]
    check_shape("k", k, (B, Hkv, N, D), "[B, Hkv, N, D]")
    if Hkv == 0 or Hq == 0 or Hq % Hkv != 0:
        raise ValueError(f"the query head count Hq={Hq} (q_window) must be a positive multiple of Hkv={Hkv} (k)")
    if not 1 <= W <= N:
        raise ValueError(f"the window size W={W} (q_window dim 2) must satisfy 1 <= W <= N={N} (k dim 2)")
    for name, x in (("q_window", q_window), ("k", k)):
        check_last_dim_contiguous(name, x)
    if modality is not None:
        check_tensor("modality", modality, rank=3, dtypes=(torch.uint8,), device=device, like="q_window")
        check_shape("modality", modality, (B, Hkv, N), "[B, Hkv, N]")
        if check_modality and modality.numel() and not _common.is_capturing(device):  # unknown: its mass dropped
            hi = int(modality.max())
            if hi >= NUM_MODALITIES:
                raise ValueError(f"modality must hold ids in [0, {NUM_MODALITIES}), got max {hi}")
    if lse is not None:
        check_tensor("lse", lse, rank=3, dtypes=(torch.float32,), device=device, like="q_window")
        check_shape("lse", lse, (B, Hq, W), "[B, Hq, W]")
    if key_start is not None:
        check_tensor("key_start", key_start, rank=1, dtypes=(torch.int32, torch.int64), device=device,
                     like="q_window")
        check_shape("key_start", key_start, (B,), "[B]")
        if B and not _common.is_capturing(device):
            lo, hi = _common.host_range(key_start)
            if lo < 0 or hi > N:
                raise ValueError(f"key_start must lie in [0, N={N}] (k dim 2), got min {lo}, max {hi}")
    return _common.check_scale(scale, D)
