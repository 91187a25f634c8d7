"""Encoder adapters against the upstream libraries themselves (tiny real models, random weights).

Parity: each adapter loads a checkpoint written from an independently built upstream
model, and its output must equal what the upstream library computes for that layer,
step by step or through the upstream's own loader. No weights are downloaded.
"""
import huggingface_hub.constants as hf_constants
import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from segment_anything import SamPredictor
from segment_anything.build_sam import _build_sam

from fusion.config import EncoderConfig, load_config, parse_config
from fusion.encoders.base import Encoder
from fusion.encoders.registry import get_encoder_class, list_encoders, register_encoder

TEXT = dict(layers=1, width=32, heads=2, vocab_size=64, context_length=8)  # the dropped text tower, tiny
CLIP_ARCH = dict(embed_dim=32, vision_cfg=dict(layers=3, width=64, head_width=32, patch_size=16), text_cfg=TEXT)
SIGLIP_ARCH = dict(embed_dim=32, vision_cfg=dict(timm_model_name="test_vit3"), text_cfg=TEXT)
SAM_ARCH = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=3, out_chans=32)
DINO_ARCH = dict(embed_dim=32, depth=3, num_heads=2)


def enc_cfg(type_, model, name=None, **kw):
    kw.setdefault("pretrained", "random")  # these tests build from random weights on purpose
    return EncoderConfig(name=name or type_, type=type_, model=model, **kw)


def build(cfg, load_weights=True):
    return get_encoder_class(cfg.type)(cfg, load_weights)


def check_close(actual, expected, atol=1e-5, rtol=1e-5):
    worst = (actual.float() - expected.float()).abs().max().item()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual.float(), expected.float(), atol=atol, rtol=rtol), f"worst mismatch {worst:.3g}"


def merged(model, arch, **vision):
    """``arch`` with its vision_cfg merged into the named config's (create_model replaces, not merges)."""
    base = open_clip.get_model_config(model)["vision_cfg"]
    return dict(arch, vision_cfg=dict(base, **arch["vision_cfg"], **vision))


def open_clip_reference(model, arch, image_size, path=None):
    """An open_clip model built (and, with ``path``, loaded) by open_clip itself."""
    return open_clip.create_model(model, pretrained=path, force_image_size=image_size,
                                  **merged(model, arch, image_size=image_size)).eval()


def clip_block_outputs(visual, x):
    """open_clip VisionTransformer, module by module: every block's output, CLS removed, [B, h, w, C]."""
    t = visual.conv1(x)  # [B, C, h, w]
    b, c, h, w = t.shape
    t = t.reshape(b, c, h * w).permute(0, 2, 1)  # [B, h*w, C]
    t = torch.cat([visual.class_embedding.expand(b, 1, c), t], dim=1) + visual.positional_embedding
    t = visual.ln_pre(t)
    outs = []
    for blk in visual.transformer.resblocks:
        t = blk(t) if visual.transformer.batch_first else blk(t.transpose(0, 1)).transpose(0, 1)
        outs.append(t[:, 1:].reshape(b, h, w, c))
    return outs


def timm_block_outputs(vit, x):
    """timm VisionTransformer, module by module: every block's output, prefix removed, [B, h, w, C]."""
    t = vit.patch_embed(x)  # [B, h*w, C]
    t = vit.norm_pre(vit.patch_drop(vit._pos_embed(t)))
    h, w = vit.patch_embed.grid_size
    outs = []
    for blk in vit.blocks:
        t = blk(t)
        outs.append(t[:, vit.num_prefix_tokens:].reshape(t.shape[0], h, w, t.shape[-1]))
    return outs


# ----------------------------------------------------------------------------- registry


def test_builtin_encoders_are_registered():
    assert {"clip", "siglip", "sam", "dinov2"} <= set(list_encoders())


def test_user_registered_encoder_is_usable_from_config():
    @register_encoder("test_user_mean_pool")
    class MeanPool(Encoder):
        def __init__(self, cfg, load_weights=True):
            super().__init__(cfg, load_weights)
            self.image_size, self.patch_size, self.grid, self.dim = 32, 8, (4, 4), 3
            self.mean, self.std = (0.5,) * 3, (0.5,) * 3
            self.model = torch.nn.AvgPool2d(8)

        def forward(self, pixels):
            return self.model(pixels).permute(0, 2, 3, 1)

    assert "test_user_mean_pool" in list_encoders()
    cfg = parse_config({"encoders": {"mine": {"type": "test_user_mean_pool", "model": "any"}},
                        "projector": {"type": "none"}})
    enc = build(cfg.encoders["mine"])
    assert isinstance(enc, MeanPool) and enc.encoder_type == "test_user_mean_pool"
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 4, 4, 3)


