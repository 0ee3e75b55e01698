"""The ``backend="torch"`` ops: vectorised PyTorch versions of the kernels, for caches that live on a CPU.

The kernels run on a CPU only through Triton's interpreter, which is far too slow for a real model, and
:mod:`acckv_triton.reference` is the float64 specification (a Python loop over rows, dense membership matrices).
These functions keep the kernels' contracts (same arguments, same in-place effects) with batched tensor code, and
run the same argument checks: each calls its launcher's own validator (``check_args`` / ``check_plan_args`` /
``validate_plan`` in :mod:`acckv_triton.ops`) without the launcher's kernel-device check, so a bad argument raises
the launcher's TypeError / ValueError naming it. Checks that read device values (``key_start`` in range, a
compaction plan's values) run where the launcher runs them, with the same opt-out (``check_plan``); the decode
path's (``TorchDecodePlan.run``, ``append_token_(check=False)``) stay host-only:

* :class:`TorchDecodePlan` is the CPU twin of :class:`~acckv_triton.ops.decode_attention.DecodeAttentionPlan`:
  bound once to a cache, it runs a decode step with preallocated buffers (``out=`` variants and in-place ops), so
  a step allocates nothing and never synchronises. Logits and the softmax are float32 (16-bit caches: K is
  upcast into a float32 scratch each step); the P.V product runs in the cache dtype.
* :func:`append_token_` writes a decode token and its metadata at each row's length with in-place scatters.
* :func:`compact_kv_` applies a compaction plan in place with gathers and ``scatter_add`` over all rows at once;
  its scratch is bounded by the kept part of the cache (float32), never by ``kept x length``.
* :func:`window_scores` computes the observation-window scores in float32 without repeating K per query head.
* :func:`observed_attention` runs a prompt's causal attention and the mass every key receives from all of it, in
  float32 query blocks (the CPU prefill of H2O-style evidence).

Tests compare each against :mod:`acckv_triton.reference` (tests/test_torch_ops.py).
"""
from __future__ import annotations

import math

import torch

from . import reference
from .modality import NUM_MODALITIES
from .ops._common import check_stored_values, check_tensor
from .ops.append_token import check_args as check_append_args
from .ops.chunk_attention import check_args as check_chunk_args
from .ops.compact_kv import validate_plan
from .ops.decode_attention import check_plan_args, check_query
from .ops.observed_attention import check_args as check_observed_args
from .ops.window_scores import check_args as check_window_args
from .reference import DecodeAttentionOutput, WindowScores

__all__ = ["TorchDecodePlan", "append_token_", "chunk_attention", "compact_kv_", "observed_attention", "window_scores"]


