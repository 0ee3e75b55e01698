"""End-to-end suite (GPU): what a compressed cache buys a whole model's decode, in time and bytes.

``layer_stack_rows``: the attention side of a Qwen2.5-Omni-7B thinker (28 layers, 28/4 heads, D 128) on an AV
prompt of N tokens, per batch size. One decode step = for every layer, store the new token's K/V and attend.
    full, SDPA x    the baseline: a preallocated full cache (no copies on append) and
                    ``scaled_dot_product_attention`` with GQA over the valid prefix, under the default dispatch and
                    pinned to each SDPA backend; every ratio is against the fastest of these rows
    full, our kernel  ``BudgetedLayerCache`` at budget 1.0: the same cache read by our decode kernel (no mass
                    accumulation: nothing reads it at budget 1.0)
    AccKV b%        ``BudgetedLayerCache`` at budget b: prefill compressed once, decode on the compressed cache
                    through ``decode_step``, with the upkeep (re-compression at budget + slack) inside the timed steps
    ..., CUDA graph the same two stacks with every step that runs no upkeep replayed as one graph of all 28 layers
                    (GPU; the capture and the eager upkeep steps inside the timed window). The SDPA rows stay eager:
                    their key count changes every step, so no graph can replay them; the graph-mode full baseline is
                    ``generate``'s static cache compiled by transformers (below)
Decode is timed with CUDA events over ``steps`` steps after a warm-up, so the upkeep's cost is amortised as it is
in a real run (slack 64: one re-compression per layer per 64 steps). The prefill column is what AccKV adds at the
end of prefill per layer (window scores, policy, compaction into new storage), times 28, against the same layers'
causal prefill attention (SDPA). Bytes are the K/V and metadata held after the steps.

``generate_timing_rows``: ``model.generate`` timed whole (time to first token, decode ms per token, total) for
any model, unpatched under every SDPA backend against ``apply_acckv`` at each budget. The GPU runs it on
:func:`omni_shaped_model` with the Qwen2.5-Omni-7B thinker's real sizes (random weights, about 15 GB in bf16, so
the weight reads a user pays are in the ratio); the CPU on SmolLM2-135M's real weights.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from ..cache import BudgetedLayerCache
from ..config import AccKVConfig
from ..integrations.graphs import GRAPH_DECODE_AHEAD
from ..ops import window_scores
from .prefill import _av_metadata

GIB = 2**30


def _events_ms(fn: Callable[[], object], repeats: int) -> float:
    """Mean milliseconds per call of ``fn`` over ``repeats`` back-to-back calls, timed with CUDA events (wall
    clock without CUDA, which only the CPU tests use)."""
    if not torch.cuda.is_available():
        import time

        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1e3 * (time.perf_counter() - t0) / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


class _FullStack:
    """The baseline: one preallocated full cache per layer (no copies on append), SDPA (GQA) over the valid
    prefix (pin a backend around the calls with ``sdpa_kernel``)."""

    def __init__(self, k, v, num_layers: int, extra: int):
        B, Hkv, N, D = k.shape
        self.k = [torch.empty(B, Hkv, N + extra, D, device=k.device, dtype=k.dtype) for _ in range(num_layers)]
        self.v = [torch.empty_like(t) for t in self.k]
        for kl, vl in zip(self.k, self.v):
            kl[:, :, :N], vl[:, :, :N] = k, v
        self.length = N

    def step(self, q4, k1, v1) -> None:
        L = self.length
        for kl, vl in zip(self.k, self.v):
            kl[:, :, L:L + 1], vl[:, :, L:L + 1] = k1, v1
            F.scaled_dot_product_attention(q4, kl[:, :, :L + 1], vl[:, :, :L + 1], enable_gqa=True)
        self.length += 1

    def nbytes(self) -> int:
        return sum(t[:, :, :self.length].numel() * t.element_size() for t in self.k + self.v)


class _CompressedStack:
    """One ``BudgetedLayerCache`` per layer, prefilled with the same prompt; a step is each layer's
    :meth:`~acckv_triton.cache.BudgetedLayerCache.decode_step` (append, attention, mass, upkeep when due)."""

    def __init__(self, cfg: AccKVConfig, k, v, scores, meta, num_layers: int):
        self.layers = [BudgetedLayerCache(cfg, i, num_layers) for i in range(num_layers)]
        for layer in self.layers:
            layer.prefill(k, v, scores=scores, **meta)

    def step(self, q, k1, v1) -> None:
        for layer in self.layers:
            layer.decode_step(q, k1, v1)

    def nbytes(self) -> int:
        return sum(layer.store.nbytes() for layer in self.layers)


class _GraphedStack:
    """:class:`_CompressedStack` with every step that runs no upkeep replayed as one CUDA graph of all layers (the
    graph is captured at the first such step over a storage, and again if the storage is replaced); a step where
    some layer's upkeep is due runs eager. The same decode work as the eager stack, without its launch overhead."""

    def __init__(self, stack: _CompressedStack, graph_factory=None):
        from ..integrations.graphs import CudaGraph

        self.stack, self.graph_factory = stack, graph_factory or CudaGraph
        self.graph, self.binding = None, None
        self.replays = 0

    def step(self, q, k1, v1) -> None:
        layers = self.stack.layers
        if not all(layer.next_step_is_plain() for layer in layers):
            self.stack.step(q, k1, v1)
            return
        binding = tuple(layer.store.binding for layer in layers)
        if self.graph is None or binding != self.binding:
            self.graph = self.graph_factory(layers)
            counters = [layer.host_counters() for layer in layers]
            self.graph.capture(lambda: self.stack.step(q, k1, v1))  # recorded, not run: the host's counts go back
            for layer, c in zip(layers, counters):
                layer.restore_host_counters(c)
            self.binding = binding
        self.graph.replay()
        self.replays += 1
        for layer in layers:
            layer.count_replayed_step()

    def nbytes(self) -> int:
        return self.stack.nbytes()


