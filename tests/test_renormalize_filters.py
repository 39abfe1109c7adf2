"""renormalize_filters_: the paper's filter RMS renormalization, on every backend, and its optimizer hook."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import FLOAT_DTYPES, assert_bitwise_equal, assert_close_verbose, backend_outputs

import zfkernels as zk
from zfkernels.models import ZFNet
from zfkernels.ops.renormalize_filters import FilterRenormalizer, filter_renormalizer, renormalize_filters_

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE_IDS = lambda d: str(d).split(".")[-1]
# Relative error of a filter's RMS after rescaling: each element is rounded once to the dtype.
RMS_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def filter_rms(weight: torch.Tensor) -> torch.Tensor:
    """sqrt(mean(w_f ** 2)) per filter (dim 0), in float64."""
    return weight.double().reshape(weight.shape[0], -1).square().mean(dim=1).sqrt()


def mixed_filters(shape, dtype, generator, radius=0.1) -> torch.Tensor:
    """Filters whose RMS is spread over [0.2, 3] x radius: about a third within the radius, the rest above."""
    weight = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight /= filter_rms(weight).view(-1, *([1] * (weight.dim() - 1)))
    targets = radius * torch.linspace(0.2, 3.0, shape[0], dtype=torch.float64)
    targets = targets[torch.randperm(shape[0], generator=generator)]
    return (weight * targets.view(-1, *([1] * (weight.dim() - 1)))).to(dtype)


def check_renormalized(before: torch.Tensor, after: torch.Tensor, radius: float) -> torch.Tensor:
    """The definition, checked filter by filter; returns the mask of filters that were rescaled."""
    rms = filter_rms(before)
    above = rms > radius
    for f in range(before.shape[0]):
        if above[f]:
            expected = (before[f].double() * (radius / rms[f])).to(before.dtype)  # rounded once, like the op
            eps = 4 * torch.finfo(before.dtype).eps  # the scale and the product may each round once
            assert_close_verbose(after[f], expected, rtol=eps, atol=0, label=f"filter {f} values")
            assert math.isclose(
                filter_rms(after[f : f + 1]).item(), radius, rel_tol=RMS_RTOL[before.dtype]
            ), f"filter {f}: RMS {filter_rms(after[f : f + 1]).item()} after, radius {radius}"
        else:
            assert_bitwise_equal(
                after[f], before[f], f"filter {f} (RMS {rms[f].item()} <= {radius}) untouched"
            )
    return above


# -------------------------------------------------------------------------------------------- tensors
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("radius", [0.1, 0.03])
def test_definition(backend, gen, dtype, radius):
    before = mixed_filters((24, 5, 3, 3), dtype, gen, radius)
    weight = before.clone()
    assert renormalize_filters_(weight, radius) is weight
    above = check_renormalized(before, weight, radius)
    assert 0 < int(above.sum()) < 24, "the sample must mix filters above and within the radius"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_filter_at_the_radius_is_untouched(backend, dtype):
    # +-0.25 is exact in every dtype, so the RMS is exactly the radius: "exceeds" is strict.
    weight = torch.full((3, 2, 2, 2), 0.25, dtype=dtype)
    weight[1, 0] = -0.25
    weight[2] *= 2  # RMS 0.5: rescaled by exactly 1/2
    before = weight.clone()
    renormalize_filters_(weight, 0.25)
    assert_bitwise_equal(weight[:2], before[:2], "at the radius")
    assert_bitwise_equal(weight[2], before[2] / 2, "twice the radius")


@pytest.mark.parametrize(
    "shape", [(6, 10), (6, 2, 5), (6, 2, 3, 3), (6, 2, 2, 2, 2)], ids=["linear", "conv1d", "conv2d", "conv3d"]
)
def test_any_rank_from_2(backend, gen, shape):
    before = mixed_filters(shape, torch.float32, gen)
    weight = before.clone()
    renormalize_filters_(weight)  # the paper's radius 0.1 by default
    check_renormalized(before, weight, 0.1)


@pytest.mark.parametrize(
    "layout", ["permuted", "channels_last", "sliced", "transposed_2d"], ids=lambda layout: layout
)
def test_non_contiguous_weights_are_renormalized_in_place(backend, gen, layout):
    base = mixed_filters((12, 6, 3, 3), torch.float32, gen)
    original = base.clone()
    if layout == "permuted":  # filters along dim 0 of a view whose storage has them along dim 1
        base = base.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
        weight = base
    elif layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
        weight = base
    elif layout == "sliced":  # every other input channel: the skipped ones must not change
        weight = base[:, ::2]
    else:
        base = base.reshape(12, -1).t().contiguous().t()
        weight = base
    assert not weight.is_contiguous()
    before = weight.clone()
    pointer, strides = weight.data_ptr(), weight.stride()
    renormalize_filters_(weight)
    assert (weight.data_ptr(), weight.stride()) == (pointer, strides), "must stay the same tensor"
    check_renormalized(before, weight, 0.1)
    if layout == "sliced":
        assert_bitwise_equal(base[:, 1::2], original[:, 1::2], "elements outside the view")


def test_special_filters(backend):
    weight = torch.zeros(5, 4)
    weight[1] = float("nan")  # NaN RMS compares false: left as is
    weight[2, 0] = float("inf")  # RMS inf: scale 0, and inf * 0 is NaN (as the kernel documents)
    weight[3] = 1.0
    weight[4] = torch.tensor([1e-30, -1e-30, 0.0, 0.0])
    before = weight.clone()
    renormalize_filters_(weight)
    assert_bitwise_equal(weight[[0, 1, 4]], before[[0, 1, 4]], "zero, NaN and tiny filters")
    assert torch.isnan(weight[2, 0]) and torch.equal(weight[2, 1:], torch.zeros(3))
    assert_close_verbose(weight[3], torch.full((4,), 0.1), rtol=1e-7, atol=0, label="constant filter")


@pytest.mark.parametrize("shape", [(0, 3, 3, 3), (4, 0), (3, 2, 0, 0)], ids=["no_filters", "empty", "0x0"])
def test_empty(backend, shape):
    weight = torch.empty(shape)
    assert renormalize_filters_(weight) is weight


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_backends_agree(gen, dtype):
    before = mixed_filters((32, 16, 5, 5), dtype, gen)
    results = backend_outputs(lambda: renormalize_filters_(before.clone()))
    eps = 4 * torch.finfo(dtype).eps
    for name, result in results.items():
        # Same formula; the float64 sums' order differs, which can move a float64 scale by an ulp or two.
        assert_close_verbose(result, results["reference"], rtol=eps, atol=0, label=f"{name} vs reference")
        check_renormalized(before, result, 0.1)


def test_runs_without_recording_autograd(backend, gen):
    weight = torch.nn.Parameter(mixed_filters((8, 3, 3, 3), torch.float32, gen))
    before = weight.detach().clone()
    assert torch.is_grad_enabled()
    renormalize_filters_(weight)
    assert weight.is_leaf and weight.requires_grad and weight.grad_fn is None
    check_renormalized(before, weight.detach(), 0.1)
    (weight.sum() * 2).backward()  # still a usable leaf
    assert torch.equal(weight.grad, torch.full_like(weight, 2.0))


# -------------------------------------------------------------------------------------------- modules
class _Net(torch.nn.Module):
    """Conv layers (one nested, one without bias, one subclass) among layers that must be left alone."""

    class _MyConv(torch.nn.Conv2d):
        pass

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3)
        self.block = torch.nn.Sequential(torch.nn.ReLU(), self._MyConv(8, 6, 3, bias=False))
        self.deconv = torch.nn.ConvTranspose2d(6, 4, 3)
        self.znn_deconv = zk.nn.ConvTranspose2d(4, 4, 3)
        self.conv1d = torch.nn.Conv1d(4, 4, 3)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        x = self.deconv(self.block(self.conv1(x)))
        x = self.conv1d(self.znn_deconv(x).mean(-1))
        return self.fc(x.flatten(1)[:, :16])


def _blown_up(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter scaled so most filters exceed the radius; returns a copy of the state."""
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(3.0)
    return {name: value.clone() for name, value in net.state_dict().items()}


