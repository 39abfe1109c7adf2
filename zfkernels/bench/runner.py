"""Measuring the cases: verification against the reference, honest timing, peak memory, copy bandwidth.

Timing rules, for every provider alike: the device is synchronized around each timed call (CUDA events on
a GPU), the first call (which compiles, for "compile") and a warm-up are never timed, CPU threads are pinned
with torch.set_num_threads, and a provider whose result differs from the reference is not timed at all.
A provider's `setup` (restoring the state a training step changed) runs before every call, untimed.

End-to-end cases (`built.long_calls`) take seconds to minutes a call, so their verifying call is also their
warm-up and runs under the memory profiler (its overhead costs no timing there); then as many calls as fit
in `TimingPolicy.long_budget_s` are timed, at least one and at most `min_repeats` (with `interleave`, in
rounds of one call per provider). A memory-only case
(`built.memory_only`) runs each provider once, under the memory profiler, and neither checks nor times it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import zfkernels

from .. import memory
from .cases import BuiltCase, BuiltEndToEnd, Case, ProviderCall, providers_for

OK, FAILED, ERROR = "ok", "failed", "error"


@dataclass(frozen=True)
class TimingPolicy:
    """How long to time one cell: a fixed repeat count, or as many repeats as fit in `budget_s`."""

    repeats: int | None = None
    budget_s: float = 1.0
    min_repeats: int = 5
    max_repeats: int = 100
    # Untimed calls after the verifying one: at least one, more while they fit in this share of the budget.
    warmup_share: float = 0.25
    # Time a case's providers in alternating rounds instead of one after another. Rounds cancel drift in
    # machine speed, but each provider then runs right after the others' memory churn: large fresh
    # outputs fault in their pages again (huge pages need compaction), which the back-to-back default,
    # like pytest-benchmark, does not charge.
    interleave: bool = False
    # End-to-end cases: timed calls that fit in this many seconds, judged by the verifying call's time.
    long_budget_s: float = 30.0


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int


@dataclass
class Cell:
    """One provider on one case: its timing, or why it has none (its result differs from the reference, or
    it raised)."""

    op: str
    shape: str
    mode: str
    dtype: str
    provider: str
    status: str
    message: str | None = None
    timing: Timing | None = None
    peak_memory_bytes: int | None = None
    bytes_moved: int | None = None
    # >1 for a provider timed on a sample of the work: its time x this is the whole work's estimate.
    time_scale: float = 1.0

    @property
    def case_key(self) -> tuple[str, str, str, str]:
        return self.op, self.shape, self.mode, self.dtype

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (*self.case_key, self.provider)

    @property
    def gbps(self) -> float | None:
        """Effective bandwidth: the op's own bytes moved over the median time (memory-bound ops only)."""
        if self.bytes_moved is None or self.timing is None or self.timing.median_ms <= 0:
            return None
        return self.bytes_moved / (self.timing.median_ms * 1e-3) / 1e9


@dataclass
class CopyBandwidth:
    """A plain tensor copy on this device, read + write bytes over the median time: the bandwidth ceiling
    memory-bound ops are judged against. `fresh` allocates its output (page faults included, as in a clone);
    `preallocated` copies into an existing tensor, the faster and so the stricter yardstick."""

    nbytes: int
    preallocated_gbps: float
    fresh_gbps: float
    # The preallocated copy as each process measured it, this one first. A CPU's figure can depend on the
    # process (on a shared VM: about 45 or about 80 GB/s for the same copy), so fresh processes measure it
    # too and `preallocated_gbps` is the fastest of them all: the strictest yardstick.
    process_gbps: list[float] = field(default_factory=list)


@dataclass
class Machine:
    cpu: str
    cores: int
    threads: int
    device: str
    device_name: str
    torch: str
    triton: str | None
    zfkernels: str
    python: str
    platform: str
    peak_memory_method: str
    # Other processes busy on a small machine skew every timing; the reader should know they were there.
    load_average: float | None


