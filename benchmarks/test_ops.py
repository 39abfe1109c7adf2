"""Every benchmark case of zfkernels.bench.cases, per provider, with pytest-benchmark.

Same cases and same checks as `zfkernels bench`: a provider whose result differs from the reference fails
its test instead of being timed. pytest-benchmark groups the providers of a case, so its table compares
them side by side. End-to-end cases take seconds to minutes a call: as in `zfkernels bench`, their
verifying call is the warm-up and only as many rounds as fit in the default long-call budget are timed
(`benchmark.pedantic`), each after the provider's untimed setup. A memory-only case (mining_memory) runs
each provider once, under the memory profiler, and records its peak in `extra_info`.
"""

from __future__ import annotations

import time

import pytest

from zfkernels.bench.cases import BuiltCase, BuiltEndToEnd, Case
from zfkernels.bench.runner import TimingPolicy, call_with_peak_memory, long_call_repeats, synchronize


def test_case(benchmark, case: Case, provider: str, built_case: BuiltCase | BuiltEndToEnd) -> None:
    if getattr(built_case, "memory_only", False):
        _measure_memory(benchmark, case, provider, built_case)
        return
    with built_case.scope(provider):
        call = built_case.call(provider)
        started = time.perf_counter()
        result = call.fresh_run()
        synchronize(built_case.device)
        first_call_s = time.perf_counter() - started
        unchecked = getattr(built_case.workload, "unchecked", {}).get(provider)  # a baseline: no result
        mismatch = None if unchecked else built_case.mismatch(call.comparable(result))
        del result
        if mismatch is not None:
            pytest.fail(f"{provider} differs from the reference on {case.id}: {mismatch}")

        def synchronized_call() -> None:
            call.run()
            synchronize(built_case.device)

        benchmark.group = case.id
        benchmark.extra_info.update(
            provider=provider, shapes=built_case.shapes, bytes_moved=built_case.bytes_moved
        )
        scale = getattr(built_case.workload, "time_scale", {}).get(provider)
        if scale is not None:  # timed on a sample of the work
            benchmark.extra_info.update(time_scale=scale)
        if built_case.long_calls:
            rounds = long_call_repeats(TimingPolicy(), first_call_s)
            benchmark.extra_info.update(note=built_case.note)
            benchmark.pedantic(synchronized_call, setup=call.setup, rounds=rounds, iterations=1)
            return
        call.run()  # warm-up: the first call above may have compiled or faulted in fresh pages
        benchmark(synchronized_call)


def _measure_memory(benchmark, case: Case, provider: str, built_case: BuiltEndToEnd) -> None:
    """One profiled call (its time includes the profiler's overhead); the peak goes to `extra_info`."""
    with built_case.scope(provider):
        call = built_case.call(provider)

        def profiled() -> None:
            _, peak = call_with_peak_memory(call.run, built_case.device)
            benchmark.extra_info.update(peak_memory_bytes=peak)

        benchmark.group = case.id
        benchmark.extra_info.update(provider=provider, shapes=built_case.shapes, note=built_case.note)
        benchmark.pedantic(profiled, setup=call.setup, rounds=1, iterations=1)
