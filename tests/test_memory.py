"""The CPU output cache: large op outputs reuse faulted-in torch storages, the cache gives them back, and
what it hands out is an ordinary tensor."""

from __future__ import annotations

import copy
import gc
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zfkernels
from zfkernels import memory
from zfkernels._extension import CACHED_OUTPUT_MIN_BYTES, cpu_module

pytestmark = pytest.mark.skipif(cpu_module is None, reason="needs the compiled extension zfkernels._C")

LARGE = (2, 96, 110, 110)  # 9.3 MB of fp32: above the cache's 8 MiB threshold
BLOCK = 2 * 96 * 110 * 110 * 4  # its bytes: a cached storage is exactly the output's size
CACHING = memory._cache._own_references is not None  # torch._C._storage_Use_Count is there
needs_caching = pytest.mark.skipif(not CACHING, reason="this torch has no torch._C._storage_Use_Count")


@pytest.fixture(autouse=True)
def fresh_cache():
    if memory.cache_info()["in_use"]:
        gc.collect()  # a reference cycle from an earlier test (slow on a big heap, so only then)
    limit = memory.cache_info()["limit"]
    memory.empty_cache()
    yield
    memory.set_cache_limit(limit)
    memory.empty_cache()


def relu(x: torch.Tensor) -> torch.Tensor:
    with zfkernels.use_backend("cpu"):
        return zfkernels.relu(x)


# ------------------------------------------------------------------- every large output is an ordinary tensor


def _pool_values():
    return zfkernels.max_pool2d_switches(torch.randn(8, 96, 110, 110), 3, 2, ceil_mode=True)[0]


def _pool_switches():  # 2x2 stride 1: uint8 switches as many as the inputs, 9 MB
    return zfkernels.max_pool2d_switches(torch.randn(1, 9, 1000, 1000), 2, 1)[1]


def _unpool():
    values, switches = zfkernels.max_pool2d_switches(torch.randn(LARGE), 3, 2, ceil_mode=True)
    return zfkernels.max_unpool2d(values, switches, 3, 2, output_size=LARGE[-2:], relu=True)


def _pool_backward():  # max_pool2d_switches_backward
    x = torch.randn(LARGE, requires_grad=True)
    values, _ = zfkernels.max_pool2d_switches(x, 3, 2, ceil_mode=True, relu=True)
    return torch.autograd.grad(values, x, torch.randn_like(values))[0]


def _relu():
    return zfkernels.relu(torch.randn(LARGE))


def _relu_backward():
    x = torch.randn(LARGE, requires_grad=True)
    y = zfkernels.relu(x, backward="deconvnet")
    return torch.autograd.grad(y, x, torch.randn_like(y))[0]


def _conv_transpose():  # 4 -> 3 channels: the direct kernel
    return zfkernels.conv_transpose2d(torch.randn(2, 4, 300, 300), torch.randn(4, 3, 3, 3), stride=2)


def _unpool_conv_transpose():
    values, switches = zfkernels.max_pool2d_switches(torch.randn(2, 4, 600, 600), 2, 2)
    return zfkernels.unpool_conv_transpose2d(
        values, switches, torch.randn(4, 3, 3, 3), pool_kernel_size=2, unpool_size=(600, 600), padding=1
    )


def _projection():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    images = torch.rand(2, 3, 224, 224)
    return zfkernels.DeconvNet(model).project(images, "2", filters=list(range(8)), top=1).pixels


OUTPUTS = {
    "max_pool2d_switches.values": _pool_values,
    "max_pool2d_switches.switches": _pool_switches,
    "max_unpool2d": _unpool,
    "max_pool2d_switches_backward": _pool_backward,
    "relu": _relu,
    "relu_backward": _relu_backward,
    "conv_transpose2d": _conv_transpose,
    "unpool_conv_transpose2d": _unpool_conv_transpose,
    "DeconvNet.project": _projection,
}