class TorchDecodePlan:
    """A decode-attention step over a bound ``[B, Hkv, C, D]`` cache, allocation-free and sync-free (CPU backend).

    Args:
        k_cache, v_cache: ``[B, Hkv, C, D]`` float16, bfloat16 or float32 (contiguous). Slots past each row's
            length must hold finite values (the cache allocates its storage zeroed): they are masked by a
            ``-inf`` bias, and a probability of 0 times a NaN would still be NaN.
        lengths: ``[B, Hkv]`` int32, read at every run.
        num_q_heads: Hq, a multiple of Hkv.
        scale: softmax scale, default ``D ** -0.5``.
        token_mass: optional ``[B, Hkv, C]`` float32: ``token_mass[b, h, t] += sum_g p[b, h*G + g, t]`` per run
            (slots past the length get + 0); see ``decay``.
        multiplicity: optional ``[B, Hkv, C]`` float32 > 0: slot t weighs ``multiplicity[t]`` (proportional
            attention).
        decay: a float in (0, 1]: ``token_mass[b, h, t] = decay * token_mass[b, h, t] + sum_g p`` for ``t <
            lengths`` (slots past the length keep their value).
        modality: optional ``[B, Hkv, C]`` uint8 ids; with it, ``modality_mass`` is returned too (that part
            allocates: it is for analysis, not for the decode loop).
        fresh_tail: the owner guarantees that every slot past a row's length has multiplicity 0 and token mass 0
            (the cache's torch storage keeps them so): ``log(multiplicity)`` is then the whole bias (-inf past the
            length) and the decayed mass needs no row mask, two ops fewer per run. Needs ``multiplicity``.

    The constructor runs :class:`~acckv_triton.ops.decode_attention.DecodeAttentionPlan`'s checks
    (:func:`~acckv_triton.ops.decode_attention.check_plan_args`, host only); like it, it reads no value, so
    ``lengths`` outside ``[0, C]`` act as clamped (a row past C attends over all C slots, a negative one over none).

    :meth:`run` returns ``DecodeAttentionOutput(out [B, Hq, D], lse [B, Hq], modality_mass)`` in the plan's own
    buffers, rewritten by every run.
    """

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *, num_q_heads: int,
                 scale: float | None = None, token_mass: torch.Tensor | None = None,
                 multiplicity: torch.Tensor | None = None, modality: torch.Tensor | None = None, decay: float = 1.0,
                 fresh_tail: bool = False):
        scale, decay = check_plan_args(k_cache, v_cache, lengths, num_q_heads=num_q_heads, scale=scale,
                                       modality=modality, token_mass=token_mass, multiplicity=multiplicity, decay=decay,
                                       kernel_device=False)
        B, Hkv, C, D = k_cache.shape
        if fresh_tail and multiplicity is None:
            raise ValueError("fresh_tail=True needs multiplicity (its zeros past each row's length are the mask)")
        self.fresh_tail = bool(fresh_tail)
        G = num_q_heads // Hkv
        dtype, dev = k_cache.dtype, k_cache.device
        self.k, self.v, self.lengths = k_cache, v_cache, lengths
        self.token_mass, self.multiplicity, self.modality = token_mass, multiplicity, modality
        self.scale, self.decay = scale, decay
        self.shape = (B, num_q_heads, Hkv, C, D)
        self.dtype, self.device = dtype, dev
        f32 = dict(dtype=torch.float32, device=dev)
        wide = dtype == torch.float32
        # 16-bit caches: logits from a float32 copy of K (a 16-bit product would round them to 8 or 11 bits, as the
        # kernels' tensor-core dot does not), probabilities back in the cache dtype for the P.V product
        BH = B * Hkv
        # the products run over B*Hkv rows: a K whose (B, Hkv) dims do not merge into one is copied like a 16-bit one
        self._k32 = None if wide and _merges_rows(k_cache) else torch.empty(B, Hkv, C, D, **f32)
        self._k3 = (k_cache if self._k32 is None else self._k32).view(BH, C, D)
        self._q = None if wide else torch.empty(BH, G, D, **f32)
        self._p = torch.empty(B, Hkv, G, C, **f32)
        self._p_cast = self._p if wide else torch.empty(B, Hkv, G, C, dtype=dtype, device=dev)
        self._bias = torch.empty(B, Hkv, C, **f32)
        if not self.fresh_tail:  # the row mask from the lengths
            self._arange = torch.arange(C, dtype=torch.int32, device=dev)
            self._in_row = torch.empty(B, Hkv, C, dtype=torch.bool, device=dev)
            self._log_mult = torch.zeros(B, Hkv, C, **f32)
            self._neg_inf = torch.full((), -math.inf, **f32)
        self._max = torch.empty(B, Hkv, G, 1, **f32)
        self._sum = torch.empty(B, Hkv, G, 1, **f32)
        self._ones = torch.ones(BH, 1, G, **f32)  # sums p over a GQA group as a product
        self._mass3 = token_mass.view(BH, 1, C) if token_mass is not None and _merges_rows(token_mass) else None
        self._kept = None  # with decay: decay inside each row, 1 past it (slots past a length keep their mass)
        if self.decay != 1.0 and not self.fresh_tail:
            self._kept = torch.empty(B, Hkv, C, **f32)
            self._decay_or_one = (torch.full((), self.decay, **f32), torch.ones((), **f32))
        if token_mass is not None and (self._kept is not None or self._mass3 is None):
            self._mass = torch.empty(B, Hkv, C, **f32)
        self._out = torch.empty(B, Hkv, G, D, dtype=dtype, device=dev)
        self.out = self._out.view(B, num_q_heads, D)
        self.lse = torch.empty(B, num_q_heads, **f32)

    def run(self, q: torch.Tensor, *, check: bool = True) -> DecodeAttentionOutput:
        """Attention of ``q [B, Hq, D]`` over the bound cache; accumulates token mass if the plan has it.
        ``check=False`` skips the host check of ``q``, as the kernel plan's ``run`` does.

        Inference only, like the kernels: the result carries no autograd history.
        """
        if check:
            check_query(q, self.shape, self.dtype, self.device)  # the kernel plan's host check: no torch op, no sync
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._run(q)
        return self._run(q)

    def _run(self, q: torch.Tensor) -> DecodeAttentionOutput:
        B, Hq, Hkv, C, D = self.shape
        G, BH = Hq // Hkv, B * Hkv
        q = q.reshape(BH, G, D)  # a view for any q whose last dim is contiguous and rows merge (the cache's)
        if self._k32 is not None:  # 16-bit: float32 logits (or a K laid out so its rows do not merge)
            self._k32.copy_(self.k)
        if self._q is not None:
            q = self._q.copy_(q)
        # bias: log(multiplicity) inside each row, -inf past its length
        if self.fresh_tail:  # multiplicity 0 past the length: its log is the whole bias
            torch.log(self.multiplicity, out=self._bias)
        else:
            torch.lt(self._arange, self.lengths.unsqueeze(-1), out=self._in_row)
            if self.multiplicity is not None:
                torch.log(self.multiplicity, out=self._log_mult)
            torch.where(self._in_row, self._log_mult, self._neg_inf, out=self._bias)
        p = self._p
        # logits = bias + scale * q k^T in one product
        torch.baddbmm(self._bias.view(BH, 1, C), q, self._k3.transpose(1, 2), alpha=self.scale, out=p.view(BH, G, C))
        torch.amax(p, dim=-1, keepdim=True, out=self._max)
        self._max.clamp_(min=torch.finfo(torch.float32).min)  # an empty row: exp(-inf - finite) = 0, not NaN
        p.sub_(self._max).exp_()
        torch.sum(p, dim=-1, keepdim=True, out=self._sum)
        torch.log(self._sum, out=self.lse.view(B, Hkv, G, 1)).add_(self._max)
        p.div_(self._sum.clamp_(min=torch.finfo(torch.float32).tiny))
        if self.token_mass is not None:
            if self._kept is None and self._mass3 is not None:  # decay * token_mass + the group's sum of p, in one
                # product (over a fresh tail or without decay, slots past a length stay: 0 * decay + 0, or + 0)
                self._mass3.baddbmm_(self._ones, p.view(BH, G, C), beta=self.decay)
            elif self._kept is None:  # (a token_mass whose rows do not merge: the sum, then the update)
                torch.sum(p, dim=2, out=self._mass)
                self.token_mass.mul_(self.decay).add_(self._mass)
            else:  # token_mass = decay * token_mass + mass inside each row
                torch.sum(p, dim=2, out=self._mass)
                torch.where(self._in_row, *self._decay_or_one, out=self._kept)
                torch.addcmul(self._mass, self.token_mass, self._kept, out=self.token_mass)
        p_cast = self._p_cast
        if p_cast is not p:
            p_cast.copy_(p)
        torch.matmul(p_cast, self.v, out=self._out)
        modality_mass = None
        if self.modality is not None:
            ids = torch.nn.functional.one_hot(self.modality.long().clamp(0, NUM_MODALITIES - 1), NUM_MODALITIES)
            modality_mass = torch.einsum("bhgc,bhcm->bhgm", p, ids.float()).reshape(B, Hq, NUM_MODALITIES)
        return DecodeAttentionOutput(self.out, self.lse, modality_mass)


