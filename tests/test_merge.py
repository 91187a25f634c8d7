"""FusionMerge and the projectors, checked against hand-computed values."""
import pytest
import torch
import torch.nn.functional as F

from fusion.boxes import grid_boxes
from fusion.config import FusionConfig, ProjectorConfig
from fusion.merge import FusionMerge, GridSpec
from fusion.projector import build_projector, projector_out_dim
from fusion.sequence import TokenSequence


def _merge(specs, **kw):
    return FusionMerge([GridSpec(n, g, c) for n, g, c in specs], FusionConfig(**kw))


def test_area_and_bilinear_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)
    for mode in ("area", "bilinear"):
        m = _merge([("a", (2, 2), 1)], grid=1, resample=mode, norm="none")
        assert m({"a": x}).flatten().tolist() == [2.5]
    # 2 -> 4 bilinear, align_corners=False: row [1, 2] becomes [1, 1.25, 1.75, 2]
    row = torch.tensor([1.0, 2.0]).reshape(1, 1, 2, 1).expand(1, 4, 2, 1)
    m = _merge([("a", (4, 2), 1)], grid=4, resample="bilinear", norm="none")
    out = m({"a": row.contiguous()}).reshape(4, 4)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 1.25, 1.75, 2.0]))


def test_channel_concat_layernorm_by_hand():
    a = torch.tensor([[0.0, 2.0]]).reshape(1, 1, 1, 2)  # one token, channels [0, 2] -> [-1, 1]
    b = torch.tensor([5.0, 5.0, 5.0, 9.0]).reshape(1, 1, 1, 4)  # mean 6, var 3 -> [-1,-1,-1,3]/sqrt(3)
    m = _merge([("a", (1, 1), 2), ("b", (1, 1), 4)], grid=1, norm="layernorm", eps=1e-12)
    out = m({"a": a, "b": b})
    s = 3 ** 0.5
    expected = torch.tensor([[[-1.0, 1.0, -1 / s, -1 / s, -1 / s, 3 / s]]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    steps = TokenSequence(m.cfg, ["a", "b"])
    assert m.out_dim == 6 and steps.num_tokens == 1 and steps.segments() == [("fused", 0, 1)]


def test_channel_concat_equals_pool_norm_cat():
    g1, g2 = torch.randn(2, 27, 27, 5), torch.randn(2, 7, 7, 3)
    m = _merge([("s", (27, 27), 5), ("d", (7, 7), 3)], grid=12)
    with torch.no_grad():
        for ln in m.norms.values():
            ln.weight.normal_(), ln.bias.normal_()
    ref = []
    for name, g in (("s", g1), ("d", g2)):
        pooled = F.adaptive_avg_pool2d(g.permute(0, 3, 1, 2), 12).permute(0, 2, 3, 1).reshape(2, 144, -1)
        ref.append(F.layer_norm(pooled, (g.shape[-1],), m.norms[name].weight, m.norms[name].bias, 1e-5))
    torch.testing.assert_close(m({"s": g1, "d": g2}), torch.cat(ref, -1), atol=1e-5, rtol=1e-5)


def test_sequence_concat_order_boxes_and_width():
    a, b = torch.full((1, 2, 2, 3), 1.0), torch.full((1, 4, 4, 3), 2.0)
    m = _merge([("a", (2, 2), 3), ("b", (4, 4), 3)], grid=2, norm="none", combine="sequence_concat")
    out = m({"a": a, "b": b})
    assert out.shape == (1, 8, 3)
    assert out[0, :4].eq(1).all() and out[0, 4:].eq(2).all()
    steps = TokenSequence(m.cfg, ["a", "b"])
    assert steps.segments() == [("a", 0, 4), ("b", 4, 8)]
    assert steps.token_boxes().shape == (8, 4) and steps.grid_tokens == m.grid_tokens == 8
    with pytest.raises(ValueError, match="fusion.combine.*widths.*fusion.width"):
        _merge([("a", (2, 2), 3), ("b", (2, 2), 5)], grid=2, combine="sequence_concat")
    m = _merge([("a", (2, 2), 3), ("b", (2, 2), 5)], grid=2, combine="sequence_concat", width=4)
    assert m({"a": torch.randn(1, 2, 2, 3), "b": torch.randn(1, 2, 2, 5)}).shape == (1, 8, 4)


def test_grid_boxes_by_hand():
    expected = torch.tensor([[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]])
    torch.testing.assert_close(grid_boxes(2, 2), expected)
    assert grid_boxes(3, 2)[5].tolist() == pytest.approx([0.5, 2 / 3, 1.0, 1.0])


def test_projectors():
    x = torch.randn(2, 3, 8)
    assert build_projector(ProjectorConfig("none", None), 8)(x) is x
    lin = build_projector(ProjectorConfig("linear", 5), 8)
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)
    mlp = build_projector(ProjectorConfig("mlp2x_gelu", 4), 8)
    ref = F.linear(F.gelu(F.linear(x, mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)
    torch.testing.assert_close(mlp(x), ref)
    assert projector_out_dim(ProjectorConfig("none", None), 8) == 8
    with pytest.raises(ValueError, match="projector.out_dim"):
        build_projector(ProjectorConfig("none", 7), 8)


def test_old_merge_sequence_warns_and_equals_the_tower():
    from fusion import build_tower

    tower = build_tower("tiny", ["fusion.levels=[2]", "fusion.pos_embed=sincos"], weights="random")
    grids = tower.encode(torch.rand(2, 3, 64, 64))
    with pytest.warns(DeprecationWarning, match="tower.fuse"):
        old = tower.merge.sequence(grids)
    new = tower.fuse(grids)
    assert torch.equal(old.tokens, new.tokens) and old.segments == new.segments == tower.sequence.segments()
    assert torch.equal(tower.projector(new.tokens), tower.merge_and_project(grids))
