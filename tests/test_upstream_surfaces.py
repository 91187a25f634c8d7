"""The upstream surfaces fusion relies on beyond each library's most stable API.

fusion wraps open_clip, timm, segment_anything and transformers models and reaches into
some of their less stable corners (``forward_intermediates``, timm's checkpoint filter,
segment_anything's builder table, transformers' Auto registration). When a release moves
one of them, these tests fail first, with a message that names the installed version, the
surface and the fusion file that uses it, instead of a puzzling error deep in a parity test.
The accepted version ranges live in ``setup.py``; ``.ci/run`` runs the suite at the newest
releases and these tests (with the encoder and HF tests) at the lower bounds.
"""
import importlib
import inspect
from importlib.metadata import version

import pytest
import torch

# (distribution, dotted path of a callable, parameters it must accept, who in fusion relies on it)
SIGNATURES = [
    ("open-clip-torch", "open_clip.transformer.VisionTransformer.forward_intermediates",
     ["indices", "stop_early", "normalize_intermediates", "intermediates_only", "output_fmt"],
     "fusion/encoders/clip.py (layer selection)"),
    ("open-clip-torch", "open_clip.timm_model.TimmModel.forward_intermediates",
     ["indices", "stop_early", "normalize_intermediates", "intermediates_only", "output_fmt"],
     "fusion/encoders/clip.py (SigLIP layer selection)"),
    ("open-clip-torch", "open_clip.create_model", ["model_name", "pretrained", "force_quick_gelu", "force_image_size"],
     "fusion/encoders/clip.py (building the model)"),
    ("open-clip-torch", "open_clip.get_pretrained_cfg", ["model", "tag"], "fusion/encoders/clip.py (tag metadata)"),
    ("open-clip-torch", "open_clip.list_pretrained_tags_by_model", ["model"], "fusion/encoders/clip.py (tags)"),
    ("open-clip-torch", "open_clip.get_model_config", ["model_name"], "fusion/encoders/clip.py (arch overrides)"),
    ("open-clip-torch", "open_clip.model.resize_pos_embed", ["state_dict", "model"],
     "fusion/encoders/clip.py (position embeddings of local files)"),
    ("timm", "timm.models.vision_transformer.VisionTransformer.forward_intermediates",
     ["indices", "norm", "stop_early", "output_fmt", "intermediates_only"],
     "fusion/encoders/dinov2.py (layer selection)"),
    ("timm", "timm.models.vision_transformer.checkpoint_filter_fn", ["state_dict", "model"],
     "fusion/encoders/dinov2.py and clip.py (local checkpoints)"),
    ("timm", "timm.create_model", ["model_name", "pretrained"], "fusion/encoders/dinov2.py"),
    ("segment-anything", "segment_anything.modeling.ImageEncoderViT",
     ["img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "out_chans", "qkv_bias",
      "norm_layer", "use_rel_pos", "window_size", "global_attn_indexes"],
     "fusion/encoders/sam.py (building the image encoder)"),
    ("segment-anything", "segment_anything.modeling.Sam", ["pixel_mean", "pixel_std"],
     "fusion/encoders/sam.py (normalisation)"),
    ("transformers", "transformers.AutoImageProcessor.register", ["config_class", "image_processor_classes"],
     "fusion/hf.py (registering FusionImageProcessor)"),
]


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _moved(dist: str, surface: str, what: str, user: str) -> str:
    return (f"{dist} {version(dist)}: {surface} {what}; fusion relies on it in {user}. "
            f"Install a release inside the range setup.py accepts, or adapt fusion to this release.")


@pytest.mark.parametrize("dist, dotted, params, user", SIGNATURES, ids=[s[1] for s in SIGNATURES])
def test_signature(dist, dotted, params, user):
    try:
        obj = _resolve(dotted)
    except (ImportError, AttributeError) as err:
        pytest.fail(_moved(dist, dotted, f"does not exist ({type(err).__name__}: {err})", user))
    accepted = inspect.signature(obj).parameters
    missing = [p for p in params if p not in accepted]
    assert not missing, _moved(dist, dotted, f"does not accept {missing} (it takes {list(accepted)})", user)


def test_open_clip_forward_intermediates_output():
    """``{"image_intermediates": [B, h*w, C] per index}`` with the CLS token split off."""
    import open_clip

    model = open_clip.create_model("ViT-B-16", embed_dim=16, vision_cfg={"layers": 2, "width": 32, "head_width": 16,
                                                                         "image_size": 32},
                                   text_cfg={"layers": 1, "width": 16, "heads": 1, "vocab_size": 8,
                                             "context_length": 4}).visual.eval()
    with torch.no_grad():
        out = model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[0], stop_early=True,
                                          normalize_intermediates=False, intermediates_only=True, output_fmt="NLC")
    where = "VisionTransformer.forward_intermediates(intermediates_only=True, output_fmt='NLC')"
    assert isinstance(out, dict) and "image_intermediates" in out, _moved(
        "open-clip-torch", where, f"returns {type(out).__name__} {list(out) if isinstance(out, dict) else ''}, "
        f"not a dict with 'image_intermediates'", "fusion/encoders/clip.py")
    shape = tuple(out["image_intermediates"][0].shape)
    assert shape == (1, 4, 32), _moved("open-clip-torch", where, f"gives {shape}, not [1, 4, 32] "
                                       f"(2x2 patches, CLS removed)", "fusion/encoders/clip.py")


