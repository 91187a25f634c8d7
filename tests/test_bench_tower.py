"""benchmarks/bench_tower.py run as a user runs it (a subprocess; tests never import benchmark
scripts): one tiny run writes the table, both CSVs and the plot.

Timings are not asserted (machines are shared and noisy).
"""
import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import fusion

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_tower.py"


def run_bench(*args):
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True, text=True)


def test_bench_tower_writes_table_csvs_and_plot(tmp_path):
    proc = run_bench("--presets", "tiny", "--batch-size", "1", "--iters", "1", "--threads", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny" in proc.stdout and "fusion" in proc.stdout and "naive" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "bench_tower.csv")))
    assert [r["tower"] for r in rows] == ["fusion", "naive"]
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    stages = {r["stage"] for r in csv.DictReader(open(tmp_path / "bench_tower_stages.csv"))}
    encoders = fusion.load_config("tiny").encoders  # the stages follow the preset, not a list kept here
    assert stages == {"preprocess", *(f"enc:{name}" for name in encoders), "merge", "projector"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "bench_tower.png").stat().st_size > 0

