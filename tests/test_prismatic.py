"""fusion.prismatic (Prism checkpoints) and the fused_gelu_mlp projector.

Checkpoints are written here in Prismatic's layout (``{"model": {"projector": ..., "llm_backbone":
..., "vision_backbone": ...}}``) from independently built modules; test_anchors.py checks the
loaded tower end to end against Prismatic's featurizer."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from fusion import build_tower
from fusion.config import ProjectorConfig
from fusion.prismatic import load_prism_checkpoint, read_prism_checkpoint
from fusion.projector import build_projector

TEXT = "{layers: 1, width: 32, heads: 2, vocab_size: 64, context_length: 8}"
SMALL = [  # a DINO-SigLIP pair on a 2x2 grid: DINO 28 px (patch 14), SigLIP's test_vit3 32 px (patch 16)
    "encoders.dino.image_size=28", "encoders.dino.arch={embed_dim: 32, depth: 2, num_heads: 2}",
    "encoders.siglip.image_size=32",
    f"encoders.siglip.arch={{embed_dim: 32, vision_cfg: {{timm_model_name: test_vit3}}, text_cfg: {TEXT}}}",
    "fusion.grid=2", "projector.out_dim=16",
]
FUSED = 32 + 96  # DINO width + test_vit3 width


def prism_mlp(layers):
    """A Prismatic projector module: its layers in a ``projector`` attribute."""
    holder = nn.Module()
    holder.projector = layers
    return holder


def fused_gelu_mlp(c, d):
    return prism_mlp(nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, d), nn.GELU(), nn.Linear(d, d)))


def save_prism(path, projector=None, vision=None, llm=True):
    model = {}
    if projector is not None:
        model["projector"] = projector.state_dict()
    if llm:
        model["llm_backbone"] = {"llm.lm_head.weight": torch.randn(4, 4)}
    if vision is not None:
        model["vision_backbone"] = {f"{f}.{k}": v for f, m in vision.items() for k, v in m.state_dict().items()}
    torch.save({"model": model}, path)
    return str(path)


@pytest.fixture
def tower():
    return build_tower("dinosiglip", SMALL, weights="random").eval()


def test_fused_gelu_mlp_is_prismatics_three_layer_mlp():
    proj = build_projector(ProjectorConfig(type="fused_gelu_mlp", out_dim=24), 10)
    shapes = [tuple(p.shape) for p in proj.parameters()]
    assert shapes == [(40, 10), (40,), (24, 40), (24,), (24, 24), (24,)]
    x = torch.randn(2, 5, 10)
    w = [proj[i] for i in (0, 2, 4)]
    ref = F.linear(F.gelu(F.linear(F.gelu(F.linear(x, w[0].weight, w[0].bias)), w[1].weight, w[1].bias)),
                   w[2].weight, w[2].bias)
    assert torch.allclose(proj(x), ref, atol=1e-6)


def test_projector_and_vision_backbone_load(tower, tmp_path):
    projector = fused_gelu_mlp(FUSED, 16)
    dino = timm.create_model("vit_large_patch14_reg4_dinov2", num_classes=0, img_size=28, embed_dim=32, depth=2,
                             num_heads=2)
    siglip = timm.create_model("test_vit3", num_classes=0, img_size=32)
    path = save_prism(tmp_path / "ckpt.pt", projector, {"dino_featurizer": dino, "siglip_featurizer": siglip})
    report = load_prism_checkpoint(tower, path)
    assert report == {"projector": "fused-gelu-mlp",
                      "encoders": {"dino": "dino_featurizer", "siglip": "siglip_featurizer"}}
    pruned = {"dino": set(tower.encoders["dino"].pruned),
              "siglip": {k[len("trunk."):] for k in tower.encoders["siglip"].pruned if k.startswith("trunk.")}}
    for ours, theirs, dropped in ((tower.projector, projector.projector, set()),
                                  (tower.encoders["dino"].model, dino, pruned["dino"]),
                                  (tower.encoders["siglip"].model.trunk, siglip, pruned["siglip"])):
        # the encoders keep only what runs: the checkpoint's other tensors are the pruned ones
        mine, ref = ours.state_dict(), theirs.state_dict()
        assert set(ref) == set(mine) | dropped and all(torch.equal(v, ref[k]) for k, v in mine.items())
    # projector only, vision backbone skipped or absent
    path2 = save_prism(tmp_path / "align.pt", fused_gelu_mlp(FUSED, 16))
    assert load_prism_checkpoint(tower, path2) == {"projector": "fused-gelu-mlp", "encoders": {}}
    assert load_prism_checkpoint(tower, path, vision_backbone=False)["encoders"] == {}
    assert load_prism_checkpoint(tower, path, projector=False)["projector"] is None


@pytest.mark.parametrize("type_, layers", [
    ("mlp2x_gelu", lambda: nn.Sequential(nn.Linear(FUSED, 16), nn.GELU(), nn.Linear(16, 16))),
    ("linear", lambda: nn.Linear(FUSED, 16)),
])
def test_prismatics_other_projectors_load_into_fusions(tmp_path, type_, layers):
    tower = build_tower("dinosiglip", SMALL + [f"projector.type={type_}"], weights="random")
    prism = prism_mlp(layers())
    report = load_prism_checkpoint(tower, save_prism(tmp_path / "c.pt", prism))
    assert report["projector"] == {"mlp2x_gelu": "gelu-mlp", "linear": "linear"}[type_]
    x = torch.randn(3, FUSED)
    assert torch.allclose(tower.projector(x), prism.projector(x), atol=1e-6)


def test_single_featurizer_and_explicit_mapping(tmp_path):
    one = build_tower("dinosiglip", SMALL + ["encoders.siglip=null"], weights="random")
    dino = timm.create_model("vit_large_patch14_reg4_dinov2", num_classes=0, img_size=28, embed_dim=32, depth=2,
                             num_heads=2)
    path = save_prism(tmp_path / "one.pt", vision={"featurizer": dino})
    assert load_prism_checkpoint(one, path, projector=False)["encoders"] == {"dino": "featurizer"}
    assert torch.equal(one.encoders["dino"].model.pos_embed, dino.pos_embed)
    path = save_prism(tmp_path / "named.pt", vision={"dinov2_featurizer": dino})
    report = load_prism_checkpoint(one, path, projector=False, featurizers={"dinov2_featurizer": "dino"})
    assert report["encoders"] == {"dino": "dinov2_featurizer"}


def test_errors_name_what_is_wrong(tower, tmp_path):
    fused = save_prism(tmp_path / "fused.pt", fused_gelu_mlp(FUSED, 16))
    mlp2x = build_tower("dinosiglip", SMALL + ["projector.type=mlp2x_gelu"], weights="random")
    with pytest.raises(ValueError, match=r"projector.type: the tower has 'mlp2x_gelu'.*'fused-gelu-mlp'.*"
                                         r"projector.type=fused_gelu_mlp.*width 16"):
        load_prism_checkpoint(mlp2x, fused)
    wide = save_prism(tmp_path / "wide.pt", fused_gelu_mlp(FUSED, 24))
    with pytest.raises(ValueError, match=r"projector: .*shape mismatch.*\[24, 512\]"):
        load_prism_checkpoint(tower, wide)
    no_projector = save_prism(tmp_path / "none.pt")
    with pytest.raises(ValueError, match="has no 'projector' weights.*projector=False"):
        load_prism_checkpoint(tower, no_projector)
    with pytest.raises(ValueError, match="has no 'vision_backbone' weights"):
        load_prism_checkpoint(tower, fused, vision_backbone=True)
    stray = save_prism(tmp_path / "stray.pt", vision={"clip_featurizer": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"featurizers: .*\['clip_featurizer'\] have no encoder"):
        load_prism_checkpoint(tower, stray, projector=False)
    bad_vit = save_prism(tmp_path / "bad.pt", vision={"dino_featurizer": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"encoders.dino: .*missing key.*unexpected key"):
        load_prism_checkpoint(tower, bad_vit, projector=False)
    with pytest.raises(TypeError, match="vision_backbone: expected True or False or None"):
        load_prism_checkpoint(tower, fused, vision_backbone="yes")
    with pytest.raises(TypeError, match="tower: expected a fusion MultiEncoderTower"):
        load_prism_checkpoint(nn.Linear(2, 2), fused)


def test_clip_encoders_are_not_timm_vits(tmp_path):
    llava = build_tower("llava15", ["encoders.clip.image_size=32", "fusion.grid=2", "encoders.clip.arch={quick_gelu: true, embed_dim: "
                                    f"16, vision_cfg: {{layers: 2, width: 32, head_width: 16, patch_size: 16}}, "
                                    f"text_cfg: {TEXT}}}"], weights="random")
    path = save_prism(tmp_path / "clip.pt", vision={"featurizer": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"encoders.clip: Prismatic's featurizers are timm VisionTransformers.*"
                                         r"encoders.clip.pretrained"):
        load_prism_checkpoint(llava, path, projector=False)


def test_unreadable_or_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: the Prism checkpoint"):
        read_prism_checkpoint(str(tmp_path / "missing.pt"))
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match=r"not a Prism checkpoint.*got \['weight'\]"):
        read_prism_checkpoint(str(plain))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        read_prism_checkpoint(str(junk))
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"projector": Exploit(tmp_path / "pwned")}}, evil)
    with pytest.raises(ValueError, match=r"weights_only=True\) refused"):
        read_prism_checkpoint(str(evil))
    assert not (tmp_path / "pwned").exists()


class Exploit:
    """A pickle that would run a command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))