def _resize(u, expected):
    u.resize_(2 * u.numel())
    assert torch.equal(u[: expected.numel()], expected.flatten())
    u.resize_(expected.shape)
    assert torch.equal(u, expected)


def _out(u, expected):
    torch.add(expected, 1, out=u)
    assert torch.equal(u, expected + 1)
    twice = torch.cat([expected, expected])
    u.resize_(0)
    torch.mul(twice, 2, out=u)  # out= grows an emptied output past its storage
    assert torch.equal(u, twice * 2)


def _cat(u, expected):
    u.resize_(0)
    torch.cat([expected, expected], out=u)
    assert torch.equal(u, torch.cat([expected, expected]))


def _set(u, expected):
    other = torch.empty(0, dtype=u.dtype).set_(u.untyped_storage(), 0, expected.shape)
    assert torch.equal(other, expected)
    u.set_(torch.zeros(3, dtype=u.dtype))
    assert torch.equal(u, torch.zeros(3, dtype=u.dtype)) and torch.equal(other, expected)
    u.set_(other)
    assert torch.equal(u, expected)


def _share_memory(u, expected):
    u.share_memory_()
    assert u.is_shared() and torch.equal(u, expected)


def _save_load(u, expected):
    buffer = io.BytesIO()
    torch.save(u, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=True), expected)
    assert torch.equal(pickle.loads(pickle.dumps(u)), expected)
    assert torch.equal(copy.deepcopy(u), expected)


def _numpy(u, expected):
    array = u.numpy()
    assert np.array_equal(array, expected.numpy())
    array.flat[0] = 1  # one memory
    assert u.flatten()[0].item() == 1


BEHAVIOURS = {
    "resize_": _resize,
    "out=": _out,
    "cat(out=)": _cat,
    "set_": _set,
    "share_memory_": _share_memory,
    "save_load": _save_load,
    "numpy": _numpy,
}


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
@pytest.mark.parametrize("output", OUTPUTS)
def test_large_outputs_behave_like_torch_empty(output, behaviour):
    torch.manual_seed(0)
    with zfkernels.use_backend("cpu"):
        u = OUTPUTS[output]()
    assert u.numel() * u.element_size() >= CACHED_OUTPUT_MIN_BYTES  # the case is about cached outputs
    assert type(u) is torch.Tensor and u.is_contiguous() and u._base is None and not u.requires_grad
    assert u.storage_offset() == 0 and u.untyped_storage().nbytes() == u.numel() * u.element_size()
    assert u.untyped_storage().resizable() and not u.is_shared()
    BEHAVIOURS[behaviour](u, u.clone())


# ---------------------------------------------------------------------------------------- reuse and release


@needs_caching
def test_large_output_comes_from_the_cache_and_returns_to_it():
    x = torch.randn(LARGE)
    before = memory.cache_info()
    y = relu(x)
    assert torch.equal(y, torch.relu(x))
    assert memory.cache_info()["in_use"] == before["in_use"] + BLOCK
    address = y.data_ptr()
    del y
    assert memory.cache_info()["in_use"] == before["in_use"]
    assert memory.cache_info()["idle"] == BLOCK
    again = relu(x)
    assert again.data_ptr() == address  # the same faulted-in storage, reused
    assert torch.equal(again, torch.relu(x))
    assert memory.cache_info()["idle"] == 0


def test_small_outputs_use_torch_allocator():
    x = torch.randn(2, 3, 8, 8)
    before = memory.cache_info()["in_use"]
    y = relu(x)
    assert y.numel() * y.element_size() < CACHED_OUTPUT_MIN_BYTES
    assert memory.cache_info()["in_use"] == before


def test_live_outputs_never_share_a_storage():
    x = torch.randn(LARGE)
    first, second = relu(x), relu(-x)
    assert first.data_ptr() != second.data_ptr()
    first.fill_(7.0)
    assert torch.equal(second, torch.relu(-x))


