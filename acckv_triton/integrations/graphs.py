"""CUDA graphs over a patched model's whole decode forward: ``apply_acckv(model, cfg, decode_graphs=True)``.

A decode step of a model whose cache is an :class:`~acckv_triton.integrations.transformers.AccKVCache` launches the
same work on the same buffers every step: the cache's storage keeps its addresses between prefills (the upkeep
compacts in place), lengths and positions live on the device, and a step without upkeep neither synchronises nor
allocates. So one captured graph of ``model.forward`` for a ``[B, 1]`` token (embedding, every layer, the LM head)
replays every such step; the host only copies the step's inputs in and advances the cache's host counters.

:class:`DecodeGraphs` is the switch ``apply_acckv`` installs on the model instance (its ``forward``), so
``generate()`` and hand-written loops use it unchanged. Per call it decides on the host, from counts it already
has, whether the step can replay:

* **replayed**: a single-token step (``input_ids [B, 1]`` on CUDA, no ``inputs_embeds``, no attentions or hidden
  states asked for) over a prefilled cache whose every layer appends in place and runs no upkeep at this step,
  with the storage the graph was captured over;
* **eager** otherwise, with the reason counted in :attr:`DecodeGraphs.stats`: a prompt or later chunk (which
  also releases the graph), a step where some layer's upkeep is due (one in ``slack + 1`` steps), a storage that
  changed (a new prefill, a budget that outgrew it, beam reordering; the graph is captured again after
  ``warmup`` eager steps), a CPU tensor or another than the current CUDA device, a capture that raised (that
  storage then runs eager).

The 2-D ``attention_mask`` that ``generate`` grows by one column a step is not passed to the graph: a decode token
attends over the stored tokens through the cache's own lengths (left padding was dropped when the prompt was
stored), so no layer reads it. ``position_ids`` and ``cache_position`` are copied into the graph's static inputs.

Supported: text decoders without sliding-window layers (Llama, Qwen2 without sliding layers, Qwen3, Mistral) below
budget 1.0, any method, one device. Refused by ``apply_acckv``: budget 1.0 (that cache concatenates like
``DynamicCache``), models with sliding-window layers (transformers' window layer reallocates every step),
``dynamic`` / ``longrope`` RoPE (updated from a host read of the positions), a model spread over devices and the
multimodal models (their decode positions and modality ids are computed from host state inside the forward).
"""
from __future__ import annotations

import functools
import inspect
from collections import Counter
from typing import Any, Callable

import torch

__all__ = ["DecodeGraphs", "GRAPH_DECODE_AHEAD"]

GRAPH_DECODE_AHEAD = 256
"""Decoded tokens the storage is sized ahead for under ``apply_acckv(decode_graphs=True)`` when the config leaves
``decode_ahead`` None: a growing budget then reallocates the storage, and the graph is captured again, once per
that many tokens."""

# forward kwargs a decode step may carry; anything else set runs eager
_STEP_KWARGS = frozenset({"input_ids", "attention_mask", "position_ids", "cache_position", "cache", "past_key_values",
                          "use_cache", "return_dict", "logits_to_keep", "output_attentions", "output_hidden_states"})


class CudaGraph:
    """One ``torch.cuda.CUDAGraph``: :meth:`capture` records ``fn()`` (nothing runs on the device), :meth:`replay`
    launches it. :class:`DecodeGraphs` takes any object with this interface (the CPU tests pass a stand-in)."""

    device_type = "cuda"

    def __init__(self, cache=None):  # the cache it will bind (a stand-in may need it; a CUDA graph does not)
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Any]) -> Any:
        """Record ``fn()`` into the graph (under ``torch.cuda.graph``) and return what it returned."""
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        """Launch the recorded work again, on the buffers bound at capture."""
        self.graph.replay()


