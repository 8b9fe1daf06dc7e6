"""Run `python app.py` in a subprocess on 127.0.0.1 for the app and browser tests, then stop it.

Starting the app costs seconds (torch, torchvision and gradio imports), so the API tests and the
browser tests share one app, `shared_app()`, serving a tiny random-init model saved to a temp
folder; it is stopped when the test process exits. `running_app()` starts a private one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_tiny_model(directory: str | os.PathLike) -> Path:
    """A small random-init model (ResNet18 encoder, narrow decoder, 64 x 64 input): fast to load and run."""
    import torch

    from hub import SaliencyConfig, SaliencyUNet

    torch.manual_seed(0)
    config = SaliencyConfig(backbone="resnet18", decoder_channels=(64, 32, 16, 16, 8), input_size=(64, 64))
    SaliencyUNet(config, backbone_weights=None).save_pretrained(directory)
    return Path(directory)


def _page_served(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (a local test URL)
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class AppProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        """The log once it contains `text`; AssertionError with the log if it does not in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.1)
        raise AssertionError(f"{text!r} did not appear in the app's output within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def wait_served(self, timeout: float = 120.0) -> AppProcess:
        deadline = time.monotonic() + timeout
        while not _page_served(self.url):
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with code {self.process.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not serve {self.url} within {timeout:.0f} s:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the app and anything it started
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)


def start_app(
    model: str | os.PathLike, log_dir: str | os.PathLike, *args: str, env: dict[str, str] | None = None
) -> AppProcess:
    """Start `python app.py --model MODEL --host 127.0.0.1 --port FREE ARGS...` without waiting."""
    port = free_port()
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **(env or {})}
    for name in ("MODEL_ID", "MODEL_REVISION", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "GRADIO_SHARE"):
        full_env.pop(name, None)
    log_path = Path(log_dir) / f"app-{port}.log"
    cmd = [sys.executable, str(ROOT / "app.py"), "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return AppProcess(url=f"http://127.0.0.1:{port}/", process=process, log_path=log_path)


@contextlib.contextmanager
def running_app(
    model: str | os.PathLike, log_dir: str | os.PathLike, *args: str, env: dict[str, str] | None = None
) -> Iterator[AppProcess]:
    """A private app for one test; yields once its page is served, stops it afterwards."""
    app = start_app(model, log_dir, *args, env=env)
    try:
        yield app.wait_served()
    finally:
        app.stop()


_shared: AppProcess | None = None


def shared_app() -> AppProcess:
    """The app serving a tiny model that the API and browser tests share (started on first use)."""
    global _shared
    if _shared is None or _shared.process.poll() is not None:
        folder = tempfile.TemporaryDirectory(prefix="test-app-")
        model = save_tiny_model(Path(folder.name) / "model")
        app = start_app(model, folder.name)
        atexit.register(folder.cleanup)
        atexit.register(app.stop)  # runs first (last registered)
        _shared = app.wait_served()
    return _shared
