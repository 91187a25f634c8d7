"""Per-encoder letterbox colours (fusion.letterbox): the recoloured inputs against images padded
with each colour in the first place, the pad weights against a 2-D resize of the padding
mask, the config choices and the tower's use of ``image_sizes``."""
import pytest
import torch
import torch.nn.functional as F

from fusion import build_tower
from fusion.letterbox import (check_image_sizes, choose_pad_colors, mean_color, pad_weights,
                              roi_pad_weights)
from fusion.preprocess import EncoderInputs, ImageProcessor
from test_preprocess import encoder, natural_image, to_unit

C0, CE = (122, 116, 104), (127, 127, 127)  # CLIP's and SigLIP's mean colours
SHIFT = (torch.tensor(CE) - torch.tensor(C0)).view(1, 3, 1, 1) / 255


def recolour(x, weight):
    return x if weight is None else (x + SHIFT * weight).clamp(0, 1)


@pytest.mark.parametrize("w,h,size,noise", [
    (400, 300, 96, False), (640, 480, 336, False), (300, 400, 96, False), (40, 90, 64, False),
    (400, 301, 96, True), (50, 21, 96, True),
], ids=["landscape-down", "landscape-vsre", "portrait-down", "portrait-up", "noise-portrait", "noise-up"])
def test_recoloured_padding_equals_padding_with_that_colour(w, h, size, noise):
    """pixel_values (and ROI crops) padded with C0, recoloured to CE by the pad weights == padded with
    CE from the start: a resize is linear, so this is exact up to float rounding, except on the few
    border pixels where the processor clamped a bicubic overshoot to [0, 1] (random noise provokes
    them: there the recoloured value is off by up to ~2 8-bit steps)."""
    img = torch.rand(3, h, w) if noise else natural_image(w, h, 3)
    rois = [[[0, 0, 1, 1], [0.05, 0.0, 0.6, 0.4], [0.3, 0.3, 0.6, 0.6]]]  # whole frame, over padding, inside
    base = ImageProcessor(size, "pad", pad_color=C0)(img, rois=rois)
    want = ImageProcessor(size, "pad", pad_color=CE)(img, rois=rois)
    weight = pad_weights(base["image_sizes"], (size, size))
    roi_weight = roi_pad_weights(base["image_sizes"], base["roi_boxes"], base["roi_image_index"], (size, size))
    assert (base["pixel_values"] - want["pixel_values"]).abs().max() * 255 > 20  # the colours really differ
    for label, got, ref in (("frame", recolour(base["pixel_values"], weight), want["pixel_values"]),
                            ("rois", recolour(base["roi_pixel_values"], roi_weight), want["roi_pixel_values"])):
        diff = (got - ref).abs() * 255
        off = (diff > 1e-3).float().mean().item()
        print(f"{label} {w}x{h}->{size}: max {diff.max().item():.4f} 8-bit steps, {off:.2e} of the values off")
        if noise:  # measured: max 0.0000 / 1.67 steps, on 0 / 4e-5 of the values (400x301 / 50x21 upscaled)
            assert diff.max() < 2.5 and off < 1e-3
        else:  # measured: <= 0.0001 steps
            assert diff.max() < 1e-3


def test_pad_weights_equal_a_2d_resize_of_the_padding_mask():
    """The separable 1 - rows ⊗ cols form against the padded square's 2-D mask resized in one call."""
    sizes = torch.tensor([[30, 70], [70, 31], [40, 40], [9, 100]])
    got = pad_weights(sizes, (48, 48))
    for (h, w), weight in zip(sizes.tolist(), got):
        side = max(h, w)
        mask = torch.ones(1, 1, side, side)
        top, left = (side - h) // 2, (side - w) // 2
        mask[..., top:top + h, left:left + w] = 0
        ref = F.interpolate(mask, size=(48, 48), mode="bicubic", align_corners=False, antialias=True)[0]
        assert (weight - ref).abs().max() < 1e-5, (h, w)
    assert got[2].abs().max() == 0  # a square image has no padding
    assert pad_weights(torch.tensor([[5, 5], [8, 8]]), (16, 16)) is None


