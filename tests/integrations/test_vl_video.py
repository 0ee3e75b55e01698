"""Qwen2.5-VL and Qwen3-VL through the spec table with VIDEO inputs and LEFT PADDING (images too), on tiny random
models: budget 1.0 is the unpatched model bit for bit (one row, and 2 left-padded rows of different lengths, a second
question included), video / image tokens carry their modality from the placeholders and their time and (h, w) from
the model's own M-RoPE rows, a budget is held on left-padded rows with every kept token keeping its metadata, and a
second question continues the compressed cache."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import acckv_triton as ak  # noqa: E402
from acckv_triton.integrations.transformers import AccKVCache, apply_acckv, cache_keyword, output_cache  # noqa: E402

from .checks import assert_unpatched_at_budget_one  # noqa: E402
from .tiny_models import (VL_IMAGE, VL_SECONDS_PER_GRID, VL_VIDEO, tiny_vl, vl_padded_image_inputs,  # noqa: E402
                          vl_video_inputs)

GEN = dict(do_sample=False, pad_token_id=0, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True,
           output_logits=True)
FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
CASES = {  # name -> (visual, question_lens)
    "video-one-row": ("video", (6,)),
    "video-left-padded": ("video", (6, 2)),
    "image-left-padded": ("image", (6, 2)),
}
PADDED = ["video-left-padded", "image-left-padded"]


def _inputs(family: str, case: str) -> dict:
    visual, question_lens = CASES[case]
    if visual == "video":
        return vl_video_inputs(family, question_lens=question_lens)
    return vl_padded_image_inputs(family, question_lens=question_lens)


def _rope_rows(model, inputs) -> torch.Tensor:
    """``[3, B, T]`` (temporal, h, w) as the model's own ``get_rope_index`` computes them for the prompt."""
    extra = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    rows, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         attention_mask=inputs["attention_mask"], **extra)
    return rows.long()


def _expected_meta(inputs, rows):
    """What the store must hold per prompt token ``[B, T]``: modality from the placeholders, time from the temporal
    row, (h, w) from the h / w rows for video and image tokens and -1 for the rest."""
    ids = inputs["input_ids"]
    mod = torch.where(ids == VL_VIDEO, int(ak.Modality.VIDEO),
                      torch.where(ids == VL_IMAGE, int(ak.Modality.IMAGE), int(ak.Modality.TEXT)))
    visual = (ids == VL_VIDEO) | (ids == VL_IMAGE)
    hw = torch.where(visual[..., None], rows[1:].permute(1, 2, 0), -1)
    return mod, rows[0], hw


def _record_positions(model):
    """A pre-hook on the decoder that records the ``position_ids`` each forward gives it (what the model uses)."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True)
    return seen, hook


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_one_is_the_unpatched_model(family, case):
    model, inputs = tiny_vl(family), _inputs(family, case)
    assert_unpatched_at_budget_one(model, inputs, GEN)


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_one_second_question_on_left_padded_video_is_the_unpatched_model(family):
    """The continuation chunk and its decode (positions from the model's rope deltas) are exact too."""
    model, inputs = tiny_vl(family), vl_video_inputs(family, question_lens=(6, 2))
    question = torch.randint(1, 140, (2, 5), generator=torch.Generator().manual_seed(1))

    def two_questions():
        out = model.generate(**inputs, **GEN)
        ids2 = torch.cat([out.sequences, question], dim=1)
        mask = inputs["attention_mask"]
        mask2 = torch.cat([mask, torch.ones_like(ids2[:, mask.shape[1]:])], dim=1)
        return model.generate(input_ids=ids2, attention_mask=mask2, **{cache_keyword(model): output_cache(out)}, **GEN)

    ref = two_questions()
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)):
        out = two_questions()
    assert isinstance(output_cache(out), AccKVCache)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


