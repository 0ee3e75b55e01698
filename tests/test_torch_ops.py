"""The torch backend's ops (acckv_triton.torch_ops) against the float64 reference: fp32/fp16/bf16, ragged and empty
rows, merges, memory past the lengths poisoned with NaN where the contract allows it."""
from __future__ import annotations

import pytest
import torch

from acckv_triton import reference, torch_ops, tuning
from acckv_triton.ops.append_token import append_token_ as kernel_append_token_
from acckv_triton.ops.chunk_attention import chunk_attention as kernel_chunk_attention
from acckv_triton.ops.compact_kv import compact_kv_ as kernel_compact_kv_
from acckv_triton.ops.decode_attention import DecodeAttentionPlan
from acckv_triton.ops.decode_attention import decode_attention as kernel_decode_attention
from acckv_triton.ops.observed_attention import observed_attention as kernel_observed_attention
from acckv_triton.ops.window_scores import window_scores as kernel_window_scores
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


@pytest.mark.parametrize("kind,merge,dtype", [
    pytest.param("random", "random", torch.float32, id="random-fp32"),
    pytest.param("strided", "before", torch.bfloat16, id="before-bf16"),
    pytest.param("tail", "all-into-0", torch.float32, id="all-into-slot0-fp32"),
])
def test_compact_on_the_kernels_adversarial_merge_plans(kind, merge, dtype):
    """The kernel tests' plans (tests/ops/test_compact_kv.py: garbage merge targets at kept tokens, stale slot
    numbers past the lengths, where the tokens are NaN): merged slots as the reference, a slot nothing merges into
    bit-exact (it is gathered, as compact_kv_ says), and a plan whose every merge goes to slot 0 (its only targets
    are 0 and -1) merges on the CPU rather than taking the no-merge shortcut."""
    from tests.ops.test_compact_kv import make_case, metadata

    B, Hkv, C, D = 2, 2, 45, 16
    case = make_case(B, Hkv, C, D, [45, 30, 1, 40], 12, kind, dtype, merge=merge, seed=13)
    case = {n: x.cpu() for n, x in case.items()}
    if merge == "all-into-0":
        case["merge_target"] = torch.where(case["merge_target"] > 0, -1, case["merge_target"])
    data, sums = metadata(B, Hkv, C)
    data, sums = [x.cpu() for x in data], [x.cpu() for x in sums]
    plan = {n: case[n] for n in ("keep", "keep_lengths", "merge_target", "merge_weight")}
    ours = [case["k"].clone(), case["v"].clone(), case["lengths"].clone(), [x.clone() for x in data],
            [x.clone() for x in sums]]
    ref = [case["k"].clone(), case["v"].clone(), case["lengths"].clone(), [x.clone() for x in data],
           [x.clone() for x in sums]]
    torch_ops.compact_kv_(*ours[:3], **plan, token_data=ours[3], token_sums=ours[4])
    reference.compact_kv_(*ref[:3], **plan, token_data=ref[3], token_sums=ref[4])
    n = case["keep_lengths"].long()
    kept = torch.arange(C) < n[..., None]
    evicted = (torch.arange(C) < case["lengths"].long()[..., None]) & ~reference_kept(case["keep"], n, C)
    target = torch.where(evicted, case["merge_target"].long(), -1)
    merges_in = torch.zeros(B, Hkv, C + 1, dtype=torch.long).scatter_add_(
        2, torch.where(target >= 0, target, C), torch.ones_like(target))[..., :C]
    assert int(merges_in.sum()) > 0
    singleton = kept & (merges_in == 0)
    atol, rtol = TOL[dtype]
    for a, b in zip(ours[:2], ref[:2]):
        assert not a[kept].isnan().any()
        torch.testing.assert_close(a[kept], b[kept], atol=atol, rtol=rtol)
        assert torch.equal(a[singleton], b[singleton])
    for a, b in zip(ours[3], ref[3]):
        assert torch.equal(a[kept], b[kept])
    for a, b in zip(ours[4], ref[4]):
        torch.testing.assert_close(a[kept], b[kept], atol=1e-6, rtol=1e-6)


