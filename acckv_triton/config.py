"""``AccKVConfig``: every switch and constant of the method, with the defaults docs/algorithm.md documents."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

__all__ = ["AccKVConfig", "METHODS"]

METHODS = ("acckv", "snapkv", "h2o", "streaming", "pyramidkv", "lookm", "full")


@dataclass(frozen=True)
class AccKVConfig:
    """What to keep, per (layer, sequence, kv head), and how. Frozen: derive variants with ``cfg.replace(...)``.

    ``budget``: a float in (0, 1] is the fraction of the prompt kept per (layer, kv head), protected tokens
    included; an int >= 1 is a token count. 1.0 keeps everything (exactly the uncompressed model).
    ``method`` selects the algorithm; the baselines run in the same framework at the same budget.
    """

    budget: float | int = 0.25
    method: str = "acckv"
    # --- AccKV switches (each step can be ablated) ---
    focusing: bool = True  # Step 1: per-modality budgets from the layer's attention shares
    redistribution: bool = True  # Step 2: rank by score relative to the modality mean; sinks/text out of A
    intra_merge: bool = True  # Step 3a: merge similar neighbours within a modality
    cross_align: bool = True  # Step 3b: calibrate the low-priority modality on the high one's time bins
    # --- constants ---
    window: int = 32  # W: observation window (last prompt queries), always kept
    pool_kernel: int = 7  # 1-D pooling of scores along each modality's own token order (1 = off)
    pool_mode: str = "max"  # "max" or "avg"
    gamma: float = 1.0  # γ: sharpness of the modality shares
    rho_min: float = 0.1  # ρ_min: floor of any present AV modality's share
    theta_audio: float = 0.9  # θ_a: key cosine for grouping neighbouring audio tokens
    theta_video: float = 0.9  # θ_v: key cosine for grouping a video patch with the same patch one frame earlier
    max_group: int = 4  # largest merge group (bounds the drift of chained similarity)
    merge_frees_budget: bool = True  # a group competes as one slot (True) or tokens compete alone, evicted ones merge
    proportional: bool = True  # a merged slot weighs as many tokens as it holds in attention (multiplicity)
    align_lambda: float = 0.5  # λ: strength of cross-modal alignment
    time_bin: int = 50  # time bin in TMRoPE units (25 per second): 2 s, Qwen2.5-Omni's chunk
    sink: int = 4  # S: first tokens always kept
    recent: int = 32  # R: most recent tokens always kept (decode and streaming)
    protect_text: bool = False  # keep every text token of an AV prompt (the question is the window, kept anyway)
    slack: int = 64  # decode/streaming: re-compress once a head holds budget + slack tokens
    head_renorm: bool = False  # Step 2.3: renormalise scores per head
    video_from_layer: int | None = None  # depth prior: video is high-priority from this layer on (off: None)
    layer_budgets: str = "uniform"  # "uniform" or "pyramid" (PyramidKV)
    pyramid_strength: float = 0.5  # pyramid: layer 0 keeps (1+p)x the mean budget, the last layer (1-p)x
    # --- execution ---
    backend: str = "auto"  # "auto" (Triton on GPU, vectorised PyTorch ops on CPU), "triton" or "torch"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise TypeError(f"budget must be a float in (0, 1] or an int >= 1, got {b!r}")
        if isinstance(b, float) and not (0.0 < b <= 1.0):
            raise ValueError(f"budget as a float must lie in (0, 1], got {b}")
        if isinstance(b, int) and b < 1:
            raise ValueError(f"budget as an int must be >= 1 tokens, got {b}")
        if self.pool_mode not in ("max", "avg"):
            raise ValueError(f"pool_mode must be 'max' or 'avg', got {self.pool_mode!r}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be a positive odd int, got {self.pool_kernel}")
        if not (0.0 <= self.rho_min < 0.5):
            raise ValueError(f"rho_min must lie in [0, 0.5), got {self.rho_min}")
        if self.layer_budgets not in ("uniform", "pyramid"):
            raise ValueError(f"layer_budgets must be 'uniform' or 'pyramid', got {self.layer_budgets!r}")
        if not (0.0 <= self.pyramid_strength < 1.0):
            raise ValueError(f"pyramid_strength must lie in [0, 1), got {self.pyramid_strength}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {self.backend!r}")
        for name in ("window", "sink", "recent", "slack", "time_bin", "max_group"):
            if getattr(self, name) < (1 if name in ("time_bin", "max_group") else 0):
                raise ValueError(f"{name} must be a non-negative int (time_bin, max_group >= 1), "
                                 f"got {getattr(self, name)}")

    def replace(self, **changes) -> "AccKVConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @property
    def is_full(self) -> bool:
        """True when nothing is evicted: method "full" or a budget of 1.0 keeps the exact model."""
        return self.method == "full" or (isinstance(self.budget, float) and self.budget >= 1.0)

    @property
    def uses_multiplicity(self) -> bool:
        """True when attention weighs merged slots by their token count (AccKV with ``proportional``)."""
        return self.method == "acckv" and self.intra_merge and self.proportional

    def ablations(self) -> dict[str, "AccKVConfig"]:
        """AccKV with each switch off in turn, named ``acckv-no-<switch>``."""
        switches = ("focusing", "redistribution", "intra_merge", "cross_align", "proportional")
        return {f"acckv-no-{s.replace('_', '-')}": self.replace(method="acckv", **{s: False}) for s in switches}

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
