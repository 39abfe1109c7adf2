"""The chain of layers from a model's input to one of its layers, read from the model, and its forward pass.

A deconvnet can project an activation back to the pixels only through layers it can invert: convolutions
(transposed conv with the same weights), ReLUs (ReLU of the backward signal), max-pools (unpool with
the switches recorded on the way up) and eval-mode batch-norm, which is affine (``a * x + b`` per channel)
and so goes down as its transpose, a per-channel scale by ``a``. Local response normalization is run on the
way up but skipped on the way down, as in Zeiler & Fergus (2013) (its backward taken as the identity,
which is not its gradient); dropout (off in eval mode) and ``nn.Identity`` are the identity both ways.
Anything else on the path (an average pool, a residual add, a concatenation, a grouped or dilated conv)
ends the chain: such layers take the gradient path (``gradient.py``) instead.

The path is read with ``torch.fx`` symbolic tracing, so it follows the model's ``forward`` (functional
``F.relu`` calls included) rather than the order modules were registered in. Optional arguments of the
forward are bound to their defaults while tracing: the call analysed is ``model(images)``, the one the
projection and its check run. Models that fx cannot trace fall back to registration order;
:func:`check_against_model` then catches a path that disagrees with the model's own forward.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .. import nn as znn
from .. import ops
from ..ops._checks import pair, pool_params, pooled_size
from .receptive_field import LayerGeometry, ReceptiveField, input_boxes, receptive_fields

Pair = tuple[int, int]

__all__ = [
    "BatchNorm",
    "Chain",
    "ChainForward",
    "Conv",
    "LayerChains",
    "MaxPool",
    "ReLU",
    "Skip",
    "SUPPORTED_LAYERS",
    "check_against_model",
    "forward_chains",
]

SUPPORTED_LAYERS = (
    "nn.Conv2d (groups=1, dilation=1, padding_mode='zeros'); "
    "ReLU (nn.ReLU, zfkernels.nn.ReLU, F.relu, torch.relu, Tensor.relu, in place or not); "
    "max-pool (nn.MaxPool2d or F.max_pool2d with dilation=1, zfkernels.nn.MaxPool2dSwitches); "
    "nn.BatchNorm2d / nn.SyncBatchNorm with running statistics (eval mode: affine, projected through its "
    "transpose, a per-channel scale); run on the way up but skipped in the projection: "
    "nn.LocalResponseNorm, nn.CrossMapLRN2d, F.local_response_norm; the identity both ways: nn.Dropout*, "
    "F.dropout*, nn.Identity"
)

_BATCH_NORM_MODULES = (nn.BatchNorm2d, nn.SyncBatchNorm)
_SKIP_MODULES = (
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.Identity,
)
_RELU_MODULES = (nn.ReLU, znn.ReLU)
_POOL_MODULES = (nn.MaxPool2d, znn.MaxPool2dSwitches)
_KNOWN_MODULES = (nn.Conv2d, *_RELU_MODULES, *_POOL_MODULES, *_BATCH_NORM_MODULES, *_SKIP_MODULES)

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_DROPOUT_FUNCTIONS = (
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
)
# Positional parameter names, to read fx's mix of args and kwargs.
_MAX_POOL_PARAMS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


# ------------------------------------------------------------------------------------------------- ops
@dataclass(frozen=True, eq=False)
class Conv:
    """A 2-D convolution: transposed conv with the same weights (no bias) on the way down."""

    name: str
    module: nn.Conv2d
    kernel: Pair
    stride: Pair
    padding: Pair

    @property
    def in_channels(self) -> int:
        return self.module.in_channels

    @property
    def out_channels(self) -> int:
        return self.module.out_channels

    @property
    def weight(self) -> Tensor:
        return self.module.weight.detach()

    @property
    def geometry(self) -> LayerGeometry:
        return LayerGeometry(self.kernel, self.stride, self.padding)

    def output_size(self, size: Pair) -> Pair:
        return tuple((size[i] + 2 * self.padding[i] - self.kernel[i]) // self.stride[i] + 1 for i in range(2))

    def forward(self, x: Tensor) -> Tensor:
        # The conv the projection inverts, from its parameters: a subclass whose forward does something
        # else then fails the check against the model instead of being projected wrongly.
        module = self.module
        return F.conv2d(x, module.weight, module.bias, self.stride, self.padding)


@dataclass(frozen=True, eq=False)
class ReLU:
    """A ReLU: ReLU of the backward signal on the way down (the deconvnet rule)."""

    name: str
    geometry: LayerGeometry = field(default_factory=LayerGeometry)

    def output_size(self, size: Pair) -> Pair:
        return size


@dataclass(frozen=True, eq=False)
class MaxPool:
    """A max-pool (``relu=True``: with a ReLU fused before it): unpool with its switches on the way down."""

    name: str
    kernel: Pair
    stride: Pair
    padding: Pair
    ceil_mode: bool
    relu: bool = False

    @property
    def geometry(self) -> LayerGeometry:
        return LayerGeometry(self.kernel, self.stride, self.padding)

    def output_size(self, size: Pair) -> Pair:
        return tuple(
            pooled_size(size[i], self.kernel[i], self.stride[i], self.padding[i], self.ceil_mode)
            for i in range(2)
        )


@dataclass(frozen=True, eq=False)
class BatchNorm:
    """Eval-mode batch-norm, ``y = a * x + b`` per channel: its transpose, times ``a``, on the way down.

    ``a = weight / sqrt(running_var + eps)`` (``1 / sqrt(running_var + eps)`` without affine parameters)."""

    name: str
    module: nn.modules.batchnorm._BatchNorm
    geometry: LayerGeometry = field(default_factory=LayerGeometry)

    def output_size(self, size: Pair) -> Pair:
        return size

    def forward(self, x: Tensor) -> Tensor:
        # From the parameters, as Conv.forward: a subclass that does something else fails the check.
        module = self.module
        return F.batch_norm(
            x, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
        )

    def scale(self, dtype: torch.dtype) -> Tensor:
        """``a``, the per-channel factor (C,), in ``dtype``: as batch-norm's own backward forms it."""
        module = self.module
        scale = torch.rsqrt(module.running_var.detach().to(dtype) + module.eps)
        return scale if module.weight is None else module.weight.detach().to(dtype) * scale


