"""`python -m hub predict INPUT... --model DIR_OR_REPO_ID --out DIR`: saliency maps for many images.

Inputs are image files, folders (`--recursive` for subfolders) and glob patterns. For each image
it writes OUT/<name>.png (16-bit greyscale, 0..65535 for 0..1) or OUT/<name>.npy (float32), and
with `--overlay` OUT/<name>.overlay.jpg; <name> is the image's path relative to the folder it
was found in, without its suffix. OUT/summary.csv has one row per image.

Memory stays flat however many images: images are decoded by a few threads a little ahead of
the model (decoding overlaps inference), each map is written as soon as it is computed, and
only a bounded window of images and maps is in flight. Every file is written to a temporary
name and renamed, so an interrupted run leaves complete files only, and `--skip-existing`
continues it. Files that cannot be read are listed in one message at the end while the rest
are processed. Under `torchrun --nproc_per_node N -m hub predict ...` each process takes every
N-th image (on its own GPU when there are GPUs).
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hub.analysis import top_share
from hub.cli import print_error
from hub.preprocess import COLORMAPS, load_image, map_to_image, overlay
from hub.publish import atomic_write

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
MAP_FORMATS = {"png16": ".png", "npy": ".npy"}
OVERLAY_SUFFIX = ".overlay.jpg"
SUMMARY = "summary.csv"
COLUMNS = ("image", "map", "width", "height", "peak_x", "peak_y", "top10_share", "seconds")
# The attention statistics run on a copy whose longer side is at most this, as the demo's do
# (space/render.py), so the figures do not depend on the image's resolution.


class InputError(ValueError):
    """Inputs that cannot be run as given; the message is one sentence saying what to do."""


@dataclass(frozen=True)
class Job:
    """One image: where it is, and the output name (posix path relative to OUT, no suffix)."""

    source: Path
    name: str


@dataclass
class BatchResult:
    written: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)


# -- attention statistics (to be merged with hub/analysis.py, where the demo's helpers are moving) --


def peak_and_top_share(saliency: np.ndarray, fraction: float = 0.1) -> tuple[int, int, float]:
    """(peak x, peak y, share) of an H x W map: the pixel of the maximum (first in row order) and
    `hub.analysis.top_share`, the share of all attention in its `fraction` most salient pixels
    (the demo's `top10_share`)."""
    y, x = divmod(int(np.argmax(saliency)), saliency.shape[1])
    return x, y, top_share(saliency, fraction)


# -- inputs ---------------------------------------------------------------------------------------


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(
        p for p in found
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip


def collect_inputs(inputs: Sequence[str], recursive: bool = False, exclude: Path | None = None) -> list[Job]:
    """The images named by files, folders and glob patterns, in a fixed order, each once.

    exclude: a folder whose files are never inputs (the output folder, when it lies inside an input).
    Raises InputError for an input that matches nothing, or two images that would write the same map.
    """
    jobs: list[Job] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = [Job(p, p.relative_to(path).with_suffix("").as_posix()) for p in _images_in(path, recursive)]
        elif path.is_file():
            found = [Job(path, path.stem)]
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=recursive))
            found = [Job(p, p.stem) for p in matches if p.is_file()]
            if not found:
                raise InputError(f"the pattern {text!r} matches no file; check it, or quote it so the shell does not expand it.")
        else:
            raise InputError(f"{text} does not exist; pass image files, folders or glob patterns.")
        jobs += found
    excluded = exclude.resolve() if exclude is not None else None
    seen: set[Path] = set()
    by_name: dict[str, Path] = {}
    unique = []
    for job in jobs:
        real = job.source.resolve()
        if real in seen or (excluded is not None and real.is_relative_to(excluded)):
            continue
        seen.add(real)
        if job.name in by_name:
            raise InputError(
                f"{by_name[job.name]} and {job.source} would both write the map {job.name}; "
                "pass them in separate runs with different --out folders, or their folder instead."
            )
        by_name[job.name] = job.source
        unique.append(job)
    if not unique:
        raise InputError(f"no images found in {' '.join(inputs)}; image files end in {', '.join(sorted(IMAGE_SUFFIXES))}"
                         + ("." if recursive else " (add --recursive for subfolders)."))  # fmt: skip
    return unique


# -- outputs --------------------------------------------------------------------------------------


def map_path(out: Path, job: Job, fmt: str) -> Path:
    return out / (job.name + MAP_FORMATS[fmt])


def overlay_path(out: Path, job: Job) -> Path:
    return out / (job.name + OVERLAY_SUFFIX)


def is_done(out: Path, job: Job, fmt: str, with_overlay: bool) -> bool:
    """Outputs are renamed into place complete, so existing means finished."""
    return map_path(out, job, fmt).is_file() and (not with_overlay or overlay_path(out, job).is_file())


