"""The package's layers (house style: one policy, two drivers): each layer imports only the layers
below it, the offline core (model / analysis / plan / dispatch / adapt / methods / sim) imports no torch
and no HTTP/RPC stack, and no module imports one that imports it back."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src" / "chainserve"
#: Bottom first; a package may import packages of lower layers only (and itself).
LAYERS = (
    {"model", "analysis", "progress", "extras"},
    {"plan"},
    {"dispatch", "adapt"},
    {"methods"},
    {"sim", "runtime"},
    {"measure"},
    {"experiments"},
    {"cli"},
    {"__main__"},
)
CORE = ("model", "analysis", "plan", "dispatch", "adapt", "methods", "sim")
FORBIDDEN = {"torch", "transformers", "fastapi", "uvicorn", "httpx", "grpc", "zmq", "aiohttp", "ray"}


def imports(path: pathlib.Path) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ("chainserve", *path.relative_to(ROOT).parent.parts)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def package_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def layer(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def modules() -> dict[str, pathlib.Path]:
    """Module name → file, for every module of the package."""
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(("chainserve", *parts))] = path
    return out


def test_every_package_has_a_layer():
    packages = {package_of(p) for p in ROOT.rglob("*.py")} - {"__init__"}
    assert packages <= set().union(*LAYERS), packages - set().union(*LAYERS)


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_lower_layers(path):
    own = package_of(path)
    if own == "__init__":
        return
    for name in imports(path):
        parts = name.split(".")
        if parts[0] == "chainserve" and len(parts) > 1 and parts[1] != own:
            assert layer(parts[1]) < layer(own), f"{path.relative_to(ROOT)} imports {name} (a layer up or beside)"


@pytest.mark.parametrize("package", CORE)
def test_core_package_imports_no_runtime_stack(package):
    files = sorted((ROOT / package).rglob("*.py")) or [ROOT / f"{package}.py"]
    for path in files:
        bad = {name.split(".")[0] for name in imports(path)} & FORBIDDEN
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_module_imports_one_that_imports_it_back():
    mods = modules()
    graph = {name: {m for m in imports(path) if m in mods and m != name} for name, path in mods.items()}
    # a package's __init__ re-exporting is not a dependency of its modules on each other
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
