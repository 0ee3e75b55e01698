"""Triton kernels, one file each: ``_kernel``(s) plus one validating launcher. Ops know nothing of policies."""
from .decode_attention import DecodeAttentionOutput, decode_attention

__all__ = ["DecodeAttentionOutput", "decode_attention"]
