"""Launcher helpers shared by the kernel files: input validation, tile sizes and the split-count heuristic.

Validation behaves the same in every launcher: a non-tensor or a wrong dtype raises ``TypeError``; a wrong rank,
shape, device or stride raises ``ValueError``. Every message names the argument and states what was expected.
No kernels live here; each ``ops/<op>.py`` keeps its own story (docstring, kernels, launcher).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from .. import tuning
from ..modality import NUM_MODALITIES

MIN_TOKENS_PER_SPLIT = 256
"""A split-K program gets at least this many tokens (keys) of its row."""
MAX_SPLITS = 128
"""At most this many splits per (sequence, kv head)."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def carved_nbytes(spec: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> int:
    """The bytes :func:`carve` needs for ``spec`` (``(name, dtype, shape)`` entries, each 16-byte aligned)."""
    return sum(-(-math.prod(shape) * dtype.itemsize // 16) * 16 for _, dtype, shape in spec)


def carve(buf: torch.Tensor, spec: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Views of one byte buffer (``uint8``, at least :func:`carved_nbytes` long) as the ``(name, dtype, shape)``
    tensors of ``spec``, each starting on a 16-byte boundary: one allocation where there would be one per tensor."""
    out, off = {}, 0
    for name, dtype, shape in spec:
        nbytes = math.prod(shape) * dtype.itemsize
        out[name] = buf[off:off + nbytes].view(dtype).view(shape)
        off += -(-nbytes // 16) * 16
    return out


def check_tensor(
    name: str,
    x,
    *,
    rank: int | None = None,
    shape: Sequence[int] | None = None,
    what: str = "",
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    like: str = "",
) -> None:
    """Check that ``x`` is a tensor with the given rank / shape, one of ``dtypes``, on ``device``.

    ``what`` describes the shape (``"[B, Hkv, C]"``); ``like`` names the argument that fixed ``device``. Raises
    TypeError for a non-tensor or a wrong dtype, ValueError for a wrong rank, shape or device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if rank is not None and x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}{' ' + what if what else ''}, got shape {tuple(x.shape)}")
    if shape is not None:
        check_shape(name, x, shape, what)
    if dtypes is not None and x.dtype not in dtypes:
        expected = " or ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {expected}, got {dtype_name(x.dtype)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device}{' like ' + like if like else ''}, got {x.device}")


def check_shape(name: str, x: torch.Tensor, shape: Sequence[int], what: str) -> None:
    """Raise ValueError unless ``x.shape == shape``; ``what`` spells the expected layout (``"[B, Hkv, C, D]"``)."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {tuple(x.shape)}")


def check_last_dim_contiguous(name: str, x: torch.Tensor) -> None:
    """Raise ValueError unless the last dim of ``x`` has stride 1 (the kernels read rows as contiguous vectors)."""
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {x.stride()}")


def memory_span(x: torch.Tensor) -> tuple[int, int]:
    """The byte range [start, end) that x's elements can touch."""
    start = x.data_ptr()
    if x.numel() == 0:
        return start, start
    extent = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()) if size > 0)
    return start, start + (extent + 1) * x.element_size()


def spans_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two :func:`memory_span` ranges share a byte (an empty one shares none)."""
    return a[0] < a[1] and b[0] < b[1] and a[0] < b[1] and b[0] < a[1]


def check_not_self_overlapping(name: str, x: torch.Tensor) -> None:
    """Raise ValueError unless x, which a launch writes, has no two elements in the same memory. Conservative: an
    expand's stride 0, or a stride no larger than what the dims of smaller strides reach, is refused; a dense or
    sliced layout passes."""
    inner = 0  # the largest offset the dims with smaller strides reach
    for stride, size in sorted((abs(t), s) for s, t in zip(x.shape, x.stride()) if s > 1):
        if stride <= inner:
            raise ValueError(f"{name} must not overlap itself (it is written; an expand or another view whose "
                             f"elements share memory): got shape {tuple(x.shape)}, strides {tuple(x.stride())}")
        inner += (size - 1) * stride


def check_leading(name: str, x, *, dtypes: Sequence[torch.dtype], kernel_device: bool = True) -> torch.device:
    """Check the rank-4 tensor that fixes an op's device and dtype (:func:`check_tensor`) and, with
    ``kernel_device``, that the kernels run on its device (:func:`check_kernel_device`; the torch twins pass
    False). Returns the device."""
    check_tensor(name, x, rank=4, dtypes=dtypes)
    if kernel_device:
        check_kernel_device(name, x.device)
    return x.device


def host_range(x: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of a non-empty integer tensor, read back in one host sync (not one per value)."""
    lo, hi = torch.stack(torch.aminmax(x.long())).tolist()
    return int(lo), int(hi)


