"""Sliding-window layers (Gemma 3's five in six, Qwen2 above ``max_window_layers``) are honoured: they keep
transformers' own window cache and attention, uncompressed, while AccKV compresses the full-attention layers.

Prompts are longer than the window and decoding runs past it, so a layer that attended beyond its window (what the
integration once did at decode and in later chunks) would change the outputs these tests compare bit for bit.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import acckv_triton as ak  # noqa: E402
from acckv_triton.integrations.transformers import AccKVLayer, apply_acckv, cache_keyword, output_cache  # noqa: E402

from .test_transformers import _left_padded  # noqa: E402
from .checks import assert_unpatched_at_budget_one  # noqa: E402
from .tiny_models import tiny_gemma3, tiny_qwen2_sliding  # noqa: E402

WINDOW = 8
GEN = dict(do_sample=False, pad_token_id=0, max_new_tokens=12, min_new_tokens=12, return_dict_in_generate=True,
           output_logits=True)
MODELS = {"gemma3": lambda: tiny_gemma3(sliding_window=WINDOW),
          "qwen2": lambda: tiny_qwen2_sliding(sliding_window=WINDOW)}


@pytest.mark.parametrize("family", list(MODELS))
def test_budget_one_with_sliding_layers_is_the_unpatched_model(family):
    assert_unpatched_at_budget_one(MODELS[family](), _left_padded((30, 21)), GEN)


def test_beam_search_with_sliding_layers_at_budget_one_is_the_unpatched_model():
    beams = dict(num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0, max_new_tokens=10,
                 min_new_tokens=10, return_dict_in_generate=True, output_scores=True)
    assert_unpatched_at_budget_one(tiny_gemma3(sliding_window=WINDOW), _left_padded((30, 21)), beams, scores="scores")


@pytest.mark.parametrize("family", list(MODELS))
def test_sliding_layers_hold_their_window_and_full_layers_their_budget(family):
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    model, inputs = MODELS[family](), _left_padded((30, 21))
    types = model.config.layer_types
    ref = output_cache(model.generate(**inputs, **GEN))
    with apply_acckv(model, ak.AccKVConfig(budget=0.5, window=4, recent=2)):
        out = model.generate(**inputs, **GEN)
    cache = output_cache(out)
    assert isinstance(ref, DynamicCache)
    for i, (layer, kind) in enumerate(zip(cache.layers, types)):
        if kind == "sliding_attention":
            assert type(layer) is DynamicSlidingWindowLayer and layer.sliding_window == WINDOW, i
            assert layer.keys.shape[-2] == WINDOW - 1  # the model's own window, as transformers keeps it
        else:
            assert isinstance(layer, AccKVLayer), i
    stored = cache.stored_tokens()
    valid = inputs["attention_mask"].sum(-1)
    bound = torch.ceil(valid.double() * 0.5).long() + GEN["max_new_tokens"] - 1
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    assert (stored[full] <= bound[None, :, None]).all()
    assert (stored[[i for i in range(len(types)) if i not in full]] == WINDOW - 1).all()
    window_bytes = sum(t.nbytes for i in range(len(types)) if i not in full
                       for t in (cache.layers[i].keys, cache.layers[i].values))
    assert cache.nbytes() == window_bytes + sum(cache.layers[i].store.nbytes() for i in full)


def _layer0_outputs(model, cache, ids: torch.Tensor, steps: int, chunk: int) -> list[torch.Tensor]:
    """Teacher-forced: the prompt, ``steps`` single tokens, then a ``chunk``-token second question; returns the
    first (sliding-window) layer's attention output at every forward."""
    outs = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: outs.append(o[0].detach().clone()))
    try:
        n = ids.shape[1] - steps - chunk
        model(ids[:, :n], **{cache_keyword(model): cache}, use_cache=True)
        for t in range(n, n + steps):
            model(ids[:, t:t + 1], **{cache_keyword(model): cache}, use_cache=True)
        model(ids[:, n + steps:], **{cache_keyword(model): cache}, use_cache=True)
    finally:
        hook.remove()
    return outs


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_a_sliding_layer_attends_within_its_window_at_decode_and_in_a_later_chunk_while_others_compress(budget):
    from transformers.cache_utils import DynamicCache

    # layer 0 is a sliding layer fed the same embeddings in both runs, so its output must match bit for bit even
    # though the full layer after it is compressed; attending beyond the window would change it after 8 tokens.
    model = tiny_gemma3(num_layers=3, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    ids = torch.randint(1, 140, (2, 44), generator=torch.Generator().manual_seed(3))
    ref = _layer0_outputs(model, DynamicCache(config=model.config), ids, steps=14, chunk=6)
    with apply_acckv(model, ak.AccKVConfig(budget=budget, window=4, recent=2, slack=4)) as handle:
        cache = handle.new_cache()
        got = _layer0_outputs(model, cache, ids, steps=14, chunk=6)
        logits = model(ids[:, -1:], **{cache_keyword(model): cache}, use_cache=True).logits
    assert len(got) == len(ref) == 16
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert torch.isfinite(logits).all()
    assert cache.get_seq_length() == ids.shape[1] + 1
    assert (cache.stored_tokens()[1] < ids.shape[1]).all()  # the full layer really was compressed


def test_logit_softcapping_and_bidirectional_attention_are_refused():
    model = tiny_gemma3()
    model.config.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        apply_acckv(model, ak.AccKVConfig())
    model.config.attn_logit_softcapping = None
    model.config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        apply_acckv(model, ak.AccKVConfig())
    assert "_acckv_handle" not in model.__dict__


def test_the_real_weight_bench_runs_on_a_model_with_sliding_layers():
    """``--suite real --model`` on a Gemma 3 checkpoint: the bench's per-modality count reads the compressed layers
    only (a sliding layer has no AccKV store)."""
    from acckv_triton.bench.realmodel import _logprobs_under

    model = tiny_gemma3(sliding_window=WINDOW)
    ids = torch.randint(1, 140, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logp, kept, held, (stored, rows) = _logprobs_under(model, ak.AccKVConfig(budget=0.5), ids[:, :30],
                                                           ids[:, 30:], "decode")
    assert logp.shape == (10, model.config.vocab_size) and torch.isfinite(logp).all()
    assert rows == 1 * 1 * model.config.num_key_value_heads  # one full layer, batch 1
    assert 0 < int(stored.sum()) <= rows * 40 and 0 < kept < 1 and held > 0
