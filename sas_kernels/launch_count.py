"""Counts Triton kernel launches, so tests and ``python -m bench --level host`` can check how many
launches an adapted layer costs (the interpreter's launches included, so it works on CPU).

Every launcher in ``sas_kernels`` calls :func:`record_launch` once per launch. Outside
:func:`count_launches` that is one attribute read, well under the ~10 us of the launch itself.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional


class LaunchCounter:
    """Launches seen inside one :func:`count_launches` block, by kernel name."""

    def __init__(self) -> None:
        self.names: List[str] = []

    @property
    def count(self) -> int:
        return len(self.names)


_active: Optional[LaunchCounter] = None


def record_launch(name: str) -> None:
    if _active is not None:
        _active.names.append(name)


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchCounter]:
    """``with count_launches() as counter: ...`` then ``counter.count`` (nesting restores the outer counter)."""
    global _active
    outer, _active = _active, LaunchCounter()
    try:
        yield _active
    finally:
        _active = outer
