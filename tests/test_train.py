"""Fine-tuning: data checks, augmentation, losses, the loop, resume, DDP, outputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torch.utils.data import DataLoader

from hub import SaliencyConfig, SaliencyUNet
from train.data import DataError, SaliencyDataset, Sample, SizeBatchSampler, find_samples, load_splits, read_fixations, read_map, scan
from train.evaluate import Scorer
from train.evaluate import main as evaluate_main
from train.losses import SaliencyLoss, parse_loss
from train.loop import TrainConfig, evaluate, run, val_faces

ROOT = Path(__file__).resolve().parents[1]
NUS = ROOT.parent / "shared" / "data" / "nus_scene"
needs_nus = pytest.mark.skipif(not NUS.is_dir(), reason="real eye-tracking data (shared/data/nus_scene) is absent")


def blob_sample(folder: Path, sample_id: str, h: int = 48, w: int = 64, points=((10, 12), (40, 30), (55, 5))) -> None:
    """An image, a density map and a fixation map with fixations at `points` (x, y)."""
    for sub in ("images", "maps", "fixations"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(sample_id)) % 2**32)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / "images" / f"{sample_id}.jpg")
    yy, xx = np.mgrid[0:h, 0:w]
    dens = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2)) for x, y in points)
    Image.fromarray((dens / dens.max() * 255).astype(np.uint8)).save(folder / "maps" / f"{sample_id}.png")
    fix = np.zeros((h, w), np.uint8)
    for x, y in points:
        fix[y, x] = 255
    Image.fromarray(fix).save(folder / "fixations" / f"{sample_id}.png")


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """Eight real nus_scene images when present (else synthetic), in the plain layout."""
    data = tmp_path / "data"
    if NUS.is_dir():
        for sub, ext in (("images", "jpg"), ("maps", "png"), ("fixations", "png")):
            (data / sub).mkdir(parents=True)
            for i in range(1, 9):
                shutil.copy(NUS / sub / f"{i:03d}.{ext}", data / sub / f"{i:03d}.{ext}")
    else:
        for i in range(1, 9):
            blob_sample(data, f"{i:03d}")
    return data


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(data=data if isinstance(data, list) else str(data), out=str(out), epochs=2, batch_size=2, size="64x64", backbone_weights="none", face_prior=0.0,
                workers=0, val_fraction=0.25, lr=1e-3, warmup_steps=1, max_steps_per_epoch=2, seed=3,
                precision="fp32")
    return TrainConfig(**{**base, **overrides})


# -- data -----------------------------------------------------------------------------------------
def test_scan_reports_every_bad_item_in_one_message(tmp_path):
    data = tmp_path / "data"
    for i in range(6):
        blob_sample(data, f"s{i}")
    (data / "maps" / "s1.png").unlink()  # missing map
    raw = (data / "images" / "s2.jpg").read_bytes()
    (data / "images" / "s2.jpg").write_bytes(raw[: len(raw) // 3])  # truncated image
    Image.new("L", (10, 10)).save(data / "maps" / "s3.png")  # map of another size
    Image.new("L", (64, 48)).save(data / "fixations" / "s4.png")  # empty fixation map
    samples = find_samples(data)
    with pytest.raises(DataError) as info:
        scan(samples)
    message = str(info.value)
    assert message.startswith("4 of 6 samples are unusable")
    assert "s1: missing map" in message
    assert "s2.jpg: unreadable image" in message
    assert "s3.png: map is 10x10 but the image is 64x48" in message
    assert "s4: fixation map is empty" in message
    assert "--skip-bad" in message
    kept = scan(samples, skip_bad=True)
    assert [s.id for s in kept] == ["s0", "s5"]


def test_seeded_split_is_written_and_reused(tmp_path):
    data = tmp_path / "data"
    for i in range(10):
        blob_sample(data, f"{i:02d}")
    first = load_splits(data, tmp_path / "out", val_fraction=0.2, seed=1)
    assert len(first["val"]) == 2 and len(first["train"]) == 8
    from train.data import write_split

    write_split(first, data, tmp_path / "out")
    again = load_splits(data, tmp_path / "out", val_fraction=0.5, seed=99)  # split.json wins
    assert [s.id for s in again["val"]] == [s.id for s in first["val"]]


def test_salicon_mat_layout(tmp_path):
    """The SALICON release: images/{train,val}, maps/{train,val}, fixations/{train,val}/*.mat."""
    h, w = 48, 64
    for split in ("train", "val"):
        for sub in ("images", "maps", "fixations"):
            (tmp_path / sub / split).mkdir(parents=True)
        name = f"COCO_{split}2014_000000000001"
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "images" / split / f"{name}.jpg")
        Image.fromarray(np.full((h, w), 9, np.uint8)).save(tmp_path / "maps" / split / f"{name}.png")
        gaze = np.zeros((2,), dtype=[("location", "O"), ("timestamp", "O"), ("fixations", "O")])
        gaze[0] = (np.array([[1, 1]]), np.array([[1]]), np.array([[1, 1], [64, 48]]))  # 1-based [x, y]
        gaze[1] = (np.array([[1, 1]]), np.array([[1]]), np.array([[10, 20]]))
        savemat(tmp_path / "fixations" / split / f"{name}.mat",
                {"image": name, "resolution": np.array([[h, w]]), "gaze": gaze.reshape(1, 2)})
    splits = load_splits(tmp_path, tmp_path / "out")
    assert [s.id for s in splits["val"]] == ["COCO_val2014_000000000001"]
    fix = read_fixations(splits["train"][0], (h, w))
    assert sorted(zip(*np.nonzero(fix))) == [(0, 0), (19, 9), (47, 63)]  # (row, col), 0-based
    assert scan(splits["train"]) == splits["train"]


def test_augmentation_keeps_fixations_binary_and_on_the_density(tmp_path):
    points = ((10, 12), (40, 30), (55, 5), (30, 40))
    blob_sample(tmp_path, "a", points=points)
    sample = find_samples(tmp_path)[0]
    plain = SaliencyDataset([sample], (48, 64))
    _, _, fix, _ = plain[0]
    assert sorted(zip(*np.nonzero(fix[0].numpy()))) == sorted((y, x) for x, y in points)  # exact, no smearing
    ds = SaliencyDataset([sample], (48, 64), augment=True, seed=0)
    for epoch in range(12):
        ds.set_epoch(epoch)
        _, gt, fix, _ = ds[0]
        values = set(np.unique(fix.numpy()).tolist())
        assert values <= {0.0, 1.0}
        n = int(fix.sum())
        assert 1 <= n <= len(points)
        # Every surviving fixation sits on its density blob: far above the map's mean.
        assert float(gt[fix > 0].min()) > 3 * float(gt.mean())


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    blob_sample(tmp_path, "a")
    sample = find_samples(tmp_path)[0]
    a = SaliencyDataset([sample], (48, 64), augment=True, seed=5)
    b = SaliencyDataset([sample], (48, 64), augment=True, seed=5)
    a.set_epoch(2), b.set_epoch(2)
    assert all(torch.equal(x, y) for x, y in zip(a[0][:3], b[0][:3]))
    b.set_epoch(3)
    assert not torch.equal(a[0][0], b[0][0])


# -- losses ------------------------------------------------------------------------------------------
def test_loss_spec():
    assert parse_loss("kld=1,cc=0.5") == {"kld": 1.0, "cc": 0.5}
    assert parse_loss("mse") == {"mse": 1.0}
    with pytest.raises(ValueError, match="unknown loss term 'auc'"):
        parse_loss("kld=1,auc=2")
    with pytest.raises(ValueError, match="not a number"):
        parse_loss("kld=x")


def test_loss_is_zero_ish_for_a_perfect_prediction_and_skips_samples_without_fixations():
    gt = torch.rand(2, 1, 16, 16)
    gt = gt / gt.flatten(1).sum(1).view(-1, 1, 1, 1)
    fix = torch.zeros(2, 1, 16, 16)
    fix[0, 0, 3, 4] = 1  # sample 1 lost its fixations in the crop
    loss, parts = SaliencyLoss("kld=1,cc=1,nss=0.1")(gt / gt.max(), gt, fix)
    assert parts["kld"] == pytest.approx(0.0, abs=1e-5) and parts["cc"] == pytest.approx(0.0, abs=1e-5)
    assert "nss" in parts and torch.isfinite(loss)


@needs_nus
def test_loss_falls_on_real_images():
    samples = find_samples(NUS)[:4]
    ds = SaliencyDataset(samples, (64, 64))
    batch = [torch.stack(t) for t in zip(*[ds[i][:3] for i in range(4)])]
    torch.manual_seed(0)
    model = SaliencyUNet(SaliencyConfig(input_size=(64, 64))).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = SaliencyLoss()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss, _ = loss_fn(model(batch[0]), batch[1], batch[2])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


# -- the loop ------------------------------------------------------------------------------------------
def test_run_writes_a_loadable_folder_that_evaluate_reads(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    result = run(tiny_config(tiny_data, out))
    assert len(result["history"]) == 2
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "metrics.json", "metrics.csv",
            "train_config.json", "split.json", "checkpoints"} <= names
    config = json.loads((out / "train_config.json").read_text())
    assert config["size"] == "64x64" and config["model"]["input_size"] == [64, 64]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best"]["metric"] == "kld"  # the default: the pick that transfers better
    # Epochs are validated with the device metrics; the published best model with every metric.
    assert set(metrics["epochs"][0]["val"]["metrics"]) == {"cc", "kld", "nss", "sim"}
    assert set(metrics["best"]["val"]["metrics"]) == {"cc", "kld", "nss", "sim", "auc_judd", "auc_borji", "sauc", "info_gain"}
    card = (out / "README.md").read_text()
    assert "model-index" in card and "backbone_init" in card
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        assert list((out / "runs").glob("events.out.tfevents.*")), "no TensorBoard events were written"
    model = SaliencyUNet.from_pretrained(out)
    assert model.config.input_size == (64, 64)
    report = tmp_path / "report.json"
    assert evaluate_main(["--model", str(out), "--data", str(tiny_data), "--split", "val", "--out", str(report),
                          "--save-maps", str(tmp_path / "maps"), "--precision", "fp32"]) == 0
    data = json.loads(report.read_text())
    val_ids = json.loads((out / "split.json").read_text())["val"]
    assert [r["id"] for r in data["images"]] == val_ids
    assert set(data["baselines"]) == {"center", "mean"}
    saved = Image.open(tmp_path / "maps" / f"{val_ids[0]}.png")
    assert saved.mode.startswith("I;16") and saved.size == Image.open(tiny_data / "images" / f"{val_ids[0]}.jpg").size
    # Validation in training (fp32 on CPU) and the evaluate CLI share the preprocessing and scoring path.
    best = metrics["best"]["val"]["metrics"]
    assert data["metrics"]["cc"] == pytest.approx(best["cc"], abs=2e-3)


def test_repeated_runs_give_the_same_losses(tiny_data, tmp_path):
    a = run(tiny_config(tiny_data, tmp_path / "a", epochs=1))
    b = run(tiny_config(tiny_data, tmp_path / "b", epochs=1))
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]


def test_resume_matches_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    full = run(tiny_config(tiny_data, tmp_path / "full", epochs=3))
    import train.loop

    real = train.loop.train_one_epoch

    def crash_in_epoch_2(*args, **kwargs):
        if args[7] == 2:  # the epoch argument
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train.loop, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tiny_data, tmp_path / "part", epochs=3))
    monkeypatch.setattr(train.loop, "train_one_epoch", real)
    # A changed model flag is named; a checkpoint from before face_detector existed still resumes.
    with pytest.raises(DataError, match=r"another model config \(face_prior\); use the same"):
        run(tiny_config(tiny_data, tmp_path / "part", epochs=3, resume=True, face_prior=2.0))
    path = tmp_path / "part" / "checkpoints" / "last.pt"
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["config"]["model"]["face_detector"]
    torch.save(checkpoint, path)
    resumed = run(tiny_config(tiny_data, tmp_path / "part", epochs=3, resume=True))
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    assert not list(path.parent.glob(".*.tmp"))  # the checkpoint's one temp name, renamed away
    a = SaliencyUNet.from_pretrained(tmp_path / "full").state_dict()
    b = SaliencyUNet.from_pretrained(tmp_path / "part").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "train", *args]


def cli_args(data: Path, out: Path, epochs: int) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--epochs", str(epochs), "--batch-size", "2", "--size", "64x64",
            "--backbone-weights", "none", "--workers", "0", "--val-fraction", "0.25", "--lr", "1e-3",
            "--warmup-steps", "1", "--seed", "3", "--precision", "fp32"]


def test_resume_after_kill_9_mid_epoch(tiny_data, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli(*cli_args(tiny_data, out, 3)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), "no checkpoint was written"
    time.sleep(0.5)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "metrics.json").read_text())["epochs"][-1]["epoch"] < 3
    resumed = subprocess.run(cli(*cli_args(tiny_data, out, 3), "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    full = run(tiny_config(tiny_data, tmp_path / "full", epochs=3, max_steps_per_epoch=0))
    got = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [round(e["train_loss"], 6) for e in got] == [round(h["train_loss"], 6) for h in full["history"]]


def test_non_finite_loss_stops_with_the_checkpoint_intact(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    import train.loop

    real = train.loop.train_one_epoch

    def stop_in_epoch_2(*args, **kwargs):
        if args[7] == 2:  # the epoch argument: an interrupted 3-epoch run
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train.loop, "train_one_epoch", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tiny_data, out, epochs=3))
    monkeypatch.setattr(train.loop, "train_one_epoch", real)
    before = (out / "checkpoints" / "last.pt").read_bytes()

    class Diverging(SaliencyLoss):
        """A loss that blows up, as a too-high learning rate or a corrupt map would make it."""

        def forward(self, pred, gt, fix):
            loss, parts = super().forward(pred, gt, fix)
            return loss * float("nan"), parts

    monkeypatch.setattr(train.loop, "SaliencyLoss", Diverging)
    with pytest.raises(train.loop.NonFiniteLoss, match="last good checkpoint .*last.pt is intact"):
        run(tiny_config(tiny_data, out, epochs=3, resume=True))
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_cli_errors_are_one_sentence(tiny_data, tmp_path):
    result = subprocess.run(cli("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--backbone-weights", "none"),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "holds no images" in result.stderr
    result = subprocess.run(cli(*cli_args(tiny_data, tmp_path / "o", 1), "--loss", "kld=1,auc=1"),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "unknown loss term 'auc'" in result.stderr


def test_ddp_with_two_cpu_processes(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 3 validation images on 2 ranks: each is scored once (no padding by repetition).
    args = cli_args(tiny_data, out, 2) + ["--val-fraction", "0.375"]
    result = subprocess.run(torchrun + args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["epochs"][-1]["val"]["n_images"] == 3 == len(json.loads((out / "split.json").read_text())["val"])
    assert result.stdout.count("best epoch") == 1  # only rank 0 reports
    SaliencyUNet.from_pretrained(out)
    # The same means as one process validating the same weights (those of epoch 2, in last.pt).
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    model = SaliencyUNet(SaliencyConfig.from_dict(checkpoint["config"]["model"]))
    model.load_state_dict(checkpoint["model"])
    split = json.loads((out / "split.json").read_text())
    by_id = {s.id: s for s in find_samples(tiny_data)}
    val = [by_id[i] for i in split["val"]]
    val_set = SaliencyDataset(val, (64, 64), targets=False)
    loader = DataLoader(val_set, batch_sampler=SizeBatchSampler(val_set.sizes, 2))
    scorer = Scorer(val, train_samples=[by_id[i] for i in split["train"]], seed=3)
    if model.config.face_prior > 0:  # the default: the faces the ranks detected and shared, detected here alone
        scorer.faces = val_faces(val, list(range(len(val))), workers=0, detector=model.config.face_detector)
    alone = evaluate(model, loader, scorer, torch.device("cpu"), show=False, precision="fp32")
    ddp = metrics["epochs"][-1]["val"]
    assert alone["n_images"] == ddp["n_images"] == 3
    for key, value in alone["metrics"].items():
        assert ddp["metrics"][key] == pytest.approx(value, abs=1e-5), key
    for name, scores in alone["baselines"].items():
        for key, value in scores.items():
            assert ddp["baselines"][name][key] == pytest.approx(value, abs=1e-5), (name, key)


def test_validation_on_the_device_matches_numpy_and_reads_the_ground_truth_once(tiny_data, monkeypatch):
    import train.data
    from train import metrics as M

    samples = find_samples(tiny_data)[:5]
    torch.manual_seed(0)
    model = SaliencyUNet(SaliencyConfig(input_size=(64, 64), flip_tta=True)).eval()
    val_set = SaliencyDataset(samples, (64, 64), targets=False)
    loader = DataLoader(val_set, batch_sampler=SizeBatchSampler(val_set.sizes, 2))
    scorer = Scorer(samples, train_samples=None, seed=0)  # ground truth prepared here, once
    gts = [read_map(s.map) for s in samples]
    fixes = [read_fixations(s, g.shape) for s, g in zip(samples, gts)]

    def no_reading(*args):
        raise AssertionError("validation read a ground-truth file after it was prepared")

    for name in ("read_map", "_read_map_stored", "read_fixations"):
        monkeypatch.setattr(train.data, name, no_reading)
    first = evaluate(model, loader, scorer, torch.device("cpu"), show=False, precision="fp32")
    second = evaluate(model, loader, scorer, torch.device("cpu"), show=False, precision="fp32")  # the next epoch
    assert first == second and first["n_images"] == 5
    assert set(first["metrics"]) == {"cc", "kld", "nss", "sim"}
    # The numpy MIT-exact metrics of the same model-size maps, resized by the metrics themselves.
    want = {"cc": [], "kld": [], "nss": [], "sim": []}
    with torch.no_grad():
        for i in range(len(samples)):
            pred = model.infer(val_set[i][0][None])[0, 0].numpy()
            want["cc"].append(M.cc(pred, gts[i]))
            want["kld"].append(M.kld(pred, gts[i]))
            want["sim"].append(M.sim(pred, gts[i]))
            want["nss"].append(M.nss(pred, fixes[i]))
    for key, values in want.items():
        assert first["metrics"][key] == pytest.approx(float(np.mean(values)), abs=1e-5), key
    full = evaluate(model, loader, scorer, torch.device("cpu"), show=False, precision="fp32", full=True)
    assert set(full["metrics"]) == {"cc", "kld", "nss", "sim", "auc_judd", "auc_borji", "sauc", "info_gain"}


def test_select_metric_must_be_scored_every_epoch(tmp_path, capsys):
    from train.loop import main

    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--select-metric", "auc_judd"]) == 1
    assert "--select-metric auc_judd is not scored every epoch; choose one of cc, kld, nss, sim" in capsys.readouterr().err


def test_output_folder_pushes_to_the_hub(tiny_data, tmp_path, hub_server, hub_repo_id):
    out = tmp_path / "pushed"
    run(tiny_config(tiny_data, out, epochs=1, push_to_hub=hub_repo_id))
    files = hub_server.repo(hub_repo_id).files()
    assert {"model.safetensors", "config.json", "README.md", "metrics.json", "split.json"} <= set(files)
    assert not any(name.startswith("checkpoints") for name in files)
    assert f'from_pretrained("{hub_repo_id}")' in files["README.md"].decode()


def test_fixations_from_csv_when_there_are_no_fixation_maps(tmp_path):
    blob_sample(tmp_path, "a")
    shutil.rmtree(tmp_path / "fixations")
    (tmp_path / "fixations.csv").write_text("id,subject,x,y,duration_ms\na,0,11,13,200\na,1,64,48,150\n")
    sample = find_samples(tmp_path)[0]
    assert sample.has_fixations and sample.fixation_map is None
    assert sorted(zip(*np.nonzero(read_fixations(sample, (48, 64))))) == [(12, 10), (47, 63)]
    _, _, fix, _ = SaliencyDataset([sample], (24, 32))[0]
    assert int(fix.sum()) == 2


def test_early_stopping_after_patience_epochs_without_improvement(tiny_data, tmp_path, monkeypatch):
    import train.loop

    def flat_validation(*args, **kwargs):
        return {"n_images": 2, "metrics": {"cc": 0.5, "kld": 1.0}, "baselines": {}}

    monkeypatch.setattr(train.loop, "evaluate", flat_validation)
    result = run(tiny_config(tiny_data, tmp_path / "early", epochs=5, patience=2))
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]  # best at 1, then 2 stale epochs
    assert result["best"]["epoch"] == 1
