"""Tags, local files, caches and reports: where an encoder's weights come from.

No network: a tag's file is placed in an isolated Hugging Face hub cache (what a download
elsewhere leaves behind) or served by a local HTTP server that answers like the hub and
like a download site (:mod:`weights_helpers`). "By tag" then runs the real tag route:
the upstream's cache lookup (offline) or download, then the load; its result is compared
bit for bit with the same tensors from a local file, and with the upstream library's own
tag loader (open_clip, timm, segment_anything) on the same cache.
"""
import hashlib
import json

import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from segment_anything.build_sam import _build_sam

import fusion
from fusion.cli import main
from fusion.config import EncoderConfig, list_presets, load_config
from fusion.encoders import sam as sam_module
from fusion.encoders.registry import get_encoder_class
from fusion.encoders.sources import WeightsUnavailable, resolve_pretrained
from weights_helpers import LocalHub, isolated_caches, put_in_hub_cache, unpruned

TEXT = {"layers": 1, "width": 32, "heads": 2, "vocab_size": 64, "context_length": 8}
# llava15 itself (its QuickGELU CLIP ViT-L/14-336 at 336 px, layer -2), narrowed and shortened
LLAVA_SMALL = {"encoders.clip.arch.embed_dim": 16, "encoders.clip.arch.text_cfg": TEXT,
               "encoders.clip.arch.vision_cfg": {"layers": 3, "width": 64, "head_width": 32}}
# dinosiglip itself (timm DINOv2-L reg4 at 378 px, open_clip SigLIP SO400M-384), narrowed and shortened
DINO_SMALL = {"embed_dim": 48, "depth": 2, "num_heads": 2}
SIGLIP_SMALL = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "test_vit3"}, "text_cfg": TEXT}
DINOSIGLIP_SMALL = {"encoders.dino.arch": DINO_SMALL, "encoders.siglip.arch": SIGLIP_SMALL}
SAM_SMALL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1]}


def states_equal(ref, ours, pruned=()):
    """``ours`` holds exactly ``ref``'s tensors but the ``pruned`` ones (what the tower never runs)."""
    return set(ref) == set(ours) | set(pruned) and all(torch.equal(ref[k], v) for k, v in ours.items())


