"""Presets that claim an anchor, against that anchor's published code path reproduced here.

``dinosiglip`` claims Prismatic's DINO-SigLIP (TRI-ML/prismatic-vlms, backbone
``dinosiglip-vit-so-384px`` as its Prism-DINOSigLIP models use it). Prismatic's featurizer,
as its code describes it and reproduced below (not imported: Prismatic is not a dependency):

- two timm models, ``vit_large_patch14_reg4_dinov2.lvd142m`` and
  ``vit_so400m_patch14_siglip_384`` (tag ``webli``), built with ``num_classes=0,
  img_size=384``;
- each featurizer returns the output of block ``len(blocks) - 2``, prefix tokens dropped,
  no final norm (``get_intermediate_layers(x, n={len(blocks) - 2})``), and the backbone
  concatenates DINO then SigLIP on channels;
- each image transform is timm's eval transform of that model's data config with
  ``input_size`` set to 384, SigLIP's first ``Resize`` replaced by ``Resize(384)``, then by
  strategy: ``resize-naive`` swaps the first ``Resize`` for ``Resize((384, 384))``;
  ``letterbox`` pads the PIL image first, ``int((side - w) / 2)`` on both sides with the
  model's own ``int(mean * 255)``;
- the ``fused-gelu-mlp`` projector ``Linear(C, 4C), GELU, Linear(4C, D), GELU, Linear(D, D)``;
- checkpoints ``torch.save({"model": {"projector": ..., "llm_backbone": ..., ["vision_backbone": ...]}})``.

Pixels identical (an image already at the input size, where neither side resizes): the
tokens agree to 1e-5 relative. Otherwise Prismatic resizes 8-bit PIL images and fusion
resizes in float: the encoder inputs then differ by about one 8-bit step, and given the
same inputs the features agree to 1e-5 (so the rounding is the only difference).

``llava15`` claims LLaVA-1.5's vision tower (haotian-liu/LLaVA ``CLIPVisionTower``): Hugging
Face's ``CLIPVisionModel`` (``openai/clip-vit-large-patch14-336``), ``hidden_states[-2]``
without the CLS token, images padded by ``expand2square`` with ``int(mean * 255)`` then
CLIP's image processor. Reproduced with transformers' own ``CLIPVisionModel`` given fusion's
weights through a key map written here.

The tiny tests run the presets' code paths with small ``arch`` overrides (default suite);
the full-size ones (``-m slow``; ~3 GB, run them under the heavy lock) build the real
architectures with random weights and share the modules between fusion and the reference.
"""
import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.functional as TVF
from PIL import Image
from torch import nn
from torchvision.transforms import Compose, Resize

import fusion
from fusion.letterbox import pad_weights
from fusion.prismatic import load_prism_checkpoint
from test_preprocess import expand2square, natural_image
from weights_helpers import unpruned

PRISM_DINO = "vit_large_patch14_reg4_dinov2.lvd142m"
PRISM_SIGLIP = "vit_so400m_patch14_siglip_384"
TEXT = "{layers: 1, width: 32, heads: 2, vocab_size: 64, context_length: 8}"
TINY_DINOSIGLIP = [  # the dinosiglip preset with tiny encoders: 64 px, DINO 4x4 (8 px dropped), SigLIP 4x4
    "encoders.dino.image_size=64", "encoders.dino.arch={embed_dim: 48, depth: 3, num_heads: 2}",
    "encoders.siglip.image_size=64",
    f"encoders.siglip.arch={{embed_dim: 32, vision_cfg: {{timm_model_name: test_vit3}}, text_cfg: {TEXT}}}",
    "fusion.grid=4", "projector.out_dim=32",
]


# ----------------------------------------------------------------------------- helpers


def relative(got, ref):
    """(||got - ref|| / ||ref||, max|got - ref| / max|ref|), printed."""
    got, ref = got.double(), ref.double()
    norm = ((got - ref).norm() / ref.norm()).item()
    peak = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"relative: norm {norm:.3g}, max {peak:.3g}")
    return norm, peak


def block_output(vit, x, index):
    """A timm ViT run module by module: block ``index``'s output, prefix tokens removed, ``[B, N, C]``."""
    t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for blk in vit.blocks[: index + 1]:
        t = blk(t)
    return t[:, vit.num_prefix_tokens:]


