"""Hugging Face -> upstream key maps, one per family, and what each compares in ``config.json``.

============  ===================================  =====================================
family        Hugging Face classes (model_type)    upstream module fusion runs
============  ===================================  =====================================
``clip``      CLIPModel (clip),                    open_clip ``VisionTransformer``
              CLIPVisionModel[WithProjection]
              (clip_vision_model)
``siglip``    SiglipModel (siglip),                open_clip ``TimmModel`` (timm ViT trunk)
              SiglipVisionModel (siglip_vision_model)
``dinov2``    Dinov2Model (dinov2),                timm ``VisionTransformer``
              Dinov2WithRegistersModel
              (dinov2_with_registers)
``sam``       SamModel (sam),                      segment_anything ``ImageEncoderViT``
              SamVisionModel (sam_vision_model)
============  ===================================  =====================================

Each :class:`HFFamily` names the vision part's key prefix in whole-model checkpoints
(optional: transformers 5 saves a ``CLIPVisionModel`` without it), the other parts of
the model that are skipped (text tower, prompt encoder, ...), the few vision keys that
have no place in the upstream module (with the reason), the ``convert`` function (every
other tensor is asked for by name, see :class:`.hf_checkpoint.KeyTaker`) and ``facts``:
the fusion side's architecture in ``config.json``'s field names, compared field by field.

A projection / pooling head that fusion never runs (CLIP's ``proj``, SigLIP's MAP head)
may be absent from a vision-only checkpoint; the adapter then removes it from the
upstream module (``head_prefix`` / ``drop_head``) and the weights report says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from .hf_checkpoint import KeyTaker

State = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFFamily:
    """How one family's Hugging Face checkpoints map onto fusion's upstream module.

    ``model_types``: ``config.json`` model_type -> attribute of the config holding the
    vision config (``None``: the config itself). ``convert(taker, vision_config, module)``
    returns the state dict in the upstream module's names. ``facts(encoder)`` gives the
    fusion side's values of the compared ``config.json`` fields; ``hints`` names the
    fusion config key behind each (``{p}`` = ``encoders.<name>``); ``absent`` what a field
    the config class lacks means.
    """

    label: str
    model_types: Mapping[str, Optional[str]]
    prefix: str
    other_parts: Tuple[str, ...]
    unused: Mapping[str, str]
    convert: Callable[[KeyTaker, Any, nn.Module], State]
    facts: Callable[[Any], Dict[str, Any]]
    hints: Mapping[str, str]
    head_prefix: Optional[str] = None
    drop_head: Optional[Callable[[nn.Module], None]] = None
    expected: str = ""
    absent: Mapping[str, Any] = field(default_factory=dict)


def act_name(module: nn.Module) -> str:
    """An activation module's Hugging Face name (``quick_gelu``, ``gelu``, ``gelu_pytorch_tanh``)."""
    name = type(module).__name__
    if name == "GELU" and getattr(module, "approximate", "none") == "tanh":
        return "gelu_pytorch_tanh"
    return {"QuickGELU": "quick_gelu", "GELUTanh": "gelu_pytorch_tanh", "GELU": "gelu", "SiLU": "silu"}.get(name, name)


def _qkv(t: KeyTaker, src: str, names: Tuple[str, str, str], suffix: str) -> Optional[torch.Tensor]:
    return t.cat([f"{src}{n}.{suffix}" for n in names])


# ----------------------------------------------------------------------------- CLIP


