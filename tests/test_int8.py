"""The int8 path (hub.int8): the rewritten graph, the build, fidelity on real photos, the auto choice,
the file beside the weights (folder and Hub), staleness, the CLI, the status line, bench.infer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hub import SaliencyConfig, SaliencyUNet
from hub import int8 as q
from hub import runtime as rt
from hub.publish import export, push

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]
NUS = ROOT.parent / "shared" / "data" / "nus_scene" / "images"
CONFIG = SaliencyConfig(backbone="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=(64, 96))


def photos(n: int, seed: int = 0, size: tuple[int, int] = (72, 100)) -> list[np.ndarray]:
    """Smooth photo-like images: blobs and gradients, not white noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        blob = np.exp(-((yy - h * rng.random()) ** 2 + (xx - w * rng.random()) ** 2) / (2 * (h / 5) ** 2))
        rgb = np.stack([blob * rng.random() + xx / w * rng.random() * 0.5 for _ in range(3)], -1)
        out.append((255 * np.clip(rgb + 0.05 * rng.random((h, w, 3)), 0, 1)).astype(np.uint8))
    return out


def calibrated_model(config: SaliencyConfig = CONFIG, images: list | None = None, seed: int = 0) -> SaliencyUNet:
    """Random init with BatchNorm statistics from `images` (an untrained net with default BN is nearly flat)."""
    from hub.preprocess import images_to_tensor

    torch.manual_seed(seed)
    model = SaliencyUNet(config).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(images_to_tensor(images if images is not None else photos(8, seed=9), config.input_size))
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An exported model with its int8 file, built once for the module."""
    directory = export(calibrated_model(), tmp_path_factory.mktemp("int8-model"), example_image=None)
    model = SaliencyUNet.from_pretrained(directory)
    result = q.build_int8(model, photos(6, seed=1), directory / q.INT8_NAME, check=photos(3, seed=2))
    assert result.path.is_file() and result.calibration_images == 6 and result.check_images == 3
    return directory


# -- the graph ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (8, 4, 1, 1), (16, 8, 12, 10)])
def test_subpixel_conv_is_the_transposed_conv(shape, bias):
    cin, cout, h, w = shape
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias)
    x = torch.randn(2, cin, h, w)
    with torch.no_grad():
        torch.testing.assert_close(q.SubpixelConv(deconv)(x), deconv(x), rtol=1e-5, atol=1e-5)


def test_other_transposed_convs_are_refused():
    with pytest.raises(ValueError, match="not a ConvTranspose2d"):
        q.SubpixelConv(nn.ConvTranspose2d(4, 4, 3, 2, 1))


def test_the_quantizable_graph_computes_the_model():
    model = calibrated_model()
    graph = q.quantizable_graph(model)
    kinds = {type(m) for m in graph.modules()}
    assert nn.ConvTranspose2d not in kinds and nn.BatchNorm2d not in kinds and q.SubpixelConv in kinds
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())  # the model itself is untouched


# -- the file and predict ---------------------------------------------------------------------------------


def test_int8_predict_follows_fp32_at_any_size(folder):
    model = SaliencyUNet.from_pretrained(folder)
    meta = q.read_metadata(folder / q.INT8_NAME)
    assert meta["saliency_weights_sha256"] == q.weights_fingerprint(model)
    assert int(meta["saliency_calibration_images"]) == 6 and 0.9 < float(meta["saliency_fidelity_min_cc"]) <= 1
    for image in [*photos(2, seed=5), photos(1, seed=6, size=(37, 51))[0], photos(1, seed=7, size=(120, 45))[0]]:
        low, ref = model.predict(image, precision="int8"), model.predict(image, precision="fp32")
        assert low.dtype == np.float32 and low.shape == image.shape[:2] and float(low.max()) == pytest.approx(1.0)
        assert np.corrcoef(low.ravel(), ref.ravel())[0, 1] > 0.9
    engines = [type(e) for _, (_, e) in model._engine_cache._entries.items()]
    assert q.Int8Engine in engines


def test_fidelity_on_real_photos(tmp_path):
    """Calibrated and checked on NUS scene photos: int8 follows fp32 (a random-init net: >= 0.95; trained: >= 0.99, bench)."""
    if not NUS.is_dir():
        pytest.skip("../shared/data/nus_scene is absent")
    from hub.preprocess import load_image

    files = sorted(NUS.glob("*.jpg"))[::25]
    real = [load_image(f) for f in files[:20]]
    model = calibrated_model(images=real[:8])
    result = q.build_int8(model, real[:12], tmp_path / q.INT8_NAME, check=real[12:])
    assert result.check_images == 8 and result.fidelity_min_cc >= 0.95, result


def test_stale_int8_file_is_refused_with_the_fix(folder, tmp_path):
    model = SaliencyUNet.from_pretrained(folder)
    with torch.no_grad():
        model.head.bias.add_(0.5)  # fine-tuned further: the file belongs to the old weights
    status = rt.int8_status(model)
    assert not status.usable and "other weights" in status.reason
    with pytest.raises(q.Int8Error, match="export-int8"):
        model.predict(photos(1)[0], precision="int8")


def test_a_model_without_int8_file_says_how_to_make_one(tmp_path):
    directory = export(calibrated_model(), tmp_path / "m", example_image=None)
    model = SaliencyUNet.from_pretrained(directory)
    with pytest.raises(q.Int8Error, match="python -m hub export-int8"):
        model.predict(photos(1)[0], precision="int8")
    with pytest.raises(ValueError, match="CPU only"):
        rt.precision_name(torch.device("cuda"), "int8")
    with pytest.raises(ValueError, match="not one to train"):
        rt.resolve_precision(torch.device("cpu"), "int8")


@pytest.mark.parametrize(
    ("bf16", "int8_dot", "min_fidelity", "expected"),
    [
        (False, True, 0.5, "int8"),  # VNNI, no native bf16, faithful: int8
        (False, True, 0.9999999, "fp32"),  # not faithful enough: auto keeps fp32
        (False, False, 0.5, "fp32"),  # no int8 dot products: int8 would not be faster
        (True, True, 0.5, "bf16"),  # native bf16 stays the default
    ],
)
def test_auto_picks_int8_only_where_it_is_fast_and_faithful(folder, monkeypatch, bf16, int8_dot, min_fidelity, expected):
    monkeypatch.setattr(rt, "native_bf16", lambda device: bf16)
    monkeypatch.setattr(rt, "native_int8", lambda device: int8_dot)
    monkeypatch.setattr(q, "MIN_FIDELITY", min_fidelity)
    model = SaliencyUNet.from_pretrained(folder)
    assert rt.engine_precision(model) == expected
    engine = rt.inference_engine(model, "auto")
    assert isinstance(engine, q.Int8Engine) == (expected == "int8")
    assert rt.engine_precision(model, "fp32") == "fp32" and rt.engine_precision(model, "int8") == "int8"


def test_the_int8_file_is_pushed_and_fetched_from_the_hub_on_first_use(folder, hub_server, hub_repo_id):
    push(folder, hub_repo_id)
    model = SaliencyUNet.from_pretrained(hub_repo_id)
    local = SaliencyUNet.from_pretrained(folder)
    image = photos(1, seed=3)[0]
    np.testing.assert_allclose(model.predict(image, precision="int8"), local.predict(image, precision="int8"), atol=1e-6)
    assert q.locate(model).name == q.INT8_NAME and str(q.locate(model)) != str(folder / q.INT8_NAME)


def test_the_status_line_says_int8_when_it_runs(folder, monkeypatch):
    from space import serving

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setattr(rt, "native_bf16", lambda device: False)
    monkeypatch.setattr(rt, "native_int8", lambda device: True)
    monkeypatch.setattr(q, "MIN_FIDELITY", 0.5)
    store = serving.ModelStore(serving.ModelSpec(str(folder), device="cpu"))
    maps, _ = store.predict([photos(1)[0]])
    assert maps[0].shape == (72, 100) and store.device_label() == "CPU · int8"


def test_the_app_takes_every_predict_precision():
    import app

    (action,) = [a for a in app.build_parser()._actions if a.dest == "precision"]
    assert tuple(action.choices) == rt.PREDICT_PRECISIONS and action.default == "auto"


# -- the CLI and the benchmark ------------------------------------------------------------------------------


def test_export_int8_cli(tmp_path):
    from PIL import Image

    directory = export(calibrated_model(), tmp_path / "m", example_image=None)
    pics = tmp_path / "photos"
    pics.mkdir()
    for i, image in enumerate(photos(5, seed=4)):
        Image.fromarray(image).save(pics / f"{i}.jpg")
    cmd = [sys.executable, "-m", "hub", "export-int8", str(directory), "--calibration", str(pics), "--limit", "3",
           "--check", "2"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (directory / q.INT8_NAME).is_file() and "from 3 calibration photos" in done.stdout
    assert "on 2 other photos" in done.stdout
    bad = subprocess.run([*cmd[:6], str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "does not exist" in bad.stderr


def test_bench_infer_prints_the_int8_row(folder, tmp_path, capsys, monkeypatch):
    import time

    from bench import infer

    def slow_matmul(device, dtype):  # 0.3 s each: the paths (tiny model) must not be timed with these
        return (lambda: time.sleep(0.3)), 1e9

    monkeypatch.setattr(infer, "matmul_fn", slow_matmul)
    out = tmp_path / "records.json"
    assert infer.main(["--model", str(folder), "--sizes", "64x96", "--batch", "1", "--repeat", "1", "--warmup", "0",
                       "--paths", "reference,fp32,int8", "--json", str(out)]) == 0  # fmt: skip
    import json

    records = {r["path"]: r for r in json.loads(out.read_text())}
    assert records["int8"]["precision"] == "int8" and 0.9 < records["int8"]["fidelity_cc"] <= 1
    assert records["int8"]["matmul_int8_gops_per_s"] > 0
    # The matmuls are named fp32/bf16/int8 like three paths; their times once landed in those paths' rows.
    assert all(r["ms_max"] < 250 for r in records.values()), records
    assert "int8" in capsys.readouterr().out
