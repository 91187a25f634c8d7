"""transformers' own contracts for fusion.hf's FusionVisionModel inside Llava: weights a checkpoint
lacks, ``output_hidden_states`` indices, ``output_attentions``, attention implementations,
``_no_split_modules``. Each is checked against an independent value: the tower built by
fusion alone, a hand-listed set of upstream block classes, transformers' own device-map
inference."""
import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, LlavaForConditionalGeneration  # noqa: E402

import fusion.hf as fhf  # noqa: E402
from fusion import build_tower, load_config  # noqa: E402
from hf_helpers import IMAGE_TOKEN_ID, NO_PROJECTOR, PROMPT, image, language_model_inputs, text_config, tokenizer  # noqa: E402,E501
from weights_helpers import unpruned  # noqa: E402

SEED = 3


def _llava(overrides=None, weights="random"):
    torch.manual_seed(0)
    vision = fhf.FusionVisionConfig(tower="tiny", overrides=overrides, weights=weights, seed=SEED)
    return LlavaForConditionalGeneration(fhf.llava_config(vision, text_config(), image_token_id=IMAGE_TOKEN_ID)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny fusion Llava saved with save_pretrained, and its inputs."""
    folder = tmp_path_factory.mktemp("llava")
    model = _llava()
    model.save_pretrained(folder)
    processor = fhf.llava_processor(tokenizer(), model.config.vision_config)
    inputs = processor(images=image("house.jpg"), text=PROMPT, return_tensors="pt")
    return folder, model, inputs


def _rewrite_checkpoint(folder, out, keep, scale=None):
    """Copy the checkpoint in ``folder`` to ``out`` keeping the keys ``keep(key)`` accepts (and
    multiplying those ``scale(key)`` names by 2)."""
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    state = {k: (v * 2 if scale and scale(k) else v) for k, v in state.items() if keep(k)}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return state


def test_checkpoint_without_the_tower_takes_the_tower_from_the_config(saved, tmp_path):
    folder, model, inputs = saved
    _rewrite_checkpoint(folder, tmp_path / "no_tower", keep=lambda k: "vision_tower" not in k)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "no_tower").eval()
    # the config says: tiny preset (no pretrained sources), weights="random", seed 3
    reference = build_tower(load_config("tiny", NO_PROJECTOR), weights="random", seed=SEED)
    got = loaded.model.vision_tower.tower.state_dict()
    assert got.keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert all(not p.requires_grad for e in loaded.model.vision_tower.tower.encoders.values() for p in e.parameters())


def test_only_what_the_checkpoint_lacks_is_filled(saved, tmp_path):
    folder, model, _ = saved
    # drop DINO's weights and double CLIP's in the checkpoint: CLIP must keep the checkpoint's values
    state = _rewrite_checkpoint(folder, tmp_path / "partial", keep=lambda k: ".encoders.dino." not in k,
                                scale=lambda k: ".encoders.clip." in k)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "partial").eval()
    tower = loaded.model.vision_tower.tower
    # the key layout Llava saves differs between transformers releases: match on the tower's own names
    saved_clip = {k.split(".encoders.clip.", 1)[1]: v for k, v in state.items() if ".encoders.clip." in k}
    assert saved_clip.keys() == tower.encoders["clip"].state_dict().keys()
    for name, value in tower.encoders["clip"].state_dict().items():
        torch.testing.assert_close(value, saved_clip[name], rtol=0, atol=0)
    reference = build_tower(load_config("tiny", NO_PROJECTOR), weights="random", seed=SEED)
    for name, value in reference.encoders["dino"].state_dict().items():
        torch.testing.assert_close(tower.encoders["dino"].state_dict()[name], value, rtol=0, atol=0)


def test_missing_encoder_comes_from_its_pretrained_source(tmp_path):
    # DINO's pretrained source is a local file: a checkpoint lacking DINO must take it from that file
    with unpruned():  # the file holds the whole timm model, as a real DINOv2 checkpoint does
        source = build_tower("tiny", weights="random", seed=99).encoders["dino"].model.state_dict()
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    model = _llava(overrides=[f"encoders.dino.pretrained={path}"], weights="pretrained")
    model.save_pretrained(tmp_path / "full")
    _rewrite_checkpoint(tmp_path / "full", tmp_path / "no_dino", keep=lambda k: ".encoders.dino." not in k)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "no_dino")
    got = loaded.model.vision_tower.tower.encoders["dino"].model.state_dict()
    assert set(got) < set(source)  # the tower keeps the blocks it runs
    for name, value in got.items():
        torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)


def test_output_hidden_states_index_keeps_only_that_one():
    model = AutoModel.from_config(fhf.FusionVisionConfig(tower="tiny", weights="random")).eval()
    pixels = torch.rand(1, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        every = model(pixels, output_hidden_states=True).hidden_states
        last = model(pixels, output_hidden_states=-1)
        pair = model(pixels, output_hidden_states=[-2, 0]).hidden_states
    n = len(every)
    assert n == 6  # four encoder grids, the fused tokens, the tokens
    assert len(last.hidden_states) == n and [h is None for h in last.hidden_states] == [True] * (n - 1) + [False]
    torch.testing.assert_close(last.hidden_states[-1], last.last_hidden_state, rtol=0, atol=0)
    assert [i for i, h in enumerate(pair) if h is not None] == [0, n - 2]
    torch.testing.assert_close(pair[0], every[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"output_hidden_states: \[6\] out of range.*-6\.\.5"):
        model(pixels, output_hidden_states=6)


def test_llava_keeps_only_the_hidden_states_it_asks_for(saved):
    _, model, inputs = saved
    asked, seen = [], []
    tower = model.model.vision_tower
    hooks = [tower.register_forward_pre_hook(lambda m, a, kw: asked.append(kw.get("output_hidden_states")),
                                             with_kwargs=True),
             tower.register_forward_hook(lambda m, a, out: seen.append(out.hidden_states))]
    try:
        with torch.no_grad(), language_model_inputs(model) as embeds:
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    kept = [h for h in seen[0] if h is not None]
    # Llava 5.24 asks for the one layer it reads (vision_feature_layer=-1); earlier 5.x releases ask for all
    assert asked[0] in (-1, True)
    assert len(kept) == (1 if asked[0] == -1 else 6)
    kept = [seen[0][-1]]
    slots = inputs["input_ids"][0] == IMAGE_TOKEN_ID
    torch.testing.assert_close(embeds[0][0, slots], model.model.multi_modal_projector(kept[0])[0], rtol=1e-5,
                               atol=1e-6)


def test_output_attentions_is_a_clear_error():
    model = AutoModel.from_config(fhf.FusionVisionConfig(tower="tiny", weights="random")).eval()
    with pytest.raises(ValueError, match="output_attentions: a multi-encoder tower returns no attention maps"):
        model(torch.rand(1, 3, 98, 98), output_attentions=True)


def test_attention_implementations_declared(saved):
    _, model, inputs = saved
    assert model.model.vision_tower.config._attn_implementation == "eager"  # default build: the tower's own
    config = fhf.FusionVisionConfig(tower="tiny", weights="random")
    for impl in ("sdpa", "flex_attention"):
        with pytest.raises(ValueError, match=f"attn_implementation: .*cannot switch to '{impl}'.*'vision_config': "
                                             f"'eager'"):
            AutoModel.from_config(config, attn_implementation=impl)
    mixed = LlavaForConditionalGeneration.from_pretrained(
        saved[0], attn_implementation={"text_config": "sdpa", "vision_config": "eager"}).eval()
    assert mixed.model.language_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(mixed(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_no_split_modules_are_the_encoder_blocks(saved):
    _, model, _ = saved
    # open_clip's (CLIP) ResidualAttentionBlock; timm's (SigLIP, DINOv2) and segment_anything's (SAM) Block
    assert set(model.model.vision_tower._no_split_modules) == {"Block", "ResidualAttentionBlock"}
    assert {"Block", "ResidualAttentionBlock"} <= set(model._no_split_modules)
    # and they are exactly the classes of the encoders' repeated blocks (open_clip's resblocks, timm's and
    # SAM's blocks), so accelerate's device_map="auto" keeps each block on one device
    tower = model.model.vision_tower.tower
    listed = {"clip": "transformer.resblocks", "siglip": "trunk.blocks", "sam": "blocks", "dino": "blocks"}
    for name, path in listed.items():
        blocks = tower.encoders[name].model.get_submodule(path)
        assert len(blocks) >= 2 and {type(b).__name__ for b in blocks} <= set(model._no_split_modules)


def test_ignore_mismatched_sizes_takes_the_config_value(saved, tmp_path):
    folder, _, _ = saved
    out = tmp_path / "mismatched"
    state = _rewrite_checkpoint(folder, out, keep=lambda k: True)
    key = "vision_tower.tower.encoders.clip.model.conv1.weight"
    state[key] = torch.ones(8, 3, 16, 16)  # another shape than the tiny CLIP's [64, 3, 16, 16]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    loaded = LlavaForConditionalGeneration.from_pretrained(out, ignore_mismatched_sizes=True)
    reference = build_tower(load_config("tiny", NO_PROJECTOR), weights="random", seed=SEED)
    torch.testing.assert_close(loaded.model.vision_tower.tower.encoders["clip"].model.conv1.weight,
                               reference.encoders["clip"].model.conv1.weight, rtol=0, atol=0)
