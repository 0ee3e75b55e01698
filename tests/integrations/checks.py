"""Assertions the family tests share."""
from __future__ import annotations

import torch

import acckv_triton as ak
from acckv_triton.integrations.transformers import AccKVCache, apply_acckv, output_cache


def assert_unpatched_at_budget_one(model, inputs: dict, gen: dict, *, scores: str = "logits") -> None:
    """``model.generate(**inputs, **gen)`` patched at budget 1.0 equals the unpatched call bit for bit: the sequences
    and every step's ``scores`` (``"logits"`` or ``"scores"``, whichever ``gen`` asks to return), on an AccKVCache."""
    ref = model.generate(**inputs, **gen)
    with apply_acckv(model, ak.AccKVConfig(budget=1.0)):
        out = model.generate(**inputs, **gen)
    assert isinstance(output_cache(out), AccKVCache)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(getattr(out, scores), getattr(ref, scores)))
