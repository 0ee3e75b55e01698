"""The bench's figures: which tables give which PNG, what is skipped, the CLI on the committed results."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from acckv_triton.bench import plot  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-interpreter-2026-11-26"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = {"device": "NVIDIA H100 80GB HBM3", "mode": "cuda"}


def _speed_row(B, heads, L, ms):
    return {"B": B, "Hq/Hkv": heads, "L": L, "fused ms": 1.1 * ms, "plain ms": ms, "sdpa": "flash",
            "sdpa ms": 1.5 * ms, "fused vs sdpa+eager ×": 2.0, "plain % copy": 80.0}


def _tables() -> dict[str, list[dict]]:
    speed = [_speed_row(B, h, L, L / 4096) for B in (1, 4) for h in ("28/4", "32/8") for L in (4096, 32768)]
    speed.append({"B": 4, "Hq/Hkv": "32/8", "L": 131072, "note": "skipped: does not fit in memory"})
    av = [{"budget": b, "method": m, "out err": e * b, "recall kept": 0.9, "recall kept+merged": 1.0,
           "mass kept": 0.8, "mass kept+merged": 0.9, "KV kept %": 100 * b}
          for b in (0.5, 0.25) for m, e in (("acckv", 0.1), ("acckv-no-focusing", 0.2), ("snapkv", 0.3))]
    shares = [{"layer": i, "rho audio": a, "rho video": 1 - a, "priority": "audio" if a > 0.5 else "video"}
              for i, a in enumerate((0.7, 0.3))]
    real = [{"method": "full", "budget": 1.0, "top1": 1.0, "kl": 0.0, "ppl": 5.0, "kept": 1.0, "seconds": 1.0}]
    real += [{"method": m, "budget": b, "top1": 1 - b / 4, "kl": b / 10, "ppl": 5.2, "kept": b, "seconds": 1.0}
             for m in ("acckv", "h2o") for b in (0.5, 0.1)]
    return {"decode_speed": speed, "av_fidelity": av, "modality_shares": shares, "real_fidelity": real}


def _assert_pngs(paths, names, out_dir):
    assert sorted(p.name for p in paths) == sorted(f"{n}.png" for n in names)
    for p in paths:
        assert p.parent == out_dir and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_every_known_table_gives_its_png(tmp_path):
    paths = plot.plot_tables(_tables(), tmp_path, HEADER)
    _assert_pngs(paths, ["decode_speed", "av_fidelity", "modality_shares", "real_fidelity"], tmp_path)


def test_unknown_absent_and_incomplete_tables_are_skipped(tmp_path):
    tables = {
        "memory": [{"model": "x", "held GiB": 1.0}],
        "e2e": [{"tokens/s": 10.0}],
        "decode_speed": [{"B": 1, "Hq/Hkv": "28/4", "L": 4096, "note": "skipped: does not fit in memory"}],
        "av_fidelity": [{"budget": 0.5, "method": "acckv"}],  # no "out err"
        "modality_shares": [],
        "real_fidelity": [{"method": "full", "budget": 1.0, "top1": 1.0, "kl": 0.0}],  # nothing compressed
    }
    assert plot.plot_tables(tables, tmp_path / "figs") == []
    assert not (tmp_path / "figs").exists()
    assert plot.plot_tables({}, tmp_path) == []


def test_av_fidelity_plots_recall_and_mass_of_kept_tokens_and_labels_older_results():
    plt = plot._pyplot()
    rows = _tables()["av_fidelity"]
    labels = [ax.get_ylabel() for ax in plot._av_fidelity(plt, rows, None).axes]
    assert labels[1:] == ["salient-token recall, kept (fraction)", "attention mass on kept tokens (fraction)"]
    older = [{"budget": r["budget"], "method": r["method"], "out err": r["out err"], "recall": 1.0, "mass": 0.9}
             for r in rows]  # written before the split: merged tokens counted as covered
    labels = [ax.get_ylabel() for ax in plot._av_fidelity(plt, older, None).axes]
    assert labels[1:] == ["salient-token recall, kept or merged (fraction)",
                          "attention mass on kept or merged tokens (fraction)"]
    plt.close("all")


def test_note_rows_are_dropped_and_the_rest_plotted(tmp_path):
    rows = [{"B": 1, "Hq/Hkv": "28/4", "L": 131072, "note": "skipped: does not fit in memory"},
            _speed_row(1, "28/4", 4096, 0.1)]
    assert plot._complete(rows, ("L", "fused ms")) == rows[1:]
    _assert_pngs(plot.plot_tables({"decode_speed": rows}, tmp_path), ["decode_speed"], tmp_path)


def test_committed_results_plot_their_fidelity_tables(tmp_path):
    results = json.loads((RESULTS / "bench.json").read_text())
    paths = plot.plot_tables(results["tables"], tmp_path, results["header"])
    _assert_pngs(paths, ["av_fidelity", "modality_shares", "real_fidelity"], tmp_path)


def test_cli_writes_next_to_bench_json(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder)
    done = subprocess.run([sys.executable, "-m", "acckv_triton.bench.plot", str(folder)],
                          capture_output=True, text=True, check=True, timeout=120)
    printed = [Path(line) for line in done.stdout.split()]
    _assert_pngs(printed, ["av_fidelity", "modality_shares", "real_fidelity"], folder)


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ModuleNotFoundError, match=r'pip install "acckv_triton\[plot\]"'):
        plot.plot_tables(_tables(), tmp_path)
