"""The tower end to end on the `tiny` preset (real upstream models at tiny sizes, random weights)."""
import pytest
import torch
import torch.nn.functional as F

from fusion import TowerOutput, build_tower
from fusion.tower import MultiEncoderTower


@pytest.fixture(scope="module")
def tower():
    return build_tower("tiny", weights="random", seed=0)


@pytest.fixture(scope="module")
def pixels():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 64, 64, generator=g)


def _reference_tokens(tower, pixels):
    """The tower's output composed by hand from the encoders, torch ops and the projector."""
    inputs = tower.encoder_inputs(pixels)
    g = tower.config.fusion.grid
    parts = []
    for name, enc in tower.encoders.items():
        grid = enc(inputs[name])  # [B, h, w, C]
        pooled = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), g).permute(0, 2, 3, 1).flatten(1, 2)
        ln = tower.merge.norms[name]
        parts.append(F.layer_norm(pooled, (enc.dim,), ln.weight, ln.bias, ln.eps))
    return tower.projector(torch.cat(parts, -1))


def test_tokens_equal_hand_composition(tower, pixels):
    with torch.no_grad():
        out = tower(pixels)
        ref = _reference_tokens(tower, pixels)
    assert out.shape == (2, tower.num_patches, tower.hidden_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_return_dict(tower, pixels):
    with torch.no_grad():
        out = tower(pixels, return_dict=True)
    assert isinstance(out, TowerOutput)
    assert list(out.encoder_grids) == list(tower.encoders)
    for name, grid in out.encoder_grids.items():
        enc = tower.encoders[name]
        assert grid.shape == (2, *enc.grid, enc.dim)
    g = tower.config.fusion.grid
    assert out.token_boxes.shape == (g * g, 4)
    torch.testing.assert_close(out.token_boxes[0], torch.tensor([0, 0, 1 / g, 1 / g]))
    assert out.segments == [("fused", 0, g * g)]
    # the Hugging Face view: every stage's output in data-flow order
    assert len(out.hidden_states) == len(tower.encoders) + 2
    for hidden, grid in zip(out.hidden_states, out.encoder_grids.values()):
        torch.testing.assert_close(hidden, grid.flatten(1, 2), rtol=0, atol=0)
    assert out.hidden_states[-2] is out.merged_tokens and out.hidden_states[-1] is out.tokens
    assert out.merged_tokens.shape == (2, g * g, tower.merge.out_dim)
    torch.testing.assert_close(tower.projector(out.merged_tokens), out.tokens)


def test_llava_attributes(tower):
    cfg = tower.config
    assert tower.num_patches_per_side == cfg.fusion.grid
    assert tower.num_patches == cfg.fusion.grid ** 2
    assert tower.hidden_size == cfg.projector.out_dim
    assert tower.merge.out_dim == sum(e.dim for e in tower.encoders.values())
    assert tower.dtype == torch.float32 and tower.device.type == "cpu"
    assert tower.dummy_feature.shape == (1, tower.hidden_size) and not tower.dummy_feature.any()
    assert tower.is_loaded
    tower.load_model()
    proc = tower.image_processor
    assert proc.crop_size["height"] == proc.crop_size["width"]
    assert len(proc.image_mean) == 3
    pv = proc.preprocess(torch.rand(3, 20, 30), return_tensors="pt")["pixel_values"]
    assert pv.shape == (1, 3, proc.crop_size["height"], proc.crop_size["width"])


def test_frozen_encoders_get_no_grad_projector_trains(pixels):
    tower = build_tower("tiny", weights="random", overrides=["encoders.dino.freeze=false"])
    tower.train()
    assert not tower.encoders["clip"].training and tower.encoders["dino"].training
    tower(pixels).square().mean().backward()
    assert all(p.grad is None for p in tower.encoders["clip"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.encoders["dino"].parameters())
    assert all(p.grad is not None for p in tower.projector.parameters())
    assert all(p.grad is not None for p in tower.merge.parameters())


def test_random_weights_are_seeded():
    a = build_tower("tiny", weights="random", seed=0)
    b = build_tower("tiny", weights="random", seed=0)
    c = build_tower("tiny", weights="random", seed=1)
    d = build_tower("tiny", weights="random", seed=0, overrides=["encoders.siglip=null"])
    sa, sb, sc, sd = (t.state_dict() for t in (a, b, c, d))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if k.startswith("encoders.clip"))
    # dropping one encoder leaves the others' weights unchanged
    assert all(torch.equal(sa[k], sd[k]) for k in sd if k.startswith("encoders.clip"))


def test_save_and_from_pretrained_round_trip(tmp_path, pixels):
    tower = build_tower("tiny", weights="random", seed=3)
    with torch.no_grad():
        for p in tower.projector.parameters():
            p.add_(0.5)  # "trained" weights differ from a fresh build
        expected = tower(pixels)
    tower.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {"config.yaml", "tower.json", "model.safetensors"}
    loaded = MultiEncoderTower.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), expected)
    assert loaded.config == tower.config


def test_from_pretrained_refuses_mismatched_weights(tmp_path):
    build_tower("tiny", weights="random").save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.yaml").write_text(
        build_tower("tiny", weights="random", overrides=["encoders.sam=null"]).config.to_yaml())
    with pytest.raises(ValueError, match="missing|unexpected"):
        MultiEncoderTower.from_pretrained(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        MultiEncoderTower.from_pretrained(tmp_path / "nothing")


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.1), (torch.float16, 0.05)])
def test_low_precision_close_to_fp32(tower, pixels, dtype, tol):
    low = build_tower("tiny", weights="random", seed=0).to(dtype)
    with torch.no_grad():
        ref = tower(pixels)
        out = low(pixels)
    assert out.dtype == dtype
    err = (out.float() - ref).abs().max().item()
    assert err < tol * ref.abs().max().item(), f"max abs error {err}"


def test_pixel_value_checks(tower):
    with pytest.raises(TypeError, match="pixel_values"):
        tower([[0.0]])
    with pytest.raises(ValueError, match=r"pixel_values: expected shape \[B, 3, H, W\]"):
        tower(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="NaN"):
        tower(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(TypeError, match="dtype torch.int32"):
        tower(torch.zeros(1, 3, 64, 64, dtype=torch.int32))
    u8 = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(tower(u8), tower(u8.float() / 255))


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="weights.*'pretrained', 'random'"):
        build_tower("tiny", weights="imagenet")
    with pytest.raises(TypeError, match="seed"):
        build_tower("tiny", weights="random", seed="0")
