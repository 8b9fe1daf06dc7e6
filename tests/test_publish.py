"""Export and push over real HTTP, through the real huggingface_hub client, to the local test Hub."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hub import SaliencyConfig, SaliencyUNet
from hub.publish import PublishError, export, push

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = SaliencyUNet(SaliencyConfig(input_size=(64, 64))).eval()
    directory = tmp_path_factory.mktemp("export")
    export(model, directory, training={"epochs": 1}, evaluation={
        "dataset": {"name": "nus_scene", "split": "val"}, "n_images": 3, "metrics": {"cc": 0.5, "kld": 1.2}})
    (directory / "checkpoints").mkdir()
    torch.save({"model": model.state_dict()}, directory / "checkpoints" / "last.pt")
    return directory


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_push_then_from_pretrained_by_repo_id(exported, hub_server, hub_repo_id):
    before = snapshot(exported)
    url = push(exported, hub_repo_id)
    assert hub_repo_id in url
    assert snapshot(exported) == before  # the local folder is never modified
    files = hub_server.repo(hub_repo_id).files()
    assert set(files) - {".gitattributes"} == {"model.safetensors", "config.json", "README.md", "example.png"}  # no pickle
    card = files["README.md"].decode()
    assert f'from_pretrained("{hub_repo_id}")' in card and "model-index" in card
    loaded = SaliencyUNet.from_pretrained(hub_repo_id)
    local = SaliencyUNet.from_pretrained(exported)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), local(x))


def test_push_to_a_branch_and_load_that_revision(exported, hub_server, hub_repo_id, tmp_path):
    push(exported, hub_repo_id)
    torch.manual_seed(1)
    other = SaliencyUNet(SaliencyConfig(input_size=(64, 64))).eval()
    export(other, tmp_path)
    push(tmp_path, hub_repo_id, revision="experiment", commit_message="try another init")
    repo = hub_server.repo(hub_repo_id)
    assert repo.head("experiment").title == "try another init"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        main = SaliencyUNet.from_pretrained(hub_repo_id)(x)
        branch = SaliencyUNet.from_pretrained(hub_repo_id, revision="experiment")(x)
        assert torch.equal(branch, other(x))
        assert not torch.equal(main, branch)


def test_private_push(exported, hub_server, hub_repo_id):
    push(exported, hub_repo_id, private=True)
    assert hub_server.repo(hub_repo_id).private


def test_bad_token_is_one_clear_sentence(exported, hub_server, hub_repo_id):
    with pytest.raises(PublishError, match="rejected the token") as info:
        push(exported, hub_repo_id, token="hf_wrong_token")
    assert "hf_wrong_token" not in str(info.value)


def test_missing_or_incomplete_directory(tmp_path, hub_server, hub_repo_id):
    with pytest.raises(PublishError, match="is not a folder"):
        push(tmp_path / "nothing", hub_repo_id)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PublishError, match="has no model.safetensors"):
        push(tmp_path, hub_repo_id)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hub", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_cli_push(exported, hub_server, hub_repo_id):
    result = run_cli("push", str(exported), hub_repo_id, "--private", "--commit-message", "from the CLI")
    assert result.returncode == 0, result.stderr
    assert hub_server.repo(hub_repo_id).head().title == "from the CLI"
    assert hub_server.repo(hub_repo_id).private


def test_cli_without_network_says_so(exported, hub_repo_id):
    # A port nothing listens on: the same failure as being offline, with no traffic leaving the machine.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("push", str(exported), hub_repo_id, env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert result.returncode == 1
    assert "could not reach the Hub" in result.stderr
    assert os.environ["HF_TOKEN"] not in result.stderr + result.stdout


def test_cli_bad_token(exported, hub_server, hub_repo_id):
    result = run_cli("push", str(exported), hub_repo_id, env={"HF_TOKEN": "hf_not_valid"})
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: the Hub rejected the token")
    assert "hf_not_valid" not in result.stderr


def test_atomic_write_leaves_the_old_file_or_the_new_one_and_a_fixed_temp_name_replaces_a_killed_writes_leftover(tmp_path):
    from hub.publish import atomic_write, atomic_write_text

    target = tmp_path / "new folder" / "f.txt"
    atomic_write_text(target, "one")  # creates the folder

    def fails_halfway(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails_halfway)
    assert target.read_text() == "one" and not list(target.parent.glob(".*tmp"))
    (target.parent / ".f.txt.tmp").write_text("left by a killed run")  # kill -9 runs no cleanup
    atomic_write(target, lambda tmp: tmp.write_text("two"), per_process=False)
    assert target.read_text() == "two" and not list(target.parent.glob(".*tmp"))
