"""Figures of the bench's tables: ``python -m acckv_triton.bench.plot RESULTS_DIR``.

Reads ``RESULTS_DIR/bench.json`` (written by ``python -m acckv_triton.bench --out RESULTS_DIR``) and writes one PNG
per table it knows next to it:

  decode_speed     decode time vs cache length: fused kernel, plain kernel, SDPA; one panel per (B, Hq/Hkv)
  av_fidelity      decode-output error (and salient recall, attention mass kept) vs budget, one line per method
  modality_shares  per-layer focusing shares rho per modality, stacked bars
  real_fidelity    real weights: top-1 agreement and mean KL vs the full cache, vs budget, one line per method

Other tables, tables without the columns a figure needs, and rows that carry a ``note`` instead of numbers are
skipped. Needs matplotlib (``pip install "acckv_triton[plot]"``); the Agg backend is used, so no display is needed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

NAMES = {"acckv": "AccKV", "snapkv": "SnapKV", "pyramidkv": "PyramidKV", "adakv": "Ada-KV (SnapKV)", "h2o": "H2O",
         "tova": "TOVA", "lookm": "LOOK-M-like", "streaming": "StreamingLLM", "kvzip": "KVzip-style (2 passes)"}
BASELINE_COLORS = {"snapkv": "C0", "pyramidkv": "C1", "h2o": "C2", "lookm": "C3", "streaming": "C4", "adakv": "C5",
                   "tova": "C6", "kvzip": "C7"}
MODALITY_COLORS = {"text": "0.6", "audio": "tab:orange", "video": "tab:blue", "image": "tab:green"}
DPI = 120


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError('plotting needs matplotlib: pip install "acckv_triton[plot]"') from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _complete(rows: list[dict], cols: tuple[str, ...]) -> list[dict]:
    """The rows that hold a value for every column in ``cols`` (note-only rows hold none)."""
    return [r for r in rows if all(r.get(c) is not None for c in cols)]


def _figure(plt, panels: int, title: str, subtitle: str | None, ncols: int = 3):
    ncols = min(panels, ncols)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.8 * nrows + 0.5), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    fig.suptitle(title if not subtitle else f"{title}\n{subtitle}")
    return fig, list(axes.flat[:panels])


def _method_style(method: str, index: int) -> dict:
    """AccKV bold black, drawn under the thin lines so a method that matches it stays visible; baselines in fixed
    colours; AccKV ablations thin and dashed."""
    if method == "acckv":
        return dict(color="black", lw=3.2, marker="o", zorder=1.8)
    if method in BASELINE_COLORS:
        return dict(color=BASELINE_COLORS[method], lw=1.4, marker="o", ms=4)
    import matplotlib  # (loaded by _pyplot before any figure is drawn)

    # a palette of its own: tab10's colours are the baselines' (C0-C7), and an ablation drawn in one read as it
    return dict(color=matplotlib.colormaps["Dark2"](index % 8), lw=1.0, ls="--", marker=".", alpha=0.85)


def _by_method(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r["method"]), []).append(r)
    return {m: sorted(rs, key=lambda r: r["budget"]) for m, rs in groups.items()}


def _budget_axis(ax, rows: list[dict]) -> None:
    budgets = sorted({100 * r["budget"] for r in rows})
    ax.set_xticks(budgets)
    ax.set_xlabel("KV budget (% of prompt tokens)")


def _method_lines(fig, axes, rows, panels, legend: bool = True) -> None:
    """One line per method on each panel (column, y label, log y); one legend for the figure (``legend``)."""
    for i, (method, rs) in enumerate(_by_method(rows).items()):
        style = _method_style(method, i)
        for ax, (col, ylabel, logy) in zip(axes, panels):
            ax.plot([100 * r["budget"] for r in rs], [r[col] for r in rs], label=NAMES.get(method, method), **style)
    for ax, (col, ylabel, logy) in zip(axes, panels):
        _budget_axis(ax, rows)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if legend:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize="small")


def _decode_speed(plt, rows: list[dict], subtitle: str | None):
    rows = _complete(rows, ("B", "Hq/Hkv", "L", "fused ms", "plain ms", "sdpa ms"))
    if not rows:
        return None
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["B"], r["Hq/Hkv"]), []).append(r)
    fig, axes = _figure(plt, len(groups), "decode_attention time per step vs cache length (lower is better)", subtitle)
    for ax, ((batch, heads), rs) in zip(axes, groups.items()):
        rs.sort(key=lambda r: r["L"])
        lengths = [r["L"] for r in rs]
        backend = "/".join(dict.fromkeys(str(r["sdpa"]) for r in rs if r.get("sdpa")))
        ax.plot(lengths, [r["fused ms"] for r in rs], color="black", lw=2.4, marker="o", label="fused (+ token mass)")
        ax.plot(lengths, [r["plain ms"] for r in rs], color="C0", marker="s", ms=4, label="plain")
        ax.plot(lengths, [r["sdpa ms"] for r in rs], color="C3", marker="^", ms=4,
                label=f"SDPA ({backend})" if backend else "SDPA")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yscale("log")
        ax.set(title=f"B={batch}, Hq/Hkv={heads}", xlabel="cache length L (tokens)", ylabel="time per decode step (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    return fig


def _av_fidelity(plt, rows: list[dict], subtitle: str | None):
    rows = _complete(rows, ("method", "budget", "out err"))
    if not rows:
        return None
    panels = [("out err", "decode-output error (relative L2)", True)]
    # Recall and mass over the tokens kept in a slot of their own; results written before bench/av.py split them
    # hold "recall" and "mass", which also credited merged tokens, and are labelled so.
    for choices in ((("recall kept", "salient-token recall, kept (fraction)"),
                     ("recall", "salient-token recall, kept or merged (fraction)")),
                    (("mass kept", "attention mass on kept tokens (fraction)"),
                     ("mass", "attention mass on kept or merged tokens (fraction)"))):
        panels += [(col, label, False) for col, label in choices if all(col in r for r in rows)][:1]
    rows = _complete(rows, tuple(p[0] for p in panels))
    fig, axes = _figure(plt, len(panels), "Synthetic audio-video workload: fidelity vs KV budget per method", subtitle)
    _method_lines(fig, axes, rows, panels)
    axes[0].set_title("decode-output error (lower is better)")
    return fig


def _modality_shares(plt, rows: list[dict], subtitle: str | None):
    rows = _complete(rows, ("layer",))
    shares = [m for m in MODALITY_COLORS if rows and all(f"rho {m}" in r for r in rows)]
    if not shares:
        return None
    fig, (ax,) = _figure(plt, 1, "Focusing share of the budget per modality and layer", subtitle)
    layers = [r["layer"] for r in rows]
    bottom = [0.0] * len(rows)
    for m in shares:
        values = [r[f"rho {m}"] for r in rows]
        ax.bar(layers, values, bottom=bottom, color=MODALITY_COLORS[m], label=m)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(layers, [f"{r['layer']}\n({r['priority']})" if "priority" in r else str(r["layer"]) for r in rows])
    ax.set(xlabel="layer (priority modality)", ylabel="share ρ (fraction of budget)", ylim=(0, 1.05))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _real_fidelity(plt, rows: list[dict], subtitle: str | None):
    rows = _complete(rows, ("method", "budget", "top1", "kl"))
    compressed = [r for r in rows if r["method"] != "full"]
    if not compressed:
        return None
    panels = [("top1", "top-1 agreement with full cache (fraction)", False), ("kl", "mean KL to full cache (nats)", False)]
    texts = list(dict.fromkeys(r.get("text") for r in rows))  # one row of panels per text
    fig, axes = _figure(plt, 2 * len(texts), "Real weights (SmolLM2-135M-Instruct): agreement with the full cache "
                        "vs KV budget", subtitle, ncols=2)
    for i, text in enumerate(texts):
        pair = axes[2 * i:2 * i + 2]
        for ax, (col, _, _) in zip(pair, panels):
            ax.axhline(1.0 if col == "top1" else 0.0, color="0.5", ls=":", lw=1, label="full cache")
        _method_lines(fig, pair, [r for r in compressed if r.get("text") == text], panels, legend=i == 0)
        name = f"{text}: " if text is not None else ""
        pair[0].set_title(f"{name}top-1 agreement (higher is better)")
        pair[1].set_title(f"{name}mean KL (lower is better)")
    return fig


FIGURES = {
    "decode_speed": _decode_speed,
    "av_fidelity": _av_fidelity,
    "modality_shares": _modality_shares,
    "real_fidelity": _real_fidelity,
}


def plot_tables(tables: dict[str, list[dict]], out_dir: Path, header: dict | None = None) -> list[Path]:
    """Write one PNG per plottable table in ``tables`` into ``out_dir``; return the paths written.

    ``tables`` maps table names to rows as the bench produces them (``bench.json["tables"]``); names without a
    figure, and tables none of whose rows hold the needed columns, are skipped. ``header["device"]``, when given,
    goes into each figure's subtitle. Raises ``ModuleNotFoundError`` when matplotlib is not installed.
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    subtitle = (header or {}).get("device")
    written = []
    for name, make in FIGURES.items():
        rows = tables.get(name)
        if not rows:
            continue
        fig = make(plt, rows, subtitle)
        if fig is None:
            continue
        try:
            fig.tight_layout()
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
            written.append(path)
        finally:
            plt.close(fig)
    return written


def main(argv=None) -> int:
    """CLI: plot ``RESULTS_DIR/bench.json`` into PNGs next to it and print their paths."""
    p = argparse.ArgumentParser(prog="python -m acckv_triton.bench.plot",
                                description="Write PNG figures of the tables in RESULTS_DIR/bench.json next to it.")
    p.add_argument("results_dir", type=Path, metavar="RESULTS_DIR",
                   help="folder written by `python -m acckv_triton.bench --out RESULTS_DIR`")
    args = p.parse_args(argv)
    source = args.results_dir / "bench.json"
    if not source.is_file():
        p.error(f"{source} does not exist")
    results = json.loads(source.read_text())
    paths = plot_tables(results.get("tables", {}), args.results_dir, results.get("header"))
    for path in paths:
        print(path)
    if not paths:
        print(f"no table in {source} has a figure", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