def reference_kept(keep, keep_lengths, C):
    """[B, Hkv, C] bool: the tokens keep[..., :keep_lengths] names."""
    B, Hkv, K = keep.shape
    ok = torch.arange(K) < keep_lengths[..., None]
    out = torch.zeros(B, Hkv, C + 1, dtype=torch.bool)
    return out.scatter_(2, torch.where(ok, keep.long().clamp(0, C - 1), C), True)[..., :C]


@pytest.mark.parametrize("layout", ["kv-halves-of-one-buffer", "tokens-major", "heads-at-odd-offsets"])
def test_compact_over_other_storage_layouts(layout):
    """K and V stored other than [B, Hkv, C, D] contiguous: both halves of one buffer (adjacent, not overlapping),
    tokens-major storage permuted to [B, Hkv, C, D], and heads whose slots start off a multiple of D (the storage-row
    shortcut of _gather_slots does not apply): the plan's result is the reference's, bit for bit (a gather)."""
    B, Hkv, C, D = 2, 4, 8, 4
    lengths, g = _ragged(B, Hkv, C, seed=3)
    if layout == "kv-halves-of-one-buffer":
        k, v = torch.randn(2, B, Hkv, C, D, generator=g).unbind(0)
    elif layout == "tokens-major":
        k, v = (torch.randn(B, C, Hkv, D, generator=g).transpose(1, 2) for _ in range(2))
    else:  # head stride C * D + 3: a multiple of neither D nor the slot stride
        k, v = (torch.randn(B, Hkv, C * D + 3, generator=g)[..., :C * D].unflatten(-1, (C, D)) for _ in range(2))
    keep, keep_lengths, _ = _plan(B, Hkv, C, lengths, False, g)
    data = [torch.randint(0, 4, (B, Hkv, C), generator=g, dtype=torch.uint8)]
    ref = [k.clone(), v.clone(), lengths.clone(), [x.clone() for x in data]]
    ours_data = [x.clone() for x in data]
    ours_lengths = lengths.clone()
    torch_ops.compact_kv_(k, v, ours_lengths, keep, keep_lengths, token_data=ours_data)
    reference.compact_kv_(*ref[:3], keep, keep_lengths, token_data=ref[3])
    kept = torch.arange(C) < keep_lengths.long()[..., None]
    assert torch.equal(ours_lengths, keep_lengths)
    for a, b in zip([k, v] + ours_data, ref[:2] + ref[3]):
        assert torch.equal(a[kept], b[kept])


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


def _call_append(fn, state, new, **extra):
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
    want = _call_append(reference.append_token_, state, new)
    got = _call_append(torch_ops.append_token_, state, new, index=torch.empty(2, 3, 1, dtype=torch.int64))
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
    want = _call_append(reference.append_token_, state, new)
    got = _call_append(torch_ops.append_token_, state, new, index=torch.empty(2, 3, 1, dtype=torch.int64),
                       fresh_tail=True)
    for name in want:
        assert torch.equal(got[name], want[name]), name


# ---------------------------------------------------------------------------------------------------------- errors
# Every entry point validates through its launcher's own checks (kernel device aside): a bad argument raises the
# launcher's TypeError / ValueError, naming the argument, before anything is written.


