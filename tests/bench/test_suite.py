"""``make bench-gpu`` (bench/suite.py): the plan fits one GPU call, and a step leaves nothing running.

Every step here is a tiny command; the suite's real steps run only on a GPU (and at tiny shapes on CPU in
``make test-compat``).
"""
import ast
import json
import sys
import time
from pathlib import Path

import pytest

from bench import suite

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_for_file(path: Path, seconds: float = 10.0) -> str:
    end = time.monotonic() + seconds
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < end, f"{path} was never written"
        time.sleep(0.02)
    return path.read_text().strip()


@pytest.mark.parametrize("extra", [False, True], ids=["main", "extra"])
@pytest.mark.parametrize("device,tiny", [("cuda", False), ("cpu", True)], ids=["gpu", "cpu-tiny"])
def test_every_plan_fits_its_deadline(device, tiny, extra):
    steps = suite.default_steps(device, tiny, suite.RESULTS_DIR, extra)
    assert suite.plan_seconds(steps) <= suite.DEFAULT_DEADLINE_S < 540  # the most one GPU call may run
    for step in steps:
        assert step.budget_s is None or 0 < step.budget_s < step.timeout_s, step.name


def test_main_call_puts_the_headline_after_the_correctness_gate():
    steps = suite.default_steps("cuda", tiny=False, out=suite.RESULTS_DIR)
    assert [s.name for s in steps] == ["check", "model", "layer", "op", "gpu-tests"]
    by_name = {s.name: " ".join(s.argv) for s in steps}
    assert steps[0].argv[1:6] == ["-m", "sas.check", "--device", "cuda", "--quick"]
    assert "--level model --batch 128" in by_name["model"]
    assert all(p in by_name["model"].split() for p in ("sas", "peft-lora", "frozen", "sas-compiled",
                                                        "peft-lora-compiled", "frozen-compiled"))
    for level in ("op", "layer"):
        assert f"--level {level} --timing eager cuda-graph" in by_name[level]
        assert f"--rows {suite.BATCH_ROWS}" in by_name[level]
    # The fresh-process tests are left to the second call, where each has a step of its own.
    for node_id, _ in suite.FRESH_PROCESS_TESTS.values():
        assert f"--deselect {node_id}" in by_name["gpu-tests"]
    extra = suite.default_steps("cuda", tiny=False, out=suite.RESULTS_DIR, extra=True)
    assert [s.name for s in extra] == [*suite.FRESH_PROCESS_TESTS, "host", "memory"]
    assert "--level memory --memory-parts measured dA" in " ".join(extra[-1].argv)


def test_fresh_process_tests_exist_and_bound_their_child_below_their_step():
    # A renamed test would be deselected silently from the main call; its child's timeout must fire first.
    source = (ROOT / "tests" / "kernels" / "test_gpu_hazards.py").read_text()
    tree = ast.parse(source)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    default = next(arg.value for arg in ast.walk(functions["_in_fresh_process"]) if isinstance(arg, ast.Constant)
                   and isinstance(arg.value, int))
    for node_id, step_timeout in suite.FRESH_PROCESS_TESTS.values():
        path, name = node_id.split("::")
        assert path == "tests/kernels/test_gpu_hazards.py" and name in functions, node_id
        calls = [c for c in ast.walk(functions[name]) if isinstance(c, ast.Call)
                 and getattr(c.func, "id", None) == "_in_fresh_process"]
        assert len(calls) == 1, name
        timeout = next((k.value.value for k in calls[0].keywords if k.arg == "timeout"), default)
        assert timeout < step_timeout, name


