"""What compression costs at the end of prefill, and how fast the compaction kernel moves bytes.

``cost_rows`` (GPU): per prompt length, one layer of a Qwen2.5-Omni-7B-shaped thinker (28/4 heads, D 128) with an
AV token layout. It times the layer's causal prefill attention (SDPA, the fastest pinned backend: the baseline every
ratio refers to), then what AccKV adds: ``window_scores`` (W = 32, with its own logsumexp pass), the policy
(``plan_layer_fused``: a few kernels, no sync) and ``compact_kv`` into new storage, and their sum. Target: the sum
<= 5% of the attention at 32k. Also the every-query evidence (``observed_attention``: its key-mass passes alone,
and with the attention output, which would replace SDPA on the prefill).

``upkeep_rows`` (GPU): one decode-time re-compression (policy + in-place compaction) of a layer holding 8k tokens.
Target: <= 1 ms.

``chunk_rows`` (GPU): ``chunk_attention`` (a 512-token second question over 8k / 32k stored slots) against SDPA
over the same keys with the same mask, every backend that takes a mask pinned, the fastest the baseline. Target:
within 1.3x.

``device_op_rows`` (any machine): the end of prefill of one 32k-token layer through ``BudgetedLayerCache.prefill``
on the kernel path, counted: torch ops, Triton launches, host syncs, per method (the kernels are counted, not run).

``compaction_rows``: ``compact_kv`` (out of place, what the cache uses when it shrinks) and ``compact_kv_`` (in
place, through a strip) on a random plan keeping 25% of every row, against ``torch.gather`` + ``copy_`` on the same
plan, with GB/s over the minimal bytes (each kept K/V row read once and written once) and % of the copy bandwidth.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .. import workloads
from ..config import AccKVConfig
from ..cache import BudgetedLayerCache
from ..ops import chunk_attention, compact_kv, compact_kv_, observed_attention, window_scores
from ..policy import budget_tokens
from ..fused_policy import plan_layer_fused
from ..policy import LayerTokens


def _av_metadata(n: int, device: torch.device):
    """Modality, time and (h, w) of an n-token AV prompt laid out as Qwen2.5-Omni lays it out (12x12 patches)."""
    per_chunk = 2 * 12 * 12 + 50
    cfg = workloads.AVWorkloadConfig(grid_h=12, grid_w=12, num_chunks=max(1, (n - 48) // per_chunk), num_events=0)
    modality, time, spatial, *_ = workloads._layout(cfg, torch.Generator().manual_seed(0))
    pad = n - modality.numel()  # fill up with text so the prompt has exactly n tokens
    modality = torch.cat([modality, torch.zeros(pad, dtype=modality.dtype)])
    time = torch.cat([time, time[-1] + 1 + torch.arange(pad)])
    spatial = torch.cat([spatial, torch.full((pad, 2), -1, dtype=spatial.dtype)])
    return modality.to(device), time.to(device), spatial.to(device)


def _sdpa_best(fn_for_backend, timer) -> tuple[float, str]:
    """The fastest of the SDPA backends that run ``fn_for_backend()``, each pinned: (ms, backend name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = (float("inf"), "none")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                fn_for_backend()
                t = timer(fn_for_backend)
        except RuntimeError:  # this backend does not take these inputs
            continue
        best = min(best, (t, backend.name.lower()))
    return best


def cost_rows(device: torch.device, dtype: torch.dtype, lengths: Iterable[int] = (8192, 32768, 131072),
              heads: tuple[int, int] = (28, 4), head_dim: int = 128, window: int = 32,
              timer: Callable[[Callable], float] | None = None) -> list[dict]:
    """Per prompt length: prefill attention time and AccKV's additions, each also as % of the attention."""
    if timer is None:
        from .machine import gpu_timer as timer
    Hq, Hkv = heads
    cfg = AccKVConfig(budget=0.2, window=window)
    rows = []
    for n in lengths:
        g = torch.Generator(device=device).manual_seed(n)
        q = torch.randn(1, Hq, n, head_dim, generator=g, device=device, dtype=dtype)
        k = torch.randn(1, Hkv, n, head_dim, generator=g, device=device, dtype=dtype)
        v = torch.randn_like(k)
        modality, time, spatial = _av_metadata(n, device)
        mod = modality.view(1, 1, n).expand(1, Hkv, n).contiguous()
        t_attn, backend = _sdpa_best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                                     timer)
        t_scores = timer(lambda: window_scores(q[:, :, -window:], k, modality=mod, check_modality=False))
        scores = window_scores(q[:, :, -window:], k, modality=mod).scores
        x = LayerTokens(scores=scores, modality=mod, lengths=torch.full((1, Hkv), n, dtype=torch.int32, device=device),
                        time=time.view(1, 1, n).expand(1, Hkv, n).to(torch.int32), keys=k,
                        spatial=spatial.view(1, 1, n, 2).expand(1, Hkv, n, 2).to(torch.int32))
        target_max = budget_tokens(cfg, n, 0, 1)
        target = torch.full((1, Hkv), target_max, dtype=torch.long, device=device)
        t_policy = timer(lambda: plan_layer_fused(cfg, x, target=target, max_keep=target_max))
        plan = plan_layer_fused(cfg, x, target=target, max_keep=target_max).plan
        K = plan.keep.shape[-1]
        out_k = torch.empty(1, Hkv, K, head_dim, device=device, dtype=dtype)
        out_v = torch.empty_like(out_k)
        t_compact = timer(lambda: compact_kv(k, v, x.lengths, plan.keep, plan.keep_lengths, out_k=out_k, out_v=out_v,
                                             merge_target=plan.merge_target, merge_weight=plan.merge_weight,
                                             check_plan=False))
        total = t_scores + t_policy + t_compact
        # every-query evidence (text prompts, H2O): the key-mass passes alone, and with the output (in place of SDPA)
        t_observed = timer(lambda: observed_attention(q, k))
        t_observed_out = timer(lambda: observed_attention(q, k, v))
        rows.append({
            "N": n, "Hq/Hkv": f"{Hq}/{Hkv}", "attention ms": t_attn, "SDPA backend": backend,
            "window_scores ms": t_scores, "scores % attn": 100 * t_scores / t_attn,
            "observed mass ms": t_observed, "observed % attn": 100 * t_observed / t_attn,
            "observed+out / SDPA": t_observed_out / t_attn,
            "policy ms": t_policy, "policy % attn": 100 * t_policy / t_attn,
            "compact ms": t_compact, "compact % attn": 100 * t_compact / t_attn,
            "sum ms": total, "sum % attn": 100 * total / t_attn,
        })
        del q, k, v, x, plan, out_k, out_v
    return rows


