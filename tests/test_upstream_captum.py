"""captum's own deconvolution and guided-backprop tests, run against `patch(model)` + our modes.

Ported from pytorch/captum tests/attr/test_deconvolution.py and tests/attr/test_guided_backprop.py: every
case, with the expected attributions hard-coded there, on `captum.testing.helpers.basic_models` (as
installed). Ours is plain autograd: `zfkernels.patch(model)`, then under `deconvnet_mode(model)` /
`guided_backprop_mode(model)` the gradient of the selected output (or of the selected neuron of a layer,
summed over the batch as captum's neuron_selector does) w.r.t. every input. It must equal captum's
Deconvolution / GuidedBackprop / NeuronDeconvolution / NeuronGuidedBackprop on the same model and inputs
(exactly: the same float32 arithmetic) and captum's expected values (within captum's delta, 0.01).

Then every model of captum's basic_models that has a ReLU, every output, both rules; and every layer of the
two conv nets as a neuron. There an independent oracle also runs: the unpatched model under a
TorchFunctionMode that sends every ReLU call (modules call F.relu) through an autograd.Function with the
rule as its backward. Models whose ReLUs are functional are the listed difference "captum.functional_relu"
(tests/upstream_differences.py): captum's result there is the plain gradient, ours the oracle's.

Where not said otherwise the cases live in tests/test_patching.py (chains, residual nets) and
tests/test_deconvnet.py (DeconvNet against NeuronDeconvolution); this file does not repeat them.
"""

from __future__ import annotations

import contextlib
import copy
import pathlib
import re
from dataclasses import dataclass, field

import captum.testing.helpers.basic_models as basic_models
import pytest
import torch
import torch.nn.functional as F
from captum.attr import Deconvolution, GuidedBackprop, NeuronDeconvolution, NeuronGuidedBackprop
from torch.overrides import TorchFunctionMode
from upstream_differences import DIFFERENCES, expected

import zfkernels as zk

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning:captum"),  # captum's notes about hooks and requires_grad
]

RULES = ("deconvnet", "guided")
CAPTUM = {"deconvnet": Deconvolution, "guided": GuidedBackprop}
CAPTUM_NEURON = {"deconvnet": NeuronDeconvolution, "guided": NeuronGuidedBackprop}
MODES = {"deconvnet": zk.deconvnet_mode, "guided": zk.guided_backprop_mode}
CAPTUM_DELTA = 0.01  # captum's assertTensorAlmostEqual(..., delta=0.01) in both test files


# ------------------------------------------------------------------------------------------- oracle
class _RuleReLU(torch.autograd.Function):
    """relu forward; backward relu(grad) (deconvnet), and zero where the output is not positive (guided)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: str) -> torch.Tensor:
        out = torch.relu(x)
        ctx.save_for_backward(out)
        ctx.rule = rule
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        rectified = torch.relu(grad)
        if ctx.rule == "guided":
            rectified = torch.where(out > 0, rectified, torch.zeros_like(rectified))
        return rectified, None


class RuleReLUMode(TorchFunctionMode):
    """Every ReLU call in the forward (nn.ReLU calls F.relu) becomes _RuleReLU: the rule, module or not."""

    RELUS = (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)

    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.RELUS:  # in-place calls too: captum's models use the returned value
            return _RuleReLU.apply(args[0], self.rule)
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------ the attributions
def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def selected(output: torch.Tensor, selector) -> torch.Tensor:
    """captum's target / neuron_selector: an index (or tuple of ints and slices) past the batch, summed."""
    if selector is None:
        return output.sum()
    return output[(slice(None), *_as_tuple(selector))].sum()


