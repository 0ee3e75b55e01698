"""The tuning layer: execution mode, tuned-table loading and matching, and the fallback order."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import triton

from acckv_triton import tuning
from acckv_triton.ops.decode_attention import _split_kernel


def test_interpreter_is_on_without_cuda():
    if torch.cuda.is_available():
        assert not tuning.INTERPRET or os.environ.get("TRITON_INTERPRET") == "1"
    else:
        assert tuning.INTERPRET and os.environ["TRITON_INTERPRET"] == "1"


@pytest.mark.skipif(not tuning.INTERPRET, reason="only the interpreter converts loop bounds in Python")
def test_loop_bounds_run_under_an_interpreter_that_cannot_convert_them(monkeypatch):
    """Triton 3.6's interpreter converts a loop bound with int() of a one-element array, which NumPy 2.4 refuses;
    simulated here whatever Triton and NumPy run the tests: the probe fails, ensure_loop_bounds makes the kernels
    run, and a kernel with loop bounds gives the reference's scores."""
    from triton.runtime import interpreter

    from acckv_triton import _interpreter, reference
    from acckv_triton.ops import window_scores

    current = interpreter._patch_lang_tensor

    def strict_index(self):
        if self.handle.data.ndim:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return int(self.handle.data)

    def old_patch_lang_tensor(tensor, scope):
        current(tensor, scope)
        scope.set_attr(tensor, "__index__", strict_index)

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", old_patch_lang_tensor)
    assert not _interpreter.loop_bounds_work()
    assert _interpreter.ensure_loop_bounds()
    q, k = torch.randn(1, 4, 3, 16, dtype=torch.float64), torch.randn(1, 2, 40, 16, dtype=torch.float64)
    got, want = window_scores(q.float(), k.float()), reference.window_scores(q, k)
    torch.testing.assert_close(got.scores.double(), want.scores.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,folder", [
    pytest.param("NVIDIA H100 80GB HBM3", "NVIDIA_H100_80GB_HBM3", id="h100"),
    pytest.param("  NVIDIA H200 ", "NVIDIA_H200", id="h200-spaces"),
    pytest.param("NVIDIA A100-SXM4-40GB", "NVIDIA_A100-SXM4-40GB", id="a100-dash"),
])
def test_device_folder(name, folder):
    assert tuning.device_folder(name) == folder


def _write_table(root, device, kernel, entries):
    path = root / tuning.device_folder(device) / f"{kernel}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kernel": kernel, "device": device, "entries": entries}))
    return path


ARGS = dict(k_ptr=torch.empty(1, dtype=torch.bfloat16), HEAD_DIM=128, GROUP_SIZE=7, HAS_MODALITY=True,
            HAS_TOKEN_MASS=False)
ENTRY = {"key": {"dtype": "bfloat16", "HEAD_DIM": 128, "GROUP_SIZE": 7, "HAS_MODALITY": True,
                 "HAS_TOKEN_MASS": False},
         "config": {"kwargs": {"BLOCK_N": 128}, "num_warps": 8, "num_stages": 3}}


def test_table_match_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCKV_AUTOTUNE_DIR", str(tmp_path))
    _write_table(tmp_path, "Fake GPU 9000", "decode_attention", [ENTRY])
    monkeypatch.setattr(tuning, "INTERPRET", False)  # as on a GPU
    assert _split_kernel.tuning_key(ARGS) == ENTRY["key"]
    resolved = _split_kernel.resolve(ARGS, "Fake GPU 9000")
    assert resolved.source == "table"
    assert resolved.config.kwargs == {"BLOCK_N": 128}
    assert (resolved.config.num_warps, resolved.config.num_stages) == (8, 3)


