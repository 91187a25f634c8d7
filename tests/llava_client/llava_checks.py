"""LLaVA's own code (haotian-liu/LLaVA, ``llava-torch`` 1.2.2.post1, transformers 4.37.2) with
fusion as its vision tower, through the README's one-line swap in ``llava_arch.py``.

Not collected by the default suite: ``tests/test_llava_client.py`` runs this file with pytest
inside a separate virtual environment that holds LLaVA's pinned transformers (see there).
Every check runs LLaVA's functions (``initialize_vision_modules``,
``prepare_inputs_labels_for_multimodal``, ``process_images``, ``generate``,
``load_pretrained_model``) on a tiny ``LlavaLlamaForCausalLM`` with the ``tiny`` tower, and
compares with fusion's tower built directly, or with a layout computed by hand here.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import llava.model.llava_arch as llava_arch
from llava import conversation as conversation_lib
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import LlavaLlamaForCausalLM
from llava.model.builder import load_pretrained_model
from llava.train.train import DataArguments, DataCollatorForSupervisedDataset, LazySupervisedDataset, ModelArguments

import fusion
from fusion.llava import FusionVisionTower, llava_tower_config

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"
WORDS = "<unk> <pad> <s> </s> <image> what is in the picture ? a house cat grid gray portrait".split()
TOWER = "tiny"
ANYRES_TOWER = "tiny processor.size=336"  # 336-pixel tiles, so LLaVA-1.6's own pinpoints fit
LLAVA16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # as LLaVA-1.6 ships them
DTYPE = torch.bfloat16  # train.py --bf16 True


def test_the_swap_is_in_place():
    # the README's one-line change, applied to this environment's LLaVA
    assert llava_arch.build_vision_tower.__module__ == "fusion.llava"
    assert transformers.__version__ == "4.37.2"


# ----------------------------------------------------------------------------- set-up as train.py


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama checkpoint and its tokenizer, as ``--model_name_or_path`` points to."""
    root = tmp_path_factory.mktemp("base")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                     bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(root)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=512, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    return root


def build_llava(base_dir, tower=TOWER, merge_type="flat", aspect="pad", tune_adapter=False):
    """What ``llava/train/train.py:train()`` does up to the dataset, with ``--bf16 True`` on the CPU."""
    model = LlavaLlamaForCausalLM.from_pretrained(str(base_dir), torch_dtype=DTYPE)
    model.config.use_cache = False
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base_dir), model_max_length=512,
                                                           padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token  # train.py for --version plain
    conversation_lib.default_conversation = conversation_lib.conv_templates["plain"]
    model_args = ModelArguments(model_name_or_path=str(base_dir), version="plain", vision_tower=tower,
                                mm_vision_select_layer=-2, mm_projector_type="mlp2x_gelu",
                                mm_use_im_start_end=False, mm_use_im_patch_token=False,
                                mm_patch_merge_type=merge_type, tune_mm_mlp_adapter=tune_adapter)
    data_args = DataArguments(image_aspect_ratio=aspect, is_multimodal=True)
    model.get_model().initialize_vision_modules(model_args=model_args, fsdp=[])
    vision_tower = model.get_vision_tower()
    vision_tower.to(dtype=DTYPE, device="cpu")
    data_args.image_processor = vision_tower.image_processor
    model.config.image_aspect_ratio = data_args.image_aspect_ratio
    if aspect == "anyres":  # LLaVA-1.6's saved configs carry the pinpoints
        model.config.image_grid_pinpoints = LLAVA16_PINPOINTS
    model.config.tokenizer_padding_side = tokenizer.padding_side
    model.config.tokenizer_model_max_length = tokenizer.model_max_length
    model.config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        for p in model.get_model().mm_projector.parameters():
            p.requires_grad = True
    model.config.mm_use_im_start_end = data_args.mm_use_im_start_end = model_args.mm_use_im_start_end
    model.config.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    model.initialize_vision_tokenizer(model_args, tokenizer=tokenizer)
    model.to(DTYPE)  # what LLaVA's DeepSpeed bf16 engine does to the whole model (mm_projector was built fp32)
    return model, tokenizer, data_args


def reference_tower(tower=TOWER, dtype=DTYPE):
    """fusion's tower built directly from the same arguments (seed 0, as the swap builds it)."""
    config = llava_tower_config(tower, select_layer=-2)
    return fusion.build_tower(config, weights="pretrained", seed=0).to(dtype).eval()


def image(name):
    with Image.open(IMAGES / name) as im:
        return im.convert("RGB")


def prompt_ids(tokenizer, text="<image> what is in the picture ?"):
    return tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)


def image_slot(input_ids):
    return int((input_ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0])


# ----------------------------------------------------------------------------- LLaVA-1.5 (pad)


@pytest.fixture(scope="module")
def llava15(base_dir):
    return build_llava(base_dir)


