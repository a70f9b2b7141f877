"""Runs the cases, computes each row's metrics, prints the table and writes JSON + CSV."""
from __future__ import annotations

import csv
import datetime
import gc
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from sas.recipes.provenance import device_name, git_commit

from . import cases as cases_module
from .cases import ALL_PROVIDERS, Case, NotApplicable
from .timing import copy_bandwidth_gbps, measure, peak_memory_mib

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Every row of the JSON ``rows`` list and every CSV line has exactly these fields.
ROW_FIELDS = [
    "level", "case", "pass", "shape", "d_in", "d_out", "rows", "rank", "model", "batch", "dtype",
    "provider", "backend", "timing", "status", "error",
    "median_ms", "p20_ms", "p80_ms", "samples", "first_call_s",
    "throughput", "throughput_unit", "ideal_bytes", "achieved_gbps", "pct_of_copy_bw", "peak_mem_mib",
] + [f"speedup_vs_{p.replace('-', '_')}" for p in ALL_PROVIDERS]

#: Every JSON file's ``meta`` object has at least these keys.
META_FIELDS = ["device", "device_type", "dtype", "torch", "triton", "python", "git_commit", "date",
               "copy_bandwidth_gbps", "size", "levels", "argv", "cpu_threads", "notes"]


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _blank_row(case: Case, provider: str, dtype: torch.dtype, timing_mode: str) -> Dict:
    row = {f: None for f in ROW_FIELDS}
    row.update(level=case.level, case=case.label, shape=case.shape or None, d_in=case.d_in or None,
               d_out=case.d_out or None, rows=case.rows or None, rank=case.rank, model=case.model or None,
               batch=case.batch or None, dtype=str(dtype).replace("torch.", ""), provider=provider,
               throughput_unit="images/s" if case.level == "model" else "rows/s", timing=timing_mode)
    row["pass"] = case.pass_name
    return row


def run_case(case: Case, provider: str, device: torch.device, dtype: torch.dtype, timing_mode: str = "eager") -> Dict:
    """One row: build ``provider`` for ``case``, time it in ``timing_mode`` (bench.timing.TIMING_MODES)."""
    row = _blank_row(case, provider, dtype, timing_mode)
    try:
        if timing_mode == "cuda-graph" and device.type != "cuda":
            raise NotApplicable("cuda-graph timing needs a CUDA device")
        if timing_mode == "cuda-graph" and case.pass_name == "backward":
            # The backward alone replays a graph recorded before capture: autograd runs each backward
            # kernel on its forward's stream, outside the capturing one. forward+backward covers it.
            raise NotApplicable("cuda-graph: the backward alone would run outside the capture stream")
        built = cases_module.build(case, provider, device, dtype)
        row["backend"] = built.backend
        # The first call pays for compilation (torch.compile, Triton autotuning): recorded, then excluded.
        start = time.perf_counter()
        built.call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["first_call_s"] = time.perf_counter() - start
        timing = measure(built.call, device, timing_mode)
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, samples=timing.samples,
                   throughput=built.work_items / (timing.median_ms * 1e-3), ideal_bytes=built.ideal_bytes,
                   peak_mem_mib=peak_memory_mib(built.call, device) if timing_mode == "eager" else None,
                   status="ok")
        if built.ideal_bytes is not None:
            row["achieved_gbps"] = built.ideal_bytes / (timing.median_ms * 1e-3) / 1e9
    except (NotApplicable, ImportError) as exc:  # nothing to measure, or optional PEFT absent
        row.update(status="skipped", error=str(exc))
    except Exception as exc:  # a failing provider is recorded in its row; the run goes on
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        built = None
        if device.type == "cuda":  # free this case's tensors before the next peak-memory reading
            gc.collect()
            torch.cuda.empty_cache()
    return row


