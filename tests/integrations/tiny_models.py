"""Tiny randomly initialised Hugging Face models for the integration tests (CPU, no download, well under a second).

Configs are built fresh on every call: ``_from_config`` mutates the config it is given, so models never share one.
"""
from __future__ import annotations

import torch

VOCAB = 160
# Qwen2.5-Omni special ids remapped into the tiny vocabulary.
AUDIO, VIDEO, IMAGE, AUDIO_BOS, AUDIO_EOS, VISION_BOS, VISION_EOS = 150, 151, 152, 153, 154, 155, 156


def _text_kwargs(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, **extra)


def tiny_causal_lm(family: str, *, seed: int = 0, num_layers: int = 2):
    """A random ``llama``, ``qwen2`` or ``qwen3`` causal LM: hidden 64, 4 query / 2 kv heads, head_dim 16."""
    import transformers as tf

    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[family]
    extra = dict(head_dim=16) if family == "qwen3" else {}
    config = config_cls(**{**_text_kwargs(**extra), "num_hidden_layers": num_layers})
    torch.manual_seed(seed)
    return model_cls._from_config(config).eval()


def tiny_omni_thinker(*, seed: int = 0):
    """A random Qwen2.5-Omni thinker: the text model above with M-RoPE, a 1-layer vision and audio encoder."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    config = Qwen2_5OmniThinkerConfig(
        text_config=_text_kwargs(rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        audio_config=dict(num_mel_bins=128, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                          encoder_ffn_dim=64, output_dim=64, n_window=100),
        audio_token_index=AUDIO, video_token_index=VIDEO, image_token_index=IMAGE,
        audio_start_token_id=AUDIO_BOS, audio_end_token_id=AUDIO_EOS,
    )
    config.vision_start_token_id, config.vision_end_token_id = VISION_BOS, VISION_EOS
    torch.manual_seed(seed)
    return Qwen2_5OmniThinkerForConditionalGeneration._from_config(config).eval()


def omni_av_inputs(*, seed: int = 0, question_len: int = 12, batch: int = 1) -> dict:
    """Interleaved audio + video inputs as the processor lays them out: 2 chunks of 2 s, each 4 video + 50 audio tokens.

    ``<text> <vision_bos> <audio_bos> [V x4, A x50] [V x4, A x50] <audio_eos> <vision_eos> <question>``; the video has
    grid (t, h, w) = (2, 4, 4) at 2 s per grid, the audio 400 mel frames (100 tokens, 4 s).
    """
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, 140, (n,), generator=g).tolist()  # noqa: E731
    chunk = [VIDEO] * 4 + [AUDIO] * 50
    ids = text(5) + [VISION_BOS, AUDIO_BOS] + chunk + chunk + [AUDIO_EOS, VISION_EOS] + text(question_len)
    input_ids = torch.tensor([ids] * batch)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values_videos=torch.randn(batch * 2 * 4 * 4, 3 * 2 * 14 * 14, generator=g),
        video_grid_thw=torch.tensor([[2, 4, 4]] * batch),
        video_second_per_grid=torch.tensor([2.0] * batch),
        input_features=torch.randn(batch, 128, 400, generator=g),
        feature_attention_mask=torch.ones(batch, 400, dtype=torch.long),
        use_audio_in_video=True,
    )


# Qwen2.5-VL / Qwen3-VL placeholder ids remapped into the tiny vocabulary.
VL_IMAGE, VL_VIDEO, VL_BOS, VL_EOS = 150, 151, 152, 153


def tiny_mistral(*, seed: int = 0, sliding_window=None):
    """A random Mistral causal LM (hidden 64, 4 / 2 heads); ``sliding_window=None`` as Mistral v0.2 and later."""
    import transformers as tf

    config = tf.MistralConfig(**_text_kwargs(), sliding_window=sliding_window)
    torch.manual_seed(seed)
    return tf.MistralForCausalLM._from_config(config).eval()


def tiny_vl(family: str, *, seed: int = 0):
    """A random ``qwen2_5_vl`` or ``qwen3_vl`` model: the tiny text model with M-RoPE and a 1-layer vision encoder."""
    import transformers as tf

    ids = dict(image_token_id=VL_IMAGE, video_token_id=VL_VIDEO, vision_start_token_id=VL_BOS,
               vision_end_token_id=VL_EOS)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, spatial_merge_size=2,
                  temporal_patch_size=2)
    if family == "qwen2_5_vl":
        text = _text_kwargs(rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]))
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(**vision, patch_size=14,
                                                                          fullatt_block_indexes=[0]), **ids)
        model_cls = tf.Qwen2_5_VLForConditionalGeneration
    else:
        text = _text_kwargs(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=5e5,
                                                              mrope_section=[2, 3, 3], mrope_interleaved=True))
        config = tf.Qwen3VLConfig(text_config=text, vision_config=dict(**vision, patch_size=16, num_position_embeddings=64,
                                                                       deepstack_visual_indexes=[0]), **ids)
        model_cls = tf.Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    return model_cls._from_config(config).eval()


def vl_image_inputs(family: str, *, seed: int = 0, batch: int = 1, question_len: int = 6) -> dict:
    """``<text> <vision_bos> [IMAGE x16] <vision_eos> <question>``: one 8x8-patch image (16 tokens after merging)."""
    g = torch.Generator().manual_seed(seed)
    patch = 14 if family == "qwen2_5_vl" else 16
    text = lambda n: torch.randint(1, 140, (n,), generator=g).tolist()  # noqa: E731
    ids = text(5) + [VL_BOS] + [VL_IMAGE] * 16 + [VL_EOS] + text(question_len)
    input_ids = torch.tensor([ids] * batch)
    out = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
               pixel_values=torch.randn(batch * 64, 3 * 2 * patch * patch, generator=g),
               image_grid_thw=torch.tensor([[1, 8, 8]] * batch))
    out["mm_token_type_ids"] = (input_ids == VL_IMAGE).int()  # as the processor returns it: M-RoPE needs it
    return out


def tiny_gemma3(*, seed: int = 0, num_layers: int = 6, sliding_window: int = 8, layer_types=None):
    """A random Gemma 3 text model (``gemma3_text``: hidden 64, 4 / 2 heads, head_dim 16): five sliding-window layers
    of ``sliding_window`` tokens, then one full-attention layer, as Gemma 3 lays them out (or ``layer_types``)."""
    import transformers as tf

    config = tf.Gemma3TextConfig(**{**_text_kwargs(head_dim=16), "num_hidden_layers": num_layers},
                                 sliding_window=sliding_window, layer_types=layer_types, pad_token_id=0)
    torch.manual_seed(seed)
    return tf.Gemma3ForCausalLM._from_config(config).eval()


def tiny_qwen2_sliding(*, seed: int = 0, num_layers: int = 4, sliding_window: int = 8, max_window_layers: int = 2):
    """A random Qwen2 whose layers from ``max_window_layers`` on attend within ``sliding_window`` tokens."""
    import transformers as tf

    config = tf.Qwen2Config(**{**_text_kwargs(), "num_hidden_layers": num_layers}, use_sliding_window=True,
                            sliding_window=sliding_window, max_window_layers=max_window_layers)
    torch.manual_seed(seed)
    return tf.Qwen2ForCausalLM._from_config(config).eval()


# Qwen3-Omni thinker: the Qwen2.5-Omni ids above; TMRoPE time counts 13 per second (the real checkpoint's
# position_id_per_seconds and the processor's default; transformers' config default of 25 is a Qwen2.5-Omni leftover).
QWEN3_OMNI_POSITIONS_PER_SECOND = 13


def tiny_qwen3_omni_thinker(*, seed: int = 0):
    """A random Qwen3-Omni thinker: hidden 64, 4 query / 2 kv heads, 2 MoE layers (4 experts, top 2), interleaved
    M-RoPE, a 1-layer vision encoder (deepstack on it) and a 1-layer audio encoder (13 tokens per 100 mel frames)."""
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    text = _text_kwargs(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3],
                                             interleaved=True))
    config = Qwen3OmniMoeThinkerConfig(
        text_config=text,
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        audio_config=dict(num_mel_bins=128, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                          encoder_ffn_dim=64, output_dim=64, n_window=50, downsample_hidden_size=16),
        audio_token_id=AUDIO, video_token_id=VIDEO, image_token_id=IMAGE, audio_start_token_id=AUDIO_BOS,
        position_id_per_seconds=QWEN3_OMNI_POSITIONS_PER_SECOND,
    )
    config.vision_start_token_id, config.vision_end_token_id = VISION_BOS, VISION_EOS
    config.audio_end_token_id = AUDIO_EOS
    torch.manual_seed(seed)
    return Qwen3OmniMoeThinkerForConditionalGeneration._from_config(config).eval()


def qwen3_omni_av_inputs(*, seed: int = 0, question_lens: tuple[int, ...] = (12,)) -> dict:
    """One video with its audio per row, interleaved as Qwen3-Omni's processor lays them out (``use_audio_in_video``).

    ``<text> <vision_bos> <audio_bos> [V x4, A x26] [V x4, A x26] <audio_eos> <vision_eos> <question>``: the video has
    grid (t, h, w) = (2, 4, 4) at 2 s per grid (frames at TMRoPE time 0 and 26), the audio 400 mel frames (52 tokens,
    one time step each); a video frame goes before the audio tokens whose time it reaches. Row b asks a question of
    ``question_lens[b]`` tokens; shorter rows are left padded (id 0, mask 0).
    """
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, 140, (n,), generator=g).tolist()  # noqa: E731
    frame_times = [t * 2 * QWEN3_OMNI_POSITIONS_PER_SECOND for t in range(2) for _ in range(4)]
    audio_times = list(range(52))
    av, v, a = [], 0, 0
    while v < len(frame_times) or a < len(audio_times):
        if a == len(audio_times) or (v < len(frame_times) and frame_times[v] <= audio_times[a]):
            av, v = av + [VIDEO], v + 1
        else:
            av, a = av + [AUDIO], a + 1
    rows = [text(5) + [VISION_BOS, AUDIO_BOS] + av + [AUDIO_EOS, VISION_EOS] + text(n) for n in question_lens]
    T, B = max(map(len, rows)), len(rows)
    input_ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values_videos=torch.randn(B * 2 * 4 * 4, 3 * 2 * 16 * 16, generator=g),
        video_grid_thw=torch.tensor([[2, 4, 4]] * B),
        video_second_per_grid=torch.tensor([2.0] * B),
        input_features=torch.randn(B, 128, 400, generator=g),
        feature_attention_mask=torch.ones(B, 400, dtype=torch.long),
        use_audio_in_video=True,
    )


# Qwen2.5-VL / Qwen3-VL video: grid (t, h, w) = (3, 4, 4), 6 frames in 3 temporal patches of 2, 4 merged tokens each.
VL_VIDEO_GRID = (3, 4, 4)
VL_SECONDS_PER_GRID = 1.0  # Qwen2.5-VL: temporal_patch_size / fps, as its processor computes second_per_grid_ts


def _vl_left_padded(rows: list[list[int]], family: str, *, visual: str, grid: tuple[int, int, int],
                    g: torch.Generator) -> dict:
    """Rows left padded (id 0, mask 0) to one length, with one image or video per row (``grid``), the pixel patches
    and ``mm_token_type_ids`` (text 0, image 1, video 2) as the processor returns them."""
    patch = 14 if family == "qwen2_5_vl" else 16
    T, B = max(map(len, rows)), len(rows)
    input_ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    t, h, w = grid
    pixels = torch.randn(B * t * h * w, 3 * 2 * patch * patch, generator=g)
    grids = torch.tensor([list(grid)] * B)
    mm_token_type_ids = torch.where(input_ids == VL_IMAGE, 1, torch.where(input_ids == VL_VIDEO, 2, 0))
    out = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids)
    if visual == "image":
        out.update(pixel_values=pixels, image_grid_thw=grids)
    else:
        out.update(pixel_values_videos=pixels, video_grid_thw=grids)
        if family == "qwen2_5_vl":
            out["second_per_grid_ts"] = torch.tensor([VL_SECONDS_PER_GRID] * B)
    return out


def vl_video_inputs(family: str, *, seed: int = 0, question_lens: tuple[int, ...] = (6,)) -> dict:
    """One video per row (grid (3, 4, 4): 3 temporal patches of 2 x 2 merged tokens) as each processor lays it out.

    Qwen2.5-VL: ``<text x5> <vision_bos> [VIDEO x12] <vision_eos> <question>``, ``second_per_grid_ts`` 1.0 (frames at
    M-RoPE time 6, 6 + 4, 6 + 8 with the tiny config's ``tokens_per_second`` 4).
    Qwen3-VL: one group per temporal patch, its timestamp as text before it (``<0.5 seconds>``: 3 tokens here),
    ``<text x5> [<ts x3> <vision_bos> [VIDEO x4] <vision_eos>] x3 <question>``; ``video_grid_thw`` stays (3, 4, 4)
    per video (the model splits it into frames itself).
    Row b asks a question of ``question_lens[b]`` tokens; shorter rows are left padded (id 0, mask 0).
    """
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, 140, (n,), generator=g).tolist()  # noqa: E731
    t, h, w = VL_VIDEO_GRID
    per_frame = h * w // 4
    rows = []
    for n in question_lens:
        if family == "qwen2_5_vl":
            video = [VL_BOS] + [VL_VIDEO] * (t * per_frame) + [VL_EOS]
        else:
            video = [tok for _ in range(t) for tok in text(3) + [VL_BOS] + [VL_VIDEO] * per_frame + [VL_EOS]]
        rows.append(text(5) + video + text(n))
    return _vl_left_padded(rows, family, visual="video", grid=VL_VIDEO_GRID, g=g)


def vl_padded_image_inputs(family: str, *, seed: int = 0, question_lens: tuple[int, ...] = (6, 2)) -> dict:
    """:func:`vl_image_inputs`'s layout (one 8x8-patch image, 16 tokens) with a question of ``question_lens[b]``
    tokens in row b; shorter rows left padded (id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, 140, (n,), generator=g).tolist()  # noqa: E731
    rows = [text(5) + [VL_BOS] + [VL_IMAGE] * 16 + [VL_EOS] + text(n) for n in question_lens]
    return _vl_left_padded(rows, family, visual="image", grid=(1, 8, 8), g=g)