@pytest.mark.parametrize("how", ["forward", "generate"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_modality_time_and_patch_come_from_the_placeholders_and_the_mrope_rows(family, case, how):
    """Every stored token of every layer and kv head (budget 1.0: nothing evicted, padding stored as the model's
    own cache stores it) carries the placeholders' modality and the model's M-RoPE time and (h, w); in ``generate``
    (4-row position ids) the decode tokens carry the time the model gave them, (h, w) -1."""
    model, inputs = tiny_vl(family), _inputs(family, case)
    positions, hook = _record_positions(model)
    try:
        with apply_acckv(model, ak.AccKVConfig(budget=1.0)) as handle:
            if how == "forward":
                cache = handle.new_cache()
                model(**inputs, **{cache_keyword(model): cache})
                fed = inputs["input_ids"]
            else:
                out = model.generate(**inputs, **GEN)
                cache, fed = output_cache(out), out.sequences[:, :-1]  # the last token generated is never fed
    finally:
        hook.remove()
    rows = _rope_rows(model, inputs)
    B, T = inputs["input_ids"].shape
    assert torch.equal(positions[0][-3:], rows)  # the rows the model ran with are get_rope_index's
    # the decode steps: the rows the model ran with (a random model may emit a placeholder id: it counts as one)
    ran = torch.cat([rows] + [p[-3:].expand(3, B, -1) for p in positions[1:]], dim=2)
    mod, time, hw = _expected_meta(dict(input_ids=fed), ran)
    n = fed.shape[1]
    for layer in cache.layers:
        store = layer.store
        assert store.seen == n and (store.lengths == n).all()
        H = store.lengths.shape[1]
        assert torch.equal(store.modality[:, :, :n].long(), mod[:, None].expand(B, H, n))
        assert torch.equal(store.time[:, :, :n].long(), time[:, None].expand(B, H, n))
        assert torch.equal(store.spatial[:, :, :n].long(), hw[:, None].expand(B, H, n, 2))

    # independent of get_rope_index: where the frames / the image sit, each merged patch its own (h, w)
    visual, _ = CASES[case]
    token = VL_VIDEO if visual == "video" else VL_IMAGE
    mod, time, hw = mod[:, :T], time[:, :T], hw[:, :T]  # the prompt
    for b in range(B):
        is_visual = inputs["input_ids"][b] == token
        frame_times = sorted(set(time[b, is_visual].tolist()))
        pads = int((inputs["attention_mask"][b] == 0).sum())
        if visual == "image":  # 5 text tokens, <vision_bos>: the image at time 6, 4 x 4 merged patches
            assert frame_times == [6] and len(set(map(tuple, hw[b, is_visual].tolist()))) == 16
        elif family == "qwen2_5_vl":  # 3 temporal patches at tokens_per_second * second_per_grid_ts apart
            step = model.config.vision_config.tokens_per_second * VL_SECONDS_PER_GRID
            assert frame_times == [6, 6 + step, 6 + 2 * step]
        else:  # Qwen3-VL: one frame group per temporal patch after its timestamp: 3 text, <bos>, 2 x 2, <eos>
            assert frame_times == [9, 16, 23]
        if visual == "video":
            for t in frame_times:
                assert len(set(map(tuple, hw[b, is_visual & (time[b] == t)].tolist()))) == 4
        assert (time[b, :pads] == 0).all() and (mod[b, :pads] == int(ak.Modality.TEXT)).all()


@pytest.mark.parametrize("case", PADDED)
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_is_held_on_left_padded_rows_and_the_kept_tokens_keep_their_metadata(family, case):
    model, inputs = tiny_vl(family), _inputs(family, case)
    visual = int(ak.Modality.VIDEO if CASES[case][0] == "video" else ak.Modality.IMAGE)
    with apply_acckv(model, ak.AccKVConfig(budget=0.5, window=4, recent=2)) as handle:
        cache = handle.new_cache()
        model(**inputs, **{cache_keyword(model): cache})
        valid = inputs["attention_mask"].sum(-1)
        assert valid[0] > valid[1]  # rows of different lengths: row 1 is left padded
        assert (cache.stored_tokens() <= torch.ceil(valid.double() * 0.5).long()[None, :, None]).all()
        out = model.generate(**inputs, **GEN)
        bound = torch.ceil(valid.double() * 0.5).long() + GEN["max_new_tokens"] - 1
        assert (output_cache(out).stored_tokens() <= bound[None, :, None]).all()
    mod, time, hw = _expected_meta(inputs, _rope_rows(model, inputs))
    mask = inputs["attention_mask"].bool()
    for layer in cache.layers:  # a kept (or merged-into) slot carries the metadata of the prompt token it keeps
        store = layer.store
        for b in range(2):
            kept_visual = False
            for h in range(store.lengths.shape[1]):
                L = int(store.lengths[b, h])
                pos = store.position[b, h, :L].long()
                assert mask[b, pos].all()  # no padding kept
                assert torch.equal(store.modality[b, h, :L].long(), mod[b, pos])
                assert torch.equal(store.time[b, h, :L].long(), time[b, pos])
                assert torch.equal(store.spatial[b, h, :L].long(), hw[b, pos])
                kept_visual |= bool((store.modality[b, h, :L] == visual).any())
            assert kept_visual  # the budget kept some video / image tokens of this row


@pytest.mark.parametrize("case", PADDED)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_a_budget_and_continue_with_a_second_question(family, case):
    model, inputs = tiny_vl(family), _inputs(family, case)
    with apply_acckv(model, ak.AccKVConfig(budget=0.5, window=4, recent=2)):
        out = model.generate(**inputs, **GEN)
        cache = output_cache(out)
        question = torch.randint(1, 140, (2, 7), generator=torch.Generator().manual_seed(3))
        ids2 = torch.cat([out.sequences, question], dim=1)
        mask = inputs["attention_mask"]
        mask2 = torch.cat([mask, torch.ones_like(ids2[:, mask.shape[1]:])], dim=1)
        out2 = model.generate(input_ids=ids2, attention_mask=mask2, **{cache_keyword(model): cache},
                              **{**GEN, "max_new_tokens": 4, "min_new_tokens": 4})
    assert output_cache(out2) is cache
    assert torch.equal(out2.sequences[:, :ids2.shape[1]], ids2)
    assert cache.get_seq_length() == ids2.shape[1] + 3
    valid2 = mask2.sum(-1)
    bound = torch.ceil(valid2.double() * 0.5).long() + 3
    assert (cache.stored_tokens() <= bound[None, :, None]).all()
    assert torch.isfinite(torch.stack(out2.logits)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_second_question_stores_the_time_the_model_gives_it(family):
    """Budget 1.0 (nothing evicted): after a second ``generate`` on the cache, every stored token's time is the
    temporal position the model ran it at (prompt, first answer, second question and its answer)."""
    model, inputs = tiny_vl(family), vl_video_inputs(family, question_lens=(6, 2))
    question = torch.randint(1, 140, (2, 5), generator=torch.Generator().manual_seed(1))
    positions, hook = _record_positions(model)
    try:
        with apply_acckv(model, ak.AccKVConfig(budget=1.0)):
            out = model.generate(**inputs, **GEN)
            ids2 = torch.cat([out.sequences, question], dim=1)
            mask = inputs["attention_mask"]
            mask2 = torch.cat([mask, torch.ones_like(ids2[:, mask.shape[1]:])], dim=1)
            cache = output_cache(model.generate(input_ids=ids2, attention_mask=mask2,
                                                **{cache_keyword(model): output_cache(out)}, **GEN))
    finally:
        hook.remove()
    ran = torch.cat([p[-3:][0] for p in positions], dim=1)  # [B, seen]: the temporal row of every forward
    for layer in cache.layers:
        n = layer.store.seen
        assert n == ran.shape[1]
        assert torch.equal(layer.store.time[:, :, :n].long(), ran[:, None].expand(-1, layer.store.time.shape[1], n))
