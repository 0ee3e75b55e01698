"""The policy's properties: exact budgets, protected tokens, merges inside a modality, switches, determinism."""
from __future__ import annotations

import pytest
import torch

import acckv_triton as ak
from acckv_triton import reference, workloads
from acckv_triton.bench.av import layer_inputs, workload_to
from acckv_triton.cache import BudgetedLayerCache
from acckv_triton.config import METHODS, AccKVConfig
from acckv_triton.modality import Modality
from acckv_triton.policy import LayerTokens, _alignment_boost, _merge_groups, budget_tokens, plan_layer
from tests.conftest import DEVICE

W = workloads.generate_av_workload(num_chunks=3, grid_h=4, grid_w=4, batch=2, num_layers=2, seed=1)
N = W.num_tokens
SCORES = [reference.window_scores(lt.q_window, lt.k, modality=W.token_modality()).scores for lt in W.layers]
ALL = [pytest.param(AccKVConfig(method=m), id=m) for m in METHODS] + \
    [pytest.param(c, id=name) for name, c in AccKVConfig().ablations().items()]


def tokens(layer=1, lengths=None, device=torch.device("cpu")) -> LayerTokens:
    """The policy's view of layer ``layer`` of W, every tensor on ``device`` (the kernels need it on DEVICE)."""
    w = workload_to(W, device)
    x = layer_inputs(w, layer, SCORES[layer].to(device))
    if lengths is not None:
        x.lengths = torch.tensor(lengths, dtype=torch.int32, device=device).view(2, 2)
    return x


def kept_mask(plan, n=N):
    B, H, K = plan.keep.shape
    m = torch.zeros(B, H, n + 1, dtype=torch.bool)
    ok = torch.arange(K) < plan.keep_lengths[..., None]
    m.scatter_(2, torch.where(ok, plan.keep.long(), n), True)
    return m[..., :n]


@pytest.mark.parametrize("cfg", ALL)
@pytest.mark.parametrize("budget", [pytest.param(0.25, id="25%"), pytest.param(0.1, id="10%"),
                                    pytest.param(37, id="37-tokens")])
def test_budget_exact_valid_plan_and_applies(cfg, budget, device):
    # ragged rows: budgets follow each row's valid count; policy and kernel both run on the test device
    x = tokens(lengths=[N, 201, 63, N], device=device)
    cfg = cfg.replace(budget=budget)
    plan = plan_layer(cfg, x, 1, 2).plan
    want = budget_tokens(cfg, x.lengths.long(), 1, 2)
    if cfg.method == "full":
        want = x.lengths.long()
    if cfg.adaptive_heads:  # Ada-KV: the heads of a sequence share their budgets
        assert torch.equal(plan.keep_lengths.long().sum(-1), want.sum(-1))
        assert bool((plan.keep_lengths.long() <= x.lengths.long()).all())
    else:
        assert torch.equal(plan.keep_lengths.long(), want)
    keep = plan.keep.long()
    for b in range(2):
        for h in range(2):
            row = keep[b, h, :int(plan.keep_lengths[b, h])]
            assert torch.all(row[1:] > row[:-1]) and int(row.max()) < int(x.lengths[b, h])
    k, v, lengths = x.keys.clone(), W.layers[1].v.to(device).clone(), x.lengths.clone()
    ak.compact_kv_(k, v, lengths, plan.keep, plan.keep_lengths, merge_target=plan.merge_target,
                   merge_weight=plan.merge_weight)  # validates the plan
    assert torch.equal(lengths, plan.keep_lengths)


@pytest.mark.parametrize("budget", [pytest.param(1.0, id="fraction-1.0"), pytest.param(10**6, id="huge-int")])
def test_full_budget_keeps_everything(budget):
    plan = plan_layer(AccKVConfig(budget=budget), tokens(), 1, 2).plan
    assert torch.equal(plan.keep_lengths, torch.full((2, 2), N, dtype=torch.int32))
    assert torch.equal(plan.keep.long(), torch.arange(N).expand(2, 2, N))
    assert plan.merge_target is None or not bool((plan.merge_target >= 0).any())


