"""zfkernels.analysis.results and .gallery: the projected result's files, Fig. 2 PNGs and the HTML gallery.

Everything is drawn from synthetic results (random tensors, fixed seeds). The browser test opens the
gallery from file:// in headless Chromium and is skipped, saying why, when no browser is installed.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zfkernels.analysis import (
    PROJECTIONS_FORMAT,
    LayerProjections,
    ProjectedMining,
    figure2_blocks,
    load_projections,
    render_figure2,
    render_gallery,
)
from zfkernels.analysis.gallery import FIGURE_MAX_WIDTH, NAME_LIMIT, figure2_layout, gallery_sprites
from zfkernels.deconvnet.grid import show_projection

XSS_NAMES = {
    3: "<img src=x onerror=window.__xss=1>.png",
    4: "<img src=x onerror=alert(1)>.png",
    5: "$x^2$ \\frac{ & $ <b>bold</b>.jpg",  # mathtext and markup in a figure caption are text
}
SCRIPT = "<script>window.__xss=2</script>"
FIELDS = ("values", "images", "positions", "pixels", "patches", "boxes", "origins")


def make_layer(
    name: str,
    filters: int,
    k: int,
    window: tuple[int, int],
    *,
    channels: int = 3,
    dtype: torch.dtype = torch.float16,
    empty: int = 0,
    seed: int = 0,
    images: int = 40,
) -> LayerProjections:
    """A random layer; the last `empty` slots of every filter are empty (-inf, -1), as mining leaves them."""
    generator = torch.Generator().manual_seed(seed)
    height, width = window
    values = torch.rand(filters, k, generator=generator).sort(dim=1, descending=True).values
    indices = torch.randint(0, images, (filters, k), generator=generator)
    if empty:
        values[:, k - empty :] = float("-inf")
        indices[:, k - empty :] = -1
    return LayerProjections(
        layer=name,
        path="deconvnet",
        values=values,
        images=indices,
        positions=torch.randint(0, 13, (filters, k, 2), generator=generator),
        pixels=torch.randn(filters, k, channels, height, width, generator=generator).to(dtype),
        patches=torch.randint(
            0, 256, (filters, k, channels, height, width), generator=generator, dtype=torch.uint8
        ),
        boxes=torch.randint(0, 224, (filters, k, 4), generator=generator),
        origins=torch.randint(-20, 224, (filters, k, 2), generator=generator),
    )


def make_result(*, hostile: bool = True) -> ProjectedMining:
    """Two layers (the second with gray images, float32 pixels and non-square windows; the first with empty
    slots). `hostile`: image names, a layer name and a manifest field with markup in them."""
    second = SCRIPT if hostile else "features.10"
    layers = {
        "features.0": make_layer("features.0", 20, 9, (7, 7), empty=2, seed=1),
        second: make_layer(second, 6, 5, (40, 30), channels=1, dtype=torch.float32, seed=2),
    }
    names = {i: f"train/n0144{i:04d}/ILSVRC2012_val_{i:08d}.JPEG" for i in range(40)}
    manifest = {"model": {"class": "ZFNet", "weights_sha256": "ab" * 32}, "k": 9, "images_seen": 40}
    if hostile:
        names.update(XSS_NAMES)
        manifest["dataset"] = {"root": "/data/<script>window.__xss=3</script>", "length": 40}
    return ProjectedMining(layers, names, manifest)


# ------------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("channels", [1, 3])
def test_save_load_round_trip_bit_for_bit(tmp_path, dtype, channels):
    layers = {
        "conv1": make_layer("conv1", 5, 9, (7, 7), channels=channels, dtype=dtype, empty=3, seed=3),
        "conv2": make_layer("conv2", 4, 9, (11, 9), channels=channels, dtype=dtype, seed=4),
    }
    layers["conv1"].pixels[0, 0, 0, 0, 0] = -0.0  # a signed zero survives
    result = ProjectedMining(layers, {0: "a/ü.png", 17: "b.jpg"}, {"model": {"class": "ZFNet"}, "k": 9})
    directory = result.save(tmp_path)
    assert directory == tmp_path / "projections"
    loaded = load_projections(tmp_path)
    assert list(loaded.layers) == ["conv1", "conv2"]  # forward order kept
    assert loaded.names == result.names and loaded.manifest == result.manifest
    for name, layer in layers.items():
        again = loaded.layers[name]
        assert again.path == layer.path
        for field in FIELDS:
            original, copy = getattr(layer, field), getattr(again, field)
            assert copy.dtype == original.dtype and copy.shape == original.shape, field
            assert original.numpy().tobytes() == copy.numpy().tobytes(), f"{field} differs after save/load"


def test_files_are_plain_npz_and_json(tmp_path):
    make_result().save(tmp_path)
    directory = tmp_path / "projections"
    assert sorted(p.name for p in directory.iterdir()) == ["0.npz", "1.npz", "index.json"]  # no temp files
    index = json.loads((directory / "index.json").read_text("utf-8"))
    assert index["format"] == PROJECTIONS_FORMAT
    assert [entry["file"] for entry in index["layers"]] == ["0.npz", "1.npz"]  # never the layer's name
    for file in ("0.npz", "1.npz"):
        with np.load(directory / file, allow_pickle=False) as arrays:
            assert sorted(arrays.files) == sorted(FIELDS)
            assert all(arrays[key].dtype != object for key in arrays.files)
            assert arrays["patches"].dtype == np.uint8


@pytest.mark.parametrize(
    ("field", "bad", "error"),
    [
        ("values", torch.zeros(5, 9, 1), ValueError),
        ("values", torch.zeros(5, 9, dtype=torch.float64), TypeError),
        ("images", torch.zeros(5, 8, dtype=torch.int64), ValueError),
        ("positions", torch.zeros(5, 9, 3, dtype=torch.int64), ValueError),
        ("pixels", torch.zeros(5, 9, 2, 7, 7, dtype=torch.float16), ValueError),
        ("patches", torch.zeros(5, 9, 3, 7, 6, dtype=torch.uint8), ValueError),
        ("patches", torch.zeros(5, 9, 3, 7, 7), TypeError),
        ("pixels", torch.zeros(5, 9, 3, 7, 7, dtype=torch.float64), TypeError),
        ("boxes", torch.zeros(5, 9, 4, dtype=torch.int32), TypeError),
        ("origins", np.zeros((5, 9, 2), dtype=np.int64), TypeError),
    ],
)
def test_bad_shapes_and_dtypes_name_the_field(field, bad, error):
    good = make_layer("conv1", 5, 9, (7, 7))
    arguments = {name: getattr(good, name) for name in FIELDS}
    arguments[field] = bad
    with pytest.raises(error, match=field):
        LayerProjections(layer="conv1", path="deconvnet", **arguments)


def test_bad_path_and_layer_keys():
    good = make_layer("conv1", 2, 4, (5, 5))
    arguments = {name: getattr(good, name) for name in FIELDS}
    with pytest.raises(ValueError, match="path must be one of"):
        LayerProjections(layer="conv1", path="guided", **arguments)
    with pytest.raises(ValueError, match="the key must be its name"):
        ProjectedMining({"conv2": good}, {}, {})
    with pytest.raises(ValueError, match="'nope' is not in the result; it has 'conv1'"):
        ProjectedMining({"conv1": good}, {}, {}).layer("nope")


def test_load_refuses_other_formats_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no projections"):
        load_projections(tmp_path)
    make_result().save(tmp_path)
    index_path = tmp_path / "projections" / "index.json"
    index = json.loads(index_path.read_text("utf-8"))
    index_path.write_text(json.dumps({**index, "format": PROJECTIONS_FORMAT + 1}))
    with pytest.raises(ValueError, match=f"format version {PROJECTIONS_FORMAT + 1}.*newer zfkernels"):
        load_projections(tmp_path)
    index_path.write_text(json.dumps({**index, "kind": "zfkernels.mining"}))
    with pytest.raises(ValueError, match="not a zfkernels.projections index"):
        load_projections(tmp_path)
    index_path.write_text(json.dumps(index))
    with np.load(tmp_path / "projections" / "0.npz", allow_pickle=False) as arrays:
        tampered = {key: arrays[key] for key in arrays.files}
    tampered["boxes"] = tampered["boxes"][:, :, :3]
    np.savez(tmp_path / "projections" / "0.npz", **tampered)
    with pytest.raises(ValueError, match=r"0\.npz.*boxes must have shape"):
        load_projections(tmp_path)
    (tmp_path / "projections" / "0.npz").unlink()
    with pytest.raises(ValueError, match=r"0\.npz.*missing"):
        load_projections(tmp_path)


# ---------------------------------------------------------------------------------------------- Fig. 2
def test_blocks_place_every_rank_and_leave_empty_slots_white():
    layer = make_layer("conv1", 3, 5, (6, 4), empty=1, seed=5)
    projections, patches = figure2_blocks(layer, 2)
    assert projections.shape == patches.shape == (3, 3 * 6 + 2 * 2, 3 * 4 + 2 * 2)  # 3x3 grid, 2 px gaps
    shown = (show_projection(layer.pixels[2].float()) * 255).round() / 255
    for rank in range(5):
        row, column = divmod(rank, 3)
        window = (slice(None), slice(row * 8, row * 8 + 6), slice(column * 6, column * 6 + 4))
        if rank == 4:  # empty slot
            assert (projections[window] == 1).all() and (patches[window] == 1).all()
        else:
            assert torch.equal(projections[window], shown[rank])
            assert torch.equal(patches[window], layer.patches[2, rank].float() / 255)
    assert (projections[:, 16:, :] == 1).all()  # ranks 5..8 do not exist: white


def test_figure_is_deterministic_and_fits_a_screen(tmp_path):
    result = make_result()
    first = render_figure2(result, "features.0", tmp_path / "a.png")
    result.save(tmp_path)
    second = render_figure2(load_projections(tmp_path), "features.0", tmp_path / "b.png")
    assert first.read_bytes() == second.read_bytes()
    with Image.open(first) as image:
        assert image.width <= FIGURE_MAX_WIDTH and image.height <= 1400, image.size
        assert not {"Software", "Creation Time", "date:create"} & set(image.info)
    many = make_layer("wide", 16, 100, (30, 30), seed=6)  # 10x10 blocks: tiles shrink to fit the width
    path = render_figure2(
        ProjectedMining({"wide": many}, {}, {}), "wide", tmp_path / "wide.png", filters=[0, 1]
    )
    with Image.open(path) as image:
        assert image.width <= FIGURE_MAX_WIDTH, image.size


@pytest.mark.parametrize("layer", ["features.0", SCRIPT])
def test_figure_blocks_are_where_the_layout_says(tmp_path, layer):
    result = make_result()
    filters = [3, 0, 5]
    layout = figure2_layout(result, layer, filters=filters)
    path = render_figure2(result, layer, tmp_path / "fig.png", filters=filters)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == layout.pixels.shape
    block_h, block_w = layout.block
    from zfkernels.analysis.gallery import BLOCK_GAP

    blocks = {}
    for f in filters:
        projections, patches = figure2_blocks(result.layers[layer], f, tile=layout.tile)
        assert projections.shape[1:] == (block_h, block_w)
        blocks[f] = [
            (b * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for b in (projections, patches)
        ]
        top, left = layout.blocks[f]
        drawn_projections = pixels[top : top + block_h, left : left + block_w]
        patch_left = left + block_w + BLOCK_GAP
        drawn_patches = pixels[top : top + block_h, patch_left : patch_left + block_w]
        np.testing.assert_array_equal(drawn_projections, blocks[f][0], err_msg=f"filter {f}'s projections")
        np.testing.assert_array_equal(drawn_patches, blocks[f][1], err_msg=f"filter {f}'s patches")
    assert not np.array_equal(blocks[3][0], blocks[0][0])  # the check can tell filters apart
    # layout order: the first chosen filter first, on one row, left to right
    assert layout.blocks[3][0] == layout.blocks[0][0] and layout.blocks[3][1] < layout.blocks[0][1]


def test_figure_errors_name_the_argument(tmp_path):
    result = make_result(hostile=False)
    with pytest.raises(ValueError, match="'conv9' is not in the result; it has 'features.0', 'features.10'"):
        render_figure2(result, "conv9", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"filters must be in 0\.\.19 for layer 'features.0', got 20"):
        render_figure2(result, "features.0", tmp_path / "x.png", filters=[0, 20])
    with pytest.raises(ValueError, match="filters must name at least one filter"):
        render_figure2(result, "features.0", tmp_path / "x.png", filters=[])
    with pytest.raises(TypeError, match="filters must be an int"):
        render_figure2(result, "features.0", tmp_path / "x.png", filters=[1.5])
    with pytest.raises(ValueError, match="tile must be a positive int"):
        render_figure2(result, "features.0", tmp_path / "x.png", tile=0)
    with pytest.raises(ValueError, match=r"filter_index must be in 0\.\.5"):
        figure2_blocks(result.layers["features.10"], 6)
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------- gallery
class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "a":
            self.links.append(attributes["href"])
        if tag == "img":
            self.images.append(attributes)


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text("utf-8"))
    return parser


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    result = make_result()
    return result, render_gallery(result, tmp_path_factory.mktemp("gallery"))


def test_gallery_pages_and_files_exist(gallery):
    result, index = gallery
    root = index.parent
    assert index.name == "index.html"
    pages = _parse(index).links
    assert pages == ["layer-0.html", "figure2-0.png", "layer-1.html", "figure2-1.png"]
    for page in pages:
        assert (root / page).is_file(), page
    for number, layer in enumerate(result.layers.values()):
        parsed = _parse(root / f"layer-{number}.html")
        assert all((root / link).is_file() for link in parsed.links)
        assert [image["src"] for image in parsed.images] == [
            f"layer-{number}/{f}.png" for f in range(layer.filters)
        ]
        for image in parsed.images:
            assert image["loading"] == "lazy"
            with Image.open(root / image["src"]) as sprite:
                assert sprite.size == (int(image["width"]), int(image["height"]))
                assert sprite.height <= 3 * 48 + 2 * 2


def test_gallery_escapes_user_strings(gallery):
    _, index = gallery
    pages = [index, *sorted(index.parent.glob("layer-*.html"))]
    text = "".join(page.read_text("utf-8") for page in pages)
    assert "<img src=x" not in text and "<script" not in text and "<b>" not in text
    assert "&lt;img src=x onerror=window.__xss=1&gt;.png" in text
    assert html.escape(SCRIPT) in index.read_text("utf-8")
    assert "/data/&lt;script&gt;window.__xss=3&lt;/script&gt;" in index.read_text("utf-8")


def test_gallery_of_1024_filters_is_fast_and_bounded(tmp_path):
    layer = make_layer("features.10", 1024, 9, (16, 16), empty=1, seed=7, images=200)
    names = {i: f"deep/{'x' * 3000}/{i}.png" for i in range(200)}  # long names: tooltips are cut
    result = ProjectedMining({"features.10": layer}, names, {"model": "AlexNet"})
    start = time.perf_counter()
    index = render_gallery(result, tmp_path, figure_layers=())
    seconds = time.perf_counter() - start
    print(f"1,024 filters x 9: gallery in {seconds:.2f} s")
    assert seconds < 40, f"rendering 1,024 filters took {seconds:.1f} s"
    page = (index.parent / "layer-0.html").read_text("utf-8")
    assert page.count('<section class="f"') == 1024
    assert len(page.encode()) <= 1024 * (9 * (NAME_LIMIT + 160) + 500), len(page.encode())
    assert len(list((tmp_path / "layer-0").iterdir())) == 1024
    assert not (tmp_path / "figure2-0.png").exists()
    first = next(gallery_sprites(layer))[1]
    with Image.open(tmp_path / "layer-0" / "0.png") as sprite:
        np.testing.assert_array_equal(np.asarray(sprite), first)


def test_gallery_arguments(tmp_path):
    result = make_result(hostile=False)
    with pytest.raises(ValueError, match="'conv9' is not in the result"):
        render_gallery(result, tmp_path, figure_layers=["conv9"])
    with pytest.raises(TypeError, match="figure_layers must be an iterable of layer names"):
        render_gallery(result, tmp_path, figure_layers="features.0")
    with pytest.raises(TypeError, match="projected must be a ProjectedMining"):
        render_gallery(result.layers, tmp_path)


# --------------------------------------------------------------------------------------------- browser
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((found for name in BROWSERS if (found := shutil.which(name))), None)
# Appended to a test copy of a page: after load, what the page shows, whether each image decoded, whether
# any injected handler ran, and how many scripts exist (this one only, if nothing was injected).
CHECKER = """<script>
window.addEventListener("load", function () {
  var report = {
    h1: document.querySelector("h1").textContent,
    sections: document.querySelectorAll("section.f").length,
    rows: Array.prototype.map.call(document.querySelectorAll("tbody tr td:first-child"),
                                   function (cell) { return cell.textContent; }),
    images: Array.prototype.map.call(document.images, function (image) {
      return image.getAttribute("src") + "=" + (image.complete && image.naturalWidth > 0 ? 1 : 0);
    }),
    titles: Array.prototype.map.call(document.querySelectorAll("li[title]"),
                                     function (item) { return item.title; }),
    scripts: document.scripts.length,
    xss: window.__xss === undefined ? 0 : window.__xss
  };
  var out = document.createElement("pre");
  out.id = "zfk-check";
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
});
</script>
"""


def _browse(page: Path, profile: Path) -> str:
    command = [
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _check(page: Path, profile: Path) -> dict:
    """Open a copy of `page` (images eager, the checker appended) and return the checker's report."""
    copy = page.with_name(f"check-{page.name}")
    source = page.read_text("utf-8").replace('loading="lazy"', 'loading="eager"')
    copy.write_text(source.replace("</body>", CHECKER + "</body>"), "utf-8")
    dom = _browse(copy, profile)
    found = re.search(r'<pre id="zfk-check">(.*?)</pre>', dom, re.S)
    assert found, f"the checker did not run in {copy.name}: {dom[-1000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(BROWSER is None, reason=f"no headless browser found (looked for {', '.join(BROWSERS)})")
