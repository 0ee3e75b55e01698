"""``apply_acckv(model, cfg, decode_graphs=True)``: the whole decode forward replayed as one graph.

On the CPU the graph is :class:`tests.graph_stand_in.HostFrozenGraph`, which replays with the host values of
capture time, so a decode step whose device work depended on host state, a sync, a missed input copy or a missed
host-counter update makes the outputs differ from eager ones. The real graph is tested on CUDA (replay equals eager
over steps that include upkeeps).
"""
from __future__ import annotations

import pytest
import torch

import acckv_triton as ak
from acckv_triton.storage import LayerKVCache
from tests.graph_stand_in import HostFrozenGraph

pytest.importorskip("transformers")
from acckv_triton.integrations.graphs import GRAPH_DECODE_AHEAD  # noqa: E402
from acckv_triton.integrations.transformers import apply_acckv, cache_keyword, output_cache  # noqa: E402
from tests.integrations.tiny_models import tiny_causal_lm, tiny_gemma3, tiny_vl  # noqa: E402

GREEDY = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


@pytest.fixture
def stand_in():
    return HostFrozenGraph.reset()


def _as_graphed(cfg):
    """The config a graph switch runs (``apply_acckv(decode_graphs=True)`` sizes the storage ahead when the config
    leaves ``decode_ahead`` None): the eager reference of a graphed run uses it too."""
    return cfg.replace(decode_ahead=GRAPH_DECODE_AHEAD) if cfg.decode_ahead is None else cfg


def _patched(model, cfg, factory):
    handle = apply_acckv(model, cfg, decode_graphs=True)
    handle.graphs.graph_factory = factory
    return handle


def _hand_loop(model, ids, handle, steps: int, *, cache_position: bool = False) -> torch.Tensor:
    """Greedy ``model(ids, cache=cache)`` (``past_key_values=`` before transformers 5.24) then ``steps`` single
    tokens: ``[steps + 1, B, V]`` logits; ``cache_position``: each decode call passes it (and no position_ids)."""
    cache, name = handle.new_cache(), cache_keyword(model)
    logits = [model(ids, **{name: cache}).logits[:, -1]]
    for i in range(steps):
        extra = dict(cache_position=torch.tensor([ids.shape[1] + i])) if cache_position else {}
        logits.append(model(logits[-1].argmax(-1, keepdim=True), **{name: cache}, **extra).logits[:, -1])
    return torch.stack(logits)


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_generate_replays_the_decode_graph_between_upkeeps_and_matches_eager(stand_in, backend, monkeypatch):
    """40 new tokens at slack 4 (budget on every token seen: the excess grows half a token a step): the steps
    where the layers' upkeep lands run eager, the others replay; a graph is captured again only when an upkeep grew
    the storage for the growing budget (an in-place upkeep keeps what it binds); every logit equals the eager
    run's."""
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 150, (1, 48), generator=torch.Generator().manual_seed(0))
    cfg = ak.AccKVConfig(budget=0.5, slack=4, backend=backend)
    new = 40 if backend == "torch" else 16  # the interpreter is slow; 16 steps still hold an upkeep
    installs = []  # every storage replacement: (store, graphs captured by then)
    real_install = LayerKVCache._install

    def install(self, fresh):
        installs.append((self, len(stand_in.captures)))
        real_install(self, fresh)

    monkeypatch.setattr(LayerKVCache, "_install", install)
    with torch.no_grad():
        with apply_acckv(model, _as_graphed(cfg)):
            ref = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **GREEDY)
        with _patched(model, cfg, stand_in) as handle:
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **GREEDY)
    _assert_same(out, ref)
    stats = handle.graphs.stats
    layers = output_cache(out).compressed_layers
    upkeeps = max(layer.budgeted.compressions for layer in layers) - 1
    grown = max(sum(store is layer.store and n > 0 for store, n in installs) for layer in layers)
    assert upkeeps >= 1 and stats["eager: upkeep or growth due"] == upkeeps, stats
    assert 1 <= stats["captured"] == len(stand_in.captures) <= 1 + grown, (stats, grown)
    assert len({g.binding for g in stand_in.captures}) == len(stand_in.captures)  # never captured twice needlessly
    warm = handle.graphs.warmup * stats["captured"]
    assert stats["replayed"] == stand_in.replays == new - 1 - warm - upkeeps, stats