class _Captured:
    """A captured decode forward: what it binds, its static inputs and its output's tensors (the output's cache
    field is left out: a finished conversation's cache must not outlive it through the graph)."""

    def __init__(self, key: tuple, graph, inputs: dict[str, torch.Tensor], output, cache):
        self.key, self.graph, self.inputs = key, graph, inputs
        self.output_type = type(output)
        self.tensors = {name: value for name, value in output.items() if isinstance(value, torch.Tensor)}
        self.cache_fields = [name for name, value in output.items() if value is cache]

    def result(self, cache):
        """The step's output: copies of the graph's output tensors (the next replay rewrites them), this call's
        cache."""
        fields = {name: value.clone() for name, value in self.tensors.items()}
        fields.update({name: cache for name in self.cache_fields})
        return self.output_type(**fields)


class DecodeGraphs:
    """The decode-graph switch of one patched model (see the module docstring): ``handle.graphs``.

    Args:
        model: the patched model; :meth:`install` wraps its ``forward``.
        warmup: eager single-token steps over a storage before it is captured (kernels compiled and tuned, decode
            plans built, libraries initialised: none of that may happen inside a capture).
        graph_factory: called with the cache to bind, returns a graph object (default :class:`CudaGraph`); its
            ``device_type`` attribute names the device it captures on.

    Attributes:
        stats: ``Counter`` of ``"replayed"``, ``"captured"`` and ``"eager: <reason>"`` per forward call.
    """

    def __init__(self, model, *, warmup: int = 1, graph_factory: Callable[[Any], Any] = CudaGraph):
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.model, self.warmup, self.graph_factory = model, warmup, graph_factory
        self.stats: Counter = Counter()
        self._captured: _Captured | None = None
        self._warm: tuple[tuple | None, int] = (None, 0)  # (key, eager steps seen over it)
        self._failed: set[tuple] = set()  # keys whose capture raised: they run eager
        self._forward: Callable | None = None
        self._previous_forward = None  # an instance-level forward that was there before (accelerate's hooks)
        self._takes_cache_position = False

    # ---- installing
    def install(self) -> None:
        """Route the model instance's ``forward`` through :meth:`__call__` (``generate`` and ``model(...)`` both)."""
        original = self.model.forward  # the class's bound method

        @functools.wraps(original)  # generate reads forward's signature (logits_to_keep, ...): keep the original's
        def forward(*args, **kwargs):
            return self(original, *args, **kwargs)

        self._forward = original
        self._previous_forward = self.model.__dict__.get("forward")
        self._takes_cache_position = "cache_position" in inspect.signature(original).parameters
        self.model.forward = forward

    def uninstall(self) -> None:
        """Restore the model's ``forward`` as it was and drop the captured graph (its memory pool is released)."""
        if self._previous_forward is not None:
            self.model.forward = self._previous_forward
        else:
            self.model.__dict__.pop("forward", None)
        self._captured, self._warm, self._forward, self._previous_forward = None, (None, 0), None, None
        self._failed.clear()

    # ---- one forward call
    def __call__(self, forward: Callable, *args, **kwargs):
        """Run one forward call: replay the captured decode graph when the step allows it, else ``forward``."""
        reason, key, call = self._plan(args, kwargs)
        if reason in ("not a single-token step", "empty cache"):  # a new prompt: the old graph's storage is done
            self._captured = None
        if reason is None and key in self._failed:
            reason = "capture failed"
        if reason is not None:
            self.stats[f"eager: {reason}"] += 1
            return forward(*args, **kwargs)
        cache = call[call["_cache_name"]]
        captured = self._captured
        if captured is None or captured.key != key:
            self._captured = None  # its storage is gone: release the graph and its pool before anything else
            warm_key, seen = self._warm
            seen = seen + 1 if warm_key == key else 1
            self._warm = (key, seen)
            if seen <= self.warmup:
                self.stats["eager: warm-up"] += 1
                return forward(*args, **kwargs)
            try:
                captured = self._capture(forward, key, call, cache)
            except Exception:  # e.g. a sync inside the forward: nothing ran (the counters are back), so run eager
                self._failed.add(key)
                self.stats["eager: capture failed"] += 1
                return forward(*args, **kwargs)
            self._captured = captured
            self.stats["captured"] += 1
        self._fill(captured.inputs, call, cache)
        captured.graph.replay()
        cache.count_replayed_step()
        self.stats["replayed"] += 1
        return captured.result(cache)

    def _plan(self, args: tuple, kwargs: dict) -> tuple[str | None, tuple | None, dict]:
        """(reason to run eager or None, the graph key, the step's inputs), decided on the host."""
        from .transformers import _CACHE_KWARGS, AccKVCache

        if len(args) > 1:
            return "positional arguments", None, {}
        call = dict(kwargs)
        if args:
            call["input_ids"] = args[0]
        ids = call.get("input_ids")
        given = [name for name in _CACHE_KWARGS if call.get(name) is not None]
        cache = call[given[0]] if len(given) == 1 else None
        extra = sorted(name for name, value in call.items() if value is not None and name not in _STEP_KWARGS)
        if extra:
            return f"argument {extra[0]}", None, call
        config = getattr(self.model, "config", None)
        wanted = {name: call.get(name) if call.get(name) is not None else getattr(config, name, False)
                  for name in ("output_attentions", "output_hidden_states")}
        if any(wanted.values()) or call.get("use_cache") is False or call.get("return_dict") is False:
            return "outputs asked for", None, call
        if not isinstance(call.get("logits_to_keep", 0), int):
            return "logits_to_keep is a tensor", None, call
        if not isinstance(cache, AccKVCache):
            return "no AccKVCache", None, call
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1:
            return "not a single-token step", None, call
        if torch.is_grad_enabled():
            return "autograd on", None, call
        if ids.device.type != getattr(self.graph_factory, "device_type", "cuda"):
            return f"{ids.device.type} tensors", None, call
        if ids.device.type == "cuda" and ids.device.index != torch.cuda.current_device():
            return "not the current CUDA device", None, call  # a capture records on the current device only
        why = cache.graph_step_blocker()
        if why is not None:
            return why, None, call
        pos, cp = call.get("position_ids"), call.get("cache_position")
        shapes = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in (ids, pos, cp))
        key = (cache.graph_binding(), shapes, call.get("logits_to_keep", 0), given[0])
        call["_cache_name"] = given[0]
        return None, key, call

    @staticmethod
    def _fill(inputs: dict[str, torch.Tensor], call: dict, cache) -> None:
        """Copy this step's inputs into the graph's; positions not given follow the model's own rule:
        ``cache_position`` when the call has it, else the tokens seen so far (``arange(T) + seen``, T = 1, written
        on the device without a host-to-device copy)."""
        for name, buf in inputs.items():
            given = call.get(name)
            if given is None and name == "position_ids" and call.get("cache_position") is not None:
                given = call["cache_position"].view(1, -1)
            if given is None:
                buf.fill_(cache.get_seq_length())
            else:
                buf.copy_(given)

    def _capture(self, forward: Callable, key: tuple, call: dict, cache) -> _Captured:
        """Capture the decode forward for this step's shapes over this storage (its device work is recorded, not
        run; its host counters are put back, so the replay that follows does the step)."""
        ids = call["input_ids"]
        inputs = {"input_ids": torch.empty_like(ids)}
        pos = call.get("position_ids")  # always given to the graph: a model computes it from the host's count
        inputs["position_ids"] = torch.empty_like(pos) if pos is not None else \
            torch.empty(1, 1, dtype=torch.long, device=ids.device)
        cp = call.get("cache_position")
        if cp is not None or self._takes_cache_position:  # transformers before 5.24 derives positions from it
            inputs["cache_position"] = torch.empty_like(cp) if cp is not None else \
                torch.empty(1, dtype=torch.long, device=ids.device)
        run = dict(inputs, use_cache=True, return_dict=True)
        run[call["_cache_name"]] = cache  # the name this transformers' forward takes
        if "logits_to_keep" in call:
            run["logits_to_keep"] = call["logits_to_keep"]
        self._fill(inputs, call, cache)  # the capture reads them: give them this step's values
        graph = self.graph_factory(cache)
        counters = cache.host_counters()
        try:
            output = graph.capture(lambda: forward(**run))
        finally:
            cache.restore_host_counters(counters)
        return _Captured(key, graph, inputs, output, cache)
