"""ImageProcessor / EncoderInputs against each upstream's own transform, and input handling.

Upstream references: open_clip's ``image_transform``, timm's ``resolve_data_config`` +
``create_transform`` (DINOv2), segment_anything's ``ResizeLongestSide`` +
``Sam.preprocess``, a hand-written LLaVA ``expand2square`` and PIL's
``convert("RGB")``.

Tolerances are in *8-bit steps* (1/255 of the [0, 1] range) converted to normalised
units by the smallest channel std: PIL resizes 8-bit images and rounds after each of
its two passes, we resize in float, so one step is the expected gap. Each tolerance
sits just above the worst gap measured on the deterministic test image (comments give
the measurement); every comparison prints its worst mismatch (run with ``-s``).
"""
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from fusion.preprocess import (CLIP_MEAN, CLIP_STD, EncoderInputs, ImageProcessor, encoder_inputs,
                               longest_side_shape, resize_images)

open_clip_transform = pytest.importorskip("open_clip.transform")
timm_data = pytest.importorskip("timm.data")
sam_transforms = pytest.importorskip("segment_anything.utils.transforms")
sam_modeling = pytest.importorskip("segment_anything.modeling")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SAM_MEAN = tuple(v / 255 for v in (123.675, 116.28, 103.53))
SAM_STD = tuple(v / 255 for v in (58.395, 57.12, 57.375))


# ----------------------------------------------------------------------------- helpers


def natural_image(w, h, seed=0):
    """A deterministic photo-like RGB image: smooth colour fields, hard-edged shapes,
    thin dark lines, a slight blur and +-6 levels of noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + 1), 0.5 + 0.4 * np.cos(5 * y), 0.5 + 0.3 * np.sin(4 * (x + y))], -1)
    img = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(1, max(2, w // 3))), y0 + int(rng.integers(1, max(2, h // 3)))]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    for _ in range(8):
        draw.line([tuple(int(v) for v in rng.integers(0, (w, h))) for _ in range(2)], fill=(0, 0, 0), width=2)
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encoder(name, size, mean, std, resize="squash", interpolation="bicubic"):
    return SimpleNamespace(name=name, image_size=size, mean=mean, std=std, resize=resize,
                           interpolation=interpolation)


def steps(n, std):
    """``n`` 8-bit steps in normalised units of the channel with the smallest std."""
    return n / 255 / min(std)


def ours(image, size, enc, mode="pad"):
    """Our full path for one image: processor at ``size``, then the encoder's device input ``[3, s, s]``."""
    pixel_values = ImageProcessor(size, mode)(image)["pixel_values"]
    return EncoderInputs([enc])(pixel_values)[enc.name][0]


def worst(label, got, ref):
    """Max |got - ref| (printed with the mean and the place of the worst mismatch)."""
    ref = torch.as_tensor(ref, dtype=torch.float32)
    assert got.shape == ref.shape, f"{label}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    diff = (got - ref).abs()
    idx = np.unravel_index(int(diff.argmax()), diff.shape)
    print(f"{label}: max {diff.max().item():.5f} at {tuple(int(i) for i in idx)}, mean {diff.mean().item():.5f}")
    return diff.max().item(), diff.mean().item()


def expand2square(img, fill):
    """LLaVA-1.5's padding, written out: a square of the longest side, image centred."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def to_unit(img):
    """PIL RGB -> ``[3, H, W]`` float32 in [0, 1], as torchvision's ToTensor does."""
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float().div(255)


@pytest.fixture(scope="module")
def tiny_sam():
    """A real segment_anything ``Sam`` (1024 px input, a 1-block 16-wide encoder): only
    its ``preprocess`` is used, which needs ``pixel_mean``/``pixel_std``/``image_encoder.img_size``."""
    m = sam_modeling
    return m.Sam(
        image_encoder=m.ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=16, depth=1, num_heads=1, out_chans=8),
        prompt_encoder=m.PromptEncoder(embed_dim=8, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                       mask_in_chans=4),
        mask_decoder=m.MaskDecoder(transformer_dim=8, iou_head_hidden_dim=8,
                                   transformer=m.TwoWayTransformer(depth=1, embedding_dim=8, num_heads=1, mlp_dim=16)),
    )