def _merges_rows(x: torch.Tensor) -> bool:
    """Whether ``x [B, Hkv, ...]`` views as ``[B*Hkv, ...]`` (its batch and head dims merge into one)."""
    return x.shape[0] == 1 or x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


def append_token_(k_cache, v_cache, lengths, k_new, v_new, *, position, next_position, modality, time, spatial,
                  token_mass, multiplicity, modality_new=None, time_new=None, spatial_new=None,
                  index: torch.Tensor | None = None, fresh_tail: bool = False, check: bool = True) -> None:
    """The contract of :func:`acckv_triton.reference.append_token_` with in-place scatters only.

    ``index``: optional ``[B, Hkv, 1]`` int64 scratch for the slot index; with it the call allocates nothing. The
    caller guarantees room (``lengths < C``), as the cache does by growing its storage first. ``fresh_tail``: the
    caller guarantees that the slot already holds a fresh token's modality (0), spatial (-1, -1) and token mass
    (0), as the cache's torch storage keeps every slot past a row's length; those three writes are skipped
    (modality and spatial still written when given). ``check``: run the launcher's checks
    (:func:`acckv_triton.ops.append_token.check_args`, host only) and ``index``'s; the cache, which owns the
    buffers and checks the new token itself, passes False (its decode step).
    """
    if check:
        check_append_args(k_cache, v_cache, lengths, k_new, v_new, position, next_position, modality, time, spatial,
                          token_mass, multiplicity, modality_new, time_new, spatial_new, kernel_device=False)
        if index is not None:
            B, Hkv = k_cache.shape[:2]
            check_tensor("index", index, shape=(B, Hkv, 1), what="[B, Hkv, 1]", dtypes=(torch.int64,),
                         device=k_cache.device, like="k_cache")
    B, Hkv, _, D = k_cache.shape
    slot = index.copy_(lengths.unsqueeze(-1)) if index is not None else lengths.long().unsqueeze(-1)
    pair = slot.unsqueeze(-1).expand(B, Hkv, 1, 2)
    rows = slot.unsqueeze(-1).expand(B, Hkv, 1, D)
    k_cache.scatter_(2, rows, k_new)
    v_cache.scatter_(2, rows, v_new)
    position.scatter_(2, slot, next_position)
    if modality_new is not None:
        modality.scatter_(2, slot, modality_new)
    elif not fresh_tail:
        modality.scatter_(2, slot, 0)
    time.scatter_(2, slot, time_new if time_new is not None else next_position)
    if spatial_new is not None:
        spatial.scatter_(2, pair, spatial_new)
    elif not fresh_tail:
        spatial.scatter_(2, pair, -1)
    if not fresh_tail:
        token_mass.scatter_(2, slot, 0.0)
    multiplicity.scatter_(2, slot, 1.0)
    lengths.add_(1)
    next_position.add_(1)


