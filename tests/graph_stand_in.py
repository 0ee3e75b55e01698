"""A CPU stand-in for ``torch.cuda.CUDAGraph``, for the tests of what replays a captured decode step.

It does what a graph does that matters for correctness: a capture records the step without changing the device
state (the stand-in runs it, then puts every cache buffer back), and a replay launches the recorded work with the
host values of capture time (the stand-in runs the step again with every host-side value of the cache's layers set
back to its capture-time value, and put back to its replay-time value afterwards, as no Python runs in a replay)
into the captured output buffers. A step whose device work depended on a host value, or that synchronised, or a
caller that forgot to copy an input or to advance the host's counters, makes the outputs differ from eager ones.
"""
from __future__ import annotations

import torch

from acckv_triton.bench.opcount import OpCounter


def _layers(bound) -> list:
    """The ``BudgetedLayerCache`` s an ``AccKVCache`` (or a list of them) holds."""
    if hasattr(bound, "compressed_layers"):
        return [layer.budgeted for layer in bound.compressed_layers]
    return list(bound)


def _host_state(bound, layers) -> list[tuple[object, dict]]:
    """Every host-side value (not a tensor) the Python code of a step reads, per object: each layer and its store,
    and the ``AccKVCache`` itself when one is bound (its count of replayable steps ahead, say)."""
    objs = [obj for layer in layers for obj in (layer, layer.store)]
    if hasattr(bound, "compressed_layers"):
        objs.append(bound)
    return [(obj, {name: x for name, x in vars(obj).items() if not isinstance(x, torch.Tensor)}) for obj in objs]


def _set_host_state(state) -> None:
    for obj, values in state:
        vars(obj).update(values)


class HostFrozenGraph:
    """The stand-in (see the module docstring). ``captures`` and ``replays`` count across instances."""

    device_type = "cpu"
    captures: list = []
    replays = 0

    def __init__(self, bound):
        self.bound, self.layers = bound, _layers(bound)

    @classmethod
    def reset(cls):
        cls.captures, cls.replays = [], 0
        return cls

    def capture(self, fn):
        saved = [{name: t.clone() for name, t in vars(layer.store).items() if isinstance(t, torch.Tensor)}
                 for layer in self.layers]
        self.host = _host_state(self.bound, self.layers)
        self.binding = tuple(layer.store.binding for layer in self.layers)
        with OpCounter() as c:
            self.output = fn()
        assert c.syncs == 0, dict(c.sync_ops)  # a capture fails on a sync
        for layer, state in zip(self.layers, saved):  # a capture records; it runs nothing
            for name, t in state.items():
                getattr(layer.store, name).copy_(t)
        self.fn = fn
        type(self).captures.append(self)
        return self.output

    def replay(self):
        now = _host_state(self.bound, self.layers)
        _set_host_state(self.host)  # the launches carry the host values of capture time, whatever Python has now
        try:
            with OpCounter() as c:
                out = self.fn()
        finally:
            _set_host_state(now)
        assert c.syncs == 0, dict(c.sync_ops)
        if out is not None:
            self.output.logits.copy_(out.logits)
        type(self).replays += 1
