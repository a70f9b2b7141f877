"""``python -m bench.plot [RESULT.json ...]``: PNGs and a Markdown summary from committed results.

Without arguments it draws every ``bench/results/*.json``. For each result file it writes
``<stem>_speedup.png`` (op level: sas speedup over each baseline against rows, one panel per
shape, forward+backward), ``<stem>_bandwidth.png`` (op level: % of the measured copy
bandwidth per provider and pass, at the largest row count) and ``<stem>_summary.md`` (the
tables the README quotes).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

from .run import RESULTS_DIR

SPEEDUP_PASS = "forward+backward"


def _ok(rows: List[Dict], **match) -> List[Dict]:
    return [r for r in rows if r["status"] == "ok" and all(r[k] == v for k, v in match.items())]


def _title(meta: Dict) -> str:
    return f"{meta['device']} - {meta['dtype']} - torch {meta['torch']} - {meta['date'][:10]}"


def plot_speedup(result: Dict, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ok(result["rows"], level="op", **{"pass": SPEEDUP_PASS})
    sas_rows = [r for r in rows if r["provider"] == "sas"]
    shapes = list(dict.fromkeys(r["shape"] for r in sas_rows))
    if not shapes:
        return False
    columns = min(4, len(shapes))
    lines = (len(shapes) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3.2 * lines), squeeze=False, sharey=True)
    baselines = [p for p in ("reference", "reference-compiled") if any(r["provider"] == p for r in rows)]
    rank = min(r["rank"] for r in sas_rows)  # one rank per panel keeps the lines readable
    for axis, shape in zip(axes.flat, shapes):
        mine = sorted((r for r in sas_rows if r["shape"] == shape and r["rank"] == rank), key=lambda r: r["rows"])
        for baseline in baselines:
            key = f"speedup_vs_{baseline.replace('-', '_')}"
            points = [(r["rows"], r[key]) for r in mine if r[key] is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=f"vs {baseline}")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_title(f"{shape}, r={rank}", fontsize=9)
        axis.set_xlabel("rows")
    for axis in axes.flat[len(shapes):]:
        axis.set_visible(False)
    axes[0][0].set_ylabel(f"sas speedup ({SPEEDUP_PASS})")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"op level: sas ({sas_rows[0]['backend']}) speedup\n{_title(result['meta'])}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_bandwidth(result: Dict, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _ok(result["rows"], level="op") if r["pct_of_copy_bw"] is not None]
    if not rows:
        return False
    largest = max(r["rows"] for r in rows)
    rank = min(r["rank"] for r in rows)
    rows = [r for r in rows if r["rows"] == largest and r["rank"] == rank]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    figure, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 3.6), squeeze=False, sharey=True)
    width = 0.8 / len(providers)
    for axis, pass_name in zip(axes[0], passes):
        for index, provider in enumerate(providers):
            values = {r["shape"]: r["pct_of_copy_bw"] for r in rows
                      if r["provider"] == provider and r["pass"] == pass_name}
            axis.bar([s + index * width for s in range(len(shapes))], [values.get(s, 0.0) for s in shapes], width,
                     label=provider)
        axis.set_xticks([s + width * (len(providers) - 1) / 2 for s in range(len(shapes))])
        axis.set_xticklabels(shapes, rotation=45, ha="right", fontsize=8)
        axis.set_title(f"{pass_name}, rows={largest}, r={rank}", fontsize=9)
    axes[0][0].set_ylabel("% of measured copy bandwidth")
    axes[0][0].legend(fontsize=8)
    copy = result["meta"]["copy_bandwidth_gbps"]
    figure.suptitle(f"op level: ideal bytes / time / copy bandwidth ({copy:.0f} GB/s)\n{_title(result['meta'])}",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_markdown(result: Dict) -> str:
    """Per level: sas against each provider at every case (median ms; speedup of sas = other / sas)."""
    meta = result["meta"]
    out = [f"Device: **{meta['device']}** ({meta['device_type']}), {meta['dtype']}, torch {meta['torch']}, "
           f"triton {meta['triton']}, commit `{meta['git_commit']}`, {meta['date'][:10]}; "
           f"copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s (read+write)."]
    out += [f"- {note}" for note in meta["notes"]]
    for level in meta["levels"]:
        rows = [r for r in result["rows"] if r["level"] == level]
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        if not rows:
            continue
        show_bw = level != "model"
        header = ["case", "sas backend"] + [f"{p} ms" for p in providers] + [
            f"sas x vs {p}" for p in providers if p != "sas"]
        header += ["sas % copy bw"] if show_bw else ["sas peak MiB"]
        out += ["", f"**{level} level** (median ms; `sas x` = how many times faster sas ran)", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for case in dict.fromkeys(r["case"] for r in rows):
            by = {r["provider"]: r for r in rows if r["case"] == case}
            sas = by.get("sas", {})
            cells = [case, sas.get("backend") or "-"]
            cells += [_cell(by[p]["median_ms"], ".3f") if p in by else "-" for p in providers]
            cells += [_cell(sas.get(f"speedup_vs_{p.replace('-', '_')}"), ".2f") for p in providers if p != "sas"]
            cells += [_cell(sas.get("pct_of_copy_bw"), ".1f")] if show_bw else [_cell(sas.get("peak_mem_mib"), ".0f")]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def draw(json_path: Path) -> List[Path]:
    result = json.loads(Path(json_path).read_text())
    stem = Path(json_path).with_suffix("")
    written = []
    for suffix, plot in (("_speedup.png", plot_speedup), ("_bandwidth.png", plot_bandwidth)):
        path = Path(f"{stem}{suffix}")
        if plot(result, path):
            written.append(path)
    summary = Path(f"{stem}_summary.md")
    summary.write_text(summary_markdown(result))
    return written + [summary]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", type=Path, help=f"result JSON files (default: {RESULTS_DIR}/*.json)")
    args = parser.parse_args(argv)
    for json_path in args.results or sorted(RESULTS_DIR.glob("*.json")):
        for path in draw(json_path):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
