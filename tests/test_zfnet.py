"""zfkernels.models.ZFNet: the paper's geometry, initialization, and equivalence with stock torch layers."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_bitwise_equal, assert_close_verbose

import zfkernels as zk
from zfkernels import nn as znn
from zfkernels.models import RecordedPool, ZFNet, feature_sizes

# Output (H, W) of each stage for a 224x224 input: Fig. 3 of the paper.
PAPER_SIZES = {
    "conv1": 110,
    "pool1": 55,
    "conv2": 26,
    "pool2": 13,
    "conv3": 13,
    "conv4": 13,
    "conv5": 13,
    "pool5": 6,
}
PAPER_PARAMETERS = 62_357_608
LAYER_NAMES = ["conv1", "pool1", "conv2", "pool2", "conv3", "relu3", "conv4", "relu4", "conv5", "pool5"]
LAYER_NAMES += ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"]


def stock_zfnet(num_classes: int = 1000, normalization: bool = True) -> torch.nn.Sequential:
    """ZFNet in stock torch layers, written out independently of zfkernels.models (the oracle)."""

    def lrn():
        return torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)

    layers = [
        ("conv1", torch.nn.Conv2d(3, 96, 7, 2, 1)),
        ("relu1", torch.nn.ReLU()),
        ("pool1", torch.nn.MaxPool2d(3, 2, ceil_mode=True)),
        ("norm1", lrn()),
        ("conv2", torch.nn.Conv2d(96, 256, 5, 2)),
        ("relu2", torch.nn.ReLU()),
        ("pool2", torch.nn.MaxPool2d(3, 2, ceil_mode=True)),
        ("norm2", lrn()),
        ("conv3", torch.nn.Conv2d(256, 384, 3, 1, 1)),
        ("relu3", torch.nn.ReLU()),
        ("conv4", torch.nn.Conv2d(384, 384, 3, 1, 1)),
        ("relu4", torch.nn.ReLU()),
        ("conv5", torch.nn.Conv2d(384, 256, 3, 1, 1)),
        ("relu5", torch.nn.ReLU()),
        ("pool5", torch.nn.MaxPool2d(3, 2, ceil_mode=True)),
        ("flatten", torch.nn.Flatten(1)),
        ("fc6", torch.nn.Linear(9216, 4096)),
        ("relu6", torch.nn.ReLU()),
        ("drop6", torch.nn.Dropout(0.5)),
        ("fc7", torch.nn.Linear(4096, 4096)),
        ("relu7", torch.nn.ReLU()),
        ("drop7", torch.nn.Dropout(0.5)),
        ("fc8", torch.nn.Linear(4096, num_classes)),
    ]
    if not normalization:
        layers = [(name, layer) for name, layer in layers if not name.startswith("norm")]
    return torch.nn.Sequential(OrderedDict(layers))


@pytest.fixture(scope="module")
def model() -> ZFNet:
    """One paper-initialized ZFNet for the read-only tests (building 62M parameters takes a while)."""
    torch.manual_seed(0)
    return ZFNet().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # Natural-image-like scale: unit-variance pixels make every layer's activations nonzero.
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def scaled_up(model: torch.nn.Module, gain: float = 2**0.5) -> torch.nn.Module:
    """Weights rescaled to He std gain / sqrt(fan_in), so activations keep their scale through 8 layers
    (the paper's std 0.01 shrinks them ~1e5-fold by fc8, where comparisons would pass trivially);
    biases made nonzero, so the ReLUs and pools see negative values and zero windows."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight"):
                parameter.mul_(gain / (parameter[0].numel() ** 0.5 * parameter.std()))
            else:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def assert_close_quick(actual, expected, rtol, atol, label):
    """assert_close_verbose's report, but a float32 allclose first: fc6 has 37M elements."""
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        assert_close_verbose(actual, expected, rtol=rtol, atol=atol, label=label)


# ------------------------------------------------------------------------------------------ geometry
def test_parameter_count(model):
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMETERS
    assert sum(p.numel() for p in stock_zfnet().parameters()) == PAPER_PARAMETERS
    assert sum(p.numel() for p in ZFNet(num_classes=10).parameters()) == PAPER_PARAMETERS - 990 * 4097


