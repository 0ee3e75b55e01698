"""The torch backend's ops (acckv_triton.torch_ops) against the float64 reference: fp32/fp16/bf16, ragged and empty
rows, merges, memory past the lengths poisoned with NaN where the contract allows it."""
from __future__ import annotations

import pytest
import torch

from acckv_triton import reference, torch_ops
from tests.conftest import DTYPES, TOL

# float32 softmax and matmuls in the cache dtype: the 16-bit outputs carry one rounding of p and of out
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def _ragged(B, Hkv, C, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, C + 1, (B, Hkv), generator=g, dtype=torch.int32)
    lengths[0, 0] = C  # a full row
    if B * Hkv > 1:
        lengths.view(-1)[1] = 0  # an empty row
    return lengths, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,C,D,proportional", [
    pytest.param(1, 1, 1, 1, 64, False, id="one-token"),
    pytest.param(2, 7, 1, 63, 64, True, id="G7-C63-mult"),
    pytest.param(3, 8, 2, 257, 128, False, id="G4-C257"),
    pytest.param(2, 6, 3, 40, 16, True, id="G2-ragged-mult"),
])
@pytest.mark.parametrize("decay", [1.0, 0.6], ids=["sum", "decay0.6"])
def test_decode_plan_matches_reference(dtype, B, Hq, Hkv, C, D, proportional, decay):
    _check_decode_plan(dtype, B, Hq, Hkv, C, D, proportional, decay, fresh_tail=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,C,D", [pytest.param(2, 7, 1, 63, 64, id="G7-C63"),
                                          pytest.param(2, 6, 3, 40, 16, id="G2-ragged")])
@pytest.mark.parametrize("decay", [1.0, 0.6], ids=["sum", "decay0.6"])
def test_decode_plan_over_a_fresh_tail_matches_reference(dtype, B, Hq, Hkv, C, D, decay):
    """The cache's torch storage keeps multiplicity and token mass 0 past each row's length: the plan then takes
    log(multiplicity) as its whole bias and decays the mass without a row mask."""
    _check_decode_plan(dtype, B, Hq, Hkv, C, D, True, decay, fresh_tail=True)


def _check_decode_plan(dtype, B, Hq, Hkv, C, D, proportional, decay, fresh_tail):
    lengths, g = _ragged(B, Hkv, C, seed=C + D)
    k = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    mult = (torch.rand(B, Hkv, C, generator=g) * 3 + 0.5) if proportional else None
    mass = torch.rand(B, Hkv, C, generator=g)
    if fresh_tail:  # the contract: multiplicity and mass 0 past each length (K/V there still arbitrary)
        past = torch.arange(C) >= lengths.long()[..., None]
        mult[past], mass[past] = 0.0, 0.0
    want_mass, before = mass.clone(), mass.clone()
    modality = torch.randint(0, 4, (B, Hkv, C), generator=g, dtype=torch.uint8)
    plan = torch_ops.TorchDecodePlan(k, v, lengths, num_q_heads=Hq, scale=0.37, token_mass=mass, multiplicity=mult,
                                     modality=modality, decay=decay, fresh_tail=fresh_tail)
    plan.out.fill_(float("nan"))
    plan.lse.fill_(float("nan"))
    for step in range(2):  # the same plan, run twice, accumulates twice
        q = torch.randn(B, Hq, D, generator=g).to(dtype)
        res = plan.run(q)
        want = reference.decode_attention(q, k, v, lengths, scale=0.37, token_mass=want_mass, multiplicity=mult,
                                          modality=modality, decay=decay)
        atol, rtol = OUT_TOL[dtype]
        torch.testing.assert_close(res.out, want.out, atol=atol, rtol=rtol)
        torch.testing.assert_close(res.lse, want.lse, atol=atol, rtol=rtol)  # -inf at the empty rows on both
        torch.testing.assert_close(res.modality_mass, want.modality_mass, atol=atol, rtol=rtol)
        stored = torch.arange(C) < lengths.long()[..., None]
        torch.testing.assert_close(mass[stored], want_mass[stored], atol=atol, rtol=rtol)
        assert torch.equal(mass[~stored], before[~stored])  # slots past a length keep their value


