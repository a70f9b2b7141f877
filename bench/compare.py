"""``python -m bench.compare OLD.json NEW.json``: two result files side by side, regressions flagged.

Rows are matched by level, case, pass, provider, dtype, backend (and timing mode and metric where the
rows have them). Each matched row is compared on one number, where lower is better:

* op/layer/model rows: ``median_ms``;
* host rows (``bench/host.py``): ``value`` in its ``unit``.

Timed units (ms, us, the ratio x) are noisy: a row regresses when NEW exceeds OLD by more than
``--threshold`` (relative, default 0.10). Counted units (ops, launches, bytes) do not depend on the
machine's load: any increase regresses. A row that ran in OLD and fails in NEW regresses too; rows
present in one file only are listed, not flagged (grids change between commits).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

KEY_FIELDS = ("level", "case", "pass", "provider", "dtype", "backend", "timing", "metric")
EXACT_UNITS = frozenset({"ops", "launches", "bytes"})
DEFAULT_THRESHOLD = 0.10


class Comparison(NamedTuple):
    key: Tuple
    unit: str
    old: Optional[float]
    new: Optional[float]
    verdict: str  # "ok", "regression", "improved", "only-old", "only-new", "error", "fixed", "skipped"

    @property
    def change(self) -> Optional[float]:
        """NEW / OLD - 1, or None where either is missing or OLD is zero."""
        if self.old is None or self.new is None or self.old == 0:
            return None
        return self.new / self.old - 1.0


def row_key(row: Dict) -> Tuple:
    return tuple(row.get(field) for field in KEY_FIELDS)


def row_value(row: Dict) -> Tuple[Optional[float], str]:
    """The number a row is compared on and its unit (lower is better)."""
    if "metric" in row:
        return row["value"], row["unit"]
    return row["median_ms"], "ms"


def _verdict(old: Dict, new: Dict, threshold: float) -> str:
    if old["status"] != "ok" or new["status"] != "ok":
        if old["status"] == "ok":
            return "error"
        return "fixed" if new["status"] == "ok" else "skipped"
    (a, unit), (b, _) = row_value(old), row_value(new)
    allowed = 0.0 if unit in EXACT_UNITS else threshold
    if b > a * (1.0 + allowed):
        return "regression"
    if b < a * (1.0 - allowed):
        return "improved"
    return "ok"


def compare(old_rows: List[Dict], new_rows: List[Dict], threshold: float = DEFAULT_THRESHOLD) -> List[Comparison]:
    """One :class:`Comparison` per row key in either list, in NEW's order then OLD's leftovers."""
    old = {row_key(r): r for r in old_rows}
    new = {row_key(r): r for r in new_rows}
    out = []
    for key, row in new.items():
        value, unit = row_value(row)
        if key not in old:
            out.append(Comparison(key, unit, None, value, "only-new"))
        else:
            out.append(Comparison(key, unit, row_value(old[key])[0], value, _verdict(old[key], row, threshold)))
    out += [Comparison(key, row_value(row)[1], row_value(row)[0], None, "only-old")
            for key, row in old.items() if key not in new]
    return out


def is_regression(c: Comparison) -> bool:
    return c.verdict in ("regression", "error")


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_comparison(results: List[Comparison], old_meta: Dict, new_meta: Dict, show_all: bool) -> str:
    lines = [f"OLD: {old_meta.get('device')} commit {old_meta.get('git_commit')} {old_meta.get('date')}",
             f"NEW: {new_meta.get('device')} commit {new_meta.get('git_commit')} {new_meta.get('date')}"]
    if old_meta.get("device") != new_meta.get("device"):
        lines.append("warning: the files come from different devices; timings do not compare")
    lines += ["", f"{'row':<90} {'unit':<8} {'old':>10} {'new':>10} {'change':>8}  verdict"]
    for c in results:
        if not show_all and c.verdict in ("ok", "skipped"):
            continue
        label = " | ".join(str(part) for part in c.key if part is not None)
        change = "-" if c.change is None else f"{100 * c.change:+.1f}%"
        lines.append(f"{label[:90]:<90} {c.unit:<8} {_num(c.old):>10} {_num(c.new):>10} {change:>8}  {c.verdict}")
    counts = {}
    for c in results:
        counts[c.verdict] = counts.get(c.verdict, 0) + 1
    lines += ["", "rows: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    parser.add_argument("old", type=Path, help="result JSON of the earlier run")
    parser.add_argument("new", type=Path, help="result JSON of the later run")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"relative slow-down of a timed row that counts as a regression (default "
                             f"{DEFAULT_THRESHOLD}); counted rows regress on any increase")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit status 1 when any row regressed")
    parser.add_argument("--all", action="store_true", help="list unchanged rows too")
    args = parser.parse_args(argv)
    old, new = (json.loads(path.read_text()) for path in (args.old, args.new))
    results = compare(old["rows"], new["rows"], args.threshold)
    print(format_comparison(results, old["meta"], new["meta"], args.all))
    return 1 if args.fail_on_regression and any(map(is_regression, results)) else 0


if __name__ == "__main__":
    sys.exit(main())
