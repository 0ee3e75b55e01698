"""Reconstruction evidence (``method="kvzip"``, after KVzip): the handle's second pass over the prompt, its scores
against an eager forward of the prompt written twice, the compression that follows, and what is refused."""
from __future__ import annotations

import pytest
import torch

import acckv_triton as ak
from acckv_triton.cache import BudgetedLayerCache
from acckv_triton.integrations.transformers import apply_acckv, cache_keyword, output_cache
from tests.integrations.checks import assert_unpatched_at_budget_one
from tests.integrations.tiny_models import tiny_causal_lm, tiny_gemma3, tiny_vl

T = 48


def _ids(B=2, n=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 150, (B, n), generator=g)


def _reference_scores(ids: torch.Tensor, family: str) -> list[torch.Tensor]:
    """Per layer ``[B, Hkv, T]``: each prompt token's largest attention from the second copy's queries (any head of
    its group), read from an eager forward over the prompt written twice (positions T..2T-1 for the copy)."""
    model = tiny_causal_lm(family)
    model.set_attn_implementation("eager")
    att = model(torch.cat([ids, ids], dim=1), output_attentions=True).attentions
    Hkv = model.config.num_key_value_heads
    out = []
    for a in att:  # [B, Hq, 2T, 2T]
        B, Hq = a.shape[:2]
        out.append(a[:, :, T:, :T].reshape(B, Hkv, Hq // Hkv * T, T).amax(2).float())
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_second_pass_scores_each_token_by_its_largest_attention(family, backend, monkeypatch):
    ids = _ids()
    want = _reference_scores(ids, family)
    seen = []
    end = BudgetedLayerCache.end_reconstruction

    def record(self):
        seen.append(self.store.token_mass[:, :, :self.store.max_length].clone())
        end(self)

    monkeypatch.setattr(BudgetedLayerCache, "end_reconstruction", record)
    model = tiny_causal_lm(family)
    ref_logits = model(ids).logits
    calls = []
    cfg = ak.AccKVConfig(method="kvzip", budget=0.5, recent=4, backend=backend)
    with torch.no_grad(), apply_acckv(model, cfg) as handle:
        hook = handle.decoder.register_forward_pre_hook(lambda *a, **k: calls.append(1), with_kwargs=True)
        cache = handle.new_cache()
        logits = model(ids, **{cache_keyword(model): cache}, use_cache=True).logits
        hook.remove()
    assert len(calls) == 2  # the prompt, then its reconstruction
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)  # the first pass is the model's own
    assert len(seen) == len(want)
    for got, ref in zip(seen, want):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # kept: each row's 4 most recent tokens, then Ada-KV's allocation of the reference scores across the kv heads
    # (each row's best floor(0.2 * free) first, then the best of the rest of all its heads); the copy stored nothing
    assert cache.get_seq_length() == T and not cache.awaiting_reconstruction
    free = T // 2 - 4
    floor = int(cfg.ada_floor * free)
    for layer, ref in zip(cache.compressed_layers, want):
        st = layer.store
        B, H = st.lengths.shape
        kept = torch.zeros(B, H, T, dtype=torch.bool)
        for b in range(B):
            for h in range(H):
                kept[b, h, st.position[b, h, :st.lengths[b, h]].long()] = True
        assert kept[..., T - 4:].all() and torch.equal(kept.sum(-1).sum(-1), torch.full((B,), H * T // 2))
        cand, kept = ref[..., :T - 4], kept[..., :T - 4]
        rank = cand.argsort(-1, descending=True).argsort(-1)
        assert kept[rank < floor].all()
        for b in range(B):
            shared = kept[b] & (rank[b] >= floor)
            assert cand[b][~kept[b]].max() <= cand[b][shared].min()


def test_generate_decodes_after_the_pass_and_a_second_question_ranks_by_its_window():
    model = tiny_causal_lm("llama")
    ids = _ids(B=1)
    cfg = ak.AccKVConfig(method="kvzip", budget=0.5, backend="torch", slack=4)
    with apply_acckv(model, cfg) as handle:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             return_dict_in_generate=True)
        cache = output_cache(out)
        assert cache.get_seq_length() == T + 11
        # the budget of every token seen, shared by the kv heads of each (layer, sequence), + the slack
        assert (cache.stored_tokens().sum(-1) <= 2 * ((T + 11 + 1) // 2 + 4 + 1)).all()
        more = torch.cat([out.sequences, _ids(B=1, n=9, seed=3)], dim=1)
        # a later chunk: no second pass
        logits = model(more[:, -9:], **{cache_keyword(model): cache}, use_cache=True).logits
        assert torch.isfinite(logits).all()
        assert cache.compressed_layers[0].budgeted.policy_cfg.score_evidence == "window"
        assert not cache.awaiting_reconstruction
        handle.revert()


def test_a_left_padded_batch_is_refused_before_the_forward():
    """Padding queries would score in the second pass: refused, and the cache is left empty."""
    model = tiny_causal_lm("llama")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    cfg = ak.AccKVConfig(method="kvzip", budget=0.5, backend="torch")
    with torch.no_grad(), apply_acckv(model, cfg) as handle:
        cache = handle.new_cache()
        with pytest.raises(ValueError, match="does not support a left-padded batch"):
            model(ids, attention_mask=mask, **{cache_keyword(model): cache}, use_cache=True)
        assert cache.get_seq_length() == 0 and not cache.awaiting_reconstruction
        model(ids, attention_mask=torch.ones_like(ids), **{cache_keyword(model): cache}, use_cache=True)  # unpadded
        assert cache.get_seq_length() == T and not cache.awaiting_reconstruction
    layer = BudgetedLayerCache(cfg)  # the cache API says the same
    k = torch.randn(1, 2, 4, 16)
    layer.prefill(k, k, scores=torch.zeros(1, 2, 4), valid=torch.tensor([[False, True, True, True]]))
    with pytest.raises(ValueError, match="does not support a padded prompt"):
        layer.reconstruct(torch.randn(1, 4, 4, 16), k, k)


def test_budget_one_is_the_unpatched_model():
    model = tiny_causal_lm("qwen2")
    ids = _ids(B=1)
    assert_unpatched_at_budget_one(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids)),
                                   dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                        output_logits=True))


def test_what_the_pass_cannot_repeat_is_refused():
    with pytest.raises(ValueError, match="reconstruction evidence .* Qwen2.5-VL prompts carry media"):
        apply_acckv(tiny_vl("qwen2_5_vl"), ak.AccKVConfig(method="kvzip"))
    with pytest.raises(ValueError, match="reconstruction evidence .* sliding-window caches"):
        apply_acckv(tiny_gemma3(), ak.AccKVConfig(method="kvzip"))
    apply_acckv(tiny_gemma3(), ak.AccKVConfig(method="kvzip", budget=1.0)).revert()  # nothing compressed: fine


def test_the_cache_says_what_to_call_while_a_prompt_waits():
    layer = BudgetedLayerCache(ak.AccKVConfig(method="kvzip", budget=0.5, backend="torch"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, s, 8, 16, generator=g) for s in (4, 2, 2))
    with pytest.raises(ValueError, match="has none waiting"):
        layer.reconstruct(q, k, v)
    layer.prefill(k, v, scores=layer.prompt_evidence(q, k))
    assert layer.awaiting_reconstruction and layer.store.max_length == 8
    with pytest.raises(ValueError, match=r"decode_step: the first prompt waits .* end_reconstruction\(\) first"):
        layer.decode_step(q[:, :, 0], k[:, :, :1], v[:, :, :1])
    out = layer.reconstruct(q, k, v)
    assert out.shape == (1, 8, 4, 16)
    layer.end_reconstruction()
    assert layer.store.lengths.sum() == 4 * 2 and not layer.awaiting_reconstruction
    with pytest.raises(ValueError, match="no first prompt waiting"):
        layer.end_reconstruction()
