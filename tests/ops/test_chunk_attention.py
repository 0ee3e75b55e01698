"""chunk_attention (kernel) and its torch twin against reference.chunk_attention: ragged stored rows, merged slots,
left padding, NaN in every slot nobody may read, NaN-poisoned outputs, fp32 / fp16 / bf16."""
from __future__ import annotations

import pytest
import torch

from acckv_triton import reference, torch_ops
from acckv_triton.ops.chunk_attention import chunk_attention
from tests.conftest import DEVICE

TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
MASS_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in TOL]


def case(B, Hq, Hkv, S, T, D, dtype, lengths, pad=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, kc, vc, kn, vn = rnd(B, Hq, T, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D), rnd(B, Hkv, T, D), rnd(B, Hkv, T, D)
    lengths = torch.tensor(lengths, dtype=torch.int32).view(B, Hkv)
    past = torch.arange(S) >= lengths[..., None].long()
    kc[past], vc[past] = float("nan"), float("nan")  # leftover memory past each length
    mult = torch.where(past, float("nan"), torch.randint(1, 5, (B, Hkv, S), generator=g).float())
    key_valid = torch.ones(B, T, dtype=torch.bool)
    for b, n in enumerate(pad):
        key_valid[b, :n] = False
    kn[~key_valid[:, None].expand(B, Hkv, T)] = float("nan")  # padding keys hold anything
    vn[~key_valid[:, None].expand(B, Hkv, T)] = float("nan")
    to = lambda x: x.to(DEVICE)  # noqa: E731
    return [to(x) for x in (q, kc, vc, lengths, kn, vn)], dict(multiplicity=to(mult), key_valid=to(key_valid))


SHAPES = [
    pytest.param(dict(B=2, Hq=6, Hkv=2, S=37, T=19, D=64, lengths=[37, 20, 5, 0], pad=(0, 4)), id="ragged-pad-G3"),
    pytest.param(dict(B=1, Hq=7, Hkv=1, S=63, T=1, D=64, lengths=[63]), id="one-query-G7"),
    pytest.param(dict(B=1, Hq=2, Hkv=2, S=0, T=33, D=128, lengths=[0, 0]), id="empty-cache-G1"),
    pytest.param(dict(B=1, Hq=4, Hkv=2, S=70, T=65, D=128, lengths=[70, 1]), id="long-chunk"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("proportional", [True, False], ids=["multiplicity", "plain"])
def test_kernel_and_torch_twin_match_the_reference(shape, dtype, proportional):
    shape = dict(shape)
    args, opts = case(**shape, dtype=dtype)
    if not proportional:
        opts["multiplicity"] = None
    want = reference.chunk_attention(*args, **opts, window=8)
    B, Hq, T, D = args[0].shape
    out = torch.full((B, T, Hq, D), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    got = chunk_attention(*args, **opts, window=8, out=out)
    twin = torch_ops.chunk_attention(*args, **opts, window=8, block=16)
    atol, rtol = TOL[dtype]
    for res in (got, twin):
        torch.testing.assert_close(res.out.float(), want.out.float(), atol=atol, rtol=rtol)
        seen = torch.isfinite(want.lse)
        assert torch.equal(torch.isfinite(res.lse), seen)
        torch.testing.assert_close(res.lse[seen], want.lse[seen], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(res.stored_mass, want.stored_mass, atol=MASS_TOL[dtype], rtol=1e-4)
        torch.testing.assert_close(res.chunk_mass, want.chunk_mass, atol=MASS_TOL[dtype], rtol=1e-4)
    assert got.out.data_ptr() == out.data_ptr()
    # each window row's mass sums to 1 over what it sees: G * W in all per (b, kv head) with a visible key
    W = min(8, T)
    total = want.stored_mass.sum(-1) + want.chunk_mass.sum(-1)
    rows_seen = seen[..., T - W:].view(B, -1, Hq // args[1].shape[1], W).sum(dim=(2, 3)).float()
    torch.testing.assert_close(total, rows_seen.double().float(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_max_reduction_matches_the_reference(shape, dtype):
    """reduce="max" (a reconstruction pass's evidence): each key's largest probability over the window's rows."""
    args, opts = case(**dict(shape), dtype=dtype, seed=1)
    want = reference.chunk_attention(*args, **opts, window=5, reduce="max")
    total = reference.chunk_attention(*args, **opts, window=5)
    for res in (chunk_attention(*args, **opts, window=5, reduce="max"),
                torch_ops.chunk_attention(*args, **opts, window=5, reduce="max", block=4)):
        torch.testing.assert_close(res.stored_mass, want.stored_mass, atol=MASS_TOL[dtype], rtol=1e-4)
        torch.testing.assert_close(res.chunk_mass, want.chunk_mass, atol=MASS_TOL[dtype], rtol=1e-4)
    # a max of probabilities: in [0, 1], at most the sum, and equal to it when one row sees the key (G = 1, W = 1)
    for m, s in ((want.stored_mass, total.stored_mass), (want.chunk_mass, total.chunk_mass)):
        assert bool((m >= 0).all() and (m <= 1 + 1e-6).all() and (m <= s + 1e-6).all())
    if args[0].shape[1] == args[1].shape[1]:
        one_max = reference.chunk_attention(*args, **opts, window=1, reduce="max")
        one_sum = reference.chunk_attention(*args, **opts, window=1)
        torch.testing.assert_close(one_max.stored_mass, one_sum.stored_mass)
        torch.testing.assert_close(one_max.chunk_mass, one_sum.chunk_mass)
    if args[0].shape[2] > 1:  # a key the window sees: its max is positive
        assert bool((want.chunk_mass[..., -1] > 0).any())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[::3])
def test_recency_weighted_masses(shape, dtype):
    """decay < 1: window query i weighs decay^(T-1-i) in both masses (kernel and twin against the reference); the
    output is unchanged; each weighted row of the window adds its weight to the total."""
    args, opts = case(**dict(shape), dtype=dtype, seed=2)
    T = args[0].shape[2]
    want = reference.chunk_attention(*args, **opts, window=T, decay=0.8)
    assert torch.equal(want.out, reference.chunk_attention(*args, **opts, window=T).out)
    for res in (chunk_attention(*args, **opts, window=T, decay=0.8),
                torch_ops.chunk_attention(*args, **opts, window=T, decay=0.8, block=16)):
        torch.testing.assert_close(res.stored_mass, want.stored_mass, atol=MASS_TOL[dtype], rtol=1e-4)
        torch.testing.assert_close(res.chunk_mass, want.chunk_mass, atol=MASS_TOL[dtype], rtol=1e-4)
    B, Hq = args[0].shape[:2]
    Hkv = args[1].shape[1]
    seen = torch.isfinite(want.lse).double().cpu() * reference.query_weights(T, 0.8)  # [B, Hq, T]
    total = (want.stored_mass.sum(-1) + want.chunk_mass.sum(-1)).double().cpu()
    torch.testing.assert_close(total, seen.view(B, Hkv, -1).sum(-1), atol=1e-4, rtol=1e-5)


def test_bad_arguments_name_what_was_expected():
    args, opts = case(B=1, Hq=4, Hkv=2, S=10, T=5, D=64, dtype=torch.float32, lengths=[10, 3])
    q, kc, vc, lengths, kn, vn = args
    with pytest.raises(TypeError, match="k_cache must have dtype float32"):
        chunk_attention(q, kc.half(), vc, lengths, kn, vn)
    with pytest.raises(ValueError, match="k_new must have shape"):
        chunk_attention(q, kc, vc, lengths, kn[:, :, :3], vn)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        chunk_attention(q[:, :3], kc, vc, lengths, kn, vn)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        chunk_attention(q, kc, vc, lengths, kn, vn, window=0)
    with pytest.raises(ValueError, match="reduce must be 'sum' or 'max'"):
        chunk_attention(q, kc, vc, lengths, kn, vn, reduce="mean")
    with pytest.raises(ValueError, match=r"decay must be a float in \(0, 1\]"):
        chunk_attention(q, kc, vc, lengths, kn, vn, decay=0.0)
    with pytest.raises(ValueError, match="reduce='max' takes decay=1"):
        chunk_attention(q, kc, vc, lengths, kn, vn, reduce="max", decay=0.5)
    with pytest.raises(TypeError, match="key_valid must have dtype bool"):
        chunk_attention(q, kc, vc, lengths, kn, vn, key_valid=opts["key_valid"].int())
    out = torch.zeros(1, 4, 64, 5, device=q.device).transpose(2, 3)  # [B, Hq, T, D] with a strided last dim
    with pytest.raises(ValueError, match="out must be contiguous in its last dim"):  # (it was written as if it were)
        chunk_attention(q, kc, vc, lengths, kn, vn, out=out)
    assert torch.equal(out, torch.zeros_like(out))
