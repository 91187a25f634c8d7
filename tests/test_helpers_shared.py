"""The shared helpers that replaced per-module copies: the "did you mean" hint and the pixel checks."""
import pytest
import torch

from fusion.encoders.base import check_pixels
from fusion.pixels import as_pixels
from fusion.suggest import did_you_mean


def test_did_you_mean_names_the_closest_choices():
    assert did_you_mean("clip2", ["clip", "sam", "dino"]) == " (did you mean 'clip'?)"
    assert did_you_mean("vit_bb", ["vit_b", "vit_l", "vit_h"], n=3) == " (did you mean 'vit_b' or 'vit_l' or 'vit_h'?)"
    assert did_you_mean("zzz", ["clip", "sam"]) == ""
    assert did_you_mean(3, ["3", "4"]) == " (did you mean '3'?)"  # non-strings are compared as text


def test_as_pixels_converts_uint8_and_names_the_argument():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(as_pixels(x, "px").flatten(), torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(TypeError, match=r"px: expected a float tensor in \[0, 1\], got dtype torch.uint8"):
        as_pixels(x, "px", uint8=False)
    with pytest.raises(ValueError, match=r"roi: expected shape \[R, 3, H, W\], got \[2, 4, 5, 5\]"):
        as_pixels(torch.zeros(2, 4, 5, 5), "roi", rows="R")
    with pytest.raises(ValueError, match="px: empty tensor"):
        as_pixels(torch.zeros(0, 3, 5, 5), "px")
    assert as_pixels(torch.zeros(0, 3, 5, 5), "px", empty_ok=True).shape == (0, 3, 5, 5)
    with pytest.raises(ValueError, match="px: contains NaN or infinite values"):
        as_pixels(torch.full((1, 3, 2, 2), float("inf")), "px")
    assert torch.isnan(as_pixels(torch.full((1, 3, 2, 2), float("nan")), "px", finite=False)).all()


def test_encoder_pixel_check_names_the_image_size_key():
    check_pixels(torch.zeros(2, 3, 8, 8), 8, "clip")
    with pytest.raises(ValueError, match=r"encoder 'clip': expected pixels \[B, 3, 8, 8\] \(encoders.clip.image_size\)"):
        check_pixels(torch.zeros(2, 3, 8, 9), 8, "clip")
    with pytest.raises(TypeError, match="encoder 'clip': expected a torch.Tensor"):
        check_pixels([[0.0]], 8, "clip")


@pytest.mark.parametrize("name, home", [("block_index", "base"), ("check_pixels", "base"), ("param_dtype", "base"),
                                        ("check_keys", "adapter"), ("create_upstream", "adapter"),
                                        ("finalize", "adapter"), ("unknown_model", "adapter")])
def test_helpers_moved_out_of_weights_still_import_with_a_warning(name, home):
    import importlib

    import fusion.encoders.weights as weights

    with pytest.warns(DeprecationWarning, match=f"moved to fusion.encoders.{home}.{name}"):
        old = getattr(weights, name)
    assert old is getattr(importlib.import_module(f"fusion.encoders.{home}"), name)
    with pytest.raises(AttributeError):
        weights.no_such_helper
