"""decode_attention against its float64 reference: outputs, lse, per-modality mass and in-place token mass."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import acckv_triton as ak
from acckv_triton import reference
from tests.conftest import DEVICE, DTYPES, TOL

MASS_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 1e-4), torch.bfloat16: (1e-4, 1e-4)}
# A 16-bit cache's token mass goes through fp16 logits relative to their tile's max (x <= 0): a probability's
# relative error is ln 2 * (half an fp16 ulp of x), at most about 7e-4 of p where p is largest (x in [-2, 0)),
# summed over the G heads of a group. Measured on peaked random inputs (G 7, 300 slots): at most 1.1e-4 absolute.
TOKEN_MASS_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-4, 1e-3), torch.bfloat16: (3e-4, 1e-3)}


def make_inputs(B, Hq, Hkv, C, D, lengths, dtype, *, seed=0, modality=True, token_mass=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    lengths = torch.as_tensor(lengths, dtype=torch.int32).reshape(B, Hkv)
    mod = torch.randint(0, ak.NUM_MODALITIES, (B, Hkv, C), generator=g, dtype=torch.uint8) if modality else None
    mass = None
    if token_mass:
        mass = torch.rand(B, Hkv, C, generator=g)
        beyond = torch.arange(C) >= lengths[..., None]
        mass[beyond] = float("nan")  # must stay untouched (NaN) past each length
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return to(q), to(k), to(v), to(lengths), to(mod), to(mass)


def check_against_reference(q, k, v, lengths, mod, mass, *, scale=None, num_splits=None, multiplicity=None,
                            decay=1.0):
    dtype = q.dtype
    ref_mass = None if mass is None else mass.clone()
    got = ak.decode_attention(q, k, v, lengths, scale=scale, modality=mod, token_mass=mass, num_splits=num_splits,
                              multiplicity=multiplicity, decay=decay)
    want = reference.decode_attention(q, k, v, lengths, scale=scale, modality=mod, token_mass=ref_mass,
                                      multiplicity=multiplicity, decay=decay)

    atol, rtol = TOL[dtype]
    matol, mrtol = MASS_TOL[dtype]
    assert got.out.dtype == dtype and got.out.shape == q.shape
    torch.testing.assert_close(got.out.float(), want.out.float(), atol=atol, rtol=rtol)
    empty = (lengths == 0).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    assert torch.all(got.out[empty] == 0)
    assert torch.all(got.lse[empty] == float("-inf"))
    torch.testing.assert_close(got.lse[~empty], want.lse[~empty], atol=matol, rtol=mrtol)
    if mod is None:
        assert got.modality_mass is None
    else:
        torch.testing.assert_close(got.modality_mass, want.modality_mass, atol=matol, rtol=mrtol)
        assert torch.all(got.modality_mass[empty] == 0)
    if mass is not None:
        # equal_nan: entries past each length were NaN and must still be NaN (untouched)
        tatol, trtol = TOKEN_MASS_TOL[dtype]
        torch.testing.assert_close(mass, ref_mass, atol=tatol, rtol=trtol, equal_nan=True)
        beyond = torch.arange(k.shape[2], device=k.device) >= lengths[..., None]
        assert torch.all(mass[beyond].isnan()) and not torch.any(mass[~beyond].isnan())
    return got


CASES = [
    # B, Hq, Hkv, C, D, lengths
    pytest.param(1, 2, 2, 8, 64, [1, 1], id="len1-D64-G1"),
    pytest.param(2, 4, 2, 63, 128, [63, 63, 63, 63], id="len63-D128-G2"),
    pytest.param(1, 8, 2, 257, 64, [257, 257], id="len257-D64-G4"),
    pytest.param(3, 14, 2, 300, 128, [257, 1, 0, 63, 300, 129], id="ragged-D128-G7-with-empty"),
    pytest.param(1, 7, 1, 90, 64, [90], id="mqa-G7-D64"),
    pytest.param(2, 12, 4, 40, 80, [40, 17, 0, 33, 5, 1, 40, 39], id="ragged-D80-G3"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,C,D,lengths", CASES)
def test_matches_reference(B, Hq, Hkv, C, D, lengths, dtype, poison_empty):
    check_against_reference(*make_inputs(B, Hq, Hkv, C, D, lengths, dtype))


@pytest.mark.parametrize("num_splits", [pytest.param(1, id="1split"), pytest.param(3, id="3splits"),
                                        pytest.param(16, id="16splits-more-than-tiles")])
def test_split_count_does_not_change_result(num_splits, poison_empty):
    inputs = make_inputs(2, 8, 2, 200, 64, [200, 7, 150, 0], torch.float32, seed=3)
    check_against_reference(*inputs, num_splits=num_splits)


@pytest.mark.parametrize("with_modality,with_mass", [
    pytest.param(False, False, id="attention-only"),
    pytest.param(True, False, id="modality-only"),
    pytest.param(False, True, id="token-mass-only"),
])
def test_optional_outputs(with_modality, with_mass, poison_empty):
    inputs = make_inputs(2, 4, 2, 70, 64, [70, 3, 0, 41], torch.float16, seed=5, modality=with_modality,
                         token_mass=with_mass)
    check_against_reference(*inputs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multiplicity_weighs_merged_slots(dtype, poison_empty):
    """Proportional attention: a slot of multiplicity n weighs like n identical tokens."""
    q, k, v, lengths, mod, mass = make_inputs(2, 8, 2, 90, 64, [90, 33, 0, 61], dtype, seed=41)
    g = torch.Generator().manual_seed(42)
    mult = (1.0 + torch.randint(0, 4, (2, 2, 90), generator=g).float()).to(DEVICE)
    check_against_reference(q, k, v, lengths, mod, mass, multiplicity=mult)
    # n copies of a token and one slot of multiplicity n give the same attention
    k1, v1 = k[:1, :1, :3], v[:1, :1, :3]
    dup_k, dup_v = torch.cat([k1, k1[:, :, 2:].expand(-1, -1, 3, -1)], 2), torch.cat([v1, v1[:, :, 2:].expand(-1, -1, 3, -1)], 2)
    one = torch.tensor([[[1.0, 1.0, 4.0]]], device=DEVICE)
    a = ak.decode_attention(q[:1, :4], k1.contiguous(), v1.contiguous(), torch.full((1, 1), 3, dtype=torch.int32,
                            device=DEVICE), multiplicity=one)
    b = ak.decode_attention(q[:1, :4], dup_k.contiguous(), dup_v.contiguous(),
                            torch.full((1, 1), 6, dtype=torch.int32, device=DEVICE))
    torch.testing.assert_close(a.out.float(), b.out.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])
    torch.testing.assert_close(a.lse, b.lse, atol=1e-4, rtol=1e-4)


def test_custom_scale(poison_empty):
    check_against_reference(*make_inputs(1, 4, 1, 50, 64, [50], torch.float32, seed=7), scale=0.37)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decayed_token_mass(dtype, poison_empty):
    """decay < 1: token_mass = decay * token_mass + the step's group sum inside each row, NaN past it untouched."""
    inputs = make_inputs(3, 14, 2, 300, 128, [257, 1, 0, 63, 300, 129], dtype, seed=5)
    before = inputs[-1].clone()
    check_against_reference(*inputs, decay=0.75)
    stored = ~before.isnan()
    assert bool((inputs[-1][stored] < before[stored] * 0.75 + 7.0 + 1e-3).all())  # a group adds at most G = 7


