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
high key cosine. The video bias rises and the audio bias falls linearly with depth (observation O1 of
docs/algorithm.md).
Each planted event is a short audio moment plus a spatial region of the video frame(s) covering it in time; decode
query j targets event ``j % num_events`` with a strong boost, and the window (question) queries weakly boost every
event. Values share the content structure and carry a per-event signature, so losing an event shows in the
attention output.

Each layer also carries ``q_prompt [B, Hq, N, D]``, one query per prompt position (``prompt_queries=True``, the
default), so evidence that needs every prompt query's attention (H2O's accumulated attention) can be computed: its
last W rows are ``q_window`` itself; the earlier rows are drawn like the window's but boost every event by half as
much (``PROMPT_EVENT_SHARE * window_event_logit``: the question is what asks about the events, the earlier prompt
only weakly), from their own generator seeded from ``seed``, so adding them changes no other tensor. Attention from
row i is causal (it sees tokens 0..i); applying the mask is the consumer's job.

``modalities`` selects which AV streams the chunks hold (audio and video by default; one of them for a single-stream
trace: the clock still advances 2 s per chunk, and the planted events live in the present stream only).

:data:`STRESS_VARIANTS` names reproducible variants of the trace that stress one assumption of the methods each (low
redundancy, a flat window, one AV modality, no layer-wise shift, a long trace); :func:`stress_workload` draws one.
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
    "STRESS_VARIANTS",
    "attention_mass_retained",
    "attention_output_error",
    "covered_tokens",
    "decode_token_mass",
    "gather_kept",
    "generate_av_workload",
    "salient_recall",
    "stress_workload",
]

TIME_UNITS_PER_SECOND = 25
"""TMRoPE temporal resolution of Qwen2.5-Omni: audio and video share this time axis."""

AV_MODALITIES = ("audio", "video")
"""The streams a chunk can hold, in the order ``AVWorkloadConfig.modalities`` names them."""

PROMPT_EVENT_SHARE = 0.5
"""Event boost of the prompt queries before the window, as a share of ``window_event_logit``."""

_PROMPT_SEED_OFFSET = 0x9E3779B97F4A7C15
"""The prompt queries' generator is seeded with ``(seed + this) mod 2**64``: its own stream, so the other tensors
stay those of the same seed without prompt queries."""


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
    prompt_queries: bool = True  # draw LayerTrace.q_prompt (one query per prompt position); False: q_prompt is None
    # Structure.
    modalities: tuple[str, ...] = AV_MODALITIES  # AV streams in each chunk: ("audio", "video"), ("audio",), ("video",)
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
    event_audio_len: int = 6  # time units per event moment (0.24 s): its audio tokens, and the frames overlapping it
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
    def time_units_per_chunk(self) -> int:
        """TMRoPE time units one chunk spans: 25 per second, whichever streams it holds."""
        return self.chunk_seconds * TIME_UNITS_PER_SECOND

    @property
    def audio_per_chunk(self) -> int:
        """Audio tokens per chunk: 25 per second (0 when ``modalities`` has no audio)."""
        return self.time_units_per_chunk if "audio" in self.modalities else 0

    @property
    def video_per_chunk(self) -> int:
        """Video tokens per chunk: frames_per_chunk frames of grid_h x grid_w patches (0 when there is no video)."""
        return self.frames_per_chunk * self.grid_h * self.grid_w if "video" in self.modalities else 0

    @property
    def num_tokens(self) -> int:
        """N, the prompt length (prefix + chunks + question)."""
        return self.prefix_len + self.num_chunks * (self.video_per_chunk + self.audio_per_chunk) + self.question_len