def test_protected_tokens_are_kept():
    cfg = AccKVConfig(budget=0.3, protect_text=True)
    x = tokens()
    kept = kept_mask(plan_layer(cfg, x, 1, 2).plan)
    text = W.modality == Modality.TEXT
    assert torch.all(kept[..., :cfg.sink])  # sinks
    assert torch.all(kept[..., N - cfg.window:])  # observation window (= recent tokens here)
    assert torch.all(kept[..., text])  # text of an AV prompt
    # streaming keeps sinks plus the newest tokens, nothing else
    s_kept = kept_mask(plan_layer(cfg.replace(method="streaming"), x, 1, 2).plan)
    K = int(budget_tokens(cfg, torch.tensor(N), 1, 2))
    assert torch.all(s_kept[..., :cfg.sink]) and torch.all(s_kept[..., N - (K - cfg.sink):])
    assert int(s_kept[0, 0].sum()) == K


# what each method keeps of (the 4 sinks, the 32 recent tokens) when neither carries evidence, protected by position
# (StreamingLLM's recent tokens by its recency ranking; AccKV on its text evidence, every query's mean, ranks the
# sinks by it: protect_sinks None)
_BY_POSITION = {"acckv": (False, True), "h2o": (False, True), "streaming": (True, True)}


@pytest.mark.parametrize("method", list(_BY_POSITION))
def test_protect_positions_keeps_sinks_and_recent_tokens_or_ranks_them(method):
    """Sinks and recent tokens with no evidence: ``protect_positions=True`` (the default) keeps what the method
    protects by position (AccKV's sinks only off its every-query mean, ``protect_sinks``); False evicts them for any
    method. (StreamingLLM ranks by recency: its recent tokens stay either way.)"""
    x = tokens()
    x.modality = torch.zeros_like(x.modality)  # a text prompt
    hi = torch.rand(x.scores.shape, generator=torch.Generator().manual_seed(3)) + 1.0
    sinks, recent = torch.arange(N) < 4, torch.arange(N) >= N - 32
    x.scores = torch.where(sinks | recent, 1e-6, hi)  # they carry (almost) no evidence
    cfg = AccKVConfig(budget=0.25, method=method, evidence="mean" if method == "acckv" else None)

    def kept(c):
        k = kept_mask(plan_layer(c, x, 1, 2).plan)
        return bool(k[..., sinks].all()), bool(k[..., sinks].any()), bool(k[..., recent].all())

    protect_sinks, protect_recent = _BY_POSITION[method]
    assert cfg.protect_positions
    all_sinks, _, all_recent = kept(cfg.replace(protect_positions=True))
    assert (all_sinks, all_recent) == (protect_sinks, protect_recent)
    _, any_sink, all_recent = kept(cfg.replace(protect_positions=False))
    assert not any_sink and all_recent is (method == "streaming")
    assert kept(cfg) == kept(cfg.replace(protect_positions=True))  # the default
    if method == "acckv":
        assert kept(cfg.replace(evidence="window", protect_positions=False))[1] is False  # on the window too
        assert kept(cfg.replace(evidence="window"))[0]  # the window's evidence keeps its sinks by position
        all_sinks, _, all_recent = kept(cfg.replace(protect_sinks=True))
        assert all_sinks and all_recent
        assert not kept(cfg.replace(evidence="window", protect_sinks=False))[1]
    if method == "streaming":
        assert not kept(cfg.replace(protect_sinks=False))[1]


