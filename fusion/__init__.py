"""fusion: a multi-encoder vision tower (CLIP, SigLIP, SAM, DINOv2) for vision-language models.

    tower = fusion.build_tower("vsre")            # or "tiny", a .yaml path, a dict
    tokens = tower(tower.image_processor(images)["pixel_values"])   # [B, N, D]

``import fusion`` is cheap: the names below (and the submodules) load on first use, so
neither torch nor an upstream library (open_clip, timm, segment_anything, transformers)
is imported until something needs it (``fusion-tower --help`` imports none of them).

Words (one meaning each; module, class and config names follow them)

- encode: an encoder turns pixels into its token grid ``[B, h, w, C]`` (:mod:`fusion.encoders`).
- align: resample a grid to the target grid ``fusion.grid`` (``fusion.resample``: area / bilinear).
- fuse: combine the aligned grids into one token sequence (config ``fusion.combine``:
  channel_concat, sequence_concat, sva).
- pool: add coarser levels of the fused grid (``fusion.levels``, :mod:`fusion.levels`).
- reduce: ToMe token merging down to ``keep`` tokens (``fusion.reduce``, :mod:`fusion.reduce`).
- crop: re-encode regions of interest as extra tokens (:mod:`fusion.roi`).
- project: map tokens to the language model's width (``projector``, :mod:`fusion.projector`).
- merge: the whole stage between the encoders and the projector, align → fuse → pool /
  reduce / crop (:mod:`fusion.merge`, ``tower.merge``, ``tower.merge_and_project``).
  Kernels are named after what they compute: ``grid_merge`` aligns, normalises and
  concatenates in one pass; ``bipartite_merge`` is ToMe's matching behind reduce.
- grid / tokens: ``[B, h, w, C]`` per encoder / ``[B, N, C]`` after fuse.
- hidden states: the Hugging Face view of one forward, every stage's output in data-flow
  order (each encoder grid flattened, the merged tokens, the projected tokens):
  ``TowerOutput.hidden_states``, what Llava's ``vision_feature_layer`` indexes. Python code
  reads the named fields instead (``encoder_grids``, ``merged_tokens``, ``tokens``).
- reference: the PyTorch path of a kernel op (``kernels="torch"``, the CPU path); the test
  oracles are the ``naive_*`` functions.
"""
from importlib import import_module
from pkgutil import iter_modules

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "Encoder": "encoders.base",
    "ImageProcessor": "preprocess",
    "MultiEncoderTower": "tower",
    "TowerConfig": "config",
    "TowerOutput": "tower",
    "TowerGeometry": "geometry",
    "boxes_to_text": "boxes",
    "build_tower": "tower",
    "list_encoders": "encoder_types",
    "list_presets": "config",
    "load_config": "config",
    "load_prism_checkpoint": "prismatic",
    "open_image": "image_io",
    "parse_box": "boxes",
    "register_encoder": "encoders.registry",
    "text_to_boxes": "boxes",
    "tokens_in": "boxes",
    "tower_geometry": "geometry",
}
# submodules reachable as attributes after a bare ``import fusion`` (as when they were imported
# eagerly); listed from the package folder, which imports nothing
_SUBMODULES = {info.name for info in iter_modules(__path__) if not info.name.startswith("_")} | {"kernels"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
