"""The gradient path: projections of layers the deconvnet chain cannot reach (residual adds, concatenations).

A deconvnet projection of one activation equals the activation's value times its *deconvnet gradient* with
respect to the image: autograd with every ReLU's backward replaced by ReLU of the gradient and every
max-pool's by the unpool that sums at shared argmaxes (Zeiler & Fergus 2013; captum's
``NeuronDeconvolution``). That definition needs no chain: it holds through a residual add (the gradient
of a sum reaches both branches) or a concatenation (each branch gets its channels). So a layer whose path
from the input is not a chain is projected by running the model forward once with autograd, patched with
``zfkernels.patch`` in ``deconvnet_mode``, and taking that gradient for each activation asked for:
images are independent, so one backward pass serves one activation of every image in the batch, and an
image with several activations gets one backward pass per activation (``retain_graph``).

The rules are the chain path's: batch-norm (eval mode) goes down as its transpose (its true gradient),
local response normalization is skipped (its backward taken as the identity, as the paper and the chain
path do), dropout is off. Every other layer (average pools, adds, concatenations, grouped or dilated
convs, other activations) goes down by its own gradient; only ReLUs and max-pools carry the deconvnet rule.

Receptive fields: :func:`graph_fields` computes each node's field by receptive-field arithmetic over the
``torch.fx`` graph, taking the union over the paths that meet at an add or a concatenation. A node whose
field cannot be bounded (a global pool, a normalization over the whole map, an op whose geometry is not
known here) sees the whole image: its windows are the whole image.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

from .. import nn as znn
from ..ops._checks import pair
from .chain import _DROPOUT_FUNCTIONS
from .patching import deconvnet_mode, is_patched, patch, unpatch
from .receptive_field import LayerGeometry, ReceptiveField

Pair = tuple[int, int]

__all__ = ["WholeImage", "graph_fields", "gradient_forward", "gradient_rounds", "whole_image_field"]


# ---------------------------------------------------------------------------------------- receptive fields
@dataclass(frozen=True)
class WholeImage:
    """A node whose activations can depend on every pixel (or whose geometry is not known): ``reason`` says
    which op made it so."""

    reason: str


Field = ReceptiveField | WholeImage | None  # None: does not depend on the image at all (a constant, a shape)


def whole_image_field(image_size: Pair) -> ReceptiveField:
    """The field of a layer that sees the whole image: every activation's window is the image itself."""
    return ReceptiveField(size=(int(image_size[0]), int(image_size[1])), jump=(0, 0), start=(0, 0))


def union(fields: Sequence[Field], what: str) -> Field:
    """The field of a node that combines its inputs position by position (an add, a concatenation of
    channels, a pointwise op): per position, the union of its inputs' boxes."""
    known = [f for f in fields if f is not None]
    if not known:
        return None
    whole = [f for f in known if isinstance(f, WholeImage)]
    if whole:
        return whole[0]
    first = known[0]
    if any(f.jump != first.jump for f in known):
        jumps = sorted({f.jump for f in known})
        return WholeImage(f"{what} joins maps with different strides in the image {jumps}")
    start = tuple(min(f.start[i] for f in known) for i in range(2))
    end = tuple(max(f.start[i] + f.size[i] for f in known) for i in range(2))
    return ReceptiveField(size=(end[0] - start[0], end[1] - start[1]), jump=first.jump, start=start)


# Leaf modules that act on each position on its own (channels may mix): the field passes through.
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU,
    znn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.Softmax2d,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
)
_POINTWISE_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.neg,
    torch.where,
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
    torch.clamp,
    torch.maximum,
    torch.minimum,
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.sigmoid,
    F.tanh,
    F.softplus,
    F.batch_norm,
    F.local_response_norm,
    *_DROPOUT_FUNCTIONS,
}
_POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d, F.avg_pool2d)
_POINTWISE_METHODS = {
    "relu",
    "relu_",
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
    "neg",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_min_",
    "contiguous",
    "clone",
    "detach",
    "to",
    "float",
    "double",
    "half",
    "bfloat16",
    "type_as",
}
_SHAPE_METHODS = {"size", "dim", "numel"}  # results that do not depend on pixel values


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target} (fx node {node.name!r})"
    name = getattr(node.target, "__name__", repr(node.target))
    return f"{name} (fx node {node.name!r})"