def _clip_convert(t: KeyTaker, c: Any, visual: nn.Module) -> State:
    out: State = {"class_embedding": t.take("embeddings.class_embedding"),
                  "positional_embedding": t.take("embeddings.position_embedding.weight"),
                  "conv1.weight": t.take("embeddings.patch_embedding.weight")}
    t.rename({"pre_layrnorm": "ln_pre", "post_layernorm": "ln_post"}, out)
    for i in range(c.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for suffix in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{suffix}"] = _qkv(t, src + "self_attn.", ("q_proj", "k_proj", "v_proj"), suffix)
        t.rename({src + "self_attn.out_proj": dst + "attn.out_proj", src + "layer_norm1": dst + "ln_1",
                  src + "layer_norm2": dst + "ln_2", src + "mlp.fc1": dst + "mlp.c_fc",
                  src + "mlp.fc2": dst + "mlp.c_proj"}, out)
    proj = t.optional("visual_projection.weight")  # [proj_dim, width]; open_clip's proj is [width, proj_dim]
    if proj is not None:
        out["proj"] = proj.t().contiguous()
    return {k: v for k, v in out.items() if v is not None}


def _clip_facts(enc: Any) -> Dict[str, Any]:
    import open_clip

    visual = enc.model
    _require(enc, hasattr(visual, "transformer"), "an open_clip VisionTransformer (CLIP)")
    block = visual.transformer.resblocks[0]
    return dict(hidden_size=visual.transformer.width, num_hidden_layers=len(visual.transformer.resblocks),
                num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.c_fc.out_features,
                patch_size=enc.patch_size, hidden_act=act_name(block.mlp.gelu), layer_norm_eps=block.ln_1.eps,
                image_size=_native(open_clip.get_model_config(enc.cfg.model)["vision_cfg"]["image_size"]))


# What the CLIP, SigLIP and DINOv2 families share: the index buffer older checkpoints hold, and
# where the native input size comes from.
_POSITION_IDS_UNUSED = {"embeddings.position_ids": "a constant index buffer older transformers saved, not a weight"}
_NATIVE_SIZE_HINT = ("{p}.model: the model's native input size ({p}.image_size then resamples position "
                     "embeddings for every source alike)")


def _drop_clip_proj(visual: nn.Module) -> None:
    visual.proj = None


CLIP = HFFamily(
    label="CLIP", model_types={"clip": "vision_config", "clip_vision_model": None}, prefix="vision_model.",
    other_parts=("text_model.", "text_projection.", "logit_scale"),
    unused=_POSITION_IDS_UNUSED,
    convert=_clip_convert, facts=_clip_facts,
    hints={"hidden_size": "{p}.arch.vision_cfg.width", "num_hidden_layers": "{p}.arch.vision_cfg.layers",
           "num_attention_heads": "{p}.arch.vision_cfg.head_width (width / heads)",
           "intermediate_size": "{p}.arch.vision_cfg.mlp_ratio", "patch_size": "{p}.arch.vision_cfg.patch_size",
           "hidden_act": "{p}.arch.quick_gelu",
           "image_size": _NATIVE_SIZE_HINT},
    head_prefix="proj", drop_head=_drop_clip_proj,
    expected="a CLIPModel / CLIPVisionModel checkpoint (vision_model.*, visual_projection.weight)",
)


# ----------------------------------------------------------------------------- SigLIP


def _siglip_convert(t: KeyTaker, c: Any, visual: nn.Module) -> State:
    out: State = {}
    t.rename({"embeddings.patch_embedding": "trunk.patch_embed.proj", "post_layernorm": "trunk.norm"}, out)
    pos = t.take("embeddings.position_embedding.weight")  # [N, C] -> timm's [1, N, C]
    if pos is not None:
        out["trunk.pos_embed"] = pos.unsqueeze(0)
    for i in range(c.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"trunk.blocks.{i}."
        for suffix in ("weight", "bias"):
            out[f"{dst}attn.qkv.{suffix}"] = _qkv(t, src + "self_attn.", ("q_proj", "k_proj", "v_proj"), suffix)
        t.rename({src + "layer_norm1": dst + "norm1", src + "self_attn.out_proj": dst + "attn.proj",
                  src + "layer_norm2": dst + "norm2", src + "mlp.fc1": dst + "mlp.fc1",
                  src + "mlp.fc2": dst + "mlp.fc2"}, out)
    if t.has("head.probe"):  # the MAP head: latent query, one multi-head attention, LayerNorm + MLP
        out["trunk.attn_pool.latent"] = t.take("head.probe")
        width = c.hidden_size
        for suffix in ("weight", "bias"):  # in_proj = [q; k; v]: q -> timm's q, [k; v] -> timm's kv
            packed = t.take(f"head.attention.in_proj_{suffix}")
            if packed is not None:
                out[f"trunk.attn_pool.q.{suffix}"], out[f"trunk.attn_pool.kv.{suffix}"] = packed[:width], packed[width:]
        t.rename({"head.attention.out_proj": "trunk.attn_pool.proj", "head.layernorm": "trunk.attn_pool.norm",
                  "head.mlp.fc1": "trunk.attn_pool.mlp.fc1", "head.mlp.fc2": "trunk.attn_pool.mlp.fc2"}, out)
    return {k: v for k, v in out.items() if v is not None}


def _siglip_facts(enc: Any) -> Dict[str, Any]:
    import open_clip

    _require(enc, hasattr(enc.model, "trunk") and hasattr(enc.model.trunk, "blocks"), "an open_clip timm ViT trunk")
    trunk = enc.model.trunk
    block = trunk.blocks[0]
    return dict(hidden_size=trunk.embed_dim, num_hidden_layers=len(trunk.blocks),
                num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.fc1.out_features,
                patch_size=enc.patch_size, hidden_act=act_name(block.mlp.act), layer_norm_eps=block.norm1.eps,
                image_size=_native(open_clip.get_model_config(enc.cfg.model)["vision_cfg"]["image_size"]))


def _drop_siglip_head(visual: nn.Module) -> None:
    visual.trunk.attn_pool = None


SIGLIP = HFFamily(
    label="SigLIP", model_types={"siglip": "vision_config", "siglip_vision_model": None}, prefix="vision_model.",
    other_parts=("text_model.", "logit_scale", "logit_bias"),
    unused=_POSITION_IDS_UNUSED,
    convert=_siglip_convert, facts=_siglip_facts,
    hints={"hidden_act": "{p}.arch.timm_act_layer (gelu_tanh for gelu_pytorch_tanh)",
           "hidden_size": "{p}.arch.vision_cfg.timm_model_name (the timm trunk)",
           "num_hidden_layers": "{p}.arch.vision_cfg.timm_model_name (the timm trunk)",
           "num_attention_heads": "{p}.arch.vision_cfg.timm_model_name (the timm trunk)",
           "intermediate_size": "{p}.arch.vision_cfg.timm_model_name (the timm trunk)",
           "patch_size": "{p}.arch.vision_cfg.timm_model_name (the timm trunk)",
           "image_size": _NATIVE_SIZE_HINT},
    head_prefix="trunk.attn_pool.", drop_head=_drop_siglip_head,
    expected="a SiglipModel / SiglipVisionModel checkpoint (vision_model.*)",
)


# ----------------------------------------------------------------------------- DINOv2


def _dinov2_convert(t: KeyTaker, c: Any, vit: nn.Module) -> State:
    out: State = {}
    cls, pos = t.take("embeddings.cls_token"), t.take("embeddings.position_embeddings")  # pos: [1, 1 + N, C]
    registers = t.optional("embeddings.register_tokens")
    if registers is not None:
        out["reg_token"] = registers
    if getattr(vit, "no_embed_class", False) and cls is not None and pos is not None:
        # Hugging Face (as Meta's DINOv2) adds pos[0] to the CLS token; timm's register models
        # (no_embed_class) add position embeddings to patches only: fold pos[0] into the token.
        out["cls_token"], out["pos_embed"] = cls + pos[:, :1], pos[:, 1:]
    else:
        out["cls_token"], out["pos_embed"] = cls, pos
    t.rename({"embeddings.patch_embeddings.projection": "patch_embed.proj", "layernorm": "norm"}, out)
    for i in range(c.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for suffix in ("weight", "bias"):
            out[f"{dst}attn.qkv.{suffix}"] = _qkv(t, src + "attention.attention.", ("query", "key", "value"), suffix)
        t.rename({src + "attention.output.dense": dst + "attn.proj", src + "norm1": dst + "norm1",
                  src + "norm2": dst + "norm2"}, out)
        # SwiGLU (DINOv2-giant): weights_in packs [gate; value] like timm's SwiGLUPacked fc1
        mlp_in, mlp_out = ("weights_in", "weights_out") if getattr(c, "use_swiglu_ffn", False) else ("fc1", "fc2")
        t.rename({f"{src}mlp.{mlp_in}": dst + "mlp.fc1", f"{src}mlp.{mlp_out}": dst + "mlp.fc2"}, out)
        for n in (1, 2):
            gamma = t.take(f"{src}layer_scale{n}.lambda1")
            if gamma is not None:
                out[f"{dst}ls{n}.gamma"] = gamma
    return {k: v for k, v in out.items() if v is not None}


def _dinov2_facts(enc: Any) -> Dict[str, Any]:
    vit = enc.model
    block = vit.blocks[0]
    swiglu = type(block.mlp).__name__ == "GluMlp" and act_name(block.mlp.act) == "silu"
    facts = dict(hidden_size=vit.embed_dim, num_hidden_layers=len(vit.blocks), num_attention_heads=block.attn.num_heads,
                 patch_size=enc.patch_size, layer_norm_eps=block.norm1.eps, qkv_bias=block.attn.qkv.bias is not None,
                 use_swiglu_ffn=swiglu, num_register_tokens=int(getattr(vit, "num_reg_tokens", 0)),
                 image_size=_native(vit.pretrained_cfg["input_size"][-1]))
    if not swiglu:  # a SwiGLU FFN ignores hidden_act, and its width follows its own rounding (shapes check it)
        facts.update(mlp_ratio=block.mlp.fc1.out_features / vit.embed_dim, hidden_act=act_name(block.mlp.act))
    return facts


DINOV2 = HFFamily(
    label="DINOv2", model_types={"dinov2": None, "dinov2_with_registers": None}, prefix="",
    other_parts=(),
    unused={"embeddings.mask_token": "the mask token of DINOv2's masked-image training; inference never uses it"},
    convert=_dinov2_convert, facts=_dinov2_facts,
    hints={"hidden_size": "{p}.arch.embed_dim", "num_hidden_layers": "{p}.arch.depth",
           "num_attention_heads": "{p}.arch.num_heads", "mlp_ratio": "{p}.arch.mlp_ratio",
           "patch_size": "{p}.arch.patch_size", "hidden_act": "{p}.arch.act_layer",
           "qkv_bias": "{p}.arch.qkv_bias", "use_swiglu_ffn": "{p}.model (vit_giant_patch14_dinov2 has SwiGLU)",
           "num_register_tokens": "{p}.model (a *_reg4_* model) or {p}.arch.reg_tokens",
           "image_size": _NATIVE_SIZE_HINT},
    expected="a Dinov2Model / Dinov2WithRegistersModel checkpoint (embeddings.*, encoder.layer.*, layernorm.*)",
    absent={"num_register_tokens": 0},
)


# ----------------------------------------------------------------------------- SAM


def _sam_convert(t: KeyTaker, c: Any, encoder: nn.Module) -> State:
    out: State = {"pos_embed": t.take("pos_embed")}
    t.rename({"patch_embed.projection": "patch_embed.proj", "neck.layer_norm1": "neck.1",
              "neck.layer_norm2": "neck.3"}, out)
    t.rename({"neck.conv1": "neck.0", "neck.conv2": "neck.2"}, out, suffixes=("weight",))
    for i in range(c.num_hidden_layers):
        src, dst = f"layers.{i}.", f"blocks.{i}."
        t.rename({src + "layer_norm1": dst + "norm1", src + "attn.qkv": dst + "attn.qkv",
                  src + "attn.proj": dst + "attn.proj", src + "layer_norm2": dst + "norm2",
                  src + "mlp.lin1": dst + "mlp.lin1", src + "mlp.lin2": dst + "mlp.lin2"}, out)
        if getattr(c, "use_rel_pos", True):
            for axis in ("h", "w"):
                out[f"{dst}attn.rel_pos_{axis}"] = t.take(f"{src}attn.rel_pos_{axis}")
    return {k: v for k, v in out.items() if v is not None}


def _sam_facts(enc: Any) -> Dict[str, Any]:
    kw = enc.arch_kwargs
    norm = kw["norm_layer"]
    act = kw.get("act_layer", nn.GELU)
    return dict(hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"], num_attention_heads=kw["num_heads"],
                global_attn_indexes=list(kw["global_attn_indexes"]), window_size=kw["window_size"],
                output_channels=kw["out_chans"], patch_size=kw["patch_size"], image_size=kw["img_size"],
                mlp_dim=int(kw["embed_dim"] * kw["mlp_ratio"]), qkv_bias=kw["qkv_bias"], use_rel_pos=kw["use_rel_pos"],
                use_abs_pos=kw.get("use_abs_pos", True), hidden_act=act_name(act()),
                layer_norm_eps=getattr(norm, "keywords", {}).get("eps", 1e-5))


SAM = HFFamily(
    label="SAM", model_types={"sam": "vision_config", "sam_vision_model": None}, prefix="vision_encoder.",
    other_parts=("prompt_encoder.", "mask_decoder.", "shared_image_embedding."), unused={},
    convert=_sam_convert, facts=_sam_facts,
    hints={name: f"{{p}}.model / {{p}}.arch.{arg}" for name, arg in (
        ("hidden_size", "embed_dim"), ("num_hidden_layers", "depth"), ("num_attention_heads", "num_heads"),
        ("global_attn_indexes", "global_attn_indexes"), ("window_size", "window_size"),
        ("output_channels", "out_chans"), ("patch_size", "patch_size"), ("mlp_dim", "mlp_ratio"),
        ("qkv_bias", "qkv_bias"), ("use_rel_pos", "use_rel_pos"), ("use_abs_pos", "use_abs_pos"),
        ("hidden_act", "act_layer"))} | {"image_size": "{p}.image_size (SAM position embeddings are not resampled)"},
    expected="a SamModel checkpoint (vision_encoder.*; prompt_encoder.* and mask_decoder.* are skipped)",
)

FAMILIES: Dict[str, HFFamily] = {"clip": CLIP, "siglip": SIGLIP, "dinov2": DINOV2, "sam": SAM}


def _require(enc: Any, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"encoders.{enc.name}.pretrained: a Hugging Face {enc.encoder_type} checkpoint loads into "
                         f"{what}; {enc.cfg.model!r} builds a {type(enc.model).__name__}")


def _native(size: Any) -> int:
    return int(size[-1]) if isinstance(size, (list, tuple)) else int(size)
