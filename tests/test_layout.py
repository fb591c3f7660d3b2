"""The package layout's rules, read from the source: `nanoserve_kernels` <- `model` <- `server.engine` <-
`server.api` <- the CLI, no module importing upward, and no import circle anywhere.

Every import counts, also those inside functions and under `TYPE_CHECKING`: a circle that only
type checkers see is still two modules that cannot be read one without the other.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nanoserve_kernels", "model", "server")

# Lower layers never import higher ones; a module may import its own layer and any below it.
LAYERS = ("nanoserve_kernels", "model", "server.engine", "server.api", "server")
# What each layer may import from outside the project (besides the standard library).
THIRD_PARTY = {
    "nanoserve_kernels": {"torch", "triton", "numpy"},
    "server.api": {"quart", "hypercorn", "werkzeug", "pydantic", "prometheus_client", "jinja2", "psycopg"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(project modules, top-level third-party names) that the file at `path` imports."""
    ours, theirs = set(), set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]

    def add(name: str) -> None:
        if name.split(".")[0] in PACKAGES:
            ours.add(name)
        else:
            theirs.add(name.split(".")[0])

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                # `from server.api import sse` imports the module server.api.sse
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return ours, theirs


def layer(module: str) -> str:
    return next(name for name in LAYERS if module == name or module.startswith(name + "."))


def test_no_module_imports_upward_or_outside_its_room():
    modules = project_modules()
    wrong = []
    for name, path in modules.items():
        ours, theirs = imports(path, modules)
        for target in ours:
            if LAYERS.index(layer(target)) > LAYERS.index(layer(name)):
                wrong.append(f"{name} imports {target} (upward)")
        allowed = THIRD_PARTY.get(layer(name))
        if allowed is not None:
            stdlib = {n for n in theirs if n in __import__("sys").stdlib_module_names}
            wrong += [f"{name} imports {n}" for n in sorted(theirs - stdlib - allowed - {"__future__"})]
    assert not wrong, "\n".join(sorted(wrong))


def test_the_api_never_imports_torch():
    modules = project_modules()
    offenders = [name for name, path in modules.items() if layer(name) == "server.api"
                 and "torch" in imports(path, modules)[1]]
    assert offenders == []


def test_no_import_circles():
    modules = project_modules()
    graph = {name: {t for t in imports(path, modules)[0] if t in modules and t != name}
             for name, path in modules.items()}
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert circles == []


@pytest.mark.parametrize("package", ["server.engine", "server.api"])
def test_the_server_is_split_into_engine_and_api(package):
    modules = project_modules()
    assert sum(layer(name) == package for name in modules) >= 5