def test_gallery_in_headless_chromium(gallery, tmp_path):
    result, index = gallery
    report = _check(index, tmp_path / "profile")
    assert report["h1"] == "Deconvnet projections"
    assert report["rows"] == list(result.layers)  # the <script> layer name is text
    assert report["scripts"] == 1 and report["xss"] == 0
    assert all(status.endswith("=1") for status in report["images"])
    for number, layer in enumerate(result.layers.values()):
        report = _check(index.parent / f"layer-{number}.html", tmp_path / "profile")
        assert report["h1"] == f"Layer {layer.layer}"
        assert report["sections"] == layer.filters
        assert report["images"] == [f"layer-{number}/{f}.png=1" for f in range(layer.filters)], report[
            "images"
        ]
        assert report["scripts"] == 1 and report["xss"] == 0
        if number == 0:  # its images include the hostile names: shown as text, nothing injected
            for name in XSS_NAMES.values():
                assert any(title.endswith(name) for title in report["titles"]), name
    # the page as shipped (lazy images, no script) renders its filters without JavaScript
    dom = _browse(index.parent / "layer-0.html", tmp_path / "profile")
    assert dom.count('<section class="f"') == result.layers["features.0"].filters
    assert "&lt;img src=x onerror=window.__xss=1&gt;.png" in dom
