"""Attention analysis on a saliency map: peak regions, areas of interest, focus region, viewing order.

Plain array functions shared by the demo (`space/`), `train.evaluate --aoi` and any batch tool, so
every number a user sees is computed by one piece of code. Nothing here runs the model.

Conventions: a map is H x W float (any scale, non-negative; the model's maps have peak 1). The
attention a part of the image gets is its *share*: the map normalised to sum 1, summed over the
part. Positions and boxes are fractions of the image width / height (0..1), so the same numbers
apply to the preview, the full-size image and another variant of the design.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from hub.preprocess import resize_map

# Peak statistics and the viewing order run on a copy of the map at most this many pixels on its
# longer side. Fixation maps are smooth (their detail is ~1/30 of the image), so this loses nothing
# and makes both independent of the upload's resolution.
WORK_SIDE = 256
# A peak region is the connected area around a peak above this fraction of the peak's value.
REGION_LEVEL = 0.5
# Local maxima examined per map (a noisy map can have hundreds; the top few decide the regions).
MAX_CANDIDATES = 64
# Local maxima below this fraction of the global peak are noise, not places people look.
MIN_PEAK = 0.05
# A region holding less than this share of all attention is a speck (e.g. a border pixel), not a place.
MIN_SHARE = 0.01
# Focus thresholds offered to users: the smallest region holding this fraction of the attention.
FOCUS_LEVELS = (0.5, 0.75, 0.9)
# Inhibition of return: a visited place is suppressed by a Gaussian of this sigma (fraction of the
# image's longer side), about two degrees of visual angle at a typical viewing distance.
IOR_SIGMA = 0.08


# -- peak regions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """One peak region. Coordinates are fractions of the image width/height (0..1), so a region
    can be drawn on the preview and on the full-size overlay alike.

    share: fraction of the map's total attention (the map normalised to sum 1) inside the region.
    area: fraction of the image area the region covers.
    peak, centroid: (x, y); centroid is attention-weighted.
    contours: outlines, each an N x 2 array of (x, y) fractions.
    bbox: (x0, y0, x1, y1), the region's bounding box.
    """

    index: int
    share: float
    area: float
    peak_value: float
    peak: tuple[float, float]
    centroid: tuple[float, float]
    contours: tuple[np.ndarray, ...]
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class AttentionStats:
    """Summary of where the predicted attention goes.

    regions: the top-k peak regions, strongest peak first.
    top10_share: share of attention in the 10 % most salient pixels (1.0 = all attention there;
        0.1 = spread evenly over the image), a resolution-independent concentration measure.
    """

    regions: tuple[Region, ...]
    top10_share: float

    @property
    def regions_share(self) -> float:
        return float(sum(r.share for r in self.regions))

    @property
    def regions_area(self) -> float:
        return float(sum(r.area for r in self.regions))


def work_copy(saliency: np.ndarray, side: int = WORK_SIDE) -> np.ndarray:
    """The map shrunk (aspect kept) to at most `side` px on its longer side; smaller maps unchanged."""
    h, w = saliency.shape
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize_map(saliency, size)


def _top_share(density: np.ndarray, fraction: float) -> float:
    k = max(1, round(density.size * fraction))
    return float(np.partition(density, density.size - k, axis=None)[-k:].sum() / density.sum())


def top_share(saliency: np.ndarray, fraction: float = 0.1) -> float:
    """Share of all attention (the map normalised to sum 1) in its `fraction` most salient pixels,
    on the <= 256 px work copy: 1.0 when all attention is there, `fraction` when it is spread
    evenly, 0.0 for an empty map. `attention_stats(...).top10_share` is `top_share(map, 0.1)`."""
    small = work_copy(saliency).astype(np.float64)
    total = float(small.sum())
    if total <= 0 or not np.isfinite(total):
        return 0.0
    return _top_share(small, fraction)


def attention_stats(saliency: np.ndarray, top_k: int = 3) -> AttentionStats:
    """Top-k peak regions of a map and the share of attention each holds.

    Peaks are the local maxima of the map (on a <= 256 px copy), strongest first. A peak's region
    is the connected area around it where the map stays at or above half the peak's value. A
    peak whose region would overlap a stronger peak's is part of the same hill and is skipped,
    so regions never overlap and their shares add up.
    """
    # scipy comes with the demo and training extras; the pip package's core (top_share, AOI shares,
    # viewing order, `python -m hub predict`) does not need it.
    from scipy import ndimage

    small = work_copy(saliency).astype(np.float64)
    total = float(small.sum())
    if total <= 0 or not np.isfinite(total):
        return AttentionStats(regions=(), top10_share=0.0)
    density = small / total
    top10 = _top_share(density, 0.1)
    if top_k <= 0:
        return AttentionStats(regions=(), top10_share=top10)

    sh, sw = small.shape
    size = max(3, (max(sh, sw) // 16) | 1)
    maxima = (small >= ndimage.maximum_filter(small, size=size, mode="nearest")) & (small >= MIN_PEAK * small.max())
    labels, count = ndimage.label(maxima)
    peaks = ndimage.maximum_position(small, labels, range(1, count + 1)) if count else []
    peaks = sorted(peaks, key=lambda p: -small[p])[:MAX_CANDIDATES]

    regions: list[Region] = []
    taken = np.zeros(small.shape, bool)
    yy, xx = np.mgrid[0:sh, 0:sw]
    for p in peaks:
        if len(regions) == top_k:
            break
        parts, _ = ndimage.label(small >= REGION_LEVEL * small[p])
        mask = parts == parts[p]
        if (mask & taken).any():
            continue
        weights = density[mask]
        share = float(weights.sum())
        if share < MIN_SHARE:
            continue
        taken |= mask
        cx = float((xx[mask] * weights).sum() / share) if share > 0 else float(p[1])
        cy = float((yy[mask] * weights).sum() / share) if share > 0 else float(p[0])
        found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        # Straighten the pixel staircase, which would show as jagged steps on a larger overlay.
        found = [cv2.approxPolyDP(c, 0.8, True) if len(c) > 8 else c for c in found]
        # Contour points are pixel centres; +0.5 then / size maps them onto 0..1 of the image.
        contours = tuple((c[:, 0, :].astype(np.float32) + 0.5) / np.array([sw, sh], np.float32) for c in found)
        rows, cols = np.nonzero(mask)
        regions.append(
            Region(
                index=len(regions) + 1,
                share=share,
                area=float(mask.mean()),
                peak_value=float(small[p] / small.max()),
                peak=(float((p[1] + 0.5) / sw), float((p[0] + 0.5) / sh)),
                centroid=((cx + 0.5) / sw, (cy + 0.5) / sh),
                contours=contours,
                bbox=(cols.min() / sw, rows.min() / sh, (cols.max() + 1) / sw, (rows.max() + 1) / sh),
            )
        )
    return AttentionStats(regions=tuple(regions), top10_share=top10)


# -- areas of interest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A named rectangle in fractions of the image width (x) and height (y), 0 <= x0 < x1 <= 1.

    Fractions make a box mean the same place on any size of the image, and on another variant of
    the same design (applied by relative position).
    """

    name: str
    x0: float
    y0: float
    x1: float
    y1: float
    # How a UI draws the box (RGB), e.g. the colour it had in the editor; None: by its position in
    # the list. No effect on any number.
    color: tuple[int, int, int] | None = field(default=None, compare=False)

    @property
    def area(self) -> float:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    @classmethod
    def from_pixels(cls, name: str, xmin: float, ymin: float, xmax: float, ymax: float, size: tuple[int, int],
                    color: tuple[int, int, int] | None = None) -> Box:  # fmt: skip
        """A box from pixel corners on an image of `size` (height, width); corners in any order,
        clipped to the image. ValueError (naming the box) when nothing of it is inside the image."""
        h, w = size
        x0, x1 = sorted((float(xmin), float(xmax)))
        y0, y1 = sorted((float(ymin), float(ymax)))
        box = cls(name, max(0.0, x0 / w), max(0.0, y0 / h), min(1.0, x1 / w), min(1.0, y1 / h), color)
        if not (box.x1 > box.x0 and box.y1 > box.y0):
            raise ValueError(
                f"Area of interest {name!r} ({xmin}, {ymin}, {xmax}, {ymax}) has no area inside the "
                f"{w} x {h} image; give corners xmin < xmax and ymin < ymax within it."
            )
        return box

    def to_pixels(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(xmin, ymin, xmax, ymax) in whole pixels on an image of `size` (height, width)."""
        h, w = size
        return round(self.x0 * w), round(self.y0 * h), round(self.x1 * w), round(self.y1 * h)


@dataclass(frozen=True)
class AoiShare:
    """One area of interest measured on a map.

    share: fraction of all attention inside the box; area: fraction of the image it covers;
    ratio: share / area ("x times the attention its size would get"; 1 = its fair share);
    rank: 1 for the box with the largest share.
    """

    name: str
    share: float
    area: float
    ratio: float
    rank: int


def _coverage(lo: float, hi: float, n: int) -> np.ndarray:
    """How much of each of n unit cells [i, i+1) lies inside [lo*n, hi*n] (0..1 per cell)."""
    edges = np.arange(n + 1, dtype=np.float64)
    return np.clip(np.minimum(edges[1:], hi * n) - np.maximum(edges[:-1], lo * n), 0.0, 1.0)


def box_shares(density: np.ndarray, boxes: Sequence[Box]) -> np.ndarray:
    """The mass of `density` (H x W, any scale) inside each box, as fractions of its total.

    Pixels on a box's edge count with the fraction of their area inside it, so a small box on a
    small map is measured without a staircase error. Overlapping boxes each count the overlap.
    """
    total = float(density.sum())
    if not boxes:
        return np.zeros(0)
    if total <= 0 or not np.isfinite(total):
        return np.zeros(len(boxes))
    h, w = density.shape
    d = density.astype(np.float64) / total
    return np.array([_coverage(b.y0, b.y1, h) @ d @ _coverage(b.x0, b.x1, w) for b in boxes])


def aoi_shares(saliency: np.ndarray, boxes: Sequence[Box]) -> list[AoiShare]:
    """Share of the predicted attention, share of the area, their ratio and rank of each box."""
    shares = box_shares(saliency, boxes)
    order = np.argsort(-shares, kind="stable")
    ranks = np.empty(len(boxes), int)
    ranks[order] = np.arange(1, len(boxes) + 1)
    return [
        AoiShare(b.name, float(s), b.area, float(s / b.area) if b.area > 0 else math.nan, int(r))
        for b, s, r in zip(boxes, shares, ranks)
    ]


def point_shares(points: np.ndarray, boxes: Sequence[Box], size: tuple[int, int]) -> np.ndarray:
    """Fraction of `points` (N x 2 pixel (x, y), e.g. recorded fixations) inside each box on an
    image of `size` (height, width); a point is its pixel's centre. Zeros when there are no points."""
    if len(points) == 0:
        return np.zeros(len(boxes))
    h, w = size
    x = (np.asarray(points[:, 0], np.float64) + 0.5) / w
    y = (np.asarray(points[:, 1], np.float64) + 0.5) / h
    return np.array([np.mean((x >= b.x0) & (x < b.x1) & (y >= b.y0) & (y < b.y1)) for b in boxes])


def region_boxes(stats: AttentionStats) -> list[Box]:
    """The bounding box of each peak region, named "peak 1", "peak 2", ..."""
    return [Box(f"peak {r.index}", *r.bbox) for r in stats.regions]


def grid_boxes(rows: int = 3, cols: int = 3) -> list[Box]:
    """A fixed rows x cols grid of boxes covering the image, named "r1c1" ... (row, column)."""
    return [
        Box(f"r{i + 1}c{j + 1}", j / cols, i / rows, (j + 1) / cols, (i + 1) / rows)
        for i in range(rows)
        for j in range(cols)
    ]


@dataclass(frozen=True)
class AoiComparison:
    """One area of interest across variants: its share in each, and which variant gives it the most
    (`winner`, an index; None when the top shares are within `tie` of each other)."""

    name: str
    shares: tuple[float, ...]
    winner: int | None


def compare_aois(per_variant: Sequence[Sequence[AoiShare]], tie: float = 0.005) -> list[AoiComparison]:
    """Which variant gives each area of interest the larger share. `per_variant[v]` lists the same
    boxes (same order, applied by relative position) measured on variant v's map."""
    if not per_variant:
        return []
    out = []
    for i, first in enumerate(per_variant[0]):
        shares = tuple(float(v[i].share) for v in per_variant)
        ranked = sorted(range(len(shares)), key=lambda k: -shares[k])
        clear = len(shares) == 1 or shares[ranked[0]] - shares[ranked[1]] > tie
        out.append(AoiComparison(first.name, shares, ranked[0] if clear else None))
    return out


# -- focus region ----------------------------------------------------------------------------------------


def focus_mask(saliency: np.ndarray, mass: float = 0.75) -> np.ndarray:
    """The smallest set of pixels holding at least `mass` (0..1) of the attention: H x W bool.

    The most salient pixels are taken first until their share reaches `mass`; pixels tied with
    the last one taken are all included. An empty map gives an empty mask.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"focus mass {mass!r} must be a fraction in (0, 1], e.g. 0.75 for 75 %.")
    values = saliency.astype(np.float64)
    total = float(values.sum())
    if total <= 0 or not np.isfinite(total):
        return np.zeros(saliency.shape, bool)
    flat = np.sort(values, axis=None)[::-1]
    cum = np.cumsum(flat) / total
    k = min(int(np.searchsorted(cum, mass - 1e-12)), flat.size - 1)
    return values >= flat[k]


# -- likely viewing order --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixation:
    """One place in the likely viewing order: position (x, y) as fractions, and the map's value
    there relative to its peak before any inhibition (how strongly it draws the eye)."""

    index: int
    x: float
    y: float
    value: float


def viewing_order(saliency: np.ndarray, n: int = 5, ior_sigma: float = IOR_SIGMA) -> list[Fixation]:
    """The first `n` places a viewer is likely to look, by winner-take-all with inhibition of return.

    An estimate from the map (Itti & Koch, 1998), not a scanpath model: take the map's maximum,
    suppress a Gaussian neighbourhood of it (sigma `ior_sigma` of the longer side) so the eye
    moves on, repeat. Stops early when what is left is below MIN_PEAK of the map's peak.
    """
    small = work_copy(saliency).astype(np.float64)
    top = float(small.max()) if small.size else 0.0
    if n <= 0 or top <= 0 or not np.isfinite(top):
        return []
    sh, sw = small.shape
    sigma = max(1.0, ior_sigma * max(sh, sw))
    yy, xx = np.mgrid[0:sh, 0:sw]
    left = small.copy()
    out: list[Fixation] = []
    while len(out) < n:
        r, c = np.unravel_index(int(np.argmax(left)), left.shape)
        if left[r, c] < MIN_PEAK * top:
            break
        out.append(Fixation(len(out) + 1, float((c + 0.5) / sw), float((r + 0.5) / sh), float(small[r, c] / top)))
        left *= 1.0 - np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma * sigma))
    return out
