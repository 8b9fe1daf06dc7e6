"""Where and how fast the model runs: device choice, native-bf16 detection, and the inference engine.

`SaliencyUNet.predict` never runs the training module itself. It runs an *engine*: a copy of the
model, built once and cached on it, that computes the same function faster:

- BatchNorm folded into the convolution before it (eval-mode BN is an affine map per channel);
- on CPU, each convolution fused with its ReLU (and, in residual blocks, with the skip addition)
  into one oneDNN call, with its weight laid out once in oneDNN's blocked format, so no
  activation is written and re-read just to be normalised, clipped or added, and no weight is
  re-laid out on every call;
- channels_last (NHWC) weights and activations, the layout oneDNN and cuDNN run fastest;
- bf16 where the hardware does it natively (CUDA compute capability >= 8.0; CPUs with AVX512-BF16
  or AMX), fp16 where that is the fast path instead (CUDA 7.x: V100, T4), with the weights
  stored in that dtype (no per-call casts) and fp32 accumulation; the head's output is cast to
  fp32 before the sigmoid, so the map keeps full resolution in [0, 1].

The weights and the architecture are the model's own; only how they execute changes. The engine
is rebuilt automatically when the model's weights, device or dtype change (e.g. after another
training step), and it never alters the model (no layout or mode change, nothing in its state
dict). `SaliencyUNet.forward` stays the one definition of the network: the engine is a
`SaliencyUNet` whose stages have been swapped for their folded, fused and cast equivalents.

Fidelity of bf16 (CC between the bf16 and the fp32 map; `python -m bench.infer` prints it).
A trained model (runs/nus, 480 x 640 and 288 x 384): CC >= 0.99999 with every stage in bf16.
An *untrained* network is a different matter: it amplifies any small change of its input, so the
random-init stand-in the benchmark uses without `--model` (BN calibrated on photos) gives CC
0.978-0.998 in bf16, depending on the seed and calibration, and even fp32 with another summation
order (inductor) moved one such stand-in to 0.9997. Where the error enters there is the early
encoder, not the decoder's full-resolution layers or the sigmoid head: keeping stem + layer1 +
layer2 in fp32 brings the stand-in to CC 0.9999, keeping any later stage or the whole decoder in
fp32 adds nothing measurable. That costs 40 % more time at 480 x 640 on an AVX512-BF16 CPU (the
early stages are memory-bound at high resolution, and fp32 doubles the bytes), so `predict` runs
every stage in bf16; `inference_engine(model, fp32_stages=(...))` keeps chosen stages in fp32 for
a model that turns out to be sensitive (`python -m bench.infer --fp32-stages stem,layer1,layer2`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # what training runs in (autocast)
# What inference can run in: int8 is the model's quantized form (`hub.int8`), CPU only.
PREDICT_PRECISIONS = (*PRECISIONS, "int8")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def pick_device(device: str = "auto") -> torch.device:
    """"auto" -> CUDA when present, else CPU; otherwise the named device (checked to exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but no CUDA GPU is visible; pass --device cpu or auto.")
    return dev


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matrix math runs in hardware: CUDA compute capability >= 8.0, CPUs with AVX512-BF16 or AMX.

    Not `torch.cuda.is_bf16_supported()`: it is True on a T4 or V100 (7.x) too, where bf16 is emulated and slow.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


def native_int8(device: torch.device) -> bool:
    """True on CPUs with int8 dot-product instructions: x86 VNNI (AVX512-VNNI, AVX-VNNI) or AMX, ARM's dot product."""
    return device.type == "cpu" and _cpu_int8_dot()


@functools.cache
def _cpu_int8_dot() -> bool:
    cpu = torch.cpu
    if any(getattr(cpu, name, lambda: False)() for name in ("_is_vnni_supported", "_is_amx_tile_supported")):
        return True
    try:
        with open("/proc/cpuinfo") as f:  # ARM (Graviton, Ampere): "asimddp" among the Features
            return any(line.startswith("Features") and " asimddp" in line for line in f)
    except OSError:
        return False


def native_fp16(device: torch.device) -> bool:
    """True where fp16 is the fast path and bf16 is not: CUDA compute capability 7.x (V100, T4) has fp16 tensor cores."""
    return device.type == "cuda" and (7, 0) <= torch.cuda.get_device_capability(device) < (8, 0)


def precision_name(device: torch.device, precision: str = "auto") -> str:
    """What `precision` means on `device`: "bf16", "fp16" or "fp32" (the name printed, logged and shown).

    "auto": bf16 where `native_bf16`, fp16 where `native_fp16`, fp32 otherwise (for one model,
    `engine_precision` may pick int8 instead of fp32). A named precision is used as asked, even
    where it is emulated and slow; "int8" runs on the CPU only.
    """
    if precision not in PREDICT_PRECISIONS:
        raise ValueError(f"precision must be one of {PREDICT_PRECISIONS}, not {precision!r}.")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"precision int8 runs on the CPU only, not on {device.type}; use auto, bf16 or fp16 there.")
    if precision != "auto":
        return precision
    if native_bf16(device):
        return "bf16"
    return "fp16" if native_fp16(device) else "fp32"


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The low-precision dtype `precision` runs with on `device` (bf16 or fp16), or None for plain fp32."""
    name = precision_name(device, precision)
    if name == "int8":
        raise ValueError("int8 is an inference precision (the quantized model of hub.int8), not one to train or autocast in.")
    return _DTYPES[name]


def engine_precision(model: nn.Module, precision: str = "auto") -> str:
    """What `predict(precision=...)` runs for this model where it is: "bf16", "fp16", "fp32" or "int8".

    As `precision_name`, except that "auto" on a CPU without native bf16 but with int8 dot products
    (`native_int8`) runs the model's int8 form when it has a fresh one measured faithful at export
    (`hub.int8.int8_status`); otherwise fp32.
    """
    device = next(model.parameters()).device
    name = precision_name(device, precision)
    if precision == "auto" and name == "fp32" and native_int8(device) and int8_status(model).faithful:
        return "int8"
    return name


def int8_status(model: nn.Module) -> Any:
    """`hub.int8.int8_status`, cached while the model's weights are unchanged (it reads the file's metadata)."""
    from hub import int8

    stamp = _weights_stamp(model)
    cached = model.__dict__.get("_int8_status")
    if cached is None or cached[0] != stamp:
        cached = (stamp, int8.int8_status(model))
        model.__dict__["_int8_status"] = cached
    return cached[1]


def precision_plan(
    model: nn.Module, device: torch.device, precision: str = "auto", fp32_stages: Sequence[str] = ()
) -> dict[str, torch.dtype]:
    """The dtype each top-level stage of `model` runs in: per `resolve_precision`, `fp32_stages` fp32."""
    names = [name for name, _ in model.named_children()]
    unknown = sorted(set(fp32_stages) - set(names))
    if unknown:
        raise ValueError(f"fp32_stages {unknown} are not stages of the model; choose from {names}.")
    low = resolve_precision(device, precision)
    return {name: torch.float32 if low is None or name in fp32_stages else low for name in names}


@contextlib.contextmanager
def autocast_context(device: torch.device, precision: str = "auto") -> Iterator[None]:
    """Plain autocast for code that runs the model's modules directly (`predict` uses the engine)."""
    dtype = resolve_precision(device, precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def prepare_for_inference(model: nn.Module, precision: str = "auto") -> None:
    """Eval mode, and build the inference engine now rather than on the first `predict` call."""
    model.eval()
    inference_engine(model, precision)


# -- the engine -----------------------------------------------------------------------------------


def inference_engine(
    model: nn.Module, precision: str = "auto", *, compile: bool = False, fp32_stages: Sequence[str] = ()
) -> nn.Module:
    """The cached fast copy of `model` that `predict` runs: B x 3 x H x W RGB in [0, 1] -> B x 1 x H x W fp32.

    Call it under `torch.inference_mode()`. Built on first use for each (device, precision,
    compile, fp32_stages) and rebuilt when the model's weights change.
    compile: wrap it in `torch.compile` with inductor freezing (weights become constants,
        convolutions get pre-packed weights and fused epilogues, the remaining elementwise work
        is fused too). The first call for each new input shape compiles: 20-35 s for the ResNet50
        U-Net at 480 x 640 on a 2-core CPU with a cold inductor cache, ~14 s with a warm one. On
        that CPU it then runs no faster than the eager engine, which is already at ~80 % of the
        bf16 matmul throughput; measure yours with `python -m bench.infer --paths ...,compiled`.
    fp32_stages: top-level stages (e.g. "stem", "layer1") kept in fp32 under bf16; see the module
        docstring for when that helps and what it costs.
    """
    device = next(model.parameters()).device
    cache = model.__dict__.get("_engine_cache")
    if cache is None:
        cache = _EngineCache()
        model.__dict__["_engine_cache"] = cache  # a plain attribute: never in state_dict or parameters
    if engine_precision(model, precision) == "int8":
        from hub.int8 import int8_engine

        if compile or fp32_stages:
            raise ValueError("precision int8 runs the quantized ONNX model: compile and fp32_stages do not apply.")
        return cache.get(model, (device, "int8"), lambda: int8_engine(model))
    plan = precision_plan(model, device, precision, fp32_stages)
    key = (device, tuple((name, str(dtype)) for name, dtype in plan.items()), bool(compile))
    return cache.get(model, key, lambda: _build_engine(model, plan, device, compile))


class _EngineCache:
    """Engines of one model by (device, plan, compile), each valid while the model's tensors are unchanged.

    Copying or pickling a model gives it an empty cache: an engine belongs to the weights it was built from.
    """

    def __init__(self) -> None:
        self._entries: dict[Any, tuple[tuple, nn.Module]] = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> _EngineCache:
        return _EngineCache()

    def __reduce__(self) -> tuple:
        return (_EngineCache, ())

    def get(self, model: nn.Module, key: Any, build: Any) -> nn.Module:
        stamp = _weights_stamp(model)
        with self._lock:  # concurrent first requests (e.g. the demo's threads) build once
            stale = [k for k, (s, _) in self._entries.items() if s != stamp]
            if stale:
                log.info("model weights changed: rebuilding the inference engine")
            for k in stale:  # engines of old weights (or another device) only hold memory
                del self._entries[k]
            if key not in self._entries:
                self._entries[key] = (stamp, build())
            return self._entries[key][1]


def _weights_stamp(model: nn.Module) -> tuple:
    # In-place updates (optimizer steps, load_state_dict, BN statistics) bump `_version`; `.to()`
    # and parameter reassignment change the storage. Reading both is cheap (~300 tensors). Tensors
    # made under `torch.inference_mode()` have no version counter; outside that mode they cannot be
    # changed in place at all, so their storage is the whole stamp.
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype)
                 for t in itertools.chain(model.parameters(), model.buffers()))


