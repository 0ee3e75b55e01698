"""Every kernel compiles for sm_90 and sm_80 and its default config fits in shared memory, checked without a GPU.

The interpreter that runs the kernels here accepts code the GPU compiler rejects and knows nothing of shared memory,
so ``tests/gpu_compile_check.py`` compiles them for real in subprocesses (a stand-in driver, compile only; see its
docstring). A compile takes 0.1 to 2.7 s of CPU (fp32 window kernels the most; the fused policy's row kernels more),
so the matrix is cut to about 250 compiles, about 6 min of CPU in four processes at once (about 3 min on two idle
cores with an empty Triton cache):

* sm_90: every flag path at D=128 and the every-flag variants at D=64, for fp32, fp16 and bf16 on GQA 28/4 (the
  largest window row blocks); bf16 at D=128 on layouts 8/8 and 32/4; every config of every space at bf16, D=128,
  28/4.
* sm_80: the every-flag variants at the default configs, every dtype and head dim, on 28/4.
* the fused policy (``acckv_triton.fused_policy``): every flag path once, fp32 keys, sm_90 (its kernels depend on the
  dtype only through an upcast of the keys and use a few KiB of shared memory).

Configs other than a space's first that do not fit are reported as a warning, not a failure: live autotuning and
``autotune/tune.py`` skip a config whose launch raises ``OutOfResources``, which the last two tests check.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import KernelInterface

from acckv_triton import tuning
from tests.gpu_compile_check import SHARED_MEMORY_LIMIT, SWEEP, config_label, parse_point

SCRIPT = Path(__file__).with_name("gpu_compile_check.py")
OPS = ("decode_attention", "window_scores", "compact_kv", "chunk_attention", "observed_attention")
DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIMS = (64, 128)
JOBS = {  # per arch, the script's argument lists; each runs in its own process, all at once
    90: [
        ["--configs", "default", "--run", "paths:float32:128:28/4", "--run", "rich:float32:64:28/4"],
        ["--configs", "default", "--run", "paths:float16,bfloat16:128:28/4", "--run", "rich:float16,bfloat16:64:28/4"],
        ["--configs", "all", "--run", "rich:bfloat16:128:8/8,32/4"],
    ],
    80: [["--configs", "default", "--run", "rich:float32,float16,bfloat16:64,128:28/4"]],
}
ARCHS = sorted(JOBS)


def _run_jobs() -> dict[int, dict]:
    """Run every job at once; merge each arch's summaries (the larger shared size where two jobs overlap)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [(arch, args, subprocess.Popen([sys.executable, str(SCRIPT), "--arch", str(arch), *args], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for arch, jobs in JOBS.items() for args in jobs]
    merged: dict[int, dict] = {arch: {"results": {}, "failures": [], "kernels": {}, "skip": None} for arch in JOBS}
    try:
        for arch, args, proc in procs:
            out, err = proc.communicate(timeout=900)
            command = f"python tests/gpu_compile_check.py --arch {arch} {' '.join(args)}"
            try:
                summary = json.loads(out)
            except json.JSONDecodeError:
                pytest.fail(f"{command} exited {proc.returncode} without a summary; stderr:\n{err[-4000:]}")
            report = merged[arch]
            if "skip" in summary:
                report["skip"] = summary["skip"]
                continue
            report["triton"] = summary["triton"]
            report["failures"] += [dict(f, command=command) for f in summary["failures"]]
            for name, count in summary["kernels"].items():
                report["kernels"][name] = report["kernels"].get(name, 0) + count
            for r in summary["results"]:
                key = (r["kernel"], r["config"], r["dtype"], r["head_dim"])
                if key not in report["results"] or report["results"][key]["shared"] < r["shared"]:
                    report["results"][key] = r
    finally:
        for _, _, proc in procs:  # a job that failed or hung must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return merged


@pytest.fixture(scope="module")
def reports() -> dict[int, dict]:
    merged = _run_jobs()
    skips = {arch: r["skip"] for arch, r in merged.items() if r["skip"]}
    if skips:
        pytest.skip(f"no GPU compile check: {skips}")
    return merged


