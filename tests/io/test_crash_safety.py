"""save_adapter under kill -9 and under concurrent savers: the folder always loads as one whole adapter.

Savers run as processes forked by a multiprocessing forkserver that imported torch and sas once, so
each killed saver costs a fork, not an interpreter start (about 2.7 s here).
"""
import multiprocessing
import os
import random
import signal
import subprocess
import time

import pytest
import torch
from torch import nn

import sas
import sas.io
from sas import SaSConfig
from sas.io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, 32_768)  # 4 MiB of weights, so that a save takes a while to write

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)))


def _versioned_model(version):
    """The model holding adapter ``version``: random values drawn from the version, which ``head.bias[0]``
    also holds, so a loaded adapter says which version it claims to be."""
    model = sas.inject(Net(), SaSConfig(rank=4, targets=["hidden"], trainable_modules=["head"]))
    generator = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        model.head.bias[0] = version
    return model


def _loaded_version(directory):
    """The version the adapter in ``directory`` holds, after checking every tensor is that version's."""
    loaded = adapter_state_dict(sas.load_adapter(Net(), directory))
    version = int(loaded["head.bias"][0])
    expected = adapter_state_dict(_versioned_model(version))
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), f"{key} of version {version} is mixed with another save"
    return version


def _temporaries(directory):
    return sorted(p.name for p in directory.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME))


def _save_versions(directory, versions, progress_path):
    """Save each of ``versions`` in turn; after each, append its number to ``progress_path``."""
    torch.set_num_threads(1)
    with open(progress_path, "a") as progress:
        progress.write("ready\n")
        progress.flush()
        for version in versions:
            sas.save_adapter(_versioned_model(version), directory)
            progress.write(f"{version}\n")
            progress.flush()


def _saved_versions(progress_path):
    """The versions a saver recorded as saved (a line cut by a kill does not count)."""
    lines = progress_path.read_text().split("\n")[:-1]  # the part after the last newline is unfinished
    return [int(line) for line in lines if line != "ready"]


def _wait_until_ready(progress_path, process):
    while "ready" not in progress_path.read_text():
        assert process.exitcode is None, f"saver died at start-up (exit code {process.exitcode})"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    # Only takes effect if this process's forkserver is not running yet; otherwise children import on demand.
    context.set_forkserver_preload(["torch", "sas", __name__])
    return context


KILLS = 12


def test_kill_9_at_random_moments_leaves_the_previous_or_the_new_adapter(forkserver, tmp_path):
    directory = tmp_path / "adapter"
    sas.save_adapter(_versioned_model(0), directory)
    current, rng = 0, random.Random(1234)
    for trial in range(KILLS):
        progress = tmp_path / f"progress{trial}"
        progress.touch()
        first = 1000 * (trial + 1)
        saver = forkserver.Process(target=_save_versions, args=(directory, range(first, first + 1000), progress))
        saver.start()
        _wait_until_ready(progress, saver)
        time.sleep(rng.uniform(0.0, 0.25))  # a save of this adapter takes tens of ms: kills land in all its steps
        os.kill(saver.pid, signal.SIGKILL)
        saver.join()
        saved = _saved_versions(progress)
        # The last save that finished, or the one that was running when the kill came.
        finished, running = (saved[-1], saved[-1] + 1) if saved else (current, first)
        current = _loaded_version(directory)
        assert current in (finished, running)
        # Each save first removes what dead savers left, so at most the killed save's two files remain.
        assert len(_temporaries(directory)) <= 2, _temporaries(directory)
    sas.save_adapter(_versioned_model(99), directory)
    assert _temporaries(directory) == []
    assert _loaded_version(directory) == 99


def test_two_concurrent_savers_and_a_reader_always_see_one_whole_adapter(forkserver, tmp_path):
    directory = tmp_path / "adapter"
    sas.save_adapter(_versioned_model(0), directory)
    savers = {}
    for first in (100, 200):
        progress = tmp_path / f"progress{first}"
        progress.touch()
        savers[first] = (forkserver.Process(target=_save_versions, args=(directory, range(first, first + 8), progress)),
                         progress)
    for saver, _ in savers.values():
        saver.start()
    seen = set()
    while any(saver.is_alive() for saver, _ in savers.values()):
        seen.add(_loaded_version(directory))  # raises, or fails the comparison, if it reads a mix of saves
    for saver, progress in savers.values():
        saver.join()
        assert saver.exitcode == 0
        assert len(_saved_versions(progress)) == 8
    assert seen <= {0} | set(range(100, 108)) | set(range(200, 208))
    assert _loaded_version(directory) in (107, 207)  # the last save of one of them, whole
    assert _temporaries(directory) == []


def _temporary_name(name, host, pid, save_id="0123456789abcdef0123456789abcdef"):
    return f".{name}.{host}.{pid}.{save_id}.tmp"


def test_only_stale_temporaries_are_removed(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()  # a pid that no longer runs
    hour_ago = time.time() - sas.io.STALE_TEMPORARY_AGE_S - 60
    here = sas.io._HOST
    other_host = "0" * 8 if here != "0" * 8 else "1" * 8
    files = {  # name -> removed?
        _temporary_name(WEIGHTS_NAME, here, finished.pid): True,  # its writer died
        _temporary_name(CONFIG_NAME, here, finished.pid): True,
        _temporary_name(WEIGHTS_NAME, here, os.getpid()): False,  # a save running in this process
        _temporary_name(WEIGHTS_NAME, here, os.getppid()): False,  # a save running in another process
        _temporary_name(WEIGHTS_NAME, other_host, finished.pid): False,  # another machine's: cannot tell
        f".{WEIGHTS_NAME}.0123456789abcdef0123456789abcdef.tmp": False,  # an earlier version's, recent
        "notes.tmp": False,  # not a temporary of ours
        f".{WEIGHTS_NAME}.partial.tmp": False,
    }
    old = {  # untouched for over STALE_TEMPORARY_AGE_S -> removed?
        _temporary_name(WEIGHTS_NAME, other_host, 12345): True,
        f".{CONFIG_NAME}.fedcba9876543210fedcba9876543210.tmp": True,
        "old-notes.tmp": False,
    }
    for name in list(files) + list(old):
        (tmp_path / name).write_bytes(b"x")
    for name in old:
        os.utime(tmp_path / name, (hour_ago, hour_ago))
    sas.save_adapter(_versioned_model(1), tmp_path)
    remaining = set(_temporaries(tmp_path))
    for name, removed in {**files, **old}.items():
        assert (name not in remaining) == removed, name
    assert _loaded_version(tmp_path) == 1