class PrismFusedMLP(nn.Module):
    """Prismatic's ``FusedMLPProjector``: the layers in a ``projector`` attribute."""

    def __init__(self, vision_dim, llm_dim):
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(vision_dim, 4 * vision_dim), nn.GELU(),
                                       nn.Linear(4 * vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, x):
        return self.projector(x)


def write_prism_checkpoint(path, projector, featurizers=None):
    """A checkpoint in Prismatic's save_checkpoint layout (a stand-in LLM included, never read)."""
    model = {"projector": projector.state_dict(), "llm_backbone": {"llm.model.embed_tokens.weight": torch.randn(8, 4)}}
    if featurizers:
        model["vision_backbone"] = {f"{name}.{k}": v for name, vit in featurizers.items()
                                    for k, v in vit.state_dict().items()}
    torch.save({"model": model}, path)


def letterbox_pad(fill):
    """Prismatic's ``LetterboxPad``: ``int((side - w) / 2)`` pixels on both sides, in ``fill``."""
    def pad(img):
        (w, h), side = img.size, max(img.size)
        dx, dy = int((side - w) / 2), int((side - h) / 2)
        return TVF.pad(img, [dx, dy, dx, dy], fill=fill, padding_mode="constant")
    return pad


def prismatic_transform(timm_name, size, strategy):
    """Prismatic's image transform for one featurizer (``DinoSigLIPViTBackbone.__init__``)."""
    data_cfg = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(timm_name).to_dict())
    data_cfg["input_size"] = (3, size, size)
    default = timm.data.create_transform(**data_cfg, is_training=False)
    first, rest = default.transforms[0], default.transforms[1:]
    assert isinstance(first, Resize)
    if "siglip" in timm_name:  # Prismatic's fix: timm's SigLIP transform resizes past the size, then crops
        default = Compose([Resize(size, interpolation=first.interpolation), *rest])
    if strategy == "resize-naive":
        return Compose([Resize((size, size), interpolation=first.interpolation), *rest])
    assert strategy == "letterbox"
    return Compose([letterbox_pad(tuple(int(m * 255) for m in data_cfg["mean"])), *default.transforms])


def prismatic_dinosiglip(dino, siglip, projector, image, size, strategy):
    """Prismatic's DINO-SigLIP forward on one PIL image: (pixels per featurizer, fused patches, projected)."""
    pixels = {"dino": prismatic_transform(PRISM_DINO, size, strategy)(image)[None],
              "siglip": prismatic_transform(PRISM_SIGLIP, size, strategy)(image)[None]}
    with torch.no_grad():
        patches = torch.cat([block_output(dino, pixels["dino"], len(dino.blocks) - 2),
                             block_output(siglip, pixels["siglip"], len(siglip.blocks) - 2)], dim=2)
        return pixels, patches, projector(patches)


def fusion_inputs(tower, batch):
    """Each encoder's normalised input, as the tower makes it from ``tower.image_processor``'s output."""
    px = batch["pixel_values"]
    return tower.encoder_inputs(px, pad_weights(batch["image_sizes"], tuple(px.shape[-2:])))


# ----------------------------------------------------------------------------- dinosiglip, tiny (default suite)


@pytest.fixture(scope="module")
def tiny_prismatic(tmp_path_factory):
    """Prismatic's featurizers and projector at tiny sizes (random weights, built by timm as Prismatic
    builds them), a Prism checkpoint of them, and a fusion tower loaded from that checkpoint."""
    torch.manual_seed(0)
    dino = timm.create_model("vit_large_patch14_reg4_dinov2", num_classes=0, img_size=64,
                             embed_dim=48, depth=3, num_heads=2).eval()
    siglip = timm.create_model("test_vit3", num_classes=0, img_size=64).eval()
    projector = PrismFusedMLP(48 + 96, 32).eval()
    path = tmp_path_factory.mktemp("prism") / "latest-checkpoint.pt"
    write_prism_checkpoint(path, projector, {"dino_featurizer": dino, "siglip_featurizer": siglip})
    tower = fusion.build_tower("dinosiglip", TINY_DINOSIGLIP, weights="random").eval()
    report = load_prism_checkpoint(tower, str(path))
    assert report == {"projector": "fused-gelu-mlp",
                      "encoders": {"dino": "dino_featurizer", "siglip": "siglip_featurizer"}}
    return dino, siglip, projector, tower


