"""Switch-recording max-pool (optionally fused with a preceding ReLU), and switch -> index conversion."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._backend import OPS, define_op, implementation, op, register_autograd
from ._checks import (
    check_no_invalid_switches,
    check_nonempty_planes,
    check_pool_fits,
    check_tensor,
    pair,
    pool_params,
    pooled_shape,
    switch_dtype,
)
from .reference import switch_targets


@define_op("max_pool2d_switches", mutates_args=())
def _max_pool2d_switches_op(
    input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], ceil_mode: bool, relu: bool
) -> tuple[Tensor, Tensor]:
    kernel = (kernel_size[0], kernel_size[1])
    return implementation(input.device).max_pool2d_switches(
        input, kernel, (stride[0], stride[1]), (padding[0], padding[1]), ceil_mode, relu, switch_dtype(kernel)
    )


@_max_pool2d_switches_op.register_fake
def _(input, kernel_size, stride, padding, ceil_mode, relu):
    n, c, h, w = input.shape
    kernel = (kernel_size[0], kernel_size[1])
    out_size = pooled_shape((h, w), kernel, stride, padding, ceil_mode)
    return input.new_empty((n, c, *out_size)), input.new_empty((n, c, *out_size), dtype=switch_dtype(kernel))


def _setup_context(ctx, inputs, output):
    input, kernel_size, stride, padding, _, relu = inputs
    values, switches = output
    ctx.save_for_backward(values, switches)
    ctx.geometry = (kernel_size, stride, padding, [input.shape[-2], input.shape[-1]])
    ctx.relu = relu
    ctx.mark_non_differentiable(switches)


def _backward(ctx, grad_values, _grad_switches):
    values, switches = ctx.saved_tensors
    kernel_size, stride, padding, input_size = ctx.geometry
    grad_input = op("max_pool2d_switches_backward", grad_values.device)(
        grad_values, values, switches, kernel_size, stride, padding, input_size, ctx.relu
    )
    return grad_input, None, None, None, None, None


@define_op("max_pool2d_switches_backward", mutates_args=())
def _max_pool2d_switches_backward_op(
    grad: Tensor,
    values: Tensor,
    switches: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    input_size: list[int],
    relu: bool,
) -> Tensor:
    """Max-pool's backward: unpool of the gradient (ReLU-gated by the pooled values when fused), one pass."""
    return implementation(grad.device).max_pool2d_switches_backward(
        grad, values, switches, tuple(kernel_size), tuple(stride), tuple(padding), tuple(input_size), relu
    )


@_max_pool2d_switches_backward_op.register_fake
def _(grad, values, switches, kernel_size, stride, padding, input_size, relu):
    return grad.new_empty((*grad.shape[:2], input_size[0], input_size[1]))


def _backward_setup_context(ctx, inputs, output):
    _, values, switches, kernel_size, stride, padding, _, relu = inputs
    ctx.save_for_backward(values, switches)
    ctx.geometry = (kernel_size, stride, padding)
    ctx.relu = relu


def _backward_backward(ctx, grad_grad_input):
    # Linear in grad: its adjoint gathers at the switches, then applies the same ReLU gate.
    values, switches = ctx.saved_tensors
    grad_grad = op("gather_switches", grad_grad_input.device)(grad_grad_input, switches, *ctx.geometry)
    if ctx.relu:
        grad_grad = op("relu_backward", grad_grad.device)(grad_grad, values, 0)
    return grad_grad, None, None, None, None, None, None, None


def _backward_jvp(inputs, output, tangents):
    # Linear in grad (values and switches only select where it goes).
    grad, values, switches, kernel_size, stride, padding, input_size, relu = inputs
    if tangents[0] is None:
        return None
    return op("max_pool2d_switches_backward", grad.device)(
        tangents[0], values, switches, kernel_size, stride, padding, input_size, relu
    )


register_autograd(
    _max_pool2d_switches_backward_op, _backward_backward, _backward_setup_context, _backward_jvp
)


def _jvp(inputs, output, tangents):
    # Each value is the input at its switch (rectified when fused): its tangent is the input's tangent
    # there, gated by the fused ReLU as torch's relu gates it (threshold_backward on the values).
    _, kernel_size, stride, padding, _, relu = inputs
    values, switches = output
    tangent = op("gather_switches", values.device)(tangents[0], switches, kernel_size, stride, padding)
    if relu:
        tangent = op("relu_backward", values.device)(tangent, values, 0)
    return tangent, None


register_autograd(_max_pool2d_switches_op, _backward, _setup_context, _jvp)


def max_pool2d_switches(
    input: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    ceil_mode: bool = False,
    *,
    relu: bool = False,
) -> tuple[Tensor, Tensor]:
    """Max-pool that records compact switches: ``values, switches``.

    ``values`` equals ``F.max_pool2d(F.relu(input) if relu else input, ...)`` bit for bit; ties and NaN
    resolve as there. ``switches`` holds each winner's window-local offset ``kh * kW + kw`` as uint8
    (int16/int32 only for windows over 256 elements): 8x smaller than torch's int64 indices.
    Input is (N, C, H, W) or (C, H, W); outputs are contiguous.
    """
    check_tensor(input, "input", (3, 4))
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    kernel, stride_pair, pad = pool_params(kernel_size, stride, padding)
    check_nonempty_planes(input, "input")  # after the arguments, as torch: a bad padding is named first
    check_pool_fits((input.shape[-2], input.shape[-1]), kernel, pad)
    batched = input.dim() == 4
    x = input if batched else input.unsqueeze(0)
    values, switches = op("max_pool2d_switches", x.device)(
        x, list(kernel), list(stride_pair), list(pad), ceil_mode, bool(relu)
    )
    return (values, switches) if batched else (values.squeeze(0), switches.squeeze(0))


def switches_to_indices(
    switches: Tensor,
    input_size: Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
) -> Tensor:
    """The int64 flat indices ``F.max_pool2d(..., return_indices=True)`` returns, from our switches.

    ``input_size`` is the pooled input's (H, W) (a longer size such as (N, C, H, W) is accepted).
    """
    check_tensor(switches, "switches", (3, 4), (torch.uint8, torch.int16, torch.int32))
    check_nonempty_planes(switches, "switches")
    if not isinstance(input_size, (tuple, list, torch.Size)) or len(input_size) < 2:
        raise TypeError(f"input_size must be a sequence ending in (H, W), got {input_size!r}")
    in_size = pair(tuple(input_size[-2:]), "input_size", 1)
    kernel, stride_pair, pad = pool_params(kernel_size, stride, padding)
    indices = OPS["switches_to_indices"].call  # no triton twin: one op on every backend
    return indices(switches, list(in_size), list(kernel), list(stride_pair), list(pad))


# An op, not inline torch code, so that the switches are validated when it runs in every mode: traced by
# torch.compile, inline code could not look at the data.
@define_op("switches_to_indices", mutates_args=())
def _switches_to_indices_op(
    switches: Tensor, input_size: list[int], kernel_size: list[int], stride: list[int], padding: list[int]
) -> Tensor:
    geometry = (tuple(input_size), tuple(kernel_size), tuple(stride), tuple(padding))
    flat, valid = switch_targets(switches, *geometry)
    check_no_invalid_switches(int((~valid).sum()))
    return flat.contiguous()


@_switches_to_indices_op.register_fake
def _(switches, input_size, kernel_size, stride, padding):
    return torch.empty(switches.shape, dtype=torch.int64, device=switches.device)
