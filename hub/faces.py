"""Face prior: faces found by a face detector raise the predicted map where they are.

Faces draw gaze whatever the task (Cerf et al. 2008; Judd et al. 2009 add a Viola-Jones face
channel for the same reason). An encoder trained from random weights on a few hundred scene
photos never learns what a face is, so the model's maps miss the faces every observer looks at
in photos of people. The prior adds that knowledge without training data, from a detector that
ships with the package (no download), run on the original image:

- "mtcnn" (what training writes): MTCNN (`hub.mtcnn`), three tiny CNNs trained on WIDER FACE's
  crowds, run by torch (on the model's GPU beside a CUDA network, else on the CPU), the photo's
  longer side at `MTCNN_SIDE`;
- "frontal": OpenCV's LBP frontal-face cascade (`lbpcascade_frontalface`, the file scikit-image
  ships), with OpenCV's own `CascadeClassifier.detectMultiScale`;
- "frontal+profile": that and OpenCV's Haar profile-face cascade (`haarcascade_profileface`,
  shipped with OpenCV), run on the image and on its mirror image, since it finds faces turned
  one way.

Each face becomes a Gaussian the size of the face, and the map is multiplied by
(1 + weight x face map) (`SaliencyConfig.face_prior`, `SaliencyConfig.face_detector`).
Multiplying, not adding, keeps a face that the network finds plain (e.g. a poster face in a
corner) no hotter than the network's map allows times (1 + weight).

On a CPU the photos are searched before the network runs, since both use every core; beside a
GPU, threads search them while it runs (`PendingFaces`, `search_threads`): OpenCV's detector and
torch's operators are native code that release the GIL. On eyecrowd's photos (2-core AVX512 EPYC, one
photo at a time) MTCNN at 480 px takes about 19 ms, the frontal cascade at 640 px about 22 ms
and the two profile searches about 114 ms more (`python -m bench.faces --limit 16`). OpenCV 5 dropped the
cascade classifier, hence OpenCV 4 (`opencv-python-headless<5`).

Boxes are fractions of the image's width and height, so one detection serves any model size.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future

import cv2
import numpy as np
import torch

from hub.config import FACE_DETECTORS
from hub.preprocess import load_image

# The detector runs on the image with its longer side at most this long, so faces of 24 px and
# more there (1/27 of the frame; the cascade's window) are found whatever the photo's resolution.
FACE_SIDE = 640
SCALE_FACTOR = 1.1  # between pyramid levels (OpenCV's default)
MIN_NEIGHBOURS = 3  # raw detections a face needs (OpenCV's default); fewer gives false faces on textures
# The profile search (Haar, several times the LBP cascade's cost) runs on a smaller image with a
# coarser pyramid: the cheapest of the settings tried that kept nearly all its gain (README).
PROFILE_SIDE = 480
PROFILE_SCALE_FACTOR = 1.15
# MTCNN searches the photo with its longer side at most this long, for faces of MTCNN_MIN_FACE px
# and more (1/16 of the frame): of the sizes tried on eyecrowd's odd ids, the cheapest that kept
# nearly all the gain of a search at 640 px down to 20 px faces, at a third of its cost (README).
MTCNN_SIDE = 480
MTCNN_MIN_FACE = 30
# A face's Gaussian: sigma = (longer side of its box) / FACE_SIGMA_DIV, so about the face itself.
FACE_SIGMA_DIV = 2.5

# Loaded classifiers not in use, by cascade: detectMultiScale keeps its working buffers in the
# object, so two threads must not search with the same one at once, and loading one costs about
# as much as a small search (predict() starts new threads on every call).
_idle: dict[str, list[cv2.CascadeClassifier]] = {}
_idle_lock = threading.Lock()


def _load(name: str) -> cv2.CascadeClassifier:
    if not hasattr(cv2, "CascadeClassifier"):
        raise ImportError(f"the face prior needs OpenCV 4's cascade classifier, which OpenCV {cv2.__version__} does not have: "
                          "pip install 'opencv-python-headless>=4.14,<5'")  # fmt: skip
    cascade = cv2.CascadeClassifier()
    if name == "profile":
        path = os.path.join(cv2.data.haarcascades, "haarcascade_profileface.xml")
        ok = cascade.load(path)
    else:
        try:
            from skimage import data as skdata
        except ImportError as err:  # pragma: no cover - scikit-image is a core dependency
            raise ImportError("this model's face prior needs scikit-image (it ships the cascade): pip install scikit-image") from err
        # scikit-image's copy of the file misspells one tag (<featuhreParams>), which makes OpenCV's
        # loader reject the whole file; it is read from memory with the tag mended.
        path = skdata.lbp_frontal_face_cascade_filename()
        with open(path, encoding="utf-8") as f:
            text = f.read().replace("featuhreParams>", "featureParams>")
        storage = cv2.FileStorage(text, cv2.FILE_STORAGE_READ | cv2.FILE_STORAGE_MEMORY)
        ok = cascade.read(storage.getFirstTopLevelNode())
    if not ok:
        raise RuntimeError(f"OpenCV {cv2.__version__} could not read the face cascade {path}; reinstall opencv-python-headless and scikit-image.")
    return cascade


@contextlib.contextmanager
def _detector(name: str) -> Iterator[cv2.CascadeClassifier]:
    """A classifier of cascade `name` ("frontal": LBP frontal faces; "profile": Haar profile
    faces) for this thread alone while the block runs: an idle one, or a new one."""
    with _idle_lock:
        idle = _idle.setdefault(name, [])
        cascade = idle.pop() if idle else None
    if cascade is None:
        cascade = _load(name)
    try:
        yield cascade
    finally:
        with _idle_lock:
            _idle[name].append(cascade)


def _shrink(image: np.ndarray, side: int) -> np.ndarray:
    """The image with its longer side at most `side` pixels (area-averaged), contiguous."""
    h, w = image.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def _gray(image: np.ndarray, side: int) -> np.ndarray:
    """The RGB image in grey, its longer side at most `side` pixels (area-averaged)."""
    return cv2.cvtColor(_shrink(image, side), cv2.COLOR_RGB2GRAY)


def _mtcnn(image: np.ndarray, device: torch.device | str) -> np.ndarray:
    """Boxes (N x 4 float64, fractions of the image) of the faces MTCNN finds in an RGB image, on
    `device` if it is a CUDA GPU, else on the CPU (torchvision's box operators, which MTCNN needs,
    are not on every accelerator)."""
    from hub import mtcnn

    small = _shrink(image, MTCNN_SIDE)
    found, _ = mtcnn.detect(small, MTCNN_MIN_FACE, device if torch.device(device).type == "cuda" else "cpu")
    sh, sw = small.shape[:2]
    return found.astype(np.float64) / [sw, sh, sw, sh]


def _search(name: str, gray: np.ndarray, scale_factor: float, mirror: bool = False) -> np.ndarray:
    """Boxes (N x 4 float64: x0, y0, x1, y1 as fractions of the image) that cascade `name` finds
    in a grey image (in its mirror image, mapped back, with `mirror`)."""
    searched = np.ascontiguousarray(gray[:, ::-1]) if mirror else gray
    with _detector(name) as cascade:
        found = np.asarray(cascade.detectMultiScale(searched, scaleFactor=scale_factor, minNeighbors=MIN_NEIGHBOURS), np.float64)
    x, y, bw, bh = found.reshape(-1, 4).T
    sh, sw = gray.shape
    x0 = (sw - x - bw) if mirror else x
    return np.stack([x0 / sw, y / sh, (x0 + bw) / sw, (y + bh) / sh], 1)


def detect_faces(image: np.ndarray, detector: str, device: torch.device | str = "cpu") -> np.ndarray:
    """Faces in an H x W x 3 uint8 RGB image: N x 4 float32 boxes (x0, y0, x1, y1) as fractions
    of the image's width and height, in [0, 1]. N may be 0. detector: a key of `FACE_DETECTORS`,
    "mtcnn" (`hub.mtcnn`), "frontal" (the LBP frontal-face cascade) or "frontal+profile" (and the
    Haar profile-face cascade on the image and its mirror image; a face both find is there twice,
    which the maximum in `face_maps` makes harmless). device: where MTCNN's networks run (the
    cascades run on the CPU)."""
    if detector not in FACE_DETECTORS:
        raise ValueError(f"face detector {detector!r} must be one of {', '.join(FACE_DETECTORS)}.")
    image = load_image(image)  # the one way in: grey, RGBA or float arrays become H x W x 3 uint8 RGB
    if "mtcnn" in FACE_DETECTORS[detector]:
        return np.clip(_mtcnn(image, device), 0.0, 1.0).astype(np.float32).reshape(-1, 4)
    found = [_search("frontal", _gray(image, FACE_SIDE), SCALE_FACTOR)]
    if "profile" in FACE_DETECTORS[detector]:
        gray = _gray(image, PROFILE_SIDE)
        found += [_search("profile", gray, PROFILE_SCALE_FACTOR, mirror) for mirror in (False, True)]
    return np.clip(np.concatenate(found), 0.0, 1.0).astype(np.float32).reshape(-1, 4)


def search_threads(device: torch.device, cores: int) -> int:
    """Threads that search a batch's images for faces, one image each, beside the network on `device`.

    None beside a network on the CPU: the searches run first, in the calling thread, because the
    network and the detectors each use every core (MTCNN beside a bf16 network on a 2-core EPYC:
    52 ms per crowd photo in a thread of its own, 42 ms one after the other). All but one core
    beside a GPU, where the searches overlap the forward pass; at most 16.
    """
    return max(1, min(16, cores - 1)) if device.type == "cuda" else 0


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
    (OpenCV and torch release the GIL, so images are searched in parallel); `result()` waits.
    Without a pool the faces are detected here and now. device: where MTCNN runs (`detect_faces`)."""

    def __init__(
        self, pool: Executor | None, images: Sequence[np.ndarray], size: tuple[int, int], detector: str, device: torch.device | str = "cpu"
    ) -> None:
        self._boxes = [pool.submit(detect_faces, im, detector, device) if pool is not None else detect_faces(im, detector, device)
                       for im in images]  # fmt: skip
        self._size, self._aspects = size, [im.shape[1] / im.shape[0] for im in images]

    def result(self) -> torch.Tensor:
        boxes = [b.result() if isinstance(b, Future) else b for b in self._boxes]
        return face_maps(boxes, self._size, self._aspects)


def image_faces(images: Sequence[np.ndarray], size: tuple[int, int], detector: str) -> torch.Tensor:
    """`face_maps` of original H x W x 3 uint8 images on the (h, w) model grid (detection by `detector` included)."""
    return PendingFaces(None, images, size, detector).result()
