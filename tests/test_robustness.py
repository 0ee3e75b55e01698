"""AccKV's fallbacks where its evidence is weak (docs/algorithm.md, "Robustness"), on the policy itself:

* little redundancy: a row whose audio/video candidates barely link to a neighbour skips focusing and
  redistribution and keeps the top of its pooled scores, as one ranking;
* pooling keeps peaks first: AccKV ranks by ``max(s, pool_lift * pool(s))``, so a tight budget keeps the
  attended tokens before the neighbours their pooling lifts.
"""
from __future__ import annotations

import pytest
import torch

from acckv_triton import policy, reference, workloads
from acckv_triton.bench.av import layer_inputs
from acckv_triton.config import AccKVConfig
from acckv_triton.modality import Modality
from acckv_triton.policy import LayerTokens, plan_layer

W = workloads.generate_av_workload(num_chunks=3, grid_h=4, grid_w=4, batch=1, num_layers=2, seed=3)
SCORES = [reference.window_scores(lt.q_window, lt.k, modality=W.token_modality()).scores for lt in W.layers]


def _tokens(noise_keys_row: int | None = None) -> LayerTokens:
    x = layer_inputs(W, 1, SCORES[1])
    if noise_keys_row is not None:  # keys of that kv head are noise: no two neighbours alike
        keys = x.keys.clone()
        keys[0, noise_keys_row] = torch.randn(keys.shape[2:], generator=torch.Generator().manual_seed(5))
        x.keys = keys
    return x


def _kept(res, h):
    n = int(res.plan.keep_lengths[0, h])
    return set(res.plan.keep[0, h, :n].tolist())


def _links(cfg, x):
    N = x.scores.shape[-1]
    cand = torch.arange(N).expand_as(x.scores) < x.lengths[..., None].long()
    _, n_link, n_av = policy._merge_groups(cfg, x, x.scores.float(), cand)
    return n_link, n_av


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1])
def test_a_row_with_nothing_to_merge_ranks_by_pooled_scores_alone(budget):
    cfg = AccKVConfig(budget=budget, window=8, recent=8)  # a window the 10% budget (30 tokens) can afford
    x = _tokens(noise_keys_row=1)
    n_link, n_av = _links(cfg, x)
    assert int(n_link[0, 1]) < cfg.redundancy_min * int(n_av[0, 1])  # row 1: the fallback's case
    assert int(n_link[0, 0]) > cfg.redundancy_min * int(n_av[0, 0])  # row 0: redundant, AccKV as usual
    got = plan_layer(cfg, x, 1, 2)
    plain = plan_layer(cfg.replace(focusing=False, redistribution=False), x, 1, 2)
    usual = plan_layer(cfg.replace(redundancy_min=0.0), x, 1, 2)
    assert _kept(got, 1) == _kept(plain, 1)  # the fallback row: one ranking of its pooled scores
    assert _kept(got, 0) == _kept(usual, 0)  # the redundant row is untouched
    assert torch.equal(got.plan.merge_target[0, 0], usual.plan.merge_target[0, 0])
    assert _kept(got, 1) != _kept(usual, 1)  # and it changes what that row keeps


def test_the_fallback_can_be_switched_off_and_needs_merging_on():
    x = _tokens(noise_keys_row=1)
    cfg = AccKVConfig(budget=0.25, window=8, recent=8, redundancy_min=0.0)
    off = plan_layer(cfg, x, 1, 2)
    assert _kept(off, 1) != _kept(plan_layer(cfg.replace(focusing=False, redistribution=False), x, 1, 2), 1)
    no_merge = AccKVConfig(budget=0.25, window=8, recent=8, intra_merge=False)  # no chains looked for: no redundancy evidence either
    assert _kept(plan_layer(no_merge, x, 1, 2), 1) == _kept(plan_layer(no_merge.replace(redundancy_min=1.0), x, 1, 2), 1)


def _peak_row(lift: float):
    """One audio stream of 40 tokens after 4 text sinks: three lone peaks, everything else flat."""
    N = 44
    mod = torch.full((1, 1, N), int(Modality.AUDIO), dtype=torch.uint8)
    mod[..., :4] = int(Modality.TEXT)
    scores = torch.full((1, 1, N), 0.01)
    peaks = [10, 20, 30]
    scores[0, 0, peaks] = torch.tensor([1.0, 0.9, 0.8])
    x = LayerTokens(scores=scores, modality=mod, lengths=torch.tensor([[N]], dtype=torch.int32),
                    keys=torch.randn(1, 1, N, 8, generator=torch.Generator().manual_seed(0)))
    cfg = AccKVConfig(budget=4 + 1 + 3, window=1, recent=1, pool_lift=lift)  # sinks, window, 3 free slots
    return plan_layer(cfg, x), peaks


def test_pooling_with_a_lift_below_one_keeps_every_peak_before_any_neighbour():
    res, peaks = _peak_row(0.5)
    assert set(peaks) <= _kept(res, 0)
    res, peaks = _peak_row(1.0)  # SnapKV's pooling: a peak's neighbours tie with it and crowd the others out
    assert not set(peaks) <= _kept(res, 0)


def test_the_new_switches_are_validated():
    with pytest.raises(ValueError, match="pool_lift"):
        AccKVConfig(pool_lift=1.5)
    with pytest.raises(ValueError, match="redundancy_min"):
        AccKVConfig(redundancy_min=-0.1)
