"""How the demo serves the model: loading it once, the device, the GPU wrapper, the size limits.

Limits (documented in the README; all bound memory per request):

- uploads up to `MAX_UPLOAD_MB` (gradio refuses larger files before they reach Python);
- images up to `MAX_PIXELS` (150 MP, e.g. 12000 x 12000); larger ones get one clear error;
- an image is decoded at most `MAX_OUTPUT_SIDE` px on its longer side (JPEGs at reduced scale,
  others box-shrunk right after decoding), the network sees it at the model's input size, and
  the map and overlay are returned at the original size up to that cap (aspect kept);
- the page shows previews at most `PREVIEW_SIDE` px; the downloads are full size;
- one inference at a time per process (`INFERENCE_CONCURRENCY`), `QUEUE_SIZE` waiting requests,
  and a batch of at most `MAX_BATCH` images, read and predicted `BATCH_CHUNK` at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from hub.preprocess import load_image

log = logging.getLogger(__name__)

MAX_UPLOAD_MB = 50
MAX_PIXELS = 150_000_000
MAX_OUTPUT_SIDE = 4096
PREVIEW_SIDE = 1024
MAX_BATCH = 16
BATCH_CHUNK = 4
INFERENCE_CONCURRENCY = 1
QUEUE_SIZE = 32
# Below this many pixels on the shorter side a map says little; the user gets a warning, not an error.
TINY_SIDE = 32

F = TypeVar("F", bound=Callable[..., Any])


def on_zero_gpu() -> bool:
    """True on a Hugging Face ZeroGPU Space (it sets SPACES_ZERO_GPU=true), where the main process
    must never initialise CUDA: a GPU is attached only inside calls wrapped by `spaces.GPU`."""
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is one sentence saying what to pass instead."""


class UploadError(ValueError):
    """An upload that is not a usable image; the message is one sentence for the user."""


# -- the model ---------------------------------------------------------------------------------------