@dataclass(frozen=True, eq=False)
class Skip:
    """A pointwise layer run on the way up and skipped on the way down (LRN; dropout and identity)."""

    name: str
    forward: Callable[[Tensor], Tensor]
    geometry: LayerGeometry = field(default_factory=LayerGeometry)

    def output_size(self, size: Pair) -> Pair:
        return size


ChainOp = Conv | ReLU | MaxPool | BatchNorm | Skip


@dataclass(frozen=True)
class ChainForward:
    """What one forward pass along a chain recorded: all the projection needs."""

    activation: Tensor  # the layer's output, (B, C, h, w)
    switches: dict[int, Tensor]  # chain index of each pool -> its switches (B, C, h_pool, w_pool)
    sizes: list[Pair]  # (H, W) after each op of the chain


@dataclass(frozen=True)
class Chain:
    """The ops from the model's input to ``layer`` (its last op), in forward order."""

    layer: str
    ops: tuple[ChainOp, ...]
    traced: bool  # read by fx tracing (True) or from module registration order (False)

    @property
    def convs(self) -> list[Conv]:
        return [op for op in self.ops if isinstance(op, Conv)]

    @property
    def receptive_field(self) -> ReceptiveField:
        """The receptive field of one activation of ``layer`` in the input image."""
        fields = receptive_fields([op.geometry for op in self.ops])
        return fields[-1] if fields else ReceptiveField()

    def input_boxes(self, positions: Tensor, image_size: Pair) -> Tensor:
        """Boxes ``(top, left, bottom, right)`` (half-open, int64, ``(..., 4)``) of the image pixels the
        activations of ``layer`` at ``positions`` (``(..., 2)`` rows and cols) depend on, for images of
        ``image_size``: the receptive field clipped to the image and to every map on the way down."""
        sizes = self.sizes(image_size)
        return input_boxes([op.geometry for op in self.ops], [image_size, *sizes[:-1]], positions)

    def out_channels(self, image_channels: int) -> int:
        convs = self.convs
        return convs[-1].out_channels if convs else image_channels

    def expected_input(self) -> str:
        """What the chain wants as images, in words (for error messages)."""
        convs = self.convs
        channels = (
            f"{convs[0].in_channels} channels (first conv {convs[0].name!r})" if convs else "any channels"
        )
        rows, cols = self.smallest_input_size()
        return f"(B, C, H, W) images with {channels}, at least {rows}x{cols} pixels"

    def smallest_input_size(self, limit: int = 1 << 14) -> Pair:
        """The smallest (H, W) the chain can run on (each axis on its own: the layers act per axis)."""

        def smallest(axis: int) -> int:
            for side in range(1, limit):
                if self._size_error((side, limit) if axis == 0 else (limit, side)) is None:
                    return side
            return limit

        return smallest(0), smallest(1)

    def _size_error(self, size: Pair) -> str | None:
        for op in self.ops:
            if isinstance(op, (Conv, MaxPool)) and (
                size[0] + 2 * op.padding[0] < op.kernel[0] or size[1] + 2 * op.padding[1] < op.kernel[1]
            ):
                return f"{op.name!r} gets a {size[0]}x{size[1]} map, smaller than its {op.kernel} window"
            size = op.output_size(size)
        return None

    def sizes(self, input_size: Pair) -> list[Pair]:
        """(H, W) after each op for ``input_size`` images; ValueError when the images are too small."""
        error = self._size_error(input_size)
        if error is not None:
            raise ValueError(
                f"images of size {input_size[0]}x{input_size[1]} are too small for layer {self.layer!r}: "
                f"{error}; expected {self.expected_input()}"
            )
        sizes, size = [], input_size
        for op in self.ops:
            size = op.output_size(size)
            sizes.append(size)
        return sizes

    def forward(self, images: Tensor) -> ChainForward:
        """Run the chain on ``images``, recording every pool's switches with zfkernels' switch-recording pool.

        A ReLU directly before a pool runs fused into it (one pass; its output map is never needed).
        """
        sizes = self.sizes((images.shape[-2], images.shape[-1]))
        switches: dict[int, Tensor] = {}
        x, pending_relu = images, False
        last = len(self.ops) - 1
        with torch.no_grad():
            for index, op in enumerate(self.ops):
                if isinstance(op, ReLU):
                    if index < last and isinstance(self.ops[index + 1], MaxPool):
                        pending_relu = True  # fused into the pool that follows
                    else:
                        x = ops.relu(x)
                elif isinstance(op, MaxPool):
                    x, switches[index] = ops.max_pool2d_switches(
                        x, op.kernel, op.stride, op.padding, op.ceil_mode, relu=op.relu or pending_relu
                    )
                    pending_relu = False
                else:
                    x = op.forward(x)
        return ChainForward(activation=x, switches=switches, sizes=sizes)


