"""`python -m train`: fine-tune SaliencyUNet on eye-tracking data. One readable loop.

    python -m train --data ../shared/data/nus_scene --out runs/nus --backbone-weights none
    torchrun --nproc_per_node 2 -m train --data ... --out ...        # DDP, same flags

OUT becomes a `from_pretrained`-loadable folder (best weights, config.json, model card with the
validation metrics as model-index) plus metrics.json, metrics.csv, train_config.json,
split.json and checkpoints/last.pt for `--resume`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from hub import SaliencyConfig, SaliencyUNet
from hub.cli import print_error, setup_logging
from hub.config import FACE_DETECTORS, STAGES, parse_size
from hub.faces import detect_faces, face_maps
from hub.model import gaussian_blur
from hub.preprocess import load_image, tensor_to_maps
from hub.publish import PublishError, atomic_write, atomic_write_text, export, push
from hub.model import load_strict
from hub.runtime import PRECISIONS, pick_device, precision_name, resolve_precision
from train.data import DataError, SaliencyDataset, SizeBatchSampler, load_splits, scan, write_split
from train.evaluate import ALL_METRICS, EPOCH_METRICS, Scorer, format_table, summarize
from train.losses import DEFAULT_LOSS, SaliencyLoss

log = logging.getLogger("train")

LOWER_IS_BETTER = {"kld", "loss"}  # the project's one such set: metrics (and the training loss) where less is better


@dataclass
class TrainConfig:
    """Everything a run depends on; each field is a command-line flag of the same name."""

    data: list[str] = field(default_factory=list)
    out: str = ""
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-4
    encoder_lr_mult: str = "auto"
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    clip_grad: float = 1.0
    size: str = "288x384"
    loss: str = DEFAULT_LOSS
    backbone: str = "resnet50"
    backbone_weights: str = "imagenet"
    freeze: str = "auto"
    init_from: str | None = None
    val_fraction: float = 0.1
    select_metric: str = "kld"
    full_metrics_every: int = 0
    # Defaults chosen by leave-one-dataset-out measurements (train on nus_scene, score on eyecrowd;
    # README, "What transfers"): a calibrated blur is neutral there and the face prior the largest
    # gain; flip averaging adds 0.003 CC (less than the spread between seeds) for twice the
    # network's cost, so it is an option. The centre prior, aspect-true input, EMA and smaller
    # crops fit the training collection better and the other one worse, so they stay options. The epoch is picked
    # by validation KLD, not CC: in both runs where they disagreed, the KLD pick scored better on
    # every eyecrowd metric. The face prior's detector, its search size and its weight 6 were
    # picked on eyecrowd's odd ids (nus_scene's scenes hold almost no faces, so it cannot choose
    # them) and confirmed on the even ids and with a second seed (README, "What transfers"): MTCNN
    # finds the faces in crowds that OpenCV's frontal and profile cascades miss, adds about 0.06 CC
    # over them on eyecrowd, fires twice in nus_scene's 500 scenes and costs a seventh of their time.
    center_prior: int = 0
    keep_aspect: bool = False
    flip_tta: bool = False
    blur: str = "auto"
    face_prior: float = 6.0
    face_detector: str = "mtcnn"
    ema: float = 0.0
    crop_scale: float = 0.6
    patience: int = 0
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    skip_bad: bool = False
    resume: bool = False
    push_to_hub: str | None = None
    private: bool = False
    max_steps_per_epoch: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # resolved SaliencyConfig, filled in by main

    @property
    def input_size(self) -> tuple[int, int]:
        try:
            return parse_size(self.size)
        except ValueError as err:
            raise ValueError(f"--size: {err}") from None

    @property
    def data_dirs(self) -> list[Path]:
        return [Path(d) for d in ([self.data] if isinstance(self.data, str) else self.data)]

    @property
    def data_name(self) -> str:
        return " + ".join(d.resolve().name for d in self.data_dirs)

    def blur_value(self) -> float | None:
        """--blur as a number, or None for "auto" (calibrated on validation after training)."""
        if self.blur == "auto":
            return None
        try:
            return float(self.blur)
        except ValueError:
            raise ValueError(f"--blur {self.blur!r} must be 'auto' or a fraction of the map's longer side, e.g. 0.02.") from None

    @property
    def pretrained_encoder(self) -> bool:
        """Whether the encoder starts from learned weights (ImageNet, a file, or --init-from)."""
        return self.init_from is not None or self.backbone_weights.lower() != "none"

    @property
    def frozen(self) -> tuple[str, ...]:
        """--freeze; "auto": stem and layer1 for a pretrained encoder (their features are generic), nothing for a random one."""
        if self.freeze == "auto":
            return ("stem", "layer1") if self.pretrained_encoder else ()
        return tuple(s for s in (p.strip() for p in self.freeze.split(",")) if s and s != "none")

    @property
    def encoder_lr(self) -> float:
        """--encoder-lr-mult; "auto": 0.1 for a pretrained encoder (keep what it knows), 1 for a random one."""
        if self.encoder_lr_mult == "auto":
            return 0.1 if self.pretrained_encoder else 1.0
        try:
            return float(self.encoder_lr_mult)
        except ValueError:
            raise ValueError(f"--encoder-lr-mult {self.encoder_lr_mult!r} must be 'auto' or a number, e.g. 0.1.") from None

    def command(self) -> str:
        """The `python -m train` command line of this run: --data, --out and every flag not at its default."""
        defaults = TrainConfig()
        parts = ["python", "-m", "train", "--data", *map(str, self.data_dirs)]
        for f in fields(self):
            if f.name in ("data", "model", "resume", "push_to_hub", "private", "workers", "device") or \
                    getattr(self, f.name) == getattr(defaults, f.name):
                continue
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
            else:
                parts += [flag, str(value)]
        return shlex.join(parts)

    def resolve(self) -> None:
        """Replace the "auto" training flags by their values, so train_config.json and resume checks see them."""
        self.freeze = ",".join(self.frozen) or "none"
        self.encoder_lr_mult = f"{self.encoder_lr:g}"


# Flags that change the optimisation itself: a --resume with other values would silently train on
# another schedule (or other data order), so it stops instead.
SCHEDULE_FLAGS = ("epochs", "batch_size", "lr", "encoder_lr_mult", "weight_decay", "warmup_steps", "clip_grad", "loss",
                  "freeze", "crop_scale", "keep_aspect", "ema", "seed", "max_steps_per_epoch", "select_metric", "init_from")


def schedule_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The --flags whose values differ between a checkpoint's config and this run's, e.g. ["--epochs 10 -> 12"]."""
    now = asdict(cfg)

    def same(a: Any, b: Any) -> bool:  # 0.1 and "0.1" (a flag that became "auto"-able) are the same value
        try:
            return a == b or float(a) == float(b)
        except (TypeError, ValueError):
            return False

    return [f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in SCHEDULE_FLAGS if not same(saved.get(k), now[k])]


