"""The offline core (model / plan / dispatch / analysis / sim) imports no torch and no HTTP/RPC stack
(house style: one policy, two drivers; only the runtime may import them)."""

import ast
import pathlib

import pytest

CORE = ("model", "plan", "dispatch", "analysis", "sim")
FORBIDDEN = {"torch", "transformers", "fastapi", "uvicorn", "httpx", "grpc", "zmq", "aiohttp", "ray"}
ROOT = pathlib.Path(__file__).resolve().parents[1] / "src" / "chainserve"


def imported_roots(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", CORE)
def test_core_package_imports_no_runtime_stack(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    for path in files:
        bad = imported_roots(path) & FORBIDDEN
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
