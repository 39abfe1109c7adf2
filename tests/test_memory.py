"""The CPU output cache: large op outputs reuse faulted-in blocks, and the cache gives them back."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading

import pytest
import torch

import zfkernels
from zfkernels import memory
from zfkernels._extension import CACHED_OUTPUT_MIN_BYTES, cpu_module

pytestmark = pytest.mark.skipif(cpu_module is None, reason="needs the compiled extension zfkernels._C")

LARGE = (2, 96, 110, 110)  # 9.3 MB of fp32: above the cache's 8 MiB threshold
BLOCK = 10 << 20  # that output rounded up to whole 2 MiB pages


@pytest.fixture(autouse=True)
def fresh_cache():
    gc.collect()
    limit = memory.cache_info()["limit"]
    memory.empty_cache()
    yield
    memory.set_cache_limit(limit)
    gc.collect()


def test_large_output_comes_from_the_cache_and_returns_to_it():
    x = torch.randn(LARGE)
    before = memory.cache_info()
    with zfkernels.use_backend("cpu"):
        y = zfkernels.relu(x)
    assert torch.equal(y, torch.relu(x))
    assert memory.cache_info()["in_use"] == before["in_use"] + BLOCK
    address = y.data_ptr()
    del y
    assert memory.cache_info()["in_use"] == before["in_use"]
    assert memory.cache_info()["idle"] == BLOCK
    with zfkernels.use_backend("cpu"):
        again = zfkernels.relu(x)
    assert again.data_ptr() == address  # the same faulted-in block, reused
    assert torch.equal(again, torch.relu(x))


def test_small_outputs_use_torch_allocator():
    x = torch.randn(2, 3, 8, 8)
    before = memory.cache_info()["in_use"]
    with zfkernels.use_backend("cpu"):
        y = zfkernels.relu(x)
    assert y.numel() * y.element_size() < CACHED_OUTPUT_MIN_BYTES
    assert memory.cache_info()["in_use"] == before


def test_live_outputs_never_share_a_block():
    x = torch.randn(LARGE)
    with zfkernels.use_backend("cpu"):
        first, second = zfkernels.relu(x), zfkernels.relu(-x)
    assert first.data_ptr() != second.data_ptr()
    first.fill_(7.0)
    assert torch.equal(second, torch.relu(-x))


def test_views_keep_the_block_alive():
    x = torch.randn(LARGE)
    with zfkernels.use_backend("cpu"):
        y = zfkernels.relu(x)
    view = y[1]
    in_use = memory.cache_info()["in_use"]
    del y
    assert memory.cache_info()["in_use"] == in_use
    assert torch.equal(view, torch.relu(x[1]))
    del view
    assert memory.cache_info()["in_use"] == in_use - BLOCK


def test_release_from_another_thread():
    x = torch.randn(LARGE)
    with zfkernels.use_backend("cpu"):
        box = [zfkernels.relu(x)]
    in_use = memory.cache_info()["in_use"]
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    assert memory.cache_info()["in_use"] == in_use - BLOCK


def test_limit_zero_frees_on_release_and_empty_cache_frees_idle():
    x = torch.randn(LARGE)
    with zfkernels.use_backend("cpu"):
        zfkernels.relu(x)
    assert memory.cache_info()["idle"] == BLOCK
    memory.empty_cache()
    assert memory.cache_info()["idle"] == 0
    memory.set_cache_limit(0)
    with zfkernels.use_backend("cpu"):
        zfkernels.relu(x)
    assert memory.cache_info()["idle"] == 0


def test_peak_tracks_the_high_water_mark():
    x = torch.randn(LARGE)
    memory.reset_peak()
    base = memory.cache_info()["in_use"]
    with zfkernels.use_backend("cpu"):
        a, b = zfkernels.relu(x), zfkernels.relu(x)
    del a, b
    info = memory.cache_info()
    assert info["peak_in_use"] == base + 2 * BLOCK
    assert info["in_use"] == base


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_set_cache_limit_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="nbytes"):
        memory.set_cache_limit(bad)


def test_environment_limit_is_validated():
    env = dict(os.environ, ZFK_CPU_CACHE_MB="lots")
    run = subprocess.run([sys.executable, "-c", "import zfkernels"], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "ZFK_CPU_CACHE_MB" in run.stderr


def test_environment_limit_is_applied():
    env = dict(os.environ, ZFK_CPU_CACHE_MB="3")
    code = "from zfkernels import memory; print(memory.cache_info()['limit'])"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(run.stdout) == 3 << 20


def test_cached_outputs_of_pool_and_unpool_are_exact():
    x = torch.randn(8, 96, 110, 110)  # pooled values are 9.3 MB: cached, like the unpooled map
    expected, indices = torch.nn.functional.max_pool2d(x.relu(), 3, 2, ceil_mode=True, return_indices=True)
    with zfkernels.use_backend("cpu"):
        values, switches = zfkernels.max_pool2d_switches(x, 3, 2, ceil_mode=True, relu=True)
        unpooled = zfkernels.max_unpool2d(values, switches, 3, 2, output_size=x.shape[-2:])
    assert memory.cache_info()["in_use"] >= 2 * BLOCK
    assert torch.equal(values, expected)
    assert torch.equal(zfkernels.switches_to_indices(switches, x.shape[-2:], 3, 2), indices)
    with zfkernels.use_backend("reference"):
        assert torch.equal(unpooled, zfkernels.max_unpool2d(values, switches, 3, 2, output_size=x.shape[-2:]))
