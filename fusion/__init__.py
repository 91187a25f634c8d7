"""fusion: a multi-encoder vision tower (CLIP, SigLIP, SAM, DINOv2) for vision-language models.

    tower = fusion.build_tower("vsre")            # or "tiny", a .yaml path, a dict
    tokens = tower(tower.image_processor(images)["pixel_values"])   # [B, N, D]
"""
from .boxes import boxes_to_text, parse_box, text_to_boxes, tokens_in
from .config import TowerConfig, list_presets, load_config
from .encoders.base import Encoder
from .encoders.registry import list_encoders, register_encoder
from .image_io import open_image
from .preprocess import ImageProcessor
from .prismatic import load_prism_checkpoint
from .tower import MultiEncoderTower, TowerOutput, build_tower

__version__ = "0.1.0"

__all__ = [
    "Encoder",
    "ImageProcessor",
    "MultiEncoderTower",
    "TowerConfig",
    "TowerOutput",
    "boxes_to_text",
    "build_tower",
    "list_encoders",
    "list_presets",
    "load_config",
    "load_prism_checkpoint",
    "open_image",
    "parse_box",
    "register_encoder",
    "text_to_boxes",
    "tokens_in",
]