def test_storage_sized_ahead_spares_recaptures(stand_in, monkeypatch):
    """With the budget on every token seen, the storage outgrows itself as decoding goes on; each reallocation is a
    new capture. The graph switch sizes the storage for GRAPH_DECODE_AHEAD more tokens (handle.cfg), so 120 tokens at
    budget 0.5 run on one capture, where ``decode_ahead=0`` reallocates (and captures again) several times."""
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 150, (1, 48), generator=torch.Generator().manual_seed(4))
    captures = {}
    for ahead in (None, 0):
        HostFrozenGraph.reset()
        cfg = ak.AccKVConfig(budget=0.5, slack=8, backend="torch", decode_ahead=ahead)
        with torch.no_grad(), _patched(model, cfg, stand_in) as handle:
            model.generate(ids, max_new_tokens=120, min_new_tokens=120, **GREEDY)
        captures[ahead] = handle.graphs.stats["captured"]
        assert handle.cfg.decode_ahead == (GRAPH_DECODE_AHEAD if ahead is None else 0)
    assert captures[None] == 1 and captures[0] >= 3, captures


def test_replayed_steps_ask_the_layers_once_per_run(stand_in, monkeypatch):
    """The switch asks every layer for its plain steps ahead once a run of replayable steps (then once more when
    the run is used up, and after each eager step or capture), not every step: a replayed step costs one host
    comparison, not a walk over the layers."""
    from acckv_triton.cache import BudgetedLayerCache

    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 150, (1, 48), generator=torch.Generator().manual_seed(3))
    asked = []
    real = BudgetedLayerCache.plain_steps_ahead
    monkeypatch.setattr(BudgetedLayerCache, "plain_steps_ahead", lambda self: asked.append(1) or real(self))
    cfg = ak.AccKVConfig(budget=0.5, slack=8, backend="torch", decode_budget="fixed")
    with torch.no_grad(), _patched(model, cfg, stand_in) as handle:
        out = model.generate(ids, max_new_tokens=30, min_new_tokens=30, **GREEDY)
    stats = handle.graphs.stats
    layers = len(output_cache(out).compressed_layers)
    eager = sum(n for reason, n in stats.items() if reason.startswith("eager") and reason != "eager: not a "
                "single-token step")
    walks = len(asked) / layers
    assert stats["replayed"] >= 20 and stats["eager: upkeep or growth due"] >= 2, stats
    assert walks <= 2 * (eager + stats["captured"]) + 1 and walks < 29 / 2, (walks, stats)


def test_a_left_padded_batch_and_a_second_question_replay_like_eager(stand_in):
    """B 2 with left padding (generate's growing 2-D mask is not given to the graph: no layer reads it at decode),
    then a second question over the same cache, whose steps replay too (the graph follows the storage binding:
    kept when the question's prefill compacts in place, captured again when it replaced the storage)."""
    model = tiny_causal_lm("qwen2")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 150, (2, 36), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    follow = torch.randint(3, 150, (2, 9), generator=g)
    cfg = ak.AccKVConfig(budget=0.4, slack=6, backend="torch")

    def conversation(graphs=None):
        first = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, **GREEDY)
        replayed.append(0 if graphs is None else graphs.stats["replayed"])
        ids2 = torch.cat([first.sequences, follow], dim=1)
        mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
        second = model.generate(ids2, attention_mask=mask2, **{cache_keyword(model): output_cache(first)},
                                max_new_tokens=12, min_new_tokens=12, **GREEDY)
        replayed.append(0 if graphs is None else graphs.stats["replayed"])
        return first, second

    replayed = []
    with torch.no_grad():
        with apply_acckv(model, _as_graphed(cfg)):
            ref = conversation()
        with _patched(model, cfg, stand_in) as handle:
            out = conversation(handle.graphs)
    for a, b in zip(out, ref):
        _assert_same(a, b)
    first, total = replayed[2:]
    assert first >= 4 and total - first >= 4, handle.graphs.stats


