"""Eye-tracking datasets: discovery, validation, splits, joint augmentation.

Layouts read (ids are file stems):

    DIR/images/<id>.jpg  DIR/maps/<id>.png  [DIR/fixations/<id>.png]  [DIR/fixations.csv]
    DIR/train/...  DIR/val/...                       (the same layout per split)
    DIR/images/{train,val}/*.jpg  DIR/maps/{train,val}/*.png  DIR/fixations/{train,val}/*.mat
                                                     (the SALICON release, LSUN 2017)

Images go through `hub.preprocess` (the model's own path); only the augmentation is here.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from hub.preprocess import image_to_tensor, load_image, model_input_size, resize_image, resize_map
from hub.publish import atomic_write_text

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAP_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# An (N, 2) array of (x, y) 0-based points with the (H, W) of the image they were recorded on.
PointsWithShape = tuple[np.ndarray, tuple[int, int]]


class DataError(ValueError):
    """The dataset cannot be used as it is; the message lists every bad item."""


@dataclass
class Sample:
    """One stimulus. `points` are (N, 2) 0-based (x, y) fixations when they come from a CSV or .mat."""

    id: str
    image: Path
    map: Path | None = None
    fixation_map: Path | None = None
    points: np.ndarray | None = field(default=None, repr=False)
    fixation_mat: Path | None = None

    @property
    def has_fixations(self) -> bool:
        return self.fixation_map is not None or self.points is not None or self.fixation_mat is not None


# -- reading ---------------------------------------------------------------------------------------
def read_map(path: Path) -> np.ndarray:
    """A density map of any bit depth -> H x W float32 in [0, 1] (colour maps are averaged)."""
    return _unpack_map(*_read_map_stored(path))


def _read_map_stored(path: Path) -> tuple[np.ndarray, float]:
    """(H x W grey array as stored, its full-scale value): uint8/uint16 maps stay integers (compact)."""
    with Image.open(path) as img:
        arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[:, :, :3].mean(axis=2)
    top = 65535.0 if arr.dtype == np.uint16 else 255.0 if arr.dtype == np.uint8 else max(float(arr.max()), 1.0)
    return arr, top


def _unpack_map(arr: np.ndarray, top: float) -> np.ndarray:
    return (arr.astype(np.float32) / top).clip(0.0, 1.0)


def read_salicon_mat(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """Fixations of a SALICON `.mat`: (N, 2) 0-based (x, y) pooled over subjects, and (H, W).

    The release stores `resolution` = [H, W] and a struct array `gaze` with one entry per
    subject whose `fixations` field holds 1-based [x, y] rows (column, row in MATLAB).
    """
    from scipy.io import loadmat

    mat = loadmat(str(path), simplify_cells=True)
    height, width = (int(v) for v in np.ravel(mat["resolution"])[:2])
    gaze = mat["gaze"]
    subjects = gaze if isinstance(gaze, (list, np.ndarray)) else [gaze]
    points = [np.asarray(s["fixations"], dtype=np.float64).reshape(-1, 2) for s in subjects]
    pts = np.concatenate(points) if points else np.zeros((0, 2))
    return pts - 1.0, (height, width)


def read_fixations(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """Binary H x W fixation map of `sample` on a grid of `shape` (bool)."""
    if sample.fixation_map is not None:
        with Image.open(sample.fixation_map) as img:
            arr = np.asarray(img)
        fixated = (arr[:, :, 0] if arr.ndim == 3 else arr) > 0
        if fixated.shape == tuple(shape):
            return fixated
        rows, cols = np.nonzero(fixated)
        return fixation_map_from_points(np.stack([cols, rows], 1), shape, fixated.shape)
    if sample.fixation_mat is not None:
        pts, source = read_salicon_mat(sample.fixation_mat)
        return fixation_map_from_points(pts, shape, source)
    if sample.points is not None:
        return fixation_map_from_points(sample.points, shape, image_size(sample.image))
    raise ValueError(f"{sample.id} has no fixations.")


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header, without decoding."""
    with Image.open(path) as img:
        return img.height, img.width


