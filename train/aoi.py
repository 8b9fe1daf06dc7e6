"""How well predicted AOI shares match where people really looked: `python -m train.evaluate --aoi`.

    python -m train.evaluate --aoi --model runs/demo --data ../shared/data/nus_scene --split val

The demo tells a designer "this box gets 23 % of the attention". This module measures that claim
on images with recorded fixations: for each image, the boxes are (a) the bounding box of each
predicted peak region (`hub.analysis.attention_stats`, what the demo outlines) and (b) a fixed
grid of boxes over the image; a box's predicted share is `hub.analysis.box_shares` of the
model's map (the demo's code), its real share the fraction of recorded fixations inside it.
Reported: the mean absolute error of the share in percentage points and the Pearson
correlation over all (image, box) pairs, next to the same for the centre prior
(`train.metrics.center_prior`) on the same boxes.

Functions take arrays; reading the data and running the model stay in `train.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from hub.analysis import Box, attention_stats, box_shares, grid_boxes, point_shares, region_boxes
from train import metrics as M
from train.data import Sample, image_size, read_fixations

GRID = (3, 3)
PEAK_REGIONS = 3  # as the demo's default number of outlined peak regions
KINDS = ("peaks", "grid")


def image_boxes(pred: np.ndarray, top_k: int = PEAK_REGIONS, grid: tuple[int, int] = GRID) -> dict[str, list[Box]]:
    """The boxes scored on one image: around each predicted peak region, and a fixed grid."""
    return {"peaks": region_boxes(attention_stats(pred, top_k)), "grid": grid_boxes(*grid)}


def score_image(
    pred: np.ndarray, points: np.ndarray, size: tuple[int, int], boxes: dict[str, list[Box]]
) -> dict[str, dict[str, list[float]]]:
    """Shares per kind of box: {"peaks": {"model": [...], "center": [...], "fixations": [...]}, ...}.

    pred: the model's H' x W' map of the image (any size; boxes are fractions); points: N x 2
    recorded fixations as (x, y) pixels of the image of `size` (H, W).
    """
    center = M.center_prior(size)
    out = {}
    for kind, kind_boxes in boxes.items():
        out[kind] = {
            "model": box_shares(pred, kind_boxes).tolist(),
            "center": box_shares(center, kind_boxes).tolist(),
            "fixations": point_shares(points, kind_boxes, size).tolist(),
        }
    return out


def agreement(predicted: Sequence[float], real: Sequence[float]) -> dict[str, float]:
    """Mean absolute error in percentage points and Pearson correlation of two lists of shares."""
    p, r = np.asarray(predicted, np.float64), np.asarray(real, np.float64)
    if p.size == 0:
        return {"mae_pp": float("nan"), "cc": float("nan"), "n_boxes": 0}
    cc = float(np.corrcoef(p, r)[0, 1]) if p.size > 1 and p.std() > 0 and r.std() > 0 else float("nan")
    return {"mae_pp": float(np.mean(np.abs(p - r)) * 100), "cc": cc, "n_boxes": int(p.size)}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{kind ("peaks", "grid", "all"): {"model": agreement, "center": agreement}} over all images."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind in (*KINDS, "all"):
        kinds = KINDS if kind == "all" else (kind,)
        pooled: dict[str, list[float]] = {"model": [], "center": [], "fixations": []}
        for row in rows:
            for k in kinds:
                for source in pooled:
                    pooled[source] += row["shares"][k][source]
        out[kind] = {source: agreement(pooled[source], pooled["fixations"]) for source in ("model", "center")}
    return out


def fixation_points(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """The sample's recorded fixations as N x 2 (x, y) pixels on its image (the loader's binary map)."""
    rows, cols = np.nonzero(read_fixations(sample, size))
    return np.stack([cols, rows], 1)


def evaluate_aoi(
    model: Any, samples: Sequence[Sample], batch_size: int = 8, precision: str = "auto", progress: bool = True
) -> dict[str, Any]:
    """Predict every sample that has fixations with `model.predict` and score its AOI shares."""
    usable = [s for s in samples if s.has_fixations]
    if not usable:
        raise ValueError("none of the evaluated images has fixations; --aoi needs fixations/<id>.png or fixations.csv.")
    rows = []
    bar = tqdm(total=len(usable), desc="aoi", unit="img", disable=not progress)
    for start in range(0, len(usable), batch_size):
        chunk = usable[start : start + batch_size]
        preds = model.predict([s.image for s in chunk], batch_size=batch_size, precision=precision)
        for sample, pred in zip(chunk, preds):
            size = image_size(sample.image)
            shares = score_image(pred, fixation_points(sample, size), size, image_boxes(pred))
            rows.append({"id": sample.id, "shares": shares})
        bar.update(len(chunk))
    bar.close()
    return {"n_images": len(rows), "grid": list(GRID), "peak_regions": PEAK_REGIONS, "aoi": summarize(rows), "images": rows}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"AOI shares vs real fixation shares on {report['n_images']} images "
             f"(boxes: up to {report['peak_regions']} peak regions + a {report['grid'][0]}x{report['grid'][1]} grid)",
             f"{'boxes':8s}{'n':>6s}{'model MAE (pp)':>16s}{'model CC':>10s}{'centre MAE (pp)':>17s}{'centre CC':>11s}"]  # fmt: skip
    for kind, scores in report["aoi"].items():
        m, c = scores["model"], scores["center"]
        lines.append(f"{kind:8s}{m['n_boxes']:6d}{m['mae_pp']:16.2f}{m['cc']:10.3f}{c['mae_pp']:17.2f}{c['cc']:11.3f}")
    return "\n".join(lines) + "\n(MAE: mean absolute error of a box's share of attention, percentage points; lower is better)"
