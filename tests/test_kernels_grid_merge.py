"""grid_merge: the Triton kernels (run by the Triton interpreter on CPU) against fp64 PyTorch.

Forward and backward (grids, LayerNorm weight and bias) are compared with the naive
PyTorch sequence evaluated in fp64 on the same (rounded) inputs: fp32 within 1e-5, fp16
and bf16 within 2e-2 (relative to max(1, |reference|)). The kernels load fp16/bf16 and
compute in fp32 (the interpreter's bf16 arithmetic would be wrong otherwise); what is
left is the rounding of the stored outputs (2^-9 for bf16, relative) and, on the tl.dot
path, the weights rounded to tf32. The default run covers every grid size, target, channel count,
dtype, batch size, layout and norm variant at least once; `pytest -m slow` runs the
full cartesian sweep and more random shapes.
"""
import itertools
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusion.kernels  # noqa: F401
from fusion.kernels import grid_merge, naive_grid_merge
from kernel_asserts import assert_close

GM = sys.modules["fusion.kernels.grid_merge"]  # the module (the package binds the function)
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def layernorm_slack(ref_in, specs, size, mode, norms):
    """The fp32 rounding a LayerNorm cannot help amplifying: ``2^-18 * kappa^2``, with
    ``kappa = max rms(v) / sqrt(var(v) + eps)`` over the merged vectors ``v`` a LayerNorm
    normalizes. Its backward divides by the standard deviation twice, so when the channels of
    a position nearly agree (few channels, as in ``C = 2``) any fp32 evaluation, PyTorch's
    own included, loses about ``kappa^2`` ulps; measured: at most 5.4e-7 * kappa^2 over 40
    such cases (PyTorch's fp32 path errs as much or more). Zero without LayerNorm."""
    if not norms:
        return 0.0
    with torch.no_grad():
        pre = naive_grid_merge([g.detach() for g in ref_in], size if isinstance(size, tuple) else (size, size),
                               mode, None, layout="channel")
    kappa, start = 1.0, 0
    for (_, _, c), n in zip(specs, norms):
        if n is not None:
            v = pre[..., start:start + c]
            k = v.pow(2).mean(-1).sqrt() / (v.var(-1, unbiased=False) + 1e-5).sqrt()
            kappa = max(kappa, k.max().item())
        start += c
    return 2.0 ** -18 * kappa ** 2


def _layout_as(x64, dtype, style):
    """``x64`` [B, h, w, C] in ``dtype``, stored contiguously, NCHW-permuted or sliced."""
    if style == "nchw":
        return x64.permute(0, 3, 1, 2).to(dtype).contiguous().permute(0, 2, 3, 1)
    if style == "sliced":
        B, h, w, C = x64.shape
        big = torch.zeros(B, h, w + 2, C + 3, dtype=dtype)
        big[:, :, 1:w + 1, :C] = x64.to(dtype)
        return big[:, :, 1:w + 1, :C]
    return x64.to(dtype).contiguous()


def _norms(chans, kind):
    """Per grid: None, or fp32 (weight, bias) pairs with parts dropped per ``kind``."""
    if kind is None:
        return None
    out = []
    for i, c in enumerate(chans):
        w = torch.randn(c) if kind in ("affine", "weight") else None
        b = torch.randn(c) if kind in ("affine", "bias") else None
        out.append(None if (kind == "mixed" and i % 2) else (w, b))
    return out


def check_merge(specs, size, mode="area", dtype=torch.float32, B=1, norm=None, style="contig",
                layout="channel", grad_grids=True):
    """Triton forward + backward of ``grid_merge`` against naive fp64 PyTorch."""
    masters = [torch.randn(B, h, w, c, dtype=torch.float64) for h, w, c in specs]
    grids = [_layout_as(m, dtype, style).requires_grad_(grad_grids) for m in masters]
    norms = _norms([c for _, _, c in specs], "affine" if norm == "mixed" else norm)
    if norm == "mixed":
        norms = [n if i % 2 == 0 else None for i, n in enumerate(norms)]
    params = [p for n in (norms or []) if n is not None for p in n if p is not None]
    for p in params:
        p.requires_grad_(True)
    out = grid_merge(grids, size, mode, norms, layout=layout, backend="triton")
    ref_in = [g.detach().double().requires_grad_(True) for g in grids]
    ref_norms = None if norms is None else [
        None if n is None else tuple(None if p is None else p.detach().double().requires_grad_(True) for p in n)
        for n in norms]
    ref = naive_grid_merge(ref_in, size if isinstance(size, tuple) else (size, size), mode, ref_norms,
                           layout=layout)
    tol = TOL[dtype]
    slack = layernorm_slack(ref_in, specs, size, mode, norms)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, tol, "forward", slack)
    go = torch.randn_like(ref).to(dtype)
    mine = [g for g in grids if grad_grids] + params
    theirs = [g for g in ref_in if grad_grids] + [p for n in (ref_norms or []) if n is not None
                                                  for p in n if p is not None]
    if not mine:
        return
    got = torch.autograd.grad(out, mine, go)
    want = torch.autograd.grad(ref, theirs, go.double())
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape
        assert_close(a, b, tol, f"grad {i} ({'grid' if i < len(grids) and grad_grids else 'norm'})", slack)


