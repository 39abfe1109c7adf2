"""Deconvnet machinery on top of the ops: projections of single activations to pixel space (DeconvNet),
their receptive fields, Fig. 2-style grids, and patching of user models (deconvnet/guided modes)."""

from .chain import SUPPORTED_LAYERS
from .grid import grid_image, save_grid
from .patching import SwitchMaxPool2d, deconvnet_mode, guided_backprop_mode, is_patched, patch, unpatch
from .projection import DeconvNet, Projection
from .receptive_field import LayerGeometry, ReceptiveField, input_boxes, receptive_fields

__all__ = [
    "SUPPORTED_LAYERS",
    "DeconvNet",
    "LayerGeometry",
    "Projection",
    "ReceptiveField",
    "SwitchMaxPool2d",
    "deconvnet_mode",
    "grid_image",
    "guided_backprop_mode",
    "input_boxes",
    "is_patched",
    "patch",
    "receptive_fields",
    "save_grid",
    "unpatch",
]
