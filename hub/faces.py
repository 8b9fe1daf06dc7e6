"""Face prior: frontal faces found by a classic detector raise the predicted map where they are.

Faces draw gaze whatever the task (Cerf et al. 2008; Judd et al. 2009 add a Viola-Jones face
channel for the same reason). An encoder trained from random weights on a few hundred scene
photos never learns what a face is, so the model's maps miss the faces every observer looks at
in photos of people. The prior adds that knowledge without training data: OpenCV's LBP
frontal-face cascade (`lbpcascade_frontalface`, the file scikit-image ships; no download) runs on
the original image, each face becomes a Gaussian the size of the face, and the map is multiplied
by (1 + weight x face map) (`SaliencyConfig.face_prior`). Multiplying, not adding, keeps a face
that the network finds plain (e.g. a poster face in a corner) no hotter than the network's map
allows times (1 + weight).

The cascade is evaluated here, as OpenCV's detectMultiScale does (image pyramid, windows every 2
pixels, groupRectangles with 3 neighbours), with numpy over all windows of a pyramid level at
once: OpenCV 5 has no cascade classifier any more, and scikit-image's own evaluator visits one
window at a time (several times slower).

Boxes are fractions of the image's width and height, so one detection serves any model size.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import cv2
import numpy as np
import torch

# The detector runs on the image with its longer side at most this long, so faces of 24 px and
# more there (1/27 of the frame; the cascade's window) are found whatever the photo's resolution.
FACE_SIDE = 640
SCALE_FACTOR = 1.1  # between pyramid levels (OpenCV's default)
# Windows every 2 pixels of a pyramid level, every pixel above this scale (OpenCV: 2).
FINE_STEP_ABOVE = 2.0
MIN_NEIGHBOURS = 3  # raw detections a face needs (OpenCV's default); fewer gives false faces on textures
GROUP_EPS = 0.2  # OpenCV's grouping tolerance
DENSE_STAGES = 2  # stages scored on every window (see _Cascade.windows)
# A face's Gaussian: sigma = (longer side of its box) / FACE_SIGMA_DIV, so about the face itself.
FACE_SIGMA_DIV = 2.5

# An MB-LBP code's 8 bits: the 3 x 3 blocks (row-major 0..8) compared with the centre block 4, in
# OpenCV's order (top-left 128, top 64, top-right 32, right 16, bottom-right 8, bottom 4, bottom-left 2, left 1).
_LBP_BITS = ((0, 128), (1, 64), (2, 32), (5, 16), (8, 8), (7, 4), (6, 2), (3, 1))


class _Cascade:
    """OpenCV's LBP boosted cascade (`lbpcascade_frontalface`), evaluated for all windows at once.

    Each stage scores every surviving window with its weak classifiers (an MB-LBP code of 3 x 3
    blocks summed from the integral image, looked up in a 256-entry table) and drops the windows
    whose sum is below the stage threshold; the arrays shrink stage by stage as in OpenCV's loop,
    so the cost is that of the first stages over the image.
    """

    def __init__(self, path: str) -> None:
        root = ET.parse(path).getroot().find("cascade")
        self.height, self.width = int(root.findtext("height")), int(root.findtext("width"))
        rects = np.array([[int(v) for v in f.findtext("rect").split()] for f in root.find("features")], np.int64)
        self.stages = []
        for stage in root.find("stages"):
            nodes, leaves = [], []
            for weak in stage.find("weakClassifiers"):
                nodes.append([int(v) for v in weak.findtext("internalNodes").split()])
                leaves.append([float(v) for v in weak.findtext("leafValues").split()])
            nodes_a = np.array(nodes, np.int64)
            fx, fy, fw, fh = rects[nodes_a[:, 2]].T
            # The 4 x 4 integral-image corners of each feature's 3 x 3 blocks, relative to the window.
            j, i = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
            dy = fy[:, None, None] + j[None] * fh[:, None, None]
            dx = fx[:, None, None] + i[None] * fw[:, None, None]
            codes = np.arange(256)
            subset = nodes_a[:, 3:11].astype(np.uint32)  # 256 bits per weak classifier
            bit = (subset[:, codes >> 5] >> (codes & 31).astype(np.uint32)) & 1
            leaves_a = np.array(leaves, np.float32)
            table = np.where(bit == 1, leaves_a[:, :1], leaves_a[:, 1:])  # K x 256: leaf 0 where the bit is set
            self.stages.append((dy.reshape(len(nodes), 16), dx.reshape(len(nodes), 16), table.astype(np.float32),
                                float(stage.findtext("stageThreshold"))))

    def windows(self, gray: np.ndarray, step: int) -> np.ndarray:
        """Top-left corners (M x 2: x, y) of the windows of a uint8 image that pass every stage.

        The first `DENSE_STAGES` stages score every window on the step grid with array slices of
        block-sum images (no gathers); they reject ~90% of the windows, and the later stages
        gather the few survivors' integral-image corners.
        """
        h, w = gray.shape
        if h < self.height or w < self.width:
            return np.zeros((0, 2), np.int64)
        integral = cv2.integral(gray)  # (h + 1) x (w + 1) int32
        ny, nx = (h - self.height) // step + 1, (w - self.width) // step + 1
        sums: dict[tuple[int, int], np.ndarray] = {}
        alive = np.ones((ny, nx), bool)
        for dy, dx, table, threshold in self.stages[:DENSE_STAGES]:
            score = np.zeros((ny, nx), np.float32)
            for k in range(len(dy)):
                fh, fw = int(dy[k, 4] - dy[k, 0]), int(dx[k, 1] - dx[k, 0])
                if (fh, fw) not in sums:  # sum of each fh x fw block, by its top-left pixel
                    sums[fh, fw] = integral[fh:, fw:] - integral[:-fh, fw:] - integral[fh:, :-fw] + integral[:-fh, :-fw]
                block = sums[fh, fw]
                grid = [block[oy : oy + (ny - 1) * step + 1 : step, ox : ox + (nx - 1) * step + 1 : step]
                        for oy, ox in zip(dy[k].reshape(4, 4)[:3, :3].ravel(), dx[k].reshape(4, 4)[:3, :3].ravel())]
                code = np.zeros((ny, nx), np.uint8)
                for b, weight in _LBP_BITS:
                    code |= np.greater_equal(grid[b], grid[4]).view(np.uint8) << np.uint8(weight.bit_length() - 1)
                score += table[k][code]
            alive &= score >= threshold
        ys, xs = (v * step for v in np.nonzero(alive))
        flat = integral.astype(np.int64).ravel()
        for dy, dx, table, threshold in self.stages[DENSE_STAGES:]:
            if not len(ys):
                break
            base = ys * (w + 1) + xs
            v = flat[base[:, None, None] + (dy * (w + 1) + dx)[None]].reshape(len(ys), len(dy), 4, 4)
            blocks = (v[:, :, 1:, 1:] - v[:, :, :-1, 1:] - v[:, :, 1:, :-1] + v[:, :, :-1, :-1]).reshape(len(ys), len(dy), 9)
            code = sum((blocks[:, :, b] >= blocks[:, :, 4]) * weight for b, weight in _LBP_BITS)
            keep = table[np.arange(len(dy))[None], code].sum(1) >= threshold
            ys, xs = ys[keep], xs[keep]
        return np.stack([xs, ys], 1)

    def detect(self, gray: np.ndarray, scale_factor: float) -> np.ndarray:
        """Raw detections (N x 4 int: x, y, w, h) over an image pyramid, as OpenCV's detectMultiScale."""
        h, w = gray.shape
        found, factor = [], 1.0
        while True:
            win_w, win_h = round(self.width * factor), round(self.height * factor)
            size = (round(w / factor), round(h / factor))
            if win_w > w or win_h > h or size[0] < self.width or size[1] < self.height:
                break
            scaled = gray if factor == 1.0 else cv2.resize(gray, size, interpolation=cv2.INTER_LINEAR)
            corners = self.windows(scaled, 1 if factor > FINE_STEP_ABOVE else 2)
            for x, y in corners:
                found.append((round(x * factor), round(y * factor), win_w, win_h))
            factor *= scale_factor
        return np.array(found, np.int64).reshape(-1, 4)