@dataclass
class Settings:
    """What was asked for; recorded with the results so a comparison can say when two runs differ in kind."""

    device: str
    batch: int
    image_size: int
    threads: int
    providers: list[str] | None
    policy: TimingPolicy
    copy_mib: int = 256
    copy_processes: int = 2  # fresh processes that measure the CPU copy too (0: this process only)
    # Reduced end-to-end workloads (fewer images and filters for the deconvnet; the batch is `batch`).
    quick: bool = False
    # Which run of `zfkernels bench`: "headline" (the default), "quick" or "full".
    profile: str = "full"


@dataclass
class BenchRun:
    machine: Machine
    settings: Settings
    copy: CopyBandwidth
    cases: dict[str, dict[str, list[int]]]  # case id -> named input/output shapes
    cells: list[Cell] = field(default_factory=list)
    wall_s: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)  # case id -> what one call does (end-to-end cases)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, policy: TimingPolicy) -> Timing:
    """Median and 20th/80th percentiles of `fn`'s wall time in ms, after a warm-up.

    Each call's result is dropped before the next, so allocation is part of the cost as in real use.
    The garbage collector is paused so a collection never lands inside a timed call.
    """
    return time_side_by_side([fn], device, policy)[0]


def _timed_once(
    fn: Callable[[], object], device: torch.device, setup: Callable[[], None] | None = None
) -> float:
    """Seconds for one call, the device synchronized before and after (CUDA events time the GPU's work);
    `setup` runs first, outside the timing."""
    if setup is not None:
        setup()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def peak_memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the memory held before the call"
    return (
        "torch.profiler memory events, zfkernels' CPU output cache bypassed "
        "(native scratch memory is not seen)"
    )


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated by one call at its peak, above what was held before it (the inputs are not counted).

    The CPU allocator keeps no statistics and RSS only ever rises, so on CPU the torch profiler's
    allocation events are summed in order, with the output cache bypassed (its reuse and release of a storage
    are invisible to the profiler); None if this torch's profiler does not expose its events.
    """
    result, peak = call_with_peak_memory(fn, device)
    del result
    return peak


def call_with_peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[object, int | None]:
    """`fn()` and its peak memory as `peak_memory` measures it (the result is kept, for checking)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    with (
        _output_cache_bypassed(),
        _stderr_silenced(),
        torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as profile,
    ):
        result = fn()
    # Frees after the call cannot raise the peak, so the result may outlive the profile.
    results = getattr(profile.profiler, "kineto_results", None)
    if results is None:
        return result, None
    events = sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return result, peak