@dataclass
class LayerTrace:
    """One layer's tensors. ``k, v [B, Hkv, N, D]``; ``q_window [B, Hq, W, D]`` are the queries of the last W
    prompt tokens; ``q_decode [B, Hq, Qd, D]`` are later decode queries (they see all N tokens); ``q_prompt
    [B, Hq, N, D]`` (None unless ``prompt_queries``) holds the query of every prompt position, causal, its last W
    rows equal to ``q_window``."""

    k: torch.Tensor
    v: torch.Tensor
    q_window: torch.Tensor
    q_decode: torch.Tensor
    q_prompt: torch.Tensor | None = None


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
        """N, the number of prompt tokens (the length of ``modality``)."""
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
    A = cfg.time_units_per_chunk
    frame_units = A // F
    has_audio, has_video = "audio" in cfg.modalities, "video" in cfg.modalities
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
        for f in range(F if has_video else 0):
            mods.append(torch.full((Hh * Ww,), int(Modality.VIDEO)))
            times.append(torch.full((Hh * Ww,), t_chunk + f * frame_units))
            rows.append(patch_r)
            cols.append(patch_c)
            chunks.append(torch.full((Hh * Ww,), c))
        if has_audio:
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

    # Planted events: spread over the chunks; an audio moment and the region of the frame(s) covering it in time
    # (the same draws with one stream only: the event then holds that stream's part).
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
    mods = cfg.modalities
    if (not isinstance(mods, tuple) or not mods or len(set(mods)) != len(mods)
            or any(m not in AV_MODALITIES for m in mods)):
        raise ValueError(f"config.modalities must be a non-empty tuple of distinct names from {AV_MODALITIES}, "
                         f"got {mods!r}")
    if cfg.time_units_per_chunk % cfg.frames_per_chunk:
        raise ValueError(f"config.frames_per_chunk={cfg.frames_per_chunk} must divide the chunk's "
                         f"{cfg.time_units_per_chunk} time units")
    if not 0 <= cfg.num_sinks <= cfg.prefix_len:
        raise ValueError(f"config.num_sinks must lie in [0, prefix_len={cfg.prefix_len}], got {cfg.num_sinks}")
    if cfg.num_events < 0 or not 1 <= cfg.event_audio_len <= cfg.time_units_per_chunk:
        raise ValueError("config.num_events must be >= 0 and event_audio_len in [1, time units per chunk]")
    if not (1 <= cfg.event_region[0] <= cfg.grid_h and 1 <= cfg.event_region[1] <= cfg.grid_w):
        raise ValueError(f"config.event_region must fit the {cfg.grid_h}x{cfg.grid_w} patch grid, "
                         f"got {cfg.event_region}")
    if cfg.head_dim - len(Modality) - 1 - cfg.num_events < 8:
        raise ValueError(f"config.head_dim={cfg.head_dim} leaves fewer than 8 content dims after "
                         f"{len(Modality) + 1 + cfg.num_events} structure directions")
    for name in ("video_redundancy", "audio_smoothness"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"config.{name} must lie in [0, 1], got {getattr(cfg, name)}")
    if not isinstance(cfg.prompt_queries, bool):
        raise ValueError(f"config.prompt_queries must be a bool, got {cfg.prompt_queries!r}")


