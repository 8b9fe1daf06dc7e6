"""`python -m train.evaluate`: score a model on eye-tracking data with every benchmark metric.

    python -m train.evaluate --model runs/nus --data ../shared/data/nus_scene --split val

Predictions come from `SaliencyUNet.predict` (the demo's path). Every report also scores two
trivial baselines on the same images in the same run: a Gaussian centre prior, and the mean
ground-truth map of a training set. The JSON it writes is what the model card's
`model-index` is built from.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from hub.cli import setup_logging
from hub.preprocess import map_to_image, resize_map
from train import metrics as M
from train.data import (
    DataError,
    Sample,
    atomic_write_text,
    find_samples,
    has_splits,
    image_size,
    other_fixation_map,
    read_fixations,
    read_map,
)

log = logging.getLogger(__name__)

MAP_METRICS = ("cc", "kld", "sim")
FIXATION_METRICS = ("nss", "auc_judd", "auc_borji", "sauc", "info_gain")
ALL_METRICS = ("cc", "kld", "nss", "sim", "auc_judd", "auc_borji", "sauc", "info_gain")
BASELINES = ("center", "mean")
MEAN_MAP_SIZE = (128, 128)
MEAN_MAP_MAX_IMAGES = 2000
SAUC_OTHER_IMAGES = 10  # as Borji et al.: negatives from 10 random other images


class Scorer:
    """Scores predictions for a fixed list of samples against their original-resolution ground truth.

    Precomputes each sample's fixation points (for sAUC negatives) and, for the mean-map
    baseline, the mean of `train_samples`' maps (or, without a training set, the mean of the
    *other* evaluated images, leave-one-out).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        baselines: Sequence[str] = BASELINES,
        train_samples: Sequence[Sample] | None = None,
        seed: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.baselines = tuple(baselines)
        self.seed = seed
        self.sizes = [image_size(s.image) for s in self.samples]
        self.points: list[tuple[np.ndarray, tuple[int, int]] | None] = []
        for sample, size in zip(self.samples, self.sizes):
            if sample.has_fixations:
                rows, cols = np.nonzero(read_fixations(sample, size))
                self.points.append((np.stack([cols, rows], 1), size))
            else:
                self.points.append(None)
        self._baseline_rows: dict[int, dict[str, dict[str, float]]] = {}
        self.mean_map: np.ndarray | None = None
        self.leave_one_out = False
        if "mean" in self.baselines:
            source = list(train_samples) if train_samples else self.samples
            self.leave_one_out = not train_samples
            self.mean_sum, self.mean_count = _sum_maps(source, seed)
            self.mean_map = self.mean_sum / max(self.mean_count, 1)

    def _mean_baseline(self, index: int) -> np.ndarray:
        if self.leave_one_out and self.samples[index].map is not None and self.mean_count > 1:
            own = _unit_sum(resize_map(read_map(self.samples[index].map), MEAN_MAP_SIZE))
            return (self.mean_sum - own) / (self.mean_count - 1)
        return self.mean_map

    def other_fixations(self, index: int, shape: tuple[int, int]) -> np.ndarray | None:
        others = [p for i, p in enumerate(self.points) if i != index and p is not None]
        if not others:
            return None
        return other_fixation_map(others, shape, rng=self.seed + index, max_images=SAUC_OTHER_IMAGES)

    def score(self, index: int, pred: np.ndarray) -> dict[str, Any]:
        """All metrics of `pred` (any size; resized by the metrics) for sample `index`, with baselines."""
        sample = self.samples[index]
        shape = self.sizes[index]
        gt = read_map(sample.map) if sample.map is not None else None
        fix = read_fixations(sample, shape) if sample.has_fixations else None
        other = self.other_fixations(index, shape) if fix is not None else None
        center = M.center_prior(shape)
        row: dict[str, Any] = {"id": sample.id, **score_map(pred, gt, fix, other, center, self.seed + index)}
        if index not in self._baseline_rows:  # the baselines do not change between calls (epochs): score once
            baselines = {}
            if "center" in self.baselines:
                baselines["center"] = score_map(center, gt, fix, other, center, self.seed + index)
            if "mean" in self.baselines and self.mean_map is not None:
                baselines["mean"] = score_map(self._mean_baseline(index), gt, fix, other, center, self.seed + index)
            self._baseline_rows[index] = baselines
        if self._baseline_rows[index]:
            row["baselines"] = self._baseline_rows[index]
        return row


