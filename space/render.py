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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hub.analysis import AoiShare, AttentionStats, Box, Fixation, Region, attention_stats, focus_mask, work_copy
from hub.preprocess import map_to_image, overlay, resize_image, resize_map
from hub.publish import atomic_write

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


def _unit(shape: tuple[int, ...]) -> tuple[float, int]:
    """Line and label size for an image of this shape: they grow with the image."""
    unit = max(1.0, max(shape[:2]) / 500)
    return unit, max(1, round(1.5 * unit))


def _badge_disc(label: str, x: float, y: float, shape: tuple[int, ...], unit: float) -> tuple[int, int, int]:
    """The disc of a badge for `label` centred on pixel (x, y): (x, y, radius), kept inside the image."""
    h, w = shape[:2]
    (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.6 * unit, _unit(shape)[1])
    radius = round(max(tw, th) * 0.9 + 2 * unit)
    return int(np.clip(x, radius, max(radius, w - radius))), int(np.clip(y, radius, max(radius, h - radius))), radius


def _badge(out: np.ndarray, label: str, x: float, y: float, unit: float, thick: int, fill=(0, 0, 0)) -> None:
    """A numbered disc centred on pixel (x, y), kept inside the image (drawn in place)."""
    font_scale = 0.6 * unit
    (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thick)
    cx, cy, radius = _badge_disc(label, x, y, out.shape, unit)
    cv2.circle(out, (cx, cy), radius, fill, -1, cv2.LINE_AA)
    cv2.circle(out, (cx, cy), radius, (255, 255, 255), max(1, thick // 2), cv2.LINE_AA)
    origin = (cx - tw // 2, cy + th // 2)
    cv2.putText(out, label, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), thick, cv2.LINE_AA)


def _outline(out: np.ndarray, polys: list[np.ndarray], unit: float, thick: int) -> None:
    """White outlines on a dark edge, legible on any colormap or photo (drawn in place)."""
    cv2.polylines(out, polys, True, (0, 0, 0), thick + 2 * max(1, round(unit)), cv2.LINE_AA)
    cv2.polylines(out, polys, True, (255, 255, 255), thick, cv2.LINE_AA)


def draw_regions(image: np.ndarray, regions: Iterable[Region]) -> np.ndarray:
    """Draw each region's outline and its number (white on a dark edge, legible on any colormap)."""
    out = np.ascontiguousarray(image).copy()
    h, w = out.shape[:2]
    unit, thick = _unit(out.shape)
    scale = np.array([w, h], np.float32)
    for region in regions:
        polys = [np.round(c * scale).astype(np.int32).reshape(-1, 1, 2) for c in region.contours]
        _outline(out, polys, unit, thick)
        _badge(out, str(region.index), region.peak[0] * w, region.peak[1] * h, unit, thick)
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
    return draw_regions(heat_overlay(image, shown, colormap, opacity), stats.regions), stats


# -- areas of interest, focus map, viewing order, compare -------------------------------------------

# AOI colours (RGB): those gradio_image_annotation gives new boxes, in its order, so that a box drawn
# in the editor keeps its colour in the report, in Compare and for boxes sent to /analyze.
AOI_COLORS = ((255, 168, 77), (92, 172, 238), (255, 99, 71), (118, 238, 118), (255, 145, 164), (0, 191, 255),
              (255, 218, 185), (255, 69, 0), (34, 139, 34), (255, 240, 245), (255, 193, 37), (255, 193, 7),
              (255, 250, 138))  # fmt: skip
FOG = (18, 20, 28)  # what unattended parts of the photo fade towards in the focus map


def aoi_color(boxes: Sequence[Box], i: int) -> tuple[int, int, int]:
    """The colour of the i-th box: its own (from the editor), else the palette's i-th."""
    return tuple(boxes[i].color) if boxes[i].color is not None else AOI_COLORS[i % len(AOI_COLORS)]


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at `size` px (no system fonts needed; Latin text, any size)."""
    return ImageFont.load_default(size=max(8, int(size)))


def region_badges(regions: Iterable[Region], shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Where `draw_regions` puts each region's numbered disc: (x, y, radius) in pixels."""
    h, w = shape[:2]
    unit, _ = _unit(shape)
    return [_badge_disc(str(r.index), r.peak[0] * w, r.peak[1] * h, shape, unit) for r in regions]


def _overlaps(rect: tuple[float, float, float, float], discs: Sequence[tuple[float, float, float]],
              rects: Sequence[tuple[float, float, float, float]]) -> bool:  # fmt: skip
    x0, y0, x1, y1 = rect
    for cx, cy, r in discs:  # nearest point of the rectangle to the disc's centre
        if (min(max(cx, x0), x1) - cx) ** 2 + (min(max(cy, y0), y1) - cy) ** 2 < r * r:
            return True
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in rects)


def draw_aois(image: np.ndarray, boxes: Sequence[Box], shares: Sequence[AoiShare] | None = None,
              avoid: Sequence[tuple[float, float, float]] = ()) -> np.ndarray:  # fmt: skip
    """Each area of interest as a coloured rectangle with a tag "name · share" (share if given).

    avoid: discs (x, y, radius in pixels) the tags must not cover, e.g. the numbered peak badges;
    each tag goes to the first free place of: above the box, below it, inside its top, inside its
    bottom (left-aligned, then right-aligned), and never over another tag.
    """
    out = Image.fromarray(np.ascontiguousarray(image))
    h, w = image.shape[:2]
    unit, thick = _unit(image.shape)
    draw = ImageDraw.Draw(out)
    text_font = font(13 * unit)
    pad = round(2 * unit)
    placed: list[tuple[float, float, float, float]] = []
    for i, box in enumerate(boxes):
        color = aoi_color(boxes, i)
        x0, y0, x1, y1 = box.to_pixels((h, w))
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 0, 0), width=thick + 2)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=thick)
        label = box.name if shares is None else f"{box.name} · {shares[i].share:.0%}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=text_font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        spots = [(float(min(max(0, tx), w - tw)), float(ty)) for ty in (y0 - th - 1, y1 + 1, y0 + thick, y1 - thick - th)
                 for tx in (x0, x1 - tw)]  # fmt: skip
        inside = [(tx, ty) for tx, ty in spots if 0 <= ty <= h - th]  # the image has room for the tag there
        tx, ty = next(((tx, ty) for tx, ty in inside if not _overlaps((tx, ty, tx + tw, ty + th), avoid, placed)),
                      inside[0] if inside else (spots[0][0], 0.0))  # fmt: skip
        placed.append((tx, ty, tx + tw, ty + th))
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=color)
        draw.text((tx + pad - left, ty + pad - top), label, fill=(0, 0, 0), font=text_font)
    return np.asarray(out)