def _good(op: str) -> dict:
    """Small valid arguments for each entry point (CPU, float32)."""
    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, C, D = 2, 4, 2, 8, 16
    kv = dict(k_cache=torch.randn(B, Hkv, C, D, generator=g), v_cache=torch.randn(B, Hkv, C, D, generator=g),
              lengths=torch.tensor([[8, 3], [0, 5]], dtype=torch.int32))
    if op in ("decode_plan", "decode_run"):
        return dict(**kv, num_q_heads=Hq, token_mass=torch.rand(B, Hkv, C, generator=g),
                    multiplicity=torch.rand(B, Hkv, C, generator=g) + 0.5,
                    modality=torch.randint(0, 4, (B, Hkv, C), generator=g, dtype=torch.uint8),
                    q=torch.randn(B, Hq, D, generator=g))
    if op == "append":
        state, new = _append_args(B, Hkv, C, D, torch.float32, g, given=True)
        return dict(**state, **new, index=torch.empty(B, Hkv, 1, dtype=torch.int64))
    if op == "compact":
        keep = torch.tensor([[[0, 2, 5], [1, 2, 0]], [[0, 0, 0], [0, 3, 4]]], dtype=torch.int32)
        target = torch.full((B, Hkv, C), -1, dtype=torch.int32)
        target[0, 0, 1], target[0, 0, 3], target[1, 1, 1] = 0, 1, 2
        return dict(**kv, keep=keep, keep_lengths=torch.tensor([[3, 2], [0, 3]], dtype=torch.int32),
                    merge_target=target, merge_weight=torch.rand(B, Hkv, C, generator=g) + 0.1,
                    token_data=[torch.randint(0, 4, (B, Hkv, C), generator=g, dtype=torch.uint8)],
                    token_sums=[torch.rand(B, Hkv, C, generator=g)])
    if op == "window":
        return dict(q_window=torch.randn(B, Hq, 4, D, generator=g), k=torch.randn(B, Hkv, 10, D, generator=g),
                    key_start=torch.tensor([0, 3], dtype=torch.int32))
    if op == "chunk":
        T = 5
        return dict(q=torch.randn(B, Hq, T, D, generator=g), **kv, k_new=torch.randn(B, Hkv, T, D, generator=g),
                    v_new=torch.randn(B, Hkv, T, D, generator=g), multiplicity=torch.rand(B, Hkv, C, generator=g) + 1,
                    key_valid=torch.tensor([[True] * T, [False] + [True] * (T - 1)]), window=3)
    assert op == "observed"
    T = 9
    return dict(q=torch.randn(B, Hq, T, D, generator=g), k=torch.randn(B, Hkv, T, D, generator=g),
                v=torch.randn(B, Hkv, T, D, generator=g), key_start=torch.tensor([0, 2], dtype=torch.int32))


_POSITIONAL = {"decode_plan": ("k_cache", "v_cache", "lengths"),
               "append": ("k_cache", "v_cache", "lengths", "k_new", "v_new"),
               "compact": ("k_cache", "v_cache", "lengths", "keep", "keep_lengths"), "window": ("q_window", "k"),
               "chunk": ("q", "k_cache", "v_cache", "lengths", "k_new", "v_new"), "observed": ("q", "k", "v")}
_TWIN_ONLY = {"index", "fresh_tail", "block", "return_lse"}  # the torch ops' own arguments: no launcher to compare


def _split(op: str, args: dict):
    args = dict(args)
    return [args.pop(n) for n in _POSITIONAL[op]], args


def _call(op: str, args: dict, *, twin: bool):
    """Call the torch twin (or the kernel launcher) of ``op`` with ``args``."""
    if op == "decode_run":
        args = dict(args)
        q = args.pop("q")
        plan = (torch_ops.TorchDecodePlan if twin else DecodeAttentionPlan)(
            args.pop("k_cache"), args.pop("v_cache"), args.pop("lengths"), **args)
        return plan.run(q)
    if op == "decode_plan":
        args = {n: x for n, x in args.items() if n != "q"}
    pos, kw = _split(op, args)
    fn = {"decode_plan": (torch_ops.TorchDecodePlan, DecodeAttentionPlan),
          "append": (torch_ops.append_token_, kernel_append_token_),
          "compact": (torch_ops.compact_kv_, kernel_compact_kv_),
          "window": (torch_ops.window_scores, kernel_window_scores),
          "chunk": (torch_ops.chunk_attention, kernel_chunk_attention),
          "observed": (torch_ops.observed_attention, kernel_observed_attention)}[op][0 if twin else 1]
    return fn(*pos, **kw)