def _input_nodes(value: object) -> list[fx.Node]:
    """Every fx node among a node's arguments (lists, tuples and dicts included)."""
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in _input_nodes(item)]
    if isinstance(value, dict):
        return [n for item in value.values() for n in _input_nodes(item)]
    return []


def _argument(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _slide(source: Field, kernel: Pair, stride: Pair, padding: Pair) -> Field:
    if not isinstance(source, ReceptiveField):
        return source
    return source.then(LayerGeometry(kernel, stride, padding))


def _conv_field(source: Field, module: nn.Conv2d, what: str) -> Field:
    if module.padding_mode != "zeros":  # reflected or wrapped borders reach pixels outside the box
        return WholeImage(f"{what} pads with padding_mode={module.padding_mode!r}")
    dilation = tuple(module.dilation)
    extent = tuple(dilation[i] * (module.kernel_size[i] - 1) + 1 for i in range(2))
    if module.padding == "valid":
        padding = (0, 0)
    elif module.padding == "same":
        padding = tuple((extent[i] - 1) // 2 for i in range(2))  # torch pads the extra row after the map
    else:
        padding = tuple(module.padding)
    return _slide(source, extent, tuple(module.stride), padding)


def _pool_field(
    source: Field, kernel: object, stride: object, padding: object, dilation: object = 1
) -> Field:
    kernel_pair = pair(kernel, "kernel_size", 1)
    stride_pair = kernel_pair if stride in (None, [], ()) else pair(stride, "stride", 1)
    dilation_pair = pair(dilation, "dilation", 1)
    extent = tuple(dilation_pair[i] * (kernel_pair[i] - 1) + 1 for i in range(2))
    return _slide(source, extent, stride_pair, pair(padding, "padding", 0))


def _module_field(node: fx.Node, module: nn.Module, inputs: list[Field], what: str) -> Field:
    source = union(inputs, what)
    if source is None or isinstance(source, WholeImage):
        return source
    if isinstance(module, nn.Conv2d):
        return _conv_field(source, module, what)
    if isinstance(module, znn.MaxPool2dSwitches):
        return _pool_field(source, module.kernel_size, module.stride, module.padding)
    if isinstance(module, nn.MaxPool2d):
        return _pool_field(source, module.kernel_size, module.stride, module.padding, module.dilation)
    if isinstance(module, nn.AvgPool2d):
        return _pool_field(source, module.kernel_size, module.stride, module.padding)
    if isinstance(module, _POINTWISE_MODULES):
        return source
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return WholeImage(f"{what} pools adaptively (each output reads a share of the whole map)")
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)):
        return WholeImage(f"{what} normalizes by statistics of the whole map")
    return WholeImage(f"{what}: a module whose geometry is not known here")


def _function_field(node: fx.Node, inputs: list[Field], what: str) -> Field:
    target = node.target
    if target is getattr:
        return None  # x.shape and the like: no pixel values
    source = union(inputs, what)
    if source is None or isinstance(source, WholeImage):
        return source
    if target in _POINTWISE_FUNCTIONS:
        return source
    if target is torch.cat:
        dim = _argument(node, 1, "dim", 0)
        if dim in (1, -3):
            return source
        return WholeImage(f"{what} concatenates along dim={dim}, not the channels")
    if target is operator.getitem:
        producer = node.args[0]
        index = node.args[1]
        # A tuple output (a pool's values and switches, a split into channel groups): same geometry.
        if isinstance(producer, fx.Node) and isinstance(index, int) and _returns_tuple(producer):
            return source
        return WholeImage(f"{what} indexes a tensor (it may cut or shift the map)")
    if target in _POOL_FUNCTIONS:
        max_pool = target in (F.max_pool2d, torch.max_pool2d)  # avg_pool2d has no dilation (4th: ceil_mode)
        return _pool_field(
            source,
            _argument(node, 1, "kernel_size"),
            _argument(node, 2, "stride"),
            _argument(node, 3, "padding", 0),
            _argument(node, 4, "dilation", 1) if max_pool else 1,
        )
    return WholeImage(f"{what}: an op whose geometry is not known here")


