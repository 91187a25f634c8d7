"""pyramid_pool: the Triton kernels (Triton interpreter on CPU) against fp64 adaptive pooling.

Tolerances relative to max(1, |reference|): fp32 1e-5; fp16 and bf16 2e-2 (loads are cast
to fp32, sums run in fp32; the stored outputs' rounding and tf32 weights remain).
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion.kernels import pyramid_pool
from kernel_asserts import assert_close

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _pooled(t, grid, levels):
    """F.adaptive_avg_pool2d per level on the NCHW view, concatenated: the definition."""
    B, _, C = t.shape
    nchw = t.transpose(1, 2).reshape(B, C, *grid)
    pairs = [(lv, lv) if isinstance(lv, int) else lv for lv in levels]
    return torch.cat([F.adaptive_avg_pool2d(nchw, p).flatten(2).transpose(1, 2) for p in pairs], 1)


def check_pyramid(grid, levels, C, B=1, dtype=torch.float32, strided=False):
    H, W = grid
    master = torch.randn(B, H * W, C, dtype=torch.float64)
    if strided:  # tokens as a transposed [B, C, N] buffer: channel stride N
        x = master.transpose(1, 2).to(dtype).contiguous().transpose(1, 2)
    else:
        x = master.to(dtype)
    x.requires_grad_(True)
    out = pyramid_pool(x, grid, levels, backend="triton")
    ref_in = master.clone().requires_grad_(True)
    ref = _pooled(ref_in, grid, levels)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, TOL[dtype], "forward")
    go = torch.randn_like(ref).to(dtype)
    got, = torch.autograd.grad(out, x, go)
    want, = torch.autograd.grad(ref, ref_in, go.double())
    assert_close(got, want, TOL[dtype], "backward")


@pytest.mark.parametrize("grid,levels,C,B,dtype,strided", [
    ((24, 24), [12, 6, 3, 1], 64, 1, torch.float32, False),
    ((27, 27), [24, (5, 7), 1, 27], 3, 3, torch.float16, True),
    ((37, 16), [(37, 16), (10, 3), 7], 257, 1, torch.float32, False),
    ((1, 1), [1], 1, 2, torch.float32, True),
    ((24, 24), [12, 5, 1], 40, 2, torch.bfloat16, True),
])
def test_triton_matches_adaptive_pool(grid, levels, C, B, dtype, strided):
    check_pyramid(grid, levels, C, B, dtype, strided)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(H=st.integers(1, 40), W=st.integers(1, 40), C=st.integers(1, 70), data=st.data())
def test_random_shapes(H, W, C, data):
    n = data.draw(st.integers(1, 4))
    levels = [(data.draw(st.integers(1, H)), data.draw(st.integers(1, W))) for _ in range(n)]
    check_pyramid((H, W), levels, C)


def test_opcheck_compile_export():
    x = torch.randn(2, 36, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.fusion.pyramid_pool.default, (x, 6, 6, [3, 3, 1, 2]))

    def f(x):
        return pyramid_pool(x, 6, [3, (1, 2)], backend="triton")

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    g1, = torch.autograd.grad(got.square().sum(), x)
    want = f(x)
    g2, = torch.autograd.grad(want.square().sum(), x)
    assert_close(got, want, 1e-6, "compiled forward")
    assert_close(g1, g2, 1e-6, "compiled backward")

    class M(torch.nn.Module):
        def forward(self, x):
            return f(x)

    ep = torch.export.export(M(), (x.detach(),))
    assert "fusion.pyramid_pool" in str(ep.graph)


@pytest.mark.slow
@pytest.mark.parametrize("g", [1, 7, 16, 24, 27, 37, 64])
@pytest.mark.parametrize("C", [1, 3, 64, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sweep(g, C, dtype):
    levels = sorted({max(1, g // d) for d in (1, 2, 3, 4, 8)} | {1}, reverse=True)
    check_pyramid((g, g), levels, C, 3 if C < 64 else 1, dtype, strided=C % 2 == 1)
