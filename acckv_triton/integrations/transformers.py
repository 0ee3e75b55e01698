"""Hugging Face ``transformers`` (5.x) integration: one call compresses a model's KV cache with AccKV.

    handle = apply_acckv(model, AccKVConfig(budget=0.25))   # this model instance only; importing patched nothing
    out = model.generate(**inputs)                           # unchanged call; the cache is an AccKVCache
    cache = handle.new_cache()                               # hand-written loops: model(ids, cache=cache), or
                                                             # past_key_values=cache before transformers 5.24
    handle.revert()                                          # exactly the original model again

Design (data flows integration -> cache -> policy -> ops):

* **One generic patcher, one spec table.** :data:`MODEL_SPECS` says, per supported ``config.model_type``, where the
  decoder stack is (the module that receives ``position_ids``), whether its position ids are TMRoPE rows (temporal,
  h, w) and which config fields hold the audio / video / image placeholder token ids.
* **Hook points** (all instance-level, all removed by ``revert``):
    1. ``_prepare_cache_for_generation`` is wrapped on the instance: when ``generate`` would build its default
       ``DynamicCache``, it gets an empty :class:`AccKVCache` instead. A user-given cache is left alone.
    2. A forward pre-hook on the top model captures ``input_ids`` (the modality of every token, from the config's
       placeholder ids) and one on the decoder stack captures the 2-D ``attention_mask`` (left padding) and the
       ``position_ids`` the model computed: for the Qwen2.5-Omni thinker these are the 3-D TMRoPE ids
       ``[3 or 4, B, T]`` after ``get_rope_index`` and the rope deltas, so the temporal row gives each token's time
       and the h / w rows its patch. They go to the cache as the metadata of the chunk being fed.
    3. Below budget 1.0 the decoder's attention implementation is switched to ``"acckv_<original>"`` (registered in
       ``AttentionInterface`` and, with the original's mask function, ``AttentionMaskInterface`` on first use and
       unregistered when the last handle reverts). It routes calls that carry an :class:`AccKVCache` to the cache
       layer and everything else to the original implementation, so a model sharing the config stays exact.
* **Paths** (per layer, inside the attention call; the cache layer's ``update`` only stages the new K/V):
    - prefill (empty layer): the original attention (SDPA) over the full K/V, then the cache's
      :meth:`BudgetedLayerCache.prompt_evidence` (the window's, the last query's or every query's attention mass),
      then :meth:`BudgetedLayerCache.prefill` (policy -> ``compact_kv``), layer by layer. When the evidence is every
      query's and the prompt's attention is plain causal (no padding, no mask, no other attention kwargs, no
      autograd), :meth:`BudgetedLayerCache.prompt_attention` computes the attention output and that evidence in one
      pass instead of the original attention plus a second pass over the same logits;
    - decode (one query): :meth:`BudgetedLayerCache.decode_step`: append, attention over the stored tokens (token
      mass accumulated where the method reads it, multiplicity weighted), the upkeep when a row passes budget +
      slack; no host sync and no allocation between upkeeps;
    - a later chunk of several tokens (a second question, teacher forcing): exact attention over the stored tokens
      and the chunk (causal inside the chunk, log-multiplicity bias on merged slots), the window queries' mass added
      to the stored tokens, then the chunk is stored as a streaming prefill.
* **Reconstruction evidence** (``method="kvzip"``, after KVzip): the first prompt's forward stores every layer
  uncompressed; when the decoder stack returns, the handle runs it once more on the same inputs at the positions that
  follow (the prompt fed again after itself, stored nothing), each layer scoring every stored token by the largest
  attention any reconstruction query gives it (:meth:`BudgetedLayerCache.reconstruct`), then compresses every layer.
  A second forward over the prompt (its attention over twice the keys); the logits returned are the first pass's.
  Text decoders without sliding-window layers and prompts without padding only (refused elsewhere); later chunks
  rank by their window.
* **Budget 1.0** (or ``method="full"``) switches no attention function: the cache stores every token and hands the
  model its full K/V exactly like ``DynamicCache``, so outputs are bit-identical.
* **Backends**: ``"triton"`` runs the kernels (interpreted on a CPU); ``"torch"`` the vectorised PyTorch ops of
  :mod:`acckv_triton.torch_ops` (``LayerKVCache(backend=...)``); ``"auto"`` the kernels on CUDA tensors and the
  torch ops on CPU ones.
* **Sliding-window layers** keep the layer transformers' ``DynamicCache(config=...)`` would build for them (a
  ``DynamicSlidingWindowLayer``) and their original attention over it, exactly as the model defines them; only the
  full-attention layers are :class:`AccKVLayer` s. A model with no full-attention layer is refused below budget 1.0.
* **generate modes**: beam search and ``num_return_sequences`` reorder every row of every layer (K/V, lengths,
  metadata, targets); ``crop`` (assisted decoding) works at budget 1.0 and is refused below it.
* **CUDA graphs** (``apply_acckv(..., decode_graphs=True)``, :mod:`acckv_triton.integrations.graphs`): the whole
  decode forward replayed as one graph in every step without upkeep; text decoders without sliding-window layers.
* Not supported: static caches / ``torch.compile``, attention logit soft-capping, bidirectional attention.
  A Qwen2.5-Omni or Qwen3-Omni hand-written decode loop must pass ``position_ids`` or no 2-D mask (the thinkers
  derive decode positions from a 2-D mask correctly only inside ``generate``, patched or not).
"""
from __future__ import annotations

import inspect
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..cache import BudgetedLayerCache
from ..config import AccKVConfig
from ..modality import Modality
from .graphs import GRAPH_DECODE_AHEAD, DecodeGraphs

