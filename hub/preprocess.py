"""The one place where an image becomes a tensor and a map becomes an image.

Training, evaluation, `SaliencyUNet.predict`, the demo and the benchmarks all call these
functions, so what the model sees at serving time is exactly what it saw in training.
Mean/std normalisation is *not* here: it lives inside the model (see `hub.model`), so every
tensor that crosses this boundary is RGB in [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

# OpenCV colormaps by the names users know from matplotlib.
COLORMAPS: dict[str, int] = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "hot": cv2.COLORMAP_HOT,
}


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparent pixels are composited onto white, as a page shows them."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grey: scale by the type's range; PIL's convert("L") would clip instead.
        arr = np.asarray(img)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max()), 1.0) if arr.max() > 1.0 else 1.0
        arr = np.clip(arr.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(
            f"an image array must be H x W, H x W x 3 or H x W x 4 (RGB order); got shape {arr.shape}."
        )
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) * 255 + 32767) // 65535
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1):
            raise ValueError(
                "a float image array must hold values in [0, 1]; pass uint8 (0-255) for 8-bit images."
            )
        arr = np.nan_to_num(arr) * 255.0 + 0.5
    elif arr.dtype != np.uint8 and arr.dtype != bool:
        raise ValueError(f"image arrays of dtype {arr.dtype} are not supported; pass uint8 RGB.")
    arr = arr.astype(np.uint8, copy=False)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 4:
        return np.asarray(_pil_to_rgb(Image.fromarray(arr)))
    return np.ascontiguousarray(arr)


def load_image(source: ImageInput, max_side: int | None = None) -> np.ndarray:
    """Read any image into an H x W x 3 uint8 RGB array.

    source: a file path, a `PIL.Image` or an array (H x W, H x W x 3 or x 4; uint8, uint16 or
        float in [0, 1]). Files get their EXIF orientation applied; grey, 16-bit, palette, CMYK
        and transparent images are converted (transparency onto white); animated images give
        their first frame.
    max_side: if given, the image is shrunk (aspect kept) so its longer side is at most this;
        JPEGs are then decoded at reduced size, which bounds memory for huge photos.
    """
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb(source)
        return _limit_side(rgb, max_side)
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist or is not a file; pass the path of an image.")
        try:
            img = Image.open(path)
            if max_side is not None:
                img.draft("RGB", (max_side, max_side))  # JPEG only: decode at 1/2, 1/4, 1/8 scale
                img = _reduce_for(img, max_side)
            img = ImageOps.exif_transpose(img)  # also forces the decode
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ValueError(
                f"{path} could not be read as an image ({err}); re-save it as PNG or JPEG."
            ) from err
    else:
        raise TypeError(
            f"cannot read an image from {type(source).__name__}; pass a file path, a PIL.Image or an RGB array."
        )
    try:
        rgb = np.asarray(_pil_to_rgb(img))
    except (OSError, ValueError) as err:
        raise ValueError(f"the image could not be decoded ({err}); re-save it as PNG or JPEG.") from err
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError("the image is empty (0 pixels); pass an image of at least 1 x 1 pixels.")
    return _limit_side(rgb, max_side)


# Modes Image.reduce accepts (palette and 1-bit images are expanded first; 16-bit grey is left as is).
_REDUCIBLE_MODES = ("L", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F")


def _reduce_for(img: Image.Image, max_side: int) -> Image.Image:
    """Box-shrink a huge decoded image by an integer factor that keeps its longer side >= max_side.

    The counterpart of JPEG draft mode for other formats: the RGB conversion, EXIF rotation and
    array copies that follow then touch a quarter (or less) of the pixels, which bounds the memory
    a 12000 x 12000 PNG needs (about 0.9 GB instead of 2.1 GB, and 3x faster). The final resize is done by
    `_limit_side`, so the result is the same image up to rounding.
    """
    factor = max(img.size) // max_side
    if factor < 2:
        return img
    if img.mode == "P":  # a palette cannot be averaged; expand it (keeping transparency) first
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    return img.reduce(factor) if img.mode in _REDUCIBLE_MODES else img


def _limit_side(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    if max_side is None or max(rgb.shape[:2]) <= max_side:
        return rgb
    scale = max_side / max(rgb.shape[:2])
    size = (max(1, round(rgb.shape[0] * scale)), max(1, round(rgb.shape[1] * scale)))
    return resize_image(rgb, size)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an H x W x C uint8 image to size = (height, width).

    Area averaging when shrinking (no aliasing), bilinear when enlarging.
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrink = h <= image.shape[0] and w <= image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_map(saliency: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an H x W float map to size = (height, width) (area when shrinking, else bilinear)."""
    return resize_image(saliency.astype(np.float32, copy=False), size)


