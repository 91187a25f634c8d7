"""Hugging Face checkpoints into fusion's upstream modules, against transformers itself.

Each family: a ``transformers`` model from a small random config (its parameters
perturbed so no bias or layer scale is left at an init constant), saved with
``save_pretrained``, loaded by fusion (``pretrained: <folder>``), and fusion's encoder grid
compared with the transformers model's own hidden state of the same layer (prefix tokens
dropped, no final norm) at <= 1e-5 relative error in fp32. Then the strictness: config.json
disagreements, missing / unexpected keys, the wrong family, other file layouts,
``hf:<repo>`` through the hub cache (offline).
"""
import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion.config import EncoderConfig
from fusion.encoders.registry import get_encoder_class
from fusion.encoders.sources import WeightsUnavailable, file_sha256
from weights_helpers import isolated_caches, put_in_hub_cache, unpruned

transformers = pytest.importorskip("transformers")

TOL = 1e-5
TEXT = dict(layers=1, width=32, heads=2, vocab_size=64, context_length=8)
CLIP_ARCH = dict(quick_gelu=True, embed_dim=16, vision_cfg=dict(layers=3, width=64, head_width=32), text_cfg=TEXT)
SIGLIP_ARCH = dict(timm_act_layer="gelu_tanh", embed_dim=32, vision_cfg=dict(timm_model_name="fusion_test_siglip"),
                   text_cfg=TEXT)
DINO_ARCH = dict(embed_dim=48, depth=3, num_heads=2)
SAM_ARCH = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=3, out_chans=32)


def rel_err(out, ref):
    """max |out - ref| / max |ref| (printed: the parity figures with ``pytest -s``)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    print(f"relative error {err:.3g} on {tuple(ref.shape)}")
    return err


def perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def build(type_, model, folder, **kw):
    cfg = EncoderConfig(name=type_, type=type_, model=model, pretrained=str(folder), **kw)
    return get_encoder_class(type_)(cfg)


def build_unpruned(type_, model, folder, **kw):
    """``build`` keeping the whole upstream model (final norms, pooling and projection heads),
    to check that the key maps carry those too (the tower itself drops them after loading)."""
    with unpruned():
        return build(type_, model, folder, **kw)


def clip_vision_config(**kw):
    return transformers.CLIPVisionConfig(**{**dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                                   num_attention_heads=2, image_size=224, patch_size=16,
                                                   projection_dim=16), **kw})


def siglip_vision_config(**kw):
    return transformers.SiglipVisionConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                     num_attention_heads=2, image_size=224, patch_size=16), **kw})


def save(model, folder, **kw):
    model.save_pretrained(folder, **kw)
    return folder


@contextlib.contextmanager
def layer_outputs(layers):
    """Collect each of ``layers``' outputs (its first element when a layer returns a tuple)."""
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


# ----------------------------------------------------------------------------- parity per family


@pytest.mark.parametrize("arch, layer", [("CLIPVisionModel", -2), ("CLIPVisionModel", -1), ("CLIPModel", -2)])
def test_clip_parity(tmp_path, arch, layer):
    vision = clip_vision_config()
    if arch == "CLIPModel":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        hf = perturbed(transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision.to_dict(),
                                                                      text_config=text, projection_dim=16)))
        tower = hf.vision_model
    else:
        hf = tower = perturbed(transformers.CLIPVisionModel(vision))
    enc = build("clip", "ViT-B-16", save(hf, tmp_path / "hf"), layer=layer, arch=CLIP_ARCH)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = enc(x)
        hidden = tower(pixel_values=x, output_hidden_states=True).hidden_states[layer]
        assert rel_err(out, hidden[:, 1:].reshape(2, 14, 14, 64)) <= TOL
        full = build_unpruned("clip", "ViT-B-16", tmp_path / "hf", layer=layer, arch=CLIP_ARCH)
        if arch == "CLIPModel":  # the projection head maps too: open_clip's pooled output = get_image_features
            assert rel_err(full.model(x), hf.get_image_features(pixel_values=x).pooler_output) <= TOL
    assert enc.loaded_weights.kind == "hf" and enc.loaded_weights.files == (str(tmp_path / "hf" / "model.safetensors"),)
    has_head_note = any("no CLIP projection/pooling head" in n for n in enc.loaded_weights.notes)
    assert has_head_note == (arch == "CLIPVisionModel") and (full.model.proj is None) == has_head_note
    assert enc.model.proj is None  # the tower never runs the head: pruned after loading