def _poked(x: torch.Tensor, index, value) -> torch.Tensor:
    x = x.clone()
    x[index] = value
    return x


T32 = torch.int32
BAD_ARGS = [
    # TorchDecodePlan(...): DecodeAttentionPlan's checks
    ("decode_plan", lambda a: {"k_cache": [1.0]}, TypeError, "k_cache must be a torch.Tensor"),
    ("decode_plan", lambda a: {"k_cache": a["k_cache"][0]}, ValueError, "k_cache must have rank 4"),
    ("decode_plan", lambda a: {"v_cache": a["v_cache"][:, :, :5]}, ValueError, "v_cache must have shape"),
    ("decode_plan", lambda a: {"v_cache": a["v_cache"].half()}, TypeError, "v_cache must have dtype float32"),
    ("decode_plan", lambda a: {"k_cache": a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)}, ValueError,
     "k_cache must be contiguous in its last dim"),
    ("decode_plan", lambda a: {"lengths": a["lengths"].long()}, TypeError, "lengths must have dtype int32"),
    ("decode_plan", lambda a: {"lengths": a["lengths"][:1]}, ValueError, "lengths must have shape"),
    ("decode_plan", lambda a: {"num_q_heads": 3}, ValueError, "positive multiple of Hkv=2"),
    ("decode_plan", lambda a: {"num_q_heads": 4.0}, TypeError, "num_q_heads must be an int"),
    ("decode_plan", lambda a: {"token_mass": a["token_mass"].double()}, TypeError, "token_mass must have dtype"),
    ("decode_plan", lambda a: {"multiplicity": a["multiplicity"][..., :4]}, ValueError, "multiplicity must have shape"),
    ("decode_plan", lambda a: {"modality": a["modality"].int()}, TypeError, "modality must have dtype uint8"),
    ("decode_plan", lambda a: {"decay": 0.0}, ValueError, r"decay must be a float in \(0, 1\]"),
    ("decode_plan", lambda a: {"decay": 2.0}, ValueError, r"decay must be a float in \(0, 1\]"),
    ("decode_plan", lambda a: {"scale": float("nan")}, ValueError, "scale must be a finite float"),
    # TorchDecodePlan.run(q): the kernel plan's host check
    ("decode_run", lambda a: {"q": [1.0]}, TypeError, "q must be a torch.Tensor"),
    ("decode_run", lambda a: {"q": a["q"][:, :2]}, ValueError, r"q must be a \[B, Hq, D\]"),
    ("decode_run", lambda a: {"q": a["q"].double()}, ValueError, r"q must be a \[B, Hq, D\]"),
    ("decode_run", lambda a: {"q": a["q"].transpose(0, 2).contiguous().transpose(0, 2)}, ValueError,
     "contiguous last dim"),
    # append_token_: the launcher's check_args (check=True)
    ("append", lambda a: {"k_cache": [1.0]}, TypeError, "k_cache must be a torch.Tensor"),
    ("append", lambda a: {"k_new": a["k_new"][..., :8]}, ValueError, "k_new must have shape"),
    ("append", lambda a: {"v_new": a["v_new"].half()}, TypeError, "v_new must have dtype float32"),
    ("append", lambda a: {"v_cache": a["v_cache"].half()}, TypeError, "v_cache must have dtype float32"),
    ("append", lambda a: {"lengths": a["lengths"].long()}, TypeError, "lengths must have dtype int32"),
    ("append", lambda a: {"next_position": a["next_position"][:, :, 0]}, ValueError, "next_position must have shape"),
    ("append", lambda a: {"token_mass": a["token_mass"].double()}, TypeError, "token_mass must have dtype float32"),
    ("append", lambda a: {"spatial": a["spatial"][..., 0]}, ValueError, "spatial must have shape"),
    ("append", lambda a: {"position": a["position"].transpose(1, 2).contiguous().transpose(1, 2)}, ValueError,
     "position must be contiguous"),
    ("append", lambda a: {"modality_new": a["modality_new"].int()}, TypeError, "modality_new must have dtype uint8"),
    ("append", lambda a: {"index": a["index"].int()}, TypeError, "index must have dtype int64"),
    # compact_kv_: validate_plan (the launcher's checks, check_plan=True)
    ("compact", lambda a: {"k_cache": [1.0]}, TypeError, "k_cache must be a torch.Tensor"),
    ("compact", lambda a: {"v_cache": a["v_cache"].half()}, TypeError, "v_cache must have dtype float32"),
    ("compact", lambda a: {"keep": a["keep"].long()}, TypeError, "keep must have dtype int32"),
    ("compact", lambda a: {"lengths": a["lengths"] + 5}, ValueError, r"lengths must lie in \[0, C=8\]"),
    ("compact", lambda a: {"lengths": a["lengths"] - 6}, ValueError, r"lengths must lie in \[0, C=8\]"),
    ("compact", lambda a: {"keep_lengths": a["keep_lengths"].long()}, TypeError, "keep_lengths must have dtype"),
    ("compact", lambda a: {"keep_lengths": _poked(a["keep_lengths"], (0, 1), 4)}, ValueError, "keep_lengths must lie"),
    ("compact", lambda a: {"keep": _poked(a["keep"], (0, 0, 1), 0)}, ValueError, "keep must be strictly increasing"),
    ("compact", lambda a: {"merge_weight": None}, ValueError, "merge_target and merge_weight must be given together"),
    ("compact", lambda a: {"merge_target": a["merge_target"][..., :7]}, ValueError, "merge_target must have shape"),
    ("compact", lambda a: {"merge_target": _poked(a["merge_target"], (0, 0, 4), 3)}, ValueError,
     "merge_target must be -1 or a slot"),
    ("compact", lambda a: {"merge_weight": _poked(a["merge_weight"], (0, 0, 1), 0.0)}, ValueError,
     "merge_weight must be finite and > 0"),
    ("compact", lambda a: {"token_data": a["token_data"][0]}, TypeError, "token_data and token_sums must be sequences"),
    ("compact", lambda a: {"token_sums": [a["token_sums"][0].int()]}, TypeError, r"token_sums\[0\] must have dtype"),
    ("compact", lambda a: {"v_cache": a["k_cache"]}, ValueError, "k_cache and v_cache must not share memory"),
    # window_scores: the launcher's check_args
    ("window", lambda a: {"q_window": [1.0]}, TypeError, "q_window must be a torch.Tensor"),
    ("window", lambda a: {"q_window": a["q_window"][0]}, ValueError, "q_window must have rank 4"),
    ("window", lambda a: {"k": a["k"].half()}, TypeError, "k must have dtype float32"),
    ("window", lambda a: {"k": a["k"][..., :8]}, ValueError, r"k must have shape \[B, Hkv, N, D\]"),
    ("window", lambda a: {"k": a["k"][:, :1].expand(2, 3, 10, 16)}, ValueError, "positive multiple of Hkv=3"),
    ("window", lambda a: {"k": a["k"][:, :, :3]}, ValueError, r"window size W=4 .* 1 <= W <= N=3"),
    ("window", lambda a: {"q_window": a["q_window"][:, :0]}, ValueError, "positive multiple of Hkv"),
    ("window", lambda a: {"k": a["k"].transpose(2, 3).contiguous().transpose(2, 3)}, ValueError,
     "k must be contiguous in its last dim"),
    ("window", lambda a: {"key_start": a["key_start"].float()}, TypeError, "key_start must have dtype int32 or int64"),
    ("window", lambda a: {"key_start": a["key_start"] + 8}, ValueError, r"key_start must lie in \[0, N=10\]"),
    ("window", lambda a: {"key_start": a["key_start"] - 1}, ValueError, r"key_start must lie in \[0, N=10\]"),
    ("window", lambda a: {"scale": float("nan")}, ValueError, "scale must be a finite float"),
    # chunk_attention: the launcher's check_args
    ("chunk", lambda a: {"q": [1.0]}, TypeError, "q must be a torch.Tensor"),
    ("chunk", lambda a: {"k_cache": a["k_cache"].half()}, TypeError, "k_cache must have dtype float32"),
    ("chunk", lambda a: {"k_new": a["k_new"][:, :, :4]}, ValueError, r"k_new must have shape \[B, Hkv, T, D\]"),
    ("chunk", lambda a: {"v_cache": a["v_cache"][:, :, :4]}, ValueError, r"v_cache must have shape \[B, Hkv, S, D\]"),
    ("chunk", lambda a: {"q": a["q"][:, :3]}, ValueError, "positive multiple of Hkv"),
    ("chunk", lambda a: {"lengths": a["lengths"].long()}, TypeError, "lengths must have dtype int32"),
    ("chunk", lambda a: {"lengths": a["lengths"][0]}, ValueError, "lengths must have shape"),
    ("chunk", lambda a: {"multiplicity": a["multiplicity"].double()}, TypeError, "multiplicity must have dtype"),
    ("chunk", lambda a: {"key_valid": a["key_valid"].int()}, TypeError, "key_valid must have dtype bool"),
    ("chunk", lambda a: {"window": 0}, ValueError, "window must be an int >= 1"),
    ("chunk", lambda a: {"window": -1}, ValueError, "window must be an int >= 1"),
    ("chunk", lambda a: {"window": True}, TypeError, "window must be an int >= 1"),
    ("chunk", lambda a: {"window": 2.0}, TypeError, "window must be an int >= 1"),
    ("chunk", lambda a: {"q": a["q"][:, :0]}, ValueError, "positive multiple of Hkv"),
    ("chunk", lambda a: {"reduce": "mean"}, ValueError, "reduce must be 'sum' or 'max'"),
    ("chunk", lambda a: {"decay": 0.0}, ValueError, r"decay must be a float in \(0, 1\]"),
    ("chunk", lambda a: {"decay": 2.0}, ValueError, r"decay must be a float in \(0, 1\]"),
    ("chunk", lambda a: {"reduce": "max", "decay": 0.5}, ValueError, "reduce='max' takes decay=1"),
    ("chunk", lambda a: {"scale": float("nan")}, ValueError, "scale must be a finite float"),
    ("chunk", lambda a: {"block": 0}, ValueError, "block must be a positive int"),
    # observed_attention: the launcher's check_args
    ("observed", lambda a: {"q": [1.0]}, TypeError, "q must be a torch.Tensor"),
    ("observed", lambda a: {"q": a["q"].long()}, TypeError, "q must have dtype"),
    ("observed", lambda a: {"k": a["k"].half()}, TypeError, "k must have dtype float32"),
    ("observed", lambda a: {"k": a["k"][:, :, :4]}, ValueError, "k must have shape"),
    ("observed", lambda a: {"v": a["v"][..., :8]}, ValueError, "v must have shape"),
    ("observed", lambda a: {"q": a["q"][:, :3]}, ValueError, "positive multiple of Hkv"),
    ("observed", lambda a: {"q": a["q"][:, :0]}, ValueError, "positive multiple of Hkv"),
    ("observed", lambda a: {"q": a["q"].transpose(2, 3).contiguous().transpose(2, 3)}, ValueError,
     "q must be contiguous in its last dim"),
    ("observed", lambda a: {"v": None, "out": torch.empty_like(a["q"])}, ValueError, "out was given without v"),
    ("observed", lambda a: {"out": a["q"].double()}, TypeError, "out must have dtype float32"),
    ("observed", lambda a: {"out": a["q"][:, :, 1:]}, ValueError, "out must have shape"),
    ("observed", lambda a: {"key_start": a["key_start"].float()}, TypeError, "key_start must have dtype"),
    ("observed", lambda a: {"key_start": a["key_start"][:1]}, ValueError, "key_start must have shape"),
    ("observed", lambda a: {"key_start": a["key_start"] + 8}, ValueError, r"key_start must lie in \[0, T=9\]"),
    ("observed", lambda a: {"key_start": a["key_start"] - 1}, ValueError, r"key_start must lie in \[0, T=9\]"),
    ("observed", lambda a: {"decay": 0.0}, ValueError, r"decay must be a float in \(0, 1\]"),
    ("observed", lambda a: {"decay": 2.0}, ValueError, r"decay must be a float in \(0, 1\]"),
    ("observed", lambda a: {"scale": float("nan")}, ValueError, "scale must be a finite float"),
    ("observed", lambda a: {"block": -1}, ValueError, "block must be a positive int"),
]