def test_roi_pad_weights_cover_the_box_parts_outside_the_image():
    sizes = torch.tensor([[50, 100]])  # landscape: frame rows 0-25 and 75-100 of 100 are padding
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.3, 0.6, 0.7], [0.0, 0.0, 0.5, 0.5]])
    got = roi_pad_weights(sizes, boxes, torch.tensor([0, 0, 0]), (20, 20))
    assert torch.allclose(got[0], pad_weights(sizes, (20, 20))[0])  # the whole frame: the frame's padding
    assert got[1].abs().max() < 1e-6  # inside the image
    assert got[2][0, 0].min() > 0.99 and got[2][0, -1].max() < 0.01  # top half of the box is padding


def test_choose_pad_colors():
    encs = {"clip": encoder("clip", 8, (0.48145466, 0.4578275, 0.40821073), (1, 1, 1)),
            "siglip": encoder("siglip", 8, (0.5, 0.5, 0.5), (1, 1, 1))}
    per = choose_pad_colors("per_encoder", encs, {"siglip@2x": "siglip"})
    assert (per.frame, per.source) == (C0, "clip")
    assert per.inputs == {"clip": C0, "siglip": CE, "siglip@2x": CE}
    named = choose_pad_colors("siglip", encs)
    assert (named.frame, named.source, named.inputs) == (CE, "siglip", {"clip": CE, "siglip": CE})
    fixed = choose_pad_colors([0, 10, 255], encs)
    assert (fixed.frame, fixed.source, set(fixed.inputs.values())) == ((0, 10, 255), "clip", {(0, 10, 255)})
    assert mean_color((0.485, 0.456, 0.406)) == (123, 116, 103)  # DINOv2's, as Prismatic's int(x * 255)
    with pytest.raises(ValueError, match=r"processor.pad_color: got 'sam'.*\['per_encoder', 'clip', 'siglip'\]"):
        choose_pad_colors("sam", encs)


@pytest.mark.parametrize("sizes,error,text", [
    ([[10, 20]], ValueError, r"\[2, 2\].*got \[1, 2\]"),
    ([[10, 20, 3], [1, 2, 3]], ValueError, r"\[2, 2\]"),
    ([[10.0, 20.0], [5.0, 5.0]], TypeError, "integers"),
    ([[10, 0], [5, 5]], ValueError, ">= 1"),
    ("10x20", TypeError, "image_sizes"),
])
def test_bad_image_sizes_name_the_argument(sizes, error, text):
    with pytest.raises(error, match="image_sizes") as info:
        check_image_sizes(sizes, 2)
    assert info.match(text)


def test_encoder_inputs_checks_the_pad_weight_shape():
    inputs = EncoderInputs([encoder("a", 8, (0.5,) * 3, (0.5,) * 3)], pad_colors={"a": CE}, frame_color=C0)
    with pytest.raises(ValueError, match=r"pad_weight: expected \[2, 1, 8, 8\]"):
        inputs(torch.rand(2, 3, 8, 8), torch.zeros(2, 1, 4, 4))


# ----------------------------------------------------------------------------- the tower


@pytest.fixture(scope="module")
def tiny():
    return build_tower("tiny", weights="random").eval()


def _padding_colour(x, enc):
    """The top-left pixel of a normalised encoder input, back in 8-bit units."""
    return (x[0, :, 0, 0] * torch.tensor(enc.std) + torch.tensor(enc.mean)) * 255


