"""The kernel tests' comparison: one helper, so every op is held to the same rule and prints
its worst mismatch the same way (Liger-Kernel's ``assert_verbose_allclose``, in one place)."""
import torch


def worst(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want|``, in fp64 (0 for empty tensors)."""
    err = (got.double() - want.double()).abs()
    return err.max().item() if err.numel() else 0.0


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "", slack: float = 0.0) -> None:
    """``|got - want| <= (tol + slack) * max(1, max |want|)`` everywhere, compared in fp64.

    On failure the message names ``what``, the worst element's index, both values and the
    tolerance. ``slack``: error a test can prove any evaluation has (e.g. the LayerNorm's
    conditioning in ``test_kernels_grid_merge.layernorm_slack``); 0 otherwise.
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    err = (got.double() - want.double()).abs()
    scale = max(1.0, want.double().abs().max().item()) if want.numel() else 1.0
    bad = worst(got, want)
    if bad <= (tol + slack) * scale:
        return
    idx = tuple(int(i) for i in torch.nonzero(err == bad)[0]) if bad == bad else ()
    where = (f" at {idx} (got {got.double()[idx].item():.6g}, want {want.double()[idx].item():.6g})"
             if idx else " (NaN)")
    raise AssertionError(f"{what}: worst |diff| {bad:.3e}{where}, tolerance ({tol:g} + {slack:.3g}) x {scale:.3g}")
