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
from concurrent.futures import Executor, Future

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
_LBP_WEIGHTS = np.array([dict(_LBP_BITS).get(b, 0) for b in range(9)], np.uint8)  # by block; the centre 0
_BLOCK_CORNERS = [r * 4 + c for r in range(3) for c in range(3)]  # each block's top-left among the 4 x 4 corners


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

        The first `DENSE_STAGES` stages score every window on the step grid: each feature's block
        sums are one box filter of the image, split by phase of the step so that every block of
        every window is a contiguous slice. The windows that survive them (about one in eight) go through
        the later stages by gathering their integral-image corners, laid out window-last so that
        every operation runs over all (window, feature) pairs of a stage at once.
        """
        h, w = gray.shape
        if h < self.height or w < self.width:
            return np.zeros((0, 2), np.int64)
        ny, nx = (h - self.height) // step + 1, (w - self.width) // step + 1
        phases: dict[tuple[int, int, int, int], np.ndarray] = {}
        sums: dict[tuple[int, int], np.ndarray] = {}

        def grid(fh: int, fw: int, oy: int, ox: int) -> np.ndarray:
            """Sum of the fh x fw block at (oy, ox) of every window on the step grid (ny x nx)."""
            key = (fh, fw, oy % step, ox % step)
            if key not in phases:
                if (fh, fw) not in sums:  # block sums by top-left pixel; at most 8 x 8 x 255, so int16
                    sums[fh, fw] = cv2.boxFilter(gray, cv2.CV_16S, (fw, fh), anchor=(0, 0), normalize=False,
                                                 borderType=cv2.BORDER_CONSTANT)  # fmt: skip
                phases[key] = np.ascontiguousarray(sums[fh, fw][oy % step :: step, ox % step :: step])
            return phases[key][oy // step : oy // step + ny, ox // step : ox // step + nx]

        alive = np.ones((ny, nx), bool)
        ge = np.empty((ny, nx), bool)
        bit = np.empty((ny, nx), np.uint8)
        for dy, dx, table, threshold in self.stages[:DENSE_STAGES]:
            score = np.zeros((ny, nx), np.float32)
            for k in range(len(dy)):
                fh, fw = int(dy[k, 4] - dy[k, 0]), int(dx[k, 1] - dx[k, 0])
                blocks = [grid(fh, fw, int(oy), int(ox)) for oy, ox in zip(dy[k, _BLOCK_CORNERS], dx[k, _BLOCK_CORNERS])]
                code = np.zeros((ny, nx), np.uint8)
                for b, weight in _LBP_BITS:
                    np.greater_equal(blocks[b], blocks[4], out=ge)
                    np.left_shift(ge.view(np.uint8), weight.bit_length() - 1, out=bit)
                    code |= bit
                score += table[k][code]  # (indexing by uint8 is twice as fast as np.take here)
            alive &= score >= threshold
        ys, xs = np.nonzero(alive)
        stride = w + 1
        base = (ys * step * stride + xs * step).astype(np.int32)  # each window's top-left in the flat integral
        flat = cv2.integral(gray).ravel()  # int32: at most 640 x 640 x 255
        for dy, dx, table, threshold in self.stages[DENSE_STAGES:]:
            if not len(base):
                break
            k = len(dy)
            corners = np.take(flat, (dy.T * stride + dx.T).astype(np.int32)[:, :, None] + base).reshape(4, 4, k, len(base))
            across = corners[:, 1:] - corners[:, :-1]
            blocks = (across[1:] - across[:-1]).reshape(9, k, len(base))  # 3 x 3 blocks, row-major
            bits = (blocks >= blocks[4]).view(np.uint8)
            bits *= _LBP_WEIGHTS[:, None, None]
            code = bits.sum(0, dtype=np.int32) + (np.arange(k, dtype=np.int32) * 256)[:, None]
            base = base[np.take(table, code).sum(0) >= threshold]
        return np.stack([base % stride, base // stride], 1)

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


class PendingFaces:
    """The face maps of a batch while its faces are being detected, one task per image in `pool`
    (numpy and OpenCV release the GIL, so images are searched in parallel); `result()` waits.
    Without a pool the faces are detected here and now."""

    def __init__(self, pool: Executor | None, images: Sequence[np.ndarray], size: tuple[int, int]) -> None:
        self._boxes = [pool.submit(detect_faces, im) if pool is not None else detect_faces(im) for im in images]
        self._size, self._aspects = size, [im.shape[1] / im.shape[0] for im in images]

    def result(self) -> torch.Tensor:
        boxes = [b.result() if isinstance(b, Future) else b for b in self._boxes]
        return face_maps(boxes, self._size, self._aspects)


def image_faces(images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """`face_maps` of original H x W x 3 uint8 images on the (h, w) model grid (detection included)."""
    return PendingFaces(None, images, size).result()
