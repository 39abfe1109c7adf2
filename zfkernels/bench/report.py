"""Writing a run up: the terminal table, the markdown report, the JSON record, the speedup chart, and the
comparison of a run against a stored one.

Ratios are stock eager's median over the provider's median, so above 1 is faster than stock PyTorch.
End-to-end cases add what one call does (`BenchRun.notes`) and, where an issue set targets (speedup over
captum or the dense stock deconvnet, peak memory), whether the fastest backend met them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cases import (
    DEFAULT_IMAGE_SIZE,
    END_TO_END,
    EXTERNAL_PROVIDERS,
    OP_TARGETS,
    QUICK_DECONVNET_FILTERS,
    QUICK_DECONVNET_IMAGES,
    TARGET_BATCH,
    TINY,
    Case,
)
from .runner import ERROR, FAILED, OK, BenchRun, Cell, CopyBandwidth, Machine, Settings

JSON_NAME, MARKDOWN_NAME, CHART_NAME = "results.json", "report.md", "speedups.png"
# One colour per provider in every chart of every run (matplotlib's default cycle, fixed to a name).
PROVIDER_COLOURS = {
    "compile": "C0",
    "cpu": "C1",
    "reference": "C2",
    "triton": "C3",
    "cuda": "C4",
    "captum": "C5",
    "forward": "C7",
    "eighth": "C8",
}
SCHEMA_VERSION = 1


def provider_order(run: BenchRun) -> list[str]:
    """Stock and third-party providers first, then the backends in the order they were measured."""
    measured = list(dict.fromkeys(cell.provider for cell in run.cells))
    return [p for p in EXTERNAL_PROVIDERS if p in measured] + [
        p for p in measured if p not in EXTERNAL_PROVIDERS
    ]


def _rows(run: BenchRun) -> dict[tuple[str, str, str, str], dict[str, Cell]]:
    rows: dict[tuple[str, str, str, str], dict[str, Cell]] = {}
    for cell in run.cells:
        rows.setdefault(cell.case_key, {})[cell.provider] = cell
    return rows


def speedup(cells: dict[str, Cell], provider: str) -> float | None:
    """Stock eager's median over `provider`'s, when both were timed."""
    eager, other = cells.get("eager"), cells.get(provider)
    if eager is None or other is None or eager.timing is None or other.timing is None:
        return None
    return eager.timing.median_ms / other.timing.median_ms


def fastest_backend(cells: dict[str, Cell]) -> Cell | None:
    """The quickest timed zfkernels backend of a row: the one whose bandwidth the table quotes."""
    timed = [c for p, c in cells.items() if p not in EXTERNAL_PROVIDERS and c.timing is not None]
    return min(timed, key=lambda c: c.timing.median_ms) if timed else None


def memory_backend(cells: dict[str, Cell]) -> Cell | None:
    """A memory-only row's zfkernels backend with a peak measured (it runs one: see `single_backend`)."""
    measured = [
        c for p, c in cells.items() if p not in EXTERNAL_PROVIDERS and c.peak_memory_bytes is not None
    ]
    return min(measured, key=lambda c: c.peak_memory_bytes) if measured else None