# ----------------------------------------------------------------------------- upstream: open_clip


CLIP = encoder("clip", 336, CLIP_MEAN, CLIP_STD)


@pytest.mark.parametrize("side,seed", [(500, 0), (777, 3), (250, 1)])  # down, down, up
def test_square_image_matches_open_clip(side, seed):
    img = natural_image(side, side, seed)
    ref = open_clip_transform.image_transform(336, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)(img)
    max_diff, mean_diff = worst(f"open_clip {side}px", ours(img, 336, CLIP, "pad"), ref)
    # measured: max 0.0152 / 0.0151 / 0.0159 (1.1 steps = 0.0165), mean 0.0043
    assert max_diff < steps(1.1, CLIP_STD)
    assert mean_diff < 0.005


def test_no_resize_normalisation_matches_open_clip_exactly():
    img = natural_image(336, 336, 7)
    ref = open_clip_transform.image_transform(336, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)(img)
    max_diff, _ = worst("open_clip no resize", ours(img, 336, CLIP), ref)
    assert max_diff < 1e-6


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (333, 500)])
def test_crop_and_squash_modes_match_open_clip(w, h):
    img = natural_image(w, h, 2)
    ref_crop = open_clip_transform.image_transform(336, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)(img)
    ref_squash = open_clip_transform.image_transform(336, is_train=False, mean=CLIP_MEAN, std=CLIP_STD,
                                                     resize_mode="squash")(img)
    crop, _ = worst(f"crop {w}x{h}", ours(img, 336, CLIP, "crop"), ref_crop)
    squash, _ = worst(f"squash {w}x{h}", ours(img, 336, CLIP, "squash"), ref_squash)
    # measured: crop <= 0.0156 (1.1 steps = 0.0165), squash <= 0.0200 (1.33 steps)
    assert crop < steps(1.1, CLIP_STD)
    assert squash < steps(1.4, CLIP_STD)


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (333, 500)])
def test_pad_mode_matches_llava_expand2square_then_open_clip(w, h):
    """LLaVA-1.5's 'pad': expand2square with int(mean * 255), then CLIP's transform."""
    img = natural_image(w, h, 2)
    padded = expand2square(img, tuple(int(m * 255) for m in CLIP_MEAN))
    ref = open_clip_transform.image_transform(336, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)(padded)
    max_diff, _ = worst(f"llava pad {w}x{h}", ours(img, 336, CLIP, "pad"), ref)
    # measured: 0.0147 (landscape), 0.0176 / 0.0236 (portrait: resized height-first; 1.7 steps = 0.0255)
    assert max_diff < steps(1.7, CLIP_STD)


def test_two_resizes_cost_vs_open_clip():
    """The tower's real path when the processor size (384) differs from CLIP's (336):
    two bicubic resizes instead of one. Small on average, visible at hard edges."""
    img = natural_image(500, 500, 0)
    ref = open_clip_transform.image_transform(336, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)(img)
    max_diff, mean_diff = worst("open_clip via 384", ours(img, 384, CLIP), ref)
    # measured: max 0.147 (about 10 steps, on a drawn edge), mean 0.0091
    assert mean_diff < 0.011
    assert max_diff < 0.17


# ----------------------------------------------------------------------------- upstream: timm DINOv2


