"""`python -m hub export-onnx`: the ONNX model runs in onnxruntime and matches PyTorch."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402

from hub import SaliencyConfig, SaliencyUNet  # noqa: E402
from hub.__main__ import main  # noqa: E402
from hub.onnx_export import OnnxExportError, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    SaliencyUNet(SaliencyConfig(input_size=(64, 64))).eval().save_pretrained(folder)
    return folder


def test_export_matches_pytorch(model_dir):
    result = export_onnx(model_dir)
    assert result.path == model_dir / "model.onnx" and result.path.is_file()
    assert result.size == (64, 64) and result.max_abs_diff < 1e-4
    assert not list(model_dir.glob(".*.tmp"))  # the temp file was renamed, nothing left behind
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and session.get_inputs()[0].shape == [1, 3, 64, 64]
    x = torch.rand(1, 3, 64, 64)
    model = SaliencyUNet.from_pretrained(str(model_dir))
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = session.run(["saliency"], {"image": x.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_cli_dynamic_export(model_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "dyn.onnx"
    assert main(["export-onnx", str(model_dir), "--out", str(out), "--dynamic", "--size", "64x96"]) == 0
    assert "max abs difference vs PyTorch" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = session.run(["saliency"], {"image": np.random.rand(3, 3, 96, 128).astype(np.float32)})
    assert y.shape == (3, 1, 96, 128) and 0.0 <= y.min() and y.max() <= 1.0


def test_errors_say_what_to_do(model_dir, tmp_path, capsys):
    assert main(["export-onnx", str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(OnnxExportError, match="multiple of 32"):
        export_onnx(model_dir, tmp_path / "x.onnx", size=(50, 64), dynamic=True)
    assert not (tmp_path / "x.onnx").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export-onnx", str(empty)]) == 1
    assert "model.safetensors" in capsys.readouterr().err