def _status_text(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.status == OK and cell.timing is not None:
        return _ms(cell.timing.median_ms)
    if cell.status == OK and cell.peak_memory_bytes is not None:  # a memory-only case
        return f"{_mb(cell.peak_memory_bytes)} MB"
    return cell.status.upper()


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _mb(nbytes: int | None) -> str:
    if nbytes is None:
        return "?"
    megabytes = nbytes / 2**20
    return f"{megabytes:.1f}" if megabytes < 10 else f"{megabytes:.0f}"


def _percent_of_copy(cell: Cell | None, copy: CopyBandwidth) -> str:
    if cell is None or cell.gbps is None:
        return ""
    return f"{100 * cell.gbps / copy.preallocated_gbps:.0f}%"


def _processes_text(copy: CopyBandwidth) -> str:
    if len(copy.process_gbps) < 2:
        return ""
    figures = ", ".join(f"{gbps:.1f}" for gbps in copy.process_gbps)
    return f" (the fastest of this process and {len(copy.process_gbps) - 1} fresh ones: {figures})"


def format_header(run: BenchRun) -> str:
    """The lines that make a table's numbers interpretable: the machine, the threads, the copy yardstick."""
    m, s, copy = run.machine, run.settings, run.copy
    return "\n".join(
        [
            f"zfkernels {m.zfkernels} bench | torch {m.torch} | triton {m.triton or 'not installed'} | "
            f"device {m.device} ({m.device_name})",
            f"CPU: {m.cpu}, {m.cores} cores; CPU threads: {m.threads} (torch.set_num_threads); "
            f"{_load_text(m)}",
            f"batch {s.batch}, ZFNet at {s.image_size}x{s.image_size}; "
            f"plain copy of {copy.nbytes / 2**20:.0f} MiB: {copy.preallocated_gbps:.1f} GB/s into a "
            f"preallocated tensor{_processes_text(copy)}, {copy.fresh_gbps:.1f} GB/s with a fresh allocation "
            "(clone)",
            *([quick_note(s)] if s.quick else []),
        ]
    )


def quick_note(settings: Settings) -> str:
    if settings.profile == "headline":
        return (
            "the headline run: ops at L1, L5 and tiny, forward and backward; end-to-end cases reduced "
            f"(deconvnet {QUICK_DECONVNET_IMAGES} images x {QUICK_DECONVNET_FILTERS} filters, the patched "
            "ResNet18 at 32x32): their targets are set for the full workloads (zfkernels bench --full)"
        )
    return (
        f"--quick: reduced workloads (batch {settings.batch}; deconvnet {QUICK_DECONVNET_IMAGES} images x "
        f"{QUICK_DECONVNET_FILTERS} filters): not comparable with a full run, and the end-to-end targets "
        "are set for the full workloads"
    )


def _verdict(met: bool, judged: bool) -> str:
    return ("met" if met else "NOT met") if judged else "not judged: reduced workload"


def target_lines(run: BenchRun) -> list[str]:
    """Every README target the run measured, against its figure (measured, never asserted): the op targets
    (`OP_TARGETS`, one line each, over the cells it covers) and, per end-to-end case with targets, the
    fastest backend's speedup over each named provider and its peak memory. Targets are set for the full
    workloads: on reduced ones (--quick, the default run's end-to-end cases) figures are shown, not judged."""
    lines = op_target_lines(run)
    judged = not run.settings.quick
    for key, cells in _rows(run).items():
        spec = END_TO_END.get(key[0])
        if spec is None or not (spec.bars or spec.memory_bar_bytes or spec.memory_bars):
            continue
        best = memory_backend(cells) if spec.memory_only else fastest_backend(cells)
        if best is None:
            measured = "measured" if spec.memory_only else "timed"
            lines.append(f"{'/'.join(key)}: no zfkernels backend was {measured}, so no target can be judged")
            continue
        results = []
        for bar in spec.bars:
            other = cells.get(bar.provider)
            if other is None or other.timing is None:
                why = "not measured" if other is None else other.status.upper()
                results.append(f"vs {bar.provider}: {why} (target >= {bar.times:g}x)")
                continue
            scale = other.time_scale
            ratio = other.timing.median_ms * scale / best.timing.median_ms
            met = _verdict(ratio >= bar.times, judged)
            scaled = f" (its time x {scale:.3g}: it ran a sample)" if scale != 1 else ""
            if bar.times < 1:  # a floor: the target is a cost ceiling
                results.append(
                    f"at {1 / ratio:.2f}x the time of {bar.provider}{scaled} "
                    f"(target <= {1 / bar.times:.2f}x: {met})"
                )
            else:
                shown = f"{ratio:.2f}" if ratio < 2 else f"{ratio:.1f}"  # 0.996x must not read "1.0x"
                results.append(
                    f"{shown}x faster than {bar.provider}{scaled} (target >= {bar.times:g}x: {met})"
                )
        for bar in spec.memory_bars:
            other = cells.get(bar.provider)
            if other is None or other.peak_memory_bytes is None or best.peak_memory_bytes is None:
                why = "not measured" if other is None else other.status.upper()
                results.append(f"peak memory vs {bar.provider}: {why} (target <= {bar.times:.2f}x)")
                continue
            ratio = best.peak_memory_bytes / max(other.peak_memory_bytes, 1)
            met = _verdict(ratio <= bar.times, judged)
            results.append(
                f"at a peak memory of {_mb(best.peak_memory_bytes)} MB, {ratio:.3f}x {bar.provider}'s "
                f"{_mb(other.peak_memory_bytes)} MB (target <= {bar.times:.2f}x: {met})"
            )
        if spec.memory_bar_bytes is not None and best.peak_memory_bytes is not None:
            met = _verdict(best.peak_memory_bytes < spec.memory_bar_bytes, judged)
            results.append(
                f"peak memory {best.peak_memory_bytes / 1e9:.2f} GB "
                f"(target < {spec.memory_bar_bytes / 1e9:g} GB: {met})"
            )
        quick = "" if judged else " [quick workload]"
        lines.append(f"{'/'.join(key)}{quick}: {best.provider} is " + "; ".join(results))
    return lines


def _ratio_text(name: str, ratio: float | None) -> str:
    return f"{name}: not measured" if ratio is None else f"{name} {ratio:.2f}x"


def _share_text(name: str, share: float | None) -> str:
    return f"{name}: not measured" if share is None else f"{name} {100 * share:.0f}% of the copy"


def op_target_lines(run: BenchRun) -> list[str]:
    """One line per op target with cells in the run: how many meet it, and the figure of each that does not
    (all figures when it covers one cell). Judged only at the batch the targets are set for."""
    judged = run.settings.batch == TARGET_BATCH and run.settings.image_size == DEFAULT_IMAGE_SIZE
    rows = _rows(run)
    lines = []
    for target in OP_TARGETS:
        figures: list[tuple[str, float | None]] = []
        for key, cells in rows.items():
            if key[0] in END_TO_END or not target.applies(Case(*key)):
                continue
            best = fastest_backend(cells)
            if target.provider == "copy":
                ratio = best.gbps / run.copy.preallocated_gbps if best and best.gbps else None
            else:
                other = cells.get(target.provider)
                timed = best is not None and other is not None and other.timing is not None
                ratio = other.timing.median_ms / best.timing.median_ms if timed else None
            figures.append(("/".join(key), ratio))
        if not figures:
            continue
        text = _share_text if target.provider == "copy" else _ratio_text
        if all(r is None for _, r in figures):
            lines.append(f"{target.what}: not measured ({target.provider} not timed in this run)")
            continue
        missed = [(n, r) for n, r in figures if r is None or r < target.times]
        if not judged and target.shapes != (TINY,):  # a tiny call is batch 1 whatever the run's batch
            verdict = f"not judged (set for batch {TARGET_BATCH}): " + ", ".join(text(*f) for f in figures)
        elif len(figures) == 1:
            verdict = f"{text(*figures[0])}: {'NOT met' if missed else 'met'}"
        else:
            verdict = f"{len(figures) - len(missed)} of {len(figures)} cells met" + (
                "; below: " + ", ".join(text(*f) for f in missed) if missed else ""
            )
        lines.append(f"{target.what}: {verdict}")
    return lines


def _table_width(header: list[str], body: list[list[str]]) -> int:
    return sum(max(len(r[i]) for r in [header, *body]) + 2 for i in range(len(header))) - 2


def _load_text(machine: Machine) -> str:
    if machine.load_average is None:
        return "load average unknown"
    busy = machine.load_average >= 1.0
    return f"load average {machine.load_average:.2f} at start" + (
        " (the machine was busy: timings may be noisy)" if busy else ""
    )


def format_table(run: BenchRun, width: int | None = None) -> str:
    """The compact terminal table: median ms and speedup over stock eager per provider, one row per case;
    for memory-bound ops the fastest backend's GB/s and its share of the preallocated copy's bandwidth.
    Wider than `width` (a terminal's columns), it leaves out the peak memory, then the bandwidth, then the
    other providers' times (their speedups stay), and says so; the markdown report has every column."""
    providers = provider_order(run)
    header = ["op", "shape", "mode", "dtype"]
    for provider in providers:
        header += [f"{provider} ms"] if provider == "eager" else [f"{provider} ms", "x"]
    header += ["GB/s", "%copy", "peak MB eager/best"]
    body = []
    for (op, shape, mode, dtype), cells in _rows(run).items():
        row = [op, shape, mode, dtype]
        for provider in providers:
            row.append(_status_text(cells.get(provider)))
            if provider != "eager":
                ratio = speedup(cells, provider)
                row.append("" if ratio is None else f"{ratio:.2f}x")
        best = fastest_backend(cells)
        row += [
            "" if best is None or best.gbps is None else f"{best.gbps:.1f}",
            _percent_of_copy(best, run.copy),
        ]
        eager = cells.get("eager")
        row.append(
            ""
            if eager is None or best is None or eager.timing is None
            else f"{_mb(eager.peak_memory_bytes)}/{_mb(best.peak_memory_bytes)}"
        )
        body.append(row)
    dropped = []
    for names in (["peak MB eager/best"], ["GB/s", "%copy"], [f"{p} ms" for p in providers if p != "eager"]):
        if width is None or _table_width(header, body) <= width:
            break
        keep = [i for i, name in enumerate(header) if name not in names]
        dropped += [name for name in names if name in header]
        header, body = [header[i] for i in keep], [[row[i] for i in keep] for row in body]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            text.ljust(w) if i < 4 else text.rjust(w)
            for i, (text, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *body]
    ]
    lines.insert(1, "-" * len(lines[0]))
    if dropped:
        lines.append(f"(left out to fit {width} columns: {', '.join(dropped)}; report.md has every column)")
    notes = [
        f"  {cell.provider} on {'/'.join(cell.case_key)}: {cell.status.upper()}: {cell.message}"
        for cell in run.cells
        if cell.status != OK
    ]
    legend = [
        "x = stock eager time / provider time (above 1 is faster); "
        "GB/s, %copy and peak 'best': the fastest zfkernels backend",
        f"peak MB: allocated during one call above the inputs, from {run.machine.peak_memory_method}",
        *(
            ["memory-only cases (not timed) show each provider's peak MB in place of its time"]
            if any(END_TO_END.get(op) and END_TO_END[op].memory_only for op, *_ in _rows(run))
            else []
        ),
    ]
    targets = target_lines(run)
    described = [f"  {case_id}: {note}" for case_id, note in run.notes.items()]
    return "\n".join(
        [
            *lines,
            *legend,
            *(["end-to-end cases:", *described] if described else []),
            *(["targets:", *(f"  {line}" for line in targets)] if targets else []),
            *(["not timed:", *notes] if notes else []),
        ]
    )


