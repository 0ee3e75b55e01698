"""The audio-video fidelity suite: every method at equal budgets on the synthetic AV workload, through the kernels.

Per layer the prefill scores come from ``window_scores`` (computed once, shared by every method), the policy emits a
plan, ``compact_kv`` applies it out of place, and ``decode_attention`` (with multiplicity where the method weighs
merged slots) answers the workload's decode queries on the compressed cache. Rows report, averaged over layers:
    out err             relative L2 error of the decode attention output against the full cache (float64 reference)
    recall kept         share of the planted salient tokens kept in a slot of their own
    recall kept+merged  share of the planted salient tokens kept or merged into a kept slot
    mass kept           share of the full cache's decode attention mass that falls on kept tokens
    mass kept+merged    share of that mass that falls on kept or merged tokens
    KV kept %           bytes of K/V stored after compression relative to the full cache
    merged/head         tokens merged into a kept slot, per (sequence, kv head)
The kept+merged figures credit a merge as if it preserved the token; the kept figures do not, so a method that
merges everything (LOOK-M) shows its coverage as recall and mass kept, and what merging adds as the difference.

:func:`av_stress_rows` runs the same table on each of the workloads' stress variants
(:data:`acckv_triton.workloads.STRESS_VARIANTS`), one row per (variant, budget, method).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch

from .. import reference, tuning, workloads
from ..config import AccKVConfig
from ..ops import compact_kv, decode_attention, observed_attention, window_scores
from ..policy import LayerTokens, budget_tokens, plan_layer

DEFAULT_BUDGETS = (0.5, 0.25, 0.1)


def method_configs(budget: float | int, base: AccKVConfig | None = None) -> dict[str, AccKVConfig]:
    """AccKV, each ablation and every baseline at ``budget``, by display name."""
    base = (base or AccKVConfig()).replace(budget=budget)
    configs = {"acckv": base, **base.ablations()}
    for method in ("snapkv", "pyramidkv", "adakv", "h2o", "tova", "lookm", "streaming"):
        configs[method] = base.replace(method=method)
    return configs


def workload_to(w: workloads.AVWorkload, device: torch.device) -> workloads.AVWorkload:
    """The same workload with every tensor on ``device`` (the kernels need CUDA tensors on a GPU)."""
    moved = {name: getattr(w, name).to(device) for name in ("modality", "time", "spatial", "position", "chunk", "event")}
    layers = [workloads.LayerTrace(*(t.to(device) for t in (lt.k, lt.v, lt.q_window, lt.q_decode)),
                                   None if lt.q_prompt is None else lt.q_prompt.to(device)) for lt in w.layers]
    return dataclasses.replace(w, **moved, layers=layers)


def layer_inputs(w: workloads.AVWorkload, layer: int, scores: torch.Tensor) -> LayerTokens:
    """The policy's view of one workload layer (metadata broadcast over batch and kv heads)."""
    cfg = w.config
    B, H, N = cfg.batch, cfg.num_kv_heads, w.num_tokens
    lt = w.layers[layer]
    return LayerTokens(
        scores=scores,
        modality=w.token_modality(),
        lengths=torch.full((B, H), N, dtype=torch.int32, device=lt.k.device),
        time=w.time.view(1, 1, N).expand(B, H, N).to(torch.int32),
        keys=lt.k,
        spatial=w.spatial.view(1, 1, N, 2).expand(B, H, N, 2).to(torch.int32),
    )


def prefill_scores(w: workloads.AVWorkload, evidence: str = "window") -> list[torch.Tensor]:
    """Step 0's evidence of every layer (``AccKVConfig.evidence_for``): ``"window"`` the window queries' scores
    (``window_scores``), ``"last"`` the last prompt query's, ``"observed"`` every prompt query's attention mass
    (``observed_attention`` over the workload's ``q_prompt``), ``"mean"`` that mass over the queries that see each
    token."""
    if evidence == "window":
        mod = w.token_modality()
        return [window_scores(lt.q_window, lt.k, modality=mod).scores for lt in w.layers]
    if evidence == "last":
        return [window_scores(lt.q_window[:, :, -1:].contiguous(), lt.k).scores for lt in w.layers]
    if evidence in ("observed", "mean"):
        if w.layers[0].q_prompt is None:
            raise ValueError("observed evidence needs the workload's prompt queries (AVWorkloadConfig.prompt_queries)")
        mass = [observed_attention(lt.q_prompt, lt.k).key_mass for lt in w.layers]
        if evidence == "mean":  # over the queries that see each token: N - t of them
            n = w.num_tokens - torch.arange(w.num_tokens, device=mass[0].device, dtype=torch.float32)
            mass = [m / n for m in mass]
        return mass
    raise ValueError(f"evidence must be 'window', 'last', 'observed' or 'mean', got {evidence!r}")


