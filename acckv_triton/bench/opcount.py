"""Host cost without a GPU: count the torch ops, host synchronisations and allocations a block of code issues.

    with OpCounter() as c:
        cache.decode_step(q, k, v)
    c.ops, c.syncs, c.allocations, c.by_name

:class:`OpCounter` is a ``TorchDispatchMode``: it sees every aten op below autograd, on any device, so the same
count holds on a CPU and on a GPU. What it counts:

* **ops**: every aten op except views and metadata queries (what a GPU would launch or the CPU would run);
* **syncs**: ops that need a value on the host: ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``),
  ``nonzero`` and the other ops whose output size depends on the data, ``equal``, and copies from host memory
  (``lift_fresh``, a copy whose source lives on the CPU and destination on a GPU);
* **allocations**: ops whose output has storage that none of their inputs had (views, in-place and ``out=`` ops
  allocate nothing).

Triton launches are not aten ops; :func:`count_triton_launches` wraps a ``JITFunction`` launch counter around a
block.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["OpCounter", "count_triton_launches"]

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
             "unique_consecutive", "unique_dim", "equal", "is_nonzero", "lift_fresh", "repeat_interleave"}
"""Ops that read device data on the host (repeat_interleave: with a tensor of repeats, the output size)."""


def _is_view_or_meta(func) -> bool:
    schema = func._schema
    if func.overloadpacket.__name__ in ("lift_fresh",):
        return False
    if any(a.alias_info is not None and not a.alias_info.is_write for a in schema.returns):
        return True  # a view: shares the input's storage and launches nothing
    return func.overloadpacket.__name__ in ("size", "stride", "storage_offset", "sym_size", "sym_stride", "dim",
                                            "is_contiguous", "numel", "sym_numel")


def _storages(tree) -> set[int]:
    out = set()
    for x in tree_flatten(tree)[0]:
        if isinstance(x, torch.Tensor):
            try:
                out.add(x.untyped_storage().data_ptr())
            except RuntimeError:  # tensors without storage (meta, sparse)
                pass
    return out


class OpCounter(TorchDispatchMode):
    """Counts ops, host syncs and allocations inside a ``with`` block (see the module docstring).

    Attributes:
        ops, syncs, allocations: totals.
        by_name: ``Counter`` of op names (views excluded); ``sync_ops`` and ``alloc_ops`` the same for the two kinds.
    """

    def __init__(self):
        super().__init__()
        self.by_name: Counter = Counter()
        self.sync_ops: Counter = Counter()
        self.alloc_ops: Counter = Counter()

    @property
    def ops(self) -> int:
        return sum(self.by_name.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_ops.values())

    @property
    def allocations(self) -> int:
        return sum(self.alloc_ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if _is_view_or_meta(func):
            return func(*args, **kwargs)
        before = _storages((args, kwargs))
        out = func(*args, **kwargs)
        self.by_name[name] += 1
        host_copy = name in ("copy_", "_to_copy", "to") and self._crosses_to_device(args, out)
        if name in _SYNC_OPS or host_copy:
            self.sync_ops[name] += 1
        if _storages(out) - before:
            self.alloc_ops[name] += 1
        return out

    @staticmethod
    def _crosses_to_device(args, out) -> bool:
        """A copy from host memory onto an accelerator (pageable: it synchronises)."""
        tensors = [x for x in tree_flatten((args, out))[0] if isinstance(x, torch.Tensor)]
        return any(t.device.type == "cpu" for t in tensors) and any(t.device.type != "cpu" for t in tensors)


@contextlib.contextmanager
def count_triton_launches(dry_run: bool = False):
    """Count launches of ``@triton.jit`` kernels inside the block: yields a ``Counter`` of kernel names.

    ``dry_run=True`` counts without running the kernels (their outputs keep whatever memory held): for code whose
    host side never reads a kernel's result (0 syncs), the counts are those of a real run, at the interpreter's
    cost of nothing, so a 32k-token layer can be counted on a CPU.

    Works under the interpreter and on a GPU (it wraps ``JITFunction.run``, which every launch goes through; under
    the interpreter, the interpreter's launcher). Inside a launch, dispatch modes are switched off: Triton's
    interpreter runs a kernel by copying its arguments with torch ops of its own, which a GPU launch does not do,
    so an :class:`OpCounter` around the block sees the launcher's ops only.
    """
    from torch.utils._python_dispatch import _disable_current_modes
    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction

    counts: Counter = Counter()
    patched = []
    for cls, attr in ((JITFunction, "run"), (getattr(interp, "InterpretedFunction", None), "run")):
        if cls is None or not hasattr(cls, attr):
            continue
        original = getattr(cls, attr)

        def wrapper(self, *a, _original=original, **k):
            fn = getattr(self, "fn", None)
            counts[getattr(fn, "__name__", getattr(self, "__name__", "kernel"))] += 1
            if dry_run:
                return None
            with _disable_current_modes():
                return _original(self, *a, **k)

        setattr(cls, attr, wrapper)
        patched.append((cls, attr, original))
    try:
        yield counts
    finally:
        for cls, attr, original in patched:
            setattr(cls, attr, original)
