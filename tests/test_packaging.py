"""The pip package: metadata in step with the pinned requirements, and the model card's snippet run
verbatim in a fresh virtual environment that installed the project from this checkout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from hub import SaliencyConfig, SaliencyUNet
from hub.card import DISTRIBUTION, DOCS_URL, SOURCE_URL
from hub.publish import export, push

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = {"torch", "torchvision", "huggingface-hub", "safetensors", "numpy", "pillow", "opencv-python-headless", "tqdm",
             "scikit-image"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def pins(*files: str) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines of requirements files."""
    out = {}
    for name in files:
        for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-r"):
                continue
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name}: {line!r} is not pinned with =="
            out[canonicalize_name(req.name)] = spec.version
    return out


def metadata_requirements() -> dict[str, list[Requirement]]:
    project = pyproject()["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


def test_metadata_versions_are_the_pinned_versions():
    """Each dependency is `>=` the version requirements*.txt pins (with at most an upper bound `<`), and every pin is a dependency."""
    pinned = pins("requirements.txt", "requirements-dev.txt")
    listed = set()
    for group, reqs in metadata_requirements().items():
        for req in reqs:
            name = canonicalize_name(req.name)
            if name == DISTRIBUTION:  # [dev] pulls in the other extras
                continue
            listed.add(name)
            assert name in pinned, f"pyproject.toml [{group}] lists {req.name}, which requirements*.txt does not pin"
            lower = [s for s in req.specifier if s.operator == ">="]
            others = [s for s in req.specifier if s.operator != ">="]
            assert [str(s) for s in lower] == [f">={pinned[name]}"] and all(s.operator == "<" for s in others), (
                f"pyproject.toml [{group}] says {req}, requirements*.txt pins {req.name}=={pinned[name]}"
            )
            assert req.specifier.contains(pinned[name]), f"pyproject.toml [{group}] says {req}, which excludes the pin {pinned[name]}"
    build = {canonicalize_name(r.name): r for r in map(Requirement, pyproject()["build-system"]["requires"])}
    for name, req in build.items():  # the build backend: pinned for the offline install test, within the range
        assert name in pinned and req.specifier.contains(pinned[name]), f"requirements-dev.txt must pin {req}"
    assert set(pinned) - listed - set(build) == set(), "pinned in requirements*.txt but missing from pyproject.toml"


def test_core_dependencies_are_what_inference_needs():
    reqs = metadata_requirements()
    assert {canonicalize_name(r.name) for r in reqs["core"]} == INFERENCE
    assert {"train", "demo", "dev"} <= set(reqs)
    space = pins("requirements.txt")  # what the Space installs covers the package and the demo
    assert INFERENCE | {canonicalize_name(r.name) for r in reqs["demo"]} <= set(space)


def test_names_and_urls_agree():
    project = pyproject()["project"]
    assert project["name"] == DISTRIBUTION
    assert project["urls"]["Source"] == SOURCE_URL and project["urls"]["Documentation"] == DOCS_URL
    assert pyproject()["tool"]["setuptools"]["packages"] == ["hub"]  # train/, space/: not installed
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f'pip install "{DISTRIBUTION} @ git+{SOURCE_URL}"' in readme
    assert "pip install hub" in readme  # ... with the warning that it is another package


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv holding only this project, installed (not editable) from a copy of the checkout.

    Offline: the venv sees this interpreter's site-packages through a .pth file (so torch etc.
    count as installed and pip resolves the dependencies against them without an index), and
    the build uses the installed setuptools.
    """
    base = tmp_path_factory.mktemp("venv")
    venv, src = base / "venv", base / "src"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    Path(site, "_parent_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "out", "build", "*.egg-info", "__pycache__", ".pytest_cache"))  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-build-isolation",
                    "--no-cache-dir", "--quiet", str(src)], check=True, env={**os.environ, "PIP_NO_INPUT": "1"})  # fmt: skip
    shutil.rmtree(src)  # nothing can be imported from the checkout copy any more
    return venv


def test_wheel_installs_only_the_hub_package(fresh_venv):
    site = next((fresh_venv / "lib").glob("python*/site-packages"))
    record = next(site.glob("saliency_unet-*.dist-info")) / "RECORD"
    top = {line.split("/", 1)[0] for line in record.read_text().splitlines()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"hub"}
    # The face prior's detector ships with the package, with its licence.
    files = {line.split(",", 1)[0] for line in record.read_text().splitlines()}
    assert {"hub/mtcnn.safetensors", "hub/MTCNN_LICENSE"} <= files
    assert (site / "hub" / "mtcnn.safetensors").stat().st_size == (ROOT / "hub" / "mtcnn.safetensors").stat().st_size


def test_card_snippet_runs_verbatim_in_a_fresh_venv(fresh_venv, hub_server, hub_repo_id, tmp_path):
    # With the face prior that training publishes: its detector's weights must come with the package.
    model = SaliencyUNet(SaliencyConfig(backbone="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=(64, 64),
                                        face_prior=6.0, face_detector="mtcnn"))  # fmt: skip
    export(model.eval(), tmp_path / "model", training={"data": "test"})
    push(tmp_path / "model", hub_repo_id)
    card = hub_server.repo(hub_repo_id).files()["README.md"].decode()
    assert "example.png" in card and "example.png" in hub_server.repo(hub_repo_id).files()
    assert f'pip install "{DISTRIBUTION} @ git+{SOURCE_URL}"' in card and "pip install hub`" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'SaliencyUNet.from_pretrained("{hub_repo_id}")' in snippet

    work = tmp_path / "user"
    work.mkdir()
    (work / "snippet.py").write_text(snippet)
    rgb = np.zeros((90, 120, 3), np.uint8)
    rgb[20:50, 60:100] = (250, 200, 30)
    Image.fromarray(rgb).save(work / "photo.jpg")
    check = (
        "import json, runpy, sys, hub\n"
        "ns = runpy.run_path('snippet.py')\n"
        "m = ns['saliency']\n"
        "print(json.dumps({'hub': hub.__file__, 'shape': list(m.shape), 'max': float(m.max()), 'path': sys.path}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache: the weights come over HTTP
    env.pop("HF_HUB_CACHE")
    done = subprocess.run([fresh_venv / "bin" / "python", "-c", check], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(out["hub"]).is_relative_to(fresh_venv), f"imported {out['hub']}, not the installed package"
    assert not any(Path(p).resolve() == ROOT for p in out["path"] if p)
    assert out["shape"] == [90, 120] and out["max"] == pytest.approx(1.0)
    assert Image.open(work / "overlay.png").size == (120, 90)

    # The card's batch command, as printed, in the same fresh environment.
    (line,) = [x for x in re.findall(r"```bash\n(.*?)```", card, re.S) if "-m hub predict" in x]
    argv = line.split()
    assert argv[:4] == ["python", "-m", "hub", "predict"] and hub_repo_id in argv
    (work / "photos" / "trip").mkdir(parents=True)
    shutil.copy(work / "photo.jpg", work / "photos" / "trip" / "beach.jpg")
    done = subprocess.run([fresh_venv / "bin" / "python", *argv[1:]], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (work / "maps" / "trip" / "beach.png").is_file() and (work / "maps" / "trip" / "beach.overlay.jpg").is_file()
    assert (work / "maps" / "summary.csv").read_text().count("beach") == 2  # image and map columns of its one row