def test_module_renormalizes_conv2d_weights_only(backend):
    torch.manual_seed(0)
    net = _Net()
    before = _blown_up(net)
    assert renormalize_filters_(net) is net
    for name in ("conv1.weight", "block.1.weight"):
        above = check_renormalized(before[name], net.state_dict()[name], 0.1)
        assert above.any(), name
    for name, value in net.state_dict().items():
        if name not in ("conv1.weight", "block.1.weight"):
            assert_bitwise_equal(value, before[name], f"{name} (not a Conv2d weight) untouched")


def test_zfnet_module(backend):
    torch.manual_seed(0)
    net = ZFNet(num_classes=10, normalization=False)
    # Paper init (std 0.01) is well within the radius; conv1 blown up is not.
    with torch.no_grad():
        net.conv1.weight.mul_(20.0)
    before = {name: value.clone() for name, value in net.state_dict().items()}
    renormalize_filters_(net)
    assert check_renormalized(before["conv1.weight"], net.conv1.weight.detach(), 0.1).all()
    for name, value in net.state_dict().items():
        if name != "conv1.weight":
            assert_bitwise_equal(value, before[name], name)


# ------------------------------------------------------------------------------------- optimizer hook
def _train(
    net: torch.nn.Module, steps: int, renormalize: str, radius: float
) -> list[dict[str, torch.Tensor]]:
    """Paper-style SGD steps on a fixed batch, renormalizing by "hook", "manual"ly after each step, or
    "never"; returns the parameters after each step."""
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9)  # big steps push filters out
    if renormalize == "hook":
        handle = optimizer.register_step_post_hook(filter_renormalizer(net, radius))
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(4, 3, 12, 12, generator=generator)
    targets = torch.randint(0, 5, (4,), generator=generator)
    states = []
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(images), targets).backward()
        optimizer.step()
        if renormalize == "manual":
            renormalize_filters_(net, radius)
        states.append({name: value.clone() for name, value in net.state_dict().items()})
    if renormalize == "hook":
        handle.remove()
    return states


