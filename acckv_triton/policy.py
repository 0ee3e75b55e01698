"""The AccKV decisions, and the baselines, as one pipeline: scores -> focusing -> redistribution -> calibration -> plan.

A policy never touches a kernel: it reads one layer's token evidence (:class:`LayerTokens`: scores, modality, time,
spatial ids, keys) and emits a :class:`~acckv_triton.plan.CompactionPlan` that the cache applies through
``compact_kv``. Every decision is a batched tensor operation over ``[B, Hkv, N]`` rows (sorts, scatters, cumulative
sums); nothing loops over tokens or rows in Python. docs/algorithm.md states exactly what runs, step by step.

Methods (``AccKVConfig.method``), all at the same budget per (layer, sequence, kv head):
    acckv      protected tokens, then per-modality budgets from the layer's attention shares (focusing), ranking
               relative to the modality mean (redistribution), merging of similar neighbours within a modality and
               time-bin alignment of the low-priority modality to the high-priority one (cross-calibration)
    snapkv     observation window + top-k of pooled window scores (at a decode-time upkeep also the last W tokens,
               decoded since the prefill: the window SnapKV observes then; see recent_tokens)
    pyramidkv  snapkv with PyramidKV's layer schedule of budgets
    adakv      snapkv with Ada-KV's allocation of a layer's budget across its kv heads
    h2o        recent tokens + top-k of every prompt query's accumulated attention (no pooling)
    tova       top-k of the last query's attention averaged over the layer's heads (every head of a sequence keeps
               the same tokens, as TOVA's own code does), nothing protected
    streaming  sink tokens + the most recent tokens
    lookm      text first (and the window and the last W tokens, as snapkv), then top-k of pooled scores, then every
               evicted token merges into its nearest kept key
    kvzip      recent tokens + top-k of a reconstruction pass's evidence (each token's largest attention from the
               prompt fed again after itself, after KVzip; the cache and the integration run that pass)
    full       keep everything
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .config import AccKVConfig
from .modality import NUM_MODALITIES, Modality
from .plan import CompactionPlan
from .reference import pool_scores

__all__ = ["LayerTokens", "PolicyResult", "budget_tokens", "head_shared_scores", "plan_layer",
           "recent_tokens"]

_AV = (int(Modality.AUDIO), int(Modality.VIDEO), int(Modality.IMAGE))
_EPS = 1e-12
_WINDOWED_BASELINES = ("snapkv", "pyramidkv", "adakv", "lookm")
POOLED_METHODS = ("acckv", *_WINDOWED_BASELINES)
"""Methods whose window scores are pooled along each modality's tokens (with window evidence)."""


def recent_tokens(cfg: AccKVConfig) -> int:
    """How many of the newest tokens a method keeps by position (below the window in priority): R for AccKV, H2O
    and KVzip; W for the windowed baselines (SnapKV, PyramidKV, Ada-KV, LOOK-M), whose newest W tokens are their
    window at the end of a prefill and, at a decode-time upkeep, the tokens decoded since: the window SnapKV
    observes then (the latest prefill's window stays protected too)."""
    return cfg.window if cfg.method in _WINDOWED_BASELINES else cfg.recent


