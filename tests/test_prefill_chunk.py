"""A later chunk through the cache (a second question): the kernel and torch backends give the same attention and
the same budgeted storage."""
from __future__ import annotations

import torch

from acckv_triton.cache import BudgetedLayerCache
from acckv_triton.config import AccKVConfig
from acckv_triton.bench.prefill import _av_metadata
from tests.conftest import DEVICE


def _prompt(n, T, Hq=4, Hkv=2, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mod, tm, sp = _av_metadata(n, torch.device("cpu"))
    meta = dict(modality=mod.view(1, n), time=tm.view(1, n).int(), spatial=sp.view(1, n, 2).int())
    first = dict(k=torch.randn(1, Hkv, n, D, generator=g), v=torch.randn(1, Hkv, n, D, generator=g),
                 scores=torch.rand(1, Hkv, n, generator=g), **meta)
    chunk = (torch.randn(1, Hq, T, D, generator=g), torch.randn(1, Hkv, T, D, generator=g),
             torch.randn(1, Hkv, T, D, generator=g))
    to = lambda d: {k: v.to(DEVICE) for k, v in d.items()}  # noqa: E731
    return to(first), tuple(x.to(DEVICE) for x in chunk)


def test_second_question_matches_across_backends():
    first, (q, k, v) = _prompt(1200, 24)
    outs, caches = [], []
    for backend in ("torch", "triton"):
        cache = BudgetedLayerCache(AccKVConfig(budget=0.25, backend=backend), 1, 4)
        cache.prefill(**first)
        outs.append(cache.prefill_chunk(q, k, v))
        caches.append(cache)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert outs[1].shape == (1, 24, 4, 64)
    a, b = caches
    assert torch.equal(a.store.lengths, b.store.lengths) and a.store.seen == b.store.seen == 1224
    assert a.compressions == b.compressions == 2


def test_an_empty_chunk_changes_nothing_and_an_empty_prompt_reconstructs():
    """T = 0 (an empty follow-up, an empty prompt under KVzip) is a no-op on both backends, not a refusal of the
    kernel's window count."""
    first, (q, k, v) = _prompt(600, 0)
    for backend in ("torch", "triton"):
        for method in ("acckv", "snapkv", "tova"):
            cache = BudgetedLayerCache(AccKVConfig(method=method, budget=0.25, backend=backend), 1, 4)
            cache.prefill(**first)
            before = [x.clone() for x in (cache.store.lengths, cache.store.token_mass, cache.store.k)]
            out = cache.prefill_chunk(q, k, v)
            assert out.shape == (1, 0, 4, 64)
            after = (cache.store.lengths, cache.store.token_mass, cache.store.k)
            assert all(torch.equal(x, y) for x, y in zip(before, after))
        cache = BudgetedLayerCache(AccKVConfig(method="kvzip", budget=0.25, backend=backend), 1, 4)
        cache.prefill(k, v, scores=torch.zeros(1, 2, 0, device=k.device))
        assert cache.reconstruct(q, k, v).shape == (1, 0, 4, 64)
        cache.end_reconstruction()
        assert cache.store.lengths.tolist() == [[0, 0]]