def forward_chains(chains: Sequence[Chain], images: Tensor) -> dict[str, ChainForward]:
    """Run several chains of one model on ``images``, each op once: a prefix shared by chains runs once.

    The chains of a model's layers share their beginnings (AlexNet's conv5 chain holds conv1..conv4's), so
    this is one forward up to the deepest layer, not one per layer. Each chain's record (activation and
    switches) equals its own :meth:`Chain.forward`, bit for bit: a ReLU runs fused into the pool after it
    except where another chain needs its output (which is then relu'd on its own; both are exact).
    """
    names = [tuple(op.name for op in chain.ops) for chain in chains]
    # The states kept: every chain's end and every point where two chains part.
    kept: set[tuple[str, ...]] = set(names)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            common = 0
            while common < min(len(first), len(second)) and first[common] == second[common]:
                common += 1
            kept.add(first[:common])
    states: dict[tuple[str, ...], Tensor] = {(): images}
    switches: dict[tuple[str, ...], Tensor] = {}  # pool's prefix (up to and with the pool) -> switches
    records: dict[str, ChainForward] = {}
    with torch.no_grad():
        for chain, key in sorted(zip(chains, names, strict=True), key=lambda item: item[1]):
            sizes = chain.sizes((images.shape[-2], images.shape[-1]))
            start = max((n for n in range(len(key) + 1) if key[:n] in states), default=0)
            x, pending_relu = states[key[:start]], False
            for index in range(start, len(key)):
                op = chain.ops[index]
                if isinstance(op, ReLU):
                    following = chain.ops[index + 1] if index + 1 < len(key) else None
                    if isinstance(following, MaxPool) and key[: index + 1] not in kept:
                        pending_relu = True  # fused into the pool that follows
                    else:
                        x = ops.relu(x)
                elif isinstance(op, MaxPool):
                    x, switches[key[: index + 1]] = ops.max_pool2d_switches(
                        x, op.kernel, op.stride, op.padding, op.ceil_mode, relu=op.relu or pending_relu
                    )
                    pending_relu = False
                else:
                    x = op.forward(x)
                if key[: index + 1] in kept:
                    states[key[: index + 1]] = x
            own = {i: switches[key[: i + 1]] for i, op in enumerate(chain.ops) if isinstance(op, MaxPool)}
            records[chain.layer] = ChainForward(activation=x, switches=own, sizes=sizes)
    return records


