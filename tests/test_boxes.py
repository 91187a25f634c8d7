"""Box text (parse_box / text_to_boxes / boxes_to_text), box mapping and the tokens_in rule, by hand."""
import pytest
import torch

import fusion
from fusion.boxes import map_into, tokens_in, union_boxes


def test_parse_box_forms():
    assert fusion.parse_box("[0.12, 0.305, 0.5, 0.9]") == (0.12, 0.305, 0.5, 0.9)
    assert fusion.parse_box("  [0,0,1,1]\n") == (0.0, 0.0, 1.0, 1.0)
    assert fusion.parse_box("(0.1, 0.2, 0.3, 0.4)") == (0.1, 0.2, 0.3, 0.4)
    assert fusion.parse_box("0.1, .2, 0.3, 4e-1") == (0.1, 0.2, 0.3, 0.4)


@pytest.mark.parametrize("text, fragment", [
    ("[0.1, 0.2, 0.3]", "cannot parse"),
    ("[0.1, 0.2, 0.3, 0.4, 0.5]", "cannot parse"),
    ("[0.1; 0.2; 0.3; 0.4]", "cannot parse"),
    ("box: [0.1, 0.2, 0.3, 0.4]", "text_to_boxes"),
    ("[a, 0.2, 0.3, 0.4]", "cannot parse"),
    ("", "cannot parse"),
    ("[0.1, 0.2, 1.3, 0.4]", "outside the image"),
    ("[-0.1, 0.2, 0.3, 0.4]", "outside the image"),
    ("[120, 200, 500, 900]", "0-1000 or pixel"),
    ("[0.5, 0.2, 0.5, 0.4]", "empty"),
    ("[0.6, 0.2, 0.5, 0.4]", "flipped"),
    ("[0.1, 0.4, 0.5, 0.2]", "flipped"),
])
def test_parse_box_errors(text, fragment):
    with pytest.raises(ValueError, match="text") as err:
        fusion.parse_box(text)
    assert fragment in str(err.value), str(err.value)


def test_parse_box_type_error():
    with pytest.raises(TypeError, match="box text"):
        fusion.parse_box([0.1, 0.2, 0.3, 0.4])


def test_text_to_boxes_and_back():
    answer = "The cat is at [0.12, 0.31, 0.50, 0.90] and the dog at [0.6,0.1,0.95,0.4]; (0.1, 0.1) is no box."
    boxes = fusion.text_to_boxes(answer)
    assert boxes == [(0.12, 0.31, 0.5, 0.9), (0.6, 0.1, 0.95, 0.4)]
    assert fusion.boxes_to_text(boxes) == "[0.12, 0.31, 0.50, 0.90], [0.60, 0.10, 0.95, 0.40]"
    assert fusion.text_to_boxes("no boxes here") == []
    with pytest.raises(ValueError, match="text box 1.*outside"):
        fusion.text_to_boxes("[0.1, 0.1, 0.2, 0.2] [0.1, 0.1, 2.0, 0.2]")


def test_boxes_to_text_forms_and_rounding():
    assert fusion.boxes_to_text([0.123, 0.305, 0.5, 0.9]) == "[0.12, 0.30, 0.50, 0.90]"  # 0.305 is 0.30499999...
    assert fusion.boxes_to_text(torch.tensor([0.125, 0.0, 1.0, 0.5], dtype=torch.float64), decimals=3) == \
        "[0.125, 0.000, 1.000, 0.500]"
    two = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 0.75, 1.0]])
    assert fusion.boxes_to_text(two) == "[0.00, 0.00, 0.50, 0.50], [0.25, 0.50, 0.75, 1.00]"
    assert fusion.boxes_to_text("[0.1,0.2,0.3,0.4]") == "[0.10, 0.20, 0.30, 0.40]"
    with pytest.raises(ValueError, match="decimals"):
        fusion.boxes_to_text([0.1, 0.2, 0.3, 0.4], decimals=1)
    with pytest.raises(ValueError, match="written with 2 decimals"):  # collapses to [0.10, .., 0.10, ..]
        fusion.boxes_to_text([0.101, 0.2, 0.104, 0.4])
    with pytest.raises(ValueError, match="outside the image"):
        fusion.boxes_to_text([0.1, 0.2, 1.3, 0.4])


def test_round_trip_random_boxes():
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(50, 2, generator=g, dtype=torch.float64) * 0.5
    boxes = torch.cat([lo, lo + 0.05 + torch.rand(50, 2, generator=g, dtype=torch.float64) * 0.45], 1)
    for decimals in (2, 3, 4):
        back = torch.tensor(fusion.text_to_boxes(fusion.boxes_to_text(boxes, decimals)), dtype=torch.float64)
        assert back.shape == (50, 4)
        assert (back - boxes).abs().max() <= 0.5 * 10 ** -decimals + 1e-12
        # text -> boxes -> text is exact
        text = fusion.boxes_to_text(back, decimals)
        assert fusion.boxes_to_text(fusion.text_to_boxes(text), decimals) == text


def test_map_into_by_hand():
    inner = torch.tensor([[0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 1.0, 1.0]])
    crop = torch.tensor([0.2, 0.4, 0.6, 1.0])  # 0.4 wide, 0.6 tall
    expected = torch.tensor([[0.2, 0.4, 0.3, 0.55], [0.4, 0.7, 0.6, 1.0]])
    torch.testing.assert_close(map_into(inner, crop), expected)
    assert map_into(inner, torch.stack([crop, crop]).unsqueeze(0)).shape == (1, 2, 2, 4)  # [B, r] crops


def test_union_boxes_by_hand():
    boxes = torch.tensor([[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]])
    assignment = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]])  # image 0: {1}, {0, 2, 3}; image 1: {0, 1, 3}, {2}
    out = union_boxes(boxes, assignment, 2)
    expected = torch.tensor([[[.5, 0, 1, .5], [0, 0, 1, 1]], [[0, 0, 1, 1], [0, .5, .5, 1]]])
    torch.testing.assert_close(out, expected)


def test_tokens_in_rule():
    boxes = fusion.boxes.grid_boxes(4, 4)  # cells of 0.25
    # a box touching cells 0, 1 only along edges and overlapping 5, 6, 9, 10
    box = [0.25, 0.25, 0.75, 0.75]
    assert tokens_in(boxes, box).tolist() == [5, 6, 9, 10]
    # overlapping a quarter of cells 0, 1, 4, 5 (IoA 0.25 each, cell 5 fully inside)
    box = [0.125, 0.125, 0.5, 0.5]
    assert tokens_in(boxes, box).tolist() == [0, 1, 4, 5]
    assert tokens_in(boxes, box, min_overlap=0.5).tolist() == [1, 4, 5]  # cells 1, 4: IoA 0.5
    assert tokens_in(boxes, box, min_overlap=1.0).tolist() == [5]
    assert tokens_in(boxes, "[0.9, 0.9, 1.0, 1.0]").tolist() == [15]
    per_image = torch.stack([boxes, boxes.flip(0)])
    got = tokens_in(per_image, [0, 0, 0.25, 0.25])
    assert [g.tolist() for g in got] == [[0], [15]]
    with pytest.raises(ValueError, match="min_overlap"):
        tokens_in(boxes, box, min_overlap=1.5)
    with pytest.raises(ValueError, match="box.*outside"):
        tokens_in(boxes, [0, 0, 2, 1])
