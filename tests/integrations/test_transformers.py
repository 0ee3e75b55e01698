"""The transformers integration on tiny random ``from_config`` models (CPU, no download).

Budget 1.0 must be the unpatched model bit for bit; a budget that evicts nothing must run every compressed path
(window scores, policy, compaction, decode attention, chunk attention) and still match it to float32 rounding; real
budgets must respect the bounds; revert() must restore everything.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import acckv_triton as ak  # noqa: E402
from acckv_triton.integrations.transformers import (  # noqa: E402
    AccKVCache, acckv, apply_acckv, cache_keyword, output_cache)

from tests.conftest import DEVICE  # noqa: E402

from .tiny_models import VOCAB, omni_av_inputs, tiny_causal_lm, tiny_omni_thinker  # noqa: E402

GREEDY = dict(do_sample=False, pad_token_id=0)


def _left_padded(batch_lengths=(40, 31), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    T = max(batch_lengths)
    ids = torch.randint(3, VOCAB - 20, (len(batch_lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(batch_lengths):
        mask[b, T - n:] = 1
        ids[b, :T - n] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _generate(model, inputs, n=10, **kw):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, return_dict_in_generate=True,
                          output_logits=True, **GREEDY, **kw)


def _acckv_names() -> set:
    return {k for k in list(AttentionInterface._global_mapping) + list(AttentionMaskInterface._global_mapping)
            if k.startswith("acckv")}


# ------------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_budget_one_is_the_unpatched_model(family):
    model = tiny_causal_lm(family)
    inputs = _left_padded()
    ref = _generate(model, inputs)
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)):
        out = _generate(model, inputs)
    assert isinstance(output_cache(out), AccKVCache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)
    stored = output_cache(out).stored_tokens()
    assert stored.shape == (2, 2, 2)  # [layers, B, Hkv]
    assert (stored == output_cache(out).get_seq_length()).all()


def test_budget_one_is_the_unpatched_omni_thinker_with_audio_and_video():
    model = tiny_omni_thinker()
    inputs = omni_av_inputs()
    ref = _generate(model, inputs, n=8)
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)):
        out = _generate(model, inputs, n=8)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_budget_that_evicts_nothing_matches_the_model_through_every_compressed_path(family):
    """An int budget above the prompt length runs prefill scoring, the policy, compaction (padding dropped), decode
    attention with mass accumulation and a second multi-token chunk, and must still give the model's logits."""
    model = tiny_causal_lm(family)
    inputs = _left_padded()
    ref = _generate(model, inputs, n=6)
    question = torch.randint(3, VOCAB - 20, (2, 7), generator=torch.Generator().manual_seed(1))
    with apply_acckv(model, ak.AccKVConfig(budget=10_000)):
        out = _generate(model, inputs, n=6)  # prefill + decode
        assert all(layer.budgeted.compressions == 1 for layer in output_cache(out).layers)
        # continuation: a cache holding only the prompt (one token generated from the prefill), then a second
        # question as one 8-token chunk over the compressed cache, then decode steps after it
        first = _generate(model, inputs, n=1)
        cache = output_cache(first)
        ids2 = torch.cat([first.sequences, question], dim=1)
        mask2 = torch.cat([inputs["attention_mask"], torch.ones(2, 8, dtype=torch.long)], dim=1)
        out2 = _generate(model, dict(input_ids=ids2, attention_mask=mask2), n=4, **{cache_keyword(model): cache})
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    ref2 = _generate(model, dict(input_ids=ids2, attention_mask=mask2), n=4)
    assert torch.equal(out2.sequences, ref2.sequences)
    for a, b in zip(out2.logits, ref2.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # left padding is never stored: each row holds exactly its valid tokens plus what followed
    seen = cache.get_seq_length()
    pad = (inputs["attention_mask"] == 0).sum(-1)
    assert (cache.stored_tokens() == (seen - pad)[None, :, None]).all()


def test_omni_thinker_budget_that_evicts_nothing_matches_the_model():
    model = tiny_omni_thinker()
    inputs = omni_av_inputs()
    ref = _generate(model, inputs, n=5)
    with apply_acckv(model, ak.AccKVConfig(budget=10_000)):
        out = _generate(model, inputs, n=5)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("budget", [0.5, 0.25, 17], ids=["50%", "25%", "17-tokens"])
def test_prefill_stores_at_most_the_budget_then_grows_one_per_decode_step(budget):
    model = tiny_causal_lm("llama")
    inputs = _left_padded((57, 40))
    handle = apply_acckv(model, ak.AccKVConfig(budget=budget, window=8, recent=4))
    cache = handle.new_cache()
    logits = model(**inputs, **{cache_keyword(model): cache}).logits
    valid = inputs["attention_mask"].sum(-1)
    bound = valid.float().mul(budget).ceil().long() if isinstance(budget, float) else valid.clamp(max=budget)
    after_prefill = cache.stored_tokens()
    assert (after_prefill <= bound[None, :, None]).all() and (after_prefill > 0).all()
    mask = inputs["attention_mask"]
    for step in range(1, 4):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        logits = model(input_ids=nxt, attention_mask=mask, **{cache_keyword(model): cache}).logits
        assert torch.equal(cache.stored_tokens(), after_prefill + step)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 3
    assert cache.nbytes() > 0
    handle.revert()


def test_omni_thinker_budget_with_modality_time_and_patch_metadata():
    model = tiny_omni_thinker()
    inputs = omni_av_inputs()
    with acckv(model, ak.AccKVConfig(budget=0.4)) as handle:
        cache = handle.new_cache()
        model(**inputs, **{cache_keyword(model): cache})
        n = inputs["input_ids"].shape[1]
        assert (cache.stored_tokens() <= math.ceil(0.4 * n)).all()
        store = cache.layers[0].store
        L = store.max_length
        mod, time, spatial = store.modality[0, 0, :L].long(), store.time[0, 0, :L], store.spatial[0, 0, :L]
        assert {1, 2} <= set(mod.tolist())  # audio and video both kept somewhere... in layer 0, head 0
        # audio time is TMRoPE's 25 per second, video frames sit at 0 and 50 after the text offset; patches carry (h, w)
        assert ((spatial[mod == 2] >= 0).all() and (spatial[mod != 2] == -1).all())
        audio_t = time[mod == 1]
        assert audio_t.min() >= 6 and audio_t.max() <= 6 + 99
        assert set(time[mod == 2].tolist()) <= {6, 56}


def test_upkeep_keeps_the_budget_over_a_long_generation():
    """The prompt's budget held over 60 steps (decode_budget "fixed"; "all" grows it, tests/test_budgets_...)."""
    model = tiny_causal_lm("qwen2")
    cfg = ak.AccKVConfig(budget=0.25, slack=8, window=8, recent=4, decode_budget="fixed")
    prompt = _left_padded((64,))
    with apply_acckv(model, cfg) as handle:
        cache = handle.new_cache()
        logits = model(**prompt, **{cache_keyword(model): cache}).logits
        target = cache.layers[0].budgeted.target
        assert (target == 16).all()
        peak = 0
        for _ in range(60):
            nxt = logits[:, -1:].argmax(-1)
            logits = model(nxt, **{cache_keyword(model): cache}).logits
            stored = cache.stored_tokens()
            peak = max(peak, int(stored.max()))
            assert (stored <= 16 + 8).all()
        assert peak == 16 + 8
        assert all(layer.budgeted.compressions >= 5 for layer in cache.layers)
        assert cache.get_seq_length() == 124


def test_generate_with_a_budget_on_the_omni_thinker_and_continue_with_a_second_question():
    model = tiny_omni_thinker()
    inputs = omni_av_inputs()
    with apply_acckv(model, ak.AccKVConfig(budget=0.5)):
        out = _generate(model, inputs, n=6)
        cache = output_cache(out)
        n = inputs["input_ids"].shape[1]
        assert (cache.stored_tokens() <= math.ceil(0.5 * n) + 5).all()
        question = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(3))
        ids2 = torch.cat([out.sequences, question], dim=1)
        out2 = _generate(model, dict(input_ids=ids2, attention_mask=torch.ones_like(ids2)), n=4,
                         **{cache_keyword(model): cache})
    assert output_cache(out2) is cache
    assert torch.equal(out2.sequences[:, :ids2.shape[1]], ids2)
    assert cache.get_seq_length() == ids2.shape[1] + 3
    prompt_tokens = ids2.shape[1]  # the first prompt, the 5 answer tokens decoded into the cache, the second chunk
    assert (cache.stored_tokens() <= math.ceil(0.5 * prompt_tokens) + 3).all()
    assert torch.isfinite(torch.stack(out2.logits)).all()