def _output_cache_bypassed() -> contextlib.AbstractContextManager[None]:
    """Large CPU outputs as plain torch allocations, each allocation and free seen by the profiler (a reused
    cached storage would be neither). The next calls refill the cache; timing takes medians."""
    return memory._bypassed()


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Kineto writes profiler start/stop lines straight to file descriptor 2, and no setting stops it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_copy_bandwidth(
    device: torch.device, nbytes: int, policy: TimingPolicy, fresh_processes: int = 0
) -> CopyBandwidth:
    """Bandwidth of a plain copy of `nbytes` (large enough to leave the caches, by default 256 MiB); on a
    CPU also in `fresh_processes` new processes, whose fastest preallocated figure joins the yardstick."""
    source = torch.rand(max(nbytes // 4, 1), device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # fault the target's pages in: the preallocated copy must not pay for them
    moved = 2 * source.numel() * source.element_size()
    preallocated = moved / (time_call(lambda: target.copy_(source), device, policy).median_ms * 1e-3) / 1e9
    fresh = time_call(source.clone, device, policy)
    processes = [preallocated]
    if device.type == "cpu":
        processes += [_copy_in_fresh_process(nbytes) for _ in range(fresh_processes)]
    return CopyBandwidth(moved // 2, max(processes), moved / (fresh.median_ms * 1e-3) / 1e9, processes)


def _copy_in_fresh_process(nbytes: int) -> float:
    """The preallocated CPU copy's GB/s as a new Python process (same thread count) measures it."""
    code = (
        "import sys, torch; from zfkernels.bench.runner import TimingPolicy, measure_copy_bandwidth; "
        f"torch.set_num_threads({torch.get_num_threads()}); "
        f"print(measure_copy_bandwidth(torch.device('cpu'), {nbytes}, TimingPolicy()).preallocated_gbps)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def describe_machine(device: torch.device, threads: int) -> Machine:
    cpu = _cpu_model()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    try:
        triton_version: str | None = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return Machine(
        cpu=cpu,
        cores=os.cpu_count() or 1,
        threads=threads,
        device=str(device),
        device_name=device_name,
        torch=torch.__version__,
        triton=triton_version,
        zfkernels=zfkernels.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        peak_memory_method=peak_memory_method(device),
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def measure_cell(built: BuiltCase | BuiltEndToEnd, provider: str, policy: TimingPolicy) -> Cell:
    """One provider of a case: see measure_case."""
    return measure_case(built, [provider], policy)[0]


@dataclass
class _Verified:
    """A provider that passed its check: its scoped calls, and how long its verifying call took."""

    run: Callable[[], object]
    setup: Callable[[], None] | None
    first_call_s: float


def measure_case(
    built: BuiltCase | BuiltEndToEnd, providers: Sequence[str], policy: TimingPolicy
) -> list[Cell]:
    """Verify every provider against the reference, then time the verified ones side by side.

    A provider that raises, or whose result differs from the reference, gets a cell that says so and no
    timing: the suite must keep going when one kernel is broken, but never time it. The verified
    providers are timed one after another, or with `policy.interleave` in rounds of one call each, so a
    machine whose speed drifts during the case shifts every provider alike. End-to-end cases are timed
    one provider after another, their peak memory taken in the verifying call (see the module docstring).
    """
    if getattr(built, "memory_only", False):
        return _measure_memory(built, providers)
    case = built.case
    scales = getattr(built.workload, "time_scale", {})
    cells = [
        Cell(
            case.op,
            case.shape,
            case.mode,
            case.dtype,
            p,
            OK,
            bytes_moved=built.bytes_moved,
            time_scale=scales.get(p, 1.0),
        )
        for p in providers
    ]
    try:
        built.expected()
    except Exception as error:  # the reference itself failed: no provider can be checked
        for cell in cells:
            cell.status, cell.message = ERROR, f"reference failed: {_one_line(error)}"
        return cells
    verified: dict[int, _Verified] = {}
    for index, (provider, cell) in enumerate(zip(providers, cells, strict=True)):
        try:
            with built.scope(provider):
                call = built.call(provider)
                if call.setup is not None:
                    call.setup()
                started = time.perf_counter()
                if built.long_calls:
                    result, cell.peak_memory_bytes = call_with_peak_memory(call.run, built.device)
                else:
                    result = call.run()
                synchronize(built.device)
                first_call_s = time.perf_counter() - started
                unchecked = getattr(built.workload, "unchecked", {}).get(provider)
                mismatch = None if unchecked else built.mismatch(call.comparable(result))
                del result
            if unchecked:
                cell.message = f"not checked: {unchecked}"
            if mismatch is not None:
                cell.status, cell.message, cell.peak_memory_bytes = FAILED, mismatch, None
            else:
                verified[index] = _Verified(
                    _in_scope(built, provider, call.run), _setup_in_scope(built, provider, call), first_call_s
                )
        except Exception as error:  # reported in the table, so that the other cells still run
            cell.status, cell.message, cell.peak_memory_bytes = ERROR, _one_line(error), None
            if built.device.type == "cuda":
                torch.cuda.empty_cache()
    try:
        if built.long_calls and policy.interleave:
            entries = list(verified.values())
            timings = time_long_calls_side_by_side(
                [e.run for e in entries],
                built.device,
                policy,
                [e.first_call_s for e in entries],
                [e.setup for e in entries],
            )
            for index, timing in zip(verified, timings, strict=True):
                cells[index].timing = timing
        elif built.long_calls:
            for index, entry in verified.items():
                cells[index].timing = time_long_call(
                    entry.run, built.device, policy, entry.first_call_s, entry.setup
                )
        else:
            entries = list(verified.values())
            timings = (
                time_side_by_side([e.run for e in entries], built.device, policy, [e.setup for e in entries])
                if policy.interleave
                else [time_side_by_side([e.run], built.device, policy, [e.setup])[0] for e in entries]
            )
            for index, timing in zip(verified, timings, strict=True):
                cells[index].timing = timing
                if verified[index].setup is not None:
                    verified[index].setup()
                cells[index].peak_memory_bytes = peak_memory(verified[index].run, built.device)
    except Exception as error:  # a provider that passed its check but failed while timed
        for index in verified:
            cells[index].status, cells[index].message, cells[index].timing = ERROR, _one_line(error), None
    return cells


def _measure_memory(built: BuiltCase | BuiltEndToEnd, providers: Sequence[str]) -> list[Cell]:
    """A memory-only case: each provider's peak memory in one profiled call; no check, no timing."""
    case, cells = built.case, []
    for provider in providers:
        cell = Cell(
            case.op, case.shape, case.mode, case.dtype, provider, OK, message="memory only: not timed"
        )
        try:
            with built.scope(provider):
                call = built.call(provider)
                if call.setup is not None:
                    call.setup()
                _, cell.peak_memory_bytes = call_with_peak_memory(call.run, built.device)
        except Exception as error:  # reported in the table, so that the other cells still run
            cell.status, cell.message = ERROR, _one_line(error)
        cells.append(cell)
    return cells


def _in_scope(
    built: BuiltCase | BuiltEndToEnd, provider: str, run: Callable[[], object]
) -> Callable[[], object]:
    def scoped() -> object:
        with built.scope(provider):
            return run()

    return scoped


def _setup_in_scope(
    built: BuiltCase | BuiltEndToEnd, provider: str, call: ProviderCall
) -> Callable[[], None] | None:
    setup = call.setup
    if setup is None:
        return None

    def scoped() -> None:
        with built.scope(provider):
            setup()

    return scoped


def long_call_repeats(policy: TimingPolicy, first_call_s: float) -> int:
    """Timed calls for a long (end-to-end) call that took `first_call_s` to verify: `policy.repeats` if set,
    else as many as fit in `policy.long_budget_s`, at least one and at most `policy.min_repeats`."""
    if policy.repeats:
        return policy.repeats
    fitting = int(policy.long_budget_s // max(first_call_s, 1e-9))
    return max(1, min(policy.min_repeats, fitting))


def time_long_call(
    fn: Callable[[], object],
    device: torch.device,
    policy: TimingPolicy,
    first_call_s: float,
    setup: Callable[[], None] | None = None,
) -> Timing:
    """Time an end-to-end call without further warm-up (its verifying call was one): `long_call_repeats`
    calls, each after `setup` and a garbage collection, both untimed. The collector is not paused: over
    calls of seconds to minutes a collection is noise, while cyclic garbage (captum's hooks make some)
    left to pile up would not be."""
    samples = []
    for _ in range(long_call_repeats(policy, first_call_s)):
        gc.collect()
        samples.append(_timed_once(fn, device, setup) * 1e3)
    return _summarize(samples)


def time_long_calls_side_by_side(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    policy: TimingPolicy,
    first_calls_s: Sequence[float],
    setups: Sequence[Callable[[], None] | None],
) -> list[Timing]:
    """time_long_call for several end-to-end calls in rounds of one call each, so that a machine whose speed
    drifts over minutes shifts every provider alike (a ratio near its target is then judged fairly).
    Rounds: `policy.repeats` if set, else as many as fit in `policy.long_budget_s` per call (judged by the
    verifying calls), at least one and at most `policy.min_repeats`."""
    if not fns:
        return []
    rounds = policy.repeats or max(
        1, min(policy.min_repeats, int(policy.long_budget_s * len(fns) // max(sum(first_calls_s), 1e-9)))
    )
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, setup, fn_samples in zip(fns, setups, samples, strict=True):
            gc.collect()
            fn_samples.append(_timed_once(fn, device, setup) * 1e3)
    return [_summarize(fn_samples) for fn_samples in samples]


def time_side_by_side(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    policy: TimingPolicy,
    setups: Sequence[Callable[[], None] | None] | None = None,
) -> list[Timing]:
    """time_call for several callables at once: warm-ups first, then rounds of one call each (the
    budget is per callable, as if each were timed alone). `setups[i]`, if given, runs untimed before
    every call of `fns[i]`."""
    if not fns:
        return []
    setups = list(setups) if setups is not None else [None] * len(fns)
    warmup_budget = policy.warmup_share * policy.budget_s
    fastest: list[float] = []
    for fn, setup in zip(fns, setups, strict=True):
        warmup_times: list[float] = []
        while not warmup_times or (
            sum(warmup_times) < warmup_budget and len(warmup_times) < policy.min_repeats
        ):
            warmup_times.append(_timed_once(fn, device, setup))
        fastest.append(min(warmup_times))
    repeats = policy.repeats or min(
        policy.max_repeats, max(policy.min_repeats, math.ceil(policy.budget_s * len(fns) / sum(fastest)))
    )
    samples: list[list[float]] = [[] for _ in fns]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for fn, setup, fn_samples in zip(fns, setups, samples, strict=True):
                fn_samples.append(_timed_once(fn, device, setup) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [_summarize(fn_samples) for fn_samples in samples]


def _summarize(samples_ms: list[float]) -> Timing:
    if len(samples_ms) == 1:
        return Timing(samples_ms[0], samples_ms[0], samples_ms[0], 1)
    deciles = statistics.quantiles(samples_ms, n=10, method="inclusive")
    return Timing(statistics.median(samples_ms), deciles[1], deciles[7], len(samples_ms))


def run_cases(cases: Sequence[Case], settings: Settings, progress: bool = True) -> BenchRun:
    """Measure every provider on every case, after the copy bandwidth; one progress bar over all cells."""
    started = time.perf_counter()
    device = torch.device(settings.device)
    torch.set_num_threads(settings.threads)
    run = BenchRun(
        machine=describe_machine(device, settings.threads),
        settings=settings,
        copy=measure_copy_bandwidth(
            device, settings.copy_mib << 20, settings.policy, settings.copy_processes
        ),
        cases={},
    )
    plan = [(case, providers_for(case, device, settings.providers)) for case in cases]
    with tqdm(
        total=sum(len(providers) for _, providers in plan),
        disable=None if progress else True,  # None: drawn on a terminal, left out of logs
        unit="cell",
        dynamic_ncols=True,
        file=sys.stderr,
    ) as bar:
        for case, providers in plan:
            bar.set_description(case.id)
            try:
                built = case.build(settings.batch, device, settings.image_size, quick=settings.quick)
            except Exception as error:  # e.g. an image size the model cannot take: this row only fails
                run.cells.extend(
                    Cell(*case_key(case), p, ERROR, f"case could not be built: {_one_line(error)}")
                    for p in providers
                )
                bar.update(len(providers))
                continue
            run.cases[case.id] = built.shapes
            if built.note is not None:
                run.notes[case.id] = built.note
            run.cells.extend(measure_case(built, providers, settings.policy))
            bar.update(len(providers))
            del built  # free this case's inputs (end-to-end: models, gigabytes) before the next case
            gc.collect()
    run.wall_s = time.perf_counter() - started
    return run


def case_key(case: Case) -> tuple[str, str, str, str]:
    return case.op, case.shape, case.mode, case.dtype
