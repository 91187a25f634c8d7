"""grid_merge's launch plans on a GPU (kernels/_merge_plan.py), checked without one.

A launch whose bytes fit in half the L2 (B = 1 of every vsre grid on an A100 or an H100)
takes the plan nearest one program per SM whose DRAM bytes stay within PLAN_LIMIT of the
minimal bytes and whose requested bytes stay within L2_REQUEST_LIMIT. The DRAM bytes of a
plan are counted here independently, from its program table: every input position any
program reads, every output position, the LayerNorm parameters once, and each backward
program's partial sums.
"""
import sys

import pytest

import fusion.kernels  # noqa: F401

MP = sys.modules["fusion.kernels._merge_plan"]
H100, A100, A10 = (132, 50 << 20), (108, 40 << 20), (72, 6 << 20)
VSRE = [("clip", 24, 1024), ("siglip", 27, 1152), ("sam", 64, 256), ("dino@518", 37, 1024)]


def _windows(n_in, n_out):
    """Area windows by hand: output i reads inputs [floor(i n_in / n_out), ceil((i + 1) n_in / n_out))."""
    return [(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]


def _fwd_dram(plan, h, C, es=2, n_vec=2):
    """Positions read and written by the forward's programs (each once), plus the parameters."""
    win = _windows(h, 24)
    read = {(r, c) for x0, x1, y0, y1 in plan.progs
            for y in range(y0, y1) for r in range(*win[y]) for x in range(x0, x1) for c in range(*win[x])}
    written = {(y, x) for x0, x1, y0, y1 in plan.progs for y in range(y0, y1) for x in range(x0, x1)}
    assert len(written) == 24 * 24  # every output position exactly once
    return (len(read) + len(written) + n_vec * 4 / es) / (h * h + 24 * 24)


@pytest.mark.parametrize("device", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("name,h,C", VSRE)
def test_forward_fills_the_sms_at_batch_one(name, h, C, device):
    sms, l2 = device
    plan = MP.fwd_plan(h, h, 24, 24, C, "area", True, 1, sms, 2, 2, l2)
    assert len(plan.progs) >= sms, f"{name}: {len(plan.progs)} programs for {sms} SMs"
    assert _fwd_dram(plan, h, C) <= MP.PLAN_LIMIT
    assert plan.ratio <= MP.L2_REQUEST_LIMIT
    big = MP.fwd_plan(h, h, 24, 24, C, "area", True, 64, sms, 2, 2, l2)  # 64 items do not fit in L2
    assert big.ratio <= MP.PLAN_LIMIT, f"{name}: a batch past L2 re-reads {big.ratio:.3f}x"


def test_a_launch_past_the_l2_keeps_the_fewest_bytes_rule():
    """DINOv2 at 518 px on an A10 (6 MiB L2): 4 MB of grid does not fit in half of it."""
    sms, l2 = A10
    resident = MP.fwd_plan(37, 37, 24, 24, 1024, "area", True, 1, sms, 2, 2, 0)
    assert MP.fwd_plan(37, 37, 24, 24, 1024, "area", True, 1, sms, 2, 2, l2) == resident
    assert resident.ratio <= MP.PLAN_LIMIT


@pytest.mark.parametrize("need_dx", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("name,h,C", VSRE)
def test_backward_partials_bound_its_programs(name, h, C, need_dx):
    """The backward's DRAM bytes include C fp32 dweight and dbias partials per program:
    more programs than the bytes allow is refused; what is chosen stays within the limits."""
    sms, l2 = H100
    plan = MP.bwd_plan(h, h, 24, 24, C, "area", True, need_dx, 1, sms, 3, 2, l2)
    progs = sum(len(launch) for launch in plan.launches)
    data = (2 if need_dx else 1) * h * h + 24 * 24  # positions: x (recompute), g, dx
    dram = (data + progs * 2 * 4 / 2 + 4 / 2) / data  # + partials per program, weight once
    assert dram <= MP.PLAN_LIMIT + 0.03, f"{name}: {progs} programs, {dram:.3f}x of DRAM"  # + x halo rows
    assert plan.ratio <= MP.L2_REQUEST_LIMIT
    most = (MP.PLAN_LIMIT - 1) * data / 4  # programs whose partials alone reach the limit
    assert progs <= most, f"{name}: {progs} programs, partials over {MP.PLAN_LIMIT}x"
