"""Exporting (local, offline) and pushing (the only network call) are separate on purpose.

    export(model, "out/")                 # model.safetensors + config.json + README.md
    push("out/", "me/saliency-unet")       # uploads that folder, never modifies it
"""

from __future__ import annotations

import fnmatch
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError

from hub.card import REPO_PLACEHOLDER

log = logging.getLogger(__name__)

REQUIRED_FILES = ("model.safetensors", "config.json")
# Training outputs that stay local: resumable checkpoints are pickles, and pickles are never published.
NEVER_PUSHED = ("checkpoints/*", "*.pt", "*.pth", "*.bin", "*.ckpt", ".*", "*/.*", "__pycache__/*")


class PublishError(RuntimeError):
    """A push that could not happen; the message is one sentence saying what to do."""


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
                path.replace(target)
    return result


def export(model: Any, directory: str | Path, **card: Any) -> Path:
    """Write `model` as a `from_pretrained`-loadable folder (local, no network).

    card: keyword arguments for the model card (`repo_id`, `training`, `evaluation`, `datasets`;
    see `hub.card.build_card`).
    """
    model.save_pretrained(directory, model_card_kwargs=card)
    return Path(directory)


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
    except (HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, httpx2.TransportError, OSError) as err:
        raise _explain(err, repo_id) from err
    log.info("pushed %d files to %s", len(operations), info.commit_url)
    return info.commit_url
