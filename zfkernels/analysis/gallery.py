"""Drawing a projected mining result: the paper's Fig. 2 as PNGs, and a static HTML gallery.

Compute is separate from drawing: `figure2_blocks`, `figure2_layout` and `gallery_sprites` return tensors
and arrays; `render_figure2` and `render_gallery` only draw and write them. Display conventions (those of
:mod:`zfkernels.deconvnet.grid`): each projection on its own scale around mid-gray (zero is gray), each
patch as the image shows it; empty slots (fewer than k images) white.

Figures are deterministic: fixed DPI, the mosaics pasted pixel for pixel (`figimage`, no resampling) and
no timestamp or version in the PNG, so equal results give byte-equal files. The gallery opens from the file
system (no server, no script): an index of layers, and per layer every filter's k projections and k patches
as one small sprite PNG, lazily loaded with explicit size, so a layer of 1,000+ filters stays responsive.
Every string from user data (image names, layer names, manifest fields) is HTML-escaped (and drawn with
mathtext off in figures), and file names are indices, never user data.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..deconvnet.grid import show_projection
from .results import LayerProjections, ProjectedMining

__all__ = [
    "Figure2Layout",
    "figure2_blocks",
    "figure2_layout",
    "gallery_sprites",
    "render_figure2",
    "render_gallery",
]

FIGURE_DPI = 100
FIGURE_FILTERS = 16  # the default filters of a Fig. 2 PNG: the layer's first 16
FIGURE_MAX_WIDTH = 1900  # pixels: a Fig. 2 PNG fits a screen's width
FIGURE_TILE = 64  # pixels per window in a Fig. 2 PNG (smaller where k is large, to fit the width)
GAP = 2  # pixels between the tiles of a mosaic
BLOCK_GAP = 6  # pixels between a filter's projection block and its patch block
WHITE = 255  # empty slots and gaps
THUMBNAIL = 48  # pixels per tile in the gallery's sprites
CHUNK_ELEMENTS = 1 << 23  # window elements per vectorized step when drawing sprites (bounds the copies)
NAME_LIMIT = 240  # characters of an image name kept in the gallery's tooltips (bounded HTML per filter)

# Fig. 2 page geometry, in pixels
_MARGIN, _HEADER, _TITLE, _CAPTION, _CELL_GAP = 12, 30, 16, 11, 16


# ------------------------------------------------------------------------------------------------ compute
def _side(k: int) -> int:
    return math.ceil(math.sqrt(k))


def _tile_shape(window: tuple[int, int], tile: int | None) -> tuple[int, int]:
    """A window's drawn size: shrunk to fit `tile` keeping its aspect, or grown by a whole factor up to it."""
    height, width = window
    if tile is None:
        return height, width
    longest = max(height, width)
    if longest > tile:
        return max(1, round(height * tile / longest)), max(1, round(width * tile / longest))
    factor = tile // longest
    return height * factor, width * factor


def _shrink(tiles: Tensor, shape: tuple[int, int]) -> Tensor:
    """(N, ch, h, w) to (N, ch, *shape): projections (float) by area means, patches (uint8) by torch's
    antialiased bilinear filter (its fast 8-bit path: a third of the time of area means on floats)."""
    if tiles.dtype == torch.uint8:
        return torch.nn.functional.interpolate(tiles, size=shape, mode="bilinear", antialias=True)
    return torch.nn.functional.adaptive_avg_pool2d(tiles, shape)


def _grow(tiles: np.ndarray, factor: int) -> np.ndarray:
    """(N, h, w, ch) repeated `factor` times along h and w (crisp pixels; np.repeat: 2x faster than a
    broadcast copy and 8x faster than torch's nearest upsampling of uint8 here)."""
    if factor == 1:
        return tiles
    return np.repeat(np.repeat(tiles, factor, axis=1), factor, axis=2)


