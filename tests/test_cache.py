"""LayerKVCache: append, grow, compress (in place and shrinking), metadata carried, decode attention, bytes."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import acckv_triton as ak
from acckv_triton import reference
from acckv_triton.storage import LayerKVCache
from acckv_triton.plan import CompactionPlan
from tests.conftest import DEVICE, TOL

B, HKV, D = 2, 2, 64


def rand_kv(T, dtype=torch.float32, g=None):
    k = torch.randn(B, HKV, T, D, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(B, HKV, T, D, generator=g).to(dtype).to(DEVICE)
    return k, v


def prefill(T, dtype=torch.float32, seed=0, **cache_kwargs):
    """A cache holding T prompt tokens with random metadata; returns it and the appended tensors."""
    g = torch.Generator().manual_seed(seed)
    cache = LayerKVCache(**cache_kwargs)
    k, v = rand_kv(T, dtype, g)
    meta = dict(
        modality=torch.randint(0, ak.NUM_MODALITIES, (B, T), generator=g, dtype=torch.uint8),
        time=torch.randint(0, 500, (B, T), generator=g, dtype=torch.int32),
        spatial=torch.randint(0, 30, (B, T, 2), generator=g, dtype=torch.int32),
    )
    cache.append(k, v, **{n: x.to(DEVICE) for n, x in meta.items()})
    return cache, k, v, meta


def snapshot(cache):
    return {n: getattr(cache, n).clone() for n in ("k", "v", "lengths", "modality", "time", "spatial", "position",
                                                     "token_mass", "multiplicity")}


def random_plan(lengths, K, *, merge, seed=0):
    """A valid plan keeping a random sorted subset (<= K) per row; evicted tokens merge into random slots or drop."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths.cpu()
    C = int(lengths.max())
    keep = torch.zeros(B, HKV, K, dtype=torch.int32)
    keep_lengths = torch.zeros(B, HKV, dtype=torch.int32)
    target = torch.full((B, HKV, C), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(HKV):
            L = int(lengths[b, h])
            n = int(torch.randint(1, min(K, L) + 1, (1,), generator=g))
            row = torch.randperm(L, generator=g)[:n].sort().values
            keep[b, h, :n], keep_lengths[b, h] = row.int(), n
            target[b, h, :L] = torch.randint(-1, n, (L,), generator=g).int()
    to = lambda x: x.to(DEVICE)  # noqa: E731
    if not merge:
        return CompactionPlan(to(keep), to(keep_lengths))
    return CompactionPlan(to(keep), to(keep_lengths), to(target), to(torch.rand(B, HKV, C, generator=g) + 0.1))


def expected_after(cache_state, plan, width):
    """The float64 reference applied to a snapshot of the cache (metadata carried as the cache carries it)."""
    s = {n: x[:, :, :width].clone() for n, x in cache_state.items() if n != "lengths"}
    s["lengths"] = cache_state["lengths"].clone()
    reference.compact_kv_(
        s["k"], s["v"], s["lengths"], plan.keep, plan.keep_lengths, merge_target=plan.merge_target,
        merge_weight=plan.merge_weight,
        token_data=[s["modality"], s["time"], s["position"], s["spatial"][..., 0], s["spatial"][..., 1]],
        token_sums=[s["token_mass"], s["multiplicity"]],
    )
    return s


def rows(x, lengths):
    """The stored entries of a [B, Hkv, C, ...] tensor, flattened."""
    return x[torch.arange(x.shape[2], device=x.device) < lengths[..., None]]


def test_append_prefill_then_decode_grows_geometrically(poison_empty):
    cache, k0, v0, meta = prefill(37)
    assert cache.capacity == 48 and cache.seen == 37  # the prefill allocates what it needs (rounded to align=16)
    ks, vs, capacities = [k0], [v0], {cache.capacity}
    for _ in range(100):
        k, v = rand_kv(1)
        cache.append(k, v, modality=torch.full((1,), int(ak.Modality.AUDIO)))
        ks.append(k), vs.append(v), capacities.add(cache.capacity)
    assert cache.seen == 137 and cache.max_length == 137
    assert torch.all(cache.lengths == 137)
    assert len(capacities) <= 4  # 48 -> 80 -> 128 -> 192: reallocations are rare
    assert sorted(capacities) == [48, 80, 128, 192]
    k_all, v_all = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
    assert torch.equal(cache.k[:, :, :137], k_all) and torch.equal(cache.v[:, :, :137], v_all)
    assert torch.equal(cache.modality[:, :, :37], meta["modality"].to(DEVICE)[:, None].expand(B, HKV, 37))
    assert torch.all(cache.modality[:, :, 37:137] == ak.Modality.AUDIO)
    positions = torch.arange(137, dtype=torch.int32, device=DEVICE).expand(B, HKV, -1)
    assert torch.equal(cache.position[:, :, :137], positions)
    assert torch.equal(cache.time[:, :, 37:137], cache.position[:, :, 37:137])  # time defaults to position
    assert torch.all(cache.spatial[:, :, 37:137] == -1)
    assert torch.all(cache.token_mass[:, :, :137] == 0)


@pytest.mark.parametrize("dtype,merge", [
    pytest.param(torch.float32, False, id="fp32-gather"),
    pytest.param(torch.bfloat16, True, id="bf16-merge"),
    pytest.param(torch.float16, True, id="fp16-merge"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compress_carries_everything_and_shrinks(dtype, merge, backend, poison_empty):
    cache, *_ = prefill(300, dtype, backend=backend)
    cache.token_mass[:, :, :300] = torch.rand(B, HKV, 300, device=DEVICE)
    plan = random_plan(cache.lengths, 40, merge=merge)
    before = snapshot(cache)
    want = expected_after(before, plan, cache.capacity)
    old_k = weakref.ref(cache.k)
    old_nbytes = cache.nbytes()

    cache.compress(plan)

    gc.collect()
    assert old_k() is None  # the prefill-size buffer is released
    n_max = int(plan.keep_lengths.max())
    assert cache.capacity == -(-(n_max + cache.headroom) // 16) * 16 < 300
    assert cache.nbytes() < old_nbytes / 2
    assert torch.equal(cache.stored_tokens(), plan.keep_lengths) and cache.max_length == n_max
    assert cache.seen == 300  # seen tokens are not forgotten
    n = plan.keep_lengths
    atol, rtol = TOL[dtype] if merge else (0.0, 0.0)
    for name in ("k", "v"):
        torch.testing.assert_close(rows(getattr(cache, name), n).float(), rows(want[name], n).float(),
                                   atol=atol, rtol=rtol)
    for name in ("modality", "time", "position"):
        assert torch.equal(rows(getattr(cache, name), n), rows(want[name], n)), name
    assert torch.equal(rows(cache.spatial, n), rows(want["spatial"], n))
    torch.testing.assert_close(rows(cache.token_mass, n), rows(want["token_mass"], n), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rows(cache.multiplicity, n), rows(want["multiplicity"], n), atol=0, rtol=0)
    if merge:  # multiplicities count every token held: each kept token plus those merged into its slot
        C = plan.merge_target.shape[-1]
        kept = torch.zeros(B, HKV, C + 1, dtype=torch.bool, device=DEVICE)
        slot_ok = torch.arange(plan.keep.shape[-1], device=DEVICE) < plan.keep_lengths[..., None]
        kept.scatter_(2, torch.where(slot_ok, plan.keep.long(), C), True)
        merged = (plan.merge_target >= 0) & ~kept[..., :C] & (torch.arange(C, device=DEVICE) < 300)
        held = torch.where(torch.arange(cache.capacity, device=DEVICE) < n[..., None], cache.multiplicity, 0.0)
        assert torch.equal(held.sum(-1).long(), plan.keep_lengths.long() + merged.sum(-1))


def test_proportional_decode_weighs_merged_slots(poison_empty):
    """A proportional cache attends with multiplicity: merging n identical tokens leaves attention unchanged."""
    cache = LayerKVCache(proportional=True)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 1, 4, 64, generator=g)
    k = torch.cat([k, k[:, :, 3:].expand(-1, -1, 3, -1)], 2).to(DEVICE)  # tokens 3..6 identical
    v = torch.cat([k[:, :, :4], k[:, :, 3:4].expand(-1, -1, 3, -1)], 2) * 0.5
    cache.append(k, v.contiguous())
    q = torch.randn(1, 2, 64, generator=g).to(DEVICE)
    before = cache.decode_attention(q, accumulate_mass=False)
    full = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE).view(1, 1, -1)  # noqa: E731
    cache.compress(CompactionPlan(full([0, 1, 2, 3]), full([4]).view(1, 1), full([-1, -1, -1, -1, 3, 3, 3]),
                                  torch.ones(1, 1, 7, device=DEVICE)))
    assert cache.multiplicity[0, 0, :4].tolist() == [1.0, 1.0, 1.0, 4.0]
    after = cache.decode_attention(q, accumulate_mass=False)
    torch.testing.assert_close(after.out, before.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.lse, before.lse, atol=1e-5, rtol=1e-5)


def test_compress_in_place_when_nothing_would_be_released(poison_empty):
    cache, *_ = prefill(40)  # capacity 48; keeping 30 + headroom 64 would not shrink it
    plan = random_plan(cache.lengths, 30, merge=True, seed=3)
    want = expected_after(snapshot(cache), plan, cache.capacity)
    ptr, capacity = cache.k.data_ptr(), cache.capacity
    cache.compress(plan)
    assert cache.k.data_ptr() == ptr and cache.capacity == capacity
    n = plan.keep_lengths
    torch.testing.assert_close(rows(cache.k, n), rows(want["k"], n), atol=TOL[torch.float32][0],
                               rtol=TOL[torch.float32][1])
    assert torch.equal(rows(cache.position, n), rows(want["position"], n))


def test_a_borrowed_prompt_is_compacted_out_of_place_whatever_the_capacity(poison_empty):
    """append(borrow=True) views the caller's tensors; the next compress moves the storage out even where it would
    otherwise compact in place (nothing released), so the caller's K, V and metadata are never written."""
    g = torch.Generator().manual_seed(5)
    k, v = rand_kv(40, g=g)
    meta = dict(modality=torch.randint(0, ak.NUM_MODALITIES, (B, HKV, 40), generator=g, dtype=torch.uint8),
                time=torch.randint(0, 500, (B, HKV, 40), generator=g, dtype=torch.int32),
                token_mass=torch.rand(B, HKV, 40, generator=g))
    meta = {n: x.to(DEVICE) for n, x in meta.items()}
    inputs = dict(k=k, v=v, **meta)
    before = {n: x.clone() for n, x in inputs.items()}
    cache = LayerKVCache()
    cache.append(k, v, borrow=True, **meta)
    assert cache.k.data_ptr() == k.data_ptr()  # nothing copied
    plan = random_plan(cache.lengths, 30, merge=True, seed=3)
    want = expected_after(snapshot(cache), plan, cache.capacity)
    cache.compress(plan, capacity=cache.capacity)  # the same capacity: in place, were the storage its own
    assert cache.k.data_ptr() != k.data_ptr()
    for n, x in inputs.items():
        assert torch.equal(x, before[n]), n
    n = plan.keep_lengths
    torch.testing.assert_close(rows(cache.k, n), rows(want["k"], n), atol=TOL[torch.float32][0],
                               rtol=TOL[torch.float32][1])
    assert torch.equal(rows(cache.position, n), rows(want["position"], n))


def test_borrow_into_a_cache_that_holds_tokens_appends_a_copy():
    """borrow=True copies nothing only into an empty cache; into one that holds tokens it is an ordinary append: the
    stored tokens stay, the new ones are copied after them, and the caller's tensors are not the storage."""
    cache, k0, v0, _ = prefill(20)
    k, v = rand_kv(5, g=torch.Generator().manual_seed(8))
    cache.append(k, v, borrow=True)
    assert cache.seen == 25 and torch.equal(cache.lengths, torch.full((B, HKV), 25, dtype=torch.int32, device=DEVICE))
    assert torch.equal(cache.k[:, :, :20], k0) and torch.equal(cache.k[:, :, 20:25], k)
    assert torch.equal(cache.v[:, :, :20], v0) and torch.equal(cache.v[:, :, 20:25], v)
    assert cache.k.data_ptr() != k.data_ptr()


@pytest.mark.parametrize("method", ["full", "kvzip"])
def test_a_budgeted_prefill_never_writes_the_callers_tensors(method):
    """The kernel backend's first prefill may borrow the prompt's K, V and scores (float32: the token mass itself):
    nothing the cache does afterwards changes them, neither KVzip's reconstruction pass (it writes the token mass)
    nor, at budget 1.0, a rollback (transformers' crop) and decode steps that refill the freed slots."""
    from acckv_triton.cache import BudgetedLayerCache

    g = torch.Generator().manual_seed(4)
    T, Hq = 40, 4
    q, k, v = (torch.randn(1, h, T, 16, generator=g).to(DEVICE) for h in (Hq, HKV, HKV))
    scores = torch.rand(1, HKV, T, generator=g).to(DEVICE)
    before = {n: x.clone() for n, x in dict(k=k, v=v, scores=scores).items()}
    cache = BudgetedLayerCache(ak.AccKVConfig(method=method, backend="triton"), 0, 1)
    cache.prefill(k, v, scores=scores)
    if method == "kvzip":
        cache.reconstruct(q, k, v)
        cache.end_reconstruction()
    else:
        cache.store.crop_last(3)
    for _ in range(4):
        cache.decode_step(torch.randn(1, Hq, 16, generator=g).to(DEVICE),
                          *(torch.randn(1, HKV, 1, 16, generator=g).to(DEVICE) for _ in range(2)))
    for n, x in dict(k=k, v=v, scores=scores).items():
        assert torch.equal(x, before[n]), n


def test_append_after_ragged_compress_writes_at_each_length(poison_empty):
    cache, *_ = prefill(100, headroom=8)
    plan = random_plan(cache.lengths, 20, merge=False, seed=5)
    cache.compress(plan)
    kept_k = cache.k.clone()
    n = plan.keep_lengths.clone()
    assert not torch.all(n == n[0, 0])  # the rows are ragged now
    ks = []
    for step in range(40):  # runs past the headroom: the capacity grows and the rows survive the move
        k, v = rand_kv(1)
        cache.append(k, v, position=torch.full((1,), 100 + step))
        ks.append(k)
    new_k = torch.cat(ks, dim=2)
    assert torch.equal(cache.lengths, n + 40) and cache.seen == 140
    assert cache.capacity >= int(n.max()) + 40
    for b in range(B):
        for h in range(HKV):
            m = int(n[b, h])
            assert torch.equal(cache.k[b, h, :m], kept_k[b, h, :m])
            assert torch.equal(cache.k[b, h, m:m + 40], new_k[b, h])
            assert torch.equal(cache.position[b, h, m:m + 40], torch.arange(100, 140, dtype=torch.int32,
                                                                            device=DEVICE))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decode_attention_accumulates_mass_into_the_cache(backend, poison_empty):
    cache, *_ = prefill(90, backend=backend)
    cache.compress(random_plan(cache.lengths, 25, merge=True, seed=7))
    cache.append(*rand_kv(1))
    q = torch.randn(B, HKV * 3, D, device=DEVICE)
    mass_before = cache.token_mass.clone()
    got = cache.decode_attention(q)
    n = cache.lengths
    stored = torch.arange(cache.capacity, device=DEVICE) < n[..., None]
    k = torch.where(stored[..., None], cache.k, 0.0)
    v = torch.where(stored[..., None], cache.v, 0.0)
    want_mass = torch.where(stored, mass_before, 0.0)
    want = reference.decode_attention(q, k, v, n, modality=torch.where(stored, cache.modality, 0),
                                      token_mass=want_mass)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(got.out, want.out, atol=atol, rtol=rtol)
    torch.testing.assert_close(got.modality_mass, want.modality_mass, atol=atol, rtol=rtol)
    torch.testing.assert_close(rows(cache.token_mass, n), rows(want_mass, n), atol=atol, rtol=rtol)
    added = torch.where(stored, cache.token_mass - mass_before, 0.0).sum(dim=2)  # [B, Hkv]
    torch.testing.assert_close(added, torch.full((B, HKV), 3.0, device=DEVICE))  # G = 3 heads' probabilities each
    mass_before = cache.token_mass.clone()
    with pytest.raises(ValueError, match="q must be"):  # q named (not the cache) for a dtype the cache does not hold
        cache.decode_attention(torch.randn(B, 3 * HKV, D, device=DEVICE).half())
    assert torch.equal(cache.token_mass, mass_before)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_invalid_plan_leaves_the_cache_unchanged(backend):
    cache, *_ = prefill(60, backend=backend)
    plan = random_plan(cache.lengths, 12, merge=True, seed=9)
    keep = plan.keep.clone()
    keep[1, 0, :2] = keep[1, 0, :2].flip(0)  # unsorted
    before, capacity, seen = snapshot(cache), cache.capacity, cache.seen
    with pytest.raises(ValueError, match="keep"):
        cache.compress(CompactionPlan(keep, plan.keep_lengths, plan.merge_target, plan.merge_weight))
    after = snapshot(cache)
    assert cache.capacity == capacity and cache.seen == seen and cache.max_length == 60
    for name, x in before.items():
        assert torch.equal(x.contiguous().view(torch.uint8), after[name].contiguous().view(torch.uint8)), name
    with pytest.raises(ValueError, match="merge_target"):
        cache.compress(CompactionPlan(plan.keep, plan.keep_lengths, plan.merge_target[..., :50], plan.merge_weight))
    n = int(plan.keep_lengths.max())
    with pytest.raises(ValueError, match="length_bounds"):  # bounds that do not hold would misplace the next append
        cache.compress(plan, length_bounds=(n + 1, n + 1))
    with pytest.raises(ValueError, match="length_bounds must be ints"):  # a bool is not a count
        cache.compress(plan, length_bounds=(False, True))
    with pytest.raises(ValueError, match="capacity must be an int"):
        cache.compress(plan, capacity=True)
    after = snapshot(cache)
    for name, x in before.items():
        assert torch.equal(x.contiguous().view(torch.uint8), after[name].contiguous().view(torch.uint8)), name


def test_bytes_are_accounted():
    cache = LayerKVCache()
    assert cache.nbytes() == 0 and cache.capacity == 0
    cache.append(*rand_kv(20, torch.bfloat16))
    per_token = 2 * D * 2 + 1 + 4 + 2 * 4 + 4 + 4 + 4  # K, V bf16; modality, time, (h, w), position, mass, multiplicity
    assert cache.bytes_per_token == per_token
    assert cache.nbytes() == B * HKV * (cache.capacity * per_token + 4)  # + lengths int32
    assert cache.stored_nbytes() == B * HKV * 20 * per_token
    cache.append(*rand_kv(300, torch.bfloat16))
    cache.compress(random_plan(cache.lengths, 10, merge=False))
    assert cache.nbytes() == B * HKV * (cache.capacity * per_token + 4)
    assert cache.stored_nbytes() == int(cache.lengths.sum()) * per_token < cache.nbytes()
    assert cache.seen == 320


def test_append_rejects_mismatched_tokens():
    cache, *_ = prefill(8)
    with pytest.raises(ValueError, match="k must be"):
        cache.append(torch.randn(B, HKV, 1, D + 1, device=DEVICE), torch.randn(B, HKV, 1, D + 1, device=DEVICE))
    with pytest.raises(ValueError, match="modality"):
        cache.append(*rand_kv(2), modality=torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="time must be an integer tensor"):  # not truncated to 0 and 1
        cache.append(*rand_kv(2), time=[0.7, 1.9])
    with pytest.raises(TypeError, match="spatial must be an integer tensor"):
        cache.append(*rand_kv(2), spatial=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="n must be an int"):
        cache.crop_last(True)
    with pytest.raises(TypeError, match="proportional must be a bool"):  # "no" was read as True
        LayerKVCache(proportional="no")
    for name, x in (("modality", torch.zeros(2, dtype=torch.uint8)), ("time", torch.zeros(2, dtype=torch.int32))):
        with pytest.raises(ValueError, match=f"{name} must hold data"):  # not torch's NotImplementedError
            cache.append(*rand_kv(2), **{name: x.to("meta")})
    plan = CompactionPlan(torch.zeros(B, HKV, 3, dtype=torch.int32, device=DEVICE),
                          torch.full((B, HKV), 3, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="plan.keep_lengths must be on the cache's device"):
        cache.compress(plan)
    assert cache.seen == 8 and torch.all(cache.lengths == 8)


def test_rejected_first_append_leaves_the_cache_empty():
    """A first append whose metadata is rejected must not fix the shape, dtype or device of the cache."""
    cache = LayerKVCache()
    with pytest.raises(ValueError, match="modality"):
        cache.append(*rand_kv(4), modality=torch.zeros(3, dtype=torch.uint8, device=DEVICE))
    assert not cache.initialized and cache.capacity == 0 and cache.lengths is None and cache.seen == 0
    k, v = torch.randn(1, 3, 5, 32, device=DEVICE), torch.randn(1, 3, 5, 32, device=DEVICE)
    cache.append(k, v)  # another shape is still welcome
    assert cache.k.shape[:2] == (1, 3) and torch.all(cache.lengths == 5)


def test_backend_is_checked_and_auto_follows_the_storage_device():
    with pytest.raises(ValueError, match="backend"):
        LayerKVCache(backend="cuda")
    with pytest.raises(TypeError, match="backend"):  # a wrong type is a TypeError, as README's bad-input rule says
        LayerKVCache(backend=1)
    cache, *_ = prefill(20, backend="auto")
    assert cache.uses_kernels == (DEVICE.type == "cuda")  # the kernels for CUDA storage, the reference otherwise
    assert prefill(20, backend="torch")[0].uses_kernels is False
    assert prefill(20)[0].uses_kernels is True  # the default: the kernels (interpreted without a GPU)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_modality_ids_are_checked_before_anything_is_stored(backend):
    """Ids out of range (or not integers) are refused with the argument named, before the prompt is stored: the
    fused policy would otherwise index its scratch by them."""
    for bad, error in ((torch.full((16,), 4, dtype=torch.uint8), ValueError), ([0] * 15 + [9], ValueError),
                       (torch.full((16,), -1), ValueError), (torch.zeros(16), TypeError), ([0.5] * 16, TypeError)):
        cache = ak.BudgetedLayerCache(ak.AccKVConfig(budget=0.25, backend=backend))
        with pytest.raises(error, match="modality"):
            cache.prefill(*rand_kv(16), scores=torch.rand(B, HKV, 16, device=DEVICE),
                          modality=bad.to(DEVICE) if isinstance(bad, torch.Tensor) else bad)
        assert not cache.store.initialized and cache.target is None
    cache = ak.BudgetedLayerCache(ak.AccKVConfig(budget=0.25, backend=backend))
    cache.prefill(*rand_kv(16), scores=torch.rand(B, HKV, 16, device=DEVICE), modality=[0, 1, 2, 3] * 4)
    assert cache.compressions == 1


def test_the_policies_read_an_unchecked_id_out_of_range_as_text():
    """Ids the caller vouched for (check_modality=False) but out of range never index scratch: the plan is the one
    of text ids there, and each policy's own check (check=True) still refuses them."""
    from acckv_triton.fused_policy import plan_layer_fused
    from acckv_triton.policy import LayerTokens, plan_layer
    g = torch.Generator().manual_seed(0)
    N = 64
    mod = torch.randint(0, 4, (1, 2, N), generator=g, dtype=torch.uint8)
    bad = mod.clone()
    bad[0, 0, 5:40:3] = 200
    as_text = torch.where(bad == 200, 0, mod).to(torch.uint8)
    base = dict(scores=torch.rand(1, 2, N, generator=g), lengths=torch.full((1, 2), N, dtype=torch.int32),
                time=torch.arange(N, dtype=torch.int32).expand(1, 2, N), keys=torch.randn(1, 2, N, 16, generator=g))
    cfg, target = ak.AccKVConfig(budget=0.25, evidence="window"), torch.full((1, 2), 16)  # pooled: a counting sort
    got = plan_layer_fused(cfg, LayerTokens(modality=bad.to(DEVICE), **{n: x.to(DEVICE) for n, x in base.items()}),
                           target=target.to(DEVICE), max_keep=16)
    want = plan_layer_fused(cfg, LayerTokens(modality=as_text.to(DEVICE), **{n: x.to(DEVICE) for n, x in base.items()}),
                            target=target.to(DEVICE), max_keep=16)
    assert torch.equal(got.plan.keep, want.plan.keep) and torch.equal(got.plan.keep_lengths, want.plan.keep_lengths)
    with pytest.raises(ValueError, match="modality"):
        plan_layer_fused(cfg, LayerTokens(modality=bad.to(DEVICE), **{n: x.to(DEVICE) for n, x in base.items()}),
                         target=target.to(DEVICE), max_keep=16, check=True)
    for adaptive in (cfg, ak.AccKVConfig(budget=0.25, method="adakv")):  # the torch policy (Ada-KV's on any backend)
        got = plan_layer(adaptive, LayerTokens(modality=bad, **base), target=target, check=False)
        want = plan_layer(adaptive, LayerTokens(modality=as_text, **base), target=target)
        assert torch.equal(got.plan.keep, want.plan.keep) and torch.equal(got.plan.keep_lengths, want.plan.keep_lengths)
        with pytest.raises(ValueError, match="modality"):
            plan_layer(adaptive, LayerTokens(modality=bad, **base), target=target)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_rejected_decode_step_or_chunk_changes_nothing(backend):
    cache = ak.BudgetedLayerCache(ak.AccKVConfig(budget=0.5, backend=backend))
    cache.prefill(*rand_kv(32), scores=torch.rand(B, HKV, 32, device=DEVICE))
    st = cache.store
    state = lambda: (st.lengths.clone(), st.seen, st.token_mass.clone(), st.k.clone())  # noqa: E731
    before = state()
    k1, v1 = rand_kv(1)
    q = torch.randn(B, 2 * HKV, D, device=DEVICE)
    for bad_q, error in ((q[:, :, None], ValueError), (q.half(), ValueError), (q[:, :3], ValueError),
                         (q.tolist(), TypeError), (q[..., ::2], ValueError)):
        with pytest.raises(error, match="q must be"):
            cache.decode_step(bad_q, k1, v1)
    with pytest.raises(ValueError, match="scale"):
        cache.decode_step(q, k1, v1, scale=float("nan"))
    kc, vc = rand_kv(4)
    with pytest.raises(ValueError, match="modality"):
        cache.prefill_chunk(torch.randn(B, 2 * HKV, 4, D, device=DEVICE), kc, vc, modality=[0, 0, 7, 0])
    with pytest.raises(ValueError, match="k must be"):
        cache.prefill_chunk(torch.randn(B, 2 * HKV, 4, D, device=DEVICE), kc[:, :1], vc[:, :1])
    qc = torch.randn(B, 2 * HKV, 4, D, device=DEVICE)
    with pytest.raises(TypeError, match="unexpected keyword argument 'token_mass'"):  # the scores give the mass
        cache.prefill_chunk(qc, kc, vc, token_mass=torch.zeros(B, HKV, 4, device=DEVICE))
    with pytest.raises(TypeError, match="valid must be a bool"):
        cache.prefill_chunk(qc, kc, vc, valid=[[True] * 4] * B)
    with pytest.raises(ValueError, match=r"valid must be a bool \[B, T\]"):  # one mask per sequence
        cache.prefill_chunk(qc, kc, vc, valid=torch.ones(B, HKV, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="audio_video must be a bool"):  # "no" was read as True
        cache.prefill_chunk(qc, kc, vc, audio_video="no")
    after = state()
    assert torch.equal(after[0], before[0]) and after[1] == before[1]
    assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])
    cache.decode_step(q, k1, v1)  # and a good step stores the token once
    assert torch.equal(st.lengths, before[0] + 1) and st.seen == before[1] + 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prompt_evidence_and_attention_name_a_bad_argument(backend):
    """Not a tensor, or not rank 4: TypeError / ValueError naming q, k or valid (not an AttributeError or IndexError
    from inside), and the layer stays unprefilled."""
    cache = ak.BudgetedLayerCache(ak.AccKVConfig(budget=0.5, backend=backend))
    q = torch.randn(B, 2 * HKV, 8, D, device=DEVICE)
    k, v = rand_kv(8)
    for call in (cache.prompt_evidence, lambda q, k, **kw: cache.prompt_attention(q, k, v, audio_video=False, **kw)):
        for args, kw, error, message in (((q.tolist(), k), {}, TypeError, "q must be a"),
                                         ((q, k.tolist()), {}, TypeError, "k must be a"),
                                         ((q[0], k), {}, ValueError, "q must be a"),
                                         ((q, k[0, 0]), {}, ValueError, "k must be a"),
                                         ((q, k), dict(valid=[[True] * 8] * B), TypeError, "valid must be")):
            with pytest.raises(error, match=message):
                call(*args, **kw)
    assert not cache.store.initialized


def test_plans_and_budgets_name_what_is_wrong():
    with pytest.raises(TypeError, match="keep must be a torch.Tensor"):
        CompactionPlan([[0, 1]], torch.tensor([[2]]))
    with pytest.raises(TypeError, match="merge_weight must be a torch.Tensor or None"):
        CompactionPlan(torch.zeros(1, 1, 2), torch.ones(1, 1), torch.zeros(1, 1, 2), [1.0, 1.0])
    from acckv_triton.policy import budget_tokens
    with pytest.raises(TypeError, match="n_valid must be an int or an integer tensor"):
        budget_tokens(ak.AccKVConfig(budget=0.5), 100.0, 0, 1)
    assert budget_tokens(ak.AccKVConfig(budget=0.5), 100, 0, 1) == 50
    for layer, num_layers, error, message in (  # pyramid budgets would extrapolate; each names what is wrong
            (2, 2, ValueError, r"layer must be an int in \[0, num_layers\) = \[0, 2\), got 2"),
            (-1, 2, ValueError, r"layer must be an int in \[0, num_layers\)"),
            (0, 0, ValueError, "num_layers must be an int >= 1, got 0"),
            (True, 2, TypeError, "layer must be an int, got bool"),
            (0.0, 1, TypeError, "layer must be an int, got float"),
            (0, 2.0, TypeError, "num_layers must be an int, got float"),
            (0, True, TypeError, "num_layers must be an int, got bool")):
        with pytest.raises(error, match=message):
            budget_tokens(ak.AccKVConfig(budget=0.5, layer_budgets="pyramid"), 100, layer, num_layers)
        with pytest.raises(error, match=message):  # the cache runs the same check
            ak.BudgetedLayerCache(ak.AccKVConfig(), layer, num_layers)
    for name, bad, error in (("headroom", True, TypeError), ("align", True, TypeError), ("headroom", 2.0, TypeError),
                             ("growth", "2", TypeError), ("headroom", -1, ValueError), ("growth", 1.0, ValueError),
                             ("align", 0, ValueError)):
        with pytest.raises(error, match=f"{name} must be"):
            LayerKVCache(**{name: bad})
    assert LayerKVCache(headroom=np.int64(8), growth=np.float32(2)).headroom == 8
    cache, *_ = prefill(20)
    plan = random_plan(cache.lengths, 8, merge=False)
    bad = CompactionPlan(plan.keep, torch.full_like(plan.keep_lengths, -1))
    with pytest.raises(ValueError, match="keep_lengths must be >= 0"):
        cache.compress(bad)
    assert cache.max_length == 20 and torch.all(cache.lengths == 20)
    for layer, num_layers in ((0.5, 2), (True, 2), (0, "2")):
        with pytest.raises(TypeError, match="layer must be an int|num_layers must be an int"):
            ak.BudgetedLayerCache(ak.AccKVConfig(), layer, num_layers)


@pytest.mark.parametrize("evidence", ["window", "mean", "last"])
def test_prompt_evidence_refuses_queries_of_another_prompt(evidence):
    """The window's evidence slices q's last queries: a q whose length differs from k's used to score silently."""
    cache = ak.BudgetedLayerCache(ak.AccKVConfig(evidence=evidence, backend="torch"))
    B, Hq, Hkv, T, D = 1, 4, 2, 40, 16
    k = torch.randn(B, Hkv, T, D, device=DEVICE)
    assert cache.prompt_evidence(torch.randn(B, Hq, T, D, device=DEVICE), k).shape == (B, Hkv, T)
    for q in (torch.randn(B, Hq, T + 5, D, device=DEVICE), torch.randn(B, Hq, T - 5, D, device=DEVICE),
              torch.randn(B, Hq, T, D + 1, device=DEVICE), torch.randn(B + 1, Hq, T, D, device=DEVICE)):
        with pytest.raises(ValueError, match=r"q must be a \[B, Hq, T, D\] tensor with B, T, D = \(1, 40, 16\)"):
            cache.prompt_evidence(q, k)
    with pytest.raises(ValueError, match=r"q must be a \[B, Hq, T, D\] tensor .* got \(\(1, 4, 16\)"):
        cache.prompt_evidence(torch.randn(B, Hq, D, device=DEVICE), k)
    with pytest.raises(TypeError, match=r"q must be a \[B, Hq, T, D\] tensor .* got NoneType"):
        cache.prompt_evidence(None, k)
    with pytest.raises(TypeError, match=r"k must be a \[B, Hkv, T, D\] tensor, got list"):
        cache.prompt_evidence(torch.randn(B, Hq, T, D, device=DEVICE), [1.0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_decode_token_with_a_bad_modality_id_is_refused_before_it_is_stored(backend):
    cache = ak.BudgetedLayerCache(ak.AccKVConfig(budget=0.5, backend=backend))
    cache.prefill(*rand_kv(32), scores=torch.rand(B, HKV, 32, device=DEVICE))
    st = cache.store
    lengths, seen, capacity = st.lengths.clone(), st.seen, st.capacity
    k1, v1 = rand_kv(1)
    q = torch.randn(B, 2 * HKV, D, device=DEVICE)
    with pytest.raises(ValueError, match="modality"):
        cache.decode_step(q, k1, v1, modality=torch.tensor([[9], [0]], dtype=torch.uint8))
    with pytest.raises(TypeError, match="modality must be a torch.Tensor"):
        cache.decode_step(q, k1, v1, modality=[[1], [0]])
    # a time that is not integers (it would be truncated), a k that is not a tensor, a strided head dim (the kernel
    # reads the last dim as contiguous: it stored the wrong elements)
    with pytest.raises(TypeError, match="time must be an integer tensor"):
        cache.decode_step(q, k1, v1, time=torch.full((B, 1), 1.7, device=DEVICE))
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        cache.decode_step(q, k1.tolist(), v1)
    with pytest.raises(ValueError, match="contiguous last dim"):
        cache.decode_step(q, torch.randn(B, HKV, 1, 2 * D, device=DEVICE)[..., ::2], v1)
    assert torch.equal(st.lengths, lengths) and st.seen == seen and st.capacity == capacity


def test_crop_last_refuses_compressed_storage():
    """A compressed row's last slots are not its last tokens, even when every row kept as many."""
    cache, *_ = prefill(40, backend="torch")
    keep = torch.arange(0, 40, 4, dtype=torch.int32, device=DEVICE).expand(B, HKV, 10).contiguous()
    cache.compress(CompactionPlan(keep, torch.full((B, HKV), 10, dtype=torch.int32, device=DEVICE)))
    with pytest.raises(ValueError, match="never compressed"):
        cache.crop_last(3)
    assert cache.seen == 40 and torch.all(cache.lengths == 10)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_borrowed_prompt_is_never_written_by_any_backend_nor_by_decode_before_compress(backend):
    """The torch backend compacts in place, so it copies what it is lent; on the kernels a decode step (the mass is
    added in place) copies the lent storage first. Default metadata (position shared with time, expanded) works."""
    g = torch.Generator().manual_seed(8)
    for compress_first in (True, False):
        k, v = rand_kv(24, g=g)
        meta = dict(modality=torch.randint(0, ak.NUM_MODALITIES, (B, HKV, 24), generator=g, dtype=torch.uint8),
                    token_mass=torch.rand(B, HKV, 24, generator=g))
        meta = {n: x.to(DEVICE) for n, x in meta.items()}
        inputs = dict(k=k, v=v, **meta)
        before = {n: x.clone() for n, x in inputs.items()}
        cache = LayerKVCache(backend=backend)
        cache.append(k, v, borrow=True, **meta)
        if compress_first:
            cache.compress(random_plan(cache.lengths, 10, merge=True, seed=1))
        out = cache.decode_attention(torch.randn(B, 2 * HKV, D, generator=g).to(DEVICE))
        assert torch.isfinite(out.out).all()
        cache.append_token(*rand_kv(1, g=g))
        for n, x in inputs.items():
            assert torch.equal(x, before[n]), (compress_first, n)


def test_borrowed_tensors_laid_out_otherwise_are_copied_one_by_one():
    """The kernels read the storage with a unit-stride head dim (K, V) and token dim (metadata), spatial pairs as
    one 64-bit word: a lent tensor laid out otherwise is copied, the others stay borrowed."""
    g = torch.Generator().manual_seed(9)
    k = torch.randn(B, HKV, 20, 2 * D, generator=g).to(DEVICE)[..., ::2]  # head dim stride 2
    v = torch.randn(B, HKV, 20, D, generator=g).to(DEVICE)
    time = torch.arange(40, dtype=torch.int32, device=DEVICE)[::2]  # token stride 2
    spatial = torch.randint(0, 5, (2, 20), generator=g, dtype=torch.int32).to(DEVICE).T  # (h, w) not adjacent
    mass = torch.rand(B, 20, HKV, generator=g).to(DEVICE).transpose(1, 2)  # token stride HKV
    cache = LayerKVCache()
    cache.append(k, v, time=time, spatial=spatial, token_mass=mass, borrow=True)
    assert cache.v.data_ptr() == v.data_ptr() and cache.k.data_ptr() != k.data_ptr()
    for name, want in (("k", k), ("time", time.expand(B, HKV, 20)), ("spatial", spatial.expand(B, HKV, 20, 2)),
                       ("token_mass", mass)):
        assert torch.equal(getattr(cache, name), want), name
    plan = random_plan(cache.lengths, 8, merge=False, seed=2)
    cache.compress(plan)  # the compaction reads every buffer as the kernels do
    n = plan.keep_lengths
    keep = plan.keep.long()
    assert torch.equal(rows(cache.time, n), rows(torch.gather(time.expand(B, HKV, 20), 2, keep), n))
    assert torch.equal(rows(cache.k, n), rows(torch.gather(k, 2, keep[..., None].expand(-1, -1, -1, D)), n))


def test_select_rows_checks_its_index():
    cache, *_ = prefill(20)
    with pytest.raises(TypeError, match="index"):
        cache.select_rows(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="index"):
        cache.select_rows(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"index must hold row ids in \[0, B=2\)"):
        cache.select_rows(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="bool mask"):
        cache.select_rows(torch.tensor([True, False, True]))
    position = cache.position.clone()
    cache.select_rows(torch.tensor([False, True], device=DEVICE))  # a mask keeps what indexing with it keeps
    assert cache.k.shape[0] == 1 and torch.equal(cache.position, position[1:])
    cache.select_rows([0, 0])  # a sequence of ids
    assert torch.equal(cache.position, position[[1, 1]])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_row_with_no_valid_token_gets_no_evidence(backend):
    """valid all False for one sequence: its row sees nothing and scores nothing (the first valid token was read as
    argmax, 0 for an all-False row, so the whole row was scored as valid)."""
    cache = ak.BudgetedLayerCache(ak.AccKVConfig(budget=0.5, backend=backend))
    q, (k, _) = torch.randn(B, 2 * HKV, 8, D, device=DEVICE), rand_kv(8)
    valid = torch.ones(B, 8, dtype=torch.bool, device=DEVICE)
    valid[-1] = False
    scores = cache.prompt_evidence(q, k, valid=valid, audio_video=False)
    assert torch.equal(scores[-1], torch.zeros_like(scores[-1]))
    torch.testing.assert_close(scores[0].sum(-1), torch.full((HKV,), 16.0, device=DEVICE))  # 8 queries x G 2
