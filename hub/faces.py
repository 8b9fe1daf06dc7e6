"""Face prior: frontal faces found by a classic detector raise the predicted map where they are.

Faces draw gaze whatever the task (Cerf et al. 2008; Judd et al. 2009 add a Viola-Jones face
channel for the same reason). An encoder trained from random weights on a few hundred scene
photos never learns what a face is, so the model's maps miss the faces every observer looks at
in photos of people. The prior adds that knowledge without training data: OpenCV's LBP
frontal-face cascade (`lbpcascade_frontalface`, the file scikit-image ships; no download) runs on
the original image with OpenCV's own `CascadeClassifier.detectMultiScale`, each face becomes a
Gaussian the size of the face, and the map is multiplied by (1 + weight x face map)
(`SaliencyConfig.face_prior`). Multiplying, not adding, keeps a face that the network finds plain
(e.g. a poster face in a corner) no hotter than the network's map allows times (1 + weight).

OpenCV's detector is native code that releases the GIL, so images are searched in parallel by
threads (`PendingFaces`): one search costs about 50 ms of one core at 640 px, and on a GPU machine
the searches of a batch keep pace with the network only when they run on several cores at once.
OpenCV 5 dropped the cascade classifier, hence OpenCV 4 (`opencv-python-headless<5`).

Boxes are fractions of the image's width and height, so one detection serves any model size.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Executor, Future

import cv2
import numpy as np
import torch

# The detector runs on the image with its longer side at most this long, so faces of 24 px and
# more there (1/27 of the frame; the cascade's window) are found whatever the photo's resolution.
FACE_SIDE = 640
SCALE_FACTOR = 1.1  # between pyramid levels (OpenCV's default)
MIN_NEIGHBOURS = 3  # raw detections a face needs (OpenCV's default); fewer gives false faces on textures
# A face's Gaussian: sigma = (longer side of its box) / FACE_SIGMA_DIV, so about the face itself.
FACE_SIGMA_DIV = 2.5

# One classifier per thread: detectMultiScale keeps its working buffers in the object, so two
# threads must not search with the same one at once.
_local = threading.local()


def _detector() -> cv2.CascadeClassifier:
    """This thread's LBP frontal-face cascade, loaded on first use."""
    found = getattr(_local, "cascade", None)
    if found is not None:
        return found
    if not hasattr(cv2, "CascadeClassifier"):
        raise ImportError(f"the face prior needs OpenCV 4's cascade classifier, which OpenCV {cv2.__version__} does not have: "
                          "pip install 'opencv-python-headless>=4.14,<5'")  # fmt: skip
    try:
        from skimage import data as skdata
    except ImportError as err:  # pragma: no cover - scikit-image is a core dependency
        raise ImportError("this model's face prior needs scikit-image (it ships the cascade): pip install scikit-image") from err
    # scikit-image's copy of the file misspells one tag (<featuhreParams>), which makes OpenCV's
    # loader reject the whole file; it is read from memory with the tag mended.
    with open(skdata.lbp_frontal_face_cascade_filename(), encoding="utf-8") as f:
        text = f.read().replace("featuhreParams>", "featureParams>")
    storage = cv2.FileStorage(text, cv2.FILE_STORAGE_READ | cv2.FILE_STORAGE_MEMORY)
    cascade = cv2.CascadeClassifier()
    if not cascade.read(storage.getFirstTopLevelNode()):
        raise RuntimeError(f"OpenCV {cv2.__version__} could not read the face cascade {skdata.lbp_frontal_face_cascade_filename()}")
    _local.cascade = cascade
    return cascade


def detect_faces(image: np.ndarray) -> np.ndarray:
    """Frontal faces in an H x W x 3 uint8 RGB image: N x 4 float32 boxes (x0, y0, x1, y1) as
    fractions of the image's width and height, in [0, 1]. N may be 0."""
    cascade = _detector()
    h, w = image.shape[:2]
    scale = min(1.0, FACE_SIDE / max(h, w))
    small = image
    if scale < 1.0:
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2GRAY)
    faces = np.asarray(cascade.detectMultiScale(gray, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBOURS), np.float64)
    faces = faces.reshape(-1, 4)
    sh, sw = gray.shape
    boxes = np.stack([faces[:, 0] / sw, faces[:, 1] / sh, (faces[:, 0] + faces[:, 2]) / sw, (faces[:, 1] + faces[:, 3]) / sh], 1)
    return np.clip(boxes, 0.0, 1.0).astype(np.float32).reshape(-1, 4)


def search_threads(device: torch.device, cores: int) -> int:
    """Threads that search a batch's images for faces, one image each, beside the network on `device`:
    half the cores beside a network on the CPU (it has the rest), all but one beside a GPU, where
    the searches must keep pace with it; at most 16."""
    return max(1, min(16, cores - 1 if device.type == "cuda" else cores // 2))


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
    (OpenCV releases the GIL, so images are searched in parallel); `result()` waits.
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
