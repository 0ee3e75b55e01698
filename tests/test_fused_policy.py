"""The fused policy (Triton kernels + torch.sort) against the reference policy: the same plans, bit for bit.

Every method, every AccKV ablation and the other switches, at several budgets, on ragged rows, left padding,
stale metadata past the lengths, 16-bit keys and a window given by positions; the scratch and output memory is
poisoned (every byte 0xFF: NaN floats, -1 ints) so any element the kernels leave unwritten shows.
"""
from __future__ import annotations

import inspect
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from acckv_triton import fused_policy, reference, workloads
from acckv_triton.bench.av import layer_inputs, workload_to
from acckv_triton.config import METHODS, AccKVConfig
from acckv_triton.fused_policy import plan_layer_fused
from acckv_triton.policy import LayerTokens, budget_tokens, plan_layer
from tests.conftest import DEVICE

W = workloads.generate_av_workload(num_chunks=3, grid_h=4, grid_w=4, batch=2, num_layers=2, seed=1)
N = W.num_tokens
SCORES = [reference.window_scores(lt.q_window, lt.k, modality=W.token_modality()).scores for lt in W.layers]
METHOD_CFGS = [pytest.param(AccKVConfig(method=m), id=m) for m in METHODS]
ADAPTIVE_CFGS = [pytest.param(AccKVConfig(method=m, head_budgets="adaptive"), id=f"{m}-adaptive")
                 for m in ("snapkv", "pyramidkv", "h2o", "lookm")] + [
    pytest.param(AccKVConfig(method="adakv", ada_floor=0.0), id="adakv-no-floor"),
    pytest.param(AccKVConfig(method="adakv", ada_floor=0.3), id="adakv-floor-0.3"),
    pytest.param(AccKVConfig(method="adakv", ada_floor=1.0), id="adakv-floor-1"),
]
SWITCHES = [pytest.param(c, id=name) for name, c in AccKVConfig().ablations().items()] + [
    pytest.param(AccKVConfig(pool_mode="avg"), id="avg-pool"),
    pytest.param(AccKVConfig(pool_kernel=1), id="no-pool"),
    pytest.param(AccKVConfig(head_renorm=True), id="head-renorm"),
    pytest.param(AccKVConfig(protect_text=True), id="protect-text"),
    pytest.param(AccKVConfig(merge_frees_budget=False), id="merge-keeps-budget"),
    pytest.param(AccKVConfig(gamma=2.0, rho_min=0.2), id="gamma-2"),
    pytest.param(AccKVConfig(video_from_layer=1), id="video-prior"),
    pytest.param(AccKVConfig(max_group=2, theta_audio=0.5, theta_video=0.5), id="loose-merges"),
    pytest.param(AccKVConfig(sink=0, window=5, recent=3, time_bin=7), id="small-constants"),
    pytest.param(AccKVConfig(pool_lift=0.0, pool_mode="avg"), id="zero-lift-avg"),
    pytest.param(AccKVConfig(redundancy_min=1.0), id="fallback-everywhere"),
    pytest.param(AccKVConfig(protect_positions=False), id="no-position-protection"),
    pytest.param(AccKVConfig(evidence="mean"), id="mean-evidence"),  # the text default (sinks ranked by the mean)
    pytest.param(AccKVConfig(evidence="mean", protect_sinks=True), id="mean-evidence-sinks-kept"),
    pytest.param(AccKVConfig(protect_sinks=False), id="window-evidence-sinks-ranked"),
    pytest.param(AccKVConfig(evidence="mean", protect_positions=False), id="mean-evidence-unprotected"),
    pytest.param(AccKVConfig(method="h2o", protect_positions=False), id="h2o-unprotected"),
    pytest.param(AccKVConfig(method="streaming", protect_positions=False), id="streaming-no-sinks"),
    pytest.param(AccKVConfig(method="streaming", protect_sinks=False), id="streaming-sinks-ranked"),
]


