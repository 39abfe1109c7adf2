"""PyTorch's own OpInfo samples and error inputs, run through our ops: a test suite nobody here wrote.

From `torch.testing._internal.common_methods_invocations.op_db`: the `sample_inputs` of
nn.functional.max_pool2d, nn.functional.max_unpool2d (and its "grad" variant), nn.functional.conv_transpose2d
and nn.functional.relu (its `reference_inputs`, which start with its `sample_inputs` and add extremal values,
large and empty tensors and strided layouts), for every dtype torch's CPU op takes, and their
`error_inputs`, plus the MaxPool2d `module_error_inputs` of `common_modules.module_db`. Our result must equal
torch's: bit for bit for pool, unpool and ReLU, allclose for the transposed convolution. Where zfkernels
differs on purpose, the difference is listed in tests/upstream_differences.py and asserted here instead.

Each test loops over all samples of one (op, dtype, backend) and reports every sample that differs, with
the sample, before failing. The "triton" backend runs in Triton's CPU interpreter (~25 ms a launch), so it
takes every 10th sample, float32 only.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db
from torch.testing._internal.opinfo.core import SampleInput
from upstream_differences import expected

import zfkernels as zk

pytestmark = pytest.mark.usefixtures("single_thread")

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
TRITON_EVERY = 10  # the triton backend (interpreted on CPU) takes every 10th sample, float32 only
NAMED_ARGUMENT_ERRORS = (ValueError, TypeError)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------- OpInfos
@functools.cache
def opinfo(name: str, variant: str = ""):
    matches = [o for o in op_db if o.name == name and o.variant_test_name == variant]
    assert len(matches) == 1, f"op_db has {len(matches)} OpInfos named {name!r} (variant {variant!r})"
    return matches[0]


def relu_opinfos() -> list[str]:
    """nn.functional.relu, and a plain "relu" / "torch.relu" OpInfo where torch has one (2.14 has not)."""
    names = {o.name for o in op_db}
    return ["nn.functional.relu"] + [name for name in ("relu", "torch.relu") if name in names]


@functools.cache
def samples(name: str, dtype: torch.dtype, variant: str = "", kind: str = "sample", requires_grad=False):
    """The OpInfo's samples (or reference inputs), generated once per process."""
    info = opinfo(name, variant)
    if not info.supports_dtype(dtype, "cpu"):
        return ()
    make = info.reference_inputs if kind == "reference" else info.sample_inputs
    return tuple(make("cpu", dtype, requires_grad=requires_grad))


def subset(items, backend: str):
    return items[::TRITON_EVERY] if backend == "triton" else items


def backend_dtypes(backends=BACKENDS, dtypes=FLOAT_DTYPES, triton=True):
    """(backend, dtype) pairs: every float dtype on the CPU-tensor backends, float32 only on triton."""
    return [
        pytest.param(backend, dtype, id=f"{backend}-{dtype_id(dtype)}")
        for backend in backends
        if triton or backend != "triton"
        for dtype in (dtypes if backend != "triton" else (torch.float32,))
    ]


CPU_BACKENDS = [b for b in BACKENDS if b != "triton"]  # float64 backward / forward-AD checks


# ---------------------------------------------------------------------------------------------- helpers
def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        layout = "" if value.is_contiguous() else f" strides {value.stride()}"
        return f"{dtype_id(value.dtype)}{tuple(value.shape)}{layout}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={describe(v)}" for k, v in value.items()) + "}"
    return repr(value)


def describe_sample(index: int, sample) -> str:
    return (
        f"sample #{index}: input {describe(sample.input)}, args {describe(sample.args)}, "
        f"kwargs {describe(sample.kwargs)}"
    )


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(mask.nonzero()[0].tolist())


def _value(t: torch.Tensor, where) -> str:
    v = t[where]
    bits = (
        f" (bits 0x{v.view(_BITS[t.dtype]).item() & ((1 << 8 * t.element_size()) - 1):x})"
        if t.dtype in _BITS
        else ""
    )
    return f"{v.item()!r}{bits}"


def bits_differ(actual, wanted, label: str, *, any_nan: bool = False) -> str | None:
    """None if `actual` has `wanted`'s shape, dtype and bits (any NaN matches any NaN if `any_nan`)."""
    if not isinstance(actual, torch.Tensor):
        return f"{label}: got {type(actual).__name__}, not a tensor"
    if actual.shape != wanted.shape or actual.dtype != wanted.dtype:
        return f"{label}: {describe(actual)} where torch has {describe(wanted)}"
    if actual.numel() == 0:
        return None
    a, w = actual.detach(), wanted.detach()
    if a.dtype in _BITS:
        mismatch = a.contiguous().view(_BITS[a.dtype]) != w.contiguous().view(_BITS[w.dtype])
        if any_nan:
            mismatch &= ~(a.isnan() & w.isnan())
    else:
        mismatch = a != w
    if not mismatch.any():
        return None
    where = _first(mismatch)
    return (
        f"{label}: {int(mismatch.sum())} of {mismatch.numel()} elements differ, first at {where}: "
        f"{_value(a, where)} where torch has {_value(w, where)}"
    )


