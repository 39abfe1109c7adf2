"""patch(model) / unpatch(model), and deconvnet_mode / guided_backprop_mode on patched models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import Deconvolution, GuidedBackprop, NeuronDeconvolution
from conftest import assert_bitwise_equal, assert_close_verbose
from torch import nn

import zfkernels as zk
from zfkernels import nn as znn
from zfkernels.deconvnet.patching import (
    SwitchMaxPool2d,
    deconvnet_mode,
    guided_backprop_mode,
    is_patched,
    patch,
    unpatch,
)

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning:captum"),  # captum's notes about hooks and requires_grad
]

# Every way a forward can apply a ReLU: as a module (in place or not) or functionally.
RELU_KINDS = [
    "module",
    "module_inplace",
    "F.relu",
    "F.relu_inplace",
    "torch.relu",
    "torch.relu_",
    "Tensor.relu",
    "Tensor.relu_",
]
FUNCTIONAL_KINDS = RELU_KINDS[2:]
TIGHT = {"rtol": 1e-12, "atol": 1e-14}  # float64: only summation order may differ


def apply_relu(kind: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if kind.startswith("module"):
        return module(x)
    return {
        "F.relu": lambda t: F.relu(t),
        "F.relu_inplace": lambda t: F.relu(t, inplace=True),
        "torch.relu": torch.relu,
        "torch.relu_": torch.relu_,
        "Tensor.relu": lambda t: t.relu(),
        "Tensor.relu_": lambda t: t.relu_(),
    }[kind](x)


class Chain(nn.Module):
    """conv -> ReLU -> max-pool, twice: the deconvnet's textbook case. ReLU flavour per layer."""

    def __init__(self, kinds: tuple[str, str], pool: tuple[int, int] = (3, 2)):
        super().__init__()
        self.kinds = kinds
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=kinds[0] == "module_inplace")
        self.pool1 = nn.MaxPool2d(*pool)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=kinds[1] == "module_inplace")
        self.pool2 = nn.MaxPool2d(*pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(apply_relu(self.kinds[0], self.relu1, self.conv1(x)))
        return self.pool2(apply_relu(self.kinds[1], self.relu2, self.conv2(x)))


def make_chain(kinds: tuple[str, str], pool: tuple[int, int] = (3, 2)) -> Chain:
    torch.manual_seed(0)
    return Chain(kinds, pool).double()


def chain_input() -> torch.Tensor:
    return torch.randn(1, 2, 15, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def hand_written_backward(chain: Chain, x: torch.Tensor, seed: torch.Tensor, rule: str) -> torch.Tensor:
    """The deconvnet / guided-backprop pass spelled out with zfkernels ops: per layer, top down,
    unpool with the recorded switches (sums at shared argmaxes), rectify, transposed conv (no bias)."""
    kernel, stride = chain.pool1.kernel_size, chain.pool1.stride
    with torch.no_grad():
        pre1 = chain.conv1(x)
        pooled1, switches1 = zk.max_pool2d_switches(torch.relu(pre1), kernel, stride)
        pre2 = chain.conv2(pooled1)
        _, switches2 = zk.max_pool2d_switches(torch.relu(pre2), kernel, stride)
        grad = seed
        for pre, switches, conv in ((pre2, switches2, chain.conv2), (pre1, switches1, chain.conv1)):
            grad = zk.max_unpool2d(grad, switches, kernel, stride, output_size=pre.shape[-2:])
            grad = zk.relu(grad)
            if rule == "guided":
                grad = torch.where(pre > 0, grad, torch.zeros_like(grad))
            grad = zk.conv_transpose2d(grad, conv.weight, padding=1)
    return grad


def strongest_activation(output: torch.Tensor, channel: int) -> tuple[tuple[int, int, int], torch.Tensor]:
    """(c, h, w) of feature map `channel`'s strongest activation, and the one-hot seed selecting it."""
    flat = int(output[0, channel].argmax())
    h, w = divmod(flat, output.shape[-1])
    seed = torch.zeros_like(output)
    seed[0, channel, h, w] = 1.0
    return (channel, h, w), seed


def input_gradient(model: nn.Module, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    xg = x.clone().requires_grad_()
    model(xg).backward(seed)
    return xg.grad


class _RuleReLUFunction(torch.autograd.Function):
    """An independent ReLU with a deconvnet/guided backward, for reference models built by hand."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.rule = rule
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        rectified = grad.clamp(min=0)
        if ctx.rule == "guided":
            rectified = torch.where(x > 0, rectified, torch.zeros_like(rectified))
        return rectified, None


class RuleReLU(nn.Module):
    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RuleReLUFunction.apply(x, self.rule)


def with_rule_relus(model: nn.Module, rule: str) -> nn.Module:
    """A copy of `model` whose nn.ReLU modules are RuleReLU(rule) (reused modules stay shared)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.ReLU:
                setattr(parent, name, RuleReLU(rule))
    return model


def _graph_nodes(root):
    """Every autograd node reachable from `root`."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_fn for next_fn, _ in node.next_functions)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).double().eval()


def relu_rules(model: nn.Module) -> set[str]:
    return {m.backward for m in model.modules() if isinstance(m, znn.ReLU)}


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("function", [patch, unpatch, deconvnet_mode, guided_backprop_mode, is_patched])
def test_non_module_is_rejected(function):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got Tensor"):
        function(torch.zeros(1))


@pytest.mark.parametrize("mode", [deconvnet_mode, guided_backprop_mode])
def test_mode_on_unpatched_model_asks_for_patch(mode):
    model = make_chain(("module", "module"))
    with pytest.raises(ValueError, match=r"model is not patched: call .*patch\(model\) first"):
        mode(model)
    patch(model)
    unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        mode(model)


# ------------------------------------------------------------------------------------ patch / unpatch
def test_torchvision_alexnet_and_vgg11_outputs_bit_identical():
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for build in (torchvision.models.alexnet, torchvision.models.vgg11):
        torch.manual_seed(0)
        model = build().eval()
        expected = model(x)
        relus = [m for m in model.modules() if type(m) is nn.ReLU]
        pools = [m for m in model.modules() if type(m) is nn.MaxPool2d]
        assert patch(model) is model
        assert all(type(m) is znn.ReLU and m.inplace and m.backward == "standard" for m in relus)
        assert all(type(m) is SwitchMaxPool2d for m in pools)
        assert_bitwise_equal(model(x), expected, f"patched {build.__name__}")
        unpatch(model)
        assert all(type(m) is nn.ReLU for m in relus) and all(type(m) is nn.MaxPool2d for m in pools)
        assert_bitwise_equal(model(x), expected, f"unpatched {build.__name__}")


def test_resnet18_outputs_and_gradients_bit_identical():
    model = resnet18()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    seed = torch.randn(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected, expected_grad = model(x), input_gradient(model, x, seed)
    patch(model)
    assert type(model.relu) is znn.ReLU and type(model.layer1[0].relu) is znn.ReLU
    assert type(model.maxpool) is SwitchMaxPool2d
    assert_bitwise_equal(model(x), expected, "output")
    # Standard rule: the true gradient (max-pool backward sums at shared argmaxes, as torch's does on CPU).
    assert_bitwise_equal(input_gradient(model, x, seed), expected_grad, "gradient")


@pytest.mark.parametrize("kinds", [(kind, kind) for kind in RELU_KINDS], ids=RELU_KINDS)
def test_every_relu_flavour_is_rerouted_and_outputs_stay_identical(backend, kinds):
    model = make_chain(kinds)
    x = chain_input()
    expected = model(x)
    patch(model)
    assert_bitwise_equal(model(x), expected, "output")
    # Every ReLU in the graph is our op: its autograd node is the custom op's, not aten's ReluBackward0.
    xg = x.clone().requires_grad_()
    names = [node.name() for node in _graph_nodes(model(xg).grad_fn)]
    namespace = "zfkernels_triton" if backend == "triton" else "zfkernels"  # triton runs the twin ops
    assert sum(f"{namespace}_relu" in name for name in names) == 2, names
    assert not any(name.startswith("ReluBackward") for name in names), names
    assert sum(f"{namespace}_max_pool2d_switches" in name for name in names) == 2, names


def test_functional_reroute_stays_inside_the_patched_forward():
    model = patch(make_chain(("F.relu", "torch.relu")))
    inside = []
    ints = torch.tensor([-2, 0, 3])

    def probe(module, args):  # runs inside the patched forward (conv1 is called by it)
        probe_input = torch.randn(3, dtype=torch.float64, requires_grad=True)
        inside.append((torch.relu(probe_input).grad_fn.name(), torch.relu(ints)))

    model.conv1.register_forward_pre_hook(probe)
    with deconvnet_mode(model):  # (the standard rule on a small tensor runs torch's relu: the same op)
        model(chain_input())
    (node, int_relu) = inside[0]
    assert "zfkernels_relu" in node
    assert torch.equal(int_relu, torch.tensor([0, 0, 3]))  # dtypes our op does not take fall back to torch
    outside = torch.relu(torch.randn(3, dtype=torch.float64, requires_grad=True))
    assert outside.grad_fn.name() == "ReluBackward0"  # code outside the forward sees torch's relu


def test_module_objects_parameters_hooks_and_state_dict_survive():
    model = make_chain(("module_inplace", "F.relu"))
    model.up = nn.ConvTranspose2d(5, 3, 3, stride=2, padding=1, output_padding=1).double()
    modules = dict(model.named_modules())
    parameters = [id(p) for p in model.parameters()]
    state = {k: v.data_ptr() for k, v in model.state_dict().items()}
    calls = []
    model.relu1.register_forward_hook(lambda module, args, out: calls.append(type(module)))
    patch(model)
    assert dict(model.named_modules()) == modules  # same objects, class switched
    assert type(model.up) is znn.ConvTranspose2d and model.relu1.inplace and not model.relu2.inplace
    assert [id(p) for p in model.parameters()] == parameters
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state
    model(chain_input())
    assert calls == [znn.ReLU]
    unpatch(model)
    assert dict(model.named_modules()) == modules
    assert type(model.up) is nn.ConvTranspose2d and type(model.pool1) is nn.MaxPool2d
    assert "forward" not in model.__dict__ and not is_patched(model)
    assert not any(hasattr(m, "backward") for m in model.modules() if isinstance(m, nn.ReLU))
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state
    model(chain_input())
    assert calls == [znn.ReLU, nn.ReLU]


def test_patch_is_idempotent_and_unpatch_of_unpatched_is_a_no_op():
    model = make_chain(("module", "F.relu"))
    x = chain_input()
    expected = model(x)
    assert unpatch(model) is model and "forward" not in model.__dict__
    patch(model)
    wrapper = model.forward
    patch(model)
    assert model.forward is wrapper  # not wrapped twice
    assert type(model.relu1) is znn.ReLU and type(model.pool1) is SwitchMaxPool2d
    assert_bitwise_equal(model(x), expected, "twice patched")
    unpatch(model)
    assert type(model.relu1) is nn.ReLU and "forward" not in model.__dict__
    assert_bitwise_equal(model(x), expected, "unpatched")


def test_instance_level_forward_is_wrapped_and_restored():
    model = make_chain(("torch.relu", "torch.relu"))
    original = model.forward
    model.forward = lambda x: original(x) * 2  # e.g. a library that wraps forward itself
    own_forward = model.forward
    expected = model(chain_input())
    patch(model)
    assert_bitwise_equal(model(chain_input()), expected, "patched")
    unpatch(model)
    assert model.forward is own_forward


def test_conv_transpose_model_matches_and_keeps_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(3, 2, (3, 2), stride=(1, 2), groups=1, bias=False),
    )
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(5))
    expected = model(x)
    weights = [model[0].weight, model[0].bias, model[2].weight]
    patch(model)
    assert type(model[0]) is znn.ConvTranspose2d and type(model[2]) is znn.ConvTranspose2d
    patched_weights = [model[0].weight, model[0].bias, model[2].weight]
    assert all(a is b for a, b in zip(patched_weights, weights, strict=True))  # the same Parameter objects
    assert_close_verbose(model(x), expected, rtol=1e-5, atol=1e-6, label="conv transpose")
    assert model[0](x, output_size=[10, 11]).shape[-2:] == (10, 11)  # forward's output_size still works


# ------------------------------------------------------------------------ patched models behave as stock
class FunctionalReLU(nn.Module):
    """A forward whose only op is one spelling of a functional ReLU (rerouted inside a patched forward)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_relu(self.kind, self, x)


PATCHED_KINDS = {
    "MaxPool2d": lambda: nn.MaxPool2d(3, 2),
    "MaxPool2d_indices": lambda: nn.MaxPool2d(3, 2, ceil_mode=True, return_indices=True),
    "ReLU": nn.ReLU,
    "ReLU_inplace": lambda: nn.ReLU(inplace=True),
    # 5 output channels: torch's own convolution (numerics: test_conv_transpose_numerics_are_as_documented)
    "ConvTranspose2d": lambda: nn.ConvTranspose2d(3, 5, 3, stride=2),
    **{kind: lambda kind=kind: FunctionalReLU(kind) for kind in FUNCTIONAL_KINDS},
}
ALL_DTYPES = [
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
]


def example_of(dtype: torch.dtype, shape=(2, 3, 7, 7)) -> torch.Tensor:
    x = 10 * torch.randn(shape, generator=torch.Generator().manual_seed(8))
    if dtype == torch.bool:
        return x > 0
    if dtype.is_complex:
        return torch.complex(x, x.flip(-1)).to(dtype)
    return x.to(dtype) if dtype.is_floating_point else x.abs().round().to(dtype)


def outcome(module: nn.Module, x: torch.Tensor) -> tuple:
    """("returned", the output tensors) or ("raised", the exception's type and message)."""
    try:
        output = module(x.clone())
    except Exception as error:  # noqa: BLE001  (whatever stock raises, the patched model must raise too)
        return "raised", type(error), str(error)
    return "returned", *(output if isinstance(output, tuple) else (output,))


@pytest.mark.filterwarnings("ignore:Complex modules:UserWarning")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(PATCHED_KINDS))
def test_patched_module_returns_what_stock_returns_for_every_dtype(kind, dtype):
    # Our ops take float dtypes only; anything else runs torch's own op: its result, or its very error.
    stock = PATCHED_KINDS[kind]()
    if kind == "ConvTranspose2d" and (dtype.is_floating_point or dtype.is_complex):
        stock = stock.to(dtype)  # parameters in the input's dtype (integer ones cannot be made)
    patched = patch(copy.deepcopy(stock))
    shapes = [(2, 3, 7, 7), (3, 7, 7)]
    if "relu" in kind.lower():
        shapes += [(7, 7), (), (1,) * 9]  # torch.relu takes any rank, ours up to 8
    for shape in shapes:
        x = example_of(dtype, shape)
        expected, got = outcome(stock, x), outcome(patched, x)
        label = f"{kind} {dtype} {shape}"
        assert got[0] == expected[0], f"{label}: stock {expected}, patched {got}"
        if expected[0] == "raised":
            assert got == expected, label
            continue
        assert len(got) == len(expected), label
        for a, b in zip(got[1:], expected[1:], strict=True):
            assert_bitwise_equal(a, b, label)


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "groups", "dilation", "dtype", "ours"),
    [
        (96, 3, 1, 1, torch.float32, True),  # ZFNet's layer 1: our direct kernel
        (8, 4, 1, 1, torch.float64, True),
        (8, 5, 1, 1, torch.float32, False),  # wider: the same oneDNN call as stock
        (8, 4, 2, 1, torch.float32, False),  # grouped
        (8, 3, 1, 2, torch.float32, False),  # dilated
        (8, 3, 1, 1, torch.bfloat16, False),  # half types
    ],
)
def test_conv_transpose_numerics_are_as_documented(
    in_channels, out_channels, groups, dilation, dtype, ours, monkeypatch
):
    # patch's documented contract: at most 4 output channels (fp32/fp64, groups=1, dilation=1, CPU) run our
    # direct kernel, which sums in another order (allclose); every other case calls F.conv_transpose2d as
    # stock does (bit for bit).
    from zfkernels.ops import cpu as cpu_backend

    calls: list[tuple] = []
    real = cpu_backend.cpu_module

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def conv_transpose2d_direct(self, *args):
            ran = real.conv_transpose2d_direct(*args)  # False: the kernel declined (dilation, half types)
            if ran:
                calls.append(args)
            return ran

    monkeypatch.setattr(cpu_backend, "cpu_module", Spy())
    torch.manual_seed(9)
    stock = nn.ConvTranspose2d(
        in_channels, out_channels, 7, stride=2, padding=1, output_padding=1, groups=groups, dilation=dilation
    ).to(dtype)
    size = 110 if in_channels == 96 else 12
    x = torch.relu(torch.randn(1, in_channels, size, size, generator=torch.Generator().manual_seed(10))).to(
        dtype
    )
    with torch.no_grad():
        expected = stock(x)
        got = patch(stock)(x)
    assert bool(calls) == ours
    if ours:
        scale = expected.abs().max().item()
        tolerance = {torch.float32: 1e-5, torch.float64: 1e-13}[dtype]
        assert_close_verbose(got, expected, rtol=tolerance, atol=tolerance * scale, label="direct kernel")
    else:
        assert_bitwise_equal(got, expected, "F.conv_transpose2d as stock")