def save_map(saliency: np.ndarray, path: Path, fmt: str) -> Path:
    """An H x W map in [0, 1] as a 16-bit greyscale PNG or a float32 .npy, atomically."""
    if fmt == "npy":
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, saliency.astype(np.float32, copy=False))
    else:
        def write(tmp: Path) -> None:
            map_to_image(saliency, bits=16).save(tmp, format="PNG")
    return atomic_write(path, write)


def _part_file(out: Path, rank: int) -> Path:
    return out / f".summary.part{rank}.csv"


def merge_summary(out: Path, jobs: Sequence[Job], fmt: str, keep_previous: bool) -> int:
    """Write OUT/summary.csv: one row per image of `jobs` that has a map, in input order.

    Rows come from the per-process part files of this run (and of interrupted earlier runs),
    and with keep_previous from the summary.csv of an earlier run; the newest row of an image
    wins. Returns the number of rows; the part files are removed.
    """
    sources = sorted(out.glob(".summary.part*.csv"), key=lambda p: p.stat().st_mtime_ns)
    if keep_previous and (out / SUMMARY).is_file():
        sources.insert(0, out / SUMMARY)
    rows: dict[str, dict[str, str]] = {}
    for source in sources:
        with open(source, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f, fieldnames=COLUMNS):
                # Skip the header, and a line cut short by a kill (missing fields or, glued to the next, extra ones).
                if None not in row and None not in row.values() and row["map"] not in ("", "map"):
                    rows[row["map"]] = row
    kept = [rows[key] for job in jobs if (key := map_path(Path(), job, fmt).as_posix()) in rows and (out / key).is_file()]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    atomic_write(out / SUMMARY, write)
    for source in sources:
        if source.name != SUMMARY:
            source.unlink(missing_ok=True)
    return len(kept)


# -- the run --------------------------------------------------------------------------------------


def _decode(job: Job) -> tuple[Job, np.ndarray | None, str | None, float]:
    start = time.perf_counter()
    try:
        image = load_image(job.source)
    except Exception as err:  # unreadable, truncated, not an image, vanished, a decompression bomb: skip, go on
        return job, None, str(err) or type(err).__name__, 0.0
    return job, image, None, time.perf_counter() - start


