"""Shared fixtures and helpers for the zfkernels test suite.

Pool, unpool, gather and ReLU are exact, so most checks are bitwise (`assert_bitwise_equal`); the
transposed convolutions are compared with `assert_close_verbose`. Both print where they fail, in the
style of Liger-Kernel's verbose allclose.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, on CPU tensors: the "triton" backend
# then joins the `backend` fixture below like any other. Set before zfkernels.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zfkernels  # noqa: E402
from zfkernels.ops import _backend  # noqa: E402

# Every concrete backend this process can run on CPU tensors, which the op matrix uses ("auto" only picks one
# of these); the GPU backends on CUDA tensors are tests/test_gpu_backends.py's.
BACKENDS = [
    name for name in zfkernels.available_backends() if name != "auto" and "cpu" in _backend._runs_on(name)
]
LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@pytest.fixture(autouse=True)
def _restore_backend():
    """No test leaks its backend choice into the next one."""
    previous = zfkernels.get_backend()
    yield
    _backend._selected = previous


@pytest.fixture
def single_thread():
    """One intra-op thread: these tensors are tiny, and two OpenMP threads on a busy 2-core machine make
    torch's convolution backward 20-80x slower (barrier waits). test_backend.py runs the threaded paths."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test body under each concrete backend in turn."""
    with zfkernels.use_backend(request.param):
        yield request.param


@pytest.fixture
def grad_checks(backend):
    """gradcheck and gradgradcheck for the current backend. Under Triton's interpreter every call runs in
    Python, and a full check's finite differences (two calls per input element, at every order) take minutes
    per test; there they run in torch's fast mode (the Jacobian along random directions: a wrong gradient
    still fails), while the CPU and reference backends check every element, and other tests compare every
    backend's gradients with theirs element by element."""
    from torch.autograd import gradcheck, gradgradcheck

    fast = backend == "triton"
    return (
        lambda fn, inputs, **kw: gradcheck(fn, inputs, fast_mode=fast, **kw),
        lambda fn, inputs, **kw: gradgradcheck(fn, inputs, fast_mode=fast, **kw),
    )


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# (kernel_size, stride, padding, ceil_mode, (H, W))
POOL_CONFIGS = [
    pytest.param(3, 2, 0, True, (13, 13), id="zfnet_3s2_ceil_13"),
    pytest.param(3, 2, 0, True, (12, 11), id="3s2_ceil_partial_last_window"),
    pytest.param(3, 2, 1, True, (6, 7), id="3s2p1_ceil"),
    pytest.param(2, 2, 0, False, (8, 8), id="2s2"),
    pytest.param(2, 2, 0, True, (7, 9), id="2s2_ceil_odd"),
    pytest.param(3, 1, 1, False, (7, 6), id="3s1p1"),
    pytest.param((2, 3), (1, 2), (1, 1), False, (6, 7), id="rect_2x3_s1x2_p1"),
    pytest.param((2, 3), None, 0, True, (5, 7), id="rect_2x3_default_stride_ceil"),
    pytest.param(4, 3, 2, True, (10, 9), id="4s3p2_ceil"),
    pytest.param(1, 1, 0, False, (3, 4), id="1x1"),
    pytest.param(3, 2, 0, False, (3, 3), id="single_window"),
]


# ----------------------------------------------------------------------------------------------- inputs
def distinct(shape, dtype=torch.float64, generator=None, scale=0.25):
    """All-different values (randperm of half-integers, scaled): max-pool is differentiable, no exact zero."""
    n = 1
    for s in shape:
        n *= s
    perm = torch.randperm(n, generator=generator).to(torch.float64)
    return ((perm - n / 2 + 0.5) * scale).reshape(shape).to(dtype)


def tied(shape, dtype=torch.float32, generator=None, low=-3, high=4):
    """Small integers: many ties inside every window (and many zeros, so relu ties too)."""
    return torch.randint(low, high, shape, generator=generator).to(dtype)


def with_nans(x, generator=None, fraction=0.15):
    mask = torch.rand(x.shape, generator=generator) < fraction
    return x.masked_fill(mask, float("nan"))