def add_derived(rows: List[Dict], copy_gbps: float) -> None:
    """% of the measured copy bandwidth, and every row's speedup against each other provider of its case
    (in the same timing mode)."""
    by_case: Dict[tuple, Dict[str, Dict]] = {}
    for row in rows:
        if row["achieved_gbps"] is not None:
            row["pct_of_copy_bw"] = 100.0 * row["achieved_gbps"] / copy_gbps
        by_case.setdefault((row["level"], row["case"], row["timing"]), {})[row["provider"]] = row
    for providers in by_case.values():
        for row in providers.values():
            for name, other in providers.items():
                if row["median_ms"] and other["median_ms"]:
                    row[f"speedup_vs_{name.replace('-', '_')}"] = other["median_ms"] / row["median_ms"]


def _progress(total: int, quiet: bool):
    try:
        from tqdm import tqdm
        return tqdm(total=total, disable=quiet, file=sys.stderr, unit="case", dynamic_ncols=True)
    except ImportError:
        class Counter:
            done = 0

            def update(self, n=1):
                self.done += n
                if not quiet:
                    print(f"\r{self.done}/{total}", end="", file=sys.stderr, flush=True)

            def set_description(self, text):
                pass

            def close(self):
                if not quiet:
                    print(file=sys.stderr)
        return Counter()


def collect_meta(device: torch.device, dtype: torch.dtype, size: str, levels: List[str], notes: List[str],
                 copy_gbps: Optional[float]) -> Dict:
    """The ``meta`` object of a result file (:data:`META_FIELDS`); ``copy_gbps`` is None where no level needs it."""
    return {
        "device": device_name(device), "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "copy_bandwidth_gbps": copy_gbps, "size": size, "levels": list(levels), "argv": sys.argv[1:],
        "cpu_threads": torch.get_num_threads(), "notes": notes,
    }


def run_benchmarks(levels: List[str], device: str, dtype: torch.dtype, size: str = "quick",
                   providers: Optional[List[str]] = None, quiet: bool = False,
                   rows: Optional[List[int]] = None, timing_modes=("eager",),
                   budget_s: Optional[float] = None, shapes: Optional[List[str]] = None,
                   batches: Optional[List[int]] = None) -> Dict:
    """Run every case of ``levels`` in each of ``timing_modes``; return ``{"meta": ..., "rows": [...]}``.

    With ``budget_s``, no case starts once that many seconds have passed: its rows are recorded as
    skipped, so a time-boxed run (``make bench-gpu``) still writes every row it measured. ``shapes``
    keeps only those op/layer shapes (``cases.VIT_SHAPES`` keys), ``batches`` only those model batches."""
    started = time.perf_counter()
    device = torch.device(device)
    all_cases = [c for level in levels
                 for c in cases_module.restrict(cases_module.grid(level, device, size, rows), providers)
                 if (not shapes or c.level == "model" or c.shape in shapes)
                 and (not batches or c.level != "model" or c.batch in batches)]
    notes = []
    if device.type == "cpu":
        notes.append("peak memory is n/a on CPU: PyTorch keeps no CPU allocator statistics and peak RSS only grows")
        if size == "quick" and "model" in levels:
            notes.append("CPU quick run: model level uses vit_tiny_patch16_224 at batch 2 and no torch.compile "
                         "(ViT-B at batch 32/128 with --full)")
    if device.type == "cuda" and size != "full":
        notes.append("model level: reference-compiled only for the training step at batch 32 (all with --full)")
    notes.append("backward = replay of one stored forward's autograd graph; ideal bytes per docs/design.md §3 "
                 "(bench/bytes_model.py), u not saved; model level has no bytes model")
    if budget_s is not None:
        notes.append(f"time budget {budget_s:.0f} s: cases not started within it are skipped")
    copy_gbps = copy_bandwidth_gbps(device)
    meta = collect_meta(device, dtype, size, levels, notes, copy_gbps)
    rows = []
    bar = _progress(sum(len(c.providers) for c in all_cases) * len(timing_modes), quiet)
    for case in all_cases:
        bar.set_description(f"{case.level} {case.label}"[:60])
        for mode in timing_modes:
            for provider in case.providers:
                if budget_s is not None and time.perf_counter() - started > budget_s:
                    rows.append(_blank_row(case, provider, dtype, mode))
                    rows[-1].update(status="skipped", error=f"time budget of {budget_s:.0f} s spent")
                else:
                    rows.append(run_case(case, provider, device, dtype, mode))
                bar.update(1)
    bar.close()
    add_derived(rows, copy_gbps)
    return {"meta": meta, "rows": rows}


