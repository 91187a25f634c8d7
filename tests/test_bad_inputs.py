"""The bad-input battery: every way a user can hand fusion something wrong, as one table.

Each row of ``CASES`` is one bad input: an id, what it is, a call that feeds it to the
public API, and what must happen:

- ``Raises(ExcType, "s1", "s2", ...)``: the call raises ``ExcType`` and the message
  contains every ``s``: the key or argument that is wrong, the value given, and what
  is accepted (the rows pick the words that carry each of the three);
- ``Handled(check)``: the input is valid after all and is handled correctly;
  ``check`` receives the call's result and asserts what "correct" means (RGBA and
  palette images become RGB, a 20000x15000 JPEG is decoded at reduced size with
  bounded memory, ...).

Rows are grouped: config, weights, images, tensors, boxes, kernel arguments. Calls
that need a tower share one ``tiny`` tower (random weights) built once. Files (configs,
checkpoints, images) are written to a per-test ``tmp_path``; the huge images are
written as valid files without ever holding their pixels (see ``write_grey_jpeg`` and
``write_bilevel_png``), so the battery runs in seconds.

Bounded memory (the 20000x15000 image): :func:`fusion.image_io.open_image` never
decodes more than ``MAX_DECODE_PIXELS`` (2**26) pixels. A JPEG is decoded by libjpeg
at 1/2, 1/4 or 1/8 scale (``Image.draft``), so the 300 M pixel JPEG becomes
5000x3750 (1/4); any other format over the bound is refused with a ``ValueError``
(PIL's decompression-bomb guard says so first for the 20000x15000 PNG). The test
also measures the peak resident memory of decoding the JPEG (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``; skipped where that file cannot be
written): it must stay under ``RSS_BOUND_MB``, against 300 MB for the full-size 8-bit
grey image alone. The decoded image is then preprocessed to check its pixels.
"""
from __future__ import annotations

import builtins
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import fusion
from fusion.image_io import MAX_DECODE_PIXELS, load_images, open_image
from fusion.kernels import grid_merge, pyramid_pool

# Peak resident memory allowed for decoding the 20000x15000 JPEG: the full-size 8-bit
# grey image alone is 300 MB (900 MB as RGB); the 1/4-scale decode is 19 MB.
RSS_BOUND_MB = 100


# ----------------------------------------------------------------------------- expectations


@dataclass
class Raises:
    exc: type
    mentions: Tuple[str, ...]

    def __init__(self, exc: type, *mentions: str):
        self.exc, self.mentions = exc, mentions


@dataclass
class Handled:
    check: Callable[[Any], None]


@dataclass
class Case:
    id: str
    what: str
    call: Callable[[Path], Any]
    expect: Any


# ----------------------------------------------------------------------------- helpers


_TOWER = {}


def tiny():
    """One shared tiny tower (random weights), built on first use."""
    if "t" not in _TOWER:
        _TOWER["t"] = fusion.build_tower("tiny", weights="random").eval()
    return _TOWER["t"]


def processor(images, **kw):
    return tiny().image_processor(images, **kw)["pixel_values"]


def forward(pixels):
    with torch.no_grad():
        return tiny()(pixels)


