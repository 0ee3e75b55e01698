"""The synthetic audio-video workloads: determinism, Qwen2.5-Omni layout, planted structure, fidelity metrics."""
from __future__ import annotations

import pytest
import torch

from acckv_triton import reference
from acckv_triton.modality import Modality
from acckv_triton.ops.window_scores import window_scores
from acckv_triton.workloads import (
    AVWorkloadConfig,
    attention_mass_retained,
    attention_output_error,
    covered_tokens,
    decode_token_mass,
    gather_kept,
    generate_av_workload,
    salient_recall,
)

SMALL = AVWorkloadConfig(num_chunks=3, grid_h=4, grid_w=4, num_layers=3, batch=2)  # N = 16 + 3*(32+50) + 32 = 294


@pytest.fixture(scope="module")
def small():
    return generate_av_workload(SMALL)


def test_same_seed_same_trace_other_seed_other_trace(small):
    again = generate_av_workload(SMALL)
    other = generate_av_workload(SMALL, seed=1)
    for a, b, c in zip(small.layers, again.layers, other.layers):
        for name in ("k", "v", "q_window", "q_decode", "q_prompt"):
            assert torch.equal(getattr(a, name), getattr(b, name))
            assert not torch.equal(getattr(a, name), getattr(c, name))
    assert torch.equal(small.event, again.event)


def test_shapes_and_dtype():
    w = generate_av_workload(SMALL, dtype=torch.bfloat16, num_decode_queries=5, group_size=7, num_layers=1)
    B, Hkv, N, D = 2, 2, SMALL.num_tokens, 64
    layer = w.layers[0]
    assert layer.k.shape == layer.v.shape == (B, Hkv, N, D)
    assert layer.q_window.shape == (B, 14, w.window, D) and layer.q_decode.shape == (B, 14, 5, D)
    assert all(x.dtype == torch.bfloat16 and x.is_contiguous() for x in (layer.k, layer.v, layer.q_window))
    assert w.token_modality().shape == (B, Hkv, N) and w.token_modality().dtype == torch.uint8


def test_layout_follows_qwen_omni(small):
    cfg = small.config
    P, A, F, HW = cfg.prefix_len, cfg.audio_per_chunk, cfg.frames_per_chunk, cfg.grid_h * cfg.grid_w
    assert A == 50 and small.num_tokens == cfg.num_tokens == 294
    expected = [Modality.TEXT] * P
    for _ in range(cfg.num_chunks):
        expected += [Modality.VIDEO] * (F * HW) + [Modality.AUDIO] * A
    expected += [Modality.TEXT] * cfg.question_len
    assert small.modality.tolist() == [int(m) for m in expected]
    assert torch.equal(small.position, torch.arange(small.num_tokens))

    # Text carries its 1-D position; the question continues after the last AV time.
    assert torch.equal(small.time[:P], torch.arange(P))
    av_end = P + cfg.num_chunks * A
    assert torch.equal(small.time[-cfg.question_len:], av_end + torch.arange(cfg.question_len))
    for c in range(cfg.num_chunks):
        in_chunk = small.chunk == c
        audio_t = small.time[in_chunk & (small.modality == Modality.AUDIO)]
        video_t = small.time[in_chunk & (small.modality == Modality.VIDEO)]
        assert torch.equal(audio_t, P + c * A + torch.arange(A))  # 25 per second, one unit per token
        # Frame f of the chunk at f * 25 units (one per second), aligned with the audio of the same second.
        assert torch.equal(video_t.unique(), P + c * A + 25 * torch.arange(F))
        assert video_t.unique()[1] == audio_t[25]
    video = small.modality == Modality.VIDEO
    frame = small.spatial[video].view(-1, HW, 2)  # [frames, patches, (row, col)], patches row-major
    rows, cols = torch.arange(cfg.grid_h).repeat_interleave(cfg.grid_w), torch.arange(cfg.grid_w).repeat(cfg.grid_h)
    assert torch.equal(frame[:, :, 0], rows.expand(frame.shape[0], -1))
    assert torch.equal(frame[:, :, 1], cols.expand(frame.shape[0], -1))
    assert (small.spatial[~video] == -1).all() and (small.chunk[small.modality == Modality.TEXT] == -1).all()


