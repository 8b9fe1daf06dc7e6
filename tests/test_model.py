"""The published model: shapes, skip wiring, frozen stages, strict save/load, backbone weights."""

import json
import urllib.error

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file

from hub import SaliencyConfig, SaliencyUNet
from hub.publish import export

SMALL = SaliencyConfig(input_size=(64, 64))


@pytest.fixture(scope="module")
def model() -> SaliencyUNet:
    torch.manual_seed(0)
    return SaliencyUNet(SMALL).eval()


@pytest.mark.parametrize("size", [(97, 131), (480, 640), (64, 64), (33, 200)])
def test_output_has_input_size(model, size):
    with torch.no_grad():
        y = model(torch.rand(1, 3, *size))
    assert y.shape == (1, 1, *size)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_batch_shape(model):
    with torch.no_grad():
        assert model(torch.rand(3, 3, 64, 64)).shape == (3, 1, 64, 64)


def test_skip_wiring_channels_and_strides(model):
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        taps = model.features(x)
    expected = [(64, 2), (256, 4), (512, 8), (1024, 16), (2048, 32)]
    for tap, (channels, stride) in zip(taps, expected):
        assert tap.shape == (2, channels, 64 // stride, 96 // stride)
    assert model.fuse4[0].in_channels == 512 + 1024
    assert model.fuse3[0].in_channels == 256 + 512
    assert model.fuse2[0].in_channels == 128 + 256
    assert model.fuse1[0].in_channels == 64 + 64
    assert model.up0[0].out_channels == 32 and model.head.out_channels == 1


def test_parameter_count_is_the_reference_plan(model):
    n = sum(p.numel() for p in model.parameters())
    assert 32_000_000 < n < 33_000_000  # ResNet50 (23.5 M) + the 512-256-128-64-32 decoder


def test_normalisation_lives_in_the_model(model):
    assert torch.allclose(model.mean.flatten(), torch.tensor(SMALL.mean))
    assert "mean" not in model.state_dict()  # carried by config.json, not the weights
    # Feeding the ImageNet mean colour gives a zero tensor to the encoder.
    x = model.mean.expand(1, 3, 32, 32)
    assert torch.allclose((x - model.mean) / model.std, torch.zeros(1, 3, 32, 32))


def test_frozen_stages_get_no_gradient_and_keep_bn_statistics():
    torch.manual_seed(0)
    model = SaliencyUNet(SaliencyConfig()).freeze(("stem", "layer1")).train()
    stem_bn = model.stem[1]
    layer2_bn = model.layer2[0].bn1
    frozen_before = stem_bn.running_mean.clone()
    free_before = layer2_bn.running_mean.clone()
    model(torch.rand(2, 3, 64, 64)).mean().backward()
    assert all(p.grad is None for p in model.stem.parameters())
    assert all(p.grad is None for p in model.layer1.parameters())
    assert all(not p.requires_grad for p in model.layer1.parameters())
    assert model.layer2[0].conv1.weight.grad is not None
    assert torch.equal(stem_bn.running_mean, frozen_before)
    assert not stem_bn.training and model.layer2.training
    assert not torch.equal(layer2_bn.running_mean, free_before)


def test_nothing_frozen_unless_asked_and_a_loaded_model_is_fully_trainable(tmp_path):
    model = SaliencyUNet(SMALL)
    assert all(p.requires_grad for p in model.parameters())
    model.freeze(("stem", "layer1")).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "frozen_stages" not in config  # training-only state stays out of the published config
    # A config.json written before carries frozen_stages: it loads, and nothing comes back frozen or stuck in eval.
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "frozen_stages": ["stem", "layer1"]}))
    loaded = SaliencyUNet.from_pretrained(tmp_path / "m").train()
    assert all(p.requires_grad for p in loaded.parameters())
    assert loaded.stem.training and loaded.layer1.training
    assert all(p.requires_grad for p in model.freeze(()).parameters())  # freeze(()) undoes it


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="frozen stages \\['layer9'\\]"):
        SaliencyUNet(SaliencyConfig()).freeze(("layer9",))
    with pytest.raises(ValueError, match="backbone 'vgg16'"):
        SaliencyConfig(backbone="vgg16")
    with pytest.raises(ValueError, match="input_size"):
        SaliencyConfig(input_size=(16, 16))


