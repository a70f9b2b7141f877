"""The package layout: imports among sas modules point one way (API -> backends -> kernels)."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).replace(".__init__", "")
                 for p in (ROOT / "sas").rglob("*.py") if "recipes" not in p.parts)


def _imports(module: str) -> set:
    """The sas modules ``module`` imports (top level and inside functions), resolved from its source."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (base + ("." + node.module if node.module else "")) if node.level else node.module
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
            names = submodules or [target]  # "from . import x" imports the module x, not the package's API
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in MODULES and n != module)
    return found


def test_sas_imports_are_acyclic():
    graph = {m: _imports(m) for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for n in graph[m]:
            visit(n, path + [m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])


def test_sas_kernels_imports_nothing_of_sas():
    for path in (ROOT / "sas_kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n == "sas" or n.startswith("sas.") for n in names), path


@pytest.mark.parametrize("module", [m for m in MODULES if m not in ("sas.check",)])
def test_each_module_imports_alone(module):
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)


def test_only_sas_backends_tests_a_backend_name():
    """Which backend runs is decided in sas/backends/ alone: no other sas module compares a value with a
    backend's name (``x == "triton"``, ``name in ("cpp", ...)``, ``"reference" != y``)."""
    names = {"triton", "cpp", "reference"}
    found = []
    for path in (ROOT / "sas").rglob("*.py"):
        if "backends" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            literals = [c.value for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
            if names & {v for v in literals if isinstance(v, str)}:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"backend names tested outside sas/backends/: {found}"