def layer_stack_rows(device: torch.device, dtype: torch.dtype, lengths: Iterable[int] = (32768,),
                     batches: Iterable[int] = (1, 8), budgets: Iterable[float] = (0.25, 0.1), steps: int = 128,
                     warmup: int = 4, num_layers: int = 28, heads: tuple[int, int] = (28, 4), head_dim: int = 128,
                     timer: Callable[[Callable], float] | None = None,
                     progress: Callable[[Iterable], Iterable] = lambda x: x) -> list[dict]:
    """Decode ms per token over ``num_layers`` layers, prefill overhead and bytes held: full vs AccKV (see module)."""
    if timer is None:
        from .machine import gpu_timer as timer
    Hq, Hkv = heads
    D, W = head_dim, AccKVConfig().window
    rows = []
    for B, N in progress([(B, N) for B in batches for N in lengths]):
        need = 2 * B * Hkv * (N + steps + warmup) * D * dtype.itemsize * num_layers
        if device.type == "cuda" and need * 1.3 > torch.cuda.mem_get_info(device)[0]:
            rows.append({"B": B, "N": N, "cache": "all", "note": "skipped: the full cache does not fit in memory"})
            continue
        g = torch.Generator(device=device).manual_seed(N + B)
        k = torch.randn(B, Hkv, N, D, generator=g, device=device, dtype=dtype)
        v = torch.randn_like(k)
        q_prompt = torch.randn(B, Hq, N, D, generator=g, device=device, dtype=dtype)
        q = torch.randn(B, Hq, D, generator=g, device=device, dtype=dtype)
        k1, v1 = torch.randn(B, Hkv, 1, D, generator=g, device=device, dtype=dtype), \
            torch.randn(B, Hkv, 1, D, generator=g, device=device, dtype=dtype)
        modality, time, spatial = _av_metadata(N, device)
        meta = dict(modality=modality, time=time, spatial=spatial)
        t_attn = timer(lambda: F.scaled_dot_product_attention(q_prompt, k, v, is_causal=True, enable_gqa=True))
        scores = window_scores(q_prompt[:, :, -W:], k, modality=modality.view(1, 1, N).expand(B, Hkv, N)).scores
        del q_prompt

        base = {"B": B, "N": N, "layers": num_layers}
        full_rows = []
        for name, backend in [("default", None), *sdpa_backends(device).items()]:
            full = _FullStack(k, v, num_layers, steps + warmup)
            try:
                with sdpa_pin(backend):
                    for _ in range(warmup):
                        full.step(q.unsqueeze(2), k1, v1)
                    t = _events_ms(lambda: full.step(q.unsqueeze(2), k1, v1), steps)
            except RuntimeError as exc:  # a backend that does not take this shape / dtype
                full_rows.append({**base, "cache": f"full, SDPA {name}", "note": str(exc).splitlines()[0][:80]})
                continue
            finally:
                full_bytes = full.nbytes()
                del full
            full_rows.append({**base, "cache": f"full, SDPA {name}", "decode ms/token": t, "KV GiB": full_bytes / GIB,
                              "prefill extra ms": 0.0, "prefill extra % attn": 0.0})
        timed = [r for r in full_rows if "decode ms/token" in r]
        t_full = min(r["decode ms/token"] for r in timed)
        for r in timed:
            r["vs best full ×"] = t_full / r["decode ms/token"]
            r["KV % of full"] = 100.0
        rows += full_rows
        for budget in (1.0, *budgets):
            cfg = AccKVConfig(budget=budget)
            t_prefill = timer(lambda: BudgetedLayerCache(cfg, num_layers // 2, num_layers).prefill(
                k, v, scores=scores, **meta)) * num_layers
            name = "full, our kernel (budget 1.0)" if budget == 1.0 else f"AccKV {budget:.0%}"
            for mode in ("eager", "CUDA graph") if device.type == "cuda" else ("eager",):
                # graph mode sizes the storage ahead, as apply_acckv(decode_graphs=True) does
                run_cfg = cfg if mode == "eager" else cfg.replace(decode_ahead=GRAPH_DECODE_AHEAD)
                stack = _CompressedStack(run_cfg, k, v, scores, meta, num_layers)
                for _ in range(warmup):
                    stack.step(q, k1, v1)
                runner = stack if mode == "eager" else _GraphedStack(stack)
                t = _events_ms(lambda: runner.step(q, k1, v1), steps)
                held = stack.nbytes()
                rows.append({**base, "cache": name if mode == "eager" else f"{name}, CUDA graph",
                             "decode ms/token": t, "vs best full ×": t_full / t,
                             "KV GiB": held / GIB, "KV % of full": 100.0 * held / full_bytes,
                             "prefill extra ms": t_prefill,
                             "prefill extra % attn": 100.0 * t_prefill / (t_attn * num_layers)})
                del stack, runner
        del k, v
    return rows