@pytest.mark.parametrize(
    "kernel, stride, padding, ceil_mode, size",
    [(3, 2, 0, True, (13, 13)), (3, 2, 1, False, (8, 9)), (2, 2, 0, False, (6, 6))],
)
def test_return_indices_are_torchs(kernel, stride, padding, ceil_mode, size):
    pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
    x = torch.randint(-3, 4, (2, 3, *size), generator=torch.Generator().manual_seed(6)).float()
    expected_values, expected_indices = pool(x)
    patch(pool)
    assert type(pool) is SwitchMaxPool2d
    values, indices = pool(x)
    assert_bitwise_equal(values, expected_values, "values")
    assert indices.dtype == torch.int64 and torch.equal(indices, expected_indices)


def test_dilated_pool_and_subclasses_are_left_unpatched_with_a_warning():
    class OwnReLU(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = nn.Sequential(nn.MaxPool2d(3, 1, dilation=2), OwnReLU(), nn.ReLU(), nn.MaxPool2d(2))
    x = torch.randn(1, 2, 9, 9, generator=torch.Generator().manual_seed(7))
    expected = model(x)
    with pytest.warns(UserWarning, match=r"0 \(dilation=2.*1 \(OwnReLU subclasses nn.ReLU"):
        patch(model)
    assert type(model[0]) is nn.MaxPool2d and type(model[1]) is OwnReLU
    assert type(model[2]) is znn.ReLU and type(model[3]) is SwitchMaxPool2d
    assert_bitwise_equal(model(x), expected, "partly patched")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch(make_chain(("module", "module")))  # nothing to report: no warning


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_is_refused_at_the_root_and_reported_inside():
    # Switching classes cannot reach compiled code: a scripted model's modes would give plain gradients.
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="TorchScript module .* patch the eager model instead"):
        patch(scripted)
    assert not is_patched(scripted)
    model = nn.Sequential(nn.ReLU(), scripted, nn.MaxPool2d(2))
    with pytest.warns(
        UserWarning, match=r"unpatched .*: 1 \(a TorchScript module: its compiled code cannot be patched\)$"
    ):
        patch(model)
    assert type(model[0]) is znn.ReLU and type(model[2]) is SwitchMaxPool2d