def test_consecutive_steps_accumulate_token_mass(poison_empty):
    """Three decode steps: the cache grows by one token per step and token_mass keeps accumulating."""
    B, Hq, Hkv, C, D = 2, 8, 2, 80, 64
    q, k, v, lengths, mod, mass = make_inputs(B, Hq, Hkv, C, D, [60, 1, 30, 0], torch.bfloat16, seed=11)
    ref_mass = mass.clone()
    g = torch.Generator().manual_seed(12)
    for step in range(3):
        q = torch.randn(B, Hq, D, generator=g).to(q.dtype).to(DEVICE)
        got = ak.decode_attention(q, k, v, lengths, modality=mod, token_mass=mass)
        want = reference.decode_attention(q, k, v, lengths, modality=mod, token_mass=ref_mass)
        torch.testing.assert_close(got.out.float(), want.out.float(), atol=TOL[q.dtype][0], rtol=TOL[q.dtype][1])
        torch.testing.assert_close(mass, ref_mass, atol=TOKEN_MASS_TOL[q.dtype][0], rtol=TOKEN_MASS_TOL[q.dtype][1],
                                   equal_nan=True)
        ref_mass[torch.arange(B)[:, None], torch.arange(Hkv)[None, :], lengths.long().cpu()] = 0.0
        mass[torch.arange(B)[:, None], torch.arange(Hkv)[None, :], lengths.long()] = 0.0
        lengths += 1  # append one token per (b, h)
    # total mass per (b, h) over the steps equals G per step where the head is non-empty
    done = torch.nan_to_num(mass, nan=0.0).sum(-1)
    assert torch.all(done > 0)


