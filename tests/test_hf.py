"""fusion.hf with transformers' own Llava classes: a tiny random Llama, a tokenizer built
offline, the tiny tower. Checked against the tower built directly from fusion."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel, LlavaForConditionalGeneration  # noqa: E402

import fusion.hf as fhf  # noqa: E402
from fusion import build_tower, load_config  # noqa: E402
import fusion  # noqa: E402
from fusion.preprocess import EncoderInputs  # noqa: E402
from hf_helpers import NO_PROJECTOR, PROMPT, WORDS, language_model_inputs as _language_model_inputs  # noqa: E402
from hf_helpers import image as _image, text_config as _text_config, tokenizer as _tokenizer  # noqa: E402
from hf_helpers import assert_save_and_reload_round_trip  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def llava(tokenizer):
    torch.manual_seed(0)
    vision = fhf.FusionVisionConfig(tower="tiny", weights="random", seed=3)
    config = fhf.llava_config(vision, _text_config(), image_token_id=WORDS.index("<image>"))
    model = LlavaForConditionalGeneration(config).eval()
    processor = fhf.llava_processor(tokenizer, model.config.vision_config)
    return model, processor


@pytest.fixture(scope="module")
def reference_tower():
    """The same tower built by fusion alone (projector dropped, as the HF config does by default)."""
    return build_tower(load_config("tiny", NO_PROJECTOR), weights="random", seed=3).eval()


def test_vision_model_is_the_tower(reference_tower):
    config = AutoConfig.for_model("fusion_vision", tower="tiny", weights="random", seed=3)
    model = AutoModel.from_config(config).eval()
    assert isinstance(model, fhf.FusionVisionModel)
    pixels = torch.rand(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
        ref = reference_tower(pixels, return_dict=True)
        bare = model(pixels)
        as_tuple = model(pixels, return_dict=False)
    torch.testing.assert_close(out.last_hidden_state, ref.tokens, rtol=0, atol=0)
    n_enc = len(reference_tower.encoders)
    assert len(out.hidden_states) == n_enc + 2
    assert out.hidden_states[-1] is out.last_hidden_state
    for got, want in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(out.pooler_output, ref.tokens.mean(1))
    assert bare.hidden_states is None and len(as_tuple) == 2
    # geometry filled in from the tower: no projector -> hidden_size is the fused width
    assert config.hidden_size == reference_tower.merge.out_dim == sum(e.dim for e in reference_tower.encoders.values())
    assert config.num_patches == reference_tower.num_patches == 16
    assert config.image_size == reference_tower.image_processor.image_size
    assert (config.image_size // config.patch_size) ** 2 == config.num_patches


def test_keep_projector():
    kept = fhf.FusionVisionConfig(tower="tiny", weights="random", keep_projector=True).resolve_geometry()
    assert kept.tower_config_object().projector.type == "mlp2x_gelu" and kept.hidden_size == 64
    dropped = fhf.FusionVisionConfig(tower="tiny", weights="random")
    assert dropped.tower_config_object().projector.type == "none"


def test_config_round_trip_keeps_encoder_order_and_needs_no_file(tmp_path):
    # encoder order is the channel order of the fused tokens; config.json is written with sorted keys
    path = tmp_path / "tower.yaml"
    path.write_text(load_config("tiny", ["encoders.siglip=null", "fusion.grid=3"]).to_yaml())
    config = fhf.FusionVisionConfig(tower=str(path), weights="random")
    config.save_pretrained(tmp_path / "saved")
    path.unlink()  # the saved config holds the whole tower config
    loaded = AutoConfig.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded, fhf.FusionVisionConfig)
    assert list(loaded.tower_config_object().encoders) == ["clip", "sam", "dino"]
    assert loaded.tower_config_object() == config.tower_config_object()
    assert loaded.tower_config_object().fusion.grid == 3


def test_bad_config_values():
    with pytest.raises(ValueError, match="weights"):
        fhf.FusionVisionConfig(tower="tiny", weights="imagenet")
    with pytest.raises(ValueError, match="fusion.grd"):
        fhf.FusionVisionConfig(tower="tiny", overrides=["fusion.grd=3"])
    vision = fhf.FusionVisionConfig(tower="tiny", weights="random")
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        fhf.llava_config(vision, _text_config(), image_token_id=4, vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="vision_feature_layer"):
        fhf.llava_config(vision, _text_config(), image_token_id=4, vision_feature_layer=-2)
    with pytest.raises(ValueError, match="not supported"):
        fhf.FusionImageProcessor(image_size=32)(_image("grid.png"), do_resize=False)


def test_processor_counts_num_patches_and_matches_tower_processor(llava, reference_tower):
    model, processor = llava
    image = _image("portrait.png")
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == WORDS.index("<image>")).sum())
    assert n_image_tokens == reference_tower.num_patches == model.model.vision_tower.tower.num_patches
    torch.testing.assert_close(inputs["pixel_values"], reference_tower.image_processor(image)["pixel_values"],
                               rtol=0, atol=0)


def test_llava_forward_generate_and_image_matters(llava, reference_tower):
    model, processor = llava
    a = processor(images=_image("house.jpg"), text=PROMPT, return_tensors="pt")
    b = processor(images=_image("grid.png"), text=PROMPT, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    with torch.no_grad(), _language_model_inputs(model) as seen:
        out_a = model(**a)
        out_b = model(**b)
        # Llava's image features are its own projector applied to the tower's tokens
        expected = model.model.multi_modal_projector(reference_tower(a["pixel_values"]))
    # what the language model really receives at the image slots (read through a hook, not
    # through Llava's output dataclass, whose image fields change between transformers releases)
    image_slots = a["input_ids"][0] == WORDS.index("<image>")
    torch.testing.assert_close(seen[0][0, image_slots], expected[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(seen[0][0, image_slots], seen[1][0, image_slots])
    assert out_a.logits.shape == (1, a["input_ids"].shape[1], len(WORDS))
    assert (out_a.logits[0, -1] - out_b.logits[0, -1]).abs().max() > 1e-4  # another image, other logits
    with torch.no_grad():
        generated = model.generate(**a, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert generated.shape == (1, a["input_ids"].shape[1] + 3)
    assert torch.equal(generated[0, :a["input_ids"].shape[1]], a["input_ids"][0])
    assert generated[0, -3] == out_a.logits[0, -1].argmax()  # greedy: the first new token is the argmax


def test_sequence_concat_token_count_is_not_a_square(tokenizer):
    # 3 encoders x 4x4 = 48 tokens: the processor adds num_additional_image_tokens to (S // patch) ** 2
    vision = fhf.FusionVisionConfig(tower="tiny", weights="random", overrides=[
        "encoders.sam=null", "fusion.combine=sequence_concat", "fusion.width=32"])
    model = LlavaForConditionalGeneration(fhf.llava_config(vision, _text_config(), image_token_id=4)).eval()
    processor = fhf.llava_processor(tokenizer, model.config.vision_config)
    inputs = processor(images=_image("gray.png"), text=PROMPT, return_tensors="pt")
    assert int((inputs["input_ids"] == 4).sum()) == 48 == vision.num_patches
    with torch.no_grad():  # Llava itself refuses a count that differs from the features
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_save_and_from_pretrained_round_trip(llava, tmp_path):
    model, processor = llava
    inputs = processor(images=_image("house.jpg"), text=PROMPT, return_tensors="pt")
    loaded = assert_save_and_reload_round_trip(model, processor, LlavaForConditionalGeneration, _image("house.jpg"),
                                               tmp_path)
    tower = loaded.model.vision_tower.tower
    # the loader re-creates parameters: frozen encoders must come back frozen
    for enc in tower.encoders.values():
        assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    assert all(p.requires_grad for p in tower.merge.parameters())
    # bf16 loading: runs, close to fp32; the normalisation constants stay exact float32
    low = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    stats = [b for m in low.modules() if isinstance(m, EncoderInputs) for b in m.buffers()]
    assert stats and all(b.dtype == torch.float32 for b in stats)
    with torch.no_grad():
        ref = model(**inputs).logits
        out = low(**inputs).logits.float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("overrides", [["processor.pad_color=[10, 200, 30]"],
                                       ["processor.pad_color=sam", "processor.mean_from=clip"]])
def test_hf_image_processor_pads_with_the_towers_frame_colour(overrides, tmp_path):
    """The HF image processor, built from the tower or from the config alone (and reloaded),
    letterboxes with the tower's own frame colour, so its pixel_values equal
    tower.image_processor's; before, it padded with int(255 * image_mean) whatever
    processor.pad_color / mean_from said."""
    tower = fusion.build_tower("tiny", overrides, weights="random")
    image = _image("portrait.png")
    want = tower.image_processor(image)["pixel_values"]
    assert want[0, :, 0, 0].mul(255).round().tolist() == list(tower.image_processor.pad_color)  # a padded corner
    config = fhf.FusionVisionConfig(tower="tiny", overrides=overrides, weights="random")
    for proc in (fhf.FusionImageProcessor.from_tower(tower), fhf.FusionImageProcessor.from_vision_config(config)):
        torch.testing.assert_close(proc(image, return_tensors="pt")["pixel_values"], want, rtol=0, atol=0)
        proc.save_pretrained(tmp_path / "proc")
        again = fhf.FusionImageProcessor.from_pretrained(tmp_path / "proc")
        torch.testing.assert_close(again(image, return_tensors="pt")["pixel_values"], want, rtol=0, atol=0)
