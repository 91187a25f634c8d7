"""bipartite_merge / reduce_to (ToMe bipartite soft matching).

- Decisions against an independent oracle: the published algorithm written out plainly in
  float64 (full A×B matrix, argsort, scatter_reduce), on inputs drawn without ties.
- A tiny example checked by hand.
- Triton (interpreter on CPU) against the PyTorch reference: forward and backward for x,
  fp32 within 1e-5, fp16/bf16 within 2e-2; the worst mismatch is printed.
- Assignment consistency, reduce_to bookkeeping, custom-op registration, argument errors.
"""
import importlib

import pytest
import torch

from kernel_asserts import worst


BM = importlib.import_module("fusion.kernels.bipartite_merge")
REF = importlib.import_module("fusion.kernels.bipartite_reference")
bipartite_merge, reduce_to = BM.bipartite_merge, BM.reduce_to
bipartite_merge_full = importlib.import_module("fusion.kernels.naive").bipartite_merge_full

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# Scores closer than this count as ties: fp32 cosines carry ~1e-7 rounding error.
TIE_GAP = 1e-6


# ---------------------------------------------------------------------------- oracle
def tome_oracle(x, metric, r, sizes=None):
    """ToMe's step as published, in float64, materialising everything.

    Returns (merged, sizes, assignment, gap): gap is the smallest difference between a
    row's best and second-best score and between any two best scores (ties if tiny).
    """
    B, N, C = x.shape
    sizes = torch.ones(B, N, dtype=torch.float64) if sizes is None else sizes.double()
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)                       # [B, N_A, N_B]
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx.gather(1, src_idx)

    xs = x.double() * sizes[..., None]
    xa, xb = xs[:, ::2], xs[:, 1::2]
    sa, sb = sizes[:, ::2], sizes[:, 1::2]
    n_unm = xa.shape[1] - r
    unm = xa.gather(1, unm_idx[..., None].expand(B, n_unm, C))
    dst = xb.scatter_reduce(1, dst_idx[..., None].expand(B, r, C),
                            xa.gather(1, src_idx[..., None].expand(B, r, C)), reduce="sum")
    s_out = torch.cat([sa.gather(1, unm_idx), sb.scatter_reduce(1, dst_idx, sa.gather(1, src_idx), "sum")], 1)
    merged = torch.cat([unm, dst], 1) / s_out[..., None]

    assignment = torch.empty(B, N, dtype=torch.int64)
    for bi in range(B):
        for k, i in enumerate(unm_idx[bi].tolist()):
            assignment[bi, 2 * i] = k
        for i, j in zip(src_idx[bi].tolist(), dst_idx[bi].tolist()):
            assignment[bi, 2 * i] = n_unm + j
        for j in range(N // 2):
            assignment[bi, 2 * j + 1] = n_unm + j

    gaps = [float("inf")]
    if scores.shape[-1] >= 2:
        top2 = scores.topk(2, dim=-1).values
        gaps.append((top2[..., 0] - top2[..., 1]).min().item())
    if node_max.shape[-1] >= 2:
        ordered = node_max.sort(dim=-1).values
        gaps.append((ordered[:, 1:] - ordered[:, :-1]).min().item())
    return merged, s_out, assignment, min(gaps)


def untied(B, N, C, Cm, dtype=torch.float32, seed=0):
    """Random (x, metric) whose scores have no near-ties (redraws deterministically)."""
    for s in range(seed, seed + 100):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(B, N, C, generator=g).to(dtype)
        metric = torch.randn(B, N, Cm, generator=g).to(dtype)
        if tome_oracle(x[..., :1], metric, 0)[3] > TIE_GAP:
            return x, metric
    raise AssertionError("no tie-free draw in 100 seeds")


def scatter_mean(x, sizes, assignment, n_out):
    """Size-weighted mean of x [B, N, C] per output, in float64, from the assignment alone."""
    B, N, C = x.shape
    s = sizes.double()
    tot = torch.zeros(B, n_out, dtype=torch.float64).scatter_add_(1, assignment, s)
    acc = torch.zeros(B, n_out, C, dtype=torch.float64).scatter_add_(
        1, assignment[..., None].expand(B, N, C), x.double() * s[..., None])
    return acc / tot[..., None], tot


# ---------------------------------------------------------------------------- by hand
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hand_example(backend):
    # tokens t0 (A0), t1 (B0), t2 (A1), t3 (B1); cosines:
    #   A0·B0 = 0, A0·B1 = 1/sqrt(1.04) = 0.981  -> A0's partner B1, score 0.981
    #   A1·B0 = 0.707, A1·B1 = 1.2/sqrt(2.08) = 0.832 -> A1's partner B1, score 0.832
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.2]]])
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]]).expand(1, 4, 16).contiguous()
    sizes = torch.tensor([[1.0, 1.0, 1.0, 3.0]])
    # r=1: A0 (rank 0) merges into B1: (1*1 + 3*4) / 4 = 3.25; kept A1 first, then B0, B1.
    merged, s, asg = bipartite_merge(x, metric, 1, sizes, backend=backend)
    assert merged[0, :, 0].tolist() == [3.0, 2.0, 3.25]
    assert s.tolist() == [[1.0, 1.0, 4.0]] and asg.tolist() == [[2, 1, 0, 2]]
    # r=2: both A tokens merge into B1: (1 + 3 + 3*4) / 5 = 3.2.
    merged, s, asg = bipartite_merge(x, metric, 2, sizes, backend=backend)
    torch.testing.assert_close(merged[0, :, 0], torch.tensor([2.0, 3.2]), atol=1e-6, rtol=0)
    assert s.tolist() == [[1.0, 5.0]] and asg.tolist() == [[1, 0, 1, 1]]
    # r=0 is ToMe's early return: unchanged.
    merged, s, asg = bipartite_merge(x, metric, 0, sizes, backend=backend)
    assert torch.equal(merged, x) and torch.equal(s, sizes) and asg.tolist() == [[0, 1, 2, 3]]


