"""The `zfkernels` command: `zfkernels bench` (the package's main job), `zfkernels visualize` (the paper's
Fig. 2 for a model and a folder of images) and `zfkernels info`.

Mistakes in what is asked for (an unknown op, a device this machine lacks, an output directory that cannot
be written) end in one line on stderr and exit status 2, never a traceback. `bench` exits 1 when a
zfkernels backend fails its check against the reference or raises, or when `--compare` finds a regression.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import runpy
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .bench import report
from .bench.cases import (
    BASELINE_PROVIDERS,
    DEFAULT_IMAGE_SIZE,
    DTYPES,
    END_TO_END,
    EXTERNAL_PROVIDERS,
    MODES,
    OPS,
    QUICK_DECONVNET_FILTERS,
    QUICK_DECONVNET_IMAGES,
    STOCK_PROVIDERS,
    THIRD_PARTY_PROVIDERS,
    Case,
    backend_providers,
    case_unavailable,
    describe_ops,
    provider_unavailable,
    select_cases,
)
from .bench.runner import OK, Settings, TimingPolicy, run_cases

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A request the bench cannot honour; its message is the one line the user sees."""


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 1, got {text!r}") from None
    if not value > 1.0:
        # Not %-formatted by argparse (unlike help strings): a single % prints as one.
        raise argparse.ArgumentTypeError(f"expected a number above 1 (1.10 = 10% slower), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zfkernels", description="Fast, exact Zeiler & Fergus deconvnet kernels."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,visualize,info}")
    bench = commands.add_parser(
        "bench",
        help="benchmark the ops against stock PyTorch (eager and torch.compile) at ZFNet shapes, and two "
        "end-to-end workloads",
        description="Benchmark the zfkernels ops against stock PyTorch at the shapes of ZFNet's layers, and "
        "whole workloads: zfnet_train (one SGD step of ZFNet), deconvnet (top-1 projections of AlexNet's 256 "
        "conv5 filters, also against captum) and patched_models (zfkernels.patch on torchvision AlexNet, "
        "VGG11 and ResNet18, inference and a training step). The default is the headline run (a few "
        "minutes): each op at layer 1, layer 5 and a tiny 1x4x8x8 tensor (the per-call cost), forward and "
        "backward, fp32, batch 32, and the end-to-end cases at reduced size; --full runs the whole matrix "
        "(every layer, mode "
        "and dtype, torch.compile, the full-size end-to-end cases: what the README's figures come from). "
        "Opt-in (--ops mining,projection,mining_memory): the analysis workloads, mining AlexNet's top-9 over "
        "2,048 images and projecting it, against the plain forward pass and captum, and the peak memory of "
        "mining 8,192 images against 1,024 (measured, not timed). Each provider's result is checked against "
        "the reference before it is timed; the report judges every README target the run measured.",
    )
    profile = bench.add_mutually_exclusive_group()
    profile.add_argument(
        "--full",
        action="store_true",
        help="the whole matrix: every layer, mode and dtype, torch.compile and the reference backend, the "
        "full-size end-to-end cases (an hour on a 2-core CPU)",
    )
    profile.add_argument(
        "--quick",
        action="store_true",
        help="the smoke run: the headline cells at batch 8 with short timing, end-to-end cases reduced "
        f"(deconvnet {QUICK_DECONVNET_IMAGES} images x {QUICK_DECONVNET_FILTERS} filters); about a minute",
    )
    bench.add_argument(
        "--ops",
        type=_comma_list,
        help=f"comma-separated ops ({', '.join([*OPS, *END_TO_END])}); default all",
    )
    bench.add_argument(
        "--shapes",
        type=_comma_list,
        help="comma-separated: ZFNet layers L1..L5 for the ops, tiny (1x4x8x8: the per-call cost) for "
        "pool, unpool and relu, "
        + ", ".join(f"{'/'.join(spec.shapes)} for {name}" for name, spec in END_TO_END.items())
        + "; default all",
    )
    bench.add_argument(
        "--modes",
        type=_comma_list,
        help="forward, backward, full or all; default forward and backward (--full: all; the end-to-end "
        "cases run in their own modes)",
    )
    bench.add_argument(
        "--dtype",
        type=_comma_list,
        help="fp32, bf16 or all; default fp32 (--full: all; the end-to-end cases run in fp32 only)",
    )
    bench.add_argument("--device", help="cpu or cuda[:N]; default cuda when present, else cpu")
    bench.add_argument(
        "--batch",
        type=_positive_int,
        help="batch size of the ops and zfnet_train; default 32 (8 with --quick); deconvnet's workload is "
        "the issue's (9 images x 256 filters) whatever the batch",
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        help="timed calls per cell; default: as many as fit in about a second (end-to-end cases: in 30 s, "
        "1 to 5, after a verifying call that is also the warm-up)",
    )
    bench.add_argument(
        "--providers",
        type=_comma_list,
        help="eager, compile, captum (deconvnet only) and zfkernels backends (cpu, reference, ...); default "
        "all that run on the device",
    )
    bench.add_argument("--output", type=Path, default=Path("bench-results"), help="directory for the report")
    bench.add_argument(
        "--compare", type=Path, metavar="OLD.json", help="show the change against a stored run"
    )
    bench.add_argument(
        "--threshold",
        type=_ratio,
        default=1.10,
        help="with --compare: exit 1 when a cell's median exceeds this times the old one (default 1.10)",
    )
    bench.add_argument("--threads", type=_positive_int, help="CPU threads to pin; default torch's own count")
    bench.add_argument(
        "--interleave",
        action="store_true",
        help="time a case's providers in alternating rounds (cancels machine drift; charges page faults "
        "that follow the other providers' memory churn); end-to-end cases: rounds of one call each",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_visualize(commands)
    commands.add_parser("info", help="versions, backends and what was built")
    return parser


def _add_visualize(commands: argparse._SubParsersAction) -> None:
    visualize = commands.add_parser(
        "visualize",
        help="the paper's Fig. 2 for a dataset: every filter's top-k activations, projected, as PNGs and a "
        "browsable HTML gallery",
        description="Mine a folder of images for the k strongest activations of every filter of every conv "
        "layer (one streaming pass, resumable), project each to pixel space beside the image patch it sees, "
        "and write the Fig. 2 PNGs and a static HTML gallery (open OUT/index.html). Under torchrun (-m "
        "zfkernels visualize) the work is split over the processes, with the same result.",
    )
    visualize.add_argument(
        "--model", default="zfnet", help="zfnet or a torchvision classification model name; default zfnet"
    )
    visualize.add_argument(
        "--weights",
        type=Path,
        help="state dict file (read with torch.load(weights_only=True)); default: random init (--seed)",
    )
    visualize.add_argument(
        "--data",
        type=Path,
        help="folder of JPEG/PNG images (searched recursively); default: the 18 photos scikit-image ships",
    )
    visualize.add_argument(
        "--out", type=Path, default=Path("gallery"), help="output directory (default gallery)"
    )
    visualize.add_argument(
        "--layers", type=_comma_list, help="comma-separated module names; default every conv layer"
    )
    visualize.add_argument("--k", type=_positive_int, default=9, help="activations per filter (default 9)")
    visualize.add_argument("--batch", type=_positive_int, default=64, help="images per forward (default 64)")
    visualize.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    visualize.add_argument(
        "--resize", type=_positive_int, help="shorter side before the center crop; default the model's (256)"
    )
    visualize.add_argument("--crop", type=_positive_int, help="center crop size; default the model's (224)")
    visualize.add_argument(
        "--device", help="cpu or cuda[:N]; default cuda when present (torchrun: LOCAL_RANK)"
    )
    visualize.add_argument(
        "--seed", type=int, default=0, help="random init seed without --weights (default 0)"
    )
    visualize.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=5000,
        help="images between checkpoints (default 5000)",
    )
    visualize.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoints")
    visualize.add_argument("--overwrite", action="store_true", help="replace a different run's result in OUT")
    visualize.add_argument("--no-progress", action="store_true", help="no progress bars")


