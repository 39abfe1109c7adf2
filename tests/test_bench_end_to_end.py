"""The end-to-end benchmark cases (zfkernels.bench.cases.END_TO_END): zfnet_train and deconvnet.

Built small so the file runs in well under a minute (most of it is torch.compile compiling the two
"compile" providers): ZFNet at batch 1 and its smallest input side (207), AlexNet's conv5 projections for
2 images x 8 filters at 64x64 (`quick`). What is checked: every provider that runs here passes the
reference check, the check catches what it must (a wrong pixel in one projection, a missing filter
renormalization, different dropout masks, an unpool that overwrites instead of summing), each call starts
from the same state, long calls are timed without extra calls, selection and CLI errors, and the report.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import zfkernels
import zfkernels.bench.cases as cases_module
from zfkernels.bench import end_to_end
from zfkernels.bench.cases import (
    END_TO_END,
    PATCHED_MODELS,
    Case,
    ProviderCall,
    provider_unavailable,
    providers_for,
    select_cases,
)
from zfkernels.bench.report import MARKDOWN_NAME, format_table, load_run, target_lines, write_outputs
from zfkernels.bench.runner import (
    FAILED,
    OK,
    Settings,
    TimingPolicy,
    long_call_repeats,
    measure_case,
    measure_cell,
    run_cases,
    time_long_calls_side_by_side,
)
from zfkernels.cli import _plan, build_parser, main

ZFNET_SIDE = 207  # the smallest input at which ZFNet's pool5 is still 6x6
DECONVNET_SIDE = 64  # AlexNet's conv5 is 3x3 here: every projection still crosses both pools

TRAIN = Case("zfnet_train", "ZFNet", "full", "fp32")
DECONVNET = Case("deconvnet", "AlexNet.conv5", "forward", "fp32")


@pytest.fixture(scope="module")
def train_case():
    return TRAIN.build(batch=1, device="cpu", image_size=ZFNET_SIDE)


@pytest.fixture(scope="module")
def deconvnet_case():
    return DECONVNET.build(batch=1, device="cpu", image_size=DECONVNET_SIDE, quick=True)


def _verify(built, provider: str) -> str | None:
    with built.scope(provider):
        call = built.call(provider)
        return built.mismatch(call.comparable(call.fresh_run()))


# ---------------------------------------------------------------------------------------------- selection
def test_end_to_end_cases_join_the_default_selection_after_the_op_cases():
    selected = select_cases()
    patched = [Case("patched_models", s, m, "fp32") for s in PATCHED_MODELS for m in ("forward", "full")]
    assert selected[-10:] == [TRAIN, DECONVNET, *patched]
    assert all(not case.end_to_end for case in selected[:-10])


def test_the_headline_selection():
    """The default run: each op at L1, L5 and tiny (where it exists), forward and backward; the end-to-end
    cases at their headline shapes; named shapes and modes still narrow it."""
    selected = select_cases(modes=None, dtypes=["fp32"], headline=True)
    ops = [c for c in selected if not c.end_to_end]
    assert {c.shape for c in ops} == {"L1", "L5", "tiny"} and {c.mode for c in ops} == {"forward", "backward"}
    assert {(c.op, c.shape) for c in ops if c.shape == "tiny"} == {
        ("pool", "tiny"),
        ("unpool", "tiny"),
        ("relu", "tiny"),
    }
    assert [c for c in selected if c.end_to_end] == [
        TRAIN, DECONVNET, Case("patched_models", "ResNet18.32", "forward", "fp32"),
        Case("patched_models", "ResNet18.32", "full", "fp32"),
    ]  # fmt: skip
    named = select_cases(ops=["relu"], shapes=["L3"], modes=["full"], headline=True)
    assert named == [Case("relu", "L3", "full", "fp32")]


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ({"ops": ["deconvnet"]}, [DECONVNET]),
        (
            {"ops": ["zfnet_train", "deconvnet", "relu"], "shapes": ["ZFNet", "AlexNet.conv5"]},
            [TRAIN, DECONVNET],
        ),
        ({"ops": ["zfnet_train", "deconvnet"], "modes": ["full"]}, [TRAIN]),
        ({"ops": ["zfnet_train", "deconvnet"], "modes": ["backward"]}, []),
        ({"ops": ["zfnet_train"], "dtypes": ["bf16"]}, []),
        ({"ops": ["zfnet_train"], "dtypes": ["fp32", "bf16"]}, [TRAIN]),
        ({"shapes": ["L2"]}, None),  # layer shapes select op cases only
    ],
)
def test_selection_by_op_shape_mode_and_dtype(selection, expected):
    selected = select_cases(**selection)
    if expected is None:
        assert selected and not any(case.end_to_end for case in selected)
    else:
        assert selected == expected


def test_end_to_end_providers():
    captum = [] if provider_unavailable("captum") else ["captum"]
    backends = cases_module.backend_providers("cpu")
    assert providers_for(DECONVNET, "cpu") == ["eager", "compile", *captum, *backends]
    assert providers_for(TRAIN, "cpu") == ["eager", "compile", *backends]
    assert providers_for(TRAIN, "cpu", ["captum", "eager"]) == ["eager"]  # captum measures the deconvnet only
    assert providers_for(Case("relu", "L1", "forward", "fp32"), "cpu", ["captum"]) == []


def test_a_dtype_the_case_does_not_run_in_is_refused_by_name():
    with pytest.raises(ValueError, match="zfnet_train runs in fp32 only"):
        Case("zfnet_train", "ZFNet", "full", "bf16").build(1, "cpu", ZFNET_SIDE)


def test_zfnet_train_refuses_an_image_size_zfnet_cannot_take():
    with pytest.raises(ValueError, match="zfnet_train needs an image size in 207..238"):
        TRAIN.build(1, "cpu", image_size=64)


# ----------------------------------------------------------------------------------------- verification
@pytest.mark.parametrize("provider", providers_for(TRAIN, "cpu"))
def test_every_zfnet_train_provider_matches_the_reference(train_case, provider):
    assert _verify(train_case, provider) is None


@pytest.mark.parametrize("provider", providers_for(DECONVNET, "cpu"))
def test_every_deconvnet_provider_matches_the_reference(deconvnet_case, provider):
    assert _verify(deconvnet_case, provider) is None


def test_the_dense_deconvnet_pads_its_last_chunk_and_still_matches(deconvnet_case, monkeypatch):
    monkeypatch.setattr(end_to_end, "DENSE_CHUNK", 5)  # 16 projections: chunks of 5, the last padded
    assert _verify(deconvnet_case, "eager") is None


def test_one_wrong_projection_fails_the_check_and_is_never_timed(deconvnet_case, monkeypatch):
    right = deconvnet_case.workload.external["eager"]

    def wrong() -> ProviderCall:
        call = right()

        def run() -> torch.Tensor:
            pixels = call.run()
            pixels[1, 3] *= 1.001  # one projection of 16, off by 1e-3 of its own scale
            return pixels

        return ProviderCall(run, call.comparable, call.setup)

    monkeypatch.setitem(deconvnet_case.workload.external, "eager", wrong)
    cell = measure_cell(deconvnet_case, "eager", TimingPolicy(repeats=1))
    assert (cell.status, cell.timing, cell.peak_memory_bytes) == (FAILED, None, None)
    assert cell.message.startswith("pixels: max |error|") and "at [1, 3, 0]" in cell.message
    assert "(1 of 16 slices)" in cell.message


def test_a_dense_deconvnet_that_overwrites_at_shared_argmaxes_fails(deconvnet_case, monkeypatch):
    """F.max_unpool2d overwrites where overlapping windows share an argmax; the deconvnet (the gradient)
    sums there. A stock version built on it must fail the check: the check sees shared argmaxes."""

    def overwriting_chunk(image_index, flat_position, value, top, steps):
        k = image_index.shape[0]
        rows = torch.arange(k)
        signal = value.new_zeros((k, top[0] * top[1] * top[2])).index_put((rows, flat_position), value)
        signal = signal.view(k, *top)
        for step in steps:
            if step.kind == "conv":
                signal = F.conv_transpose2d(
                    signal, step.weight, None, step.stride, step.padding, step.output_padding
                )
            elif step.kind == "relu":
                signal = F.relu(signal)
            else:
                indices = step.indices.index_select(0, image_index)
                signal = F.max_unpool2d(signal, indices, 3, 2, output_size=step.size)
        return signal

    monkeypatch.setattr(end_to_end, "_dense_chunk", overwriting_chunk)
    mismatch = _verify(deconvnet_case, "eager")
    assert mismatch is not None and mismatch.startswith("pixels: max |error|")


def test_the_zfnet_train_check_sees_a_missing_filter_renormalization(train_case, monkeypatch):
    train_case.expected()  # the reference's result, with the renormalization
    monkeypatch.setattr(zfkernels, "renormalize_filters_", lambda model, radius=0.1: model)
    mismatch = _verify(train_case, "cpu")
    assert mismatch is not None and mismatch.startswith("update conv1.weight: max |error|")


def test_the_zfnet_train_check_sees_other_dropout_masks(train_case, monkeypatch):
    """Our ops draw no random numbers, so one seed gives every provider the same dropout masks; with
    another seed the gradients differ, so the masks really were the same in the passing runs."""
    monkeypatch.setattr(end_to_end, "DROPOUT_SEED", end_to_end.DROPOUT_SEED + 1)
    mismatch = _verify(train_case, "eager")
    assert mismatch is not None and mismatch.startswith("grad ")
    assert "over twice the reference's worst" in mismatch  # not rounding: far off float64 too


@pytest.mark.parametrize(("factor", "passes"), [(1.9, True), (2.1, False)])
def test_rounding_off_the_reference_passes_within_twice_fp32s_own_error_against_float64(
    train_case, monkeypatch, factor, passes
):
    """torch.compile's step rounds differently, and gates flip: it may be off the reference by more than
    1e-4 if it stays within twice the reference's worst error against float64 (pretended 1e-3 here)."""
    monkeypatch.setattr(train_case, "_float64_floor", 1e-3)
    names = train_case.workload.output_names
    actual = [t.float() for t in train_case.float64_result()]
    index = names.index("grad conv5.weight")
    actual[index] = actual[index] + factor * 1e-3 * float(actual[index].abs().max())
    mismatch = train_case.mismatch(tuple(actual))
    if passes:
        assert mismatch is None
    else:
        assert (
            mismatch.startswith("grad conv5.weight: max |error|") and "over twice the reference's" in mismatch
        )