# --------------------------------------------------------------------------------------- classification
def _sentence(text: str) -> str:
    """``text`` ending in exactly one full stop, so messages can be joined sentence after sentence."""
    text = text.strip()
    return text if text.endswith((".", ".)")) else text + "."


def _unsupported(layer: str, what: str, why: str = "") -> ValueError:
    reason = f" ({why})" if why else ""
    return ValueError(
        f"layer {layer!r} cannot be projected: its path from the input goes through {what}{reason}, "
        f"which the deconvnet cannot invert. Supported: {SUPPORTED_LAYERS}."
    )


def _conv_op(name: str, module: nn.Conv2d, layer: str) -> Conv:
    what = f"{name!r} ({type(module).__name__})"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise _unsupported(layer, what, "its weight is not initialized yet: run the model once")
    if module.groups != 1:
        raise _unsupported(layer, what, f"groups={module.groups}")
    if tuple(module.dilation) != (1, 1):
        raise _unsupported(layer, what, f"dilation={tuple(module.dilation)}")
    if module.padding_mode != "zeros":
        raise _unsupported(layer, what, f"padding_mode={module.padding_mode!r}")
    kernel = tuple(module.kernel_size)
    padding = module.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        if kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
            raise _unsupported(layer, what, f"padding='same' with an even kernel {kernel} pads unevenly")
        padding = (kernel[0] // 2, kernel[1] // 2)
    return Conv(name, module, kernel, tuple(module.stride), tuple(padding))


def _pool_op(name: str, layer: str, kernel, stride, padding, dilation, ceil_mode, relu=False) -> MaxPool:
    if pair(dilation, "dilation", 1) != (1, 1):
        raise _unsupported(layer, repr(name), f"max-pool with dilation={dilation}")
    kernel_pair, stride_pair, pad = pool_params(kernel, stride, padding)
    return MaxPool(name, kernel_pair, stride_pair, pad, bool(ceil_mode), bool(relu))


def _module_op(name: str, module: nn.Module, layer: str) -> ChainOp:
    what = f"{name!r} ({type(module).__name__})"
    if isinstance(module, nn.Conv2d):
        return _conv_op(name, module, layer)
    if isinstance(module, _RELU_MODULES):
        return ReLU(name)
    if isinstance(module, znn.MaxPool2dSwitches):
        return _pool_op(
            name, layer, module.kernel_size, module.stride, module.padding, 1, module.ceil_mode, module.relu
        )
    if isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            raise _unsupported(layer, what, "return_indices=True")
        return _pool_op(
            name, layer, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode
        )
    if isinstance(module, _BATCH_NORM_MODULES):
        if module.running_mean is None or module.running_var is None:
            raise _unsupported(
                layer,
                what,
                "it has no running statistics (track_running_stats=False), so even in eval mode it "
                "normalizes each batch by the batch's own statistics and one image's projection would "
                "depend on the other images",
            )
        return BatchNorm(name, module)
    if isinstance(module, (nn.modules.dropout._DropoutNd, nn.Identity)):
        return Skip(name, _identity)  # the deconvnet sees the model as at test time: dropout off
    if isinstance(module, _SKIP_MODULES):
        return Skip(name, module)
    raise _unsupported(layer, what)


def _identity(x: Tensor) -> Tensor:
    return x


class _Tracer(fx.Tracer):
    """fx tracer that keeps every layer the chain knows as one node (zfkernels.nn modules included), and
    counts the calls of every module, leaf or not (a layer called twice cannot be named by its module)."""

    def __init__(self) -> None:
        super().__init__()
        self.call_counts: dict[str, int] = {}
        self.outputs: dict[str, fx.Node] = {}  # the node each module's (first) call returns

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _KNOWN_MODULES) or super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., object], args: object, kwargs: object
    ) -> object:
        try:
            name = self.path_of_module(m)
        except NameError:  # not a submodule of the root: fx raises its own error below
            name = None
        result = super().call_module(m, forward, args, kwargs)
        if name is not None:
            self.call_counts[name] = self.call_counts.get(name, 0) + 1
            first = result[0] if isinstance(result, (tuple, list)) and result else result
            if isinstance(first, fx.Proxy):
                self.outputs.setdefault(name, first.node)
        return result


