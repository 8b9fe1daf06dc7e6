"""`python -m train`: fine-tune SaliencyUNet on eye-tracking data. One readable loop.

    python -m train --data ../shared/data/nus_scene --out runs/nus --backbone-weights none
    torchrun --nproc_per_node 2 -m train --data ... --out ...        # DDP, same flags

OUT becomes a `from_pretrained`-loadable folder (best weights, config.json, model card with the
validation metrics as model-index) plus metrics.json, metrics.csv, train_config.json,
split.json and checkpoints/last.pt for `--resume`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm import tqdm

from hub import SaliencyConfig, SaliencyUNet
from hub.cli import setup_logging
from hub.config import STAGES
from hub.preprocess import tensor_to_maps
from hub.publish import PublishError, export, push
from hub.runtime import pick_device
from train.data import DataError, SaliencyDataset, atomic_write_text, load_splits, scan, write_split
from train.evaluate import ALL_METRICS, Scorer, format_table, summarize
from train.losses import DEFAULT_LOSS, SaliencyLoss

log = logging.getLogger("train")

LOWER_IS_BETTER = {"kld", "loss"}


@dataclass
class TrainConfig:
    """Everything a run depends on; each field is a command-line flag of the same name."""

    data: str = ""
    out: str = ""
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-4
    encoder_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    clip_grad: float = 1.0
    size: str = "288x384"
    loss: str = DEFAULT_LOSS
    backbone: str = "resnet50"
    backbone_weights: str = "imagenet"
    freeze: str = "stem,layer1"
    val_fraction: float = 0.1
    select_metric: str = "cc"
    patience: int = 0
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    skip_bad: bool = False
    resume: bool = False
    push_to_hub: str | None = None
    private: bool = False
    max_steps_per_epoch: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # resolved SaliencyConfig, filled in by main

    @property
    def input_size(self) -> tuple[int, int]:
        try:
            h, w = (int(v) for v in self.size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--size {self.size!r} must be HxW, e.g. 288x384.") from None
        return h, w

    @property
    def frozen(self) -> tuple[str, ...]:
        return tuple(s for s in (p.strip() for p in self.freeze.split(",")) if s and s != "none")


# -- distributed ---------------------------------------------------------------------------------
def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not dist.is_initialized():
        return rows
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


def mean_across_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


# -- building blocks -------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: SaliencyUNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW on trainable parameters only; the pretrained encoder learns `encoder_lr_mult` slower."""
    encoder = {id(p) for p in model.encoder_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in encoder], "lr": cfg.lr * cfg.encoder_lr_mult},
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
) -> dict[str, float]:
    """One pass over the training data; returns the mean loss and images/s."""
    model.train()
    amp = device.type == "cuda"
    total, count, start = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not show, leave=False)
    for step, (image, gt, fix, _) in enumerate(bar):
        if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
            break
        image = image.to(device, non_blocking=True)
        if amp:
            image = image.contiguous(memory_format=torch.channels_last)
        gt, fix = gt.to(device, non_blocking=True), fix.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(image)
        loss, parts = loss_fn(pred, gt, fix)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the loss became {float(loss.detach())} at epoch {epoch}, step {step} ({parts})")
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(image)
        count += len(image)
        bar.set_postfix(loss=f"{total / count:.4f}", img_s=f"{count / (time.perf_counter() - start):.1f}")
    elapsed = time.perf_counter() - start
    return {"loss": mean_across_ranks(total / max(count, 1)), "img_per_s": count * max(1, _world()) / elapsed}


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


@torch.no_grad()
def evaluate(
    model: SaliencyUNet,
    loader: DataLoader,
    scorer: Scorer,
    device: torch.device,
    show: bool,
) -> dict[str, Any]:
    """Validation with the benchmark metrics at each image's original resolution.

    The forward runs on the loader's model-size tensors (resized by `hub.preprocess`, as in
    `predict`), and maps go back to the original size through `hub.preprocess.tensor_to_maps`,
    the same code `predict` uses. Each rank scores its shard; rows are gathered everywhere.
    """
    model.eval()
    rows = []
    for image, _, _, index in tqdm(loader, desc="validate", unit="batch", disable=not show, leave=False):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(image.to(device))
        sizes = [scorer.sizes[int(i)] for i in index]
        for i, m in zip(index.tolist(), tensor_to_maps(pred, sizes)):
            rows.append(scorer.score(i, m))
    rows = gather_rows(rows)
    return {"n_images": len(rows), **summarize(rows)}