# ---------------------------------------------------------------------------- decisions
@pytest.mark.parametrize("N", [2, 3, 8, 33, 577, 729])
def test_reference_decisions_match_tome(N):
    x, metric = untied(2, N, 8, 16, seed=N)
    sizes = torch.rand(2, N, generator=torch.Generator().manual_seed(1)) + 0.5
    n_a = (N + 1) // 2
    for r in sorted({1, N // 4 + 1, N // 2, n_a}):
        want, want_s, want_asg, _ = tome_oracle(x, metric, r, sizes)
        got, got_s, got_asg = bipartite_merge(x, metric, r, sizes, backend="torch")
        assert torch.equal(got_asg, want_asg), f"N={N} r={r}: decisions differ"
        assert got.shape == (2, N - r, 8)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_s.double(), want_s, atol=1e-5, rtol=1e-5)
        # the full-matrix baseline (the benchmark's) agrees too
        full, full_s, full_asg = bipartite_merge_full(x, metric, r, sizes)
        assert torch.equal(full_asg, want_asg)
        torch.testing.assert_close(full.double(), want, atol=1e-5, rtol=1e-5)


def test_reference_blocks_do_not_change_decisions():
    x, metric = untied(3, 101, 4, 13, seed=5)
    want = REF.bipartite_match_reference(metric, block_b=1 << 20, chunk_elems=1 << 30)
    for block_b, chunk in [(3, 30), (7, 100), (16, 3 * 16 * 5)]:
        got = REF.bipartite_match_reference(metric, block_b=block_b, chunk_elems=chunk)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("N,r", [(3, 2), (33, 10), (577, 150), (729, 365)])
def test_triton_decisions_match_tome(N, r):
    x, metric = untied(2, N, 24, 16, seed=N)
    want, want_s, want_asg, _ = tome_oracle(x, metric, r)
    got, got_s, got_asg = bipartite_merge(x, metric, r, backend="triton")
    assert torch.equal(got_asg, want_asg), f"N={N} r={r}: decisions differ"
    print(f"N={N} r={r}: worst |triton - oracle| = {worst(got, want):.2e}")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_s.double(), want_s)
    ref = bipartite_merge(x, metric, r, backend="torch")
    assert torch.equal(got_asg, ref[2])
    torch.testing.assert_close(got, ref[0], atol=1e-5, rtol=1e-5)