def upkeep_rows(device: torch.device, dtype: torch.dtype, stored: int = 8192, heads: tuple[int, int] = (28, 4),
                head_dim: int = 128, timer: Callable[[Callable], float] | None = None) -> list[dict]:
    """One decode-time upkeep (the policy on token_mass, then the in-place compaction) at ``stored`` tokens."""
    if timer is None:
        from .machine import gpu_timer as timer
    Hq, Hkv = heads
    rows = []
    for method in ("acckv", "snapkv"):
        cfg = AccKVConfig(budget=stored, method=method)
        cache = BudgetedLayerCache(cfg, 0, 1)
        n = stored + cfg.slack + 1
        g = torch.Generator(device=device).manual_seed(0)
        k = torch.randn(1, Hkv, n, head_dim, generator=g, device=device, dtype=dtype)
        modality, time, spatial = _av_metadata(n, device)
        cache.prefill(k, torch.randn_like(k), scores=torch.rand(1, Hkv, n, generator=g, device=device),
                      modality=modality.view(1, n), time=time.view(1, n).int(), spatial=spatial.view(1, n, 2).int())
        st = cache.store

        def upkeep():
            st.lengths.fill_(n)  # back to target + slack + 1 rows: the same work every time
            cache.compress(upkeep=True)

        rows.append({"method": method, "stored": stored, "upkeep ms": timer(upkeep)})
        del cache, k
    return rows


