"""The "cuda" backend: allocates outputs with torch and enqueues the CUDA kernels of zfkernels._C_cuda.

Same functions and semantics as reference.py. Kernels take contiguous NCHW buffers, so other layouts are
copied once here. Every call runs on the inputs' device (selected around the call) and on torch's current
stream there, so it orders with the surrounding torch work and never synchronizes, except to read the
invalid-switch count of the ops that follow switches (a ValueError must be raised at the call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .._extension import DTYPE_CODES, SWITCH_CODES, cuda_module
from ._checks import Pair, check_no_invalid_switches, pool_geometry_args, pooled_shape
from .conv_transpose import conv_transpose_output_size
from .reference import RULES


@contextlib.contextmanager
def _on(tensor: torch.Tensor) -> Iterator[int]:
    """Makes the tensor's device current (the kernels launch there) and yields its current stream's handle."""
    with torch.cuda.device(tensor.device):
        yield torch.cuda.current_stream(tensor.device).cuda_stream


def _invalid_counter(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int32, device=like.device)


def _check_invalid(counter: torch.Tensor) -> None:
    # Reading the count waits for the kernel. Traced code cannot raise on data; it skips the check.
    if not torch.compiler.is_compiling():
        check_no_invalid_switches(int(counter.item()))


def max_pool2d_switches(
    input, kernel: Pair, stride: Pair, padding: Pair, ceil_mode: bool, relu: bool, switch_dtype
):
    """Values and window-local switches of a max-pool (after a ReLU when `relu`), bit-exact with reference."""
    x = input.contiguous()
    n, c, h, w = x.shape
    out_size = pooled_shape((h, w), kernel, stride, padding, ceil_mode)
    values = torch.empty((n, c, *out_size), dtype=x.dtype, device=x.device)
    switches = torch.empty((n, c, *out_size), dtype=switch_dtype, device=x.device)
    with _on(x) as stream:
        cuda_module.max_pool2d_switches(
            x.data_ptr(),
            values.data_ptr(),
            switches.data_ptr(),
            DTYPE_CODES[x.dtype],
            SWITCH_CODES[switch_dtype],
            n * c,
            *pool_geometry_args((h, w), out_size, kernel, stride, padding),
            relu,
            stream,
        )
    return values, switches


def max_unpool2d(values, switches, kernel: Pair, stride: Pair, padding: Pair, output_size: Pair, relu: bool):
    """Values summed at their switch targets in row-major pooled order, then a ReLU when `relu`."""
    return _unpool(values, switches, None, kernel, stride, padding, output_size, relu)


def max_pool2d_switches_backward(
    grad, values, switches, kernel: Pair, stride: Pair, padding: Pair, input_size: Pair, relu: bool
):
    """The pooled gradient unpooled; with the fused ReLU, gated by the pooled values in the same pass."""
    return _unpool(grad, switches, values if relu else None, kernel, stride, padding, input_size, False)


def _unpool(values, switches, gate, kernel: Pair, stride: Pair, padding: Pair, output_size: Pair, relu: bool):
    v, s = values.contiguous(), switches.contiguous()
    g = gate.contiguous() if gate is not None else None
    n, c = v.shape[:2]
    out = torch.empty((n, c, *output_size), dtype=v.dtype, device=v.device)
    invalid = _invalid_counter(v)
    with _on(v) as stream:
        cuda_module.max_unpool2d(
            v.data_ptr(),
            s.data_ptr(),
            0 if g is None else g.data_ptr(),
            out.data_ptr(),
            DTYPE_CODES[v.dtype],
            SWITCH_CODES[s.dtype],
            n * c,
            *pool_geometry_args(output_size, tuple(v.shape[-2:]), kernel, stride, padding),
            relu,
            invalid.data_ptr(),
            stream,
        )
    _check_invalid(invalid)
    return out


def gather_switches(source, switches, kernel: Pair, stride: Pair, padding: Pair):
    """`source` read at each switch: the adjoint of max_unpool2d."""
    src, s = source.contiguous(), switches.contiguous()
    n, c = s.shape[:2]
    out = torch.empty(s.shape, dtype=src.dtype, device=src.device)
    invalid = _invalid_counter(src)
    with _on(src) as stream:
        cuda_module.gather_switches(
            src.data_ptr(),
            s.data_ptr(),
            out.data_ptr(),
            DTYPE_CODES[src.dtype],
            SWITCH_CODES[s.dtype],
            n * c,
            *pool_geometry_args(tuple(src.shape[-2:]), tuple(s.shape[-2:]), kernel, stride, padding),
            invalid.data_ptr(),
            stream,
        )
    _check_invalid(invalid)
    return out


def relu(input):
    """torch.relu bit for bit (NaN and -0.0 pass), into a new contiguous tensor."""
    x = input.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    with _on(x) as stream:
        cuda_module.relu(x.data_ptr(), out.data_ptr(), DTYPE_CODES[x.dtype], x.numel(), stream)
    return out


def relu_(input):
    """In place; a non-contiguous input is written through from a contiguous result."""
    if not input.is_contiguous():
        return input.copy_(relu(input))
    with _on(input) as stream:
        cuda_module.relu(input.data_ptr(), input.data_ptr(), DTYPE_CODES[input.dtype], input.numel(), stream)
    return input


def relu_backward(grad, output, rule: int):
    """The gradient a ReLU sends back under rule 0 (standard), 1 (deconvnet) or 2 (guided)."""
    g = grad.contiguous()
    o = output.contiguous() if RULES[rule] != "deconvnet" else None
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    with _on(g) as stream:
        cuda_module.relu_backward(
            g.data_ptr(),
            0 if o is None else o.data_ptr(),
            out.data_ptr(),
            DTYPE_CODES[g.dtype],
            g.numel(),
            rule,
            stream,
        )
    return out


def conv_transpose2d(
    input, weight, bias, stride: Pair, padding: Pair, output_padding: Pair, groups: int, dilation: Pair
):
    """F.conv_transpose2d by the tiled CUDA-core kernel: sums in float (double for fp64), deterministic."""
    # Held in names: a temporary's buffer could be freed before the kernel reads it.
    x, wt = input.contiguous(), weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    n, c_in, h, w = x.shape
    _, out_per_group, k_h, k_w = wt.shape
    out_h = conv_transpose_output_size(h, k_h, stride[0], padding[0], output_padding[0], dilation[0])
    out_w = conv_transpose_output_size(w, k_w, stride[1], padding[1], output_padding[1], dilation[1])
    out = torch.empty((n, out_per_group * groups, out_h, out_w), dtype=x.dtype, device=x.device)
    with _on(x) as stream:
        cuda_module.conv_transpose2d(
            x.data_ptr(),
            wt.data_ptr(),
            0 if b is None else b.data_ptr(),
            out.data_ptr(),
            DTYPE_CODES[x.dtype],
            n,
            c_in,
            out_per_group * groups,
            groups,
            (h, w, out_h, out_w),
            (k_h, k_w, *stride, *padding, *dilation),
            False,
            stream,
        )
    return out


def unpool_conv_transpose2d(
    values,
    switches,
    weight,
    pool_kernel: Pair,
    pool_stride: Pair,
    pool_padding: Pair,
    unpool_size: Pair,
    stride: Pair,
    padding: Pair,
    output_padding: Pair,
    relu: bool,
):
    """conv_transpose2d(max_unpool2d(values, switches, relu), weight) without writing the unpooled map."""
    v, s, wt = values.contiguous(), switches.contiguous(), weight.contiguous()
    n, c_in = v.shape[:2]
    c_out, k_h, k_w = wt.shape[1:]
    out_h = conv_transpose_output_size(unpool_size[0], k_h, stride[0], padding[0], output_padding[0], 1)
    out_w = conv_transpose_output_size(unpool_size[1], k_w, stride[1], padding[1], output_padding[1], 1)
    out = torch.empty((n, c_out, out_h, out_w), dtype=v.dtype, device=v.device)
    pool_sizes, pool_params = pool_geometry_args(
        unpool_size, tuple(v.shape[-2:]), pool_kernel, pool_stride, pool_padding
    )
    invalid = _invalid_counter(v)
    with _on(v) as stream:
        cuda_module.unpool_conv_transpose2d(
            v.data_ptr(),
            s.data_ptr(),
            wt.data_ptr(),
            out.data_ptr(),
            DTYPE_CODES[v.dtype],
            SWITCH_CODES[s.dtype],
            n,
            c_in,
            c_out,
            pool_sizes,
            pool_params,
            (*unpool_size, out_h, out_w),
            (k_h, k_w, *stride, *padding, 1, 1),
            relu,
            False,
            invalid.data_ptr(),
            stream,
        )
    _check_invalid(invalid)
    return out


def renormalize_filters_(weight, radius: float):
    """Filters are dim 0; the kernel needs them contiguous, so other layouts run on a copy written back."""
    w = weight if weight.is_contiguous() else weight.contiguous()
    filters = w.shape[0]
    if filters and w.numel():
        with _on(w) as stream:
            cuda_module.renormalize_filters(
                w.data_ptr(), DTYPE_CODES[w.dtype], filters, w.numel() // filters, float(radius), stream
            )
    if w is not weight:
        weight.copy_(w)
    return weight
