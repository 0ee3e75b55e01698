"""Integrations with model libraries. Importing this package imports nothing heavy and patches nothing.

``acckv_triton.integrations.transformers`` holds the Hugging Face patcher (:func:`apply_acckv`, :func:`acckv`), its
per-model spec table and the compressed :class:`AccKVCache`; it imports ``transformers`` when first used.
"""
from __future__ import annotations

__all__ = ["AccKVCache", "AccKVHandle", "SUPPORTED_MODELS", "acckv", "apply_acckv"]


def __getattr__(name):  # lazy: ``import acckv_triton`` must not import transformers
    if name in __all__:
        from . import transformers as _hf

        return getattr(_hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
