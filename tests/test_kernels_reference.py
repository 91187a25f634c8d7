"""The PyTorch reference of fusion.kernels (the CPU path) and the argument checks.

The reference is checked against the plain PyTorch sequence (F.adaptive_avg_pool2d /
F.interpolate, F.layer_norm, torch.cat) in fp64, and its gradients with gradcheck.
These tests use no Triton kernel, so they are fast.
"""
import pytest
import torch
import torch.nn.functional as F

from fusion.kernels import (
    grid_merge,
    grid_merge_reference,
    naive_grid_merge,
    naive_pyramid_pool,
    pyramid_pool,
    pyramid_pool_reference,
)
from kernel_asserts import assert_close


def _plain(grids, size, mode, norms, eps=1e-5, layout="channel"):
    """F.adaptive_avg_pool2d / F.interpolate on NCHW, then F.layer_norm, then torch.cat."""
    outs = []
    for i, x in enumerate(grids):
        nchw = x.permute(0, 3, 1, 2)
        if mode == "area":
            r = F.adaptive_avg_pool2d(nchw, size)
        else:
            r = F.interpolate(nchw, size=size, mode="bilinear", align_corners=False)
        t = r.flatten(2).transpose(1, 2)
        if norms is not None and norms[i] is not None:
            t = F.layer_norm(t, (x.shape[-1],), norms[i][0], norms[i][1], eps)
        outs.append(t)
    return torch.cat(outs, -1 if layout == "channel" else 1)


SHAPES = [((24, 24), (27, 27), (64, 64), (37, 37)), ((7, 7), (1, 1), (16, 16)), ((5, 9), (13, 3))]


@pytest.mark.parametrize("mode", ["area", "bilinear"])
@pytest.mark.parametrize("size", [(1, 1), (7, 7), (12, 12), (16, 16), (24, 24), (32, 32), (5, 11)])
@pytest.mark.parametrize("shapes", SHAPES, ids=["vsre", "small", "rect"])
def test_reference_matches_plain_pytorch(mode, size, shapes):
    chans = [3, 1, 64, 257]
    B = 1 if len(shapes) == 4 else 2
    grids = [torch.randn(B, h, w, chans[i % 4], dtype=torch.float64) for i, (h, w) in enumerate(shapes)]
    norms = [None if i == 1 else (torch.randn(g.shape[-1], dtype=torch.float64),
                                  None if i == 2 else torch.randn(g.shape[-1], dtype=torch.float64))
             for i, g in enumerate(grids)]
    want = _plain(grids, size, mode, norms)
    assert_close(grid_merge_reference(grids, size, mode, norms), want, 1e-10, "reference")
    assert_close(naive_grid_merge(grids, size, mode, norms), want, 1e-10, "naive")
    assert_close(grid_merge(grids, size, mode, norms, backend="torch"), want, 1e-10, "grid_merge")


def test_reference_sequence_layout_and_strided_inputs():
    base = torch.randn(2, 8, 27, 27, dtype=torch.float64)
    x = base.permute(0, 2, 3, 1)  # [B, h, w, C] view of an NCHW tensor
    y = torch.randn(2, 9, 9, 8, dtype=torch.float64)[:, ::2, ::2]  # strided rows and columns
    want = _plain([x, y], (6, 6), "bilinear", None, layout="sequence")
    got = grid_merge([x, y], 6, "bilinear", layout="sequence", backend="torch")
    assert got.shape == (2, 72, 8)
    assert_close(got, want, 1e-12, "sequence")


@pytest.mark.parametrize("layout", ["channel", "sequence"])
@pytest.mark.parametrize("items_per_step", [1, 2])
def test_inference_path_in_batch_steps(monkeypatch, layout, items_per_step):
    """Without autograd the reference goes through the batch in steps written straight
    into the output; steps of 1 and 2 items over B=5 (a ragged last step) give the
    plain sequence's result, in fp64 and fp16, and the autograd path gives the same."""
    ref_mod = __import__("fusion.kernels.reference", fromlist=["STEP_BYTES"])
    size, C = (6, 6), 8
    monkeypatch.setattr(ref_mod, "STEP_BYTES", items_per_step * size[0] * size[1] * C * 8)
    grids = [torch.randn(5, 9, 9, C, dtype=torch.float64), torch.randn(5, 6, 6, C, dtype=torch.float64),
             torch.randn(5, 4, 3, C, dtype=torch.float64).transpose(1, 2)]
    norms = [(torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)), None,
             (torch.randn(C, dtype=torch.float64), None)]
    want = _plain(grids, size, "bilinear", norms, layout=layout)
    with torch.no_grad():
        got = grid_merge_reference(grids, size, "bilinear", norms, 1e-5, layout)
    assert_close(got, want, 1e-12, "stepped fp64")
    with torch.no_grad():
        half = grid_merge_reference([g.half() for g in grids], size, "bilinear", norms, 1e-5, layout)
    assert half.dtype == torch.float16
    assert_close(half, want, 2e-2, "stepped fp16")
    leaves = [g.clone().requires_grad_() for g in grids]
    whole = grid_merge_reference(leaves, size, "bilinear", norms, 1e-5, layout)
    assert whole.requires_grad
    assert_close(whole.detach(), got, 1e-12, "autograd path")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_low_precision_keeps_dtype(dtype):
    grids = [torch.randn(2, 27, 27, 16), torch.randn(2, 24, 24, 8)]
    norms = [(torch.randn(16), torch.randn(16)), None]
    want = _plain([g.double() for g in grids], (24, 24), "area",
                  [(norms[0][0].double(), norms[0][1].double()), None])
    got = grid_merge([g.to(dtype) for g in grids], 24, "area", norms, backend="torch")
    assert got.dtype == dtype
    assert_close(got, want, 2e-2 if dtype != torch.float32 else 1e-5, str(dtype))