__all__ = ["AccKVCache", "AccKVHandle", "AccKVLayer", "MODEL_SPECS", "ModelSpec", "SUPPORTED_MODELS", "acckv",
           "apply_acckv", "cache_keyword", "output_cache"]


# ------------------------------------------------------------------------------------------------------ spec table
@dataclass(frozen=True)
class ModelSpec:
    """Where a model family keeps what the patcher needs.

    Attributes:
        name: shown in errors and docs.
        model_types: the ``config.model_type`` values this spec covers.
        decoder: dotted paths from the model to the decoder stack (has ``.layers[i].<attention>``, receives
            ``attention_mask`` and ``position_ids``), tried in order: transformers versions differ in where they
            keep it.
        attention: attribute name of the attention module in each decoder layer.
        mrope: position ids are TMRoPE rows ``[3, B, T]`` (temporal, h, w), optionally with a text row first.
        modality_token_ids: ``(config field, Modality)`` pairs: tokens equal to that id carry that modality.
    """

    name: str
    model_types: tuple[str, ...]
    decoder: tuple[str, ...] = ("model",)
    attention: str = "self_attn"
    mrope: bool = False
    modality_token_ids: tuple[tuple[str, Modality], ...] = ()


MODEL_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("Llama", ("llama",)),
    ModelSpec("Qwen2", ("qwen2",)),
    ModelSpec("Qwen3", ("qwen3",)),
    ModelSpec("Mistral", ("mistral",)),
    ModelSpec("Gemma 3", ("gemma3_text",)),
    ModelSpec("Qwen2.5-VL", ("qwen2_5_vl",), decoder=("model.language_model", "model"), mrope=True,
              modality_token_ids=(("image_token_id", Modality.IMAGE), ("video_token_id", Modality.VIDEO))),
    ModelSpec("Qwen3-VL", ("qwen3_vl",), decoder=("model.language_model", "model"), mrope=True,
              modality_token_ids=(("image_token_id", Modality.IMAGE), ("video_token_id", Modality.VIDEO))),
    ModelSpec("Qwen2.5-Omni thinker", ("qwen2_5_omni_thinker",), decoder=("model.language_model", "model"), mrope=True,
              modality_token_ids=(("audio_token_index", Modality.AUDIO), ("video_token_index", Modality.VIDEO),
                                  ("image_token_index", Modality.IMAGE))),
    ModelSpec("Qwen3-Omni thinker", ("qwen3_omni_moe_thinker",), decoder=("model.language_model", "model"), mrope=True,
              modality_token_ids=(("audio_token_id", Modality.AUDIO), ("video_token_id", Modality.VIDEO),
                                  ("image_token_id", Modality.IMAGE))),
)
SUPPORTED_MODELS: tuple[str, ...] = tuple(s.name for s in MODEL_SPECS)


def _spec_for(model) -> ModelSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in MODEL_SPECS:
        if model_type in spec.model_types:
            return spec
    raise ValueError(f"apply_acckv supports {', '.join(SUPPORTED_MODELS)} (model_type "
                     f"{', '.join(t for s in MODEL_SPECS for t in s.model_types)}); got {type(model).__name__} with "
                     f"model_type {model_type!r}. For a full Qwen2.5-Omni or Qwen3-Omni model, patch its thinker: "
                     "apply_acckv(model.thinker, cfg).")


def _model_layers(config) -> list:
    """The cache layers transformers' own ``DynamicCache(config=config)`` builds for this model, one per decoder layer:
    ``DynamicLayer`` (full attention: AccKV compresses it) or ``DynamicSlidingWindowLayer`` (sliding-window attention:
    kept as the model defines it, the last ``window - 1`` tokens, uncompressed). Raises ValueError for any other kind
    (linear attention, shared or dummy layers): AccKV would not know what that layer's attention sees."""
    layers = DynamicCache(config=config).layers
    for i, layer in enumerate(layers):
        if type(layer) is not DynamicLayer and not isinstance(layer, DynamicSlidingWindowLayer):
            raise ValueError(f"apply_acckv supports full-attention and sliding-window layers; layer {i} of this model "
                             f"is cached by transformers as a {type(layer).__name__}")
    return layers


def _check_layers(model, cfg: AccKVConfig, num_layers: int) -> None:
    """Refuse what the cache cannot honour: a layer kind other than full / sliding-window attention, a layer count
    that differs from the decoder's, logit soft-capping or bidirectional attention (AccKV's kernels are plain causal
    softmax attention), and a budget below 1.0 on a model with no full-attention layer (nothing to compress)."""
    layers = _model_layers(model.config)
    if len(layers) != num_layers:
        raise ValueError(f"apply_acckv: the config describes {len(layers)} cache layers, the decoder has {num_layers}")
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"apply_acckv does not support attention logit soft-capping (config.attn_logit_softcapping="
                         f"{text.attn_logit_softcapping}); AccKV's kernels compute plain softmax attention")
    if getattr(text, "use_bidirectional_attention", False):
        raise ValueError("apply_acckv does not support bidirectional attention (config.use_bidirectional_attention="
                         "True): a KV cache is for causal decoding")
    if not cfg.is_full and cfg.score_evidence == "reconstruction":
        spec = _spec_for(model)
        what = f"apply_acckv: reconstruction evidence (method={cfg.method!r})"
        if spec.mrope or spec.modality_token_ids:
            raise ValueError(f"{what} feeds the prompt's ids again; {spec.name} prompts carry media and M-RoPE "
                             "positions it cannot repeat (use a text model)")
        if any(type(layer) is not DynamicLayer for layer in layers):
            raise ValueError(f"{what} needs every layer to be full attention; the reconstruction pass would enter "
                             "this model's sliding-window caches")
    if not cfg.is_full and all(type(layer) is not DynamicLayer for layer in layers):
        window = getattr(layers[0], "sliding_window", None)
        raise ValueError(f"apply_acckv compresses full-attention layers, and every layer of this "
                         f"{type(model).__name__} is sliding-window attention (config.sliding_window={window}): "
                         "there is nothing to compress. Use budget=1.0, or a config with sliding_window=None (e.g. "
                         "Mistral v0.2 and later).")