def sha12(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# ----------------------------------------------------------------------------- tags, bit for bit


@pytest.mark.parametrize("overrides", [LLAVA_SMALL, pytest.param({}, marks=pytest.mark.slow)], ids=["small", "full"])
def test_llava15_by_tag_equals_llava15_from_a_local_file_bit_for_bit(tmp_path, monkeypatch, overrides):
    caches = isolated_caches(monkeypatch, tmp_path)
    # the tag's architecture (the preset's: QuickGELU) with random weights ...
    with unpruned():  # the whole model, as the tag's file holds it
        by_config = fusion.build_tower("llava15", overrides, weights="random", seed=3)
    # ... written as the tag's file: the full open_clip state dict, as open_clip publishes it
    small = {"embed_dim": 16, "text_cfg": TEXT} if overrides else {}
    vision_cfg = {**open_clip.get_model_config("ViT-L-14-336")["vision_cfg"],
                  **overrides.get("encoders.clip.arch.vision_cfg", {})}
    full = open_clip.create_model("ViT-L-14-336", force_quick_gelu=True, vision_cfg=vision_cfg, **small)
    full.visual.load_state_dict(by_config.encoders["clip"].model.state_dict())
    file = tmp_path / "clip.safetensors"
    save_file(full.state_dict(), str(file))
    cached = put_in_hub_cache(caches["hf"], "timm/vit_large_patch14_clip_336.openai", "open_clip_model.safetensors",
                              file)

    del full
    by_tag = fusion.build_tower("llava15", overrides)  # weights="pretrained": openai, from open_clip's cache (offline)
    from_file = fusion.build_tower("llava15", {**overrides, "encoders.clip.pretrained": str(file)})
    pixels = torch.rand(2, 3, 336, 336)
    with torch.no_grad():
        tokens = by_tag(pixels)
        assert torch.equal(tokens, from_file(pixels)) and torch.equal(tokens, by_config(pixels))
    for tower in (by_tag, from_file):  # the preset's QuickGELU whatever the source (the bug of issue 11)
        assert isinstance(tower.encoders["clip"].model.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    # open_clip's own tag loader, on the same cache, loads the same tensors
    del from_file, by_config
    ref = open_clip.create_model("ViT-L-14-336", pretrained="openai", force_quick_gelu=True, vision_cfg=vision_cfg,
                                 **small)
    clip = by_tag.encoders["clip"]
    assert states_equal(ref.visual.state_dict(), clip.model.state_dict(), clip.pruned)
    report = by_tag.weights_report()["clip"]
    assert (report["source"], report["pretrained"], report["library"]) == ("tag", "openai", "open_clip")
    assert report["files"] == [str(cached)] and report["sha256"] == sha12(file)


def test_dinosiglip_tags_equal_local_files_and_the_upstream_loaders(tmp_path, monkeypatch):
    caches = isolated_caches(monkeypatch, tmp_path)
    dino_native = timm.create_model("vit_large_patch14_reg4_dinov2", **DINO_SMALL)  # 518 px, as lvd142m is
    siglip_vision = {**open_clip.get_model_config("ViT-SO400M-14-SigLIP-384")["vision_cfg"], **SIGLIP_SMALL["vision_cfg"]}
    siglip_native = open_clip.create_model("ViT-SO400M-14-SigLIP-384", embed_dim=32, text_cfg=TEXT,
                                           vision_cfg=siglip_vision)
    dino_file, siglip_file = tmp_path / "dino.safetensors", tmp_path / "siglip.safetensors"
    save_file(dino_native.state_dict(), str(dino_file))
    save_file(siglip_native.state_dict(), str(siglip_file))
    put_in_hub_cache(caches["hf"], "timm/vit_large_patch14_reg4_dinov2.lvd142m", "model.safetensors", dino_file)
    put_in_hub_cache(caches["hf"], "timm/ViT-SO400M-14-SigLIP-384", "open_clip_model.safetensors", siglip_file)

    by_tag = fusion.build_tower("dinosiglip", DINOSIGLIP_SMALL)
    from_files = fusion.build_tower("dinosiglip", {**DINOSIGLIP_SMALL, "encoders.dino.pretrained": str(dino_file),
                                                   "encoders.siglip.pretrained": str(siglip_file)})
    pixels = torch.rand(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(by_tag(pixels), from_files(pixels))
    # timm's and open_clip's own tag loaders (position embeddings resampled 518 -> 378 px by timm's filter)
    timm_ref = timm.create_model("vit_large_patch14_reg4_dinov2.lvd142m", pretrained=True, img_size=378, **DINO_SMALL)
    dino, siglip = by_tag.encoders["dino"], by_tag.encoders["siglip"]
    assert states_equal(timm_ref.state_dict(), dino.model.state_dict(), dino.pruned)
    clip_ref = open_clip.create_model("ViT-SO400M-14-SigLIP-384", pretrained="webli", embed_dim=32, text_cfg=TEXT,
                                      vision_cfg=siglip_vision)
    assert states_equal(clip_ref.visual.state_dict(), siglip.model.state_dict(), siglip.pruned)
    notes = by_tag.weights_report()["dino"]["notes"]
    assert notes == ["position embeddings resampled from 1369 to 729 tokens"]


def sam_tag(monkeypatch, hub, data: bytes, md5=None, name="sam_vit_b_abc123.pth"):
    """Register a SAM tag `test` for vit_b (SAM_SMALL's architecture) served by ``hub``."""
    arch = {**sam_module._official("vit_b"), **SAM_SMALL, "global_attn_indexes": (1,)}
    url = hub.add_url(f"/segment_anything/{name}", data)
    ckpt = sam_module.SamCheckpoint(url, md5 or hashlib.md5(data).hexdigest(), arch)
    monkeypatch.setitem(sam_module.SAM_TAGS, "test", {"vit_b": ckpt})
    return ckpt


def sam_cfg(pretrained):
    return EncoderConfig(name="sam", type="sam", model="vit_b", pretrained=str(pretrained), arch=SAM_SMALL)


def test_sam_tag_downloads_into_torch_hub_cache_with_md5_check(tmp_path, monkeypatch):
    caches = isolated_caches(monkeypatch, tmp_path)
    file = tmp_path / "sam.pth"
    torch.save(_build_sam(32, 2, 2, [1]).state_dict(), file)  # a full SAM checkpoint
    with LocalHub() as hub:
        sam_tag(monkeypatch, hub, file.read_bytes())
        by_tag = get_encoder_class("sam")(sam_cfg("test"))
        assert hub.served == 1
        cached = caches["torch_checkpoints"] / "sam_vit_b_abc123.pth"
        assert cached.read_bytes() == file.read_bytes()
        again = get_encoder_class("sam")(sam_cfg("test"))  # cached: nothing fetched
        assert hub.served == 1
    from_file = get_encoder_class("sam")(sam_cfg(file))
    reference = _build_sam(32, 2, 2, [1], checkpoint=str(file))  # segment_anything's own loader
    for enc in (by_tag, again):
        assert states_equal(enc.model.state_dict(), from_file.model.state_dict())
        assert states_equal(enc.model.state_dict(), reference.image_encoder.state_dict())
    assert by_tag.loaded_weights.report()["files"] == [str(cached)]


def test_sam_download_with_a_wrong_md5_is_refused_and_not_cached(tmp_path, monkeypatch):
    caches = isolated_caches(monkeypatch, tmp_path)
    with LocalHub() as hub:
        sam_tag(monkeypatch, hub, b"a substituted file", md5=hashlib.md5(b"the real file").hexdigest())
        with pytest.raises(WeightsUnavailable, match=r"encoders\.sam\.pretrained: .*MD5 is [0-9a-f]{32}, expected "
                                                     r"[0-9a-f]{32}.*not placed in the cache"):
            get_encoder_class("sam")(sam_cfg("test"))
    assert not caches["torch_checkpoints"].exists() or not any(caches["torch_checkpoints"].iterdir())


def test_sam_offline_error_names_url_cache_path_and_local_file(tmp_path, monkeypatch):
    caches = isolated_caches(monkeypatch, tmp_path)
    with LocalHub() as hub:
        ckpt = sam_tag(monkeypatch, hub, b"never served")
    # the server is gone: like a machine without network
    with pytest.raises(WeightsUnavailable) as info:
        get_encoder_class("sam")(sam_cfg("test"))
    msg = str(info.value)
    assert msg.startswith("encoders.sam.pretrained: fetching the SAM checkpoint 'test' of vit_b")
    assert ckpt.url in msg and str(caches["torch_checkpoints"] / "sam_vit_b_abc123.pth") in msg
    assert "set encoders.sam.pretrained to the local file" in msg


def test_sa1b_is_the_official_checkpoint_of_each_size():
    for size, (name, md5) in {"vit_b": ("sam_vit_b_01ec64.pth", "01ec64d29a2fca3f0661936605ae66f8"),
                              "vit_l": ("sam_vit_l_0b3195.pth", "0b3195507c641ddb6910d2bb5adee89c"),
                              "vit_h": ("sam_vit_h_4b8939.pth", "4b8939a88964f0f4ff5f5b2642c598a6")}.items():
        cfg = EncoderConfig(name="sam", type="sam", model=size, pretrained="sa1b")
        remote = get_encoder_class("sam").tag_checkpoint(cfg, "sa1b")
        assert remote.url == "https://dl.fbaipublicfiles.com/segment_anything/" + name and remote.md5 == md5
        assert remote.cache_file.endswith(f"hub/checkpoints/{name}") and md5.startswith(name[-10:-4])
        # the preset's SAM builds exactly the architecture of the official file
        sam_module._check_tag_arch(cfg, sam_module._encoder_kwargs(cfg, "encoders.sam"), sam_module.SAM_TAGS["sa1b"][size],
                                   "encoders.sam")


# ----------------------------------------------------------------------------- never random by surprise


def test_no_shipped_preset_runs_random_weights_by_accident():
    for preset in list_presets():
        for enc in load_config(preset).encoders.values():
            cls = get_encoder_class(enc.type)
            kind = resolve_pretrained(enc, cls.pretrained_tags(enc), False, cls.library).kind
            assert kind == ("random" if preset == "tiny" else "tag"), (preset, enc.name, enc.pretrained)
            assert enc.pretrained is not None  # tiny says `random` explicitly
    assert load_config("vsre").encoders["sam"].pretrained == "sa1b"


def test_vsre_offline_with_empty_caches_fails_at_once_naming_what_is_missing(tmp_path, monkeypatch):
    caches = isolated_caches(monkeypatch, tmp_path)
    with pytest.raises(WeightsUnavailable) as info:
        fusion.build_tower("vsre")  # fails before any encoder is built
    msg = str(info.value)
    assert msg.startswith("encoders.clip.pretrained: fetching the open_clip tag 'openai' of ViT-L-14-336")
    assert "https://huggingface.co/timm/vit_large_patch14_clip_336.openai/resolve/main/open_clip_model.safetensors" in msg
    assert str(caches["hf"] / "models--timm--vit_large_patch14_clip_336.openai") in msg
    assert "fusion-tower download" in msg and "local file" in msg


def test_null_pretrained_is_refused_under_pretrained_weights_and_random_still_works():
    with pytest.raises(ValueError, match=r"encoders\.sam\.pretrained: not set \(null\) while the tower loads "
                                         r"pretrained weights.*encoders\.sam\.pretrained: random"):
        fusion.build_tower("tiny", {"encoders.sam.pretrained": None})
    random = fusion.build_tower("tiny", {"encoders.sam.pretrained": None}, weights="random")
    assert random.weights_report()["sam"]["source"] == "random"


# ----------------------------------------------------------------------------- reports, save, manifest


@pytest.fixture
def sam_file(tmp_path):
    """A SAM checkpoint for the tiny preset's SAM, written from a tiny tower built with seed 7."""
    sam = fusion.build_tower("tiny", weights="random", seed=7).encoders["sam"].model
    path = tmp_path / "sam.safetensors"
    save_file({f"image_encoder.{k}": v.contiguous() for k, v in sam.state_dict().items()}, str(path))
    return path


def test_weights_report_names_every_source(sam_file):
    tower = fusion.build_tower("tiny", {"encoders.sam.pretrained": str(sam_file)}, seed=5)
    report = tower.weights_report()
    assert report["sam"] == {"source": "file", "pretrained": str(sam_file), "library": "segment_anything",
                             "files": [str(sam_file)], "sha256": sha12(sam_file)}
    for name in ("clip", "siglip", "dino"):
        assert report[name]["source"] == "random" and report[name]["seed"] == 5
    assert len({report[n]["encoder_seed"] for n in ("clip", "siglip", "dino")}) == 3
    rnd = fusion.build_tower("tiny", {"encoders.sam.pretrained": str(sam_file)}, weights="random").weights_report()
    assert rnd["sam"]["source"] == "random" and "is not loaded" in rnd["sam"]["notes"][0]


def test_save_pretrained_records_sources_and_refuses_a_changed_checkpoint(tmp_path, sam_file):
    tower = fusion.build_tower("tiny", {"encoders.sam.pretrained": str(sam_file)})
    tower.save_pretrained(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "tower.json").read_text())
    assert meta["weight_sources"] == tower.weights_report()
    again = fusion.MultiEncoderTower.from_pretrained(tmp_path / "saved")
    assert again.weights_report() == tower.weights_report()
    other = fusion.build_tower("tiny", weights="random", seed=8).encoders["sam"].model.state_dict()
    save_file({f"image_encoder.{k}": v.contiguous() for k, v in other.items()}, str(sam_file))
    with pytest.raises(ValueError, match=rf"encoders\.sam\.pretrained: .* was saved with weights sha256 "
                                         rf"{meta['weight_sources']['sam']['sha256']}.*now gives {sha12(sam_file)}"):
        fusion.MultiEncoderTower.from_pretrained(tmp_path / "saved")


def test_info_and_extract_manifest_name_the_sources(tmp_path, sam_file, capsys):
    override = f"encoders.sam.pretrained={sam_file}"
    assert main(["info", "tiny", override]) == 0
    out = capsys.readouterr().out
    assert f"  sam: file: {sam_file} sha256 {sha12(sam_file)}" in out
    assert "  clip: random (seed 0, encoder seed " in out
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(_png())
    out_dir = tmp_path / "feats"
    args = ["extract", "tiny", override, "--images", str(images), "--out", str(out_dir), "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["weight_sources"] == fusion.build_tower("tiny", [override]).weights_report()
    # features on disk say which weights made them: a resume with another checkpoint is refused
    save_file({k: v + 1 for k, v in load_file(str(sam_file)).items()}, str(sam_file))
    assert main(args) == 2
    assert "weight_sources.sam.sha256" in capsys.readouterr().err


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- download


def test_download_fills_the_upstream_caches_and_a_second_run_fetches_nothing(tmp_path, monkeypatch, capsys):
    caches = isolated_caches(monkeypatch, tmp_path, offline=False)
    payload = {"clip": b"clip weights", "siglip": b"siglip weights", "dino": b"dino weights", "sam": b"sam weights"}
    with LocalHub() as hub:
        hub.serve_as_hub(monkeypatch)
        hub.add_hub_file("timm/vit_large_patch14_clip_336.openai", "open_clip_model.safetensors", payload["clip"])
        hub.add_hub_file("timm/ViT-SO400M-14-SigLIP-384", "open_clip_model.safetensors", payload["siglip"])
        hub.add_hub_file("timm/vit_large_patch14_reg4_dinov2.lvd142m", "model.safetensors", payload["dino"])
        url = hub.add_url("/segment_anything/sam_vit_b_01ec64.pth", payload["sam"])
        official = sam_module.SAM_TAGS["sa1b"]["vit_b"]
        monkeypatch.setitem(sam_module.SAM_TAGS["sa1b"], "vit_b", sam_module.SamCheckpoint(
            url, hashlib.md5(payload["sam"]).hexdigest(), official.arch))
        assert main(["download", "vsre"]) == 0
        first = capsys.readouterr().out
        assert hub.served == 4
    rows = {line.split()[0]: line for line in first.splitlines()[2:6]}
    for name in payload:
        assert " downloaded " in rows[name]
    assert "4 downloaded, 0 already cached, 0 failed" in first
    sam_path = caches["torch_checkpoints"] / "sam_vit_b_01ec64.pth"
    assert sam_path.read_bytes() == payload["sam"] and str(sam_path) in rows["sam"]
    assert str(caches["hf"] / "models--timm--vit_large_patch14_clip_336.openai") in rows["clip"]

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # and the server is gone
    assert main(["download", "vsre"]) == 0
    second = capsys.readouterr().out
    assert "0 downloaded, 4 already cached, 0 failed" in second and hub.served == 4
    sam_path.write_bytes(b"tampered")  # a cached file with a published MD5 is checked
    assert main(["download", "vsre"]) == 1
    assert "does not have the MD5" in capsys.readouterr().err


def test_download_of_an_hf_repo_and_of_local_and_random_sources(tmp_path, monkeypatch, capsys, sam_file):
    isolated_caches(monkeypatch, tmp_path, offline=False)
    with LocalHub() as hub:
        hub.serve_as_hub(monkeypatch)
        hub.add_hub_file("someone/clip", "config.json", b'{"model_type": "clip_vision_model"}')
        hub.add_hub_file("someone/clip", "model.safetensors", b"weights")
        overrides = ["encoders.clip.pretrained=hf:someone/clip", f"encoders.sam.pretrained={sam_file}"]
        assert main(["download", "tiny", *overrides]) == 0
        assert hub.served == 2
        assert main(["download", "tiny", *overrides]) == 0
        assert hub.served == 2
    out = capsys.readouterr().out.split("\n\n")
    rows = {line.split()[0]: line for line in out[0].splitlines()[2:]}
    assert " downloaded " in rows["clip"] and "(2 files)" in rows["clip"]
    assert " local " in rows["sam"] and str(sam_file) in rows["sam"] and " random " in rows["dino"]
    assert "1 downloaded, 0 already cached" in out[1] and "0 downloaded, 1 already cached" in out[-1]