# ----------------------------------------------------------------------------- CLIP / SigLIP


@pytest.mark.parametrize("layer, block", [(-1, 2), (-2, 1), (1, 0), (3, 2)])
def test_clip_matches_open_clip_module_by_module(tmp_path, layer, block):
    ref = open_clip_reference("ViT-B-16", CLIP_ARCH, 64)
    path = tmp_path / "clip.safetensors"
    save_file(ref.state_dict(), str(path))
    enc = build(enc_cfg("clip", "ViT-B-16", pretrained=str(path), image_size=64, layer=layer, arch=CLIP_ARCH))
    assert (enc.depth, enc.block) == (3, block)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)
        expected = clip_block_outputs(ref.visual, x)[block]
        check_close(out, expected)
        if layer == -1:  # the last block's output, before ln_post
            assert not torch.allclose(out, ref.visual.ln_post(expected), atol=1e-3)


def test_clip_resamples_position_embeddings_like_open_clip_loader(tmp_path):
    native = open_clip_reference("ViT-B-16", CLIP_ARCH, 64)
    path = tmp_path / "clip_native.pt"
    torch.save(native.state_dict(), path)
    # open_clip's own loader, at 96 px: resamples the 4x4 position embeddings to 6x6
    ref = open_clip_reference("ViT-B-16", CLIP_ARCH, 96, path=str(path))
    enc = build(enc_cfg("clip", "ViT-B-16", pretrained=str(path), image_size=96, arch=CLIP_ARCH))
    assert enc.grid == (6, 6)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        check_close(enc(x), clip_block_outputs(ref.visual, x)[-1])


@pytest.mark.parametrize("layer", [-1, -3, 2])
def test_siglip_matches_timm_trunk(tmp_path, layer):
    ref = open_clip_reference("ViT-B-16-SigLIP", SIGLIP_ARCH, 80)
    trunk = ref.visual.trunk
    path = tmp_path / "siglip.safetensors"
    save_file(ref.state_dict(), str(path))
    enc = build(enc_cfg("siglip", "ViT-B-16-SigLIP", pretrained=str(path), image_size=80, layer=layer,
                        arch=SIGLIP_ARCH))
    idx = layer - 1 if layer > 0 else len(trunk.blocks) + layer
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        out = enc(x)
        check_close(out, timm_block_outputs(trunk, x)[idx])
        nchw = trunk.get_intermediate_layers(x, n=[idx], reshape=True, norm=False)[0]
        check_close(out, nchw.permute(0, 2, 3, 1))
    assert out.shape == (2, 5, 5, 96) and (enc.grid, enc.dim, enc.patch_size) == ((5, 5), 96, 16)


def test_siglip_resamples_native_checkpoint_like_open_clip_loader(tmp_path):
    native = open_clip.create_model("ViT-B-16-SigLIP", **merged("ViT-B-16-SigLIP", SIGLIP_ARCH))  # 160 px native
    path = tmp_path / "siglip_native.bin"
    torch.save(native.state_dict(), path)
    ref = open_clip.create_model("ViT-B-16-SigLIP", pretrained=str(path), force_image_size=80,
                                 **merged("ViT-B-16-SigLIP", SIGLIP_ARCH)).eval()
    enc = build(enc_cfg("siglip", "ViT-B-16-SigLIP", pretrained=str(path), image_size=80, arch=SIGLIP_ARCH))
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        check_close(enc(x), timm_block_outputs(ref.visual.trunk, x)[-1])


def test_clip_and_siglip_attributes():
    clip = build(enc_cfg("clip", "ViT-B-16", image_size=64, arch=CLIP_ARCH))
    siglip = build(enc_cfg("siglip", "ViT-B-16-SigLIP", image_size=80, arch=SIGLIP_ARCH))
    assert (clip.image_size, clip.patch_size, clip.grid, clip.dim) == (64, 16, (4, 4), 64)
    assert clip.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert clip.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert siglip.mean == pytest.approx((0.5,) * 3) and siglip.std == pytest.approx((0.5,) * 3)
    for enc in (clip, siglip):
        assert (enc.resize, enc.interpolation) == ("squash", "bicubic")
    assert (clip.encoder_type, siglip.encoder_type) == ("clip", "siglip")


