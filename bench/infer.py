"""Inference speed: the reference path against the path `predict()` uses, side by side, in one run.

    python -m bench.infer                                   # CPU, 256x256,288x384,480x640, batch 1 and 8
    python -m bench.infer --sizes 480x640 --batch 1 --paths reference,default,compiled
    python -m bench.infer --device cuda --sizes 480x640 --batch 1,8,64
    python -m bench.infer --model runs/nus --json bench-infer.json
    python -m bench.infer --options --sizes 480x640 --batch 1              # what each predict() option costs
    python -m bench.infer --options --sizes 480x640 --batch 1 --photos ../shared/data/eyecrowd/images  # ... on crowds

Paths (all at the same input resolution, on the same preprocessed batch of natural photos):
- reference: fp32, NCHW, eager `model(x)` under `no_grad`, as the reference notebook ran it;
- default:   what `predict()` runs (`hub.runtime.inference_engine(model, "auto")`): BN folded,
             oneDNN-fused conv+ReLU(+add) with pre-packed weights on CPU, channels_last, bf16
             where the hardware does it natively (fp32 otherwise);
- bf16, fp16, fp32: the same engine in that precision (`predict(..., precision=...)`), to compare
             precisions side by side, with each one's fidelity against the fp32 reference;
- compiled:  the same engine under `torch.compile` with inductor freezing (`predict(..., compile=True)`);
             its one-off compile time is printed;
- int8:      the model's int8 form (`hub.int8`, ONNX Runtime), `predict(..., precision="int8")`: the
             model's own model.int8.onnx when it has a fresh one, else one built here (calibrated on 32
             photos, checked on 16 others; the build time is printed).

Each round times every path once, then a large fp32, bf16 and int8 matmul, in turn, so all of them
see the same machine load (on a shared machine the load average is printed). Reported per path:
median / min / max ms per image, images/s, achieved GFLOP/s (FLOPs of one forward pass counted by
torch's FlopCounterMode), that as a fraction of the fp32, bf16 and int8 (`torch._int_mm`) matmul
rates of the same rounds, the speedup (reference median / path median) and the fidelity: the lowest CC over the
batch between the path's map and the reference's fp32 map. Beside it, the model's own
sensitivity: the lowest CC between the fp32 maps of the batch and of the same batch with
+-half a grey level of noise added. An untrained model (the default stand-in) scores low there,
and then no fast path can show CC near 1 on it: pass a trained model with --model.

These are measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import torch

from bench.common import cc, cpu_summary, folder_photos, load_model, natural_images, synchronize
from hub.cli import print_error
from hub.config import parse_size
from hub.preprocess import images_to_tensor
from hub.publish import atomic_write_text
from hub.runtime import engine_precision, inference_engine, native_bf16, native_fp16, native_int8, pick_device

PATHS = ("reference", "default", "bf16", "fp16", "fp32", "int8", "compiled")
FORCED = ("bf16", "fp16", "fp32", "int8")  # the predict() engine in that precision, whatever "auto" picks here


def parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [parse_size(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,8") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1, not {text!r}")
    return values


def parse_paths(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise argparse.ArgumentTypeError(f"unknown paths {bad}; choose from {', '.join(PATHS)}")
    if "reference" not in paths:
        paths.insert(0, "reference")  # every ratio and fidelity figure is against it
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes("256x256,288x384,480x640"), help="HxW list")
    p.add_argument("--batch", type=parse_ints, default=[1, 8], help="batch sizes, e.g. 1,8")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--paths", type=parse_paths, default=["reference", "default"],
                   help="reference,default[,bf16,fp16,fp32,int8,compiled] (compiled: 20-40 s of compiling per shape "
                        "on a CPU; int8: CPU only, built in about a minute when the model has no model.int8.onnx)")  # fmt: skip
    p.add_argument("--model", default=None, help="trained model folder or Hub repo id (default: random-init stand-in)")
    p.add_argument("--repeat", type=int, default=None, help="timed rounds per shape (default 7 on CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per path before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--fp32-stages", type=lambda t: tuple(x for x in t.split(",") if x), default=(), metavar="STAGES",
                   help="stages kept in fp32 under bf16, e.g. stem,layer1,layer2 (default: none)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="write one record per (size, batch, path) here")
    p.add_argument("--options", action="store_true",
                   help="instead: the cost of each predict() option (centre prior, keep_aspect, flip TTA, blur, face prior) end to end, "
                        "on photos of the first --sizes entry, side by side against the model without them")  # fmt: skip
    p.add_argument("--photos", type=Path, default=None,
                   help="with --options: a folder of photos to time on (default: the NUS scenes, or scikit-image's photos); "
                        "the face detectors' cost depends on the faces in them, e.g. ../shared/data/eyecrowd/images")  # fmt: skip
    p.add_argument("--limit", type=int, default=8, help="with --options: how many photos (each round times every one)")
    return p


OPTIONS = {
    "none": {},
    "center_prior=8": {"center_prior": 8},
    "keep_aspect": {"keep_aspect": True},
    "flip_tta": {"flip_tta": True},
    "blur=0.02": {"blur": 0.02},
    # the face detectors on the original photo (hub.faces), each at the weight picked for it
    "face_prior=4 (frontal)": {"face_prior": 4.0, "face_detector": "frontal"},
    "face_prior=4 (frontal+profile)": {"face_prior": 4.0, "face_detector": "frontal+profile"},
    "face_prior=6 (mtcnn)": {"face_prior": 6.0, "face_detector": "mtcnn"},
}
DEFAULTS = {"blur": 0.02, "face_prior": 6.0, "face_detector": "mtcnn"}  # what training publishes (TrainConfig)


def run_options(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median ms per image of `predict()` (decode excluded: arrays in; resize, network, map back included)."""
    from dataclasses import replace

    from hub import SaliencyUNet
    from hub.preprocess import resize_image

    device = pick_device(args.device)
    repeat = args.repeat or 7
    base, what = load_model(args.model, device)
    plain = {"center_prior": 0, "keep_aspect": False, "flip_tta": False, "blur": 0.0, "face_prior": 0.0, "face_detector": "frontal"}
    variants = {**OPTIONS, "the defaults (blur, mtcnn faces)": DEFAULTS,
                "the defaults with the cascades": {**DEFAULTS, "face_prior": 4.0, "face_detector": "frontal+profile"},
                "the defaults + flip_tta": {**DEFAULTS, "flip_tta": True},
                "all": {**{k: v for o in OPTIONS.values() for k, v in o.items()}, **DEFAULTS}}
    if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5, or a build without it: the cascades cannot run
        print(f"OpenCV {cv2.__version__} has no cascade classifier: the rows of the cascade face detectors are left out")
        variants = {k: v for k, v in variants.items() if v.get("face_detector", "mtcnn") == "mtcnn"}
    trained = base.state_dict()
    models = {}
    for name, changes in variants.items():
        m = SaliencyUNet(replace(base.config, **{**plain, **changes})).to(device).eval()
        state = m.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                if key in trained and trained[key].shape == value.shape:
                    value.copy_(trained[key])
                elif key in trained:  # fuse1 with the prior's extra input channels: those start at zero
                    value.zero_()[:, : trained[key].shape[1]] = trained[key]
        models[name] = m
    size = args.sizes[0]
    images, source = folder_photos(args.photos, max(args.limit, *args.batch), "--photos")
    images = [resize_image(img, size) for img in images]
    print(f"torch {torch.__version__}; device {device}; CPU: {cpu_summary()}")
    print(f"model: {what}; config input_size {base.config.input_size}")
    print(f"inputs: {len(images)} photos from {source}, resized to {size[0]}x{size[1]}; predict() end to end, "
          f"the median over {repeat} rounds (each over every photo) after {args.warmup} warm-up\n")
    records = []
    for batch in args.batch:
        chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
        for m in models.values():
            for _ in range(args.warmup):
                m.predict(chunks[0], batch_size=batch)
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(repeat):
            for name, m in models.items():
                t = sum(timed(lambda m=m, c=c: m.predict(c, batch_size=batch), device)[0] for c in chunks)
                times[name].append(t / len(images) * 1000)
        ref = statistics.median(times["none"])
        print(f"{'option':>36} {'batch':>5} | {'ms/img med':>10} {'min':>7} {'max':>7} | {'x none':>6}")
        for name, ms in times.items():
            med = statistics.median(ms)
            records.append({"option": name, "size": f"{size[0]}x{size[1]}", "batch": batch, "ms_median": round(med, 3),
                            "ms_min": round(min(ms), 3), "ms_max": round(max(ms), 3), "ratio": round(med / ref, 3),
                            "device": str(device), "model": what, "photos": source})
            print(f"{name:>36} {batch:>5} | {med:>10.1f} {min(ms):>7.1f} {max(ms):>7.1f} | {med / ref:>5.2f}x")
    print(f"\nload average at the end: {cpu_summary().rsplit('load average ', 1)[1]}")
    return records


