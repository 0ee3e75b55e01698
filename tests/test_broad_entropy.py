"""``AccKVConfig.broad_entropy``: a row whose last prompt query attends almost uniformly ranks its first prefill
compression by that query's attention averaged over the layer's query heads, instead of the every-query mean
(benchmarks/results/cpu-2026-12-07/code50-diagnosis/, rule_inside.py); computed on the device, no host sync. On by
default (0.7) where AccKV ranks by the mean; 1.0 turns it off."""
from __future__ import annotations

import math

import pytest
import torch

from acckv_triton.bench.opcount import OpCounter, count_triton_launches
from acckv_triton.cache import BudgetedLayerCache
from acckv_triton.config import AccKVConfig
from acckv_triton.policy import LayerTokens, plan_layer
from tests.conftest import DEVICE

T, HQ, HKV, D = 96, 4, 2, 16
CFG = AccKVConfig(budget=0.25, recent=8, broad_entropy=0.7)


def _prompt(seed=0):
    """Row 0's last query is all zeros (uniform attention: entropy ln T, broad); row 1's points at token 40 of each
    kv head with a large norm (sharply peaked: not broad)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, T, D, generator=g) for h in (HQ, HKV, HKV))
    q[0, :, -1] = 0.0
    q[1, :, -1] = 8.0 * k[1, torch.arange(HQ) // (HQ // HKV), 40]
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def _kept(cache) -> list[list[list[int]]]:
    n = cache.store.lengths.long().cpu()
    pos = cache.store.position.cpu()
    return [[sorted(pos[b, h, :int(n[b, h])].tolist()) for h in range(n.shape[1])] for b in range(n.shape[0])]


def _run(cfg, q, k, v, valid=None):
    cache = BudgetedLayerCache(cfg, 0, 1)
    _, scores = cache.prompt_attention(q, k, v, valid=valid, audio_video=False)
    stash = cache._broad
    cache.prefill(k, v, scores=scores, valid=valid)
    assert cache._broad is None  # consumed by the prefill's compression
    return cache, stash


def _shared_ref(q, k, key_start=None):
    """float64: the last query's attention over the valid keys, averaged over the query heads; its mean entropy."""
    B = q.shape[0]
    ql = q[:, :, -1].double().view(B, HKV, HQ // HKV, D)
    logits = ql @ k.double().transpose(-1, -2) / math.sqrt(D)
    if key_start is not None:
        logits = logits.masked_fill((torch.arange(T, device=q.device) < key_start[:, None])[:, None, None], -math.inf)
    p = torch.softmax(logits, -1)
    return p.mean((1, 2)), torch.special.entr(p).sum(-1).mean((1, 2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_broad_row_ranks_by_the_last_query_and_a_peaked_row_is_unchanged(backend):
    q, k, v = _prompt()
    cfg = CFG.replace(backend=backend)
    cache, (broad, shared) = _run(cfg, q, k, v)
    want, entropy = _shared_ref(q, k)
    assert broad.tolist() == [True, False] and entropy[0] == pytest.approx(math.log(T)) and entropy[1] < 1.0
    torch.testing.assert_close(shared.double(), want, atol=1e-6, rtol=1e-5)

    plain, none = _run(cfg.replace(broad_entropy=1.0), q, k, v)
    assert none is None
    assert _kept(cache)[1] == _kept(plain)[1]  # the peaked row: as without the feature
    # the broad row: what the policy keeps when given the shared last-query scores (the same in both kv heads)
    x = LayerTokens(scores=shared[:1, None].expand(1, HKV, T).contiguous(),
                    modality=torch.zeros(1, HKV, T, dtype=torch.uint8, device=DEVICE),
                    lengths=torch.full((1, HKV), T, dtype=torch.int32, device=DEVICE),
                    time=torch.arange(T, dtype=torch.int32, device=DEVICE).expand(1, HKV, T).contiguous(),
                    keys=k[:1], spatial=torch.full((1, HKV, T, 2), -1, dtype=torch.int32, device=DEVICE),
                    position=torch.arange(T, dtype=torch.int32, device=DEVICE).expand(1, HKV, T).contiguous(),
                    window_range=cache.window)
    plan = plan_layer(cache.policy_cfg.replace(backend="torch"), x, 0, 1, target=cache.target[:1]).plan
    n = plan.keep_lengths.long().cpu()
    want_kept = [sorted(plan.keep[0, h, :int(n[0, h])].cpu().tolist()) for h in range(HKV)]
    assert _kept(cache)[0] == want_kept != _kept(plain)[0]
    # the stored token mass stays the every-query mass
    _, scores = BudgetedLayerCache(cfg, 0, 1).prompt_attention(q, k, v, audio_video=False)
    idx = cache.store.position[:, :, :cache.store.max_length].long()
    stored = cache.store.token_mass[:, :, :cache.store.max_length]
    torch.testing.assert_close(torch.where(idx < T, stored, 0.0),
                               torch.where(idx < T, scores.gather(2, idx.clamp(max=T - 1)), 0.0))


def test_the_backends_keep_the_same_tokens():
    q, k, v = _prompt(seed=1)
    caches = [_run(CFG.replace(backend=b), q, k, v)[0] for b in ("torch", "triton")]
    assert _kept(caches[0]) == _kept(caches[1])
    assert torch.equal(caches[0].store.lengths.cpu(), caches[1].store.lengths.cpu())


def test_on_by_default_on_the_mean_only_and_off_at_one():
    q, k, v = _prompt()
    assert AccKVConfig().broad_entropy is None and AccKVConfig().evidence_for(False) == "mean"
    assert AccKVConfig().replace(evidence="mean").broad_threshold == 0.7
    assert AccKVConfig(evidence="mean", broad_entropy=0.5).broad_threshold == 0.5
    for off in (AccKVConfig(evidence="window"), AccKVConfig(method="tova"), AccKVConfig(method="h2o"),
                AccKVConfig(evidence="mean", broad_entropy=1.0), AccKVConfig(evidence="observed", broad_entropy=0.7)):
        assert off.broad_threshold is None, off
    default = AccKVConfig(budget=0.25, recent=8)
    cache, stash = _run(default, q, k, v)  # the default on a text prompt: the rule runs
    assert stash[0].tolist() == [True, False]
    assert _kept(cache) == _kept(_run(CFG, q, k, v)[0])
    # off: 1.0, or window evidence (an AV prompt under "auto"): nothing stashed, the plain ranking
    for cfg, av in ((default.replace(broad_entropy=1.0), False), (CFG, True)):
        cache = BudgetedLayerCache(cfg, 0, 1)
        if av:
            scores = cache.prompt_evidence(q, k, audio_video=True)
        else:
            _, scores = cache.prompt_attention(q, k, v, audio_video=False)
        assert cache._broad is None
        cache.prefill(k, v, scores=scores)
        plain = BudgetedLayerCache(cfg, 0, 1)
        plain.prefill(k, v, scores=scores, audio_video=av)
        assert _kept(cache) == _kept(plain)
    # prompt_evidence on the mean stashes what prompt_attention does
    a, b = BudgetedLayerCache(CFG, 0, 1), BudgetedLayerCache(CFG, 0, 1)
    a.prompt_attention(q, k, v, audio_video=False)
    b.prompt_evidence(q, k, audio_video=False)
    assert torch.equal(a._broad[0], b._broad[0]) and torch.equal(a._broad[1], b._broad[1])


def test_a_prefill_of_another_prompt_than_the_scored_one_is_refused_and_changes_nothing():
    q, k, v = _prompt()
    cache = BudgetedLayerCache(CFG, 0, 1)
    _, scores = cache.prompt_attention(q, k, v, audio_video=False)
    stash = cache._broad
    with pytest.raises(ValueError, match="the last prompt_attention / prompt_evidence scored"):
        cache.prefill(k[:, :, 1:], v[:, :, 1:], scores=scores[:, :, 1:])
    assert cache.store.k is None and cache._broad is stash
    cache.prefill(k, v, scores=scores)  # the scored prompt still goes in
    assert _kept(cache) == _kept(_run(CFG, q, k, v)[0])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(broad_entropy="0.7"), TypeError, "broad_entropy must be None or a number in"),
    (dict(broad_entropy=True), TypeError, "broad_entropy must be None or a number in"),
    (dict(broad_entropy=0.0), ValueError, "broad_entropy must be None or a number in"),
    (dict(broad_entropy=1.5), ValueError, "broad_entropy must be None or a number in"),
    (dict(broad_entropy=math.nan), ValueError, "broad_entropy must be None or a number in"),
    (dict(broad_entropy=0.7, method="tova"), ValueError, "broad_entropy applies to method='acckv'"),
], ids=str)
def test_broad_entropy_is_validated(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        AccKVConfig(**kwargs)
    assert AccKVConfig(broad_entropy=1).broad_entropy == 1.0


def test_no_host_sync_on_the_kernel_backend():
    q, k, v = _prompt()
    valid = torch.ones(2, T, dtype=torch.bool, device=DEVICE)
    valid[1, :10] = False
    cache = BudgetedLayerCache(CFG.replace(backend="triton"), 3, 28)
    with count_triton_launches(dry_run=True), OpCounter() as ops:
        _, scores = cache.prompt_attention(q, k, v, valid=valid, audio_video=False)
        assert cache._broad is not None
        cache.prefill(k, v, scores=scores, valid=valid)
    assert ops.syncs == 0, dict(ops.sync_ops)


def test_the_rule_costs_a_dozen_device_ops_per_layer():
    """Without padding: the last query's product, its softmax and entropy, the head means and one comparison with a
    host threshold (9 torch ops on this float32 prompt, 11 with a half-precision one's two casts) and the prefill's
    torch.where; nothing else in prompt_attention or prefill changes."""
    q, k, v = _prompt()
    counts = []
    for frac in (0.7, 1.0):
        cache = BudgetedLayerCache(CFG.replace(backend="triton", broad_entropy=frac), 3, 28)
        with count_triton_launches(dry_run=True) as launches, OpCounter() as ops:
            _, scores = cache.prompt_attention(q, k, v, audio_video=False)
            cache.prefill(k, v, scores=scores)
        counts.append((ops.ops, dict(launches)))
    assert counts[0][1] == counts[1][1]  # the same kernels
    assert 0 < counts[0][0] - counts[1][0] <= 12, counts  # the rule ran (> 0), within a dozen ops


def test_padded_keys_never_count():
    """Row 0: 88 padded keys built to draw the last query's attention, 8 valid keys it attends uniformly: entropy
    ln 8, broad against 0.7 ln 8 (not against 0.7 ln T). Row 1: one valid key: never broad. Row 2: a random query
    over 40 valid keys: its stash equals the unpadded prompt's."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, h, T, D, generator=g) for h in (HQ, HKV, HKV))
    q[0, :, -1] = 0.0
    q[1, :, -1] = 0.0
    k[0, :, :88] = 50.0  # (with q 0 they would still tie; what counts is that they are masked and not in ln n)
    starts = torch.tensor([88, T - 1, T - 40])
    valid = torch.arange(T)[None] >= starts[:, None]
    q, k, v, valid = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), valid.to(DEVICE)
    cache, (broad, shared) = _run(CFG, q, k, v, valid)
    assert broad.tolist()[:2] == [True, False]
    assert torch.all(shared[~valid] == 0)
    torch.testing.assert_close(shared[0, 88:], torch.full((8,), 1 / 8, device=DEVICE))
    want, _ = _shared_ref(q, k, starts.to(DEVICE))
    torch.testing.assert_close(shared.double(), want, atol=1e-6, rtol=1e-5)
    alone = BudgetedLayerCache(CFG, 0, 1)
    alone.prompt_attention(q[2:, :, 56:], k[2:, :, 56:], v[2:, :, 56:], audio_video=False)
    assert alone._broad[0].tolist() == broad.tolist()[2:]
    torch.testing.assert_close(alone._broad[1], shared[2:, 56:], atol=1e-6, rtol=1e-5)
    for b, h in ((0, 0), (0, 1), (2, 0)):
        assert min(_kept(cache)[b][h]) >= int(starts[b])  # padding never kept