def omni_shaped_model(num_layers: int = 28, hidden: int = 3584, heads: tuple[int, int] = (28, 4),
                      intermediate: int = 18944, vocab: int = 152064, dtype: torch.dtype = torch.bfloat16,
                      device: torch.device | str = "cuda"):
    """A randomly initialised Qwen2 causal LM with the Qwen2.5-Omni-7B thinker's sizes (7.6 B parameters, about
    15 GB in bf16): the attention, the cache and the weight reads of every decode step are the real model's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=num_layers, num_attention_heads=heads[0], num_key_value_heads=heads[1],
                         max_position_embeddings=1 << 18, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model.eval()


def _cache_nbytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def sdpa_backends(device: torch.device) -> dict[str, object]:
    """The SDPA backends a full-cache baseline can be pinned to on this device (name -> ``SDPBackend``)."""
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH") if device.type == "cuda" \
        else ("FLASH_ATTENTION", "MATH")
    return {name.lower(): getattr(SDPBackend, name) for name in names if hasattr(SDPBackend, name)}


def sdpa_pin(backend):
    """The context that pins SDPA to ``backend`` (an ``SDPBackend`` of :func:`sdpa_backends`); None: the default
    dispatch, nothing pinned."""
    return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()


class _FirstTokenClock:
    """A logits processor that stamps when ``generate`` first has logits (after the prompt's forward)."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.first = device, None, None

    def __call__(self, input_ids, scores):
        if self.first is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first = time.perf_counter()
        return scores


def timed_generate(run: Callable[[object], object], device: torch.device) -> tuple[float, float, object]:
    """``run(clock)`` (a ``generate`` call given ``clock`` as a logits processor) timed whole: ``(seconds to the
    first token's logits, total seconds, its result)``, the device synchronised around it."""
    from .machine import wall_timed

    clock = _FirstTokenClock(device)

    def go():
        clock.start = time.perf_counter()
        return run(clock)

    res, total = wall_timed(go, device)
    return clock.first - clock.start, total, res


def _generate_name(budget: float) -> str:
    """A generate row's name: budget 1.0 is our cache uncompressed (the model's own attention over our storage)."""
    return "our cache, budget 1.0 (uncompressed)" if budget >= 1.0 else f"AccKV {budget:.0%}"


@torch.no_grad()
def generate_timing_rows(model, ids: torch.Tensor, budgets: Iterable[float] = (0.25,), new_tokens: int = 256,
                         pin_sdpa: bool = True, label: str = "", repeats: int = 1,
                         graphs: bool | None = None, backends: Iterable[str] | None = None) -> list[dict]:
    """``model.generate`` timed whole: time to first token, decode ms per token and the total, unpatched and with
    ``apply_acckv`` at each budget, in one run.

    The unpatched model runs with transformers' own cache under the default SDPA dispatch and, with ``pin_sdpa``,
    pinned to each SDPA backend that runs here (``backends``: only those names, e.g. the fastest of a previous
    batch size); every ratio is against the fastest unpatched row (by total time).
    A budget of 1.0 is our own cache uncompressed (what storing into it costs, with no compression to pay it back).
    Our rows run the model's own SDPA calls (a prompt's attention where AccKV does not compute it, all of budget
    1.0's) pinned like the fastest full row timed before them in the round, so both sides have their best backend.
    With ``graphs`` (default: on CUDA) the graph mode of each side runs too: transformers' static cache, which
    ``generate`` compiles with ``torch.compile`` (CUDA graphs), as a full-cache row, and ``apply_acckv(...,
    decode_graphs=True)`` at each budget below 1.0 (captures and eager upkeep steps inside the timed window). The
    static cache (one length, prompt + new tokens + 1, allocated once and reset before each call) is compiled
    before timing, as a server would have it warm; its prefill runs through a dense mask over the whole static
    length (transformers cannot skip it there), so its TTFT is not the model's best prefill: the row is for
    decode ms/token.
    ``new_tokens`` decode steps all fall inside the timed window, upkeeps included (slack 64: one per 65 steps per
    layer). One ``generate`` of n + 1 tokens per row and round: TTFT is the time to the first token's logits in it
    (stamped by a logits processor, the device synchronised), decode ms/token ``(total - TTFT) / n``. ``repeats``
    takes each row's best (by total time) of that many rounds, every round running every variant once, so a slow
    spell of a shared machine falls on all of them.
    """
    from ..integrations.transformers import apply_acckv, cache_keyword, output_cache

    device = ids.device
    graphs = device.type == "cuda" if graphs is None else graphs
    kwargs = dict(do_sample=False, return_dict_in_generate=True, pad_token_id=0)

    static: dict[str, object] = {}  # one StaticCache, reset before each call: its addresses never change, so the
    # compiled graphs are recorded once (a new cache per call would re-record them inside the timed window)

    def generate(n, mode, prompt=ids, **extra):
        if mode == "static":
            from transformers import StaticCache

            name = cache_keyword(model)
            if not static:
                static[name] = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens + 1)
            static[name].reset()
            extra.update(static)
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs, **extra)

    def timed_generate_of(mode):  # (TTFT, total, result) of one generate of new_tokens + 1 tokens
        from transformers import LogitsProcessorList

        return timed_generate(lambda clock: generate(new_tokens + 1, mode,
                                                     logits_processor=LogitsProcessorList([clock])), device)

    # (name, budget or None for transformers' cache, SDPA backend or None, mode: None, "graphs" or "static")
    variants: list[tuple[str, float | None, object, str | None]] = [
        ("transformers (full), default SDPA", None, None, None)]
    if pin_sdpa:
        variants += [(f"transformers (full), SDPA {name}", None, backend, None)
                     for name, backend in sdpa_backends(device).items() if backends is None or name in backends]
    if graphs:
        variants.append(("transformers (full), static cache + torch.compile (decode; dense-mask prefill)", None, None,
                         "static"))
    variants += [(_generate_name(budget), budget, None, None) for budget in budgets]
    if graphs:
        variants += [(f"{_generate_name(budget)}, CUDA graphs", budget, None, "graphs")
                     for budget in budgets if budget < 1.0]
    warm = ids[:, : min(ids.shape[1], 64)]
    best: dict[str, tuple] = {}
    failed: dict[str, str] = {}
    # rounds outside, variants inside: a slow spell of a shared machine falls on every variant of a round, not on
    # all the repeats of one
    full_backend = {name: backend for name, budget, backend, mode in variants if budget is None and mode is None}
    ours_pinned: dict[str, str] = {}  # our rows: the SDPA backend of the fastest full row timed before them
    for round_ in range(repeats):
        for name, budget, backend, mode in variants:
            if name in failed:
                continue
            if budget is not None:  # the model's own SDPA calls (a prompt's, budget 1.0's) run as the best full row's
                timed_full = [n for n in full_backend if n in best]
                if timed_full:
                    fastest = min(timed_full, key=lambda n: best[n][1])
                    backend = full_backend[fastest]
                    ours_pinned[name] = fastest.split(", ")[-1]
            handle = None if budget is None else apply_acckv(model, AccKVConfig(budget=budget),
                                                              decode_graphs=mode == "graphs")
            replays = None
            try:
                with sdpa_pin(backend):
                    if round_ == 0 and mode == "static":  # compiled before any timing, as a server has it
                        generate(3, mode)
                    elif round_ == 0:  # warm-up on a short prompt: kernels compiled, allocator primed
                        generate(2, mode, warm)
                    t1, tn, res = timed_generate_of(mode)
            except Exception as exc:  # a pinned backend that does not take this shape, a compile that fails
                failed[name] = f"not run: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                continue
            finally:
                if handle is not None:
                    replays = handle.graphs.stats["replayed"] if handle.graphs is not None else None
                    handle.revert()
            if name not in best or tn < best[name][1]:
                best[name] = (t1, tn, _cache_nbytes(output_cache(res)), replays)
            del res
    rows = []
    for name, _, _, mode in variants:
        if name in failed:
            rows.append({"model": label, "cache": name, "note": failed[name]})
            continue
        t1, tn, nbytes, replays = best[name]
        row = {"model": label, "B": ids.shape[0], "prompt": ids.shape[1], "new tokens": new_tokens,
               "cache": name, "TTFT s": t1, "decode ms/token": 1e3 * (tn - t1) / new_tokens, "total s": tn,
               "cache GiB": nbytes / GIB}
        notes = []
        if name in ours_pinned:
            notes.append(f"model's SDPA as the fastest full row: {ours_pinned[name]}")
        if mode == "graphs":
            notes.append(f"{replays} of its {new_tokens} decode steps replayed")
        if notes:
            row["note"] = "; ".join(notes)
        rows.append(row)
    timed_rows = [r for r in rows if "total s" in r]
    full = [r for r in timed_rows if r["cache"].startswith("transformers")]
    if full:
        best_full = min(full, key=lambda r: r["total s"])
        for r in timed_rows:
            r["decode / best full"] = r["decode ms/token"] / best_full["decode ms/token"]
            r["TTFT / best full"] = r["TTFT s"] / best_full["TTFT s"]
            r["total / best full"] = r["total s"] / best_full["total s"]
            r["cache % of full"] = 100.0 * r["cache GiB"] / best_full["cache GiB"]
        best_full["cache"] += " (best full)"
    return rows


