"""ReLU with a selectable backward rule: standard, deconvnet (relu of the gradient) or guided."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension
from ..memory import CACHED_OUTPUT_MIN_BYTES
from ._backend import (
    define_op,
    dispatcher_needed,
    get_backend,
    has_tangent,
    implementation,
    op,
    register_autograd,
    runs_directly,
)
from ._checks import check_same_device, check_tensor
from .reference import RULES


@define_op("relu", mutates_args=())
def _relu_op(input: Tensor, rule: int) -> Tensor:
    return implementation(input.device).relu(input)


@_relu_op.register_fake
def _(input, rule):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _relu_setup(ctx, inputs, output):
    ctx.rule = inputs[1]
    ctx.save_for_backward(output)


def _relu_backward(ctx, grad):
    (output,) = ctx.saved_tensors
    return op("relu_backward", grad.device)(grad, output, ctx.rule), None


def _relu_jvp(inputs, output, tangents):
    # Forward mode is the true derivative whatever the rule (the rules only redefine the backward signal).
    return op("relu_backward", output.device)(tangents[0], output, 0)


register_autograd(_relu_op, _relu_backward, _relu_setup, _relu_jvp)


@define_op("relu_", mutates_args=("input",))
def _relu_inplace_op(input: Tensor) -> None:
    implementation(input.device).relu_(input)


@define_op("relu_backward", mutates_args=())
def _relu_backward_op(grad: Tensor, output: Tensor, rule: int) -> Tensor:
    return implementation(grad.device).relu_backward(grad, output, rule)


@_relu_backward_op.register_fake
def _(grad, output, rule):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _relu_backward_setup(ctx, inputs, output):
    _, forward_output, rule = inputs
    ctx.rule = rule
    # Each rule passes grad or zero; which one depends on the forward output (standard) or on the result.
    ctx.save_for_backward(forward_output if RULES[rule] == "standard" else output)


def _relu_backward_backward(ctx, grad_grad):
    (mask_source,) = ctx.saved_tensors
    return op("relu_backward", grad_grad.device)(grad_grad, mask_source, 0), None, None


def _relu_backward_jvp(inputs, output, tangents):
    # Each rule passes grad or zero, so the tangent passes where grad passed (the gate the double backward
    # uses too); the forward output has a zero derivative almost everywhere.
    grad, forward_output, rule = inputs
    if tangents[0] is None:
        return None
    gate = forward_output if RULES[rule] == "standard" else output
    return op("relu_backward", grad.device)(tangents[0], gate, 0)


register_autograd(_relu_backward_op, _relu_backward_backward, _relu_backward_setup, _relu_backward_jvp)


class zfkernels_relu_(torch.autograd.Function):  # noqa: N801 (graphs read "zfkernels_relu_Backward")
    """ReLU in place under autograd, as torch.relu_: the input becomes the output, whose sign the backward
    reads. Plain eager only (a mutating custom op cannot carry a backward formula): elsewhere an in-place
    call under autograd writes a copy back."""

    @staticmethod
    def forward(input: Tensor, rule: int) -> Tensor:
        implementation(input.device).relu_(input)
        return input

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_dirty(inputs[0])
        ctx.rule = inputs[1]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        return _relu_backward(ctx, grad)


def _stock_is_the_same_and_faster(input: Tensor) -> bool:
    """Whether this call runs torch's own ReLU: the standard rule is torch.relu bit for bit, forward and
    backward (threshold_backward), and below the CPU output cache's size (8 MiB, where our kernel saves the
    page faults of a fresh output) torch's C++ call costs less than ours through Python: in a patched
    ResNet18 at 32x32 that call overhead made a training step 0.96x the stock model's, 1.01-1.04x without.
    Only where the cpu backend would run it (a backend named for a test or a bench runs itself), in plain
    eager code (modes, compile and tracing see our op) and on contiguous tensors (ours returns those)."""
    return (
        input.device.type == "cpu"
        and input.nbytes < CACHED_OUTPUT_MIN_BYTES
        and get_backend() == "auto"
        and _extension.cpu_module is not None
        and input.is_contiguous()
        and not dispatcher_needed((input,))
    )


def _rule_code(backward: str) -> int:
    if backward not in RULES:
        raise ValueError(f"backward must be one of {list(RULES)}, got {backward!r}")
    return RULES.index(backward)


def relu(input: Tensor, inplace: bool = False, *, backward: str = "standard") -> Tensor:
    """``torch.relu`` (bit for bit, NaN and -0.0 included) with a choice of gradient rule.

    backward="standard": the true gradient; "deconvnet": relu(grad), the Zeiler & Fergus projection;
    "guided": relu(grad) where the input was positive (guided backprop).
    """
    check_tensor(input, "input", None)
    rule = _rule_code(backward)
    if rule == 0 and _stock_is_the_same_and_faster(input):
        return torch.relu_(input) if inplace else torch.relu(input)
    if not inplace:
        return op("relu", input.device)(input, rule)
    if (torch.is_grad_enabled() and input.requires_grad) or has_tangent(input):
        if runs_directly("relu_", input):
            return zfkernels_relu_.apply(input, rule)
        # autograd (and forward AD) records the copy like any in-place op
        return input.copy_(op("relu", input.device)(input, rule))
    op("relu_", input.device)(input)
    return input


def relu_backward(grad: Tensor, output: Tensor, backward: str = "standard") -> Tensor:
    """The gradient ``relu`` sends back under a rule, given the forward ``output``."""
    check_tensor(grad, "grad", None)
    check_tensor(output, "output", None)
    if grad.shape != output.shape or grad.dtype != output.dtype:
        raise ValueError(
            f"output must match grad's shape and dtype {tuple(grad.shape)}/{grad.dtype}, "
            f"got {tuple(output.shape)}/{output.dtype}"
        )
    check_same_device(grad=grad, output=output)
    return op("relu_backward", grad.device)(grad, output, _rule_code(backward))