def _decode_on(k, v, lengths, q_decode, multiplicity=None) -> torch.Tensor:
    """Decode outputs ``[B, Hq, Qd, D]`` for every decode query, as one kernel call over a batch of B*Qd."""
    B, Hq, Qd, D = q_decode.shape
    fold = lambda x: x.unsqueeze(1).expand(-1, Qd, *x.shape[1:]).reshape(B * Qd, *x.shape[1:])  # noqa: E731
    q = q_decode.permute(0, 2, 1, 3).reshape(B * Qd, Hq, D).contiguous()
    res = decode_attention(q, fold(k), fold(v), fold(lengths).contiguous(),
                           multiplicity=None if multiplicity is None else fold(multiplicity))
    return res.out.view(B, Qd, Hq, D).permute(0, 2, 1, 3)


def full_outputs(w: workloads.AVWorkload) -> list[torch.Tensor]:
    """Float64 reference decode outputs ``[B, Hq, Qd, D]`` of every layer on the full cache."""
    outs = []
    for lt in w.layers:
        full = torch.full(lt.k.shape[:2], lt.k.shape[2], dtype=torch.int32, device=lt.k.device)
        outs.append(torch.stack([reference.decode_attention(lt.q_decode[:, :, j].double(), lt.k.double(),
                                                            lt.v.double(), full).out
                                 for j in range(lt.q_decode.shape[2])], dim=2))
    return outs


def full_token_masses(w: workloads.AVWorkload) -> list[torch.Tensor]:
    """Float64 full-cache decode attention mass per token ``[B, Hkv, N]`` of every layer (the mass columns' whole)."""
    return [workloads.decode_token_mass(lt.q_decode, lt.k) for lt in w.layers]


def evaluate(w: workloads.AVWorkload, cfg: AccKVConfig, scores: list[torch.Tensor],
             full_out: list[torch.Tensor] | None = None, token_mass: list[torch.Tensor] | None = None) -> dict:
    """Compress every layer of ``w`` with ``cfg`` and measure fidelity against the full cache.

    ``scores`` are the layers' prefill evidence (:func:`prefill_scores` of ``cfg.score_evidence``); ``full_out`` the reference outputs
    (:func:`full_outputs`) and ``token_mass`` the full cache's decode mass per token (:func:`full_token_masses`),
    each computed here when not given.
    """
    full_out = full_out if full_out is not None else full_outputs(w)
    token_mass = token_mass if token_mass is not None else full_token_masses(w)
    B, H, N, D = w.layers[0].k.shape
    dev = w.layers[0].k.device
    num_layers = len(w.layers)
    errs, kept, merged = [], [], []
    recalls = {"kept": [], "kept+merged": []}
    masses = {"kept": [], "kept+merged": []}
    rho = []
    for layer, lt in enumerate(w.layers):
        x = layer_inputs(w, layer, scores[layer])
        res = plan_layer(cfg, x, layer, num_layers)
        plan = res.plan
        K = plan.keep.shape[-1]
        k_c = torch.zeros(B, H, K, D, dtype=lt.k.dtype, device=dev)
        v_c = torch.zeros_like(k_c)
        pos = torch.arange(N, dtype=torch.int32, device=dev).expand(B, H, N).contiguous()
        count = torch.ones(B, H, N, device=dev)
        pos_c = torch.zeros(B, H, K, dtype=torch.int32, device=dev)
        count_c = torch.zeros(B, H, K, device=dev)
        compact_kv(lt.k, lt.v, x.lengths, plan.keep, plan.keep_lengths, out_k=k_c, out_v=v_c,
                   merge_target=plan.merge_target, merge_weight=plan.merge_weight,
                   token_data=(pos,), token_sums=(count,), out_token_data=(pos_c,), out_token_sums=(count_c,))
        lens = plan.keep_lengths
        mult = count_c if cfg.uses_multiplicity else None
        out_c = _decode_on(k_c, v_c, lens, lt.q_decode, mult).double()
        out = full_out[layer]
        errs.append(float(((out_c - out).norm(dim=-1) / out.norm(dim=-1)).mean()))
        for cover, merged_into in (("kept", None), ("kept+merged", plan.merge_target)):
            recalls[cover].append(float(workloads.salient_recall(w.salient, pos_c, lens, merged_into=merged_into)))
            masses[cover].append(float(workloads.attention_mass_retained(
                lt.q_decode, lt.k, pos_c, lens, merged_into=merged_into, token_mass=token_mass[layer])))
        kept.append(float(lens.double().mean()))
        merged.append(float(res.merged.double().mean()))
        rho.append(res.rho.mean(0))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"out err": mean(errs),
            "recall kept": mean(recalls["kept"]), "recall kept+merged": mean(recalls["kept+merged"]),
            "mass kept": mean(masses["kept"]), "mass kept+merged": mean(masses["kept+merged"]),
            "KV kept %": 100.0 * mean(kept) / N, "merged/head": mean(merged), "rho": torch.stack(rho)}


