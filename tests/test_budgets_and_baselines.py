"""Budget schedules and baselines as their papers define them: PyramidKV's layer schedule, Ada-KV's head allocation,
TOVA's last-query ranking averaged over heads, H2O's evidence over every prompt query, and the two decode budget modes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from acckv_triton import reference
from acckv_triton.cache import BudgetedLayerCache
from acckv_triton.config import AccKVConfig
from acckv_triton.fused_policy import plan_layer_fused
from acckv_triton.policy import _adaptive_targets, budget_tokens, plan_layer
from tests.test_policy import W, kept_mask, tokens

N = W.num_tokens


@pytest.mark.parametrize("budget, n", [(0.25, 1536), (0.1, 1536), (0.9, 1536), (0.5, 700), (100, 5000)])
def test_pyramid_schedule_is_pyramidkvs(budget, n):
    cfg = AccKVConfig(method="pyramidkv", budget=budget)
    L = 30
    per_layer = [budget_tokens(cfg, n, layer, L) for layer in range(L)]
    uniform = budget_tokens(cfg.replace(method="snapkv"), n, 0, L)
    assert all(a >= b for a, b in zip(per_layer, per_layer[1:]))  # falls with depth
    assert max(per_layer) <= n
    assert abs(sum(per_layer) / L - uniform) <= 1.0  # the mean is the uniform budget (ceil per layer)
    if uniform - cfg.window > 0 and 2 * (uniform - cfg.window) <= n - cfg.window:
        # layer 0 keeps 2b - b/beta and the last b/beta of the unprotected part b (rounded up)
        b = uniform - cfg.window
        assert abs(per_layer[-1] - (cfg.window + b / cfg.pyramid_beta)) <= 1.0
        assert abs(per_layer[0] - (cfg.window + 2 * b - b / cfg.pyramid_beta)) <= 1.0
    # the device path computes the same integers
    rows = torch.tensor([[n, max(1, n // 3)]])
    for layer in (0, 7, L - 1):
        got = budget_tokens(cfg, rows, layer, L)
        assert got.tolist() == [[budget_tokens(cfg, n, layer, L), budget_tokens(cfg, max(1, n // 3), layer, L)]]


def test_adaptive_targets_share_the_layer_budget_across_heads():
    g = torch.Generator().manual_seed(0)
    B, H, n = 2, 4, 50
    score = torch.rand(B, H, n, generator=g) ** 4
    score[:, 0] *= 10.0  # head 0 is where the evidence is
    cand = torch.rand(B, H, n, generator=g) > 0.1
    protected = torch.full((B, H), 3)
    target = torch.full((B, H), 13)
    cfg = AccKVConfig(method="adakv")
    got = _adaptive_targets(cfg, score, cand, protected, target, None)
    assert torch.equal(got.sum(-1), target.sum(-1))
    free = target - protected
    assert bool((got - protected >= torch.floor(cfg.ada_floor * free)).all())
    assert bool((got[:, 0] > target[:, 0]).all())  # the concentrated head wins slots
    capped = _adaptive_targets(cfg, score, cand, protected, target, 20)
    assert int(capped.max()) <= 20 and torch.equal(capped.sum(-1), target.sum(-1))
    # without a floor SnapKV's kept set is the global top-k over the heads of a sequence
    plan_target = _adaptive_targets(cfg.replace(ada_floor=0.0), score, cand, protected, target, None)
    flat = torch.where(cand, score, -1.0).reshape(B, -1)
    top = flat.topk(int((target - protected).sum(-1)[0]), dim=-1).indices
    want = torch.zeros(B, H * n, dtype=torch.long).scatter_(1, top, 1).view(B, H, n).sum(-1)
    assert torch.equal(plan_target - protected, want)


def test_adakv_plan_keeps_the_layer_total_and_more_where_mass_concentrates():
    x = tokens()
    x.scores = x.scores.clone()
    x.scores[:, 0] *= 50.0
    snap = plan_layer(AccKVConfig(method="snapkv", budget=0.25), x, 1, 2).plan
    ada = plan_layer(AccKVConfig(method="adakv", budget=0.25), x, 1, 2).plan
    assert torch.equal(ada.keep_lengths.sum(-1), snap.keep_lengths.sum(-1))
    assert bool((ada.keep_lengths[:, 0] > snap.keep_lengths[:, 0]).all())
    kept = kept_mask(ada)
    window = torch.arange(N) >= N - AccKVConfig().window
    assert bool(kept[..., window].all())  # every head keeps its window


def test_tova_ranks_by_the_head_averaged_last_query_and_protects_nothing():
    x = tokens()
    x.scores = x.scores.clone()
    x.scores[:, 1] = x.scores[:, 1].flip(-1) * 3.0  # the heads disagree: a per-head top-k would keep other tokens
    res = plan_layer(AccKVConfig(method="tova", budget=0.1), x, 1, 2)
    B, H = x.scores.shape[:2]
    for b in range(B):
        k = int(res.plan.keep_lengths[b, 0])
        want = x.scores[b].float().mean(0).topk(k).indices.sort().values  # TOVA: the heads' mean, no protection
        for h in range(H):
            assert int(res.plan.keep_lengths[b, h]) == k
            assert torch.equal(res.plan.keep[b, h, :k].long(), want)
        assert not torch.equal(want, x.scores[b, 0].float().topk(k).indices.sort().values)  # the test can fail


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "adakv", "lookm"])
def test_windowed_baselines_keep_the_tokens_decoded_since_the_prefill(method):
    """At a decode-time upkeep a windowed baseline keeps the latest prefill's window and its last W tokens (the
    tokens decoded since: SnapKV's observation window at that point) whatever their evidence; the decoded tokens
    before those compete on their evidence; without position protection the newest compete too."""
    x = tokens()
    x.modality = torch.zeros_like(x.modality)  # a text prompt and its continuation
    x.position = torch.arange(N, dtype=torch.int32).expand(2, 2, N).contiguous()
    x.window_range = (N - 64 - 32, N - 64)  # the prefill's window; 64 tokens decoded since
    decoded = torch.arange(N) >= N - 64
    recent, window = torch.arange(N) >= N - 32, (torch.arange(N) >= N - 96) & ~decoded  # W = 32
    hi = torch.rand(x.scores.shape, generator=torch.Generator().manual_seed(4)) + 1.0
    x.scores = torch.where(decoded, 1e-6, hi)  # the decoded tokens carry (almost) no evidence yet
    cfg = AccKVConfig(budget=0.3, method=method)
    kept = kept_mask(plan_layer(cfg, x, 0, 2).plan)  # layer 0: PyramidKV's largest budget holds both
    assert bool(kept[..., recent].all() and kept[..., window].all())
    assert not bool(kept[..., decoded & ~recent].any())
    unprotected = kept_mask(plan_layer(cfg.replace(protect_positions=False), x, 0, 2).plan)
    assert unprotected[..., window].all() and not bool(unprotected[..., recent].any())
    fused = plan_layer_fused(cfg, x, 0, 2, target=budget_tokens(cfg, x.lengths.long(), 0, 2), max_keep=N)
    assert torch.equal(kept_mask(fused.plan), kept_mask(plan_layer(cfg, x, 0, 2).plan))  # the kernels agree


def test_methods_evidence_follows_their_papers():
    assert AccKVConfig(method="h2o").score_evidence == "observed"
    assert AccKVConfig(method="tova").score_evidence == "last"
    assert AccKVConfig(method="snapkv").score_evidence == "window"
    assert AccKVConfig(method="h2o", evidence="window").score_evidence == "window"  # the window variant


@pytest.mark.parametrize("kwargs, msg", [
    (dict(evidence="all"), "evidence"), (dict(head_budgets="ada"), "head_budgets"), (dict(ada_floor=1.5), "ada_floor"),
    (dict(decode_budget="prefill"), "decode_budget"), (dict(pyramid_beta=0.5), "pyramid_beta"),
    (dict(method="tova", head_budgets="adaptive"), "head_budgets"),
])
def test_new_config_fields_are_validated(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        AccKVConfig(**kwargs)


NAN = float("nan")


@pytest.mark.parametrize("kwargs, exc", [
    (dict(slack=1.5), TypeError), (dict(slack=NAN), TypeError), (dict(slack="x"), TypeError),
    (dict(slack=None), TypeError), (dict(slack=-1), ValueError), (dict(window="x"), TypeError),
    (dict(window=2.5), TypeError), (dict(pool_kernel="3"), TypeError), (dict(pool_kernel=3.0), TypeError),
    (dict(recent=NAN), TypeError), (dict(max_group=1.5), TypeError), (dict(max_group=0), ValueError),
    (dict(sink=True), TypeError), (dict(time_bin=np.float64(50)), TypeError),
    (dict(gamma=-1), ValueError), (dict(gamma=NAN), ValueError), (dict(gamma="1"), TypeError),
    (dict(theta_audio=5.0), ValueError), (dict(theta_video=NAN), ValueError), (dict(theta_video=-1.5), ValueError),
    (dict(align_lambda=-3), ValueError), (dict(align_lambda=NAN), ValueError), (dict(align_lambda=True), TypeError),
    (dict(video_from_layer=-1), ValueError), (dict(video_from_layer="x"), TypeError),
    (dict(video_from_layer=2.0), TypeError), (dict(pool_lift=float("inf")), ValueError),
    (dict(pyramid_beta=float("inf")), ValueError), (dict(ada_floor=NAN), ValueError), (dict(rho_min=NAN), ValueError),
    (dict(focusing="no"), TypeError), (dict(focusing=1), TypeError), (dict(redistribution=None), TypeError),
    (dict(intra_merge=0), TypeError), (dict(cross_align="yes"), TypeError), (dict(merge_frees_budget=1), TypeError),
    (dict(proportional="False"), TypeError), (dict(protect_text=1), TypeError), (dict(head_renorm="no"), TypeError),
    (dict(protect_positions=1), TypeError), (dict(value_aware=1), TypeError), (dict(protect_sinks="no"), TypeError),
    (dict(recency=True), TypeError), (dict(recency="256"), TypeError), (dict(recency=NAN), ValueError),
    (dict(decode_ahead=True), TypeError), (dict(decode_ahead=1.5), TypeError), (dict(decode_ahead=-1), ValueError),
    (dict(budget=True), TypeError), (dict(budget=np.bool_(True)), TypeError), (dict(budget=NAN), ValueError),
    (dict(method=None), TypeError), (dict(evidence=3), TypeError), (dict(pool_mode=None), TypeError),
    (dict(backend="cuda"), ValueError),
], ids=str)
def test_every_config_field_is_validated(kwargs, exc):
    """A wrong type raises TypeError, a value out of range (or not finite) ValueError, at construction and in
    replace; the message names the field."""
    (name,) = kwargs
    with pytest.raises(exc, match=rf"^{name}\b.* must "):
        AccKVConfig(**kwargs)
    with pytest.raises(exc, match=rf"^{name}\b.* must "):
        AccKVConfig().replace(**kwargs)


def test_config_takes_numpy_scalars_as_python_numbers():
    for budget, want in [(np.float32(0.25), 0.25), (np.float64(0.25), 0.25), (np.int64(100), 100), (0.25, 0.25)]:
        got = AccKVConfig(budget=budget).budget
        assert got == want and type(got) is type(want)
    cfg = AccKVConfig(focusing=np.bool_(False), value_aware=np.bool_(True), window=np.int64(8), slack=np.int32(4),
                      gamma=np.float32(2), theta_audio=1, recency=256, video_from_layer=np.int16(3))
    assert cfg == AccKVConfig(focusing=False, value_aware=True, window=8, slack=4, gamma=2.0, theta_audio=1.0,
                              recency=256.0, video_from_layer=3)
    names = ("focusing", "value_aware", "window", "slack", "gamma", "theta_audio", "recency", "video_from_layer")
    assert [type(getattr(cfg, f)) for f in names] == [bool, bool, int, int, float, float, float, int]
    assert cfg.replace(slack=8).slack == 8 and cfg.replace(slack=8).window == 8  # replace keeps the other fields


def test_every_config_field_has_a_rule_and_every_method_constructs():
    from dataclasses import fields

    from acckv_triton.config import _RULES, METHODS
    assert set(_RULES) | {"budget"} == {f.name for f in fields(AccKVConfig)}
    for method in METHODS:
        assert AccKVConfig(method=method).replace(budget=0.5).method == method


@pytest.mark.parametrize("method", ["acckv", "snapkv", "h2o", "tova", "adakv", "streaming", "kvzip", "full"])
def test_config_bool_properties_are_bools(method):
    for kw in ({}, dict(intra_merge=np.bool_(True), proportional=np.bool_(True)), dict(value_aware=np.bool_(False)),
               dict(protect_sinks=np.bool_(True)), dict(protect_positions=False), dict(budget=1.0)):
        cfg = AccKVConfig(method=method, **kw)
        for prop in ("is_full", "ranks_by_value", "protects_sinks", "windowed", "adaptive_heads", "uses_multiplicity"):
            assert type(getattr(cfg, prop)) is bool, (kw, prop)


def _prefilled(cfg, T=160, D=16, Hq=4, Hkv=2, seed=0, backend="torch"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
    cache = BudgetedLayerCache(cfg.replace(backend=backend), 0, 1)
    cache.prefill(k, v, scores=cache.prompt_evidence(q, k))
    return cache, (q, k, v), g


@pytest.mark.parametrize("evidence, rows", [("window", 8), ("last", 1), ("observed", None)])
def test_prompt_evidence_is_the_named_queries_attention(evidence, rows):
    cfg = AccKVConfig(window=8, evidence=evidence, backend="torch")
    cache = BudgetedLayerCache(cfg, 0, 1)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :5] = False
    got = cache.prompt_evidence(q, k, valid=valid)
    n = rows or 40
    want = reference.window_scores(q[:, :, 40 - n:], k, key_start=torch.tensor([0, 5])).scores
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("audio_video", [False, True], ids=["text", "audio-video"])
def test_acckv_weighs_its_text_evidence_by_value_norm(audio_video):
    """AccKV's default (value_aware None): on a text prompt, whose evidence is every query's mean, the ranking is
    the mean x ||v||, as value_aware=True; value_aware=False ranks by the mean alone. On an audio-video prompt (the
    window's evidence) it stays off."""
    g = torch.Generator().manual_seed(3)
    T = 160
    q, k = torch.randn(1, 4, T, 16, generator=g), torch.randn(1, 2, T, 16, generator=g)
    v = torch.randn(1, 2, T, 16, generator=g) * (0.1 + 3 * torch.rand(1, 2, T, 1, generator=g))  # norms vary

    def kept(**switch):
        # (broad_entropy off: this random prompt's last query attends broadly, and a broad row ranks by it alone)
        cache = BudgetedLayerCache(AccKVConfig(budget=0.25, backend="torch", broad_entropy=1.0, **switch), 0, 1)
        cache.prefill(k, v, scores=cache.prompt_evidence(q, k, audio_video=audio_video), audio_video=audio_video)
        n = cache.store.lengths.long()
        return [cache.store.position[0, h, :int(n[0, h])].tolist() for h in range(2)]

    default, on, off = kept(), kept(value_aware=True), kept(value_aware=False)
    assert default == (off if audio_video else on)
    assert on != off  # the switch matters on this prompt either way
    assert AccKVConfig(evidence="mean").ranks_by_value and not AccKVConfig(method="h2o").ranks_by_value
    assert AccKVConfig(method="snapkv", value_aware=True).ranks_by_value
    with pytest.raises(TypeError, match="value_aware"):
        AccKVConfig(value_aware="yes")


def _decode(cache, g, n):
    for _ in range(n):
        cache.decode_step(torch.randn(1, 4, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g),
                          torch.randn(1, 2, 1, 16, generator=g))


def test_decode_budget_modes():
    """prompt: every decoded token kept; fixed: the prompt's budget whatever is decoded; all: the budget of every
    token seen (it grows with the decoded tokens)."""
    kept = {}
    for mode in ("prompt", "fixed", "all"):
        cfg = AccKVConfig(budget=0.25, decode_budget=mode, slack=4)
        cache, _, g = _prefilled(cfg)
        target = int(cache.target.max())
        _decode(cache, g, 80)
        kept[mode] = int(cache.store.stored_tokens().max())
        if mode == "prompt":
            assert cache.compressions == 1 and kept[mode] == target + 80
        elif mode == "fixed":
            assert cache.compressions > 1 and target <= kept[mode] <= target + cfg.slack
        else:
            grown = budget_tokens(cfg, 160 + 80, 0, 1)
            assert cache.compressions > 1 and grown <= kept[mode] <= grown + cfg.slack
            assert int(cache.target.max()) == grown
    assert kept["fixed"] < kept["all"] < kept["prompt"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adaptive_cache_sizes_storage_to_the_longest_head_and_caps_upkeep(backend):
    """Ada-KV through the cache, on the torch policy and on the fused kernels (which must keep the same tokens):
    the storage is sized to the longest head after the prefill, every upkeep keeps the layer's whole budget
    within the storage's room (rows capped at it) and compacts in place."""
    cfg = AccKVConfig(method="adakv", budget=0.25, slack=8, decode_budget="fixed")
    cache, (q, k, v), g = _prefilled(cfg, backend=backend)
    twin, *_ = _prefilled(cfg)  # the torch policy on the same prompt
    lengths = cache.store.lengths.long()
    assert torch.equal(lengths, twin.store.lengths.long())
    assert int(lengths.sum()) == int(cache.target.sum())
    cap = cache.store.capacity - cfg.slack - 1
    assert int(lengths.max()) <= cap
    capacity, ptr = cache.store.capacity, cache.store.k.data_ptr()
    steps = torch.Generator().manual_seed(9)
    for _ in range(30):  # several upkeeps, each keeping the layer's whole budget within the storage's room
        state = steps.get_state()
        _decode(cache, steps, 1)
        steps.set_state(state)
        _decode(twin, steps, 1)
        if cache._excess == 0:
            assert int(cache.store.lengths.sum()) == int(cache.target.sum())
            lengths_now = cache.store.lengths.long()
            assert torch.equal(lengths_now, twin.store.lengths.long())
            stored = torch.arange(cap) < lengths_now[..., None]  # the same tokens kept (slots past a row differ)
            assert torch.equal(cache.store.position[..., :cap][stored], twin.store.position[..., :cap][stored])
    assert cache.compressions > 1
    assert cache.store.capacity == capacity  # nothing outgrew it: upkeeps came before any row would
    assert cache.store.k.data_ptr() == ptr  # in place


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adaptive_upkeep_caps_a_dominant_head_at_the_storage_room(backend):
    """An upkeep where one head's evidence outranks every token of the other: Ada-KV would hand it more than the
    storage's room. It keeps exactly the room (capacity - slack - 1), the other head the rest of the layer's
    budget, and every stored token is the one the plan names (nothing truncated past a bound, nothing stale).
    A slack above the storage's alignment lets a row hold more than the room at an upkeep."""
    cfg = AccKVConfig(method="adakv", budget=0.25, slack=16, decode_budget="fixed", window=8)
    cache, _, g = _prefilled(cfg, backend=backend)
    st = cache.store
    cap = st.capacity - cfg.slack - 1
    st.token_mass[:, 0] *= 100  # head 0's stored tokens now outrank all of head 1's
    before = {}
    compress = cache.compress

    def snapshot_then_compress(upkeep=False):
        before["position"] = st.position.clone()
        compress(upkeep=upkeep)

    cache.compress = snapshot_then_compress
    for _ in range(2 * cfg.slack):
        _decode(cache, g, 1)
        if cache.compressions == 2:
            break
    assert cache.compressions == 2 and st.capacity == cap + cfg.slack + 1  # one upkeep, in place
    plan = cache.last.plan
    n = st.lengths.long()
    assert torch.equal(n, plan.keep_lengths.long())
    assert int(n[0, 0]) == cap and int(n.sum()) == int(cache.target.sum())  # capped; head 1 takes the rest
    for h in range(2):
        keep = plan.keep[0, h, :n[0, h]].long()
        assert torch.equal(st.position[0, h, :n[0, h]], before["position"][0, h, keep]), h


def test_adaptive_targets_hand_a_short_rows_unused_budget_to_the_others():
    x = tokens(lengths=[N, 40, N, N])  # row (0, 1) holds fewer tokens than its target (as after an upkeep)
    plan = plan_layer(AccKVConfig(method="adakv", budget=100), x, 1, 2, target=torch.full((2, 2), 100)).plan
    assert int(plan.keep_lengths[0].sum()) == 200 and int(plan.keep_lengths[0, 1]) <= 40


def test_value_aware_ranks_by_mass_times_value_norm():
    base = AccKVConfig(method="snapkv", budget=0.25, pool_kernel=1, window=8)
    cache, (q, k, v), _ = _prefilled(base.replace(value_aware=True))
    T, Wn = k.shape[2], base.window
    score = cache.prompt_evidence(q, k) * v.float().norm(dim=-1)
    for h in range(2):
        n = int(cache.store.lengths[0, h])
        top = score[0, h, :T - Wn].topk(n - Wn).indices
        want = torch.cat([top, torch.arange(T - Wn, T)]).sort().values
        assert torch.equal(cache.store.position[0, h, :n].long(), want)
    plain, _, _ = _prefilled(base)
    assert not torch.equal(plain.store.position[..., :n], cache.store.position[..., :n])  # the switch matters


@pytest.mark.parametrize("method", ["adakv", "kvzip", "snapkv"])
def test_a_first_prompt_in_any_layout_is_kept_alike_on_both_backends_and_never_written(method):
    """The kernel backend borrows the first prompt: scores, metadata and K/V that are views laid out otherwise (a
    transposed score, strided ids, positions and times, (h, w) pairs that are not adjacent, a strided head dim)
    keep the same tokens as on the torch backend, and nothing the caller passed changes."""
    g = torch.Generator().manual_seed(4)
    B, Hkv, T, D = 2, 2, 40, 16
    k = torch.randn(B, Hkv, T, 2 * D, generator=g)[..., ::2]
    v = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    q = torch.randn(B, 2 * Hkv, T, D, generator=g)
    inputs = dict(
        scores=torch.rand(B, T, Hkv, generator=g).transpose(1, 2),
        modality=torch.randint(0, 4, (B, 2 * T), generator=g, dtype=torch.uint8)[:, ::2],
        position=torch.arange(B * T, dtype=torch.int32).view(T, B).T,
        time=torch.arange(2 * T, dtype=torch.int32)[::2],
        spatial=torch.randint(-1, 4, (2, T), generator=g, dtype=torch.int32).T,
    )
    before = {n: x.clone() for n, x in dict(k=k, v=v, **inputs).items()}
    kept = {}
    for backend in ("triton", "torch"):
        cache = BudgetedLayerCache(AccKVConfig(method=method, budget=0.3, backend=backend), 0, 1)
        cache.prefill(k, v, **inputs)
        if method == "kvzip":
            cache.reconstruct(q, k.contiguous(), v.contiguous())
            cache.end_reconstruction()
        n = cache.store.lengths
        kept[backend] = [cache.store.position[b, h, :int(n[b, h])].tolist() for b in range(B) for h in range(Hkv)]
    assert kept["triton"] == kept["torch"]
    for name, x in dict(k=k, v=v, **inputs).items():
        assert torch.equal(x, before[name]), name


def test_prefill_and_reconstruct_name_a_bad_argument():
    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, 2, 12, 16, generator=g)
    cache = BudgetedLayerCache(AccKVConfig(method="kvzip", budget=0.5, backend="torch"), 0, 1)
    with pytest.raises(ValueError, match="valid must be a bool"):
        cache.prefill(k, k, scores=torch.rand(1, 2, 12), valid=torch.ones(1, 13, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid"):
        cache.prefill(k, k, scores=torch.rand(1, 2, 12), valid=[[True] * 12])
    with pytest.raises(TypeError, match="valid must be a bool"):  # a wrong dtype: a TypeError
        cache.prefill(k, k, scores=torch.rand(1, 2, 12), valid=torch.ones(1, 12, dtype=torch.int64))
    cache.prefill(k, k, scores=torch.rand(1, 2, 12))
    q = torch.randn(1, 4, 12, 16, generator=g)
    with pytest.raises(ValueError, match="^k must be"):  # the chunk against the stored prompt, not "k_cache"
        cache.reconstruct(q.half(), k.half(), k.half())
    with pytest.raises(ValueError, match="^q must be"):
        cache.reconstruct(q[:, :, :5], k, k)
    cache.reconstruct(q, k, k)
    cache.end_reconstruction()