def test_every_zfnet_train_call_starts_from_the_same_state(train_case):
    with train_case.scope("cpu"):
        call = train_case.call("cpu")
        first = [t.clone() for t in call.comparable(call.fresh_run())]
        call.run()  # a step without setup: the weights move on, so the next fresh run must restore them
        second = call.comparable(call.fresh_run())
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    updates = first[1 + len(first) // 2 :]
    assert all(update.abs().max() > 0 for update in updates)  # every parameter was updated


# ------------------------------------------------------------------------------------------------- runner
@pytest.mark.parametrize(("first_call_s", "repeats"), [(200.0, 1), (40.0, 1), (10.0, 3), (6.0, 5), (0.1, 5)])
def test_long_calls_are_timed_as_often_as_fit_in_the_budget(first_call_s, repeats):
    assert long_call_repeats(TimingPolicy(long_budget_s=30.0, min_repeats=5), first_call_s) == repeats
    assert long_call_repeats(TimingPolicy(repeats=2), first_call_s) == 2


def test_a_long_call_is_verified_once_then_timed_with_no_extra_call(deconvnet_case, monkeypatch):
    """The verifying call is the warm-up and the peak-memory measurement: 1 + repeats calls in all."""
    right = deconvnet_case.workload.external["eager"]
    calls = []

    def counted() -> ProviderCall:
        call = right()
        return ProviderCall(lambda: calls.append(1) or call.run(), call.comparable, call.setup)

    monkeypatch.setitem(deconvnet_case.workload.external, "eager", counted)
    [cell] = measure_case(deconvnet_case, ["eager"], TimingPolicy(repeats=2))
    assert (cell.status, cell.timing.repeats, len(calls)) == (OK, 2, 3)
    assert cell.peak_memory_bytes > 0


@pytest.fixture(scope="module")
def end_to_end_run():
    settings = Settings(
        device="cpu",
        batch=1,
        image_size=ZFNET_SIDE,
        threads=torch.get_num_threads(),
        providers=["eager", "cpu"],
        policy=TimingPolicy(repeats=1),
        copy_mib=1,
        quick=True,
    )
    return run_cases([TRAIN, DECONVNET], settings, progress=False)


def test_the_report_has_the_end_to_end_rows_notes_and_targets(end_to_end_run, tmp_path):
    run = end_to_end_run
    assert [(c.op, c.provider, c.status) for c in run.cells] == [
        ("zfnet_train", "eager", OK), ("zfnet_train", "cpu", OK),
        ("deconvnet", "eager", OK), ("deconvnet", "cpu", OK),
    ]  # fmt: skip
    assert all(c.timing is not None and c.peak_memory_bytes for c in run.cells)
    assert run.cases[DECONVNET.id]["pixels"] == [2, 8, 1, 3, ZFNET_SIDE, ZFNET_SIDE]
    table = format_table(run)
    assert [line.split()[:4] for line in table.splitlines()[2:4]] == [
        ["zfnet_train", "ZFNet", "full", "fp32"],
        ["deconvnet", "AlexNet.conv5", "forward", "fp32"],
    ]
    assert "end-to-end cases:" in table and "reduced from 9 x 256" in table
    [targets] = target_lines(run)
    assert targets.startswith("deconvnet/AlexNet.conv5/forward/fp32 [quick workload]: cpu is ")
    assert "vs captum: not measured (target >= 30x)" in targets and "target >= 10x" in targets
    written, _ = write_outputs(run, tmp_path)
    markdown = (tmp_path / MARKDOWN_NAME).read_text()
    for heading in ("## zfnet_train", "## deconvnet", "## Targets (measured, not asserted)"):
        assert heading in markdown
    assert "one SGD step of ZFNet" in markdown and "--quick: reduced workloads" in markdown
    assert load_run(written[0]) == run


def test_a_record_without_notes_still_loads(end_to_end_run, tmp_path):
    from zfkernels.bench.report import run_to_json

    data = run_to_json(end_to_end_run)
    del data["notes"]
    data["settings"].pop("quick")
    data["settings"]["policy"].pop("long_budget_s")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = load_run(path)
    assert loaded.notes == {} and not loaded.settings.quick


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--ops", "zfnet_train", "--dtype", "bf16"], "zfnet_train at shape ZFNet, mode full, fp32 only"),
        (["--ops", "deconvnet", "--shapes", "L1"], "no case matches --shapes L1"),
        (["--ops", "zfnet_train", "--modes", "forward"], "no case matches --modes forward"),
        (["--ops", "deconvnet", "--shapes", "AlexNet.conv9"], "unknown shape 'AlexNet.conv9'"),
        (["--ops", "deconvnet,zfnet_training"], "unknown op 'zfnet_training'"),
    ],
)
def test_cli_selection_errors_are_one_line_and_exit_2(arguments, message, capsys):
    assert main(["bench", *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_captum_that_cannot_import_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(
        "zfkernels.cli.provider_unavailable",
        lambda p: "captum cannot be imported (ImportError: no)" if p == "captum" else None,
    )
    assert main(["bench", "--ops", "deconvnet", "--providers", "captum,cpu"]) == 2
    err = capsys.readouterr().err
    assert "provider 'captum' is not available: captum cannot be imported" in err and err.count("\n") == 1


def test_cli_without_torchvision_drops_deconvnet_by_default_and_refuses_it_by_name(monkeypatch, capsys):
    missing = "deconvnet needs torchvision (pip install torchvision)"
    monkeypatch.setattr(
        "zfkernels.cli.case_unavailable", lambda case: missing if case.op == "deconvnet" else None
    )
    selected, _, skipped = _plan(build_parser().parse_args(["bench"]))
    assert DECONVNET not in selected and TRAIN in selected
    assert skipped == [f"{DECONVNET.id} left out: {missing}"]
    assert main(["bench", "--ops", "deconvnet"]) == 2
    assert f"cannot run deconvnet: {missing}" in capsys.readouterr().err


def test_cli_default_is_the_headline_full_the_matrix_and_quick_the_headline_smaller():
    """The default run is the headline (L1, L5 and tiny, forward and backward, fp32; reduced end-to-end
    cases; no compile or reference); --full the issue's matrix: every op in forward, backward and full,
    fp32 and bf16 (the end-to-end cases in their own modes and fp32); --quick the headline at batch 8."""
    selected, settings, _ = _plan(build_parser().parse_args(["bench"]))
    op_cases = [case for case in selected if not case.end_to_end]
    assert {(case.shape, case.mode, case.dtype) for case in op_cases} == {
        (shape, mode, "fp32") for shape in ("L1", "L5", "tiny") for mode in ("forward", "backward")
    }
    assert settings.quick and settings.profile == "headline" and settings.batch == 32
    assert "compile" not in settings.providers and "reference" not in settings.providers
    full, settings, _ = _plan(build_parser().parse_args(["bench", "--full"]))
    op_cases = [case for case in full if not case.end_to_end]
    assert {(case.mode, case.dtype) for case in op_cases} == {
        (mode, dtype) for mode in ("forward", "backward", "full") for dtype in ("fp32", "bf16")
    }
    assert {case.shape for case in op_cases if case.op == "unpool_conv_transpose"} == {"L1", "L2", "L5"}
    assert not settings.quick and settings.profile == "full" and settings.providers is None
    quick, settings, _ = _plan(build_parser().parse_args(["bench", "--quick"]))
    assert quick == selected and settings.batch == 8 and settings.profile == "quick"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--quick", "--full"])


def test_cli_quick_keeps_captum_and_leaves_out_compile_and_the_reference():
    _, settings, _ = _plan(build_parser().parse_args(["bench", "--quick"]))
    captum = [] if provider_unavailable("captum") else ["captum"]
    assert settings.providers == ["eager", *captum, "forward", "eighth", "cpu"]
    assert settings.quick and settings.batch == 8 and settings.policy.long_budget_s < 10


def test_cli_quick_deconvnet_end_to_end(tmp_path, capsys):
    output = tmp_path / "out"
    arguments = ["--quick", "--ops", "deconvnet", "--providers", "eager,cpu", "--repeats", "1"]
    assert main(["bench", *arguments, "--no-progress", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "deconvnet" in out and "targets:" in out and "--quick: reduced workloads" in out
    run = load_run(output / "results.json")
    assert run.settings.quick and [c.status for c in run.cells] == [OK, OK]
    assert END_TO_END["deconvnet"].bars  # the targets the report judged come from the spec


# ------------------------------------------------------------------------- the analysis cases (issue 13)
MINING = Case("mining", "AlexNet.2048", "forward", "fp32")
PROJECTION = Case("projection", "AlexNet.2048", "forward", "fp32")


def test_analysis_cases_are_opt_in_and_measure_one_backend_against_a_floor():
    assert MINING not in select_cases() and PROJECTION not in select_cases()  # minutes each: by name only
    assert select_cases(ops=["mining", "projection"]) == [MINING, PROJECTION]
    assert providers_for(MINING, "cpu") == ["forward", "cpu"]  # mining uses no zfkernels op: one backend
    assert providers_for(PROJECTION, "cpu")[:2] == ["forward", "captum"]


def _tiny_analysis(monkeypatch):
    import zfkernels.bench.analysis as analysis

    monkeypatch.setattr(analysis, "QUICK_MINING_IMAGES", 12)
    monkeypatch.setattr(analysis, "MINING_K", 1)  # 1,152 entries, not 10,368: the same code, 9x less work
    monkeypatch.setattr(analysis, "MINING_BATCH", 5)
    monkeypatch.setattr(analysis, "PROJECTION_BATCH", 4)


def test_projection_case_checks_ours_and_captum_never_the_floor_and_scales_captum(monkeypatch):
    _tiny_analysis(monkeypatch)
    built = PROJECTION.build(batch=1, device="cpu", image_size=DECONVNET_SIDE, quick=True)
    assert built.workload.time_scale == {"captum": 1152 / 5}
    cells = measure_case(built, ["forward", "captum", "cpu"], TimingPolicy(repeats=1))
    assert [c.status for c in cells] == [OK, OK, OK], [c.message for c in cells]
    assert cells[0].message.startswith("not checked: the floor")
    assert [c.time_scale for c in cells] == [1.0, 1152 / 5, 1.0]
    # The check is real: a projection off by more than the tolerance fails and is never timed.
    ours = built.workload.ours

    def wrong() -> ProviderCall:
        call = ours()
        return ProviderCall(call.run, lambda result: tuple(t * 1.01 for t in call.comparable(result)))

    monkeypatch.setattr(built.workload, "ours", wrong)
    (cell,) = measure_case(built, ["cpu"], TimingPolicy(repeats=1))
    assert cell.status == FAILED and cell.timing is None


def test_targets_scale_a_sampled_provider_and_state_a_floor_as_a_cost(monkeypatch, tmp_path):
    _tiny_analysis(monkeypatch)
    settings = Settings(
        device="cpu",
        batch=1,
        image_size=DECONVNET_SIDE,
        threads=torch.get_num_threads(),
        providers=["forward", "captum", "cpu"],
        policy=TimingPolicy(repeats=1),
        copy_mib=1,
        copy_processes=0,
        quick=True,
    )
    run = run_cases([MINING, PROJECTION], settings, progress=False)
    lines = target_lines(run)
    mining = next(line for line in lines if line.startswith("mining"))
    projection = next(line for line in lines if line.startswith("projection"))
    assert "the time of forward (target <= 1.10x" in mining
    assert "the time of forward (target <= 1.50x" in projection
    assert "faster than captum (its time x 230: it ran a sample) (target >= 5x" in projection
    cells = {c.provider: c for c in run.cells if c.op == "projection"}
    ratio = cells["captum"].timing.median_ms * 1152 / 5 / cells["cpu"].timing.median_ms
    assert f"{ratio:.1f}x faster than captum" in projection
    write_outputs(run, tmp_path)
    loaded = {(c.op, c.provider): c for c in load_run(tmp_path / "results.json").cells}
    assert loaded["projection", "captum"].time_scale == 1152 / 5


MINING_MEMORY = Case("mining_memory", "AlexNet.8192", "forward", "fp32")


def test_mining_memory_case_profiles_each_provider_once_and_judges_the_ratio(monkeypatch, tmp_path):
    """The memory case: opt-in, one backend against the same mining over an eighth of the images; each runs
    once (no reference run, no timing), its peak is the profiler's, and the report judges their ratio."""
    import zfkernels.bench.analysis as analysis

    assert MINING_MEMORY not in select_cases()
    assert select_cases(ops=["mining_memory"]) == [MINING_MEMORY]
    assert providers_for(MINING_MEMORY, "cpu") == ["eighth", "cpu"]
    monkeypatch.setattr(analysis, "QUICK_MEMORY_IMAGES", 16)
    monkeypatch.setattr(analysis, "MINING_BATCH", 2)
    calls = []
    original = analysis.GeneratedImages.__getitem__
    monkeypatch.setattr(
        analysis.GeneratedImages, "__getitem__", lambda self, i: calls.append(self.count) or original(self, i)
    )
    settings = Settings(
        device="cpu",
        batch=1,
        image_size=DECONVNET_SIDE,
        threads=torch.get_num_threads(),
        providers=None,
        policy=TimingPolicy(repeats=1),
        copy_mib=1,
        copy_processes=0,
        quick=True,
    )
    run = run_cases([MINING_MEMORY], settings, progress=False)
    cells = {c.provider: c for c in run.cells}
    assert set(cells) == {"eighth", "cpu"}
    assert all(c.status == OK and c.timing is None and c.peak_memory_bytes > 0 for c in cells.values())
    # One pass each (mining reads its first image once more, for the shape): no reference run, no timing.
    assert (calls.count(2), calls.count(16)) == (3, 17)
    (line,) = target_lines(run)
    ratio = cells["cpu"].peak_memory_bytes / cells["eighth"].peak_memory_bytes
    assert line.startswith("mining_memory/AlexNet.8192/forward/fp32 [quick workload]: cpu is at a peak")
    assert f"{ratio:.3f}x eighth's" in line and "(target <= 1.10x: " in line
    assert "MB" in format_table(run).splitlines()[2]  # the peak in place of a time
    write_outputs(run, tmp_path)
    assert "not timed (memory only)" in (tmp_path / "report.md").read_text()
    assert {c.provider: c.peak_memory_bytes for c in load_run(tmp_path / "results.json").cells} == {
        p: c.peak_memory_bytes for p, c in cells.items()
    }


def test_interleaved_long_calls_alternate_in_rounds_each_after_its_setup():
    order: list[str] = []
    fns = [lambda: order.append("a"), lambda: order.append("b")]
    setups = [lambda: order.append("setup a"), None]
    cpu = torch.device("cpu")
    timings = time_long_calls_side_by_side(fns, cpu, TimingPolicy(repeats=3), [1.0, 1.0], setups)
    assert order == ["setup a", "a", "b"] * 3 and [t.repeats for t in timings] == [3, 3]
    # Without --repeats: the rounds that fit in the budget per call, at least 1, at most min_repeats.
    order.clear()
    policy = TimingPolicy(long_budget_s=10.0, min_repeats=5)
    assert len(time_long_calls_side_by_side(fns, cpu, policy, [4.0, 6.0], [None, None])) == 2
    assert order == ["a", "b"] * 2  # 10 s x 2 calls / 10 s of verifying calls
    order.clear()
    time_long_calls_side_by_side(fns, cpu, policy, [40.0, 60.0], [None, None])
    assert order == ["a", "b"]


def test_the_table_fits_a_width_and_says_what_it_left_out(end_to_end_run):
    full = format_table(end_to_end_run)
    narrow = format_table(end_to_end_run, width=60)
    assert "peak MB eager/best" in full.splitlines()[0] and "peak MB" not in narrow.splitlines()[0]
    assert "left out to fit 60 columns: peak MB eager/best" in narrow
    assert "cpu ms" not in narrow.splitlines()[0] and " x" in narrow.splitlines()[0]  # speedups stay


@pytest.mark.parametrize("mode", ["forward", "full"])
def test_patched_models_verify_against_the_unpatched_model(mode):
    """Each backend's patched ResNet18 (inference, or one SGD step with batch norm and momentum) matches the
    reference backend's, as the unpatched model does; a step from the restored state repeats exactly."""
    built = Case("patched_models", "ResNet18.32", mode, "fp32").build(batch=2, device="cpu", quick=True)
    assert built.shapes["images"] == [4, 3, 32, 32]
    for provider in ("eager", "cpu"):
        assert _verify(built, provider) is None, provider
    with built.scope("cpu"):
        call = built.call("cpu")
        first = [t.clone() for t in call.comparable(call.fresh_run())]
        again = call.comparable(call.fresh_run())
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_op_targets_are_judged_at_their_batch_only():
    """Every README target on op cells is judged from the run's cells (at batch 32), its figures shown and
    not judged at another batch, and a target whose provider was not timed says so."""
    from zfkernels.bench.report import op_target_lines
    from zfkernels.bench.runner import BenchRun, Cell, CopyBandwidth, Timing, describe_machine

    def cell(provider: str, ms: float) -> Cell:
        timing = Timing(ms, ms, ms, 5)
        return Cell("pool", "L1", "forward", "fp32", provider, OK, timing=timing, bytes_moved=10**9)

    settings = Settings(
        device="cpu", batch=32, image_size=224, threads=2, providers=None, policy=TimingPolicy(repeats=1)
    )
    copy = CopyBandwidth(nbytes=1, preallocated_gbps=100.0, fresh_gbps=50.0, process_gbps=[100.0])
    machine = describe_machine(torch.device("cpu"), 2)
    run = BenchRun(machine, settings, copy, {}, [cell("eager", 300.0), cell("cpu", 12.0)])
    lines = op_target_lines(run)
    assert "relu + pool with switches, L1 forward >= 10x eager: pool/L1/forward/fp32 25.00x: met" in lines
    assert "... >= 5x torch.compile: not measured (compile not timed in this run)" in lines
    assert "... at >= 80% of the copy's bandwidth: pool/L1/forward/fp32 83% of the copy: met" in lines
    assert any(line.startswith("every memory-bound cell") and line.endswith("25.00x: met") for line in lines)
    tiny = [cell("eager", 0.01), cell("cpu", 0.03)]
    for c in tiny:
        c.shape = "tiny"
    run.cells += tiny
    settings.batch = 8  # tiny calls are batch 1 whatever the run's batch: still judged
    assert op_target_lines(run)[-1].endswith("pool/tiny/forward/fp32 0.33x: met")
    assert op_target_lines(run)[0] == (
        "relu + pool with switches, L1 forward >= 10x eager: not judged (set for batch 32): "
        "pool/L1/forward/fp32 25.00x"
    )
