"""Deconvnet machinery on top of the ops: patching user models, and (projection) single-activation
projections to pixel space."""

from .patching import SwitchMaxPool2d, deconvnet_mode, guided_backprop_mode, is_patched, patch, unpatch

__all__ = ["SwitchMaxPool2d", "deconvnet_mode", "guided_backprop_mode", "is_patched", "patch", "unpatch"]
