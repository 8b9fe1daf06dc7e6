"""`python -m train.evaluate`: score a model on eye-tracking data with every benchmark metric.

    python -m train.evaluate --model runs/nus --data ../shared/data/nus_scene --split val

Predictions come from `SaliencyUNet.predict` (the demo's path). Every report also scores two
trivial baselines on the same images in the same run: a Gaussian centre prior, and the mean
ground-truth map of a training set. The JSON it writes is what the model card's
`model-index` is built from.

The ground truth (maps, fixations, sAUC negatives) is read once into a `train.data.GroundTruth`;
`Scorer` scores against it, in numpy with every metric (this CLI) or in torch on the device with
the per-epoch metrics (training's validation).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hub.cli import print_error, setup_logging
from hub.preprocess import map_to_image, resize_map
from hub.publish import atomic_write, atomic_write_text
from hub.runtime import PRECISIONS
from train import metrics as M
from train.data import DataError, GroundTruth, Sample, find_samples, has_splits, read_map

log = logging.getLogger(__name__)

MAP_METRICS = ("cc", "kld", "sim")
FIXATION_METRICS = ("nss", "auc_judd", "auc_borji", "sauc", "info_gain")
ALL_METRICS = ("cc", "kld", "nss", "sim", "auc_judd", "auc_borji", "sauc", "info_gain")
# What training validates every epoch, on the model's device in batches: the metrics whose
# definitions are sums over pixels. The rank-based ones (AUCs, sAUC) and IG stay numpy, per
# image, run on the exported best model at the end (README, "Validation at scale").
EPOCH_METRICS = ("cc", "kld", "nss", "sim")
BASELINES = ("center", "mean")
MEAN_MAP_SIZE = (128, 128)
MEAN_MAP_MAX_IMAGES = 2000
SAUC_OTHER_IMAGES = 10  # as Borji et al.: negatives from 10 random other images


class Scorer:
    """Scores predictions of a fixed list of samples against their original-resolution ground truth.

    The ground truth (`train.data.GroundTruth`: maps, fixations, sAUC negatives) and the baseline
    maps are prepared once here and reused by every call, i.e. every epoch. Two ways to score:
    `score` (one map, every benchmark metric, numpy, MIT-exact: the evaluation CLI) and
    `score_batch` (a batch of model-size maps on the device: CC, KLD, NSS, SIM in torch, for
    per-epoch validation). Baselines (a centre prior; the mean map of `train_samples`, or without
    them of the other evaluated images, leave-one-out) are scored once per image and way.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        baselines: Sequence[str] = BASELINES,
        train_samples: Sequence[Sample] | None = None,
        seed: int = 0,
        load: Sequence[int] | None = None,
    ) -> None:
        """load: indices whose maps are read now (default all); others are read on first use."""
        self.truth = GroundTruth(samples, seed, other_images=SAUC_OTHER_IMAGES)
        self.truth.load(load)
        self.samples, self.sizes = self.truth.samples, self.truth.sizes
        # {index: face boxes} of a run with a face prior (`train.loop.val_faces`), which validation
        # turns into the face maps the model's infer() needs; None without one.
        self.faces: dict[int, np.ndarray] | None = None
        self.baselines = tuple(baselines)
        self.seed = seed
        self._baseline_rows: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
        self.mean_map: np.ndarray | None = None
        self.leave_one_out = False
        if "mean" in self.baselines:
            self.leave_one_out = not train_samples
            if train_samples:
                self.mean_sum, self.mean_count = _sum_maps(list(train_samples), seed)
            else:  # the evaluated images themselves: their maps are in memory already
                self.mean_sum, self.mean_count = _sum_maps(self.samples, seed, self.truth)
            self.mean_map = self.mean_sum / max(self.mean_count, 1)

    def center(self, shape: tuple[int, int]) -> np.ndarray:
        return _center_prior(tuple(shape))

    def _mean_baseline(self, index: int) -> np.ndarray:
        if self.leave_one_out and self.truth.has_map(index) and self.mean_count > 1:
            own = _unit_sum(resize_map(self.truth.gt_map(index), MEAN_MAP_SIZE))
            return (self.mean_sum - own) / (self.mean_count - 1)
        return self.mean_map

    def _baseline_maps(self, index: int) -> dict[str, np.ndarray]:
        maps = {}
        if "center" in self.baselines:
            maps["center"] = self.center(self.sizes[index])
        if "mean" in self.baselines and self.mean_map is not None:
            maps["mean"] = self._mean_baseline(index)
        return maps

    def score(self, index: int, pred: np.ndarray) -> dict[str, Any]:
        """Every metric of `pred` (any size; resized by the metrics) for sample `index`, with baselines."""
        t = self.truth
        gt, fix, other = t.gt_map(index), t.fixation_mask(index), t.other_mask(index)
        center = self.center(self.sizes[index])
        row: dict[str, Any] = {"id": self.samples[index].id, **score_map(pred, gt, fix, other, center, self.seed + index)}
        key = ("all", index)
        if key not in self._baseline_rows:  # the baselines do not change between calls (epochs): score once
            self._baseline_rows[key] = {name: score_map(m, gt, fix, other, center, self.seed + index)
                                        for name, m in self._baseline_maps(index).items()}
        if self._baseline_rows[key]:
            row["baselines"] = self._baseline_rows[key]
        return row

    def score_batch(
        self, pred: torch.Tensor, indices: Sequence[int], metrics: Sequence[str] = EPOCH_METRICS, baselines: bool = True
    ) -> list[dict[str, Any]]:
        """CC, KLD, NSS, SIM (a subset: `metrics`) of a batch of model-size maps, on their device.

        pred: (B, 1, h, w) or (B, h, w) maps of samples `indices` (any scale, negatives clipped
        as `tensor_to_maps` does). Each is resized to its image's original (H, W) by
        `metrics.resize_bilinear_torch` (the rule of the numpy metrics' own resize), then scored
        against the prepared ground truth in float32, images of one size in one batch. Agrees
        with `score` on the same model-size maps to ~1e-5.
        """
        pred = pred.detach().float()
        pred = pred[:, 0] if pred.dim() == 4 else pred
        rows: list[dict[str, Any]] = [{"id": self.samples[i].id} for i in indices]
        for row, scores in zip(rows, self._scores_by_size(list(pred), indices, metrics)):
            row.update(scores)
        if baselines and self.baselines:
            todo = [i for i in dict.fromkeys(indices) if ("epoch", i) not in self._baseline_rows]
            maps = {i: self._baseline_maps(i) for i in todo}
            for i in todo:
                self._baseline_rows[("epoch", i)] = {}
            for name in self.baselines:  # scored once per run, in batches like the model's maps
                have = [i for i in todo if name in maps[i]]
                tensors = [torch.from_numpy(maps[i][name].astype(np.float32)).to(pred.device) for i in have]
                for i, scores in zip(have, self._scores_by_size(tensors, have, metrics)):
                    self._baseline_rows[("epoch", i)][name] = scores
            for row, i in zip(rows, indices):
                if self._baseline_rows[("epoch", i)]:
                    row["baselines"] = self._baseline_rows[("epoch", i)]
        return rows

    def _scores_by_size(self, maps: Sequence[torch.Tensor], indices: Sequence[int], metrics: Sequence[str]) -> list[dict[str, float]]:
        """Scores of (h_k, w_k) maps of images `indices`; maps of one size going to one image size form one batch."""
        groups: dict[tuple[tuple[int, ...], tuple[int, int]], list[int]] = {}
        for pos, (m, i) in enumerate(zip(maps, indices)):
            groups.setdefault((tuple(m.shape), tuple(self.sizes[i])), []).append(pos)
        out: list[dict[str, float]] = [{} for _ in indices]
        for (_, shape), where in groups.items():
            resized = M.resize_bilinear_torch(torch.stack([maps[p] for p in where]), shape).clamp_min(0.0)
            for p, scores in zip(where, self._device_scores(resized, [indices[p] for p in where], metrics)):
                out[p] = scores
        return out

    def _device_scores(self, maps: torch.Tensor, indices: Sequence[int], metrics: Sequence[str]) -> list[dict[str, float]]:
        """Scores of (b, H, W) maps of images `indices` (all of that size) against their ground truth."""
        out: list[dict[str, float]] = [{} for _ in indices]
        device = maps.device
        with_map = [p for p, i in enumerate(indices) if self.truth.has_map(i)]
        map_fns = {"cc": M.cc_torch, "kld": M.kld_torch, "sim": M.sim_torch}
        wanted = [k for k in metrics if k in map_fns]
        if with_map and wanted:
            gt = torch.from_numpy(np.stack([self.truth.gt_map(indices[p]) for p in with_map])).to(device, non_blocking=True)
            values = {k: map_fns[k](maps[with_map], gt).tolist() for k in wanted}
            for j, p in enumerate(with_map):
                out[p].update({k: values[k][j] for k in wanted})
        with_fix = [p for p, i in enumerate(indices) if self.truth.fixations[i] is not None]
        if with_fix and "nss" in metrics:
            b, h, w = len(with_fix), *maps.shape[-2:]
            flat = [torch.from_numpy(self.truth.fixations[indices[p]]) for p in with_fix]
            rows = torch.cat([torch.full((len(f),), j) for j, f in enumerate(flat)])
            fix = torch.zeros(b, h * w, device=device)
            fix[rows.to(device), torch.cat(flat).to(device)] = 1.0
            for p, v in zip(with_fix, M.nss_torch(maps[with_fix], fix.view(b, h, w)).tolist()):
                out[p]["nss"] = v
        return out


