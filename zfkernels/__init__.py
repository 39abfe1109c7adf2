"""zfkernels: fast, exact Zeiler & Fergus deconvnet kernels for PyTorch.

    import zfkernels
    values, switches = zfkernels.max_pool2d_switches(x, 3, 2, ceil_mode=True, relu=True)
    back = zfkernels.max_unpool2d(values, switches, 3, 2, output_size=x.shape[-2:], relu=True)
"""

from . import deconvnet, memory, models, nn, ops
from .deconvnet import DeconvNet, deconvnet_mode, guided_backprop_mode, is_patched, patch, unpatch
from .ops import *  # noqa: F403  (the public ops, listed once in ops.__all__)

__version__ = "0.1.0"
__all__ = [
    *ops.__all__,
    "DeconvNet",
    "deconvnet",
    "deconvnet_mode",
    "guided_backprop_mode",
    "is_patched",
    "memory",
    "models",
    "nn",
    "patch",
    "unpatch",
]
