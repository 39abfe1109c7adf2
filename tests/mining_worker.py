"""A mining run in its own process, for tests/test_mining.py's kill-and-resume and multi-process checks.

    python tests/mining_worker.py --out OUT [--checkpoint-dir DIR --checkpoint-every N] [--resume]
        [--delay SECONDS] [--seed S] [--length N] [--batch-size B]

Under ``torchrun``-style environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) it joins a gloo
process group first. Prints one JSON line: the rank, the saved directory (None on ranks other than 0) and a
digest of the merged tables. The model and dataset are defined here so the test builds the same ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import torch
from torch import nn
from torch.utils.data import Dataset

IMAGE_SHAPE = (2, 9, 9)


class SyntheticImages(Dataset):
    """Small integer-valued images (so every activation of :func:`integer_model` is exact in float32), with
    ties built in: every 5th image is constant, and image ``i`` repeats image ``i - 7`` when ``i % 7 == 6``.

    ``delay`` seconds of sleep per item slow a run down enough to be killed mid-pass; ``interrupt_at`` raises
    KeyboardInterrupt when that item is read. Neither is part of the fingerprint: a resumed run without
    them is the same run.
    """

    def __init__(self, length: int, delay: float = 0.0, interrupt_at: int | None = None):
        self.length, self.delay, self.interrupt_at = length, delay, interrupt_at

    def __len__(self) -> int:
        return self.length

    def fingerprint(self) -> str:
        return f"synthetic-v1-{self.length}"

    def source(self, index: int) -> int:
        return index - 7 if index % 7 == 6 and index >= 7 else index

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if self.delay:
            time.sleep(self.delay)
        if index == self.interrupt_at:
            raise KeyboardInterrupt(f"interrupted at item {index}")
        source = self.source(index)
        if source % 5 == 0:
            return torch.full(IMAGE_SHAPE, float(source % 3 - 1)), 0
        generator = torch.Generator().manual_seed(1000 + source)
        return torch.randint(-3, 4, IMAGE_SHAPE, generator=generator).to(torch.float32), 0


def integer_model(seed: int = 0) -> nn.Module:
    """Conv -> ReLU (in place) -> pool -> conv -> ReLU -> flatten -> linear, integer weights in [-2, 2]."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(IMAGE_SHAPE[0], 5, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(5, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 4),
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randint(-2, 3, parameter.shape, generator=generator).to(parameter.dtype))
    return model


def tables_digest(mined) -> str:
    digest = hashlib.sha256()
    for layer in mined.layers:
        table = mined.tables[layer]
        for tensor in (table.values, table.images, table.positions):
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    from zfkernels.analysis import mine

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--checkpoint-every", type=int, default=8)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    try:
        mined = mine(
            integer_model(args.seed),
            SyntheticImages(args.length, args.delay),
            k=args.k,
            batch_size=args.batch_size,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            progress=False,
        )
        saved = mined.save(args.out)
        rank = int(os.environ.get("RANK", "0"))
        report = {"rank": rank, "saved": str(saved) if saved else None, "digest": tables_digest(mined)}
        print(json.dumps(report), flush=True)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    # Import ourselves by module name, so the classes are mining_worker.* (as in the test) and not __main__.*:
    # the dataset's class name is part of the run's manifest.
    import mining_worker

    mining_worker.main()