def matmul_fn(device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], Any], float]:
    """A square matmul big enough to reach the machine's GEMM throughput, and its FLOPs (int8: `torch._int_mm`)."""
    n = 8192 if device.type == "cuda" else 2048
    if dtype == torch.int8:
        a = torch.randint(-128, 128, (n, n), device=device, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, n), device=device, dtype=torch.int8)
        return (lambda: torch._int_mm(a, b)), 2.0 * n**3
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return (lambda: torch.mm(a, b)), 2.0 * n**3


def ensure_int8(model: torch.nn.Module, tmp: Path) -> str:
    """Make `model` runnable at precision int8: its own fresh model.int8.onnx, or one built here in `tmp`."""
    from hub.int8 import INT8_NAME, build_int8, set_source
    from hub.runtime import int8_status

    status = int8_status(model)
    if status.usable:
        return f"int8: the model's own {status.path}"
    photos, _ = natural_images(48)
    result = build_int8(model, photos[::3][:16] + photos[1::3][:16], tmp / INT8_NAME, check=photos[2::3][:16])
    set_source(model, lambda: result.path)
    model.__dict__.pop("_int8_status", None)
    return (f"int8: built here in {result.seconds:.0f} s ({status.reason}); CC against fp32 on 16 other photos: "
            f"min {result.fidelity_min_cc:.4f}, median {result.fidelity_median_cc:.4f}")