def gradient(model, inputs, selector, layer=None, extra=(), context=contextlib.nullcontext):
    """d selected(output or layer output) / d inputs, by plain autograd, on fresh leaves."""
    leaves = tuple(x.detach().clone().requires_grad_() for x in inputs)
    captured = {}
    handle = None
    if layer is not None:
        module = dict(model.named_modules())[layer]
        handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("output", o))
    try:
        with context():
            output = model(*leaves, *extra)
            value = selected(captured["output"] if layer is not None else output, selector)
            return torch.autograd.grad(value, leaves)
    finally:
        if handle is not None:
            handle.remove()


def ours(model, inputs, rule, selector, layer=None, extra=()):
    patched = zk.patch(copy.deepcopy(model))
    return gradient(patched, inputs, selector, layer, extra, lambda: MODES[rule](patched))


def oracle(model, inputs, rule, selector, layer=None, extra=()):
    return gradient(copy.deepcopy(model), inputs, selector, layer, extra, lambda: RuleReLUMode(rule))


def plain(model, inputs, selector, layer=None, extra=()):
    return gradient(copy.deepcopy(model), inputs, selector, layer, extra)


def captum(model, inputs, rule, selector, layer=None, extra=()):
    """captum's attribution. Fresh input tensors every call: captum hooks a ReLU module's *input tensor*
    and never removes that hook, so a model input fed straight into an nn.ReLU (ReLUDeepLiftModel) would
    carry the previous call's hook into the next one."""
    model = copy.deepcopy(model)
    fresh = tuple(x.detach().clone() for x in inputs)
    args = fresh if len(fresh) > 1 else fresh[0]
    extra = extra or None
    if layer is None:
        result = CAPTUM[rule](model).attribute(args, target=selector, additional_forward_args=extra)
    else:
        module = dict(model.named_modules())[layer]
        result = CAPTUM_NEURON[rule](model, module).attribute(
            args, neuron_selector=selector, additional_forward_args=extra
        )
    return _as_tuple(result)


def assert_equal(actual: tuple, wanted: tuple, label: str) -> None:
    """Exactly equal values (rtol = atol = 0), per input."""
    assert len(actual) == len(wanted), f"{label}: {len(actual)} attributions where {len(wanted)} expected"
    for i, (a, w) in enumerate(zip(actual, wanted, strict=True)):
        torch.testing.assert_close(a, w, rtol=0, atol=0, msg=lambda m, i=i: f"{label}, input {i}: {m}")


def differs(a: tuple, b: tuple) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ================================================================== captum's own tests, case by case
ONE_CONV_INPUT = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
DECONV_EXPECTED = torch.tensor(
    [[2.0, 3.0, 3.0, 1.0], [3.0, 5.0, 5.0, 2.0], [3.0, 5.0, 5.0, 2.0], [1.0, 2.0, 2.0, 1.0]]
).view(1, 1, 4, 4)
GUIDED_EXPECTED = torch.tensor(
    [[0.0, 1.0, 1.0, 1.0], [1.0, 3.0, 3.0, 2.0], [1.0, 3.0, 3.0, 2.0], [1.0, 2.0, 2.0, 1.0]]
).view(1, 1, 4, 4)
GUIDED_MULTI_INPUT_EXPECTED = torch.tensor(
    [[1.0, 2.0, 2.0, 1.0], [2.0, 4.0, 4.0, 2.0], [2.0, 4.0, 4.0, 2.0], [1.0, 2.0, 2.0, 1.0]]
).view(1, 1, 4, 4)


@dataclass(frozen=True)
class CaptumCase:
    """One test of captum's: a rule, inputs, what is attributed (target, or layer + neuron), expected."""

    rule: str
    inputs: tuple
    expected: tuple
    selector: object = 0
    layer: str | None = None


def _single(rule, expected, **kwargs):
    return CaptumCase(rule, (ONE_CONV_INPUT,), (expected,), **kwargs)


def _multi(rule, expected, **kwargs):
    return CaptumCase(rule, (ONE_CONV_INPUT, torch.ones(1, 1, 4, 4)), (expected, expected), **kwargs)


