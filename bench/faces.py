"""The face prior's detectors (hub.faces): search time per photo and photos per second with threads.

    python -m bench.faces [--data ../shared/data/eyecrowd/images] [--limit 16] [--threads 1,2] [--repeat 3]

For each detector of `hub.config.FACE_DETECTORS` ("frontal", "frontal+profile", "mtcnn"; the
cascades only where OpenCV has its cascade classifier): the median time of one search (OpenCV's
or torch's own threads on one photo, as `predict()` on a CPU), then the throughput of a pool of N
threads, one photo each (as `predict()` beside a GPU): OpenCV and torch release the GIL, so
threads search in parallel. Photos: a folder's images (default: eyecrowd's crowds,
full of faces, when present; else the NUS scenes or scikit-image's photos), decoded before timing.
Figures, never assertions; the CPU is printed with them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2

from bench.common import ROOT, cpu_summary, folder_photos
from hub.config import FACE_DETECTORS
from hub.faces import detect_faces

EYECROWD_IMAGES = ROOT.parent / "shared" / "data" / "eyecrowd" / "images"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faces", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="a folder of photos (default: eyecrowd's images when present)")
    p.add_argument("--limit", type=int, default=16, help="photos to search")
    p.add_argument("--threads", default="1,2", help="pool sizes for the throughput rows, e.g. 1,2,8")
    p.add_argument("--repeat", type=int, default=3, help="timed passes over the photos (the median is reported)")
    args = p.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",") if t]
    except ValueError:
        p.error(f"--threads {args.threads!r} is not a list of thread counts, e.g. 1,2,8")
    if args.limit < 1 or args.repeat < 1 or not threads or min(threads) < 1:
        p.error("--limit, --repeat and every --threads count must be at least 1")
    images, source = folder_photos(args.data or (EYECROWD_IMAGES if EYECROWD_IMAGES.is_dir() else None), args.limit, "--data")
    print(f"CPU: {cpu_summary()}")
    print(f"photos: {len(images)} from {source}; {args.repeat} timed passes after one warm-up\n")
    print(f"{'detector':>16} | {'faces':>5} | {'ms/photo (one at a time)':>24} | " + " | ".join(f"{f'{n} threads: photos/s':>20}" for n in threads))
    detectors = [d for d in FACE_DETECTORS if d == "mtcnn" or hasattr(cv2, "CascadeClassifier")]
    if len(detectors) < len(FACE_DETECTORS):
        print(f"OpenCV {cv2.__version__} has no cascade classifier: only mtcnn is timed\n")
    for detector in detectors:
        found = sum(len(detect_faces(im, detector)) for im in images)  # warm-up: loads the cascades
        one = []
        for _ in range(args.repeat):
            for im in images:
                start = time.perf_counter()
                detect_faces(im, detector)
                one.append(time.perf_counter() - start)
        rates = []
        for n in threads:
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(lambda im: detect_faces(im, detector), images[:n]))  # each thread's classifiers
                passes = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    list(pool.map(lambda im: detect_faces(im, detector), images))
                    passes.append(len(images) / (time.perf_counter() - start))
            rates.append(statistics.median(passes))
        print(f"{detector:>16} | {found:>5} | {statistics.median(one) * 1000:>24.1f} | " + " | ".join(f"{r:>20.1f}" for r in rates))
    print(f"\nload average at the end: {cpu_summary().rsplit('load average ', 1)[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