def test_strided_views(poison_empty):
    """Caches that are views (capacity slice, transposed head/batch) and a non-contiguous q are read correctly."""
    B, Hq, Hkv, C, D = 2, 6, 3, 50, 64
    g = torch.Generator().manual_seed(21)
    big_k = torch.randn(Hkv, B, C + 9, D, generator=g).to(DEVICE)
    big_v = torch.randn(Hkv, B, C + 9, D, generator=g).to(DEVICE)
    k, v = big_k.transpose(0, 1)[:, :, 4:C + 4], big_v.transpose(0, 1)[:, :, 4:C + 4]
    q = torch.randn(Hq, B, D, generator=g).to(DEVICE).transpose(0, 1)
    lengths = torch.tensor([[50, 1, 25], [0, 49, 13]], dtype=torch.int32, device=DEVICE).t().contiguous().t()
    mod = torch.randint(0, 4, (B, Hkv, C + 1), generator=g, dtype=torch.uint8).to(DEVICE)[:, :, 1:]
    mass = torch.rand(B, Hkv, 2 * C, generator=g).to(DEVICE)[:, :, ::2]
    mass[torch.arange(C, device=DEVICE) >= lengths[..., None]] = float("nan")
    assert not k.is_contiguous() and not q.is_contiguous() and not mass.is_contiguous()
    check_against_reference(q, k, v, lengths, mod, mass)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    G=st.integers(1, 8), Hkv=st.integers(1, 3), B=st.integers(1, 2), C=st.integers(1, 96),
    D=st.sampled_from([16, 48, 64]), seed=st.integers(0, 2**16), data=st.data(),
)
def test_property_random_shapes(G, Hkv, B, C, D, seed, data):
    lengths = data.draw(st.lists(st.integers(0, C), min_size=B * Hkv, max_size=B * Hkv))
    check_against_reference(*make_inputs(B, G * Hkv, Hkv, C, D, lengths, torch.float32, seed=seed))


def test_slots_past_lengths_never_matter(poison_empty):
    """Kernel and reference read nothing past each length: NaN/inf K/V and unknown modality ids there are ignored."""
    q, k, v, lengths, mod, mass = make_inputs(2, 4, 2, 40, 64, [40, 17, 0, 33], torch.float32, seed=5)
    beyond = torch.arange(40, device=DEVICE) >= lengths[..., None]
    k2, v2, mod2 = k.clone(), v.clone(), mod.clone()
    k2[beyond], v2[beyond], mod2[beyond] = float("inf"), float("nan"), 250
    want = reference.decode_attention(q, k, v, lengths, modality=mod)
    got_ref = reference.decode_attention(q, k2, v2, lengths, modality=mod2)
    got = ak.decode_attention(q, k2, v2, lengths, modality=mod2)
    for res in (got_ref, got):
        torch.testing.assert_close(res.out, want.out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.lse, want.lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.modality_mass, want.modality_mass, atol=1e-5, rtol=1e-5)


