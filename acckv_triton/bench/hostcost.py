"""Host cost of one decode layer-step, measurable without a GPU: torch ops, Triton launches, syncs, allocations, µs.

At the Qwen2.5-Omni-7B thinker's attention shape (B 1, 28/4 heads, D 128), for one layer's decode step:

    transformers      DynamicCache.update (two ``torch.cat``) + SDPA with GQA: what the unpatched model does
    decode_step (kernels)   ``BudgetedLayerCache.decode_step`` with the Triton kernels: ops and launches counted
                      through the interpreter (the same ops a GPU runs), host µs with the two launches stubbed out
                      (our code alone; Triton's argument binding adds about 10 µs per launch, see NOTES.md)
    decode_step (torch)     the same step on the torch backend (CPU storage); µs include the CPU's own compute at
                      ``stored`` tokens
    graph replay      ``apply_acckv(..., decode_graphs=True)``'s switch for a whole 28-layer decode forward that
                      replays (the plain-step check over every layer, the input copies, the host counters, the
                      output copy), with the replay itself stubbed: per layer-step = the whole step's / 28; a real
                      replay adds one graph launch a step (about 5-10 µs), no per-layer launch

Counts come from :class:`~acckv_triton.bench.opcount.OpCounter` over ``steps`` steps after the plan is built,
without an upkeep among them; they do not depend on the cache length.
"""
from __future__ import annotations

import time

import torch

from ..cache import BudgetedLayerCache
from ..config import AccKVConfig
from ..ops import append_token as append_module
from .opcount import OpCounter, count_triton_launches

__all__ = ["host_cost_rows"]


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _per_step(fn, steps: int) -> dict:
    with count_triton_launches() as launches, OpCounter() as ops:
        for _ in range(steps):
            fn()
    return {"torch ops": ops.ops / steps, "Triton launches": sum(launches.values()) / steps,
            "host syncs": ops.syncs / steps, "allocations": ops.allocations / steps}


def _host_us(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return 1e6 * (time.perf_counter() - t0) / steps


def _prefilled(backend: str, B, Hkv, N, D, budget=0.25, slack=64):
    g = torch.Generator().manual_seed(0)
    cache = BudgetedLayerCache(AccKVConfig(budget=budget, backend=backend, slack=slack), 0, 1)
    k = torch.randn(B, Hkv, N, D, generator=g)
    cache.prefill(k, torch.randn(B, Hkv, N, D, generator=g), scores=torch.rand(B, Hkv, N, generator=g))
    cache._excess = -(1 << 40)  # the timed steps run no upkeep (its cost is in the e2e rows, amortised)
    return cache


def host_cost_rows(heads: tuple[int, int] = (28, 4), head_dim: int = 128, stored: int = 8192, steps: int = 20,
                   timed_steps: int = 200) -> list[dict]:
    """One row per decode path (see the module docstring): per layer-step ops, launches, syncs, allocations, µs."""
    from transformers import DynamicCache

    Hq, Hkv = heads
    B, D = 1, head_dim
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hq, D, generator=g)
    k1 = torch.randn(B, Hkv, 1, D, generator=g)
    rows = []

    # transformers' decode step for one layer: DynamicCache.update + SDPA over the whole cache (counted at 256)
    dyn = DynamicCache()
    dyn.update(torch.randn(B, Hkv, 256, D, generator=g), torch.randn(B, Hkv, 256, D, generator=g), 0)

    def plain_step():
        kk, vv = dyn.update(k1, k1, 0)
        torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, enable_gqa=True)

    rows.append({"path": "transformers: DynamicCache + SDPA (full cache)", **_per_step(plain_step, steps),
                 "host µs": None, "note": "concatenates the whole cache each step; µs: CPU compute, not comparable"})

    # our step with the kernels: counts through the interpreter (a small cache: counts do not depend on it)
    cache = _prefilled("triton", B, Hkv, 256, D, slack=timed_steps + steps + 8)  # room for every step
    step = lambda: cache.decode_step(q, k1, k1)  # noqa: E731
    step()
    counts = _per_step(step, steps)
    plan = next(iter(cache.store._plans.values()))
    plan._split = plan._reduce = lambda **args: None  # launches stubbed: our own host work only
    kernel = append_module._append_token_kernel
    append_module._append_token_kernel = _NoLaunch()
    try:
        us = _host_us(step, timed_steps)
    finally:
        append_module._append_token_kernel = kernel
    rows.append({"path": "decode_step, Triton kernels", **counts, "host µs": us,
                 "note": "µs: launches stubbed (add Triton's binding, about 10 µs per launch)"})

    cache = _prefilled("torch", B, Hkv, 4 * stored, D)
    step = lambda: cache.decode_step(q, k1, k1)  # noqa: E731
    step()
    rows.append({"path": f"decode_step, torch backend ({cache.store.max_length} stored)", **_per_step(step, steps),
                 "host µs": _host_us(step, max(20, timed_steps // 10)),
                 "note": "µs include the CPU's attention compute"})
    rows.append(_graph_replay_row(B, Hq, Hkv, D, steps, timed_steps))
    return rows


class _StubGraph:
    """A graph whose capture runs the call once and whose replay does nothing (host cost only)."""

    device_type = "cpu"

    def __init__(self, cache):
        pass

    def capture(self, fn):
        return fn()

    def replay(self):
        pass


def _graph_replay_row(B, Hq, Hkv, D, steps: int, timed_steps: int, num_layers: int = 28) -> dict:
    """The decode-graph switch's host cost for a replayed step of a ``num_layers``-layer model (see the module)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ..integrations.graphs import DecodeGraphs
    from ..integrations.transformers import AccKVCache

    cache = AccKVCache(AccKVConfig(budget=0.25, backend="torch"), num_layers)
    g = torch.Generator().manual_seed(2)
    for layer in cache.compressed_layers:
        k = torch.randn(B, Hkv, 256, D, generator=g)
        layer.budgeted.prefill(k, k, scores=torch.rand(B, Hkv, 256, generator=g))
        layer.budgeted._excess = -(1 << 40)  # no upkeep due in the timed steps
    logits = torch.zeros(B, 1, 1024)
    name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"  # 5.24 / 5.17
    forward = lambda **kw: CausalLMOutputWithPast(logits=logits, **{name: cache})  # noqa: E731
    graphs = DecodeGraphs(type("Model", (), {"config": None})(), graph_factory=_StubGraph)
    ids, pos = torch.zeros(B, 1, dtype=torch.long), torch.zeros(B, 1, dtype=torch.long)
    start = cache.host_counters()

    @torch.no_grad()  # as generate runs it
    def step():
        graphs(forward, input_ids=ids, position_ids=pos, use_cache=True, return_dict=True, logits_to_keep=1,
               **{name: cache})
        cache.restore_host_counters(start)  # every timed step is the same replayable step

    for _ in range(graphs.warmup + 1):  # warm-up, then the capture
        step()
    counts = _per_step(step, steps)
    us = _host_us(step, timed_steps)
    replayed = graphs.stats["replayed"]
    return {"path": f"decode forward replayed as one CUDA graph ({num_layers} layers)",
            **{k: v / num_layers for k, v in counts.items()}, "host µs": us / num_layers,
            "note": f"per layer-step = whole step / {num_layers} ({us:.0f} µs a step, {counts['torch ops']:.0f} ops, "
                    f"{counts['allocations']:.0f} allocations: the output copy); the replay stubbed "
                    f"({replayed} replayed)"}
