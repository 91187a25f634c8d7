"""extract --cache-encoders + FeatureCache + tower.merge_and_project, checked against the tower
run on the images themselves; the projector-training example's loss falls."""
import json
import runpy
from pathlib import Path

import pytest
import torch
from PIL import Image

from fusion import build_tower
from fusion.cli import main
from fusion.feature_cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"
NAMES = sorted(p.name for p in EXAMPLES.iterdir())


@pytest.fixture(scope="module")
def tower():
    return build_tower("tiny", weights="random", seed=0).eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    code = main(["extract", "tiny", "--weights", "random", "--images", str(EXAMPLES), "--out", str(out),
                 "--cache-encoders", "--shard-size", "3", "--batch-size", "2", "--no-progress"])
    assert code == 0
    return out


def _batch(tower, name):
    with Image.open(EXAMPLES / name) as im:
        return tower.image_processor(im.convert("RGB"))


def test_cache_equals_outputs_from_images(tower, cache_dir):
    cache = FeatureCache(cache_dir)
    assert cache.names == NAMES and len(cache) == len(NAMES)
    assert list(cache.encoders) == list(tower.encoders)
    cache.check(tower)
    for name in NAMES:
        batch = _batch(tower, name)  # image_sizes: each encoder letterboxed with its own colour
        with torch.no_grad():
            grids = tower.encode(batch["pixel_values"], image_sizes=batch["image_sizes"])
            from_images = tower(**batch)
            from_cache = tower.merge_and_project(cache.grids([name]))
        cached = cache.grids([name])
        for enc, grid in grids.items():
            assert cached[enc].shape == grid.shape == (1, *tower.encoders[enc].grid, tower.encoders[enc].dim)
            torch.testing.assert_close(cached[enc], grid, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(from_cache, from_images, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cache.tokens([name]), from_images, rtol=1e-6, atol=1e-6)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert len(manifest["encoder_shards"]) == len(manifest["shards"]) == 2


def test_dataloader_batches(cache_dir, tower):
    cache = FeatureCache(cache_dir)
    loader = torch.utils.data.DataLoader(cache, batch_size=3, shuffle=False)
    names, grids = next(iter(loader))
    assert list(names) == NAMES[:3]
    assert grids["sam"].shape == (3, 6, 6, 32)
    torch.testing.assert_close(grids["dino"], cache.grids(NAMES[:3])["dino"], rtol=0, atol=0)
    epoch = [n for batch_names, _ in cache.batches(3, shuffle=True, seed=1) for n in batch_names]
    assert sorted(epoch) == NAMES  # every image once per epoch
    assert epoch == [n for batch_names, _ in cache.batches(3, shuffle=True, seed=1) for n in batch_names]


def test_cache_serves_other_fusion_settings_but_not_other_encoders(cache_dir):
    cache = FeatureCache(cache_dir)
    # the grids are taken before the merge: another fusion grid reuses the cache
    other_grid = build_tower("tiny", weights="random", overrides=["fusion.grid=3"]).eval()
    cache.check(other_grid)
    batch = _batch(other_grid, NAMES[0])
    with torch.no_grad():
        torch.testing.assert_close(other_grid.merge_and_project(cache.grids(NAMES[:1])), other_grid(**batch),
                                   rtol=1e-6, atol=1e-6)
    fewer = build_tower("tiny", weights="random", overrides=["encoders.sam=null"])
    with pytest.raises(ValueError, match="differ from the cache"):
        cache.check(fewer)
    with pytest.raises(ValueError, match="missing \\[\\], unexpected \\['sam'\\]"):
        fewer.merge_and_project(cache.grids(NAMES[:1]))
    with pytest.raises(KeyError, match="nope.png"):
        cache.grids(["nope.png"])


def test_cache_flag_must_match_on_resume(tmp_path, capsys):
    args = ["extract", "tiny", "--weights", "random", "--images", str(EXAMPLES / NAMES[0]), "--out",
            str(tmp_path), "--no-progress"]
    assert main(args) == 0
    with pytest.raises(ValueError, match="holds no encoder cache"):
        FeatureCache(tmp_path)
    assert main(args + ["--cache-encoders"]) == 2
    assert "--cache-encoders" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        FeatureCache(tmp_path / "nothing")


def test_projector_training_from_cache_loss_falls(cache_dir):
    example = runpy.run_path(str(ROOT / "examples" / "train_projector_from_cache.py"))
    student = build_tower("tiny", weights="random", seed=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    losses = example["train_projector"](student, FeatureCache(cache_dir), steps=30, log=None)
    assert len(losses) == 30 and losses[-1] < 0.3 * losses[0], losses
    after = student.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"merge", "projector"}  # the frozen encoders never moved
