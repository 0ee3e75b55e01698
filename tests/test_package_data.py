"""The tuned tables ship inside the wheel, and an installed package (not the source tree) finds them."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_the_tuned_tables_and_the_installed_package_finds_them(tmp_path):
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "acckv_triton" / "tables").glob("*/*.json"))
    assert shipped, "no tuned tables in acckv_triton/tables/"
    # without build isolation (no index needed): the environment's setuptools builds it, >= 70.1 (the test extra)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout[-2000:]}\n{built.stderr[-3000:]}"
    wheel, = (tmp_path / "dist").glob("acckv_triton-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(shipped) <= names, sorted(set(shipped) - names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")  # an installed layout: the wheel's contents on sys.path
    probe = ("import acckv_triton, acckv_triton.tuning as t; print(acckv_triton.__file__); "
             "print(len(t.load_table('decode_attention', 'NVIDIA H200')))")
    env = {k: v for k, v in os.environ.items() if k != "ACCKV_AUTOTUNE_DIR"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, env=env,
                         cwd=tmp_path).stdout.split()
    assert out[0].startswith(str(tmp_path / "site"))  # the installed copy, not the source tree
    assert int(out[1]) > 0
