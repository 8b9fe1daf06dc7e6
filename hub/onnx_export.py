"""Export a saved model to ONNX for ONNX Runtime users, checked against PyTorch.

    python -m hub export-onnx DIR [--out FILE] [--size HxW] [--opset N] [--dynamic]

The graph is the model's own `forward`: input "image", B x 3 x H x W float32 RGB in [0, 1]
(normalisation is inside the graph, as in PyTorch); output "saliency", B x 1 x H x W in [0, 1].
Resize images to the model's `input_size` (config.json) as `hub.preprocess` does, and divide
each map by its maximum for display. The config's inference options (`flip_tta`, `face_prior`
with its `face_detector`, `blur`) are not in the graph: apply them around it as `SaliencyUNet.infer` does. Needs `onnx`, `onnxscript` and `onnxruntime`
(requirements-dev.txt).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hub.publish import atomic_write

log = logging.getLogger(__name__)

# fp32 vs fp32 on the same CPU; the differences are summation order only.
TOLERANCE = 1e-3


class OnnxExportError(RuntimeError):
    """The export could not be written or does not match PyTorch; the message says what to do."""


@dataclass
class OnnxExport:
    path: Path
    size: tuple[int, int]
    opset: int
    dynamic: bool
    max_abs_diff: float  # largest |onnxruntime - PyTorch| over the check inputs, map values in [0, 1]
    checked_shapes: list[tuple[int, ...]]


def export_onnx(
    model_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    size: tuple[int, int] | None = None,
    opset: int = 18,
    dynamic: bool = False,
) -> OnnxExport:
    """Write `model_dir`/model.onnx (or `out`) and check it against PyTorch with onnxruntime.

    size: (height, width) of the exported input; default the model's input_size.
    dynamic: batch size, height and width become free dimensions (height and width must then be
        multiples of 32); otherwise the graph is fixed to batch 1 at `size`.
    The file appears only once it has been written and checked (temp file, then rename).
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise OnnxExportError(
            "onnxruntime is not installed; `pip install onnx onnxscript onnxruntime` (see requirements-dev.txt)."
        ) from err
    from hub.model import SaliencyUNet

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise OnnxExportError(f"{model_dir} is not a folder; pass one written by save_pretrained or `python -m train`.")
    model = SaliencyUNet.from_pretrained(str(model_dir)).eval()
    size = tuple(size or model.config.input_size)
    if dynamic and (size[0] % 32 or size[1] % 32):
        raise OnnxExportError(f"--dynamic needs a size that is a multiple of 32, not {size[0]}x{size[1]}.")
    target = Path(out) if out is not None else model_dir / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)

    example = _test_image(1, size, seed=0)
    dynamic_shapes = None
    if dynamic:
        from torch.export import Dim

        # H = 32 * k keeps forward's pad-to-32 branch statically "no padding" for every size.
        dynamic_shapes = {"x": {0: Dim("batch", min=1, max=1024), 2: 32 * Dim("h32", min=1, max=256),
                                3: 32 * Dim("w32", min=1, max=256)}}  # fmt: skip
    shapes = [(1, 3, *size)]
    if dynamic:
        shapes.append((2, 3, size[0] + 32, size[1] - 32 if size[1] > 32 else size[1] + 64))
    diffs: list[float] = []

    def write_and_check(tmp: Path) -> None:
        with torch.no_grad():
            torch.onnx.export(
                model, (example,), str(tmp), input_names=["image"], output_names=["saliency"],
                opset_version=opset, dynamo=True, external_data=False, dynamic_shapes=dynamic_shapes,
            )  # fmt: skip
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        for i, shape in enumerate(shapes):
            x = _test_image(shape[0], shape[2:], seed=i + 1)
            with torch.no_grad():
                expected = model(x).numpy()
            (got,) = session.run(["saliency"], {"image": x.numpy()})
            if got.shape != expected.shape:
                raise OnnxExportError(
                    f"onnxruntime returned shape {got.shape} for input {shape}, PyTorch {expected.shape}."
                )
            diffs.append(float(np.abs(got - expected).max()))
        if not max(diffs) <= TOLERANCE:
            raise OnnxExportError(
                f"the ONNX model differs from PyTorch by up to {max(diffs):.3g} (tolerance {TOLERANCE}); "
                f"try another --opset (now {opset}) and report the torch/onnxruntime versions."
            )

    atomic_write(target, write_and_check)  # the file appears only once it is written and checked
    diff = max(diffs)
    log.info("wrote %s (%.1f MB); max |onnxruntime - PyTorch| = %.2g", target, target.stat().st_size / 1e6, diff)
    return OnnxExport(target, size, opset, dynamic, diff, shapes)


def _test_image(batch: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """A smooth photo-like test input (gradients and blobs, not white noise) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    yy = torch.linspace(0, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(0, 1, w).view(1, 1, 1, w)
    centre = torch.rand(batch, 3, 2, 1, 1, generator=gen)
    blob = torch.exp(-((yy - centre[:, :, 0]) ** 2 + (xx - centre[:, :, 1]) ** 2) / 0.05)
    noise = 0.05 * torch.rand(batch, 3, h, w, generator=gen)
    return (0.4 * blob + 0.3 * xx * yy + 0.2 + noise).clamp(0, 1).float()
