"""observed_attention (kernels) and its torch twin against reference.observed_attention: causal GQA prefill with the
mass every key receives from every query; odd and ragged sizes, left padding longer than a block, NaN in every padded
key and value, NaN-poisoned outputs, strided views, fp32 / fp16 / bf16."""
from __future__ import annotations

import pytest
import torch

from acckv_triton import reference, torch_ops
from acckv_triton.ops.observed_attention import observed_attention
from tests.conftest import DEVICE

TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}  # out, q's dtype
LSE_TOL = (1e-4, 1e-5)
MASS_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 1e-4), torch.bfloat16: (1e-4, 1e-4)}
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in TOL]

SHAPES = [
    pytest.param(dict(B=1, Hq=7, Hkv=1, T=1, D=64), id="T1-G7"),
    pytest.param(dict(B=2, Hq=2, Hkv=2, T=2, D=128, pad=(2, 1)), id="T2-G1-D128-one-row-all-padding"),
    pytest.param(dict(B=2, Hq=3, Hkv=1, T=63, D=64, pad=(0, 5)), id="T63-G3-pad"),
    pytest.param(dict(B=2, Hq=7, Hkv=1, T=130, D=128, pad=(3, 70)), id="T130-G7-D128-pad-longer-than-a-block"),
    pytest.param(dict(B=1, Hq=2, Hkv=2, T=130, D=64), id="T130-G1"),
]


