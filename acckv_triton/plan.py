"""The compaction plan: what a policy emits and the cache applies through :func:`acckv_triton.ops.compact_kv`.

It lives in its own module so that the policy (which builds plans) and the cache (which applies them) both depend
on it and not on each other: data flows cache -> policy -> ops, never back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CompactionPlan"]


@dataclass(frozen=True)
class CompactionPlan:
    """Which tokens each (sequence, kv head) keeps, and where the evicted ones merge.

    Attributes:
        keep: ``[B, Hkv, K]`` int32; ``keep[b, h, :keep_lengths[b, h]]`` are strictly increasing indices of kept
            tokens (below the current length); later entries are ignored.
        keep_lengths: ``[B, Hkv]`` int32, tokens kept per (b, h).
        merge_target: optional ``[B, Hkv, W]`` int32 with W between the longest stored row and the cache capacity:
            for an evicted token, the slot (< keep_lengths) it merges into, or -1 to drop it.
        merge_weight: ``[B, Hkv, W]`` float32 merge weights (e.g. score mass), > 0 at kept and merged tokens;
            required with ``merge_target``.

    Slot j then holds ``sum_{t in S_j} w_t x_t / sum_{t in S_j} w_t`` over ``S_j = {keep[j]} | {t : merge_target[t]
    == j}``; see :func:`acckv_triton.reference.compact_kv_`.
    """

    keep: torch.Tensor
    keep_lengths: torch.Tensor
    merge_target: torch.Tensor | None = None
    merge_weight: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("keep", "keep_lengths", "merge_target", "merge_weight"):
            x = getattr(self, name)
            if not (isinstance(x, torch.Tensor) or (x is None and name.startswith("merge"))):
                raise TypeError(f"{name} must be a torch.Tensor{' or None' if name.startswith('merge') else ''}, "
                                f"got {type(x).__name__}")

    @property
    def has_merges(self) -> bool:
        """True when evicted tokens may merge into kept slots."""
        return self.merge_target is not None