@pytest.fixture(scope="module")
def dino_transform():
    cfg = timm_data.resolve_data_config(
        pretrained_cfg={"input_size": (3, 518, 518), "interpolation": "bicubic", "crop_pct": 1.0,
                        "crop_mode": "center", "mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    import timm

    upstream = timm.models.get_pretrained_cfg("vit_large_patch14_reg4_dinov2.lvd142m").to_dict()
    assert timm_data.resolve_data_config(pretrained_cfg=upstream) == cfg  # the registered DINOv2 config
    return cfg, timm_data.create_transform(**cfg)


@pytest.mark.parametrize("w,h,mode", [(600, 600, "pad"), (400, 400, "pad"), (700, 520, "crop")])
def test_matches_timm_dinov2_transform(dino_transform, w, h, mode):
    cfg, transform = dino_transform
    img = natural_image(w, h, 4)
    dino = encoder("dino", cfg["input_size"][-1], cfg["mean"], cfg["std"], interpolation=cfg["interpolation"])
    max_diff, _ = worst(f"timm dinov2 {w}x{h} {mode}", ours(img, 518, dino, mode), transform(img))
    # measured: 0.0188 / 0.0188 / 0.0187 (1.1 steps of std 0.224 = 0.0193)
    assert max_diff < steps(1.1, IMAGENET_STD)


# ----------------------------------------------------------------------------- upstream: segment_anything


SAM = encoder("sam", 1024, SAM_MEAN, SAM_STD, resize="longest_side_pad", interpolation="bilinear")


@pytest.mark.parametrize("w,h", [(1200, 800), (600, 900), (700, 700)])
def test_longest_side_pad_matches_sam(tiny_sam, w, h):
    arr = np.asarray(natural_image(w, h, 5))
    resized = sam_transforms.ResizeLongestSide(1024).apply_image(arr)  # [h', w', 3] uint8
    ref = tiny_sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float())[0]
    pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255  # non-square [1, 3, h, w]
    got = EncoderInputs([SAM])(pixels)["sam"][0]
    max_diff, _ = worst(f"sam {w}x{h}", got, ref)
    # measured: 0.0173 / 0.0175 / 0.0174 (1.1 steps = 0.0193)
    assert max_diff < steps(1.1, SAM_STD)
    nh, nw = resized.shape[:2]
    assert (got[:, nh:] == 0).all() and (got[:, :, nw:] == 0).all()  # padding after normalising


@pytest.mark.parametrize("h,w", [(800, 1200), (1, 3000), (333, 500), (1024, 1024), (37, 36), (999, 1001)])
def test_longest_side_shape_matches_sam(h, w):
    assert longest_side_shape(h, w, 1024) == sam_transforms.ResizeLongestSide.get_preprocess_shape(h, w, 1024)


def test_longest_side_pad_on_square_is_resize_and_normalise():
    x = torch.rand(2, 3, 96, 96)
    got = EncoderInputs([encoder("sam", 64, SAM_MEAN, SAM_STD, "longest_side_pad", "bilinear")])(x)["sam"]
    mean, std = torch.tensor(SAM_MEAN).view(1, 3, 1, 1), torch.tensor(SAM_STD).view(1, 3, 1, 1)
    ref = (resize_images(x, (64, 64), "bilinear") - mean) / std
    assert worst("sam square", got, ref)[0] < 1e-6


# ----------------------------------------------------------------------------- LLaVA pad semantics


def test_pad_colour_is_llavas_truncated_mean():
    proc = ImageProcessor(336)
    assert proc.pad_color == tuple(int(m * 255) for m in CLIP_MEAN) == (122, 116, 104)


@pytest.mark.parametrize("w,h", [(7, 4), (4, 7), (50, 21), (21, 50), (6, 6)])
def test_pad_equals_handwritten_expand2square(w, h):
    img = natural_image(w, h, 6)
    side = max(w, h)
    ref = to_unit(expand2square(img, (122, 116, 104)))
    got = ImageProcessor(side, "pad")(img)["pixel_values"][0]  # no resize: must be exact
    assert torch.equal(got, ref)
    # a float input gets the same pad colour
    assert torch.equal(ImageProcessor(side, "pad")(to_unit(img))["pixel_values"][0], ref)


@pytest.mark.parametrize("w,h,block", [(90, 40, None), (40, 90, None), (131, 64, None), (40, 90, 200), (37, 91, 91)])
def test_pad_without_full_square_equals_pad_then_resize(monkeypatch, w, h, block):
    """The processor never builds the full-size square (landscape: bands added after the
    width pass; portrait: padded row blocks of at most ``_BLOCK`` pixels), yet gives the
    pixels of padding first and resizing after, in PIL's width-then-height order."""
    import fusion.preprocess

    if block is not None:
        monkeypatch.setattr(fusion.preprocess, "_BLOCK", block)  # force several row blocks
    img = natural_image(w, h, 8)
    ref = resize_images(to_unit(expand2square(img, (122, 116, 104)))[None], (48, 48))
    got = ImageProcessor(48, "pad")(img)["pixel_values"]
    assert worst(f"pad blocks {w}x{h} block={block}", got, ref)[0] < 1e-6


@pytest.mark.parametrize("w,h", [(30, 7), (7, 30), (20, 30), (3, 200), (200, 3)])
def test_crop_mode_equals_resize_then_centre_crop(monkeypatch, w, h):
    """Cropping the long axis right after its pass is the same as a full resize then a crop
    (also on the height-first path for very narrow portraits)."""
    import fusion.preprocess

    monkeypatch.setattr(fusion.preprocess, "_BLOCK", 1000)
    x = torch.rand(1, 3, h, w)
    s = 24
    nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
    if w < h and nh * s > 1000:  # the height-first path
        full = resize_images(resize_images(x, (nh, w)), (nh, nw))
    else:
        full = resize_images(x, (nh, nw))
    ref = full[..., top:top + s, left:left + s]
    assert worst(f"crop {w}x{h}", ImageProcessor(s, "crop")(x)["pixel_values"], ref)[0] < 1e-6


def test_crop_offsets_follow_torchvision():
    from torchvision.transforms import CenterCrop

    img = natural_image(7, 4, 9)  # short side already 4: crop only, offset round(1.5) = 2
    got = ImageProcessor(4, "crop")(img)["pixel_values"][0]
    assert torch.equal(got, to_unit(CenterCrop(4)(img)))


# ----------------------------------------------------------------------------- input kinds


def _mode_image(mode):
    rgb = natural_image(48, 48, 10)
    rng = np.random.default_rng(0)
    alpha = Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8))
    if mode == "RGBA":
        out = rgb.copy()
        out.putalpha(alpha)
        return out
    if mode == "LA":
        out = rgb.convert("L")
        out.putalpha(alpha)
        return out
    if mode == "P+transparency":
        out = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        out.info["transparency"] = 3
        return out
    if mode == "I;16":  # 16-bit: PIL clips to 0-255 when converting
        return Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 3))
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "P+transparency", "L", "1", "CMYK", "YCbCr",
                                  "I;16", "I", "F"])
