"""Op calls and configuration sweeps shared by the kernel suites, and the one accuracy assertion they all make.

``KERNEL_GRID`` and ``MULTI_TASK_GRID`` run in ``test_interpreter.py`` (CPU, Triton's interpreter)
and ``test_gpu.py`` (CUDA); :func:`assert_matches_reference` also serves ``test_cpp.py``.
``CONFIG_CASES`` and ``SCALING_CASES`` (:func:`sas.testing.sas_config_cases`: every config field that changes
the maths, crossed pairwise with widths, leading dims and dtypes) run as op calls, standalone layers and
adapted models in ``test_config_space.py``.
Inputs, tolerance and the check that the backend really ran are :mod:`sas.testing`'s (docs/design.md
section 4). Not a test module: pytest puts ``tests/`` on ``sys.path`` (the folder of ``tests/conftest.py``,
"prepend" import mode, no ``__init__.py``), so the suites in its subfolders ``import kernel_cases``.
"""
import pytest
import torch

from sas import functional
from sas.testing import OpCase, compare_op, sas_config_cases, scaling_config_cases

# Odd shapes, every rank class, leading dims, and strided inputs (x and base column slices of wider
# buffers, read in place; A and B transposed; h strided): run by the interpreter suite in fp32/fp16
# and by the CUDA suite in fp32/fp16/bf16. Rows and dims stay small for the interpreter (docs/design.md section 5).
KERNEL_GRID = [
    OpCase("rank-1", (37,), 45, 70, rank=1, scale=0.5),
    OpCase("rank-3", (37,), 45, 70, rank=3, scale=0.5),
    OpCase("rank-8-3d", (2, 9), 33, 20, rank=8, scale=0.5),
    OpCase("rank-17-strided", (70,), 17, 65, rank=17, noncontiguous=True, column_slices=True, scale=0.5),
    OpCase("rank-64-4d", (3, 5, 4), 40, 24, rank=64, scale=0.5),
]

MULTI_TASK_GRID = [
    OpCase("tasks-per-row", (29,), 24, 19, rank=5, tasks=3, scale=0.5),
    OpCase("tasks-per-batch-strided", (4, 11), 18, 33, rank=8, tasks=5, ids_per_batch=True, noncontiguous=True,
           column_slices=True, scale=0.5),
    OpCase("20-tasks", (40,), 16, 16, rank=3, tasks=20, scale=0.5),  # more tasks than one 16-task block
]

CONFIG_CASES = sas_config_cases()
SCALING_CASES = scaling_config_cases()


def each_case(cases, dtypes):
    """Parametrize a test ``(case, dtype)`` over every case in every dtype; ids ``<case name>-<dtype>``."""
    pairs = [(case, dtype) for dtype in dtypes for case in cases]
    return pytest.mark.parametrize("case, dtype", pairs, ids=[f"{case.name}-{dtype}" for case, dtype in pairs])


def each_config(cases):
    """Parametrize a test ``case`` over configuration cases; ids are their names (every field they set)."""
    return pytest.mark.parametrize("case", cases, ids=[case.name for case in cases])


def triton_op(x, base, A, B, h, scale=1.0, task_ids=None):
    return functional.sas_adapter(x, base, A, B, h, scale, task_ids, backend="triton")


def assert_matches_reference(case: OpCase, backend: str, dtype: torch.dtype, device: str, seed: int = 0) -> None:
    """y and every gradient of ``backend`` on ``case`` within the tolerance rule's bound of float64, and the
    backend really ran (a silent fallback to the reference fails)."""
    report = compare_op(**case.make_inputs(dtype, device, seed), backends=[backend], case=case.describe(), seed=seed)
    assert report.passed, report.table()