def recent_cap(cfg: AccKVConfig, target):
    """The recent tokens a row protects: :func:`recent_tokens`, and for AccKV at most half the row's ``target``
    (``[B, Hkv]``; an int or a tensor) so that at a budget of a few dozen tokens (a short chat prompt) the evidence
    still chooses half of what is kept, the sinks among it, rather than the newest tokens taking it all."""
    R = recent_tokens(cfg)
    if cfg.method != "acckv":  # the baselines as their papers define them
        return R
    return torch.clamp(target // 2, max=R)[..., None] if isinstance(target, torch.Tensor) else min(R, target // 2)


@dataclass
class LayerTokens:
    """One layer's evidence about its cached tokens, one row per (sequence, kv head).

    Attributes:
        scores: ``[B, Hkv, N]`` float, >= 0: window scores after prefill, accumulated decode mass later.
        modality: ``[B, Hkv, N]`` uint8 :class:`Modality` ids.
        lengths: ``[B, Hkv]`` int32 valid tokens per row (slots are in original order).
        time: ``[B, Hkv, N]`` int32 TMRoPE time index (needed by cross-alignment).
        keys: ``[B, Hkv, N, D]`` cached keys (needed by merging).
        spatial: ``[B, Hkv, N, 2]`` int32 (h, w) of video/image patches, -1 elsewhere (needed by video merging).
        window: ``[B, Hkv, N]`` bool, the observation window; default: the last ``cfg.window`` valid tokens.
        valid: ``[B, Hkv, N]`` bool, extra validity (e.g. left padding); default: all slots below ``lengths``.
        position, window_range: ``[B, Hkv, N]`` int32 original positions and ``(start, end)``: the window is the
            tokens with ``start <= position < end`` (what the cache passes; ``window`` wins when both are given).
    """

    scores: torch.Tensor
    modality: torch.Tensor
    lengths: torch.Tensor
    time: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    spatial: torch.Tensor | None = None
    window: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    position: torch.Tensor | None = None
    window_range: tuple[int, int] | None = None


class PolicyResult(NamedTuple):
    """A plan plus what the decision saw, for the bench: shares per modality and the priority modality."""

    plan: CompactionPlan
    rho: torch.Tensor  # [B, NUM_MODALITIES] float32 focusing shares of the AV modalities (0 elsewhere)
    priority: torch.Tensor  # [B] int64 high-priority modality P (-1 when fewer than two of audio/video)
    kept_per_modality: torch.Tensor  # [B, Hkv, NUM_MODALITIES] int64 slots kept
    merged: torch.Tensor  # [B, Hkv] int64 evicted tokens merged into a kept slot


def check_layer(layer, num_layers) -> None:
    """Raise unless ``layer`` and ``num_layers`` are ints (not bools) with ``0 <= layer < num_layers``: TypeError
    naming the one of a wrong type, ValueError naming ``num_layers`` below 1, else ``layer`` outside the range."""
    for name, x in (("layer", layer), ("num_layers", num_layers)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be an int in [0, num_layers) = [0, {num_layers}), got {layer}")


def budget_tokens(cfg: AccKVConfig, n_valid, layer: int, num_layers: int):
    """Tokens kept per row for ``layer``: the budget applied to each row's valid count ``n_valid``.

    ``n_valid`` is a tensor (the result has its dtype) or a host int (the result is an int, with the same
    double-precision arithmetic: the host's bound on every row's target, no device read). With pyramid layer budgets
    (``layer_budgets="pyramid"`` or ``method="pyramidkv"``) the unprotected part of the budget follows PyramidKV's
    arithmetic schedule over depth (:func:`_pyramid`); the mean over layers stays the uniform budget.

    Raises TypeError for an ``n_valid``, ``layer`` or ``num_layers`` of the wrong type, ValueError for
    ``num_layers < 1`` or ``layer`` outside ``[0, num_layers)`` (:func:`check_layer`).
    """
    if type(layer) is not int or type(num_layers) is not int or not 0 <= layer < num_layers:  # a decode step's
        check_layer(layer, num_layers)  # host bound comes here: the full check only where the fast one fails
    host = isinstance(n_valid, int) and not isinstance(n_valid, bool)
    if not host and not (isinstance(n_valid, torch.Tensor) and not n_valid.dtype.is_floating_point):
        raise TypeError(f"n_valid must be an int or an integer tensor of valid counts, got "
                        f"{n_valid.dtype if isinstance(n_valid, torch.Tensor) else type(n_valid).__name__}")
    if cfg.is_full:
        return n_valid if host else n_valid.clone()
    n = float(n_valid) if host else n_valid.double()
    if isinstance(cfg.budget, float):
        base = math.ceil(cfg.budget * n) if host else torch.ceil(cfg.budget * n)
    else:
        base = float(cfg.budget) if host else torch.full_like(n, float(cfg.budget))
    if cfg.layer_budgets == "pyramid" or cfg.method == "pyramidkv":
        base = _pyramid(cfg, base, n, layer, num_layers)
    return int(min(base, n)) if host else torch.minimum(base, n).to(n_valid.dtype)


def head_shared_scores(x: LayerTokens) -> torch.Tensor:
    """``[B, Hkv, N]`` float32: each slot's score averaged over the kv heads of its sequence, the same in every head.

    TOVA's selection (its paper and code average the last query's attention over the heads of a layer): every head
    then keeps the same tokens. Slots past a row's length or marked invalid count 0; NaN counts 0. Meaningful when
    the heads of a sequence hold the same tokens slot for slot, which a head-shared selection preserves.
    """
    s = x.scores.float()
    B, H, N = s.shape
    valid = torch.arange(N, device=s.device) < x.lengths[..., None].long()
    if x.valid is not None:
        valid = valid & x.valid
    s = torch.where(valid, torch.nan_to_num(s, nan=0.0).clamp(min=0.0), 0.0)
    return s.mean(1, keepdim=True).expand(B, H, N)


def _pyramid(cfg: AccKVConfig, base, n, layer: int, num_layers: int):
    """PyramidKV's schedule: the W window tokens are kept at every layer; the rest, b = base - W per layer on
    average, falls linearly from ``2b - b/β`` at layer 0 to ``b/β`` at the last layer. When layer 0 would exceed
    the row (n - W), its share is capped there and the last layer's raised so that the total stays L·b. Works on
    host floats and on float64 tensors with the same operations (same results bit for bit)."""
    if num_layers <= 1:
        return base
    host = not isinstance(base, torch.Tensor)
    at_least = (lambda x, lo: max(x, lo)) if host else (lambda x, lo: torch.clamp(x, min=lo))
    at_most = (lambda x, hi: min(x, hi)) if host else (lambda x, hi: torch.minimum(x, hi) if isinstance(hi, torch.Tensor)
                                                       else torch.clamp(x, max=hi))
    w = float(cfg.window)
    b = at_least(base - w, 0.0)
    top = b / cfg.pyramid_beta
    bottom = at_most(2.0 * b - top, at_least(n - w, 0.0))
    top = 2.0 * b - bottom
    layer_b = bottom - (bottom - top) * (layer / (num_layers - 1))
    out = at_most(base, w) + layer_b
    return math.ceil(out) if host else torch.ceil(out)


def _topk_mask(score: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per row, the ``k[row]`` candidates with the highest score (ties: earlier token first)."""
    masked = torch.where(candidates, score, torch.full_like(score, float("-inf")))
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(score.shape[-1], device=score.device)
                                             .expand_as(order).contiguous())
    return candidates & (rank < k[..., None])


def _one_hot(mod: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``[..., N]`` modality ids in ``[0, NUM_MODALITIES)`` -> ``[..., N, NUM_MODALITIES]`` indicators.

    Unlike ``F.one_hot``, no host-side range check: that check reads two scalars back, a sync per call on a GPU
    (16 of the 21 syncs per layer before this helper).
    """
    return (mod[..., None] == torch.arange(NUM_MODALITIES, device=mod.device)).to(dtype)


def _topk_per_modality(score: torch.Tensor, budgets: torch.Tensor, candidates: torch.Tensor,
                       mod: torch.Tensor) -> torch.Tensor:
    """Per row, the ``budgets[row, m]`` best candidates of each modality m, with one sort for all modalities.

    Same choice as :func:`_topk_mask` run once per modality (ties: earlier token first).
    """
    masked = torch.where(candidates, score, torch.full_like(score, float("-inf")))
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)
    mod_sorted, cand_sorted = torch.gather(mod, -1, order), torch.gather(candidates, -1, order)
    onehot = _one_hot(mod_sorted) * cand_sorted[..., None]
    rank_sorted = torch.gather(torch.cumsum(onehot, dim=-2), -1, mod_sorted[..., None])[..., 0] - 1
    take_sorted = cand_sorted & (rank_sorted < torch.gather(budgets, -1, mod_sorted))
    return torch.zeros_like(candidates).scatter_(-1, order, take_sorted)


def _segment_sum(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per row, ``out[..., j] = sum of values[..., t] over t with segment[..., t] == j``, in float64.

    Float64 keeps the sums exact to well below a float32 step whatever the order of the additions, so the fused
    policy (:mod:`acckv_triton.fused_policy`, which adds in another order) reaches the same float32 values.
    """
    out = torch.zeros(*segment.shape[:-1], num_segments, dtype=torch.float64, device=segment.device)
    return out.scatter_add_(-1, segment, values.double())


def _per_modality_sum(x: torch.Tensor, mod: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, N]`` -> ``[B, M]`` float64: sum of ``x`` over heads and masked tokens of each modality (ids
    outside ``[0, M)`` count as the nearest end). Float64, so the order of the additions never shows in float32."""
    B = x.shape[0]
    out = torch.zeros(B, NUM_MODALITIES, dtype=torch.float64, device=x.device)
    return out.scatter_add_(1, mod.long().clamp(0, NUM_MODALITIES - 1).reshape(B, -1),
                            (x.double() * mask).reshape(B, -1))


def _merge_groups(cfg: AccKVConfig, x: LayerTokens, rank_score: torch.Tensor, cand: torch.Tensor):
    """Step 3a: group similar neighbours inside a modality. Returns ``rep [B,Hkv,N]`` (the index of each token's
    group representative, itself for singletons) for candidate audio and video tokens, the number of links found
    ``[B,Hkv]`` (candidates that link to their predecessor, before the ``max_group`` cuts) and of AV candidates.

    Audio tokens link to the previous candidate audio token in time order, video patches to the same (h, w) patch
    of the previous frame; a link holds when the keys' cosine reaches θ. Chains are cut every ``max_group`` tokens.
    The representative is the member with the highest rank score.
    """
    B, H, N = rank_score.shape
    dev = rank_score.device
    ar = torch.arange(N, device=dev).expand(B, H, N)
    mod = x.modality.long()
    audio = cand & (mod == Modality.AUDIO)
    video = cand & (mod == Modality.VIDEO)
    if x.spatial is not None:
        hw = (x.spatial[..., 0].long().clamp(0, 4095) << 12) | x.spatial[..., 1].long().clamp(0, 4095)
    else:
        hw = torch.zeros_like(mod)
    # one sort brings each chain together: class (audio, video, rest), then the video patch, then token order
    cls = torch.where(audio, 0, torch.where(video, 1, 2))
    key = (cls << 58) | (torch.where(video, hw, 0) << 32) | ar
    order = torch.argsort(key, dim=-1)
    kn = torch.nn.functional.normalize(x.keys.double(), dim=-1)  # float64: theta comparisons do not flip
    kn_sorted = torch.gather(kn, 2, order[..., None].expand(-1, -1, -1, kn.shape[-1]))
    cos = (kn_sorted[:, :, 1:] * kn_sorted[:, :, :-1]).sum(-1)
    cls_s, hw_s = torch.gather(cls, 2, order), torch.gather(hw, 2, order)
    theta = torch.where(cls_s[:, :, 1:] == 0, cfg.theta_audio, cfg.theta_video)
    link = (cls_s[:, :, 1:] == cls_s[:, :, :-1]) & (cls_s[:, :, 1:] < 2) & (hw_s[:, :, 1:] == hw_s[:, :, :-1]) \
        & (cos >= theta)
    brk = torch.cat([torch.ones_like(link[:, :, :1]), ~link], dim=-1)  # [B,H,N] in sorted order
    pos = torch.arange(N, device=dev).expand(B, H, N)
    start = torch.cummax(torch.where(brk, pos, torch.zeros_like(pos)), dim=-1).values
    brk = brk | ((pos - start) % cfg.max_group == 0)
    gid = torch.cumsum(brk.long(), dim=-1) - 1  # group id per sorted position, < N
    # representative: the member with the highest rank score (first such in sorted order)
    s_sorted = torch.gather(rank_score, 2, order)
    gmax = torch.full_like(s_sorted, float("-inf")).scatter_reduce(2, gid, s_sorted, "amax")
    is_best = s_sorted >= torch.gather(gmax, 2, gid)
    best_pos = torch.full_like(gid, N).scatter_reduce(2, gid, torch.where(is_best, pos, N), "amin")
    rep_sorted = torch.gather(order, 2, torch.gather(best_pos, 2, gid))
    rep = torch.empty_like(order).scatter_(2, order, rep_sorted)
    grouped = audio | video
    return torch.where(grouped, rep, ar), link.sum(-1), grouped.sum(-1)


def _alignment_boost(cfg, time, P_mask, P_kept_mass, L_mask):
    """Step 3b: ``(1 + λ (n_bins · I_P(bin) − 1))₊`` for the L tokens, from P's kept score mass per time bin.

    Bins count from the row's first P or L token; a row has at most N of them (later times share the last bin),
    so no size is read back from the device.
    """
    B, H, N = time.shape
    t = time.long()
    t0 = torch.where(P_mask | L_mask, t, torch.full_like(t, 2**62)).amin(dim=-1, keepdim=True)
    bins = ((t - t0).clamp(min=0) // cfg.time_bin).clamp(max=max(N - 1, 0))
    mass = _segment_sum(P_kept_mass, bins, N)
    total = mass.sum(-1, keepdim=True)
    share = torch.where(total > 0, mass / total.clamp(min=_EPS), torch.zeros_like(mass))
    has_p = torch.zeros(B, H, N + 1, device=time.device, dtype=torch.bool)  # the spare bin takes non-P tokens
    has_p.scatter_(2, torch.where(P_mask, bins, N), True)
    n_bins = has_p[..., :N].sum(-1, keepdim=True).clamp(min=1).double()
    factor = (1.0 + cfg.align_lambda * (n_bins * torch.gather(share, 2, bins) - 1.0)).clamp(min=0.0)
    return torch.where(L_mask & (total > 0), factor, torch.ones_like(factor)).float()


def plan_layer(cfg: AccKVConfig, x: LayerTokens, layer: int = 0, num_layers: int = 1,
               target: torch.Tensor | None = None, max_per_row: int | None = None, check: bool = True) -> PolicyResult:
    """Decide which tokens of one layer to keep and where evicted tokens merge.

    Args:
        cfg: method, switches and constants.
        x: the layer's token evidence (see :class:`LayerTokens`).
        layer, num_layers: position in depth (pyramid budgets, depth prior).
        target: ``[B, Hkv]`` slots to keep per row; default :func:`budget_tokens` of the valid counts.
        max_per_row: with adaptive head budgets (``cfg.adaptive_heads``), the most slots one row may keep (the
            storage's room); None: no cap beyond the row's valid tokens.
        check: validate the modality ids (one host sync) and raise ``ValueError`` for one out of range; False
            (the cache, whose append checked them) reads such an id as text, as the fused policy's kernels do.

    Returns:
        :class:`PolicyResult` whose plan keeps exactly ``min(target, valid)`` slots per row (fewer only when
        merging leaves fewer candidates; with adaptive head budgets the rows of a sequence share the sum of their
        targets instead, see :func:`_adaptive_targets`), never an invalid slot, and merges only within a modality (except
        ``lookm``, which merges into the nearest kept key as LOOK-M does).
    """
    s_raw = head_shared_scores(x) if cfg.method == "tova" else x.scores.float()
    B, H, N = s_raw.shape
    dev = s_raw.device
    ar = torch.arange(N, device=dev).expand(B, H, N)
    valid = ar < x.lengths[..., None].long()
    if x.valid is not None:
        valid = valid & x.valid
    s_raw = torch.where(valid, torch.nan_to_num(s_raw, nan=0.0).clamp(min=0.0), torch.zeros_like(s_raw))
    mod = x.modality.long()
    in_range = (mod >= 0) & (mod < NUM_MODALITIES)
    if check and bool((valid & ~in_range).any()):
        raise ValueError(f"x.modality must hold Modality ids in [0, {NUM_MODALITIES}) at every valid token")
    # slots past lengths / padding may hold leftover memory, unchecked ids anything: never index with either
    mod = torch.where(valid & in_range, mod, 0)
    n_valid = valid.sum(-1)
    if target is None:
        target = budget_tokens(cfg, n_valid, layer, num_layers)
    requested = target.long()  # Ada-KV shares what the rows asked for, also what a short row cannot use
    target = torch.minimum(requested, n_valid)
    rho = torch.zeros(B, NUM_MODALITIES, device=dev, dtype=torch.float64)
    priority = torch.full((B,), -1, dtype=torch.long, device=dev)

    # ---- Step 0: pooled rank scores (never across modalities) ----
    method = cfg.method
    s_rank = s_raw
    if method in POOLED_METHODS and cfg.pool_kernel > 1 and cfg.windowed:
        pooled = pool_scores(s_raw, torch.where(valid, mod, 255), cfg.pool_kernel, cfg.pool_mode)
        if method == "acckv" and cfg.pool_lift < 1.0:  # a peak stays above the neighbourhood it lifts
            pooled = torch.maximum(s_raw, cfg.pool_lift * pooled)
        s_rank = torch.where(valid, pooled, torch.zeros_like(pooled))

    # ---- protected tokens, by priority: sinks > window > recent > text ----
    rank_valid = torch.cumsum(valid.long(), -1) - 1
    sink = valid & (rank_valid < cfg.sink)
    if x.window is not None:
        window = x.window & valid
    elif x.position is not None and x.window_range is not None:
        window = valid & (x.position >= x.window_range[0]) & (x.position < x.window_range[1])
    else:
        window = valid & (rank_valid >= n_valid[..., None] - cfg.window)
    recent = valid & (rank_valid >= n_valid[..., None] - recent_cap(cfg, target))
    if not cfg.windowed:  # every-query / last-query evidence: the window is ranked like any token
        window = torch.zeros_like(window)
    has_av = (valid & (mod != Modality.TEXT)).flatten(1).any(-1)[:, None, None]  # [B,1,1]
    text = valid & (mod == Modality.TEXT) & has_av
    none = torch.zeros_like(valid)
    protect = {
        "acckv": (sink, window, recent, text if cfg.protect_text else none),
        "snapkv": (none, window, recent, none),
        "pyramidkv": (none, window, recent, none),
        "adakv": (none, window, recent, none),
        "h2o": (none, none, recent, none),
        "kvzip": (none, none, recent, none),
        "tova": (none, none, none, none),
        "streaming": (sink, none, none, none),
        "lookm": (none, window, recent, text),
        "full": (valid, none, none, none),
    }[method]
    # sinks (not on AccKV's every-query mean) and recent tokens (not without protect_positions) may rank by their
    # evidence (the sinks stay out of A below)
    protect = (protect[0] if cfg.protects_sinks else none, protect[1],
               protect[2] if cfg.protect_positions else none, protect[3])
    level = torch.stack([(4 - i) * p.float() for i, p in enumerate(protect)]).amax(0) * valid  # 4 sink .. 1 text
    protected = level > 0
    kept = _topk_mask(level * N + rank_valid.float(), target, protected)  # newest first within a level
    cand = valid & ~protected
    if cfg.adaptive_heads:  # Ada-KV: the layer's free budget goes where the evidence is, across kv heads
        target = _adaptive_targets(cfg, s_rank, cand, kept.sum(-1), requested, max_per_row)
    free = target - kept.sum(-1)

    if method == "streaming":
        kept |= _topk_mask(rank_valid.float(), free, cand)
        return _finish(kept, None, s_raw, mod, valid, rho, priority)
    if method != "acckv":  # full, snapkv, pyramidkv, h2o, tova, kvzip, lookm: one ranking by (pooled) score
        kept |= _topk_mask(s_rank, free, cand)
        merge_to = _nearest_kept(x.keys, kept, valid) if method == "lookm" else None
        return _finish(kept, merge_to, s_raw, mod, valid, rho, priority)

    # ---- AccKV ----
    # Step 2 (redistribution): scores relative to the modality mean; sinks and text left out of A
    a_mask = valid & ~sink & (mod != Modality.TEXT) if cfg.redistribution else valid
    A = _per_modality_sum(s_raw, mod, a_mask)  # [B, M]
    n_m = _per_modality_sum(torch.ones_like(s_raw), mod, valid)
    s_hat = s_rank
    if cfg.redistribution:
        mean = (A / n_m.clamp(min=1)).clamp(min=_EPS)  # [B, M] float64
        mean_all = _per_modality_sum(s_raw, mod, valid) / n_m.clamp(min=1)  # text keeps its own mean
        mean = torch.where(A > 0, mean, mean_all.clamp(min=_EPS))
        s_hat = (s_rank.double() / torch.gather(mean, 1, mod.flatten(1)).view(B, H, N)).float()
    if cfg.head_renorm:
        s_hat = (s_hat.double() / (s_hat.double() * valid).sum(-1, keepdim=True).clamp(min=_EPS)).float()

    content = _content_on_host(valid, mod)
    no_av = content is not None and not content & {int(Modality.AUDIO), int(Modality.VIDEO)}
    if content is not None and content <= {int(Modality.TEXT)}:  # text alone: one ranking by s_hat, nothing merges
        kept |= _topk_mask(s_hat, free, cand)
        merge_to = torch.full_like(ar, -1) if cfg.intra_merge else None
        return _finish(kept, merge_to, s_raw, mod, valid, rho, priority)

    # Step 3a (intra-modal integration): group reps carry their group's summed score
    rep = ar
    weak = torch.zeros(B, H, dtype=torch.bool, device=dev)
    if cfg.intra_merge and not no_av:
        if x.keys is None:
            raise ValueError("x.keys is required when cfg.intra_merge is on")
        rep, n_link, n_av = _merge_groups(cfg, x, s_hat, cand)
        # fallback: little redundancy (few AV candidates link to a neighbour) leaves nothing for the modality
        # budgets to trade for; those rows rank by their pooled scores alone, as one top-k
        weak = (n_av > 0) & (n_link.double() < cfg.redundancy_min * n_av.double())
        s_hat = torch.where(weak[..., None], s_rank, s_hat)
    if cfg.merge_frees_budget:
        is_rep = cand & (rep == ar)
        group_score = _segment_sum(torch.where(cand, s_hat, torch.zeros_like(s_hat)), rep, N).float()
        group_mass = _segment_sum(torch.where(cand, s_raw, torch.zeros_like(s_raw)), rep, N).float()
    else:
        is_rep, group_score, group_mass = cand, s_hat, s_raw

    # Step 1 (focusing): budget shares of the AV modalities present, from their attention mass
    # (float64 throughout: budgets are floors of shares, which must not depend on the order of a sum)
    av = torch.zeros(NUM_MODALITIES, dtype=torch.bool, device=dev)
    av[list(_AV)] = True
    present = (n_m > 0) & av
    A_av = torch.where(present, A.clamp(min=0) ** cfg.gamma, torch.zeros_like(A))
    rho = torch.where(present, A_av / A_av.sum(-1, keepdim=True).clamp(min=_EPS), torch.zeros_like(A))
    n_present = present.sum(-1, keepdim=True)
    rho = torch.where(present & (n_present > 1), rho.clamp(min=cfg.rho_min), rho)
    rho = rho / rho.sum(-1, keepdim=True).clamp(min=_EPS)
    audio_i, video_i = int(Modality.AUDIO), int(Modality.VIDEO)
    both = present[:, audio_i] & present[:, video_i]
    priority = torch.where(both, torch.where(rho[:, video_i] >= rho[:, audio_i], video_i, audio_i), -1)
    if cfg.video_from_layer is not None and layer >= cfg.video_from_layer:
        priority = torch.where(both, video_i, priority)
        lo, hi = torch.minimum(rho[:, audio_i], rho[:, video_i]), torch.maximum(rho[:, audio_i], rho[:, video_i])
        rho[:, audio_i], rho[:, video_i] = torch.where(both, lo, rho[:, audio_i]), torch.where(both, hi, rho[:, video_i])

    if cfg.focusing:
        # unprotected text (text-only prompts, or protect_text off) takes its raw mass share first
        cand_mass = _per_modality_sum(s_raw, mod, cand)
        text_mass, total_mass = cand_mass[:, int(Modality.TEXT)], cand_mass.sum(-1)
        text_share = torch.where(total_mass > 0, text_mass / total_mass.clamp(min=_EPS), torch.zeros_like(total_mass))
        share = rho * (1.0 - text_share[:, None])
        share[:, int(Modality.TEXT)] = torch.where(present.any(-1), text_share, torch.ones_like(text_share))
        budgets = torch.floor(share[:, None, :] * free[..., None].double()).long()  # [B, H, M]
        budgets = torch.where(weak[..., None], 0, budgets)  # the fallback rows: all by the leftover top-k
    else:
        budgets = torch.zeros(B, H, NUM_MODALITIES, dtype=torch.long, device=dev)

    # Step 3b + 4: P first, then the others, L last with scores calibrated on P's kept time bins
    P = priority[:, None, None]
    score = group_score.clone()
    tok_is_P = (mod == P) & (P >= 0)
    tok_is_L = (mod != P) & (P >= 0) & ((mod == audio_i) | (mod == video_i))
    steps = (("rest", ~tok_is_P & ~tok_is_L),) if no_av else \
        (("P", tok_is_P), ("rest", ~tok_is_P & ~tok_is_L), ("L", tok_is_L))  # no P or L tokens without AV
    for step, pick in steps:
        kept |= _topk_per_modality(score, budgets, is_rep & pick, mod)
        if step == "P" and cfg.cross_align and x.time is not None:
            P_mask, L_mask = valid & tok_is_P, valid & tok_is_L
            P_kept_mass = torch.where(kept & P_mask & is_rep, group_mass, torch.zeros_like(group_mass))
            score = score * _alignment_boost(cfg, x.time, P_mask, P_kept_mass, L_mask)  # 1 where no P or no L
    # leftover budget (rounding, modalities short of candidates, focusing off): best remaining, reps by group
    # score and unmerged members by their own score
    rest = target - kept.sum(-1)
    kept |= _topk_mask(torch.where(is_rep, score, s_hat), rest, cand & ~kept)

    merge_to = None
    if cfg.intra_merge and no_av:
        merge_to = torch.full_like(rep, -1)  # every group a singleton: nothing merges
    elif cfg.intra_merge:
        rep_kept = torch.gather(kept, 2, rep)
        merge_to = torch.where(cand & ~kept & rep_kept & (rep != ar), rep, torch.full_like(rep, -1))
    return _finish(kept, merge_to, s_raw, mod, valid, rho, priority)


def _content_on_host(valid: torch.Tensor, mod: torch.Tensor) -> frozenset | None:
    """The modality ids of the valid tokens, when the host can read them for free (on a CPU); None elsewhere.

    Rows with no audio or video have nothing to merge, no priority modality and nothing to align, and rows of text
    alone nothing to focus either: those steps of AccKV would return what they were given, so :func:`plan_layer`
    skips them (the same plan; 20 -> 4 ms at 1,536 tokens without AV; text alone then ranks once, part of the cut of
    a CPU upkeep from 379 to 211 torch ops in ``benchmarks/NOTES.md``). On an accelerator reading this back would
    be a host sync, so there it is None and every step runs.
    """
    if valid.device.type != "cpu":
        return None
    seen = (valid[..., None] & (mod[..., None] == torch.arange(NUM_MODALITIES))).flatten(0, -2).any(0)
    return frozenset(i for i, flag in enumerate(seen.tolist()) if flag)


def _adaptive_targets(cfg: AccKVConfig, score: torch.Tensor, cand: torch.Tensor, protected: torch.Tensor,
                      target: torch.Tensor, max_per_row: int | None) -> torch.Tensor:
    """Ada-KV's allocation: per-row targets ``[B, Hkv]`` whose sum over the kv heads of a sequence equals the sum
    of ``target`` (as far as candidates and ``max_per_row`` allow; a row shorter than its target gives the rest).

    Each row first gets ``floor(ada_floor · free)`` of its own free budget (free = target − protected); the rest
    of the sequence's free budget goes to the best remaining candidates of all its heads by ``score`` (window
    scores are probability mass over the same queries, so heads compare). ``max_per_row`` caps a row. The policy
    then runs per row with these targets, so for SnapKV the kept set is exactly the global top-k.
    """
    B, H, N = score.shape
    free = (target - protected).clamp(min=0)
    floor = torch.minimum(torch.floor(cfg.ada_floor * free.double()).long(), cand.sum(-1))
    cap = cand.sum(-1) if max_per_row is None else torch.minimum(cand.sum(-1), (max_per_row - protected).clamp(min=0))
    floor = torch.minimum(floor, cap)
    masked = torch.where(cand, score, torch.full_like(score, float("-inf")))
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=score.device).expand_as(order)
                                             .contiguous())
    # a candidate may go to the shared pool when its row's floor already took better ones and the cap has room
    pool = cand & (rank >= floor[..., None]) & (rank < cap[..., None])
    share = (free - floor).sum(-1)  # [B]: the free budget left to share
    flat = torch.where(pool, score, torch.full_like(score, float("-inf"))).reshape(B, H * N)
    won = _topk_mask(flat, share, pool.reshape(B, H * N)).view(B, H, N).sum(-1)
    return protected + floor + won


MERGE_BYTES = 256 * 2**20
"""LOOK-M's nearest-key search holds at most about this many bytes of similarities at a time, whatever B, H, N."""


def _nearest_kept(keys: torch.Tensor | None, kept: torch.Tensor, valid: torch.Tensor, max_bytes: int = MERGE_BYTES):
    """LOOK-M merging: each evicted valid token's nearest kept key by cosine (any modality), as a token index.

    Cosines in float64 (ties: the earliest kept token), ``[B, H, chunk, N]`` at a time with the chunk sized so that
    the similarities stay within ``max_bytes``.
    """
    if keys is None:
        raise ValueError("x.keys is required by method 'lookm'")
    kn = torch.nn.functional.normalize(keys.double(), dim=-1)
    B, H, N, D = kn.shape
    chunk = max(1, max_bytes // max(1, B * H * N * 8))
    out = torch.full((B, H, N), -1, dtype=torch.long, device=kn.device)
    for c0 in range(0, N, chunk):
        sim = torch.matmul(kn[:, :, c0:c0 + chunk], kn.transpose(-1, -2))
        sim = sim.masked_fill(~kept[:, :, None, :], float("-inf"))
        best = sim.argmax(-1)
        ok = torch.isfinite(sim.amax(-1)) & valid[:, :, c0:c0 + chunk] & ~kept[:, :, c0:c0 + chunk]
        out[:, :, c0:c0 + chunk] = torch.where(ok, best, -1)
    return out


def _finish(kept, merge_to, s_raw, mod, valid, rho, priority) -> PolicyResult:
    """Turn a kept mask and per-token merge destinations (token indices, -1 = drop) into a CompactionPlan."""
    B, H, N = kept.shape
    kept = kept & valid
    keep_lengths = kept.sum(-1)
    K = max(1, int(keep_lengths.max())) if kept.numel() else 1
    ar = torch.arange(N, device=kept.device).expand(B, H, N)
    keep = torch.sort(torch.where(kept, ar, N), dim=-1).values[..., :K]
    keep = torch.where(keep < N, keep, 0).to(torch.int32)
    merge_target = merge_weight = None
    merged = torch.zeros(B, H, dtype=torch.long, device=kept.device)
    if merge_to is not None:
        slot = torch.cumsum(kept.long(), -1) - 1
        target_slot = torch.gather(slot, 2, merge_to.clamp(min=0))
        merging = (merge_to >= 0) & valid & ~kept
        merge_target = torch.where(merging, target_slot, -1).to(torch.int32)
        merge_weight = s_raw.clamp(min=1e-6).float()
        merged = merging.sum(-1)
    kept_per_mod = _one_hot(mod.clamp(0, NUM_MODALITIES - 1))
    kept_per_mod = (kept_per_mod * kept[..., None]).sum(2)
    plan = CompactionPlan(keep, keep_lengths.to(torch.int32), merge_target, merge_weight)
    return PolicyResult(plan, rho.float(), priority, kept_per_mod, merged)