def test_a_hand_written_loop_without_positions_replays_like_eager(stand_in):
    """``model(ids, cache=cache)`` (``past_key_values=`` before transformers 5.24) with no cache_position: the
    graph's is filled from the cache's count."""
    model = tiny_causal_lm("qwen3")
    ids = torch.randint(3, 150, (1, 30), generator=torch.Generator().manual_seed(1))
    cfg = ak.AccKVConfig(budget=0.5, slack=4, backend="torch")

    with torch.no_grad():
        with apply_acckv(model, _as_graphed(cfg)) as handle:
            ref = _hand_loop(model, ids, handle, 16)
        with _patched(model, cfg, stand_in) as handle:
            out = _hand_loop(model, ids, handle, 16)
            fresh = {cache_keyword(model): handle.new_cache()}  # a fresh cache: a prompt, eager
            kept = [model(ids[:, :1], **fresh).logits]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert handle.graphs.stats["replayed"] >= 8 and kept[0].shape[1] == 1, handle.graphs.stats


def test_replayed_logits_are_the_callers_own():
    """The graph rewrites its output buffer at the next replay; what a step returned must not change."""
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 150, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), _patched(model, ak.AccKVConfig(budget=0.5, slack=32, backend="torch"),
                                   HostFrozenGraph) as handle:
        kw = {cache_keyword(model): handle.new_cache()}
        tok = model(ids, **kw).logits[:, -1:].argmax(-1)
        outs = [model(tok, **kw).logits for _ in range(5)]
        first = outs[-2].clone()
        model(tok, **kw)
    assert handle.graphs.stats["replayed"] >= 2
    assert torch.equal(outs[-2], first)


def test_revert_restores_the_class_forward_and_refusals_name_the_reason():
    model = tiny_causal_lm("llama")
    handle = apply_acckv(model, ak.AccKVConfig(budget=0.5), decode_graphs=True)
    assert "forward" in model.__dict__ and handle.graphs is not None
    handle.revert()
    assert "forward" not in model.__dict__
    with pytest.raises(ValueError, match="budget below 1.0"):
        apply_acckv(model, ak.AccKVConfig(budget=1.0), decode_graphs=True)
    assert "_acckv_handle" not in model.__dict__ and "forward" not in model.__dict__
    with pytest.raises(TypeError, match="decode_graphs must be a bool"):
        apply_acckv(model, ak.AccKVConfig(budget=0.5), decode_graphs="yes")
    with pytest.raises(ValueError, match="sliding-window"):
        apply_acckv(tiny_gemma3(), ak.AccKVConfig(budget=0.5), decode_graphs=True)
    with pytest.raises(ValueError, match="text decoders"):
        apply_acckv(tiny_vl("qwen2_5_vl"), ak.AccKVConfig(budget=0.5), decode_graphs=True)


