"""Argument checks shared by every backend of the ops, and the backend choice (:func:`choose_backend`).

Each check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind,
wrong value) whose message names the argument, what was given and what is accepted.
The checks run once, in the public functions, before dispatch, so the reference and
the Triton path reject exactly the same inputs.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._triton import HAVE_TRITON, triton_runs_on

MODES = ("area", "bilinear")
LAYOUTS = ("channel", "sequence")
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernels load (fp32 math)

Norm = Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")
    return value


def check_size(name: str, size) -> Tuple[int, int]:
    """An int ``n`` (meaning ``(n, n)``) or an ``(h, w)`` pair of positive ints."""
    if _is_int(size):
        size = (size, size)
    if not (isinstance(size, (tuple, list, torch.Size)) and len(size) == 2
            and all(_is_int(s) for s in size)):
        raise TypeError(f"{name}={size!r} must be a positive int or an (h, w) pair of ints")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{name}={tuple(size)!r} must be positive in both dimensions")
    return int(size[0]), int(size[1])


def check_float_tensor(name: str, t, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: float16, bfloat16, float32, float64")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every dimension must be > 0")
    return t


def check_grids(grids) -> List[torch.Tensor]:
    """A non-empty list of ``[B, h_i, w_i, C_i]`` float tensors on one device, one dtype."""
    if isinstance(grids, torch.Tensor) or not isinstance(grids, (list, tuple)):
        raise TypeError(f"grids must be a list of [B, h, w, C] tensors, got {type(grids).__name__}")
    if len(grids) == 0:
        raise ValueError("grids is an empty list; pass at least one [B, h, w, C] tensor")
    out = [check_float_tensor(f"grids[{i}]", g, 4, "[B, h, w, C]") for i, g in enumerate(grids)]
    first = out[0]
    for i, g in enumerate(out[1:], 1):
        if g.shape[0] != first.shape[0]:
            raise ValueError(f"grids[{i}] has batch {g.shape[0]} but grids[0] has batch "
                             f"{first.shape[0]}; all grids must share the batch size")
        if g.device != first.device:
            raise ValueError(f"grids[{i}] is on {g.device} but grids[0] is on {first.device}; "
                             "all grids must be on one device")
        if g.dtype != first.dtype:
            raise ValueError(f"grids[{i}] has dtype {g.dtype} but grids[0] has {first.dtype}; "
                             "cast the grids to one dtype")
    return out


def check_norms(norms, grids: Sequence[torch.Tensor]) -> List[Norm]:
    """None, or one entry per grid: None (no norm) or ``(weight, bias)``, each ``[C_i]`` or None."""
    if norms is None:
        return [None] * len(grids)
    if not isinstance(norms, (list, tuple)):
        raise TypeError(f"norms must be None or a list of (weight, bias) pairs, got {type(norms).__name__}")
    if len(norms) != len(grids):
        raise ValueError(f"norms has {len(norms)} entries but there are {len(grids)} grids; "
                         "pass one (weight, bias) pair or None per grid")
    out: List[Norm] = []
    for i, (entry, g) in enumerate(zip(norms, grids)):
        if entry is None:
            out.append(None)
            continue
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise TypeError(f"norms[{i}] must be None or a (weight, bias) pair, got {entry!r}")
        C = g.shape[-1]
        for name, p in zip(("weight", "bias"), entry):
            if p is None:
                continue
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"norms[{i}] {name} must be a tensor of shape [{C}] or None, "
                                f"got {type(p).__name__}")
            if tuple(p.shape) != (C,):
                raise ValueError(f"norms[{i}] {name} has shape {tuple(p.shape)}; grids[{i}] has "
                                 f"{C} channels, so it must be [{C}]")
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(f"norms[{i}] {name} has dtype {p.dtype}; accepted: float16, "
                                "bfloat16, float32, float64")
            if p.device != g.device:
                raise ValueError(f"norms[{i}] {name} is on {p.device} but grids[{i}] is on {g.device}")
        out.append((entry[0], entry[1]))
    return out


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps={eps!r} must be a positive float")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0")
    return float(eps)


def check_layout(layout: str, grids: Sequence[torch.Tensor]) -> str:
    check_choice("layout", layout, LAYOUTS)
    if layout == "sequence":
        widths = [g.shape[-1] for g in grids]
        if len(set(widths)) != 1:
            raise ValueError(f"layout='sequence' needs equal channel widths, got {widths}; "
                             "use layout='channel' or project the grids first")
    return layout


def check_levels(levels, grid: Tuple[int, int]) -> List[Tuple[int, int]]:
    """A non-empty sequence of ints ``l`` (``l x l``) or ``(h, w)`` pairs, each within ``grid``."""
    if isinstance(levels, (int, str)) or not isinstance(levels, (list, tuple)):
        raise TypeError(f"levels={levels!r} must be a list of ints or (h, w) pairs, e.g. [12, 6, 3, 1]")
    if len(levels) == 0:
        raise ValueError("levels is empty; pass at least one level, e.g. [12, 6, 3, 1]")
    out = []
    for i, lv in enumerate(levels):
        lh, lw = check_size(f"levels[{i}]", lv)
        if lh > grid[0] or lw > grid[1]:
            raise ValueError(f"levels[{i}]={(lh, lw)} is larger than the grid {tuple(grid)}; "
                             f"pyramid levels pool down, so each must be <= {tuple(grid)}")
        out.append((lh, lw))
    return out


def check_tokens(tokens, grid: Tuple[int, int]) -> torch.Tensor:
    check_float_tensor("tokens", tokens, 3, "[B, H*W, C]")
    if tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"tokens has {tokens.shape[1]} tokens but grid={tuple(grid)} needs "
                         f"{grid[0] * grid[1]}; tokens must be [B, H*W, C]")
    return tokens


def resolve_backend(backend: str, device: torch.device, triton_ok: bool) -> str:
    """``auto`` -> ``triton`` for CUDA tensors when Triton imports, else ``torch``."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if (device.type == "cuda" and triton_ok) else "torch"
    if backend == "triton" and not triton_ok:
        raise ValueError("backend='triton' needs the triton package, which failed to import; "
                         "install triton or use backend='torch'")
    return backend