def _bound_defaults(model: nn.Module) -> dict[str, object]:
    """The forward's optional arguments after the images, at their defaults: what ``model(images)`` passes.

    Unbound, fx traces an argument defaulting to None as if it were given (``if x2 is not None`` is
    always true of a proxy), which analyses a call the projection never makes."""
    try:  # fx traces the class's forward, unwrapped
        parameters = list(inspect.signature(inspect.unwrap(type(model).forward)).parameters.values())
    except (TypeError, ValueError):
        return {}
    optional = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in parameters[2:] if p.kind in optional and p.default is not p.empty}


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[str, int], dict[str, fx.Node]]:
    """The forward's graph, how many times it calls each module, and the node each module returns."""
    tracer = _Tracer()
    with warnings.catch_warnings():  # a tensor default cannot get fx's guard; the check_against_model does
        warnings.filterwarnings("ignore", message="Was not able to add assertion", category=UserWarning)
        graph = tracer.trace(model, concrete_args=_bound_defaults(model) or None)
    return graph, tracer.call_counts, tracer.outputs


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", repr(node.target))
        module = getattr(node.target, "__module__", None) or ""
        return f"{module + '.' if module and name != 'fn' else ''}{name} (fx node {node.name!r})"
    if node.op == "call_method":
        return f"Tensor.{node.target} (fx node {node.name!r})"
    return f"{node.op} {node.target!r} (fx node {node.name!r})"


def _bind(node: fx.Node, names: Sequence[str]) -> dict[str, object]:
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def _only_input(node: fx.Node, layer: str, modules: dict[str, nn.Module]) -> fx.Node:
    """The node's single tensor input: its first argument, the only fx node among its arguments."""
    inputs = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    if not node.args or not isinstance(node.args[0], fx.Node) or len(inputs) != 1:
        raise _unsupported(layer, _describe(node, modules), "it takes more than one tensor input")
    return node.args[0]


