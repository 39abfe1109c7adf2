"""zfkernels.analysis.project_mining: every top-k entry projected, against DeconvNet.project of that image.

The oracle is the per-image API: for entry (filter c, rank r) of a layer, ``DeconvNet.project`` of the one
image it came from, filter c, top 1 (the mined position is that image's first maximum). Its image-sized
projection must equal the stored window pasted at its origin: bit for bit on the chain path (the same
kernels on the same one-image batch), within 1e-6 of the largest magnitude on the gradient path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import zfkernels
from zfkernels.analysis import Mining, ProjectionMismatchWarning, mine, project_mining, to_display

REPO = Path(__file__).resolve().parents[1]


def chain_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 6, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 10, 3),
    ).eval()


class Residual(nn.Module):
    """A conv, then a residual block: the block's second conv is past an add (gradient path)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 7, 3, padding=1)
        self.skip = nn.Conv2d(6, 7, 1)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        y = torch.relu(self.conv1(x)) + x
        return self.conv2(y) + self.skip(x)


def images(count: int, size: int = 36, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Counting(Dataset):
    def __init__(self, base: Dataset):
        self.base, self.fetched = base, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        self.fetched.append(index)
        return self.base[index]


def pasted(window: torch.Tensor, origin: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The window placed in an image-sized plane (what DeconvNet.project returns), zeros elsewhere."""
    plane = window.new_zeros((window.shape[0], *size))
    top, left = origin.tolist()
    rows = slice(max(top, 0), min(top + window.shape[1], size[0]))
    cols = slice(max(left, 0), min(left + window.shape[2], size[1]))
    plane[:, rows, cols] = window[:, rows.start - top : rows.stop - top, cols.start - left : cols.stop - left]
    return plane


def check_against_project(model, data, projected, exact: bool) -> int:
    deconvnet = zfkernels.DeconvNet(model)
    checked = 0
    for name, layer in projected.layers.items():
        for c in range(layer.filters):
            for r in range(layer.k):
                index = int(layer.images[c, r])
                if index < 0:
                    continue
                reference = deconvnet.project(data[index : index + 1], name, filters=[c], top=1)
                assert reference.positions[0, 0, 0].tolist() == layer.positions[c, r].tolist(), (name, c, r)
                expected = reference.pixels[0, 0, 0]
                got = pasted(layer.pixels[c, r], layer.origins[c, r], tuple(data.shape[-2:]))
                if exact:
                    assert torch.equal(got, expected), (name, c, r)
                else:
                    scale = expected.abs().max().item()
                    assert (got - expected).abs().max().item() <= 1e-6 * max(scale, 1e-30), (name, c, r)
                window = layer.pixels.shape[-2:]
                top, left = layer.origins[c, r].tolist()
                patch = pasted(layer.patches[c, r].float(), layer.origins[c, r], tuple(data.shape[-2:]))
                shown = (to_display(data[index]) * 255).round()
                rows = slice(max(top, 0), min(top + window[0], data.shape[-2]))
                cols = slice(max(left, 0), min(left + window[1], data.shape[-1]))
                assert torch.equal(patch[:, rows, cols], shown[:, rows, cols]), (name, c, r)
                checked += 1
    return checked


def test_chain_layers_equal_deconvnet_project_bit_for_bit():
    model, data = chain_model(), images(7)
    model[4].running_mean.uniform_(-0.5, 0.5)
    model[4].running_var.uniform_(0.5, 2.0)
    mined = mine(model, TensorDataset(data), k=3, batch_size=2, progress=False)
    projected = project_mining(mined, model, TensorDataset(data), batch_size=1, pixels_dtype=torch.float32)
    assert {layer.path for layer in projected.layers.values()} == {"deconvnet"}
    # Windows of the receptive field's size (5 x 5 for the first conv); the last conv's (37) is wider than
    # the 36 px images, so it is stored image-sized.
    assert projected.layers["0"].pixels.shape[-2:] == (5, 5)
    assert projected.layers["7"].pixels.shape[-2:] == (36, 36)
    assert check_against_project(model, data, projected, exact=True) == 3 * (6 + 8 + 10)


def test_field_wider_than_the_image_is_stored_image_sized():
    model, data = chain_model(), images(4, size=30)
    mined = mine(model, TensorDataset(data), layers=["7"], k=2, progress=False)
    projected = project_mining(mined, model, TensorDataset(data), batch_size=1, pixels_dtype=torch.float32)
    field = zfkernels.DeconvNet(model).receptive_field("7").size
    assert field[0] > 30 and projected.layers["7"].pixels.shape[-2:] == (30, 30)
    assert (projected.layers["7"].origins == 0).all()
    assert check_against_project(model, data, projected, exact=True) == 2 * 10


def test_gradient_path_layers_within_1e6():
    model, data = Residual(), images(6)
    mined = mine(model, TensorDataset(data), k=2, batch_size=3, progress=False)
    projected = project_mining(mined, model, TensorDataset(data), batch_size=1, pixels_dtype=torch.float32)
    paths = {name: layer.path for name, layer in projected.layers.items()}
    assert paths["stem"] == "deconvnet" and paths["conv2"] == "gradient", paths
    assert projected.manifest["projection"]["paths"] == paths
    assert check_against_project(model, data, projected, exact=False) == 2 * (6 + 6 + 7 + 7)


def test_each_distinct_image_is_loaded_once_and_run_forward_once(monkeypatch):
    model, data = chain_model(), images(20)
    counting = Counting(TensorDataset(data))
    mined = mine(model, counting, k=2, progress=False)
    counting.fetched.clear()
    forwards = []
    run_forward = zfkernels.DeconvNet.forward

    def spy(self, images, layers, **options):
        forwards.append((images.shape[0], list(layers)))
        return run_forward(self, images, layers, **options)

    monkeypatch.setattr(zfkernels.DeconvNet, "forward", spy)
    project_mining(mined, model, counting, batch_size=4, progress=False)
    distinct = mined.distinct_images()
    assert sorted(counting.fetched) == distinct  # each once
    sizes = [size for size, _ in forwards]
    assert sum(sizes) == len(distinct) and max(sizes) == 4  # one forward per image, for all its layers
    assert all(set(layers) <= set(mined.layers) for _, layers in forwards)


def test_float16_pixels_are_the_float32_ones_rounded():
    model, data = chain_model(), images(5)
    mined = mine(model, TensorDataset(data), k=2, progress=False)
    wide = project_mining(mined, model, TensorDataset(data), progress=False)  # float32: the default
    half = project_mining(mined, model, TensorDataset(data), pixels_dtype=torch.float16, progress=False)
    for name in mined.layers:
        assert half.layers[name].pixels.dtype == torch.float16
        assert torch.equal(half.layers[name].pixels, wide.layers[name].pixels.half())
        assert torch.equal(half.layers[name].patches, wide.layers[name].patches)


def test_batch_size_does_not_change_positions_or_patches():
    model, data = chain_model(), images(9)
    mined = mine(model, TensorDataset(data), k=3, progress=False)
    one = project_mining(mined, model, TensorDataset(data), batch_size=1, pixels_dtype=torch.float32)
    many = project_mining(mined, model, TensorDataset(data), batch_size=5, pixels_dtype=torch.float32)
    for name in mined.layers:
        a, b = one.layers[name], many.layers[name]
        assert torch.equal(a.origins, b.origins) and torch.equal(a.boxes, b.boxes)
        assert torch.equal(a.patches, b.patches)
        scale = a.pixels.abs().amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-30)
        assert ((a.pixels - b.pixels).abs() / scale).max() <= 1e-5


def test_empty_slots_stay_empty():
    model, data = chain_model(), images(2)
    mined = mine(model, TensorDataset(data), k=4, progress=False)
    projected = project_mining(mined, model, TensorDataset(data), progress=False)
    layer = projected.layers["0"]
    empty = layer.images < 0
    assert empty.sum() == 2 * layer.filters
    assert (layer.pixels[empty] == 0).all() and (layer.patches[empty] == 0).all()


def test_other_weights_or_dataset_are_refused():
    model, data = chain_model(), images(5)
    mined = mine(model, TensorDataset(data), k=2, progress=False)
    other = chain_model()
    with torch.no_grad():
        other[0].weight.add_(0.1)
    with pytest.raises(ValueError, match="model weights"):
        project_mining(mined, other, TensorDataset(data), progress=False)
    with pytest.raises(ValueError, match="dataset"):
        project_mining(mined, model, TensorDataset(images(5, seed=1)), progress=False)


def test_a_changed_model_without_a_manifest_warns():
    model, data = chain_model(), images(5)
    mined = mine(model, TensorDataset(data), k=2, progress=False)
    bare = Mining(mined.layers, mined.k, mined.tables, mined.names)  # no manifest: nothing to check against
    with torch.no_grad():
        model[0].weight.mul_(2)
    with pytest.warns(ProjectionMismatchWarning) as record:
        project_mining(bare, model, TensorDataset(data), progress=False)
    assert sorted(str(w.message).split("'")[1] for w in record) == ["0", "3", "7"]


def test_bad_arguments_name_themselves():
    model, data = chain_model(), images(3)
    mined = mine(model, TensorDataset(data), k=1, progress=False)
    dataset = TensorDataset(data)
    with pytest.raises(TypeError, match="mined"):
        project_mining({"0": None}, model, dataset)
    with pytest.raises(ValueError, match=r"layers \['nope'\] were not mined"):
        project_mining(mined, model, dataset, layers=["nope"])
    with pytest.raises(ValueError, match="batch_size"):
        project_mining(mined, model, dataset, batch_size=0)
    with pytest.raises(TypeError, match="pixels_dtype"):
        project_mining(mined, model, dataset, pixels_dtype=torch.int8)
    bare = Mining(mined.layers, mined.k, mined.tables, mined.names)
    with pytest.raises(ValueError, match="dataset has 2 items"):
        project_mining(bare, model, TensorDataset(data[:2]))


def test_layers_subset_and_mining_project_method():
    model, data = chain_model(), images(4)
    mined = mine(model, TensorDataset(data), k=2, progress=False)
    projected = mined.project(model, TensorDataset(data), layers=["3"], progress=False)
    assert list(projected.layers) == ["3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        project_mining(mined, model, TensorDataset(data), progress=False)  # a clean run warns nothing


# --------------------------------------------------------------------------------- the whole command line
def _visualize(out: Path, *extra: str, env: dict | None = None, launcher: list[str] | None = None):
    command = [
        *(launcher or [sys.executable, "-m"]),
        "zfkernels",
        "visualize",
        "--model",
        "alexnet",
        "--data",
        str(out.parent / "photos"),
        "--out",
        str(out),
        "--layers",
        "features.0,features.3",
        "--k",
        "2",
        "--batch",
        "3",
        "--resize",
        "72",
        "--crop",
        "64",
        "--no-progress",
        *extra,
    ]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    environment.update(env or {})
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def _photos(folder: Path, count: int = 7) -> None:
    import skimage.data
    from PIL import Image

    from zfkernels.analysis import SAMPLE_PHOTOS

    folder.mkdir(parents=True)
    for name in SAMPLE_PHOTOS[:count]:
        pixels = np.asarray(getattr(skimage.data, name)())
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        Image.fromarray(pixels[:, :, :3]).save(folder / f"{name}.png")


def _outputs(out: Path) -> dict[str, bytes]:
    """Every result file by relative path, except what records the run itself (time, world size)."""
    skip = {"manifest.json", "projections/index.json", "index.html"}
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and "checkpoints" not in p.parts and str(p.relative_to(out)) not in skip
    }


def test_command_line_two_gloo_processes_equal_one(tmp_path):
    pytest.importorskip("skimage")
    _photos(tmp_path / "photos")
    single = _visualize(tmp_path / "one")
    assert single.returncode == 0, single.stderr
    assert f"gallery: {tmp_path / 'one' / 'index.html'}" in single.stdout
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    double = _visualize(tmp_path / "two", launcher=launcher, env={"OMP_NUM_THREADS": "1"})
    assert double.returncode == 0, double.stderr
    one, two = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert sorted(one) == sorted(two) and any(name.endswith(".png") for name in one)
    assert [name for name in one if one[name] != two[name]] == []  # tables, projections, figures: same bytes
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == [
        "mining-rank0-of-2.npz",
        "mining-rank1-of-2.npz",
    ]


def test_command_line_refuses_another_run_and_resumes_its_own(tmp_path):
    pytest.importorskip("skimage")
    _photos(tmp_path / "photos", count=4)
    first = _visualize(tmp_path / "out")
    assert first.returncode == 0, first.stderr
    again = _visualize(tmp_path / "out", "--k", "3")
    assert again.returncode == 2 and "k (2 -> 3)" in again.stderr and "Traceback" not in again.stderr
    resumed = _visualize(tmp_path / "out", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    replaced = _visualize(tmp_path / "out", "--k", "3", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    missing = _visualize(tmp_path / "out2", "--layers", "features.99")
    assert missing.returncode == 2 and "features.99" in missing.stderr