def chunk_rows(device: torch.device, dtype: torch.dtype, stored: Iterable[int] = (8192, 32768), chunk: int = 512,
               heads: tuple[int, int] = (28, 4), head_dim: int = 128,
               timer: Callable[[Callable], float] | None = None) -> list[dict]:
    """chunk_attention against SDPA (best pinned backend) over the same stored + chunk keys and the same mask."""
    if timer is None:
        from .machine import gpu_timer as timer
    Hq, Hkv = heads
    rows = []
    for S in stored:
        g = torch.Generator(device=device).manual_seed(S)
        rnd = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
        q, kc, vc, kn, vn = rnd(1, Hq, chunk, head_dim), rnd(1, Hkv, S, head_dim), rnd(1, Hkv, S, head_dim), \
            rnd(1, Hkv, chunk, head_dim), rnd(1, Hkv, chunk, head_dim)
        lengths = torch.full((1, Hkv), S, dtype=torch.int32, device=device)
        mult = torch.ones(1, Hkv, S, device=device)
        t_ours = timer(lambda: chunk_attention(q, kc, vc, lengths, kn, vn, multiplicity=mult))
        k_all, v_all = torch.cat([kc, kn], 2), torch.cat([vc, vn], 2)
        mask = torch.ones(chunk, S + chunk, dtype=torch.bool, device=device)
        mask[:, S:] = torch.ones(chunk, chunk, dtype=torch.bool, device=device).tril()
        t_sdpa, backend = _sdpa_best(lambda: F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask,
                                                                             enable_gqa=True), timer)
        rows.append({"stored": S, "chunk": chunk, "Hq/Hkv": f"{Hq}/{Hkv}", "chunk_attention ms": t_ours,
                     "SDPA ms (best)": t_sdpa, "SDPA backend": backend, "ours / SDPA": t_ours / t_sdpa,
                     "note": "ours also returns the window's mass on every key"})
        del q, kc, vc, kn, vn, k_all, v_all
    return rows


def device_op_rows(n: int = 32768, num_kv_heads: int = 4, head_dim: int = 128, budget: float = 0.2) -> list[dict]:
    """Per method: torch ops, Triton launches and host syncs of one layer's end of prefill (kernel path, counted)."""
    from ..config import METHODS
    from .opcount import OpCounter, count_triton_launches

    cpu = torch.device("cpu")
    modality, time, spatial = _av_metadata(n, cpu)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, num_kv_heads, n, head_dim, generator=g).half()
    prompt = dict(k=k, v=torch.randn_like(k), scores=torch.rand(1, num_kv_heads, n, generator=g),
                  modality=modality.view(1, n), time=time.view(1, n).int(), spatial=spatial.view(1, n, 2).int())
    rows = []

    def row(method: str, ops, launches, syncs: int, note: str) -> dict:
        n_launches = sum(launches.values())
        return {"method": method, "N": n, "torch ops": ops.ops, "Triton launches": n_launches,
                "device ops": ops.ops + n_launches, "host syncs": syncs, "note": note}

    for method in METHODS:
        cfg = AccKVConfig(budget=budget, method=method, backend="triton")
        cache = BudgetedLayerCache(cfg, 3, 28)
        # counted without running the kernels where the host reads nothing back; Ada-KV's rows (and KVzip's) read
        # the longest row back to size the storage, so they run for real (interpreted: seconds)
        with count_triton_launches(dry_run=not cfg.adaptive_heads) as launches, OpCounter() as ops:
            cache.prefill(**prompt)
            if cache.awaiting_reconstruction:  # kvzip compresses after its second pass (a model forward, not here)
                cache.end_reconstruction()
        rows.append(row(method, ops, launches, ops.syncs,
                        "+ a second forward over the prompt (reconstruction)" if method == "kvzip" else ""))
    # AccKV on a text prompt: every query's mean as evidence, from prompt_attention (the prompt's attention and its
    # evidence in one pass, which also finds the broad rows), then the prefill
    cache = BudgetedLayerCache(AccKVConfig(budget=budget, backend="triton"), 3, 28)
    q = k.repeat_interleave(2, dim=1)  # G = 2 (only the counts matter)
    with count_triton_launches(dry_run=True) as launches, OpCounter() as ops:
        _, scores = cache.prompt_attention(q, k, prompt["v"], audio_video=False)
    attention_ops, attention_syncs, attention_launches = ops.ops, ops.syncs, sum(launches.values())
    with count_triton_launches(dry_run=True) as launches, OpCounter() as ops:
        cache.prefill(k, prompt["v"], scores=scores)
    rows.append(row("acckv, text prompt", ops, launches, ops.syncs + attention_syncs,
                    f"+ prompt_attention's {attention_launches} launches and {attention_ops} torch ops "
                    "(outputs, broad-row rule)"))
    return rows


