"""Transposed convolution: F.conv_transpose2d's signature and results, GEMM + fused col2im on CPU."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from ._backend import define_op, implementation, op, register_autograd
from ._checks import check_nonempty_weight, check_same_device, check_tensor, pair


def conv_transpose_output_size(
    size: int, kernel: int, stride: int, pad: int, output_pad: int, dilation: int
) -> int:
    return (size - 1) * stride - 2 * pad + dilation * (kernel - 1) + output_pad + 1


@define_op("conv_transpose2d", mutates_args=())
def _conv_transpose2d_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    groups: int,
    dilation: list[int],
) -> Tensor:
    return implementation(input.device).conv_transpose2d(
        input, weight, bias, tuple(stride), tuple(padding), tuple(output_padding), groups, tuple(dilation)
    )


@_conv_transpose2d_op.register_fake
def _(input, weight, bias, stride, padding, output_padding, groups, dilation):
    sizes = [
        conv_transpose_output_size(
            input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], output_padding[i], dilation[i]
        )
        for i in range(2)
    ]
    return input.new_empty((input.shape[0], weight.shape[1] * groups, *sizes))


def _setup(ctx, inputs, output):
    input, weight, bias, stride, padding, output_padding, groups, dilation = inputs
    ctx.save_for_backward(input, weight)
    ctx.params = (stride, padding, dilation, output_padding, groups)
    ctx.bias_sizes = None if bias is None else list(bias.shape)


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    stride, padding, dilation, output_padding, groups = ctx.params
    mask = [
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        ctx.bias_sizes is not None and ctx.needs_input_grad[2],
    ]
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad, input, weight, ctx.bias_sizes, stride, padding, dilation, True, output_padding, groups, mask
    )
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _jvp(inputs, output, tangents):
    # Bilinear in (input, weight), plus the bias: one transposed conv per tangent that is present.
    input, weight, bias, *params = inputs
    tangent_input, tangent_weight, tangent_bias = tangents[:3]
    conv = op("conv_transpose2d", output.device)
    terms = []
    if tangent_input is not None:
        terms.append(conv(tangent_input, weight, None, *params))
    if tangent_weight is not None:
        terms.append(conv(input, tangent_weight, None, *params))
    if tangent_bias is not None:
        terms.append(tangent_bias.view(1, -1, 1, 1).expand_as(output))
    return functools.reduce(torch.add, terms) if terms else None


register_autograd(_conv_transpose2d_op, _backward, _setup, _jvp)


def conv_transpose2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    output_padding: int | Sequence[int] = 0,
    groups: int = 1,
    dilation: int | Sequence[int] = 1,
) -> Tensor:
    """``F.conv_transpose2d`` with the same signature and results (fp32 allclose)."""
    check_tensor(input, "input", (3, 4))
    check_tensor(weight, "weight", (4,))
    check_nonempty_weight(weight)
    if input.shape[-2] == 0 or input.shape[-1] == 0:
        raise ValueError(f"input must have non-zero height and width, got shape {tuple(input.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have input's dtype {input.dtype}, got {weight.dtype}")
    if bias is not None:
        check_tensor(bias, "bias", (1,), (input.dtype,))
    check_same_device(input=input, weight=weight, bias=bias)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride_p, pad_p = pair(stride, "stride", 1), pair(padding, "padding", 0)
    out_pad_p, dil_p = pair(output_padding, "output_padding", 0), pair(dilation, "dilation", 1)
    channels = input.shape[-3]
    if weight.shape[0] != channels or channels % groups:
        raise ValueError(
            f"weight must have shape (in_channels={channels}, out_channels/groups, kH, kW) with in_channels "
            f"divisible by groups={groups}, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape[0] != weight.shape[1] * groups:
        raise ValueError(f"bias must have {weight.shape[1] * groups} elements, got {bias.shape[0]}")
    for i in range(2):
        if out_pad_p[i] >= max(stride_p[i], dil_p[i]):
            raise ValueError(
                f"output_padding must be smaller than stride or dilation, got {output_padding!r}"
            )
        size = conv_transpose_output_size(
            input.shape[-2 + i], weight.shape[2 + i], stride_p[i], pad_p[i], out_pad_p[i], dil_p[i]
        )
        if size < 1:
            raise ValueError(f"padding {padding!r} leaves an empty output for input {tuple(input.shape)}")
    batched = input.dim() == 4
    x = input if batched else input.unsqueeze(0)
    out = op("conv_transpose2d", x.device)(
        x, weight, bias, list(stride_p), list(pad_p), list(out_pad_p), groups, list(dil_p)
    )
    return out if batched else out.squeeze(0)
