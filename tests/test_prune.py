"""Keep only what runs: the adapters drop the blocks after the selected layer, the final norms
and the pooling/projection heads (the upstream's own ``prune_intermediate_layers``).

Each adapter loads a checkpoint written from an independently built, unpruned upstream model;
what it keeps must be exactly the parameters its output depends on (the embeddings and the
blocks up to the selected one, same values), and its output must equal the unpruned
model's ``forward_intermediates`` for that block (parity with the unpruned adapter is what
tests/test_encoders.py checks block by block).
"""
import pytest
import timm
import torch
from safetensors.torch import save_file

from test_encoders import CLIP_ARCH, DINO_ARCH, SIGLIP_ARCH, build, check_close, enc_cfg, open_clip_reference

DROPPED = ("ln_post", "proj", "attn_pool", "head", "fc_norm", "norm.")


def kept_reference(named, block, blocks_prefix):
    """The names of ``named`` parameters a forward up to ``block`` reads: everything except blocks
    after it and the final norm / heads."""
    out = {}
    for name, p in named:
        if name.startswith(blocks_prefix):
            if int(name[len(blocks_prefix):].split(".")[0]) > block:
                continue
        elif name.startswith(DROPPED) or name == "proj":
            continue
        out[name] = p
    return out


def assert_block_output_equals_open_clip(enc, ref, block, side, grid):
    """The pruned encoder's output on two random ``side``-pixel images equals block ``block`` of the
    whole open_clip model ``ref`` (``forward_intermediates``), laid out ``[2, *grid, C]``."""
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        want = ref.visual.forward_intermediates(x, indices=[block], intermediates_only=True,
                                                output_fmt="NLC")["image_intermediates"][0]
        check_close(enc(x), want.reshape(2, *grid, -1))


def assert_keeps_exactly(enc, reference, prefix=""):
    ours = dict(enc.model.state_dict())
    want = {prefix + k: v for k, v in reference.items()}
    assert sorted(ours) == sorted(want)
    for k in want:
        assert torch.equal(ours[k], want[k]), k


@pytest.mark.parametrize("layer, block", [(-2, 1), (1, 0)])
def test_clip_keeps_blocks_up_to_the_layer_and_no_head(tmp_path, layer, block):
    ref = open_clip_reference("ViT-B-16", CLIP_ARCH, 64)
    path = tmp_path / "clip.safetensors"
    save_file(ref.state_dict(), str(path))
    enc = build(enc_cfg("clip", "ViT-B-16", pretrained=str(path), image_size=64, layer=layer, arch=CLIP_ARCH))
    assert (enc.depth, enc.block, len(enc.model.transformer.resblocks)) == (3, block, block + 1)
    assert enc.model.proj is None and isinstance(enc.model.ln_post, torch.nn.Identity)
    assert_keeps_exactly(enc, kept_reference(ref.visual.state_dict().items(), block, "transformer.resblocks."))
    assert enc.num_parameters() < sum(p.numel() for p in ref.visual.parameters())
    assert not any("token_embedding" in n or "text" in n for n, _ in enc.named_parameters())  # no text tower
    assert_block_output_equals_open_clip(enc, ref, block, 64, (4, 4))


@pytest.mark.parametrize("layer, block", [(-1, 8)])
def test_siglip_trunk_loses_late_blocks_norm_and_map_head(tmp_path, layer, block):
    ref = open_clip_reference("ViT-B-16-SigLIP", SIGLIP_ARCH, 80)
    assert ref.visual.trunk.attn_pool is not None  # test_vit3 pools with a MAP head
    path = tmp_path / "siglip.safetensors"
    save_file(ref.state_dict(), str(path))
    enc = build(enc_cfg("siglip", "ViT-B-16-SigLIP", pretrained=str(path), image_size=80, layer=layer,
                        arch=SIGLIP_ARCH))
    trunk = enc.model.trunk
    assert (enc.depth, enc.block, len(trunk.blocks)) == (9, block, block + 1)
    assert trunk.attn_pool is None and len(enc.model.head) == 0
    reference = kept_reference(ref.visual.trunk.state_dict().items(), block, "blocks.")
    assert_keeps_exactly(enc, reference, prefix="trunk.")
    assert_block_output_equals_open_clip(enc, ref, block, 80, (5, 5))


@pytest.mark.parametrize("layer, block", [(-2, 1)])
def test_dinov2_keeps_blocks_up_to_the_layer_and_no_norm(tmp_path, layer, block):
    model = "vit_small_patch14_reg4_dinov2"
    ref = timm.create_model(model, img_size=56, **DINO_ARCH).eval()
    path = tmp_path / "dino.pth"
    torch.save(ref.state_dict(), path)
    enc = build(enc_cfg("dinov2", model, name="dino", pretrained=str(path), image_size=56, layer=layer,
                        arch=DINO_ARCH))
    assert (enc.depth, enc.block, len(enc.model.blocks)) == (3, block, block + 1)
    assert isinstance(enc.model.norm, torch.nn.Identity)
    assert_keeps_exactly(enc, kept_reference(ref.state_dict().items(), block, "blocks."))
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        want = ref.forward_intermediates(x, indices=[block], norm=False, intermediates_only=True,
                                         output_fmt="NLC")[0]
        check_close(enc(x), want.reshape(2, 4, 4, -1))
