"""Triton kernels, one file each: ``_kernel``(s) plus one validating launcher. Ops know nothing of policies."""
from .chunk_attention import ChunkAttention, chunk_attention
from .compact_kv import compact_kv, compact_kv_
from .decode_attention import DecodeAttentionOutput, decode_attention
from .window_scores import WindowScores, window_scores

__all__ = ["ChunkAttention", "DecodeAttentionOutput", "WindowScores", "chunk_attention", "compact_kv", "compact_kv_", "decode_attention", "window_scores"]
