"""``AccKVConfig``: every switch and constant of the method, with the defaults docs/algorithm.md documents."""
from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, fields, replace

__all__ = ["AccKVConfig", "EVIDENCE", "METHODS"]

METHODS = ("acckv", "snapkv", "h2o", "tova", "streaming", "pyramidkv", "adakv", "lookm", "kvzip", "full")
EVIDENCE = ("auto", "window", "observed", "mean", "last", "reconstruction")
BROAD_ENTROPY = 0.7  # broad_entropy's default on AccKV's every-query mean (chosen on real weights, see the field)
_METHOD_EVIDENCE = {"acckv": "auto", "h2o": "observed", "tova": "last",  # each paper's own; the rest: the window
                    "kvzip": "reconstruction"}


def _one_of(options: tuple[str, ...]) -> str:
    """``'a', 'b' or 'c'`` (a long list: ``one of a, b, ...``)."""
    if len(options) > 3:
        return "one of " + ", ".join(options)
    return ", ".join(map(repr, options[:-1])) + " or " + repr(options[-1])


def _unit(x):
    return 0.0 <= x <= 1.0


def _at_least(lo):
    return lambda x: x >= lo


# Every field but budget (checked first): (kind, None accepted, valid(value), what is expected). kind: bool (a bool;
# numpy's bool_ is converted), int (an int, numpy's converted; bools and floats, 3.0 among them, are refused: counts),
# float (a finite int or float, numpy's included, stored as a float; bools refused) or a tuple of the names accepted.
# A value of the wrong type raises TypeError, one out of range (or not finite) ValueError; both name the field.
_RULES = {
    "method": (METHODS, False, None, None),
    **{s: (bool, False, None, None) for s in ("focusing", "redistribution", "intra_merge", "cross_align")},
    "evidence": (EVIDENCE, True, None, None),
    "value_aware": (bool, True, None, None),
    "recency": (float, True, lambda x: x > 0.0, "a finite number of tokens > 0"),
    "broad_entropy": (float, True, lambda x: 0.0 < x <= 1.0, "a number in (0, 1]"),
    "protect_positions": (bool, False, None, None),
    "protect_sinks": (bool, True, None, None),
    "head_budgets": (("uniform", "adaptive"), False, None, None),
    "ada_floor": (float, False, _unit, "a number in [0, 1]"),
    "decode_budget": (("fixed", "all", "prompt"), False, None, None),
    "decode_ahead": (int, True, _at_least(0), "an int >= 0 (decoded tokens)"),
    "window": (int, False, _at_least(0), "an int >= 0"),
    "pool_kernel": (int, False, lambda n: n >= 1 and n % 2 == 1, "a positive odd int"),
    "pool_mode": (("max", "avg"), False, None, None),
    "pool_lift": (float, False, _unit, "a number in [0, 1]"),
    "gamma": (float, False, _at_least(0.0), "a finite number >= 0"),
    "rho_min": (float, False, lambda x: 0.0 <= x < 0.5, "a number in [0, 0.5)"),
    "theta_audio": (float, False, lambda x: -1.0 <= x <= 1.0, "a cosine in [-1, 1]"),
    "theta_video": (float, False, lambda x: -1.0 <= x <= 1.0, "a cosine in [-1, 1]"),
    "max_group": (int, False, _at_least(1), "an int >= 1"),
    "redundancy_min": (float, False, _unit, "a number in [0, 1]"),
    "merge_frees_budget": (bool, False, None, None),
    "proportional": (bool, False, None, None),
    "align_lambda": (float, False, _at_least(0.0), "a finite number >= 0"),
    "time_bin": (int, False, _at_least(1), "an int >= 1"),
    "sink": (int, False, _at_least(0), "an int >= 0"),
    "recent": (int, False, _at_least(0), "an int >= 0"),
    "protect_text": (bool, False, None, None),
    "slack": (int, False, _at_least(0), "an int >= 0"),
    "head_renorm": (bool, False, None, None),
    "video_from_layer": (int, True, _at_least(0), "a layer index >= 0"),
    "layer_budgets": (("uniform", "pyramid"), False, None, None),
    "pyramid_beta": (float, False, _at_least(1.0), "a finite number >= 1"),
    "backend": (("auto", "triton", "torch"), False, None, None),
}


