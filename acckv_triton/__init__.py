"""acckv_triton: Triton kernels for AccKV-style KV-cache compression in audio-video LLM inference.

Importing the package patches nothing and registers nothing global. The only side effect is the execution mode:
with no CUDA device, ``TRITON_INTERPRET=1`` is set (unless already set) so kernels run on the CPU through
Triton's interpreter; see :mod:`acckv_triton.tuning`. (Under an interpreter that cannot run a loop bound, Triton 3.6
with NumPy >= 2.4, that interpreter is made to: :mod:`acckv_triton._interpreter`.)
"""
from . import tuning  # first: decides the execution mode before any kernel is defined
from .modality import NUM_MODALITIES, Modality
from .cache import BudgetedLayerCache
from .storage import LayerKVCache
from .config import METHODS, AccKVConfig
from .fused_policy import plan_layer_fused
from .ops import (ChunkAttention, DecodeAttentionOutput, DecodeAttentionPlan, ObservedAttention, WindowScores,
                  append_token_, chunk_attention, compact_kv, compact_kv_, decode_attention, observed_attention,
                  window_scores)
from .plan import CompactionPlan
from .policy import LayerTokens, PolicyResult, budget_tokens, plan_layer

__version__ = "0.1.0"

__all__ = [
    "AccKVConfig",
    "BudgetedLayerCache",
    "ChunkAttention",
    "CompactionPlan",
    "DecodeAttentionOutput",
    "DecodeAttentionPlan",
    "LayerKVCache",
    "LayerTokens",
    "METHODS",
    "Modality",
    "NUM_MODALITIES",
    "ObservedAttention",
    "PolicyResult",
    "WindowScores",
    "append_token_",
    "budget_tokens",
    "chunk_attention",
    "compact_kv",
    "compact_kv_",
    "decode_attention",
    "observed_attention",
    "plan_layer",
    "plan_layer_fused",
    "window_scores",
]

_INTEGRATION = ("AccKVCache", "AccKVHandle", "SUPPORTED_MODELS", "acckv", "apply_acckv")
__all__ += list(_INTEGRATION)


def __getattr__(name):  # the transformers integration loads on first use: importing the package stays light
    if name in _INTEGRATION:
        from . import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
