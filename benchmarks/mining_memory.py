"""Peak memory of mining does not grow with the dataset: peak RSS of a fresh process mining N images.

    python benchmarks/mining_memory.py            # 1,024 and 8,192 images, each in its own process

torchvision AlexNet (random init, seed 0), all five conv layers, k = 9, batches of 64, 224 px images
generated from their index (so the dataset itself holds no memory). The issue's target: mining 8,192
images peaks within 10% of mining 1,024. A process's peak RSS only rises, so each count runs in a fresh
process; the RSS held before mining (torch, the model) is printed too. `zfkernels bench --ops
mining_memory` measures the same workloads' peak torch allocations with the profiler instead; this script
also sees memory that is not torch's (Python objects, the C library's heap).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

import torch

from zfkernels.bench.analysis import GeneratedImages

COUNTS = (1024, 8192)


def measure(count: int) -> tuple[float, float, float]:
    """(peak RSS MB, RSS MB before mining, seconds) of mining `count` images in this process."""
    import torchvision

    from zfkernels.analysis import mine

    torch.manual_seed(0)
    model = torchvision.models.alexnet().eval()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    mine(model, GeneratedImages(count), k=9, batch_size=64, progress=False)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, before, time.perf_counter() - started


def main() -> None:
    if len(sys.argv) == 2:  # the child: one count
        peak, before, seconds = measure(int(sys.argv[1]))
        print(f"{peak:.0f} {before:.0f} {seconds:.1f}")
        return
    results = {}
    for count in COUNTS:
        out = subprocess.run(
            [sys.executable, __file__, str(count)], capture_output=True, text=True, check=True
        )
        peak, before, seconds = (float(v) for v in out.stdout.split())
        results[count] = peak
        print(f"{count:5d} images: peak RSS {peak:.0f} MB ({before:.0f} MB before mining), {seconds:.0f} s")
    small, large = results[COUNTS[0]], results[COUNTS[-1]]
    verdict = "met" if large <= 1.10 * small else "NOT met"
    print(f"{COUNTS[-1]} vs {COUNTS[0]} images: {large / small:.3f}x the peak (target <= 1.10x: {verdict})")


if __name__ == "__main__":
    main()
