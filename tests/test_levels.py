"""fusion.levels: coarser levels of the fused grid appended to the sequence, values and boxes by hand."""
import pytest
import torch

from fusion.config import FusionConfig, load_config
from fusion.levels import pooled_boxes
from fusion.merge import FusionMerge, GridSpec
from fusion.sequence import TokenSequence


def _merge(specs, **kw):
    return FusionMerge([GridSpec(n, g, c) for n, g, c in specs], FusionConfig(norm="none", **kw))


def _steps(m):
    """The granularity steps after merge ``m`` (as the tower composes them)."""
    return TokenSequence(m.cfg, [s.name for s in m.specs])


def _sequence(m, grids):
    return _steps(m)(m(grids), grids)


def test_pooled_boxes_by_hand():
    q = [[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]]
    torch.testing.assert_close(pooled_boxes(4, 2), torch.tensor(q))
    # 4 -> 3 shares the boundary cells: rows/cols [0,2), [1,3), [2,4) of the 4-grid
    edges = [(0, .5), (.25, .75), (.5, 1)]
    expected = [[x0, y0, x1, y1] for (y0, y1) in edges for (x0, x1) in edges]
    torch.testing.assert_close(pooled_boxes(4, 3), torch.tensor(expected))
    torch.testing.assert_close(pooled_boxes(6, 1), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def test_channel_levels_values_boxes_segments():
    x = torch.arange(16.0).reshape(1, 4, 4, 1)  # one channel, value = row * 4 + col
    m = _merge([("a", (4, 4), 1)], grid=4, levels=[4, 2, 1])  # a leading 4 names the fused grid itself
    out = _sequence(m, {"a": x})
    assert _steps(m).num_tokens == 16 + 4 + 1
    assert out.tokens.shape == (1, 21, 1)
    assert out.tokens[0, :16, 0].tolist() == list(range(16))
    # level 2: means of the 2x2 quarters {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}; level 1: mean of all
    assert out.tokens[0, 16:, 0].tolist() == [2.5, 4.5, 10.5, 12.5, 7.5]
    assert out.segments == [("fused", 0, 16), ("level2", 16, 20), ("level1", 20, 21)] == _steps(m).segments()
    assert out.boxes.shape == (21, 4)
    assert out.boxes[16].tolist() == [0, 0, .5, .5] and out.boxes[19].tolist() == [.5, .5, 1, 1]
    assert out.boxes[20].tolist() == [0, 0, 1, 1]
    assert out.boxes[5].tolist() == [.25, .25, .5, .5]
    torch.testing.assert_close(_steps(m).token_boxes(), out.boxes)
    assert out.sizes is None


def test_non_dividing_level_averages_shared_cells():
    x = torch.arange(16.0).reshape(1, 4, 4, 1)
    out = _sequence(_merge([("a", (4, 4), 1)], grid=4, levels=[3]), {"a": x})
    # level-3 token (1, 1) averages rows 1-2, cols 1-2 of the 4-grid: {5, 6, 9, 10}
    assert out.tokens[0, 16 + 4, 0].item() == 7.5
    assert out.boxes[16 + 4].tolist() == [.25, .25, .75, .75]


def test_sequence_layout_levels_per_encoder():
    a, b = torch.full((1, 2, 2, 3), 1.0), torch.arange(16.0).reshape(1, 4, 4, 1).expand(1, 4, 4, 3)
    m = _merge([("a", (2, 2), 3), ("b", (4, 4), 3)], grid=2, combine="sequence_concat", levels=[1])
    out = _sequence(m, {"a": a, "b": b.contiguous()})
    assert out.segments == [("a", 0, 4), ("b", 4, 8), ("a/level1", 8, 9), ("b/level1", 9, 10)]
    assert out.tokens[0, 8].tolist() == [1.0] * 3
    assert out.tokens[0, 9].tolist() == [7.5] * 3
    assert out.boxes[8:].tolist() == [[0, 0, 1, 1]] * 2


def test_levels_through_the_tower_and_gradients():
    from test_multiscale import toy_config  # the patch-mean toy encoder

    from fusion import build_tower

    toy = {"a": {"type": "toy_patchmean", "model": "toy", "image_size": 8, "arch": {"patch": 2}, "freeze": False}}
    tower = build_tower(toy_config(encoders=toy, fusion={"grid": 4, "norm": "layernorm", "levels": [2, 1]},
                                   projector={"type": "linear", "out_dim": 5}), weights="random")
    px = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = tower(px, return_dict=True)
    assert tower.num_patches == 21 and out.tokens.shape == (2, 21, 5)
    fused = out.merged_tokens
    # levels are pooled before the projector, which stays per token
    torch.testing.assert_close(out.tokens, tower.projector(fused))
    torch.testing.assert_close(fused[:, 16:20], torch.nn.functional.avg_pool2d(
        fused[:, :16].reshape(2, 4, 4, 3).permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2))
    out.tokens[:, 16:].sum().backward()  # the level tokens alone reach the pixels
    assert px.grad is not None and px.grad.abs().sum() > 0


@pytest.mark.parametrize("levels, fragment", [
    ([5], "must be < fusion.grid=4"),
    ([2, 4], "only the first may equal it"),
    ([2, 2], "strictly decreasing"),
    ([1, 2], "strictly decreasing"),
    ([0], ">= 1"),
    ("2", "list of integers"),
])
def test_level_errors_name_the_key(levels, fragment):
    with pytest.raises(ValueError, match="fusion.levels") as err:
        load_config("tiny", {"fusion.levels": levels})
    assert fragment in str(err.value)
