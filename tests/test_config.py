"""Config loading, overrides and validation errors (each names the dotted key)."""
import json

import pytest
import yaml

from fusion.config import TowerConfig, list_presets, load_config


def test_presets_listed_and_vsre_shape():
    assert {"vsre", "llava15", "dinosiglip", "tiny"} <= set(list_presets())
    cfg = load_config("vsre")
    assert list(cfg.encoders) == ["clip", "siglip", "sam", "dino"]
    assert cfg.encoders["clip"].model == "ViT-L-14-336"
    assert cfg.encoders["clip"].layer == -2
    assert cfg.encoders["sam"].pretrained == "sa1b"
    assert cfg.encoders["dino"].image_size == 336
    assert cfg.encoders["dino"].freeze is True
    assert (cfg.fusion.grid, cfg.fusion.resample, cfg.fusion.norm) == (24, "area", "layernorm")
    assert (cfg.projector.type, cfg.projector.out_dim) == ("mlp2x_gelu", 4096)


def test_llava15_has_no_projector():
    cfg = load_config("llava15")
    assert list(cfg.encoders) == ["clip"] and cfg.projector.type == "none"


def test_overrides_set_drop_and_add():
    cfg = load_config("vsre", ["fusion.grid=16", "encoders.sam=null", "encoders.clip.layer=-1",
                               "encoders.clip.arch={depth: 2}"])
    assert cfg.fusion.grid == 16
    assert list(cfg.encoders) == ["clip", "siglip", "dino"]
    assert cfg.encoders["clip"].layer == -1
    assert cfg.encoders["clip"].arch == {"depth": 2}
    added = load_config("llava15", ["encoders.dino={type: dinov2, model: vit_small_patch14_dinov2}"])
    assert list(added.encoders) == ["clip", "dino"]  # order of the mapping is the channel order
    assert load_config("vsre", {"fusion.grid": 12}).fusion.grid == 12


def test_round_trip_through_dict_yaml_json(tmp_path):
    cfg = load_config("vsre", ["encoders.sam=null"])
    assert load_config(cfg) == cfg
    assert load_config(cfg.to_dict()) == cfg
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert load_config(tmp_path / "c.yaml") == cfg
    assert load_config(str(tmp_path / "c.json")) == cfg
    assert isinstance(cfg, TowerConfig)


@pytest.mark.parametrize("overrides, key, fragment", [
    (["fusion.gird=16"], "fusion.gird", "did you mean 'grid'"),
    (["fusion.grid=-3"], "fusion.grid", "must be >= 1"),
    (["fusion.grid=abc"], "fusion.grid", "expected an integer"),
    (["fusion.resample=nearest"], "fusion.resample", "['area', 'bilinear']"),
    (["fusion.combine=sum"], "fusion.combine", "channel_concat"),
    (["fusion.kernels=cuda"], "fusion.kernels", "'auto'"),
    (["encoders.clip.type=clipp"], "encoders.clip.type", "did you mean 'clip'"),
    (["encoders.clip.layr=-2"], "encoders.clip.layr", "did you mean 'layer'"),
    (["encoders.clip.layer=0"], "encoders.clip.layer", "-1 is the last"),
    (["encoders.clip.freeze=maybe"], "encoders.clip.freeze", "true or false"),
    (["encoders.clip.dtype=float64"], "encoders.clip.dtype", "bfloat16"),
    (["encoders.clip.image_size=0"], "encoders.clip.image_size", ">= 1"),
    (["projector.out_dim=0"], "projector.out_dim", ">= 1"),
    (["projector.type=mlp3x"], "projector.type", "mlp2x_gelu"),
    (["projector.out_dim=null"], "projector.out_dim", "needs an output width"),
    (["encoders.nope=null"], "encoders.nope", "no encoder 'nope'"),
    (["encoders.clip.model=null"], "encoders.clip.model", "non-empty string"),
    (["projectr.type=linear"], "projectr", "did you mean 'projector'"),
])
def test_bad_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ValueError) as err:
        load_config("vsre", overrides)
    message = str(err.value)
    assert message.startswith(key) or f"'{key}" in message or key in message, message
    assert fragment in message, message


def test_empty_encoders_and_missing_fields():
    with pytest.raises(ValueError, match="encoders: expected a non-empty mapping"):
        load_config({"encoders": {}})
    with pytest.raises(ValueError, match=r"encoders.a.model: missing"):
        load_config({"encoders": {"a": {"type": "clip"}}})
    with pytest.raises(ValueError, match="encoder names must be identifiers"):
        load_config({"encoders": {"my-enc": {"type": "clip", "model": "x"}}})


def test_unknown_preset_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"did you mean 'vsre'"):
        load_config("vrse")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoders: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(TypeError, match="source"):
        load_config(42)


def test_yaml_python_tag_is_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("encoders: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(evil)


def test_override_value_is_parsed_safely():
    with pytest.raises(ValueError, match="fusion.grid"):
        load_config("vsre", ["fusion.grid=!!python/object/apply:os.system ['true']"])
    with pytest.raises(ValueError, match="dotted.key=value"):
        load_config("vsre", ["fusion.grid"])


def test_yaml_file_on_disk_is_plain_mapping():
    from fusion.config import PRESET_DIR

    for preset in list_presets():
        data = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
        assert isinstance(data, dict) and "encoders" in data


def test_multi_granularity_keys_round_trip(tmp_path):
    cfg = load_config("tiny", ["fusion.levels=[4, 2, 1]", "fusion.reduce={keep: 8, metric: dino}",
                               "fusion.pos_embed=sincos", "encoders.clip.scales=[1, 2]"])
    assert cfg.fusion.levels == [4, 2, 1] and cfg.fusion.extra_levels() == [2, 1]
    assert (cfg.fusion.reduce.method, cfg.fusion.reduce.keep, cfg.fusion.reduce.metric) == ("bipartite", 8, "dino")
    assert cfg.encoders["clip"].scales == [1, 2] and cfg.encoders["sam"].scales == [1]
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg
    assert load_config(cfg.to_dict()) == cfg
    off = load_config(cfg, ["fusion.reduce=null", "fusion.levels=[]"])
    assert off.fusion.reduce is None and off.fusion.levels == [] and off.fusion.extra_levels() == []
    with pytest.raises(ValueError, match="fusion.pos_embed.*'sincos'"):
        load_config("tiny", ["fusion.pos_embed=rope"])