def test_triton_match_kernel_small_blocks():
    # Many A/B/K blocks with ragged tails: N_A=39, N_B=38, Cm=37 (prime) over 16-wide tiles,
    # on a strided metric (a channel slice of a wider tensor).
    _, wide = untied(2, 77, 1, 40, seed=3)
    metric = wide[..., 2:39]
    want_best, want_partner = REF.bipartite_match_reference(metric)
    for blocks in [(16, 16, 16), (32, 16, 64)]:
        best, partner = BM._match_triton(metric, *blocks)
        assert torch.equal(partner, want_partner)
        torch.testing.assert_close(best, want_best, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- Triton vs reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_forward_backward_vs_reference(dtype):
    B, N, C = 2, 97, 37
    x, metric = untied(B, N, C, 12, dtype=dtype, seed=11)
    sizes = (torch.rand(B, N, generator=torch.Generator().manual_seed(2)) * 3 + 1).round()
    r = 30
    outs, grads = {}, {}
    g_out = torch.randn(B, N - r, C).to(dtype)
    for be in ("torch", "triton"):
        xx = x.clone().requires_grad_(True)
        merged, s, asg = bipartite_merge(xx, metric, r, sizes, backend=be)
        merged.backward(g_out)
        outs[be], grads[be] = (merged.detach(), s, asg), xx.grad
        assert merged.dtype == dtype and xx.grad.dtype == dtype
    assert torch.equal(outs["torch"][2], outs["triton"][2])
    assert torch.equal(outs["torch"][1], outs["triton"][1])
    tol = TOL[dtype]
    print(f"{dtype}: worst fwd {worst(outs['torch'][0], outs['triton'][0]):.2e}, "
          f"worst bwd {worst(grads['torch'], grads['triton']):.2e}")
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], atol=tol, rtol=tol)
    torch.testing.assert_close(grads["triton"], grads["torch"], atol=tol, rtol=tol)
    # forward against the fp64 oracle on the same (rounded) inputs
    want_merged, want_sizes, want_asg, _ = tome_oracle(x, metric, r, sizes)
    assert torch.equal(outs["triton"][2], want_asg)
    torch.testing.assert_close(outs["triton"][0].double(), want_merged, atol=tol, rtol=tol)
    # backward against the rule grad_x[i] = g[assignment[i]] * s_i / S_assignment[i]
    asg, s_out = outs["torch"][2], outs["torch"][1]
    want = g_out.double().gather(1, asg[..., None].expand(B, N, C)) * (sizes / s_out.gather(1, asg))[..., None]
    torch.testing.assert_close(grads["triton"].double(), want, atol=tol, rtol=tol)


def test_triton_backward_noncontiguous_grad_and_oracle():
    # grad of merged.sum() arrives as an expanded (stride-0) tensor
    x, metric = untied(2, 40, 5, 6, seed=4)
    xx = x.clone().requires_grad_(True)
    bipartite_merge(xx, metric, 15, backend="triton")[0].sum().backward()
    xo = x.double().requires_grad_(True)
    tome_oracle(xo, metric, 15)[0].sum().backward()
    torch.testing.assert_close(xx.grad.double(), xo.grad, atol=1e-6, rtol=1e-6)