def test_decode_plan_run_checks_q():
    k = torch.randn(1, 2, 8, 16)
    plan = torch_ops.TorchDecodePlan(k, k, torch.full((1, 2), 8, dtype=torch.int32), num_q_heads=4)
    with pytest.raises(ValueError, match=r"q must be a \[B, Hq, D\]"):
        plan.run(torch.randn(1, 2, 16))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        plan.run([1.0])
    with pytest.raises(ValueError, match="positive multiple"):
        torch_ops.TorchDecodePlan(k, k, torch.full((1, 2), 8, dtype=torch.int32), num_q_heads=3)
    with pytest.raises(ValueError, match="fresh_tail=True needs multiplicity"):
        torch_ops.TorchDecodePlan(k, k, torch.full((1, 2), 8, dtype=torch.int32), num_q_heads=4, fresh_tail=True)


def _plan(B, Hkv, C, lengths, merges, g):
    keep_lengths = torch.zeros(B, Hkv, dtype=torch.int32)
    K = C
    keep = torch.zeros(B, Hkv, K, dtype=torch.int32)
    target = torch.full((B, Hkv, C), -1, dtype=torch.int32)
    weight = torch.rand(B, Hkv, C, generator=g) + 0.05
    for b in range(B):
        for h in range(Hkv):
            L = int(lengths[b, h])
            n = int(torch.randint(0, L + 1, (), generator=g)) if L else 0
            kept = torch.sort(torch.randperm(L, generator=g)[:n]).values
            keep[b, h, :n], keep_lengths[b, h] = kept, n
            if merges and n:
                evicted = torch.ones(L, dtype=torch.bool)
                evicted[kept] = False
                for t in torch.nonzero(evicted).flatten().tolist():
                    if torch.rand((), generator=g) < 0.7:
                        target[b, h, t] = int(torch.randint(0, n, (), generator=g))
    K = max(1, int(keep_lengths.max()))
    return keep[..., :K].contiguous(), keep_lengths, (target, weight) if merges else (None, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merges", [False, True], ids=["gather", "merge"])
@pytest.mark.parametrize("B,Hkv,C,D", [pytest.param(1, 1, 1, 64, id="one"), pytest.param(2, 3, 63, 64, id="C63"),
                                       pytest.param(2, 2, 257, 128, id="C257")])
def test_compact_matches_reference(dtype, merges, B, Hkv, C, D):
    lengths, g = _ragged(B, Hkv, C, seed=7 * C + merges)
    k = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    past = torch.arange(C) >= lengths.long()[..., None]
    k[past], v[past] = float("nan"), float("nan")  # leftover memory past the lengths must never leak in
    keep, keep_lengths, (target, weight) = _plan(B, Hkv, C, lengths, merges, g)
    data = [torch.randint(0, 4, (B, Hkv, C), generator=g, dtype=torch.uint8),
            torch.randint(-9, 9, (B, Hkv, C), generator=g, dtype=torch.int64)]
    sums = [torch.rand(B, Hkv, C, generator=g), torch.ones(B, Hkv, C)]
    ours = [k.clone(), v.clone(), lengths.clone(), [x.clone() for x in data], [x.clone() for x in sums]]
    ref = [k.clone(), v.clone(), lengths.clone(), [x.clone() for x in data], [x.clone() for x in sums]]
    args = dict(merge_target=target, merge_weight=weight)
    torch_ops.compact_kv_(*ours[:3], keep, keep_lengths, **args, token_data=ours[3], token_sums=ours[4])
    reference.compact_kv_(*ref[:3], keep, keep_lengths, **args, token_data=ref[3], token_sums=ref[4])
    assert torch.equal(ours[2], keep_lengths) and torch.equal(ref[2], keep_lengths)
    atol, rtol = TOL[dtype]
    kept = torch.arange(C) < keep_lengths.long()[..., None]
    for a, b in zip(ours[:2] + ours[3] + ours[4], ref[:2] + ref[3] + ref[4]):
        if not merges and a.dtype == dtype:
            assert torch.equal(a[kept], b[kept])  # a gather is bit-exact
        torch.testing.assert_close(a[kept], b[kept], atol=atol, rtol=rtol)
        assert torch.equal(a[~kept].isnan(), b[~kept].isnan())  # slots past the new lengths left as they were
        assert torch.equal(torch.nan_to_num(a[~kept]), torch.nan_to_num(b[~kept]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,W,N,padded", [
    pytest.param(1, 1, 1, 1, 1, False, id="one"),
    pytest.param(2, 7, 1, 32, 63, True, id="G7-pad"),
    pytest.param(1, 8, 2, 32, 257, False, id="G4"),
])
def test_window_scores_match_reference(dtype, B, Hq, Hkv, W, N, padded):
    g = torch.Generator().manual_seed(N)
    q = torch.randn(B, Hq, W, 64, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, 64, generator=g).to(dtype)
    key_start = torch.randint(0, N, (B,), generator=g, dtype=torch.int32) if padded else None
    ours = torch_ops.window_scores(q, k, scale=0.2, key_start=key_start).scores
    want = reference.window_scores(q, k, scale=0.2, key_start=key_start).scores
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(ours, want, atol=atol * W, rtol=rtol)


def _append_args(B, Hkv, C, D, dtype, g, given):
    lengths = torch.randint(0, C, (B, Hkv), generator=g, dtype=torch.int32)
    state = dict(
        k_cache=torch.randn(B, Hkv, C, D, generator=g).to(dtype), v_cache=torch.randn(B, Hkv, C, D, generator=g).to(dtype),
        lengths=lengths, position=torch.randint(0, 99, (B, Hkv, C), generator=g, dtype=torch.int32),
        next_position=torch.randint(100, 200, (B, Hkv, 1), generator=g, dtype=torch.int32),
        modality=torch.randint(0, 4, (B, Hkv, C), generator=g, dtype=torch.uint8),
        time=torch.randint(0, 99, (B, Hkv, C), generator=g, dtype=torch.int32),
        spatial=torch.randint(-1, 9, (B, Hkv, C, 2), generator=g, dtype=torch.int32),
        token_mass=torch.rand(B, Hkv, C, generator=g), multiplicity=torch.rand(B, Hkv, C, generator=g) + 1)
    new = dict(k_new=torch.randn(B, Hkv, 1, D, generator=g).to(dtype), v_new=torch.randn(B, Hkv, 1, D, generator=g).to(dtype))
    if given:
        new.update(modality_new=torch.randint(0, 4, (B, 1, 1), generator=g, dtype=torch.uint8).expand(B, Hkv, 1),
                   time_new=torch.randint(0, 9, (B, Hkv, 1), generator=g, dtype=torch.int32),
                   spatial_new=torch.randint(0, 9, (B, Hkv, 1, 2), generator=g, dtype=torch.int32))
    return state, new


def _call(fn, state, new, **extra):
    s = {k: v.clone() for k, v in state.items()}
    k, v, lengths = s.pop("k_cache"), s.pop("v_cache"), s.pop("lengths")
    fn(k, v, lengths, new["k_new"], new["v_new"], **s, **{n: x for n, x in new.items() if n not in ("k_new", "v_new")},
       **extra)
    return dict(k_cache=k, v_cache=v, lengths=lengths, **s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given", [False, True], ids=["defaults", "metadata-given"])
def test_append_token_matches_reference(dtype, given):
    g = torch.Generator().manual_seed(3)
    state, new = _append_args(2, 3, 17, 64, dtype, g, given)
    want = _call(reference.append_token_, state, new)
    got = _call(torch_ops.append_token_, state, new, index=torch.empty(2, 3, 1, dtype=torch.int64))
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(want["lengths"], state["lengths"] + 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given", [False, True], ids=["defaults", "metadata-given"])
def test_append_token_onto_a_fresh_tail_matches_reference(dtype, given):
    """With ``fresh_tail`` the slot already holds a fresh token's modality, spatial and mass (the cache's torch
    storage keeps every slot past a length so) and the append skips those writes: the same result."""
    g = torch.Generator().manual_seed(4)
    state, new = _append_args(2, 3, 17, 64, dtype, g, given)
    past = torch.arange(17) >= state["lengths"].long()[..., None]
    for name, value in (("modality", 0), ("token_mass", 0.0), ("multiplicity", 0.0)):
        state[name][past] = value
    state["spatial"][past] = -1
    want = _call(reference.append_token_, state, new)
    got = _call(torch_ops.append_token_, state, new, index=torch.empty(2, 3, 1, dtype=torch.int64), fresh_tail=True)
    for name in want:
        assert torch.equal(got[name], want[name]), name