@dataclass(frozen=True)
class AccKVConfig:
    """What to keep, per (layer, sequence, kv head), and how. Frozen: derive variants with ``cfg.replace(...)``.

    ``budget``: a float in (0, 1] is the fraction of the prompt kept per (layer, kv head), protected tokens
    included; an int >= 1 is a token count. 1.0 keeps everything (exactly the uncompressed model).
    ``method`` selects the algorithm; the baselines run in the same framework at the same budget.
    Every field is checked at construction (and by ``replace``): a value of the wrong type raises TypeError, one out
    of range ValueError, naming the field; numpy scalars are stored as the Python bool, int or float they hold.
    """

    budget: float | int = 0.25
    method: str = "acckv"
    # --- AccKV switches (each step can be ablated) ---
    focusing: bool = True  # Step 1: per-modality budgets from the layer's attention shares
    redistribution: bool = True  # Step 2: rank by score relative to the modality mean; sinks/text out of A
    intra_merge: bool = True  # Step 3a: merge similar neighbours within a modality
    cross_align: bool = True  # Step 3b: calibrate the low-priority modality on the high one's time bins
    evidence: str | None = None  # Step 0 scores: "window" (last W queries, SnapKV), "observed" (every query's mass
    #   summed, H2O), "mean" (every query's, averaged over the queries that see each token), "last" (the last
    #   query, TOVA), "reconstruction" (a second forward that feeds the first prompt again after itself; each
    #   token's largest attention from it, after KVzip), "auto" (the window on audio/video/image prompts, the mean
    #   on text prompts); None: the method's own (auto for acckv, observed for h2o, last for tova,
    #   reconstruction for kvzip, else the window)
    value_aware: bool | None = None  # rank by attention mass x ||v|| (value-aware evidence, after CriticalKV);
    #   None: on where AccKV ranks by every query's mean (its text evidence), off elsewhere (see ranks_by_value)
    recency: float | None = None  # τ: the every-query mean weighs a query that is a tokens older than the newest
    #   by exp(-a / τ) (prompt queries, later chunks and decode steps alike; an exponentially weighted mean of the
    #   attention each token receives). None: every query weighs alike. Read only by the "mean" evidence. Opt-in:
    #   on real weights τ = 256 lowered the KL at 50% and 25% by 17-63% on three texts and doubled it on a fourth,
    #   whose continuation copies a table from far back in the prompt (benchmarks/NOTES.md)
    broad_entropy: float | None = None  # f: AccKV on the every-query mean: a sequence whose last prompt query's
    #   attention entropy (nats, mean over the layer's query heads) exceeds f x ln(valid keys) ranks its first
    #   prefill compression by that query's attention averaged over the layer's query heads (the same in every kv
    #   head); protections, the stored token_mass and decode-time evidence unchanged. None: 0.7 where AccKV ranks
    #   by every query's mean (its text evidence), off elsewhere; 1.0: off (no entropy exceeds ln n). On real
    #   weights 0.7 lowered the KL in all six cells of the real suite, by 0.7-10% (SmolLM2: only layer 0 is broad;
    #   benchmarks/results/cpu-2026-12-07/real-weights-night/)
    protect_positions: bool = True  # keep the S sinks and R recent tokens whatever their evidence (in the methods
    #   that protect them: sinks in AccKV and StreamingLLM, recent tokens in every method but TOVA and StreamingLLM,
    #   the windowed baselines' W newest); False: they rank by their evidence like any token, in any method.
    #   On AccKV's every-query mean False lowered the decode KL in 10 of 12 real-weight cells but raised it on a
    #   held-back text and lost top-1 in the CI's chunk check (benchmarks/NOTES.md): True
    protect_sinks: bool | None = None  # with protect_positions, keep the S first tokens whatever their evidence
    #   (in the methods that have sinks: AccKV and StreamingLLM; True without protect_positions is refused).
    #   None: off where AccKV ranks by every query's mean (its text evidence: the mean already counts every query's
    #   attention to them, and a head that does not use them as sinks frees their slots; KL lower or level in all
    #   18 real-weight cells of six texts, benchmarks/NOTES.md), on elsewhere (StreamingLLM's sinks among them)
    head_budgets: str = "uniform"  # "uniform" or "adaptive": Ada-KV's allocation of a layer's budget across kv heads
    #   (adakv and kvzip always share it: KVzip's budgets are not uniform across heads either)
    ada_floor: float = 0.2  # adaptive: each kv head keeps at least this fraction of the uniform free budget
    decode_budget: str = "all"  # while decoding: "fixed" holds the prompt's budget (decoded tokens compete for
    #   it, memory stays put), "all" applies the budget to every token seen (it grows by budget x decoded),
    #   "prompt" keeps every decoded token (only the prompt is compressed, as single-pass presses do)
    decode_ahead: int | None = None  # "all": whenever the storage is sized, it holds the budget of this many more
    #   decoded tokens, so a growing budget reallocates once per that many tokens, not about once per
    #   slack / (1 - budget) (each reallocation is a new CUDA-graph capture). None: 0 (the least memory), or 256
    #   under apply_acckv(decode_graphs=True)
    # --- constants ---
    window: int = 32  # W: observation window (last prompt queries), always kept
    pool_kernel: int = 7  # 1-D pooling of scores along each modality's own token order (1 = off)
    pool_mode: str = "max"  # "max" or "avg"
    pool_lift: float = 0.5  # AccKV ranks by max(s, pool_lift x pool(s)): a peak stays above the neighbours it
    #   lifts, so a tight budget keeps peaks before neighbourhoods (1.0: SnapKV's pooling; baselines always use it)
    gamma: float = 1.0  # γ: sharpness of the modality shares
    rho_min: float = 0.1  # ρ_min: floor of any present AV modality's share
    theta_audio: float = 0.9  # θ_a: key cosine for grouping neighbouring audio tokens
    theta_video: float = 0.9  # θ_v: key cosine for grouping a video patch with the same patch one frame earlier
    max_group: int = 4  # largest merge group (bounds the drift of chained similarity)
    redundancy_min: float = 0.05  # fallback: a row whose AV candidates link to a neighbour less than this share
    #   has nothing to merge; focusing and redistribution are skipped there (a plain top-k of its pooled scores)
    merge_frees_budget: bool = True  # a group competes as one slot (True) or tokens compete alone, evicted ones merge
    proportional: bool = True  # a merged slot weighs as many tokens as it holds in attention (multiplicity)
    align_lambda: float = 0.5  # λ: strength of cross-modal alignment
    time_bin: int = 50  # time bin in TMRoPE units (25 per second): 2 s, Qwen2.5-Omni's chunk
    sink: int = 4  # S: first tokens kept by position (where protects_sinks; StreamingLLM's sinks)
    recent: int = 32  # R: most recent tokens kept by position (with protect_positions; decode and streaming)
    protect_text: bool = False  # keep every text token of an AV prompt (the question is the window, kept anyway)
    slack: int = 64  # decode/streaming: re-compress once a head holds budget + slack tokens
    head_renorm: bool = False  # Step 2.3: renormalise scores per head
    video_from_layer: int | None = None  # depth prior: video is high-priority from this layer on (off: None)
    layer_budgets: str = "uniform"  # "uniform" or "pyramid" (PyramidKV's arithmetic schedule over depth)
    pyramid_beta: float = 20.0  # pyramid: the last layer keeps 1/beta of the mean unprotected budget (PyramidKV's β)
    # --- execution ---
    backend: str = "auto"  # "auto" (Triton on GPU, vectorised PyTorch ops on CPU), "triton" or "torch"

    def __post_init__(self):
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, numbers.Real):  # numpy's numbers are Real, its bool_ is not
            raise TypeError(f"budget must be a float in (0, 1] or an int >= 1, got {b!r}")
        b = int(b) if isinstance(b, numbers.Integral) else float(b)
        if isinstance(b, float) and not (0.0 < b <= 1.0):
            raise ValueError(f"budget as a float must lie in (0, 1], got {b}")
        if isinstance(b, int) and b < 1:
            raise ValueError(f"budget as an int must be >= 1 tokens, got {b}")
        object.__setattr__(self, "budget", b)
        np_ = sys.modules.get("numpy")  # numpy's bool_ is taken as a bool (unimported: none can be passed)
        for f in fields(self):
            if f.name == "budget":
                continue
            kind, optional, valid, expected = _RULES[f.name]  # a field without a rule fails here, on every call
            v = getattr(self, f.name)
            if v is None and optional:
                continue
            if isinstance(kind, tuple):
                expected, valid = _one_of(kind), kind.__contains__
            msg = f"{f.name} must be {'None or ' if optional else ''}{expected or 'a bool'}, got {v!r}"
            if kind is bool:
                if not (isinstance(v, bool) or (np_ is not None and isinstance(v, np_.bool_))):
                    raise TypeError(msg)
                x = bool(v)
            elif isinstance(v, bool):
                raise TypeError(msg)  # a bool is not a count or a number (nor is numpy's bool_, not numbers.Real)
            elif kind is int:
                if not isinstance(v, numbers.Integral):
                    raise TypeError(msg)  # 3.0 too: a count is an int
                x = int(v)
            elif kind is float:
                if not isinstance(v, numbers.Real):
                    raise TypeError(msg)
                x = float(v)
                if not math.isfinite(x):
                    raise ValueError(msg)
            else:
                if not isinstance(v, str):
                    raise TypeError(msg)
                x = v
            if valid is not None and not valid(x):
                raise ValueError(msg)
            if x is not v:
                object.__setattr__(self, f.name, x)
        if self.protect_sinks and not self.protect_positions:
            raise ValueError("protect_sinks=True keeps the sinks by position, which protect_positions=False turns off; "
                             "leave protect_sinks None (or False), or set protect_positions=True")
        if self.broad_entropy is not None and self.method != "acckv":
            raise ValueError(f"broad_entropy applies to method='acckv' only (its every-query mean evidence), got "
                             f"method={self.method!r}; leave broad_entropy None")
        if self.method == "tova" and self.head_budgets == "adaptive":
            raise ValueError("head_budgets='adaptive' does not apply to method='tova': TOVA keeps the same tokens in "
                             "every head of a layer (one selection from the heads' mean); use head_budgets='uniform'")

    def replace(self, **changes) -> "AccKVConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @property
    def is_full(self) -> bool:
        """True when nothing is evicted: method "full" or a budget of 1.0 keeps the exact model."""
        return self.method == "full" or (isinstance(self.budget, float) and self.budget >= 1.0)

    @property
    def score_evidence(self) -> str:
        """The Step 0 evidence that runs: ``evidence``, or the method's own when it is None."""
        return self.evidence if self.evidence is not None else _METHOD_EVIDENCE.get(self.method, "window")

    def evidence_for(self, audio_video: bool) -> str:
        """The evidence that runs on a prompt with (True) or without audio/video/image tokens: ``"auto"`` resolved."""
        ev = self.score_evidence
        return ("window" if audio_video else "mean") if ev == "auto" else ev

    @property
    def ranks_by_value(self) -> bool:
        """Whether the ranking evidence is multiplied by each token's ``||v||``: ``value_aware``, or when it is None,
        AccKV with every query's mean as evidence (its text evidence once ``"auto"`` is resolved; on real weights
        it lowered the KL at every budget on both texts, benchmarks/NOTES.md)."""
        if self.value_aware is not None:
            return self.value_aware
        return self.method == "acckv" and self.score_evidence == "mean"

    @property
    def protects_sinks(self) -> bool:
        """Whether the S first tokens are kept by position (in the methods that protect sinks: AccKV and
        StreamingLLM): ``protect_sinks``, or when it is None, everywhere but AccKV ranking by every query's mean;
        never without ``protect_positions``. ``"auto"`` evidence must be resolved first."""
        if not self.protect_positions:
            return False
        if self.protect_sinks is not None:
            return self.protect_sinks
        return not (self.method == "acckv" and self.score_evidence == "mean")

    @property
    def broad_threshold(self) -> float | None:
        """The fraction f of ``ln(valid keys)`` above which a row's last-query entropy counts as broad
        (``broad_entropy``): ``broad_entropy``, or when it is None 0.7 where AccKV ranks by every query's mean; None
        where the rule is off (another method or evidence, or f = 1.0). ``"auto"`` evidence must be resolved first."""
        if self.method != "acckv" or self.score_evidence != "mean":
            return None
        f = BROAD_ENTROPY if self.broad_entropy is None else self.broad_entropy
        return None if f >= 1.0 else f

    @property
    def mean_decay(self) -> float:
        """The factor per query of age on the evidence, ``exp(-1 / recency)``, where the evidence is the every-query
        mean and ``recency`` is set; else 1.0 (every query alike). ``"auto"`` must be resolved first."""
        if self.recency is None or self.score_evidence != "mean":
            return 1.0
        return math.exp(-1.0 / self.recency)

    @property
    def windowed(self) -> bool:
        """Whether the observation window is the evidence (window or auto evidence): then the window is protected
        and scores are pooled; every-query, last-query and reconstruction evidence is ranked as it is, the window
        unprotected."""
        return self.score_evidence in ("window", "auto")

    @property
    def adaptive_heads(self) -> bool:
        """True when a layer's budget is shared across its kv heads by evidence (Ada-KV), not split evenly."""
        return self.method in ("adakv", "kvzip") or (self.head_budgets == "adaptive"
                                                     and self.method not in ("streaming", "full"))

    @property
    def uses_multiplicity(self) -> bool:
        """True when attention weighs merged slots by their token count (AccKV with ``proportional``)."""
        return self.method == "acckv" and self.intra_merge and self.proportional

    def ablations(self) -> dict[str, "AccKVConfig"]:
        """AccKV with each switch off in turn, named ``acckv-no-<switch>``, then each fallback off:
        ``acckv-no-lift`` (SnapKV's pooling, ``pool_lift=1``) and ``acckv-no-fallback`` (``redundancy_min=0``)."""
        switches = ("focusing", "redistribution", "intra_merge", "cross_align", "proportional")
        out = {f"acckv-no-{s.replace('_', '-')}": self.replace(method="acckv", **{s: False}) for s in switches}
        out["acckv-no-lift"] = self.replace(method="acckv", pool_lift=1.0)
        out["acckv-no-fallback"] = self.replace(method="acckv", redundancy_min=0.0)
        return out

    def as_dict(self) -> dict:
        """Every field by name, in declaration order (the values as stored: numpy scalars already converted)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
