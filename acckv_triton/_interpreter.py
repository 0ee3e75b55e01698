"""Loop bounds under Triton's interpreter where the installed Triton and NumPy cannot run them (used only there).

Triton 3.6's interpreter turns a tensor that Python needs as an int (a loop bound: ``for n0 in range(0, N, BLOCK)``
in nearly every kernel here) into one with ``int(handle.data)``, and its scalars are one-element arrays, which NumPy
2.4 no longer converts ("only 0-dimensional arrays can be converted to Python scalars"); later Triton converts the
one element instead. :func:`ensure_loop_bounds` finds out by running a one-loop probe kernel, not from version
numbers, and only where the probe fails wraps the interpreter's hook that gives ``tl.tensor`` its Python methods at
each launch (undone after the launch) so that it also sets that conversion. A Triton whose interpreter has no such
hook, or that still fails the probe with it, is left as it was: the kernels then raise the interpreter's own error.
Nothing changes where loop bounds already work (Triton 3.9, or NumPy before 2.4), nor on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ensure_loop_bounds", "loop_bounds_work"]


@triton.jit
def _loop_probe(out_ptr, n):
    acc = 0
    for _ in range(0, n):
        acc += 1
    tl.store(out_ptr, acc)


def loop_bounds_work() -> bool:
    """Whether the interpreter runs a kernel whose loop bound is a kernel argument."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe[(1,)](out, 3)
    except Exception:  # the interpreter wraps the failure in its own InterpreterError
        return False
    return int(out[0]) == 3


def ensure_loop_bounds() -> bool:
    """Make loop bounds work under this interpreter if they do not; returns whether they work."""
    if loop_bounds_work():
        return True
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    if loop_bounds_work():
        return True
    interpreter._patch_lang_tensor = original
    return False
