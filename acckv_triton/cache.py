"""One layer of the compressed cache: :class:`BudgetedLayerCache` holds a :class:`~acckv_triton.storage.LayerKVCache`
(the storage) at an AccKV budget. It asks the policy for a plan after each prefill (or streaming chunk) and whenever
decoding has grown a row past budget + slack, and applies the plan through the storage; its ``decode_step`` is the
one decode call (append, attention, mass, upkeep). Data flows one way: cache -> policy -> ops, cache -> storage ->
ops; nothing here knows transformers.
"""
from __future__ import annotations

import functools
import math

import torch

from . import fused_policy, torch_ops
from .config import AccKVConfig
from .ops.chunk_attention import chunk_attention
from .ops.decode_attention import DecodeAttentionOutput
from .ops.observed_attention import observed_attention
from .ops.window_scores import window_scores
from .fused_policy import plan_layer_fused
from .policy import LayerTokens, PolicyResult, budget_tokens, check_layer, plan_layer
from .reference import query_weight_sum
from .storage import LayerKVCache, _round_up

__all__ = ["BudgetedLayerCache", "LayerKVCache"]  # (LayerKVCache lives in acckv_triton.storage; imported here too)

_PREFILL_METADATA = frozenset({"modality", "time", "spatial", "position", "check_modality"})  # a prefill's **metadata


def _check_valid(valid, shapes: tuple[tuple[int, ...], ...], what: str) -> None:
    """A prefill's padding mask: None, or a bool tensor of one of ``shapes``; ``what`` describes them in the error
    (TypeError for a non-tensor or another dtype, ValueError for another shape)."""
    if valid is None:
        return
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"valid must be a bool {what}, got {type(valid).__name__}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool {what}, got dtype {valid.dtype}")
    if tuple(valid.shape) not in shapes:
        raise ValueError(f"valid must be a bool {what}, got shape {tuple(valid.shape)}")