# ------------------------------------------------------------------------------------------- training
class TrainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2)
        self.head = nn.Linear(4 * 15 * 15, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv(x)))
        x = torch.relu(self.up(F.relu(self.conv2(x))))
        return self.head(x.flatten(1).relu())


def test_sgd_steps_match_unpatched_and_an_optimizer_made_before_patch_stays_valid():
    torch.manual_seed(0)
    reference = TrainNet()
    model = copy.deepcopy(reference)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # created before patch
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    patch(model)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        x, target = torch.randn(4, 3, 15, 15, generator=gen), torch.randint(0, 5, (4,), generator=gen)
        for net, opt in ((model, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            F.cross_entropy(net(x), target).backward()
            opt.step()
    moved = 0.0
    for (name, p), q, start in zip(
        model.named_parameters(), reference.parameters(), TrainNet().parameters(), strict=True
    ):
        assert_close_verbose(p, q, rtol=1e-5, atol=1e-6, label=name)
        moved = max(moved, (p.detach() - start.detach()).abs().max().item())
    assert moved > 1e-3  # the parameters did train
    assert all(optimizer.state[p]["momentum_buffer"] is not None for p in model.parameters())


# ------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("kinds", [("F.relu", "Tensor.relu_"), ("module_inplace", "torch.relu")])
def test_compile_fullgraph_functional_model_matches_eager(kinds):
    torch._dynamo.reset()
    model = patch(make_chain(kinds).float())
    x = chain_input().float()
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    assert_close_verbose(compiled(x), expected, rtol=1e-5, atol=1e-6, label="inductor")
    # aot_eager runs the traced graph's ops as they are: bit for bit.
    assert_bitwise_equal(torch.compile(model, fullgraph=True, backend="aot_eager")(x), expected, "aot_eager")


def test_compile_fullgraph_alexnet_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = patch(torchvision.models.alexnet(num_classes=10).eval())
    x = torch.randn(1, 3, 63, 63, generator=torch.Generator().manual_seed(9))
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    assert_close_verbose(compiled(x), expected, rtol=1e-4, atol=1e-6, label="compiled alexnet")


def test_compiled_model_follows_the_mode():
    """The rule is part of what compile guards on: entering a mode recompiles instead of reusing."""
    torch._dynamo.reset()
    model = patch(make_chain(("module", "F.relu")))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = chain_input()
    _, seed = strongest_activation(model(x), 1)
    standard = input_gradient(model, x, seed)
    assert_bitwise_equal(input_gradient(compiled, x, seed), standard, "compiled, standard")
    with deconvnet_mode(model):
        deconvnet = input_gradient(model, x, seed)
        assert_bitwise_equal(input_gradient(compiled, x, seed), deconvnet, "compiled, deconvnet")
    assert not torch.equal(deconvnet, standard)
    assert_bitwise_equal(input_gradient(compiled, x, seed), standard, "compiled, standard again")


# --------------------------------------------------------------------------------- deconvnet / guided
@pytest.mark.parametrize("pool", [(3, 2), (2, 2)], ids=["overlapping_3s2", "2s2"])
@pytest.mark.parametrize("kinds", [(kind, kind) for kind in RELU_KINDS], ids=RELU_KINDS)
@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_mode_equals_hand_written_backward(rule, kinds, pool):
    model = patch(make_chain(kinds, pool))
    x = chain_input()
    channel, seed = strongest_activation(model(x), 1)
    mode = deconvnet_mode if rule == "deconvnet" else guided_backprop_mode
    with mode(model):
        got = input_gradient(model, x, seed)
    expected = hand_written_backward(model, x, seed, rule)
    assert_close_verbose(got, expected, **TIGHT, label=f"{rule} vs hand-written")
    assert got.abs().max() > 0
    if pool == (3, 2):  # overlapping windows: some argmaxes are shared, so the unpool's sum matters
        with torch.no_grad():
            relu1 = torch.relu(model.conv1(x))
        _, switches = zk.max_pool2d_switches(relu1, 3, 2)
        indices = zk.switches_to_indices(switches, relu1.shape, 3, 2).flatten(-2)
        assert any(row.unique().numel() < row.numel() for row in indices[0])


@pytest.mark.parametrize("kinds", [("module", "module"), ("module_inplace", "module_inplace")])
def test_modes_equal_captum_where_captum_works(kinds):
    """captum hooks nn.ReLU modules (it clones the input, so in-place modules work too)."""
    captum_model = make_chain(kinds)
    model = patch(make_chain(kinds))
    x = chain_input()
    (c, h, w), seed = strongest_activation(model(x), 2)
    captum_deconv = NeuronDeconvolution(captum_model, captum_model.pool2).attribute(
        x, neuron_selector=(c, h, w)
    )
    captum_guided = GuidedBackprop(captum_model).attribute(x, target=(c, h, w))
    with deconvnet_mode(model):
        assert_close_verbose(input_gradient(model, x, seed), captum_deconv, **TIGHT, label="deconvnet")
    with guided_backprop_mode(model):
        assert_close_verbose(input_gradient(model, x, seed), captum_guided, **TIGHT, label="guided")


@pytest.mark.parametrize("kinds", [("F.relu", "F.relu"), ("Tensor.relu_", "module")])
def test_functional_relu_captum_misses_it_our_mode_does_not(kinds):
    captum_model = make_chain(kinds)
    model = patch(make_chain(kinds))
    x = chain_input()
    (c, h, w), seed = strongest_activation(model(x), 2)
    expected = hand_written_backward(model, x, seed, "deconvnet")
    captum = Deconvolution(captum_model).attribute(x, target=(c, h, w))
    assert (captum - expected).abs().max() > 1e-3 * expected.abs().max()  # captum's answer is wrong
    with deconvnet_mode(model):
        assert_close_verbose(input_gradient(model, x, seed), expected, **TIGHT, label="ours")


class PreActBlock(nn.Module):
    """A pre-activation residual block (He et al. 2016): the ReLU's input also feeds the skip."""

    def __init__(self, channels: int):
        super().__init__()
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu2(self.conv1(self.relu1(x))))


def preact_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        PreActBlock(4),
        nn.MaxPool2d(3, 2),
        PreActBlock(4),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    ).double()


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_preactivation_residual_captum_is_wrong_our_mode_is_not(rule):
    """captum's hook replaces the *total* gradient of the ReLU's input, dropping the skip's share."""
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    seed = torch.zeros(1, 5, dtype=torch.float64)
    seed[0, 2] = 1.0
    expected = input_gradient(with_rule_relus(preact_net(), rule), x, seed)
    captum_class = Deconvolution if rule == "deconvnet" else GuidedBackprop
    captum = captum_class(preact_net()).attribute(x, target=2)
    assert (captum - expected).abs().max() > 0.1 * expected.abs().max()
    model = patch(preact_net())
    with (deconvnet_mode if rule == "deconvnet" else guided_backprop_mode)(model):
        assert_close_verbose(input_gradient(model, x, seed), expected, **TIGHT, label=rule)