@pytest.mark.parametrize("device,args", [
    pytest.param("Other GPU", ARGS, id="other-device"),
    pytest.param("Fake GPU 9000", {**ARGS, "GROUP_SIZE": 4}, id="other-group-size"),
    pytest.param("Fake GPU 9000", {**ARGS, "k_ptr": torch.empty(1, dtype=torch.float16)}, id="other-dtype"),
])
def test_no_match_falls_back(tmp_path, monkeypatch, device, args):
    monkeypatch.setenv("ACCKV_AUTOTUNE_DIR", str(tmp_path))
    _write_table(tmp_path, "Fake GPU 9000", "decode_attention", [ENTRY])
    # live tuning when allowed (on a GPU) ...
    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setenv("ACCKV_AUTOTUNE", "1")
    assert _split_kernel.resolve(args, device) is None
    # ... else the safe default, the first config of the space
    monkeypatch.setenv("ACCKV_AUTOTUNE", "0")
    resolved = _split_kernel.resolve(args, device)
    assert resolved.source == "default" and resolved.config is _split_kernel.configs[0]


def test_interpreter_always_uses_default(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCKV_AUTOTUNE_DIR", str(tmp_path))
    _write_table(tmp_path, "Fake GPU 9000", "decode_attention", [ENTRY])
    monkeypatch.setattr(tuning, "INTERPRET", True)
    assert _split_kernel.resolve(ARGS, "Fake GPU 9000").source == "default"
    assert not tuning.live_tuning_enabled()


def test_malformed_table_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCKV_AUTOTUNE_DIR", str(tmp_path))
    path = _write_table(tmp_path, "Broken GPU", "decode_attention", [{"key": ENTRY["key"]}])  # no "config"
    with pytest.raises(ValueError, match="malformed"):
        tuning.load_table("decode_attention", "Broken GPU")
    assert str(path) in str(pytest.raises(ValueError, tuning.load_table, "decode_attention", "Broken GPU").value)


@pytest.mark.parametrize("text", [
    pytest.param('{"entries": [{"key": {"HEAD_DIM": 128}, "config": [64, 4, 2]}]}', id="config-not-an-object"),
    pytest.param('[{"key": {}, "config": {}}]', id="table-not-an-object"),
    pytest.param('{"entries": [{"key": [1, 2], "config": {}}]}', id="key-not-an-object"),
])
def test_malformed_table_structure_names_the_file(tmp_path, monkeypatch, text):
    monkeypatch.setenv("ACCKV_AUTOTUNE_DIR", str(tmp_path))
    path = tmp_path / tuning.device_folder("Odd GPU") / "decode_attention.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ValueError, match="malformed") as info:
        tuning.load_table("decode_attention", "Odd GPU")
    assert str(path) in str(info.value)


def test_missing_table_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCKV_AUTOTUNE_DIR", str(tmp_path))
    assert tuning.load_table("decode_attention", "Nothing Here") == {}


def test_every_space_starts_with_a_config():
    for name, space in tuning.CONFIG_SPACES.items():
        assert space and all(isinstance(c, triton.Config) for c in space), name


def test_launch_records_config_source():
    import acckv_triton as ak
    from tests.conftest import DEVICE

    q = torch.randn(1, 2, 64, device=DEVICE)
    k = torch.randn(1, 1, 10, 64, device=DEVICE)
    ak.decode_attention(q, k, k, torch.full((1, 1), 10, dtype=torch.int32, device=DEVICE))
    assert _split_kernel.last_source in ("table", "live", "default")
    if tuning.INTERPRET:
        assert _split_kernel.last_source == "default"


def test_live_tuning_ranks_an_uncompilable_config_last(monkeypatch):
    """A config the installed Triton fails to compile (Triton 3.6's layout pass on some compaction tiles) is
    ranked last by live tuning instead of failing the launch; any other error still propagates."""
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, quantiles: (fn(), [1.0] * len(quantiles))[1])
    bench = tuning._bench_skipping_uncompilable("compact_kv")

    def uncompilable():
        raise RuntimeError("PassManager::run failed")

    with pytest.warns(RuntimeWarning, match="compact_kv does not compile"):
        assert bench(uncompilable, quantiles=(0.5, 0.2, 0.8)) == [math.inf] * 3
    assert bench(lambda: None, quantiles=(0.5,)) == [1.0]

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench(broken, quantiles=(0.5,))