def make_input(kind, shape, dtype=torch.float32, generator=None):
    if kind == "distinct":
        return distinct(shape, dtype, generator)
    if kind == "ties":
        return tied(shape, dtype, generator)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "nan":
        return with_nans(tied(shape, dtype, generator), generator)
    if kind == "neg_inf":
        # A top-left quadrant of -inf holds -inf-only windows; +inf and ties elsewhere.
        x = tied(shape, dtype, generator)
        x[..., : (shape[-2] + 1) // 2, : (shape[-1] + 1) // 2] = float("-inf")
        x[..., -1, -1] = float("inf")
        return x
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------- asserts
def _describe(tensor, index):
    value = tensor[index].item()
    bits = tensor[index].view(_BITS[tensor.dtype]).item() if tensor.dtype in _BITS else None
    return f"{value!r}" + (
        f" (bits 0x{bits & ((1 << (8 * tensor.element_size())) - 1):x})" if bits is not None else ""
    )


def _first_mismatch(actual, expected, mismatch, label):
    where = mismatch.nonzero()
    first = tuple(where[0].tolist())
    return (
        f"{label}: {where.shape[0]} of {mismatch.numel()} elements differ; first at index {first}: "
        f"actual {_describe(actual, first)}, expected {_describe(expected, first)}"
    )


def assert_bitwise_equal(actual, expected, label="tensors"):
    """Same shape and dtype and the same bits everywhere, except that any NaN matches any NaN."""
    assert isinstance(actual, torch.Tensor), f"{label}: got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{label}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{label}: device {actual.device} != {expected.device}"
    if actual.numel() == 0:
        return
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.dtype.is_floating_point:
        nan_a, nan_e = a.isnan(), e.isnan()
        if not torch.equal(nan_a, nan_e):
            raise AssertionError(_first_mismatch(a, e, nan_a ^ nan_e, f"{label} (NaN positions)"))
        same = a.view(_BITS[a.dtype]) == e.view(_BITS[e.dtype])  # bits: -0.0 differs from +0.0
        mismatch = ~(same | nan_a)
    else:
        mismatch = a != e
    if mismatch.any():
        raise AssertionError(_first_mismatch(a, e, mismatch, label))


def assert_close_verbose(actual, expected, rtol, atol, label="tensors"):
    """allclose that reports the count and the worst and first offending elements."""
    assert actual.shape == expected.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{label}: dtype {actual.dtype} != {expected.dtype}"
    if actual.numel() == 0:
        return
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        error = (a - e).abs().masked_fill(~bad, 0)
        worst = tuple(torch.unravel_index(error.argmax(), error.shape))
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            _first_mismatch(a, e, bad, f"{label} (rtol={rtol}, atol={atol})")
            + f"; worst at {worst}: {a[worst].item()!r} vs {e[worst].item()!r}"
        )


def max_abs_error(actual, reference):
    return (actual.double() - reference.double()).abs().max().item() if actual.numel() else 0.0


# ----------------------------------------------------------------------------------------- references
def loop_unpool(values, switches, kernel, stride, padding, output_size, relu=False, acc_dtype=None):
    """Explicit loops over pooled positions in row-major order: the unpool semantics, spelled out.

    `switches` are window-local offsets (or int64 flat indices); sums are kept in float32 for
    fp16/bf16 (float64 stays float64) and rounded once at the end, unless `acc_dtype` says otherwise.
    """
    kh_, kw_ = kernel
    sh, sw = stride
    ph, pw = padding
    out_h, out_w = output_size
    n, c, ph_out, pw_out = values.shape
    if acc_dtype is None:
        acc_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    flat = switches.dtype == torch.int64
    out = torch.zeros(n, c, out_h, out_w, dtype=acc_dtype)
    vals = values.to(acc_dtype)
    for b, ch, oh, ow in itertools.product(range(n), range(c), range(ph_out), range(pw_out)):
        s = int(switches[b, ch, oh, ow])
        if flat:
            ih, iw = divmod(s, out_w)
        else:
            ih, iw = oh * sh - ph + s // kw_, ow * sw - pw + s % kw_
        out[b, ch, ih, iw] += vals[b, ch, oh, ow]
    if relu:
        out = torch.relu(out)
    return out.to(values.dtype)


def backend_outputs(fn, *args, **kwargs):
    """{backend: fn(*args, **kwargs)} over every concrete backend."""
    results = {}
    for name in BACKENDS:
        with zfkernels.use_backend(name):
            results[name] = fn(*args, **kwargs)
    return results


def invalid_switch_cases():
    """(values, switches, kernel, stride, padding, output_size) whose switches leave their window."""
    x = torch.arange(49.0).view(1, 1, 7, 7)
    cases = {}
    values, switches = zfkernels.max_pool2d_switches(x, 3, 2)
    bad = switches.clone()
    bad[0, 0, 1, 2] = 9  # a 3x3 window has offsets 0..8
    cases["offset_9_of_3x3"] = (values, bad, 3, 2, 0, (7, 7))
    bad = switches.to(torch.int16)
    bad[0, 0, 0, 0] = -1
    cases["negative_int16"] = (values, bad, 3, 2, 0, (7, 7))
    bad = switches.clone()
    bad[0, 0, 2, 2] = 255
    cases["offset_255_uint8"] = (values, bad, 3, 2, 0, (7, 7))
    # padding 1: offset 0 of the first window is the padding corner (-1, -1)
    padded_values, padded = zfkernels.max_pool2d_switches(x[..., :5, :5], 3, 2, 1)
    padded = padded.clone()
    padded[0, 0, 0, 0] = 0
    cases["on_padding"] = (padded_values, padded, 3, 2, 1, (5, 5))
    # ceil_mode on 6x6: the last window covers rows/columns 4..6, and 6 is past the border
    ceil_values, ceil_switches = zfkernels.max_pool2d_switches(x[..., :6, :6], 3, 2, ceil_mode=True)
    beyond = ceil_switches.clone()
    beyond[0, 0, 2, 2] = 8
    cases["beyond_border_ceil"] = (ceil_values, beyond, 3, 2, 0, (6, 6))
    indices = zfkernels.switches_to_indices(switches, (7, 7), 3, 2)
    outside = indices.clone()
    outside[0, 0, 0, 0] = 48  # inside the image, but not inside window (0, 0)
    cases["int64_outside_window"] = (values, outside, 3, 2, 0, (7, 7))
    outside = indices.clone()
    outside[0, 0, 2, 1] = 49
    cases["int64_past_the_end"] = (values, outside, 3, 2, 0, (7, 7))
    outside = indices.clone()
    outside[0, 0, 1, 1] = -1
    cases["int64_negative"] = (values, outside, 3, 2, 0, (7, 7))
    return cases