def test_pil_modes_equal_pil_convert_rgb(mode):
    img = _mode_image(mode)
    got = ImageProcessor(48)(img)["pixel_values"][0]
    assert torch.equal(got, to_unit(img.convert("RGB")))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency"])
def test_alpha_white_composites_over_white(mode):
    img = _mode_image(mode)
    rgba = torch.from_numpy(np.array(img.convert("RGBA"))).permute(2, 0, 1).float() / 255
    got = ImageProcessor(48, alpha="white")(img)["pixel_values"][0]
    ref = rgba[:3] * rgba[3:] + (1 - rgba[3:])
    assert worst(f"alpha white {mode}", got, ref)[0] < 1e-6
    # PIL's own compositing (8-bit) agrees to one step
    white = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    assert worst("vs PIL alpha_composite", got, to_unit(white))[0] <= 1 / 255 + 1e-6


def test_rgba_arrays_drop_alpha_or_composite():
    rgba = np.array(_mode_image("RGBA"))  # [48, 48, 4]
    ref_rgb = torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(ImageProcessor(48)(rgba)["pixel_values"][0], ref_rgb)
    tensor = torch.from_numpy(rgba).permute(2, 0, 1)
    assert torch.equal(ImageProcessor(48)(tensor)["pixel_values"][0], ref_rgb)
    white = ImageProcessor(48, alpha="white")(tensor)["pixel_values"][0]
    assert torch.equal(white, ImageProcessor(48, alpha="white")(Image.fromarray(rgba))["pixel_values"][0])