def test_protects_sinks_resolves_per_method_and_evidence():
    """None: off only where AccKV ranks by every query's mean ("auto" resolves to it on a text prompt, to the window
    on an audio-video one); the cache hands the policy the resolved config, so a text layer ranks its sinks."""
    assert AccKVConfig().protects_sinks  # "auto" unresolved: the window's rule
    assert not AccKVConfig(evidence="mean").protects_sinks
    assert AccKVConfig(evidence="window").protects_sinks
    assert AccKVConfig(method="streaming").protects_sinks and not AccKVConfig(method="streaming",
                                                                              protect_sinks=False).protects_sinks
    assert AccKVConfig(evidence="mean", protect_sinks=True).protects_sinks
    assert not AccKVConfig(protect_positions=False).protects_sinks
    layer = BudgetedLayerCache(AccKVConfig(budget=0.25))
    assert not layer._resolve(False).protects_sinks and layer._resolve(True).protects_sinks


def test_protection_beyond_budget_keeps_priority_order():
    cfg = AccKVConfig(budget=12, protect_text=True)  # fewer slots than sinks + window + text
    kept = kept_mask(plan_layer(cfg, tokens(), 1, 2).plan)
    assert torch.all(kept[..., :cfg.sink])  # sinks first
    assert torch.all(kept[..., N - 8:])  # then the newest window tokens
    assert int(kept[0, 0].sum()) == 12


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_acckv_recent_tokens_take_at_most_half_a_small_target(fused):
    """A short text prompt (37 tokens at 75%: target 28 < 2R): AccKV protects its newest 14 tokens and ranks the
    rest by the evidence, so the first token, the sink every query attends, stays (with all 28 slots going to the
    newest 32 it was evicted); SnapKV keeps its paper's window whatever the budget."""
    from acckv_triton.fused_policy import plan_layer_fused
    n = 37
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(1, 2, n, generator=g) * 0.1
    scores[..., 0] = 5.0  # the sink
    x = LayerTokens(scores=scores.to(DEVICE), modality=torch.zeros(1, 2, n, dtype=torch.uint8, device=DEVICE),
                    lengths=torch.full((1, 2), n, dtype=torch.int32, device=DEVICE),
                    keys=torch.randn(1, 2, n, 16, generator=g).to(DEVICE))
    def run(cfg):
        target = budget_tokens(cfg, torch.full((1, 2), n, device=DEVICE), 0, 1)  # 28
        plan = plan_layer_fused(cfg, x, 0, 1, target=target, max_keep=int(target.max())).plan if fused else \
            plan_layer(cfg, x, 0, 1, check=False).plan
        keep, lengths = plan.keep.cpu().long(), plan.keep_lengths.cpu().long()
        return torch.zeros(1, 2, n + 1, dtype=torch.bool).scatter_(
            2, torch.where(torch.arange(keep.shape[-1]) < lengths[..., None], keep, n), True)[..., :n]

    acckv = run(AccKVConfig(budget=0.75, evidence="mean"))
    assert acckv.sum(-1).eq(28).all() and acckv[..., 0].all()
    assert acckv[..., n - 14:].all() and not acckv[..., n - 28:n - 14].all()  # 14 newest protected, not 28
    snap = run(AccKVConfig(budget=0.75, method="snapkv"))
    assert snap[..., n - 28:].all() and not snap[..., 0].any()


def test_merges_stay_inside_a_modality_and_carry_multiplicity():
    plan = plan_layer(AccKVConfig(budget=0.2), tokens(), 1, 2).plan
    mt = plan.merge_target.long()
    merging = mt >= 0
    assert bool(merging.any())
    dest_token = torch.gather(plan.keep.long(), 2, mt.clamp(min=0))
    mod = W.modality.long().expand(2, 2, N)
    assert torch.equal(torch.gather(mod, 2, dest_token)[merging], mod[merging])
    assert torch.all(plan.merge_weight[merging] > 0)
    assert not bool(merging[kept_mask(plan)].any())  # kept tokens never merge elsewhere


def test_lookm_merges_every_evicted_token_into_its_nearest_kept_key():
    plan = plan_layer(AccKVConfig(budget=0.2, method="lookm"), tokens(), 1, 2).plan
    kept = kept_mask(plan)
    assert torch.all(plan.merge_target[~kept] >= 0)