def count_flops(model: torch.nn.Module, size: tuple[int, int], device: torch.device) -> float:
    """FLOPs of one forward pass on one image, counted by torch (convolutions, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 3, *size, device=device))
    return float(counter.get_total_flops())


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    repeat = args.repeat or (30 if device.type == "cuda" else 7)
    model, what = load_model(args.model, device)
    int8_note = None
    if "int8" in args.paths:
        import tempfile

        int8_dir = tempfile.TemporaryDirectory(prefix="bench-int8-")
        int8_note = ensure_int8(model, Path(int8_dir.name))
    plan = engine_precision(model, "auto")
    if plan != "fp32" and args.fp32_stages:
        plan += f", {'+'.join(args.fp32_stages)} in fp32"
    print(f"torch {torch.__version__}; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))  # fmt: skip
    print(f"CPU: {cpu_summary()}")
    print(f"model: {what}")
    print(f"default path precision: {plan} (native bf16 on {device.type}: {native_bf16(device)}, "
          f"native fp16: {native_fp16(device)}, int8 dot products: {native_int8(device)})")
    if int8_note:
        print(int8_note)
    images, source = natural_images(max(args.batch))
    print(f"inputs: {source}; {repeat} timed rounds per shape after {args.warmup} warm-up calls per path\n")

    mm = {name: matmul_fn(device, dtype) for name, dtype in
          (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8))}  # fmt: skip
    for fn, _ in mm.values():
        fn()
    engines: dict[str, torch.nn.Module] = {}
    def stages(precision: str) -> tuple[str, ...]:  # the int8 graph has no stages to keep in fp32
        return () if engine_precision(model, precision) == "int8" else args.fp32_stages

    if "default" in args.paths:
        engines["default"] = inference_engine(model, "auto", fp32_stages=stages("auto"))
    for name in FORCED:
        if name in args.paths:
            engines[name] = inference_engine(model, name, fp32_stages=stages(name))
    records: list[dict[str, Any]] = []
    header = (f"{'size':>8} {'batch':>5} {'path':>9} | {'ms/img med':>10} {'min':>7} {'max':>7} | {'img/s':>7} "
              f"{'GFLOP/s':>7} {'%mm32':>6} {'%mm16':>6} {'%mm8':>6} | {'speedup':>7} {'CC':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        flops = count_flops(model, size, device)
        for batch in args.batch:
            x = images_to_tensor(images[:batch], size).to(device)  # channels_last, as predict() feeds it
            x_ref = x.contiguous()  # NCHW, as the reference notebook fed it
            fns: dict[str, Callable[[], Any]] = {}
            compile_s = None
            for path in args.paths:
                if path == "reference":
                    fns[path] = lambda: _no_grad(model, x_ref)
                elif path in engines:
                    fns[path] = lambda e=engines[path]: _inference(e, x)
                else:
                    engine = inference_engine(model, "auto", compile=True, fp32_stages=args.fp32_stages)
                    compile_s, _ = timed(lambda e=engine: _inference(e, x), device)
                    fns[path] = lambda e=engine: _inference(e, x)
            outputs = {}
            for path, fn in fns.items():
                for _ in range(args.warmup):
                    outputs[path] = fn()
            # Apart from the paths' times: the matmuls are named fp32/bf16/int8 like three of the paths.
            times: dict[str, list[float]] = {k: [] for k in fns}
            mm_times: dict[str, list[float]] = {k: [] for k in mm}
            for _ in range(repeat):
                for path, fn in fns.items():
                    t, outputs[path] = timed(fn, device)
                    times[path].append(t / batch)
                for name, (fn, _) in mm.items():
                    mm_times[name].append(timed(fn, device)[0])
            mm_gflops = {name: mm[name][1] / statistics.median(mm_times[name]) / 1e9 for name in mm}
            ref_ms = statistics.median(times["reference"]) * 1000
            ref_out = outputs["reference"].float()
            noisy = (x_ref + (torch.rand_like(x_ref) - 0.5) / 255).clamp_(0, 1)
            sensitivity = min(cc(o, r) for o, r in zip(_no_grad(model, noisy).float(), ref_out))
            for path in fns:
                ms = [t * 1000 for t in times[path]]
                med = statistics.median(ms)
                gflops = flops / (med / 1000) / 1e9
                out = outputs[path].float()
                fidelity = min(cc(out[i], ref_out[i]) for i in range(batch))
                rec = {
                    "size": f"{size[0]}x{size[1]}",
                    "batch": batch,
                    "path": path,
                    "device": str(device),
                    "ms_median": round(med, 3),
                    "ms_min": round(min(ms), 3),
                    "ms_max": round(max(ms), 3),
                    "img_per_s": round(1000 / med, 3),
                    "gflop_per_image": round(flops / 1e9, 3),
                    "gflops_per_s": round(gflops, 2),
                    "matmul_fp32_gflops_per_s": round(mm_gflops["fp32"], 1),
                    "matmul_bf16_gflops_per_s": round(mm_gflops["bf16"], 1),
                    "matmul_int8_gops_per_s": round(mm_gflops["int8"], 1),
                    "frac_matmul_int8": round(gflops / mm_gflops["int8"], 4),
                    "frac_matmul_fp32": round(gflops / mm_gflops["fp32"], 4),
                    "frac_matmul_bf16": round(gflops / mm_gflops["bf16"], 4),
                    "fidelity_cc": round(fidelity, 6),
                    "sensitivity_cc": round(sensitivity, 6),
                    "speedup": round(ref_ms / med, 3),
                    "precision": "fp32" if path == "reference" else path if path in FORCED else plan,
                    "rounds": repeat,
                    "model": what,
                }
                if path == "compiled":
                    rec["compile_s"] = round(compile_s, 2)
                records.append(rec)
                print(f"{rec['size']:>8} {batch:>5} {path:>9} | {med:>10.1f} {min(ms):>7.1f} {max(ms):>7.1f} | "
                      f"{rec['img_per_s']:>7.2f} {gflops:>7.1f} {100 * rec['frac_matmul_fp32']:>5.0f}% "
                      f"{100 * rec['frac_matmul_bf16']:>5.0f}% {100 * rec['frac_matmul_int8']:>5.0f}% | "
                      f"{rec['speedup']:>6.2f}x {fidelity:>8.5f}")  # fmt: skip
            print(f"{'':>8} {'':>5} {'matmul':>9} | fp32 {mm_gflops['fp32']:.0f} GFLOP/s, bf16 {mm_gflops['bf16']:.0f} "
                  f"GFLOP/s, int8 {mm_gflops['int8']:.0f} GOP/s (same rounds); {flops / 1e9:.1f} GFLOP per image; model sensitivity CC {sensitivity:.5f}"
                  + (f"; compile took {compile_s:.1f} s" if compile_s is not None else ""))  # fmt: skip
    print(f"\nload average at the end: {cpu_summary().rsplit('load average ', 1)[1]}")
    return records


def _no_grad(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _inference(engine: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return engine(x)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error(f"--limit {args.limit}: time at least 1 photo")
    try:
        pick_device(args.device)
    except RuntimeError as err:  # --device cuda on a machine without a GPU
        print_error(err)
        return 2
    records = run_options(args) if args.options else run(args)
    if args.json:
        atomic_write_text(args.json, json.dumps(records, indent=1))
        print(f"wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