def profile_stack(device: torch.device, dtype: torch.dtype, N: int = 32768, B: int = 1, budget: float = 0.25,
                  steps: int = 3, num_layers: int = 28, heads: tuple[int, int] = (28, 4), head_dim: int = 128) -> str:
    """A ``torch.profiler`` summary (top ops by device time, then by host time) of ``steps`` decode steps of the
    28-layer AccKV stack at ``budget``, after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    Hq, Hkv = heads
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(B, Hkv, N, head_dim, generator=g, device=device, dtype=dtype)
    modality, time, spatial = _av_metadata(N, device)
    scores = torch.rand(B, Hkv, N, generator=g, device=device)
    stack = _CompressedStack(AccKVConfig(budget=budget), k, k, scores, dict(modality=modality, time=time,
                                                                          spatial=spatial), num_layers)
    del k
    q = torch.randn(B, Hq, head_dim, generator=g, device=device, dtype=dtype)
    k1 = torch.randn(B, Hkv, 1, head_dim, generator=g, device=device, dtype=dtype)
    for _ in range(4):
        stack.step(q, k1, k1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            stack.step(q, k1, k1)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return (f"{steps} decode steps, {num_layers} layers, B {B}, N {N}, AccKV {budget:.0%}\n\n"
            + prof.key_averages().table(sort_by=sort, row_limit=25) + "\n\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