def group_rectangles(rects: np.ndarray, threshold: int, eps: float = GROUP_EPS) -> np.ndarray:
    """OpenCV's groupRectangles: clusters of similar rectangles with more than `threshold` members,
    averaged, minus those inside a stronger one. rects: N x 4 (x, y, w, h) -> M x 4 float."""
    if not len(rects) or threshold <= 0:
        return rects.astype(np.float64).reshape(-1, 4)
    x, y, w, h = (rects[:, k].astype(np.float64) for k in range(4))
    delta = eps * (np.minimum(w[:, None], w[None]) + np.minimum(h[:, None], h[None])) * 0.5
    similar = ((np.abs(x[:, None] - x[None]) <= delta) & (np.abs(y[:, None] - y[None]) <= delta)
               & (np.abs((x + w)[:, None] - (x + w)[None]) <= delta) & (np.abs((y + h)[:, None] - (y + h)[None]) <= delta))
    labels = np.arange(len(rects))
    while True:  # connected components: every rectangle takes the smallest label among its similar ones
        new = np.where(similar, labels[None], len(rects)).min(1)
        new = new[new]
        if np.array_equal(new, labels):
            break
        labels = new
    groups, counts = np.unique(labels, return_counts=True)
    mean = np.stack([rects[labels == g].mean(0) for g in groups]).round()
    kept = []
    for i, (r1, n1) in enumerate(zip(mean, counts)):
        if n1 <= threshold:
            continue
        inside = False
        for j, (r2, n2) in enumerate(zip(mean, counts)):
            if j == i or n2 <= threshold:
                continue
            dx, dy = round(r2[2] * eps), round(r2[3] * eps)
            if (r1[0] >= r2[0] - dx and r1[1] >= r2[1] - dy and r1[0] + r1[2] <= r2[0] + r2[2] + dx
                    and r1[1] + r1[3] <= r2[1] + r2[3] + dy and (n2 > max(3, n1) or n1 < 3)):
                inside = True
                break
        if not inside:
            kept.append(r1)
    return np.array(kept, np.float64).reshape(-1, 4)