def _build_engine(model: nn.Module, plan: dict[str, torch.dtype], device: torch.device, compile: bool) -> nn.Module:
    engine = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        fold_batchnorm(engine)
        if device.type == "cpu" and not compile and _mkldnn_fusion_available(set(plan.values())):
            # Under compile, inductor does this fusion itself (and pre-packs the weights).
            fuse_mkldnn(engine)
        names = list(plan)
        for name in names:
            dtype = plan[name]
            # The last stage (the head) hands fp32 to the sigmoid, so the map has full resolution in [0, 1].
            out = torch.float32 if name == names[-1] else None
            setattr(engine, name, _Stage(getattr(engine, name).to(dtype), dtype, out))
        engine.to(memory_format=torch.channels_last)
    if compile:
        engine = torch.compile(engine, dynamic=False, options={"freezing": True})
    return engine


class _Stage(nn.Module):
    """Runs `module` in `dtype` (casting its input), optionally casting its output to `out_dtype`."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.module, self.dtype, self.out_dtype = module, dtype, out_dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.module(x.to(self.dtype), *args, **kwargs)
        return y if self.out_dtype is None else y.to(self.out_dtype)


# -- BatchNorm folding ----------------------------------------------------------------------------

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def fold_batchnorm(module: nn.Module) -> None:
    """Fold every eval-mode BatchNorm2d that directly follows a convolution into it, in place.

    Covers `nn.Sequential(conv, bn, ...)` and torchvision's ResNet blocks (conv_i -> bn_i); a BN
    elsewhere is left as it is (still correct, just not folded). Only for inference copies: the
    folded module computes the same eval-mode function but cannot be trained as before.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for child in list(module.children()):
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        kept: list[nn.Module] = []
        for child in module:
            if isinstance(child, nn.BatchNorm2d) and kept and _foldable(kept[-1], child):
                _fold_into(kept[-1], child)
            else:
                kept.append(child)
        for key in list(module._modules):
            del module._modules[key]
        for i, child in enumerate(kept):
            module.add_module(str(i), child)
    elif isinstance(module, (Bottleneck, BasicBlock)):
        for i in (1, 2, 3):
            conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if conv is not None and isinstance(bn, nn.BatchNorm2d) and _foldable(conv, bn):
                _fold_into(conv, bn)
                setattr(module, f"bn{i}", nn.Identity())