def model_input_size(image_size: tuple[int, int], input_size: tuple[int, int], keep_aspect: bool) -> tuple[int, int]:
    """(height, width) at which the model sees an image of image_size = (H, W).

    Stretched to `input_size`, or with keep_aspect: the longer side becomes max(input_size) and
    the shorter one the nearest multiple of 32 to the aspect-true length (at least 32), so the
    network needs no padding and a 9:16 phone photo is not squeezed into 4:3.
    """
    if not keep_aspect:
        return tuple(input_size)  # type: ignore[return-value]
    h, w = image_size
    long = max(input_size)
    short = max(32, round(long * min(h, w) / max(h, w) / 32) * 32)
    return (long, short) if h > w else (short, long)


def images_to_tensor(images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Stack H x W x 3 uint8 RGB images into a B x 3 x h x w float tensor in [0, 1].

    Every image is resized to size = (h, w). The result is channels_last in memory (it is a
    view of the stacked NHWC array), the layout the fast convolution kernels want, with no copy.
    """
    batch = np.stack([resize_image(img, size) for img in images])  # B x h x w x 3 uint8
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """One H x W x 3 uint8 RGB image (already at model size) -> 3 x H x W float in [0, 1]."""
    if not image.flags.writeable:  # e.g. np.asarray of a PIL image; torch wants to own writable memory
        image = image.copy()
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def tensor_to_maps(maps: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """B x 1 x h x w model output -> list of float32 H x W maps at the given original sizes.

    Each map is resized bilinearly and divided by its maximum, so values lie in [0, 1] with the
    peak at 1. Scaling changes no saliency metric (all are scale-invariant), and it makes maps
    of a KL-trained model, whose absolute level carries no meaning, directly displayable.
    """
    arrays = maps.detach().float().cpu().numpy()[:, 0]
    out = []
    for arr, size in zip(arrays, sizes):
        m = np.clip(resize_map(arr, tuple(size)), 0.0, None)
        peak = float(m.max())
        out.append((m / peak).astype(np.float32) if peak > 0 else m.astype(np.float32))
    return out


def map_to_image(saliency: np.ndarray, bits: int = 8) -> Image.Image:
    """H x W float map in [0, 1] -> greyscale PIL image, 8-bit ("L") or lossless 16-bit ("I;16")."""
    m = np.clip(np.nan_to_num(saliency.astype(np.float64)), 0.0, 1.0)
    if bits == 8:
        return Image.fromarray((m * 255.0 + 0.5).astype(np.uint8))
    if bits == 16:
        return Image.fromarray((m * 65535.0 + 0.5).astype(np.uint16))
    raise ValueError(f"bits must be 8 or 16, not {bits}.")


def colorize(saliency: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """H x W float map in [0, 1] -> H x W x 3 uint8 RGB heatmap."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {sorted(COLORMAPS)}.")
    grey = (np.clip(saliency, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)


def overlay(image: ImageInput, saliency: np.ndarray, colormap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Blend a heatmap of `saliency` over `image`; returns H x W x 3 uint8 RGB at the map's size.

    alpha: heatmap opacity in [0, 1]; it is weighted by the map itself so that regions nobody
    looks at keep the photo visible.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}.")
    rgb = resize_image(load_image(image), saliency.shape[:2])
    heat = colorize(saliency, colormap).astype(np.float32)
    weight = alpha * np.clip(saliency, 0.0, 1.0)[:, :, None] ** 0.5
    blended = rgb.astype(np.float32) * (1.0 - weight) + heat * weight
    return (blended + 0.5).astype(np.uint8)