def run_batch(
    model: Any,
    jobs: Sequence[Job],
    out: str | Path,
    *,
    fmt: str = "png16",
    with_overlay: bool = False,
    colormap: str = "jet",
    alpha: float = 0.6,
    batch_size: int = 8,
    workers: int = 2,
    skip_existing: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> BatchResult:
    """Predict and write the maps of this process's share of `jobs` (every world_size-th from rank).

    Appends one summary row per written map to OUT/.summary.part<rank>.csv (see `merge_summary`).
    Holds at most about 2 x batch_size decoded images and batch_size maps being written at a time.
    """
    if fmt not in MAP_FORMATS:
        raise ValueError(f"map format {fmt!r} is not one of {sorted(MAP_FORMATS)}.")
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {sorted(COLORMAPS)}.")
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch size {batch_size} and workers {workers} must be at least 1.")
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = list(jobs)[rank::world_size]
    result = BatchResult()
    todo = [job for job in mine if not (skip_existing and is_done(out, job, fmt, with_overlay))]
    result.skipped = len(mine) - len(todo)
    bar = tqdm(total=len(mine), initial=result.skipped, unit="img", desc="predict", file=sys.stderr,
               disable=not progress or rank != 0, dynamic_ncols=True)  # fmt: skip
    part_path = _part_file(out, rank)
    if skip_existing and part_path.is_file() and part_path.stat().st_size:
        with open(part_path, "rb+") as f:  # an earlier run killed mid-line: end that line first
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    part = open(part_path, "a" if skip_existing else "w", newline="", encoding="utf-8")  # noqa: SIM115
    rows = csv.writer(part)

    def write(job: Job, image: np.ndarray, saliency: np.ndarray, seconds: float) -> None:
        start = time.perf_counter()
        target = map_path(out, job, fmt)
        save_map(saliency, target, fmt)
        if with_overlay:
            picture = overlay(image, saliency, colormap=colormap, alpha=alpha)
            atomic_write(overlay_path(out, job), lambda tmp: _save_jpeg(picture, tmp))
        x, y, share = peak_and_top_share(saliency)
        seconds += time.perf_counter() - start
        rows.writerow([str(job.source), target.relative_to(out).as_posix(), saliency.shape[1], saliency.shape[0],
                       x, y, f"{share:.4f}", f"{seconds:.4f}"])  # fmt: skip
        part.flush()  # a row is on disk as soon as its map: an interrupted run keeps both

    ahead = 2 * batch_size  # images decoded ahead of the model: the next batch is ready when this one ends
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as decoders, \
                ThreadPoolExecutor(1, thread_name_prefix="write") as writer:  # fmt: skip
            queue: deque[Future] = deque()
            writes: deque[Future] = deque()
            pending = iter(todo)

            def refill() -> None:
                for job in pending:
                    queue.append(decoders.submit(_decode, job))
                    if len(queue) >= ahead:
                        break

            refill()
            while queue:
                batch = []
                while queue and len(batch) < batch_size:
                    job, image, error, seconds = queue.popleft().result()
                    if error is not None:
                        result.failures.append((str(job.source), error))
                        bar.update(1)
                    else:
                        batch.append((job, image, seconds))
                refill()  # decode the next images while the model runs on these
                if not batch:
                    continue
                start = time.perf_counter()
                maps = model.predict([image for _, image, _ in batch], batch_size=len(batch))
                share = (time.perf_counter() - start) / len(batch)
                while writes and (len(writes) > batch_size or writes[0].done()):
                    writes.popleft().result()  # bounded: at most batch_size maps wait to be written
                for (job, image, seconds), saliency in zip(batch, maps):
                    writes.append(writer.submit(write, job, image, saliency, seconds + share))
                result.written += len(batch)
                bar.update(len(batch))
                del batch, maps
            while writes:
                writes.popleft().result()
    finally:
        part.close()
        bar.close()
    return result


def _save_jpeg(picture: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(picture).save(path, format="JPEG", quality=90)


def format_failures(failures: Iterable[tuple[str, str]], total: int) -> str:
    failures = sorted(failures)
    lines = [f"{len(failures)} of {total} images could not be read and have no map:"]
    lines += [f"  {reason}" if image in reason else f"  {image}: {reason}" for image, reason in failures]
    return "\n".join(lines)


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def main(args: Any) -> int:
    """`python -m hub predict` (parsed by hub/__main__.py). Returns the exit status."""
    import torch
    import torch.distributed as dist

    from hub.model import SaliencyUNet
    from hub.runtime import pick_device

    rank, world, local_rank = _distributed()
    out = Path(args.out)
    try:
        jobs = collect_inputs(args.inputs, recursive=args.recursive, exclude=out)
        device = pick_device(args.device)
    except (InputError, RuntimeError) as err:
        print_error(err)
        return 2
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if world > 1:
        # gloo: the only collectives are a barrier and gathering the failure lists (CPU objects).
        dist.init_process_group("gloo")
    try:
        try:
            model = SaliencyUNet.from_pretrained(args.model, revision=args.revision).to(device)
        except Exception as err:  # a missing folder or file, an unknown repo, no network: all say the same
            print_error(f"could not load the model {args.model} ({err}); pass a folder written by "
                        "`python -m train` / save_pretrained or a Hub repo id.")
            return 2
        if world > 1:
            log.info("rank %d of %d: %d of %d images on %s", rank, world, len(jobs[rank::world]), len(jobs), device)
        try:
            result = run_batch(
                model, jobs, out, fmt=args.format, with_overlay=args.overlay, colormap=args.colormap, alpha=args.alpha,
                batch_size=args.batch_size, workers=args.workers, skip_existing=args.skip_existing,
                rank=rank, world_size=world, progress=not args.quiet,
            )  # fmt: skip
        except KeyboardInterrupt:
            print(f"interrupted; the maps written so far are complete: run the same command with --skip-existing "
                  f"to continue ({out}).", file=sys.stderr)  # fmt: skip
            return 130
        except OSError as err:  # a full disk, a read-only folder: the outputs cannot be written
            print_error(f"could not write the outputs in {out} ({err}); free space or pick another --out, "
                        "then rerun with --skip-existing.")
            return 1
        failures, written, skipped = result.failures, result.written, result.skipped
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (result.failures, result.written, result.skipped))
            failures = [f for g in gathered for f in g[0]]
            written, skipped = sum(g[1] for g in gathered), sum(g[2] for g in gathered)
        if rank == 0:
            rows = merge_summary(out, jobs, args.format, keep_previous=args.skip_existing)
            print(f"{written} maps written, {skipped} already there (--skip-existing), {len(failures)} unreadable; "
                  f"{out / SUMMARY}: {rows} rows", file=sys.stderr)  # fmt: skip
            if failures:
                print(format_failures(failures, len(jobs)), file=sys.stderr)
        if world > 1:
            dist.barrier()
        return 1 if failures else 0
    finally:
        if world > 1:
            dist.destroy_process_group()
