"""The decode step's append: one new token per (sequence, kv head) written at that row's own length, in one launch.

For each (b, h) it writes ``k_new`` / ``v_new`` into slot ``t = lengths[b, h]`` of the cache, the token's metadata
into the same slot (position from a device-side counter, modality / time / spatial given or defaulted, token mass
0, multiplicity 1), then advances ``lengths`` and the counter. Everything the host would otherwise do with a
dozen small ops (each a launch on a GPU) is one program per row; the slot comes from device memory, so the launch
needs no sync and replays correctly in a CUDA graph. The spec is :func:`acckv_triton.reference.append_token_`.

Grid (B*Hkv,). Bytes per row: 2·D·e for K/V read and written, about 30 bytes of metadata. A row already at
capacity C (or, from a caller's bad input, with a negative length) writes nothing, never outside its row, but still
advances (the cache grows its storage on the host before a row can fill).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import check_shape, check_tensor, next_pow2

__all__ = ["append_token_"]


@triton.jit(do_not_specialize=["C"])
def _append_token_kernel(
    k_ptr, v_ptr, lengths_ptr, k_new_ptr, v_new_ptr,
    position_ptr, next_position_ptr, modality_ptr, time_ptr, spatial_ptr, token_mass_ptr, multiplicity_ptr,
    modality_new_ptr, time_new_ptr, spatial_new_ptr,
    C, Hkv,
    s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_nb, s_nh, s_wb, s_wh,
    s_mnb, s_mnh, s_tnb, s_tnh, s_snb, s_snh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MODALITY: tl.constexpr, HAS_TIME: tl.constexpr, HAS_SPATIAL: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hkv
    h = pid % Hkv
    row = b * Hkv + h  # lengths, counter and the [B, Hkv, C] metadata are contiguous (the cache owns them)
    t = tl.load(lengths_ptr + row)
    pos = tl.load(next_position_ptr + row)
    if (t >= 0) & (t < C):  # never outside the row, whatever lengths holds (reading it would need a sync)
        t64 = t.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        kx = tl.load(k_new_ptr + b * s_nb + h * s_nh + offs_d, mask=d_mask)
        vx = tl.load(v_new_ptr + b * s_wb + h * s_wh + offs_d, mask=d_mask)
        tl.store(k_ptr + b * s_kb + h * s_kh + t64 * s_kt + offs_d, kx, mask=d_mask)
        tl.store(v_ptr + b * s_vb + h * s_vh + t64 * s_vt + offs_d, vx, mask=d_mask)
        slot = row * C + t64
        tl.store(position_ptr + slot, pos)
        if HAS_MODALITY:
            tl.store(modality_ptr + slot, tl.load(modality_new_ptr + b * s_mnb + h * s_mnh))
        else:
            tl.store(modality_ptr + slot, tl.full([], 0, tl.uint8))
        if HAS_TIME:
            tl.store(time_ptr + slot, tl.load(time_new_ptr + b * s_tnb + h * s_tnh))
        else:
            tl.store(time_ptr + slot, pos)
        if HAS_SPATIAL:
            hw = tl.load(spatial_new_ptr + b * s_snb + h * s_snh + tl.arange(0, 2))
        else:
            hw = tl.full([2], -1, tl.int32)
        tl.store(spatial_ptr + slot * 2 + tl.arange(0, 2), hw)
        tl.store(token_mass_ptr + slot, 0.0)
        tl.store(multiplicity_ptr + slot, 1.0)
    tl.store(lengths_ptr + row, t + 1)
    tl.store(next_position_ptr + row, pos + 1)


def append_token_(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, k_new: torch.Tensor,
                  v_new: torch.Tensor, *, position: torch.Tensor, next_position: torch.Tensor,
                  modality: torch.Tensor, time: torch.Tensor, spatial: torch.Tensor, token_mass: torch.Tensor,
                  multiplicity: torch.Tensor, modality_new: torch.Tensor | None = None,
                  time_new: torch.Tensor | None = None, spatial_new: torch.Tensor | None = None,
                  check: bool = True) -> None:
    """Write one token per (b, kv head) at ``lengths[b, h]`` and advance ``lengths`` and ``next_position``.

    The caller guarantees room (``0 <= lengths < C``; not checked, it would need a sync): a row already at capacity
    writes nothing but still advances, leaving ``lengths`` past C (the cache grows its storage on the host first); a
    row with a negative length writes nothing either (never before its row's memory).

    Args:
        k_cache, v_cache: ``[B, Hkv, C, D]``, last dim contiguous, updated in place.
        lengths: ``[B, Hkv]`` int32, contiguous; +1.
        k_new, v_new: ``[B, Hkv, 1, D]`` in the cache dtype, last dim contiguous.
        position, modality (uint8), time (int32), token_mass, multiplicity (float32): ``[B, Hkv, C]`` contiguous;
            spatial: ``[B, Hkv, C, 2]`` int32 contiguous. The new slot gets ``position = next_position``,
            ``modality = modality_new`` or 0 (text), ``time = time_new`` or the position, ``spatial =
            spatial_new`` or (-1, -1), ``token_mass = 0``, ``multiplicity = 1``.
        next_position: ``[B, Hkv, 1]`` int32 contiguous; +1.
        modality_new, time_new: optional ``[B, Hkv, 1]`` (uint8 / int32; strides may be 0, e.g. an expand).
        spatial_new: optional ``[B, Hkv, 1, 2]`` int32, last dim contiguous.
        check: validate every argument (about 15 µs of host time); the cache, which owns the buffers and checks
            the new token itself, passes False.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, shape, dtype, device or layout.
    """
    if check:  # before reading any shape: a non-tensor raises the TypeError naming it
        check_args(k_cache, v_cache, lengths, k_new, v_new, position, next_position, modality, time, spatial,
                   token_mass, multiplicity, modality_new, time_new, spatial_new)
    B, Hkv, C, D = k_cache.shape
    if B * Hkv == 0:
        return
    mod_new, time_new_, sp_new = (x if x is not None else lengths for x in (modality_new, time_new, spatial_new))
    zero = (0, 0)
    ks, vs, ns, ws = k_cache.stride(), v_cache.stride(), k_new.stride(), v_new.stride()
    ms = modality_new.stride()[:2] if modality_new is not None else zero
    ts = time_new.stride()[:2] if time_new is not None else zero
    ss = spatial_new.stride()[:2] if spatial_new is not None else zero
    _append_token_kernel[(B * Hkv,)](
        k_cache, v_cache, lengths, k_new, v_new,
        position, next_position, modality, time, spatial, token_mass, multiplicity,
        mod_new, time_new_, sp_new,
        C, Hkv,
        ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], ns[0], ns[1], ws[0], ws[1],
        ms[0], ms[1], ts[0], ts[1], ss[0], ss[1],
        HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)),
        HAS_MODALITY=modality_new is not None, HAS_TIME=time_new is not None, HAS_SPATIAL=spatial_new is not None,
        num_warps=1,
    )


def check_args(k_cache, v_cache, lengths, k_new, v_new, position, next_position, modality, time, spatial,
               token_mass, multiplicity, modality_new=None, time_new=None, spatial_new=None, *,
               kernel_device: bool = True) -> None:
    """Every check :func:`append_token_` runs with ``check=True`` (host only: types, shapes, dtypes, devices,
    layouts; no value is read). ``kernel_device=False`` accepts any device (the torch twin,
    :func:`acckv_triton.torch_ops.append_token_`, runs on a CPU without the interpreter)."""
    device = _common.check_leading("k_cache", k_cache, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                                   kernel_device=kernel_device)
    B, Hkv, C, D = k_cache.shape
    check_tensor("v_cache", v_cache, shape=(B, Hkv, C, D), what="[B, Hkv, C, D]", dtypes=(k_cache.dtype,),
                 device=device, like="k_cache")
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        check_tensor(name, x, shape=(B, Hkv, 1, D), what="[B, Hkv, 1, D]", dtypes=(k_cache.dtype,), device=device,
                     like="k_cache")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        _common.check_last_dim_contiguous(name, x)
    owned = (("lengths", lengths, (B, Hkv), torch.int32), ("next_position", next_position, (B, Hkv, 1), torch.int32),
             ("position", position, (B, Hkv, C), torch.int32), ("modality", modality, (B, Hkv, C), torch.uint8),
             ("time", time, (B, Hkv, C), torch.int32), ("spatial", spatial, (B, Hkv, C, 2), torch.int32),
             ("token_mass", token_mass, (B, Hkv, C), torch.float32),
             ("multiplicity", multiplicity, (B, Hkv, C), torch.float32))
    for name, x, shape, dtype in owned:
        check_tensor(name, x, shape=shape, what=str(list(shape)), dtypes=(dtype,), device=device, like="k_cache")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {x.stride()}")
    for name, x, shape, dtype in (("modality_new", modality_new, (B, Hkv, 1), torch.uint8),
                                  ("time_new", time_new, (B, Hkv, 1), torch.int32),
                                  ("spatial_new", spatial_new, (B, Hkv, 1, 2), torch.int32)):
        if x is not None:
            check_tensor(name, x, dtypes=(dtype,), device=device, like="k_cache")
            check_shape(name, x, shape, str(list(shape)))
            if name == "spatial_new":
                _common.check_last_dim_contiguous(name, x)
