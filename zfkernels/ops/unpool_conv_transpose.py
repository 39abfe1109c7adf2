"""The fused deconvnet step: conv_transpose2d(relu(max_unpool2d(values, switches)), weight), no bias."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._backend import define_op, implementation, op, register_autograd
from ._checks import (
    check_nonempty_planes,
    check_nonempty_weight,
    check_same_device,
    check_tensor,
    pair,
    pool_params,
)
from .conv_transpose import conv_transpose_output_size
from .max_unpool import _check_switches, unpool_output_size


@define_op("unpool_conv_transpose2d", mutates_args=())
def _unpool_conv_transpose2d_op(
    values: Tensor,
    switches: Tensor,
    weight: Tensor,
    pool_kernel_size: list[int],
    pool_stride: list[int],
    pool_padding: list[int],
    unpool_size: list[int],
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    relu: bool,
) -> Tensor:
    return implementation(values.device).unpool_conv_transpose2d(
        values,
        switches,
        weight,
        tuple(pool_kernel_size),
        tuple(pool_stride),
        tuple(pool_padding),
        tuple(unpool_size),
        tuple(stride),
        tuple(padding),
        tuple(output_padding),
        relu,
    )


@_unpool_conv_transpose2d_op.register_fake
def _(
    values,
    switches,
    weight,
    pool_kernel_size,
    pool_stride,
    pool_padding,
    unpool_size,
    stride,
    padding,
    output_padding,
    relu,
):
    sizes = [
        conv_transpose_output_size(
            unpool_size[i], weight.shape[2 + i], stride[i], padding[i], output_padding[i], 1
        )
        for i in range(2)
    ]
    return values.new_empty((values.shape[0], weight.shape[1], *sizes))


def _setup(ctx, inputs, output):
    (
        values,
        switches,
        weight,
        pool_kernel,
        pool_stride,
        pool_padding,
        unpool_size,
        stride,
        padding,
        out_pad,
        relu,
    ) = inputs
    ctx.save_for_backward(values, switches, weight)
    ctx.params = (pool_kernel, pool_stride, pool_padding, unpool_size, stride, padding, out_pad, relu)


def _backward(ctx, grad):
    # The forward never built the unpooled map; the weight gradient needs it, so it is rebuilt here.
    values, switches, weight = ctx.saved_tensors
    pool_kernel, pool_stride, pool_padding, unpool_size, stride, padding, out_pad, relu = ctx.params
    unpooled = op("max_unpool2d", values.device)(
        values, switches, pool_kernel, pool_stride, pool_padding, unpool_size, relu
    )
    grad_unpooled, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad,
        unpooled,
        weight,
        None,
        stride,
        padding,
        [1, 1],
        True,
        out_pad,
        1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[2], False],
    )
    grad_values = None
    if grad_unpooled is not None:
        if relu:
            grad_unpooled = op("relu_backward", grad.device)(grad_unpooled, unpooled, 0)
        grad_values = op("gather_switches", grad.device)(
            grad_unpooled, switches, pool_kernel, pool_stride, pool_padding
        )
    return grad_values, None, grad_weight, None, None, None, None, None, None, None, None


def _jvp(inputs, output, tangents):
    # Linear in weight for a fixed unpooled map, and in values through unpool + ReLU gate + transposed conv.
    values, switches, weight, pool_kernel, pool_stride, pool_padding, unpool_size, *conv, relu = inputs
    tangent_values, _, tangent_weight = tangents[:3]
    unpool, conv_transpose = op("max_unpool2d", output.device), op("conv_transpose2d", output.device)
    pool = (pool_kernel, pool_stride, pool_padding, unpool_size)
    unpooled = unpool(values, switches, *pool, relu)
    tangent = None
    if tangent_values is not None:
        tangent_unpooled = unpool(tangent_values, switches, *pool, False)
        if relu:
            tangent_unpooled = op("relu_backward", output.device)(tangent_unpooled, unpooled, 0)
        tangent = conv_transpose(tangent_unpooled, weight, None, *conv, 1, [1, 1])
    if tangent_weight is not None:
        term = conv_transpose(unpooled, tangent_weight, None, *conv, 1, [1, 1])
        tangent = term if tangent is None else tangent + term
    return tangent


register_autograd(_unpool_conv_transpose2d_op, _backward, _setup, _jvp)


def unpool_conv_transpose2d(
    values: Tensor,
    switches: Tensor,
    weight: Tensor,
    *,
    pool_kernel_size: int | Sequence[int],
    pool_stride: int | Sequence[int] | None = None,
    pool_padding: int | Sequence[int] = 0,
    unpool_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    output_padding: int | Sequence[int] = 0,
    relu: bool = True,
) -> Tensor:
    """One deconvnet layer, fused: unpool with switches (summing shared argmaxes), ReLU, transposed conv.

    Equals ``conv_transpose2d(relu(max_unpool2d(values, switches, ..., output_size=unpool_size)), weight,
    stride=stride, padding=padding, output_padding=output_padding)``. The unpooled map is never
    materialized: the CPU kernel only touches positions a switch points to.
    """
    check_tensor(values, "values", (3, 4))
    check_nonempty_planes(values, "values")
    _check_switches(values, switches)
    check_tensor(weight, "weight", (4,))
    check_nonempty_weight(weight)
    if weight.dtype != values.dtype:
        raise TypeError(f"weight must have values' dtype {values.dtype}, got {weight.dtype}")
    check_same_device(values=values, switches=switches, weight=weight)
    if weight.shape[0] != values.shape[-3]:
        raise ValueError(
            f"weight must have shape (in_channels={values.shape[-3]}, out_channels, kH, kW), "
            f"got {tuple(weight.shape)}"
        )
    kernel, stride_pool, pad_pool = pool_params(pool_kernel_size, pool_stride, pool_padding, "pool_")
    pooled = (values.shape[-2], values.shape[-1])
    size = unpool_output_size(pooled, kernel, stride_pool, pad_pool, unpool_size, "unpool_size")
    stride_p, pad_p, out_pad_p = (
        pair(stride, "stride", 1),
        pair(padding, "padding", 0),
        pair(output_padding, "output_padding", 0),
    )
    for i in range(2):
        if out_pad_p[i] >= stride_p[i]:
            raise ValueError(f"output_padding must be smaller than stride, got {output_padding!r}")
        if (
            conv_transpose_output_size(size[i], weight.shape[2 + i], stride_p[i], pad_p[i], out_pad_p[i], 1)
            < 1
        ):
            raise ValueError(f"padding {padding!r} leaves an empty output for unpool_size {size}")
    batched = values.dim() == 4
    v, s = (values, switches) if batched else (values.unsqueeze(0), switches.unsqueeze(0))
    out = op("unpool_conv_transpose2d", v.device)(
        v,
        s,
        weight,
        list(kernel),
        list(stride_pool),
        list(pad_pool),
        list(size),
        list(stride_p),
        list(pad_p),
        list(out_pad_p),
        bool(relu),
    )
    return out if batched else out.squeeze(0)
