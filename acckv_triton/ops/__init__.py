"""Triton kernels, one file each: ``_kernel``(s) plus one validating launcher. Ops know nothing of policies."""
from .append_token import append_token_
from .chunk_attention import ChunkAttention, chunk_attention
from .compact_kv import compact_kv, compact_kv_
from .decode_attention import DecodeAttentionOutput, DecodeAttentionPlan, decode_attention
from .observed_attention import ObservedAttention, observed_attention
from .window_scores import WindowScores, window_scores

__all__ = ["ChunkAttention", "DecodeAttentionOutput", "DecodeAttentionPlan", "ObservedAttention", "WindowScores",
           "append_token_", "chunk_attention", "compact_kv", "compact_kv_", "decode_attention", "observed_attention",
           "window_scores"]
