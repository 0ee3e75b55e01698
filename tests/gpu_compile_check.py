"""Compile every acckv_triton kernel ahead of time for an NVIDIA GPU, on a machine without one.

    python tests/gpu_compile_check.py --arch 90        # every flag path x dtype x head dim x layout, and the sweep
    python tests/gpu_compile_check.py --arch 80 --configs default --run rich:float32,bfloat16:64,128:28/4

Run it as its own process: the package must be imported with ``TRITON_INTERPRET=0``, which this script sets before
importing it. A stand-in Triton driver reports the target ``sm_<arch>`` and every launch only compiles
(``JITFunction.run`` with ``warmup=True``: nothing runs, so CPU tensors do), through ptxas to a cubin.

Each ``--run CASES:DTYPES:HEAD_DIMS:LAYOUTS`` calls the public ops at every (dtype, head dim, Hq/Hkv layout) of its
product, the kernels at their default config (the first of each space: what runs with no tuned table and
``ACCKV_AUTOTUNE=0``). CASES ``paths`` turns each launcher flag off and on (decode without any and with modality,
token_mass, multiplicity and 128 splits; window scores plain, with lse given, with modality and key_start;
compact_kv and compact_kv_ with and without merges, with token_data and token_sums of every width; chunk_attention
plain and with multiplicity and key_valid; observed_attention without values, with values, and with values and
key_start); ``rich`` keeps only the every-flag variants, which need the most shared memory. ``--configs all`` (the
default) or ``sweep`` also compiles every other config of every space, forced one kernel at a time, at ``--sweep``
(bf16, D=128, 28/4).

Prints one JSON object on stdout:
``{"triton", "arch", "shared_limit", "seconds", "compiles", "kernels": {name: launches},
"results": [{"kernel", "config", "default", "dtype", "head_dim", "shared", "num_warps", "num_stages", "layouts"}],
"failures": [{"case", "dtype", "head_dim", "layout", "forced", "kernel", "error", "message", "diagnostics"}]}``,
where ``shared`` is the most shared memory (bytes) any launch of that (kernel, config, dtype, head_dim) needs; or
``{"skip": reason}`` when this Triton has no NVIDIA backend or lacks an API the stand-in driver needs. Exit status
0 when everything compiled (or the check was skipped), 1 with failures.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
"""Most shared memory one block may use (the opt-in maximum), bytes, by compute capability: 163 KiB on sm_80 (A100),
99 KiB on sm_86 and sm_89, 227 KiB on sm_90 (H100)."""

DTYPES = ("float32", "float16", "bfloat16")
FULL_RUN = "paths:float32,float16,bfloat16:64,128:28/4,8/8,32/4"  # Hq/Hkv layouts: GQA groups of 7, 1 and 8
SWEEP = "bfloat16:128:28/4"  # where every config of every space is compiled (DTYPE:HEAD_DIM:LAYOUT)


def config_label(kwargs: dict, num_warps, num_stages) -> str:
    """How the summary names a config: ``"BLOCK_N=64 warps=4 stages=2"``."""
    return " ".join(f"{k}={v}" for k, v in kwargs.items()) + f" warps={num_warps} stages={num_stages}"


class CompileFailure(Exception):
    """A kernel failed to compile; carries the kernel's name and the compiler's error lines for the summary."""

    def __init__(self, kernel: str, error: BaseException, diagnostics: str):
        super().__init__(f"{kernel}: {type(error).__name__}: {error}")
        self.kernel, self.error, self.diagnostics = kernel, error, diagnostics


@contextlib.contextmanager
def native_stderr_captured():
    """Collect what is written to file descriptor 2 inside the block (MLIR prints its diagnostics there, not to
    ``sys.stderr``); yields a list that receives the text when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def error_lines(diagnostics: str, limit: int = 12) -> str:
    """The compiler's ``error:`` lines, each with the source line and caret after it."""
    lines = diagnostics.splitlines()
    picked = [j for i, line in enumerate(lines) if "error:" in line for j in range(i, min(i + 3, len(lines)))]
    return "\n".join(lines[j] for j in sorted(set(picked))[:limit])


