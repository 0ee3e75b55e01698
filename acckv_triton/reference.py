"""The pure-PyTorch specification of every op, computed in float64.

Each function here states in plain tensor code what the matching kernel in :mod:`acckv_triton.ops` computes,
with the same arguments and the same in-place effects. Tests compare the kernels against these functions, the
benchmarks use them as the readable baseline, and the docs point at them. They favour clarity over speed.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .modality import NUM_MODALITIES

__all__ = ["ChunkAttention", "DecodeAttentionOutput", "ObservedAttention", "WindowScores", "append_token_",
           "chunk_attention", "compact_kv_", "decode_attention", "observed_attention", "pool_scores",
           "query_weight_sum", "query_weights", "window_scores"]


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
    multiplicity: torch.Tensor | None = None,
    decay: float = 1.0,
) -> DecodeAttentionOutput:
    """One decode step of GQA attention over a ragged cache, with per-token and per-modality attention mass.

    Args:
        q: ``[B, Hq, D]``, one query token per sequence.
        k_cache, v_cache: ``[B, Hkv, C, D]``; query head ``hq`` reads kv head ``hq // (Hq // Hkv)``.
        lengths: ``[B, Hkv]`` int, valid tokens per (sequence, kv head).
        scale: softmax scale, default ``D ** -0.5``.
        modality: optional ``[B, Hkv, C]`` modality ids.
        token_mass: optional ``[B, Hkv, C]`` float32, updated in place:
            ``token_mass[b, h, t] = decay * token_mass[b, h, t] + sum_g p[b, h*G + g, t]`` for ``t < lengths[b, h]``.
        multiplicity: optional ``[B, Hkv, C]`` float > 0: slot t weighs ``multiplicity[t]`` in the softmax
            (``p_t ∝ n_t exp(s_t)``), so a merged slot keeps the attention mass of the tokens it stands for.
        decay: factor in (0, 1] on the mass already accumulated (1: a plain sum; below 1 an exponentially weighted
            sum whose newest query weighs 1).

    Returns:
        ``out [B, Hq, D]`` in q's dtype, ``lse [B, Hq]`` float32 and ``modality_mass [B, Hq, NUM_MODALITIES]``
        float32 (None without ``modality``). An empty (b, h) gives out 0, lse -inf and mass 0.
    """
    B, Hq, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale

    valid = torch.arange(C, device=q.device) < lengths.long().repeat_interleave(G, dim=1)[..., None]  # [B, Hq, C]
    # slots past each length hold leftover memory (possibly NaN/inf): they must not reach the result, even as 0 * NaN
    k = torch.where(valid[..., None], k_cache.double().repeat_interleave(G, dim=1), 0.0)  # [B, Hq, C, D]
    v = torch.where(valid[..., None], v_cache.double().repeat_interleave(G, dim=1), 0.0)

    logits = torch.einsum("bhd,bhtd->bht", q.double(), k) * scale
    if multiplicity is not None:
        logits = logits + multiplicity.double().log().repeat_interleave(G, dim=1)
    logits = logits.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf where the row is empty
    p = torch.where(valid, torch.exp(logits - lse[..., None]), torch.zeros_like(logits))
    out = torch.einsum("bht,bhtd->bhd", p, v)

    modality_mass = None
    if modality is not None:
        stored = torch.arange(C, device=q.device) < lengths.long()[..., None]  # [B, Hkv, C]
        ids = torch.where(stored, modality.long(), 0)  # any id past a length is ignored, as p is 0 there
        onehot = torch.nn.functional.one_hot(ids, NUM_MODALITIES).double()  # [B, Hkv, C, M]
        modality_mass = torch.einsum("bht,bhtm->bhm", p, onehot.repeat_interleave(G, dim=1)).float()
    if token_mass is not None and decay == 1.0:
        token_mass += p.view(B, Hkv, G, C).sum(dim=2).float()
    elif token_mass is not None:  # slots past each length keep their value
        stored = torch.arange(C, device=q.device) < lengths.long()[..., None]  # [B, Hkv, C]
        new = token_mass.double() * decay + p.view(B, Hkv, G, C).sum(dim=2)
        token_mass.copy_(torch.where(stored, new, token_mass.double()).float())
    return DecodeAttentionOutput(out.to(q.dtype), lse.float(), modality_mass)


class WindowScores(NamedTuple):
    """Result of the prefill window scoring. ``modality_mass`` is None when no modality ids were given."""

    scores: torch.Tensor  # [B, Hkv, N] float32
    modality_mass: torch.Tensor | None  # [B, Hq, NUM_MODALITIES] float32


def window_scores(
    q_window: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    modality: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
) -> WindowScores:
    """SnapKV-style observation-window scores (Step 0 of docs/algorithm.md), computed in float64.

    Window query ``i`` sits at position ``N - W + i`` and sees the keys ``key_start[b] <= t <= N - W + i``.

    Args:
        q_window: ``[B, Hq, W, D]``, the last W prompt queries (RoPE applied).
        k: ``[B, Hkv, N, D]``; query head ``hq`` reads kv head ``hq // (Hq // Hkv)``.
        scale: softmax scale, default ``D ** -0.5``.
        modality: optional ``[B, Hkv, N]`` modality ids.
        lse: optional ``[B, Hq, W]`` natural-log logsumexp of each window row; computed here when None.
        key_start: optional ``[B]`` int; keys ``t < key_start[b]`` are left padding, excluded from every softmax.

    Returns:
        ``scores [B, Hkv, N]`` float32 with ``scores[b, h, t] = sum_w sum_g p[b, h*G + g, w, t]`` and
        ``modality_mass [B, Hq, NUM_MODALITIES]`` float32 with ``modality_mass[b, hq, m] = sum_w sum_{t: m(t)=m} p``
        (None without ``modality``). Rows that see no key (window queries inside the padding) contribute 0.
    """
    B, Hq, W, D = q_window.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale

    keys = k.double().repeat_interleave(G, dim=1)  # [B, Hq, N, D]
    logits = torch.einsum("bhwd,bhtd->bhwt", q_window.double(), keys) * scale  # [B, Hq, W, N]
    t = torch.arange(N, device=k.device)
    query_pos = N - W + torch.arange(W, device=k.device)
    start = key_start.long() if key_start is not None else torch.zeros(B, dtype=torch.long, device=k.device)
    visible = (t[None, None, :] <= query_pos[None, :, None]) & (t[None, None, :] >= start[:, None, None])  # [B,W,N]
    visible = visible[:, None].expand(B, Hq, W, N)
    logits = logits.masked_fill(~visible, float("-inf"))
    row_lse = torch.logsumexp(logits, dim=-1) if lse is None else lse.double()  # [B, Hq, W]
    row_seen = visible.any(dim=-1) & torch.isfinite(row_lse)
    p = torch.where(visible & row_seen[..., None], torch.exp(logits - row_lse[..., None]), torch.zeros_like(logits))

    scores = p.sum(dim=2).view(B, Hkv, G, N).sum(dim=2)
    modality_mass = None
    if modality is not None:
        onehot = torch.nn.functional.one_hot(modality.long(), NUM_MODALITIES).double()  # [B, Hkv, N, M]
        modality_mass = torch.einsum("bht,bhtm->bhm", p.sum(dim=2), onehot.repeat_interleave(G, dim=1)).float()
    return WindowScores(scores.float(), modality_mass)


def pool_scores(scores: torch.Tensor, modality: torch.Tensor, kernel: int = 7, mode: str = "max") -> torch.Tensor:
    """1-D pooling of token scores along each modality's own token order; modalities are never mixed.

    For every token t of modality m, the neighbourhood is the ``kernel // 2`` tokens of modality m right before t
    and right after t in token order (tokens of other modalities in between are skipped, not counted). ``"max"``
    takes their maximum, ``"avg"`` their mean over the neighbours that exist (no zero padding at the ends).

    Args:
        scores: ``[..., N]`` floating scores (e.g. ``[B, Hkv, N]`` from :func:`window_scores`).
        modality: ``[..., N]`` integer modality ids, same shape as ``scores``.
        kernel: odd positive window size (ACCKV default 7); 1 returns a copy.
        mode: ``"max"`` or ``"avg"``.

    Returns:
        a new tensor shaped and typed like ``scores``.
    """
    if scores.shape != modality.shape:
        raise ValueError(f"modality must have the shape of scores {tuple(scores.shape)}, got {tuple(modality.shape)}")
    if not (isinstance(kernel, int) and kernel >= 1 and kernel % 2 == 1):
        raise ValueError(f"kernel must be an odd positive int, got {kernel!r}")
    if mode not in ("max", "avg"):
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    N = scores.shape[-1]
    if N == 0 or kernel == 1:
        return scores.clone()
    r = kernel // 2
    # Sort tokens by (modality, position): each modality becomes one contiguous run in its own token order.
    order = torch.argsort(modality.long() * N + torch.arange(N, device=scores.device), dim=-1)
    s_sorted = torch.gather(scores, -1, order)
    m_sorted = torch.gather(modality.long(), -1, order)
    s_pad = torch.nn.functional.pad(s_sorted, (r, r))
    m_pad = torch.nn.functional.pad(m_sorted, (r, r), value=-1)  # -1 never equals a modality id
    s_win = s_pad.unfold(-1, kernel, 1)  # [..., N, kernel]
    same = m_pad.unfold(-1, kernel, 1) == m_sorted[..., None]
    if mode == "max":
        pooled = torch.where(same, s_win, torch.full_like(s_win, float("-inf"))).amax(dim=-1)
    else:
        pooled = torch.where(same, s_win, torch.zeros_like(s_win)).sum(dim=-1) / same.sum(dim=-1).to(scores.dtype)
    return torch.empty_like(scores).scatter_(-1, order, pooled)


def compact_kv_(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    keep: torch.Tensor,
    keep_lengths: torch.Tensor,
    *,
    merge_target: torch.Tensor | None = None,
    merge_weight: torch.Tensor | None = None,
    token_data=(),
    token_sums=(),
) -> None:
    """Apply a compaction plan in place, one (sequence, kv head) at a time, in float64.

    Args:
        k_cache, v_cache: ``[B, Hkv, C, D]``, updated in place.
        lengths: ``[B, Hkv]`` int, valid tokens per (b, h); set to ``keep_lengths`` on return.
        keep: ``[B, Hkv, K]`` int; ``keep[b, h, :keep_lengths[b, h]]`` are strictly increasing kept token indices.
        keep_lengths: ``[B, Hkv]`` int, slots kept per (b, h).
        merge_target: optional ``[B, Hkv, C]`` int: for an evicted token t < lengths, the slot it merges into or -1.
        merge_weight: ``[B, Hkv, C]`` float, > 0 for kept and merged tokens; required with ``merge_target``.
        token_data: ``[B, Hkv, C]`` tensors gathered from the kept token: ``X[j] = X_old[keep[j]]``.
        token_sums: ``[B, Hkv, C]`` float tensors summed over the merge set: ``X[j] = sum_{t in S_j} X_old[t]``.

    With ``S_j = {keep[j]} | {evicted t : merge_target[t] == j}``, slot j < keep_lengths becomes
    ``k[j] = sum_{t in S_j} w_t k_old[t] / sum_{t in S_j} w_t`` (likewise v); without ``merge_target`` this is
    exactly ``k_old[keep[j]]``. Entries at or beyond the new lengths are left as they were.
    """
    B, Hkv = lengths.shape
    device = k_cache.device
    for b in range(B):
        for h in range(Hkv):
            length, n = int(lengths[b, h]), int(keep_lengths[b, h])
            kept = keep[b, h, :n].long()
            # slot[t]: the slot old token t lands in, -1 when it is dropped.
            slot = torch.full((length,), -1, dtype=torch.long, device=device)
            if merge_target is not None:
                slot = merge_target[b, h, :length].long().clone()
            slot[kept] = torch.arange(n, device=device)
            members = (slot[None, :] == torch.arange(n, device=device)[:, None]).double()  # [n, length]: t in S_j
            for cache in (k_cache, v_cache):
                old = cache[b, h, :length].double()
                if merge_target is None:
                    new = old[kept]
                else:
                    weights = members * merge_weight[b, h, :length].double()[None, :]
                    new = (weights @ old) / weights.sum(dim=1, keepdim=True)
                cache[b, h, :n] = new.to(cache.dtype)
            for x in token_data:
                x[b, h, :n] = x[b, h, kept].clone()
            for x in token_sums:
                x[b, h, :n] = (members @ x[b, h, :length].double()).to(x.dtype)
    lengths.copy_(keep_lengths)


def append_token_(k_cache, v_cache, lengths, k_new, v_new, *, position, next_position, modality, time, spatial,
                  token_mass, multiplicity, modality_new=None, time_new=None, spatial_new=None) -> None:
    """Write one token per (b, kv head) at slot ``lengths[b, h]`` and advance ``lengths`` and ``next_position``.

    Args as :func:`acckv_triton.ops.append_token.append_token_`: the new slot gets K/V, ``position =
    next_position``, ``modality = modality_new`` or 0, ``time = time_new`` or the position, ``spatial =
    spatial_new`` or (-1, -1), ``token_mass = 0`` and ``multiplicity = 1``. A row at capacity, or with a negative
    length, writes nothing (and still advances).
    Written with device-side indices only (no sync, no allocation beyond views), so the torch backend runs it too.
    """
    B, Hkv, C, D = k_cache.shape
    slot = lengths.long().clamp(min=0, max=max(C - 1, 0)).unsqueeze(-1)  # [B, Hkv, 1]
    room = ((lengths >= 0) & (lengths < C)).unsqueeze(-1)  # a full row writes nothing: its old value is written back
    for buf, new in ((k_cache, k_new), (v_cache, v_new)):
        index = slot.unsqueeze(-1).expand(B, Hkv, 1, D)
        buf.scatter_(2, index, torch.where(room.unsqueeze(-1), new, buf.gather(2, index)))
    for buf, new, default in ((position, next_position, None), (modality, modality_new, 0),
                              (time, time_new, next_position), (token_mass, None, 0.0), (multiplicity, None, 1.0)):
        value = new if new is not None else default
        if not isinstance(value, torch.Tensor):
            value = torch.full((B, Hkv, 1), value, dtype=buf.dtype, device=buf.device)
        buf.scatter_(2, slot, torch.where(room, value.expand(B, Hkv, 1).to(buf.dtype), buf.gather(2, slot)))
    index = slot.unsqueeze(-1).expand(B, Hkv, 1, 2)
    value = spatial_new if spatial_new is not None else torch.full((B, Hkv, 1, 2), -1, dtype=spatial.dtype,
                                                                   device=spatial.device)
    spatial.scatter_(2, index, torch.where(room.unsqueeze(-1), value.expand(B, Hkv, 1, 2), spatial.gather(2, index)))
    lengths.add_(1)
    next_position.add_(1)


class ChunkAttention(NamedTuple):
    """Result of a chunk's attention (:func:`chunk_attention`)."""

    out: torch.Tensor  # [B, Hq, T, D], q's dtype
    lse: torch.Tensor  # [B, Hq, T] float32, natural log; -inf for a row that sees no key
    stored_mass: torch.Tensor  # [B, Hkv, S] float32: the observation window's mass on each stored slot
    chunk_mass: torch.Tensor  # [B, Hkv, T] float32: the window's mass on each chunk token