@functools.lru_cache(maxsize=16)
def _center_prior(shape: tuple[int, int]) -> np.ndarray:
    """The centre-prior baseline of an image size; a few sizes cached (a dataset of many sizes would fill memory)."""
    prior = M.center_prior(shape)
    prior.flags.writeable = False  # shared between calls
    return prior


def _unit_sum(m: np.ndarray) -> np.ndarray:
    total = float(m.sum())
    return m / total if total > 0 else m


def _sum_maps(samples: Sequence[Sample], seed: int, truth: GroundTruth | None = None) -> tuple[np.ndarray, int]:
    """Sum of unit-sum MEAN_MAP_SIZE maps of (up to MEAN_MAP_MAX_IMAGES of) samples; read from `truth` when given."""
    with_maps = [(k, s) for k, s in enumerate(samples) if s.map is not None]
    if len(with_maps) > MEAN_MAP_MAX_IMAGES:
        pick = np.random.default_rng(seed).choice(len(with_maps), MEAN_MAP_MAX_IMAGES, replace=False)
        with_maps = [with_maps[i] for i in sorted(pick)]
    total = np.zeros(MEAN_MAP_SIZE, np.float64)
    for k, s in with_maps:
        total += _unit_sum(resize_map(truth.gt_map(k) if truth is not None else read_map(s.map), MEAN_MAP_SIZE))
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
    def write(tmp: Path) -> None:
        if fmt == "npy":
            with open(tmp, "wb") as f:
                np.save(f, saliency.astype(np.float32))
        else:
            map_to_image(saliency, bits=16).save(tmp, format="PNG")

    atomic_write(folder / f"{sample_id}.{'npy' if fmt == 'npy' else 'png'}", write)


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
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="as predict(): auto is bf16 or fp16 where native, else fp32")
    p.add_argument("--seed", type=int, default=0, help="seed of the random negatives of AUC-Borji and sAUC")
    p.add_argument("--aoi", action="store_true", help="score predicted AOI shares against real fixation shares instead "
                   "(boxes around each predicted peak region and a 3x3 grid, beside the centre prior; train/aoi.py)")
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
        if args.aoi:  # the areas-of-interest agreement instead of the map metrics
            from train.aoi import evaluate_aoi
            from train.aoi import format_table as table

            report = evaluate_aoi(model, samples, args.batch_size, args.precision)
        else:
            table = format_table
            report = evaluate_model(model, samples, train_samples, args.baseline, args.batch_size, args.save_maps, args.map_format,
                                    args.seed, progress=True, precision=args.precision)
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as err:
        print_error(err)
        return 1
    report = {
        "model": str(args.model),
        "dataset": {"name": args.data.resolve().name, "path": str(args.data), "split": args.split},
        **report,
    }
    print(table(report))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
