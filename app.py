"""Drag-and-drop saliency demo (also the Hugging Face Space entry point).

    python app.py --model me/saliency-unet            # or a folder written by save_pretrained
    MODEL_ID=me/saliency-unet python app.py            # how a Space is configured

Options: --revision REV (MODEL_REVISION), --device auto|cpu|cuda (DEVICE), --precision auto|bf16|fp16|fp32|int8
(PRECISION), --host H, --port P, --share.
The UI lives in space/; this file only reads the settings and launches it.
"""

from __future__ import annotations

import contextlib

with contextlib.suppress(ImportError):
    # ZeroGPU Spaces: `spaces` must be imported before torch initialises CUDA.
    import spaces  # noqa: F401

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description="Serve the saliency demo in a browser.")
    parser.add_argument(
        "--model",
        default=os.environ.get("MODEL_ID"),
        help="folder written by save_pretrained, or a Hub model repo id (default: $MODEL_ID)",
    )
    parser.add_argument(
        "--revision",
        default=os.environ.get("MODEL_REVISION") or None,
        help="Hub branch, tag or commit (default: $MODEL_REVISION)",
    )
    parser.add_argument(
        "--device", default=os.environ.get("DEVICE", "auto"), choices=("auto", "cpu", "cuda"), help="(default: $DEVICE or auto)"
    )
    parser.add_argument(
        "--precision", default=os.environ.get("PRECISION", "auto"), choices=("auto", "bf16", "fp16", "fp32", "int8"),
        help="as predict(precision=...): auto is bf16/fp16 where native, int8 on other CPUs when the model has a "
             "faithful model.int8.onnx, else fp32 (default: $PRECISION or auto)",
    )  # fmt: skip
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for a LAN)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also ask gradio for a temporary public share link")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("no model given; pass --model DIR_OR_REPO_ID or set MODEL_ID (e.g. MODEL_ID=me/saliency-unet).")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own health checks, one line each

    from space.serving import ModelSpec, ModelStore

    try:
        store = ModelStore(ModelSpec(args.model, args.revision, args.device, args.precision))
    except RuntimeError as err:  # e.g. --device cuda without a GPU
        parser.error(str(err))
    store.warm_up()
    from space.ui import build_demo, launch  # gradio: imported while the weights load

    demo = build_demo(store)
    launch(demo, host=args.host, port=args.port, share=args.share)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