def test_initialize_vision_modules(llava15):
    model, _, data_args = llava15
    tower = model.get_vision_tower()
    assert isinstance(tower, FusionVisionTower) and tower.is_loaded
    assert model.config.mm_vision_tower == TOWER and model.config.mm_hidden_size == tower.hidden_size == 240
    projector = model.get_model().mm_projector
    assert projector[0].in_features == 240 and projector[2].out_features == model.config.hidden_size
    assert data_args.image_processor.crop_size == {"height": 98, "width": 98}
    assert not any(p.requires_grad for p in tower.parameters())


def dataset_batch(tokenizer, data_args, tmp_path):
    """LLaVA's own LazySupervisedDataset + collator on two example images."""
    records = [{"id": str(i), "image": name, "conversations": [
        {"from": "human", "value": "<image>\nwhat is in the picture ?"}, {"from": "gpt", "value": answer}]}
        for i, (name, answer) in enumerate([("house.jpg", "a house"), ("portrait.png", "a portrait")])]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    data_args.data_path, data_args.image_folder = str(path), str(IMAGES)
    dataset = LazySupervisedDataset(str(path), tokenizer, data_args)
    return DataCollatorForSupervisedDataset(tokenizer)([dataset[0], dataset[1]])


def test_prepare_inputs_puts_the_projected_tower_tokens_at_the_image_slot(llava15, tmp_path):
    model, tokenizer, data_args = llava15
    batch = dataset_batch(tokenizer, data_args, tmp_path)
    images = batch["images"].to(DTYPE)
    assert images.shape == (2, 3, 98, 98)
    with torch.no_grad():
        out = model.prepare_inputs_labels_for_multimodal(batch["input_ids"], None, batch["attention_mask"], None,
                                                         batch["labels"], images)
        expected = model.get_model().mm_projector(reference_tower()(images).to(DTYPE))
    embeds, labels = out[4], out[5]
    for b in range(2):
        slot = image_slot(batch["input_ids"][b:b + 1])
        torch.testing.assert_close(embeds[b, slot:slot + 16], expected[b], rtol=0, atol=0)
        assert (labels[b, slot:slot + 16] == IGNORE_INDEX).all()
        assert (labels[b, slot + 16:] != IGNORE_INDEX).any()  # the answer is trained on


def test_training_step_gradients(llava15, tmp_path):
    model, tokenizer, data_args = llava15
    batch = dataset_batch(tokenizer, data_args, tmp_path)
    model.train()
    model.zero_grad()
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 images=batch["images"].to(DTYPE)).loss
    loss.backward()
    assert torch.isfinite(loss)
    for p in model.get_model().mm_projector.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.get_model().layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.get_vision_tower().parameters())
    model.zero_grad()
    model.eval()


def test_stage1_trains_only_the_projector(base_dir, tmp_path):
    model, tokenizer, data_args = build_llava(base_dir, tune_adapter=True)
    batch = dataset_batch(tokenizer, data_args, tmp_path)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
          images=batch["images"].to(DTYPE)).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("mm_projector" in n for n in trained)


def test_generate(llava15):
    model, tokenizer, data_args = llava15
    im = image("house.jpg")
    images = process_images([im], data_args.image_processor, model.config).to(DTYPE)
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=ids, images=images).logits
        out = model.generate(ids, images=images, image_sizes=[im.size], do_sample=False, max_new_tokens=3,
                             min_new_tokens=3, use_cache=True)
    # LLaVA generates from inputs_embeds: transformers 4.37 returns BOS and the new tokens
    assert out.shape == (1, 4) and out[0, 0] == tokenizer.bos_token_id
    assert out[0, 1] == logits[0, -1].argmax()  # greedy: the first new token is the argmax


# ----------------------------------------------------------------------------- LLaVA-1.6 (anyres)


