"""The decode-attention suite: accuracy against the reference, and (on a GPU) speed against named baselines.

Speed rows, per (batch, heads, length), all measured in one run on the same cache:
    fused       decode_attention with per-modality and per-token mass accumulation (what AccKV decodes with)
    plain       the same kernel with ``modality=None, token_mass=None``; the overhead of each half of the mass
                work is timed too (``modality`` alone, ``token_mass`` alone)
    sdpa        ``torch.nn.functional.scaled_dot_product_attention`` on the same cache (GQA, uniform length); every
                backend that accepts the shape is timed and the fastest is the baseline, named in the row
    sdpa+eager  what H2O/kvpress-style methods do today: SDPA, then a separate eager ``softmax(q·Kᵀ)`` pass that
                recomputes the probabilities and adds the group sum into the token mass
Bandwidth counts the bytes the plain kernel must move: K and V of the valid tokens plus q and out.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .. import reference
from ..modality import NUM_MODALITIES
from ..ops.decode_attention import decode_attention

# (Hq, Hkv) of the models the issue names: Qwen2.5-Omni-7B thinker (28/4) and Llama-3-8B-like (32/8).
DEFAULT_HEADS = ((28, 4), (32, 8))
DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_LENGTHS = (4096, 16384, 32768, 131072)


def _random_cache(B, Hq, Hkv, C, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, C, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, C, D, generator=g, device=device, dtype=dtype)
    mod = torch.randint(0, NUM_MODALITIES, (B, Hkv, C), generator=g, device=device, dtype=torch.uint8)
    return q, k, v, mod


def accuracy_rows(device: torch.device, dtypes: Iterable[torch.dtype]) -> list[dict]:
    """Max abs error of the kernel against the float64 reference on small ragged caches."""
    rows = []
    shapes = [(2, 28, 4, 300, 128, "ragged"), (1, 32, 8, 257, 128, "uniform"), (3, 9, 3, 200, 64, "ragged")]
    for dtype in dtypes:
        for B, Hq, Hkv, C, D, kind in shapes:
            q, k, v, mod = _random_cache(B, Hq, Hkv, C, D, dtype, device, seed=B * C)
            if kind == "ragged":
                g = torch.Generator(device=device).manual_seed(C)  # the same ragged lengths on every run
                lengths = torch.randint(0, C + 1, (B, Hkv), generator=g, device=device, dtype=torch.int32)
                lengths[0, 0] = 0
            else:
                lengths = torch.full((B, Hkv), C, device=device, dtype=torch.int32)
            mass, ref_mass = torch.zeros(B, Hkv, C, device=device), torch.zeros(B, Hkv, C, device=device)
            got = decode_attention(q, k, v, lengths, modality=mod, token_mass=mass)
            want = reference.decode_attention(q, k, v, lengths, modality=mod, token_mass=ref_mass)
            finite = want.lse > float("-inf")
            rows.append({
                "dtype": str(dtype).removeprefix("torch."), "B": B, "Hq/Hkv": f"{Hq}/{Hkv}", "D": D,
                "lengths": f"{kind} <= {C}",
                "max|Δout|": float((got.out.float() - want.out.float()).abs().max()),
                "max|Δlse|": float((got.lse[finite] - want.lse[finite]).abs().max()),
                "max|Δmod_mass|": float((got.modality_mass - want.modality_mass).abs().max()),
                "max|Δtoken_mass|": float((mass - ref_mass).abs().max()),
            })
    return rows


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    return [(n.lower().replace("_attention", ""), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def best_sdpa(q4, k, v, timer: Callable) -> tuple[float, str]:
    """Fastest SDPA backend that accepts ``q4 [B, Hq, 1, D]`` against ``k, v [B, Hkv, L, D]`` with GQA."""
    from torch.nn.attention import sdpa_kernel

    best = (math.inf, "none")
    for name, backend in _sdpa_backends():
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
        try:
            run()
        except RuntimeError:
            continue  # this backend does not take the shape on this device
        best = min(best, (timer(run), name))
    return best


def eager_scores_step(q, k, mass, scale):
    """The H2O-style score pass: recompute softmax(q·Kᵀ) eagerly and add the group sum into ``mass``."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    logits = torch.matmul(q.view(B, Hkv, Hq // Hkv, 1, D), k.unsqueeze(2).transpose(-1, -2)).float() * scale
    mass += logits.softmax(dim=-1).sum(dim=(2, 3))


