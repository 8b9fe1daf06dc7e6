"""Benchmark of the demo app: cold start, upload-to-result latency, peak memory.

    python -m bench.app                       # a random-init full-size model (ResNet50, 288 x 384)
    python -m bench.app --model DIR_OR_REPO   # a trained one
    python -m bench.app --no-browser          # skip the chromium measurement
    python -m bench.app --model DIR --precision int8   # the app's --precision (e.g. fp32 vs int8 on one CPU)

Starts `python app.py` in a subprocess on 127.0.0.1 and prints:
- cold start: process start -> first page served (HTTP 200 on /), and -> first /predict answered;
- API latency: a 640 x 480 JPEG through gradio_client's /predict (upload, inference, overlay and
  16-bit map PNGs at full size, download), median of N after one warm-up call;
- browser latency (Debian's chromium via Playwright, if installed): a real drop event on the
  upload area until the overlay image has loaded in the page, median of N;
- peak RSS of the app process (VmHWM), after all of the above, and again after one 12000 x 12000
  JPEG (the worst case the limits allow: decoded at 6000 px, maps and overlay at 4096 px).
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
DROP = """async ({selector, b64, name, type}) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, {type}));
  const target = document.querySelector(selector);
  for (const kind of ["dragenter", "dragover", "drop"]) {
    target.dispatchEvent(new DragEvent(kind, {bubbles: true, cancelable: true, dataTransfer: data}));
  }
}"""
# Chromium flags for a headless, offline run (shared with tests/test_browser.py).
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
DROP_ZONE = "#input-image button.upload-container"
OVERLAY_LOADED = "() => { const i = document.querySelector('#overlay img'); return !!i && i.complete && i.naturalWidth; }"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_photo(path: Path, seed: int, h: int = 480, w: int = 640) -> Path:
    """A 640 x 480 JPEG with some structure (smooth gradients, a disc, noise), ~60 KB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.2, 0.8, 2) * (h, w)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < (h / 6) ** 2
    rgb = np.stack([xx / w * 220, yy / h * 180, 60 + disc * 190], axis=2) + rng.normal(0, 8, (h, w, 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def peak_rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc/PID/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def page_served(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (local URL)
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def browser_latencies(url: str, photos: list[Path]) -> list[float]:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for photo in [photos[0], *photos]:  # the first drop warms the page up and is not counted
            page.goto(url)
            page.wait_for_selector(DROP_ZONE)
            data = base64.b64encode(photo.read_bytes()).decode()
            payload = {"selector": DROP_ZONE, "b64": data, "name": photo.name, "type": "image/jpeg"}
            start = time.perf_counter()
            page.evaluate(DROP, payload)
            page.wait_for_function(OVERLAY_LOADED, timeout=120_000, polling=10)
            times.append(time.perf_counter() - start)
        browser.close()
    return times[1:]


def summary(seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return f"median {statistics.median(ms):.0f} ms of {len(ms)} (min {min(ms):.0f}, max {max(ms):.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.app", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder or Hub repo id (default: random-init, full size)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--precision", default="auto", help="the app's --precision: auto, bf16, fp16, fp32 or int8")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--no-large", action="store_true", help="skip the 12000 x 12000 image")
    args = parser.parse_args(argv)

    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        tmp_dir = Path(tmp)
        model = args.model
        if model is None:
            import torch

            from hub import SaliencyConfig, SaliencyUNet

            torch.manual_seed(0)
            SaliencyUNet(SaliencyConfig(), backbone_weights=None).save_pretrained(tmp_dir / "model")
            model = str(tmp_dir / "model")
        photos = [test_photo(tmp_dir / f"photo{i}.jpg", seed=i) for i in range(args.runs)]

        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        log = open(tmp_dir / "app.log", "wb")
        start = time.perf_counter()
        app = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--model", model, "--host", "127.0.0.1", "--port", str(port),
             "--precision", args.precision],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            while not page_served(url):
                if app.poll() is not None:
                    raise SystemExit(f"the app exited:\n{(tmp_dir / 'app.log').read_text()[-3000:]}")
                time.sleep(0.02)
            cold_page = time.perf_counter() - start
            client = Client(url, verbose=False)
            client.predict(handle_file(photos[0]), api_name="/predict")
            cold_predict = time.perf_counter() - start

            api = []
            for photo in photos:
                t0 = time.perf_counter()
                client.predict(handle_file(photo), api_name="/predict")
                api.append(time.perf_counter() - t0)

            browser = []
            if not args.no_browser and CHROMIUM.exists():
                browser = browser_latencies(url, photos)
            rss, peak = peak_rss_mib(app.pid)
            large = None
            if not args.no_large:
                Image.new("RGB", (12000, 12000), (90, 120, 60)).save(tmp_dir / "large.jpg", quality=80)
                t0 = time.perf_counter()
                client.predict(handle_file(tmp_dir / "large.jpg"), api_name="/predict")
                large = (time.perf_counter() - t0, *peak_rss_mib(app.pid))
        finally:
            os.killpg(app.pid, signal.SIGTERM)
            app.wait(timeout=30)
            log.close()

    import torch

    print(f"model: {args.model or 'random-init ResNet50 U-Net, input 288 x 384'}; CPU threads: {torch.get_num_threads()}; "
          f"{os.cpu_count()} cores; torch {torch.__version__}; --precision {args.precision}")  # fmt: skip
    print(f"cold start, process start -> first page served: {cold_page:.2f} s")
    print(f"cold start, process start -> first /predict answered: {cold_predict:.2f} s")
    print(f"API /predict, 640 x 480 JPEG via gradio_client (upload, inference, PNGs, download): {summary(api)}")
    if browser:
        print(f"browser, drop of a 640 x 480 JPEG -> overlay loaded in the page (chromium): {summary(browser)}")
    else:
        print("browser: skipped (--no-browser, or /usr/bin/chromium missing)")
    print(f"app process memory: peak RSS {peak:.0f} MiB (RSS at the end {rss:.0f} MiB)")
    if large is not None:
        print(f"12000 x 12000 JPEG via /predict: {large[0]:.1f} s; peak RSS then {large[2]:.0f} MiB (RSS {large[1]:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