def _unit_sum(m: np.ndarray) -> np.ndarray:
    total = float(m.sum())
    return m / total if total > 0 else m


def _sum_maps(samples: Sequence[Sample], seed: int) -> tuple[np.ndarray, int]:
    with_maps = [s for s in samples if s.map is not None]
    if len(with_maps) > MEAN_MAP_MAX_IMAGES:
        pick = np.random.default_rng(seed).choice(len(with_maps), MEAN_MAP_MAX_IMAGES, replace=False)
        with_maps = [with_maps[i] for i in sorted(pick)]
    total = np.zeros(MEAN_MAP_SIZE, np.float64)
    for s in with_maps:
        total += _unit_sum(resize_map(read_map(s.map), MEAN_MAP_SIZE))
    return total, len(with_maps)


def score_map(
    pred: np.ndarray,
    gt: np.ndarray | None,
    fix: np.ndarray | None,
    other: np.ndarray | None,
    baseline: np.ndarray | None,
    seed: int = 0,
) -> dict[str, float]:
    """Every metric that the available ground truth allows (the MIT benchmark definitions)."""
    out: dict[str, float] = {}
    if gt is not None:
        out["cc"] = M.cc(pred, gt)
        out["kld"] = M.kld(pred, gt)
        out["sim"] = M.sim(pred, gt)
    if fix is not None:
        rng = np.random.default_rng(seed)
        out["nss"] = M.nss(pred, fix)
        out["auc_judd"] = M.auc_judd(pred, fix, rng=rng)
        out["auc_borji"] = M.auc_borji(pred, fix, rng=rng)
        if other is not None and other.any():
            out["sauc"] = M.sauc(pred, fix, other, rng=rng)
        if baseline is not None:
            out["info_gain"] = M.info_gain(pred, fix, baseline)
    return out


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every metric over rows (and of every baseline), ignoring rows that lack it."""

    def means(dicts: list[dict[str, float]]) -> dict[str, float]:
        out = {}
        for key in ALL_METRICS:
            values = [d[key] for d in dicts if key in d and not math.isnan(d[key])]
            if values:
                out[key] = float(np.mean(values))
        return out

    baselines = {
        name: means([r["baselines"][name] for r in rows if name in r.get("baselines", {})])
        for name in BASELINES
        if any(name in r.get("baselines", {}) for r in rows)
    }
    return {"metrics": means(list(rows)), "baselines": baselines}


def format_table(summary: dict[str, Any], title: str = "model") -> str:
    keys = [k for k in ALL_METRICS if k in summary["metrics"]]
    head = f"{'':14s}" + "".join(f"{k:>10s}" for k in keys)
    lines = [head, f"{title:14s}" + "".join(f"{summary['metrics'][k]:10.4f}" for k in keys)]
    for name, scores in summary.get("baselines", {}).items():
        lines.append(f"{name + ' baseline':14s}" + "".join(f"{scores[k]:10.4f}" if k in scores else f"{'':10s}" for k in keys))
    return "\n".join(lines) + "\n(KLD lower is better; all others higher is better)"


# -- the CLI -------------------------------------------------------------------------------------
def select_samples(data: Path, split: str | None, model_dir: Path | None) -> tuple[list[Sample], list[Sample] | None]:
    """(samples to evaluate, training samples for the mean baseline or None)."""
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"--data {data} is not a folder; pass a folder with images/ and maps/.")
    if has_splits(data):
        split = split or "val"
        available = [s for s in ("train", "val", "test") if (data / s).is_dir() or (data / "images" / s).is_dir()]
        if split not in available:
            raise DataError(f"{data} has no {split!r} split; choose --split from {available}.")
        train = find_samples(data, "train") if split != "train" else None
        return find_samples(data, split), train
    samples = find_samples(data)
    split_file = model_dir / "split.json" if model_dir is not None else None
    if split is None:
        return samples, None
    if split_file is None or not split_file.is_file():
        raise DataError(
            f"{data} has no train/val folders and the model has no split.json; omit --split to evaluate every image."
        )
    saved = json.loads(split_file.read_text())
    if split not in saved:
        raise DataError(f"{split_file} has no {split!r} split; choose from {[k for k in saved if k != 'data']}.")
    if isinstance(saved.get("data"), list):  # trained on several folders: ids are "<folder name>/<id>"
        prefix = data.resolve().name + "/"
        saved = {k: [i[len(prefix):] for i in v if i.startswith(prefix)] for k, v in saved.items() if k != "data"}
        if not saved[split]:
            raise DataError(f"{split_file} has no {split!r} images from {data}; pass one of the folders the model was trained on.")
    by_id = {s.id: s for s in samples}
    missing = [i for i in saved[split] if i not in by_id]
    if missing:
        raise DataError(f"{len(missing)} images of {split_file} are not in {data} (e.g. {missing[:3]}); is --data the training folder?")
    train = [by_id[i] for i in saved.get("train", []) if i in by_id] if split != "train" else None
    return [by_id[i] for i in saved[split]], train


def save_map(saliency: np.ndarray, folder: Path, sample_id: str, fmt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{sample_id}.{'npy' if fmt == 'npy' else 'png'}"
    tmp = target.with_name(f".{target.name}.tmp")
    if fmt == "npy":
        with open(tmp, "wb") as f:
            np.save(f, saliency.astype(np.float32))
    else:
        map_to_image(saliency, bits=16).save(tmp, format="PNG")
    tmp.replace(target)


def evaluate_model(
    model: Any,
    samples: Sequence[Sample],
    train_samples: Sequence[Sample] | None = None,
    baselines: Sequence[str] = BASELINES,
    batch_size: int = 8,
    save_maps: Path | None = None,
    map_format: str = "png16",
    seed: int = 0,
    progress: bool = True,
    precision: str = "auto",
) -> dict[str, Any]:
    """Predict every sample with `model.predict` and score it; returns the report dict."""
    scorer = Scorer(samples, baselines, train_samples, seed)
    rows = []
    bar = tqdm(total=len(samples), desc="evaluate", unit="img", disable=not progress)
    for start in range(0, len(samples), batch_size):
        chunk = list(range(start, min(start + batch_size, len(samples))))
        preds = model.predict([samples[i].image for i in chunk], batch_size=batch_size, precision=precision)
        for i, pred in zip(chunk, preds):
            rows.append(scorer.score(i, pred))
            if save_maps is not None:
                save_map(pred, save_maps, samples[i].id, map_format)
        bar.update(len(chunk))
    bar.close()
    return {"n_images": len(rows), **summarize(rows), "images": rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by save_pretrained / `python -m train`, or a Hub repo id")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--data", required=True, type=Path, help="dataset folder (images/, maps/, fixations/)")
    p.add_argument("--split", default=None, help="split to evaluate (default: val when the data has splits, else every image; "
                   "with a model trained by `python -m train`, its split.json selects the images)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--save-maps", type=Path, default=None, help="write each predicted map here, named by image id")
    p.add_argument("--map-format", choices=("png16", "npy"), default="png16", help="16-bit PNG or float32 .npy")
    p.add_argument("--baseline", nargs="*", choices=BASELINES, default=list(BASELINES), help="baselines to score beside the model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="as predict(): auto uses bf16 where native")
    p.add_argument("--seed", type=int, default=0, help="seed of the random negatives of AUC-Borji and sAUC")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging("train", "hub")
    args = build_parser().parse_args(argv)
    from hub import SaliencyUNet
    from hub.runtime import pick_device

    model_dir = Path(args.model) if Path(args.model).is_dir() else None
    try:
        samples, train_samples = select_samples(args.data, args.split, model_dir)
        if args.limit is not None:
            samples = samples[: args.limit]
        bad = [s.id for s in samples if s.map is None and not s.has_fixations]
        if bad:
            raise DataError(f"{len(bad)} images have neither a map nor fixations (e.g. {bad[:3]}); add maps/<id>.png.")
        model = SaliencyUNet.from_pretrained(args.model, revision=args.revision).to(pick_device(args.device))
        report = evaluate_model(model, samples, train_samples, args.baseline, args.batch_size, args.save_maps, args.map_format, args.seed,
                                progress=True, precision=args.precision)
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    report = {
        "model": str(args.model),
        "dataset": {"name": args.data.resolve().name, "path": str(args.data), "split": args.split},
        **report,
    }
    print(format_table(report))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
