"""fusion.hf with transformers' own LLaVA-NeXT (LlavaNextForConditionalGeneration and its processor):
LLaVA-1.6's anyres tiles of the tiny tower. The image features are checked against a layout
written out by hand here from the tower built by fusion alone."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlavaNextForConditionalGeneration  # noqa: E402

import fusion.hf as fhf  # noqa: E402
from fusion import build_tower, load_config  # noqa: E402
from hf_helpers import assert_save_and_reload_round_trip  # noqa: E402
from hf_helpers import IMAGE_TOKEN_ID, NO_PROJECTOR, PROMPT, image, language_model_inputs, text_config, tokenizer  # noqa: E402,E501

S, G = 98, 4  # the tiny tower's input side and fused grid
PINPOINTS = [[98, 196], [196, 98], [196, 196], [294, 98], [98, 294]]  # LLaVA-1.6's layout in tiles of 98


@pytest.fixture(scope="module")
def llava_next():
    torch.manual_seed(0)
    vision = fhf.FusionVisionConfig(tower="tiny", weights="random", seed=3)
    config = fhf.llava_next_config(vision, text_config(), image_token_id=IMAGE_TOKEN_ID)
    model = LlavaNextForConditionalGeneration(config).eval()
    processor = fhf.llava_next_processor(tokenizer(), model.config.vision_config, config.image_grid_pinpoints)
    return model, processor


@pytest.fixture(scope="module")
def reference_tower():
    return build_tower(load_config("tiny", NO_PROJECTOR), weights="random", seed=3).eval()


def best_tiles(height, width):
    """LLaVA-1.6's choice of pinpoint (the largest effective resolution, then the least waste),
    as (tile rows, tile columns)."""
    def score(hw):
        scale = min(hw[0] / height, hw[1] / width)
        effective = min(int(height * scale) * int(width * scale), height * width)
        return effective, -hw[0] * hw[1]
    h, w = max(PINPOINTS, key=score)
    return h // S, w // S


def expected_features(features, height, width, newline):
    """``features [1 + tiles, G*G, C]`` (the base image first) -> what LLaVA-NeXT puts at the image
    tokens: the base grid, then the stitched tile grid without its padding rows or columns, each
    row ending with ``newline``."""
    rows, cols = best_tiles(height, width)
    big_h, big_w = rows * G, cols * G
    cell = [[features[1 + (r // G) * cols + c // G, (r % G) * G + c % G] for c in range(big_w)] for r in range(big_h)]
    keep_r, keep_c = range(big_h), range(big_w)
    if width / height > big_w / big_h:  # the image filled the width: padding above and below
        pad = (big_h - int(height * (big_w / width))) // 2
        keep_r = range(pad, big_h - pad)
    else:
        pad = (big_w - int(width * (big_h / height))) // 2
        keep_c = range(pad, big_w - pad)
    out = [features[0]] + [torch.stack([cell[r][c] for c in keep_c] + [newline]) for r in keep_r]
    return torch.cat(out)


def test_default_pinpoints_are_llava16s_layout():
    vision = fhf.FusionVisionConfig(tower="tiny", weights="random")
    config = fhf.llava_next_config(vision, text_config(), image_token_id=IMAGE_TOKEN_ID)
    assert config.image_grid_pinpoints == PINPOINTS
    assert config.vision_feature_layer == -1 and config.vision_feature_select_strategy == "full"
    vision = fhf.FusionVisionConfig(tower="tiny", overrides=["processor.size=336"], weights="random")
    config = fhf.llava_next_config(vision, text_config(), image_token_id=IMAGE_TOKEN_ID)
    assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.mark.parametrize("name, tokens", [("house.jpg", 16 + 6 * (8 + 1)), ("portrait.png", 16 + 8 * (6 + 1))])
def test_image_token_count(llava_next, name, tokens):
    # house 640x480 and portrait 400x600 -> 2x2 tiles, an 8x8 grid; unpadding leaves 6 rows of 8
    # (house) or 8 rows of 6 (portrait), each row ends with a newline; plus the 4x4 base image
    _, processor = llava_next
    im = image(name)
    inputs = processor(images=im, text=PROMPT, return_tensors="pt")
    rows, cols = best_tiles(im.height, im.width)
    assert inputs["pixel_values"].shape[1:] == (1 + rows * cols, 3, S, S)
    assert inputs["image_sizes"].tolist() == [[im.height, im.width]]
    features = torch.arange(1 + rows * cols).repeat_interleave(G * G).view(-1, G * G, 1).float()
    expected = len(expected_features(features, im.height, im.width, torch.zeros(1)))
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == expected == tokens


def test_forward_features_generate(llava_next, reference_tower):
    model, processor = llava_next
    im = image("house.jpg")
    inputs = processor(images=im, text=PROMPT, return_tensors="pt")
    other = processor(images=image("grid.png").resize((640, 480)), text=PROMPT, return_tensors="pt")
    with torch.no_grad(), language_model_inputs(model) as seen:
        out = model(**inputs)
        out_other = model(**other)
        tiles = inputs["pixel_values"][0]
        features = model.model.multi_modal_projector(reference_tower(tiles))
        expected = expected_features(features, im.height, im.width, model.model.image_newline)
    slots = inputs["input_ids"][0] == IMAGE_TOKEN_ID
    torch.testing.assert_close(seen[0][0, slots], expected, rtol=1e-5, atol=1e-6)
    assert (out.logits[0, -1] - out_other.logits[0, -1]).abs().max() > 1e-4  # another image, other logits
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    n = inputs["input_ids"].shape[1]
    assert generated.shape == (1, n + 3) and torch.equal(generated[0, :n], inputs["input_ids"][0])
    assert generated[0, n] == out.logits[0, -1].argmax()


def test_batch_of_two_layouts(llava_next):
    model, processor = llava_next
    ims = [image("house.jpg"), image("portrait.png")]
    inputs = processor(images=ims, text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    with torch.no_grad():
        both = model(**inputs).logits
        for b, im in enumerate(ims):
            alone = processor(images=im, text=PROMPT, return_tensors="pt")
            mask = inputs["attention_mask"][b].bool()
            torch.testing.assert_close(both[b, mask][-1], model(**alone).logits[0, -1], rtol=1e-4, atol=1e-5)


def test_save_and_from_pretrained_round_trip(llava_next, tmp_path):
    model, processor = llava_next
    assert_save_and_reload_round_trip(model, processor, LlavaNextForConditionalGeneration, image("portrait.png"),
                                      tmp_path)


def test_bad_geometry_is_refused():
    text = text_config()
    levels = fhf.FusionVisionConfig(tower="tiny", overrides=["fusion.levels=[2]"], weights="random")
    with pytest.raises(ValueError, match=r"LlavaNext .*4x4 grid.*fusion\.levels=\[2\]"):
        fhf.llava_next_config(levels, text, image_token_id=IMAGE_TOKEN_ID)
    concat = fhf.FusionVisionConfig(tower="tiny", overrides=["fusion.combine=sequence_concat", "fusion.width=32"],
                                    weights="random")
    with pytest.raises(ValueError, match=r"fusion\.combine=sequence_concat"):
        fhf.llava_next_processor(tokenizer(), concat)
    vision = fhf.FusionVisionConfig(tower="tiny", weights="random")
    with pytest.raises(ValueError, match=r"image_grid_pinpoints: \[\[336, 672\]\] are not positive multiples of "
                                         r"the tower's tile size 98"):
        fhf.llava_next_config(vision, text, image_token_id=IMAGE_TOKEN_ID, image_grid_pinpoints=[[98, 196], [336, 672]])
    odd = fhf.FusionVisionConfig(tower="tiny", overrides=["fusion.grid=40"], weights="random")  # 98 // 2 = 49
    with pytest.raises(ValueError, match=r"fusion\.grid: .*image_size 98 into fusion\.grid=40"):
        fhf.llava_next_config(odd, text, image_token_id=IMAGE_TOKEN_ID)
