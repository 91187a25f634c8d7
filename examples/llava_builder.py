"""Swap fusion into LLaVA (haotian-liu/LLaVA) with a one-line change.

In ``llava/model/llava_arch.py``::

    -from .multimodal_encoder.builder import build_vision_tower
    +from fusion.anyres import default_pinpoints
from fusion.llava import build_vision_tower

then train as usual with ``--vision_tower vsre`` (a preset), ``--vision_tower
my_tower.yaml`` (a config file) or ``--vision_tower "vsre fusion.grid=16"`` (with
overrides); ``--mm_vision_select_layer -2`` picks CLIP's layer, ``--mm_projector_type
mlp2x_gelu`` builds LLaVA's projector from ``mm_hidden_size = vision_tower.hidden_size``.

This script makes, without LLaVA installed, the calls LLaVA makes on its tower:

    python examples/llava_builder.py                       # tiny preset, random weights (offline)
    python examples/llava_builder.py --tower vsre --weights pretrained
"""
from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from torch import nn

from fusion.anyres import default_pinpoints
from fusion.llava import build_vision_tower

IMAGES = Path(__file__).with_name("images")


def expand2square(image: Image.Image, background) -> Image.Image:
    """LLaVA's ``expand2square`` (llava/mm_utils.py), for ``image_aspect_ratio == "pad"``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def llava_mlp2x_gelu(mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """LLaVA's ``build_vision_projector`` for ``mm_projector_type='mlp2x_gelu'``."""
    return nn.Sequential(nn.Linear(mm_hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", default="tiny", help="what --vision_tower would say")
    parser.add_argument("--weights", default="random", choices=("pretrained", "random"))
    parser.add_argument("--select-layer", type=int, default=-2, help="--mm_vision_select_layer")
    parser.add_argument("--llm-hidden-size", type=int, default=128, help="the language model's width")
    args = parser.parse_args(argv)

    # LLaVA's ModelArguments (train.py) as LLaVA passes them to build_vision_tower.
    model_args = SimpleNamespace(vision_tower=args.tower, mm_vision_select_layer=args.select_layer,
                                 mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu")

    # 1. LlavaMetaModel.__init__ of a saved model: build_vision_tower(config, delay_load=True)
    saved_config = SimpleNamespace(mm_vision_tower=args.tower, mm_vision_select_layer=args.select_layer)
    delayed = build_vision_tower(saved_config, delay_load=True, weights=args.weights)
    print(f"delay_load: is_loaded={delayed.is_loaded}, parameters={sum(1 for _ in delayed.parameters())}")
    delayed.load_model()  # what load_pretrained_model does before inference
    print(f"load_model: is_loaded={delayed.is_loaded}, parameters={sum(1 for _ in delayed.parameters())}")

    # 2. initialize_vision_modules(model_args): the tower, mm_hidden_size, the projector
    vision_tower = build_vision_tower(model_args, weights=args.weights)
    mm_hidden_size = vision_tower.hidden_size
    mm_projector = llava_mlp2x_gelu(mm_hidden_size, args.llm_hidden_size)
    print(f"tower {args.tower!r}: {vision_tower.num_patches} tokens x {mm_hidden_size} channels "
          f"(num_patches_per_side {vision_tower.num_patches_per_side}); CLIP layer {args.select_layer}")

    # 3. LazySupervisedDataset.__getitem__ with image_aspect_ratio == "pad"
    processor = vision_tower.image_processor
    images = []
    for path in sorted(IMAGES.iterdir()):
        with Image.open(path) as im:
            image = expand2square(im.convert("RGB"), tuple(int(x * 255) for x in processor.image_mean))
        images.append(processor.preprocess(image, return_tensors="pt")["pixel_values"][0])
    images = torch.stack(images)

    # 4. LlavaMetaForCausalLM.encode_images
    with torch.no_grad():
        features = mm_projector(vision_tower(images))
    print(f"encode_images: pixel_values {list(images.shape)} -> image features {list(features.shape)}")

    # 5. LLaVA-1.6 (image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad") reads the tile side
    #    from vision_tower.config.image_size and lays each tile's tokens out as num_patches_per_side squared
    side = vision_tower.config.image_size
    print(f"anyres: tiles of config.image_size={side} pixels (patch_size {vision_tower.config.patch_size}), "
          f"{vision_tower.num_patches_per_side}x{vision_tower.num_patches_per_side} tokens per tile; "
          f"image_grid_pinpoints for this tower: {default_pinpoints(side)}")


if __name__ == "__main__":
    main()