def test_empty_cache_capacity_zero():
    q = torch.randn(1, 2, 64, device=DEVICE)
    k = torch.empty(1, 1, 0, 64, device=DEVICE)
    mass = torch.empty(1, 1, 0, device=DEVICE)
    res = ak.decode_attention(q, k, k, torch.zeros(1, 1, dtype=torch.int32, device=DEVICE), token_mass=mass)
    assert torch.all(res.out == 0) and torch.all(res.lse == float("-inf"))


# ---------------------------------------------------------------------------------------------------------- errors
def _good():
    return dict(zip(("q", "k_cache", "v_cache", "lengths", "modality", "token_mass"),
                    make_inputs(2, 4, 2, 16, 64, [16, 3, 0, 9], torch.float16)))


def _call(args, **extra):
    a = {**args, **extra}
    return ak.decode_attention(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("lengths"), **a)


BAD = [
    pytest.param(lambda a: {"q": a["q"].float()}, TypeError, "k_cache must have dtype float32", id="kv-dtype-mismatch"),
    pytest.param(lambda a: {"q": a["q"].long()}, TypeError, "q must have dtype", id="q-int-dtype"),
    pytest.param(lambda a: {"q": a["q"][0]}, ValueError, "q must have rank 3", id="q-rank"),
    pytest.param(lambda a: {"q": [1.0]}, TypeError, "q must be a torch.Tensor", id="q-not-tensor"),
    pytest.param(lambda a: {"k_cache": a["k_cache"][:, :, :, :32]}, ValueError, "k_cache must have shape",
                 id="k-head-dim"),
    pytest.param(lambda a: {"v_cache": a["v_cache"][:, :, :8]}, ValueError, "v_cache must have shape",
                 id="v-capacity"),
    pytest.param(lambda a: {"q": a["q"][:, :3]}, ValueError, "multiple of Hkv", id="heads-not-divisible"),
    pytest.param(lambda a: {"k_cache": a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)}, ValueError,
                 "k_cache must be contiguous in its last dim", id="k-last-dim-stride"),
    pytest.param(lambda a: {"lengths": a["lengths"].long()}, TypeError, "lengths must have dtype int32",
                 id="lengths-dtype"),
    pytest.param(lambda a: {"lengths": a["lengths"][:1]}, ValueError, "lengths must have shape", id="lengths-shape"),
    pytest.param(lambda a: {"lengths": a["lengths"] + 8}, ValueError, "lengths must lie in [0, C=16]",
                 id="lengths-beyond-capacity"),
    pytest.param(lambda a: {"lengths": a["lengths"] - 1}, ValueError, "lengths must lie in", id="lengths-negative"),
    pytest.param(lambda a: {"modality": a["modality"].int()}, TypeError, "modality must have dtype uint8",
                 id="modality-dtype"),
    pytest.param(lambda a: {"modality": a["modality"][:, :, :5]}, ValueError, "modality must have shape",
                 id="modality-shape"),
    pytest.param(lambda a: {"token_mass": a["token_mass"].double()}, TypeError, "token_mass must have dtype float32",
                 id="token-mass-dtype"),
    pytest.param(lambda a: {"token_mass": a["token_mass"][:1]}, ValueError, "token_mass must have shape",
                 id="token-mass-shape"),
    pytest.param(lambda a: {"multiplicity": a["token_mass"][:, :1]}, ValueError, "multiplicity must have shape",
                 id="multiplicity-shape"),
    pytest.param(lambda a: {"multiplicity": a["token_mass"].half()}, TypeError, "multiplicity must have dtype float32",
                 id="multiplicity-dtype"),
    pytest.param(lambda a: {"modality": _poke(a["modality"], 4)}, ValueError,
                 "modality must hold ids in [0, 4", id="modality-id-4"),
    pytest.param(lambda a: {"multiplicity": _poke(torch.ones_like(a["token_mass"]), 0.0)}, ValueError,
                 "multiplicity must be finite and > 0", id="multiplicity-zero"),
    pytest.param(lambda a: {"multiplicity": _poke(torch.ones_like(a["token_mass"]), float("nan"))}, ValueError,
                 "multiplicity must be finite and > 0", id="multiplicity-nan"),
    pytest.param(lambda a: {"multiplicity": _poke(torch.ones_like(a["token_mass"]), -2.0)}, ValueError,
                 "multiplicity must be finite and > 0", id="multiplicity-negative"),
    pytest.param(lambda a: {"scale": float("nan")}, ValueError, "scale must be a finite float", id="scale-nan"),
    pytest.param(lambda a: {"num_splits": 0}, ValueError, "num_splits must be a positive int", id="splits-zero"),
    pytest.param(lambda a: {"decay": 1.01}, ValueError, "decay must be a float in", id="decay-above-1"),
    pytest.param(lambda a: {"scale": "0.125"}, TypeError, "scale must be a finite float", id="scale-str"),
    pytest.param(lambda a: {"scale": torch.tensor(0.125)}, TypeError, "scale must be a finite float",
                 id="scale-tensor"),
    pytest.param(lambda a: {"scale": True}, TypeError, "scale must be a finite float", id="scale-bool"),
    pytest.param(lambda a: {"decay": "0.5"}, TypeError, "decay must be a float in", id="decay-str"),
    pytest.param(lambda a: {"decay": True}, TypeError, "decay must be a float in", id="decay-bool"),
    pytest.param(lambda a: {name: x.to("meta") for name, x in a.items()}, ValueError,
                 "q must be on a CUDA device", id="meta-tensors"),  # no data to launch on, interpreted or not
    # token_mass is written at every run: never over what the run reads, nor over itself
    pytest.param(lambda a: {"token_mass": a["k_cache"].view(torch.float32)[..., 0]}, ValueError,
                 "token_mass must not share memory with k_cache", id="token-mass-inside-k"),
    pytest.param(lambda a: {"token_mass": a["token_mass"][:, :1].expand_as(a["token_mass"])}, ValueError,
                 "token_mass must not overlap itself", id="token-mass-expanded"),
]