def explain_load_error(model: str, revision: str | None, err: BaseException) -> str:
    """One sentence for a failed `from_pretrained`: what went wrong and what to pass instead."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, HFValidationError):
        reason = "no such folder, and not a valid Hub repo id"
    elif isinstance(err, RevisionNotFoundError):
        reason = (
            f"the repo has no revision {revision!r}; pass --revision (or MODEL_REVISION) with an existing branch, "
            "tag or commit"
        )
    elif isinstance(err, GatedRepoError):
        reason = "the repo is gated; accept its terms on the Hub and set HF_TOKEN"
    elif isinstance(err, RepositoryNotFoundError):
        reason = "no such model repo on the Hub, or it is private and HF_TOKEN is not set"
    elif isinstance(err, LocalEntryNotFoundError):
        reason = "the Hub could not be reached and the model is not in the local cache"
    elif isinstance(err, FileNotFoundError) and os.path.isdir(model):
        reason = "the folder has no model.safetensors"
    else:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'no details'}"
    return (
        f"Could not load the model {model!r} ({reason}); pass --model DIR_OR_REPO_ID (or set MODEL_ID) "
        "with a folder written by save_pretrained or a Hub model repo id such as NAMESPACE/NAME."
    )


@dataclass(frozen=True)
class ModelSpec:
    """Which model to serve and where: what `--model/--revision/--device/--precision` (or the env) say."""

    model: str
    revision: str | None = None
    device: str = "auto"
    precision: str = "auto"  # as predict(precision=...): auto, bf16, fp16, fp32 or int8


class ModelStore:
    """Loads the model once, on first use, and hands the same instance to every request.

    Thread-safe: concurrent first requests wait for one load. A failed load is remembered for
    `retry_after_s` (so a broken configuration does not re-download on every click), then tried
    again (so a Space that started while the Hub was unreachable heals itself).

    On ZeroGPU (`on_zero_gpu()`), nothing here touches CUDA in the main process: the model is
    loaded on the CPU there, and moved to the GPU, with its inference engine built and cached,
    inside the first `predict` call, which `on_gpu` runs with a GPU attached.
    """

    def __init__(self, spec: ModelSpec, retry_after_s: float = 30.0) -> None:
        import torch

        from hub.runtime import pick_device

        self.spec = spec
        self.zero_gpu = on_zero_gpu()
        if self.zero_gpu:  # no torch.cuda call: the device is known, and not attached yet
            self.device = torch.device("cpu" if spec.device == "cpu" else "cuda")
        else:
            self.device = pick_device(spec.device)  # RuntimeError with a clear sentence if CUDA is missing
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._model: Any = None
        self._on_device: Any = None  # ZeroGPU: the copy on the GPU, made inside a GPU call
        self._error: ModelLoadError | None = None
        self._failed_at = 0.0
        self.load_seconds: float | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def error(self) -> ModelLoadError | None:
        return self._error

    def get(self) -> Any:
        """The loaded `SaliencyUNet` (loading it if needed); raises ModelLoadError.

        On ZeroGPU it stays on the CPU (see `model_for_inference`); elsewhere it is on `device`
        with its inference engine built.
        """
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is not None:
                return self._model
            if self._error is not None and time.monotonic() - self._failed_at < self.retry_after_s:
                raise self._error
            from hub import SaliencyUNet
            from hub.runtime import prepare_for_inference

            start = time.perf_counter()
            try:
                model = SaliencyUNet.from_pretrained(self.spec.model, revision=self.spec.revision)
            except Exception as err:  # the Hub client, safetensors and torch raise many kinds
                self._error = ModelLoadError(explain_load_error(self.spec.model, self.spec.revision, err))
                self._failed_at = time.monotonic()
                raise self._error from err
            if not self.zero_gpu:
                model.to(self.device)
                prepare_for_inference(model, self.spec.precision)
            self.load_seconds = time.perf_counter() - start
            self._error = None
            self._model = model
            log.info("loaded %s on %s in %.1f s", self.spec.model, "cpu (ZeroGPU)" if self.zero_gpu else self.device,
                     self.load_seconds)
            return model

    def model_for_inference(self) -> Any:
        """The model to run `predict` on. On ZeroGPU: a copy on the GPU, made (and its engine built)
        on the first call, which runs inside `spaces.GPU`; the CPU model in the main process is untouched."""
        model = self.get()
        if not self.zero_gpu:
            return model
        with self._lock:
            if self._on_device is None:
                import copy

                from hub.runtime import prepare_for_inference

                moved = copy.deepcopy(model).to(self.device)
                prepare_for_inference(moved, self.spec.precision)
                self._on_device = moved
            return self._on_device

    def predict(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """Maps (float32, peak 1, each image's size) for H x W x 3 uint8 images, and the seconds it took."""
        model = self.model_for_inference()
        start = time.perf_counter()
        maps = model.predict(list(images), batch_size=BATCH_CHUNK, precision=self.spec.precision)
        return maps, time.perf_counter() - start

    def device_label(self) -> str:
        """E.g. "CPU · int8" or "CUDA (NVIDIA H200) · bf16"; needs no loaded model, touches no CUDA on ZeroGPU."""
        from hub.runtime import precision_name

        import torch

        if self.zero_gpu and self.device.type == "cuda":
            # ZeroGPU attaches H200 slices (compute capability 9.0), where "auto" is bf16.
            return "ZeroGPU (CUDA) · bf16"
        name = self.device.type.upper()
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):
                name = f"CUDA ({torch.cuda.get_device_name(self.device)})"
        if self._model is not None and not self.zero_gpu:
            from hub.runtime import engine_precision

            return f"{name} · {engine_precision(self._model, self.spec.precision)}"  # e.g. int8 where it runs
        return f"{name} · {precision_name(self.device, self.spec.precision)}"

    def warm_up(self) -> threading.Thread:
        """Start loading in the background, so the page is served while the weights load."""

        def run() -> None:
            try:
                self.get()
            except ModelLoadError as err:
                log.error("%s", err)

        thread = threading.Thread(target=run, name="model-warm-up", daemon=True)
        thread.start()
        return thread


def on_gpu(fn: F) -> F:
    """`spaces.GPU(fn)` when the `spaces` package is importable (Hugging Face ZeroGPU), else fn.

    On ZeroGPU the wrapped call runs with a GPU attached; elsewhere `spaces.GPU` is a no-op. The
    model must already be loaded (on the CPU, in the main process) before the wrapped function
    runs; `ModelStore.predict` moves it to the GPU inside the call.
    """
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(fn)