def test_dinosiglip_preset_is_prismatics_configuration():
    cfg = fusion.load_config("dinosiglip")
    assert list(cfg.encoders) == ["dino", "siglip"]  # channel order: DINO then SigLIP
    dino, siglip = cfg.encoders["dino"], cfg.encoders["siglip"]
    assert (dino.model, dino.pretrained, dino.image_size, dino.layer) == ("vit_large_patch14_reg4_dinov2", "lvd142m",
                                                                          384, -2)
    assert (siglip.model, siglip.pretrained, siglip.image_size, siglip.layer) == ("ViT-SO400M-14-SigLIP-384", "webli",
                                                                                  None, -2)
    import open_clip

    vision = open_clip.get_model_config(siglip.model)["vision_cfg"]
    assert (vision["timm_model_name"], vision["image_size"]) == (PRISM_SIGLIP, 384)
    assert (cfg.fusion.grid, cfg.fusion.norm, cfg.fusion.combine) == (27, "none", "channel_concat")
    assert (cfg.projector.type, cfg.projector.out_dim) == ("fused_gelu_mlp", 4096)  # Llama-2 7B width
    assert cfg.processor.mode == "squash"  # Prismatic's resize-naive


def test_tiny_dinosiglip_equals_prismatic_on_identical_pixels(tiny_prismatic):
    """A 64 px image: neither side resizes, so the whole path must agree to float rounding."""
    dino, siglip, projector, tower = tiny_prismatic
    image = natural_image(64, 64, 11)
    pixels, patches, tokens = prismatic_dinosiglip(dino, siglip, projector, image, 64, "resize-naive")
    batch = tower.image_processor(image)
    with torch.no_grad():
        inputs = fusion_inputs(tower, batch)
        out = tower(**batch, return_dict=True)
        # Prismatic calls timm's get_intermediate_layers(x, n={len(blocks) - 2}); our reference is the same
        assert torch.allclose(dino.get_intermediate_layers(pixels["dino"], n={1})[0], patches[..., :48], atol=1e-6)
    for name in ("dino", "siglip"):
        assert torch.equal(inputs[name], pixels[name])
    assert max(relative(out.merged_tokens, patches)) <= 1e-5
    assert max(relative(out.tokens, tokens)) <= 1e-5


@pytest.mark.parametrize("w,h", [(100, 70), (70, 100)])
def test_tiny_dinosiglip_resize_naive_within_pil_rounding(tiny_prismatic, w, h):
    """Prismatic resizes 8-bit PIL images, fusion resizes in float: the inputs differ by about
    one 8-bit step; fed the same inputs, the featurizers and projector agree to 1e-5."""
    dino, siglip, projector, tower = tiny_prismatic
    image = natural_image(w, h, 5)
    pixels, patches, tokens = prismatic_dinosiglip(dino, siglip, projector, image, 64, "resize-naive")
    batch = tower.image_processor(image)
    with torch.no_grad():
        inputs = fusion_inputs(tower, batch)
        out = tower(**batch, return_dict=True)
        same_inputs = torch.cat([block_output(dino, inputs["dino"], len(dino.blocks) - 2),
                                 block_output(siglip, inputs["siglip"], len(siglip.blocks) - 2)], 2)
    for name, std in (("dino", 0.224), ("siglip", 0.5)):
        step = (inputs[name] - pixels[name]).abs().max().item() * std * 255
        print(f"{name} input: max {step:.2f} 8-bit steps")
        assert step < 1.2  # measured: 1.02 / 1.05 (DINO), 1.04 / 1.06 (SigLIP)
    assert max(relative(out.merged_tokens, same_inputs)) <= 1e-5
    norm, _ = relative(out.tokens, tokens)
    assert norm < 0.02  # measured 0.0011 / 0.0013: the rounding, through random tiny weights


