"""Weight sources and strict loading: fusion.encoders.weights, and the adapters that use it."""
import builtins

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from segment_anything.build_sam import _build_sam

from fusion.config import EncoderConfig
from fusion.encoders.registry import get_encoder_class
from fusion.encoders.base import block_index
from fusion.encoders.weights import load_strict, read_checkpoint, resolve_pretrained

KEY = "encoders.x.pretrained"
TEXT = dict(layers=1, width=32, heads=2, vocab_size=64, context_length=8)
CLIP_ARCH = dict(embed_dim=32, vision_cfg=dict(layers=2, width=64, head_width=32), text_cfg=TEXT)
DINO_ARCH = dict(embed_dim=32, depth=2, num_heads=2)
SAM_ARCH = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=3, out_chans=32)


def enc_cfg(type_, model, **kw):
    return EncoderConfig(name=type_, type=type_, model=model, **kw)


def build(cfg, load_weights=True):
    return get_encoder_class(cfg.type)(cfg, load_weights)


def sample_state():
    return {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}


class Payload:
    """Unpickling this creates a file: the stand-in for a malicious checkpoint's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


# ----------------------------------------------------------------------------- reading files


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_read_checkpoint_round_trips(tmp_path, suffix):
    state = sample_state()
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = read_checkpoint(str(path), KEY)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_read_checkpoint_unwraps_training_checkpoints_and_ddp_prefixes(tmp_path):
    state = sample_state()
    path = tmp_path / "train.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    assert read_checkpoint(str(path), KEY).keys() == state.keys()


def test_torch_files_are_read_with_weights_only(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = tmp_path / "w.pt"
    torch.save(sample_state(), path)
    read_checkpoint(str(path), KEY)
    assert calls and all(c.get("weights_only") is True for c in calls)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, path)
    with pytest.raises(ValueError, match=rf"{KEY}: torch\.load\(weights_only=True\) refused .*can run code"):
        read_checkpoint(str(path), KEY)
    assert not marker.exists()


@pytest.mark.parametrize("obj, match", [
    ([torch.zeros(1)], "holds a list, not a state dict"),
    ({"w": torch.zeros(1), "step": 7}, r"not a state dict of tensors: 1 entries .*'step' \(int\)"),
])
def test_wrong_checkpoint_contents(tmp_path, obj, match):
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError, match=match):
        read_checkpoint(str(path), KEY)


@pytest.mark.parametrize("name", ["junk.pt", "junk.safetensors"])
def test_corrupt_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match=rf"{KEY}: .*not a readable"):
        read_checkpoint(str(path), KEY)


def test_unsupported_extension_and_missing_file(tmp_path):
    path = tmp_path / "w.ckpt"
    torch.save(sample_state(), path)
    with pytest.raises(ValueError, match=r"unsupported extension; accepted are \['\.safetensors', '\.pt'"):
        read_checkpoint(str(path), KEY)
    with pytest.raises(ValueError, match="does not exist"):
        read_checkpoint(str(tmp_path / "gone.pt"), KEY)


# ----------------------------------------------------------------------------- strict loading


def test_load_strict_loads_equal_weights():
    module, state = torch.nn.Linear(2, 3), sample_state()
    load_strict(module, {k[2:]: v for k, v in state.items()}, KEY, "w.pt", "a Linear")
    assert torch.equal(module.weight, state["a.weight"])


def test_load_strict_lists_missing_unexpected_and_mismatched_keys():
    module = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(4)])  # 8 keys
    state = {"0.weight": torch.zeros(3, 2), "extra": torch.zeros(1)}
    with pytest.raises(ValueError) as info:
        load_strict(module, state, KEY, "w.pt", "four Linear layers")
    msg = str(info.value)
    assert msg.startswith(f"{KEY}: 'w.pt' does not fit the model")
    assert "7 missing keys ('0.bias', '1.weight', '1.bias', '2.weight', '2.bias', ... (2 more))" in msg
    assert "1 unexpected key ('extra')" in msg
    assert "1 shape mismatch ('0.weight': file [3, 2] vs model [2, 2])" in msg
    assert "should hold four Linear layers" in msg


# ----------------------------------------------------------------------------- sources


def test_resolve_pretrained(tmp_path):
    def cfg(value):
        return EncoderConfig(name="x", type="dinov2", model="m", pretrained=value)

    file = tmp_path / "w.pt"
    torch.save(sample_state(), file)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_pretrained(cfg("random"), ["t"], True, "lib").kind == "random"
    assert resolve_pretrained(cfg(None), ["t"], False, "lib").kind == "random"  # weights="random": fine
    tag = resolve_pretrained(cfg("t"), ["t"], True, "lib")
    assert (tag.kind, tag.load_tag, tag.load_file) == ("tag", True, False)
    local = resolve_pretrained(cfg(str(file)), ["t"], True, "lib")
    assert (local.kind, local.value, local.load_file) == ("file", str(file), True)
    hf = resolve_pretrained(cfg(str(folder)), ["t"], True, "lib")
    assert (hf.kind, hf.value, hf.repo, hf.load_hf) == ("hf", str(folder), None, True)
    repo = resolve_pretrained(cfg("hf:openai/clip-vit-large-patch14-336"), ["t"], True, "lib")
    assert (repo.kind, repo.repo) == ("hf", "openai/clip-vit-large-patch14-336")
    with pytest.raises(ValueError, match=rf"{KEY}: 'hf:a/b/c' is not a Hugging Face repo reference; write hf:<org>/<name>"):
        resolve_pretrained(cfg("hf:a/b/c"), ["t"], True, "lib")
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=rf"{KEY}: the folder .* has no config\.json"):
        resolve_pretrained(cfg(str(folder)), ["t"], True, "lib")
    with pytest.raises(ValueError, match=rf"{KEY}: the file '.*nope\.pt' does not exist"):
        resolve_pretrained(cfg(str(tmp_path / "nope.pt")), ["t"], True, "lib")
    with pytest.raises(ValueError, match=r"'lvd124m' is neither a known tag \(did you mean 'lvd142m'\?\).*\['lvd142m'\]"):
        resolve_pretrained(cfg("lvd124m"), ["lvd142m"], True, "lib")
    never = resolve_pretrained(cfg("/no/such.pt"), ["t"], False, "lib")  # load_weights=False: no checks
    assert not never.load_file and not never.load_tag


def test_null_pretrained_under_pretrained_weights_is_an_error():
    """Never random by surprise: null (or no key) must be spelled `random` to mean random weights."""
    cfg = EncoderConfig(name="sam", type="sam", model="vit_b", pretrained=None)
    with pytest.raises(ValueError) as info:
        resolve_pretrained(cfg, ["sa1b"], True, "segment_anything")
    msg = str(info.value)
    assert msg.startswith("encoders.sam.pretrained: not set (null) while the tower loads pretrained weights")
    assert "('sa1b')" in msg and "encoders.sam.pretrained: random" in msg and "--weights random" in msg


@pytest.mark.parametrize("layer, index", [(-1, 11), (-2, 10), (-12, 0), (1, 0), (12, 11)])
def test_block_index(layer, index):
    assert block_index(layer, 12, "encoders.x.layer") == index


# ----------------------------------------------------------------------------- through the adapters


@pytest.fixture(scope="module")
def clip_state():
    model = open_clip.create_model("ViT-B-16", force_image_size=64, **dict(
        CLIP_ARCH, vision_cfg=dict(open_clip.get_model_config("ViT-B-16")["vision_cfg"], **CLIP_ARCH["vision_cfg"],
                                   image_size=64)))
    return model.state_dict()


def clip_with(tmp_path, state, name="clip.safetensors"):
    path = tmp_path / name
    save_file(state, str(path)) if name.endswith(".safetensors") else torch.save(state, path)
    return build(enc_cfg("clip", "ViT-B-16", pretrained=str(path), image_size=64, arch=CLIP_ARCH))


@pytest.mark.parametrize("name", ["clip.safetensors", "clip.pt"])
def test_clip_loads_visual_weights_and_ignores_the_text_tower(tmp_path, clip_state, name):
    enc = clip_with(tmp_path, clip_state, name)
    own = enc.model.state_dict()
    # every visual key is loaded; what the adapter keeps is all but the final norm and projection
    # (layer -1: every block runs; tests/test_prune.py checks the pruning)
    assert own.keys() == {k[len("visual."):] for k in clip_state if k.startswith("visual.")} - {
        "ln_post.weight", "ln_post.bias", "proj"}
    assert all(torch.equal(v, clip_state[f"visual.{k}"]) for k, v in own.items())


def test_clip_missing_and_unexpected_visual_keys(tmp_path, clip_state):
    missing = {k: v for k, v in clip_state.items() if k != "visual.conv1.weight"}
    with pytest.raises(ValueError, match=r"encoders\.clip\.pretrained: .*1 missing key \('conv1\.weight'\)"):
        clip_with(tmp_path, missing)
    extra = dict(clip_state, **{"visual.bonus": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 unexpected key \('bonus'\).*full open_clip state dict of 'ViT-B-16'"):
        clip_with(tmp_path, extra)


def test_clip_rejects_a_vision_tower_only_state_dict(tmp_path, clip_state):
    visual_only = {k[len("visual."):]: v for k, v in clip_state.items() if k.startswith("visual.")}
    with pytest.raises(ValueError, match=r"has no 'visual\.\*' keys; it should hold the full open_clip state dict"):
        clip_with(tmp_path, visual_only)


def test_adapter_refuses_a_malicious_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"visual.conv1.weight": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"encoders\.clip\.pretrained: torch\.load\(weights_only=True\) refused"):
        build(enc_cfg("clip", "ViT-B-16", pretrained=str(path), image_size=64, arch=CLIP_ARCH))
    assert not marker.exists()


def test_dinov2_strict_loading(tmp_path):
    state = timm.create_model("vit_small_patch14_dinov2", img_size=28, **DINO_ARCH).state_dict()
    path = tmp_path / "dino.safetensors"
    save_file(state, str(path))
    enc = build(enc_cfg("dinov2", "vit_small_patch14_dinov2", pretrained=str(path), image_size=28, arch=DINO_ARCH))
    assert all(torch.equal(v, state[k]) for k, v in enc.model.state_dict().items())
    save_file(dict(state, surprise=torch.zeros(2)), str(path))
    with pytest.raises(ValueError, match=r"encoders\.dinov2\.pretrained: .*1 unexpected key \('surprise'\)"):
        build(enc_cfg("dinov2", "vit_small_patch14_dinov2", pretrained=str(path), image_size=28, arch=DINO_ARCH))


def test_sam_loads_the_image_encoder_of_a_full_checkpoint(tmp_path):
    full = _build_sam(32, 2, 2, [1]).state_dict()  # image_encoder.*, prompt_encoder.*, mask_decoder.*
    assert any(k.startswith("mask_decoder.") for k in full)
    path = tmp_path / "sam.pth"
    torch.save(full, path)
    arch = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1])
    enc = build(enc_cfg("sam", "vit_b", pretrained=str(path), arch=arch))
    assert all(torch.equal(v, full[f"image_encoder.{k}"]) for k, v in enc.model.state_dict().items())

    torch.save({k: v for k, v in full.items() if k != "image_encoder.neck.0.weight"}, path)
    with pytest.raises(ValueError, match=r"encoders\.sam\.pretrained: .*1 missing key \('neck\.0\.weight'\)"):
        build(enc_cfg("sam", "vit_b", pretrained=str(path), arch=arch))
    torch.save(dict(full, stray=torch.zeros(1)), path)
    with pytest.raises(ValueError, match=r"1 unexpected key \('stray'\).*full SAM checkpoint"):
        build(enc_cfg("sam", "vit_b", pretrained=str(path), arch=arch))


def test_sam_checkpoint_for_another_size_reports_shape_mismatches(tmp_path):
    path = tmp_path / "sam.pth"
    torch.save(_build_sam(32, 2, 2, [1]).state_dict(), path)
    arch = dict(embed_dim=48, depth=2, num_heads=2, global_attn_indexes=[1])
    with pytest.raises(ValueError, match=r"shape mismatch.*'pos_embed': file \[1, 64, 64, 32\] vs model \[1, 64, 64, 48\]"):
        build(enc_cfg("sam", "vit_b", pretrained=str(path), arch=arch))
