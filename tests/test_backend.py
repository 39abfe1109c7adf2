"""Backend selection and dispatch, the custom-op registrations, the multi-threaded CPU paths, and CUDA."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_bitwise_equal, assert_close_verbose, loop_unpool, tied
from torch.utils._python_dispatch import TorchDispatchMode

import zfkernels as zk
from zfkernels import _extension
from zfkernels.ops import _backend, cpu, reference

OPS = [
    "max_pool2d_switches",
    "max_unpool2d",
    "gather_switches",
    "relu",
    "relu_",
    "relu_backward",
    "conv_transpose2d",
    "unpool_conv_transpose2d",
]


# ------------------------------------------------------------------------------------------ selection
def test_available_backends():
    names = zk.available_backends()
    assert names[0] == "auto" and "reference" in names
    assert set(names) <= {"auto", "cpu", "reference", "triton", "cuda"}
    assert ("cpu" in names) == (_extension.cpu_module is not None)
    assert BACKENDS == [n for n in names if n != "auto" and "cpu" in _backend._runs_on(n)]
    assert ("triton" in BACKENDS) == ("triton" in names and _backend.triton_interpreted())


def test_cpu_extension_is_built():
    # The package works without it, but this suite is meant to test it: a missing build is a failure.
    assert _extension.cpu_module is not None, f"zfkernels._C did not load: {_extension.cpu_error}"
    assert "cpu" in zk.available_backends()


def test_default_backend_is_auto():
    assert zk.get_backend() == "auto"


@pytest.mark.parametrize("name", BACKENDS + ["auto"])
def test_set_and_get(name):
    zk.set_backend(name)
    assert zk.get_backend() == name
    zk.set_backend("auto")
    assert zk.get_backend() == "auto"


@pytest.mark.parametrize("name", ["gpu", "CPU", "Triton", "", None, 1, ["cpu"]])
def test_unknown_backend_raises(name):
    with pytest.raises(ValueError, match="backend"):
        zk.set_backend(name)
    assert zk.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend"), zk.use_backend(name):
        pass
    assert zk.get_backend() == "auto"


def test_use_backend_restores_after_exception():
    zk.set_backend("reference")
    with pytest.raises(KeyError), zk.use_backend(BACKENDS[0]):
        assert zk.get_backend() == BACKENDS[0]
        raise KeyError("boom")
    assert zk.get_backend() == "reference"


def test_use_backend_nests():
    with zk.use_backend("reference"):
        with zk.use_backend("auto"):
            assert zk.get_backend() == "auto"
            with zk.use_backend(BACKENDS[-1]):
                assert zk.get_backend() == BACKENDS[-1]
            assert zk.get_backend() == "auto"
        assert zk.get_backend() == "reference"
    assert zk.get_backend() == "auto"


def test_resolve_per_device():
    assert _backend.resolve(torch.device("cpu")) == ("cpu" if "cpu" in BACKENDS else "reference")
    assert _backend.resolve(torch.device("meta")) == "reference"
    with zk.use_backend("reference"):
        assert _backend.resolve(torch.device("cpu")) == "reference"
    if "cpu" in BACKENDS:
        with zk.use_backend("cpu"):
            assert _backend.resolve(torch.device("cpu")) == "cpu"
            with pytest.raises(ValueError, match="cpu"):
                _backend.resolve(torch.device("meta"))


# ------------------------------------------------------------------------------------------- dispatch
def _op_calls():
    """(backend function name, public call) for every op."""
    g = torch.Generator().manual_seed(6)
    x = tied((1, 2, 7, 7), torch.float32, g)
    values, switches = zk.max_pool2d_switches(x, 3, 2)
    weight = torch.randn(2, 3, 3, 3, generator=g)
    return {
        "max_pool2d_switches": lambda: zk.max_pool2d_switches(x, 3, 2),
        "max_unpool2d": lambda: zk.max_unpool2d(values, switches, 3, 2, output_size=(7, 7)),
        "gather_switches": lambda: zk.gather_switches(x, switches, 3, 2),
        "relu": lambda: zk.relu(x),
        "relu_": lambda: zk.relu(x.clone(), inplace=True),
        "relu_backward": lambda: zk.relu_backward(x, torch.relu(x), "guided"),
        "conv_transpose2d": lambda: zk.conv_transpose2d(x, weight, stride=2),
        "unpool_conv_transpose2d": lambda: zk.unpool_conv_transpose2d(
            values, switches, weight, pool_kernel_size=3, pool_stride=2, unpool_size=(7, 7)
        ),
    }


class _OpsSeen(TorchDispatchMode):
    """Records the zfkernels ops (either namespace) that reach the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("zfkernels", "zfkernels_triton"):
            self.seen.append(f"{func.namespace}::{func._opname}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("selected", BACKENDS + ["auto"])
@pytest.mark.parametrize("op", OPS)
def test_dispatch_reaches_the_selected_backend(monkeypatch, selected, op):
    expected = {"auto": "cpu" if "cpu" in BACKENDS else "reference"}.get(selected, selected)
    calls = []
    for name, module in (("cpu", cpu), ("reference", reference)):
        original = getattr(module, op)
        monkeypatch.setattr(module, op, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    with zk.use_backend(selected):
        call = _op_calls()[op]
        with _OpsSeen() as mode:
            call()
    if expected == "triton":  # the public function calls the triton twin op directly (compile traces it)
        assert not calls and mode.seen == [f"zfkernels_triton::{op}"], (calls, mode.seen)
    else:
        assert calls and set(calls) == {expected}, calls
        assert mode.seen == [f"zfkernels::{op}"], mode.seen


def _zfkernels_events(run) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return [e.name for e in profile.events() if e.name.startswith("zfkernels")]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
def test_plain_eager_calls_skip_the_dispatcher():
    """Plain eager calls run the op's body directly (the dispatcher's Python round trip cost more than a
    small kernel), inside the op's own autograd Function when a gradient is needed."""
    x = torch.randn(2, 3, 8, 8)
    assert _zfkernels_events(lambda: zk.relu(x)) == []
    leaf = x.clone().requires_grad_()
    out = zk.relu(leaf, backward="guided")
    assert type(out.grad_fn).__name__ == "zfkernels_reluBackward"
    grad = torch.randn_like(x)
    out.backward(grad)
    assert_bitwise_equal(leaf.grad, torch.where((x > 0) & (grad > 0), grad, 0.0), "guided gradient")
    # Through the dispatcher when something else must see the op: a mode, a subclass, a compiled graph.
    with _OpsSeen() as mode:
        zk.relu(x)
    assert mode.seen == ["zfkernels::relu"]

    class Tagged(torch.Tensor):
        pass

    tagged = x.as_subclass(Tagged)
    assert _backend.dispatcher_needed((tagged,)) and not _backend.dispatcher_needed((x, 0))
    assert_bitwise_equal(zk.relu(tagged).as_subclass(torch.Tensor), torch.relu(x), "subclass relu")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
def test_direct_in_place_calls_bump_the_version():
    """An in-place op run without the dispatcher still tells autograd it wrote (stock raises, so must we)."""
    weight = torch.randn(2, 3, 8, 8, requires_grad=True)
    x = torch.randn(2, 3, 8, 8)
    product = weight * x  # saves x for weight's gradient
    before = x._version
    zk.relu(x, inplace=True)
    assert x._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.sum().backward()
    conv = torch.randn(4, 3, 3, 3) * 5
    scaled = weight[:, :, :3, :3].sum() * conv  # saves conv
    zk.renormalize_filters_(conv)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scaled.sum().backward()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings (Linux)")
def test_one_openmp_runtime():
    """The kernels' threads are torch's own OpenMP workers: one OpenMP runtime in the process, not two
    pools fighting for the cores (csrc/cpu/parallel.h)."""
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes


@pytest.mark.parametrize("op", OPS)
def test_custom_ops_are_registered(op):
    packet = getattr(torch.ops.zfkernels, op)
    schema = packet.default._schema
    assert schema.name == f"zfkernels::{op}"
    mutable = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutable == (["input"] if op == "relu_" else [])


def test_public_api():
    for name in [
        "available_backends",
        "conv_transpose2d",
        "gather_switches",
        "get_backend",
        "max_pool2d_switches",
        "max_unpool2d",
        "relu",
        "relu_backward",
        "set_backend",
        "switches_to_indices",
        "unpool_conv_transpose2d",
        "use_backend",
        "nn",
    ]:
        assert name in zk.__all__ and hasattr(zk, name)


def test_reference_is_independent_of_the_extension(monkeypatch):
    # Without the compiled module, "auto" falls back to the reference backend and "cpu" is refused.
    monkeypatch.setattr(_extension, "cpu_module", None)
    monkeypatch.setattr(_extension, "cpu_error", "ImportError: simulated")
    assert "cpu" not in zk.available_backends() and "reference" in zk.available_backends()
    assert _backend.resolve(torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match="simulated"):
        zk.set_backend("cpu")
    x = tied((1, 2, 7, 7), torch.float32, torch.Generator().manual_seed(0))
    assert_bitwise_equal(zk.max_pool2d_switches(x, 3, 2)[0], F.max_pool2d(x, 3, 2), "reference fallback")


# ------------------------------------------------------------------------------ multi-threaded kernels
@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_cpu_threads_split_planes_exactly(two_threads):
    # Large enough that every cpu launcher splits its work across threads; results must not change.
    if "cpu" not in BACKENDS:
        pytest.fail("the cpu backend is not available; rebuild the extension")
    g = torch.Generator().manual_seed(7)
    x = tied((2, 8, 129, 130), torch.float32, g)  # over 64k pooled elements: at least two threads
    with zk.use_backend("cpu"):
        values, switches = zk.max_pool2d_switches(x, 3, 2, ceil_mode=True, relu=True)
        unpooled = zk.max_unpool2d(values, switches, 3, 2, output_size=(129, 130), relu=True)
        gathered = zk.gather_switches(x, switches, 3, 2)
        relu_out = zk.relu(x)
        guided = zk.relu_backward(x, relu_out, "guided")
    exp_values, exp_indices = F.max_pool2d(F.relu(x), 3, 2, ceil_mode=True, return_indices=True)
    assert_bitwise_equal(values, exp_values, "pool values")
    assert_bitwise_equal(zk.switches_to_indices(switches, x.shape, 3, 2), exp_indices, "pool indices")
    with zk.use_backend("reference"):
        assert_bitwise_equal(
            unpooled, zk.max_unpool2d(values, switches, 3, 2, output_size=(129, 130), relu=True), "unpool"
        )
        assert_bitwise_equal(gathered, zk.gather_switches(x, switches, 3, 2), "gather")
        assert_bitwise_equal(guided, zk.relu_backward(x, relu_out, "guided"), "relu_backward")
    assert_bitwise_equal(relu_out, torch.relu(x), "relu")
    w = torch.randn(8, 5, 3, 3, generator=g)
    with zk.use_backend("cpu"):
        fused = zk.unpool_conv_transpose2d(
            values, switches, w, pool_kernel_size=3, pool_stride=2, unpool_size=(129, 130), padding=1
        )
        conv = zk.conv_transpose2d(values, w, stride=2, padding=1)
    assert_close_verbose(
        fused, F.conv_transpose2d(unpooled, w, padding=1), rtol=1e-4, atol=1e-4, label="fused"
    )
    assert_close_verbose(
        conv,
        F.conv_transpose2d(values, w, stride=2, padding=1),
        rtol=1e-4,
        atol=1e-4,
        label="conv_transpose2d",
    )


def _pool_and_check(x: torch.Tensor) -> None:
    values, _ = zk.max_pool2d_switches(x, 3, 2, ceil_mode=True, relu=True)
    assert_bitwise_equal(values, F.max_pool2d(F.relu(x), 3, 2, ceil_mode=True), "pool values")


def test_cpu_ops_from_several_python_threads_at_once(two_threads):
    """Ops from several Python threads at once (the bindings release the GIL), each splitting its work
    over threads of its own, give the same results as alone."""
    g = torch.Generator().manual_seed(3)
    inputs = [tied((2, 8, 129, 130), torch.float32, g) for _ in range(4)]
    errors = []

    def client(x):
        try:
            for _ in range(20):
                _pool_and_check(x)
        except Exception as error:  # noqa: BLE001 - re-raised below, on the test's thread
            errors.append(error)

    threads = [threading.Thread(target=client, args=(x,)) for x in inputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a kernel call hung"
    assert not errors, errors[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_cpu_kernels_run_in_a_forked_child(two_threads):
    """A forked child (DataLoader workers fork) runs multi-threaded kernels: no thread state of the
    parent's is waited on."""
    x = tied((2, 8, 129, 130), torch.float32, torch.Generator().manual_seed(4))
    _pool_and_check(x)  # the parent has run multi-threaded kernels
    expected = F.max_pool2d(F.relu(x), 3, 2, ceil_mode=True).numpy().tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running: what we test
        pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if the kernel ran and was right
        # No stock torch op here: after its parent ran OpenMP threads, torch's own ops hang in a child.
        code = 1
        try:
            values, _ = zk.max_pool2d_switches(x, 3, 2, ceil_mode=True, relu=True)
            code = 0 if values.numpy().tobytes() == expected else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if status[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's kernel call hung")
    assert os.waitstatus_to_exitcode(status[1]) == 0


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"]
)
def test_op_matrix_on_cuda(dtype):
    g = torch.Generator().manual_seed(8)
    x = tied((2, 3, 13, 13), dtype, g)
    weight = torch.randn(3, 4, 3, 3, generator=g).to(dtype)
    xc, wc = x.cuda(), weight.cuda()
    values, switches = zk.max_pool2d_switches(xc, 3, 2, ceil_mode=True, relu=True)
    exp_values, exp_indices = F.max_pool2d(F.relu(x), 3, 2, ceil_mode=True, return_indices=True)
    assert_bitwise_equal(values.cpu(), exp_values, "pool values")
    assert_bitwise_equal(zk.switches_to_indices(switches, x.shape, 3, 2).cpu(), exp_indices, "pool indices")
    unpooled = zk.max_unpool2d(values, switches, 3, 2, output_size=(13, 13), relu=True)
    expected = loop_unpool(values.cpu(), switches.cpu(), (3, 3), (2, 2), (0, 0), (13, 13), relu=True)
    assert_bitwise_equal(unpooled.cpu(), expected, "unpool")
    gathered = x.flatten(2).gather(2, exp_indices.flatten(2)).view_as(exp_values)
    assert_bitwise_equal(zk.gather_switches(xc, switches, 3, 2).cpu(), gathered, "gather")
    assert_bitwise_equal(zk.relu(xc).cpu(), torch.relu(x), "relu")
    for rule in ("standard", "deconvnet", "guided"):
        with zk.use_backend("reference"):
            want = zk.relu_backward(x, torch.relu(x), rule)
        assert_bitwise_equal(zk.relu_backward(xc, torch.relu(xc), rule).cpu(), want, rule)
    out = zk.conv_transpose2d(values, wc, stride=2, padding=1, output_padding=1)
    ref = F.conv_transpose2d(values.double(), wc.double(), stride=2, padding=1, output_padding=1)
    torch_err = (
        (F.conv_transpose2d(values, wc, stride=2, padding=1, output_padding=1).double() - ref).abs().max()
    )
    assert (out.double() - ref).abs().max() <= 2 * torch_err + 1e-5
    fused = zk.unpool_conv_transpose2d(
        values, switches, wc, pool_kernel_size=3, pool_stride=2, unpool_size=(13, 13), padding=1
    )
    ref = F.conv_transpose2d(unpooled.double(), wc.double(), padding=1)
    torch_err = (F.conv_transpose2d(unpooled, wc, padding=1).double() - ref).abs().max()
    assert (fused.double() - ref).abs().max() <= 2 * torch_err + 1e-5
