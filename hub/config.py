"""The one configuration object of the published model.

`SaliencyConfig` is serialised to `config.json` by the Hub mixin and rebuilt by `from_pretrained`;
training checkpoints store the same dict. It holds the architecture *and* the preprocessing
(input size, mean, std), so whoever loads the weights also gets the exact input contract.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Output channels of the encoder taps (s1 stem, s2 layer1, s3 layer2, s4 layer3, bottom layer4).
BACKBONE_CHANNELS: dict[str, tuple[int, int, int, int, int]] = {
    "resnet18": (64, 64, 128, 256, 512),
    "resnet34": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
    "resnet101": (64, 256, 512, 1024, 2048),
    "resnet152": (64, 256, 512, 1024, 2048),
}
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


# What `SaliencyConfig.face_detector` may name, and the searches each runs (`hub.faces`).
FACE_DETECTORS = {"frontal": ("frontal",), "frontal+profile": ("frontal", "profile"), "mtcnn": ("mtcnn",)}


def parse_size(text: str) -> tuple[int, int]:
    """"288x384" -> (288, 384): the one reader of HxW sizes (flags of the CLIs and benchmarks)."""
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} is not HxW, e.g. 288x384.") from None
    if h < 1 or w < 1:
        raise ValueError(f"size {text!r} must have a positive height and width, e.g. 288x384.")
    return h, w


@dataclass
class SaliencyConfig:
    """Architecture and input contract of `SaliencyUNet`.

    backbone: torchvision ResNet name (see `BACKBONE_CHANNELS`).
    decoder_channels: widths of the five decoder stages, from 1/16 resolution up to full
        resolution (the reference plan is 512, 256, 128, 64, 32).
    input_size: (height, width) in pixels at which `predict()` runs the network; images are
        resized to it and maps resized back. Default 288 x 384: 4:3 like SALICON's 480 x 640
        stimuli, a multiple of 32 (no padding), and 2.8x fewer FLOPs than 480 x 640. Fixation
        density maps are smooth (the Gaussian of about one visual degree is ~1/32 of the image
        height, 9 px here), so a larger input adds cost, not detail.
    mean, std: ImageNet RGB statistics applied *inside* the model; callers feed RGB in [0, 1].
    center_prior: number of learned Gaussian centre-bias maps fed to the decoder (0: none).
        People look at the middle of a picture whatever it shows; explicit prior maps (as in
        SAM and UNISAL) spare the content pathway from learning that, so it learns content.
    keep_aspect: resize each image so its longer side is `max(input_size)` and its shorter side
        the nearest multiple of 32 (aspect kept), instead of stretching it to `input_size`.
    flip_tta: average the map of the image and of its mirror image (test-time augmentation).
    blur: sigma of a Gaussian blur applied to the output map, as a fraction of its longer side
        (0: none); calibrated on validation data by `python -m train`.
    face_prior: weight w of the face prior (`hub.faces`): the map is multiplied by (1 + w x F),
        F a Gaussian on each face a detector finds in the image (0: none). An encoder
        trained from scratch on scene photos does not know faces, which draw gaze in any photo.
    face_detector: which detector finds the faces: "mtcnn" (a small CNN face detector shipped
        with the package, `hub.mtcnn`: what training writes), "frontal" (OpenCV's LBP
        frontal-face cascade; the default, so configs written before this field keep their
        behaviour) or "frontal+profile" (and its Haar profile-face cascade, both ways).
    """

    backbone: str = "resnet50"
    decoder_channels: tuple[int, ...] = (512, 256, 128, 64, 32)
    input_size: tuple[int, int] = (288, 384)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    center_prior: int = 0
    keep_aspect: bool = False
    flip_tta: bool = False
    blur: float = 0.0
    face_prior: float = 0.0
    face_detector: str = "frontal"

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; normalise so configs compare equal.
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)
        self.input_size = tuple(int(s) for s in self.input_size)  # type: ignore[assignment]
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]
        if self.backbone not in BACKBONE_CHANNELS:
            raise ValueError(
                f"backbone {self.backbone!r} is not supported; use one of {sorted(BACKBONE_CHANNELS)}."
            )
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            raise ValueError(
                f"decoder_channels {self.decoder_channels} must be 5 positive widths, e.g. (512, 256, 128, 64, 32)."
            )
        if len(self.input_size) != 2 or min(self.input_size) < 32:
            raise ValueError(f"input_size {self.input_size} must be (height, width), each at least 32 pixels.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean {self.mean} and std {self.std} must be 3 RGB values with std > 0.")
        self.center_prior, self.blur, self.face_prior = int(self.center_prior), float(self.blur), float(self.face_prior)
        self.keep_aspect, self.flip_tta = bool(self.keep_aspect), bool(self.flip_tta)
        if self.center_prior < 0 or not 0.0 <= self.blur < 0.5:
            raise ValueError(
                f"center_prior {self.center_prior} must be >= 0 and blur {self.blur} in [0, 0.5) (a fraction of the map's longer side)."
            )
        if not 0.0 <= self.face_prior <= 100.0:
            raise ValueError(f"face_prior {self.face_prior} must be between 0 (none) and 100, e.g. 2.")
        if self.face_detector not in FACE_DETECTORS:
            raise ValueError(f"face_detector {self.face_detector!r} must be one of {', '.join(FACE_DETECTORS)}.")

    @property
    def encoder_channels(self) -> tuple[int, int, int, int, int]:
        return BACKBONE_CHANNELS[self.backbone]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SaliencyConfig:
        """Build from a dict (e.g. `config.json`), ignoring keys that are not config fields.

        That includes `frozen_stages`, which configs written before it became training-only state
        carry: a loaded model is fully trainable (freezing is `SaliencyUNet.freeze`, used by training).
        """
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