def test_reference_gradcheck_fp64():
    grids = [torch.randn(1, 5, 7, 3, dtype=torch.float64, requires_grad=True),
             torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)]
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for mode in ("area", "bilinear"):
        for layout in ("channel", "sequence"):
            def f(g0, g1, w, b):
                return grid_merge_reference([g0, g1], (4, 5), mode, [(w, b), None], 1e-5, layout)
            assert torch.autograd.gradcheck(f, (*grids, w, b))
    t = torch.randn(2, 7 * 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pyramid_pool_reference(t, (7, 6), [(3, 3), (1, 1), (7, 4)]), (t,))


@pytest.mark.parametrize("grid,levels", [((24, 24), [12, 6, 3, 1]), ((27, 27), [24, (5, 7), 1, 27]),
                                         ((37, 16), [(37, 16), (10, 3)]), ((1, 1), [1])])
def test_pyramid_reference_matches_adaptive_pool(grid, levels):
    H, W = grid
    t = torch.randn(3, H * W, 5, dtype=torch.float64)
    pairs = [(lv, lv) if isinstance(lv, int) else lv for lv in levels]
    nchw = t.transpose(1, 2).reshape(3, 5, H, W)
    want = torch.cat([F.adaptive_avg_pool2d(nchw, p).flatten(2).transpose(1, 2) for p in pairs], 1)
    assert_close(pyramid_pool(t, grid, levels, backend="torch"), want, 1e-12, "pyramid")
    assert_close(naive_pyramid_pool(t, grid, pairs), want, 1e-12, "naive pyramid")
    assert_close(pyramid_pool(t.float(), grid, levels), want, 1e-5, "pyramid fp32")


# --------------------------------------------------------------------------------------
# Bad arguments: a ValueError / TypeError that names the argument
# --------------------------------------------------------------------------------------

def _g(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


BAD_MERGE = [
    (dict(grids=[]), ValueError, "grids"),
    (dict(grids=_g(2, 4, 4, 3)), TypeError, "grids"),
    (dict(grids=[_g(2, 4, 4, 3), _g(3, 4, 4, 3)]), ValueError, "batch"),
    (dict(grids=[_g(2, 4, 4)]), ValueError, "grids[0]"),
    (dict(grids=[torch.ones(2, 4, 4, 3, dtype=torch.int64)]), TypeError, "dtype"),
    (dict(grids=[_g(2, 4, 4, 3), _g(2, 4, 4, 3, dtype=torch.float16)]), ValueError, "dtype"),
    (dict(size=0), ValueError, "size"),
    (dict(size=(4, -1)), ValueError, "size"),
    (dict(size=(4, 4, 4)), TypeError, "size"),
    (dict(size=2.5), TypeError, "size"),
    (dict(mode="bicubic"), ValueError, "mode"),
    (dict(layout="stack"), ValueError, "layout"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(norms=[(torch.ones(4), torch.zeros(3))]), ValueError, "norms[0]"),
    (dict(norms=[(torch.ones(3), None), None]), ValueError, "norms"),
    (dict(norms=[torch.ones(3)]), TypeError, "norms[0]"),
    (dict(norms=[(torch.ones(3, dtype=torch.int32), None)]), TypeError, "norms[0]"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(grids=[_g(2, 4, 4, 3), _g(2, 4, 4, 5)], layout="sequence"), ValueError, "layout"),
]


@pytest.mark.parametrize("kwargs,exc,needle", BAD_MERGE, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_MERGE)])
def test_grid_merge_bad_arguments(kwargs, exc, needle):
    args = dict(grids=[_g(2, 4, 4, 3)], size=(2, 2))
    args.update(kwargs)
    with pytest.raises(exc) as info:
        grid_merge(**args)
    assert needle in str(info.value), str(info.value)


BAD_PYRAMID = [
    (dict(tokens=_g(2, 16, 3), grid=(4, 5)), ValueError, "tokens"),
    (dict(tokens=_g(16, 3)), ValueError, "tokens"),
    (dict(tokens=torch.ones(2, 16, 3, dtype=torch.int32)), TypeError, "tokens"),
    (dict(levels=[5]), ValueError, "levels[0]"),
    (dict(levels=[2, (1, 0)]), ValueError, "levels[1]"),
    (dict(levels=[]), ValueError, "levels"),
    (dict(levels=2), TypeError, "levels"),
    (dict(grid=0), ValueError, "grid"),
    (dict(backend="cpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("kwargs,exc,needle", BAD_PYRAMID, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_PYRAMID)])
def test_pyramid_pool_bad_arguments(kwargs, exc, needle):
    args = dict(tokens=_g(2, 16, 3), grid=4, levels=[2, 1])
    args.update(kwargs)
    with pytest.raises(exc) as info:
        pyramid_pool(**args)
    assert needle in str(info.value), str(info.value)


def test_triton_backend_rejects_float64():
    with pytest.raises(ValueError, match="float64"):
        grid_merge([torch.randn(1, 4, 4, 3, dtype=torch.float64)], 2, backend="triton")
