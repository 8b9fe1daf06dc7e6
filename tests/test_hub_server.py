"""The local test Hub works with the real huggingface_hub client over HTTP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    HfApi,
    PyTorchModelHubMixin,
    RepoFile,
    SpaceHardware,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn

from hub_server import HubServer

BIG_FILE_SIZE = 3 * 1024 * 1024


def _write_model_folder(folder: Path) -> dict[str, bytes]:
    """A small repo folder with a ~3 MB binary; returns path-in-repo -> content."""
    files = {
        "config.json": json.dumps({"width": 8}).encode(),
        "README.md": b"---\nlicense: mit\ntags: [saliency]\n---\n# Test model\n",
        "weights.bin": os.urandom(BIG_FILE_SIZE),
        "notes/eval.txt": b"cc=0.8\n",
    }
    for path, content in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(content)
    return files


def test_client_is_pointed_at_the_local_hub(hub_server: HubServer, hub_api: HfApi) -> None:
    assert hub_server.url == constants.ENDPOINT
    assert hub_api.whoami()["name"] == hub_server.user


def test_upload_folder_then_download(hub_server: HubServer, hub_api: HfApi, hub_repo_id: str, tmp_path: Path) -> None:
    url = hub_api.create_repo(hub_repo_id)
    assert url.repo_id == hub_repo_id
    files = _write_model_folder(tmp_path / "model")

    info = hub_api.upload_folder(repo_id=hub_repo_id, folder_path=tmp_path / "model", commit_message="Add model")

    repo = hub_server.repo(hub_repo_id)
    assert info.oid == repo.head().oid and len(info.oid) == 40
    assert repo.head().title == "Add model"
    assert repo.files() == {".gitattributes": repo.files()[".gitattributes"], **files}
    assert Path(hf_hub_download(hub_repo_id, "weights.bin")).read_bytes() == files["weights.bin"]
    assert Path(hf_hub_download(hub_repo_id, "notes/eval.txt")).read_bytes() == files["notes/eval.txt"]
    assert set(hub_api.list_repo_files(hub_repo_id)) == {".gitattributes", *files}
    card = hub_api.model_info(hub_repo_id).card_data
    assert card is not None and card.license == "mit"

    # Unchanged content: the client compares oids from /preupload and skips the commit.
    hub_api.upload_folder(repo_id=hub_repo_id, folder_path=tmp_path / "model")
    assert repo.head().oid == info.oid


def test_branch_upload_and_download_at_revision(hub_server: HubServer, hub_api: HfApi, hub_repo_id: str) -> None:
    hub_api.create_repo(hub_repo_id)
    main_commit = hub_api.upload_file(path_or_fileobj=b"v1", path_in_repo="model.txt", repo_id=hub_repo_id)
    hub_api.create_branch(hub_repo_id, branch="dev")
    dev_commit = hub_api.upload_file(
        path_or_fileobj=b"v2", path_in_repo="model.txt", repo_id=hub_repo_id, revision="dev"
    )

    assert Path(hf_hub_download(hub_repo_id, "model.txt")).read_bytes() == b"v1"
    assert Path(hf_hub_download(hub_repo_id, "model.txt", revision="dev")).read_bytes() == b"v2"
    assert Path(hf_hub_download(hub_repo_id, "model.txt", revision=main_commit.oid)).read_bytes() == b"v1"
    branches = {ref.name: ref.target_commit for ref in hub_api.list_repo_refs(hub_repo_id).branches}
    assert branches == {"main": main_commit.oid, "dev": dev_commit.oid}
    assert hub_server.repo(hub_repo_id).files("dev")["model.txt"] == b"v2"
    with pytest.raises(HfHubHTTPError) as existing:
        hub_api.create_branch(hub_repo_id, branch="dev")
    assert existing.value.response.status_code == 409


def test_snapshot_download(hub_api: HfApi, hub_repo_id: str, tmp_path: Path) -> None:
    hub_api.create_repo(hub_repo_id)
    files = _write_model_folder(tmp_path / "model")
    hub_api.upload_folder(repo_id=hub_repo_id, folder_path=tmp_path / "model")

    snapshot = Path(snapshot_download(hub_repo_id))

    assert {p: (snapshot / p).read_bytes() for p in files} == files


def test_bad_token_is_an_auth_error(hub_api: HfApi, hub_repo_id: str) -> None:
    hub_api.create_repo(hub_repo_id)
    intruder = HfApi(token="hf_wrong_token")

    with pytest.raises(HfHubHTTPError) as upload_error:
        intruder.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=hub_repo_id)
    with pytest.raises(HfHubHTTPError) as whoami_error:
        intruder.whoami()
    with pytest.raises(HfHubHTTPError) as anonymous_error:
        HfApi(token=False).create_repo(f"{hub_repo_id}-2")

    assert not isinstance(upload_error.value, RepositoryNotFoundError)
    assert upload_error.value.response.status_code == 401
    assert "Invalid credentials" in str(upload_error.value)
    assert whoami_error.value.response.status_code == 401
    assert anonymous_error.value.response.status_code == 401


def test_missing_repo_revision_and_file(hub_api: HfApi, hub_repo_id: str) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_repo_id, "config.json")
    with pytest.raises(RepositoryNotFoundError):
        hub_api.repo_info(hub_repo_id)
    assert not hub_api.repo_exists(hub_repo_id)

    hub_api.create_repo(hub_repo_id)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(hub_repo_id, "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(hub_repo_id, ".gitattributes", revision="no-such-branch")


def test_private_repo_needs_the_token(hub_api: HfApi, hub_repo_id: str, tmp_path: Path) -> None:
    hub_api.create_repo(hub_repo_id, private=True)
    hub_api.upload_file(path_or_fileobj=b"secret", path_in_repo="a.txt", repo_id=hub_repo_id)

    # Anonymous first, with its own cache: the client would otherwise fall back to cached files.
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_repo_id, "a.txt", token=False, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hub_api.model_info(hub_repo_id, token=False)

    assert hub_api.model_info(hub_repo_id).private is True
    assert Path(hf_hub_download(hub_repo_id, "a.txt", cache_dir=tmp_path)).read_bytes() == b"secret"


def test_space_sdk_variables_and_hardware(hub_server: HubServer, hub_api: HfApi, hub_repo_id: str) -> None:
    hub_api.create_repo(hub_repo_id, repo_type="space", space_sdk="gradio")
    hub_api.add_space_variable(hub_repo_id, "MODEL_REPO_ID", "test-user/saliency", description="model to serve")
    hub_api.add_space_secret(hub_repo_id, "API_KEY", "s3cret")
    runtime = hub_api.request_space_hardware(hub_repo_id, SpaceHardware.T4_SMALL)
    hub_api.upload_file(path_or_fileobj=b"print('hi')\n", path_in_repo="app.py", repo_id=hub_repo_id, repo_type="space")

    space = hub_server.repo(hub_repo_id, "space")
    assert (space.sdk, space.hardware) == ("gradio", "t4-small")
    assert space.variables["MODEL_REPO_ID"].value == "test-user/saliency"
    assert space.secrets["API_KEY"].value == "s3cret"
    assert runtime.requested_hardware == "t4-small"
    assert hub_api.get_space_variables(hub_repo_id)["MODEL_REPO_ID"].description == "model to serve"
    assert hub_api.get_space_runtime(hub_repo_id).stage == "RUNNING"
    assert hub_api.space_info(hub_repo_id).sdk == "gradio"
    assert Path(hf_hub_download(hub_repo_id, "app.py", repo_type="space")).read_bytes() == b"print('hi')\n"
    with pytest.raises(HfHubHTTPError):
        hub_api.request_space_hardware(hub_repo_id, "not-a-gpu")  # type: ignore[arg-type]


def test_large_files_through_lfs_when_enabled(
    hub_server: HubServer, hub_api: HfApi, hub_repo_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_server, "lfs_threshold", 1024 * 1024)
    hub_api.create_repo(hub_repo_id)
    files = _write_model_folder(tmp_path / "model")

    hub_api.upload_folder(repo_id=hub_repo_id, folder_path=tmp_path / "model")

    head = hub_server.repo(hub_repo_id).head()
    assert head.files["weights.bin"].lfs and not head.files["config.json"].lfs
    assert Path(hf_hub_download(hub_repo_id, "weights.bin")).read_bytes() == files["weights.bin"]
    (weights,) = [e for e in hub_api.list_repo_tree(hub_repo_id) if isinstance(e, RepoFile) and e.path == "weights.bin"]
    assert weights.lfs is not None and weights.lfs.size == BIG_FILE_SIZE


class TinyNet(nn.Module, PyTorchModelHubMixin):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.layer = nn.Linear(3, width)


def test_model_hub_mixin_round_trip(hub_server: HubServer, hub_repo_id: str) -> None:
    torch.manual_seed(0)
    model = TinyNet(width=5)

    model.push_to_hub(hub_repo_id)
    loaded = TinyNet.from_pretrained(hub_repo_id)

    assert loaded.layer.out_features == 5
    assert torch.equal(loaded.layer.weight, model.layer.weight)
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub_server.repo(hub_repo_id).files())
