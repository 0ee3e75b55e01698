"""The Qwen3-Omni thinker (``qwen3_omni_moe_thinker``: MoE text model, interleaved TMRoPE, deepstack vision, audio
interleaved into the video) through the spec table, on a tiny random model: budget 1.0 is the unpatched model bit for
bit (left padded too), a budget is held, audio / video tokens carry their modality from the placeholders and their
time and (h, w) from the TMRoPE rows, and a second question continues the compressed cache."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import acckv_triton as ak  # noqa: E402
from acckv_triton.integrations.transformers import apply_acckv, cache_keyword, output_cache  # noqa: E402

from .checks import assert_unpatched_at_budget_one  # noqa: E402
from .tiny_models import AUDIO, VIDEO, qwen3_omni_av_inputs, tiny_qwen3_omni_thinker  # noqa: E402

GEN = dict(do_sample=False, pad_token_id=0, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True,
           output_logits=True)
AV_START = 7  # 5 text tokens, <vision_bos>, <audio_bos>: the first video frame and audio token sit at this time


def _tmrope_rows(model, inputs) -> torch.Tensor:
    """``[3, B, T]`` (temporal, h, w) as the thinker computes them for the prompt."""
    rows, _ = model.get_rope_index(inputs["input_ids"], None, inputs["video_grid_thw"], inputs["attention_mask"], True,
                                   inputs["feature_attention_mask"].sum(-1), inputs["video_second_per_grid"])
    return rows.long()


@pytest.mark.parametrize("question_lens", [(12,), (12, 5)], ids=["one-row", "left-padded"])
def test_budget_one_is_the_unpatched_model(question_lens):
    model, inputs = tiny_qwen3_omni_thinker(), qwen3_omni_av_inputs(question_lens=question_lens)
    assert_unpatched_at_budget_one(model, inputs, GEN)


def test_budget_that_evicts_nothing_matches_the_model():
    model, inputs = tiny_qwen3_omni_thinker(), qwen3_omni_av_inputs()
    ref = model.generate(**inputs, **GEN)
    with apply_acckv(model, ak.AccKVConfig(budget=10_000)):
        out = model.generate(**inputs, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_modality_time_and_patch_come_from_the_placeholders_and_the_tmrope_rows():
    model, inputs = tiny_qwen3_omni_thinker(), qwen3_omni_av_inputs()
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)) as handle:  # nothing evicted: every token is inspectable
        cache = handle.new_cache()
        model(**inputs, **{cache_keyword(model): cache})
    ids, rows = inputs["input_ids"][0], _tmrope_rows(model, inputs)[:, 0]
    audio, video = ids == AUDIO, ids == VIDEO
    n = ids.numel()
    for layer in cache.layers:
        store = layer.store
        mod, time, hw = store.modality[0, :, :n].long(), store.time[0, :, :n], store.spatial[0, :, :n]
        assert torch.equal(mod == int(ak.Modality.AUDIO), audio.expand_as(mod))
        assert torch.equal(mod == int(ak.Modality.VIDEO), video.expand_as(mod))
        assert torch.equal(time, rows[0].expand_as(time).to(time.dtype))
        assert torch.equal(hw[:, video], rows[1:, video].T.expand_as(hw[:, video]).to(hw.dtype))
        assert (hw[:, ~video] == -1).all()
    # two frames 2 s apart at 13 positions per second, each 2 x 2 merged patches; the audio counts one per token
    assert set(rows[0, video].tolist()) == {AV_START, AV_START + 26}
    assert len(set(map(tuple, rows[1:, video].T.tolist()))) == 4
    assert rows[0, audio].tolist() == list(range(AV_START, AV_START + 52))


def test_budget_is_held_on_left_padded_rows_and_the_kept_tokens_keep_their_metadata():
    model, inputs = tiny_qwen3_omni_thinker(), qwen3_omni_av_inputs(question_lens=(12, 5))
    with apply_acckv(model, ak.AccKVConfig(budget=0.4, window=4, recent=2)) as handle:
        cache = handle.new_cache()
        model(**inputs, **{cache_keyword(model): cache})
        valid = inputs["attention_mask"].sum(-1)
        assert (cache.stored_tokens() <= torch.ceil(valid.double() * 0.4).long()[None, :, None]).all()
        out = model.generate(**inputs, **GEN)
        bound = torch.ceil(valid.double() * 0.4).long() + GEN["max_new_tokens"] - 1
        assert (output_cache(out).stored_tokens() <= bound[None, :, None]).all()
    for b in range(2):
        store = cache.layers[0].store
        L = int(store.lengths[b, 0])
        mod, time, hw = store.modality[b, 0, :L].long(), store.time[b, 0, :L], store.spatial[b, 0, :L]
        assert {int(ak.Modality.AUDIO), int(ak.Modality.VIDEO)} <= set(mod.tolist())  # both kept in layer 0, head 0
        is_video = mod == int(ak.Modality.VIDEO)
        assert (hw[is_video] >= AV_START).all() and (hw[~is_video] == -1).all()
        audio_t = time[mod == int(ak.Modality.AUDIO)]
        assert audio_t.min() >= AV_START and audio_t.max() < AV_START + 52
        assert set(time[is_video].tolist()) <= {AV_START, AV_START + 26}


def test_generate_with_a_budget_and_continue_with_a_second_question():
    model, inputs = tiny_qwen3_omni_thinker(), qwen3_omni_av_inputs()
    with apply_acckv(model, ak.AccKVConfig(budget=0.5)):
        out = model.generate(**inputs, **GEN)
        cache = output_cache(out)
        n = inputs["input_ids"].shape[1]
        assert (cache.stored_tokens() <= math.ceil(0.5 * n) + GEN["max_new_tokens"] - 1).all()
        question = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(3))
        ids2 = torch.cat([out.sequences, question], dim=1)
        out2 = model.generate(input_ids=ids2, attention_mask=torch.ones_like(ids2), **{cache_keyword(model): cache},
                              **{**GEN, "max_new_tokens": 4, "min_new_tokens": 4})
    assert output_cache(out2) is cache
    assert torch.equal(out2.sequences[:, :ids2.shape[1]], ids2)
    assert cache.get_seq_length() == ids2.shape[1] + 3
    assert (cache.stored_tokens() <= math.ceil(0.5 * ids2.shape[1]) + 3).all()
    assert torch.isfinite(torch.stack(out2.logits)).all()