def speed_rows(
    device: torch.device,
    dtype: torch.dtype,
    batches: Iterable[int] = DEFAULT_BATCHES,
    heads: Iterable[tuple[int, int]] = DEFAULT_HEADS,
    lengths: Iterable[int] = DEFAULT_LENGTHS,
    head_dim: int = 128,
    timer: Callable[[Callable], float] | None = None,
    copy_gbs: float | None = None,
    progress: Callable[[Iterable], Iterable] = lambda x: x,
) -> list[dict]:
    """Time the fused kernel against its plain self, SDPA and SDPA plus an eager score pass (ms, GB/s, ratios)."""
    if timer is None:
        from .machine import gpu_timer as timer
    configs = [(B, Hq, Hkv, L) for B in batches for (Hq, Hkv) in heads for L in lengths]
    rows = []
    for B, Hq, Hkv, L in progress(configs):
        kv_bytes = 2 * B * Hkv * L * head_dim * dtype.itemsize
        if device.type == "cuda" and kv_bytes * 1.3 > torch.cuda.mem_get_info(device)[0]:
            rows.append({"B": B, "Hq/Hkv": f"{Hq}/{Hkv}", "L": L, "note": "skipped: does not fit in memory"})
            continue
        q, k, v, mod = _random_cache(B, Hq, Hkv, L, head_dim, dtype, device, seed=L + B)
        lens = torch.full((B, Hkv), L, dtype=torch.int32, device=device)
        mass = torch.zeros(B, Hkv, L, device=device)
        scale = head_dim**-0.5
        t_fused = timer(lambda: decode_attention(q, k, v, lens, modality=mod, token_mass=mass, check_lengths=False))
        t_plain = timer(lambda: decode_attention(q, k, v, lens, check_lengths=False))
        # the two halves of the fused work, to place its overhead: per-modality mass (in the split pass) and
        # per-token mass (logits stored by the split pass, then a second pass)
        t_mod = timer(lambda: decode_attention(q, k, v, lens, modality=mod, check_lengths=False))
        t_tok = timer(lambda: decode_attention(q, k, v, lens, token_mass=mass, check_lengths=False))
        q4 = q.unsqueeze(2)
        t_sdpa, backend = best_sdpa(q4, k, v, timer)
        t_eager = timer(lambda: eager_scores_step(q, k, mass, scale))
        moved = kv_bytes + 2 * q.numel() * dtype.itemsize
        row = {
            "B": B, "Hq/Hkv": f"{Hq}/{Hkv}", "L": L,
            "fused ms": t_fused, "plain ms": t_plain,
            "plain GB/s": moved / (t_plain * 1e-3) / 1e9,
            "fused GB/s": moved / (t_fused * 1e-3) / 1e9,
            "mass overhead %": 100.0 * (t_fused / t_plain - 1.0),
            "modality-only overhead %": 100.0 * (t_mod / t_plain - 1.0),
            "token-only overhead %": 100.0 * (t_tok / t_plain - 1.0),
            "sdpa": backend, "sdpa ms": t_sdpa,
            "plain vs sdpa ×": t_sdpa / t_plain,
            "fused vs sdpa+eager ×": (t_sdpa + t_eager) / t_fused,
        }
        if copy_gbs:
            row["plain % copy"] = 100.0 * row["plain GB/s"] / copy_gbs
            row["fused % copy"] = 100.0 * row["fused GB/s"] / copy_gbs
        rows.append(row)
        del q, k, v, mod, mass
    return rows


def floor_rows(device: torch.device, dtype: torch.dtype, lengths: Iterable[int] = (4096, 32768),
               heads: tuple[int, int] = (28, 4), head_dim: int = 128, splits: Iterable[int] = (1, 2, 4, 8, 16, 32),
               timer: Callable[[Callable], float] | None = None) -> list[dict]:
    """Where the small-batch floor comes from (B 1): the plain kernel at each split count and at the default,
    the same call replayed from a CUDA graph (no host work: what is left is GPU time), and SDPA for reference."""
    if timer is None:
        from .machine import gpu_timer as timer
    Hq, Hkv = heads
    rows = []
    for L in lengths:
        q, k, v, _ = _random_cache(1, Hq, Hkv, L, head_dim, dtype, device, seed=L)
        lens = torch.full((1, Hkv), L, dtype=torch.int32, device=device)
        base = {"B": 1, "Hq/Hkv": f"{Hq}/{Hkv}", "L": L}
        t_sdpa, backend = best_sdpa(q.unsqueeze(2), k, v, timer)
        for s in (*splits, None):
            t = timer(lambda: decode_attention(q, k, v, lens, num_splits=s, check_lengths=False))
            default = s is None
            rows.append({**base, "launch": "eager", "splits": "default" if default else s, "plain ms": t,
                         f"sdpa ({backend}) ms": t_sdpa})
        if device.type == "cuda":
            row = {**base, "launch": "CUDA graph", "splits": "default", f"sdpa ({backend}) ms": t_sdpa}
            try:
                static = decode_attention(q, k, v, lens, check_lengths=False)  # warm-up: compiled and tuned
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static = decode_attention(q, k, v, lens, check_lengths=False)
                row["plain ms"] = timer(graph.replay)
                del static
            except Exception as exc:  # a diagnostic row: report the failure rather than stop the bench
                row["note"] = f"capture failed: {type(exc).__name__}: {str(exc)[:120]}"
            rows.append(row)
    return rows