def _check_graphs(model, cfg: AccKVConfig, spec: ModelSpec) -> None:
    """Refuse ``decode_graphs=True`` where a captured decode forward would not replay what the eager one does."""
    what = "apply_acckv(decode_graphs=True)"
    if cfg.is_full:
        raise ValueError(f"{what} needs a budget below 1.0: at budget 1.0 the cache stores like DynamicCache (a "
                         "new tensor per step), which no graph can replay")
    if spec.mrope or spec.modality_token_ids:
        raise ValueError(f"{what} supports text decoders; {spec.name} computes decode positions and modality ids "
                         "from host state inside its forward")
    if any(type(layer) is not DynamicLayer for layer in _model_layers(model.config)):
        raise ValueError(f"{what} needs every layer to be full attention; transformers' sliding-window cache "
                         "layers reallocate at every step")
    text = model.config.get_text_config(decoder=True)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"{what} does not support rope_type={rope_type!r}: its frequencies are updated from a host "
                         "read of the positions at every step")
    devices = set(getattr(model, "hf_device_map", {}).values())
    if len(devices) > 1:
        raise ValueError(f"{what} needs the model on one device; its hf_device_map spans {sorted(map(str, devices))}")


def _resolve(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _find_decoder(model, spec: ModelSpec):
    """The decoder stack: the model itself when it has ``layers`` (a base model), else the first of
    ``spec.decoder`` that exists and has ``layers`` (Qwen2.5-Omni's thinker keeps its text model at
    ``model.language_model`` in transformers 5.23 and at ``model`` in 5.17)."""
    if hasattr(model, "layers"):
        return model
    for path in spec.decoder:
        try:
            decoder = _resolve(model, path)
        except AttributeError:
            continue
        if hasattr(decoder, "layers"):
            return decoder
    raise ValueError(f"apply_acckv: found no decoder stack with .layers on {type(model).__name__} at "
                     f"{' or '.join(spec.decoder)} ({spec.name}); this transformers version lays the model out "
                     "differently")


_CACHE_KWARGS = ("cache", "past_key_values")
"""The cache's keyword in forward() and generate(): transformers 5.24 renamed ``past_key_values`` to ``cache``."""


def cache_keyword(model) -> str:
    """The keyword under which ``model.forward`` takes the cache in this transformers version: ``"cache"`` (5.24 and
    later, where ``past_key_values`` still works with a FutureWarning) or ``"past_key_values"`` (before)."""
    return _CACHE_KWARGS[0] if _CACHE_KWARGS[0] in inspect.signature(model.forward).parameters else _CACHE_KWARGS[1]


def output_cache(out):
    """The cache a forward's or ``generate``'s output carries: ``out.cache`` (transformers 5.24 and later) or
    ``out.past_key_values`` (before)."""
    cache = getattr(out, _CACHE_KWARGS[0], None)  # (an empty Cache is falsy: compared with None, not `or`)
    return getattr(out, _CACHE_KWARGS[1]) if cache is None else cache


def _cache_argument(kwargs: dict):
    """The cache passed in ``kwargs`` under either name, or None."""
    for name in _CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


# ------------------------------------------------------------------------------------------------------ the cache
class AccKVLayer(CacheLayerMixin):
    """One decoder layer's cache: a :class:`~acckv_triton.cache.BudgetedLayerCache` behind the transformers layer API.

    ``get_seq_length`` is the number of tokens SEEN (what positions continue from); ``get_mask_sizes`` reports what
    is STORED (the longest row). Below budget 1.0, ``update`` only stages the new K/V; the AccKV attention function
    then runs the prefill / decode / chunk path through :meth:`attend`.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, cfg: AccKVConfig, layer: int, num_layers: int, owner: "AccKVCache"):
        super().__init__()
        self.cfg = cfg
        self.budgeted = BudgetedLayerCache(cfg, layer, num_layers)
        self._owner = owner
        self._staged: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def store(self):
        """The layer's :class:`~acckv_triton.storage.LayerKVCache` (K, V, lengths, metadata)."""
        return self.budgeted.store

    # ---- transformers layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record the dtype and device of the first ``key_states`` and mark the layer initialised; stores nothing."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' cache update with a chunk's ``[B, Hkv, T, D]`` K/V. At budget 1.0: append and return the
        whole stored K/V, as ``DynamicLayer`` does. Below it: stage the chunk for :meth:`attend` and return it
        unchanged; RuntimeError if the previous chunk was never attended, ValueError if the model is not patched."""
        self._owner.forget_plain_steps()  # an eager step (or a capture) moves the counters itself
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.cfg.is_full:  # exactly a DynamicLayer: store everything, hand the model the full K/V
            meta = self._owner._metadata(key_states.shape[2])
            del meta["valid"]  # padding is stored as DynamicCache stores it; the model's mask excludes it
            meta.pop("audio_video", None)
            self.store.append(key_states, value_states, check_modality=False, **meta)  # ids made here
            n = self.store.max_length
            return self.store.k[:, :, :n], self.store.v[:, :, :n]
        self._check_patched()
        if self._staged is not None:
            raise RuntimeError("AccKVCache: the previous chunk was never attended. The cache was used by a model whose "
                               "attention is not AccKV's; patch it with apply_acckv(model, cfg) first.")
        self._staged = (key_states, value_states)
        # Prefill: the new chunk is the whole K/V. Later chunks: only the new tokens; AccKV's attention adds the stored.
        return key_states, value_states

    def get_seq_length(self) -> int:
        """Tokens seen (stored or evicted): where positions continue from."""
        return self.store.seen

    def _check_patched(self) -> None:
        if not self._owner._patched_forward:
            raise ValueError("this AccKVCache compresses below budget 1.0, so only a model patched by apply_acckv can "
                             "attend over it; this forward runs without the patch (reverted, or another model): "
                             "apply_acckv(model, cfg) again, or start a new cache")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for transformers' mask: the longest stored row plus ``query_length``, and the
        tokens seen beyond that row. Below budget 1.0 only a patched model may ask (ValueError otherwise)."""
        if not self.cfg.is_full:
            self._check_patched()
        stored = self.store.max_length
        return stored + query_length, self.store.seen - stored

    def get_max_length(self) -> int:
        """-1: no fixed maximum length (the storage grows)."""
        return -1

    def reset(self) -> None:
        """Drop everything stored: a fresh, empty :class:`~acckv_triton.cache.BudgetedLayerCache` for this layer."""
        self._owner.forget_plain_steps()
        self.budgeted = BudgetedLayerCache(self.cfg, self.budgeted.layer, self.budgeted.num_layers)
        self._staged = None
        self.is_initialized = False

    @property
    def is_croppable(self) -> bool:
        """Only an uncompressed layer (budget 1.0) can roll back: evicted or merged tokens cannot be restored."""
        return self.cfg.is_full

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count), budget 1.0 only."""
        tokens_to_remove = int(tokens_to_remove)  # transformers 5.17's assisted decoding passes a 0-d tensor
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if not self.cfg.is_full:
            raise ValueError("AccKVCache cannot be cropped below budget 1.0 (assisted decoding, crop): evicted and "
                             "merged tokens cannot be restored; use budget=1.0 or a plain DynamicCache for this mode")
        self.store.crop_last(-tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the batch rows ``beam_idx`` ``[B']`` in that order (storage reallocated)."""
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times in place (``num_return_sequences``, beam expansion)."""
        B = self.store.lengths.shape[0] if self.store.lengths is not None else 0
        self._select_rows(torch.arange(B, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices`` (row ids or a ``[B]`` bool mask, as :meth:`LayerKVCache.row_index`)."""
        self._select_rows(indices)

    def _select_rows(self, index: torch.Tensor) -> None:
        self._owner.forget_plain_steps()  # new storage: the graph binding changes too
        self.budgeted.select_rows(index)

    # ---- the AccKV paths
    def attend(self, module, query: torch.Tensor, attention_mask, scaling: float, delegate, kwargs: dict):
        """Attention of ``query [B, Hq, T, D]`` for the staged chunk; returns ``[B, T, Hq, D]`` like transformers."""
        if self._staged is None:
            raise RuntimeError("AccKVCache: attention called without a staged chunk (update was not called)")
        k, v = self._staged
        self._staged = None
        T = query.shape[2]
        meta = self._owner._metadata(T)
        valid = meta.pop("valid")
        # The cache is inference state: no autograd graph through its storage, even in a forward run with grad on
        # (the prompt's own attention, the model's, keeps its graph).
        if self._owner._reconstructing:  # the handle's second pass: score the stored prompt, store nothing
            with torch.no_grad():
                return self.budgeted.reconstruct(query, k, v, scale=scaling)
        if not self.store.initialized:
            av = meta.pop("audio_video", None)
            one_pass = self.budgeted.reads_every_query(av) and _plain_causal(module, query, attention_mask, kwargs)
            if not one_pass:  # the model's own attention (with its graph)
                out, _ = delegate(module, query, k, v, attention_mask, scaling=scaling, dropout=0.0, **kwargs)
            with torch.no_grad():
                if one_pass:  # the model's attention and every query's evidence from one pass
                    out, scores = self.budgeted.prompt_attention(query, k, v, scale=scaling, valid=valid,
                                                                 audio_video=av)
                else:
                    scores = self.budgeted.prompt_evidence(query, k, scale=scaling, valid=valid, audio_video=av)
                self.budgeted.prefill(k, v, scores=scores, valid=valid, audio_video=av, check_modality=False, **meta)
            return out
        with torch.no_grad():
            if T == 1:
                return self._decode(query, k, v, scaling, meta)
            return self._chunk(query, k, v, scaling, valid, meta)

    def _decode(self, query, k, v, scaling, meta) -> torch.Tensor:
        """One token: the cache's decode step (append, attention + mass, upkeep when due) -> ``[B, 1, Hq, D]``."""
        q = query[:, :, 0]
        if q.stride(-1) != 1:
            q = q.contiguous()
        return self.budgeted.decode_step(q, k, v, scale=scaling, **meta).out[:, None]

    def _chunk(self, query, k, v, scaling, valid, meta) -> torch.Tensor:
        """A multi-token chunk over the stored tokens plus itself (the cache's ``prefill_chunk``) -> ``[B, T, Hq, D]``."""
        return self.budgeted.prefill_chunk(query, k, v, scale=scaling, valid=valid, check_modality=False, **meta)


