"""compact_kv_ and compact_kv against the float64 reference: gathers, merges, metadata, adversarial and bad plans."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import acckv_triton as ak
from acckv_triton import reference
from acckv_triton.ops.compact_kv import compact_kv, compact_kv_
from tests.conftest import DEVICE, TOL

SUM_TOL = (1e-6, 1e-6)  # float32 token_sums: only the summation order differs from the float64 reference


# ------------------------------------------------------------------------------------------------------- plan makers
def keep_row(L: int, K: int, kind: str, g: torch.Generator) -> list[int]:
    """Sorted kept token indices of one (b, h) row of length L, at most K of them."""
    cap = min(K, L)
    if kind == "all":
        assert K >= L
        return list(range(L))
    if kind == "prefix":  # nothing moves: every slot is its own token
        return list(range(cap))
    if kind == "tail":  # every slot reads from far behind it: the case that races without a barrier
        return list(range(L - cap, L))
    if kind == "strided":
        return list(range(L - 1, -1, -3))[:cap][::-1]
    if kind == "sinks+recent":
        n_sink = min(4, cap)
        return list(range(n_sink)) + list(range(L - (cap - n_sink), L)) if cap > n_sink else list(range(cap))
    if kind == "random":
        n = int(torch.randint(0, cap + 1, (1,), generator=g)) if cap else 0
        return sorted(torch.randperm(L, generator=g)[:n].tolist())
    if kind == "none":
        return []
    raise ValueError(kind)


def make_case(B, Hkv, C, D, lengths, K, kind, dtype, *, merge=None, seed=0):
    """Random cache (NaN beyond each length), a plan of the given kind, and optional merges.

    merge: None, "random" (each evicted token merges into a random slot or is dropped), "before" (into the first
    kept slot after it: the source sits before its slot's token), or "all-into-0" (one long merge set). Merge
    targets at kept tokens are garbage, and past a row's length they name the row's slots (stale, NaN tokens).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int32).reshape(B, Hkv)
    k = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    beyond = torch.arange(C) >= lengths[..., None]
    k[beyond] = float("nan")  # must never be read
    v[beyond] = float("nan")
    keep = torch.randint(-5, 10**6, (B, Hkv, K), generator=g, dtype=torch.int32)  # garbage past keep_lengths
    keep_lengths = torch.zeros(B, Hkv, dtype=torch.int32)
    merge_target = merge_weight = None
    if merge is not None:
        merge_target = torch.randint(-(2**20), 2**20, (B, Hkv, C), generator=g, dtype=torch.int32)  # garbage
        merge_weight = torch.full((B, Hkv, C), float("nan"))  # unused entries must be ignored
    for b in range(B):
        for h in range(Hkv):
            L = int(lengths[b, h])
            row = keep_row(L, K, kind, g)
            n = len(row)
            keep[b, h, :n] = torch.tensor(row, dtype=torch.int32)
            keep_lengths[b, h] = n
            if merge is None or L == 0:
                continue
            kept = torch.zeros(L, dtype=torch.bool)
            kept[row] = True
            evicted = (~kept).nonzero().flatten()
            if merge == "random" and n:
                tgt = torch.randint(-1, n, (len(evicted),), generator=g)
            elif merge == "before" and n:
                # the first kept slot whose token comes after t (or -1 when none does)
                slots = torch.searchsorted(torch.tensor(row), evicted)
                tgt = torch.where(slots < n, slots, -1)
            elif merge == "all-into-0" and n:
                tgt = torch.zeros(len(evicted), dtype=torch.long)
            else:
                tgt = torch.full((len(evicted),), -1)
            merge_target[b, h, evicted] = tgt.int()
            if n:  # stale entries past the length that name real slots: ignored all the same
                merge_target[b, h, L:] = (torch.arange(C - L) % n).int()
            merge_weight[b, h, :L] = torch.rand(L, generator=g) + 0.05
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return dict(k=to(k), v=to(v), lengths=to(lengths), keep=to(keep), keep_lengths=to(keep_lengths),
                merge_target=to(merge_target), merge_weight=to(merge_weight))