def test_optimizer_hook_in_a_two_step_sgd_loop(backend):
    radius = 0.05
    torch.manual_seed(1)
    net = renormalize_filters_(_Net(), radius)  # start with every filter within the radius
    initial = {name: value.clone() for name, value in net.state_dict().items()}
    hooked = _train(net, 2, "hook", radius)
    net.load_state_dict(initial)
    manual = _train(net, 2, "manual", radius)
    net.load_state_dict(initial)
    plain = _train(net, 2, "never", radius)
    for step, (got, want, free) in enumerate(zip(hooked, manual, plain, strict=True)):
        for name in got:
            assert_bitwise_equal(got[name], want[name], f"step {step + 1}: {name}")
        for name in ("conv1.weight", "block.1.weight"):
            assert filter_rms(got[name]).max() <= radius * (1 + 1e-6), f"step {step + 1}: {name}"
            # Without renormalization the same steps leave the radius: the hook had work to do.
            assert filter_rms(free[name]).max() > radius * (1 + 1e-4), f"step {step + 1}: {name}"


def test_renormalizer_is_callable_directly(gen):
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3))
    with torch.no_grad():
        net[0].weight.copy_(mixed_filters((4, 2, 3, 3), torch.float32, gen, radius=0.2))
    before = net[0].weight.detach().clone()
    renormalizer = filter_renormalizer(net, radius=0.2)
    assert isinstance(renormalizer, FilterRenormalizer)
    assert renormalizer() is None
    check_renormalized(before, net[0].weight.detach(), 0.2)
    assert "radius=0.2" in repr(renormalizer)