def expected_anyres(features, image_size, merge_type, newline):
    """LLaVA-1.6's layout written out by hand: ``features [1 + tiles, g*g, C]`` (the base image first)
    -> the sequence LLaVA puts at the image slot."""
    g = 4
    width, height = image_size
    # best pinpoint, by LLaVA's rule (largest effective resolution, then least waste)
    best = max(LLAVA16_PINPOINTS, key=lambda wh: (
        min(int(width * min(wh[0] / width, wh[1] / height)) * int(height * min(wh[0] / width, wh[1] / height)),
            width * height), -wh[0] * wh[1]))
    cols, rows = best[0] // 336, best[1] // 336
    assert features.shape[0] == 1 + rows * cols
    if merge_type == "flat":
        return features.flatten(0, 1)
    big = [[features[1 + (r // g) * cols + c // g, (r % g) * g + c % g] for c in range(cols * g)]
           for r in range(rows * g)]
    if merge_type == "spatial":
        return torch.cat([features[0]] + [torch.stack(row) for row in big])
    keep_rows, keep_cols = range(rows * g), range(cols * g)
    if width / height > cols / rows:  # padded above and below: drop the padding rows
        pad = (rows * g - int(height * ((cols * g) / width))) // 2
        keep_rows = range(pad, rows * g - pad)
    else:
        pad = (cols * g - int(width * ((rows * g) / height))) // 2
        keep_cols = range(pad, cols * g - pad)
    out = [features[0]]
    for r in keep_rows:
        out.append(torch.stack([big[r][c] for c in keep_cols] + [newline]))
    return torch.cat(out)


@pytest.mark.parametrize("merge_type", ["flat", "spatial", "spatial_unpad"])
def test_anyres(base_dir, tmp_path, merge_type):
    model, tokenizer, data_args = build_llava(base_dir, tower=ANYRES_TOWER, merge_type=merge_type, aspect="anyres")
    tower = model.get_vision_tower()
    assert tower.config.image_size == 336 and tower.num_patches_per_side == 4
    ims = [image("house.jpg"), image("portrait.png")]
    images = process_images(ims, data_args.image_processor, model.config)  # LLaVA's anyres tiling
    images = [x.to(DTYPE) for x in images]
    sizes = [im.size for im in ims]
    ids = torch.cat([prompt_ids(tokenizer)] * 2)
    ref = reference_tower(ANYRES_TOWER)
    with torch.no_grad():
        out = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images, sizes)
        for b, (tiles, size) in enumerate(zip(images, sizes)):
            feats = model.get_model().mm_projector(ref(tiles).to(DTYPE))
            newline = getattr(model.get_model(), "image_newline", None)
            expected = expected_anyres(feats, size, merge_type, newline)
            slot = image_slot(ids[b:b + 1])
            torch.testing.assert_close(out[4][b, slot:slot + len(expected)], expected, rtol=0, atol=0)
            assert out[4].shape[1] >= slot + len(expected)
    # a training step through the anyres path, then generation
    model.train()
    labels = ids.clone()
    labels[labels == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    loss = model(input_ids=ids, labels=labels, images=images, image_sizes=sizes).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_model().mm_projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tower.parameters())
    if merge_type == "spatial_unpad":
        assert model.get_model().image_newline.grad.abs().sum() > 0
    model.zero_grad()
    model.eval()
    with torch.no_grad():
        gen = model.generate(ids[:1], images=images[:1], image_sizes=sizes[:1], do_sample=False, max_new_tokens=2,
                             min_new_tokens=2)
        first = model(input_ids=ids[:1], images=images[:1], image_sizes=sizes[:1]).logits[0, -1].argmax()
    assert gen.shape == (1, 3) and gen[0, 1] == first  # BOS, then the new tokens


def test_anyres_refuses_a_tower_whose_tokens_are_not_a_grid(base_dir):
    with pytest.raises(ValueError, match=r"fusion\.levels"):
        build_llava(base_dir, tower=ANYRES_TOWER + " fusion.levels=[2]", merge_type="spatial_unpad",
                    aspect="anyres")


# ----------------------------------------------------------------------------- save and reload


def test_load_pretrained_model_after_save_pretrained(base_dir, tmp_path):
    model, tokenizer, data_args = build_llava(base_dir, tower=ANYRES_TOWER, merge_type="spatial_unpad",
                                              aspect="anyres")
    folder = tmp_path / "llava-fusion-tiny"  # load_pretrained_model needs "llava" in the name
    model.config.use_cache = True
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tok2, loaded, processor, _ = load_pretrained_model(str(folder), None, folder.name, device_map="cpu",
                                                       device="cpu")
    tower = loaded.get_vision_tower()
    assert isinstance(tower, FusionVisionTower) and tower.is_loaded and processor is tower.image_processor
    saved = model.state_dict()
    for name, value in loaded.state_dict().items():
        if "vision_tower" not in name:  # the tower is rebuilt from its config; the rest is the checkpoint
            torch.testing.assert_close(value, saved[name].to(value.dtype), rtol=0, atol=0, msg=name)
    ref = reference_tower(ANYRES_TOWER, torch.float32)
    for (name, a), b in zip(tower.vision_tower.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=0, atol=0, msg=name)
    im = image("portrait.png")
    images = process_images([im], processor, loaded.config)
    images = [x.to(torch.float16) for x in images]
    ids = prompt_ids(tok2)
    with torch.no_grad():
        out = loaded.generate(ids, images=images, image_sizes=[im.size], do_sample=False, max_new_tokens=2,
                              min_new_tokens=2)
    assert out.shape == (1, 3) and (out[0, 1:] < len(tok2)).all()


def test_reload_config_with_pinpoints_that_do_not_fit_the_tower():
    config = SimpleNamespace(mm_vision_tower=TOWER, mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
                             image_grid_pinpoints=LLAVA16_PINPOINTS)
    tower = llava_arch.build_vision_tower(config, delay_load=True)
    with pytest.raises(ValueError, match=r"image_grid_pinpoints.*multiples of the tower's tile size 98"):
        tower.load_model()
