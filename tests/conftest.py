"""Shared pytest fixtures."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from hub_server import HubServer

if TYPE_CHECKING:
    from huggingface_hub import HfApi

# ================================================================================================
# Local test Hub (tests/hub_server.py)
#
# huggingface_hub reads HF_ENDPOINT, HF_HOME and the cache paths when it is first imported, so the
# environment is set here, when pytest loads this conftest, before any test module or project code
# imports huggingface_hub. The server itself starts lazily, in the session fixture `hub_server`.
# ================================================================================================


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HUB_PORT = _free_port()
HUB_TOKEN = "hf_test_" + secrets.token_hex(16)
HUB_URL = f"http://127.0.0.1:{HUB_PORT}"
_HF_HOME = tempfile.TemporaryDirectory(prefix="test-hf-home-")  # removed at interpreter exit

os.environ.update(
    {
        "HF_ENDPOINT": HUB_URL,
        "HF_TOKEN": HUB_TOKEN,
        "HF_HOME": _HF_HOME.name,
        "HF_HUB_CACHE": os.path.join(_HF_HOME.name, "hub"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
    }
)
for _name in (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HUGGINGFACE_CO_STAGING",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_OIDC_RESOURCE",
    "HF_OIDC_ID_TOKEN",
    "no_proxy",  # NO_PROXY above wins; a lowercase copy could shadow it
):
    os.environ.pop(_name, None)

if "huggingface_hub.constants" in sys.modules and sys.modules["huggingface_hub.constants"].ENDPOINT != HUB_URL:
    raise RuntimeError(
        "huggingface_hub was imported before tests/conftest.py could point it at the local test Hub; "
        "remove the early import (a plugin or a conftest higher up) so tests never reach huggingface.co."
    )


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """The local Hub the real huggingface_hub client talks to (HF_ENDPOINT, HF_TOKEN are set)."""
    with HubServer(port=HUB_PORT, token=HUB_TOKEN) as server:
        yield server
        assert not server.errors, f"The test Hub server hit bugs (answered 500): {server.errors}"


@pytest.fixture
def hub_repo_id(hub_server: HubServer) -> str:
    """A fresh repo id in the test user's namespace, not yet created."""
    return f"{hub_server.user}/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def hub_api(hub_server: HubServer) -> HfApi:
    """A client configured only through the environment, as user code would be."""
    from huggingface_hub import HfApi

    return HfApi()


# ================================================================================================


# ================================================================================================
# OpenCV 5 (or a build) without the cascade classifier
# ================================================================================================


@pytest.fixture
def without_cascades(monkeypatch: pytest.MonkeyPatch):
    """Call with a module that imported cv2: its cv2 becomes OpenCV with everything but
    `CascadeClassifier` (as OpenCV 5 ships), until the test ends."""

    def hide(module) -> None:
        real = module.cv2

        class NoCascade:
            __version__ = "5.0.0"

            def __getattr__(self, name: str):
                if name == "CascadeClassifier":
                    raise AttributeError(name)
                return getattr(real, name)

        monkeypatch.setattr(module, "cv2", NoCascade())

    return hide