HOLDERS = {
    "tensor": lambda u: u,
    "view": lambda u: u[1],
    "storage": lambda u: u.untyped_storage(),  # the same Python object the cache holds
    "numpy": lambda u: u.numpy(),
    "set_": lambda u: torch.empty(0).set_(u.untyped_storage(), 0, u.shape),
    "dlpack": lambda u: torch.utils.dlpack.to_dlpack(u),
    "weakref-only": None,  # nothing holds it: reused
}


@needs_caching
@pytest.mark.parametrize("holder", HOLDERS)
def test_a_storage_is_not_reused_while_anything_holds_it(holder):
    x = torch.randn(LARGE)
    u = relu(x)
    address = u.data_ptr()
    held = HOLDERS[holder](u) if HOLDERS[holder] else None
    del u
    second = relu(-x)
    if held is None:
        assert second.data_ptr() == address
        return
    assert second.data_ptr() != address
    second.fill_(-1.0)
    # What the holder sees is still the first output.
    if holder == "numpy":
        assert np.array_equal(held, torch.relu(x).numpy())
    elif holder == "dlpack":
        assert torch.equal(torch.utils.dlpack.from_dlpack(held), torch.relu(x))
    elif holder == "storage":
        assert torch.equal(torch.empty(0).set_(held, 0, LARGE), torch.relu(x))
    else:
        assert torch.equal(held, torch.relu(x)[1] if holder == "view" else torch.relu(x))
    del held
    # Released now; a numpy export leaves a storage unresizable for good, so that one is dropped instead.
    assert memory.cache_info()["idle"] == (0 if holder == "numpy" else BLOCK)
    third = relu(x)
    if holder != "numpy":
        assert third.data_ptr() == address
    third.resize_(2 * third.numel())


@needs_caching
def test_shared_or_resized_storages_are_not_handed_out_again():
    x = torch.randn(LARGE)
    shared = relu(x)
    shared.share_memory_()  # another process may hold it now
    address = shared.data_ptr()
    del shared
    fresh = relu(x)
    assert fresh.data_ptr() != address and not fresh.is_shared()
    fresh.resize_(2 * fresh.numel())  # a resized storage is idle at its new size, not the output's
    del fresh
    again = relu(x)
    assert again.untyped_storage().nbytes() == BLOCK
    assert memory.cache_info()["idle"] == 2 * BLOCK


def test_views_keep_the_storage_alive():
    x = torch.randn(LARGE)
    y = relu(x)
    view = y[1]
    in_use = memory.cache_info()["in_use"]
    del y
    assert memory.cache_info()["in_use"] == in_use
    assert torch.equal(view, torch.relu(x[1]))
    del view
    assert memory.cache_info()["in_use"] == in_use - (BLOCK if CACHING else 0)


def test_release_from_another_thread():
    x = torch.randn(LARGE)
    box = [relu(x)]
    in_use = memory.cache_info()["in_use"]
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    assert memory.cache_info()["in_use"] == in_use - (BLOCK if CACHING else 0)


