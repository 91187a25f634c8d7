"""``fusion-tower show`` and the PCA colouring behind it.

The PCA tests are hand-checkable: features that vary along one grid direction only
must give a colour that changes monotonically along it (exactly ``j / (w - 1)`` in the
first channel) and not at all across it. The picture tests check that the file is a
valid PNG with the documented layout, and that its panels hold exactly the PCA colours
of the tower's own encoder grids and fused tokens.
"""
from pathlib import Path

import pytest
import torch
from PIL import Image

import fusion
from fusion import show
from fusion.cli import main
from fusion.pca import pca_rgb

HOUSE = Path(__file__).resolve().parents[1] / "examples" / "images" / "house.jpg"
P = 64  # panel size used in the tests


# ----------------------------------------------------------------------------- PCA


def test_pca_of_a_grid_varying_along_x_is_a_ramp_along_x():
    h, w, c = 5, 7, 6
    v = torch.ones(c) / c**0.5
    j = torch.arange(w, dtype=torch.float32)
    feats = (j[None, :, None] * v + 3.0).expand(h, w, c)  # [h, w, C]: changes with the column only
    rgb = pca_rgb(feats.reshape(h * w, c)).reshape(h, w, 3)
    torch.testing.assert_close(rgb[..., 0], (j / (w - 1)).expand(h, w), atol=1e-6, rtol=0)
    assert torch.all(rgb[..., 1:] == 0.5)  # no second or third direction: flat grey
    assert torch.all(rgb[:, 1:, 0] > rgb[:, :-1, 0])  # strictly increasing along x
    assert torch.all(rgb[1:] == rgb[:1])  # identical along y


def test_pca_orders_directions_by_variance():
    h, w = 6, 5
    e0, e1 = torch.eye(4)[0], torch.eye(4)[2]
    i = torch.arange(h, dtype=torch.float64)[:, None, None]
    j = torch.arange(w, dtype=torch.float64)[None, :, None]
    feats = (10 * i * e0 + j * e1).reshape(h * w, 4)  # rows vary 10x more than columns
    rgb = pca_rgb(feats).reshape(h, w, 3)
    i, j = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    torch.testing.assert_close(rgb[..., 0], (i[:, None] / (h - 1)).expand(h, w), atol=1e-6, rtol=0)  # red: y
    torch.testing.assert_close(rgb[..., 1], (j[None, :] / (w - 1)).expand(h, w), atol=1e-6, rtol=0)  # green: x
    assert torch.all(rgb[..., 2] == 0.5)
    assert rgb.min() >= 0 and rgb.max() <= 1


def test_pca_is_deterministic_and_handles_degenerate_input():
    x = torch.randn(30, 8)
    torch.testing.assert_close(pca_rgb(x), pca_rgb(x.clone()), atol=0, rtol=0)
    assert torch.all(pca_rgb(torch.ones(5, 3)) == 0.5)  # constant features: flat grey
    assert torch.all(pca_rgb(torch.randn(1, 3)) == 0.5)  # one token
    for bad, exc in ((torch.zeros(0, 3), ValueError), (torch.zeros(3), ValueError),
                     (torch.tensor([[float("nan"), 0.0]] * 2), ValueError), ([[1.0]], TypeError)):
        with pytest.raises(exc, match="features"):
            pca_rgb(bad)


def test_grid_and_box_painting():
    colours = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]], [[0, 0, 1.0], [1.0, 1.0, 1.0]]])  # [2, 2, 3]
    img = show.grid_image(colours, 64)
    assert img.size == (64, 64)
    assert img.getpixel((10, 10)) == (255, 0, 0) and img.getpixel((50, 10)) == (0, 255, 0)
    assert img.getpixel((10, 50)) == (0, 0, 255) and img.getpixel((50, 50)) == (255, 255, 255)
    boxes = fusion.boxes.grid_boxes(2, 2)
    painted = show.boxes_image(colours.reshape(4, 3), boxes, 64)
    assert list(painted.getdata()) == list(img.getdata())  # a grid painted box by box is the same picture


# ----------------------------------------------------------------------------- the command