def _node_op(node: fx.Node, layer: str, modules: dict[str, nn.Module]) -> tuple[ChainOp | None, fx.Node]:
    """The chain op a graph node stands for (None: passes its input through) and the node it reads."""
    what = _describe(node, modules)
    if node.op == "call_module":
        return _module_op(node.target, modules[node.target], layer), _only_input(node, layer, modules)
    if node.op == "call_function":
        target = node.target
        if target is operator.getitem:
            source = node.args[0]
            if (
                isinstance(source, fx.Node)
                and source.op == "call_module"
                and isinstance(modules[source.target], znn.MaxPool2dSwitches)
            ):
                if node.args[1] != 0:
                    raise _unsupported(layer, what, "the switches of a pool are not an activation")
                return None, source
            raise _unsupported(layer, what)
        if target in _RELU_FUNCTIONS:
            return ReLU(f"{getattr(target, '__name__', 'relu')} (fx node {node.name!r})"), _only_input(
                node, layer, modules
            )
        if target is F.max_pool2d or target is torch.max_pool2d:
            args = _bind(node, _MAX_POOL_PARAMS)
            if args.get("return_indices", False):
                raise _unsupported(layer, what, "return_indices=True")
            stride = args.get("stride")
            return _pool_op(
                f"max_pool2d (fx node {node.name!r})",
                layer,
                args["kernel_size"],
                None if stride in (None, [], ()) else stride,
                args.get("padding", 0),
                args.get("dilation", 1),
                args.get("ceil_mode", False),
            ), _only_input(node, layer, modules)
        if target in _DROPOUT_FUNCTIONS:
            return Skip(f"{target.__name__} (fx node {node.name!r})", _identity), _only_input(
                node, layer, modules
            )
        if target is F.local_response_norm:
            source = _only_input(node, layer, modules)
            rest, kwargs = node.args[1:], dict(node.kwargs)
            return Skip(
                f"local_response_norm (fx node {node.name!r})",
                lambda x: F.local_response_norm(x, *rest, **kwargs),
            ), source
        raise _unsupported(layer, what)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return ReLU(f"Tensor.{node.target} (fx node {node.name!r})"), _only_input(node, layer, modules)
    raise _unsupported(layer, what)


