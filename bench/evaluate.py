"""Validation cost at SALICON scale: seconds per 1,000 images at 480x640, before and after.

    python -m bench.evaluate [--images 48] [--size 288x384] [--batch 8] [--device auto] [--threads 0]

Synthetic 480x640 images, density maps and 50 fixations each (`bench.train.synthetic_dataset`),
model-size predictions (smooth random maps; the forward pass is the same in every path and is
not timed). Per 1,000 validation images:

- loader: decode + resize of the val loader's items, with the density map and fixations read
  and resized per item (before) and without them (after: validation scores against the
  ground truth prepared once);
- before: each epoch as it was, per image: read the map and fixations, rasterise the sAUC
  negatives, build the centre prior, resize the map to 480x640 (`tensor_to_maps`), every metric
  in numpy;
- full numpy on the prepared ground truth: what `python -m train.evaluate` and the end-of-run
  validation of the best model do now (every metric, MIT-exact);
- after: the per-epoch path, `Scorer.score_batch` (CC, KLD, NSS, SIM in torch on --device,
  batches of --batch);
- the baselines, scored once per run either way.

On a CPU shared with other work, torch's threads wait for each other: compare --threads 1 (the
numpy paths are single-threaded) with the default. Figures, never assertions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.common import cpu_summary, synchronize
from bench.train import synthetic_dataset
from hub.config import parse_size
from hub.model import gaussian_blur
from hub.preprocess import tensor_to_maps
from hub.runtime import pick_device
from train import metrics as M
from train.data import SaliencyDataset, find_samples, other_fixation_map, read_fixations, read_map
from train.evaluate import SAUC_OTHER_IMAGES, Scorer, score_map


def per_1000(seconds: float, n: int) -> float:
    return seconds / n * 1000.0


def timed(fn: Callable[[], object], device: torch.device | None = None) -> float:
    if device is not None:
        synchronize(device)
    start = time.perf_counter()
    fn()
    if device is not None:
        synchronize(device)
    return time.perf_counter() - start


def fake_predictions(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(n, 1, h, w) smooth positive maps in [0, 1], a stand-in for a model's sigmoid output."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 1, *size, generator=g)
    return torch.sigmoid(8.0 * (gaussian_blur(noise, 0.04 * max(size)) - 0.5))


def score_as_before(scorer: Scorer, index: int, pred: np.ndarray) -> dict:
    """One image's per-epoch scoring as `Scorer.score` did it before the ground truth was prepared once."""
    sample, shape = scorer.samples[index], scorer.sizes[index]
    gt = read_map(sample.map)
    fix = read_fixations(sample, shape)
    others = [p for i, p in enumerate(scorer.truth.points) if i != index and p is not None]
    other = other_fixation_map(others, shape, rng=scorer.seed + index, max_images=SAUC_OTHER_IMAGES)
    center = M.center_prior(shape)
    return score_map(pred, gt, fix, other, center, scorer.seed + index)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48, help="synthetic 480x640 validation images")
    p.add_argument("--size", default="288x384", help="model size of the predictions")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="auto", help="device of the per-epoch metrics")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); the numpy paths use one")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = parse_size(args.size)
    device = pick_device(args.device)
    print(cpu_summary())
    print(f"{args.images} synthetic 480x640 images, predictions at {size[0]}x{size[1]}, batch {args.batch}, "
          f"per-epoch metrics on {device}; seconds per 1,000 images:")
    with tempfile.TemporaryDirectory() as tmp:
        samples = find_samples(synthetic_dataset(Path(tmp), args.images))
        n = len(samples)
        before_loader = SaliencyDataset(samples, size, targets=True)
        after_loader = SaliencyDataset(samples, size, targets=False)
        t_load_before = timed(lambda: [before_loader[i] for i in range(n)])
        t_load_after = timed(lambda: [after_loader[i] for i in range(n)])

        t_prepare = timed(lambda: Scorer(samples, baselines=(), seed=0))
        scorer = Scorer(samples, seed=0)
        preds = fake_predictions(n, size)
        batches = [list(range(k, min(k + args.batch, n))) for k in range(0, n, args.batch)]

        t_before = timed(lambda: [score_as_before(scorer, i, m) for b in batches
                                  for i, m in zip(b, tensor_to_maps(preds[b], [scorer.sizes[i] for i in b]))])
        t_baselines_full = timed(lambda: [scorer.score(i, m) for b in batches
                                          for i, m in zip(b, tensor_to_maps(preds[b], [scorer.sizes[i] for i in b]))])
        t_full = timed(lambda: [scorer.score(i, m) for b in batches
                                for i, m in zip(b, tensor_to_maps(preds[b], [scorer.sizes[i] for i in b]))])

        on_device = preds.to(device)
        t_baselines_epoch = timed(lambda: [scorer.score_batch(on_device[b], b) for b in batches], device)
        t_after = timed(lambda: [scorer.score_batch(on_device[b], b) for b in batches], device)

    rows = [
        ("loader, map + fixations read per item (before)", t_load_before),
        ("loader, image only (after)", t_load_after),
        ("scoring before: per image, files re-read, every metric (numpy)", t_before),
        ("scoring, every metric on the prepared ground truth (numpy; evaluate CLI, end of run)", t_full),
        (f"scoring after: per epoch, CC/KLD/NSS/SIM batched on {device}", t_after),
        ("once per run: preparing the ground truth (maps, fixations)", t_prepare),
        ("once per run: centre + mean baselines, every metric (numpy)", max(t_baselines_full - t_full, 0.0)),
        (f"once per run: centre + mean baselines, per-epoch metrics on {device}", max(t_baselines_epoch - t_after, 0.0)),
    ]
    width = max(len(r[0]) for r in rows)
    for label, seconds in rows:
        print(f"  {label:<{width}s} {per_1000(seconds, n):8.1f} s")
    before = t_load_before + t_before
    after = t_load_after + t_after
    print(f"per-epoch validation CPU work (loader + scoring, forward not included): before {per_1000(before, n):.1f} s, "
          f"after {per_1000(after, n):.1f} s per 1,000 images ({before / after:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
