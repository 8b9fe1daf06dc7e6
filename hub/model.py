"""SaliencyUNet: a ResNet encoder + transposed-convolution U-Net decoder predicting fixation density.

Feature-shape contract (input B x 3 x H x W, H and W multiples of 32; C = encoder channels,
(64, 256, 512, 1024, 2048) for ResNet50):

    stem   conv1-bn1-relu      C[0] x H/2  x W/2    skip s1
    layer1 maxpool-layer1      C[1] x H/4  x W/4    skip s2
    layer2                     C[2] x H/8  x W/8    skip s3
    layer3                     C[3] x H/16 x W/16   skip s4
    layer4                     C[4] x H/32 x W/32   bottom

The decoder reduces the bottom with a 1x1 conv to D[0], then four times: transposed conv
(k=4, s=2, p=1) doubling the resolution, concatenation with the matching skip, 1x1 conv; a last
transposed conv to full resolution, a 3x3 conv to one channel and a sigmoid.
"""

import contextlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image
from torch import nn

from hub.card import DOCS_URL, SOURCE_URL, build_card
from hub.config import STAGES, SaliencyConfig
from hub.faces import PendingFaces, apply_face_prior, search_threads
from hub.preprocess import ImageInput, images_to_tensor, load_image, model_input_size, tensor_to_maps

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"