def test_stage_shapes_at_224(model, images):
    outputs: dict[str, tuple[int, ...]] = {}
    hooks = [
        dict(model.named_modules())[name].register_forward_hook(
            lambda module, args, out, name=name: outputs.__setitem__(
                name, tuple((out[0] if isinstance(out, tuple) else out).shape)
            )
        )
        for name in LAYER_NAMES
    ]
    try:
        with torch.no_grad():
            logits = model(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    channels = {"conv1": 96, "pool1": 96, "conv2": 256, "pool2": 256, "conv3": 384, "conv4": 384}
    channels |= {"conv5": 256, "pool5": 256}
    for name, size in PAPER_SIZES.items():
        assert outputs[name] == (1, channels[name], size, size), name
        assert feature_sizes(224, 224)[name] == (size, size), name
    assert outputs["relu3"] == outputs["conv3"] and outputs["relu4"] == outputs["conv4"]
    assert outputs["fc6"] == outputs["fc7"] == outputs["drop7"] == (1, 4096)
    assert logits.shape == outputs["fc8"] == (1, 1000)


def test_layers_are_named_and_are_our_ops(model):
    modules = dict(model.named_modules())
    expected = [*LAYER_NAMES[:2], "norm1", *LAYER_NAMES[2:4], "norm2", *LAYER_NAMES[4:]]
    assert [name for name in modules if name] == expected
    for name in ("pool1", "pool2", "pool5"):
        pool = modules[name]
        assert isinstance(pool, znn.MaxPool2dSwitches)
        assert (pool.kernel_size, pool.stride, pool.ceil_mode, pool.relu) == (3, 2, True, True), name
    for name in ("relu3", "relu4", "relu6", "relu7"):
        assert type(modules[name]) is znn.ReLU, name
    assert type(modules["conv5"]) is torch.nn.Conv2d and modules["conv5"].weight.shape == (256, 384, 3, 3)
    for name in ("norm1", "norm2"):
        norm = modules[name]
        assert isinstance(norm, torch.nn.LocalResponseNorm)
        assert (norm.size, norm.alpha, norm.beta, norm.k) == (5, 1e-4, 0.75, 2.0)
    assert modules["drop6"].p == modules["drop7"].p == 0.5


def test_without_normalization_same_names_otherwise(model):
    plain = ZFNet(num_classes=7, normalization=False)
    names = [name for name in dict(plain.named_modules()) if name]
    assert names == [name for name in dict(model.named_modules()) if name and not name.startswith("norm")]
    assert names == LAYER_NAMES
    assert not any(isinstance(m, torch.nn.LocalResponseNorm) for m in plain.modules())
    assert plain.norm1 is None and plain.norm2 is None
    # The state dicts hold the same parameters under the same names (normalization has none).
    assert model.state_dict().keys() - {"fc8.weight", "fc8.bias"} == plain.state_dict().keys() - {
        "fc8.weight",
        "fc8.bias",
    }
    with torch.no_grad():
        assert plain(torch.zeros(1, 3, 224, 224)).shape == (1, 7)


def test_feature_sizes_and_accepted_input_sizes(model):
    # fc6 needs pool5 at 6x6: the sides that give it, and a non-square input inside the range.
    assert feature_sizes(207, 238)["pool5"] == (6, 6)
    assert feature_sizes(206, 239)["pool5"] == (5, 7)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 207, 238)).shape == (1, 1000)