def _kernel_names() -> set[str]:
    """The kernels of the ops modules: every ``@triton.jit`` function that no other one calls (the rest are
    device-side helpers), which includes every TunedKernel's function."""
    names, tuned = set(), set()
    for op in OPS:
        module = importlib.import_module(f"acckv_triton.ops.{op}")
        jitted = {obj.fn.__name__: inspect.getsource(obj.fn) for obj in vars(module).values()
                  if isinstance(obj, KernelInterface) and inspect.isfunction(getattr(obj, "fn", None))}
        called = {name for name in jitted for other, src in jitted.items()
                  if other != name and re.search(rf"\b{name}\s*\(", src)}
        names |= set(jitted) - called
        tuned |= {obj.fn.fn.__name__ for obj in vars(module).values() if isinstance(obj, tuning.TunedKernel)}
    assert tuned and tuned <= names, f"TunedKernel functions {tuned - names} not found among the jit kernels {names}"
    return names


def _tuned_kernels() -> dict[str, tuning.TunedKernel]:
    """Every TunedKernel of the ops modules, by its function's name."""
    return {obj.fn.fn.__name__: obj for op in OPS for obj in vars(importlib.import_module(f"acckv_triton.ops.{op}"))
            .values() if isinstance(obj, tuning.TunedKernel)}


def _overflows(reports) -> dict[str, list[triton.Config]]:
    """Non-default configs that need more shared memory than some arch allows, by kernel function name."""
    found: dict[str, list[triton.Config]] = {}
    for name, tk in _tuned_kernels().items():
        for config in tk.configs[1:]:
            label = config_label(config.kwargs, config.num_warps, config.num_stages)
            if any(r["kernel"] == name and r["config"] == label and r["shared"] > SHARED_MEMORY_LIMIT[arch]
                   for arch, report in reports.items() for r in report["results"].values()):
                found.setdefault(name, []).append(config)
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(reports, arch):
    """No compile failure, except a non-default config that Triton's layout pass rejects (triton 3.6 and 3.7 on
    compact_kv's merge tiles at BLOCK_K >= 32): live tuning ranks those last (``tuning._bench_skipping_uncompilable``,
    tested in tests/test_tuning.py) and tune.py does not tune compact_kv, so they are reported, not failed."""
    skippable = [f for f in reports[arch]["failures"] if f["forced"] and "PassManager" in f["message"]]
    if skippable:
        warnings.warn(f"sm_{arch}, triton {triton.__version__}: non-default configs the compiler rejects (live "
                      "tuning skips them): " + "; ".join(f"{f['kernel']} {f['forced']}" for f in skippable))
    failures = [f for f in reports[arch]["failures"] if f not in skippable]
    assert not failures, f"{len(failures)} compile failures for sm_{arch}:\n" + "\n".join(
        f"{f['kernel']} [{f['case']}, {f['dtype']}, D={f['head_dim']}, {f['layout']}, forced: {f['forced']}]: "
        f"{f['error']}: {f['message'][:1500]}\n{f['diagnostics']}\n(from: {f['command']})" for f in failures[:5])
    missing = _kernel_names() - set(reports[arch]["kernels"])
    assert not missing, f"kernels never compiled for sm_{arch}: {sorted(missing)}"


@pytest.mark.parametrize("arch", ARCHS)
def test_default_configs_fit_in_shared_memory(reports, arch):
    limit = SHARED_MEMORY_LIMIT[arch]
    defaults = [r for r in reports[arch]["results"].values() if r["default"]]
    covered = {(r["kernel"], r["dtype"], r["head_dim"]) for r in defaults}
    missing = {(k, d, h) for k in _kernel_names() for d in DTYPES for h in HEAD_DIMS} - covered
    assert not missing, f"no default-config compile for sm_{arch} of {sorted(missing)}"
    over = [r for r in defaults if r["shared"] > limit]
    assert not over, f"default configs over the sm_{arch} limit of {limit} bytes:\n" + "\n".join(
        f"{r['kernel']} {r['config']} {r['dtype']} D={r['head_dim']}: {r['shared']}" for r in over)


