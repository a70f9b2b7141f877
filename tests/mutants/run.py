"""Plant each bug of ``tests/mutants/*.patch`` in a scratch copy of the repository and check that its tests fail.

    python tests/mutants/run.py [NAME ...] [--rev REV] [--no-baseline] [--keep]    (``make mutate``: all of them)

The copy is ``git archive REV`` (default ``HEAD``) in a temporary folder: the working tree, its build of
``sas._C`` and other developers' uncommitted edits are never touched. The copy builds its own C++ extension
once (ninja then recompiles only a file a mutant changes, and again after reverting it). First the unmutated
copy must pass every selected test (a baseline: a kill counts only against a passing suite); then each patch
is applied, the tests its ``Tests:`` line names run (``-x``: the first failure kills it) with the copy first on
``sys.path`` and ``SAS_REQUIRE_CPP=1``, and the patch is reverted. Prints one line per mutant (killed,
SURVIVED, or why it could not run) and the time each took; exits non-zero unless every mutant was killed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MUTANTS = Path(__file__).resolve().parent
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-profile=ci"]


def header(patch: Path, field: str) -> str:
    """The value of a ``Field: value`` line before the diff (``Bug:``, ``Tests:``)."""
    for line in patch.read_text().splitlines():
        if line.startswith("--- "):
            break
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise ValueError(f"{patch.name} has no '{field}:' line before its diff")


def touches_csrc(patch: Path) -> bool:
    return any(line.startswith("+++ b/csrc/") for line in patch.read_text().splitlines())


def run(command, tree: Path, quiet: bool = True) -> int:
    environment = dict(os.environ, PYTHONPATH=str(tree), SAS_REQUIRE_CPP="1")
    output = subprocess.DEVNULL if quiet else None
    return subprocess.run(command, cwd=tree, env=environment, stdout=output, stderr=output).returncode


def build_extension(tree: Path) -> bool:
    """Build ``sas._C`` in ``tree`` (incremental after the first build); whether it built."""
    built = run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], tree) == 0
    return built and any((tree / "sas").glob("_C*.so"))


def apply(patch: Path, tree: Path, reverse: bool = False) -> bool:
    command = ["git", "apply", *(["-R"] if reverse else []), str(patch)]
    return subprocess.run(command, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (file names without .patch); default: all")
    parser.add_argument("--rev", default="HEAD", help="the commit to copy and plant the bugs in (default HEAD)")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unmutated copy")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = parser.parse_args(argv)
    patches = sorted(MUTANTS.glob("*.patch"))
    if args.names:
        patches = [MUTANTS / f"{name}.patch" for name in args.names]
        missing = [p.name for p in patches if not p.exists()]
        if missing:
            parser.error(f"no such mutants: {', '.join(missing)}")
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="sas-mutants-"))
    tree = scratch / "tree"
    tree.mkdir()
    try:
        archive = subprocess.run(["git", "archive", args.rev], cwd=ROOT, stdout=subprocess.PIPE, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        print(f"scratch copy of {args.rev} in {tree}; building sas._C ...", flush=True)
        if not build_extension(tree):
            print("the unmutated C++ extension does not build: nothing to compare against")
            return 2
        tests = {p: header(p, "Tests").split() for p in patches}
        if not args.no_baseline:
            selected = sorted({t for names in tests.values() for t in names})
            moment = time.monotonic()
            if run([sys.executable, *PYTEST, *selected], tree, quiet=False) != 0:
                print("the unmutated copy fails the selected tests: fix that first (a kill would mean nothing)")
                return 2
            print(f"baseline: every selected test passes ({time.monotonic() - moment:.0f} s)", flush=True)
        results = []
        extension_mutated = False
        for patch in patches:
            moment = time.monotonic()
            name = patch.name[:-len(".patch")]
            if not apply(patch, tree):
                status = "does not apply (re-plant it against the current code)"
            else:
                rebuild = touches_csrc(patch) or extension_mutated
                extension_mutated = touches_csrc(patch)
                if rebuild and not build_extension(tree):
                    status = "does not build (not a behaviour change)"
                else:
                    code = run([sys.executable, *PYTEST, *tests[patch]], tree)
                    status = {0: "SURVIVED", 1: "killed"}.get(code, f"pytest exited {code} (not a test failure)")
                apply(patch, tree, reverse=True)
            seconds = time.monotonic() - moment
            results.append((name, status))
            print(f"{status:>9}  {seconds:5.0f} s  {name}: {header(patch, 'Bug')}  [{' '.join(tests[patch])}]",
                  flush=True)
        killed = sum(status == "killed" for _, status in results)
        print(f"\n{killed} of {len(results)} mutants killed in {time.monotonic() - started:.0f} s")
        return 0 if killed == len(results) else 1
    finally:
        if args.keep:
            print(f"kept {tree}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