def fixations_from_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Read fixations from a ``fixations.csv`` with columns ``id, subject, x, y, ...``.

    ``x`` and ``y`` in the file are 1-based sub-pixel coordinates (MATLAB convention); they
    are returned 0-based, so pixel (row r, column c) covers x in [c - 0.5, c + 0.5). Image
    sizes are not in the file; pass them alongside (see :func:`image_sizes`) to normalise.

    Args:
        path: the CSV file.

    Returns:
        {image id (string, leading zeros kept): (N, 2) float64 array of (x, y)}, all
        observers pooled, in file order.
    """
    path = Path(path)
    points: dict[str, list[tuple[float, float]]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"id", "x", "y"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the column(s) {sorted(missing)}; expected id,x,y.")
        for line_no, row in enumerate(reader, start=2):
            try:
                xy = (float(row["x"]) - 1.0, float(row["y"]) - 1.0)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}, line {line_no}: x/y are not numbers ({row['x']!r}, {row['y']!r})."
                ) from None
            points.setdefault(row["id"], []).append(xy)
    return {k: np.asarray(v, dtype=np.float64).reshape(-1, 2) for k, v in points.items()}


def fixation_map_from_points(
    points: np.ndarray,
    shape: tuple[int, int],
    source_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Binary fixation map from (x, y) points, optionally rescaled from another image size.

    A point at 0-based (x, y) on a (h0, w0) image has normalised position
    ((x + 0.5) / w0, (y + 0.5) / h0) in [0, 1); it lands on column floor(u * W) and row
    floor(v * H) of the target, clamped to the grid. With ``source_shape`` = ``shape`` this is
    round-half-up, the ``clamp(round(x), 1, W) - 1`` rule of the benchmark's MATLAB code.
    Points are moved, never interpolated, so none is lost or smeared (several may merge into
    one pixel when shrinking).

    Args:
        points: (N, 2) array of (x, y) in 0-based pixels of the source image.
        shape: target (H, W).
        source_shape: (h0, w0) the points refer to; defaults to ``shape``.

    Returns:
        (H, W) bool map, True at fixated pixels.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must be an (N, 2) array of (x, y), got shape {pts.shape}.")
    h, w = int(shape[0]), int(shape[1])
    h0, w0 = (h, w) if source_shape is None else (int(source_shape[0]), int(source_shape[1]))
    if min(h, w, h0, w0) < 1:
        raise ValueError(f"shapes must be positive, got shape={shape}, source={source_shape}.")
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN or infinite coordinates.")
    cols = np.clip(np.floor((pts[:, 0] + 0.5) * (w / w0)), 0, w - 1).astype(np.intp)
    rows = np.clip(np.floor((pts[:, 1] + 0.5) * (h / h0)), 0, h - 1).astype(np.intp)
    out = np.zeros((h, w), dtype=bool)
    out[rows, cols] = True
    return out


def other_fixation_map(
    others: Iterable[np.ndarray | PointsWithShape],
    shape: tuple[int, int],
    rng: np.random.Generator | int | None = None,
    max_images: int | None = None,
) -> np.ndarray:
    """Union of other images' fixations on this image's grid, the negatives of :func:`train.metrics.sauc`.

    Each item of ``others`` is either a binary (h_i, w_i) fixation map (pixels > 0 are
    fixations) or a tuple ``(points, (h_i, w_i))`` with (N, 2) (x, y) 0-based points, e.g.
    from :func:`fixations_from_csv`. Each fixation is mapped by its normalised position onto
    the (H, W) grid (see :func:`fixation_map_from_points`); binary maps are never
    interpolated. Images of any size can be mixed.

    Args:
        others: fixations of the *other* images (exclude the image being scored).
        shape: (H, W) of the image being scored.
        rng: numpy Generator or seed, used only to pick ``max_images``.
        max_images: if set, use a random subset of this many images (Borji et al. use 10).

    Returns:
        (H, W) bool map.
    """
    items = list(others)
    if not items:
        raise ValueError("others is empty; sAUC needs fixations from at least one other image.")
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}.")
        if len(items) > max_images:
            pick = np.random.default_rng(rng).choice(len(items), max_images, replace=False)
            items = [items[i] for i in sorted(pick)]
    out = np.zeros((int(shape[0]), int(shape[1])), dtype=bool)
    for item in items:
        if isinstance(item, tuple):
            pts, src_shape = item
        else:
            fmap = np.asarray(item)
            if fmap.ndim != 2:
                raise ValueError(f"a fixation map in others is not 2-D (shape {fmap.shape}).")
            rows, cols = np.nonzero(fmap > 0)
            pts, src_shape = np.stack([cols, rows], axis=1), fmap.shape
        out |= fixation_map_from_points(pts, shape, src_shape)
    return out


def image_sizes(
    image_dir: str | Path, ids: Iterable[str], suffix: str = ".png"
) -> dict[str, tuple[int, int]]:
    """(H, W) of ``image_dir/<id><suffix>`` for each id, read from the headers only.

    Useful with :func:`fixations_from_csv` to build ``(points, (H, W))`` items for
    :func:`other_fixation_map`.
    """
    sizes: dict[str, tuple[int, int]] = {}
    for i in ids:
        with Image.open(Path(image_dir) / f"{i}{suffix}") as im:
            sizes[i] = (im.height, im.width)
    return sizes


class GroundTruth:
    """The evaluation ground truth of a list of samples, read and rasterised once.

    For each sample at its original (H, W): the density map (kept as stored, 8- or 16-bit, so
    SALICON's 5,000 validation maps hold 1.5 GB, not 6), the fixated pixels as sorted flat
    indices into H*W, and on first use the sAUC negatives (other images' fixations on this
    grid). Maps are read on first use of an index or by `load`, then never again: validation
    reads each file once per run, however many epochs score it.
    """

    def __init__(self, samples: Sequence[Sample], seed: int = 0, other_images: int = 10, workers: int = 4) -> None:
        self.samples = list(samples)
        self.seed, self.other_images, self.workers = seed, other_images, workers
        self.sizes = [image_size(s.image) for s in self.samples]
        # (x, y) of fixated pixels with their grid: the sAUC negatives of the other images.
        self.points: list[PointsWithShape | None] = []
        self.fixations: list[np.ndarray | None] = []
        for sample, size in zip(self.samples, self.sizes):
            if sample.has_fixations:
                flat = np.flatnonzero(read_fixations(sample, size))
                rows, cols = np.divmod(flat, size[1])
                self.points.append((np.stack([cols, rows], 1), size))
                self.fixations.append(flat)
            else:
                self.points.append(None)
                self.fixations.append(None)
        self._maps: dict[int, tuple[np.ndarray, float]] = {}
        self._others: dict[int, np.ndarray | None] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, indices: Iterable[int] | None = None) -> None:
        """Read the density maps of `indices` (default: all) that are not in memory yet, in threads."""
        todo = [i for i in (range(len(self)) if indices is None else indices)
                if i not in self._maps and self.samples[i].map is not None]
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:  # PNG decoding releases the GIL
            for i, stored in zip(todo, pool.map(lambda i: _read_map_stored(self.samples[i].map), todo)):
                self._maps[i] = stored

    def has_map(self, index: int) -> bool:
        return self.samples[index].map is not None

    def gt_map(self, index: int) -> np.ndarray | None:
        """(H, W) float32 density map in [0, 1], exactly as `read_map` gives it; None without a map."""
        if not self.has_map(index):
            return None
        if index not in self._maps:
            self.load([index])
        return _unpack_map(*self._maps[index])

    def fixation_mask(self, index: int) -> np.ndarray | None:
        """(H, W) bool map of fixated pixels, as `read_fixations` gives it; None without fixations."""
        return self._mask(index, self.fixations[index])

    def other_mask(self, index: int) -> np.ndarray | None:
        """(H, W) bool sAUC negatives: fixations of up to `other_images` other images (seeded by index)."""
        if index not in self._others:
            others = [p for i, p in enumerate(self.points) if i != index and p is not None]
            flat = None
            if others and self.fixations[index] is not None:
                grid = other_fixation_map(others, self.sizes[index], rng=self.seed + index, max_images=self.other_images)
                flat = np.flatnonzero(grid)
            self._others[index] = flat
        return self._mask(index, self._others[index])

    def _mask(self, index: int, flat: np.ndarray | None) -> np.ndarray | None:
        if flat is None:
            return None
        h, w = self.sizes[index]
        out = np.zeros(h * w, dtype=bool)
        out[flat] = True
        return out.reshape(h, w)


# -- discovery ----------------------------------------------------------------------------------
def _by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in suffixes and not p.name.startswith(".")}


def find_samples(root: Path, split: str | None = None) -> list[Sample]:
    """Samples of one folder in the plain layout, or one split of the SALICON layout."""
    root = Path(root)
    if split is not None and (root / "images" / split).is_dir():  # SALICON release
        images = _by_stem(root / "images" / split, IMAGE_SUFFIXES)
        maps = _by_stem(root / "maps" / split, MAP_SUFFIXES)
        mats = _by_stem(root / "fixations" / split, (".mat",))
        return [Sample(i, p, maps.get(i), fixation_mat=mats.get(i)) for i, p in images.items()]
    folder = root / split if split is not None else root
    images = _by_stem(folder / "images", IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{folder / 'images'} holds no images; expected images/<id>.jpg beside maps/<id>.png.")
    maps = _by_stem(folder / "maps", MAP_SUFFIXES)
    fix = _by_stem(folder / "fixations", (".png",))
    csv_points = fixations_from_csv(folder / "fixations.csv") if (folder / "fixations.csv").is_file() else {}
    return [
        Sample(i, p, maps.get(i), fix.get(i), None if i in fix else csv_points.get(i))
        for i, p in images.items()
    ]


def has_splits(root: Path) -> bool:
    root = Path(root)
    return (root / "train").is_dir() and (root / "val").is_dir() or (root / "images" / "train").is_dir()


def load_splits(
    roots: Path | Sequence[Path], out: Path, val_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[Sample]]:
    """{"train": [...], "val": [...]}: each dataset's own splits, or a seeded split kept in OUT/split.json.

    roots: one dataset folder, or several, whose splits are pooled; with several, every sample
    id is prefixed by its folder's name ("nus_scene/001"), as ids repeat across datasets.
    An existing OUT/split.json is reused, so a resumed or repeated run sees the same images.
    """
    roots = [Path(roots)] if isinstance(roots, (str, os.PathLike)) else [Path(r) for r in roots]
    if len(roots) == 1:
        return _load_splits(roots[0], Path(out), val_fraction, seed)
    names = [r.resolve().name for r in roots]
    if len(set(names)) != len(names):
        raise DataError(f"--data folders {[str(r) for r in roots]} must have distinct names; their ids are prefixed by them.")
    saved = _read_split_file(Path(out))
    pooled: dict[str, list[Sample]] = {"train": [], "val": []}
    for root, name in zip(roots, names):
        if saved is not None:
            own = {k: [i.split("/", 1)[1] for i in saved[k] if i.startswith(name + "/")] for k in ("train", "val")}
            splits = _load_splits(root, None, val_fraction, seed, saved=own)
        else:
            splits = _load_splits(root, None, val_fraction, seed)
        for key, items in splits.items():
            pooled[key] += [Sample(f"{name}/{s.id}", s.image, s.map, s.fixation_map, s.points, s.fixation_mat) for s in items]
    return pooled


def _read_split_file(out: Path | None) -> dict | None:
    split_file = out / "split.json" if out is not None else None
    return json.loads(split_file.read_text()) if split_file is not None and split_file.is_file() else None


def _load_splits(
    root: Path, out: Path | None, val_fraction: float, seed: int, saved: dict | None = None
) -> dict[str, list[Sample]]:
    if has_splits(root):
        splits = {s: find_samples(root, s) for s in ("train", "val")}
    else:
        samples = {s.id: s for s in find_samples(root)}
        # With several folders, the saved split is the pooled OUT/split.json, read by the caller.
        split_file = out / "split.json" if out is not None else "the --out folder's split.json"
        if saved is None:
            saved = _read_split_file(out)
        if saved is not None and (saved["train"] or saved["val"]):
            unknown = sorted(set(saved["train"] + saved["val"]) - set(samples))
            if unknown:
                raise DataError(
                    f"{split_file} names {len(unknown)} images not in {root} (e.g. {unknown[:3]}); "
                    "use a new --out folder or delete split.json."
                )
            splits = {k: [samples[i] for i in saved[k]] for k in ("train", "val")}
        else:
            if not 0.0 < val_fraction < 1.0:
                raise DataError(f"--val-fraction {val_fraction} must be between 0 and 1.")
            ids = sorted(samples)
            random.Random(seed).shuffle(ids)
            n_val = max(1, round(len(ids) * val_fraction))
            splits = {"train": [samples[i] for i in sorted(ids[n_val:])], "val": [samples[i] for i in sorted(ids[:n_val])]}
    for name, items in splits.items():
        if not items:
            raise DataError(f"the {name} split of {root} is empty; add images or lower --val-fraction.")
    return splits


def write_split(splits: dict[str, list[Sample]], root: Path | Sequence[Path], out: Path) -> None:
    data = str(root) if isinstance(root, (str, os.PathLike)) else [str(r) for r in root]
    payload = {"data": data[0] if isinstance(data, list) and len(data) == 1 else data, **{k: [s.id for s in v] for k, v in splits.items()}}
    atomic_write_text(Path(out) / "split.json", json.dumps(payload, indent=1))


# -- validation ---------------------------------------------------------------------------------
def check_sample(sample: Sample) -> list[str]:
    """Every problem with one sample, as short phrases (empty when it is usable)."""
    problems = []
    try:
        with Image.open(sample.image) as img:
            img.load()  # a full decode: catches truncated files
            size = (img.height, img.width)
    except Exception as err:  # noqa: BLE001 - any decoder failure means the same to the user
        return [f"{sample.image}: unreadable image ({err})"]
    if sample.map is None:
        problems.append(f"{sample.id}: missing map (expected maps/{sample.id}.png)")
    else:
        try:
            gt = read_map(sample.map)
            if gt.shape != size:
                problems.append(f"{sample.map}: map is {gt.shape[1]}x{gt.shape[0]} but the image is {size[1]}x{size[0]}")
            elif not gt.max() > 0:
                problems.append(f"{sample.map}: map is all zero")
        except Exception as err:  # noqa: BLE001
            problems.append(f"{sample.map}: unreadable map ({err})")
    if sample.has_fixations:
        try:
            if not read_fixations(sample, size).any():
                problems.append(f"{sample.id}: fixation map is empty")
        except Exception as err:  # noqa: BLE001
            problems.append(f"{sample.id}: unreadable fixations ({err})")
    return problems


def scan(samples: list[Sample], skip_bad: bool = False, workers: int = 4) -> list[Sample]:
    """Check pairing and readability of every sample; report ALL problems in one DataError.

    With skip_bad, bad samples are dropped (and counted in the log) instead.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(check_sample, samples))
    bad = [(s, p) for s, p in zip(samples, results) if p]
    if bad and not skip_bad:
        lines = "\n".join(f"  - {line}" for _, problems in bad for line in problems)
        raise DataError(
            f"{len(bad)} of {len(samples)} samples are unusable:\n{lines}\n"
            "Fix or remove them, or pass --skip-bad to train without them."
        )
    if bad:
        log.warning("skipping %d of %d samples with problems (--skip-bad)", len(bad), len(samples))
    return [s for s, p in zip(samples, results) if not p]


