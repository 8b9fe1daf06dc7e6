"""`python -m train.maps`: build density maps and binary fixation maps from raw fixations.

    python -m train.maps --images DIR/images --fixations DIR/fixations.csv --out DIR --sigma auto

The CSV needs the columns `id,x,y` (more are ignored, e.g. `subject,duration_ms`), with `id` the
image file's stem and x, y in 1-based pixels of that image (MATLAB convention, sub-pixel allowed).
All observers' fixations are pooled.

Choosing sigma: the convention of the field (MIT benchmark, SALICON, CAT2000) is a Gaussian of
about one degree of visual angle. In pixels of the stored image that is
    sigma = pixels_per_degree = (image width in px / displayed width in cm) * d * tan(1 deg)
for a viewing distance d in cm; e.g. 1024 px shown 40 cm wide at 60 cm gives 26.8 px. Without
the display geometry, `--sigma auto` uses max(H, 0.625 W) / 32 per image: 8 px for 256x256,
24 px for 1024x768, which assumes the image filled the height of a 16:10 screen spanning
about 32 x 20 degrees (a common eye-tracking setup).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from hub.cli import print_error, setup_logging
from hub.publish import atomic_write
from train.data import IMAGE_SUFFIXES, _by_stem, fixation_map_from_points, fixations_from_csv, image_size

log = logging.getLogger(__name__)


def auto_sigma(shape: tuple[int, int]) -> float:
    """About one degree of visual angle when the image filled a 16:10 screen's height (see module doc)."""
    h, w = shape
    return max(h, 0.625 * w) / 32.0


def density_map(fixated_counts: np.ndarray, sigma: float) -> np.ndarray:
    """Per-pixel fixation counts -> Gaussian-blurred map scaled to a peak of 1 (zero padding, 4 sigma)."""
    blurred = gaussian_filter(fixated_counts.astype(np.float64), sigma, mode="constant", truncate=4.0)
    peak = float(blurred.max())
    return blurred / peak if peak > 0 else blurred


def counts_from_points(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """0-based (x, y) points -> H x W fixation counts (pixel = round-half-up, clamped)."""
    h, w = shape
    cols = np.clip(np.floor(points[:, 0] + 0.5), 0, w - 1).astype(np.intp)
    rows = np.clip(np.floor(points[:, 1] + 0.5), 0, h - 1).astype(np.intp)
    counts = np.zeros(shape, np.float64)
    np.add.at(counts, (rows, cols), 1.0)
    return counts


def _save_png(array: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def build_maps(images: Path, fixations_csv: Path, out: Path, sigma: float | None) -> int:
    """Write OUT/maps/<id>.png (8-bit, peak 255) and OUT/fixations/<id>.png (0/255); returns the count."""
    points = fixations_from_csv(fixations_csv)
    files = _by_stem(images, IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{images} holds no images; pass the folder with the stimuli.")
    missing = sorted(set(files) - set(points))
    if missing:
        raise ValueError(
            f"{len(missing)} images have no fixations in {fixations_csv} (e.g. {missing[:3]}); "
            "the CSV's id column must be the image file name without extension."
        )
    (out / "maps").mkdir(parents=True, exist_ok=True)
    (out / "fixations").mkdir(parents=True, exist_ok=True)
    if not (out / "images").exists() and images.resolve() != (out / "images").resolve():
        (out / "images").symlink_to(images.resolve(), target_is_directory=True)
    for sample_id, path in tqdm(sorted(files.items()), desc="maps", unit="img"):
        shape = image_size(path)
        pts = points[sample_id]
        binary = fixation_map_from_points(pts, shape)
        dens = density_map(counts_from_points(pts, shape), sigma if sigma is not None else auto_sigma(shape))
        _save_png((dens * 255.0 + 0.5).astype(np.uint8), out / "maps" / f"{sample_id}.png")
        _save_png(binary.astype(np.uint8) * 255, out / "fixations" / f"{sample_id}.png")
    return len(files)


def main(argv: list[str] | None = None) -> int:
    setup_logging("train", "hub")
    p = argparse.ArgumentParser(prog="python -m train.maps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, help="folder of stimuli, <id>.jpg")
    p.add_argument("--fixations", required=True, type=Path, help="CSV with id,x,y (1-based pixels)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write maps/ and fixations/ into")
    p.add_argument("--sigma", default="auto", help="Gaussian sigma in pixels (about one visual degree), or 'auto'")
    args = p.parse_args(argv)
    try:
        sigma = None if args.sigma == "auto" else float(args.sigma)
        if sigma is not None and sigma <= 0:
            raise ValueError(f"--sigma {args.sigma} must be a positive number of pixels or 'auto'.")
        n = build_maps(args.images, args.fixations, args.out, sigma)
    except (ValueError, FileNotFoundError) as err:
        print_error(err)
        return 1
    print(f"wrote maps and fixations for {n} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
