"""ReLU forward (out of place and in place) and its three backward rules: elementwise Triton kernels.

Exactly reference.relu / relu_backward: relu is ``x < 0 ? +0 : x`` (NaN and -0.0 pass), the standard rule
``output <= 0 ? +0 : grad`` (a NaN output lets the gradient through), deconvnet ``grad < 0 ? +0 : grad``,
guided both. Values are only selected, never computed, so the stored bits are the loaded ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    backend_op,
    check_device,
    launch,
    needs_int64,
    program_offsets,
    register_interpreted_fake,
    widen,
)

BLOCK = 4096  # elements per program: 16 per thread at 8 warps, four 16-byte vectors of fp32
NUM_WARPS = 8
RULE_STANDARD, RULE_DECONVNET, RULE_GUIDED = 0, 1, 2


@triton.jit
def _relu_kernel(x_ptr, out_ptr, numel, INT64: tl.constexpr, BLOCK: tl.constexpr):
    offsets = program_offsets(INT64, BLOCK)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, tl.where(widen(x) < 0, 0.0, x), mask=mask)  # +0.0 in x's dtype


@triton.jit
def _relu_backward_kernel(
    grad_ptr, output_ptr, out_ptr, numel, RULE: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr
):
    offsets = program_offsets(INT64, BLOCK)
    mask = offsets < numel
    grad = tl.load(grad_ptr + offsets, mask=mask)
    blocked = tl.zeros(grad.shape, dtype=tl.int1)
    if RULE != 1:  # standard and guided look at the forward output; deconvnet ignores it
        output = tl.load(output_ptr + offsets, mask=mask)
        blocked = blocked | (widen(output) <= 0)
    if RULE != 0:  # deconvnet and guided rectify the gradient itself
        blocked = blocked | (widen(grad) < 0)
    tl.store(out_ptr + offsets, tl.where(blocked, 0.0, grad), mask=mask)


def _grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, BLOCK),)


def _launch_relu(x: Tensor, out: Tensor) -> None:
    numel = x.numel()
    if numel:
        launch(_relu_kernel)[_grid(numel)](x, out, numel, needs_int64(x), BLOCK, num_warps=NUM_WARPS)


@backend_op("relu", mutates_args=())
def _relu_op(input: Tensor, rule: int) -> Tensor:
    """zfkernels::relu's schema: `rule` only matters to the backward, which the zfkernels op registers."""
    check_device(input)
    x = input.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch_relu(x, out)
    return out


register_interpreted_fake(
    _relu_op, lambda input, rule: torch.empty_like(input, memory_format=torch.contiguous_format)
)


@backend_op("relu_", mutates_args=("input",))
def _relu_inplace_op(input: Tensor) -> None:
    check_device(input)
    if input.is_contiguous():
        _launch_relu(input, input)  # each element is read before it is written, by the same thread
    else:
        input.copy_(_relu_op(input, 0))


register_interpreted_fake(_relu_inplace_op, lambda input: None)


@backend_op("relu_backward", mutates_args=())
def _relu_backward_op(grad: Tensor, output: Tensor, rule: int) -> Tensor:
    check_device(grad)
    g = grad.contiguous()
    o = output.contiguous() if rule != RULE_DECONVNET else g  # deconvnet never loads the output
    out = torch.empty_like(g, memory_format=torch.contiguous_format)
    numel = g.numel()
    if numel:
        launch(_relu_backward_kernel)[_grid(numel)](
            g, o, out, numel, rule, needs_int64(g), BLOCK, num_warps=NUM_WARPS
        )
    return out


register_interpreted_fake(
    _relu_backward_op,
    lambda grad, output, rule: torch.empty_like(grad, memory_format=torch.contiguous_format),
)


def relu(input: Tensor) -> Tensor:
    """torch.relu, bit for bit, as a contiguous tensor."""
    return _relu_op(input, RULE_STANDARD)


def relu_(input: Tensor) -> Tensor:
    """torch.relu_ in place; returns `input`."""
    _relu_inplace_op(input)
    return input


def relu_backward(grad: Tensor, output: Tensor, rule: int) -> Tensor:
    """The gradient ReLU sends back under `rule` (0 standard, 1 deconvnet, 2 guided) given its output."""
    return _relu_backward_op(grad, output, rule)
