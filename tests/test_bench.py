"""The benchmark machinery (zfkernels.bench, zfkernels.cli): cases, checks, reports, comparisons, errors.

Kernels are tested elsewhere: the cases are checked here with stock eager and the reference backend, and
only the end-to-end command runs a fast backend. Cases are built at batch 1 and, but for the command-line
runs, at a 64x64 input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zfkernels
from zfkernels.bench.cases import MODES, Case, providers_for, select_cases, zfnet_layers
from zfkernels.bench.report import (
    JSON_NAME,
    MARKDOWN_NAME,
    compare_runs,
    format_header,
    format_table,
    load_run,
    run_to_json,
    write_chart,
    write_outputs,
)
from zfkernels.bench.runner import (
    ERROR,
    FAILED,
    OK,
    BenchRun,
    Settings,
    TimingPolicy,
    measure_cell,
    measure_copy_bandwidth,
    run_cases,
)
from zfkernels.cli import main

IMAGE_SIZE = 64  # the smallest input at which ZFNet's last pool still has a 3x3 map to pool
REPO_ROOT = Path(zfkernels.__file__).resolve().parents[1]

# Every op in every mode at layer 2 (where all ops exist), plus the geometry at the edges (layer 1's
# output_padding, layer 5's small pool) and bf16.
VERIFIED_CASES = [
    *select_cases(shapes=["L2"], modes=MODES),
    *select_cases(shapes=["L1", "L5"], modes=["forward"]),
    *select_cases(shapes=["L2"], modes=["forward"], dtypes=["bf16"]),
]


def test_zfnet_layers_follow_the_paper():
    layers = zfnet_layers()
    assert [(layer.in_size, layer.out_size) for layer in layers.values()] == [
        (224, 110), (55, 26), (13, 13), (13, 13), (13, 13)]  # fmt: skip
    assert [layers[name].pooled_size for name in ("L1", "L2", "L5")] == [55, 13, 6]
    assert (layers["L1"].deconv_output_padding, layers["L2"].deconv_output_padding) == (1, 0)


@pytest.mark.parametrize("case", VERIFIED_CASES, ids=lambda case: case.id)
def test_case_builds_and_stock_code_matches_the_reference(case):
    built = case.build(batch=1, device="cpu", image_size=IMAGE_SIZE)
    for provider in ("eager", "reference"):
        with built.scope(provider):
            call = built.call(provider)
            assert built.mismatch(call.comparable(call.run())) is None, provider


def test_compiled_stock_code_is_checked_too():
    built = Case("relu", "L5", "backward", "fp32").build(batch=1, device="cpu", image_size=IMAGE_SIZE)
    call = built.call("compile")
    assert built.mismatch(call.comparable(call.run())) is None


def test_pool_bytes_moved_counts_input_values_and_one_byte_switches():
    built = Case("pool", "L2", "forward", "fp32").build(batch=2, device="cpu", image_size=IMAGE_SIZE)
    layer = zfnet_layers(IMAGE_SIZE)["L2"]
    pooled = 2 * layer.out_channels * layer.pooled_size**2
    assert built.bytes_moved == 4 * 2 * layer.out_channels * layer.out_size**2 + 4 * pooled + pooled
    assert Case("conv_transpose", "L2", "forward", "fp32").build(1, "cpu", IMAGE_SIZE).bytes_moved is None


def test_a_wrong_result_is_reported_failed_and_never_timed():
    built = Case("relu", "L5", "forward", "fp32").build(batch=1, device="cpu", image_size=IMAGE_SIZE)
    built.workload.stock = lambda x: (F.relu(x) + 1,)
    cell = measure_cell(built, "eager", TimingPolicy(repeats=1))
    assert (cell.status, cell.timing) == (FAILED, None)
    assert "differ" in cell.message


def test_a_raising_provider_is_reported_in_one_line_and_not_timed():
    built = Case("relu", "L5", "forward", "fp32").build(batch=1, device="cpu", image_size=IMAGE_SIZE)

    def broken(x):
        raise RuntimeError("kernel exploded\nsecond line")

    built.workload.stock = broken
    cell = measure_cell(built, "eager", TimingPolicy(repeats=1))
    assert (cell.status, cell.timing, cell.message) == (ERROR, None, "RuntimeError: kernel exploded")


def test_convolutions_are_compared_with_a_tolerance():
    built = Case("conv_transpose", "L3", "forward", "fp32").build(
        batch=1, device="cpu", image_size=IMAGE_SIZE
    )
    (expected,) = built.expected()
    assert built.mismatch((expected * (1 + 1e-6),)) is None
    assert "exceeds" in built.mismatch((expected * 1.01,))


def test_unknown_names_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown op 'pooling'"):
        select_cases(ops=["pooling"])
    assert providers_for(Case("relu", "L1", "forward", "fp32"), "cpu", ["eager", "no-such-backend"]) == [
        "eager"
    ]


@pytest.fixture(scope="module")
def tiny_run() -> BenchRun:
    settings = Settings(
        device="cpu",
        batch=1,
        image_size=IMAGE_SIZE,
        threads=torch.get_num_threads(),
        providers=["eager", "reference"],
        policy=TimingPolicy(repeats=2),
        copy_mib=1,
        copy_processes=0,
    )
    cases = [Case("relu", "L5", "forward", "fp32"), Case("pool", "L5", "forward", "fp32")]
    return run_cases(cases, settings, progress=False)


def test_run_writes_a_markdown_report_and_a_json_that_reads_back(tiny_run, tmp_path):
    assert [cell.status for cell in tiny_run.cells] == [OK] * 4
    written, _ = write_outputs(tiny_run, tmp_path)
    assert {tmp_path / JSON_NAME, tmp_path / MARKDOWN_NAME} <= set(written)
    assert load_run(tmp_path / JSON_NAME) == tiny_run
    markdown = (tmp_path / MARKDOWN_NAME).read_text()
    assert "## pool" in markdown and "CPU threads" in markdown and "GB/s" in markdown
    table = format_table(tiny_run)
    assert table.splitlines()[0].split()[:6] == ["op", "shape", "mode", "dtype", "eager", "ms"]


def test_chart_is_skipped_with_a_note_without_matplotlib(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert "matplotlib is not installed" in write_chart(tiny_run, tmp_path / "chart.png")
    assert not (tmp_path / "chart.png").exists()


def _scaled(run: BenchRun, factor: float) -> BenchRun:
    cells = [
        dataclasses.replace(c, timing=dataclasses.replace(c.timing, median_ms=c.timing.median_ms * factor))
        for c in run.cells
    ]
    return dataclasses.replace(run, cells=cells)


def test_compare_flags_slower_and_newly_failing_cells(tiny_run):
    assert all(change.regressed for change in compare_runs(tiny_run, _scaled(tiny_run, 1.5), threshold=1.1))
    assert not any(
        change.regressed for change in compare_runs(tiny_run, _scaled(tiny_run, 1.5), threshold=2.0)
    )
    failing = dataclasses.replace(
        tiny_run, cells=[dataclasses.replace(tiny_run.cells[0], status=FAILED, timing=None)]
    )
    assert [change.regressed for change in compare_runs(tiny_run, failing, threshold=1.1)] == [True]


QUICK_RELU_L5 = [
    "bench",
    "--quick",
    "--ops",
    "relu",
    "--shapes",
    "L5",
    "--modes",
    "forward",
    "--providers",
    "eager",
    "--batch",
    "1",
    "--repeats",
    "1",
    "--no-progress",
]


@pytest.mark.parametrize(("old_median_ms", "exit_code"), [(1e-9, 1), (1e9, 0)], ids=["regressed", "faster"])
def test_cli_compare_exit_code(tiny_run, tmp_path, old_median_ms, exit_code, capsys):
    old_run = _scaled(tiny_run, 0.0)
    for cell in old_run.cells:
        cell.timing.median_ms = old_median_ms
    old = tmp_path / "old.json"
    old.write_text(json.dumps(run_to_json(old_run)))
    assert main([*QUICK_RELU_L5, "--output", str(tmp_path / "new"), "--compare", str(old)]) == exit_code
    assert "regressed beyond 1.1x" in capsys.readouterr().out


def _bad_record(run: BenchRun, damage) -> dict:
    data = json.loads(json.dumps(run_to_json(run)))
    damage(data)
    return data


def _set_median(value):
    return lambda data: data["cells"][1]["timing"].update(median_ms=value)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            _set_median(0),
            "cells[1] (relu L5 forward fp32 reference): timing.median_ms must be a positive number of ms, "
            "got 0.0",
        ),
        (_set_median(-2.5), "cells[1] (relu L5 forward fp32 reference): timing.median_ms must be a positive"),
        (_set_median(float("nan")), "timing.median_ms must be a positive number of ms, got nan"),
        (
            _set_median("fast"),
            "cells[1] (relu L5 forward fp32 reference): timing.median_ms must be a float, got 'fast'",
        ),
        (_set_median(True), "timing.median_ms must be a float, got True"),
        (_set_median(None), "timing.median_ms must be a float, got None"),
        (
            lambda data: data["cells"][1]["timing"].pop("p80_ms"),
            "cells[1] (relu L5 forward fp32 reference): timing has no field(s) p80_ms",
        ),
        (
            lambda data: data["cells"][0].update(status="great"),
            "cells[0] (relu L5 forward fp32 eager): status must be",
        ),
        (lambda data: data["cells"][0].update(op=7), "cells[0]: op must be a str, got 7"),
        (
            lambda data: data["cells"].append(data["cells"][0]),
            "cells[4] (relu L5 forward fp32 eager) repeats cells[0]",
        ),
        (lambda data: data["cells"].__setitem__(2, [1, 2]), "cells[2] must be an object, got [1, 2]"),
        (lambda data: data.update(cells={}), "cells must be a list, got {}"),
        (lambda data: data["settings"].update(batch="8"), "settings.batch must be an int, got '8'"),
        (
            lambda data: data["copy"].update(process_gbps=[1.0, "x"]),
            "copy.process_gbps[1] must be a float, got 'x'",
        ),
        (lambda data: data.update(schema=0), "not a zfkernels bench record of schema 1"),
    ],
    ids=[
        "zero",
        "negative",
        "nan",
        "string",
        "bool",
        "null",
        "missing_field",
        "status",
        "key_type",
        "duplicate",
        "cell_not_object",
        "cells_not_list",
        "settings_type",
        "list_item",
        "schema",
    ],
)
def test_cli_compare_record_is_checked_whole_before_anything_runs(
    tiny_run, tmp_path, monkeypatch, capsys, damage, message
):
    # A bad record used to be met only when comparing, after the whole benchmark: a traceback at the end.
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_bad_record(tiny_run, damage)))
    monkeypatch.setattr("zfkernels.cli.run_cases", lambda *args, **kwargs: pytest.fail("the benchmark ran"))
    assert main([*QUICK_RELU_L5, "--output", str(tmp_path / "new"), "--compare", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"zfkernels bench: error: cannot use --compare {old}: ") and err.count("\n") == 1, (
        err
    )
    assert message in err, err


@pytest.mark.parametrize(
    ("content", "reason"), [(b"", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[1, 2]", "not a zfkernels")]
)
def test_cli_compare_file_that_is_no_record_is_named_in_one_line(tmp_path, capsys, content, reason):
    old = tmp_path / "old.json"
    old.write_bytes(content)
    assert main(["bench", "--ops", "relu", "--compare", str(old)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"zfkernels bench: error: cannot use --compare {old}: {reason}")
        and err.count("\n") == 1
    )


def test_cli_threshold_error_prints_one_percent_sign(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--threshold", "1.0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --threshold: expected a number above 1 (1.10 = 10% slower), got '1.0'" in err, err
    assert "%%" not in err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--ops", "relu,pooling"], "unknown op 'pooling'"),
        (["--shapes", "L9"], "unknown shape 'L9'"),
        (["--providers", "warp-drive"], "provider 'warp-drive' does not run on cpu"),
        (["--compare", "/no/such/old.json"], "cannot use --compare"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(arguments, message, capsys):
    assert main(["bench", *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_unwritable_output_is_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*QUICK_RELU_L5, "--output", str(blocker / "results")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to output directory" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_unavailable_device_is_one_line_and_exit_2(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "not available" in err and err.count("\n") == 1


def test_python_m_zfkernels_bench_quick_end_to_end(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        "-m",
        "zfkernels",
        "bench",
        "--quick",
        "--ops",
        "relu",
        "--batch",
        "1",
        "--repeats",
        "2",
        "--output",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "CPU threads" in done.stdout and "relu" in done.stdout
    assert load_run(tmp_path / "out" / JSON_NAME).settings.batch == 1
    assert (tmp_path / "out" / MARKDOWN_NAME).exists()


def test_cpu_copy_yardstick_is_the_fastest_of_this_and_fresh_processes(tiny_run):
    # A CPU's copy speed can depend on the process, so fresh processes measure it too and the strictest
    # (fastest) figure is the %copy yardstick; the header names every process's figure.
    copy = measure_copy_bandwidth(torch.device("cpu"), 1 << 20, TimingPolicy(repeats=3), fresh_processes=1)
    assert len(copy.process_gbps) == 2 and all(gbps > 0 for gbps in copy.process_gbps)
    assert copy.preallocated_gbps == max(copy.process_gbps)
    header = format_header(dataclasses.replace(tiny_run, copy=copy))
    figures = ", ".join(f"{gbps:.1f}" for gbps in copy.process_gbps)
    assert f"(the fastest of this process and 1 fresh ones: {figures})" in header