def _poke(x: torch.Tensor, value) -> torch.Tensor:
    """A copy with ``value`` at a stored slot: (b 1, h 1, t 8), below that row's length of 9."""
    x = x.clone()
    x[1, 1, 8] = value
    return x


def test_numpy_scalars_are_taken_as_the_scale_and_decay():
    """A scale or decay computed with numpy (np.float32, np.float64, ...) is a number like a Python float."""
    np = pytest.importorskip("numpy")
    args = _good()
    ref = _call({**args, "token_mass": args["token_mass"].clone()}, scale=0.125, decay=0.5)
    out = _call({**args, "token_mass": args["token_mass"].clone()}, scale=np.float32(0.125), decay=np.float32(0.5))
    torch.testing.assert_close(out.out, ref.out, rtol=0, atol=0)


def test_values_past_the_lengths_are_not_checked():
    """Slots past a row's length hold leftover memory: any id or multiplicity there is fine."""
    args = _good()
    mod, mult = args["modality"].clone(), torch.ones_like(args["token_mass"])
    mod[1, 1, 9:], mult[1, 1, 9:] = 200, float("nan")
    _call(args, modality=mod, multiplicity=mult)


@pytest.mark.parametrize("mutate,exc,message", BAD)
def test_bad_input_raises_naming_the_argument(mutate, exc, message):
    args = _good()
    mass_before = args["token_mass"].clone()
    with pytest.raises(exc, match=message.replace("[", r"\[").replace("]", r"\]")):
        _call(args, **mutate(args))
    torch.testing.assert_close(args["token_mass"], mass_before, equal_nan=True, rtol=0, atol=0)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU: the device check only applies there")
def test_cpu_tensors_rejected_on_gpu():
    args = {k: v.cpu() for k, v in _good().items()}
    with pytest.raises(ValueError, match="q must be on a CUDA device"):
        _call(args)


def test_large_logits_do_not_overflow(poison_empty):
    """Scores of magnitude ~1e3 stress the online softmax; the result must stay finite and exact."""
    q, k, v, lengths, mod, mass = make_inputs(1, 4, 2, 100, 64, [100, 60], torch.float32, seed=31)
    check_against_reference(q * 30.0, k, v, lengths, mod, mass)
    assert math.isfinite(float(reference.decode_attention(q * 30.0, k, v, lengths).lse.max()))
