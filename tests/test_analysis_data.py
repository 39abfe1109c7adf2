"""zfkernels.analysis.data: image folders, preprocessing, fingerprints, shards and model loading."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from zfkernels.analysis import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    Preprocess,
    ShardSampler,
    Unreadable,
    dataset_fingerprint,
    default_preprocessing,
    image_name,
    load_model,
    load_weights,
    shard_indices,
    to_display,
    weights_fingerprint,
)

torchvision = pytest.importorskip("torchvision")
PIL = pytest.importorskip("PIL.Image")


def _photo(width: int, height: int, seed: int = 0) -> PIL.Image:
    """A smooth image with detail (gradients + noise), so resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return PIL.fromarray(pixels)


def _write_folder(root: Path) -> list[str]:
    """Images at several depths with mixed-case extensions, plus files that are not images."""
    names = ["b.png", "a/z.JPG", "a/c/d.Jpeg", "A2.PNG", "e.jpg"]
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo(30 + i, 20 + 2 * i, seed=i).save(
            path, format="PNG" if name.lower().endswith("png") else "JPEG"
        )
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "c" / "x.gif").write_bytes(b"GIF89a")
    return sorted(names)


# ------------------------------------------------------------------------------------------------ folders
def test_folder_lists_images_recursively_in_sorted_relative_path_order(tmp_path):
    names = _write_folder(tmp_path)
    data = ImageFolderDataset(tmp_path, transform=Preprocess(resize=16, crop=12))
    assert len(data) == 5
    assert (
        [data.name(i) for i in range(len(data))]
        == names
        == ["A2.PNG", "a/c/d.Jpeg", "a/z.JPG", "b.png", "e.jpg"]
    )
    assert [image_name(data, i) for i in range(len(data))] == names
    image = data[3]
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32
    assert ImageFolderDataset(tmp_path).__getitem__(0).shape == (3, 224, 224)  # the default preprocessing


def test_undecodable_file_is_an_unreadable_marker(tmp_path):
    _photo(10, 10).save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\x00\x01 garbage bytes")
    data = ImageFolderDataset(tmp_path, transform=Preprocess(resize=8, crop=8))
    marker = data[0]
    assert isinstance(marker, Unreadable) and marker.name == "bad.jpg"
    assert "UnidentifiedImageError" in marker.reason
    assert isinstance(data[1], torch.Tensor)


def test_truncated_jpeg_is_unreadable(tmp_path):
    _photo(64, 48).save(tmp_path / "whole.jpg", format="JPEG")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    marker = ImageFolderDataset(tmp_path, transform=Preprocess(resize=8, crop=8))[0]
    assert isinstance(marker, Unreadable) and marker.name == "cut.jpg", marker


def test_empty_or_missing_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path.name}'? holds no image"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no image"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(ValueError, match=r"nowhere'? does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is not a directory"):
        ImageFolderDataset(tmp_path / "readme.txt")
    with pytest.raises(TypeError, match="transform must be callable"):
        ImageFolderDataset(tmp_path, transform="resize")