def metadata(B, Hkv, C, seed=1):
    """token_data of several dtypes (ids, time, packed (h, w), a flag, bf16 bits) and float token_sums."""
    g = torch.Generator().manual_seed(seed)
    data = [
        torch.randint(0, ak.NUM_MODALITIES, (B, Hkv, C), generator=g, dtype=torch.uint8),
        torch.randint(-(2**31), 2**31 - 1, (B, Hkv, C), generator=g, dtype=torch.int32),
        torch.randint(0, 1000, (B, Hkv, C, 2), generator=g, dtype=torch.int32).view(torch.int64).squeeze(-1),
        torch.rand(B, Hkv, C, generator=g) > 0.5,
        torch.randn(B, Hkv, C, generator=g).to(torch.bfloat16),
    ]
    sums = [torch.rand(B, Hkv, C, generator=g), torch.rand(B, Hkv, C, generator=g).double()]
    return [x.to(DEVICE) for x in data], [x.to(DEVICE) for x in sums]


def run_both(case, token_data=(), token_sums=()):
    """Apply the plan with the kernel and with the reference to copies; return (got, want) dicts."""
    def copies():
        return {name: None if x is None else x.clone() for name, x in case.items()}, \
            [x.clone() for x in token_data], [x.clone() for x in token_sums]
    got, got_data, got_sums = copies()
    want, want_data, want_sums = copies()
    runs = ((compact_kv_, got, got_data, got_sums), (reference.compact_kv_, want, want_data, want_sums))
    for fn, c, data, sums in runs:
        fn(c["k"], c["v"], c["lengths"], c["keep"], c["keep_lengths"], merge_target=c["merge_target"],
           merge_weight=c["merge_weight"], token_data=data, token_sums=sums)
    return (got, got_data, got_sums), (want, want_data, want_sums)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe, any dtype and strides)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def valid_slots(x, keep_lengths):
    """The slots j < keep_lengths[b, h] of a [B, Hkv, C, ...] tensor, flattened."""
    mask = torch.arange(x.shape[2], device=x.device) < keep_lengths[..., None]
    return x[mask]


# ---------------------------------------------------------------------------------------------------------- contract
GATHER_CASES = [
    # B, Hkv, C, D, lengths, K, kind, dtype
    pytest.param(1, 1, 1, 64, [1], 1, "all", torch.float32, id="len1-all-D64-fp32"),
    pytest.param(1, 2, 63, 128, [63, 63], 20, "tail", torch.float16, id="len63-tail-D128-fp16"),
    pytest.param(1, 2, 257, 64, [257, 257], 90, "strided", torch.bfloat16, id="len257-strided-D64-bf16"),
    pytest.param(2, 3, 70, 128, [70, 1, 0, 63, 35, 70], 40, "random", torch.float32,
                 id="ragged-random-with-empty-D128-fp32"),
    pytest.param(2, 2, 40, 64, [40, 33, 17, 40], 40, "all", torch.bfloat16, id="ragged-all-tokens-D64-bf16"),
    pytest.param(1, 2, 50, 64, [50, 41], 30, "prefix", torch.float16, id="prefix-stays-put-D64-fp16"),
    pytest.param(2, 2, 45, 80, [45, 44, 2, 30], 24, "sinks+recent", torch.bfloat16, id="sinks+recent-D80-bf16"),
    pytest.param(1, 2, 20, 64, [20, 7], 8, "none", torch.float32, id="keep-nothing-fp32"),
]


@pytest.mark.parametrize("B,Hkv,C,D,lengths,K,kind,dtype", GATHER_CASES)
def test_gather_is_bit_exact(B, Hkv, C, D, lengths, K, kind, dtype, poison_empty):
    case = make_case(B, Hkv, C, D, lengths, K, kind, dtype)
    (got, _, _), (want, _, _) = run_both(case)
    assert torch.equal(got["lengths"], case["keep_lengths"])
    for name in ("k", "v"):
        assert torch.equal(valid_slots(got[name], case["keep_lengths"]), valid_slots(want[name], case["keep_lengths"]))


