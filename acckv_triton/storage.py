"""One layer's KV storage: K/V, ragged lengths, token metadata and the upkeep of their memory.

A :class:`LayerKVCache` holds one transformer layer's keys and values for a batch, and for every stored token the
metadata the AccKV policy needs:

    k, v         [B, Hkv, capacity, D]  model dtype
    lengths      [B, Hkv]               int32, stored tokens per (sequence, kv head); rows become ragged after compress
    modality     [B, Hkv, capacity]     uint8 (:class:`acckv_triton.Modality`)
    time         [B, Hkv, capacity]     int32 temporal position (TMRoPE row; text: its 1-D position)
    spatial      [B, Hkv, capacity, 2]  int32 (h, w) of video / image tokens, -1 elsewhere
    position     [B, Hkv, capacity]     int32 original token position
    token_mass   [B, Hkv, capacity]     float32 accumulated attention mass (merges add it up)
    multiplicity [B, Hkv, capacity]     float32 original tokens a slot stands for (1, merges add it up)
    seen         int                    tokens seen per sequence (continuation position), >= every stored length

Memory:
    * ``append`` writes at ``lengths`` and advances them. When a row would overflow, every buffer is reallocated to
      ``max(needed, growth * capacity)`` rounded up to ``align`` tokens, so headroom grows geometrically and appends
      cost O(1) amortised. The first append (the prefill) allocates just what it needs, so prefill peaks at one
      layer's full KV on top of the layers already compressed.
    * ``append_token`` (the decode step's append) writes one token per row at its device-side length in one
      launch: no sync, no allocation, CUDA-graph safe.
    * ``compress(plan, capacity=...)`` applies a :class:`~acckv_triton.plan.CompactionPlan` through the compaction
      kernel, which carries the metadata (gathered: modality, time, spatial, position; summed over merges:
      token_mass and multiplicity). At the current capacity it compacts in place, so the storage keeps its
      addresses (what the decode plans bind); a smaller capacity compacts out of place into fresh buffers (one
      read and one write per kept row) and releases the prefill-size ones. Without ``capacity`` it shrinks to the
      kept tokens plus ``headroom`` when that is smaller.
    * ``nbytes()``, ``stored_nbytes()``, ``stored_tokens()`` and ``seen`` report what is held.

:class:`~acckv_triton.cache.BudgetedLayerCache` holds one at an AccKV budget. Data flows one way: cache -> storage
-> ops; nothing here knows the policy or transformers.
"""
from __future__ import annotations

import itertools
import math
import numbers

import numpy as np
import torch

from . import torch_ops
from .modality import NUM_MODALITIES, Modality
from .ops._common import carve, carved_nbytes, check_scale, host_range
from .ops.append_token import append_token_
from .ops.compact_kv import compact_kv, compact_kv_
from .ops.decode_attention import DecodeAttentionOutput, DecodeAttentionPlan, decode_attention
from .ops.decode_attention import check_query as check_decode_query
from .plan import CompactionPlan

__all__ = ["LayerKVCache"]

_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_METADATA = ("modality", "time", "spatial", "position", "token_mass", "multiplicity")


def _is_int(x) -> bool:
    """A Python int, not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def _check_meta_dtype(name: str, x: torch.Tensor, dtype: torch.dtype) -> None:
    """Metadata stored as integers (ids, times, positions, patch coordinates) must be given as integers, and mass as
    real numbers: a float time would be truncated, a bool read as 0/1. TypeError naming the argument."""
    if x.device.type == "meta":
        raise ValueError(f"{name} must hold data (on the cache's device or the CPU), got a meta tensor")
    ok = x.dtype != torch.bool and not x.dtype.is_complex and (dtype.is_floating_point or not x.dtype.is_floating_point)
    if not ok:
        raise TypeError(f"{name} must be {'a real' if dtype.is_floating_point else 'an integer'} tensor (stored as "
                        f"{dtype}), got {x.dtype}")


def _check_modality(x, *, on_device: bool) -> None:
    """Raise TypeError unless ``x`` holds integers, ValueError unless every one is a :class:`Modality` id in
    ``[0, NUM_MODALITIES)``. CPU tensors and sequences are read on the host (no device work); a device tensor is
    read with one host sync when ``on_device``, else trusted."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.dtype.is_floating_point or x.dtype.is_complex:
            raise TypeError(f"modality must hold integer Modality ids, got dtype {x.dtype}")
        if x.device.type == "meta":
            raise ValueError("modality must hold data (on the cache's device or the CPU), got a meta tensor")
        if x.device.type != "cpu":
            if on_device and bool(((x < 0) | (x >= NUM_MODALITIES)).any()):
                raise ValueError(f"modality must hold Modality ids in [0, {NUM_MODALITIES}), got values outside it")
            return
        values = x.numpy()  # host memory: nothing dispatched, nothing synchronised
    else:
        values = np.asarray(x)
        if values.dtype.kind not in "iu":
            raise TypeError(f"modality must hold integer Modality ids, got {type(x).__name__} of {values.dtype}")
    if values.size and (int(values.min()) < 0 or int(values.max()) >= NUM_MODALITIES):
        raise ValueError(f"modality must hold Modality ids in [0, {NUM_MODALITIES}), got values in "
                         f"[{int(values.min())}, {int(values.max())}]")


