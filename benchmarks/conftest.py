"""The pytest-benchmark suite's settings, taken from the environment so a run needs no edit:

ZFK_BENCH_BATCH    batch size of the op cases and zfnet_train (default 8: moderate, so the whole suite
                   runs in minutes on a small CPU)
ZFK_BENCH_DEVICE   cpu or cuda (default cuda when present)
ZFK_BENCH_THREADS  CPU threads to pin (default torch's own count)
ZFK_BENCH_ALL      1 for every mode and both dtypes; default the issue-2 set of `zfkernels bench`
ZFK_BENCH_FULL     1 for the end-to-end cases' full workloads (deconvnet: 9 images x 256 filters, where one
                   captum call takes minutes); default the reduced ones of `zfkernels bench --quick`
ZFK_BENCH_ANALYSIS 1 to add the opt-in analysis cases (mining and projection of AlexNet's top-9, and
                   mining's peak memory over 8,192 images; minutes each)

Run with `python -m pytest benchmarks --benchmark-only`; the default `pytest` run never collects this
directory (pyproject's testpaths is ["tests"]).
"""

from __future__ import annotations

import os

import pytest
import torch

from zfkernels.bench.cases import (
    DTYPES,
    END_TO_END,
    MODES,
    BuiltCase,
    BuiltEndToEnd,
    Case,
    case_unavailable,
    providers_for,
    select_cases,
)

BATCH = int(os.environ.get("ZFK_BENCH_BATCH", "8"))
DEVICE = os.environ.get("ZFK_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
EVERY_CASE = os.environ.get("ZFK_BENCH_ALL") == "1"
ANALYSIS = os.environ.get("ZFK_BENCH_ANALYSIS") == "1"
FULL_END_TO_END = os.environ.get("ZFK_BENCH_FULL") == "1"
if os.environ.get("ZFK_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["ZFK_BENCH_THREADS"]))


def pytest_report_header() -> str:
    return (
        f"zfkernels benchmarks: device {DEVICE}, batch {BATCH}, CPU threads {torch.get_num_threads()}, "
        f"{'every case' if EVERY_CASE else 'the default cases (ZFK_BENCH_ALL=1 for all)'}, "
        f"{'full' if FULL_END_TO_END else 'reduced (ZFK_BENCH_FULL=1 for full)'} end-to-end workloads"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per (case, provider), case-major, so the providers of a case run one after another on the
    same inputs (see `built_case`). An end-to-end case whose package is missing is collected and skipped
    with the reason, rather than silently absent."""
    if "case" not in metafunc.fixturenames:
        return
    cases = select_cases(
        modes=MODES if EVERY_CASE else None, dtypes=tuple(DTYPES) if EVERY_CASE else ("fp32",)
    )
    if ANALYSIS:  # opt-in cases: named, as `zfkernels bench --ops mining,projection,mining_memory` does
        cases += select_cases(ops=[name for name, spec in END_TO_END.items() if spec.opt_in])
    pairs = [(case, provider) for case in cases for provider in providers_for(case, DEVICE)]
    metafunc.parametrize(
        ("case", "provider"),
        [
            pytest.param(case, provider, marks=[pytest.mark.skip(reason=reason)] if reason else [])
            for case, provider in pairs
            for reason in [case_unavailable(case)]
        ],
        ids=[f"{case.id}-{provider}" for case, provider in pairs],
    )


@pytest.fixture(scope="session")
def _built_cases() -> dict[Case, BuiltCase | BuiltEndToEnd]:
    return {}


@pytest.fixture
def built_case(case: Case, _built_cases: dict[Case, BuiltCase | BuiltEndToEnd]) -> BuiltCase | BuiltEndToEnd:
    """The case's inputs, built once for all its providers; only one case is held at a time, since ZFNet's
    layer-1 tensors (and the end-to-end models) are large."""
    if case not in _built_cases:
        _built_cases.clear()
        _built_cases[case] = case.build(BATCH, DEVICE, quick=not FULL_END_TO_END)
    return _built_cases[case]
