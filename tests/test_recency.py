"""Recency-weighted evidence (``AccKVConfig.recency``): the every-query mean as an exponentially weighted mean of the
attention each token receives, a query of age a weighing exp(-a / recency), through the prompt, a later chunk and
the decode steps; on both backends, against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

from acckv_triton import reference
from acckv_triton.cache import BudgetedLayerCache
from acckv_triton.config import AccKVConfig
from tests.conftest import DEVICE

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]
TAU = 24.0
DECAY = math.exp(-1.0 / TAU)


def _prompt(T=192, Hq=4, Hkv=2, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, T, D, generator=g).to(DEVICE) for h in (Hq, Hkv, Hkv))
    return q, k, v, g


def _kept(cache) -> list[list[int]]:
    n = cache.store.lengths.long().cpu()
    return [cache.store.position[0, h, :int(n[0, h])].tolist() for h in range(n.shape[1])]


@pytest.mark.parametrize("kwargs, exc", [(dict(recency=0.0), ValueError), (dict(recency=-3.0), ValueError),
                                         (dict(recency=math.inf), ValueError), (dict(recency=True), TypeError),
                                         (dict(recency="256"), TypeError)], ids=str)
def test_recency_is_validated(kwargs, exc):
    with pytest.raises(exc, match="recency must be None or a finite number of tokens > 0"):
        AccKVConfig(**kwargs)


def test_only_the_mean_reads_recency():
    assert AccKVConfig().recency is None and AccKVConfig(evidence="mean").mean_decay == 1.0  # off by default
    assert AccKVConfig(evidence="mean", recency=TAU).mean_decay == pytest.approx(DECAY)
    for evidence in ("window", "observed", "last", "reconstruction", "auto"):  # auto: resolved by the cache first
        assert AccKVConfig(evidence=evidence, recency=TAU).mean_decay == 1.0
    cfg = AccKVConfig(recency=TAU)
    assert cfg.replace(evidence=cfg.evidence_for(False)).mean_decay == pytest.approx(DECAY)  # AccKV on text
    assert cfg.replace(evidence=cfg.evidence_for(True)).mean_decay == 1.0  # AccKV on audio-video: the window


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_ranks_by_the_recency_weighted_mean(backend):
    """A text prompt's evidence is the reference's decayed key mass (both prompt paths), and the tokens kept are the
    ones a plain-mean cache keeps when fed the weighted mean itself (mass / sum of the weights, times the count it
    divides by): the compression divides by the weights' sum, not by the count."""
    q, k, v, _ = _prompt()
    T = q.shape[2]
    # 36 of the 48 slots ranked; broad_entropy off: this random prompt's last query attends broadly, and a broad row
    # would rank by it rather than by the (weighted) mean under test
    cfg = AccKVConfig(budget=0.25, recency=TAU, recent=8, backend=backend, broad_entropy=1.0)
    cache = BudgetedLayerCache(cfg, 0, 1)
    want = reference.observed_attention(q, k, v, decay=DECAY)
    evidence = cache.prompt_evidence(q, k, audio_video=False)
    out, scores = cache.prompt_attention(q, k, v, audio_video=False)
    for got in (evidence, scores):
        torch.testing.assert_close(got, want.key_mass, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.transpose(1, 2), want.out, atol=1e-5, rtol=1e-5)
    cache.prefill(k, v, scores=evidence, audio_video=False)

    seen_by = T - torch.arange(T, dtype=torch.float64, device=DEVICE)
    weighted_mean = want.key_mass.double() / reference.query_weight_sum(seen_by, DECAY)
    plain = BudgetedLayerCache(cfg.replace(recency=None), 0, 1)
    plain.prefill(k, v, scores=(weighted_mean * seen_by).float(), audio_video=False)
    assert _kept(cache) == _kept(plain)
    unweighted = BudgetedLayerCache(cfg.replace(recency=None), 0, 1)
    unweighted.prefill(k, v, scores=unweighted.prompt_evidence(q, k, audio_video=False), audio_video=False)
    assert _kept(cache) != _kept(unweighted)  # recency changes what this prompt keeps


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_steps_age_the_evidence(backend):
    """Each decode step multiplies the stored mass by the decay and adds its own attention (the reference's
    decayed accumulation); a chunk multiplies it by decay^T and adds its queries' weighted mass."""
    q, k, v, g = _prompt(seed=1)
    cache = BudgetedLayerCache(AccKVConfig(budget=0.5, recency=TAU, backend=backend), 0, 1)
    cache.prefill(k, v, scores=cache.prompt_evidence(q, k, audio_video=False), audio_video=False)
    st = cache.store
    for _ in range(3):
        qd = torch.randn(1, 4, 32, generator=g).to(DEVICE)
        kd, vd = (torch.randn(1, 2, 1, 32, generator=g).to(DEVICE) for _ in range(2))
        mass = st.token_mass.clone()
        cache.decode_step(qd, kd, vd)
        n = st.max_length
        mass[:, :, n - 1] = 0.0  # the appended token starts at 0
        reference.decode_attention(qd, st.k[:, :, :n], st.v[:, :, :n], st.lengths, token_mass=mass[:, :, :n],
                                   multiplicity=st.multiplicity[:, :, :n], decay=DECAY)
        torch.testing.assert_close(st.token_mass[:, :, :n], mass[:, :, :n], atol=1e-5, rtol=1e-5)

    T = 12
    qc, kc, vc = (torch.randn(1, h, T, 32, generator=g).to(DEVICE) for h in (4, 2, 2))
    S = st.max_length
    stored_k, stored_v, lengths = st.k[:, :, :S].clone(), st.v[:, :, :S].clone(), st.lengths.clone()
    mult, mass = st.multiplicity[:, :, :S].clone(), st.token_mass[:, :, :S].clone()
    want = reference.chunk_attention(qc, stored_k, stored_v, lengths, kc, vc, multiplicity=mult, window=T,
                                     decay=DECAY)
    captured = {}
    real_prefill = cache.prefill

    def record(k_, v_, *, scores, **kw):  # the stored mass right before the chunk is stored and compressed
        captured["stored"], captured["chunk"] = st.token_mass[:, :, :S].clone(), scores.clone()
        return real_prefill(k_, v_, scores=scores, **kw)

    cache.prefill = record
    cache.prefill_chunk(qc, kc, vc, audio_video=False)
    stored = torch.arange(S, device=DEVICE) < lengths.long()[..., None]
    torch.testing.assert_close(captured["stored"][stored], (mass * DECAY**T + want.stored_mass)[stored],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured["chunk"], want.chunk_mass, atol=1e-5, rtol=1e-5)
