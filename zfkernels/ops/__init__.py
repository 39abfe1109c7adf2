"""Public functional API: each op is a torch.library custom op with a fake and an autograd formula."""

from ._backend import available_backends, get_backend, set_backend, use_backend
from .conv_transpose import conv_transpose2d
from .max_pool import max_pool2d_switches, switches_to_indices
from .max_unpool import gather_switches, max_unpool2d
from .relu import relu, relu_backward
from .renormalize_filters import FilterRenormalizer, filter_renormalizer, renormalize_filters_
from .unpool_conv_transpose import unpool_conv_transpose2d

__all__ = [
    "FilterRenormalizer",
    "available_backends",
    "conv_transpose2d",
    "filter_renormalizer",
    "gather_switches",
    "get_backend",
    "max_pool2d_switches",
    "max_unpool2d",
    "relu",
    "relu_backward",
    "renormalize_filters_",
    "set_backend",
    "switches_to_indices",
    "unpool_conv_transpose2d",
    "use_backend",
]