def compact_kv_(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor,
                keep_lengths: torch.Tensor, *, merge_target: torch.Tensor | None = None,
                merge_weight: torch.Tensor | None = None, token_data=(), token_sums=(),
                check_plan: bool = True) -> None:
    """Apply a compaction plan in place, all rows at once (the contract of :func:`acckv_triton.reference.compact_kv_`).

    Args:
        k_cache, v_cache: ``[B, Hkv, C, D]`` float16, bfloat16 or float32, last dim contiguous; updated in place.
        lengths: ``[B, Hkv]`` int32, set to ``keep_lengths``.
        keep: ``[B, Hkv, K]`` int32, ``K <= C``, ``keep[b, h, :keep_lengths[b, h]]`` strictly increasing kept indices.
        keep_lengths: ``[B, Hkv]`` int32.
        merge_target: optional ``[B, Hkv, C]`` int32: the slot an evicted token merges into, or -1.
        merge_weight: ``[B, Hkv, C]`` float32, > 0 at kept and merged tokens; required with ``merge_target``.
        token_data: ``[B, Hkv, C]`` tensors gathered from the kept token.
        token_sums: ``[B, Hkv, C]`` float tensors summed over each merge set (in float64, then cast).
        check_plan: as in the launcher, also verify every value of the plan (one host sync); False for plans valid
            by construction.

    Runs the launcher's checks first (:func:`acckv_triton.ops.compact_kv.validate_plan`: shapes, dtypes, devices,
    shared memory and, with ``check_plan``, the plan's values), before anything is written. Slots at or past the
    new lengths keep their old values. Scratch: ``[B, Hkv, K + 1, D]`` float32 per tensor with merges.
    """
    token_data, token_sums = validate_plan(k_cache, v_cache, lengths, keep, keep_lengths, merge_target=merge_target,
                                           merge_weight=merge_weight, token_data=token_data, token_sums=token_sums,
                                           check_plan=check_plan)
    B, Hkv, C, D = k_cache.shape
    K = keep.shape[-1]
    dev = k_cache.device
    if merge_target is not None and dev.type == "cpu" and not bool((merge_target >= 0).any()):
        merge_target = None  # nothing merges (a text plan): the gathers alone, read for free on a CPU
    ar = torch.arange(K, device=dev)
    slot_ok = ar < keep_lengths.long()[..., None]  # [B, Hkv, K]: slot j is kept
    # the old slot each new slot copies; one past its row's new length copies itself, so it keeps its old value
    # and every write is a plain copy
    src = torch.where(slot_ok, keep.long(), ar).clamp(0, max(C - 1, 0))
    slot = dest = None
    if merge_target is not None:
        # slot[t]: the slot old token t lands in (-1: dropped); a spare column W takes the unused slots' writes
        W = merge_target.shape[-1]
        in_row = torch.arange(W, device=dev) < lengths.long()[..., None]
        slot = torch.full((B, Hkv, W + 1), -1, dtype=torch.long, device=dev)
        slot[..., :W] = torch.where(in_row, merge_target.long(), -1)
        slot.scatter_(2, torch.where(slot_ok, src, W), ar.expand(B, Hkv, K))
        slot = slot[..., :W]
        dest = torch.where(slot >= 0, slot, K)  # K: a spare slot that collects the dropped tokens
        w = torch.where(slot >= 0, merge_weight.float(), 0.0)
        den = torch.zeros(B, Hkv, K + 1, device=dev).scatter_add_(2, dest, w)[..., :K, None]
        count = torch.zeros(B, Hkv, K + 1, device=dev).scatter_add_(2, dest, (slot >= 0).float())[..., :K, None]
        merged = slot_ok[..., None] & (count > 1)  # singletons are gathered, bit-exact
    flat_index = {}  # the storage-row index of src, built once per layout
    for cache in (k_cache, v_cache):
        new = _gather_slots(cache, src, flat_index)
        if slot is not None:
            num = torch.zeros(B, Hkv, K + 1, D, device=dev)
            num.scatter_add_(2, dest[..., None].expand(B, Hkv, W, D), cache[:, :, :W].float() * w[..., None])
            mean = num[:, :, :K] / den.clamp(min=torch.finfo(torch.float32).tiny)
            new = torch.where(merged, mean.to(cache.dtype), new)
        cache[:, :, :K] = new
    for x in token_data:
        x[:, :, :K] = _gather_slots(x, src, flat_index)
    for x in token_sums:
        if slot is None:
            x[:, :, :K] = _gather_slots(x, src, flat_index)
        else:
            summed = torch.zeros(B, Hkv, K + 1, dtype=torch.float64, device=dev).scatter_add_(
                2, dest, torch.where(slot >= 0, x[:, :, :W].double(), 0.0))[..., :K]
            x[:, :, :K] = torch.where(slot_ok, summed.to(x.dtype), x[:, :, :K])
    lengths.copy_(keep_lengths)


