"""hubconf.py: torch.hub.load(..., "saliency_unet", repo_id=...) with source="local"."""

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from hub import SaliencyConfig, SaliencyUNet
from hub.publish import export, push

ROOT = Path(__file__).resolve().parents[1]
CONFIG = SaliencyConfig(backbone="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=(64, 64))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export(SaliencyUNet(CONFIG).eval(), tmp_path_factory.mktemp("model"), example_image=None)


def test_dependencies_are_the_inference_modules():
    """torch.hub checks `dependencies` before loading: they must be importable module names."""
    spec = importlib.util.spec_from_file_location("hubconf_under_test", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in module.dependencies:
        importlib.import_module(name)
    assert "repo_id" in module.saliency_unet.__doc__


def test_load_from_the_test_hub_by_repo_id(exported, hub_server, hub_repo_id):
    push(exported, hub_repo_id)
    model = torch.hub.load(str(ROOT), "saliency_unet", source="local", repo_id=hub_repo_id)
    reference = SaliencyUNet.from_pretrained(exported)
    assert isinstance(model, SaliencyUNet) and not model.training and model.config == CONFIG
    image = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(model.predict(image), reference.predict(image))


def test_load_from_a_folder_and_random_init(exported):
    model = torch.hub.load(str(ROOT), "saliency_unet", source="local", repo_id=str(exported))
    assert model.config == CONFIG
    fresh = torch.hub.load(str(ROOT), "saliency_unet", source="local", pretrained=False, backbone="resnet18", input_size=(64, 64))
    assert fresh.config.backbone == "resnet18"


def test_missing_repo_id_is_one_sentence():
    with pytest.raises(ValueError, match='repo_id="me/saliency-unet"'):
        torch.hub.load(str(ROOT), "saliency_unet", source="local")
