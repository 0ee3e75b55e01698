"""Sweep every kernel's config space on this GPU and write ``acckv_triton/tables/<gpu>/<kernel>.json``.

    python autotune/tune.py                 # all kernels, all keys
    python autotune/tune.py --quick         # one length bucket and batch, for a first table in a minute
    python autotune/tune.py --jobs 16       # compile the configs in 16 processes first (the default: CPU count)

For each kernel and each tuning key (dtype, head_dim, group size, flags) the public op is timed end to end with
each config of the space forced on that one kernel (the op's other kernels resolve as usual), over a few length
buckets and batch sizes. The config with the lowest geometric-mean time over those shapes wins. Sequence length
never enters the key: one config serves every length, chosen to be good across the buckets.

The library loads these tables at first use, matching the GPU name (see ``acckv_triton/tuning.py``).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import triton

import acckv_triton as ak
from acckv_triton import tuning
import importlib

decode_module = importlib.import_module("acckv_triton.ops.decode_attention")  # the modules; the package exports
window_module = importlib.import_module("acckv_triton.ops.window_scores")  # functions of the same names
observed_module = importlib.import_module("acckv_triton.ops.observed_attention")
chunk_module = importlib.import_module("acckv_triton.ops.chunk_attention")


@dataclass
class Target:
    """One tunable kernel: its TunedKernel, the keys to tune, and how to build a timed call for a key."""

    kernel: tuning.TunedKernel
    keys: list[dict]
    make_call: Callable[[dict, int, int, torch.device], Callable[[], object]]
    lengths: tuple[int, ...] | None = None  # timed lengths (batch 1) when not the decode buckets (prefill, chunk)


def _decode_call(key: dict, length: int, batch: int, device: torch.device) -> Callable[[], object]:
    dtype = getattr(torch, key["dtype"])
    D, G = key["HEAD_DIM"], key["GROUP_SIZE"]
    Hkv = 4
    q = torch.randn(batch, Hkv * G, D, device=device, dtype=dtype)
    k = torch.randn(batch, Hkv, length, D, device=device, dtype=dtype)
    v = torch.randn_like(k)
    lengths = torch.full((batch, Hkv), length, dtype=torch.int32, device=device)
    mod = torch.randint(0, ak.NUM_MODALITIES, (batch, Hkv, length), dtype=torch.uint8, device=device)
    mass = torch.zeros(batch, Hkv, length, device=device)
    has_mod = key.get("HAS_MODALITY", True)
    has_mass = key.get("HAS_TOKEN_MASS", True)
    return lambda: ak.decode_attention(q, k, v, lengths, modality=mod if has_mod else None,
                                       token_mass=mass if has_mass else None, check_lengths=False)


def _decode_keys(dtypes, head_dims, groups) -> list[dict]:
    keys = []
    for dtype, D, G, flags in itertools.product(dtypes, head_dims, groups, [(False, False), (True, True)]):
        keys.append({"dtype": dtype, "HEAD_DIM": D, "GROUP_SIZE": G, "HAS_MODALITY": flags[0],
                     "HAS_TOKEN_MASS": flags[1]})
    return keys


WINDOW = 32  # the observation window the tables are tuned for (AccKVConfig.window)


def _window_call(key: dict, length: int, batch: int, device: torch.device) -> Callable[[], object]:
    dtype = getattr(torch, key["dtype"])
    D, G, Hkv = key["HEAD_DIM"], key["GROUP_SIZE"], 4
    q = torch.randn(batch, Hkv * G, WINDOW, D, device=device, dtype=dtype)
    k = torch.randn(batch, Hkv, length, D, device=device, dtype=dtype)
    mod = torch.randint(0, ak.NUM_MODALITIES, (batch, Hkv, length), dtype=torch.uint8, device=device)
    return lambda: ak.window_scores(q, k, modality=mod if key["HAS_MODALITY"] else None)


def _window_keys(dtypes, head_dims, groups) -> list[dict]:
    block_r = lambda g: min(64, max(16, 1 << (WINDOW * g - 1).bit_length()))  # noqa: E731  (the launcher's rule)
    return [{"dtype": dtype, "HEAD_DIM": D, "GROUP_SIZE": G, "BLOCK_R": block_r(G), "HAS_MODALITY": True,
             "HAS_KEY_START": False} for dtype, D, G in itertools.product(dtypes, head_dims, groups)]


PROMPT_LENGTHS = (4096, 16384)  # prefill kernels: T x T work, so shorter buckets than decode's, batch 1


def _observed_call(key: dict, length: int, batch: int, device: torch.device) -> Callable[[], object]:
    """observed_attention as the cache calls it for evidence (no values): 4 kv heads, the key's group (the forward
    kernel's key has none: 7, Qwen2.5-Omni-7B's)."""
    dtype = getattr(torch, key["dtype"])
    D, G, Hkv = key["HEAD_DIM"], key.get("GROUP_SIZE", 7), 4
    q = torch.randn(batch, Hkv * G, length, D, device=device, dtype=dtype)
    k = torch.randn(batch, Hkv, length, D, device=device, dtype=dtype)
    v = torch.randn_like(k) if key.get("HAS_V", False) else None
    return lambda: ak.observed_attention(q, k, v)


def _observed_keys(dtypes, head_dims, groups) -> tuple[list[dict], list[dict]]:
    """(forward keys, key-mass keys): the forward kernel is keyed without the group size, the mass kernel with it."""
    fwd = [{"dtype": dtype, "HEAD_DIM": D, "HAS_V": False, "HAS_KEY_START": False}
           for dtype, D in itertools.product(dtypes, head_dims)]
    mass = [{"dtype": dtype, "HEAD_DIM": D, "GROUP_SIZE": G, "HAS_KEY_START": False}
            for dtype, D, G in itertools.product(dtypes, head_dims, groups)]
    return fwd, mass


CHUNK = 256  # a later chunk's tokens (a second question) in the chunk_attention tables
CHUNK_STORED = (4096, 16384)  # stored slots it attends over, batch 1


def _chunk_call(key: dict, length: int, batch: int, device: torch.device) -> Callable[[], object]:
    """chunk_attention as a second question calls it: CHUNK queries over ``length`` stored slots (merged slots
    weighed by their multiplicity, AccKV's default), 4 kv heads, the key's group, the window's mass summed."""
    dtype = getattr(torch, key["dtype"])
    D, G, Hkv = key["HEAD_DIM"], key["GROUP_SIZE"], 4
    q = torch.randn(batch, Hkv * G, CHUNK, D, device=device, dtype=dtype)
    k, v = (torch.randn(batch, Hkv, length, D, device=device, dtype=dtype) for _ in range(2))
    k_new, v_new = (torch.randn(batch, Hkv, CHUNK, D, device=device, dtype=dtype) for _ in range(2))
    lengths = torch.full((batch, Hkv), length, dtype=torch.int32, device=device)
    mult = torch.ones(batch, Hkv, length, device=device)
    return lambda: ak.chunk_attention(q, k, v, lengths, k_new, v_new, multiplicity=mult, window=WINDOW)


def _chunk_keys(dtypes, head_dims, groups) -> tuple[list[dict], list[dict]]:
    """(attention keys, window-mass keys); the mass kernel's row block follows the launcher's rule for G * W rows."""
    attn = [{"dtype": dtype, "HEAD_DIM": D, "GROUP_SIZE": G} for dtype, D, G in itertools.product(dtypes, head_dims,
                                                                                                 groups)]
    block_r = lambda g: min(64, max(16, 1 << (min(WINDOW, CHUNK) * g - 1).bit_length()))  # noqa: E731
    return attn, [dict(key, BLOCK_R=block_r(key["GROUP_SIZE"])) for key in attn]


def targets(dtypes=("bfloat16", "float16"), head_dims=(64, 128), groups=(1, 2, 4, 7, 8)) -> list[Target]:
    """Every kernel the library tunes, with the keys worth tuning."""
    keys = _decode_keys(dtypes, head_dims, groups)
    window_keys = _window_keys(dtypes, head_dims, groups)
    fwd_keys, mass_keys = _observed_keys(dtypes, head_dims, groups)
    chunk_keys, chunk_mass_keys = _chunk_keys(dtypes, head_dims, groups)
    return [
        Target(decode_module._split_kernel, keys, _decode_call),
        Target(decode_module._mass_kernel, [k for k in keys if k["HAS_TOKEN_MASS"]], _decode_call),
        Target(window_module._lse_kernel, window_keys, _window_call),
        Target(window_module._scores_kernel, window_keys, _window_call),
        Target(observed_module._fwd_kernel, fwd_keys, _observed_call, PROMPT_LENGTHS),
        Target(observed_module._mass_kernel, mass_keys, _observed_call, PROMPT_LENGTHS),
        Target(chunk_module._attn_kernel, chunk_keys, _chunk_call, CHUNK_STORED),
        Target(chunk_module._mass_kernel, chunk_mass_keys, _chunk_call, CHUNK_STORED),
    ]


def _compile_job(job: tuple[str, int, int, int, int]) -> str | None:
    """Worker: compile one (kernel, key, config) by running it once on the first timed shape (fills Triton's
    on-disk cache, so the timing process only loads it). Returns an error message, or None."""
    kernel_name, target_index, key_index, config_index, length = job
    target = targets()[target_index]
    key, config = target.keys[key_index], target.kernel.configs[config_index]
    try:
        with target.kernel.forcing(config):
            target.make_call(key, length, 1, torch.device("cuda"))()
        torch.cuda.synchronize()
    except Exception as exc:  # a config that does not fit is skipped again, and reported, by the timing pass
        return f"{kernel_name} {key} {config}: {type(exc).__name__}"
    return None


def precompile(all_targets: list[Target], length: int, jobs: int) -> None:
    """Compile every (kernel, key, config) in ``jobs`` processes before timing; compiling dominates otherwise."""
    import concurrent.futures
    import multiprocessing

    work = [(t.kernel.name, i, j, c, t.lengths[0] if t.lengths else length) for i, t in enumerate(all_targets)
            for j in range(len(t.keys)) for c in range(len(t.kernel.configs))]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        failed = [msg for msg in pool.map(_compile_job, work, chunksize=4) if msg]
    print(f"precompiled {len(work) - len(failed)}/{len(work)} kernel configs in {jobs} processes", file=sys.stderr)


def tune_target(target: Target, lengths, batches, device, timer) -> list[dict]:
    """Best config per key for one kernel, as table entries ``{"key", "config", "ms"}``."""
    entries = []
    for key in target.keys:
        calls = [target.make_call(key, L, B, device) for L in lengths for B in batches]
        best = None
        for config in target.kernel.configs:
            try:
                with target.kernel.forcing(config):
                    times = [timer(call) for call in calls]
            except (triton.runtime.errors.OutOfResources, RuntimeError) as exc:
                print(f"  {target.kernel.name} {config}: skipped ({type(exc).__name__})", file=sys.stderr)
                continue
            score = math.exp(sum(math.log(t) for t in times) / len(times))
            if best is None or score < best[0]:
                best = (score, config, times)
        if best is None:
            continue
        _, config, times = best
        table_key = {name: key[name] for name in target.kernel.key}
        table_key["dtype"] = key["dtype"]
        entries.append({
            "key": table_key,
            "config": {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages},
            "ms": dict(zip([f"L{L}xB{B}" for L in lengths for B in batches], times)),
        })
    # one entry per key: keys differing only in flags this kernel ignores collapse to the first found
    unique = {json.dumps(e["key"], sort_keys=True): e for e in reversed(entries)}
    return list(reversed(list(unique.values())))


def write_table(root: Path, device_name: str, kernel: str, entries: list[dict]) -> Path:
    """Write a tuned table in the format ``acckv_triton.tuning.load_table`` reads."""
    path = root / tuning.device_folder(device_name) / f"{kernel}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {
        "kernel": kernel, "device": device_name, "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__,
        "key": sorted(entries[0]["key"]) if entries else [], "entries": entries,
    }
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one length bucket (32k) and batch 1")
    p.add_argument("--out", type=Path, default=tuning.autotune_dir(), help="root folder of the tables")
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                   help="processes that compile every config before timing (1: compile while timing)")
    p.add_argument("--rep", type=int, default=25, help="milliseconds of timed runs per config and shape")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or tuning.INTERPRET:
        print("autotune/tune.py needs a CUDA GPU: under the interpreter every kernel uses its default config.")
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    lengths, batches = ((32768,), (1,)) if args.quick else ((4096, 32768), (1, 8))
    all_targets = targets()
    if args.jobs > 1:
        try:
            precompile(all_targets, lengths[0], args.jobs)
        except Exception as exc:  # compiling while timing is slower but gives the same tables
            print(f"precompile failed ({type(exc).__name__}: {exc}); compiling while timing", file=sys.stderr)

    def timer(call):  # median of a short do_bench: enough for ranking configs of one kernel on one shape
        return triton.testing.do_bench(call, warmup=5, rep=args.rep, return_mode="median")

    for target in all_targets:
        shapes = (lengths, batches) if target.lengths is None else (target.lengths[-1:] if args.quick else
                                                                    target.lengths, (1,))
        entries = tune_target(target, *shapes, device, timer)
        print(f"{target.kernel.name}: {len(entries)} keys -> {write_table(args.out, name, target.kernel.name, entries)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