def compaction_rows(device: torch.device, dtype: torch.dtype, batches: Iterable[int] = (1, 32), num_kv_heads: int = 4,
                    capacity: int = 32768, head_dim: int = 128, keep_fraction: float = 0.25,
                    timer: Callable[[Callable], float] | None = None, copy_gbs: float | None = None) -> list[dict]:
    """compact_kv / compact_kv_ against torch.gather + copy_ on one random plan per batch size."""
    if timer is None:
        from .machine import gpu_timer as timer
    rows = []
    for B in batches:
        Hkv, C, D = num_kv_heads, capacity, head_dim
        K = max(1, int(C * keep_fraction))
        g = torch.Generator(device=device).manual_seed(B)
        k = torch.randn(B, Hkv, C, D, generator=g, device=device, dtype=dtype)
        v = torch.randn_like(k)
        keep = torch.rand(B, Hkv, C, generator=g, device=device).argsort(-1)[..., :K].sort(-1).values.to(torch.int32)
        keep_lengths = torch.full((B, Hkv), K, dtype=torch.int32, device=device)
        lengths = torch.full((B, Hkv), C, dtype=torch.int32, device=device)
        out_k, out_v = torch.empty(B, Hkv, K, D, device=device, dtype=dtype), torch.empty(B, Hkv, K, D, device=device,
                                                                                        dtype=dtype)
        idx = keep.long()[..., None].expand(-1, -1, -1, D)

        def torch_gather():
            out_k.copy_(torch.gather(k, 2, idx))
            out_v.copy_(torch.gather(v, 2, idx))

        def in_place():
            lengths.fill_(C)  # the previous call set lengths to K; the bytes moved are the same every time
            compact_kv_(k, v, lengths, keep, keep_lengths, check_plan=False)

        t_out = timer(lambda: compact_kv(k, v, lengths, keep, keep_lengths, out_k=out_k, out_v=out_v,
                                         check_plan=False))
        t_in = timer(in_place)
        t_torch = timer(torch_gather)
        moved = 2 * 2 * B * Hkv * K * D * dtype.itemsize  # K and V rows, each read once and written once
        row = {"B": B, "Hkv": Hkv, "C": C, "kept": K, "compact_kv ms": t_out, "compact_kv_ ms": t_in,
               "gather+copy ms": t_torch, "compact_kv GB/s": moved / (t_out * 1e-3) / 1e9,
               "compact_kv_ GB/s": moved / (t_in * 1e-3) / 1e9, "compact_kv vs torch ×": t_torch / t_out}
        if copy_gbs:
            row["compact_kv % copy"] = 100 * row["compact_kv GB/s"] / copy_gbs
            row["compact_kv_ % copy (4 passes: strip)"] = 100 * 2 * row["compact_kv_ GB/s"] / copy_gbs
        rows.append(row)
        del k, v, out_k, out_v
    return rows
