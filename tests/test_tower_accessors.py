"""The tower's public accessors for what other modules used to read from its insides.

``encoder_grid_shapes()`` (was ``tower.merge.specs``), ``fuse()`` (was ``tower.merge.sequence``),
``set_weights_mode()`` (was assigning ``tower.weights``), ``EncoderInputs.refresh_stats()`` (was
``_set_stats``), and ``processor.mean_from``: which encoder the image processor reports.
"""
import pytest
import torch

from fusion import build_tower, load_config
from fusion.letterbox import mean_color


@pytest.fixture(scope="module")
def tiny():
    return build_tower("tiny", ["fusion.levels=[2]"], weights="random").eval()


def test_encoder_grid_shapes_are_what_encode_returns(tiny):
    grids = tiny.encode(torch.rand(1, 3, 64, 64))
    assert tiny.encoder_grid_shapes() == {name: tuple(g.shape[1:]) for name, g in grids.items()}
    assert list(tiny.encoder_grid_shapes()) == list(tiny.config.encoders)  # channel order


def test_fuse_is_the_forward_before_the_projector(tiny):
    px = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = tiny(px, return_dict=True)
        fused = tiny.fuse(out.encoder_grids)
    assert torch.equal(fused.tokens, out.hidden_states[-2]) and fused.segments == out.segments
    assert torch.equal(fused.boxes, out.token_boxes) and fused.segments == tiny.sequence.segments()
    assert tiny.num_patches == tiny.sequence.num_tokens == 16 + 4


def test_set_weights_mode_is_what_save_pretrained_records(tmp_path):
    tower = build_tower("tiny", weights="random")
    assert tower.weights == "random"
    tower.set_weights_mode("pretrained")
    assert tower.weights == "pretrained"
    with pytest.raises(ValueError, match="weights: got 'nope'.*pretrained"):
        tower.set_weights_mode("nope")
    with pytest.raises(AttributeError):
        tower.weights = "random"  # read-only: say it with set_weights_mode


def test_refresh_stats_rebuilds_exact_constants(tiny):
    inputs = tiny.encoder_inputs
    before = {name: b.clone() for name, b in inputs.named_buffers()}
    for b in inputs.buffers():
        b.fill_(float("nan"))  # what uninitialised memory may hold
    inputs.refresh_stats()
    after = dict(inputs.named_buffers())
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    clip = tiny.encoders["clip"]
    assert inputs.mean_0.flatten()[:3].tolist() == [torch.tensor(m, dtype=torch.float32).item() for m in clip.mean]


@pytest.mark.parametrize("overrides, source", [
    ([], "clip"),  # the first encoder
    (["processor.pad_color=sam"], "sam"),  # the encoder pad_color names
    (["processor.mean_from=siglip"], "siglip"),
    (["processor.mean_from=dino", "processor.pad_color=[1, 2, 3]"], "dino"),
])
def test_mean_from_chooses_what_the_image_processor_reports(overrides, source):
    tower = build_tower("tiny", overrides, weights="random")
    enc = tower.encoders[source]
    proc = tower.image_processor
    assert (proc.image_mean, proc.image_std) == (list(enc.mean), list(enc.std))
    named = [o.split("=", 1)[1] for o in overrides if o.startswith("processor.pad_color=")]
    expected = mean_color(enc.mean) if not named or not named[0].startswith("[") else (1, 2, 3)
    if named and not named[0].startswith("["):
        expected = mean_color(tower.encoders[named[0]].mean)
    assert tuple(proc.pad_color) == expected


def test_mean_from_must_name_an_encoder():
    with pytest.raises(ValueError, match=r"processor.mean_from: got 'sigl' \(did you mean 'siglip'\?\)"):
        load_config("tiny", ["processor.mean_from=sigl"])
    with pytest.raises(ValueError, match="processor.mean_from: got 'sam'"):
        load_config("tiny", ["encoders.sam=null", "processor.mean_from=sam"])