@pytest.fixture
def fp32_float_args(monkeypatch):
    """Launch the fused policy's kernels with every Python float argument rounded to fp32, as a GPU receives it
    (compiled, Triton types a float argument fp32; Triton 3.9's interpreter keeps it exact, so without this only a GPU
    or an older interpreter would show a float64 threshold passed as a float). Keyword arguments are constexprs."""
    def to_fp32(a):
        return struct.unpack("<f", struct.pack("<f", a))[0] if type(a) is float else a

    class Rounded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.kernel[grid](*map(to_fp32, args), **kwargs)

    for name, value in list(vars(fused_policy).items()):
        if name.endswith("_kernel"):
            monkeypatch.setattr(fused_policy, name, Rounded(value))


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Scratch and outputs start as 0xFF bytes, never zeros."""
    monkeypatch.setattr(fused_policy, "_alloc",
                        lambda n, device: torch.full((n,), 0xFF, dtype=torch.uint8, device=device))


def tokens(layer=1, lengths=None, device=DEVICE) -> LayerTokens:
    x = layer_inputs(workload_to(W, device), layer, SCORES[layer].to(device))
    if lengths is not None:
        x.lengths = torch.tensor(lengths, dtype=torch.int32, device=device).view(2, 2)
    return x


def assert_same(cfg, x, layer=1, num_layers=2, target=None, max_keep=None):
    """plan_layer_fused == plan_layer on x: keep sets, lengths, merge targets and weights, and the statistics.

    ``max_keep``: with adaptive head budgets the cap on a row (plan_layer's ``max_per_row``; None: no cap)."""
    if target is None:
        valid = torch.arange(x.scores.shape[-1], device=x.scores.device) < x.lengths[..., None].long()
        if x.valid is not None:
            valid = valid & x.valid
        target = budget_tokens(cfg, valid.sum(-1), layer, num_layers)
    if cfg.adaptive_heads:
        want = plan_layer(cfg, x, layer, num_layers, target=target, max_per_row=max_keep)
        max_keep = x.scores.shape[-1] if max_keep is None else max_keep
    else:
        want = plan_layer(cfg, x, layer, num_layers, target=target)
        max_keep = int(target.max())
    got = plan_layer_fused(cfg, x, layer, num_layers, target=target, max_keep=max_keep)
    a, b = got.plan, want.plan
    assert torch.equal(a.keep_lengths.cpu(), b.keep_lengths.cpu())
    width = a.keep.shape[-1]
    for i in range(a.keep.shape[0]):
        for j in range(a.keep.shape[1]):
            n = int(b.keep_lengths[i, j])
            assert torch.equal(a.keep[i, j, :n].cpu(), b.keep[i, j, :n].cpu()), (i, j)
            assert not bool(a.keep[i, j, n:width].any())  # the tail is zero, not poison
    assert (a.merge_target is None) == (b.merge_target is None)
    if b.merge_target is not None:
        assert torch.equal(a.merge_target.cpu(), b.merge_target.cpu())
        assert torch.equal(a.merge_weight.cpu(), b.merge_weight.cpu())
    assert torch.equal(got.rho.cpu(), want.rho.cpu()) and torch.equal(got.priority.cpu(), want.priority.cpu())
    assert torch.equal(got.kept_per_modality.cpu(), want.kept_per_modality.cpu())
    assert torch.equal(got.merged.cpu(), want.merged.cpu())
    return got


@pytest.mark.parametrize("cfg", METHOD_CFGS)
@pytest.mark.parametrize("budget", [pytest.param(0.5, id="50%"), pytest.param(0.1, id="10%"),
                                    pytest.param(37, id="37-tokens")])
def test_every_method_matches_the_reference_on_ragged_rows(cfg, budget):
    assert_same(cfg.replace(budget=budget), tokens(lengths=[N, 201, 63, N]))


@pytest.mark.parametrize("cfg", SWITCHES)
@pytest.mark.parametrize("layer", [0, 1])
def test_every_switch_matches_the_reference(cfg, layer):
    assert_same(cfg.replace(budget=0.2), tokens(layer), layer=layer)


@pytest.mark.parametrize("cfg", [
    pytest.param(AccKVConfig(gamma=2.0, rho_min=0.2), id="rho-min-0.2"),
    pytest.param(AccKVConfig(gamma=0.7, rho_min=0.3), id="gamma-0.7"),
])
@pytest.mark.parametrize("layer", [0, 1])
def test_float64_parameters_reach_the_kernels_exactly(cfg, layer, fp32_float_args):
    """Thresholds and weights the kernels use in float64 arrive as the float64 the reference uses, not as the fp32 a
    GPU makes of a float argument (with rho_min passed as a float, 0.2 became 0.2000000030 and moved a share by an
    ulp; Triton 3.6's interpreter showed it, 3.9's keeps float arguments exact)."""
    assert_same(cfg.replace(budget=0.2), tokens(layer), layer=layer)


def test_every_float64_parameter_travels_as_its_bits(monkeypatch):
    """Each threshold and weight the kernels use in float64 reaches its kernel as the bits of the config's value, at
    the parameter that reads it; no kernel argument is a Python float but the pool lift (fp32 in both policies). The
    rounding fixture above shows a float only where the data moves a result by its fp32 ulp (rho_min and gamma do
    here; theta_audio, theta_video, redundancy_min, align_lambda and ada_floor passed as floats went unnoticed)."""
    launches = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                names = list(inspect.signature(self.kernel.fn).parameters)
                launches.append((self.kernel.fn.__name__, dict(zip(names, args))))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name, value in list(vars(fused_policy).items()):
        if name.endswith("_kernel"):
            monkeypatch.setattr(fused_policy, name, Spy(value))
    acckv = AccKVConfig(budget=0.2, theta_audio=0.91, theta_video=0.93, gamma=0.7, rho_min=0.11,
                        redundancy_min=0.07, align_lambda=0.3)
    adakv = AccKVConfig(budget=0.2, method="adakv", ada_floor=0.3, align_lambda=0.3)
    assert_same(acckv, tokens(1))
    assert_same(adakv, tokens(1))
    want = {("_groups_kernel", "theta_a_bits"): 0.91, ("_groups_kernel", "theta_v_bits"): 0.93,
            ("_groups_kernel", "gamma_bits"): 0.7, ("_groups_kernel", "rho_min_bits"): 0.11,
            ("_groups_kernel", "redundancy_min_bits"): 0.07, ("_consume_kernel", "lam_bits"): 0.3,
            ("_ada_pool_kernel", "floor_bits"): 0.3}
    got = {}
    for kernel, args in launches:
        for name, value in args.items():
            assert type(value) is not float or (kernel, name) == ("_evidence_kernel", "lift"), (kernel, name, value)
            if name.endswith("_bits"):
                got[kernel, name] = struct.unpack("<d", struct.pack("<q", value))[0]
    assert got == want


# every float64 parameter's range admits these: 0.0 and 5e-324 have bits that Triton types i32 and specializes
# as a constexpr 1 when compiled; -0.0's are INT64_MIN
F64_EDGES = [0.0, -0.0, 1.0, -1.0, 0.2, 0.9, 5e-324, -5e-324, 1e-320, 2.2250738585072014e-308,
             1.7976931348623157e308]


@triton.jit
def _read_f64(OUT, bits):
    tl.store(OUT, fused_policy._f64(bits))


def test_f64_reads_back_every_float_exactly():
    """_f64(_f64_bits(x)) is x, bit for bit, whatever Triton types the bits as (here: the interpreter; on a GPU run
    of the tests, the compiled kernel)."""
    for x in F64_EDGES:
        out = torch.full((1,), 7.0, dtype=torch.float64, device=DEVICE)
        _read_f64[(1,)](out, fused_policy._f64_bits(x))
        assert struct.pack("<d", out.item()) == struct.pack("<d", x), x


_COMPILE_F64 = """
import os, sys, torch, triton, triton.language as tl
from tests.gpu_compile_check import install_compile_only_driver
reason = install_compile_only_driver(90)
if reason:
    print("SKIP", reason); sys.exit(0)
from acckv_triton import fused_policy

@triton.jit
def _read_f64(OUT, bits):
    tl.store(OUT, fused_policy._f64(bits))

out = torch.empty(1, dtype=torch.float64)
for x in %r:
    _read_f64.warmup(out, fused_policy._f64_bits(x), grid=(1,))  # specialized as a launch would be, compiled only
print("OK")
"""


def test_f64_compiles_for_every_typing_of_its_bits(tmp_path):
    """Compiled (for sm_90, no GPU needed), Triton types an int argument by its value: the bits of 0.0 and of tiny
    denormals are i32, and those of 5e-324 (== 1) a constexpr 1, which has no ``.to``: rho_min=5e-324 (or any
    float64 parameter at that value, each admits it) failed to compile."""
    script = tmp_path / "compile_f64.py"  # a file: @triton.jit reads its kernel's source
    script.write_text(_COMPILE_F64 % (F64_EDGES,))
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=path)
    done = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