def test_tiny_dinosiglip_letterbox_uses_each_encoders_mean(tiny_prismatic):
    """``pad`` mode with ``image_sizes``: DINO padded with (123, 116, 103), SigLIP with (127, 127, 127),
    as Prismatic's letterbox; without ``image_sizes`` both get the frame colour (DINO's)."""
    dino, siglip, projector, _ = tiny_prismatic
    tower = fusion.build_tower("dinosiglip", TINY_DINOSIGLIP + ["processor.mode=pad"], weights="random").eval()
    tower.load_state_dict(tiny_prismatic[3].state_dict())
    # even padding (40 rows): Prismatic's letterbox is square. With an odd difference it pads
    # int(d / 2) on both sides, one row short of a square, and its Resize squashes that row away;
    # fusion pads (d // 2, d - d // 2) to an exact square (LLaVA's expand2square): a sub-pixel shift.
    image = natural_image(100, 60, 3)
    pixels, patches, tokens = prismatic_dinosiglip(dino, siglip, projector, image, 64, "letterbox")
    batch = tower.image_processor(image)
    assert batch["image_sizes"].tolist() == [[60, 100]]
    with torch.no_grad():
        inputs = fusion_inputs(tower, batch)
        fallback = tower.encoder_inputs(batch["pixel_values"])
        out = tower(**batch)
        without_sizes = tower(batch["pixel_values"])
    for name, std in (("dino", 0.224), ("siglip", 0.5)):
        step = (inputs[name] - pixels[name]).abs().max().item() * std * 255
        print(f"{name} letterbox input: max {step:.2f} 8-bit steps")
        assert step < 1.2  # measured 0.96 (DINO), 0.96 (SigLIP)
    top = fallback["siglip"][0, :, 0, 0] * 0.5 + 0.5  # SigLIP's first padding pixel, back in [0, 1]
    assert torch.allclose(top * 255, torch.tensor([123.0, 116.0, 103.0]), atol=1e-3)  # DINO's colour
    assert relative(out, tokens)[0] < 0.02  # measured 0.0010
    assert relative(without_sizes, tokens)[0] > 5 * relative(out, tokens)[0]  # measured 0.0154


# ----------------------------------------------------------------------------- dinosiglip, full size (-m slow)


@pytest.fixture(scope="module")
def full_dinosiglip(tmp_path_factory):
    """The real dinosiglip preset (random weights) with a Prism fused-gelu-mlp projector loaded from a
    checkpoint; the reference featurizers are the timm modules of the same preset built with the
    same seed and kept whole (the tower drops the blocks after the selected one)."""
    tower = fusion.build_tower("dinosiglip", weights="random").eval()
    with unpruned():
        whole = fusion.build_tower("dinosiglip", weights="random").eval()
    projector = PrismFusedMLP(1024 + 1152, 4096).eval()
    path = tmp_path_factory.mktemp("prism") / "latest-checkpoint.pt"
    write_prism_checkpoint(path, projector)
    assert load_prism_checkpoint(tower, str(path)) == {"projector": "fused-gelu-mlp", "encoders": {}}
    return tower, whole.encoders["dino"].model, whole.encoders["siglip"].model.trunk, projector


@pytest.mark.slow
def test_full_dinosiglip_modules_are_the_ones_prismatic_builds(full_dinosiglip):
    """Prismatic's timm.create_model calls, on the meta device: the same modules (repr: every layer,
    its sizes, eps and activation) and the same parameter shapes as the tower's."""
    _, dino, siglip, _ = full_dinosiglip
    with torch.device("meta"):
        prism_dino = timm.create_model(PRISM_DINO, pretrained=False, num_classes=0, img_size=384)
        prism_siglip = timm.create_model(PRISM_SIGLIP, pretrained=False, num_classes=0, img_size=384)
    for ours, theirs in ((dino, prism_dino), (siglip, prism_siglip)):
        assert repr(ours) == repr(theirs)
        shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (ours, theirs)]
        assert shapes[0] == shapes[1]
        assert tuple(ours.patch_embed.grid_size) == (27, 27)


@pytest.mark.slow
@pytest.mark.parametrize("w,h,bound", [(384, 384, 1e-5), (640, 480, 0.05)], ids=["identical-pixels", "pil-rounding"])
def test_full_dinosiglip_equals_prismatic_end_to_end(full_dinosiglip, w, h, bound):
    tower, dino, siglip, projector = full_dinosiglip
    image = natural_image(w, h, 9)
    pixels, patches, tokens = prismatic_dinosiglip(dino, siglip, projector, image, 384, "resize-naive")
    batch = tower.image_processor(image)
    with torch.no_grad():
        inputs = fusion_inputs(tower, batch)
        out = tower(**batch, return_dict=True)
    for name, std in (("dino", 0.224), ("siglip", 0.5)):
        step = (inputs[name] - pixels[name]).abs().max().item() * std * 255
        print(f"{name} input: max {step:.2f} 8-bit steps")
        assert step < (1e-4 if w == h == 384 else 1.2)
    print("fused patches:", relative(out.merged_tokens, patches))
    assert max(relative(out.tokens, tokens)) <= bound  # measured: 0 / 0.0044 (norm), 0.011 (max)