def markdown_report(run: BenchRun, chart_note: str) -> str:
    """The report for people: machine and settings, one table per op with every provider's full figures."""
    m, s, copy = run.machine, run.settings, run.copy
    policy = s.policy
    repeats = (
        f"{policy.repeats} repeats"
        if policy.repeats
        else (
            f"repeats fitted to {policy.budget_s:g} s per cell ({policy.min_repeats} to {policy.max_repeats})"
        )
    ) + (
        "; a case's providers timed in alternating rounds"
        if policy.interleave
        else "; providers timed one after another"
    )
    lines = [
        "# zfkernels benchmark",
        "",
        f"- Machine: {m.cpu}, {m.cores} cores, {m.platform}; device `{m.device}` ({m.device_name})",
        f"- Versions: zfkernels {m.zfkernels}, torch {m.torch}, triton {m.triton or 'not installed'}, "
        f"Python {m.python}",
        f"- CPU threads: {m.threads} (pinned with torch.set_num_threads); {_load_text(m)}",
        f"- Batch {s.batch}, ZFNet layers at {s.image_size}x{s.image_size} input; {repeats}; wall time "
        f"{run.wall_s:.0f} s",
        *([f"- {quick_note(s)}"] if s.quick else []),
        f"- End-to-end cases: the verifying call is the warm-up and is profiled for peak memory; then the "
        f"calls that fit in {policy.long_budget_s:g} s are timed (at least 1, at most {policy.min_repeats})",
        f"- Plain copy of {copy.nbytes / 2**20:.0f} MiB (read + write): {copy.preallocated_gbps:.1f} GB/s "
        f"into a preallocated tensor (the %copy yardstick){_processes_text(copy)}, {copy.fresh_gbps:.1f} "
        "GB/s with a fresh allocation",
        f"- Peak memory: {m.peak_memory_method}",
        "- Every provider's result was checked against the reference backend before timing (pool, unpool, "
        "ReLU bit for bit; convolutions and end-to-end cases allclose); FAILED cells differ and were not "
        "timed.",
        "- Ratio: stock eager median / provider median (above 1 is faster). GB/s: the op's own bytes "
        "(inputs read + outputs written, uint8 switches) over the median.",
        f"- Chart: {chart_note}",
        "",
    ]
    rows = _rows(run)
    for op in dict.fromkeys(key[0] for key in rows):
        lines += [
            f"## {op}",
            "",
            "| shape | mode | dtype | provider | median ms | p20-p80 ms | ratio | GB/s | "
            "%copy | peak MB | shapes |",
            "|---|---|---|---|---:|---|---:|---:|---:|---:|---|",
        ]
        for key, cells in rows.items():
            if key[0] != op:
                continue
            shapes = ", ".join(
                f"{name} {'x'.join(map(str, shape))}"
                for name, shape in run.cases.get("-".join(key), {}).items()
            )
            for provider in provider_order(run):
                cell = cells.get(provider)
                if cell is None:
                    continue
                lines.append("| " + " | ".join(_markdown_cells(cell, cells, copy) + [shapes]) + " |")
                shapes = ""
        lines.append("")
        for case_id in ("-".join(key) for key in rows if key[0] == op):
            if case_id in run.notes:
                lines += [f"{case_id}: {run.notes[case_id]}", ""]
    targets = target_lines(run)
    if targets:
        lines += ["## Targets (measured, not asserted)", "", *(f"- {line}" for line in targets), ""]
    problems = [c for c in run.cells if c.status != OK]
    if problems:
        lines += (
            ["## Not timed", ""]
            + [
                f"- {c.provider} on {'/'.join(c.case_key)}: **{c.status.upper()}** {c.message}"
                for c in problems
            ]
            + [""]
        )
    return "\n".join(lines)