# -- augmentation and tensors -----------------------------------------------------------------
def build_augmentation(size: tuple[int, int], crop_scale: float = 0.6) -> A.Compose:
    """Joint geometric + photometric augmentation at the model's input size.

    crop_scale: the smallest area fraction of the random resized crop. Smaller crops move what
    was in the middle of the photo to anywhere in the frame, so position predicts less of the
    map and content more.

    The density map follows as a mask with bilinear interpolation; fixations follow as
    keypoints, so they move exactly and stay single binary points (no smearing, no loss except
    points cropped out of view).
    """
    h, w = size
    return A.Compose(
        [
            A.RandomResizedCrop((h, w), scale=(crop_scale, 1.0), ratio=(0.8 * w / h, 1.25 * w / h),
                                mask_interpolation=cv2.INTER_LINEAR, p=1.0),
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-10, 10), mask_interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.5),
        ],
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=True),
    )


def rasterize(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(x, y) keypoints -> bool map; pixel centres at integer coordinates, albumentations' convention."""
    out = np.zeros(shape, dtype=bool)
    if len(points):
        pts = np.asarray(points, dtype=np.float64)[:, :2]
        cols = np.floor(pts[:, 0] + 0.5).astype(np.intp)
        rows = np.floor(pts[:, 1] + 0.5).astype(np.intp)
        keep = (cols >= 0) & (cols < shape[1]) & (rows >= 0) & (rows < shape[0])
        out[rows[keep], cols[keep]] = True
    return out


class SaliencyDataset(Dataset):
    """Training/validation samples at the model's input size.

    Item: (image 3 x h x w in [0, 1], map 1 x h x w summing to 1 (or zeros), fixations 1 x h x w
    binary (zeros when the dataset has none), index). With `augment`, the augmentation of item i
    in epoch e is seeded by (seed, e, i): identical across runs, resumes and worker counts.
    With `keep_aspect`, (h, w) is each image's own aspect-true model size
    (`hub.preprocess.model_input_size`); `sizes` lists them, for `SizeBatchSampler`.
    Without `targets` (validation, which scores against a `GroundTruth` read once), items carry
    empty map and fixation tensors and no map or fixation file is read.
    """

    def __init__(
        self,
        samples: list[Sample],
        size: tuple[int, int],
        augment: bool = False,
        seed: int = 0,
        keep_aspect: bool = False,
        crop_scale: float = 0.6,
        targets: bool = True,
    ) -> None:
        if not 0.0 < crop_scale <= 1.0:
            raise ValueError(f"--crop-scale {crop_scale} must be in (0, 1]: the smallest area fraction of a random crop.")
        self.samples, self.size, self.seed = samples, tuple(size), seed
        self.sizes = [model_input_size(image_size(s.image), self.size, keep_aspect) for s in samples] if keep_aspect \
            else [self.size] * len(samples)
        self._augment, self.crop_scale, self.targets = augment, crop_scale, targets
        self._augmentations: dict[tuple[int, int], A.Compose] = {}
        self.epoch = 0

    def augmentation(self, size: tuple[int, int]) -> A.Compose | None:
        if not self._augment:
            return None
        if size not in self._augmentations:
            self._augmentations[size] = build_augmentation(size, self.crop_scale)
        return self._augmentations[size]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        sample, size = self.samples[index], self.sizes[index]
        image = load_image(sample.image)
        source = image.shape[:2]
        image = resize_image(image, size)
        if not self.targets:
            return image_to_tensor(image), torch.zeros(0), torch.zeros(0), index
        gt = resize_map(read_map(sample.map), size) if sample.map is not None else np.zeros(size, np.float32)
        fixated = read_fixations(sample, source) if sample.has_fixations else np.zeros(source, bool)
        rows, cols = np.nonzero(fixated)
        # Fixated pixel centres on the resized grid (centres at integer coordinates).
        sy, sx = size[0] / source[0], size[1] / source[1]
        points = np.stack([
            np.clip((cols + 0.5) * sx - 0.5, 0, size[1] - 1),
            np.clip((rows + 0.5) * sy - 0.5, 0, size[0] - 1),
        ], 1)
        augment = self.augmentation(size)
        if augment is not None:
            augment.set_random_seed(hash((self.seed, self.epoch, index)) % 2**32)
            out = augment(image=image, mask=gt, keypoints=points)
            image, gt, points = out["image"], out["mask"], np.asarray(out["keypoints"]).reshape(-1, 2)
        fix = rasterize(points, size)
        total = float(gt.sum())
        gt = gt / total if total > 0 else gt
        return (
            image_to_tensor(image),
            torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float32))[None],
            torch.from_numpy(fix.astype(np.float32))[None],
            index,
        )


class SizeBatchSampler(Sampler[list[int]]):
    """Batches of equal-size items (`SaliencyDataset.sizes`), split across distributed ranks.

    shuffle: the order within each size and of the batches is a function of (seed, epoch), so a
        resumed run replays it; without shuffle, batches follow the dataset order.
    Rank r of `world` takes batches r, r + world, ... With `drop_uneven` (training), the list is
    cut to a multiple of `world`, so every rank runs the same number of steps (DDP needs it);
    without it (validation), every item is in exactly one batch of one rank, none repeated.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_uneven: bool = False,
    ) -> None:
        self.sizes, self.batch_size, self.shuffle, self.seed = list(sizes), batch_size, shuffle, seed
        self.rank, self.world, self.drop_uneven = rank, world, drop_uneven
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1000 + self.epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(self.sizes):
            groups.setdefault(tuple(size), []).append(i)
        batches = []
        for size in sorted(groups):
            items = groups[size]
            if self.shuffle:
                rng.shuffle(items)
            batches += [items[k : k + self.batch_size] for k in range(0, len(items), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        if self.drop_uneven:
            batches = batches[: len(batches) - len(batches) % self.world]
        return batches[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
