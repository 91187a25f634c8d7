"""window_attention: the Triton kernels (interpreter on CPU) and the PyTorch path against an fp64 oracle.

The oracle (:func:`fusion.kernels.naive_window_attention`) derives every query cell's
window from ATen's ``F.adaptive_avg_pool2d`` and runs dense masked attention over all
tokens in fp64; forward and the gradients of q, every key and every value are compared.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion.kernels import area_windows, naive_window_attention, window_attention
from kernel_asserts import assert_close

WA = sys.modules["fusion.kernels.window_attention"]
WP = sys.modules["fusion.kernels._window_plan"]  # the launch plan (window_plan reads its TILES)
ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def check(grids, size, B=2, heads=2, d=16, dtype=torch.float32, backend="triton", strided=False, scale=None):
    """Forward and all gradients against the fp64 oracle; returns the outputs for further checks."""
    win = area_windows(grids, size)
    HD, M = heads * d, win.num_queries
    gen = torch.Generator().manual_seed(1)
    q64 = torch.randn(B, M, HD, generator=gen, dtype=torch.float64)
    k64 = [torch.randn(B, win.tokens(i), HD, generator=gen, dtype=torch.float64) for i in range(len(grids))]
    v64 = [torch.randn(B, win.tokens(i), HD, generator=gen, dtype=torch.float64) for i in range(len(grids))]
    if strided:  # q as the transpose of a [B, HD, M] buffer
        q = q64.transpose(1, 2).to(dtype).contiguous().transpose(1, 2).requires_grad_()
    else:
        q = q64.to(dtype).requires_grad_()
    ks = [k.to(dtype).requires_grad_() for k in k64]
    vs = [v.to(dtype).requires_grad_() for v in v64]
    out = window_attention(q, ks, vs, win, heads, scale=scale, backend=backend)
    assert out.shape == (B, M, HD) and out.dtype == dtype
    refs = [t.clone().requires_grad_() for t in [q64] + k64 + v64]
    ref = naive_window_attention(refs[0], refs[1:1 + len(grids)], refs[1 + len(grids):], win.grids, win.size,
                                 heads, scale if scale is not None else d ** -0.5)
    tol = TOL[dtype]
    assert_close(out, ref, tol, f"forward {grids}->{size} {dtype} {backend}")
    go = torch.randn(B, M, HD, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, [q] + ks + vs, go.to(dtype))
    want = torch.autograd.grad(ref, refs, go)
    names = ["dq"] + [f"dk{i}" for i in range(len(grids))] + [f"dv{i}" for i in range(len(grids))]
    for name, g, w in zip(names, got, want):
        assert g.dtype == dtype
        assert_close(g, w, tol, f"{name} {grids}->{size} {dtype} {backend}")
    return out, got


CASES = [  # (grids, query grid, B, heads, d)
    ([(4, 4), (5, 5), (6, 6), (7, 7)], (4, 4), 2, 2, 16),      # tiny preset: 4 encoders, overlapping windows
    ([(8, 8), (12, 12)], (4, 4), 1, 1, 32),                    # multiples of the grid: Cambrian's blocks
    ([(3, 5), (9, 2)], (4, 3), 2, 3, 8),                       # non-square, enlarging and shrinking
    ([(27, 27), (13, 13)], (24, 24), 1, 1, 16),                # several bands, seams (27->24 shares rows)
]


@pytest.mark.parametrize("grids,size,B,heads,d", CASES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_fp64_oracle(grids, size, B, heads, d, backend):
    check(grids, size, B, heads, d, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    check([(4, 4), (5, 5), (6, 6), (7, 7)], (4, 4), 2, 2, 16, dtype=dtype)
    check([(27, 27), (13, 13)], (24, 24), 1, 1, 16, dtype=dtype, strided=True)


def test_odd_head_dim_strided_scale_and_float64():
    check([(5, 7), (3, 3)], (2, 3), 2, 3, 5, strided=True, scale=0.3)  # d = 5: a masked head-dim tile
    check([(5, 7), (3, 3)], (2, 3), 2, 3, 5, dtype=torch.float64, backend="torch")


def test_more_encoders_than_slots():
    """Five encoders: two launches, combined by their log-sum-exp (forward) and summed dq."""
    grids = [(4, 4), (5, 5), (6, 6), (7, 7), (2, 3)]
    assert len(grids) > WA.MAX_SLOTS
    check(grids, (4, 4), 2, 2, 16)


def test_seams_many_bands_and_enlarging(monkeypatch):
    """Force small bands (2 query rows) so that nearly every band boundary has a seam, with
    enlarging grids (one key row feeds several query rows) that make the planner widen them."""
    tiles = {k: (16, keys, warps) for k, (_, keys, warps) in WP.TILES.items()}
    monkeypatch.setattr(WP, "TILES", tiles)
    WA.window_plan.cache_clear()
    try:
        grids, size = [(19, 8), (7, 4), (8, 8)], (20, 8)
        plan = WA.window_plan(size, tuple(grids), 16, torch.float32)
        assert plan.bwd.n_bands >= 3 and max(plan.seam_rows) >= 1
        win = area_windows(grids, size)
        assert plan.bwd.BY > 2 and WA._bands_ok(win, plan.bwd.BY) and not WA._bands_ok(win, 2)
        check(grids, size, 2, 1, 16)
        check(grids, size, 1, 1, 16, dtype=torch.float16)
    finally:
        WA.window_plan.cache_clear()


def test_backward_is_deterministic_and_backends_agree():
    win = area_windows([(14, 27), (7, 13)], (12, 24))  # 6 backward bands, seams in both grids
    assert WA.window_plan(win.size, win.grids, 8, torch.float32).bwd.n_bands > 2
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 288, 16, generator=gen, requires_grad=True)
    ks = [torch.randn(1, win.tokens(i), 16, generator=gen, requires_grad=True) for i in range(2)]
    vs = [torch.randn(1, win.tokens(i), 16, generator=gen, requires_grad=True) for i in range(2)]
    go = torch.randn(1, 288, 16, generator=gen)
    runs = []
    for backend in ("triton", "triton", "torch"):
        out = window_attention(q, ks, vs, win, 2, backend=backend)
        runs.append((out,) + torch.autograd.grad(out, [q] + ks + vs, go))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)  # bit for bit: no atomics
    for a, b in zip(runs[0], runs[2]):
        assert_close(a, b, 1e-5, "triton vs torch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compile_launches_are_the_gpu_launches(dtype):
    """What the compile report compiles is what a CUDA launch runs: the same kernels, grids,
    arguments and constexprs as the launches the interpreter runs here, except the operands
    (bf16 multiplies in bf16 on tensor cores; the interpreter needs fp32) and the register cap."""
    grids, size, heads, d, B = ((24, 24), (27, 27), (64, 64), (24, 24), (5, 7)), (24, 24), 2, 64, 3
    gpu = WA.compile_launches(size, grids, heads, d, dtype, B)
    win = area_windows(grids, size)
    q = torch.empty(B, win.num_queries, heads * d, dtype=dtype)
    ks = [torch.empty(B, win.tokens(i), heads * d, dtype=dtype) for i in range(len(grids))]
    outs, lses, here = WA.forward_launches(q, ks, ks, win, heads, d ** -0.5)
    here += WA.backward_launches(q, q, ks, ks, outs[0], lses[0], win, heads, d ** -0.5)[4]
    assert [g.label for g in gpu] == ["window_attention.fwd"] * 2 + ["window_attention.bwd"] * 2
    want_opd = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    for g, h in zip(gpu, here):
        assert (g.kernel, g.grid, g.num_warps, g.num_stages) == (h.kernel, h.grid, h.num_warps, h.num_stages)
        assert [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in g.args] == \
            [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in h.args]
        assert {k: v for k, v in g.constexprs.items() if k not in ("OPD", "PREC")} == \
            {k: v for k, v in h.constexprs.items() if k not in ("OPD", "PREC")}
        assert str(g.constexprs["OPD"]) == want_opd and g.maxnreg == WA.MAX_REGISTERS and h.maxnreg is None
        assert g.constexprs["PREC"] == "ieee"
    assert str(here[0].constexprs["OPD"]) == "fp32"


def _aten_runs(n_in, n_out):
    w = F.adaptive_avg_pool1d(torch.eye(n_in, dtype=torch.float64).unsqueeze(1), n_out).squeeze(1)
    return [torch.nonzero(w[:, i] > 0).flatten().tolist() for i in range(n_out)]


def test_windows_are_adaptive_pooling_windows():
    """The run tables (grid_merge's area taps) against ATen: a token is in a cell's window
    exactly when adaptive average pooling gives it a weight there; positions index the
    token's slot in the window of the cell containing its centre (Cambrian's for multiples)."""
    for grid, size in [((27, 27), (24, 24)), ((64, 37), (24, 24)), ((3, 5), (7, 2)), ((12, 12), (4, 4))]:
        win = area_windows([grid], size)
        h, w = grid
        pooled = F.adaptive_avg_pool2d(torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w), size)
        want = pooled.view(h * w, -1).t() > 0  # [cells, tokens]
        idx, valid = win.gather_index(0, "cpu")
        got = torch.zeros_like(want)
        got[torch.arange(idx.shape[0])[:, None].expand_as(idx)[valid], idx[valid]] = True
        assert torch.equal(got, want), (grid, size)
        rows, cols = _aten_runs(h, size[0]), _aten_runs(w, size[1])
        mw = max(map(len, cols))
        pos = win.positions(0, "cpu").tolist()
        for t in range(h * w):
            r, c = divmod(t, w)
            y, x = int((r + 0.5) * size[0] / h), int((c + 0.5) * size[1] / w)  # the cell holding its centre
            assert pos[t] == rows[y].index(r) * mw + cols[x].index(c), (grid, size, t)
    k = 3  # multiples: Cambrian's (r % k) * k + c % k
    pos = area_windows([(12, 12)], 4).positions(0, "cpu").view(12, 12)
    r, c = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    assert torch.equal(pos, (r % k) * k + c % k)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_shapes(data):
    size = (data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9)))
    n = data.draw(st.integers(1, 3))
    grids = [(data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))) for _ in range(n)]
    heads = data.draw(st.integers(1, 2))
    check(grids, size, 1, heads, data.draw(st.sampled_from([4, 16, 17])))


def test_opcheck_compile_export():
    win = area_windows([(5, 5), (2, 3)], (4, 4))
    q = torch.randn(2, 16, 8, requires_grad=True)
    ks = [torch.randn(2, 25, 8, requires_grad=True), torch.randn(2, 6, 8, requires_grad=True)]
    vs = [torch.randn(2, 25, 8, requires_grad=True), torch.randn(2, 6, 8, requires_grad=True)]
    for use_triton in (True, False):
        torch.library.opcheck(torch.ops.fusion.window_attention.default,
                              (q, ks, vs, [5, 5, 2, 3], 4, 4, 2, 0.5, use_triton))

    def f(q, k0, k1, v0, v1):
        return window_attention(q, [k0, k1], [v0, v1], win, 2, backend="triton")

    args = (q, ks[0], ks[1], vs[0], vs[1])
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    g1 = torch.autograd.grad(got.square().sum(), args)
    want = f(*args)
    g2 = torch.autograd.grad(want.square().sum(), args)
    assert_close(got, want, 1e-6, "compiled forward")
    for a, b in zip(g1, g2):
        assert_close(a, b, 1e-6, "compiled backward")

    class M(torch.nn.Module):
        def forward(self, *a):
            return f(*a)

    ep = torch.export.export(M(), tuple(a.detach() for a in args))
    assert "fusion.window_attention" in str(ep.graph)


def _call(q=None, keys=None, values=None, windows=None, heads=2, **kw):
    win = area_windows([(5, 5), (2, 3)], (4, 4))
    q = torch.randn(1, 16, 8) if q is None else q
    keys = [torch.randn(1, 25, 8), torch.randn(1, 6, 8)] if keys is None else keys
    values = [torch.randn(1, 25, 8), torch.randn(1, 6, 8)] if values is None else values
    return window_attention(q, keys, values, win if windows is None else windows, heads, **kw)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: _call(q=torch.randn(1, 15, 8)), ValueError, ["q has 15 query tokens", "(4, 4)", "[B, Gh*Gw"]),
    (lambda: _call(heads=3), ValueError, ["8 channels", "heads=3"]),
    (lambda: _call(heads=0), ValueError, ["heads=0", "positive int"]),
    (lambda: _call(keys=[torch.randn(1, 25, 8)]), ValueError, ["keys has 1 tensors", "2 grids"]),
    (lambda: _call(values=torch.randn(1, 25, 8)), TypeError, ["values must be a list"]),
    (lambda: _call(keys=[torch.randn(1, 24, 8), torch.randn(1, 6, 8)]), ValueError,
     ["keys[0] has shape (1, 24, 8)", "(5, 5)", "(1, 25, 8)"]),
    (lambda: _call(values=[torch.randn(1, 25, 8).double(), torch.randn(1, 6, 8)]), ValueError,
     ["values[0] is torch.float64", "q is torch.float32", "one dtype"]),
    (lambda: _call(windows=[(5, 5), (2, 3)]), TypeError, ["windows must be a WindowTable", "area_windows"]),
    (lambda: _call(scale=-1.0), ValueError, ["scale=-1.0", "positive"]),
    (lambda: _call(backend="cuda"), ValueError, ["backend", "'cuda'", "['auto', 'triton', 'torch']"]),
    (lambda: area_windows([(5, 0)], 4), ValueError, ["grids[0]", "positive"]),
    (lambda: area_windows("5x5", 4), TypeError, ["grids='5x5'", "list of encoder grid sizes"]),
])
def test_bad_inputs_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    missing = [w for w in words if w not in str(info.value)]
    assert not missing, f"message lacks {missing}: {info.value}"


@pytest.mark.parametrize("dtypes", ["float16", pytest.param("float32,bfloat16", marks=pytest.mark.slow)])
def test_traffic_within_limit(tmp_path, dtypes):
    """The kernels read each key / value row once per band of query rows that needs it: at
    most 1.2x the minimal bytes, forward and backward (vsre grids; benchmarks/bench_sva.py)."""
    args = ["--traffic-dtypes", dtypes]
    out = tmp_path / "traffic.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sva.py"), "--traffic", "--json", str(out),
                           "--traffic-heads", "1", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * len(dtypes.split(",")), proc.stdout
    for r in rows:  # >= 1: every key and value is needed, so less means the counting broke
        assert 1.0 <= r["ratio"] <= 1.2, f"{r['op']} {r['dtype']}: {r['ratio']:.3f}\n{proc.stdout}"


def test_fp32_backward_compiles_without_spills():
    """The fp32 launches over vsre's four grids (16 heads x 64, B = 16), compiled for sm_80/86/90
    as a GPU launch specialises them (``benchmarks/compile_aot.py``, TRITON_INTERPRET unset):
    ptxas reports no spill and Triton's shared memory is within each target's per-block limit.
    At 2 pipeline stages the backward spilled 16 B/thread at the 255-register cap on sm_90
    (``_window_plan.STAGES``); the default compile-report test covers fp16 / bf16 only."""
    code = r'''
import json, sys, torch
sys.path.insert(0, "benchmarks")
from compile_aot import compile_launch
from fusion.kernels import window_attention as WA
WA = sys.modules["fusion.kernels.window_attention"]
launches = WA.compile_launches((24, 24), ((24, 24), (27, 27), (64, 64), (24, 24)), 16, 64, torch.float32, 16)
rows = []
for arch in (80, 86, 90):
    for l in launches:
        c = compile_launch(l, arch)
        rows.append(dict(arch=arch, label=l.label, stages=l.num_stages, regs=c.regs, spills=c.spills,
                         shared=c.shared, error=c.error))
print(json.dumps(rows))
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    smem = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
    assert {(r["arch"], r["label"]) for r in rows} == {(a, f"window_attention.{p}") for a in smem
                                                       for p in ("fwd", "bwd")}
    for r in rows:
        assert r["error"] is None and r["regs"] > 0, r  # ptxas really reported
        assert r["spills"] == 0 and r["shared"] <= smem[r["arch"]], r