@pytest.mark.parametrize("arch", ["SiglipVisionModel", "SiglipModel"])
def test_siglip_parity(tmp_path, arch):
    vision = siglip_vision_config()
    if arch == "SiglipModel":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
        hf = perturbed(transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision.to_dict(),
                                                                          text_config=text)))
        tower = hf.vision_model
    else:
        hf = tower = perturbed(transformers.SiglipVisionModel(vision))
    enc = build("siglip", "ViT-B-16-SigLIP", save(hf, tmp_path / "hf"), layer=-1, arch=SIGLIP_ARCH)
    x = torch.randn(2, 3, 224, 224)
    layers = next(m for name, m in tower.named_modules() if name.endswith("encoder.layers"))
    with torch.no_grad(), layer_outputs(layers) as outputs:
        # the last encoder layer's output, read by a hook: transformers releases differ in which
        # module collects hidden_states (5.4 only the outermost model)
        got = tower(pixel_values=x)
        assert rel_err(enc(x), outputs[-1].reshape(2, 14, 14, 64)) <= TOL
        trunk = build_unpruned("siglip", "ViT-B-16-SigLIP", tmp_path / "hf", layer=-1, arch=SIGLIP_ARCH).model.trunk
        # the MAP head maps too: timm's pooled output = transformers' pooler_output
        assert rel_err(trunk.forward_head(trunk.forward_features(x)), got.pooler_output) <= TOL


def test_siglip_without_head_and_activation_mismatch(tmp_path):
    hf = perturbed(transformers.SiglipVisionModel(siglip_vision_config(vision_use_head=False)))
    enc = build("siglip", "ViT-B-16-SigLIP", save(hf, tmp_path / "hf"), arch=SIGLIP_ARCH)
    assert enc.model.trunk.attn_pool is None and "no SigLIP projection/pooling head" in enc.loaded_weights.notes[0]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(enc(x), hf(pixel_values=x, output_hidden_states=True).hidden_states[-1].reshape(1, 14, 14, 64)) <= TOL
    # timm's SigLIP trunks use plain GELU, Hugging Face's gelu_pytorch_tanh: the config must say which
    plain = {k: v for k, v in SIGLIP_ARCH.items() if k != "timm_act_layer"}
    with pytest.raises(ValueError, match=r"hidden_act: config\.json 'gelu_pytorch_tanh' vs fusion 'gelu' "
                                         r"\(set by encoders\.siglip\.arch\.timm_act_layer"):
        build("siglip", "ViT-B-16-SigLIP", tmp_path / "hf", arch=plain)


@pytest.mark.parametrize("arch, model, extra", [
    ("Dinov2Model", "vit_small_patch14_dinov2", {}),
    ("Dinov2WithRegistersModel", "vit_small_patch14_reg4_dinov2", dict(num_register_tokens=4)),
    ("Dinov2Model", "vit_giant_patch14_dinov2", dict(use_swiglu_ffn=True)),  # DINOv2-g's SwiGLU FFN
], ids=["dinov2", "dinov2-registers", "dinov2-swiglu"])
def test_dinov2_parity(tmp_path, arch, model, extra, layer=-2):
    config_cls = transformers.Dinov2WithRegistersConfig if "Registers" in arch else transformers.Dinov2Config
    config = config_cls(hidden_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=518, patch_size=14,
                        **extra)
    hf = perturbed(getattr(transformers, arch)(config))
    enc = build("dinov2", model, save(hf, tmp_path / "hf"), layer=layer, image_size=518, arch=DINO_ARCH)
    prefix = 1 + extra.get("num_register_tokens", 0)
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        got = hf(pixel_values=x, output_hidden_states=True)
        assert rel_err(enc(x), got.hidden_states[layer][:, prefix:].reshape(1, 37, 37, 48)) <= TOL
        # the final norm maps too: timm's forward_features (CLS, registers, patches) = last_hidden_state
        full = build_unpruned("dinov2", model, tmp_path / "hf", layer=layer, image_size=518, arch=DINO_ARCH)
        assert rel_err(full.model.forward_features(x), got.last_hidden_state) <= TOL