_PLAIN_KWARGS = frozenset({"position_ids", "use_cache", "cache_position"})  # attention kwargs that change nothing


def _plain_causal(module, query: torch.Tensor, attention_mask, kwargs: dict) -> bool:
    """Whether the model's attention for this prompt is plain causal softmax attention that AccKV may compute
    itself: no mask tensor (transformers skips it for a causal prompt without padding), a causal module, no other
    attention kwargs set (sinks, packed sequences, ...) and no autograd graph to keep."""
    given = {name for name, value in kwargs.items() if value is not None}
    return (attention_mask is None and getattr(module, "is_causal", True) and given <= _PLAIN_KWARGS
            and not (torch.is_grad_enabled() and query.requires_grad))


class AccKVCache(Cache):
    """A transformers ``Cache`` whose full-attention layers hold AccKV-compressed K/V (:class:`AccKVLayer`).

    Build it with :meth:`AccKVHandle.new_cache` (``generate`` on a patched model builds one itself). With
    ``model_config``, the layers transformers caches in a sliding window (``config.layer_types``, a
    ``sliding_window`` in every layer) stay transformers' own ``DynamicSlidingWindowLayer``: their attention runs as
    the model defines it, over the last ``window - 1`` tokens, uncompressed. ``get_seq_length()`` is the number of
    tokens seen; :meth:`stored_tokens` and :meth:`nbytes` say what is held.
    """

    def __init__(self, cfg: AccKVConfig, num_layers: int, *, model_config=None):
        if not isinstance(cfg, AccKVConfig):
            raise TypeError(f"cfg must be an AccKVConfig, got {type(cfg).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int):
            raise TypeError(f"num_layers must be an int, got {type(num_layers).__name__}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 (the model's decoder layers), got {num_layers}")
        kinds = [None] * num_layers if model_config is None else _model_layers(model_config)
        if len(kinds) != num_layers:
            raise ValueError(f"num_layers is {num_layers} but model_config describes {len(kinds)} cache layers")
        super().__init__(layers=[AccKVLayer(cfg, i, num_layers, self) if kind is None or type(kind) is DynamicLayer
                                 else kind for i, kind in enumerate(kinds)])
        self.cfg = cfg
        self._step: dict[str, Any] = {}  # metadata of the chunk the current forward feeds ([B, T] tensors or None)
        self._patched_forward = False  # inside a forward of a model patched by apply_acckv (its hooks set it)
        self._reconstructing = False  # inside the handle's reconstruction pass (reconstruction evidence)
        self._plain_steps = 0  # decode steps known replayable ahead, from host counts (0: ask the layers)

    @property
    def compressed_layers(self) -> list[AccKVLayer]:
        """The layers AccKV compresses (every full-attention layer)."""
        return [layer for layer in self.layers if isinstance(layer, AccKVLayer)]

    @property
    def awaiting_reconstruction(self) -> bool:
        """True between a first prompt stored for reconstruction evidence and the end of its reconstruction pass."""
        return any(layer.budgeted.awaiting_reconstruction for layer in self.compressed_layers)

    def _metadata(self, T: int) -> dict:
        """The current chunk's metadata as ``BudgetedLayerCache`` takes it (entries that do not fit T are dropped).

        ``valid`` is None when the chunk has no padding (decided once per forward, not per layer).
        """
        out = {}
        for name in ("valid", "modality", "time", "spatial"):
            x = self._step.get(name)
            out[name] = x if x is not None and x.shape[1] == T else None
        out = {k: v for k, v in out.items() if v is not None or k == "valid"}
        if T > 1:
            out["audio_video"] = self._step.get("audio_video")  # host flag: whether the prompt has AV tokens
        return out

    # ---- what a CUDA graph of the decode forward needs (acckv_triton.integrations.graphs)
    def graph_step_blocker(self) -> str | None:
        """Why the next single-token step cannot replay a captured decode graph (None: it can), from host counts:
        every layer must be an AccKV layer, prefilled, appending in place with no upkeep due at this step.

        The layers are asked once for the steps they can surely replay ahead
        (:meth:`~acckv_triton.cache.BudgetedLayerCache.plain_steps_ahead`); until those are used up (or an eager
        step, a reset or a reorder forgets them) a step costs one comparison, not a walk over the layers."""
        if self._plain_steps > 0:
            return None
        layers = self.compressed_layers
        if len(layers) != len(self.layers):
            return "sliding-window layers"
        if not layers or not all(layer.store.initialized for layer in layers):
            return "empty cache"
        self._plain_steps = min(layer.budgeted.plain_steps_ahead() for layer in layers)
        if self._plain_steps == 0 and not all(layer.budgeted.next_step_is_plain() for layer in layers):
            return "upkeep or growth due"  # (a growing budget: the bound above can be short of the exact check)
        return None

    def forget_plain_steps(self) -> None:
        """Drop the count of replayable steps ahead (the layers' counters moved outside a replay)."""
        self._plain_steps = 0

    def graph_binding(self) -> tuple:
        """Every layer's storage binding (:attr:`~acckv_triton.storage.LayerKVCache.binding`): a captured graph is
        valid while this is unchanged."""
        return tuple(layer.store.binding for layer in self.compressed_layers)

    def host_counters(self) -> list[tuple[int, ...]]:
        """Every layer's host counters (:meth:`~acckv_triton.cache.BudgetedLayerCache.host_counters`)."""
        return [layer.budgeted.host_counters() for layer in self.compressed_layers]

    def restore_host_counters(self, counters: list[tuple[int, ...]]) -> None:
        """Put back what :meth:`host_counters` returned (after a capture ran the step's host code)."""
        for layer, c in zip(self.compressed_layers, counters):
            layer.budgeted.restore_host_counters(c)

    def count_replayed_step(self) -> None:
        """The host's side of a decode step a replayed graph did on the device, in every layer."""
        self._plain_steps = max(self._plain_steps - 1, 0)
        for layer in self.compressed_layers:
            layer.budgeted.count_replayed_step()

    def stored_tokens(self) -> torch.Tensor:
        """``[num_layers, B, Hkv]`` int64: tokens stored now per (layer, sequence, kv head); a sliding-window layer
        holds the same count in every row (padding included, as transformers stores it)."""
        counts = {i: layer.store.stored_tokens().long() for i, layer in enumerate(self.layers)
                  if isinstance(layer, AccKVLayer)}
        like = next(iter(counts.values()), None)
        for i, layer in enumerate(self.layers):
            if i not in counts:
                k = layer.keys if layer.is_initialized else like
                n = layer.keys.shape[-2] if layer.is_initialized else 0
                shape = (0, 0) if k is None else tuple(k.shape[:2])
                counts[i] = torch.full(shape, n, dtype=torch.long, device=None if k is None else k.device)
        return torch.stack([counts[i] for i in range(len(self.layers))])

    def nbytes(self) -> int:
        """Bytes held by every layer: K, V, lengths and token metadata at their allocated capacity (a sliding-window
        layer: its K and V)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, AccKVLayer):
                total += layer.store.nbytes()
            elif layer.is_initialized:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def __repr__(self) -> str:
        seen = self.get_seq_length() if self.layers else 0
        return (f"AccKVCache(layers={len(self.layers)}, compressed={len(self.compressed_layers)}, seen={seen}, "
                f"method={self.cfg.method}, budget={self.cfg.budget})")


# ------------------------------------------------------------------------------------- attention / mask registry
_REGISTRY_LOCK = threading.Lock()
_REGISTERED: dict[str, int] = {}  # "acckv_<original>" -> number of live handles using it


def _delegate_for(module, original: str):
    if original in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[original]
    if original == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    raise ValueError(f"apply_acckv cannot wrap the attention implementation {original!r}")


def _make_attention(original: str):
    def acckv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        delegate = _delegate_for(module, original)
        state = getattr(module, "_acckv_state", None)
        cache = None if state is None else state.cache
        if cache is None:  # not an AccKV forward (another model sharing the config, or no AccKV cache)
            return delegate(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        layer = cache.layers[module.layer_idx]
        if not isinstance(layer, AccKVLayer):  # a sliding-window layer: as the model defines it, over its window
            return delegate(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:  # under apply_acckv's checks
            raise ValueError(f"AccKV layer {module.layer_idx} got sliding_window={kwargs.get('sliding_window')}, "
                             f"softcap={kwargs.get('softcap')}: its cache was built for full, plain attention")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = layer.attend(module, query, attention_mask, scaling, delegate, kwargs)
        return out, None

    acckv_attention.__name__ = f"acckv_attention_{original}"
    return acckv_attention


def _register(original: str) -> str:
    name = f"acckv_{original}"
    with _REGISTRY_LOCK:
        if name not in _REGISTERED:
            if original not in ALL_MASK_ATTENTION_FUNCTIONS:
                raise ValueError(f"apply_acckv wraps the attention implementations with a mask function "
                                 f"({', '.join(ALL_MASK_ATTENTION_FUNCTIONS)}); the model uses {original!r}")
            AttentionInterface.register(name, _make_attention(original))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
            _REGISTERED[name] = 0
        _REGISTERED[name] += 1
    return name


def _unregister(name: str) -> None:
    with _REGISTRY_LOCK:
        _REGISTERED[name] -= 1
        if _REGISTERED[name] == 0:
            del _REGISTERED[name]
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)


# ---------------------------------------------------------------------------------------------------- the patcher
class _ForwardState:
    """Per-patched-model state shared by its hooks and attention modules: the AccKV cache of the running forward."""

    def __init__(self):
        self.cache: AccKVCache | None = None
        self.input_ids: torch.Tensor | None = None
        self.replay: tuple | None = None  # (args, kwargs, T) of a first prompt whose evidence is a reconstruction


class AccKVHandle:
    """What :func:`apply_acckv` returns: ``new_cache()``, ``revert()``, and a context manager that reverts on exit."""

    def __init__(self, model, cfg: AccKVConfig, spec: ModelSpec):
        self.model, self.cfg, self.spec = model, cfg, spec
        self.decoder = _find_decoder(model, spec)
        self.num_layers = len(self.decoder.layers)
        self.attention_modules = [getattr(layer, spec.attention) for layer in self.decoder.layers]
        self._state = _ForwardState()
        self._hooks: list = []
        self._impl: tuple[str, str] | None = None  # (original, registered name) when the attention is switched
        self.graphs: DecodeGraphs | None = None  # apply_acckv(decode_graphs=True): the decode-graph switch
        self._reverted = False
        self._warned_foreign_cache = False  # a cache other than AccKVCache passed to the patched model: warned once
        self._modality_ids = [(getattr(model.config, field), int(m)) for field, m in spec.modality_token_ids
                              if getattr(model.config, field, None) is not None]

    # ---- public
    def new_cache(self) -> AccKVCache:
        """An empty compressed cache for this model: ``model(ids, **{cache_keyword(model): cache})`` (``cache=`` from
        transformers 5.24, ``past_key_values=`` before)."""
        return AccKVCache(self.cfg, self.num_layers, model_config=self.model.config)

    def revert(self) -> None:
        """Restore the model exactly: hooks removed, attention implementation and generate's cache set-up restored."""
        if self._reverted:
            return
        if self.graphs is not None:
            self.graphs.uninstall()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for module in self.attention_modules:
            module.__dict__.pop("_acckv_state", None)
        if self._impl is not None:
            original, name = self._impl
            self.decoder.set_attn_implementation(original)
            _unregister(name)
        self.model.__dict__.pop("_prepare_cache_for_generation", None)
        self.model.__dict__.pop("_acckv_handle", None)
        self._reverted = True

    def __enter__(self) -> "AccKVHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()

    def __repr__(self) -> str:
        return f"AccKVHandle({self.spec.name}, {self.cfg!r}, reverted={self._reverted})"

    # ---- patching
    def _apply(self) -> None:
        model = self.model
        original = self.decoder.config._attn_implementation
        if not self.cfg.is_full:
            name = _register(original)
            try:
                self.decoder.set_attn_implementation(name)
            except Exception:
                _unregister(name)
                raise
            self._impl = (original, name)
            for module in self.attention_modules:
                module._acckv_state = self._state
        if self._modality_ids:
            self._hooks.append(model.register_forward_pre_hook(self._capture_ids, with_kwargs=True))
        self._hooks.append(self.decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True))
        self._hooks.append(self.decoder.register_forward_hook(self._after_decoder, always_call=True))
        prepare = getattr(model, "_prepare_cache_for_generation", None)  # the class's bound method (a base model,
        # without generate, has none: hand-written loops take handle.new_cache())

        def _prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs):
            user_cache = _cache_argument(model_kwargs)
            implementation = generation_config.cache_implementation
            if user_cache is None and implementation not in (None, "dynamic"):  # refused: it would be dropped
                raise ValueError(f"cache_implementation={implementation!r}: a model patched by apply_acckv "
                                 "compresses the dynamic cache only (no static or offloaded one): leave "
                                 "cache_implementation unset")
            result = prepare(generation_config, model_kwargs, *args, **kwargs)
            for name in _CACHE_KWARGS:
                built = model_kwargs.get(name)
                if user_cache is not None or built is None:
                    continue
                if type(built) is not DynamicCache:  # refused: it would run uncompressed, silently
                    raise ValueError(f"generate built a {type(built).__name__} (cache_implementation="
                                     f"{implementation!r}); a model patched by apply_acckv compresses the dynamic "
                                     "cache only: leave cache_implementation unset")
                model_kwargs[name] = self.new_cache()
            return result

        if prepare is not None:
            model._prepare_cache_for_generation = _prepare_cache_for_generation
        model._acckv_handle = self
        if self.graphs is not None:
            self.graphs.install()

    # ---- hooks
    def _capture_ids(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._state.input_ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

    def _before_decoder(self, module, args, kwargs):
        cache = _cache_argument(kwargs)
        ids, self._state.input_ids = self._state.input_ids, None
        if not isinstance(cache, AccKVCache):
            self._state.cache = None
            if isinstance(cache, Cache) and not self._warned_foreign_cache:
                self._warned_foreign_cache = True
                warnings.warn(f"a {type(cache).__name__} was passed to a model patched by apply_acckv: it is not "
                              "compressed (only an AccKVCache is; get one from handle.new_cache(), or let generate "
                              "build it)", UserWarning, stacklevel=2)
            return
        if not cache.cfg.is_full:  # refused before the forward: the cache is left as it was
            current = self.decoder.config._attn_implementation
            if self._impl is not None and current != self._impl[1]:
                raise ValueError(f"the attention implementation was switched to {current!r} after apply_acckv; the "
                                 "compressed layers need AccKV's: revert the handle first, switch, then patch again")
            if kwargs.get("output_attentions"):
                raise ValueError("output_attentions=True: compressed layers return no attention weights (AccKV's "
                                 "attention is fused with its evidence); use budget=1.0 or the unpatched model")
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        B, T = x.shape[:2]
        step: dict[str, Any] = {}
        mask = kwargs.get("attention_mask")
        if T > 1 and isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] >= T:
            valid = mask[:, -T:].to(torch.bool)  # a decode token (T == 1) is never padding: no check, no sync
            if not bool(valid.all()):  # one sync per chunk, not per layer; no padding skips the bookkeeping
                step["valid"] = valid
        modality = None
        if ids is None and kwargs.get("input_ids") is not None:
            ids = kwargs["input_ids"]
        if ids is not None and self._modality_ids and tuple(ids.shape) == (B, T):
            modality = torch.zeros(B, T, dtype=torch.uint8, device=ids.device)
            for token_id, m in self._modality_ids:  # where, not a masked assignment: no nonzero(), no sync
                modality = torch.where(ids == token_id, m, modality)
            step["modality"] = modality
        pos = kwargs.get("position_ids")
        if (self.spec.mrope and isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[0] in (1, 3, 4)
                and pos.shape[-1] == T):  # 1: a continuation's text positions, one row for all three
            rows = pos[-3:].expand(3, B, T)
            if rows.dtype.is_floating_point:  # Qwen3-Omni's are float (times in position units); the cache keeps
                rows = rows.to(torch.int32)  # int32 times and patch coordinates, truncated as it always stored them
            step["time"] = rows[0]
            if modality is not None:
                patch = (modality == Modality.VIDEO) | (modality == Modality.IMAGE)
                hw = torch.stack([rows[1], rows[2]], dim=-1)
                step["spatial"] = torch.where(patch[..., None], hw, -1)
        if T > 1 and cache.cfg.score_evidence == "auto":  # AccKV's evidence follows the prompt: one read per chunk
            step["audio_video"] = bool((modality != Modality.TEXT).any()) if modality is not None else False
        first = not cache._reconstructing and cache.get_seq_length() == 0
        replay = first and cache.cfg.score_evidence == "reconstruction" and not cache.cfg.is_full
        if replay and "valid" in step:  # refused before the forward: the cache is left as it was
            raise ValueError(f"method={cache.cfg.method!r} (reconstruction evidence) does not support a left-padded "
                             "batch (attention_mask with zeros): its second pass would score from padding queries; "
                             "give prompts of one length, or one at a time")
        for layer in cache.compressed_layers:  # a forward that raised half-way may have left a chunk staged
            layer._staged = None
        cache._step = step
        cache._patched_forward = True
        self._state.cache = cache
        self._state.replay = (args, dict(kwargs), T) if replay else None

    def _after_decoder(self, module, args, output):
        cache, replay = self._state.cache, self._state.replay
        if cache is not None:
            cache._step = {}
            cache._patched_forward = False
            if output is not None and any(layer._staged is not None for layer in cache.compressed_layers):
                self._state.cache, self._state.replay = None, None  # (a net under the checks above: a chunk stored
                # by update but never attended by AccKV's attention means the model attended without the cache)
                raise ValueError("a compressed layer's chunk was never attended by AccKV's attention: this model's "
                                 "attention no longer goes through apply_acckv's implementation; revert and patch "
                                 "again")
        self._state.cache, self._state.replay = None, None
        if replay is not None and output is not None and cache.awaiting_reconstruction:  # None: the forward raised
            self._reconstruct(cache, *replay)

    def _reconstruct(self, cache: AccKVCache, args: tuple, kwargs: dict, T: int) -> None:
        """Reconstruction evidence: run the decoder stack again on the first prompt's inputs (never padded), at the T
        positions after it (a 2-D mask covers both copies), so every layer scores its stored prompt; then compress
        every layer. ``kwargs`` is the replay's own copy (changed here)."""
        for name in ("position_ids", "cache_position"):
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = kwargs[name] + T
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([mask, mask[:, -T:]], dim=1)
        kwargs.pop("use_cache", None)
        cache._reconstructing = True
        try:
            with torch.no_grad():
                self.decoder(*args, **kwargs, use_cache=True)
        finally:
            cache._reconstructing = False
        for layer in cache.compressed_layers:
            layer.budgeted.end_reconstruction()