def _case_ids(cases) -> list[str]:
    """``op-argument`` ids, numbered where an op has several cases for one argument."""
    ids = [f"{op}-{'-'.join(mutate(_good(op)))}" for op, mutate, _, _ in cases]
    return [f"{i}-{ids[:n].count(i) + 1}" if ids.count(i) > 1 else i for n, i in enumerate(ids)]


@pytest.mark.parametrize("op", ["decode_plan", "decode_run", "append", "compact", "window", "chunk", "observed"])
def test_valid_arguments_pass_the_checks(op):
    """The table's base arguments are valid: each bad case below changes one thing."""
    _call(op, _good(op), twin=True)


@pytest.mark.parametrize("op,mutate,exc,match", [pytest.param(*c, id=i) for c, i in zip(BAD_ARGS, _case_ids(BAD_ARGS))])
def test_bad_arguments_raise_the_launchers_error_naming_the_argument(op, mutate, exc, match):
    """The launcher's error type and message (the same text where the launcher takes the argument, compared under
    Triton's interpreter, where its kernel-device check passes CPU tensors), and nothing written."""
    good = _good(op)
    bad = mutate(good)
    args = {**good, **bad}
    before = {n: x.clone() for n, x in good.items() if isinstance(x, torch.Tensor) and n not in bad}
    with pytest.raises(exc, match=match) as twin_error:
        _call(op, args, twin=True)
    for n, x in before.items():
        assert torch.equal(good[n], x), f"{n} was written before the error"
    if tuning.INTERPRET and not _TWIN_ONLY & set(bad):
        launcher_args = {n: x for n, x in args.items() if n not in _TWIN_ONLY}
        with pytest.raises(exc) as launcher_error:
            _call(op, launcher_args, twin=False)
        assert str(twin_error.value) == str(launcher_error.value)


