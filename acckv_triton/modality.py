"""Modality ids carried per cached token (``uint8`` tensors ``[B, Hkv, C]`` across the package)."""
from __future__ import annotations

import enum

__all__ = ["Modality", "NUM_MODALITIES"]


class Modality(enum.IntEnum):
    """What a cached token encodes. The values are the ids stored in modality tensors."""

    TEXT = 0
    AUDIO = 1
    VIDEO = 2
    IMAGE = 3


NUM_MODALITIES: int = len(Modality)
"""Number of modality ids; per-modality outputs have this many columns."""