CASES = [  # (specs [(h, w, C)], size, mode, dtype, B, norm, style, layout)
    ([(24, 24, 64), (27, 27, 3)], 24, "area", torch.float32, 1, "affine", "contig", "channel"),
    ([(64, 64, 3), (37, 37, 1)], 24, "area", torch.float32, 1, "affine", "nchw", "channel"),
    ([(7, 7, 257)], 32, "bilinear", torch.float32, 1, "plain", "sliced", "channel"),
    ([(16, 16, 64), (1, 1, 3)], 12, "bilinear", torch.float16, 3, "affine", "contig", "channel"),
    ([(27, 27, 64), (24, 24, 64)], 7, "area", torch.float16, 1, None, "nchw", "sequence"),
    ([(37, 37, 3)], 16, "bilinear", torch.float32, 3, "weight", "contig", "channel"),
    ([(64, 64, 1), (1, 1, 64)], 1, "area", torch.float32, 1, "bias", "sliced", "channel"),
    ([(1, 1, 3), (7, 16, 64)], (7, 12), "area", torch.float32, 1, "mixed", "contig", "channel"),
    ([(27, 27, 40), (13, 13, 33)], 7, "area", torch.bfloat16, 2, "affine", "nchw", "channel"),
    ([(5, 5, 16)], 11, "bilinear", torch.bfloat16, 1, "plain", "sliced", "channel"),
]


@pytest.mark.parametrize("specs,size,mode,dtype,B,norm,style,layout", CASES)
def test_triton_matches_reference(specs, size, mode, dtype, B, norm, style, layout):
    check_merge(specs, size, mode, dtype, B, norm, style, layout)


def test_frozen_grids_only_norm_grads():
    """Frozen encoders: grids without grad, trainable LayerNorm (the tower's case)."""
    check_merge([(27, 27, 16), (24, 24, 8)], 24, norm="affine", grad_grids=False)


@pytest.fixture
def most_programs(monkeypatch):
    """Plans with as many programs as possible, whatever they re-read: one-column
    segments (``R = 1``: the FMA path), one-row bands, shared backward columns written
    colour by colour."""
    MP = sys.modules["fusion.kernels._merge_plan"]
    monkeypatch.setattr(MP, "_pick", lambda cands, target, resident=False:
                        min(cands, key=lambda c: (c.payload[0], -c.payload[1])))
    yield MP


@pytest.mark.parametrize("mode,h,H", [("area", 11, 7), ("bilinear", 4, 11), ("bilinear", 13, 5)])
def test_multi_program_plans_match_one_program(mode, h, H, most_programs):
    """The plans a GPU gets (column segments, row bands, backward colours) change the
    launch, not the result: the most-programs plan against the one-program CPU plan."""
    x = torch.randn(1, h, h, 5)
    w, b = torch.randn(5), torch.randn(5)
    g = torch.randn(1, H * H, 5)
    args = ([x], [w], [b], [True])
    many = most_programs.bwd_plan(h, h, H, H, 5, mode, True, True, 1, 1000)
    assert many.tile.R == 1 and (len(many.launches) > 1 or mode == "bilinear" and H < h), many.tile
    outs = [GM.grid_merge_forward(*args, H, H, mode, 1e-5, "channel", sms=sms) for sms in (0, 1000)]
    assert_close(outs[1], outs[0], 1e-6, "multi-program forward")
    grads = [GM.grid_merge_backward(g, *args, [True], H, H, mode, 1e-5, "channel", sms=sms) for sms in (0, 1000)]
    for a, c in zip(*grads):
        assert_close(c, a, 1e-6, "multi-program backward")