def test_lengths_outside_the_capacity_act_as_clamped_like_the_kernels():
    """The decode plan and chunk attention read ``lengths`` on the device only (no sync, as the kernels, which clamp
    them to ``[0, C]``): a row past C attends over all C slots, a negative row over none."""
    a = _good("decode_plan")
    wild, clamped = torch.tensor([[12, 3], [-4, 5]], dtype=torch.int32), torch.tensor([[8, 3], [0, 5]], dtype=T32)
    outs = []
    for lengths in (wild, clamped):
        mass = a["token_mass"].clone()
        plan = torch_ops.TorchDecodePlan(a["k_cache"], a["v_cache"], lengths, num_q_heads=4, token_mass=mass,
                                         multiplicity=a["multiplicity"])
        res = plan.run(a["q"])
        outs.append((res.out.clone(), res.lse.clone(), mass))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    c = _good("chunk")
    got = _call("chunk", {**c, "lengths": wild, "check_lengths": False}, twin=True)
    want = _call("chunk", {**c, "lengths": clamped}, twin=True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for twin in (True, False):  # with its value check (the default), chunk attention refuses them, as decode does
        with pytest.raises(ValueError, match=r"lengths must lie in \[0, C=8\]"):
            _call("chunk", {**c, "lengths": wild}, twin=twin)
        bad_mult = c["multiplicity"].clone()
        bad_mult[0, 0, 0] = 0.0
        with pytest.raises(ValueError, match="multiplicity must be finite and > 0"):
            _call("chunk", {**c, "multiplicity": bad_mult}, twin=twin)


def test_the_cache_appends_without_the_checks():
    """``append_token_(check=False)`` (the cache's decode step) skips the host checks, not the write."""
    state, new = _append_args(2, 3, 17, 64, torch.float32, torch.Generator().manual_seed(5), given=False)
    want = _call_append(reference.append_token_, state, new)
    got = _call_append(torch_ops.append_token_, state, new, check=False)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_head_dim_of_zero_is_refused_by_name():
    k = torch.zeros(1, 2, 8, 0)
    lengths = torch.full((1, 2), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="head dim D"):
        torch_ops.TorchDecodePlan(k, k, lengths, num_q_heads=2)
    with pytest.raises(ValueError, match="head dim D"):
        kernel_decode_attention(torch.zeros(1, 2, 0), k, k, lengths)


def test_edge_inputs_the_review_found():
    """key_start as int64 works like int32 in window_scores (as in observed_attention); the reference's max
    reduction of an empty chunk is 0 like its sum; an empty prompt's evidence is empty."""
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 12, 16, generator=g)
    ks = torch.tensor([0, 5], dtype=torch.int32)
    for fn in (torch_ops.window_scores, kernel_window_scores):
        assert torch.equal(fn(q, k, key_start=ks.long()).scores, fn(q, k, key_start=ks).scores)
    empty = torch.zeros(1, 2, 0, 8)
    stored = torch.randn(1, 1, 5, 8, generator=g)
    res = reference.chunk_attention(empty, stored, stored, torch.full((1, 1), 5, dtype=torch.int32), empty[:, :1],
                                    empty[:, :1], reduce="max")
    assert torch.equal(res.stored_mass, torch.zeros(1, 1, 5))
    from acckv_triton import AccKVConfig, BudgetedLayerCache
    cache = BudgetedLayerCache(AccKVConfig(budget=0.5, backend="torch"))
    assert cache.prompt_evidence(empty, empty[:, :1]).shape == (1, 1, 0)