def _display_tiles(
    layer: LayerProjections, filters: Tensor | slice, tile: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projections and patches of `filters` (indices, or a slice: no copy) as uint8 display tiles
    (n, k, th, tw, ch), channels last, and the (n, k) empty mask.

    A window larger than `tile` is shrunk first and each projection then put on its own scale around gray
    (`show_projection` of the tile as drawn: the float copy stays tile-sized); a smaller one is put on its
    scale, then repeated by a whole factor. The 8-bit work is numpy's: torch's small uint8 ops stall on a
    busy 2-core machine (see ARCHITECTURE, mining) and took 3x longer here."""
    pick = (lambda t: t[filters]) if isinstance(filters, slice) else (lambda t: t.index_select(0, filters))
    pixels, patches = pick(layer.pixels), pick(layer.patches)
    count, k, channels, height, width = pixels.shape
    shape = _tile_shape((height, width), tile)
    pixels = pixels.reshape(count * k, channels, height, width)
    patches = patches.reshape(pixels.shape)
    if shape[0] < height or shape[1] < width:
        pixels, patches = _shrink(pixels, shape), _shrink(patches, shape)
    projections = (show_projection(pixels.float()) * 255).round_().to(torch.uint8)
    factor = shape[0] // pixels.shape[-2]
    tiles = [
        _grow(images.permute(0, 2, 3, 1).numpy(), factor).reshape(count, k, *shape, channels)
        for images in (projections, patches)
    ]
    return tiles[0], tiles[1], (pick(layer.images) < 0).numpy()


def _mosaic_size(k: int, height: int, width: int) -> tuple[int, int]:
    side = _side(k)
    return side * (height + GAP) - GAP, side * (width + GAP) - GAP


def _mosaics_into(out: np.ndarray, tiles: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """Paste (n, k, th, tw, ch) uint8 tiles into `out`, n white (n, H, W, 3) mosaics (views allowed): rank
    order row by row, ceil(sqrt(k)) per row, GAP pixels between tiles, empty slots left white, one channel
    drawn gray. One pass over the pixels (a slice per rank, no reshuffled copy)."""
    k, height, width = tiles.shape[1:4]
    side = _side(k)
    for rank in range(k):
        row, column = divmod(rank, side)
        top, left = row * (height + GAP), column * (width + GAP)
        out[:, top : top + height, left : left + width] = tiles[:, rank]
        if empty[:, rank].any():
            out[empty[:, rank], top : top + height, left : left + width] = WHITE
    return out


def _mosaics(tiles: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """(n, k, th, tw, ch) uint8 tiles to n square (n, H, W, 3) mosaics drawn by :func:`_mosaics_into`."""
    count, k, height, width = tiles.shape[:4]
    out = np.full((count, *_mosaic_size(k, height, width), 3), WHITE, np.uint8)
    return _mosaics_into(out, tiles, empty)


def _check_filter(layer: LayerProjections, filter_index: object, argument: str) -> int:
    if isinstance(filter_index, bool) or not isinstance(filter_index, (int, np.integer)):
        raise TypeError(f"{argument} must be an int, got {type(filter_index).__name__}")
    if not 0 <= filter_index < layer.filters:
        raise ValueError(
            f"{argument} must be in 0..{layer.filters - 1} for layer {layer.layer!r}, got {int(filter_index)}"
        )
    return int(filter_index)


def figure2_blocks(
    layer: LayerProjections, filter_index: int, *, tile: int | None = None
) -> tuple[Tensor, Tensor]:
    """The two square mosaics of Fig. 2 for one filter, each (3, H, W) float32 in [0, 1] on 8-bit steps
    (what the PNG holds): its k projections (each on its own scale around gray) and the k image patches
    under them, in rank order, row by row, ceil(sqrt(k)) per row, GAP white pixels between tiles, empty
    slots white. `tile` draws every window within tile x tile pixels (shrunk, or grown by a whole factor;
    default: the window's own size)."""
    if not isinstance(layer, LayerProjections):
        raise TypeError(f"layer must be a LayerProjections, got {type(layer).__name__}")
    index = torch.tensor([_check_filter(layer, filter_index, "filter_index")])
    *tiles, empty = _display_tiles(layer, index, tile)
    return tuple(torch.from_numpy(_mosaics(t, empty)[0].copy()).permute(2, 0, 1).float() / 255 for t in tiles)


@dataclass
class Figure2Layout:
    """A Fig. 2 page, computed: the pixels of every mosaic on a white page, and the texts to draw on it.

    Coordinates are pixels from the page's top-left. Filter f's projection block is at `blocks[f]`
    (top, left), `block` (height, width) in size; its patch block starts `block[1] + BLOCK_GAP` to the right.
    Both are ``figure2_blocks(layer, f, tile=tile)`` on 8-bit steps.
    """

    pixels: np.ndarray  # (H, W, 3) uint8
    blocks: dict[int, tuple[int, int]]
    block: tuple[int, int]
    texts: list[tuple[int, int, str, float]]  # (x, y of the top-left, text (lines CAPTION px apart), points)
    tile: int  # the tile size the windows were drawn within (smaller than asked where k is large)


def figure2_layout(
    projected: ProjectedMining,
    layer: str,
    *,
    filters: Sequence[int] | None = None,
    tile: int = FIGURE_TILE,
    columns: int = 4,
) -> Figure2Layout:
    """Lay out the paper's Fig. 2 for `layer`: per filter (default: the first 16) a block of its k
    projections beside the block of its k image patches, titled with layer and filter, with each entry's
    value and (shortened) source image name in a grid under the blocks that mirrors the tiles. At most
    `columns` filters per row, fewer (and smaller tiles) where the page would pass FIGURE_MAX_WIDTH."""
    if not isinstance(projected, ProjectedMining):
        raise TypeError(f"projected must be a ProjectedMining, got {type(projected).__name__}")
    data = projected.layer(layer)
    if filters is None:
        chosen = list(range(min(FIGURE_FILTERS, data.filters)))
    else:
        if isinstance(filters, (str, bytes)) or not isinstance(filters, Iterable):
            raise TypeError(f"filters must be a sequence of ints, got {type(filters).__name__}")
        chosen = [_check_filter(data, f, "filters") for f in filters]
        if not chosen:
            raise ValueError("filters must name at least one filter")
    for name, number in (("tile", tile), ("columns", columns)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{name} must be a positive int, got {number!r}")
    side = _side(data.k)
    # the largest tile for which one filter's cell fits the page
    fit = (FIGURE_MAX_WIDTH - 2 * _MARGIN - _CELL_GAP - BLOCK_GAP - 2 * (side - 1) * GAP) // (2 * side)
    tile = max(4, min(tile, fit))
    projections, patches, empty = _display_tiles(data, torch.tensor(chosen), tile)
    projection_blocks, patch_blocks = _mosaics(projections, empty), _mosaics(patches, empty)
    block_h, block_w = projection_blocks.shape[1:3]
    cell_w = 2 * block_w + BLOCK_GAP + _CELL_GAP
    cell_h = _TITLE + block_h + 4 + side * _CAPTION + _CELL_GAP
    columns = max(1, min(columns, len(chosen), (FIGURE_MAX_WIDTH - 2 * _MARGIN) // cell_w))
    rows = math.ceil(len(chosen) / columns)
    width, height = 2 * _MARGIN + columns * cell_w - _CELL_GAP, _HEADER + rows * cell_h
    page = np.full((height, width, 3), WHITE, np.uint8)
    texts = [
        (
            _MARGIN,
            8,
            f"{layer}: the {data.k} strongest activations per filter, {data.path} projection (left) "
            f"and the image patch it sees (right)",
            9.0,
        )
    ]
    caption_w = (2 * block_w + BLOCK_GAP) // side
    images, values = data.images.tolist(), data.values.tolist()
    # ~4.6 pixels per character at 6 points and 100 DPI
    name_limit = max(4, int(caption_w / 4.6) - 7)
    blocks: dict[int, tuple[int, int]] = {}
    for slot, filter_index in enumerate(chosen):
        row, column = divmod(slot, columns)
        left, top = _MARGIN + column * cell_w, _HEADER + row * cell_h + _TITLE
        page[top : top + block_h, left : left + block_w] = projection_blocks[slot]
        patch_left = left + block_w + BLOCK_GAP
        page[top : top + block_h, patch_left : patch_left + block_w] = patch_blocks[slot]
        blocks.setdefault(filter_index, (top, left))
        texts.append((left, top - _TITLE + 2, f"{layer} · filter {filter_index}", 8.0))
        # one multi-line text per caption column (a text object costs ~10 ms to draw: k of them per filter
        # made a 16-filter, k=100 figure take 20 s)
        lines: list[list[str]] = [[] for _ in range(side)]
        for rank, (image, value) in enumerate(zip(images[filter_index], values[filter_index], strict=True)):
            text = "" if image < 0 else f"{_value(value)} {_short(projected.name(image), name_limit)}"
            lines[rank % side].append(text)
        for column, column_lines in enumerate(lines):
            if any(column_lines):
                texts.append((left + column * caption_w, top + block_h + 4, "\n".join(column_lines), 6.0))
    return Figure2Layout(page, blocks, (block_h, block_w), texts, tile)


def gallery_sprites(layer: LayerProjections, *, tile: int = THUMBNAIL) -> Iterator[tuple[int, np.ndarray]]:
    """Every filter's gallery thumbnail, (filter, (H, W, 3) uint8): its projection mosaic, BLOCK_GAP white
    pixels, its patch mosaic, windows drawn within `tile` pixels. Vectorized over as many filters at a time
    as CHUNK_ELEMENTS window elements allow (few large torch ops: each small one can stall on a busy
    machine)."""
    per_filter = layer.pixels[0].numel()
    step = max(1, CHUNK_ELEMENTS // per_filter)
    for start in range(0, layer.filters, step):
        projections, patches, empty = _display_tiles(layer, slice(start, start + step), tile)
        height, width = _mosaic_size(*projections.shape[1:4])
        sprites = np.full((len(projections), height, 2 * width + BLOCK_GAP, 3), WHITE, np.uint8)
        _mosaics_into(sprites[:, :, :width], projections, empty)
        _mosaics_into(sprites[:, :, width + BLOCK_GAP :], patches, empty)
        for offset, sprite in enumerate(sprites):
            yield start + offset, sprite


def _short(name: str, limit: int = 20) -> str:
    """An image name shortened for a caption: its last path component, elided in the middle."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1] or name
    if len(base) <= limit:
        return base
    head = (limit - 1) // 2
    return base[:head] + "…" + base[len(base) - (limit - 1 - head) :]


def _value(value: float) -> str:
    return f"{value:.3g}"


# ------------------------------------------------------------------------------------------------ drawing
def render_figure2(
    projected: ProjectedMining,
    layer: str,
    path: str | os.PathLike[str],
    *,
    filters: Sequence[int] | None = None,
    tile: int = FIGURE_TILE,
    columns: int = 4,
) -> Path:
    """Write the paper's Fig. 2 for `layer` as a PNG at `path` (see :func:`figure2_layout`); returns it.

    matplotlib draws the texts (mathtext off: an image name is text, never markup) on a white page of the
    layout's exact pixel size, the mosaics are then pasted in unresampled (the layout keeps texts off them),
    and PIL writes the PNG without metadata: the same input gives the same bytes. (matplotlib's own
    `figimage` path resampled the page through masked arrays: 9 of a large figure's 16 s.)"""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no window
    from PIL import Image

    layout = figure2_layout(projected, layer, filters=filters, tile=tile, columns=columns)
    height, width = layout.pixels.shape[:2]
    figure = Figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI, facecolor="white")
    for x, y, text, size in layout.texts:
        figure.text(
            x / width,
            1 - y / height,
            text,
            fontsize=size,
            va="top",
            ha="left",
            linespacing=_CAPTION / (size * FIGURE_DPI / 72) / 1.2,  # matplotlib's line pitch is 1.2 x size
            parse_math=False,
            usetex=False,
        )
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    page = np.array(canvas.buffer_rgba())[:height, :width, :3]
    if page.shape[:2] != (height, width):  # never seen: figsize x dpi is exact for these integers
        raise RuntimeError(f"matplotlib drew {page.shape[:2]} pixels for a {(height, width)} page")
    block_h, block_w = layout.block
    for top, left in layout.blocks.values():
        span = (slice(top, top + block_h), slice(left, left + 2 * block_w + BLOCK_GAP))
        page[span] = layout.pixels[span]
    target = Path(path)
    Image.fromarray(page).save(target, format="PNG", compress_level=6)
    return target


_STYLE = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:1em;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
    "dt{font-weight:bold;float:left;clear:left;width:12em}dd{margin-left:13em;word-break:break-all}"
    ".f{display:inline-block;vertical-align:top;margin:4px;content-visibility:auto}"
    ".f h2{font-size:12px;margin:0}.f img{display:block;image-rendering:pixelated}"
    ".f ol{margin:0;padding:0;list-style:none;display:grid;font-size:10px;line-height:1.2}"
    ".f li{overflow:hidden;white-space:nowrap;text-overflow:ellipsis}.f li.e{color:#aaa}"
)


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _summary(value: Any, limit: int = 400) -> str:
    """A manifest value as one line of text (not yet escaped), at most `limit` characters."""
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, ensure_ascii=False, default=str, sort_keys=False)
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _filter_section(
    projected: ProjectedMining,
    page: int,
    filter_index: int,
    images: list[int],
    values: list[float],
    size: tuple[int, int],
) -> str:
    """One filter's sprite and captions; at most ~NAME_LIMIT + 150 bytes of HTML per entry."""
    captions = []
    for rank, (image, value) in enumerate(zip(images, values, strict=True)):
        if image < 0:
            captions.append('<li class="e">empty</li>')
            continue
        name = projected.name(image)
        shown = name if len(name) <= NAME_LIMIT else name[: NAME_LIMIT - 1] + "…"
        tooltip = html.escape(f"#{rank + 1}: {value:.6g}, image {image}: {shown}")
        captions.append(f'<li title="{tooltip}">{_value(value)} {html.escape(_short(name))}</li>')
    height, width = size
    return (
        f'<section class="f" id="f{filter_index}" style="width:{width}px">'
        f"<h2>filter {filter_index}</h2>"
        f'<img src="layer-{page}/{filter_index}.png" width="{width}" height="{height}" loading="lazy" '
        f'alt="filter {filter_index}: projections (left), image patches (right)">'
        f'<ol style="grid-template-columns:repeat({_side(len(images))},1fr)">'
        f"{''.join(captions)}</ol></section>"
    )


def _write_sprites(sprites: Iterator[tuple[int, np.ndarray]], directory: Path) -> tuple[int, int]:
    """Write each sprite as ``<filter>.png`` with PIL at the fastest compression, on a few threads (zlib
    releases the GIL); returns the sprites' (height, width)."""
    from PIL import Image

    def write(item: tuple[int, np.ndarray]) -> tuple[int, int]:
        filter_index, sprite = item
        Image.fromarray(sprite).save(directory / f"{filter_index}.png", compress_level=1)
        return sprite.shape[0], sprite.shape[1]

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        # bounded: map() would read every chunk ahead; a deque of futures keeps two chunks in flight
        pending: deque[Future[tuple[int, int]]] = deque()
        size = (0, 0)
        for item in sprites:
            pending.append(pool.submit(write, item))
            while len(pending) > 256:
                size = pending.popleft().result()
        for future in pending:
            size = future.result()
    return size


def render_gallery(
    projected: ProjectedMining,
    directory: str | os.PathLike[str],
    *,
    figure_layers: Iterable[str] | None = None,
    tile: int = THUMBNAIL,
) -> Path:
    """Write a static HTML gallery of `projected` into `directory` (created if needed); returns its
    ``index.html``.

    Files: ``index.html`` (the manifest's summary and a table of layers), ``layer-<i>.html`` per layer i
    (every filter's sprite with per-entry value and image name, the full name as a tooltip),
    ``layer-<i>/<filter>.png`` sprites (written with PIL at the fastest compression), and
    ``figure2-<i>.png`` (:func:`render_figure2`, first 16 filters) for each layer in `figure_layers`
    (default: every layer; ``()`` for none)."""
    if not isinstance(projected, ProjectedMining):
        raise TypeError(f"projected must be a ProjectedMining, got {type(projected).__name__}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    if figure_layers is None:
        figured = set(projected.layers)
    else:
        if isinstance(figure_layers, str) or not isinstance(figure_layers, Iterable):
            raise TypeError(
                f"figure_layers must be an iterable of layer names, got {type(figure_layers).__name__}"
            )
        figured = {projected.layer(name).layer for name in figure_layers}
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for page, (name, data) in enumerate(projected.layers.items()):
        sprites = root / f"layer-{page}"
        sprites.mkdir(exist_ok=True)
        size = _write_sprites(gallery_sprites(data, tile=tile), sprites)
        figure = f"figure2-{page}.png" if name in figured else None
        if figure is not None:
            render_figure2(projected, name, root / figure)
        escaped = html.escape(name)
        window = "×".join(map(str, data.window))
        sections = "\n".join(
            _filter_section(projected, page, f, images, values, size)
            for f, (images, values) in enumerate(zip(data.images.tolist(), data.values.tolist(), strict=True))
        )
        figure_link = (
            f' <a href="{figure}">Fig. 2 (first {min(FIGURE_FILTERS, data.filters)} filters)</a>'
            if figure
            else ""
        )
        body = (
            f'<p><a href="index.html">All layers</a></p>\n<h1>Layer {escaped}</h1>\n'
            f"<p>{data.filters} filters, the {data.k} strongest activations of each: {data.path} projection "
            f"(left, each on its own scale around gray) and the image patch it sees (right), windows of "
            f"{window} pixels.{figure_link}</p>\n<div>\n{sections}\n</div>"
        )
        (root / f"layer-{page}.html").write_text(_page(f"Layer {name}", body), "utf-8", errors="replace")
        rows.append(
            f'<tr><td><a href="layer-{page}.html">{escaped}</a></td><td>{data.filters}</td><td>{data.k}</td>'
            f"<td>{data.path}</td><td>{window}</td><td>"
            + (f'<a href="{figure}">Fig. 2</a>' if figure else "")
            + "</td></tr>"
        )
    manifest = "".join(
        f"<dt>{html.escape(str(key))}</dt><dd>{html.escape(_summary(value))}</dd>"
        for key, value in projected.manifest.items()
    )
    body = (
        "<h1>Deconvnet projections</h1>\n"
        + (f"<h2>Run</h2>\n<dl>{manifest}</dl>\n" if manifest else "")
        + "<h2>Layers</h2>\n<table><thead><tr><th>layer</th><th>filters</th><th>k</th><th>projection</th>"
        "<th>window (pixels)</th><th>figure</th></tr></thead><tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>"
    )
    index = root / "index.html"
    index.write_text(_page("Deconvnet projections", body), "utf-8", errors="replace")
    return index