def chunk_attention(q, k_cache, v_cache, lengths, k_new, v_new, *, scale=None, multiplicity=None, key_valid=None,
                    window: int = 32, reduce: str = "sum", decay: float = 1.0) -> ChunkAttention:
    """T chunk queries over a ragged compressed cache plus the chunk itself (causal), in float64.

    Args as :func:`acckv_triton.ops.chunk_attention.chunk_attention`: ``q [B, Hq, T, D]``; stored ``k_cache, v_cache
    [B, Hkv, S, D]`` with ``lengths [B, Hkv]`` valid slots, each weighing ``multiplicity`` tokens (``+ log n`` on its
    logit); the chunk's ``k_new, v_new [B, Hkv, T, D]``, chunk query i seeing chunk keys ``u <= i`` with
    ``key_valid[b, u]``. The masses sum the probabilities of the last ``min(window, T)`` queries over them and the G
    query heads of each kv head, chunk query i weighing ``decay ** (T - 1 - i)`` (``reduce="max"``: the largest of
    those probabilities, unweighted).
    """
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    stored = torch.arange(S, device=q.device) < lengths.long()[..., None]  # [B, Hkv, S]
    new_ok = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    # slots past a length and padding keys may hold anything (NaN included): they must not reach the result
    keys = torch.cat([torch.where(stored[..., None], k_cache.double(), 0.0),
                      torch.where(new_ok[:, None, :, None], k_new.double(), 0.0)], dim=2)
    values = torch.cat([torch.where(stored[..., None], v_cache.double(), 0.0),
                        torch.where(new_ok[:, None, :, None], v_new.double(), 0.0)], dim=2)
    bias_old = torch.zeros(B, Hkv, S, dtype=torch.float64, device=q.device)
    if multiplicity is not None:
        bias_old = torch.where(stored, multiplicity.double(), 1.0).log()
    bias_old = bias_old.masked_fill(~stored, float("-inf"))
    causal = torch.arange(T, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None]  # [i, u]
    bias_new = torch.where(causal[None, None] & new_ok[:, None, None, :], 0.0, float("-inf")).double()  # [B,1,T,T]
    logits = torch.einsum("bhtd,bhsd->bhts", q.double(), keys.repeat_interleave(G, dim=1)) * scale
    bias = torch.cat([bias_old.repeat_interleave(G, dim=1)[:, :, None, :].expand(B, Hq, T, S),
                      bias_new.expand(B, Hq, T, T)], dim=-1)
    logits = logits + bias
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(logits - lse[..., None]), 0.0)
    out = torch.einsum("bhts,bhsd->bhtd", p, values.repeat_interleave(G, dim=1))
    W = min(window, T)
    if reduce == "sum":  # query i weighs decay^(T - 1 - i)
        p = p * query_weights(T, decay, q.device)[None, None, :, None]
    rows = p[:, :, T - W:].reshape(B, Hkv, G * W, S + T)
    if reduce == "max":  # no window row (T = 0): no probability, 0 like the sum
        mass = rows.amax(dim=2) if rows.shape[2] else rows.new_zeros(B, Hkv, S + T)
    else:
        mass = rows.sum(dim=2)
    return ChunkAttention(out.to(q.dtype), lse.float(), mass[..., :S].float(), mass[..., S:].float())


