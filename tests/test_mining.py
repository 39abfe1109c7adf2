"""zfkernels.analysis.mining: streaming top-k against a naive loop, and runs that are killed, resumed and
split over processes.

The model and images (tests/mining_worker.py) are integer-valued, so every activation is exact in float32
whatever the batch size: results are compared bit for bit, ties included (constant and duplicated images).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from mining_worker import SyntheticImages, integer_model, tables_digest
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from zfkernels.analysis import (
    FORMAT_VERSION,
    ImageFolderDataset,
    NaNActivationWarning,
    Preprocess,
    SkippedImageWarning,
    checkpoint_path,
    load_mining,
    mine,
    mining_identity,
    prepare_output,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "mining_worker.py"
LAYERS = ["0", "3"]  # integer_model's two convs
K = 4


# ------------------------------------------------------------------------------------------------- oracle
def naive_tables(model: nn.Module, dataset: Dataset, layers: list[str], k: int):
    """Every activation map of every image (one image per forward), then the top-k by explicit loops.

    Returns ({layer: (values, images, positions)} as tensors, {layer: NaN maxima count}).
    """
    modules = dict(model.named_modules())
    maps: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = [
        modules[layer].register_forward_hook(
            lambda module, inputs, output, layer=layer: maps[layer].append(output[0].detach().clone())
        )
        for layer in layers
    ]
    model.eval()
    with torch.no_grad():
        for index in range(len(dataset)):
            model(dataset[index][0].unsqueeze(0))
    for handle in handles:
        handle.remove()
    tables, nan_counts = {}, {}
    for layer in layers:
        channels = maps[layer][0].shape[0]
        width = maps[layer][0].shape[-1]
        rows_v, rows_i, rows_p = [], [], []
        nan_counts[layer] = 0
        for channel in range(channels):
            entries = []
            for index, activation in enumerate(maps[layer]):
                flat = activation[channel].flatten().tolist()
                if any(math.isnan(v) for v in flat):
                    nan_counts[layer] += 1
                    continue
                best = max(flat)
                first = flat.index(best)  # the first maximum in row-major order
                entries.append((best, index, (first // width, first % width)))
            entries.sort(key=lambda entry: (-entry[0], entry[1]))  # value down, then lower index first
            entries = entries[:k] + [(-math.inf, -1, (-1, -1))] * max(0, k - len(entries))
            rows_v.append([e[0] for e in entries])
            rows_i.append([e[1] for e in entries])
            rows_p.append([list(e[2]) for e in entries])
        tables[layer] = (
            torch.tensor(rows_v, dtype=torch.float32),
            torch.tensor(rows_i, dtype=torch.int64),
            torch.tensor(rows_p, dtype=torch.int64),
        )
    return tables, nan_counts


def assert_tables_equal(mined, expected: dict, label: str = "") -> None:
    for layer, (values, images, positions) in expected.items():
        table = mined.tables[layer]
        assert torch.equal(table.images, images), f"{label} layer {layer} images:\n{table.images}\n{images}"
        assert torch.equal(table.positions, positions), f"{label} layer {layer} positions"
        assert torch.equal(table.values, values), f"{label} layer {layer} values:\n{table.values}\n{values}"


def assert_same_result(actual, expected) -> None:
    """Same tables bit for bit, same names, same manifest except the run section (timing, world size)."""
    assert actual.layers == expected.layers and actual.k == expected.k
    for layer in expected.layers:
        for field in ("values", "images", "positions"):
            a, e = getattr(actual.tables[layer], field), getattr(expected.tables[layer], field)
            assert torch.equal(a, e), f"layer {layer} {field} differ"
    assert actual.names == expected.names
    strip = lambda manifest: {key: value for key, value in manifest.items() if key != "run"}  # noqa: E731
    assert strip(actual.manifest) == strip(expected.manifest)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add barrier waits on a busy 2-core machine
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------- correctness
def test_synthetic_data_has_the_ties_it_claims():
    data = SyntheticImages(23)
    assert torch.equal(data[13][0], data[6][0]) and data.source(13) == 6  # a duplicated image
    assert data[5][0].unique().numel() == 1  # a constant image


@pytest.mark.parametrize(
    "batch_size,num_workers", [(1, 0), (3, 0), (7, 0), (23, 0), (7, 2)], ids=lambda v: str(v)
)
def test_matches_naive_loop_any_batch_size_and_workers(batch_size, num_workers):
    model, data = integer_model(), SyntheticImages(23)
    expected, _ = naive_tables(model, data, LAYERS, K)
    mined = mine(model, data, k=K, batch_size=batch_size, num_workers=num_workers, progress=False)
    assert mined.layers == LAYERS  # the default: every conv, in forward order
    assert_tables_equal(mined, expected, f"batch {batch_size}, workers {num_workers}")
    assert mined.manifest["images_seen"] == 23 and mined.manifest["images_skipped"] == 0
    assert set(mined.names) == set(mined.distinct_images())
    assert all(mined.names[i] == f"#{i}" for i in mined.names)
    # Ties really happen, and the lower index won them: the duplicate 13 of image 6 ranks right after it.
    images = mined.tables["0"].images
    values = mined.tables["0"].values
    assert (values[:, :-1] == values[:, 1:]).any(), "no tie in the tables: the test lost its ties"
    for row in range(images.shape[0]):
        listed = images[row].tolist()
        if 13 in listed and 6 in listed:
            assert listed.index(6) < listed.index(13)


def test_fewer_images_than_k_leave_empty_slots():
    model, data = integer_model(), SyntheticImages(3)
    mined = mine(model, data, layers=["3", "0"], k=5, progress=False)
    assert mined.layers == ["3", "0"]  # as given
    expected, _ = naive_tables(model, data, ["3", "0"], 5)
    assert_tables_equal(mined, expected)
    assert (mined.tables["0"].images[:, 3:] == -1).all()
    assert (mined.tables["0"].positions[:, 3:] == -1).all()
    assert (mined.tables["0"].values[:, 3:] == -math.inf).all()


class NaNImages(SyntheticImages):
    """Every 4th image (from 1) has one NaN pixel: its maxima are NaN in every channel of both layers."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        if index % 4 == 1:
            image = image.clone()
            image[0, 4, 4] = float("nan")
        return image, label