def install_compile_only_driver(arch: int) -> str | None:
    """Make Triton compile for ``cuda:<arch>`` with no GPU or CUDA driver. Returns None, or why it cannot."""
    import inspect

    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
    except ImportError as exc:
        return f"this Triton lacks an API the compile-only driver needs: {exc}"
    if "nvidia" not in backends:
        return f"this Triton has no NVIDIA backend (backends: {sorted(backends)})"
    if not hasattr(driver, "set_active"):
        return "this Triton lacks triton.runtime.driver.set_active"
    if "warmup" not in inspect.signature(JITFunction.run).parameters:
        return "this Triton's JITFunction.run takes no warmup argument"

    import torch

    class CompileOnlyDriver:
        """Just what ``JITFunction.run(warmup=True)`` asks of a driver: a target, a device index and a stream."""

        def __init__(self, target):
            self.target = target

        def is_active(self):
            return True

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_benchmarker(self):
            raise RuntimeError("compile-only driver: nothing can be launched or timed")

    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    return None


def parse_run(text: str) -> tuple[str, list[tuple[str, int, tuple[int, int]]]]:
    """``"paths:float32,bfloat16:64,128:28/4,8/8"`` -> ``("paths", [(dtype, head_dim, (Hq, Hkv)), ...])``."""
    try:
        cases, dtypes, dims, layouts = text.split(":")
        product = [(dtype, int(dim), tuple(int(h) for h in layout.split("/")))
                   for dtype in dtypes.split(",") for dim in dims.split(",") for layout in layouts.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected CASES:DTYPES:HEAD_DIMS:LAYOUTS, got {text!r}") from exc
    if cases not in ("paths", "rich") or any(dtype not in DTYPES or len(layout) != 2 for dtype, _, layout in product):
        raise argparse.ArgumentTypeError(
            f"cases must be paths or rich, dtypes among {DTYPES}, layouts Hq/Hkv: {text!r}")
    return cases, product


def parse_point(text: str) -> tuple[str, int, tuple[int, int]]:
    """``"bfloat16:128:28/4"`` -> ``("bfloat16", 128, (28, 4))``."""
    try:
        _, product = parse_run(f"rich:{text}")
    except argparse.ArgumentTypeError:
        product = []
    if len(product) != 1:
        raise argparse.ArgumentTypeError(f"expected one DTYPE:HEAD_DIM:LAYOUT such as {SWEEP}, got {text!r}")
    return product[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int: 80, 90, ...")
    parser.add_argument("--run", type=parse_run, action="append", metavar="CASES:DTYPES:HEAD_DIMS:LAYOUTS",
                        help=f"repeatable; default {FULL_RUN}")
    parser.add_argument("--configs", choices=("default", "all", "sweep"), default="all",
                        help="default configs over the matrix; all: also the sweep; sweep: only the sweep")
    parser.add_argument("--sweep", type=parse_point, default=SWEEP,
                        metavar="DTYPE:HEAD_DIM:LAYOUT",
                        help=f"where the sweep compiles every config (default {SWEEP})")
    args = parser.parse_args(argv)

    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["ACCKV_AUTOTUNE"] = "0"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the source tree, when not installed
    import triton

    reason = install_compile_only_driver(args.arch)
    if reason:
        print(json.dumps({"skip": reason}))
        return 0
    started = time.perf_counter()
    runs = args.run or [parse_run(FULL_RUN)]
    matrix = [] if args.configs == "sweep" else [(cases, *point) for cases, product in runs for point in product]
    summary = compile_all(matrix, sweep=args.sweep if args.configs != "default" else None)
    summary.update(triton=triton.__version__, arch=args.arch, shared_limit=SHARED_MEMORY_LIMIT.get(args.arch),
                   seconds=round(time.perf_counter() - started, 1))
    print(json.dumps(summary, indent=1))
    return 1 if summary["failures"] else 0


def compile_all(matrix, *, sweep) -> dict:
    """Compile the ops' kernels for each (cases, dtype, head_dim, layout) of ``matrix``, then every config at the
    (dtype, head_dim, layout) ``sweep`` unless it is None; returns the summary."""
    import importlib

    import torch
    from triton.runtime.jit import JITFunction

    from acckv_triton import tuning
    from acckv_triton.ops import _common

    if tuning.INTERPRET:
        raise RuntimeError("acckv_triton was imported under the interpreter; run this script in a fresh process")
    modules = {op: importlib.import_module(f"acckv_triton.ops.{op}") for op in
               ("decode_attention", "window_scores", "compact_kv", "chunk_attention", "observed_attention")}
    for module in [_common, *modules.values()]:  # CPU tensors are fine: nothing is launched
        if hasattr(module, "check_kernel_device"):
            module.check_kernel_device = lambda *a, **k: None
    tuned_by_op = {op: [x for x in vars(m).values() if isinstance(x, tuning.TunedKernel)] for op, m in modules.items()}
    tuned = {id(tk.fn): tk for tks in tuned_by_op.values() for tk in tks}

    context: dict = {}
    results: dict = {}
    launches: dict = {}
    compiled: set = set()
    failures: list = []

    def config_of(jit_fn, kwargs, kernel) -> tuple[str, bool]:
        tk = tuned.get(id(jit_fn))
        if tk is None:  # launched directly, with launcher-chosen constexprs
            return f"launcher warps={kernel.metadata.num_warps}", True
        first = tk.configs[0]
        label = config_label({name: kwargs[name] for name in first.kwargs}, kwargs.get("num_warps"),
                             kwargs.get("num_stages"))
        return label, label == config_label(first.kwargs, first.num_warps, first.num_stages)

    original_run = JITFunction.run

    def compile_only_run(self, *args, grid, warmup, **kwargs):
        name = self.fn.__name__
        error = None
        with native_stderr_captured() as captured:
            try:
                kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
            except Exception as exc:  # noqa: BLE001 (every compile error is reported, with its kernel)
                error = exc
        if error is not None:
            raise CompileFailure(name, error, error_lines(captured[0])) from error
        sys.stderr.write(captured[0])  # warnings of a compile that worked
        label, is_default = config_of(self, kwargs, kernel)
        key = (name, label, context["dtype"], context["head_dim"])
        meta = kernel.metadata
        entry = results.setdefault(key, {
            "kernel": name, "config": label, "default": is_default, "dtype": context["dtype"],
            "head_dim": context["head_dim"], "shared": 0, "num_warps": meta.num_warps,
            "num_stages": getattr(meta, "num_stages", None), "layouts": [],
        })
        entry["shared"] = max(entry["shared"], int(meta.shared))
        if context["layout"] not in entry["layouts"]:
            entry["layouts"].append(context["layout"])
        launches[name] = launches.get(name, 0) + 1
        compiled.add(id(kernel))
        return kernel

    def attempt(case: str, forced: str | None, call) -> None:
        where = dict(case=case, dtype=context["dtype"], head_dim=context["head_dim"], layout=context["layout"],
                     forced=forced)
        try:
            call()
        except CompileFailure as exc:
            failures.append(dict(where, kernel=exc.kernel, error=type(exc.error).__name__,
                                 message=str(exc.error)[:4000], diagnostics=exc.diagnostics))
        except Exception as exc:  # noqa: BLE001 (a launcher error is a failure too)
            failures.append(dict(where, kernel=None, error=type(exc).__name__, message=str(exc)[:4000],
                                 diagnostics=""))

    JITFunction.run = compile_only_run
    try:
        for case_set, dtype, head_dim, layout in matrix:
            context.update(dtype=dtype, head_dim=head_dim, layout=f"{layout[0]}/{layout[1]}")
            for op, cases in _cases(getattr(torch, dtype), head_dim, *layout, case_set).items():
                for case, call in cases:
                    attempt(case, None, call)
        if sweep is not None:
            dtype, head_dim, layout = sweep
            context.update(dtype=dtype, head_dim=head_dim, layout=f"{layout[0]}/{layout[1]}")
            for op, cases in _cases(getattr(torch, dtype), head_dim, *layout, "sweep").items():
                for case, call in cases:
                    attempt(case, None, call)
                    if case.startswith("short window"):  # only to reach the smallest row block, at the defaults
                        continue
                    for tk in tuned_by_op.get(op, ()):  # the fused policy has no tuned configs
                        for config in tk.configs[1:]:
                            with tk.forcing(config):
                                attempt(case, f"{tk.name}: " + config_label(
                                    config.kwargs, config.num_warps, config.num_stages), call)
    finally:
        JITFunction.run = original_run
    return {"compiles": len(compiled), "kernels": dict(sorted(launches.items())),
            "results": sorted(results.values(), key=lambda r: (r["kernel"], r["config"], r["dtype"], r["head_dim"])),
            "failures": failures}


def _cases(dtype, D: int, Hq: int, Hkv: int, case_set: str) -> dict:
    """Calls of every public op, by op module name: ``{op: [(case, call)]}``. ``case_set``: paths, rich or sweep
    (rich plus a window short enough for the smallest row block)."""
    import torch

    import acckv_triton as ak

    B, C, W, K = 2, 300, 32, 100
    rich = case_set != "paths"
    g = torch.Generator().manual_seed(0)
    kv = lambda n: torch.randn(B, Hkv, n, D, generator=g).to(dtype)  # noqa: E731
    k, v = kv(C), kv(C)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    lengths = torch.full((B, Hkv), C, dtype=torch.int32)
    modality = torch.randint(0, ak.NUM_MODALITIES, (B, Hkv, C), generator=g, dtype=torch.uint8)
    multiplicity = torch.ones(B, Hkv, C)

    def decode_all_flags():  # 128 splits: the widest reduction
        ak.decode_attention(q, k, v, lengths, modality=modality, token_mass=torch.zeros(B, Hkv, C),
                            multiplicity=multiplicity, num_splits=128)

    decode = [("modality+token_mass+multiplicity, 128 splits", decode_all_flags)]
    if not rich:
        decode.append(("no flags", lambda: ak.decode_attention(q, k, v, lengths, check_lengths=False)))

    q_window = torch.randn(B, Hq, W, D, generator=g).to(dtype)
    key_start = torch.tensor([0, 17], dtype=torch.int32)
    lse = torch.randn(B, Hq, W, generator=g) + 5.0
    window = [("modality+key_start", lambda: ak.window_scores(q_window, k, modality=modality, key_start=key_start))]
    if not rich:
        window += [("no flags", lambda: ak.window_scores(q_window, k)),
                   ("no flags, lse given", lambda: ak.window_scores(q_window, k, lse=lse))]
    if case_set == "sweep":  # W * G <= 16: the smallest row block
        q_short = q_window[:, :, -max(1, 16 // (Hq // Hkv)):].contiguous()
        window.append(("short window, modality", lambda: ak.window_scores(q_short, k, modality=modality)))

    keep = torch.arange(0, 2 * K, 2, dtype=torch.int32).expand(B, Hkv, K).contiguous()
    keep_lengths = torch.full((B, Hkv), K, dtype=torch.int32)
    merge_target = (torch.arange(C) % K).to(torch.int32).expand(B, Hkv, C).contiguous()
    merge_weight = torch.rand(B, Hkv, C, generator=g) + 0.5
    data_dtypes = (torch.uint8, torch.int16, torch.int32, torch.int64)  # every width a gather moves
    sum_dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def merges(merge: bool) -> dict:
        return dict(merge_target=merge_target, merge_weight=merge_weight) if merge else {}

    def out_of_place(merge: bool) -> None:
        token_data = [torch.zeros(B, Hkv, C, dtype=d) for d in data_dtypes]
        token_sums = [torch.zeros(B, Hkv, C, dtype=d) for d in sum_dtypes]
        ak.compact_kv(k, v, lengths, keep, keep_lengths, out_k=kv(K), out_v=kv(K), token_data=token_data,
                      token_sums=token_sums, out_token_data=[torch.empty(B, Hkv, K, dtype=d) for d in data_dtypes],
                      out_token_sums=[torch.empty(B, Hkv, K, dtype=d) for d in sum_dtypes], **merges(merge))

    def in_place(merge: bool) -> None:
        ak.compact_kv_(k.clone(), v.clone(), lengths.clone(), keep, keep_lengths,
                       token_data=[torch.zeros(B, Hkv, C, dtype=d) for d in data_dtypes],
                       token_sums=[torch.zeros(B, Hkv, C, dtype=d) for d in sum_dtypes], **merges(merge))

    compact = [("compact_kv, merges, metadata", lambda: out_of_place(True)),
               ("compact_kv_, merges, metadata", lambda: in_place(True))]
    if not rich:
        compact += [("compact_kv, metadata", lambda: out_of_place(False)),
                    ("compact_kv_, metadata", lambda: in_place(False))]
    from acckv_triton.fused_policy import plan_layer_fused
    from acckv_triton.policy import LayerTokens

    tokens = LayerTokens(scores=torch.rand(B, Hkv, C, generator=g), modality=modality, lengths=lengths,
                         time=torch.arange(C, dtype=torch.int32).expand(B, Hkv, C),
                         keys=k, spatial=torch.zeros(B, Hkv, C, 2, dtype=torch.int32),
                         valid=torch.ones(B, Hkv, C, dtype=torch.bool))
    target = torch.full((B, Hkv), K, dtype=torch.int64)

    def policy(**cfg) -> None:
        plan_layer_fused(ak.AccKVConfig(**cfg), tokens, target=target, max_keep=K)

    # The policy's kernels depend on the dtype only through an upcast of the keys, use a few KiB of shared memory,
    # and take long to compile: every flag path once, in the fp32 "paths" job (sm_90).
    policies = []
    if case_set == "paths" and dtype == torch.float32:
        policies = [("acckv", lambda: policy()), ("lookm", lambda: policy(method="lookm")),
                    ("acckv avg pool, renorm", lambda: policy(pool_mode="avg", head_renorm=True, gamma=2.0)),
                    ("acckv no merge, no lift", lambda: policy(intra_merge=False, pool_lift=1.0)),
                    ("streaming", lambda: policy(method="streaming")),
                    ("adakv (adaptive head budgets)", lambda: policy(method="adakv"))]
    T = 40
    q_chunk, k_chunk = torch.randn(B, Hq, T, D, generator=g).to(dtype), kv(T)
    key_valid = torch.ones(B, T, dtype=torch.bool)
    chunk = [("multiplicity+key_valid", lambda: ak.chunk_attention(q_chunk, k, v, lengths, k_chunk, k_chunk,
                                                                   multiplicity=multiplicity, key_valid=key_valid))]
    if not rich:
        chunk.append(("no flags", lambda: ak.chunk_attention(q_chunk, k, v, lengths, k_chunk, k_chunk)))
    T_prompt = 200
    q_prompt, k_prompt = torch.randn(B, Hq, T_prompt, D, generator=g).to(dtype), kv(T_prompt)
    prompt_start = torch.tensor([0, 70], dtype=torch.int32)
    observed = [("values+key_start", lambda: ak.observed_attention(q_prompt, k_prompt, k_prompt,
                                                                   key_start=prompt_start))]
    if not rich:
        observed += [("no flags", lambda: ak.observed_attention(q_prompt, k_prompt)),
                     ("values", lambda: ak.observed_attention(q_prompt, k_prompt, k_prompt))]
    return {"decode_attention": decode, "window_scores": window, "compact_kv": compact, "fused_policy": policies,
            "chunk_attention": chunk, "observed_attention": observed}


if __name__ == "__main__":
    raise SystemExit(main())