def _resolve_device(requested: str | None) -> str:
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"unknown device {requested!r}; choose cpu or cuda") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise UsageError(f"device {requested!r} is not supported; choose cpu or cuda")
    if not torch.cuda.is_available():
        raise UsageError(f"device {requested!r} is not available: torch {torch.__version__} sees no CUDA GPU")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(
            f"device {requested!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) here"
        )
    return str(device)


def _check_writable(directory: Path) -> None:
    """Fail before the run, not after minutes of measuring, when the report could not be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise UsageError(
            f"cannot write to output directory {str(directory)!r}: {error.strerror or error}"
        ) from None


def _plan(args: argparse.Namespace) -> tuple[list[Case], Settings, list[str]]:
    """The cases and settings `bench` was asked for, checked before anything is measured, and notes on
    end-to-end cases left out of a default selection because a package they need is missing."""
    try:
        modes = args.modes or (["all"] if args.full else None)  # None: the headline's
        dtypes = args.dtype or (["all"] if args.full else ["fp32"])
        selected = select_cases(
            args.ops,
            args.shapes,
            MODES if modes == ["all"] else modes,
            list(DTYPES) if dtypes == ["all"] else dtypes,
            headline=not args.full,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not selected:
        asked = ", ".join(
            f"{flag} {','.join(value)}"
            for flag, value in (("--shapes", args.shapes), ("--modes", args.modes), ("--dtype", args.dtype))
            if value is not None
        )
        raise UsageError(f"no case matches {asked}: {describe_ops(args.ops)}")
    skipped = []
    for case in list(selected):
        reason = case_unavailable(case)
        if reason is None:
            continue
        if args.ops is not None and case.op in args.ops:
            raise UsageError(f"cannot run {case.op}: {reason}")
        selected.remove(case)
        skipped.append(f"{case.id} left out: {reason}")
    if not selected:
        raise UsageError("; ".join(skipped))
    device = _resolve_device(args.device)
    providers = args.providers
    if providers is not None:
        for provider in providers:
            reason = provider_unavailable(provider)
            if reason is not None:
                raise UsageError(f"provider {provider!r} is not available: {reason}")
        known = [*STOCK_PROVIDERS, *THIRD_PARTY_PROVIDERS, *BASELINE_PROVIDERS, *backend_providers(device)]
        unknown = [p for p in providers if p not in known]
        if unknown:
            names = ", ".join(map(repr, unknown))
            raise UsageError(f"provider {names} does not run on {device}; choose from {', '.join(known)}")
    elif not args.full:  # compiling alone takes minutes on 2 cores, and the reference is the slow floor
        third_party = [p for p in THIRD_PARTY_PROVIDERS if provider_unavailable(p) is None]
        providers = [
            "eager",
            *third_party,
            *BASELINE_PROVIDERS,
            *(p for p in backend_providers(device) if p != "reference"),
        ]
    settings = Settings(
        device=device,
        batch=args.batch or (8 if args.quick else 32),
        image_size=DEFAULT_IMAGE_SIZE,
        threads=args.threads or torch.get_num_threads(),
        providers=providers,
        policy=TimingPolicy(
            repeats=args.repeats, budget_s=0.15, min_repeats=3, interleave=args.interleave, long_budget_s=3.0
        )
        if args.quick
        else TimingPolicy(repeats=args.repeats, interleave=args.interleave)
        if args.full
        else TimingPolicy(
            repeats=args.repeats, budget_s=0.5, min_repeats=5, interleave=args.interleave, long_budget_s=5.0
        ),
        copy_mib=64 if args.quick else 256,
        copy_processes=0 if args.quick else 2,
        quick=not args.full,
        profile="full" if args.full else "quick" if args.quick else "headline",
    )
    return selected, settings, skipped


_PROFILE_NOTES = {
    "full": "",
    "quick": " (--quick: reduced workloads)",
    "headline": " (headline run; --full: all)",
}


def _bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    selected, settings, skipped = _plan(args)
    old = None
    if args.compare is not None:
        # The whole record is checked here, before minutes of measuring, not when the comparison needs it.
        try:
            old = report.load_run(args.compare)
        except OSError as error:
            raise UsageError(
                f"cannot use --compare {str(args.compare)!r}: {error.strerror or error}"
            ) from None
        except ValueError as error:  # its message starts with the file's name
            raise UsageError(f"cannot use --compare {error}") from None
    _check_writable(args.output)
    # Inductor warns on every compile that a CPU-only machine has no CUDA runtime: true, and noise here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for note in skipped:
        print(f"zfkernels bench: {note}")
    print(
        f"zfkernels bench: {len(selected)} cases on {settings.device}, batch {settings.batch}, "
        f"CPU threads: {settings.threads}" + _PROFILE_NOTES[settings.profile],
        flush=True,
    )
    run = run_cases(selected, settings, progress=not args.no_progress)
    print(report.format_header(run))
    columns = shutil.get_terminal_size().columns if sys.stdout.isatty() else None  # piped: every column
    print(report.format_table(run, columns))
    try:
        written, chart_skipped_because = report.write_outputs(run, args.output)
    except OSError as error:
        reason = error.strerror or error
        raise UsageError(f"cannot write the report to {str(args.output)!r}: {reason}") from None
    print(f"wrote {', '.join(str(path) for path in written)}")
    if chart_skipped_because is not None:
        print(f"chart skipped: {chart_skipped_because}")
    print(f"wall time {time.perf_counter() - started:.0f} s ({run.wall_s:.0f} s measuring)")
    status = EXIT_OK
    broken = [c for c in run.cells if c.status != OK and c.provider not in EXTERNAL_PROVIDERS]
    if broken:
        print(f"{len(broken)} zfkernels cell(s) failed the reference check or raised", file=sys.stderr)
        status = EXIT_FAILED
    if old is not None:
        changes = report.compare_runs(old, run, args.threshold)
        print(f"\ncompared with {args.compare}:")
        print(report.format_comparison(changes, args.threshold, report.run_differences(old, run)))
        if any(change.regressed for change in changes):
            status = EXIT_FAILED
    return status


def _info() -> int:
    """`python -m zfkernels.info` where that module exists; otherwise the essentials, from here."""
    if importlib.util.find_spec("zfkernels.info") is not None:
        runpy.run_module("zfkernels.info", run_name="__main__", alter_sys=True)
        return EXIT_OK
    import zfkernels
    from zfkernels import _extension

    print(f"zfkernels {zfkernels.__version__}, torch {torch.__version__}, CUDA: {torch.cuda.is_available()}")
    print(f"backends: {', '.join(zfkernels.available_backends())}")
    print(
        "C++ extension: "
        + ("loaded" if _extension.cpu_module is not None else f"missing ({_extension.cpu_error})")
    )
    return EXIT_OK


def _visualize(args: argparse.Namespace) -> int:
    import dataclasses

    from .analysis import ImageFolderDataset, SamplePhotos, default_preprocessing, load_model
    from .analysis.visualize import _distributed_device, visualize

    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run, or start over")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.device is not None:
        _resolve_device(args.device)  # a device this machine lacks: one line, before any work
    try:
        device = _distributed_device(args.device)
        model = load_model(args.model, args.weights, seed=args.seed).to(device)
        preprocess = default_preprocessing(args.model)
        changes = {
            name: getattr(args, name) for name in ("resize", "crop") if getattr(args, name) is not None
        }
        preprocess = dataclasses.replace(preprocess, **changes)
        if args.data is None:
            dataset = SamplePhotos(preprocess)
            print(f"no --data: using the {len(dataset)} photos scikit-image ships", file=sys.stderr)
        else:
            dataset = ImageFolderDataset(args.data, preprocess)
        index = visualize(
            model,
            dataset,
            args.out,
            layers=args.layers,
            k=args.k,
            batch_size=args.batch,
            num_workers=args.workers,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ValueError, ImportError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    if index is not None:
        print(f"gallery: {index}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"bench": _bench, "visualize": _visualize}
    try:
        return commands[args.command](args) if args.command in commands else _info()
    except UsageError as error:
        print(f"zfkernels {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"zfkernels {args.command}: interrupted", file=sys.stderr)
        return 130
