"""Every benchmark case of zfkernels.bench.cases, per provider, with pytest-benchmark.

Same cases and same checks as `zfkernels bench`: a provider whose result differs from the reference fails
its test instead of being timed. pytest-benchmark groups the providers of a case, so its table compares
them side by side.
"""

from __future__ import annotations

import pytest

from zfkernels.bench.cases import BuiltCase, Case
from zfkernels.bench.runner import synchronize


def test_op(benchmark, case: Case, provider: str, built_case: BuiltCase) -> None:
    with built_case.scope(provider):
        call = built_case.call(provider)
        mismatch = built_case.mismatch(call.comparable(call.run()))
        if mismatch is not None:
            pytest.fail(f"{provider} differs from the reference on {case.id}: {mismatch}")
        call.run()  # warm-up: the first call above may have compiled or faulted in fresh pages

        def synchronized_call() -> None:
            call.run()
            synchronize(built_case.device)

        benchmark.group = case.id
        benchmark.extra_info.update(
            provider=provider, shapes=built_case.workload.shapes, bytes_moved=built_case.bytes_moved
        )
        benchmark(synchronized_call)
