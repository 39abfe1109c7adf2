"""zfkernels: fast, exact Zeiler & Fergus deconvnet kernels for PyTorch.

import zfkernels
values, switches = zfkernels.max_pool2d_switches(x, 3, 2, ceil_mode=True, relu=True)
back = zfkernels.max_unpool2d(values, switches, 3, 2, output_size=x.shape[-2:], relu=True)
"""

from . import nn
from .ops import (
    available_backends,
    conv_transpose2d,
    gather_switches,
    get_backend,
    max_pool2d_switches,
    max_unpool2d,
    relu,
    relu_backward,
    set_backend,
    switches_to_indices,
    unpool_conv_transpose2d,
    use_backend,
)

__version__ = "0.1.0"
__all__ = [
    "available_backends",
    "conv_transpose2d",
    "gather_switches",
    "get_backend",
    "max_pool2d_switches",
    "max_unpool2d",
    "nn",
    "relu",
    "relu_backward",
    "set_backend",
    "switches_to_indices",
    "unpool_conv_transpose2d",
    "use_backend",
]
