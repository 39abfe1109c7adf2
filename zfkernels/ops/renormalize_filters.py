"""Zeiler & Fergus's filter renormalization: a conv filter whose RMS exceeds a radius is rescaled to it.

The paper (Sec. 3, "Training details") renormalizes, after every update, each conv-layer filter whose
RMS value exceeds a fixed radius of 1e-1 back to that radius, which kept the first layer's filters from
being dominated by a few. Here it is an in-place custom op plus the two ways to use it in training:

    zfkernels.renormalize_filters_(model)                              # after optimizer.step()
    optimizer.register_step_post_hook(zfkernels.filter_renormalizer(model))   # or once, as a hook
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor

from ._backend import define_op, implementation, op
from ._checks import FLOAT_DTYPES

ModuleOrTensor = TypeVar("ModuleOrTensor", torch.nn.Module, Tensor)

PAPER_RADIUS = 0.1  # "renormalize each filter ... whose RMS value exceeds a fixed radius of 1e-1"


@define_op("renormalize_filters_", mutates_args=("weight",))
def _renormalize_filters_op(weight: Tensor, radius: float) -> None:
    implementation(weight.device).renormalize_filters_(weight, radius)


@_renormalize_filters_op.register_fake
def _(weight, radius):
    return None  # mutates `weight` in place: nothing new to describe


def _check_radius(radius: object) -> float:
    if not isinstance(radius, (int, float)) or isinstance(radius, bool):
        raise TypeError(f"radius must be a positive finite float, got {radius!r}")
    if not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius must be a positive finite float, got {radius!r}")
    return float(radius)


def _check_weight(weight: object, name: str) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in FLOAT_DTYPES]}, got {weight.dtype}")
    if weight.dim() < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (filters along dim 0), got shape {tuple(weight.shape)}"
        )


def _conv_weights(model: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """(qualified name, weight) of every nn.Conv2d in `model` (subclasses included), each checked."""
    weights = [
        (f"{name}.weight" if name else "weight", module.weight)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Conv2d)
    ]
    if not weights:
        raise ValueError(
            f"model has no nn.Conv2d layer to renormalize (got a {type(model).__name__}); "
            "pass a weight tensor to renormalize other filters"
        )
    for name, weight in weights:
        _check_weight(weight, name)
    return weights


def renormalize_filters_(model_or_weight: ModuleOrTensor, radius: float = PAPER_RADIUS) -> ModuleOrTensor:
    """Rescale, in place, every filter whose RMS exceeds ``radius`` to RMS exactly ``radius``.

    A Tensor is a weight of at least 2 dimensions whose filters lie along dim 0 (``(out, in, kh, kw)``
    for a conv); a filter's RMS is ``sqrt(mean(w_f ** 2))`` over all its elements. Filters at or below the
    radius keep their bits; the others are multiplied by ``radius / rms``. The sum of squares is taken
    in float64 whatever the dtype, and half-precision filters are scaled in float32 and rounded once.

    An ``nn.Module`` has this applied to the weight of every ``nn.Conv2d`` in it: the paper renormalizes
    conv filters only, so linear layers, biases and transposed convolutions are left alone.

    Not differentiable: it is a projection applied between optimizer steps, so it runs under
    ``torch.no_grad()``. Returns its argument.
    """
    radius = _check_radius(radius)
    if isinstance(model_or_weight, torch.nn.Module):
        weights = [weight for _, weight in _conv_weights(model_or_weight)]
    elif isinstance(model_or_weight, Tensor):
        _check_weight(model_or_weight, "weight")
        weights = [model_or_weight]
    else:
        raise TypeError(
            "model_or_weight must be a torch.nn.Module or a weight torch.Tensor, "
            f"got {type(model_or_weight).__name__}"
        )
    with torch.no_grad():  # parameters are leaves that require grad: no autograd record of the update
        for weight in weights:
            op("renormalize_filters_", weight.device)(weight, radius)
    return model_or_weight


class FilterRenormalizer:
    """Callable that renormalizes ``model``'s conv filters; built for ``register_step_post_hook``.

    ``optimizer.register_step_post_hook(zfkernels.filter_renormalizer(model))`` runs the paper's
    renormalization after every ``optimizer.step()``. It can also be called directly, with no arguments.
    The model's conv layers are looked up on each call, so layers swapped in later are covered too.
    """

    def __init__(self, model: torch.nn.Module, radius: float = PAPER_RADIUS):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.radius = _check_radius(radius)
        _conv_weights(model)  # fail now, not at the first optimizer step
        self.model = model

    def __call__(self, *hook_args: object) -> None:
        """Accepts and ignores the ``(optimizer, args, kwargs)`` an optimizer step hook receives."""
        renormalize_filters_(self.model, self.radius)

    def __repr__(self) -> str:
        return f"FilterRenormalizer({type(self.model).__name__}, radius={self.radius})"


def filter_renormalizer(model: torch.nn.Module, radius: float = PAPER_RADIUS) -> FilterRenormalizer:
    """An optimizer step post-hook applying ``renormalize_filters_(model, radius)`` after each step.

    optimizer.register_step_post_hook(zfkernels.filter_renormalizer(model))
    """
    return FilterRenormalizer(model, radius)