def test_planted_events_are_aligned_audio_and_video(small):
    for e in range(small.config.num_events):
        audio = (small.event == e) & (small.modality == Modality.AUDIO)
        video = (small.event == e) & (small.modality == Modality.VIDEO)
        assert audio.sum() == small.config.event_audio_len and video.sum() >= 4
        t_audio = small.time[audio]
        assert torch.equal(t_audio, t_audio[0] + torch.arange(t_audio.numel()))  # one contiguous audio moment
        for t in small.time[video].unique():  # each frame of the event overlaps the audio moment in time
            assert t <= t_audio.max() and t + 25 > t_audio.min()
        assert small.chunk[audio].unique().numel() == 1


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def test_video_is_redundant_across_frames_and_audio_is_smooth(small):
    HW = small.config.grid_h * small.config.grid_w
    k = small.layers[0].k[0, 0]
    frames = (small.modality == Modality.VIDEO).nonzero().flatten().view(-1, HW)  # [frames, patches]
    same_patch = _cos(k[frames[:-1]], k[frames[1:]])
    other_patch = _cos(k[frames[:, :-1]], k[frames[:, 1:]])
    assert same_patch > 0.8 and other_patch < 0.35
    audio = (small.modality == Modality.AUDIO).nonzero().flatten()
    assert _cos(k[audio[:-1]], k[audio[1:]]) > 0.8 and _cos(k[audio[:-25]], k[audio[25:]]) < 0.5
    rough = generate_av_workload(SMALL, video_redundancy=0.0, num_layers=1).layers[0].k[0, 0]
    assert _cos(rough[frames[:-1]], rough[frames[1:]]) < 0.35


def test_higher_layers_attend_more_to_video(small):
    shares = []
    for layer in small.layers:
        mass = reference.window_scores(layer.q_window, layer.k, modality=small.token_modality()).modality_mass
        mass = mass.sum(dim=(0, 1))
        shares.append((mass[Modality.VIDEO] / (mass[Modality.AUDIO] + mass[Modality.VIDEO])).item())
    assert all(a < b for a, b in zip(shares, shares[1:])), shares
    assert shares[0] < 0.5 < shares[-1]


def test_sinks_and_planted_events_carry_attention(small):
    salient = small.salient
    assert salient.float().mean() < 0.15
    for layer in small.layers:
        mass = decode_token_mass(layer.q_decode, layer.k)  # [B, Hkv, N]
        assert (mass[..., salient].sum() / mass.sum()) > 0.4
        window = reference.window_scores(layer.q_window, layer.k).scores
        per_token = window / window.sum(-1, keepdim=True)
        sink = per_token[..., : small.config.num_sinks].mean()
        assert sink > 10 * per_token[..., small.config.num_sinks :].mean()
        assert per_token[..., salient].mean() > per_token[..., ~salient].mean()
    # Each decode query's most attended AV token belongs to the event it targets.
    layer = small.layers[-1]
    logits = torch.einsum("bhqd,bhtd->bhqt", layer.q_decode, layer.k.repeat_interleave(SMALL.group_size, 1))
    av = (small.modality == Modality.AUDIO) | (small.modality == Modality.VIDEO)
    top = logits.masked_fill(~av, float("-inf")).argmax(-1)  # [B, Hq, Qd]
    target = torch.arange(SMALL.num_decode_queries) % SMALL.num_events
    assert (small.event[top] == target).float().mean() > 0.9


def test_window_scores_kernel_on_a_workload_layer(small, poison_empty, device):
    layer = small.layers[1]
    q, k, mod = layer.q_window.to(device), layer.k.to(device), small.token_modality().to(device)
    out = window_scores(q, k, modality=mod)
    ref = reference.window_scores(q, k, modality=mod)
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.modality_mass, ref.modality_mass, atol=1e-5, rtol=1e-5)


def _random_keep(B, H, N, keep, seed):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.randperm(N, generator=gen)[:keep].sort().values for _ in range(B * H)]).view(B, H, keep)
    return pos, torch.full((B, H), keep, dtype=torch.int32)


def test_metrics_full_cache_is_perfect(small):
    layer = small.layers[0]
    B, H, N, _ = layer.k.shape
    positions = torch.arange(N).expand(B, H, N)
    lengths = torch.full((B, H), N, dtype=torch.int32)
    k_c, v_c = gather_kept(layer.k, layer.v, positions, lengths)
    assert attention_output_error(layer.q_decode, layer.k, layer.v, k_c, v_c, lengths) == 0.0
    assert salient_recall(small.salient, positions, lengths) == 1.0
    assert attention_mass_retained(layer.q_decode, layer.k, positions, lengths) == pytest.approx(1.0, abs=1e-12)
    # Slot order does not matter to attention.
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0)).expand(B, H, N)
    k_p, v_p = gather_kept(layer.k, layer.v, perm, lengths)
    assert attention_output_error(layer.q_decode, layer.k, layer.v, k_p, v_p, lengths) < 1e-6