def case(B, Hq, Hkv, T, D, dtype, pad=None, seed=0):
    """Fresh random q, k, v; NaN in the padded keys and values (they may hold anything); key_start or None."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, k, v = rnd(B, Hq, T, D), rnd(B, Hkv, T, D), rnd(B, Hkv, T, D)
    key_start = None
    if pad is not None:
        key_start = torch.tensor(pad, dtype=torch.int32)
        padded = torch.arange(T)[None, :] < key_start.long()[:, None]  # [B, T]
        k[padded[:, None].expand(B, Hkv, T)] = float("nan")
        v[padded[:, None].expand(B, Hkv, T)] = float("nan")
        key_start = key_start.to(DEVICE)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), key_start


def assert_matches(got, want, dtype, *, with_out: bool = True):
    seen = torch.isfinite(want.lse)
    assert torch.equal(torch.isfinite(got.lse), seen)
    torch.testing.assert_close(got.lse[seen], want.lse[seen], atol=LSE_TOL[0], rtol=LSE_TOL[1])
    torch.testing.assert_close(got.key_mass, want.key_mass, atol=MASS_TOL[dtype][0], rtol=MASS_TOL[dtype][1])
    if with_out:
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got.out.float(), want.out.float(), atol=atol, rtol=rtol)
        assert torch.all(got.out[~seen] == 0), "a row that sees no key must give 0"
    else:
        assert got.out is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_the_reference(shape, dtype, poison_empty):
    q, k, v, key_start = case(**shape, dtype=dtype)
    got = observed_attention(q, k, v, key_start=key_start)
    assert got.out.dtype == dtype and got.out.shape == q.shape
    assert_matches(got, reference.observed_attention(q, k, v, key_start=key_start), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_without_values_returns_lse_and_mass_only(dtype, poison_empty):
    q, k, _, key_start = case(B=2, Hq=3, Hkv=1, T=63, D=64, pad=(9, 0), dtype=dtype, seed=1)
    got = observed_attention(q, k, key_start=key_start)
    assert_matches(got, reference.observed_attention(q, k, key_start=key_start), dtype, with_out=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_twin_matches_the_reference(shape, dtype):
    q, k, v, key_start = case(**shape, dtype=dtype)
    want = reference.observed_attention(q, k, v, key_start=key_start)
    assert_matches(torch_ops.observed_attention(q, k, v, key_start=key_start, block=16), want, dtype)
    assert_matches(torch_ops.observed_attention(q, k, key_start=key_start, block=7), want, dtype, with_out=False)
    fast = torch_ops.observed_attention(q, k, v, key_start=key_start, return_lse=False)  # the prompt paths' call
    assert fast.lse is None
    full = torch_ops.observed_attention(q, k, v, key_start=key_start)
    assert torch.equal(fast.out, full.out) and torch.equal(fast.key_mass, full.key_mass)


def test_strided_views_and_out_written_in_place():
    """transformers' layout: q a transposed [B, T, Hq, D] view, k and v views into larger buffers, out a transposed
    [B, T, Hq, D] buffer poisoned with NaN; key_start int64."""
    dtype, (B, Hq, Hkv, T, D) = torch.float16, (2, 6, 2, 37, 64)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    kv = torch.randn(B, T + 4, 2 * Hkv, D, generator=g).to(dtype).to(DEVICE).transpose(1, 2)  # [B, 2Hkv, T+4, D]
    k, v = kv[:, :Hkv, 4:], kv[:, Hkv:, 4:]
    key_start = torch.tensor([0, 11], dtype=torch.int64, device=DEVICE)
    k[1, :, :11], v[1, :, :11] = float("nan"), float("inf")
    out = torch.full((B, T, Hq, D), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    want = reference.observed_attention(q, k, v, key_start=key_start)
    got = observed_attention(q, k, v, key_start=key_start, out=out)
    assert got.out.data_ptr() == out.data_ptr() and got.out.stride() == out.stride()
    assert_matches(got, want, dtype)
    out.fill_(float("nan"))  # the torch twin writes the same buffer (the prompt path's call on the CPU)
    twin = torch_ops.observed_attention(q, k, v, key_start=key_start, return_lse=False, out=out)
    assert twin.out.data_ptr() == out.data_ptr() and twin.out.stride() == out.stride() and twin.lse is None
    torch.testing.assert_close(twin.out.float(), want.out.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])
    torch.testing.assert_close(twin.key_mass, want.key_mass, atol=MASS_TOL[dtype][0], rtol=MASS_TOL[dtype][1])
    assert torch.all(twin.out[1, :, :11] == 0)  # padded queries see no key
    with pytest.raises(ValueError, match="out must have shape"):  # the launcher's check
        torch_ops.observed_attention(q, k, v, out=out[:, :, 1:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_twin_out_with_every_row_padded_and_decay(dtype):
    """The twin's ``out=`` when no row starts at 0 (its first rows skipped and zeroed) and queries are decayed: the
    poisoned buffer is fully written, equal to the reference; a wrong dtype or no values is refused."""
    B, Hq, Hkv, T, D = 2, 8, 2, 45, 32
    q, k, v, _ = case(B=B, Hq=Hq, Hkv=Hkv, T=T, D=D, pad=None, dtype=dtype, seed=5)
    key_start = torch.tensor([6, 19], dtype=torch.int32, device=DEVICE)
    want = reference.observed_attention(q, k, v, key_start=key_start, decay=0.9)
    out = torch.full((B, T, Hq, D), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    got = torch_ops.observed_attention(q, k, v, key_start=key_start, decay=0.9, block=8, out=out)
    assert got.out.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    assert_matches(got, want, dtype)
    for bad, exc, match in ((dict(out=out.float() if dtype != torch.float32 else out.half()), TypeError,
                             "out must have dtype"),  # the launcher's checks: a wrong dtype is a TypeError
                            (dict(v=None, out=out), ValueError, "out was given without v")):
        with pytest.raises(exc, match=match):
            torch_ops.observed_attention(q, k, **{"v": v, **bad}, key_start=key_start)


def test_key_mass_conserves_one_per_seeing_query():
    """Each query that sees a key spreads probability 1 over what it sees: key_mass sums to G x (T - key_start[b])
    per (b, kv head), in the reference and in the kernel."""
    B, Hq, Hkv, T, D = 2, 6, 2, 40, 64
    q, k, v, key_start = case(B=B, Hq=Hq, Hkv=Hkv, T=T, D=D, pad=(0, 17), dtype=torch.float32, seed=3)
    want = (Hq // Hkv) * (T - key_start.double())[:, None].expand(B, Hkv)
    for res in (reference.observed_attention(q, k, v, key_start=key_start),
                observed_attention(q, k, key_start=key_start)):
        torch.testing.assert_close(res.key_mass.double().sum(-1), want, atol=1e-4, rtol=1e-6)
        assert torch.all(res.key_mass[1, :, :17] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [pytest.param(0.9, id="decay0.9"), pytest.param(0.5, id="decay0.5-steep")])
def test_recency_weighted_key_mass(dtype, decay, poison_empty):
    """decay < 1: query i weighs decay^(T-1-i) in key_mass (kernel and twin against the reference, padding longer
    than a block); the output and lse are unchanged; the weighted masses sum to G x the weights of the queries that
    see something."""
    q, k, v, key_start = case(B=2, Hq=7, Hkv=1, T=130, D=64, pad=(3, 70), dtype=dtype, seed=4)
    want = reference.observed_attention(q, k, v, key_start=key_start, decay=decay)
    plain = reference.observed_attention(q, k, v, key_start=key_start)
    assert torch.equal(want.out, plain.out) and not torch.allclose(want.key_mass, plain.key_mass)
    assert_matches(observed_attention(q, k, v, key_start=key_start, decay=decay), want, dtype)
    assert_matches(torch_ops.observed_attention(q, k, v, key_start=key_start, decay=decay, block=16), want, dtype)
    weights = reference.query_weights(130, decay)
    seeing = torch.stack([weights[int(s):].sum() for s in key_start.cpu()])  # [B]
    torch.testing.assert_close(want.key_mass.double().sum(-1)[:, 0].cpu(), 7 * seeing, atol=1e-4, rtol=1e-6)


def test_bad_arguments_name_what_was_expected():
    q, k, v, key_start = case(B=2, Hq=4, Hkv=2, T=5, D=64, pad=(0, 1), dtype=torch.float32)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        observed_attention(q.tolist(), k)
    with pytest.raises(TypeError, match="q must have dtype"):
        observed_attention(q.double(), k)
    with pytest.raises(TypeError, match="k must have dtype float32"):
        observed_attention(q, k.half())
    with pytest.raises(ValueError, match="k must have shape"):
        observed_attention(q, k[:, :, :3])
    with pytest.raises(ValueError, match="v must have shape"):
        observed_attention(q, k, v[..., :32])
    with pytest.raises(ValueError, match="multiple of Hkv"):
        observed_attention(q[:, :3], k)
    with pytest.raises(ValueError, match="q must be contiguous in its last dim"):
        observed_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k)
    with pytest.raises(ValueError, match="v must be contiguous in its last dim"):
        observed_attention(q, k, v.transpose(-1, -2).contiguous().transpose(-1, -2))
    with pytest.raises(ValueError, match="out was given without v"):
        observed_attention(q, k, out=torch.empty_like(q))
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"decay must be a float in \(0, 1\]"):
            observed_attention(q, k, decay=bad)
    with pytest.raises(TypeError, match=r"decay must be a float in \(0, 1\]"):  # a bool is not a number here
        observed_attention(q, k, decay=True)
    with pytest.raises(TypeError, match="out must have dtype float32"):
        observed_attention(q, k, v, out=torch.empty_like(q, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must have shape"):
        observed_attention(q, k, v, out=q[:, :, :2])
    with pytest.raises(ValueError, match="key_start must lie in"):
        observed_attention(q, k, key_start=torch.tensor([0, 6], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="key_start must have shape"):
        observed_attention(q, k, key_start=key_start[:1])
    with pytest.raises(TypeError, match="key_start must have dtype"):
        observed_attention(q, k, key_start=key_start.float())
    with pytest.raises(ValueError, match="scale must be a finite float"):
        observed_attention(q, k, scale=float("nan"))
