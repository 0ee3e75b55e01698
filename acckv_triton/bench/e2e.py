"""End-to-end suite (GPU): what a compressed cache buys a whole model's decode, in time and bytes.

``layer_stack_rows``: the attention side of a Qwen2.5-Omni-7B thinker (28 layers, 28/4 heads, D 128) on an AV
prompt of N tokens, per batch size. One decode step = for every layer, store the new token's K/V and attend.
    full (SDPA)     the baseline: a preallocated full cache (no copies on append) and
                    ``scaled_dot_product_attention`` with GQA over the valid prefix
    full (fused)    ``BudgetedLayerCache`` at budget 1.0: the same cache read by the fused kernel, which also
                    accumulates per-token and per-modality mass
    AccKV b%        ``BudgetedLayerCache`` at budget b: prefill compressed once, decode on the compressed cache,
                    with the upkeep (re-compression at budget + slack) inside the timed steps
Decode is timed with CUDA events over ``steps`` steps after a warm-up, so the upkeep's cost is amortised as it is
in a real run (slack 64: one re-compression per layer per 64 steps). The prefill column is what AccKV adds at the
end of prefill per layer (window scores, policy, compaction into new storage), times 28, against the same layers'
causal prefill attention (SDPA). Bytes are the K/V and metadata held after the steps.

``generate_rows``: ``model.generate`` of a randomly initialised Qwen2 model with the thinker's attention shape
(28 layers, hidden 3584, 28/4 heads, D 128; a smaller MLP and vocabulary, which do not change the attention or
the cache), unpatched (transformers' own cache, SDPA) against ``apply_acckv`` at each budget: prefill time,
decode ms per token and the cache's bytes. Random weights: speed and memory only, no fidelity.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..cache import BudgetedLayerCache
from ..config import AccKVConfig
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
    """The baseline: one preallocated full cache per layer, SDPA (GQA) over the valid prefix."""

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
    """One ``BudgetedLayerCache`` per layer, prefilled with the same prompt."""

    def __init__(self, cfg: AccKVConfig, k, v, scores, meta, num_layers: int):
        self.layers = [BudgetedLayerCache(cfg, i, num_layers) for i in range(num_layers)]
        for layer in self.layers:
            layer.prefill(k, v, scores=scores, **meta)

    def step(self, q, k1, v1) -> None:
        for layer in self.layers:
            layer.append(k1, v1)
            layer.decode_attention(q)

    def nbytes(self) -> int:
        return sum(layer.store.nbytes() for layer in self.layers)


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

        full = _FullStack(k, v, num_layers, steps + warmup)
        for _ in range(warmup):
            full.step(q.unsqueeze(2), k1, v1)
        t_full = _events_ms(lambda: full.step(q.unsqueeze(2), k1, v1), steps)
        full_bytes = full.nbytes()
        del full
        base = {"B": B, "N": N, "layers": num_layers}
        rows.append({**base, "cache": "full (SDPA)", "decode ms/token": t_full, "vs full SDPA ×": 1.0,
                     "KV GiB": full_bytes / GIB, "KV % of full": 100.0, "prefill extra ms": 0.0,
                     "prefill extra % attn": 0.0})
        for budget in (1.0, *budgets):
            cfg = AccKVConfig(budget=budget)
            t_prefill = timer(lambda: BudgetedLayerCache(cfg, num_layers // 2, num_layers).prefill(
                k, v, scores=scores, **meta)) * num_layers
            stack = _CompressedStack(cfg, k, v, scores, meta, num_layers)
            for _ in range(warmup):
                stack.step(q, k1, v1)
            t = _events_ms(lambda: stack.step(q, k1, v1), steps)
            held = stack.nbytes()
            name = "full (fused kernel)" if budget == 1.0 else f"AccKV {budget:.0%}"
            rows.append({**base, "cache": name, "decode ms/token": t, "vs full SDPA ×": t_full / t,
                         "KV GiB": held / GIB, "KV % of full": 100.0 * held / full_bytes,
                         "prefill extra ms": t_prefill, "prefill extra % attn": 100.0 * t_prefill / (t_attn * num_layers)})
            del stack
        del k, v
    return rows


def omni_shaped_model(num_layers: int = 28, hidden: int = 3584, heads: tuple[int, int] = (28, 4),
                      intermediate: int = 2048, vocab: int = 8192, dtype: torch.dtype = torch.bfloat16,
                      device: torch.device | str = "cuda"):
    """A randomly initialised Qwen2 causal LM with the Qwen2.5-Omni-7B thinker's attention and cache shape."""
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


@torch.no_grad()
def generate_rows(device: torch.device, model=None, prompt: int = 32768, new_tokens: int = 64,
                  budgets: Iterable[float] = (0.25, 0.1), batch: int = 1) -> list[dict]:
    """``generate`` unpatched vs patched at each budget: prefill s, decode ms/token and cache bytes (see module)."""
    import time

    from ..integrations.transformers import apply_acckv

    model = model if model is not None else omni_shaped_model(device=device)
    g = torch.Generator(device=device).manual_seed(prompt)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g, device=device)
    kwargs = dict(do_sample=False, return_dict_in_generate=True, pad_token_id=0)

    def timed(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, res

    rows, base = [], None
    for budget in (None, *budgets):
        handle = None if budget is None else apply_acckv(model, AccKVConfig(budget=budget))
        try:
            timed(2)  # warm-up: kernels compiled, allocator primed
            t1, _ = timed(1)
            tn, res = timed(new_tokens + 1)
            cache = getattr(res, "cache", None)  # transformers >= 5.24 names it cache, before past_key_values
            nbytes = _cache_nbytes(cache if cache is not None else res.past_key_values)
        finally:
            if handle is not None:
                handle.revert()
        per_token = 1e3 * (tn - t1) / new_tokens
        row = {"B": batch, "prompt": prompt, "new tokens": new_tokens,
               "cache": "transformers (full)" if budget is None else f"AccKV {budget:.0%}",
               "prefill s": t1, "decode ms/token": per_token, "cache GiB": nbytes / GIB}
        if base is None:
            base = row
        row["decode vs full ×"] = base["decode ms/token"] / per_token
        row["cache % of full"] = 100.0 * nbytes / (base["cache GiB"] * GIB)
        rows.append(row)
        del res
    return rows
