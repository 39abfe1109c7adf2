"""The whole Fig. 2 job in one call: mine a dataset, project the top-k, draw the figures and the gallery.

``zfkernels visualize`` (and ``torchrun ... -m zfkernels visualize``) is a thin command line over
:func:`visualize`. The output directory holds, from first written to last::

    checkpoints/            mining checkpoints, one per rank (resume from here after a kill)
    manifest.json, topk.npz, names.json      the mining result (zfkernels.analysis.load_mining)
    projections/            the projected result (zfkernels.analysis.load_projections)
    index.html, layer-<i>.html, layer-<i>/       the gallery (pages and per-filter thumbnails)
    figure2-<i>.png                              the paper's Fig. 2 for layer i (its first 16 filters)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .data import current_rank_and_world_size
from .gallery import render_gallery
from .mining import DEFAULT_BATCH_SIZE, DEFAULT_CHECKPOINT_EVERY, mine, mining_identity, prepare_output
from .projection import project_mining

__all__ = ["CHECKPOINTS", "visualize"]

CHECKPOINTS = "checkpoints"  # the mining checkpoints' subdirectory of the output directory


def visualize(
    model: nn.Module,
    dataset: Dataset,
    out: str | os.PathLike[str],
    *,
    layers: str | Sequence[str] | None = None,
    k: int = 9,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path | None:
    """Mine ``dataset`` for the ``k`` strongest activations of every filter of ``layers`` (default: every
    conv layer), project them all, and write the result, the Fig. 2 PNGs and an HTML gallery to ``out``.

    Returns the gallery's ``index.html`` (None on ranks other than 0 of a process group, which compute
    their share but write only checkpoints). ``out`` holding a different run's result is refused unless
    ``overwrite``; ``resume`` continues a killed run from its checkpoints (see :func:`mine`).
    """
    rank, _ = current_rank_and_world_size()
    out = prepare_output(out, mining_identity(model, dataset, layers, k), resume=resume, overwrite=overwrite)
    mined = mine(
        model,
        dataset,
        layers,
        k,
        batch_size=batch_size,
        num_workers=num_workers,
        checkpoint_dir=out / CHECKPOINTS,
        checkpoint_every=checkpoint_every,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
    )
    mined.save(out, overwrite=True)  # prepare_output above refused a different run unless overwrite
    projected = project_mining(mined, model, dataset, batch_size=batch_size, progress=progress)
    if rank != 0:
        return None
    projected.save(out)
    return render_gallery(projected, out)


def _distributed_device(requested: str | None) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): start the process group once (nccl on CUDA, gloo on CPU) and give
    each process its own GPU (LOCAL_RANK); otherwise the requested device (default: CUDA when present)."""
    import torch.distributed as dist

    wanted = torch.device(requested) if requested else None
    use_cuda = torch.cuda.is_available() if wanted is None else wanted.type == "cuda"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if not use_cuda:
        return torch.device("cpu")
    if dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return wanted or torch.device("cuda")