# ---------------------------------------------------------------------------------------- initialization
def test_paper_initialization():
    torch.manual_seed(0)
    net = ZFNet()
    for name in ("conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        weight = getattr(net, name).weight
        assert abs(weight.std().item() - 0.01) < 2e-4, name  # >= 600k samples: std error ~1e-5
        assert abs(weight.mean().item()) < 2e-4, name
    assert abs(net.conv1.weight.std().item() - 0.01) < 5e-4  # 14k samples
    for name, parameter in net.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(parameter) == 0, name
    torch.manual_seed(0)
    again = ZFNet()
    for (name, a), b in zip(net.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: the seed does not fix the initialization"


# ------------------------------------------------------------------------------- equivalence with stock
def _loss_and_grads(net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, seed: int):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks: both nets draw them in the same order and shapes
    logits = net(images)
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    return logits.detach(), loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_training_step_matches_stock_layers(images, mode):
    torch.manual_seed(3)
    ours = scaled_up(ZFNet(num_classes=10)).train(mode == "train")
    stock = stock_zfnet(num_classes=10).train(mode == "train")
    stock.load_state_dict(ours.state_dict())
    targets = torch.tensor([3, 7])
    logits, loss, grads = _loss_and_grads(ours, images, targets, seed=4)
    stock_logits, stock_loss, stock_grads = _loss_and_grads(stock, images, targets, seed=4)
    assert logits.abs().max() > 1e-2, "activations vanished: the comparison would be vacuous"
    assert_close_verbose(
        logits, stock_logits, rtol=1e-5, atol=1e-5 * stock_logits.abs().max(), label="logits"
    )
    assert_close_verbose(loss, stock_loss, rtol=1e-5, atol=0, label="loss")
    assert grads.keys() == stock_grads.keys()
    for name, grad in grads.items():
        expected = stock_grads[name]
        assert expected.abs().max() > 0, f"{name}: zero gradient, the comparison would be vacuous"
        assert_close_quick(grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(), label=name)


def test_dropout_is_live_in_train_mode(images):
    torch.manual_seed(3)
    net = scaled_up(ZFNet(num_classes=10)).train()
    with torch.no_grad():
        torch.manual_seed(5)
        first = net(images)
        torch.manual_seed(6)
        second = net(images)
        torch.manual_seed(5)
        repeat = net(images)
    assert not torch.equal(first, second)
    assert_bitwise_equal(first, repeat, "same seed, same masks")


def test_to_stock_is_the_same_network(images):
    torch.manual_seed(3)
    ours = scaled_up(ZFNet(num_classes=10)).eval()
    converted = ours.to_stock()
    oracle = stock_zfnet(num_classes=10)
    assert repr(converted) == repr(oracle)
    assert not converted.training
    assert [name for name, _ in converted.named_parameters()] == [n for n, _ in ours.named_parameters()]
    with torch.no_grad():
        assert_close_verbose(converted(images), ours(images), rtol=1e-5, atol=1e-6, label="to_stock")
        converted.conv1.weight.zero_()  # a copy: the source keeps its weights
    assert ours.conv1.weight.abs().max() > 0
    plain = ZFNet(num_classes=10, normalization=False).to_stock()
    assert repr(plain) == repr(stock_zfnet(num_classes=10, normalization=False))
    # and back: the stock state dict loads into a ZFNet
    back = ZFNet(num_classes=10, normalization=False)
    back.load_state_dict(plain.state_dict())
    assert torch.equal(back.fc8.weight, plain.fc8.weight)


# ------------------------------------------------------------------------------------ switch memory
def _saved_bytes(net: torch.nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """Bytes of (integer, floating) tensors autograd saves for backward in one forward, each storage once."""
    seen: set[int] = set()
    totals = {"integer": 0, "floating": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen and tensor.dtype != torch.bool:  # bool: dropout masks, the same in both nets
            seen.add(key)
            kind = "floating" if tensor.dtype.is_floating_point else "integer"
            totals[kind] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(images).sum().backward()
    return totals["integer"], totals["floating"]


def test_pool_switches_take_8x_less_memory_than_indices(images):
    torch.manual_seed(3)
    ours = ZFNet(num_classes=10).train()
    stock = stock_zfnet(num_classes=10).train()
    stock.load_state_dict(ours.state_dict())
    our_integer, our_floating = _saved_bytes(ours, images)
    stock_integer, stock_floating = _saved_bytes(stock, images)
    pooled = 2 * (96 * 55 * 55 + 256 * 13 * 13 + 256 * 6 * 6)  # one switch per pooled value
    assert our_integer == pooled  # uint8
    assert stock_integer == 8 * pooled  # int64 indices
    assert stock_integer / our_integer >= 8
    # The fused ReLU+pool keeps the pooled map instead of the full-size ReLU output.
    assert our_floating < stock_floating


# ---------------------------------------------------------------------------------------- switches
def test_recorded_switches_are_the_pools(model, images):
    x = images[:1]
    with torch.no_grad():
        logits, records = model.forward_with_switches(x)
        assert not model.recorded_switches and not model.record_switches  # no side effect by default
        assert_bitwise_equal(logits, model(x), "forward_with_switches logits")
        conv1 = model.conv1(x)
        values, switches = zk.max_pool2d_switches(conv1, 3, 2, ceil_mode=True, relu=True)
    assert list(records) == ["pool1", "pool2", "pool5"]
    assert isinstance(records["pool1"], RecordedPool)
    assert_bitwise_equal(records["pool1"].values, values, "pool1 values")
    assert_bitwise_equal(records["pool1"].switches, switches, "pool1 switches")
    assert records["pool1"].input_size == (110, 110)
    assert_bitwise_equal(records["pool1"].values, F.max_pool2d(F.relu(conv1), 3, 2, ceil_mode=True), "torch")
    assert records["pool2"].input_size == (26, 26) and records["pool5"].input_size == (13, 13)
    assert (
        records["pool5"].switches.shape == (1, 256, 6, 6) and records["pool5"].switches.dtype == torch.uint8
    )
    # The switches unpool with the recorded size (a deconvnet's first step): every value lands once.
    record = records["pool5"]
    unpooled = zk.max_unpool2d(record.values, record.switches, 3, 2, output_size=record.input_size)
    assert unpooled.shape == (1, 256, 13, 13)
    assert_close_verbose(unpooled.sum((-2, -1)), record.values.sum((-2, -1)), 1e-6, 0, "unpooled sums")

    try:
        model.record_switches = True
        with torch.no_grad():
            model(x)
        assert list(model.recorded_switches) == ["pool1", "pool2", "pool5"]
        assert_bitwise_equal(model.recorded_switches["pool2"].switches, records["pool2"].switches, "flag")
    finally:
        model.record_switches = False
        model.recorded_switches = {}


# ------------------------------------------------------------------------------------------- compile
def test_compile_fullgraph_matches_eager(images):
    torch.manual_seed(3)
    net = scaled_up(ZFNet(num_classes=10)).eval()
    x = images[:1]
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        want = net(x)
        assert_close_verbose(compiled(x), want, rtol=1e-4, atol=1e-5 * want.abs().max(), label="compiled")
        net.record_switches = True  # a guarded attribute: recompiles, and the side effect still happens
        compiled(x)
    assert list(net.recorded_switches) == ["pool1", "pool2", "pool5"]


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: torch.zeros(3, 224, 224), ValueError, r"input must be \(N, 3, H, W\).*unsqueeze"),
        (lambda: torch.zeros(1, 1, 224, 224), ValueError, r"input must be .*3 channels"),
        (lambda: torch.zeros(1, 3, 256, 256), ValueError, r"input .*207\.\.238.*pool5 is 7x7"),
        (lambda: torch.zeros(1, 3, 64, 64), ValueError, r"input .*6x6x256.*pool5 is 1x1"),
        (lambda: torch.zeros(1, 3, 5, 32), ValueError, r"input .*pool5 is 0x0"),
        (lambda: torch.zeros(1, 3, 224, 224, dtype=torch.float64), TypeError, r"input must have .*float32"),
        (lambda: [[0.0]], TypeError, r"input must be a torch.Tensor"),
    ],
    ids=["unbatched", "channels", "too_big", "too_small", "tiny", "dtype", "not_a_tensor"],
)
def test_bad_input(model, make, error, match):
    with pytest.raises(error, match=match):
        model(make())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        ZFNet(num_classes=0)
    with pytest.raises(TypeError, match="num_classes"):
        ZFNet(num_classes=True)
    with pytest.raises(TypeError, match="num_classes"):
        ZFNet(num_classes=10.0)
    with pytest.raises(TypeError, match="normalization"):
        ZFNet(normalization="yes")
