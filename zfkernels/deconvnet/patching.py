"""``patch(model)``: zfkernels' pool, ReLU and transposed conv inside a user's model; deconvnet/guided modes.

Why: hook-based tools (captum's NeuronDeconvolution / GuidedBackprop) hook nn.ReLU modules: they miss F.relu
calls, and drop a skip's share of a gradient they rewrite. A rule carried by the op itself cannot be missed.

    model = patch(torchvision.models.resnet18())    # outputs unchanged, bit for bit (no ConvTranspose2d)
    with deconvnet_mode(model):                     # or guided_backprop_mode(model)
        model(x)[0, k].backward()                   # x.grad is the deconvnet projection of logit k
    unpatch(model)                                  # the exact original model again

How it works:
- Modules are patched *in place* by switching their class (``module.__class__``), never replaced: the
  same objects keep their Parameters (optimizers stay valid), buffers, hooks, training flag and every
  reference the model or the user holds to them, and ``unpatch`` switches the class back.
  ``nn.MaxPool2d`` -> :class:`SwitchMaxPool2d` (our switch-recording pool; backward = our summing unpool),
  ``nn.ReLU`` -> ``zfkernels.nn.ReLU`` (same ``inplace``), ``nn.ConvTranspose2d`` ->
  ``zfkernels.nn.ConvTranspose2d``. Only these exact types are patched: a subclass may have its own code,
  so it is left alone with a warning, as is a max-pool with ``dilation != 1`` (our op has no dilation).
- Functional ReLUs (``F.relu``, ``torch.relu``, ``Tensor.relu`` and the in-place ``F.relu(inplace=True)``,
  ``torch.relu_``, ``Tensor.relu_``) are rerouted to ``zfkernels.relu`` by a ``TorchFunctionMode`` entered
  around the patched model's ``forward`` (an instance-level wrapper): code outside that forward is not
  touched, and ``torch.compile(fullgraph=True)`` traces the mode. The mode covers calls that go through
  the patched model's ``__call__``/``forward``; calling a submodule directly bypasses it (patch that
  submodule too if you call it on its own).
- ``deconvnet_mode`` / ``guided_backprop_mode`` switch the backward rule of every ``zfkernels.nn.ReLU``
  and of the functional ReLUs in the model, and restore the previous rules on exit (also on exception).
  The rule is recorded when the forward runs: run the forward inside the block. Modes change the model's
  state, so do not run one model in two threads with different modes.
- Not rerouted: functional max-pools (``F.max_pool2d``; torch's backward also sums at shared argmaxes) and
  other spellings of a ReLU (``clamp(min=0)``, ``F.threshold``).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import nn as znn
from .. import ops
from ..ops._checks import FLOAT_DTYPES
from ..ops.reference import RULES

__all__ = ["SwitchMaxPool2d", "deconvnet_mode", "guided_backprop_mode", "is_patched", "patch", "unpatch"]

# Attribute names on patched objects: the class a patched module had, and the model-level patch state.
_ORIGINAL_CLASS = "_zfkernels_original_class"
_STATE = "_zfkernels_patch"


class SwitchMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` computed by ``zfkernels.max_pool2d_switches``: same outputs, bit for bit.

    Its backward is our unpool with the recorded switches, which sums where overlapping windows share an
    argmax (the deconvnet's unpooling). ``return_indices=True`` still returns torch's int64 indices
    (converted from the switches). Inputs our op does not take (integer, bool or complex dtypes, neither 3-D
    nor 4-D) run ``nn.MaxPool2d``'s own forward: the same result, or the same error.
    """

    def forward(self, input: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.dilation not in (1, (1, 1), [1, 1]):
            raise ValueError(f"SwitchMaxPool2d supports dilation=1 only, got dilation={self.dilation!r}")
        if not isinstance(input, Tensor) or input.dtype not in FLOAT_DTYPES or input.dim() not in (3, 4):
            return super().forward(input)  # torch's result, or torch's error
        values, switches = ops.max_pool2d_switches(
            input, self.kernel_size, self.stride, self.padding, self.ceil_mode
        )
        if not self.return_indices:
            return values
        indices = ops.switches_to_indices(
            switches, input.shape[-2:], self.kernel_size, self.stride, self.padding
        )
        return values, indices


# Exact type -> the class it becomes. Subclasses are not patched: they may override forward.
_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.MaxPool2d: SwitchMaxPool2d,
    nn.ReLU: znn.ReLU,
    nn.ConvTranspose2d: znn.ConvTranspose2d,
}