def config_file(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def with_sam_weights(tmp: Path, name: str, write: Callable[[Path], None]):
    """Build the tiny tower loading SAM's weights from ``tmp/name`` (written by ``write``)."""
    path = tmp / name
    write(path)
    return fusion.build_tower("tiny", weights="pretrained", overrides={"encoders.sam.pretrained": str(path)})


def sam_state():
    """A state dict with the keys the tiny SAM adapter expects (as a full SAM checkpoint)."""
    return {f"image_encoder.{k}": v for k, v in tiny().encoders["sam"].model.state_dict().items()}


class Payload:
    """Unpickling this creates a file: the stand-in for a malicious checkpoint's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def malicious_checkpoint(tmp: Path):
    sentinel = tmp / "PWNED"
    try:
        with_sam_weights(tmp, "evil.pt", lambda p: torch.save({"state_dict": Payload(sentinel)}, p))
    finally:
        assert not sentinel.exists(), "unpickling the checkpoint ran code"


def evil_yaml(tmp: Path):
    sentinel = tmp / "PWNED"
    path = config_file(tmp, "evil.yaml", f'encoders: !!python/object/apply:os.system ["touch {sentinel}"]\n')
    try:
        fusion.load_config(path)
    finally:
        assert not sentinel.exists(), "loading the YAML ran code"


def _segment(marker: bytes, payload: bytes) -> bytes:
    return marker + struct.pack(">H", len(payload) + 2) + payload


def write_grey_jpeg(path: Path, width: int, height: int) -> None:
    """A valid baseline greyscale JPEG, uniform grey (128), written without a pixel buffer.

    One-symbol Huffman tables (a single 1-bit code for DC category 0 and for end-of-block)
    make every 8x8 block the two bits ``00``: the scan is ``ceil(blocks / 4)`` zero bytes."""
    blocks = -(-width // 8) * -(-height // 8)
    one_code = bytes([1] + [0] * 15) + b"\x00"  # BITS: one code of length 1; HUFFVAL: symbol 0
    with open(path, "wb") as f:
        f.write(b"\xff\xd8")
        f.write(_segment(b"\xff\xdb", b"\x00" + bytes([1] * 64)))  # quantisation table 0: all ones
        f.write(_segment(b"\xff\xc0", struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"))
        f.write(_segment(b"\xff\xc4", b"\x00" + one_code + b"\x10" + one_code))  # DC table 0, AC table 0
        f.write(_segment(b"\xff\xda", b"\x01\x01\x00\x00\x3f\x00"))
        remaining, chunk = -(-blocks // 4), bytes(1 << 20)
        while remaining > 0:
            f.write(chunk[:remaining])
            remaining -= len(chunk)
        f.write(b"\xff\xd9")


def write_bilevel_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit greyscale (black) PNG, its rows streamed through zlib."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row = zlib.compressobj(1), bytes(1 + -(-width // 8))
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def huge_jpeg(tmp: Path):
    """Open and preprocess a 20000x15000 JPEG; returns (decoded size, pixel_values, peak MB or None)."""
    path = tmp / "huge.jpg"
    write_grey_jpeg(path, 20000, 15000)
    tiny()  # build before measuring
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM)
        base = _kib("VmRSS")
    except OSError:
        base = None
    with open_image(path) as img:
        peak = None if base is None else (_kib("VmHWM") - base) / 1024
        size = img.size
        pixels = processor(img)
    return size, pixels, peak


def check_huge_jpeg(result) -> None:
    size, pixels, peak = result
    assert size == (5000, 3750), size  # libjpeg's 1/4 scale: the full 20000x15000 never exists
    assert size[0] * size[1] <= MAX_DECODE_PIXELS
    assert pixels.shape == (1, 3, 98, 98)
    band = pixels[0, :, 20:78]  # the image rows (pad mode: grey bands above and below)
    torch.testing.assert_close(band, torch.full_like(band, 128 / 255), atol=1e-4, rtol=0)
    if peak is not None:
        assert peak < RSS_BOUND_MB, f"decoding took {peak:.0f} MB of resident memory"


def truncated_jpeg(tmp: Path) -> Path:
    path = tmp / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def same_as_rgb(convert: Callable[[Image.Image], Image.Image]):
    """A check: the result equals the processor's output for ``convert(base)`` made RGB by PIL."""
    base = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))

    def check(result):
        expected = processor(convert(base).convert("RGB"))
        torch.testing.assert_close(result, expected, atol=0, rtol=0)

    return base, check


_RGBA_BASE, _RGBA_CHECK = same_as_rgb(lambda im: im.convert("RGBA"))
_P_BASE, _P_CHECK = same_as_rgb(lambda im: im.convert("P"))
_CMYK_BASE, _CMYK_CHECK = same_as_rgb(lambda im: im.convert("CMYK"))


def rgba_image():
    rgba = _RGBA_BASE.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((30, 40), 7, dtype=np.uint8)))  # nearly transparent: alpha dropped
    return processor(rgba)


def sixteen_bit(tmp: Path):
    path = tmp / "g16.png"
    Image.fromarray(np.array([[0, 1000, 32768, 65535]] * 4, dtype=np.uint16)).save(path)
    with open_image(path) as img:
        assert img.mode == "I;16"
        return load_images(img)[0]


def check_sixteen_bit(x):
    # fusion.image_io's documented rule: PIL's own convert("RGB"), which clips 16-bit values to
    # 0-255 exactly as the open_clip / timm / LLaVA loaders do (Image.open(p).convert("RGB")).
    # Callers who want 16-bit precision pass a float array (np.asarray(img) / 65535.0).
    expected = torch.tensor([0, 255, 255, 255], dtype=torch.float32) / 255
    torch.testing.assert_close(x[0, :, 0], expected.expand(3, 4), atol=0, rtol=0)


def one_pixel():
    return processor(Image.new("RGB", (1, 1), (255, 0, 0)))


def check_one_pixel(x):
    assert x.shape == (1, 3, 98, 98)
    torch.testing.assert_close(x[0, :, 49, 49], torch.tensor([1.0, 0.0, 0.0]))


def box_tokens(box):
    """The tiny tower's fused-grid token indices under ``box``."""
    return fusion.tokens_in(tiny().sequence.token_boxes(), box)


X = torch.zeros(2, 4, 4, 8)  # a valid [B, h, w, C] grid for the kernel rows
T = torch.zeros(2, 16, 8)  # valid [B, H*W, C] tokens on a 4x4 grid


# ----------------------------------------------------------------------------- the table

