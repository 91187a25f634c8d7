"""One kernel launch as data: what a launcher runs and what the compile report compiles.

Every launcher in this package builds :class:`Launch` records and runs them; the same
builders are what ``benchmarks/compile_report.py`` calls (with CPU tensors, without
running anything) to compile each launch ahead of time for sm_80/86/90 with Triton's own
argument binder. So the report sees the exact specialisation a GPU launch gets: the same
tensors (shapes, strides, data-pointer alignment of slices), the same integers, the same
constexprs, warps and stages.

To put a new kernel in the report, give its module a function ``compile_launches(...)``
that builds its tensors on the CPU and returns the ``Launch`` list its launcher would run
for those shapes (see ``grid_merge.compile_launches``), and add one workload entry in
``benchmarks/compile_report.py`` (``WORKLOADS``) that maps a tower config to its calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Launch:
    """``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``.

    ``label`` names the launch in reports (op, direction, variant).
    """

    label: str
    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1
    maxnreg: Optional[int] = None  # ptxas' register cap (None: its own heuristic)

    def __call__(self) -> None:
        extra = {} if self.maxnreg is None else {"maxnreg": self.maxnreg}
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages, **extra)

    def programs(self) -> int:
        """Programs (thread blocks) launched."""
        n = 1
        for g in self.grid:
            n *= g
        return n


def run_all(launches: Sequence[Launch]) -> None:
    """Run launches in order (later ones may read what earlier ones wrote)."""
    for launch in launches:
        launch()