def result_stem(meta: Dict) -> str:
    """``<device>_<date>_<levels>[_<size>]``, e.g. ``cpu-x86_64_2026-11-22_op-layer-model``."""
    device = re.sub(r"[^0-9a-z]+", "-", meta["device"].lower()).strip("-") or meta["device_type"]
    if meta["device_type"] == "cpu":
        device = f"cpu-{device}" if not device.startswith("cpu") else device
    stem = f"{device}_{meta['date'][:10]}_{'-'.join(meta['levels'])}"
    return stem if meta["size"] == "quick" else f"{stem}_{meta['size']}"


def write_results(result: Dict, out_dir: Path = RESULTS_DIR, fields: List[str] = ROW_FIELDS) -> List[Path]:
    """``<stem>.json`` (meta + rows) and ``<stem>.csv`` (one line per row, ``fields`` as columns)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(result["meta"])
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    with csv_path.open("w", newline="") as handle:
        meta = result["meta"]
        handle.write(f"# device={meta['device']}; torch={meta['torch']}; triton={meta['triton']}; "
                     f"commit={meta['git_commit']}; date={meta['date']}; "
                     f"copy_bandwidth_gbps={_fmt(meta['copy_bandwidth_gbps'], '.1f')}\n")
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result["rows"])
    return [json_path, csv_path]


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(result: Dict) -> str:
    """One block per level: time (p20-p80), throughput, GB/s, % of copy bandwidth, peak memory,
    and how much faster ``sas`` is than the row's provider."""
    meta = result["meta"]
    lines = [f"device: {meta['device']} ({meta['device_type']}), dtype {meta['dtype']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, commit {meta['git_commit']}, {meta['date']}",
             f"copy bandwidth (read+write): {meta['copy_bandwidth_gbps']:.1f} GB/s"]
    lines += [f"note: {n}" for n in meta["notes"]]
    header = (f"{'case':<40} {'provider':<18} {'backend':<18} {'median ms':>10} {'p20-p80 ms':>17} "
              f"{'throughput':>13} {'GB/s':>8} {'%copy':>6} {'peak MiB':>9} {'sas x':>6}")
    for level in meta["levels"]:
        rows = [r for r in result["rows"] if r["level"] == level]
        if not rows:
            continue
        lines += ["", f"== {level} level ==", header]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"{r['case']:<40} {r['provider']:<18} {r['timing']:<10} {r['status']}: {r['error']}"[:200])
                continue
            unit = "img/s" if r["throughput_unit"] == "images/s" else "row/s"
            # "sas x": how many times faster sas ran than this row's provider.
            sas_speedup = r["speedup_vs_sas"] and 1.0 / r["speedup_vs_sas"]
            provider = r["provider"] if r["timing"] == "eager" else f"{r['provider']} [graph]"
            lines.append(
                f"{r['case']:<40} {provider:<18} {r['backend'] or '-':<18} {r['median_ms']:>10.3f} "
                f"{r['p20_ms']:>8.3f}-{r['p80_ms']:<8.3f} {r['throughput']:>9.3g} {unit} "
                f"{_fmt(r['achieved_gbps'], '8.1f'):>8} {_fmt(r['pct_of_copy_bw'], '6.1f'):>6} "
                f"{_fmt(r['peak_mem_mib'], '9.1f', 'n/a'):>9} {_fmt(sas_speedup, '6.2f'):>6}")
    return "\n".join(lines)
