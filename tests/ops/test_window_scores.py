"""window_scores against the float64 reference, its input validation, and the modality-preserving pooling."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acckv_triton import reference
from acckv_triton.modality import NUM_MODALITIES
from acckv_triton.ops.window_scores import window_scores

from tests.conftest import DEVICE, DTYPES, TOL

ws_module = importlib.import_module("acckv_triton.ops.window_scores")  # the module; the package exports the function


def _inputs(B, Hkv, G, W, N, D, dtype, *, seed, key_start=None, modality=True):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hkv * G, W, D, generator=gen) * 1.5).to(dtype).to(DEVICE)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(dtype).to(DEVICE)
    mod = torch.randint(0, NUM_MODALITIES, (B, Hkv, N), generator=gen, dtype=torch.uint8).to(DEVICE) \
        if modality else None
    ks = torch.tensor(key_start, dtype=torch.int32, device=DEVICE) if key_start is not None else None
    return q, k, mod, ks


def _assert_close(out, ref, dtype):
    atol, rtol = TOL[dtype]
    assert not torch.isnan(out.scores).any(), "unwritten score (NaN from poison_empty)"
    torch.testing.assert_close(out.scores, ref.scores, atol=atol, rtol=rtol)
    if ref.modality_mass is None:
        assert out.modality_mass is None
    else:
        assert not torch.isnan(out.modality_mass).any()
        torch.testing.assert_close(out.modality_mass, ref.modality_mass, atol=atol, rtol=rtol)


# (B, Hkv, G, W, N, D, key_start, modality)
CASES = [
    pytest.param(1, 1, 1, 1, 1, 64, None, True, id="N1-W1-G1-D64"),
    pytest.param(2, 2, 2, 8, 63, 64, [0, 17], True, id="N63-W8-G2-D64-ragged"),
    pytest.param(1, 1, 7, 32, 257, 128, None, True, id="N257-W32-G7-D128-rowblocks"),
    pytest.param(2, 1, 4, 32, 63, 128, [40, 5], False, id="N63-W32-G4-D128-pad-into-window"),
    pytest.param(3, 1, 1, 8, 257, 64, [0, 256, 257], True, id="N257-W8-G1-D64-pad-all"),
    pytest.param(1, 2, 7, 1, 257, 64, [3], True, id="N257-W1-G7-D64"),
]


@pytest.mark.parametrize("B, Hkv, G, W, N, D, key_start, with_mod", CASES)
def test_matches_reference_fp32(B, Hkv, G, W, N, D, key_start, with_mod, poison_empty):
    q, k, mod, ks = _inputs(B, Hkv, G, W, N, D, torch.float32, seed=N + 7 * G, key_start=key_start, modality=with_mod)
    out = window_scores(q, k, modality=mod, key_start=ks)
    _assert_close(out, reference.window_scores(q, k, modality=mod, key_start=ks), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B, Hkv, G, W, N, D, key_start",
    [
        pytest.param(2, 2, 2, 8, 63, 64, [0, 30], id="N63-W8-G2-D64-ragged"),
        pytest.param(1, 1, 7, 32, 257, 128, None, id="N257-W32-G7-D128"),
    ],
)
def test_matches_reference_dtypes(B, Hkv, G, W, N, D, key_start, dtype, poison_empty):
    q, k, mod, ks = _inputs(B, Hkv, G, W, N, D, dtype, seed=11, key_start=key_start)
    out = window_scores(q, k, modality=mod, key_start=ks, scale=0.1)
    _assert_close(out, reference.window_scores(q, k, modality=mod, key_start=ks, scale=0.1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_given_lse_skips_the_first_pass_and_is_used(dtype, poison_empty):
    B, Hkv, G, W, N, D = 2, 1, 4, 8, 63, 64
    q, k, mod, ks = _inputs(B, Hkv, G, W, N, D, dtype, seed=3, key_start=[0, 9])
    full = reference.window_scores(q, k, modality=mod, key_start=ks)
    # The true row lse, as the prefill attention would hand it over.
    logits = torch.einsum("bhwd,bhtd->bhwt", q.double(), k.double().repeat_interleave(G, 1)) * D**-0.5
    t = torch.arange(N, device=DEVICE)
    visible = (t <= (N - W + torch.arange(W, device=DEVICE))[:, None])[None] & (t >= ks.long()[:, None, None])
    lse = torch.logsumexp(logits.masked_fill(~visible[:, None], float("-inf")), dim=-1).float()
    _assert_close(window_scores(q, k, modality=mod, key_start=ks, lse=lse), full, dtype)
    # A shifted lse halves every probability: proof that the given lse, not a recomputed one, is used.
    shifted = (lse + math.log(2.0)).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous on purpose
    out = window_scores(q, k, modality=mod, key_start=ks, lse=shifted)
    _assert_close(out, reference.window_scores(q, k, modality=mod, key_start=ks, lse=shifted), dtype)
    torch.testing.assert_close(out.scores * 2, full.scores, atol=2 * TOL[dtype][0], rtol=TOL[dtype][1])


def test_many_splits_merge_exactly(monkeypatch, poison_empty):
    monkeypatch.setattr(ws_module, "_MIN_TOKENS_PER_SPLIT", 16)  # 4 splits of 257 keys, some tiles padding-only
    q, k, mod, ks = _inputs(1, 1, 7, 8, 257, 64, torch.float32, seed=5, key_start=[100])
    assert ws_module._num_splits(1, 1, 257, DEVICE) > 1 or DEVICE.type == "cuda"
    out = window_scores(q, k, modality=mod, key_start=ks)
    _assert_close(out, reference.window_scores(q, k, modality=mod, key_start=ks), torch.float32)


def test_strided_views(poison_empty):
    """The window as the last W rows of the prefill queries, K as a [B, N, Hkv, D] buffer seen as [B, Hkv, N, D]."""
    B, Hkv, G, W, N, D = 2, 2, 2, 8, 63, 64
    gen = torch.Generator().manual_seed(21)
    q_all = torch.randn(B, N, Hkv * G, D, generator=gen).to(DEVICE).transpose(1, 2)  # [B, Hq, N, D], strided
    k = torch.randn(B, N, Hkv, D, generator=gen).to(DEVICE).transpose(1, 2)
    mod = torch.randint(0, NUM_MODALITIES, (B, N, Hkv), generator=gen, dtype=torch.uint8).to(DEVICE).transpose(1, 2)
    q = q_all[:, :, -W:]
    assert not q.is_contiguous() and not k.is_contiguous() and not mod.is_contiguous()
    out = window_scores(q, k, modality=mod)
    _assert_close(out, reference.window_scores(q, k, modality=mod), torch.float32)


def test_scores_are_probability_mass(poison_empty):
    """Every row that sees a key spreads mass 1; padding keys and keys after a row's position get exactly 0."""
    B, Hkv, G, W, N, D = 2, 2, 2, 8, 63, 64
    q, k, mod, ks = _inputs(B, Hkv, G, W, N, D, torch.float32, seed=9, key_start=[0, 58])
    out = window_scores(q, k, modality=mod, key_start=ks)
    rows_seeing = torch.tensor([W, 5], dtype=torch.float32, device=DEVICE)  # b=1: rows w >= 3 (N-W+w >= 58) see keys
    torch.testing.assert_close(out.scores.sum(-1), (rows_seeing * G)[:, None].expand(B, Hkv), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.modality_mass.sum(-1), rows_seeing[:, None].expand(B, Hkv * G), atol=1e-4,
                               rtol=1e-5)
    assert (out.scores[1, :, :58] == 0).all()