def not_close(actual, wanted, label: str, rtol: float, atol: float) -> str | None:
    """None if close (NaN matching NaN, each infinity itself)."""
    if actual.shape != wanted.shape or actual.dtype != wanted.dtype:
        return f"{label}: {describe(actual)} where torch has {describe(wanted)}"
    if actual.numel() == 0:
        return None
    a, w = actual.detach().double(), wanted.detach().double()
    bad = ~torch.isclose(a, w, rtol=rtol, atol=atol, equal_nan=True)
    if not bad.any():
        return None
    where = _first(bad)
    worst = (a - w).abs().nan_to_num(float("inf")).masked_fill(~bad, 0).max().item()
    return (
        f"{label} (rtol={rtol}, atol={atol}): {int(bad.sum())} of {bad.numel()} elements differ, first at "
        f"{where}: {a[where].item()!r} where torch has {w[where].item()!r}; largest difference {worst!r}"
    )


def names_argument(message: str, names) -> bool:
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", message) for name in names)


def raises_naming(names, label: str, fn, *args, **kwargs) -> str | None:
    """None if fn(*args, **kwargs) raises ValueError/TypeError whose message names one of `names`."""
    wanted = " or ".join(names)
    try:
        result = fn(*args, **kwargs)
    except NAMED_ARGUMENT_ERRORS as error:
        if names_argument(str(error), names):
            return None
        return f"{label}: {type(error).__name__}({str(error)[:200]!r}) does not name {wanted}"
    except Exception as error:  # noqa: BLE001 - which exception is the finding
        return (
            f"{label}: raised {type(error).__name__}({str(error)[:200]!r}); wanted ValueError or TypeError "
            f"naming {wanted}"
        )
    return f"{label}: returned {describe(result)} instead of raising (wanted an error naming {wanted})"


def half_nan_bits_aside(ours, theirs, label: str, findings: Findings) -> str | None:
    """bits_differ, except that for float16/bfloat16 a NaN where torch has a NaN with other bits is the
    listed difference "half_precision.nan_bits" (asserted: NaN exactly where torch has NaN)."""
    problem = bits_differ(ours, theirs, label)
    if problem and ours.dtype in HALF_DTYPES and not bits_differ(ours, theirs, label, any_nan=True):
        findings.difference("half_precision.nan_bits")
        return None
    return problem


class Findings:
    """Collects every differing sample of one test, and the expected differences it asserted."""

    def __init__(self, label: str):
        self.label = label
        self.failures: list[str] = []
        self.checked = 0
        self.differences: Counter[str] = Counter()

    def sample(self, where: str, *problems: str | None) -> None:
        self.checked += 1
        problems = [p for p in problems if p]
        if problems:
            self.failures.append(f"{where}\n      " + "\n      ".join(problems))

    def difference(self, key: str) -> None:
        expected(key)  # must be listed
        self.differences[key] += 1

    def finish(self, must_assert=()) -> None:
        assert self.checked > 0, f"{self.label}: no samples"
        shown = "\n  ".join(self.failures[:25])
        more = f"\n  ... and {len(self.failures) - 25} more" if len(self.failures) > 25 else ""
        assert not self.failures, (
            f"{self.label}: {len(self.failures)} of {self.checked} samples differ from torch:"
            f"\n  {shown}{more}"
        )
        for key in must_assert:
            assert self.differences[key] > 0, f"{self.label}: expected difference {key!r} was never asserted"


def with_extremes(x: torch.Tensor) -> torch.Tensor:
    """x with a NaN, a +inf and a -inf at fixed positions (x's layout kept): OpInfo's extremal values."""
    n = x.numel()
    if n < 3 or not x.dtype.is_floating_point:
        return x
    code = torch.zeros(n, dtype=torch.int8)
    code[n // 7], code[n // 2], code[(5 * n) // 6] = 1, 2, 3
    code = code.view(x.shape)
    y = x.detach().clone()
    y[code == 1], y[code == 2], y[code == 3] = float("nan"), float("inf"), float("-inf")
    return y


def seeded_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)


# ============================================================================================= max_pool2d
MAX_POOL = "nn.functional.max_pool2d"


def pool_call(sample):
    """(our kwargs, dilation) for a max_pool2d sample: return_indices is not an argument of ours."""
    kwargs = dict(sample.kwargs)
    kwargs.pop("return_indices", None)
    dilation = kwargs.pop("dilation", 1)
    return kwargs, dilation


