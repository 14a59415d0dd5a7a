"""The package's shape: imports run one way (no circles, also inside functions), no module is hidden by a
function of the same name, no private name is used outside its module, no function is longer than 60 lines."""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import kdviz

ROOT = Path(kdviz.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(path: Path, name: str, known: dict) -> set[str]:
    """The kdviz modules `path` imports (anywhere in the file), resolved to the modules that exist."""
    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for target in targets:
            module = resolve(target) if target.startswith("kdviz") else None
            parent_package = module is not None and known[module].name == "__init__.py" and name.startswith(module + ".")
            if module and module != name and not parent_package:  # (a module may import its own package's __init__)
                out.add(module)
    return out


def test_no_import_circles():
    known = modules()
    edges = {name: imported(path, name, known) for name, path in known.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError(f"import circle: {' -> '.join(trail[trail.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(known):
        if name not in state:
            visit(name, [name])


def test_no_module_is_hidden_by_a_function_of_the_same_name():
    for info in pkgutil.walk_packages(kdviz.__path__, "kdviz."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
        parent, _, child = info.name.rpartition(".")
        assert inspect.ismodule(getattr(importlib.import_module(parent), child)), f"{info.name} is hidden"


def test_no_private_name_crosses_modules_and_no_function_is_long():
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdviz"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path}: imports private {private} from {node.module}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
                lines = node.end_lineno - body[0].lineno + 1
                assert lines <= 60, f"{path}:{node.lineno} {node.name} is {lines} lines"