def _kernel_layout(x: torch.Tensor, name: str) -> bool:
    """Whether a tensor given to :meth:`LayerKVCache.append` can be the storage as it is (``borrow=True``): laid out
    as the kernels and the fused policy read the storage, with a unit stride along K/V's head dim and along the
    metadata's token dim, and spatial's (h, w) pairs viewable as one 64-bit word each."""
    if name == "spatial":
        try:
            x = x.view(torch.int64).squeeze(-1)
        except RuntimeError:  # pairs not adjacent, or not 8-byte aligned
            return False
    return x.stride(-1) == 1


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


_STORAGE_IDS = itertools.count(1)  # LayerKVCache storage ids (see LayerKVCache.binding)


class LayerKVCache:
    """One layer's compressed KV cache for a batch: ragged per (sequence, kv head), with per-token metadata.

    Storage is allocated lazily by the first :meth:`append`, which fixes B, Hkv, D, dtype and device.

    Args:
        headroom: free slots per row kept after :meth:`compress` for the next decode steps (default 64).
        growth: capacity factor when an append overflows (> 1; default 1.5).
        align: capacities are multiples of this many tokens (default 16).
        proportional: decode attention weighs each slot by its multiplicity, so a merged slot keeps the attention
            mass of the tokens it holds (AccKV's proportional attention); False attends to slots as plain tokens.
        backend: ``"triton"`` (the kernels; through Triton's interpreter without a GPU), ``"torch"`` (the
            vectorised ops of :mod:`acckv_triton.torch_ops`: fast on a CPU, where the interpreter dominates) or
            ``"auto"`` (the kernels for CUDA storage, the torch ops otherwise).
    """

    def __init__(self, *, headroom: int = 64, growth: float = 1.5, align: int = 16, proportional: bool = False,
                 backend: str = "triton"):
        for name, x, real in (("headroom", headroom, False), ("growth", growth, True), ("align", align, False)):
            if isinstance(x, bool) or not isinstance(x, (numbers.Real if real else numbers.Integral)):
                raise TypeError(f"{name} must be {'a real number' if real else 'an int'}, got {type(x).__name__}")
        if headroom < 0:
            raise ValueError(f"headroom must be an int >= 0, got {headroom!r}")
        if not (math.isfinite(growth) and growth > 1):
            raise ValueError(f"growth must be a finite float > 1, got {growth!r}")
        if align < 1:
            raise ValueError(f"align must be a positive int, got {align!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be 'triton', 'torch' or 'auto', got {type(backend).__name__}")
        if backend not in ("triton", "torch", "auto"):
            raise ValueError(f"backend must be 'triton', 'torch' or 'auto', got {backend!r}")
        if not isinstance(proportional, bool):
            raise TypeError(f"proportional must be a bool, got {type(proportional).__name__}")
        self.headroom, self.growth, self.align = int(headroom), float(growth), int(align)
        self.proportional = proportional
        self.backend = backend
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.modality: torch.Tensor | None = None
        self.time: torch.Tensor | None = None
        self.spatial: torch.Tensor | None = None
        self.position: torch.Tensor | None = None
        self.token_mass: torch.Tensor | None = None
        self.multiplicity: torch.Tensor | None = None
        self.seen = 0
        self._compressed = False  # a compaction ran: slots no longer hold the last tokens in order (crop_last)
        self._borrowed = False  # the storage views a caller's tensors (append(borrow=True)): never written in place
        self._min_length = 0  # host copies of min / max of lengths: appends and views need no sync
        self._max_length = 0
        self._plans: dict[tuple, object] = {}  # decode plans bound to the current storage
        self._storage_id: int | None = None  # unique in the process, new whenever the storage is replaced
        self._slot: torch.Tensor | None = None  # [B, Hkv, 1] int64: where the next decode token goes (append_token)
        self._next_position: torch.Tensor | None = None  # [B, Hkv, 1] int32: its position (= seen), on the device

    # ------------------------------------------------------------------------------------------------- reporting
    @property
    def initialized(self) -> bool:
        """True once the first append has allocated the storage."""
        return self.k is not None

    @property
    def capacity(self) -> int:
        """Allocated token slots per (sequence, kv head)."""
        return 0 if self.k is None else self.k.shape[2]

    @property
    def max_length(self) -> int:
        """The longest stored row (host-side, no sync)."""
        return self._max_length

    def stored_tokens(self) -> torch.Tensor:
        """``[B, Hkv]`` int32 tokens stored per (sequence, kv head) (a copy of ``lengths``)."""
        if self.lengths is None:
            raise ValueError("the cache is empty: append tokens first")
        return self.lengths.clone()

    def _buffers(self) -> list[torch.Tensor]:
        if self.k is None:
            return []
        return [self.k, self.v, self.lengths] + [getattr(self, name) for name in _METADATA]

    def nbytes(self) -> int:
        """Bytes allocated by the cache: K, V, lengths and metadata at full capacity."""
        return sum(x.numel() * x.element_size() for x in self._buffers())

    @property
    def bytes_per_token(self) -> int:
        """Bytes one stored token takes in one (sequence, kv head) row: K, V and its metadata."""
        if self.k is None:
            return 0
        return sum(x[0, 0, 0].numel() * x.element_size() for x in
                   [self.k, self.v] + [getattr(self, name) for name in _METADATA])

    def stored_nbytes(self) -> int:
        """Bytes the stored tokens need (sum of lengths times :attr:`bytes_per_token`; one host sync)."""
        return 0 if self.k is None else int(self.lengths.sum()) * self.bytes_per_token

    # --------------------------------------------------------------------------------------------------- storage
    def _allocate(self, B: int, Hkv: int, D: int, capacity: int, dtype: torch.dtype, device: torch.device) -> dict:
        shape = (B, Hkv, capacity)
        spec = [("k", dtype, shape + (D,)), ("v", dtype, shape + (D,)), ("modality", torch.uint8, shape),
                ("time", torch.int32, shape), ("spatial", torch.int32, shape + (2,)), ("position", torch.int32, shape),
                ("token_mass", torch.float32, shape), ("multiplicity", torch.float32, shape)]
        # one zeroed allocation carved into the buffers (one device operation, not eight): K/V zeroed so that
        # slots past a row's length stay finite, which the torch backend's masking needs
        out = carve(torch.zeros(carved_nbytes(spec), dtype=torch.uint8, device=device), spec)
        if not self.kernels_on(device):  # the fresh tail (see keeps_fresh_tail): no spatial position is (-1, -1)
            out["spatial"].fill_(-1)
        return out

    def _resize(self, capacity: int) -> None:
        """Move every buffer to a new capacity (>= max_length), keeping the stored tokens."""
        B, Hkv, _, D = self.k.shape
        fresh = self._allocate(B, Hkv, D, capacity, self.k.dtype, self.k.device)
        n = self._max_length
        for name, buf in fresh.items():
            buf[:, :, :n] = getattr(self, name)[:, :, :n]
        self._install(fresh)

    def _own(self) -> None:
        """Copy a borrowed storage (``append(borrow=True)``) into buffers of the cache's own before anything is
        written into it in place; nothing to do otherwise."""
        if self._borrowed:
            self._resize(self.capacity)

    def _install(self, fresh: dict) -> None:
        """Make ``fresh`` buffers the storage (the old ones are released) and drop the plans bound to the old."""
        for name, buf in fresh.items():
            setattr(self, name, buf)
        self._borrowed = False
        self._plans.clear()
        self._storage_id = next(_STORAGE_IDS)  # what a captured decode step binds: these buffers

    @property
    def keeps_fresh_tail(self) -> bool:
        """Whether every slot past a row's length holds a fresh token's modality (text), spatial (-1, -1) and token
        mass (0), and multiplicity 0: the torch backend keeps its storage so (allocation, compaction and
        :meth:`crop_last` restore it), so that its decode step writes only what a new token changes and takes
        ``log(multiplicity)`` as its attention bias. The kernels mask by the lengths and need no such tail."""
        return not self.uses_kernels

    def _reset_tail(self, width: int) -> None:
        """Restore the fresh tail (:attr:`keeps_fresh_tail`) between each row's length and ``width``."""
        past = torch.arange(width, device=self.k.device) >= self.lengths[..., None]  # [B, Hkv, width]
        for name, value in (("modality", 0), ("token_mass", 0.0), ("multiplicity", 0.0)):
            getattr(self, name)[:, :, :width].masked_fill_(past, value)
        self.spatial[:, :, :width].masked_fill_(past[..., None], -1)

    def _token_data(self, capacity_view: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The metadata as the compaction kernel takes it, over the first ``capacity_view`` slots."""
        w = capacity_view
        spatial_bits = self.spatial.view(torch.int64).squeeze(-1)  # (h, w) moves as one 64-bit word
        data = [self.modality[:, :, :w], self.time[:, :, :w], spatial_bits[:, :, :w], self.position[:, :, :w]]
        return data, [self.token_mass[:, :, :w], self.multiplicity[:, :, :w]]

    # --------------------------------------------------------------------------------------------------- append
    @staticmethod
    def _token_meta(x, name: str, default, dtype: torch.dtype, shape: tuple, device: torch.device) -> torch.Tensor:
        """Metadata given as ``[T]``, ``[B, T]`` or ``[B, Hkv, T]`` (plus trailing dims), as a ``shape`` view."""
        if x is None and not isinstance(default, torch.Tensor):  # a scalar default: a fill, no host-to-device copy
            return torch.full(shape, default, dtype=dtype, device=device)
        if isinstance(x, torch.Tensor):
            _check_meta_dtype(name, x, dtype)  # before the copy to the device (a meta tensor has nothing to copy)
        x = default if x is None else torch.as_tensor(x, device=device)
        _check_meta_dtype(name, x, dtype)
        extra = len(shape) - 3
        if x.dim() == 0:  # a scalar
            x = x.view((1,) * len(shape))
        elif x.dim() == 1 + extra:
            x = x.view((1, 1) + tuple(x.shape))
        elif x.dim() == 2 + extra:
            x = x.unsqueeze(1)
        if x.dim() != len(shape) or any(a not in (1, b) for a, b in zip(x.shape, shape)):
            what = "[T], [B, T] or [B, Hkv, T]" + (" with a trailing 2" if extra else "")
            raise ValueError(f"{name} must have shape {what} for B, Hkv, T = {shape[:3]}, got {tuple(x.shape)}")
        return x.to(dtype).expand(shape)

    def token_metadata(self, k: torch.Tensor, *, modality=None, time=None, spatial=None, position=None,
                       token_mass=None, check_modality: bool = True) -> dict[str, torch.Tensor]:
        """The metadata :meth:`append` would store with ``k [B, Hkv, T, D]``, checked and as ``[B, Hkv, T]`` views
        (``spatial`` ``[..., 2]``), defaults filled in; the cache is not changed. Raises as :meth:`append`."""
        if modality is not None:
            _check_modality(modality, on_device=check_modality)
        B, Hkv, T = k.shape[:3]
        device, shape = k.device, (B, Hkv, T)
        position = self._token_meta(position, "position", torch.arange(self.seen, self.seen + T, dtype=torch.int32,
                                                                       device=device), torch.int32, shape, device)
        return dict(
            modality=self._token_meta(modality, "modality", int(Modality.TEXT), torch.uint8, shape, device),
            time=self._token_meta(time, "time", position, torch.int32, shape, device),
            spatial=self._token_meta(spatial, "spatial", -1, torch.int32, shape + (2,), device),
            position=position,
            token_mass=self._token_meta(token_mass, "token_mass", 0.0, torch.float32, shape, device),
            multiplicity=torch.ones(shape, dtype=torch.float32, device=device),
        )

    def check_kv(self, k, v) -> None:
        """Raise TypeError / ValueError unless ``k`` and ``v`` are ``[B, Hkv, T, D]`` float16, bfloat16 or float32
        tensors of one shape, dtype and device, matching the storage's B, Hkv, D, dtype and device once there is
        one (what :meth:`append` stores)."""
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4 or x.dtype not in _KV_DTYPES:
                raise ValueError(f"{name} must be a [B, Hkv, T, D] float16, bfloat16 or float32 tensor, got "
                                 f"{tuple(x.shape)} {x.dtype}")
        if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
            raise ValueError(f"v must match k in shape, dtype and device, got {tuple(v.shape)} {v.dtype} {v.device}")
        B, Hkv, _, D = k.shape
        if self.k is not None and ((B, Hkv, D) != (self.k.shape[0], self.k.shape[1], self.k.shape[3])
                                   or k.dtype != self.k.dtype or k.device != self.k.device):
            raise ValueError(f"k must be [B, Hkv, T, D] = [{self.k.shape[0]}, {self.k.shape[1]}, T, {self.k.shape[3]}] "
                             f"{self.k.dtype} on {self.k.device} like the cache, got {tuple(k.shape)} {k.dtype} "
                             f"on {k.device}")

    def append(self, k: torch.Tensor, v: torch.Tensor, *, modality=None, time=None, spatial=None,
               position=None, token_mass=None, borrow: bool = False, check_modality: bool = True) -> None:
        """Store T new tokens per (sequence, kv head) at ``lengths`` and advance ``lengths`` and ``seen`` by T.

        Args:
            k, v: ``[B, Hkv, T, D]`` float16, bfloat16 or float32 (the first call fixes shape, dtype and device).
            modality: ids ``[T]``, ``[B, T]`` or ``[B, Hkv, T]``; default ``Modality.TEXT``.
            time: temporal positions, same shapes; default ``position``.
            spatial: ``(h, w)`` as ``[T, 2]``, ``[B, T, 2]`` or ``[B, Hkv, T, 2]``; default -1 (none).
            position: original positions, same shapes as modality; default ``seen + arange(T)``.
            token_mass: initial attention mass (e.g. prefill window scores), same shapes; default 0.
            check_modality: read the modality ids of a device tensor back to validate them (one host sync; ids on
                the CPU or in a sequence are always checked, for free). Pass False for ids valid by construction,
                as the transformers integration does; the kernels read an id out of range as text.

        Grows the capacity geometrically when a row would overflow; new tokens start with multiplicity 1.

        ``borrow=True`` into an empty cache on the kernel backend copies nothing: the storage views the given
        tensors (a tensor laid out otherwise than the kernels read the storage is copied, that one alone) until the
        next :meth:`compress`, which then moves it out of place into fresh storage whatever its capacity; a decode
        step or a decode plan before that copies the storage first (they add to the token mass in place). The
        caller compresses before anything else, as :class:`BudgetedLayerCache` does at the end of prefill. Nothing
        is written into the borrowed tensors. The torch backend (which compacts in place) copies, as without it.
        """
        self.check_kv(k, v)
        if k.requires_grad or v.requires_grad:  # the cache holds values, never an autograd graph (nor its activations)
            k, v = k.detach(), v.detach()
        B, Hkv, T, D = k.shape
        device = k.device
        # Every argument is checked before the cache changes: a rejected first append leaves it empty.
        meta = self.token_metadata(k, modality=modality, time=time, spatial=spatial, position=position,
                                   token_mass=token_mass, check_modality=check_modality)
        if self.k is None and borrow and self.kernels_on(device):  # (the torch ops compact in place: no borrowing)
            borrowed = dict(k=k, v=v, **meta)
            for name, x in borrowed.items():  # a tensor laid out otherwise is copied, that one alone
                if not _kernel_layout(x, name):
                    borrowed[name] = x.clone(memory_format=torch.contiguous_format)
            self._install(borrowed)
            self._borrowed = True
            self.lengths = torch.full((B, Hkv), T, dtype=torch.int32, device=device)
            self._slot = torch.zeros((B, Hkv, 1), dtype=torch.int64, device=device)
            self._next_position = torch.full((B, Hkv, 1), self.seen + T, dtype=torch.int32, device=device)
            self._min_length = self._max_length = T
            self.seen += T
            return
        if self.k is None:
            self._install(self._allocate(B, Hkv, D, _round_up(max(T, 1), self.align), k.dtype, device))
            self.lengths = torch.zeros((B, Hkv), dtype=torch.int32, device=device)
            self._slot = torch.zeros((B, Hkv, 1), dtype=torch.int64, device=device)
            self._next_position = torch.zeros((B, Hkv, 1), dtype=torch.int32, device=device)
        if T == 0:
            return
        needed = self._max_length + T
        if needed > self.capacity:
            self._resize(_round_up(max(needed, math.ceil(self.capacity * self.growth)), self.align))
        new = dict(k=k, v=v, **meta)
        if self._min_length == self._max_length:  # every row has the same length: a plain slice
            start = self._max_length
            for name, x in new.items():
                getattr(self, name)[:, :, start:start + T] = x
        else:  # ragged rows: each writes at its own length
            idx = self.lengths.long()[..., None] + torch.arange(T, device=device)  # [B, Hkv, T]
            for name, x in new.items():
                buf = getattr(self, name)
                index = idx.view((B, Hkv, T) + (1,) * (buf.dim() - 3)).expand(x.shape)
                buf.scatter_(2, index, x)
        self.lengths += T
        self._min_length += T
        self._max_length += T
        self.seen += T
        self._next_position.fill_(self.seen)

    def append_token(self, k: torch.Tensor, v: torch.Tensor, *, modality: torch.Tensor | None = None,
                     time: torch.Tensor | None = None, spatial: torch.Tensor | None = None) -> None:
        """Store one decode token per (sequence, kv head) at each row's own length: the decode step's append.

        Args:
            k, v: ``[B, Hkv, 1, D]`` in the cache's dtype and device.
            modality: optional ids ``[B, 1]`` or ``[B, Hkv, 1]`` uint8 (default ``Modality.TEXT``); ids on the CPU are
                checked like :meth:`append`'s, ids on a GPU trusted (checking would sync every step; the kernels read
                an id out of range as text).
            time: optional ``[B, 1]`` or ``[B, Hkv, 1]`` int32 (default: the position, ``seen``).
            spatial: optional ``[B, 1, 2]`` or ``[B, Hkv, 1, 2]`` int32 (default -1).

        One launch of :func:`acckv_triton.ops.append_token.append_token_` (the torch backend: its vectorised twin)
        writes through a device-side index (``lengths``), so it allocates nothing, never synchronises and can be
        captured in a CUDA graph; the position comes from a device-side counter too. Metadata in another dtype is
        cast first (a small allocation). Grows the storage only when a row is full (:meth:`append` semantics).
        """
        if self.k is None:
            raise ValueError("the cache is empty: append the prompt first")
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if k.requires_grad or v.requires_grad:
            k, v = k.detach(), v.detach()
        B, Hkv, _, D = self.k.shape
        if k.shape != (B, Hkv, 1, D) or v.shape != k.shape or k.dtype != self.k.dtype or v.dtype != k.dtype \
                or k.device != self.k.device or v.device != k.device or k.stride(-1) != 1 or v.stride(-1) != 1:
            raise ValueError(f"k and v must be [B, Hkv, 1, D] = {(B, Hkv, 1, D)} {self.k.dtype} on {self.k.device} "
                             f"like the cache, with a contiguous last dim, got {tuple(k.shape)} {k.dtype} strides "
                             f"{k.stride()} and {tuple(v.shape)} {v.dtype} strides {v.stride()}")
        new = {}
        for name, x, dtype in (("modality", modality, torch.uint8), ("time", time, torch.int32),
                               ("spatial", spatial, torch.int32)):
            if x is None:
                continue
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            _check_meta_dtype(name, x, dtype)
            if name == "modality":  # read on the host for CPU ids; device ids are trusted (a decode step never syncs)
                _check_modality(x, on_device=False)
            trail = (2,) if name == "spatial" else ()
            if x.numel() == B * math.prod(trail):
                x = x.reshape((B, 1, 1) + trail).expand((B, Hkv, 1) + trail)
            elif x.numel() == B * Hkv * math.prod(trail):
                x = x.reshape((B, Hkv, 1) + trail)
            else:
                raise ValueError(f"{name} must have shape [B, 1{', 2' if trail else ''}] or [B, Hkv, 1"
                                 f"{', 2' if trail else ''}] for B, Hkv = {B}, {Hkv}, got {tuple(x.shape)}")
            new[f"{name}_new"] = x if x.dtype == dtype and x.device == k.device else x.to(k.device, dtype)
        if self._max_length + 1 > self.capacity:  # grown only once the token is known to be valid
            self._resize(_round_up(max(self._max_length + 1, math.ceil(self.capacity * self.growth)), self.align))
        args = dict(position=self.position, next_position=self._next_position, modality=self.modality, time=self.time,
                    spatial=self.spatial, token_mass=self.token_mass, multiplicity=self.multiplicity, **new)
        if self.uses_kernels:
            append_token_(self.k, self.v, self.lengths, k, v, **args, check=False)
        else:
            torch_ops.append_token_(self.k, self.v, self.lengths, k, v, **args, index=self._slot, fresh_tail=True,
                                    check=False)
        self.count_appended()

    def check_query(self, q, scale=None) -> None:
        """Raise TypeError / ValueError unless ``q`` is what decode attention over this storage takes: ``[B, Hq, D]``
        with Hq a positive multiple of Hkv, in the cache's dtype and device, last dim contiguous; and ``scale``
        None or finite. Host checks only: a decode step runs them before it stores anything."""
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        B, Hkv, C, D = self.k.shape
        if q.dim() != 3 or q.shape[1] == 0 or q.shape[1] % Hkv:
            raise ValueError(f"q must be a [B, Hq, D] tensor with Hq a positive multiple of Hkv={Hkv}, got "
                             f"{tuple(q.shape)}")
        check_decode_query(q, (B, q.shape[1], Hkv, C, D), self.k.dtype, self.k.device)  # the decode plans' check
        check_scale(scale, D)

    def count_appended(self) -> None:
        """Advance the host's copies (lengths' bounds, ``seen``) by one decode token appended on the device: what
        :meth:`append_token` does after its launch, and what a replayed CUDA graph of it needs done on the host."""
        self._min_length += 1
        self._max_length += 1
        self.seen += 1

    @property
    def appends_in_place(self) -> bool:
        """Whether the next :meth:`append_token` writes into the current storage (every row has a free slot), so
        nothing is reallocated."""
        return self.k is not None and self._max_length + 1 <= self.capacity

    @property
    def binding(self) -> int | None:
        """What a captured decode step binds: an id of the current storage, unique in the process and new whenever
        the buffers are replaced (an in-place upkeep keeps it; the lengths and position counters are replaced with
        the buffers). Equal bindings mean a CUDA graph captured over this cache still reads and writes its live
        buffers. None before the first append."""
        return self._storage_id

    def select_rows(self, index) -> torch.Tensor | None:
        """Keep the batch rows ``index`` (row ids, repeats allowed, or a bool mask: see :meth:`row_index`), in that
        order: beam-search reordering, batch expansion (``num_return_sequences``) or selection. Every buffer, the
        lengths and the token metadata move together; the storage is reallocated (the decode plans bound to it are
        dropped). Returns the checked int64 row ids (None for an empty cache, which has nothing to move).
        """
        if self.k is None:
            return None
        index = self.row_index(index)  # checked before anything moves
        fresh = {name: getattr(self, name).index_select(0, index) for name in ("k", "v", *_METADATA)}
        self._install(fresh)
        self.lengths = self.lengths.index_select(0, index)
        self._slot = self._slot.index_select(0, index)
        self._next_position = self._next_position.index_select(0, index)
        return index

    def row_index(self, index) -> torch.Tensor:
        """``index`` as :meth:`select_rows` takes it, checked, as int64 row ids on the cache's device: ``[B']``
        integer ids in ``[0, B)`` (a tensor or a sequence of ints), or a ``[B]`` bool mask of the rows kept (what
        indexing a tensor with it keeps, as transformers' ``DynamicCache`` does; one host sync on a device).
        TypeError / ValueError naming ``index`` otherwise; ids are range-checked where the host reads them for free
        (on the CPU)."""
        if not isinstance(index, torch.Tensor):
            try:
                index = torch.as_tensor(index)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"index must be a 1-D tensor of batch rows, got {type(index).__name__}") from None
        if index.dtype.is_floating_point or index.dtype.is_complex:
            raise TypeError(f"index must hold integer row ids (or be a bool mask), got dtype {index.dtype}")
        if index.dim() != 1:
            raise ValueError(f"index must be a 1-D tensor of batch rows, got shape {tuple(index.shape)}")
        B = self.k.shape[0]
        if index.dtype == torch.bool:
            if index.numel() != B:
                raise ValueError(f"index as a bool mask must have B={B} entries, got {index.numel()}")
            index = index.nonzero().squeeze(-1)
        elif index.device.type == "cpu" and index.numel() and not (0 <= int(index.min()) and int(index.max()) < B):
            raise ValueError(f"index must hold row ids in [0, B={B}), got values in [{int(index.min())}, "
                             f"{int(index.max())}]")
        return index.to(self.k.device, torch.int64)

    def crop_last(self, n: int) -> None:
        """Forget the last ``n`` tokens of every row (assisted decoding's rollback). Only for rows of one length
        that were never compressed (a compressed row's last slots are not its last tokens): else ValueError."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int >= 0, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if n == 0 or self.k is None:
            return
        if self._compressed:
            raise ValueError("crop_last needs storage that was never compressed: a compressed row's last slots are "
                             "not its last tokens")
        if self._min_length != self._max_length or n > self._max_length:
            raise ValueError(f"crop_last needs rows of one length >= n={n}, got lengths in "
                             f"[{self._min_length}, {self._max_length}]")
        self.lengths -= n
        if self.keeps_fresh_tail:
            self._reset_tail(self._max_length)
        self._min_length -= n
        self._max_length -= n
        self.seen -= n
        self._next_position.fill_(self.seen)

    def decode_plan(self, num_q_heads: int, *, scale: float | None = None, token_mass: bool = True,
                    decay: float = 1.0):
        """The decode-attention plan bound to this storage (built once per (Hq, scale, token_mass, decay), then
        reused); ``decay`` is the factor on the token mass already held at every step (1: a plain sum).

        It attends over the full capacity with the device-side lengths, so the same plan serves every step, and
        the in-place compaction keeps it valid; a reallocation drops it. Returns a
        :class:`~acckv_triton.ops.decode_attention.DecodeAttentionPlan` (kernels) or a
        :class:`~acckv_triton.torch_ops.TorchDecodePlan` (torch backend), each with ``run(q)``.
        """
        if self.k is None:
            raise ValueError("the cache is empty: append tokens before attending")
        if token_mass:
            self._own()  # the plan adds to the token mass in place
        key = (num_q_heads, scale, token_mass, decay)
        plan = self._plans.get(key)
        if plan is None:
            bound = dict(num_q_heads=num_q_heads, scale=scale, token_mass=self.token_mass if token_mass else None,
                         multiplicity=self.multiplicity if self.proportional else None, decay=decay)
            if self.uses_kernels:
                plan = DecodeAttentionPlan(self.k, self.v, self.lengths, **bound, modality_mass=False)
            else:  # proportional: log(multiplicity) is the whole bias over the fresh tail
                plan = torch_ops.TorchDecodePlan(self.k, self.v, self.lengths, **bound, fresh_tail=self.proportional)
            self._plans[key] = plan
        return plan

    # ------------------------------------------------------------------------------------------------- compress
    def compress(self, plan: CompactionPlan, *, check_plan: bool = True, capacity: int | None = None,
                 length_bounds: tuple[int, int] | None = None) -> None:
        """Apply a compaction plan to every stored row; size the storage to ``capacity``.

        Args:
            plan: keep ``[B, Hkv, K]``, keep_lengths ``[B, Hkv]`` and optional merges (see :class:`CompactionPlan`);
                its ``merge_target`` / ``merge_weight`` may be narrower than the capacity but must cover
                :attr:`max_length`.
            check_plan: validate every value of the plan (one host sync); pass False for plans valid by
                construction.
            capacity: the token slots per row afterwards (rounded up to ``align``). Default: ``max(keep_lengths)
                + headroom`` when that is below the current capacity, else the current capacity. The current
                capacity compacts in place: the storage keeps its addresses (what the decode plans and CUDA
                graphs bind). A smaller one compacts out of place into fresh buffers and releases the old ones; a
                larger one compacts in place, then grows.
            length_bounds: ``(lo, hi)`` host bounds on ``keep_lengths`` (the policy's targets; ``lo == hi`` says every
                row keeps exactly that many): with them and ``check_plan=False`` nothing is read back from the device
                (otherwise the min and max are read, one sync, and bounds that do not hold raise ValueError).

        K and V slots become the weighted means of their merge sets; modality, time, spatial and position follow the
        kept token; token_mass and multiplicity are summed over each merge set; ``lengths`` becomes ``keep_lengths``; ``seen`` is
        unchanged.

        Raises:
            ValueError / TypeError for an invalid plan, before anything in the cache changes.
        """
        if self.k is None:
            raise ValueError("the cache is empty: append tokens before compressing")
        if not isinstance(plan, CompactionPlan):
            raise TypeError(f"plan must be a CompactionPlan, got {type(plan).__name__}")
        keep_lengths = plan.keep_lengths
        if not isinstance(keep_lengths, torch.Tensor) or keep_lengths.numel() != self.lengths.numel():
            raise ValueError(f"plan.keep_lengths must be a [B, Hkv] = {tuple(self.lengths.shape)} tensor")
        if keep_lengths.device != self.k.device:  # (read below before the ops' own checks)
            raise ValueError(f"plan.keep_lengths must be on the cache's device {self.k.device}, got "
                             f"{keep_lengths.device}")
        if length_bounds is None:
            n_min, n_max = host_range(keep_lengths)
            if n_min < 0:
                raise ValueError(f"plan.keep_lengths must be >= 0, got a row keeping {n_min}")
        else:
            n_min, n_max = length_bounds
            if not (_is_int(n_min) and _is_int(n_max) and 0 <= n_min <= n_max):
                raise ValueError(f"length_bounds must be ints 0 <= lo <= hi, got {length_bounds!r}")
            if check_plan:  # the plan's check reads the device anyway: the bounds must hold (lo == hi: all equal)
                lo, hi = host_range(keep_lengths)
                if not n_min <= lo <= hi <= n_max:
                    raise ValueError(f"length_bounds {length_bounds!r} must bound plan.keep_lengths, which lie in "
                                     f"[{lo}, {hi}]")
        width = self.capacity
        if plan.merge_target is not None:
            width = plan.merge_target.shape[-1] if plan.merge_target.dim() == 3 else -1
            if not self._max_length <= width <= self.capacity:
                raise ValueError(f"plan.merge_target must be [B, Hkv, W] with max_length={self._max_length} <= W <= "
                                 f"capacity={self.capacity}, got shape {tuple(plan.merge_target.shape)}")
        keep = plan.keep[..., :max(n_max, 0)] if plan.keep.dim() == 3 else plan.keep  # later entries are ignored
        if capacity is not None and not (_is_int(capacity) and capacity >= max(n_max, 0)):
            raise ValueError(f"capacity must be an int >= the longest kept row ({n_max}), got {capacity!r}")
        if capacity is None:
            capacity = min(_round_up(max(n_max, 0) + self.headroom, self.align), self.capacity)
        new_capacity = _round_up(capacity, self.align)
        data, sums = self._token_data(width)
        k, v = self.k[:, :, :width], self.v[:, :, :width]
        merges = dict(merge_target=plan.merge_target, merge_weight=plan.merge_weight)
        if not self.uses_kernels:  # torch backend: the kernels' checks (in the twin), then the vectorised ops in place
            torch_ops.compact_kv_(k, v, self.lengths, keep, keep_lengths, **merges, token_data=data, token_sums=sums,
                                  check_plan=check_plan)
            self._reset_tail(width)
        elif new_capacity < self.capacity or self._borrowed:  # a borrowed storage moves out, whatever its size
            B, Hkv, _, D = self.k.shape
            fresh = self._allocate(B, Hkv, D, new_capacity, self.k.dtype, self.k.device)
            out_data = [fresh["modality"], fresh["time"], fresh["spatial"].view(torch.int64).squeeze(-1),
                        fresh["position"]]
            compact_kv(k, v, self.lengths, keep, keep_lengths, out_k=fresh["k"], out_v=fresh["v"], **merges,
                       token_data=data, token_sums=sums, out_token_data=out_data,
                       out_token_sums=[fresh["token_mass"], fresh["multiplicity"]], check_plan=check_plan)
            del k, v, data, sums
            self._install(fresh)  # the prefill-size buffers are released here
            self.lengths.copy_(keep_lengths)
        else:
            compact_kv_(k, v, self.lengths, keep, keep_lengths, **merges, token_data=data, token_sums=sums,
                        check_plan=check_plan)
        self._min_length, self._max_length = n_min, n_max
        self._compressed = True
        if new_capacity != self.capacity:
            self._resize(new_capacity)

    @property
    def uses_kernels(self) -> bool:
        """Whether compaction and decode attention run the Triton kernels (see ``backend``)."""
        return self.kernels_on(self.k.device) if self.k is not None else self.backend == "triton"

    def kernels_on(self, device: torch.device) -> bool:
        """Whether storage on ``device`` would run the Triton kernels: ``"triton"``, or ``"auto"`` on CUDA."""
        return self.backend == "triton" or (self.backend == "auto" and device.type == "cuda")

    # --------------------------------------------------------------------------------------------------- decode
    def decode_attention(self, q: torch.Tensor, *, scale: float | None = None, accumulate_mass: bool = True,
                         num_splits: int | None = None, decay: float = 1.0) -> DecodeAttentionOutput:
        """One decode step of attention over the stored tokens (:func:`acckv_triton.decode_attention`).

        Args:
            q: ``[B, Hq, D]`` in the cache dtype, ``Hq`` a multiple of Hkv.
            scale, num_splits: as in :func:`acckv_triton.decode_attention`.
            accumulate_mass: add each stored token's attention probability (summed over its GQA group) into
                ``token_mass`` in place, after multiplying what it holds by ``decay`` (1: a plain sum).

        Returns:
            ``DecodeAttentionOutput(out [B, Hq, D], lse [B, Hq], modality_mass [B, Hq, NUM_MODALITIES])``.
        """
        if self.k is None:
            raise ValueError("the cache is empty: append tokens before attending")
        self.check_query(q, scale)  # q against this storage (the launcher would name k_cache for q's dtype)
        if accumulate_mass:
            self._own()  # the mass is added in place
        w = self._max_length  # views over the stored part keep the kernel's scratch sized by what is stored
        views = dict(scale=scale, modality=self.modality[:, :, :w],
                     token_mass=self.token_mass[:, :, :w] if accumulate_mass else None,
                     multiplicity=self.multiplicity[:, :, :w] if self.proportional else None, decay=decay)
        if not self.uses_kernels:
            return torch_ops.TorchDecodePlan(self.k[:, :, :w], self.v[:, :, :w], self.lengths, num_q_heads=q.shape[1],
                                             **views).run(q)
        return decode_attention(q, self.k[:, :, :w], self.v[:, :, :w], self.lengths, **views, num_splits=num_splits,
                                check_lengths=False)

    def __repr__(self) -> str:
        if self.k is None:
            return "LayerKVCache(empty)"
        B, Hkv, C, D = self.k.shape
        return (f"LayerKVCache(B={B}, Hkv={Hkv}, D={D}, dtype={str(self.k.dtype).removeprefix('torch.')}, "
                f"capacity={C}, max_length={self._max_length}, seen={self.seen}, nbytes={self.nbytes()})")