def choose_backend(backend: str, kernel, tensors: Dict[str, torch.Tensor], limit: str = "") -> str:
    """The path one call of an op takes, ``"triton"`` or ``"torch"``: one rule for every op.

    ``tensors``: the call's inputs by argument name (the first one's device decides);
    ``kernel``: one of the op's ``@triton.jit`` kernels; ``limit``: why the kernels cannot
    take this shape ('' when they can). ``"auto"`` runs Triton for CUDA tensors in float16,
    bfloat16 or float32 within the limits, PyTorch otherwise; ``"torch"`` runs PyTorch;
    ``"triton"`` runs Triton or raises a ValueError that says why it cannot.
    """
    name, first = next(iter(tensors.items()))
    be = resolve_backend(backend, first.device, HAVE_TRITON)
    if be == "torch":
        return be
    bad = next(((n, t.dtype) for n, t in tensors.items() if t.dtype not in TRITON_DTYPES), None)
    if bad:
        why = (f"computes in fp32 from float16, bfloat16 or float32; {bad[0]} has dtype {bad[1]}: "
               "use backend='torch'")
    elif not triton_runs_on(kernel, first.device):
        why = (f"needs CUDA tensors ({name} is on {first.device}), or CPU tensors with TRITON_INTERPRET=1 "
               "set before fusion is imported; use backend='torch' or 'auto'")
    elif limit:
        why = f"cannot take this call: {limit}; use backend='torch' or 'auto' (which takes the PyTorch path)"
    else:
        return "triton"
    if backend == "triton":
        raise ValueError(f"backend='triton' {why}")
    return "torch"
