"""fusion.pos_embed: sincos, checked by hand (math.sin / math.cos) on tiny cases."""
import math

import pytest
import torch
from test_multiscale import toy_config  # registers the patch-mean toy encoder

from fusion import build_tower
from fusion.posembed import sincos_2d


def _by_hand(cx, cy, dim, grid):
    q = dim // 4
    w = [10000 ** (-k / q) for k in range(q)]
    px, py = cx * grid, cy * grid
    return ([math.sin(px * f) for f in w] + [math.cos(px * f) for f in w]
            + [math.sin(py * f) for f in w] + [math.cos(py * f) for f in w] + [0.0] * (dim - 4 * q))


def test_sincos_values_by_hand():
    # width 8: q = 2 frequencies, 1 and 1/100; a 2-grid token (row 1, col 0) has centre (0.25, 0.75) -> (0.5, 1.5)
    emb = sincos_2d(torch.tensor([[0.0, 0.5, 0.5, 1.0]]), 8, grid=2)[0]
    expected = [math.sin(0.5), math.sin(0.005), math.cos(0.5), math.cos(0.005),
                math.sin(1.5), math.sin(0.015), math.cos(1.5), math.cos(0.015)]
    torch.testing.assert_close(emb, torch.tensor(expected))
    # width 7: one frequency per block, 3 zero channels
    emb = sincos_2d(torch.tensor([0.2, 0.2, 0.6, 1.0]), 7, grid=4)
    expected = [math.sin(1.6), math.cos(1.6), math.sin(2.4), math.cos(2.4), 0, 0, 0.0]  # centre (0.4, 0.6) x 4
    torch.testing.assert_close(emb, torch.tensor(expected))
    with pytest.raises(ValueError, match="fusion.pos_embed"):
        sincos_2d(torch.zeros(1, 4), 3, grid=2)


def test_tower_adds_embedding_of_every_token_box():
    encoders = {n: {"type": "toy_patchmean", "model": "toy", "image_size": 8, "arch": {"patch": 2}} for n in "ab"}
    kw = dict(encoders=encoders, fusion={"levels": [1]})
    plain = build_tower(toy_config(**kw), weights="random")
    kw["fusion"] = {"levels": [1], "pos_embed": "sincos"}
    embedded = build_tower(toy_config(**kw), weights="random")
    px = torch.rand(1, 3, 8, 8)
    diff = embedded(px) - plain(px)  # [1, 17, 6]: width 6 -> q = 1, two zero channels
    assert diff.shape == (1, 17, 6)
    for t, (cx, cy) in [(0, (0.125, 0.125)), (6, (0.625, 0.375)), (16, (0.5, 0.5))]:  # cell (1, 2); level 1
        torch.testing.assert_close(diff[0, t], torch.tensor(_by_hand(cx, cy, 6, 4)), atol=1e-6, rtol=0)


def test_width_too_small_is_an_error():
    with pytest.raises(ValueError, match="fusion.pos_embed.*at least 4"):
        build_tower(toy_config(fusion={"pos_embed": "sincos"}), weights="random")  # width 3
    with pytest.raises(ValueError, match="fusion.pos_embed"):
        build_tower(toy_config(fusion={"pos_embed": "learned"}), weights="random")
