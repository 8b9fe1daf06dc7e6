"""Exporting (local, offline) and pushing (the only network call) are separate on purpose.

    export(model, "out/")                 # model.safetensors + config.json + README.md
    push("out/", "me/saliency-unet")       # uploads that folder, never modifies it
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:  # the HTTP library huggingface_hub 2.x speaks through; 1.x used httpx
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - older huggingface_hub
    from httpx import TransportError
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, SpaceCard, constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, RepositoryNotFoundError

from hub.card import REPO_PLACEHOLDER

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The picture every exported model shows on its card (absent from a pip install: then none is written).
EXAMPLE_IMAGE = PROJECT_ROOT / "space" / "examples" / "astronaut.jpg"
EXAMPLE_SOURCE = "a public-domain NASA photo of astronaut Eileen Collins (scikit-image's `astronaut`)"
EXAMPLE_NAME = "example.png"

REQUIRED_FILES = ("model.safetensors", "config.json")
# Training outputs that stay local: resumable checkpoints are pickles, and pickles are never published.
NEVER_PUSHED = ("checkpoints/*", "*.pt", "*.pth", "*.bin", "*.ckpt", ".*", "*/.*", "__pycache__/*")


class PublishError(RuntimeError):
    """A push that could not happen; the message is one sentence saying what to do."""


def atomic_write(path: str | Path, write: Callable[[Path], Any], per_process: bool = True) -> Path:
    """Call `write(tmp)` on a temp file beside `path`, then rename it to `path`.

    The file appears complete or not at all (rename is atomic within one file system), so a
    reader, or a later run that skips existing outputs, never sees half a file. The project's
    one helper for this; `atomic_save` does the same for a whole folder.
    per_process: the temp file's name carries the process id, so processes writing the same
    path at once do not collide. False: one fixed name (`.NAME.tmp`), for a file only one process
    writes, so that the next write replaces what a killed one left (a checkpoint is large).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if per_process else f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())  # some writers create 0600 files; give the file a plain write's mode
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save(save: Callable[..., Any], directory: str | Path, **kwargs: Any) -> Any:
    """Run `save(tmp_dir, **kwargs)` in a temp folder inside `directory`, then move each file in.

    Each file appears complete or not at all (rename is atomic within one file system), so an
    interrupted export never leaves a truncated model.safetensors beside a new config.json.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as tmp:
        result = save(tmp, **kwargs)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                target = directory / path.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.chmod(0o666 & ~_umask())  # some writers (safetensors) create 0600 files
                path.replace(target)
    return result


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process's umask, read once: os.umask can only be read by setting it, which would give
    files that other threads create meanwhile the wrong mode."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export(model: Any, directory: str | Path, example_image: str | Path | None = EXAMPLE_IMAGE, **card: Any) -> Path:
    """Write `model` as a `from_pretrained`-loadable folder (local, no network).

    Besides the weights, config.json and the card, it writes `example.png`: the model's map of
    `example_image` (default: the demo's public-domain astronaut photo, when this is a checkout;
    None: no example) as an overlay, which the card shows.
    card: keyword arguments for the model card (`repo_id`, `training`, `evaluation`, `datasets`,
    `command`; see `hub.card.build_card`).
    """
    directory = Path(directory)
    example = Path(example_image) if example_image is not None else None
    if example is not None and not example.is_file():
        if example != EXAMPLE_IMAGE:
            raise FileNotFoundError(f"example image {example} does not exist; pass an image file or example_image=None.")
        example = None  # installed without the demo's examples: no picture
    if example is not None:
        card.update(example=EXAMPLE_NAME, example_source=EXAMPLE_SOURCE if example == EXAMPLE_IMAGE else example.name)
    model.save_pretrained(directory, model_card_kwargs=card)
    if example is not None:
        write_example(model, example, directory / EXAMPLE_NAME)
    return directory


def write_example(model: Any, image: Path, target: Path) -> Path:
    """The model's map of `image` as a heatmap overlay (PNG), via `predict` like every user."""
    from PIL import Image

    from hub.preprocess import overlay

    had_engine = "_engine_cache" in model.__dict__
    picture = overlay(image, model.predict(image), colormap="jet", alpha=0.6)
    if not had_engine:  # a training run exports often; don't keep an inference copy of its model alive
        model.__dict__.pop("_engine_cache", None)
    return atomic_write(target, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))