def test_save_load_round_trip_is_identical(model, tmp_path):
    export(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json", "README.md", "example.png"}
    assert "](example.png)" in (tmp_path / "README.md").read_text()  # the card shows the overlay export wrote
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backbone_weights"] is None  # reloading never fetches ImageNet weights
    assert config["input_size"] == [64, 64]
    loaded = SaliencyUNet.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert not loaded.training
    x = torch.rand(2, 3, 70, 90)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_save_overwrites_the_card_and_leaves_no_temp_files(model, tmp_path):
    export(model, tmp_path)
    export(model, tmp_path, training={"epochs": 3})
    assert "`epochs`: `3`" in (tmp_path / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "example.png", "model.safetensors"]


def test_missing_tensor_fails_loudly(model, tmp_path):
    export(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["head.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 missing tensors \['head.weight'\]"):
        SaliencyUNet.from_pretrained(tmp_path)


def test_unexpected_tensor_fails_loudly(model, tmp_path):
    export(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["extra.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 unexpected \['extra.weight'\]"):
        SaliencyUNet.from_pretrained(tmp_path)


def test_config_that_does_not_match_the_weights_fails(model, tmp_path):
    export(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["decoder_channels"] = [256, 128, 64, 32, 16]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="of another shape"):
        SaliencyUNet.from_pretrained(tmp_path)


def test_pickle_weights_are_never_loaded(model, tmp_path):
    export(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SaliencyUNet.from_pretrained(tmp_path)


def test_backbone_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    resnet = torchvision.models.resnet50(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")
    model = SaliencyUNet(backbone_weights=str(tmp_path / "resnet50.pth"))
    assert torch.equal(model.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    assert torch.equal(model.stem[0].weight, resnet.conv1.weight)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, tmp_path / "resnet50.safetensors")
    model = SaliencyUNet(backbone_weights=str(tmp_path / "resnet50.safetensors"))
    assert torch.equal(model.layer4[2].conv3.weight, resnet.layer4[2].conv3.weight)


def test_backbone_file_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth does not exist"):
        SaliencyUNet(backbone_weights=str(tmp_path / "nothing.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="is not a torchvision resnet50 state dict"):
        SaliencyUNet(backbone_weights=str(tmp_path / "bad.pth"))


def test_imagenet_weights_offline_say_what_to_do(monkeypatch):
    # Simulate the download failing the way it does offline; torchvision's own loader is replaced,
    # nothing goes to the network.
    def offline(name, weights=None):
        if weights is not None:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return torchvision.models.resnet50()

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(RuntimeError, match="backbone_weights=None"):
        SaliencyUNet(backbone_weights="imagenet")


def test_card_tells_the_command_the_centre_prior_and_the_limitations(model, tmp_path):
    evaluation = {"dataset": {"name": "nus_scene", "split": "val"}, "n_images": 5,
                  "metrics": {"cc": 0.61, "kld": 0.70}, "baselines": {"center": {"cc": 0.45, "kld": 0.95}}}  # fmt: skip
    training = {"backbone_init": "none", "command": "python -m train --data D --out O --epochs 4"}
    export(model.train(), tmp_path / "a", example_image=None, training=training, evaluation=evaluation)
    card = (tmp_path / "a" / "README.md").read_text()
    assert "```bash\npython -m train --data D --out O --epochs 4\n```" in card
    assert "| centre prior (a Gaussian at the image centre) | 0.4500 | 0.9500 |" in card
    assert "No ImageNet pretraining" in card and "`command`" not in card
    assert not (tmp_path / "a" / "example.png").exists() and "example.png" not in card
    assert model.training  # writing the example below leaves the model as it was, with no inference copy kept
    export(model, tmp_path / "b")
    assert model.training and "_engine_cache" not in model.__dict__
    assert Image.open(tmp_path / "b" / "example.png").size == (512, 512)
    with pytest.raises(FileNotFoundError, match="missing.jpg does not exist"):
        export(model, tmp_path / "c", example_image=tmp_path / "missing.jpg")