CAPTUM_TESTS = {
    # tests/attr/test_deconvolution.py
    "test_simple_input_conv_deconv": _single("deconvnet", DECONV_EXPECTED),
    "test_simple_input_conv_neuron_deconv": _single("deconvnet", DECONV_EXPECTED, selector=(0,), layer="fc1"),
    "test_simple_input_conv_neuron_deconv_agg_neurons": _single(
        "deconvnet", DECONV_EXPECTED, selector=(slice(0, 1, 1),), layer="fc1"
    ),
    "test_simple_multi_input_conv_deconv": _multi("deconvnet", DECONV_EXPECTED),
    "test_simple_multi_input_conv_neuron_deconv": _multi(
        "deconvnet", DECONV_EXPECTED, selector=(3,), layer="fc1"
    ),
    # tests/attr/test_guided_backprop.py
    "test_simple_input_conv_gb": _single("guided", GUIDED_EXPECTED),
    "test_simple_input_conv_neuron_gb": _single("guided", GUIDED_EXPECTED, selector=(0,), layer="fc1"),
    "test_simple_input_conv_neuron_gb_agg_neurons": _single(
        "guided", GUIDED_EXPECTED, selector=(slice(0, 1, 1),), layer="fc1"
    ),
    "test_simple_multi_input_conv_gb": _multi("guided", GUIDED_MULTI_INPUT_EXPECTED),
    "test_simple_multi_input_conv_neuron_gb": _multi(
        "guided", GUIDED_MULTI_INPUT_EXPECTED, selector=(3,), layer="fc1"
    ),
}

# captum's model takes inplace=False in these tests; its guided Grad-CAM tests also build inplace=True.
INPLACE = pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu_inplace"])


@INPLACE
@pytest.mark.parametrize("name", list(CAPTUM_TESTS))
def test_captum_case(name, inplace):
    case = CAPTUM_TESTS[name]
    model = basic_models.BasicModel_ConvNet_One_Conv(inplace=inplace)
    got = ours(model, case.inputs, case.rule, case.selector, case.layer)
    assert_equal(got, captum(model, case.inputs, case.rule, case.selector, case.layer), f"{name} vs captum")
    for i, (attribution, wanted) in enumerate(zip(got, case.expected, strict=True)):
        torch.testing.assert_close(
            attribution, wanted, rtol=0, atol=CAPTUM_DELTA, msg=lambda m, i=i: f"{name} input {i}: {m}"
        )
    assert_equal(got, oracle(model, case.inputs, case.rule, case.selector, case.layer), f"{name} vs oracle")


@INPLACE
@pytest.mark.parametrize("rule", RULES)
def test_captum_matching(rule, inplace):
    """captum's test_deconv_matching / test_gb_matching: target i of the model equals neuron i of relu2
    (the model's last layer), for every output, on 100 * randn inputs; here ours and captum's, all equal."""
    torch.manual_seed(0)  # captum draws the input from the global generator; so do we, seeded
    x = (100.0 * torch.randn(1, 1, 4, 4),)
    model = basic_models.BasicModel_ConvNet_One_Conv(inplace=inplace)
    outputs = model(x[0].clone()).shape[1]
    for i in range(outputs):
        by_target = ours(model, x, rule, i)
        by_neuron = ours(model, x, rule, (i,), layer="relu2")
        assert_equal(by_target, by_neuron, f"output {i}: target vs relu2 neuron")
        assert_equal(by_target, captum(model, x, rule, i), f"output {i} vs captum target")
        assert_equal(by_neuron, captum(model, x, rule, (i,), layer="relu2"), f"output {i} vs captum neuron")


# ======================================================================= captum's basic models, swept
@dataclass(frozen=True)
class ModelCase:
    """A basic_models model, its inputs, what to attribute (targets, or layer -> neuron), and whether
    captum sees its ReLUs (modules) or misses them (functional: the listed difference)."""

    build: object
    inputs: object  # generator -> tuple of inputs
    targets: tuple = (None,)
    extra: tuple = ()
    neurons: dict = field(default_factory=dict)
    difference: str | None = None


