"""``python -m acckv_triton.bench``: what the kernels cost and how exact they are, on the machine at hand.

With no GPU the kernels run through Triton's interpreter at small sizes against their float64 references, and
no timing is printed (interpreter timings say nothing about GPU speed). With a GPU the decode kernel is swept
over batch, heads and length, against SDPA and an SDPA-plus-eager-score baseline, relative to the measured copy
bandwidth.
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
from . import decode
from .machine import machine_header

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUITES = ("kernels", "all")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m acckv_triton.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", choices=SUITES, default="all",
                   help="kernels: kernel accuracy (and GPU speed sweeps); all: every suite available")
    p.add_argument("--quick", action="store_true", help="fewer shapes: one batch, one head layout, two lengths")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the GPU speed sweep")
    p.add_argument("--lengths", type=_ints, default=None, help="comma-separated cache lengths for the GPU sweep")
    p.add_argument("--batch", type=_ints, default=None, help="comma-separated batch sizes for the GPU sweep")
    p.add_argument("--out", type=Path, default=None, help="folder for JSON and CSV of every row")
    return p.parse_args(argv)


def _progress(items):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(list(items), desc="decode sweep", leave=False, file=sys.stderr)


def _table(title: str, rows: list[dict]) -> str:
    floatfmt = ".3g"
    return f"\n## {title}\n" + tabulate(rows, headers="keys", floatfmt=floatfmt, tablefmt="github")


def _write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    for name, rows in results["tables"].items():
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() and not INTERPRET else torch.device("cpu")
    header = machine_header(device)
    print("# acckv_triton bench")
    print(tabulate(list(header.items()), tablefmt="plain"))
    tables: dict[str, list[dict]] = {}

    if device.type != "cuda":
        print("\nNo GPU: kernels run through Triton's interpreter on small shapes. These are accuracy checks;"
              " no timing is reported because interpreter time says nothing about GPU speed.")
    tables["decode_accuracy"] = decode.accuracy_rows(device, DTYPES.values())
    print(_table("decode_attention vs float64 reference (max abs error)", tables["decode_accuracy"]))

    if device.type == "cuda":
        batches = args.batch or ((1,) if args.quick else decode.DEFAULT_BATCHES)
        heads = decode.DEFAULT_HEADS[:1] if args.quick else decode.DEFAULT_HEADS
        lengths = args.lengths or ((4096, 32768) if args.quick else decode.DEFAULT_LENGTHS)
        tables["decode_speed"] = decode.speed_rows(
            device, DTYPES[args.dtype], batches, heads, lengths, copy_gbs=header.get("copy_gbs"), progress=_progress,
        )
        print(_table(f"decode_attention speed ({args.dtype}, D=128; bandwidth over K/V + q + out bytes)",
                     tables["decode_speed"]))

    if args.out:
        _write(args.out, {"header": header, "args": {k: str(v) for k, v in vars(args).items()}, "tables": tables})
        print(f"\nwrote {args.out}/bench.json and one CSV per table")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