class _FunctionalReLU(TorchFunctionMode):
    """Routes torch's functional ReLUs to ``zfkernels.relu`` with a backward rule; passes all else on."""

    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        inplace = None
        if func is torch.nn.functional.relu:
            inplace = bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
        elif func is torch.relu or func is Tensor.relu:
            inplace = False
        elif func is torch.relu_ or func is Tensor.relu_:
            inplace = True
        if inplace is not None:
            input = args[0] if args else kwargs.get("input", kwargs.get("self"))
            if znn._relu_takes(input):  # anything else (integers, bool, complex...) runs torch's own
                return ops.relu(input, inplace, backward=self.rule)
        return func(*args, **kwargs)


class _PatchState:
    """What ``patch`` added to the model's root: the functional ReLU rule and the forward it wrapped."""

    def __init__(self, instance_forward: Callable[..., Any] | None):
        self.rule = "standard"
        # The model's own instance-level forward, if it had one (restored by unpatch); None: the class's.
        self.instance_forward = instance_forward


def _patched_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The patched model's forward: its original forward inside the functional-ReLU mode."""
    state: _PatchState = getattr(module, _STATE)
    forward = state.instance_forward
    with _FunctionalReLU(state.rule):
        if forward is not None:
            return forward(*args, **kwargs)
        return type(module).forward(module, *args, **kwargs)


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``patch`` has been applied to ``model`` itself (and not undone)."""
    return isinstance(getattr(_check_model(model), _STATE, None), _PatchState)


def _unpatchable_reason(module: nn.Module) -> str | None:
    """Why a pool/ReLU/conv-transpose module is left as it is; None when it is patchable or irrelevant."""
    kind = type(module)
    if kind is nn.MaxPool2d and module.dilation not in (1, (1, 1), [1, 1]):
        return f"dilation={module.dilation!r}: zfkernels' max-pool has no dilation"
    if kind in _REPLACEMENTS or isinstance(module, tuple(_REPLACEMENTS.values())):
        return None
    for base in _REPLACEMENTS:
        if isinstance(module, base):
            return f"{kind.__name__} subclasses nn.{base.__name__} and may have its own code"
    return None


def patch(model: nn.Module) -> nn.Module:
    """Swap zfkernels' ops into ``model`` in place and return it; outputs stay as stock's (see below).

    nn.MaxPool2d -> :class:`SwitchMaxPool2d`, nn.ReLU -> ``zfkernels.nn.ReLU``, nn.ConvTranspose2d ->
    ``zfkernels.nn.ConvTranspose2d`` (the same module objects, class switched: Parameters, buffers and
    hooks stay), and functional ReLUs called inside ``model``'s forward -> ``zfkernels.relu``.
    Modules that cannot be patched (max-pool with dilation, subclasses of these types, TorchScript
    submodules) are left as they are and named in a ``UserWarning``; a TorchScript ``model`` raises
    TypeError. Patching a patched model changes nothing.

    What stays identical: max-pools and ReLUs (modules and functional) give stock's outputs bit for bit,
    and on the CPU their gradients too (our unpool sums shared argmaxes in the order torch's CPU max-pool
    backward does). ``ConvTranspose2d`` is bit for bit too where it calls the same ``F.conv_transpose2d``
    as stock: more than 4 output channels, groups or dilation, fp16/bf16, an empty batch, and CUDA tensors
    under the default "auto" backend. The exception is CPU tensors in fp32/fp64 with at most 4 output
    channels, groups=1 and dilation=1 (an RGB first layer, ZFNet's 96 -> 3): they run our direct kernel,
    which sums in another order, so outputs agree with stock to rounding (allclose, about 1e-6 of the
    output's scale at ZFNet's layer 1), not bit for bit; so do the "triton" and "cuda" backends' own
    kernels. Its gradient is ``aten.convolution_backward``, as stock's. Inputs our ops do not take
    (integer, bool or complex dtypes, ranks they lack) run torch's own op: stock's result or stock's error.
    """
    _check_model(model)
    if isinstance(model, torch.jit.ScriptModule):
        # Its forward is compiled TorchScript: switching classes changes nothing it runs, and the modes
        # would then give plain gradients without a word.
        raise TypeError(
            "model is a TorchScript module (torch.jit.script/trace), whose compiled code cannot be patched; "
            "patch the eager model instead"
        )
    skipped = []
    scripted: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in scripted):
            continue  # inside a TorchScript submodule, already reported
        if isinstance(module, torch.jit.ScriptModule):
            scripted.append(name)
            skipped.append(f"{name} (a TorchScript module: its compiled code cannot be patched)")
            continue
        reason = _unpatchable_reason(module)
        if reason is not None:
            skipped.append(f"{name or '<model>'} ({reason})")
            continue
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is None:
            continue
        original = type(module)
        module.__class__ = replacement
        setattr(module, _ORIGINAL_CLASS, original)
        if replacement is znn.ReLU:
            module.backward = "standard"
    if not is_patched(model):
        instance_forward = model.__dict__.get("forward")
        setattr(model, _STATE, _PatchState(instance_forward))
        wrapper = functools.partial(_patched_forward, model)
        try:  # tools that read forward's signature (argument filtering, tracing) see the original one
            wrapper.__signature__ = inspect.signature(  # type: ignore[attr-defined]
                instance_forward if instance_forward is not None else type(model).forward.__get__(model)
            )
        except (TypeError, ValueError):  # no signature to copy (a builtin forward): keep partial's own
            pass
        model.forward = wrapper
    if skipped:
        warnings.warn(
            "zfkernels.patch left these modules unpatched (they keep torch's implementation and "
            "backward): " + "; ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch`` everywhere in ``model`` and return it: the original classes and forward come back.

    The module objects were never replaced, so the state dict, Parameters and hooks are the originals.
    On a model that was never patched this is a no-op.
    """
    _check_model(model)
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL_CLASS, None)
        if original is not None:
            if isinstance(module, znn.ReLU):
                module.__dict__.pop("backward", None)
            module.__class__ = original
        state = module.__dict__.pop(_STATE, None)
        if isinstance(state, _PatchState):
            if state.instance_forward is not None:
                module.forward = state.instance_forward
            else:
                module.__dict__.pop("forward", None)
    return model


