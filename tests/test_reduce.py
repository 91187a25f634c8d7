"""fusion.reduce: ToMe bipartite reduction in the tower, against an independent ToMe written from the paper."""
import pytest
import torch
import torch.nn.functional as F
from test_multiscale import toy_config  # registers the patch-mean toy encoder

from fusion import build_tower
from fusion.boxes import grid_boxes
from fusion.config import load_config


def tome_members(metric, keep):
    """ToMe (Bolya et al. 2023) on one image, written from the paper: which input tokens end up in
    each output token, in ToMe's output order. Metric of a merged token = mean of its members' rows
    (size-weighted averaging with unit input sizes)."""
    members = [[i] for i in range(metric.shape[0])]
    while len(members) > keep:
        n = len(members)
        r = min(n - keep, (n + 1) // 2)
        m = torch.stack([metric[g].double().mean(0) for g in members])
        m = m / m.norm(dim=-1, keepdim=True)
        a, b = list(range(0, n, 2)), list(range(1, n, 2))
        scores = m[a] @ m[b].T  # [N_A, N_B]
        best, partner = scores.max(-1)
        rank = sorted(range(len(a)), key=lambda i: -best[i].item())  # inputs without ties
        new_b = [list(members[j]) for j in b]
        for i in rank[:r]:
            new_b[partner[i]] += members[a[i]]
        members = [members[a[i]] for i in rank[r:]] + new_b
    return members


def _check_against_tome(out, fused, metric, keep):
    boxes = grid_boxes(4, 4)
    for img in range(fused.shape[0]):
        members = tome_members(metric[img], keep)
        expect_tokens = torch.stack([fused[img, g].double().mean(0) for g in members]).float()
        torch.testing.assert_close(out.merged_tokens[img, :keep], expect_tokens, atol=1e-5, rtol=1e-5)
        assert out.token_sizes[img, :keep].tolist() == [len(g) for g in members]
        expect_boxes = torch.stack([torch.cat([boxes[g, :2].min(0).values, boxes[g, 2:].max(0).values])
                                    for g in members])
        torch.testing.assert_close(out.token_boxes[img, :keep], expect_boxes)


def test_fused_metric_matches_tome():
    tower = build_tower(toy_config(fusion={"reduce": {"method": "bipartite", "keep": 5, "metric": "fused"}}),
                        weights="random")
    px = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    out = tower(px, return_dict=True)
    assert tower.num_patches == 5 and out.tokens.shape == (2, 5, 3)
    assert out.segments == [("fused", 0, 5)]
    assert out.token_boxes.shape == (2, 5, 4) and out.token_sizes.sum(1).tolist() == [16.0, 16.0]
    fused = F.avg_pool2d(px, 2).permute(0, 2, 3, 1).reshape(2, 16, 3)  # the toy encoder, by hand
    _check_against_tome(out, fused, fused, 5)
    # every token's box is the union of its cells: tokens_in finds the merged token covering a cell
    hits = out.tokens_in([0.0, 0.0, 0.25, 0.25], min_overlap=1.0)
    assert len(hits) == 2 and all(len(h) == 0 for h in hits)  # a merged token is larger than one cell...
    cover = out.tokens_in([0.0, 0.0, 0.25, 0.25])
    assert all(len(c) >= 1 for c in cover)  # ...but some token overlaps it


def test_encoder_metric_uses_that_encoders_aligned_grid():
    encoders = {"a": {"type": "toy_patchmean", "model": "toy", "image_size": 8, "arch": {"patch": 2}},
                "b": {"type": "toy_patchmean", "model": "toy", "image_size": 16, "arch": {"patch": 2}}}
    tower = build_tower(toy_config(encoders=encoders, fusion={"reduce": {"keep": 6, "metric": "b"},
                                                              "levels": [2]}), weights="random")
    px = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    out = tower(px, return_dict=True)
    grids = out.encoder_grids
    fused = tower.merge(grids)  # [2, 16, 6], unreduced
    metric = F.adaptive_avg_pool2d(grids["b"].permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1).reshape(2, 16, 3)
    _check_against_tome(out, fused, metric, 6)
    # levels come after the reduced tokens and are pooled from the full grid
    assert out.segments == [("fused", 0, 6), ("level2", 6, 10)]
    level = F.avg_pool2d(fused.reshape(2, 4, 4, 6).permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.tokens[:, 6:], level)
    assert out.token_sizes[:, 6:].eq(1).all()
    assert out.token_boxes[:, 6:].tolist() == [grid_boxes(2, 2).tolist()] * 2
    with pytest.raises(ValueError, match="fusion.reduce.*per image"):
        tower.sequence.token_boxes()


def test_keep_all_is_identity_and_gradients_flow():
    encoders = {"a": {"type": "toy_patchmean", "model": "toy", "image_size": 8, "arch": {"patch": 2},
                      "freeze": False}}
    full = build_tower(toy_config(encoders=encoders, fusion={"reduce": {"keep": 16}}), weights="random")
    px = torch.rand(1, 3, 8, 8, requires_grad=True)
    out = full(px, return_dict=True)
    torch.testing.assert_close(out.tokens, F.avg_pool2d(px, 2).permute(0, 2, 3, 1).reshape(1, 16, 3))
    torch.testing.assert_close(out.token_boxes[0], grid_boxes(4, 4))
    few = build_tower(toy_config(encoders=encoders, fusion={"reduce": {"keep": 3}}), weights="random")
    few(px).sum().backward()  # through the merge's size-weighted means to the encoder input
    assert px.grad is not None and px.grad.abs().sum() > 0


@pytest.mark.parametrize("reduce, key, fragment", [
    ({"keep": 17}, "fusion.reduce.keep", "only 16 tokens"),
    ({"keep": 0}, "fusion.reduce.keep", ">= 1"),
    ({"method": "bipartite"}, "fusion.reduce.keep", "missing"),
    ({"keep": 4, "method": "random"}, "fusion.reduce.method", "bipartite"),
    ({"keep": 4, "metric": "clipp"}, "fusion.reduce.metric", "did you mean 'clip'"),
    ({"keep": 4, "kept": 3}, "fusion.reduce.kept", "did you mean 'keep'"),
    ("yes", "fusion.reduce", "expected a mapping"),
])
def test_reduce_errors_name_the_key(reduce, key, fragment):
    with pytest.raises(ValueError) as err:
        load_config("tiny", {"fusion.reduce": reduce})
    assert str(err.value).startswith(key) and fragment in str(err.value), str(err.value)


def test_reduce_with_sequence_concat():
    with pytest.raises(ValueError, match="fusion.reduce.metric.*channel_concat"):
        load_config("tiny", {"fusion.combine": "sequence_concat", "fusion.width": 8,
                             "fusion.reduce": {"keep": 4, "metric": "clip"}})
    cfg = load_config("tiny", {"fusion.combine": "sequence_concat", "fusion.width": 8,
                               "fusion.reduce": {"keep": 64}})  # 4 encoders x 16 cells
    assert cfg.fusion.reduce.keep == 64
    with pytest.raises(ValueError, match="only 64 tokens.*x 4 encoders"):
        load_config(cfg, {"fusion.reduce.keep": 65})


def test_roi_tokens_are_not_reduced():
    tower = build_tower(toy_config(fusion={"reduce": {"keep": 4}, "pos_embed": "none"}), weights="random")
    px, crops = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    out = tower(px, roi_pixel_values=crops, roi_boxes=boxes, roi_image_index=torch.tensor([0, 1]),
                return_dict=True)
    assert out.segments == [("fused", 0, 4), ("roi0", 4, 20)]
    assert out.token_sizes.shape == (2, 20) and out.token_sizes[:, 4:].eq(1).all()
    torch.testing.assert_close(out.tokens[:, 4:], F.avg_pool2d(crops, 2).permute(0, 2, 3, 1).reshape(2, 16, 3))
    torch.testing.assert_close(out.token_boxes[1, 4], torch.tensor([0.5, 0.5, 0.625, 0.625]))