def apply_acckv(model, cfg: AccKVConfig | None = None, *, decode_graphs: bool = False) -> AccKVHandle:
    """Compress this model's KV cache with AccKV; returns a handle whose ``revert()`` restores the model exactly.

    Args:
        model: a supported transformers model (see :data:`SUPPORTED_MODELS`): ``LlamaForCausalLM``,
            ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``MistralForCausalLM``, ``Gemma3ForCausalLM`` (or their base
            models), ``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``,
            ``Qwen2_5OmniThinkerForConditionalGeneration`` or ``Qwen3OmniMoeThinkerForConditionalGeneration``.
        cfg: the :class:`~acckv_triton.AccKVConfig` (default ``AccKVConfig()``).
        decode_graphs: replay the whole decode forward (every layer, the LM head) as one CUDA graph in every step
            that runs no upkeep (:mod:`acckv_triton.integrations.graphs`; ``handle.graphs.stats`` counts what
            replayed and why a step ran eager). Text decoders without sliding-window layers, budget below 1.0.
            A ``cfg.decode_ahead`` of None becomes :data:`GRAPH_DECODE_AHEAD` (``handle.cfg``): the storage is sized
            for that many more decoded tokens, so a growing budget reallocates, and the graph is captured again,
            once per that many tokens.

    Raises:
        TypeError: ``cfg`` not an :class:`~acckv_triton.AccKVConfig`, or ``decode_graphs`` not a bool.
        ValueError: unsupported model (the message names the supported ones), a model already patched, a layer kind
            other than full or sliding-window attention, logit soft-capping, bidirectional attention, or a budget
            below 1.0 on a model whose every layer is sliding-window attention (nothing to compress); with
            reconstruction evidence (``method="kvzip"`` or ``evidence="reconstruction"``), a multimodal model or
            sliding-window layers; with
            ``decode_graphs``, budget 1.0, a multimodal model, sliding-window layers, ``dynamic``/``longrope`` RoPE
            or a model spread over devices.

    Sliding-window layers (``config.layer_types``, e.g. Gemma 3's five in six, Qwen2's above ``max_window_layers``)
    keep transformers' own window cache and attention: the last ``window - 1`` tokens, uncompressed. AccKV
    compresses the full-attention layers.
    """
    cfg = AccKVConfig() if cfg is None else cfg
    if not isinstance(cfg, AccKVConfig):
        raise TypeError(f"cfg must be an AccKVConfig, got {type(cfg).__name__}")
    if not isinstance(decode_graphs, bool):
        raise TypeError(f"decode_graphs must be a bool, got {type(decode_graphs).__name__}")
    spec = _spec_for(model)
    if "_acckv_handle" in model.__dict__:
        raise ValueError("this model is already patched by apply_acckv: revert() its handle first")
    if decode_graphs and cfg.decode_ahead is None:  # size the storage ahead: fewer reallocations, fewer captures
        cfg = cfg.replace(decode_ahead=GRAPH_DECODE_AHEAD)
    handle = AccKVHandle(model, cfg, spec)
    _check_layers(model, cfg, handle.num_layers)
    if decode_graphs:
        _check_graphs(model, cfg, spec)
        handle.graphs = DecodeGraphs(model)
    try:
        handle._apply()
    except Exception:
        handle.revert()
        raise
    return handle


def acckv(model, cfg: AccKVConfig | None = None, *, decode_graphs: bool = False) -> AccKVHandle:
    """Context-manager form: ``with acckv(model, cfg) as handle: model.generate(...)``; reverted on exit."""
    return apply_acckv(model, cfg, decode_graphs=decode_graphs)