class _BackwardRule:
    """Context manager: every ReLU of a patched model uses backward rule ``rule`` until exit."""

    def __init__(self, model: nn.Module, rule: str):
        _check_model(model)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
        if not is_patched(model):
            raise ValueError(
                "model is not patched: call patch(model) first (the rule is carried by zfkernels' ReLU, "
                "which patch() puts into the model; unpatch(model) takes it out again)"
            )
        self.model, self.rule = model, rule
        self._saved: list[tuple[object, str, str]] = []  # (owner, attribute, previous rule)

    def __enter__(self) -> nn.Module:
        if self._saved:
            raise RuntimeError("this backward-rule context is already active; create a new one to nest")
        for module in self.model.modules():
            # Module ReLUs carry the rule in `backward`; functional ReLUs read it from the patch state.
            targets: list[tuple[object, str]] = []
            if isinstance(module, znn.ReLU):
                targets.append((module, "backward"))
            state = module.__dict__.get(_STATE)
            if isinstance(state, _PatchState):
                targets.append((state, "rule"))
            for owner, attribute in targets:
                self._saved.append((owner, attribute, getattr(owner, attribute)))
                setattr(owner, attribute, self.rule)
        return self.model

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for owner, attribute, previous in reversed(self._saved):
            setattr(owner, attribute, previous)
        self._saved = []


def deconvnet_mode(model: nn.Module) -> _BackwardRule:
    """Context manager: inside it, autograd through patched ``model`` gives the deconvnet signal.

    Every ReLU (module or functional) sends back relu(grad) whatever its input; max-pools send the
    gradient back through our unpool, which sums at shared argmaxes (Zeiler & Fergus 2013). Use it as
    ``with deconvnet_mode(model): model(x)[0, k].backward()``. Raises ValueError if ``model`` is not
    patched (call ``patch(model)`` first).
    """
    return _BackwardRule(model, "deconvnet")


def guided_backprop_mode(model: nn.Module) -> _BackwardRule:
    """Context manager: inside it, autograd through patched ``model`` gives guided backprop.

    Every ReLU (module or functional) sends back relu(grad) where its input was positive, zero elsewhere
    (Springenberg et al. 2014). Raises ValueError if ``model`` is not patched (call ``patch(model)`` first).
    """
    return _BackwardRule(model, "guided")
