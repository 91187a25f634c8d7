"""fusion.llava: LLaVA's vision-tower interface (CLIPVisionTower(vision_tower, args, delay_load)).

LLaVA's arguments are passed as LLaVA passes them (attributes of its ModelArguments /
model config); the CLIP layer is checked against open_clip's own modules run by hand.
"""
import runpy
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fusion import TowerConfig, build_tower, load_config
from fusion.llava import FusionVisionTower, build_vision_tower, llava_tower_config

ROOT = Path(__file__).resolve().parents[1]


def _args(**kw):
    base = dict(mm_vision_tower="tiny", mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    base.update(kw)
    return SimpleNamespace(**base)


def _clip_block_output(visual, pixels, block):
    """Output of open_clip's ``block``-th (0-based) residual block, CLS dropped: ``[B, h*w, C]``.

    Composed from the VisionTransformer's modules as its forward runs them."""
    x = visual.conv1(pixels)  # [B, C, h, w]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, h*w, C]
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls.to(x.dtype), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    if not visual.transformer.batch_first:
        x = x.transpose(0, 1)
    for blk in visual.transformer.resblocks[:block + 1]:
        x = blk(x)
    if not visual.transformer.batch_first:
        x = x.transpose(0, 1)
    return x[:, 1:]


def test_delay_load_defers_building():
    tower = build_vision_tower(_args(), delay_load=True, weights="random")
    assert isinstance(tower, FusionVisionTower)
    assert not tower.is_loaded and tower.vision_tower is None and tower.image_processor is None
    assert sum(1 for _ in tower.parameters()) == 0
    assert isinstance(tower.config, TowerConfig) and tower.config.encoders["clip"].layer == -2
    # LLaVA's cfg_only answers the geometry before loading; nothing gets loaded by asking
    assert tower.hidden_size == 240 and tower.num_patches == 16 and tower.num_patches_per_side == 4
    assert not tower.is_loaded and sum(1 for _ in tower.parameters()) == 0
    with pytest.raises(RuntimeError, match="load_model"):
        tower(torch.rand(1, 3, 98, 98))
    tower.load_model()
    assert tower.is_loaded and sum(1 for _ in tower.parameters()) > 0
    loaded = tower.vision_tower
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tower.load_model()
    assert tower.vision_tower is loaded and "already loaded" in str(caught[0].message)
    # not delayed: built at once
    assert build_vision_tower(_args(), weights="random").is_loaded


def test_select_layer_sets_the_clip_layer_only():
    preset = load_config("tiny")
    for select_layer, block in [(-1, 1), (-2, 0), (1, 0), (2, 1)]:
        config = build_vision_tower(_args(mm_vision_select_layer=select_layer), delay_load=True).config
        assert config.encoders["clip"].layer == select_layer
        for name in ("siglip", "sam", "dino"):  # the other encoders keep the preset's layer
            assert config.encoders[name].layer == preset.encoders[name].layer
    pixels = torch.rand(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    for select_layer, block in [(-2, 0), (2, 1)]:
        inner = build_vision_tower(_args(mm_vision_select_layer=select_layer), weights="random").vision_tower
        clip = inner.encoders["clip"]
        assert clip.block == block
        with torch.no_grad():
            grid = inner.encode(pixels)["clip"]
            ref = _clip_block_output(clip.model, inner.encoder_inputs(pixels)["clip"], block)
        torch.testing.assert_close(grid.flatten(1, 2), ref, rtol=1e-5, atol=1e-5)


def test_select_layer_changes_the_features_and_bad_values():
    pixels = torch.rand(1, 3, 98, 98, generator=torch.Generator().manual_seed(1))
    last = build_vision_tower(_args(mm_vision_select_layer=-1), weights="random")
    second = build_vision_tower(_args(mm_vision_select_layer=-2), weights="random")
    assert (last(pixels) - second(pixels)).abs().max() > 1e-3
    without = build_vision_tower(SimpleNamespace(mm_vision_tower="llava15"), delay_load=True)
    assert without.config.encoders["clip"].layer == -2  # no select_layer: the config's own layer
    with pytest.raises(ValueError, match="mm_vision_select_layer"):
        build_vision_tower(_args(mm_vision_select_layer=0), delay_load=True)
    with pytest.raises(ValueError, match="encoders.clip.layer"):
        build_vision_tower(_args(mm_vision_select_layer=-3), weights="random")  # tiny CLIP has 2 blocks
    with pytest.raises(ValueError, match="mm_vision_select_feature.*cls_patch"):
        build_vision_tower(_args(mm_vision_select_feature="cls_patch"), delay_load=True)
    with pytest.raises(ValueError, match="mm_vision_select_feature"):
        build_vision_tower(_args(mm_vision_select_feature="cls"), delay_load=True)


def test_llava_call_forms_dtype_and_frozen():
    tower = build_vision_tower(_args(), weights="random")
    reference = build_tower(llava_tower_config("tiny", select_layer=-2), weights="random").eval()
    pixels = torch.rand(3, 3, 98, 98, generator=torch.Generator().manual_seed(2))
    batch = tower(pixels.half())
    assert batch.dtype == torch.float16 and batch.shape == (3, tower.num_patches, tower.hidden_size)
    assert not batch.requires_grad  # the tower is frozen, as LLaVA freezes its CLIP
    assert not any(p.requires_grad for p in tower.parameters())
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), reference(pixels), rtol=0, atol=0)
    listed = tower(list(pixels))
    assert [f.shape for f in listed] == [(1, 16, 240)] * 3
    torch.testing.assert_close(torch.cat(listed), tower(pixels), rtol=1e-5, atol=1e-5)
    # what LLaVA's data pipeline and projector builder read
    proc = tower.image_processor
    assert len(proc.image_mean) == 3 and proc.crop_size == {"height": 98, "width": 98}
    assert proc.preprocess(torch.rand(3, 40, 60), return_tensors="pt")["pixel_values"][0].shape == (3, 98, 98)
    assert tower.dummy_feature.shape == (1, 240) and tower.dtype == torch.float32 and tower.device.type == "cpu"
    tower.to(torch.bfloat16)  # LLaVA: vision_tower.to(dtype=torch.bfloat16, device=...)
    assert tower.dtype == torch.bfloat16 and tower(pixels).dtype == torch.float32


