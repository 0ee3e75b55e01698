"""Mistral, Gemma 3, Qwen2.5-VL and Qwen3-VL through the spec table, on tiny random models: budget 1.0 is the
unpatched model bit for bit, a budget is held, image tokens carry their modality and (h, w) from the placeholders and M-RoPE rows,
a second question continues the compressed cache."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import acckv_triton as ak  # noqa: E402
from acckv_triton.integrations.transformers import apply_acckv, cache_keyword, output_cache  # noqa: E402

from .test_transformers import _left_padded  # noqa: E402
from .tiny_models import tiny_gemma3, tiny_mistral, tiny_vl, vl_image_inputs  # noqa: E402

GEN = dict(do_sample=False, pad_token_id=0, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True,
           output_logits=True)
FAMILIES = ["mistral", "gemma3", "qwen2_5_vl", "qwen3_vl"]


def _model_and_inputs(family):
    if family == "mistral":
        return tiny_mistral(), _left_padded((30, 21))
    if family == "gemma3":  # five sliding-window layers of 8 tokens, then a full one (tests/test_sliding_window.py)
        return tiny_gemma3(), _left_padded((30, 21))
    return tiny_vl(family), vl_image_inputs(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_one_is_the_unpatched_model(family):
    model, inputs = _model_and_inputs(family)
    ref = model.generate(**inputs, **GEN)
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)):
        out = model.generate(**inputs, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_is_held_and_a_second_question_continues(family):
    model, inputs = _model_and_inputs(family)
    with apply_acckv(model, ak.AccKVConfig(budget=0.5, window=4, recent=2)):
        out = model.generate(**inputs, **GEN)
        cache = output_cache(out)
        valid = inputs["attention_mask"].sum(-1)
        bound = torch.ceil(valid.double() * 0.5).long() + GEN["max_new_tokens"] - 1
        assert (cache.stored_tokens() <= bound[None, :, None]).all()
        question = torch.randint(1, 140, (out.sequences.shape[0], 5), generator=torch.Generator().manual_seed(1))
        ids2 = torch.cat([out.sequences, question], dim=1)
        mask = inputs["attention_mask"]
        mask2 = torch.cat([mask, torch.ones_like(ids2[:, mask.shape[1]:])], dim=1)
        out2 = model.generate(input_ids=ids2, attention_mask=mask2, **{cache_keyword(model): cache}, **GEN)
    assert output_cache(out2) is cache and torch.equal(out2.sequences[:, :ids2.shape[1]], ids2)
    assert cache.get_seq_length() == ids2.shape[1] + GEN["max_new_tokens"] - 1
    assert torch.isfinite(torch.stack(out2.logits)).all()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_image_tokens_carry_modality_and_patch_position(family):
    model, inputs = _model_and_inputs(family)
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)) as handle:  # nothing evicted: every token is inspectable
        cache = handle.new_cache()
        model(**inputs, **{cache_keyword(model): cache})
    store = cache.layers[0].store
    image = inputs["input_ids"][0] == 150
    mod = store.modality[0, 0, :image.numel()]
    assert torch.equal(mod == int(ak.Modality.IMAGE), image)
    hw = store.spatial[0, 0, :image.numel()]
    assert (hw[image] >= 0).all() and (hw[~image] == -1).all()
    assert len(set(map(tuple, hw[image].tolist()))) == 16  # 4 x 4 merged patches, each its own (h, w)


def test_mistral_with_a_sliding_window_in_every_layer_is_refused_below_budget_one():
    model = tiny_mistral(sliding_window=4096)
    with pytest.raises(ValueError, match=r"every layer .* sliding-window attention \(config.sliding_window=4096\)"):
        apply_acckv(model, ak.AccKVConfig())
    assert "_acckv_handle" not in model.__dict__  # nothing was patched
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)):  # nothing to compress, nothing refused: the model's own cache
        pass