@pytest.mark.parametrize("decay", [1.0, 0.6], ids=["sum", "decay0.6"])
def test_decode_plan_over_caches_whose_rows_do_not_merge(decay):
    """A K and a token mass laid out [Hkv, B, ...] and permuted (their (B, Hkv) dims do not merge into one): the
    plan copies K into its own buffer and updates the mass without the batched product, with the same results."""
    g = torch.Generator().manual_seed(8)
    B, Hkv, C, D, Hq = 2, 3, 24, 16, 6
    lengths = torch.tensor([[24, 7, 0], [13, 24, 5]], dtype=torch.int32)
    k = torch.randn(Hkv, B, C, D, generator=g).transpose(0, 1)
    v = torch.randn(B, Hkv, C, D, generator=g)
    mass = torch.rand(Hkv, B, C, generator=g).transpose(0, 1)
    want_mass = mass.clone()
    plan = torch_ops.TorchDecodePlan(k, v, lengths, num_q_heads=Hq, token_mass=mass, decay=decay)
    assert plan._k32 is not None and plan._mass3 is None
    q = torch.randn(B, Hq, D, generator=g)
    res = plan.run(q)
    want = reference.decode_attention(q, k, v, lengths, token_mass=want_mass, decay=decay)
    torch.testing.assert_close(res.out, want.out.float(), atol=1e-5, rtol=1e-5)
    stored = torch.arange(C) < lengths.long()[..., None]
    torch.testing.assert_close(mass[stored], want_mass[stored], atol=1e-5, rtol=1e-5)