def generate_av_workload(config: AVWorkloadConfig | None = None, **overrides) -> AVWorkload:
    """Draw a deterministic audio-video trace (same config and seed give bit-identical tensors).

    Args:
        config: sizes and structure knobs; default :class:`AVWorkloadConfig`.
        **overrides: fields replacing those of ``config`` (e.g. ``num_chunks=3, seed=1``).

    Returns:
        an :class:`AVWorkload` with the metadata and ``num_layers`` :class:`LayerTrace` s in ``config.dtype``
        (k, v ``[B, Hkv, N, D]``, q_window ``[B, Hq, W, D]``, q_decode ``[B, Hq, Qd, D]``, q_prompt
        ``[B, Hq, N, D]`` or None) on the CPU.
    """
    cfg = replace(config or AVWorkloadConfig(), **overrides)
    _check_config(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    prompt_gen = torch.Generator().manual_seed((cfg.seed + _PROMPT_SEED_OFFSET) % 2**64)
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

        def queries(n: int, event_boost: torch.Tensor, g: torch.Generator = gen) -> torch.Tensor:
            struct = torch.cat([
                bias[:, :, None, :].expand(B, Hq, n, len(Modality)),
                torch.full((B, Hq, n, 1), cfg.sink_logit),
                event_boost.expand(B, Hq, n, E),
            ], dim=-1)
            noise = torch.randn(B, Hq, n, d_content, generator=g) * cfg.content_logit_std * math.sqrt(D / d_content)
            return root * struct @ struct_dirs.T + noise @ content_dirs.T

        q_window = queries(W, torch.full((E,), cfg.window_event_logit))
        targets = torch.zeros(Qd, E)
        if E:
            targets[torch.arange(Qd), torch.arange(Qd) % E] = cfg.event_logit
        q_decode = queries(Qd, targets)
        q_prompt = None
        if cfg.prompt_queries:  # the earlier prompt queries, then the window itself: the window is the prompt's tail
            early = queries(N - W, torch.full((E,), PROMPT_EVENT_SHARE * cfg.window_event_logit), prompt_gen)
            q_prompt = torch.cat([early, q_window], dim=2).to(cfg.dtype).contiguous()
        layers.append(LayerTrace(*(x.to(cfg.dtype).contiguous() for x in (k, v, q_window, q_decode)), q_prompt))

    return AVWorkload(cfg, modality, time, spatial, position, chunk, event, layers)


_STRESS_BASE = dict(seed=1, num_chunks=6, num_layers=2, num_kv_heads=1, group_size=4, num_decode_queries=2)
"""What every stress variant shares: a seed other than the default trace's 0 (the one the method was developed on),
and a size whose fidelity table runs through the interpreter in about three minutes for all variants on two CPU
cores: N = 780 with both streams (10% still leaves room past the 32-token window), 2 layers (the first and the
last of the modality shift), the default's 4 query heads on one kv head, one decode query per event."""

STRESS_VARIANTS: dict[str, dict] = {
    # The default structure at the stress size and seed: the row every stressed one is read against.
    "control": dict(_STRESS_BASE),
    # Little to merge: consecutive frames of a patch and consecutive audio tokens are only weakly alike.
    "low-redundancy": dict(_STRESS_BASE, video_redundancy=0.3, audio_smoothness=0.3),
    # The question carries no event signal and the heads disagree more: window scores rank events like the rest.
    "flat-window": dict(_STRESS_BASE, window_event_logit=0.0, head_jitter=0.75),
    # One AV stream: nothing to align across modalities, and focusing has a single AV modality to serve.
    # The chunk count is raised so that N stays near the others' (budgets of the same sizes in tokens).
    "audio-only": dict(_STRESS_BASE, modalities=("audio",), num_chunks=14),  # N = 748
    "video-only": dict(_STRESS_BASE, modalities=("video",), num_chunks=10),  # N = 768
    # No layer-wise modality shift: every layer's biases are the default's mid-depth ones.
    "no-shift": dict(_STRESS_BASE, audio_logit=(0.0, 0.0), video_logit=(0.25, 0.25)),
    # A long trace: 2x the chunks, so the same two events are half as dense and lie twice as far apart in time.
    "long": dict(_STRESS_BASE, num_chunks=12),  # N = 1512
}
"""Named, reproducible stress variants of the AV trace: :class:`AVWorkloadConfig` overrides, drawn by
:func:`stress_workload`."""


def stress_workload(name: str, **overrides) -> AVWorkload:
    """The stress variant ``name`` of :data:`STRESS_VARIANTS`, with ``overrides`` (e.g. ``dtype``) applied on top.

    Raises ValueError naming the valid variants when ``name`` is not one of them.
    """
    if name not in STRESS_VARIANTS:
        raise ValueError(f"name must be one of {sorted(STRESS_VARIANTS)}, got {name!r}")
    return generate_av_workload(AVWorkloadConfig(**STRESS_VARIANTS[name]), **overrides)


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
    token_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of the full cache's decode attention mass that falls on tokens the compressed cache covers.

    Args: q_decode ``[B, Hq, Qd, D]``; k the full keys ``[B, Hkv, N, D]``; positions, lengths, merged_into as in
    this section's header; token_mass, optional: :func:`decode_token_mass` of ``(q_decode, k, scale)`` computed
    once, so that several caches of one layer are scored without recomputing it. Returns a float64 scalar in [0, 1]
    averaged over (b, kv head), or ``[B, Hkv]`` (``"none"``).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if token_mass is None:
        mass = decode_token_mass(q_decode, k, scale=scale)
    elif token_mass.shape != k.shape[:3]:
        raise ValueError(f"token_mass must have shape [B, Hkv, N] = {tuple(k.shape[:3])}, "
                         f"got {tuple(token_mass.shape)}")
    else:
        mass = token_mass.double()
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
