"""Training throughput: the model step and the data loader, measured separately.

    python -m bench.train [--data ../shared/data/nus_scene] [--size 288x384] [--batch 8] [--steps 6]
                          [--workers 0,1,2] [--device auto|cpu|cuda] [--precision auto,bf16,fp16,fp32] [--json OUT]

1. model: images/s of forward + backward + AdamW step on batches already on the device, as
   `python -m train` runs it (channels_last; autocast per --precision: bf16, or fp16 with a GradScaler);
2. loader: images/s of decode + resize + augmentation (`train.data.SaliencyDataset`) per worker count.
The smaller of the two limits training; the last line says which. Figures, never assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hub import SaliencyConfig, SaliencyUNet
from hub.config import parse_size
from hub.runtime import pick_device, precision_name, resolve_precision
from train.data import SaliencyDataset, find_samples
from train.losses import SaliencyLoss

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nus_scene"


def synthetic_dataset(root: Path, n: int = 32) -> Path:
    """640x480 noise photos with a blob map, for machines without the eye-tracking data."""
    rng = np.random.default_rng(0)
    for sub in ("images", "maps", "fixations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(root / "images" / f"{i:03d}.jpg", quality=90)
        m = np.exp(-((xx - 320) ** 2 + (yy - 240) ** 2) / 5000.0)
        Image.fromarray((m * 255).astype(np.uint8)).save(root / "maps" / f"{i:03d}.png")
        f = np.zeros((480, 640), np.uint8)
        f[rng.integers(0, 480, 50), rng.integers(0, 640, 50)] = 255
        Image.fromarray(f).save(root / "fixations" / f"{i:03d}.png")
    return root


def bench_model(size: tuple[int, int], batch: int, steps: int, device: torch.device, precision: str = "auto") -> dict[str, float]:
    """Images/s of one training step as `python -m train` runs it: channels_last, autocast per `precision`."""
    torch.manual_seed(0)
    model = SaliencyUNet(SaliencyConfig(input_size=size)).to(device, memory_format=torch.channels_last).train()
    name = precision_name(device, precision)
    low = resolve_precision(device, precision)
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None  # as `python -m train`
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = SaliencyLoss()
    x = torch.rand(batch, 3, *size, device=device).contiguous(memory_format=torch.channels_last)
    gt = torch.rand(batch, 1, *size, device=device)
    gt = gt / gt.flatten(1).sum(1).view(-1, 1, 1, 1)
    fix = (torch.rand(batch, 1, *size, device=device) > 0.999).float()
    times = []
    for step in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=low is not None):
            pred = model(x)
        loss, _ = loss_fn(pred.float(), gt, fix)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"ms_per_step": median * 1e3, "img_per_s": batch / median, "steps": steps,
            "precision": name if low is None else f"{name} autocast"}


def bench_loader(data: Path, size: tuple[int, int], batch: int, workers: int, batches: int) -> dict[str, float]:
    samples = find_samples(data)
    dataset = SaliencyDataset(samples, size, augment=True)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            images, *_ = next(it)
        except StopIteration:
            break
        n += len(images)
    elapsed = time.perf_counter() - start
    return {"workers": workers, "img_per_s": n / elapsed, "img_per_s_per_worker": n / elapsed / max(workers, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset for the loader (synthetic if absent)")
    p.add_argument("--size", default="288x384")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--loader-batches", type=int, default=6)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto,fp32", help="training precisions to time side by side (auto, bf16, fp16, fp32)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    size = parse_size(args.size)
    device = pick_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, size {args.size}, batch {args.batch}")

    models = {p: bench_model(size, args.batch, args.steps, device, p) for p in args.precision.split(",")}
    for p, r in models.items():
        print(f"model step (fwd+bwd+AdamW), --precision {p} ({r['precision']}): {r['ms_per_step']:.0f} ms per batch, "
              f"{r['img_per_s']:.2f} img/s")
    model = models[args.precision.split(",")[0]]

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data if args.data.is_dir() else synthetic_dataset(Path(tmp))
        print(f"loader data: {data}")
        loaders = []
        for workers in (int(w) for w in args.workers.split(",")):
            r = bench_loader(data, size, args.batch, workers, args.loader_batches)
            loaders.append(r)
            print(f"loader, {workers} workers: {r['img_per_s']:.1f} img/s ({r['img_per_s_per_worker']:.1f} per worker)")
    best = max(loaders, key=lambda r: r["img_per_s"])
    limit = "the model" if model["img_per_s"] < best["img_per_s"] else "the data loader"
    print(f"training is limited by {limit}: model {model['img_per_s']:.2f} img/s vs loader {best['img_per_s']:.1f} img/s "
          f"({best['workers']} workers)")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": str(device), "size": args.size, "batch": args.batch,
                                         "model": model, "model_by_precision": models, "loader": loaders, "limited_by": limit}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