def test_metrics_for_random_and_oracle_drops(small):
    layer = small.layers[-1]
    B, H, N, _ = layer.k.shape
    positions, lengths = _random_keep(B, H, N, N // 2, seed=1)
    k_c, v_c = gather_kept(layer.k, layer.v, positions, lengths)
    rand_err = attention_output_error(layer.q_decode, layer.k, layer.v, k_c, v_c, lengths)
    rand_recall = salient_recall(small.salient, positions, lengths)
    rand_mass = attention_mass_retained(layer.q_decode, layer.k, positions, lengths)
    assert 0.05 < rand_err < 2.0 and 0.2 < rand_recall < 0.8 and 0.2 < rand_mass < 0.8
    assert attention_output_error(layer.q_decode, layer.k, layer.v, k_c, v_c, lengths, reduction="none").shape == (
        B, SMALL.num_query_heads, SMALL.num_decode_queries)

    # Oracle at a smaller budget: sinks + salient + a few others, padded to a ragged length per head.
    oracle = torch.zeros(N, dtype=torch.bool)
    oracle[: SMALL.num_sinks] = True
    oracle |= small.salient
    keep = oracle.nonzero().flatten()
    C = N // 2
    positions = torch.zeros(B, H, C, dtype=torch.long)
    positions[..., : keep.numel()] = keep
    lengths = torch.full((B, H), keep.numel(), dtype=torch.int32)
    k_o, v_o = gather_kept(layer.k, layer.v, positions, lengths)
    assert (k_o[..., keep.numel():, :] == 0).all()
    assert salient_recall(small.salient, positions, lengths) == 1.0
    assert attention_output_error(layer.q_decode, layer.k, layer.v, k_o, v_o, lengths) < rand_err
    assert attention_mass_retained(layer.q_decode, layer.k, positions, lengths) > rand_mass


def test_mass_retained_takes_a_precomputed_token_mass(small):
    layer = small.layers[1]
    B, H, N, _ = layer.k.shape
    positions, lengths = _random_keep(B, H, N, N // 3, seed=2)
    mass = decode_token_mass(layer.q_decode, layer.k)
    share = attention_mass_retained(layer.q_decode, layer.k, positions, lengths, reduction="none")
    assert torch.equal(attention_mass_retained(layer.q_decode, layer.k, positions, lengths, reduction="none",
                                               token_mass=mass), share)
    with pytest.raises(ValueError, match="token_mass must have shape"):
        attention_mass_retained(layer.q_decode, layer.k, positions, lengths, token_mass=mass[..., :-1])


def test_merged_tokens_count_as_covered(small):
    B, H, N = 2, 2, small.num_tokens
    keep = (~small.salient).nonzero().flatten()
    positions = keep.expand(B, H, -1)
    lengths = torch.full((B, H), keep.numel(), dtype=torch.int32)
    assert salient_recall(small.salient, positions, lengths) == 0.0
    merged_into = torch.full((B, H, N), -1)
    merged_into[..., small.salient] = 0  # every salient token merged into slot 0
    assert salient_recall(small.salient, positions, lengths, merged_into=merged_into) == 1.0
    assert covered_tokens(positions, lengths, N, merged_into=merged_into).all()
    with pytest.raises(ValueError, match="merged_into must have shape"):
        covered_tokens(positions, lengths, N, merged_into=merged_into[..., :-1])
    with pytest.raises(ValueError, match="positions of valid slots"):
        covered_tokens(positions + N, lengths, N)


@pytest.mark.parametrize(
    "override, match",
    [
        pytest.param(dict(num_chunks=0), "num_chunks", id="no-chunks"),
        pytest.param(dict(frames_per_chunk=3), "frames_per_chunk", id="frames-not-dividing"),
        pytest.param(dict(num_sinks=20), "num_sinks", id="too-many-sinks"),
        pytest.param(dict(head_dim=12), "head_dim", id="head-dim-too-small"),
        pytest.param(dict(event_region=(5, 1)), "event_region", id="region-too-big"),
        pytest.param(dict(video_redundancy=1.5), "video_redundancy", id="redundancy-range"),
        pytest.param(dict(modalities=()), "modalities", id="no-modality"),
        pytest.param(dict(modalities=("text",)), "modalities", id="text-is-not-an-av-stream"),
        pytest.param(dict(modalities=("audio", "audio")), "modalities", id="repeated-modality"),
        pytest.param(dict(modalities="audio"), "modalities", id="modalities-not-a-tuple"),
        pytest.param(dict(prompt_queries=1), "prompt_queries", id="prompt-queries-not-bool"),
    ],
)
def test_bad_config(override, match):
    with pytest.raises(ValueError, match=match):
        generate_av_workload(SMALL, **override)