def is_one(value) -> bool:
    return value == 1 or (isinstance(value, (tuple, list)) and all(v == 1 for v in value))


def check_pool_forward(x, kwargs, label: str) -> list[str | None]:
    problems = []
    for relu in (False, True):
        name = f"{label}{' relu=True' if relu else ''}"
        want_values, want_indices = F.max_pool2d(F.relu(x) if relu else x, return_indices=True, **kwargs)
        values, switches = zk.max_pool2d_switches(x, relu=relu, **kwargs)
        problems.append(bits_differ(values, want_values, f"{name} values"))
        indices = zk.switches_to_indices(
            switches, x.shape, kwargs["kernel_size"], kwargs.get("stride"), kwargs.get("padding", 0)
        )
        problems.append(bits_differ(indices, want_indices, f"{name} switches_to_indices"))
    return problems


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_max_pool2d_samples(backend, dtype):
    """Values bit-equal (with and without ReLU), switches_to_indices equal to torch's indices; the same with
    a NaN and both infinities in the input; dilated samples raise TypeError naming `dilation`."""
    findings = Findings(f"max_pool2d {backend} {dtype_id(dtype)}")
    with zk.use_backend(backend):
        for index, sample in subset(list(enumerate(samples(MAX_POOL, dtype))), backend):
            x = sample.input
            kwargs, dilation = pool_call(sample)
            where = describe_sample(index, sample)
            if not is_one(dilation):
                findings.difference("max_pool2d.dilation")
                findings.sample(
                    where,
                    raises_naming(
                        ["dilation"], "dilation", zk.max_pool2d_switches, x, dilation=dilation, **kwargs
                    ),
                )
                continue
            findings.difference("max_pool2d.switches_not_indices")
            findings.sample(
                where,
                *check_pool_forward(x, kwargs, "input"),
                *check_pool_forward(with_extremes(x), kwargs, "extremal"),
            )
    findings.finish(["max_pool2d.dilation", "max_pool2d.switches_not_indices"])


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=dtype_id)
def test_max_pool2d_integer_samples_raise(dtype):
    """Every 4th sample: the dtype is checked before anything else, so the rest would repeat the same call."""
    findings = Findings(f"max_pool2d {dtype_id(dtype)}")
    for index, sample in enumerate(samples(MAX_POOL, dtype)[::4]):
        kwargs, dilation = pool_call(sample)
        if is_one(dilation):
            F.max_pool2d(sample.input, **kwargs)  # torch takes it
        findings.difference("max_pool2d.integer_dtypes")
        findings.sample(
            describe_sample(index * 4, sample),
            raises_naming(["input"], "integer input", zk.max_pool2d_switches, sample.input, **kwargs),
        )
    findings.finish(["max_pool2d.integer_dtypes"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_max_pool2d_backward_float64(backend):
    """The gradient of every float64 sample (plain and fused with ReLU) equals torch's bit for bit."""
    findings = Findings(f"max_pool2d backward {backend}")
    with zk.use_backend(backend):
        for index, sample in enumerate(samples(MAX_POOL, torch.float64, requires_grad=True)):
            kwargs, dilation = pool_call(sample)
            if not is_one(dilation):
                continue  # asserted to raise by test_max_pool2d_samples
            x = sample.input
            problems = []
            for relu in (False, True):
                want = F.max_pool2d(F.relu(x) if relu else x, **kwargs)
                grad_out = seeded_like(want, index)
                (want_grad,) = torch.autograd.grad(want, x, grad_out)
                values, _ = zk.max_pool2d_switches(x, relu=relu, **kwargs)
                (grad,) = torch.autograd.grad(values, x, grad_out)
                problems.append(bits_differ(grad, want_grad, f"grad{' relu=True' if relu else ''}"))
            findings.sample(describe_sample(index, sample), *problems)
    findings.finish()


# =========================================================================================== max_unpool2d
MAX_UNPOOL = "nn.functional.max_unpool2d"


def shares_argmax(indices: torch.Tensor) -> bool:
    flat = indices.flatten(-2).sort(-1).values
    return bool((flat[..., 1:] == flat[..., :-1]).any())


def summing_oracle(values: torch.Tensor, indices: torch.Tensor, output_size) -> torch.Tensor:
    """Unpool that sums at shared argmaxes, in row-major pooled order (scatter_add_ is sequential on CPU);
    fp16/bf16 accumulate in fp32 and round once."""
    accumulate = torch.float64 if values.dtype == torch.float64 else torch.float32
    n, c = values.shape[:2]
    h, w = output_size[-2:]
    out = torch.zeros(n, c, h * w, dtype=accumulate)
    out.scatter_add_(2, indices.flatten(2), values.detach().to(accumulate).flatten(2))
    return out.view(n, c, h, w).to(values.dtype)


def check_unpool(values, indices, kwargs, label: str, findings: Findings) -> list[str | None]:
    ours = zk.max_unpool2d(values, indices, **kwargs)
    theirs = F.max_unpool2d(values, indices, **kwargs)
    if not shares_argmax(indices):
        return [half_nan_bits_aside(ours, theirs, label, findings)]
    findings.difference("max_unpool2d.sums_shared_argmax")
    oracle = summing_oracle(values, indices, kwargs["output_size"])
    hits = torch.zeros(oracle.shape[:2] + (oracle.shape[-2] * oracle.shape[-1],), dtype=torch.int64)
    hits.scatter_add_(2, indices.flatten(2), torch.ones_like(indices).flatten(2))
    single = hits.view(oracle.shape) <= 1
    return [  # a NaN that a sum creates (inf - inf) has no specified bits: there any NaN matches
        bits_differ(ours, oracle, f"{label} vs the summing oracle", any_nan=True),
        half_nan_bits_aside(ours[single], theirs[single], f"{label} where no argmax is shared", findings),
    ]


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_max_unpool2d_samples(backend, dtype):
    """torch's indices in: bit-equal to F.max_unpool2d where no two windows share an argmax, equal to the
    summing oracle where they do; the same with a NaN and both infinities among the values."""
    findings = Findings(f"max_unpool2d {backend} {dtype_id(dtype)}")
    with zk.use_backend(backend):
        for index, sample in subset(list(enumerate(samples(MAX_UNPOOL, dtype))), backend):
            values, (indices,), kwargs = sample.input, sample.args, sample.kwargs
            findings.sample(
                describe_sample(index, sample),
                *check_unpool(values, indices, kwargs, "unpool", findings),
                *check_unpool(with_extremes(values), indices, kwargs, "unpool extremal", findings),
            )
    findings.finish(["max_unpool2d.sums_shared_argmax"])


@pytest.mark.parametrize("variant", ["", "grad"], ids=["samples", "grad_variant"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_max_unpool2d_backward_float64(backend, variant):
    """The gradient w.r.t. the values is a gather at the indices on both sides (torch's derivative of its
    overwriting unpool is that gather too), so it is bit-equal even where argmaxes are shared."""
    findings = Findings(f"max_unpool2d{' grad' if variant else ''} backward {backend}")
    with zk.use_backend(backend):
        for index, sample in enumerate(samples(MAX_UNPOOL, torch.float64, variant, requires_grad=True)):
            values, (indices,), kwargs = sample.input, sample.args, sample.kwargs
            want = F.max_unpool2d(values, indices, **kwargs)
            grad_out = seeded_like(want, index)
            (want_grad,) = torch.autograd.grad(want, values, grad_out)
            (grad,) = torch.autograd.grad(zk.max_unpool2d(values, indices, **kwargs), values, grad_out)
            findings.sample(describe_sample(index, sample), bits_differ(grad, want_grad, "grad"))
    findings.finish()


# ======================================================================================= conv_transpose2d
CONV_TRANSPOSE = "nn.functional.conv_transpose2d"


def conv_args(sample):
    weight, bias = sample.args
    return sample.input, weight, bias, sample.kwargs


@functools.cache
def conv_samples(dtype: torch.dtype, requires_grad: bool = False):
    """The OpInfo's samples, then ModuleInfo's nn.ConvTranspose2d inputs (module_db: 4 -> 5 channels, the
    only upstream samples with more than 4 output channels) as functional calls with the module's weights."""
    found = list(samples(CONV_TRANSPOSE, dtype, requires_grad=requires_grad))
    if dtype not in FLOAT_DTYPES:
        return tuple(found)
    (info,) = [m for m in module_db if m.module_cls is torch.nn.ConvTranspose2d]
    for module_input in info.module_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=False
    ):
        with torch.random.fork_rng():
            torch.manual_seed(len(found))
            module = torch.nn.ConvTranspose2d(
                *module_input.constructor_input.args, **module_input.constructor_input.kwargs
            )
        weight, bias = (
            p.detach().to(dtype).requires_grad_(requires_grad) for p in (module.weight, module.bias)
        )
        kwargs = {
            "stride": module.stride,
            "padding": module.padding,
            "output_padding": module.output_padding,
            "groups": module.groups,
            "dilation": module.dilation,
        }
        (x,) = module_input.forward_input.args
        found.append(SampleInput(x, args=(weight, bias), kwargs=kwargs))
    return tuple(found)


def nonfinite_differ(ours, theirs, label: str) -> str | None:
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        mismatch = test(ours) != test(theirs)
        if mismatch.any():
            where = _first(mismatch)
            return (
                f"{label}: {name} positions differ at {int(mismatch.sum())} of {mismatch.numel()} elements, "
                f"first at {where}: {ours[where].item()!r} where torch has {theirs[where].item()!r}"
            )
    return None


def check_conv_transpose(x, weight, bias, kwargs, label: str) -> list[str | None]:
    ours = zk.conv_transpose2d(x, weight, bias, **kwargs)
    theirs = F.conv_transpose2d(x, weight, bias, **kwargs)
    wide = F.conv_transpose2d(x.double(), weight.double(), None if bias is None else bias.double(), **kwargs)
    return conv_problems(ours, theirs, wide, label, weight)


def nonfinite_oracle(theirs, wide, weight):
    """Where NaN and inf belong: torch's result, except with a NaN/inf weight below float64, where torch's CPU
    path (oneDNN) also multiplies padding by the weight (difference conv_transpose2d.nonfinite_weight):
    there the float64 computation, which forms only the real products."""
    if theirs.dtype != torch.float64 and not bool(weight.isfinite().all()):
        expected("conv_transpose2d.nonfinite_weight")
        return wide.to(theirs.dtype)
    return theirs


def conv_problems(ours, theirs, wide, label: str, weight) -> list[str | None]:
    """The tolerances of tests/test_conv_transpose.py's check_conv against torch's result `theirs` and a
    float64 computation `wide`; NaN and infinities exactly where torch has them (see nonfinite_oracle)."""
    finite = wide.isfinite()
    scale = max(1.0, wide[finite].abs().max().item()) if finite.any() else 1.0
    nonfinite = nonfinite_differ(ours, nonfinite_oracle(theirs, wide, weight), label)
    if nonfinite:
        return [nonfinite]  # the closeness checks would only repeat it
    problems = []
    if ours.dtype == torch.float64:
        problems.append(not_close(ours, theirs, label, 1e-10, 1e-10 * scale))
    elif ours.dtype == torch.float32:
        problems.append(not_close(ours, theirs, label, 1e-4, 1e-5 * scale))
        problems.append(not_close(ours, wide.float(), f"{label} vs float64", 1e-4, 1e-5 * scale))
    else:  # flash-attention's rule: at most twice torch's own error against the float64 computation
        both = finite & ours.isfinite() & theirs.isfinite()
        error = (ours.double() - wide)[both].abs().max().item() if both.any() else 0.0
        torch_error = (theirs.double() - wide)[both].abs().max().item() if both.any() else 0.0
        if not error <= 2 * torch_error + 1e-5:
            problems.append(f"{label}: error {error!r} against float64 > 2 x torch's {torch_error!r}")
    return problems


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_conv_transpose2d_samples(backend, dtype):
    """allclose to F.conv_transpose2d (fp16/bf16: within 2x torch's error against float64), and with a NaN
    and both infinities in the input, or in the weight, NaN/inf exactly where torch has them."""
    findings = Findings(f"conv_transpose2d {backend} {dtype_id(dtype)}")
    every = 2 if backend == "triton" else 1  # only 14 samples: triton takes every 2nd
    with zk.use_backend(backend):
        for index, sample in list(enumerate(conv_samples(dtype)))[::every]:
            x, weight, bias, kwargs = conv_args(sample)
            findings.difference("conv_transpose2d.rounding")
            findings.sample(
                describe_sample(index, sample),
                *check_conv_transpose(x, weight, bias, kwargs, "conv_transpose2d"),
                *check_conv_transpose(with_extremes(x), weight, bias, kwargs, "extremal input"),
                *check_conv_transpose(x, with_extremes(weight), bias, kwargs, "extremal weight"),
            )
    findings.finish()


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.complex128], ids=dtype_id)
def test_conv_transpose2d_integer_and_complex_samples_raise(dtype):
    findings = Findings(f"conv_transpose2d {dtype_id(dtype)}")
    for index, sample in enumerate(conv_samples(dtype)):
        x, weight, bias, kwargs = conv_args(sample)
        F.conv_transpose2d(x, weight, bias, **kwargs)  # torch takes it
        findings.difference("conv_transpose2d.integer_complex_dtypes")
        findings.sample(
            describe_sample(index, sample),
            raises_naming(["input"], dtype_id(dtype), zk.conv_transpose2d, x, weight, bias, **kwargs),
        )
    findings.finish(["conv_transpose2d.integer_complex_dtypes"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_transpose2d_backward_float64(backend):
    findings = Findings(f"conv_transpose2d backward {backend}")
    with zk.use_backend(backend):
        for index, sample in enumerate(conv_samples(torch.float64, requires_grad=True)):
            x, weight, bias, kwargs = conv_args(sample)
            leaves = [t for t in (x, weight, bias) if t is not None]
            want = F.conv_transpose2d(x, weight, bias, **kwargs)
            grad_out = seeded_like(want, index)
            want_grads = torch.autograd.grad(want, leaves, grad_out)
            grads = torch.autograd.grad(zk.conv_transpose2d(x, weight, bias, **kwargs), leaves, grad_out)
            findings.sample(
                describe_sample(index, sample),
                *(
                    not_close(g, w, f"grad {name}", 1e-10, 1e-10 * max(1.0, w.abs().max().item()))
                    for name, g, w in zip(("input", "weight", "bias"), grads, want_grads, strict=False)
                ),
            )
    findings.finish()


# ================================================================================ unpool_conv_transpose2d
# (out channels, stride, padding, output_padding) of the transposed conv composed with each unpool sample:
# up to 4 output channels (an RGB first layer) and more take different CPU kernels
FUSED_CONVS = ((3, 1, 0, 0), (8, 2, 1, 1))


def check_fused(values, indices, weight, kwargs, conv, label: str) -> list[str | None]:
    """The fused deconvnet step against torch's three ops: relu(unpool (summing)) -> conv_transpose2d."""
    stride, padding, output_padding = conv
    ours = zk.unpool_conv_transpose2d(
        values,
        indices,
        weight,
        pool_kernel_size=kwargs["kernel_size"],
        pool_stride=kwargs["stride"],
        pool_padding=kwargs["padding"],
        unpool_size=kwargs["output_size"],
        stride=stride,
        padding=padding,
        output_padding=output_padding,
    )
    conv_kwargs = {"stride": stride, "padding": padding, "output_padding": output_padding}
    unpooled = summing_oracle(values, indices, kwargs["output_size"])
    theirs = F.conv_transpose2d(F.relu(unpooled), weight, **conv_kwargs)
    unpooled_wide = summing_oracle(values.double(), indices, kwargs["output_size"])
    wide = F.conv_transpose2d(F.relu(unpooled_wide), weight.double(), **conv_kwargs)
    return conv_problems(ours, theirs, wide, label, weight)


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_unpool_conv_transpose2d_on_unpool_samples(backend, dtype):
    """Not an OpInfo of its own: the fused op on every max_unpool2d sample (torch's int64 indices), each
    composed with a transposed conv, against F.relu -> summing unpool -> F.conv_transpose2d, at
    conv_transpose2d's tolerances; with a NaN and both infinities among the values, or in the weight,
    NaN/inf exactly where torch's composition has them. Every 2nd sample (triton: every 48th)."""
    findings = Findings(f"unpool_conv_transpose2d {backend} {dtype_id(dtype)}")
    every = 48 if backend == "triton" else 2  # an add-on to the upstream suite: kept to ~1/6 of its time
    with zk.use_backend(backend):
        for index, sample in list(enumerate(samples(MAX_UNPOOL, dtype)))[::every]:
            values, (indices,), kwargs = sample.input, sample.args, sample.kwargs
            problems = []
            for out_channels, *conv in FUSED_CONVS:
                weight = seeded_like(torch.empty(values.shape[1], out_channels, 3, 3, dtype=dtype), index)
                name = f"{out_channels} out channels"
                problems += check_fused(values, indices, weight, kwargs, conv, name)
                problems += check_fused(
                    with_extremes(values), indices, weight, kwargs, conv, f"{name}, extremal values"
                )
                problems += check_fused(
                    values, indices, with_extremes(weight), kwargs, conv, f"{name}, extremal weight"
                )
            findings.sample(describe_sample(index, sample), *problems)
    findings.finish()


# =================================================================================================== relu
def relu_samples(name: str, dtype: torch.dtype, requires_grad=False):
    """reference_inputs where the OpInfo has them (they begin with the sample_inputs), else sample_inputs."""
    kind = "reference" if opinfo(name).reference_inputs_func is not None else "sample"
    return samples(name, dtype, kind=kind, requires_grad=requires_grad)


def check_relu(x, label: str, findings: Findings) -> list[str | None]:
    problems = []
    for inplace in (False, True):
        name = f"{label}{' inplace' if inplace else ''}"
        theirs = torch.relu(x) if not inplace else torch.relu_(x.clone())
        if inplace:
            target = x.clone()
            ours = zk.relu(target, inplace=True)
            if ours is not target:
                problems.append(f"{name}: relu(inplace=True) did not return its input")
        else:
            ours = zk.relu(x)
        problems.append(half_nan_bits_aside(ours, theirs, name, findings))
    return problems


@pytest.mark.parametrize("name", relu_opinfos())
@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_relu_samples(backend, dtype, name):
    """Bit-equal to torch.relu, in place or not, on every reference input (extremal values, empty tensors,
    scalars, strided and expanded layouts)."""
    findings = Findings(f"{name} {backend} {dtype_id(dtype)}")
    with zk.use_backend(backend):
        for index, sample in subset(list(enumerate(relu_samples(name, dtype))), backend):
            findings.sample(describe_sample(index, sample), *check_relu(sample.input, "relu", findings))
    findings.finish()


@pytest.mark.parametrize("name", relu_opinfos())
@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=dtype_id)
def test_relu_integer_samples_raise(name, dtype):
    findings = Findings(f"{name} {dtype_id(dtype)}")
    for index, sample in enumerate(relu_samples(name, dtype)):
        torch.relu(sample.input)  # torch takes it
        findings.difference("relu.integer_dtypes")
        findings.sample(
            describe_sample(index, sample),
            raises_naming(["input"], "integer input", zk.relu, sample.input),
        )
    findings.finish(["relu.integer_dtypes"])


@pytest.mark.parametrize("name", relu_opinfos())
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_relu_backward_float64(backend, name):
    findings = Findings(f"{name} backward {backend}")
    with zk.use_backend(backend):
        for index, sample in enumerate(relu_samples(name, torch.float64, requires_grad=True)):
            x = sample.input.detach().requires_grad_()  # some reference inputs are views of the leaf
            want = torch.relu(x)
            grad_out = seeded_like(want, index)
            (want_grad,) = torch.autograd.grad(want, x, grad_out)
            (grad,) = torch.autograd.grad(zk.relu(x), x, grad_out)
            findings.sample(describe_sample(index, sample), bits_differ(grad, want_grad, "grad"))
    findings.finish()


# ============================================================================================ forward AD
def forward_ad_cases():
    """(op, float64 sample -> (ours, torch's) functions of one tensor, the primal, exact?) per sample."""

    def pool(sample):
        kwargs, dilation = pool_call(sample)
        if not is_one(dilation):
            return None
        return (
            lambda x: zk.max_pool2d_switches(x, **kwargs)[0],
            lambda x: F.max_pool2d(x, **kwargs),
            sample.input,
        )

    def unpool(sample):
        (indices,), kwargs = sample.args, sample.kwargs
        return (
            lambda v: zk.max_unpool2d(v, indices, **kwargs),
            lambda v: F.max_unpool2d(v, indices, **kwargs),  # grad variant: no shared argmax
            sample.input,
        )

    def conv(sample):
        x, weight, bias, kwargs = conv_args(sample)
        return (
            lambda t: zk.conv_transpose2d(t, weight, bias, **kwargs),
            lambda t: F.conv_transpose2d(t, weight, bias, **kwargs),
            x,
        )

    def relu(sample):
        return zk.relu, torch.relu, sample.input

    return {
        "max_pool2d": lambda: [(s, pool(s)) for s in samples(MAX_POOL, torch.float64)[::8]],
        "max_unpool2d": lambda: [(s, unpool(s)) for s in samples(MAX_UNPOOL, torch.float64, "grad")],
        "conv_transpose2d": lambda: [(s, conv(s)) for s in conv_samples(torch.float64)],
        "relu": lambda: [(s, relu(s)) for s in relu_samples("nn.functional.relu", torch.float64)],
    }


FORWARD_AD = forward_ad_cases()


@pytest.mark.parametrize("op", list(FORWARD_AD))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_ad_float64(backend, op):
    """The OpInfos declare supports_forward_ad: torch.func.jvp of our op equals torch's tangent."""
    findings = Findings(f"{op} forward AD {backend}")
    with zk.use_backend(backend):
        for index, (sample, case) in enumerate(FORWARD_AD[op]()):
            if case is None:
                continue
            ours_fn, torch_fn, primal = case
            primal = primal.detach().clone()  # expanded reference inputs cannot carry a tangent
            tangent = seeded_like(primal, index)
            want_out, want_tangent = torch.func.jvp(torch_fn, (primal,), (tangent,))
            try:
                out, out_tangent = torch.func.jvp(ours_fn, (primal,), (tangent,))
            except Exception as error:  # noqa: BLE001
                findings.sample(describe_sample(index, sample), f"jvp raised {type(error).__name__}: {error}")
                continue
            if op == "conv_transpose2d":
                scale = max(1.0, want_tangent.abs().max().item()) if want_tangent.numel() else 1.0
                problem = not_close(out_tangent, want_tangent, "tangent", 1e-10, 1e-10 * scale)
            else:
                problem = bits_differ(out_tangent, want_tangent, "tangent")
            findings.sample(describe_sample(index, sample), problem)
    findings.finish()


# ========================================================================================== error inputs
def _pool_error_call(sample):
    kwargs, dilation = pool_call(sample)
    if not is_one(dilation):
        kwargs["dilation"] = dilation
    return lambda: zk.max_pool2d_switches(sample.input, **kwargs)


def _unpool_error_call(sample):
    (indices,) = sample.args
    return lambda: zk.max_unpool2d(sample.input, indices, **sample.kwargs)


# torch's error message -> the argument our message must name
_BLAME = [
    (r"pad", ["padding"]),
    (r"3D or 4D", ["input"]),
    (r"Output size is too small", ["input", "kernel_size"]),
    (r"shape of indices", ["switches", "indices"]),
    (r"kernel size should be greater than zero", ["weight"]),
    (r"Overflow", ["stride"]),
]


def blamed(message: str) -> list[str]:
    for pattern, names in _BLAME:
        if re.search(pattern, message):
            return names
    raise AssertionError(f"no argument mapped for torch's error {message!r}: add it to _BLAME")


def error_cases():
    """(id, torch's call, its error regex, our call): OpInfo error_inputs, ModuleInfo error inputs, and the
    argument errors torch's pooling/convolution tests check that neither database has."""
    cases = []
    for name, ours in ((MAX_POOL, _pool_error_call), (MAX_UNPOOL, _unpool_error_call)):
        info = opinfo(name)
        for index, error_input in enumerate(info.error_inputs("cpu")):
            sample = error_input.sample_input
            call = info.op
            cases.append(
                pytest.param(
                    (lambda s=sample, c=call: c(s.input, *s.args, **s.kwargs)),
                    error_input.error_regex,
                    ours(sample),
                    id=f"{name.split('.')[-1]}-error_inputs-{index}",
                )
            )
    (max_pool_module,) = [m for m in module_db if m.module_cls is torch.nn.MaxPool2d]
    for index, error_input in enumerate(
        max_pool_module.module_error_inputs_func(
            max_pool_module, device="cpu", dtype=torch.float32, requires_grad=False, training=False
        )
    ):
        module_input = error_input.module_error_input
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        (x,) = module_input.forward_input.args
        cases.append(
            pytest.param(
                (lambda a=args, k=kwargs, x=x: torch.nn.MaxPool2d(*a, **k)(x)),
                error_input.error_regex,
                (lambda a=args, k=kwargs, x=x: zk.max_pool2d_switches(x, *a, **k)),
                id=f"MaxPool2d-module_error_inputs-{index}",
            )
        )
    x4, w = torch.randn(1, 2, 4, 4), torch.randn(2, 3, 3, 3)
    extra = {
        # a zero-size non-batch dimension: the 4-D sibling of error_inputs' (2, 1, 10, 0) case
        "max_pool2d-zero_channels_4d": (
            lambda: F.max_pool2d(torch.randn(1, 0, 50, 32), 3, 2),
            r"3D or 4D",
            lambda: zk.max_pool2d_switches(torch.randn(1, 0, 50, 32), 3, 2),
        ),
        "max_pool2d-zero_channels_3d": (
            lambda: F.max_pool2d(torch.randn(0, 5, 5), 3, 2),
            r"3D or 4D",
            lambda: zk.max_pool2d_switches(torch.randn(0, 5, 5), 3, 2),
        ),
        "max_pool2d-stride_2**70": (
            lambda: F.max_pool2d(torch.randn(1, 1, 5, 5), 3, 2**70),
            r"Overflow",
            lambda: zk.max_pool2d_switches(torch.randn(1, 1, 5, 5), 3, 2**70),
        ),
        "max_unpool2d-stride_2**70": (
            lambda: F.max_unpool2d(
                torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.long), 3, 2**70
            ),
            r"Overflow",
            lambda: zk.max_unpool2d(
                torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.long), 3, 2**70
            ),
        ),
        "conv_transpose2d-zero_size_kernel": (
            lambda: F.conv_transpose2d(x4, torch.randn(2, 3, 0, 3)),
            r"kernel size should be greater than zero",
            lambda: zk.conv_transpose2d(x4, torch.randn(2, 3, 0, 3)),
        ),
        "conv_transpose2d-stride_2**70": (
            lambda: F.conv_transpose2d(x4, w, stride=2**70),
            r"Overflow",
            lambda: zk.conv_transpose2d(x4, w, stride=2**70),
        ),
    }
    cases += [pytest.param(*case, id=case_id) for case_id, case in extra.items()]
    return cases


@pytest.mark.parametrize("torch_call, torch_regex, our_call", error_cases())
def test_error_inputs(torch_call, torch_regex, our_call):
    """Where torch raises, ours raises too: ValueError/TypeError naming the argument, never a result."""
    with pytest.raises(Exception, match=torch_regex) as torch_error:
        torch_call()
    problem = raises_naming(blamed(str(torch_error.value)), "ours", our_call)
    expected("errors.exception_type")  # torch's RuntimeError is our ValueError/TypeError: listed
    assert problem is None, problem
