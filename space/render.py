"""Everything the demo draws from a saliency map, without running the model again.

A map is computed once per upload; colormap, opacity, blur and the number of peak regions only
change what is drawn from it, so each of those is a pure function of (image, map, settings).
Colorizing and blending are `hub.preprocess.colorize` / `overlay` (one rendering path for the
app, the model card and the benchmarks); the statistics (peak regions, areas of interest, focus
region, viewing order) are `hub.analysis`, shared with the evaluation; this module adds display
blur and draws them, and writes the files users download.

Shapes: images are H x W x 3 uint8 RGB, maps H x W float32 in [0, 1] with peak 1.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from hub.analysis import AttentionStats, Region, attention_stats, work_copy
from hub.preprocess import map_to_image, overlay, resize_image, resize_map

# Full-size overlays and maps are computed this many pixels at a time: blending works in float32
# (16 bytes a pixel), which for a 4096 x 4096 image would otherwise mean ~0.7 GB at once.
STRIP_PIXELS = 1 << 20


def blur(saliency: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blur a map; sigma is a fraction of the image's longer side (0 = unchanged).

    The blur runs on a <= 256 px copy and is resized back, so its cost does not grow with the
    upload. The result is rescaled to peak 1, like every map the model returns.
    """
    if sigma <= 0:
        return saliency
    small = work_copy(saliency)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma * max(small.shape), borderType=cv2.BORDER_REPLICATE)
    out = np.clip(resize_map(small, saliency.shape), 0.0, None)
    peak = float(out.max())
    return (out / peak).astype(np.float32) if peak > 0 else out.astype(np.float32)


def draw_regions(image: np.ndarray, regions: Iterable[Region]) -> np.ndarray:
    """Draw each region's outline and its number (white on a dark edge, legible on any colormap)."""
    out = np.ascontiguousarray(image).copy()
    h, w = out.shape[:2]
    unit = max(1.0, max(h, w) / 500)  # line and label size grow with the image
    thick = max(1, round(1.5 * unit))
    scale = np.array([w, h], np.float32)
    for region in regions:
        polys = [np.round(c * scale).astype(np.int32).reshape(-1, 1, 2) for c in region.contours]
        cv2.polylines(out, polys, True, (0, 0, 0), thick + 2 * max(1, round(unit)), cv2.LINE_AA)
        cv2.polylines(out, polys, True, (255, 255, 255), thick, cv2.LINE_AA)
        label = str(region.index)
        font_scale = 0.6 * unit
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thick)
        radius = round(max(tw, th) * 0.9 + 2 * unit)
        cx = int(np.clip(region.peak[0] * w, radius, max(radius, w - radius)))
        cy = int(np.clip(region.peak[1] * h, radius, max(radius, h - radius)))
        cv2.circle(out, (cx, cy), radius, (0, 0, 0), -1, cv2.LINE_AA)
        cv2.circle(out, (cx, cy), radius, (255, 255, 255), max(1, thick // 2), cv2.LINE_AA)
        origin = (cx - tw // 2, cy + th // 2)
        cv2.putText(out, label, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out


def render_overlay(
    image: np.ndarray,
    saliency: np.ndarray,
    *,
    colormap: str = "turbo",
    opacity: float = 0.6,
    sigma: float = 0.0,
    top_k: int = 3,
    stats: AttentionStats | None = None,
) -> tuple[np.ndarray, AttentionStats]:
    """Heatmap overlay of `saliency` (blurred by `sigma`) on `image`, with the top-k regions outlined.

    image and saliency may differ in size; the overlay has the map's size. Pass `stats` to reuse
    regions computed for the same map and settings (e.g. when drawing the preview and the
    full-size download). Returns (overlay H x W x 3 uint8, stats).
    """
    shown = blur(saliency, sigma)
    if stats is None:
        stats = attention_stats(shown, top_k)
    rgb = resize_image(image, shown.shape[:2])
    alpha = float(np.clip(opacity, 0.0, 1.0))
    drawn = np.empty_like(rgb)
    for rows in _strips(shown.shape):  # overlay() is per pixel, so strips give the same image
        drawn[rows] = overlay(rgb[rows], shown[rows], colormap=colormap, alpha=alpha)
    return draw_regions(drawn, stats.regions), stats


def _strips(shape: tuple[int, ...]) -> list[slice]:
    h, w = shape[:2]
    step = max(1, STRIP_PIXELS // max(1, w))
    return [slice(y, min(h, y + step)) for y in range(0, h, step)]


def fit_within(image: np.ndarray, side: int) -> np.ndarray:
    """Shrink an image or map (aspect kept) so its longer side is at most `side`."""
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image
    scale = side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize_map(image, size) if image.ndim == 2 else resize_image(image, size)


def _write_atomic(data: bytes, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)  # a long session may outlive its swept scratch folder
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def png_bytes(image: Image.Image, compress_level: int = 3) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def save_map_png(saliency: np.ndarray, path: str | os.PathLike) -> Path:
    """The map as a lossless 16-bit greyscale PNG (0..65535 for 0..1) at the map's size."""
    grey = np.concatenate([np.asarray(map_to_image(saliency[rows], bits=16)) for rows in _strips(saliency.shape)])
    return _write_atomic(png_bytes(Image.fromarray(grey)), Path(path))


def save_rgb_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """An RGB image as PNG; compress level 1 because full-size overlays are re-saved on every change."""
    return _write_atomic(png_bytes(Image.fromarray(image), compress_level=1), Path(path))


def write_zip(entries: Iterable[tuple[str, bytes]], path: str | os.PathLike) -> Path:
    """A zip of (name, bytes) entries, written to a temp name and renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are already compressed
        for name, data in entries:
            zf.writestr(name, data)
    os.replace(tmp, path)
    return path
