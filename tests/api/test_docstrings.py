"""The public entry points' docstrings: each has Args, Returns (or Yields), Raises and Example sections
(Google style), and every example runs and prints what it shows."""
import doctest
import inspect

import pytest

import sas
import sas.distributed
import sas.functional

pytest.importorskip("transformers")
import sas.trainer  # noqa: E402

PUBLIC_ENTRY_POINTS = [
    sas.inject, sas.merge, sas.unmerge, sas.merge_and_unload, sas.unload, sas.disable_adapter, sas.save_adapter,
    sas.load_adapter, sas.export_lora, sas.tasks, sas.add_task, sas.pattern_penalty, sas.memory_plan,
    sas.functional.sas_adapter, sas.SaSLinear.from_linear, sas.distributed.shard, sas.trainer.SaSTrainer,
]
ENTRY_IDS = [entry.__qualname__ for entry in PUBLIC_ENTRY_POINTS]


@pytest.mark.parametrize("entry", PUBLIC_ENTRY_POINTS, ids=ENTRY_IDS)
def test_docstring_has_the_google_sections(entry):
    doc = inspect.cleandoc(entry.__doc__)
    assert all(f"\n{section}:\n" in doc for section in ("Args", "Raises", "Example")), entry.__qualname__
    if not isinstance(entry, type):  # a class documents its constructor's arguments, and returns itself
        assert "\nReturns:\n" in doc or "\nYields:\n" in doc, entry.__qualname__


@pytest.mark.parametrize("entry", PUBLIC_ENTRY_POINTS, ids=ENTRY_IDS)
def test_docstring_example_runs(entry):
    (test,) = doctest.DocTestFinder(recurse=False).find(entry, entry.__qualname__, globs={})
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.failures == 0, f"{entry.__qualname__}'s example fails (see the output above)"