def test_clip_tag_must_agree_with_the_configured_architecture(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("load_weights=False must not download")

    monkeypatch.setattr("fusion.encoders.loading.fetch", no_download)
    # OpenAI's weights were trained with QuickGELU: the config must say so; the tag never changes the network
    with pytest.raises(ValueError, match=r"encoders\.clip\.arch\.quick_gelu: the open_clip tag 'openai' .*trained "
                                         r"with quick_gelu=True, but the config builds quick_gelu=False"):
        build(enc_cfg("clip", "ViT-B-16", pretrained="openai", image_size=64, arch=CLIP_ARCH), load_weights=False)
    enc = build(enc_cfg("clip", "ViT-B-16", pretrained="openai", image_size=64, arch=dict(CLIP_ARCH, quick_gelu=True)),
                load_weights=False)
    assert isinstance(enc.model.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    assert enc.pretrained_tag == "openai" and enc.upstream_name() == "open_clip:ViT-B-16"
    assert enc.loaded_weights.kind == "random"
    siglip = build(enc_cfg("siglip", "ViT-B-16-SigLIP", pretrained="webli", image_size=80, arch=SIGLIP_ARCH),
                   load_weights=False)
    assert siglip.mean == pytest.approx((0.5,) * 3)


# ----------------------------------------------------------------------------- DINOv2


@pytest.mark.parametrize("model", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
@pytest.mark.parametrize("layer", [-1, -2, 1])
def test_dinov2_matches_timm(tmp_path, model, layer):
    ref = timm.create_model(model, img_size=56, **DINO_ARCH).eval()
    path = tmp_path / "dino.pth"
    torch.save(ref.state_dict(), path)
    enc = build(enc_cfg("dinov2", model, name="dino", pretrained=str(path), image_size=56, layer=layer,
                        arch=DINO_ARCH))
    idx = layer - 1 if layer > 0 else 3 + layer
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = enc(x)
        nchw = ref.get_intermediate_layers(x, n=[idx], reshape=True, norm=False)[0]
        check_close(out, nchw.permute(0, 2, 3, 1))
        check_close(out, timm_block_outputs(ref, x)[idx])
    assert enc.num_prefix_tokens == (5 if "reg4" in model else 1)
    assert (enc.grid, enc.dim, enc.patch_size, enc.image_size) == ((4, 4), 32, 14, 56)


def test_dinov2_resamples_native_checkpoint_like_timm_loader(tmp_path):
    native = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56, **DINO_ARCH)
    path = tmp_path / "dino_native.safetensors"
    save_file(native.state_dict(), str(path))
    # timm's own pretrained loader, from the local file, at 84 px
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=True, img_size=84,
                            pretrained_cfg_overlay=dict(file=str(path)), **DINO_ARCH).eval()
    enc = build(enc_cfg("dinov2", "vit_small_patch14_reg4_dinov2", pretrained=str(path), image_size=84,
                        arch=DINO_ARCH))
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        check_close(enc(x), timm_block_outputs(ref, x)[-1])


def test_dinov2_attributes_from_timm_pretrained_cfg():
    enc = build(enc_cfg("dinov2", "vit_small_patch14_dinov2", image_size=42, arch=DINO_ARCH))
    assert enc.mean == pytest.approx(timm.data.IMAGENET_DEFAULT_MEAN)
    assert enc.std == pytest.approx(timm.data.IMAGENET_DEFAULT_STD)
    assert (enc.resize, enc.interpolation, enc.grid) == ("squash", "bicubic", (3, 3))


def test_dinov2_takes_any_size_timm_takes_and_drops_the_remainder_like_timm(tmp_path):
    """50 px with 14-px patches: timm's strict patch embedding covers 3x3 patches (42 px) and never
    reads the last 8 rows and columns (as Prismatic feeds DINO 384 px: 27x27, 6 px ignored)."""
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=50, **DINO_ARCH).eval()
    path = tmp_path / "dino50.pth"
    torch.save(ref.state_dict(), path)
    enc = build(enc_cfg("dinov2", "vit_small_patch14_reg4_dinov2", name="dino", pretrained=str(path),
                        image_size=50, layer=-2, arch=DINO_ARCH))
    assert (enc.image_size, enc.grid) == (50, (3, 3))
    x = torch.randn(2, 3, 50, 50)
    edited = x.clone()
    edited[:, :, 42:, :] = 7.0  # the pixels no patch covers
    edited[:, :, :, 42:] = -7.0
    with torch.no_grad():
        out = enc(x)
        check_close(out, timm_block_outputs(ref, x)[1])
        assert torch.equal(enc(edited), out)
        assert not torch.allclose(enc(x.flip(-1)), out, atol=1e-3)  # the covered pixels do matter


def test_dinov2_image_size_needs_one_patch():
    with pytest.raises(ValueError, match=r"encoders\.dino\.image_size: got 10.*at least one 14x14 patch"):
        build(enc_cfg("dinov2", "vit_small_patch14_dinov2", name="dino", image_size=10, arch=DINO_ARCH))


