"""Cross-dataset quality: train on one collection, score on another (leave-one-dataset-out).

    python -m bench.transfer --name prior --eval-data ../shared/data/eyecrowd -- \
        --data ../shared/data/nus_scene --out runs/ablation/prior --backbone-weights none ... --center-prior 8
    python -m bench.transfer --eval-data ../shared/data/eyecrowd --table runs/ablation   # the table so far

Everything after `--` goes to `python -m train` as it is (skipped when OUT already holds a
trained model, so a table can be rebuilt or extended). `--posthoc flip_tta,blur=auto` scores a
copy of the trained model (OUT+NAME) with inference-time options switched on (face_prior=2 too): they change
nothing in training, so one trained model gives their rows (blur=auto calibrates on OUT's own
validation split, as `python -m train --blur auto` does; face_detector=mtcnn, frontal or frontal+profile). The trained model is then scored with
`train.evaluate` on every image of --eval-data, beside the centre prior and the leave-one-out
mean map of that collection (a baseline that knows where its observers look on average and
nothing about the picture). Writes OUT/transfer-<eval name>.json and prints a Markdown row;
--table prints the rows of every run under a folder. Figures, never assertions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hub import SaliencyUNet
from hub.config import FACE_DETECTORS
from hub.runtime import pick_device
from hub.publish import atomic_write_text
from train.evaluate import evaluate_model, select_samples

COLUMNS = ("cc", "kld", "nss", "sim", "auc_judd", "sauc")


def row(name: str, metrics: dict[str, float]) -> str:
    return f"| {name} | " + " | ".join(f"{metrics[k]:.3f}" if k in metrics else "" for k in COLUMNS) + " |"


def header() -> str:
    return "| run | " + " | ".join("KLD" if k == "kld" else k.replace("_", "-").upper() for k in COLUMNS) + " |\n" + \
        "|---" * (len(COLUMNS) + 1) + "|"


def evaluate_transfer(model_dir: Path, eval_data: Path, device: str = "auto") -> dict:
    """Scores of the model on every image of eval_data; the baselines are scored once per folder of runs.

    They do not depend on the model, and they cost twice the model's own scoring, so they are
    kept in <runs folder>/baselines-<eval name>.json and reused by the other runs there.
    """
    samples, _ = select_samples(eval_data, None, None)
    cache = model_dir.parent / f"baselines-{eval_data.resolve().name}.json"
    cached = json.loads(cache.read_text()) if cache.is_file() else None
    if cached is not None and cached.get("n_images") != len(samples):
        cached = None
    model = SaliencyUNet.from_pretrained(model_dir).to(pick_device(device))
    started = time.perf_counter()
    report = evaluate_model(model, samples, None, baselines=() if cached else ("center", "mean"), progress=False)
    report.pop("images")
    report["seconds"] = time.perf_counter() - started
    report["eval_data"] = eval_data.resolve().name
    if cached:
        report["baselines"] = cached["baselines"]
    else:
        atomic_write_text(cache, json.dumps({"n_images": len(samples), "baselines": report["baselines"]}, indent=1))
    return report


def posthoc_copy(out: Path, name: str, options: str, select_metric: str = "kld") -> Path:
    """A copy of the trained run OUT as OUT/../<name> with flip_tta, blur (a value or auto) and/or face_prior changed."""
    import shutil
    from dataclasses import replace

    import torch

    from train.data import SaliencyDataset, load_splits
    from train.evaluate import Scorer
    from train.loop import TrainConfig, calibrate_blur, export_model, val_faces

    changes: dict = {}
    for part in filter(None, options.split(",")):
        key, _, value = part.partition("=")
        if key == "flip_tta":
            changes["flip_tta"] = value.lower() not in ("0", "false", "no")
        elif key == "blur":
            changes["blur"] = value or "auto"
        elif key == "face_prior":
            try:
                changes["face_prior"] = float(value)
            except ValueError:
                raise SystemExit(f"--posthoc {options!r}: face_prior takes a weight, e.g. face_prior=2") from None
        elif key == "face_detector":
            if value not in FACE_DETECTORS:
                raise SystemExit(f"--posthoc {options!r}: face_detector is one of {', '.join(FACE_DETECTORS)}")
            changes["face_detector"] = value
        else:
            raise SystemExit(f"--posthoc {options!r}: use flip_tta, blur=VALUE|auto, face_prior=WEIGHT and face_detector=NAME")
    dest = out.parent / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("checkpoints", "runs", "transfer-*"))
    saved = json.loads((out / "train_config.json").read_text())
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    cfg.out, cfg.select_metric = str(dest), select_metric
    cfg.face_prior = changes.get("face_prior", cfg.face_prior)
    best = json.loads((out / "metrics.json").read_text())["best"]
    model = SaliencyUNet.from_pretrained(out)
    cfg.face_detector = changes.get("face_detector", model.config.face_detector)
    blur = changes.get("blur", model.config.blur)
    switched = SaliencyUNet(replace(model.config, flip_tta=changes.get("flip_tta", model.config.flip_tta),
                                    blur=0.0 if blur == "auto" else float(blur),
                                    face_prior=changes.get("face_prior", model.config.face_prior),
                                    face_detector=cfg.face_detector))
    switched.load_state_dict(model.state_dict())
    splits = load_splits(cfg.data_dirs, dest)
    export_model(switched, cfg, dest, best, len(splits["train"]))
    if blur == "auto":
        val_set = SaliencyDataset(splits["val"], cfg.input_size, keep_aspect=switched.config.keep_aspect, targets=False)
        scorer = Scorer(splits["val"], train_samples=splits["train"], seed=cfg.seed)
        if switched.config.face_prior > 0:
            scorer.faces = val_faces(splits["val"], list(range(len(splits["val"]))), cfg.workers, cfg.face_detector)
        best = calibrate_blur(dest, val_set, scorer, torch.device("cpu"), cfg, best, len(splits["train"]))
        print(f"blur calibrated on validation ({best['blur_metric']}): {best['blur']}")
    return dest


def table(folder: Path, eval_name: str) -> str:
    lines, baselines = [header()], None
    for path in sorted(folder.glob(f"*/transfer-{eval_name}.json")):
        report = json.loads(path.read_text())
        lines.append(row(path.parent.name, report["metrics"]))
        baselines = report["baselines"]
    for name, label in (("mean", "mean map (leave-one-out)"), ("center", "centre prior")):
        if baselines and name in baselines:
            lines.append(row(label, baselines[name]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval-data", type=Path, required=True, help="the other collection (images/, maps/, fixations/)")
    p.add_argument("--name", default=None, help="row label (default: the --out folder's name)")
    p.add_argument("--table", type=Path, default=None, help="print the rows of every run under this folder and stop")
    p.add_argument("--device", default="auto")
    p.add_argument("--posthoc", default=None, help="inference options to change in a copy: flip_tta, blur=VALUE|auto, face_prior=WEIGHT, face_detector=NAME")
    args = p.parse_args(own)
    eval_name = args.eval_data.resolve().name
    if args.table is not None:
        print(table(args.table, eval_name))
        return 0
    if "--out" not in train_args:
        p.error("pass the training flags after --, including --data and --out")
    out = Path(train_args[train_args.index("--out") + 1])
    if not (out / "model.safetensors").is_file():
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "train", *train_args], check=False)
        if done.returncode != 0:
            return done.returncode
        print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)
    if args.posthoc:
        out = posthoc_copy(out, args.name or f"{out.name}+{args.posthoc.replace(',', '+')}", args.posthoc)
    report = evaluate_transfer(out, args.eval_data, args.device)
    report["train_args"] = train_args
    atomic_write_text(out / f"transfer-{eval_name}.json", json.dumps(report, indent=1))
    print(header())
    print(row(args.name or out.name, report["metrics"]))
    for name in ("mean", "center"):
        if name in report["baselines"]:
            print(row(f"{name} baseline", report["baselines"][name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