class LayerChains:
    """The chains of one model, per layer name: traced once with fx, resolved per layer on demand."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self._cache: dict[str, Chain | ValueError] = {}
        # Calls per module name in the traced forward (containers included); None when untraced.
        self.call_counts: dict[str, int] | None = None
        self.module_outputs: dict[str, fx.Node] = {}  # module name -> the graph node its call returns
        try:
            self.graph: fx.Graph | None
            self.graph, self.call_counts, self.module_outputs = _trace(model)
            self.trace_error: Exception | None = None
        except Exception as error:  # noqa: BLE001  (any tracing failure means: fall back to module order)
            self.graph, self.trace_error = None, error

    def candidates(self) -> list[str]:
        """Names of the conv, ReLU and max-pool modules, in forward order (registration order untraced)."""
        if self.graph is not None:
            names = [n.target for n in self.graph.nodes if n.op == "call_module"]
        else:
            names = list(self.modules)
        kinds = (nn.Conv2d, *_RELU_MODULES, *_POOL_MODULES)
        return list(dict.fromkeys(n for n in names if isinstance(self.modules.get(n), kinds)))

    def projectable(self) -> list[str]:
        """The layer names whose activations can be projected."""
        names = []
        for name in self.candidates():
            result = self._resolve(name)
            if isinstance(result, Chain):
                names.append(name)
        return names

    def chain(self, layer: str) -> Chain:
        """The chain up to ``layer``; ValueError listing the projectable layers if there is none."""
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a module name (str) such as 'conv5', got {type(layer).__name__}")
        if layer not in self.modules or layer == "":
            raise ValueError(f"layer {layer!r} is not a module of the model. {self._projectable_sentence()}")
        result = self._resolve(layer)
        if isinstance(result, ValueError):
            raise ValueError(f"{_sentence(str(result))} {self._projectable_sentence()}")
        return result

    def _projectable_sentence(self) -> str:
        names = self.projectable()
        return f"Layers that can be projected: {', '.join(map(repr, names)) if names else 'none'}."

    def _resolve(self, layer: str) -> Chain | ValueError:
        if layer not in self._cache:
            try:
                self._cache[layer] = self._build(layer)
            except ValueError as error:
                self._cache[layer] = error
        return self._cache[layer]

    def _build(self, layer: str) -> Chain:
        module = self.modules[layer]
        kinds = (nn.Conv2d, *_RELU_MODULES, *_POOL_MODULES)
        if not isinstance(module, kinds):
            raise ValueError(
                f"layer {layer!r} ({type(module).__name__}) is not a conv, ReLU or max-pool layer, where a "
                "projection starts."
            )
        if self.graph is None:
            return self._build_from_registration_order(layer)
        nodes = [n for n in self.graph.nodes if n.op == "call_module" and n.target == layer]
        if not nodes:
            raise ValueError(f"layer {layer!r} is never called by the model's forward.")
        if len(nodes) > 1:
            raise ValueError(
                f"layer {layer!r} is called {len(nodes)} times in the forward, so which call to project "
                "is ambiguous."
            )
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        chain_ops: list[ChainOp] = []
        node = nodes[0]
        while node.op != "placeholder":
            op, node = _node_op(node, layer, self.modules)
            if op is not None:
                chain_ops.append(op)
        if node is not placeholders[0]:
            raise _unsupported(layer, f"the forward argument {node.target!r}", "not the images argument")
        return Chain(layer, tuple(reversed(chain_ops)), traced=True)

    def _build_from_registration_order(self, layer: str) -> Chain:
        chain_ops: list[ChainOp] = []
        for name, module in self.modules.items():
            if name == "" or (len(list(module.children())) > 0 and not isinstance(module, _KNOWN_MODULES)):
                continue
            try:
                chain_ops.append(_module_op(name, module, layer))
            except ValueError as error:
                raise ValueError(
                    f"{_sentence(str(error))} The path was read in module registration order because "
                    f"torch.fx could not trace the model ({type(self.trace_error).__name__}: "
                    f"{str(self.trace_error).strip().rstrip('.')})."
                ) from None
            if name == layer:
                break
        return Chain(layer, tuple(chain_ops), traced=False)


class _StopForward(Exception):
    """Raised by the hook on the layer, so the model's forward stops there."""


def check_against_model(model: nn.Module, chain: Chain, images: Tensor, activation: Tensor) -> None:
    """Run the model's own forward on ``images`` up to ``chain.layer`` and require ``activation`` there.

    This is what guards against a chain that misses something the forward does (a functional op that
    fx could not see, or a model read in registration order). ValueError when they differ.
    """
    captured: list[Tensor] = []

    def hook(module: nn.Module, inputs: object, output: object) -> None:
        value = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(value.detach().clone())  # clone: an in-place ReLU after the layer would change it
        raise _StopForward

    handle = dict(model.named_modules())[chain.layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(images)
    except _StopForward:
        pass
    except Exception as error:
        raised = _sentence(f"{type(error).__name__}: {error}")
        raise ValueError(
            f"checking the deconvnet's chain against the model failed: model(images) raised {raised} "
            "Pass check=False to DeconvNet to skip this check."
        ) from error
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"the model's forward never ran layer {chain.layer!r} on these images.")
    expected = captured[0]
    # The scale of the finite values: one NaN or inf must not turn the tolerance itself into NaN or inf.
    scale = float(expected.abs().nan_to_num(0.0, 0.0, 0.0).max()) if expected.numel() else 0.0
    if expected.shape != activation.shape or not torch.allclose(
        activation, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-30), equal_nan=True
    ):
        path = " -> ".join(op.name for op in chain.ops)
        raise ValueError(
            f"the deconvnet's chain does not reproduce the model's forward at layer {chain.layer!r} "
            f"(path read {'by fx tracing' if chain.traced else 'in module registration order'}: {path}); "
            "the model's forward does something on this path that the deconvnet does not support."
        )