def test_guided_backprop_on_resnet18_and_the_rule_is_restored():
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    seed = torch.zeros(1, 10, dtype=torch.float64)
    seed[0, 3] = 1.0
    standard = input_gradient(resnet18(), x, seed)
    manual = input_gradient(with_rule_relus(resnet18(), "guided"), x, seed)  # reused ReLUs included
    no_inplace = resnet18()
    for module in no_inplace.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    captum = GuidedBackprop(no_inplace).attribute(x, target=3)
    model = patch(resnet18())
    with guided_backprop_mode(model) as entered:
        assert entered is model and relu_rules(model) == {"guided"}
        guided = input_gradient(model, x, seed)
    assert_close_verbose(guided, manual, **TIGHT, label="vs manual autograd.Function")
    assert_close_verbose(guided, captum, **TIGHT, label="vs captum (non-inplace copy)")
    assert not torch.allclose(guided, standard)
    assert relu_rules(model) == {"standard"}
    assert_close_verbose(input_gradient(model, x, seed), standard, **TIGHT, label="standard after exit")
    with pytest.raises(RuntimeError, match="inside the block"):
        with guided_backprop_mode(model):
            raise RuntimeError("inside the block")
    assert relu_rules(model) == {"standard"}
    assert_close_verbose(input_gradient(model, x, seed), standard, **TIGHT, label="after exception")


def test_modes_nest_and_restore_user_rules():
    model = patch(make_chain(("module", "F.relu")))
    model.relu1.backward = "guided"  # a rule the user chose stays theirs after the block
    x = chain_input()
    _, seed = strongest_activation(model(x), 1)
    with deconvnet_mode(model):
        with guided_backprop_mode(model):
            assert relu_rules(model) == {"guided"}
            inner = input_gradient(model, x, seed)
        assert relu_rules(model) == {"deconvnet"}
        outer = input_gradient(model, x, seed)
    assert model.relu1.backward == "guided"
    assert_close_verbose(inner, hand_written_backward(model, x, seed, "guided"), **TIGHT, label="inner")
    assert_close_verbose(outer, hand_written_backward(model, x, seed, "deconvnet"), **TIGHT, label="outer")