def test_names_overrides_projector_and_unfreeze():
    # LLaVA's ModelArguments call it `vision_tower`; overrides may follow the preset name
    tower = build_vision_tower(SimpleNamespace(vision_tower="tiny fusion.grid=3", mm_vision_select_layer=-1),
                               delay_load=True)
    assert tower.config.fusion.grid == 3 and tower.num_patches == 9
    # LLaVA's mm_projector does the projection: the tower's own is dropped unless kept
    assert tower.config.projector.type == "none"
    kept = build_vision_tower(_args(), delay_load=True, keep_projector=True)
    assert kept.config.projector == load_config("tiny").projector and kept.hidden_size == 64
    with pytest.raises(ValueError, match="mm_vision_tower"):
        build_vision_tower(SimpleNamespace(mm_vision_select_layer=-2))
    with pytest.raises(ValueError, match="mm_vision_tower.*key=value"):
        build_vision_tower(_args(mm_vision_tower="tiny grid3"), delay_load=True)
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        build_vision_tower(_args(mm_vision_tower="tinyy"), delay_load=True)
    # unfreeze_mm_vision_tower (LLaVA-NeXT) loads at once, even with delay_load, and trains the encoders
    free = build_vision_tower(_args(unfreeze_mm_vision_tower=True), delay_load=True, weights="random")
    assert free.is_loaded and all(not e.frozen for e in free.vision_tower.encoders.values())
    assert all(p.requires_grad for p in free.vision_tower.parameters())
    free(torch.rand(1, 3, 98, 98)).square().mean().backward()
    for enc in free.vision_tower.encoders.values():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "llava_builder.py"))["main"]([])
    text = capsys.readouterr().out
    assert "delay_load: is_loaded=False, parameters=0" in text
    assert "image features [4, 16, 128]" in text
    assert "anyres: tiles of config.image_size=98 pixels (patch_size 24), 4x4 tokens per tile; image_grid_pinpoints " \
           "for this tower: [[98, 196], [196, 98], [196, 196], [294, 98], [98, 294]]" in text


def test_llava16_reads_image_size_and_patch_size_without_loading():
    # what LLaVA-1.6's prepare_inputs_labels_for_multimodal reads for anyres + spatial merges
    args = _args(mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
                 image_grid_pinpoints="[(98, 196), (196, 98), (196, 196), (294, 98), (98, 294)]")  # as LLaVA stores it
    tower = build_vision_tower(args, delay_load=True, weights="random")
    assert tower.config.image_size == 98 and tower.config.patch_size == 24 and tower.num_patches_per_side == 4
    assert isinstance(tower.config, TowerConfig) and tower.config == llava_tower_config("tiny", select_layer=-2)
    assert tower.config.encoders["clip"].layer == -2 and not tower.is_loaded
    tower.load_model()
    assert tower.config.image_size == tower.image_processor.crop_size["height"] == 98
    big = build_vision_tower(_args(mm_vision_tower="tiny processor.size=336"), delay_load=True)
    assert big.config.image_size == 336 and big.config.patch_size == 84


@pytest.mark.parametrize("override, key", [
    ("fusion.levels=[2]", r"fusion\.levels=\[2\]"),
    ("'fusion.reduce={keep: 8}'", r"fusion\.reduce \(keep=8\)"),
    ("fusion.combine=sequence_concat fusion.width=32", r"fusion\.combine=sequence_concat"),
])
def test_spatial_merge_refuses_a_token_count_that_is_not_the_grid(override, key):
    for merge_type in ("spatial", "spatial_unpad"):
        with pytest.raises(ValueError, match=rf"mm_patch_merge_type='{merge_type}' lays each image's tokens out as "
                                             rf"the tower's 4x4 grid, but \[.*{key}.*\] make the token count differ"):
            build_vision_tower(_args(mm_vision_tower=f"tiny {override}", mm_patch_merge_type=merge_type,
                                     image_aspect_ratio="anyres"), delay_load=True)
    # flat takes any token count: LLaVA concatenates the tiles' tokens
    flat = build_vision_tower(_args(mm_vision_tower=f"tiny {override}", mm_patch_merge_type="flat",
                                    image_aspect_ratio="anyres"), delay_load=True)
    assert flat.num_patches != 16


def test_anyres_pinpoints_must_be_multiples_of_the_tile():
    shipped = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-1.6's, for a 336 tower
    tower = build_vision_tower(_args(image_aspect_ratio="anyres", image_grid_pinpoints=shipped), delay_load=True,
                               weights="random")
    with pytest.raises(ValueError, match=r"image_grid_pinpoints: \[\[336, 672\], .*not positive multiples of the "
                                         r"tower's tile size 98.*\[\[98, 196\], \[196, 98\]"):
        tower.load_model()
    fits = build_vision_tower(_args(mm_vision_tower="tiny processor.size=336", image_aspect_ratio="anyres",
                                    image_grid_pinpoints=shipped), weights="random")
    assert fits.is_loaded
    with pytest.raises(ValueError, match="image_grid_pinpoints: expected a non-empty list"):
        build_vision_tower(_args(image_aspect_ratio="anyres", image_grid_pinpoints="[336]"), weights="random")
