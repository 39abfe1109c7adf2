"""Max-unpool with switches (sums where overlapping windows share an argmax), and its adjoint gather."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._backend import define_op, implementation, op, register_autograd
from ._checks import (
    SWITCH_DTYPES,
    check_nonempty_planes,
    check_same_device,
    check_tensor,
    pair,
    pool_params,
    pooled_size,
)


@define_op("max_unpool2d", mutates_args=())
def _max_unpool2d_op(
    values: Tensor,
    switches: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    output_size: list[int],
    relu: bool,
) -> Tensor:
    return implementation(values.device).max_unpool2d(
        values, switches, tuple(kernel_size), tuple(stride), tuple(padding), tuple(output_size), relu
    )


@_max_unpool2d_op.register_fake
def _(values, switches, kernel_size, stride, padding, output_size, relu):
    return values.new_empty((*values.shape[:2], output_size[0], output_size[1]))


def _unpool_setup(ctx, inputs, output):
    _, switches, kernel_size, stride, padding, _, relu = inputs
    ctx.save_for_backward(switches, output if relu else None)
    ctx.geometry = (kernel_size, stride, padding)


def _unpool_backward(ctx, grad):
    switches, output = ctx.saved_tensors
    if output is not None:  # the fused ReLU after the sum
        grad = op("relu_backward", grad.device)(grad, output, 0)
    return (
        op("gather_switches", grad.device)(grad, switches, *ctx.geometry),
        None,
        None,
        None,
        None,
        None,
        None,
    )


def _unpool_jvp(inputs, output, tangents):
    # Linear in values: the tangent is unpooled the same way, then gated by the fused ReLU's output.
    values, switches, kernel_size, stride, padding, output_size, relu = inputs
    tangent = op("max_unpool2d", values.device)(
        tangents[0], switches, kernel_size, stride, padding, output_size, False
    )
    return op("relu_backward", values.device)(tangent, output, 0) if relu else tangent


register_autograd(_max_unpool2d_op, _unpool_backward, _unpool_setup, _unpool_jvp)


@define_op("gather_switches", mutates_args=())
def _gather_switches_op(
    source: Tensor, switches: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]
) -> Tensor:
    return implementation(source.device).gather_switches(
        source, switches, tuple(kernel_size), tuple(stride), tuple(padding)
    )


@_gather_switches_op.register_fake
def _(source, switches, kernel_size, stride, padding):
    return source.new_empty(switches.shape)


def _gather_setup(ctx, inputs, output):
    source, switches, kernel_size, stride, padding = inputs
    ctx.save_for_backward(switches)
    ctx.geometry = (kernel_size, stride, padding, [source.shape[-2], source.shape[-1]])


def _gather_backward(ctx, grad):
    (switches,) = ctx.saved_tensors
    kernel_size, stride, padding, source_size = ctx.geometry
    grad_source = op("max_unpool2d", grad.device)(
        grad, switches, kernel_size, stride, padding, source_size, False
    )
    return grad_source, None, None, None, None


def _gather_jvp(inputs, output, tangents):
    _, switches, kernel_size, stride, padding = inputs
    return op("gather_switches", output.device)(tangents[0], switches, kernel_size, stride, padding)


register_autograd(_gather_switches_op, _gather_backward, _gather_setup, _gather_jvp)


def _check_switches(values: Tensor, switches: Tensor) -> None:
    check_tensor(switches, "switches", (3, 4), SWITCH_DTYPES)
    if switches.shape != values.shape:
        raise ValueError(
            f"switches must have the shape of values {tuple(values.shape)}, got {tuple(switches.shape)}"
        )
    check_same_device(values=values, switches=switches)


def unpool_output_size(
    pooled: tuple[int, int], kernel, stride, pad, output_size, name: str = "output_size"
) -> tuple[int, int]:
    """Checked (H, W) of the unpooled map: `output_size` if given (`name` in errors), else torch's default."""
    if output_size is None:
        return tuple((pooled[i] - 1) * stride[i] - 2 * pad[i] + kernel[i] for i in range(2))
    size = pair(
        tuple(output_size)[-2:] if isinstance(output_size, (tuple, list, torch.Size)) else output_size,
        name,
        1,
    )
    for i in range(2):
        if pooled[i] not in (pooled_size(size[i], kernel[i], stride[i], pad[i], c) for c in (False, True)):
            raise ValueError(
                f"{name} {size} does not pool to the pooled size {pooled} with kernel_size={kernel}, "
                f"stride={stride}, padding={pad}"
            )
    return size


def max_unpool2d(
    values: Tensor,
    switches: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    output_size: Sequence[int] | None = None,
    *,
    relu: bool = False,
) -> Tensor:
    """Place each value at its switch, summing where overlapping windows share an argmax; then ReLU if asked.

    ``switches`` is our window-local uint8/int16/int32 switches or torch's int64 flat indices. Unlike
    ``F.max_unpool2d``, which overwrites at shared argmaxes (nondeterministically on CUDA), this sums in a
    fixed order, so it is exactly the gradient of max-pool and deterministic. Switches that point outside
    their window raise ValueError. With ``ceil_mode`` pools pass ``output_size`` (the pooled input's size).
    """
    check_tensor(values, "values", (3, 4))
    check_nonempty_planes(values, "values")
    _check_switches(values, switches)
    kernel, stride_pair, pad = pool_params(kernel_size, stride, padding)
    size = unpool_output_size((values.shape[-2], values.shape[-1]), kernel, stride_pair, pad, output_size)
    batched = values.dim() == 4
    v, s = (values, switches) if batched else (values.unsqueeze(0), switches.unsqueeze(0))
    out = op("max_unpool2d", v.device)(
        v, s, list(kernel), list(stride_pair), list(pad), list(size), bool(relu)
    )
    return out if batched else out.squeeze(0)


def gather_switches(
    source: Tensor,
    switches: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
) -> Tensor:
    """The adjoint of max_unpool2d: ``source`` read at each switch (the gradient of unpool's values)."""
    check_tensor(source, "source", (3, 4))
    check_nonempty_planes(source, "source")
    check_tensor(switches, "switches", (source.dim(),), SWITCH_DTYPES)
    check_nonempty_planes(switches, "switches")
    check_same_device(source=source, switches=switches)
    if switches.shape[:-2] != source.shape[:-2]:
        raise ValueError(
            f"switches must match source in its leading dimensions {tuple(source.shape[:-2])}, "
            f"got {tuple(switches.shape)}"
        )
    kernel, stride_pair, pad = pool_params(kernel_size, stride, padding)
    pooled = (switches.shape[-2], switches.shape[-1])
    unpool_output_size(pooled, kernel, stride_pair, pad, tuple(source.shape[-2:]), "source")
    batched = source.dim() == 4
    src, s = (source, switches) if batched else (source.unsqueeze(0), switches.unsqueeze(0))
    out = op("gather_switches", src.device)(src, s, list(kernel), list(stride_pair), list(pad))
    return out if batched else out.squeeze(0)
