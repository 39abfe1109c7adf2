"""Every expected difference between zfkernels and the two upstream test suites it is checked against.

The suites: PyTorch's OpInfo samples and error inputs (`torch.testing._internal.common_methods_invocations
.op_db`) for max_pool2d, max_unpool2d, conv_transpose2d and relu, run by tests/test_upstream_opinfo.py;
captum's deconvolution and guided-backprop tests (and the models in `captum.testing.helpers.basic_models`),
run by tests/test_upstream_captum.py against `zfkernels.patch(model)` + `deconvnet_mode` /
`guided_backprop_mode`.

An expected difference is never a skip: where one applies, the tests assert what zfkernels does instead
(the `zfkernels_does` column), and they look the entry up by its key here, so an unlisted difference fails
and a listed one is exercised. Anything that differs and is not listed here is a bug.

The README quotes `DIFFERENCES` (`python tests/upstream_differences.py` prints it as a markdown table).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Difference:
    key: str  # how the tests refer to it
    applies_to: str  # the upstream op / case
    zfkernels_does: str  # what the tests assert instead of torch's (or captum's) result
    reason: str  # why: one line, for users
    asserted_in: str = ""  # the test that asserts it, where not tests/test_upstream_*.py


DIFFERENCES: dict[str, Difference] = {
    d.key: d
    for d in [
        # ---------------------------------------------------------------------------- OpInfo: max_pool2d
        Difference(
            "max_pool2d.dilation",
            "nn.functional.max_pool2d samples with dilation != 1",
            "max_pool2d_switches raises TypeError naming `dilation` (it has no dilation parameter)",
            "a switch is an offset in a dense window; the deconvnet's pools are dense, and patch() leaves "
            "dilated nn.MaxPool2d modules to torch (with a warning)",
        ),
        Difference(
            "max_pool2d.switches_not_indices",
            "nn.functional.max_pool2d with return_indices=True",
            "returns (values, switches) always; switches_to_indices(switches, ...) equals torch's int64 "
            "indices bit for bit",
            "switches are window-local offsets (uint8 for windows up to 256 elements), 8x smaller than "
            "int64 flat indices; the conversion is exact",
        ),
        Difference(
            "max_pool2d.integer_dtypes",
            "nn.functional.max_pool2d samples of integer dtypes (uint8, int8, int16, int32, int64)",
            "raises TypeError naming `input`",
            "the ops are for float activations: float32, float64, float16 and bfloat16 only",
        ),
        Difference(
            "errors.exception_type",
            "error_inputs of max_pool2d and max_unpool2d (and torch's other argument errors)",
            "raises ValueError or TypeError whose message names the argument at fault, where torch raises "
            "RuntimeError (or ValueError from its argument parser)",
            "arguments are checked in Python before the custom op, so errors are ordinary Python "
            "exceptions that say which argument is wrong",
        ),
        # -------------------------------------------------------------------------- OpInfo: max_unpool2d
        Difference(
            "max_unpool2d.sums_shared_argmax",
            "nn.functional.max_unpool2d samples where overlapping windows share an argmax",
            "sums the values that point at one position (fp16/bf16 accumulate in fp32, rounded once): "
            "equals a scatter_add_ oracle bit for bit, and torch's result wherever no argmax is shared",
            "the sum is the gradient of max-pool, which the deconvnet needs; torch overwrites (one value "
            "survives, nondeterministically on CUDA)",
        ),
        # ---------------------------------------------------------------------- OpInfo: conv_transpose2d
        Difference(
            "conv_transpose2d.rounding",
            "nn.functional.conv_transpose2d samples (float dtypes)",
            "close, not bit-equal: float64 within rtol 1e-10, float32 within rtol 1e-4 / atol 1e-5 x the "
            "output's scale, float16/bfloat16 within 2x torch's own error against a float64 computation",
            "the CPU backend's direct kernel (up to 4 output channels) and the Triton kernels sum in a "
            "different order than oneDNN",
        ),
        Difference(
            "conv_transpose2d.nonfinite_weight",
            "nn.functional.conv_transpose2d (and the fused op's composition) below float64 on CPU with a "
            "NaN or infinite weight",
            "NaN and inf exactly where the float64 computation has them: only real input x weight "
            "products are formed",
            "torch's CPU path below float64 (oneDNN) in some geometries, mostly with output_padding, also "
            "multiplies the output's padding by the weight: NaN where no product exists",
        ),
        Difference(
            "conv_transpose2d.integer_complex_dtypes",
            "nn.functional.conv_transpose2d samples of int64, complex64 and complex128",
            "raises TypeError naming `input`",
            "the ops are for float activations: float32, float64, float16 and bfloat16 only",
        ),
        # ---------------------------------------------------------------------------------- OpInfo: relu
        Difference(
            "half_precision.nan_bits",
            "float16/bfloat16 NaNs: nn.functional.relu reference_inputs (contiguous bfloat16) and "
            "nn.functional.max_unpool2d samples with a NaN among the values (reference backend)",
            "NaN exactly where torch has NaN, but the NaN's bits (sign, payload) may differ: torch's "
            "vectorized bfloat16 relu returns 0xffff where zfkernels passes the input's NaN through; the "
            "reference backend's unpool accumulates in float32 and rounds back (0xffff / 0x7fff) where "
            "torch passes the NaN through",
            "NaN bits are not a value: torch's own bits here depend on the memory layout (its strided "
            "relu passes the NaN through); every non-NaN element is bit-equal",
        ),
        Difference(
            "relu.integer_dtypes",
            "nn.functional.relu samples of integer dtypes (uint8, int8, int16, int32, int64)",
            "raises TypeError naming `input`",
            "the ops are for float activations: float32, float64, float16 and bfloat16 only",
        ),
        # ------------------------------------------------------------------------------------------ captum
        Difference(
            "captum.functional_relu",
            "captum Deconvolution / GuidedBackprop (and the Neuron variants) on models that call F.relu / "
            "torch.relu (captum's BasicModel, BasicModel2 ... BasicModel6_MultiTensor)",
            "applies the rule at every ReLU: equals autograd through a ReLU whose backward is the rule; "
            "captum's result there equals the plain gradient",
            "captum hooks nn.ReLU modules only, so it leaves functional ReLUs' gradients unchanged; patch() "
            "carries the rule in the ReLU op itself",
        ),
        Difference(
            "captum.skip_connection",
            "captum Deconvolution / GuidedBackprop on a model where a ReLU's input also feeds another path "
            "(a pre-activation residual block; none of captum's own test models has one)",
            "the skip path's gradient is added unchanged to the ReLU path's rectified gradient (autograd "
            "through the rule-carrying ReLU)",
            "captum's hook sits on the ReLU's input tensor, so it rewrites that tensor's whole gradient, "
            "the skip path's share included",
            asserted_in="tests/test_patching.py::test_preactivation_residual_captum_is_wrong_our_mode_is_not",
        ),
    ]
}


def expected(key: str) -> Difference:
    """The listed difference `key` (KeyError names it if a test refers to one that is not listed)."""
    try:
        return DIFFERENCES[key]
    except KeyError:
        raise KeyError(f"{key!r} is not an expected difference in tests/upstream_differences.py") from None


def markdown_table() -> str:
    rows = ["| upstream case | zfkernels | why |", "|---|---|---|"]
    rows += [f"| {d.applies_to} | {d.zfkernels_does} | {d.reason} |" for d in DIFFERENCES.values()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