def fidelity_rows(w: workloads.AVWorkload, budgets: Iterable[float] = DEFAULT_BUDGETS,
                  progress: Callable[[Iterable], Iterable] = lambda x: x) -> list[dict]:
    """One row per (budget, method): fidelity and bytes kept on the workload ``w``."""
    full_out, token_mass = full_outputs(w), full_token_masses(w)
    jobs = [(b, name, cfg) for b in budgets for name, cfg in method_configs(b).items()]
    scores = {e: prefill_scores(w, e) for e in sorted({cfg.evidence_for(True) for _, _, cfg in jobs})}
    rows = []
    for budget, name, cfg in progress(jobs):  # an AV prompt: "auto" evidence is the window's
        r = evaluate(w, cfg, scores[cfg.evidence_for(True)], full_out, token_mass)
        rows.append({"budget": budget, "method": name, **{k: v for k, v in r.items() if k != "rho"}})
    return rows


def av_stress_rows(budgets: Iterable[float] = DEFAULT_BUDGETS, variants: Iterable[str] | None = None,
                   progress: Callable[[Iterable], Iterable] = lambda x: x,
                   device: torch.device | str | None = None) -> list[dict]:
    """The fidelity table on each stress variant: one row per (variant, budget, method), :func:`fidelity_rows`'
    columns plus ``"variant"``.

    Args:
        budgets: KV budgets, as for :func:`fidelity_rows`.
        variants: names from :data:`acckv_triton.workloads.STRESS_VARIANTS` (default: all, in registry order).
        progress: wraps the iterable of variants (e.g. a tqdm bar).
        device: where the kernels run; default CUDA on a GPU, else the CPU (through Triton's interpreter).
    """
    names = list(workloads.STRESS_VARIANTS) if variants is None else list(variants)
    for name in names:
        if name not in workloads.STRESS_VARIANTS:
            raise ValueError(f"variants must be names from {sorted(workloads.STRESS_VARIANTS)}, got {name!r}")
    budgets = tuple(budgets)
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not tuning.INTERPRET else "cpu"
    rows = []
    for name in progress(names):
        w = workload_to(workloads.stress_workload(name), torch.device(device))
        rows += [{"variant": name, **r} for r in fidelity_rows(w, budgets)]
    return rows


def modality_share_rows(w: workloads.AVWorkload) -> list[dict]:
    """Observation O1 measured: per layer, the focusing shares ρ(audio), ρ(video) and the window mass shares."""
    from ..modality import Modality

    scores = prefill_scores(w)
    rows = []
    for layer in range(len(w.layers)):
        res = plan_layer(AccKVConfig(), layer_inputs(w, layer, scores[layer]), layer, len(w.layers))
        rho = res.rho.mean(0)
        rows.append({"layer": layer, "rho audio": float(rho[Modality.AUDIO]), "rho video": float(rho[Modality.VIDEO]),
                     "priority": Modality(int(res.priority[0])).name.lower() if int(res.priority[0]) >= 0 else "-"})
    return rows


# (name, layers, kv heads, head dim) of the models whose KV memory the memory table states, bf16.
MODEL_SHAPES = (("Qwen2.5-Omni-7B thinker", 28, 4, 128), ("Qwen2.5-Omni-3B thinker", 36, 2, 128))


def memory_rows(prompt_tokens: int = 32768, budgets: Iterable[float] = DEFAULT_BUDGETS) -> list[dict]:
    """Bytes a compressed cache holds per sequence for real model shapes against the full bf16 KV.

    Held bytes count what a :class:`~acckv_triton.storage.LayerKVCache` allocates after compression: the kept tokens
    plus the decode headroom (rounded to its alignment), with K, V and every metadata field of each token.
    """
    from ..storage import LayerKVCache

    rows = []
    for name, layers, hkv, d in MODEL_SHAPES:
        probe = LayerKVCache()
        probe.append(torch.zeros(1, 1, 1, d, dtype=torch.bfloat16), torch.zeros(1, 1, 1, d, dtype=torch.bfloat16))
        per_token = probe.bytes_per_token  # K, V and the AccKV metadata of one token of one kv head
        full = layers * hkv * prompt_tokens * 2 * d * 2
        for budget in budgets:
            kept = budget_tokens(AccKVConfig(budget=budget), torch.tensor(prompt_tokens), 0, 1).item()
            allocated = -(-(kept + probe.headroom) // probe.align) * probe.align  # capacity after compress
            held = layers * hkv * allocated * per_token
            rows.append({"model": name, "prompt": prompt_tokens, "budget": budget, "kept tokens": kept,
                         "full KV GiB": full / 2**30, "held GiB": held / 2**30,
                         "saved %": 100.0 * (1 - held / full)})
    return rows
