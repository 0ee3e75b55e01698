"""The first prompt's attention and its every-query evidence from one pass (``BudgetedLayerCache.prompt_attention``).

When the evidence is every query's attention (AccKV on text, H2O) and the prompt's attention is plain causal, the
AccKV attention function computes the model's attention output itself, with the evidence, instead of calling the
model's attention and then a second pass over the same logits. The output must be the model's (float32
rounding), the evidence and so the kept tokens those of the two-pass path, and every other case must keep the
two-pass path.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import acckv_triton as ak  # noqa: E402
from acckv_triton.cache import BudgetedLayerCache  # noqa: E402
from acckv_triton.integrations import transformers as integration  # noqa: E402

from .tiny_models import tiny_causal_lm  # noqa: E402

VOCAB = 100  # under every tiny model's vocabulary


def _prompt(B: int = 1, T: int = 45, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _prefill(model, cfg, ids, **kw):
    """One forward of ``ids`` into a fresh AccKV cache: (logits, cache)."""
    with integration.apply_acckv(model, cfg) as handle:
        cache = handle.new_cache()
        with torch.no_grad():
            logits = model(ids, **{integration.cache_keyword(model): cache}, **kw).logits
    return logits, cache


def _count_calls(monkeypatch, name: str) -> list:
    calls = []
    original = getattr(BudgetedLayerCache, name)

    def spy(self, *a, **k):
        calls.append(self.layer)
        return original(self, *a, **k)

    monkeypatch.setattr(BudgetedLayerCache, name, spy)
    return calls


@pytest.mark.parametrize("family, backend, method", [("llama", "torch", "acckv"), ("qwen3", "triton", "acckv"),
                                                     ("qwen3", "torch", "h2o"), ("llama", "triton", "h2o")])
def test_one_pass_gives_the_model_output_and_the_two_pass_evidence(family, backend, method, monkeypatch):
    model = tiny_causal_lm(family)
    ids = _prompt()
    cfg = ak.AccKVConfig(method=method, budget=0.5, backend=backend)
    with torch.no_grad():
        ref_logits = model(ids).logits
    one_pass = _count_calls(monkeypatch, "prompt_attention")
    logits, cache = _prefill(model, cfg, ids)
    assert one_pass == [0, 1], "every layer's first prompt should take the one-pass path"
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)  # the model's attention output

    monkeypatch.setattr(integration, "_plain_causal", lambda *a, **k: False)  # the two-pass path
    logits2, cache2 = _prefill(model, cfg, ids)
    assert one_pass == [0, 1]
    torch.testing.assert_close(logits2, ref_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(cache.compressed_layers, cache2.compressed_layers):
        n = a.store.max_length
        assert n == b.store.max_length and n < ids.shape[1]
        assert torch.equal(a.store.lengths, b.store.lengths)
        assert torch.equal(a.store.position[..., :n], b.store.position[..., :n])  # the same tokens kept
        torch.testing.assert_close(a.store.token_mass[..., :n], b.store.token_mass[..., :n], atol=1e-5, rtol=1e-5)


def test_the_one_pass_output_is_the_model_attention_layer_by_layer(monkeypatch):
    """Each layer's returned attention equals the model's own attention function on the same inputs (the test
    fails if the one-pass output were, e.g., over the wrong keys or not causal)."""
    model = tiny_causal_lm("llama")
    ids = _prompt(T=33, seed=2)
    pairs = []
    original = BudgetedLayerCache.prompt_attention

    def spy(self, q, k, v, **kw):
        out, scores = original(self, q, k, v, **kw)
        G = q.shape[1] // k.shape[1]
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True, scale=kw["scale"])
        pairs.append((out, want.transpose(1, 2)))
        return out, scores

    monkeypatch.setattr(BudgetedLayerCache, "prompt_attention", spy)
    _prefill(model, ak.AccKVConfig(budget=0.5, backend="torch"), ids)
    assert len(pairs) == 2
    for got, want in pairs:
        assert got.shape == want.shape  # [B, T, Hq, D], transformers' layout
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_other_cases_keep_the_model_attention(monkeypatch):
    """Window evidence, a padded batch (a mask tensor), grad on, or other attention kwargs: the model's attention
    then the evidence, as before."""
    model = tiny_causal_lm("llama")
    ids = _prompt(B=2)
    one_pass = _count_calls(monkeypatch, "prompt_attention")
    _prefill(model, ak.AccKVConfig(method="snapkv", budget=0.5), ids)  # window evidence
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    _prefill(model, ak.AccKVConfig(budget=0.5), ids, attention_mask=mask)  # left padding: transformers' mask
    assert one_pass == []
    q = torch.zeros(1, 4, 3, 16, requires_grad=True)
    assert not integration._plain_causal(model.model.layers[0].self_attn, q, None, {})
    assert not integration._plain_causal(model.model.layers[0].self_attn, q.detach(), None, {"s_aux": q})
    assert integration._plain_causal(model.model.layers[0].self_attn, q.detach(), None, {"position_ids": None})


def test_prompt_attention_refuses_window_evidence():
    cache = BudgetedLayerCache(ak.AccKVConfig(method="snapkv", budget=0.5), 0, 1)
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 8, 16)
    assert not cache.reads_every_query()
    with pytest.raises(ValueError, match="prompt_attention needs every-query evidence"):
        cache.prompt_attention(q, k, k, scale=0.25)
    acckv = BudgetedLayerCache(ak.AccKVConfig(budget=0.5), 0, 1)
    assert acckv.reads_every_query(False) and not acckv.reads_every_query(True)  # auto: the window on AV prompts
    with pytest.raises(ValueError, match="valid must be a"):
        acckv.prompt_attention(q, k, k, scale=0.25, valid=torch.ones(1, 7, dtype=torch.bool), audio_video=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prompt_attention_with_left_padding_matches_the_reference(backend, dtype):
    """The cache API on its own: left padding as ``valid`` (NaN in the padded keys and values), out against the
    float64 reference at the valid queries and 0 at the padded ones, scores equal to prompt_evidence's."""
    from acckv_triton import reference

    B, Hq, Hkv, T, D = 2, 6, 2, 37, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :9] = False
    k[1, :, :9], v[1, :, :9] = float("nan"), float("nan")
    cache = BudgetedLayerCache(ak.AccKVConfig(method="h2o", budget=0.5, backend=backend), 0, 1)
    out, scores = cache.prompt_attention(q, k, v, scale=0.3, valid=valid)
    want = reference.observed_attention(q, k, v, scale=0.3, key_start=torch.tensor([0, 9]))
    assert out.shape == (B, T, Hq, D) and out.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[0].float(), want.out[0].transpose(0, 1).float(), **tol)
    torch.testing.assert_close(out[1, 9:].float(), want.out[1, :, 9:].transpose(0, 1).float(), **tol)
    assert torch.all(out[1, :9] == 0)
    torch.testing.assert_close(scores, want.key_mass, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores, cache.prompt_evidence(q, k, scale=0.3, valid=valid), atol=1e-5, rtol=1e-5)