def test_sam_parity(tmp_path):
    vision = transformers.SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          global_attn_indexes=[1], window_size=3, output_channels=32,
                                          image_size=96, mlp_dim=128)
    hf = perturbed(transformers.SamModel(transformers.SamConfig(vision_config=vision.to_dict())))
    enc = build("sam", "vit_b", save(hf, tmp_path / "hf"), image_size=96, arch=SAM_ARCH)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert rel_err(enc(x), hf.get_image_embeddings(pixel_values=x).permute(0, 2, 3, 1)) <= TOL


@pytest.mark.slow
def test_llava15_geometry_matches_llava_feature_selection(tmp_path):
    """CLIP ViT-L/14-336 (random weights) as LLaVA-1.5 loads it (CLIPVisionModel), into the
    llava15 preset: fusion's tokens = LLaVA's ``hidden_states[-2][:, 1:]`` on the same pixels."""
    import fusion

    config = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14,
                                           projection_dim=768, hidden_act="quick_gelu")
    hf = perturbed(transformers.CLIPVisionModel(config))
    save(hf, tmp_path / "hf")
    tower = fusion.build_tower("llava15", {"encoders.clip.pretrained": str(tmp_path / "hf")})
    pixels = torch.rand(1, 3, 336, 336)  # already 336 px: the tower's resize is the identity
    mean = torch.tensor(tower.encoders["clip"].mean).view(1, 3, 1, 1)
    std = torch.tensor(tower.encoders["clip"].std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = tower(pixels)
        llava = hf(pixel_values=(pixels - mean) / std, output_hidden_states=True).hidden_states[-2][:, 1:]
    err = rel_err(tokens, llava)
    assert tokens.shape == (1, 576, 1024) and err <= TOL


# ----------------------------------------------------------------------------- strictness


def test_config_mismatches_are_listed_with_both_values(tmp_path):
    save(perturbed(transformers.CLIPVisionModel(clip_vision_config(num_hidden_layers=2))), tmp_path / "hf")
    arch = {k: v for k, v in CLIP_ARCH.items() if k != "quick_gelu"}
    with pytest.raises(ValueError) as info:
        build("clip", "ViT-B-16", tmp_path / "hf", arch=arch)
    msg = str(info.value)
    assert msg.startswith(f"encoders.clip.pretrained: '{tmp_path / 'hf' / 'config.json'}' disagrees with the fusion config")
    assert ("num_hidden_layers: config.json 2 vs fusion 3 (set by encoders.clip.arch.vision_cfg.layers)" in msg
            and "hidden_act: config.json 'quick_gelu' vs fusion 'gelu' (set by encoders.clip.arch.quick_gelu)" in msg)


def test_native_image_size_and_registers_must_match(tmp_path):
    save(perturbed(transformers.CLIPVisionModel(clip_vision_config(image_size=336))), tmp_path / "clip")
    with pytest.raises(ValueError, match=r"image_size: config\.json 336 vs fusion 224 \(set by encoders\.clip\.model"):
        build("clip", "ViT-B-16", tmp_path / "clip", arch=CLIP_ARCH)
    config = transformers.Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=2,
                                                    image_size=518, patch_size=14, num_register_tokens=4)
    save(transformers.Dinov2WithRegistersModel(config), tmp_path / "dino")
    with pytest.raises(ValueError, match=r"num_register_tokens: config\.json 4 vs fusion 0"):
        build("dinov2", "vit_small_patch14_dinov2", tmp_path / "dino", image_size=518, arch=DINO_ARCH)