def _markdown_cells(cell: Cell, row: dict[str, Cell], copy: CopyBandwidth) -> list[str]:
    head = [cell.shape, cell.mode, cell.dtype, cell.provider]
    if cell.timing is None:
        memory_only = cell.status == OK and cell.peak_memory_bytes is not None
        status = "not timed (memory only)" if memory_only else f"**{cell.status.upper()}**"
        return head + [status, "", "", "", "", _mb(cell.peak_memory_bytes) if memory_only else ""]
    t = cell.timing
    ratio = speedup(row, cell.provider)
    return head + [
        _ms(t.median_ms),
        f"{_ms(t.p20_ms)}-{_ms(t.p80_ms)}",
        "" if ratio is None else f"{ratio:.2f}x",
        "" if cell.gbps is None else f"{cell.gbps:.1f}",
        _percent_of_copy(cell, copy),
        _mb(cell.peak_memory_bytes),
    ]


def run_to_json(run: BenchRun) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, **dataclasses.asdict(run)}


def run_from_json(data: dict[str, Any]) -> BenchRun:
    """A stored run back as dataclasses; ValueError naming the first bad field (and its cell) if it is not a
    zfkernels bench record of this schema. Every field is checked against its annotation and every timing
    must be a positive finite number of ms, so a comparison never meets a value it cannot divide by."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"not a zfkernels bench record of schema {SCHEMA_VERSION}")
    fields = {key: value for key, value in data.items() if key != "schema"}
    fields.setdefault("notes", {})  # absent in records written before the end-to-end cases
    raw_cells = fields.get("cells", [])
    if not isinstance(raw_cells, list):
        raise ValueError(f"cells must be a list, got {_shown(raw_cells)}")
    run = _decode({**fields, "cells": []}, BenchRun, "")
    seen: dict[tuple[str, ...], int] = {}
    for index, raw in enumerate(raw_cells):
        cell = _cell_from_json(raw, index)
        if cell.key in seen:
            raise ValueError(f"cells[{index}] ({' '.join(cell.key)}) repeats cells[{seen[cell.key]}]")
        seen[cell.key] = index
        run.cells.append(cell)
    return run


def _cell_from_json(raw: Any, index: int) -> Cell:
    if not isinstance(raw, dict):
        raise ValueError(f"cells[{index}] must be an object, got {_shown(raw)}")
    key = [raw.get(name) for name in ("op", "shape", "mode", "dtype", "provider")]
    where = f"cells[{index}]" + (f" ({' '.join(key)})" if all(isinstance(k, str) for k in key) else "")
    try:
        cell = _decode(raw, Cell, "")
        if cell.status not in (OK, FAILED, ERROR):
            raise ValueError(f"status must be {OK!r}, {FAILED!r} or {ERROR!r}, got {_shown(cell.status)}")
        if cell.timing is not None:
            for name in ("median_ms", "p20_ms", "p80_ms"):
                value = getattr(cell.timing, name)
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"timing.{name} must be a positive number of ms, got {_shown(value)}")
            if cell.timing.repeats < 1:
                raise ValueError(f"timing.repeats must be at least 1, got {cell.timing.repeats!r}")
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return cell


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode(value: Any, annotation: Any, path: str) -> Any:
    """``value`` (parsed JSON) as ``annotation``: a dataclass, a union with None, a list or dict of one
    type, str, int, float (an int is taken) or bool. ValueError naming the field's ``path`` otherwise."""
    name = path or "the record"
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be an object, got {_shown(value)}")
        fields = {f.name: f for f in dataclasses.fields(annotation)}
        unknown = sorted(set(value) - set(fields))
        missing = [
            field
            for field, f in fields.items()
            if field not in value
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if unknown or missing:
            problems = [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
            problems += [f"no field(s) {', '.join(missing)}"] if missing else []
            raise ValueError(f"{name} has {' and '.join(problems)}")
        hints = typing.get_type_hints(annotation)
        prefix = f"{path}." if path else ""
        return annotation(
            **{field: _decode(item, hints[field], prefix + field) for field, item in value.items()}
        )
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in arguments:
            return None
        (kind,) = [a for a in arguments if a is not type(None)]
        return _decode(value, kind, path)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {_shown(value)}")
        return [_decode(item, arguments[0], f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be an object, got {_shown(value)}")
        return {key: _decode(item, arguments[1], f"{path}[{key!r}]") for key, item in value.items()}
    if annotation is float and type(value) is int:  # a whole number another tool wrote without its ".0"
        return float(value)
    if annotation in (str, int, float, bool) and type(value) is annotation:
        return value
    kind = getattr(annotation, "__name__", str(annotation))
    raise ValueError(f"{name} must be {'an' if kind == 'int' else 'a'} {kind}, got {_shown(value)}")


def load_run(path: str | Path) -> BenchRun:
    """Read a results.json; OSError or ValueError with the reason when it cannot be used."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    try:
        return run_from_json(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def write_chart(run: BenchRun, path: Path) -> str | None:
    """A PNG of speedups over stock eager, one panel per op, one bar per provider and case, drawn up from 1x
    when faster and down when slower. matplotlib is optional: without it the chart is skipped, not the run.
    Returns why it was skipped, None if written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed, or wanted, on a benchmark machine
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    rows = _rows(run)
    providers = [p for p in provider_order(run) if p != "eager"]
    ops = list(dict.fromkeys(key[0] for key in rows))
    if not ops or not providers:
        return "no provider besides stock eager was measured"
    widest = max(sum(key[0] == op for key in rows) for op in ops)
    figure, axes = plt.subplots(len(ops), 1, figsize=(max(7.0, 0.25 + 0.9 * widest), 3.0 * len(ops)),
                                squeeze=False, layout="constrained")  # fmt: skip
    spare = iter(f"C{i}" for i in range(10) if f"C{i}" not in PROVIDER_COLOURS.values())
    colors = {p: PROVIDER_COLOURS.get(p) or next(spare, "black") for p in providers}  # the same every run
    for axis, op in zip(axes[:, 0], ops, strict=True):
        keys = [key for key in rows if key[0] == op]
        # A panel's own providers only (captum measures the deconvnet alone); same slots for all its cases.
        shown = [p for p in providers if any(p in rows[key] for key in keys)]
        width = min(0.8 / max(len(shown), 1), 0.25)  # a panel of one case keeps slim bars
        measured = []
        for index, provider in enumerate(shown):
            ratios = [speedup(rows[key], provider) or math.nan for key in keys]
            measured += [r for r in ratios if not math.isnan(r)]
            positions = [k + (index - (len(shown) - 1) / 2) * width for k in range(len(keys))]
            bars = axis.bar(
                positions, [r - 1 for r in ratios], width, bottom=1, label=provider, color=colors[provider]
            )
            axis.bar_label(bars, labels=["" if math.isnan(r) else f"{r:.2g}" for r in ratios], fontsize=6)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_ylim(min([*measured, 1.0]) / 1.6, max([*measured, 1.0]) * 1.6)
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.set_xticks(range(len(keys)), ["\n".join(key[1:]) for key in keys], fontsize=7)
        axis.set_xlim(-0.6, len(keys) - 0.4)  # the same slots whether or not a case was timed
        axis.set_ylabel("speedup vs eager")
        axis.set_title(op, fontsize=10)
        axis.legend(fontsize=7)
    title = f"zfkernels vs stock PyTorch eager: batch {run.settings.batch}, {run.machine.device_name}"
    figure.suptitle(f"{title}, {run.machine.threads} CPU threads", fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def write_outputs(run: BenchRun, directory: Path) -> tuple[list[Path], str | None]:
    """Write results.json, report.md and (with matplotlib) speedups.png into `directory`; returns the files
    written, and why the chart was skipped (None when it was drawn)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / JSON_NAME, directory / MARKDOWN_NAME]
    skipped_because = write_chart(run, directory / CHART_NAME)
    if skipped_because is None:
        written.append(directory / CHART_NAME)
    written[0].write_text(json.dumps(run_to_json(run), indent=1) + "\n")
    written[1].write_text(
        markdown_report(run, CHART_NAME if skipped_because is None else f"skipped: {skipped_because}")
    )
    return written, skipped_because


@dataclass
class CellChange:
    """One cell in both runs: its medians, new/old, and whether that counts as a regression."""

    key: tuple[str, str, str, str, str]
    old_ms: float | None
    new_ms: float | None
    regressed: bool
    note: str

    @property
    def ratio(self) -> float | None:
        if self.old_ms is None or self.new_ms is None or self.old_ms <= 0:
            return None
        return self.new_ms / self.old_ms


def compare_runs(old: BenchRun, new: BenchRun, threshold: float) -> list[CellChange]:
    """Every cell of `new` against the same cell of `old`. A regression is a median more than `threshold`
    times the old one, or a cell timed before that now fails its check or raises."""
    old_cells = {cell.key: cell for cell in old.cells}
    changes = []
    for cell in new.cells:
        before = old_cells.get(cell.key)
        new_ms = cell.timing.median_ms if cell.timing else None
        if before is None:
            changes.append(CellChange(cell.key, None, new_ms, False, "new cell"))
            continue
        old_ms = before.timing.median_ms if before.timing else None
        if new_ms is None:
            regressed = old_ms is not None
            changes.append(CellChange(cell.key, old_ms, None, regressed, f"now {cell.status.upper()}"))
        elif old_ms is None:
            changes.append(
                CellChange(cell.key, None, new_ms, False, f"was {before.status.upper()}, now timed")
            )
        else:
            ratio = new_ms / old_ms
            regressed = ratio > threshold
            changes.append(
                CellChange(
                    cell.key,
                    old_ms,
                    new_ms,
                    regressed,
                    f"{ratio:.2f}x the old time" + (" REGRESSED" if regressed else ""),
                )
            )
    return changes


def run_differences(old: BenchRun, new: BenchRun) -> list[str]:
    """What differs between two runs' conditions, so a reader knows when a change may not be the code's."""
    pairs = {
        "CPU": (old.machine.cpu, new.machine.cpu),
        "device": (old.machine.device_name, new.machine.device_name),
        "threads": (old.machine.threads, new.machine.threads),
        "batch": (old.settings.batch, new.settings.batch),
        "quick": (old.settings.quick, new.settings.quick),
        "torch": (old.machine.torch, new.machine.torch),
    }
    return [f"{name}: {before} -> {after}" for name, (before, after) in pairs.items() if before != after]


def format_comparison(changes: Sequence[CellChange], threshold: float, differences: Sequence[str]) -> str:
    header = ["op", "shape", "mode", "dtype", "provider", "old ms", "new ms", "change"]
    body = [
        [
            *change.key,
            "-" if change.old_ms is None else _ms(change.old_ms),
            "-" if change.new_ms is None else _ms(change.new_ms),
            change.note,
        ]
        for change in changes
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(text.ljust(w) for text, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]
    ]
    regressions = sum(change.regressed for change in changes)
    summary = (
        f"{regressions} of {len(changes)} cells regressed beyond {threshold:g}x"
        if regressions
        else f"no cell regressed beyond {threshold:g}x ({len(changes)} compared)"
    )
    caveat = [f"note: the runs differ in {'; '.join(differences)}"] if differences else []
    return "\n".join([*lines, *caveat, summary])
