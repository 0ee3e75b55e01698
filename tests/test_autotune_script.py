"""autotune/tune.py on DEVICE (CPU when no GPU) with a stand-in timer: the table it writes is the one the library
then loads."""
from __future__ import annotations

import pytest
import torch

from acckv_triton import tuning
from acckv_triton.ops.decode_attention import _split_kernel
from autotune import tune
from tests.conftest import DEVICE


def test_tune_writes_a_table_the_library_matches(tmp_path, monkeypatch):
    def timer(call):  # runs the forced config for real, then pretends BLOCK_N=32 is fastest
        call()
        return 1.0 if _split_kernel._forced.kwargs["BLOCK_N"] == 32 else 2.0

    target = tune.Target(_split_kernel, tune._decode_keys(["float32"], [64], [2])[:1], tune._decode_call)
    entries = tune.tune_target(target, lengths=[40], batches=[1], device=DEVICE, timer=timer)
    assert len(entries) == 1 and entries[0]["config"]["kwargs"] == {"BLOCK_N": 32}
    path = tune.write_table(tmp_path, "Fake GPU 9000", "decode_attention", entries)
    assert path.parent.name == "Fake_GPU_9000"

    monkeypatch.setenv("ACCKV_AUTOTUNE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "INTERPRET", False)
    args = dict(k_ptr=torch.empty(1), HEAD_DIM=64, GROUP_SIZE=2, HAS_MODALITY=False, HAS_TOKEN_MASS=False)
    resolved = _split_kernel.resolve(args, "Fake GPU 9000")
    assert resolved.source == "table" and resolved.config.kwargs == {"BLOCK_N": 32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU main() really tunes; run the script there")
def test_main_refuses_without_gpu(capsys):
    assert tune.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_forcing_is_scoped():
    config = _split_kernel.configs[-1]
    with _split_kernel.forcing(config):
        assert _split_kernel.resolve({}, None).config is config
    assert _split_kernel.resolve({}, None).source == "default"


def _tune_recording_lookups(monkeypatch, name: str, length: int):
    """tune.py's target ``name`` (fp32, D 64, G 2) tuned at one length with a stand-in timer: (target, the table
    entries it writes, every key the launcher looked up meanwhile)."""
    target = next(t for t in tune.targets(dtypes=("float32",), head_dims=(64,), groups=(2,)) if t.kernel.name == name)
    looked_up = []
    resolve = target.kernel.resolve

    def recording_resolve(args, device_name):
        looked_up.append(target.kernel.tuning_key(args))
        return resolve(args, device_name)

    monkeypatch.setattr(target.kernel, "resolve", recording_resolve)
    entries = tune.tune_target(target, lengths=[length], batches=[1], device=DEVICE,
                               timer=lambda call: (call(), 1.0)[1])
    return target, entries, looked_up


def test_window_scores_target_keys_match_the_launcher(monkeypatch):
    """The key tune.py writes for window_scores is the key the launcher then looks up."""
    _, entries, looked_up = _tune_recording_lookups(monkeypatch, "window_scores", 64)
    assert looked_up and all(k == entries[0]["key"] for k in looked_up)
    assert entries[0]["key"] == {"dtype": "float32", "HEAD_DIM": 64, "GROUP_SIZE": 2, "BLOCK_R": 64,
                                 "HAS_MODALITY": True, "HAS_KEY_START": False}


@pytest.mark.parametrize("name", ["observed_attention", "observed_attention_mass"])
def test_observed_attention_target_keys_match_the_launcher(monkeypatch, name):
    """The keys tune.py writes for the prefill evidence kernels are the keys the launcher looks up."""
    target, entries, looked_up = _tune_recording_lookups(monkeypatch, name, 40)
    assert target.lengths == tune.PROMPT_LENGTHS
    assert looked_up and all(k == entries[0]["key"] for k in looked_up)
    assert entries[0]["key"]["HEAD_DIM"] == 64 and entries[0]["key"]["HAS_KEY_START"] is False


@pytest.mark.parametrize("name", ["chunk_attention", "chunk_attention_mass"])
def test_chunk_attention_target_keys_match_the_launcher(monkeypatch, name):
    """The keys tune.py writes for chunk_attention's two kernels are the keys the launcher looks up."""
    target, entries, looked_up = _tune_recording_lookups(monkeypatch, name, 40)
    assert target.lengths == tune.CHUNK_STORED
    assert looked_up and all(k == entries[0]["key"] for k in looked_up)
    expected = {"dtype": "float32", "HEAD_DIM": 64, "GROUP_SIZE": 2}
    assert entries[0]["key"] == (dict(expected, BLOCK_R=64) if name == "chunk_attention_mass" else expected)
