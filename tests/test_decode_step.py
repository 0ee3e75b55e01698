"""The decode step the cache owns: one call per token (append, attention + mass, upkeep), sync-free and
allocation-free between upkeeps, storage at fixed addresses across upkeep cycles, the decoded tokens counted in
the budget; on both backends, by hand and inside a tiny transformers model."""
from __future__ import annotations

import math

import pytest
import torch

import acckv_triton as ak
from acckv_triton import reference
from acckv_triton.bench.opcount import OpCounter, count_triton_launches
from acckv_triton.cache import BudgetedLayerCache
from acckv_triton.policy import budget_tokens
from tests.conftest import DEVICE, DTYPES

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def _prefilled(cfg, B=2, Hkv=2, N=96, D=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = BudgetedLayerCache(cfg, layer=0, num_layers=1)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype).to(DEVICE)
    cache.prefill(k, v, scores=torch.rand(B, Hkv, N, generator=g).to(DEVICE))
    return cache, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_is_attention_over_the_stored_tokens_plus_the_new_one(backend, dtype):
    cfg = ak.AccKVConfig(budget=0.25, slack=64, backend=backend)  # no upkeep in these steps
    cache, g = _prefilled(cfg, dtype=dtype)
    st = cache.store
    B, Hkv, _, D = st.k.shape
    Hq = 3 * Hkv
    for step in range(5):
        q = torch.randn(B, Hq, D, generator=g).to(dtype).to(DEVICE)
        k1 = torch.randn(B, Hkv, 1, D, generator=g).to(dtype).to(DEVICE)
        v1 = torch.randn(B, Hkv, 1, D, generator=g).to(dtype).to(DEVICE)
        lengths = st.lengths.clone()
        mass = st.token_mass.clone()
        k_all, v_all = st.k.clone(), st.v.clone()
        idx = lengths.long()[..., None, None].expand(B, Hkv, 1, D)
        k_all.scatter_(2, idx, k1)
        v_all.scatter_(2, idx, v1)
        mass.scatter_(2, lengths.long()[..., None], 0.0)
        mult = st.multiplicity.clone().scatter_(2, lengths.long()[..., None], 1.0)  # the new token stands for one
        want = reference.decode_attention(q, k_all, v_all, lengths + 1, scale=0.2, token_mass=mass,
                                          multiplicity=mult if st.proportional else None)
        res = cache.decode_step(q, k1, v1, scale=0.2)
        atol, rtol = OUT_TOL[dtype]
        torch.testing.assert_close(res.out, want.out, atol=atol, rtol=rtol)
        assert torch.equal(st.lengths, lengths + 1)
        stored = torch.arange(st.capacity, device=DEVICE) < st.lengths.long()[..., None]
        torch.testing.assert_close(st.token_mass[stored], mass[stored], atol=atol, rtol=rtol)
        assert (st.position.gather(2, lengths.long()[..., None]) == st.seen - 1).all()  # the new token's position
    assert cache.compressions == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_and_addresses_stay_fixed_across_three_upkeeps(backend):
    """With the budget fixed at the prompt's (``decode_budget="fixed"``); "all" grows it with the tokens seen."""
    cfg = ak.AccKVConfig(budget=0.25, slack=8, backend=backend, decode_budget="fixed")
    cache, g = _prefilled(cfg, N=100)
    st = cache.store
    target = int(cache.target.max())
    assert st.capacity == -(-(target + cfg.slack + 1) // 16) * 16  # fixed after prefill: target + slack + 1
    ptrs = [x.data_ptr() for x in st._buffers()]
    B, Hkv, _, D = st.k.shape
    for _ in range(3 * (cfg.slack + 1) + 2):
        q = torch.randn(B, 2 * Hkv, D, generator=g).to(DEVICE)
        kv = torch.randn(B, Hkv, 1, D, generator=g).to(DEVICE)
        cache.decode_step(q, kv, kv)
        assert int(st.lengths.max()) <= target + cfg.slack
    assert cache.compressions >= 4  # the prefill and three upkeeps
    assert [x.data_ptr() for x in st._buffers()] == ptrs


def test_decode_ahead_sizes_the_storage_for_the_budget_to_come():
    """``decode_ahead`` (budget on every token seen): the storage holds the budget of that many more decoded tokens,
    so 64 decoded tokens run on the prefill's storage, where ``decode_ahead=0`` reallocates; a fixed budget has no
    growth to size for."""
    bindings = {}
    for ahead in (64, 0):
        cfg = ak.AccKVConfig(budget=0.25, slack=8, backend="torch", decode_ahead=ahead)
        cache, g = _prefilled(cfg, N=100)
        st = cache.store
        growth = budget_tokens(cfg, 100 + ahead, 0, 1) - budget_tokens(cfg, 100, 0, 1)
        assert st.capacity == -(-(budget_tokens(cfg, 100, 0, 1) + growth + cfg.slack + 1) // 16) * 16
        seen = {st.binding}
        B, Hkv, _, D = st.k.shape
        for _ in range(64):
            kv = torch.randn(B, Hkv, 1, D, generator=g).to(DEVICE)
            cache.decode_step(torch.randn(B, 2 * Hkv, D, generator=g).to(DEVICE), kv, kv)
            seen.add(st.binding)
        bindings[ahead] = len(seen)
    assert bindings[64] == 1 and bindings[0] > 1, bindings
    fixed = ak.AccKVConfig(budget=0.25, slack=8, backend="torch", decode_ahead=64, decode_budget="fixed")
    assert _prefilled(fixed, N=100)[0].store.capacity == -(-(budget_tokens(fixed, 100, 0, 1) + 9) // 16) * 16
    for bad, exc in ((-1, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(exc, match="decode_ahead must be None or an int >= 0"):
            ak.AccKVConfig(decode_ahead=bad)


@pytest.mark.parametrize("decode_budget", ["fixed", "all", "prompt"])
@pytest.mark.parametrize("method", ["acckv", "adakv"])
def test_plain_steps_ahead_are_plain(method, decode_budget):
    """The host's count of the decode steps ahead that run no upkeep and append in place (what a CUDA graph of the
    step may replay) never promises a step that is not plain, and with a fixed target it is exact."""
    cfg = ak.AccKVConfig(budget=0.25, slack=6, method=method, decode_budget=decode_budget, backend="torch")
    cache, g = _prefilled(cfg, N=80)
    B, Hkv, _, D = cache.store.k.shape

    def step():
        kv = torch.randn(B, Hkv, 1, D, generator=g).to(DEVICE)
        cache.decode_step(torch.randn(B, 2 * Hkv, D, generator=g).to(DEVICE), kv, kv)

    exact = 0
    for _ in range(12):  # runs of plain steps, each ended by an upkeep or a growth
        ahead = cache.plain_steps_ahead()
        for _ in range(ahead):
            assert cache.next_step_is_plain()
            step()
        exact += not cache.next_step_is_plain()
        step()
    assert cache.compressions > 1 or decode_budget == "prompt"
    assert exact == 12 or decode_budget == "all"


@pytest.mark.parametrize("method", ["acckv", "snapkv", "h2o", "streaming", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_without_upkeep_syncs_nothing_and_allocates_nothing(backend, method):
    budget = 1.0 if method == "full" else 0.25
    cfg = ak.AccKVConfig(budget=budget, slack=16, method=method, backend=backend)
    cache, g = _prefilled(cfg, N=80)
    B, Hkv, _, D = cache.store.k.shape
    q = torch.randn(B, 4 * Hkv, D, generator=g).to(DEVICE)
    kv = torch.randn(B, Hkv, 1, D, generator=g).to(DEVICE)
    cache.decode_step(q, kv, kv)  # the first step builds the decode plan
    before = cache.compressions
    with count_triton_launches() as launches, OpCounter() as ops:
        for _ in range(4):
            cache.decode_step(q, kv, kv)
    assert cache.compressions == before  # no upkeep in these steps
    assert ops.syncs == 0, ops.sync_ops
    assert ops.allocations == 0, ops.alloc_ops
    if backend == "triton":  # append, split, reduce (token mass folded into the reduce launch); no torch op
        assert ops.ops == 0, ops.by_name
        assert launches == {"_append_token_kernel": 4, "_decode_split_kernel": 4, "_decode_reduce_kernel": 4}
    else:  # 21 for AccKV (its mask is log(multiplicity) over the fresh tail), 22 for SnapKV and H2O (a row mask)
        assert ops.ops <= 4 * 22, ops.by_name


def test_mass_is_accumulated_only_where_the_method_reads_it():
    for method, reads in (("acckv", True), ("h2o", True), ("streaming", False)):
        cache, g = _prefilled(ak.AccKVConfig(budget=0.5, method=method, backend="torch" if DEVICE.type == "cpu"
                                             else "triton"))
        st = cache.store
        before = st.token_mass.clone()
        stored = torch.arange(st.capacity, device=DEVICE) < st.lengths.long()[..., None]
        B, Hkv, _, D = st.k.shape
        kv = torch.randn(B, Hkv, 1, D, generator=g).to(DEVICE)
        cache.decode_step(torch.randn(B, Hkv, D, generator=g).to(DEVICE), kv, kv)
        changed = not torch.equal(st.token_mass[stored], before[stored])
        assert changed == reads, method


def test_decode_step_needs_a_prefill_and_checks_its_token():
    cache = BudgetedLayerCache(ak.AccKVConfig(budget=0.5))
    with pytest.raises(ValueError, match="prefill"):
        cache.decode_step(torch.randn(1, 2, 16), torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16))
    cache, _ = _prefilled(ak.AccKVConfig(budget=0.5))
    with pytest.raises(ValueError, match=r"k and v must be \[B, Hkv, 1, D\]"):
        cache.decode_step(torch.randn(2, 4, 64), torch.randn(2, 2, 2, 64), torch.randn(2, 2, 2, 64))
    q = torch.randn(2, 4, 64, device=DEVICE)
    kv = torch.randn(2, 2, 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="modality must have shape"):
        cache.decode_step(q, kv, kv, modality=torch.zeros(3, dtype=torch.uint8, device=DEVICE))


# ------------------------------------------------------------------------------------------ inside a real model
def _transformers():
    """transformers, the patcher and the tiny model builder (the `test` extra installs transformers)."""
    pytest.importorskip("transformers")
    from acckv_triton.integrations.transformers import apply_acckv
    from tests.integrations.tiny_models import tiny_causal_lm

    return apply_acckv, tiny_causal_lm


def test_decoded_tokens_count_in_the_budget_of_a_second_question():
    """As a new user tries it: a 40-token prompt, 10 generated tokens, an 8-token second question, budget 0.5.
    The second prompt's budget counts everything seen before it: ceil(0.5 * (40 + 9 + 9)) = 29 stored tokens."""
    apply_acckv, tiny_causal_lm = _transformers()
    from acckv_triton.integrations.transformers import cache_keyword, output_cache

    model = tiny_causal_lm("llama")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 100, (1, 40), generator=g)
    greedy = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with apply_acckv(model, ak.AccKVConfig(budget=0.5)):
        out = model.generate(ids, max_new_tokens=10, min_new_tokens=10, **greedy)
        cache = output_cache(out)
        ids2 = torch.cat([out.sequences, torch.randint(3, 100, (1, 8), generator=g)], dim=1)
        model.generate(ids2, max_new_tokens=1, min_new_tokens=1, **{cache_keyword(model): cache}, **greedy)
    assert cache.get_seq_length() == 58
    assert (cache.stored_tokens() == math.ceil(0.5 * 58)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_patched_decode_forward_syncs_no_more_than_the_unpatched_model(backend):
    """Over whole decode forwards of a tiny Llama (every layer, mask and RoPE included): no host sync in a step
    without upkeep, and the cache's own step allocates nothing."""
    import transformers

    apply_acckv, tiny_causal_lm = _transformers()
    from acckv_triton.integrations.transformers import cache_keyword

    model = tiny_causal_lm("llama").to(DEVICE)
    name = cache_keyword(model)
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cfg = ak.AccKVConfig(budget=0.5, slack=16, backend=backend)
    steps = []
    real_step = BudgetedLayerCache.decode_step

    def counted_step(self, *args, **kwargs):
        with OpCounter() as c:
            out = real_step(self, *args, **kwargs)
        steps.append(c)
        return out

    with torch.no_grad():
        plain = transformers.DynamicCache()
        logits = model(ids, **{name: plain}).logits
        with OpCounter() as unpatched:
            model(logits[:, -1:].argmax(-1), **{name: plain})
        with apply_acckv(model, cfg) as handle:
            cache = handle.new_cache()
            logits = model(ids, **{name: cache}).logits
            BudgetedLayerCache.decode_step = counted_step
            try:
                forwards = []
                for _ in range(5):
                    with count_triton_launches(), OpCounter() as c:
                        logits = model(logits[:, -1:].argmax(-1), **{name: cache}).logits
                    forwards.append(c)
            finally:
                BudgetedLayerCache.decode_step = real_step
    assert all(layer.budgeted.compressions == 1 for layer in cache.layers)  # no upkeep in these 5 steps
    assert all(f.syncs == 0 for f in forwards) and unpatched.syncs == 0, [dict(f.sync_ops) for f in forwards]
    assert len(steps) == 5 * len(cache.layers)
    assert all(s.allocations == 0 for s in steps[len(cache.layers):]), [dict(s.alloc_ops) for s in steps]