def test_nan_maxima_are_never_selected_and_counted():
    model, data = integer_model(), NaNImages(17)
    expected, nan_counts = naive_tables(model, data, LAYERS, K)
    assert nan_counts["0"] > 0 and nan_counts["3"] > 0
    with pytest.warns(NaNActivationWarning, match=r"0: \d+ \(image, filter\) pairs") as caught:
        mined = mine(model, data, k=K, batch_size=5, progress=False)
    assert len([w for w in caught if issubclass(w.category, NaNActivationWarning)]) == 1  # once
    assert_tables_equal(mined, expected)
    assert mined.manifest["nan_maxima"] == nan_counts
    for table in mined.tables.values():
        assert not table.values.isnan().any()
        assert not set(table.images.flatten().tolist()) & {1, 5, 9, 13}


def test_float_model_matches_naive_loop_within_rounding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(inplace=True), nn.Conv2d(6, 4, 3, stride=2))
    data = TensorDataset(torch.randn(19, 3, 11, 14), torch.zeros(19))  # non-square maps
    expected, _ = naive_tables(model, data, ["0", "2"], 3)
    mined = mine(model, data, k=3, batch_size=8, progress=False)
    for layer, (values, images, positions) in expected.items():
        assert torch.equal(mined.tables[layer].images, images)
        assert torch.equal(mined.tables[layer].positions, positions)
        torch.testing.assert_close(mined.tables[layer].values, values, rtol=1e-5, atol=1e-6)