def test_small_batch_plans_match_one_program(h=27):
    """At B = 1 a grid that fits in L2 takes the plan that fills the SMs (narrow segments,
    many bands, see kernels/_merge_plan.py): the same result as the one-program CPU plan."""
    MP = sys.modules["fusion.kernels._merge_plan"]
    x = torch.randn(1, h, h, 40)
    w, b = torch.randn(40), torch.randn(40)
    g = torch.randn(1, 24 * 24, 40)
    args = ([x], [w], [b], [True])
    h100 = dict(sms=132, l2=50 << 20)
    assert len(MP.fwd_plan(h, h, 24, 24, 40, "area", True, 1, **h100, n_vec=2, es=4).progs) >= 132
    outs = [GM.grid_merge_forward(*args, 24, 24, "area", 1e-5, "channel", **kw) for kw in (dict(sms=0), h100)]
    assert_close(outs[1], outs[0], 1e-6, "small-batch forward")
    grads = [GM.grid_merge_backward(g, *args, [True], 24, 24, "area", 1e-5, "channel", **kw)
             for kw in (dict(sms=0), h100)]
    for a, c in zip(*grads):
        assert_close(c, a, 1e-6, "small-batch backward")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fma_path_low_precision(dtype, most_programs):
    """The FMA path (fewer than 16 positions a program: wide grids on a GPU), two channel
    parts, in bf16 and fp16, forward and backward against fp64."""
    check_merge([(11, 11, 40)], 7, "area", dtype, 1, "affine", "nchw")


@pytest.mark.parametrize("h,H", [(9, 8), (9, 6)])
def test_siglip_width_launch_low_precision(h, H):
    """SigLIP's 1152 = 1024 + 128 channels with a trainable encoder, in the launch a GPU
    gets: 8 positions a program on the FMA path, the rest held flat, part-1 channel runs
    (``Tile.contig``), the per-segment weight table; 9 -> 8 is 27 -> 24's window pattern,
    9 -> 6 leaves two of the 8 positions to the table's zeros. bf16 against fp64."""
    MP = sys.modules["fusion.kernels._merge_plan"]
    for pl in (MP.fwd_plan(h, h, H, H, 1152, "area", True, 1, 0, 2, 2),
               MP.bwd_plan(h, h, H, H, 1152, "area", True, True, 1, 0, 3, 2)):
        assert (pl.tile.R, pl.tile.has_rest, pl.tile.use_dot, pl.seg) == (8, True, False, H), pl.tile
    assert MP.bwd_plan(h, h, H, H, 1152, "area", True, True, 1, 0, 3, 2).tile.contig == 2
    check_merge([(h, h, 1152)], H, "area", torch.bfloat16, 1, "affine", "nchw")


def test_int64_offsets_for_items_past_int32(monkeypatch):
    """Offsets within a batch item are int32 unless an item spans 2**31 elements or more
    (``IDX64``): the rule on shapes and strides alone (meta tensors), and the int64 kernels
    give the same results."""
    big = torch.empty(0, device="meta").as_strided((2, 3, 3, 8), (0, 2 ** 30, 8, 1))
    small = torch.empty(0, device="meta").as_strided((2, 3, 3, 8), (2 ** 40, 24, 8, 1))
    assert GM._needs_int64(big) and not GM._needs_int64(small)  # the batch stride never counts
    monkeypatch.setattr(GM, "_needs_int64", lambda *ts: True)
    check_merge([(9, 9, 40)], 8, "area", torch.float32, 2, "affine", "nchw")


def test_layernorm_wider_than_the_kernel_is_refused_by_name():
    """Past MAX_NORM_CHANNELS a LayerNorm grid does not fit the register budget: the Triton
    backend says so, naming the grid and the limit; the PyTorch path takes it."""
    MP = sys.modules["fusion.kernels._merge_plan"]
    C = MP.MAX_NORM_CHANNELS + 1
    x = torch.randn(1, 2, 2, C, requires_grad=True)  # a trainable encoder: the widest backward
    norms = [(torch.ones(C), torch.zeros(C))]
    with pytest.raises(ValueError, match=rf"grids\[0\] has {C} channels.*up to {MP.MAX_NORM_CHANNELS}"):
        grid_merge([x], 1, norms=norms, backend="triton")
    want = torch.nn.functional.layer_norm(x.detach().mean((1, 2)), (C,), torch.ones(C))
    assert_close(grid_merge([x], 1, norms=norms, backend="torch")[:, 0], want, 1e-5, "torch path")
    # the limit is real: every variant of an area merge holds MAX_NORM_CHANNELS, bilinear
    # enlargement with a trainable encoder 4352 = 4096 + 256 (two cached rows, two pending
    # rows; 4353 channels take a 512-channel rest)
    for need_dx in (False, True):
        assert MP.fits(24, 7, MP.MAX_NORM_CHANNELS, "area", True, need_dx, 2, 3)
    assert not MP.fits(24, 7, MP.MAX_NORM_CHANNELS + 1, "area", True, True, 2, 3)
    assert MP.fits(7, 24, 4352, "bilinear", True, True, 2, 3)
    assert not MP.fits(7, 24, 4353, "bilinear", True, True, 2, 3)


