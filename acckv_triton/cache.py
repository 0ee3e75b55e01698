"""The compressed per-layer KV cache: storage, ragged lengths, token metadata and the upkeep of its memory.

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

:class:`BudgetedLayerCache` wraps a :class:`LayerKVCache` and holds it at an AccKV budget: it asks the policy for a
plan after each prefill (or streaming chunk) and whenever decoding has grown a row past budget + slack, and applies
the plan through the store; its ``decode_step`` is the one decode call (append, attention, mass, upkeep). Data flows one way: cache -> policy -> ops; nothing here knows transformers.
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers

import numpy as np
import torch

from . import fused_policy, torch_ops
from .config import AccKVConfig
from .modality import NUM_MODALITIES, Modality
from .ops._common import carve, carved_nbytes, check_scale, host_range
from .ops.append_token import append_token_
from .ops.chunk_attention import chunk_attention
from .ops.compact_kv import compact_kv, compact_kv_
from .ops.decode_attention import DecodeAttentionOutput, DecodeAttentionPlan, decode_attention
from .ops.decode_attention import check_query as check_decode_query
from .ops.observed_attention import observed_attention
from .ops.window_scores import window_scores
from .plan import CompactionPlan
from .fused_policy import plan_layer_fused
from .policy import LayerTokens, PolicyResult, budget_tokens, check_layer, plan_layer
from .reference import query_weight_sum

__all__ = ["BudgetedLayerCache", "LayerKVCache"]

_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_METADATA = ("modality", "time", "spatial", "position", "token_mass", "multiplicity")
_PREFILL_METADATA = frozenset({"modality", "time", "spatial", "position", "check_modality"})  # a prefill's **metadata


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


class BudgetedLayerCache:
    """One layer's KV cache held at an AccKV budget: compressed after prefill, re-compressed as decoding grows it.

    The budget is :func:`~acckv_triton.policy.budget_tokens` of the prompt tokens seen so far per (b, kv head)
    (padding excluded). Each token's ``token_mass`` starts at its prefill window score and accumulates decode
    attention mass; re-compression ranks by that blend (window queries and decode steps weigh alike, one unit of
    mass per query head each). Streaming chunks (or a second question) go through :meth:`prefill` again and raise
    the budget with the prompt, which then counts the tokens decoded in between too. The observation window of the
    latest prefill stays protected across re-compressions.

    The decode loop calls :meth:`decode_step` once per token: append, attention (with mass accumulation when the
    method reads it) and, when it is due, the upkeep. After each prefill the storage holds ``max(target) + slack
    + 1`` slots per row (rounded up to 16; plus the budget's growth over ``cfg.decode_ahead`` decoded tokens with
    ``decode_budget="all"``) and an upkeep compacts in place when a row would pass ``target + slack``.
    ``cfg.decode_budget`` says what the target covers while decoding: ``"fixed"`` the prompt's budget
    (K/V keep their addresses from one upkeep to the next), ``"all"`` the budget of every token seen (an upkeep
    grows the storage when the target outgrows it), ``"prompt"`` only the prompt's (no upkeep: decoded tokens
    are kept). The schedule is decided on the
    host from counts it already knows, so a step without upkeep performs no host synchronisation and, with the
    decode plan bound once, no allocation.

    Attributes:
        store: the :class:`LayerKVCache` holding K, V and metadata.
        target: ``[B, Hkv]`` int64 slots kept by a compression (None before the first prefill).
        last: the :class:`~acckv_triton.policy.PolicyResult` of the latest compression (plan, shares, priority).
        compressions: how many times this layer was compressed.
    """

    def __init__(self, cfg: AccKVConfig, layer: int = 0, num_layers: int = 1):
        if not isinstance(cfg, AccKVConfig):
            raise TypeError(f"cfg must be an AccKVConfig, got {type(cfg).__name__}")
        check_layer(layer, num_layers)
        self.cfg, self.layer, self.num_layers = cfg, layer, num_layers
        self.store = LayerKVCache(headroom=cfg.slack, proportional=cfg.uses_multiplicity, backend=cfg.backend)
        self.target: torch.Tensor | None = None
        self.prompt_tokens: torch.Tensor | None = None  # [B, Hkv] prompt tokens seen, padding excluded
        self.window = (0, 0)  # positions [start, end) of the latest prefill's observation window
        self._evidence_av: bool | None = None  # audio_video as the last prompt_evidence / prompt_attention took it
        self.last: PolicyResult | None = None
        self.policy_cfg = cfg  # what the policy runs: cfg with "auto" evidence resolved by the latest prefill
        self.compressions = 0
        self._valid: torch.Tensor | None = None  # [B, Hkv, stored] False at padding not yet compressed away
        self._decoded = 0  # tokens appended by decode since the last prefill
        self._prompt_max = 0  # prompt tokens seen per row, padding included: the host's bound on prompt_tokens
        self._target_max = 0  # budget_tokens of _prompt_max: the host's bound on every row's target
        self._padded = False  # whether some prefill had padding (then targets differ per row, on the device)
        self._excess = 0  # bound on max over rows of (stored - target), on the host: upkeep is due past cfg.slack
        self._longest = 0  # the host's bound on the longest row after the latest compression
        self.awaiting_reconstruction = False  # reconstruction evidence: the first prompt is stored, not compressed
        self._broad: tuple[torch.Tensor, torch.Tensor] | None = None  # (broad [B], shared [B, T]): cfg.broad_threshold

    @property
    def reads_mass(self) -> bool:
        """Whether decode steps accumulate token mass: only for methods whose upkeep ranks by it."""
        return not self.cfg.is_full and self.cfg.method != "streaming"

    def prompt_evidence(self, q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                        valid: torch.Tensor | None = None, audio_video: bool | None = None) -> torch.Tensor:
        """Step 0's evidence on a first prompt: ``[B, Hkv, T]`` float32, the attention mass each token receives from
        the queries ``cfg.score_evidence`` names, summed over the query heads of its group.

        Args:
            q: ``[B, Hq, T, D]`` the prompt's queries (RoPE applied); k: ``[B, Hkv, T, D]`` its keys.
            scale: softmax scale (default ``D ** -0.5``).
            valid: optional ``[B, T]`` bool, False at left padding (excluded from every softmax; a row's False
                entries come first: one after its first True is read as valid).
            audio_video: whether the prompt holds audio, video or image tokens (a host flag); ``"auto"`` evidence
                (AccKV's default) is the window's on such prompts and every query's on text; None: the window's.

        ``"window"``: the last W queries (:func:`acckv_triton.window_scores`); ``"last"``: the last query;
        ``"observed"`` and ``"mean"``: every prompt query (:func:`acckv_triton.observed_attention`, flash-tiled, no
        T x T); the mean is taken when the layer is compressed, over the queries that saw each token by then;
        ``"reconstruction"``: zeros (the evidence comes from :meth:`reconstruct`, after :meth:`prefill`).
        Kernels where the cache runs them, their torch twins elsewhere. Pass the result to :meth:`prefill`.
        With the mean as evidence (and ``cfg.broad_threshold`` on, its default there) it also stashes which rows are
        broad, as :meth:`prompt_attention` does.
        """
        self._check_q(q, k, valid)
        T = k.shape[2]
        key_start = self._key_start(valid, k)
        cfg = self._resolve(audio_video)
        self._evidence_av = audio_video  # what the next prefill's policy follows unless it is told otherwise
        self._broad = None
        if cfg.score_evidence == "reconstruction" or T == 0:  # (an empty prompt: no query, no evidence)
            return torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
        if self.reads_every_query(audio_video):  # the mean divides by the queries at compression time
            op = observed_attention if self.store.kernels_on(q.device) else \
                functools.partial(torch_ops.observed_attention, return_lse=False)
            mass = op(q, k, scale=scale, key_start=key_start, decay=cfg.mean_decay).key_mass
            self._stash_broad(q, k, scale, key_start, cfg)
            return mass
        W = self._evidence_rows(T, cfg)
        op = window_scores if self.store.kernels_on(q.device) else torch_ops.window_scores
        return op(q[:, :, T - W:], k, scale=scale, key_start=key_start).scores

    def reads_every_query(self, audio_video: bool | None = None) -> bool:
        """Whether a first prompt's evidence is every query's attention (``"observed"`` or ``"mean"``, resolved for a
        prompt with or without audio/video/image tokens): then :meth:`prompt_attention` gives the prompt's
        attention output and its evidence in one pass."""
        return self._resolve(audio_video).score_evidence in ("observed", "mean")

    def prompt_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                         valid: torch.Tensor | None = None, audio_video: bool | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """A first prompt's causal attention and its every-query evidence from the same pass.

        For a model whose attention is plain causal softmax attention (left padding as ``valid``), this replaces
        the model's own attention call and :meth:`prompt_evidence`: one pass of
        :func:`acckv_triton.observed_attention` with values (its torch twin off the kernels) computes the output
        and the mass each key receives, where the two calls compute the logits twice.

        Args: as :meth:`prompt_evidence`, plus ``v [B, Hkv, T, D]`` (the prompt's values, in q's dtype).

        Returns:
            ``(out, scores)``: ``out [B, T, Hq, D]`` in q's dtype (transformers' layout; 0 at a padded query) and the
            ``[B, Hkv, T]`` float32 scores to pass to :meth:`prefill`.

        With the mean as evidence (and ``cfg.broad_threshold`` on, its default there) it also computes, from q's last
        position and k, which rows' last query attends broadly and that query's head-shared attention (a few device
        ops, no sync); the next :meth:`prefill`'s compression ranks those rows by it (the returned scores and the
        stored token mass stay the every-query mass).

        Raises:
            ValueError when the evidence is not every query's (:meth:`reads_every_query`) or ``valid`` has the wrong
            shape.
        """
        if not self.reads_every_query(audio_video):
            raise ValueError(f"prompt_attention needs every-query evidence ('observed' or 'mean'); this layer's is "
                             f"{self._resolve(audio_video).score_evidence!r}: run the attention, then prompt_evidence")
        self._check_q(q, k, valid)
        B, Hq, T, D = q.shape
        key_start = self._key_start(valid, k)
        decay = self._resolve(audio_video).mean_decay
        self._evidence_av = audio_video
        self._broad = None
        out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)  # written straight into transformers' layout
        if self.store.kernels_on(q.device):
            res = observed_attention(q, k, v, scale=scale, key_start=key_start, out=out.transpose(1, 2), decay=decay)
        else:
            res = torch_ops.observed_attention(q, k, v, scale=scale, key_start=key_start, return_lse=False,
                                               decay=decay, out=out.transpose(1, 2))
        self._stash_broad(q, k, scale, key_start, self._resolve(audio_video))
        return out, res.key_mass

    def _stash_broad(self, q: torch.Tensor, k: torch.Tensor, scale: float | None, key_start: torch.Tensor | None,
                     cfg: AccKVConfig) -> None:
        """``cfg.broad_threshold`` on a first prompt ranked by the every-query mean: stash ``(broad [B] bool, shared
        [B, T] float32)`` for the next prefill's compression, else nothing. ``shared`` is the last query's attention
        (float32, keys before ``key_start`` masked) averaged over all the layer's query heads; ``broad`` marks the
        rows whose entropy of it (nats, mean over the query heads) exceeds ``broad_threshold x ln(valid keys)`` (a row
        with fewer than 2 valid keys never is). Torch ops on the device, nothing read back."""
        frac, T = cfg.broad_threshold, k.shape[2]
        if frac is None or T < 2 or cfg.is_full:  # (fewer than 2 keys: no row is broad; nothing is compressed)
            return
        B, Hkv, _, D = k.shape
        ql = q[:, :, -1].float().view(B, Hkv, q.shape[1] // Hkv, D)
        logits = ql @ k.float().transpose(-1, -2) * (D ** -0.5 if scale is None else scale)  # [B, Hkv, G, T]
        if key_start is not None:
            key_start = key_start.to(k.device).long()
            pad = torch.arange(T, device=k.device) < key_start[:, None]  # [B, T]
            logits = logits.masked_fill(pad[:, None, None], -math.inf)
        p = torch.softmax(logits, -1)
        entropy = torch.special.entr(p).sum(-1).mean((1, 2))  # [B] nats
        if key_start is None:  # every row has T keys: the threshold is a host number
            broad = entropy > frac * math.log(T)
        else:
            n = (T - key_start).float()
            broad = (entropy > frac * n.clamp(min=1.0).log()) & (n >= 2)
        self._broad = (broad, p.mean((1, 2)))

    @staticmethod
    def _check_q(q, k, valid=None) -> None:
        """Raise TypeError / ValueError unless ``q [B, Hq, T, D]`` and ``k [B, Hkv, T, D]`` are tensors of one prompt
        or chunk (same B, T, D, dtype and device: a window's evidence slices q's last queries, so a q of another
        length would score silently against the wrong keys) and ``valid`` is None or a tensor (its shape is checked
        where it is read)."""
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise (ValueError if isinstance(k, torch.Tensor) else TypeError)(
                f"k must be a [B, Hkv, T, D] tensor, got "
                f"{tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or (q.shape[0], q.shape[2], q.shape[3]) != \
                (k.shape[0], k.shape[2], k.shape[3]) or q.dtype != k.dtype or q.device != k.device:
            raise (ValueError if isinstance(q, torch.Tensor) else TypeError)(
                f"q must be a [B, Hq, T, D] tensor with B, T, D = {(k.shape[0], k.shape[2], k.shape[3])} like k, "
                f"{k.dtype} on {k.device}, got "
                f"{(tuple(q.shape), q.dtype) if isinstance(q, torch.Tensor) else type(q).__name__}")
        if valid is not None and not isinstance(valid, torch.Tensor):
            raise TypeError(f"valid must be None or a bool [B, T] tensor, got {type(valid).__name__}")

    @staticmethod
    def _key_start(valid: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
        """``[B]`` int32 first valid token of each sequence, T for a row with none (None without ``valid``),
        checking ``valid``'s shape. ``valid`` is left padding: a False after a row's first True is not seen (reading
        it would need a host sync)."""
        B, T = k.shape[0], k.shape[2]
        if valid is None:
            return None
        if valid.dim() != 2 or tuple(valid.shape) != (B, T):
            raise ValueError(f"valid must be a [B, T] = {(B, T)} bool tensor, got {tuple(valid.shape)}")
        return torch.where(valid.any(-1), valid.int().argmax(-1), T).to(torch.int32)

    def _resolve(self, audio_video: bool | None) -> AccKVConfig:
        """The config the policy runs for a prompt: ``"auto"`` evidence resolved (None: the window)."""
        if audio_video is not None and not isinstance(audio_video, bool):
            raise TypeError(f"audio_video must be a bool or None, got {type(audio_video).__name__}")
        if self.cfg.score_evidence != "auto":
            return self.cfg
        return self.cfg.replace(evidence=self.cfg.evidence_for(audio_video is None or bool(audio_video)))

    def _evidence_rows(self, T: int, cfg: AccKVConfig) -> int:
        """How many of a chunk's last queries give evidence (``cfg.score_evidence``, resolved)."""
        T = max(T, 1)  # an empty chunk: nothing scores, but the kernel's window stays a count >= 1
        return {"window": min(cfg.window, T), "observed": T, "mean": T, "last": 1,
                "reconstruction": min(cfg.window, T)}[cfg.score_evidence]  # a later chunk: its window

    def prefill(self, k: torch.Tensor, v: torch.Tensor, *, scores: torch.Tensor, valid: torch.Tensor | None = None,
                audio_video: bool | None = None, **metadata) -> None:
        """Store a prompt (or a streaming chunk) and compress the layer to its budget.

        Args:
            k, v: ``[B, Hkv, T, D]`` the chunk's keys (RoPE applied) and values.
            scores: ``[B, Hkv, T]`` real floating-point attention mass of these tokens (:meth:`prompt_evidence`;
                stored as float32). Not read back to be checked (that would sync): the policy reads NaN and
                negative values as 0 and +inf as the largest float.
            valid: optional ``[B, T]`` or ``[B, Hkv, T]`` bool, False at left padding (never kept, not counted in
                the budget).
            audio_video: as :meth:`prompt_evidence` took it (the evidence decides what the policy protects and
                pools); None: what this layer's last :meth:`prompt_evidence` or :meth:`prompt_attention` took.
            metadata: ``modality``, ``time``, ``spatial``, ``position`` and ``check_modality`` as
                :meth:`LayerKVCache.append` takes them.

        Afterwards a compressed layer's storage holds ``max(target) + slack + 1`` slots per row (with
        ``decode_budget="all"``, plus the budget's growth over ``decode_ahead`` more decoded tokens), rounded up to 16;
        at budget 1.0 and ``method="full"`` nothing is compressed and the storage grows as :meth:`LayerKVCache.append`
        grows it. With reconstruction evidence (``method="kvzip"``) a first prompt is stored whole and compressed by
        :meth:`end_reconstruction`, after :meth:`reconstruct` has scored it; a later chunk ranks by its window.
        """
        self._check_not_awaiting("prefill")
        self._check_metadata("prefill", metadata)
        self.store.check_kv(k, v)
        if audio_video is None:  # the scores' own evidence, not the window's default
            audio_video = self._evidence_av
        B, Hkv, T = k.shape[:3]
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (B, Hkv, T):
            raise ValueError(f"scores must be a [B, Hkv, T] = {(B, Hkv, T)} tensor, got "
                             f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
        if not scores.dtype.is_floating_point:  # attention mass: a real float (complex and ints are refused)
            raise TypeError(f"scores must be a real floating-point tensor of attention mass, got {scores.dtype}")
        if valid is not None and not isinstance(valid, torch.Tensor):
            raise TypeError(f"valid must be a bool [B, T] or [B, Hkv, T] tensor, got {type(valid).__name__}")
        if valid is not None and (tuple(valid.shape) not in ((B, T), (B, Hkv, T)) or valid.dtype != torch.bool):
            raise ValueError(f"valid must be a bool [B, T] or [B, Hkv, T] tensor for {(B, Hkv, T)}, "
                             f"got {tuple(valid.shape)} {valid.dtype}")
        valid_rows = None if valid is None else valid[:, None, :].expand(B, Hkv, T) if valid.dim() == 2 else valid
        before = None
        if valid_rows is not None or self._valid is not None:
            before = None if self.store.lengths is None else self.store.lengths.long().clone()
        scores = scores.detach() if scores.requires_grad else scores
        mass = scores.float() if valid_rows is None else torch.where(valid_rows, scores.float(), 0.0)
        st = self.store
        first = st.k is None
        if not first:  # the broad-row stash ranks a first prompt only (a later chunk, a second question: dropped)
            self._broad = None
        elif self._broad is not None and tuple(self._broad[1].shape) != (B, T):
            raise ValueError(f"k holds a prompt of {(B, T)} (batch, tokens), but the last prompt_attention / "
                             f"prompt_evidence scored {tuple(self._broad[1].shape)}: pass that call's prompt")
        defer = first and self.cfg.score_evidence == "reconstruction" and not self.cfg.is_full
        chunk_max = T + self._decoded  # tokens decoded since the last prefill become part of the prompt
        prompt_max = self._prompt_max + chunk_max
        target_max = budget_tokens(self.cfg, prompt_max, self.layer, self.num_layers)
        # the first prompt of a layer that compresses is compacted straight out of the inputs: no copy (KVzip's is
        # held until its reconstruction pass has scored it; that pass writes the token mass, so it gets its own)
        borrow = first and st.kernels_on(k.device) and not self.cfg.is_full
        if borrow and defer and mass.data_ptr() == scores.data_ptr():
            mass = mass.clone()
        st.append(k, v, token_mass=mass, borrow=borrow, **metadata)  # validates: nothing changed if it raises
        if valid_rows is not None:
            self._mark_valid(before, valid_rows)
        elif self._valid is not None:
            self._mark_valid(before, torch.ones(B, Hkv, T, dtype=torch.bool, device=k.device))
        self._prompt_max, self._target_max = prompt_max, target_max
        if valid_rows is not None or self._padded:  # per-row prompts on the device (no read-back)
            chunk = (valid_rows.sum(-1) if valid_rows is not None else
                     torch.full((B, Hkv), T, dtype=torch.long, device=k.device)) + self._decoded
            if not self._padded:
                self._padded = True
                self.prompt_tokens = torch.full((B, Hkv), self._prompt_max - chunk_max, dtype=torch.long,
                                                device=k.device)
            self.prompt_tokens = self.prompt_tokens + chunk
            self.target = budget_tokens(self.cfg, self.prompt_tokens, self.layer, self.num_layers)
        else:  # every row saw the same prompt: the host knows the targets exactly
            self.prompt_tokens = torch.full((B, Hkv), self._prompt_max, dtype=torch.long, device=k.device)
            self.target = torch.full((B, Hkv), self._target_max, dtype=torch.long, device=k.device)
        self._decoded = 0
        self._evidence_av = None  # used up by this prefill
        self.window = (self.store.seen - self.cfg.window, self.store.seen)
        self.policy_cfg = self._resolve(audio_video)
        if self.policy_cfg.score_evidence == "reconstruction" and not first:  # no pass for a later chunk
            self.policy_cfg = self.policy_cfg.replace(evidence="window")
        if defer:
            self.awaiting_reconstruction = True
            return
        broad, self._broad = self._broad, None  # (a first prompt's, checked above against this prompt)
        self._compress(broad=broad)

    def reconstruct(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    scale: float | None = None) -> torch.Tensor:
        """Score the stored first prompt by a reconstruction chunk (reconstruction evidence, after KVzip).

        Args:
            q: ``[B, Hq, T, D]`` the chunk's queries (RoPE applied); k, v: ``[B, Hkv, T, D]`` its keys and values. The
                integration feeds the prompt again after itself, at the positions that follow it.
            scale: softmax scale (default ``D ** -0.5``).

        Each query attends over every stored token and the chunk causally (:func:`acckv_triton.ops.chunk_attention`,
        ``reduce="max"``); each stored token's evidence becomes the largest probability any query head of its group
        gives it (a max over calls too). The chunk is not stored. Returns ``[B, T, Hq, D]`` (transformers' layout),
        what the model's next layer reads; call :meth:`end_reconstruction` once every layer has been scored.
        """
        if not self.awaiting_reconstruction:
            raise ValueError("reconstruct scores a first prompt stored by prefill with reconstruction evidence "
                             "(method='kvzip'); this layer has none waiting")
        if self._valid is not None:  # padding queries would score too, and padding keys be attended
            raise ValueError("reconstruct does not support a padded prompt (prefill got valid=...): prefill prompts "
                             "without padding for reconstruction evidence")
        S = self.store.max_length
        out, res = self._attend_chunk(q, k, v, scale=scale, window=max(q.shape[2], 1), reduce="max")
        torch.maximum(self.store.token_mass[:, :, :S], res.stored_mass, out=self.store.token_mass[:, :, :S])
        return out

    def _attend_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **opts):
        """``chunk_attention`` of a chunk over the stored slots and itself (the kernel where the store runs kernels,
        its torch twin elsewhere): ``(out [B, T, Hq, D], ChunkAttention)``."""
        st = self.store
        st.check_kv(k, v)  # the chunk against the storage, and q against both: each named (the op names its own)
        self._check_q(q, k)
        B, Hq, T, D = q.shape
        S = st.max_length
        args = (st.k[:, :, :S], st.v[:, :, :S], st.lengths, k, v)
        opts["check_lengths"] = False  # the cache keeps its lengths and multiplicities valid
        if st.uses_kernels:
            out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
            return out, chunk_attention(q, *args, **opts, out=out.transpose(1, 2))
        res = torch_ops.chunk_attention(q, *args, **opts)
        return res.out.transpose(1, 2), res

    def end_reconstruction(self) -> None:
        """Compress the first prompt :meth:`reconstruct` scored (to ``max(target) + slack + 1`` slots per row)."""
        if not self.awaiting_reconstruction:
            raise ValueError("end_reconstruction: this layer has no first prompt waiting for reconstruction")
        self.awaiting_reconstruction = False
        self.compress()

    @staticmethod
    def _check_metadata(what: str, metadata: dict) -> None:
        """A prefill's ``**metadata`` holds only what :meth:`LayerKVCache.append` takes beside the mass (the scores
        give it): an unknown name raises TypeError, before anything changes."""
        for name in metadata:
            if name not in _PREFILL_METADATA:
                raise TypeError(f"{what}() got an unexpected keyword argument {name!r} (metadata: "
                                f"{', '.join(sorted(_PREFILL_METADATA))})")

    def _check_not_awaiting(self, what: str) -> None:
        if self.awaiting_reconstruction:
            raise ValueError(f"{what}: the first prompt waits for its reconstruction pass (method='kvzip'); call "
                             "reconstruct(...) and end_reconstruction() first")

    def prefill_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                      valid: torch.Tensor | None = None, audio_video: bool | None = None,
                      **metadata) -> torch.Tensor:
        """A later chunk (a second question, a streaming chunk, teacher forcing): attend, then store and compress.

        Args:
            q: ``[B, Hq, T, D]`` the chunk's queries (RoPE applied); k, v: ``[B, Hkv, T, D]`` its keys and values.
            scale: softmax scale (default ``D ** -0.5``).
            valid: optional ``[B, T]`` bool, False at left padding.
            metadata: as :meth:`prefill`.

        Each query attends over every stored slot (merged slots weighing their multiplicity when the method says so)
        and the chunk causally, through :func:`acckv_triton.ops.chunk_attention` (the torch backend: its blocked
        twin). The observation window's mass is added to the stored slots' ``token_mass`` and seeds the chunk's,
        then :meth:`prefill` stores the chunk and compresses. Returns ``[B, T, Hq, D]`` (transformers' layout).
        """
        st = self.store
        if st.k is None:
            raise ValueError("prefill_chunk needs a prefilled cache: call prefill(k, v, scores=...) first")
        self._check_not_awaiting("prefill_chunk")
        self._check_metadata("prefill_chunk", metadata)
        st.check_kv(k, v)  # and the chunk's metadata and mask: checked before the stored tokens' mass changes
        st.token_metadata(k, **metadata)
        B, T = k.shape[0], k.shape[2]
        if valid is not None and not isinstance(valid, torch.Tensor):
            raise TypeError(f"valid must be a bool [B, T] tensor, got {type(valid).__name__}")
        if valid is not None and (tuple(valid.shape) != (B, T) or valid.dtype != torch.bool):
            raise ValueError(f"valid must be a bool [B, T] = {(B, T)} tensor (one mask per sequence: the chunk's "
                             f"queries attend over the keys of every kv head alike), got {tuple(valid.shape)} "
                             f"{valid.dtype}")
        S = st.max_length
        cfg = self._resolve(audio_video)
        out, res = self._attend_chunk(
            q, k, v, scale=scale, multiplicity=st.multiplicity[:, :, :S] if st.proportional else None,
            key_valid=valid,
            window=self._evidence_rows(T, cfg), decay=cfg.mean_decay)
        st._own()  # (a first prompt still borrowed, when its compression failed) the mass changes in place below
        if cfg.mean_decay != 1.0:  # the stored tokens' evidence ages by the chunk's T queries
            st.token_mass[:, :, :S].mul_(cfg.mean_decay ** T)  # (mul_ / add_ on the slice: `slice *=` copies it back)
        st.token_mass[:, :, :S].add_(res.stored_mass)  # the window's evidence on stored tokens, as decode adds its own
        self.prefill(k, v, scores=res.chunk_mass, valid=valid, audio_video=audio_video, **metadata)
        return out

    def _mark_valid(self, before: torch.Tensor | None, valid: torch.Tensor) -> None:
        """Record which stored slots are padding (until a compression drops them); rows may be ragged."""
        B, Hkv, T = valid.shape
        marks = torch.ones(B, Hkv, self.store.max_length, dtype=torch.bool, device=valid.device)
        if self._valid is not None:
            marks[..., :self._valid.shape[-1]] = self._valid
        start = before if before is not None else torch.zeros(B, Hkv, dtype=torch.long, device=valid.device)
        marks.scatter_(2, start[..., None] + torch.arange(T, device=valid.device), valid)
        self._valid = marks

    def append(self, k: torch.Tensor, v: torch.Tensor, **metadata) -> None:
        """Store decode tokens ``[B, Hkv, T, D]``; re-compress once a row holds more than budget + slack.

        :meth:`decode_step` is the one-call decode path; this is for hand-written loops that attend separately.
        """
        self._check_not_awaiting("append")
        self.store.append(k, v, **metadata)
        self._decoded += k.shape[2]
        self._excess += k.shape[2]
        if self.needs_upkeep():
            self.compress(upkeep=True)

    def decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    modality: torch.Tensor | None = None, time: torch.Tensor | None = None,
                    spatial: torch.Tensor | None = None) -> DecodeAttentionOutput:
        """One decode token: store its K/V, attend over every stored token, accumulate mass, run the upkeep if due.

        Args:
            q: ``[B, Hq, D]`` the new token's queries (RoPE applied), cache dtype, last dim contiguous.
            k, v: ``[B, Hkv, 1, D]`` its key and value.
            scale: softmax scale (default ``D ** -0.5``).
            modality, time, spatial: optional metadata of the token, as :meth:`LayerKVCache.append_token` takes it.

        Returns:
            ``DecodeAttentionOutput(out [B, Hq, D], lse [B, Hq], None)``: the decode plan's buffers, rewritten by
            the next step of this layer. The attention includes the new token; the upkeep (when due) runs after it.

        A step without upkeep performs no host synchronisation and no allocation (metadata in the cache's dtypes).
        """
        st = self.store
        if self.target is None:
            raise ValueError("decode_step needs a prefilled cache: call prefill(k, v, scores=...) first")
        self._check_not_awaiting("decode_step")
        st.check_query(q, scale)  # before the token is stored: a rejected step changes nothing
        st.append_token(k, v, modality=modality, time=time, spatial=spatial)
        self._count_decoded()
        res = st.decode_plan(q.shape[1], scale=scale, token_mass=self.reads_mass,
                             decay=self.policy_cfg.mean_decay).run(q, check=False)  # checked above
        if self.needs_upkeep():
            self.compress(upkeep=True)
        return res

    def _count_decoded(self) -> None:
        self._decoded += 1
        self._excess += 1

    # ---- what a CUDA graph of the decode step needs from the host (see acckv_triton.integrations.graphs)
    def next_step_is_plain(self) -> bool:
        """Whether the next :meth:`decode_step` appends in place and runs no upkeep (decided on the host, no
        sync): such a step launches the same work on the same buffers every time, so a captured graph can replay it.
        """
        if self.target is None or self.awaiting_reconstruction or not self.store.appends_in_place:
            return False
        self._count_decoded()
        try:
            return not self.needs_upkeep()
        finally:
            self._decoded -= 1
            self._excess -= 1

    def plain_steps_ahead(self) -> int:
        """How many of the next decode steps are surely plain (:meth:`next_step_is_plain` for each in turn), from
        host counts: the steps before a row would fill the storage, pass its target + slack, or outgrow the storage.
        Exact for a fixed target; a lower bound while the target grows (``decode_budget="all"``), whose growth only
        delays the upkeep."""
        if self.target is None or self.awaiting_reconstruction or self.store.k is None:
            return 0
        cfg, st = self.cfg, self.store
        room = st.capacity - st.max_length  # appends in place
        if cfg.is_full or cfg.decode_budget == "prompt":
            return max(room, 0)
        # step k is plain while both margins, k tokens on, stay >= 0: k <= each margin now (the budget's growth
        # over those k steps only adds to the first)
        return max(0, min(room, *self._upkeep_margins()))

    def count_replayed_step(self) -> None:
        """The host's side of one decode step whose device work a replayed graph did (the counters
        :meth:`decode_step` advances; call it only for a step :meth:`next_step_is_plain` allowed)."""
        self.store.count_appended()
        self._count_decoded()

    def host_counters(self) -> tuple[int, ...]:
        """The host-side counters a decode step advances, to restore after a capture (which runs the step's host
        code but not its device work)."""
        st = self.store
        return st._min_length, st._max_length, st.seen, self._decoded, self._excess

    def restore_host_counters(self, counters: tuple[int, ...]) -> None:
        """Undo a capture's host side: set the counters :meth:`host_counters` returned at an earlier point of the
        same decode (so the steps counted plain ahead of a later point stay plain)."""
        st = self.store
        st._min_length, st._max_length, st.seen, self._decoded, self._excess = counters

    def select_rows(self, index) -> None:
        """Keep the batch rows ``index`` (beam reordering, batch expansion or selection): storage, targets, prompt
        counts and padding marks move together (see :meth:`LayerKVCache.select_rows`)."""
        index = self.store.select_rows(index)  # the checked row ids; None: an empty cache, nothing to move
        if index is None:
            return
        if self.target is not None:
            index = index.to(self.target.device)
            self.target = self.target.index_select(0, index)
            self.prompt_tokens = self.prompt_tokens.index_select(0, index)
        if self._valid is not None:
            self._valid = self._valid.index_select(0, index.to(self._valid.device))
        if self._broad is not None:
            self._broad = tuple(x.index_select(0, index.to(x.device)) for x in self._broad)
        self.last = None  # the latest plan described the old rows

    def _capacity_for(self, target_max: int, seen: int) -> int:
        """Slots per row for rows of at most ``target_max`` tokens once ``seen`` prompt and decoded tokens count in
        the budget: the largest target, the slack, the token that triggers the upkeep and, with
        ``decode_budget="all"``, the budget's growth over the next ``cfg.decode_ahead`` decoded tokens (the store
        rounds it up to its alignment)."""
        cfg = self.cfg
        growth = 0
        if cfg.decode_budget == "all" and cfg.decode_ahead:
            growth = budget_tokens(cfg, seen + cfg.decode_ahead, self.layer, self.num_layers) - \
                budget_tokens(cfg, seen, self.layer, self.num_layers)
        return target_max + growth + cfg.slack + 1

    def _grown_target_max(self) -> int:
        """``decode_budget="all"``: the host's bound on every row's target counting the tokens decoded since."""
        return budget_tokens(self.cfg, self._prompt_max + self._decoded, self.layer, self.num_layers)

    def needs_upkeep(self) -> bool:
        """True when some row holds more than its budget plus ``cfg.slack`` tokens (decided on the host, no sync).

        Never with ``decode_budget="prompt"``: decoded tokens are kept until the next prefill counts them. With
        ``"all"`` the budget grows with the tokens decoded, so the excess over it grows by ``1 - budget`` a token.
        """
        cfg = self.cfg
        if self.target is None or cfg.is_full or cfg.decode_budget == "prompt":
            return False
        return min(self._upkeep_margins()) < 0

    def _upkeep_margins(self) -> tuple[int, int]:
        """``(due, outgrown)`` from host counts: how far the excess over the budget is from passing the slack, and
        how far the longest row is from outgrowing the storage (Ada-KV's longest head, a growing budget), each in
        decoded tokens; an upkeep is due when either is negative."""
        cfg = self.cfg
        grown = self._grown_target_max() - self._target_max if cfg.decode_budget == "all" else 0
        return cfg.slack - self._excess + grown, self.store.capacity - self._longest - self._excess - 1

    def compress(self, *, upkeep: bool = False) -> None:
        """Run the policy on the stored tokens and apply its plan (nothing to do at budget 1.0 / method full).

        ``upkeep=True`` compacts in place (the storage keeps its capacity and addresses); after a prefill the
        storage is sized to ``max(target) + slack + 1`` slots. With adaptive head budgets (Ada-KV) the rows of a
        layer get different lengths: a prefill reads the longest row back (one sync) to size the storage, and an
        upkeep caps every row at the room the storage has (nothing read back). The kernel backend runs the fused
        policy (AccKV with adaptive head budgets: the torch policy), the torch backend ``policy.plan_layer``.
        (:meth:`prefill`'s own compression also ranks the rows :meth:`prompt_attention` / :meth:`prompt_evidence`
        found broad, ``cfg.broad_threshold``, by their last query's head-shared attention.)
        """
        self._compress(upkeep=upkeep)

    def _compress(self, *, upkeep: bool = False, broad: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """:meth:`compress`; ``broad``: a first prompt's broad-row stash (``(broad [B], shared [B, T])``, T the
        stored width), whose broad rows rank by ``shared``."""
        st = self.store
        cfg = self.policy_cfg
        if cfg.is_full or st.k is None:
            return
        if upkeep and cfg.decode_budget == "all":  # the budget of every token seen so far
            self._target_max = self._grown_target_max()
            if self._padded:  # per-row prompts: per-row targets, on the device
                self.target = budget_tokens(cfg, self.prompt_tokens + self._decoded, self.layer, self.num_layers)
            else:  # every row saw the same tokens: the host's target is each row's (one fill, in place)
                self.target.fill_(self._target_max)
        w = st.max_length
        scores = st.token_mass[:, :, :w]
        if cfg.score_evidence == "mean":  # every query from a token on adds to its mass: rank by the mean per query
            scores = scores / query_weight_sum((st.seen - st.position[:, :, :w]).clamp_(min=1), cfg.mean_decay)
        if cfg.ranks_by_value:  # evidence x ||v||: a token that is attended but adds little to the output ranks lower
            scores = scores * torch.linalg.vector_norm(st.v[:, :, :w], dim=-1, dtype=torch.float32)  # (no fp32 copy)
        if broad is not None and cfg.score_evidence == "mean":
            # cfg.broad_threshold: a broad row's first compression ranks by its last query's head-shared attention
            scores = torch.where(broad[0][:, None, None], broad[1][:, None, :w], scores)
        x = LayerTokens(
            scores=scores, modality=st.modality[:, :, :w], lengths=st.lengths,
            time=st.time[:, :, :w], keys=st.k[:, :, :w], spatial=st.spatial[:, :, :w],
            valid=None if self._valid is None else self._valid[..., :w],
            position=st.position[:, :, :w], window_range=self.window,
        )
        room = st.capacity  # an upkeep compacts in place; it grows the storage only when the budget outgrows it
        seen = self._prompt_max + self._decoded
        if upkeep and cfg.decode_budget == "all" and self._target_max + cfg.slack + 1 > room:
            room = _round_up(self._capacity_for(self._target_max, seen), st.align)
        adaptive = cfg.adaptive_heads
        cap = room - cfg.slack - 1 if upkeep else w  # Ada-KV's rows keep at most the storage's room (an upkeep)
        if st.uses_kernels and fused_policy.supports(cfg):  # a few launches, sizes from the host's bounds
            self.last = plan_layer_fused(cfg, x, self.layer, self.num_layers, target=self.target,
                                         max_keep=cap if adaptive else self._target_max)
        else:  # the ids were checked as they were appended
            self.last = plan_layer(cfg, x, self.layer, self.num_layers, target=self.target,
                                   max_per_row=cap if adaptive and upkeep else None, check=False)
        if not adaptive:
            longest = self._target_max
        elif upkeep:
            longest = cap
        else:  # adaptive rows after a prefill: the longest is read back to size the storage (the one sync)
            longest = int(self.last.plan.keep_lengths.max())
        self._longest = min(longest, w)
        capacity = room if upkeep else self._capacity_for(longest, seen)
        st.compress(self.last.plan, check_plan=False, capacity=capacity, length_bounds=(0, self._longest))
        if cfg.score_evidence == "last" and cfg.method == "tova":
            st.token_mass.zero_()  # TOVA ranks by the latest queries only: the next upkeep sees the steps since
        self._excess = 0  # every row now holds at most its target
        self._valid = None
        self.compressions += 1

    def decode_attention(self, q: torch.Tensor, *, scale: float | None = None) -> DecodeAttentionOutput:
        """Attend over the stored tokens and accumulate their decode mass (see :meth:`LayerKVCache.decode_attention`).

        Returns fresh tensors; :meth:`decode_step` is the allocation-free path.
        """
        return self.store.decode_attention(q, scale=scale, accumulate_mass=self.reads_mass,
                                           decay=self.policy_cfg.mean_decay)