def test_tower_letterboxes_each_encoder_with_its_own_mean(tiny):
    """A landscape image in pad mode: each encoder's input is padded with int(mean * 255) of its own
    mean (SAM's too), and equals that encoder's input from a processor padding with that colour."""
    image = natural_image(120, 48, 2)
    batch = tiny.image_processor(image)
    px = batch["pixel_values"]
    weight = pad_weights(batch["image_sizes"], tuple(px.shape[-2:]))
    inputs = tiny.encoder_inputs(px, weight)
    plain = tiny.encoder_inputs(px)
    for name, enc in tiny.encoders.items():
        own = mean_color(enc.mean)
        assert torch.allclose(_padding_colour(inputs[name], enc), torch.tensor(own, dtype=torch.float32), atol=1e-3)
        assert torch.allclose(_padding_colour(plain[name], enc), torch.tensor(C0, dtype=torch.float32), atol=1e-3)
        alone = ImageProcessor(tiny.image_processor.image_size, "pad", pad_color=own)(image)["pixel_values"]
        ref = EncoderInputs([enc])(alone)[name]
        steps = ((inputs[name] - ref).abs().amax(dim=(0, 2, 3)) * torch.tensor(enc.std) * 255).max().item()
        print(f"{name}: max {steps:.3f} 8-bit steps")
        assert steps < 1.5, name  # measured 0.00 / 0.40 / 0.00 / 0.00: a border pixel the processor clamped
    with torch.no_grad():
        out = tiny(**batch, return_dict=True)
        grids = {name: enc(inputs[name]) for name, enc in tiny.encoders.items()}
        assert torch.allclose(out.tokens, tiny.merge_and_project(grids), atol=1e-5)
        assert not torch.allclose(out.tokens, tiny(px), atol=1e-3)  # without image_sizes: one colour


def test_pad_color_config_choices():
    siglip = build_tower("tiny", ["processor.pad_color=siglip"], weights="random")
    assert siglip.image_processor.pad_color == (127, 127, 127)
    assert siglip.image_processor.image_mean == pytest.approx([0.5] * 3)  # what LLaVA reads for its padding
    assert not any(any(s is not None for s in g.shifts) for g in siglip.encoder_inputs.groups)
    fixed = build_tower("tiny", ["processor.pad_color=[0, 255, 0]"], weights="random")
    assert fixed.image_processor.pad_color == (0, 255, 0)
    px = fixed.image_processor(natural_image(80, 40, 1))["pixel_values"]
    assert torch.equal(px[0, :, 0, 0] * 255, torch.tensor([0.0, 255.0, 0.0]))
    squash = build_tower("tiny", ["processor.mode=squash"], weights="random")
    assert not any(any(s is not None for s in g.shifts) for g in squash.encoder_inputs.groups)
    with pytest.raises(ValueError, match=r"processor.pad_color: got 'dinno' \(did you mean 'dino'\?\)"):
        build_tower("tiny", ["processor.pad_color=dinno"], weights="random")
    with pytest.raises(ValueError, match=r"processor.pad_color: expected 'per_encoder'.*got \[0, 256, 0\]"):
        build_tower("tiny", ["processor.pad_color=[0, 256, 0]"], weights="random")


def test_squash_mode_ignores_image_sizes_but_checks_them(tiny):
    squash = build_tower("tiny", ["processor.mode=squash"], weights="random").eval()
    batch = squash.image_processor(natural_image(90, 40, 1))
    with torch.no_grad():
        assert torch.equal(squash(**batch), squash(batch["pixel_values"]))
        with pytest.raises(ValueError, match="image_sizes"):
            squash(batch["pixel_values"], image_sizes=[[1, 2], [3, 4]])


def test_processor_reports_original_sizes():
    proc = ImageProcessor(32)
    images = [natural_image(40, 20, 0), to_unit(natural_image(7, 9, 1)), torch.rand(2, 3, 5, 6)]
    assert proc(images)["image_sizes"].tolist() == [[20, 40], [9, 7], [5, 6], [5, 6]]
    assert proc(images)["image_sizes"].dtype == torch.int64