def save_checkpoint(path: Path, **state: Any) -> None:
    """Atomic: torch.save to a temp file, then rename, so a kill never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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
    device = pick_device(cfg.device)
    rank, world = init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    main_rank = rank == 0
    out = Path(cfg.out)
    seed_everything(cfg.seed)

    model_config = SaliencyConfig(backbone=cfg.backbone, input_size=cfg.input_size, frozen_stages=cfg.frozen)
    cfg.model = model_config.to_dict()
    checkpoint_path = out / "checkpoints" / "last.pt"
    checkpoint = None
    if cfg.resume:
        if not checkpoint_path.is_file():
            raise DataError(f"--resume was given but {checkpoint_path} does not exist; drop --resume to start a new run.")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if checkpoint["config"]["model"] != cfg.model:
            raise DataError(f"{checkpoint_path} was trained with another model config; use the same --size/--freeze/--backbone.")

    splits = load_splits(Path(cfg.data), out, cfg.val_fraction, cfg.seed)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        train_samples = scan(splits["train"], cfg.skip_bad, workers=max(cfg.workers, 2))
        val_samples = scan(splits["val"], cfg.skip_bad, workers=max(cfg.workers, 2))
        write_split({"train": train_samples, "val": val_samples}, Path(cfg.data), out)
        atomic_write_text(out / "train_config.json", json.dumps(asdict(cfg), indent=1))
    if world > 1:
        dist.barrier()  # rank 0 has scanned the data and written split.json: every rank uses its list
        kept = json.loads((out / "split.json").read_text())
        by_id = {k: {s.id: s for s in v} for k, v in splits.items()}
        train_samples, val_samples = ([by_id[k][i] for i in kept[k]] for k in ("train", "val"))
    log.info("data: %d train, %d val images from %s", len(train_samples), len(val_samples), cfg.data)

    weights = None if cfg.backbone_weights.lower() == "none" or checkpoint is not None else cfg.backbone_weights
    model = SaliencyUNet(model_config, backbone_weights=weights).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    train_set = SaliencyDataset(train_samples, cfg.input_size, augment=True, seed=cfg.seed)
    val_set = SaliencyDataset(val_samples, cfg.input_size, augment=False)
    if world > 1:
        train_sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
        val_sampler = DistributedSampler(val_set, num_replicas=world, rank=rank, shuffle=False)
    else:
        train_sampler = None
        val_sampler = SequentialSampler(val_set)
    loader_args = {"num_workers": cfg.workers, "pin_memory": device.type == "cuda", "persistent_workers": cfg.workers > 0}
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, sampler=val_sampler, **loader_args)
    steps_per_epoch = max(1, len(train_set) // (cfg.batch_size * world))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    ddp_model: torch.nn.Module = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, min(cfg.warmup_steps, steps_per_epoch * cfg.epochs // 10 + 1), steps_per_epoch * cfg.epochs)
    loss_fn = SaliencyLoss(cfg.loss)
    scorer = Scorer(val_samples, train_samples=train_samples, seed=cfg.seed)

    start_epoch, history, best, stale = 1, [], None, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        start_epoch, history, best, stale = checkpoint["epoch"] + 1, checkpoint["history"], checkpoint["best"], checkpoint["stale"]
        log.info("resumed from %s after epoch %d", checkpoint_path, checkpoint["epoch"])

    writer = tensorboard_writer(out) if main_rank else None
    show = main_rank and sys.stderr.isatty()
    if main_rank:
        print(f"{'epoch':>5s} {'loss':>8s} {'img/s':>7s} " + " ".join(f"{k:>9s}" for k in ALL_METRICS), flush=True)
    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        train_set.set_epoch(epoch)
        # Shuffling is a function of (seed, epoch): a resumed run replays the same order.
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
            sampler = train_sampler
        else:
            sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=len(train_set) > cfg.batch_size,
                                  **{**loader_args, "persistent_workers": False})
        try:
            stats = train_one_epoch(ddp_model, train_loader, loss_fn, optimizer, scheduler, device, cfg, epoch, show)
        except NonFiniteLoss as err:
            raise NonFiniteLoss(
                f"{err}; stopped. The last good checkpoint {checkpoint_path} is intact: lower --lr or check the data, "
                "then run again with --resume."
            ) from None
        val = evaluate(model, val_loader, scorer, device, show)
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
                  + " ".join(f"{m.get(k, float('nan')):9.4f}" for k in ALL_METRICS) + (" *" if improved else ""), flush=True)
            if writer is not None:
                writer.add_scalar("train/loss", stats["loss"], epoch)
                for k, v in m.items():
                    writer.add_scalar(f"val/{k}", v, epoch)
            if improved:
                export_model(model, cfg, out, best, len(train_samples))
            write_metrics(out, history, best)
            save_checkpoint(checkpoint_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), epoch=epoch, rng=rng_state(), config=asdict(cfg),
                            history=history, best=best, stale=stale)
        if cfg.patience and stale >= cfg.patience:
            if main_rank:
                log.info("no improvement of %s for %d epochs: stopping early", cfg.select_metric, stale)
            break
    if writer is not None:
        writer.close()
    if main_rank and best is not None:
        print(f"best epoch {best['epoch']} ({cfg.select_metric} {best['score']:.4f}); validation:")
        print(format_table(best["val"]))
        if cfg.push_to_hub:
            export_model(model, cfg, out, best, len(train_samples), reload=True)
            print(push(out, cfg.push_to_hub, private=True if cfg.private else None))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return {"history": history, "best": best}


def export_model(model: SaliencyUNet, cfg: TrainConfig, out: Path, best: dict[str, Any], n_train: int, reload: bool = False) -> None:
    """Write the best weights + card into OUT. With reload, only the card is refreshed (repo id known)."""
    card = {
        "training": {
            "data": f"{Path(cfg.data).name} ({n_train} training images)",
            "epochs": f"{best['epoch']} of {cfg.epochs} (best by validation {cfg.select_metric})",
            "loss": cfg.loss, "optimizer": f"AdamW lr {cfg.lr} (encoder x{cfg.encoder_lr_mult}), betas (0.9, 0.99), "
            f"weight decay {cfg.weight_decay}, warm-up + cosine", "batch_size": cfg.batch_size,
            "input_size": cfg.size, "backbone_init": cfg.backbone_weights, "frozen": cfg.freeze, "seed": cfg.seed,
        },
        "evaluation": {"dataset": {"name": Path(cfg.data).name, "split": "val"}, **best["val"]},
        "datasets": [Path(cfg.data).name.lower()],
        "repo_id": cfg.push_to_hub,
    }
    if reload:
        model = SaliencyUNet.from_pretrained(out)
    export(model, out, **card)


# -- command line -----------------------------------------------------------------------------------
HELP = {
    "data": "dataset folder (images/, maps/, optional fixations/ and fixations.csv; train/ and val/ or the SALICON layout)",
    "out": "output folder: loadable model + metrics + checkpoints",
    "size": "training and inference resolution HxW (becomes the model's input_size)",
    "loss": "weighted terms from kld, cc, nss, sim, mse, e.g. 'kld=1,cc=0.5' (the default) or 'mse=1' (the reference)",
    "backbone_weights": "'imagenet' (download, the default), 'none' (random init) or a local .pth/.safetensors file",
    "freeze": f"comma-separated encoder stages to freeze, from {','.join(STAGES)}, or 'none'",
    "select_metric": "validation metric that picks the best epoch (kld: lower is better)",
    "patience": "stop after this many epochs without improvement (0: never)",
    "resume": "continue from OUT/checkpoints/last.pt",
    "push_to_hub": "push OUT to this Hub model repo at the end",
    "max_steps_per_epoch": "cap the optimizer steps per epoch (0: a full pass), for smoke tests",
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
            parser.add_argument(flag, action="store_true", help=HELP.get(f.name))
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
        run(cfg)
    except (DataError, ValueError, NonFiniteLoss, RuntimeError, FileNotFoundError, PublishError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