MERGE_CASES = [
    # B, Hkv, C, D, lengths, K, kind, merge, dtype
    pytest.param(2, 2, 63, 64, [63, 50, 1, 63], 20, "random", "random", torch.float32, id="random-merge-D64-fp32"),
    pytest.param(1, 2, 257, 128, [257, 200], 64, "strided", "before", torch.float16,
                 id="merge-source-before-slot-len257-D128-fp16"),
    pytest.param(1, 2, 90, 64, [90, 33], 16, "tail", "all-into-0", torch.bfloat16,
                 id="tail-all-merge-into-slot0-bf16"),
    pytest.param(2, 2, 40, 128, [40, 0, 25, 40], 12, "sinks+recent", "random", torch.bfloat16,
                 id="ragged-with-empty-D128-bf16"),
    pytest.param(1, 3, 30, 64, [30, 30, 30], 30, "all", "random", torch.float16, id="all-kept-merge-noop-fp16"),
]


@pytest.mark.parametrize("B,Hkv,C,D,lengths,K,kind,merge,dtype", MERGE_CASES)
def test_merge_matches_reference(B, Hkv, C, D, lengths, K, kind, merge, dtype, poison_empty):
    case = make_case(B, Hkv, C, D, lengths, K, kind, dtype, merge=merge)
    (got, _, _), (want, _, _) = run_both(case)
    atol, rtol = TOL[dtype]
    assert torch.equal(got["lengths"], case["keep_lengths"])
    for name in ("k", "v"):
        g, w = valid_slots(got[name], case["keep_lengths"]), valid_slots(want[name], case["keep_lengths"])
        assert not g.isnan().any()
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("merge", [pytest.param(None, id="gather"), pytest.param("random", id="merge")])
def test_metadata_is_carried(merge, poison_empty):
    B, Hkv, C = 2, 2, 57
    case = make_case(B, Hkv, C, 64, [57, 20, 1, 44], 24, "random", torch.float16, merge=merge, seed=3)
    data, sums = metadata(B, Hkv, C)
    (got, got_data, got_sums), (want, want_data, want_sums) = run_both(case, data, sums)
    n = case["keep_lengths"]
    for g, w in zip(got_data, want_data):  # gathered: bit-exact whatever the dtype
        assert torch.equal(valid_slots(g, n).view(torch.uint8), valid_slots(w, n).view(torch.uint8))
    for g, w in zip(got_sums, want_sums):
        torch.testing.assert_close(valid_slots(g, n), valid_slots(w, n), atol=SUM_TOL[0], rtol=SUM_TOL[1])
    if merge is None:  # a one-token merge set sums to the token's own value exactly
        for g, src in zip(got_sums, sums):
            idx = case["keep"].long().clamp(0, C - 1)
            assert torch.equal(valid_slots(g, n), valid_slots(src.gather(2, idx), n))


@pytest.mark.parametrize("merge", [pytest.param(None, id="gather"), pytest.param("before", id="merge")])
def test_out_of_place_matches_in_place_and_leaves_sources(merge, poison_empty):
    B, Hkv, C, D, K = 2, 2, 65, 64, 33
    case = make_case(B, Hkv, C, D, [65, 64, 9, 40], K, "strided", torch.bfloat16, merge=merge, seed=5)
    data, sums = metadata(B, Hkv, C)
    C_out = K + 7
    out_k = torch.full((B, Hkv, C_out, D), 7.0, dtype=torch.bfloat16, device=DEVICE)
    out_v = torch.full_like(out_k, 7.0)
    out_data = [torch.zeros(B, Hkv, C_out, dtype=x.dtype, device=DEVICE) for x in data]
    out_sums = [torch.zeros(B, Hkv, C_out, dtype=x.dtype, device=DEVICE) for x in sums]
    sources = {name: x.clone() for name, x in case.items() if x is not None}
    compact_kv(case["k"], case["v"], case["lengths"], case["keep"], case["keep_lengths"], out_k=out_k, out_v=out_v,
               merge_target=case["merge_target"], merge_weight=case["merge_weight"], token_data=data,
               token_sums=sums, out_token_data=out_data, out_token_sums=out_sums)
    for name, x in sources.items():  # nothing in the sources changed
        assert torch.equal(x.view(torch.uint8), case[name].view(torch.uint8)), name
    (got, got_data, got_sums), _ = run_both(case, data, sums)
    n = case["keep_lengths"]
    for out, inplace in [(out_k, got["k"]), (out_v, got["v"])] + list(zip(out_data, got_data)) \
            + list(zip(out_sums, got_sums)):
        # bit-identical: the same kernel arithmetic, once into a strip, once into the out buffers
        assert same_bits(valid_slots(out, n), valid_slots(inplace[:, :, :C_out], n))
    past = torch.arange(C_out, device=DEVICE) >= n[..., None]
    assert torch.all(out_k[past] == 7.0) and torch.all(out_v[past] == 7.0)  # nothing written past keep_lengths