def test_empty_batch():
    q = torch.randn(0, 2, 4, 64, device=DEVICE)
    k = torch.randn(0, 1, 8, 64, device=DEVICE)
    out = window_scores(q, k, modality=torch.zeros(0, 1, 8, dtype=torch.uint8, device=DEVICE))
    assert out.scores.shape == (0, 1, 8) and out.modality_mass.shape == (0, 2, NUM_MODALITIES)


def _bad(**overrides):
    args = dict(
        q_window=torch.randn(2, 4, 8, 64, device=DEVICE), k=torch.randn(2, 2, 16, 64, device=DEVICE),
        modality=None, lse=None, key_start=None, scale=None,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, exc, match",
    [
        pytest.param(dict(q_window=[1.0]), TypeError, "q_window must be a torch.Tensor", id="q-not-tensor"),
        pytest.param(dict(q_window=torch.randn(2, 4, 64)), ValueError, "q_window must have rank 4", id="q-rank"),
        pytest.param(dict(q_window=torch.randint(0, 3, (2, 4, 8, 64))), TypeError, "q_window must have dtype",
                     id="q-int"),
        pytest.param(dict(k=torch.randn(2, 2, 16, 64, dtype=torch.float16)), TypeError, "k must have dtype",
                     id="k-dtype"),
        pytest.param(dict(k=torch.randn(2, 2, 16, 32)), ValueError, r"k must have shape \[B, Hkv, N, D\]",
                     id="k-head-dim"),
        pytest.param(dict(k=torch.randn(2, 3, 16, 64)), ValueError, "positive multiple of Hkv=3", id="heads"),
        pytest.param(dict(k=torch.randn(2, 2, 4, 64)), ValueError, "W=8", id="window-longer-than-N"),
        pytest.param(dict(k=torch.randn(2, 2, 64, 16).transpose(2, 3)), ValueError, "k must be contiguous",
                     id="k-stride"),
        pytest.param(dict(modality=torch.zeros(2, 2, 16, dtype=torch.int32)), TypeError, "modality must have dtype",
                     id="modality-dtype"),
        pytest.param(dict(modality=torch.zeros(2, 2, 15, dtype=torch.uint8)), ValueError, "modality must have shape",
                     id="modality-shape"),
        pytest.param(dict(modality=torch.full((2, 2, 16), 4, dtype=torch.uint8)), ValueError,
                     r"modality must hold ids in \[0, 4\)", id="modality-id-4"),
        pytest.param(dict(lse=torch.zeros(2, 4, 8, dtype=torch.float64)), TypeError, "lse must have dtype",
                     id="lse-dtype"),
        pytest.param(dict(lse=torch.zeros(2, 2, 8)), ValueError, r"lse must have shape \[B, Hq, W\]", id="lse-shape"),
        pytest.param(dict(key_start=torch.zeros(2, dtype=torch.float32)), TypeError, "key_start must have dtype",
                     id="key-start-dtype"),
        pytest.param(dict(key_start=torch.tensor([0, 17], dtype=torch.int32)), ValueError,
                     r"key_start must lie in \[0, N=16\]", id="key-start-range"),
        pytest.param(dict(scale=float("nan")), ValueError, "scale must be a finite float", id="scale-nan"),
    ],
)
def test_bad_inputs_name_the_argument(overrides, exc, match):
    args = _bad(**{name: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for name, v in overrides.items()})
    with pytest.raises(exc, match=match):
        window_scores(args.pop("q_window"), args.pop("k"), **args)


