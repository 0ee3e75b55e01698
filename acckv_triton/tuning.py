"""Where every kernel gets its launch config: the one place for execution mode and tuning.

Execution mode
    With no CUDA device the package runs every Triton kernel through Triton's interpreter. Importing this
    module sets ``TRITON_INTERPRET=1`` before any ``@triton.jit`` function is defined (the kernel modules import
    it first), unless the user already set the variable. ``INTERPRET`` tells the kernels which mode they are in,
    so they can upcast 16-bit loads (the interpreter stores bf16 as uint16 and silently corrupts its arithmetic).
    Under the interpreter, where it cannot run a kernel's loop bound (Triton 3.6 with NumPy >= 2.4), it is made to:
    see :mod:`acckv_triton._interpreter`.

Config resolution, for a kernel launched at a given tuning key (dtype, head_dim, group size, flags; never a
sequence length):
    1. a tuned table ``<autotune dir>/<gpu name>/<kernel>.json`` whose entry matches the key exactly;
    2. live autotuning over the kernel's config space with ``triton.autotune`` (``ACCKV_AUTOTUNE=0`` disables it);
    3. the space's first config, which is always a safe default.
    Under the interpreter one config is used (``INTERPRETER_CONFIGS`` or the first): more than one fails there with
    "0 active drivers".

Tuned-table format (written by ``autotune/tune.py``)::

    {"kernel": "decode_attention", "device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0", "torch": "2.11.0",
     "date": "2026-11-26", "key": ["dtype", "HEAD_DIM", ...],
     "entries": [{"key": {"dtype": "bfloat16", "HEAD_DIM": 128, ...},
                  "config": {"kwargs": {"BLOCK_N": 64}, "num_warps": 4, "num_stages": 2}}]}

The tables directory is ``$ACCKV_AUTOTUNE_DIR`` if set, else ``acckv_triton/tables/`` (shipped as package data).

Resolution is memoised per (kernel, device, key, table folder, live-tuning switch): a launch after the first one
for a key costs a dict lookup, not a file ``stat``. A table rewritten in the same folder during the process is seen
after :func:`clear_caches`. :meth:`TunedKernel.bind` goes one step further for planned launches (the decode plan):
it resolves once and returns a launcher that skips even the lookup.
"""
from __future__ import annotations

import contextlib
import importlib.resources
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (must follow the environment set-up above)

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""True when kernels run through Triton's interpreter (no CUDA device, or the user asked for it)."""

if INTERPRET:  # Triton 3.6's interpreter with NumPy >= 2.4 cannot run a loop bound; see acckv_triton._interpreter
    from ._interpreter import ensure_loop_bounds

    ensure_loop_bounds()

__all__ = [
    "CONFIG_SPACES",
    "INTERPRET",
    "TunedKernel",
    "autotune_dir",
    "clear_caches",
    "device_folder",
    "load_table",
    "live_tuning_enabled",
]