# ------------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("size", [(300, 200), (200, 333), (256, 256), (171, 171)], ids=str)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_preprocess_equals_torchvision_bit_for_bit(size, interpolation):
    from torchvision import transforms as T

    mode = T.InterpolationMode.BILINEAR if interpolation == "bilinear" else T.InterpolationMode.BICUBIC
    reference = T.Compose(
        [
            T.Resize(256, interpolation=mode),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    image = _photo(*size, seed=sum(size))
    ours = Preprocess(interpolation=interpolation)(image)
    expected = reference(image)
    assert ours.shape == expected.shape == (3, 224, 224)
    assert torch.equal(ours, expected), f"max difference {(ours - expected).abs().max()}"


def test_to_display_inverts_the_normalization():
    image = _photo(40, 30)
    preprocess = Preprocess(resize=30, crop=30)
    shown = preprocess.to_display(preprocess(image))
    crop = torch.from_numpy(np.array(image.resize((40, 30)))).permute(2, 0, 1)[:, :, 5:35].float() / 255
    torch.testing.assert_close(shown, crop, atol=1e-6, rtol=0)
    batch = to_display(torch.zeros(2, 3, 4, 4))
    torch.testing.assert_close(batch[0, :, 0, 0], torch.tensor(IMAGENET_MEAN))
    assert to_display(torch.full((3, 2, 2), 100.0)).max() == 1.0  # clamped
    with pytest.raises(ValueError, match="got shape"):
        to_display(torch.zeros(4, 5, 5))


def test_default_preprocessing_per_model():
    assert default_preprocessing("zfnet") == Preprocess() == default_preprocessing()
    assert default_preprocessing("alexnet").describe() == Preprocess().describe()
    inception = default_preprocessing("inception_v3")
    assert (inception.resize, inception.crop) == (342, 299)
    assert default_preprocessing("efficientnet_b7").interpolation == "bicubic"
    with pytest.raises(ValueError, match="crop .* must not exceed resize"):
        Preprocess(resize=100, crop=200)


# -------------------------------------------------------------------------------------------- fingerprints
def test_folder_fingerprint_tracks_paths_and_sizes_not_location(tmp_path):
    _write_folder(tmp_path / "one")
    first = dataset_fingerprint(ImageFolderDataset(tmp_path / "one"))
    assert dataset_fingerprint(ImageFolderDataset(tmp_path / "one")) == first
    os.rename(tmp_path / "one", tmp_path / "moved")
    assert dataset_fingerprint(ImageFolderDataset(tmp_path / "moved")) == first  # relative paths
    os.rename(tmp_path / "moved" / "b.png", tmp_path / "moved" / "b2.png")
    renamed = dataset_fingerprint(ImageFolderDataset(tmp_path / "moved"))
    assert renamed != first
    with open(tmp_path / "moved" / "e.jpg", "ab") as file:
        file.write(b"\0")
    assert dataset_fingerprint(ImageFolderDataset(tmp_path / "moved")) != renamed


def test_tensor_and_subset_fingerprints_see_contents():
    images = torch.randn(5, 3, 4, 4)
    base = dataset_fingerprint(TensorDataset(images))
    changed = images.clone()
    changed[2, 1, 0, 0] += 1
    assert dataset_fingerprint(TensorDataset(changed)) != base
    assert dataset_fingerprint(TensorDataset(images.clone())) == base
    data = TensorDataset(images)
    assert dataset_fingerprint(Subset(data, [0, 2])) != dataset_fingerprint(Subset(data, [0, 3]))


def test_weights_fingerprint_sees_every_byte_and_buffer():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    first = weights_fingerprint(model)
    assert weights_fingerprint(model.state_dict()) == first
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1e-7
    second = weights_fingerprint(model)
    assert second != first
    model[1].running_var[1] = 2.0
    assert weights_fingerprint(model) != second
    assert weights_fingerprint(model.to(torch.bfloat16)) != weights_fingerprint(model.float())


# ------------------------------------------------------------------------------------------------- names
def test_names_of_torchvision_folders_and_plain_datasets(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        _photo(12, 12).save(tmp_path / label / f"{label}1.png")
    folder = torchvision.datasets.ImageFolder(str(tmp_path))
    assert image_name(folder, 1) == str(tmp_path / "dog" / "dog1.png")
    assert image_name(Subset(folder, [1, 0]), 0) == str(tmp_path / "dog" / "dog1.png")
    assert image_name(TensorDataset(torch.zeros(3, 1)), 2) == "#2"
    assert dataset_fingerprint(folder) == dataset_fingerprint(torchvision.datasets.ImageFolder(str(tmp_path)))


# ------------------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("length,world_size", [(0, 2), (1, 3), (23, 2), (24, 4), (10, 16)])
def test_shards_cover_every_index_once_without_padding(length, world_size):
    shards = [list(shard_indices(length, rank, world_size)) for rank in range(world_size)]
    together = sorted(i for shard in shards for i in shard)
    assert together == list(range(length))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards[0] == list(range(0, length, world_size))
    sampler = ShardSampler(length, world_size - 1, world_size, start=min(1, len(shards[-1])))
    assert list(sampler) == shards[-1][min(1, len(shards[-1])) :] and len(sampler) == len(list(sampler))


def test_shard_arguments_are_checked():
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        shard_indices(10, 2, 2)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        shard_indices(10, 0, 0)
    with pytest.raises(ValueError, match="start must be an int in 0..5"):
        ShardSampler(10, 0, 2, start=6)


# ------------------------------------------------------------------------------------------------- models
def test_load_model_by_name_with_a_fixed_seed():
    from zfkernels.models import ZFNet

    zfnet = load_model("ZFNet")
    assert isinstance(zfnet, ZFNet) and not zfnet.training
    state = torch.get_rng_state()
    first, again = load_model("squeezenet1_1"), load_model("squeezenet1_1")
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert isinstance(first, torchvision.models.SqueezeNet)
    assert weights_fingerprint(first) == weights_fingerprint(again)
    assert weights_fingerprint(load_model("squeezenet1_1", seed=1)) != weights_fingerprint(first)
    with pytest.raises(
        ValueError, match=r"unknown model 'alexnt'; did you mean 'alexnet'.*valid names: zfnet, "
    ):
        load_model("alexnt")


def test_weights_file_round_trip_and_wrappers(tmp_path):
    source = load_model("squeezenet1_1", seed=3)
    state = source.state_dict()
    expected = weights_fingerprint(source)
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}, tmp_path / "ddp.pth")
    for name in ("plain.pth", "wrapped.pth", "ddp.pth"):
        assert weights_fingerprint(load_model("squeezenet1_1", tmp_path / name)) == expected, name


def test_mismatched_weights_name_the_keys(tmp_path):
    state = load_model("squeezenet1_1").state_dict()
    del state["features.0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["classifier.1.weight"] = torch.zeros(10, 512, 1, 1)
    state["classifier.1.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as caught:
        load_model("squeezenet1_1", tmp_path / "bad.pth")
    message = str(caught.value)
    assert "bad.pth" in message and "model 'squeezenet1_1'" in message
    assert "1 missing key (features.0.bias)" in message
    assert "1 unexpected key (extra.weight)" in message
    assert (
        "2 keys with the wrong shape (classifier.1.weight: weights (10, 512, 1, 1), model (1000, 512, 1, 1)"
        in message
    )
    with pytest.raises(ValueError, match="no such file"):
        load_model("squeezenet1_1", tmp_path / "missing.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="hold list, not a state dict"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.pth' could not be read by torch.load\(weights_only=True\)"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "junk.pth")
