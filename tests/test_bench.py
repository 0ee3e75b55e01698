"""The bench's code paths on CPU: accuracy rows, and the GPU speed sweep's baselines with a stand-in timer."""
from __future__ import annotations

import json

import torch

from acckv_triton import reference
from acckv_triton.bench import decode
from acckv_triton.bench.__main__ import main


def test_speed_rows_run_every_baseline_with_a_stand_in_timer():
    calls = []

    def timer(fn):  # runs the callable once, as do_bench would, and reports a fixed time
        fn()
        calls.append(fn)
        return 2.0

    rows = decode.speed_rows(torch.device("cpu"), torch.float32, batches=[1], heads=[(4, 2)], lengths=[48],
                             head_dim=64, timer=timer, copy_gbs=100.0)
    (row,) = rows
    assert row["sdpa"] in {"flash", "efficient", "cudnn", "math"}
    assert row["mass overhead %"] == 0.0 and row["plain vs sdpa ×"] == 1.0
    assert row["fused vs sdpa+eager ×"] == 2.0
    moved = 2 * 1 * 2 * 48 * 64 * 4 + 2 * 4 * 64 * 4
    assert abs(row["plain GB/s"] - moved / 2e-3 / 1e9) < 1e-9
    assert abs(row["plain % copy"] - row["plain GB/s"]) < 1e-9  # copy bandwidth of 100 GB/s


def test_eager_scores_step_matches_reference_token_mass():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 32, generator=g), torch.randn(2, 3, 20, 32, generator=g)
    mass, ref_mass = torch.zeros(2, 3, 20), torch.zeros(2, 3, 20)
    decode.eager_scores_step(q, k, mass, 32**-0.5)
    reference.decode_attention(q, k, k, torch.full((2, 3), 20, dtype=torch.int32), token_mass=ref_mass)
    torch.testing.assert_close(mass, ref_mass, atol=1e-6, rtol=1e-5)


def test_cli_writes_json_and_csv(tmp_path, capsys):
    assert main(["--suite", "kernels", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "no timing is reported" in printed or "GB/s" in printed
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["header"]["torch"] == torch.__version__
    rows = results["tables"]["decode_accuracy"]
    assert rows and all(r["max|Δlse|"] < 1e-4 for r in rows)
    assert (tmp_path / "decode_accuracy.csv").read_text().startswith("dtype,")
