"""No function or method in ``fusion/`` is longer than :data:`LIMIT` lines.

Counted from the ``def`` line to the last line of the body (docstring and comments
included, decorators not), read with ``ast``. ``kernels/`` is not walked: its
``@triton.jit`` bodies are one GPU program each, and splitting one costs registers.
An exception goes in :data:`EXCEPTIONS` with the reason it is right as one function.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fusion"
LIMIT = 80
# "path/inside/fusion.py:qualified.name" -> why it stays one function
EXCEPTIONS = {}


def long_functions(source: str, limit: int = LIMIT):
    """``(qualified name, first line, length)`` of each function of ``source`` over ``limit`` lines."""
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                length = child.end_lineno - child.lineno + 1
                if length > limit:
                    out.append((name, child.lineno, length))
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return out


def test_no_function_over_the_limit():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for name, line, length in long_functions(path.read_text(encoding="utf-8")):
            if f"{rel}:{name}" not in EXCEPTIONS:
                found.append(f"fusion/{rel}:{line} {name} is {length} lines (limit {LIMIT})")
    assert not found, "split these functions:\n" + "\n".join(found)


def test_exceptions_still_exist_and_are_justified():
    for key, reason in EXCEPTIONS.items():
        rel, _, name = key.partition(":")
        lengths = {n: length for n, _, length in long_functions((ROOT / rel).read_text(encoding="utf-8"), 0)}
        assert name in lengths and lengths[name] > LIMIT, f"{key}: no longer over {LIMIT} lines; remove it"
        assert len(reason.split()) >= 5, f"{key}: say why it stays one function"


def test_the_counter_counts_methods_and_nested_functions():
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    source = f"class A:\n    def short(self):\n        pass\n\n    def long(self):\n{body.replace('    ', '        ')}\n"
    source += f"\ndef outer():\n    def inner():\n{body.replace('    ', '        ')}\n    return inner\n"
    found = {name: length for name, _, length in long_functions(source)}
    assert found == {"A.long": LIMIT + 1, "outer": LIMIT + 3, "outer.inner": LIMIT + 1}
