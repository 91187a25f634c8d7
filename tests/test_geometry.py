"""Shapes without weights (fusion/geometry.py) and imports that cost nothing until needed.

The geometry comes from a build on the meta device; it must equal what the real tower
reports (a CPU build of the same config, read attribute by attribute), and ``fusion-tower
info``, the Hugging Face config and LLaVA's unloaded tower must get their numbers from it
without ever materialising a tower (a real build is made to fail in those tests).
"""
import json
import subprocess
import sys

import pytest
import torch

import fusion
from fusion.cli import main
from fusion.geometry import geometry_of, tower_geometry
from fusion.tower import MultiEncoderTower, build_tower

HEAVY = ("torch", "open_clip", "timm", "segment_anything", "transformers")


def loaded_after(code: str) -> dict:
    """Which of :data:`HEAVY` a fresh interpreter has imported after running ``code``."""
    probe = code + f"\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_fusion_and_help_import_no_heavy_library():
    assert not any(loaded_after("import fusion").values())
    help_code = ("from fusion.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert not any(loaded_after(help_code).values())


def test_loading_a_config_imports_no_upstream_library_and_not_torch():
    """Config is data: checking encoders.<name>.type needs only the type names (fusion.encoder_types)."""
    code = ("import fusion\nfusion.load_config('vsre')\nfusion.list_encoders()\n"
            "try:\n    fusion.load_config('tiny', ['encoders.clip.type=clp'])\nexcept ValueError as err:\n"
            "    assert 'encoders.clip.type' in str(err) and \"'clp'\" in str(err) and 'dinov2' in str(err)\n"
            "else:\n    raise AssertionError('an unknown type was accepted')")
    loaded = loaded_after(code)
    assert not any(loaded.values()), loaded


def test_lazy_package_attributes_still_resolve():
    assert fusion.build_tower is build_tower and "build_tower" in dir(fusion)
    assert fusion.tower.MultiEncoderTower is MultiEncoderTower  # submodules as attributes
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fusion.nope


@pytest.mark.parametrize("overrides", [
    [],
    ["fusion.levels=[2,1]", "projector.type=none", "projector.out_dim=null"],
    ["fusion.combine=sequence_concat", "fusion.width=16"],
    ["encoders.sam.scales=[1,2]", "encoders.clip.layer=1", "processor.size=120"],
    ["fusion.reduce={method: bipartite, keep: 5}"],
])
def test_meta_geometry_equals_the_built_tower(overrides):
    built = geometry_of(build_tower("tiny", overrides, weights="random"))
    meta = tower_geometry("tiny", overrides, weights="random")
    assert meta == built


def test_vsre_geometry_by_hand():
    geo = tower_geometry("vsre")
    assert (geo.num_patches, geo.hidden_size, geo.fused_dim, geo.grid, geo.image_size) == (576, 4096, 3456, 24, 1024)
    by_name = {e.name: e for e in geo.encoders}
    assert {n: (e.grid, e.dim, e.image_size) for n, e in by_name.items()} == {
        "clip": ((24, 24), 1024, 336), "siglip": ((27, 27), 1152, 384), "sam": ((64, 64), 256, 1024),
        "dino": ((24, 24), 1024, 336)}
    # layer -2 of 24 CLIP blocks keeps 23 of them (where the weights come from: weights_report, info)
    assert (by_name["clip"].depth, by_name["clip"].upstream) == (24, "open_clip:ViT-L-14-336")
    # the architecture never depends on the weights: the same geometry under weights="random"
    assert tower_geometry("vsre", weights="random") == geo


@pytest.fixture
def no_real_build(monkeypatch):
    """Building a tower anywhere but on the meta device fails the test."""
    real_init = MultiEncoderTower.__init__

    def guarded(self, *args, **kwargs):
        if torch.empty(()).device.type != "meta":
            raise AssertionError("a tower with real weights was built")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(MultiEncoderTower, "__init__", guarded)


def test_info_builds_nothing_real(no_real_build, capsys):
    assert main(["info", "tiny", "--weights", "random", "fusion.grid=3"]) == 0
    text = capsys.readouterr().out
    geo = tower_geometry("tiny", ["fusion.grid=3"], weights="random")
    for enc in geo.encoders:
        line = next(l for l in text.splitlines() if l.startswith(enc.name + " "))
        assert f"{enc.grid[0]}x{enc.grid[1]}" in line and f"{enc.params / 1e6:.2f}M" in line
    assert f"tokens: 9 x {geo.hidden_size} (fused width {geo.fused_dim})" in text


def test_llava_delay_load_and_hf_config_use_the_meta_path(no_real_build):
    from types import SimpleNamespace

    from fusion.llava import build_vision_tower

    tower = build_vision_tower(SimpleNamespace(mm_vision_tower="tiny", mm_vision_select_layer=-2), delay_load=True)
    assert not tower.is_loaded
    geo = tower_geometry(tower.cfg_only, weights="random")
    fused_width = 64 + 96 + 32 + 48  # LLaVA drops the tower's projector: the fused tokens' width
    assert (tower.hidden_size, tower.num_patches) == (geo.hidden_size, geo.num_patches) == (fused_width, 16)
    pytest.importorskip("transformers")
    import fusion.hf as fhf

    config = fhf.FusionVisionConfig(tower="tiny", weights="random").resolve_geometry()
    geo = tower_geometry(config.tower_config_object(), weights="random")
    assert (config.hidden_size, config.num_patches, config.image_size) == (geo.hidden_size, geo.num_patches, 98)