def _returns_tuple(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (torch.split, torch.chunk, torch.Tensor.split):
        return True
    if node.op == "call_method" and node.target in ("split", "chunk"):
        return True
    return node.op == "call_module"  # a leaf module with a tuple output (MaxPool2dSwitches)


def graph_fields(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[fx.Node, Field]:
    """The receptive field of every node of a traced forward, in the image (its first argument).

    Sliding windows (convs, max- and average pools) apply the chain recurrence; pointwise ops pass the
    field on; an add, a multiply or a concatenation of channels takes, per position, the union of its
    inputs' boxes (paths of equal stride). Anything else sees the whole image (:class:`WholeImage`)."""
    fields: dict[fx.Node, Field] = {}
    first_input = True
    for node in graph.nodes:
        inputs = [fields.get(n) for n in _input_nodes((node.args, node.kwargs))]
        what = _describe(node, modules) if node.op in ("call_module", "call_function", "call_method") else ""
        if node.op == "placeholder":
            fields[node] = ReceptiveField() if first_input else None
            first_input = False
        elif node.op in ("get_attr", "output"):
            fields[node] = None
        elif node.op == "call_module":
            fields[node] = _module_field(node, modules[node.target], inputs, what)
        elif node.op == "call_function":
            fields[node] = _function_field(node, inputs, what)
        elif node.op == "call_method":
            if node.target in _SHAPE_METHODS:
                fields[node] = None
            else:
                source = union(inputs, what)
                pointwise = node.target in _POINTWISE_METHODS or source is None
                fields[node] = (
                    source
                    if pointwise or isinstance(source, WholeImage)
                    else WholeImage(f"{what}: a method whose geometry is not known here")
                )
        else:
            fields[node] = WholeImage(f"fx node {node.name!r} ({node.op})")
    return fields


# ------------------------------------------------------------------------------------------ the forward
class _StopForward(Exception):
    """Raised by a hook once every requested layer has run, so the rest of the forward is skipped."""


class _IdentityBackward(torch.autograd.Function):
    """Returns ``output`` (a layer's result) with the identity as its backward to ``input``: how the
    deconvnet skips local response normalization."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, output: Tensor) -> Tensor:
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _SkipFunctionalLRN(TorchFunctionMode):
    """``F.local_response_norm`` calls with an identity backward, as the LRN modules get by their hook."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if func is F.local_response_norm and isinstance(result, Tensor):
            source = args[0] if args else (kwargs or {})["input"]
            return _IdentityBackward.apply(source, result.detach())
        return result


def _skip_lrn_hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
    if isinstance(output, Tensor) and inputs and isinstance(inputs[0], Tensor):
        return _IdentityBackward.apply(inputs[0], output.detach())
    return output


def _refuse_batch_statistics(module: nn.Module, inputs: tuple[Any, ...]) -> None:
    raise ValueError(
        f"a batch-norm layer ({type(module).__name__}) without running statistics "
        "(track_running_stats=False) runs before the layer: even in eval mode it normalizes each batch by "
        "the batch's own statistics, so one image's projection would depend on the other images"
    )


@contextlib.contextmanager
def _patched(model: nn.Module, warned: list[str]) -> Iterator[None]:
    """``model`` patched (if it was not) in deconvnet mode; its state restored on exit, errors or not.

    The warnings ``patch`` gives about modules it leaves alone are appended to ``warned`` (given once by
    the caller, not on every forward)."""
    patched_here = not is_patched(model)
    if patched_here:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            patch(model)
        warned.extend(str(w.message) for w in caught)
    try:
        with deconvnet_mode(model):
            yield
    finally:
        if patched_here:
            unpatch(model)


def gradient_forward(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[str],
    *,
    stop_early: bool,
    functional_lrn: bool,
    warned: list[str],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``model`` on ``images`` with autograd, patched in deconvnet mode; return the image leaf the
    gradients are taken to, and each layer's output (still in the autograd graph).

    ``stop_early``: stop the forward once every layer has run (their call counts are known from the trace);
    otherwise run it to the end, so a layer called twice is caught. ``functional_lrn``: route
    ``F.local_response_norm`` calls through an identity backward (the LRN modules always are).
    """
    modules = dict(model.named_modules())
    leaf = images.detach().clone().requires_grad_(True)
    captured: dict[str, Tensor] = {}
    calls: dict[str, int] = dict.fromkeys(layers, 0)

    def layer_hook(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            calls[name] += 1
            value = output[0] if isinstance(output, (tuple, list)) and output else output
            if calls[name] > 1:
                return None
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) returns {type(value).__name__}, not a tensor: "
                    "a projection starts from a (N, C, H, W) map"
                )
            captured[name] = value
            if stop_early and len(captured) == len(layers):
                raise _StopForward
            # The model goes on with a copy: an in-place op after the layer (an in-place ReLU) would
            # otherwise rewrite the captured output and its place in the autograd graph.
            copy = value.clone()
            if isinstance(output, tuple):
                return (copy, *output[1:])
            if isinstance(output, list):
                return [copy, *output[1:]]
            return copy

        return hook

    handles = [modules[name].register_forward_hook(layer_hook(name)) for name in layers]
    for module in modules.values():
        if isinstance(module, (nn.LocalResponseNorm, nn.CrossMapLRN2d)):
            handles.append(module.register_forward_hook(_skip_lrn_hook))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.running_mean is None or module.running_var is None
        ):
            handles.append(module.register_forward_pre_hook(_refuse_batch_statistics))
    try:
        with torch.enable_grad(), _patched(model, warned):
            with _SkipFunctionalLRN() if functional_lrn else contextlib.nullcontext():
                try:
                    model(leaf.clone())  # a clone: an in-place op on the input must not hit the leaf
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    for name in layers:
        if calls[name] == 0:
            raise ValueError(f"the model's forward never ran layer {name!r} on these images")
        if calls[name] > 1:
            raise ValueError(
                f"layer {name!r} is called {calls[name]} times in the forward, so which call to project is "
                "ambiguous"
            )
        value = captured[name]
        if value.dim() != 4 or not value.dtype.is_floating_point:
            raise ValueError(
                f"layer {name!r} gives a {value.dim()}-D {value.dtype} output of shape {tuple(value.shape)}; "
                "a projection starts from a floating-point (N, C, H, W) map"
            )
        if value.shape[0] != images.shape[0] or not value.requires_grad:
            why = "does not depend on the images" if not value.requires_grad else "mixes the batch"
            raise ValueError(f"layer {name!r} {why}: its output has shape {tuple(value.shape)}")
    return leaf, captured


def gradient_rounds(image_index: Tensor) -> list[Tensor]:
    """Entries grouped into backward passes: pass ``r`` takes the ``r``-th entry of every image (entry
    indices, in order). Images are independent, so one pass gives one gradient per image."""
    count = image_index.shape[0]
    if count == 0:
        return []
    order = torch.sort(image_index, stable=True).indices
    sorted_images = image_index[order]
    starts = torch.ones(count, dtype=torch.bool, device=image_index.device)
    starts[1:] = sorted_images[1:] != sorted_images[:-1]
    positions = torch.arange(count, device=image_index.device)
    group_start = torch.cummax(torch.where(starts, positions, 0), 0).values  # each entry's image's first
    rank = torch.empty_like(order)
    rank[order] = positions - group_start
    return [(rank == r).nonzero().flatten() for r in range(int(rank.max()) + 1)]


def deconvnet_gradients(
    activation: Tensor, leaf: Tensor, image_index: Tensor, channel: Tensor, row: Tensor, col: Tensor
) -> Iterator[tuple[Tensor, Tensor]]:
    """For each backward pass: (entry indices, their deconvnet gradients (n, C, H, W) w.r.t. the image)."""
    for entries in gradient_rounds(image_index):
        seed = torch.zeros_like(activation)
        images = image_index[entries]
        seed[images, channel[entries], row[entries], col[entries]] = 1
        (gradient,) = torch.autograd.grad(activation, leaf, seed, retain_graph=True)
        yield entries, gradient.index_select(0, images)