def test_sweep_compiled_every_config(reports):
    dtype, head_dim, _ = parse_point(SWEEP)
    results = reports[90]["results"]
    missing = [(name, label) for name, tk in _tuned_kernels().items() for c in tk.configs
               if (name, label := config_label(c.kwargs, c.num_warps, c.num_stages), dtype, head_dim) not in results]
    assert not missing, f"configs never compiled for sm_90 at {dtype}, D={head_dim}: {missing}"
    over = {arch: sorted(f"{r['kernel']} {r['config']} {r['dtype']} D={r['head_dim']}: {r['shared']} bytes"
                         for r in report["results"].values()
                         if not r["default"] and r["shared"] > SHARED_MEMORY_LIMIT[arch])
            for arch, report in reports.items()}
    if any(over.values()):
        warnings.warn("non-default configs over the shared-memory limit (live tuning and tune.py skip them): "
                      + "; ".join(f"sm_{arch}: {', '.join(lines)}" for arch, lines in over.items() if lines))


def _skipped_configs(reports) -> list[tuple[tuning.TunedKernel, triton.Config]]:
    """The overflowing configs, or each kernel's last config where none overflows, to stand for one that does."""
    overflows = _overflows(reports)
    return [(tk, config) for name, tk in _tuned_kernels().items()
            for config in overflows.get(name, tk.configs[-1:])]


def test_tune_script_skips_configs_out_of_resources(reports, capsys):
    from autotune import tune

    for target in tune.targets(dtypes=("bfloat16",), head_dims=(128,), groups=(7,)):
        skipped = [c for tk, c in _skipped_configs(reports) if tk is target.kernel]

        def timer(call):  # the forced launch of a skipped config fails as it would on the GPU; others "run"
            if any(target.kernel._forced is c for c in skipped):
                raise OutOfResources(262144, SHARED_MEMORY_LIMIT[90], "shared memory")
            return 1.0 + target.kernel.configs.index(target.kernel._forced)

        entries = tune.tune_target(tune.Target(target.kernel, target.keys[:1], target.make_call), lengths=[16],
                                   batches=[1], device=torch.device("cpu"), timer=timer)
        chosen = [e["config"] for e in entries]
        assert chosen and all(c["kwargs"] != s.kwargs or c["num_warps"] != s.num_warps
                              or c["num_stages"] != s.num_stages for c in chosen for s in skipped)
    assert "skipped (OutOfResources)" in capsys.readouterr().err


def test_live_autotuning_skips_configs_out_of_resources(reports, monkeypatch):
    def fake_do_bench(fn, quantiles=None, **_):
        fn()
        return [1.0] * len(quantiles) if quantiles else 1.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    for tk, config in _skipped_configs(reports):
        autotuned = tk._autotuned
        launched = []

        class Kernel:  # the JIT function under triton.autotune: a launch of `config` runs out of shared memory
            @staticmethod
            def run(*args, **kwargs):
                if all(kwargs.get(k) == v for k, v in config.all_kwargs().items()):
                    raise OutOfResources(262144, SHARED_MEMORY_LIMIT[90], "shared memory")
                launched.append(kwargs)

        monkeypatch.setattr(autotuned, "fn", Kernel)
        if autotuned._do_bench is None:  # the driver's benchmarker needs a GPU
            monkeypatch.setattr(autotuned, "_do_bench", fake_do_bench)
        args = {name: torch.zeros(4) if name.endswith("_ptr") else 1 for name in autotuned.arg_names
                if name not in config.kwargs}
        try:
            autotuned.__dict__.pop("do_bench", None)  # a cached_property: take the fake
            autotuned.cache.clear()
            autotuned.run(**args)
        finally:
            autotuned.__dict__.pop("do_bench", None)
            autotuned.cache.clear()
        best = autotuned.best_config
        assert config_label(best.kwargs, best.num_warps, best.num_stages) != config_label(
            config.kwargs, config.num_warps, config.num_stages), f"{tk.name} picked {config}, which cannot run"
        assert launched, f"{tk.name}: live tuning launched nothing"
