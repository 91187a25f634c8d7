"""Print ``name==version`` for the lower bound of each library whose range CI tests at both ends.

setup.py states every accepted range; ``.ci/run`` runs the whole suite at the newest releases
those ranges allow, then installs what this prints and reruns the tests that exercise these
libraries' less stable surfaces (tests/test_upstream_surfaces.py and the encoder/HF tests).
The bounds are read from setup.py itself, so they can never drift from what it accepts.
"""
import ast
import re
from pathlib import Path

# The libraries fusion reads beyond their most stable API (see tests/test_upstream_surfaces.py).
TESTED_AT_LOWER_BOUND = ("open-clip-torch", "timm", "transformers", "huggingface_hub")


def requirements(setup_py: Path):
    """Every requirement string in setup.py's install_requires and extras_require."""
    for node in ast.walk(ast.parse(setup_py.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.match(r"^[A-Za-z0-9_.\-]+\s*(>=|==|<|~=|!=)", node.value):
                yield node.value


def lower_bounds(setup_py: Path):
    bounds = {}
    for req in requirements(setup_py):
        name, spec = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", req.split(";")[0]).groups()
        low = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
        if name in TESTED_AT_LOWER_BOUND and low:
            bounds[name] = low.group(1)
    missing = [n for n in TESTED_AT_LOWER_BOUND if n not in bounds]
    if missing:
        raise SystemExit(f"setup.py states no '>=' lower bound for {missing}")
    return bounds


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    print(" ".join(f"{name}=={low}" for name, low in lower_bounds(root / "setup.py").items()))
