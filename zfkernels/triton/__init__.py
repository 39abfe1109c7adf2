"""The "triton" backend: Triton kernels, one file per op, each launched through a torch.library.triton_op
(namespace zfkernels_triton, same schemas as the zfkernels custom ops) so torch.compile can trace into it.

Same functions and semantics as zfkernels/ops/reference.py. On CUDA tensors the kernels are compiled; with
TRITON_INTERPRET=1 set before this package is imported they run in Triton's interpreter on CPU tensors,
which is how the test suite checks them on machines without a GPU.
"""

from ..ops import _backend
from .conv_transpose import conv_transpose2d
from .max_pool import max_pool2d_switches, max_pool2d_switches_backward
from .max_unpool import gather_switches, max_unpool2d
from .relu import relu, relu_, relu_backward
from .renormalize_filters import renormalize_filters_
from .unpool_conv_transpose import unpool_conv_transpose2d

_backend.register_twin_autograd("zfkernels_triton")

__all__ = [
    "conv_transpose2d",
    "gather_switches",
    "max_pool2d_switches",
    "max_pool2d_switches_backward",
    "max_unpool2d",
    "relu",
    "relu_",
    "relu_backward",
    "renormalize_filters_",
    "unpool_conv_transpose2d",
]
