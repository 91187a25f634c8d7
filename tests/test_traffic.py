"""The Triton kernels read each input once and write each output once (vsre grids).

Runs benchmarks/traffic.py in a subprocess (it needs the Triton interpreter, whatever
device this machine has), which counts the bytes every load and store of the kernels
touches, and checks each op and direction against the minimal bytes: within 1.10x.
A kernel that gathers overlapping windows (27->24 reads SigLIP's grid 3.2x) fails.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1.10


def _run(args, tmp_path):
    out = tmp_path / "traffic.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "traffic.py"), *args, "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def _check_coverage(rows, table):
    """Every grid is counted in each grid_merge direction (forward, backward with and without
    the grid's gradient) and the pyramid once per direction; the vsre grids are among them."""
    grids = {}
    for r in rows:
        grids.setdefault(r["op"], []).append(r["grid"])
    merge_ops = {"grid_merge fwd", "grid_merge bwd", "grid_merge bwd frozen"}
    assert set(grids) == merge_ops | {"pyramid_pool fwd", "pyramid_pool bwd"}, table
    assert all(sorted(grids[op]) == sorted(grids["grid_merge fwd"]) for op in merge_ops), table
    assert len(grids["pyramid_pool fwd"]) == len(grids["pyramid_pool bwd"]) == 1, table
    names = {g.split()[0] for g in grids["grid_merge fwd"]}
    assert {"clip", "siglip", "sam", "dino"} <= names, table


def test_vsre_traffic_within_limit(tmp_path):
    rows, table = _run([], tmp_path)
    _check_coverage(rows, table)
    for r in rows:
        # >= 1: every input byte is needed (area), so a smaller count means the hooks broke
        assert 1.0 <= r["ratio"] <= LIMIT, f"{r['op']} {r['grid']}: ratio {r['ratio']:.3f}\n{table}"


@pytest.mark.slow
def test_vsre_traffic_small_batch_plans_on_an_h100(tmp_path):
    """B = 1 on an H100 (132 SMs, 50 MiB L2): every grid fits in L2, so the planner takes
    more programs (the forward fills the SMs) at the price of requests that are L2 hits. The
    bytes to and from DRAM (each address once per op) stay within 1.10x, the requests within
    the planner's L2_REQUEST_LIMIT (2x; index tables and parameters are counted here, the
    planner counts parameters only: 2% slack)."""
    rows, table = _run(["--sms", "132", "--policy-batch", "1", "--l2-mb", "50"], tmp_path)
    _check_coverage(rows, table)
    for r in rows:
        assert 1.0 <= r["dram"] <= LIMIT, f"{r['op']} {r['grid']}: dram {r['dram']:.3f}\n{table}"
        assert r["ratio"] <= 2.0 * 1.02, f"{r['op']} {r['grid']}: ratio {r['ratio']:.3f}\n{table}"


@pytest.mark.slow
def test_vsre_traffic_gpu_plans_and_bilinear(tmp_path):
    for args in (["--sms", "132", "--policy-batch", "1"], ["--sms", "132", "--policy-batch", "16"],
                 ["--mode", "bilinear"]):
        rows, table = _run(args, tmp_path)
        for r in rows:
            assert r["ratio"] <= LIMIT, f"{args}: {r['op']} {r['grid']} {r['ratio']:.3f}\n{table}"


def test_counter_sees_re_reads_and_tells_l2_hits():
    """The byte counter itself: a kernel that loads its input twice and reads back what it
    stored requests all of it (x: 2 x 400 B; y: 400 B stored twice, read back once); the
    DRAM count sees each address once and the read-back not at all."""
    code = r'''
import sys, torch, triton, triton.language as tl
sys.path.insert(0, "benchmarks")
from traffic import counting

@triton.jit
def twice(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(x_ptr + offs, mask=m)
    b = tl.load(x_ptr + offs, mask=m)
    tl.store(y_ptr + offs, a + b, mask=m)
    c = tl.load(y_ptr + offs, mask=m)
    tl.store(y_ptr + offs, c * 2, mask=m)

x = torch.randn(100)
y = torch.empty(100)
with counting() as c:
    twice[(1,)](x, y, 100, BLOCK=128)
d = c.dram()
print(sum(c.bytes["x_ptr"]), sum(c.bytes["y_ptr"]), d["x_ptr"], d["y_ptr"])
'''
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["800", "1200", "400", "400"], proc.stdout


def test_bipartite_merge_traffic_within_limit():
    """The ToMe merge and its backward read each input once (the match kernel is
    compute-bound and re-reads tiles like flash attention, so it is reported, not held)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_bipartite.py"), "--traffic",
                           "--n", "577", "--c", "64", "--b", "2"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ratios = {line.split()[0]: float(line.split()[-1]) for line in proc.stdout.splitlines()
              if line.startswith("bipartite_")}
    assert {"bipartite_gather_merge", "bipartite_gather_merge_backward"} <= set(ratios), proc.stdout
    for name in ("bipartite_gather_merge", "bipartite_gather_merge_backward"):
        assert 1.0 <= ratios[name] <= LIMIT, f"{name}: ratio {ratios[name]:.3f}\n{proc.stdout}"
