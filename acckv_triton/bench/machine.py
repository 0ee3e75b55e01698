"""What the bench runs on, and how it times: the machine header, copy bandwidth and the timer."""
from __future__ import annotations

import datetime
import platform
from typing import Callable

import torch
import triton

from .. import tuning


def versions() -> dict[str, str]:
    """Library versions that matter for the numbers."""
    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = "not installed"
    info["cuda"] = torch.version.cuda or "none"
    return info


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def machine_header(device: torch.device, measure_bandwidth: bool = True) -> dict[str, object]:
    """Device, mode, versions, date and (on a GPU) the measured copy bandwidth the speed rows refer to."""
    header: dict[str, object] = {"date": datetime.date.today().isoformat(), **versions()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        header.update(device=props.name, sms=props.multi_processor_count,
                      memory_gib=round(props.total_memory / 2**30, 1), mode="gpu")
        if measure_bandwidth:
            header["copy_gbs"] = round(copy_bandwidth_gbs(device), 1)
    else:
        header.update(device=f"CPU ({platform.processor() or platform.machine()})",
                      mode="triton-interpreter" if tuning.INTERPRET else "cpu")
    return header


def wall_timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``fn()`` and its wall seconds, the device synchronised on both sides (whole model calls: generate, a
    prefill forward)."""
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def gpu_timer(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the GPU (``triton.testing.do_bench``: warm-up, L2 flushed between runs)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
