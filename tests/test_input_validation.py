"""Inputs the ops refuse as torch does, with a ValueError/TypeError that names the argument (issue 12).

Each case here was once accepted with a silently wrong or empty result, or failed with an unclear error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zfkernels

INT32_MAX = 2**31 - 1


def _pooled(shape=(1, 2, 4, 4)):
    return zfkernels.max_pool2d_switches(torch.randn(shape), 2)


# ------------------------------------------------------------------- empty planes, as torch refuses them
@pytest.mark.parametrize("shape", [(1, 0, 50, 32), (1, 2, 0, 6), (1, 2, 6, 0), (0, 6, 6), (2, 0, 6)])
def test_pool_refuses_empty_planes_like_torch(backend, shape):
    x = torch.randn(shape)
    with pytest.raises(RuntimeError):
        F.max_pool2d(x, 3, 2)  # torch refuses these shapes too
    with pytest.raises(ValueError, match="input must have non-zero channels, height and width"):
        zfkernels.max_pool2d_switches(x, 3, 2)


def test_empty_batch_is_still_fine(backend):
    values, switches = zfkernels.max_pool2d_switches(torch.randn(0, 2, 6, 6), 3, 2)
    assert values.shape == switches.shape == (0, 2, 2, 2)
    assert zfkernels.max_unpool2d(values, switches, 3, 2, output_size=(6, 6)).shape == (0, 2, 6, 6)


@pytest.mark.parametrize("shape", [(1, 0, 2, 2), (1, 2, 0, 2), (1, 2, 2, 0)])
def test_unpool_gather_and_fused_refuse_empty_planes(backend, shape):
    values = torch.randn(shape)
    switches = torch.zeros(shape, dtype=torch.uint8)
    with pytest.raises(ValueError, match="values must have non-zero channels, height and width"):
        zfkernels.max_unpool2d(values, switches, 2)
    with pytest.raises(ValueError, match="values must have non-zero channels, height and width"):
        zfkernels.unpool_conv_transpose2d(
            values, switches, torch.randn(shape[1], 3, 3, 3), pool_kernel_size=2, unpool_size=(4, 4)
        )
    with pytest.raises(ValueError, match="switches must have non-zero channels, height and width"):
        zfkernels.gather_switches(torch.randn(1, shape[1] or 1, 4, 4), switches, 2)
    with pytest.raises(ValueError, match="switches must have non-zero channels, height and width"):
        zfkernels.switches_to_indices(switches, (4, 4), 2)


# ------------------------------------------------------------------------------ zero-size kernels
def test_conv_transpose_refuses_zero_size_kernels(backend):
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError):
        F.conv_transpose2d(x, torch.randn(4, 2, 0, 3))
    for weight_shape in [(4, 2, 0, 3), (4, 2, 3, 0), (4, 0, 3, 3)]:
        with pytest.raises(ValueError, match="weight must not have a zero-size dimension"):
            zfkernels.conv_transpose2d(x, torch.randn(weight_shape))
    values, switches = _pooled((1, 4, 4, 4))
    with pytest.raises(ValueError, match="weight must not have a zero-size dimension"):
        zfkernels.unpool_conv_transpose2d(
            values, switches, torch.randn(4, 2, 0, 3), pool_kernel_size=2, unpool_size=(4, 4)
        )


def test_conv_transpose_refuses_empty_input_planes(backend):
    with pytest.raises(ValueError, match="input must have non-zero height and width"):
        zfkernels.conv_transpose2d(torch.randn(1, 4, 0, 5), torch.randn(4, 2, 3, 3))


# ---------------------------------------------------------------------- geometry beyond int32
def test_switches_cannot_wrap_for_huge_windows(backend):
    """The issue's case: a (1, 2**32 + 1) window returned negative int32 switches."""
    x = torch.tensor([[[[1.0, 5.0, 2.0]]]])
    with pytest.raises(ValueError, match="kernel_size must be at most 2\\*\\*31 - 1"):
        zfkernels.max_pool2d_switches(x, (1, 2**32 + 1), 1, (0, 2**31))
    # Each side fits int32, the window does not: its int32 switches would wrap.
    with pytest.raises(ValueError, match=r"kernel_size \(65536, 65536\) spans 4294967296 elements"):
        zfkernels.max_pool2d_switches(x, (2**16, 2**16), 1, (2**15, 2**15))


@pytest.mark.parametrize("name", ["kernel_size", "stride", "padding"])
def test_pool_geometry_beyond_int32_names_the_argument(backend, name):
    arguments = {"kernel_size": 2, "stride": 2, "padding": 0}
    arguments[name] = 2**70
    with pytest.raises(ValueError, match=f"{name} must be at most 2\\*\\*31 - 1"):
        zfkernels.max_pool2d_switches(torch.randn(1, 1, 4, 4), **arguments)


@pytest.mark.parametrize("name", ["stride", "padding", "output_padding", "dilation"])
def test_conv_transpose_geometry_beyond_int32_names_the_argument(backend, name):
    with pytest.raises(ValueError, match=f"{name} must be at most 2\\*\\*31 - 1"):
        zfkernels.conv_transpose2d(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 1, 1), **{name: 2**31})


def test_unpool_output_size_beyond_int32_names_the_argument(backend):
    values, switches = _pooled()
    with pytest.raises(ValueError, match="output_size must be at most 2\\*\\*31 - 1"):
        zfkernels.max_unpool2d(values, switches, 2, output_size=(4, 2**40))


def test_largest_int32_geometry_is_accepted(backend):
    x = torch.tensor([[[[1.0, 5.0, 2.0]]]])
    values, switches = zfkernels.max_pool2d_switches(x, (1, 3), INT32_MAX, (0, 1))
    assert values.tolist() == [[[[5.0]]]]
    expected = F.max_pool2d(x, (1, 3), INT32_MAX, (0, 1), return_indices=True)[1]
    assert torch.equal(zfkernels.switches_to_indices(switches, (1, 3), (1, 3), INT32_MAX, (0, 1)), expected)


# ---------------------------------------------------------- switches_to_indices validates in every mode
def test_switches_to_indices_validates_under_torch_compile():
    """Compiled, it once skipped validation and returned [400, 402, 408, 410] for a 16-element plane."""
    convert = torch.compile(lambda s: zfkernels.switches_to_indices(s, (4, 4), 2), fullgraph=True)
    with pytest.raises(ValueError, match="switches has 4 entries outside their pooling window"):
        convert(torch.full((1, 1, 2, 2), 200, dtype=torch.uint8))
    good = zfkernels.max_pool2d_switches(torch.randn(1, 1, 4, 4), 2)[1]
    assert torch.equal(convert(good), zfkernels.switches_to_indices(good, (4, 4), 2))


def test_switches_to_indices_input_size_is_checked():
    switches = _pooled()[1]
    with pytest.raises(ValueError, match="input_size must be >= 1"):
        zfkernels.switches_to_indices(switches, (0, 4), 2)
    with pytest.raises(TypeError, match="input_size must be a sequence ending in"):
        zfkernels.switches_to_indices(switches, 4, 2)


# ---------------------------------------------------------------------------------- any rank for ReLU
def test_relu_takes_any_rank_like_torch(backend, gen):
    x = torch.randn([2] * 10, generator=gen)  # it once refused more than 8 dimensions
    assert torch.equal(zfkernels.relu(x), torch.relu(x))
    assert torch.equal(zfkernels.relu(x, backward="guided"), torch.relu(x))