def test_wrong_family_names_the_accepted_model_types(tmp_path):
    save(transformers.SiglipVisionModel(siglip_vision_config()), tmp_path / "hf")
    with pytest.raises(ValueError, match=r"holds a 'siglip_vision_model' model \(SiglipVisionModel\); "
                                         r"encoders\.clip\.type 'clip' reads CLIP checkpoints with model_type "
                                         r"\['clip', 'clip_vision_model'\]"):
        build("clip", "ViT-B-16", tmp_path / "hf", arch=CLIP_ARCH)


def test_every_key_is_used_once_and_none_is_missing(tmp_path):
    folder = save(transformers.CLIPVisionModel(clip_vision_config()), tmp_path / "hf")
    state = load_file(str(folder / "model.safetensors"))
    # the key layout transformers saves differs between releases ('vision_model.' prefix or not)
    victim = next(k for k in state if k.endswith("encoder.layers.1.mlp.fc1.weight"))
    state.pop(victim)
    state[victim.replace("fc1.weight", "extra")] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"encoders\.clip\.pretrained: .* does not fit the key map: 1 missing key "
                                         r"\('(vision_model\.)?encoder\.layers\.1\.mlp\.fc1\.weight'\); 1 unexpected key "
                                         r"\('(vision_model\.)?encoder\.layers\.1\.mlp\.extra'\)\. It should hold a CLIPModel"):
        build("clip", "ViT-B-16", folder, arch=CLIP_ARCH)


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded"])
def test_other_weight_layouts_give_the_same_encoder(tmp_path, layout):
    hf = perturbed(transformers.CLIPVisionModel(clip_vision_config()))
    single = build("clip", "ViT-B-16", save(hf, tmp_path / "single"), arch=CLIP_ARCH)
    if layout == "sharded":
        folder = save(hf, tmp_path / "sharded", max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        folder = save(hf, tmp_path / "bin")
        torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    enc = build("clip", "ViT-B-16", folder, arch=CLIP_ARCH)
    assert all(torch.equal(v, single.model.state_dict()[k]) for k, v in enc.model.state_dict().items())
    shards = (set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
              if layout == "sharded" else {"pytorch_model.bin"})
    assert [p.rsplit("/", 1)[-1] for p in enc.loaded_weights.files] == sorted(shards)


def test_hf_repo_reads_the_hub_cache_offline(tmp_path, monkeypatch):
    caches = isolated_caches(monkeypatch, tmp_path)
    folder = save(perturbed(transformers.CLIPVisionModel(clip_vision_config())), tmp_path / "hf")
    for name in ("config.json", "model.safetensors"):
        cached = put_in_hub_cache(caches["hf"], "someone/tiny-clip", name, folder / name)
    enc = get_encoder_class("clip")(EncoderConfig(name="clip", type="clip", model="ViT-B-16",
                                                  pretrained="hf:someone/tiny-clip", arch=CLIP_ARCH))
    local = build("clip", "ViT-B-16", folder, arch=CLIP_ARCH)
    assert all(torch.equal(v, local.model.state_dict()[k]) for k, v in enc.model.state_dict().items())
    report = enc.loaded_weights.report()
    assert report["pretrained"] == "hf:someone/tiny-clip" and report["files"] == [str(cached)]
    assert report["folder"] == str(cached.parent) and report["sha256"] == file_sha256(str(cached))[:12]

    with pytest.raises(WeightsUnavailable) as info:  # offline, not in the cache
        get_encoder_class("clip")(EncoderConfig(name="clip", type="clip", model="ViT-B-16",
                                                pretrained="hf:someone/absent", arch=CLIP_ARCH))
    msg = str(info.value)
    assert "https://huggingface.co/someone/absent/resolve/main/config.json" in msg
    assert str(caches["hf"] / "models--someone--absent") in msg and "local file" in msg
