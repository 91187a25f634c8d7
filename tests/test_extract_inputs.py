"""Extraction's input pipeline: DataLoader workers, recursive folders keyed by relative path,
``--images-from`` lists (text and LLaVA JSON), ``--dtype`` / ``--store-dtype``, and resume.

Features are checked against the tower itself, image by image (``tower(**processor(image))``).
"""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fusion import build_tower
from fusion.cli import main
from fusion.image_sources import collect_images, images_from_list

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
TINY = ["extract", "tiny", "--weights", "random", "--no-progress"]


def features(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    feats = {}
    for shard in manifest["shards"]:
        feats.update(load_file(str(out / shard)))
    return feats


def expected(paths: dict, dtype=None) -> dict:
    """key -> the tower's own tokens for that image file."""
    tower = build_tower("tiny", weights="random", dtype=dtype).eval()
    out = {}
    with torch.no_grad():
        for key, path in paths.items():
            with Image.open(path) as im:
                out[key] = tower(**tower.image_processor(im.convert("RGB")))[0]  # with image_sizes, as extract passes
    return out


@pytest.fixture
def tree(tmp_path):
    """Two folders with a same-named image, a nested one, a broken one, a non-image file."""
    root = tmp_path / "imgs"
    for rel, src in (("a/x.png", "grid.png"), ("b/x.png", "portrait.png"), ("a/deep/y.jpg", "house.jpg"),
                     ("z.png", "gray.png")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((EXAMPLES / src).read_bytes())
    (root / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "b" / "notes.txt").write_text("not an image")
    return root


def test_recursive_folders_are_keyed_by_relative_path(tree, tmp_path):
    keys = [i.key for i in collect_images([str(tree)])]
    assert keys == ["a/deep/y.jpg", "a/x.png", "b/broken.jpg", "b/x.png", "z.png"]
    assert main(TINY + ["--images", str(tree), "--out", str(tmp_path / "o"), "--shard-size", "2"]) == 1
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert list(manifest["failed"]) == ["b/broken.jpg"]
    got = features(tmp_path / "o")
    want = expected({k: tree / k for k in keys if k != "b/broken.jpg"})
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


def test_same_key_from_two_sources_is_refused(tree):
    with pytest.raises(ValueError, match=r"--images: two images have the key 'x.png'"):
        collect_images([str(tree / "a" / "x.png"), str(tree / "b" / "x.png")])


def test_workers_give_identical_features_and_still_record_bad_images(tree, tmp_path):
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        code = main(TINY + ["--images", str(tree), "--out", str(out), "--batch-size", "2", "--shard-size", "3",
                            "--workers", str(workers)])
        assert code == 1
        manifest = json.loads((out / "manifest.json").read_text())
        assert list(manifest["failed"]) == ["b/broken.jpg"] and manifest["num_images"] == 4
        runs[workers] = features(out)
    assert sorted(runs[0]) == sorted(runs[2])
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[2][k]), k


def test_text_list_with_root_comments_and_a_missing_file(tree, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my images\na/x.png\n\n  a/deep/y.jpg  \n{tree / 'z.png'}\nmissing/gone.png\na/x.png\n")
    items = images_from_list(str(listing), str(tree))
    assert [i.key for i in items] == sorted(["a/x.png", "a/deep/y.jpg", str(tree / "z.png"), "missing/gone.png"])
    out = tmp_path / "o"
    assert main(TINY + ["--images-from", str(listing), "--image-root", str(tree), "--out", str(out)]) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["failed"]) == ["missing/gone.png"]
    got = features(out)
    want = expected({"a/x.png": tree / "a/x.png", "a/deep/y.jpg": tree / "a/deep/y.jpg",
                     str(tree / "z.png"): tree / "z.png"})
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


def test_llava_json_maps_to_its_own_image_keys_and_resumes_strictly(tree, tmp_path, capsys):
    data = [{"id": "1", "image": "a/x.png", "conversations": []},
            {"id": "2", "image": "a/x.png", "conversations": []},  # a second conversation on one image
            {"id": "3", "conversations": []},  # text only
            {"id": "4", "image": ["b/x.png", "a/deep/y.jpg"]}]  # several images in one entry
    listing = tree / "llava.json"  # default root: the list's folder
    listing.write_text(json.dumps(data))
    out = tmp_path / "o"
    args = TINY + ["--images-from", str(listing), "--out", str(out), "--shard-size", "2"]
    assert main(args) == 0
    got = features(out)
    assert sorted(got) == ["a/deep/y.jpg", "a/x.png", "b/x.png"]
    want = expected({k: tree / k for k in got})
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    # resume: a lost shard entry is redone, the other shard is skipped, features unchanged
    (out / "manifest" / "shard-00001.json").unlink()
    assert main(args) == 0
    assert "1 shards already done" in capsys.readouterr().out
    assert {k: v.tolist() for k, v in features(out).items()} == {k: v.tolist() for k, v in got.items()}
    # a longer list puts other images in the shards: refused, as with --images
    listing.write_text(json.dumps(data + [{"image": "z.png"}, {"image": "a/a.png"}]))
    assert main(args) == 2
    assert "holds shard-00000.json from an earlier run with other images" in capsys.readouterr().err


@pytest.mark.parametrize("text, match", [
    ('{"image": "a.png"}', r"holds a JSON dict; expected a LLaVA-style list"),
    ('[{"image": 3}]', r"entry 0 has image 3; expected a path string"),
    ('["a.png"]', r"entry 0 is a str; expected an object"),
    ("[{", r"is not valid JSON"),
    ("[]", r"names no images"),
])
def test_bad_llava_lists_name_the_option(tmp_path, text, match):
    listing = tmp_path / "data.json"
    listing.write_text(text)
    with pytest.raises(ValueError, match=r"--images-from: .*" + match):
        images_from_list(str(listing))


def test_image_root_needs_images_from(tmp_path, capsys):
    code = main(TINY + ["--images", str(EXAMPLES), "--image-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2 and "--image-root: only applies to --images-from" in capsys.readouterr().err


def test_dtype_and_store_dtype_are_applied_recorded_and_checked_on_resume(tmp_path, capsys):
    out = tmp_path / "o"
    args = TINY + ["--images", str(EXAMPLES), "--out", str(out), "--dtype", "bfloat16", "--store-dtype", "float16"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["dtype"], manifest["store_dtype"]) == ("bfloat16", "float16")
    got = features(out)
    want = expected({p.name: p for p in EXAMPLES.iterdir()}, dtype=torch.bfloat16)
    for k in want:
        assert got[k].dtype == torch.float16 and want[k].dtype == torch.bfloat16
        assert torch.equal(got[k], want[k].to(torch.float16)), k
    assert main(args[:-1] + ["bfloat16"]) == 2  # another --store-dtype on the same --out
    assert "store_dtype: 'float16' there, 'bfloat16' now" in capsys.readouterr().err


def test_build_tower_dtype_keeps_per_encoder_dtype_and_round_trips(tmp_path):
    tower = build_tower("tiny", ["encoders.sam.dtype=float32"], weights="random", dtype="bfloat16")
    dtypes = {name: next(enc.parameters()).dtype for name, enc in tower.encoders.items()}
    assert dtypes == {"clip": torch.bfloat16, "siglip": torch.bfloat16, "sam": torch.float32, "dino": torch.bfloat16}
    assert tower.dtype == torch.bfloat16 and next(tower.merge.parameters()).dtype == torch.bfloat16
    ref = build_tower("tiny", weights="random")  # same seed: the bf16 weights are the fp32 ones rounded
    assert torch.equal(next(tower.encoders["clip"].parameters()), next(ref.encoders["clip"].parameters()).bfloat16())
    tower.save_pretrained(tmp_path / "t")
    again = type(tower).from_pretrained(tmp_path / "t")
    assert again.dtype == torch.bfloat16 and next(again.encoders["sam"].parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"dtype: got 'half'; accepted values are \['float32', 'float16', "):
        build_tower("tiny", weights="random", dtype="half")
    with pytest.raises(TypeError, match=r"dtype: got 3"):
        build_tower("tiny", weights="random", dtype=3)