class ObservedAttention(NamedTuple):
    """Result of a prompt's observed attention (:func:`observed_attention`)."""

    out: torch.Tensor | None  # [B, Hq, T, D] in q's dtype; None when no values were given
    lse: torch.Tensor  # [B, Hq, T] float32, natural log; -inf for a row that sees no key
    key_mass: torch.Tensor  # [B, Hkv, T] float32: the mass each key receives from every query (0 at padding)


def query_weights(T: int, decay: float, device=None) -> torch.Tensor:
    """``[T]`` float64 recency weights of T queries: query i weighs ``decay ** (T - 1 - i)``, the last one 1."""
    return torch.tensor(float(decay), dtype=torch.float64, device=device) ** torch.arange(
        T - 1, -1, -1, dtype=torch.float64, device=device)


def query_weight_sum(n: torch.Tensor, decay: float) -> torch.Tensor:
    """The total weight of the last ``n`` queries when a query of age a weighs ``decay ** a``:
    ``sum_{a < n} decay ** a`` (``n`` itself for decay 1), what divides a token's recency-weighted mass into its
    weighted mean."""
    if decay == 1.0:
        return n
    log_decay = math.log(decay)
    return torch.expm1(n * log_decay) / math.expm1(log_decay)


def observed_attention(q, k, v=None, *, scale=None, key_start=None, decay: float = 1.0) -> ObservedAttention:
    """Causal GQA self-attention over a prompt and the mass each key receives from all of it, in float64.

    Query ``i`` sees the keys ``key_start[b] <= t <= i`` (``key_start`` is the left padding; a query inside it sees
    nothing). Args as :func:`acckv_triton.ops.observed_attention.observed_attention`: ``q [B, Hq, T, D]``, ``k, v
    [B, Hkv, T, D]`` (query head ``hq`` reads kv head ``hq // G``), ``key_start [B]`` int. ``key_mass[b, h, t]`` sums
    the probability of key t over every query i and the G query heads of kv head h, query i weighing
    ``decay ** (T - 1 - i)`` (:func:`query_weights`; 1: every query alike).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    start = key_start.long() if key_start is not None else torch.zeros(B, dtype=torch.long, device=q.device)
    t = torch.arange(T, device=q.device)
    key_ok = t[None, :] >= start[:, None]  # [B, T]: padding keys may hold anything (NaN included)
    visible = (t[None, :] <= t[:, None])[None] & key_ok[:, None, :]  # [B, i, t]
    keys = torch.where(key_ok[:, None, :, None], k.double(), 0.0).repeat_interleave(G, dim=1)  # [B, Hq, T, D]
    logits = torch.einsum("bhid,bhtd->bhit", q.double(), keys) * scale
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hq, T], -inf for a row that sees nothing
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(logits - lse[..., None]), 0.0)
    key_mass = (p * query_weights(T, decay, q.device)[:, None]).sum(dim=2).view(B, Hkv, G, T).sum(dim=2)
    out = None
    if v is not None:
        values = torch.where(key_ok[:, None, :, None], v.double(), 0.0).repeat_interleave(G, dim=1)
        out = torch.einsum("bhit,bhtd->bhid", p, values).to(q.dtype)
    return ObservedAttention(out, lse.float(), key_mass.float())