def files_to_push(directory: Path) -> list[Path]:
    """Files of an exported folder that belong on the Hub (relative paths, sorted)."""
    out = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and not any(fnmatch.fnmatch(rel.as_posix(), pat) for pat in NEVER_PUSHED):
            out.append(rel)
    return out


def check_export(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise PublishError(f"{directory} is not a folder; export a model first (save_pretrained or `python -m train --out DIR`).")
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise PublishError(
            f"{directory} has no {' or '.join(missing)}; export it with save_pretrained or `python -m train` before pushing."
        )
    return directory


def _explain(err: Exception, repo_id: str) -> PublishError:
    """Turn a client error into one sentence. Never includes the token."""
    if isinstance(err, LocalTokenNotFoundError):
        return PublishError("no Hugging Face token found; set HF_TOKEN or run `hf auth login`, then push again.")
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            return PublishError(
                "the Hub rejected the token (HTTP 401); set HF_TOKEN to a valid token with write access or run `hf auth login`."
            )
        if status == 403:
            return PublishError(
                f"the token may not write to {repo_id} (HTTP 403); use a write token for that namespace."
            )
        return PublishError(f"the Hub refused the push to {repo_id} (HTTP {status}: {err.server_message or err}).")
    if isinstance(err, HFValidationError):
        return PublishError(f"{repo_id!r} is not a valid repo id; use NAMESPACE/NAME, e.g. me/saliency-unet.")
    return PublishError(
        f"could not reach the Hub at {constants.ENDPOINT} ({type(err).__name__}); check the network connection or HF_ENDPOINT."
    )


def push(
    directory: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload an exported folder to the Hub model repo `repo_id`; returns the commit URL.

    revision: a branch, created from main if it does not exist. token: defaults to HF_TOKEN or
    the login cache. Resumable checkpoints (pickles) are never uploaded. The local folder is
    never modified: the card's placeholder repo id is replaced in the uploaded copy only.
    """
    directory = check_export(directory)
    operations = []
    for rel in files_to_push(directory):
        content: Any = directory / rel
        if rel.as_posix() == "README.md":
            text = content.read_text(encoding="utf-8")
            content = text.replace(REPO_PLACEHOLDER, repo_id).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=content))
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload saliency model from {directory.name}",
            revision=revision,
        )
    except (HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, TransportError, OSError) as err:
        raise _explain(err, repo_id) from err
    log.info("pushed %d files to %s", len(operations), info.commit_url)
    return info.commit_url


# -- the demo Space --------------------------------------------------------------------------------

# What a Space runs, relative to the project root: these files and nothing else (no training code,
# tests, benchmarks or data). Explicit on purpose: the modules are exactly those app.py imports,
# directly or lazily (tests/test_app.py checks the list against the imports), plus the examples.
SPACE_FILES = (
    "app.py",
    "requirements.txt",
    "hub/__init__.py",
    "hub/analysis.py",
    "hub/card.py",
    "hub/config.py",
    "hub/faces.py",  # the face prior (config face_prior)
    "hub/int8.py",  # int8 inference on CPUs without native bf16 (the model's model.int8.onnx)
    "hub/model.py",
    "hub/mtcnn.py",  # the face prior's default detector, its weights and their licence
    "hub/mtcnn.safetensors",
    "hub/MTCNN_LICENSE",
    "hub/preprocess.py",
    "hub/publish.py",  # SaliencyUNet.save_pretrained uses it
    "hub/runtime.py",
    "space/__init__.py",
    "space/render.py",
    "space/serving.py",
    "space/ui.py",
    "space/examples/SOURCES.md",
    "space/examples/astronaut.jpg",
    "space/examples/chelsea.jpg",
    "space/examples/coffee.jpg",
    "space/examples/rocket.jpg",
)
# Uploaded as the Space's README.md: its front matter (sdk, sdk_version, app_file, ...) configures the Space.
SPACE_README = "space/README.md"
# Folders the Space's copy of the project owns: files there that are no longer ours get deleted.
SPACE_MANAGED = ("hub/", "space/")
SPACE_PLACEHOLDER = "YOUR_NAMESPACE/saliency-demo"


def space_files(root: str | Path = PROJECT_ROOT) -> list[str]:
    """The project files a Space needs (posix paths relative to root, sorted), README excluded."""
    root = Path(root)
    missing = [name for name in SPACE_FILES + (SPACE_README,) if not (root / name).is_file()]
    if missing:
        raise PublishError(
            f"{root} lacks {', '.join(missing)}; run the space command from a full checkout of the project."
        )
    return sorted(SPACE_FILES)


def space_readme(root: str | Path, space_id: str, model_id: str) -> bytes:
    """space/README.md with the model and Space ids filled in; checks the front matter against the pins."""
    text = (Path(root) / SPACE_README).read_text(encoding="utf-8")
    text = text.replace(REPO_PLACEHOLDER, model_id).replace(SPACE_PLACEHOLDER, space_id)
    data = SpaceCard(text).data
    if data.get("sdk") != "gradio" or data.get("app_file") != "app.py":
        raise PublishError(f"{SPACE_README} must say `sdk: gradio` and `app_file: app.py` in its front matter.")
    pins = (Path(root) / "requirements.txt").read_text(encoding="utf-8")
    pinned = next((line.split("==", 1)[1].strip() for line in pins.splitlines() if line.startswith("gradio==")), None)
    if str(data.get("sdk_version")) != pinned:
        raise PublishError(
            f"{SPACE_README} has sdk_version {data.get('sdk_version')} but requirements.txt pins gradio=={pinned}; "
            "make them equal so the Space runs the gradio the tests ran."
        )
    return text.encode("utf-8")


def push_space(
    space_id: str,
    model_id: str,
    *,
    model_revision: str | None = None,
    private: bool | None = None,
    hardware: str | None = None,
    root: str | Path = PROJECT_ROOT,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create or update the Gradio Space `space_id` serving `model_id`; returns the Space's URL.

    Uploads `space_files(root)` plus space/README.md as the Space's README (front matter with the
    model id), deletes files under hub/ and space/ that the project no longer has, and sets the
    `MODEL_ID` (and `MODEL_REVISION`) Space variables the app reads. hardware: a flavor such as
    "t4-small" (see huggingface_hub.SpaceHardware); None keeps the Space's current one.
    """
    root = Path(root)
    files = space_files(root)
    readme = space_readme(root, space_id, model_id)
    api = HfApi(token=token)
    try:
        try:
            model = api.model_info(model_id, revision=model_revision)
        except RepositoryNotFoundError as err:
            raise PublishError(
                f"the model repo {model_id} does not exist on the Hub (or is private to another account); "
                f"push it first with `python -m hub push DIR {model_id}`."
            ) from err
        if model.private:
            log.warning(
                "%s is private: add an HF_TOKEN secret with read access to the Space so the app can download it.", model_id
            )
        url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        space_id = url.repo_id
        api.add_space_variable(space_id, "MODEL_ID", model_id, description="model the demo serves (app.py --model)")
        if model_revision:
            api.add_space_variable(space_id, "MODEL_REVISION", model_revision, description="model revision (app.py --revision)")
        if hardware:
            api.request_space_hardware(space_id, hardware)
        existing = api.list_repo_files(space_id, repo_type="space")
        stale = [f for f in existing if f.startswith(SPACE_MANAGED) and f not in files]
        operations: list[Any] = [CommitOperationDelete(path_in_repo=f) for f in stale]
        operations += [CommitOperationAdd(path_in_repo=f, path_or_fileobj=root / f) for f in files]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
        api.create_commit(
            space_id,
            repo_type="space",
            operations=operations,
            commit_message=commit_message or f"Deploy the saliency demo for {model_id}",
        )
    except (HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, TransportError, OSError) as err:
        raise _explain(err, space_id) from err
    log.info("uploaded %d files to %s (MODEL_ID=%s); it builds now and is shared at %s", len(files) + 1, space_id, model_id, url)
    return str(url)