def test_text_only_prompt_is_compressed():
    """With no audio/video, text is not protected wholesale (else nothing could be evicted)."""
    x = tokens()
    x.modality = torch.zeros_like(x.modality)
    plan = plan_layer(AccKVConfig(budget=0.25), x, 1, 2).plan
    assert int(plan.keep_lengths.max()) == int(budget_tokens(AccKVConfig(budget=0.25), torch.tensor(N), 1, 2))


@pytest.mark.parametrize("cfg", [pytest.param(AccKVConfig(budget=b, evidence=e), id=f"{b}-{e}")
                                 for b in (0.5, 0.1, 23) for e in ("mean", "window")]
                         + [pytest.param(c.replace(budget=0.25), id=n) for n, c in AccKVConfig().ablations().items()])
@pytest.mark.parametrize("content", ["text", "text+image", "one-row-audio", "text+video"])
def test_cpu_shortcut_without_audio_video_gives_the_same_plan(cfg, content, monkeypatch):
    """On a CPU, rows with no audio or video skip merging, the priority passes and alignment (they would return what
    they were given): every output equals the full pipeline's, also with image tokens, padding and ragged rows; a
    batch with one audio row, or with video and no audio, runs the full pipeline."""
    import acckv_triton.policy as policy

    x = tokens(lengths=[N, N - 9, N - 100, N - 1])
    mod = torch.zeros_like(x.modality)
    if content == "text+image":
        mod[..., 40:90] = int(Modality.IMAGE)
    if content == "one-row-audio":
        mod[1, :, 30:80] = int(Modality.AUDIO)
    if content == "text+video":
        mod[..., 40:90] = int(Modality.VIDEO)
    x.modality = mod
    x.valid = torch.ones(2, 2, N, dtype=torch.bool)
    x.valid[0, :, :5] = False  # left padding
    x.keys = x.keys.clone()
    x.keys[..., 1::2, :] = x.keys[..., ::2, :][..., : x.keys[..., 1::2, :].shape[2], :]  # merge-worthy pairs
    shortcut = content in ("text", "text+image")
    content = policy._content_on_host(x.valid, x.modality.long())
    assert (not content & {int(Modality.AUDIO), int(Modality.VIDEO)}) == shortcut
    merges = []
    merge_groups = policy._merge_groups
    monkeypatch.setattr(policy, "_merge_groups", lambda *a: merges.append(1) or merge_groups(*a))
    got = plan_layer(cfg, x, 1, 2)
    assert len(merges) == int(cfg.intra_merge and not shortcut)
    monkeypatch.setattr(policy, "_content_on_host", lambda *a: None)
    want = plan_layer(cfg, x, 1, 2)
    assert len(merges) == int(cfg.intra_merge) * (1 + int(not shortcut))
    for name in ("keep", "keep_lengths", "merge_target", "merge_weight"):
        a, b = getattr(got.plan, name), getattr(want.plan, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    for a, b in zip(got[1:], want[1:]):
        assert torch.equal(a, b)


def test_padding_is_never_kept():
    x = tokens()
    x.valid = torch.arange(N).expand(2, 2, N) >= 40  # 40 left-padding slots
    kept = kept_mask(plan_layer(AccKVConfig(budget=0.5), x, 1, 2).plan)
    assert not bool(kept[..., :40].any())
    assert int(kept[0, 0].sum()) == -(-(N - 40) // 2)


@pytest.mark.parametrize("cfg", ALL)
def test_metadata_beyond_lengths_and_at_padding_is_ignored(cfg):
    """Slots past a row's length or marked invalid hold leftover memory (any modality id): the plan ignores them."""
    x = tokens(lengths=[N, 201, 63, N])
    x.valid = torch.arange(N).expand(2, 2, N) >= 5
    clean = plan_layer(cfg, x, 1, 2)
    stale = ~x.valid | (torch.arange(N) >= x.lengths[..., None].long())
    x.modality = torch.where(stale, torch.full_like(x.modality, 200), x.modality)
    got = plan_layer(cfg, x, 1, 2)
    assert torch.equal(got.plan.keep, clean.plan.keep) and torch.equal(got.plan.keep_lengths, clean.plan.keep_lengths)
    assert (got.plan.merge_target is None) == (clean.plan.merge_target is None)
    if got.plan.merge_target is not None:
        assert torch.equal(got.plan.merge_target, clean.plan.merge_target)
    assert torch.equal(got.kept_per_modality, clean.kept_per_modality)


def test_unknown_modality_id_at_a_valid_token_is_rejected():
    x = tokens()
    x.modality = x.modality.clone()
    x.modality[1, 0, 7] = 9
    with pytest.raises(ValueError, match="x.modality must hold Modality ids"):
        plan_layer(AccKVConfig(), x, 1, 2)


@pytest.mark.parametrize("switch,base", [
    pytest.param("focusing", {}, id="focusing"),
    pytest.param("redistribution", {"focusing": False}, id="redistribution-without-focusing"),
    pytest.param("intra_merge", {}, id="intra-merge"),
    pytest.param("cross_align", {"align_lambda": 1.0}, id="cross-align"),
])
def test_each_switch_changes_the_plan(switch, base):
    cfg = AccKVConfig(budget=0.2, **base)
    on = plan_layer(cfg, tokens(), 1, 2).plan
    off = plan_layer(cfg.replace(**{switch: False}), tokens(), 1, 2).plan
    assert not torch.equal(kept_mask(on), kept_mask(off)) or (on.merge_target is None) != (off.merge_target is None)


def test_deterministic():
    a = plan_layer(AccKVConfig(budget=0.2), tokens(), 1, 2)
    b = plan_layer(AccKVConfig(budget=0.2), tokens(), 1, 2)
    assert torch.equal(a.plan.keep, b.plan.keep) and torch.equal(a.plan.merge_target, b.plan.merge_target)
    assert torch.equal(a.rho, b.rho)


def test_focusing_shares_follow_depth():
    """O1 measured on the workload: the video share grows with depth and video becomes the priority."""
    w = workloads.generate_av_workload(num_chunks=3, grid_h=4, grid_w=4, num_layers=4, seed=2)
    mod = w.token_modality()
    rhos, prio = [], []
    for layer, lt in enumerate(w.layers):
        s = reference.window_scores(lt.q_window, lt.k, modality=mod).scores
        res = plan_layer(AccKVConfig(), layer_inputs(w, layer, s), layer, 4)
        rhos.append(float(res.rho[0, Modality.VIDEO]))
        prio.append(int(res.priority[0]))
    assert rhos == sorted(rhos) and rhos[-1] > 0.5 > rhos[0]
    assert prio[-1] == Modality.VIDEO


def test_merge_groups_chain_similar_neighbours_only():
    """Audio: identical neighbours group (at most max_group); video: the same patch across frames groups."""
    B, H, n, D = 1, 1, 12, 8
    mod = torch.tensor([[[1] * 6 + [2] * 6]], dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, D, generator=g)
    keys = torch.stack([base[0]] * 5 + [base[1]] + [base[2], -base[2], base[2], -base[2], base[2], base[2]])
    spatial = torch.tensor([[-1, -1]] * 6 + [[0, 0], [0, 1], [0, 0], [0, 1], [0, 0], [1, 1]]).view(1, 1, n, 2)
    x = LayerTokens(scores=torch.arange(n, dtype=torch.float32).view(1, 1, n), modality=mod,
                    lengths=torch.tensor([[n]], dtype=torch.int32), keys=keys.view(1, 1, n, D), spatial=spatial)
    rep, n_link, n_av = _merge_groups(AccKVConfig(max_group=4), x, x.scores, torch.ones(B, H, n, dtype=torch.bool))
    rep = rep[0, 0]
    # links before the max_group cut: audio 0-1-2-3-4, video (0,0) 6-8-10 and (0,1) 7-9; 12 AV candidates
    assert n_link.tolist() == [[4 + 2 + 1]] and n_av.tolist() == [[12]]
    # audio 0..4 identical: groups {0..3} (capped at 4, rep = highest score 3) and {4}; 5 differs
    assert rep[:6].tolist() == [3, 3, 3, 3, 4, 5]
    # video (0,0) at 6, 8, 10 identical across frames -> one group with rep 10; (0,1) at 7, 9 -> rep 9; (1,1) alone
    assert rep[6:].tolist() == [10, 9, 10, 9, 10, 11]


def test_alignment_boosts_low_priority_tokens_in_the_high_priority_bins():
    cfg = AccKVConfig(align_lambda=0.5, time_bin=10)
    t = torch.tensor([[[0, 0, 10, 10, 0, 5, 15, 12]]], dtype=torch.int32)
    P = torch.tensor([[[1, 1, 1, 1, 0, 0, 0, 0]]], dtype=torch.bool)
    L = ~P
    mass = torch.tensor([[[3.0, 1.0, 0.0, 0.0, 0, 0, 0, 0]]])  # all of P's kept mass in bin 0
    f = _alignment_boost(cfg, t, P, mass, L)[0, 0]
    assert f[:4].tolist() == [1.0] * 4  # P untouched
    assert torch.allclose(f[4:], torch.tensor([1.5, 1.5, 0.5, 0.5]))  # 1 + λ(2·1 − 1) and 1 + λ(2·0 − 1)


@pytest.mark.parametrize("kwargs,exc,msg", [
    pytest.param({"budget": 0.0}, ValueError, "budget as a float", id="budget-zero"),
    pytest.param({"budget": 1.5}, ValueError, "budget as a float", id="budget-above-one"),
    pytest.param({"budget": 0}, ValueError, "budget as an int", id="budget-int-zero"),
    pytest.param({"budget": "half"}, TypeError, "budget must be", id="budget-str"),
    pytest.param({"method": "magic"}, ValueError, "method must be one of", id="method"),
    pytest.param({"pool_kernel": 4}, ValueError, "pool_kernel", id="pool-even"),
    pytest.param({"rho_min": 0.6}, ValueError, "rho_min", id="rho-min"),
    pytest.param({"backend": "cuda"}, ValueError, "backend", id="backend"),
    pytest.param({"window": -1}, ValueError, "window", id="window-negative"),
    pytest.param({"protect_positions": None}, TypeError, "protect_positions must be a bool", id="protect-none"),
    pytest.param({"protect_sinks": 1}, TypeError, "protect_sinks must be None or a bool", id="protect-sinks-int"),
    pytest.param({"protect_sinks": True, "protect_positions": False}, ValueError, "protect_sinks=True keeps the sinks",
                 id="protect-sinks-without-positions"),
])
def test_config_rejects_bad_values(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        AccKVConfig(**kwargs)


def test_lookm_nearest_key_search_stays_within_its_byte_budget(monkeypatch):
    """LOOK-M's similarities are computed a chunk at a time, sized by bytes whatever B, H, N; same result."""
    from acckv_triton import policy

    x = tokens()
    kept = kept_mask(plan_layer(AccKVConfig(budget=0.2, method="snapkv"), x, 1, 2).plan)
    valid = torch.ones_like(kept)
    whole = policy._nearest_kept(x.keys, kept, valid, max_bytes=1 << 40)
    sizes, matmul = [], torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: (sizes.append(a.shape[:-1].numel() * b.shape[-1] * 8),
                                                       matmul(a, b))[1])
    budget = 4 * 2 * 2 * N * 8  # four query rows per chunk at this B, H, N
    assert torch.equal(policy._nearest_kept(x.keys, kept, valid, max_bytes=budget), whole)
    assert len(sizes) == -(-N // 4) and max(sizes) <= budget