# -- uploads --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """A decoded upload. image: H x W x 3 uint8 at the output size (original size up to the cap)."""

    name: str
    image: np.ndarray
    original_size: tuple[int, int]  # (height, width) after EXIF rotation
    animated: bool = False

    @property
    def downscaled(self) -> bool:
        return self.image.shape[:2] != self.original_size

    @property
    def tiny(self) -> bool:
        return min(self.original_size) < TINY_SIDE


def _reason(err: BaseException) -> str:
    cause = err.__cause__ or err
    text = str(cause).lower()
    if isinstance(cause, UnidentifiedImageError) or "cannot identify" in text:
        return "it is not an image file this app can read"
    if "truncated" in text or "premature end" in text or "broken data stream" in text:
        return "the file is truncated or damaged"
    return f"{type(cause).__name__}: {str(cause).splitlines()[0][:120] if str(cause) else 'no details'}"


def read_upload(path: str | os.PathLike, name: str | None = None) -> Upload:
    """Check and decode an uploaded file; raises UploadError with one sentence naming the file.

    The header is read first, so an oversized image is refused before any pixel is decoded.
    """
    path = Path(path)
    name = name or path.name
    supported = "upload a JPEG, PNG, WebP, GIF, BMP or TIFF image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap applies
            with Image.open(path) as img:
                width, height = img.size
                orientation = img.getexif().get(0x0112, 1)
                animated = bool(getattr(img, "is_animated", False))
    except Image.DecompressionBombError as err:
        limit = MAX_PIXELS // 1_000_000
        raise UploadError(f"{name} has too many pixels to decode safely ({err}); shrink it below {limit} MP.") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UploadError(f"{name} could not be read ({_reason(err)}); {supported}.") from err
    if width * height > MAX_PIXELS:
        raise UploadError(
            f"{name} is {width} x {height} pixels ({width * height / 1e6:.0f} MP); this demo takes images up to "
            f"{MAX_PIXELS // 1_000_000} MP, so shrink it first."
        )
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: EXIF transposition swaps the sides
        width, height = height, width
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = load_image(path, max_side=MAX_OUTPUT_SIDE)
    except (ValueError, FileNotFoundError) as err:
        raise UploadError(f"{name} could not be decoded ({_reason(err)}); {supported}.") from err
    except MemoryError as err:
        raise UploadError(f"{name} needs more memory to decode than this server has; upload a smaller image.") from err
    return Upload(name=name, image=image, original_size=(height, width), animated=animated)


def read_payload(payload: Any, scratch: Path) -> tuple[Path, str]:
    """(file path, display name) of a gradio file payload (FileData dict, or a data: URL from a webcam)."""
    if isinstance(payload, (str, os.PathLike)):
        return Path(payload), Path(payload).name
    if not isinstance(payload, dict):
        raise UploadError("No image arrived; drop, paste or upload the image again.")
    name = payload.get("orig_name") or (Path(payload["path"]).name if payload.get("path") else "image")
    if payload.get("path"):
        return Path(payload["path"]), name
    url = payload.get("url") or ""
    if url.startswith("data:") and "," in url:
        import base64

        target = scratch / "pasted-image"
        try:
            target.write_bytes(base64.b64decode(url.split(",", 1)[1]))
        except ValueError as err:
            raise UploadError("The pasted image data is not valid base64; paste or upload the image again.") from err
        return target, name
    raise UploadError("No image file arrived; drop, paste or upload the image again.")


# -- files handed to gradio -------------------------------------------------------------------------


class OutputFolders:
    """Per-process scratch folders for files users download (gradio copies them into its cache).

    Each request gets its own folder; folders older than `max_age_s` are removed whenever a new
    one is made, so disk use stays bounded on a long-running Space.
    """

    def __init__(self, max_age_s: float = 3600.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="saliency-app-"))
        self.max_age_s = max_age_s

    def new(self) -> Path:
        now = time.time()
        for old in self.root.iterdir():
            with contextlib.suppress(OSError):
                if now - old.stat().st_mtime > self.max_age_s:
                    shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self.root))
