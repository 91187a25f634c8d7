"""ROI crops (Chain-of-Spot): cut from the original image at native resolution, encoded and appended
with their boxes; checked by hand, against PIL, and whole-image ROI == global tokens on the tiny tower."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_multiscale import toy_config  # registers the patch-mean toy encoder

from fusion import build_tower
from fusion.preprocess import ImageProcessor, resize_images

PAD = torch.tensor([122, 116, 104]) / 255.0  # LLaVA's pad colour for CLIP's mean


def _image(h, w, seed=0):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def test_crop_is_cut_from_the_original_at_native_resolution():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (100, 200, 3), dtype=np.uint8)  # noise: detail that a downscale destroys
    img = Image.fromarray(arr)
    proc = ImageProcessor(32, mode="squash")
    out = proc(img, rois=[[0.25, 0.0, 0.5, 0.5]])
    assert out.roi_pixel_values.shape == (1, 3, 32, 32)
    assert out.roi_image_index.tolist() == [0]
    assert out.roi_boxes.tolist() == [[0.25, 0.0, 0.5, 0.5]]
    ref = np.asarray(img.crop((50, 0, 100, 50)).resize((32, 32), Image.BICUBIC)).astype(np.float32) / 255
    got = out.roi_pixel_values[0].permute(1, 2, 0).numpy()
    assert np.abs(got - ref).max() <= 2.5 / 255  # PIL rounds to 8 bits after each pass
    # cutting the same box from the 32 px pixel_values instead loses the detail
    from_resized = resize_images(out.pixel_values[:, :, 0:16, 8:16], (32, 32))[0].permute(1, 2, 0).numpy()
    assert np.abs(from_resized - ref).max() > 0.2


def test_pad_mode_frame_by_hand():
    img = _image(50, 100)  # landscape: pad mode adds 25 rows above and below -> a 100 x 100 frame
    proc = ImageProcessor(50, mode="pad")  # 50 px crops of a 100 px frame need no resize
    out = proc(img, rois=[[[0.0, 0.25, 0.5, 0.75], [0.5, 0.0, 1.0, 0.5]]])
    assert out.roi_image_index.tolist() == [0, 0]
    assert out.roi_boxes.tolist() == [[0.0, 0.25, 0.5, 0.75], [0.5, 0.0, 1.0, 0.5]]
    torch.testing.assert_close(out.roi_pixel_values[0], img[:, 0:50, 0:50], rtol=0, atol=0)
    second = out.roi_pixel_values[1]
    torch.testing.assert_close(second[:, :25], PAD.view(3, 1, 1).expand(3, 25, 50))  # over the padding
    torch.testing.assert_close(second[:, 25:], img[:, 0:25, 50:100], rtol=0, atol=0)


def test_crop_mode_and_squash_rounding_by_hand():
    img = _image(60, 120, seed=1)
    proc = ImageProcessor(30, mode="crop")  # resized to 60 x 30, centre crop cols 15..45 -> original 30..90
    out = proc(img, rois=torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    torch.testing.assert_close(out.roi_pixel_values[0], resize_images(img[None, :, :, 30:90], (30, 30))[0])
    out = proc(img, rois=[[[0.5, 0.5, 1.0, 1.0]]])
    torch.testing.assert_close(out.roi_pixel_values[0], resize_images(img[None, :, 30:60, 60:90], (30, 30))[0])
    # squash: edges are rounded to whole original pixels and the boxes report what was cut
    out = ImageProcessor(8, mode="squash")(_image(10, 100), rois=[[[0.123, 0.0, 0.456, 0.96]]])
    torch.testing.assert_close(out.roi_boxes, torch.tensor([[0.12, 0.0, 0.46, 1.0]]))


def test_many_images_any_number_of_boxes():
    imgs = [_image(40, 40, 0), _image(30, 60, 1), _image(50, 20, 2)]
    out = ImageProcessor(16, mode="squash")(imgs, rois=[None, ["[0.1, 0.1, 0.5, 0.5]", [0, 0, 1, 1]],
                                                        torch.tensor([[0.5, 0.5, 1.0, 1.0]])])
    assert out.pixel_values.shape == (3, 3, 16, 16)
    assert out.roi_pixel_values.shape == (3, 3, 16, 16)
    assert out.roi_image_index.tolist() == [1, 1, 2]
    torch.testing.assert_close(out.roi_pixel_values[1], out.pixel_values[1])  # whole image, squash
    one = ImageProcessor(16, mode="squash")(imgs[1], rois="[0.5, 0.0, 1.0, 1.0]")  # one image: just its box
    torch.testing.assert_close(one.roi_pixel_values[0], resize_images(imgs[1][None, :, :, 30:], (16, 16))[0])
    none = ImageProcessor(16)(imgs[0], rois=[[]])
    assert none.roi_pixel_values.shape == (0, 3, 16, 16) and none.roi_boxes.shape == (0, 4)
    half = none.to(torch.float16)
    assert half.roi_image_index.dtype == torch.int64 and half.pixel_values.dtype == torch.float16


@pytest.mark.parametrize("rois, err, fragment", [
    ([[0.1, 0.1, 0.5, 0.5]], ValueError, "2 image"),  # one entry for two images
    ([None, [0.1, 0.1, 1.5, 0.5]], ValueError, r"rois\[1\].*outside the image"),
    ([None, [0.5, 0.1, 0.5, 0.5]], ValueError, r"rois\[1\].*empty"),
    ([[[0.1, 0.1, 0.5, 0.5], [0.6, 0.1, 0.5, 0.5]], None], ValueError, r"rois\[0\]\[1\].*flipped"),
    ([None, "[0.1, 0.1, 0.5]"], ValueError, r"rois\[1\].*cannot parse"),
    ([None, [0.50, 0.1, 0.52, 0.5]], ValueError, r"rois\[1\].*narrower than one pixel of the 10x10"),
    (torch.zeros(3, 4), ValueError, r"\[2, 4\]"),
    ({"a": 1}, TypeError, "rois"),
])
def test_roi_errors(rois, err, fragment):
    with pytest.raises(err, match=fragment):
        ImageProcessor(8, mode="squash")([_image(10, 10), _image(10, 10)], rois=rois)


# ----------------------------------------------------------------------------- in the tower


@pytest.fixture(scope="module")
def toy():
    encoders = {"a": {"type": "toy_patchmean", "model": "toy", "image_size": 8, "arch": {"patch": 2}},
                "b": {"type": "toy_patchmean", "model": "toy", "image_size": 16, "arch": {"patch": 4}}}
    return build_tower(toy_config(encoders=encoders, fusion={"norm": "layernorm", "levels": [2]},
                                  processor={"mode": "squash", "size": 16}), weights="random")


def test_roi_tokens_boxes_and_segments(toy):
    imgs = [_image(32, 48, 0), _image(40, 24, 1)]
    batch = toy.image_processor(imgs, rois=[[[0.5, 0.0, 1.0, 0.5], [0.0, 0.0, 0.5, 1.0]],
                                            [[0.25, 0.25, 0.75, 0.75], [0.0, 0.5, 1.0, 1.0]]])
    out = toy(**batch, return_dict=True)
    assert out.tokens.shape == (2, 20 + 2 * 16, 6)
    assert out.segments == [("fused", 0, 16), ("level2", 16, 20), ("roi0", 20, 36), ("roi1", 36, 52)]
    assert out.token_boxes.shape == (2, 52, 4)
    assert out.token_boxes[0, 20].tolist() == [0.5, 0.0, 0.625, 0.125]  # crop cell (0, 0) in [0.5, 0, 1, 0.5]
    assert out.token_boxes[0, 25].tolist() == [0.625, 0.125, 0.75, 0.25]  # crop cell (1, 1)
    assert out.token_boxes[1, 36 + 15].tolist() == [0.75, 0.875, 1.0, 1.0]  # last cell of [0, .5, 1, 1]
    assert out.token_boxes[1, 17].tolist() == [0.5, 0.0, 1.0, 0.5]  # level tokens keep their boxes
    # each crop's tokens are the crop's own fused grid, as if it were an image of its own
    alone = toy(batch.roi_pixel_values, return_dict=True).merged_tokens[:, :16]
    torch.testing.assert_close(out.tokens[0, 20:36], alone[0])
    torch.testing.assert_close(out.tokens[1, 36:52], alone[3])
    # the ROI tokens inside a box: crop 0 of image 0 lies within [0.5, 0, 1, 0.5]
    inside = out.tokens_in([0.5, 0.0, 1.0, 0.5], min_overlap=1.0)[0]
    assert set(range(20, 36)) <= set(inside.tolist()) and not set(range(36, 52)) & set(inside.tolist())


def test_roi_batching_rules(toy):
    px = torch.rand(2, 3, 16, 16)
    crops = torch.rand(4, 3, 8, 8)  # another size than the images: encoded in a second batch
    boxes = torch.tensor([[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]])
    alone = toy(crops, return_dict=True).hidden_states[-2][:, :16]
    out = toy(px, roi_pixel_values=crops, roi_boxes=boxes, roi_image_index=torch.tensor([1, 0, 1, 0]),
              return_dict=True)
    # image 0 gets rows 1, 3 and image 1 rows 0, 2, each in their order
    torch.testing.assert_close(out.hidden_states[-2][0, 20:], torch.cat([alone[1], alone[3]]))
    torch.testing.assert_close(out.hidden_states[-2][1, 20:], torch.cat([alone[0], alone[2]]))
    torch.testing.assert_close(out.token_boxes[0, 20], torch.tensor([0.5, 0.0, 0.625, 0.125]))
    grouped = toy(px, roi_pixel_values=crops, roi_boxes=boxes, return_dict=True)  # no index: 2 per image, in order
    torch.testing.assert_close(grouped.hidden_states[-2][1, 20:], torch.cat([alone[2], alone[3]]))
    with pytest.raises(ValueError, match="roi_image_index.*\\[3, 1\\] crops.*same number"):
        toy(px, roi_pixel_values=crops, roi_boxes=boxes, roi_image_index=torch.tensor([0, 0, 0, 1]))
    with pytest.raises(ValueError, match="roi_image_index: missing"):
        toy(px, roi_pixel_values=crops[:3], roi_boxes=boxes[:3])
    with pytest.raises(ValueError, match="roi_boxes: required"):
        toy(px, roi_pixel_values=crops)
    with pytest.raises(ValueError, match="roi_pixel_values: missing"):
        toy(px, roi_boxes=boxes)
    with pytest.raises(ValueError, match=r"roi_boxes: expected \[R, 4\] = \[4, 4\]"):
        toy(px, roi_pixel_values=crops, roi_boxes=boxes[:2])
    with pytest.raises(ValueError, match="roi_image_index: values"):
        toy(px, roi_pixel_values=crops, roi_boxes=boxes, roi_image_index=torch.tensor([0, 1, 2, 1]))


def test_whole_image_roi_equals_global_tokens_tiny():
    tower = build_tower("tiny", ["fusion.levels=[2]", "fusion.pos_embed=sincos"], weights="random")
    imgs = [_image(50, 70, 3), _image(64, 40, 4)]  # pad mode: both padded to squares
    batch = tower.image_processor(imgs, rois=[[0, 0, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        out = tower(**batch, return_dict=True)
    g = tower.merge.grid_tokens
    assert out.segments[-1] == ("roi0", 20, 20 + g)
    torch.testing.assert_close(out.tokens[:, 20:], out.tokens[:, :g], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.token_boxes[:, 20:], out.token_boxes[:, :g])
    # a smaller box gives other tokens
    batch = tower.image_processor(imgs, rois=[[0.2, 0.1, 0.9, 0.7]] * 2)
    with torch.no_grad():
        other = tower(**batch, return_dict=True)
    assert (other.tokens[:, 20:] - other.tokens[:, :g]).abs().max() > 1e-2
