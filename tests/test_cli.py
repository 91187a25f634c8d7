"""The fusion-tower command: info and extract (with resume), checked against the tower itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from fusion import build_tower
from fusion.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def test_info_prints_table(capsys):
    assert main(["info", "tiny", "--weights", "random", "fusion.grid=3"]) == 0
    text = capsys.readouterr().out
    tower = build_tower("tiny", weights="random", overrides=["fusion.grid=3"])
    for name, enc in tower.encoders.items():
        line = next(l for l in text.splitlines() if l.startswith(name + " "))
        assert f"{enc.grid[0]}x{enc.grid[1]}" in line and f" {enc.dim} " in line
    assert f"tokens: 9 x {tower.hidden_size}" in text


def test_info_reports_bad_override(capsys):
    assert main(["info", "tiny", "--weights", "random", "fusion.grd=3"]) == 2
    assert "fusion.grd" in capsys.readouterr().err


def test_extract_matches_tower_and_resumes(tmp_path, capsys):
    out = tmp_path / "feats"
    args = ["extract", "tiny", "--weights", "random", "--images", str(EXAMPLES), "--out", str(out),
            "--batch-size", "3", "--shard-size", "2", "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = sorted(p.name for p in EXAMPLES.iterdir())
    assert sorted(n for v in manifest["shards"].values() for n in v) == names
    feats = {}
    for shard in manifest["shards"]:
        feats.update(load_file(str(out / shard)))
    tower = build_tower("tiny", weights="random").eval()
    with torch.no_grad():
        for name in names:
            with Image.open(EXAMPLES / name) as im:
                batch = tower.image_processor(im.convert("RGB"))
            torch.testing.assert_close(feats[name], tower(**batch)[0], atol=1e-5, rtol=1e-5)
    # a second run skips every completed shard and rewrites nothing
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert main(args) == 0
    assert "2 shards already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == stamps


def test_extract_records_unreadable_image(tmp_path, capsys):
    (tmp_path / "ok.png").write_bytes((EXAMPLES / "grid.png").read_bytes())
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    code = main(["extract", "tiny", "--weights", "random", "--images", str(tmp_path), "--out",
                 str(tmp_path / "o"), "--no-progress"])
    assert code == 1
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert list(manifest["failed"]) == ["broken.jpg"] and manifest["num_images"] == 1


def test_python_dash_m_runs():
    proc = subprocess.run([sys.executable, "-m", "fusion", "presets"], capture_output=True, text=True)
    assert proc.returncode == 0 and "vsre" in proc.stdout.split()


def test_cli_turns_on_huge_page_allocation_unless_told_otherwise(monkeypatch, capsys):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert main(["presets"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert main(["presets"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