def test_plan_prints_every_step_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert suite.main(["--plan", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for step in suite.default_steps("cuda", tiny=False, out=out):
        line = next(line for line in printed.splitlines() if line.startswith(step.name + " "))
        assert f" {step.timeout_s:.0f} " in line
        assert step.budget_s is None or f" {step.budget_s:.0f} " in line
    assert f"at most {suite.plan_seconds(suite.default_steps('cuda', False, out)):.0f} s" in printed
    assert not out.exists()


def test_suite_reports_each_step_and_goes_on_after_failures(tmp_path):
    steps = [suite.Step("fails", [PY, "-c", "raise SystemExit(3)"], timeout_s=30),
             suite.Step("slow", [PY, "-c", "import time; time.sleep(30)"], timeout_s=0.5),
             suite.Step("budgeted", [PY, "-c", "import sys; assert sys.argv[1:] == ['--budget-s', '5']"],
                        timeout_s=30, budget_s=5),
             suite.Step("late", [PY, "-c", "pass"], timeout_s=30)]
    reports = suite.run_steps(steps[:3], deadline_s=60, log_dir=tmp_path) + suite.run_steps(
        steps[3:], deadline_s=0, log_dir=tmp_path)
    assert [(r["step"], r["status"]) for r in reports] == [
        ("fails", "failed"), ("slow", "timeout"), ("budgeted", "ok"), ("late", "not run")]
    assert reports[0]["returncode"] == 3


def test_budget_shrinks_with_the_deadline_and_keeps_the_slack(tmp_path):
    # 20 s left (less the reaping margin): the timeout is cut to that and the budget keeps its 10 s of slack.
    step = suite.Step("budgeted", [PY, "-c", "import sys; print(sys.argv[2])"], timeout_s=100, budget_s=90)
    report, = suite.run_steps([step], deadline_s=20 + suite.KILL_WAIT_S, log_dir=tmp_path)
    assert report["status"] == "ok" and 15 <= report["timeout_s"] <= 20
    budget = float((tmp_path / "budgeted.log").read_text())
    assert abs(budget - (report["timeout_s"] - 10)) <= 1


def test_a_timed_out_step_leaves_no_process_behind(tmp_path):
    # The step is a shell whose child sleeps: killing the shell alone (subprocess.run's timeout) would
    # leave the sleeper running, as a GPU step's pytest outlived its make.
    pid_file = tmp_path / "pids"
    step = suite.Step("overruns", ["sh", "-c", f"sleep 300 & echo $$ $! > {pid_file}; wait"], timeout_s=1)
    report, = suite.run_steps([step], deadline_s=60, log_dir=tmp_path)
    shell, sleeper = map(int, _wait_for_file(pid_file).split())
    assert report["status"] == "timeout" and "left_running" not in report
    assert not _running(shell) and not _running(sleeper)


def test_a_finished_step_leaves_no_process_behind(tmp_path):
    # The shell exits at once and its background child would live on, holding the GPU, into the next step.
    pid_file = tmp_path / "pid"
    step = suite.Step("leaks", ["sh", "-c", f"sleep 300 & echo $! > {pid_file}"], timeout_s=30)
    report, = suite.run_steps([step], deadline_s=60, log_dir=tmp_path)
    assert report["status"] == "ok" and "left_running" not in report
    assert not _running(int(_wait_for_file(pid_file)))


def test_each_step_sees_the_summary_of_the_steps_before(tmp_path, monkeypatch):
    # A call cut off midway must still return what it measured: the summary is rewritten after every step.
    out = tmp_path / "out"
    check = ("import json, pathlib, sys; (summary,) = pathlib.Path(sys.argv[1]).glob('suite_*.json');"
             "print([s['step'] for s in json.loads(summary.read_text())['steps']])")
    steps = [suite.Step("first", [PY, "-c", "print('measured')"], timeout_s=30),
             suite.Step("second", [PY, "-c", check, str(out)], timeout_s=30)]
    monkeypatch.setattr(suite, "default_steps", lambda *args, **kwargs: steps)
    assert suite.main(["--device", "cpu", "--out", str(out)]) == 0
    assert (out / "suite_logs" / "second.log").read_text().strip() == str(["first"])
    (summary,) = out.glob("suite_*_cpu.json")
    written = json.loads(summary.read_text())
    assert written["finished"] and [s["status"] for s in written["steps"]] == ["ok", "ok"]
    assert (out / "suite_logs" / "first.log").read_text().strip() == "measured"
