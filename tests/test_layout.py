"""The package layout: imports among sas modules point one way (API -> backends -> kernels), and every
repository path a comment, docstring or doc names exists."""
import ast
import pathlib
import re
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


# ---------------------------------------------------------------- paths named in comments, docstrings and docs

#: The files whose text names repository paths: the docs, the sources with their comments and docstrings, the
#: build and test scripts, and the planted bugs' ``Tests:`` lines. Not bench/results/ (generated, and naming the
#: machines' own paths) nor tests/data/.
DOCUMENTED = ("README.md", "Makefile", "setup.py", "requirements.txt", "pyproject.toml", "docs/*.md", "csrc/*",
              "sas/**/*.py", "sas_kernels/**/*.py", "bench/*.py", "bench/*.sh", "bench/*.txt", "examples/*.py",
              "tests/**/*.py", "tests/mutants/*")
#: A repository path as the text names it: a file under a top-level folder with one of these extensions, or a
#: folder written with its trailing slash. Not preceded by a path character, so the tail of an absolute path or
#: of a patch's ``a/sas/x.py`` is not one, and a glob (``tests/test_*.py``) matches nothing.
REPOSITORY_PATH = re.compile(r"(?<![\w/.*-])((?:sas|sas_kernels|csrc|bench|tests|docs|examples)/(?:[\w.-]+/)*"
                             r"(?:[\w.-]+\.(?:py|cpp|h|md|json|csv|png|sh|txt|patch|toml)\b|(?=[\s`'\")]|$)))")
#: A test file named alone (``test_layout.py``), as the helpers and docs name their neighbours.
TEST_FILE_NAME = re.compile(r"(?<![\w/.*-])(test_\w+\.py)\b")
#: A module named by its reST role (``:mod:`sas.backends.fold```).
MODULE_ROLE = re.compile(r":mod:`~?((?:sas|sas_kernels|bench)(?:\.\w+)*)`")
#: An output option: the path after it is one the command writes, not one that must exist yet.
WRITTEN_BY_COMMAND = re.compile(r"--(?:json|csv|out|output)[ =]$")


def _documented_files():
    files = {p for pattern in DOCUMENTED for p in ROOT.glob(pattern) if p.is_file()}
    return sorted(p for p in files if p.suffix not in (".so", ".pyc"))


def _missing_names(path: pathlib.Path):
    """``(line number, name)`` of every path, test file or module ``path``'s text names that the tree lacks."""
    test_files = {p.name for folder in ("tests", "bench") for p in (ROOT / folder).rglob("test_*.py")}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        for match in REPOSITORY_PATH.finditer(line):
            if not (ROOT / match.group(1)).exists() and not WRITTEN_BY_COMMAND.search(line[:match.start()]):
                yield number, match.group(1)
        for match in TEST_FILE_NAME.finditer(line):
            if match.group(1) not in test_files:
                yield number, match.group(1)
        for match in MODULE_ROLE.finditer(line):
            module = ROOT / match.group(1).replace(".", "/")
            if not (module.with_suffix(".py").exists() or (module / "__init__.py").exists()):
                yield number, match.group(1)


def test_every_named_repository_path_exists():
    """A comment or doc that names a moved or deleted file sends its reader nowhere: every repository path,
    test file name and ``:mod:`` module named in the docs and sources must exist in the tree."""
    files = _documented_files()
    assert len(files) > 50 and ROOT / "README.md" in files  # the globs still find the tree
    missing = [f"{path.relative_to(ROOT)}:{number}: {name}" for path in files for number, name in _missing_names(path)]
    assert not missing, "names of paths that do not exist:\n" + "\n".join(missing)
