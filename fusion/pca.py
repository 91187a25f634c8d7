"""PCA colouring of token features: ``[N, C]`` -> ``[N, 3]`` RGB in [0, 1].

The three leading principal components (exact SVD of the centred features, in float64)
become the red, green and blue channels, each min-max normalised to [0, 1] over the
tokens given. Signs are fixed so that the largest-magnitude loading of each component
is positive (as scikit-learn's ``svd_flip``), so the colours do not flip between runs.
A component with no variance (fewer than 3 independent directions, or constant
features) is a constant 0.5.
"""
from __future__ import annotations

import torch

# A component whose singular value is below this fraction of the first carries only
# rounding noise: it is shown as a flat 0.5 instead of amplified noise.
REL_TOL = 1e-6


def pca_rgb(features: torch.Tensor) -> torch.Tensor:
    """``features [N, C]`` (any float dtype or device) -> ``[N, 3]`` float32 on the CPU, in [0, 1]."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features: expected a tensor [N, C], got {type(features).__name__}")
    if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features: expected a non-empty tensor [N, C], got shape {list(features.shape)}")
    x = features.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features: contains NaN or infinite values")
    n = x.shape[0]
    out = torch.full((n, 3), 0.5, dtype=torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    if n < 2:
        return out.float()
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # vh [k, C]: principal directions
    if s[0] <= 0:
        return out.float()
    for k in range(min(3, s.shape[0])):
        if s[k] <= REL_TOL * s[0]:
            break
        direction = vh[k]
        if direction[direction.abs().argmax()] < 0:
            direction = -direction
        proj = x @ direction  # [N]
        lo, hi = proj.min(), proj.max()
        out[:, k] = (proj - lo) / (hi - lo)
    return out.float()