def _gather_slots(x: torch.Tensor, index: torch.Tensor, flat_index: dict | None = None) -> torch.Tensor:
    """``x[b, h, index[b, h, j]]`` for ``x [B, Hkv, C, ...]`` and ``index [B, Hkv, K]`` -> ``[B, Hkv, K, ...]`` (a copy).

    Each slot's trailing values are contiguous in the caches' storage, so the slots are copied as whole rows of
    the storage by one ``index_select`` (about 10x faster than ``torch.gather`` over the trailing dim on a CPU);
    other layouts take the general gather. ``flat_index``: a dict shared by the calls of one compaction, which
    builds the storage-row index once per layout (the cache's K, V and metadata share two).
    """
    B, H, C = x.shape[:3]
    rest = x.shape[3:]
    inner = math.prod(rest)
    sB, sH, sC = x.stride()[:3]
    rows_contiguous = x.numel() > 0 and sC == inner and x[0, 0, 0].is_contiguous()
    if not rows_contiguous or sB % sC or sH % sC:
        trail = (1,) * len(rest)
        return torch.gather(x, 2, index.view(B, H, -1, *trail).expand(B, H, index.shape[-1], *rest))
    span = (B - 1) * (sB // sC) + (H - 1) * (sH // sC) + C  # storage rows from x's first slot to its last
    base = x.as_strided((span, inner), (sC, 1))
    layout = (sB // sC, sH // sC)
    flat = None if flat_index is None else flat_index.get(layout)
    if flat is None:
        row = (torch.arange(B, device=x.device) * layout[0])[:, None] + torch.arange(H, device=x.device) * layout[1]
        flat = (row[..., None] + index).reshape(-1)
        if flat_index is not None:
            flat_index[layout] = flat
    return base.index_select(0, flat).view(B, H, index.shape[-1], *rest)


def window_scores(q_window: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                  key_start: torch.Tensor | None = None) -> WindowScores:
    """Observation-window scores in float32 (the contract of :func:`acckv_triton.reference.window_scores`).

    Args:
        q_window: ``[B, Hq, W, D]`` float16, bfloat16 or float32, last dim contiguous; window query i sits at
            position ``N - W + i``.
        k: ``[B, Hkv, N, D]`` in q_window's dtype, last dim contiguous, ``1 <= W <= N``, ``Hq % Hkv == 0``.
        scale: softmax scale, default ``D ** -0.5``.
        key_start: optional ``[B]`` int32 or int64 in ``[0, N]``, keys before it are left padding (read on the host to check
            the range, as the launcher does).

    Returns:
        ``WindowScores(scores [B, Hkv, N] float32, None)``. Memory: ``[B, Hkv, G*W, N]`` float32 logits.

    Raises:
        The launcher's TypeError / ValueError naming the argument
        (:func:`acckv_triton.ops.window_scores.check_args`).
    """
    scale = check_window_args(q_window, k, scale=scale, key_start=key_start, kernel_device=False)
    B, Hq, W, D = q_window.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # float32 logits [B, Hkv, G*W, N], then an in-place softmax: only the last W keys need the causal mask
    q = (q_window.float() * scale).reshape(B, Hkv, G * W, D)
    logits = torch.matmul(q, k.float().transpose(-1, -2)) if k.dtype != torch.float32 else \
        torch.matmul(q, k.transpose(-1, -2))
    view = logits.view(B, Hkv, G, W, N)
    w0 = max(N - W, 0)
    t = torch.arange(w0, N, device=k.device)
    query_pos = N - W + torch.arange(W, device=k.device)
    view[..., w0:].masked_fill_(t[None, :] > query_pos[:, None], -math.inf)
    if key_start is not None:
        before = torch.arange(N, device=k.device) < key_start.long()[:, None]  # [B, N]: left padding
        view.masked_fill_(before[:, None, None, None, :], -math.inf)
    top = logits.amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).min)  # rows that see no key: 0
    logits.sub_(top).exp_()
    logits.div_(logits.sum(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny))
    return WindowScores(view.sum(dim=(2, 3)), None)