def check_kernel_device(name: str, device: torch.device) -> None:
    """Raise ValueError unless kernels can run on ``device``: CUDA, or anything that holds data under Triton's
    interpreter (a meta tensor has none to launch on)."""
    if device.type == "meta":
        raise ValueError(f"{name} must be on a CUDA device (or a CPU with TRITON_INTERPRET=1), got a meta tensor")
    if not tuning.INTERPRET and device.type != "cuda":
        raise ValueError(f"{name} must be on a CUDA device (or run with TRITON_INTERPRET=1), got {device}")


def _real(x) -> bool:
    """Whether ``x`` is a real number (numpy's scalars included; bools, numpy's bool_ and tensors are not)."""
    return type(x) in (float, int) or (isinstance(x, numbers.Real) and not isinstance(x, bool))  # fast path first:
    # a decode step checks its scale, and the ABC check alone costs ~0.4 µs


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` when None, else a finite real number, returned as a float (numpy's
    scalars accepted). TypeError for anything else (a bool, a tensor, a string), ValueError for a non-finite
    scale or a head dim below 1."""
    if head_dim < 1:
        raise ValueError(f"the head dim D (the last dim of q and k) must be >= 1, got {head_dim}")
    if scale is None:
        return head_dim**-0.5
    if not _real(scale):
        raise TypeError(f"scale must be a finite float (or None), got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    return float(scale)


def check_decay(decay) -> float:
    """A recency factor: a real number in (0, 1], returned as a float (numpy's scalars accepted); TypeError naming
    ``decay`` for anything else (a bool, a tensor, a string), ValueError outside (0, 1]."""
    if not _real(decay):
        raise TypeError(f"decay must be a float in (0, 1], got {type(decay).__name__} {decay!r}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be a float in (0, 1], got {decay!r}")
    return float(decay)


def decay_log2(decay) -> float:
    """``-log2(decay)`` of a checked recency factor: what a mass kernel adds to the log2-lse of a query per step of
    age, so that query weighs ``decay ** age`` (0.0 for decay 1)."""
    return 0.0 - math.log2(check_decay(decay))


def is_capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on ``device``'s current stream (no host sync allowed then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def num_splits(batch: int, num_kv_heads: int, length: int, device: torch.device, *,
               min_tokens: int = MIN_TOKENS_PER_SPLIT, max_splits: int = MAX_SPLITS) -> int:
    """Splits per (sequence, kv head) of a row of ``length`` tokens: enough programs for two waves over the SMs,
    at least ``min_tokens`` tokens each, at most ``max_splits``.

    Depends only on shapes and the device, never on device-side lengths, so choosing it needs no sync.
    """
    if length <= 0:
        return 1
    if device.type == "cuda" and not tuning.INTERPRET:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter runs programs one by one: few splits, but still more than one
    by_occupancy = math.ceil(target / max(1, batch * num_kv_heads))
    by_length = max(1, length // min_tokens)
    return max(1, min(by_occupancy, by_length, max_splits))


def check_stored_values(lengths: torch.Tensor, C: int, modality=None, multiplicity=None) -> None:
    """The value checks behind a launcher's ``check_lengths``, in one host sync: lengths in ``[0, C]``; at every
    stored slot a modality id below ``NUM_MODALITIES`` and a finite multiplicity > 0 (a bad one turns its row into
    NaN, or loses its mass, without an error)."""
    stored = torch.arange(C, device=lengths.device) < lengths.long()[..., None]
    lo, hi = lengths.min(), lengths.max()
    bad_mod = (stored & (modality >= NUM_MODALITIES)).any() if modality is not None else lo.new_zeros((), dtype=bool)
    bad_mult = (stored & ~(torch.isfinite(multiplicity) & (multiplicity > 0))).any() if multiplicity is not None \
        else lo.new_zeros((), dtype=bool)
    lo, hi, bad_mod, bad_mult = torch.stack([lo.long(), hi.long(), bad_mod.long(), bad_mult.long()]).tolist()
    if lo < 0 or hi > C:
        raise ValueError(f"lengths must lie in [0, C={C}] (the capacity of k_cache), got min {lo}, max {hi}")
    if bad_mod:
        raise ValueError(f"modality must hold ids in [0, {NUM_MODALITIES}) at every stored slot (t < lengths)")
    if bad_mult:
        raise ValueError("multiplicity must be finite and > 0 at every stored slot (t < lengths)")