# ------------------------------------------------------------------------------------ opcheck/compile
def _opcheck_samples():
    g = torch.Generator().manual_seed(1)
    permuted = mixed_filters((6, 4, 3, 3), torch.float32, g).permute(1, 0, 2, 3)
    return [
        (mixed_filters((8, 3, 3, 3), torch.float32, g), 0.1),
        (mixed_filters((8, 3, 5, 5), torch.float64, g), 0.05),
        (mixed_filters((8, 3, 3, 3), torch.float16, g), 0.1),
        (mixed_filters((8, 12), torch.bfloat16, g), 0.1),
        (permuted, 0.1),
        (torch.empty(0, 3, 3, 3), 0.1),
    ]


@pytest.mark.parametrize("sample", range(6))
def test_opcheck(backend, sample):
    torch.library.opcheck(torch.ops.zfkernels.renormalize_filters_.default, _opcheck_samples()[sample])


def test_compile_fullgraph(gen):
    def step(weight, net):
        renormalize_filters_(weight, 0.1)
        renormalize_filters_(net, 0.1)
        return weight * 2

    before = mixed_filters((8, 3, 3, 3), torch.float32, gen)
    eager_net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        eager_net[0].weight.copy_(before)
    compiled_net = copy.deepcopy(eager_net)
    eager_weight, compiled_weight = before.clone(), before.clone()
    want = step(eager_weight, eager_net)
    got = torch.compile(step, fullgraph=True)(compiled_weight, compiled_net)
    assert_bitwise_equal(compiled_weight, eager_weight, "compiled in-place result")
    assert_bitwise_equal(got, want, "compiled output")
    for eager_layer, compiled_layer in ((eager_net[0], compiled_net[0]), (eager_net[2], compiled_net[2])):
        assert_bitwise_equal(compiled_layer.weight, eager_layer.weight, "compiled module form")
    check_renormalized(before, compiled_net[0].weight.detach(), 0.1)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("argument", "radius", "error", "match"),
    [
        (torch.ones(4, 3, dtype=torch.int32), 0.1, TypeError, r"weight must have dtype in"),
        (torch.ones(4, 3, dtype=torch.bool), 0.1, TypeError, r"weight must have dtype in"),
        (torch.ones(4, 3, dtype=torch.complex64), 0.1, TypeError, r"weight must have dtype in"),
        (torch.ones(4), 0.1, ValueError, r"weight must have at least 2 dimensions.*\(4,\)"),
        (torch.tensor(1.0), 0.1, ValueError, r"weight must have at least 2 dimensions"),
        (torch.ones(4, 3), 0.0, ValueError, r"radius must be a positive finite float, got 0.0"),
        (torch.ones(4, 3), -0.1, ValueError, r"radius must be a positive"),
        (torch.ones(4, 3), float("inf"), ValueError, r"radius .*got inf"),
        (torch.ones(4, 3), float("nan"), ValueError, r"radius .*got nan"),
        (torch.ones(4, 3), "0.1", TypeError, r"radius must be"),
        (torch.ones(4, 3), True, TypeError, r"radius must be"),
        (torch.ones(4, 3), torch.tensor(0.1), TypeError, r"radius must be"),
        ([[1.0, 2.0]], 0.1, TypeError, r"model_or_weight must be a torch.nn.Module or a weight torch.Tensor"),
        (torch.nn.Linear(3, 4), 0.1, ValueError, r"model has no nn.Conv2d layer.*Linear"),
    ],
    ids=[
        "int_weight",
        "bool_weight",
        "complex_weight",
        "1d",
        "0d",
        "radius_0",
        "radius_negative",
        "radius_inf",
        "radius_nan",
        "radius_str",
        "radius_bool",
        "radius_tensor",
        "list",
        "no_conv",
    ],
)
def test_bad_input(argument, radius, error, match):
    with pytest.raises(error, match=match):
        renormalize_filters_(argument, radius)


def test_bad_module_and_hook_arguments():
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1))
    net[0].weight = torch.nn.Parameter(torch.ones(2, 2, 1, 1, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match=r"0\.weight must have dtype in"):
        renormalize_filters_(net)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        filter_renormalizer(torch.ones(2, 2))
    with pytest.raises(ValueError, match="model has no nn.Conv2d"):
        filter_renormalizer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="radius"):
        filter_renormalizer(torch.nn.Conv2d(2, 2, 1), radius=0)
