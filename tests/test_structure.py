"""The code's shape, checked: one-way imports, short functions, a thin CLI module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mone_train", "mone_kernels")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    # A package's __init__ importing its own submodules is not a cycle of the project's layers.
    edges = {
        name: {t for t in targets if not t.startswith(name + ".")}
        for name, targets in graph.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle_among_the_projects_modules():
    graph = _graph()
    assert "mone_train.trainer" in graph["mone_train.train"]  # the graph sees real edges
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_is_detected():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_nothing_imports_the_cli_module():
    importers = [name for name, targets in _graph().items() if "mone_train.train" in targets]
    assert importers == []


def test_kernels_are_independent_of_the_trainer_and_megatron():
    for name, path in _modules().items():
        if not name.startswith("mone_kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & {"megatron", "mone_train"}, f"{name} imports {roots}"


def test_no_function_is_longer_than_the_bar():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_config_validation_imports_neither_torch_nor_triton():
    code = (
        "import sys; from mone_train.config import Config; Config().validate(); "
        "print(sorted(m for m in ('torch', 'triton', 'megatron') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.strip() == "[]"


# The layers, lowest first: a module may import its own layer and those below, never above.
LAYERS = (
    ("mone_kernels", "mone_train.errors", "mone_train.hardware"),
    ("mone_train.command_line", "mone_train.config", "mone_train.families", "mone_train.compose"),
    ("mone_train.data", "mone_train.model", "mone_train.parallel", "mone_train.runtime"),
    ("mone_train.components", "mone_train.evaluation"),
    ("mone_train.trainer", "mone_train.planning", "mone_train.analysis", "mone_train.export",
     "mone_train.importer", "mone_train.inference", "mone_train.report"),
    ("mone_train.preflight", "mone_train.train"),
)  # fmt: skip
MAX_MODULES_PER_FOLDER = 12


def _layer(module: str) -> int | None:
    if module.endswith(".cli"):
        return len(LAYERS) - 1  # every command line sits on top
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return None if best is None else best[0]


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    graph = _graph()
    unplaced = [name for name in graph if name != "mone_train" and _layer(name) is None]
    assert unplaced == []
    upward = [
        f"{name} -> {target}"
        for name, targets in graph.items()
        for target in targets
        if name != "mone_train" and target != "mone_train" and _layer(target) > _layer(name)
    ]
    assert upward == []


def test_no_folder_of_the_package_holds_more_than_a_dozen_modules():
    crowded = {}
    for package in PACKAGES:
        for folder in [REPO / package, *(p for p in (REPO / package).rglob("*") if p.is_dir())]:
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            if len(modules) > MAX_MODULES_PER_FOLDER and "remote_code" not in folder.parts:
                crowded[str(folder.relative_to(REPO))] = len(modules)
    assert crowded == {}
