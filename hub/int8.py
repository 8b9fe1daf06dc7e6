"""int8 inference on CPUs: the model quantized by ONNX Runtime, calibrated on real photos.

    python -m hub export-int8 DIR --calibration PHOTOS... [--limit 64] [--check 64]

CPUs without native bf16 (older Xeons, AMD Zen 2/3, many cloud and free Space CPUs) run int8
dot products (AVX512-VNNI, AVX-VNNI, ARM dot-product) at several times their fp32 rate. This
module makes the model's int8 form with a maintained toolchain, ONNX Runtime's static
quantization (QDQ format): weights int8 with one scale per output channel, activations uint8
with ranges calibrated on real photos (the 99.999th percentile over the calibration set), every convolution and
residual addition in int8. Nothing here is a hand-written kernel.

The quantized graph is the model's own function, in an inference form (as `hub.runtime`'s engine
is): BatchNorm folded into the convolutions, and each stride-2 transposed convolution (k=4, p=1)
of the decoder rewritten as the equivalent 3x3 convolution with four times the channels followed
by a depth-to-space interleave. ONNX Runtime has int8 kernels for convolutions but runs transposed
ones in float, which left two thirds of the int8 model's time in the five transposed layers.

`model.int8.onnx` sits beside `model.safetensors` (and is pushed with it); its metadata records a
fingerprint of the weights it was made from, the calibration and the fidelity measured at export
(the lowest CC against the fp32 model on held-out photos). `predict(precision="int8")` uses it;
"auto" uses it on CPUs with int8 dot products but without native bf16, where it was faithful
(CC >= `MIN_FIDELITY`). Loading the PyTorch weights stays safetensors-only: this file is an ONNX
graph, never a pickle. Needs onnxruntime to run, and onnx + onnxscript as well to build
(requirements-dev.txt).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

INT8_NAME = "model.int8.onnx"
# "auto" uses the int8 form only when its maps correlate at least this well with the fp32 model's
# on every held-out photo checked at export.
MIN_FIDELITY = 0.99


class Int8Error(RuntimeError):
    """The int8 form cannot be made or used; the message says what to do."""


# -- the graph that is quantized --------------------------------------------------------------------


class SubpixelConv(nn.Module):
    """A ConvTranspose2d(k=4, s=2, p=1) as Conv2d(k=3, p=1) to 4 x C_out channels + depth-to-space.

    Output pixel (2m + r) of a stride-2 transposed convolution with kernel 4 and padding 1 takes
    input pixels m - 1, m, m + 1 with taps (w[3], w[1], 0) for r = 0 and (0, w[2], w[0]) for r = 1;
    in 2-D each of the four phases (ry, rx) is a 3x3 convolution with the outer product of those
    taps. Exactly the same function, as a plain convolution that has int8 kernels everywhere.
    The interleave is `pixel_shuffle` (ONNX DepthToSpace), which ONNX Runtime runs on the int8 tensor.
    """

    def __init__(self, deconv: nn.ConvTranspose2d) -> None:
        super().__init__()
        if not is_stride2_deconv(deconv):
            raise ValueError(f"{deconv} is not a ConvTranspose2d(kernel 4, stride 2, padding 1).")
        w = deconv.weight.detach().double()  # C_in x C_out x 4 x 4
        cin, cout = w.shape[:2]
        taps = {0: (3, 1, None), 1: (None, 2, 0)}  # phase r -> kernel index for input offsets -1, 0, +1
        kernel = torch.zeros(2, 2, cout, cin, 3, 3, dtype=torch.float64)
        for ry in (0, 1):
            for rx in (0, 1):
                for i, ky in enumerate(taps[ry]):
                    for j, kx in enumerate(taps[rx]):
                        if ky is not None and kx is not None:
                            kernel[ry, rx, :, :, i, j] = w[:, :, ky, kx].T
        self.conv = nn.Conv2d(cin, 4 * cout, 3, padding=1, bias=deconv.bias is not None)
        with torch.no_grad():
            # Channel c * 4 + ry * 2 + rx: the layout pixel_shuffle (ONNX DepthToSpace, CRD) interleaves.
            self.conv.weight.copy_(kernel.permute(2, 0, 1, 3, 4, 5).reshape(4 * cout, cin, 3, 3))
            if deconv.bias is not None:
                self.conv.bias.copy_(deconv.bias.detach().repeat_interleave(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(self.conv(x), 2)


def is_stride2_deconv(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.ConvTranspose2d) and module.kernel_size == (4, 4) and module.stride == (2, 2)
        and module.padding == (1, 1) and module.output_padding == (0, 0) and module.dilation == (1, 1)
        and module.groups == 1
    )  # fmt: skip


def quantizable_graph(model: nn.Module) -> nn.Module:
    """An eval copy of `model` computing the same function: BN folded, stride-2 deconvolutions as `SubpixelConv`."""
    from hub.runtime import fold_batchnorm

    graph = copy.deepcopy(model).float().cpu().eval().requires_grad_(False)
    graph.__dict__.pop("_engine_cache", None)
    with torch.no_grad():
        fold_batchnorm(graph)
        _replace_deconvs(graph)
    return graph


def _replace_deconvs(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if is_stride2_deconv(child):
            setattr(module, name, SubpixelConv(child))
        else:
            _replace_deconvs(child)


# -- what the file was made from ---------------------------------------------------------------------


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (names, shapes, fp32 values): which weights an int8 file belongs to."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _cached_fingerprint(model: nn.Module) -> str:
    from hub.runtime import _weights_stamp

    stamp = _weights_stamp(model)
    cached = model.__dict__.get("_fingerprint")
    if cached is None or cached[0] != stamp:
        cached = (stamp, weights_fingerprint(model))
        model.__dict__["_fingerprint"] = cached
    return cached[1]


@dataclass
class Int8Build:
    path: Path
    seconds: float  # export + calibration + quantization (the check not included)
    calibration_images: int
    check_images: int
    fidelity_min_cc: float  # lowest CC against fp32 over the check photos (nan without any)
    fidelity_median_cc: float


def build_int8(
    model: nn.Module,
    calibration: Sequence[Any],
    out: str | os.PathLike,
    *,
    check: Sequence[Any] = (),
    progress: Callable[[str], None] | None = None,
) -> Int8Build:
    """Quantize `model` to int8 and write it to `out` (an ONNX file), checked on `check` photos.

    calibration: photos (paths, PIL images or H x W x 3 uint8 arrays, see `hub.preprocess`), fed
        at the model's input size as `predict` feeds them; 32-64 varied photos are enough.
    check: other photos; the CC between the int8 and the fp32 map of each (the model's own
        `infer`, flip averaging and blur included) is recorded in the file and returned.
    The file appears only once written (temp file, then rename).
    """
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import (
            CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:
        raise Int8Error(
            "building the int8 model needs onnx, onnxscript and onnxruntime; `pip install onnx onnxscript onnxruntime` "
            "(see requirements-dev.txt)."
        ) from err
    from hub.publish import atomic_write

    if not calibration:
        raise Int8Error("no calibration photos; pass 32-64 real photos (e.g. a folder of the training images).")
    say = progress or log.info
    start = time.perf_counter()
    graph = quantizable_graph(model)
    batches = [_model_batch(model, image) for image in calibration]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._items, None)
            return None if x is None else {"image": x.numpy()}

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        fp32_path, pre_path = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        say("exporting the inference graph to ONNX")
        _export(graph, batches[0], fp32_path)
        quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=True)
        say(f"calibrating on {len(batches)} photos and quantizing")
        # Percentile ranges (99.999 % of each activation's values, ONNX Runtime's default) rather than
        # min/max: a few outliers no longer stretch the int8 grid (random-init stand-in at 480 x 640:
        # CC 0.974 against 0.969 with min/max; excluding the first convolution from int8 added nothing).
        quantize_static(
            str(pre_path), str(Path(tmp) / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )  # fmt: skip
        seconds = time.perf_counter() - start
        quantized = Path(tmp) / "int8.onnx"
        engine = Int8Engine(quantized)
        ccs = [_check_cc(model, engine, image) for image in check]
        lo = min(ccs) if ccs else float("nan")
        mid = statistics.median(ccs) if ccs else float("nan")
        meta = {
            "saliency_weights_sha256": _cached_fingerprint(model),
            "saliency_calibration_images": str(len(batches)),
            "saliency_check_images": str(len(ccs)),
            "saliency_fidelity_min_cc": f"{lo:.6f}",
            "saliency_fidelity_median_cc": f"{mid:.6f}",
            "saliency_build_seconds": f"{seconds:.1f}",
        }
        _write_metadata(quantized, meta)
        atomic_write(out, lambda target: Path(target).write_bytes(quantized.read_bytes()))
    log.info("wrote %s (%.1f MB) in %.0f s; fidelity on %d photos: CC min %.4f, median %.4f",
             out, out.stat().st_size / 1e6, seconds, len(ccs), lo, mid)  # fmt: skip
    return Int8Build(out, seconds, len(batches), len(ccs), lo, mid)


def _model_batch(model: nn.Module, image: Any) -> torch.Tensor:
    """1 x 3 x h x w in [0, 1], contiguous: the image as `predict` feeds it to the network."""
    from hub.preprocess import images_to_tensor, load_image, model_input_size

    cfg = model.config
    array = load_image(image)
    return images_to_tensor([array], model_input_size(array.shape[:2], cfg.input_size, cfg.keep_aspect)).contiguous()


def _check_cc(model: nn.Module, engine: nn.Module, image: Any) -> float:
    from hub.faces import image_faces
    from hub.preprocess import load_image

    x = _model_batch(model, image)
    faces = image_faces([load_image(image)], tuple(x.shape[-2:]), model.config.face_detector) if model.config.face_prior > 0 else None
    with torch.inference_mode():
        ref = model.infer(x.to(next(model.parameters()).device), faces=faces).double().flatten().cpu()
        got = model.infer(x, engine, faces).double().flatten()
    ref, got = ref - ref.mean(), got - got.mean()
    denom = float(ref.norm() * got.norm())
    return float((ref * got).sum()) / denom if denom > 0 else float("nan")


def _export(graph: nn.Module, example: torch.Tensor, path: Path) -> None:
    from torch.export import Dim

    # H = 32 * k keeps forward's pad-to-32 branch statically "no padding"; Int8Engine pads the rest.
    shapes = {"x": {0: Dim("batch", min=1, max=1024), 2: 32 * Dim("h32", min=1, max=256),
                    3: 32 * Dim("w32", min=1, max=256)}}  # fmt: skip
    with torch.no_grad():
        torch.onnx.export(
            graph, (_pad32(example),), str(path), input_names=["image"], output_names=["saliency"], opset_version=18,
            dynamo=True, external_data=False, dynamic_shapes=shapes, verbose=False,
        )  # fmt: skip


def _write_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `saliency_*` metadata an int8 file carries (needs only onnxruntime)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # metadata only: build nothing
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def _pad32(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % 32, (-w) % 32
    if not (pad_h or pad_w):
        return x
    return torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate")  # as SaliencyUNet.forward pads


# -- running it ---------------------------------------------------------------------------------------


class Int8Engine(nn.Module):
    """The int8 model as an engine: B x 3 x H x W RGB in [0, 1] (any H, W) -> B x 1 x H x W fp32, on the CPU.

    Runs an ONNX Runtime session with torch's thread count. Inputs whose sides are not multiples
    of 32 are replicate-padded and the map cropped back, as `SaliencyUNet.forward` does.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        batch = _pad32(x.detach().to("cpu", torch.float32)).contiguous().numpy()
        (y,) = self.session.run(["saliency"], {"image": batch})
        return torch.from_numpy(y[:, :, :h, :w].copy())

    def __deepcopy__(self, memo: dict) -> Int8Engine:
        return Int8Engine(self.path)