def _foldable(conv: nn.Module, bn: nn.BatchNorm2d) -> bool:
    if not isinstance(conv, _CONVS) or bn.running_mean is None or bn.training:
        return False
    if isinstance(conv, nn.ConvTranspose2d):
        return conv.groups == 1 and conv.out_channels == bn.num_features
    return conv.out_channels == bn.num_features


def _fold_into(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    # In float64 on the CPU, so the folded weights are the correctly rounded product on every
    # device, including those without float64 (Apple MPS); the result goes back to the conv's device.
    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float64)

    scale = torch.rsqrt(f64(bn.running_var) + bn.eps)
    if bn.weight is not None:
        scale = scale * f64(bn.weight)
    shift = -f64(bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + f64(bn.bias)
    dtype, device = conv.weight.dtype, conv.weight.device
    axis = 1 if isinstance(conv, nn.ConvTranspose2d) else 0  # ConvTranspose2d weights are (in, out, kh, kw)
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    weight = f64(conv.weight) * scale.view(shape)
    bias = f64(conv.bias) * scale + shift if conv.bias is not None else shift
    conv.weight = nn.Parameter(weight.to(device, dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(device, dtype), requires_grad=False)


# -- oneDNN fusion (CPU) ----------------------------------------------------------------------------


def _mkldnn_fusion_available(dtypes: set[torch.dtype] = frozenset()) -> bool:
    """oneDNN's fused operators exist here, and run every dtype in `dtypes` on this CPU.

    oneDNN's fp16 convolutions need AVX512-FP16 or AVX-NE-CONVERT (e.g. not an AVX512-BF16 AMD EPYC);
    where they are missing, the engine keeps PyTorch's own convolutions, which run fp16 everywhere.
    """
    ops = getattr(torch.ops, "mkldnn", None)
    names = ("_convolution_pointwise", "_convolution_transpose_pointwise", "_reorder_convolution_weight",
             "_reorder_convolution_transpose_weight")  # fmt: skip
    if not (torch.backends.mkldnn.is_available() and all(hasattr(ops, n) for n in names)):
        return False
    checks = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    return all(getattr(ops, checks[d], lambda: True)() for d in dtypes if d in checks)


def fuse_mkldnn(module: nn.Module) -> None:
    """Replace conv(+ReLU) and BN-folded ResNet blocks by fused oneDNN calls, in place (CPU only).

    Call after `fold_batchnorm`. Uses PyTorch's oneDNN pointwise-fusion operators (the ones
    inductor emits for CPU): conv + bias + ReLU in one pass, and conv + bias + skip add + ReLU at
    the end of each residual block. Unrecognised modules are left as they are.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(module, nn.Sequential):
        _fuse_sequential(module)
    for name, child in list(module.named_children()):
        if isinstance(child, (Bottleneck, BasicBlock)) and _block_folded(child):
            setattr(module, name, _FusedBlock(child))
        elif isinstance(child, _CONVS) and _fusable(child):
            setattr(module, name, _FusedConv(child, relu=False))
        elif not isinstance(child, _FusedConv):
            fuse_mkldnn(child)


def _fuse_sequential(seq: nn.Sequential) -> None:
    items = list(seq)
    out: list[nn.Module] = []
    i = 0
    while i < len(items):
        child = items[i]
        if isinstance(child, _CONVS) and _fusable(child):
            relu = i + 1 < len(items) and type(items[i + 1]) is nn.ReLU
            out.append(_FusedConv(child, relu=relu))
            i += 2 if relu else 1
        else:
            out.append(child)
            i += 1
    for key in list(seq._modules):
        del seq._modules[key]
    for j, child in enumerate(out):
        seq.add_module(str(j), child)


def _fusable(conv: nn.Module) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _block_folded(block: nn.Module) -> bool:
    convs = [getattr(block, f"conv{i}", None) for i in (1, 2, 3)]
    bns = [getattr(block, f"bn{i}", None) for i in (1, 2, 3)]
    return all(
        (c is None and b is None) or (isinstance(c, nn.Conv2d) and _fusable(c) and isinstance(b, nn.Identity))
        for c, b in zip(convs, bns)
    )


class _FusedConv(nn.Module):
    """Conv2d or ConvTranspose2d (+ bias, + optional ReLU) as one oneDNN primitive.

    The weight is re-laid out once per input shape into oneDNN's blocked format for that problem
    (what inductor's freezing does ahead of time), instead of on every call: this matters most
    for the weight-heavy deep layers at small batches, where reordering the weight costs as much
    as the convolution (2x for ResNet50's layer4 at batch 1, measured on an AVX512-BF16 CPU).
    """

    MAX_PACKED_SHAPES = 4  # e.g. predict's batch size and a last, partial batch; beyond: plain weights

    def __init__(self, conv: nn.Module, relu: bool) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.output_padding = list(conv.output_padding) if self.transposed else []
        self.attr = "relu" if relu else "none"
        self._packed: dict[tuple[int, ...], torch.Tensor] = {}

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return self.weight  # packed weights are for inference only; a mismatch errors below, clearly
        shape = tuple(x.shape)
        packed = self._packed.get(shape)
        if packed is None and len(self._packed) < self.MAX_PACKED_SHAPES:
            mkldnn = torch.ops.mkldnn
            if self.transposed:
                packed = mkldnn._reorder_convolution_transpose_weight(
                    self.weight, self.padding, self.output_padding, self.stride, self.dilation, self.groups, list(shape)
                )
            else:
                packed = mkldnn._reorder_convolution_weight(
                    self.weight, self.padding, self.stride, self.dilation, self.groups, list(shape)
                )
            self._packed[shape] = packed
        return self.weight if packed is None else packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mkldnn, w = torch.ops.mkldnn, self._weight_for(x)
        if self.transposed:
            return mkldnn._convolution_transpose_pointwise(
                x, w, self.bias, self.padding, self.output_padding, self.stride,
                self.dilation, self.groups, self.attr, [], "",
            )  # fmt: skip
        return mkldnn._convolution_pointwise(
            x, w, self.bias, self.padding, self.stride, self.dilation, self.groups, self.attr, [], ""
        )

    def add_relu(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """relu(conv(x) + other) in one pass."""
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self._weight_for(x), self.bias, self.padding, self.stride, self.dilation, self.groups,
            "add", 1.0, "relu", [], "",
        )  # fmt: skip


class _FusedBlock(nn.Module):
    """A BN-folded torchvision Bottleneck or BasicBlock: fused convs, the last one with add + ReLU."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        convs = [getattr(block, f"conv{i}") for i in (1, 2, 3) if getattr(block, f"conv{i}", None) is not None]
        self.inner = nn.Sequential(*[_FusedConv(c, relu=True) for c in convs[:-1]])
        self.last = _FusedConv(convs[-1], relu=False)
        self.downsample = block.downsample
        if self.downsample is not None:
            fuse_mkldnn(self.downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.last.add_relu(self.inner(x), identity)
