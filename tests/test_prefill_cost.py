"""The end of prefill as a handful of device operations: counted on the CPU at N = 32k, for every method.

One layer of a Qwen2.5-Omni-7B-shaped thinker (4 kv heads, D 128) with the AV layout, through
``BudgetedLayerCache.prefill`` (window scores given) on the kernel backend: torch ops (an ``OpCounter``) plus Triton
launches stay within 40 and nothing is read back from the device. The kernels are counted, not run (a dry run: with
0 syncs the host never depends on their results); ``tests/test_fused_policy.py`` checks what they compute.
"""
from __future__ import annotations

import pytest
import torch

from acckv_triton.bench.opcount import OpCounter, count_triton_launches
from acckv_triton.bench.prefill import _av_metadata
from acckv_triton.cache import BudgetedLayerCache
from acckv_triton.config import METHODS, AccKVConfig

N, HKV, D = 32768, 4, 128
MAX_DEVICE_OPS = 40


@pytest.fixture(scope="module")
def prompt():
    mod, tm, sp = _av_metadata(N, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, HKV, N, D, generator=g).half()
    return dict(k=k, v=torch.randn_like(k), scores=torch.rand(1, HKV, N, generator=g),
                modality=mod.view(1, N), time=tm.view(1, N).int(), spatial=sp.view(1, N, 2).int())


@pytest.mark.parametrize("cfg", [pytest.param(AccKVConfig(method=m), id=m) for m in METHODS
                                 if m not in ("full", "kvzip")] +
                         [pytest.param(AccKVConfig(budget=0.1, pool_mode="avg", head_renorm=True), id="acckv-variant")])
def test_end_of_prefill_is_a_few_device_operations(cfg, prompt):
    """Every method within 40 device operations; none reads anything back but Ada-KV, whose heads get different
    lengths: the storage is as long as the longest row, which the host reads (one sync), so its kernels run for
    real (interpreted, seconds) where the others' are only counted."""
    cache = BudgetedLayerCache(cfg.replace(backend="triton"), layer=3, num_layers=28)
    with count_triton_launches(dry_run=not cfg.adaptive_heads) as launches, OpCounter() as ops:
        cache.prefill(**prompt)
    total = ops.ops + sum(launches.values())
    assert ops.syncs == int(cfg.adaptive_heads), dict(ops.sync_ops)
    assert total <= MAX_DEVICE_OPS, (dict(ops.by_name), dict(launches))
    assert launches["_gather_merge_kernel"] == 1  # the compaction is counted too
    assert cache.store.capacity < N  # compacted out of the prompt: the prefill-size storage is gone


def test_acckv_on_a_text_prompt_too(prompt):
    """AccKV on a text prompt ranks by every query's mean (the mass divided by the queries that saw each token, times
    ||v||) and, on the rows prompt_attention found broad, by the last query (``broad_entropy``): its prefill stays
    within the 40 device operations, with no sync (the rule's own dozen ops run in prompt_attention, with the
    attention)."""
    k, v = prompt["k"], prompt["v"]
    q = k.repeat_interleave(2, dim=1)  # G = 2 (queries: the keys; only the counts matter)
    cache = BudgetedLayerCache(AccKVConfig(backend="triton"), layer=3, num_layers=28)
    with count_triton_launches(dry_run=True), OpCounter() as ops:
        _, scores = cache.prompt_attention(q, k, v, audio_video=False)
    assert ops.syncs == 0 and cache._broad is not None
    with count_triton_launches(dry_run=True) as launches, OpCounter() as ops:
        cache.prefill(k, v, scores=scores)
    assert ops.syncs == 0, dict(ops.sync_ops)
    assert ops.ops + sum(launches.values()) <= MAX_DEVICE_OPS, (dict(ops.by_name), dict(launches))
    assert ops.by_name["where"] == 1 and ops.by_name["linalg_vector_norm"] == 1  # the rule and ||v|| did run


def test_the_reconstruction_pass_is_two_launches_and_its_compression_reads_back_like_ada_kv(prompt):
    """kvzip: prefill stores the prompt whole (no compression, nothing read back); the second pass's attention over
    it is two launches and no sync; the compression after it shares the budget across heads as Ada-KV does (its
    one sync)."""
    cache = BudgetedLayerCache(AccKVConfig(method="kvzip", backend="triton"), layer=3, num_layers=28)
    with count_triton_launches(dry_run=True), OpCounter() as ops:
        cache.prefill(**prompt)
    assert ops.syncs == 0 and cache.awaiting_reconstruction and cache.store.max_length == N
    with count_triton_launches(dry_run=True) as launches, OpCounter() as ops:
        cache.reconstruct(prompt["k"], prompt["k"], prompt["v"])  # queries: the prompt's keys (G = 1)
    assert ops.syncs == 0 and dict(launches) == {"_chunk_attn_kernel": 1, "_chunk_mass_kernel": 1}
    assert ops.ops <= 5, dict(ops.by_name)
    with count_triton_launches() as launches, OpCounter() as ops:  # run: the longest row is read back
        cache.end_reconstruction()
    assert ops.syncs == 1, dict(ops.sync_ops)
    assert ops.ops + sum(launches.values()) <= MAX_DEVICE_OPS, (dict(ops.by_name), dict(launches))
    assert not cache.awaiting_reconstruction and cache.store.capacity < N


MAX_UPKEEP_OPS = 50


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_a_decode_time_upkeep_reads_nothing_back(method):
    """An upkeep (the policy and an in-place compaction, every slack + 1 decode steps) on the kernel path at 8k
    stored tokens: no host sync for any method, Ada-KV's capped rows included, and a bounded number of device
    operations (the budget's growth reallocating the storage included; 31-47 by method)."""
    n = 8192
    mod, tm, sp = _av_metadata(n, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, HKV, n, D, generator=g).half()
    cache = BudgetedLayerCache(AccKVConfig(method=method, budget=0.25, backend="triton"), layer=3, num_layers=28)
    with count_triton_launches(dry_run=not cache.cfg.adaptive_heads):  # Ada-KV reads its longest row: run it
        cache.prefill(k, torch.randn_like(k), scores=torch.rand(1, HKV, n, generator=g), modality=mod.view(1, n),
                      time=tm.view(1, n).int(), spatial=sp.view(1, n, 2).int())
        if cache.awaiting_reconstruction:
            cache.end_reconstruction()
    q, kv = torch.randn(1, 7 * HKV, D).half(), torch.randn(1, HKV, 1, D).half()
    with count_triton_launches(dry_run=True):
        while cache.next_step_is_plain():
            cache.decode_step(q, kv, kv)
    with count_triton_launches(dry_run=True) as launches, OpCounter() as ops:
        cache.decode_step(q, kv, kv)  # the step that runs the upkeep
    assert cache.compressions == 2
    assert ops.syncs == 0, dict(ops.sync_ops)
    assert ops.ops + sum(launches.values()) <= MAX_UPKEEP_OPS, (dict(ops.by_name), dict(launches))