def caption_bar(image: np.ndarray, text: str) -> np.ndarray:
    """The image with a white strip above it holding `text` (dark, left-aligned)."""
    h, w = image.shape[:2]
    unit, _ = _unit(image.shape)
    text_font = font(15 * unit)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=text_font)
    bar = round(bottom - top + 10 * unit)
    page = Image.new("RGB", (w, h + bar), (255, 255, 255))
    page.paste(Image.fromarray(np.ascontiguousarray(image)), (0, bar))
    ImageDraw.Draw(page).text((round(6 * unit) - left, round(5 * unit) - top), text, fill=(20, 20, 20), font=text_font)
    return np.asarray(page)


def render_focus(image: np.ndarray, saliency: np.ndarray, mass: float = 0.75, fog: float = 0.85) -> np.ndarray:
    """The "fog" view: the photo at full brightness inside the smallest region holding `mass` of the
    attention (outlined), fading towards dark where the map is low. Output has the map's size."""
    rgb = resize_image(image, saliency.shape[:2]).astype(np.float32)
    mask = focus_mask(saliency, mass)
    level = float(saliency[mask].min()) if mask.any() else 1.0
    seen = np.clip(saliency / level, 0.0, 1.0) if level > 0 else np.ones(saliency.shape)
    keep = (1.0 - fog * (1.0 - seen**2))[:, :, None]  # half the threshold: a quarter of the way back from fog
    out = (rgb * keep + np.array(FOG, np.float32) * (1.0 - keep) + 0.5).astype(np.uint8)
    unit, thick = _unit(out.shape)
    found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    _outline(out, list(found), unit, thick)
    return out


