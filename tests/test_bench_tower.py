"""Smoke test of benchmarks/bench_tower.py: one tiny run writes the table, both CSVs and the plot.

Timings are not asserted (machines are shared and noisy); the naive tower is checked to
compute the same kind of output as the fused one (same token count and width).
"""
import csv
import importlib.util
from pathlib import Path

import pytest
import torch

import fusion

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tower.py"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (restored after): fast and steady on small, shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_tower", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_naive_tower_matches_fused_shapes(bench):
    tower = fusion.build_tower("tiny", weights="random").eval()
    images = bench.load_images(2)
    with torch.inference_mode():
        fused = bench.run_fusion(tower, images, bench.Clock(tower.device))
        naive = bench.run_naive(tower, images, bench.Clock(tower.device))
        reference = tower(tower.image_processor(images)["pixel_values"])
    assert fused.shape == naive.shape == reference.shape
    torch.testing.assert_close(fused, reference)  # the staged run is the tower's own forward


def test_bench_tower_writes_table_csvs_and_plot(bench, tmp_path, capsys):
    args = ["--presets", "tiny", "--batch-size", "1", "--iters", "1", "--threads", "1", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "| tiny" in out and "fusion" in out and "naive" in out
    rows = list(csv.DictReader(open(tmp_path / "bench_tower.csv")))
    assert [r["tower"] for r in rows] == ["fusion", "naive"]
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    stages = {r["stage"] for r in csv.DictReader(open(tmp_path / "bench_tower_stages.csv"))}
    assert stages == {"preprocess", "enc:clip", "enc:siglip", "enc:sam", "enc:dino", "merge", "projector"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "bench_tower.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        bench.main(["--presets", "tinyy"])