def test_steps_that_cannot_replay_run_eager_with_their_reason():
    """On the CPU with the real CUDA graph: every decode step runs eager, counted as such (nothing is captured)."""
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 150, (1, 20), generator=torch.Generator().manual_seed(4))
    cfg = ak.AccKVConfig(budget=0.5, backend="torch")
    with torch.no_grad(), apply_acckv(model, cfg, decode_graphs=True) as handle:
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, **GREEDY)
        with torch.enable_grad():
            model(out.sequences[:, -1:], **{cache_keyword(model): output_cache(out)})
    stats = handle.graphs.stats
    assert stats["eager: not a single-token step"] == 1 and stats["eager: cpu tensors"] == 3, stats
    assert stats["eager: autograd on"] == 1 and "replayed" not in stats, stats


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_over_steps_with_upkeeps(dtype):
    """The real graph: a tiny Llama on CUDA (the kernels), 48 new tokens at slack 6, so each layer's upkeep runs a
    few times between replays; sequences equal and logits equal to float rounding of the eager run's."""
    model = tiny_causal_lm("llama", num_layers=3).to("cuda", dtype)
    ids = torch.randint(3, 150, (2, 64), generator=torch.Generator().manual_seed(6)).cuda()
    cfg = ak.AccKVConfig(budget=0.25, slack=6)
    with torch.no_grad():
        with apply_acckv(model, _as_graphed(cfg)):
            ref = model.generate(ids, max_new_tokens=48, min_new_tokens=48, **GREEDY)
        with apply_acckv(model, cfg, decode_graphs=True) as handle:
            out = model.generate(ids, max_new_tokens=48, min_new_tokens=48, **GREEDY)
    stats = handle.graphs.stats
    assert stats["replayed"] >= 30 and stats["eager: upkeep or growth due"] >= 2, stats
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    n = next((i for i, (a, b) in enumerate(zip(out.sequences[:, 64:].T, ref.sequences[:, 64:].T))
              if not torch.equal(a, b)), 48)
    assert n == 48 or dtype == torch.bfloat16, f"sequences differ from step {n}"
    for x, y in zip(out.logits[:n], ref.logits[:n]):  # up to where bf16 rounding may pick another token
        torch.testing.assert_close(x, y, **tol)


class _RaisingGraph(HostFrozenGraph):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_runs_eager_and_is_not_retried():
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 150, (1, 24), generator=torch.Generator().manual_seed(7))
    cfg = ak.AccKVConfig(budget=0.5, slack=64, backend="torch")
    with torch.no_grad():
        with apply_acckv(model, _as_graphed(cfg)):
            ref = model.generate(ids, max_new_tokens=8, min_new_tokens=8, **GREEDY)
        with _patched(model, cfg, _RaisingGraph) as handle:
            out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, **GREEDY)
    _assert_same(out, ref)
    stats = handle.graphs.stats
    assert stats["eager: capture failed"] == 8 - 1 - handle.graphs.warmup and "replayed" not in stats, stats


def test_the_graph_holds_no_cache_and_a_new_prompt_releases_it(stand_in):
    """A finished conversation's cache must not live on through the graph: the captured output keeps its tensors
    only, and the next prompt drops the graph before its prefill allocates."""
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 150, (1, 24), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), _patched(model, ak.AccKVConfig(budget=0.5, backend="torch"), stand_in) as handle:
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, **GREEDY)
        captured = handle.graphs._captured
        assert captured is not None and set(captured.tensors) == {"logits"} and captured.cache_fields
        assert not any(v is output_cache(out) for v in vars(captured).values())
        model.generate(ids[:, :10], max_new_tokens=1, **GREEDY)
        assert handle.graphs._captured is None


def test_outputs_the_config_asks_for_and_given_cache_positions(stand_in):
    """config.output_hidden_states makes every step eager (the graph would hand out its own buffers); a loop that
    passes cache_position but no position_ids gets the model's positions from it."""
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 150, (1, 20), generator=torch.Generator().manual_seed(9))
    cfg = ak.AccKVConfig(budget=0.5, backend="torch")

    with torch.no_grad():
        with apply_acckv(model, cfg) as handle:
            ref = _hand_loop(model, ids, handle, 6, cache_position=True)
        with _patched(model, cfg, stand_in) as handle:
            out = _hand_loop(model, ids, handle, 6, cache_position=True)
            assert handle.graphs.stats["replayed"] >= 3, handle.graphs.stats
            model.config.output_hidden_states = True
            try:
                res = model.generate(ids, max_new_tokens=3, min_new_tokens=3, **GREEDY)
            finally:
                model.config.output_hidden_states = False
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert handle.graphs.stats["eager: outputs asked for"] == 3 and res.sequences.shape[1] == 23  # every forward


def test_dynamic_rope_is_refused():
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2,
                            rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))
    model = tf.LlamaForCausalLM._from_config(config).eval()
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        apply_acckv(model, ak.AccKVConfig(budget=0.5), decode_graphs=True)
    apply_acckv(model, ak.AccKVConfig(budget=0.5)).revert()  # eager AccKV is fine with it