class BudgetedLayerCache:
    """One layer's KV cache held at an AccKV budget: compressed after prefill, re-compressed as decoding grows it.

    The budget is :func:`~acckv_triton.policy.budget_tokens` of the prompt tokens seen so far per (b, kv head)
    (padding excluded). Each token's ``token_mass`` starts at its prefill window score and accumulates decode
    attention mass; re-compression ranks by that blend (window queries and decode steps weigh alike, one unit of
    mass per query head each). Streaming chunks (or a second question) go through :meth:`prefill` again and raise
    the budget with the prompt, which then counts the tokens decoded in between too. The observation window of the
    latest prefill stays protected across re-compressions.

    The decode loop calls :meth:`decode_step` once per token: append, attention (with mass accumulation when the
    method reads it) and, when it is due, the upkeep. After each prefill the storage holds ``max(target) + slack
    + 1`` slots per row (rounded up to 16; plus the budget's growth over ``cfg.decode_ahead`` decoded tokens with
    ``decode_budget="all"``) and an upkeep compacts in place when a row would pass ``target + slack``.
    ``cfg.decode_budget`` says what the target covers while decoding: ``"fixed"`` the prompt's budget
    (K/V keep their addresses from one upkeep to the next), ``"all"`` the budget of every token seen (an upkeep
    grows the storage when the target outgrows it), ``"prompt"`` only the prompt's (no upkeep: decoded tokens
    are kept). The schedule is decided on the
    host from counts it already knows, so a step without upkeep performs no host synchronisation and, with the
    decode plan bound once, no allocation.

    Attributes:
        store: the :class:`LayerKVCache` holding K, V and metadata.
        target: ``[B, Hkv]`` int64 slots kept by a compression (None before the first prefill).
        last: the :class:`~acckv_triton.policy.PolicyResult` of the latest compression (plan, shares, priority).
        compressions: how many times this layer was compressed.
    """

    def __init__(self, cfg: AccKVConfig, layer: int = 0, num_layers: int = 1):
        if not isinstance(cfg, AccKVConfig):
            raise TypeError(f"cfg must be an AccKVConfig, got {type(cfg).__name__}")
        check_layer(layer, num_layers)
        self.cfg, self.layer, self.num_layers = cfg, layer, num_layers
        self.store = LayerKVCache(headroom=cfg.slack, proportional=cfg.uses_multiplicity, backend=cfg.backend)
        self.target: torch.Tensor | None = None
        self.prompt_tokens: torch.Tensor | None = None  # [B, Hkv] prompt tokens seen, padding excluded
        self.window = (0, 0)  # positions [start, end) of the latest prefill's observation window
        self._evidence_av: bool | None = None  # audio_video as the last prompt_evidence / prompt_attention took it
        self.last: PolicyResult | None = None
        self.policy_cfg = cfg  # what the policy runs: cfg with "auto" evidence resolved by the latest prefill
        self.compressions = 0
        self._valid: torch.Tensor | None = None  # [B, Hkv, stored] False at padding not yet compressed away
        self._decoded = 0  # tokens appended by decode since the last prefill
        self._prompt_max = 0  # prompt tokens seen per row, padding included: the host's bound on prompt_tokens
        self._target_max = 0  # budget_tokens of _prompt_max: the host's bound on every row's target
        self._padded = False  # whether some prefill had padding (then targets differ per row, on the device)
        self._excess = 0  # bound on max over rows of (stored - target), on the host: upkeep is due past cfg.slack
        self._longest = 0  # the host's bound on the longest row after the latest compression
        self.awaiting_reconstruction = False  # reconstruction evidence: the first prompt is stored, not compressed
        self._broad: tuple[torch.Tensor, torch.Tensor] | None = None  # (broad [B], shared [B, T]): cfg.broad_threshold

    @property
    def reads_mass(self) -> bool:
        """Whether decode steps accumulate token mass: only for methods whose upkeep ranks by it."""
        return not self.cfg.is_full and self.cfg.method != "streaming"

    def prompt_evidence(self, q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                        valid: torch.Tensor | None = None, audio_video: bool | None = None) -> torch.Tensor:
        """Step 0's evidence on a first prompt: ``[B, Hkv, T]`` float32, the attention mass each token receives from
        the queries ``cfg.score_evidence`` names, summed over the query heads of its group.

        Args:
            q: ``[B, Hq, T, D]`` the prompt's queries (RoPE applied); k: ``[B, Hkv, T, D]`` its keys.
            scale: softmax scale (default ``D ** -0.5``).
            valid: optional ``[B, T]`` bool, False at left padding (excluded from every softmax; a row's False
                entries come first: one after its first True is read as valid).
            audio_video: whether the prompt holds audio, video or image tokens (a host flag); ``"auto"`` evidence
                (AccKV's default) is the window's on such prompts and every query's on text; None: the window's.

        ``"window"``: the last W queries (:func:`acckv_triton.window_scores`); ``"last"``: the last query;
        ``"observed"`` and ``"mean"``: every prompt query (:func:`acckv_triton.observed_attention`, flash-tiled, no
        T x T); the mean is taken when the layer is compressed, over the queries that saw each token by then;
        ``"reconstruction"``: zeros (the evidence comes from :meth:`reconstruct`, after :meth:`prefill`).
        Kernels where the cache runs them, their torch twins elsewhere. Pass the result to :meth:`prefill`.
        With the mean as evidence (and ``cfg.broad_threshold`` on, its default there) it also stashes which rows are
        broad, as :meth:`prompt_attention` does.
        """
        self._check_q(q, k, valid)
        T = k.shape[2]
        key_start = self._key_start(valid, k)
        cfg = self._resolve(audio_video)
        self._evidence_av = audio_video  # what the next prefill's policy follows unless it is told otherwise
        self._broad = None
        if cfg.score_evidence == "reconstruction" or T == 0:  # (an empty prompt: no query, no evidence)
            return torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
        if self.reads_every_query(audio_video):  # the mean divides by the queries at compression time
            op = observed_attention if self.store.kernels_on(q.device) else \
                functools.partial(torch_ops.observed_attention, return_lse=False)
            mass = op(q, k, scale=scale, key_start=key_start, decay=cfg.mean_decay).key_mass
            self._stash_broad(q, k, scale, key_start, cfg)
            return mass
        W = self._evidence_rows(T, cfg)
        op = window_scores if self.store.kernels_on(q.device) else torch_ops.window_scores
        return op(q[:, :, T - W:], k, scale=scale, key_start=key_start).scores

    def reads_every_query(self, audio_video: bool | None = None) -> bool:
        """Whether a first prompt's evidence is every query's attention (``"observed"`` or ``"mean"``, resolved for a
        prompt with or without audio/video/image tokens): then :meth:`prompt_attention` gives the prompt's
        attention output and its evidence in one pass."""
        return self._resolve(audio_video).score_evidence in ("observed", "mean")

    def prompt_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                         valid: torch.Tensor | None = None, audio_video: bool | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """A first prompt's causal attention and its every-query evidence from the same pass.

        For a model whose attention is plain causal softmax attention (left padding as ``valid``), this replaces
        the model's own attention call and :meth:`prompt_evidence`: one pass of
        :func:`acckv_triton.observed_attention` with values (its torch twin off the kernels) computes the output
        and the mass each key receives, where the two calls compute the logits twice.

        Args: as :meth:`prompt_evidence`, plus ``v [B, Hkv, T, D]`` (the prompt's values, in q's dtype).

        Returns:
            ``(out, scores)``: ``out [B, T, Hq, D]`` in q's dtype (transformers' layout; 0 at a padded query) and the
            ``[B, Hkv, T]`` float32 scores to pass to :meth:`prefill`.

        With the mean as evidence (and ``cfg.broad_threshold`` on, its default there) it also computes, from q's last
        position and k, which rows' last query attends broadly and that query's head-shared attention (a few device
        ops, no sync); the next :meth:`prefill`'s compression ranks those rows by it (the returned scores and the
        stored token mass stay the every-query mass).

        Raises:
            ValueError when the evidence is not every query's (:meth:`reads_every_query`) or ``valid`` has the wrong
            shape.
        """
        if not self.reads_every_query(audio_video):
            raise ValueError(f"prompt_attention needs every-query evidence ('observed' or 'mean'); this layer's is "
                             f"{self._resolve(audio_video).score_evidence!r}: run the attention, then prompt_evidence")
        self._check_q(q, k, valid)
        B, Hq, T, D = q.shape
        key_start = self._key_start(valid, k)
        decay = self._resolve(audio_video).mean_decay
        self._evidence_av = audio_video
        self._broad = None
        out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)  # written straight into transformers' layout
        if self.store.kernels_on(q.device):
            res = observed_attention(q, k, v, scale=scale, key_start=key_start, out=out.transpose(1, 2), decay=decay)
        else:
            res = torch_ops.observed_attention(q, k, v, scale=scale, key_start=key_start, return_lse=False,
                                               decay=decay, out=out.transpose(1, 2))
        self._stash_broad(q, k, scale, key_start, self._resolve(audio_video))
        return out, res.key_mass

    def _stash_broad(self, q: torch.Tensor, k: torch.Tensor, scale: float | None, key_start: torch.Tensor | None,
                     cfg: AccKVConfig) -> None:
        """``cfg.broad_threshold`` on a first prompt ranked by the every-query mean: stash ``(broad [B] bool, shared
        [B, T] float32)`` for the next prefill's compression, else nothing. ``shared`` is the last query's attention
        (float32, keys before ``key_start`` masked) averaged over all the layer's query heads; ``broad`` marks the
        rows whose entropy of it (nats, mean over the query heads) exceeds ``broad_threshold x ln(valid keys)`` (a row
        with fewer than 2 valid keys never is). Torch ops on the device, nothing read back."""
        frac, T = cfg.broad_threshold, k.shape[2]
        if frac is None or T < 2 or cfg.is_full:  # (fewer than 2 keys: no row is broad; nothing is compressed)
            return
        B, Hkv, _, D = k.shape
        ql = q[:, :, -1].float().view(B, Hkv, q.shape[1] // Hkv, D)
        logits = ql @ k.float().transpose(-1, -2) * (D ** -0.5 if scale is None else scale)  # [B, Hkv, G, T]
        if key_start is not None:
            key_start = key_start.to(k.device).long()
            pad = torch.arange(T, device=k.device) < key_start[:, None]  # [B, T]
            logits = logits.masked_fill(pad[:, None, None], -math.inf)
        p = torch.softmax(logits, -1)
        entropy = torch.special.entr(p).sum(-1).mean((1, 2))  # [B] nats
        if key_start is None:  # every row has T keys: the threshold is a host number
            broad = entropy > frac * math.log(T)
        else:
            n = (T - key_start).float()
            broad = (entropy > frac * n.clamp(min=1.0).log()) & (n >= 2)
        self._broad = (broad, p.mean((1, 2)))

    @staticmethod
    def _check_q(q, k, valid=None) -> None:
        """Raise TypeError / ValueError unless ``q [B, Hq, T, D]`` and ``k [B, Hkv, T, D]`` are tensors of one prompt
        or chunk (same B, T, D, dtype and device: a window's evidence slices q's last queries, so a q of another
        length would score silently against the wrong keys) and ``valid`` is None or a tensor (its shape is checked
        where it is read)."""
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise (ValueError if isinstance(k, torch.Tensor) else TypeError)(
                f"k must be a [B, Hkv, T, D] tensor, got "
                f"{tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or (q.shape[0], q.shape[2], q.shape[3]) != \
                (k.shape[0], k.shape[2], k.shape[3]) or q.dtype != k.dtype or q.device != k.device:
            raise (ValueError if isinstance(q, torch.Tensor) else TypeError)(
                f"q must be a [B, Hq, T, D] tensor with B, T, D = {(k.shape[0], k.shape[2], k.shape[3])} like k, "
                f"{k.dtype} on {k.device}, got "
                f"{(tuple(q.shape), q.dtype) if isinstance(q, torch.Tensor) else type(q).__name__}")
        if valid is not None and not isinstance(valid, torch.Tensor):
            raise TypeError(f"valid must be None or a bool [B, T] tensor, got {type(valid).__name__}")

    @staticmethod
    def _key_start(valid: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
        """``[B]`` int32 first valid token of each sequence, T for a row with none (None without ``valid``),
        checking ``valid``'s shape. ``valid`` is left padding: a False after a row's first True is not seen (reading
        it would need a host sync)."""
        B, T = k.shape[0], k.shape[2]
        if valid is None:
            return None
        if valid.dim() != 2 or tuple(valid.shape) != (B, T):
            raise ValueError(f"valid must be a [B, T] = {(B, T)} bool tensor, got {tuple(valid.shape)}")
        return torch.where(valid.any(-1), valid.int().argmax(-1), T).to(torch.int32)

    def _resolve(self, audio_video: bool | None) -> AccKVConfig:
        """The config the policy runs for a prompt: ``"auto"`` evidence resolved (None: the window)."""
        if audio_video is not None and not isinstance(audio_video, bool):
            raise TypeError(f"audio_video must be a bool or None, got {type(audio_video).__name__}")
        if self.cfg.score_evidence != "auto":
            return self.cfg
        return self.cfg.replace(evidence=self.cfg.evidence_for(audio_video is None or bool(audio_video)))

    def _evidence_rows(self, T: int, cfg: AccKVConfig) -> int:
        """How many of a chunk's last queries give evidence (``cfg.score_evidence``, resolved)."""
        T = max(T, 1)  # an empty chunk: nothing scores, but the kernel's window stays a count >= 1
        return {"window": min(cfg.window, T), "observed": T, "mean": T, "last": 1,
                "reconstruction": min(cfg.window, T)}[cfg.score_evidence]  # a later chunk: its window

    def prefill(self, k: torch.Tensor, v: torch.Tensor, *, scores: torch.Tensor, valid: torch.Tensor | None = None,
                audio_video: bool | None = None, **metadata) -> None:
        """Store a prompt (or a streaming chunk) and compress the layer to its budget.

        Args:
            k, v: ``[B, Hkv, T, D]`` the chunk's keys (RoPE applied) and values.
            scores: ``[B, Hkv, T]`` real floating-point attention mass of these tokens (:meth:`prompt_evidence`;
                stored as float32). Not read back to be checked (that would sync): the policy reads NaN and
                negative values as 0 and +inf as the largest float.
            valid: optional ``[B, T]`` or ``[B, Hkv, T]`` bool, False at left padding (never kept, not counted in
                the budget).
            audio_video: as :meth:`prompt_evidence` took it (the evidence decides what the policy protects and
                pools); None: what this layer's last :meth:`prompt_evidence` or :meth:`prompt_attention` took.
            metadata: ``modality``, ``time``, ``spatial``, ``position`` and ``check_modality`` as
                :meth:`LayerKVCache.append` takes them.

        Afterwards a compressed layer's storage holds ``max(target) + slack + 1`` slots per row (with
        ``decode_budget="all"``, plus the budget's growth over ``decode_ahead`` more decoded tokens), rounded up to 16;
        at budget 1.0 and ``method="full"`` nothing is compressed and the storage grows as :meth:`LayerKVCache.append`
        grows it. With reconstruction evidence (``method="kvzip"``) a first prompt is stored whole and compressed by
        :meth:`end_reconstruction`, after :meth:`reconstruct` has scored it; a later chunk ranks by its window.
        """
        self._check_not_awaiting("prefill")
        self._check_metadata("prefill", metadata)
        self.store.check_kv(k, v)
        if audio_video is None:  # the scores' own evidence, not the window's default
            audio_video = self._evidence_av
        B, Hkv, T = k.shape[:3]
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a [B, Hkv, T] = {(B, Hkv, T)} tensor, got {type(scores).__name__}")
        if tuple(scores.shape) != (B, Hkv, T):
            raise ValueError(f"scores must be a [B, Hkv, T] = {(B, Hkv, T)} tensor, got {tuple(scores.shape)}")
        if not scores.dtype.is_floating_point:  # attention mass: a real float (complex and ints are refused)
            raise TypeError(f"scores must be a real floating-point tensor of attention mass, got {scores.dtype}")
        _check_valid(valid, ((B, T), (B, Hkv, T)), f"[B, T] or [B, Hkv, T] tensor for {(B, Hkv, T)}")
        valid_rows = None if valid is None else valid[:, None, :].expand(B, Hkv, T) if valid.dim() == 2 else valid
        before = None
        if valid_rows is not None or self._valid is not None:
            before = None if self.store.lengths is None else self.store.lengths.long().clone()
        scores = scores.detach() if scores.requires_grad else scores
        mass = scores.float() if valid_rows is None else torch.where(valid_rows, scores.float(), 0.0)
        st = self.store
        first = st.k is None
        if not first:  # the broad-row stash ranks a first prompt only (a later chunk, a second question: dropped)
            self._broad = None
        elif self._broad is not None and tuple(self._broad[1].shape) != (B, T):
            raise ValueError(f"k holds a prompt of {(B, T)} (batch, tokens), but the last prompt_attention / "
                             f"prompt_evidence scored {tuple(self._broad[1].shape)}: pass that call's prompt")
        defer = first and self.cfg.score_evidence == "reconstruction" and not self.cfg.is_full
        chunk_max = T + self._decoded  # tokens decoded since the last prefill become part of the prompt
        prompt_max = self._prompt_max + chunk_max
        target_max = budget_tokens(self.cfg, prompt_max, self.layer, self.num_layers)
        # the first prompt of a layer that compresses is compacted straight out of the inputs: no copy (KVzip's is
        # held until its reconstruction pass has scored it; that pass writes the token mass, so it gets its own)
        borrow = first and st.kernels_on(k.device) and not self.cfg.is_full
        if borrow and defer and mass.data_ptr() == scores.data_ptr():
            mass = mass.clone()
        st.append(k, v, token_mass=mass, borrow=borrow, **metadata)  # validates: nothing changed if it raises
        if valid_rows is not None:
            self._mark_valid(before, valid_rows)
        elif self._valid is not None:
            self._mark_valid(before, torch.ones(B, Hkv, T, dtype=torch.bool, device=k.device))
        self._prompt_max, self._target_max = prompt_max, target_max
        if valid_rows is not None or self._padded:  # per-row prompts on the device (no read-back)
            chunk = (valid_rows.sum(-1) if valid_rows is not None else
                     torch.full((B, Hkv), T, dtype=torch.long, device=k.device)) + self._decoded
            if not self._padded:
                self._padded = True
                self.prompt_tokens = torch.full((B, Hkv), self._prompt_max - chunk_max, dtype=torch.long,
                                                device=k.device)
            self.prompt_tokens = self.prompt_tokens + chunk
            self.target = budget_tokens(self.cfg, self.prompt_tokens, self.layer, self.num_layers)
        else:  # every row saw the same prompt: the host knows the targets exactly
            self.prompt_tokens = torch.full((B, Hkv), self._prompt_max, dtype=torch.long, device=k.device)
            self.target = torch.full((B, Hkv), self._target_max, dtype=torch.long, device=k.device)
        self._decoded = 0
        self._evidence_av = None  # used up by this prefill
        self.window = (self.store.seen - self.cfg.window, self.store.seen)
        self.policy_cfg = self._resolve(audio_video)
        if self.policy_cfg.score_evidence == "reconstruction" and not first:  # no pass for a later chunk
            self.policy_cfg = self.policy_cfg.replace(evidence="window")
        if defer:
            self.awaiting_reconstruction = True
            return
        broad, self._broad = self._broad, None  # (a first prompt's, checked above against this prompt)
        self._compress(broad=broad)

    def reconstruct(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    scale: float | None = None) -> torch.Tensor:
        """Score the stored first prompt by a reconstruction chunk (reconstruction evidence, after KVzip).

        Args:
            q: ``[B, Hq, T, D]`` the chunk's queries (RoPE applied); k, v: ``[B, Hkv, T, D]`` its keys and values. The
                integration feeds the prompt again after itself, at the positions that follow it.
            scale: softmax scale (default ``D ** -0.5``).

        Each query attends over every stored token and the chunk causally (:func:`acckv_triton.ops.chunk_attention`,
        ``reduce="max"``); each stored token's evidence becomes the largest probability any query head of its group
        gives it (a max over calls too). The chunk is not stored. Returns ``[B, T, Hq, D]`` (transformers' layout),
        what the model's next layer reads; call :meth:`end_reconstruction` once every layer has been scored.
        """
        if not self.awaiting_reconstruction:
            raise ValueError("reconstruct scores a first prompt stored by prefill with reconstruction evidence "
                             "(method='kvzip'); this layer has none waiting")
        if self._valid is not None:  # padding queries would score too, and padding keys be attended
            raise ValueError("reconstruct does not support a padded prompt (prefill got valid=...): prefill prompts "
                             "without padding for reconstruction evidence")
        S = self.store.max_length
        out, res = self._attend_chunk(q, k, v, scale=scale, window=max(q.shape[2], 1), reduce="max")
        torch.maximum(self.store.token_mass[:, :, :S], res.stored_mass, out=self.store.token_mass[:, :, :S])
        return out

    def _attend_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **opts):
        """``chunk_attention`` of a chunk over the stored slots and itself (the kernel where the store runs kernels,
        its torch twin elsewhere): ``(out [B, T, Hq, D], ChunkAttention)``."""
        st = self.store
        st.check_kv(k, v)  # the chunk against the storage, and q against both: each named (the op names its own)
        self._check_q(q, k)
        B, Hq, T, D = q.shape
        S = st.max_length
        args = (st.k[:, :, :S], st.v[:, :, :S], st.lengths, k, v)
        opts["check_lengths"] = False  # the cache keeps its lengths and multiplicities valid
        if st.uses_kernels:
            out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
            return out, chunk_attention(q, *args, **opts, out=out.transpose(1, 2))
        res = torch_ops.chunk_attention(q, *args, **opts)
        return res.out.transpose(1, 2), res

    def end_reconstruction(self) -> None:
        """Compress the first prompt :meth:`reconstruct` scored (to ``max(target) + slack + 1`` slots per row)."""
        if not self.awaiting_reconstruction:
            raise ValueError("end_reconstruction: this layer has no first prompt waiting for reconstruction")
        self.awaiting_reconstruction = False
        self.compress()

    @staticmethod
    def _check_metadata(what: str, metadata: dict) -> None:
        """A prefill's ``**metadata`` holds only what :meth:`LayerKVCache.append` takes beside the mass (the scores
        give it): an unknown name raises TypeError, before anything changes."""
        for name in metadata:
            if name not in _PREFILL_METADATA:
                raise TypeError(f"{what}() got an unexpected keyword argument {name!r} (metadata: "
                                f"{', '.join(sorted(_PREFILL_METADATA))})")

    def _check_not_awaiting(self, what: str) -> None:
        if self.awaiting_reconstruction:
            raise ValueError(f"{what}: the first prompt waits for its reconstruction pass (method='kvzip'); call "
                             "reconstruct(...) and end_reconstruction() first")

    def prefill_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                      valid: torch.Tensor | None = None, audio_video: bool | None = None,
                      **metadata) -> torch.Tensor:
        """A later chunk (a second question, a streaming chunk, teacher forcing): attend, then store and compress.

        Args:
            q: ``[B, Hq, T, D]`` the chunk's queries (RoPE applied); k, v: ``[B, Hkv, T, D]`` its keys and values.
            scale: softmax scale (default ``D ** -0.5``).
            valid: optional ``[B, T]`` bool, False at left padding.
            metadata: as :meth:`prefill`.

        Each query attends over every stored slot (merged slots weighing their multiplicity when the method says so)
        and the chunk causally, through :func:`acckv_triton.ops.chunk_attention` (the torch backend: its blocked
        twin). The observation window's mass is added to the stored slots' ``token_mass`` and seeds the chunk's,
        then :meth:`prefill` stores the chunk and compresses. Returns ``[B, T, Hq, D]`` (transformers' layout).
        """
        st = self.store
        if st.k is None:
            raise ValueError("prefill_chunk needs a prefilled cache: call prefill(k, v, scores=...) first")
        self._check_not_awaiting("prefill_chunk")
        self._check_metadata("prefill_chunk", metadata)
        st.check_kv(k, v)  # and the chunk's metadata and mask: checked before the stored tokens' mass changes
        st.token_metadata(k, **metadata)
        B, T = k.shape[0], k.shape[2]
        _check_valid(valid, ((B, T),), f"[B, T] = {(B, T)} tensor (one mask per sequence: the chunk's queries "
                     "attend over the keys of every kv head alike)")
        S = st.max_length
        cfg = self._resolve(audio_video)
        out, res = self._attend_chunk(
            q, k, v, scale=scale, multiplicity=st.multiplicity[:, :, :S] if st.proportional else None,
            key_valid=valid,
            window=self._evidence_rows(T, cfg), decay=cfg.mean_decay)
        st._own()  # (a first prompt still borrowed, when its compression failed) the mass changes in place below
        if cfg.mean_decay != 1.0:  # the stored tokens' evidence ages by the chunk's T queries
            st.token_mass[:, :, :S].mul_(cfg.mean_decay ** T)  # (mul_ / add_ on the slice: `slice *=` copies it back)
        st.token_mass[:, :, :S].add_(res.stored_mass)  # the window's evidence on stored tokens, as decode adds its own
        self.prefill(k, v, scores=res.chunk_mass, valid=valid, audio_video=audio_video, **metadata)
        return out

    def _mark_valid(self, before: torch.Tensor | None, valid: torch.Tensor) -> None:
        """Record which stored slots are padding (until a compression drops them); rows may be ragged."""
        B, Hkv, T = valid.shape
        marks = torch.ones(B, Hkv, self.store.max_length, dtype=torch.bool, device=valid.device)
        if self._valid is not None:
            marks[..., :self._valid.shape[-1]] = self._valid
        start = before if before is not None else torch.zeros(B, Hkv, dtype=torch.long, device=valid.device)
        marks.scatter_(2, start[..., None] + torch.arange(T, device=valid.device), valid)
        self._valid = marks

    def append(self, k: torch.Tensor, v: torch.Tensor, **metadata) -> None:
        """Store decode tokens ``[B, Hkv, T, D]``; re-compress once a row holds more than budget + slack.

        :meth:`decode_step` is the one-call decode path; this is for hand-written loops that attend separately.
        """
        self._check_not_awaiting("append")
        self.store.append(k, v, **metadata)
        self._decoded += k.shape[2]
        self._excess += k.shape[2]
        if self.needs_upkeep():
            self.compress(upkeep=True)

    def decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    modality: torch.Tensor | None = None, time: torch.Tensor | None = None,
                    spatial: torch.Tensor | None = None) -> DecodeAttentionOutput:
        """One decode token: store its K/V, attend over every stored token, accumulate mass, run the upkeep if due.

        Args:
            q: ``[B, Hq, D]`` the new token's queries (RoPE applied), cache dtype, last dim contiguous.
            k, v: ``[B, Hkv, 1, D]`` its key and value.
            scale: softmax scale (default ``D ** -0.5``).
            modality, time, spatial: optional metadata of the token, as :meth:`LayerKVCache.append_token` takes it.

        Returns:
            ``DecodeAttentionOutput(out [B, Hq, D], lse [B, Hq], None)``: the decode plan's buffers, rewritten by
            the next step of this layer. The attention includes the new token; the upkeep (when due) runs after it.

        A step without upkeep performs no host synchronisation and no allocation (metadata in the cache's dtypes).
        """
        st = self.store
        if self.target is None:
            raise ValueError("decode_step needs a prefilled cache: call prefill(k, v, scores=...) first")
        self._check_not_awaiting("decode_step")
        st.check_query(q, scale)  # before the token is stored: a rejected step changes nothing
        st.append_token(k, v, modality=modality, time=time, spatial=spatial)
        self._count_decoded()
        res = st.decode_plan(q.shape[1], scale=scale, token_mass=self.reads_mass,
                             decay=self.policy_cfg.mean_decay).run(q, check=False)  # checked above
        if self.needs_upkeep():
            self.compress(upkeep=True)
        return res

    def _count_decoded(self) -> None:
        self._decoded += 1
        self._excess += 1

    # ---- what a CUDA graph of the decode step needs from the host (see acckv_triton.integrations.graphs)
    def next_step_is_plain(self) -> bool:
        """Whether the next :meth:`decode_step` appends in place and runs no upkeep (decided on the host, no
        sync): such a step launches the same work on the same buffers every time, so a captured graph can replay it.
        """
        if self.target is None or self.awaiting_reconstruction or not self.store.appends_in_place:
            return False
        self._count_decoded()
        try:
            return not self.needs_upkeep()
        finally:
            self._decoded -= 1
            self._excess -= 1

    def plain_steps_ahead(self) -> int:
        """How many of the next decode steps are surely plain (:meth:`next_step_is_plain` for each in turn), from
        host counts: the steps before a row would fill the storage, pass its target + slack, or outgrow the storage.
        Exact for a fixed target; a lower bound while the target grows (``decode_budget="all"``), whose growth only
        delays the upkeep."""
        if self.target is None or self.awaiting_reconstruction or self.store.k is None:
            return 0
        cfg, st = self.cfg, self.store
        room = st.capacity - st.max_length  # appends in place
        if cfg.is_full or cfg.decode_budget == "prompt":
            return max(room, 0)
        # step k is plain while both margins, k tokens on, stay >= 0: k <= each margin now (the budget's growth
        # over those k steps only adds to the first)
        return max(0, min(room, *self._upkeep_margins()))

    def count_replayed_step(self) -> None:
        """The host's side of one decode step whose device work a replayed graph did (the counters
        :meth:`decode_step` advances; call it only for a step :meth:`next_step_is_plain` allowed)."""
        self.store.count_appended()
        self._count_decoded()

    def host_counters(self) -> tuple[int, ...]:
        """The host-side counters a decode step advances, to restore after a capture (which runs the step's host
        code but not its device work)."""
        st = self.store
        return st._min_length, st._max_length, st.seen, self._decoded, self._excess

    def restore_host_counters(self, counters: tuple[int, ...]) -> None:
        """Undo a capture's host side: set the counters :meth:`host_counters` returned at an earlier point of the
        same decode (so the steps counted plain ahead of a later point stay plain)."""
        st = self.store
        st._min_length, st._max_length, st.seen, self._decoded, self._excess = counters

    def select_rows(self, index) -> None:
        """Keep the batch rows ``index`` (beam reordering, batch expansion or selection): storage, targets, prompt
        counts and padding marks move together (see :meth:`LayerKVCache.select_rows`)."""
        index = self.store.select_rows(index)  # the checked row ids; None: an empty cache, nothing to move
        if index is None:
            return
        if self.target is not None:
            index = index.to(self.target.device)
            self.target = self.target.index_select(0, index)
            self.prompt_tokens = self.prompt_tokens.index_select(0, index)
        if self._valid is not None:
            self._valid = self._valid.index_select(0, index.to(self._valid.device))
        if self._broad is not None:
            self._broad = tuple(x.index_select(0, index.to(x.device)) for x in self._broad)
        self.last = None  # the latest plan described the old rows

    def _capacity_for(self, target_max: int, seen: int) -> int:
        """Slots per row for rows of at most ``target_max`` tokens once ``seen`` prompt and decoded tokens count in
        the budget: the largest target, the slack, the token that triggers the upkeep and, with
        ``decode_budget="all"``, the budget's growth over the next ``cfg.decode_ahead`` decoded tokens (the store
        rounds it up to its alignment)."""
        cfg = self.cfg
        growth = 0
        if cfg.decode_budget == "all" and cfg.decode_ahead:
            growth = budget_tokens(cfg, seen + cfg.decode_ahead, self.layer, self.num_layers) - \
                budget_tokens(cfg, seen, self.layer, self.num_layers)
        return target_max + growth + cfg.slack + 1

    def _grown_target_max(self) -> int:
        """``decode_budget="all"``: the host's bound on every row's target counting the tokens decoded since."""
        return budget_tokens(self.cfg, self._prompt_max + self._decoded, self.layer, self.num_layers)

    def needs_upkeep(self) -> bool:
        """True when some row holds more than its budget plus ``cfg.slack`` tokens (decided on the host, no sync).

        Never with ``decode_budget="prompt"``: decoded tokens are kept until the next prefill counts them. With
        ``"all"`` the budget grows with the tokens decoded, so the excess over it grows by ``1 - budget`` a token.
        """
        cfg = self.cfg
        if self.target is None or cfg.is_full or cfg.decode_budget == "prompt":
            return False
        return min(self._upkeep_margins()) < 0

    def _upkeep_margins(self) -> tuple[int, int]:
        """``(due, outgrown)`` from host counts: how far the excess over the budget is from passing the slack, and
        how far the longest row is from outgrowing the storage (Ada-KV's longest head, a growing budget), each in
        decoded tokens; an upkeep is due when either is negative."""
        cfg = self.cfg
        grown = self._grown_target_max() - self._target_max if cfg.decode_budget == "all" else 0
        return cfg.slack - self._excess + grown, self.store.capacity - self._longest - self._excess - 1

    def compress(self, *, upkeep: bool = False) -> None:
        """Run the policy on the stored tokens and apply its plan (nothing to do at budget 1.0 / method full).

        ``upkeep=True`` compacts in place (the storage keeps its capacity and addresses); after a prefill the
        storage is sized to ``max(target) + slack + 1`` slots. With adaptive head budgets (Ada-KV) the rows of a
        layer get different lengths: a prefill reads the longest row back (one sync) to size the storage, and an
        upkeep caps every row at the room the storage has (nothing read back). The kernel backend runs the fused
        policy (AccKV with adaptive head budgets: the torch policy), the torch backend ``policy.plan_layer``.
        (:meth:`prefill`'s own compression also ranks the rows :meth:`prompt_attention` / :meth:`prompt_evidence`
        found broad, ``cfg.broad_threshold``, by their last query's head-shared attention.)
        """
        self._compress(upkeep=upkeep)

    def _compress(self, *, upkeep: bool = False, broad: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """:meth:`compress`; ``broad``: a first prompt's broad-row stash (``(broad [B], shared [B, T])``, T the
        stored width), whose broad rows rank by ``shared``."""
        st = self.store
        cfg = self.policy_cfg
        if cfg.is_full or st.k is None:
            return
        if upkeep and cfg.decode_budget == "all":  # the budget of every token seen so far
            self._target_max = self._grown_target_max()
            if self._padded:  # per-row prompts: per-row targets, on the device
                self.target = budget_tokens(cfg, self.prompt_tokens + self._decoded, self.layer, self.num_layers)
            else:  # every row saw the same tokens: the host's target is each row's (one fill, in place)
                self.target.fill_(self._target_max)
        w = st.max_length
        scores = st.token_mass[:, :, :w]
        if cfg.score_evidence == "mean":  # every query from a token on adds to its mass: rank by the mean per query
            scores = scores / query_weight_sum((st.seen - st.position[:, :, :w]).clamp_(min=1), cfg.mean_decay)
        if cfg.ranks_by_value:  # evidence x ||v||: a token that is attended but adds little to the output ranks lower
            scores = scores * torch.linalg.vector_norm(st.v[:, :, :w], dim=-1, dtype=torch.float32)  # (no fp32 copy)
        if broad is not None and cfg.score_evidence == "mean":
            # cfg.broad_threshold: a broad row's first compression ranks by its last query's head-shared attention
            scores = torch.where(broad[0][:, None, None], broad[1][:, None, :w], scores)
        x = LayerTokens(
            scores=scores, modality=st.modality[:, :, :w], lengths=st.lengths,
            time=st.time[:, :, :w], keys=st.k[:, :, :w], spatial=st.spatial[:, :, :w],
            valid=None if self._valid is None else self._valid[..., :w],
            position=st.position[:, :, :w], window_range=self.window,
        )
        room = st.capacity  # an upkeep compacts in place; it grows the storage only when the budget outgrows it
        seen = self._prompt_max + self._decoded
        if upkeep and cfg.decode_budget == "all" and self._target_max + cfg.slack + 1 > room:
            room = _round_up(self._capacity_for(self._target_max, seen), st.align)
        adaptive = cfg.adaptive_heads
        cap = room - cfg.slack - 1 if upkeep else w  # Ada-KV's rows keep at most the storage's room (an upkeep)
        if st.uses_kernels and fused_policy.supports(cfg):  # a few launches, sizes from the host's bounds
            self.last = plan_layer_fused(cfg, x, self.layer, self.num_layers, target=self.target,
                                         max_keep=cap if adaptive else self._target_max)
        else:  # the ids were checked as they were appended
            self.last = plan_layer(cfg, x, self.layer, self.num_layers, target=self.target,
                                   max_per_row=cap if adaptive and upkeep else None, check=False)
        if not adaptive:
            longest = self._target_max
        elif upkeep:
            longest = cap
        else:  # adaptive rows after a prefill: the longest is read back to size the storage (the one sync)
            longest = int(self.last.plan.keep_lengths.max())
        self._longest = min(longest, w)
        capacity = room if upkeep else self._capacity_for(longest, seen)
        st.compress(self.last.plan, check_plan=False, capacity=capacity, length_bounds=(0, self._longest))
        if cfg.score_evidence == "last" and cfg.method == "tova":
            st.token_mass.zero_()  # TOVA ranks by the latest queries only: the next upkeep sees the steps since
        self._excess = 0  # every row now holds at most its target
        self._valid = None
        self.compressions += 1

    def decode_attention(self, q: torch.Tensor, *, scale: float | None = None) -> DecodeAttentionOutput:
        """Attend over the stored tokens and accumulate their decode mass (see :meth:`LayerKVCache.decode_attention`).

        Returns fresh tensors; :meth:`decode_step` is the allocation-free path.
        """
        return self.store.decode_attention(q, scale=scale, accumulate_mass=self.reads_mass,
                                           decay=self.policy_cfg.mean_decay)