CASES = [
    # ---------------------------------------------------------------- config
    Case("config-typo-top-key", "top-level key 'encoder' instead of 'encoders'",
         lambda t: fusion.load_config({"encoder": {}}),
         Raises(ValueError, "encoder", "did you mean 'encoders'", "valid keys")),
    Case("config-typo-nested-key", "override of 'fusion.grd' (typo of grid)",
         lambda t: fusion.load_config("tiny", ["fusion.grd=3"]),
         Raises(ValueError, "fusion.grd", "did you mean 'grid'", "valid keys")),
    Case("config-typo-encoder-key", "encoder field 'layr'",
         lambda t: fusion.load_config("tiny", ["encoders.clip.layr=-2"]),
         Raises(ValueError, "encoders.clip.layr", "did you mean 'layer'", "valid keys")),
    Case("config-wrong-type-str", "fusion.grid given as a word",
         lambda t: fusion.load_config("tiny", ["fusion.grid=big"]),
         Raises(ValueError, "fusion.grid", "'big'", "expected an integer")),
    Case("config-wrong-type-float", "fusion.grid given as 2.5",
         lambda t: fusion.load_config("tiny", ["fusion.grid=2.5"]),
         Raises(ValueError, "fusion.grid", "2.5", "expected an integer")),
    Case("config-wrong-type-bool", "fusion.grid given as true",
         lambda t: fusion.load_config("tiny", ["fusion.grid=true"]),
         Raises(ValueError, "fusion.grid", "True", "expected an integer")),
    Case("config-unknown-encoder-type", "encoder type 'clipp'",
         lambda t: fusion.load_config("tiny", ["encoders.clip.type=clipp"]),
         Raises(ValueError, "encoders.clip.type", "'clipp'", "did you mean 'clip'", "registered types")),
    Case("config-negative-grid", "fusion.grid=-3",
         lambda t: fusion.load_config("tiny", ["fusion.grid=-3"]),
         Raises(ValueError, "fusion.grid", "-3", ">= 1")),
    Case("config-zero-grid", "fusion.grid=0",
         lambda t: fusion.load_config("tiny", ["fusion.grid=0"]),
         Raises(ValueError, "fusion.grid", "got 0", ">= 1")),
    Case("config-empty-encoders", "encoders: {}",
         lambda t: fusion.load_config({"encoders": {}}),
         Raises(ValueError, "encoders", "{}", "non-empty mapping")),
    Case("config-all-encoders-dropped", "every encoder dropped by overrides",
         lambda t: fusion.load_config("tiny", [f"encoders.{n}=null" for n in ("clip", "siglip", "sam", "dino")]),
         Raises(ValueError, "encoders", "{}", "non-empty mapping")),
    Case("config-duplicate-name-yaml", "two encoders named 'clip' in a YAML file",
         lambda t: fusion.load_config(config_file(t, "dup.yaml", "encoders:\n  clip: {type: clip, model: ViT-B-16}\n"
                                                                 "  clip: {type: sam, model: vit_b}\n")),
         Raises(ValueError, "dup.yaml", "duplicate key 'clip'", "line 2", "keys must be unique")),
    Case("config-duplicate-name-json", "two encoders named 'a' in a JSON file",
         lambda t: fusion.load_config(config_file(t, "dup.json", '{"encoders": {"a": {"type": "clip", "model": "x"}, '
                                                                 '"a": {"type": "sam", "model": "vit_b"}}}')),
         Raises(ValueError, "dup.json", "duplicate key 'a'", "keys must be unique")),
    Case("config-sequence-concat-widths", "sequence_concat with encoders of widths 64/96/32/48 and no fusion.width",
         lambda t: fusion.build_tower("tiny", ["fusion.combine=sequence_concat"], weights="random"),
         Raises(ValueError, "fusion.combine", "'clip': 64", "'sam': 32", "set fusion.width", "channel_concat")),
    Case("config-projector-width-zero", "projector.out_dim=0",
         lambda t: fusion.load_config("tiny", ["projector.out_dim=0"]),
         Raises(ValueError, "projector.out_dim", "got 0", ">= 1")),
    Case("config-projector-width-negative", "projector.out_dim=-4",
         lambda t: fusion.load_config("tiny", ["projector.out_dim=-4"]),
         Raises(ValueError, "projector.out_dim", "-4", ">= 1")),
    Case("config-projector-none-width", "projector.type none with an out_dim that is not the fused width",
         lambda t: fusion.build_tower("tiny", ["projector.type=none", "projector.out_dim=5"], weights="random"),
         Raises(ValueError, "projector.out_dim", "out_dim is 5", "null or 240")),
    Case("config-unknown-preset", "preset 'vsr'",
         lambda t: fusion.load_config("vsr"),
         Raises(ValueError, "'vsr'", "did you mean 'vsre'", "presets are")),
    Case("config-missing-file", "a .yaml path that does not exist",
         lambda t: fusion.load_config(t / "nope.yaml"),
         Raises(FileNotFoundError, "source", "nope.yaml", "does not exist")),
    Case("config-folder", "a folder named like a config file",
         lambda t: (t / "conf.yaml").mkdir() or fusion.load_config(t / "conf.yaml"),
         Raises(ValueError, "source", "conf.yaml", "is a folder", ".yaml/.yml/.json")),
    Case("config-unreadable-bytes", "a .yaml file holding binary (non-UTF-8) bytes",
         lambda t: (t / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage") and fusion.load_config(t / "bin.yaml"),
         Raises(ValueError, "source", "bin.yaml", "cannot read config file", "utf-8")),
    Case("config-python-tag", "YAML with a !!python/object/apply tag (would run os.system); it must not run",
         evil_yaml,
         Raises(ValueError, "evil.yaml", "python/object/apply:os.system", "plain YAML", "never run")),
    Case("config-not-a-mapping", "a YAML file holding a list",
         lambda t: fusion.load_config(config_file(t, "list.yaml", "- clip\n- sam\n")),
         Raises(ValueError, "list.yaml", "must hold a mapping", "got list")),
    Case("config-yaml-syntax", "broken YAML syntax",
         lambda t: fusion.load_config(config_file(t, "bad.yaml", "encoders: {clip: [\n")),
         Raises(ValueError, "bad.yaml", "not valid YAML", "line")),
    Case("config-unknown-choice", "fusion.resample=nearest",
         lambda t: fusion.load_config("tiny", ["fusion.resample=nearest"]),
         Raises(ValueError, "fusion.resample", "'nearest'", "['area', 'bilinear']")),
    Case("config-layer-zero", "encoders.clip.layer=0",
         lambda t: fusion.load_config("tiny", ["encoders.clip.layer=0"]),
         Raises(ValueError, "encoders.clip.layer", "got 0", "-1 is the last")),
    Case("config-layer-too-deep", "layer -10 on a 2-block encoder",
         lambda t: fusion.build_tower("tiny", ["encoders.clip.layer=-10"], weights="random"),
         Raises(ValueError, "encoders.clip.layer", "-10", "2 blocks", "-1..-2")),
    Case("config-encoder-missing-model", "an encoder without 'model'",
         lambda t: fusion.load_config({"encoders": {"a": {"type": "clip"}}}),
         Raises(ValueError, "encoders.a.model", "missing", "'type' and 'model'")),
    Case("config-override-no-equals", "override 'fusion.grid' without '=value'",
         lambda t: fusion.load_config("tiny", ["fusion.grid"]),
         Raises(ValueError, "overrides", "'fusion.grid'", "'dotted.key=value'")),
    Case("config-drop-unknown-encoder", "encoders.foo=null where there is no foo",
         lambda t: fusion.load_config("tiny", ["encoders.foo=null"]),
         Raises(ValueError, "encoders.foo=null", "no encoder 'foo'", "encoders are ['clip'")),
    Case("config-weights-mode", "build_tower(weights='randm')",
         lambda t: fusion.build_tower("tiny", weights="randm"),
         Raises(ValueError, "weights", "'randm'", "['pretrained', 'random']")),
    Case("config-source-type", "a config source that is an int",
         lambda t: fusion.load_config(42),
         Raises(TypeError, "source", "int", "preset name", "dict")),
    Case("config-unknown-arch-key", "SAM arch key 'embed_dimm'",
         lambda t: fusion.build_tower("tiny", ["encoders.sam.arch.embed_dimm=32"], weights="random"),
         Raises(ValueError, "encoders.sam.arch.embed_dimm", "did you mean 'embed_dim'", "valid keys")),
    Case("config-unknown-model", "SAM model 'vit_x'",
         lambda t: fusion.build_tower("tiny", ["encoders.sam.model=vit_x"], weights="random"),
         Raises(ValueError, "encoders.sam.model", "'vit_x'", "valid names are ['vit_b', 'vit_h', 'vit_l']")),
    Case("config-image-size-patch", "SAM image_size 100, not a multiple of its 16-pixel patch",
         lambda t: fusion.build_tower("tiny", ["encoders.sam.image_size=100"], weights="random"),
         Raises(ValueError, "encoders.sam.image_size", "100", "multiple of the patch size 16")),
    Case("config-dtype", "encoders.clip.dtype=float8",
         lambda t: fusion.load_config("tiny", ["encoders.clip.dtype=float8"]),
         Raises(ValueError, "encoders.clip.dtype", "'float8'", "['float32', 'float16', 'bfloat16']")),
    # ---------------------------------------------------------------- weights
    Case("weights-missing-file", "encoders.sam.pretrained names a file that does not exist",
         lambda t: fusion.build_tower("tiny", {"encoders.sam.pretrained": str(t / "sam.pth")}),
         Raises(ValueError, "encoders.sam.pretrained", "sam.pth", "does not exist", ".safetensors")),
    Case("weights-wrong-extension", "a checkpoint with a .txt extension",
         lambda t: with_sam_weights(t, "sam.txt", lambda p: p.write_text("weights")),
         Raises(ValueError, "encoders.sam.pretrained", "sam.txt", "unsupported extension", "'.safetensors'")),
    Case("weights-not-a-pickle", "a .pth file holding text",
         lambda t: with_sam_weights(t, "sam.pth", lambda p: p.write_text("definitely not a checkpoint")),
         Raises(ValueError, "encoders.sam.pretrained", "sam.pth", "not a readable torch checkpoint")),
    Case("weights-bad-safetensors", "a .safetensors file holding garbage",
         lambda t: with_sam_weights(t, "sam.safetensors", lambda p: p.write_bytes(b"\x00" * 64)),
         Raises(ValueError, "encoders.sam.pretrained", "sam.safetensors", "not a readable .safetensors file")),
    Case("weights-missing-unexpected-keys", "a checkpoint with one key renamed",
         lambda t: with_sam_weights(t, "sam.safetensors", lambda p: save_file(
             {("image_encoder.patch_embed.WEIGHT" if k == "image_encoder.patch_embed.proj.weight" else k): v
              for k, v in sam_state().items()}, str(p))),
         Raises(ValueError, "encoders.sam.pretrained", "1 missing key ('patch_embed.proj.weight')",
                "1 unexpected key ('patch_embed.WEIGHT')", "should hold the full SAM checkpoint")),
    Case("weights-shape-mismatch", "a checkpoint of another width",
         lambda t: with_sam_weights(t, "sam.safetensors", lambda p: save_file(
             {k: (torch.zeros(*v.shape[:-1], 33) if k.endswith("pos_embed") else v) for k, v in sam_state().items()},
             str(p))),
         Raises(ValueError, "encoders.sam.pretrained", "shape mismatch",
                "'pos_embed': file [1, 6, 6, 33] vs model [1, 6, 6, 32]")),
    Case("weights-malicious-pickle", "a .pt whose unpickling would create a file; it must not run",
         malicious_checkpoint,
         Raises(ValueError, "encoders.sam.pretrained", "evil.pt", "weights_only=True", "state dict")),
    Case("weights-not-a-state-dict", "a .pt holding a list of tensors",
         lambda t: with_sam_weights(t, "sam.pt", lambda p: torch.save([torch.zeros(2)], p)),
         Raises(ValueError, "encoders.sam.pretrained", "holds a list", "not a state dict")),
    Case("weights-unknown-tag", "clip pretrained tag 'opnai'",
         lambda t: fusion.build_tower("tiny", ["encoders.clip.pretrained=opnai"]),
         Raises(ValueError, "encoders.clip.pretrained", "'opnai'", "did you mean 'openai'", "tags for 'ViT-B-16'")),
    Case("weights-null-under-pretrained", "encoders.sam.pretrained=null while loading pretrained weights",
         lambda t: fusion.build_tower("tiny", {"encoders.sam.pretrained": None}),
         Raises(ValueError, "encoders.sam.pretrained", "not set (null)", "'sa1b'", "encoders.sam.pretrained: random")),
    Case("weights-folder-without-config", "a folder that is not a Hugging Face model folder",
         lambda t: fusion.build_tower("tiny", {"encoders.dino.pretrained": str(t)}),
         Raises(ValueError, "encoders.dino.pretrained", "has no config.json",
                "Hugging Face model folder")),
    Case("weights-bad-hf-repo", "hf: followed by a path that is not <org>/<name>",
         lambda t: fusion.build_tower("tiny", {"encoders.clip.pretrained": "hf:a/b/c"}),
         Raises(ValueError, "encoders.clip.pretrained", "'hf:a/b/c'", "hf:<org>/<name>")),
    Case("weights-tag-needs-quick-gelu", "OpenAI's QuickGELU tag under a config that builds plain GELU",
         lambda t: fusion.build_tower("tiny", {"encoders.clip.pretrained": "openai"}, weights="random"),
         Raises(ValueError, "encoders.clip.arch.quick_gelu", "quick_gelu=True", "quick_gelu=False")),
    # ---------------------------------------------------------------- images
    Case("image-empty-list", "an empty list of images",
         lambda t: processor([]),
         Raises(ValueError, "images", "empty list", "PIL image")),
    Case("image-none", "images=None",
         lambda t: processor(None),
         Raises(ValueError, "images", "None", "pass the image(s)")),
    Case("image-zero-pixels", "a 0x5 PIL image",
         lambda t: processor(Image.new("RGB", (0, 5))),
         Raises(ValueError, "images", "0x5", "at least one pixel")),
    Case("image-one-pixel", "a 1x1 red image: resized like any other",
         lambda t: one_pixel(), Handled(check_one_pixel)),
    Case("image-rgba", "4 channels (RGBA, nearly transparent): alpha dropped, as PIL's convert('RGB')",
         lambda t: rgba_image(), Handled(_RGBA_CHECK)),
    Case("image-palette", "a palette (P) image: through its palette to RGB",
         lambda t: processor(_P_BASE.convert("P")), Handled(_P_CHECK)),
    Case("image-cmyk", "a CMYK image: PIL's CMYK -> RGB",
         lambda t: processor(_CMYK_BASE.convert("CMYK")), Handled(_CMYK_CHECK)),
    Case("image-16bit-png", "a 16-bit grey PNG (I;16): PIL's convert('RGB') as every upstream loader (clips)",
         sixteen_bit, Handled(check_sixteen_bit)),
    Case("image-16bit-array", "a uint16 numpy array",
         lambda t: processor(np.zeros((8, 8, 3), dtype=np.uint16)),
         Raises(TypeError, "images", "uint16", "uint8 (0-255) or floating point in [0, 1]", "65535")),
    Case("image-truncated-jpeg", "a JPEG cut in half",
         lambda t: open_image(truncated_jpeg(t)),
         Raises(ValueError, "cut.jpg", "truncated", "re-encode or re-download")),
    Case("image-not-an-image", "a text file named .jpg",
         lambda t: (t / "notes.jpg").write_text("hello") and open_image(t / "notes.jpg"),
         Raises(ValueError, "notes.jpg", "not an image file", "JPEG, PNG")),
    Case("image-empty-file", "a 0-byte .png",
         lambda t: (t / "empty.png").write_bytes(b"") or open_image(t / "empty.png"),
         Raises(ValueError, "empty.png", "not an image file", "JPEG, PNG")),
    Case("image-missing-file", "an image path that does not exist",
         lambda t: open_image(t / "gone.png"),
         Raises(FileNotFoundError, "gone.png", "no such file")),
    Case("image-huge-jpeg", "a 20000x15000 JPEG: decoded at 1/4 scale, bounded memory",
         huge_jpeg, Handled(check_huge_jpeg)),
    Case("image-huge-png", "a 20000x15000 PNG: PIL's decompression-bomb guard, as a ValueError",
         lambda t: write_bilevel_png(t / "huge.png", 20000, 15000) or open_image(t / "huge.png"),
         Raises(ValueError, "huge.png", "300000000 pixels", "decompression bomb", "max_pixels=67108864",
                "downscale")),
    Case("image-over-cap-png", "a 9000x8000 PNG: under PIL's guard, over fusion's decode bound",
         lambda t: write_bilevel_png(t / "big.png", 9000, 8000) or open_image(t / "big.png"),
         Raises(ValueError, "big.png", "9000x8000", "max_pixels=67108864", "only JPEG can be decoded at reduced")),
    Case("image-path-string", "a file path given to the image processor",
         lambda t: processor("photo.jpg"),
         Raises(TypeError, "images", "str", "PIL.Image.open(path)")),
    Case("image-nested-list", "a list of lists of images",
         lambda t: processor([[Image.new("RGB", (4, 4))]]),
         Raises(TypeError, "images[0]", "nested list", "flat list")),
    Case("image-channels-first-array", "a numpy array in CHW order",
         lambda t: processor(np.zeros((3, 8, 8), dtype=np.uint8)),
         Raises(ValueError, "images", "(3, 8, 8)", "channels-first", "channels last")),
    # ---------------------------------------------------------------- tensors
    Case("tensor-wrong-rank", "pixel_values [3, 98, 98] without the batch axis",
         lambda t: forward(torch.zeros(3, 98, 98)),
         Raises(ValueError, "pixel_values", "[3, 98, 98]", "[B, 3, H, W]")),
    Case("tensor-wrong-channels", "pixel_values with 4 channels",
         lambda t: forward(torch.zeros(1, 4, 98, 98)),
         Raises(ValueError, "pixel_values", "[1, 4, 98, 98]", "[B, 3, H, W]")),
    Case("tensor-nan", "pixel_values holding a NaN",
         lambda t: forward(torch.full((1, 3, 98, 98), float("nan"))),
         Raises(ValueError, "pixel_values", "NaN")),
    Case("tensor-integer-dtype", "int32 pixel_values",
         lambda t: forward(torch.zeros(1, 3, 98, 98, dtype=torch.int32)),
         Raises(TypeError, "pixel_values", "torch.int32", "float tensor in [0, 1]", "uint8")),
    Case("tensor-empty-batch", "pixel_values with batch 0",
         lambda t: forward(torch.zeros(0, 3, 98, 98)),
         Raises(ValueError, "pixel_values", "[0, 3, 98, 98]", "empty")),
    Case("tensor-not-a-tensor", "pixel_values as a numpy array",
         lambda t: forward(np.zeros((1, 3, 98, 98), dtype=np.float32)),
         Raises(TypeError, "pixel_values", "ndarray", "torch.Tensor [B, 3, H, W]", "image_processor")),
    Case("tensor-0-255-floats", "a float image tensor in 0-255",
         lambda t: processor(torch.full((3, 8, 8), 200.0)),
         Raises(ValueError, "images", "[200, 200]", "0-255 data", "must lie in [0, 1]")),
    Case("tensor-normalised", "an already mean/std-normalised float image",
         lambda t: processor(torch.full((3, 8, 8), -1.5)),
         Raises(ValueError, "images", "-1.5", "looks normalised", "[0, 1]")),
    Case("tensor-inf-image", "a float image tensor holding inf",
         lambda t: processor(torch.full((3, 8, 8), float("inf"))),
         Raises(ValueError, "images", "NaN/inf", "finite values in [0, 1]")),
    Case("tensor-int64-image", "an int64 image tensor",
         lambda t: processor(torch.zeros(3, 8, 8, dtype=torch.int64)),
         Raises(TypeError, "images", "torch.int64", "torch.uint8 (0-255)")),
    Case("tensor-rank-5", "a 5-D image tensor",
         lambda t: processor(torch.zeros(1, 1, 3, 8, 8)),
         Raises(ValueError, "images", "rank 5", "[B, C, H, W]")),
    Case("tensor-channels-last", "a torch tensor in HWC order",
         lambda t: processor(torch.zeros(8, 8, 3)),
         Raises(ValueError, "images", "(8, 8, 3)", "channels-last", "channels first")),
    Case("tensor-mismatched-device", "kernel grids on two devices (cpu and meta)",
         lambda t: grid_merge([X, torch.zeros(2, 3, 3, 8, device="meta")], 4),
         Raises(ValueError, "grids[1]", "meta", "grids[0] is on cpu", "one device")),
    Case("tensor-mismatched-norm-device", "a LayerNorm weight on another device than its grid",
         lambda t: grid_merge([X], 4, norms=[(torch.ones(8, device="meta"), None)]),
         Raises(ValueError, "norms[0] weight", "meta", "grids[0] is on cpu")),
    # ---------------------------------------------------------------- boxes
    Case("box-degenerate", "a box of zero width",
         lambda t: fusion.parse_box("[0.5, 0.2, 0.5, 0.9]"),
         Raises(ValueError, "[0.5, 0.2, 0.5, 0.9]", "empty (zero width or height)", "x0 < x1 and y0 < y1")),
    Case("box-flipped", "a box with x0 > x1",
         lambda t: fusion.parse_box("[0.8, 0.2, 0.3, 0.9]"),
         Raises(ValueError, "[0.8, 0.2, 0.3, 0.9]", "flipped", "x0 < x1")),
    Case("box-out-of-range", "a coordinate of 1.5",
         lambda t: fusion.parse_box("[0.1, 0.2, 1.5, 0.9]"),
         Raises(ValueError, "[0.1, 0.2, 1.5, 0.9]", "outside the image", "in [0, 1]")),
    Case("box-pixel-coordinates", "pixel coordinates instead of normalised ones",
         lambda t: fusion.parse_box("[10, 20, 300, 400]"),
         Raises(ValueError, "[10, 20, 300, 400]", "outside the image", "pixel coordinates")),
    Case("box-not-a-box", "text that is not a box",
         lambda t: fusion.parse_box("the cat on the left"),
         Raises(ValueError, "'the cat on the left'", "cannot parse", "four comma-separated numbers")),
    Case("box-three-numbers", "a box of three numbers",
         lambda t: fusion.parse_box("[0.1, 0.2, 0.3]"),
         Raises(ValueError, "'[0.1, 0.2, 0.3]'", "cannot parse", "x0, y0, x1, y1")),
    Case("box-in-free-text", "a sentence holding a box, given to parse_box",
         lambda t: fusion.parse_box("the cat is at [0.1, 0.2, 0.3, 0.4]."),
         Raises(ValueError, "cannot parse", "1 bracketed box", "fusion.text_to_boxes")),
    Case("box-wrong-shape-tensor", "a box tensor of shape [2, 2]",
         lambda t: box_tokens(torch.zeros(2, 2)),
         Raises(ValueError, "box", "[2, 2]", "shape [4]")),
    Case("box-nan", "a box with a NaN coordinate",
         lambda t: box_tokens([0.1, float("nan"), 0.5, 0.5]),
         Raises(ValueError, "box", "nan", "4 finite numbers")),
    Case("box-rois-wrong-shape", "ROI boxes as a tensor [1, 3]",
         lambda t: tiny().image_processor(Image.new("RGB", (8, 8)), rois=torch.zeros(1, 3)),
         Raises(ValueError, "rois", "[1, 3]", "[1, 4]", "[1, k, 4]")),
    Case("box-rois-count", "ROI entries for 2 images with 1 image",
         lambda t: tiny().image_processor(Image.new("RGB", (8, 8)), rois=[None, None]),
         Raises(ValueError, "rois", "2 entries for 1 image", "one entry per image")),
    Case("box-text-decimals", "boxes_to_text with 1 decimal",
         lambda t: fusion.boxes_to_text([0.1, 0.2, 0.3, 0.4], decimals=1),
         Raises(ValueError, "decimals", "1", "int >= 2")),
    Case("box-text-bad-box-in-answer", "a VLM answer holding an out-of-range box",
         lambda t: fusion.text_to_boxes("left [0.1, 0.2, 0.3, 0.4], right [0.5, 0.2, 1.3, 0.4]"),
         Raises(ValueError, "text box 1", "[0.5, 0.2, 1.3, 0.4]", "in [0, 1]")),
    # ---------------------------------------------------------------- kernel arguments
    Case("kernel-grids-tensor", "grid_merge given one tensor instead of a list",
         lambda t: grid_merge(X, 4),
         Raises(TypeError, "grids", "got Tensor", "list of [B, h, w, C] tensors")),
    Case("kernel-grids-empty", "grid_merge given an empty list",
         lambda t: grid_merge([], 4),
         Raises(ValueError, "grids", "empty list", "at least one [B, h, w, C] tensor")),
    Case("kernel-grid-rank", "a 3-D grid",
         lambda t: grid_merge([torch.zeros(2, 4, 8)], 4),
         Raises(ValueError, "grids[0]", "(2, 4, 8)", "[B, h, w, C] (4 dims)")),
    Case("kernel-grid-int", "an int64 grid",
         lambda t: grid_merge([X.long()], 4),
         Raises(TypeError, "grids[0]", "torch.int64", "float16, bfloat16, float32, float64")),
    Case("kernel-size-zero", "grid_merge size=0",
         lambda t: grid_merge([X], 0),
         Raises(ValueError, "size", "(0, 0)", "positive")),
    Case("kernel-size-float", "pyramid_pool grid=4.0",
         lambda t: pyramid_pool(T, 4.0, [2]),
         Raises(TypeError, "grid", "4.0", "positive int or an (h, w) pair of ints")),
    Case("kernel-mode", "grid_merge mode='nearest'",
         lambda t: grid_merge([X], 4, mode="nearest"),
         Raises(ValueError, "mode", "'nearest'", "['area', 'bilinear']")),
    Case("kernel-eps", "grid_merge eps=0",
         lambda t: grid_merge([X], 4, eps=0),
         Raises(ValueError, "eps", "0", "> 0")),
    Case("kernel-norms-count", "one norm entry for two grids",
         lambda t: grid_merge([X, X], 4, norms=[None]),
         Raises(ValueError, "norms", "1 entries", "2 grids", "one (weight, bias) pair or None per grid")),
    Case("kernel-norm-shape", "a LayerNorm weight of 7 channels for an 8-channel grid",
         lambda t: grid_merge([X], 4, norms=[(torch.ones(7), None)]),
         Raises(ValueError, "norms[0] weight", "(7,)", "must be [8]")),
    Case("kernel-sequence-widths", "layout='sequence' with widths 8 and 16",
         lambda t: grid_merge([X, torch.zeros(2, 3, 3, 16)], 4, layout="sequence"),
         Raises(ValueError, "layout='sequence'", "[8, 16]", "equal channel widths", "layout='channel'")),
    Case("kernel-batch-mismatch", "grids with batch 2 and 3",
         lambda t: grid_merge([X, torch.zeros(3, 3, 3, 8)], 4),
         Raises(ValueError, "grids[1]", "batch 3", "share the batch size")),
    Case("kernel-backend", "backend='cuda'",
         lambda t: grid_merge([X], 4, backend="cuda"),
         Raises(ValueError, "backend", "'cuda'", "['auto', 'triton', 'torch']")),
    Case("kernel-level-too-big", "a pyramid level larger than the grid",
         lambda t: pyramid_pool(T, 4, [5]),
         Raises(ValueError, "levels[0]", "(5, 5)", "<= (4, 4)")),
    Case("kernel-levels-empty", "no pyramid levels",
         lambda t: pyramid_pool(T, 4, []),
         Raises(ValueError, "levels", "empty", "e.g. [12, 6, 3, 1]")),
    Case("kernel-levels-string", "levels='2'",
         lambda t: pyramid_pool(T, 4, "2"),
         Raises(TypeError, "levels", "'2'", "list of ints or (h, w) pairs")),
    Case("kernel-token-count", "15 tokens for a 4x4 grid",
         lambda t: pyramid_pool(torch.zeros(2, 15, 8), 4, [2]),
         Raises(ValueError, "tokens", "15 tokens", "needs 16", "[B, H*W, C]")),
]


def test_battery_is_big_and_ids_are_unique():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    groups = {c.id.split("-")[0] for c in CASES}
    assert groups == {"config", "weights", "image", "tensor", "box", "kernel"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    if isinstance(case.expect, Raises):
        with pytest.raises(Exception) as info:
            case.call(tmp_path)
        err = info.value
        assert isinstance(err, case.expect.exc), (
            f"{case.what}: expected {case.expect.exc.__name__}, got {type(err).__name__}: {err}")
        message = str(err)
        missing = [m for m in case.expect.mentions if m not in message]
        assert not missing, f"{case.what}: the message lacks {missing}:\n{message}"
    else:
        case.expect.check(case.call(tmp_path))
