"""S2 multi-scale encoders (encoders.<name>.scales): tiling and stitching by hand, a toy encoder
whose output reveals where every pixel went, and a real tiny encoder against a per-tile reference."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fusion import Encoder, build_tower, register_encoder
from fusion.config import load_config
from fusion.multiscale import MultiScaleEncoder, scales_of, split_tiles, stitch_tiles
from fusion.preprocess import resize_images


@register_encoder("toy_patchmean")
class PatchMean(Encoder):
    """Mean of each ``patch × patch`` block of its (normalised) input: ``[B, S/p, S/p, 3]``.

    Identity normalisation, no parameters; ``batches`` records the batch size of every call.
    """

    def __init__(self, cfg, load_weights=True):
        super().__init__(cfg, load_weights)
        self.image_size = cfg.image_size or 8
        self.patch_size = int(cfg.arch.get("patch", 2))
        g = self.image_size // self.patch_size
        self.grid, self.dim = (g, g), 3
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.batches = []

    def forward(self, pixels):
        self.batches.append(pixels.shape[0])
        return F.avg_pool2d(pixels, self.patch_size).permute(0, 2, 3, 1)


def toy_config(encoders=None, fusion=None, projector=None, processor=None):
    """A config dict of toy encoders (default: one 8-px encoder ``a`` with 2-px patches -> 4x4)."""
    return {"encoders": encoders or {"a": {"type": "toy_patchmean", "model": "toy", "image_size": 8,
                                           "arch": {"patch": 2}}},
            "fusion": {"grid": 4, "norm": "none", **(fusion or {})},
            "projector": projector or {"type": "none"},
            "processor": processor or {"mode": "squash"}}


def test_split_and_stitch_by_hand():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    tiles = split_tiles(x, 2)
    assert tiles.shape == (4, 1, 2, 2)
    assert tiles[:, 0].tolist() == [[[0, 1], [4, 5]], [[2, 3], [6, 7]], [[8, 9], [12, 13]], [[10, 11], [14, 15]]]
    grids = torch.tensor([[[t * 10 + 0, t * 10 + 1], [t * 10 + 2, t * 10 + 3]] for t in range(4)],
                         dtype=torch.float32)[..., None]  # tile t's 2x2 grid, cells t0 t1 / t2 t3
    stitched = stitch_tiles(grids, 2)[0, ..., 0]
    assert stitched.tolist() == [[0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]]
    two = torch.rand(3, 5, 6, 6)
    torch.testing.assert_close(stitch_tiles(split_tiles(two, 3).permute(0, 2, 3, 1), 3).permute(0, 3, 1, 2), two)


def test_toy_encoder_reveals_stitching_and_one_batch():
    tower = build_tower(toy_config(encoders={"a": {"type": "toy_patchmean", "model": "toy", "image_size": 8,
                                                   "arch": {"patch": 2}, "scales": [1, 2]}}), weights="random")
    enc = tower.encoders["a"].inner  # the toy itself, wrapped in a MultiScaleEncoder
    px = torch.rand(2, 3, 16, 16)  # already 2S: the scale-2 input is these very pixels
    enc.batches.clear()
    out = tower(px, return_dict=True)
    assert enc.batches == [2 + 2 * 4]  # both scales, all tiles, one call
    grid = out.encoder_grids["a"]
    assert grid.shape == (2, 4, 4, 6) and tower.merge.out_dim == 6
    # scale 2: 2x2 tiles of 8 px -> 4x4 patch means each -> stitched 8x8 -> pooled 4x4 = 4x4-pixel block means
    torch.testing.assert_close(grid[..., 3:], F.avg_pool2d(px, 4).permute(0, 2, 3, 1))
    # scale 1: the image resized to 8 px, 2x2 patch means
    torch.testing.assert_close(grid[..., :3], F.avg_pool2d(resize_images(px, (8, 8)), 2).permute(0, 2, 3, 1))
    assert out.tokens.shape == (2, 16, 6)


def test_three_scales_on_a_position_image():
    tower = build_tower(toy_config(encoders={"a": {"type": "toy_patchmean", "model": "toy", "image_size": 4,
                                                   "arch": {"patch": 1}, "scales": [2, 3]}},
                                   fusion={"grid": 4}), weights="random")
    # pixel value = its column (channel 0) and row (channel 1): every tile must land where it came from
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    px = torch.stack([xs, ys, xs * 0]).div(12)[None]  # [1, 3, 12, 12] = 3S, so scale 3 is unresized
    grid = tower(px, return_dict=True).encoder_grids["a"]
    assert grid.shape == (1, 4, 4, 6)
    # scale 3: 3x3 tiles of 4 px, stitched 12x12 grid, pooled 3x3 -> cell (i, j) centre (3j + 1, 3i + 1)
    centre = (torch.arange(4.0) * 3 + 1) / 12
    torch.testing.assert_close(grid[0, :, :, 3], centre[None, :].expand(4, 4))
    torch.testing.assert_close(grid[0, :, :, 4], centre[:, None].expand(4, 4))


def test_scale_one_equals_no_scales_key():
    base = toy_config()
    same = copy.deepcopy(base)
    same["encoders"]["a"]["scales"] = [1]
    assert load_config(same) == load_config(base)
    overrides = ["encoders.siglip=null", "encoders.sam=null", "encoders.dino=null"]
    plain = build_tower("tiny", overrides, weights="random")
    scaled = build_tower("tiny", overrides + ["encoders.clip.scales=[1]"], weights="random")
    px = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain(px), scaled(px))
    sa, sb = plain.state_dict(), scaled.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_real_tiny_encoder_against_per_tile_reference():
    tower = build_tower("tiny", ["encoders.siglip=null", "encoders.sam=null", "encoders.dino=null",
                                 "encoders.clip.scales=[1, 2]"], weights="random")
    enc = tower.encoders["clip"].inner  # the plain CLIP adapter the MultiScaleEncoder runs
    S = enc.image_size
    px = torch.rand(2, 3, 100, 100)
    mean, std = torch.tensor(enc.mean).view(1, 3, 1, 1), torch.tensor(enc.std).view(1, 3, 1, 1)
    with torch.no_grad():
        got = tower(px, return_dict=True).encoder_grids["clip"]
        one = enc((resize_images(px, (S, S)) - mean) / std)  # [2, 4, 4, C]
        big = (resize_images(px, (2 * S, 2 * S)) - mean) / std
        rows = [torch.cat([enc(big[:, :, ty * S:(ty + 1) * S, tx * S:(tx + 1) * S]) for tx in range(2)], dim=2)
                for ty in range(2)]
        stitched = torch.cat(rows, dim=1)  # [2, 8, 8, C]
        two = F.adaptive_avg_pool2d(stitched.permute(0, 3, 1, 2), enc.grid).permute(0, 2, 3, 1)
    assert got.shape == (2, *enc.grid, 2 * enc.dim)
    assert tower.merge.out_dim == 2 * enc.dim
    torch.testing.assert_close(got, torch.cat([one, two], -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scales, fragment", [
    ([], "non-empty list"),
    ([2, 1], "increasing order"),
    ([1, 1], "increasing order"),
    ([0, 1], ">= 1"),
    (2, "list of integers"),
])
def test_scale_errors_name_the_key(scales, fragment):
    with pytest.raises(ValueError, match="encoders.clip.scales") as err:
        load_config("tiny", {"encoders.clip.scales": scales})
    assert fragment in str(err.value)


def test_wrapper_keeps_the_plain_encoders_state_dict_keys_and_parameters():
    """A checkpoint of the plain encoder loads into the multi-scale one, key for key (no ``inner.``)."""
    overrides = ["encoders.siglip=null", "encoders.sam=null", "encoders.dino=null"]
    plain = build_tower("tiny", overrides, weights="random")
    scaled = build_tower("tiny", overrides + ["encoders.clip.scales=[1, 2]"], weights="random")
    wrapper = scaled.encoders["clip"]
    assert isinstance(wrapper, MultiScaleEncoder) and wrapper.scales == (1, 2)
    assert (wrapper.dim, wrapper.grid) == (2 * wrapper.inner.dim, wrapper.inner.grid)
    sa, sb = plain.encoders["clip"].state_dict(), wrapper.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same weights
    assert [p is q for p, q in zip(wrapper.parameters(), wrapper.inner.parameters())] == [True] * len(sa)
    with torch.no_grad():
        for p in plain.encoders["clip"].parameters():
            p.add_(1.0)
    scaled.encoders["clip"].load_state_dict(plain.encoders["clip"].state_dict())
    assert torch.equal(next(wrapper.inner.parameters()), next(plain.encoders["clip"].parameters()))
    names = [spec.name for spec in wrapper.input_specs()]
    assert names == ["clip", "clip@2x"] and wrapper.input_specs()[1].image_size == 2 * wrapper.image_size
    with pytest.raises(TypeError, match="expected 2 inputs"):
        wrapper(torch.zeros(1, 3, wrapper.image_size, wrapper.image_size))
    with pytest.warns(DeprecationWarning, match="enc.scales"):
        assert scales_of(wrapper) == [1, 2]
    wrapper.eval()
    assert not wrapper.inner.training and not any(m.training for m in wrapper.modules())
