"""Where a result came from: the commit of the code that produced it and the machine it ran on.

Written into the ``meta`` of every result file, by the recipes and by ``bench/``.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit(directory: Path) -> str:
    """``git rev-parse --short HEAD`` (+dirty) of the checkout holding ``directory``; a source tree
    copied without ``.git`` (a lent GPU machine) can pass it in ``SAS_BENCH_COMMIT``."""
    if os.environ.get("SAS_BENCH_COMMIT"):
        return os.environ["SAS_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=directory, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=directory, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from ``/proc/cpuinfo``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