CONFIG_SPACES: dict[str, list[triton.Config]] = {
    # Split-K decode: one program per (GQA group, split); BLOCK_N tokens per K/V tile. Memory-bound, so the space
    # trades tile size against pipelining depth. The first entry is the safe default.
    "decode_attention": [
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
    ],
    # Second decode pass: logits -> probabilities -> token_mass += group sum; BLOCK_T tokens per program.
    "decode_token_mass": [
        triton.Config({"BLOCK_T": 256}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_T": 512}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_T": 1024}, num_warps=8, num_stages=1),
    ],
    # Window scores, pass 1 (per-row logsumexp partials) and pass 2 (probabilities summed per key tile): one
    # program per (GQA group, split of N); BLOCK_N keys per K tile, window rows in launcher-chosen row blocks.
    "window_scores_lse": [
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    ],
    "window_scores": [
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    ],
    # Observed prefill attention, pass 1 (flash forward: lse, and the output with values): one program per
    # (BLOCK_M queries, query head), BLOCK_N keys per K/V tile over the causally visible tiles. Compute-bound on
    # long prompts; the first entry fits every dtype and head dim in sm_80's shared memory.
    "observed_attention": [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ],
    # Pass 2 (key mass): one program per (BLOCK_N keys, kv head) loops over the G heads and the query tiles of
    # BLOCK_M rows at or after its keys, recomputing p = exp(s - lse).
    "observed_attention_mass": [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    ],
    # A later chunk's attention: one program per (BLOCK_M (head, query) rows of a GQA group), BLOCK_N keys per K/V
    # tile over the stored slots then the chunk's causal tiles. The first entry fits fp32 at D 128 on sm_80.
    "chunk_attention": [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    ],
    # Its window mass: one program per BLOCK_N keys loops over the G*W window rows (row blocks chosen by the
    # launcher), recomputing p = exp(s - lse).
    "chunk_attention_mass": [
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
    ],
    # Compaction phase 1: gather or weighted-merge BLOCK_K slots of one (b, h) from the old cache into a strip or
    # the out buffers. A row move (memory-bound): the space trades slots per program against warps.
    "compact_kv": [
        triton.Config({"BLOCK_K": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_K": 8}, num_warps=2, num_stages=1),
    ],
    # Compaction phase 2 (in place): copy the moved slots of the strip back into the cache.
    "compact_kv_copy_back": [
        triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_K": 16}, num_warps=4, num_stages=1),
    ],
    # Compaction of one [B, Hkv, C] metadata tensor (gather, or sum over each merge set); BLOCK_T slots per program.
    "compact_kv_metadata": [
        triton.Config({"BLOCK_T": 256}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_T": 1024}, num_warps=4, num_stages=1),
    ],
}
"""Config spaces per kernel name, keyed at launch on head_dim, group size, dtype and flags (never length)."""

INTERPRETER_CONFIGS: dict[str, triton.Config] = {
    # The interpreter runs programs one after another, so fewer, larger programs run faster there. Kernels not
    # named here use the first config of their space.
    "compact_kv": triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=1),
    "compact_kv_copy_back": triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=1),
    "compact_kv_metadata": triton.Config({"BLOCK_T": 1024}, num_warps=4, num_stages=1),
    # Tiles of at most 64 x 32 rows x keys: numpy's BLAS goes multithreaded (and, next to torch's threads, slower
    # by 100x) on a 64 x 128 x 64 product.
    "observed_attention_mass": triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    "chunk_attention": triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
}
"""Configs used under Triton's interpreter instead of a space's first config."""


def autotune_dir() -> Path:
    """The folder holding per-GPU tuned tables: ``$ACCKV_AUTOTUNE_DIR`` or the package's own ``tables/`` (package
    data, so an installed wheel finds them)."""
    env = os.environ.get("ACCKV_AUTOTUNE_DIR")
    if env:
        return Path(env)
    return Path(str(importlib.resources.files("acckv_triton") / "tables"))