def conv_bn_relu(cin: int, cout: int, kernel: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def up_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """Transposed conv that exactly doubles H and W."""
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _build_backbone(name: str, weights: str | os.PathLike | None) -> nn.Module:
    """A torchvision ResNet; downloads ImageNet weights only when `weights == "imagenet"`."""
    if weights is None:
        return torchvision.models.get_model(name, weights=None)
    if str(weights) == "imagenet":
        try:
            return torchvision.models.get_model(name, weights="DEFAULT")
        except Exception as err:  # URLError, SSLError, HTTP errors, ... all mean the same thing here
            raise RuntimeError(
                f"could not download the ImageNet weights for {name} ({err}); "
                "pass backbone_weights=None (random init) or the path of a local weights file."
            ) from err
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file {path} does not exist; pass 'imagenet', None or an existing .pth/.safetensors file."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net = torchvision.models.get_model(name, weights=None)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    bad = sorted(set(own) ^ set(state)) + sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if bad:
        raise ValueError(
            f"{path} is not a torchvision {name} state dict ({len(bad)} tensors missing, unexpected or mis-shaped, "
            f"e.g. {bad[:3]}); pass the file torchvision saves for this backbone."
        )
    net.load_state_dict(state, strict=False)
    return net


class CenterPrior(nn.Module):
    """K learned Gaussian maps of the image frame: the centre bias, learned rather than left to the content pathway.

    Each map k is exp(-(u - mu_x)^2 / (2 sx^2) - (v - mu_y)^2 / (2 sy^2)) in coordinates u, v in
    [0, 1] across the image's width and height (peak 1), with learned means and log-sigmas; so a
    prior follows the frame of any aspect. Initialised without randomness: centres on a small
    grid around the middle, widths from narrow to broad.
    """

    def __init__(self, count: int) -> None:
        super().__init__()
        k = torch.arange(count, dtype=torch.float32)
        angle = 2.399963 * k  # golden-angle spiral: distinct centres for any count
        radius = 0.15 * torch.sqrt((k + 0.5) / max(count, 1))
        self.mu = nn.Parameter(torch.stack([0.5 + radius * torch.cos(angle), 0.5 + radius * torch.sin(angle)], 1))
        sigma = torch.linspace(0.08, 0.4, count) if count > 1 else torch.full((count,), 0.2)
        self.log_sigma = nn.Parameter(torch.log(torch.stack([sigma, sigma * 0.8], 1)))

    def forward(self, like: torch.Tensor, valid: tuple[int, int] | None = None) -> torch.Tensor:
        """B x K x h x w maps on the grid of `like` (B x C x h x w), in its dtype.

        valid: the (height, width) of the grid that the image covers (the rest is padding), in
        `like`'s pixels; the frame [0, 1] spans that part.
        """
        b, _, h, w = like.shape
        vh, vw = valid if valid is not None else (h, w)
        mu, sigma = self.mu.float(), self.log_sigma.float().exp()
        u = (torch.arange(w, device=like.device, dtype=torch.float32) + 0.5) / vw  # 1 x W
        v = (torch.arange(h, device=like.device, dtype=torch.float32) + 0.5) / vh  # 1 x H
        gx = torch.exp(-0.5 * ((u[None, :] - mu[:, :1]) / sigma[:, :1]) ** 2)  # K x W
        gy = torch.exp(-0.5 * ((v[None, :] - mu[:, 1:]) / sigma[:, 1:]) ** 2)  # K x H
        maps = gy[:, :, None] * gx[:, None, :]  # K x H x W (separable)
        return maps.to(like.dtype)[None].expand(b, -1, -1, -1).contiguous(memory_format=torch.channels_last)


class SaliencyUNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="pytorch",
    license="apache-2.0",
    pipeline_tag="image-to-image",
    tags=["saliency-prediction", "visual-saliency", "eye-tracking", "fixation-prediction"],
    repo_url=SOURCE_URL,
    docs_url=DOCS_URL,
):
    """Predicts where people look: B x 3 x H x W RGB in [0, 1] -> B x 1 x H x W map in [0, 1].

    Build with `SaliencyUNet(backbone_weights=None)` (random init, no network), or for
    fine-tuning `SaliencyUNet(config, backbone_weights="imagenet")`. Load a trained model with
    `SaliencyUNet.from_pretrained(dir_or_repo_id)`; its config records that no backbone
    download is needed.
    """

    def __init__(self, config: SaliencyConfig | None = None, backbone_weights: str | None = None) -> None:
        super().__init__()
        if config is None:
            config = SaliencyConfig()
        elif isinstance(config, dict):
            config = SaliencyConfig.from_dict(config)
        self.config = config
        # What `save_pretrained` writes as config.json: the weights it saves already contain the
        # backbone, so a reloaded model must never fetch ImageNet weights again.
        self._hub_mixin_config = {**config.to_dict(), "backbone_weights": None}

        net = _build_backbone(config.backbone, backbone_weights)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.layer1 = nn.Sequential(net.maxpool, net.layer1)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4

        c1, c2, c3, c4, c5 = config.encoder_channels
        d1, d2, d3, d4, d5 = config.decoder_channels
        self.bottleneck = conv_bn_relu(c5, d1)
        self.up4, self.fuse4 = up_bn_relu(d1, d1), conv_bn_relu(d1 + c4, d1)
        self.up3, self.fuse3 = up_bn_relu(d1, d2), conv_bn_relu(d2 + c3, d2)
        self.up2, self.fuse2 = up_bn_relu(d2, d3), conv_bn_relu(d3 + c2, d3)
        self.up1 = up_bn_relu(d3, d4)
        # Registered before fuse1 and head: the inference engine treats the last child as the head.
        self.prior = CenterPrior(config.center_prior) if config.center_prior else None
        self.fuse1 = conv_bn_relu(d4 + c1 + config.center_prior, d4)
        self.up0 = up_bn_relu(d4, d5)
        self.head = nn.Conv2d(d5, 1, kernel_size=3, padding=1)

        # Normalisation travels with the weights via the config, not the state dict.
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        # Training-only state, not part of the config: a model loaded with from_pretrained is fully trainable.
        self.frozen_stages: tuple[str, ...] = ()

    # -- training behaviour -------------------------------------------------------------------
    def freeze(self, stages: Sequence[str]) -> "SaliencyUNet":
        """Freeze encoder `stages` (any of "stem", "layer1" ... "layer4") for fine-tuning: no gradients,
        and BatchNorm statistics fixed in train mode. `freeze(())` unfreezes everything."""
        stages = tuple(stages)
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"frozen stages {unknown} are not encoder stages; choose from {list(STAGES)}.")
        for stage in STAGES:
            getattr(self, stage).requires_grad_(stage not in stages)
        self.frozen_stages = stages
        return self.train(self.training)

    def train(self, mode: bool = True) -> "SaliencyUNet":
        """Like `nn.Module.train`, but frozen stages stay in eval mode: their BN statistics never move."""
        super().train(mode)
        for stage in getattr(self, "frozen_stages", ()):
            getattr(self, stage).eval()
        return self

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for s in STAGES for p in getattr(self, s).parameters()]

    # -- forward --------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder taps [s1, s2, s3, s4, bottom] for a normalised input (H, W multiples of 32)."""
        s1 = self.stem(x)
        s2 = self.layer1(s1)
        s3 = self.layer2(s2)
        s4 = self.layer3(s3)
        return [s1, s2, s3, s4, self.layer4(s4)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W RGB in [0, 1], any H and W -> B x 1 x H x W saliency in [0, 1]."""
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % 32, (-w) % 32
        x = (x - self.mean) / self.std
        if pad_h or pad_w:
            # Replicate padding keeps the border statistics of the image; the pad is cropped away.
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        s1, s2, s3, s4, bottom = self.features(x)
        y = self.bottleneck(bottom)
        y = self.fuse4(torch.cat([self.up4(y), s4], dim=1))
        y = self.fuse3(torch.cat([self.up3(y), s3], dim=1))
        y = self.fuse2(torch.cat([self.up2(y), s2], dim=1))
        y = self.up1(y)
        parts = [y, s1]
        if self.prior is not None:
            parts.append(self.prior(y, valid=(-(-h // 2), -(-w // 2))).to(y.dtype))
        y = self.fuse1(torch.cat(parts, dim=1))
        y = self.head(self.up0(y))
        return torch.sigmoid(y[:, :, :h, :w])

    def infer(
        self, x: torch.Tensor, net: nn.Module | None = None, faces: torch.Tensor | PendingFaces | None = None
    ) -> torch.Tensor:
        """What `predict` computes on a batch at model size: B x 3 x h x w in [0, 1] -> B x 1 x h x w fp32.

        The forward pass of `net` (the model itself, or its inference engine) with the config's
        test-time flip averaging, face prior and blur. Training's validation calls it too, so the
        scores it selects by are those of the published behaviour.
        faces: B x 1 x h x w face maps of the batch's original images (`hub.faces.image_faces`),
            required when the config has a face prior (the detector needs the original image,
            which `x` no longer is); ignored otherwise. Faces still being detected
            (`hub.faces.PendingFaces`, or any object with `result()`) are waited for after the
            forward pass, so that detection (other threads) runs while the network does.
        """
        net = self if net is None else net
        if self.config.flip_tta:
            both = net(torch.cat([x, x.flip(-1)])).float()
            y = 0.5 * (both[: len(x)] + both[len(x) :].flip(-1))
        else:
            y = net(x).float()
        if self.config.face_prior > 0:
            if faces is None:
                raise ValueError(f"this model has a face prior (face_prior={self.config.face_prior:g}): pass "
                                 "faces=hub.faces.image_faces(original images, (h, w), config.face_detector) to infer().")
            y = apply_face_prior(y, faces.result() if hasattr(faces, "result") else faces, self.config.face_prior)
        return gaussian_blur(y, self.config.blur * max(y.shape[-2:])) if self.config.blur > 0 else y

    # -- inference ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def predict(
        self,
        image: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 8,
        precision: str = "auto",
        compile: bool = False,
    ) -> Any:
        """Saliency map(s) for one image or a list of images.

        image: a file path, a PIL.Image or an H x W x 3 uint8 RGB array (any size or mode), or a
            list of them (batched internally by `batch_size`).
        precision: "auto" (bf16 where the hardware does it natively: CUDA compute capability
            >= 8.0, CPUs with AVX512-BF16/AMX; fp16 on CUDA 7.x such as a T4 or V100; on other
            CPUs int8 where the model has a faithful int8 form and the CPU int8 dot products,
            else fp32), or "bf16", "fp16", "fp32", "int8" (forced, slow where emulated; int8
            needs the model's `model.int8.onnx`, see `hub.int8`);
            `hub.runtime.engine_precision(model)` says what "auto" is here.
        compile: run a `torch.compile`d engine (inductor with frozen weights). The first call
            for each new batch size compiles (20-35 s on a 2-core CPU); only worth it where
            `python -m bench.infer --paths reference,default,compiled` shows a gain (none on an
            AVX512-BF16 CPU, where the default engine is already near the matmul limit).
        The config's inference options apply: `keep_aspect` (each image at its aspect-true model
        size; a list is batched by size), `flip_tta` (mean with the mirror image's map),
        `face_prior` (faces detected in the original image, `hub.faces`) and `blur`.
        Returns a float32 H x W array in [0, 1] (peak 1) at each image's original resolution,
        or a list of them for a list input. Runs on the model's device without gradients, via
        a fast copy of the model built on first use (see `hub.runtime`); the model itself is
        left untouched (mode, layout, weights).
        """
        from hub.runtime import inference_engine

        single = isinstance(image, (str, os.PathLike, np.ndarray, Image.Image))
        items = [image] if single else list(image)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}.")
        engine = inference_engine(self, precision, compile=compile)
        device = self.device
        chunks = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
        # On a GPU, decoding and resizing the next batch (a CPU thread; PIL and OpenCV release the
        # GIL) overlaps with the forward pass of the current one, which would otherwise wait for it.
        prefetch = device.type == "cuda" and len(chunks) > 1

        cfg = self.config

        def load(chunk: list) -> list[tuple[torch.Tensor, PendingFaces | None, list[int], list[tuple[int, int]]]]:
            """The chunk as batches of one model size each: (tensor, its face maps to come, positions
            in chunk, original sizes). Faces are detected on the model's device: by other threads,
            during the forward pass, on a GPU; here and now on a CPU (`hub.faces.search_threads`)."""
            arrays = [load_image(x) for x in chunk]
            groups: dict[tuple[int, int], list[int]] = {}
            for j, a in enumerate(arrays):
                groups.setdefault(model_input_size(a.shape[:2], cfg.input_size, cfg.keep_aspect), []).append(j)
            batches = []
            for size, members in groups.items():
                x = images_to_tensor([arrays[j] for j in members], size)
                faces = PendingFaces(detector, [arrays[j] for j in members], size, cfg.face_detector, device) if cfg.face_prior > 0 else None
                batches.append((x.pin_memory() if prefetch else x, faces, members, [arrays[j].shape[:2] for j in members]))
            return batches

        maps: list = []
        detect_workers = search_threads(device, os.cpu_count() or 2)  # none on a CPU: searched here, before the network
        with ThreadPoolExecutor(1) as pool, (ThreadPoolExecutor(detect_workers) if detect_workers else contextlib.nullcontext()) as detector, \
                torch.inference_mode():  # fmt: skip
            pending = pool.submit(load, chunks[0]) if prefetch else None
            for i, chunk in enumerate(chunks):
                if pending is not None:
                    batches = pending.result()
                    pending = pool.submit(load, chunks[i + 1]) if i + 1 < len(chunks) else None
                else:
                    batches = load(chunk)
                out: list = [None] * len(chunk)
                for x, faces, members, sizes in batches:
                    y = self.infer(x.to(device, non_blocking=True), engine, faces)
                    for j, m in zip(members, tensor_to_maps(y, sizes)):
                        out[j] = m
                maps.extend(out)
        return maps[0] if single else maps

    # -- Hub IO -----------------------------------------------------------------------------------
    def generate_model_card(self, *args: Any, **kwargs: Any):  # noqa: ANN201 (ModelCard)
        """The model card written by `save_pretrained`; kwargs come from `model_card_kwargs`."""
        kwargs.setdefault("repo_url", self._hub_mixin_info.repo_url)
        return build_card(self.config, num_parameters=sum(p.numel() for p in self.parameters()), **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> str | None:
        """Write model.safetensors, config.json and README.md (the card) into save_directory.

        Files are written to a temporary folder beside it and moved into place one by one, so an
        interrupted save never leaves a half-written file, and the card is always regenerated.
        """
        from hub.publish import atomic_save

        return atomic_save(super().save_pretrained, save_directory, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> "SaliencyUNet":
        """Strict, safetensors-only loading: a missing or unexpected tensor is an error, never skipped."""
        from safetensors.torch import load_file

        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(weights):
                raise FileNotFoundError(
                    f"{model_id} has no {WEIGHTS_NAME}; point at a folder written by save_pretrained or `python -m train`."
                )
        else:
            try:
                weights = hf_hub_download(
                    repo_id=model_id,
                    filename=WEIGHTS_NAME,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    token=token,
                    local_files_only=local_files_only,
                )
            except EntryNotFoundError as err:
                raise FileNotFoundError(
                    f"{model_id} (revision {revision or 'main'}) has no {WEIGHTS_NAME}; "
                    "this project loads safetensors weights only, never pickles."
                ) from err
        model_kwargs.setdefault("backbone_weights", None)
        model = cls(**model_kwargs)
        state = load_file(weights, device=str(map_location))
        load_strict(model, state, source=weights, strict=strict)
        model.to(map_location)
        model.eval()
        # The int8 form (hub.int8) beside the weights, looked for (and downloaded) only when needed.
        from hub import int8

        if os.path.isdir(model_id):
            local = os.path.join(model_id, int8.INT8_NAME)
            int8.set_source(model, lambda: local if os.path.isfile(local) else None)
        else:
            def fetch() -> str | None:
                try:
                    return hf_hub_download(repo_id=model_id, filename=int8.INT8_NAME, revision=revision,
                                           cache_dir=cache_dir, token=token, local_files_only=local_files_only)
                except EntryNotFoundError:
                    return None

            int8.set_source(model, fetch)
        return model


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """B x C x H x W maps blurred by an isotropic Gaussian of `sigma` pixels (separable, reflected border)."""
    if sigma <= 0:
        return maps
    radius = max(1, min(int(4.0 * sigma + 0.5), min(maps.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    b, c, h, w = maps.shape
    y = maps.reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Load a state dict, naming every missing, unexpected or mis-shaped tensor in one error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if mis_shaped or (strict and (missing or unexpected)):
        raise ValueError(
            f"{source} does not match the model built from its config.json: "
            f"{len(missing)} missing tensors {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(mis_shaped)} of another shape {mis_shaped[:5]}; re-export the weights with save_pretrained "
            "or fix config.json."
        )
    model.load_state_dict(state, strict=strict)