def _randn(*shape, scale=1.0):
    return lambda g: tuple(scale * torch.randn(s, generator=g) for s in shape)


FUNCTIONAL = "captum.functional_relu"
MODEL_CASES = {
    "BasicModel_ConvNet_One_Conv": ModelCase(
        lambda: basic_models.BasicModel_ConvNet_One_Conv(),
        _randn((2, 1, 4, 4), scale=30.0),
        targets=(0, 1, 2, 3),
        neurons={"conv1": (1, 0, 1), "relu1": (0, 1, 1), "fc1": (2,), "relu2": (1,)},
    ),
    "BasicModel_ConvNet": ModelCase(
        lambda: basic_models.BasicModel_ConvNet(),
        _randn((2, 1, 10, 10)),
        targets=tuple(range(10)),
        neurons={
            "conv1": (0, 2, 2),
            "relu1": (1, 3, 3),
            "pool1": (1, 1, 1),
            "conv2": (2, 0, 1),
            "relu2": (3, 1, 1),
            "pool2": (0, 0, 0),
            "fc1": (3,),
            "relu3": (5,),
            "fc2": (1,),
        },
    ),
    "BasicModel_ConvNetWithPaddingDilation": ModelCase(
        lambda: basic_models.BasicModel_ConvNetWithPaddingDilation(), _randn((2, 1, 5, 5)), tuple(range(8))
    ),
    "BasicModel_ConvNetWithPaddingDilation(inplace)": ModelCase(
        lambda: basic_models.BasicModel_ConvNetWithPaddingDilation(inplace=True),
        _randn((2, 1, 5, 5)),
        tuple(range(8)),
    ),
    "BasicModel_MultiLayer": ModelCase(
        lambda: basic_models.BasicModel_MultiLayer(),
        _randn((3, 3), scale=5.0),
        targets=(0, 1),
        neurons={"linear1": (1,), "relu": (2,), "linear2": (0,)},
    ),
    "BasicModel_MultiLayer(inplace)": ModelCase(
        lambda: basic_models.BasicModel_MultiLayer(inplace=True), _randn((3, 3), scale=5.0), (0, 1)
    ),
    # (inplace=True with multi_input_module=True breaks plain autograd itself: an unused in-place ReLU
    # overwrites a tensor another ReLU saved)
    "BasicModel_MultiLayer(multi_input_module)": ModelCase(
        lambda: basic_models.BasicModel_MultiLayer(multi_input_module=True), _randn((3, 3), scale=5.0), (0, 1)
    ),
    "BasicModelWithReusedModules": ModelCase(
        basic_models.BasicModelWithReusedModules, _randn((3, 3)), (0, 1)
    ),
    "BasicModelWithReusedLinear": ModelCase(
        basic_models.BasicModelWithReusedLinear, _randn((3, 3)), (0, 1, 2)
    ),
    "BasicLinearReLULinear": ModelCase(lambda: basic_models.BasicLinearReLULinear(3), _randn((3, 3)), (0,)),
    "ReLULinearModel": ModelCase(lambda: basic_models.ReLULinearModel(), _randn((3, 3), (3, 3)), (0,)),
    "ReLULinearModel(inplace)": ModelCase(
        lambda: basic_models.ReLULinearModel(inplace=True), _randn((3, 3), (3, 3)), (0,)
    ),
    "ReLUDeepLiftModel": ModelCase(
        basic_models.ReLUDeepLiftModel, _randn((3, 3), (3, 3), scale=2.0), (0, 1, 2)
    ),
    "BasicModel_MaxPool_ReLU": ModelCase(basic_models.BasicModel_MaxPool_ReLU, _randn((2, 3, 6)), (0, 1)),
    "BasicModel_MaxPool_ReLU(inplace)": ModelCase(
        lambda: basic_models.BasicModel_MaxPool_ReLU(inplace=True), _randn((2, 3, 6)), (0, 1)
    ),
    "Conv1dSeqModel": ModelCase(basic_models.Conv1dSeqModel, _randn((2, 4, 1000)), ((0, 0), (1, 0))),
    "SimpleLRPModel": ModelCase(lambda: basic_models.SimpleLRPModel(False).eval(), _randn((2, 3)), (0,)),
    "SimpleLRPModel(inplace)": ModelCase(
        lambda: basic_models.SimpleLRPModel(True).eval(), _randn((2, 3)), (0,)
    ),
    # functional ReLUs only: captum cannot see them
    "BasicModel": ModelCase(
        basic_models.BasicModel, _randn((2, 3), scale=2.0), (0, 1, 2), difference=FUNCTIONAL
    ),
    "BasicModel2": ModelCase(
        basic_models.BasicModel2, _randn((2, 3), (2, 3), scale=2.0), (0, 1, 2), difference=FUNCTIONAL
    ),
    "BasicModel3": ModelCase(
        basic_models.BasicModel3, _randn((2, 3), (2, 3), scale=2.0), (0, 1, 2), difference=FUNCTIONAL
    ),
    "BasicModel4_MultiArgs": ModelCase(
        basic_models.BasicModel4_MultiArgs,
        _randn((2, 3), (2, 3), scale=2.0),
        extra=(2.0, 1),
        difference=FUNCTIONAL,
    ),
    "BasicModel5_MultiArgs": ModelCase(
        basic_models.BasicModel5_MultiArgs,
        _randn((2, 3), (2, 3), scale=2.0),
        extra=([2, 3], 1),
        difference=FUNCTIONAL,
    ),
    "BasicModel6_MultiTensor": ModelCase(
        basic_models.BasicModel6_MultiTensor, _randn((2, 3), (2, 3), scale=2.0), difference=FUNCTIONAL
    ),
}


