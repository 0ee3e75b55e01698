"""append_token_ (the decode step's one-launch append) against reference.append_token_: every dtype, defaults and
given metadata, odd head dims, a row at capacity and one with a negative length, untouched slots bit for bit (the cache poisoned with NaN)."""
from __future__ import annotations

import pytest
import torch

from acckv_triton import reference
from acckv_triton.ops.append_token import append_token_
from tests.conftest import DEVICE, DTYPES


def _state(B, Hkv, C, D, dtype, g, given, full_row):
    lengths = torch.randint(0, C, (B, Hkv), generator=g, dtype=torch.int32)
    if full_row:
        lengths[0, 0] = C
        lengths[-1, -1] = -1  # a caller's bad length: nothing written, never before the row (it would corrupt memory)
    k = torch.full((B, Hkv, C, D), float("nan")).to(dtype)  # slots the kernel must not touch stay NaN
    k[:, :, : C // 2] = torch.randn(B, Hkv, C // 2, D, generator=g).to(dtype)
    state = dict(
        k_cache=k, v_cache=k.clone(), lengths=lengths,
        position=torch.randint(0, 99, (B, Hkv, C), generator=g, dtype=torch.int32),
        next_position=torch.randint(100, 200, (B, Hkv, 1), generator=g, dtype=torch.int32),
        modality=torch.randint(0, 4, (B, Hkv, C), generator=g, dtype=torch.uint8),
        time=torch.randint(0, 99, (B, Hkv, C), generator=g, dtype=torch.int32),
        spatial=torch.randint(-1, 9, (B, Hkv, C, 2), generator=g, dtype=torch.int32),
        token_mass=torch.full((B, Hkv, C), float("nan")), multiplicity=torch.rand(B, Hkv, C, generator=g) + 1)
    new = dict(k_new=torch.randn(B, Hkv, 1, D, generator=g).to(dtype),
               v_new=torch.randn(B, Hkv, 1, D, generator=g).to(dtype))
    if given:
        new.update(modality_new=torch.randint(0, 4, (B, 1, 1), generator=g, dtype=torch.uint8).expand(B, Hkv, 1),
                   time_new=torch.randint(0, 9, (B, Hkv, 1), generator=g, dtype=torch.int32),
                   spatial_new=torch.randint(0, 9, (B, Hkv, 1, 2), generator=g, dtype=torch.int32))
    return state, new


def _run(fn, state, new):
    s = {name: x.clone().to(DEVICE) for name, x in state.items()}
    extra = {name: x.to(DEVICE) for name, x in new.items() if name not in ("k_new", "v_new")}
    k, v, lengths = s.pop("k_cache"), s.pop("v_cache"), s.pop("lengths")
    fn(k, v, lengths, new["k_new"].to(DEVICE), new["v_new"].to(DEVICE), **s, **extra)
    return {"k_cache": k, "v_cache": v, "lengths": lengths, **s}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given", [False, True], ids=["defaults", "given"])
@pytest.mark.parametrize("B,Hkv,C,D,full_row", [
    pytest.param(1, 1, 1, 64, False, id="C1"),
    pytest.param(2, 3, 63, 64, True, id="C63-full-row"),
    pytest.param(3, 2, 257, 128, False, id="C257-D128"),
    pytest.param(1, 7, 16, 72, True, id="D72"),
])
def test_append_token_matches_reference(dtype, given, B, Hkv, C, D, full_row):
    g = torch.Generator().manual_seed(C + D)
    state, new = _state(B, Hkv, C, D, dtype, g, given, full_row)
    got = _run(append_token_, state, new)
    want = _run(reference.append_token_, state, new)
    for name in want:  # a copy: bit-exact, NaN where both left NaN
        a, b = got[name].cpu(), want[name].cpu()
        assert torch.equal(a.isnan() if a.is_floating_point() else a, b.isnan() if b.is_floating_point() else b), name
        if a.is_floating_point():
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), name
    assert torch.equal(got["lengths"].cpu(), state["lengths"] + 1)


def test_append_token_names_a_bad_argument():
    g = torch.Generator().manual_seed(0)
    state, new = _state(1, 2, 8, 16, torch.float32, g, False, False)
    s = {name: x.to(DEVICE) for name, x in state.items()}
    k, v, lengths = s.pop("k_cache"), s.pop("v_cache"), s.pop("lengths")
    with pytest.raises(ValueError, match="k_new must have shape"):
        append_token_(k, v, lengths, torch.zeros(1, 2, 2, 16, device=DEVICE), new["v_new"].to(DEVICE), **s)
    with pytest.raises(TypeError, match="lengths must have dtype int32"):
        append_token_(k, v, lengths.long(), new["k_new"].to(DEVICE), new["v_new"].to(DEVICE), **s)
    with pytest.raises(TypeError, match="modality_new must have dtype uint8"):
        append_token_(k, v, lengths, new["k_new"].to(DEVICE), new["v_new"].to(DEVICE), **s,
                      modality_new=torch.zeros(1, 2, 1, dtype=torch.int32, device=DEVICE))