# ------------------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("family", ["llama", "omni"])
def test_triton_backend_matches_the_torch_backend_inside_the_model(family):
    """The kernels (interpreted here) run inside the real model code: window_scores, compact_kv (with merges on the
    audio-video prompt) and decode_attention; the torch backend (acckv_triton.torch_ops) must agree."""
    if family == "omni":
        model, inputs = tiny_omni_thinker(), omni_av_inputs()
    else:
        model, inputs = tiny_causal_lm("llama", num_layers=1), _left_padded((36, 29))
    # the triton backend hands the model's tensors to the kernels, which need CUDA tensors on a GPU
    model = model.to(DEVICE)
    inputs = {name: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for name, x in inputs.items()}
    outs = {}
    for backend in ("torch", "triton"):
        with apply_acckv(model, ak.AccKVConfig(budget=0.4, window=8, recent=4, backend=backend)) as handle:
            cache = handle.new_cache()
            logits = [model(**inputs, **{cache_keyword(model): cache}).logits[:, -1]]
            mask = inputs["attention_mask"]
            for _ in range(3):
                nxt = logits[-1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                # (the thinker derives decode positions from a 2-D mask only inside generate: give it none)
                step_mask = None if family == "omni" else mask
                logits.append(model(input_ids=nxt, attention_mask=step_mask, **{cache_keyword(model): cache})
                              .logits[:, -1])
            store = cache.layers[0].store
            stored = torch.arange(store.capacity, device=DEVICE) < store.lengths.long()[..., None]
            outs[backend] = (torch.stack(logits), cache.stored_tokens(), store.token_mass[stored],
                             store.multiplicity[stored], store.capacity)  # slots past a row's length: leftovers
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(outs["triton"][1], outs["torch"][1])
    torch.testing.assert_close(outs["triton"][2], outs["torch"][2], atol=1e-4, rtol=1e-4)
    assert torch.equal(outs["triton"][3], outs["torch"][3])
    assert outs["triton"][4] == outs["torch"][4]  # both size the storage to the budget plus slack + 1
    if family == "omni":
        assert outs["torch"][3].max() > 1  # the audio-video prompt merged tokens: multiplicity is exercised


# ------------------------------------------------------------------------------------------------ patch hygiene
def test_revert_restores_the_model_exactly():
    model = tiny_causal_lm("llama")
    inputs = _left_padded()
    ref = _generate(model, inputs)
    handle = apply_acckv(model, ak.AccKVConfig(budget=0.3))
    assert model.config._attn_implementation == "acckv_sdpa" and _acckv_names()
    patched = _generate(model, inputs)
    assert not torch.equal(torch.stack(patched.logits), torch.stack(ref.logits))
    handle.revert()
    handle.revert()  # idempotent
    assert model.config._attn_implementation == "sdpa"
    assert not _acckv_names()
    assert "_prepare_cache_for_generation" not in model.__dict__
    assert not model._forward_pre_hooks and not model.model._forward_pre_hooks and not model.model._forward_hooks
    assert not any(hasattr(layer.self_attn, "_acckv_state") for layer in model.model.layers)
    out = _generate(model, inputs)
    assert isinstance(output_cache(out), DynamicCache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)


def test_caches_the_patch_cannot_compress_are_refused_or_warned_about():
    """A cache the patched model would run uncompressed is never silent: generate's static cache is refused, a
    user-given DynamicCache warned about (once); an AccKVCache used after revert (no AccKV attention) is refused
    with the remedy, not a shape error from transformers' mask code."""
    model = tiny_causal_lm("llama")
    inputs = _left_padded((24, 24))
    with acckv(model, ak.AccKVConfig(budget=0.3)):
        with pytest.raises(ValueError, match="cache_implementation='static'"):
            _generate(model, inputs, n=2, cache_implementation="static")
        with pytest.warns(UserWarning, match="DynamicCache was passed .* not compressed"):
            model(**inputs, **{cache_keyword(model): DynamicCache()})
        cache = output_cache(_generate(model, inputs, n=2))
    assert isinstance(cache, AccKVCache)
    ids = torch.randint(3, VOCAB - 20, (2, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="only a model patched by apply_acckv"):
        model(input_ids=ids, **{cache_keyword(model): cache})


def test_a_hand_built_cache_names_a_bad_layer_count():
    """AccKVCache(cfg, num_layers): a non-int or a count below 1 is named, not a 'can't multiply sequence' TypeError or
    a complaint about a model_config that was never given."""
    cfg = ak.AccKVConfig(budget=0.5)
    for bad, error in (("2", TypeError), (2.0, TypeError), (True, TypeError), (0, ValueError), (-1, ValueError)):
        with pytest.raises(error, match="num_layers must be"):
            AccKVCache(cfg, bad)
    assert len(AccKVCache(cfg, 2).layers) == 2


def test_what_the_compressed_attention_cannot_honour_is_refused():
    """Below budget 1.0: an offloaded cache (transformers builds a DynamicCache for it, and the request would be
    lost), output_attentions (the fused attention returns no weights) and an attention implementation
    switched after patching (the layers would attend without the cache) raise, naming the setting."""
    model = tiny_causal_lm("llama")
    inputs = _left_padded((24, 24))
    with acckv(model, ak.AccKVConfig(budget=0.3)) as handle:
        with pytest.raises(ValueError, match="cache_implementation='offloaded'"):
            _generate(model, inputs, n=2, cache_implementation="offloaded")
        with pytest.raises(ValueError, match="output_attentions=True"):
            model(**inputs, **{cache_keyword(model): handle.new_cache()}, output_attentions=True)
        model.set_attn_implementation("eager")
        with pytest.raises(ValueError, match="switched to 'eager' after apply_acckv"):
            _generate(model, inputs, n=2)
    assert model.config._attn_implementation == "sdpa"


def test_a_base_model_can_be_patched_for_hand_written_loops():
    model = tiny_causal_lm("llama")
    ids = _left_padded((40, 40))["input_ids"]
    with acckv(model.model, ak.AccKVConfig(budget=0.25)) as handle:
        assert "_prepare_cache_for_generation" not in model.model.__dict__  # no generate to hook
        cache = handle.new_cache()
        model.model(input_ids=ids, **{cache_keyword(model.model): cache}, use_cache=True)
        assert (cache.stored_tokens() == 10).all()
    assert model.config._attn_implementation == "sdpa"


def test_cache_keyword_names_the_forward_argument_this_transformers_version_takes():
    """``cache=`` from transformers 5.24 (``past_key_values`` warns there), ``past_key_values=`` before: a
    hand-written loop that passes the cache under ``cache_keyword`` fills it, without a deprecation warning."""
    import inspect
    import warnings

    model = tiny_causal_lm("llama")
    name = cache_keyword(model)
    assert name in ("cache", "past_key_values") and name in inspect.signature(model.forward).parameters
    if "cache" in inspect.signature(model.forward).parameters:
        assert name == "cache"
    ids = _left_padded((40, 40))["input_ids"]
    with acckv(model, ak.AccKVConfig(budget=0.25)) as handle:
        cache = handle.new_cache()
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            out = model(input_ids=ids, use_cache=True, **{name: cache})
        assert (cache.stored_tokens() == 10).all()
        assert output_cache(out) is cache  # and the output carries it under this version's name


def test_other_models_stay_untouched_even_when_sharing_the_config():
    patched = tiny_causal_lm("llama", seed=0)
    other = tiny_causal_lm("llama", seed=1)
    sharing = type(patched)(patched.config).eval()  # same config object as the patched model
    inputs = _left_padded()
    refs = [_generate(m, inputs) for m in (other, sharing)]
    with acckv(patched, ak.AccKVConfig(budget=0.3)):
        for m, ref in zip((other, sharing), refs):
            out = _generate(m, inputs)
            assert isinstance(output_cache(out), DynamicCache)
            assert torch.equal(out.sequences, ref.sequences)
            for a, b in zip(out.logits, ref.logits):
                assert torch.equal(a, b)


def test_unsupported_model_and_double_patch_raise():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel._from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    from acckv_triton.integrations.transformers import SUPPORTED_MODELS

    assert {"Llama", "Qwen2", "Qwen3", "Mistral", "Gemma 3", "Qwen2.5-VL", "Qwen3-VL",
            "Qwen2.5-Omni thinker"} <= set(SUPPORTED_MODELS)
    with pytest.raises(ValueError, match=re.escape(", ".join(SUPPORTED_MODELS)) + ".*'gpt2'"):
        apply_acckv(gpt2, ak.AccKVConfig())
    model = tiny_causal_lm("llama")
    with acckv(model, ak.AccKVConfig(budget=0.5)):
        with pytest.raises(ValueError, match="already patched"):
            apply_acckv(model, ak.AccKVConfig())
    apply_acckv(model, ak.AccKVConfig()).revert()  # patchable again after the context exits


def test_importing_patches_nothing():
    code = (
        "import sys, acckv_triton, acckv_triton.integrations\n"
        "assert 'transformers' not in sys.modules, 'acckv_triton imported transformers'\n"
        "import acckv_triton.integrations.transformers\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "names = list(AttentionInterface._global_mapping) + list(AttentionMaskInterface._global_mapping)\n"
        "assert not [n for n in names if n.startswith('acckv')], names\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