# ----------------------------------------------------------------------------- llava15


def hf_clip_state(visual):
    """open_clip ``VisionTransformer`` state -> Hugging Face ``CLIPVisionModel`` state (written from both
    libraries' module layouts: fused in_proj split into q, k, v)."""
    s = visual.state_dict()
    out = {"embeddings.class_embedding": s["class_embedding"],
           "embeddings.patch_embedding.weight": s["conv1.weight"],
           "embeddings.position_embedding.weight": s["positional_embedding"],
           "pre_layrnorm.weight": s["ln_pre.weight"], "pre_layrnorm.bias": s["ln_pre.bias"],
           "post_layernorm.weight": s["ln_post.weight"],
           "post_layernorm.bias": s["ln_post.bias"]}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in range(len(visual.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = s[f"{src}{a}.{p}"]
        for p, suffix in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            for part, proj in zip(s[src + "attn." + suffix].chunk(3), ("q_proj", "k_proj", "v_proj")):
                out[f"{dst}self_attn.{proj}.{p}"] = part
    return out


def llava_tower(tower, image):
    """LLaVA-1.5's CLIPVisionTower on one PIL image, with the tower's CLIP weights: expand2square with
    int(mean * 255), CLIP's processor (resize the short side, centre crop, rescale, normalise),
    CLIPVisionModel hidden_states[-2] without CLS."""
    transformers = pytest.importorskip("transformers")  # in the dev extras
    CLIPVisionConfig, CLIPVisionModel = transformers.CLIPVisionConfig, transformers.CLIPVisionModel
    clip = tower.encoders["clip"]
    visual, size = clip.model, clip.image_size
    blocks = visual.transformer.resblocks
    config = CLIPVisionConfig(hidden_size=visual.transformer.width, num_hidden_layers=len(blocks),
                              intermediate_size=blocks[0].mlp.c_fc.out_features,
                              num_attention_heads=blocks[0].attn.num_heads, image_size=size,
                              patch_size=clip.patch_size, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    model = CLIPVisionModel(config).eval()
    # older transformers 5 releases nest the layers under `vision_model`; newer ones flatten them
    getattr(model, "vision_model", model).load_state_dict(hf_clip_state(visual), strict=True)
    square = expand2square(image, tuple(int(m * 255) for m in clip.mean))
    square = square.resize((size, size), Image.BICUBIC)  # short side = size on a square; the crop is a no-op
    x = torch.from_numpy(np.array(square)).permute(2, 0, 1).float().div(255)[None]
    x = (x - torch.tensor(clip.mean).view(1, 3, 1, 1)) / torch.tensor(clip.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]


TINY_LLAVA15 = ["encoders.clip.image_size=64", "fusion.grid=4",
                "encoders.clip.arch={quick_gelu: true, embed_dim: 32, vision_cfg: {layers: 3, width: 64, head_width: 32, "
                f"patch_size: 16}}, text_cfg: {TEXT}}}"]


@pytest.mark.parametrize("size", [pytest.param("tiny"), pytest.param("full", marks=pytest.mark.slow)])
def test_llava15_equals_llavas_clip_tower(size):
    overrides = TINY_LLAVA15 if size == "tiny" else []
    tower = fusion.build_tower("llava15", overrides, weights="random").eval()
    with unpruned():  # the same seeded weights with the whole CLIP (LLaVA's model holds every layer)
        whole = fusion.build_tower("llava15", overrides, weights="random").eval()
    s = tower.encoders["clip"].image_size
    for w, h, bound in ((s, s, 1e-5), (s * 3 // 2, s, 0.05)):  # identical pixels; LLaVA's 8-bit pad + resize
        image = natural_image(w, h, 4)
        with torch.no_grad():
            ours = tower(**tower.image_processor(image))
        # measured: 1e-7 / 0.006 (tiny), 4e-7 / 0.008 norm, 0.03 max (full size)
        assert max(relative(ours, llava_tower(whole, image))) <= bound