@pytest.mark.parametrize("cfg", METHOD_CFGS)
def test_left_padding_and_stale_metadata(cfg):
    """Padding (valid False) and slots past the lengths hold garbage ids and scores: the plan is the reference's."""
    x = tokens(lengths=[N, 150, 90, N])
    x.valid = torch.arange(N, device=DEVICE).expand(2, 2, N) >= torch.tensor([[0], [11]], device=DEVICE)[:, None]
    stale = ~x.valid | (torch.arange(N, device=DEVICE) >= x.lengths[..., None].long())
    x.modality = torch.where(stale, torch.full_like(x.modality, 200), x.modality)
    x.scores = torch.where(stale, torch.full_like(x.scores, float("nan")), x.scores)
    assert_same(cfg.replace(budget=0.3), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_keys_in_every_dtype_and_window_by_position(dtype):
    x = tokens()
    x.keys = x.keys.to(dtype)
    x.position = torch.arange(N, dtype=torch.int32, device=DEVICE).expand(2, 2, N)
    x.window_range = (N - 40, N - 8)  # a window that is not the last tokens (a later prefill's question)
    for method in ("acckv", "lookm", "snapkv"):
        assert_same(AccKVConfig(budget=0.25, method=method), x)


def test_odd_sizes_one_token_and_a_text_only_row():
    x = tokens()
    for lengths in ([1, 1, 1, 1], [0, 2, 63, 257]):
        assert_same(AccKVConfig(budget=0.5), tokens(lengths=lengths))
    x.modality = torch.zeros_like(x.modality)
    assert_same(AccKVConfig(budget=0.25), x)


def test_target_below_the_protected_tokens():
    """Protection beyond the budget keeps priority order (sinks, then the newest of the window)."""
    for t in (1, 3, 6, 30):
        target = torch.full((2, 2), t, dtype=torch.int64, device=DEVICE)
        assert_same(AccKVConfig(budget=0.5), tokens(), target=target)


def test_bad_modality_is_refused_when_checked():
    x = tokens()
    x.modality = x.modality.clone()
    x.modality[1, 0, 7] = 9
    target = torch.full((2, 2), 50, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="x.modality must hold Modality ids"):
        plan_layer_fused(AccKVConfig(), x, target=target, max_keep=50, check=True)
    with pytest.raises(ValueError, match="max_keep"):
        plan_layer_fused(AccKVConfig(), tokens(), target=target, max_keep=-1)


@pytest.mark.parametrize("cfg", ADAPTIVE_CFGS)
@pytest.mark.parametrize("budget", [pytest.param(0.5, id="50%"), pytest.param(0.1, id="10%")])
def test_adaptive_head_budgets_match_the_reference(cfg, budget):
    """Ada-KV's allocation across the heads of a sequence: the same per-row targets and plans, on ragged rows."""
    assert_same(cfg.replace(budget=budget), tokens(lengths=[N, 201, 63, N]))


@pytest.mark.parametrize("extra", [0, 5, 60])
def test_adaptive_rows_capped_by_the_storage_room(extra):
    """An upkeep caps every row at the storage's room (at least the uniform target, as the cache sizes it): at the
    target, a little above it and far above it."""
    x = tokens(lengths=[N, 201, 63, N])
    for method in ("adakv", "kvzip"):
        cfg = AccKVConfig(method=method, budget=0.25)
        target = budget_tokens(cfg, x.lengths.long(), 1, 2)
        assert_same(cfg, x, target=target, max_keep=int(target.max()) + extra)


def test_adaptive_head_budgets_with_ties_across_heads():
    """Equal scores in several heads: the shared budget goes to the lower head, then the earlier token."""
    x = tokens()
    x.scores = torch.round(x.scores * 8) / 8  # a handful of distinct values: ties everywhere
    for budget in (0.5, 0.2, 0.05):
        assert_same(AccKVConfig(method="adakv", budget=budget, pool_kernel=1), x)


def test_a_target_above_max_keep_writes_nothing_past_the_plan_and_the_compaction_refuses_it():
    """max_keep is the host's bound (not checked: a sync); a target above it leaves keep_lengths beyond the plan's
    width, never an entry outside it, and compact_kv's plan check names it."""
    import acckv_triton as ak

    x = tokens()
    target = torch.full((2, 2), 40, dtype=torch.int64, device=DEVICE)
    cfg = AccKVConfig(method="snapkv", budget=0.5)
    res = plan_layer_fused(cfg, x, target=target, max_keep=25)
    want = plan_layer(cfg, x, target=target).plan
    assert res.plan.keep.shape[-1] == 25 and torch.equal(res.plan.keep_lengths.cpu(), want.keep_lengths.cpu())
    assert torch.equal(res.plan.keep.cpu(), want.keep[..., :25].cpu())  # each row's own first 25, nothing spilled
    k = torch.randn(2, 2, N, 16, device=DEVICE)
    with pytest.raises(ValueError, match="keep_lengths"):
        ak.compact_kv_(k, k.clone(), x.lengths.clone(), res.plan.keep, res.plan.keep_lengths)
    # LOOK-M's nearest-key search reads the plan: it stays within the width too (it read keep entries past it, then
    # keys at those garbage indices: a segfault under the interpreter)
    res = plan_layer_fused(AccKVConfig(method="lookm", budget=0.5), x, target=target, max_keep=3)
    assert int(res.plan.merge_target.max()) < 3 and int(res.plan.merge_target.min()) >= -1


def test_acckv_with_adaptive_head_budgets_is_refused_on_the_fused_path():
    x = LayerTokens(scores=SCORES[0], modality=W.token_modality(), lengths=torch.full((2, 2), N, dtype=torch.int32))
    with pytest.raises(ValueError, match="adaptive head budgets"):
        plan_layer_fused(AccKVConfig(head_budgets="adaptive"), x, 0, 2, target=torch.full((2, 2), 9), max_keep=9)


@pytest.mark.parametrize("budget", [pytest.param(0.5, id="50%"), pytest.param(0.1, id="10%")])
def test_low_redundancy_fallback_rows_match_the_reference(budget):
    """Rows whose keys are noise (nothing links) take the fallback, the others not: both paths in one call."""
    x = tokens()
    g = torch.Generator().manual_seed(7)
    keys = x.keys.clone()
    keys[0, 1] = torch.randn(keys.shape[2:], generator=g).to(keys.device, keys.dtype)
    keys[1, 0] = torch.randn(keys.shape[2:], generator=g).to(keys.device, keys.dtype)
    x.keys = keys.contiguous()
    assert_same(AccKVConfig(budget=budget), x)


@pytest.mark.parametrize("cfg", [pytest.param(AccKVConfig(method="adakv"), id="adakv"),
                                 pytest.param(AccKVConfig(method="adakv", ada_floor=0.7), id="adakv-floor-0.7"),
                                 pytest.param(AccKVConfig(method="kvzip"), id="kvzip")])
def test_adaptive_short_rows_and_a_dominant_head_under_the_storage_cap(cfg):
    """The cases where Ada-KV's bounds bind: a row shorter than its target (its floor clamps to its candidates and
    its unused budget goes to the other heads), a sequence whose pool holds fewer candidates than the budget it
    shares, and one head whose scores dominate, so that the storage's room caps it and the other head keeps its
    floor and no more. 0.7 is above its float32 and 0.7 * 70 floors to 49 in float64, to 48 in float32: the floor
    fraction must reach the kernel in float64."""
    short = tokens(lengths=[N, 20, 63, N])
    dominant = tokens()
    dominant.scores = dominant.scores.clone()
    dominant.scores[:, 0] *= 50  # head 0 of each sequence wins the whole shared pool unless capped
    for x in (short, dominant):
        for t in (102, 140):  # free budgets of 70 and 108 on the full rows (32 protected)
            target = torch.full((2, 2), t, dtype=torch.int64, device=DEVICE)
            for extra in (-30, 0, 30):  # -30: the room below the target (each row still capped at it)
                assert_same(cfg, x, target=target, max_keep=t + extra)


def test_inputs_the_kernels_would_read_out_of_bounds_are_broadcast_or_refused():
    """plan_layer_fused indexes every tensor by its strides up to [B, Hkv, N]: a target or lengths with a size-1 dim
    broadcasts as in plan_layer, a length past N counts N tokens (it read past the row and crashed), and a shape
    that does not broadcast is refused naming the argument."""
    x = tokens(lengths=[N, 201, 63, N])
    cfg = AccKVConfig(method="adakv", budget=0.3)
    assert_same(cfg, x, target=torch.tensor([[60], [30]], device=DEVICE))
    x.lengths = torch.tensor([[N + 7], [N + 3000]], dtype=torch.int32, device=DEVICE)
    for method in ("adakv", "acckv", "snapkv"):
        assert_same(AccKVConfig(method=method, budget=0.3), x, target=torch.full((2, 2), 50, device=DEVICE))
    target = torch.full((2, 2), 50, device=DEVICE)
    with pytest.raises(ValueError, match="target must have shape"):
        plan_layer_fused(cfg, x, target=target[:, 0], max_keep=N)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        plan_layer_fused(cfg, x, target=50, max_keep=N)
    with pytest.raises(TypeError, match="target must be an integer tensor"):  # a fraction of a slot was shared
        plan_layer_fused(cfg, x, target=target + 0.9, max_keep=N)
    x.valid = torch.ones(2, N, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="x.valid must have shape"):
        plan_layer_fused(cfg, x, target=target, max_keep=N)
    x.valid = None
    with pytest.raises(ValueError, match="max_keep"):
        plan_layer_fused(cfg, x, target=target, max_keep=True)
