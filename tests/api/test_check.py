"""``python -m sas.check`` usage: bad arguments (a meta device, a seed out of the generators' range, an unknown
model or targets, a report path that is not a regular file) end in one line on stderr and exit status 2, before
anything runs and not as a traceback; so does a report that cannot be written after the run."""
import os
import subprocess
import sys

import pytest
import torch

from sas import check
from sas.testing import CheckReport


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "sas.check", "--quick", *argv],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv, message", [
    (["--device", "meta"], "--device 'meta': meta tensors hold shapes but no values"),
    (["--seed", str(2 ** 70)], f"--seed {2 ** 70}: must be a signed 64-bit integer"),
    (["--seed", str(-2 ** 63 - 1)], f"--seed {-2 ** 63 - 1}: must be a signed 64-bit integer"),
    (["--json", os.devnull], f"--json {os.devnull!r}: not a regular file"),
], ids=["meta device", "seed 2**70", "seed below -2**63", "json to a device"])
def test_bad_usage_exits_2_with_one_line(argv, message):
    result = _run(*argv)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize("seed", [-2 ** 63, 2 ** 63 - 1])
def test_seeds_at_both_ends_of_the_range_run(seed, capsys):
    assert check.main(["--quick", "--dtype", "fp32", "--backend", "reference", "--seed", str(seed)]) == 0
    assert "sas.check: PASS" in capsys.readouterr().out


def test_an_unknown_adapter_is_bad_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.parse_args(["--adapter", "ia3"])
    assert exit_info.value.code == 2 and "argument --adapter: invalid choice: 'ia3'" in capsys.readouterr().err


@pytest.mark.parametrize("adapter", ["ssl", "ssb"])
def test_the_scaling_adapters_grid_passes_and_checks_their_fast_path(adapter, capsys):
    assert check.main(["--quick", "--adapter", adapter, "--dtype", "fp32,bf16"]) == 0
    out = capsys.readouterr().out
    assert "sas.check: PASS" in out and f"{adapter} [0x64->48]" in out and "aten (scaling layers)" in out


def test_a_report_that_cannot_be_written_after_the_run_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()

    def run_removing_the_folder(*_args):
        folder.rmdir()  # as if the disk filled or the folder went while the check ran
        return CheckReport()

    monkeypatch.setattr(check, "check_grid", run_removing_the_folder)
    assert check.main(["--quick", "--json", str(folder / "report.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--json '{folder / 'report.json'}': cannot write it" in err, err


# -- python -m sas.check usage -----------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--json", "/nonexistent-folder/report.json"], "--json '/nonexistent-folder/report.json': cannot write it"),
    (["--device", "gpu0"], "--device 'gpu0'"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", f"cuda:{torch.cuda.device_count()}"],
     "--device 'cuda:"),
    (["--model", "no_such_model"], "--model 'no_such_model': not a timm model name"),
    (["--model", "test_vit", "--targets", "attn.qkv,decoder"],
     "--targets: targets entry 'decoder' matches no nn.Linear"),
    (["--model", "test_vit", "--targets", "attn.qkv,,mlp.fc1"], "--targets 'attn.qkv,,mlp.fc1': targets must be"),
    (["--targets", "attn.qkv"], "--targets only applies with --model"),
    (["--dtype", "fp8"], "--dtype: unknown ['fp8']"),
])
def test_check_rejects_bad_usage_before_running(argv, message, monkeypatch, capsys, tmp_path):
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the check ran despite bad usage")

    monkeypatch.setattr(check, "check_grid", must_not_run)
    monkeypatch.setattr(check, "check_model", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        check.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_check_json_path_that_is_a_folder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--quick", "--json", str(tmp_path)])
    assert exit_info.value.code == 2 and "is a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