def test_numpy_and_tensor_layouts_agree():
    img = natural_image(40, 30, 11)
    arr = np.asarray(img)  # read-only [30, 40, 3] uint8
    ref = ImageProcessor(32)(img)["pixel_values"]
    proc = ImageProcessor(32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from torch
        assert torch.equal(proc(arr)["pixel_values"], ref)
        assert torch.equal(proc(arr[:, ::-1][:, ::-1])["pixel_values"], ref)  # non-contiguous view
        assert torch.equal(proc(arr[None])["pixel_values"], ref)  # [B, H, W, C]
        assert torch.equal(proc(torch.from_numpy(arr.copy()).permute(2, 0, 1))["pixel_values"], ref)  # CHW uint8
        assert torch.equal(proc(to_unit(img)[None])["pixel_values"], ref)  # BCHW float
        assert torch.equal(proc(arr.astype(np.float64) / 255)["pixel_values"], ref)
    grey = np.asarray(img.convert("L"))
    ref_grey = proc(img.convert("L"))["pixel_values"]
    for x in (grey, grey[..., None], torch.from_numpy(grey.copy()), torch.from_numpy(grey.copy())[None]):
        assert torch.equal(proc(x)["pixel_values"], ref_grey)


def test_float_inputs_are_not_quantised_and_stay_differentiable():
    x = torch.linspace(0, 1, 3 * 17 * 17).view(1, 3, 17, 17).requires_grad_()
    out = ImageProcessor(17)(x)["pixel_values"]
    assert torch.equal(out, x.detach())  # no 1/255 rounding
    out.detach().add_(1)
    assert x.max() == 1  # the output is a new tensor, never a view of the input
    ImageProcessor(24)(x)["pixel_values"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    sixteen_bit = np.linspace(0, 1, 65536 // 256, dtype=np.float64).reshape(16, 16)  # finer than 8 bits
    assert torch.allclose(ImageProcessor(16)(sixteen_bit)["pixel_values"][0, 0].double(),
                          torch.from_numpy(sixteen_bit), atol=1e-7)


def test_list_of_different_sizes_and_kinds():
    images = [natural_image(64, 48, 1), np.asarray(natural_image(20, 90, 2)), torch.rand(3, 33, 33),
              torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8)]
    proc = ImageProcessor(40)
    out = proc(images)["pixel_values"]
    assert out.shape == (5, 3, 40, 40) and out.dtype == torch.float32 and out.is_contiguous()
    assert 0 <= out.min() and out.max() <= 1
    singles = torch.cat([proc(im)["pixel_values"] for im in images])
    assert torch.equal(out, singles)


def test_output_container_and_llava_attributes():
    proc = ImageProcessor(336)
    out = proc.preprocess(natural_image(30, 20), return_tensors="pt")
    assert isinstance(out, dict) and out.pixel_values is out["pixel_values"]
    assert out["pixel_values"].shape == (1, 3, 336, 336)
    assert torch.equal(proc(natural_image(30, 20), return_tensors=None)["pixel_values"], out["pixel_values"])
    assert out.to(torch.float16)["pixel_values"].dtype == torch.float16
    with pytest.raises(AttributeError, match="no key"):
        out.input_ids
    assert proc.image_mean == list(CLIP_MEAN) and proc.image_std == list(CLIP_STD)
    assert proc.crop_size == {"height": 336, "width": 336}
    assert proc.size == {"shortest_edge": 336} and proc.image_size == 336
    assert proc.do_normalize is False
    # LLaVA's own call: expand2square(image, tuple(int(x * 255) for x in proc.image_mean))
    assert tuple(int(x * 255) for x in proc.image_mean) == proc.pad_color


# ----------------------------------------------------------------------------- errors


BAD_IMAGES = [
    ([], ValueError, "empty list"),
    (None, ValueError, "None"),
    (Image.new("RGB", (0, 5)), ValueError, "0x5"),
    (np.zeros((0, 4, 3), np.uint8), ValueError, "no pixels"),
    (torch.zeros(0, 3, 4, 4), ValueError, "no pixels"),
    (np.zeros((2, 2, 2, 2, 2), np.uint8), ValueError, "rank 5"),
    (torch.zeros(5), ValueError, "rank 1"),
    (np.zeros((5, 5, 2), np.uint8), ValueError, "2 channels"),
    (np.zeros((3, 5, 6), np.uint8), ValueError, "channels-first"),
    (torch.zeros(2, 5, 5), ValueError, "2 channels"),
    (torch.zeros(5, 6, 3), ValueError, "permute"),
    (torch.full((3, 4, 4), float("nan")), ValueError, "NaN"),
    (torch.zeros(3, 4, 4, dtype=torch.int32), TypeError, "torch.int32"),
    (torch.zeros(3, 4, 4, dtype=torch.bool), TypeError, "torch.bool"),
    (np.zeros((4, 4, 3), np.uint16), TypeError, "uint16"),
    (torch.full((3, 4, 4), 200.0), ValueError, "0-255"),
    (torch.full((3, 4, 4), -1.5), ValueError, "normalised"),
    ("cat.png", TypeError, "PIL.Image.open"),
    ([[torch.zeros(3, 4, 4)]], TypeError, "nested"),
    ([torch.zeros(3, 4, 4), 7], TypeError, r"images\[1\]: got int"),
]


@pytest.mark.parametrize("images,error,text", BAD_IMAGES, ids=[str(i) for i in range(len(BAD_IMAGES))])
def test_bad_images_name_the_argument(images, error, text):
    with pytest.raises(error, match="images") as info:
        ImageProcessor(32)(images)
    assert info.match(text)


def test_small_float_overshoot_is_clamped():
    x = torch.full((3, 4, 4), 1.002)
    assert ImageProcessor(4)(x)["pixel_values"].max() == 1


@pytest.mark.parametrize("kwargs,text", [
    ({"size": 0}, "size"), ({"size": 2.5}, "size"), ({"size": 8, "mode": "pads"}, "mode"),
    ({"size": 8, "alpha": "black"}, "alpha"), ({"size": 8, "image_mean": (0.5, 0.5)}, "image_mean"),
    ({"size": 8, "image_std": (0.5, 0.0, 0.5)}, "image_std"),
])
def test_bad_processor_arguments(kwargs, text):
    with pytest.raises(ValueError, match=text):
        ImageProcessor(**kwargs)


def test_from_config_uses_the_largest_encoder_size():
    from fusion.config import ProcessorConfig

    encs = [encoder("a", 224, CLIP_MEAN, CLIP_STD), encoder("b", 384, CLIP_MEAN, CLIP_STD)]
    assert ImageProcessor.from_config(ProcessorConfig(), encs).image_size == 384
    assert ImageProcessor.from_config(ProcessorConfig(size=336, mode="crop"), encs).mode == "crop"
    with pytest.raises(ValueError, match="processor.size"):
        ImageProcessor.from_config(ProcessorConfig())


def test_bad_return_tensors():
    with pytest.raises(ValueError, match="return_tensors"):
        ImageProcessor(8)(torch.rand(3, 8, 8), return_tensors="np")


# ----------------------------------------------------------------------------- EncoderInputs


@pytest.fixture
def count_interpolate(monkeypatch):
    calls = []
    real = F.interpolate

    def counting(x, *args, **kwargs):
        calls.append((tuple(x.shape), kwargs.get("size"), kwargs.get("mode")))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", counting)
    return calls


def test_encoders_with_the_same_size_share_one_resize(count_interpolate):
    x = torch.rand(2, 3, 384, 384)
    clip = encoder("clip", 336, CLIP_MEAN, CLIP_STD)
    EncoderInputs([clip])(x)
    one_encoder = len(count_interpolate)
    assert one_encoder >= 1
    count_interpolate.clear()
    shared = [clip, encoder("siglip", 336, (0.5,) * 3, (0.5,) * 3), encoder("dino", 336, IMAGENET_MEAN, IMAGENET_STD),
              encoder("clip2", 336, CLIP_MEAN, CLIP_STD)]
    module = EncoderInputs(shared)
    assert len(module.groups) == 1 and len(module.groups[0].norms) == 3
    out = module(x)
    assert len(count_interpolate) == one_encoder  # one resize for all four
    assert out["clip"] is out["clip2"]  # identical requests: one tensor
    resized = resize_images(x, (336, 336))
    for enc in shared:
        mean, std = torch.tensor(enc.mean).view(1, 3, 1, 1), torch.tensor(enc.std).view(1, 3, 1, 1)
        assert out[enc.name].shape == (2, 3, 336, 336) and out[enc.name].dtype == torch.float32
        assert worst(f"normalise {enc.name}", out[enc.name], (resized - mean) / std)[0] < 1e-6
    count_interpolate.clear()
    module = EncoderInputs(shared + [encoder("sam", 256, SAM_MEAN, SAM_STD, "longest_side_pad", "bilinear"),
                                     encoder("clip_bilinear", 336, CLIP_MEAN, CLIP_STD, interpolation="bilinear")])
    assert len(module.groups) == 3
    out = module(x)
    assert list(out) == [e.name for e in shared] + ["sam", "clip_bilinear"]  # encoder order
    assert len([c for c in count_interpolate if c[2] == "bicubic"]) == one_encoder


def test_same_size_input_is_not_resized(count_interpolate):
    x = torch.rand(1, 3, 336, 336)
    out = EncoderInputs([CLIP, encoder("sam", 336, SAM_MEAN, SAM_STD, "longest_side_pad", "bilinear")])(x)
    assert count_interpolate == []
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert worst("no resize", out["clip"], (x - mean) / std)[0] < 1e-6
    assert torch.equal(encoder_inputs(x, [CLIP])["clip"], out["clip"])


def test_normalisation_constants_stay_exact_float32():
    module = EncoderInputs([CLIP]).to(torch.bfloat16)
    assert module.mean_0.dtype == torch.float32
    assert module.mean_0.flatten().tolist() == torch.tensor(CLIP_MEAN).tolist()
    assert module.state_dict() == {}
    x = torch.rand(1, 3, 336, 336)
    assert torch.equal(module(x)["clip"], EncoderInputs([CLIP])(x)["clip"])
    assert module(x.to(torch.bfloat16))["clip"].dtype == torch.float32


@pytest.mark.parametrize("attr,value,text", [
    ("resize", "pad", "resize"), ("interpolation", "nearest", "interpolation"), ("image_size", 0, "image_size"),
    ("mean", (0.5, 0.5), "mean"), ("std", (0.5, 0.5, 0.0), "std"), ("name", "", "name"),
])
def test_bad_encoder_attributes_are_named(attr, value, text):
    enc = encoder("clip", 336, CLIP_MEAN, CLIP_STD)
    setattr(enc, attr, value)
    with pytest.raises(ValueError, match=text):
        EncoderInputs([enc])


def test_encoder_inputs_errors():
    with pytest.raises(ValueError, match="encoders"):
        EncoderInputs([])
    with pytest.raises(ValueError, match="twice"):
        EncoderInputs([CLIP, CLIP])
    with pytest.raises(TypeError, match="lacks"):
        EncoderInputs([SimpleNamespace(name="x")])
    module = EncoderInputs([CLIP])
    with pytest.raises(TypeError, match="pixel_values"):
        module(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pixel_values"):
        module(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="pixel_values"):
        module(np.zeros((1, 3, 8, 8), np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    encs = [CLIP, encoder("dino", 224, IMAGENET_MEAN, IMAGENET_STD),
            encoder("sam", 1024, SAM_MEAN, SAM_STD, "longest_side_pad", "bilinear")]
    x = torch.rand(2, 3, 384, 384)
    cpu = EncoderInputs(encs)(x)
    gpu = EncoderInputs(encs).cuda()(x.cuda())
    for name in cpu:
        assert gpu[name].is_cuda
        assert worst(f"cuda {name}", gpu[name].cpu(), cpu[name])[0] < 1e-4
    img = torch.randint(0, 256, (3, 300, 500), dtype=torch.uint8)
    got = ImageProcessor(384)(img.cuda())["pixel_values"]
    assert got.is_cuda
    assert worst("cuda processor", got.cpu(), ImageProcessor(384)(img)["pixel_values"])[0] < 1e-4
