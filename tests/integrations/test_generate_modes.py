"""generate() modes beyond greedy: beam search, num_return_sequences, batch selection, assisted decoding (crop).

Each works on the compressed cache (every per-row tensor and metadata reordered together) and is bit-identical to
the unpatched model at budget 1.0, or is refused with an error that names the mode.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import acckv_triton as ak  # noqa: E402
from acckv_triton.integrations.transformers import AccKVCache, apply_acckv, cache_keyword, output_cache  # noqa: E402

from .test_transformers import _left_padded  # noqa: E402
from .tiny_models import tiny_causal_lm  # noqa: E402

BEAMS = dict(num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0, max_new_tokens=8,
             min_new_tokens=8, return_dict_in_generate=True, output_scores=True)


def test_beam_search_at_budget_one_is_the_unpatched_model():
    model = tiny_causal_lm("qwen2")
    inputs = _left_padded((30, 22))
    ref = model.generate(**inputs, **BEAMS)
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)):
        out = model.generate(**inputs, **BEAMS)
    assert isinstance(output_cache(out), AccKVCache)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.sequences_scores, ref.sequences_scores)


def test_beam_search_on_the_compressed_cache_reorders_every_row():
    """Below budget 1.0 every beam carries its own compressed rows, and the cache stays at the budget
    (test_select_rows_moves_storage_targets_and_metadata_together checks what a reorder moves)."""
    model = tiny_causal_lm("llama")
    inputs = _left_padded((40, 40))
    with apply_acckv(model, ak.AccKVConfig(budget=0.5, window=8, recent=4)):
        out = model.generate(**inputs, **BEAMS)
    stored = output_cache(out).stored_tokens()
    assert stored.shape[1] == 2 * 3  # B x num_beams rows
    assert (stored <= 20 + 8).all()  # the budget of the 40-token prompt plus the new tokens (no upkeep yet)


def test_select_rows_moves_storage_targets_and_metadata_together():
    cfg = ak.AccKVConfig(budget=0.5, backend="torch")
    cache = ak.BudgetedLayerCache(cfg, 0, 1)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 2, 50, 16, generator=g)
    modality = torch.randint(0, 3, (3, 50), generator=g).to(torch.uint8)
    cache.prefill(k, torch.randn_like(k), scores=torch.rand(3, 2, 50, generator=g), modality=modality)
    before = {name: getattr(cache.store, name).clone() for name in ("k", "v", "modality", "token_mass", "lengths")}
    target = cache.target.clone()
    index = torch.tensor([2, 0, 0, 1])
    cache.select_rows(index)
    for name, x in before.items():
        assert torch.equal(getattr(cache.store, name), x[index]), name
    assert torch.equal(cache.target, target[index])
    q = torch.randn(4, 4, 16, generator=g)
    step = cache.decode_step(q, torch.randn(4, 2, 1, 16, generator=g), torch.randn(4, 2, 1, 16, generator=g))
    assert step.out.shape == (4, 4, 16)


def test_assisted_decoding_works_at_budget_one_and_is_refused_below():
    model, assistant = tiny_causal_lm("llama"), tiny_causal_lm("llama", seed=1)
    inputs = _left_padded((24,))
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=6, min_new_tokens=6)
    ref = model.generate(**inputs, **kw)
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)):
        out = model.generate(**inputs, assistant_model=assistant, **kw)
    assert torch.equal(out, ref)  # greedy assisted decoding: the target model's own greedy tokens
    with apply_acckv(model, ak.AccKVConfig(budget=0.5)):
        with pytest.raises(ValueError, match="[Aa]ssisted decoding"):
            model.generate(**inputs, assistant_model=assistant, **kw)


def test_crop_below_budget_one_names_the_mode():
    model = tiny_causal_lm("llama")
    handle = apply_acckv(model, ak.AccKVConfig(budget=0.5))
    cache = handle.new_cache()
    model(**_left_padded((30,)), **{cache_keyword(model): cache})
    with pytest.raises(ValueError, match="assisted decoding, crop"):
        cache.crop(-2)
    handle.revert()


def test_beam_search_on_the_omni_thinker_at_budget_one_is_the_unpatched_model():
    from .tiny_models import omni_av_inputs, tiny_omni_thinker

    model = tiny_omni_thinker()
    inputs = omni_av_inputs(question_len=6)
    kw = dict(BEAMS, max_new_tokens=4, min_new_tokens=4)
    ref = model.generate(**inputs, **kw)
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)):
        out = model.generate(**inputs, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    with apply_acckv(model, ak.AccKVConfig(budget=0.5)):
        out = model.generate(**inputs, **kw)  # the compressed AV cache reordered beam by beam
    assert out.sequences.shape == ref.sequences.shape


def test_sampling_with_num_return_sequences_at_budget_one_is_the_unpatched_model():
    model = tiny_causal_lm("qwen3")
    inputs = _left_padded((26, 19))
    kw = dict(do_sample=True, top_k=20, num_return_sequences=3, pad_token_id=0, max_new_tokens=6, min_new_tokens=6)
    torch.manual_seed(7)
    ref = model.generate(**inputs, **kw)
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)):
        torch.manual_seed(7)
        out = model.generate(**inputs, **kw)
    assert out.shape[0] == 6 and torch.equal(out, ref)
