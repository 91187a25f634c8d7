"""torch.compile, bf16 autocast and input dtype/device handling of the tower.

Cold compiles cost tens of seconds on a CPU: the merge + projector (fullgraph) compile
runs by default, the whole tower only with ``-m slow``.
"""
import pytest
import torch

from fusion import build_tower


@pytest.fixture(scope="module")
def tower():
    return build_tower("tiny", weights="random", seed=0)


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))


def test_compiled_merge_and_projector_fullgraph_matches_eager(tower, pixels):
    """fullgraph=True: the merge (kernel dispatch included) and the projector trace without a
    graph break; forward and the projector/norm gradients equal eager."""
    torch._dynamo.reset()
    with torch.no_grad():
        grids = tower.encode(pixels)
    tower.train()

    def step(fn):
        tower.zero_grad(set_to_none=True)
        out = fn(grids)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}

    eager_out, eager_grads = step(tower.merge_and_project)
    compiled_out, compiled_grads = step(torch.compile(tower.merge_and_project, fullgraph=True))
    tower.eval()
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    assert set(compiled_grads) == set(eager_grads) and {n.split(".")[0] for n in eager_grads} == {"merge",
                                                                                                  "projector"}
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_tower_matches_eager(tower, pixels):
    """The whole tower (encoders from open_clip, timm and segment_anything) under torch.compile."""
    torch._dynamo.reset()
    with torch.no_grad():
        eager = tower(pixels)
        compiled = torch.compile(tower)(pixels)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_bf16_autocast(tower, pixels):
    with torch.no_grad():
        ref = tower(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tower(pixels, return_dict=True)
    assert out.tokens.dtype == torch.bfloat16  # the projector's matmuls ran in bf16
    assert all(torch.isfinite(g).all() for g in out.encoder_grids.values())
    err = (out.tokens.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), f"max abs error {err}"
    # and training steps under autocast reach the trainable parameters
    tower.train()
    tower.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tower(pixels).float().square().mean()
    loss.backward()
    tower.eval()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tower.projector.parameters())
    assert all(p.grad is None for p in tower.encoders.parameters())


def test_input_dtypes_are_converted_or_refused(tower, pixels):
    with torch.no_grad():
        ref = tower(pixels)
        torch.testing.assert_close(tower(pixels.double()), ref, rtol=1e-6, atol=1e-6)
        half = tower(pixels.half())
        assert half.dtype == torch.float32  # pixels are taken to float32 before the encoders
        torch.testing.assert_close(half, tower(pixels.half().float()), rtol=0, atol=0)
        u8 = (pixels * 255).round().to(torch.uint8)
        torch.testing.assert_close(tower(u8), tower(u8.float() / 255), rtol=0, atol=0)
    with pytest.raises(TypeError, match="pixel_values: .*dtype torch.int64"):
        tower(torch.zeros(1, 3, 98, 98, dtype=torch.int64))
    with pytest.raises(TypeError, match="pixel_values: expected a torch.Tensor"):
        tower(pixels.numpy())
    # a bf16 tower takes float32 pixels (each encoder gets its own dtype)
    low = build_tower("tiny", weights="random", seed=0).to(torch.bfloat16)
    with torch.no_grad():
        out = low(pixels)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_merge_and_project_converts_or_refuses_grids(tower, pixels):
    with torch.no_grad():
        grids = tower.encode(pixels)
        ref = tower.merge_and_project(grids)
        torch.testing.assert_close(tower.merge_and_project({k: v.double() for k, v in grids.items()}), ref,
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="missing \\['dino'\\]"):
        tower.merge_and_project({k: v for k, v in grids.items() if k != "dino"})
    with pytest.raises(ValueError, match=r"encoder_grids\['sam'\]: expected \[B, 6, 6, 32\], got \[2, 36, 32\]"):
        tower.merge_and_project({**grids, "sam": grids["sam"].flatten(1, 2)})
    with pytest.raises(ValueError, match="batch size 2 differs from the other grids. 1"):
        tower.merge_and_project({**grids, "clip": grids["clip"][:1]})
    with pytest.raises(TypeError, match="float tensor"):
        tower.merge_and_project({**grids, "clip": grids["clip"].long()})
    with pytest.raises(TypeError, match="dict"):
        tower.merge_and_project(list(grids.values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_inputs_on_another_device_are_moved(tower, pixels):
    gpu = build_tower("tiny", weights="random", seed=0).cuda()
    with torch.no_grad():
        ref = tower(pixels)
        torch.testing.assert_close(gpu(pixels).cpu(), ref, rtol=1e-3, atol=1e-4)  # CPU pixels, GPU tower
        grids = tower.encode(pixels)  # CPU grids (a feature cache), GPU tower
        torch.testing.assert_close(gpu.merge_and_project(grids).cpu(), ref, rtol=1e-3, atol=1e-4)