# ----------------------------------------------------------------------------- SAM


def test_sam_matches_segment_anything_builder_and_predictor(tmp_path):
    path = tmp_path / "sam_tiny.pth"
    torch.save(_build_sam(32, 2, 2, [1]).state_dict(), path)  # a full SAM checkpoint, random weights
    sam = _build_sam(32, 2, 2, [1], checkpoint=str(path))  # segment_anything's own loader
    enc = build(enc_cfg("sam", "vit_b", pretrained=str(path),
                        arch=dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1])))
    assert (enc.image_size, enc.grid, enc.dim) == (1024, (64, 64), 256)
    raw = torch.rand(1, 3, 1024, 1024) * 255  # an image already at SAM's 1024 px, [0, 255]
    mean, std = torch.tensor(enc.mean).view(1, 3, 1, 1), torch.tensor(enc.std).view(1, 3, 1, 1)
    predictor = SamPredictor(sam)
    with torch.no_grad():
        out = enc((raw / 255 - mean) / std)
        predictor.set_torch_image(raw, (1024, 1024))
    check_close(out, predictor.features.permute(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_sam_attributes_and_small_arch():
    enc = build(enc_cfg("sam", "vit_b", image_size=96, arch=SAM_ARCH))
    assert (enc.image_size, enc.patch_size, enc.grid, enc.dim, enc.depth) == (96, 16, (6, 6), 32, 2)
    assert enc.mean == pytest.approx((123.675 / 255, 116.28 / 255, 103.53 / 255))
    assert enc.std == pytest.approx((58.395 / 255, 57.12 / 255, 57.375 / 255))
    assert (enc.resize, enc.interpolation) == ("longest_side_pad", "bilinear")
    with torch.no_grad():
        assert enc(torch.randn(2, 3, 96, 96)).shape == (2, 6, 6, 32)


def test_sam_supports_only_the_neck_output():
    with pytest.raises(ValueError, match=r"encoders\.sam\.layer: got -2.*only -1"):
        build(enc_cfg("sam", "vit_b", layer=-2, image_size=96, arch=SAM_ARCH))


def test_sam_tag_must_agree_with_the_configured_architecture():
    with pytest.raises(ValueError, match=r"encoders\.sam\.pretrained: the SAM tag 'sa1b' of vit_b .*"
                                         r"encoders\.sam\.image_size: config 96 vs checkpoint 1024;.*"
                                         r"encoders\.sam\.arch\.embed_dim: config 32 vs checkpoint 768"):
        build(enc_cfg("sam", "vit_b", pretrained="sa1b", image_size=96, arch=SAM_ARCH))


def test_sam_checks_global_attention_indexes_against_depth():
    with pytest.raises(ValueError, match=r"encoders\.sam\.arch\.global_attn_indexes: got \(2, 5, 8, 11\)"):
        build(enc_cfg("sam", "vit_b", image_size=96, arch=dict(depth=2)))


def test_sam_image_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match=r"encoders\.sam\.image_size: got 100"):
        build(enc_cfg("sam", "vit_b", image_size=100, arch=SAM_ARCH))


# ----------------------------------------------------------------------------- common behaviour


@pytest.mark.parametrize("cfg", [
    enc_cfg("clip", "ViT-B-16", layer=-4, image_size=64, arch=CLIP_ARCH),
    enc_cfg("clip", "ViT-B-16", layer=4, image_size=64, arch=CLIP_ARCH),
    enc_cfg("dinov2", "vit_small_patch14_dinov2", layer=-9, image_size=56, arch=DINO_ARCH),
], ids=["clip-neg", "clip-pos", "dinov2"])
def test_layer_out_of_range_names_the_key(cfg):
    with pytest.raises(ValueError, match=rf"encoders\.{cfg.name}\.layer: got {cfg.layer}.*3 blocks"):
        build(cfg)


@pytest.mark.parametrize("type_, model, valid", [
    ("clip", "ViT-B-61", "ViT-B-16"),
    ("siglip", "ViT-B-16-SigLIP-999", "ViT-B-16-SigLIP"),
    ("dinov2", "vit_small_patch14_dinov3", "vit_small_patch14_dinov2"),
    ("sam", "vit_s", "vit_b"),
])
def test_unknown_model_lists_valid_names(type_, model, valid):
    with pytest.raises(ValueError, match=rf"encoders\.{type_}\.model: unknown .*{model!r}") as info:
        build(enc_cfg(type_, model))
    assert repr(valid) in str(info.value)


@pytest.mark.parametrize("type_, model, arch, key", [
    ("clip", "ViT-B-16", dict(layers=2), r"arch\.layers: unknown key.*vision_cfg"),
    ("clip", "ViT-B-16", dict(vision_cfg=dict(layres=2)), r"arch\.vision_cfg\.layres: unknown key.*'layers'"),
    ("clip", "ViT-B-16", dict(vision_cfg=dict(image_size=96)), r"arch\.vision_cfg\.image_size: unknown key"),
    ("siglip", "ViT-B-16-SigLIP", dict(text_cfg=dict(widht=8)), r"arch\.text_cfg\.widht: unknown key"),
    ("dinov2", "vit_small_patch14_dinov2", dict(dept=2), r"arch\.dept: unknown key.*'depth'"),
    ("dinov2", "vit_small_patch14_dinov2", dict(img_size=56), r"arch\.img_size: unknown key.*image_size"),
    ("sam", "vit_b", dict(embed=32), r"arch\.embed: unknown key"),
])
def test_bad_arch_key_names_the_key(type_, model, arch, key):
    with pytest.raises(ValueError, match=rf"encoders\.{type_}\.{key}"):
        build(enc_cfg(type_, model, arch=arch))


def test_bad_arch_value_names_arch():
    with pytest.raises(ValueError, match=r"encoders\.clip\.arch: open_clip could not build"):
        build(enc_cfg("clip", "ViT-B-16", image_size=64, arch=dict(CLIP_ARCH, vision_cfg=dict(pool_type="bad"))))


def test_load_weights_false_never_touches_pretrained():
    cfg = enc_cfg("dinov2", "vit_small_patch14_dinov2", pretrained="/no/such/dir/dino.pth", image_size=56,
                  arch=DINO_ARCH)
    enc = build(cfg, load_weights=False)
    assert enc.grid == (4, 4)
    with pytest.raises(ValueError, match=r"encoders\.dinov2\.pretrained: the file '/no/such/dir/dino\.pth' does not"):
        build(cfg)


@pytest.mark.parametrize("cfg, library", [
    (enc_cfg("clip", "ViT-B-16", pretrained="openai", image_size=64, arch=dict(CLIP_ARCH, quick_gelu=True)),
     "open_clip"),
    (enc_cfg("dinov2", "vit_small_patch14_dinov2", name="dino", pretrained="lvd142m", image_size=56,
             arch=DINO_ARCH), "timm"),
], ids=["open_clip", "timm"])
def test_failed_download_says_which_encoder_source_and_how_to_use_a_file(monkeypatch, tmp_path, cfg, library):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # like a machine without network
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # and an empty cache
    with pytest.raises(RuntimeError) as info:
        build(cfg)
    msg = str(info.value)
    assert f"encoders.{cfg.name}.pretrained" in msg and f"through {library}'s own download cache" in msg
    assert cfg.pretrained in msg and "local file" in msg


def test_dtype_and_freeze():
    enc = build(enc_cfg("clip", "ViT-B-16", image_size=64, dtype="bfloat16", arch=CLIP_ARCH))
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in enc.parameters())
    assert not enc.model.training
    with torch.no_grad():
        assert enc(torch.rand(1, 3, 64, 64)).dtype == torch.bfloat16  # float32 pixels are cast
    trainable = build(enc_cfg("dinov2", "vit_small_patch14_dinov2", image_size=28, freeze=False, arch=DINO_ARCH))
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.model.training
    trainable(torch.rand(1, 3, 28, 28)).sum().backward()
    assert trainable.model.blocks[0].attn.qkv.weight.grad is not None


def test_forward_checks_the_input_size():
    enc = build(enc_cfg("sam", "vit_b", image_size=96, arch=SAM_ARCH))
    with pytest.raises(ValueError, match=r"expected pixels \[B, 3, 96, 96\].*encoders\.sam\.image_size"):
        enc(torch.rand(1, 3, 64, 64))


def test_tiny_preset_builds_every_encoder_with_distinct_grids():
    cfg = load_config("tiny")
    assert {enc.type for enc in cfg.encoders.values()} == {"clip", "siglip", "sam", "dinov2"}
    grids = {}
    for name, enc_cfg_ in cfg.encoders.items():
        enc = build(enc_cfg_)
        with torch.no_grad():
            out = enc(torch.randn(2, 3, enc.image_size, enc.image_size))
        assert out.shape == (2, *enc.grid, enc.dim)
        grids[name] = enc.grid
    assert len(set(grids.values())) == len(grids), grids
    assert all(grid != (cfg.fusion.grid,) * 2 for name, grid in grids.items() if name != "clip")