def test_merge_kernel_small_blocks_and_strided_x():
    x, metric = untied(2, 50, 40, 8, seed=6)
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)   # same values, channel stride != 1
    sizes = torch.rand(2, 50, generator=torch.Generator().manual_seed(3)) + 0.25
    best, partner = REF.bipartite_match_reference(metric)
    asg = REF.bipartite_assignment(best, partner, 20, 50)
    src, offsets = BM._source_lists(asg, 30)
    merged, ms = BM._merge_triton(xs, sizes, src, offsets, block_m=16, block_c=16)
    want, want_s = REF.merge_by_assignment_reference(x, sizes, asg, 30)
    torch.testing.assert_close(merged, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ms, want_s, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- bookkeeping
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_assignment_reproduces_merge(backend):
    x, metric = untied(2, 61, 9, 7, seed=8)
    sizes = torch.rand(2, 61, generator=torch.Generator().manual_seed(4)) * 4 + 1
    merged, s, asg = bipartite_merge(x, metric, 25, sizes, backend=backend)
    want, want_s = scatter_mean(x, sizes, asg, 36)
    torch.testing.assert_close(merged.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.double(), want_s, atol=1e-5, rtol=1e-5)
    # every output gets something; kept tokens are exact copies
    assert torch.equal(torch.sort(asg.unique()).values, torch.arange(36))
    counts = torch.zeros(2, 36, dtype=torch.int64).scatter_add_(1, asg, torch.ones_like(asg))
    alone = counts.gather(1, asg) == 1
    assert torch.equal(merged.gather(1, asg[..., None].expand(2, 61, 9))[alone], x[alone])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reduce_to(backend):
    x, metric = untied(2, 100, 6, 5, seed=9)
    for keep, steps_metric in [(10, metric), (37, x), (1, metric)]:
        merged, s, asg = reduce_to(x, steps_metric, keep, backend=backend)
        assert merged.shape == (2, keep, 6) and s.shape == (2, keep) and asg.shape == (2, 100)
        assert torch.equal(s.sum(1), torch.full((2,), 100.0))
        assert int(asg.max()) == keep - 1 and int(asg.min()) == 0
        want, want_s = scatter_mean(x, torch.ones(2, 100), asg, keep)
        torch.testing.assert_close(merged.double(), want, atol=1e-5, rtol=1e-5)
        assert torch.equal(s.double(), want_s)
    same = reduce_to(x, metric, 100, backend=backend)
    assert same[0] is x and torch.equal(same[2], torch.arange(100).expand(2, 100))


def test_reduce_to_triton_matches_reference_and_is_one_step_when_possible():
    x, metric = untied(1, 90, 8, 6, seed=10)
    a = reduce_to(x, metric, 12, backend="triton")
    b = reduce_to(x, metric, 12, backend="torch")
    assert torch.equal(a[2], b[2]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    one = reduce_to(x, metric, 50, backend="torch")         # 40 <= N_A: a single step
    step = bipartite_merge(x, metric, 40, backend="torch")
    assert torch.equal(one[2], step[2]) and torch.equal(one[0], step[0])


def test_edge_sizes_and_dtypes():
    x1 = torch.randn(2, 1, 3)
    assert torch.equal(bipartite_merge(x1, x1, 0)[0], x1)
    x2 = torch.randn(1, 2, 3, dtype=torch.float64)           # fp64 runs on the reference under auto
    m, s, asg = bipartite_merge(x2, x2, 1, sizes=torch.tensor([[1.0, 3.0]], dtype=torch.float16))
    assert m.dtype == torch.float64 and s.dtype == torch.float16 and asg.tolist() == [[0, 0]]
    torch.testing.assert_close(m[0, 0], (x2[0, 0] + 3 * x2[0, 1]) / 4)
    x5 = torch.randn(1, 5, 4)                                  # odd N, r = N_A: every A token merges
    m, s, asg = bipartite_merge(x5, x5, 3, backend="triton")
    assert m.shape == (1, 2, 4) and s.sum().item() == 5 and asg[0, 1::2].tolist() == [0, 1]


def test_deterministic():
    x, metric = untied(2, 64, 33, 8, seed=12)
    a = bipartite_merge(x, metric, 32, backend="triton")
    b = bipartite_merge(x, metric, 32, backend="triton")
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# ---------------------------------------------------------------------------- registration
def test_custom_ops_opcheck():
    x, metric = untied(2, 20, 8, 4, seed=13)
    asg = REF.bipartite_assignment(*REF.bipartite_match_reference(metric), 7, 20)
    src, offsets = BM._source_lists(asg, 13)
    sizes = torch.ones(2, 20)
    torch.library.opcheck(torch.ops.fusion.bipartite_match.default, (metric,))
    torch.library.opcheck(torch.ops.fusion.bipartite_gather_merge.default,
                          (x.requires_grad_(True), sizes, src, offsets))
    merged, ms = torch.ops.fusion.bipartite_gather_merge(x.detach(), sizes, src, offsets)
    torch.library.opcheck(torch.ops.fusion.bipartite_gather_merge_backward.default,
                          (torch.randn(2, 13, 8), sizes, ms, src, offsets, x.new_empty(0)))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    x, metric = untied(2, 64, 16, 8, seed=14)
    fn = torch.compile(lambda a, m: bipartite_merge(a, m, 20, backend="triton"), fullgraph=True)
    got, want = fn(x, metric), bipartite_merge(x, metric, 20, backend="triton")
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0])

    class Reduce(torch.nn.Module):
        def forward(self, a, m):
            return bipartite_merge(a, m, 20, backend="triton")

    ep = torch.export.export(Reduce(), (x, metric))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "fusion.bipartite_match.default" in ops and "fusion.bipartite_gather_merge.default" in ops
    got = ep.module()(x, metric)
    assert torch.equal(got[2], want[2])


