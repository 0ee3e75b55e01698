"""Shared test fixtures. Kernels run on CUDA when a GPU is present, else through Triton's interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

import acckv_triton  # noqa: F401  (sets the execution mode before any kernel module is imported)

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

# One (atol, rtol) per dtype for kernel outputs stored in that dtype, compared with the float64 reference computed
# from the same rounded inputs. fp32 stays tight; 16-bit allows the final rounding plus, on a GPU, probabilities
# rounded to the dtype before the P·V tensor-core product.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def poison_empty(monkeypatch):
    """Make every floating ``torch.empty`` / ``torch.empty_like`` return NaN-filled memory during the test.

    Kernels allocate their outputs and scratch with ``torch.empty``; with this fixture, any element they fail to
    write (or any scratch they read before writing) shows up as NaN instead of as plausible leftover memory.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-(2**30))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    yield
