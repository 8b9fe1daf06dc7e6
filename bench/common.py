"""Shared by the benchmarks: the model under test, natural test images, timing helpers, CC."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hub import SaliencyConfig, SaliencyUNet
from hub.preprocess import images_to_tensor, load_image

ROOT = Path(__file__).resolve().parents[1]
NUS_IMAGES = ROOT.parent / "shared" / "data" / "nus_scene" / "images"
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def folder_photos(folder: Path | None, limit: int, flag: str = "") -> tuple[list[np.ndarray], str]:
    """The first `limit` .jpg/.png photos of `folder` (sorted by name), decoded, and where they came
    from; without a folder, `natural_images(limit)`. flag: the option that named the folder, for the error."""
    if folder is None:
        return natural_images(limit)
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit] if Path(folder).is_dir() else []
    if not files:
        raise SystemExit(f"{flag} {folder}: no .jpg or .png images there; pass a folder of photos.".lstrip())
    return [load_image(f) for f in files], str(folder)


def natural_images(n: int) -> tuple[list[np.ndarray], str]:
    """n H x W x 3 uint8 photos and where they came from.

    The NUS scene stimuli (../shared/data/nus_scene, see its README) when present, else the
    photographs bundled with scikit-image (cycled, mirrored for variety).
    """
    if NUS_IMAGES.is_dir():
        files = sorted(NUS_IMAGES.glob("*.jpg"))
        if files:
            step = max(1, len(files) // n)
            return [load_image(f) for f in files[::step][:n]], f"NUS scene stimuli ({NUS_IMAGES})"
    import skimage.data

    photos = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        out.append(np.ascontiguousarray(photo if (i // len(photos)) % 2 == 0 else photo[:, ::-1]))
    return out, "scikit-image sample photographs"


def stand_in_model(config: SaliencyConfig | None = None, calibration_images: int = 32, seed: int = 0) -> SaliencyUNet:
    """A random-init model whose BatchNorm statistics are calibrated on natural images.

    With default (mean 0, var 1) statistics an untrained network's activations drift to
    nonsense and its output is nearly flat, so precision errors are meaningless there.
    Running `calibration_images` photos through it in train mode (cumulative average, no
    gradients) gives every layer the statistics it has on real inputs. Still an untrained
    network: it amplifies small input changes more than a trained one does, which makes it a
    pessimistic fidelity test.
    """
    torch.manual_seed(seed)
    model = SaliencyUNet(config or SaliencyConfig(), backbone_weights=None)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all calibration batches
    model.train()
    for m in bns:  # frozen stages stay in eval mode under model.train(); calibrate them too
        m.train()
    images, _ = natural_images(calibration_images)
    with torch.no_grad():
        for start in range(0, len(images), 8):
            model(images_to_tensor(images[start : start + 8], model.config.input_size))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    return model.eval()


def load_model(spec: str | None, device: torch.device) -> tuple[SaliencyUNet, str]:
    """`from_pretrained(spec)`, or the calibrated stand-in when spec is None; on `device`, eval mode."""
    if spec:
        model = SaliencyUNet.from_pretrained(spec)
        what = f"trained model {spec}"
    else:
        model = stand_in_model()
        what = "random-init ResNet50 U-Net, BatchNorm calibrated on 32 natural images (pass --model for a trained one)"
    return model.to(device).eval(), what


def cc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps (any shape, same number of elements)."""
    a = a.detach().double().flatten()
    b = b.detach().double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_summary() -> str:
    """One line: CPU model, cores torch uses, native-bf16 features, load average."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    feats = [
        label
        for label, check in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
        if getattr(torch.cpu, check, lambda: False)()
    ]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{name}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
        f"native bf16: {', '.join(feats) or 'none'}, load average {load}"
    )
