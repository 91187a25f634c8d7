"""The import graph of ``fusion/`` (and ``kernels/``, imported as ``fusion.kernels``): no circles, no upward imports.

Read from the source with ``ast`` (nothing is imported). What counts as an import of module
``m``: every ``import`` / ``from ... import`` statement in ``m``, wherever it stands:
at module level, inside a function (a lazy import is still a dependency, only a deferred
one) or under ``if TYPE_CHECKING:``; plus the packages that Python imports on the way
(``fusion.encoders`` for ``fusion.encoders.base``), except the root ``fusion`` package,
whose ``__init__`` imports nothing of fusion at module level (checked below).
``importlib.import_module("...")`` calls are not statements and are not seen: the root
package's lazy exports and the encoder registry's built-in adapters load that way.

The rooms, lowest first (:data:`ROOMS`): a module may import modules of its own room
and of the rooms below it, never above.
"""
import ast
import fnmatch
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]

ROOMS = [
    # config and plain helpers: what a config is, box maths, image decoding, file writing,
    # pixel-tensor checks, the "did you mean" hint
    ("data", ["fusion.config", "fusion.config_*", "fusion.encoder_types", "fusion.boxes", "fusion.atomic",
              "fusion.image_io", "fusion.image_sources", "fusion.pixels", "fusion.suggest"]),
    # Triton kernels and their PyTorch references (kernels/)
    ("kernels", ["fusion.kernels", "fusion.kernels.*"]),
    # encoder adapters around the upstream libraries, their registry and weight loading
    ("encoders", ["fusion.encoders", "fusion.encoders.*"]),
    # the steps on tensors: pixels in, per-encoder inputs, align + fuse, granularity steps, projector
    ("steps", ["fusion.resize", "fusion.encoder_inputs", "fusion.preprocess", "fusion.letterbox", "fusion.roi", "fusion.multiscale",
               "fusion.merge", "fusion.sva", "fusion.sva_reference", "fusion.sequence", "fusion.levels",
               "fusion.reduce", "fusion.posembed", "fusion.projector"]),
    # the tower that composes them, its geometry, persistence and sharding
    ("tower", ["fusion.tower", "fusion.geometry", "fusion.checkpoint", "fusion.distributed"]),
    # what users call: the package face, the command line, extraction, pictures, Hugging Face, LLaVA
    ("integrations", ["fusion", "fusion.__main__", "fusion.cli", "fusion.extract", "fusion.feature_cache",
                      "fusion.show", "fusion.pca", "fusion.hf", "fusion.hf_*", "fusion.llava", "fusion.anyres",
                      "fusion.prismatic", "fusion.stages", "fusion.stage_*"]),
]


def module_files() -> Dict[str, Path]:
    """Module name -> file, for fusion/ and kernels/ (as fusion.kernels)."""
    out = {}
    for folder, package in ((ROOT / "fusion", "fusion"), (ROOT / "kernels", "fusion.kernels")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports_of(name: str, path: Path, modules: Set[str]) -> Set[str]:
    """The modules of ``modules`` that ``name`` imports (see the module docstring for what counts)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            while target and target != "fusion":  # the module and the packages imported on the way
                found.add(target)
                target = target.rpartition(".")[0]
    return {m for m in found if m != name and not m.startswith(name + ".")}


def room_of(module: str) -> int:
    for rank, (_, patterns) in enumerate(ROOMS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank
    raise AssertionError(f"{module} is in no room of tests/test_import_graph.py: add it to ROOMS")


def graph() -> Dict[str, Set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def circles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_room():
    for module in module_files():
        room_of(module)


def test_no_import_circles():
    edges = graph()
    found = circles(edges)
    described = []
    for comp in found:
        inside = [f"{a} -> {b}" for a in comp for b in sorted(edges[a]) if b in comp]
        described.append(" <-> ".join(comp) + "\n    edges: " + ", ".join(inside))
    assert not found, "import circles:\n" + "\n".join(described)


def test_no_upward_imports():
    names = [name for name, _ in ROOMS]
    upward = [f"{a} ({names[room_of(a)]}) imports {b} ({names[room_of(b)]})"
              for a, targets in sorted(graph().items()) for b in sorted(targets) if room_of(b) > room_of(a)]
    assert not upward, "imports from a room above:\n" + "\n".join(upward)


def test_the_root_package_imports_nothing_of_fusion_at_module_level():
    tree = ast.parse((ROOT / "fusion" / "__init__.py").read_text(encoding="utf-8"))
    own = [ast.unparse(n) for n in tree.body if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "")
                                                                                     .startswith("fusion"))]
    assert not own, own


def test_the_checker_sees_circles_and_upward_imports():
    """The checks can fail: a made-up graph with a circle through a lazy import, and an upward edge."""
    edges = {"fusion.config": {"fusion.encoders.registry"}, "fusion.encoders.registry": {"fusion.encoders.base"},
             "fusion.encoders.base": {"fusion.config"}, "fusion.tower": set()}
    assert circles(edges) == [["fusion.config", "fusion.encoders.base", "fusion.encoders.registry"]]
    assert room_of("fusion.config") < room_of("fusion.encoders.registry")  # so config -> registry is upward


def test_imports_of_reads_lazy_relative_and_parent_package_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from .encoders.base import Encoder\n    from . import tower\n")
    modules = {"fusion.encoders", "fusion.encoders.base", "fusion.tower", "fusion.x"}
    assert imports_of("fusion.x", source, modules) == {"fusion.encoders", "fusion.encoders.base", "fusion.tower"}