@pytest.mark.parametrize("merge", [pytest.param(None, id="gather"), pytest.param("random", id="merge")])
def test_decode_attention_after_compaction_equals_attention_over_kept(merge, poison_empty):
    B, Hkv, G, C, D = 2, 2, 3, 80, 64
    case = make_case(B, Hkv, C, D, [80, 61, 1, 33], 30, "random", torch.float32, merge=merge, seed=7)
    _, (want, _, _) = run_both(case)  # the expected compacted rows (float64 spec)
    k, v, lengths = case["k"], case["v"], case["lengths"]
    modality = torch.randint(0, ak.NUM_MODALITIES, (B, Hkv, C), dtype=torch.uint8, device=DEVICE)
    mass = torch.rand(B, Hkv, C, device=DEVICE)
    compact_kv_(k, v, lengths, case["keep"], case["keep_lengths"], merge_target=case["merge_target"],
                merge_weight=case["merge_weight"], token_data=[modality], token_sums=[mass])
    q = torch.randn(B, Hkv * G, D, device=DEVICE)
    got_mass, want_mass = mass.clone(), mass.clone()
    got = ak.decode_attention(q, k, v, lengths, modality=modality, token_mass=got_mass)
    # the spec: attention over the expected compacted tokens, written into a fresh buffer
    fresh_k = torch.zeros_like(k)
    fresh_v = torch.zeros_like(v)
    slots = torch.arange(C, device=DEVICE) < lengths[..., None]
    fresh_k[slots], fresh_v[slots] = want["k"][slots], want["v"][slots]
    modality[~slots] = 0  # unspecified past the new lengths; the reference reads every entry
    expected = reference.decode_attention(q, fresh_k, fresh_v, lengths, modality=modality, token_mass=want_mass)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(got.out, expected.out, atol=atol, rtol=rtol)
    torch.testing.assert_close(got.modality_mass, expected.modality_mass, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_mass[slots], want_mass[slots], atol=atol, rtol=rtol)