@needs_caching
def test_idle_bytes_stay_within_the_limit_keeping_the_most_recent():
    x = torch.randn(LARGE)
    memory.set_cache_limit(2 * BLOCK + BLOCK // 2)
    outputs = [relu(x) for _ in range(4)]
    addresses = [y.data_ptr() for y in outputs]
    del outputs
    info = memory.cache_info()
    assert info["idle"] == 2 * BLOCK <= info["limit"]
    reused = [relu(x), relu(x), relu(x)]  # the last two handed out come back, most recent first
    assert [y.data_ptr() for y in reused[:2]] == [addresses[3], addresses[2]]
    assert reused[2].data_ptr() not in addresses[2:]


@needs_caching
def test_outputs_larger_than_the_limit_are_not_cached():
    memory.set_cache_limit(BLOCK - 1)
    y = relu(torch.randn(LARGE))
    assert memory.cache_info()["in_use"] == 0
    del y
    assert memory.cache_info()["idle"] == 0


def test_limit_zero_turns_the_cache_off_and_empty_cache_frees_idle():
    x = torch.randn(LARGE)
    relu(x)
    assert memory.cache_info()["idle"] == (BLOCK if CACHING else 0)
    memory.empty_cache()
    assert memory.cache_info()["idle"] == 0
    memory.set_cache_limit(0)
    y = relu(x)
    assert memory.cache_info()["in_use"] == 0
    del y
    assert memory.cache_info()["idle"] == 0


@needs_caching
def test_peak_tracks_the_high_water_mark():
    x = torch.randn(LARGE)
    memory.reset_peak()
    base = memory.cache_info()["in_use"]
    a, b = relu(x), relu(x)
    del a, b
    info = memory.cache_info()
    assert info["peak_in_use"] == base + 2 * BLOCK
    assert info["in_use"] == base
    memory.reset_peak()
    assert memory.cache_info()["peak_in_use"] == base


@needs_caching
def test_a_reentrant_call_bypasses_the_cache():
    """A finalizer that runs an op while this thread scans the pool gets a plain tensor, not a storage the
    scan is about to hand out."""
    with memory._cache._lock:
        memory._cache._busy = True
        try:
            y = relu(torch.randn(LARGE))
        finally:
            memory._cache._busy = False
    assert memory.cache_info()["in_use"] == 0
    assert torch.equal(y, y.relu())


def test_the_bench_peak_memory_sees_cached_outputs_as_allocations():
    from zfkernels.bench.runner import call_with_peak_memory

    x = torch.randn(LARGE)
    relu(x)  # an idle cached storage that the measured call could have reused unseen
    result, peak = call_with_peak_memory(lambda: relu(x), torch.device("cpu"))
    if peak is not None:
        assert peak == BLOCK
    assert memory.cache_info()["in_use"] == 0  # the measured call bypassed the cache
    del result


# ------------------------------------------------------------------------------------ threads and fork


def test_outputs_from_several_threads_are_never_shared():
    inputs = [torch.randn(LARGE) * (k + 1) for k in range(4)]
    expected = [torch.relu(x) for x in inputs]
    errors: list[str] = []

    def work(k: int) -> None:
        try:
            for _ in range(8):
                y = relu(inputs[k])
                time.sleep(0.001)  # let another thread take an output while this one is live
                if not torch.equal(y, expected[k]):
                    errors.append(f"thread {k} read another output")
                del y
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "an op call hung"
    assert not errors, errors
    assert memory.cache_info()["in_use"] == 0


def _run_in_forked_child(child) -> int:
    """Exit code of `child()` run in a forked child (killed after 60 s). After its parent ran OpenMP threads,
    torch's own parallel ops hang in a child, so `child` uses only our kernels and numpy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running: what we test
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if status[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    return os.waitstatus_to_exitcode(status[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_cache_in_a_forked_child():
    x = torch.randn(LARGE)
    expected = torch.relu(x).numpy().tobytes()
    live = relu(x)  # held across the fork: the child must not hand it out again
    relu(-x)  # and an idle one
    live_bytes = live.numpy().tobytes()

    def child() -> int:
        outputs = [relu(x) for _ in range(3)]
        if any(y.numpy().tobytes() != expected for y in outputs):
            return 2
        if any(y.data_ptr() == live.data_ptr() for y in outputs) or live.numpy().tobytes() != live_bytes:
            return 3
        del outputs
        return 0 if memory.cache_info()["in_use"] == (BLOCK if CACHING else 0) else 4

    assert _run_in_forked_child(child) == 0
    assert live.numpy().tobytes() == live_bytes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_holds_the_cache_lock():
    x = torch.randn(LARGE)
    expected = torch.relu(x).numpy().tobytes()
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with memory._cache._lock:
            locked.set()
            release.wait(60)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait(60)
    try:
        code = _run_in_forked_child(lambda: 0 if relu(x).numpy().tobytes() == expected else 2)
    finally:
        release.set()
        holder.join()
    assert code == 0


# ---------------------------------------------------------------------------------------- the limit's value


@pytest.mark.parametrize(
    ("bad", "error"),
    [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError), (None, TypeError)],
)
def test_set_cache_limit_rejects_bad_values(bad, error):
    with pytest.raises(error, match="nbytes"):
        memory.set_cache_limit(bad)


@pytest.mark.parametrize("huge", [2**63, 2**64 + 1, 10**30])
def test_a_limit_beyond_memory_means_no_limit(huge):
    memory.set_cache_limit(huge)
    assert memory.cache_info()["limit"] == huge
    relu(torch.randn(LARGE))
    assert memory.cache_info()["idle"] == (BLOCK if CACHING else 0)


def test_set_cache_limit_takes_integer_like_values():
    memory.set_cache_limit(np.int64(3 << 20))
    assert memory.cache_info()["limit"] == 3 << 20


def _import_with_cache_mb(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ZFK_CPU_CACHE_MB=value)
    code = "from zfkernels import memory; print(memory.cache_info()['limit'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_a_bad_environment_limit_never_breaks_the_import():
    run = _import_with_cache_mb("lots")
    assert run.returncode == 0, run.stderr
    assert "RuntimeWarning" in run.stderr and "ZFK_CPU_CACHE_MB" in run.stderr
    assert int(run.stdout) == memory._default_limit()


def test_a_huge_environment_limit_imports_as_no_limit():
    run = _import_with_cache_mb("99999999999999999")
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == 99999999999999999 << 20


@pytest.mark.parametrize("bad", ["lots", "-1", "1.5", "0x10", "1e3", "\u0663"])
def test_a_bad_environment_limit_warns_and_keeps_the_default(bad, monkeypatch):
    monkeypatch.setenv("ZFK_CPU_CACHE_MB", bad)
    with pytest.warns(RuntimeWarning, match="ZFK_CPU_CACHE_MB"):
        assert memory._limit_from_environment(12345) == 12345


@pytest.mark.parametrize(("value", "limit"), [("3", 3 << 20), (" 0 ", 0), ("", 12345), ("   ", 12345)])
def test_environment_limit_is_applied(value, limit, monkeypatch):
    monkeypatch.setenv("ZFK_CPU_CACHE_MB", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert memory._limit_from_environment(12345) == limit


def test_without_storage_use_counts_outputs_are_plain():
    """A torch without torch._C._storage_Use_Count (CPU-only builds before 2.8) cannot tell an idle storage
    from a held one: no caching, still correct."""
    code = (
        "import torch; del torch._C._storage_Use_Count\n"
        "import zfkernels; from zfkernels import memory\n"
        "x = torch.randn(2, 96, 110, 110)\n"
        "with zfkernels.use_backend('cpu'):\n"
        "    y = zfkernels.relu(x); z = zfkernels.relu(x)\n"
        "assert torch.equal(y, torch.relu(x)) and y.data_ptr() != z.data_ptr()\n"
        "y.resize_(2 * y.numel())\n"
        "print(memory.cache_info())\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "'in_use': 0" in run.stdout and "'idle': 0" in run.stdout


def test_cached_outputs_of_pool_and_unpool_are_exact():
    x = torch.randn(8, 96, 110, 110)  # pooled values are 9.3 MB: cached, like the unpooled map
    expected, indices = F.max_pool2d(x.relu(), 3, 2, ceil_mode=True, return_indices=True)
    with zfkernels.use_backend("cpu"):
        values, switches = zfkernels.max_pool2d_switches(x, 3, 2, ceil_mode=True, relu=True)
        unpooled = zfkernels.max_unpool2d(values, switches, 3, 2, output_size=x.shape[-2:])
    if CACHING:
        assert memory.cache_info()["in_use"] >= values.nbytes + unpooled.nbytes
    assert torch.equal(values, expected)
    assert torch.equal(zfkernels.switches_to_indices(switches, x.shape[-2:], 3, 2), indices)
    with zfkernels.use_backend("reference"):
        assert torch.equal(unpooled, zfkernels.max_unpool2d(values, switches, 3, 2, output_size=x.shape[-2:]))