def test_backward_is_deterministic():
    x = torch.randn(1, 37, 37, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    runs = []
    for _ in range(2):
        out = grid_merge([x], 24, norms=[(w, None)], backend="triton")
        runs.append(torch.autograd.grad(out, [x, w], torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 40), w=st.integers(1, 40), H=st.integers(1, 33), W=st.integers(1, 33),
       C=st.integers(1, 40), B=st.integers(1, 2), mode=st.sampled_from(["area", "bilinear"]),
       norm=st.sampled_from([None, "affine", "plain"]))
def test_random_shapes(h, w, H, W, C, B, mode, norm):
    check_merge([(h, w, C)], (H, W), mode, torch.float32, B, norm)


# --------------------------------------------------------------------------------------
# torch.library registration: opcheck, torch.compile(fullgraph=True), torch.export
# --------------------------------------------------------------------------------------

def _small():
    x = torch.randn(2, 9, 7, 4, requires_grad=True)
    y = torch.randn(2, 5, 5, 4, requires_grad=True)
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    return x, y, w, b


def test_opcheck():
    x, y, w, b = _small()
    torch.library.opcheck(torch.ops.fusion.grid_merge.default,
                          ([x, y], [w, torch.empty(0)], [b, torch.empty(0)], [True, False], 6, 6, "area",
                           1e-5, "channel"))


def test_compile_fullgraph_aot_eager():
    """Dynamo + AOTAutograd trace through the custom op (fake impl + autograd) without breaks."""
    x, y, w, b = _small()

    def f(x, y, w, b):
        return grid_merge([x, y], 6, "bilinear", [(w, b), None], backend="triton").square().sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y, w, b)
    grads = torch.autograd.grad(got, [x, y, w, b])
    want = f(x, y, w, b)
    wgrads = torch.autograd.grad(want, [x, y, w, b])
    assert_close(got, want, 1e-5, "compiled forward")
    for a, c in zip(grads, wgrads):
        assert_close(a, c, 1e-5, "compiled backward")


def test_export():
    class M(torch.nn.Module):
        def forward(self, x, y):
            return grid_merge([x, y], 6, layout="sequence", backend="triton")

    x, y, _, _ = _small()
    ep = torch.export.export(M(), (x.detach(), y.detach()))
    assert "fusion.grid_merge" in str(ep.graph)
    assert_close(ep.module()(x.detach(), y.detach()), M()(x.detach(), y.detach()), 0, "exported")


@pytest.mark.slow
def test_compile_inductor():
    x, y, w, b = _small()

    def f(x, y, w, b):
        return grid_merge([x, y], 6, "area", [(w, b), None], backend="triton") * 2

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x, y, w, b)
    assert_close(got, f(x, y, w, b), 1e-6, "inductor")


# --------------------------------------------------------------------------------------
# Slow: the full sweep of the shapes, and many more random shapes
# --------------------------------------------------------------------------------------

GRIDS, TARGETS, CHANNELS = (1, 7, 16, 24, 27, 37, 64), (1, 7, 12, 16, 24, 32), (1, 3, 64, 257)
SWEEP = list(itertools.product(GRIDS, TARGETS, CHANNELS, (1, 3), (torch.float32, torch.float16, torch.bfloat16),
                               ("affine", None)))


@pytest.mark.slow
@pytest.mark.parametrize("g,t,c,B,dtype,norm", SWEEP)
def test_sweep(g, t, c, B, dtype, norm):
    idx = SWEEP.index((g, t, c, B, dtype, norm))
    check_merge([(g, g, c)], t, ("area", "bilinear")[idx % 2], dtype, B, norm,
                ("contig", "nchw", "sliced")[idx % 3])


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(1, 70), st.integers(1, 70), st.integers(1, 300)),
                       min_size=1, max_size=3),
       H=st.integers(1, 40), W=st.integers(1, 40), B=st.integers(1, 3),
       mode=st.sampled_from(["area", "bilinear"]), norm=st.sampled_from([None, "affine", "plain", "mixed"]),
       style=st.sampled_from(["contig", "nchw", "sliced"]))
def test_random_shapes_many(shapes, H, W, B, mode, norm, style):
    check_merge(shapes, (H, W), mode, torch.float32, B, norm, style)
