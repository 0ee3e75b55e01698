"""The pure-PyTorch specification of every op, computed in float64.

Each function here states in plain tensor code what the matching kernel in :mod:`acckv_triton.ops` computes,
with the same arguments and the same in-place effects. Tests compare the kernels against these functions, the
benchmarks use them as the readable baseline, and the docs point at them. They favour clarity over speed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .modality import NUM_MODALITIES

__all__ = ["DecodeAttentionOutput", "decode_attention"]


class DecodeAttentionOutput(NamedTuple):
    """Result of one decode step. ``modality_mass`` is None when no modality ids were given."""

    out: torch.Tensor  # [B, Hq, D]
    lse: torch.Tensor  # [B, Hq] float32, natural log
    modality_mass: torch.Tensor | None  # [B, Hq, NUM_MODALITIES] float32


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    modality: torch.Tensor | None = None,
    token_mass: torch.Tensor | None = None,
) -> DecodeAttentionOutput:
    """One decode step of GQA attention over a ragged cache, with per-token and per-modality attention mass.

    Args:
        q: ``[B, Hq, D]``, one query token per sequence.
        k_cache, v_cache: ``[B, Hkv, C, D]``; query head ``hq`` reads kv head ``hq // (Hq // Hkv)``.
        lengths: ``[B, Hkv]`` int, valid tokens per (sequence, kv head).
        scale: softmax scale, default ``D ** -0.5``.
        modality: optional ``[B, Hkv, C]`` modality ids.
        token_mass: optional ``[B, Hkv, C]`` float32, updated in place:
            ``token_mass[b, h, t] += sum_g p[b, h*G + g, t]`` for ``t < lengths[b, h]``.

    Returns:
        ``out [B, Hq, D]`` in q's dtype, ``lse [B, Hq]`` float32 and ``modality_mass [B, Hq, NUM_MODALITIES]``
        float32 (None without ``modality``). An empty (b, h) gives out 0, lse -inf and mass 0.
    """
    B, Hq, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale

    k = k_cache.double().repeat_interleave(G, dim=1)  # [B, Hq, C, D]
    v = v_cache.double().repeat_interleave(G, dim=1)
    valid = torch.arange(C, device=q.device) < lengths.long().repeat_interleave(G, dim=1)[..., None]  # [B, Hq, C]

    logits = torch.einsum("bhd,bhtd->bht", q.double(), k) * scale
    logits = logits.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf where the row is empty
    p = torch.where(valid, torch.exp(logits - lse[..., None]), torch.zeros_like(logits))
    out = torch.einsum("bht,bhtd->bhd", p, v)

    modality_mass = None
    if modality is not None:
        onehot = torch.nn.functional.one_hot(modality.long(), NUM_MODALITIES).double()  # [B, Hkv, C, M]
        modality_mass = torch.einsum("bht,bhtm->bhm", p, onehot.repeat_interleave(G, dim=1)).float()
    if token_mass is not None:
        token_mass += p.view(B, Hkv, G, C).sum(dim=2).float()
    return DecodeAttentionOutput(out.to(q.dtype), lse.float(), modality_mass)
