"""Synthetic audio-video KV traces laid out as Qwen2.5-Omni lays them out, and fidelity metrics for compressed caches.

No model is downloaded: :func:`generate_av_workload` draws keys, values and queries from a seeded
``torch.Generator`` with a planted structure, so tests and the bench can compare compression methods at equal
budgets on inputs whose important tokens are known.

Layout (one sequence; every batch element shares it, with its own random content)::

    [text prefix: P tokens, the first S are attention sinks]
    [chunk 0: frame 0 (h*w video patches, row-major), frame 1, ..., then the chunk's audio tokens (25 per second)]
    [chunk 1: ...] ... [chunk C-1: ...]
    [text question: W tokens = the observation window]

Per-token metadata follows TMRoPE: ``time`` is the temporal position id, 25 units per second shared by audio and
video (the AV block starts at P; the audio token j of chunk c sits at ``P + 50c + j``, frame f of chunk c at
``P + 50c + f * 50 / frames_per_chunk``); text carries its 1-D position (the question continues after the largest
AV time). ``spatial`` holds (row, col) of video patches and -1 elsewhere. Special begin/end marker tokens are folded
into the text.

How the structure is planted (per layer, exactly, because every component lives in its own orthogonal direction of
key space and logits are ``scale * q . k`` with ``scale = D ** -0.5``): each query's logit on token t is
``bias(layer, head, modality(t)) + sink_logit * [t is a sink] + event boosts + content noise``. The content noise
has standard deviation ``content_logit_std``; key content follows an AR(1) across consecutive frames of the same
patch (``video_redundancy``) and across consecutive audio tokens (``audio_smoothness``), so redundant tokens have
high key cosine. The video bias rises and the audio bias falls linearly with depth (observation O1 of ACCKV.md).
Each planted event is a short audio moment plus a spatial region of the video frame(s) covering it in time; decode
query j targets event ``j % num_events`` with a strong boost, and the window (question) queries weakly boost every
event. Values share the content structure and carry a per-event signature, so losing an event shows in the
attention output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from . import reference
from .modality import Modality

__all__ = [
    "AVWorkload",
    "AVWorkloadConfig",
    "LayerTrace",
    "attention_mass_retained",
    "attention_output_error",
    "covered_tokens",
    "decode_token_mass",
    "gather_kept",
    "generate_av_workload",
    "salient_recall",
]

TIME_UNITS_PER_SECOND = 25
"""TMRoPE temporal resolution of Qwen2.5-Omni: audio and video share this time axis."""


@dataclass(frozen=True)
class AVWorkloadConfig:
    """Sizes and structure knobs of a synthetic audio-video trace. Defaults give N = 1268 tokens, D = 64."""

    batch: int = 1
    num_layers: int = 4
    num_kv_heads: int = 2
    group_size: int = 2  # query heads per kv head
    head_dim: int = 64
    prefix_len: int = 16  # system / text prefix tokens
    num_chunks: int = 10  # 2-second chunks
    chunk_seconds: int = 2
    frames_per_chunk: int = 2  # temporal grid steps per chunk (2 fps with temporal patch 2: one per second)
    grid_h: int = 6  # merged patch rows per frame
    grid_w: int = 6  # merged patch columns per frame
    question_len: int = 32  # text question; it is the observation window W
    num_decode_queries: int = 16
    # Structure.
    video_redundancy: float = 0.9  # AR(1) coefficient of a patch's key/value content across consecutive frames
    audio_smoothness: float = 0.9  # AR(1) coefficient across consecutive audio tokens
    content_logit_std: float = 1.0  # std of the random part of each logit
    num_sinks: int = 4
    sink_logit: float = 5.0
    text_logit: float = 0.5
    audio_logit: tuple[float, float] = (0.5, -0.5)  # audio bias at the first and at the last layer
    video_logit: tuple[float, float] = (-1.0, 1.5)  # video bias at the first and at the last layer
    head_jitter: float = 0.25  # std of a per-(layer, query head) perturbation of the modality biases
    num_events: int = 2
    event_audio_len: int = 6  # audio tokens per event (0.24 s)
    event_region: tuple[int, int] = (2, 2)  # (rows, cols) of video patches per aligned frame
    event_logit: float = 6.0  # boost of a decode query on the tokens of its event
    window_event_logit: float = 2.0  # boost of the window queries on every event's tokens
    event_value_norm: float = 2.0  # per-event value signature, in units of sqrt(D)
    dtype: torch.dtype = torch.float32
    seed: int = 0

    @property
    def num_query_heads(self) -> int:
        """Hq = Hkv * G."""
        return self.num_kv_heads * self.group_size

    @property
    def audio_per_chunk(self) -> int:
        """Audio tokens per chunk: 25 per second."""
        return self.chunk_seconds * TIME_UNITS_PER_SECOND

    @property
    def video_per_chunk(self) -> int:
        """Video tokens per chunk: frames_per_chunk frames of grid_h x grid_w patches."""
        return self.frames_per_chunk * self.grid_h * self.grid_w

    @property
    def num_tokens(self) -> int:
        """N, the prompt length (prefix + chunks + question)."""
        return self.prefix_len + self.num_chunks * (self.video_per_chunk + self.audio_per_chunk) + self.question_len


@dataclass
class LayerTrace:
    """One layer's tensors. ``k, v [B, Hkv, N, D]``; ``q_window [B, Hq, W, D]`` are the queries of the last W
    prompt tokens; ``q_decode [B, Hq, Qd, D]`` are later decode queries (they see all N tokens)."""

    k: torch.Tensor
    v: torch.Tensor
    q_window: torch.Tensor
    q_decode: torch.Tensor


@dataclass
class AVWorkload:
    """A generated trace: per-token metadata (shared by every batch element and head) plus per-layer tensors.

    Metadata, each ``[N]``: ``modality`` uint8 (:class:`Modality`), ``time`` int64 (TMRoPE temporal index),
    ``spatial`` ``[N, 2]`` int64 (row, col; -1 when not video), ``position`` int64 (original position),
    ``chunk`` int64 (-1 for text), ``event`` int64 (planted event id, -1 for none).
    """

    config: AVWorkloadConfig
    modality: torch.Tensor
    time: torch.Tensor
    spatial: torch.Tensor
    position: torch.Tensor
    chunk: torch.Tensor
    event: torch.Tensor
    layers: list[LayerTrace] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.modality.numel()

    @property
    def window(self) -> int:
        """W, the observation window (the question's length)."""
        return self.config.question_len

    @property
    def salient(self) -> torch.Tensor:
        """``[N]`` bool: the tokens of the planted events."""
        return self.event >= 0

    def token_modality(self) -> torch.Tensor:
        """Modality ids as the kernels take them: ``[B, Hkv, N]`` uint8, contiguous."""
        cfg = self.config
        return self.modality.expand(cfg.batch, cfg.num_kv_heads, -1).contiguous()


def _layout(cfg: AVWorkloadConfig, gen: torch.Generator):
    """Metadata tensors ``[N]`` and the planted events, in Qwen2.5-Omni's token order."""
    P, C, F, Hh, Ww = cfg.prefix_len, cfg.num_chunks, cfg.frames_per_chunk, cfg.grid_h, cfg.grid_w
    A = cfg.audio_per_chunk
    frame_units = A // F
    mods, times, rows, cols, chunks = [], [], [], [], []

    def text(n: int, t0: int):
        mods.append(torch.full((n,), int(Modality.TEXT)))
        times.append(t0 + torch.arange(n))
        rows.append(torch.full((n,), -1))
        cols.append(torch.full((n,), -1))
        chunks.append(torch.full((n,), -1))

    text(P, 0)
    patch_r = torch.arange(Hh).repeat_interleave(Ww)
    patch_c = torch.arange(Ww).repeat(Hh)
    for c in range(C):
        t_chunk = P + c * A
        for f in range(F):
            mods.append(torch.full((Hh * Ww,), int(Modality.VIDEO)))
            times.append(torch.full((Hh * Ww,), t_chunk + f * frame_units))
            rows.append(patch_r)
            cols.append(patch_c)
            chunks.append(torch.full((Hh * Ww,), c))
        mods.append(torch.full((A,), int(Modality.AUDIO)))
        times.append(t_chunk + torch.arange(A))
        rows.append(torch.full((A,), -1))
        cols.append(torch.full((A,), -1))
        chunks.append(torch.full((A,), c))
    text(cfg.question_len, P + C * A)

    modality = torch.cat(mods).to(torch.uint8)
    time = torch.cat(times).long()
    spatial = torch.stack([torch.cat(rows), torch.cat(cols)], dim=-1).long()
    chunk = torch.cat(chunks).long()
    position = torch.arange(modality.numel())

    # Planted events: spread over the chunks; an audio moment and the region of the frame(s) covering it in time.
    event = torch.full_like(position, -1)
    is_audio = modality == Modality.AUDIO
    is_video = modality == Modality.VIDEO
    eh, ew = cfg.event_region
    for e in range(cfg.num_events):
        c = min(C - 1, int((e + 0.5) * C / cfg.num_events))
        onset = int(torch.randint(0, A - cfg.event_audio_len + 1, (1,), generator=gen))
        t0 = P + c * A + onset
        t1 = t0 + cfg.event_audio_len  # exclusive
        r0 = int(torch.randint(0, Hh - eh + 1, (1,), generator=gen))
        c0 = int(torch.randint(0, Ww - ew + 1, (1,), generator=gen))
        event[is_audio & (time >= t0) & (time < t1)] = e
        frame_overlaps = (time < t1) & (time + frame_units > t0)
        region = (spatial[:, 0] >= r0) & (spatial[:, 0] < r0 + eh) & (spatial[:, 1] >= c0) & (spatial[:, 1] < c0 + ew)
        event[is_video & frame_overlaps & region] = e
    return modality, time, spatial, position, chunk, event


def _ar1(noise: torch.Tensor, coef: float, dim: int) -> torch.Tensor:
    """Unit-variance AR(1) along ``dim``: x_0 = e_0, x_i = coef * x_{i-1} + sqrt(1 - coef^2) * e_i."""
    x = noise.movedim(dim, 0).clone()
    c2 = math.sqrt(max(0.0, 1.0 - coef * coef))
    for i in range(1, x.shape[0]):
        x[i] = coef * x[i - 1] + c2 * x[i]
    return x.movedim(0, dim)


def _content(cfg: AVWorkloadConfig, modality: torch.Tensor, dim: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, Hkv, N, dim]`` unit-variance content: iid text, AR(1) audio in time, AR(1) video per patch."""
    B, H, N = cfg.batch, cfg.num_kv_heads, modality.numel()
    x = torch.randn(B, H, N, dim, generator=gen)
    audio = (modality == Modality.AUDIO).nonzero().flatten()  # already in time order
    video = (modality == Modality.VIDEO).nonzero().flatten()  # frame-major, patches row-major
    if audio.numel():
        x[:, :, audio] = _ar1(x[:, :, audio], cfg.audio_smoothness, dim=2)
    if video.numel():
        patches = cfg.grid_h * cfg.grid_w
        frames = x[:, :, video].view(B, H, -1, patches, dim)
        x[:, :, video] = _ar1(frames, cfg.video_redundancy, dim=2).reshape(B, H, -1, dim)
    return x


def _lerp(pair: tuple[float, float], frac: float) -> float:
    return pair[0] + frac * (pair[1] - pair[0])


def _check_config(cfg: AVWorkloadConfig) -> None:
    positive = ("batch", "num_layers", "num_kv_heads", "group_size", "head_dim", "num_chunks", "chunk_seconds",
                "frames_per_chunk", "grid_h", "grid_w", "question_len", "num_decode_queries")
    for name in positive:
        if not (isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1):
            raise ValueError(f"config.{name} must be a positive int, got {getattr(cfg, name)!r}")
    if cfg.audio_per_chunk % cfg.frames_per_chunk:
        raise ValueError(f"config.frames_per_chunk={cfg.frames_per_chunk} must divide the chunk's "
                         f"{cfg.audio_per_chunk} time units")
    if not 0 <= cfg.num_sinks <= cfg.prefix_len:
        raise ValueError(f"config.num_sinks must lie in [0, prefix_len={cfg.prefix_len}], got {cfg.num_sinks}")
    if cfg.num_events < 0 or not 1 <= cfg.event_audio_len <= cfg.audio_per_chunk:
        raise ValueError("config.num_events must be >= 0 and event_audio_len in [1, audio tokens per chunk]")
    if not (1 <= cfg.event_region[0] <= cfg.grid_h and 1 <= cfg.event_region[1] <= cfg.grid_w):
        raise ValueError(f"config.event_region must fit the {cfg.grid_h}x{cfg.grid_w} patch grid, "
                         f"got {cfg.event_region}")
    if cfg.head_dim - len(Modality) - 1 - cfg.num_events < 8:
        raise ValueError(f"config.head_dim={cfg.head_dim} leaves fewer than 8 content dims after "
                         f"{len(Modality) + 1 + cfg.num_events} structure directions")
    for name in ("video_redundancy", "audio_smoothness"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"config.{name} must lie in [0, 1], got {getattr(cfg, name)}")


def generate_av_workload(config: AVWorkloadConfig | None = None, **overrides) -> AVWorkload:
    """Draw a deterministic audio-video trace (same config and seed give bit-identical tensors).

    Args:
        config: sizes and structure knobs; default :class:`AVWorkloadConfig`.
        **overrides: fields replacing those of ``config`` (e.g. ``num_chunks=3, seed=1``).

    Returns:
        an :class:`AVWorkload` with the metadata and ``num_layers`` :class:`LayerTrace` s in ``config.dtype``
        (k, v ``[B, Hkv, N, D]``, q_window ``[B, Hq, W, D]``, q_decode ``[B, Hq, Qd, D]``) on the CPU.
    """
    cfg = replace(config or AVWorkloadConfig(), **overrides)
    _check_config(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    modality, time, spatial, position, chunk, event = _layout(cfg, gen)
    N, D, B, Hkv, Hq = modality.numel(), cfg.head_dim, cfg.batch, cfg.num_kv_heads, cfg.num_query_heads
    E, W, Qd = cfg.num_events, cfg.question_len, cfg.num_decode_queries
    n_struct = len(Modality) + 1 + E  # modality directions, the sink direction, one direction per event
    d_content = D - n_struct
    root = D**0.25  # key and query structure components both scaled by D^(1/4): scale * q.k gives logit units

    # Key structure coefficients per token: one-hot modality, sink flag, event flags.
    key_struct = torch.zeros(N, n_struct)
    key_struct[torch.arange(N), modality.long()] = 1.0
    key_struct[: cfg.num_sinks, len(Modality)] = 1.0
    for e in range(E):
        key_struct[event == e, len(Modality) + 1 + e] = 1.0
    value_signature = torch.randn(E, D, generator=gen)
    value_signature = value_signature / value_signature.norm(dim=-1, keepdim=True) * cfg.event_value_norm * D**0.5

    layers = []
    for layer in range(cfg.num_layers):
        frac = layer / max(1, cfg.num_layers - 1)
        basis = torch.linalg.qr(torch.randn(D, D, generator=gen))[0]  # orthonormal columns
        struct_dirs, content_dirs = basis[:, :n_struct], basis[:, n_struct:]

        k = root * key_struct @ struct_dirs.T + _content(cfg, modality, d_content, gen) @ content_dirs.T
        v = _content(cfg, modality, D, gen)
        for e in range(E):
            v[:, :, event == e] += value_signature[e]

        # Query structure: modality biases (per query head, jittered), sink pull, event boosts.
        bias = torch.zeros(B, Hq, len(Modality))
        bias[..., Modality.TEXT] = cfg.text_logit
        bias[..., Modality.AUDIO] = _lerp(cfg.audio_logit, frac)
        bias[..., Modality.VIDEO] = _lerp(cfg.video_logit, frac)
        bias[..., Modality.IMAGE] = _lerp(cfg.video_logit, frac)  # no image tokens here; kept like video
        bias = bias + cfg.head_jitter * torch.randn(Hq, len(Modality), generator=gen)

        def queries(n: int, event_boost: torch.Tensor) -> torch.Tensor:
            struct = torch.cat([
                bias[:, :, None, :].expand(B, Hq, n, len(Modality)),
                torch.full((B, Hq, n, 1), cfg.sink_logit),
                event_boost.expand(B, Hq, n, E),
            ], dim=-1)
            noise = torch.randn(B, Hq, n, d_content, generator=gen) * cfg.content_logit_std * math.sqrt(D / d_content)
            return root * struct @ struct_dirs.T + noise @ content_dirs.T

        q_window = queries(W, torch.full((E,), cfg.window_event_logit))
        targets = torch.zeros(Qd, E)
        if E:
            targets[torch.arange(Qd), torch.arange(Qd) % E] = cfg.event_logit
        q_decode = queries(Qd, targets)
        layers.append(LayerTrace(*(x.to(cfg.dtype).contiguous() for x in (k, v, q_window, q_decode))))

    return AVWorkload(cfg, modality, time, spatial, position, chunk, event, layers)


# ---------------------------------------------------------------------------------------------------------------
# Fidelity metrics. A compressed cache is given as tensors plus the original position of each slot:
#   positions [B, Hkv, C] int (original token index of slot c; slots c >= lengths[b, h] are ignored),
#   lengths   [B, Hkv]    int (valid slots per (sequence, kv head)),
#   merged_into, optional [B, Hkv, N] int: for each original token, the slot it was merged into, or -1 when it was
#       dropped (the plan's merge_target convention; entries of kept tokens are ignored). A token merged into a
#       slot counts as covered by recall and mass retention. Without it only kept positions count.


def covered_tokens(
    positions: torch.Tensor, lengths: torch.Tensor, num_tokens: int, *, merged_into: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, Hkv, N]`` bool: original tokens held by a valid slot (kept, or merged when ``merged_into`` is given)."""
    B, H, C = positions.shape
    valid = torch.arange(C, device=positions.device) < lengths.long()[..., None]
    if valid.any() and (positions[valid].min() < 0 or positions[valid].max() >= num_tokens):
        raise ValueError(f"positions of valid slots must lie in [0, {num_tokens})")
    covered = torch.zeros(B, H, num_tokens + 1, dtype=torch.bool, device=positions.device)
    covered.scatter_(-1, torch.where(valid, positions.long(), num_tokens), True)  # invalid slots hit a spare column
    covered = covered[..., :num_tokens]
    if merged_into is not None:
        if merged_into.shape != (B, H, num_tokens):
            raise ValueError(f"merged_into must have shape [B, Hkv, N] = {(B, H, num_tokens)}, "
                             f"got {tuple(merged_into.shape)}")
        covered = covered | (merged_into >= 0)
    return covered


def gather_kept(
    k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keep-only compressed cache: ``k'[b, h, c] = k[b, h, positions[b, h, c]]`` for ``c < lengths[b, h]``.

    Args: k, v ``[B, Hkv, N, D]``; positions ``[B, Hkv, C]`` int; lengths ``[B, Hkv]`` int.
    Returns: ``(k', v')`` ``[B, Hkv, C, D]`` in k's dtype, zero in the slots past each length.
    """
    C = positions.shape[-1]
    valid = torch.arange(C, device=positions.device) < lengths.long()[..., None]
    idx = torch.where(valid, positions.long(), 0)[..., None].expand(-1, -1, -1, k.shape[-1])
    keep = valid[..., None]
    return (torch.where(keep, torch.gather(k, 2, idx), 0).to(k.dtype),
            torch.where(keep, torch.gather(v, 2, idx), 0).to(v.dtype))


def _full_lengths(k: torch.Tensor) -> torch.Tensor:
    return torch.full(k.shape[:2], k.shape[2], dtype=torch.int32, device=k.device)


def attention_output_error(
    q_decode: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    lengths_c: torch.Tensor,
    *,
    scale: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Relative error of decode attention on a compressed cache against the full cache, in float64.

    For every decode query j and query head, ``||o_c - o|| / ||o||`` with ``o`` from the full cache ``k, v
    [B, Hkv, N, D]`` and ``o_c`` from ``k_c, v_c [B, Hkv, C, D]`` with ``lengths_c [B, Hkv]`` valid slots, both via
    :func:`acckv_triton.reference.decode_attention`. ``q_decode`` is ``[B, Hq, Qd, D]``.

    Returns: a float64 scalar (``reduction="mean"``) or the errors ``[B, Hq, Qd]`` (``"none"``).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    q = q_decode.double()
    k, v, k_c, v_c = k.double(), v.double(), k_c.double(), v_c.double()
    full_len = _full_lengths(k)
    errors = []
    for j in range(q.shape[2]):
        o = reference.decode_attention(q[:, :, j], k, v, full_len, scale=scale).out
        o_c = reference.decode_attention(q[:, :, j], k_c, v_c, lengths_c, scale=scale).out
        errors.append((o_c - o).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-300))
    err = torch.stack(errors, dim=-1)
    return err.mean() if reduction == "mean" else err


def decode_token_mass(q_decode: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """``[B, Hkv, N]`` float64: full-cache decode attention mass per token, summed over decode queries and group."""
    q, kd = q_decode.double(), k.double()
    mass = torch.zeros(k.shape[:3], dtype=torch.float64, device=k.device)
    full_len = _full_lengths(k)
    for j in range(q.shape[2]):
        step_mass = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
        reference.decode_attention(q[:, :, j], kd, kd, full_len, scale=scale, token_mass=step_mass)
        mass += step_mass.double()
    return mass


def attention_mass_retained(
    q_decode: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    *,
    merged_into: torch.Tensor | None = None,
    scale: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Share of the full cache's decode attention mass that falls on tokens the compressed cache covers.

    Args: q_decode ``[B, Hq, Qd, D]``; k the full keys ``[B, Hkv, N, D]``; positions, lengths, merged_into as in
    this section's header. Returns a float64 scalar in [0, 1] averaged over (b, kv head), or ``[B, Hkv]`` (``"none"``).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    mass = decode_token_mass(q_decode, k, scale=scale)
    covered = covered_tokens(positions, lengths, k.shape[2], merged_into=merged_into)
    share = (mass * covered).sum(-1) / mass.sum(-1)
    return share.mean() if reduction == "mean" else share


def salient_recall(
    salient: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    *,
    merged_into: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Fraction of the planted salient tokens that the compressed cache covers.

    Args: salient ``[N]`` bool (e.g. :attr:`AVWorkload.salient`) or ``[B, N]``; positions, lengths, merged_into as
    in this section's header. Returns a float64 scalar averaged over (b, kv head), or ``[B, Hkv]`` (``"none"``);
    1.0 when there is no salient token.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    N = salient.shape[-1]
    covered = covered_tokens(positions, lengths, N, merged_into=merged_into)
    sal = salient.to(covered.device).bool()
    sal = sal[None, None, :] if sal.dim() == 1 else sal[:, None, :]
    total = sal.sum(-1).double()
    hit = (covered & sal).sum(-1).double()
    recall = torch.where(total > 0, hit / total.clamp_min(1.0), torch.ones_like(total)).expand(covered.shape[:2])
    return recall.mean() if reduction == "mean" else recall