def locate(model: nn.Module) -> Path | None:
    """The int8 file of `model`: set by `from_pretrained` (a folder's, or the Hub repo's, fetched on first use)."""
    locator = model.__dict__.get("_int8_locator")
    if locator is None:
        return None
    path = locator()
    return Path(path) if path is not None else None


def set_source(model: nn.Module, locator: Callable[[], str | os.PathLike | None]) -> None:
    """Where `locate` looks for the int8 file: a callable returning its path, or None when there is none."""
    cached: list = []

    def once() -> str | os.PathLike | None:
        if not cached:
            cached.append(locator())
        return cached[0]

    model.__dict__["_int8_locator"] = once


@dataclass(frozen=True)
class Int8Status:
    usable: bool  # an int8 file for these weights exists and can run here
    faithful: bool  # its measured fidelity reaches MIN_FIDELITY
    reason: str  # why not, in words (empty when usable and faithful)
    path: Path | None = None


def int8_status(model: nn.Module) -> Int8Status:
    """Whether `model` has a fresh, runnable int8 form, and whether it is faithful enough for "auto"."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return Int8Status(False, False, "onnxruntime is not installed (`pip install onnxruntime`)")
    path = locate(model)
    if path is None or not path.is_file():
        return Int8Status(False, False, f"the model has no {INT8_NAME}; make one with `python -m hub export-int8 DIR "
                                        "--calibration PHOTOS`")  # fmt: skip
    meta = read_metadata(path)
    if meta.get("saliency_weights_sha256") != _cached_fingerprint(model):
        return Int8Status(False, False, f"{path} was made from other weights; run `python -m hub export-int8` again",
                          path)  # fmt: skip
    fidelity = float(meta.get("saliency_fidelity_min_cc", "nan"))
    if not fidelity >= MIN_FIDELITY:
        return Int8Status(True, False, f"its fidelity at export was CC {fidelity:.4f} (< {MIN_FIDELITY})", path)
    return Int8Status(True, True, "", path)


def int8_engine(model: nn.Module) -> Int8Engine:
    """The int8 engine of `model`, or Int8Error with the reason there is none."""
    status = int8_status(model)
    if not status.usable:
        raise Int8Error(f"precision int8 is not available: {status.reason}.")
    return Int8Engine(status.path)