def chunk_attention(q, k_cache, v_cache, lengths, k_new, v_new, *, scale=None, multiplicity=None, key_valid=None,
                    window: int = 32, reduce: str = "sum", decay: float = 1.0, block: int = 256,
                    check_lengths: bool = True) -> reference.ChunkAttention:
    """:func:`acckv_triton.ops.chunk_attention.chunk_attention` on any device: float32 math, query rows in blocks of
    ``block``, so the logits never exceed ``[B, Hq, block, S + T]``. The launcher's checks run first
    (:func:`acckv_triton.ops.chunk_attention.check_args`, host only, and with ``check_lengths`` its value checks;
    without them, like the kernels, ``lengths`` outside ``[0, S]`` act as clamped)."""
    scale, _ = check_chunk_args(q, k_cache, v_cache, lengths, k_new, v_new, scale=scale, multiplicity=multiplicity,
                                key_valid=key_valid, window=window, reduce=reduce, decay=decay, kernel_device=False)
    if check_lengths and lengths.numel():
        check_stored_values(lengths, k_cache.shape[2], None, multiplicity)
    if isinstance(block, bool) or not (isinstance(block, int) and block >= 1):
        raise ValueError(f"block must be a positive int, got {block!r}")
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    qf = q.float().view(B, Hkv, G, T, D)
    stored = torch.arange(S, device=q.device) < lengths.long()[..., None]  # [B, Hkv, S]
    new_ok = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    k_old = torch.where(stored[..., None], k_cache.float(), 0.0)  # leftover memory (maybe NaN): zeroed, never added
    v_old = torch.where(stored[..., None], v_cache.float(), 0.0)
    k_n = torch.where(new_ok[:, None, :, None], k_new.float(), 0.0)
    v_n = torch.where(new_ok[:, None, :, None], v_new.float(), 0.0)
    bias = torch.zeros(B, Hkv, S, device=q.device)
    if multiplicity is not None:  # a merged slot weighs as many tokens as it holds: + log n on its logit
        bias = torch.where(stored, multiplicity.float(), 1.0).log()
    bias = bias.masked_fill(~stored, float("-inf"))[:, :, None, None, :]
    W = min(window, T)
    out = torch.empty(B, Hkv, G, T, D, device=q.device)
    lse = torch.empty(B, Hkv, G, T, device=q.device)
    old_mass = torch.zeros(B, Hkv, S, device=q.device)
    new_mass = torch.zeros(B, Hkv, T, device=q.device)
    weights = reference.query_weights(T, decay, q.device).float() if reduce == "sum" and decay != 1.0 else None
    for t0 in range(0, T, block):
        t1 = min(t0 + block, T)
        qb = qf[:, :, :, t0:t1]
        l_old = torch.einsum("bhgtd,bhsd->bhgts", qb, k_old) * scale + bias
        visible = torch.arange(t1, device=q.device)[None, :] <= torch.arange(t0, t1, device=q.device)[:, None]
        visible = visible & new_ok[:, None, None, None, :t1]
        l_new = (torch.einsum("bhgtd,bhud->bhgtu", qb, k_n[:, :, :t1]) * scale).masked_fill(~visible, float("-inf"))
        logits = torch.cat([l_old, l_new], dim=-1)
        row_lse = torch.logsumexp(logits, dim=-1)
        p = torch.where(torch.isfinite(row_lse)[..., None], torch.exp(logits - row_lse[..., None]), 0.0)
        p_old, p_new = p[..., :S], p[..., S:]
        out[:, :, :, t0:t1] = torch.einsum("bhgts,bhsd->bhgtd", p_old, v_old) \
            + torch.einsum("bhgtu,bhud->bhgtd", p_new, v_n[:, :, :t1])
        lse[:, :, :, t0:t1] = row_lse
        w0 = max(T - W, t0) - t0  # the observation window's rows inside this block
        if w0 < t1 - t0 and reduce == "max":
            torch.maximum(old_mass, p_old[..., w0:, :].amax(dim=(2, 3)), out=old_mass)
            new_mass[..., :t1] = torch.maximum(new_mass[..., :t1], p_new[..., w0:, :].amax(dim=(2, 3)))
        elif w0 < t1 - t0:
            if weights is not None:  # query i weighs decay^(T - 1 - i)
                w = weights[t0 + w0:t1, None]
                p_old, p_new = p_old[..., w0:, :] * w, p_new[..., w0:, :] * w
            else:
                p_old, p_new = p_old[..., w0:, :], p_new[..., w0:, :]
            old_mass += p_old.sum(dim=(2, 3))
            new_mass[..., :t1].add_(p_new.sum(dim=(2, 3)))  # (add_: `slice +=` copies the slice onto itself)
    return reference.ChunkAttention(out.view(B, Hq, T, D).to(q.dtype), lse.view(B, Hq, T), old_mass, new_mass)