def test_open_clip_image_size_reaches_timm_towers():
    """``force_image_size`` resizes a timm-trunk tower (SigLIP) as it does open_clip's own ViT."""
    import open_clip

    model = open_clip.create_model("ViT-B-16-SigLIP", force_image_size=32, embed_dim=16,
                                   vision_cfg={"timm_model_name": "test_vit3"},
                                   text_cfg={"layers": 1, "width": 16, "heads": 1, "vocab_size": 8,
                                             "context_length": 4})
    size = tuple(model.visual.trunk.patch_embed.img_size)
    assert size == (32, 32), _moved("open-clip-torch", "create_model(force_image_size=...) on a timm tower",
                                    f"builds the trunk at {size}, not (32, 32)",
                                    "fusion/encoders/clip.py (encoders.<name>.image_size of SigLIP)")


def test_timm_forward_intermediates_output():
    """A list of ``[B, h*w, C]`` tensors with the prefix tokens (CLS, registers) split off."""
    import timm

    model = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, embed_dim=16, depth=2, num_heads=1).eval()
    with torch.no_grad():
        out = model.forward_intermediates(torch.randn(1, 3, 28, 28), indices=[0], norm=False, stop_early=True,
                                          output_fmt="NLC", intermediates_only=True)
    where = "VisionTransformer.forward_intermediates(intermediates_only=True, output_fmt='NLC')"
    shape = tuple(out[0].shape) if isinstance(out, (list, tuple)) and out else None
    assert shape == (1, 4, 16), _moved("timm", where, f"gives {shape or type(out).__name__}, not a list of "
                                       f"[1, 4, 16] (2x2 patches, CLS and registers removed)",
                                       "fusion/encoders/dinov2.py")


def test_sam_sizes_match_segment_anything_builders(monkeypatch):
    """fusion's SAM size table equals what segment_anything's own builders pass."""
    build_sam = importlib.import_module("segment_anything.build_sam")  # the module, not its build_sam alias

    from fusion.encoders.sam import SAM_SIZES

    seen = {}

    def record(**kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(build_sam, "_build_sam", record)
    for name, sizes in SAM_SIZES.items():
        seen.clear()
        build_sam.sam_model_registry[name](checkpoint=None)
        upstream = dict(embed_dim=seen.get("encoder_embed_dim"), depth=seen.get("encoder_depth"),
                        num_heads=seen.get("encoder_num_heads"),
                        global_attn_indexes=tuple(seen.get("encoder_global_attn_indexes") or ()))
        assert upstream == dict(sizes), _moved(
            "segment-anything", f"build_sam.sam_model_registry[{name!r}]", f"builds {upstream}, fusion's "
            f"SAM_SIZES says {dict(sizes)}", "fusion/encoders/sam.py")


def test_sam_common_arguments_match_segment_anything_builder(monkeypatch):
    """fusion's SAM_COMMON (the image-encoder arguments every size shares) equals what
    segment_anything's ``_build_sam`` passes to ``ImageEncoderViT`` (nothing is built)."""
    build_sam = importlib.import_module("segment_anything.build_sam")

    from fusion.encoders.sam import SAM_COMMON, SAM_SIZES

    seen = {}

    class Recorded(Exception):
        pass

    def record(**kwargs):
        seen.update(kwargs)
        raise Recorded  # stop before the rest of SAM is built

    monkeypatch.setattr(build_sam, "ImageEncoderViT", record)
    with pytest.raises(Recorded):
        build_sam.sam_model_registry["vit_b"](checkpoint=None)
    ours = {**SAM_COMMON, **SAM_SIZES["vit_b"]}
    norm = seen.get("norm_layer")
    same_norm = norm is not None and norm(8).eps == ours["norm_layer"](8).eps and type(norm(8)) is torch.nn.LayerNorm
    upstream = {k: (tuple(v) if isinstance(v, list) else v) for k, v in seen.items() if k != "norm_layer"}
    assert same_norm and upstream == {k: v for k, v in ours.items() if k != "norm_layer"}, _moved(
        "segment-anything", "build_sam._build_sam", f"passes ImageEncoderViT {upstream}, fusion's SAM_COMMON + "
        f"SAM_SIZES['vit_b'] say {ours}", "fusion/encoders/sam.py")
