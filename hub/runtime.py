"""Where and how fast the model runs: device choice, native-bf16 detection, memory layout."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp32")


def pick_device(device: str = "auto") -> torch.device:
    """"auto" -> CUDA when present, else CPU; otherwise the named device (checked to exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but no CUDA GPU is visible; pass --device cpu or auto.")
    return dev


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matrix math runs in hardware: CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}.")
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return None
    return torch.bfloat16


@contextlib.contextmanager
def autocast_context(device: torch.device, precision: str = "auto") -> Iterator[None]:
    dtype = resolve_precision(device, precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def prepare_for_inference(model: nn.Module) -> None:
    """Eval mode and channels_last weights (done once; NHWC is what oneDNN and cuDNN run fastest)."""
    model.eval()
    if not getattr(model, "_channels_last", False):
        model.to(memory_format=torch.channels_last)
        model._channels_last = True