def render_viewing_order(image: np.ndarray, order: Sequence[Fixation], dim: float = 0.35) -> np.ndarray:
    """The likely viewing order: numbered points joined in order, on the photo dimmed by `dim`."""
    out = (np.ascontiguousarray(image).astype(np.float32) * (1.0 - dim) + 0.5).astype(np.uint8)
    h, w = out.shape[:2]
    unit, thick = _unit(out.shape)
    points = [(round(f.x * w), round(f.y * h)) for f in order]
    if len(points) > 1:
        path = [np.array(points, np.int32).reshape(-1, 1, 2)]
        cv2.polylines(out, path, False, (0, 0, 0), thick + 2 * max(1, round(unit)) + 1, cv2.LINE_AA)
        cv2.polylines(out, path, False, (255, 200, 0), thick + 1, cv2.LINE_AA)
    for i, (f, (x, y)) in enumerate(zip(order, points)):
        _badge(out, str(f.index), x, y, unit * 1.2, thick, fill=(230, 90, 0) if i == 0 else (0, 0, 0))
    return out


def common_scale(maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Maps of several variants on one colour scale: each as attention per unit of image area
    (map / its mean), all divided by the largest such value, so equal colours mean equal density."""
    dens = [m.astype(np.float32) / float(m.mean()) if float(m.mean()) > 0 else m.astype(np.float32) for m in maps]
    top = max((float(d.max()) for d in dens), default=0.0)
    return [d / top if top > 0 else d for d in dens]


def heat_overlay(image: np.ndarray, shown: np.ndarray, colormap: str = "turbo", opacity: float = 0.6) -> np.ndarray:
    """The heatmap of an already scaled map (0..1) over the image, at the map's size, in strips."""
    rgb = resize_image(image, shown.shape[:2])
    drawn = np.empty_like(rgb)
    for rows in _strips(shown.shape):
        drawn[rows] = overlay(rgb[rows], shown[rows], colormap=colormap, alpha=float(np.clip(opacity, 0.0, 1.0)))
    return drawn


@dataclass(frozen=True)
class ReportPanel:
    title: str
    image: np.ndarray  # H x W x 3 uint8


def render_report(
    title: str,
    panels: Sequence[ReportPanel],
    table: Sequence[Sequence[str]],
    notes: Sequence[str],
    width: int = 1600,
) -> np.ndarray:
    """One page: a title line, the panels two per row with captions, a table, and notes (Pillow).

    table: header row first; every cell a string. Returns H x W x 3 uint8 (white background).
    """
    margin, gap = 40, 24
    col_w = (width - 2 * margin - gap) // 2
    big, mid, small = font(30), font(20), font(17)
    line = 26
    fitted = []
    for p in panels:
        h, w = p.image.shape[:2]
        scale = min(col_w / w, 520 / h)
        fitted.append((p.title, Image.fromarray(p.image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)))
    rows = [fitted[i : i + 2] for i in range(0, len(fitted), 2)]
    panels_h = sum(max(im.height for _, im in row) + 36 + gap for row in rows)
    height = margin + 50 + panels_h + line * (len(table) + 2) + line * (len(notes) + 1) + margin
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    draw.text((margin, margin), title, fill=(20, 20, 20), font=big)
    y = margin + 56
    for row in rows:
        for k, (caption, im) in enumerate(row):
            x = margin + k * (col_w + gap)
            draw.text((x, y), caption, fill=(40, 40, 40), font=mid)
            page.paste(im, (x, y + 30))
        y += max(im.height for _, im in row) + 36 + gap
    if table:
        widths = [max(draw.textlength(str(r[c]), font=small) for r in table) + 28 for c in range(len(table[0]))]
        for i, r in enumerate(table):
            x = margin
            if i == 0:
                draw.rectangle((margin - 6, y - 3, margin + sum(widths), y + line - 4), fill=(238, 240, 244))
            for c, cell in enumerate(r):
                draw.text((x, y), str(cell), fill=(20, 20, 20), font=small)
                x += widths[c]
            y += line
        y += line
    for note in notes:
        draw.text((margin, y), note, fill=(70, 70, 70), font=small)
        y += line
    return np.asarray(page)


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
    # atomic_write creates the folder too: a long session may outlive its swept scratch folder
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


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
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are already compressed
            for name, data in entries:
                zf.writestr(name, data)

    return atomic_write(path, write)


def write_csv(rows: Iterable[Sequence[Any]], path: str | os.PathLike) -> Path:
    """Rows as a UTF-8 CSV (with a BOM, so spreadsheet apps read names with accents), written atomically."""
    import csv

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return _write_atomic(("\ufeff" + buf.getvalue()).encode("utf-8"), Path(path))
