"""MTCNN, a small three-stage convolutional face detector (Zhang et al. 2016), for the face prior.

Three tiny networks search the photo in turn: P-Net slides a 12 px window over an image pyramid
and proposes faces, R-Net (24 px crops) and O-Net (48 px crops) reject and refine them. It was
trained on WIDER FACE, which is full of crowds, small faces and faces turned away, so it finds
the faces in eyecrowd's crowds that OpenCV's frontal and profile cascades miss, at a seventh of
their cost (README, "What transfers"). About 0.5 M parameters in all.

The weights (`mtcnn.safetensors`, 1.9 MB, shipped with this package; MIT licence, see
`MTCNN_LICENSE`) are the original authors' networks as converted to PyTorch by the
facenet-pytorch project (its wheel's `facenet_pytorch/data/{pnet,rnet,onet}.pt`), re-saved by
`convert` with the dense layers' inputs reordered to PyTorch's own flattening order.

`detect` runs in fp32 (the thresholds were set for it) on the device it is given: `predict()`
passes the model's when it is a CUDA GPU, so there the networks run on the GPU beside the
saliency network (each detection on a CUDA stream of its own) rather than in CPU threads that
would each start a team of torch's CPU threads; anywhere else on the CPU.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import nms

WEIGHTS = Path(__file__).with_name("mtcnn.safetensors")
MIN_FACE = 20  # px in the searched image: P-Net's 12 px window at the first pyramid level
FACTOR = 0.709  # between pyramid levels (the authors' value: half the area)
THRESHOLDS = (0.6, 0.7, 0.7)  # face probability each stage needs (the authors' values)

# The three networks' tensors by device, read from WEIGHTS on first use (a lazily filled cache, as
# hub.runtime's inference engines).
_weights: dict[torch.device, dict[str, torch.Tensor]] = {}
_weights_lock = threading.Lock()


def weights(device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The three networks' tensors ("pnet.conv1.weight", ...) on `device`, read from `WEIGHTS` on first use."""
    device = torch.device(device)
    with _weights_lock:
        if device not in _weights:
            from safetensors.torch import load_file

            if not WEIGHTS.is_file():
                raise FileNotFoundError(f"the MTCNN face detector's weights {WEIGHTS} are missing: reinstall saliency-unet (pip install --force-reinstall).")
            _weights[device] = load_file(str(WEIGHTS), device=str(device))
            if device.type == "cuda":  # copied on this thread's stream; detections read them on their own
                torch.cuda.synchronize(device)
        return _weights[device]


def convert(data_dir: str | Path, out: str | Path = WEIGHTS) -> None:
    """Write `out` from facenet-pytorch's pnet.pt, rnet.pt and onet.pt in `data_dir` (their dense
    layers read the last conv's output flattened as W x H x C; here PyTorch's C x H x W)."""
    from safetensors.torch import save_file

    tensors = {}
    for net, dense, side, channels in (("pnet", None, 0, 0), ("rnet", "dense4", 3, 64), ("onet", "dense5", 3, 128)):
        state = torch.load(Path(data_dir) / f"{net}.pt", map_location="cpu", weights_only=True)
        for key, value in state.items():
            if key == f"{dense}.weight":
                value = value.reshape(len(value), side, side, channels).permute(0, 3, 2, 1).reshape(len(value), -1)
            tensors[f"{net}.{key}"] = value.float().contiguous()
    save_file(tensors, str(out))


def _conv(x: torch.Tensor, w: dict[str, torch.Tensor], net: str, i: int | str) -> torch.Tensor:
    return F.prelu(F.conv2d(x, w[f"{net}.conv{i}.weight"], w[f"{net}.conv{i}.bias"]), w[f"{net}.prelu{i}.weight"])


def _dense(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])