def device_folder(device_name: str) -> str:
    """Folder name for a GPU: ``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device_name.strip()).strip("_")


def live_tuning_enabled() -> bool:
    """Live autotuning runs unless ``ACCKV_AUTOTUNE=0``; it never runs under the interpreter."""
    return not INTERPRET and os.environ.get("ACCKV_AUTOTUNE", "1") != "0"


def _key_string(key: dict[str, Any]) -> str:
    return "|".join(f"{name}={key[name]}" for name in sorted(key))


@lru_cache(maxsize=None)
def _load_table_cached(path: str, mtime: float) -> dict[str, triton.Config]:
    with open(path) as f:
        table = json.load(f)
    entries: dict[str, triton.Config] = {}
    for entry in table.get("entries", []):
        cfg = entry["config"]
        entries[_key_string(entry["key"])] = triton.Config(
            dict(cfg.get("kwargs", {})), num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 2))
        )
    return entries


def load_table(kernel: str, device_name: str, root: Path | None = None) -> dict[str, triton.Config]:
    """Tuned configs of ``kernel`` for the GPU called ``device_name``, keyed by their key string.

    Returns an empty dict when no table exists for that device. A malformed table raises ``ValueError`` naming
    the file, rather than silently falling back.
    """
    path = (root or autotune_dir()) / device_folder(device_name) / f"{kernel}.json"
    if not path.is_file():
        return {}
    try:
        return _load_table_cached(str(path), path.stat().st_mtime)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:  # wrong structure or values
        raise ValueError(f"tuned table {path} is malformed: {exc}") from exc


_RESOLVED: dict[tuple, "_Resolved | None"] = {}


def clear_caches() -> None:
    """Forget memoised config resolutions and loaded tables (after rewriting a table in place)."""
    _RESOLVED.clear()
    _load_table_cached.cache_clear()


@lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@dataclass
class _Resolved:
    config: triton.Config
    source: str  # "forced", "table" or "default" ("live" when triton.autotune decides)


def _bench_skipping_uncompilable(name: str):
    """``do_bench`` for live tuning of kernel ``name`` that ranks a config last when the installed Triton fails to
    compile it (Triton 3.6's layout pass rejects some tiles that 3.9 compiles), instead of failing the launch.

    Other errors propagate; if no config compiles, the tuner's pick fails again at launch with the real error.
    """

    def bench(fn, quantiles):
        try:
            return triton.testing.do_bench(fn, quantiles=quantiles)
        except RuntimeError as exc:
            if "PassManager" not in str(exc):
                raise
            warnings.warn(f"acckv_triton: a config of {name} does not compile with triton {triton.__version__}; "
                          "live tuning skips it", RuntimeWarning, stacklevel=2)
            return [math.inf] * len(quantiles)

    return bench


class TunedKernel:
    """A ``@triton.jit`` kernel with its config space, tuned tables and live autotuning.

    Launch it like a Triton kernel, with every argument by name: ``kernel[grid](x_ptr=x, ..., HEAD_DIM=128)``.
    The meta-parameters of the configs (``BLOCK_N``, ...) must not be passed; they come from the resolution order
    in this module's docstring. ``key`` names the arguments that change the best tile (constexprs such as
    ``HEAD_DIM``); ``dtype_arg`` names the tensor argument whose dtype joins the key. ``restore_value`` and
    ``reset_to_zero`` name the buffers the kernel writes in place, so live tuning never corrupts them.
    """

    def __init__(
        self,
        name: str,
        fn,
        configs: Sequence[triton.Config],
        key: Iterable[str],
        dtype_arg: str,
        *,
        restore_value: Iterable[str] = (),
        reset_to_zero: Iterable[str] = (),
    ):
        if not configs:
            raise ValueError(f"{name}: the config space must hold at least one config")
        self.name = name
        self.fn = fn
        self.configs = list(configs)
        self.key = list(key)
        self.dtype_arg = dtype_arg
        self._autotuned = triton.autotune(
            self.configs,
            key=self.key,
            restore_value=list(restore_value) or None,
            reset_to_zero=list(reset_to_zero) or None,
            do_bench=_bench_skipping_uncompilable(name),
        )(fn)
        self.last_source: str | None = None  # how the last launch got its config (for the bench and tests)
        self._forced: triton.Config | None = None

    @contextlib.contextmanager
    def forcing(self, config: triton.Config):
        """Launch with ``config`` inside the ``with`` block, whatever the tables say (tuning scripts, tests)."""
        previous, self._forced = self._forced, config
        try:
            yield
        finally:
            self._forced = previous

    def tuning_key(self, args: dict[str, Any]) -> dict[str, Any]:
        """The key a tuned table entry must match for these launch arguments."""
        key = {name: args[name] for name in self.key}
        key["dtype"] = str(args[self.dtype_arg].dtype).removeprefix("torch.")
        return key

    def resolve(self, args: dict[str, Any], device_name: str | None) -> _Resolved | None:
        """The config a launch with ``args`` uses, or None when live autotuning decides (memoised per key)."""
        if self._forced is not None:
            return _Resolved(self._forced, "forced")
        if INTERPRET:
            return _Resolved(INTERPRETER_CONFIGS.get(self.name, self.configs[0]), "default")
        if device_name is None:
            return _Resolved(self.configs[0], "default")
        live = live_tuning_enabled()
        memo = (self.name, device_name, _key_string(self.tuning_key(args)), str(autotune_dir()), live)
        if memo in _RESOLVED:
            return _RESOLVED[memo]
        config = load_table(self.name, device_name).get(memo[2])
        if config is not None:
            resolved = _Resolved(config, "table")
        else:
            resolved = None if live else _Resolved(self.configs[0], "default")
        _RESOLVED[memo] = resolved
        return resolved

    def _device_name_of(self, args: dict[str, Any]) -> str | None:
        tensor = args[self.dtype_arg]
        return _device_name(tensor.device.index or 0) if tensor.is_cuda else None

    def bind(self, grid, **key_args) -> Callable[..., Any]:
        """Resolve the config once for launches whose key arguments are ``key_args`` (the ``key`` names and
        ``dtype_arg``) and return ``launch(**args)`` that launches on ``grid`` with it, with no per-call lookup.

        Under live tuning the returned launcher goes through ``triton.autotune`` (which caches its pick per key).
        """
        resolved = self.resolve(key_args, self._device_name_of(key_args))
        if resolved is None:
            autotuned = self._autotuned[grid]

            def launch_live(**args):
                self.last_source = "live"
                return autotuned(**args)

            return launch_live
        cfg, source = resolved.config, resolved.source
        fn = self.fn[grid]
        meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        def launch(**args):
            self.last_source = source
            return fn(**args, **meta)

        return launch

    def __getitem__(self, grid) -> Callable[..., Any]:
        """``kernel[grid](**args)``: resolve the config for these args (memoised), then launch."""
        return lambda **args: self.bind(grid, **args)(**args)