def test_check_plan_false_gives_the_same_result(poison_empty):
    case = make_case(2, 2, 50, 64, [50, 3, 49, 20], 21, "random", torch.float16, merge="random", seed=11)
    (want, _, _), _ = run_both(case)
    k, v, lengths = case["k"], case["v"], case["lengths"]
    compact_kv_(k, v, lengths, case["keep"], case["keep_lengths"], merge_target=case["merge_target"],
                merge_weight=case["merge_weight"], check_plan=False)
    n = case["keep_lengths"]
    assert torch.equal(valid_slots(k, n), valid_slots(want["k"], n))
    assert torch.equal(valid_slots(v, n), valid_slots(want["v"], n))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    lengths=st.lists(st.integers(0, 48), min_size=2, max_size=2),
    K=st.integers(1, 48),
    kind=st.sampled_from(["random", "tail", "strided", "sinks+recent", "prefix"]),
    merge=st.sampled_from([None, "random", "before"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_random_plans_match_reference(seed, lengths, K, kind, merge, dtype):
    C = max(48, K)
    case = make_case(1, 2, C, 64, lengths, K, kind, dtype, merge=merge, seed=seed)
    data, sums = metadata(1, 2, C, seed=seed)
    (got, got_data, got_sums), (want, want_data, want_sums) = run_both(case, data, sums)
    n = case["keep_lengths"]
    atol, rtol = TOL[dtype] if merge else (0.0, 0.0)
    for name in ("k", "v"):
        torch.testing.assert_close(valid_slots(got[name], n).float(), valid_slots(want[name], n).float(),
                                   atol=atol, rtol=rtol)
    for g, w in zip(got_data, want_data):
        assert torch.equal(valid_slots(g, n).view(torch.uint8), valid_slots(w, n).view(torch.uint8))
    for g, w in zip(got_sums, want_sums):
        torch.testing.assert_close(valid_slots(g, n), valid_slots(w, n), atol=SUM_TOL[0], rtol=SUM_TOL[1])


# ----------------------------------------------------------------------------------------------------- invalid plans
def valid_plan_args():
    """A fixed valid plan with merges and metadata: B=2, Hkv=2, C=40, K=10; row (0, 0) keeps every 4th token."""
    B, Hkv, C, D = 2, 2, 40, 64
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([[40, 31], [25, 12]], dtype=torch.int32)
    rows = [[list(range(0, 40, 4)), list(range(1, 31, 3))], [list(range(3, 25, 2))[:10], [0, 5, 11]]]
    keep = torch.zeros(B, Hkv, 10, dtype=torch.int32)
    keep_lengths = torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            keep[b, h, : len(rows[b][h])] = torch.tensor(rows[b][h], dtype=torch.int32)
            keep_lengths[b, h] = len(rows[b][h])
    t = torch.arange(C)
    merge_target = torch.where(t % 5 == 2, -1, t % keep_lengths[..., None]).int()  # slot t mod keep_lengths, or -1
    data, sums = metadata(B, Hkv, C)
    args = dict(k=torch.randn(B, Hkv, C, D, generator=g).half(), v=torch.randn(B, Hkv, C, D, generator=g).half(),
                lengths=lengths, keep=keep, keep_lengths=keep_lengths, merge_target=merge_target,
                merge_weight=torch.rand(B, Hkv, C, generator=g) + 0.1)
    args = {name: x.to(DEVICE) for name, x in args.items()}
    return dict(args, token_data=data, token_sums=sums)


def _set(name, index, value):
    def mutate(args):
        args[name][index] = value
    return mutate


def _replace(name, make):
    def mutate(args):
        args[name] = make(args)
    return mutate


def _keep_swap(args):  # slots 2 and 3 of row (0, 0) out of order
    keep = args["keep"]
    keep[0, 0, 2], keep[0, 0, 3] = keep[0, 0, 3].clone(), keep[0, 0, 2].clone()


def _keep_inside_token_data(args):  # a valid keep, but stored inside a tensor the call writes
    args["token_data"][1][..., :10] = args["keep"]
    args["keep"] = args["token_data"][1][..., :10]


def _keep_lengths_overlapping_lengths(args):  # valid values, but keep_lengths shares 3 of its 4 ints with lengths
    buf = torch.tensor([12, 10, 8, 6, 4], dtype=torch.int32, device=DEVICE)
    args["lengths"], args["keep_lengths"] = buf[:4].view(2, 2), buf[1:].view(2, 2)
    args["keep"] = torch.arange(10, dtype=torch.int32, device=DEVICE).expand(2, 2, 10).contiguous()
    args["merge_target"] = args["merge_weight"] = None


def _token_data_sharing_one_element(args):  # two written token_data whose storage overlaps in their last/first int
    B, Hkv, C = args["token_data"][1].shape
    buf = torch.zeros(2 * B * Hkv * C - 1, dtype=torch.int32, device=DEVICE)
    args["token_data"] = [buf[:B * Hkv * C].view(B, Hkv, C), buf[B * Hkv * C - 1:].view(B, Hkv, C)]


INVALID = [
    # (mutation, the argument the error must name); row (0, 0) keeps 0, 4, 8, ... so token 1 is evicted into slot 1
    pytest.param(_keep_swap, "keep", id="keep-unsorted"),
    pytest.param(_set("keep", (0, 0, 0), -1), "keep", id="keep-negative"),
    pytest.param(_set("keep", (1, 1, 2), 12), "keep", id="keep-at-length"),
    pytest.param(_set("keep", (0, 1, 1), 1), "keep", id="keep-duplicate"),
    pytest.param(_set("keep_lengths", (1, 1), 13), "keep_lengths", id="keep_lengths-over-lengths"),
    pytest.param(_set("lengths", (1, 1), 2), "keep_lengths", id="keep_lengths-over-lengths-within-K"),  # 3 > 2
    pytest.param(_set("keep_lengths", (0, 1), -1), "keep_lengths", id="keep_lengths-negative"),
    pytest.param(_set("keep_lengths", (0, 0), 11), "keep_lengths", id="keep_lengths-over-K"),
    pytest.param(_set("lengths", (1, 1), 41), "lengths", id="lengths-over-capacity"),
    pytest.param(_set("merge_target", (0, 0, 1), 10), "merge_target", id="merge_target-past-keep_lengths"),
    pytest.param(_set("merge_target", (0, 0, 1), -2), "merge_target", id="merge_target-below-minus-one"),
    pytest.param(_set("merge_weight", (0, 0, 1), 0.0), "merge_weight", id="merge_weight-zero-at-merged-token"),
    pytest.param(_set("merge_weight", (1, 0, 3), float("nan")), "merge_weight", id="merge_weight-nan-at-kept-token"),
    pytest.param(_replace("merge_weight", lambda a: None), "merge_target", id="merge_target-without-weight"),
    pytest.param(_replace("keep", lambda a: a["keep"][:1]), "keep", id="keep-wrong-batch"),
    pytest.param(_replace("keep", lambda a: torch.arange(41, dtype=torch.int32, device=DEVICE).expand(2, 2, 41)
                          .contiguous()), "keep", id="keep-K-over-capacity"),  # its first keep_lengths entries valid
    pytest.param(_replace("keep", lambda a: a["keep"].to("meta")), "keep", id="keep-wrong-device"),
    pytest.param(_replace("lengths", lambda a: a["lengths"].flatten()), "lengths", id="lengths-wrong-shape"),
    pytest.param(_replace("k", lambda a: torch.randn(2, 2, 64, 40, device=DEVICE).half().transpose(2, 3)),
                 "k_cache", id="k_cache-strided-head-dim"),
    pytest.param(_replace("merge_target", lambda a: a["merge_target"][..., :-1]), "merge_target",
                 id="merge_target-wrong-shape"),
    pytest.param(_replace("token_data", lambda a: [a["token_data"][0][..., :-1]]), r"token_data\[0\]",
                 id="token_data-wrong-shape"),
    pytest.param(_replace("token_sums", lambda a: [a["token_sums"][0], a["token_sums"][0]]), r"token_sums\[1\]",
                 id="token_sums-same-tensor-twice"),
    pytest.param(_keep_inside_token_data, "keep", id="keep-inside-a-written-token_data"),
    pytest.param(_keep_lengths_overlapping_lengths, "keep_lengths must not share memory with lengths",
                 id="keep_lengths-overlapping-lengths"),
    pytest.param(_token_data_sharing_one_element, r"token_data\[0\] and token_data\[1\] must not share memory",
                 id="token_data-sharing-one-element"),
    # a written tensor whose elements share memory: refused before anything is written (the kernels wrote the
    # metadata, then failed at the expanded one)
    pytest.param(_replace("token_sums", lambda a: [a["token_sums"][0][:, :, :1].expand_as(a["token_sums"][0])]),
                 r"token_sums\[0\] must not overlap itself", id="token_sums-expanded"),
    pytest.param(_replace("lengths", lambda a: a["lengths"][:, :1].expand_as(a["lengths"])),
                 "lengths must not overlap itself", id="lengths-expanded"),
    pytest.param(_replace("k", lambda a: a["k"][:1].expand_as(a["k"])), "k_cache must not overlap itself",
                 id="k_cache-expanded"),
]
WRONG_DTYPE = [  # a wrong dtype raises TypeError, like every launcher (acckv_triton/ops/_common.py)
    pytest.param(_replace("keep", lambda a: a["keep"].long()), "keep", id="keep-int64"),
    pytest.param(_replace("v", lambda a: a["v"].float()), "v_cache", id="v_cache-wrong-dtype"),
    pytest.param(_replace("token_sums", lambda a: [a["token_data"][1]]), r"token_sums\[0\]", id="token_sums-int"),
]


def _with_exc(params, exc):
    return [pytest.param(*p.values, exc, id=p.id) for p in params]


def _call(fn, args):
    fn(args["k"], args["v"], args["lengths"], args["keep"], args["keep_lengths"], merge_target=args["merge_target"],
       merge_weight=args["merge_weight"], token_data=args["token_data"], token_sums=args["token_sums"])


@pytest.mark.parametrize("mutate,name,exc", _with_exc(INVALID, ValueError) + _with_exc(WRONG_DTYPE, TypeError))
def test_invalid_plan_raises_and_changes_nothing(mutate, name, exc):
    args = valid_plan_args()
    copy = {n: x.clone() if isinstance(x, torch.Tensor) else [y.clone() for y in x] for n, x in args.items()}
    _call(compact_kv_, copy)  # the unmutated plan is valid
    mutate(args)
    tensors = [x for x in list(args.values()) + list(args["token_data"]) + list(args["token_sums"])
               if isinstance(x, torch.Tensor) and x.device.type != "meta"]
    before = [x.clone() for x in tensors]
    with pytest.raises(exc, match=rf"^(\S+ and )?{name}(?!\w)"):  # the message opens with the argument's name
        _call(compact_kv_, args)
    for x, snapshot in zip(tensors, before):
        assert same_bits(x, snapshot)


def test_the_aliases_the_contract_allows():
    """K and V as the two halves of one buffer (adjacent, sharing no byte) and keep_lengths passed as lengths itself
    (the one alias of the plan with a written tensor that is allowed: a plan that keeps every token) run."""
    case = make_case(1, 2, 40, 64, [40, 31], 20, "random", torch.float32, merge="random", seed=6)
    kv = torch.stack([case["k"], case["v"]])
    got = {name: None if x is None else x.clone() for name, x in case.items()}
    got["k"], got["v"] = kv[0], kv[1]
    (_, _, _), (want, _, _) = run_both(case)
    _call(compact_kv_, dict(got, token_data=(), token_sums=()))
    for name in ("k", "v"):
        torch.testing.assert_close(valid_slots(got[name], case["keep_lengths"]),
                                   valid_slots(want[name], case["keep_lengths"]), atol=1e-5, rtol=1e-5)
    lengths = case["lengths"].clone()
    k, v = case["k"].clone(), case["v"].clone()
    keep = torch.arange(40, dtype=torch.int32, device=DEVICE).expand(1, 2, 40).contiguous()
    compact_kv_(k, v, lengths, keep, lengths)
    assert torch.equal(lengths, case["lengths"])
    assert same_bits(k, case["k"]) and same_bits(v, case["v"])


def _out_k_is_the_source(args):  # every output sized like the source, so that the overlap is what is refused
    args.update(out_k=args["k"], out_v=torch.zeros_like(args["v"]),
                out_token_data=[torch.zeros(args["k"].shape[:3], dtype=x.dtype, device=DEVICE)
                                for x in args["out_token_data"]],
                out_token_sums=[torch.zeros(args["k"].shape[:3], device=DEVICE)])


OUT_OF_PLACE_INVALID = [
    pytest.param(lambda a: a.update(out_k=a["out_k"][:, :, :9]), "out_k", id="out_k-smaller-than-K"),
    pytest.param(_out_k_is_the_source, "out_k and k_src", id="out_k-is-the-source"),
    pytest.param(lambda a: a.update(out_v=a["out_k"]), "out_k and out_v", id="out_v-is-out_k"),
    pytest.param(lambda a: a.update(out_token_data=[]), "out_token_data", id="out_token_data-missing"),
    pytest.param(lambda a: a.update(out_token_sums=[a["out_k"][:, :, :, 0].float()]), "out_token_sums",
                 id="out_token_sums-wrong-shape"),
]
OUT_OF_PLACE_WRONG_DTYPE = [
    pytest.param(lambda a: a.update(out_v=a["out_v"].half()), "out_v", id="out_v-wrong-dtype"),
]


@pytest.mark.parametrize("mutate,name,exc", _with_exc(OUT_OF_PLACE_INVALID, ValueError)
                         + _with_exc(OUT_OF_PLACE_WRONG_DTYPE, TypeError))
def test_out_of_place_invalid_raises_and_changes_nothing(mutate, name, exc):
    case = make_case(1, 2, 40, 64, [40, 31], 10, "random", torch.float32, seed=4)
    data, sums = metadata(1, 2, 40)
    args = dict(case, out_k=torch.zeros(1, 2, 12, 64, device=DEVICE), out_v=torch.zeros(1, 2, 12, 64, device=DEVICE),
                out_token_data=[torch.zeros(1, 2, 12, dtype=data[0].dtype, device=DEVICE)],
                out_token_sums=[torch.zeros(1, 2, 12, device=DEVICE)])
    mutate(args)
    tensors = [x for x in [args[n] for n in ("k", "v", "lengths", "keep", "out_k", "out_v")] + data[:1] + sums[:1]
               + list(args["out_token_data"]) + list(args["out_token_sums"])]
    before = [x.clone() for x in tensors]
    with pytest.raises(exc, match=rf"^(\S+ and )?{name}(?!\w)"):
        compact_kv(args["k"], args["v"], args["lengths"], args["keep"], args["keep_lengths"], out_k=args["out_k"],
                   out_v=args["out_v"], token_data=data[:1], token_sums=sums[:1],
                   out_token_data=args["out_token_data"], out_token_sums=args["out_token_sums"])
    for x, snapshot in zip(tensors, before):
        assert same_bits(x, snapshot)


# ------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: races between programs only show there")
@pytest.mark.parametrize("merge", [pytest.param(None, id="gather"), pytest.param("random", id="merge")])
@pytest.mark.parametrize("kind", ["tail", "random", "strided"])
def test_gpu_race_stress(kind, merge):
    """Large B*Hkv, plans that shift most tokens, many runs: in place must equal out of place bit for bit."""
    B, Hkv, C, D, K = 16, 32, 1024, 128, 400
    case = make_case(B, Hkv, C, D, [C] * (B * Hkv), K, kind, torch.bfloat16, merge=merge, seed=0)
    out_k = torch.empty(B, Hkv, K, D, dtype=torch.bfloat16, device=DEVICE)
    out_v = torch.empty_like(out_k)
    compact_kv(case["k"], case["v"], case["lengths"], case["keep"], case["keep_lengths"], out_k=out_k, out_v=out_v,
               merge_target=case["merge_target"], merge_weight=case["merge_weight"])
    n = case["keep_lengths"]
    if merge is None:  # the out-of-place result is itself checked against a torch gather
        idx = case["keep"].long().clamp(0, C - 1)[..., None].expand(B, Hkv, K, D)
        assert torch.equal(valid_slots(out_k, n), valid_slots(case["k"].gather(2, idx), n))
    for _ in range(20):
        k, v, lengths = case["k"].clone(), case["v"].clone(), case["lengths"].clone()
        compact_kv_(k, v, lengths, case["keep"], case["keep_lengths"], merge_target=case["merge_target"],
                    merge_weight=case["merge_weight"], check_plan=False)
        assert torch.equal(valid_slots(k[:, :, :K], n).view(torch.int16), valid_slots(out_k, n).view(torch.int16))
        assert torch.equal(valid_slots(v[:, :, :K], n).view(torch.int16), valid_slots(out_v, n).view(torch.int16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a cache beyond 2^31 elements")
def test_gpu_offsets_beyond_int32():
    """Rows whose element offsets pass 2^31 (4 GiB per fp16 tensor) are addressed in int64."""
    B, Hkv, C, D, K = 1, 2, 2**23, 128, 64
    if torch.cuda.mem_get_info()[0] < 10 * 2**30:
        pytest.skip("needs 10 GiB of free GPU memory")
    k = torch.randn(B, Hkv, C, D, dtype=torch.float16, device=DEVICE)
    v = torch.randn_like(k)
    lengths = torch.full((B, Hkv), C, dtype=torch.int32, device=DEVICE)
    keep = torch.arange(C - K, C, dtype=torch.int32, device=DEVICE).expand(B, Hkv, K).contiguous()
    keep_lengths = torch.full((B, Hkv), K, dtype=torch.int32, device=DEVICE)
    want_k, want_v = k[:, :, C - K:].clone(), v[:, :, C - K:].clone()
    compact_kv_(k, v, lengths, keep, keep_lengths)
    assert torch.equal(k[:, :, :K], want_k) and torch.equal(v[:, :, :K], want_v)