@pytest.mark.slow
@pytest.mark.parametrize("N", [577, 729, 1025])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_sweep(N, dtype):
    x, metric = untied(2, N, 48, 40, dtype=dtype, seed=N)
    for r in (1, N // 3, (N + 1) // 2):
        a = bipartite_merge(x, metric, r, backend="triton")
        b = bipartite_merge(x, metric, r, backend="torch")
        assert torch.equal(a[2], b[2]) and torch.equal(a[2], tome_oracle(x, metric, r)[2])
        torch.testing.assert_close(a[0], b[0], atol=TOL[dtype], rtol=TOL[dtype])


# ---------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    x, m = torch.randn(2, 10, 4), torch.randn(2, 10, 3)
    cases = [
        (TypeError, "x must be", lambda: bipartite_merge(x.numpy(), m, 1)),
        (ValueError, "x must have shape", lambda: bipartite_merge(x[0], m, 1)),
        (TypeError, "x has dtype", lambda: bipartite_merge(x.long(), m, 1)),
        (TypeError, "metric has dtype", lambda: bipartite_merge(x, m.int(), 1)),
        (ValueError, "metric has shape", lambda: bipartite_merge(x, m[:1], 1)),
        (ValueError, "metric has shape", lambda: bipartite_merge(x, m[:, :9], 1)),
        (ValueError, "metric is empty", lambda: bipartite_merge(x, m[..., :0], 1)),
        (ValueError, "x is empty", lambda: bipartite_merge(x[:0], m[:0], 1)),
        (TypeError, "r must be", lambda: bipartite_merge(x, m, 1.0)),
        (TypeError, "r must be", lambda: bipartite_merge(x, m, True)),
        (ValueError, "r=6 is out of range", lambda: bipartite_merge(x, m, 6)),
        (ValueError, "r=-1 is out of range", lambda: bipartite_merge(x, m, -1)),
        (ValueError, "a single token", lambda: bipartite_merge(x[:, :1], m[:, :1], 1)),
        (ValueError, "sizes has shape", lambda: bipartite_merge(x, m, 1, torch.ones(2, 9))),
        (TypeError, "sizes has dtype", lambda: bipartite_merge(x, m, 1, torch.ones(2, 10, dtype=torch.int64))),
        (ValueError, "backend='cuda' is not supported", lambda: bipartite_merge(x, m, 1, backend="cuda")),
        (ValueError, "backend='triton' computes in fp32",
         lambda: bipartite_merge(x.double(), m, 1, backend="triton")),
        (TypeError, "keep must be", lambda: reduce_to(x, m, 3.0)),
        (ValueError, "keep=0 is out of range", lambda: reduce_to(x, m, 0)),
        (ValueError, "keep=11 is out of range", lambda: reduce_to(x, m, 11)),
        (ValueError, "metric has shape", lambda: reduce_to(x, m[:1], 3)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
