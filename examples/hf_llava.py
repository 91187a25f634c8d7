"""The tower as the vision tower of transformers' ``LlavaForConditionalGeneration`` (or, with
``--next``, ``LlavaNextForConditionalGeneration``: LLaVA-1.6's anyres tiles).

    python examples/hf_llava.py                     # tiny tower + tiny random Llama, offline
    python examples/hf_llava.py --next              # LLaVA-NeXT: the image in tiles of the tower's side
    python examples/hf_llava.py --tower vsre --weights pretrained

With a real language model, take its tokenizer and ``LlamaConfig`` (or any text
config) instead of the tiny ones built here; add ``"<image>"`` to the tokenizer if it
lacks it. Needs ``pip install 'fusion-tower[hf]'``.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoProcessor, LlamaConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                          PreTrainedTokenizerFast)

import fusion.hf as fhf  # registers "fusion_vision" with AutoConfig / AutoModel / AutoImageProcessor

IMAGES = Path(__file__).with_name("images")
WORDS = "<unk> <pad> <s> </s> <image> USER ASSISTANT : what is in the picture ? a house cat grid gray".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline, with ``<image>`` as a special token."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})


def tiny_llama(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=1, bos_token_id=2, eos_token_id=3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", default="tiny")
    parser.add_argument("--weights", default="random", choices=("pretrained", "random"))
    parser.add_argument("--next", action="store_true", help="LlavaNextForConditionalGeneration (anyres tiles)")
    args = parser.parse_args(argv)

    tokenizer = tiny_tokenizer()
    vision = fhf.FusionVisionConfig(tower=args.tower, weights=args.weights)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if args.next:
        config = fhf.llava_next_config(vision, tiny_llama(len(WORDS)), image_token_id=image_token_id)
        model_class = LlavaNextForConditionalGeneration
    else:
        config = fhf.llava_config(vision, tiny_llama(len(WORDS)), image_token_id=image_token_id)
        model_class = LlavaForConditionalGeneration
    model = model_class(config).eval()
    if args.next:
        processor = fhf.llava_next_processor(tokenizer, model.config.vision_config, config.image_grid_pinpoints)
        print(f"tiles of {vision.image_size} pixels, image_grid_pinpoints {config.image_grid_pinpoints}")
    else:
        processor = fhf.llava_processor(tokenizer, model.config.vision_config)
    print(f"tower: {vision.num_patches} tokens per image (or tile) x {vision.hidden_size} channels -> "
          f"{type(model).__name__}'s projector -> {config.text_config.hidden_size}")

    prompt = "USER : <image> what is in the picture ? ASSISTANT :"
    with Image.open(IMAGES / "house.jpg") as im:
        inputs = processor(images=im.convert("RGB"), text=prompt, return_tensors="pt")
    n_image = int((inputs["input_ids"] == config.image_token_id).sum())
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens, {n_image} of them image tokens")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    print("generated:", tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:]))

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        reloaded = model_class.from_pretrained(tmp).eval()
        reprocessor = AutoProcessor.from_pretrained(tmp)
        with torch.no_grad():
            again = reloaded(**inputs).logits
    print(f"save_pretrained -> from_pretrained: max logit difference {(again - logits).abs().max().item():.2e}; "
          f"processor {type(reprocessor).__name__} with {type(reprocessor.image_processor).__name__}")


if __name__ == "__main__":
    main()