def panel_pixel(picture: Image.Image, row: int, col: int, x: float, y: float, heading: bool = True):
    """The pixel at normalised ``(x, y)`` of panel ``(row, col)`` (layout of fusion.show.compose)."""
    head = show.TITLE + show.MARGIN // 2 if heading else 0
    left = show.MARGIN + col * (P + show.MARGIN)
    top = show.MARGIN + head + row * (show.TITLE + P + show.MARGIN) + show.TITLE
    return picture.getpixel((left + int(x * P), top + int(y * P)))


def block_colours(colours: torch.Tensor):
    """``[h, w, 3]`` in [0, 1] -> the 8-bit colours the picture must show."""
    return (colours.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    out = tmp_path_factory.mktemp("show") / "picture.png"
    code = main(["show", "tiny", str(HOUSE), "--out", str(out), "--weights", "random",
                 "--rois", "[0.10, 0.30, 0.50, 0.75]", "--panel-size", str(P)])
    assert code == 0
    return out


def test_show_writes_a_png_with_the_documented_layout(picture):
    with Image.open(picture) as im:
        im.verify()
    with Image.open(picture) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        cols, rows = 1 + 4 + 1, 2  # image, 4 encoders, fused; then the ROI crop and its tokens
        head = show.TITLE + show.MARGIN // 2
        assert im.size == (show.MARGIN + cols * (P + show.MARGIN),
                           show.MARGIN + head + rows * (show.TITLE + P + show.MARGIN))
    assert [p.name for p in picture.parent.iterdir()] == ["picture.png"]  # no temporary file left


def test_show_panels_hold_the_pca_colours_of_the_tower(picture):
    tower = fusion.build_tower("tiny", weights="random").eval()
    with Image.open(HOUSE) as im:
        batch = tower.image_processor(im.convert("RGB"), rois=[["[0.10, 0.30, 0.50, 0.75]"]])
    with torch.no_grad():
        out = tower(**batch, return_dict=True)
    with Image.open(picture) as pic:
        pic = pic.convert("RGB")
        for col, (name, grid) in enumerate(out.encoder_grids.items(), start=1):
            h, w, c = grid.shape[1:]
            expected = block_colours(pca_rgb(grid[0].reshape(h * w, c)).reshape(h, w, 3))
            for i in range(h):
                for j in range(w):
                    got = panel_pixel(pic, 0, col, (j + 0.5) / w, (i + 0.5) / h)
                    assert got == tuple(expected[i, j].tolist()), (name, i, j)
        colours = block_colours(pca_rgb(out.hidden_states[-2][0]))  # one PCA: fused + ROI tokens
        g = tower.config.fusion.grid
        for k in range(g * g):  # the fused grid, token k at row k // g, column k % g
            i, j = divmod(k, g)
            assert panel_pixel(pic, 0, 5, (j + 0.5) / g, (i + 0.5) / g) == tuple(colours[k].tolist())
        start = next(s for label, s, _ in out.segments if label == "roi0")
        for k in range(g * g):  # the ROI's tokens, in the ROI's own frame
            i, j = divmod(k, g)
            assert panel_pixel(pic, 1, 1, (j + 0.5) / g, (i + 0.5) / g) == tuple(colours[start + k].tolist())


def test_show_reports_bad_arguments(tmp_path, capsys):
    base = ["show", "tiny", str(HOUSE), "--weights", "random"]
    assert main(base + ["--out", str(tmp_path / "p.jpg")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "p.png"), "--rois", "[0.5, 0.1, 0.2, 0.9]"]) == 2
    err = capsys.readouterr().err
    assert "--rois[0]" in err and "flipped" in err
    assert main(["show", "tiny", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "p.png")]) == 2
    assert "missing.jpg" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_overrides_after_rois_are_overrides_not_boxes(tmp_path):
    """`--rois` takes the words after it; a key=value among them is a config override."""
    out = tmp_path / "p.png"
    code = main(["show", "tiny", str(HOUSE), "--out", str(out), "--weights", "random", "--panel-size", str(P),
                 "--rois", "[0.10, 0.30, 0.50, 0.75]", "encoders.sam=null"])
    assert code == 0
    with Image.open(out) as im:
        cols = 1 + 3 + 1  # image, the 3 encoders left after dropping SAM, fused
        assert im.size[0] == show.MARGIN + cols * (P + show.MARGIN)
