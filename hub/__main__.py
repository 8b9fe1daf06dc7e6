"""`python -m hub push DIR REPO_ID ...`: publish an exported model folder.
`python -m hub space SPACE_ID --model REPO_ID ...`: deploy the demo as a Gradio Space.
`python -m hub export-onnx DIR [--out FILE] ...`: write DIR/model.onnx, checked against PyTorch.
`python -m hub export-int8 DIR --calibration PHOTOS...`: write DIR/model.int8.onnx for int8 CPU inference.
`python -m hub predict INPUT... --model DIR_OR_REPO_ID --out DIR`: maps for files, folders and globs."""

from __future__ import annotations

import argparse
import sys

from huggingface_hub import SpaceHardware

from hub.cli import print_error, setup_logging
from hub.config import parse_size
from hub.preprocess import COLORMAPS
from hub.publish import PublishError, push, push_space


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push", help="upload an exported model folder to a Hub model repo")
    p.add_argument("directory", help="folder written by save_pretrained or `python -m train --out`")
    p.add_argument("repo_id", help="NAMESPACE/NAME of the model repo (created if missing)")
    p.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--commit-message", default=None)
    s = sub.add_parser("space", help="deploy the demo (app.py, space/, hub/) as a Gradio Space serving a model")
    s.add_argument("space_id", help="NAMESPACE/NAME of the Space (created if missing)")
    s.add_argument("--model", required=True, help="Hub model repo the Space serves (set as its MODEL_ID variable)")
    s.add_argument("--model-revision", default=None, help="model branch, tag or commit (MODEL_REVISION variable)")
    s.add_argument("--private", action="store_true", help="create the Space as private")
    s.add_argument("--hardware", default=None, choices=[h.value for h in SpaceHardware], metavar="FLAVOR",
                   help="request this hardware, e.g. cpu-basic, t4-small, zero-a10g (default: keep the Space's)")  # fmt: skip
    s.add_argument("--commit-message", default=None)
    o = sub.add_parser("export-onnx", help="write an ONNX model for ONNX Runtime, checked against PyTorch")
    o.add_argument("directory", help="folder written by save_pretrained or `python -m train --out`")
    o.add_argument("--out", default=None, help="output file (default: DIRECTORY/model.onnx)")
    o.add_argument("--size", default=None, type=_size, help="input HxW (default: the model's input_size)")
    o.add_argument("--opset", type=int, default=18, help="ONNX opset version (default 18)")
    o.add_argument("--dynamic", action="store_true", help="free batch, height and width (multiples of 32)")
    q = sub.add_parser("export-int8", help="write DIR/model.int8.onnx: the model quantized to int8 for CPUs, "
                                           "calibrated on real photos and checked against fp32")  # fmt: skip
    q.add_argument("directory", help="folder written by save_pretrained or `python -m train --out`")
    q.add_argument("--calibration", nargs="+", required=True, metavar="PHOTOS",
                   help="image files, folders or globs of real photos (e.g. the training images); a seeded "
                        "draw of them calibrates, others check the fidelity")  # fmt: skip
    q.add_argument("--limit", type=int, default=64, help="photos that calibrate (default 64)")
    q.add_argument("--check", type=int, default=64,
                   help="other photos on which the fidelity (CC against fp32) is measured (default 64)")  # fmt: skip
    q.add_argument("--out", default=None, help="output file (default: DIRECTORY/model.int8.onnx)")
    b = sub.add_parser("predict", help="saliency maps for image files, folders and globs (torchrun splits them across processes)",
                       description=batch_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    b.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns (quote them: 'photos/*.jpg')")
    b.add_argument("--model", required=True, help="folder written by save_pretrained / `python -m train`, or a Hub repo id")
    b.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    b.add_argument("--out", required=True, help="output folder (created); maps keep the inputs' relative paths")
    b.add_argument("--recursive", action="store_true", help="include images in subfolders of INPUT folders (and ** in globs)")
    b.add_argument("--format", choices=("png16", "npy"), default="png16", help="16-bit greyscale PNG (default) or float32 .npy")
    b.add_argument("--overlay", action="store_true", help="also write NAME.overlay.jpg: the map as a heatmap over the image")
    b.add_argument("--colormap", default="jet", choices=sorted(COLORMAPS), help="colormap of the overlays (default jet)")
    b.add_argument("--alpha", type=float, default=0.6, help="heatmap opacity of the overlays in [0, 1] (default 0.6)")
    b.add_argument("--skip-existing", action="store_true", help="skip images whose outputs exist: continue an interrupted run")
    b.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    b.add_argument("--workers", type=int, default=2, help="threads decoding images ahead of the model (default 2)")
    b.add_argument("--device", default="auto", help="auto (CUDA when present; under torchrun cuda:LOCAL_RANK), cpu or cuda")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def batch_doc() -> str:
    from hub import batch

    return batch.__doc__ or ""


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    setup_logging("hub")
    args = build_parser().parse_args(argv)
    if args.command == "predict":
        from hub.batch import main as predict_main

        return predict_main(args)
    try:
        if args.command == "push":
            url = push(
                args.directory,
                args.repo_id,
                revision=args.revision,
                private=True if args.private else None,
                commit_message=args.commit_message,
            )
            print(url)
        elif args.command == "space":
            url = push_space(
                args.space_id,
                args.model,
                model_revision=args.model_revision,
                private=True if args.private else None,
                hardware=args.hardware,
                commit_message=args.commit_message,
            )
            print(url)  # the Space's page: the link to share
        elif args.command == "export-onnx":
            from hub.onnx_export import OnnxExportError, export_onnx

            try:
                result = export_onnx(args.directory, args.out, size=args.size, opset=args.opset, dynamic=args.dynamic)
            except (OnnxExportError, FileNotFoundError, ValueError) as err:
                print_error(err)
                return 1
            print(f"{result.path}: checked with onnxruntime on inputs {result.checked_shapes}; "
                  f"max abs difference vs PyTorch {result.max_abs_diff:.2e}")  # fmt: skip
        elif args.command == "export-int8":
            return export_int8_main(args)
    except PublishError as err:
        print_error(err)
        return 1
    return 0


def export_int8_main(args: argparse.Namespace) -> int:
    import random
    from pathlib import Path

    from hub import SaliencyUNet
    from hub.batch import InputError, collect_inputs
    from hub.int8 import INT8_NAME, MIN_FIDELITY, Int8Error, build_int8

    try:
        if args.limit < 1 or args.check < 0:
            raise ValueError(f"--limit must be at least 1 and --check at least 0, not {args.limit} and {args.check}.")
        # One input at a time: two folders may hold files of the same name (no outputs are named after them here).
        photos = sorted({job.source for text in args.calibration for job in collect_inputs([text], recursive=True)})
        random.Random(0).shuffle(photos)  # a varied draw, the same every time
        calibration, check = photos[: args.limit], photos[args.limit : args.limit + args.check]
        model = SaliencyUNet.from_pretrained(args.directory)
        out = Path(args.out) if args.out else Path(args.directory) / INT8_NAME
        result = build_int8(model, calibration, out, check=check)
    except (InputError, Int8Error, FileNotFoundError, ValueError) as err:
        print_error(err)
        return 1
    verdict = ("faithful: precision auto uses it on CPUs without native bf16" if result.fidelity_min_cc >= MIN_FIDELITY
               else f"below CC {MIN_FIDELITY}: only precision='int8' uses it, auto keeps fp32")  # fmt: skip
    print(f"{result.path}: built in {result.seconds:.0f} s from {result.calibration_images} calibration photos; "
          f"CC against fp32 on {result.check_images} other photos: min {result.fidelity_min_cc:.4f}, "
          f"median {result.fidelity_median_cc:.4f} ({verdict})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
