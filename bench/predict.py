"""Batch prediction speed: `python -m hub predict`'s pipeline against a plain loop over `predict()`.

    python -m bench.predict                                  # all 500 images of ../shared/data/nus_scene
    python -m bench.predict --model runs/demo --limit 100 --batch-size 8 --workers 2

Both paths take the same images (files on disk, mixed sizes) to the same outputs, a 16-bit PNG
map per image at the image's own size, in the same run, one after the other on the same model
(its inference engine is built once, before either is timed):
- loop:  `for path in images: save_map(model.predict(path), ...)`, one image at a time, as a
         user's script would (the time inside predict() alone is printed too);
- batch: `hub.batch.run_batch`, what `python -m hub predict` runs: decoding threads ahead of
         the model, batches of --batch-size, maps written by a writer thread, plus summary.csv.

These are measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, cpu_summary, load_model
from hub.batch import collect_inputs, run_batch, save_map
from hub.cli import print_error
from hub.runtime import pick_device

DATA = ROOT.parent / "shared" / "data" / "nus_scene"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="dataset folder with images/ (default ../shared/data/nus_scene)")
    p.add_argument("--model", default=None, help="trained model folder or repo id (default: a random-init stand-in)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="decoding threads of the batch path")
    p.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    images = args.data / "images"
    if not images.is_dir():
        print_error(f"{images} does not exist; pass --data, a folder with an images/ subfolder.")
        return 2
    jobs = collect_inputs([str(images)])[: args.limit]
    device = pick_device(args.device)
    model, what = load_model(args.model, device)
    print(f"model: {what}; input size {model.config.input_size}, flip_tta {model.config.flip_tta}, blur {model.config.blur}")
    print(f"device: {device}; {cpu_summary() if device.type == 'cpu' else ''}")
    print(f"images: {len(jobs)} from {images}, mixed sizes, 16-bit PNG map each")
    model.predict(str(jobs[0].source))  # build the inference engine once, outside both timings

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        start, in_predict = time.perf_counter(), 0.0
        for job in jobs:
            t = time.perf_counter()
            saliency = model.predict(str(job.source))
            in_predict += time.perf_counter() - t
            save_map(saliency, Path(tmp, "loop", job.name + ".png"), "png16")
        loop = time.perf_counter() - start

        start = time.perf_counter()
        result = run_batch(model, jobs, Path(tmp, "batch"), batch_size=args.batch_size, workers=args.workers, progress=False)
        batch = time.perf_counter() - start
    n = len(jobs)
    print()
    print("| path | images | seconds | images/s | vs loop |")
    print("|---|---|---|---|---|")
    print(f"| loop: predict() one image at a time + write | {n} | {loop:.1f} | {n / loop:.2f} | 1.00x |")
    print(f"| (of which inside predict()) | {n} | {in_predict:.1f} | {n / in_predict:.2f} | |")
    print(f"| batch: run_batch, batch {args.batch_size}, {args.workers} decoding threads | {result.written} | {batch:.1f} | "
          f"{result.written / batch:.2f} | {loop / batch:.2f}x |")  # fmt: skip
    if result.failures:
        print(f"{len(result.failures)} images could not be read: {result.failures[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
