"""BudgetedLayerCache: prefill compression, decode-time upkeep within budget + slack, streaming, padding."""
from __future__ import annotations

import pytest
import torch

from acckv_triton import reference, workloads
from acckv_triton.bench.av import workload_to
from acckv_triton.cache import BudgetedLayerCache
from acckv_triton.storage import LayerKVCache
from acckv_triton.config import AccKVConfig
from tests.conftest import DEVICE

# Every tensor on DEVICE: the cache hands them to the kernels, which need CUDA tensors on a GPU.
W = workload_to(workloads.generate_av_workload(num_chunks=3, grid_h=4, grid_w=4, batch=2, num_layers=2, seed=3),
                DEVICE)
N = W.num_tokens
LT = W.layers[1]
META = dict(modality=W.modality, time=W.time, spatial=W.spatial)


def prefilled(cfg, valid=None, upto=N):
    cache = BudgetedLayerCache(cfg, layer=1, num_layers=2)
    s = reference.window_scores(LT.q_window, LT.k, modality=W.token_modality()).scores
    cache.prefill(LT.k[:, :, :upto].contiguous(), LT.v[:, :, :upto].contiguous(), scores=s[:, :, :upto],
                  valid=valid, **{n: x[:upto] for n, x in META.items()})
    return cache


def test_prefill_compresses_to_budget_and_releases_memory():
    cache = prefilled(AccKVConfig(budget=0.25))
    want = -(-N // 4)
    assert torch.equal(cache.store.lengths.long(), torch.full((2, 2), want, device=DEVICE))
    assert cache.store.capacity < N and cache.compressions == 1
    assert cache.store.proportional  # AccKV weighs merged slots by their multiplicity
    held = cache.store.multiplicity[:, :, :want].sum(-1)
    assert torch.all(held >= want) and torch.all(held <= N)  # merged slots hold several tokens


@pytest.mark.parametrize("cfg", [
    pytest.param(AccKVConfig(budget=0.2, slack=16, decode_budget="fixed"), id="acckv"),
    pytest.param(AccKVConfig(budget=0.2, slack=16, method="h2o", decode_budget="fixed"), id="h2o"),
])
def test_decode_upkeep_holds_budget_plus_slack(cfg):  # the "fixed" mode; tests/test_budgets_and_baselines: the others
    cache = prefilled(cfg)
    target = cache.target.clone()
    window = torch.arange(N - cfg.window, N)
    g = torch.Generator().manual_seed(0)
    Hq, D = W.config.num_query_heads, W.config.head_dim
    for step in range(40):
        q = torch.randn(2, Hq, D, generator=g).to(DEVICE)
        res = cache.decode_attention(q)
        assert torch.isfinite(res.out).all()
        kv = torch.randn(2, 2, 1, D, generator=g).to(DEVICE)
        cache.append(kv, kv.clone())
        lengths = cache.store.lengths.long()
        assert torch.all(lengths <= target + cfg.slack)
    assert cache.compressions >= 2  # prefill plus at least one upkeep
    assert not cache.store.proportional or cfg.method == "acckv"
    for b in range(2):
        for h in range(2):
            pos = cache.store.position[b, h, :int(cache.store.lengths[b, h])].cpu()
            if cfg.method == "acckv":
                assert torch.isin(window, pos).all()  # the question stays protected
            assert int(pos.max()) == N + 39  # the newest decode token is kept (recent)
            assert torch.all(pos[1:] > pos[:-1])  # slots stay in original order


def test_budget_one_never_compresses():
    cache = prefilled(AccKVConfig(budget=1.0))
    assert cache.compressions == 0 and torch.all(cache.store.lengths == N)


def test_streaming_chunks_raise_the_budget():
    cfg = AccKVConfig(budget=0.25)
    cache = BudgetedLayerCache(cfg, layer=1, num_layers=2)
    s = reference.window_scores(LT.q_window, LT.k, modality=W.token_modality()).scores
    half = N // 2
    for lo, hi in ((0, half), (half, N)):
        cache.prefill(LT.k[:, :, lo:hi].contiguous(), LT.v[:, :, lo:hi].contiguous(), scores=s[:, :, lo:hi],
                      **{n: x[lo:hi] for n, x in META.items()})
        assert torch.equal(cache.store.lengths.long(), torch.full((2, 2), -(-hi // 4), device=DEVICE))
    assert cache.store.seen == N


def test_left_padding_is_dropped_and_not_budgeted():
    valid = torch.ones(2, N, dtype=torch.bool, device=DEVICE)
    valid[0, :30] = False  # sequence 0 is left-padded by 30 slots
    cache = prefilled(AccKVConfig(budget=0.5), valid=valid)
    assert cache.store.lengths[0].tolist() == [-(-(N - 30) // 2)] * 2
    assert cache.store.lengths[1].tolist() == [-(-N // 2)] * 2
    pos0 = cache.store.position[0, :, :int(cache.store.lengths[0, 0])]
    assert int(pos0.min()) >= 30


def test_prefill_rejects_bad_scores():
    cache = BudgetedLayerCache(AccKVConfig())
    with pytest.raises(ValueError, match="scores must be a"):
        cache.prefill(LT.k, LT.v, scores=torch.zeros(2, 2, 5))
    with pytest.raises(TypeError, match="scores must be a"):  # not a tensor: a TypeError
        cache.prefill(LT.k, LT.v, scores=[0.0] * 5)
    for dtype in (torch.complex64, torch.int64, torch.bool):
        with pytest.raises(TypeError, match="scores must be a real floating-point tensor"):
            cache.prefill(LT.k, LT.v, scores=torch.zeros(LT.k.shape[:3], dtype=dtype, device=LT.k.device))
    assert cache.store.k is None  # refused before anything was stored
    with pytest.raises(TypeError, match="cfg must be an AccKVConfig"):
        BudgetedLayerCache({"budget": 0.5})


def test_second_question_counts_the_decoded_answer_in_the_budget():
    cfg = AccKVConfig(budget=0.5, slack=1000)  # no upkeep in between: only the budget rule is tested
    cache = prefilled(cfg, upto=200)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        kv = torch.randn(2, 2, 1, W.config.head_dim, generator=g).to(DEVICE)
        cache.append(kv, kv.clone())
    s = reference.window_scores(LT.q_window, LT.k, modality=W.token_modality()).scores
    cache.prefill(LT.k[:, :, 200:240].contiguous(), LT.v[:, :, 200:240].contiguous(), scores=s[:, :, 200:240],
                  **{n: x[200:240] for n, x in META.items()})
    assert torch.equal(cache.target, torch.full((2, 2), (200 + 10 + 40) // 2, device=DEVICE))


def _assert_fresh_tail(st):
    past = torch.arange(st.capacity, device=DEVICE) >= st.lengths.long()[..., None]
    assert (st.modality[past] == 0).all() and (st.spatial[past] == -1).all()
    assert (st.token_mass[past] == 0).all() and (st.multiplicity[past] == 0).all()


def test_the_torch_storage_keeps_a_fresh_tail():
    """Past each row's length the torch backend's storage holds a fresh token's modality, spatial and mass, and
    multiplicity 0 (its decode step writes only what a new token changes and takes log(multiplicity) as the mask):
    after a prefill that merges, decode steps, upkeeps that compact in place and grow the storage, and a crop."""
    cache = prefilled(AccKVConfig(budget=0.25, slack=4, backend="torch"))
    st = cache.store
    assert not st.uses_kernels and st.keeps_fresh_tail
    assert (st.multiplicity > 1).any()  # merged slots: the compaction moved tokens down over stale slots
    _assert_fresh_tail(st)
    g = torch.Generator().manual_seed(1)
    B, Hkv, _, D = st.k.shape
    capacities = {st.capacity}
    for _ in range(40):  # the budget of every token seen: upkeeps every few steps and a growth
        kv = torch.randn(B, Hkv, 1, D, generator=g).to(DEVICE)
        cache.decode_step(torch.randn(B, 2 * Hkv, D, generator=g).to(DEVICE), kv, kv)
        _assert_fresh_tail(st)
        capacities.add(st.capacity)
    assert cache.compressions > 5 and len(capacities) > 1
    plain = LayerKVCache(backend="torch")
    plain.append(torch.randn(B, Hkv, 20, D, generator=g), torch.randn(B, Hkv, 20, D, generator=g),
                 modality=torch.full((20,), 2, dtype=torch.uint8), spatial=torch.ones(20, 2, dtype=torch.int32),
                 token_mass=torch.rand(20, generator=g))
    plain.crop_last(7)
    _assert_fresh_tail(plain)


def test_prefill_follows_the_evidence_its_scores_came_from():
    """``prefill`` without ``audio_video`` runs the policy for the evidence ``prompt_evidence`` computed (not the
    window's default): AccKV's every-query mean on a text prompt is ranked unpooled, its window unprotected."""
    g = torch.Generator().manual_seed(2)
    k, v, q = (torch.randn(1, 2, 64, 16, generator=g).to(DEVICE) for _ in range(3))
    q = torch.cat([q, q], dim=1)
    told, inferred = (BudgetedLayerCache(AccKVConfig(budget=0.25)) for _ in range(2))
    for cache, given in ((told, dict(audio_video=False)), (inferred, {})):
        scores = cache.prompt_evidence(q, k, audio_video=False)
        cache.prefill(k, v, scores=scores, **given)
    assert told.policy_cfg == inferred.policy_cfg and told.policy_cfg.score_evidence == "mean"
    assert torch.equal(told.store.position, inferred.store.position)