def test_channels_last_maps_match_naive_loop():
    model = integer_model().to(memory_format=torch.channels_last)

    class ChannelsLast(SyntheticImages):
        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            return image.unsqueeze(0).to(memory_format=torch.channels_last)[0], label

    data = ChannelsLast(17)
    expected, _ = naive_tables(model, data, LAYERS, K)
    layouts = []
    model[0].register_forward_hook(lambda module, inputs, output: layouts.append(output.is_contiguous()))
    mined = mine(model, data, k=K, batch_size=5, progress=False)
    assert layouts and not any(layouts), "the maps were contiguous: the channels_last path was not taken"
    assert_tables_equal(mined, expected, "channels_last")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_position_search_paths_agree(channels_last):
    """The numpy path (CPU float) and the torch paths (other dtypes, CUDA) find the same first maxima."""
    from zfkernels.analysis.mining import _first_argmax

    maps = torch.randint(-2, 3, (6, 5, 4, 7), generator=torch.Generator().manual_seed(0)).float()  # many ties
    if channels_last:
        maps = maps.to(memory_format=torch.channels_last)
    rows = torch.tensor([0, 3, 7, 12, 29])
    expected = []
    for row in rows.tolist():
        flat = maps[row // 5, row % 5].flatten().tolist()
        first = flat.index(max(flat))
        expected.append([first // 7, first % 7])
    assert _first_argmax(maps, rows).tolist() == expected  # numpy
    assert _first_argmax(maps.to(torch.bfloat16), rows).tolist() == expected  # torch (integers are exact)


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def test_forward_stops_after_the_last_requested_layer():
    model = integer_model()
    after_last = Counting()
    model.insert(4, after_last)  # right after conv "3"
    model.eval()
    mine(model, SyntheticImages(10), layers=LAYERS, k=2, batch_size=3, progress=False)
    assert after_last.calls == 0
    counted = []
    handle = model[3].register_forward_hook(lambda *args: counted.append(1))
    mine(model, SyntheticImages(10), layers=["0"], k=2, batch_size=3, progress=False)
    assert not counted  # conv "3" itself never ran
    handle.remove()
    mine(model, SyntheticImages(10), layers=LAYERS, k=2, batch_size=3, progress=False, stop_early=False)
    assert after_last.calls == 4  # ceil(10 / 3) batches, the whole forward each time


def test_training_flags_are_restored():
    model = integer_model().train()
    model[2].eval()
    mine(model, SyntheticImages(4), k=2, progress=False)
    assert model.training and model[0].training and not model[2].training


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments_raise_clear_errors():
    model, data = integer_model(), SyntheticImages(4)
    with pytest.raises(ValueError, match=r"layer 'conv9' is not a module of the model.*'0', '3'"):
        mine(model, data, layers=["conv9"], progress=False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        mine(model, data, k=0, progress=False)
    with pytest.raises(TypeError, match="k must be an int"):
        mine(model, data, k=2.0, progress=False)
    with pytest.raises(ValueError, match="dataset is empty"):
        mine(model, TensorDataset(torch.empty(0, 2, 9, 9)), progress=False)
    with pytest.raises(ValueError, match="layers is empty"):
        mine(model, data, layers=[], progress=False)
    with pytest.raises(ValueError, match="more than once"):
        mine(model, data, layers=["0", "0"], progress=False)
    with pytest.raises(ValueError, match="4-D"):
        mine(model, data, layers=["5"], progress=False)  # Flatten
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        mine(model, data, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        mine(model, data, resume=True, progress=False)
    with pytest.raises(ValueError, match="exclude each other"):
        mine(model, data, resume=True, overwrite=True, checkpoint_dir="unused", progress=False)


def test_item_that_is_not_an_image_tensor_names_the_index():
    class Pairs(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return ("not an image", index)

    with pytest.raises(TypeError, match="dataset item 0 must be an image tensor"):
        mine(integer_model(), Pairs(), progress=False)


def _write_png(path: Path, seed: int, size=(20, 17)) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_unreadable_image_is_skipped_with_a_warning_and_counted(tmp_path):
    for i in range(4):
        _write_png(tmp_path / f"img{i}.png", i)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG at all")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3))
    data = ImageFolderDataset(tmp_path, transform=Preprocess(resize=16, crop=16))
    with pytest.warns(SkippedImageWarning, match=r"'broken.jpg' \(dataset index 0\)"):
        mined = mine(model, data, k=2, batch_size=2, progress=False)
    manifest = mined.manifest
    assert manifest["images_seen"] == 4 and manifest["images_skipped"] == 1
    assert manifest["skipped"][0]["index"] == 0 and manifest["skipped"][0]["name"] == "broken.jpg"
    assert "UnidentifiedImageError" in manifest["skipped"][0]["reason"]
    assert 0 not in mined.distinct_images()
    assert set(mined.names.values()) <= {f"img{i}.png" for i in range(4)}
    assert manifest["preprocessing"]["crop"] == 16


def test_image_of_another_shape_is_skipped():
    images = [torch.ones(2, 9, 9), torch.ones(2, 8, 9), torch.zeros(2, 9, 9)]

    class Listed(Dataset):  # bare tensors, one of another shape than the first
        def __len__(self):
            return len(images)

        def __getitem__(self, index):
            return images[index]

    with pytest.warns(SkippedImageWarning, match=r"'#1'.*shape \(2, 8, 9\) differs"):
        mined = mine(integer_model(), Listed(), k=2, progress=False)
    assert mined.manifest["images_skipped"] == 1 and mined.manifest["images_seen"] == 2


def test_no_readable_image_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"garbage")
    (tmp_path / "b.PNG").write_bytes(b"more garbage")
    with pytest.raises(ValueError, match=r"none of the 2 images .* 'a.jpg'"):
        mine(integer_model(), ImageFolderDataset(tmp_path), progress=False)


# ----------------------------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path):
    mined = mine(integer_model(), SyntheticImages(11), k=3, progress=False)
    assert mined.save(tmp_path / "out") == tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "names.json", "topk.npz"]
    loaded = load_mining(tmp_path / "out")
    assert_same_result(loaded, mined)
    assert loaded.manifest == mined.manifest
    with np.load(tmp_path / "out" / "topk.npz", allow_pickle=False) as arrays:  # another tool's view
        assert sorted(arrays.files) == sorted(
            f"{layer}.{f}" for layer in LAYERS for f in ("images", "positions", "values")
        )
        assert arrays["0.values"].dtype == np.float32 and arrays["0.positions"].shape == (5, 3, 2)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == FORMAT_VERSION and manifest["layers"] == LAYERS and manifest["k"] == 3


def test_load_refuses_a_future_format(tmp_path):
    mine(integer_model(), SyntheticImages(5), k=2, progress=False).save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format"] = FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"format version {FORMAT_VERSION + 1}.*newer zfkernels"):
        load_mining(tmp_path)


def test_output_directory_of_another_run_is_refused(tmp_path):
    model, data = integer_model(), SyntheticImages(6)
    mine(model, data, k=2, progress=False).save(tmp_path)
    same = mining_identity(model, data, k=2)
    assert prepare_output(tmp_path, same, resume=False, overwrite=False) == tmp_path
    other = mining_identity(model, data, k=3)
    with pytest.raises(ValueError, match=r"different run.*k \(2 -> 3\).*overwrite=True"):
        prepare_output(tmp_path, other, resume=False, overwrite=False)
    with pytest.raises(ValueError, match=r"cannot resume it.*k \(2 -> 3\)"):
        prepare_output(tmp_path, other, resume=True, overwrite=False)
    reseeded = mining_identity(integer_model(seed=1), data, k=2)
    with pytest.raises(ValueError, match="the model weights"):
        prepare_output(tmp_path, reseeded, resume=False, overwrite=False)
    assert prepare_output(tmp_path, other, resume=False, overwrite=True) == tmp_path
    with pytest.raises(ValueError, match="different run"):
        mine(model, data, k=3, progress=False).save(tmp_path)  # save makes the same check
    mine(model, data, k=3, progress=False).save(tmp_path, overwrite=True)
    assert load_mining(tmp_path).k == 3


# ------------------------------------------------------------------------------------------ checkpoints
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    model = integer_model()
    reference = mine(model, SyntheticImages(30), k=K, batch_size=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        mine(
            model,
            SyntheticImages(30, interrupt_at=13),
            k=K,
            batch_size=4,
            checkpoint_dir=tmp_path,
            checkpoint_every=1000,
            progress=False,
        )
    with np.load(checkpoint_path(tmp_path), allow_pickle=False) as arrays:
        state = json.loads(arrays["state.json"].tobytes())
    assert state["done"] == 12  # the three whole batches before item 13, kept although no checkpoint was due
    with pytest.raises(ValueError, match=r"holds a checkpoint .*12 of 30 .*resume=True"):
        mine(model, SyntheticImages(30), k=K, batch_size=4, checkpoint_dir=tmp_path, progress=False)
    resumed = mine(
        model, SyntheticImages(30), k=K, batch_size=4, checkpoint_dir=tmp_path, resume=True, progress=False
    )
    assert_same_result(resumed, reference)
    assert resumed.manifest["run"]["resumed"] is True
    with pytest.raises(ValueError, match=r"different run: k \(4 -> 3\)"):
        mine(model, SyntheticImages(30), k=3, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"different run: the layers \(\['0', '3'\] -> \['0'\]\)"):
        mine(
            model,
            SyntheticImages(30),
            layers=["0"],
            k=K,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )
    with pytest.raises(ValueError, match="the dataset length"):
        mine(model, SyntheticImages(31), k=K, checkpoint_dir=tmp_path, resume=True, progress=False)
    fresh = mine(model, SyntheticImages(30), k=K, checkpoint_dir=tmp_path, overwrite=True, progress=False)
    assert_same_result(fresh, reference)


def _run_worker(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    environment.update(env or {})
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _finish(process: subprocess.Popen, timeout: float = 120) -> dict:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"worker timed out; stderr:\n{err}") from None
    assert process.returncode == 0, f"worker failed ({process.returncode}); stderr:\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def test_killed_process_resumes_to_the_uninterrupted_result(tmp_path):
    length, checkpoints = 48, tmp_path / "checkpoints"
    model = integer_model()
    reference = mine(model, SyntheticImages(length), k=K, batch_size=4, progress=False)
    checkpoint = checkpoint_path(checkpoints)
    first = _run_worker(
        "--out",
        str(tmp_path / "unused"),
        "--checkpoint-dir",
        str(checkpoints),
        "--checkpoint-every",
        "8",
        "--delay",
        "0.05",
        "--length",
        str(length),
    )
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists():
            assert first.poll() is None, f"worker ended before its first checkpoint: {first.communicate()[1]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    assert not (tmp_path / "unused").exists()
    with np.load(checkpoint, allow_pickle=False) as arrays:
        done = json.loads(arrays["state.json"].tobytes())["done"]
    assert 8 <= done < length, f"the kill came too late to test anything ({done} of {length} done)"

    second = _run_worker(
        "--out",
        str(tmp_path / "out"),
        "--checkpoint-dir",
        str(checkpoints),
        "--resume",
        "--checkpoint-every",
        "8",
        "--length",
        str(length),
    )
    report = _finish(second)
    resumed = load_mining(tmp_path / "out")
    assert report["digest"] == tables_digest(reference)
    assert_same_result(resumed, reference)
    assert resumed.manifest["run"]["resumed"] is True

    with pytest.raises(ValueError, match=r"cannot resume .*the model weights \(sha256"):
        mine(
            integer_model(seed=1),
            SyntheticImages(length),
            k=K,
            checkpoint_dir=checkpoints,
            resume=True,
            progress=False,
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_equal_one(tmp_path):
    length = 23  # odd: the shards differ in length
    reference = mine(integer_model(), SyntheticImages(length), k=K, batch_size=4, progress=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    args = (
        "--out",
        str(tmp_path / "out"),
        "--checkpoint-dir",
        str(tmp_path / "checkpoints"),
        "--length",
        str(length),
        "--batch-size",
        "3",
    )
    processes = [_run_worker(*args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        reports = sorted((_finish(p, timeout=150) for p in processes), key=lambda report: report["rank"])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert reports[0]["saved"] == str(tmp_path / "out") and reports[1]["saved"] is None
    assert reports[0]["digest"] == reports[1]["digest"] == tables_digest(reference)  # merged on every rank
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "names.json", "topk.npz"]
    merged = load_mining(tmp_path / "out")
    assert_same_result(merged, reference)
    assert merged.manifest["run"]["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "mining-rank0-of-2.npz",
        "mining-rank1-of-2.npz",
    ]
    with pytest.raises(ValueError, match=r"world size changed \(now 1\)"):
        mine(
            integer_model(),
            SyntheticImages(length),
            k=K,
            checkpoint_dir=tmp_path / "checkpoints",
            resume=True,
            progress=False,
        )


def test_warnings_do_not_leak_from_a_clean_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mine(integer_model(), SyntheticImages(9), k=2, progress=False)