# -- distributed ---------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """True under `torchrun`, also with `--nproc_per_node 1` (so one GPU exercises the NCCL path too)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def setup_distributed(requested: str) -> tuple[torch.device, int, int]:
    """(this process's device, rank, world size). Under torchrun: each process takes GPU LOCAL_RANK
    and makes it current *before* the process group starts (NCCL binds to the current device), then
    joins the group: NCCL on CUDA, gloo on the CPU."""
    device = pick_device(requested)
    if not launched_by_torchrun():
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return device, dist.get_rank(), dist.get_world_size()


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows, on every rank (all_gather_object uses the current device, set by setup_distributed)."""
    if not dist.is_initialized():
        return rows
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


def all_reduce_on(values: list[float], device: torch.device, op: Any = None) -> torch.Tensor:
    """`values` reduced over ranks (sum, or `op`), as a tensor on `device`: NCCL takes tensors of the
    process's GPU only, so every collective here builds its tensor there."""
    t = torch.tensor(values, dtype=torch.float32, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
    return t


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    return float(all_reduce_on([value], device)[0].item()) / dist.get_world_size()


def first_bad_rank(bad: bool, device: torch.device) -> int | None:
    """The highest rank where `bad` is True, known to every rank (None where it is False everywhere),
    so that all ranks stop together and none waits forever in the next collective."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    worst = int(all_reduce_on([float(rank if bad else -1)], device, dist.ReduceOp.MAX)[0].item())
    return None if worst < 0 else worst


# -- building blocks -------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: SaliencyUNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW on trainable parameters only; the encoder learns at `encoder_lr` times the rate."""
    encoder = {id(p) for p in model.encoder_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in encoder], "lr": cfg.lr * cfg.encoder_lr},
        {"params": [p for p in trainable if id(p) not in encoder], "lr": cfg.lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 1% of the peak, stepped once per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteLoss(RuntimeError):
    pass


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: SaliencyLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    cfg: TrainConfig,
    epoch: int,
    show: bool,
    ema: EMA | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over the training data; returns the mean loss and images/s.

    Autocast runs in `cfg.precision` (bf16 or fp16; fp16 with `scaler`, a GradScaler, so small
    gradients do not underflow). A non-finite loss on any rank stops every rank at the same step.
    """
    model.train()
    low = resolve_precision(device, cfg.precision)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    total, count, start = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not show, leave=False)
    for step, (image, gt, fix, _) in enumerate(bar):
        if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
            break
        image = image.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        gt, fix = gt.to(device, non_blocking=True), fix.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=low or torch.bfloat16, enabled=low is not None):
            pred = model(image)
        # The loss in fp32 whatever the autocast dtype: KLD's epsilon and log underflow in fp16.
        loss, parts = loss_fn(pred.float(), gt, fix)
        value = float(loss.detach())
        # Each rank's verdict is shared before backward: a rank that stopped alone would leave the
        # others waiting in DDP's gradient all-reduce. Every rank raises the same message.
        bad_rank = first_bad_rank(not math.isfinite(value), device)
        if bad_rank is not None:
            where = f" on rank {bad_rank}" if distributed else ""
            raise NonFiniteLoss(f"the loss became non-finite{where} at epoch {epoch}, step {step}")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients
        else:
            loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed; the scale then drops
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model.module if hasattr(model, "module") else model)
        total += value * len(image)
        count += len(image)
        bar.set_postfix(loss=f"{total / count:.4f}", img_s=f"{count / (time.perf_counter() - start):.1f}")
    elapsed = time.perf_counter() - start
    return {"loss": mean_across_ranks(total / max(count, 1), device), "img_per_s": count * max(1, _world()) / elapsed}


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class _FaceScan(torch.utils.data.Dataset):
    """Face boxes of validation images (`hub.faces.detect_faces` on the image `predict` would load)."""

    def __init__(self, samples: list, indices: list[int], detector: str) -> None:
        self.samples, self.indices, self.detector = samples, indices, detector

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, np.ndarray]:
        i = self.indices[k]
        return i, detect_faces(load_image(self.samples[i].image), self.detector)


def val_faces(samples: list, indices: list[int], workers: int, detector: str) -> dict[int, np.ndarray]:
    """Face boxes of the validation images `indices` (this rank's shard), detected once by `detector`
    in `workers` processes and shared by all ranks: {index: N x 4 boxes}, for the face prior (`--face-prior`)."""
    started = time.perf_counter()
    loader = DataLoader(_FaceScan(samples, indices, detector), batch_size=None, num_workers=workers)
    boxes = {int(i): np.asarray(b, np.float32) for i, b in loader}
    if dist.is_initialized():
        shards: list = [None] * dist.get_world_size()
        dist.all_gather_object(shards, boxes)
        boxes = {i: b for shard in shards for i, b in shard.items()}
    log.info("face prior: %d faces in %d validation images (%.0f s)", sum(len(b) for b in boxes.values()),
             len(boxes), time.perf_counter() - started)
    return boxes


def batch_faces(scorer: Scorer, indices: list[int], image: torch.Tensor) -> torch.Tensor | None:
    """Face maps of validation images on the batch's grid, or None when the run has no face prior."""
    if scorer.faces is None:
        return None
    return face_maps([scorer.faces[i] for i in indices], tuple(image.shape[-2:]), [scorer.sizes[i][1] / scorer.sizes[i][0] for i in indices])


@torch.no_grad()
def evaluate(
    model: SaliencyUNet,
    loader: DataLoader,
    scorer: Scorer,
    device: torch.device,
    show: bool,
    precision: str = "auto",
    gather: bool = True,
    full: bool = False,
) -> dict[str, Any]:
    """Validation against each image's original-resolution ground truth, prepared once in `scorer`.

    The forward runs on the loader's model-size tensors (resized by `hub.preprocess`, as in
    `predict`). By default (every epoch) the maps stay on the device and CC, KLD, NSS and SIM are
    computed there in batches (`Scorer.score_batch`). With `full`, each map goes back to its
    original size through `hub.preprocess.tensor_to_maps` (the code `predict` uses) and is scored
    with every benchmark metric in numpy, as `python -m train.evaluate` does. Each rank scores its
    shard; rows are gathered everywhere.
    """
    model.eval()
    if gather and dist.is_initialized():
        # DDP broadcasts BatchNorm statistics from rank 0 at the start of a forward, so after the
        # last training step each rank holds its own: validate with rank 0's, the saved weights.
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    rows: list[dict[str, Any]] = []
    low = resolve_precision(device, precision)
    for image, _, _, index in tqdm(loader, desc="validate", unit="batch", disable=not show, leave=False):
        indices = index.tolist()
        with torch.autocast(device_type=device.type, dtype=low or torch.bfloat16, enabled=low is not None):
            pred = model.infer(image.to(device).contiguous(memory_format=torch.channels_last), faces=batch_faces(scorer, indices, image))
        if full:
            maps = tensor_to_maps(pred, [scorer.sizes[i] for i in indices])
            rows += [scorer.score(i, m) for i, m in zip(indices, maps)]
        else:
            rows += scorer.score_batch(pred, indices)
    if gather:  # each rank scored its shard; False where one rank scores every image alone
        rows = gather_rows(rows)
    return {"n_images": len(rows), **summarize(rows)}


class EMA:
    """Exponential moving average of a model's weights and BN statistics: the weights that get published.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates, so the average is not
    dominated by the random initial weights in a short run.
    """

    def __init__(self, model: SaliencyUNet, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema {decay} must be between 0 and 1 (e.g. 0.998), or 0 for none.")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        pairs = zip(self.module.state_dict().values(), model.state_dict().values())
        floats, others = [], []
        for mine, theirs in pairs:
            (floats if mine.dtype.is_floating_point else others).append((mine, theirs))
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [b.detach() for _, b in floats], 1.0 - decay)
        for mine, theirs in others:  # BN batch counters
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


BLUR_GRID = (0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06)


@torch.no_grad()
def calibrate_blur(
    out: Path, val_set: SaliencyDataset, scorer: Scorer, device: torch.device, cfg: TrainConfig, best: dict[str, Any], n_train: int
) -> dict[str, Any]:
    """Pick the output blur (`BLUR_GRID`, a fraction of the map's longer side) that scores best on validation.

    The exported best model's validation maps are computed once and each blur is scored on the
    device against the prepared ground truth (`Scorer.score_batch`). The model is re-exported with
    the chosen blur in its config.json (so `predict` applies it) and validated with every metric
    (`validate_best`); the returned `best` carries those scores and the grid. Chosen by the
    --select-metric where it is a map metric (cc, kld, sim), else by KLD.
    """
    model = SaliencyUNet.from_pretrained(out).to(device)
    metric = cfg.select_metric if cfg.select_metric in ("cc", "kld", "sim") else "kld"
    loader = DataLoader(val_set, batch_sampler=SizeBatchSampler(val_set.sizes, cfg.batch_size), num_workers=cfg.workers)
    preds, indices = [], []
    low = resolve_precision(device, cfg.precision)
    model.eval()
    for image, _, _, index in loader:
        with torch.autocast(device_type=device.type, dtype=low or torch.bfloat16, enabled=low is not None):
            x = image.to(device).contiguous(memory_format=torch.channels_last)
            preds.append(model.infer(x, faces=batch_faces(scorer, index.tolist(), image)))
        indices.append(index.tolist())
    grid: dict[float, float] = {}
    for blur in BLUR_GRID:
        values = []
        for pred, batch in zip(preds, indices):
            rows = scorer.score_batch(gaussian_blur(pred, blur * max(pred.shape[-2:])), batch, metrics=(metric,), baselines=False)
            values += [r[metric] for r in rows if metric in r]
        grid[blur] = float(np.mean(values))
    chosen = min(grid, key=grid.get) if metric in LOWER_IS_BETTER else max(grid, key=grid.get)
    log.info("blur calibration (validation %s): %s -> blur %g", metric,
             ", ".join(f"{b:g}: {v:.4f}" for b, v in grid.items()), chosen)
    blurred_model = SaliencyUNet(replace(model.config, blur=chosen)).to(device)
    blurred_model.load_state_dict(model.state_dict())
    best = {**best, "blur": chosen, "blur_grid": {f"{b:g}": v for b, v in grid.items()}, "blur_metric": metric}
    return validate_best(out, val_set, scorer, device, cfg, best, n_train, blurred_model)


@torch.no_grad()
def validate_best(
    out: Path, val_set: SaliencyDataset, scorer: Scorer, device: torch.device, cfg: TrainConfig, best: dict[str, Any],
    n_train: int, model: SaliencyUNet | None = None,
) -> dict[str, Any]:
    """Score the exported best model (or `model`, then exported) with every benchmark metric; update the card.

    Epochs are validated with the device metrics only (CC, KLD, NSS, SIM); the rank-based ones
    (AUC-Judd, AUC-Borji, sAUC, IG) cost ~30 ms of CPU per 480x640 image, so they are computed
    here, once, on the weights that are published. Runs on rank 0 alone, on every image.
    """
    model = model if model is not None else SaliencyUNet.from_pretrained(out).to(device)
    loader = DataLoader(val_set, batch_sampler=SizeBatchSampler(val_set.sizes, cfg.batch_size), num_workers=cfg.workers)
    val = evaluate(model, loader, scorer, device, show=False, precision=cfg.precision, gather=False, full=True)
    best = {**best, "val": val, "score": val["metrics"].get(cfg.select_metric, best["score"])}
    export_model(model, cfg, out, best, n_train)
    write_metrics(out, json.loads((out / "metrics.json").read_text())["epochs"], best)
    return best


def save_checkpoint(path: Path, **state: Any) -> None:
    """Atomic: torch.save to a temp file, then rename, so a kill never leaves a torn checkpoint."""
    atomic_write(path, lambda tmp: torch.save(state, tmp), per_process=False)  # rank 0 alone saves


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator a run draws from: Python, numpy, torch's CPU one, and this process's GPU's."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def write_metrics(out: Path, history: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    atomic_write_text(out / "metrics.json", json.dumps({"epochs": history, "best": best}, indent=1))
    columns = ["epoch", "train_loss", "img_per_s", "lr"] + [f"val_{k}" for k in ALL_METRICS] + ["seconds"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({"epoch": row["epoch"], "train_loss": row["train_loss"], "img_per_s": row["img_per_s"],
                         "lr": row["lr"], "seconds": row["seconds"],
                         **{f"val_{k}": v for k, v in row["val"]["metrics"].items()}})
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def tensorboard_writer(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out / "runs"))


# -- the run ---------------------------------------------------------------------------------------
def run(cfg: TrainConfig) -> dict[str, Any]:
    device, rank, world = setup_distributed(cfg.device)
    main_rank = rank == 0
    out = Path(cfg.out)
    seed_everything(cfg.seed)
    cfg.resolve()
    precision = precision_name(device, cfg.precision)

    init = load_init(cfg) if cfg.init_from and not cfg.resume else None
    model_config = SaliencyConfig(backbone=cfg.backbone, input_size=cfg.input_size, center_prior=cfg.center_prior,
                                  keep_aspect=cfg.keep_aspect, flip_tta=cfg.flip_tta, blur=cfg.blur_value() or 0.0,
                                  face_prior=cfg.face_prior, face_detector=cfg.face_detector)
    cfg.model = model_config.to_dict()
    checkpoint_path = out / "checkpoints" / "last.pt"
    checkpoint = None
    if cfg.resume:
        if not checkpoint_path.is_file():
            raise DataError(f"--resume was given but {checkpoint_path} does not exist; drop --resume to start a new run.")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        saved = checkpoint["config"]
        # A checkpoint from before face_detector existed has nothing to disagree with there: the run
        # goes on with this one's. Other fields it lacks take their defaults through SaliencyConfig.
        saved_model = {"face_detector": cfg.face_detector, **saved["model"]}
        differs = [k for k, v in SaliencyConfig.from_dict(saved_model).to_dict().items() if cfg.model.get(k) != v]
        if differs:
            raise DataError(f"{checkpoint_path} was trained with another model config ({', '.join(differs)}); use the same "
                            "--size/--backbone/--center-prior/--keep-aspect/--flip-tta/--blur/--face-prior/--face-detector.")
        changed = schedule_changes(saved, cfg)
        if checkpoint.get("world", 1) != world:
            changed.append(f"processes {checkpoint.get('world', 1)} -> {world} (the global batch)")
        if changed:
            raise DataError(f"--resume continues the run in {out} on its own schedule, but {', '.join(changed)}; "
                            "resume with the run's flags (see its train_config.json), or start a new run in another --out.")

    splits = load_splits(cfg.data_dirs, out, cfg.val_fraction, cfg.seed)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        train_samples = scan(splits["train"], cfg.skip_bad, workers=max(cfg.workers, 2))
        val_samples = scan(splits["val"], cfg.skip_bad, workers=max(cfg.workers, 2))
        write_split({"train": train_samples, "val": val_samples}, cfg.data_dirs, out)
        runs_on = {"device": str(device), "precision": precision, "processes": world}
        atomic_write_text(out / "train_config.json", json.dumps({**asdict(cfg), "runs_on": runs_on}, indent=1))
    if world > 1:
        dist.barrier()  # rank 0 has scanned the data and written split.json: every rank uses its list
        kept = json.loads((out / "split.json").read_text())
        by_id = {k: {s.id: s for s in v} for k, v in splits.items()}
        train_samples, val_samples = ([by_id[k][i] for i in kept[k]] for k in ("train", "val"))
    log.info("data: %d train, %d val images from %s", len(train_samples), len(val_samples), cfg.data_name)

    weights = None if not cfg.pretrained_encoder or checkpoint is not None or init is not None else cfg.backbone_weights
    model = SaliencyUNet(model_config, backbone_weights=weights)
    if init is not None and checkpoint is None:
        load_strict(model, init.state_dict(), source=cfg.init_from)
    del init
    # channels_last is the layout oneDNN and cuDNN convolve fastest (2x on a CPU in fp32 and bf16).
    model = model.freeze(cfg.frozen).to(device, memory_format=torch.channels_last)
    log.info("precision: %s on %s%s", precision if precision == "fp32" else f"{precision} autocast", device,
             f" ({world} processes)" if world > 1 else "")
    train_set = SaliencyDataset(train_samples, cfg.input_size, augment=True, seed=cfg.seed, keep_aspect=cfg.keep_aspect,
                                crop_scale=cfg.crop_scale)
    val_set = SaliencyDataset(val_samples, cfg.input_size, augment=False, keep_aspect=cfg.keep_aspect, targets=False)
    # Batches of one model size each (one bucket unless --keep-aspect); shuffled by (seed, epoch), so a
    # resumed run replays the order; validation batches are split across ranks with no image repeated.
    train_sampler = SizeBatchSampler(train_set.sizes, cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank, world=world,
                                     drop_uneven=True)
    val_sampler = SizeBatchSampler(val_set.sizes, cfg.batch_size, rank=rank, world=world)
    loader_args = {"num_workers": cfg.workers, "pin_memory": device.type == "cuda"}
    val_loader = DataLoader(val_set, batch_sampler=val_sampler, persistent_workers=cfg.workers > 0, **loader_args)
    # Not persistent: workers start each epoch with the dataset's current epoch (it seeds the augmentation).
    train_loader = DataLoader(train_set, batch_sampler=train_sampler, **loader_args)
    steps_per_epoch = max(1, len(train_sampler))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    ddp_model: torch.nn.Module = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, min(cfg.warmup_steps, steps_per_epoch * cfg.epochs // 10 + 1), steps_per_epoch * cfg.epochs)
    loss_fn = SaliencyLoss(cfg.loss)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    # fp16 needs loss scaling (its gradients underflow); bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    scorer = Scorer(val_samples, train_samples=train_samples, seed=cfg.seed, load=[i for b in val_sampler for i in b])
    scorer.faces = (val_faces(val_samples, [i for b in val_sampler for i in b], cfg.workers, cfg.face_detector)
                    if cfg.face_prior > 0 else None)

    start_epoch, history, best, stale = 1, [], None, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"], device)
        start_epoch, history, best, stale = checkpoint["epoch"] + 1, checkpoint["history"], checkpoint["best"], checkpoint["stale"]
        log.info("resumed from %s after epoch %d", checkpoint_path, checkpoint["epoch"])

    published = ema.module if ema is not None else model  # the weights that are validated and exported
    writer = tensorboard_writer(out) if main_rank else None
    show = main_rank and sys.stderr.isatty()
    columns = ALL_METRICS if cfg.full_metrics_every else EPOCH_METRICS  # the rank-based ones are scored at the end
    if main_rank:
        print(f"{'epoch':>5s} {'loss':>8s} {'img/s':>7s} " + " ".join(f"{k:>9s}" for k in columns), flush=True)
    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        train_set.set_epoch(epoch)
        train_sampler.set_epoch(epoch)
        try:
            stats = train_one_epoch(ddp_model, train_loader, loss_fn, optimizer, scheduler, device, cfg, epoch, show, ema, scaler)
        except NonFiniteLoss as err:
            raise NonFiniteLoss(
                f"{err}; stopped. The last good checkpoint {checkpoint_path} is intact: lower --lr or check the data, "
                "then run again with --resume."
            ) from None
        val = evaluate(published, val_loader, scorer, device, show, cfg.precision,
                       full=cfg.full_metrics_every > 0 and epoch % cfg.full_metrics_every == 0)
        record = {"epoch": epoch, "train_loss": stats["loss"], "img_per_s": stats["img_per_s"],
                  "lr": scheduler.get_last_lr()[-1], "val": val, "seconds": time.perf_counter() - started}
        history.append(record)
        score = val["metrics"].get(cfg.select_metric)
        if score is None:
            raise DataError(f"--select-metric {cfg.select_metric} was not computed on the validation set "
                            f"(available: {sorted(val['metrics'])}).")
        improved = is_better(score, best["score"] if best else None, cfg.select_metric)
        stale = 0 if improved else stale + 1
        if improved:
            best = {"epoch": epoch, "metric": cfg.select_metric, "score": score, "val": val}
        if main_rank:
            m = val["metrics"]
            print(f"{epoch:5d} {stats['loss']:8.4f} {stats['img_per_s']:7.1f} "
                  + " ".join(f"{m[k]:9.4f}" if k in m else f"{'':9s}" for k in columns) + (" *" if improved else ""), flush=True)
            if writer is not None:
                writer.add_scalar("train/loss", stats["loss"], epoch)
                for k, v in m.items():
                    writer.add_scalar(f"val/{k}", v, epoch)
            if improved:
                export_model(published, cfg, out, best, len(train_samples))
            write_metrics(out, history, best)
            save_checkpoint(checkpoint_path, model=model.state_dict(), ema=ema.state_dict() if ema is not None else None,
                            optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
                            epoch=epoch, rng=rng_state(device), config=asdict(cfg), world=world,
                            history=history, best=best, stale=stale)
        if cfg.patience and stale >= cfg.patience:
            if main_rank:
                log.info("no improvement of %s for %d epochs: stopping early", cfg.select_metric, stale)
            break
    if writer is not None:
        writer.close()
    if dist.is_initialized():
        # What follows (blur calibration, push) runs on rank 0 alone with no collective, so the
        # other ranks leave now instead of waiting in a barrier that NCCL's watchdog would time out.
        dist.barrier()
        dist.destroy_process_group()
    if main_rank and best is not None:
        if cfg.blur_value() is None:
            best = calibrate_blur(out, val_set, scorer, device, cfg, best, len(train_samples))
        else:
            best = validate_best(out, val_set, scorer, device, cfg, best, len(train_samples))
        print(f"best epoch {best['epoch']} ({cfg.select_metric} {best['score']:.4f}); validation:")
        print(format_table(best["val"]))
        if cfg.push_to_hub:
            export_model(published, cfg, out, best, len(train_samples), reload=True)
            print(push(out, cfg.push_to_hub, private=True if cfg.private else None))
    return {"history": history, "best": best}


def load_init(cfg: TrainConfig) -> SaliencyUNet:
    """The published saliency model --init-from names (folder or Hub repo id), checked against this run's architecture."""
    try:
        init = SaliencyUNet.from_pretrained(cfg.init_from)
    except (OSError, ValueError) as err:
        raise DataError(f"--init-from {cfg.init_from}: could not load a saliency model there ({err}); pass a folder "
                        "written by `python -m train` / save_pretrained, or a Hub model repo id.") from None
    theirs = init.config
    clashes = [f"--{flag.replace('_', '-')} {getattr(theirs, flag)}" for flag in ("backbone", "center_prior")
               if getattr(theirs, flag) != getattr(cfg, flag)]
    if clashes:
        raise DataError(f"--init-from {cfg.init_from} has another architecture than this run; add {' '.join(clashes)}.")
    if tuple(theirs.input_size) != cfg.input_size:
        log.info("--init-from %s was trained at %s; fine-tuning at %s", cfg.init_from,
                 "x".join(map(str, theirs.input_size)), cfg.size)
    return init


def export_model(model: SaliencyUNet, cfg: TrainConfig, out: Path, best: dict[str, Any], n_train: int, reload: bool = False) -> None:
    """Write the best weights + card into OUT. With reload, only the card is refreshed (repo id known)."""
    card = {
        "training": {
            "data": f"{cfg.data_name} ({n_train} training images)",
            "epochs": f"{best['epoch']} of {cfg.epochs} (best by validation {cfg.select_metric})",
            "loss": cfg.loss, "optimizer": f"AdamW lr {cfg.lr} (encoder x{cfg.encoder_lr:g}), betas (0.9, 0.99), "
            f"weight decay {cfg.weight_decay}, warm-up + cosine", "batch_size": cfg.batch_size,
            "input_size": cfg.size, "backbone_init": cfg.init_from or cfg.backbone_weights, "frozen": cfg.freeze, "seed": cfg.seed,
            "command": cfg.command(),
        },
        "evaluation": {"dataset": {"name": cfg.data_name, "split": "val"}, **best["val"]},
        "datasets": [d.resolve().name.lower() for d in cfg.data_dirs],
        "repo_id": cfg.push_to_hub,
    }
    if reload:
        model = SaliencyUNet.from_pretrained(out)
    export(model, out, **card)


# -- command line -----------------------------------------------------------------------------------
HELP = {
    "data": "dataset folder(s) (images/, maps/, optional fixations/ and fixations.csv; train/ and val/ or the SALICON "
            "layout); several are pooled, each split on its own",
    "center_prior": "learned Gaussian centre-bias maps fed to the decoder (0: none)",
    "keep_aspect": "keep each image's aspect: longer side max(HxW), shorter side a multiple of 32 (batches of one size)",
    "flip_tta": "average the maps of the image and its mirror image (validation and predict())",
    "face_prior": "weight w of the face prior: the map times (1 + w x a Gaussian on each face the detector finds; "
                  "hub.faces), in validation and predict() (0: none)",
    "face_detector": "the face prior's detector: mtcnn (a small CNN face detector, hub.mtcnn), frontal (OpenCV's LBP "
                     "frontal-face cascade) or frontal+profile (and its Haar profile-face cascade both ways; 7x mtcnn's time)",
    "blur": "output blur, sigma as a fraction of the map's longer side, or 'auto': calibrated on validation after training",
    "crop_scale": "smallest area fraction of the random resized crop (augmentation)",
    "ema": "publish an exponential moving average of the weights with this decay (e.g. 0.998; 0: the raw weights)",
    "out": "output folder: loadable model + metrics + checkpoints",
    "size": "training and inference resolution HxW (becomes the model's input_size)",
    "loss": "weighted terms from kld, cc, nss, sim, mse, e.g. 'kld=1,cc=0.5' (the default) or 'mse=1' (the reference)",
    "backbone_weights": "'imagenet' (download, the default), 'none' (random init) or a local .pth/.safetensors file",
    "freeze": f"comma-separated encoder stages to freeze, from {','.join(STAGES)}, or 'none'; auto: stem,layer1 for a "
              "pretrained encoder (ImageNet, a file, --init-from), none for a random one",
    "encoder_lr_mult": "the encoder's learning rate as a multiple of --lr; auto: 0.1 for a pretrained encoder, 1 for a random one",
    "init_from": "start from a published saliency model (folder or Hub repo id), e.g. SALICON weights to fine-tune on "
                 "MIT1003; its architecture must match --backbone/--center-prior",
    "select_metric": "validation metric that picks the best epoch (kld: lower is better); one of cc, kld, nss, sim, "
                     "which are scored every epoch",
    "full_metrics_every": "also score the rank-based metrics (AUC-Judd, AUC-Borji, sAUC, IG) every N epochs (0: only on the "
                          "best model at the end; they cost ~30 ms of CPU per 480x640 image)",
    "patience": "stop after this many epochs without improvement (0: never)",
    "resume": "continue from OUT/checkpoints/last.pt",
    "push_to_hub": "push OUT to this Hub model repo at the end",
    "max_steps_per_epoch": "cap the optimizer steps per epoch (0: a full pass), for smoke tests",
    "precision": "auto: bf16 autocast where the device does bf16 natively (CUDA compute capability >= 8.0, AVX512-BF16/AMX "
                 "CPUs), fp16 with loss scaling on CUDA 7.x (V100, T4), else fp32; or bf16, fp16, fp32",
    "skip_bad": "train without the samples the data scan rejects instead of stopping",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP.get(f.name))
        elif f.name == "precision":
            parser.add_argument(flag, choices=PRECISIONS, default=default, help=HELP.get(f.name))
        elif f.name == "face_detector":
            parser.add_argument(flag, choices=list(FACE_DETECTORS), default=default, help=HELP.get(f.name))
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=default, required=f.name == "data", help=HELP.get(f.name))
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default, required=f.name in ("data", "out"), help=HELP.get(f.name))
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging("train", "hub")
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        cfg.input_size  # noqa: B018 - validates --size early
        SaliencyLoss(cfg.loss)
        if cfg.select_metric not in EPOCH_METRICS and cfg.full_metrics_every != 1:
            raise ValueError(f"--select-metric {cfg.select_metric} is not scored every epoch; choose one of "
                             f"{', '.join(EPOCH_METRICS)}, or add --full-metrics-every 1.")
        run(cfg)
    except (DataError, ValueError, NonFiniteLoss, RuntimeError, FileNotFoundError, PublishError) as err:
        print_error(err)
        return 1
    return 0
