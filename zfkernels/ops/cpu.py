"""The "cpu" backend: allocates outputs with torch and runs the C++ kernels of zfkernels._C on them.

Same functions and semantics as reference.py. Kernels take contiguous NCHW buffers, so other layouts
are copied once here; dense GEMMs go to the vendor BLAS through torch.matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._extension import DTYPE_CODES, SWITCH_CODES, all_finite, cpu_module, output_empty
from ._checks import Pair, check_no_invalid_switches, pool_geometry_args, pooled_shape
from .conv_transpose import conv_transpose_output_size
from .reference import RULES


def _threads() -> int:
    return torch.get_num_threads()  # per call: torch.set_num_threads may change it


def max_pool2d_switches(
    input, kernel: Pair, stride: Pair, padding: Pair, ceil_mode: bool, relu: bool, switch_dtype
):
    x = input.contiguous()
    n, c, h, w = x.shape
    out_size = pooled_shape((h, w), kernel, stride, padding, ceil_mode)
    values = output_empty((n, c, *out_size), x)
    switches = output_empty((n, c, *out_size), x, dtype=switch_dtype)
    cpu_module.max_pool2d_switches(
        x.data_ptr(),
        values.data_ptr(),
        switches.data_ptr(),
        DTYPE_CODES[x.dtype],
        SWITCH_CODES[switch_dtype],
        n * c,
        *pool_geometry_args((h, w), out_size, kernel, stride, padding),
        relu,
        _threads(),
    )
    return values, switches


def max_unpool2d(values, switches, kernel: Pair, stride: Pair, padding: Pair, output_size: Pair, relu: bool):
    return _unpool(values, switches, None, kernel, stride, padding, output_size, relu)


def max_pool2d_switches_backward(
    grad, values, switches, kernel: Pair, stride: Pair, padding: Pair, input_size: Pair, relu: bool
):
    # The fused ReLU's gradient gate (pooled values > 0) is applied inside the unpool, in one pass.
    return _unpool(grad, switches, values if relu else None, kernel, stride, padding, input_size, False)


def _unpool(values, switches, gate, kernel: Pair, stride: Pair, padding: Pair, output_size: Pair, relu: bool):
    v, s = values.contiguous(), switches.contiguous()
    g = gate.contiguous() if gate is not None else None
    n, c = v.shape[:2]
    out = output_empty((n, c, *output_size), v)
    invalid = cpu_module.max_unpool2d(
        v.data_ptr(),
        s.data_ptr(),
        0 if g is None else g.data_ptr(),
        out.data_ptr(),
        DTYPE_CODES[v.dtype],
        SWITCH_CODES[s.dtype],
        n * c,
        *pool_geometry_args(output_size, tuple(v.shape[-2:]), kernel, stride, padding),
        relu,
        _threads(),
    )
    check_no_invalid_switches(invalid)
    return out


def gather_switches(source, switches, kernel: Pair, stride: Pair, padding: Pair):
    src, s = source.contiguous(), switches.contiguous()
    n, c = s.shape[:2]
    out = torch.empty(s.shape, dtype=src.dtype, device=src.device)
    invalid = cpu_module.gather_switches(
        src.data_ptr(),
        s.data_ptr(),
        out.data_ptr(),
        DTYPE_CODES[src.dtype],
        SWITCH_CODES[s.dtype],
        n * c,
        *pool_geometry_args(tuple(src.shape[-2:]), tuple(s.shape[-2:]), kernel, stride, padding),
        _threads(),
    )
    check_no_invalid_switches(invalid)
    return out


def relu(input):
    x = input.contiguous()
    out = output_empty(x.shape, x)
    cpu_module.relu(x.data_ptr(), out.data_ptr(), DTYPE_CODES[x.dtype], x.numel(), _threads())
    return out


def relu_(input):
    if not input.is_contiguous():
        return input.copy_(relu(input))
    cpu_module.relu(input.data_ptr(), input.data_ptr(), DTYPE_CODES[input.dtype], input.numel(), _threads())
    return input


def relu_backward(grad, output, rule: int):
    g = grad.contiguous()
    o = output.contiguous() if RULES[rule] != "deconvnet" else None
    out = output_empty(g.shape, g)
    cpu_module.relu_backward(
        g.data_ptr(),
        0 if o is None else o.data_ptr(),
        out.data_ptr(),
        DTYPE_CODES[g.dtype],
        g.numel(),
        rule,
        _threads(),
    )
    return out


_DIRECT_MAX_OUT_CHANNELS = 4  # csrc/cpu/conv_transpose.cpp instantiates 1 to 4


def _conv_transpose2d_exact(
    input, weight, bias, stride: Pair, padding: Pair, output_padding: Pair, groups: int, dilation: Pair
):
    """For a weight holding NaN or inf: torch's float64 path (im2col + GEMM + col2im), which forms only real
    input x weight products, rounded back once. Its float32 path runs oneDNN, which in some geometries
    (mostly with output_padding) also multiplies padding by the weight: 0 * inf = NaN where no product is."""
    out = F.conv_transpose2d(
        input.double(),
        weight.double(),
        None if bias is None else bias.double(),
        stride,
        padding,
        output_padding,
        groups,
        dilation,
    )
    return out.to(input.dtype)


def conv_transpose2d(
    input, weight, bias, stride: Pair, padding: Pair, output_padding: Pair, groups: int, dilation: Pair
):
    """Few output channels (ZFNet's layer 1: 96 -> 3) run the direct kernel, where a GEMM would be all
    overhead; wider convolutions run oneDNN's through torch, which measured faster than GEMM + col2im.
    A weight holding NaN or inf runs _conv_transpose2d_exact (float64 needs no check: torch's float64 path
    is already exact)."""
    x = input.contiguous()
    n, c_in, h, w = x.shape
    _, out_per_group, k_h, k_w = weight.shape
    c_out = out_per_group * groups
    out_h = conv_transpose_output_size(h, k_h, stride[0], padding[0], output_padding[0], dilation[0])
    out_w = conv_transpose_output_size(w, k_w, stride[1], padding[1], output_padding[1], dilation[1])
    if groups == 1 and n > 0 and c_out <= _DIRECT_MAX_OUT_CHANNELS:
        out = output_empty((n, c_out, out_h, out_w), x)
        wt = weight.contiguous()  # held in a name: a temporary's buffer could be freed before the call
        b = bias.contiguous() if bias is not None else None
        if cpu_module.conv_transpose2d_direct(
            x.data_ptr(),
            wt.data_ptr(),
            0 if b is None else b.data_ptr(),
            out.data_ptr(),
            DTYPE_CODES[x.dtype],
            n,
            c_in,
            c_out,
            (h, w, out_h, out_w),
            (k_h, k_w, *stride, *padding, *dilation),
            _threads(),
        ):
            return out  # the kernel declines (returns False) other dtypes, dilations, and NaN/inf weights
    args = (stride, padding, output_padding, groups, dilation)
    # One pass over the weight (a small fraction of the convolution's work) picks the exact path.
    if input.dtype != torch.float64 and not all_finite(weight):
        return _conv_transpose2d_exact(input, weight, bias, *args)
    return F.conv_transpose2d(input, weight, bias, *args).contiguous()  # reference's, its weight check done


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
    v, s, wt = values.contiguous(), switches.contiguous(), weight.contiguous()
    n, c_in = v.shape[:2]
    c_out, k_h, k_w = wt.shape[1:]
    out_h = conv_transpose_output_size(unpool_size[0], k_h, stride[0], padding[0], output_padding[0], 1)
    out_w = conv_transpose_output_size(unpool_size[1], k_w, stride[1], padding[1], output_padding[1], 1)
    out = output_empty((n, c_out, out_h, out_w), v)
    pool_sizes, pool_params = pool_geometry_args(
        unpool_size, tuple(v.shape[-2:]), pool_kernel, pool_stride, pool_padding
    )
    invalid, ran = cpu_module.unpool_conv_transpose2d(
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
        _threads(),
    )
    if not ran:
        # The weight holds a NaN or an infinity (the kernel declined, having read only the weight): torch's
        # dense composition multiplies it by every zero of the unpooled map, so that composition runs here.
        unpooled = _unpool(v, s, None, pool_kernel, pool_stride, pool_padding, unpool_size, relu)
        return _conv_transpose2d_exact(unpooled, wt, None, stride, padding, output_padding, 1, (1, 1))
    check_no_invalid_switches(invalid)
    return out


def renormalize_filters_(weight, radius: float):
    """Filters are dim 0; the kernel needs them contiguous, so other layouts run on a copy written back."""
    w = weight if weight.is_contiguous() else weight.contiguous()
    filters = w.shape[0]
    if filters and w.numel():
        cpu_module.renormalize_filters(
            w.data_ptr(), DTYPE_CODES[w.dtype], filters, w.numel() // filters, float(radius), _threads()
        )
    if w is not weight:
        weight.copy_(w)
    return weight