@functools.lru_cache(maxsize=1)
def _detector() -> _Cascade:
    try:
        from skimage import data as skdata
    except ImportError as err:  # pragma: no cover - scikit-image is a core dependency
        raise ImportError("this model's face prior needs scikit-image (it ships the cascade): pip install scikit-image") from err
    return _Cascade(skdata.lbp_frontal_face_cascade_filename())


def detect_faces(image: np.ndarray) -> np.ndarray:
    """Frontal faces in an H x W x 3 uint8 RGB image: N x 4 float32 boxes (x0, y0, x1, y1) as
    fractions of the image's width and height, in [0, 1]. N may be 0."""
    h, w = image.shape[:2]
    scale = min(1.0, FACE_SIDE / max(h, w))
    small = image
    if scale < 1.0:
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2GRAY)
    faces = group_rectangles(_detector().detect(gray, SCALE_FACTOR), MIN_NEIGHBOURS)
    sh, sw = gray.shape
    boxes = np.stack([faces[:, 0] / sw, faces[:, 1] / sh, (faces[:, 0] + faces[:, 2]) / sw, (faces[:, 1] + faces[:, 3]) / sh], 1)
    return np.clip(boxes, 0.0, 1.0).astype(np.float32).reshape(-1, 4)


def face_maps(boxes: Sequence[np.ndarray], size: tuple[int, int], aspects: Sequence[float] | None = None) -> torch.Tensor:
    """B x 1 x h x w float32 maps in [0, 1]: per image the maximum of one Gaussian per face box.

    boxes: one N_i x 4 array per image (`detect_faces`). size: (h, w) of the model grid.
    aspects: each image's original width / height, so that a face's Gaussian is round in the
    original image however the grid stretches it (default: the grid's own aspect).
    """
    h, w = size
    u = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    v = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    out = torch.zeros(len(boxes), 1, h, w)
    for i, b in enumerate(boxes):
        b = torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4))
        if not len(b):
            continue
        aspect = float(aspects[i]) if aspects is not None else w / h
        bw, bh = b[:, 2] - b[:, 0], (b[:, 3] - b[:, 1])
        # The longer side in original pixels, as fractions of the width (x) and of the height (y).
        side_x = torch.maximum(bw, bh / aspect)
        sx = (side_x / FACE_SIGMA_DIV).clamp_min(1e-4)
        sy = (side_x * aspect / FACE_SIGMA_DIV).clamp_min(1e-4)
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        gx = torch.exp(-0.5 * ((u[None] - cx[:, None]) / sx[:, None]) ** 2)  # N x w
        gy = torch.exp(-0.5 * ((v[None] - cy[:, None]) / sy[:, None]) ** 2)  # N x h
        out[i, 0] = (gy[:, :, None] * gx[:, None, :]).amax(0)
    return out


def apply_face_prior(pred: torch.Tensor, faces: torch.Tensor, weight: float) -> torch.Tensor:
    """pred x (1 + weight x faces) / (1 + weight): B x 1 x h x w, still in [0, 1] for pred in [0, 1]."""
    return pred * (1.0 + weight * faces.to(pred.device, pred.dtype)) / (1.0 + weight)


def image_faces(images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """`face_maps` of original H x W x 3 uint8 images on the (h, w) model grid (detection included)."""
    return face_maps([detect_faces(im) for im in images], size, [im.shape[1] / im.shape[0] for im in images])