def _attributions(case: ModelCase):
    """(label, selector, layer) for every target and every listed neuron."""
    yield from ((f"target {t}", t, None) for t in case.targets)
    yield from ((f"{layer} neuron {n}", n, layer) for layer, n in case.neurons.items())


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_basic_model(name, rule):
    case = MODEL_CASES[name]
    torch.manual_seed(0)  # the models' unset weights
    model = case.build()
    inputs = case.inputs(torch.Generator().manual_seed(1))
    shown_difference = False
    for label, selector, layer in _attributions(case):
        args = (model, inputs, rule, selector, layer, case.extra)
        got, theirs, reference = ours(*args), captum(*args), oracle(*args)
        assert_equal(got, reference, f"{name} {label}: ours vs the rule-ReLU oracle")
        if case.difference is None:
            assert_equal(got, theirs, f"{name} {label}: ours vs captum")
            continue
        expected(case.difference)  # listed: captum leaves functional ReLUs alone, so it is the plain gradient
        assert_equal(theirs, plain(model, inputs, selector, layer, case.extra), f"{name} {label}: captum")
        shown_difference |= differs(got, theirs)
    if case.difference is not None and rule == "deconvnet":
        assert shown_difference, f"{name}: no output shows the listed difference {case.difference!r}"


def test_every_listed_difference_is_asserted_somewhere():
    """Each entry of tests/upstream_differences.py is used by a test (by key, or the test it names)."""
    tests = pathlib.Path(__file__).parent
    sources = {p.name: p.read_text() for p in tests.glob("test_*.py")}
    for key, difference in DIFFERENCES.items():
        if difference.asserted_in:
            path, _, function = difference.asserted_in.partition("::")
            source = sources[pathlib.Path(path).name]
            assert re.search(rf"^def {re.escape(function)}\(", source, re.M), (
                f"{key}: {difference.asserted_in}"
            )
        else:
            users = [name for name, source in sources.items() if f'"{key}"' in source]
            assert users, f"{key} is listed but no test asserts it"