def observed_attention(q, k, v=None, *, scale=None, key_start=None, decay: float = 1.0, block: int = 32,
                       return_lse: bool = True, out: torch.Tensor | None = None) -> reference.ObservedAttention:
    """:func:`acckv_triton.ops.observed_attention.observed_attention` on any device: float32 math, query rows in
    blocks of ``block`` positions, so the logits never exceed ``[B, Hq, block, T]``.

    The queries are scaled and laid out once as ``[B, Hkv, T*G, D]`` (row ``t*G + g``: a kv head's G query heads
    side by side per position, K never repeated) and K once as float32 ``[B, Hkv, D, T]``, so a block is a
    contiguous slice and one matmul of two row-major operands gives its logits over the keys up to its last
    position; then one fused ``softmax``, in place: the key mass is its sum over the rows, the output its product
    with V. The causal mask of a block's own keys is built once. Rows below every sequence's
    ``key_start`` are skipped (two host reads: ``key_start.min()`` and ``.max()``, the launcher's range check).
    ``return_lse=False`` skips the logsumexp (a pass over the logits; the prompt paths never read it) and returns
    ``lse`` None. With ``decay`` < 1 query i weighs ``decay ** (T - 1 - i)`` in the key mass (its rows of a block
    summed with those weights). ``out``: an optional ``[B, Hq, T, D]`` tensor of q's dtype (with ``v``), last dim
    contiguous, any other strides (a transpose of transformers' ``[B, T, Hq, D]``), that receives the output in one
    strided copy and is returned as it. The launcher's checks run first
    (:func:`acckv_triton.ops.observed_attention.check_args`, whose read of key_start's min and max the row skipping
    reuses).
    """
    scale, decay, bounds = check_observed_args(q, k, v, scale=scale, key_start=key_start, out=out, decay=decay,
                                               kernel_device=False)
    if isinstance(block, bool) or not (isinstance(block, int) and block >= 1):
        raise ValueError(f"block must be a positive int, got {block!r}")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dev = q.device
    if bounds is None:  # no key_start, or it was not read (B = 0, a CUDA graph capture): every row, NaN rows zeroed
        first, ragged = 0, key_start is not None
    else:  # rows before key_start's min see nothing; ragged: some rows see no key, where softmax gives NaN
        first, ragged = bounds[0], bounds[1] > bounds[0]
    qs = torch.empty(B, Hkv, T, G, D, device=dev)  # row t*G + g of [B, Hkv, T*G, D]
    qs.copy_(q.view(B, Hkv, G, T, D).transpose(2, 3)).mul_(scale)
    qs = qs.view(B, Hkv, T * G, D)
    # Kᵀ laid out once as [B, Hkv, D, T] (float32): every block's QK product then reads a plain row-major operand,
    # which MKL multiplies ~1.35x faster than K's transposed view (benchmarks/NOTES.md). A padding key's logits
    # are overwritten with -inf below, whatever it holds.
    kt = torch.empty(B, Hkv, D, T, device=dev)
    kt.copy_(k.transpose(-1, -2))
    pad = None
    if key_start is not None:
        pad = (torch.arange(T, device=dev)[None, :] < key_start.long()[:, None])[:, None, None, :]  # [B, 1, 1, T]
    vf = None
    if v is not None:
        vf = v.float()
        if pad is not None:  # padding values may be NaN: zero them, never multiply them by 0
            vf = vf.masked_fill(pad.transpose(-1, -2), 0.0)
    lse = torch.full((B, Hkv, T * G), -math.inf, device=dev) if return_lse else None
    key_mass = torch.zeros(B, Hkv, T, device=dev)
    acc = (torch.zeros if first else torch.empty)(B, Hkv, T * G, D, device=dev) if v is not None else None
    steps = torch.arange(block, device=dev)
    causal = steps[None, :] > steps.repeat_interleave(G)[:, None]  # [block*G, block]: key after the row's position
    rows_w = reference.query_weights(T, decay, dev).float().repeat_interleave(G) if decay != 1.0 else None
    for t0 in range(first, T, block):
        t1 = min(t0 + block, T)
        n, r0, r1 = t1 - t0, t0 * G, t1 * G
        logits = torch.matmul(qs[:, :, r0:r1], kt[..., first:t1])  # [B, Hkv, n*G, t1 - first]
        logits[..., t0 - first:].masked_fill_(causal[:n * G, :n], -math.inf)
        if pad is not None:
            logits.masked_fill_(pad[..., first:t1], -math.inf)
        if return_lse:
            lse[:, :, r0:r1] = torch.logsumexp(logits, dim=-1)
        # in place: no fresh [B, Hkv, n*G, t1 - first] tensor a block (each output element is written after its own
        # input element is read, so the aliasing is safe)
        p = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
        if ragged:  # a padding query of a later-starting row sees no key: it adds nothing
            p = p.nan_to_num_(0.0)
        # (add_ on the slice: `slice += x` would copy the slice back onto itself)
        if rows_w is None:
            key_mass[:, :, first:t1].add_(p.sum(dim=-2))
        else:  # the block's n*G rows, each query weighing decay^(T - 1 - i)
            key_mass[:, :, first:t1].add_(torch.matmul(rows_w[r0:r1][None, None, None, :], p)[:, :, 0])
        if v is not None:
            torch.matmul(p, vf[:, :, first:t1], out=acc[:, :, r0:r1])  # straight into the rows: no copy
    if acc is not None:
        acc = acc.view(B, Hkv, T, G, D).transpose(2, 3)
        if out is None:
            out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=dev)
        out.view(B, Hkv, G, T, D).copy_(acc)
    if lse is not None:
        lse = lse.view(B, Hkv, T, G).transpose(2, 3).reshape(B, Hq, T)
    return reference.ObservedAttention(out, lse, key_mass)