def pnet(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x 3 x h x w normalised image -> face probability (h' x w') and box offsets (4 x h' x w') of
    each 12 px window, windows every 2 px."""
    w = weights(x.device)
    x = F.max_pool2d(_conv(x, w, "pnet", 1), 2, 2, ceil_mode=True)
    x = _conv(_conv(x, w, "pnet", 2), w, "pnet", 3)
    logits = F.conv2d(x, w["pnet.conv4_1.weight"], w["pnet.conv4_1.bias"])
    return torch.softmax(logits, 1)[0, 1], F.conv2d(x, w["pnet.conv4_2.weight"], w["pnet.conv4_2.bias"])[0]


def rnet(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K x 3 x 24 x 24 crops -> face probability (K) and box offsets (K x 4)."""
    w = weights(x.device)
    x = F.max_pool2d(_conv(x, w, "rnet", 1), 3, 2, ceil_mode=True)
    x = F.max_pool2d(_conv(x, w, "rnet", 2), 3, 2, ceil_mode=True)
    x = F.prelu(_dense(_conv(x, w, "rnet", 3).flatten(1), w, "rnet.dense4"), w["rnet.prelu4.weight"])
    return torch.softmax(_dense(x, w, "rnet.dense5_1"), 1)[:, 1], _dense(x, w, "rnet.dense5_2")


def onet(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K x 3 x 48 x 48 crops -> face probability (K) and box offsets (K x 4)."""
    w = weights(x.device)
    x = F.max_pool2d(_conv(x, w, "onet", 1), 3, 2, ceil_mode=True)
    x = F.max_pool2d(_conv(x, w, "onet", 2), 3, 2, ceil_mode=True)
    x = F.max_pool2d(_conv(x, w, "onet", 3), 2, 2, ceil_mode=True)
    x = F.prelu(_dense(_conv(x, w, "onet", 4).flatten(1), w, "onet.dense5"), w["onet.prelu5.weight"])
    return torch.softmax(_dense(x, w, "onet.dense6_1"), 1)[:, 1], _dense(x, w, "onet.dense6_2")


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Pixels (0..255) as the networks take them, channels last (oneDNN's fast layout: max pooling
    is about 5x faster in it than in NCHW)."""
    return ((x - 127.5) * 0.0078125).contiguous(memory_format=torch.channels_last)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor, inclusive: bool = True) -> torch.Tensor:
    """Boxes (K x 4, x0 y0 x1 y1 px) moved by the networks' offsets (fractions of their size; the
    size counts both corner pixels, except for P-Net's windows, as the authors' code does)."""
    size = (boxes[:, 2:] - boxes[:, :2] + float(inclusive)).repeat(1, 2)
    return boxes + offsets * size


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Each box as the square of its longer side about the same centre, corners on whole pixels."""
    side = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True)
    x0 = (boxes[:, :2] + boxes[:, 2:]) / 2 - side / 2
    return torch.cat([x0, x0 + side], 1).trunc()


def _crops(image: np.ndarray, boxes: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """The boxes' pixels (x0-1 .. x1 - 1 and y0-1 .. y1 - 1: the authors' 1-based corners; zero
    outside the image), each area-resized to size x size as the authors' code does, normalised, on `device`."""
    h, w = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        x0, y0 = x0 - 1, y0 - 1
        if x1 <= x0 or y1 <= y0:
            continue
        patch = image[max(y0, 0) : max(min(y1, h), 0), max(x0, 0) : max(min(x1, w), 0)]
        if patch.shape[:2] != (y1 - y0, x1 - x0):  # the box reaches over the image's edge
            canvas = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
            top, left = max(-y0, 0), max(-x0, 0)
            canvas[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
            patch = canvas
        out[i] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return _normalise(torch.from_numpy(out).to(device).permute(0, 3, 1, 2).float())


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices kept by non-maximum suppression on intersection over the smaller box's area (areas in
    continuous pixels, as torchvision's `nms` measures them; the authors' code adds 1 px to each
    side, which moves the overlap of two 30 px faces by about 1 %)."""
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    area = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0).prod(1)
    lo = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    hi = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    overlap = (hi - lo).clamp_min(0).prod(2) / torch.minimum(area[:, None], area[None, :]).clamp_min(1e-6)
    keep = torch.ones(len(boxes), dtype=torch.bool)
    for i in range(len(boxes)):
        if keep[i]:
            keep[i + 1 :] &= overlap[i, i + 1 :] <= threshold
    return order[keep]


def detect(image: np.ndarray, min_face: int = MIN_FACE, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Faces in an H x W x 3 uint8 RGB image: N x 4 float32 boxes (x0, y0, x1, y1 in pixels) and
    their N probabilities. Faces smaller than `min_face` px are not looked for. The networks run
    on `device` in fp32 whatever autocast the caller has on (a CUDA device: on a stream of this
    call's own, so that threads detecting beside a forward pass do not wait for it); crops and
    the last suppression run on the CPU."""
    device = torch.device(device)
    stream = torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), torch.autocast(device.type, enabled=False), stream:
        return _detect(image, min_face, device)


def _passed(threshold: float, prob: torch.Tensor, *rest: torch.Tensor) -> list[torch.Tensor]:
    """prob and the rows of the tensors in `rest` where prob reaches `threshold`."""
    keep = (prob >= threshold).nonzero()[:, 0]
    return [t[keep] for t in (prob, *rest)]


def _detect(image: np.ndarray, min_face: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    scale = 12.0 / min_face
    found = []
    while min(h, w) * scale >= 12:
        level = cv2.resize(image, (int(w * scale + 1), int(h * scale + 1)), interpolation=cv2.INTER_AREA)
        prob, offsets = pnet(_normalise(torch.from_numpy(level).to(device).permute(2, 0, 1)[None].float()))
        ys, xs = torch.nonzero(prob >= THRESHOLDS[0], as_tuple=True)
        if len(ys):
            corner = torch.stack([xs, ys], 1).float() * 2
            boxes = torch.cat([((corner + 1) / scale).floor(), ((corner + 12) / scale).floor()], 1)
            score, offset = prob[ys, xs], offsets[:, ys, xs].T
            keep = nms(boxes, score, 0.5)
            found.append((boxes[keep], score[keep], offset[keep]))
        scale *= FACTOR
    if not found:
        return empty
    boxes, score, offset = (torch.cat(t) for t in zip(*found))
    keep = nms(boxes, score, 0.7)
    boxes = _square(_regress(boxes[keep], offset[keep], inclusive=False))

    prob, offset = rnet(_crops(image, boxes, 24, device))
    prob, boxes, offset = _passed(THRESHOLDS[1], prob, boxes, offset)
    if not len(boxes):
        return empty
    keep = nms(boxes, prob, 0.7)
    boxes = _square(_regress(boxes[keep], offset[keep]))

    prob, offset = onet(_crops(image, boxes, 48, device))
    prob, boxes, offset = _passed(THRESHOLDS[2], prob, boxes, offset)
    if not len(boxes):
        return empty
    boxes, prob = _regress(boxes, offset).cpu(), prob.cpu()
    keep = _nms_min(boxes, prob, 0.7)
    return boxes[keep].numpy().astype(np.float32), prob[keep].numpy().astype(np.float32)