def test_a_modality_id_out_of_range_is_refused_unless_unchecked():
    """An id >= NUM_MODALITIES matches no modality: its token's mass would vanish from modality_mass silently.
    Checked by default (one host read); check_modality=False trusts the ids and scores the same."""
    args = _bad(modality=torch.zeros(2, 2, 16, dtype=torch.uint8, device=DEVICE))
    q, k = args.pop("q_window"), args.pop("k")
    bad = args["modality"].clone()
    bad[1, 0, 5] = 200
    with pytest.raises(ValueError, match=r"modality must hold ids in \[0, 4\), got max 200"):
        window_scores(q, k, modality=bad)
    trusted = window_scores(q, k, modality=bad, check_modality=False)
    torch.testing.assert_close(trusted.scores, window_scores(q, k, modality=args["modality"]).scores, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# pool_scores: pooling along each modality's own token order


def _pool_by_loop(scores, modality, kernel, mode):
    """Independent slow spec: pool each modality's subsequence on its own."""
    out = scores.clone()
    r = kernel // 2
    for m in modality.unique().tolist():
        idx = (modality == m).nonzero().flatten()
        sub = scores[idx]
        for j in range(len(idx)):
            win = sub[max(0, j - r): j + r + 1]
            out[idx[j]] = win.max() if mode == "max" else win.mean()
    return out


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40), kernel=st.sampled_from([1, 3, 7]), mode=st.sampled_from(["max", "avg"]),
    seed=st.integers(0, 2**16),
)
def test_pool_scores_matches_per_modality_pooling(n, kernel, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=gen, dtype=torch.float64)
    modality = torch.randint(0, NUM_MODALITIES, (n,), generator=gen, dtype=torch.uint8)
    out = reference.pool_scores(scores, modality, kernel=kernel, mode=mode)
    torch.testing.assert_close(out, _pool_by_loop(scores, modality, kernel, mode))


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pool_scores_never_mixes_modalities(mode):
    # Interleaved audio/video with audio scores far above video: video tokens must stay within video's range.
    N = 64
    modality = torch.tensor([1, 2] * (N // 2), dtype=torch.uint8).expand(2, 3, N)
    scores = torch.where(modality == 1, 1000.0, torch.rand(2, 3, N))
    out = reference.pool_scores(scores, modality, kernel=7, mode=mode)
    video = modality == 2
    assert (out[video] <= scores[video].max()).all() and (out[~video] == 1000.0).all()
    assert out.shape == scores.shape and out.dtype == scores.dtype


def test_pool_scores_rejects_bad_arguments():
    s, m = torch.rand(8), torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="kernel must be an odd"):
        reference.pool_scores(s, m, kernel=4)
    with pytest.raises(ValueError, match="mode must be"):
        reference.pool_scores(s, m, mode="median")
    with pytest.raises(ValueError, match="modality must have the shape"):
        reference.pool_scores(s, m[:7])
